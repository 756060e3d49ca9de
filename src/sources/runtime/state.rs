//! The runtime source's engine-side state: a verdict per runtime from the probes in flight and
//! finished, its metrics, the incidents its stalls open and the dumps they ask for.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::detect::{self, Operation, ProbeFailure, ProbeSignal, StatusSubject, UnknownTask};
use super::kubelet::KubeletClocks;
use super::metrics::{FailureLabels, OperationLabels, RuntimeMetrics, RuntimeStateLabels};
use super::verdict::{OperationStatus, RuntimeState, RuntimeTracker, Verdict};
use crate::config::{Config, ProbeConfig, RuntimeMode};
use crate::domain::Runtime;
use crate::engine::incidents::{Evidence, Layer, Observation};
use crate::metrics::RuntimeLabels;
use crate::signal::Payload;
use crate::sources::{Action, Context, Now, Section, SourceState, json_of, payload_of};

struct TrackedRuntime {
    tracker: RuntimeTracker,
    verdict: Verdict,
    since: Instant,
    /// The pod or container of the CRI status call in flight, with its probe id.
    sample_in_flight: Option<(u64, StatusSubject)>,
    /// The pod or container the last status call asked about.
    last_sampled: Option<StatusSubject>,
}

/// How often a CRI call still blocked is restated as evidence (its age grows).
const CRI_EVIDENCE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

