//! The engine's view of the kernel log: a bounded ring of recent events (served at
//! `/events`), the conditions holding, and whether the log can be read.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::containers::ContainerDirectory;
use crate::detectors::kernel::{KernelConditions, KernelEvent, LogSource};

/// A kernel event with the wall-clock time it was logged.
#[derive(Debug, Clone, Serialize)]
pub struct RecentKernelEvent {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    #[serde(flatten)]
    pub event: KernelEvent,
}

/// A condition rule that currently holds (e.g. a filesystem remounted read-only).
#[derive(Debug, Clone, Serialize)]
pub struct ConditionStatus {
    pub rule: String,
    pub since_seconds: f64,
    pub matches: u64,
    pub message: String,
}

/// What `/status`, `/events` and `check` show about the kernel log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelStatus {
    /// None until the detector first reported.
    pub up: Option<bool>,
    /// The interface being read while up.
    pub source: Option<LogSource>,
    pub error: Option<String>,
    pub records_read: u64,
    pub records_lost: u64,
    pub records_ignored: u64,
    pub records_malformed: u64,
    pub conditions: Vec<ConditionStatus>,
    /// Newest first; served at `/events`, not in `/status`.
    #[serde(skip)]
    pub events: Vec<RecentKernelEvent>,
}

#[derive(Debug)]
pub struct KernelState {
    recent: VecDeque<RecentKernelEvent>,
    capacity: usize,
    conditions: KernelConditions,
    pub status: KernelStatus,
}

impl KernelState {
    pub fn new(capacity: usize) -> KernelState {
        KernelState {
            recent: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            conditions: KernelConditions::default(),
            status: KernelStatus::default(),
        }
    }

    /// Keep `event` (logged at `at`) in the ring and note it if it is a condition.
    pub fn record(&mut self, event: KernelEvent, at: SystemTime, now: Instant) {
        self.conditions.observe(&event, now);
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back(RecentKernelEvent { at, event });
    }

    /// Fill container names, pods and namespaces the directory has learnt since. Returns
    /// whether anything changed.
    pub fn enrich(&mut self, directory: &ContainerDirectory) -> bool {
        let mut changed = false;
        for recent in self.recent.iter_mut() {
            changed |= enrich_event(&mut recent.event, directory);
        }
        changed
    }

    /// The conditions holding at `now`, by rule.
    pub fn active_conditions(&mut self, now: Instant) -> Vec<ConditionStatus> {
        self.conditions
            .active(now)
            .iter()
            .map(|(rule, c)| ConditionStatus {
                rule: rule.clone(),
                since_seconds: now.saturating_duration_since(c.since).as_secs_f64(),
                matches: c.matches,
                message: c.message.clone(),
            })
            .collect()
    }

    /// The status with the ring copied in, newest first.
    pub fn status(&mut self, now: Instant) -> KernelStatus {
        let mut status = self.status.clone();
        status.conditions = self.active_conditions(now);
        status.events = self.recent.iter().rev().cloned().collect();
        status
    }
}

/// Names for the event's container from the directory, when it has them.
pub fn enrich_event(event: &mut KernelEvent, directory: &ContainerDirectory) -> bool {
    if event.container_name.is_some() {
        return false;
    }
    let Some(info) = event
        .owner
        .as_ref()
        .and_then(|o| o.container_id.as_deref())
        .and_then(|id| directory.get(id))
    else {
        return false;
    };
    event.container_name.clone_from(&info.name);
    event.pod.clone_from(&info.pod);
    event.namespace.clone_from(&info.namespace);
    true
}

/// The wall-clock time of a kernel timestamp (microseconds since boot on the printk clock,
/// which like CLOCK_MONOTONIC stops during suspend).
pub fn kernel_time_to_wall(ts_usec: u64) -> SystemTime {
    let now_wall = SystemTime::now();
    let Ok(monotonic) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) else {
        return now_wall;
    };
    let since_boot = Duration::from(monotonic);
    let age = since_boot.saturating_sub(Duration::from_micros(ts_usec));
    now_wall.checked_sub(age).unwrap_or(now_wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recent_timestamp_is_close_to_now_and_an_old_one_is_earlier() {
        let since_boot = Duration::from(
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock"),
        );
        let now = SystemTime::now();
        let recent = kernel_time_to_wall(since_boot.as_micros() as u64);
        let drift = now.duration_since(recent).unwrap_or_default();
        assert!(drift < Duration::from_secs(1), "{drift:?}");
        let older = kernel_time_to_wall(
            since_boot
                .saturating_sub(Duration::from_secs(60))
                .as_micros() as u64,
        );
        let age = now.duration_since(older).unwrap_or_default();
        assert!(
            age >= Duration::from_secs(59) && age < Duration::from_secs(61),
            "{age:?}"
        );
    }
}
