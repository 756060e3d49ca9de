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
use crate::config::RuntimeMode;
use crate::config::Severity;
use crate::detectors::kernel::{self as kernel_log, LogSource};
use crate::detectors::lifecycle;
use crate::detectors::probe;
use crate::detectors::procscan::{ProcScanner, ScanReport, Scope};
use crate::engine::incidents::Incident;
use crate::engine::lifecycle::StopsView;
use crate::engine::runtime::RuntimeState;
use crate::engine::stops::{HeldBy, SIGKILL};
use crate::engine::{Engine, Snapshot};
use crate::signal::{ProbeFailure, Runtime, Signal, Unreachable};

/// Extra wait past the stall threshold so a call stuck right at the threshold is judged
/// stalled rather than racing it.
const STALL_MARGIN: Duration = Duration::from_millis(200);

/// How long a task must stay in D to be listed by `check`.
const CHECK_DSTATE_WINDOW: Duration = Duration::from_secs(1);

/// Incidents, kernel events and container stops shown in the report.
const RECENT_INCIDENTS: usize = 5;
const RECENT_KERNEL_EVENTS: usize = 10;
const RECENT_STOPS: usize = 10;

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
    /// Container stops of the last 10 minutes that dockerd still buffers.
    pub stops: StopsView,
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
    let mut unchecked = Vec::new();
    let mut denied: Vec<Runtime> = Vec::new();

    for client in probe::clients(&config) {
        for operation in client.operations() {
            let (started, finish) =
                probe::start(client.as_ref(), &operation, config.probes.deadline);
            engine.apply(started);
            let done = done_tx.clone();
            outstanding += 1;
            tokio::spawn(async move {
                let (finished, _) = finish.await;
                // The receiver is gone only when check gave up waiting: nothing to report to.
                let _ = done.send(finished);
            });
        }
    }

    let kernel = if config.kernel_log.enabled {
        let kernel_config = config.clone();
        Some(tokio::task::spawn_blocking(move || {
            kernel_log::check(&kernel_config)
        }))
    } else {
        None
    };

    let lifecycle_events = (config.lifecycle.enabled
        && config.docker.mode != RuntimeMode::Disabled
        && config.docker.socket.exists())
    .then(|| {
        tokio::spawn(lifecycle::check(
            config.docker.socket.clone(),
            config.probes.stall_threshold + STALL_MARGIN,
        ))
    });

    let scan = config.proc_scan.enabled.then(|| {
        let scan_config = config.clone();
        tokio::task::spawn_blocking(move || scan_twice(&scan_config))
    });

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
                    denied.push(*runtime);
                }
                engine.apply(signal);
                outstanding -= 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Some(kernel) = kernel {
        match kernel.await {
            Ok(Ok(found)) => {
                engine.apply(Signal::KernelLogUp {
                    path: config.kernel_log.path.clone(),
                    source: found.source,
                });
                engine.apply(Signal::KernelLogCounters(found.counters));
                for event in found.events {
                    engine.apply(Signal::Kernel(Box::new(event)));
                }
            }
            Ok(Err(e)) => unchecked.push(format!(
                "kernel log {}: {e}",
                config.kernel_log.path.display()
            )),
            Err(e) => unchecked.push(format!("kernel log: {e}")),
        }
    }
    if let Some(events) = lifecycle_events {
        // A failure shows in the stops section; the docker probe already judges the runtime.
        let read = events
            .await
            .unwrap_or_else(|e| Err(format!("reading events failed: {e}")));
        match read {
            Ok(found) => {
                engine.apply(Signal::EventStreamUp {
                    runtime: Runtime::Docker,
                    reconnected: false,
                });
                for event in found.events {
                    engine.apply(Signal::ContainerEvent(Box::new(event)));
                }
                for reason in found.malformed {
                    engine.apply(Signal::EventMalformed {
                        runtime: Runtime::Docker,
                        reason,
                    });
                }
            }
            Err(error) => engine.apply(Signal::EventStreamDown {
                runtime: Runtime::Docker,
                error,
                retry_in: Duration::ZERO,
            }),
        }
    }
    if let Some(scan) = scan {
        match scan.await {
            Ok(report) => engine.apply(Signal::ProcScan(Box::new(report))),
            Err(e) => unchecked.push(format!("/proc scan: {e}")),
        }
    }
    engine.evaluate(Instant::now());
    let snapshot = snapshot.borrow().as_ref().clone();
    report(snapshot, &denied, unchecked)
}

