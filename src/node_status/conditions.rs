//! What the detectors think of each condition hangwatch owns, derived from the engine's
//! published snapshot. Pure: a snapshot in, an opinion per condition out.
//!
//! The reasons are matches over the typed runtime, state and process kind, with no
//! catch-all for a runtime or a kind: a new `Runtime` or `RuntimeKind` variant does not
//! compile until it is given its reason.

use crate::domain::{Runtime, RuntimeKind, Scope};
use crate::engine::Snapshot;
use crate::engine::incidents::Evidence;
use crate::sources::lifecycle::StopsSection;
use crate::sources::procscan::ProcScanSection;
use crate::sources::runtime::RuntimesSection;
use crate::sources::runtime::verdict::RuntimeState;

/// The conditions hangwatch can own, in the order they are configured and patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionKind {
    RuntimeUnhealthy,
    TasksStuck,
    StopStuck,
}

impl ConditionKind {
    pub const ALL: [ConditionKind; 3] = [
        ConditionKind::RuntimeUnhealthy,
        ConditionKind::TasksStuck,
        ConditionKind::StopStuck,
    ];
}

/// The detectors' view of one condition: the problem holds or not, why, in one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opinion {
    pub problem: bool,
    /// CamelCase, as the API's `reason` must be.
    pub reason: String,
    pub message: String,
}

impl Opinion {
    fn problem(reason: &str, message: String) -> Opinion {
        Opinion {
            problem: true,
            reason: reason.into(),
            message,
        }
    }

