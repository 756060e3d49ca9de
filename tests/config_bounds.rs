//! Configuration out of range is refused, by `config check` and at start, with exit 2 and a
//! message naming the key, its line and the range; nothing panics; a config file that is
//! endless, huge or a FIFO is refused fast and in little memory.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::hangwatch::{TempDir, binary};
use support::helper_binary;

/// Exit code, stderr and peak RSS (KiB) of `hangwatch args`, killed if it runs past
/// `deadline`. Run through a small forking helper: the child's own rusage, not the test's.
fn run_measured(args: &[&str], deadline: Duration) -> (i32, String, i64) {
    let output = Command::new(helper_binary("maxrss"))
        .arg(deadline.as_secs().to_string())
        .arg(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run hangwatch under the maxrss helper");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !report.starts_with("timeout"),
        "hangwatch {args:?} still running after {deadline:?}"
    );
    let field = |name: &str| -> i64 {
        report
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {report:?}; stderr {stderr}"))
    };
    let (code, maxrss) = (field("exit=") as i32, field("maxrss_kib="));
    (code, stderr, maxrss)
}

fn check(dir: &TempDir, yaml: &str) -> (i32, String) {
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).expect("write config");
    let (code, stderr, _) = run_measured(
        &["config", "check", &file.to_string_lossy()],
        Duration::from_secs(30),
    );
    (code, stderr)
}

/// (document, key, line of the key, range the message must state)
const OUT_OF_RANGE: &[(&str, &str, usize, &str)] = &[
    (
        "node_name: \"\"\nprobes:\n  interval: 18446744073709551615s\n",
        "probes.interval",
        3,
        "between 100ms and 5m",
    ),
    (
        "probes:\n  interval: 100y\n",
        "probes.interval",
        2,
        "between 100ms and 5m",
    ),
    (
        "evaluate_interval: 100y\n",
        "evaluate_interval",
        1,
        "between 10ms and 10s",
    ),
    (
        "probes:\n  deadline: 36500d\n",
        "probes.deadline",
        2,
        "between 200ms and 30m",
    ),
    (
        "proc_scan:\n  enabled: true\n  interval: 1000000h\n",
        "proc_scan.interval",
        3,
        "between 100ms and 10m",
    ),
    (
        "kernel_log:\n  retry_max: 100y\n",
        "kernel_log.retry_max",
        2,
        "between 10ms and 1h",
    ),
    (
        "kernel_log:\n  syslog_poll_interval: 100y\n",
        "kernel_log.syslog_poll_interval",
        2,
        "between 100ms and 1m",
    ),
    (
        "dumps:\n  background_wait: 100y\n",
        "dumps.background_wait",
        2,
        "between 0s and 1day",
    ),
    (
        "lifecycle:\n  stop_grace: 100y\n",
        "lifecycle.stop_grace",
        2,
        "between 100ms and 1h",
    ),
    (
        "kernel_log:\n  recent_events: 18446744073709551615\n",
        "kernel_log.recent_events",
        2,
        "between 1 and 100000",
    ),
    (
        "incidents:\n  keep: 0\n",
        "incidents.keep",
        2,
        "between 1 and 100000",
    ),
    (
        "dumps:\n  max_file_bytes: 1TiB\n",
        "dumps.max_file_bytes",
        2,
        "between 1.0 KiB and 4.0 GiB",
    ),
];

#[test]
fn every_bound_is_refused_with_key_line_and_range() {
    let dir = TempDir::new("config-bounds");
    for (yaml, key, line, range) in OUT_OF_RANGE {
        let (code, stderr) = check(&dir, yaml);
        assert_eq!(code, 2, "{yaml:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{yaml:?}: {stderr}");
        for wanted in [
            format!("line {line}"),
            format!("`{key}`"),
            range.to_string(),
        ] {
            assert!(
                stderr.contains(&wanted),
                "{yaml:?}: no {wanted:?} in {stderr}"
            );
        }
    }
}

#[test]
fn a_huge_node_name_is_refused_without_echoing_it() {
    let dir = TempDir::new("config-node-name");
    let (code, stderr) = check(
        &dir,
        &format!(
            "probes:\n  interval: 5s\nnode_name: {}\n",
            "a".repeat(300_000)
        ),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("`node_name`"),
        "{stderr}"
    );
    assert!(stderr.contains("253"), "{stderr}");
    assert!(
        stderr.len() < 1000,
        "the name is not echoed: {} bytes",
        stderr.len()
    );
    let (code, stderr) = check(&dir, &format!("node_name: {}\n", "a".repeat(254)));
    assert_eq!(code, 2, "{stderr}");
    // 50 MB: larger than any configuration file may be.
    let (code, stderr) = check(&dir, &format!("node_name: {}\n", "a".repeat(50 << 20)));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("larger than"), "{stderr}");
}

#[test]
fn run_refuses_an_overflowing_interval_instead_of_panicking() {
    let dir = TempDir::new("config-run-overflow");
    let file = dir.path().join("config.yaml");
    std::fs::write(
        &file,
        format!(
            "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\n\
             probes:\n  interval: 18446744073709551615s\n",
            dir.path().display()
        ),
    )
    .expect("write config");
    let (code, stderr, _) = run_measured(
        &[
            "run",
            "--config",
            &file.to_string_lossy(),
            "--listen",
            "127.0.0.1:0",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("probes.interval") && stderr.contains("line 7"),
        "{stderr}"
    );
}

/// Peak RSS of a `config check` that refuses its input.
const RSS_LIMIT_KIB: i64 = 16 * 1024;

#[test]
fn endless_huge_and_fifo_config_files_are_refused_fast_and_small() {
    let dir = TempDir::new("config-files");
    let fifo = dir.path().join("config.fifo");
    let path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo");
    let huge = dir.path().join("huge.yaml");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(100 * 1024 * 1024))
        .expect("a 100 MB file");
    let dense = dir.path().join("dense.yaml");
    std::fs::write(&dense, "#".repeat(2 * 1024 * 1024)).expect("a 2 MiB file");
    for (file, reason) in [
        ("/dev/zero".into(), "not a regular file"),
        (fifo, "not a regular file"),
        (huge, "larger than"),
        (dense, "larger than"),
    ] {
        let file = file.to_string_lossy().into_owned();
        let started = Instant::now();
        let (code, stderr, maxrss_kib) =
            run_measured(&["config", "check", &file], Duration::from_secs(10));
        println!(
            "config check {file}: exit {code} in {:?}, peak RSS {maxrss_kib} KiB",
            started.elapsed()
        );
        assert_eq!(code, 2, "{file}: {stderr}");
        assert!(stderr.contains(reason), "{file}: {stderr}");
        assert!(
            maxrss_kib < RSS_LIMIT_KIB,
            "{file}: peak RSS {maxrss_kib} KiB"
        );
    }
}
