//! Kubernetes Events from what the snapshot shows: incidents opened and closed (a runtime
//! stall opens one), OOM kills of `runc:[2:INIT]` and of containers, hung-task reports,
//! stuck container stops, container tasks stuck in D. On the Node, or on the Pod when the
//! evidence names one. Pure: drafts from a snapshot, a ledger of what was sent, a rate
//! limit and series; the publisher makes the calls.
//!
//! - Each draft has a key built from the ids hangwatch already keeps (incident id, kernel
//!   record seq and timestamp, container id and stop start, task id): the ledger of keys
//!   sent is saved in `state_dir`, so a restart sends nothing twice. The event's name is
//!   derived from its key, so a create that timed out but landed answers 409 on the retry
//!   instead of making a second object.
//! - Series as kubelet's: a repeat of the same reason on the same object within
//!   `series_window` patches the existing Event's `count`, `lastTimestamp` and `message`.
//! - At most `max_per_minute` creates or updates a minute; the rest are dropped and counted.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::book::rfc3339;
use crate::domain::{OomVictim, Scope};
use crate::engine::Snapshot;
use crate::sources::kernel::KernelSection;
use crate::sources::lifecycle::StopsSection;
use crate::sources::procscan::ProcScanSection;

/// Keys remembered at most: far more than the snapshot can show at once (incidents kept,
/// the kernel event ring, stops and stuck tasks).
const LEDGER_CAPACITY: usize = 4096;
/// Drafts waiting for the API server at most; older ones are dropped first.
pub const QUEUE_CAPACITY: usize = 64;
/// The API server refuses longer messages.
const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Involved {
    Node,
    Pod {
        namespace: String,
        name: String,
        uid: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub key: String,
    pub object: Involved,
    pub reason: &'static str,
    pub message: String,
    pub event_type: EventType,
}

/// Every event the snapshot shows, sent or not.
pub fn drafts(snapshot: &Snapshot) -> Vec<Draft> {
    let mut out = Vec::new();
    for incident in snapshot.incidents.iter() {
        out.push(Draft {
            key: format!("incident:{}:opened", incident.id),
            object: Involved::Node,
            reason: "RuntimeIncidentOpened",
            message: format!(
                "{} stalled: {} (incident {})",
                incident.runtime.daemon_name(),
                incident.suspected_cause,
                incident.id
            ),
            event_type: EventType::Warning,
        });
        if let Some(ended) = incident.ended_at {
            let lasted = ended
                .duration_since(incident.started_at)
                .unwrap_or_default()
                .as_secs();
            out.push(Draft {
                key: format!("incident:{}:closed", incident.id),
                object: Involved::Node,
                reason: "RuntimeIncidentClosed",
                message: format!(
                    "incident {} closed after {lasted}s: {}",
                    incident.id, incident.suspected_cause
                ),
                event_type: EventType::Normal,
            });
        }
    }
    if let Some(kernel) = snapshot.section::<KernelSection>() {
        for recent in &kernel.0.events {
            let event = &recent.event;
            let key = format!("kmsg:{}:{}", event.ts_usec, event.seq);
            let pod = pod_of(
                event.namespace.as_deref(),
                event.pod.as_deref(),
                event.owner.as_ref().and_then(|o| o.pod_uid.as_deref()),
            );
            if let Some(oom) = &event.oom {
                let (object, reason) = match (oom.victim, pod) {
                    (OomVictim::RuncInit, _) => (Involved::Node, "RuncInitOOMKilled"),
                    (OomVictim::Runtime, _) => (Involved::Node, "RuntimeOOMKilled"),
                    (OomVictim::Container, Some(pod)) => (pod, "ContainerOOMKilled"),
                    (OomVictim::Container | OomVictim::Host, _) => continue,
                };
                out.push(Draft {
                    key,
                    object,
                    reason,
                    message: event.message.clone(),
                    event_type: EventType::Warning,
                });
            } else if event.rule == "hung_task" {
                out.push(Draft {
                    key,
                    object: pod.unwrap_or(Involved::Node),
                    reason: "HungTaskReported",
                    message: event.message.clone(),
                    event_type: EventType::Warning,
                });
            }
        }
    }
    if let Some(stops) = snapshot.section::<StopsSection>() {
        for stop in stops.0.in_progress.iter().filter(|s| s.stuck) {
            let c = &stop.container;
            let started = stop
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            let held = stop
                .held_by
                .as_ref()
                .and_then(|h| h.describe())
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            out.push(Draft {
                key: format!("stop:{}:{started}", c.id),
                object: pod_of(
                    c.namespace.as_deref(),
                    c.pod.as_deref(),
                    c.pod_uid.as_deref(),
                )
                .unwrap_or(Involved::Node),
                reason: "ContainerStopStuck",
                message: format!(
                    "stop of container {} has no exit{held}",
                    c.name.as_deref().unwrap_or(&c.id)
                ),
                event_type: EventType::Warning,
            });
        }
    }
    if let Some(scan) = snapshot.section::<ProcScanSection>() {
        let view = &scan.0;
        for task in view
            .report
            .stuck_tasks
            .iter()
            .filter(|t| t.scope == Scope::Container)
        {
            let Some(id) = task.owner.container_id.as_deref() else {
                continue;
            };
            let info = view.containers.get(id);
            let Some(pod) = info.and_then(|i| {
                pod_of(
                    i.namespace.as_deref(),
                    i.pod.as_deref(),
                    i.pod_uid.as_deref(),
                )
            }) else {
                continue;
            };
            out.push(Draft {
                key: format!("dstate:{id}:{}", task.tid),
                object: pod,
                reason: "TaskStuckInD",
                message: format!(
                    "{} (tid {}) of container {} in D in {} for {:.0}s",
                    task.comm,
                    task.tid,
                    view.container_label(id),
                    task.wchan.as_deref().unwrap_or("?"),
                    task.seconds_in_d
                ),
                event_type: EventType::Warning,
            });
        }
    }
    out
}

fn pod_of(namespace: Option<&str>, name: Option<&str>, uid: Option<&str>) -> Option<Involved> {
    Some(Involved::Pod {
        namespace: namespace?.to_string(),
        name: name?.to_string(),
        uid: uid.map(str::to_string),
    })
}

/// An Event already on the API server that repeats update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    pub namespace: String,
    pub name: String,
    pub count: u64,
    #[serde(with = "humantime_serde")]
    pub last: SystemTime,
}

