//! Pure stop tracking: each container's stop from its events — the stop signal, SIGKILL when
//! the container ignored it (seed 001: PID 1 of a shell-form entrypoint ignores SIGTERM), the
//! `die` that ends it — and whether it is stuck: no `die` by its deadline (seeds 001 and 003:
//! tasks in D take no signal, SIGKILL included).
//!
//! All times are the daemon's event times on the node's wall clock, so a stop whose events
//! arrive late (a resumed stream) is timed from when it happened, and deadlines pass while the
//! stream is silent.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::containers::ContainerInfo;
use crate::domain::Runtime;
use crate::engine::serialize_time;
use crate::sources::lifecycle::detect::{ContainerAction, ContainerEvent};

pub const SIGKILL: i32 = 9;
/// Signals that begin a stop: SIGKILL, SIGTERM, and the stop signals images set (SIGINT,
/// SIGQUIT, SIGPWR, SIGRTMIN+3 for systemd). Others (SIGHUP, SIGUSR1, ...) go to running
/// containers to reload or report, and are not stops.
const STOP_SIGNALS: [i32; 6] = [2, 3, SIGKILL, 15, 30, 37];
/// Signals kept per stop (a client retrying `docker stop` in a loop adds one per call).
const MAX_SIGNALS: usize = 16;
/// Stops in progress tracked at most; beyond, the oldest is dropped (its `die` was lost).
const MAX_IN_PROGRESS: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopSettings {
    /// Assumed when the stop carries no timeout of its own.
    pub stop_timeout: Duration,
    /// Allowed past the timeout, and past a SIGKILL, before a stop is stuck.
    pub grace: Duration,
}

/// What /proc showed holding a stuck stop: the container's tasks stuck in D (with the kernel
/// function they sleep in) and its frozen tasks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldBy {
    pub stuck_tasks: Vec<HeldTask>,
    pub frozen_tasks: u64,
}

