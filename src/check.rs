//! `hangwatch check`: run every probe once, feed the same engine the daemon uses, print a
//! report a human reads in five seconds.
//!
//! Exit codes: 0 healthy, 1 problem found, 2 could not check.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::actions::incident_store;
use crate::config::Config;
use crate::detectors::probe;
use crate::engine::incidents::Incident;
use crate::engine::runtime::RuntimeState;
use crate::engine::{Engine, Snapshot};
use crate::signal::{ProbeFailure, Signal, Unreachable};

/// Extra wait past the stall threshold so a call stuck right at the threshold is judged
/// stalled rather than racing it.
const STALL_MARGIN: Duration = Duration::from_millis(200);

/// Incidents shown in the report.
const RECENT_INCIDENTS: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Healthy,
    Problem,
    CouldNotCheck,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Healthy => 0,
            Outcome::Problem => 1,
            Outcome::CouldNotCheck => 2,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub outcome: Outcome,
    /// One line per problem, most severe first.
    pub problems: Vec<String>,
    /// Why some part could not be checked (e.g. no permission on a socket).
    pub unchecked: Vec<String>,
    pub snapshot: Snapshot,
    /// Incidents on disk, newest first (open ones are problems).
    pub incidents: Vec<Incident>,
}

pub async fn run(config: Config) -> CheckReport {
    let config = Arc::new(config);
    let incident_dir = config.incident_dir();
    let loaded = tokio::task::spawn_blocking(move || incident_store::load(&incident_dir))
        .await
        .unwrap_or_default();
    let (mut engine, snapshot) = Engine::new(config.clone(), None, loaded);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut outstanding = 0usize;
    let mut permission_denied = Vec::new();

    for client in probe::clients(&config) {
        for operation in client.operations() {
            let id = probe::next_probe_id();
            let started = Instant::now();
            engine.apply(Signal::ProbeStarted {
                runtime: client.runtime(),
                operation: operation.clone(),
                id,
                at: started,
            });
            let call = client.call(&operation);
            let done = done_tx.clone();
            let runtime = client.runtime();
            outstanding += 1;
            tokio::spawn(async move {
                let (result, _) = probe::split_answer(call.await);
                // The receiver is gone only when check gave up waiting: nothing to report to.
                let _ = done.send(Signal::ProbeFinished {
                    runtime,
                    operation,
                    id,
                    started,
                    finished: Instant::now(),
                    result,
                });
            });
        }
    }

    let give_up = tokio::time::Instant::now() + config.probes.stall_threshold + STALL_MARGIN;
    while outstanding > 0 {
        match tokio::time::timeout_at(give_up, done_rx.recv()).await {
            Ok(Some(signal)) => {
                if let Signal::ProbeFinished {
                    runtime,
                    result: Err(ProbeFailure::Unreachable(Unreachable::PermissionDenied)),
                    ..
                } = &signal
                {
                    permission_denied.push(format!(
                        "{runtime}: permission denied on its socket (run as root?)"
                    ));
                }
                engine.apply(signal);
                outstanding -= 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    engine.evaluate(Instant::now());
    let snapshot = snapshot.borrow().as_ref().clone();
    report(snapshot, permission_denied)
}

fn report(snapshot: Snapshot, mut unchecked: Vec<String>) -> CheckReport {
    unchecked.sort();
    unchecked.dedup();
    let mut problems: Vec<(RuntimeState, String)> = snapshot
        .runtimes
        .iter()
        .filter(|r| r.state.is_problem())
        .map(|r| {
            (
                r.state,
                format!("{} is {}: {}", r.runtime, r.state.as_str(), r.reason),
            )
        })
        .collect();
    problems.sort_by_key(|(state, _)| std::cmp::Reverse(severity(*state)));
    let incidents: Vec<Incident> = snapshot
        .incidents
        .iter()
        .take(RECENT_INCIDENTS)
        .cloned()
        .collect();
    let outcome = if !unchecked.is_empty() {
        Outcome::CouldNotCheck
    } else if problems.is_empty() {
        Outcome::Healthy
    } else {
        Outcome::Problem
    };
    CheckReport {
        outcome,
        problems: problems.into_iter().map(|(_, p)| p).collect(),
        unchecked,
        snapshot,
        incidents,
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

impl CheckReport {
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let headline = match self.outcome {
            Outcome::Healthy => "OK",
            Outcome::Problem => "PROBLEM",
            Outcome::CouldNotCheck => "COULD NOT CHECK",
        };
        let _ = writeln!(out, "hangwatch check on {}: {headline}", self.snapshot.node);
        for problem in &self.problems {
            let _ = writeln!(out, "  ! {problem}");
        }
        for reason in &self.unchecked {
            let _ = writeln!(out, "  ? {reason}");
        }
        let _ = writeln!(out, "\nRuntimes");
        if self.snapshot.runtimes.is_empty() {
            let _ = writeln!(out, "  (none enabled)");
        }
        for r in &self.snapshot.runtimes {
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
        if !self.incidents.is_empty() {
            let _ = writeln!(out, "\nRecent incidents");
            let now = std::time::SystemTime::now();
            for incident in &self.incidents {
                let _ = writeln!(out, "  {}", incident.summary(now));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RuntimeStatus;
    use crate::signal::Runtime;

    fn status(runtime: Runtime, state: RuntimeState) -> RuntimeStatus {
        RuntimeStatus {
            runtime,
            state,
            reason: "because".into(),
            up: state.is_up(),
            stalled: state.is_stalled(),
            state_seconds: 0.0,
            operations: Vec::new(),
        }
    }

    fn snapshot(runtimes: Vec<RuntimeStatus>) -> Snapshot {
        Snapshot {
            node: "n".into(),
            generated_at: std::time::SystemTime::now(),
            runtimes,
            incidents: Arc::default(),
        }
    }

    #[test]
    fn outcome_and_ordering() {
        let healthy = report(
            snapshot(vec![
                status(Runtime::Docker, RuntimeState::Healthy),
                status(Runtime::Containerd, RuntimeState::Absent),
            ]),
            vec![],
        );
        assert_eq!(healthy.outcome, Outcome::Healthy);
        assert_eq!(healthy.outcome.exit_code(), 0);

        let problem = report(
            snapshot(vec![
                status(Runtime::Docker, RuntimeState::Slow),
                status(Runtime::Containerd, RuntimeState::Hung),
            ]),
            vec![],
        );
        assert_eq!(problem.outcome.exit_code(), 1);
        assert!(problem.problems[0].starts_with("containerd is hung"));
        assert!(problem.render_text().contains("PROBLEM"));

        let unchecked = report(
            snapshot(vec![status(Runtime::Docker, RuntimeState::Down)]),
            vec!["docker: permission denied".into()],
        );
        assert_eq!(unchecked.outcome.exit_code(), 2);
    }
}