/// What was sent: saved in `state_dir` after each event.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    /// Oldest first.
    sent: VecDeque<String>,
    /// (object, reason) → the Event a repeat updates.
    series: BTreeMap<String, Series>,
    #[serde(skip)]
    index: HashSet<String>,
}

impl Ledger {
    pub fn from_json(bytes: &[u8]) -> Option<Ledger> {
        let mut ledger: Ledger = serde_json::from_slice(bytes).ok()?;
        ledger.index = ledger.sent.iter().cloned().collect();
        Some(ledger)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains(key)
    }

    pub fn mark(&mut self, key: &str) {
        if self.index.insert(key.to_string()) {
            self.sent.push_back(key.to_string());
            while self.sent.len() > LEDGER_CAPACITY {
                if let Some(old) = self.sent.pop_front() {
                    self.index.remove(&old);
                }
            }
        }
    }

    pub fn series(&self, id: &str) -> Option<&Series> {
        self.series.get(id)
    }

    pub fn set_series(&mut self, id: String, series: Series, window: Duration) {
        let now = series.last;
        self.series.insert(id, series);
        // Series past their window will never be updated again.
        self.series
            .retain(|_, s| now.duration_since(s.last).unwrap_or_default() <= window);
    }
}

/// The series an event belongs to: same object, same reason.
pub fn series_id(draft: &Draft) -> String {
    match &draft.object {
        Involved::Node => format!("node/{}", draft.reason),
        Involved::Pod {
            namespace, name, ..
        } => format!("pod/{namespace}/{name}/{}", draft.reason),
    }
}

/// `(namespace, object name)` of the Event: Node events live in `default`, as kubelet's do.
pub fn placement<'a>(object: &'a Involved, node: &'a str) -> (&'a str, &'a str) {
    match object {
        Involved::Node => ("default", node),
        Involved::Pod {
            namespace, name, ..
        } => (namespace, name),
    }
}

/// The Event's name: the object's name and a hash of the key (stable across retries and
/// restarts), within the 253 characters of a name.
pub fn event_name(draft: &Draft, node: &str) -> String {
    let (_, object) = placement(&draft.object, node);
    let hash = xxhash_rust::xxh3::xxh3_64(draft.key.as_bytes());
    let prefix: String = object.chars().take(200).collect();
    format!("{prefix}.hangwatch.{hash:016x}")
}

fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE_BYTES - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