impl HeldBy {
    /// "2 task(s) in D (io_schedule) and 1 frozen task(s), SIGKILL pending on 3"; None when
    /// nothing was seen.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        let in_d: Vec<&HeldTask> = self.stuck_tasks.iter().filter(|t| !t.frozen).collect();
        if !in_d.is_empty() {
            let mut wchans: Vec<&str> = in_d.iter().filter_map(|t| t.wchan.as_deref()).collect();
            wchans.sort_unstable();
            wchans.dedup();
            let wchans = if wchans.is_empty() {
                String::new()
            } else {
                format!(" ({})", wchans.join(", "))
            };
            parts.push(format!("{} task(s) in D{wchans}", in_d.len()));
        }
        if self.frozen_tasks > 0 {
            parts.push(format!("{} frozen task(s)", self.frozen_tasks));
        }
        let killed = self
            .stuck_tasks
            .iter()
            .filter(|t| t.sigkill_pending)
            .count();
        let killed = if killed > 0 {
            format!(", SIGKILL pending on {killed} (cannot be killed)")
        } else {
            String::new()
        };
        (!parts.is_empty()).then(|| parts.join(" and ") + &killed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldTask {
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    pub wchan: Option<String>,
    pub seconds_in_d: f64,
    /// SIGKILL is pending on it: the kill cannot land while it is in D or frozen.
    #[serde(default)]
    pub sigkill_pending: bool,
    /// In a frozen cgroup (a task held only for its pending SIGKILL).
    #[serde(default)]
    pub frozen: bool,
}

/// How hangwatch learnt of a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SeenBy {
    /// Docker's event stream: every signal, the timeout, the exit code.
    DockerEvents,
    /// /proc alone (any runtime, no Docker needed): a container task with SIGKILL pending.
    /// Neither the signals sent before it, nor the stop's timeout, nor the exit code are
    /// known; it starts when the scanner first saw the kill pending.
    ProcKillPending,
}

#[derive(Debug, Clone, Serialize)]
pub struct StopInProgress {
    pub container: ContainerInfo,
    pub seen_by: SeenBy,
    /// Whose incident a stuck one joins.
    #[serde(skip)]
    pub runtime: Runtime,
    /// The first kill.
    #[serde(serialize_with = "serialize_time")]
    pub started_at: SystemTime,
    /// Signals sent, in order.
    pub signals: Vec<i32>,
    /// SIGKILL followed another stop signal: the container ignored it.
    pub escalated: bool,
    #[serde(skip)]
    sigkill_at: Option<SystemTime>,
    /// The timeout assumed for this stop: kubelet's grace period, else `lifecycle.stop_timeout`.
    #[serde(serialize_with = "serialize_seconds")]
    pub stop_timeout: Duration,
    /// Stuck from then on without a `die`.
    #[serde(serialize_with = "serialize_time")]
    pub deadline: SystemTime,
    /// Since the first kill, as of the last evaluation.
    pub seconds: f64,
    pub stuck: bool,
    /// For a stuck stop: its tasks in D or frozen, from the latest /proc scan.
    pub held_by: Option<HeldBy>,
}

impl StopInProgress {
    fn deadline(&self, grace: Duration) -> SystemTime {
        match self.sigkill_at {
            Some(killed) => killed + grace,
            None => self.started_at + self.stop_timeout + grace,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// Its main process exited: `die`.
    Died,
    /// Removed without a `die` seen.
    Removed,
    /// Seen by /proc only: no task of the container has SIGKILL pending any more (the kill
    /// landed). The exit code is known only when containerd's exit followed.
    KillLanded,
    /// Seen by /proc, ended by containerd's `/tasks/exit` of the container's main process,
    /// with its exit code.
    Exited,
}

/// A stop that finished.
#[derive(Debug, Clone, Serialize)]
pub struct StopRecord {
    pub container: ContainerInfo,
    pub seen_by: SeenBy,
    #[serde(serialize_with = "serialize_time")]
    pub started_at: SystemTime,
    #[serde(serialize_with = "serialize_time")]
    pub ended_at: SystemTime,
    /// From the first kill to `die`.
    pub duration_seconds: f64,
    pub signals: Vec<i32>,
    pub escalated: bool,
    pub exit_code: Option<i32>,
    pub ended_by: Ending,
    pub was_stuck: bool,
    /// What held it, as last seen while it was stuck.
    pub held_by: Option<HeldBy>,
}

/// What an event did.
#[derive(Debug)]
pub enum Applied {
    /// Not part of a stop: a container exiting by itself, a reload signal, the `stop` event
    /// that follows `die`.
    Ignored,
    Started,
    /// SIGKILL after the stop signal.
    Escalated,
    /// One more signal to a stop in progress.
    Signalled,
    Completed(Box<StopRecord>),
}

#[derive(Debug)]
pub struct StopBook {
    settings: StopSettings,
    in_progress: BTreeMap<String, StopInProgress>,
    /// Oldest first.
    recent: VecDeque<StopRecord>,
    keep: usize,
}

impl StopBook {
    pub fn new(settings: StopSettings, keep: usize) -> StopBook {
        StopBook {
            settings,
            in_progress: BTreeMap::new(),
            recent: VecDeque::new(),
            keep: keep.max(1),
        }
    }

    pub fn settings(&self) -> StopSettings {
        self.settings
    }

    pub fn apply(&mut self, event: &ContainerEvent) -> Applied {
        let at = event.at();
        match event.action {
            ContainerAction::Kill { signal } => self.kill(event, signal, at),
            ContainerAction::Die { exit_code } => self.end(event.id(), at, exit_code, Ending::Died),
            ContainerAction::Destroy => self.end(event.id(), at, None, Ending::Removed),
            ContainerAction::Stop => Applied::Ignored,
        }
    }

    fn kill(&mut self, event: &ContainerEvent, signal: i32, at: SystemTime) -> Applied {
        let grace = self.settings.grace;
        if let Some(stop) = self.in_progress.get_mut(event.id()) {
            if stop.signals.len() < MAX_SIGNALS {
                stop.signals.push(signal);
            }
            if signal != SIGKILL || stop.sigkill_at.is_some() {
                return Applied::Signalled;
            }
            stop.sigkill_at = Some(at);
            stop.deadline = stop.deadline(grace);
            stop.escalated = stop.signals.first() != Some(&SIGKILL);
            return if stop.escalated {
                Applied::Escalated
            } else {
                Applied::Signalled
            };
        }
        if !STOP_SIGNALS.contains(&signal) {
            return Applied::Ignored;
        }
        if self.in_progress.len() >= MAX_IN_PROGRESS {
            self.drop_oldest();
        }
        let mut stop = StopInProgress {
            container: event.container.clone(),
            seen_by: SeenBy::DockerEvents,
            runtime: Runtime::Docker,
            started_at: at,
            signals: vec![signal],
            escalated: false,
            sigkill_at: (signal == SIGKILL).then_some(at),
            stop_timeout: event.stop_timeout.unwrap_or(self.settings.stop_timeout),
            deadline: at,
            seconds: 0.0,
            stuck: false,
            held_by: None,
        };
        stop.deadline = stop.deadline(grace);
        self.in_progress.insert(event.id().to_string(), stop);
        Applied::Started
    }

    fn drop_oldest(&mut self) {
        let oldest = self
            .in_progress
            .iter()
            .min_by_key(|(_, stop)| stop.started_at)
            .map(|(id, _)| id.clone());
        if let Some(id) = oldest {
            tracing::warn!(container_id = %id, "too many stops in progress: the oldest is no longer tracked");
            self.in_progress.remove(&id);
        }
    }

    fn end(
        &mut self,
        id: &str,
        at: SystemTime,
        exit_code: Option<i32>,
        ended_by: Ending,
    ) -> Applied {
        let Some(stop) = self.in_progress.remove(id) else {
            return Applied::Ignored;
        };
        let record = StopRecord {
            duration_seconds: at
                .duration_since(stop.started_at)
                .unwrap_or_default()
                .as_secs_f64(),
            container: stop.container,
            seen_by: stop.seen_by,
            started_at: stop.started_at,
            ended_at: at,
            signals: stop.signals,
            escalated: stop.escalated,
            exit_code,
            ended_by,
            was_stuck: stop.stuck,
            held_by: stop.held_by,
        };
        self.recent.push_back(record.clone());
        while self.recent.len() > self.keep {
            self.recent.pop_front();
        }
        Applied::Completed(Box::new(record))
    }

    /// A container task has had SIGKILL pending since `since` (from /proc, whatever runtime
    /// sent it). Begins a stop unless one is in progress (Docker's events saw it first); it is
    /// stuck once the kill stays pending `stuck_after`. True when a stop began.
    pub fn kill_pending(
        &mut self,
        container: &ContainerInfo,
        runtime: Runtime,
        since: SystemTime,
        stuck_after: Duration,
    ) -> bool {
        if self.in_progress.contains_key(&container.id) {
            return false;
        }
        if self.in_progress.len() >= MAX_IN_PROGRESS {
            self.drop_oldest();
        }
        let stop = StopInProgress {
            container: container.clone(),
            seen_by: SeenBy::ProcKillPending,
            runtime,
            started_at: since,
            signals: vec![SIGKILL],
            escalated: false,
            sigkill_at: Some(since),
            stop_timeout: Duration::ZERO,
            deadline: since + stuck_after,
            seconds: 0.0,
            stuck: false,
            held_by: None,
        };
        self.in_progress.insert(container.id.clone(), stop);
        true
    }

    /// End at `at` the stops seen by /proc whose containers no longer have a task with
    /// SIGKILL pending (`pending` holds those that still do).
    pub fn kills_landed(&mut self, pending: &BTreeSet<&str>, at: SystemTime) -> Vec<StopRecord> {
        let landed: Vec<String> = self
            .in_progress
            .iter()
            .filter(|(id, s)| {
                s.seen_by == SeenBy::ProcKillPending && !pending.contains(id.as_str())
            })
            .map(|(id, _)| id.clone())
            .collect();
        landed
            .iter()
            .filter_map(|id| match self.end(id, at, None, Ending::KillLanded) {
                Applied::Completed(record) => Some(*record),
                _ => None,
            })
            .collect()
    }

    /// containerd's `/tasks/exit` of the container's main process: ends the stop /proc saw
    /// with the exit code. A stop Docker's events saw ends at Docker's `die` instead (the
    /// `moby` namespace's exits repeat Docker's). When /proc saw the kill land first, the exit
    /// code is added to that stop's record. Returns the stop that ended.
    pub fn exited(&mut self, id: &str, at: SystemTime, exit_code: i32) -> Option<StopRecord> {
        match self.in_progress.get(id) {
            Some(stop) if stop.seen_by == SeenBy::ProcKillPending => {
                match self.end(id, at, Some(exit_code), Ending::Exited) {
                    Applied::Completed(record) => Some(*record),
                    _ => None,
                }
            }
            Some(_) => None,
            None => {
                if let Some(landed) = self.recent.iter_mut().rev().find(|r| r.container.id == id)
                    && landed.ended_by == Ending::KillLanded
                    && landed.exit_code.is_none()
                    && landed.started_at <= at
                {
                    landed.exit_code = Some(exit_code);
                }
                None
            }
        }
    }

    /// Age every stop at `now`; returns the ids of stops that became stuck.
    pub fn evaluate(&mut self, now: SystemTime) -> Vec<String> {
        let mut stuck = Vec::new();
        for (id, stop) in &mut self.in_progress {
            stop.seconds = now
                .duration_since(stop.started_at)
                .unwrap_or_default()
                .as_secs_f64();
            if !stop.stuck && now >= stop.deadline {
                stop.stuck = true;
                stuck.push(id.clone());
            }
        }
        stuck
    }

    /// Oldest first.
    pub fn in_progress(&self) -> Vec<&StopInProgress> {
        let mut all: Vec<&StopInProgress> = self.in_progress.values().collect();
        all.sort_by_key(|s| s.started_at);
        all
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut StopInProgress> {
        self.in_progress.get_mut(id)
    }

    /// Newest first.
    pub fn recent(&self) -> impl Iterator<Item = &StopRecord> {
        self.recent.iter().rev()
    }
}

fn serialize_seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;
    /// A time on the daemon's clock, `ms` milliseconds after an arbitrary origin.
    fn t(ms: i64) -> i64 {
        1_800_000_000 * SECOND + ms * 1_000_000
    }
    pub(crate) fn wall(ms: i64) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_nanos(t(ms).unsigned_abs())
    }

    pub(crate) fn event(id: &str, ms: i64, action: ContainerAction) -> ContainerEvent {
        ContainerEvent {
            time_nano: t(ms),
            action,
            container: ContainerInfo {
                id: id.into(),
                name: Some(format!("{id}-name")),
                image: Some("shell-form:1".into()),
                ..ContainerInfo::default()
            },
            stop_timeout: None,
        }
    }
    pub(crate) fn kill(id: &str, ms: i64, signal: i32) -> ContainerEvent {
        event(id, ms, ContainerAction::Kill { signal })
    }
    pub(crate) fn die(id: &str, ms: i64) -> ContainerEvent {
        event(
            id,
            ms,
            ContainerAction::Die {
                exit_code: Some(137),
            },
        )
    }

    fn book() -> StopBook {
        StopBook::new(
            StopSettings {
                stop_timeout: Duration::from_secs(10),
                grace: Duration::from_secs(30),
            },
            3,
        )
    }

    fn completed(applied: Applied) -> StopRecord {
        match applied {
            Applied::Completed(record) => *record,
            other => panic!("expected a completed stop, got {other:?}"),
        }
    }

    #[test]
    fn sigterm_ignored_then_sigkill_then_die_is_one_escalated_stop() {
        let mut b = book();
        assert!(matches!(b.apply(&kill("a", 0, 15)), Applied::Started));
        assert!(matches!(b.apply(&kill("a", 1000, 9)), Applied::Escalated));
        let record = completed(b.apply(&die("a", 1080)));
        assert!(record.escalated);
        assert_eq!(record.signals, [15, 9]);
        assert!((record.duration_seconds - 1.08).abs() < 1e-9);
        assert_eq!(record.exit_code, Some(137));
        assert_eq!(record.ended_by, Ending::Died);
        assert!(!record.was_stuck);
        assert!(matches!(
            b.apply(&event("a", 1100, ContainerAction::Stop)),
            Applied::Ignored
        ));
        assert_eq!(b.recent().count(), 1);
        assert!(b.in_progress().is_empty());
    }

    #[test]
    fn a_handled_sigterm_does_not_escalate() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        let record = completed(b.apply(&die("a", 90)));
        assert!(!record.escalated);
        assert_eq!(record.signals, [15]);
    }

