//! Node conditions on the (fake) Kubernetes API from real runtime hangs: a SIGSTOPped
//! private dockerd sets `ContainerRuntimeUnhealthy` with its reason and transition time,
//! heartbeats advance without moving the transition, SIGCONT clears it; a restart during the
//! outage keeps it; a hung or failing API server never delays the verdict; conditions owned
//! by others are never touched.

mod support;

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use support::daemons::PrivateDaemons;
use support::fake_apiserver::FakeApiServer;
use support::hangwatch::{FAST_PROBES, Hangwatch, TempDir};
use support::wait_for;

const NODE: &str = "node-a";
const CONDITION: &str = "ContainerRuntimeUnhealthy";

/// Probes as `FAST_PROBES`, the publisher with a 2 s heartbeat and quick retries.
fn config(daemons: &PrivateDaemons, dir: &TempDir, api: &FakeApiServer, extra: &str) -> String {
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    daemons.hangwatch_config(
        dir.path(),
        &format!(
            "{FAST_PROBES}node_name: {NODE}\nnode_status:\n  enabled: true\n  kubeconfig: {}\n  \
             request_timeout: 1s\n  heartbeat_period: 2s\n  retry_interval: 200ms\n{extra}",
            kubeconfig.display()
        ),
    )
}

/// Conditions owned by others, set before hangwatch starts: NPD's KernelDeadlock, and
/// kubelet's Ready (already there).
fn add_foreign_conditions(api: &FakeApiServer) -> Value {
    api.edit_node(NODE, |node| {
        node["status"]["conditions"]
            .as_array_mut()
            .expect("conditions")
            .push(json!({
                "type": "KernelDeadlock",
                "status": "False",
                "lastHeartbeatTime": "2026-11-30T00:00:00Z",
                "lastTransitionTime": "2026-11-01T00:00:00Z",
                "reason": "KernelHasNoDeadlock",
                "message": "kernel has no deadlock",
            }));
    });
    foreign(api)
}

fn foreign(api: &FakeApiServer) -> Value {
    json!([
        api.condition(NODE, "Ready"),
        api.condition(NODE, "KernelDeadlock")
    ])
}

fn condition_is(api: &FakeApiServer, status: &str) -> Option<Value> {
    let c = api.condition(NODE, CONDITION);
    (c["status"] == status).then_some(c)
}

fn time_of(c: &Value, field: &str) -> SystemTime {
    humantime::parse_rfc3339(c[field].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{field} of {c}: {e}"))
}

/// The Events hangwatch made, of `reason`.
fn events_of(api: &FakeApiServer, reason: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["reason"] == reason && e["source"]["component"] == "hangwatch")
        .collect()
}

fn status_patches(api: &FakeApiServer) -> Vec<support::fake_apiserver::Recorded> {
    api.patches()
        .into_iter()
        .filter(|p| p.path == format!("/api/v1/nodes/{NODE}/status"))
        .collect()
}

