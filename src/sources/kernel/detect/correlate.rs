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

/// The fields of an `oom-kill:` summary line, with the same meaning as the groups of its
/// pattern in [`CONTEXT_PATTERNS`] (a unit test holds them equal). Found by their keys rather
/// than by the pattern's captures: the pattern's `.*` spans make capturing cost several µs
/// per line (the backtracker runs over the whole line), most of the CPU per record in an OOM
/// storm. The rule set's single pass still decides which lines are summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryLine<'a> {
    pub constraint: &'a str,
    pub oom_memcg: Option<&'a str>,
    pub task_memcg: &'a str,
    pub pid: u32,
}

impl<'a> SummaryLine<'a> {
    pub fn parse(message: &'a str) -> Option<SummaryLine<'a>> {
        let rest = message.strip_prefix("oom-kill:constraint=")?;
        let constraint_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let constraint = rest.get(..constraint_end)?;
        if constraint.is_empty() {
            return None;
        }
        let after_constraint = rest.get(constraint_end..)?;
        // `,oom_memcg=<path>` or `,global_oom` right before `,task_memcg=`: the first
        // occurrence after which the rest of the line fits.
        after_constraint
            .match_indices(",task_memcg=")
            .find_map(|(at, key)| {
                let before = after_constraint.get(..at)?;
                let oom_memcg = if before.ends_with(",global_oom") {
                    None
                } else {
                    let memcg = before.rsplit(',').next()?.strip_prefix("oom_memcg=")?;
                    if !before.strip_suffix(memcg)?.ends_with(",oom_memcg=") {
                        return None;
                    }
                    Some(memcg)
                };
                let after = after_constraint.get(at + key.len()..)?;
                let task_memcg_end = after.find(',')?;
                let tail = after.get(task_memcg_end..)?;
                tail.strip_prefix(",task=")?;
                Some(SummaryLine {
                    constraint,
                    oom_memcg,
                    task_memcg: after.get(..task_memcg_end)?,
                    pid: last_pid(tail)?,
                })
            })
    }
}

/// `task=.*,pid=<n>,uid=<n>`: the comm may hold anything, so the last such pid.
fn last_pid(tail: &str) -> Option<u32> {
    tail.rmatch_indices(",pid=").find_map(|(at, key)| {
        let after = tail.get(at + key.len()..)?;
        let digits = after.find(|c: char| !c.is_ascii_digit())?;
        let uid = after.get(digits..)?.strip_prefix(",uid=")?;
        if digits == 0 || !uid.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        after.get(..digits)?.parse().ok()
    })
}

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
    /// Remember a header line recognised by one of [`CONTEXT_PATTERNS`]: its captures, except
    /// for the summary line, which is parsed here (see [`SummaryLine::parse`]).
    pub fn observe(
        &mut self,
        kind: ContextKind,
        captures: Option<&Captures<'_>>,
        message: &str,
        ts_usec: u64,
    ) {
        let group = |name| captures.and_then(|c| c.name(name));
        let pid = group("pid").and_then(|m| m.as_str().parse().ok());
        match kind {
            ContextKind::Summary => {
                let Some(line) = SummaryLine::parse(message) else {
                    return;
                };
                let constraint =
                    if line.oom_memcg.is_some() || line.constraint == "CONSTRAINT_MEMCG" {
                        OomConstraint::Memcg
                    } else {
                        OomConstraint::Global
                    };
                push_bounded(
                    &mut self.summaries,
                    Summary {
                        ts_usec,
                        pid: line.pid,
                        constraint,
                        oom_memcg: line.oom_memcg.map(str::to_string),
                        task_memcg: Some(line.task_memcg.to_string()),
                    },
                );
            }
            ContextKind::TaskIn => {
                if let (Some(task_memcg), Some(memcg)) = (group("task_memcg"), group("memcg")) {
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
                c.observe(kind, Some(&captures), line, ts_usec);
                return true;
            }
        }
        false
    }

    const SUMMARY_6X: &str = "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=c1,mems_allowed=0,oom_memcg=/docker/c1,task_memcg=/docker/c1/sub,task=runc:[2:INIT],pid=20357,uid=0";

    #[test]
    fn the_summary_parser_agrees_with_the_pattern() {
        let pattern = Regex::new(CONTEXT_PATTERNS[0].1).unwrap();
        let lines = [
            SUMMARY_6X,
            "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0-1,3,global_oom,task_memcg=/kubepods.slice/a.scope,task=java,pid=7,uid=1000",
            "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/docker/x,task_memcg=/docker/x,task=a,pid=1,b,pid=22,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=c,mems_allowed=0,oom_memcg=,task_memcg=,task=,pid=5,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),oom_memcg=/a,b,oom_memcg=/c,task_memcg=/d,task=x,pid=9,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,cpuset=x,mems_allowed=0,task_memcg=/d,task=x,pid=9,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/a,task_memcg=/d,task=x,pid=99999999999,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/a,task_memcg=/d,task=x,pid=9,uid=",
            "oom-kill:constraint=,oom_memcg=/a,task_memcg=/d,task=x,pid=9,uid=0",
            "oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/a,task_memcg=/d,tusk=x,pid=9,uid=0",
        ];
        for line in lines {
            let by_pattern = pattern.captures(line).and_then(|c| {
                Some(SummaryLine {
                    constraint: c.name("constraint")?.as_str(),
                    oom_memcg: c.name("oom_memcg").map(|m| m.as_str()),
                    task_memcg: c.name("task_memcg")?.as_str(),
                    pid: c.name("pid")?.as_str().parse().ok()?,
                })
            });
            assert_eq!(SummaryLine::parse(line), by_pattern, "{line}");
        }
    }

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
