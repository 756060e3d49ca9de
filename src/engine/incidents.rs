//! Incidents: a runtime stall or a stuck container stop opens one; it gathers everything from
//! its window — state changes, goroutine dumps and their triage, kernel events, stuck tasks,
//! runc processes and stuck stops — states a suspected cause, and closes when the runtime
//! answers again and no stop keeps it open.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::actions::dumps::{DumpOutcome, DumpRecord};
use crate::domain::{OomConstraint, OomVictim, Runtime, RuntimeKind, Scope, WaitClass};
use crate::sources::lifecycle::stops::HeldBy;

/// Evidence older than this before a stall opens is not attached to it.
pub const EVIDENCE_LOOKBACK: Duration = Duration::from_secs(300);
/// Bounds per incident, so a long incident cannot grow without limit.
const MAX_STATES: usize = 64;
const MAX_EVIDENCE: usize = 256;
const MAX_RECENT_EVIDENCE: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateChange {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    pub runtime: Runtime,
    pub state: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DumpStatus {
    Signalled,
    /// Signalled but not written yet: the daemon is probably stopped.
    Pending,
    Ok,
    Timeout,
    Failed,
    /// Not signalled: cooldown or hourly cap.
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpEntry {
    #[serde(with = "crate::domain::as_daemon")]
    pub daemon: Runtime,
    pub status: DumpStatus,
    pub detail: Option<String>,
    pub record: Option<DumpRecord>,
    /// One-line verdict of the dump's triage.
    pub triage: Option<String>,
}

/// A fact from a detector that may explain a stall.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "evidence", rename_all = "snake_case")]
pub enum Evidence {
    OomKill {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        pid: Option<i32>,
        comm: Option<String>,
        victim: OomVictim,
        constraint: OomConstraint,
        memcg: Option<String>,
        container: Option<String>,
    },
    HungTask {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        pid: Option<i32>,
        comm: Option<String>,
        scope: Scope,
        seconds: Option<u64>,
        /// The kernel's call trace of the task (frames, innermost first), when it logged one.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        call_trace: Vec<String>,
    },
    KernelEvent {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        rule: String,
        message: String,
    },
    StuckTask {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        pid: i32,
        tid: i32,
        comm: String,
        scope: Scope,
        wchan: Option<String>,
        seconds: f64,
        container: Option<String>,
        /// What it waits on, classified, and the chain in one phrase.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait: Option<WaitClass>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        waits_on: Option<String>,
    },
    StuckRuntimeProcess {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        kind: RuntimeKind,
        pid: i32,
        comm: String,
        age_seconds: f64,
        wchan: Option<String>,
        fifo: Option<String>,
    },
    /// A container stop with no exit by its deadline (restated when it ends).
    StuckStop {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        container_id: String,
        container: Option<String>,
        image: Option<String>,
        /// Since the first kill.
        seconds: f64,
        /// SIGKILL was sent after the stop signal.
        escalated: bool,
        /// The container exited at last.
        ended: bool,
        /// Its tasks in D or frozen, from /proc.
        held_by: HeldBy,
    },
    /// A CRI call kubelet makes, in flight past the stall threshold.
    CriCallBlocked {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        /// `ListContainers`, `ContainerStatus`, ...
        call: String,
        seconds: f64,
        /// The pod or container a status call stuck on, when one is.
        behind: Option<String>,
    },
    /// A task containerd lists as UNKNOWN: its shim did not answer the state call.
    UnresponsiveShim {
        #[serde(with = "humantime_serde")]
        at: SystemTime,
        container_id: String,
        container: Option<String>,
        shim_pid: Option<i32>,
        shim_state: Option<char>,
        shim_wchan: Option<String>,
    },
}

impl Evidence {
    pub fn at(&self) -> SystemTime {
        match self {
            Evidence::OomKill { at, .. }
            | Evidence::HungTask { at, .. }
            | Evidence::KernelEvent { at, .. }
            | Evidence::StuckTask { at, .. }
            | Evidence::StuckRuntimeProcess { at, .. }
            | Evidence::StuckStop { at, .. }
            | Evidence::CriCallBlocked { at, .. }
            | Evidence::UnresponsiveShim { at, .. } => *at,
        }
    }

    /// Whether this kind restates earlier items (a scan's findings) rather than reporting a
    /// new happening (a kernel event): only those are looked for among the kept evidence.
    fn restates(&self) -> bool {
        matches!(
            self,
            Evidence::StuckTask { .. }
                | Evidence::StuckRuntimeProcess { .. }
                | Evidence::StuckStop { .. }
        )
    }

    /// Evidence that restates an earlier item (the same stuck task seen by the next scan)
    /// replaces it instead of piling up.
    fn same_subject(&self, other: &Evidence) -> bool {
        match (self, other) {
            (
                Evidence::StuckTask {
                    pid: a, tid: ta, ..
                },
                Evidence::StuckTask {
                    pid: b, tid: tb, ..
                },
            ) => a == b && ta == tb,
            (
                Evidence::StuckRuntimeProcess {
                    pid: a, kind: ka, ..
                },
                Evidence::StuckRuntimeProcess {
                    pid: b, kind: kb, ..
                },
            ) => a == b && ka == kb,
            (
                Evidence::StuckStop {
                    container_id: a, ..
                },
                Evidence::StuckStop {
                    container_id: b, ..
                },
            ) => a == b,
            (
                Evidence::CriCallBlocked { call: a, .. },
                Evidence::CriCallBlocked { call: b, .. },
            ) => a == b,
            (
                Evidence::UnresponsiveShim {
                    container_id: a, ..
                },
                Evidence::UnresponsiveShim {
                    container_id: b, ..
                },
            ) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub node: String,
    /// The runtime whose stall opened the incident.
    pub runtime: Runtime,
    /// The lowest layer seen stuck.
    pub layer: Layer,
    pub suspected_cause: String,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    #[serde(with = "humantime_serde", default)]
    pub ended_at: Option<SystemTime>,
    pub states: Vec<StateChange>,
    pub dumps: Vec<DumpEntry>,
    pub evidence: Vec<Evidence>,
    /// Containers whose stop is stuck: they keep the incident open. Not loaded from disk: after
    /// a restart hangwatch no longer sees those stops.
    #[serde(skip_deserializing)]
    pub stuck_stops: BTreeSet<String>,
}

/// Where an incident's hang is: a daemon, or (a stuck stop while the runtime answers) a
/// container. Ordered from the top: a lower layer seen stuck replaces a higher one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    Container,
    Dockerd,
    /// containerd's CRI plugin (or another CRI server) while containerd's own API answers.
    Cri,
    Containerd,
}

impl Layer {
    /// The daemon layer of `runtime`.
    pub fn of(runtime: Runtime) -> Layer {
        match runtime {
            Runtime::Docker => Layer::Dockerd,
            Runtime::Containerd => Layer::Containerd,
            Runtime::Cri => Layer::Cri,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Container => "container",
            Layer::Dockerd => "dockerd",
            Layer::Cri => "cri",
            Layer::Containerd => "containerd",
        }
    }
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.ended_at.is_none()
    }

    pub fn duration(&self, now: SystemTime) -> Duration {
        self.ended_at
            .unwrap_or(now)
            .duration_since(self.started_at)
            .unwrap_or_default()
    }

    /// One line for logs and `hangwatch check`.
    pub fn summary(&self, now: SystemTime) -> String {
        let status = if self.is_open() { "open" } else { "closed" };
        let what = if self.layer == Layer::Container {
            format!("{}: container stop stuck", self.runtime)
        } else {
            format!("{} stalled, layer {}", self.runtime, self.layer.as_str())
        };
        format!(
            "{} [{status}, {:.0}s] {what}: {}",
            self.id,
            self.duration(now).as_secs_f64(),
            self.suspected_cause
        )
    }

    fn push_evidence(&mut self, evidence: Evidence) {
        let restated = evidence.restates();
        if restated
            && let Some(existing) = self.evidence.iter_mut().find(|e| e.same_subject(&evidence))
        {
            *existing = evidence;
        } else if self.evidence.len() < MAX_EVIDENCE {
            self.evidence.push(evidence);
        }
    }

    fn refresh_cause(&mut self) {
        self.suspected_cause = suspected_cause(self);
    }
}

/// A runtime's state as the incident book needs it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub state: &'a str,
    pub reason: &'a str,
    /// Opens or continues an incident.
    pub stalled: bool,
    /// Answering again, or gone for good: closes the incident.
    pub recovered: bool,
    /// The lowest layer currently stalled.
    pub layer: Layer,
}

/// What changed, for the engine to log, count and persist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Opened(String),
    Closed(String),
    Updated(String),
}

