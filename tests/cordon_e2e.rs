//! The path users run, end to end, with only the Kubernetes API faked: ten real hangwatch
//! daemons (one per "node", all watching one private dockerd), a real Prometheus evaluating
//! the shipped rules, a real Alertmanager sending webhooks with a bearer token to two cordoner
//! replicas, and the fake API server holding 20 nodes, one of them cordoned by hand.
//!
//! SIGSTOP dockerd → HangwatchRuntimeHung fires on all ten → the human-cordoned node is only
//! tainted, and exactly `--max-cordoned` (3) of the other nine are cordoned and tainted;
//! SIGCONT → resolved → every hangwatch cordon undone, the human's cordon kept.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cordoner::{Cordoner, TOKEN, credentials};
use support::daemons::PrivateDaemons;
use support::fake_apiserver::FakeApiServer;
use support::hangwatch::{Hangwatch, TempDir, metric_value};
use support::prometheus::{Alertmanager, Prometheus};
use support::wait_for;

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/rules/hangwatch.rules.yml");
const TAINT: &str = "hangwatch.io/runtime-unhealthy";
/// HangwatchRuntimeHung's `for:` in rules/hangwatch.rules.yml.
const ALERT_FOR: Duration = Duration::from_secs(60);
const STALL_THRESHOLD: Duration = Duration::from_secs(2);
/// Scrape and evaluation interval, Alertmanager group wait.
const TICK: Duration = Duration::from_secs(1);
const MAX_CORDONED: usize = 3;

fn subdir(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::create_dir_all(&path).expect("mkdir");
    path
}

fn unschedulable(node: &Value) -> bool {
    node["spec"]["unschedulable"].as_bool().unwrap_or(false)
}

fn tainted(node: &Value) -> bool {
    node["spec"]["taints"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["key"] == TAINT))
}

fn ours(node: &Value) -> bool {
    node["metadata"]["annotations"]["hangwatch.io/cordoned-by"] == "hangwatch"
}

