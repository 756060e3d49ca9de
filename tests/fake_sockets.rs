//! What real daemons cannot do on demand, played by fake unix sockets: accept and never
//! reply, send headers then stall, send garbage, close mid-body, be absent, deny permission.
//! Each must give the right state, without a panic or a hang.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::hangwatch::{Hangwatch, TempDir, run_cli};
use support::wait_for;

#[derive(Clone, Copy)]
enum Behaviour {
    NeverReplies,
    HeadersThenStall,
    Garbage,
    ClosesMidBody,
}

/// Serve `behaviour` on a unix socket at `path` from a background thread for the rest of
/// the test process. Connections that must stall are kept open.
fn fake_socket(path: &Path, behaviour: Behaviour) {
    let listener = UnixListener::bind(path).expect("bind fake socket");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            match behaviour {
                Behaviour::NeverReplies => held.push(stream),
                Behaviour::HeadersThenStall => {
                    read_request(&mut stream);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n\
                          Content-Length: 4096\r\n\r\n",
                    );
                    held.push(stream);
                }
                Behaviour::Garbage => {
                    read_request(&mut stream);
                    let _ =
                        stream.write_all(b"\x00\xffSSH-2.0-not-http\r\n\x13\x37garbage\r\n\r\n");
                }
                Behaviour::ClosesMidBody => {
                    read_request(&mut stream);
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n\
                          Content-Length: 100\r\n\r\n[{\"Id\":\"abc",
                    );
                }
            }
        }
    });
}

fn read_request(stream: &mut UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf);
}

/// Fast probes; the kernel log and /proc are shared with tests that cause real OOM kills
/// and stuck tasks, and are not what these tests are about.
const THRESHOLDS: &str = "probes:\n  interval: 300ms\n  slow_threshold: 500ms\n  stall_threshold: 1s\n  deadline: 2s\n\
kernel_log:\n  enabled: false\nproc_scan:\n  enabled: false\n";

fn docker_config(dir: &Path, socket: &Path, mode: &str) -> PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\n{THRESHOLDS}docker:\n  mode: {mode}\n  socket: {}\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n",
            dir.display(),
            socket.display()
        ),
    )
    .expect("write config");
    config
}

fn containerd_config(dir: &Path, socket: &Path) -> PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\n{THRESHOLDS}docker:\n  mode: disabled\ncontainerd:\n  mode: required\n  socket: {}\ncri:\n  mode: disabled\n",
            dir.display(),
            socket.display()
        ),
    )
    .expect("write config");
    config
}