#[derive(Debug)]
pub struct IncidentBook {
    node: String,
    open: BTreeMap<Runtime, Incident>,
    closed: VecDeque<Incident>,
    keep: usize,
    /// Recent evidence, attached to an incident opened within the look-back.
    recent: VecDeque<Evidence>,
}

impl IncidentBook {
    /// A book holding `loaded` incidents (from disk). Open ones stay open until the engine
    /// knows whether their runtime is still stalled.
    pub fn new(node: String, keep: usize, loaded: Vec<Incident>) -> IncidentBook {
        let mut book = IncidentBook {
            node,
            open: BTreeMap::new(),
            closed: VecDeque::new(),
            keep: keep.max(1),
            recent: VecDeque::new(),
        };
        let mut loaded = loaded;
        loaded.sort_by_key(|i| i.started_at);
        for incident in loaded {
            if incident.is_open() && !book.open.contains_key(&incident.runtime) {
                book.open.insert(incident.runtime, incident);
            } else {
                book.push_closed(incident);
            }
        }
        book
    }

    fn push_closed(&mut self, incident: Incident) {
        self.closed.push_back(incident);
        while self.closed.len() > self.keep {
            self.closed.pop_front();
        }
    }

    pub fn open_incident(&self, runtime: Runtime) -> Option<&Incident> {
        self.open.get(&runtime)
    }

