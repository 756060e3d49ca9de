//! Docker's container events as the stop tracker needs them, parsed leniently from the JSON
//! lines of `GET /events`: a line that cannot be understood is reported and skipped, never the
//! end of the stream.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::containers::ContainerInfo;

/// The actions the stream is filtered to: a stop is `kill` (stop signal) → `kill` (9) → `die`
/// → `stop`; `destroy` ends the tracking of a container removed before it died.
pub const ACTIONS: [&str; 4] = ["kill", "die", "stop", "destroy"];

/// kubelet's pod grace period, which it passes to `docker stop` as `t`: the container label
/// cri-dockerd (and dockershim) make of the annotation, and the label kubelet 1.4–1.5 set.
const GRACE_PERIOD_LABELS: [&str; 2] = [
    "annotation.io.kubernetes.pod.terminationGracePeriod",
    "io.kubernetes.pod.terminationGracePeriod",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum ContainerAction {
    /// A signal sent to the container's main process: the stop signal, or 9 for SIGKILL.
    Kill { signal: i32 },
    /// The container's main process exited.
    Die { exit_code: Option<i32> },
    /// `docker stop` returned (after `die`).
    Stop,
    /// The container was removed.
    Destroy,
}

impl ContainerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerAction::Kill { .. } => "kill",
            ContainerAction::Die { .. } => "die",
            ContainerAction::Stop => "stop",
            ContainerAction::Destroy => "destroy",
        }
    }
}

/// One container event from the runtime.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerEvent {
    /// The daemon's wall clock, nanoseconds since the epoch (`timeNano`).
    pub time_nano: i64,
    pub action: ContainerAction,
    /// Id, name, image, pod and namespace from the event's attributes (Docker puts the
    /// container's labels there).
    pub container: ContainerInfo,
    /// kubelet's grace period for the container's pod, when its labels carry it.
    pub stop_timeout: Option<Duration>,
}

impl ContainerEvent {
    pub fn id(&self) -> &str {
        &self.container.id
    }

    pub fn at(&self) -> SystemTime {
        wall_time(self.time_nano)
    }
}

/// Nanoseconds since the epoch as a wall-clock time (times before 1970 are garbage: the epoch).
fn wall_time(time_nano: i64) -> SystemTime {
    u64::try_from(time_nano).map_or(UNIX_EPOCH, |n| UNIX_EPOCH + Duration::from_nanos(n))
}

/// What one line of the stream says.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Event(Box<ContainerEvent>),
    /// Not an event the tracker can use. `time_nano` when the line had one, so the stream's
    /// position still moves past it.
    Malformed {
        reason: String,
        time_nano: Option<i64>,
    },
}

/// The fields of Docker's event message that are read; every one may be missing.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WireEvent {
    #[serde(rename = "Type")]
    kind: Option<String>,
    #[serde(rename = "Action")]
    action: Option<String>,
    #[serde(rename = "Actor")]
    actor: Option<WireActor>,
    time: Option<i64>,
    #[serde(rename = "timeNano")]
    time_nano: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WireActor {
    #[serde(rename = "ID")]
    id: Option<String>,
    #[serde(rename = "Attributes")]
    attributes: Option<HashMap<String, String>>,
}

