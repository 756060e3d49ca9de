//! The /proc scanner: tasks stuck in uninterruptible sleep (D), and the runc processes that
//! wedge containerd without ever entering D (hangwatch issue 4).
//!
//! Each scan walks every task's `stat` (the hot loop, [`walk`]), tracks how long each task has
//! been in D ([`tracker`]), and only for D tasks and runc processes reads more: `cgroup` for the
//! container and the freezer, `wchan` and the kernel stack for stuck tasks, threads and
//! descriptors for runc. Those reads may block in the kernel, so they run behind a deadline
//! ([`deadline`]). [`ProcScanner::scan`] is the entry point for `hangwatch check` and tests;
//! [`ProcScanDetector`] runs it every `proc_scan.interval`.

mod cgroups;
mod deadline;
mod detector;
mod files;
mod report;
mod runtime;
mod signals;
mod stat;
mod tracker;
mod waits;
mod walk;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::attribution::CgroupOwner;
use crate::config::{Config, ProcScanConfig};

use cgroups::{CgroupLayout, FrozenCache, TaskCgroup, v1_frozen, v2_frozen};
use deadline::{DeadlineRunner, NotRun};
use files::{is_vanished, read_text};
use runtime::{Examination, examine, is_runtime_comm, is_shim_comm, runc_kind, wchan_name};
use stat::Comm;
use tracker::{DStateTracker, TaskKey};
use walk::{WalkCounts, Walker};

pub use detector::{ProcScanDetector, detector};
pub use report::{
    BlockedOpen, ContainerDState, Direction, ExecFifo, FrozenContainer, FrozenTasks,
    KillPendingTask, RuntimeKind, ScanErrors, ScanReport, Scope, ScopeCounts, StuckRuntimeProcess,
    StuckTask, ThreadEvidence,
};
pub use stat::{TaskStat, parse_stat};
pub use waits::{
    BlockDevice, FuseConnection, Holder, Mount, TaskBrief, WaitChain, WaitClass, state_name,
};

/// Reader threads that may stay blocked in a read that missed its deadline; also the number
/// of timeouts after which a scan stops attempting detail reads.
const MAX_ABANDONED_READERS: usize = 4;

/// Container D tasks whose `status` is read per scan for a pending SIGKILL: a paused
/// container with thousands of tasks costs no more than this.
const MAX_KILL_PENDING_READS: usize = 256;

/// A task the walk saw in D.
#[derive(Debug, Clone, Copy)]
struct DTask {
    pid: i32,
    tid: i32,
    starttime: u64,
    comm: Comm,
}

/// A `runc` or `runc:[2:INIT]` process the walk saw.
#[derive(Debug, Clone, Copy)]
struct RuncProcess {
    pid: i32,
    starttime: u64,
    kind: RuntimeKind,
    comm: Comm,
}

/// Scans /proc, keeping what must survive from one scan to the next. Not `Sync`: one scan at a
/// time.
pub struct ProcScanner {
    settings: Settings,
    walker: Walker,
    tracker: DStateTracker<TaskCgroup>,
    runner: DeadlineRunner,
    frozen: FrozenCache,
    d_tasks: Vec<DTask>,
    runc: Vec<RuncProcess>,
    /// Block device `major:minor` → reads and writes completed at the previous scan.
    block_ios: HashMap<String, u64>,
}

/// What a scan reads but never changes.
struct Settings {
    config: ProcScanConfig,
    containerd_namespaces: Vec<String>,
    ticks_per_second: u64,
}

/// One scan with a fresh scanner: every D task is new, so only `stuck_after: 0s` reports
/// stuck tasks. Keep a [`ProcScanner`] to measure durations.
pub fn scan_once(config: &Config) -> ScanReport {
    ProcScanner::new(config).scan()
}