/// A core/v1 Event for `draft`, first seen at `now`.
pub fn event_body(draft: &Draft, node: &str, now: SystemTime) -> Value {
    let (namespace, _) = placement(&draft.object, node);
    let involved = match &draft.object {
        Involved::Node => json!({"apiVersion": "v1", "kind": "Node", "name": node, "uid": node}),
        Involved::Pod {
            namespace,
            name,
            uid,
        } => {
            let mut pod =
                json!({"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name});
            if let Some(uid) = uid {
                pod["uid"] = json!(uid);
            }
            pod
        }
    };
    json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": event_name(draft, node), "namespace": namespace},
        "involvedObject": involved,
        "reason": draft.reason,
        "message": bounded(&draft.message),
        "type": match draft.event_type {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        },
        "source": {"component": "hangwatch", "host": node},
        "reportingComponent": "hangwatch",
        "reportingInstance": node,
        "firstTimestamp": rfc3339(now),
        "lastTimestamp": rfc3339(now),
        "count": 1,
    })
}

/// The patch of a repeat: kubelet's series update.
pub fn repeat_patch(draft: &Draft, count: u64, now: SystemTime) -> Value {
    json!({"count": count, "lastTimestamp": rfc3339(now), "message": bounded(&draft.message)})
}

/// A token bucket: `per_minute` tokens, refilled continuously.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: f64,
    tokens: f64,
    at: Option<SystemTime>,
}

impl RateLimit {
    pub fn new(per_minute: u32) -> RateLimit {
        RateLimit {
            per_minute: f64::from(per_minute),
            tokens: f64::from(per_minute),
            at: None,
        }
    }

    pub fn take(&mut self, now: SystemTime) -> bool {
        if let Some(at) = self.at {
            let elapsed = now.duration_since(at).unwrap_or_default().as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_minute / 60.0).min(self.per_minute);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(key: &str, object: Involved) -> Draft {
        Draft {
            key: key.into(),
            object,
            reason: "RuncInitOOMKilled",
            message: "Memory cgroup out of memory: Killed process 1 (runc:[2:INIT])".into(),
            event_type: EventType::Warning,
        }
    }

    #[test]
    fn names_are_stable_and_node_events_live_in_default() {
        let d = draft("kmsg:1:2", Involved::Node);
        assert_eq!(event_name(&d, "n1"), event_name(&d.clone(), "n1"));
        assert_ne!(
            event_name(&d, "n1"),
            event_name(&draft("kmsg:1:3", Involved::Node), "n1")
        );
        let body = event_body(&d, "n1", SystemTime::UNIX_EPOCH);
        assert_eq!(body["metadata"]["namespace"], "default");
        assert_eq!(body["involvedObject"]["kind"], "Node");
        let pod = Involved::Pod {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: Some("u-1".into()),
        };
        let body = event_body(&draft("stop:x:1", pod), "n1", SystemTime::UNIX_EPOCH);
        assert_eq!(body["metadata"]["namespace"], "shop");
        assert_eq!(body["involvedObject"]["namespace"], "shop");
        assert_eq!(body["involvedObject"]["uid"], "u-1");
        let long = Draft {
            message: "é".repeat(2000),
            ..draft("k", Involved::Node)
        };
        assert!(
            event_body(&long, "n1", SystemTime::UNIX_EPOCH)["message"]
                .as_str()
                .is_some_and(|m| m.len() <= MAX_MESSAGE_BYTES)
        );
    }

    #[test]
    fn the_ledger_survives_a_round_trip_and_forgets_the_oldest() {
        let mut ledger = Ledger::default();
        for i in 0..LEDGER_CAPACITY + 10 {
            ledger.mark(&format!("k{i}"));
        }
        assert!(!ledger.contains("k0"));
        assert!(ledger.contains(&format!("k{}", LEDGER_CAPACITY + 9)));
        let read = Ledger::from_json(&ledger.to_json()).expect("json");
        assert!(read.contains("k10"));
        assert!(!read.contains("k9"));
        assert!(Ledger::from_json(b"garbage").is_none());
    }

    #[test]
    fn the_rate_limit_refills_over_a_minute() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut limit = RateLimit::new(2);
        assert!(limit.take(t0));
        assert!(limit.take(t0));
        assert!(!limit.take(t0));
        assert!(limit.take(t0 + Duration::from_secs(30)));
        assert!(!limit.take(t0 + Duration::from_secs(31)));
    }
}
