//! Pure exit tracking from containerd's events: each container exit classified by its status
//! (and by an OOM kill reported before it), duplicates dropped, the latest kept for `/stops`,
//! and the exit time of each container remembered so a /proc scan taken before it cannot
//! begin a stop for a container that is gone.

use std::collections::{HashMap, VecDeque};
use std::time::SystemTime;

use serde::Serialize;

use crate::containers::ContainerInfo;
use crate::engine::serialize_time;
use crate::sources::lifecycle::detect::TaskExit;

/// Containers with an OOM kill not yet followed by their exit, at most (the oldest mark goes).
pub const MAX_OOM_MARKS: usize = 1024;
/// Exits remembered to drop duplicates and stale kills, at most.
const MAX_EXITS_REMEMBERED: usize = 4096;

/// Why a container exited, from its exit status: the `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// Status 0.
    Ok,
    /// A nonzero status that is not a signal's.
    Error,
    /// 143: SIGTERM, a stop signal it did not handle.
    SignalTerm,
    /// 137: SIGKILL (a stop's escalation, `kill -9`, or the OOM killer when not reported).
    SignalKill,
    /// 128 + another signal.
    OtherSignal,
    /// containerd reported an OOM kill in the container before its exit.
    Oom,
}

impl ExitReason {
    pub const ALL: [ExitReason; 6] = [
        ExitReason::Ok,
        ExitReason::Error,
        ExitReason::SignalTerm,
        ExitReason::SignalKill,
        ExitReason::OtherSignal,
        ExitReason::Oom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitReason::Ok => "ok",
            ExitReason::Error => "error",
            ExitReason::SignalTerm => "signal_term",
            ExitReason::SignalKill => "signal_kill",
            ExitReason::OtherSignal => "other_signal",
            ExitReason::Oom => "oom",
        }
    }

    /// The shim reports a process killed by signal n as 128 + n (n ≤ 64 on Linux).
    pub fn classify(exit_status: u32, oom: bool) -> ExitReason {
        match exit_status {
            _ if oom => ExitReason::Oom,
            0 => ExitReason::Ok,
            137 => ExitReason::SignalKill,
            143 => ExitReason::SignalTerm,
            129..=192 => ExitReason::OtherSignal,
            _ => ExitReason::Error,
        }
    }
}

/// One container exit as `/stops` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct ExitRecord {
    /// Names from the container directory (CRI's or Docker's), when known.
    pub container: ContainerInfo,
    /// containerd's namespace: `k8s.io` (kubelet) or `moby` (Docker).
    pub containerd_namespace: String,
    pub pid: u32,
    pub exit_status: u32,
    #[serde(serialize_with = "serialize_time")]
    pub exited_at: SystemTime,
    pub reason: ExitReason,
    /// An OOM kill in the container was reported before the exit.
    pub oom: bool,
}

#[derive(Debug)]
pub struct ExitBook {
    /// Containers with an OOM kill and no exit since; oldest first.
    oom_marks: VecDeque<String>,
    /// The last exit of each container remembered: its process and time.
    exited: HashMap<String, (u32, SystemTime)>,
    exited_order: VecDeque<String>,
    /// Oldest first.
    recent: VecDeque<ExitRecord>,
    keep: usize,
}

impl ExitBook {
    pub fn new(keep: usize) -> ExitBook {
        ExitBook {
            oom_marks: VecDeque::new(),
            exited: HashMap::new(),
            exited_order: VecDeque::new(),
            recent: VecDeque::new(),
            keep: keep.max(1),
        }
    }

    /// An OOM kill in the container: its next exit is an OOM exit.
    pub fn oom(&mut self, container_id: &str) {
        if self.oom_marks.iter().any(|id| id == container_id) {
            return;
        }
        if self.oom_marks.len() >= MAX_OOM_MARKS {
            self.oom_marks.pop_front();
        }
        self.oom_marks.push_back(container_id.to_string());
    }

    pub fn oom_marks(&self) -> usize {
        self.oom_marks.len()
    }

    /// Record an exit; None when it is one already recorded (containerd may publish an exit
    /// again when it cleans up after a shim).
    pub fn exited(&mut self, exit: &TaskExit, container: ContainerInfo) -> Option<ExitRecord> {
        let id = &exit.container_id;
        if self.exited.get(id).is_some_and(|(pid, _)| *pid == exit.pid) {
            return None;
        }
        let oom = match self.oom_marks.iter().position(|m| m == id) {
            Some(at) => {
                self.oom_marks.remove(at);
                true
            }
            None => false,
        };
        if !self.exited.contains_key(id) {
            if self.exited_order.len() >= MAX_EXITS_REMEMBERED
                && let Some(oldest) = self.exited_order.pop_front()
            {
                self.exited.remove(&oldest);
            }
            self.exited_order.push_back(id.clone());
        }
        self.exited.insert(id.clone(), (exit.pid, exit.exited_at));
        let record = ExitRecord {
            container,
            containerd_namespace: exit.namespace.clone(),
            pid: exit.pid,
            exit_status: exit.exit_status,
            exited_at: exit.exited_at,
            reason: ExitReason::classify(exit.exit_status, oom),
            oom,
        };
        self.recent.push_back(record.clone());
        while self.recent.len() > self.keep {
            self.recent.pop_front();
        }
        Some(record)
    }