impl ProcScanner {
    pub fn new(config: &Config) -> ProcScanner {
        ProcScanner {
            settings: Settings {
                config: config.proc_scan.clone(),
                containerd_namespaces: config.containerd.namespaces.clone(),
                ticks_per_second: rustix::param::clock_ticks_per_second(),
            },
            walker: Walker::default(),
            tracker: DStateTracker::default(),
            runner: DeadlineRunner::new(config.proc_scan.read_deadline, MAX_ABANDONED_READERS),
            frozen: FrozenCache::default(),
            d_tasks: Vec::new(),
            runc: Vec::new(),
            block_ios: HashMap::new(),
        }
    }

    /// Scan every task once. However the kernel behaves, at most `MAX_ABANDONED_READERS`
    /// detail reads wait out `read_deadline`; never panics on what /proc contains.
    pub fn scan(&mut self) -> ScanReport {
        let started = Instant::now();
        self.runner.begin_scan();
        self.frozen.clear();
        self.d_tasks.clear();
        self.runc.clear();

        let mut errors = ScanErrors::default();
        let counts = self.walk(&mut errors);
        let walk_seconds = started.elapsed().as_secs_f64();

        let mut details = Details {
            runner: &mut self.runner,
            errors: &mut errors,
            mounts: waits::MountTables::default(),
        };
        let mut found = classify_d_tasks(
            &self.settings,
            &self.d_tasks,
            &mut self.tracker,
            &mut self.frozen,
            &mut details,
        );
        trace_waits(
            &self.settings,
            &mut found.stuck_tasks,
            &mut self.block_ios,
            &mut details,
        );
        let mut runtime_processes = stuck_runc(&self.settings, &self.runc, &mut details);
        runtime_processes.extend(stuck_shims(
            &self.settings,
            &found.stuck_tasks,
            &mut details,
        ));
        errors.abandoned_readers = self.runner.abandoned() as u64;
        if errors.detail_skipped > 0 {
            tracing::warn!(
                skipped = errors.detail_skipped,
                abandoned_readers = errors.abandoned_readers,
                "proc scan skipped detail reads: reader threads are blocked in the kernel"
            );
        }
        found.into_report(
            counts,
            walk_seconds,
            started.elapsed().as_secs_f64(),
            runtime_processes,
            errors,
        )
    }

    fn walk(&mut self, errors: &mut ScanErrors) -> WalkCounts {
        let d_tasks = &mut self.d_tasks;
        let runc = &mut self.runc;
        let proc_root = &self.settings.config.proc_root;
        let walked = self.walker.walk(proc_root, |task| {
            let stat = &task.stat;
            if stat.state == b'D' {
                d_tasks.push(DTask {
                    pid: task.pid,
                    tid: task.tid,
                    starttime: stat.starttime,
                    comm: Comm::new(stat.comm),
                });
            }
            if task.is_leader()
                && let Some(kind) = runc_kind(stat.comm)
            {
                runc.push(RuncProcess {
                    pid: task.pid,
                    starttime: stat.starttime,
                    kind,
                    comm: Comm::new(stat.comm),
                });
            }
        });
        match walked {
            Ok(counts) => {
                errors.walk_read_errors = counts.read_errors;
                errors.malformed_stat = counts.malformed;
                counts
            }
            Err(e) => {
                errors.proc_unreadable = true;
                tracing::warn!(
                    proc_root = %proc_root.display(),
                    error = %e,
                    "cannot list the proc root"
                );
                WalkCounts::default()
            }
        }
    }
}

