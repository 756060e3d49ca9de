//! Which `condition` rules hold: a condition holds from its first match until `clear_after`
//! has passed without another, or for good when the rule has no `clear_after`. Pure: the
//! engine owns one and feeds it events and the time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::event::KernelEvent;
use crate::config::RuleKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCondition {
    pub since: Instant,
    pub last_match: Instant,
    pub matches: u64,
    pub clear_after: Option<Duration>,
    /// The latest event's message, as evidence.
    pub message: String,
}

#[derive(Debug, Default)]
pub struct KernelConditions {
    active: BTreeMap<String, ActiveCondition>,
}

impl KernelConditions {
    /// Note an event seen at `now`; events of temporary rules are ignored.
    pub fn observe(&mut self, event: &KernelEvent, now: Instant) {
        if event.kind != RuleKind::Condition {
            return;
        }
        self.clear_expired(now);
        let entry = self
            .active
            .entry(event.rule.clone())
            .or_insert_with(|| ActiveCondition {
                since: now,
                last_match: now,
                matches: 0,
                clear_after: event.clear_after,
                message: String::new(),
            });
        entry.last_match = now;
        entry.matches += 1;
        entry.clear_after = event.clear_after;
        entry.message.clone_from(&event.message);
    }

    /// Drop the conditions whose `clear_after` has passed since their last match.
    pub fn clear_expired(&mut self, now: Instant) {
        self.active.retain(|_, c| {
            c.clear_after
                .is_none_or(|after| now.saturating_duration_since(c.last_match) < after)
        });
    }

    /// The conditions holding at `now`, by rule name.
    pub fn active(&mut self, now: Instant) -> &BTreeMap<String, ActiveCondition> {
        self.clear_expired(now);
        &self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KernelLogConfig, RuleKind};
    use crate::sources::kernel::detect::pipeline::Pipeline;
    use crate::sources::kernel::detect::record::parse_record;

    fn event(line: &str) -> KernelEvent {
        let mut p = Pipeline::new(&KernelLogConfig::default(), &[]).unwrap();
        p.process(&parse_record(line.as_bytes()).unwrap())
            .pop()
            .unwrap()
    }

    #[test]
    fn conditions_hold_until_clear_after_or_for_good() {
        let netdev =
            event("3,1,1,-;unregister_netdevice: waiting for eth0 to become free. Usage count = 1");
        let readonly = event("2,2,2,-;EXT4-fs (sda1): Remounting filesystem read-only");
        let oom = event(
            "3,3,3,-;Out of memory: Killed process 1 (x) total-vm:1kB, anon-rss:1kB, file-rss:0kB",
        );
        assert_eq!(netdev.kind, RuleKind::Condition);
        assert_eq!(oom.kind, RuleKind::Temporary);
        let clear_after = netdev.clear_after.unwrap();

        let t0 = Instant::now();
        let mut c = KernelConditions::default();
        c.observe(&netdev, t0);
        c.observe(&readonly, t0);
        c.observe(&oom, t0);
        assert_eq!(
            c.active(t0).keys().collect::<Vec<_>>(),
            ["fs_readonly", "unregister_netdevice"]
        );
        let later = t0 + clear_after / 2;
        c.observe(&netdev, later);
        assert_eq!(c.active(later)["unregister_netdevice"].matches, 2);
        assert!(
            c.active(t0 + clear_after)
                .contains_key("unregister_netdevice")
        );
        let cleared = later + clear_after;
        assert_eq!(
            c.active(cleared).keys().collect::<Vec<_>>(),
            ["fs_readonly"]
        );
        assert!(
            c.active(cleared + Duration::from_secs(86_400 * 365))
                .contains_key("fs_readonly")
        );
    }
}
