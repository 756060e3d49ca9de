//! The engine: the one place that turns signals into state, metrics and actions.
//!
//! It owns all mutable state. Detectors reach it only through the signal channel; the HTTP
//! server and `check` only read the [`Snapshot`] it publishes and the metrics registry.

pub mod dump_policy;
pub mod incidents;
pub mod runtime;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::actions::dumps::{self, DumpEvent, DumpJob, DumpOutcome};
use crate::actions::incident_store::IncidentWriter;
use crate::actions::target::{self, Daemon};
use crate::config::{Config, RuntimeMode};
use crate::containers::ContainerDirectory;
use crate::detectors::probe;
use crate::heartbeat::Heartbeat;
use crate::metrics::{
    DaemonLabels, DumpResultLabels, FailureLabels, Metrics, OperationLabels, RuntimeLabels,
    RuntimeStateLabels,
};
use crate::signal::{ProbeFailure, Runtime, Signal, SignalReceiver, SignalSender};
use dump_policy::{Decision, DumpPolicy};
use incidents::{Change, DumpStatus, Incident, IncidentBook, Observation};
use runtime::{OperationStatus, RuntimeState, RuntimeTracker, Verdict};

/// What the HTTP server and `check` read: an immutable picture of the current state.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub node: String,
    #[serde(serialize_with = "serialize_time")]
    pub generated_at: SystemTime,
    pub runtimes: Vec<RuntimeStatus>,
    /// Newest first. Shared: rebuilt only when an incident changes.
    #[serde(skip)]
    pub incidents: Arc<Vec<Incident>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStatus {
    pub runtime: Runtime,
    pub state: RuntimeState,
    pub reason: String,
    pub up: bool,
    pub stalled: bool,
    /// How long the runtime has been in this state.
    pub state_seconds: f64,
    pub operations: Vec<OperationStatus>,
}

pub fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// What the daemon lets the engine do beyond keeping state. `check` runs without it: it
/// never signals a daemon and never writes.
pub struct Actions {
    /// For background actions to report back.
    pub signals: SignalSender,
    pub incident_writer: IncidentWriter,
}

struct TrackedRuntime {
    tracker: RuntimeTracker,
    verdict: Verdict,
    since: Instant,
}

/// How long a container's name stays known after it was last listed, and how many are kept.
const CONTAINER_NAMES_KEPT_FOR: Duration = Duration::from_secs(3600);
const CONTAINER_NAMES_CAPACITY: usize = 4096;

