//! State written under `state_dir`: one atomic-write helper for every store, and a count of
//! the writes that failed, by kind.
//!
//! The count is process-wide (atomics here, exported by [`StateWriteFailures`] as a
//! prometheus-client `Collector`) rather than a family in the engine's metrics: the stores
//! run inside detectors and actions, which must not write the engine's metrics, and a
//! failed write has no signal to travel on (the engine would only copy the number).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// What a state file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    /// `kmsg.position`: where reading the kernel log stopped.
    KernelPosition,
    /// `incidents/<id>.json`.
    Incident,
    /// `kube-events.json`: the Kubernetes Events sent, so a restart sends none twice.
    KubeEvents,
}

impl StateKind {
    const ALL: [StateKind; 3] = [
        StateKind::KernelPosition,
        StateKind::Incident,
        StateKind::KubeEvents,
    ];

    pub fn label(self) -> &'static str {
        match self {
            StateKind::KernelPosition => "kernel_position",
            StateKind::Incident => "incident",
            StateKind::KubeEvents => "kube_events",
        }
    }

    fn counter(self) -> &'static AtomicU64 {
        static KERNEL_POSITION: AtomicU64 = AtomicU64::new(0);
        static INCIDENT: AtomicU64 = AtomicU64::new(0);
        static KUBE_EVENTS: AtomicU64 = AtomicU64::new(0);
        match self {
            StateKind::KernelPosition => &KERNEL_POSITION,
            StateKind::Incident => &INCIDENT,
            StateKind::KubeEvents => &KUBE_EVENTS,
        }
    }
}

/// Count one failed write of `kind` (also for failures found before any file was touched,
/// such as a state directory that cannot be created).
pub fn count_failure(kind: StateKind) {
    kind.counter().fetch_add(1, Ordering::Relaxed);
}

/// Failed writes of `kind` since the process started.
pub fn failures(kind: StateKind) -> u64 {
    kind.counter().load(Ordering::Relaxed)
}

/// The temporary file [`write_atomically`] writes beside `path`.
pub fn temporary_path(path: &Path) -> PathBuf {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    PathBuf::from(temporary)
}

/// Replace `path` whole or not at all: write a temporary file beside it, sync, rename. On
/// failure the temporary file is removed (a full disk must not fill up with empty ones) and
/// the failure is counted under `kind`.
pub fn write_atomically(path: &Path, contents: &[u8], kind: StateKind) -> io::Result<()> {
    let temporary = temporary_path(path);
    let written = File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(contents)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if written.is_err() {
        count_failure(kind);
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// Exports `hangwatch_state_write_failures_total{kind}` from the process-wide counts.
#[derive(Debug, Default)]
pub struct StateWriteFailures;

impl Collector for StateWriteFailures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "hangwatch_state_write_failures",
            "Writes under state_dir that failed, by kind (kernel_position, incident, kube_events)",
            None,
            MetricType::Counter,
        )?;
        for kind in StateKind::ALL {
            let labels = KindLabels { kind: kind.label() };
            ConstCounter::new(failures(kind)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_is_counted_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("hangwatch-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state");
        write_atomically(&path, b"one", StateKind::Incident).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        assert!(!temporary_path(&path).exists());

        // A directory where the file should go: the rename fails after the write.
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(blocked.join("child")).expect("dir");
        let before = failures(StateKind::Incident);
        assert!(write_atomically(&blocked, b"two", StateKind::Incident).is_err());
        assert_eq!(failures(StateKind::Incident), before + 1);
        assert!(!temporary_path(&blocked).exists(), "temporary file removed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
