//! The /proc scan source's engine-side state: metrics from each scan (per-container series
//! only while a container has stuck tasks, so cardinality stays bounded), names for the
//! containers involved, and evidence for incidents.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::metrics::ProcScanMetrics;
use crate::containers::{ContainerDirectory, ContainerInfo};
use crate::engine::incidents::Evidence;
use crate::metrics::{ContainerLabels, KindLabels, ScopeLabels, ScopeWaitLabels};
use crate::signal::Payload;
use crate::sources::procscan::detect::{
    RuntimeKind, ScanReport, Scope, StuckRuntimeProcess, WaitChain, WaitClass,
};
use crate::sources::{Action, Context, Now, Publish, Section, SourceState, json_of, payload_of};

/// Stuck tasks listed by `check`.
const CHECK_LISTED_TASKS: usize = 10;

/// The latest scan with names for the containers it mentions, for `/status` and `check`.
#[derive(Debug, Clone, Serialize)]
pub struct ProcScanView {
    #[serde(flatten)]
    pub report: ScanReport,
    /// Container id → what the runtimes say about it.
    pub containers: BTreeMap<String, ContainerInfo>,
    /// How long a task must stay in D to be listed (`proc_scan.stuck_after`).
    #[serde(skip)]
    pub stuck_after: Duration,
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

pub struct ProcScanState {
    /// Per-container series currently exported.
    series: BTreeSet<ContainerLabels>,
    metrics: ProcScanMetrics,
    stuck_after: Duration,
    /// A scan came since the view was last published.
    fresh: Option<Arc<ProcScanView>>,
}

/// What the engine does with a scan besides metrics.
pub struct Applied {
    pub view: ProcScanView,
    pub evidence: Vec<Evidence>,
    /// Container ids no runtime has named yet.
    pub unknown_containers: Vec<String>,
}

impl ProcScanState {
    pub fn new(metrics: ProcScanMetrics, stuck_after: Duration) -> ProcScanState {
        Self::initialise(&metrics);
        ProcScanState {
            series: BTreeSet::new(),
            metrics,
            stuck_after,
            fresh: None,
        }
    }

    fn initialise(metrics: &ProcScanMetrics) {
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
        for scope in Scope::ALL {
            for wait in WaitClass::ALL {
                metrics
                    .stuck_tasks
                    .get_or_create(&ScopeWaitLabels {
                        scope: scope.as_str(),
                        wait: wait.as_str(),
                    })
                    .set(0);
            }
        }
    }

    pub fn apply_scan(&mut self, report: ScanReport, directory: &ContainerDirectory) -> Applied {
        let metrics = &self.metrics;
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
        for scope in Scope::ALL {
            for wait in WaitClass::ALL {
                let stuck = report
                    .stuck_tasks
                    .iter()
                    .filter(|t| t.scope == scope && wait_class(t.wait.as_ref()) == wait)
                    .count();
                metrics
                    .stuck_tasks
                    .get_or_create(&ScopeWaitLabels {
                        scope: scope.as_str(),
                        wait: wait.as_str(),
                    })
                    .set(i64::try_from(stuck).unwrap_or(i64::MAX));
            }
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
            .scan_duration_seconds
            .observe(report.duration_seconds);
        metrics.scan_tasks.set(gauge(report.tasks_scanned));
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
                    .scan_errors_total
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
            .chain(report.kill_pending.iter().map(|t| &t.owner))
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
                scope: t.scope,
                wchan: t.wchan.clone(),
                seconds: t.seconds_in_d,
                container: name_of(t.owner.container_id.as_deref()),
                wait: t.wait.as_ref().map(|w| w.class),
                waits_on: t.wait.as_ref().map(WaitChain::describe),
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
                stuck_after: self.stuck_after,
            },
            evidence,
            unknown_containers: unknown,
        }
    }
}

impl SourceState for ProcScanState {
    fn apply(&mut self, payload: Payload, cx: &mut Context) {
        let Some(report) = payload_of::<Box<ScanReport>>(payload, super::NAME) else {
            return;
        };
        let applied = self.apply_scan(*report, &cx.containers);
        cx.actions.extend(
            applied
                .unknown_containers
                .into_iter()
                .map(Action::ResolveContainer),
        );
        for evidence in applied.evidence {
            let changes = cx.incidents.add_evidence(evidence);
            cx.incident_changes(changes);
        }
        let view = Arc::new(applied.view);
        cx.board.proc_scan = Some(view.clone());
        self.fresh = Some(view);
        cx.publish(Publish::Now);
    }