/// Two scans `CHECK_DSTATE_WINDOW` apart: tasks in D in both are reported (a one-shot check
/// cannot know how long before that they went in).
fn scan_twice(config: &Config) -> ScanReport {
    let mut config = config.clone();
    config.proc_scan.stuck_after = CHECK_DSTATE_WINDOW;
    let mut scanner = ProcScanner::new(&config);
    scanner.scan();
    std::thread::sleep(CHECK_DSTATE_WINDOW);
    scanner.scan()
}

/// `denied`: runtimes whose socket hangwatch may not open: not checked, so not a problem.
fn report(snapshot: Snapshot, denied: &[Runtime], mut unchecked: Vec<String>) -> CheckReport {
    unchecked.extend(
        denied
            .iter()
            .map(|runtime| format!("{runtime}: permission denied on its socket (run as root?)")),
    );
    unchecked.sort();
    unchecked.dedup();
    let mut problems: Vec<(RuntimeState, String)> = snapshot
        .runtimes
        .iter()
        .filter(|r| r.state.is_problem() && !denied.contains(&r.runtime))
        .map(|r| {
            (
                r.state,
                format!("{} is {}: {}", r.runtime, r.state.as_str(), r.reason),
            )
        })
        .collect();
    problems.sort_by_key(|(state, _)| std::cmp::Reverse(severity(*state)));
    let mut problems: Vec<String> = problems.into_iter().map(|(_, p)| p).collect();
    problems.extend(kernel_problems(&snapshot));
    problems.extend(proc_problems(&snapshot));
    problems.extend(stop_problems(&snapshot.stops));
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
    let stops = snapshot.stops.as_ref().clone();
    CheckReport {
        outcome,
        problems,
        unchecked,
        snapshot,
        incidents,
        stops,
    }
}

/// Stuck container stops.
fn stop_problems(stops: &StopsView) -> Vec<String> {
    stops
        .in_progress
        .iter()
        .filter(|s| s.stuck)
        .map(|s| {
            let name = s.container.name.as_deref().unwrap_or(&s.container.id);
            let image = s.container.image.as_deref().unwrap_or("?");
            let sigkill = if s.signals.contains(&SIGKILL) {
                ", SIGKILL sent"
            } else {
                ""
            };
            let held = s
                .held_by
                .as_ref()
                .and_then(HeldBy::describe)
                .map(|h| format!(": held by {h}"))
                .unwrap_or_default();
            format!(
                "stop of container {name} (image {image}) stuck for {:.0}s{sigkill}{held}",
                s.seconds
            )
        })
        .collect()
}

/// Kernel events that make a node unhealthy: critical rules, OOM kills of runc or of the
/// runtime itself, and conditions that still hold. A container's own OOM kill is routine.
fn kernel_problems(snapshot: &Snapshot) -> Vec<String> {
    let kernel = &snapshot.kernel_log;
    let mut problems: Vec<String> = kernel
        .conditions
        .iter()
        .map(|c| {
            format!(
                "kernel: {} holds for {:.0}s: {}",
                c.rule, c.since_seconds, c.message
            )
        })
        .collect();
    let now = std::time::SystemTime::now();
    for recent in &kernel.events {
        let event = &recent.event;
        let serious_oom = matches!(event.victim_label(), Some("runc_init" | "runtime"));
        if event.severity == Severity::Critical || serious_oom {
            let ago = now.duration_since(recent.at).unwrap_or_default().as_secs();
            problems.push(format!(
                "kernel: {} {ago}s ago: {}",
                event.rule, event.message
            ));
        }
    }
    problems
}

