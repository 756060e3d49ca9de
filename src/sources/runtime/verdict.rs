//! The verdict on one runtime, from its probes. Pure: fed probe starts and finishes, asked
//! for the state at an instant.
//!
//! A runtime is *stalled* as soon as its oldest probe in flight is older than the stall
//! threshold — not when the probe's deadline finally fires — and stays stalled until that
//! operation succeeds again (a timed-out probe is followed by a fresh one whose young age
//! must not clear the stall).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{ProbeConfig, RuntimeMode};
use crate::domain::Runtime;
use crate::sources::runtime::detect::{Operation, ProbeFailure, Unreachable};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeState {
    /// No probe has finished yet.
    Pending,
    Healthy,
    /// Answering, but slower than the slow threshold.
    Slow,
    /// Liveness answers, but another operation is stalled (e.g. ping ok, `docker ps` stuck).
    Wedged,
    /// The liveness operation itself is stalled.
    Hung,
    /// Not reachable, or answering with errors.
    Down,
    /// Not installed: socket missing and never seen up (mode `auto`).
    Absent,
}

impl RuntimeState {
    /// The states exported in `hangwatch_runtime_state{state}`.
    pub const EXPORTED: [RuntimeState; 6] = [
        RuntimeState::Healthy,
        RuntimeState::Slow,
        RuntimeState::Wedged,
        RuntimeState::Hung,
        RuntimeState::Down,
        RuntimeState::Absent,
    ];

    /// The states that may trigger goroutine dumps.
    pub const TRIGGERS: [RuntimeState; 4] = [
        RuntimeState::Slow,
        RuntimeState::Wedged,
        RuntimeState::Hung,
        RuntimeState::Down,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeState::Pending => "pending",
            RuntimeState::Healthy => "healthy",
            RuntimeState::Slow => "slow",
            RuntimeState::Wedged => "wedged",
            RuntimeState::Hung => "hung",
            RuntimeState::Down => "down",
            RuntimeState::Absent => "absent",
        }
    }

    pub fn is_stalled(self) -> bool {
        matches!(self, RuntimeState::Wedged | RuntimeState::Hung)
    }

    pub fn is_up(self) -> bool {
        matches!(
            self,
            RuntimeState::Healthy | RuntimeState::Slow | RuntimeState::Wedged
        )
    }

    /// Whether `hangwatch check` should report a problem.
    pub fn is_problem(self) -> bool {
        !matches!(
            self,
            RuntimeState::Healthy | RuntimeState::Absent | RuntimeState::Pending
        )
    }
}

/// What is known about one kind of probe call.
#[derive(Debug, Clone, Default)]
struct OperationTrack {
    in_flight: Option<(u64, Instant)>,
    last_result: Option<Result<(), ProbeFailure>>,
    last_duration: Option<Duration>,
    last_success: Option<Instant>,
    /// Start of the probe that first exceeded the stall threshold; cleared by an answer.
    stalled_since: Option<Instant>,
}

/// An operation's state, for `/status` and `hangwatch check`.
#[derive(Debug, Clone, Serialize)]
pub struct OperationStatus {
    pub operation: String,
    pub in_flight_seconds: f64,
    pub stalled_seconds: Option<f64>,
    pub last_duration_seconds: Option<f64>,
    pub last_error: Option<String>,
    pub seconds_since_success: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RuntimeTracker {
    runtime: Runtime,
    mode: RuntimeMode,
    operations: BTreeMap<Operation, OperationTrack>,
    seen_up: bool,
}

/// The evaluated verdict with the reason a human reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub state: RuntimeState,
    pub reason: String,
}

impl RuntimeTracker {
    pub fn new(runtime: Runtime, mode: RuntimeMode, operations: &[Operation]) -> RuntimeTracker {
        RuntimeTracker {
            runtime,
            mode,
            operations: operations
                .iter()
                .map(|op| (op.clone(), OperationTrack::default()))
                .collect(),
            seen_up: false,
        }
    }

    pub fn runtime(&self) -> Runtime {
        self.runtime
    }

    pub fn operations(&self) -> impl Iterator<Item = &Operation> {
        self.operations.keys()
    }

