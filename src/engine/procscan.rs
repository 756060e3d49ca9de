//! The engine's view of the /proc scanner: metrics from each scan (per-container series only
//! while a container has stuck tasks, so cardinality stays bounded), names for the
//! containers involved, and evidence for incidents.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use serde::Serialize;

use super::incidents::Evidence;
use crate::containers::{ContainerDirectory, ContainerInfo};
use crate::detectors::procscan::{RuntimeKind, ScanReport, Scope, StuckRuntimeProcess};
use crate::metrics::{ContainerLabels, KindLabels, Metrics, ScopeLabels};

/// The latest scan with names for the containers it mentions, for `/status` and `check`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcScanView {
    #[serde(flatten)]
    pub report: ScanReport,
    /// Container id → what the runtimes say about it.
    pub containers: BTreeMap<String, ContainerInfo>,
}

impl ProcScanView {
    /// The container's name, or its short id when no runtime named it.
    pub fn container_label(&self, id: &str) -> String {
        self.containers
            .get(id)
            .and_then(|c| c.name.clone())
            .unwrap_or_else(|| id.chars().take(12).collect())
    }
}

#[derive(Debug, Default)]
pub struct ProcScanState {
    /// Per-container series currently exported.
    series: BTreeSet<ContainerLabels>,
}

/// What the engine does with a scan besides metrics.
pub struct Applied {
    pub view: ProcScanView,
    pub evidence: Vec<Evidence>,
    /// Container ids no runtime has named yet.
    pub unknown_containers: Vec<String>,
}

impl ProcScanState {
    pub fn initialise(metrics: &Metrics) {
        for scope in Scope::ALL {
            metrics
                .dstate_tasks
                .get_or_create(&ScopeLabels {
                    scope: scope.as_str(),
                })
                .set(0);
        }
        for kind in RuntimeKind::ALL {
            metrics
                .stuck_runtime_processes
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(0);
        }
    }

    pub fn apply(
        &mut self,
        report: ScanReport,
        metrics: &Metrics,
        directory: &ContainerDirectory,
    ) -> Applied {
        for scope in Scope::ALL {
            let stuck = report
                .stuck_tasks
                .iter()
                .filter(|t| t.scope == scope)
                .count();
            metrics
                .dstate_tasks
                .get_or_create(&ScopeLabels {
                    scope: scope.as_str(),
                })
                .set(i64::try_from(stuck).unwrap_or(i64::MAX));
        }
        metrics.frozen_tasks.set(gauge(report.frozen.tasks));
        for kind in RuntimeKind::ALL {
            metrics
                .stuck_runtime_processes
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .set(gauge(report.runtime_count(kind)));
        }
        metrics
            .proc_scan_duration_seconds
            .observe(report.duration_seconds);
        metrics.proc_scan_tasks.set(gauge(report.tasks_scanned));
        let e = &report.errors;
        for (kind, count) in [
            ("proc_unreadable", u64::from(e.proc_unreadable)),
            ("walk_read", e.walk_read_errors),
            ("malformed_stat", e.malformed_stat),
            ("detail_timeout", e.detail_timeouts),
            ("detail_skipped", e.detail_skipped),
            ("detail_error", e.detail_errors),
        ] {
            if count > 0 {
                metrics
                    .proc_scan_errors_total
                    .get_or_create(&KindLabels { kind })
                    .inc_by(count);
            }
        }

        let mut names = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut note = |id: &str| match directory.get(id) {
            Some(info) => {
                names.insert(id.to_string(), info.clone());
            }
            None if !unknown.iter().any(|u: &String| u == id) => unknown.push(id.to_string()),
            None => {}
        };
        let ids = report
            .stuck_tasks
            .iter()
            .map(|t| &t.owner)
            .chain(report.containers.iter().map(|c| &c.owner))
            .chain(report.frozen.by_container.iter().map(|c| &c.owner))
            .chain(report.runtime_processes.iter().map(|p| &p.owner))
            .filter_map(|o| o.container_id.as_deref());
        for id in ids {
            note(id);
        }

        let mut current = BTreeSet::new();
        for container in report.containers.iter().filter(|c| c.stuck_tasks > 0) {
            let Some(id) = container.owner.container_id.clone() else {
                continue;
            };
            let info = names.get(&id);
            let labels = ContainerLabels {
                container_name: info.and_then(|i| i.name.clone()).unwrap_or_default(),
                pod: info.and_then(|i| i.pod.clone()).unwrap_or_default(),
                namespace: info.and_then(|i| i.namespace.clone()).unwrap_or_default(),
                container_id: id,
            };
            metrics
                .container_dstate_tasks
                .get_or_create(&labels)
                .set(gauge(container.stuck_tasks));
            metrics
                .container_dstate_max_seconds
                .get_or_create(&labels)
                .set(container.max_seconds_in_d);
            current.insert(labels);
        }
        for gone in self.series.difference(&current) {
            metrics.container_dstate_tasks.remove(gone);
            metrics.container_dstate_max_seconds.remove(gone);
        }
        self.series = current;

        let at = report.finished_at;
        let name_of = |id: Option<&str>| {
            id.map(|id| {
                names
                    .get(id)
                    .and_then(|i| i.name.clone())
                    .unwrap_or_else(|| id.to_string())
            })
        };
        let mut evidence: Vec<Evidence> = report
            .stuck_tasks
            .iter()
            .map(|t| Evidence::StuckTask {
                at,
                pid: t.pid,
                tid: t.tid,
                comm: t.comm.clone(),
                scope: t.scope.as_str().to_string(),
                wchan: t.wchan.clone(),
                seconds: t.seconds_in_d,
                container: name_of(t.owner.container_id.as_deref()),
            })
            .collect();
        evidence.extend(
            report
                .runtime_processes
                .iter()
                .map(|p| runtime_evidence(p, at)),
        );
        Applied {
            view: ProcScanView {
                report,
                containers: names,
            },
            evidence,
            unknown_containers: unknown,
        }
    }
}

fn runtime_evidence(process: &StuckRuntimeProcess, at: SystemTime) -> Evidence {
    let fifo = process
        .exec_fifo
        .as_ref()
        .map(|f| f.path.clone())
        .or_else(|| {
            process
                .threads
                .iter()
                .find_map(|t| t.opening.as_ref().and_then(|o| o.path.clone()))
        });
    Evidence::StuckRuntimeProcess {
        at,
        kind: process.kind.as_str().to_string(),
        pid: process.pid,
        comm: process.comm.clone(),
        age_seconds: process.age_seconds,
        wchan: process.threads.iter().find_map(|t| t.wchan.clone()),
        fifo,
    }
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
