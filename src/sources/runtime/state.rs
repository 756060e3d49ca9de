//! The runtime source's engine-side state: a verdict per runtime from the probes in flight and
//! finished, its metrics, the incidents its stalls open and the dumps they ask for.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::detect::{self, ProbeFailure, ProbeSignal};
use super::metrics::{FailureLabels, OperationLabels, RuntimeMetrics, RuntimeStateLabels};
use super::verdict::{OperationStatus, RuntimeState, RuntimeTracker, Verdict};
use crate::config::{Config, ProbeConfig, RuntimeMode};
use crate::domain::Runtime;
use crate::engine::incidents::{Layer, Observation};
use crate::metrics::RuntimeLabels;
use crate::signal::Payload;
use crate::sources::{Action, Context, Now, Section, SourceState, json_of, payload_of};

struct TrackedRuntime {
    tracker: RuntimeTracker,
    verdict: Verdict,
    since: Instant,
}

pub struct RuntimeSlice {
    runtimes: Vec<TrackedRuntime>,
    thresholds: ProbeConfig,
    trigger_states: Vec<RuntimeState>,
    dumps_enabled: bool,
    metrics: RuntimeMetrics,
}

impl RuntimeSlice {
    pub fn new(config: &Config, metrics: RuntimeMetrics, now: Now) -> RuntimeSlice {
        let runtimes = Runtime::ALL
            .into_iter()
            .filter_map(|runtime| {
                let mode = config.runtime_mode(runtime);
                (mode != RuntimeMode::Disabled).then(|| TrackedRuntime {
                    tracker: RuntimeTracker::new(
                        runtime,
                        mode,
                        &detect::operations_for(config, runtime),
                    ),
                    verdict: Verdict {
                        state: RuntimeState::Pending,
                        reason: "no probe finished yet".into(),
                    },
                    since: now.mono,
                })
            })
            .collect();
        let slice = RuntimeSlice {
            runtimes,
            thresholds: config.probes.clone(),
            trigger_states: config.dumps.trigger_states.clone(),
            dumps_enabled: config.dumps.enabled,
            metrics,
        };
        slice.initialise_series();
        slice
    }

