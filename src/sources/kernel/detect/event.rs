//! What the kernel log detector reports, and the pure classifications behind its labels.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub use crate::domain::{OomConstraint, OomVictim, Scope as HungTaskScope};

use crate::attribution::{CgroupOwner, attribute_path, attribute_proc_cgroup};
use crate::config::{RuleKind, Severity};

use super::trace::CallTrace;

/// One kernel log record that matched a rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KernelEvent {
    pub seq: u64,
    /// The kernel's printk timestamp (microseconds since boot, suspend excluded).
    pub ts_usec: u64,
    pub facility: u8,
    pub level: u8,
    /// The rule's name: the `rule` label value.
    pub rule: String,
    pub severity: Severity,
    pub kind: RuleKind,
    /// For conditions: how long without a new match until the condition clears; None: never.
    #[serde(with = "humantime_serde")]
    pub clear_after: Option<Duration>,
    pub message: String,
    pub fields: EventFields,
    /// Set for the `oom_kill` rule.
    pub oom: Option<OomInfo>,
    /// Set for the `hung_task` rule.
    pub hung_task_scope: Option<HungTaskScope>,
    /// `hung_task`: the kernel stack the kernel logged after the report.
    pub call_trace: Option<CallTrace>,
    /// The container or pod the event belongs to, when a cgroup path says so.
    pub owner: Option<CgroupOwner>,
    /// Filled by the engine from the runtime's API; the kernel knows none of these.
    pub container_name: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
}

/// Named captures of the rule's pattern. The well-known names are typed; any other name is kept
/// in `extra`. A well-known capture that does not parse (a pid beyond u32) is kept in `extra`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EventFields {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub memcg: Option<String>,
    pub device: Option<String>,
    pub seconds: Option<u64>,
    pub extra: BTreeMap<String, String>,
}

impl EventFields {
    pub(crate) fn insert(&mut self, name: &str, value: &str) {
        let parsed = match name {
            "pid" => value.parse().map(|v| self.pid = Some(v)).is_ok(),
            "seconds" => value.parse().map(|v| self.seconds = Some(v)).is_ok(),
            "comm" => {
                self.comm = Some(value.to_string());
                true
            }
            "memcg" => {
                self.memcg = Some(value.to_string());
                true
            }
            "device" => {
                self.device = Some(value.to_string());
                true
            }
            _ => false,
        };
        if !parsed {
            self.extra.insert(name.to_string(), value.to_string());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OomInfo {
    pub victim: OomVictim,
    pub constraint: OomConstraint,
    /// The memory cgroup whose limit was hit (`oom_memcg=`, or `... limit of <memcg>`).
    pub memcg: Option<String>,
    /// The victim's own memory cgroup (`task_memcg=`, or `Task in <memcg> ...`).
    pub task_memcg: Option<String>,
}

impl KernelEvent {
    /// The `rule` label value.
    pub fn rule_label(&self) -> &str {
        &self.rule
    }

    /// The `victim` label value of an OOM kill: runc_init, runtime, container or host.
    pub fn victim_label(&self) -> Option<&'static str> {
        self.oom.as_ref().map(|o| o.victim.as_str())
    }

    /// The `constraint` label value of an OOM kill: memcg, global (or unknown).
    pub fn constraint_label(&self) -> Option<&'static str> {
        self.oom.as_ref().map(|o| o.constraint.as_str())
    }

    /// The `scope` label value of a hung task: runtime, container or host.
    pub fn hung_task_scope_label(&self) -> Option<&'static str> {
        self.hung_task_scope.map(HungTaskScope::as_str)
    }
}

/// Counter increments; sent as deltas, so the engine adds them up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct KernelLogCounters {
    /// Records returned by `read()`, whatever became of them.
    pub records_read: u64,
    /// Records overwritten before they could be read, counted from gaps in `seq`.
    pub lost: u64,
    /// Records from facilities other than `kern`, dropped because `accept_non_kernel` is off.
    pub ignored_non_kernel: u64,
    /// Records that did not parse.
    pub malformed: u64,
}

impl KernelLogCounters {
    pub fn is_zero(&self) -> bool {
        *self == KernelLogCounters::default()
    }

    /// Return the counts so far and start again from zero.
    pub fn take(&mut self) -> KernelLogCounters {
        std::mem::take(self)
    }
}

impl AddAssign for KernelLogCounters {
    fn add_assign(&mut self, other: KernelLogCounters) {
        self.records_read += other.records_read;
        self.lost += other.lost;
        self.ignored_non_kernel += other.ignored_non_kernel;
        self.malformed += other.malformed;
    }
}

/// The runc stage whose death by OOM wedges the runtime (kernel comm is 15 bytes at most).
pub const RUNC_INIT_COMM: &str = "runc:[2:INIT]";

/// Whether a kernel `comm` belongs to the container runtime stack. Comms are cut to 15 bytes,
/// so `docker-containerd-shim` shows as `docker-containe`. The `docker` CLI is a client, not
/// the runtime (it was the daemon's name only before Docker 1.12).
pub fn is_runtime_comm(comm: &str) -> bool {
    const EXACT: [&str; 8] = [
        "dockerd",
        "containerd",
        "runc",
        "docker-runc",
        "kubelet",
        RUNC_INIT_COMM,
        "runc:[0:PARENT]",
        "runc:[1:CHILD]",
    ];
    const PREFIXES: [&str; 2] = ["containerd-shim", "docker-containe"];
    EXACT.contains(&comm) || PREFIXES.iter().any(|p| comm.starts_with(p))
}

