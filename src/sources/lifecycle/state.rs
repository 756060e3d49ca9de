//! The container-stop source's engine-side state: the stop book, metrics (a per-container
//! series only while a stop is stuck, at most `lifecycle.max_stuck_series`), what /proc shows
//! holding a stuck stop, evidence for incidents, whether the event streams can be trusted,
//! and containerd's exits and OOM kills.
//!
//! Stuck-ness is decided on the evaluation tick from event times, never from the arrival of
//! an event: a stop whose `die` does not come is stuck at its deadline however silent the
//! stream is. And silence is not "no stops": when the stream is down or dockerd is stalled
//! (its events are held back with it), `/stops` says the stream is not healthy. The same
//! holds for containerd's event service, which ends the stops /proc saw with their exit code.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::metrics::LifecycleMetrics;
use crate::config::LifecycleConfig;
use crate::containers::ContainerInfo;
use crate::domain::Runtime;
use crate::engine::incidents::Evidence;
use crate::metrics::{ContainerLabels, RuntimeLabels};
use crate::signal::Payload;
use crate::sources::lifecycle::detect::{
    ContainerEvent, EventStream, LifecycleSignal, TaskExit, TaskOom,
};
use crate::sources::lifecycle::exits::{ExitBook, ExitReason, ExitRecord};
use crate::sources::lifecycle::metrics::ExitLabels;
use crate::sources::lifecycle::stops::{
    Applied, Ending, HeldBy, HeldTask, SIGKILL, SeenBy, StopBook, StopInProgress, StopRecord,
    StopSettings,
};
use crate::sources::procscan::detect::KillPendingTask;
use crate::sources::procscan::state::ProcScanView;
use crate::sources::runtime::verdict::RuntimeState;
use crate::sources::{Action, Context, Now, Section, SourceState, json_of, payload_of};

/// Stops listed by `check`.
const CHECK_RECENT_STOPS: usize = 10;

/// Tasks named per stuck stop at most (the count of frozen ones is always complete).
const MAX_HELD_TASKS: usize = 16;

/// An event stream (Docker's or containerd's), as `/stops` and `check` show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    pub connected: bool,
    /// The stream is open and its daemon answers: silence means no container is stopping
    /// (Docker) or exiting (containerd). When false, stops may be going on that hangwatch does
    /// not see yet (stops it saw begin are still timed, and declared stuck at their deadline).
    pub healthy: bool,
    pub reason: String,
    /// Times it was opened again after breaking.
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// While down: when the next attempt is made.
    pub retry_in_seconds: Option<f64>,
    /// Events applied, and lines skipped as not usable.
    pub events: u64,
    pub malformed: u64,
    pub last_malformed: Option<String>,
}

/// What `/stops` serves.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StopsView {
    pub enabled: bool,
    /// Docker's event stream.
    pub events_stream: StreamStatus,
    /// containerd's event service (`/tasks/exit`, `/tasks/oom`).
    pub containerd_events_stream: StreamStatus,
    pub stop_timeout_seconds: f64,
    pub grace_seconds: f64,
    /// Oldest first.
    pub in_progress: Vec<StopInProgress>,
    /// Newest first. Shared: rebuilt only when a stop ends.
    pub recent: Arc<Vec<StopRecord>>,
    /// Containers' exits from containerd's events, the last `lifecycle.recent_exits`, newest
    /// first. Shared: rebuilt only when one is added or named.
    pub recent_exits: Arc<Vec<ExitRecord>>,
}

/// What incidents must hear about a stuck stop.
#[derive(Debug)]
pub enum StopIncident {
    Stuck {
        /// Whose incident it joins.
        runtime: Runtime,
        container_id: String,
        evidence: Evidence,
    },
    /// What holds it changed.
    Updated(Evidence),
    Ended {
        container_id: String,
        evidence: Evidence,
    },
}

#[derive(Debug)]
pub struct LifecycleState {
    enabled: bool,
    /// Docker is probed: its event stream is where stops are seen first.
    docker_enabled: bool,
    /// A kill seen pending in /proc this long is a stuck stop (`proc_scan.stuck_after`).
    kill_stuck_after: Duration,
    /// When the last scan followed for kills finished: each scan is followed once.
    kills_followed: Option<SystemTime>,
    book: StopBook,
    max_series: usize,
    /// Per-container series currently exported.
    series: BTreeSet<ContainerLabels>,
    stream: StreamStatus,
    /// containerd's event service is subscribed to (`lifecycle:containerd` runs).
    containerd_followed: bool,
    containerd_stream: StreamStatus,
    exits: ExitBook,
    recent_exits: Arc<Vec<ExitRecord>>,
    /// A listed exit's container is not named yet.
    unnamed_exits: bool,
    /// What incidents were last told holds each stuck stop.
    reported: BTreeMap<String, HeldBy>,
    recent: Arc<Vec<StopRecord>>,
    /// Something `/stops` shows changed since [`changed_view`](Self::changed_view).
    changed: bool,
}

impl LifecycleState {
    /// `docker_enabled`: whether Docker is probed at all (stops come from its events; without
    /// it only the kills /proc shows pending). `containerd_followed`: whether containerd's
    /// event service is subscribed to (exits). `kill_stuck_after`: how long a kill may stay
    /// pending on a container task before its stop is stuck.
    pub fn new(
        config: &LifecycleConfig,
        docker_enabled: bool,
        containerd_followed: bool,
        kill_stuck_after: Duration,
    ) -> LifecycleState {
        LifecycleState {
            enabled: config.enabled,
            docker_enabled,
            kill_stuck_after,
            kills_followed: None,
            book: StopBook::new(
                StopSettings {
                    stop_timeout: config.stop_timeout,
                    grace: config.stop_grace,
                },
                config.recent_stops,
            ),
            max_series: config.max_stuck_series,
            series: BTreeSet::new(),
            stream: StreamStatus {
                reason: "not opened yet".into(),
                ..StreamStatus::default()
            },
            containerd_followed,
            containerd_stream: StreamStatus {
                reason: if containerd_followed {
                    "not opened yet"
                } else {
                    "not followed (lifecycle or containerd disabled, or no namespace)"
                }
                .into(),
                ..StreamStatus::default()
            },
            exits: ExitBook::new(config.recent_exits),
            recent_exits: Arc::default(),
            unnamed_exits: false,
            reported: BTreeMap::new(),
            recent: Arc::default(),
            changed: true,
        }
    }

    fn stream_mut(&mut self, stream: EventStream) -> &mut StreamStatus {
        match stream {
            EventStream::Docker => &mut self.stream,
            EventStream::Containerd => &mut self.containerd_stream,
        }
    }

    pub fn stream_up(
        &mut self,
        stream: EventStream,
        reconnected: bool,
        metrics: &LifecycleMetrics,
    ) {
        self.changed = true;
        let labels = stream_labels(stream);
        metrics
            .lifecycle_events_stream_up
            .get_or_create(&labels)
            .set(1);
        let status = self.stream_mut(stream);
        if reconnected {
            metrics
                .lifecycle_events_stream_reconnects_total
                .get_or_create(&labels)
                .inc();
            status.reconnects += 1;
            tracing::info!(%stream, "event stream open again");
        }
        status.connected = true;
        status.retry_in_seconds = None;
    }

