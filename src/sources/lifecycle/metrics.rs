//! The container-stop source's metric families.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{ContainerLabels, FloatGauge};

/// Container stop duration buckets: 100 ms to 10 min. A stop that ignores its signal lasts its
/// timeout (10 s for Docker, the pod's grace period under kubelet, 30 s by default).
const STOP_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

pub struct LifecycleMetrics {
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

impl LifecycleMetrics {
    pub fn register(r: &mut Registry) -> LifecycleMetrics {
        let m = LifecycleMetrics {
            container_stop_duration_seconds: Histogram::new(STOP_BUCKETS),
            container_stop_escalations_total: Counter::default(),
            container_stops_in_progress: Gauge::default(),
            stuck_container_stops: Gauge::default(),
            stuck_container_stop_seconds: Family::default(),
            lifecycle_events_total: Counter::default(),
            lifecycle_events_malformed_total: Counter::default(),
            lifecycle_events_stream_up: Gauge::default(),
            lifecycle_events_stream_reconnects_total: Counter::default(),
        };
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_histogram_spans_a_tenth_of_a_second_to_ten_minutes() {
        assert_eq!(STOP_BUCKETS.first(), Some(&0.1));
        assert_eq!(STOP_BUCKETS.last(), Some(&600.0));
        assert!(STOP_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }
}