pub struct RuntimeSlice {
    runtimes: Vec<TrackedRuntime>,
    thresholds: ProbeConfig,
    trigger_states: Vec<RuntimeState>,
    dumps_enabled: bool,
    metrics: RuntimeMetrics,
    /// containerd tasks listed UNKNOWN in the last `Tasks.List` of each namespace.
    unknown_tasks: std::collections::BTreeMap<String, Vec<UnknownTask>>,
    /// Evidence to add to the incidents at the next settle.
    pending_evidence: Vec<Evidence>,
    /// What was last stated as CRI evidence, and when.
    cri_evidence_said: Option<(Vec<String>, Instant)>,
    kubelet: Option<KubeletClocks>,
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
                    sample_in_flight: None,
                    last_sampled: None,
                })
            })
            .collect();
        let slice = RuntimeSlice {
            runtimes,
            thresholds: config.probes.clone(),
            trigger_states: config.dumps.trigger_states.clone(),
            dumps_enabled: config.dumps.enabled,
            metrics,
            unknown_tasks: Default::default(),
            pending_evidence: Vec::new(),
            cri_evidence_said: None,
            kubelet: (config.cri.mode != RuntimeMode::Disabled)
                .then(|| KubeletClocks::new(now.mono)),
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
                subject,
            } => {
                if let Some(tracked) = self.tracked(runtime) {
                    tracked.tracker.probe_started(&operation, id, at);
                    if operation == Operation::StatusSample {
                        tracked.last_sampled = subject.clone();
                        tracked.sample_in_flight = subject.map(|s| (id, s));
                    }
                }
            }
            ProbeSignal::UnknownTasks { namespace, tasks } => {
                let labels = super::metrics::NamespaceLabels {
                    namespace: namespace.clone(),
                };
                self.metrics
                    .unknown_tasks
                    .get_or_create(&labels)
                    .set(i64::try_from(tasks.len()).unwrap_or(i64::MAX));
                for task in &tasks {
                    tracing::warn!(
                        %namespace,
                        container = %task.container_id,
                        shim_pid = ?task.shim_pid,
                        shim_state = ?task.shim_state,
                        shim_wchan = ?task.shim_wchan,
                        "containerd lists a task as UNKNOWN: its shim does not answer"
                    );
                }
                if tasks.is_empty() {
                    self.unknown_tasks.remove(&namespace);
                } else {
                    self.unknown_tasks.insert(namespace, tasks);
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
                    if operation == Operation::StatusSample
                        && tracked
                            .sample_in_flight
                            .as_ref()
                            .is_some_and(|(i, _)| *i == id)
                        && !matches!(result, Err(ProbeFailure::Timeout))
                    {
                        tracked.sample_in_flight = None;
                    }
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

    /// The lowest layer stalled right now: containerd under dockerd and under CRI.
    fn stalled_layer(&self, runtime: Runtime) -> Layer {
        let containerd_stalled = self
            .runtimes
            .iter()
            .any(|t| t.tracker.runtime() == Runtime::Containerd && t.verdict.state.is_stalled());
        let containerd_hung = self.state_of(Runtime::Containerd) == Some(RuntimeState::Hung);
        if runtime == Runtime::Cri && !containerd_hung {
            Layer::Cri
        } else if containerd_stalled {
            Layer::Containerd
        } else {
            Layer::of(runtime)
        }
    }
}

impl RuntimeSlice {
    fn state_of(&self, runtime: Runtime) -> Option<RuntimeState> {
        self.runtimes
            .iter()
            .find(|t| t.tracker.runtime() == runtime)
            .map(|t| t.verdict.state)
    }

    /// The UNKNOWN task of `container_id`, in any namespace.
    fn unknown_task(&self, container_id: &str) -> Option<&UnknownTask> {
        self.unknown_tasks
            .values()
            .flatten()
            .find(|t| t.container_id == container_id)
    }

    /// The CRI verdict with the layer named: a stalled CRI whose containerd answers its own
    /// API is the CRI layer wedged; with containerd's own API stuck too, containerd is hung.
    /// Also the evidence that names the chain: the blocked calls, the pod or container a
    /// status call is stuck on, and its shim.
    fn attribute_cri(&mut self, verdicts: &mut [Verdict], now: Now) {
        let state_of = |runtime: Runtime| {
            self.runtimes
                .iter()
                .zip(verdicts.iter())
                .find(|(t, _)| t.tracker.runtime() == runtime)
                .map(|(_, v)| v.state)
        };
        let containerd = state_of(Runtime::Containerd);
        let Some(cri) = self
            .runtimes
            .iter()
            .position(|t| t.tracker.runtime() == Runtime::Cri)
        else {
            return;
        };
        let stuck_on = {
            let tracked = &self.runtimes[cri];
            let sample_age = tracked
                .tracker
                .in_flight_age(&Operation::StatusSample, now.mono);
            tracked
                .sample_in_flight
                .as_ref()
                .filter(|_| sample_age > self.thresholds.stall_threshold)
                .map(|(_, subject)| subject.clone())
        };
        let shim = stuck_on
            .as_ref()
            .and_then(|s| self.unknown_task(&s.id).cloned());
        let tracked = &self.runtimes[cri];
        let Some(verdict) = verdicts.get_mut(cri) else {
            return;
        };
        if !verdict.state.is_stalled() {
            self.cri_evidence_said = None;
            return;
        }
        let mut reason = verdict.reason.clone();
        if let Some(subject) = &stuck_on {
            reason.push_str(&format!("; status call of {subject} does not answer"));
        }
        if let Some(task) = &shim {
            reason.push_str(&format!(
                "; its shim pid {} is in state {}",
                task.shim_pid.map_or("?".into(), |p| p.to_string()),
                task.shim_state.unwrap_or('?')
            ));
        }
        match containerd {
            Some(RuntimeState::Hung) => {
                *verdict = Verdict {
                    state: RuntimeState::Hung,
                    reason: format!(
                        "containerd hung: CRI and containerd's own API stuck ({reason})"
                    ),
                };
            }
            Some(state) if state.is_up() => {
                *verdict = Verdict {
                    state: RuntimeState::Wedged,
                    reason: format!("CRI layer wedged: {reason}; containerd's own API answers"),
                };
            }
            _ => verdict.reason = reason,
        }
        let blocked: Vec<(String, f64)> = tracked
            .tracker
            .operation_status(now.mono)
            .into_iter()
            .filter_map(|op| op.stalled_seconds.map(|s| (op.operation, s)))
            .collect();
        let key: Vec<String> = blocked.iter().map(|(op, _)| op.clone()).collect();
        let due = self.cri_evidence_said.as_ref().is_none_or(|(said, at)| {
            *said != key || now.mono.saturating_duration_since(*at) >= CRI_EVIDENCE_EVERY
        });
        if !due {
            return;
        }
        self.cri_evidence_said = Some((key, now.mono));
        let behind = stuck_on.as_ref().map(|s| s.to_string());
        for (operation, seconds) in blocked {
            self.pending_evidence.push(Evidence::CriCallBlocked {
                at: now.wall,
                call: cri_call_name(&operation).to_string(),
                seconds,
                behind: behind.clone().filter(|_| operation != "status_sample"),
            });
        }
        if let (Some(subject), Some(task)) = (&stuck_on, shim) {
            self.pending_evidence.push(Evidence::UnresponsiveShim {
                at: now.wall,
                container_id: task.container_id.clone(),
                container: subject.container.clone(),
                shim_pid: task.shim_pid,
                shim_state: task.shim_state,
                shim_wchan: task.shim_wchan.clone(),
            });
        }
    }
}

/// The CRI method an operation calls, as kubelet's logs name it.
fn cri_call_name(operation: &str) -> &str {
    match operation {
        "status" => "Status",
        "list_pod_sandbox" => "ListPodSandbox",
        "list_containers" => "ListContainers",
        "status_sample" => "PodSandboxStatus/ContainerStatus",
        other => other,
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
        let mut verdicts: Vec<Verdict> = self
            .runtimes
            .iter_mut()
            .map(|t| t.tracker.evaluate(now, &self.thresholds))
            .collect();
        self.attribute_cri(&mut verdicts, cx.now);
        for (tracked, verdict) in self.runtimes.iter_mut().zip(verdicts) {
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
        if let (Some(clocks), Some(cri)) = (
            &mut self.kubelet,
            self.runtimes
                .iter()
                .find(|t| t.tracker.runtime() == Runtime::Cri),
        ) {
            clocks.update(&cri.tracker, cri.verdict.state == RuntimeState::Absent, now);
            clocks.export(&self.metrics);
        }
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
        // After the incidents opened: the CRI chain belongs to the incident it explains.
        for evidence in self.pending_evidence.drain(..) {
            let changes = cx.incidents.add_evidence(evidence);
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
                    status_call_in_flight: tracked
                        .sample_in_flight
                        .as_ref()
                        .map(|(_, s)| s.clone()),
                    last_status_call: tracked.last_sampled.clone(),
                    kubelet: (tracked.tracker.runtime() == Runtime::Cri)
                        .then_some(self.kubelet)
                        .flatten(),
                    unknown_tasks: if tracked.tracker.runtime() == Runtime::Containerd {
                        self.unknown_tasks.values().flatten().cloned().collect()
                    } else {
                        Vec::new()
                    },
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
    /// CRI: the pod or container whose status call is in flight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_call_in_flight: Option<StatusSubject>,
    /// CRI: the pod or container the last status call asked about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status_call: Option<StatusSubject>,
    /// CRI: how far kubelet's own thresholds are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubelet: Option<KubeletClocks>,
    /// containerd: tasks listed UNKNOWN, with their shims.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_tasks: Vec<UnknownTask>,
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
            .chain(self.0.iter().flat_map(|r| {
                r.unknown_tasks.iter().map(|t| {
                    format!(
                        "containerd task {} is UNKNOWN: its shim (pid {}, state {}) does not answer",
                        detect::short_id(&t.container_id),
                        t.shim_pid.map_or("?".into(), |p| p.to_string()),
                        t.shim_state.unwrap_or('?')
                    )
                })
            }))
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
            if let Some(subject) = r.status_call_in_flight.as_ref().filter(|_| r.stalled) {
                let _ = writeln!(out, "      status call in flight on {subject}");
            }
            if let Some(k) = &r.kubelet {
                let _ = writeln!(
                    out,
                    "      kubelet: PLEG relist {:.0}s ago, {:.0}s left of 3m; runtime Status {:.0}s ago, {:.0}s left of 30s",
                    k.relist_age_seconds,
                    k.relist_seconds_left,
                    k.status_age_seconds,
                    k.status_seconds_left
                );
            }
            for task in &r.unknown_tasks {
                let _ = writeln!(
                    out,
                    "      task {} UNKNOWN: shim pid {} state {} wchan {}",
                    detect::short_id(&task.container_id),
                    task.shim_pid.map_or("?".into(), |p| p.to_string()),
                    task.shim_state.unwrap_or('?'),
                    task.shim_wchan.as_deref().unwrap_or("?")
                );
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