    pub fn stream_down(
        &mut self,
        stream: EventStream,
        error: String,
        retry_in: Duration,
        metrics: &LifecycleMetrics,
    ) {
        self.changed = true;
        metrics
            .lifecycle_events_stream_up
            .get_or_create(&stream_labels(stream))
            .set(0);
        let status = self.stream_mut(stream);
        if status.connected {
            tracing::warn!(%stream, %error, "event stream lost; reconnecting");
        }
        status.connected = false;
        status.last_error = Some(error);
        status.retry_in_seconds = Some(retry_in.as_secs_f64());
    }

    pub fn malformed(&mut self, stream: EventStream, reason: String, metrics: &LifecycleMetrics) {
        self.changed = true;
        metrics
            .lifecycle_events_malformed_total
            .get_or_create(&stream_labels(stream))
            .inc();
        let status = self.stream_mut(stream);
        status.malformed += 1;
        status.last_malformed = Some(reason);
    }

    /// `check` does not read the stream: say so rather than judge it.
    pub fn not_read(&mut self, stream: EventStream, reason: &str) {
        self.changed = true;
        if stream == EventStream::Containerd {
            self.containerd_followed = false;
        }
        let status = self.stream_mut(stream);
        status.connected = false;
        status.healthy = false;
        status.reason = reason.to_string();
    }

    /// Apply one event; a stuck stop that ended is returned for incidents.
    pub fn apply(
        &mut self,
        event: &ContainerEvent,
        metrics: &LifecycleMetrics,
    ) -> Option<StopIncident> {
        self.changed = true;
        metrics
            .lifecycle_events_total
            .get_or_create(&stream_labels(EventStream::Docker))
            .inc();
        self.stream.events += 1;
        match self.book.apply(event) {
            Applied::Ignored | Applied::Started | Applied::Signalled => None,
            Applied::Escalated => {
                metrics.container_stop_escalations_total.inc();
                tracing::info!(
                    container = %label(&event.container),
                    image = event.container.image.as_deref().unwrap_or("?"),
                    "container ignored its stop signal: SIGKILL sent"
                );
                None
            }
            Applied::Completed(record) => self.completed(*record, metrics),
        }
    }

    fn completed(
        &mut self,
        record: StopRecord,
        metrics: &LifecycleMetrics,
    ) -> Option<StopIncident> {
        self.changed = true;
        self.recent = Arc::new(self.book.recent().cloned().collect());
        if record.ended_by == Ending::Died {
            metrics
                .container_stop_duration_seconds
                .observe(record.duration_seconds);
        }
        let container = label(&record.container);
        tracing::debug!(
            %container,
            seconds = record.duration_seconds,
            escalated = record.escalated,
            "container stopped"
        );
        let id = record.container.id.clone();
        self.reported.remove(&id);
        if !record.was_stuck {
            return None;
        }
        tracing::warn!(
            %container,
            seconds = record.duration_seconds,
            ended_by = ?record.ended_by,
            "a stuck container stop ended"
        );
        let held_by = record.held_by.clone().unwrap_or_default();
        let evidence = Evidence::StuckStop {
            at: record.ended_at,
            container_id: id.clone(),
            container: record.container.name.clone(),
            image: record.container.image.clone(),
            seconds: record.duration_seconds,
            escalated: record.escalated,
            ended: true,
            held_by,
        };
        Some(StopIncident::Ended {
            container_id: id,
            evidence,
        })
    }

    /// containerd's exit of a container's main process: counted by reason (an OOM kill
    /// reported before it makes it `oom`), listed, and the end of the stop /proc saw for it.
    /// `container`: its names as known. Returns the end of a stuck stop for incidents, and
    /// whether the container still needs naming.
    pub fn exit(
        &mut self,
        exit: &TaskExit,
        container: Option<ContainerInfo>,
        metrics: &LifecycleMetrics,
    ) -> (Option<StopIncident>, bool) {
        self.changed = true;
        metrics
            .lifecycle_events_total
            .get_or_create(&stream_labels(EventStream::Containerd))
            .inc();
        self.containerd_stream.events += 1;
        let id = exit.container_id.as_str();
        let container = container
            .or_else(|| {
                self.book
                    .in_progress()
                    .into_iter()
                    .find(|s| s.container.id == id)
                    .map(|s| s.container.clone())
            })
            .unwrap_or_else(|| ContainerInfo {
                id: id.to_string(),
                ..ContainerInfo::default()
            });
        let unnamed = container.name.is_none();
        let Some(record) = self.exits.exited(exit, container) else {
            return (None, false);
        };
        metrics
            .container_exits_total
            .get_or_create(&ExitLabels {
                runtime: EventStream::Containerd.as_str(),
                reason: record.reason.as_str(),
            })
            .inc();
        metrics
            .container_oom_marks_pending
            .set(gauge(self.exits.oom_marks()));
        if record.reason == ExitReason::Oom {
            tracing::warn!(
                container = %label(&record.container),
                exit_status = record.exit_status,
                "container exited after an OOM kill"
            );
        }
        self.unnamed_exits |= unnamed;
        self.recent_exits = Arc::new(self.exits.recent().cloned().collect());
        let Ok(exit_code) = i32::try_from(exit.exit_status) else {
            return (None, unnamed);
        };
        let ended = self
            .book
            .exited(id, exit.exited_at, exit_code)
            .and_then(|record| self.completed(record, metrics));
        // A stop /proc saw that landed before the exit came has its exit code now.
        self.recent = Arc::new(self.book.recent().cloned().collect());
        (ended, unnamed)
    }

    /// containerd's OOM kill in a container: counted, and its next exit is an OOM exit.
    pub fn task_oom(&mut self, oom: &TaskOom, metrics: &LifecycleMetrics) {
        let labels = stream_labels(EventStream::Containerd);
        metrics.lifecycle_events_total.get_or_create(&labels).inc();
        metrics
            .container_oom_events_total
            .get_or_create(&labels)
            .inc();
        self.containerd_stream.events += 1;
        self.exits.oom(&oom.container_id);
        metrics
            .container_oom_marks_pending
            .set(gauge(self.exits.oom_marks()));
        self.changed = true;
        tracing::info!(container_id = %oom.container_id, namespace = %oom.namespace, "OOM kill in a container");
    }

    /// Name listed exits whose container the directory knows by now.
    pub fn name_exits(&mut self, known: impl Fn(&str) -> Option<ContainerInfo>) {
        if !self.unnamed_exits {
            return;
        }
        if self.exits.name_from(known) {
            self.recent_exits = Arc::new(self.exits.recent().cloned().collect());
            self.changed = true;
        }
        self.unnamed_exits = self.exits.recent().any(|r| r.container.name.is_none());
    }

