//! The engine: the one place that turns signals into state, metrics and actions.
//!
//! It owns all mutable state: each registered source's state, the container names, the
//! incidents and the dump policy. Detectors reach it only through the signal channel; the HTTP
//! server and `check` only read the [`Snapshot`] it publishes and the metrics registry. Time
//! is passed in ([`Now`]): whoever drives the engine reads the clock, so a test can drive it
//! with a scripted sequence of signals and times.

pub mod dump_policy;
mod effects;
pub mod incidents;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::ser::SerializeMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::actions::dumps::{DumpEvent, DumpOutcome};
use crate::config::{Config, RuntimeMode};
use crate::containers::ContainerDirectory;
use crate::domain::Runtime;
use crate::heartbeat::Heartbeat;
use crate::metrics::{DaemonLabels, DumpResultLabels, Metrics, RuntimeLabels};
use crate::signal::{Payload, Signal, SignalReceiver};
use crate::sources::{
    Action, Board, Context, Now, Publish, Section, Source, SourceState, find_section,
};
use dump_policy::{Decision, DumpPolicy};
use incidents::{Change, DumpStatus, Incident, IncidentBook};

pub use effects::{DaemonEffects, Effects};

/// What the HTTP server and `check` read: an immutable picture of the current state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub node: String,
    pub generated_at: SystemTime,
    /// One per source, in registration order.
    pub sections: Vec<Arc<dyn Section>>,
    /// Newest first. Shared: rebuilt only when an incident changes.
    pub incidents: Arc<Vec<Incident>>,
}

impl Snapshot {
    /// The section of type `T`, when its source is registered.
    pub fn section<T: Section>(&self) -> Option<&T> {
        find_section(&self.sections)
    }

    /// What a section serves at `path` (e.g. `/events`), if one does.
    pub fn endpoint(&self, path: &str) -> Option<serde_json::Value> {
        self.sections
            .iter()
            .filter_map(|s| s.endpoint())
            .find(|(at, _)| *at == path)
            .map(|(_, value)| value)
    }
}

/// `/status`: the node, the time, and every section that belongs there under its key.
impl Serialize for Snapshot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("node", &self.node)?;
        map.serialize_entry(
            "generated_at",
            &humantime::format_rfc3339_millis(self.generated_at).to_string(),
        )?;
        for section in self.sections.iter().filter(|s| s.in_status()) {
            map.serialize_entry(section.key(), &section.to_json())?;
        }
        map.end()
    }
}

pub fn serialize_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
}

/// How long a container's name stays known after it was last listed, and how many are kept.
const CONTAINER_NAMES_KEPT_FOR: Duration = Duration::from_secs(3600);
const CONTAINER_NAMES_CAPACITY: usize = 4096;
/// An unknown container id is looked up at most this often, and so many at most remembered.
const RESOLVE_RETRY_AFTER: Duration = Duration::from_secs(600);
const RESOLVE_REMEMBERED: usize = 1024;
/// A source's "publish soon" is honoured at once, but no more often than this (a flood of
/// matching kernel records would otherwise copy the event ring per record); the tick
/// publishes the rest.
const PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(20);

struct Slot {
    name: &'static str,
    state: Box<dyn SourceState>,
    published: Option<Arc<dyn Section>>,
}

pub struct Engine {
    config: Arc<Config>,
    node: String,
    metrics: Arc<Metrics>,
    slots: Vec<Slot>,
    cx: Context,
    dump_policy: DumpPolicy,
    incidents_published: Arc<Vec<Incident>>,
    /// Incidents whose evidence or dumps changed since they were last saved and listed: an
    /// OOM storm adds evidence per kill, so these are saved and listed once per evaluation
    /// rather than per event. Opening and closing are saved and listed at once.
    incidents_updated: BTreeSet<String>,
    /// A source asked to publish soon and it has not happened yet.
    publish_pending: bool,
    /// When a "publish soon" was last honoured: floods are published at most every
    /// [`PUBLISH_MIN_INTERVAL`], an isolated change at once.
    soon_published_at: Instant,
    /// Container ids looked up recently, so an unknown id is not asked about again and again.
    resolving: HashMap<String, Instant>,
    /// None in `check`: it never signals a daemon and never writes.
    effects: Option<Box<dyn Effects>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
}

