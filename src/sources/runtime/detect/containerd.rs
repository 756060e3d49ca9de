//! containerd probes through containerd-client (gRPC over the unix socket): `Version`, and
//! `Tasks.List` in each configured namespace.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{GetContainerRequest, ListTasksRequest};
use containerd_client::tonic::metadata::MetadataValue;
use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::v1::Status as TaskStatus;
use hyper_util::rt::TokioIo;

use super::{
    ProbeAnswer, ProbeCall, RuntimeClient, StatusSubject, classify_error, shims, socket_present,
};
use crate::config::ContainerdConfig;
use crate::containers::{ContainerInfo, LABEL_CONTAINER_NAME};
use crate::domain::Runtime;
use crate::sources::runtime::detect::{Operation, ProbeFailure};

pub fn operations(namespaces: &[String]) -> Vec<Operation> {
    let mut all = vec![Operation::Version];
    all.extend(namespaces.iter().map(|namespace| Operation::ListTasks {
        namespace: namespace.clone(),
    }));
    all
}

#[derive(Clone)]
pub struct ContainerdClient {
    socket: PathBuf,
    namespaces: Vec<String>,
    /// Where the shims of UNKNOWN tasks are looked up.
    proc_root: PathBuf,
    deadline: Duration,
    /// Made on first use: tonic spawns its connection task when the channel is built, which
    /// needs the async runtime. It connects lazily and reconnects by itself.
    channel: Arc<OnceLock<Channel>>,
}

impl ContainerdClient {
    pub fn new(
        config: &ContainerdConfig,
        proc_root: &Path,
        deadline: Duration,
    ) -> ContainerdClient {
        ContainerdClient {
            socket: config.socket.clone(),
            namespaces: config.namespaces.clone(),
            proc_root: proc_root.to_path_buf(),
            deadline,
            channel: Arc::default(),
        }
    }

    /// The channel; call from within the async runtime.
    fn channel(&self) -> Channel {
        self.channel
            .get_or_init(|| {
                let path = self.socket.clone();
                // The URI is required by tonic but unused: the connector dials the unix socket.
                Endpoint::from_static("http://containerd.sock")
                    .connect_timeout(self.deadline)
                    .timeout(self.deadline)
                    .connect_with_connector_lazy(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            tokio::net::UnixStream::connect(path)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
            })
            .clone()
    }
}

impl ContainerdClient {
    /// Labels and image of one container, looked up in each configured namespace. The
    /// caller bounds it with a deadline.
    pub async fn container(&self, id: &str) -> Result<ContainerInfo, ProbeFailure> {
        socket_present(&self.socket)?;
        let mut last = ProbeFailure::Error(format!("container {id} not found"));
        for namespace in &self.namespaces {
            let request = namespaced(GetContainerRequest { id: id.to_string() }, namespace)?;
            match ContainersClient::new(self.channel()).get(request).await {
                Ok(response) => {
                    if let Some(c) = response.into_inner().container {
                        let name = c.labels.get(LABEL_CONTAINER_NAME).cloned();
                        return Ok(ContainerInfo::from_labels(
                            &c.id,
                            name.as_deref(),
                            Some(&c.image),
                            Some(&c.labels),
                        ));
                    }
                }
                Err(status) if status.code() == Code::NotFound => {}
                Err(status) => last = failure(&status),
            }
        }
        Err(last)
    }
}

/// A request carrying the containerd namespace it applies to.
fn namespaced<T>(message: T, namespace: &str) -> Result<Request<T>, ProbeFailure> {
    let mut request = Request::new(message);
    let value = MetadataValue::try_from(namespace)
        .map_err(|_| ProbeFailure::Error(format!("invalid namespace {namespace:?}")))?;
    request.metadata_mut().insert("containerd-namespace", value);
    Ok(request)
}

pub(super) fn failure(status: &Status) -> ProbeFailure {
    match status.code() {
        Code::DeadlineExceeded => ProbeFailure::Timeout,
        Code::Unavailable | Code::Unknown => match classify_error(status) {
            ProbeFailure::Error(_) => {
                ProbeFailure::Error(format!("{:?}: {}", status.code(), status.message()))
            }
            other => other,
        },
        code => ProbeFailure::Error(format!("{code:?}: {}", status.message())),
    }
}

impl RuntimeClient for ContainerdClient {
    fn runtime(&self) -> Runtime {
        Runtime::Containerd
    }

    fn operations(&self) -> Vec<Operation> {
        operations(&self.namespaces)
    }

    fn call(&self, operation: &Operation, _subject: Option<&StatusSubject>) -> ProbeCall {
        let client = self.clone();
        let socket = self.socket.clone();
        let operation = operation.clone();
        Box::pin(async move {
            let channel = client.channel();
            // Checked up front: tonic reports a missing socket only as a transport error.
            socket_present(&socket)?;
            match operation {
                Operation::Version => VersionClient::new(channel)
                    .version(())
                    .await
                    .map(|_| ProbeAnswer::default())
                    .map_err(|s| failure(&s)),
                Operation::ListTasks { namespace } => {
                    let request = namespaced(ListTasksRequest::default(), &namespace)?;
                    let tasks = TasksClient::new(channel)
                        .list(request)
                        .await
                        .map_err(|s| failure(&s))?
                        .into_inner()
                        .tasks;
                    // UNKNOWN: containerd asked the task's shim for its state and got no answer.
                    let unknown: Vec<String> = tasks
                        .into_iter()
                        .filter(|t| t.status == TaskStatus::Unknown as i32)
                        // `id` is the task's, which is its container's; `container_id`
                        // is left empty by containerd 1.6 here.
                        .map(|t| {
                            if t.container_id.is_empty() {
                                t.id
                            } else {
                                t.container_id
                            }
                        })
                        .filter(|id| !id.is_empty())
                        .collect();
                    let described = if unknown.is_empty() {
                        Vec::new()
                    } else {
                        let proc_root = client.proc_root.clone();
                        // The caller's deadline bounds this; an abandoned walk only reads /proc.
                        tokio::task::spawn_blocking(move || shims::describe(&proc_root, &unknown))
                            .await
                            .map_err(|e| ProbeFailure::Error(format!("shim lookup failed: {e}")))?
                    };
                    Ok(ProbeAnswer {
                        unknown_tasks: Some((namespace, described)),
                        ..ProbeAnswer::default()
                    })
                }
                other => Err(ProbeFailure::Error(format!(
                    "{} is not a containerd operation",
                    other.label()
                ))),
            }
        })
    }
}
