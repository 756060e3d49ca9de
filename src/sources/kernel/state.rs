//! The kernel source's engine-side state: a bounded ring of recent events (served at
//! `/events`), the conditions holding, whether the log can be read, and the metrics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::metrics::{KernelMetrics, OomLabels, SourceLabels};
use crate::config::{Config, Severity};
use crate::containers::ContainerDirectory;
use crate::engine::incidents::Evidence;
use crate::metrics::{RuleLabels, ScopeLabels};
use crate::signal::Payload;
use crate::sources::kernel::detect::{
    self as detect, HungTaskScope, KernelConditions, KernelEvent, KernelLogCounters, KernelSignal,
    LogSource, OomConstraint, OomVictim,
};
use crate::sources::{Action, Context, Now, Publish, Section, SourceState, json_of, payload_of};

/// Kernel events, newest first, shown by `check`.
const CHECK_RECENT_EVENTS: usize = 10;
/// Innermost frames of a hung task's call trace shown by `check`.
const CHECK_TRACE_FRAMES: usize = 8;
/// An OOM storm must not become a log storm: so many events are logged one by one per
/// window, the rest summed up in one line when the window ends.
const LOGGED_EVENTS_PER_WINDOW: u32 = 5;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Per-event log lines, at most [`LOGGED_EVENTS_PER_WINDOW`] per [`LOG_WINDOW`].
#[derive(Debug, Default)]
struct EventLog {
    window_start: Option<Instant>,
    logged: u32,
    /// Events not logged one by one in this window, by rule.
    unlogged: BTreeMap<String, u64>,
}

impl EventLog {
    /// Whether to log this event on a line of its own.
    fn allow(&mut self, rule: &str, now: Instant) -> bool {
        self.roll(now);
        self.window_start.get_or_insert(now);
        if self.logged < LOGGED_EVENTS_PER_WINDOW {
            self.logged += 1;
            return true;
        }
        match self.unlogged.get_mut(rule) {
            Some(count) => *count += 1,
            None => {
                self.unlogged.insert(rule.to_string(), 1);
            }
        }
        false
    }

    /// At the end of a window: one line for what was not logged in it.
    fn roll(&mut self, now: Instant) {
        let Some(start) = self.window_start else {
            return;
        };
        if now.saturating_duration_since(start) < LOG_WINDOW {
            return;
        }
        if !self.unlogged.is_empty() {
            let total: u64 = self.unlogged.values().sum();
            let by_rule: Vec<String> = self
                .unlogged
                .iter()
                .map(|(rule, n)| format!("{rule}: {n}"))
                .collect();
            tracing::info!(
                events = total,
                by_rule = %by_rule.join(", "),
                "more kernel events than are logged one by one; all are counted and at /events"
            );
        }
        *self = EventLog::default();
    }
}

/// A kernel event with the wall-clock time it was logged.
#[derive(Debug, Clone, Serialize)]
pub struct RecentKernelEvent {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    #[serde(flatten)]
    pub event: KernelEvent,
}

/// A condition rule that currently holds (e.g. a filesystem remounted read-only).
#[derive(Debug, Clone, Serialize)]
pub struct ConditionStatus {
    pub rule: String,
    pub since_seconds: f64,
    pub matches: u64,
    pub message: String,
}

/// What `/status`, `/events` and `check` show about the kernel log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelStatus {
    /// None until the detector first reported.
    pub up: Option<bool>,
    /// The interface being read while up.
    pub source: Option<LogSource>,
    pub error: Option<String>,
    pub records_read: u64,
    pub records_lost: u64,
    pub records_ignored: u64,
    pub records_malformed: u64,
    pub conditions: Vec<ConditionStatus>,
    /// Newest first; served at `/events`, not in `/status`. Shared with the ring, so that
    /// publishing during a flood copies pointers, not events.
    #[serde(skip)]
    pub events: Vec<Arc<RecentKernelEvent>>,
}

#[derive(Debug)]
pub struct KernelState {
    recent: VecDeque<Arc<RecentKernelEvent>>,
    capacity: usize,
    conditions: KernelConditions,
    pub status: KernelStatus,
}

impl KernelState {
    pub fn new(capacity: usize) -> KernelState {
        KernelState {
            recent: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
            conditions: KernelConditions::default(),
            status: KernelStatus::default(),
        }
    }

    /// Keep `event` (logged at `at`) in the ring and note it if it is a condition.
    pub fn record(&mut self, event: KernelEvent, at: SystemTime, now: Instant) {
        self.conditions.observe(&event, now);
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent
            .push_back(Arc::new(RecentKernelEvent { at, event }));
    }

