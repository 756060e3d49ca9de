//! `hangwatch run`: wire the sources' detectors, the engine and the HTTP server together;
//! shut down cleanly.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::actions::incident_store::{self, IncidentWriter};
use crate::actions::resolve::ContainerResolver;
use crate::config::Config;
use crate::engine::{DaemonEffects, Engine};
use crate::heartbeat::Heartbeats;
use crate::http::{self, Readers};
use crate::node_status;
use crate::signal;
use crate::sources::{self, DetectorContext, Now, Source};

/// How long shutdown waits for loops to finish before abandoning them. Kept under the 2 s
/// promised to operators, whatever a hung runtime is doing.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// The engine beats every evaluate interval; its budget flags a wedged engine loop: 10 s, or
/// four intervals when they are longer.
pub fn engine_heartbeat_budget(config: &Config) -> Duration {
    Duration::from_secs(10).max(config.evaluate_interval.saturating_mul(4))
}

pub async fn run(config: Config) -> Result<(), String> {
    run_sources(config, sources::registered()).await
}

/// The daemon over `sources`: their detectors feed one engine.
pub async fn run_sources(config: Config, sources: Vec<Box<dyn Source>>) -> Result<(), String> {
    let config = Arc::new(config);
    let mut termination = Termination::new()?;
    let listener = http::bind(config.listen).await?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;

    let heartbeats = Heartbeats::default();
    let shutdown = CancellationToken::new();
    let (sender, receiver) = signal::channel();
    let incident_dir = config.incident_dir();
    let loaded =
        match tokio::task::spawn_blocking(move || incident_store::load(&incident_dir)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!(error = %e, "loading incidents failed; starting with none");
                Vec::new()
            }
        };
    if !loaded.is_empty() {
        tracing::info!(incidents = loaded.len(), "incidents loaded from disk");
    }
    let effects = DaemonEffects {
        config: config.clone(),
        signals: sender.clone(),
        incident_writer: IncidentWriter::spawn(config.incident_dir(), config.incidents.keep),
        resolver: ContainerResolver::new(&config),
    };
    let (engine, snapshot) = Engine::new(
        config.clone(),
        &sources,
        Some(Box::new(effects)),
        loaded,
        Now::read(),
    );
    let publisher = if config.node_status.enabled {
        match node_status::Publisher::new(config.clone()) {
            Ok(publisher) => Some(publisher),
            Err(e) => {
                tracing::error!(error = %e, "node conditions disabled: no Kubernetes API configuration");
                None
            }
        }
    } else {
        None
    };
    let publisher_snapshot = snapshot.clone();
    let readers = Readers {
        metrics: engine.metrics(),
        snapshot,
        heartbeats: heartbeats.clone(),
    };

    let mut loops: JoinSet<String> = JoinSet::new();
    let engine_heartbeat = heartbeats.register("engine", engine_heartbeat_budget(&config));
    let engine_shutdown = shutdown.clone();
    loops.spawn(async move {
        engine
            .run(receiver, engine_heartbeat, engine_shutdown)
            .await;
        "engine".to_string()
    });
    let mut names = Vec::new();
    for detector in sources.iter().flat_map(|s| s.detectors(&config)) {
        let name = detector.name();
        let ctx = DetectorContext {
            config: config.clone(),
            signals: sender.clone(),
            heartbeat: heartbeats.register(name.clone(), detector.heartbeat_budget()),
            shutdown: shutdown.clone(),
        };
        names.push(name.clone());
        loops.spawn(async move {
            detector.run(ctx).await;
            name
        });
    }
    drop(sender);
    if let Some(publisher) = publisher {
        let (heartbeats, shutdown) = (heartbeats.clone(), shutdown.clone());
        loops.spawn(async move {
            publisher
                .run(publisher_snapshot, heartbeats, shutdown)
                .await;
            "node_status".to_string()
        });
    }
    let http_shutdown = shutdown.clone();
    loops.spawn(async move {
        http::serve(listener, readers, http_shutdown).await;
        "http".to_string()
    });
    tracing::info!(
        %listen,
        node = %config.resolved_node_name(),
        detectors = %names.join(","),
        version = env!("CARGO_PKG_VERSION"),
        "hangwatch started"
    );

    loop {
        tokio::select! {
            () = termination.recv() => break,
            finished = loops.join_next() => match finished {
                Some(Ok(name)) => tracing::error!(loop_name = %name, "loop exited unexpectedly; /healthz will fail"),
                Some(Err(e)) => tracing::error!(error = %e, "loop panicked; /healthz will fail"),
                None => break,
            },
        }
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("some loops did not stop within {SHUTDOWN_GRACE:?}; abandoning them");
        loops.abort_all();
    }
    tracing::info!("hangwatch stopped");
    Ok(())
}

/// SIGTERM and SIGINT, handled from the start so neither kills the process mid-write.
pub struct Termination {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Termination {
    pub fn new() -> Result<Termination, String> {
        Ok(Termination {
            terminate: signal(SignalKind::terminate())
                .map_err(|e| format!("cannot handle SIGTERM: {e}"))?,
            interrupt: signal(SignalKind::interrupt())
                .map_err(|e| format!("cannot handle SIGINT: {e}"))?,
        })
    }

    /// Wait for either signal.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine beats once per `evaluate_interval`: its budget must outlast it.
    #[test]
    fn the_engine_budget_outlasts_the_evaluate_interval() {
        let mut config = Config::default();
        assert_eq!(engine_heartbeat_budget(&config), Duration::from_secs(10));
        config.evaluate_interval = Duration::from_secs(5);
        assert_eq!(engine_heartbeat_budget(&config), Duration::from_secs(20));
        config.evaluate_interval = Duration::MAX;
        assert_eq!(engine_heartbeat_budget(&config), Duration::MAX);
    }
}