/// Track, attribute and sort the D tasks of this scan: frozen, not yet stuck, or stuck.
fn classify_d_tasks(
    settings: &Settings,
    d_tasks: &[DTask],
    tracker: &mut DStateTracker<TaskCgroup>,
    frozen_cache: &mut FrozenCache,
    details: &mut Details<'_>,
) -> Found {
    let config = &settings.config;
    let now = Instant::now();
    let mut found = Found::default();
    let mut layout = None;
    tracker.begin_scan();
    for task in d_tasks {
        let key = TaskKey {
            tid: task.tid,
            starttime: task.starttime,
        };
        let tracked = tracker.observe_d(key, now);
        let in_d = tracked.in_d_for(now);
        if tracked.cached.is_none() {
            let path = task_file(&config.proc_root, task, "cgroup");
            tracked.cached = details
                .text(path)
                .map(|text| TaskCgroup::parse(&text, &settings.containerd_namespaces));
        }
        let cgroup = tracked.cached.as_ref();
        let layout = layout.get_or_insert_with(|| CgroupLayout::probe(&config.cgroup_root));
        let frozen = cgroup.is_some_and(|c| details.frozen(c, layout, frozen_cache));
        let owner = cgroup.map(|c| c.owner.clone()).unwrap_or_default();
        // Read once and only for the tasks that hold a kill: the stuck path reuses it.
        let mut wchan = None;
        if owner.is_container() && found.status_reads >= MAX_KILL_PENDING_READS {
            found.status_unread += 1;
        } else if owner.is_container() {
            found.status_reads += 1;
            let status = details.text(task_file(&config.proc_root, task, "status"));
            match status.as_deref().and_then(signals::sigkill_pending) {
                Some(true) => {
                    let since = *tracked.sigkill_since.get_or_insert(now);
                    let read = details
                        .text(task_file(&config.proc_root, task, "wchan"))
                        .and_then(wchan_name);
                    found.kill_pending.push(KillPendingTask {
                        pid: task.pid,
                        tid: task.tid,
                        comm: task.comm.to_string(),
                        frozen,
                        wchan: read.clone(),
                        seconds_pending: now.saturating_duration_since(since).as_secs_f64(),
                        seconds_in_d: in_d.as_secs_f64(),
                        owner: owner.clone(),
                    });
                    wchan = Some(read);
                }
                Some(false) => tracked.sigkill_since = None,
                // Unreadable this time: its clock keeps running.
                None => {}
            }
        }
        if frozen {
            found.frozen(Some(&owner));
            continue;
        }
        let scope = scope_of(task.comm.as_bytes(), &owner);
        if in_d < config.stuck_after {
            found.not_stuck(scope, &owner, in_d);
            continue;
        }
        let wchan = wchan.unwrap_or_else(|| {
            details
                .text(task_file(&config.proc_root, task, "wchan"))
                .and_then(wchan_name)
        });
        let (kernel_stack, stack_omitted) =
            match details.text_or_reason(task_file(&config.proc_root, task, "stack")) {
                Ok(text) => (Some(parse_kernel_stack(&text)), None),
                Err(reason) => (None, Some(reason)),
            };
        let wait = details
            .run({
                let request = waits::ChainRequest {
                    roots: settings.roots(),
                    mounts: details.mounts.clone(),
                    pid: task.pid,
                    tid: task.tid,
                    wchan: wchan.clone(),
                    stack: kernel_stack.clone(),
                };
                move || waits::resolve(&request)
            })
            .map(|mut chain| {
                chain.kernel_stack_omitted = stack_omitted;
                chain
            });
        found.stuck(StuckTask {
            pid: task.pid,
            tid: task.tid,
            comm: task.comm.to_string(),
            state: 'D',
            wchan,
            kernel_stack,
            seconds_in_d: in_d.as_secs_f64(),
            scope,
            owner,
            wait,
        });
    }
    tracker.end_scan();
    found
}