    /// All incidents, newest first.
    pub fn all(&self) -> Vec<Incident> {
        let mut all: Vec<Incident> = self
            .open
            .values()
            .chain(self.closed.iter())
            .cloned()
            .collect();
        all.sort_by_key(|i| std::cmp::Reverse(i.started_at));
        all
    }

    pub fn get(&self, id: &str) -> Option<&Incident> {
        self.open
            .values()
            .chain(self.closed.iter())
            .find(|i| i.id == id)
    }

    /// Apply a runtime's current state: a stall opens (or continues) its incident; a
    /// recovery closes it.
    pub fn on_state(
        &mut self,
        runtime: Runtime,
        seen: &Observation<'_>,
        now: SystemTime,
    ) -> Vec<Change> {
        let Observation {
            state,
            reason,
            stalled,
            recovered,
            layer,
        } = *seen;
        let change = StateChange {
            at: now,
            runtime,
            state: state.to_string(),
            reason: reason.to_string(),
        };
        let mut changes = Vec::new();
        if let Some(incident) = self.open.get_mut(&runtime) {
            if incident
                .states
                .last()
                .is_none_or(|s| s.state != change.state)
                && incident.states.len() < MAX_STATES
            {
                incident.states.push(change);
                changes.push(Change::Updated(incident.id.clone()));
            }
            if stalled && layer > incident.layer {
                incident.layer = layer;
                incident.refresh_cause();
                changes.push(Change::Updated(incident.id.clone()));
            }
            if recovered && incident.stuck_stops.is_empty() {
                let mut incident = self.open.remove(&runtime).expect("present: just borrowed");
                incident.ended_at = Some(now);
                let id = incident.id.clone();
                self.push_closed(incident);
                changes.retain(|c| !matches!(c, Change::Updated(i) if *i == id));
                changes.push(Change::Closed(id));
            }
            return changes;
        }
        if !stalled {
            return changes;
        }
        let incident = self.open_incident_with(runtime, layer, change, now);
        changes.push(Change::Opened(incident));
        changes
    }

    /// Open an incident for `runtime` with the evidence of the look-back; returns its id.
    fn open_incident_with(
        &mut self,
        runtime: Runtime,
        layer: Layer,
        change: StateChange,
        now: SystemTime,
    ) -> String {
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let mut incident = Incident {
            id: format!("{}-{}-{millis}", self.node, runtime),
            node: self.node.clone(),
            runtime,
            layer,
            suspected_cause: String::new(),
            started_at: now,
            ended_at: None,
            states: vec![change],
            dumps: Vec::new(),
            evidence: Vec::new(),
            stuck_stops: BTreeSet::new(),
        };
        let since = now
            .checked_sub(EVIDENCE_LOOKBACK)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        for evidence in self.recent.iter().filter(|e| e.at() >= since) {
            incident.push_evidence(evidence.clone());
        }
        incident.refresh_cause();
        let id = incident.id.clone();
        self.open.insert(runtime, incident);
        id
    }

    /// A container stop became stuck: it joins `runtime`'s open incident, or opens one, and
    /// keeps it open until [`stop_ended`](Self::stop_ended).
    pub fn stop_stuck(
        &mut self,
        runtime: Runtime,
        container_id: &str,
        evidence: Evidence,
        now: SystemTime,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        if !self.open.contains_key(&runtime) {
            let name = match &evidence {
                Evidence::StuckStop {
                    container: Some(name),
                    ..
                } => name.clone(),
                _ => container_id.chars().take(12).collect(),
            };
            let change = StateChange {
                at: now,
                runtime,
                state: "stuck_stop".into(),
                reason: format!("the stop of container {name} is stuck"),
            };
            let id = self.open_incident_with(runtime, Layer::Container, change, now);
            changes.push(Change::Opened(id));
        }
        if let Some(incident) = self.open.get_mut(&runtime) {
            incident.stuck_stops.insert(container_id.to_string());
        }
        // An Updated for the incident just opened is harmless: changes are per incident id.
        changes.extend(self.add_evidence(evidence));
        changes
    }

    /// A stuck stop ended (the container exited or was removed): it no longer keeps an
    /// incident open; the incident closes once its runtime answers.
    pub fn stop_ended(&mut self, container_id: &str, evidence: Evidence) -> Vec<Change> {
        for incident in self.open.values_mut() {
            incident.stuck_stops.remove(container_id);
        }
        self.add_evidence(evidence)
    }

