//! `hangwatch-cordoner` (the real process, kube-rs client) against the fake Kubernetes API
//! server: cordon and undo, a human's cordon, the cap with two replicas racing, the rate
//! limit, authentication, payload validation, dry-run, conflicts and a hung API server.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cordoner::{Cordoner, notification};
use support::fake_apiserver::FakeApiServer;
use support::hangwatch::{TempDir, cordoner_binary, metric_value, run_program};

const TAINT: &str = "hangwatch.io/runtime-unhealthy";

fn unschedulable(node: &Value) -> bool {
    node["spec"]["unschedulable"].as_bool().unwrap_or(false)
}

fn our_taints(node: &Value) -> usize {
    node["spec"]["taints"]
        .as_array()
        .map(|t| t.iter().filter(|t| t["key"] == TAINT).count())
        .unwrap_or(0)
}

fn annotation<'a>(node: &'a Value, key: &str) -> Option<&'a str> {
    node["metadata"]["annotations"][key].as_str()
}

/// Nodes hangwatch took out of scheduling (not a human's cordon it only tainted).
fn holding(api: &FakeApiServer, names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter(|n| {
            let node = api.node(n);
            annotation(&node, "hangwatch.io/cordoned-by") == Some("hangwatch")
                && annotation(&node, "hangwatch.io/was-unschedulable").is_none()
        })
        .cloned()
        .collect()
}

