//! The typed signals detectors send to the engine: the only way information enters the state.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::actions::dumps::DumpEvent;
use crate::containers::ContainerInfo;
use crate::detectors::kernel::{KernelEvent, KernelLogCounters, LogSource};
use crate::detectors::lifecycle::ContainerEvent;
use crate::detectors::procscan::ScanReport;

/// A container runtime hangwatch probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Docker,
    Containerd,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::Docker, Runtime::Containerd];

    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One kind of probe call. At most one of each kind is in flight per runtime.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Operation {
    /// Docker `GET /_ping`: answers even when container locks are stuck.
    Ping,
    /// Docker `GET /containers/json`: what `docker ps` and kubelet do.
    ListContainers,
    /// containerd `Version`: the cheapest call, takes no locks.
    Version,
    /// containerd `Tasks.List` in one namespace.
    ListTasks { namespace: String },
}

impl Operation {
    /// The `operation` label value.
    pub fn label(&self) -> String {
        match self {
            Operation::Ping => "ping".into(),
            Operation::ListContainers => "list_containers".into(),
            Operation::Version => "version".into(),
            Operation::ListTasks { namespace } => format!("list_tasks:{namespace}"),
        }
    }

    /// Liveness operations answer without touching container state; a runtime whose liveness
    /// answers while another operation is stuck is *wedged*, not *hung*.
    pub fn is_liveness(&self) -> bool {
        matches!(self, Operation::Ping | Operation::Version)
    }
}

/// Why a probe did not succeed. The variants are the `reason` label values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason", content = "detail")]
pub enum ProbeFailure {
    /// No answer before the hard deadline.
    Timeout,
    /// Connected, but the answer was an error or not a valid reply.
    Error(String),
    /// Could not connect: socket missing, refused, permission denied.
    Unreachable(Unreachable),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unreachable {
    SocketMissing,
    Refused,
    PermissionDenied,
    Other(String),
}

impl ProbeFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeFailure::Timeout => "timeout",
            ProbeFailure::Error(_) => "error",
            ProbeFailure::Unreachable(_) => "unreachable",
        }
    }
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Timeout => f.write_str("timed out"),
            ProbeFailure::Error(e) => write!(f, "error: {e}"),
            ProbeFailure::Unreachable(Unreachable::SocketMissing) => f.write_str("socket missing"),
            ProbeFailure::Unreachable(Unreachable::Refused) => f.write_str("connection refused"),
            ProbeFailure::Unreachable(Unreachable::PermissionDenied) => {
                f.write_str("permission denied on socket")
            }
            ProbeFailure::Unreachable(Unreachable::Other(e)) => write!(f, "unreachable: {e}"),
        }
    }
}

/// Everything a detector can tell the engine.
#[derive(Debug)]
pub enum Signal {
    /// A probe call began. `id` pairs it with its `ProbeFinished`.
    ProbeStarted {
        runtime: Runtime,
        operation: Operation,
        id: u64,
        at: Instant,
    },
    /// A probe call ended, successfully or not.
    ProbeFinished {
        runtime: Runtime,
        operation: Operation,
        id: u64,
        started: Instant,
        finished: Instant,
        result: Result<(), ProbeFailure>,
    },
    /// Containers a runtime listed: names, images, pods for container ids.
    ContainersSeen(Vec<ContainerInfo>),
    /// Progress of a goroutine dump the engine asked for.
    Dump(DumpEvent),
    /// A kernel log record matched a rule.
    Kernel(Box<KernelEvent>),
    /// Kernel log counter increments since the previous one of these (at most one per second).
    KernelLogCounters(KernelLogCounters),
    /// The kernel log is open and being read, through `source`.
    KernelLogUp { path: PathBuf, source: LogSource },
    /// The kernel log cannot be read. `retry_in`: when the next attempt is made; None when
    /// none will be (the rules do not compile).
    KernelLogDown {
        path: PathBuf,
        error: String,
        retry_in: Option<Duration>,
    },
    /// The result of one /proc scan: D-state tasks, frozen tasks, stuck runtime processes.
    ProcScan(Box<ScanReport>),
    /// A container event from a runtime's event stream, each event once (replays after a
    /// reconnection are dropped by the detector).
    ContainerEvent(Box<ContainerEvent>),
    /// The runtime's event stream is open; `reconnected` after it had broken.
    EventStreamUp { runtime: Runtime, reconnected: bool },
    /// The event stream could not be opened or ended; the next attempt is in `retry_in`.
    EventStreamDown {
        runtime: Runtime,
        error: String,
        retry_in: Duration,
    },
    /// A line of the event stream that is not a usable event (logged by the detector).
    EventMalformed { runtime: Runtime, reason: String },
}

/// The sending half detectors hold. Sending never blocks a detector for long: the channel is
/// bounded and the engine drains it continuously; a closed channel means shutdown.
#[derive(Debug, Clone)]
pub struct SignalSender {
    inner: mpsc::Sender<Signal>,
}

pub type SignalReceiver = mpsc::Receiver<Signal>;

/// Capacity of the signal channel: large enough for a burst of kernel messages.
pub const SIGNAL_CHANNEL_CAPACITY: usize = 4096;

pub fn channel() -> (SignalSender, SignalReceiver) {
    let (tx, rx) = mpsc::channel(SIGNAL_CHANNEL_CAPACITY);
    (SignalSender { inner: tx }, rx)
}

impl SignalSender {
    /// Deliver a signal; returns false when the engine is gone (shutting down).
    pub async fn send(&self, signal: Signal) -> bool {
        self.inner.send(signal).await.is_ok()
    }
}

/// Wall-clock time for records shown to humans; `Instant` is used for all arithmetic.
pub fn now_wall() -> SystemTime {
    SystemTime::now()
}