    /// Age the stops at `now`, correlate stuck ones with the latest /proc scan, update the
    /// metrics and the streams' health. Returns what incidents must hear.
    pub fn evaluate(
        &mut self,
        now: SystemTime,
        metrics: &LifecycleMetrics,
        docker: Option<RuntimeState>,
        containerd: Option<RuntimeState>,
        scan: Option<&ProcScanView>,
    ) -> Vec<StopIncident> {
        self.judge_stream(docker);
        self.judge_containerd_stream(containerd);
        let mut told = Vec::new();
        if let Some(view) = scan {
            told.extend(self.follow_kills(view, metrics));
        }
        let newly_stuck = self.book.evaluate(now);
        // Stops in progress age with every tick.
        self.changed |= !self.book.in_progress().is_empty();
        let stuck_ids: Vec<String> = self
            .book
            .in_progress()
            .into_iter()
            .filter(|s| s.stuck)
            .map(|s| s.container.id.clone())
            .collect();
        for id in &stuck_ids {
            let Some(stop) = self.book.get_mut(id) else {
                continue;
            };
            let held_by = scan.map(|view| held_by(id, view)).unwrap_or_default();
            stop.held_by = Some(held_by.clone());
            let evidence = Evidence::StuckStop {
                at: now,
                container_id: id.clone(),
                container: stop.container.name.clone(),
                image: stop.container.image.clone(),
                seconds: stop.seconds,
                escalated: stop.escalated,
                ended: false,
                held_by: held_by.clone(),
            };
            if newly_stuck.contains(id) {
                tracing::warn!(
                    container = %label(&stop.container),
                    image = stop.container.image.as_deref().unwrap_or("?"),
                    seconds = stop.seconds,
                    escalated = stop.escalated,
                    stuck_tasks = held_by.stuck_tasks.len(),
                    frozen_tasks = held_by.frozen_tasks,
                    "container stop stuck: no exit by its deadline"
                );
                told.push(StopIncident::Stuck {
                    runtime: stop.runtime,
                    container_id: id.clone(),
                    evidence,
                });
            } else if self
                .reported
                .get(id)
                .is_none_or(|before| !same_holders(before, &held_by))
            {
                told.push(StopIncident::Updated(evidence));
            }
            self.reported.insert(id.clone(), held_by);
        }
        self.update_metrics(metrics);
        told
    }

    /// Stops /proc shows: a container task with SIGKILL pending begins one (unless Docker's
    /// events did), and it ends when none of the container's tasks has the kill pending any
    /// more. Returns the ends of stuck ones for incidents.
    fn follow_kills(
        &mut self,
        view: &ProcScanView,
        metrics: &LifecycleMetrics,
    ) -> Vec<StopIncident> {
        let report = &view.report;
        if self.kills_followed == Some(report.finished_at) {
            return Vec::new();
        }
        self.kills_followed = Some(report.finished_at);
        // Per container, its task with the kill pending longest.
        let mut pending: BTreeMap<&str, &KillPendingTask> = BTreeMap::new();
        for task in &report.kill_pending {
            let Some(id) = task.owner.container_id.as_deref() else {
                continue;
            };
            let longest = pending.entry(id).or_insert(task);
            if task.seconds_pending > longest.seconds_pending {
                *longest = task;
            }
        }
        for (id, task) in &pending {
            // A scan from before the container's last stop ended (its `die` came after the
            // scan) shows a kill that has landed since.
            if self
                .book
                .recent()
                .any(|r| r.container.id == *id && r.ended_at >= report.finished_at)
            {
                continue;
            }
            let since = report
                .finished_at
                .checked_sub(Duration::from_secs_f64(task.seconds_pending))
                .unwrap_or(report.finished_at);
            // The container's main process exited after the kill was sent: the task is what
            // is left of a container that is gone, not a new stop.
            if self
                .exits
                .exited_at(id)
                .is_some_and(|exited| exited >= since)
            {
                continue;
            }
            let container = view
                .containers
                .get(*id)
                .cloned()
                .unwrap_or_else(|| ContainerInfo {
                    id: (*id).to_string(),
                    ..ContainerInfo::default()
                });
            let runtime = if self.docker_enabled && task.owner.runtime == Some("docker") {
                Runtime::Docker
            } else {
                Runtime::Containerd
            };
            if self
                .book
                .kill_pending(&container, runtime, since, self.kill_stuck_after)
            {
                self.changed = true;
                tracing::info!(
                    container = %label(&container),
                    pid = task.pid,
                    tid = task.tid,
                    comm = %task.comm,
                    frozen = task.frozen,
                    "container task has SIGKILL pending: a stop seen in /proc"
                );
            }
        }
        // Only a scan that read every status it meant to can say a kill landed.
        let errors = &report.errors;
        if report.kill_pending_unread > 0 || errors.detail_timeouts > 0 || errors.detail_skipped > 0
        {
            return Vec::new();
        }
        let still: BTreeSet<&str> = pending.keys().copied().collect();
        self.book
            .kills_landed(&still, report.finished_at)
            .into_iter()
            .filter_map(|record| self.completed(record, metrics))
            .collect()
    }

    fn judge_stream(&mut self, docker: Option<RuntimeState>) {
        let judged = if self.docker_enabled {
            judge(&self.stream, docker, &DOCKER_STREAM)
        } else {
            (true, DOCKER_NOT_PROBED.into())
        };
        self.changed |= set_judgement(&mut self.stream, judged);
    }

    /// containerd's event service: trusted while subscribed and containerd answers. Left as
    /// it is when not followed, or in `check` (not read).
    fn judge_containerd_stream(&mut self, containerd: Option<RuntimeState>) {
        if !self.containerd_followed {
            return;
        }
        let judged = judge(&self.containerd_stream, containerd, &CONTAINERD_STREAM);
        self.changed |= set_judgement(&mut self.containerd_stream, judged);
    }

    fn update_metrics(&mut self, metrics: &LifecycleMetrics) {
        let in_progress = self.book.in_progress();
        let stuck: Vec<&StopInProgress> = in_progress.iter().copied().filter(|s| s.stuck).collect();
        metrics
            .container_stops_in_progress
            .set(gauge(in_progress.len()));
        metrics.stuck_container_stops.set(gauge(stuck.len()));
        let mut current = BTreeSet::new();
        // Oldest first: with more stuck stops than series allowed, the longest stuck are kept.
        for stop in stuck.iter().take(self.max_series) {
            let c = &stop.container;
            let labels = ContainerLabels {
                container_id: c.id.clone(),
                container_name: c.name.clone().unwrap_or_default(),
                pod: c.pod.clone().unwrap_or_default(),
                namespace: c.namespace.clone().unwrap_or_default(),
            };
            metrics
                .stuck_container_stop_seconds
                .get_or_create(&labels)
                .set(stop.seconds);
            current.insert(labels);
        }
        for gone in self.series.difference(&current) {
            metrics.stuck_container_stop_seconds.remove(gone);
        }
        self.series = current;
    }

    /// The view, when it changed since the last call.
    pub fn changed_view(&mut self) -> Option<StopsView> {
        std::mem::take(&mut self.changed).then(|| self.view())
    }

    pub fn view(&self) -> StopsView {
        let settings = self.book.settings();
        StopsView {
            enabled: self.enabled,
            events_stream: self.stream.clone(),
            containerd_events_stream: self.containerd_stream.clone(),
            stop_timeout_seconds: settings.stop_timeout.as_secs_f64(),
            grace_seconds: settings.grace.as_secs_f64(),
            in_progress: self.book.in_progress().into_iter().cloned().collect(),
            recent: self.recent.clone(),
            recent_exits: self.recent_exits.clone(),
        }
    }
}

fn stream_labels(stream: EventStream) -> RuntimeLabels {
    RuntimeLabels {
        runtime: stream.as_str(),
    }
}

