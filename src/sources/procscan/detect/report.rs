//! What one scan found: the contract with the engine, which turns it into metrics and
//! incident evidence.

use std::time::SystemTime;

use serde::Serialize;

pub use crate::domain::{RuntimeKind, Scope};

use super::waits::WaitChain;
use crate::attribution::CgroupOwner;

/// Counts of D tasks (frozen ones excluded) per scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScopeCounts {
    pub runtime: u64,
    pub container: u64,
    pub host: u64,
}

impl ScopeCounts {
    pub fn get(&self, scope: Scope) -> u64 {
        match scope {
            Scope::Runtime => self.runtime,
            Scope::Container => self.container,
            Scope::Host => self.host,
        }
    }

    pub(super) fn add(&mut self, scope: Scope) {
        match scope {
            Scope::Runtime => self.runtime += 1,
            Scope::Container => self.container += 1,
            Scope::Host => self.host += 1,
        }
    }
}

/// A task continuously in D for at least `stuck_after`, not frozen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckTask {
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    /// `D`: the state the walk saw.
    pub state: char,
    /// Kernel function it sleeps in; None when unreadable or not sleeping.
    pub wchan: Option<String>,
    /// Kernel stack frames (`kernel_clone+0x1af/0x3e0`, innermost first); None when the
    /// file is missing or unreadable (it needs root).
    pub kernel_stack: Option<Vec<String>>,
    /// Since the first scan that saw it in D.
    pub seconds_in_d: f64,
    pub scope: Scope,
    pub owner: CgroupOwner,
    /// What it waits on; None when the chain could not be read in time.
    pub wait: Option<WaitChain>,
}

/// A container task in D or frozen with SIGKILL pending: a kill that cannot land. Read from
/// `status` for the container's D tasks only, never in the hot walk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KillPendingTask {
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    /// In a frozen cgroup (else in D).
    pub frozen: bool,
    /// Kernel function it sleeps in; None when unreadable.
    pub wchan: Option<String>,
    /// Since the first scan that saw SIGKILL pending on it.
    pub seconds_pending: f64,
    pub seconds_in_d: f64,
    pub owner: CgroupOwner,
}

/// D tasks of one container that has at least one stuck task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ContainerDState {
    pub owner: CgroupOwner,
    /// All its D tasks that are not frozen, stuck or not yet.
    pub dstate_tasks: u64,
    pub stuck_tasks: u64,
    pub max_seconds_in_d: f64,
}

/// D tasks in a frozen cgroup (a paused container): expected, never stuck.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FrozenTasks {
    pub tasks: u64,
    /// Per container, for the attributed ones.
    pub by_container: Vec<FrozenContainer>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrozenContainer {
    pub owner: CgroupOwner,
    pub tasks: u64,
}

/// A runtime process that is wedged, with what /proc shows about why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StuckRuntimeProcess {
    pub kind: RuntimeKind,
    pub pid: i32,
    pub comm: String,
    /// Since the process started.
    pub age_seconds: f64,
    pub owner: CgroupOwner,
    /// runc kinds: every thread; shim: its stuck threads.
    pub threads: Vec<ThreadEvidence>,
    /// The `exec.fifo` it holds or is blocked opening.
    pub exec_fifo: Option<ExecFifo>,
    /// The evidence could not be read in time (the process is still reported).
    pub evidence_timed_out: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThreadEvidence {
    pub tid: i32,
    pub state: char,
    pub wchan: Option<String>,
    /// System call number it is in (`syscall` file); None when running, not in a system
    /// call, or unreadable.
    pub syscall: Option<u64>,
    /// The file it is blocked opening (a sleeping thread inside `openat`).
    pub opening: Option<BlockedOpen>,
    /// Shim threads: how long it has been in D.
    pub seconds_in_d: Option<f64>,
}

/// An `openat` that has not returned. The process has no descriptor yet: the path comes from
/// the system call's arguments, read from the process's memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockedOpen {
    /// Absolute path, `/proc/self/fd/N` and relative paths resolved; None when unreadable.
    pub path: Option<String>,
    pub direction: Direction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Read,
    Write,
    ReadWrite,
}