    /// Record evidence: kept for the look-back, attached to every open incident.
    pub fn add_evidence(&mut self, evidence: Evidence) -> Vec<Change> {
        let changes = self
            .open
            .values_mut()
            .map(|incident| {
                incident.push_evidence(evidence.clone());
                incident.refresh_cause();
                Change::Updated(incident.id.clone())
            })
            .collect();
        let existing = if evidence.restates() {
            self.recent.iter_mut().find(|e| e.same_subject(&evidence))
        } else {
            None
        };
        match existing {
            Some(existing) => *existing = evidence,
            None => {
                self.recent.push_back(evidence);
                while self.recent.len() > MAX_RECENT_EVIDENCE {
                    self.recent.pop_front();
                }
            }
        }
        changes
    }

    /// A dump was requested for `runtime`'s open incident.
    pub fn dump_requested(
        &mut self,
        runtime: Runtime,
        daemon: Runtime,
        status: DumpStatus,
        detail: Option<String>,
    ) -> Vec<Change> {
        let Some(incident) = self.open.get_mut(&runtime) else {
            return Vec::new();
        };
        incident.dumps.push(DumpEntry {
            daemon,
            status,
            detail,
            record: None,
            triage: None,
        });
        vec![Change::Updated(incident.id.clone())]
    }

    /// Progress of a dump of `daemon`: updates the newest incident waiting for one, open or
    /// already closed (a stopped daemon writes its dump only after it recovered).
    pub fn dump_progress(
        &mut self,
        daemon: Runtime,
        status: DumpStatus,
        outcome: Option<&DumpOutcome>,
        triage: Option<String>,
    ) -> Vec<Change> {
        let waiting = |i: &Incident| {
            i.dumps.iter().any(|d| {
                d.daemon == daemon
                    && matches!(d.status, DumpStatus::Signalled | DumpStatus::Pending)
            })
        };
        let incident = self
            .open
            .values_mut()
            .chain(self.closed.iter_mut())
            .filter(|i| waiting(i))
            .max_by_key(|i| i.started_at);
        let Some(incident) = incident else {
            return Vec::new();
        };
        if let Some(entry) = incident.dumps.iter_mut().rev().find(|d| {
            d.daemon == daemon && matches!(d.status, DumpStatus::Signalled | DumpStatus::Pending)
        }) {
            entry.status = status;
            match outcome {
                Some(DumpOutcome::Ok(record)) => entry.record = Some(record.clone()),
                Some(DumpOutcome::Failed { reason }) => entry.detail = Some(reason.clone()),
                Some(DumpOutcome::Timeout { waited_seconds }) => {
                    entry.detail = Some(format!("no dump after {waited_seconds:.0}s"))
                }
                None => {}
            }
            if triage.is_some() {
                entry.triage = triage;
            }
        }
        incident.refresh_cause();
        vec![Change::Updated(incident.id.clone())]
    }
}