pub struct Engine {
    config: Arc<Config>,
    node: String,
    metrics: Arc<Metrics>,
    runtimes: Vec<TrackedRuntime>,
    containers: ContainerDirectory,
    dump_policy: DumpPolicy,
    incidents: IncidentBook,
    incidents_published: Arc<Vec<Incident>>,
    actions: Option<Actions>,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Engine {
    /// Build the engine and its metrics, with incidents loaded from disk. Returns the engine
    /// and the receiver of snapshots.
    pub fn new(
        config: Arc<Config>,
        actions: Option<Actions>,
        loaded_incidents: Vec<Incident>,
    ) -> (Engine, watch::Receiver<Arc<Snapshot>>) {
        let node = config.resolved_node_name();
        let metrics = Metrics::new(config.metrics.node_label.then_some(node.as_str()));
        let now = Instant::now();
        let runtimes = Runtime::ALL
            .into_iter()
            .filter_map(|runtime| {
                let mode = runtime_mode(&config, runtime);
                (mode != RuntimeMode::Disabled).then(|| TrackedRuntime {
                    tracker: RuntimeTracker::new(
                        runtime,
                        mode,
                        &probe::operations_for(&config, runtime),
                    ),
                    verdict: Verdict {
                        state: RuntimeState::Pending,
                        reason: "no probe finished yet".into(),
                    },
                    since: now,
                })
            })
            .collect();
        let incidents = IncidentBook::new(node.clone(), config.incidents.keep, loaded_incidents);
        let incidents_published = Arc::new(incidents.all());
        let initial = Arc::new(Snapshot {
            node: node.clone(),
            generated_at: SystemTime::now(),
            runtimes: Vec::new(),
            incidents: incidents_published.clone(),
        });
        let (snapshot, receiver) = watch::channel(initial);
        let engine = Engine {
            dump_policy: DumpPolicy::new(config.dumps.cooldown, config.dumps.max_per_hour),
            config,
            node,
            metrics: Arc::new(metrics),
            runtimes,
            containers: ContainerDirectory::new(CONTAINER_NAMES_KEPT_FOR, CONTAINER_NAMES_CAPACITY),
            incidents,
            incidents_published,
            actions,
            snapshot,
        };
        engine.initialise_series();
        (engine, receiver)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Create every fixed series at zero so dashboards and alerts see them from the start.
    fn initialise_series(&self) {
        for tracked in &self.runtimes {
            let runtime = tracked.tracker.runtime().as_str();
            let labels = RuntimeLabels { runtime };
            self.metrics.runtime_up.get_or_create(&labels).set(0);
            self.metrics.runtime_stalled.get_or_create(&labels).set(0);
            self.metrics.incidents_total.get_or_create(&labels).get();
            self.metrics
                .incident_open
                .get_or_create(&labels)
                .set(i64::from(
                    self.incidents
                        .open_incident(tracked.tracker.runtime())
                        .is_some(),
                ));
            for state in RuntimeState::EXPORTED {
                self.metrics
                    .runtime_state
                    .get_or_create(&RuntimeStateLabels {
                        runtime,
                        state: state.as_str(),
                    })
                    .set(0);
            }
            for operation in tracked.tracker.operations() {
                let labels = OperationLabels {
                    runtime,
                    operation: operation.label(),
                };
                self.metrics
                    .probe_in_flight_seconds
                    .get_or_create(&labels)
                    .set(0.0);
                self.metrics
                    .probe_duration_seconds
                    .get_or_create_owned(&labels);
            }
        }
        for daemon in self.enabled_daemons() {
            for result in ["ok", "timeout", "failed", "cooldown"] {
                self.metrics
                    .goroutine_dumps_total
                    .get_or_create(&DumpResultLabels {
                        daemon: daemon.as_str(),
                        result,
                    })
                    .get();
            }
        }
    }

    fn enabled_daemons(&self) -> Vec<Daemon> {
        self.runtimes
            .iter()
            .map(|t| daemon_of(t.tracker.runtime()))
            .collect()
    }

    /// Run until shutdown: apply signals as they come, re-evaluate every `evaluate_interval`.
    pub async fn run(
        mut self,
        mut signals: SignalReceiver,
        heartbeat: Heartbeat,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.config.evaluate_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                signal = signals.recv() => match signal {
                    Some(signal) => self.apply(signal),
                    None => break,
                },
                _ = tick.tick() => {
                    heartbeat.beat();
                    self.evaluate(Instant::now());
                }
            }
        }
    }

    pub fn apply(&mut self, signal: Signal) {
        match signal {
            Signal::ProbeStarted {
                runtime,
                operation,
                id,
                at,
            } => {
                if let Some(tracked) = self.tracked(runtime) {
                    tracked.tracker.probe_started(&operation, id, at);
                }
            }
            Signal::ProbeFinished {
                runtime,
                operation,
                id,
                started,
                finished,
                result,
            } => {
                let labels = OperationLabels {
                    runtime: runtime.as_str(),
                    operation: operation.label(),
                };
                if let Err(failure) = &result {
                    self.metrics
                        .probe_failures_total
                        .get_or_create(&FailureLabels {
                            runtime: labels.runtime,
                            operation: labels.operation.clone(),
                            reason: failure.reason(),
                        })
                        .inc();
                    tracing::debug!(%runtime, operation = %labels.operation, %failure, "probe failed");
                }
                if !matches!(result, Err(ProbeFailure::Timeout)) {
                    self.metrics
                        .probe_duration_seconds
                        .get_or_create(&labels)
                        .observe(finished.saturating_duration_since(started).as_secs_f64());
                }
                if let Some(tracked) = self.tracked(runtime) {
                    tracked
                        .tracker
                        .probe_finished(&operation, id, started, finished, result);
                }
            }
            Signal::ContainersSeen(containers) => self.containers.saw(containers, Instant::now()),
            Signal::Dump(event) => self.apply_dump_event(event),
        }
    }

    fn apply_dump_event(&mut self, event: DumpEvent) {
        let changes = match event {
            DumpEvent::Signalled { daemon, pid } => {
                tracing::info!(%daemon, pid, "SIGUSR1 sent for a goroutine dump");
                Vec::new()
            }
            DumpEvent::Pending { daemon } => {
                self.incidents
                    .dump_progress(daemon, DumpStatus::Pending, None, None)
            }
            DumpEvent::Finished { daemon, outcome } => {
                self.metrics
                    .goroutine_dumps_total
                    .get_or_create(&DumpResultLabels {
                        daemon: daemon.as_str(),
                        result: outcome.result(),
                    })
                    .inc();
                let status = match &outcome {
                    DumpOutcome::Ok(record) => {
                        let when = record
                            .collected_at
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64();
                        self.metrics
                            .last_goroutine_dump_timestamp_seconds
                            .get_or_create(&DaemonLabels {
                                daemon: daemon.as_str(),
                            })
                            .set(when);
                        DumpStatus::Ok
                    }
                    DumpOutcome::Timeout { .. } => DumpStatus::Timeout,
                    DumpOutcome::Failed { .. } => DumpStatus::Failed,
                };
                self.incidents
                    .dump_progress(daemon, status, Some(&outcome), None)
            }
        };
        self.record_incident_changes(changes);
    }

