//! The command line: config helpers, dump analysis, exit codes, output into a closed pipe.

mod support;

use std::process::{Command, Stdio};

use support::hangwatch::{TempDir, binary, run_cli};

#[test]
fn config_default_is_valid_and_commented() {
    let (code, yaml, _) = run_cli(&["config", "default"]);
    assert_eq!(code, 0);
    assert!(yaml.contains("# "), "the default config is commented");
    assert!(yaml.contains("stall_threshold: 10s"));
    let dir = TempDir::new("cli-default");
    let file = dir.path().join("default.yaml");
    std::fs::write(&file, &yaml).expect("write");
    let (code, out, err) = run_cli(&["config", "check", &file.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("valid"));
}

#[test]
fn config_check_names_key_and_line_and_exits_2() {
    let dir = TempDir::new("cli-bad");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "node_name: x\nprobes:\n  interval: 5s\n  deadline: soon\n",
    )
    .expect("write");
    let (code, _, err) = run_cli(&["config", "check", &file.to_string_lossy()]);
    assert_eq!(code, 2);
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("probes.deadline"), "{err}");

    let (code, _, err) = run_cli(&["run", "--config", &file.to_string_lossy()]);
    assert_eq!(code, 2, "run refuses a bad config");
    assert!(err.contains("probes.deadline"), "{err}");
    let (code, _, err) = run_cli(&["check", "--config", "/nonexistent/config.yaml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/config.yaml"), "{err}");
}

#[test]
fn analyze_dump_text_json_and_unreadable() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dumps/seed002-dockerd-17.03-blocked-on-containerd.log"
    );
    let (code, text, _) = run_cli(&["analyze-dump", fixture]);
    assert_eq!(code, 0);
    assert!(text.starts_with("dockerd: "), "{text}");
    assert!(text.contains("calling containerd"), "{text}");
    let (code, json, _) = run_cli(&["analyze-dump", fixture, "--format", "json"]);
    assert_eq!(code, 0);
    let triage: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(triage["daemon"], "dockerd");
    assert!(triage["blocked_goroutines"].as_u64().unwrap_or(0) > 100);
    let (code, _, err) = run_cli(&["analyze-dump", "/nonexistent/dump.log"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/dump.log"), "{err}");
}

#[test]
fn output_into_a_closed_pipe_is_not_a_crash() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dumps/seed002-dockerd-17.03-blocked-on-containerd.log"
    );
    let mut child = Command::new(binary())
        .args(["analyze-dump", fixture, "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(output.status.code(), Some(0));
}