/// What needs every stuck task's chain: the FUSE daemons behind them and the likely holders
/// of the locks they wait for (one scan-wide job, only when a chain asks for it), and whether
/// their block devices completed requests since the previous scan.
fn trace_waits(
    settings: &Settings,
    stuck: &mut [StuckTask],
    block_ios: &mut HashMap<String, u64>,
    details: &mut Details<'_>,
) {
    let chains = || stuck.iter().filter_map(|t| t.wait.as_ref());
    let request = waits::ScanWideRequest {
        roots: settings.roots(),
        mounts: details.mounts.clone(),
        want_fuse_daemons: chains().any(waits::needs_fuse_daemon),
        lock_mounts: chains()
            .filter_map(waits::lock_mount)
            .map(str::to_string)
            .collect(),
        known_tids: stuck.iter().map(|t| t.tid).collect(),
    };
    let wide = if request.want_fuse_daemons || !request.lock_mounts.is_empty() {
        details
            .run(move || waits::scan_wide(&request))
            .unwrap_or_default()
    } else {
        waits::ScanWide::default()
    };
    let mut chains: Vec<waits::StuckChain> = stuck
        .iter_mut()
        .filter_map(|t| {
            Some(waits::StuckChain {
                pid: t.pid,
                tid: t.tid,
                comm: t.comm.clone(),
                wchan: t.wchan.clone(),
                chain: t.wait.take()?,
            })
        })
        .collect();
    waits::complete(&mut chains, &wide);
    let mut seen = HashMap::new();
    for waits::StuckChain { tid, mut chain, .. } in chains {
        if let Some(device) = chain.block_device.as_mut()
            && let Some(now) = device.completed_ios
        {
            device.progressing = block_ios.get(&device.dev).map(|before| now != *before);
            seen.insert(device.dev.clone(), now);
        }
        if let Some(task) = stuck.iter_mut().find(|t| t.tid == tid) {
            task.wait = Some(chain);
        }
    }
    *block_ios = seen;
}

/// `runc` and `runc:[2:INIT]` processes older than their thresholds, with the fifo evidence.
/// A process at the other end of the same fifo is a partner at any age.
fn stuck_runc(
    settings: &Settings,
    runc: &[RuncProcess],
    details: &mut Details<'_>,
) -> Vec<StuckRuntimeProcess> {
    let Some(uptime) = settings.uptime() else {
        return Vec::new();
    };
    let threshold = |kind| match kind {
        RuntimeKind::RuncInit => settings.config.runc_init_stuck_after,
        _ => settings.config.runc_stuck_after,
    };
    let mut exams: HashMap<i32, Option<Examination>> = HashMap::new();
    let mut stuck = Vec::new();
    for process in runc {
        let age = settings.age(process.starttime, uptime);
        if age < threshold(process.kind).as_secs_f64() {
            continue;
        }
        let exam = examination(settings, process.pid, &mut exams, details);
        if exam.as_ref().is_some_and(|e| e.threads.is_empty()) {
            // Exited since the walk.
            continue;
        }
        let mut exec_fifo = exam.as_ref().and_then(Examination::exec_fifo);
        if let Some(fifo) = exec_fifo.as_mut() {
            fifo.partner_pid = runc
                .iter()
                .filter(|other| other.kind != process.kind)
                .find(|other| {
                    examination(settings, other.pid, &mut exams, details)
                        .is_some_and(|e| e.touches(&fifo.path))
                })
                .map(|other| other.pid);
        }
        let owner = exam
            .as_ref()
            .and_then(|e| e.cgroup.as_deref())
            .map(|text| TaskCgroup::parse(text, &settings.containerd_namespaces).owner)
            .unwrap_or_default();
        stuck.push(StuckRuntimeProcess {
            kind: process.kind,
            pid: process.pid,
            comm: process.comm.to_string(),
            age_seconds: age,
            owner,
            evidence_timed_out: exam.is_none(),
            threads: exam.map(|e| e.threads).unwrap_or_default(),
            exec_fifo,
        });
    }
    stuck
}

/// The examination of `pid`, read at most once per scan.
fn examination(
    settings: &Settings,
    pid: i32,
    exams: &mut HashMap<i32, Option<Examination>>,
    details: &mut Details<'_>,
) -> Option<Examination> {
    exams
        .entry(pid)
        .or_insert_with(|| {
            let proc_root = settings.config.proc_root.clone();
            let exam = details.run(move || examine(&proc_root, pid))?;
            details.errors.detail_errors += exam.read_errors;
            Some(exam)
        })
        .clone()
}

