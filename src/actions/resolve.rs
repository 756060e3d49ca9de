//! Names for a container id nobody has listed yet (e.g. a container OOM-killed between two
//! `docker ps`): docker inspect, else containerd's container store, bounded by a deadline,
//! reported back as `Signal::ContainersSeen`.

use std::time::Duration;

use crate::config::{Config, RuntimeMode};
use crate::signal::{Signal, SignalSender};
use crate::sources::runtime::detect::{ContainerdClient, DockerClient};

/// A name is a nicety: never wait long for one.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct ContainerResolver {
    docker: Option<DockerClient>,
    containerd: Option<ContainerdClient>,
}

impl ContainerResolver {
    pub fn new(config: &Config) -> ContainerResolver {
        ContainerResolver {
            docker: (config.docker.mode != RuntimeMode::Disabled)
                .then(|| DockerClient::new(&config.docker, LOOKUP_DEADLINE)),
            containerd: (config.containerd.mode != RuntimeMode::Disabled).then(|| {
                ContainerdClient::new(
                    &config.containerd,
                    &config.proc_scan.proc_root,
                    LOOKUP_DEADLINE,
                )
            }),
        }
    }

    /// Look `id` up in the background. `use_docker`/`use_containerd` say which runtimes
    /// are answering: a stalled one is not asked.
    pub fn spawn(&self, id: String, use_docker: bool, use_containerd: bool, signals: SignalSender) {
        let docker = self.docker.clone().filter(|_| use_docker);
        let containerd = self.containerd.clone().filter(|_| use_containerd);
        if docker.is_none() && containerd.is_none() {
            return;
        }
        tokio::spawn(async move {
            let lookup = async {
                if let Some(docker) = &docker
                    && let Ok(info) = docker.inspect(&id).await
                {
                    return Some(info);
                }
                match &containerd {
                    Some(containerd) => containerd.container(&id).await.ok(),
                    None => None,
                }
            };
            match tokio::time::timeout(LOOKUP_DEADLINE, lookup).await {
                Ok(Some(info)) => {
                    signals.send(Signal::ContainersSeen(vec![info])).await;
                }
                Ok(None) => tracing::debug!(container_id = %id, "no runtime knows this container"),
                Err(_) => tracing::debug!(container_id = %id, "container lookup timed out"),
            }
        });
    }
}
