//! Liveness of hangwatch's own loops, for `/healthz`: each loop beats; a loop that has not
//! beaten within its budget is reported stale.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Heartbeats {
    epoch: Instant,
    loops: Arc<Mutex<Vec<Arc<Beat>>>>,
}

#[derive(Debug)]
struct Beat {
    name: String,
    budget: Duration,
    last_ms: AtomicU64,
}

/// A loop's handle: call `beat()` once per iteration.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    epoch: Instant,
    beat: Arc<Beat>,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.beat
            .last_ms
            .store(millis_since(self.epoch), Ordering::Relaxed);
    }
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// A loop that missed its budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleLoop {
    pub name: String,
    pub silent_for: Duration,
    pub budget: Duration,
}

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats {
            epoch: Instant::now(),
            loops: Arc::default(),
        }
    }
}

impl Heartbeats {
    /// Register a loop that promises to beat at least once per `budget`. It counts as having
    /// beaten at registration.
    pub fn register(&self, name: impl Into<String>, budget: Duration) -> Heartbeat {
        let beat = Arc::new(Beat {
            name: name.into(),
            budget,
            last_ms: AtomicU64::new(millis_since(self.epoch)),
        });
        self.loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(beat.clone());
        Heartbeat {
            epoch: self.epoch,
            beat,
        }
    }

    pub fn stale(&self) -> Vec<StaleLoop> {
        let now = millis_since(self.epoch);
        self.loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter_map(|b| {
                let silent_for =
                    Duration::from_millis(now.saturating_sub(b.last_ms.load(Ordering::Relaxed)));
                (silent_for > b.budget).then(|| StaleLoop {
                    name: b.name.clone(),
                    silent_for,
                    budget: b.budget,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_loop_is_not_stale_and_silent_loop_is() {
        let hb = Heartbeats::default();
        let quick = hb.register("quick", Duration::from_millis(20));
        let slow = hb.register("slow", Duration::from_secs(60));
        assert!(hb.stale().is_empty());
        std::thread::sleep(Duration::from_millis(40));
        slow.beat();
        let stale = hb.stale();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].name, "quick");
        quick.beat();
        assert!(hb.stale().is_empty());
    }
}