/// How a stream's health is told: its runtime's name, what the runtime's absence means,
/// what is added to a down stream's error, and what a stalled runtime hides.
struct StreamWords {
    runtime: &'static str,
    absent: &'static str,
    down_note: &'static str,
    unseen: &'static str,
}

const DOCKER_STREAM: StreamWords = StreamWords {
    runtime: "docker",
    absent: "docker is not installed: stops are seen only as SIGKILL pending in /proc (and their exits in containerd's events)",
    down_note: "",
    unseen: "stops may be going on unseen",
};

const DOCKER_NOT_PROBED: &str = "docker is not probed: stops are seen only as SIGKILL pending in /proc (and their exits in containerd's events)";

const CONTAINERD_STREAM: StreamWords = StreamWords {
    runtime: "containerd",
    absent: "containerd is not installed: no container exits to see",
    down_note: "; exits meanwhile are lost (no replay)",
    unseen: "exits may go unseen",
};

/// Whether a stream can be trusted, and why: from its connection and its runtime's verdict
/// (a stalled runtime holds its events back).
fn judge(
    stream: &StreamStatus,
    runtime: Option<RuntimeState>,
    words: &StreamWords,
) -> (bool, String) {
    match runtime {
        Some(RuntimeState::Absent) => (true, words.absent.into()),
        _ if !stream.connected => (
            false,
            match &stream.last_error {
                Some(error) => format!("event stream down: {error}{}", words.down_note),
                None => "event stream not opened yet".into(),
            },
        ),
        Some(state) if state.is_stalled() => (
            false,
            format!(
                "{} is {}: its events are held back with it; {}",
                words.runtime,
                state.as_str(),
                words.unseen
            ),
        ),
        Some(state) if !state.is_up() => {
            (false, format!("{} is {}", words.runtime, state.as_str()))
        }
        _ => (true, format!("open; {} answers", words.runtime)),
    }
}

/// Set a stream's judgement; whether it changed.
fn set_judgement(stream: &mut StreamStatus, (healthy, reason): (bool, String)) -> bool {
    let changed = stream.healthy != healthy || stream.reason != reason;
    stream.healthy = healthy;
    stream.reason = reason;
    changed
}

/// The container-stop source's part of the engine.
pub struct LifecycleSlice {
    state: LifecycleState,
    metrics: LifecycleMetrics,
}

impl LifecycleSlice {
    pub fn new(state: LifecycleState, metrics: LifecycleMetrics) -> LifecycleSlice {
        LifecycleSlice { state, metrics }
    }

    fn tell_incidents(told: Vec<StopIncident>, cx: &mut Context) {
        for item in told {
            let changes = match item {
                StopIncident::Stuck {
                    runtime,
                    container_id,
                    evidence,
                } => cx
                    .incidents
                    .stop_stuck(runtime, &container_id, evidence, cx.now.wall),
                StopIncident::Updated(evidence) => cx.incidents.add_evidence(evidence),
                StopIncident::Ended {
                    container_id,
                    evidence,
                } => cx.incidents.stop_ended(&container_id, evidence),
            };
            cx.incident_changes(changes);
        }
    }
}

impl SourceState for LifecycleSlice {
    fn apply(&mut self, payload: Payload, cx: &mut Context) {
        let Some(signal) = payload_of::<LifecycleSignal>(payload, super::NAME) else {
            return;
        };
        match signal {
            LifecycleSignal::Event(event) => {
                cx.containers.saw([event.container.clone()], cx.now.mono);
                if let Some(ended) = self.state.apply(&event, &self.metrics) {
                    Self::tell_incidents(vec![ended], cx);
                }
            }
            LifecycleSignal::TaskExit(exit) => {
                let known = cx.containers.get(&exit.container_id).cloned();
                let (ended, unnamed) = self.state.exit(&exit, known, &self.metrics);
                if unnamed {
                    cx.actions
                        .push(Action::ResolveContainer(exit.container_id.clone()));
                }
                if let Some(ended) = ended {
                    Self::tell_incidents(vec![ended], cx);
                }
            }
            LifecycleSignal::TaskOom(oom) => self.state.task_oom(&oom, &self.metrics),
            LifecycleSignal::StreamUp {
                stream,
                reconnected,
            } => {
                self.state.stream_up(stream, reconnected, &self.metrics);
            }
            LifecycleSignal::StreamDown {
                stream,
                error,
                retry_in,
            } => {
                self.state
                    .stream_down(stream, error, retry_in, &self.metrics);
            }
            LifecycleSignal::Malformed { stream, reason } => {
                self.state.malformed(stream, reason, &self.metrics);
            }
            LifecycleSignal::NotRead { stream, reason } => self.state.not_read(stream, reason),
        }
    }

    /// Age the stops, correlate stuck ones with /proc, tell incidents.
    fn evaluate(&mut self, cx: &mut Context) {
        let docker = cx.board.state_of(Runtime::Docker);
        let containerd = cx.board.state_of(Runtime::Containerd);
        let scan = cx.board.proc_scan.clone();
        let told = self.state.evaluate(
            cx.now.wall,
            &self.metrics,
            docker,
            containerd,
            scan.as_deref(),
        );
        Self::tell_incidents(told, cx);
        let directory = &cx.containers;
        self.state.name_exits(|id| directory.get(id).cloned());
    }

    fn section(&mut self, _now: Now) -> Option<Arc<dyn Section>> {
        self.state
            .changed_view()
            .map(|view| Arc::new(StopsSection(Arc::new(view))) as Arc<dyn Section>)
    }
}

/// Container stops: at `/stops` and at the top of `check`'s JSON, not in `/status`.
#[derive(Debug, Clone, Default)]
pub struct StopsSection(pub Arc<StopsView>);

