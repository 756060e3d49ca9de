//! Shared support for integration tests: static helper programs, polling with deadlines, and
//! (see `daemons`) private dockerd + containerd instances.
#![allow(dead_code)]

pub mod cordoner;
pub mod cri;
pub mod daemons;
pub mod fake_apiserver;
pub mod hangwatch;
pub mod http_probe;
pub mod oom;
pub mod prometheus;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Compile `tests/helpers/<name>.c` statically (once per test binary build) and return the
/// path of the executable. Static, so it also runs inside an image holding nothing else.
pub fn helper_binary(name: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/helpers/{name}.c"));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helpers");
    std::fs::create_dir_all(&out_dir).expect("create helper dir");
    let out = out_dir.join(name);
    let fresh = match (std::fs::metadata(&out), std::fs::metadata(&source)) {
        (Ok(o), Ok(s)) => o.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    if !fresh {
        let status = Command::new("gcc")
            .args(["-static", "-O2", "-pthread", "-o"])
            .arg(&out)
            .arg(&source)
            .status()
            .expect("run gcc");
        assert!(status.success(), "gcc failed for {}", source.display());
    }
    out
}

/// A child process killed and reaped when the test ends, however it ends.
pub struct KilledOnDrop(pub std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll `check` until it returns Some or `deadline` passes. Returns the value and how long it
/// took; panics with `what` on timeout.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return (v, start.elapsed());
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Serialise the tests of one test binary that measure latency: on a 2-core machine another
/// test booting its daemons would otherwise starve the process being timed.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static TIMING: Mutex<()> = Mutex::new(());
    TIMING.lock().unwrap_or_else(|p| p.into_inner())
}

/// A kernel setting under `/proc/sys`, set for the life of the value and restored on drop
/// (also when the test panics).
pub struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    pub fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {path}: {e}"))
            .trim()
            .to_string();
        // Some handlers (printk_devkmsg) want the value newline-terminated: EINVAL otherwise.
        std::fs::write(path, format!("{value}\n")).unwrap_or_else(|e| panic!("write {path}: {e}"));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, format!("{}\n", self.old));
    }
}

/// Metric families registered in `src/metrics.rs`, the process-wide ones (HTTP server, log
/// output, state writes) and in each source's `metrics.rs` (read as
/// text: a family with no series yet is not in the encoded output); counters are exposed with
/// `_total`, histograms with `_bucket`/`_sum`/`_count`, info with `_info`.
pub fn exported_families() -> std::collections::BTreeSet<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: Vec<_> = ["metrics.rs", "http_server.rs", "output.rs", "persist.rs"]
        .iter()
        .map(|f| src.join(f))
        .collect();
    let sources = std::fs::read_dir(src.join("sources")).expect("read src/sources");
    files.extend(sources.flatten().map(|e| e.path().join("metrics.rs")));
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|source| {
            source
                .split('"')
                .filter(|s| {
                    s.starts_with("hangwatch_")
                        && s.bytes()
                            .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The hangwatch metric names in a PromQL expression that hangwatch does not export.
pub fn unknown_metrics(expr: &str) -> Vec<String> {
    let families = exported_families();
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("hangwatch_"))
        .filter(|metric| {
            let family = ["_total", "_bucket", "_count", "_sum", "_info"]
                .iter()
                .find_map(|suffix| metric.strip_suffix(suffix))
                .filter(|base| families.contains(*base))
                .unwrap_or(metric);
            !families.contains(family)
        })
        .map(str::to_string)
        .collect()
}
