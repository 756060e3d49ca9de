//! What a real CRI server cannot do on demand, played by fake unix sockets: accept and never
//! answer (no HTTP/2 handshake, as a stopped containerd), garbage instead of HTTP/2, a
//! connection closed mid-stream. Each gives the right state for the `cri` runtime, quickly,
//! with no panic.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::hangwatch::{TempDir, run_cli};

#[derive(Clone, Copy)]
enum Behaviour {
    NeverAnswers,
    Garbage,
    ClosesMidStream,
}

/// The client's HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: the server's half of the handshake.
const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

fn fake_socket(path: &Path, behaviour: Behaviour) {
    let listener = UnixListener::bind(path).expect("bind fake socket");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            match behaviour {
                Behaviour::NeverAnswers => held.push(stream),
                Behaviour::Garbage => {
                    read_some(&mut stream);
                    let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n\x00\xff\x13\x37");
                }
                Behaviour::ClosesMidStream => {
                    // Handshake, take the request's first frames, then hang up.
                    read_some(&mut stream);
                    let _ = stream.write_all(&SETTINGS);
                    read_some(&mut stream);
                }
            }
        }
    });
}

fn read_some(stream: &mut UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = vec![0u8; PREFACE.len() + 4096];
    let _ = stream.read(&mut buf);
}

const THRESHOLDS: &str = "probes:\n  interval: 300ms\n  slow_threshold: 500ms\n  stall_threshold: 1s\n  deadline: 2s\n\
kernel_log:\n  enabled: false\nproc_scan:\n  enabled: false\nlifecycle:\n  enabled: false\n";

fn cri_config(dir: &Path, socket: &Path, mode: &str) -> PathBuf {
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\n{THRESHOLDS}docker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
             cri:\n  mode: {mode}\n  sockets: [{}]\n",
            dir.display(),
            socket.display()
        ),
    )
    .expect("write config");
    config
}

/// `check --format json` on the config: exit code, the cri runtime's state and reason, time.
fn check(config: &Path) -> (i32, String, String, Duration) {
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
        .and_then(|r| r.iter().find(|r| r["runtime"] == "cri"))
        .unwrap_or_else(|| panic!("cri missing: {out}"))
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
    let socket = dir.path().join("cri.sock");
    fake_socket(&socket, behaviour);
    let (code, state, reason, took) = check(&cri_config(dir.path(), &socket, "required"));
    assert_eq!(state, expected, "{tag}: reason {reason}");
    assert!(reason.contains(reason_contains), "{tag}: reason {reason:?}");
    assert_eq!(code, 1, "{tag}: exit code");
    assert!(took < Duration::from_secs(4), "{tag}: check took {took:?}");
}

#[test]
fn cri_socket_that_accepts_and_never_answers_is_hung() {
    assert_state(
        Behaviour::NeverAnswers,
        "cri-silent",
        "hung",
        "status stuck",
    );
}

#[test]
fn cri_socket_that_sends_garbage_is_down() {
    assert_state(Behaviour::Garbage, "cri-garbage", "down", "error");
}

#[test]
fn cri_socket_that_closes_mid_stream_is_down() {
    assert_state(Behaviour::ClosesMidStream, "cri-closes", "down", "error");
}

#[test]
fn no_cri_socket_is_absent_in_auto_mode_and_down_when_required() {
    let dir = TempDir::new("cri-missing");
    let socket = dir.path().join("nothing-here.sock");
    let (code, state, _, _) = check(&cri_config(dir.path(), &socket, "auto"));
    assert_eq!((code, state.as_str()), (0, "absent"));
    let (code, state, reason, _) = check(&cri_config(dir.path(), &socket, "required"));
    assert_eq!((code, state.as_str()), (1, "down"));
    assert!(reason.contains("socket missing"), "{reason}");
}
