//! Joins an OOM kill (`Killed process <pid> (<comm>)`) with the header lines printed before it,
//! which name the memory cgroup but are not events themselves:
//!
//! - `oom-kill:constraint=...,oom_memcg=<path>,task_memcg=<path>,task=<comm>,pid=<pid>,uid=<n>`
//!   (4.19+; `global_oom` instead of `oom_memcg=` for a node-wide OOM): joined on the pid;
//! - `Task in <memcg> killed as a result of limit of <memcg>` (<= 4.x, no pid): joined when it
//!   came within [`CONTEXT_WINDOW_USEC`] before the kill;
//! - `Memory cgroup out of memory: Kill process <pid> (<comm>) score <n> or sacrifice child`
//!   (<= 5.0): names the process chosen, whose child may be the one killed.
//!
//! The kernel prints one OOM's lines under `oom_lock`, so they are not interleaved with another
//! OOM's; the header is rate-limited, so a kill may come without any. Everything seen before a
//! kill is used up by it, so a later kill whose header was suppressed is never joined with a
//! stale one.

use std::collections::VecDeque;

use regex::Captures;

use super::event::OomConstraint;

/// Which header line a context pattern recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKind {
    Summary,
    TaskIn,
    KillProcess,
}

pub(crate) const CONTEXT_PATTERNS: [(ContextKind, &str); 3] = [
    (
        ContextKind::Summary,
        r"^oom-kill:constraint=(?P<constraint>\w+)(?:,.*?)?(?:,oom_memcg=(?P<oom_memcg>[^,]*)|,global_oom),task_memcg=(?P<task_memcg>[^,]*),task=.*,pid=(?P<pid>\d+),uid=\d+",
    ),
    (
        ContextKind::TaskIn,
        r"^Task in (?P<task_memcg>.+) killed as a result of limit of (?P<memcg>.+)$",
    ),
    (
        ContextKind::KillProcess,
        r"^(?:Memory cgroup out of memory|Out of memory(?: \(oom_kill_allocating_task\))?): Kill process (?P<pid>\d+) \(.*\) score \d+ or sacrifice child",
    ),
];

/// How long before a kill a `Task in ...` line may come and still belong to it. The lines of
/// one OOM are printed together; the task table between them can be long but takes well under
/// a second.
pub const CONTEXT_WINDOW_USEC: u64 = 10_000_000;

/// Bound on remembered header lines: one OOM prints one of each.
const MAX_PENDING: usize = 8;

/// What the header lines said about a kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomJoin {
    pub constraint: OomConstraint,
    pub memcg: Option<String>,
    pub task_memcg: Option<String>,
}

#[derive(Debug, Clone)]
struct Summary {
    ts_usec: u64,
    pid: u32,
    constraint: OomConstraint,
    oom_memcg: Option<String>,
    task_memcg: Option<String>,
}

#[derive(Debug, Clone)]
struct TaskIn {
    ts_usec: u64,
    task_memcg: String,
    memcg: String,
}

#[derive(Debug, Clone)]
struct Chosen {
    ts_usec: u64,
    pid: u32,
    constraint: Option<OomConstraint>,
}

#[derive(Debug, Default)]
pub struct OomCorrelator {
    summaries: VecDeque<Summary>,
    task_in: VecDeque<TaskIn>,
    chosen: VecDeque<Chosen>,
}

/// The constraint a message's prefix states, if it has one.
fn constraint_of_prefix(message: &str) -> Option<OomConstraint> {
    if message.starts_with("Memory cgroup out of memory") {
        Some(OomConstraint::Memcg)
    } else if message.starts_with("Out of memory") {
        Some(OomConstraint::Global)
    } else {
        None
    }
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T) {
    if queue.len() == MAX_PENDING {
        queue.pop_front();
    }
    queue.push_back(item);
}

