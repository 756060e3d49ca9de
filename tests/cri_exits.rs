//! Container exits from containerd's event service on a node without dockerd: a private
//! containerd with its CRI plugin, pods created through CRI. An OOM kill is an `oom` exit
//! named from CRI, a plain `StopContainer` an exit by signal and no stuck stop, the
//! subscription outlives the probe deadline in silence and comes back after containerd is
//! killed and started again; a socket that answers garbage is a stream down with backoff.
//! Run under the real-tests lock:
//! `flock /tmp/hangwatch-real-tests.lock cargo test --test cri_exits`.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cri::PrivateCri;
use support::hangwatch::{Hangwatch, TempDir};
use support::wait_for;

const CONFIG: &str = "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 20s\n\
    kernel_log:\n  enabled: false\n\
    proc_scan:\n  interval: 500ms\n  stuck_after: 2s\n";

/// The probe deadline of the robustness test: the subscription must outlive it.
const SHORT_DEADLINE: Duration = Duration::from_secs(2);
const SHORT_CONFIG: &str = "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 1500ms\n  deadline: 2s\n\
    kernel_log:\n  enabled: false\n\
    proc_scan:\n  interval: 500ms\n  stuck_after: 2s\n";

fn stops(hw: &Hangwatch) -> Value {
    let (code, body) = hw.get("/stops");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("/stops is JSON")
}

fn containerd_metric(hw: &Hangwatch, name: &str) -> f64 {
    hw.metric(name, &[("runtime", "containerd")]).unwrap_or(0.0)
}