    pub fn probe_started(&mut self, operation: &Operation, id: u64, at: Instant) {
        let track = self.operations.entry(operation.clone()).or_default();
        track.in_flight = Some((id, at));
    }

    /// Record a finished probe. A finish for a probe that is no longer the one in flight
    /// (it was superseded) is ignored.
    pub fn probe_finished(
        &mut self,
        operation: &Operation,
        id: u64,
        started: Instant,
        finished: Instant,
        result: Result<(), ProbeFailure>,
    ) {
        let track = self.operations.entry(operation.clone()).or_default();
        if track.in_flight.is_some_and(|(current, _)| current != id) {
            return;
        }
        track.in_flight = None;
        match &result {
            Ok(()) => {
                track.stalled_since = None;
                track.last_success = Some(finished);
                self.seen_up = true;
            }
            Err(ProbeFailure::Timeout) => {
                track.stalled_since.get_or_insert(started);
            }
            Err(_) => track.stalled_since = None,
        }
        track.last_duration = Some(finished.saturating_duration_since(started));
        track.last_result = Some(result);
    }

    /// Mark operations stalled whose probe in flight crossed the threshold.
    fn note_stalls(&mut self, now: Instant, thresholds: &ProbeConfig) {
        for track in self.operations.values_mut() {
            if let Some((_, started)) = track.in_flight
                && now.saturating_duration_since(started) > thresholds.stall_threshold
            {
                track.stalled_since.get_or_insert(started);
            }
        }
    }

    /// When `operation` last answered successfully.
    pub fn last_success(&self, operation: &Operation) -> Option<Instant> {
        self.operations.get(operation).and_then(|t| t.last_success)
    }

    /// The socket refused us: the last answer of some operation was "permission denied".
    pub fn permission_denied(&self) -> bool {
        self.operations.values().any(|t| {
            matches!(
                t.last_result,
                Some(Err(ProbeFailure::Unreachable(
                    Unreachable::PermissionDenied
                )))
            )
        })
    }

    pub fn in_flight_age(&self, operation: &Operation, now: Instant) -> Duration {
        self.operations
            .get(operation)
            .and_then(|t| t.in_flight)
            .map(|(_, started)| now.saturating_duration_since(started))
            .unwrap_or_default()
    }