/// Run `check --format json`; returns exit code and the runtime's state and reason.
fn check(config: &Path, runtime: &str) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let (code, out, err) = run_cli(&[
        "check",
        "--config",
        &config.to_string_lossy(),
        "--format",
        "json",
    ]);
    let took = started.elapsed();
    assert!(!err.contains("panicked"), "panic: {err}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("check JSON ({e}): {out}{err}"));
    let entry = report["snapshot"]["runtimes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["runtime"] == runtime))
        .unwrap_or_else(|| panic!("{runtime} missing: {out}"))
        .clone();
    (
        code,
        entry["state"].as_str().unwrap_or_default().to_string(),
        entry["reason"].as_str().unwrap_or_default().to_string(),
        took,
    )
}

fn assert_state(behaviour: Behaviour, tag: &str, expected: &str, reason_contains: &str) {
    let dir = TempDir::new(tag);
    let socket = dir.path().join("docker.sock");
    fake_socket(&socket, behaviour);
    let (code, state, reason, took) =
        check(&docker_config(dir.path(), &socket, "required"), "docker");
    assert_eq!(state, expected, "{tag}: reason {reason}");
    assert!(reason.contains(reason_contains), "{tag}: reason {reason:?}");
    assert_eq!(code, 1, "{tag}: exit code");
    assert!(took < Duration::from_secs(4), "{tag}: check took {took:?}");
}

#[test]
fn docker_socket_that_accepts_and_never_replies_is_hung() {
    assert_state(Behaviour::NeverReplies, "silent", "hung", "ping stuck");
}

#[test]
fn docker_socket_that_sends_headers_then_stalls_is_hung() {
    assert_state(Behaviour::HeadersThenStall, "headers", "hung", "ping stuck");
}

#[test]
fn docker_socket_that_sends_garbage_is_down() {
    assert_state(Behaviour::Garbage, "garbage", "down", "error");
}

#[test]
fn docker_socket_that_closes_mid_body_is_down() {
    assert_state(Behaviour::ClosesMidBody, "midbody", "down", "error");
}

#[test]
fn missing_docker_socket_is_absent_in_auto_mode_and_down_when_required() {
    let dir = TempDir::new("missing");
    let socket = dir.path().join("nothing-here.sock");
    let (code, state, _, _) = check(&docker_config(dir.path(), &socket, "auto"), "docker");
    assert_eq!((code, state.as_str()), (0, "absent"));
    let (code, state, reason, _) = check(&docker_config(dir.path(), &socket, "required"), "docker");
    assert_eq!((code, state.as_str()), (1, "down"));
    assert!(reason.contains("socket missing"), "{reason}");
}

#[test]
fn refused_docker_socket_is_down() {
    let dir = TempDir::new("refused");
    let socket = dir.path().join("docker.sock");
    // A socket file nobody listens on any more: connect() is refused.
    drop(UnixListener::bind(&socket).expect("bind"));
    let (code, state, reason, _) = check(&docker_config(dir.path(), &socket, "required"), "docker");
    assert_eq!((code, state.as_str()), (1, "down"), "{reason}");
    assert!(reason.contains("refused"), "{reason}");
}

#[test]
fn permission_denied_is_down_and_check_cannot_check() {
    let dir = TempDir::new("denied");
    let private = dir.path().join("private");
    std::fs::create_dir(&private).expect("mkdir");
    let socket = private.join("docker.sock");
    fake_socket(&socket, Behaviour::NeverReplies);
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = docker_config(dir.path(), &socket, "required");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    // Root ignores permission bits: run hangwatch as nobody.
    let output = std::process::Command::new("timeout")
        .arg("60")
        .arg(support::hangwatch::binary())
        .args(["check", "--format", "json", "--config"])
        .arg(&config)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run check as nobody");
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(report["outcome"], "could_not_check");
    assert_eq!(report["snapshot"]["runtimes"][0]["state"], "down");
    assert!(
        report["snapshot"]["runtimes"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("permission denied")),
        "{report}"
    );
}

#[test]
fn containerd_socket_that_never_replies_is_hung_and_garbage_is_down() {
    let dir = TempDir::new("ctd-silent");
    let socket = dir.path().join("containerd.sock");
    fake_socket(&socket, Behaviour::NeverReplies);
    let (code, state, reason, _) = check(&containerd_config(dir.path(), &socket), "containerd");
    assert_eq!((code, state.as_str()), (1, "hung"), "{reason}");

    let dir = TempDir::new("ctd-garbage");
    let socket = dir.path().join("containerd.sock");
    fake_socket(&socket, Behaviour::Garbage);
    let (code, state, reason, _) = check(&containerd_config(dir.path(), &socket), "containerd");
    assert_eq!((code, state.as_str()), (1, "down"), "{reason}");
}

/// The daemon against a socket that stalls after headers: stalled, then the hard deadline
/// fires (a timeout failure is counted), the stall holds, /metrics keeps answering.
#[test]
fn daemon_survives_a_stalling_socket_and_counts_timeouts() {
    let dir = TempDir::new("daemon-stall");
    let socket = dir.path().join("docker.sock");
    fake_socket(&socket, Behaviour::HeadersThenStall);
    let config =
        std::fs::read_to_string(docker_config(dir.path(), &socket, "required")).expect("config");
    let hw = Hangwatch::start(&config, dir.path());
    wait_for(
        "a timeout failure to be counted",
        Duration::from_secs(10),
        || {
            hw.metric(
                "hangwatch_runtime_probe_failures_total",
                &[("runtime", "docker"), ("reason", "timeout")],
            )
            .filter(|v| *v >= 1.0)
        },
    );
    assert_eq!(
        hw.metric("hangwatch_runtime_stalled", &[("runtime", "docker")]),
        Some(1.0)
    );
    let asked = Instant::now();
    hw.metrics();
    assert!(asked.elapsed() < Duration::from_millis(100));
    assert!(!hw.logs().contains("panicked"));
}