    fn section(&mut self, _now: Now) -> Option<Arc<dyn Section>> {
        self.fresh
            .take()
            .map(|view| Arc::new(ProcScanSection(view)) as Arc<dyn Section>)
    }
}

/// `proc_scan` in `/status`: the latest scan; absent until the first one.
#[derive(Debug, Clone)]
pub struct ProcScanSection(pub Arc<ProcScanView>);

impl Section for ProcScanSection {
    fn key(&self) -> &'static str {
        "proc_scan"
    }

    fn to_json(&self) -> serde_json::Value {
        json_of(self.0.as_ref())
    }

    /// Stuck runtime processes (the runc fifo hang and its mirror) and runtime tasks in D.
    fn problems(&self, _now: SystemTime) -> Vec<String> {
        let report = &self.0.report;
        let mut problems: Vec<String> = report
            .runtime_processes
            .iter()
            .map(|p| {
                let fifo = p
                    .exec_fifo
                    .as_ref()
                    .map(|f| format!(" on {}", f.path))
                    .unwrap_or_default();
                format!(
                    "{} pid {} stuck{fifo}, alive {:.0}s ({})",
                    p.comm,
                    p.pid,
                    p.age_seconds,
                    p.kind.as_str()
                )
            })
            .collect();
        problems.extend(
            report
                .stuck_tasks
                .iter()
                .filter(|t| t.scope == Scope::Runtime)
                .map(|t| {
                    let wchan = t.wchan.as_deref().unwrap_or("?");
                    let on = t
                        .wait
                        .as_ref()
                        .map(|w| format!(", waiting on {}", w.describe()))
                        .unwrap_or_default();
                    format!(
                        "runtime task {} pid {} tid {} in D ({wchan}){on}",
                        t.comm, t.pid, t.tid
                    )
                }),
        );
        problems
    }

    fn render_check(&self, out: &mut String, _now: SystemTime) {
        let scan = &self.0;
        let report = &scan.report;
        let _ = writeln!(
            out,
            "\n/proc\n  {} tasks scanned in {:.0} ms; {} in D for {}s or more, {} frozen (paused)",
            report.tasks_scanned,
            report.duration_seconds * 1000.0,
            report.stuck_tasks.len(),
            scan.stuck_after.as_secs(),
            report.frozen.tasks
        );
        for task in report.stuck_tasks.iter().take(CHECK_LISTED_TASKS) {
            let whose = match task.owner.container_id.as_deref() {
                Some(id) => format!("container {}", scan.container_label(id)),
                None => task.scope.as_str().to_string(),
            };
            let _ = writeln!(
                out,
                "  D  {:<16} pid {:<7} tid {:<7} {:<22} {whose}",
                task.comm,
                task.pid,
                task.tid,
                task.wchan.as_deref().unwrap_or("?")
            );
            match &task.wait {
                Some(chain) => {
                    let _ = writeln!(
                        out,
                        "       waits on {} [{}]",
                        chain.describe(),
                        chain.class.as_str()
                    );
                    if let Some(reason) = &chain.kernel_stack_omitted {
                        let _ = writeln!(out, "       kernel stack omitted: {reason}");
                    }
                }
                None => {
                    let _ = writeln!(out, "       waits on: not read in time");
                }
            }
        }
        for process in &report.runtime_processes {
            let _ = writeln!(
                out,
                "  stuck {:<10} {} pid {} alive {:.0}s",
                process.kind.as_str(),
                process.comm,
                process.pid,
                process.age_seconds
            );
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
        kind: process.kind,
        pid: process.pid,
        comm: process.comm.clone(),
        age_seconds: process.age_seconds,
        wchan: process.threads.iter().find_map(|t| t.wchan.clone()),
        fifo,
    }
}

/// A task whose chain could not be read waits on something unknown.
fn wait_class(chain: Option<&WaitChain>) -> WaitClass {
    chain.map_or(WaitClass::Unknown, |c| c.class)
}

fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
