//! The invariants ARCHITECTURE.md states, checked where the source tree can show them.

use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The code of a file before its unit tests.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match text.find("#[cfg(test)]") {
        Some(at) => text.get(..at).unwrap_or(&text).to_string(),
        None => text,
    }
}

fn offenders(files: &[PathBuf], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let code = code(file);
        for needle in forbidden {
            if code.contains(needle) {
                found.push(format!("{} uses {needle}", file.display()));
            }
        }
    }
    found
}

/// Every source folder under src/sources.
fn source_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(src().join("sources"))
        .expect("src/sources")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_source_is_a_slice_with_detectors_state_and_metrics() {
    let dirs = source_dirs();
    assert!(dirs.len() >= 4, "{dirs:?}");
    for dir in &dirs {
        for part in ["mod.rs", "state.rs", "metrics.rs", "detect"] {
            assert!(
                dir.join(part).exists(),
                "{} has no {part}: a source owns its detector, state and metrics",
                dir.display()
            );
        }
    }
}

#[test]
fn detectors_never_touch_metrics_state_or_the_engine() {
    let mut files = Vec::new();
    for dir in source_dirs() {
        files.extend(rust_files(&dir.join("detect")));
    }
    files.push(src().join("sources/detector.rs"));
    let found = offenders(
        &files,
        &[
            "crate::engine",
            "crate::metrics",
            "prometheus_client",
            "::state::",
            "::metrics::",
            "super::super::state",
        ],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_signal_contract_knows_no_source_and_no_action() {
    let found = offenders(
        &[src().join("signal.rs")],
        &["crate::sources", "crate::actions", "crate::engine"],
    );
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_engine_iterates_over_sources_and_names_none_of_them() {
    let mut files = rust_files(&src().join("engine"));
    files.retain(|f| !f.ends_with("engine/tests.rs"));
    let found = offenders(
        &files,
        &[
            "sources::runtime",
            "sources::kernel",
            "sources::procscan",
            "sources::lifecycle",
        ],
    );
    // The incident book reads the stop evidence's type; nothing else of a source.
    let found: Vec<String> = found
        .into_iter()
        .filter(|f| !(f.contains("incidents.rs") && f.ends_with("sources::lifecycle")))
        .collect();
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn readers_only_read() {
    for reader in ["http.rs", "check.rs"] {
        let code = code(&src().join(reader));
        for writer in [
            ".inc(",
            ".set(",
            ".observe(",
            "send_replace",
            "IncidentWriter",
        ] {
            assert!(!code.contains(writer), "{reader} writes: {writer}");
        }
    }
}

#[test]
fn decision_code_reads_no_clock() {
    let mut files = rust_files(&src().join("engine"));
    for dir in source_dirs() {
        files.extend(
            rust_files(&dir)
                .into_iter()
                .filter(|f| !f.starts_with(dir.join("detect")) && !f.ends_with("mod.rs")),
        );
    }
    files.retain(|f| !f.ends_with("engine/effects.rs") && !f.ends_with("engine/tests.rs"));
    let found = offenders(&files, &["Instant::now()", "SystemTime::now()"]);
    assert!(found.is_empty(), "time is passed in: {found:#?}");
}

#[test]
fn daemon_and_check_build_from_the_one_registration_list() {
    for wiring in ["daemon.rs", "check.rs"] {
        let code = code(&src().join(wiring));
        assert!(
            code.contains("sources::registered()"),
            "{wiring} does not build from sources::registered()"
        );
        for source in [
            "kernel::",
            "lifecycle::detect",
            "runtime::detect",
            "procscan::detect",
        ] {
            assert!(
                !code.contains(source),
                "{wiring} reaches into a source ({source}) instead of the registration list"
            );
        }
    }
}