#[test]
fn a_stopped_dockerd_sets_the_condition_heartbeats_keep_its_transition_and_sigcont_clears_it() {
    let api = FakeApiServer::start(&[NODE, "node-b"]);
    let others_before = add_foreign_conditions(&api);
    let node_b = api.node("node-b");
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("ns-cond");
    let hw = Hangwatch::start(&config(&daemons, &dir, &api, ""), dir.path());

    let (healthy, _) = wait_for(
        "the condition False while healthy",
        Duration::from_secs(30),
        || condition_is(&api, "False"),
    );
    assert_eq!(healthy["reason"], "ContainerRuntimeHealthy");

    let stopped_at = SystemTime::now();
    daemons.signal_dockerd(libc::SIGSTOP);
    let (hung, took) = wait_for("the condition True", Duration::from_secs(15), || {
        condition_is(&api, "True")
    });
    assert_eq!(hung["reason"], "DockerdHung", "{hung}");
    assert!(
        hung["message"]
            .as_str()
            .is_some_and(|m| m.contains("dockerd")),
        "the message is the suspected cause: {hung}"
    );
    let transition = time_of(&hung, "lastTransitionTime");
    // RFC 3339 to the second: the transition is at most a second before the stop.
    assert!(
        transition + Duration::from_secs(1) >= stopped_at
            && transition <= stopped_at + took + Duration::from_secs(1),
        "transition {hung} vs stop at {stopped_at:?}"
    );

    // Two heartbeats later: the heartbeat advanced, the transition did not.
    let first_beat = time_of(&hung, "lastHeartbeatTime");
    let (later, _) = wait_for("two heartbeats", Duration::from_secs(15), || {
        let c = api.condition(NODE, CONDITION);
        (time_of(&c, "lastHeartbeatTime") >= first_beat + Duration::from_secs(4)).then_some(c)
    });
    assert_eq!(later["status"], "True");
    assert_eq!(later["lastTransitionTime"], hung["lastTransitionTime"]);

    daemons.signal_dockerd(libc::SIGCONT);
    let (cleared, _) = wait_for("the condition False again", Duration::from_secs(20), || {
        condition_is(&api, "False")
    });
    assert!(
        time_of(&cleared, "lastTransitionTime") > transition,
        "{cleared}"
    );
    assert_eq!(cleared["reason"], "ContainerRuntimeHealthy");

    // Others' conditions, and other nodes, untouched; every write a strategic merge of
    // owned conditions on its own node's status.
    assert_eq!(foreign(&api), others_before);
    assert_eq!(api.node("node-b"), node_b);
    let patches = status_patches(&api);
    assert!(!patches.is_empty());
    assert_eq!(
        patches.len(),
        api.patches().len(),
        "only nodes/{NODE}/status is patched"
    );
    for patch in &patches {
        assert_eq!(patch.content_type, "application/strategic-merge-patch+json");
        for c in patch.body["status"]["conditions"]
            .as_array()
            .expect("conditions")
        {
            let t = c["type"].as_str().unwrap_or_default();
            assert!(
                [
                    "ContainerRuntimeUnhealthy",
                    "RuntimeTasksStuck",
                    "ContainerStopStuck"
                ]
                .contains(&t),
                "patched a condition it does not own: {c}"
            );
        }
    }
    drop(hw);
}

#[test]
fn a_restart_during_an_outage_keeps_the_condition_and_its_transition_time() {
    let api = FakeApiServer::start(&[NODE]);
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("ns-restart");
    let config = config(&daemons, &dir, &api, "");
    let hw = Hangwatch::start(&config, dir.path());
    wait_for("the condition False", Duration::from_secs(30), || {
        condition_is(&api, "False")
    });
    daemons.signal_dockerd(libc::SIGSTOP);
    let (hung, _) = wait_for("the condition True", Duration::from_secs(15), || {
        condition_is(&api, "True")
    });
    wait_for("the incident's event", Duration::from_secs(10), || {
        (events_of(&api, "RuntimeIncidentOpened").len() == 1).then_some(())
    });
    let (_, status) = hw.terminate();
    assert!(status.success(), "{status}");
    assert!(
        dir.path().join("kube-events.json").exists(),
        "the ledger is saved"
    );
    let creates_before = api.requests().iter().filter(|r| r.method == "POST").count();

    let restarted_at = SystemTime::now();
    let hw = Hangwatch::start(&config, dir.path());
    // Until the new process has patched (its heartbeat is newer than its start), and after:
    // never False, never a new transition time.
    let (_, _) = wait_for(
        "a heartbeat from the new process",
        Duration::from_secs(20),
        || {
            let c = api.condition(NODE, CONDITION);
            assert_eq!(c["status"], "True", "flapped after the restart: {c}");
            assert_eq!(c["lastTransitionTime"], hung["lastTransitionTime"], "{c}");
            (time_of(&c, "lastHeartbeatTime") + Duration::from_secs(1) >= restarted_at
                && hw.runtime_is("docker", "hung"))
            .then_some(())
        },
    );
    let c = api.condition(NODE, CONDITION);
    assert_eq!(c["reason"], "DockerdHung", "{c}");
    assert_eq!(c["lastTransitionTime"], hung["lastTransitionTime"]);
    daemons.signal_dockerd(libc::SIGCONT);
    wait_for("the condition False", Duration::from_secs(20), || {
        condition_is(&api, "False")
    });
    // The incident loaded from disk was announced before the restart: no second create,
    // no repeat; its close is new.
    wait_for("the close event", Duration::from_secs(10), || {
        (events_of(&api, "RuntimeIncidentClosed").len() == 1).then_some(())
    });
    let opened = events_of(&api, "RuntimeIncidentOpened");
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(
        opened[0]["count"], 1,
        "no repeat after the restart: {opened:?}"
    );
    let creates_after = api.requests().iter().filter(|r| r.method == "POST").count();
    assert_eq!(
        creates_after,
        creates_before + 1,
        "only the close was created"
    );
}

