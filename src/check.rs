//! `hangwatch check`: run every source's one-shot form once, feed the same engine the daemon
//! uses, print a report a human reads in five seconds. The sources are the daemon's: both
//! build from [`sources::registered`].
//!
//! Exit codes: 0 healthy, 1 problem found, 2 could not check.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::actions::incident_store;
use crate::config::Config;
use crate::engine::incidents::Incident;
use crate::engine::{Engine, Snapshot};
use crate::sources::{self, Now, Source, procscan};

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

#[derive(Debug, Clone)]
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

/// The outcome and lines, the snapshot, the incidents, then each section that is not in the
/// snapshot's `/status` form (container stops) under its own key.
impl Serialize for CheckReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("outcome", &self.outcome)?;
        map.serialize_entry("problems", &self.problems)?;
        map.serialize_entry("unchecked", &self.unchecked)?;
        map.serialize_entry("snapshot", &self.snapshot)?;
        map.serialize_entry("incidents", &self.incidents)?;
        for section in self.snapshot.sections.iter().filter(|s| !s.in_status()) {
            map.serialize_entry(section.key(), &section.to_json())?;
        }
        map.end()
    }
}

pub async fn run(config: Config) -> CheckReport {
    run_sources(config, &sources::registered()).await
}

/// `check` over `sources`: every one-shot form at once, their findings applied in
/// registration order, then one evaluation.
pub async fn run_sources(mut config: Config, sources: &[Box<dyn Source>]) -> CheckReport {
    // A one-shot check lists tasks in D in both of two scans a second apart.
    config.proc_scan.stuck_after = procscan::CHECK_DSTATE_WINDOW;
    let config = Arc::new(config);
    let incident_dir = config.incident_dir();
    let loaded =
        match tokio::task::spawn_blocking(move || incident_store::load(&incident_dir)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "loading incidents failed; reporting none");
                Vec::new()
            }
        };
    let (mut engine, snapshot) = Engine::new(config.clone(), sources, None, loaded, Now::read());
    let runs: Vec<_> = sources
        .iter()
        .filter_map(|source| source.check(&config))
        .map(tokio::spawn)
        .collect();
    let mut unchecked = Vec::new();
    for run in runs {
        match run.await {
            Ok(found) => {
                for signal in found.signals {
                    engine.apply(signal, Now::read());
                }
                unchecked.extend(found.unchecked);
            }
            Err(e) => unchecked.push(format!("a check failed: {e}")),
        }
    }
    engine.evaluate(Now::read());
    let snapshot = snapshot.borrow().as_ref().clone();
    report(snapshot, unchecked)
}

fn report(snapshot: Snapshot, mut unchecked: Vec<String>) -> CheckReport {
    let now = snapshot.generated_at;
    unchecked.extend(snapshot.sections.iter().flat_map(|s| s.unchecked()));
    unchecked.sort();
    unchecked.dedup();
    let problems: Vec<String> = snapshot
        .sections
        .iter()
        .flat_map(|s| s.problems(now))
        .collect();
    let incidents: Vec<Incident> = snapshot
        .incidents
        .iter()
        .take(RECENT_INCIDENTS)
        .cloned()
        .collect();
    // A problem found is reported as such even when something else could not be checked.
    let outcome = if !problems.is_empty() {
        Outcome::Problem
    } else if !unchecked.is_empty() {
        Outcome::CouldNotCheck
    } else {
        Outcome::Healthy
    };
    CheckReport {
        outcome,
        problems,
        unchecked,
        snapshot,
        incidents,
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
        let now = self.snapshot.generated_at;
        for section in &self.snapshot.sections {
            section.render_check(&mut out, now);
        }
        if !self.incidents.is_empty() {
            let _ = writeln!(out, "\nRecent incidents");
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
    use crate::domain::Runtime;
    use crate::sources::runtime::verdict::RuntimeState;
    use crate::sources::runtime::{RuntimeStatus, RuntimesSection};

    fn status(runtime: Runtime, state: RuntimeState) -> RuntimeStatus {
        RuntimeStatus {
            runtime,
            state,
            reason: "because".into(),
            up: state.is_up(),
            stalled: state.is_stalled(),
            state_seconds: 0.0,
            operations: Vec::new(),
            permission_denied: false,
            status_call_in_flight: None,
            last_status_call: None,
            kubelet: None,
            unknown_tasks: Vec::new(),
        }
    }

    fn snapshot(runtimes: Vec<RuntimeStatus>) -> Snapshot {
        Snapshot {
            node: "n".into(),
            generated_at: std::time::SystemTime::now(),
            sections: vec![Arc::new(RuntimesSection(runtimes))],
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
            snapshot(vec![status(Runtime::Docker, RuntimeState::Absent)]),
            vec!["kernel log: permission denied".into()],
        );
        assert_eq!(unchecked.outcome.exit_code(), 2);

        let problem_wins = report(
            snapshot(vec![status(Runtime::Docker, RuntimeState::Hung)]),
            vec!["kernel log: permission denied".into()],
        );
        assert_eq!(problem_wins.outcome.exit_code(), 1);

        let mut refused = status(Runtime::Docker, RuntimeState::Down);
        refused.permission_denied = true;
        let denied = report(snapshot(vec![refused]), vec![]);
        assert_eq!(
            denied.outcome.exit_code(),
            2,
            "a socket we may not open is not checked"
        );
    }
}