/// Shim processes with a thread stuck in D.
fn stuck_shims(
    settings: &Settings,
    stuck_tasks: &[StuckTask],
    details: &mut Details<'_>,
) -> Vec<StuckRuntimeProcess> {
    let mut by_pid: BTreeMap<i32, Vec<&StuckTask>> = BTreeMap::new();
    for task in stuck_tasks
        .iter()
        .filter(|t| is_shim_comm(t.comm.as_bytes()))
    {
        by_pid.entry(task.pid).or_default().push(task);
    }
    let uptime = settings.uptime();
    let mut shims = Vec::new();
    for (pid, tasks) in by_pid {
        let Some(first) = tasks.first() else {
            continue;
        };
        let leader_stat = settings.config.proc_root.join(pid.to_string()).join("stat");
        let leader = details.text(leader_stat).and_then(|text| {
            let stat = parse_stat(text.as_bytes())?;
            Some((
                String::from_utf8_lossy(stat.comm).into_owned(),
                stat.starttime,
            ))
        });
        let age = match (&leader, uptime) {
            (Some((_, starttime)), Some(uptime)) => settings.age(*starttime, uptime),
            _ => 0.0,
        };
        shims.push(StuckRuntimeProcess {
            kind: RuntimeKind::Shim,
            pid,
            comm: leader.map_or_else(|| first.comm.clone(), |(comm, _)| comm),
            age_seconds: age,
            owner: first.owner.clone(),
            threads: tasks
                .iter()
                .map(|t| ThreadEvidence {
                    tid: t.tid,
                    state: t.state,
                    wchan: t.wchan.clone(),
                    syscall: None,
                    opening: None,
                    seconds_in_d: Some(t.seconds_in_d),
                })
                .collect(),
            exec_fifo: None,
            evidence_timed_out: false,
        });
    }
    shims
}

impl Settings {
    fn roots(&self) -> waits::Roots {
        waits::Roots {
            proc_root: self.config.proc_root.clone(),
            sys_root: self.config.sys_root.clone(),
        }
    }

    /// Seconds since boot, from `<proc_root>/uptime` (a read that never blocks).
    fn uptime(&self) -> Option<f64> {
        let text = read_text(&self.config.proc_root.join("uptime")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }

    /// Seconds since a task with this `starttime` started.
    fn age(&self, starttime: u64, uptime: f64) -> f64 {
        if self.ticks_per_second == 0 {
            return 0.0;
        }
        (uptime - starttime as f64 / self.ticks_per_second as f64).max(0.0)
    }
}

/// Detail reads of one scan, behind the deadline, with their failures counted.
struct Details<'a> {
    runner: &'a mut DeadlineRunner,
    errors: &'a mut ScanErrors,
    /// Mount tables read by this scan's wait chains.
    mounts: waits::MountTables,
}

impl Details<'_> {
    fn run<T: Send + 'static>(&mut self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        match self.runner.run(job) {
            Ok(value) => Some(value),
            Err(NotRun::TimedOut) => {
                self.errors.detail_timeouts += 1;
                None
            }
            Err(NotRun::Skipped) => {
                self.errors.detail_skipped += 1;
                None
            }
            Err(NotRun::Failed) => {
                self.errors.detail_errors += 1;
                None
            }
        }
    }

    fn text(&mut self, path: PathBuf) -> Option<String> {
        match self.run(move || read_text(&path))? {
            Ok(text) => Some(text),
            Err(e) => {
                if !is_vanished(&e) {
                    self.errors.detail_errors += 1;
                }
                None
            }
        }
    }

    /// A file's text, or why it is not there: for files whose absence the report explains.
    fn text_or_reason(&mut self, path: PathBuf) -> Result<String, String> {
        match self.runner.run(move || read_text(&path)) {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(match e.raw_os_error() {
                Some(nix::libc::EACCES | nix::libc::EPERM) => {
                    "permission denied (needs CAP_SYS_ADMIN)".to_string()
                }
                Some(nix::libc::ENOENT) => "not provided by this kernel or gone".to_string(),
                _ => format!("unreadable: {e}"),
            }),
            Err(NotRun::TimedOut) => {
                self.errors.detail_timeouts += 1;
                Err("read timed out".into())
            }
            Err(NotRun::Skipped) => {
                self.errors.detail_skipped += 1;
                Err("not read: readers blocked".into())
            }
            Err(NotRun::Failed) => {
                self.errors.detail_errors += 1;
                Err("read failed".into())
            }
        }
    }

    /// In a v1 freezer cgroup that is FROZEN or FREEZING, or a v2 cgroup with `frozen 1`.
    fn frozen(
        &mut self,
        cgroup: &TaskCgroup,
        layout: &CgroupLayout,
        cache: &mut FrozenCache,
    ) -> bool {
        let v1 = cgroup
            .freezer
            .as_deref()
            .and_then(|path| layout.freezer_state_file(path));
        let v2 = cgroup
            .unified
            .as_deref()
            .and_then(|path| layout.events_file(path));
        v1.is_some_and(|file| {
            cache.get_or_read(file, |f| self.text(f.to_path_buf()).map(|t| v1_frozen(&t)))
        }) || v2.is_some_and(|file| {
            cache.get_or_read(file, |f| self.text(f.to_path_buf()).map(|t| v2_frozen(&t)))
        })
    }
}

