//! The runtime source: probes of dockerd and containerd, the calls kubelet makes, each with a
//! hard deadline and never two of a kind in flight; a verdict per runtime from the age of the
//! call in flight (healthy, slow, wedged, hung, down, absent).

pub mod detect;
pub mod kubelet;
mod metrics;
pub mod state;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::config::{self, Config};
use crate::sources::{CheckFindings, CheckRun, Detector, Now, Source, SourceState};
use metrics::RuntimeMetrics;

pub use state::{RuntimeStatus, RuntimesSection};

/// The address of the probes' signals.
pub const NAME: &str = "runtime";

/// Extra wait past the stall threshold so a call stuck right at the threshold is judged
/// stalled rather than racing it.
pub const CHECK_STALL_MARGIN: Duration = Duration::from_millis(200);

pub struct RuntimeSource;

impl Source for RuntimeSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn state(
        &self,
        config: &Arc<Config>,
        registry: &mut Registry,
        now: Now,
    ) -> Option<Box<dyn SourceState>> {
        let metrics =
            RuntimeMetrics::register(registry, config.cri.mode != config::RuntimeMode::Disabled);
        Some(Box::new(state::RuntimeSlice::new(config, metrics, now)))
    }

    fn detectors(&self, config: &Arc<Config>) -> Vec<Box<dyn Detector>> {
        detect::detectors(config)
    }

    /// Every operation once; calls still in flight past the stall threshold are left in
    /// flight, so the verdict says they are stalled.
    fn check(&self, config: &Arc<Config>) -> Option<CheckRun> {
        let clients = detect::clients(config);
        let deadline = config.probes.deadline;
        let give_up = config.probes.stall_threshold + CHECK_STALL_MARGIN;
        Some(Box::pin(async move {
            let mut found = CheckFindings::default();
            let (done_tx, mut done_rx) = mpsc::unbounded_channel();
            let mut outstanding = 0usize;
            for client in clients {
                for operation in client.operations() {
                    let (started, finish) = detect::start(client.as_ref(), &operation, deadline);
                    found.signals.push(started);
                    let done = done_tx.clone();
                    outstanding += 1;
                    tokio::spawn(async move {
                        let finished = finish.await;
                        // The receiver is gone only when check gave up waiting.
                        for extra in finished.extras {
                            let _ = done.send((extra, false));
                        }
                        let _ = done.send((finished.signal, true));
                    });
                }
            }
            let give_up = tokio::time::Instant::now() + give_up;
            while outstanding > 0 {
                match tokio::time::timeout_at(give_up, done_rx.recv()).await {
                    Ok(Some((signal, is_finish))) => {
                        found.signals.push(signal);
                        outstanding -= usize::from(is_finish);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            found
        }))
    }
}
