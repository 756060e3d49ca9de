//! Stuck kills on a node without dockerd: a private containerd with its CRI plugin, a pod
//! whose tasks cannot take SIGKILL (its cgroup parent frozen through the v1 freezer), stopped
//! through CRI `StopContainer`. Only /proc shows the stop (no Docker events): SIGKILL pending
//! on the container's tasks; containerd's `/tasks/exit` ends it with the exit code once thawed.
//! Run under the real-tests lock:
//! `flock /tmp/hangwatch-real-tests.lock cargo test --test cri_stops`.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use serde_json::Value;
use support::cri::PrivateCri;
use support::hangwatch::{Hangwatch, TempDir, run_cli};
use support::wait_for;

/// `proc_scan.stuck_after`: how long a kill may stay pending before its stop is stuck.
const STUCK_AFTER: Duration = Duration::from_secs(2);

const CONFIG: &str = "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 20s\n\
    kernel_log:\n  enabled: false\n\
    proc_scan:\n  interval: 500ms\n  stuck_after: 2s\n";

/// The pods' cgroup parent frozen through the v1 freezer, thawed on drop (also when the test
/// fails), so no container is left that nobody can remove. Freezing the container's own cgroup
/// would not do: runc thaws it before SIGKILL.
struct Frozen(PathBuf);

impl Frozen {
    fn freeze(cgroup_parent: &str) -> Frozen {
        let state = Path::new("/sys/fs/cgroup/freezer")
            .join(cgroup_parent.trim_start_matches('/'))
            .join("freezer.state");
        std::fs::write(&state, "FROZEN").expect("freeze the pods' cgroup parent");
        Frozen(state)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "THAWED");
    }
}

fn stops(hw: &Hangwatch) -> Value {
    let (code, body) = hw.get("/stops");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/stops is JSON")
}

