//! CRI probes (runtime.v1 over the CRI socket, the calls kubelet makes): `Status`,
//! `ListPodSandbox`, `ListContainers`, and a rotating sample of `PodSandboxStatus` /
//! `ContainerStatus`, one pod or container per call, so the one whose status call hangs is
//! named.
//!
//! The client is the `k8s-cri` crate (generated from kubernetes/cri-api with tonic): it uses the
//! tonic and prost that containerd-client already brings, so it adds no second HTTP/2 stack.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Status};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerStatusRequest, ListContainersRequest, ListPodSandboxRequest, PodSandboxStatusRequest,
    StatusRequest, VersionRequest,
};

use super::containerd::failure;
use super::{ProbeAnswer, ProbeCall, RuntimeClient, socket_present};
use crate::config::CriConfig;
use crate::containers::ContainerInfo;
use crate::domain::Runtime;
use crate::sources::runtime::detect::{
    Operation, ProbeFailure, StatusSubject, SubjectKind, Unreachable,
};

pub const OPERATIONS: [Operation; 4] = [
    Operation::Status,
    Operation::ListPodSandbox,
    Operation::ListContainers,
    Operation::StatusSample,
];

/// At most this many pods and containers are kept for the status rotation: a node runs a
/// few hundred at most; a runtime listing more is answered, not remembered.
const MAX_SUBJECTS: usize = 4096;

/// Status calls of the sample per interval, one after the other: a node of 100 pods (200
/// subjects) is walked in 25 intervals rather than 200.
const SAMPLES_PER_INTERVAL: usize = 8;

/// A tonic channel to a unix socket. The URI is required by tonic but unused. Connects lazily
/// and reconnects by itself; every call is still bounded by the caller's deadline.
pub fn unix_channel(socket: &Path, deadline: Duration) -> Channel {
    let path = socket.to_path_buf();
    Endpoint::from_static("http://cri.sock")
        .connect_timeout(deadline)
        .timeout(deadline)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
}

/// A CRI runtime service client on `socket`, for callers within the async runtime (the
/// probes, and the test harness that creates pods through it).
pub fn runtime_service(socket: &Path, deadline: Duration) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(unix_channel(socket, deadline))
}

#[derive(Clone)]
pub struct CriClient {
    sockets: Vec<PathBuf>,
    deadline: Duration,
    shared: Arc<Mutex<Shared>>,
}

/// A pod's name and namespace.
type PodName = (Option<String>, Option<String>);

#[derive(Default)]
struct Shared {
    /// The socket in use (index into `sockets`) and its channel.
    chosen: Option<(usize, Channel)>,
    /// Where discovery starts: past a socket that does not serve CRI.
    first_candidate: usize,
    /// Sandbox id → (pod, namespace), from the last `ListPodSandbox`.
    pods: HashMap<String, PodName>,
    /// The pods and containers to ask about, in rotation.
    subjects: Vec<StatusSubject>,
    /// Containers from the last `ListContainers`, for rebuilding `subjects`.
    containers: Vec<(String, String, Option<String>)>,
    cursor: usize,
}

impl Shared {
    fn rebuild_subjects(&mut self) {
        let mut subjects = Vec::new();
        let mut pods: Vec<_> = self.pods.iter().collect();
        pods.sort();
        for (id, (pod, namespace)) in pods {
            subjects.push(StatusSubject {
                kind: SubjectKind::PodSandbox,
                id: id.clone(),
                pod: pod.clone(),
                namespace: namespace.clone(),
                container: None,
            });
            for (container_id, _, name) in self.containers.iter().filter(|c| &c.1 == id) {
                subjects.push(StatusSubject {
                    kind: SubjectKind::Container,
                    id: container_id.clone(),
                    pod: pod.clone(),
                    namespace: namespace.clone(),
                    container: name.clone(),
                });
            }
        }
        subjects.truncate(MAX_SUBJECTS);
        self.subjects = subjects;
    }
}

