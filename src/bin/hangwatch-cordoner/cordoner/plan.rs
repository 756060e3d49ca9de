//! What the cordoner does to a node, decided from the node as read (pure: no API calls).
//!
//! Everything hangwatch changes is recorded on the node itself, so any replica, after any
//! restart, knows what is hangwatch's to undo:
//! - annotation `hangwatch.io/cordoned-by: hangwatch` — the cordon is hangwatch's;
//! - annotation `hangwatch.io/cordoned-at` — RFC 3339 time of the cordon;
//! - annotation `hangwatch.io/cordon-alerts` — the alerts holding it (comma-separated);
//! - annotation `hangwatch.io/was-unschedulable: "true"` — the node was already cordoned
//!   (by a human or another tool) when hangwatch came: undoing never uncordons it;
//! - taint `hangwatch.io/runtime-unhealthy:NoSchedule`.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde_json::{Map, Value, json};

pub const CORDONED_BY: &str = "hangwatch.io/cordoned-by";
pub const CORDONED_AT: &str = "hangwatch.io/cordoned-at";
pub const CORDON_ALERTS: &str = "hangwatch.io/cordon-alerts";
pub const WAS_UNSCHEDULABLE: &str = "hangwatch.io/was-unschedulable";
pub const TAINT_KEY: &str = "hangwatch.io/runtime-unhealthy";
pub const ME: &str = "hangwatch";

/// The parts of a Node the cordoner reads.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub resource_version: String,
    pub unschedulable: bool,
    pub taints: Vec<Value>,
    pub annotations: Map<String, Value>,
}