    /// Fill container names, pods and namespaces the directory has learnt since. Returns
    /// whether anything changed.
    pub fn enrich(&mut self, directory: &ContainerDirectory) -> bool {
        let mut changed = false;
        for recent in self.recent.iter_mut() {
            if names_known(&recent.event, directory) {
                // Copied only if a published snapshot still holds it.
                changed |= enrich_event(&mut Arc::make_mut(recent).event, directory);
            }
        }
        changed
    }

    /// The conditions holding at `now`, by rule.
    pub fn active_conditions(&mut self, now: Instant) -> Vec<ConditionStatus> {
        self.conditions
            .active(now)
            .iter()
            .map(|(rule, c)| ConditionStatus {
                rule: rule.clone(),
                since_seconds: now.saturating_duration_since(c.since).as_secs_f64(),
                matches: c.matches,
                message: c.message.clone(),
            })
            .collect()
    }

    /// The status with the ring copied in, newest first.
    pub fn status(&mut self, now: Instant) -> KernelStatus {
        let mut status = self.status.clone();
        status.conditions = self.active_conditions(now);
        status.events = self.recent.iter().rev().cloned().collect();
        status
    }
}

/// Whether the directory has names for the event's container that it does not carry yet.
fn names_known(event: &KernelEvent, directory: &ContainerDirectory) -> bool {
    event.container_name.is_none()
        && event
            .owner
            .as_ref()
            .and_then(|o| o.container_id.as_deref())
            .is_some_and(|id| directory.get(id).is_some())
}

/// Names for the event's container from the directory, when it has them.
pub fn enrich_event(event: &mut KernelEvent, directory: &ContainerDirectory) -> bool {
    if event.container_name.is_some() {
        return false;
    }
    let Some(info) = event
        .owner
        .as_ref()
        .and_then(|o| o.container_id.as_deref())
        .and_then(|id| directory.get(id))
    else {
        return false;
    };
    event.container_name.clone_from(&info.name);
    event.pod.clone_from(&info.pod);
    event.namespace.clone_from(&info.namespace);
    // Docker's cgroup paths carry no pod UID; its labels do (a Pod's Events need it).
    if let Some(owner) = event.owner.as_mut()
        && owner.pod_uid.is_none()
    {
        owner.pod_uid.clone_from(&info.pod_uid);
    }
    true
}

/// The kernel source's part of the engine.
pub struct KernelSlice {
    state: KernelState,
    published: Arc<KernelStatus>,
    /// The status changed since it was last published.
    dirty: bool,
    metrics: KernelMetrics,
    /// `events_total`'s series by rule, so that counting an event allocates no label.
    rule_counters: HashMap<String, Counter>,
    event_log: EventLog,
}

impl KernelSlice {
    pub fn new(config: &Config, metrics: KernelMetrics) -> KernelSlice {
        // The built-in rules are known to parse (a unit test says so).
        let rules = detect::default_rules()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .chain(config.kernel_log.rules.iter().map(|r| r.name.clone()));
        for rule in rules {
            metrics
                .events_total
                .get_or_create(&RuleLabels { rule })
                .get();
        }
        for victim in OomVictim::ALL {
            for constraint in [OomConstraint::Memcg, OomConstraint::Global] {
                metrics
                    .oom_kills_total
                    .get_or_create(&OomLabels {
                        victim: victim.as_str(),
                        constraint: constraint.as_str(),
                    })
                    .get();
            }
        }
        for scope in HungTaskScope::ALL {
            metrics
                .hung_tasks_total
                .get_or_create(&ScopeLabels {
                    scope: scope.as_str(),
                })
                .get();
        }
        KernelSlice {
            state: KernelState::new(config.kernel_log.recent_events),
            published: Arc::default(),
            dirty: true,
            metrics,
            rule_counters: HashMap::new(),
            event_log: EventLog::default(),
        }
    }

    /// The `events_total` series of `rule` (rules are the config's: a bounded set).
    fn rule_counter(&mut self, rule: &str) -> &Counter {
        if !self.rule_counters.contains_key(rule) {
            let counter = self
                .metrics
                .events_total
                .get_or_create(&RuleLabels {
                    rule: rule.to_string(),
                })
                .clone();
            self.rule_counters.insert(rule.to_string(), counter);
        }
        &self.rule_counters[rule]
    }

    fn set_source(&mut self, active: Option<LogSource>) {
        for source in LogSource::ALL {
            self.metrics
                .log_source
                .get_or_create(&SourceLabels {
                    source: source.label(),
                })
                .set(i64::from(active == Some(source)));
        }
        self.state.status.source = active;
    }

    fn apply_counters(&mut self, counters: &KernelLogCounters) {
        let m = &self.metrics;
        m.records_total.inc_by(counters.records_read);
        m.lost_records_total.inc_by(counters.lost);
        m.ignored_records_total.inc_by(counters.ignored_non_kernel);
        m.malformed_records_total.inc_by(counters.malformed);
        let status = &mut self.state.status;
        status.records_read += counters.records_read;
        status.records_lost += counters.lost;
        status.records_ignored += counters.ignored_non_kernel;
        status.records_malformed += counters.malformed;
    }

