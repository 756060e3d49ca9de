//! The conditions hangwatch owns on its Node, as it believes they stand there: read back at
//! start, changed by the detectors' opinions, patched when they change and on every
//! heartbeat. Pure: times are passed in.
//!
//! - `lastTransitionTime` moves only when the status flips (True <-> False), never on a new
//!   reason or message, never on a heartbeat.
//! - A condition read back from the node keeps its status and transition time until the
//!   detectors have an opinion: a restart during an outage does not flap it to healthy.
//! - With a hold-down, a problem clears only after its cause has been gone that long.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::conditions::{ConditionKind, Opinion};
use crate::config::{ConditionConfig, NodeStatusConfig, Polarity};

/// One owned condition as last decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub problem: bool,
    pub reason: String,
    pub message: String,
    pub last_transition: SystemTime,
}

#[derive(Debug, Clone)]
struct Owned {
    kind: ConditionKind,
    type_name: String,
    polarity: Polarity,
    held: Option<Held>,
    /// Since when the detectors have said "healthy" while the condition still holds the
    /// problem (the hold-down's clock).
    healthy_since: Option<SystemTime>,
}

#[derive(Debug)]
pub struct ConditionBook {
    owned: Vec<Owned>,
    hold_down: Duration,
    heartbeat_period: Duration,
    /// The node's conditions were read back: until then nothing is patched, so a restart
    /// never overwrites what is there with a guess.
    adopted: bool,
    /// Something changed since the last successful patch.
    dirty: bool,
    last_patched: Option<SystemTime>,
}

fn kind_config(config: &NodeStatusConfig, kind: ConditionKind) -> &ConditionConfig {
    match kind {
        ConditionKind::RuntimeUnhealthy => &config.runtime_unhealthy,
        ConditionKind::TasksStuck => &config.tasks_stuck,
        ConditionKind::StopStuck => &config.stop_stuck,
    }
}

