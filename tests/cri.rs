//! Kubelet's view against a real private containerd with its CRI plugin: healthy pods, the
//! real CRI-only hang (a stopped shim plus `UpdateContainerResources`, containerd#10583),
//! containerd itself stopped, a stopped shim's task listed UNKNOWN, and `check`.
//! Run under the real-tests lock: `flock /tmp/hangwatch-real-tests.lock cargo test --test cri`.

mod support;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use support::cri::{PrivateCri, Stopped};
use support::hangwatch::{Hangwatch, TempDir, metric_value, run_cli};
use support::wait_for;

/// The stall threshold of [`PROBES`].
const STALL: Duration = Duration::from_secs(2);

/// Like the shared fast probes, with a deadline long enough for containerd's `Tasks.List`
/// to answer past a stopped shim (about 2 s per task of it, sequentially).
const PROBES: &str =
    "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 20s\n";

/// The kernel log and /proc scan are other tests' business.
const QUIET: &str = "kernel_log:\n  enabled: false\nproc_scan:\n  enabled: false\n";

fn start(daemon: &PrivateCri, dir: &TempDir) -> Hangwatch {
    Hangwatch::start(
        &daemon.hangwatch_config(dir.path(), &format!("{PROBES}{QUIET}")),
        dir.path(),
    )
}

