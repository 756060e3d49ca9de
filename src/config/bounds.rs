//! The range of every configured value. Upper bounds keep every sum, product and deadline
//! computed from the configuration far from overflow (a `Duration` or an `Instant` plus a
//! day is always fine), and keep sizes from turning into memory: `config check` and start
//! refuse what is outside them. The ranges are documented in `default.yaml` and the README.

use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;

use super::Config;

/// Largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// containerd refuses longer namespace names.
pub const MAX_NAMESPACE_LEN: usize = 76;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// CRI sockets tried in order: the well-known ones and a few of the operator's.
const MAX_CRI_SOCKETS: usize = 8;
const MAX_PATH: usize = 4096;
const MAX_NAMESPACES: usize = 32;
const MAX_RULES: usize = 256;
const MAX_RULE_NAME: usize = 64;
const MAX_RULE_PATTERN: usize = 4096;
const MAX_LOG_LEVEL: usize = 256;

/// One value outside its range, or one inconsistency, with the key to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}
const MINUTE: u64 = 60;
const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// Whether `name` is an RFC 1123 subdomain, as a Kubernetes node name must be.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

/// At most 40 characters of `value` for a message: a 50 MB string is not echoed back.
pub fn excerpt(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(40).collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

fn duration(problems: &mut Vec<Problem>, key: &str, value: Duration, min: Duration, max: Duration) {
    if value < min || value > max {
        problems.push(Problem::new(
            key,
            format!(
                "{key} is {}; it must be between {} and {}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
}

fn count(problems: &mut Vec<Problem>, key: &str, value: u64, min: u64, max: u64) {
    if value < min || value > max {
        problems.push(Problem::new(
            key,
            format!("{key} is {value}; it must be between {min} and {max}"),
        ));
    }
}

fn size(problems: &mut Vec<Problem>, key: &str, value: ByteSize, min: ByteSize, max: ByteSize) {
    if value < min || value > max {
        problems.push(Problem::new(
            key,
            format!(
                "{key} is {}; it must be between {} and {}",
                value.display().iec(),
                min.display().iec(),
                max.display().iec()
            ),
        ));
    }
}

fn path(problems: &mut Vec<Problem>, key: &str, value: &Path, required: bool, max: usize) {
    let len = value.as_os_str().len();
    if (required && len == 0) || len > max {
        let low = usize::from(required);
        problems.push(Problem::new(
            key,
            format!("{key} is {len} bytes long; it must be {low} to {max} bytes"),
        ));
    }
}

/// Every value against its range.
pub fn check(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    let out = &mut p;
    if !c.node_name.is_empty() && !is_dns_subdomain(&c.node_name) {
        out.push(Problem::new(
            "node_name",
            format!(
                "node_name `{}` ({} bytes) is not a node name: a DNS subdomain of at most 253 \
                 characters (a-z, 0-9, `-`, `.`), or empty for $NODE_NAME or the hostname",
                excerpt(&c.node_name),
                c.node_name.len()
            ),
        ));
    }
    path(out, "state_dir", &c.state_dir, true, MAX_PATH);
    if c.log.level.len() > MAX_LOG_LEVEL {
        count(
            out,
            "log.level",
            c.log.level.len() as u64,
            1,
            MAX_LOG_LEVEL as u64,
        );
    }
    duration(out, "evaluate_interval", c.evaluate_interval, ms(10), s(10));

    let probes = &c.probes;
    duration(
        out,
        "probes.interval",
        probes.interval,
        ms(100),
        s(5 * MINUTE),
    );
    duration(
        out,
        "probes.slow_threshold",
        probes.slow_threshold,
        ms(0),
        s(10 * MINUTE),
    );
    duration(
        out,
        "probes.stall_threshold",
        probes.stall_threshold,
        ms(100),
        s(10 * MINUTE),
    );
    duration(
        out,
        "probes.deadline",
        probes.deadline,
        ms(200),
        s(30 * MINUTE),
    );

    path(
        out,
        "docker.socket",
        &c.docker.socket,
        true,
        MAX_SOCKET_PATH,
    );
    path(
        out,
        "docker.exec_root",
        &c.docker.exec_root,
        false,
        MAX_PATH,
    );
    path(out, "docker.pidfile", &c.docker.pidfile, false, MAX_PATH);
    path(
        out,
        "containerd.socket",
        &c.containerd.socket,
        true,
        MAX_SOCKET_PATH,
    );
    path(
        out,
        "containerd.stack_dump_dir",
        &c.containerd.stack_dump_dir,
        false,
        MAX_PATH,
    );
    path(
        out,
        "containerd.pidfile",
        &c.containerd.pidfile,
        false,
        MAX_PATH,
    );
    count(
        out,
        "containerd.namespaces",
        c.containerd.namespaces.len() as u64,
        0,
        MAX_NAMESPACES as u64,
    );
    count(
        out,
        "cri.sockets",
        c.cri.sockets.len() as u64,
        1,
        MAX_CRI_SOCKETS as u64,
    );
    for socket in &c.cri.sockets {
        path(out, "cri.sockets", socket, true, MAX_SOCKET_PATH);
    }

    let kernel = &c.kernel_log;
    path(out, "kernel_log.path", &kernel.path, true, MAX_PATH);
    duration(
        out,
        "kernel_log.syslog_poll_interval",
        kernel.syslog_poll_interval,
        ms(100),
        s(MINUTE),
    );
    duration(
        out,
        "kernel_log.check_lookback",
        kernel.check_lookback,
        s(1),
        s(DAY),
    );
    duration(
        out,
        "kernel_log.retry_initial",
        kernel.retry_initial,
        ms(10),
        s(MINUTE),
    );
    duration(
        out,
        "kernel_log.retry_max",
        kernel.retry_max,
        ms(10),
        s(HOUR),
    );
    count(
        out,
        "kernel_log.recent_events",
        kernel.recent_events as u64,
        1,
        100_000,
    );
    count(
        out,
        "kernel_log.rules",
        kernel.rules.len() as u64,
        0,
        MAX_RULES as u64,
    );
    for (index, rule) in kernel.rules.iter().enumerate() {
        let key = format!("kernel_log.rules[{index}]");
        if rule.name.is_empty() || rule.name.len() > MAX_RULE_NAME {
            out.push(Problem::new(
                "kernel_log.rules",
                format!("{key}.name must be 1 to {MAX_RULE_NAME} bytes"),
            ));
        }
        if rule.pattern.len() > MAX_RULE_PATTERN {
            out.push(Problem::new(
                "kernel_log.rules",
                format!("{key}.pattern must be at most {MAX_RULE_PATTERN} bytes"),
            ));
        }
        if let Some(clear_after) = rule.clear_after {
            duration(
                out,
                &format!("{key}.clear_after"),
                clear_after,
                s(1),
                s(30 * DAY),
            );
        }
    }

    let scan = &c.proc_scan;
    path(out, "proc_scan.proc_root", &scan.proc_root, true, MAX_PATH);
    path(out, "proc_scan.sys_root", &scan.sys_root, true, MAX_PATH);
    path(
        out,
        "proc_scan.cgroup_root",
        &scan.cgroup_root,
        true,
        MAX_PATH,
    );
    duration(
        out,
        "proc_scan.interval",
        scan.interval,
        ms(100),
        s(10 * MINUTE),
    );
    duration(
        out,
        "proc_scan.stuck_after",
        scan.stuck_after,
        ms(0),
        s(HOUR),
    );
    duration(
        out,
        "proc_scan.runc_stuck_after",
        scan.runc_stuck_after,
        s(1),
        s(HOUR),
    );
    duration(
        out,
        "proc_scan.runc_init_stuck_after",
        scan.runc_init_stuck_after,
        s(1),
        s(HOUR),
    );
    duration(
        out,
        "proc_scan.read_deadline",
        scan.read_deadline,
        ms(10),
        s(MINUTE),
    );

    let dumps = &c.dumps;
    count(
        out,
        "dumps.trigger_states",
        dumps.trigger_states.len() as u64,
        0,
        4,
    );
    duration(out, "dumps.cooldown", dumps.cooldown, ms(0), s(DAY));
    count(
        out,
        "dumps.max_per_hour",
        u64::from(dumps.max_per_hour),
        0,
        60,
    );
    duration(out, "dumps.wait", dumps.wait, ms(100), s(10 * MINUTE));
    duration(
        out,
        "dumps.background_wait",
        dumps.background_wait,
        ms(0),
        s(DAY),
    );
    count(out, "dumps.keep_files", dumps.keep_files as u64, 1, 10_000);
    size(
        out,
        "dumps.keep_bytes",
        dumps.keep_bytes,
        ByteSize::kib(1),
        ByteSize::gib(64),
    );
    size(
        out,
        "dumps.max_file_bytes",
        dumps.max_file_bytes,
        ByteSize::kib(1),
        ByteSize::gib(4),
    );

    count(out, "incidents.keep", c.incidents.keep as u64, 1, 100_000);

    let lifecycle = &c.lifecycle;
    duration(
        out,
        "lifecycle.stop_timeout",
        lifecycle.stop_timeout,
        ms(0),
        s(HOUR),
    );
    duration(
        out,
        "lifecycle.stop_grace",
        lifecycle.stop_grace,
        ms(100),
        s(HOUR),
    );
    count(
        out,
        "lifecycle.recent_stops",
        lifecycle.recent_stops as u64,
        1,
        100_000,
    );
    count(
        out,
        "lifecycle.recent_exits",
        lifecycle.recent_exits as u64,
        1,
        100_000,
    );
    count(
        out,
        "lifecycle.max_stuck_series",
        lifecycle.max_stuck_series as u64,
        0,
        10_000,
    );

    let ns = &c.node_status;
    path(
        out,
        "node_status.kubeconfig",
        &ns.kubeconfig,
        false,
        MAX_PATH,
    );
    duration(
        out,
        "node_status.request_timeout",
        ns.request_timeout,
        ms(100),
        s(5 * MINUTE),
    );
    duration(
        out,
        "node_status.heartbeat_period",
        ns.heartbeat_period,
        s(1),
        s(HOUR),
    );
    duration(
        out,
        "node_status.retry_interval",
        ns.retry_interval,
        ms(100),
        s(10 * MINUTE),
    );
    duration(out, "node_status.hold_down", ns.hold_down, ms(0), s(DAY));
    for (key, condition) in [
        ("node_status.runtime_unhealthy.type", &ns.runtime_unhealthy),
        ("node_status.tasks_stuck.type", &ns.tasks_stuck),
        ("node_status.stop_stuck.type", &ns.stop_stuck),
    ] {
        condition_type(out, key, &condition.type_name);
    }
    count(
        out,
        "node_status.events.max_per_minute",
        u64::from(ns.events.max_per_minute),
        1,
        600,
    );
    duration(
        out,
        "node_status.events.series_window",
        ns.events.series_window,
        s(1),
        s(DAY),
    );
    p
}

/// Conditions kubelet owns: hangwatch must never write them, so it may not be told to own one.
pub const KUBELET_CONDITIONS: [&str; 5] = [
    "Ready",
    "MemoryPressure",
    "DiskPressure",
    "PIDPressure",
    "NetworkUnavailable",
];
const MAX_CONDITION_TYPE: usize = 63;

/// A condition type is a CamelCase word (what NHC, MHC, draino and Karpenter match on), not one
/// of kubelet's.
fn condition_type(problems: &mut Vec<Problem>, key: &str, value: &str) {
    let word = !value.is_empty()
        && value.len() <= MAX_CONDITION_TYPE
        && value.starts_with(|c: char| c.is_ascii_uppercase())
        && value.bytes().all(|b| b.is_ascii_alphanumeric());
    if !word {
        problems.push(Problem::new(
            key,
            format!(
                "{key} `{}` must be 1 to {MAX_CONDITION_TYPE} ASCII letters and digits starting \
                 with a capital (e.g. ContainerRuntimeUnhealthy)",
                excerpt(value)
            ),
        ));
    } else if KUBELET_CONDITIONS.contains(&value) {
        problems.push(Problem::new(
            key,
            format!("{key} `{value}` is kubelet's condition; hangwatch never writes it"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_within_every_bound() {
        assert_eq!(check(&Config::default()), Vec::new());
    }

    #[test]
    fn condition_types_are_camel_case_words_and_never_kubelets() {
        let problems = |type_name: &str| {
            let mut c = Config::default();
            c.node_status.tasks_stuck.type_name = type_name.into();
            check(&c)
        };
        assert_eq!(problems("KernelDeadlock"), Vec::new());
        for bad in [
            "Ready",
            "DiskPressure",
            "runtimeBad",
            "Has Space",
            "",
            &"A".repeat(64),
        ] {
            let found = problems(bad);
            assert_eq!(found.len(), 1, "{bad}: {found:?}");
            assert_eq!(found[0].key, "node_status.tasks_stuck.type");
        }
        let mut c = Config::default();
        c.node_status.stop_stuck.type_name = c.node_status.tasks_stuck.type_name.clone();
        assert!(c.validate().is_err(), "two conditions of one type");
    }

    #[test]
    fn node_names_and_excerpts() {
        assert!(is_dns_subdomain("ip-10-0-0-1.eu-west-1.compute.internal"));
        for bad in ["", "Node", "a/b", "-a", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
        assert_eq!(excerpt("short"), "short");
        assert_eq!(excerpt(&"é".repeat(100)).chars().count(), 41);
    }
}