/// A sentence naming the most likely cause, from the evidence in the window. The OOM-killed `runc:[2:INIT]`
/// chain (runc:[2:INIT] OOM-killed, then runc blocked on its exec.fifo, then containerd and
/// dockerd stuck) is spelled out when its parts are present.
pub fn suspected_cause(incident: &Incident) -> String {
    let mut parts: Vec<String> = Vec::new();
    parts.push(match (incident.runtime, incident.layer) {
        (_, Layer::Container) => "a container stop hangs while the runtime answers".into(),
        (Runtime::Docker, Layer::Containerd) => "containerd blocked, dockerd waiting on it".into(),
        (Runtime::Docker, _) => "dockerd blocked while containerd answers".into(),
        (Runtime::Containerd, _) => "containerd blocked".into(),
        (Runtime::Cri, Layer::Containerd) => {
            "containerd hung: its CRI calls and its own API are stuck".into()
        }
        (Runtime::Cri, _) => "CRI layer wedged while the runtime's own API answers".into(),
    });
    let started = incident.started_at;
    let ago = |at: SystemTime| -> String {
        match started.duration_since(at) {
            Ok(d) => format!("{:.0} s before", d.as_secs_f64()),
            Err(e) => format!("{:.0} s after the stall began", e.duration().as_secs_f64()),
        }
    };
    let mut chain = 0;
    if let Some(Evidence::OomKill { at, pid, memcg, .. }) =
        incident.evidence.iter().rev().find(
            |e| matches!(e, Evidence::OomKill { victim, .. } if *victim == OomVictim::RuncInit),
        )
    {
        chain += 1;
        let pid = pid.map(|p| format!(" pid {p}")).unwrap_or_default();
        let memcg = memcg
            .as_ref()
            .map(|m| format!(" in {m}"))
            .unwrap_or_default();
        parts.push(format!("runc:[2:INIT]{pid} OOM-killed{memcg} {}", ago(*at)));
    }
    for evidence in &incident.evidence {
        match evidence {
            Evidence::StuckRuntimeProcess {
                kind,
                pid,
                age_seconds,
                fifo,
                wchan,
                comm,
                ..
            } => {
                if *kind == RuntimeKind::Runc && fifo.is_some() {
                    chain += 1;
                }
                let on = fifo
                    .as_ref()
                    .map(|f| format!("blocked on {}", short_path(f)))
                    .or_else(|| wchan.as_ref().map(|w| format!("waiting in {w}")))
                    .unwrap_or_else(|| "stuck".into());
                parts.push(format!("{comm} pid {pid} {on} for {}", human(*age_seconds)));
            }
            Evidence::HungTask {
                comm,
                pid,
                scope,
                seconds,
                call_trace,
                ..
            } if *scope == Scope::Runtime => {
                let comm = comm.as_deref().unwrap_or("?");
                let pid = pid.map(|p| p.to_string()).unwrap_or_default();
                let secs = seconds
                    .map(|s| format!(" for more than {s} s"))
                    .unwrap_or_default();
                let within = waiting_frame(call_trace)
                    .map(|f| format!(" in {f}"))
                    .unwrap_or_default();
                parts.push(format!("kernel: task {comm}:{pid} blocked{secs}{within}"));
            }
            _ => {}
        }
    }
    let stuck: Vec<&Evidence> = incident
        .evidence
        .iter()
        .filter(|e| matches!(e, Evidence::StuckTask { .. }))
        .collect();
    if !stuck.is_empty() {
        let mut by_scope: BTreeMap<String, (usize, Option<String>, f64)> = BTreeMap::new();
        for e in &stuck {
            if let Evidence::StuckTask {
                scope,
                container,
                wchan,
                seconds,
                ..
            } = e
            {
                let key = container
                    .clone()
                    .map(|c| format!("container {c}"))
                    .unwrap_or_else(|| scope.as_str().to_string());
                let entry = by_scope.entry(key).or_insert((0, wchan.clone(), 0.0));
                entry.0 += 1;
                entry.2 = entry.2.max(*seconds);
            }
        }
        for (subject, (count, wchan, seconds)) in by_scope {
            let wchan = wchan.map(|w| format!(" in {w}")).unwrap_or_default();
            parts.push(format!(
                "{count} task(s) of {subject} in D state{wchan} up to {}",
                human(seconds)
            ));
        }
        parts.extend(wait_chains(&stuck));
    }
    parts.extend(incident.evidence.iter().filter_map(stuck_stop_cause));
    parts.extend(incident.evidence.iter().filter_map(cri_cause));
    for dump in &incident.dumps {
        if let Some(triage) = &dump.triage {
            parts.push(format!("{} dump: {triage}", dump.daemon.daemon_name()));
        }
    }
    let mut text = String::new();
    if chain >= 2 {
        text.push_str("runc exec.fifo hang (runc:[2:INIT] gone before the exec fifo opened): ");
    }
    text.push_str(&parts.join("; "));
    if parts.len() == 1 {
        let _ = write!(
            text,
            "; no kernel or /proc evidence yet, see the goroutine dumps"
        );
    }
    text
}

/// Chains stated in the cause, one per distinct chain: more would bury the first.
const CAUSE_CHAINS: usize = 3;

/// "dd (container web) blocked 70 s on block I/O to /dev/loop0, whose backing file is ...":
/// what the stuck tasks wait on, the longest-stuck first.
fn wait_chains(stuck: &[&Evidence]) -> Vec<String> {
    let mut chains: Vec<(f64, String, String)> = Vec::new();
    for evidence in stuck {
        let Evidence::StuckTask {
            comm,
            scope,
            container,
            seconds,
            waits_on: Some(waits_on),
            ..
        } = evidence
        else {
            continue;
        };
        let whose = container
            .as_ref()
            .map(|c| format!("container {c}"))
            .unwrap_or_else(|| scope.as_str().to_string());
        let sentence = format!("{comm} ({whose}) blocked {} on {waits_on}", human(*seconds));
        match chains.iter_mut().find(|(_, _, chain)| chain == waits_on) {
            Some(known) if known.0 >= *seconds => {}
            Some(known) => *known = (*seconds, sentence, waits_on.clone()),
            None => chains.push((*seconds, sentence, waits_on.clone())),
        }
    }
    chains.sort_by(|a, b| b.0.total_cmp(&a.0));
    chains
        .into_iter()
        .take(CAUSE_CHAINS)
        .map(|(_, sentence, _)| sentence)
        .collect()
}

/// The innermost frame of a call trace that is not the scheduler's own (`__schedule`,
/// `schedule_timeout`, ...), without its offsets: where the task waits.
fn waiting_frame(frames: &[String]) -> Option<&str> {
    frames
        .iter()
        .map(|f| f.split_once('+').map_or(f.as_str(), |(symbol, _)| symbol))
        .find(|symbol| !symbol.trim_start_matches('_').starts_with("schedule"))
}