/// `status` as the API spells it for a problem that holds or not, under `polarity`.
fn api_status(problem: bool, polarity: Polarity) -> &'static str {
    let true_means_problem = polarity == Polarity::Problem;
    if problem == true_means_problem {
        "True"
    } else {
        "False"
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl ConditionBook {
    pub fn new(config: &NodeStatusConfig) -> ConditionBook {
        let owned = ConditionKind::ALL
            .into_iter()
            .filter_map(|kind| {
                let c = kind_config(config, kind);
                c.enabled.then(|| Owned {
                    kind,
                    type_name: c.type_name.clone(),
                    polarity: c.polarity,
                    held: None,
                    healthy_since: None,
                })
            })
            .collect();
        ConditionBook {
            owned,
            hold_down: config.hold_down,
            heartbeat_period: config.heartbeat_period,
            adopted: false,
            dirty: false,
            last_patched: None,
        }
    }

    pub fn kinds(&self) -> impl Iterator<Item = ConditionKind> + '_ {
        self.owned.iter().map(|o| o.kind)
    }

    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    pub fn held(&self, kind: ConditionKind) -> Option<&Held> {
        self.owned
            .iter()
            .find(|o| o.kind == kind)
            .and_then(|o| o.held.as_ref())
    }

    /// Take over the owned conditions found in the node's `status.conditions`, as read at
    /// start. Others' conditions are not looked at. A condition without a parseable
    /// transition time gets `now`.
    pub fn adopt(&mut self, conditions: &[Value], now: SystemTime) {
        for owned in &mut self.owned {
            let Some(found) = conditions
                .iter()
                .find(|c| c["type"].as_str() == Some(owned.type_name.as_str()))
            else {
                continue;
            };
            let problem = match found["status"].as_str() {
                Some("True") => owned.polarity == Polarity::Problem,
                Some("False") => owned.polarity == Polarity::Healthy,
                // Unknown: no opinion on the node either; the detectors will decide.
                _ => continue,
            };
            let last_transition = found["lastTransitionTime"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .unwrap_or(now);
            owned.held = Some(Held {
                problem,
                reason: found["reason"].as_str().unwrap_or_default().to_string(),
                message: found["message"].as_str().unwrap_or_default().to_string(),
                last_transition,
            });
        }
        self.adopted = true;
        // The first patch after a restart refreshes the heartbeat at once.
        self.dirty = true;
    }

    /// Apply the detectors' opinion on `kind` at `now`. None (no opinion yet) keeps the
    /// condition as it is.
    pub fn observe(&mut self, kind: ConditionKind, opinion: Option<Opinion>, now: SystemTime) {
        let hold_down = self.hold_down;
        let Some(owned) = self.owned.iter_mut().find(|o| o.kind == kind) else {
            return;
        };
        let Some(opinion) = opinion else {
            return;
        };
        let next = match &owned.held {
            None => Some(Held {
                problem: opinion.problem,
                reason: opinion.reason,
                message: opinion.message,
                last_transition: now,
            }),
            Some(held) if held.problem == opinion.problem => {
                owned.healthy_since = None;
                (held.reason != opinion.reason || held.message != opinion.message).then(|| Held {
                    reason: opinion.reason,
                    message: opinion.message,
                    ..held.clone()
                })
            }
            Some(held) if held.problem => {
                // Clearing: only once the cause has been gone for the hold-down.
                let since = *owned.healthy_since.get_or_insert(now);
                let gone_for = now.duration_since(since).unwrap_or_default();
                (gone_for >= hold_down).then_some(Held {
                    problem: false,
                    reason: opinion.reason,
                    message: opinion.message,
                    last_transition: now,
                })
            }
            Some(_) => Some(Held {
                problem: true,
                reason: opinion.reason,
                message: opinion.message,
                last_transition: now,
            }),
        };
        if let Some(next) = next {
            if !next.problem
                || owned
                    .held
                    .as_ref()
                    .is_none_or(|h| h.problem != next.problem)
            {
                owned.healthy_since = None;
            }
            owned.held = Some(next);
            self.dirty = true;
        }
    }

    /// Whether a patch is due at `now`: something changed, or the heartbeat period passed.
    pub fn patch_due(&self, now: SystemTime) -> bool {
        if !self.adopted || self.owned.iter().all(|o| o.held.is_none()) {
            return false;
        }
        self.dirty
            || self.last_patched.is_none_or(|at| {
                now.duration_since(at).unwrap_or_default() >= self.heartbeat_period
            })
    }

    /// When the next heartbeat is due, if any.
    pub fn next_heartbeat(&self) -> Option<SystemTime> {
        self.last_patched.map(|at| at + self.heartbeat_period)
    }

    /// The strategic-merge patch of `status.conditions` (a list merged by `type`): only the
    /// owned conditions, each with `lastHeartbeatTime` = `now`.
    pub fn patch(&self, now: SystemTime) -> Value {
        let conditions: Vec<Value> = self
            .owned
            .iter()
            .filter_map(|o| {
                o.held.as_ref().map(|held| {
                    json!({
                        "type": o.type_name,
                        "status": api_status(held.problem, o.polarity),
                        "reason": held.reason,
                        "message": held.message,
                        "lastHeartbeatTime": rfc3339(now),
                        "lastTransitionTime": rfc3339(held.last_transition),
                    })
                })
            })
            .collect();
        json!({"status": {"conditions": conditions}})
    }

    /// The patch made at `at` was accepted: nothing is pending until the next change or
    /// heartbeat. A change observed while the patch was in flight was in it or is still
    /// dirty, because the caller builds the patch and observes on the same task.
    pub fn patched(&mut self, at: SystemTime) {
        self.dirty = false;
        self.last_patched = Some(at);
    }

    pub fn has_pending_change(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn problem(reason: &str) -> Option<Opinion> {
        Some(Opinion {
            problem: true,
            reason: reason.into(),
            message: format!("{reason} message"),
        })
    }

    fn healthy() -> Option<Opinion> {
        Some(Opinion {
            problem: false,
            reason: "ContainerRuntimeHealthy".into(),
            message: "ok".into(),
        })
    }

    fn book(hold_down: u64) -> ConditionBook {
        let config = NodeStatusConfig {
            hold_down: Duration::from_secs(hold_down),
            heartbeat_period: Duration::from_secs(300),
            ..NodeStatusConfig::default()
        };
        let mut book = ConditionBook::new(&config);
        book.adopt(&[], t(0));
        book
    }

    const RUNTIME: ConditionKind = ConditionKind::RuntimeUnhealthy;

    fn condition(book: &ConditionBook, now: SystemTime, type_name: &str) -> Value {
        book.patch(now)["status"]["conditions"]
            .as_array()
            .expect("list")
            .iter()
            .find(|c| c["type"] == type_name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut book = book(0);
        assert!(!book.patch_due(t(0)), "nothing to say before any opinion");
        book.observe(RUNTIME, healthy(), t(1));
        assert!(book.patch_due(t(1)));
        book.patched(t(1));
        book.observe(RUNTIME, problem("DockerdWedged"), t(10));
        book.observe(RUNTIME, problem("DockerdHung"), t(20));
        let c = condition(&book, t(20), "ContainerRuntimeUnhealthy");
        assert_eq!(c["status"], "True");
        assert_eq!(c["reason"], "DockerdHung");
        assert_eq!(c["lastTransitionTime"], rfc3339(t(10)));
        assert_eq!(c["lastHeartbeatTime"], rfc3339(t(20)));
        book.patched(t(20));
        assert!(!book.patch_due(t(100)));
        assert!(book.patch_due(t(320)), "heartbeat after the period");
        let c = condition(&book, t(320), "ContainerRuntimeUnhealthy");
        assert_eq!(c["lastTransitionTime"], rfc3339(t(10)));
        book.observe(RUNTIME, healthy(), t(400));
        let c = condition(&book, t(400), "ContainerRuntimeUnhealthy");
        assert_eq!(c["status"], "False");
        assert_eq!(c["lastTransitionTime"], rfc3339(t(400)));
    }

    #[test]
    fn a_condition_read_back_is_kept_until_the_detectors_have_an_opinion() {
        let config = NodeStatusConfig::default();
        let mut book = ConditionBook::new(&config);
        assert!(!book.patch_due(t(0)));
        book.adopt(
            &[
                json!({"type": "Ready", "status": "True"}),
                json!({"type": "ContainerRuntimeUnhealthy", "status": "True",
                       "reason": "DockerdHung", "message": "dockerd blocked",
                       "lastTransitionTime": "2027-01-15T08:00:00Z"}),
            ],
            t(0),
        );
        book.observe(RUNTIME, None, t(5));
        let c = condition(&book, t(5), "ContainerRuntimeUnhealthy");
        assert_eq!(c["status"], "True");
        assert_eq!(c["reason"], "DockerdHung");
        assert_eq!(c["lastTransitionTime"], "2027-01-15T08:00:00Z");
        assert_eq!(condition(&book, t(5), "Ready"), Value::Null, "never Ready");
        book.observe(RUNTIME, problem("DockerdHung"), t(15));
        let c = condition(&book, t(15), "ContainerRuntimeUnhealthy");
        assert_eq!(c["lastTransitionTime"], "2027-01-15T08:00:00Z");
    }

    #[test]
    fn hold_down_delays_clearing_and_a_relapse_restarts_it() {
        let mut book = book(60);
        book.observe(RUNTIME, problem("DockerdHung"), t(0));
        book.observe(RUNTIME, healthy(), t(10));
        book.observe(RUNTIME, healthy(), t(50));
        assert_eq!(book.held(RUNTIME).map(|h| h.problem), Some(true));
        book.observe(RUNTIME, problem("DockerdHung"), t(55));
        book.observe(RUNTIME, healthy(), t(60));
        book.observe(RUNTIME, healthy(), t(110));
        assert_eq!(book.held(RUNTIME).map(|h| h.problem), Some(true));
        book.observe(RUNTIME, healthy(), t(120));
        let held = book.held(RUNTIME).expect("held");
        assert!(!held.problem);
        assert_eq!(held.last_transition, t(120));
    }

    #[test]
    fn positive_polarity_says_false_for_a_problem() {
        let mut config = NodeStatusConfig::default();
        config.runtime_unhealthy.type_name = "ContainerRuntimeReady".into();
        config.runtime_unhealthy.polarity = Polarity::Healthy;
        let mut book = ConditionBook::new(&config);
        book.adopt(
            &[json!({"type": "ContainerRuntimeReady", "status": "True"})],
            t(0),
        );
        assert_eq!(book.held(RUNTIME).map(|h| h.problem), Some(false));
        book.observe(RUNTIME, problem("ContainerdHung"), t(1));
        let c = condition(&book, t(1), "ContainerRuntimeReady");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "ContainerdHung");
    }

    #[test]
    fn disabled_conditions_are_neither_owned_nor_patched() {
        let mut config = NodeStatusConfig::default();
        config.stop_stuck.enabled = false;
        let mut book = ConditionBook::new(&config);
        book.adopt(&[], t(0));
        for kind in ConditionKind::ALL {
            book.observe(kind, problem("X"), t(1));
        }
        assert_eq!(book.kinds().count(), 2);
        assert_eq!(condition(&book, t(1), "ContainerStopStuck"), Value::Null);
    }
}
