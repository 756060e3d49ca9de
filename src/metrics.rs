//! Every Prometheus metric hangwatch exports, in one registry. Only the engine writes them;
//! the HTTP server only encodes the registry.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`] (what Prometheus asks for).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`openmetrics_to_classic`]'s output (curl, promtool, older scrapers).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// /proc scan duration buckets: 1 ms to 10 s.
const SCAN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Probe latency buckets: 1 ms to 60 s.
const PROBE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

/// Container stop duration buckets: 100 ms to 10 min. A stop that ignores its signal lasts its
/// timeout (10 s for Docker, the pod's grace period under kubelet, 30 s by default).
const STOP_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeStateLabels {
    pub runtime: &'static str,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub runtime: &'static str,
    pub operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub runtime: &'static str,
    pub operation: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DaemonLabels {
    pub daemon: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DumpResultLabels {
    pub daemon: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OomLabels {
    pub victim: &'static str,
    pub constraint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ContainerLabels {
    pub container_id: String,
    pub container_name: String,
    pub pod: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn probe_histogram() -> Histogram {
    Histogram::new(PROBE_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    pub runtime_up: Family<RuntimeLabels, Gauge>,
    pub runtime_stalled: Family<RuntimeLabels, Gauge>,
    pub runtime_state: Family<RuntimeStateLabels, Gauge>,
    pub probe_in_flight_seconds: Family<OperationLabels, FloatGauge>,
    pub probe_duration_seconds: HistogramFamily<OperationLabels>,
    pub probe_failures_total: Family<FailureLabels, Counter>,
    pub goroutine_dumps_total: Family<DumpResultLabels, Counter>,
    pub last_goroutine_dump_timestamp_seconds: Family<DaemonLabels, FloatGauge>,
    pub incidents_total: Family<RuntimeLabels, Counter>,
    pub incident_open: Family<RuntimeLabels, Gauge>,
    pub kernel_events_total: Family<RuleLabels, Counter>,
    pub hung_tasks_total: Family<ScopeLabels, Counter>,
    pub oom_kills_total: Family<OomLabels, Counter>,
    pub kernel_condition: Family<RuleLabels, Gauge>,
    pub kernel_log_up: Gauge,
    pub kernel_log_source: Family<SourceLabels, Gauge>,
    pub kernel_log_records_total: Counter,
    pub kernel_log_lost_records_total: Counter,
    pub kernel_log_ignored_records_total: Counter,
    pub kernel_log_malformed_records_total: Counter,
    pub dstate_tasks: Family<ScopeLabels, Gauge>,
    pub frozen_tasks: Gauge,
    pub container_dstate_tasks: Family<ContainerLabels, Gauge>,
    pub container_dstate_max_seconds: Family<ContainerLabels, FloatGauge>,
    pub stuck_runtime_processes: Family<KindLabels, Gauge>,
    pub proc_scan_duration_seconds: Histogram,
    pub proc_scan_tasks: Gauge,
    pub proc_scan_errors_total: Family<KindLabels, Counter>,
    pub container_stop_duration_seconds: Histogram,
    pub container_stop_escalations_total: Counter,
    pub container_stops_in_progress: Gauge,
    pub stuck_container_stops: Gauge,
    pub stuck_container_stop_seconds: Family<ContainerLabels, FloatGauge>,
    pub lifecycle_events_total: Counter,
    pub lifecycle_events_malformed_total: Counter,
    pub lifecycle_events_stream_up: Gauge,
    pub lifecycle_events_stream_reconnects_total: Counter,
}

impl Metrics {
    /// A registry whose every series carries `node="<node>"` when `node` is given.
    pub fn new(node: Option<&str>) -> Metrics {
        let labels: Vec<(Cow<'static, str>, Cow<'static, str>)> = node
            .map(|n| vec![(Cow::Borrowed("node"), Cow::Owned(n.to_string()))])
            .unwrap_or_default();
        let mut registry = Registry::with_labels(labels.into_iter());

        let build_info = Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]);
        registry.register("hangwatch_build", "hangwatch build information", build_info);
        crate::http::register_server_metrics(&mut registry);

        let mut m = Metrics {
            runtime_up: Family::default(),
            runtime_stalled: Family::default(),
            runtime_state: Family::default(),
            probe_in_flight_seconds: Family::default(),
            probe_duration_seconds: Family::new_with_constructor(probe_histogram),
            probe_failures_total: Family::default(),
            goroutine_dumps_total: Family::default(),
            last_goroutine_dump_timestamp_seconds: Family::default(),
            incidents_total: Family::default(),
            incident_open: Family::default(),
            kernel_events_total: Family::default(),
            hung_tasks_total: Family::default(),
            oom_kills_total: Family::default(),
            kernel_condition: Family::default(),
            kernel_log_up: Gauge::default(),
            kernel_log_source: Family::default(),
            kernel_log_records_total: Counter::default(),
            kernel_log_lost_records_total: Counter::default(),
            kernel_log_ignored_records_total: Counter::default(),
            kernel_log_malformed_records_total: Counter::default(),
            dstate_tasks: Family::default(),
            frozen_tasks: Gauge::default(),
            container_dstate_tasks: Family::default(),
            container_dstate_max_seconds: Family::default(),
            stuck_runtime_processes: Family::default(),
            proc_scan_duration_seconds: Histogram::new(SCAN_BUCKETS),
            proc_scan_tasks: Gauge::default(),
            proc_scan_errors_total: Family::default(),
            container_stop_duration_seconds: Histogram::new(STOP_BUCKETS),
            container_stop_escalations_total: Counter::default(),
            container_stops_in_progress: Gauge::default(),
            stuck_container_stops: Gauge::default(),
            stuck_container_stop_seconds: Family::default(),
            lifecycle_events_total: Counter::default(),
            lifecycle_events_malformed_total: Counter::default(),
            lifecycle_events_stream_up: Gauge::default(),
            lifecycle_events_stream_reconnects_total: Counter::default(),
            registry,
        };
        m.registry.register(
            "hangwatch_runtime_up",
            "1 when the runtime answers its liveness probe (healthy, slow or wedged)",
            m.runtime_up.clone(),
        );
        m.registry.register(
            "hangwatch_runtime_stalled",
            "1 when a probe of the runtime has been in flight longer than the stall threshold",
            m.runtime_stalled.clone(),
        );
        m.registry.register(
            "hangwatch_runtime_state",
            "1 for the runtime's current state: healthy, slow, wedged, hung, down or absent",
            m.runtime_state.clone(),
        );
        m.registry.register(
            "hangwatch_runtime_probe_in_flight_seconds",
            "Age of the probe call in flight, 0 when none",
            m.probe_in_flight_seconds.clone(),
        );
        m.registry.register(
            "hangwatch_runtime_probe_duration_seconds",
            "Duration of completed probe calls (timeouts are counted as failures instead)",
            m.probe_duration_seconds.clone(),
        );
        m.registry.register(
            "hangwatch_runtime_probe_failures",
            "Probe calls that failed, by reason: timeout, error, unreachable",
            m.probe_failures_total.clone(),
        );
        m.registry.register(
            "hangwatch_goroutine_dumps",
            "Goroutine dumps requested, by result: ok, timeout, failed, cooldown",
            m.goroutine_dumps_total.clone(),
        );
        m.registry.register(
            "hangwatch_last_goroutine_dump_timestamp_seconds",
            "Unix time of the last goroutine dump collected",
            m.last_goroutine_dump_timestamp_seconds.clone(),
        );
        m.registry.register(
            "hangwatch_incidents",
            "Incidents opened by a runtime stall or a stuck container stop",
            m.incidents_total.clone(),
        );
        m.registry.register(
            "hangwatch_incident_open",
            "1 while an incident of the runtime is open",
            m.incident_open.clone(),
        );
        let r = &mut m.registry;
        r.register(
            "hangwatch_kernel_events",
            "Kernel log events, by rule",
            m.kernel_events_total.clone(),
        );
        r.register(
            "hangwatch_hung_tasks",
            "Kernel hung-task reports, by whose task: runtime, container, host",
            m.hung_tasks_total.clone(),
        );
        r.register(
            "hangwatch_oom_kills",
            "OOM kills, by victim (runc_init, runtime, container, host) and constraint (memcg, global)",
            m.oom_kills_total.clone(),
        );
        r.register(
            "hangwatch_kernel_condition",
            "1 while a kernel condition rule holds (e.g. fs_readonly)",
            m.kernel_condition.clone(),
        );
        r.register(
            "hangwatch_kernel_log_up",
            "1 while the kernel log is being read",
            m.kernel_log_up.clone(),
        );
        r.register(
            "hangwatch_kernel_log_source",
            "1 for the interface the kernel log is being read through: kmsg (/dev/kmsg) or syslog (syslog(2))",
            m.kernel_log_source.clone(),
        );
        r.register(
            "hangwatch_kernel_log_records",
            "Kernel log records read",
            m.kernel_log_records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_lost_records",
            "Kernel log records overwritten before they were read (from seq gaps)",
            m.kernel_log_lost_records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_ignored_records",
            "Kernel log records ignored because their facility is not kern",
            m.kernel_log_ignored_records_total.clone(),
        );
        r.register(
            "hangwatch_kernel_log_malformed_records",
            "Kernel log records that did not parse",
            m.kernel_log_malformed_records_total.clone(),
        );
        r.register(
            "hangwatch_dstate_tasks",
            "Tasks stuck in uninterruptible sleep (D) past proc_scan.stuck_after, frozen ones excluded, by scope",
            m.dstate_tasks.clone(),
        );
        r.register(
            "hangwatch_frozen_tasks",
            "Tasks in D because their cgroup is frozen (paused containers): expected, not stuck",
            m.frozen_tasks.clone(),
        );
        r.register(
            "hangwatch_container_dstate_tasks",
            "Stuck D-state tasks per container; only containers that have some",
            m.container_dstate_tasks.clone(),
        );
        r.register(
            "hangwatch_container_dstate_max_seconds",
            "Longest time one of the container's tasks has been in D; only containers with stuck tasks",
            m.container_dstate_max_seconds.clone(),
        );
        r.register(
            "hangwatch_stuck_runtime_processes",
            "Runtime processes stuck (runc on its exec.fifo, runc:[2:INIT] waiting, shim in D), by kind",
            m.stuck_runtime_processes.clone(),
        );
        r.register(
            "hangwatch_proc_scan_duration_seconds",
            "Duration of one /proc scan",
            m.proc_scan_duration_seconds.clone(),
        );
        r.register(
            "hangwatch_proc_scan_tasks",
            "Tasks (threads) read by the last /proc scan",
            m.proc_scan_tasks.clone(),
        );
        r.register(
            "hangwatch_proc_scan_errors",
            "/proc scan problems, by kind (vanished tasks are not counted)",
            m.proc_scan_errors_total.clone(),
        );
        r.register(
            "hangwatch_container_stop_duration_seconds",
            "Container stops, from the first kill to the container's exit (die)",
            m.container_stop_duration_seconds.clone(),
        );
        r.register(
            "hangwatch_container_stop_escalations",
            "Container stops that needed SIGKILL: the container ignored its stop signal",
            m.container_stop_escalations_total.clone(),
        );
        r.register(
            "hangwatch_container_stops_in_progress",
            "Container stops begun (kill seen) whose container has not exited yet",
            m.container_stops_in_progress.clone(),
        );
        r.register(
            "hangwatch_stuck_container_stops",
            "Container stops with no exit within their timeout plus lifecycle.stop_grace",
            m.stuck_container_stops.clone(),
        );
        r.register(
            "hangwatch_stuck_container_stop_seconds",
            "Time since the first kill of a stuck stop; only stuck stops, removed when they end",
            m.stuck_container_stop_seconds.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events",
            "Container events applied from Docker's event stream, each once",
            m.lifecycle_events_total.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_malformed",
            "Lines of Docker's event stream that were not usable events (skipped)",
            m.lifecycle_events_malformed_total.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_stream_up",
            "1 while Docker's event stream is open",
            m.lifecycle_events_stream_up.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_stream_reconnects",
            "Times Docker's event stream was opened again after it broke",
            m.lifecycle_events_stream_reconnects_total.clone(),
        );
        m
    }

    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        encode_registry(&self.registry)
    }
}

/// OpenMetrics text of every metric in `registry`.
pub fn encode_registry(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; an error here would be a bug in an encoder.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// Whether an HTTP `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Rewrite prometheus-client's OpenMetrics output as Prometheus text format 0.0.4: counter
/// families are named with their `_total` suffix, `info` becomes a gauge named `*_info`,
/// and `# EOF`/`# UNIT` go. Only our own encoder's output is fed here.
pub fn openmetrics_to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            pending_help = rest.split_once(' ');
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                other => (name.to_string(), other),
            };
            if let Some((_, help)) = pending_help.take() {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_label_on_every_series_and_build_info() {
        let m = Metrics::new(Some("node-a"));
        m.runtime_up
            .get_or_create(&RuntimeLabels { runtime: "docker" })
            .set(1);
        let text = m.encode();
        assert!(
            text.contains("hangwatch_build_info{node=\"node-a\",version=\""),
            "{text}"
        );
        assert!(
            text.contains("hangwatch_runtime_up{node=\"node-a\",runtime=\"docker\"} 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn no_node_label_when_disabled() {
        let m = Metrics::new(None);
        m.runtime_up
            .get_or_create(&RuntimeLabels { runtime: "docker" })
            .set(0);
        assert!(!m.encode().contains("node="));
    }

    #[test]
    fn classic_format_names_counters_with_total_and_info_as_gauge() {
        let m = Metrics::new(Some("n"));
        m.probe_failures_total
            .get_or_create(&FailureLabels {
                runtime: "docker",
                operation: "ping".into(),
                reason: "timeout",
            })
            .inc();
        let text = openmetrics_to_classic(&m.encode());
        assert!(
            text.contains("# TYPE hangwatch_runtime_probe_failures_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP hangwatch_runtime_probe_failures_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hangwatch_build_info gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(
            m.encode()
                .contains("# TYPE hangwatch_runtime_probe_failures counter\n")
        );
    }

    #[test]
    fn accept_header_negotiation() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn stop_histogram_spans_a_tenth_of_a_second_to_ten_minutes() {
        assert_eq!(STOP_BUCKETS.first(), Some(&0.1));
        assert_eq!(STOP_BUCKETS.last(), Some(&600.0));
        assert!(STOP_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn histogram_spans_one_millisecond_to_a_minute() {
        assert_eq!(PROBE_BUCKETS.first(), Some(&0.001));
        assert_eq!(PROBE_BUCKETS.last(), Some(&60.0));
        assert!(PROBE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