/// Container exits counted from containerd's events with `reason`.
fn exits(hw: &Hangwatch, reason: &str) -> f64 {
    hw.metric(
        "hangwatch_container_exits_total",
        &[("runtime", "containerd"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

fn stuck_series(hw: &Hangwatch, id: &str) -> Option<String> {
    hw.metrics()
        .lines()
        .find(|l| {
            l.starts_with("hangwatch_stuck_container_stop_seconds{")
                && l.contains(&format!("container_id=\"{id}\""))
        })
        .map(str::to_string)
}

#[test]
fn a_cri_stop_of_a_frozen_pod_is_a_stuck_stop_seen_in_proc_with_its_tasks_until_thawed() {
    let _timing = support::exclusive();
    assert!(
        Path::new("/sys/fs/cgroup/freezer").is_dir(),
        "this test needs the cgroup v1 freezer (hybrid hierarchy)"
    );
    let daemon = PrivateCri::start();
    let web = daemon.run_pod("shop", "web", "app");
    let pid = daemon.container_pid(&web.container_id);
    let dir = TempDir::new("cri-stops");
    let hw = Hangwatch::start(&daemon.hangwatch_config(dir.path(), CONFIG), dir.path());
    wait_for(
        "the container named from CRI",
        Duration::from_secs(20),
        || {
            hw.status_json()["runtimes"]
                .as_array()?
                .iter()
                .any(|r| r["runtime"] == "cri" && r["state"] == "healthy")
                .then_some(())
        },
    );
    let (view, _) = wait_for(
        "containerd's event stream open",
        Duration::from_secs(20),
        || {
            let view = stops(&hw);
            (view["containerd_events_stream"]["healthy"] == true).then_some(view)
        },
    );
    assert_eq!(view["enabled"], true, "{view}");
    assert_eq!(view["events_stream"]["healthy"], true, "{view}");
    assert_eq!(
        hw.metric(
            "hangwatch_lifecycle_events_stream_up",
            &[("runtime", "containerd")]
        ),
        Some(1.0)
    );
    let terms_before = exits(&hw, "signal_term");
    assert_eq!(hw.metric("hangwatch_stuck_container_stops", &[]), Some(0.0));

    let frozen = Frozen::freeze(daemon.cgroup_parent());
    let began = Instant::now();
    let id = web.container_id.clone();
    // Blocks until the task exits: in the background, bounded.
    let stop = daemon.spawn_call(
        |mut c| async move {
            c.stop_container(cri::StopContainerRequest {
                container_id: id,
                timeout: 1,
            })
            .await
        },
        Duration::from_secs(90),
    );

    let (series, _) = wait_for("the stuck stop's series", Duration::from_secs(30), || {
        stuck_series(&hw, &web.container_id)
    });
    let latency = began.elapsed();
    eprintln!("stuck stop reported {latency:?} after StopContainer(timeout 1 s) began");
    // The kill cannot be pending before the call began; containerd sends SIGKILL at most
    // the 1 s timeout later, and scans run every 500 ms.
    assert!(
        latency >= STUCK_AFTER,
        "stuck before its kill was pending long enough: {latency:?}"
    );
    assert!(
        latency < Duration::from_secs(1) + STUCK_AFTER + Duration::from_secs(4),
        "reported late: {latency:?}"
    );
    assert!(
        series.contains("container_name=\"app\"")
            && series.contains("pod=\"web\"")
            && series.contains("namespace=\"shop\""),
        "named from CRI: {series}"
    );
    assert_eq!(hw.metric("hangwatch_stuck_container_stops", &[]), Some(1.0));

    let (stuck, _) = wait_for(
        "the stuck stop in /stops with the task holding it",
        Duration::from_secs(15),
        || {
            stops(&hw)["in_progress"]
                .as_array()?
                .iter()
                .find(|s| s["container"]["id"] == web.container_id.as_str() && s["stuck"] == true)
                .cloned()
        },
    );
    assert_eq!(stuck["seen_by"], "proc_kill_pending", "{stuck}");
    assert_eq!(stuck["signals"], serde_json::json!([9]), "{stuck}");
    let tasks = stuck["held_by"]["stuck_tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let task = tasks
        .iter()
        .find(|t| t["pid"] == pid)
        .unwrap_or_else(|| panic!("the container's process {pid} holds it: {stuck}"));
    assert_eq!(task["sigkill_pending"], true, "{stuck}");
    assert_eq!(task["frozen"], true, "{stuck}");
    assert_eq!(task["comm"], "sleep", "{stuck}");

    let (incident, _) = wait_for(
        "an open containerd incident naming the stuck stop",
        Duration::from_secs(15),
        || {
            hw.list("/incidents").into_iter().find(|i| {
                i["ended_at"].is_null()
                    && i["stuck_stops"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s == web.container_id.as_str()))
            })
        },
    );
    assert_eq!(incident["runtime"], "containerd", "{incident}");
    assert_eq!(incident["layer"], "container", "{incident}");
    let cause = incident["suspected_cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("stop of container app") && cause.contains("SIGKILL pending"),
        "{cause}"
    );

    let config = dir.path().join("hangwatch.yaml");
    let (code, out, err) = run_cli(&["check", "--config", &config.to_string_lossy()]);
    assert_eq!(code, 1, "a stuck stop is a problem: {out}{err}");
    assert!(
        out.contains("stop of container app") && out.contains("SIGKILL pending (seen in /proc)"),
        "{out}"
    );
    assert!(
        out.contains(&format!("pid {pid} ")),
        "the task named: {out}"
    );
    assert!(
        out.contains("containerd exits: not read by check"),
        "check does not pretend to have read containerd's events: {out}"
    );

    drop(frozen);
    wait_for(
        "the stop to end and its series to go",
        Duration::from_secs(20),
        || {
            (hw.metric("hangwatch_stuck_container_stops", &[]) == Some(0.0)
                && stuck_series(&hw, &web.container_id).is_none())
            .then_some(())
        },
    );
    let (ended, _) = wait_for(
        "the ended stop with the exit code from /tasks/exit",
        Duration::from_secs(10),
        || {
            stops(&hw)["recent"]
                .as_array()?
                .iter()
                .find(|s| {
                    s["container"]["id"] == web.container_id.as_str() && !s["exit_code"].is_null()
                })
                .cloned()
        },
    );
    assert_eq!(ended["was_stuck"], true, "{ended}");
    // SIGTERM came first and `sleep` (not the PID namespace's init: the sandbox is) has no
    // handler: the kernel made it fatal at once, queueing the SIGKILL /proc showed pending,
    // and the exit status is SIGTERM's.
    assert_eq!(ended["exit_code"], 143, "{ended}");
    // containerd's exit usually comes first; a complete scan between the thaw and the exit
    // sees the kill land first, and the exit then adds its code.
    assert!(
        ended["ended_by"] == "exited" || ended["ended_by"] == "kill_landed",
        "{ended}"
    );
    wait_for("the exit counted", Duration::from_secs(10), || {
        (exits(&hw, "signal_term") >= terms_before + 1.0).then_some(())
    });
    let view = stops(&hw);
    let exit = view["recent_exits"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|e| e["container"]["id"] == web.container_id.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("the exit listed: {view}"));
    assert_eq!(exit["exit_status"], 143, "{exit}");
    assert_eq!(exit["reason"], "signal_term", "{exit}");
    assert_eq!(exit["containerd_namespace"], "k8s.io", "{exit}");
    assert_eq!(exit["container"]["pod"], "web", "{exit}");
    assert_eq!(
        view["in_progress"].as_array().map(Vec::len),
        Some(0),
        "no stop re-created for the gone container: {view}"
    );
    let stopped = stop.join().expect("StopContainer thread");
    assert!(
        stopped.is_ok(),
        "StopContainer returns once thawed: {stopped:?}"
    );
    wait_for("the incident to close", Duration::from_secs(20), || {
        hw.list("/incidents")
            .into_iter()
            .find(|i| i["id"] == incident["id"])
            .filter(|i| !i["ended_at"].is_null())
    });
}