/// runc's `exec.fifo`: `runc start` opens it for reading, `runc:[2:INIT]` for writing; each
/// blocks until the other arrives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecFifo {
    pub path: String,
    /// runc's state directory names the container: `<root>/<id>/exec.fifo`.
    pub container_id: Option<String>,
    /// The process holds it as a descriptor (`runc:[2:INIT]` holds an `O_PATH` one).
    pub held: bool,
    /// The process is blocked opening it, in this direction.
    pub blocked_opening: Option<Direction>,
    /// The live process at the other end: a `runc:[2:INIT]` holding the fifo for a `runc`,
    /// a `runc` holding or opening it for a `runc:[2:INIT]`. None while blocked: nobody will
    /// ever open the other end, the exec.fifo hang.
    pub partner_pid: Option<i32>,
}

impl ExecFifo {
    /// Blocked opening a fifo whose other end has no live process.
    pub fn is_orphaned_wait(&self) -> bool {
        self.blocked_opening.is_some() && self.partner_pid.is_none()
    }
}

/// Things that went wrong, counted. A task vanishing mid-scan is not one of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ScanErrors {
    /// The proc root itself could not be listed: the scan saw nothing.
    pub proc_unreadable: bool,
    /// Reads of directories or `stat` in the walk that failed for another reason.
    pub walk_read_errors: u64,
    /// `stat` files that did not parse.
    pub malformed_stat: u64,
    /// Detail reads (wchan, stack, cgroup, freezer, evidence) that missed `read_deadline`.
    pub detail_timeouts: u64,
    /// Detail reads not attempted: too many reader threads blocked, or too many timeouts in
    /// this scan.
    pub detail_skipped: u64,
    /// Detail reads that failed for another reason.
    pub detail_errors: u64,
    /// Reader threads still blocked in a read that missed its deadline.
    pub abandoned_readers: u64,
}

impl ScanErrors {
    pub fn total(&self) -> u64 {
        u64::from(self.proc_unreadable)
            + self.walk_read_errors
            + self.malformed_stat
            + self.detail_timeouts
            + self.detail_skipped
            + self.detail_errors
    }
}

/// The result of one scan, sent as `Signal::ProcScan`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScanReport {
    pub finished_at: SystemTime,
    /// Whole scan: walk plus detail reads. `hangwatch_proc_scan_duration_seconds`.
    pub duration_seconds: f64,
    /// The walk over every task's `stat` alone.
    pub walk_seconds: f64,
    /// `hangwatch_proc_scan_tasks`.
    pub tasks_scanned: u64,
    pub processes_scanned: u64,
    /// D tasks not frozen, stuck or not yet, per scope. `hangwatch_dstate_tasks{scope}`.
    pub dstate: ScopeCounts,
    /// D tasks not frozen and not yet stuck.
    pub dstate_not_stuck: u64,
    pub stuck_tasks: Vec<StuckTask>,
    /// `hangwatch_container_dstate_tasks`, `hangwatch_container_dstate_max_seconds`.
    pub containers: Vec<ContainerDState>,
    /// `hangwatch_frozen_tasks`.
    pub frozen: FrozenTasks,
    /// `hangwatch_stuck_runtime_processes{kind}`.
    pub runtime_processes: Vec<StuckRuntimeProcess>,
    /// Container tasks in D or frozen with SIGKILL pending, at most `MAX_KILL_PENDING_READS`
    /// read per scan.
    pub kill_pending: Vec<KillPendingTask>,
    /// Container D tasks whose `status` was not read this scan (beyond the per-scan bound):
    /// while some are, a kill no longer seen pending may still be.
    pub kill_pending_unread: u64,
    pub errors: ScanErrors,
}

impl ScanReport {
    /// Stuck runtime processes of one kind, for the per-kind gauge.
    pub fn runtime_count(&self, kind: RuntimeKind) -> u64 {
        self.runtime_processes
            .iter()
            .filter(|p| p.kind == kind)
            .count() as u64
    }
}
