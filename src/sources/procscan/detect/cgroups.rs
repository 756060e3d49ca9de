//! A task's cgroups and whether they are frozen.
//!
//! Frozen tasks show state D (cgroup v1 freezer, which `docker pause` uses on hybrid hosts),
//! so a paused container would look stuck without this check. Tasks frozen through cgroup v2
//! show S on 6.x kernels and never reach it, but a D task in a v2-frozen cgroup is treated
//! the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::attribution::{CgroupOwner, attribute_proc_cgroup};

/// What a task's `cgroup` file says, read once per task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskCgroup {
    pub owner: CgroupOwner,
    /// Path in the v1 freezer hierarchy.
    pub freezer: Option<String>,
    /// Path in the v2 hierarchy (the `0::` line).
    pub unified: Option<String>,
}

impl TaskCgroup {
    pub fn parse(text: &str, containerd_namespaces: &[String]) -> TaskCgroup {
        let mut cgroup = TaskCgroup {
            owner: attribute_proc_cgroup(text, containerd_namespaces),
            ..TaskCgroup::default()
        };
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                cgroup.unified = Some(path.to_string());
            } else if controllers.split(',').any(|c| c == "freezer") {
                cgroup.freezer = Some(path.to_string());
            }
        }
        cgroup
    }
}

/// Where the freezer can be read on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupLayout {
    /// Mount of the v1 freezer hierarchy.
    pub freezer_v1: Option<PathBuf>,
    /// Mount of the v2 hierarchy: the cgroup root itself on a pure v2 node, `unified/` on a
    /// hybrid one.
    pub unified: Option<PathBuf>,
}

impl CgroupLayout {
    /// Probe the mounts under `cgroup_root` (usually `/sys/fs/cgroup`).
    pub fn probe(cgroup_root: &Path) -> CgroupLayout {
        let v2_at = |dir: PathBuf| dir.join("cgroup.controllers").exists().then_some(dir);
        let freezer = cgroup_root.join("freezer");
        CgroupLayout {
            freezer_v1: freezer.is_dir().then_some(freezer),
            unified: v2_at(cgroup_root.to_path_buf())
                .or_else(|| v2_at(cgroup_root.join("unified"))),
        }
    }

    /// The file that says whether the v1 freezer cgroup `path` is frozen.
    pub fn freezer_state_file(&self, path: &str) -> Option<PathBuf> {
        Some(join_cgroup(self.freezer_v1.as_ref()?, path)?.join("freezer.state"))
    }

    /// The file that says whether the v2 cgroup `path` is frozen.
    pub fn events_file(&self, path: &str) -> Option<PathBuf> {
        Some(join_cgroup(self.unified.as_ref()?, path)?.join("cgroup.events"))
    }
}

/// `mount` + `path`, for a cgroup below the root (the root cannot be frozen) and without `..`.
fn join_cgroup(mount: &Path, path: &str) -> Option<PathBuf> {
    let relative = path.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|s| s == "..") {
        return None;
    }
    Some(mount.join(relative))
}

/// `freezer.state` says FROZEN, or FREEZING (a freeze in progress that some task has not
/// reached yet: still a pause someone asked for, not a hang).
pub fn v1_frozen(freezer_state: &str) -> bool {
    matches!(freezer_state.trim(), "FROZEN" | "FREEZING")
}

/// `cgroup.events` has `frozen 1`.
pub fn v2_frozen(events: &str) -> bool {
    events.lines().any(|l| l.trim() == "frozen 1")
}

/// Frozen state per cgroup file, for one scan: a paused container's tasks share one read.
#[derive(Debug, Default)]
pub struct FrozenCache {
    by_file: HashMap<PathBuf, bool>,
}

impl FrozenCache {
    pub fn clear(&mut self) {
        self.by_file.clear();
    }