    fn tracked(&mut self, runtime: Runtime) -> Option<&mut TrackedRuntime> {
        self.runtimes
            .iter_mut()
            .find(|t| t.tracker.runtime() == runtime)
    }

    /// Re-evaluate every verdict at `now`, update metrics and incidents, start dumps,
    /// publish a snapshot.
    pub fn evaluate(&mut self, now: Instant) {
        let thresholds = self.config.probes.clone();
        let mut transitions = Vec::new();
        for tracked in &mut self.runtimes {
            let verdict = tracked.tracker.evaluate(now, &thresholds);
            if verdict.state != tracked.verdict.state {
                log_transition(tracked.tracker.runtime(), &tracked.verdict, &verdict);
                transitions.push((
                    tracked.tracker.runtime(),
                    tracked.verdict.state,
                    verdict.state,
                ));
                tracked.since = now;
            }
            tracked.verdict = verdict;
        }
        self.update_runtime_metrics(now);
        self.update_incidents();
        for (runtime, from, to) in transitions {
            let triggers = &self.config.dumps.trigger_states;
            let is_trigger = |s: RuntimeState| triggers.iter().any(|t| t == s.as_str());
            if self.config.dumps.enabled && is_trigger(to) && !is_trigger(from) {
                self.request_dumps(runtime);
            }
        }
        self.publish(now);
    }

    fn update_runtime_metrics(&self, now: Instant) {
        for tracked in &self.runtimes {
            let name = tracked.tracker.runtime().as_str();
            let state = tracked.verdict.state;
            let metrics = &self.metrics;
            metrics
                .runtime_up
                .get_or_create(&RuntimeLabels { runtime: name })
                .set(i64::from(state.is_up()));
            metrics
                .runtime_stalled
                .get_or_create(&RuntimeLabels { runtime: name })
                .set(i64::from(state.is_stalled()));
            for exported in RuntimeState::EXPORTED {
                metrics
                    .runtime_state
                    .get_or_create(&RuntimeStateLabels {
                        runtime: name,
                        state: exported.as_str(),
                    })
                    .set(i64::from(exported == state));
            }
            for operation in tracked.tracker.operations() {
                metrics
                    .probe_in_flight_seconds
                    .get_or_create(&OperationLabels {
                        runtime: name,
                        operation: operation.label(),
                    })
                    .set(tracked.tracker.in_flight_age(operation, now).as_secs_f64());
            }
        }
    }