    fn apply_event(&mut self, mut event: KernelEvent, at: SystemTime, cx: &mut Context) {
        self.rule_counter(&event.rule).inc();
        let m = &self.metrics;
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
        if !enrich_event(&mut event, &cx.containers)
            && let Some(id) = event.owner.as_ref().and_then(|o| o.container_id.clone())
        {
            cx.actions.push(Action::ResolveContainer(id));
        }
        if self.event_log.allow(&event.rule, cx.now.mono) {
            tracing::info!(
                rule = %event.rule, victim = event.victim_label(), container = event.container_name.as_deref(),
                message = %event.message, "kernel event"
            );
        }
        let changes = cx.incidents.add_evidence(kernel_evidence(&event, at));
        cx.incident_changes(changes);
        self.state.record(event, at, cx.now.mono);
    }
}

impl SourceState for KernelSlice {
    fn apply(&mut self, payload: Payload, cx: &mut Context) {
        let Some(signal) = payload_of::<KernelSignal>(payload, super::NAME) else {
            return;
        };
        match signal {
            KernelSignal::Event { event, at } => self.apply_event(*event, at, cx),
            KernelSignal::Counters(counters) => self.apply_counters(&counters),
            KernelSignal::Up { source, .. } => {
                self.metrics.log_up.set(1);
                self.set_source(Some(source));
                self.state.status.up = Some(true);
                self.state.status.error = None;
            }
            KernelSignal::Down { error, .. } => {
                self.metrics.log_up.set(0);
                self.set_source(None);
                self.state.status.up = Some(false);
                self.state.status.error = Some(error);
            }
        }
        self.dirty = true;
        cx.publish(Publish::Soon);
    }

    /// Conditions expire with time: refresh their gauges every evaluation.
    fn evaluate(&mut self, cx: &mut Context) {
        self.event_log.roll(cx.now.mono);
        let active = self.state.active_conditions(cx.now.mono);
        for rule in self.published.conditions.iter().map(|c| &c.rule) {
            if !active.iter().any(|a| &a.rule == rule) {
                self.metrics
                    .condition
                    .get_or_create(&RuleLabels { rule: rule.clone() })
                    .set(0);
                self.dirty = true;
            }
        }
        for condition in &active {
            self.metrics
                .condition
                .get_or_create(&RuleLabels {
                    rule: condition.rule.clone(),
                })
                .set(1);
        }
        if active.len() != self.published.conditions.len() {
            self.dirty = true;
        }
    }

    fn containers_changed(&mut self, cx: &mut Context) {
        if self.state.enrich(&cx.containers) {
            self.dirty = true;
            cx.publish(Publish::Soon);
        }
    }

    fn section(&mut self, now: Now) -> Option<Arc<dyn Section>> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        self.published = Arc::new(self.state.status(now.mono));
        Some(Arc::new(KernelSection(self.published.clone())))
    }
}

/// The incident's view of a kernel event.
fn kernel_evidence(event: &KernelEvent, at: SystemTime) -> Evidence {
    let pid = event.fields.pid.and_then(|p| i32::try_from(p).ok());
    if let Some(oom) = &event.oom {
        return Evidence::OomKill {
            at,
            pid,
            comm: event.fields.comm.clone(),
            victim: oom.victim,
            constraint: oom.constraint,
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
            scope,
            seconds: event.fields.seconds,
            call_trace: event
                .call_trace
                .as_ref()
                .map(|t| t.frames.clone())
                .unwrap_or_default(),
        };
    }
    Evidence::KernelEvent {
        at,
        rule: event.rule.clone(),
        message: event.message.clone(),
    }
}

/// `kernel_log` in `/status`; its events at `/events`.
#[derive(Debug, Clone, Default)]
pub struct KernelSection(pub Arc<KernelStatus>);