impl Engine {
    /// Build the engine, each source's state and the metrics, with incidents loaded from disk.
    /// Returns the engine and the receiver of snapshots.
    pub fn new(
        config: Arc<Config>,
        sources: &[Box<dyn Source>],
        effects: Option<Box<dyn Effects>>,
        loaded_incidents: Vec<Incident>,
        now: Now,
    ) -> (Engine, watch::Receiver<Arc<Snapshot>>) {
        let node = config.resolved_node_name();
        let mut metrics = Metrics::new(config.metrics.node_label.then_some(node.as_str()));
        let slots = sources
            .iter()
            .filter_map(|source| {
                source
                    .state(&config, metrics.registry_mut(), now)
                    .map(|state| Slot {
                        name: source.name(),
                        state,
                        published: None,
                    })
            })
            .collect();
        let incidents = IncidentBook::new(node.clone(), config.incidents.keep, loaded_incidents);
        let incidents_published = Arc::new(incidents.all());
        let initial = Arc::new(Snapshot {
            node: node.clone(),
            generated_at: now.wall,
            sections: Vec::new(),
            incidents: incidents_published.clone(),
        });
        let (snapshot, receiver) = watch::channel(initial);
        let mut engine = Engine {
            dump_policy: DumpPolicy::new(config.dumps.cooldown, config.dumps.max_per_hour),
            node,
            metrics: Arc::new(metrics),
            slots,
            cx: Context {
                now,
                containers: ContainerDirectory::new(
                    CONTAINER_NAMES_KEPT_FOR,
                    CONTAINER_NAMES_CAPACITY,
                ),
                incidents,
                changes: Vec::new(),
                board: Board::default(),
                actions: Vec::new(),
                publish: Publish::No,
            },
            incidents_published,
            incidents_updated: BTreeSet::new(),
            publish_pending: false,
            soon_published_at: now.mono,
            resolving: HashMap::new(),
            effects,
            snapshot,
            config,
        };
        engine.initialise_series();
        engine.publish(now);
        (engine, receiver)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The runtimes that are probed at all.
    fn enabled_runtimes(&self) -> impl Iterator<Item = Runtime> + '_ {
        Runtime::ALL
            .into_iter()
            .filter(|r| self.config.runtime_mode(*r) != RuntimeMode::Disabled)
    }