impl OomCorrelator {
    /// Remember a header line recognised by one of [`CONTEXT_PATTERNS`].
    pub fn observe(
        &mut self,
        kind: ContextKind,
        captures: &Captures<'_>,
        message: &str,
        ts_usec: u64,
    ) {
        let pid = captures.name("pid").and_then(|m| m.as_str().parse().ok());
        match kind {
            ContextKind::Summary => {
                let Some(pid) = pid else { return };
                let oom_memcg = captures.name("oom_memcg").map(|m| m.as_str().to_string());
                let constraint = if oom_memcg.is_some()
                    || captures.name("constraint").map(|m| m.as_str()) == Some("CONSTRAINT_MEMCG")
                {
                    OomConstraint::Memcg
                } else {
                    OomConstraint::Global
                };
                push_bounded(
                    &mut self.summaries,
                    Summary {
                        ts_usec,
                        pid,
                        constraint,
                        oom_memcg,
                        task_memcg: captures.name("task_memcg").map(|m| m.as_str().to_string()),
                    },
                );
            }
            ContextKind::TaskIn => {
                if let (Some(task_memcg), Some(memcg)) =
                    (captures.name("task_memcg"), captures.name("memcg"))
                {
                    push_bounded(
                        &mut self.task_in,
                        TaskIn {
                            ts_usec,
                            task_memcg: task_memcg.as_str().to_string(),
                            memcg: memcg.as_str().to_string(),
                        },
                    );
                }
            }
            ContextKind::KillProcess => {
                let Some(pid) = pid else { return };
                push_bounded(
                    &mut self.chosen,
                    Chosen {
                        ts_usec,
                        pid,
                        constraint: constraint_of_prefix(message),
                    },
                );
            }
        }
    }

    /// A `Killed process` line: join it with what came before and use that up.
    pub fn kill(&mut self, pid: Option<u32>, message: &str, ts_usec: u64) -> OomJoin {
        let fresh = |at: u64| at <= ts_usec && ts_usec - at <= CONTEXT_WINDOW_USEC;
        // The victim itself, or a process whose child was sacrificed in its place (<= 5.0).
        let candidates: Vec<u32> = pid
            .into_iter()
            .chain(
                self.chosen
                    .iter()
                    .rev()
                    .filter(|c| fresh(c.ts_usec))
                    .map(|c| c.pid),
            )
            .collect();
        let summary = candidates.iter().find_map(|&p| {
            self.summaries
                .iter()
                .rev()
                .find(|s| s.pid == p && fresh(s.ts_usec))
        });
        let chosen_constraint = self
            .chosen
            .iter()
            .rev()
            .find(|c| fresh(c.ts_usec))
            .and_then(|c| c.constraint);
        let task_in = self.task_in.iter().rev().find(|t| fresh(t.ts_usec));

        let join = match (summary, task_in) {
            (Some(s), _) => OomJoin {
                constraint: s.constraint,
                memcg: s.oom_memcg.clone(),
                task_memcg: s.task_memcg.clone(),
            },
            (None, Some(t)) => OomJoin {
                // Only a memory cgroup's OOM prints the `Task in` line.
                constraint: OomConstraint::Memcg,
                memcg: Some(t.memcg.clone()),
                task_memcg: Some(t.task_memcg.clone()),
            },
            (None, None) => OomJoin {
                constraint: OomConstraint::Unknown,
                memcg: None,
                task_memcg: None,
            },
        };
        let constraint = constraint_of_prefix(message)
            .or(summary.map(|s| s.constraint))
            .or(chosen_constraint)
            .unwrap_or(join.constraint);
        self.clear();
        OomJoin { constraint, ..join }
    }