/// The runtime's entry in /status.
fn runtime(hw: &Hangwatch, name: &str) -> serde_json::Value {
    hw.status_json()["runtimes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["runtime"] == name).cloned())
        .unwrap_or_else(|| panic!("{name} missing from /status"))
}

fn state(hw: &Hangwatch, name: &str) -> (String, String) {
    let r = runtime(hw, name);
    (
        r["state"].as_str().unwrap_or_default().to_string(),
        r["reason"].as_str().unwrap_or_default().to_string(),
    )
}

fn wait_state(hw: &Hangwatch, name: &str, wanted: &str, deadline: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (now, reason) = state(hw, name);
        if now == wanted {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "{name} is {now} ({reason}), not {wanted}, after {deadline:?}\n{}",
            hw.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn healthy_pods_make_cri_healthy_with_every_call_observed_and_names_from_cri() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    let web = daemon.run_pod("shop", "web", "app");
    let dir = TempDir::new("cri-healthy");
    let hw = start(&daemon, &dir);
    wait_state(&hw, "cri", "healthy", Duration::from_secs(20));
    wait_state(&hw, "containerd", "healthy", Duration::from_secs(20));
    let text = hw.metrics();
    for operation in [
        "status",
        "list_pod_sandbox",
        "list_containers",
        "status_sample",
    ] {
        let count = metric_value(
            &text,
            "hangwatch_runtime_probe_duration_seconds_count",
            &[("runtime", "cri"), ("operation", operation)],
        )
        .unwrap_or_default();
        assert!(count >= 1.0, "no {operation} observed:\n{text}");
    }
    let left = metric_value(&text, "hangwatch_kubelet_pleg_relist_seconds_left", &[])
        .expect("relist clock exported");
    assert!(left > 170.0, "a healthy relist leaves nearly 3 min: {left}");
    let left = metric_value(&text, "hangwatch_kubelet_runtime_status_seconds_left", &[])
        .expect("status clock exported");
    assert!(left > 25.0, "{left}");

    // The status sample rotates through the pod and its container, named from the CRI lists.
    let (subject, _) = wait_for(
        "the status sample to name the container",
        Duration::from_secs(10),
        || {
            let r = runtime(&hw, "cri");
            let s = r.get("last_status_call")?.clone();
            (s["kind"] == "container").then_some(s)
        },
    );
    assert_eq!(subject["id"], web.container_id.as_str());
    assert_eq!(subject["container"], "app");
    assert_eq!(subject["pod"], "web");
    assert_eq!(subject["namespace"], "shop");

    let config = dir.path().join("hangwatch.yaml");
    let (code, out, err) = run_cli(&["check", "--config", &config.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cri "), "{out}");
    assert!(out.contains("list_pod_sandbox"), "{out}");
    assert!(out.contains("kubelet: PLEG relist"), "{out}");
}

/// The containerd#10583 lock: a pod's shim stopped, then `UpdateContainerResources` on its
/// container blocks holding the container's status lock; every `ListContainers` queues
/// behind it while containerd's own API answers.
#[test]
fn a_cri_only_hang_is_the_cri_layer_wedged_with_the_container_named_and_clears() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    // Other pods first, so the stuck one is found by the rotation, not by being first.
    daemon.run_pod("shop", "cache", "redis");
    daemon.run_pod("base", "db", "postgres");
    let web = daemon.run_pod("shop", "web", "app");
    let shim = daemon.shim_pid(&web.container_id);
    let dir = TempDir::new("cri-wedged");
    let hw = start(&daemon, &dir);
    wait_state(&hw, "cri", "healthy", Duration::from_secs(20));

    let stopped = Stopped::stop(shim);
    let id = web.container_id.clone();
    let update = daemon.spawn_call(
        move |mut c| async move {
            c.update_container_resources(cri::UpdateContainerResourcesRequest {
                container_id: id,
                linux: Some(cri::LinuxContainerResources {
                    cpu_shares: 512,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
        },
        Duration::from_secs(60),
    );
    let hang_began = Instant::now();
    wait_state(&hw, "cri", "wedged", STALL + Duration::from_secs(5));
    let took = hang_began.elapsed();
    assert!(
        took <= STALL + Duration::from_secs(1),
        "CRI wedged after {took:?}, more than the stall threshold + 1 s"
    );
    let (reason, _) = wait_for(
        "the reason to name the stuck container",
        Duration::from_secs(10),
        || {
            let (state, reason) = state(&hw, "cri");
            (state == "wedged" && reason.contains("container app")).then_some(reason)
        },
    );
    assert!(reason.starts_with("CRI layer wedged"), "{reason}");
    assert!(reason.contains("list_containers stuck"), "{reason}");
    assert!(reason.contains("pod shop/web"), "{reason}");
    assert!(reason.contains("containerd's own API answers"), "{reason}");
    let (containerd, containerd_reason) = state(&hw, "containerd");
    assert_ne!(containerd, "hung", "{containerd_reason}");
    let version = runtime(&hw, "containerd")["operations"]
        .as_array()
        .and_then(|ops| ops.iter().find(|o| o["operation"] == "version").cloned())
        .expect("version operation");
    assert!(
        version["in_flight_seconds"].as_f64().unwrap_or(f64::MAX) < 1.0,
        "containerd's own Version answers: {version}"
    );

    // containerd's Tasks.List reports the stopped shim's tasks UNKNOWN; hangwatch names it.
    let (task, _) = wait_for(
        "the UNKNOWN task with its shim",
        Duration::from_secs(20),
        || {
            runtime(&hw, "containerd")["unknown_tasks"]
                .as_array()?
                .iter()
                .find(|t| t["container_id"] == web.container_id.as_str())
                .cloned()
        },
    );
    assert_eq!(task["shim_pid"], shim, "{task}");
    assert_eq!(task["shim_state"], "T", "{task}");
    let (incident, _) = wait_for(
        "the incident's cause to name the chain",
        Duration::from_secs(10),
        || {
            hw.list("/incidents").into_iter().find(|i| {
                i["runtime"] == "cri"
                    && i["suspected_cause"]
                        .as_str()
                        .is_some_and(|c| c.contains("behind container app"))
            })
        },
    );
    let cause = incident["suspected_cause"].as_str().unwrap_or_default();
    assert!(cause.starts_with("CRI layer wedged"), "{cause}");
    assert!(cause.contains("CRI ListContainers blocked"), "{cause}");
    assert_eq!(incident["layer"], "cri", "{incident}");

    // The shim runs again: the update goes through, the lists answer, the incident closes.
    drop(stopped);
    let result = update.join().expect("update thread");
    assert!(result.is_ok(), "the queued update is applied: {result:?}");
    wait_state(&hw, "cri", "healthy", Duration::from_secs(30));
    wait_for("the CRI incident to close", Duration::from_secs(10), || {
        hw.list("/incidents")
            .into_iter()
            .find(|i| i["runtime"] == "cri")
            .filter(|i| !i["ended_at"].is_null())
    });
}

#[test]
fn containerd_stopped_makes_cri_and_native_stuck_which_is_containerd_hung() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    daemon.run_pod("shop", "web", "app");
    let dir = TempDir::new("cri-hung");
    let hw = start(&daemon, &dir);
    wait_state(&hw, "cri", "healthy", Duration::from_secs(20));
    let stopped = Stopped::stop(daemon.containerd_pid());
    wait_state(&hw, "containerd", "hung", STALL + Duration::from_secs(3));
    wait_state(&hw, "cri", "hung", STALL + Duration::from_secs(3));
    let (_, reason) = state(&hw, "cri");
    assert!(reason.starts_with("containerd hung"), "{reason}");
    let incident = hw
        .list("/incidents")
        .into_iter()
        .find(|i| i["runtime"] == "cri")
        .expect("a CRI incident");
    assert_eq!(incident["layer"], "containerd", "{incident}");
    // The event subscription stays open on a stopped containerd, and says nothing: its
    // silence is not trusted while containerd is hung.
    let exits_stream = |hw: &Hangwatch| {
        let (code, body) = hw.get("/stops");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("/stops is JSON")
            ["containerd_events_stream"]
            .clone()
    };
    let (stream, _) = wait_for(
        "containerd's event stream untrusted",
        Duration::from_secs(5),
        || Some(exits_stream(&hw)).filter(|s| s["healthy"] == false),
    );
    assert!(
        stream["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("containerd is hung")),
        "{stream}"
    );
    drop(stopped);
    wait_state(&hw, "cri", "healthy", Duration::from_secs(30));
    wait_for(
        "containerd's event stream trusted again",
        Duration::from_secs(10),
        || (exits_stream(&hw)["healthy"] == true).then_some(()),
    );
}

#[test]
fn a_stopped_shim_leaves_its_task_unknown_with_the_shim_pid_and_state() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    let web = daemon.run_pod("shop", "web", "app");
    let shim = daemon.shim_pid(&web.container_id);
    let dir = TempDir::new("cri-shim");
    let hw = start(&daemon, &dir);
    wait_state(&hw, "containerd", "healthy", Duration::from_secs(20));
    assert_eq!(
        hw.metric(
            "hangwatch_containerd_unknown_tasks",
            &[("namespace", "k8s.io")]
        ),
        Some(0.0)
    );
    let stopped = Stopped::stop(shim);
    let (found, _) = wait_for(
        "the shim's task listed UNKNOWN",
        Duration::from_secs(30),
        || {
            runtime(&hw, "containerd")["unknown_tasks"]
                .as_array()?
                .iter()
                .find(|t| t["container_id"] == web.container_id.as_str())
                .cloned()
        },
    );
    let count = hw
        .metric(
            "hangwatch_containerd_unknown_tasks",
            &[("namespace", "k8s.io")],
        )
        .unwrap_or_default();
    assert!(count >= 1.0, "counted: {count}");
    assert_eq!(found["shim_pid"], shim);
    assert_eq!(found["shim_state"], "T");
    assert!(
        hw.logs().contains("containerd lists a task as UNKNOWN"),
        "logged"
    );
    drop(stopped);
    wait_for("the count back to 0", Duration::from_secs(20), || {
        (hw.metric(
            "hangwatch_containerd_unknown_tasks",
            &[("namespace", "k8s.io")],
        )? == 0.0)
            .then_some(())
    });
}

/// Docker's containerd ships with its CRI plugin disabled: its socket answers, but not CRI.
/// That is no CRI runtime ("absent"), while the next socket in the list that serves CRI is used.
#[test]
fn a_containerd_without_its_cri_plugin_is_no_cri_and_the_next_socket_is_tried() {
    let _timing = support::exclusive();
    let plain = support::daemons::PrivateDaemons::containerd_only();
    let dir = TempDir::new("cri-notserved");
    let config = dir.path().join("check.yaml");
    let write = |sockets: &str| {
        std::fs::write(
            &config,
            format!(
                "state_dir: {}\n{PROBES}{QUIET}docker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
                 cri:\n  mode: auto\n  sockets: [{sockets}]\n",
                dir.path().display()
            ),
        )
        .expect("write config");
    };
    let cri_state = || {
        let (_, out, err) = run_cli(&[
            "check",
            "--config",
            &config.to_string_lossy(),
            "--format",
            "json",
        ]);
        let report: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("check JSON ({e}): {out}{err}"));
        report["snapshot"]["runtimes"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["runtime"] == "cri").cloned())
            .unwrap_or_else(|| panic!("cri missing: {out}"))
    };
    write(&plain.containerd_socket.display().to_string());
    let entry = cri_state();
    assert_eq!(entry["state"], "absent", "{entry}");

    // The daemon: the plain containerd first, then one with CRI; it settles on the second.
    let with_cri = PrivateCri::start();
    let hw = Hangwatch::start(
        &format!(
            "state_dir: {}\n{PROBES}{QUIET}docker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
             cri:\n  mode: auto\n  sockets: [{}, {}]\n",
            dir.path().display(),
            plain.containerd_socket.display(),
            with_cri.socket.display()
        ),
        dir.path(),
    );
    wait_state(&hw, "cri", "healthy", Duration::from_secs(20));
}
