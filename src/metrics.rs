//! The one Prometheus registry hangwatch exports, its encoders, the engine's own families and
//! the label sets several sources share. Only the engine (with its sources' states) writes
//! metrics; the HTTP server only encodes the registry.

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

pub type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabels {
    pub runtime: &'static str,
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
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ContainerLabels {
    pub container_id: String,
    pub container_name: String,
    pub pod: String,
    pub namespace: String,
}

/// A stuck task's scope and what it waits on (`WaitClass`): 3 × 7 series at most.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeWaitLabels {
    pub scope: &'static str,
    pub wait: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The registry, and the engine's own families (incidents and dumps); each source registers
/// its own families in the same registry when its state is built.
pub struct Metrics {
    registry: Registry,
    pub goroutine_dumps_total: Family<DumpResultLabels, Counter>,
    pub last_goroutine_dump_timestamp_seconds: Family<DaemonLabels, FloatGauge>,
    pub incidents_total: Family<RuntimeLabels, Counter>,
    pub incident_open: Family<RuntimeLabels, Gauge>,
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
        registry.register_collector(Box::new(crate::persist::StateWriteFailures));
        registry.register_collector(Box::new(crate::node_status::KubeMetrics));
        crate::http::register_server_metrics(&mut registry);

        let m = Metrics {
            goroutine_dumps_total: Family::default(),
            last_goroutine_dump_timestamp_seconds: Family::default(),
            incidents_total: Family::default(),
            incident_open: Family::default(),
            registry,
        };
        let mut m = m;
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
        m
    }

    /// For sources registering their families while the engine is built.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
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
        m.incident_open
            .get_or_create(&RuntimeLabels { runtime: "docker" })
            .set(1);
        let text = m.encode();
        assert!(
            text.contains("hangwatch_build_info{node=\"node-a\",version=\""),
            "{text}"
        );
        assert!(
            text.contains("hangwatch_incident_open{node=\"node-a\",runtime=\"docker\"} 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn no_node_label_when_disabled() {
        let m = Metrics::new(None);
        m.incident_open
            .get_or_create(&RuntimeLabels { runtime: "docker" })
            .set(0);
        assert!(!m.encode().contains("node="));
    }

    #[test]
    fn classic_format_names_counters_with_total_and_info_as_gauge() {
        let m = Metrics::new(Some("n"));
        m.incidents_total
            .get_or_create(&RuntimeLabels { runtime: "docker" })
            .inc();
        let text = openmetrics_to_classic(&m.encode());
        assert!(
            text.contains("# TYPE hangwatch_incidents_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP hangwatch_incidents_total "), "{text}");
        assert!(
            text.contains("# TYPE hangwatch_build_info gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        assert!(m.encode().contains("# TYPE hangwatch_incidents counter\n"));
    }

    #[test]
    fn accept_header_negotiation() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