    fn healthy(reason: &str, message: &str) -> Opinion {
        Opinion {
            problem: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The reason of a runtime in a problem state; None for the states that are not one.
/// Down counts: kubelet cannot use a runtime that refuses its socket either.
pub fn runtime_reason(runtime: Runtime, state: RuntimeState) -> Option<&'static str> {
    use RuntimeState::*;
    match (runtime, state) {
        (_, Pending | Healthy | Slow | Absent) => None,
        (Runtime::Docker, Hung) => Some("DockerdHung"),
        (Runtime::Docker, Wedged) => Some("DockerdWedged"),
        (Runtime::Docker, Down) => Some("DockerdDown"),
        (Runtime::Containerd, Hung) => Some("ContainerdHung"),
        (Runtime::Containerd, Wedged) => Some("ContainerdWedged"),
        (Runtime::Containerd, Down) => Some("ContainerdDown"),
        // The CRI socket stuck while the daemon's own API answers (containerd#10583): the
        // message names the call and the pod it is blocked behind.
        (Runtime::Cri, Wedged) => Some("CRIWedged"),
        (Runtime::Cri, Hung) => Some("CRIRuntimeHung"),
        (Runtime::Cri, Down) => Some("CRIRuntimeDown"),
    }
}

/// Lower layers first: when several runtimes are stuck, the lowest one is the cause.
fn layer_rank(runtime: Runtime) -> u8 {
    match runtime {
        Runtime::Containerd => 0,
        Runtime::Cri => 1,
        Runtime::Docker => 2,
    }
}

fn state_rank(state: RuntimeState) -> u8 {
    match state {
        RuntimeState::Hung => 0,
        RuntimeState::Wedged => 1,
        RuntimeState::Down => 2,
        RuntimeState::Pending
        | RuntimeState::Healthy
        | RuntimeState::Slow
        | RuntimeState::Absent => 3,
    }
}

/// The reason of a stuck runtime process.
fn process_reason(kind: RuntimeKind, blocked_on_fifo: bool) -> &'static str {
    match (kind, blocked_on_fifo) {
        (RuntimeKind::Runc, true) => "RuncExecFifoHang",
        (RuntimeKind::Runc, false) => "RuncStuck",
        (RuntimeKind::RuncInit, _) => "RuncInitWaiting",
        (RuntimeKind::Shim, _) => "ShimTaskInD",
    }
}

/// The opinion on `kind`, or None while the detectors have none (no verdict yet, no scan
/// yet): the condition then keeps what it was (read back from the node at start).
/// `scans_settled`: the /proc scanner has run long enough (`proc_scan.stuck_after`) for a
/// task stuck since before hangwatch started to be called stuck again.
pub fn opinion(kind: ConditionKind, snapshot: &Snapshot, scans_settled: bool) -> Option<Opinion> {
    match kind {
        ConditionKind::RuntimeUnhealthy => runtime_opinion(snapshot),
        ConditionKind::TasksStuck => scans_settled.then(|| tasks_opinion(snapshot)).flatten(),
        ConditionKind::StopStuck => stops_opinion(snapshot),
    }
}

fn runtime_opinion(snapshot: &Snapshot) -> Option<Opinion> {
    let runtimes = snapshot.section::<RuntimesSection>()?;
    let worst = runtimes
        .0
        .iter()
        .filter(|r| !r.permission_denied)
        .filter_map(|r| runtime_reason(r.runtime, r.state).map(|reason| (r, reason)))
        .min_by_key(|(r, _)| (layer_rank(r.runtime), state_rank(r.state)));
    let Some((status, reason)) = worst else {
        if runtimes.0.iter().any(|r| r.state == RuntimeState::Pending) {
            return None;
        }
        return Some(Opinion::healthy(
            "ContainerRuntimeHealthy",
            "every container runtime answers",
        ));
    };
    // The open incident's suspected cause is the one-line explanation; its evidence names
    // the runc fifo hang when that is what holds the runtime.
    let incident = snapshot
        .incidents
        .iter()
        .find(|i| i.ended_at.is_none() && i.runtime == status.runtime);
    let fifo_hang = incident.is_some_and(|i| {
        i.evidence.iter().any(|e| {
            matches!(e, Evidence::StuckRuntimeProcess { kind, fifo, .. }
                if process_reason(*kind, fifo.is_some()) == "RuncExecFifoHang")
        })
    });
    let message = match incident {
        Some(i) => i.suspected_cause.clone(),
        None => format!(
            "{} is {}: {}",
            status.runtime.daemon_name(),
            status.state.as_str(),
            status.reason
        ),
    };
    let reason = if fifo_hang {
        "RuncExecFifoHang"
    } else {
        reason
    };
    Some(Opinion::problem(reason, message))
}

fn tasks_opinion(snapshot: &Snapshot) -> Option<Opinion> {
    let scan = &snapshot.section::<ProcScanSection>()?.0.report;
    if let Some(process) = scan.runtime_processes.first() {
        let reason = process_reason(process.kind, process.exec_fifo.is_some());
        let on = process
            .exec_fifo
            .as_ref()
            .map(|f| format!(" blocked on {}", f.path))
            .unwrap_or_default();
        let more = scan.runtime_processes.len() - 1;
        let more = if more > 0 {
            format!(" (and {more} more)")
        } else {
            String::new()
        };
        // No ages in messages: a message that changed every scan would be a PATCH every scan.
        return Some(Opinion::problem(
            reason,
            format!("{} pid {}{on}{more}", process.comm, process.pid),
        ));
    }
    let stuck: Vec<_> = scan
        .stuck_tasks
        .iter()
        .filter(|t| t.scope == Scope::Runtime)
        .collect();
    if let Some(first) = stuck.first() {
        let wchan = first.wchan.as_deref().unwrap_or("?");
        return Some(Opinion::problem(
            "RuntimeTasksInD",
            format!(
                "{} runtime task(s) in D; {} pid {} in {wchan}",
                stuck.len(),
                first.comm,
                first.tid
            ),
        ));
    }
    Some(Opinion::healthy(
        "NoRuntimeTasksStuck",
        "no runtime task is stuck in D",
    ))
}

fn stops_opinion(snapshot: &Snapshot) -> Option<Opinion> {
    let stops = &snapshot.section::<StopsSection>()?.0;
    if !stops.enabled {
        return None;
    }
    let stuck: Vec<_> = stops.in_progress.iter().filter(|s| s.stuck).collect();
    let Some(first) = stuck.first() else {
        return Some(Opinion::healthy(
            "NoContainerStopStuck",
            "no container stop is stuck",
        ));
    };
    let held = first.held_by.as_ref();
    let reason = match held {
        // Frozen tasks are listed too when they hold a SIGKILL pending.
        Some(h) if h.stuck_tasks.iter().any(|t| !t.frozen) => "StopHeldByTaskInD",
        Some(h) if h.frozen_tasks > 0 => "StopHeldByFrozenTasks",
        _ => "StopWithoutExit",
    };
    let name = first
        .container
        .name
        .as_deref()
        .unwrap_or(&first.container.id);
    let pod = match (&first.container.namespace, &first.container.pod) {
        (Some(ns), Some(pod)) => format!(" (pod {ns}/{pod})"),
        _ => String::new(),
    };
    let why = held
        .and_then(|h| h.describe())
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    let more = if stuck.len() > 1 {
        format!(" (and {} more)", stuck.len() - 1)
    } else {
        String::new()
    };
    Some(Opinion::problem(
        reason,
        format!("stop of container {name}{pod} has no exit{why}{more}"),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::sources::Section;
    use crate::sources::runtime::RuntimeStatus;

    fn snapshot(runtimes: &[(Runtime, RuntimeState)]) -> Snapshot {
        let statuses = runtimes
            .iter()
            .map(|(runtime, state)| RuntimeStatus {
                runtime: *runtime,
                state: *state,
                reason: format!("{} is {}", runtime.daemon_name(), state.as_str()),
                up: state.is_up(),
                stalled: state.is_stalled(),
                state_seconds: 3.0,
                operations: Vec::new(),
                permission_denied: false,
                status_call_in_flight: None,
                last_status_call: None,
                kubelet: None,
                unknown_tasks: Vec::new(),
            })
            .collect();
        Snapshot {
            node: "n1".into(),
            generated_at: SystemTime::UNIX_EPOCH,
            sections: vec![Arc::new(RuntimesSection(statuses)) as Arc<dyn Section>],
            incidents: Arc::new(Vec::new()),
        }
    }

    #[test]
    fn no_opinion_until_every_runtime_has_a_verdict_unless_one_is_already_stuck() {
        use Runtime::{Containerd, Docker};
        use RuntimeState::{Healthy, Hung, Pending, Wedged};
        let kind = ConditionKind::RuntimeUnhealthy;
        let empty = Snapshot {
            sections: Vec::new(),
            ..snapshot(&[])
        };
        assert_eq!(opinion(kind, &empty, true), None, "no section yet");
        assert_eq!(
            opinion(
                kind,
                &snapshot(&[(Docker, Pending), (Containerd, Healthy)]),
                true
            ),
            None
        );
        let healthy = opinion(
            kind,
            &snapshot(&[(Docker, Healthy), (Containerd, Healthy)]),
            true,
        )
        .expect("opinion");
        assert!(!healthy.problem);
        let hung = opinion(
            kind,
            &snapshot(&[(Docker, Hung), (Containerd, Pending)]),
            true,
        )
        .expect("opinion");
        assert_eq!((hung.problem, hung.reason.as_str()), (true, "DockerdHung"));
        assert_eq!(hung.message, "dockerd is hung: dockerd is hung");
        let both = opinion(
            kind,
            &snapshot(&[(Docker, Hung), (Containerd, Wedged)]),
            true,
        )
        .expect("opinion");
        assert_eq!(
            both.reason, "ContainerdWedged",
            "the lower layer is the cause"
        );
        assert_eq!(
            opinion(ConditionKind::TasksStuck, &snapshot(&[]), false),
            None,
            "the /proc scan has not settled"
        );
    }

    #[test]
    fn every_problem_state_has_a_camel_case_reason_and_no_other_state_has_one() {
        for runtime in Runtime::ALL {
            for state in [
                RuntimeState::Pending,
                RuntimeState::Healthy,
                RuntimeState::Slow,
                RuntimeState::Wedged,
                RuntimeState::Hung,
                RuntimeState::Down,
                RuntimeState::Absent,
            ] {
                let reason = runtime_reason(runtime, state);
                let problem = matches!(
                    state,
                    RuntimeState::Wedged | RuntimeState::Hung | RuntimeState::Down
                );
                assert_eq!(reason.is_some(), problem, "{runtime} {state:?}");
                if let Some(reason) = reason {
                    assert!(reason.starts_with(|c: char| c.is_ascii_uppercase()));
                    assert!(
                        reason.bytes().all(|b| b.is_ascii_alphanumeric()),
                        "{reason}"
                    );
                }
            }
        }
        assert_eq!(
            runtime_reason(Runtime::Docker, RuntimeState::Hung),
            Some("DockerdHung")
        );
        assert_eq!(
            runtime_reason(Runtime::Containerd, RuntimeState::Wedged),
            Some("ContainerdWedged")
        );
        assert_eq!(process_reason(RuntimeKind::Runc, true), "RuncExecFifoHang");
    }

    #[test]
    fn the_lowest_stuck_layer_is_the_cause() {
        assert!(layer_rank(Runtime::Containerd) < layer_rank(Runtime::Docker));
        assert!(state_rank(RuntimeState::Hung) < state_rank(RuntimeState::Down));
    }

    #[test]
    fn a_wedged_cri_layer_is_its_own_reason_and_a_hung_containerd_beneath_it_wins() {
        use Runtime::{Containerd, Cri};
        use RuntimeState::{Healthy, Hung, Wedged};
        let kind = ConditionKind::RuntimeUnhealthy;
        let wedged = opinion(
            kind,
            &snapshot(&[(Containerd, Healthy), (Cri, Wedged)]),
            true,
        )
        .expect("an opinion");
        assert!(wedged.problem);
        assert_eq!(wedged.reason, "CRIWedged");
        let hung =
            opinion(kind, &snapshot(&[(Containerd, Hung), (Cri, Hung)]), true).expect("an opinion");
        assert_eq!(hung.reason, "ContainerdHung");
    }
}