/// Parse one line of the `/events` stream (without its newline).
pub fn parse_line(line: &[u8]) -> Parsed {
    let wire: WireEvent = match serde_json::from_slice(line) {
        Ok(wire) => wire,
        Err(e) => {
            return Parsed::Malformed {
                reason: format!("not an event: {e}"),
                time_nano: None,
            };
        }
    };
    let time_nano = wire
        .time_nano
        .or_else(|| wire.time.and_then(|t| t.checked_mul(1_000_000_000)));
    let malformed = |reason: String| Parsed::Malformed { reason, time_nano };
    let Some(time_nano) = time_nano else {
        return malformed("event without a time".into());
    };
    let kind = wire.kind.unwrap_or_default();
    if kind != "container" {
        return malformed(format!("unexpected event type {kind:?}"));
    }
    let actor = wire.actor.unwrap_or_default();
    let Some(id) = actor.id.filter(|id| !id.is_empty()) else {
        return malformed("container event without an id".into());
    };
    let attributes = actor.attributes.unwrap_or_default();
    let action = wire.action.unwrap_or_default();
    let action = match action.as_str() {
        "kill" => match attributes.get("signal").and_then(|s| s.parse().ok()) {
            Some(signal) => ContainerAction::Kill { signal },
            None => return malformed(format!("kill of {id} without a numeric signal")),
        },
        "die" => ContainerAction::Die {
            exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
        },
        "stop" => ContainerAction::Stop,
        "destroy" => ContainerAction::Destroy,
        other => return malformed(format!("unexpected action {other:?}")),
    };
    let stop_timeout = GRACE_PERIOD_LABELS
        .iter()
        .find_map(|label| attributes.get(*label)?.parse::<u64>().ok())
        .map(Duration::from_secs);
    let container = ContainerInfo::from_labels(
        &id,
        attributes.get("name").map(String::as_str),
        attributes.get("image").map(String::as_str),
        Some(&attributes),
    );
    Parsed::Event(Box::new(ContainerEvent {
        time_nano,
        action,
        container,
        stop_timeout,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real lines from dockerd 20.10.24: `docker stop -t 1` of a container whose PID 1 is
    /// `sh -c 'sleep 1000'`.
    const KILL_15: &str = r#"{"status":"kill","id":"db651cc32fa4e89894df429a2f1eb312a9bef7857cd0440c71e4c14c54a38c3b","from":"hwtest:x","Type":"container","Action":"kill","Actor":{"ID":"db651cc32fa4e89894df429a2f1eb312a9bef7857cd0440c71e4c14c54a38c3b","Attributes":{"image":"hwtest:x","name":"ign","signal":"15"}},"scope":"local","time":1795404050,"timeNano":1795404050665773785}"#;
    const DIE: &str = r#"{"status":"die","id":"db651cc32fa4e89894df429a2f1eb312a9bef7857cd0440c71e4c14c54a38c3b","from":"hwtest:x","Type":"container","Action":"die","Actor":{"ID":"db651cc32fa4e89894df429a2f1eb312a9bef7857cd0440c71e4c14c54a38c3b","Attributes":{"exitCode":"137","image":"hwtest:x","name":"ign"}},"scope":"local","time":1795404051,"timeNano":1795404051852794382}"#;

    fn event(line: &str) -> ContainerEvent {
        match parse_line(line.as_bytes()) {
            Parsed::Event(event) => *event,
            other => panic!("expected an event from {line}: {other:?}"),
        }
    }

    fn malformed(line: &str) -> (String, Option<i64>) {
        match parse_line(line.as_bytes()) {
            Parsed::Malformed { reason, time_nano } => (reason, time_nano),
            other => panic!("expected malformed from {line}: {other:?}"),
        }
    }

    #[test]
    fn docker_kill_and_die_lines() {
        let kill = event(KILL_15);
        assert_eq!(kill.action, ContainerAction::Kill { signal: 15 });
        assert_eq!(kill.time_nano, 1_795_404_050_665_773_785);
        assert_eq!(kill.container.name.as_deref(), Some("ign"));
        assert_eq!(kill.container.image.as_deref(), Some("hwtest:x"));
        assert!(kill.id().starts_with("db651cc32fa4"));
        assert_eq!(kill.stop_timeout, None);
        let die = event(DIE);
        assert_eq!(
            die.action,
            ContainerAction::Die {
                exit_code: Some(137)
            }
        );
        assert_eq!(
            die.at().duration_since(kill.at()).unwrap_or_default(),
            Duration::from_nanos(1_187_020_597)
        );
    }

    #[test]
    fn kubelet_labels_give_pod_namespace_and_grace_period() {
        let line = r#"{"Type":"container","Action":"kill","Actor":{"ID":"abc","Attributes":{"signal":"15","name":"k8s_web_web-0_shop_uid_0","io.kubernetes.pod.name":"web-0","io.kubernetes.pod.namespace":"shop","annotation.io.kubernetes.pod.terminationGracePeriod":"45"}},"timeNano":5}"#;
        let e = event(line);
        assert_eq!(e.container.pod.as_deref(), Some("web-0"));
        assert_eq!(e.container.namespace.as_deref(), Some("shop"));
        assert_eq!(e.stop_timeout, Some(Duration::from_secs(45)));
    }

    #[test]
    fn time_in_seconds_when_nanoseconds_are_missing() {
        let e = event(r#"{"Type":"container","Action":"stop","Actor":{"ID":"abc"},"time":7}"#);
        assert_eq!(e.time_nano, 7_000_000_000);
        assert_eq!(e.action, ContainerAction::Stop);
    }

    #[test]
    fn die_without_exit_code_is_still_a_die() {
        let e = event(r#"{"Type":"container","Action":"die","Actor":{"ID":"abc"},"timeNano":1}"#);
        assert_eq!(e.action, ContainerAction::Die { exit_code: None });
    }

    #[test]
    fn garbage_is_malformed_with_a_reason_never_a_panic() {
        for (line, needle, time) in [
            ("", "not an event", None),
            ("{", "not an event", None),
            ("[1,2]", "not an event", None),
            ("\u{0}\u{ff}garbage", "not an event", None),
            (r#"{"timeNano":"soon"}"#, "not an event", None),
            (
                r#"{"Type":"container","Action":"kill","Actor":{"ID":"a"}}"#,
                "without a time",
                None,
            ),
            (
                r#"{"Type":"network","Action":"connect","timeNano":3}"#,
                "unexpected event type",
                Some(3),
            ),
            (
                r#"{"Type":"container","Action":"kill","timeNano":3}"#,
                "without an id",
                Some(3),
            ),
            (
                r#"{"Type":"container","Action":"kill","Actor":{"ID":"a","Attributes":{"signal":"TERM"}},"timeNano":3}"#,
                "without a numeric signal",
                Some(3),
            ),
            (
                r#"{"Type":"container","Action":"teleport","Actor":{"ID":"a","Attributes":null},"timeNano":3}"#,
                "unexpected action \"teleport\"",
                Some(3),
            ),
        ] {
            let (reason, time_nano) = malformed(line);
            assert!(reason.contains(needle), "{line}: {reason}");
            assert_eq!(time_nano, time, "{line}");
        }
    }

    #[test]
    fn times_before_the_epoch_do_not_wrap() {
        assert_eq!(wall_time(-5), UNIX_EPOCH);
        assert_eq!(
            wall_time(1_000_000_000),
            UNIX_EPOCH + Duration::from_secs(1)
        );
    }
}
