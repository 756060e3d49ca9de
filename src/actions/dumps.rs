//! Goroutine dumps: signal a daemon with SIGUSR1, wait for the file it writes, copy it into
//! hangwatch's own dump directory (bounded), and report back to the engine.
//!
//! dockerd writes a new `<exec-root>/goroutine-stacks-<time>.log` per dump and never deletes
//! them; containerd overwrites `$TMPDIR/containerd.<pid>.stacks.log` on every dump, so it is
//! copied as soon as it is complete. A stopped daemon writes its dump only when it runs
//! again: after `wait` the dump is reported pending, and waiting goes on in the background.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::target::{Target, send_dump_signal};
use crate::domain::Runtime;
use crate::signal::{Payload, Signal, SignalSender};
use crate::triage::{self, TriageLimits};

/// How often the dump directory is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// A collected dump, as recorded in incidents and `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpRecord {
    pub daemon: Runtime,
    pub pid: i32,
    /// Where the daemon wrote it.
    pub source: PathBuf,
    /// hangwatch's copy.
    pub path: PathBuf,
    pub bytes: u64,
    /// The copy was cut at `dumps.max_file_bytes`.
    pub truncated: bool,
    #[serde(with = "humantime_serde")]
    pub collected_at: SystemTime,
    /// Seconds from the signal to the file being complete.
    pub wait_seconds: f64,
    /// The triage's one-line verdict (`hangwatch analyze-dump <path>` gives the full one).
    #[serde(default)]
    pub triage: Option<String>,
}

/// How a dump request ended; the variants are the `result` label values.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum DumpOutcome {
    Ok(DumpRecord),
    /// Signalled, but no dump appeared within `dumps.background_wait`.
    Timeout {
        waited_seconds: f64,
    },
    /// Could not signal or could not copy.
    Failed {
        reason: String,
    },
}

impl DumpOutcome {
    pub fn result(&self) -> &'static str {
        match self {
            DumpOutcome::Ok(_) => "ok",
            DumpOutcome::Timeout { .. } => "timeout",
            DumpOutcome::Failed { .. } => "failed",
        }
    }
}

/// What the collector tells the engine.
#[derive(Debug, Clone)]
pub enum DumpEvent {
    /// The signal went out (the daemon will dump when it runs).
    Signalled { daemon: Runtime, pid: i32 },
    /// Nothing yet after `dumps.wait`: the daemon is probably stopped; still waiting.
    Pending { daemon: Runtime },
    Finished {
        daemon: Runtime,
        outcome: DumpOutcome,
    },
}

/// One dump to take.
#[derive(Debug, Clone)]
pub struct DumpJob {
    pub target: Target,
    /// Where the daemon writes dumps: dockerd's exec-root, containerd's TMPDIR.
    pub source_dir: PathBuf,
    pub dump_dir: PathBuf,
    pub proc_root: PathBuf,
    pub wait: Duration,
    pub background_wait: Duration,
    pub max_file_bytes: u64,
    pub keep_files: usize,
    pub keep_bytes: u64,
    pub clean_docker_dumps: bool,
}

/// What was in the source directory before the signal.
#[derive(Clone)]
enum Before {
    DockerFiles(HashSet<OsString>),
    ContainerdFile(Option<(SystemTime, u64)>),
}

pub async fn take(job: DumpJob, signals: SignalSender) {
    let daemon = job.target.daemon;
    let outcome = collect(&job, &signals).await;
    match &outcome {
        DumpOutcome::Ok(record) => tracing::info!(
            daemon = daemon.daemon_name(), pid = record.pid, path = %record.path.display(), bytes = record.bytes,
            "goroutine dump collected"
        ),
        DumpOutcome::Timeout { waited_seconds } => {
            tracing::warn!(
                daemon = daemon.daemon_name(),
                waited_seconds,
                "no goroutine dump appeared"
            )
        }
        DumpOutcome::Failed { reason } => {
            tracing::warn!(daemon = daemon.daemon_name(), %reason, "goroutine dump failed")
        }
    }
    signals
        .send(Signal::Action(Payload::new(DumpEvent::Finished {
            daemon,
            outcome,
        })))
        .await;
}