/// Classify an OOM victim from its comm and its memory cgroup path.
pub fn classify_oom_victim(comm: Option<&str>, memcg_owner: Option<&CgroupOwner>) -> OomVictim {
    match comm {
        Some(RUNC_INIT_COMM) => OomVictim::RuncInit,
        Some(c) if is_runtime_comm(c) => OomVictim::Runtime,
        _ if memcg_owner.is_some_and(CgroupOwner::is_container) => OomVictim::Container,
        _ => OomVictim::Host,
    }
}

/// Attribute a cgroup path; None unless it names a container or a pod.
pub fn owner_of_path(path: &str, containerd_namespaces: &[String]) -> Option<CgroupOwner> {
    let owner = attribute_path(path, containerd_namespaces);
    (owner.is_container() || owner.pod_uid.is_some()).then_some(owner)
}

/// Classify a hung task from its comm and, when it could be read, the text of
/// `/proc/<pid>/cgroup`.
pub fn classify_hung_task(
    comm: Option<&str>,
    proc_cgroup: Option<&str>,
    containerd_namespaces: &[String],
) -> (HungTaskScope, Option<CgroupOwner>) {
    let owner = proc_cgroup
        .map(|text| attribute_proc_cgroup(text, containerd_namespaces))
        .filter(|o| o.is_container() || o.pod_uid.is_some());
    let scope = if comm.is_some_and(is_runtime_comm) {
        HungTaskScope::Runtime
    } else if owner.as_ref().is_some_and(CgroupOwner::is_container) {
        HungTaskScope::Container
    } else {
        HungTaskScope::Host
    };
    (scope, owner)
}

/// The wall-clock time of a kernel timestamp (microseconds since boot on the printk clock,
/// which like CLOCK_MONOTONIC stops during suspend).
pub fn kernel_time_to_wall(ts_usec: u64) -> SystemTime {
    let now_wall = SystemTime::now();
    let Ok(monotonic) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) else {
        return now_wall;
    };
    let since_boot = Duration::from(monotonic);
    let age = since_boot.saturating_sub(Duration::from_micros(ts_usec));
    now_wall.checked_sub(age).unwrap_or(now_wall)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "a5498f937a723171a08c21118d0f0a5449af0fedb0873f4d6b1169dac452f4fc";

    fn ns() -> Vec<String> {
        vec!["moby".into(), "k8s.io".into()]
    }

    #[test]
    fn runtime_comms_include_truncated_names_but_not_the_cli() {
        for comm in [
            "dockerd",
            "containerd",
            "containerd-shim",
            "runc",
            "runc:[2:INIT]",
            "kubelet",
            "docker-containe",
            "docker-runc",
        ] {
            assert!(is_runtime_comm(comm), "{comm}");
        }
        for comm in ["docker", "java", "containerd2x", "runcx", "kube-proxy", ""] {
            assert!(!is_runtime_comm(comm), "{comm}");
        }
    }

    #[test]
    fn oom_victim_order_runc_init_runtime_container_host() {
        let container = owner_of_path(&format!("/docker/{ID}"), &ns());
        assert!(container.is_some());
        assert_eq!(
            classify_oom_victim(Some("runc:[2:INIT]"), container.as_ref()),
            OomVictim::RuncInit
        );
        assert_eq!(
            classify_oom_victim(Some("containerd-shim"), container.as_ref()),
            OomVictim::Runtime
        );
        assert_eq!(
            classify_oom_victim(Some("java"), container.as_ref()),
            OomVictim::Container
        );
        assert_eq!(classify_oom_victim(Some("java"), None), OomVictim::Host);
        assert_eq!(classify_oom_victim(None, None), OomVictim::Host);
        assert!(owner_of_path("/system.slice/docker.service", &ns()).is_none());
    }

    #[test]
    fn hung_task_scope_from_comm_then_proc_cgroup() {
        let in_container = format!("12:memory:/docker/{ID}\n0::/\n");
        let (scope, owner) = classify_hung_task(Some("dockerd"), Some("0::/\n"), &ns());
        assert_eq!((scope, owner), (HungTaskScope::Runtime, None));
        let (scope, owner) = classify_hung_task(Some("java"), Some(&in_container), &ns());
        assert_eq!(scope, HungTaskScope::Container);
        assert_eq!(owner.unwrap().container_id.as_deref(), Some(ID));
        let (scope, _) = classify_hung_task(Some("docker"), Some("0::/user.slice\n"), &ns());
        assert_eq!(scope, HungTaskScope::Host);
        let (scope, _) = classify_hung_task(Some("java"), None, &ns());
        assert_eq!(scope, HungTaskScope::Host);
    }

    #[test]
    fn fields_type_well_known_names_and_keep_the_rest() {
        let mut f = EventFields::default();
        f.insert("pid", "42");
        f.insert("seconds", "120");
        f.insert("comm", "runc:[2:INIT]");
        f.insert("cpu", "3");
        f.insert("memcg", "/docker/x");
        f.insert("device", "sda1");
        assert_eq!(f.pid, Some(42));
        assert_eq!(f.seconds, Some(120));
        assert_eq!(f.extra.get("cpu").map(String::as_str), Some("3"));
        let mut f = EventFields::default();
        f.insert("pid", "99999999999");
        assert_eq!(f.pid, None);
        assert_eq!(f.extra.get("pid").map(String::as_str), Some("99999999999"));
    }

    #[test]
    fn counters_add_and_take() {
        let mut total = KernelLogCounters::default();
        total += KernelLogCounters {
            records_read: 3,
            lost: 1,
            ignored_non_kernel: 2,
            malformed: 0,
        };
        total += KernelLogCounters {
            records_read: 1,
            ..Default::default()
        };
        assert_eq!(total.records_read, 4);
        let taken = total.take();
        assert_eq!(taken.lost, 1);
        assert!(total.is_zero());
    }
}
