//! The alert rules in `rules/` with the real promtool: they load, every alert has unit tests
//! that fire and that do not, every alert carries what on-call needs (node, severity, summary,
//! description, a runbook that exists), and every metric a rule uses is one hangwatch exports.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "rules/hangwatch.rules.yml";
const TESTS: &str = "rules/tests/hangwatch.test.yml";

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).expect("read YAML");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("promtool (Debian package prometheus; tests/run.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn alerts() -> Vec<Value> {
    yaml(RULES)["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

#[test]
fn rules_load_and_their_unit_tests_pass() {
    promtool(&["check", "rules", RULES]);
    let out = promtool(&["test", "rules", TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in yaml(TESTS)["tests"].as_array().expect("tests") {
        for case in test["alert_rule_test"].as_array().expect("alert_rule_test") {
            let name = case["alertname"].as_str().expect("alertname").to_string();
            let expected = case["exp_alerts"].as_array().map_or(0, Vec::len);
            if expected > 0 {
                firing.insert(name);
            } else {
                quiet.insert(name);
            }
        }
    }
    for alert in alerts() {
        let name = alert["alert"].as_str().expect("alert name");
        assert!(firing.contains(name), "{name} has no firing test");
        assert!(quiet.contains(name), "{name} has no not-firing test");
    }
}

#[test]
fn every_alert_carries_node_severity_text_and_a_runbook_that_exists() {
    let required = [
        "HangwatchRuntimeHung",
        "HangwatchRuntimeSlow",
        "HangwatchRuncInitOOMKilled",
        "HangwatchContainerStuckInDState",
        "HangwatchStuckContainerStop",
        "HangwatchStuckRuncProcess",
        "HangwatchKernelHungTask",
        "HangwatchKernelLogUnreadable",
        "HangwatchDown",
    ];
    let all = alerts();
    for name in required {
        assert!(all.iter().any(|a| a["alert"] == name), "{name} missing");
    }
    for alert in &all {
        let name = alert["alert"].as_str().expect("name");
        let expr = alert["expr"].as_str().expect("expr");
        assert!(
            expr.contains("by (node"),
            "{name}: the aggregation must keep `node`: {expr}"
        );
        assert!(
            ["critical", "warning"].contains(&alert["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                alert["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: {key}"
            );
        }
        let url = alert["annotations"]["runbook_url"].as_str().expect("url");
        let file = format!("docs/runbooks/{name}.md");
        assert!(
            url.ends_with(&file),
            "{name}: runbook_url {url} does not point at {file}"
        );
        let runbook = std::fs::read_to_string(Path::new(ROOT).join(&file))
            .unwrap_or_else(|_| panic!("{file} missing"));
        for section in ["## What it means", "## Confirm", "## What to do"] {
            assert!(runbook.contains(section), "{file}: no `{section}`");
        }
    }
    let cordon: Vec<&str> = all
        .iter()
        .filter(|a| a["labels"]["hangwatch_action"] == "cordon")
        .filter_map(|a| a["alert"].as_str())
        .collect();
    assert_eq!(
        cordon,
        ["HangwatchRuntimeHung"],
        "only a hung runtime cordons"
    );
}

#[test]
fn rules_use_only_metrics_hangwatch_exports() {
    assert!(support::exported_families().contains("hangwatch_runtime_stalled"));
    for alert in alerts() {
        let expr = alert["expr"].as_str().expect("expr");
        let unknown = support::unknown_metrics(expr);
        assert!(
            unknown.is_empty(),
            "{}: unknown metrics {unknown:?}",
            alert["alert"]
        );
    }
}
