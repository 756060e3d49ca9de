//! The engine: the one place that turns signals into state, metrics and actions.
//!
//! It owns all mutable state. Detectors reach it only through the signal channel; the HTTP
//! server and `check` only read the [`Snapshot`] it publishes and the metrics registry.

pub mod runtime;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RuntimeMode};
use crate::detectors::probe;
use crate::heartbeat::Heartbeat;
use crate::metrics::{FailureLabels, Metrics, OperationLabels, RuntimeLabels, RuntimeStateLabels};
use crate::signal::{Runtime, Signal, SignalReceiver};
use runtime::{OperationStatus, RuntimeState, RuntimeTracker, Verdict};

/// What the HTTP server and `check` read: an immutable picture of the current state.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub node: String,
    #[serde(serialize_with = "serialize_time")]
    pub generated_at: SystemTime,
    pub runtimes: Vec<RuntimeStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStatus {
    pub runtime: Runtime,
    pub state: RuntimeState,
    pub reason: String,
    pub up: bool,
    pub stalled: bool,
    /// How long the runtime has been in this state.
    pub state_seconds: f64,
    pub operations: Vec<OperationStatus>,
}

pub fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

struct TrackedRuntime {
    tracker: RuntimeTracker,
    verdict: Verdict,
    since: Instant,
}

pub struct Engine {
    config: Arc<Config>,
    node: String,
    metrics: Arc<Metrics>,
    runtimes: Vec<TrackedRuntime>,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Engine {
    /// Build the engine and its metrics. Returns the engine and the receiver of snapshots.
    pub fn new(config: Arc<Config>) -> (Engine, watch::Receiver<Arc<Snapshot>>) {
        let node = config.resolved_node_name();
        let metrics = Metrics::new(config.metrics.node_label.then_some(node.as_str()));
        let now = Instant::now();
        let runtimes = Runtime::ALL
            .into_iter()
            .filter_map(|runtime| {
                let mode = runtime_mode(&config, runtime);
                (mode != RuntimeMode::Disabled).then(|| TrackedRuntime {
                    tracker: RuntimeTracker::new(
                        runtime,
                        mode,
                        &probe::operations_for(&config, runtime),
                    ),
                    verdict: Verdict {
                        state: RuntimeState::Pending,
                        reason: "no probe finished yet".into(),
                    },
                    since: now,
                })
            })
            .collect();
        let initial = Arc::new(Snapshot {
            node: node.clone(),
            generated_at: SystemTime::now(),
            runtimes: Vec::new(),
        });
        let (snapshot, receiver) = watch::channel(initial);
        let engine = Engine {
            config,
            node,
            metrics: Arc::new(metrics),
            runtimes,
            snapshot,
        };
        engine.initialise_series();
        (engine, receiver)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Create every fixed series at zero so dashboards and alerts see them from the start.
    fn initialise_series(&self) {
        for tracked in &self.runtimes {
            let runtime = tracked.tracker.runtime().as_str();
            self.metrics
                .runtime_up
                .get_or_create(&RuntimeLabels { runtime })
                .set(0);
            self.metrics
                .runtime_stalled
                .get_or_create(&RuntimeLabels { runtime })
                .set(0);
            for state in RuntimeState::EXPORTED {
                self.metrics
                    .runtime_state
                    .get_or_create(&RuntimeStateLabels {
                        runtime,
                        state: state.as_str(),
                    })
                    .set(0);
            }
            for operation in tracked.tracker.operations() {
                let labels = OperationLabels {
                    runtime,
                    operation: operation.label(),
                };
                self.metrics
                    .probe_in_flight_seconds
                    .get_or_create(&labels)
                    .set(0.0);
                self.metrics
                    .probe_duration_seconds
                    .get_or_create_owned(&labels);
            }
        }
    }

    /// Run until shutdown: apply signals as they come, re-evaluate every `evaluate_interval`.
    pub async fn run(
        mut self,
        mut signals: SignalReceiver,
        heartbeat: Heartbeat,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.evaluate_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                signal = signals.recv() => match signal {
                    Some(signal) => self.apply(signal),
                    None => break,
                },
                _ = tick.tick() => {
                    heartbeat.beat();
                    self.evaluate(Instant::now());
                }
            }
        }
    }