impl Section for StopsSection {
    fn key(&self) -> &'static str {
        "stops"
    }

    fn in_status(&self) -> bool {
        false
    }

    fn to_json(&self) -> serde_json::Value {
        json_of(self.0.as_ref())
    }

    fn endpoint(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("/stops", self.to_json()))
    }

    /// Stuck container stops.
    fn problems(&self, _now: SystemTime) -> Vec<String> {
        self.0
            .in_progress
            .iter()
            .filter(|s| s.stuck)
            .map(|s| {
                let name = s.container.name.as_deref().unwrap_or(&s.container.id);
                let image = s.container.image.as_deref().unwrap_or("?");
                let sigkill = match s.seen_by {
                    SeenBy::ProcKillPending => ", SIGKILL pending (seen in /proc)",
                    SeenBy::DockerEvents if s.signals.contains(&SIGKILL) => ", SIGKILL sent",
                    SeenBy::DockerEvents => "",
                };
                let held = s
                    .held_by
                    .as_ref()
                    .and_then(HeldBy::describe)
                    .map(|h| format!(": held by {h}"))
                    .unwrap_or_default();
                format!(
                    "stop of container {name} (image {image}) stuck for {:.0}s{sigkill}{held}",
                    s.seconds
                )
            })
            .collect()
    }

    /// Stops in progress and recent ones, and the images that ignored their stop signal.
    fn render_check(&self, out: &mut String, _now: SystemTime) {
        let stops = &self.0;
        if !stops.enabled {
            return;
        }
        let _ = writeln!(
            out,
            "\nContainer stops (last {} min)",
            super::CHECK_LOOKBACK.as_secs() / 60
        );
        let stream = &stops.events_stream;
        if !stream.healthy {
            let _ = writeln!(out, "  events not trustworthy: {}", stream.reason);
        }
        let exits = &stops.containerd_events_stream;
        if !exits.healthy {
            let _ = writeln!(out, "  containerd exits: {}", exits.reason);
        }
        for stop in &stops.in_progress {
            let name = stop.container.name.as_deref().unwrap_or(&stop.container.id);
            let state = if stop.stuck { "STUCK" } else { "stopping" };
            let signals = match stop.seen_by {
                SeenBy::DockerEvents => format!("signals {:?}", stop.signals),
                SeenBy::ProcKillPending => "SIGKILL pending (seen in /proc)".to_string(),
            };
            let held = stop
                .held_by
                .as_ref()
                .and_then(HeldBy::describe)
                .map(|h| format!(": held by {h}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {state:<9} {:>6.1}s  {name:<24} {}  {signals}{held}",
                stop.seconds,
                stop.container.image.as_deref().unwrap_or("?"),
            );
            if let Some(held) = &stop.held_by {
                for task in &held.stuck_tasks {
                    let _ = writeln!(
                        out,
                        "            pid {} tid {} {} {}{}",
                        task.pid,
                        task.tid,
                        task.comm,
                        if task.frozen { "frozen" } else { "in D" },
                        task.wchan
                            .as_deref()
                            .map(|w| format!(" ({w})"))
                            .unwrap_or_default(),
                    );
                }
            }
        }
        if stops.recent.is_empty() && stops.in_progress.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for stop in stops.recent.iter().take(CHECK_RECENT_STOPS) {
            let name = stop.container.name.as_deref().unwrap_or(&stop.container.id);
            let how = match (stop.ended_by, stop.exit_code) {
                (Ending::KillLanded, None) => {
                    "SIGKILL landed (seen in /proc; exit code unknown)".to_string()
                }
                (Ending::KillLanded | Ending::Exited, Some(code)) => {
                    format!("SIGKILL landed (seen in /proc), exited with {code}")
                }
                _ if stop.escalated => "SIGKILL (ignored its stop signal)".to_string(),
                _ => "exited on its stop signal".to_string(),
            };
            let _ = writeln!(
                out,
                "  stopped   {:>6.1}s  {name:<24} {}  {how}",
                stop.duration_seconds,
                stop.container.image.as_deref().unwrap_or("?")
            );
        }
        let mut ignoring: Vec<(&str, usize)> = Vec::new();
        for stop in stops.recent.iter().filter(|s| s.escalated) {
            let image = stop.container.image.as_deref().unwrap_or("?");
            match ignoring.iter_mut().find(|(i, _)| *i == image) {
                Some((_, n)) => *n += 1,
                None => ignoring.push((image, 1)),
            }
        }
        if !ignoring.is_empty() {
            let list: Vec<String> = ignoring
                .iter()
                .map(|(image, n)| format!("{image} ({n})"))
                .collect();
            let _ = writeln!(
                out,
                "  images whose containers ignored their stop signal: {}",
                list.join(", ")
            );
        }
    }
}

/// The container's stuck and frozen tasks in the scan, and those with SIGKILL pending (in D
/// or frozen) whether stuck yet or not.
fn held_by(id: &str, view: &ProcScanView) -> HeldBy {
    let report = &view.report;
    let ours = |owner: &crate::attribution::CgroupOwner| owner.container_id.as_deref() == Some(id);
    let killed: Vec<&KillPendingTask> = report
        .kill_pending
        .iter()
        .filter(|t| ours(&t.owner))
        .collect();
    let is_killed = |tid: i32| killed.iter().any(|k| k.tid == tid);
    let stuck = report
        .stuck_tasks
        .iter()
        .filter(|t| ours(&t.owner))
        .map(|t| HeldTask {
            pid: t.pid,
            tid: t.tid,
            comm: t.comm.clone(),
            wchan: t.wchan.clone(),
            seconds_in_d: t.seconds_in_d,
            sigkill_pending: is_killed(t.tid),
            frozen: false,
        });
    let only_killed = killed
        .iter()
        .filter(|k| !report.stuck_tasks.iter().any(|t| t.tid == k.tid))
        .map(|k| HeldTask {
            pid: k.pid,
            tid: k.tid,
            comm: k.comm.clone(),
            wchan: k.wchan.clone(),
            seconds_in_d: k.seconds_in_d,
            sigkill_pending: true,
            frozen: k.frozen,
        });
    HeldBy {
        stuck_tasks: stuck.chain(only_killed).take(MAX_HELD_TASKS).collect(),
        frozen_tasks: report
            .frozen
            .by_container
            .iter()
            .filter(|c| ours(&c.owner))
            .map(|c| c.tasks)
            .sum(),
    }
}

/// The same tasks in the same places: only their time in D grew.
fn same_holders(a: &HeldBy, b: &HeldBy) -> bool {
    let key = |t: &HeldTask| (t.pid, t.tid, t.wchan.clone(), t.sigkill_pending);
    a.frozen_tasks == b.frozen_tasks
        && a.stuck_tasks.len() == b.stuck_tasks.len()
        && a.stuck_tasks
            .iter()
            .map(key)
            .eq(b.stuck_tasks.iter().map(key))
}