/// What the D tasks of one scan add up to.
#[derive(Default)]
struct Found {
    dstate: ScopeCounts,
    not_stuck: u64,
    stuck_tasks: Vec<StuckTask>,
    containers: BTreeMap<String, ContainerDState>,
    frozen: FrozenTasks,
    frozen_by_container: BTreeMap<String, FrozenContainer>,
    kill_pending: Vec<KillPendingTask>,
    /// `status` files read this scan, against `MAX_KILL_PENDING_READS`.
    status_reads: usize,
    status_unread: u64,
}

impl Found {
    fn frozen(&mut self, owner: Option<&CgroupOwner>) {
        self.frozen.tasks += 1;
        if let Some(owner) = owner
            && let Some(id) = &owner.container_id
        {
            self.frozen_by_container
                .entry(id.clone())
                .or_insert_with(|| FrozenContainer {
                    owner: owner.clone(),
                    tasks: 0,
                })
                .tasks += 1;
        }
    }

    fn not_stuck(&mut self, scope: Scope, owner: &CgroupOwner, in_d: Duration) {
        self.not_stuck += 1;
        self.count(scope, owner, in_d, false);
    }

    fn stuck(&mut self, task: StuckTask) {
        let in_d = Duration::from_secs_f64(task.seconds_in_d);
        self.count(task.scope, &task.owner, in_d, true);
        self.stuck_tasks.push(task);
    }

    fn count(&mut self, scope: Scope, owner: &CgroupOwner, in_d: Duration, stuck: bool) {
        self.dstate.add(scope);
        let Some(id) = &owner.container_id else {
            return;
        };
        let container = self
            .containers
            .entry(id.clone())
            .or_insert_with(|| ContainerDState {
                owner: owner.clone(),
                dstate_tasks: 0,
                stuck_tasks: 0,
                max_seconds_in_d: 0.0,
            });
        container.dstate_tasks += 1;
        container.stuck_tasks += u64::from(stuck);
        container.max_seconds_in_d = container.max_seconds_in_d.max(in_d.as_secs_f64());
    }

    fn into_report(
        mut self,
        counts: WalkCounts,
        walk_seconds: f64,
        duration_seconds: f64,
        runtime_processes: Vec<StuckRuntimeProcess>,
        errors: ScanErrors,
    ) -> ScanReport {
        self.frozen.by_container = self.frozen_by_container.into_values().collect();
        ScanReport {
            finished_at: std::time::SystemTime::now(),
            duration_seconds,
            walk_seconds,
            tasks_scanned: counts.tasks,
            processes_scanned: counts.processes,
            dstate: self.dstate,
            dstate_not_stuck: self.not_stuck,
            stuck_tasks: self.stuck_tasks,
            containers: self
                .containers
                .into_values()
                .filter(|c| c.stuck_tasks > 0)
                .collect(),
            frozen: self.frozen,
            runtime_processes,
            kill_pending: self.kill_pending,
            kill_pending_unread: self.status_unread,
            errors,
        }
    }
}

