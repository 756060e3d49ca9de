//! When a stall may trigger a goroutine dump: a cooldown and a cap per hour, per daemon, so a
//! flapping runtime is not signalled over and over.

use crate::domain::Runtime;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Within the cooldown since the last dump of this daemon.
    Cooldown,
    /// The hourly cap is reached.
    HourlyCap,
}

#[derive(Debug)]
pub struct DumpPolicy {
    cooldown: Duration,
    max_per_hour: u32,
    sent: HashMap<Runtime, VecDeque<Instant>>,
}

impl DumpPolicy {
    pub fn new(cooldown: Duration, max_per_hour: u32) -> DumpPolicy {
        DumpPolicy {
            cooldown,
            max_per_hour,
            sent: HashMap::new(),
        }
    }

    /// Decide for `daemon` at `now`; an allowed dump is recorded as sent.
    pub fn decide(&mut self, daemon: Runtime, now: Instant) -> Decision {
        let sent = self.sent.entry(daemon).or_default();
        while sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= HOUR)
        {
            sent.pop_front();
        }
        if sent
            .back()
            .is_some_and(|last| now.saturating_duration_since(*last) < self.cooldown)
        {
            return Decision::Cooldown;
        }
        if sent.len() >= self.max_per_hour as usize {
            return Decision::HourlyCap;
        }
        sent.push_back(now);
        Decision::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_per_daemon() {
        let t0 = Instant::now();
        let mut p = DumpPolicy::new(Duration::from_secs(600), 3);
        assert_eq!(p.decide(Runtime::Docker, t0), Decision::Allow);
        assert_eq!(p.decide(Runtime::Containerd, t0), Decision::Allow);
        assert_eq!(
            p.decide(Runtime::Docker, t0 + Duration::from_secs(599)),
            Decision::Cooldown
        );
        assert_eq!(
            p.decide(Runtime::Docker, t0 + Duration::from_secs(600)),
            Decision::Allow
        );
    }

    #[test]
    fn hourly_cap_then_window_slides() {
        let t0 = Instant::now();
        let mut p = DumpPolicy::new(Duration::from_secs(60), 2);
        assert_eq!(p.decide(Runtime::Docker, t0), Decision::Allow);
        assert_eq!(
            p.decide(Runtime::Docker, t0 + Duration::from_secs(60)),
            Decision::Allow
        );
        assert_eq!(
            p.decide(Runtime::Docker, t0 + Duration::from_secs(120)),
            Decision::HourlyCap
        );
        assert_eq!(
            p.decide(Runtime::Docker, t0 + Duration::from_secs(3600)),
            Decision::Allow
        );
    }
}
