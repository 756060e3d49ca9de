//! The runtime source's metric families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{FloatGauge, HistogramFamily, RuntimeLabels};

/// Probe latency buckets: 1 ms to 60 s.
const PROBE_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
];

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
pub struct NamespaceLabels {
    pub namespace: String,
}

fn probe_histogram() -> Histogram {
    Histogram::new(PROBE_BUCKETS)
}

pub struct RuntimeMetrics {
    pub up: Family<RuntimeLabels, Gauge>,
    pub stalled: Family<RuntimeLabels, Gauge>,
    pub state: Family<RuntimeStateLabels, Gauge>,
    pub probe_in_flight_seconds: Family<OperationLabels, FloatGauge>,
    pub probe_duration_seconds: HistogramFamily<OperationLabels>,
    pub probe_failures_total: Family<FailureLabels, Counter>,
    pub unknown_tasks: Family<NamespaceLabels, Gauge>,
    pub kubelet_pleg_seconds_left: FloatGauge,
    pub kubelet_status_seconds_left: FloatGauge,
}

impl RuntimeMetrics {
    /// `cri`: the CRI runtime is probed, so kubelet's clocks are exported (a node without
    /// one must not show a clock at zero).
    pub fn register(registry: &mut Registry, cri: bool) -> RuntimeMetrics {
        let m = RuntimeMetrics {
            up: Family::default(),
            stalled: Family::default(),
            state: Family::default(),
            probe_in_flight_seconds: Family::default(),
            probe_duration_seconds: Family::new_with_constructor(probe_histogram),
            probe_failures_total: Family::default(),
            unknown_tasks: Family::default(),
            kubelet_pleg_seconds_left: FloatGauge::default(),
            kubelet_status_seconds_left: FloatGauge::default(),
        };
        registry.register(
            "hangwatch_runtime_up",
            "1 when the runtime answers its liveness probe (healthy, slow or wedged)",
            m.up.clone(),
        );
        registry.register(
            "hangwatch_runtime_stalled",
            "1 when a probe of the runtime has been in flight longer than the stall threshold",
            m.stalled.clone(),
        );
        registry.register(
            "hangwatch_runtime_state",
            "1 for the runtime's current state: healthy, slow, wedged, hung, down or absent",
            m.state.clone(),
        );
        registry.register(
            "hangwatch_runtime_probe_in_flight_seconds",
            "Age of the probe call in flight, 0 when none",
            m.probe_in_flight_seconds.clone(),
        );
        registry.register(
            "hangwatch_runtime_probe_duration_seconds",
            "Duration of completed probe calls (timeouts are counted as failures instead)",
            m.probe_duration_seconds.clone(),
        );
        registry.register(
            "hangwatch_runtime_probe_failures",
            "Probe calls that failed, by reason: timeout, error, unreachable",
            m.probe_failures_total.clone(),
        );
        registry.register(
            "hangwatch_containerd_unknown_tasks",
            "Tasks containerd's Tasks.List reports as UNKNOWN (their shim did not answer), by namespace",
            m.unknown_tasks.clone(),
        );
        if !cri {
            return m;
        }
        registry.register(
            "hangwatch_kubelet_pleg_relist_seconds_left",
            "Seconds until kubelet's PLEG would go unhealthy (3 min without a completed CRI relist), from the CRI probes",
            m.kubelet_pleg_seconds_left.clone(),
        );
        registry.register(
            "hangwatch_kubelet_runtime_status_seconds_left",
            "Seconds until kubelet would call the runtime down (30 s without a CRI Status answer), from the CRI probes",
            m.kubelet_status_seconds_left.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_spans_one_millisecond_to_a_minute() {
        assert_eq!(PROBE_BUCKETS.first(), Some(&0.001));
        assert_eq!(PROBE_BUCKETS.last(), Some(&60.0));
        assert!(PROBE_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