/// Stuck runtime processes (the runc fifo hang and its mirror) and runtime tasks in D.
fn proc_problems(snapshot: &Snapshot) -> Vec<String> {
    let Some(scan) = &snapshot.proc_scan else {
        return Vec::new();
    };
    let report = &scan.report;
    let mut problems: Vec<String> = report
        .runtime_processes
        .iter()
        .map(|p| {
            let fifo = p
                .exec_fifo
                .as_ref()
                .map(|f| format!(" on {}", f.path))
                .unwrap_or_default();
            format!(
                "{} pid {} stuck{fifo}, alive {:.0}s ({})",
                p.comm,
                p.pid,
                p.age_seconds,
                p.kind.as_str()
            )
        })
        .collect();
    problems.extend(
        report
            .stuck_tasks
            .iter()
            .filter(|t| t.scope == Scope::Runtime)
            .map(|t| {
                let wchan = t.wchan.as_deref().unwrap_or("?");
                format!(
                    "runtime task {} pid {} tid {} in D ({wchan})",
                    t.comm, t.pid, t.tid
                )
            }),
    );
    problems
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
        let kernel = &self.snapshot.kernel_log;
        let _ = writeln!(out, "\nKernel log");
        match (kernel.up, &kernel.error) {
            (Some(false), Some(error)) => {
                let _ = writeln!(out, "  unreadable: {error}");
            }
            (None, _) => {
                let _ = writeln!(out, "  not checked");
            }
            _ => {
                let source = match kernel.source {
                    Some(LogSource::Syslog) => "syslog(2): ",
                    Some(LogSource::Kmsg) => "/dev/kmsg: ",
                    None => "",
                };
                let _ = writeln!(
                    out,
                    "  {source}{} records read, {} lost, {} ignored (not kern), {} events",
                    kernel.records_read,
                    kernel.records_lost,
                    kernel.records_ignored,
                    kernel.events.len()
                );
            }
        }
        let now = std::time::SystemTime::now();
        for recent in kernel.events.iter().take(RECENT_KERNEL_EVENTS) {
            let ago = now.duration_since(recent.at).unwrap_or_default().as_secs();
            let event = &recent.event;
            let who = event
                .container_name
                .as_deref()
                .or(event.owner.as_ref().and_then(|o| o.container_id.as_deref()))
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {ago:>5}s ago  {:<14} {}{who}",
                event.rule, event.message
            );
        }
        if let Some(scan) = &self.snapshot.proc_scan {
            let report = &scan.report;
            let _ = writeln!(
                out,
                "\n/proc\n  {} tasks scanned in {:.0} ms; {} in D for {}s or more, {} frozen (paused)",
                report.tasks_scanned,
                report.duration_seconds * 1000.0,
                report.stuck_tasks.len(),
                CHECK_DSTATE_WINDOW.as_secs(),
                report.frozen.tasks
            );
            for task in report.stuck_tasks.iter().take(RECENT_KERNEL_EVENTS) {
                let whose = match task.owner.container_id.as_deref() {
                    Some(id) => format!("container {}", scan.container_label(id)),
                    None => task.scope.as_str().to_string(),
                };
                let _ = writeln!(
                    out,
                    "  D  {:<16} pid {:<7} tid {:<7} {:<22} {whose}",
                    task.comm,
                    task.pid,
                    task.tid,
                    task.wchan.as_deref().unwrap_or("?")
                );
            }
            for process in &report.runtime_processes {
                let _ = writeln!(
                    out,
                    "  stuck {:<10} {} pid {} alive {:.0}s",
                    process.kind.as_str(),
                    process.comm,
                    process.pid,
                    process.age_seconds
                );
            }
        }
        self.render_stops(&mut out);
        if !self.incidents.is_empty() {
            let _ = writeln!(out, "\nRecent incidents");
            let now = std::time::SystemTime::now();
            for incident in &self.incidents {
                let _ = writeln!(out, "  {}", incident.summary(now));
            }
        }
        out
    }

    /// Stops in progress and recent ones, and the images that ignored their stop signal.
    fn render_stops(&self, out: &mut String) {
        let stops = &self.stops;
        if !stops.enabled {
            return;
        }
        let _ = writeln!(
            out,
            "\nContainer stops (last {} min)",
            lifecycle::CHECK_LOOKBACK.as_secs() / 60
        );
        let stream = &stops.events_stream;
        if !stream.healthy {
            let _ = writeln!(out, "  events not trustworthy: {}", stream.reason);
        }
        for stop in &stops.in_progress {
            let name = stop.container.name.as_deref().unwrap_or(&stop.container.id);
            let state = if stop.stuck { "STUCK" } else { "stopping" };
            let _ = writeln!(
                out,
                "  {state:<9} {:>6.1}s  {name:<24} {}  signals {:?}",
                stop.seconds,
                stop.container.image.as_deref().unwrap_or("?"),
                stop.signals
            );
        }
        if stops.recent.is_empty() && stops.in_progress.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for stop in stops.recent.iter().take(RECENT_STOPS) {
            let name = stop.container.name.as_deref().unwrap_or(&stop.container.id);
            let how = if stop.escalated {
                "SIGKILL (ignored its stop signal)"
            } else {
                "exited on its stop signal"
            };
            let _ = writeln!(
                out,
                "  stopped   {:>6.1}s  {name:<24} {}  {how}",
                stop.duration_seconds,
                stop.container.image.as_deref().unwrap_or("?")
            );
        }
        let mut ignoring: Vec<(&str, usize)> = Vec::new();
        for stop in stops.recent.iter().filter(|s| s.escalated) {
            let image = stop.container.image.as_deref().unwrap_or("?");
            match ignoring.iter_mut().find(|(i, _)| *i == image) {
                Some((_, n)) => *n += 1,
                None => ignoring.push((image, 1)),
            }
        }
        if !ignoring.is_empty() {
            let list: Vec<String> = ignoring
                .iter()
                .map(|(image, n)| format!("{image} ({n})"))
                .collect();
            let _ = writeln!(
                out,
                "  images whose containers ignored their stop signal: {}",
                list.join(", ")
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::RuntimeStatus;

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
            kernel_log: Arc::default(),
            proc_scan: None,
            incidents: Arc::default(),
            stops: Arc::default(),
        }
    }

    #[test]
    fn outcome_and_ordering() {
        let healthy = report(
            snapshot(vec![
                status(Runtime::Docker, RuntimeState::Healthy),
                status(Runtime::Containerd, RuntimeState::Absent),
            ]),
            &[],
            vec![],
        );
        assert_eq!(healthy.outcome, Outcome::Healthy);
        assert_eq!(healthy.outcome.exit_code(), 0);

        let problem = report(
            snapshot(vec![
                status(Runtime::Docker, RuntimeState::Slow),
                status(Runtime::Containerd, RuntimeState::Hung),
            ]),
            &[],
            vec![],
        );
        assert_eq!(problem.outcome.exit_code(), 1);
        assert!(problem.problems[0].starts_with("containerd is hung"));
        assert!(problem.render_text().contains("PROBLEM"));

        let unchecked = report(
            snapshot(vec![status(Runtime::Docker, RuntimeState::Absent)]),
            &[],
            vec!["kernel log: permission denied".into()],
        );
        assert_eq!(unchecked.outcome.exit_code(), 2);

        let problem_wins = report(
            snapshot(vec![status(Runtime::Docker, RuntimeState::Hung)]),
            &[],
            vec!["kernel log: permission denied".into()],
        );
        assert_eq!(problem_wins.outcome.exit_code(), 1);

        let denied = report(
            snapshot(vec![status(Runtime::Docker, RuntimeState::Down)]),
            &[Runtime::Docker],
            vec![],
        );
        assert_eq!(
            denied.outcome.exit_code(),
            2,
            "a socket we may not open is not checked"
        );
    }
}
