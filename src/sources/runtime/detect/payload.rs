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
    /// CRI `Status`: kubelet's runtime health check every 5 s (down after 30 s without one).
    Status,
    /// CRI `ListPodSandbox`: the first half of kubelet's PLEG relist.
    ListPodSandbox,
    /// CRI `PodSandboxStatus`/`ContainerStatus` of the next pod or container in rotation: the
    /// per-pod calls of a relist, one at a time, so the one whose call hangs is named.
    StatusSample,
}

impl Operation {
    /// The `operation` label value.
    pub fn label(&self) -> String {
        match self {
            Operation::Ping => "ping".into(),
            Operation::ListContainers => "list_containers".into(),
            Operation::Version => "version".into(),
            Operation::ListTasks { namespace } => format!("list_tasks:{namespace}"),
            Operation::Status => "status".into(),
            Operation::ListPodSandbox => "list_pod_sandbox".into(),
            Operation::StatusSample => "status_sample".into(),
        }
    }

    /// Liveness operations answer without touching container state; a runtime whose liveness
    /// answers while another operation is stuck is *wedged*, not *hung*.
    pub fn is_liveness(&self) -> bool {
        matches!(
            self,
            Operation::Ping | Operation::Version | Operation::Status
        )
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
    /// The socket answers, but not the API asked for (containerd without its CRI plugin).
    NotServed,
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
            ProbeFailure::Unreachable(Unreachable::NotServed) => {
                f.write_str("the socket does not serve this API")
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
        /// The pod or container a status call is about.
        subject: Option<StatusSubject>,
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
    /// containerd's `Tasks.List` answered with tasks whose shim did not answer its state call.
    UnknownTasks {
        namespace: String,
        tasks: Vec<UnknownTask>,
    },
}

/// What a CRI status call is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectKind {
    PodSandbox,
    Container,
}

/// The pod or container a CRI status call asks about, named from the last CRI lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusSubject {
    pub kind: SubjectKind,
    /// The sandbox or container id.
    pub id: String,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// The container's name in its pod (None for a sandbox).
    pub container: Option<String>,
}

impl fmt::Display for StatusSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pod = format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or("?"),
            self.pod.as_deref().unwrap_or("?")
        );
        match (self.kind, &self.container) {
            (SubjectKind::Container, Some(name)) => {
                write!(f, "container {name} ({}) of pod {pod}", short_id(&self.id))
            }
            (SubjectKind::Container, None) => write!(f, "container {}", short_id(&self.id)),
            (SubjectKind::PodSandbox, _) => write!(f, "pod {pod} (sandbox {})", short_id(&self.id)),
        }
    }
}

/// The first 12 characters of an id, as `docker ps` and `crictl ps` show it.
pub fn short_id(id: &str) -> &str {
    id.char_indices().nth(12).map_or(id, |(end, _)| &id[..end])
}

/// A task containerd listed as UNKNOWN (its shim did not answer), with its shim as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownTask {
    pub container_id: String,
    /// The shim serving the task, found by its `-id` argument in /proc; None when not found.
    pub shim_pid: Option<i32>,
    /// The shim's state letter (`T` stopped, `D` uninterruptible, ...).
    pub shim_state: Option<char>,
    pub shim_wchan: Option<String>,
}