#[test]
fn a_hung_or_failing_api_server_never_delays_the_stall_verdict_and_the_condition_catches_up() {
    let api = FakeApiServer::start(&[NODE]);
    api.hang(true);
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("ns-hang");
    let hw = Hangwatch::start(&config(&daemons, &dir, &api, ""), dir.path());
    wait_for("docker healthy", Duration::from_secs(20), || {
        hw.runtime_is("docker", "healthy").then_some(())
    });
    daemons.signal_dockerd(libc::SIGSTOP);
    // stall_threshold 2 s + interval 0.5 s + evaluation: the verdict comes as fast as
    // without an API server at all.
    let (_, took) = wait_for("docker hung in /metrics", Duration::from_secs(6), || {
        hw.runtime_is("docker", "hung").then_some(())
    });
    assert!(took < Duration::from_secs(5), "verdict took {took:?}");
    let metrics = hw.metrics();
    let timeouts = support::hangwatch::metric_value(
        &metrics,
        "hangwatch_kube_api_requests_total",
        &[("result", "timeout")],
    );
    assert!(timeouts.is_some_and(|t| t >= 1.0), "{metrics}");
    assert_eq!(
        support::hangwatch::metric_value(&metrics, "hangwatch_kube_pending_updates", &[]),
        Some(1.0)
    );
    assert_eq!(api.condition(NODE, CONDITION), Value::Null);

    api.hang(false);
    let (hung, _) = wait_for("the condition catches up", Duration::from_secs(10), || {
        condition_is(&api, "True")
    });
    assert_eq!(hung["reason"], "DockerdHung");

    api.fail(true);
    daemons.signal_dockerd(libc::SIGCONT);
    wait_for(
        "docker healthy again in /metrics",
        Duration::from_secs(10),
        || hw.runtime_is("docker", "healthy").then_some(()),
    );
    wait_for("500s counted", Duration::from_secs(5), || {
        hw.metric("hangwatch_kube_api_requests_total", &[("result", "error")])
            .filter(|n| *n >= 1.0)
    });
    assert_eq!(
        api.condition(NODE, CONDITION)["status"],
        "True",
        "not written while 500"
    );
    api.fail(false);
    let (cleared, _) = wait_for("the condition catches up", Duration::from_secs(10), || {
        condition_is(&api, "False")
    });
    assert_eq!(cleared["reason"], "ContainerRuntimeHealthy");
}

