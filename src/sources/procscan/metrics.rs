//! The /proc scan source's metric families.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{ContainerLabels, FloatGauge, KindLabels, ScopeLabels, ScopeWaitLabels};

/// /proc scan duration buckets: 1 ms to 10 s.
const SCAN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

pub struct ProcScanMetrics {
    pub dstate_tasks: Family<ScopeLabels, Gauge>,
    pub stuck_tasks: Family<ScopeWaitLabels, Gauge>,
    pub frozen_tasks: Gauge,
    pub container_dstate_tasks: Family<ContainerLabels, Gauge>,
    pub container_dstate_max_seconds: Family<ContainerLabels, FloatGauge>,
    pub stuck_runtime_processes: Family<KindLabels, Gauge>,
    pub scan_duration_seconds: Histogram,
    pub scan_tasks: Gauge,
    pub scan_errors_total: Family<KindLabels, Counter>,
}

impl ProcScanMetrics {
    pub fn register(r: &mut Registry) -> ProcScanMetrics {
        let m = ProcScanMetrics {
            dstate_tasks: Family::default(),
            stuck_tasks: Family::default(),
            frozen_tasks: Gauge::default(),
            container_dstate_tasks: Family::default(),
            container_dstate_max_seconds: Family::default(),
            stuck_runtime_processes: Family::default(),
            scan_duration_seconds: Histogram::new(SCAN_BUCKETS),
            scan_tasks: Gauge::default(),
            scan_errors_total: Family::default(),
        };
        r.register(
            "hangwatch_dstate_tasks",
            "Tasks stuck in uninterruptible sleep (D) past proc_scan.stuck_after, frozen ones excluded, by scope",
            m.dstate_tasks.clone(),
        );
        r.register(
            "hangwatch_stuck_tasks",
            "Tasks stuck in D past proc_scan.stuck_after, by scope and what they wait on (block_io, fs_server, lock, freezer, runtime_pipe, memory_reclaim, unknown)",
            m.stuck_tasks.clone(),
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
            m.scan_duration_seconds.clone(),
        );
        r.register(
            "hangwatch_proc_scan_tasks",
            "Tasks (threads) read by the last /proc scan",
            m.scan_tasks.clone(),
        );
        r.register(
            "hangwatch_proc_scan_errors",
            "/proc scan problems, by kind (vanished tasks are not counted)",
            m.scan_errors_total.clone(),
        );
        m
    }
}
