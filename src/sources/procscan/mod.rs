//! The /proc scan source: tasks in uninterruptible sleep (D) per container and pod, paused
//! (frozen) told apart from stuck, and `runc` blocked forever on its `exec.fifo`.

pub mod detect;
mod metrics;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::signal::Signal;
use crate::sources::{CheckFindings, CheckRun, Detector, Now, Source, SourceState};
use metrics::ProcScanMetrics;

pub use state::{ProcScanSection, ProcScanView};

/// The address of the scanner's reports.
pub const NAME: &str = "proc_scan";

/// How far apart `check`'s two scans are: tasks in D in both are reported.
pub const CHECK_DSTATE_WINDOW: Duration = Duration::from_secs(1);

pub struct ProcScanSource;

impl Source for ProcScanSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn state(
        &self,
        config: &Arc<Config>,
        registry: &mut Registry,
        _now: Now,
    ) -> Option<Box<dyn SourceState>> {
        let metrics = ProcScanMetrics::register(registry);
        config.proc_scan.enabled.then(|| {
            Box::new(state::ProcScanState::new(
                metrics,
                config.proc_scan.stuck_after,
            )) as Box<dyn SourceState>
        })
    }

    fn detectors(&self, config: &Arc<Config>) -> Vec<Box<dyn Detector>> {
        detect::detector(config).into_iter().collect()
    }

    /// Two scans `proc_scan.stuck_after` apart (`check` sets it to [`CHECK_DSTATE_WINDOW`]):
    /// a one-shot check cannot know how long before the first a task went into D.
    fn check(&self, config: &Arc<Config>) -> Option<CheckRun> {
        if !config.proc_scan.enabled {
            return None;
        }
        let config = config.clone();
        Some(Box::pin(async move {
            let scanned = tokio::task::spawn_blocking(move || {
                let mut scanner = detect::ProcScanner::new(&config);
                scanner.scan();
                std::thread::sleep(config.proc_scan.stuck_after);
                scanner.scan()
            })
            .await;
            let mut found = CheckFindings::default();
            match scanned {
                Ok(report) => found.signals.push(Signal::source(NAME, Box::new(report))),
                Err(e) => found.unchecked.push(format!("/proc scan: {e}")),
            }
            found
        }))
    }
}
