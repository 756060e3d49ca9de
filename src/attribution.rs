//! Which container and pod a cgroup path belongs to.
//!
//! Pure functions over the path strings found in `/proc/<pid>/cgroup` and in the kernel's OOM
//! lines (`oom_memcg=`, `task_memcg=`, `Task in ... killed as a result of limit of ...`).
//! Every layout in the field notes is covered: Docker and kubelet with the cgroupfs driver
//! (cgroup v1 or v2), the systemd driver's slices and scopes (docker, cri-containerd, crio), and
//! plain containerd's `/<namespace>/<id>`.

use serde::Serialize;

/// What a cgroup path says about the container that owns it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CgroupOwner {
    /// Full container id (64 hex characters, or the name a plain containerd client chose).
    pub container_id: Option<String>,
    /// Kubernetes pod UID in its canonical dashed form.
    pub pod_uid: Option<String>,
    /// Kubernetes QoS class when the path carries one.
    pub qos: Option<&'static str>,
    /// Which runtime's naming the path uses: `docker`, `containerd`, `crio`.
    pub runtime: Option<&'static str>,
}

impl CgroupOwner {
    pub fn is_container(&self) -> bool {
        self.container_id.is_some()
    }
}

/// Attribute one cgroup path (`/docker/<id>`, `/kubepods.slice/...`, ...).
///
/// `containerd_namespaces` are the namespaces for which `/<namespace>/<id>` is read as a plain
/// containerd container (ids there are free-form, so the namespace is the only clue).
pub fn attribute_path(path: &str, containerd_namespaces: &[String]) -> CgroupOwner {
    let mut owner = CgroupOwner::default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();

    for (index, segment) in segments.iter().enumerate() {
        if let Some((qos, uid)) = pod_segment(segment) {
            owner.pod_uid = Some(uid);
            if qos.is_some() {
                owner.qos = qos;
            }
            continue;
        }
        if let Some(qos) = qos_segment(segment) {
            owner.qos = Some(qos);
            continue;
        }
        if owner.container_id.is_none()
            && let Some((runtime, id)) =
                container_segment(segment, index.checked_sub(1).map(|i| segments[i]))
        {
            owner.container_id = Some(id);
            owner.runtime = runtime.or(owner.runtime);
        }
    }

    if owner.container_id.is_none()
        && owner.pod_uid.is_none()
        && let [namespace, id, ..] = segments.as_slice()
        && containerd_namespaces.iter().any(|n| n == namespace)
    {
        owner.container_id = Some((*id).to_string());
        owner.runtime = Some("containerd");
    }
    if owner.pod_uid.is_some() && owner.qos.is_none() {
        owner.qos = Some("guaranteed");
    }
    owner
}

/// Attribute a process from the text of `/proc/<pid>/cgroup`.
///
/// Each line is `hierarchy-id:controllers:path`. The first line whose path names a container
/// wins, so a process is attributed even when only some hierarchies place it in the container.
pub fn attribute_proc_cgroup(contents: &str, containerd_namespaces: &[String]) -> CgroupOwner {
    let mut fallback = CgroupOwner::default();
    for line in contents.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let owner = attribute_path(path, containerd_namespaces);
        if owner.is_container() {
            return owner;
        }
        if fallback.pod_uid.is_none() && owner.pod_uid.is_some() {
            fallback = owner;
        }
    }
    fallback
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_segment(segment: &str) -> Option<(Option<&'static str>, String)> {
    if let Some(rest) = segment.strip_prefix("pod")
        && is_uid(rest)
    {
        return Some((None, rest.to_string()));
    }
    let name = segment.strip_suffix(".slice")?;
    let (prefix, uid) = name.rsplit_once("-pod")?;
    let uid = uid.replace('_', "-");
    if !is_uid(&uid) || !prefix.starts_with("kubepods") {
        return None;
    }
    let qos = match prefix {
        "kubepods-burstable" => Some("burstable"),
        "kubepods-besteffort" => Some("besteffort"),
        _ => None,
    };
    Some((qos, uid))
}

fn qos_segment(segment: &str) -> Option<&'static str> {
    match segment {
        "burstable" | "kubepods-burstable.slice" => Some("burstable"),
        "besteffort" | "kubepods-besteffort.slice" => Some("besteffort"),
        _ => None,
    }
}

