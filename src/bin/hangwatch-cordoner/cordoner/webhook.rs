//! Alertmanager's webhook (payload version 4) turned into what to do to which node (pure).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

/// The label an alert carries to ask for a cordon, and its value.
pub const ACTION_LABEL: &str = "hangwatch_action";
pub const ACTION_CORDON: &str = "cordon";

/// The parts of a v4 payload the cordoner reads; other fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    version: String,
    alerts: Vec<Alert>,
    #[serde(default)]
    truncated_alerts: u64,
}

#[derive(Debug, Deserialize)]
struct Alert {
    status: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    fingerprint: String,
}

/// What one alert asks of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub node: String,
    /// Identifies the alert on the node's annotation: `alertname:fingerprint`, so two
    /// alerts of the same name (docker and containerd both hung) hold the cordon separately.
    pub alert: String,
    pub firing: bool,
}

/// Why an alert in the payload asks nothing of any node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// No `hangwatch_action="cordon"`: not for the cordoner.
    NotACordonAlert,
    /// A cordon alert without a usable `node` label.
    NoNode,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotACordonAlert => "not_a_cordon_alert",
            Skip::NoNode => "no_node_label",
        }
    }
}

#[derive(Debug, Default)]
pub struct Parsed {
    pub intents: Vec<Intent>,
    pub skipped: Vec<Skip>,
    /// Alerts Alertmanager left out (`max_alerts`): they come again in a later notification.
    pub truncated: u64,
}

/// Parse and validate a webhook body. `Err` is the reason the request is rejected (400).
pub fn parse(body: &[u8]) -> Result<Parsed, String> {
    let payload: Payload = serde_json::from_slice(body)
        .map_err(|e| format!("not an Alertmanager webhook payload: {e}"))?;
    if payload.version != "4" {
        return Err(format!(
            "webhook payload version {:?}; this cordoner reads version \"4\"",
            payload.version
        ));
    }
    let mut parsed = Parsed {
        truncated: payload.truncated_alerts,
        ..Parsed::default()
    };
    for alert in payload.alerts {
        let firing = match alert.status.as_str() {
            "firing" => true,
            "resolved" => false,
            other => {
                return Err(format!(
                    "alert status {other:?} is neither firing nor resolved"
                ));
            }
        };
        if alert.labels.get(ACTION_LABEL).map(String::as_str) != Some(ACTION_CORDON) {
            parsed.skipped.push(Skip::NotACordonAlert);
            continue;
        }
        let Some(node) = alert.labels.get("node").filter(|n| is_node_name(n)) else {
            parsed.skipped.push(Skip::NoNode);
            continue;
        };
        let name = alert
            .labels
            .get("alertname")
            .map(String::as_str)
            .unwrap_or("unnamed");
        let alert_id = if alert.fingerprint.is_empty() {
            name.to_string()
        } else {
            format!("{name}:{}", alert.fingerprint)
        };
        parsed.intents.push(Intent {
            node: node.clone(),
            alert: alert_id,
            firing,
        });
    }
    Ok(parsed)
}

/// What a notification asks of one node: its alerts collapsed, so that any number of
/// alerts for a node costs one cordon and one release at most.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeIntents {
    pub node: String,
    pub firing: BTreeSet<String>,
    pub resolved: BTreeSet<String>,
}

/// Group `intents` by node; an alert listed twice counts as its last status.
pub fn per_node(intents: &[Intent]) -> Vec<NodeIntents> {
    let mut latest: BTreeMap<(&str, &str), bool> = BTreeMap::new();
    for intent in intents {
        latest.insert((&intent.node, &intent.alert), intent.firing);
    }
    let mut nodes: BTreeMap<&str, NodeIntents> = BTreeMap::new();
    for ((node, alert), firing) in latest {
        let entry = nodes.entry(node).or_insert_with(|| NodeIntents {
            node: node.to_string(),
            ..NodeIntents::default()
        });
        if firing {
            entry.firing.insert(alert.to_string());
        } else {
            entry.resolved.insert(alert.to_string());
        }
    }
    nodes.into_values().collect()
}

