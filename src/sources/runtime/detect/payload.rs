//! What the probe scheduler reports: one kind of call, its start and its end.

use std::fmt;
use std::time::Instant;

use serde::Serialize;

use crate::domain::Runtime;

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

/// The probe scheduler's signals to the runtime source's state.
#[derive(Debug)]
pub enum ProbeSignal {
    /// A probe call began. `id` pairs it with its `Finished`.
    Started {
        runtime: Runtime,
        operation: Operation,
        id: u64,
        at: Instant,
    },
    /// A probe call ended, successfully or not.
    Finished {
        runtime: Runtime,
        operation: Operation,
        id: u64,
        started: Instant,
        finished: Instant,
        result: Result<(), ProbeFailure>,
    },
}
