//! Domain values shared by every layer: the runtimes hangwatch watches, whose tasks are
//! stuck (scope), who the OOM killer took and why, which runtime process is stuck.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A container runtime hangwatch probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Docker,
    Containerd,
    /// The CRI socket kubelet talks to (containerd's CRI plugin, CRI-O, cri-dockerd).
    Cri,
}

impl Runtime {
    pub const ALL: [Runtime; 3] = [Runtime::Docker, Runtime::Containerd, Runtime::Cri];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
            Runtime::Cri => "cri",
        }
    }

    /// The daemon serving the runtime's socket, as named in `daemon` labels and dumps.
    pub fn daemon_name(self) -> &'static str {
        match self {
            Runtime::Docker => "dockerd",
            Runtime::Containerd => "containerd",
            // Whichever daemon serves the CRI socket; dumps of containerd's are asked as containerd.
            Runtime::Cri => "cri",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who the OOM killer killed. The variants are the `victim` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OomVictim {
    /// `runc:[2:INIT]`: its death mid-start is what wedges runc, the shim, containerd and dockerd.
    RuncInit,
    /// dockerd, containerd, a shim, runc, kubelet.
    Runtime,
    /// A process in a container's memory cgroup.
    Container,
    Host,
}

impl OomVictim {
    pub const ALL: [OomVictim; 4] = [
        OomVictim::RuncInit,
        OomVictim::Runtime,
        OomVictim::Container,
        OomVictim::Host,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OomVictim::RuncInit => "runc_init",
            OomVictim::Runtime => "runtime",
            OomVictim::Container => "container",
            OomVictim::Host => "host",
        }
    }
}

/// The `constraint` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OomConstraint {
    /// A memory cgroup's limit was hit.
    Memcg,
    /// The node (or a cpuset/mempolicy) ran out of memory.
    Global,
    /// The lines saying which were lost (overwritten before they were read).
    Unknown,
}

impl OomConstraint {
    pub fn as_str(self) -> &'static str {
        match self {
            OomConstraint::Memcg => "memcg",
            OomConstraint::Global => "global",
            OomConstraint::Unknown => "unknown",
        }
    }
}

/// Who a D task belongs to. The `scope` label of `hangwatch_dstate_tasks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// dockerd, containerd, a shim, runc or kubelet itself.
    Runtime,
    /// A task in a container's cgroup.
    Container,
    /// Anything else.
    Host,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Runtime, Scope::Container, Scope::Host];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Runtime => "runtime",
            Scope::Container => "container",
            Scope::Host => "host",
        }
    }
}

/// Kinds of stuck runtime process. The `kind` label of `hangwatch_stuck_runtime_processes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// A `runc` older than `runc_stuck_after` (the parent of an OOM-killed `runc:[2:INIT]`, blocked on `exec.fifo`).
    Runc,
    /// A `runc:[2:INIT]` older than `runc_init_stuck_after`: waiting for a start that never came.
    RuncInit,
    /// A containerd shim with a thread stuck in D.
    Shim,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Runc, RuntimeKind::RuncInit, RuntimeKind::Shim];

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Runc => "runc",
            RuntimeKind::RuncInit => "runc_init",
            RuntimeKind::Shim => "shim",
        }
    }
}

/// Serde for fields that name the daemon rather than the runtime (`"dockerd"`), as incident
/// files and `/incidents` have always spelled them.
pub mod as_daemon {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::Runtime;

    pub fn serialize<S: Serializer>(runtime: &Runtime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(runtime.daemon_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Runtime, D::Error> {
        let name = String::deserialize(d)?;
        Runtime::ALL
            .into_iter()
            .find(|r| r.daemon_name() == name)
            .ok_or_else(|| {
                serde::de::Error::unknown_variant(&name, &["dockerd", "containerd", "cri"])
            })
    }
}

/// What a stuck task waits on, from /proc and /sys: a small stable set, a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitClass {
    /// I/O to a block device that does not complete.
    BlockIo,
    /// A filesystem server that does not answer: a FUSE daemon, an NFS or CIFS server.
    FsServer,
    /// A kernel lock (an inode's rwsem, a mutex) held by another task.
    Lock,
    /// The freezer (a task frozen outside a frozen cgroup the scan knows).
    Freezer,
    /// A pipe or fifo (runc's exec.fifo) with nobody at the other end.
    RuntimePipe,
    /// Memory reclaim or allocation.
    MemoryReclaim,
    Unknown,
}

impl WaitClass {
    pub const ALL: [WaitClass; 7] = [
        WaitClass::BlockIo,
        WaitClass::FsServer,
        WaitClass::Lock,
        WaitClass::Freezer,
        WaitClass::RuntimePipe,
        WaitClass::MemoryReclaim,
        WaitClass::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WaitClass::BlockIo => "block_io",
            WaitClass::FsServer => "fs_server",
            WaitClass::Lock => "lock",
            WaitClass::Freezer => "freezer",
            WaitClass::RuntimePipe => "runtime_pipe",
            WaitClass::MemoryReclaim => "memory_reclaim",
            WaitClass::Unknown => "unknown",
        }
    }

    /// How a suspected cause says it: "blocked ... on block I/O".
    pub fn describe(self) -> &'static str {
        match self {
            WaitClass::BlockIo => "block I/O",
            WaitClass::FsServer => "a filesystem server",
            WaitClass::Lock => "a kernel lock",
            WaitClass::Freezer => "the freezer",
            WaitClass::RuntimePipe => "a pipe",
            WaitClass::MemoryReclaim => "memory reclaim",
            WaitClass::Unknown => "an unknown wait",
        }
    }
}
