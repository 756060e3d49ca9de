//! What the engine's decisions do outside it: signal a daemon for a dump, look up a
//! container's names, write an incident file. The daemon carries them out in the background
//! (results come back as signals); a test records them; `check` has none.

use std::sync::Arc;

use crate::actions::dumps::{self, DumpEvent, DumpJob, DumpOutcome};
use crate::actions::incident_store::IncidentWriter;
use crate::actions::resolve::ContainerResolver;
use crate::actions::target;
use crate::config::Config;
use crate::domain::Runtime;
use crate::engine::incidents::Incident;
use crate::signal::{Payload, Signal, SignalSender};

pub trait Effects: Send {
    /// SIGUSR1 to `daemon` and collect its goroutine dump.
    fn dump(&self, daemon: Runtime);
    /// Ask the runtimes that answer for the names of container `id`.
    fn resolve(&self, id: String, docker_answering: bool, containerd_answering: bool);
    /// Persist `incident` (off the engine's thread).
    fn save(&self, incident: &Incident);
}

/// The daemon's effects: background tasks that report back through `signals`.
pub struct DaemonEffects {
    pub config: Arc<Config>,
    pub signals: SignalSender,
    pub incident_writer: IncidentWriter,
    pub resolver: ContainerResolver,
}

impl Effects for DaemonEffects {
    fn dump(&self, daemon: Runtime) {
        tokio::spawn(dump(daemon, self.config.clone(), self.signals.clone()));
    }

    fn resolve(&self, id: String, docker_answering: bool, containerd_answering: bool) {
        self.resolver.spawn(
            id,
            docker_answering,
            containerd_answering,
            self.signals.clone(),
        );
    }

    fn save(&self, incident: &Incident) {
        self.incident_writer.save(incident);
    }
}

/// Resolve the daemon's process and take its dump; every failure is reported back.
async fn dump(daemon: Runtime, config: Arc<Config>, signals: SignalSender) {
    let (socket, pidfile, source_dir) = match daemon {
        Runtime::Docker => (
            config.docker.socket.clone(),
            config.docker.pidfile.clone(),
            config.docker.exec_root.clone(),
        ),
        Runtime::Containerd => (
            config.containerd.socket.clone(),
            config.containerd.pidfile.clone(),
            config.containerd.stack_dump_dir.clone(),
        ),
        // The engine asks a CRI stall's dumps of containerd; CRI-O and cri-dockerd write none
        // hangwatch knows how to collect.
        Runtime::Cri => {
            signals
                .send(Signal::Action(Payload::new(DumpEvent::Finished {
                    daemon,
                    outcome: DumpOutcome::Failed {
                        reason: "no goroutine dump is collected from a CRI socket's daemon".into(),
                    },
                })))
                .await;
            return;
        }
    };
    let proc_root = config.proc_scan.proc_root.clone();
    let lookup_root = proc_root.clone();
    let resolved = tokio::task::spawn_blocking(move || {
        target::resolve(daemon, &socket, Some(&pidfile), &lookup_root)
    })
    .await
    .unwrap_or_else(|e| Err(format!("target lookup failed: {e}")));
    let target = match resolved {
        Ok(target) => target,
        Err(reason) => {
            tracing::warn!(daemon = daemon.daemon_name(), %reason, "not signalling");
            signals
                .send(Signal::Action(Payload::new(DumpEvent::Finished {
                    daemon,
                    outcome: DumpOutcome::Failed { reason },
                })))
                .await;
            return;
        }
    };
    let d = &config.dumps;
    let job = DumpJob {
        target,
        source_dir,
        dump_dir: config.dump_dir(),
        proc_root,
        wait: d.wait,
        background_wait: d.background_wait,
        max_file_bytes: d.max_file_bytes.as_u64(),
        keep_files: d.keep_files,
        keep_bytes: d.keep_bytes.as_u64(),
        clean_docker_dumps: d.clean_docker_dumps,
    };
    dumps::take(job, signals).await;
}