/// `runtime` for the runtime's own processes, else `container` when attributed, else `host`.
pub fn scope_of(comm: &[u8], owner: &CgroupOwner) -> Scope {
    if is_runtime_comm(comm) {
        Scope::Runtime
    } else if owner.is_container() {
        Scope::Container
    } else {
        Scope::Host
    }
}

/// `[<0>] kernel_clone+0x1af/0x3e0` lines to `kernel_clone+0x1af/0x3e0`.
fn parse_kernel_stack(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| match line.split_once("] ") {
            Some((_, frame)) if line.starts_with("[<") => frame,
            _ => line,
        })
        .map(str::trim)
        .filter(|frame| !frame.is_empty())
        .map(str::to_string)
        .collect()
}

fn task_file(proc_root: &Path, task: &DTask, file: &str) -> PathBuf {
    proc_root
        .join(task.pid.to_string())
        .join("task")
        .join(task.tid.to_string())
        .join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "a5498f937a723171a08c21118d0f0a5449af0fedb0873f4d6b1169dac452f4fc";

    #[test]
    fn scope_prefers_runtime_then_container_then_host() {
        let container = CgroupOwner {
            container_id: Some(ID.into()),
            ..CgroupOwner::default()
        };
        let host = CgroupOwner::default();
        assert_eq!(scope_of(b"containerd-shim", &container), Scope::Runtime);
        assert_eq!(scope_of(b"runc:[2:INIT]", &container), Scope::Runtime);
        assert_eq!(scope_of(b"dockerd", &host), Scope::Runtime);
        assert_eq!(scope_of(b"postgres", &container), Scope::Container);
        assert_eq!(scope_of(b"postgres", &host), Scope::Host);
        // A pod without a container (the pod-level cgroup) is not a container.
        let pod_only = CgroupOwner {
            pod_uid: Some("0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b".into()),
            ..CgroupOwner::default()
        };
        assert_eq!(scope_of(b"pause", &pod_only), Scope::Host);
    }

    #[test]
    fn kernel_stack_frames() {
        let text = "[<0>] kernel_clone+0x1af/0x3e0\n[<0>] __do_sys_vfork+0x43/0x70\n\n";
        assert_eq!(
            parse_kernel_stack(text),
            ["kernel_clone+0x1af/0x3e0", "__do_sys_vfork+0x43/0x70"]
        );
        assert!(parse_kernel_stack("").is_empty());
    }

    #[test]
    fn container_aggregates_only_for_containers_with_stuck_tasks() {
        let owner = |id: &str| CgroupOwner {
            container_id: Some(id.into()),
            ..CgroupOwner::default()
        };
        let mut found = Found::default();
        found.not_stuck(Scope::Container, &owner("a"), Duration::from_secs(3));
        found.not_stuck(Scope::Container, &owner("b"), Duration::from_secs(3));
        found.stuck(StuckTask {
            pid: 2,
            tid: 2,
            comm: "app".into(),
            state: 'D',
            wchan: None,
            kernel_stack: None,
            seconds_in_d: 40.0,
            scope: Scope::Container,
            owner: owner("a"),
            wait: None,
        });
        found.frozen(Some(&owner("c")));
        found.frozen(None);
        let report = found.into_report(
            WalkCounts::default(),
            0.0,
            0.0,
            Vec::new(),
            ScanErrors::default(),
        );
        assert_eq!(report.containers.len(), 1);
        let a = &report.containers[0];
        assert_eq!(a.owner.container_id.as_deref(), Some("a"));
        assert_eq!((a.dstate_tasks, a.stuck_tasks), (2, 1));
        assert_eq!(a.max_seconds_in_d, 40.0);
        assert_eq!(report.dstate.container, 3);
        assert_eq!(report.dstate_not_stuck, 2);
        assert_eq!(report.frozen.tasks, 2);
        assert_eq!(report.frozen.by_container.len(), 1);
    }
}