/// A Kubernetes object name (RFC 1123 subdomain): anything else cannot be a node, and is
/// never put into an API path.
fn is_node_name(name: &str) -> bool {
    hangwatch::config::is_dns_subdomain(name)
}

/// Whether an `Authorization` header carries `token`, compared in constant time.
pub fn authorized(header: Option<&str>, token: &str) -> bool {
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    constant_time_eq::constant_time_eq(presented.trim().as_bytes(), token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(alerts: &str) -> Vec<u8> {
        format!(
            r#"{{"version":"4","groupKey":"{{}}:{{alertname=\"HangwatchRuntimeHung\"}}","truncatedAlerts":0,
            "status":"firing","receiver":"cordoner","groupLabels":{{}},"commonLabels":{{}},
            "commonAnnotations":{{}},"externalURL":"http://am:9093","alerts":[{alerts}]}}"#
        )
        .into_bytes()
    }

    const HUNG: &str = r#"{"status":"firing","labels":{"alertname":"HangwatchRuntimeHung","node":"node-1",
        "runtime":"docker","severity":"critical","hangwatch_action":"cordon"},"annotations":{},
        "startsAt":"2026-11-23T10:00:00Z","endsAt":"0001-01-01T00:00:00Z","generatorURL":"",
        "fingerprint":"a1b2c3"}"#;

    #[test]
    fn a_firing_cordon_alert_names_its_node_and_alert() {
        let parsed = parse(&payload(HUNG)).expect("valid");
        assert_eq!(
            parsed.intents,
            vec![Intent {
                node: "node-1".into(),
                alert: "HangwatchRuntimeHung:a1b2c3".into(),
                firing: true
            }]
        );
    }

    #[test]
    fn resolved_other_and_nodeless_alerts() {
        let resolved = HUNG.replace(r#""status":"firing""#, r#""status":"resolved""#);
        let other = HUNG.replace(r#""hangwatch_action":"cordon""#, r#""team":"x""#);
        let nodeless = HUNG.replace(r#""node":"node-1","#, "");
        let injected = HUNG.replace("node-1", "../../namespaces/kube-system/secrets/x");
        let parsed =
            parse(&payload(&[resolved, other, nodeless, injected].join(","))).expect("valid");
        assert_eq!(parsed.intents.len(), 1);
        assert!(!parsed.intents[0].firing);
        assert_eq!(
            parsed.skipped,
            vec![Skip::NotACordonAlert, Skip::NoNode, Skip::NoNode]
        );
    }

    #[test]
    fn wrong_version_garbage_and_bad_status_are_rejected() {
        let v3 = String::from_utf8(payload(HUNG))
            .expect("utf8")
            .replace(r#""version":"4""#, r#""version":"3""#);
        assert!(parse(v3.as_bytes()).unwrap_err().contains("version"));
        assert!(parse(b"\x00\xff not json").is_err());
        assert!(parse(br#"{"version":"4"}"#).is_err(), "alerts are required");
        let odd = HUNG.replace(r#""status":"firing""#, r#""status":"pending""#);
        assert!(parse(&payload(&odd)).unwrap_err().contains("pending"));
    }

    #[test]
    fn alerts_collapse_per_node_with_the_last_status() {
        let intent = |node: &str, alert: &str, firing| Intent {
            node: node.into(),
            alert: alert.into(),
            firing,
        };
        let mut intents: Vec<Intent> = (0..10_000)
            .map(|i| intent("node-1", &format!("A:{i}"), true))
            .collect();
        intents.push(intent("node-2", "B", true));
        intents.push(intent("node-2", "B", false));
        let nodes = per_node(&intents);
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].firing.len(), 10_000);
        assert!(nodes[0].resolved.is_empty());
        assert!(nodes[1].firing.is_empty());
        assert_eq!(nodes[1].resolved, BTreeSet::from(["B".to_string()]));
    }

    #[test]
    fn node_names() {
        assert!(is_node_name("ip-10-0-0-1.eu-west-1.compute.internal"));
        for bad in ["", "Node", "a/b", "-a", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn bearer_token() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("Basic s3cret"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