    #[test]
    fn docker_kill_is_a_stop_but_not_an_escalation() {
        let mut b = book();
        assert!(matches!(b.apply(&kill("a", 0, 9)), Applied::Started));
        assert!(!completed(b.apply(&die("a", 5))).escalated);
    }

    #[test]
    fn reload_signals_and_exits_by_themselves_are_not_stops() {
        let mut b = book();
        assert!(matches!(b.apply(&kill("a", 0, 1)), Applied::Ignored));
        assert!(matches!(b.apply(&die("a", 10)), Applied::Ignored));
        assert!(matches!(
            b.apply(&event("a", 20, ContainerAction::Destroy)),
            Applied::Ignored
        ));
        assert_eq!(b.recent().count(), 0);
    }

    #[test]
    fn stuck_after_timeout_plus_grace_without_sigkill() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        assert!(b.evaluate(wall(39_999)).is_empty());
        assert_eq!(b.evaluate(wall(40_000)), ["a"]);
        assert!(b.evaluate(wall(50_000)).is_empty(), "reported once");
        let stop = b.in_progress()[0];
        assert!(stop.stuck);
        assert_eq!(stop.seconds, 50.0);
        let record = completed(b.apply(&die("a", 60_000)));
        assert!(record.was_stuck);
        assert_eq!(record.duration_seconds, 60.0);
    }

