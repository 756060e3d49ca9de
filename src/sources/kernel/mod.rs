//! The kernel source: the kernel log (`/dev/kmsg`, or syslog(2) where it may not be opened)
//! matched against rules — OOM kills (above all of `runc:[2:INIT]`), hung tasks, lockups,
//! read-only remounts — and attributed to containers.

pub mod detect;
mod metrics;
pub mod state;

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::signal::Signal;
use crate::sources::{CheckFindings, CheckRun, Detector, Now, Source, SourceState};
use detect::KernelSignal;
use metrics::KernelMetrics;

pub use state::{KernelSection, KernelStatus};

/// The address of the kernel log detector's signals.
pub const NAME: &str = "kernel_log";

pub struct KernelSource;

impl Source for KernelSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn state(
        &self,
        config: &Arc<Config>,
        registry: &mut Registry,
        _now: Now,
    ) -> Option<Box<dyn SourceState>> {
        let metrics = KernelMetrics::register(registry);
        if !config.kernel_log.enabled {
            return None;
        }
        Some(Box::new(state::KernelSlice::new(config, metrics)))
    }

    fn detectors(&self, config: &Arc<Config>) -> Vec<Box<dyn Detector>> {
        detect::detector(config).into_iter().collect()
    }

    /// The records of the look-back window, read once.
    fn check(&self, config: &Arc<Config>) -> Option<CheckRun> {
        if !config.kernel_log.enabled {
            return None;
        }
        let config = config.clone();
        Some(Box::pin(async move {
            let path = config.kernel_log.path.clone();
            let read = tokio::task::spawn_blocking(move || detect::check(&config)).await;
            let mut found = CheckFindings::default();
            match read {
                Ok(Ok(report)) => {
                    found.signals.push(Signal::from(KernelSignal::Up {
                        path,
                        source: report.source,
                    }));
                    found
                        .signals
                        .push(KernelSignal::Counters(report.counters).into());
                    for event in report.events {
                        let at = detect::kernel_time_to_wall(event.ts_usec);
                        let event = Box::new(event);
                        found.signals.push(KernelSignal::Event { event, at }.into());
                    }
                }
                Ok(Err(e)) => found
                    .unchecked
                    .push(format!("kernel log {}: {e}", path.display())),
                Err(e) => found.unchecked.push(format!("kernel log: {e}")),
            }
            found
        }))
    }
}