#[test]
fn a_hung_dockerd_cordons_its_nodes_within_the_cap_and_recovery_uncordons_them() {
    let _serial = support::exclusive();
    let dir = TempDir::new("e2e");
    let daemons = PrivateDaemons::start();
    let names: Vec<String> = (1..=20).map(|i| format!("node-{i:02}")).collect();
    let api = FakeApiServer::start(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let human = "node-01";
    api.edit_node(human, |n| n["spec"]["unschedulable"] = json!(true));
    let failing = &names[..10];

    let watchers: Vec<Hangwatch> = failing
        .iter()
        .map(|node| {
            let state = subdir(&dir, node);
            let config = daemons.hangwatch_config(
                &state,
                &format!(
                    "node_name: {node}\nprobes:\n  interval: 500ms\n  stall_threshold: {}s\n  deadline: 60s\n\
                     kernel_log:\n  enabled: false\nproc_scan:\n  enabled: false\ndumps:\n  enabled: false\n",
                    STALL_THRESHOLD.as_secs()
                ),
            );
            Hangwatch::start(&config, &state)
        })
        .collect();

    let replicas = [
        Cordoner::start(
            &api,
            &subdir(&dir, "cordoner-a"),
            &[
                "--max-cordoned",
                &MAX_CORDONED.to_string(),
                "--max-cordoned-percent",
                "50",
            ],
        ),
        Cordoner::start(
            &api,
            &subdir(&dir, "cordoner-b"),
            &[
                "--max-cordoned",
                &MAX_CORDONED.to_string(),
                "--max-cordoned-percent",
                "50",
            ],
        ),
    ];
    let (_, token_file) = credentials(&api, dir.path());
    // Both replicas get every notification: the worst case for two replicas without a leader.
    let webhooks: String = replicas
        .iter()
        .map(|r| {
            format!(
                "      - url: {}/webhook\n        send_resolved: true\n        http_config:\n          authorization:\n            type: Bearer\n            credentials_file: {}\n",
                r.url(),
                token_file.display()
            )
        })
        .collect();
    let alertmanager = Alertmanager::start(
        &format!(
            "route:\n  receiver: nowhere\n  group_by: [node, alertname]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n  routes:\n    - matchers: ['hangwatch_action=\"cordon\"']\n      receiver: cordoner\n\
             receivers:\n  - name: nowhere\n  - name: cordoner\n    webhook_configs:\n{webhooks}"
        ),
        &subdir(&dir, "alertmanager"),
    );
    let targets: Vec<String> = watchers.iter().map(|w| format!("\"{}\"", w.addr)).collect();
    let prometheus = Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{RULES}\"]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: [\"127.0.0.1:{}\"]\n\
             scrape_configs:\n  - job_name: hangwatch\n    static_configs:\n      - targets: [{}]\n",
            alertmanager.port,
            targets.join(", ")
        ),
        &subdir(&dir, "prometheus"),
    );
    wait_for(
        "Prometheus to scrape all ten healthy",
        Duration::from_secs(60),
        || {
            let up = prometheus
                .query("count(hangwatch_runtime_state{runtime=\"docker\",state=\"healthy\"} == 1)")
                .ok()?;
            (up.first()?["value"][1] == "10").then_some(())
        },
    );

    daemons.signal_dockerd(libc::SIGSTOP);
    let budget = STALL_THRESHOLD + ALERT_FOR + 3 * TICK + Duration::from_secs(10);
    let (_, took) = wait_for(
        "the hung node cordoned",
        budget + Duration::from_secs(30),
        || {
            let held = names
                .iter()
                .filter(|n| ours(&api.node(n)) && n.as_str() != human)
                .count();
            (held == MAX_CORDONED && tainted(&api.node(human))).then_some(())
        },
    );
    assert!(
        took <= budget,
        "cordoned after {took:?}; budget (stall + for + ticks + 10 s) {budget:?}"
    );
    eprintln!("cordoned {took:?} after SIGSTOP (budget {budget:?})");

    // Every firing notification has been handled by both replicas; the cap still holds.
    wait_for(
        "both replicas to handle all ten alerts",
        Duration::from_secs(30),
        || {
            replicas
                .iter()
                .all(|r| {
                    let m = r.metrics();
                    let total: f64 = [
                        "cordoned",
                        "joined",
                        "unchanged",
                        "refused_cap",
                        "refused_rate",
                    ]
                    .iter()
                    .filter_map(|o| {
                        metric_value(
                            &m,
                            "hangwatch_cordoner_decisions_total",
                            &[("action", "cordon"), ("outcome", o)],
                        )
                    })
                    .sum();
                    total >= 10.0
                })
                .then_some(())
        },
    );
    let cordoned: Vec<&String> = names
        .iter()
        .filter(|n| n.as_str() != human && unschedulable(&api.node(n)))
        .collect();
    assert_eq!(cordoned.len(), MAX_CORDONED, "{cordoned:?}");
    assert!(
        cordoned
            .iter()
            .all(|n| failing.contains(n) && tainted(&api.node(n)))
    );
    let human_node = api.node(human);
    assert!(unschedulable(&human_node) && tainted(&human_node));
    assert_eq!(
        human_node["metadata"]["annotations"]["hangwatch.io/was-unschedulable"],
        "true"
    );

    // Nobody without the token gets through, whatever Alertmanager does meanwhile.
    let (status, _) = replicas[0].post(
        &support::cordoner::notification(&[("node-11", "firing", "x")]),
        None,
    );
    assert_eq!(status, 401);
    let (status, _) = replicas[0].post(
        &support::cordoner::notification(&[("node-11", "firing", "x")]),
        Some("Bearer not-the-token"),
    );
    assert_eq!(status, 401);
    assert!(!unschedulable(&api.node("node-11")));
    assert_ne!(TOKEN, "not-the-token");

    daemons.signal_dockerd(libc::SIGCONT);
    let resumed = Instant::now();
    wait_for(
        "every hangwatch cordon undone",
        Duration::from_secs(60),
        || {
            names
                .iter()
                .all(|n| !ours(&api.node(n)) && !tainted(&api.node(n)))
                .then_some(())
        },
    );
    eprintln!("uncordoned {:?} after SIGCONT", resumed.elapsed());
    for name in &names {
        let node = api.node(name);
        assert_eq!(
            unschedulable(&node),
            name == human,
            "{name}: only the human's cordon remains"
        );
    }
    drop(prometheus);
    let logs = alertmanager.logs();
    assert!(
        !logs.contains("401"),
        "Alertmanager was never refused:\n{logs}"
    );
}