    #[test]
    fn after_sigkill_only_the_grace_is_allowed() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        b.apply(&kill("a", 1_000, 9));
        assert!(b.evaluate(wall(30_999)).is_empty());
        assert_eq!(b.evaluate(wall(31_000)), ["a"]);
    }

    #[test]
    fn kubelet_grace_period_is_the_timeout() {
        let mut b = book();
        let mut e = kill("a", 0, 15);
        e.stop_timeout = Some(Duration::from_secs(120));
        b.apply(&e);
        assert!(b.evaluate(wall(149_000)).is_empty());
        assert_eq!(b.evaluate(wall(150_000)), ["a"]);
    }

    #[test]
    fn silence_does_not_hide_a_stuck_stop() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        b.apply(&kill("a", 1_000, 9));
        // No event at all for an hour: still in progress, and stuck.
        assert_eq!(b.evaluate(wall(3_600_000)), ["a"]);
        assert_eq!(b.in_progress().len(), 1);
    }

    #[test]
    fn removal_ends_a_stop_without_a_die() {
        let mut b = book();
        b.apply(&kill("a", 0, 9));
        let record = completed(b.apply(&event("a", 500, ContainerAction::Destroy)));
        assert_eq!(record.ended_by, Ending::Removed);
        assert_eq!(record.exit_code, None);
    }

    #[test]
    fn repeated_stops_keep_bounded_signals_and_recent_stops_are_capped() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        for ms in 1..100 {
            b.apply(&kill("a", ms, 15));
        }
        assert_eq!(b.in_progress()[0].signals.len(), MAX_SIGNALS);
        b.apply(&die("a", 200));
        for id in ["b", "c", "d"] {
            b.apply(&kill(id, 300, 15));
            b.apply(&die(id, 400));
        }
        let ids: Vec<&str> = b.recent().map(|r| r.container.id.as_str()).collect();
        assert_eq!(ids, ["d", "c", "b"], "newest first, the oldest evicted");
    }

    #[test]
    fn what_holds_a_stop_in_words() {
        assert_eq!(HeldBy::default().describe(), None);
        let task = |tid, wchan: Option<&str>| HeldTask {
            pid: 1,
            tid,
            comm: "app".into(),
            wchan: wchan.map(str::to_string),
            seconds_in_d: 40.0,
            sigkill_pending: false,
            frozen: false,
        };
        let held = HeldBy {
            stuck_tasks: vec![
                task(1, Some("io_schedule")),
                task(2, Some("io_schedule")),
                task(3, None),
            ],
            frozen_tasks: 2,
        };
        assert_eq!(
            held.describe().as_deref(),
            Some("3 task(s) in D (io_schedule) and 2 frozen task(s)")
        );
    }

    fn pending(b: &mut StopBook, id: &str, ms: i64) {
        let container = ContainerInfo {
            id: id.into(),
            ..ContainerInfo::default()
        };
        assert!(b.kill_pending(
            &container,
            Runtime::Containerd,
            wall(ms),
            Duration::from_secs(5)
        ));
    }

    #[test]
    fn containerds_exit_ends_a_stop_seen_in_proc_with_its_exit_code() {
        let mut b = book();
        pending(&mut b, "a", 0);
        assert!(b.evaluate(wall(5_000)).contains(&"a".to_string()));
        let record = b.exited("a", wall(9_000), 137).expect("the stop ended");
        assert_eq!(record.ended_by, Ending::Exited);
        assert_eq!(record.exit_code, Some(137));
        assert!(record.was_stuck);
        assert_eq!(record.duration_seconds, 9.0);
        assert!(b.in_progress().is_empty());
        assert!(b.exited("a", wall(9_000), 137).is_none(), "once");
        assert_eq!(b.recent().count(), 1);
    }

    #[test]
    fn a_stop_dockers_events_saw_ends_only_at_its_die_not_at_the_moby_exit() {
        let mut b = book();
        b.apply(&kill("a", 0, 15));
        assert!(b.exited("a", wall(100), 143).is_none());
        assert_eq!(b.in_progress().len(), 1);
        let record = completed(b.apply(&die("a", 100)));
        assert_eq!(record.ended_by, Ending::Died);
        assert_eq!(b.recent().count(), 1, "one stop, not two");
    }

    #[test]
    fn an_exit_after_the_kill_landed_adds_the_exit_code() {
        let mut b = book();
        pending(&mut b, "a", 0);
        let landed = b.kills_landed(&BTreeSet::new(), wall(2_000));
        assert_eq!(landed.len(), 1);
        assert!(b.exited("a", wall(2_010), 137).is_none());
        let record = b.recent().next().expect("the stop");
        assert_eq!(record.ended_by, Ending::KillLanded);
        assert_eq!(record.exit_code, Some(137));
    }

    #[test]
    fn a_die_timed_before_its_kill_lasts_zero_seconds() {
        let mut b = book();
        b.apply(&kill("a", 1000, 15));
        assert_eq!(completed(b.apply(&die("a", 0))).duration_seconds, 0.0);
    }
}