/// Real OOM kills become Events: `runc:[2:INIT]`'s on the Node, a pod's container's on the
/// Pod, in the pod's namespace; each once.
#[test]
fn oom_kills_become_events_on_the_node_and_on_the_pod() {
    let api = FakeApiServer::start(&[NODE]);
    let daemons = PrivateDaemons::start();
    daemons.import_image("hwtest:oom", &[]);
    let dir = TempDir::new("ns-oom");
    let hw = Hangwatch::start(&config(&daemons, &dir, &api, ""), dir.path());
    wait_for("kernel_log_up 1", Duration::from_secs(10), || {
        (hw.metric("hangwatch_kernel_log_up", &[]) == Some(1.0)).then_some(())
    });

    let cgroup = support::oom::TestCgroup::v1_memory_20mib();
    let victim = support::oom::OomVictim::start("runc:[2:INIT]", &cgroup, dir.path());
    victim.allocate_until_killed();
    let (node_events, _) = wait_for("the Node event", Duration::from_secs(10), || {
        let found = events_of(&api, "RuncInitOOMKilled");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(node_events.len(), 1, "{node_events:?}");
    assert_eq!(node_events[0]["involvedObject"]["kind"], "Node");
    assert!(
        node_events[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("runc:[2:INIT]")),
        "{}",
        node_events[0]
    );

    let uid = "3f1c6f0e-1b7a-4c39-9d7e-5b2a0c4e8a11";
    let output = daemons.docker(&[
        "run",
        "--name",
        "k8s_cart_cart-1_shop_0",
        "--label",
        "io.kubernetes.pod.name=cart-1",
        "--label",
        "io.kubernetes.pod.namespace=shop",
        "--label",
        &format!("io.kubernetes.pod.uid={uid}"),
        "--label",
        "io.kubernetes.container.name=cart",
        "--network",
        "none",
        "-m",
        "20m",
        "--memory-swap",
        "20m",
        "hwtest:oom",
        "sh",
        "-c",
        "x=a; while true; do x=$x$x; done",
    ]);
    assert_eq!(
        output.status.code(),
        Some(137),
        "the container was OOM-killed"
    );
    let (pod_events, _) = wait_for("the Pod event", Duration::from_secs(20), || {
        let found = events_of(&api, "ContainerOOMKilled");
        (!found.is_empty()).then_some(found)
    });
    let event = &pod_events[0];
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert_eq!(
        event["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "namespace": "shop", "name": "cart-1", "uid": uid})
    );
    assert_eq!(event["source"]["host"], NODE);
    drop(hw);
}

/// The seed's hang without the runtimes: a `runc` blocked opening its `exec.fifo` with no
/// `runc:[2:INIT]` to meet it sets `RuntimeTasksStuck` with `RuncExecFifoHang`; killing it
/// clears the condition.
#[test]
fn a_runc_blocked_on_its_exec_fifo_sets_runtime_tasks_stuck_until_it_is_gone() {
    let api = FakeApiServer::start(&[NODE]);
    let dir = TempDir::new("ns-runc");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
    let config = format!(
        "state_dir: {state}\nnode_name: {NODE}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
         proc_scan:\n  interval: 500ms\n  stuck_after: 1s\n  runc_stuck_after: 1s\n\
         node_status:\n  enabled: true\n  kubeconfig: {}\n  retry_interval: 200ms\n",
        kubeconfig.display(),
        state = dir.path().display(),
    );
    let id = format!("{:064x}", 0x5eed_u64 + u64::from(std::process::id()));
    let runc_dir = dir.path().join("runc-state");
    std::fs::create_dir_all(runc_dir.join(&id)).expect("state dir");
    let fifo = runc_dir.join(&id).join("exec.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let runc = runc_dir.join("runc");
    std::os::unix::fs::symlink(support::helper_binary("procscan_block"), &runc).expect("symlink");

    let hw = Hangwatch::start(&config, dir.path());
    let (healthy, _) = wait_for("RuntimeTasksStuck False", Duration::from_secs(20), || {
        let c = api.condition(NODE, "RuntimeTasksStuck");
        (c["status"] == "False").then_some(c)
    });
    assert_eq!(healthy["reason"], "NoRuntimeTasksStuck");

    let mut blocked = support::KilledOnDrop(
        std::process::Command::new(&runc)
            .args(["fifo-read", fifo.to_str().expect("path")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("runc helper"),
    );
    let (stuck, _) = wait_for("RuntimeTasksStuck True", Duration::from_secs(20), || {
        let c = api.condition(NODE, "RuntimeTasksStuck");
        (c["status"] == "True").then_some(c)
    });
    assert_eq!(stuck["reason"], "RuncExecFifoHang", "{stuck}");
    assert!(
        stuck["message"]
            .as_str()
            .is_some_and(|m| m.contains("exec.fifo") && m.starts_with("runc pid")),
        "{stuck}"
    );
    // While it stays stuck nothing changes: no PATCH until the heartbeat (5 min) is due.
    let patches = status_patches(&api).len();
    let scans = |hw: &Hangwatch| {
        hw.metric("hangwatch_proc_scan_duration_seconds_count", &[])
            .unwrap_or(0.0)
    };
    let scanned = scans(&hw);
    wait_for("four more scans", Duration::from_secs(10), || {
        (scans(&hw) >= scanned + 4.0).then_some(())
    });
    assert_eq!(
        status_patches(&api).len(),
        patches,
        "a PATCH without a change"
    );
    let _ = blocked.0.kill();
    let _ = blocked.0.wait();
    let (cleared, _) = wait_for(
        "RuntimeTasksStuck False again",
        Duration::from_secs(20),
        || {
            let c = api.condition(NODE, "RuntimeTasksStuck");
            (c["status"] == "False").then_some(c)
        },
    );
    assert!(time_of(&cleared, "lastTransitionTime") >= time_of(&stuck, "lastTransitionTime"));
    drop(hw);
}

/// A cgroup parent of the test's own, frozen through the v1 freezer: a container under it
/// keeps its SIGKILL pending, so its stop is stuck (see tests/lifecycle.rs). Thawed and
/// removed on drop.
struct FrozenParent(String);

impl FrozenParent {
    fn freezer_state(&self) -> std::path::PathBuf {
        std::path::Path::new("/sys/fs/cgroup/freezer")
            .join(&self.0)
            .join("freezer.state")
    }

    fn thaw(&self) {
        let _ = std::fs::write(self.freezer_state(), "THAWED");
    }
}

impl Drop for FrozenParent {
    fn drop(&mut self) {
        self.thaw();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&self.0));
            }
        }
    }
}

/// A pod's container whose stop is stuck sets `ContainerStopStuck` (held by frozen tasks)
/// and gets an Event on its Pod; the thaw clears the condition.
#[test]
fn a_stuck_stop_sets_container_stop_stuck_and_an_event_on_its_pod() {
    assert!(
        std::path::Path::new("/sys/fs/cgroup/freezer").is_dir(),
        "this test needs the cgroup v1 freezer (hybrid hierarchy)"
    );
    let parent = FrozenParent(format!("hwns-{}", std::process::id()));
    let api = FakeApiServer::start(&[NODE]);
    let daemons = PrivateDaemons::start();
    daemons.import_image("hwtest:stop", &[]);
    let dir = TempDir::new("ns-stop");
    let extra = "proc_scan:\n  interval: 500ms\n  stuck_after: 2s\nlifecycle:\n  stop_grace: 2s\n";
    let hw = Hangwatch::start(&config(&daemons, &dir, &api, extra), dir.path());
    wait_for("ContainerStopStuck False", Duration::from_secs(20), || {
        (api.condition(NODE, "ContainerStopStuck")["status"] == "False").then_some(())
    });

    let uid = "9b0c1e2d-3f4a-4b5c-8d6e-7f8091a2b3c4";
    daemons.docker_ok(&[
        "run",
        "-d",
        "--name",
        "k8s_web_web-0_shop_0",
        "--label",
        "io.kubernetes.pod.name=web-0",
        "--label",
        "io.kubernetes.pod.namespace=shop",
        "--label",
        &format!("io.kubernetes.pod.uid={uid}"),
        "--network",
        "none",
        "--cgroup-parent",
        &format!("/{}", parent.0),
        "hwtest:stop",
        "sh",
        "-c",
        "sleep 1000",
    ]);
    wait_for("running", Duration::from_secs(30), || {
        (daemons.docker_ok(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            "k8s_web_web-0_shop_0",
        ]) == "true")
            .then_some(())
    });
    std::fs::write(parent.freezer_state(), "FROZEN").expect("freeze");
    let _stop = support::KilledOnDrop(
        std::process::Command::new("timeout")
            .arg("90")
            .arg(support::daemons::DOCKER_CLI)
            .arg("-H")
            .arg(format!("unix://{}", daemons.docker_socket.display()))
            .args(["stop", "-t", "1", "k8s_web_web-0_shop_0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker stop"),
    );
    let (stuck, _) = wait_for("ContainerStopStuck True", Duration::from_secs(30), || {
        let c = api.condition(NODE, "ContainerStopStuck");
        (c["status"] == "True" && c["reason"] == "StopHeldByFrozenTasks").then_some(c)
    });
    assert!(
        stuck["message"]
            .as_str()
            .is_some_and(|m| m.contains("(pod shop/web-0)") && m.contains("frozen")),
        "{stuck}"
    );
    let (events, _) = wait_for("the Pod's event", Duration::from_secs(15), || {
        let found = events_of(&api, "ContainerStopStuck");
        (!found.is_empty()).then_some(found)
    });
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["metadata"]["namespace"], "shop");
    assert_eq!(events[0]["involvedObject"]["name"], "web-0");
    assert_eq!(events[0]["involvedObject"]["uid"], uid);

    parent.thaw();
    wait_for(
        "ContainerStopStuck False again",
        Duration::from_secs(30),
        || (api.condition(NODE, "ContainerStopStuck")["status"] == "False").then_some(()),
    );
    drop(hw);
}

/// hangwatch with no runtime to probe, publishing to `api` through `kubeconfig`.
fn without_runtimes(dir: &TempDir, kubeconfig: &str) -> String {
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig).expect("kubeconfig");
    format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
         cri:\n  mode: disabled\nnode_name: {NODE}\nnode_status:\n  enabled: true\n  \
         kubeconfig: {}\n  request_timeout: 1s\n  retry_interval: 200ms\n",
        dir.path().display(),
        path.display()
    )
}