impl NodeView {
    /// From a Node object as the API serves it.
    pub fn from_json(node: &Value) -> Option<NodeView> {
        let metadata = node.get("metadata")?;
        Some(NodeView {
            name: metadata.get("name")?.as_str()?.to_string(),
            resource_version: metadata
                .get("resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            unschedulable: node["spec"]["unschedulable"].as_bool().unwrap_or(false),
            taints: node["spec"]["taints"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            annotations: metadata
                .get("annotations")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default(),
        })
    }

    pub fn cordoned_by_hangwatch(&self) -> bool {
        self.annotations.get(CORDONED_BY).and_then(Value::as_str) == Some(ME)
    }

    /// Whether hangwatch took this node out of scheduling (not only tainted a node someone
    /// had already cordoned): what the cap and the rate limit count.
    pub fn holds_capacity(&self) -> bool {
        self.cordoned_by_hangwatch()
            && self
                .annotations
                .get(WAS_UNSCHEDULABLE)
                .and_then(Value::as_str)
                != Some("true")
    }

    pub fn cordon_alerts(&self) -> BTreeSet<String> {
        self.annotations
            .get(CORDON_ALERTS)
            .and_then(Value::as_str)
            .map(|s| {
                s.split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn cordoned_at(&self) -> Option<SystemTime> {
        self.annotations
            .get(CORDONED_AT)
            .and_then(Value::as_str)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    }
}

/// Merge patch that cordons and taints `node` for the alerts of `adding`, or adds them to a
/// cordon hangwatch already holds. `resourceVersion` makes it conditional: a node changed
/// since it was read gives 409 Conflict, and the caller reads it again. All at once: a
/// notification's alerts for one node take one patch.
pub fn cordon_patch_for(node: &NodeView, adding: &BTreeSet<String>, now: SystemTime) -> Value {
    let mut alerts = node.cordon_alerts();
    alerts.extend(adding.iter().cloned());
    let alerts = alerts.into_iter().collect::<Vec<_>>().join(",");
    let mut annotations = json!({ CORDONED_BY: ME, CORDON_ALERTS: alerts });
    if !node.cordoned_by_hangwatch() {
        annotations[CORDONED_AT] = json!(humantime::format_rfc3339_millis(now).to_string());
        if node.unschedulable {
            annotations[WAS_UNSCHEDULABLE] = json!("true");
        }
    }
    let mut taints = node.taints.clone();
    if !taints.iter().any(is_our_taint) {
        taints.push(json!({
            "key": TAINT_KEY,
            "effect": "NoSchedule",
            "timeAdded": humantime::format_rfc3339_millis(now).to_string(),
        }));
    }
    json!({
        "metadata": { "resourceVersion": node.resource_version, "annotations": annotations },
        "spec": { "unschedulable": true, "taints": taints },
    })
}

/// What resolving `alert` on `node` takes.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Not hangwatch's cordon, already undone, or not held by this alert: leave the node alone.
    NotOurs,
    /// Other alerts still hold the cordon: only drop `alert` from the list.
    StillHeld(Value),
    /// Undo what hangwatch did; a node that was cordoned before stays cordoned.
    Undo(Value),
}

/// What resolving the alerts of `resolved` does to `node`, all at once.
pub fn release_all(node: &NodeView, resolved: &BTreeSet<String>) -> Release {
    if !node.cordoned_by_hangwatch() {
        return Release::NotOurs;
    }
    let mut alerts = node.cordon_alerts();
    let before = alerts.len();
    alerts.retain(|a| !resolved.contains(a));
    if alerts.len() == before {
        return Release::NotOurs;
    }
    if !alerts.is_empty() {
        return Release::StillHeld(json!({
            "metadata": {
                "resourceVersion": node.resource_version,
                "annotations": { CORDON_ALERTS: alerts.into_iter().collect::<Vec<_>>().join(",") },
            }
        }));
    }
    Release::Undo(undo_patch(node))
}

/// Remove hangwatch's taint and annotations; uncordon only if hangwatch cordoned it.
pub fn undo_patch(node: &NodeView) -> Value {
    let taints: Vec<Value> = node
        .taints
        .iter()
        .filter(|t| !is_our_taint(t))
        .cloned()
        .collect();
    let was_unschedulable = node
        .annotations
        .get(WAS_UNSCHEDULABLE)
        .and_then(Value::as_str)
        == Some("true");
    let mut spec =
        json!({ "taints": if taints.is_empty() { Value::Null } else { Value::Array(taints) } });
    if !was_unschedulable {
        spec["unschedulable"] = Value::Null;
    }
    json!({
        "metadata": {
            "resourceVersion": node.resource_version,
            "annotations": {
                CORDONED_BY: null, CORDONED_AT: null, CORDON_ALERTS: null, WAS_UNSCHEDULABLE: null,
            },
        },
        "spec": spec,
    })
}

fn is_our_taint(taint: &Value) -> bool {
    taint.get("key").and_then(Value::as_str) == Some(TAINT_KEY)
}

/// The nodes that keep their hangwatch cordon under the cap: the earliest `cap` by
/// (cordoned-at, name). Every replica computes the same set from the same node list, so
/// replicas that raced past the cap undo the same excess without a leader.
pub fn within_cap(nodes: &[NodeView], cap: usize) -> BTreeSet<String> {
    let mut ordered: Vec<(Option<SystemTime>, &str)> = nodes
        .iter()
        .filter(|n| n.holds_capacity())
        .map(|n| (n.cordoned_at(), n.name.as_str()))
        .collect();
    // A cordon with no readable time sorts last: it cannot prove it came first.
    ordered.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y).then(a.1.cmp(b.1)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.1.cmp(b.1),
    });
    ordered
        .into_iter()
        .take(cap)
        .map(|(_, name)| name.to_string())
        .collect()
}

/// The cap: the smaller of an absolute number and a percentage of all nodes (at least one
/// node when the percentage is above zero, so small clusters can still cordon one).
pub fn cap(total_nodes: usize, max_nodes: Option<usize>, max_percent: f64) -> usize {
    let by_percent = ((total_nodes as f64) * max_percent / 100.0).floor() as usize;
    let by_percent = if max_percent > 0.0 {
        by_percent.max(1)
    } else {
        0
    };
    match max_nodes {
        Some(n) => n.min(by_percent),
        None => by_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cordon_patch(node: &NodeView, alert: &str, now: SystemTime) -> Value {
        cordon_patch_for(node, &BTreeSet::from([alert.to_string()]), now)
    }

    fn release(node: &NodeView, alert: &str) -> Release {
        release_all(node, &BTreeSet::from([alert.to_string()]))
    }

    fn node(value: Value) -> NodeView {
        NodeView::from_json(&value).expect("node")
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    const OTHER_TAINT: &str = r#"{"key":"dedicated","value":"gpu","effect":"NoSchedule"}"#;

    fn fresh() -> NodeView {
        node(json!({
            "metadata": {"name": "n1", "resourceVersion": "7"},
            "spec": {"taints": [serde_json::from_str::<Value>(OTHER_TAINT).unwrap()]},
        }))
    }

    /// RFC 7386 merge patch, as the API server applies it.
    fn merge(target: &mut Value, patch: &Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }

    fn apply(node: &NodeView, patch: &Value) -> NodeView {
        let mut value = json!({
            "metadata": {"name": node.name, "resourceVersion": node.resource_version, "annotations": node.annotations},
            "spec": {"unschedulable": node.unschedulable, "taints": node.taints},
        });
        merge(&mut value, patch);
        NodeView::from_json(&value).expect("node")
    }

    #[test]
    fn cordon_then_resolve_restores_the_node_and_keeps_other_taints() {
        let before = fresh();
        let cordoned = apply(
            &before,
            &cordon_patch(&before, "HangwatchRuntimeHung", t(0)),
        );
        assert!(cordoned.unschedulable && cordoned.cordoned_by_hangwatch());
        assert_eq!(cordoned.taints.len(), 2);
        assert_eq!(cordoned.cordoned_at(), Some(t(0)));
        let Release::Undo(patch) = release(&cordoned, "HangwatchRuntimeHung") else {
            panic!("expected undo")
        };
        let after = apply(&cordoned, &patch);
        assert!(!after.unschedulable);
        assert_eq!(after.taints, before.taints, "the other taint survives");
        assert!(after.annotations.is_empty(), "{:?}", after.annotations);
    }

    #[test]
    fn a_human_cordon_is_never_undone() {
        let mut human = fresh();
        human.unschedulable = true;
        let cordoned = apply(&human, &cordon_patch(&human, "HangwatchRuntimeHung", t(0)));
        let Release::Undo(patch) = release(&cordoned, "HangwatchRuntimeHung") else {
            panic!("expected undo")
        };
        let after = apply(&cordoned, &patch);
        assert!(after.unschedulable, "the human's cordon stays");
        assert!(!after.taints.iter().any(is_our_taint));
        assert_eq!(release(&human, "HangwatchRuntimeHung"), Release::NotOurs);
    }

    #[test]
    fn two_alerts_hold_the_cordon_until_both_resolve_and_repeats_are_idempotent() {
        let n = fresh();
        let one = apply(&n, &cordon_patch(&n, "A", t(0)));
        let again = apply(&one, &cordon_patch(&one, "A", t(5)));
        assert_eq!(again.taints.len(), 2, "no second taint");
        assert_eq!(
            again.cordoned_at(),
            Some(t(0)),
            "the first cordon's time is kept"
        );
        let two = apply(&again, &cordon_patch(&again, "B", t(9)));
        assert_eq!(two.cordon_alerts().len(), 2);
        let Release::StillHeld(patch) = release(&two, "A") else {
            panic!("B still holds it")
        };
        let left = apply(&two, &patch);
        assert!(left.unschedulable);
        assert_eq!(
            release(&left, "A"),
            Release::NotOurs,
            "A no longer holds it"
        );
        assert!(matches!(release(&left, "B"), Release::Undo(_)));
    }

    #[test]
    fn patches_are_conditional_on_what_was_read() {
        let n = fresh();
        assert_eq!(
            cordon_patch(&n, "A", t(0))["metadata"]["resourceVersion"],
            "7"
        );
        assert_eq!(undo_patch(&n)["metadata"]["resourceVersion"], "7");
    }

    #[test]
    fn cap_and_who_keeps_the_cordon() {
        assert_eq!(cap(20, None, 10.0), 2);
        assert_eq!(cap(5, None, 10.0), 1, "at least one node");
        assert_eq!(cap(100, Some(3), 10.0), 3);
        assert_eq!(cap(100, Some(30), 10.0), 10);
        assert_eq!(cap(100, None, 0.0), 0);
        let nodes: Vec<NodeView> = [("b", 5), ("a", 5), ("c", 1)]
            .iter()
            .map(|(name, at)| {
                let n = NodeView {
                    name: (*name).into(),
                    ..fresh()
                };
                apply(&n, &cordon_patch(&n, "A", t(*at)))
            })
            .collect();
        let keep = within_cap(&nodes, 2);
        assert_eq!(keep, ["a", "c"].iter().map(|s| s.to_string()).collect());
        let mut human = NodeView {
            name: "0-human".into(),
            ..fresh()
        };
        human.unschedulable = true;
        let tainted = apply(&human, &cordon_patch(&human, "A", t(0)));
        assert!(tainted.cordoned_by_hangwatch() && !tainted.holds_capacity());
        let mut all = nodes.clone();
        all.push(tainted);
        assert_eq!(
            within_cap(&all, 2),
            keep,
            "a node a human cordoned costs no capacity"
        );
    }
}