    /// Create every fixed series at zero so dashboards and alerts see them from the start.
    fn initialise_series(&self) {
        for tracked in &self.runtimes {
            let runtime = tracked.tracker.runtime().as_str();
            let labels = RuntimeLabels { runtime };
            self.metrics.up.get_or_create(&labels).set(0);
            self.metrics.stalled.get_or_create(&labels).set(0);
            for state in RuntimeState::EXPORTED {
                self.metrics
                    .state
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

    fn tracked(&mut self, runtime: Runtime) -> Option<&mut TrackedRuntime> {
        self.runtimes
            .iter_mut()
            .find(|t| t.tracker.runtime() == runtime)
    }

    fn apply_probe(&mut self, signal: ProbeSignal) {
        match signal {
            ProbeSignal::Started {
                runtime,
                operation,
                id,
                at,
            } => {
                if let Some(tracked) = self.tracked(runtime) {
                    tracked.tracker.probe_started(&operation, id, at);
                }
            }
            ProbeSignal::Finished {
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
                if !matches!(result, Err(ProbeFailure::Timeout)) {
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

    fn update_metrics(&self, now: Instant) {
        for tracked in &self.runtimes {
            let name = tracked.tracker.runtime().as_str();
            let state = tracked.verdict.state;
            let labels = RuntimeLabels { runtime: name };
            self.metrics
                .up
                .get_or_create(&labels)
                .set(i64::from(state.is_up()));
            self.metrics
                .stalled
                .get_or_create(&labels)
                .set(i64::from(state.is_stalled()));
            for exported in RuntimeState::EXPORTED {
                self.metrics
                    .state
                    .get_or_create(&RuntimeStateLabels {
                        runtime: name,
                        state: exported.as_str(),
                    })
                    .set(i64::from(exported == state));
            }
            for operation in tracked.tracker.operations() {
                self.metrics
                    .probe_in_flight_seconds
                    .get_or_create(&OperationLabels {
                        runtime: name,
                        operation: operation.label(),
                    })
                    .set(tracked.tracker.in_flight_age(operation, now).as_secs_f64());
            }
        }
    }

    /// The lowest layer stalled right now: containerd under dockerd.
    fn stalled_layer(&self, runtime: Runtime) -> Layer {
        let containerd_stalled = self
            .runtimes
            .iter()
            .any(|t| t.tracker.runtime() == Runtime::Containerd && t.verdict.state.is_stalled());
        if containerd_stalled {
            Layer::Containerd
        } else {
            Layer::of(runtime)
        }
    }
}

impl SourceState for RuntimeSlice {
    fn apply(&mut self, payload: Payload, _cx: &mut Context) {
        if let Some(signal) = payload_of::<ProbeSignal>(payload, super::NAME) {
            self.apply_probe(signal);
        }
    }

    fn evaluate(&mut self, cx: &mut Context) {
        let now = cx.now.mono;
        let mut entered_trigger = Vec::new();
        for tracked in &mut self.runtimes {
            let verdict = tracked.tracker.evaluate(now, &self.thresholds);
            if verdict.state != tracked.verdict.state {
                let runtime = tracked.tracker.runtime();
                log_transition(runtime, &tracked.verdict, &verdict);
                let is_trigger = |s: RuntimeState| self.trigger_states.contains(&s);
                if is_trigger(verdict.state) && !is_trigger(tracked.verdict.state) {
                    entered_trigger.push(runtime);
                }
                tracked.since = now;
            }
            tracked.verdict = verdict;
        }
        self.update_metrics(now);
        cx.board.runtimes = self
            .runtimes
            .iter()
            .map(|t| (t.tracker.runtime(), t.verdict.state))
            .collect();
        if self.dumps_enabled {
            cx.actions
                .extend(entered_trigger.into_iter().map(Action::RequestDumps));
        }
    }

    /// After the other sources: a stop that just became stuck keeps its incident open.
    fn settle(&mut self, cx: &mut Context) {
        for tracked in &self.runtimes {
            let runtime = tracked.tracker.runtime();
            let state = tracked.verdict.state;
            if state == RuntimeState::Pending {
                continue;
            }
            let stalled = state.is_stalled();
            let seen = Observation {
                state: state.as_str(),
                reason: &tracked.verdict.reason,
                stalled,
                recovered: (state.is_up() && !stalled) || state == RuntimeState::Absent,
                layer: self.stalled_layer(runtime),
            };
            let changes = cx.incidents.on_state(runtime, &seen, cx.now.wall);
            cx.incident_changes(changes);
        }
    }

    fn section(&mut self, now: Now) -> Option<Arc<dyn Section>> {
        let runtimes = self
            .runtimes
            .iter()
            .map(|tracked| {
                let state = tracked.verdict.state;
                RuntimeStatus {
                    runtime: tracked.tracker.runtime(),
                    state,
                    reason: tracked.verdict.reason.clone(),
                    up: state.is_up(),
                    stalled: state.is_stalled(),
                    state_seconds: now
                        .mono
                        .saturating_duration_since(tracked.since)
                        .as_secs_f64(),
                    operations: tracked.tracker.operation_status(now.mono),
                    permission_denied: tracked.tracker.permission_denied(),
                }
            })
            .collect();
        Some(Arc::new(RuntimesSection(runtimes)))
    }
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
    /// The last answer was "permission denied" on the socket: not checked, not a problem.
    #[serde(skip)]
    pub permission_denied: bool,
}

/// `runtimes` in `/status`: one entry per runtime that is not disabled.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct RuntimesSection(pub Vec<RuntimeStatus>);

impl Section for RuntimesSection {
    fn key(&self) -> &'static str {
        "runtimes"
    }

    fn to_json(&self) -> serde_json::Value {
        json_of(self)
    }

    fn problems(&self, _now: SystemTime) -> Vec<String> {
        let mut problems: Vec<&RuntimeStatus> = self
            .0
            .iter()
            .filter(|r| r.state.is_problem() && !r.permission_denied)
            .collect();
        problems.sort_by_key(|r| std::cmp::Reverse(severity(r.state)));
        problems
            .into_iter()
            .map(|r| format!("{} is {}: {}", r.runtime, r.state.as_str(), r.reason))
            .collect()
    }

    fn unchecked(&self) -> Vec<String> {
        self.0
            .iter()
            .filter(|r| r.permission_denied)
            .map(|r| {
                format!(
                    "{}: permission denied on its socket (run as root?)",
                    r.runtime
                )
            })
            .collect()
    }

    fn render_check(&self, out: &mut String, _now: SystemTime) {
        let _ = writeln!(out, "\nRuntimes");
        if self.0.is_empty() {
            let _ = writeln!(out, "  (none enabled)");
        }
        for r in &self.0 {
            let _ = writeln!(
                out,
                "  {:<11} {:<8} {}",
                r.runtime.as_str(),
                r.state.as_str(),
                r.reason
            );
            for op in &r.operations {
                let detail = if op.in_flight_seconds > 0.0 {
                    format!("no answer after {:.1}s", op.in_flight_seconds)
                } else if let Some(error) = &op.last_error {
                    error.clone()
                } else if let Some(d) = op.last_duration_seconds {
                    format!("{:.1} ms", d * 1000.0)
                } else {
                    "not probed".into()
                };
                let _ = writeln!(out, "      {:<20} {detail}", op.operation);
            }
        }
    }
}

fn severity(state: RuntimeState) -> u8 {
    match state {
        RuntimeState::Hung => 5,
        RuntimeState::Wedged => 4,
        RuntimeState::Down => 3,
        RuntimeState::Slow => 2,
        _ => 0,
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