    /// When the container's main process last exited, if remembered.
    pub fn exited_at(&self, container_id: &str) -> Option<SystemTime> {
        self.exited.get(container_id).map(|(_, at)| *at)
    }

    /// Fill in the names of listed exits whose container was not known when it exited; true
    /// when one was.
    pub fn name_from(&mut self, known: impl Fn(&str) -> Option<ContainerInfo>) -> bool {
        let mut named = false;
        for record in self
            .recent
            .iter_mut()
            .filter(|r| r.container.name.is_none())
        {
            if let Some(info) = known(&record.container.id).filter(|i| i.name.is_some()) {
                record.container = info;
                named = true;
            }
        }
        named
    }

    /// Newest first.
    pub fn recent(&self) -> impl Iterator<Item = &ExitRecord> {
        self.recent.iter().rev()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sources::lifecycle::stops::tests::wall;

    pub(crate) fn exit(id: &str, pid: u32, status: u32, ms: i64) -> TaskExit {
        TaskExit {
            namespace: "k8s.io".into(),
            container_id: id.into(),
            pid,
            exit_status: status,
            exited_at: wall(ms),
        }
    }

    fn unnamed(id: &str) -> ContainerInfo {
        ContainerInfo {
            id: id.into(),
            ..ContainerInfo::default()
        }
    }

    #[test]
    fn exit_statuses_fall_into_a_small_closed_set() {
        let cases = [
            (0, ExitReason::Ok),
            (1, ExitReason::Error),
            (127, ExitReason::Error),
            (128, ExitReason::Error),
            (129, ExitReason::OtherSignal),
            (130, ExitReason::OtherSignal),
            (137, ExitReason::SignalKill),
            (143, ExitReason::SignalTerm),
            (192, ExitReason::OtherSignal),
            (255, ExitReason::Error),
        ];
        for (status, reason) in cases {
            assert_eq!(ExitReason::classify(status, false), reason, "{status}");
        }
        assert_eq!(ExitReason::classify(137, true), ExitReason::Oom);
        assert_eq!(ExitReason::classify(0, true), ExitReason::Oom);
    }

    #[test]
    fn an_oom_marks_only_the_next_exit_of_its_container() {
        let mut b = ExitBook::new(10);
        b.oom("a");
        b.oom("a");
        assert_eq!(b.oom_marks(), 1, "one mark per container");
        let other = b.exited(&exit("b", 1, 137, 0), unnamed("b")).expect("b");
        assert_eq!(other.reason, ExitReason::SignalKill);
        let first = b.exited(&exit("a", 2, 137, 10), unnamed("a")).expect("a");
        assert!(first.oom && first.reason == ExitReason::Oom);
        let again = b
            .exited(&exit("a", 3, 137, 20), unnamed("a"))
            .expect("a again");
        assert!(!again.oom, "the mark is used up");
        assert_eq!(b.oom_marks(), 0);
    }

    #[test]
    fn oom_marks_are_bounded_the_oldest_dropped() {
        let mut b = ExitBook::new(10);
        for n in 0..MAX_OOM_MARKS + 5 {
            b.oom(&format!("c{n}"));
        }
        assert_eq!(b.oom_marks(), MAX_OOM_MARKS);
        let oldest = b.exited(&exit("c0", 1, 137, 0), unnamed("c0")).expect("c0");
        assert!(!oldest.oom, "its mark was dropped");
        let newest = format!("c{}", MAX_OOM_MARKS + 4);
        let kept = b.exited(&exit(&newest, 1, 137, 0), unnamed(&newest));
        assert!(kept.is_some_and(|r| r.oom));
    }

    #[test]
    fn a_repeated_exit_is_dropped_and_recent_exits_are_capped() {
        let mut b = ExitBook::new(2);
        assert!(b.exited(&exit("a", 7, 0, 0), unnamed("a")).is_some());
        assert!(b.exited(&exit("a", 7, 0, 5), unnamed("a")).is_none());
        assert_eq!(b.exited_at("a"), Some(wall(0)));
        // Docker restarts a container under the same id: a new process, a new exit.
        assert!(b.exited(&exit("a", 8, 1, 50), unnamed("a")).is_some());
        assert_eq!(b.exited_at("a"), Some(wall(50)));
        b.exited(&exit("b", 9, 0, 60), unnamed("b"));
        let listed: Vec<(&str, u32)> = b
            .recent()
            .map(|r| (r.container.id.as_str(), r.pid))
            .collect();
        assert_eq!(
            listed,
            [("b", 9), ("a", 8)],
            "newest first, the oldest evicted"
        );
    }

    #[test]
    fn exits_are_named_once_the_directory_knows_them() {
        let mut b = ExitBook::new(5);
        b.exited(&exit("a", 1, 0, 0), unnamed("a"));
        assert!(!b.name_from(|_| None));
        let named = |id: &str| {
            Some(ContainerInfo {
                id: id.into(),
                name: Some("app".into()),
                pod: Some("web".into()),
                ..ContainerInfo::default()
            })
        };
        assert!(b.name_from(named));
        let record = b.recent().next().expect("one exit");
        assert_eq!(record.container.pod.as_deref(), Some("web"));
        assert!(!b.name_from(named), "nothing left to name");
    }
}