/// A real API server speaks only HTTPS. With the cluster's CA the publisher writes its
/// conditions over TLS; with a CA that did not sign the server's certificate it writes
/// nothing and counts the failed calls.
#[test]
fn over_tls_conditions_are_written_with_the_clusters_ca_and_never_without_it() {
    let api = FakeApiServer::start_tls(&[NODE]);
    assert!(api.url().starts_with("https://"), "{}", api.url());

    let stranger = FakeApiServer::start_tls(&[]);
    let stranger_ca = stranger.ca_path().expect("a CA");
    let wrong = api.kubeconfig().replace(
        &api.ca_path().expect("a CA").display().to_string(),
        &stranger_ca.display().to_string(),
    );
    let dir = TempDir::new("ns-tls-wrong");
    let untrusting = Hangwatch::start(&without_runtimes(&dir, &wrong), dir.path());
    wait_for(
        "calls refused for the unknown certificate",
        Duration::from_secs(20),
        || {
            untrusting
                .metric(
                    "hangwatch_kube_api_requests_total",
                    &[("result", "unreachable")],
                )
                .filter(|n| *n >= 2.0)
        },
    );
    assert!(
        status_patches(&api).is_empty() && api.requests().is_empty(),
        "no request gets past a certificate the client does not trust"
    );
    drop(untrusting);

    let dir = TempDir::new("ns-tls");
    let hw = Hangwatch::start(&without_runtimes(&dir, &api.kubeconfig()), dir.path());
    let (healthy, _) = wait_for(
        "the condition written over TLS",
        Duration::from_secs(20),
        || condition_is(&api, "False"),
    );
    assert_eq!(healthy["reason"], "ContainerRuntimeHealthy", "{healthy}");
    assert!(
        hw.metric("hangwatch_kube_api_requests_total", &[("result", "ok")])
            .is_some_and(|n| n >= 2.0),
        "the read-back and the patch went through"
    );
}