#[test]
fn cordons_on_firing_and_undoes_exactly_that_on_resolved() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1", "node-2"]);
    api.edit_node("node-1", |n| {
        n["spec"]["taints"] = json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]);
    });
    let before = api.node("node-1");
    let cordoner = Cordoner::start(&api, dir.path(), &[]);

    let (status, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp1")]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "cordoned", "{body}");
    let node = api.node("node-1");
    assert!(unschedulable(&node));
    assert_eq!(our_taints(&node), 1);
    assert_eq!(node["spec"]["taints"][1]["effect"], "NoSchedule");
    assert_eq!(
        annotation(&node, "hangwatch.io/cordon-alerts"),
        Some("HangwatchRuntimeHung:fp1")
    );
    assert!(annotation(&node, "hangwatch.io/cordoned-at").is_some());
    let patch = api.patches().pop().expect("a patch");
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(
        patch.body["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    assert!(!unschedulable(&api.node("node-2")), "only the alert's node");

    // Alertmanager repeats a firing notification: nothing more is written.
    let patches = api.patches().len();
    let (_, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp1")]));
    assert_eq!(body["results"][0]["outcome"], "unchanged");
    assert_eq!(api.patches().len(), patches);

    // A second alert joins; the cordon holds until both resolve.
    cordoner.notify(&notification(&[("node-1", "firing", "fp2")]));
    let (_, body) = cordoner.notify(&notification(&[("node-1", "resolved", "fp1")]));
    assert_eq!(body["results"][0]["outcome"], "released");
    assert!(unschedulable(&api.node("node-1")));
    let (_, body) = cordoner.notify(&notification(&[("node-1", "resolved", "fp2")]));
    assert_eq!(body["results"][0]["outcome"], "uncordoned");
    let after = api.node("node-1");
    assert!(!unschedulable(&after));
    assert_eq!(
        after["spec"]["taints"], before["spec"]["taints"],
        "the other taint stays"
    );
    assert_eq!(
        after["metadata"]["annotations"],
        before["metadata"]["annotations"]
    );

    let metrics = cordoner.metrics();
    let decided = |action, outcome| {
        metric_value(
            &metrics,
            "hangwatch_cordoner_decisions_total",
            &[("action", action), ("outcome", outcome)],
        )
    };
    assert_eq!(decided("cordon", "cordoned"), Some(1.0), "{metrics}");
    assert_eq!(decided("release", "uncordoned"), Some(1.0));
    assert_eq!(
        metric_value(
            &metrics,
            "hangwatch_cordoner_webhook_requests_total",
            &[("result", "ok")]
        ),
        Some(5.0)
    );
}

#[test]
fn a_node_cordoned_by_hand_stays_cordoned() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1"]);
    api.edit_node("node-1", |n| n["spec"]["unschedulable"] = json!(true));
    let cordoner = Cordoner::start(&api, dir.path(), &["--max-cordoned", "0"]);

    // A resolved alert hangwatch never acted on writes nothing.
    let (_, body) = cordoner.notify(&notification(&[("node-1", "resolved", "fp1")]));
    assert_eq!(body["results"][0]["outcome"], "unchanged");
    assert!(api.patches().is_empty());

    // Tainting a node a human cordoned costs no capacity: allowed even with a cap of 0.
    let (_, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp1")]));
    assert_eq!(body["results"][0]["outcome"], "cordoned", "{body}");
    let node = api.node("node-1");
    assert_eq!(our_taints(&node), 1);
    assert_eq!(
        annotation(&node, "hangwatch.io/was-unschedulable"),
        Some("true")
    );

    let (_, body) = cordoner.notify(&notification(&[("node-1", "resolved", "fp1")]));
    assert_eq!(body["results"][0]["outcome"], "uncordoned");
    let node = api.node("node-1");
    assert!(unschedulable(&node), "the human's cordon is never undone");
    assert_eq!(our_taints(&node), 0, "hangwatch's own taint goes");
    assert!(annotation(&node, "hangwatch.io/cordoned-by").is_none());
}

#[test]
fn the_cap_holds_with_ten_nodes_failing_across_two_replicas() {
    let dir = TempDir::new("cordoner");
    let names: Vec<String> = (1..=20).map(|i| format!("node-{i:02}")).collect();
    let api = FakeApiServer::start(&names.iter().map(String::as_str).collect::<Vec<_>>());
    let args = ["--max-cordoned-percent", "10", "--max-new-cordons", "100"];
    let replicas = [
        Cordoner::start(&api, &subdir(&dir, "a"), &args),
        Cordoner::start(&api, &subdir(&dir, "b"), &args),
    ];
    std::thread::scope(|scope| {
        for (i, name) in names.iter().take(10).enumerate() {
            let replica = &replicas[i % 2];
            scope.spawn(move || {
                let (status, body) = replica.notify(&notification(&[(name, "firing", "fp")]));
                assert_eq!(status, 200, "{body}");
            });
        }
    });
    let held = holding(&api, &names);
    assert_eq!(held.len(), 2, "10% of 20 nodes: {held:?}");
    let unschedulable_nodes = names.iter().filter(|n| unschedulable(&api.node(n))).count();
    assert_eq!(unschedulable_nodes, 2, "refused nodes are left schedulable");
    let refused: f64 = replicas
        .iter()
        .filter_map(|r| {
            metric_value(
                &r.metrics(),
                "hangwatch_cordoner_decisions_total",
                &[("action", "cordon"), ("outcome", "refused_cap")],
            )
        })
        .sum();
    assert_eq!(refused, 8.0);
    assert_eq!(
        metric_value(&replicas[0].metrics(), "hangwatch_cordoner_cordon_cap", &[]),
        Some(2.0)
    );

    // Resolving everything (refused alerts included) leaves nothing of hangwatch's behind.
    let resolved: Vec<(&str, &str, &str)> = names
        .iter()
        .take(10)
        .map(|n| (n.as_str(), "resolved", "fp"))
        .collect();
    let (status, _) = replicas[1].notify(&notification(&resolved));
    assert_eq!(status, 200);
    assert!(holding(&api, &names).is_empty());
    assert!(
        names
            .iter()
            .all(|n| !unschedulable(&api.node(n)) && our_taints(&api.node(n)) == 0)
    );
}

#[test]
fn new_cordons_are_rate_limited_cluster_wide() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1", "node-2", "node-3"]);
    let cordoner = Cordoner::start(
        &api,
        dir.path(),
        &[
            "--max-cordoned-percent",
            "100",
            "--max-new-cordons",
            "2",
            "--rate-window",
            "1h",
        ],
    );
    let (_, body) = cordoner.notify(&notification(&[
        ("node-1", "firing", "a"),
        ("node-2", "firing", "b"),
        ("node-3", "firing", "c"),
    ]));
    let outcomes: Vec<&str> = body["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["cordoned", "cordoned", "refused_rate"], "{body}");
    assert!(!unschedulable(&api.node("node-3")));
}

#[test]
fn unauthenticated_and_malformed_calls_are_rejected_before_any_api_call() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1"]);
    let cordoner = Cordoner::start(&api, dir.path(), &[]);
    let firing = notification(&[("node-1", "firing", "fp")]);
    for authorization in [
        None,
        Some("Bearer wrong"),
        Some("Basic dGVzdA=="),
        Some(support::cordoner::TOKEN),
    ] {
        let (status, _) = cordoner.post(&firing, authorization);
        assert_eq!(status, 401, "{authorization:?}");
    }
    assert!(
        api.requests().is_empty(),
        "no API call for a rejected request"
    );
    assert!(!unschedulable(&api.node("node-1")));

    let (status, body) = cordoner.notify("{not json");
    assert_eq!(status, 400, "{body}");
    let (status, body) = cordoner.notify(&firing.replace(r#""version":"4""#, r#""version":"3""#));
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap_or("").contains("version"),
        "{body}"
    );
    let (status, _) = cordoner.notify(&"x".repeat(2 * 1024 * 1024));
    assert_eq!(status, 413, "bodies over 1 MiB are refused");
    assert!(api.requests().is_empty());

    let metrics = cordoner.metrics();
    let requests = |result| {
        metric_value(
            &metrics,
            "hangwatch_cordoner_webhook_requests_total",
            &[("result", result)],
        )
    };
    assert_eq!(requests("unauthorized"), Some(4.0));
    assert_eq!(requests("bad_request"), Some(2.0));
}

#[test]
fn refuses_to_start_without_a_token_or_credentials() {
    let (code, _, stderr) = run_program(cordoner_binary(), &["--listen", "127.0.0.1:0"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--token-file") && stderr.contains("HANGWATCH_CORDONER_TOKEN"),
        "{stderr}"
    );

    let dir = TempDir::new("cordoner");
    let token = dir.path().join("token");
    std::fs::write(&token, "t").expect("token");
    let output = std::process::Command::new(cordoner_binary())
        .args(["--listen", "127.0.0.1:0", "--token-file"])
        .arg(&token)
        .env("KUBECONFIG", dir.path().join("missing"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Kubernetes API configuration"), "{stderr}");
}

#[test]
fn dry_run_asks_the_api_server_to_validate_and_changes_nothing() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1"]);
    let cordoner = Cordoner::start(&api, dir.path(), &["--dry-run"]);
    let (status, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp")]));
    assert_eq!(status, 200);
    assert_eq!(body["dry_run"], true);
    assert_eq!(body["results"][0]["outcome"], "cordoned");
    let patches = api.patches();
    assert_eq!(patches.len(), 1);
    assert!(
        patches[0].path.ends_with("?dryRun=All"),
        "{}",
        patches[0].path
    );
    assert!(!unschedulable(&api.node("node-1")));
    assert_eq!(
        metric_value(&cordoner.metrics(), "hangwatch_cordoner_dry_run", &[]),
        Some(1.0)
    );
}

#[test]
fn a_concurrent_writer_causes_conflicts_that_are_retried_without_losing_its_change() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1"]);
    let cordoner = Cordoner::start(&api, dir.path(), &[]);
    api.interleave_writes(2);
    let (status, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp")]));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["outcome"], "cordoned");
    assert_eq!(
        api.patches().len(),
        3,
        "two conflicts, then the patch on what was read again"
    );
    let node = api.node("node-1");
    assert!(unschedulable(&node));
    assert_eq!(
        node["metadata"]["labels"]["example.com/writes"], "2",
        "the other writer's change survives"
    );
    assert_eq!(
        metric_value(
            &cordoner.metrics(),
            "hangwatch_cordoner_api_requests_total",
            &[("verb", "patch"), ("result", "conflict")]
        ),
        Some(2.0)
    );
}

#[test]
fn a_hung_api_server_is_bounded_and_the_retry_succeeds() {
    let dir = TempDir::new("cordoner");
    let api = FakeApiServer::start(&["node-1"]);
    let cordoner = Cordoner::start(&api, dir.path(), &["--api-timeout", "1s"]);
    api.hang(true);
    let start = Instant::now();
    let (status, body) = cordoner.notify(&notification(&[("node-1", "firing", "fp")]));
    let took = start.elapsed();
    assert_eq!(status, 500, "Alertmanager must retry: {body}");
    assert_eq!(body["results"][0]["outcome"], "api_error");
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    assert_eq!(
        metric_value(
            &cordoner.metrics(),
            "hangwatch_cordoner_api_requests_total",
            &[("verb", "get"), ("result", "timeout")]
        ),
        Some(1.0)
    );
    api.hang(false);
    let (status, _) = cordoner.notify(&notification(&[("node-1", "firing", "fp")]));
    assert_eq!(status, 200);
    assert!(unschedulable(&api.node("node-1")));
}

fn subdir(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::create_dir_all(&path).expect("mkdir");
    path
}
