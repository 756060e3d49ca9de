//! The Grafana dashboard in `dashboards/`: well formed, and every panel's query evaluated by a
//! real Prometheus scraping a real hangwatch that watches private daemons. Every query must
//! parse; the core panels must return data.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use support::daemons::PrivateDaemons;
use support::hangwatch::{Hangwatch, TempDir};
use support::prometheus::Prometheus;
use support::wait_for;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/hangwatch.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read dashboard"))
        .expect("dashboard JSON")
}

/// Every (panel title, expression) of the dashboard.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| {
                    (
                        title.clone(),
                        t["expr"].as_str().unwrap_or_default().to_string(),
                    )
                })
        })
        .collect()
}

/// Grafana's variables as Grafana would expand them for "All nodes".
fn expand(expr: &str) -> String {
    expr.replace("$node", ".*")
        .replace("$__rate_interval", "1m")
}

/// Panels that must show data on any node running hangwatch with its runtimes healthy.
const CORE: [&str; 23] = [
    "Runtime state",
    "Stalled runtimes",
    "Oldest probe in flight",
    "Probe latency p99",
    "Probe latency p50",
    "Runtime up",
    "Open incidents",
    "Incidents opened (1h)",
    "Goroutine dumps (1h)",
    "OOM kills by victim (1h)",
    "Kernel events by rule (1h)",
    "Hung tasks by scope (1h)",
    "Kernel log readable",
    "Stuck D-state tasks by scope",
    "Frozen (paused) tasks",
    "Stuck runtime processes",
    "/proc scan duration p99",
    "Tasks scanned",
    "Stuck container stops",
    "Container stop duration p99 and p50",
    "Stops escalated to SIGKILL (1h)",
    "Event streams up (Docker, containerd)",
    "hangwatch targets up",
];

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["uid"], "hangwatch");
    let variables: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .expect("variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        variables.contains("datasource") && variables.contains("node"),
        "{variables:?}"
    );
    let mut ids = BTreeSet::new();
    for panel in d["panels"].as_array().expect("panels") {
        assert!(
            ids.insert(panel["id"].as_i64().expect("id")),
            "duplicate panel id"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        assert!(!panel["targets"].as_array().expect("targets").is_empty());
    }
    for (title, expr) in queries(&d) {
        assert!(
            expr.contains("$node"),
            "{title}: not filtered by the node variable: {expr}"
        );
        let unknown = support::unknown_metrics(&expr);
        assert!(unknown.is_empty(), "{title}: unknown metrics {unknown:?}");
    }
    let titles: BTreeSet<String> = queries(&d).into_iter().map(|(t, _)| t).collect();
    for core in CORE {
        assert!(titles.contains(core), "core panel {core} missing");
    }
}

#[test]
fn every_panel_query_parses_and_core_panels_have_data() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("dashboard");
    let config = daemons.hangwatch_config(
        dir.path(),
        "node_name: test-node\nprobes:\n  interval: 500ms\nproc_scan:\n  interval: 1s\n",
    );
    let hw = Hangwatch::start(&config, dir.path());
    let prometheus = Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: hangwatch\n    honor_labels: true\n    static_configs:\n      - targets: [\"{}\"]\n        labels:\n          node: test-node\n",
            hw.addr
        ),
        dir.path(),
    );
    wait_for("ten scrapes of hangwatch", Duration::from_secs(60), || {
        prometheus
            .query("count_over_time(up{job=\"hangwatch\"}[1m]) >= 10")
            .ok()
            .filter(|r| !r.is_empty())
            .map(|_| ())
    });
    let mut empty = Vec::new();
    for (title, expr) in queries(&dashboard()) {
        let result = prometheus
            .query(&expand(&expr))
            .unwrap_or_else(|e| panic!("panel {title}: query does not evaluate: {e}\n{expr}"));
        if result.is_empty() {
            empty.push(title.clone());
        }
    }
    let core_empty: Vec<&String> = empty
        .iter()
        .filter(|t| CORE.contains(&t.as_str()))
        .collect();
    assert!(
        core_empty.is_empty(),
        "core panels without data: {core_empty:?}"
    );
    eprintln!("panels without data on a healthy node (expected): {empty:?}");
}