/// "CRI ListContainers blocked 45 s behind container app of pod default/web" and "shim pid 812
/// of container app is stopped (T) in do_signal_stop".
fn cri_cause(evidence: &Evidence) -> Option<String> {
    match evidence {
        Evidence::CriCallBlocked {
            call,
            seconds,
            behind,
            ..
        } => {
            let behind = behind
                .as_ref()
                .map(|b| format!(" behind {b}"))
                .unwrap_or_default();
            Some(format!("CRI {call} blocked {}{behind}", human(*seconds)))
        }
        Evidence::UnresponsiveShim {
            container_id,
            container,
            shim_pid,
            shim_state,
            shim_wchan,
            ..
        } => {
            let of = container.clone().unwrap_or_else(|| container_id.clone());
            let Some(pid) = shim_pid else {
                return Some(format!("the shim of {of} does not answer (task UNKNOWN)"));
            };
            let state = match shim_state {
                Some('T') | Some('t') => "is stopped (T)".to_string(),
                Some('D') => "is in D".to_string(),
                Some(other) => format!("is in state {other}"),
                None => "is gone".to_string(),
            };
            let wchan = shim_wchan
                .as_ref()
                .map(|w| format!(" in {w}"))
                .unwrap_or_default();
            Some(format!("shim pid {pid} of {of} {state}{wchan}"))
        }
        _ => None,
    }
}

/// "stop of container web (image shop/web:3) stuck for 45 s, SIGKILL sent: held by 2 task(s)
/// in D (io_schedule)".
fn stuck_stop_cause(evidence: &Evidence) -> Option<String> {
    let Evidence::StuckStop {
        container_id,
        container,
        image,
        seconds,
        escalated,
        ended,
        held_by,
        ..
    } = evidence
    else {
        return None;
    };
    let name = container
        .clone()
        .unwrap_or_else(|| container_id.chars().take(12).collect());
    let image = image
        .as_ref()
        .map(|i| format!(" (image {i})"))
        .unwrap_or_default();
    let state = if *ended { "ended after" } else { "stuck for" };
    let mut text = format!(
        "stop of container {name}{image} {state} {}",
        human(*seconds)
    );
    if *escalated {
        text.push_str(", SIGKILL sent");
    }
    if let Some(held) = held_by.describe() {
        let _ = write!(text, ": held by {held}");
    }
    Some(text)
}

/// `.../<container id>/exec.fifo` as `<first 12 characters of the id>/exec.fifo`. The path
/// comes from another process's /proc: cut by characters, never by bytes.
fn short_path(path: &str) -> String {
    let parts: Vec<&str> = path.rsplitn(3, '/').collect();
    match parts.as_slice() {
        [file, id, _] if id.chars().count() > 12 => {
            let short: String = id.chars().take(12).collect();
            format!("{short}/{file}")
        }
        _ => path.to_string(),
    }
}

