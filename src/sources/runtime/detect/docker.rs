//! Docker probes through bollard over the unix socket: `GET /_ping` and `GET /containers/json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::{ClientVersion, Docker};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;
use tokio::sync::Mutex;

use super::{ProbeAnswer, ProbeCall, RuntimeClient, classify_error, socket_present};
use crate::config::DockerConfig;
use crate::containers::ContainerInfo;
use crate::domain::Runtime;
use crate::sources::runtime::detect::{Operation, ProbeFailure, StatusSubject, Unreachable};

pub const OPERATIONS: [Operation; 2] = [Operation::Ping, Operation::ListContainers];

#[derive(Clone)]
pub struct DockerClient {
    socket: PathBuf,
    /// bollard's own timeout (whole seconds) only covers the wait for headers; the probe's
    /// tokio deadline is what bounds a call, so this just has to be longer.
    client_timeout_secs: u64,
    /// The client with the API version negotiated with the daemon, once it answered.
    negotiated: Arc<Mutex<Option<Docker>>>,
}

impl DockerClient {
    pub fn new(config: &DockerConfig, deadline: Duration) -> DockerClient {
        DockerClient {
            socket: config.socket.clone(),
            client_timeout_secs: deadline.as_secs() + 5,
            negotiated: Arc::default(),
        }
    }
}

/// A client with the version negotiated. The lock is held only to read or store the client,
/// never across a call, so a hung negotiation cannot block the other probe.
async fn client(
    socket: &Path,
    timeout_secs: u64,
    negotiated: &Mutex<Option<Docker>>,
) -> Result<Docker, ProbeFailure> {
    if let Some(docker) = negotiated.lock().await.clone() {
        return Ok(docker);
    }
    socket_present(socket)?;
    let version = api_version_from_ping(socket).await?;
    let docker = Docker::connect_with_unix(&socket.to_string_lossy(), timeout_secs, &version)
        .map_err(|e| failure(&e))?;
    *negotiated.lock().await = Some(docker.clone());
    Ok(docker)
}

/// The daemon's API version from the `API-Version` header of `GET /_ping`, capped at what
/// bollard speaks. Not bollard's `negotiate_version`: that calls `/version`, which dockerd
/// answers only after asking containerd, so a hung containerd would look like a hung dockerd.
async fn api_version_from_ping(socket: &Path) -> Result<ClientVersion, ProbeFailure> {
    let client: Client<UnixConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(UnixConnector);
    let response = client
        .get(hyperlocal::Uri::new(socket, "/_ping").into())
        .await
        .map_err(|e| classify_error(&e))?;
    let header = response
        .headers()
        .get("api-version")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ProbeFailure::Error(format!(
                "/_ping answered HTTP {} without an API-Version header",
                response.status()
            ))
        })?;
    let server = parse_api_version(header)
        .ok_or_else(|| ProbeFailure::Error(format!("unparseable API-Version {header:?}")))?;
    Ok(capped(server))
}

fn bollard_version() -> ClientVersion {
    *bollard::API_DEFAULT_VERSION
}

/// The older of the daemon's version and bollard's (ClientVersion is only PartialOrd).
fn capped(server: ClientVersion) -> ClientVersion {
    let ours = bollard_version();
    if server < ours { server } else { ours }
}

/// `1.41` → ClientVersion { 1, 41 }.
fn parse_api_version(text: &str) -> Option<ClientVersion> {
    let (major, minor) = text.trim().split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor.parse().ok()?,
    })
}

fn summary_info(summary: &bollard::models::ContainerSummary) -> Option<ContainerInfo> {
    let id = summary.id.as_deref()?;
    let name = summary
        .names
        .as_ref()
        .and_then(|n| n.first())
        .map(String::as_str);
    Some(ContainerInfo::from_labels(
        id,
        name,
        summary.image.as_deref(),
        summary.labels.as_ref(),
    ))
}

fn failure(error: &BollardError) -> ProbeFailure {
    match error {
        BollardError::SocketNotFoundError(_) => {
            ProbeFailure::Unreachable(Unreachable::SocketMissing)
        }
        BollardError::RequestTimeoutError => ProbeFailure::Timeout,
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => ProbeFailure::Error(format!("HTTP {status_code}: {message}")),
        other => classify_error(other),
    }
}

impl DockerClient {
    /// Name, image and pod labels of one container (`GET /containers/{id}/json`). The
    /// caller bounds it with a deadline.
    pub async fn inspect(&self, id: &str) -> Result<ContainerInfo, ProbeFailure> {
        let docker = client(&self.socket, self.client_timeout_secs, &self.negotiated).await?;
        let found = docker
            .inspect_container(id, None)
            .await
            .map_err(|e| failure(&e))?;
        let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
        Ok(ContainerInfo::from_labels(
            found.id.as_deref().unwrap_or(id),
            found.name.as_deref(),
            found.config.as_ref().and_then(|c| c.image.as_deref()),
            labels,
        ))
    }
}

impl RuntimeClient for DockerClient {
    fn runtime(&self) -> Runtime {
        Runtime::Docker
    }

    fn operations(&self) -> Vec<Operation> {
        OPERATIONS.to_vec()
    }

    fn call(&self, operation: &Operation, _subject: Option<&StatusSubject>) -> ProbeCall {
        let socket = self.socket.clone();
        let timeout = self.client_timeout_secs;
        let negotiated = self.negotiated.clone();
        let operation = operation.clone();
        Box::pin(async move {
            let docker = client(&socket, timeout, &negotiated).await?;
            let result = match operation {
                Operation::Ping => docker.ping().await.map(|_| ProbeAnswer::default()),
                Operation::ListContainers => {
                    docker.list_containers(None).await.map(|list| ProbeAnswer {
                        containers: Some(list.iter().filter_map(summary_info).collect()),
                        ..ProbeAnswer::default()
                    })
                }
                other => {
                    return Err(ProbeFailure::Error(format!(
                        "{} is not a docker operation",
                        other.label()
                    )));
                }
            };
            result.map_err(|e| {
                let failure = failure(&e);
                if matches!(failure, ProbeFailure::Unreachable(_)) {
                    // The daemon may come back as another version: negotiate again.
                    if let Ok(mut slot) = negotiated.try_lock() {
                        *slot = None;
                    }
                }
                failure
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_header_parsing() {
        let v = parse_api_version("1.41").expect("parses");
        assert_eq!((v.major_version, v.minor_version), (1, 41));
        assert!(parse_api_version("garbage").is_none());
        assert!(parse_api_version("1.x").is_none());
        assert!(parse_api_version("").is_none());
    }

    #[test]
    fn newer_daemon_is_capped_at_what_bollard_speaks() {
        let newer = parse_api_version("9.99").expect("parses");
        assert_eq!(capped(newer), bollard_version());
        let older = parse_api_version("1.41").expect("parses");
        assert_eq!(capped(older), older);
    }
}