fn exits(hw: &Hangwatch, reason: &str) -> f64 {
    hw.metric(
        "hangwatch_container_exits_total",
        &[("runtime", "containerd"), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

fn wait_stream_healthy(hw: &Hangwatch) {
    wait_for(
        "containerd's event stream open and trusted",
        Duration::from_secs(30),
        || (stops(hw)["containerd_events_stream"]["healthy"] == true).then_some(()),
    );
}

/// The listed exit of `container_id` once `ready` holds for it.
fn listed_exit(hw: &Hangwatch, container_id: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait_for(
        "the exit in /stops recent_exits",
        Duration::from_secs(30),
        || {
            stops(hw)["recent_exits"]
                .as_array()?
                .iter()
                .find(|e| e["container"]["id"] == container_id && ready(e))
                .cloned()
        },
    )
    .0
}

#[test]
fn an_oom_killed_container_is_an_oom_exit_named_from_cri() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    let dir = TempDir::new("cri-exits-oom");
    let hw = Hangwatch::start(&daemon.hangwatch_config(dir.path(), CONFIG), dir.path());
    wait_stream_healthy(&hw);
    assert_eq!(
        containerd_metric(&hw, "hangwatch_container_oom_events_total"),
        0.0
    );
    assert_eq!(exits(&hw, "oom"), 0.0, "the series exists before any exit");

    // busybox `tail` keeps the last line of /dev/zero, which never ends: memory without bound.
    let hog = daemon.run_pod_with(
        "shop",
        "hog",
        "eater",
        &["/bin/tail", "/dev/zero"],
        Some(32 * 1024 * 1024),
    );
    wait_for(
        "containerd's OOM event counted",
        Duration::from_secs(30),
        || (containerd_metric(&hw, "hangwatch_container_oom_events_total") >= 1.0).then_some(()),
    );
    wait_for("the exit counted as oom", Duration::from_secs(30), || {
        (exits(&hw, "oom") >= 1.0).then_some(())
    });
    assert_eq!(exits(&hw, "signal_kill"), 0.0, "counted once, as oom");
    let exit = listed_exit(&hw, &hog.container_id, |e| {
        e["container"]["name"].is_string()
    });
    assert_eq!(exit["reason"], "oom", "{exit}");
    assert_eq!(exit["oom"], true, "{exit}");
    assert_eq!(exit["exit_status"], 137, "the OOM killer's SIGKILL: {exit}");
    assert_eq!(exit["container"]["name"], "eater", "{exit}");
    assert_eq!(exit["container"]["pod"], "hog", "{exit}");
    assert_eq!(exit["container"]["namespace"], "shop", "{exit}");
    assert_eq!(hw.metric("hangwatch_stuck_container_stops", &[]), Some(0.0));
    assert!(!hw.logs().contains("panicked"), "{}", hw.logs());
}

#[test]
fn a_stop_of_a_healthy_container_is_an_exit_by_signal_and_no_stuck_stop() {
    let _timing = support::exclusive();
    let daemon = PrivateCri::start();
    let calm = daemon.run_pod("shop", "calm", "app");
    let dir = TempDir::new("cri-exits-stop");
    let hw = Hangwatch::start(&daemon.hangwatch_config(dir.path(), CONFIG), dir.path());
    wait_stream_healthy(&hw);

    daemon
        .stop_container(&calm.container_id)
        .expect("StopContainer");
    // `sleep` is not its PID namespace's init (the pod's sandbox is) and has no handler:
    // SIGTERM ends it, 128 + 15.
    let exit = listed_exit(&hw, &calm.container_id, |_| true);
    assert_eq!(exit["exit_status"], 143, "{exit}");
    let reason = "signal_term";
    assert_eq!(exit["reason"], reason, "{exit}");
    assert_eq!(exit["oom"], false, "{exit}");
    assert_eq!(exit["container"]["name"], "app", "{exit}");
    wait_for("the exit counted", Duration::from_secs(10), || {
        (exits(&hw, reason) == 1.0).then_some(())
    });
    let view = stops(&hw);
    assert_eq!(view["in_progress"], serde_json::json!([]), "{view}");
    assert!(
        view["recent"]
            .as_array()
            .is_some_and(|r| r.iter().all(|s| s["was_stuck"] == false)),
        "{view}"
    );
    assert_eq!(hw.metric("hangwatch_stuck_container_stops", &[]), Some(0.0));
    assert_eq!(
        containerd_metric(&hw, "hangwatch_lifecycle_events_malformed_total"),
        0.0
    );
}

#[test]
fn the_subscription_outlives_the_deadline_and_returns_after_containerd_restarts() {
    let _timing = support::exclusive();
    let mut daemon = PrivateCri::start();
    let dir = TempDir::new("cri-exits-restart");
    let hw = Hangwatch::start(
        &daemon.hangwatch_config(dir.path(), SHORT_CONFIG),
        dir.path(),
    );
    wait_stream_healthy(&hw);
    let up = |hw: &Hangwatch| containerd_metric(hw, "hangwatch_lifecycle_events_stream_up");
    let reconnects = |hw: &Hangwatch| {
        containerd_metric(hw, "hangwatch_lifecycle_events_stream_reconnects_total")
    };

    // No container exits: the stream is silent for more than twice the probe deadline, and
    // stays the one subscription.
    let silent_since = Instant::now();
    while silent_since.elapsed() < 2 * SHORT_DEADLINE + Duration::from_secs(1) {
        assert_eq!(up(&hw), 1.0, "{}", hw.logs());
        assert_eq!(reconnects(&hw), 0.0, "{}", hw.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let stream = stops(&hw)["containerd_events_stream"].clone();
    assert_eq!(stream["last_error"], Value::Null, "{stream}");
    assert_eq!(stream["healthy"], true, "{stream}");

    daemon.kill_containerd();
    let (stream, _) = wait_for(
        "the stream down with a retry planned",
        Duration::from_secs(30),
        || {
            let stream = stops(&hw)["containerd_events_stream"].clone();
            (up(&hw) == 0.0 && stream["healthy"] == false && stream["retry_in_seconds"].is_number())
                .then_some(stream)
        },
    );
    assert!(stream["last_error"].is_string(), "{stream}");
    let (code, _) = hw.get("/healthz");
    assert_eq!(code, 200, "the detector keeps beating: {}", hw.logs());

    daemon.start_containerd_again();
    wait_for("the stream open again", Duration::from_secs(60), || {
        (up(&hw) == 1.0 && reconnects(&hw) == 1.0).then_some(())
    });
    wait_stream_healthy(&hw);
    // The new subscription delivers: a container started and stopped now is seen to exit.
    let after = daemon.run_pod("shop", "after", "app");
    daemon
        .stop_container(&after.container_id)
        .expect("StopContainer");
    listed_exit(&hw, &after.container_id, |_| true);
    assert!(!hw.logs().contains("panicked"), "{}", hw.logs());
}

/// Accepts connections and answers each with bytes that are not HTTP/2.
fn garbage_socket(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind fake socket");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff\x13\x37");
        }
    });
}

#[test]
fn a_socket_answering_garbage_is_a_stream_down_with_backoff_and_no_panic() {
    let dir = TempDir::new("cri-exits-garbage");
    let socket = dir.path().join("containerd.sock");
    garbage_socket(&socket);
    let config = format!(
        "state_dir: {state}\n{SHORT_CONFIG}docker:\n  mode: disabled\n\
         containerd:\n  mode: required\n  socket: {sock}\n  namespaces: [k8s.io]\n\
         cri:\n  mode: disabled\n",
        state = dir.path().display(),
        sock = socket.display(),
    );
    let hw = Hangwatch::start(&config, dir.path());
    // The backoff doubles from 0.5 s: a wait of 2 s is the third failed attempt.
    let (stream, _) = wait_for(
        "the stream down, backing off",
        Duration::from_secs(30),
        || {
            let stream = stops(&hw)["containerd_events_stream"].clone();
            (stream["retry_in_seconds"].as_f64()? >= 2.0).then_some(stream)
        },
    );
    assert_eq!(stream["connected"], false, "{stream}");
    assert_eq!(stream["healthy"], false, "{stream}");
    assert!(stream["last_error"].is_string(), "{stream}");
    assert_eq!(
        containerd_metric(&hw, "hangwatch_lifecycle_events_stream_up"),
        0.0
    );
    let (code, _) = hw.get("/healthz");
    assert_eq!(code, 200, "{}", hw.logs());
    assert!(!hw.logs().contains("panicked"), "{}", hw.logs());
}