    pub fn apply(&mut self, signal: Signal) {
        match signal {
            Signal::ProbeStarted {
                runtime,
                operation,
                id,
                at,
            } => {
                if let Some(tracked) = self.tracked(runtime) {
                    tracked.tracker.probe_started(&operation, id, at);
                }
            }
            Signal::ProbeFinished {
                runtime,
                operation,
                id,
                started,
                finished,
                result,
            } => {
                let labels = OperationLabels {
                    runtime: runtime.as_str(),
                    operation: operation.label(),
                };
                if let Err(failure) = &result {
                    self.metrics
                        .probe_failures_total
                        .get_or_create(&FailureLabels {
                            runtime: labels.runtime,
                            operation: labels.operation.clone(),
                            reason: failure.reason(),
                        })
                        .inc();
                    tracing::debug!(%runtime, operation = %labels.operation, %failure, "probe failed");
                }
                if !matches!(result, Err(crate::signal::ProbeFailure::Timeout)) {
                    self.metrics
                        .probe_duration_seconds
                        .get_or_create(&labels)
                        .observe(finished.saturating_duration_since(started).as_secs_f64());
                }
                if let Some(tracked) = self.tracked(runtime) {
                    tracked
                        .tracker
                        .probe_finished(&operation, id, started, finished, result);
                }
            }
        }
    }

    fn tracked(&mut self, runtime: Runtime) -> Option<&mut TrackedRuntime> {
        self.runtimes
            .iter_mut()
            .find(|t| t.tracker.runtime() == runtime)
    }

    /// Re-evaluate every verdict at `now`, update metrics, publish a snapshot.
    pub fn evaluate(&mut self, now: Instant) {
        let thresholds = self.config.probes.clone();
        let mut statuses = Vec::with_capacity(self.runtimes.len());
        for tracked in &mut self.runtimes {
            let verdict = tracked.tracker.evaluate(now, &thresholds);
            let runtime = tracked.tracker.runtime();
            if verdict.state != tracked.verdict.state {
                log_transition(runtime, &tracked.verdict, &verdict);
                tracked.since = now;
            }
            tracked.verdict = verdict;
            let name = runtime.as_str();
            let state = tracked.verdict.state;
            let metrics = &self.metrics;
            metrics
                .runtime_up
                .get_or_create(&RuntimeLabels { runtime: name })
                .set(i64::from(state.is_up()));
            metrics
                .runtime_stalled
                .get_or_create(&RuntimeLabels { runtime: name })
                .set(i64::from(state.is_stalled()));
            for exported in RuntimeState::EXPORTED {
                metrics
                    .runtime_state
                    .get_or_create(&RuntimeStateLabels {
                        runtime: name,
                        state: exported.as_str(),
                    })
                    .set(i64::from(exported == state));
            }
            for operation in tracked.tracker.operations() {
                metrics
                    .probe_in_flight_seconds
                    .get_or_create(&OperationLabels {
                        runtime: name,
                        operation: operation.label(),
                    })
                    .set(tracked.tracker.in_flight_age(operation, now).as_secs_f64());
            }
            statuses.push(RuntimeStatus {
                runtime,
                state,
                reason: tracked.verdict.reason.clone(),
                up: state.is_up(),
                stalled: state.is_stalled(),
                state_seconds: now.saturating_duration_since(tracked.since).as_secs_f64(),
                operations: tracked.tracker.operation_status(now),
            });
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            node: self.node.clone(),
            generated_at: SystemTime::now(),
            runtimes: statuses,
        }));
    }
}

fn runtime_mode(config: &Config, runtime: Runtime) -> RuntimeMode {
    match runtime {
        Runtime::Docker => config.docker.mode,
        Runtime::Containerd => config.containerd.mode,
    }
}

fn log_transition(runtime: Runtime, from: &Verdict, to: &Verdict) {
    let (from, state, reason) = (from.state.as_str(), to.state.as_str(), to.reason.as_str());
    if to.state.is_problem() {
        tracing::warn!(%runtime, from, state, reason, "runtime state changed");
    } else {
        tracing::info!(%runtime, from, state, reason, "runtime state changed");
    }
}