    /// The cached answer for `file`, or `read` it (None when unreadable: not frozen, and not
    /// remembered, so the next task in the cgroup tries again).
    pub fn get_or_read(&mut self, file: PathBuf, read: impl FnOnce(&Path) -> Option<bool>) -> bool {
        if let Some(&frozen) = self.by_file.get(&file) {
            return frozen;
        }
        match read(&file) {
            Some(frozen) => {
                self.by_file.insert(file, frozen);
                frozen
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "a5498f937a723171a08c21118d0f0a5449af0fedb0873f4d6b1169dac452f4fc";

    #[test]
    fn parses_hybrid_lines() {
        let text = format!(
            "9:name=systemd:/docker/{ID}\n6:freezer:/docker/{ID}\n\
             2:cpu,cpuacct:/docker/{ID}\n0::/system.slice/docker.service\n"
        );
        let c = TaskCgroup::parse(&text, &[]);
        assert_eq!(c.owner.container_id.as_deref(), Some(ID));
        assert_eq!(c.freezer, Some(format!("/docker/{ID}")));
        assert_eq!(c.unified.as_deref(), Some("/system.slice/docker.service"));
    }

    #[test]
    fn parses_pure_v2_and_garbage() {
        let c = TaskCgroup::parse("0::/kubepods.slice/x.scope\n", &[]);
        assert_eq!(c.freezer, None);
        assert_eq!(c.unified.as_deref(), Some("/kubepods.slice/x.scope"));
        assert_eq!(TaskCgroup::parse("junk\n::\n", &[]).freezer, None);
        // A freezer co-mounted with another controller still counts.
        let c = TaskCgroup::parse("3:cpu,freezer:/a\n", &[]);
        assert_eq!(c.freezer.as_deref(), Some("/a"));
    }

    #[test]
    fn states() {
        assert!(v1_frozen("FROZEN\n"));
        assert!(v1_frozen("FREEZING\n"));
        assert!(!v1_frozen("THAWED\n"));
        assert!(v2_frozen("populated 1\nfrozen 1\n"));
        assert!(!v2_frozen("populated 1\nfrozen 0\n"));
        assert!(!v2_frozen(""));
    }

    #[test]
    fn files_are_below_the_mount_and_never_the_root() {
        let layout = CgroupLayout {
            freezer_v1: Some("/cg/freezer".into()),
            unified: Some("/cg/unified".into()),
        };
        assert_eq!(
            layout.freezer_state_file("/docker/x"),
            Some(PathBuf::from("/cg/freezer/docker/x/freezer.state"))
        );
        assert_eq!(
            layout.events_file("/a.slice"),
            Some(PathBuf::from("/cg/unified/a.slice/cgroup.events"))
        );
        assert_eq!(layout.freezer_state_file("/"), None);
        assert_eq!(layout.events_file("/../../etc"), None);
        assert_eq!(CgroupLayout::default().freezer_state_file("/a"), None);
    }

    #[test]
    fn probes_this_machine_or_a_fake_root() {
        let fake = std::env::temp_dir().join(format!("procscan-layout-{}", std::process::id()));
        std::fs::create_dir_all(fake.join("freezer")).unwrap();
        std::fs::create_dir_all(fake.join("unified")).unwrap();
        std::fs::write(fake.join("unified/cgroup.controllers"), "").unwrap();
        let layout = CgroupLayout::probe(&fake);
        assert_eq!(layout.freezer_v1, Some(fake.join("freezer")));
        assert_eq!(layout.unified, Some(fake.join("unified")));
        std::fs::write(fake.join("cgroup.controllers"), "").unwrap();
        assert_eq!(CgroupLayout::probe(&fake).unified, Some(fake.clone()));
        std::fs::remove_dir_all(&fake).unwrap();
    }

    #[test]
    fn frozen_cache_reads_once_and_does_not_remember_failures() {
        let mut cache = FrozenCache::default();
        let mut reads = 0;
        for _ in 0..3 {
            assert!(cache.get_or_read("/a".into(), |_| {
                reads += 1;
                Some(true)
            }));
        }
        assert_eq!(reads, 1);
        assert!(!cache.get_or_read("/b".into(), |_| None));
        assert!(cache.get_or_read("/b".into(), |_| Some(true)));
        cache.clear();
        assert!(!cache.get_or_read("/a".into(), |_| Some(false)));
    }
}