async fn collect(job: &DumpJob, signals: &SignalSender) -> DumpOutcome {
    let job_for_signal = job.clone();
    let signalled = tokio::task::spawn_blocking(move || {
        let before = before(&job_for_signal);
        send_dump_signal(&job_for_signal.target, &job_for_signal.proc_root).map(|()| before)
    })
    .await;
    let before = match signalled {
        Ok(Ok(before)) => before,
        Ok(Err(reason)) => return DumpOutcome::Failed { reason },
        Err(e) => {
            return DumpOutcome::Failed {
                reason: format!("signal task failed: {e}"),
            };
        }
    };
    let daemon = job.target.daemon;
    signals
        .send(Signal::Action(Payload::new(DumpEvent::Signalled {
            daemon,
            pid: job.target.pid,
        })))
        .await;

    let started = Instant::now();
    let mut pending_reported = false;
    let mut last_seen: Option<(PathBuf, u64)> = None;
    while started.elapsed() < job.background_wait {
        tokio::time::sleep(POLL).await;
        if !pending_reported && started.elapsed() >= job.wait {
            pending_reported = true;
            tracing::warn!(
                daemon = daemon.daemon_name(),
                pid = job.target.pid,
                "goroutine dump not written after {:?} (daemon stopped?); still waiting up to {:?}",
                job.wait,
                job.background_wait
            );
            signals
                .send(Signal::Action(Payload::new(DumpEvent::Pending { daemon })))
                .await;
        }
        // Listing a directory is file I/O: off the async thread.
        let looked = {
            let (job, before) = (job.clone(), before.clone());
            tokio::task::spawn_blocking(move || new_dump(&job, &before)).await
        };
        let Ok(Some((path, size))) = looked else {
            continue;
        };
        // Complete once its size held still across a poll.
        if size > 0 && last_seen.as_ref() == Some(&(path.clone(), size)) {
            let wait_seconds = started.elapsed().as_secs_f64();
            let job = job.clone();
            return match tokio::task::spawn_blocking(move || copy_dump(&job, &path, wait_seconds))
                .await
            {
                Ok(Ok(record)) => DumpOutcome::Ok(record),
                Ok(Err(reason)) => DumpOutcome::Failed { reason },
                Err(e) => DumpOutcome::Failed {
                    reason: format!("copy task failed: {e}"),
                },
            };
        }
        last_seen = Some((path, size));
    }
    DumpOutcome::Timeout {
        waited_seconds: started.elapsed().as_secs_f64(),
    }
}

fn containerd_dump_path(job: &DumpJob) -> PathBuf {
    job.source_dir
        .join(format!("containerd.{}.stacks.log", job.target.pid))
}

fn is_docker_dump(name: &str) -> bool {
    name.starts_with("goroutine-stacks-") && name.ends_with(".log")
}

fn before(job: &DumpJob) -> Before {
    match job.target.daemon {
        Runtime::Docker => Before::DockerFiles(
            fs::read_dir(&job.source_dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name())
                        .filter(|n| is_docker_dump(&n.to_string_lossy()))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Runtime::Containerd | Runtime::Cri => Before::ContainerdFile(
            fs::metadata(containerd_dump_path(job))
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len()))),
        ),
    }
}

/// The dump written since the signal, with its current size.
fn new_dump(job: &DumpJob, before: &Before) -> Option<(PathBuf, u64)> {
    match before {
        Before::DockerFiles(known) => fs::read_dir(&job.source_dir)
            .ok()?
            .flatten()
            .filter(|e| {
                is_docker_dump(&e.file_name().to_string_lossy()) && !known.contains(&e.file_name())
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, e.path(), meta.len()))
            })
            .max()
            .map(|(_, path, size)| (path, size)),
        Before::ContainerdFile(previous) => {
            let path = containerd_dump_path(job);
            let meta = fs::metadata(&path).ok()?;
            let now = (meta.modified().ok()?, meta.len());
            (Some(now) != *previous).then_some((path, now.1))
        }
    }
}

