//! The container-stop source's metric families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::detect::EventStream;
use super::exits::ExitReason;
use crate::metrics::{ContainerLabels, FloatGauge, RuntimeLabels};

/// Container stop duration buckets: 100 ms to 10 min. A stop that ignores its signal lasts its
/// timeout (10 s for Docker, the pod's grace period under kubelet, 30 s by default).
const STOP_BUCKETS: [f64; 13] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The exits counter's labels: whose event service reported it, and why it exited.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExitLabels {
    pub runtime: &'static str,
    pub reason: &'static str,
}

pub struct LifecycleMetrics {
    pub container_stop_duration_seconds: Histogram,
    pub container_stop_escalations_total: Counter,
    pub container_stops_in_progress: Gauge,
    pub stuck_container_stops: Gauge,
    pub stuck_container_stop_seconds: Family<ContainerLabels, FloatGauge>,
    pub container_exits_total: Family<ExitLabels, Counter>,
    pub container_oom_events_total: Family<RuntimeLabels, Counter>,
    pub container_oom_marks_pending: Gauge,
    /// The four below per event stream (`runtime`: docker, containerd).
    pub lifecycle_events_total: Family<RuntimeLabels, Counter>,
    pub lifecycle_events_malformed_total: Family<RuntimeLabels, Counter>,
    pub lifecycle_events_stream_up: Family<RuntimeLabels, Gauge>,
    pub lifecycle_events_stream_reconnects_total: Family<RuntimeLabels, Counter>,
}

impl LifecycleMetrics {
    pub fn register(r: &mut Registry) -> LifecycleMetrics {
        let m = LifecycleMetrics {
            container_stop_duration_seconds: Histogram::new(STOP_BUCKETS),
            container_stop_escalations_total: Counter::default(),
            container_stops_in_progress: Gauge::default(),
            stuck_container_stops: Gauge::default(),
            stuck_container_stop_seconds: Family::default(),
            container_exits_total: Family::default(),
            container_oom_events_total: Family::default(),
            container_oom_marks_pending: Gauge::default(),
            lifecycle_events_total: Family::default(),
            lifecycle_events_malformed_total: Family::default(),
            lifecycle_events_stream_up: Family::default(),
            lifecycle_events_stream_reconnects_total: Family::default(),
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
            "hangwatch_container_exits",
            "Exits of containers' main processes from containerd's /tasks/exit, by reason (ok, error, signal_term 143, signal_kill 137, other_signal, oom)",
            m.container_exits_total.clone(),
        );
        r.register(
            "hangwatch_container_oom_events",
            "OOM kills in containers from containerd's /tasks/oom",
            m.container_oom_events_total.clone(),
        );
        r.register(
            "hangwatch_container_oom_marks_pending",
            "Containers with an OOM kill reported and no exit since (bounded)",
            m.container_oom_marks_pending.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events",
            "Events applied from an event stream (Docker's container events; containerd's task exits and OOM kills), each once",
            m.lifecycle_events_total.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_malformed",
            "Events of an event stream that were not usable (skipped)",
            m.lifecycle_events_malformed_total.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_stream_up",
            "1 while the event stream is open",
            m.lifecycle_events_stream_up.clone(),
        );
        r.register(
            "hangwatch_lifecycle_events_stream_reconnects",
            "Times the event stream was opened again after it broke",
            m.lifecycle_events_stream_reconnects_total.clone(),
        );
        m
    }

    /// The series of a stream that is followed, at zero, so they exist before its first event.
    pub fn follow(&self, stream: EventStream) {
        let labels = RuntimeLabels {
            runtime: stream.as_str(),
        };
        self.lifecycle_events_total.get_or_create(&labels).inc_by(0);
        self.lifecycle_events_malformed_total
            .get_or_create(&labels)
            .inc_by(0);
        self.lifecycle_events_stream_up
            .get_or_create(&labels)
            .set(0);
        self.lifecycle_events_stream_reconnects_total
            .get_or_create(&labels)
            .inc_by(0);
        if stream == EventStream::Containerd {
            self.container_oom_events_total
                .get_or_create(&labels)
                .inc_by(0);
            for reason in ExitReason::ALL {
                let labels = ExitLabels {
                    runtime: stream.as_str(),
                    reason: reason.as_str(),
                };
                self.container_exits_total.get_or_create(&labels).inc_by(0);
            }
        }
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
