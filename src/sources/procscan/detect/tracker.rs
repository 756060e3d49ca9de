//! How long each task has been continuously in D, across scans.
//!
//! Keyed by (tid, starttime): a reused tid belongs to a task with another starttime, so it
//! cannot inherit its predecessor's clock. Only tasks seen in D are held; a task the current
//! scan did not see in D (it woke, exited, or was not listed) is forgotten at the end of the
//! scan, which restarts its clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub tid: i32,
    pub starttime: u64,
}

#[derive(Debug)]
pub struct Tracked<T> {
    /// The first scan that saw the task in D (of the current uninterrupted run).
    pub d_since: Instant,
    /// Facts about the task that do not change while it lives, read once.
    pub cached: Option<T>,
    /// The first scan that saw SIGKILL pending on it (of the current uninterrupted run).
    pub sigkill_since: Option<Instant>,
    last_scan: u64,
}

#[derive(Debug)]
pub struct DStateTracker<T> {
    tasks: HashMap<TaskKey, Tracked<T>>,
    scan: u64,
}

impl<T> Default for DStateTracker<T> {
    fn default() -> Self {
        DStateTracker {
            tasks: HashMap::new(),
            scan: 0,
        }
    }
}

impl<T> DStateTracker<T> {
    pub fn begin_scan(&mut self) {
        self.scan += 1;
    }

    /// Record that this scan saw the task in D at `now`.
    pub fn observe_d(&mut self, key: TaskKey, now: Instant) -> &mut Tracked<T> {
        let scan = self.scan;
        let tracked = self.tasks.entry(key).or_insert_with(|| Tracked {
            d_since: now,
            cached: None,
            sigkill_since: None,
            last_scan: scan,
        });
        tracked.last_scan = scan;
        tracked
    }

    /// Forget every task this scan did not see in D.
    pub fn end_scan(&mut self) {
        let scan = self.scan;
        self.tasks.retain(|_, t| t.last_scan == scan);
    }
}

impl<T> Tracked<T> {
    pub fn in_d_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.d_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tid: i32, starttime: u64) -> TaskKey {
        TaskKey { tid, starttime }
    }

    fn scan(tracker: &mut DStateTracker<()>, in_d: &[TaskKey], now: Instant) -> Vec<Duration> {
        tracker.begin_scan();
        let durations = in_d
            .iter()
            .map(|k| tracker.observe_d(*k, now).in_d_for(now))
            .collect();
        tracker.end_scan();
        durations
    }

    #[test]
    fn duration_accumulates_while_continuously_in_d() {
        let t0 = Instant::now();
        let mut tracker = DStateTracker::default();
        assert_eq!(scan(&mut tracker, &[key(7, 100)], t0), [Duration::ZERO]);
        let later = t0 + Duration::from_secs(40);
        assert_eq!(
            scan(&mut tracker, &[key(7, 100)], later),
            [Duration::from_secs(40)]
        );
    }

    #[test]
    fn leaving_d_restarts_the_clock() {
        let t0 = Instant::now();
        let mut tracker = DStateTracker::default();
        scan(&mut tracker, &[key(7, 100)], t0);
        scan(&mut tracker, &[], t0 + Duration::from_secs(10));
        assert_eq!(tracker.tasks.len(), 0);
        let t2 = t0 + Duration::from_secs(20);
        assert_eq!(scan(&mut tracker, &[key(7, 100)], t2), [Duration::ZERO]);
    }

    #[test]
    fn reused_tid_with_other_starttime_starts_its_own_clock() {
        let t0 = Instant::now();
        let mut tracker = DStateTracker::default();
        scan(&mut tracker, &[key(7, 100)], t0);
        let t1 = t0 + Duration::from_secs(60);
        // Same tid, new task: no 60 s inherited, and the old entry is dropped.
        assert_eq!(scan(&mut tracker, &[key(7, 900)], t1), [Duration::ZERO]);
        assert_eq!(tracker.tasks.len(), 1);
    }

    #[test]
    fn cached_facts_live_as_long_as_the_entry() {
        let t0 = Instant::now();
        let mut tracker: DStateTracker<&str> = DStateTracker::default();
        tracker.begin_scan();
        tracker.observe_d(key(1, 1), t0).cached = Some("cgroup");
        tracker.end_scan();
        tracker.begin_scan();
        assert_eq!(tracker.observe_d(key(1, 1), t0).cached, Some("cgroup"));
        tracker.end_scan();
        tracker.begin_scan();
        tracker.end_scan();
        tracker.begin_scan();
        assert_eq!(tracker.observe_d(key(1, 1), t0).cached, None);
    }
}
