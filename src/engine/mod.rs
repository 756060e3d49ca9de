//! The engine: the one place that turns signals into state, metrics and actions.
//!
//! It owns all mutable state. Detectors reach it only through the signal channel; the HTTP
//! server and `check` only read the [`Snapshot`] it publishes and the metrics registry.

pub mod dump_policy;
pub mod incidents;
pub mod kernel;
pub mod lifecycle;
pub mod procscan;
pub mod runtime;
pub mod stops;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::actions::dumps::{self, DumpEvent, DumpJob, DumpOutcome};
use crate::actions::incident_store::IncidentWriter;
use crate::actions::resolve::ContainerResolver;
use crate::actions::target::{self, Daemon};
use crate::config::{Config, RuntimeMode};
use crate::containers::ContainerDirectory;
use crate::detectors::kernel::{self as kernel_log, KernelEvent, KernelLogCounters};
use crate::detectors::probe;
use crate::heartbeat::Heartbeat;
use crate::metrics::{
    DaemonLabels, DumpResultLabels, FailureLabels, Metrics, OomLabels, OperationLabels, RuleLabels,
    RuntimeLabels, RuntimeStateLabels, ScopeLabels, SourceLabels,
};
use crate::signal::{ProbeFailure, Runtime, Signal, SignalReceiver, SignalSender};
use dump_policy::{Decision, DumpPolicy};
use incidents::{Change, DumpStatus, Evidence, Incident, IncidentBook, Observation};
use kernel::{KernelState, KernelStatus};
use lifecycle::{LifecycleState, StopIncident, StopsView};
use procscan::{ProcScanState, ProcScanView};
use runtime::{OperationStatus, RuntimeState, RuntimeTracker, Verdict};

/// What the HTTP server and `check` read: an immutable picture of the current state.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub node: String,
    #[serde(serialize_with = "serialize_time")]
    pub generated_at: SystemTime,
    pub runtimes: Vec<RuntimeStatus>,
    pub kernel_log: Arc<KernelStatus>,
    /// The latest /proc scan; None until the first one.
    pub proc_scan: Option<Arc<ProcScanView>>,
    /// Newest first. Shared: rebuilt only when an incident changes.
    #[serde(skip)]
    pub incidents: Arc<Vec<Incident>>,
    /// Container stops, served at `/stops`.
    #[serde(skip)]
    pub stops: Arc<StopsView>,
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
    pub resolver: ContainerResolver,
}

struct TrackedRuntime {
    tracker: RuntimeTracker,
    verdict: Verdict,
    since: Instant,
}

/// How long a container's name stays known after it was last listed, and how many are kept.
const CONTAINER_NAMES_KEPT_FOR: Duration = Duration::from_secs(3600);
const CONTAINER_NAMES_CAPACITY: usize = 4096;
/// An unknown container id is looked up at most this often, and so many at most remembered.
const RESOLVE_RETRY_AFTER: Duration = Duration::from_secs(600);
const RESOLVE_REMEMBERED: usize = 1024;
/// Kernel changes are published at once, but no more often than this (a flood of matching
/// records would otherwise copy the event ring per record); the tick publishes the rest.
const KERNEL_PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(20);