/// The container's name, or its short id.
fn label(container: &ContainerInfo) -> String {
    container
        .name
        .clone()
        .unwrap_or_else(|| container.id.chars().take(12).collect())
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::CgroupOwner;
    use prometheus_client::registry::Registry;

    /// The source's families in a registry of their own, to read back.
    struct Metrics {
        registry: Registry,
        families: LifecycleMetrics,
    }

    impl Metrics {
        fn new(_node: Option<&str>) -> Metrics {
            let mut registry = Registry::default();
            let families = LifecycleMetrics::register(&mut registry);
            Metrics { registry, families }
        }

        fn encode(&self) -> String {
            crate::metrics::encode_registry(&self.registry)
        }
    }

    impl std::ops::Deref for Metrics {
        type Target = LifecycleMetrics;
        fn deref(&self) -> &LifecycleMetrics {
            &self.families
        }
    }
    use crate::sources::lifecycle::exits::tests::exit;
    use crate::sources::lifecycle::stops::tests::{die, kill, wall};
    use crate::sources::procscan::detect::{
        FrozenContainer, FrozenTasks, ScanErrors, ScanReport, Scope, ScopeCounts, StuckTask,
    };

    fn state(max_stuck_series: usize) -> LifecycleState {
        LifecycleState::new(
            &LifecycleConfig {
                enabled: true,
                stop_timeout: Duration::from_secs(10),
                stop_grace: Duration::from_secs(2),
                recent_stops: 10,
                recent_exits: 10,
                max_stuck_series,
            },
            true,
            true,
            Duration::from_secs(5),
        )
    }

    fn owner(id: &str) -> CgroupOwner {
        CgroupOwner {
            container_id: Some(id.into()),
            ..CgroupOwner::default()
        }
    }

    /// A scan in which container `id` has one task in D and two frozen ones.
    fn scan(id: &str, wchan: &str) -> ProcScanView {
        ProcScanView {
            report: ScanReport {
                finished_at: wall(0),
                duration_seconds: 0.01,
                walk_seconds: 0.01,
                tasks_scanned: 10,
                processes_scanned: 5,
                dstate: ScopeCounts::default(),
                dstate_not_stuck: 0,
                stuck_tasks: vec![StuckTask {
                    pid: 40,
                    tid: 41,
                    comm: "worker".into(),
                    state: 'D',
                    wchan: Some(wchan.into()),
                    kernel_stack: None,
                    seconds_in_d: 35.0,
                    scope: Scope::Container,
                    owner: owner(id),
                    wait: None,
                }],
                containers: Vec::new(),
                frozen: FrozenTasks {
                    tasks: 2,
                    by_container: vec![FrozenContainer {
                        owner: owner(id),
                        tasks: 2,
                    }],
                },
                runtime_processes: Vec::new(),
                kill_pending: Vec::new(),
                kill_pending_unread: 0,
                errors: ScanErrors::default(),
            },
            containers: BTreeMap::new(),
            stuck_after: Duration::from_secs(30),
        }
    }

    fn stuck_series(metrics: &Metrics) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("hangwatch_stuck_container_stop_seconds{"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn an_escalated_stop_is_counted_and_timed() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.apply(&kill("a", 0, 15), &metrics);
        s.apply(&kill("a", 1000, 9), &metrics);
        assert!(s.apply(&die("a", 1100), &metrics).is_none(), "never stuck");
        let text = metrics.encode();
        assert!(
            text.contains("hangwatch_container_stop_escalations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("hangwatch_container_stop_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("hangwatch_container_stop_duration_seconds_bucket{le=\"2.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hangwatch_lifecycle_events_total{runtime=\"docker\"} 3"),
            "{text}"
        );
        assert_eq!(s.view().recent.len(), 1);
    }

    #[test]
    fn a_stuck_stop_is_told_once_with_what_holds_it_and_its_end_clears_the_series() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        let seen = scan("a", "io_schedule");
        s.apply(&kill("a", 0, 15), &metrics);
        s.apply(&kill("a", 1_000, 9), &metrics);
        assert!(
            s.evaluate(wall(2_999), &metrics, None, None, Some(&seen))
                .is_empty()
        );
        let told = s.evaluate(wall(3_000), &metrics, None, None, Some(&seen));
        let [
            StopIncident::Stuck {
                container_id,
                evidence,
                ..
            },
        ] = told.as_slice()
        else {
            panic!("expected one stuck stop: {told:?}");
        };
        assert_eq!(container_id, "a");
        let Evidence::StuckStop {
            held_by,
            escalated,
            ended,
            ..
        } = evidence
        else {
            panic!("{evidence:?}");
        };
        assert!(*escalated && !*ended);
        assert_eq!(held_by.frozen_tasks, 2);
        assert_eq!(held_by.stuck_tasks[0].wchan.as_deref(), Some("io_schedule"));
        let series = stuck_series(&metrics);
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(
            series[0].contains("container_id=\"a\",container_name=\"a-name\""),
            "{series:?}"
        );
        assert!(
            metrics
                .encode()
                .contains("hangwatch_stuck_container_stops 1")
        );

        assert!(
            s.evaluate(wall(5_000), &metrics, None, None, Some(&seen))
                .is_empty(),
            "same holders: nothing new to tell"
        );
        let moved = scan("a", "nfs_wait");
        assert!(matches!(
            s.evaluate(wall(6_000), &metrics, None, None, Some(&moved))
                .as_slice(),
            [StopIncident::Updated(_)]
        ));

        let ended = s.apply(&die("a", 60_000), &metrics);
        let Some(StopIncident::Ended {
            evidence:
                Evidence::StuckStop {
                    ended: true,
                    seconds,
                    ..
                },
            ..
        }) = ended
        else {
            panic!("expected the end of a stuck stop: {ended:?}");
        };
        assert_eq!(seconds, 60.0);
        s.evaluate(wall(60_001), &metrics, None, None, None);
        assert!(stuck_series(&metrics).is_empty());
        assert!(
            metrics
                .encode()
                .contains("hangwatch_stuck_container_stops 0")
        );
        let view = s.view();
        assert!(view.in_progress.is_empty());
        assert!(view.recent[0].was_stuck);
        assert_eq!(
            view.recent[0].held_by.as_ref().map(|h| h.frozen_tasks),
            Some(2)
        );
    }

    #[test]
    fn a_change_of_trust_is_published_even_with_no_stop_going_on() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.stream_up(EventStream::Docker, false, &metrics);
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Healthy), None, None);
        assert!(s.changed_view().is_some_and(|v| v.events_stream.healthy));
        s.evaluate(wall(1), &metrics, Some(RuntimeState::Healthy), None, None);
        assert!(s.changed_view().is_none(), "nothing changed");
        s.evaluate(wall(2), &metrics, Some(RuntimeState::Wedged), None, None);
        let view = s.changed_view().expect("docker wedged: republished");
        assert!(!view.events_stream.healthy);
        s.apply(&kill("a", 0, 15), &metrics);
        assert!(s.changed_view().is_some());
        s.evaluate(wall(3), &metrics, Some(RuntimeState::Wedged), None, None);
        assert!(
            s.changed_view()
                .is_some_and(|v| v.in_progress[0].seconds == 0.003),
            "a stop in progress ages"
        );
    }

    #[test]
    fn malformed_lines_are_counted_with_the_last_reason() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.malformed(
            EventStream::Docker,
            "unexpected action \"teleport\"".into(),
            &metrics,
        );
        let stream = s.view().events_stream;
        assert_eq!(stream.malformed, 1);
        assert_eq!(
            stream.last_malformed.as_deref(),
            Some("unexpected action \"teleport\"")
        );
        assert!(
            metrics
                .encode()
                .contains("hangwatch_lifecycle_events_malformed_total{runtime=\"docker\"} 1")
        );
    }

    #[test]
    fn per_container_series_are_bounded_oldest_kept() {
        let metrics = Metrics::new(None);
        let mut s = state(2);
        for (n, id) in ["a", "b", "c"].iter().enumerate() {
            s.apply(&kill(id, n as i64 * 100, 9), &metrics);
        }
        s.evaluate(wall(10_000), &metrics, None, None, None);
        let series = stuck_series(&metrics);
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(
            series.iter().all(|l| !l.contains("container_id=\"c\"")),
            "{series:?}"
        );
        assert!(
            metrics
                .encode()
                .contains("hangwatch_stuck_container_stops 3")
        );
    }

    #[test]
    fn silence_is_only_trusted_while_the_stream_is_open_and_docker_answers() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Healthy), None, None);
        assert!(!s.view().events_stream.healthy, "never opened");
        s.stream_up(EventStream::Docker, false, &metrics);
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Healthy), None, None);
        assert!(s.view().events_stream.healthy);
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Hung), None, None);
        let stream = s.view().events_stream;
        assert!(!stream.healthy);
        assert!(
            stream.reason.contains("docker is hung"),
            "{}",
            stream.reason
        );
        s.stream_down(
            EventStream::Docker,
            "the daemon closed the event stream".into(),
            Duration::from_secs(1),
            &metrics,
        );
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Healthy), None, None);
        let stream = s.view().events_stream;
        assert!(
            stream.reason.contains("closed the event stream"),
            "{}",
            stream.reason
        );
        s.evaluate(wall(0), &metrics, Some(RuntimeState::Absent), None, None);
        assert!(
            s.view().events_stream.healthy,
            "no Docker, no stops: silence is the truth"
        );
        s.stream_up(EventStream::Docker, true, &metrics);
        assert_eq!(s.view().events_stream.reconnects, 1);
        assert!(
            metrics.encode().contains(
                "hangwatch_lifecycle_events_stream_reconnects_total{runtime=\"docker\"} 1"
            )
        );
    }

    /// A scan at `at_ms` in which container `id` (named by CRI, no Docker) has one frozen task
    /// with SIGKILL pending for `pending_s` seconds; `None`: no kill pending any more.
    fn kill_scan(id: &str, at_ms: i64, pending_s: Option<f64>) -> ProcScanView {
        let mut view = scan(id, "io_schedule");
        view.report.stuck_tasks.clear();
        view.report.finished_at = wall(at_ms);
        view.report.kill_pending = pending_s
            .map(|seconds_pending| KillPendingTask {
                pid: 70,
                tid: 71,
                comm: "sleep".into(),
                frozen: true,
                wchan: Some("__refrigerator".into()),
                seconds_pending,
                seconds_in_d: seconds_pending + 3.0,
                owner: CgroupOwner {
                    runtime: Some("containerd"),
                    ..owner(id)
                },
            })
            .into_iter()
            .collect();
        view.containers.insert(
            id.into(),
            ContainerInfo {
                id: id.into(),
                name: Some("app".into()),
                pod: Some("web-0".into()),
                namespace: Some("shop".into()),
                ..ContainerInfo::default()
            },
        );
        view
    }

    #[test]
    fn a_kill_pending_in_proc_is_a_stop_stuck_past_the_threshold_without_docker() {
        let metrics = Metrics::new(None);
        let mut s = LifecycleState::new(
            &LifecycleConfig {
                enabled: true,
                stop_timeout: Duration::from_secs(10),
                stop_grace: Duration::from_secs(30),
                recent_stops: 10,
                recent_exits: 10,
                max_stuck_series: 10,
            },
            false,
            true,
            Duration::from_secs(5),
        );
        let first = kill_scan("c1", 1_000, Some(0.0));
        assert!(
            s.evaluate(wall(1_000), &metrics, None, None, Some(&first))
                .is_empty()
        );
        let view = s.view();
        assert!(view.enabled && view.events_stream.healthy, "{view:?}");
        let [stop] = view.in_progress.as_slice() else {
            panic!("one stop in progress: {view:?}");
        };
        assert_eq!(stop.seen_by, SeenBy::ProcKillPending);
        assert!(!stop.stuck);
        let later = kill_scan("c1", 5_500, Some(4.5));
        assert!(
            s.evaluate(wall(5_999), &metrics, None, None, Some(&later))
                .is_empty()
        );
        let told = s.evaluate(wall(6_000), &metrics, None, None, Some(&later));
        let [
            StopIncident::Stuck {
                runtime: Runtime::Containerd,
                evidence:
                    Evidence::StuckStop {
                        held_by, container, ..
                    },
                ..
            },
        ] = told.as_slice()
        else {
            panic!("expected a stuck stop for containerd's incident: {told:?}");
        };
        assert_eq!(container.as_deref(), Some("app"));
        let [task] = held_by.stuck_tasks.as_slice() else {
            panic!("{held_by:?}");
        };
        assert!(task.sigkill_pending && task.frozen && task.tid == 71);
        assert_eq!(
            held_by.describe().as_deref(),
            Some("2 frozen task(s), SIGKILL pending on 1 (cannot be killed)")
        );
        let series = stuck_series(&metrics);
        assert!(
            series.len() == 1 && series[0].contains("pod=\"web-0\""),
            "{series:?}"
        );
        let problems = StopsSection(Arc::new(s.view())).problems(wall(6_000));
        assert!(
            problems[0].starts_with("stop of container app (image ?) stuck for 5s, SIGKILL pending (seen in /proc): held by"),
            "{problems:?}"
        );

        let mut unread = kill_scan("c1", 7_000, None);
        unread.report.kill_pending_unread = 1;
        assert!(
            !s.evaluate(wall(7_000), &metrics, None, None, Some(&unread))
                .iter()
                .any(|t| matches!(t, StopIncident::Ended { .. })),
            "a scan that did not read every status cannot say the kill landed"
        );
        assert_eq!(s.view().in_progress.len(), 1);
        s.changed_view();
        let landed = kill_scan("c1", 8_000, None);
        let told = s.evaluate(wall(8_000), &metrics, None, None, Some(&landed));
        assert!(
            matches!(told.as_slice(), [StopIncident::Ended { container_id, .. }] if container_id == "c1"),
            "{told:?}"
        );
        assert!(stuck_series(&metrics).is_empty());
        let view = s.changed_view().expect("the end is published");
        assert!(view.in_progress.is_empty());
        assert_eq!(view.recent[0].ended_by, Ending::KillLanded);
        assert!(view.recent[0].was_stuck);
        assert_eq!(view.recent[0].exit_code, None);
    }

    #[test]
    fn a_kill_docker_reported_is_not_counted_twice_and_ends_only_at_its_die() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.apply(&kill("c1", 0, 9), &metrics);
        let seen = kill_scan("c1", 1_000, Some(0.5));
        s.evaluate(
            wall(1_000),
            &metrics,
            Some(RuntimeState::Healthy),
            None,
            Some(&seen),
        );
        let view = s.view();
        assert_eq!(view.in_progress.len(), 1);
        assert_eq!(view.in_progress[0].seen_by, SeenBy::DockerEvents);
        let gone = kill_scan("c1", 1_500, None);
        s.evaluate(
            wall(1_500),
            &metrics,
            Some(RuntimeState::Healthy),
            None,
            Some(&gone),
        );
        assert_eq!(
            s.view().in_progress.len(),
            1,
            "Docker's stop ends at its die"
        );
        let told = s.evaluate(
            wall(2_500),
            &metrics,
            Some(RuntimeState::Healthy),
            None,
            Some(&seen),
        );
        let [
            StopIncident::Stuck {
                runtime,
                evidence: Evidence::StuckStop { held_by, .. },
                ..
            },
        ] = told.as_slice()
        else {
            panic!("{told:?}");
        };
        assert_eq!(*runtime, Runtime::Docker);
        assert!(held_by.stuck_tasks.iter().any(|t| t.sigkill_pending));

        s.apply(&die("c1", 3_000), &metrics);
        let stale = kill_scan("c1", 2_900, Some(2.0));
        s.evaluate(
            wall(3_100),
            &metrics,
            Some(RuntimeState::Healthy),
            None,
            Some(&stale),
        );
        assert!(
            s.view().in_progress.is_empty(),
            "a scan taken before the die shows a kill that has landed since"
        );
        assert_eq!(s.view().recent.len(), 1);
    }

    fn exits_counted(metrics: &Metrics, reason: &str) -> String {
        let line = format!(
            "hangwatch_container_exits_total{{runtime=\"containerd\",reason=\"{reason}\"}}"
        );
        metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_default()
            .to_string()
    }

    fn without_docker() -> LifecycleState {
        LifecycleState::new(
            &LifecycleConfig {
                enabled: true,
                stop_timeout: Duration::from_secs(10),
                stop_grace: Duration::from_secs(30),
                recent_stops: 10,
                recent_exits: 10,
                max_stuck_series: 10,
            },
            false,
            true,
            Duration::from_secs(5),
        )
    }

    #[test]
    fn containerds_exit_ends_a_stuck_stop_seen_in_proc_with_its_exit_code_and_counts_it() {
        let metrics = Metrics::new(None);
        metrics.follow(EventStream::Containerd);
        let mut s = without_docker();
        s.evaluate(
            wall(1_000),
            &metrics,
            None,
            None,
            Some(&kill_scan("c1", 1_000, Some(0.0))),
        );
        let stuck = kill_scan("c1", 7_000, Some(6.0));
        assert!(matches!(
            s.evaluate(wall(7_000), &metrics, None, None, Some(&stuck))
                .as_slice(),
            [StopIncident::Stuck { .. }]
        ));
        let (ended, unnamed) = s.exit(&exit("c1", 70, 137, 8_000), None, &metrics);
        assert!(
            matches!(ended, Some(StopIncident::Ended { ref container_id, .. }) if container_id == "c1"),
            "{ended:?}"
        );
        assert!(!unnamed, "named from the stop's container");
        let view = s.view();
        assert!(view.in_progress.is_empty());
        assert_eq!(view.recent[0].ended_by, Ending::Exited);
        assert_eq!(view.recent[0].exit_code, Some(137));
        let [exit] = view.recent_exits.as_slice() else {
            panic!("{view:?}");
        };
        assert_eq!(exit.reason, ExitReason::SignalKill);
        assert_eq!(exit.container.pod.as_deref(), Some("web-0"));
        assert!(exits_counted(&metrics, "signal_kill").ends_with(" 1"));
        assert!(
            exits_counted(&metrics, "ok").ends_with(" 0"),
            "series exist at zero"
        );

        // A scan finished before the exit still shows the kill: no new stop.
        let stale = kill_scan("c1", 7_900, Some(6.9));
        s.evaluate(wall(8_100), &metrics, None, None, Some(&stale));
        // A task of the gone container still in D after the exit, its kill sent before it.
        let lingering = kill_scan("c1", 9_000, Some(8.0));
        s.evaluate(wall(9_000), &metrics, None, None, Some(&lingering));
        assert!(
            s.view().in_progress.is_empty(),
            "{:?}",
            s.view().in_progress
        );
        assert_eq!(s.view().recent.len(), 1);
    }

    #[test]
    fn an_oom_kill_marks_the_exit_that_follows_and_unknown_containers_are_named_later() {
        let metrics = Metrics::new(None);
        let mut s = without_docker();
        s.task_oom(
            &TaskOom {
                namespace: "k8s.io".into(),
                container_id: "hog".into(),
                at: wall(0),
            },
            &metrics,
        );
        let (ended, unnamed) = s.exit(&exit("hog", 5, 137, 10), None, &metrics);
        assert!(ended.is_none() && unnamed, "no stop; names to be looked up");
        assert!(exits_counted(&metrics, "oom").ends_with(" 1"));
        assert!(
            metrics
                .encode()
                .contains("hangwatch_container_oom_events_total{runtime=\"containerd\"} 1")
        );
        assert!(
            metrics
                .encode()
                .contains("hangwatch_lifecycle_events_total{runtime=\"containerd\"} 2")
        );
        let view = s.changed_view().expect("published");
        assert!(view.recent_exits[0].oom);
        assert_eq!(view.recent_exits[0].container.name, None);
        s.name_exits(|id| {
            Some(ContainerInfo {
                id: id.into(),
                name: Some("hog".into()),
                pod: Some("mem-0".into()),
                namespace: Some("shop".into()),
                ..ContainerInfo::default()
            })
        });
        let view = s.changed_view().expect("the name is published");
        assert_eq!(view.recent_exits[0].container.pod.as_deref(), Some("mem-0"));
        // The same exit again (containerd repeats it when it cleans up a shim): once.
        s.exit(&exit("hog", 5, 137, 10), None, &metrics);
        assert_eq!(s.view().recent_exits.len(), 1);
        assert!(exits_counted(&metrics, "oom").ends_with(" 1"));
    }

    #[test]
    fn on_docker_nodes_the_moby_exit_neither_ends_nor_repeats_dockers_stop() {
        let metrics = Metrics::new(None);
        let mut s = state(10);
        s.apply(&kill("d1", 0, 15), &metrics);
        let mut moby = exit("d1", 9, 143, 50);
        moby.namespace = "moby".into();
        let (ended, _) = s.exit(&moby, None, &metrics);
        assert!(ended.is_none());
        assert_eq!(s.view().in_progress.len(), 1, "Docker's die ends it");
        s.apply(&die("d1", 60), &metrics);
        let view = s.view();
        assert_eq!(view.recent.len(), 1, "one stop");
        assert_eq!(view.recent[0].ended_by, Ending::Died);
        assert_eq!(view.recent_exits.len(), 1, "one exit");
        assert!(exits_counted(&metrics, "signal_term").ends_with(" 1"));
    }

    #[test]
    fn the_containerd_stream_is_trusted_while_open_and_containerd_answers() {
        let metrics = Metrics::new(None);
        let mut s = without_docker();
        s.evaluate(wall(0), &metrics, None, Some(RuntimeState::Healthy), None);
        let stream = s.view().containerd_events_stream;
        assert!(!stream.healthy && stream.reason == "event stream not opened yet");
        s.stream_up(EventStream::Containerd, false, &metrics);
        s.evaluate(wall(1), &metrics, None, Some(RuntimeState::Healthy), None);
        let view = s.view();
        assert!(view.containerd_events_stream.healthy);
        assert!(
            !view.events_stream.connected,
            "Docker's stream is another one"
        );
        s.evaluate(wall(2), &metrics, None, Some(RuntimeState::Hung), None);
        assert!(
            s.view()
                .containerd_events_stream
                .reason
                .contains("containerd is hung")
        );
        s.stream_down(
            EventStream::Containerd,
            "refused".into(),
            Duration::from_secs(1),
            &metrics,
        );
        s.evaluate(wall(3), &metrics, None, Some(RuntimeState::Down), None);
        let stream = s.view().containerd_events_stream;
        assert!(
            !stream.healthy && stream.reason.contains("no replay"),
            "{}",
            stream.reason
        );
        s.malformed(EventStream::Containerd, "garbage".into(), &metrics);
        let text = metrics.encode();
        assert!(
            text.contains("hangwatch_lifecycle_events_malformed_total{runtime=\"containerd\"} 1"),
            "{text}"
        );
        assert!(text.contains("hangwatch_lifecycle_events_stream_up{runtime=\"containerd\"} 0"));
        s.not_read(EventStream::Containerd, "not read by check");
        s.evaluate(wall(4), &metrics, None, Some(RuntimeState::Healthy), None);
        assert_eq!(
            s.view().containerd_events_stream.reason,
            "not read by check",
            "kept, not judged"
        );
    }
}