    /// Forget every header line: after records were lost, what came before no longer belongs
    /// to what comes next.
    pub fn clear(&mut self) {
        self.summaries.clear();
        self.task_in.clear();
        self.chosen.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn feed(c: &mut OomCorrelator, line: &str, ts_usec: u64) -> bool {
        for (kind, pattern) in CONTEXT_PATTERNS {
            if let Some(captures) = Regex::new(pattern).unwrap().captures(line) {
                c.observe(kind, &captures, line, ts_usec);
                return true;
            }
        }
        false
    }

    const SUMMARY_6X: &str = "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=c1,mems_allowed=0,oom_memcg=/docker/c1,task_memcg=/docker/c1/sub,task=runc:[2:INIT],pid=20357,uid=0";

    #[test]
    fn summary_joins_on_pid() {
        let mut c = OomCorrelator::default();
        assert!(feed(&mut c, SUMMARY_6X, 1_000));
        let j = c.kill(
            Some(20357),
            "Memory cgroup out of memory: Killed process 20357 (runc:[2:INIT]) total-vm:1kB",
            1_100,
        );
        assert_eq!(j.constraint, OomConstraint::Memcg);
        assert_eq!(j.memcg.as_deref(), Some("/docker/c1"));
        assert_eq!(j.task_memcg.as_deref(), Some("/docker/c1/sub"));
    }

    #[test]
    fn summary_for_another_pid_is_not_joined_and_is_used_up() {
        let mut c = OomCorrelator::default();
        feed(&mut c, SUMMARY_6X, 1_000);
        let j = c.kill(
            Some(1),
            "Memory cgroup out of memory: Killed process 1 (x) total-vm:1kB",
            1_100,
        );
        assert_eq!(j.memcg, None);
        assert_eq!(j.constraint, OomConstraint::Memcg);
        let j = c.kill(Some(20357), "Killed process 20357 (y) total-vm:1kB", 1_200);
        assert_eq!(j.memcg, None, "context is used up by the kill after it");
        assert_eq!(j.constraint, OomConstraint::Unknown);
    }

    #[test]
    fn global_summary() {
        let mut c = OomCorrelator::default();
        feed(
            &mut c,
            "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/docker/c2,task=java,pid=7,uid=1000",
            5,
        );
        let j = c.kill(
            Some(7),
            "Out of memory: Killed process 7 (java) total-vm:1kB",
            6,
        );
        assert_eq!(j.constraint, OomConstraint::Global);
        assert_eq!(j.memcg, None);
        assert_eq!(j.task_memcg.as_deref(), Some("/docker/c2"));
    }

    #[test]
    fn task_in_joins_within_the_window_only() {
        let mut c = OomCorrelator::default();
        feed(
            &mut c,
            "Task in /docker/c3 killed as a result of limit of /docker",
            1_000_000,
        );
        feed(
            &mut c,
            "Memory cgroup out of memory: Kill process 9 (sh) score 900 or sacrifice child",
            1_000_100,
        );
        let j = c.kill(Some(9), "Killed process 9 (sh) total-vm:1kB", 1_000_200);
        assert_eq!(j.constraint, OomConstraint::Memcg);
        assert_eq!(j.memcg.as_deref(), Some("/docker"));
        assert_eq!(j.task_memcg.as_deref(), Some("/docker/c3"));

        feed(
            &mut c,
            "Task in /docker/c4 killed as a result of limit of /docker/c4",
            1_000_000,
        );
        let j = c.kill(
            Some(10),
            "Killed process 10 (sh) total-vm:1kB",
            1_000_000 + CONTEXT_WINDOW_USEC + 1,
        );
        assert_eq!(j.memcg, None);
    }

    #[test]
    fn sacrificed_child_joins_through_the_chosen_parent() {
        let mut c = OomCorrelator::default();
        feed(
            &mut c,
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/kubepods/pod1,task_memcg=/kubepods/pod1/c,task=java,pid=100,uid=0",
            10,
        );
        feed(
            &mut c,
            "Memory cgroup out of memory: Kill process 100 (java) score 990 or sacrifice child",
            11,
        );
        let j = c.kill(Some(101), "Killed process 101 (worker) total-vm:1kB", 12);
        assert_eq!(j.memcg.as_deref(), Some("/kubepods/pod1"));
        assert_eq!(j.constraint, OomConstraint::Memcg);
    }

    #[test]
    fn chosen_line_alone_gives_the_constraint() {
        let mut c = OomCorrelator::default();
        feed(
            &mut c,
            "Out of memory: Kill process 5 (java) score 900 or sacrifice child",
            10,
        );
        let j = c.kill(Some(5), "Killed process 5 (java), UID 0, total-vm:1kB", 11);
        assert_eq!(j.constraint, OomConstraint::Global);
        assert_eq!(j.memcg, None);
    }

    #[test]
    fn clear_forgets_everything() {
        let mut c = OomCorrelator::default();
        feed(&mut c, SUMMARY_6X, 1);
        c.clear();
        assert_eq!(
            c.kill(Some(20357), "Killed process 20357 (x) total-vm:1kB", 2)
                .memcg,
            None
        );
    }
}