impl CriClient {
    pub fn new(config: &CriConfig, deadline: Duration) -> CriClient {
        CriClient {
            sockets: config.sockets.clone(),
            deadline,
            shared: Arc::default(),
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Held only for short, non-panicking updates; a poisoned lock still holds usable data.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The channel to the CRI socket: the one in use while its file is there, else the first
    /// present socket from the discovery start. Call within the async runtime.
    fn channel(&self) -> Result<(usize, Channel), ProbeFailure> {
        let mut shared = self.shared();
        if let Some((index, channel)) = &shared.chosen
            && self
                .sockets
                .get(*index)
                .is_some_and(|s| socket_present(s).is_ok())
        {
            return Ok((*index, channel.clone()));
        }
        shared.chosen = None;
        let count = self.sockets.len();
        let mut denied = false;
        for offset in 0..count {
            let index = (shared.first_candidate + offset) % count;
            match self.sockets.get(index).map(|s| (s, socket_present(s))) {
                Some((socket, Ok(()))) => {
                    let channel = unix_channel(socket, self.deadline);
                    shared.chosen = Some((index, channel.clone()));
                    return Ok((index, channel));
                }
                Some((_, Err(ProbeFailure::Unreachable(Unreachable::PermissionDenied)))) => {
                    denied = true
                }
                _ => {}
            }
        }
        Err(ProbeFailure::Unreachable(if denied {
            Unreachable::PermissionDenied
        } else {
            Unreachable::SocketMissing
        }))
    }

    /// The socket at `index` does not serve CRI: try the next one from now on.
    fn not_served(&self, index: usize) {
        let mut shared = self.shared();
        if shared.chosen.as_ref().is_some_and(|(i, _)| *i == index) {
            shared.chosen = None;
        }
        shared.first_candidate = (index + 1) % self.sockets.len().max(1);
    }

    /// The next pod or container in rotation.
    /// The rotation moves on only when this one answered: a call that hangs (and is
    /// abandoned at its deadline) is asked again, so the stuck pod stays named, as it stays
    /// the one blocking kubelet's relist.
    fn next_subject(&self) -> Option<StatusSubject> {
        let shared = self.shared();
        let count = shared.subjects.len();
        (count > 0)
            .then(|| shared.subjects.get(shared.cursor % count).cloned())
            .flatten()
    }

    /// The status call about `id` answered (successfully or not): on to the next.
    fn answered(&self, id: &str) {
        let mut shared = self.shared();
        let count = shared.subjects.len();
        if count > 0
            && shared
                .subjects
                .get(shared.cursor % count)
                .is_some_and(|s| s.id == id)
        {
            shared.cursor = shared.cursor % count + 1;
        }
    }

    fn saw_pods(&self, items: Vec<k8s_cri::v1::PodSandbox>) {
        let mut shared = self.shared();
        shared.pods = items
            .into_iter()
            .take(MAX_SUBJECTS)
            .map(|p| {
                let metadata = p.metadata.unwrap_or_default();
                let nonempty = |s: String| (!s.is_empty()).then_some(s);
                (
                    p.id,
                    (nonempty(metadata.name), nonempty(metadata.namespace)),
                )
            })
            .collect();
        shared.rebuild_subjects();
    }

    /// Remember the containers for the rotation; their names for the directory.
    fn saw_containers(&self, items: Vec<k8s_cri::v1::Container>) -> Vec<ContainerInfo> {
        let mut shared = self.shared();
        let infos: Vec<ContainerInfo> = items
            .iter()
            .take(MAX_SUBJECTS)
            .map(|c| {
                let name = c.metadata.as_ref().map(|m| m.name.clone());
                let image = c.image.as_ref().map(|i| i.image.clone());
                let mut info = ContainerInfo::from_labels(
                    &c.id,
                    name.as_deref(),
                    image.as_deref(),
                    Some(&c.labels),
                );
                // Pods created by kubelet carry its labels; otherwise the sandbox names them.
                if let Some((pod, namespace)) = shared.pods.get(&c.pod_sandbox_id) {
                    info.pod = info.pod.or_else(|| pod.clone());
                    info.namespace = info.namespace.or_else(|| namespace.clone());
                }
                if info.kube_container.is_none() {
                    info.kube_container = info.name.clone();
                }
                info
            })
            .collect();
        shared.containers = items
            .into_iter()
            .take(MAX_SUBJECTS)
            .map(|c| (c.id, c.pod_sandbox_id, c.metadata.map(|m| m.name)))
            .collect();
        shared.rebuild_subjects();
        infos
    }
}

/// `Unimplemented` means the socket's server has no CRI service (containerd with its CRI
/// plugin disabled, as Docker's packages ship it).
fn cri_failure(status: &Status) -> ProbeFailure {
    if status.code() == Code::Unimplemented {
        ProbeFailure::Unreachable(Unreachable::NotServed)
    } else {
        failure(status)
    }
}

impl RuntimeClient for CriClient {
    fn runtime(&self) -> Runtime {
        Runtime::Cri
    }

    fn operations(&self) -> Vec<Operation> {
        OPERATIONS.to_vec()
    }

    fn calls_per_interval(&self, operation: &Operation) -> usize {
        match operation {
            // Nothing listed: the one call asks Version, once is enough.
            Operation::StatusSample if !self.shared().subjects.is_empty() => SAMPLES_PER_INTERVAL,
            _ => 1,
        }
    }

    fn subject(&self, operation: &Operation) -> Option<StatusSubject> {
        match operation {
            Operation::StatusSample => self.next_subject(),
            _ => None,
        }
    }

    fn call(&self, operation: &Operation, subject: Option<&StatusSubject>) -> ProbeCall {
        let client = self.clone();
        let operation = operation.clone();
        let subject = subject.cloned();
        Box::pin(async move {
            let (index, channel) = client.channel()?;
            let mut cri = RuntimeServiceClient::new(channel);
            let result = match (operation, subject) {
                (Operation::Status, _) => cri
                    .status(StatusRequest { verbose: false })
                    .await
                    .map(|_| ProbeAnswer::default()),
                (Operation::ListPodSandbox, _) => cri
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
                    .map(|r| {
                        client.saw_pods(r.into_inner().items);
                        ProbeAnswer::default()
                    }),
                (Operation::ListContainers, _) => cri
                    .list_containers(ListContainersRequest { filter: None })
                    .await
                    .map(|r| ProbeAnswer {
                        containers: Some(client.saw_containers(r.into_inner().containers)),
                        ..ProbeAnswer::default()
                    }),
                // Nothing listed yet: nobody to ask about, so the cheapest CRI call keeps
                // the operation honest (a socket that does not serve CRI fails it too).
                (Operation::StatusSample, None) => cri
                    .version(VersionRequest {
                        version: String::new(),
                    })
                    .await
                    .map(|_| ProbeAnswer::default()),
                (Operation::StatusSample, Some(subject)) => {
                    let id = subject.id.clone();
                    let answer = match subject.kind {
                        SubjectKind::PodSandbox => cri
                            .pod_sandbox_status(PodSandboxStatusRequest {
                                pod_sandbox_id: subject.id,
                                verbose: false,
                            })
                            .await
                            .map(|_| ProbeAnswer::default()),
                        SubjectKind::Container => cri
                            .container_status(ContainerStatusRequest {
                                container_id: subject.id,
                                verbose: false,
                            })
                            .await
                            .map(|_| ProbeAnswer::default()),
                    };
                    // tonic's own deadline may fire before the caller's: that is no answer.
                    if !answer
                        .as_ref()
                        .is_err_and(|s| s.code() == Code::DeadlineExceeded)
                    {
                        client.answered(&id);
                    }
                    answer
                }
                (other, _) => {
                    return Err(ProbeFailure::Error(format!(
                        "{} is not a CRI operation",
                        other.label()
                    )));
                }
            };
            result.or_else(|status| {
                // A pod or container removed since the last list is not a failure of the runtime.
                if status.code() == Code::NotFound {
                    return Ok(ProbeAnswer::default());
                }
                let failure = cri_failure(&status);
                if failure == ProbeFailure::Unreachable(Unreachable::NotServed) {
                    client.not_served(index);
                }
                Err(failure)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> CriClient {
        CriClient::new(&CriConfig::default(), Duration::from_secs(1))
    }

    #[test]
    fn the_rotation_visits_each_pod_then_its_containers() {
        let c = client();
        {
            let mut s = c.shared();
            s.pods
                .insert("p1".into(), (Some("web".into()), Some("default".into())));
            s.containers = vec![("c1".into(), "p1".into(), Some("nginx".into()))];
            s.rebuild_subjects();
        }
        let first = c.next_subject().expect("a subject");
        assert_eq!(
            (first.kind, first.id.as_str()),
            (SubjectKind::PodSandbox, "p1")
        );
        assert_eq!(
            c.next_subject(),
            Some(first),
            "asked again until it answers"
        );
        c.answered("p1");
        let second = c.next_subject().expect("a subject");
        assert_eq!(second.kind, SubjectKind::Container);
        assert_eq!(second.container.as_deref(), Some("nginx"));
        assert_eq!(second.pod.as_deref(), Some("web"));
        c.answered("c1");
        assert_eq!(
            c.next_subject().map(|s| s.id),
            Some("p1".into()),
            "wraps around"
        );
    }

    #[test]
    fn nothing_listed_means_no_subject() {
        assert_eq!(client().next_subject(), None);
    }

    #[test]
    fn unimplemented_means_the_socket_serves_no_cri() {
        assert_eq!(
            cri_failure(&Status::unimplemented(
                "unknown service runtime.v1.RuntimeService"
            )),
            ProbeFailure::Unreachable(Unreachable::NotServed)
        );
        assert_eq!(
            cri_failure(&Status::deadline_exceeded("slow")),
            ProbeFailure::Timeout
        );
    }
}
