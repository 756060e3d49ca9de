//! Incidents on disk: one JSON file per incident, written atomically off the engine's task,
//! loaded again at start so incidents survive restarts. Bounded by count.

use std::fs;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::engine::incidents::Incident;
use crate::persist::{self, StateKind};

/// Read every incident in `dir`. Unreadable files are logged and skipped: a corrupt file
/// must not stop the daemon.
pub fn load(dir: &Path) -> Vec<Incident> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let path = e.path();
            let parsed = fs::read(&path)
                .map_err(|err| err.to_string())
                .and_then(|bytes| serde_json::from_slice::<Incident>(&bytes).map_err(|err| err.to_string()));
            match parsed {
                Ok(incident) => Some(incident),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "skipping unreadable incident file");
                    None
                }
            }
        })
        .collect()
}

/// Handle to the writer task. Writes are queued, never awaited by the engine. The queue
/// holds the newest version of each incident not yet written, so it is bounded by the
/// number of incidents however often they change or however slow the disk is.
#[derive(Debug, Clone)]
pub struct IncidentWriter {
    queue: Arc<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    newest: Mutex<BTreeMap<String, Incident>>,
    wake: Notify,
}

impl IncidentWriter {
    pub fn spawn(dir: PathBuf, keep: usize) -> IncidentWriter {
        let queue = Arc::new(Queue::default());
        let incoming = queue.clone();
        tokio::spawn(async move {
            loop {
                incoming.wake.notified().await;
                let batch = std::mem::take(&mut *lock(&incoming.newest));
                for incident in batch.into_values() {
                    let dir = dir.clone();
                    let result =
                        tokio::task::spawn_blocking(move || write(&dir, &incident, keep)).await;
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::warn!(%error, "cannot persist incident"),
                        Err(error) => tracing::warn!(%error, "incident writer task failed"),
                    }
                }
            }
        });
        IncidentWriter { queue }
    }

    pub fn save(&self, incident: &Incident) {
        lock(&self.queue.newest).insert(incident.id.clone(), incident.clone());
        self.queue.wake.notify_one();
    }

    /// Incidents waiting to be written.
    #[cfg(test)]
    fn queued(&self) -> usize {
        lock(&self.queue.newest).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn file_name(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.json")
}

/// Failures are counted in `hangwatch_state_write_failures_total{kind="incident"}`; the
/// incident stays served from memory, and its next change writes it whole again.
fn write(dir: &Path, incident: &Incident, keep: usize) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| {
        persist::count_failure(StateKind::Incident);
        format!("create {}: {e}", dir.display())
    })?;
    let json = serde_json::to_vec_pretty(incident).map_err(|e| e.to_string())?;
    let path = dir.join(file_name(&incident.id));
    persist::write_atomically(&path, &json, StateKind::Incident)
        .map_err(|e| format!("write {}: {e}", path.display()))?;
    prune(dir, keep);
    Ok(())
}

/// Keep the `keep` most recently written incident files.
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() <= keep {
        return;
    }
    files.sort();
    let excess = files.len() - keep;
    for (_, path) in files.into_iter().take(excess) {
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot prune incident file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Runtime;
    use crate::engine::incidents::IncidentBook;
    use crate::engine::incidents::tests::seen;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_queue_keeps_the_newest_version_of_each_incident() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("hangwatch-queue-{}", std::process::id()));
        let mut book = IncidentBook::new("n/1".into(), 10, Vec::new());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        book.on_state(
            Runtime::Docker,
            &seen(
                "hung",
                "",
                true,
                false,
                crate::engine::incidents::Layer::Dockerd,
            ),
            t0,
        );
        let incident = book.all().remove(0);
        runtime.block_on(async {
            let writer = IncidentWriter::spawn(dir.clone(), 10);
            // The writer task cannot run while this one does not yield.
            for _ in 0..1000 {
                writer.save(&incident);
            }
            assert_eq!(
                writer.queued(),
                1,
                "1000 saves of one incident queue one write"
            );
            tokio::time::timeout(Duration::from_secs(10), async {
                while !dir.join(file_name(&incident.id)).exists() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("the incident is written");
        });
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_load_prune_and_skip_corrupt_files() {
        let dir = std::env::temp_dir().join(format!("hangwatch-incidents-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut book = IncidentBook::new("n/1".into(), 10, Vec::new());
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (i, runtime) in [Runtime::Docker, Runtime::Containerd]
            .into_iter()
            .enumerate()
        {
            book.on_state(
                runtime,
                &seen(
                    "hung",
                    "",
                    true,
                    false,
                    crate::engine::incidents::Layer::Dockerd,
                ),
                t0 + Duration::from_secs(i as u64),
            );
        }
        for incident in book.all() {
            write(&dir, &incident, 10).expect("write");
            assert!(
                dir.join(file_name(&incident.id)).exists(),
                "file name is made safe"
            );
        }
        fs::write(dir.join("garbage.json"), b"{not json").expect("write");
        let loaded = load(&dir);
        assert_eq!(loaded.len(), 2);
        prune(&dir, 1);
        assert_eq!(fs::read_dir(&dir).expect("read").count(), 1);
        let _ = fs::remove_dir_all(&dir);
    }
}