fn human(seconds: f64) -> String {
    if seconds >= 120.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{seconds:.0} s")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_waiting_frame_skips_the_scheduler() {
        let frames: Vec<String> = [
            "__schedule+0x3dc/0xf60",
            "schedule+0x23/0xa0",
            "schedule_preempt_disabled+0x11/0x20",
            "rwsem_down_read_slowpath+0x293/0x570",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(waiting_frame(&frames), Some("rwsem_down_read_slowpath"));
        assert_eq!(waiting_frame(&[]), None);
    }

    #[test]
    fn short_path_cuts_by_characters_not_bytes() {
        assert_eq!(
            short_path(
                "/run/containerd/io.containerd.runtime.v2.task/k8s.io/0123456789abcdef/exec.fifo"
            ),
            "0123456789ab/exec.fifo"
        );
        // Multi-byte names from another process's /proc must not panic the engine.
        assert_eq!(
            short_path("/run/x/ééééééééééééééé/exec.fifo"),
            "éééééééééééé/exec.fifo"
        );
        assert_eq!(short_path("exec.fifo"), "exec.fifo");
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    /// An observation for tests, in argument order.
    pub(crate) fn seen<'a>(
        state: &'a str,
        reason: &'a str,
        stalled: bool,
        recovered: bool,
        layer: Layer,
    ) -> Observation<'a> {
        Observation {
            state,
            reason,
            stalled,
            recovered,
            layer,
        }
    }

    fn book() -> IncidentBook {
        IncidentBook::new("node-a".into(), 10, Vec::new())
    }

    #[test]
    fn stall_opens_and_recovery_closes() {
        let mut b = book();
        assert!(
            b.on_state(
                Runtime::Docker,
                &seen("healthy", "", false, true, Layer::Dockerd),
                t(0)
            )
            .is_empty()
        );
        let changes = b.on_state(
            Runtime::Docker,
            &seen("hung", "ping stuck", true, false, Layer::Dockerd),
            t(10),
        );
        assert!(matches!(changes.as_slice(), [Change::Opened(_)]));
        let again = b.on_state(
            Runtime::Docker,
            &seen("hung", "ping stuck", true, false, Layer::Dockerd),
            t(11),
        );
        assert!(again.is_empty(), "same state adds nothing: {again:?}");
        let closed = b.on_state(
            Runtime::Docker,
            &seen("healthy", "", false, true, Layer::Dockerd),
            t(20),
        );
        assert!(matches!(closed.as_slice(), [Change::Closed(_)]));
        let all = b.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].duration(t(99)), Duration::from_secs(10));
        assert_eq!(all[0].states.len(), 2);
    }

    #[test]
    fn oom_killed_runc_init_chain_is_named() {
        let mut b = book();
        b.add_evidence(Evidence::OomKill {
            at: t(0),
            pid: Some(20357),
            comm: Some("runc:[2:INIT]".into()),
            victim: OomVictim::RuncInit,
            constraint: OomConstraint::Memcg,
            memcg: Some("/kubepods/burstable/podx/abc".into()),
            container: None,
        });
        b.on_state(
            Runtime::Docker,
            &seen("hung", "", true, false, Layer::Containerd),
            t(12),
        );
        b.add_evidence(Evidence::StuckRuntimeProcess {
            at: t(13),
            kind: RuntimeKind::Runc,
            pid: 4242,
            comm: "runc".into(),
            age_seconds: 300.0,
            wchan: Some("wait_for_partner".into()),
            fifo: Some("/run/containerd/runc/k8s.io/0123456789abcdef0123/exec.fifo".into()),
        });
        let incident = b.open_incident(Runtime::Docker).expect("open");
        let cause = &incident.suspected_cause;
        assert!(
            cause.starts_with(
                "runc exec.fifo hang (runc:[2:INIT] gone before the exec fifo opened)"
            ),
            "{cause}"
        );
        assert!(
            cause.contains("containerd blocked, dockerd waiting on it"),
            "{cause}"
        );
        assert!(
            cause.contains("runc:[2:INIT] pid 20357 OOM-killed"),
            "{cause}"
        );
        assert!(cause.contains("12 s before"), "{cause}");
        assert!(cause.contains("runc pid 4242 blocked on"), "{cause}");
        assert!(cause.contains("5 min"), "{cause}");
    }

    #[test]
    fn old_evidence_is_not_attached() {
        let mut b = book();
        b.add_evidence(Evidence::KernelEvent {
            at: t(0),
            rule: "soft_lockup".into(),
            message: "x".into(),
        });
        b.on_state(
            Runtime::Containerd,
            &seen("hung", "", true, false, Layer::Containerd),
            t(1000),
        );
        assert!(
            b.open_incident(Runtime::Containerd)
                .expect("open")
                .evidence
                .is_empty()
        );
    }

    #[test]
    fn dump_arriving_after_close_is_attached() {
        let mut b = book();
        b.on_state(
            Runtime::Docker,
            &seen("hung", "", true, false, Layer::Dockerd),
            t(0),
        );
        b.dump_requested(
            Runtime::Docker,
            Runtime::Docker,
            DumpStatus::Signalled,
            None,
        );
        b.dump_progress(Runtime::Docker, DumpStatus::Pending, None, None);
        b.on_state(
            Runtime::Docker,
            &seen("healthy", "", false, true, Layer::Dockerd),
            t(30),
        );
        let changes = b.dump_progress(
            Runtime::Docker,
            DumpStatus::Ok,
            None,
            Some("57 goroutines blocked calling containerd".into()),
        );
        assert_eq!(changes.len(), 1);
        let incident = &b.all()[0];
        assert!(!incident.is_open());
        assert_eq!(incident.dumps[0].status, DumpStatus::Ok);
        assert!(
            incident
                .suspected_cause
                .contains("dockerd dump: 57 goroutines"),
            "{}",
            incident.suspected_cause
        );
    }

    #[test]
    fn repeated_scans_replace_evidence_about_the_same_task() {
        let mut b = book();
        b.on_state(
            Runtime::Docker,
            &seen("hung", "", true, false, Layer::Dockerd),
            t(0),
        );
        for seconds in [30.0, 40.0, 50.0] {
            b.add_evidence(Evidence::StuckTask {
                at: t(1),
                pid: 7,
                tid: 8,
                comm: "app".into(),
                scope: Scope::Container,
                wchan: Some("kernel_clone".into()),
                seconds,
                container: Some("web".into()),
                wait: Some(WaitClass::BlockIo),
                waits_on: Some("block I/O to /dev/loop0, whose backing file is /m/data".into()),
            });
        }
        let incident = b.open_incident(Runtime::Docker).expect("open");
        assert_eq!(incident.evidence.len(), 1);
        assert!(
            incident
                .suspected_cause
                .contains("1 task(s) of container web in D state in kernel_clone up to 50 s"),
            "{}",
            incident.suspected_cause
        );
        assert!(
            incident.suspected_cause.contains(
                "app (container web) blocked 50 s on block I/O to /dev/loop0, whose backing file is /m/data"
            ),
            "{}",
            incident.suspected_cause
        );
    }

    #[test]
    fn loaded_open_incident_continues_and_round_trips_json() {
        let mut b = book();
        b.on_state(
            Runtime::Docker,
            &seen("wedged", "", true, false, Layer::Dockerd),
            t(0),
        );
        let json = serde_json::to_string(&b.all()[0]).expect("serialize");
        let loaded: Incident = serde_json::from_str(&json).expect("deserialize");
        let mut restarted = IncidentBook::new("node-a".into(), 10, vec![loaded]);
        assert!(restarted.open_incident(Runtime::Docker).is_some());
        let closed = restarted.on_state(
            Runtime::Docker,
            &seen("healthy", "", false, true, Layer::Dockerd),
            t(5),
        );
        assert!(matches!(closed.as_slice(), [Change::Closed(_)]));
    }

    fn stuck_stop(ended: bool, seconds: f64) -> Evidence {
        Evidence::StuckStop {
            at: t(40),
            container_id: "c0ffee".into(),
            container: Some("web".into()),
            image: Some("shop/web:3".into()),
            seconds,
            escalated: true,
            ended,
            held_by: HeldBy {
                stuck_tasks: Vec::new(),
                frozen_tasks: 2,
            },
        }
    }

    #[test]
    fn a_stuck_stop_opens_an_incident_that_stays_open_until_the_stop_ends() {
        let mut b = book();
        let healthy = seen("healthy", "", false, true, Layer::Dockerd);
        let changes = b.stop_stuck(Runtime::Docker, "c0ffee", stuck_stop(false, 40.0), t(40));
        assert!(
            matches!(changes.first(), Some(Change::Opened(_))),
            "{changes:?}"
        );
        let incident = b.open_incident(Runtime::Docker).expect("open");
        assert_eq!(incident.layer, Layer::Container);
        assert_eq!(
            incident.suspected_cause,
            "a container stop hangs while the runtime answers; stop of container web \
             (image shop/web:3) stuck for 40 s, SIGKILL sent: held by 2 frozen task(s)"
        );
        assert!(
            incident
                .summary(t(50))
                .contains("docker: container stop stuck")
        );
        let still = b.on_state(Runtime::Docker, &healthy, t(41));
        assert!(
            !still.iter().any(|c| matches!(c, Change::Closed(_))),
            "docker answering does not end a stuck stop: {still:?}"
        );
        b.stop_ended("c0ffee", stuck_stop(true, 70.0));
        let closed = b.on_state(Runtime::Docker, &healthy, t(71));
        assert!(
            matches!(closed.as_slice(), [Change::Closed(_)]),
            "{closed:?}"
        );
        let incident = &b.all()[0];
        assert!(
            incident
                .suspected_cause
                .contains("stop of container web (image shop/web:3) ended after 70 s"),
            "{}",
            incident.suspected_cause
        );
        assert_eq!(
            incident.evidence.len(),
            1,
            "the end replaces the stuck report"
        );
    }

    #[test]
    fn a_stuck_stop_joins_a_stall_incident() {
        let mut b = book();
        b.on_state(
            Runtime::Docker,
            &seen(
                "wedged",
                "list_containers stuck",
                true,
                false,
                Layer::Dockerd,
            ),
            t(0),
        );
        let changes = b.stop_stuck(Runtime::Docker, "c0ffee", stuck_stop(false, 40.0), t(40));
        assert!(
            changes.iter().all(|c| matches!(c, Change::Updated(_))),
            "joins, does not open: {changes:?}"
        );
        let incident = b.open_incident(Runtime::Docker).expect("open");
        assert_eq!(incident.layer, Layer::Dockerd);
        assert!(
            incident
                .suspected_cause
                .starts_with("dockerd blocked while containerd answers; stop of container web"),
            "{}",
            incident.suspected_cause
        );
        assert_eq!(b.all().len(), 1);
    }

    #[test]
    fn stuck_stops_are_not_loaded_back_from_disk() {
        let mut b = book();
        b.stop_stuck(Runtime::Docker, "c0ffee", stuck_stop(false, 40.0), t(40));
        let json = serde_json::to_string(&b.all()[0]).expect("serialize");
        assert!(json.contains("\"stuck_stops\":[\"c0ffee\"]"), "{json}");
        let loaded: Incident = serde_json::from_str(&json).expect("deserialize");
        let mut restarted = IncidentBook::new("node-a".into(), 10, vec![loaded]);
        let closed = restarted.on_state(
            Runtime::Docker,
            &seen("healthy", "", false, true, Layer::Dockerd),
            t(60),
        );
        assert!(
            matches!(closed.as_slice(), [Change::Closed(_)]),
            "a restarted hangwatch no longer sees the stop: {closed:?}"
        );
    }
}