pub struct Engine {
    config: Arc<Config>,
    node: String,
    metrics: Arc<Metrics>,
    runtimes: Vec<TrackedRuntime>,
    containers: ContainerDirectory,
    dump_policy: DumpPolicy,
    incidents: IncidentBook,
    incidents_published: Arc<Vec<Incident>>,
    kernel: KernelState,
    kernel_published: Arc<KernelStatus>,
    /// The kernel status changed since it was last published.
    kernel_dirty: bool,
    kernel_published_at: Instant,
    proc_scan: ProcScanState,
    proc_published: Option<Arc<ProcScanView>>,
    lifecycle: LifecycleState,
    stops_published: Arc<StopsView>,
    /// Container ids looked up recently, so an unknown id is not asked about again and again.
    resolving: HashMap<String, Instant>,
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
            kernel_log: Arc::default(),
            proc_scan: None,
            incidents: incidents_published.clone(),
            stops: Arc::default(),
        });
        let (snapshot, receiver) = watch::channel(initial);
        let config_for_kernel = config.clone();
        let lifecycle = LifecycleState::new(
            &config.lifecycle,
            config.docker.mode != RuntimeMode::Disabled,
        );
        let engine = Engine {
            dump_policy: DumpPolicy::new(config.dumps.cooldown, config.dumps.max_per_hour),
            config,
            node,
            metrics: Arc::new(metrics),
            runtimes,
            containers: ContainerDirectory::new(CONTAINER_NAMES_KEPT_FOR, CONTAINER_NAMES_CAPACITY),
            incidents,
            incidents_published,
            kernel: KernelState::new(config_recent_events(&config_for_kernel)),
            kernel_published: Arc::default(),
            kernel_dirty: true,
            kernel_published_at: now,
            proc_scan: ProcScanState::default(),
            proc_published: None,
            lifecycle,
            stops_published: Arc::default(),
            resolving: HashMap::new(),
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
        if self.config.kernel_log.enabled {
            // The built-in rules are known to parse (a unit test says so).
            let rules = kernel_log::default_rules()
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.name)
                .chain(self.config.kernel_log.rules.iter().map(|r| r.name.clone()));
            for rule in rules {
                self.metrics
                    .kernel_events_total
                    .get_or_create(&RuleLabels { rule })
                    .get();
            }
            for victim in ["runc_init", "runtime", "container", "host"] {
                for constraint in ["memcg", "global"] {
                    self.metrics
                        .oom_kills_total
                        .get_or_create(&OomLabels { victim, constraint })
                        .get();
                }
            }
            for scope in ["runtime", "container", "host"] {
                self.metrics
                    .hung_tasks_total
                    .get_or_create(&ScopeLabels { scope })
                    .get();
            }
        }
        if self.config.proc_scan.enabled {
            ProcScanState::initialise(&self.metrics);
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
        self.apply_signal(signal);
        let now = Instant::now();
        if self.kernel_dirty
            && now.saturating_duration_since(self.kernel_published_at)
                >= KERNEL_PUBLISH_MIN_INTERVAL
        {
            self.publish(now);
        }
    }

    fn apply_signal(&mut self, signal: Signal) {
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
            Signal::ContainersSeen(containers) => {
                self.containers.saw(containers, Instant::now());
                self.kernel_dirty |= self.kernel.enrich(&self.containers);
            }
            Signal::Dump(event) => self.apply_dump_event(event),
            Signal::Kernel(event) => self.apply_kernel_event(*event),
            Signal::KernelLogCounters(counters) => self.apply_kernel_counters(&counters),
            Signal::KernelLogUp { source, .. } => {
                self.metrics.kernel_log_up.set(1);
                self.set_kernel_log_source(Some(source));
                self.kernel.status.up = Some(true);
                self.kernel.status.error = None;
                self.kernel_dirty = true;
            }
            Signal::ProcScan(report) => self.apply_scan(*report),
            Signal::KernelLogDown { error, .. } => {
                self.metrics.kernel_log_up.set(0);
                self.set_kernel_log_source(None);
                self.kernel.status.up = Some(false);
                self.kernel.status.error = Some(error);
                self.kernel_dirty = true;
            }
            Signal::ContainerEvent(event) => {
                self.containers
                    .saw([event.container.clone()], Instant::now());
                if let Some(ended) = self.lifecycle.apply(&event, &self.metrics) {
                    self.record_stop_incidents(vec![ended]);
                }
            }
            Signal::EventStreamUp { reconnected, .. } => {
                self.lifecycle.stream_up(reconnected, &self.metrics);
            }
            Signal::EventStreamDown {
                error, retry_in, ..
            } => {
                self.lifecycle.stream_down(error, retry_in, &self.metrics);
            }
            Signal::EventMalformed { reason, .. } => {
                self.lifecycle.malformed(reason, &self.metrics);
            }
        }
    }

    /// Stuck stops open, join or keep open the Docker incident; their evidence is updated.
    fn record_stop_incidents(&mut self, told: Vec<StopIncident>) {
        let now = SystemTime::now();
        let mut changes = Vec::new();
        for item in told {
            changes.extend(match item {
                StopIncident::Stuck {
                    container_id,
                    evidence,
                } => self
                    .incidents
                    .stop_stuck(Runtime::Docker, &container_id, evidence, now),
                StopIncident::Updated(evidence) => self.incidents.add_evidence(evidence),
                StopIncident::Ended {
                    container_id,
                    evidence,
                } => self.incidents.stop_ended(&container_id, evidence),
            });
        }
        self.record_incident_changes(changes);
    }

    /// Age the stops, correlate stuck ones with /proc, tell incidents.
    fn update_stops(&mut self) {
        let docker = self
            .runtimes
            .iter()
            .find(|t| t.tracker.runtime() == Runtime::Docker)
            .map(|t| t.verdict.state);
        let told = self.lifecycle.evaluate(
            SystemTime::now(),
            &self.metrics,
            docker,
            self.proc_published.as_deref(),
        );
        self.record_stop_incidents(told);
    }

    fn apply_scan(&mut self, report: crate::detectors::procscan::ScanReport) {
        let applied = self
            .proc_scan
            .apply(report, &self.metrics, &self.containers);
        for id in applied.unknown_containers {
            self.resolve_container(id);
        }
        let mut changes = Vec::new();
        for evidence in applied.evidence {
            changes.extend(self.incidents.add_evidence(evidence));
        }
        self.proc_published = Some(Arc::new(applied.view));
        self.record_incident_changes(changes);
        self.publish(Instant::now());
    }

    fn set_kernel_log_source(&mut self, active: Option<kernel_log::LogSource>) {
        for source in kernel_log::LogSource::ALL {
            self.metrics
                .kernel_log_source
                .get_or_create(&SourceLabels {
                    source: source.label(),
                })
                .set(i64::from(active == Some(source)));
        }
        self.kernel.status.source = active;
    }

    fn apply_kernel_counters(&mut self, counters: &KernelLogCounters) {
        let m = &self.metrics;
        m.kernel_log_records_total.inc_by(counters.records_read);
        m.kernel_log_lost_records_total.inc_by(counters.lost);
        m.kernel_log_ignored_records_total
            .inc_by(counters.ignored_non_kernel);
        m.kernel_log_malformed_records_total
            .inc_by(counters.malformed);
        let status = &mut self.kernel.status;
        status.records_read += counters.records_read;
        status.records_lost += counters.lost;
        status.records_ignored += counters.ignored_non_kernel;
        status.records_malformed += counters.malformed;
        self.kernel_dirty = true;
    }

    fn apply_kernel_event(&mut self, mut event: KernelEvent) {
        let m = &self.metrics;
        m.kernel_events_total
            .get_or_create(&RuleLabels {
                rule: event.rule.clone(),
            })
            .inc();
        if let (Some(victim), Some(constraint)) = (event.victim_label(), event.constraint_label()) {
            m.oom_kills_total
                .get_or_create(&OomLabels { victim, constraint })
                .inc();
        }
        if let Some(scope) = event.hung_task_scope_label() {
            m.hung_tasks_total
                .get_or_create(&ScopeLabels { scope })
                .inc();
        }
        if !kernel::enrich_event(&mut event, &self.containers)
            && let Some(id) = event.owner.as_ref().and_then(|o| o.container_id.clone())
        {
            self.resolve_container(id);
        }
        let at = kernel::kernel_time_to_wall(event.ts_usec);
        tracing::info!(
            rule = %event.rule, victim = event.victim_label(), container = event.container_name.as_deref(),
            message = %event.message, "kernel event"
        );
        let changes = self.incidents.add_evidence(kernel_evidence(&event, at));
        self.kernel.record(event, at, Instant::now());
        self.kernel_dirty = true;
        self.record_incident_changes(changes);
    }

    /// Ask the runtimes for an unknown container's names, unless asked recently or the
    /// runtime is stuck.
    fn resolve_container(&mut self, id: String) {
        let Some(actions) = &self.actions else {
            return;
        };
        let now = Instant::now();
        if self
            .resolving
            .get(&id)
            .is_some_and(|asked| now.saturating_duration_since(*asked) < RESOLVE_RETRY_AFTER)
        {
            return;
        }
        self.resolving
            .retain(|_, asked| now.saturating_duration_since(*asked) < RESOLVE_RETRY_AFTER);
        if self.resolving.len() >= RESOLVE_REMEMBERED {
            return;
        }
        self.resolving.insert(id.clone(), now);
        let answering = |runtime: Runtime| {
            self.runtimes.iter().any(|t| {
                t.tracker.runtime() == runtime
                    && t.verdict.state.is_up()
                    && !t.verdict.state.is_stalled()
            })
        };
        actions.resolver.spawn(
            id,
            answering(Runtime::Docker),
            answering(Runtime::Containerd),
            actions.signals.clone(),
        );
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
                let triage = match &outcome {
                    DumpOutcome::Ok(record) => record.triage.clone(),
                    _ => None,
                };
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
                    .dump_progress(daemon, status, Some(&outcome), triage)
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
        self.update_kernel_conditions(now);
        // Before the runtime states: a stop that just became stuck keeps its incident open.
        self.update_stops();
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

    /// Conditions expire with time: refresh their gauges every evaluation.
    fn update_kernel_conditions(&mut self, now: Instant) {
        let active = self.kernel.active_conditions(now);
        for rule in self.kernel_published.conditions.iter().map(|c| &c.rule) {
            if !active.iter().any(|a| &a.rule == rule) {
                self.metrics
                    .kernel_condition
                    .get_or_create(&RuleLabels { rule: rule.clone() })
                    .set(0);
                self.kernel_dirty = true;
            }
        }
        for condition in &active {
            self.metrics
                .kernel_condition
                .get_or_create(&RuleLabels {
                    rule: condition.rule.clone(),
                })
                .set(1);
        }
        if active.len() != self.kernel_published.conditions.len() {
            self.kernel_dirty = true;
        }
    }

    fn publish(&mut self, now: Instant) {
        if self.kernel_dirty {
            self.kernel_published = Arc::new(self.kernel.status(now));
            self.kernel_dirty = false;
            self.kernel_published_at = now;
        }
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
        if let Some(view) = self.lifecycle.changed_view() {
            self.stops_published = Arc::new(view);
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            node: self.node.clone(),
            generated_at: SystemTime::now(),
            runtimes,
            kernel_log: self.kernel_published.clone(),
            proc_scan: self.proc_published.clone(),
            incidents: self.incidents_published.clone(),
            stops: self.stops_published.clone(),
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

fn config_recent_events(config: &Config) -> usize {
    config.kernel_log.recent_events
}

/// The incident's view of a kernel event.
fn kernel_evidence(event: &KernelEvent, at: SystemTime) -> Evidence {
    let pid = event.fields.pid.and_then(|p| i32::try_from(p).ok());
    if let Some(oom) = &event.oom {
        return Evidence::OomKill {
            at,
            pid,
            comm: event.fields.comm.clone(),
            victim: oom.victim.as_str().to_string(),
            constraint: oom.constraint.as_str().to_string(),
            memcg: oom.memcg.clone().or_else(|| oom.task_memcg.clone()),
            container: event
                .container_name
                .clone()
                .or_else(|| event.owner.as_ref().and_then(|o| o.container_id.clone())),
        };
    }
    if let Some(scope) = event.hung_task_scope {
        return Evidence::HungTask {
            at,
            pid,
            comm: event.fields.comm.clone(),
            scope: scope.as_str().to_string(),
            seconds: event.fields.seconds,
        };
    }
    Evidence::KernelEvent {
        at,
        rule: event.rule.clone(),
        message: event.message.clone(),
    }
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