    /// The lowest layer stalled right now: containerd under dockerd.
    fn stalled_layer(&self, runtime: Runtime) -> &'static str {
        let containerd_stalled = self
            .runtimes
            .iter()
            .any(|t| t.tracker.runtime() == Runtime::Containerd && t.verdict.state.is_stalled());
        if containerd_stalled {
            "containerd"
        } else {
            daemon_of(runtime).as_str()
        }
    }

    fn update_incidents(&mut self) {
        let wall = SystemTime::now();
        let mut changes = Vec::new();
        let states: Vec<(Runtime, Verdict)> = self
            .runtimes
            .iter()
            .map(|t| (t.tracker.runtime(), t.verdict.clone()))
            .collect();
        for (runtime, verdict) in states {
            let state = verdict.state;
            if state == RuntimeState::Pending {
                continue;
            }
            let stalled = state.is_stalled();
            let recovered = (state.is_up() && !stalled) || state == RuntimeState::Absent;
            let layer = self.stalled_layer(runtime);
            let seen = Observation {
                state: state.as_str(),
                reason: &verdict.reason,
                stalled,
                recovered,
                layer,
            };
            changes.extend(self.incidents.on_state(runtime, &seen, wall));
        }
        self.record_incident_changes(changes);
    }

    /// Log, count and persist incident changes, and republish the list.
    fn record_incident_changes(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let mut ids: Vec<String> = Vec::new();
        for change in &changes {
            let (id, opened, closed) = match change {
                Change::Opened(id) => (id, true, false),
                Change::Closed(id) => (id, false, true),
                Change::Updated(id) => (id, false, false),
            };
            let Some(incident) = self.incidents.get(id) else {
                continue;
            };
            let labels = RuntimeLabels {
                runtime: incident.runtime.as_str(),
            };
            if opened {
                self.metrics.incidents_total.get_or_create(&labels).inc();
                self.metrics.incident_open.get_or_create(&labels).set(1);
                tracing::warn!(incident = %incident.summary(now), "incident opened");
            }
            if closed {
                self.metrics.incident_open.get_or_create(&labels).set(0);
                tracing::info!(incident = %incident.summary(now), "incident closed");
            }
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        if let Some(actions) = &self.actions {
            for id in &ids {
                if let Some(incident) = self.incidents.get(id) {
                    actions.incident_writer.save(incident);
                }
            }
        }
        self.incidents_published = Arc::new(self.incidents.all());
        // Readers see the incident together with the metrics that counted it.
        self.publish(Instant::now());
    }

    /// SIGUSR1 to the stalled runtime's daemon and the layer below it.
    fn request_dumps(&mut self, runtime: Runtime) {
        let Some(actions) = &self.actions else {
            return;
        };
        let signals = actions.signals.clone();
        let mut daemons = vec![daemon_of(runtime)];
        if runtime == Runtime::Docker && self.config.containerd.mode != RuntimeMode::Disabled {
            daemons.push(Daemon::Containerd);
        }
        let now = Instant::now();
        let mut changes = Vec::new();
        for daemon in daemons {
            match self.dump_policy.decide(daemon, now) {
                Decision::Allow => {
                    changes.extend(self.incidents.dump_requested(
                        runtime,
                        daemon,
                        DumpStatus::Signalled,
                        None,
                    ));
                    let config = self.config.clone();
                    let signals = signals.clone();
                    tokio::spawn(async move { dump(daemon, config, signals).await });
                }
                decision => {
                    let reason = if decision == Decision::Cooldown {
                        format!(
                            "cooldown of {:?} since the last dump",
                            self.config.dumps.cooldown
                        )
                    } else {
                        format!("{} dumps per hour reached", self.config.dumps.max_per_hour)
                    };
                    tracing::info!(%daemon, %reason, "goroutine dump skipped");
                    self.metrics
                        .goroutine_dumps_total
                        .get_or_create(&DumpResultLabels {
                            daemon: daemon.as_str(),
                            result: "cooldown",
                        })
                        .inc();
                    changes.extend(self.incidents.dump_requested(
                        runtime,
                        daemon,
                        DumpStatus::Skipped,
                        Some(reason),
                    ));
                }
            }
        }
        self.record_incident_changes(changes);
    }

    fn publish(&mut self, now: Instant) {
        let runtimes = self
            .runtimes
            .iter()
            .map(|tracked| {
                let state = tracked.verdict.state;
                RuntimeStatus {
                    runtime: tracked.tracker.runtime(),
                    state,
                    reason: tracked.verdict.reason.clone(),
                    up: state.is_up(),
                    stalled: state.is_stalled(),
                    state_seconds: now.saturating_duration_since(tracked.since).as_secs_f64(),
                    operations: tracked.tracker.operation_status(now),
                }
            })
            .collect();
        self.snapshot.send_replace(Arc::new(Snapshot {
            node: self.node.clone(),
            generated_at: SystemTime::now(),
            runtimes,
            incidents: self.incidents_published.clone(),
        }));
    }
}

/// Resolve the daemon's process and take its dump; every failure is reported back.
async fn dump(daemon: Daemon, config: Arc<Config>, signals: SignalSender) {
    let (socket, pidfile, source_dir) = match daemon {
        Daemon::Dockerd => (
            config.docker.socket.clone(),
            config.docker.pidfile.clone(),
            config.docker.exec_root.clone(),
        ),
        Daemon::Containerd => (
            config.containerd.socket.clone(),
            config.containerd.pidfile.clone(),
            config.containerd.stack_dump_dir.clone(),
        ),
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
            tracing::warn!(%daemon, %reason, "not signalling");
            signals
                .send(Signal::Dump(DumpEvent::Finished {
                    daemon,
                    outcome: DumpOutcome::Failed { reason },
                }))
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

fn daemon_of(runtime: Runtime) -> Daemon {
    match runtime {
        Runtime::Docker => Daemon::Dockerd,
        Runtime::Containerd => Daemon::Containerd,
    }
}

fn runtime_mode(config: &Config, runtime: Runtime) -> RuntimeMode {
    match runtime {
        Runtime::Docker => config.docker.mode,
        Runtime::Containerd => config.containerd.mode,
    }
}

fn log_transition(runtime: Runtime, from: &Verdict, to: &Verdict) {
    let (from, state, reason) = (from.state.as_str(), to.state.as_str(), to.reason.as_str());
    if to.state.is_problem() {
        tracing::warn!(%runtime, from, state, reason, "runtime state changed");
    } else {
        tracing::info!(%runtime, from, state, reason, "runtime state changed");
    }
}