    pub fn evaluate(&mut self, now: Instant, thresholds: &ProbeConfig) -> Verdict {
        self.note_stalls(now, thresholds);
        let verdict = |state, reason: String| Verdict { state, reason };
        let stalled: Vec<(&Operation, Duration)> = self
            .operations
            .iter()
            .filter_map(|(op, t)| {
                t.stalled_since
                    .map(|since| (op, now.saturating_duration_since(since)))
            })
            .collect();
        let describe = |list: &[(&Operation, Duration)]| {
            list.iter()
                .map(|(op, age)| format!("{} stuck for {:.1}s", op.label(), age.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        };

        let failures: Vec<(&Operation, &ProbeFailure)> = self
            .operations
            .iter()
            .filter_map(|(op, t)| match &t.last_result {
                Some(Err(f)) if !matches!(f, ProbeFailure::Timeout) => Some((op, f)),
                _ => None,
            })
            .collect();
        // A socket that does not serve the API (containerd without its CRI plugin) is as good
        // as none.
        let socket_missing = failures.iter().any(|(_, f)| {
            matches!(
                f,
                ProbeFailure::Unreachable(Unreachable::SocketMissing | Unreachable::NotServed)
            )
        });
        if socket_missing && self.mode == RuntimeMode::Auto && !self.seen_up {
            return verdict(
                RuntimeState::Absent,
                "socket missing; runtime not installed or not running".into(),
            );
        }

        let (liveness_stalled, other_stalled): (Vec<_>, Vec<_>) = stalled
            .iter()
            .copied()
            .partition(|(op, _)| op.is_liveness());
        if !liveness_stalled.is_empty() {
            let mut all = liveness_stalled.clone();
            all.extend(other_stalled.iter().copied());
            return verdict(RuntimeState::Hung, describe(&all));
        }
        if let Some((op, failure)) = failures.first() {
            return verdict(RuntimeState::Down, format!("{}: {failure}", op.label()));
        }
        if !other_stalled.is_empty() {
            return verdict(
                RuntimeState::Wedged,
                format!("{}; liveness answers", describe(&other_stalled)),
            );
        }
        if self.operations.values().all(|t| t.last_result.is_none()) {
            return verdict(RuntimeState::Pending, "no probe finished yet".into());
        }
        let slow = self.operations.iter().find_map(|(op, t)| {
            let in_flight = t
                .in_flight
                .map(|(_, s)| now.saturating_duration_since(s))
                .filter(|age| *age > thresholds.slow_threshold);
            let last = t.last_duration.filter(|d| {
                *d > thresholds.slow_threshold && matches!(t.last_result, Some(Ok(())))
            });
            in_flight.or(last).map(|d| (op, d))
        });
        if let Some((op, d)) = slow {
            return verdict(
                RuntimeState::Slow,
                format!("{} took {:.1}s", op.label(), d.as_secs_f64()),
            );
        }
        verdict(RuntimeState::Healthy, "all probes answer".into())
    }

    pub fn operation_status(&self, now: Instant) -> Vec<OperationStatus> {
        self.operations
            .iter()
            .map(|(op, t)| OperationStatus {
                operation: op.label(),
                in_flight_seconds: self.in_flight_age(op, now).as_secs_f64(),
                stalled_seconds: t
                    .stalled_since
                    .map(|s| now.saturating_duration_since(s).as_secs_f64()),
                last_duration_seconds: t.last_duration.map(|d| d.as_secs_f64()),
                last_error: match &t.last_result {
                    Some(Err(f)) => Some(f.to_string()),
                    _ => None,
                },
                seconds_since_success: t
                    .last_success
                    .map(|s| now.saturating_duration_since(s).as_secs_f64()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> ProbeConfig {
        ProbeConfig {
            interval: Duration::from_secs(5),
            slow_threshold: Duration::from_secs(2),
            stall_threshold: Duration::from_secs(10),
            deadline: Duration::from_secs(30),
        }
    }

    fn docker(mode: RuntimeMode) -> RuntimeTracker {
        RuntimeTracker::new(
            Runtime::Docker,
            mode,
            &[Operation::Ping, Operation::ListContainers],
        )
    }

    fn ok(t: &mut RuntimeTracker, op: Operation, id: u64, at: Instant, took: Duration) {
        t.probe_started(&op, id, at);
        t.probe_finished(&op, id, at, at + took, Ok(()));
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn healthy_after_fast_answers_pending_before() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        assert_eq!(t.evaluate(t0, &thresholds()).state, RuntimeState::Pending);
        ok(&mut t, Operation::Ping, 1, t0, MS);
        ok(&mut t, Operation::ListContainers, 2, t0, MS);
        assert_eq!(
            t.evaluate(t0 + MS, &thresholds()).state,
            RuntimeState::Healthy
        );
    }

    #[test]
    fn stall_declared_from_in_flight_age_before_any_timeout() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        ok(&mut t, Operation::Ping, 1, t0, MS);
        t.probe_started(&Operation::ListContainers, 2, t0);
        let before = t.evaluate(t0 + Duration::from_millis(9_900), &thresholds());
        assert_eq!(before.state, RuntimeState::Slow);
        let after = t.evaluate(t0 + Duration::from_millis(10_100), &thresholds());
        assert_eq!(after.state, RuntimeState::Wedged, "{}", after.reason);
        assert!(after.reason.contains("list_containers"));
    }

    #[test]
    fn both_stuck_is_hung() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        ok(&mut t, Operation::Ping, 1, t0, MS);
        t.probe_started(&Operation::Ping, 3, t0 + Duration::from_secs(5));
        t.probe_started(&Operation::ListContainers, 2, t0);
        let v = t.evaluate(t0 + Duration::from_secs(16), &thresholds());
        assert_eq!(v.state, RuntimeState::Hung);
        assert!(v.state.is_stalled() && !v.state.is_up());
    }

    #[test]
    fn timeout_keeps_the_stall_until_a_success() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        ok(&mut t, Operation::Ping, 1, t0, MS);
        t.probe_started(&Operation::ListContainers, 2, t0);
        let deadline = t0 + Duration::from_secs(30);
        t.probe_finished(
            &Operation::ListContainers,
            2,
            t0,
            deadline,
            Err(ProbeFailure::Timeout),
        );
        // A fresh probe starts right away; its young age must not clear the stall.
        t.probe_started(&Operation::ListContainers, 3, deadline);
        let v = t.evaluate(deadline + Duration::from_secs(1), &thresholds());
        assert_eq!(v.state, RuntimeState::Wedged);
        t.probe_finished(
            &Operation::ListContainers,
            3,
            deadline,
            deadline + Duration::from_secs(2),
            Ok(()),
        );
        ok(&mut t, Operation::Ping, 4, deadline, MS);
        let v = t.evaluate(deadline + Duration::from_secs(3), &thresholds());
        assert_ne!(v.state, RuntimeState::Wedged);
        assert!(!v.state.is_stalled());
    }

    #[test]
    fn stale_finish_of_a_superseded_probe_is_ignored() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        t.probe_started(&Operation::Ping, 1, t0);
        t.probe_started(&Operation::Ping, 2, t0 + MS);
        t.probe_finished(&Operation::Ping, 1, t0, t0 + MS, Ok(()));
        assert_eq!(t.in_flight_age(&Operation::Ping, t0 + 3 * MS), 2 * MS);
    }

    #[test]
    fn missing_socket_absent_in_auto_until_seen_then_down() {
        let missing = Err(ProbeFailure::Unreachable(Unreachable::SocketMissing));
        let t0 = Instant::now();
        let mut t = docker(RuntimeMode::Auto);
        t.probe_started(&Operation::Ping, 1, t0);
        t.probe_finished(&Operation::Ping, 1, t0, t0, missing.clone());
        assert_eq!(t.evaluate(t0, &thresholds()).state, RuntimeState::Absent);

        ok(&mut t, Operation::Ping, 2, t0, MS);
        t.probe_started(&Operation::Ping, 3, t0);
        t.probe_finished(&Operation::Ping, 3, t0, t0, missing.clone());
        assert_eq!(t.evaluate(t0, &thresholds()).state, RuntimeState::Down);

        let mut required = docker(RuntimeMode::Required);
        required.probe_started(&Operation::Ping, 1, t0);
        required.probe_finished(&Operation::Ping, 1, t0, t0, missing);
        assert_eq!(
            required.evaluate(t0, &thresholds()).state,
            RuntimeState::Down
        );
    }

    #[test]
    fn refused_and_garbage_are_down_with_reason() {
        let t0 = Instant::now();
        let mut t = docker(RuntimeMode::Auto);
        t.probe_started(&Operation::Ping, 1, t0);
        t.probe_finished(
            &Operation::Ping,
            1,
            t0,
            t0,
            Err(ProbeFailure::Unreachable(Unreachable::Refused)),
        );
        let v = t.evaluate(t0, &thresholds());
        assert_eq!(v.state, RuntimeState::Down);
        assert!(v.reason.contains("refused"), "{}", v.reason);

        let mut t = docker(RuntimeMode::Auto);
        ok(&mut t, Operation::Ping, 1, t0, MS);
        t.probe_started(&Operation::ListContainers, 2, t0);
        t.probe_finished(
            &Operation::ListContainers,
            2,
            t0,
            t0,
            Err(ProbeFailure::Error("invalid HTTP".into())),
        );
        assert_eq!(t.evaluate(t0, &thresholds()).state, RuntimeState::Down);
    }

    #[test]
    fn slow_from_completed_duration() {
        let mut t = docker(RuntimeMode::Auto);
        let t0 = Instant::now();
        ok(&mut t, Operation::Ping, 1, t0, MS);
        ok(
            &mut t,
            Operation::ListContainers,
            2,
            t0,
            Duration::from_secs(3),
        );
        let v = t.evaluate(t0 + Duration::from_secs(3), &thresholds());
        assert_eq!(v.state, RuntimeState::Slow);
        assert!(v.state.is_up() && !v.state.is_stalled());
    }
}