fn copy_dump(job: &DumpJob, source: &Path, wait_seconds: f64) -> Result<DumpRecord, String> {
    fs::create_dir_all(&job.dump_dir)
        .map_err(|e| format!("cannot create dump dir {}: {e}", job.dump_dir.display()))?;
    let collected_at = SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(collected_at)
        .to_string()
        .replace(':', "");
    let daemon = job.target.daemon;
    let name = daemon.daemon_name();
    let mut path = job
        .dump_dir
        .join(format!("{name}-{stamp}-pid{}.log", job.target.pid));
    let mut n = 1;
    while path.exists() {
        path = job
            .dump_dir
            .join(format!("{name}-{stamp}-pid{}-{n}.log", job.target.pid));
        n += 1;
    }
    let file = fs::File::open(source).map_err(|e| format!("open {}: {e}", source.display()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut limited = file.take(job.max_file_bytes);
    let temporary = path.with_extension("partial");
    let mut out =
        fs::File::create(&temporary).map_err(|e| format!("create {}: {e}", temporary.display()))?;
    let bytes = std::io::copy(&mut limited, &mut out)
        .map_err(|e| format!("copy {} → {}: {e}", source.display(), temporary.display()))?;
    fs::rename(&temporary, &path).map_err(|e| format!("rename {}: {e}", path.display()))?;
    if job.clean_docker_dumps && daemon == Runtime::Docker {
        remove_docker_dumps(&job.source_dir);
    }
    enforce_retention(&job.dump_dir, job.keep_files, job.keep_bytes);
    let triage = match triage::analyze_file(&path, &TriageLimits::default()) {
        Ok(found) => Some(found.summary()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot triage the dump");
            None
        }
    };
    Ok(DumpRecord {
        daemon,
        pid: job.target.pid,
        source: source.to_path_buf(),
        path,
        bytes,
        truncated: total > bytes,
        collected_at,
        wait_seconds,
        triage,
    })
}

/// dockerd never deletes its dumps; with `dumps.clean_docker_dumps` hangwatch does, once it
/// holds a copy.
fn remove_docker_dumps(exec_root: &Path) {
    let Ok(entries) = fs::read_dir(exec_root) else {
        return;
    };
    for entry in entries.flatten() {
        if is_docker_dump(&entry.file_name().to_string_lossy())
            && let Err(e) = fs::remove_file(entry.path())
        {
            tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove dockerd dump");
        }
    }
}

/// Keep at most `keep_files` dumps and `keep_bytes` in total, dropping the oldest.
pub fn enforce_retention(dir: &Path, keep_files: usize, keep_bytes: u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(SystemTime, PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, e.path(), meta.len()))
        })
        .collect();
    files.sort();
    let mut total: u64 = files.iter().map(|(_, _, size)| size).sum();
    let mut count = files.len();
    for (_, path, size) in files {
        if count <= keep_files && total <= keep_bytes {
            break;
        }
        match fs::remove_file(&path) {
            Ok(()) => {
                count -= 1;
                total = total.saturating_sub(size);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove old dump"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hangwatch-dumps-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn retention_keeps_newest_within_count_and_bytes() {
        let dir = temp_dir("retention");
        for i in 0..5 {
            fs::write(dir.join(format!("d{i}.log")), vec![b'x'; 100]).expect("write");
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + i);
            fs::File::options()
                .write(true)
                .open(dir.join(format!("d{i}.log")))
                .and_then(|f| f.set_modified(t))
                .expect("set mtime");
        }
        fs::write(dir.join("not-a-dump.txt"), "keep").expect("write");
        enforce_retention(&dir, 3, 10_000);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["d2.log", "d3.log", "d4.log", "not-a-dump.txt"]);
        enforce_retention(&dir, 10, 150);
        assert!(dir.join("d4.log").exists() && !dir.join("d3.log").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn docker_dump_names() {
        assert!(is_docker_dump("goroutine-stacks-2026-11-23T000323Z.log"));
        assert!(!is_docker_dump("daemon-data-2018-12-02T193336z.log"));
        assert!(!is_docker_dump("goroutine-stacks.partial"));
    }
}
