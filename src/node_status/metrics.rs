//! The publisher's own counts: process-wide atomics exported by a prometheus-client
//! `Collector`, as `persist.rs` does, because the publisher is a reader of the engine's
//! snapshot and must not write the engine's metrics.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// How one call to the API server ended: the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestResult {
    /// A 2xx answer.
    Ok,
    /// 409 Conflict or 404 Not Found on an event: handled by the caller (create instead of
    /// update, or the reverse).
    Conflict,
    /// Any other HTTP error status (the API server's 4xx and 5xx).
    Error,
    /// No answer within `node_status.request_timeout`.
    Timeout,
    /// No connection, TLS failure, broken reply.
    Unreachable,
}

impl RequestResult {
    const ALL: [RequestResult; 5] = [
        RequestResult::Ok,
        RequestResult::Conflict,
        RequestResult::Error,
        RequestResult::Timeout,
        RequestResult::Unreachable,
    ];

    fn label(self) -> &'static str {
        match self {
            RequestResult::Ok => "ok",
            RequestResult::Conflict => "conflict",
            RequestResult::Error => "error",
            RequestResult::Timeout => "timeout",
            RequestResult::Unreachable => "unreachable",
        }
    }

    fn counter(self) -> &'static AtomicU64 {
        static OK: AtomicU64 = AtomicU64::new(0);
        static CONFLICT: AtomicU64 = AtomicU64::new(0);
        static ERROR: AtomicU64 = AtomicU64::new(0);
        static TIMEOUT: AtomicU64 = AtomicU64::new(0);
        static UNREACHABLE: AtomicU64 = AtomicU64::new(0);
        match self {
            RequestResult::Ok => &OK,
            RequestResult::Conflict => &CONFLICT,
            RequestResult::Error => &ERROR,
            RequestResult::Timeout => &TIMEOUT,
            RequestResult::Unreachable => &UNREACHABLE,
        }
    }
}

/// Why an event was not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDrop {
    /// Past `node_status.events.max_per_minute`.
    RateLimited,
    /// The queue of events waiting for the API server was full (it is down or slow).
    QueueFull,
}

impl EventDrop {
    const ALL: [EventDrop; 2] = [EventDrop::RateLimited, EventDrop::QueueFull];

    fn label(self) -> &'static str {
        match self {
            EventDrop::RateLimited => "rate_limited",
            EventDrop::QueueFull => "queue_full",
        }
    }

    fn counter(self) -> &'static AtomicU64 {
        static RATE_LIMITED: AtomicU64 = AtomicU64::new(0);
        static QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
        match self {
            EventDrop::RateLimited => &RATE_LIMITED,
            EventDrop::QueueFull => &QUEUE_FULL,
        }
    }
}

static PENDING: AtomicU64 = AtomicU64::new(0);

pub fn count_request(result: RequestResult) {
    result.counter().fetch_add(1, Ordering::Relaxed);
}

pub fn count_dropped_event(reason: EventDrop) {
    reason.counter().fetch_add(1, Ordering::Relaxed);
}

/// Updates waiting for the API server: a condition patch (at most one: the latest state
/// wins) plus the events queued.
pub fn set_pending(updates: usize) {
    PENDING.store(updates as u64, Ordering::Relaxed);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Exports `hangwatch_kube_api_requests_total{result}`, `hangwatch_kube_pending_updates` and
/// `hangwatch_kube_events_dropped_total{reason}`.
#[derive(Debug, Default)]
pub struct KubeMetrics;

impl Collector for KubeMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut requests = encoder.encode_descriptor(
            "hangwatch_kube_api_requests",
            "Calls to the Kubernetes API server by result: ok, conflict, error, timeout, unreachable",
            None,
            MetricType::Counter,
        )?;
        for result in RequestResult::ALL {
            let labels = ResultLabels {
                result: result.label(),
            };
            ConstCounter::new(result.counter().load(Ordering::Relaxed))
                .encode(requests.encode_family(&labels)?)?;
        }
        let pending = encoder.encode_descriptor(
            "hangwatch_kube_pending_updates",
            "Node condition updates and events waiting for the Kubernetes API server",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(PENDING.load(Ordering::Relaxed) as i64).encode(pending)?;
        let mut dropped = encoder.encode_descriptor(
            "hangwatch_kube_events_dropped",
            "Events not sent to the Kubernetes API server, by reason: rate_limited, queue_full",
            None,
            MetricType::Counter,
        )?;
        for reason in EventDrop::ALL {
            let labels = ReasonLabels {
                reason: reason.label(),
            };
            ConstCounter::new(reason.counter().load(Ordering::Relaxed))
                .encode(dropped.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
