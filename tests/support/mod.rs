//! Shared support for integration tests: static helper programs, polling with deadlines, and
//! (see `daemons`) private dockerd + containerd instances.
#![allow(dead_code)]

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