    /// Create the engine's own fixed series at zero so dashboards and alerts see them.
    fn initialise_series(&self) {
        for runtime in self.enabled_runtimes() {
            let labels = RuntimeLabels {
                runtime: runtime.as_str(),
            };
            self.metrics.incidents_total.get_or_create(&labels).get();
            let open = self.cx.incidents.open_incident(runtime).is_some();
            self.metrics
                .incident_open
                .get_or_create(&labels)
                .set(i64::from(open));
            // A CRI stall's dumps are containerd's: no daemon of its own to count.
            if runtime == Runtime::Cri {
                continue;
            }
            for result in ["ok", "timeout", "failed", "cooldown"] {
                self.metrics
                    .goroutine_dumps_total
                    .get_or_create(&DumpResultLabels {
                        daemon: runtime.daemon_name(),
                        result,
                    })
                    .get();
            }
        }
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
                    Some(signal) => self.apply(signal, Now::read()),
                    None => break,
                },
                _ = tick.tick() => {
                    heartbeat.beat();
                    self.evaluate(Now::read());
                }
            }
        }
    }

    /// Take one signal at `now`.
    pub fn apply(&mut self, signal: Signal, now: Now) {
        self.cx.now = now;
        match signal {
            Signal::Source { source, payload } => {
                match self.slots.iter_mut().find(|s| s.name == source) {
                    Some(slot) => slot.state.apply(payload, &mut self.cx),
                    None => tracing::error!(source, "a signal for no registered source; dropped"),
                }
            }
            Signal::ContainersSeen(containers) => {
                self.cx.containers.saw(containers, now.mono);
                for slot in &mut self.slots {
                    slot.state.containers_changed(&mut self.cx);
                }
            }
            Signal::Action(payload) => self.apply_action_result(payload),
        }
        self.finish_step(now);
        let due =
            now.mono.saturating_duration_since(self.soon_published_at) >= PUBLISH_MIN_INTERVAL;
        if self.publish_pending && due {
            self.soon_published_at = now.mono;
            self.publish(now);
        }
    }

    /// Re-evaluate every source at `now`, carry out what they decided, publish a snapshot.
    pub fn evaluate(&mut self, now: Now) {
        self.cx.now = now;
        for slot in &mut self.slots {
            slot.state.evaluate(&mut self.cx);
        }
        for slot in &mut self.slots {
            slot.state.settle(&mut self.cx);
        }
        self.finish_step(now);
        self.save_updated_incidents();
        self.publish(now);
    }

    /// Save and list the incidents updated since the last time.
    fn save_updated_incidents(&mut self) {
        if self.incidents_updated.is_empty() {
            return;
        }
        let updated = std::mem::take(&mut self.incidents_updated);
        if let Some(effects) = &self.effects {
            for incident in updated.iter().filter_map(|id| self.cx.incidents.get(id)) {
                effects.save(incident);
            }
        }
        self.incidents_published = Arc::new(self.cx.incidents.all());
    }

    /// Carry out the step's actions and incident changes; note whether to publish.
    fn finish_step(&mut self, now: Now) {
        for action in std::mem::take(&mut self.cx.actions) {
            match action {
                Action::RequestDumps(runtime) => self.request_dumps(runtime, now),
                Action::ResolveContainer(id) => self.resolve_container(id, now),
            }
        }
        let changes = std::mem::take(&mut self.cx.changes);
        let incidents_changed = self.record_incident_changes(changes, now);
        match std::mem::replace(&mut self.cx.publish, Publish::No) {
            Publish::Now => self.publish(now),
            // Readers see an incident together with the metrics that counted it.
            _ if incidents_changed => self.publish(now),
            Publish::Soon => self.publish_pending = true,
            Publish::No => {}
        }
    }

    /// Log and count incident changes; persist openings and closings and rebuild the list at
    /// once, leave updates for [`Engine::save_updated_incidents`]. Returns whether the list
    /// was rebuilt.
    fn record_incident_changes(&mut self, changes: Vec<Change>, now: Now) -> bool {
        if changes.is_empty() {
            return false;
        }
        if changes.iter().all(|c| matches!(c, Change::Updated(_))) {
            for change in changes {
                if let Change::Updated(id) = change {
                    self.incidents_updated.insert(id);
                }
            }
            return false;
        }
        let mut ids: Vec<String> = std::mem::take(&mut self.incidents_updated)
            .into_iter()
            .collect();
        for change in &changes {
            let (id, opened, closed) = match change {
                Change::Opened(id) => (id, true, false),
                Change::Closed(id) => (id, false, true),
                Change::Updated(id) => (id, false, false),
            };
            let Some(incident) = self.cx.incidents.get(id) else {
                continue;
            };
            let labels = RuntimeLabels {
                runtime: incident.runtime.as_str(),
            };
            if opened {
                self.metrics.incidents_total.get_or_create(&labels).inc();
                self.metrics.incident_open.get_or_create(&labels).set(1);
                tracing::warn!(incident = %incident.summary(now.wall), "incident opened");
            }
            if closed {
                self.metrics.incident_open.get_or_create(&labels).set(0);
                tracing::info!(incident = %incident.summary(now.wall), "incident closed");
            }
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        if let Some(effects) = &self.effects {
            for id in &ids {
                if let Some(incident) = self.cx.incidents.get(id) {
                    effects.save(incident);
                }
            }
        }
        self.incidents_published = Arc::new(self.cx.incidents.all());
        true
    }

    /// SIGUSR1 to the stalled runtime's daemon and the layer below it.
    fn request_dumps(&mut self, runtime: Runtime, now: Now) {
        let Some(effects) = &self.effects else {
            return;
        };
        let containerd = self.config.containerd.mode != RuntimeMode::Disabled;
        // A CRI stall is most often containerd's CRI plugin: its dump is containerd's. CRI-O
        // and cri-dockerd dumps are not collected.
        let daemons = match runtime {
            Runtime::Docker if containerd => vec![Runtime::Docker, Runtime::Containerd],
            Runtime::Cri if containerd => vec![Runtime::Containerd],
            Runtime::Cri => Vec::new(),
            other => vec![other],
        };
        for daemon in daemons {
            let changes = match self.dump_policy.decide(daemon, now.mono) {
                Decision::Allow => {
                    effects.dump(daemon);
                    self.cx
                        .incidents
                        .dump_requested(runtime, daemon, DumpStatus::Signalled, None)
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
                    tracing::info!(daemon = daemon.daemon_name(), %reason, "goroutine dump skipped");
                    self.metrics
                        .goroutine_dumps_total
                        .get_or_create(&DumpResultLabels {
                            daemon: daemon.daemon_name(),
                            result: "cooldown",
                        })
                        .inc();
                    self.cx.incidents.dump_requested(
                        runtime,
                        daemon,
                        DumpStatus::Skipped,
                        Some(reason),
                    )
                }
            };
            self.cx.changes.extend(changes);
        }
    }

    /// Ask the runtimes for an unknown container's names, unless asked recently or the
    /// runtime is stuck.
    fn resolve_container(&mut self, id: String, now: Now) {
        let Some(effects) = &self.effects else {
            return;
        };
        let now = now.mono;
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
        let board = &self.cx.board;
        effects.resolve(
            id,
            board.answering(Runtime::Docker),
            board.answering(Runtime::Containerd),
        );
    }

    fn apply_action_result(&mut self, payload: Payload) {
        let event = match payload.downcast::<DumpEvent>() {
            Ok(event) => event,
            Err(_) => {
                tracing::error!("an action result of an unknown type; dropped");
                return;
            }
        };
        let changes = match event {
            DumpEvent::Signalled { daemon, pid } => {
                tracing::info!(
                    daemon = daemon.daemon_name(),
                    pid,
                    "SIGUSR1 sent for a goroutine dump"
                );
                Vec::new()
            }
            DumpEvent::Pending { daemon } => {
                self.cx
                    .incidents
                    .dump_progress(daemon, DumpStatus::Pending, None, None)
            }
            DumpEvent::Finished { daemon, outcome } => {
                self.metrics
                    .goroutine_dumps_total
                    .get_or_create(&DumpResultLabels {
                        daemon: daemon.daemon_name(),
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
                                daemon: daemon.daemon_name(),
                            })
                            .set(when);
                        DumpStatus::Ok
                    }
                    DumpOutcome::Timeout { .. } => DumpStatus::Timeout,
                    DumpOutcome::Failed { .. } => DumpStatus::Failed,
                };
                self.cx
                    .incidents
                    .dump_progress(daemon, status, Some(&outcome), triage)
            }
        };
        self.cx.changes.extend(changes);
    }

    fn publish(&mut self, now: Now) {
        self.publish_pending = false;
        for slot in &mut self.slots {
            if let Some(section) = slot.state.section(now) {
                slot.published = Some(section);
            }
        }
        let sections = self
            .slots
            .iter()
            .filter_map(|s| s.published.clone())
            .collect();
        self.snapshot.send_replace(Arc::new(Snapshot {
            node: self.node.clone(),
            generated_at: now.wall,
            sections,
            incidents: self.incidents_published.clone(),
        }));
    }
}
