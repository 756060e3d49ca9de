//! The container-stop source: Docker's event stream followed for kills and exits, each stop
//! timed, escalations to SIGKILL counted, stops with no exit by their deadline declared stuck
//! with the tasks in D or frozen that hold them. On any runtime, Docker or not, a container
//! task the /proc scan shows with SIGKILL pending is a stop too (a kill that cannot land);
//! containerd's event service gives every container's exit (with its status, and OOM kills),
//! which ends such a stop with its exit code.

pub mod detect;
pub mod exits;
mod metrics;
pub mod state;
pub mod stops;

use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::config::{Config, RuntimeMode};
use crate::sources::{CheckFindings, CheckRun, Detector, Now, Source, SourceState};
use detect::{EventStream, LifecycleSignal};
use metrics::LifecycleMetrics;

pub use detect::CHECK_LOOKBACK;
pub use state::{StopsSection, StopsView};

/// The address of the event stream follower's signals.
pub const NAME: &str = "lifecycle";

pub struct LifecycleSource;

impl Source for LifecycleSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn state(
        &self,
        config: &Arc<Config>,
        registry: &mut Registry,
        _now: Now,
    ) -> Option<Box<dyn SourceState>> {
        let metrics = LifecycleMetrics::register(registry);
        let docker_enabled = config.docker.mode != RuntimeMode::Disabled;
        let containerd_followed = detect::containerd::detector(config).is_some();
        if detect::detector(config).is_some() {
            metrics.follow(EventStream::Docker);
        }
        if containerd_followed {
            metrics.follow(EventStream::Containerd);
        }
        let state = state::LifecycleState::new(
            &config.lifecycle,
            docker_enabled,
            containerd_followed,
            config.proc_scan.stuck_after,
        );
        Some(Box::new(state::LifecycleSlice::new(state, metrics)))
    }

    fn detectors(&self, config: &Arc<Config>) -> Vec<Box<dyn Detector>> {
        detect::detector(config)
            .into_iter()
            .chain(detect::containerd::detector(config))
            .collect()
    }

    /// The events dockerd still buffers from the last [`CHECK_LOOKBACK`], with the probe's
    /// stall threshold as deadline; a failure shows in the stops section. containerd's event
    /// service keeps no history: its stream is not read, and the section says so.
    fn check(&self, config: &Arc<Config>) -> Option<CheckRun> {
        let docker = detect::detector(config).is_some();
        let containerd = detect::containerd::detector(config).is_some();
        if !docker && !containerd {
            return None;
        }
        let socket = config.docker.socket.clone();
        let deadline = config.probes.stall_threshold + crate::sources::runtime::CHECK_STALL_MARGIN;
        Some(Box::pin(async move {
            let mut found = CheckFindings::default();
            if containerd {
                found.signals.push(
                    LifecycleSignal::NotRead {
                        stream: EventStream::Containerd,
                        reason: "not read by check: containerd's event service keeps no history; the daemon follows it",
                    }
                    .into(),
                );
            }
            if !docker {
                return found;
            }
            let read = tokio::spawn(detect::check(socket, deadline))
                .await
                .unwrap_or_else(|e| Err(format!("reading events failed: {e}")));
            match read {
                Ok(events) => {
                    found.signals.push(
                        LifecycleSignal::StreamUp {
                            stream: EventStream::Docker,
                            reconnected: false,
                        }
                        .into(),
                    );
                    for event in events.events {
                        found
                            .signals
                            .push(LifecycleSignal::Event(Box::new(event)).into());
                    }
                    for reason in events.malformed {
                        found.signals.push(
                            LifecycleSignal::Malformed {
                                stream: EventStream::Docker,
                                reason,
                            }
                            .into(),
                        );
                    }
                }
                Err(error) => found.signals.push(
                    LifecycleSignal::StreamDown {
                        stream: EventStream::Docker,
                        error,
                        retry_in: std::time::Duration::ZERO,
                    }
                    .into(),
                ),
            }
            found
        }))
    }
}