impl Section for KernelSection {
    fn key(&self) -> &'static str {
        "kernel_log"
    }

    fn to_json(&self) -> serde_json::Value {
        json_of(self.0.as_ref())
    }

    fn endpoint(&self) -> Option<(&'static str, serde_json::Value)> {
        Some(("/events", json_of(&self.0.events)))
    }

    /// Critical rules, OOM kills of runc or of the runtime itself, and conditions that still
    /// hold. A container's own OOM kill is routine.
    fn problems(&self, now: SystemTime) -> Vec<String> {
        let kernel = &self.0;
        let mut problems: Vec<String> = kernel
            .conditions
            .iter()
            .map(|c| {
                format!(
                    "kernel: {} holds for {:.0}s: {}",
                    c.rule, c.since_seconds, c.message
                )
            })
            .collect();
        for recent in &kernel.events {
            let event = &recent.event;
            let serious_oom = event
                .oom
                .as_ref()
                .is_some_and(|o| matches!(o.victim, OomVictim::RuncInit | OomVictim::Runtime));
            if event.severity == Severity::Critical || serious_oom {
                let ago = now.duration_since(recent.at).unwrap_or_default().as_secs();
                problems.push(format!(
                    "kernel: {} {ago}s ago: {}",
                    event.rule, event.message
                ));
            }
        }
        problems
    }

    fn render_check(&self, out: &mut String, now: SystemTime) {
        let kernel = &self.0;
        let _ = writeln!(out, "\nKernel log");
        match (kernel.up, &kernel.error) {
            (Some(false), Some(error)) => {
                let _ = writeln!(out, "  unreadable: {error}");
            }
            (None, _) => {
                let _ = writeln!(out, "  not checked");
            }
            _ => {
                let source = match kernel.source {
                    Some(LogSource::Syslog) => "syslog(2): ",
                    Some(LogSource::Kmsg) => "/dev/kmsg: ",
                    None => "",
                };
                let _ = writeln!(
                    out,
                    "  {source}{} records read, {} lost, {} ignored (not kern), {} events",
                    kernel.records_read,
                    kernel.records_lost,
                    kernel.records_ignored,
                    kernel.events.len()
                );
            }
        }
        for recent in kernel.events.iter().take(CHECK_RECENT_EVENTS) {
            let ago = now.duration_since(recent.at).unwrap_or_default().as_secs();
            let event = &recent.event;
            let who = event
                .container_name
                .as_deref()
                .or(event.owner.as_ref().and_then(|o| o.container_id.as_deref()))
                .map(|c| format!(" [{c}]"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {ago:>5}s ago  {:<14} {}{who}",
                event.rule, event.message
            );
            if let Some(trace) = &event.call_trace {
                let frames = trace.frames.iter().take(CHECK_TRACE_FRAMES);
                let _ = writeln!(
                    out,
                    "                call trace: {}",
                    frames.cloned().collect::<Vec<_>>().join(" < ")
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_flood_is_logged_a_few_lines_per_window() {
        let t0 = Instant::now();
        let mut log = EventLog::default();
        let allowed = (0..1000)
            .filter(|i| log.allow("oom_kill", t0 + Duration::from_millis(*i)))
            .count();
        assert_eq!(allowed, LOGGED_EVENTS_PER_WINDOW as usize);
        assert_eq!(log.unlogged.get("oom_kill"), Some(&995));
        log.roll(t0 + LOG_WINDOW);
        assert!(log.unlogged.is_empty(), "the summary line ends the window");
        assert!(log.allow("oom_kill", t0 + LOG_WINDOW));
    }
    use crate::sources::kernel::detect::kernel_time_to_wall;
    use std::time::Duration;

    #[test]
    fn a_hung_task_keeps_its_call_trace_as_evidence() {
        let mut pipeline =
            detect::Pipeline::new(&crate::config::KernelLogConfig::default(), &[]).unwrap();
        let lines = [
            "3,1,1,-;INFO: task dockerd:812 blocked for more than 120 seconds.",
            "6,2,2,-;task:dockerd state:D stack:0 pid:812 tgid:800 ppid:1 flags:0x0",
            "6,3,3,-;Call Trace:",
            "6,4,4,-; __schedule+0x3dc/0xf60",
            "6,5,5,-; __mutex_lock+0x1/0x2",
            "6,6,6,-; </TASK>",
        ];
        let mut events: Vec<KernelEvent> = lines
            .iter()
            .flat_map(|l| pipeline.process(&detect::parse_record(l.as_bytes()).unwrap()))
            .collect();
        events.extend(pipeline.flush());
        let Evidence::HungTask { call_trace, .. } = kernel_evidence(&events[0], SystemTime::now())
        else {
            panic!("not a hung task: {events:?}");
        };
        assert_eq!(
            call_trace,
            ["__schedule+0x3dc/0xf60", "__mutex_lock+0x1/0x2"]
        );
    }

    #[test]
    fn a_recent_timestamp_is_close_to_now_and_an_old_one_is_earlier() {
        let since_boot = Duration::from(
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock"),
        );
        let now = SystemTime::now();
        let recent = kernel_time_to_wall(since_boot.as_micros() as u64);
        let drift = now.duration_since(recent).unwrap_or_default();
        assert!(drift < Duration::from_secs(1), "{drift:?}");
        let older = kernel_time_to_wall(
            since_boot
                .saturating_sub(Duration::from_secs(60))
                .as_micros() as u64,
        );
        let age = now.duration_since(older).unwrap_or_default();
        assert!(
            age >= Duration::from_secs(59) && age < Duration::from_secs(61),
            "{age:?}"
        );
    }
}
