//! Names for container ids: the container's name and image, and its pod and namespace from
//! kubelet's `io.kubernetes.*` labels. Filled from what the runtimes already told us (the
//! `docker ps` probe, inspect, events); looking a name up never waits on a runtime.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What is known about one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    pub id: String,
    /// Runtime name (docker's `/name` without the slash).
    pub name: Option<String>,
    pub image: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub pod_uid: Option<String>,
    /// The container's name inside its pod spec.
    pub kube_container: Option<String>,
}

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";

impl ContainerInfo {
    /// From a runtime's id, name, image and labels.
    pub fn from_labels(
        id: &str,
        name: Option<&str>,
        image: Option<&str>,
        labels: Option<&HashMap<String, String>>,
    ) -> ContainerInfo {
        let label = |key: &str| labels.and_then(|l| l.get(key)).cloned();
        ContainerInfo {
            id: id.to_string(),
            name: name.map(|n| n.trim_start_matches('/').to_string()),
            image: image.map(str::to_string),
            pod: label(LABEL_POD_NAME),
            namespace: label(LABEL_POD_NAMESPACE),
            pod_uid: label(LABEL_POD_UID),
            kube_container: label(LABEL_CONTAINER_NAME),
        }
    }
}

/// Bounded map from container id to what is known about it.
#[derive(Debug)]
pub struct ContainerDirectory {
    by_id: HashMap<String, (ContainerInfo, Instant)>,
    /// Entries not seen for this long are dropped (a stopped container's name stays known
    /// for a while, so late kernel or stop evidence can still be named).
    keep_for: Duration,
    capacity: usize,
}

impl ContainerDirectory {
    pub fn new(keep_for: Duration, capacity: usize) -> ContainerDirectory {
        ContainerDirectory {
            by_id: HashMap::new(),
            keep_for,
            capacity,
        }
    }

    /// Record containers seen at `now`. Known fields are never replaced by unknown ones.
    pub fn saw(&mut self, containers: impl IntoIterator<Item = ContainerInfo>, now: Instant) {
        for info in containers {
            match self.by_id.get_mut(&info.id) {
                Some((known, seen)) => {
                    merge(known, info);
                    *seen = now;
                }
                None => {
                    self.by_id.insert(info.id.clone(), (info, now));
                }
            }
        }
        self.expire(now);
    }

    pub fn get(&self, id: &str) -> Option<&ContainerInfo> {
        self.by_id.get(id).map(|(info, _)| info)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        self.by_id
            .retain(|_, (_, seen)| now.saturating_duration_since(*seen) <= self.keep_for);
        if self.by_id.len() > self.capacity {
            let mut ages: Vec<(Instant, String)> = self
                .by_id
                .iter()
                .map(|(id, (_, seen))| (*seen, id.clone()))
                .collect();
            ages.sort();
            let excess = self.by_id.len() - self.capacity;
            for (_, id) in ages.into_iter().take(excess) {
                self.by_id.remove(&id);
            }
        }
    }
}

fn merge(known: &mut ContainerInfo, new: ContainerInfo) {
    fn keep(old: &mut Option<String>, new: Option<String>) {
        if new.is_some() {
            *old = new;
        }
    }
    keep(&mut known.name, new.name);
    keep(&mut known.image, new.image);
    keep(&mut known.pod, new.pod);
    keep(&mut known.namespace, new.namespace);
    keep(&mut known.pod_uid, new.pod_uid);
    keep(&mut known.kube_container, new.kube_container);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, name: Option<&str>) -> ContainerInfo {
        ContainerInfo::from_labels(id, name, None, None)
    }

    #[test]
    fn kubernetes_labels_become_pod_and_namespace() {
        let labels: HashMap<String, String> = [
            (LABEL_POD_NAME, "web-0"),
            (LABEL_POD_NAMESPACE, "shop"),
            (LABEL_POD_UID, "u-1"),
            (LABEL_CONTAINER_NAME, "nginx"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let c = ContainerInfo::from_labels(
            "abc",
            Some("/k8s_nginx_web-0"),
            Some("nginx:1"),
            Some(&labels),
        );
        assert_eq!(c.name.as_deref(), Some("k8s_nginx_web-0"));
        assert_eq!(c.pod.as_deref(), Some("web-0"));
        assert_eq!(c.namespace.as_deref(), Some("shop"));
        assert_eq!(c.kube_container.as_deref(), Some("nginx"));
    }

    #[test]
    fn later_partial_knowledge_does_not_erase_names() {
        let t0 = Instant::now();
        let mut d = ContainerDirectory::new(Duration::from_secs(60), 10);
        d.saw([info("a", Some("web"))], t0);
        d.saw([info("a", None)], t0);
        assert_eq!(d.get("a").and_then(|c| c.name.as_deref()), Some("web"));
    }

    #[test]
    fn entries_expire_and_capacity_is_bounded() {
        let t0 = Instant::now();
        let mut d = ContainerDirectory::new(Duration::from_secs(60), 2);
        d.saw([info("old", None)], t0);
        d.saw(
            [info("b", None), info("c", None)],
            t0 + Duration::from_secs(1),
        );
        assert_eq!(d.len(), 2);
        assert!(d.get("old").is_none(), "oldest dropped at capacity");
        d.saw([], t0 + Duration::from_secs(120));
        assert!(d.is_empty());
    }
}