/// A segment naming a container: a bare 64-hex id (under `docker/` or a pod), or a systemd
/// scope `docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`.
fn container_segment(
    segment: &str,
    parent: Option<&str>,
) -> Option<(Option<&'static str>, String)> {
    if let Some(scope) = segment.strip_suffix(".scope") {
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
        ] {
            if let Some(id) = scope.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((Some(runtime), id.to_string()));
            }
        }
        return None;
    }
    if is_container_id(segment) {
        let runtime = (parent == Some("docker")).then_some("docker");
        return Some((runtime, segment.to_string()));
    }
    None
}

pub fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "a5498f937a723171a08c21118d0f0a5449af0fedb0873f4d6b1169dac452f4fc";
    const UID: &str = "0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b";

    fn ns() -> Vec<String> {
        vec!["moby".into(), "k8s.io".into(), "default".into()]
    }

    #[test]
    fn docker_cgroupfs() {
        let o = attribute_path(&format!("/docker/{ID}"), &ns());
        assert_eq!(o.container_id.as_deref(), Some(ID));
        assert_eq!(o.runtime, Some("docker"));
        assert_eq!(o.pod_uid, None);
    }

    #[test]
    fn docker_nested_subgroup_still_attributed() {
        let o = attribute_path(&format!("/docker/{ID}/init.scope"), &ns());
        assert_eq!(o.container_id.as_deref(), Some(ID));
    }

    #[test]
    fn kubepods_cgroupfs_burstable_and_guaranteed() {
        let o = attribute_path(&format!("/kubepods/burstable/pod{UID}/{ID}"), &ns());
        assert_eq!(o.container_id.as_deref(), Some(ID));
        assert_eq!(o.pod_uid.as_deref(), Some(UID));
        assert_eq!(o.qos, Some("burstable"));
        let o = attribute_path(&format!("/kubepods/pod{UID}/{ID}"), &ns());
        assert_eq!(o.qos, Some("guaranteed"));
        assert_eq!(o.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn systemd_slices_with_each_runtime() {
        let u = UID.replace('-', "_");
        for (scope, runtime) in [
            ("cri-containerd", "containerd"),
            ("crio", "crio"),
            ("docker", "docker"),
        ] {
            let path = format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/{scope}-{ID}.scope"
            );
            let o = attribute_path(&path, &ns());
            assert_eq!(o.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(o.pod_uid.as_deref(), Some(UID));
            assert_eq!(o.qos, Some("besteffort"));
            assert_eq!(o.runtime, Some(runtime));
        }
        let o = attribute_path(
            &format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{ID}.scope"),
            &ns(),
        );
        assert_eq!(o.qos, Some("guaranteed"));
    }

    #[test]
    fn docker_systemd_scope() {
        let o = attribute_path(&format!("/system.slice/docker-{ID}.scope"), &ns());
        assert_eq!(o.container_id.as_deref(), Some(ID));
        assert_eq!(o.runtime, Some("docker"));
    }

    #[test]
    fn plain_containerd_namespace_only_for_known_namespaces() {
        let o = attribute_path("/default/redis-1", &ns());
        assert_eq!(o.container_id.as_deref(), Some("redis-1"));
        assert_eq!(o.runtime, Some("containerd"));
        assert!(!attribute_path("/user.slice/session-1", &ns()).is_container());
    }

    #[test]
    fn host_paths_are_not_containers() {
        for p in [
            "/",
            "",
            "/system.slice/docker.service",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/docker",
            "/system.slice/docker-notanid.scope",
        ] {
            assert!(!attribute_path(p, &ns()).is_container(), "{p}");
        }
    }

    #[test]
    fn pod_without_container_keeps_the_pod() {
        let o = attribute_path(&format!("/kubepods/burstable/pod{UID}"), &ns());
        assert_eq!(o.pod_uid.as_deref(), Some(UID));
        assert!(!o.is_container());
    }

    #[test]
    fn proc_cgroup_v1_and_v2_lines() {
        let v1 = format!("12:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n");
        assert_eq!(
            attribute_proc_cgroup(&v1, &ns()).container_id.as_deref(),
            Some(ID)
        );
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            attribute_proc_cgroup(&v2, &ns()).container_id.as_deref(),
            Some(ID)
        );
        let host = "12:memory:/user.slice\n0::/init.scope\n";
        assert!(!attribute_proc_cgroup(host, &ns()).is_container());
        assert!(!attribute_proc_cgroup("garbage without colons", &ns()).is_container());
    }

    #[test]
    fn uppercase_or_short_hex_is_not_an_id() {
        assert!(!is_container_id(&ID.to_uppercase()));
        assert!(!is_container_id(&ID[..63]));
    }
}
