//! Configuration: YAML, every key optional, defaults in `default.yaml` (which is also what
//! `hangwatch config default` prints, so the documented defaults cannot drift from the code).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

mod bounds;

use crate::domain::Runtime;
use crate::sources::runtime::verdict::RuntimeState;
use bounds::Problem;
pub use bounds::{MAX_CONFIG_BYTES, is_dns_subdomain};

/// The commented default configuration, printed by `hangwatch config default`.
pub const DEFAULT_YAML: &str = include_str!("default.yaml");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node_name: String,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    #[serde(with = "humantime_serde")]
    pub evaluate_interval: Duration,
    pub probes: ProbeConfig,
    pub docker: DockerConfig,
    pub containerd: ContainerdConfig,
    pub cri: CriConfig,
    pub kernel_log: KernelLogConfig,
    pub proc_scan: ProcScanConfig,
    pub dumps: DumpConfig,
    pub incidents: IncidentConfig,
    pub lifecycle: LifecycleConfig,
    pub node_status: NodeStatusConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub node_label: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub slow_threshold: Duration,
    #[serde(with = "humantime_serde")]
    pub stall_threshold: Duration,
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

/// Whether a runtime is expected on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeMode {
    /// Probe it; a missing socket means "absent" until it has been seen up once.
    Auto,
    /// Probe it; a missing socket always means "down".
    Required,
    /// Do not probe it at all.
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    pub mode: RuntimeMode,
    pub socket: PathBuf,
    pub exec_root: PathBuf,
    pub pidfile: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    pub mode: RuntimeMode,
    pub socket: PathBuf,
    pub namespaces: Vec<String>,
    pub stack_dump_dir: PathBuf,
    pub pidfile: PathBuf,
}

/// The CRI socket kubelet talks to: the first of `sockets` that exists and serves
/// `runtime.v1.RuntimeService` is probed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    pub mode: RuntimeMode,
    pub sockets: Vec<PathBuf>,
}

/// Where the kernel log is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLogSource {
    /// `/dev/kmsg`; syslog(2) when the kernel refuses to open it (an unprivileged container).
    Auto,
    /// Only `kernel_log.path`.
    Kmsg,
    /// Only syslog(2), polled every `kernel_log.syslog_poll_interval` (needs CAP_SYSLOG when
    /// `kernel.dmesg_restrict` is 1).
    Syslog,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KernelLogConfig {
    pub enabled: bool,
    pub source: KernelLogSource,
    pub path: PathBuf,
    #[serde(with = "humantime_serde")]
    pub syslog_poll_interval: Duration,
    pub accept_non_kernel: bool,
    #[serde(with = "humantime_serde")]
    pub check_lookback: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub recent_events: usize,
    pub rules: Vec<KernelRule>,
}

/// A kernel log rule: built-in rules come from `detectors/kernel/default_rules.yaml`; rules in
/// the config are added, or replace a built-in rule of the same name.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRule {
    pub name: String,
    /// Regex matched against the message text. Named groups are extracted as fields:
    /// `pid`, `comm`, `memcg`, `device`, `seconds`, and any other name.
    pub pattern: String,
    #[serde(default)]
    pub severity: Severity,
    #[serde(default)]
    pub kind: RuleKind,
    /// For conditions: cleared when the rule has not matched for this long. None: held
    /// until hangwatch restarts (e.g. a filesystem remounted read-only never heals).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub clear_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    #[default]
    Warning,
    Critical,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    /// A one-off event: counted, kept in the recent ring.
    #[default]
    Temporary,
    /// A state of the node that holds until cleared.
    Condition,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcScanConfig {
    pub enabled: bool,
    pub proc_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// sysfs: block devices (`dev/block`) and FUSE connections (`fs/fuse/connections`).
    pub sys_root: PathBuf,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    #[serde(with = "humantime_serde")]
    pub runc_stuck_after: Duration,
    #[serde(with = "humantime_serde")]
    pub runc_init_stuck_after: Duration,
    #[serde(with = "humantime_serde")]
    pub read_deadline: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DumpConfig {
    pub enabled: bool,
    /// Parsed at load: a state name that does not exist is a load error naming the key.
    pub trigger_states: Vec<RuntimeState>,
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    pub max_per_hour: u32,
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
    #[serde(with = "humantime_serde")]
    pub background_wait: Duration,
    pub keep_files: usize,
    pub keep_bytes: ByteSize,
    pub max_file_bytes: ByteSize,
    pub clean_docker_dumps: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IncidentConfig {
    pub keep: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    pub enabled: bool,
    /// The stop timeout assumed when neither a SIGKILL nor kubelet's grace period says it.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
    pub recent_stops: usize,
    /// Container exits from containerd's events kept for `/stops` and `check`.
    pub recent_exits: usize,
    /// Per-container `hangwatch_stuck_container_stop_seconds` series at most.
    pub max_stuck_series: usize,
}

/// Node conditions and Events on the Kubernetes API (`src/node_status/`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeStatusConfig {
    pub enabled: bool,
    /// Empty: in-cluster (service-account token and CA, `KUBERNETES_SERVICE_HOST`).
    pub kubeconfig: PathBuf,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_period: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub hold_down: Duration,
    pub runtime_unhealthy: ConditionConfig,
    pub tasks_stuck: ConditionConfig,
    pub stop_stuck: ConditionConfig,
    pub events: NodeEventsConfig,
}

/// One condition hangwatch owns on its Node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionConfig {
    pub enabled: bool,
    /// The condition's `type`.
    #[serde(rename = "type")]
    pub type_name: String,
    pub polarity: Polarity,
}

/// What `status: "True"` means for a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Polarity {
    /// True while the problem holds (node-problem-detector's style: `KernelDeadlock=True`).
    Problem,
    /// True while healthy (Karpenter's and EKS's `ContainerRuntimeReady=False` is the problem).
    Healthy,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeEventsConfig {
    pub enabled: bool,
    /// Events created or updated per minute at most; the rest are dropped and counted.
    pub max_per_minute: u32,
    /// A repeat within this window updates the event's count and lastTimestamp.
    #[serde(with = "humantime_serde")]
    pub series_window: Duration,
}

impl Default for NodeStatusConfig {
    fn default() -> Self {
        let condition = |type_name: &str| ConditionConfig {
            enabled: true,
            type_name: type_name.into(),
            polarity: Polarity::Problem,
        };
        NodeStatusConfig {
            enabled: false,
            kubeconfig: PathBuf::new(),
            request_timeout: secs(10),
            heartbeat_period: secs(300),
            retry_interval: secs(5),
            hold_down: secs(0),
            runtime_unhealthy: condition("ContainerRuntimeUnhealthy"),
            tasks_stuck: condition("RuntimeTasksStuck"),
            stop_stuck: condition("ContainerStopStuck"),
            events: NodeEventsConfig::default(),
        }
    }
}

impl Default for NodeEventsConfig {
    fn default() -> Self {
        NodeEventsConfig {
            enabled: true,
            max_per_minute: 12,
            series_window: secs(600),
        }
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_name: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 9807)),
            state_dir: PathBuf::from("/var/lib/hangwatch"),
            log: LogConfig::default(),
            metrics: MetricsConfig { node_label: true },
            evaluate_interval: Duration::from_millis(250),
            probes: ProbeConfig::default(),
            docker: DockerConfig::default(),
            containerd: ContainerdConfig::default(),
            cri: CriConfig::default(),
            kernel_log: KernelLogConfig::default(),
            proc_scan: ProcScanConfig::default(),
            dumps: DumpConfig::default(),
            incidents: IncidentConfig { keep: 100 },
            lifecycle: LifecycleConfig::default(),
            node_status: NodeStatusConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { node_label: true }
    }
}

impl Default for IncidentConfig {
    fn default() -> Self {
        IncidentConfig { keep: 100 }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: secs(5),
            slow_threshold: secs(2),
            stall_threshold: secs(10),
            deadline: secs(30),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            mode: RuntimeMode::Auto,
            socket: "/var/run/docker.sock".into(),
            exec_root: "/var/run/docker".into(),
            pidfile: "/var/run/docker.pid".into(),
        }
    }
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            mode: RuntimeMode::Auto,
            socket: "/run/containerd/containerd.sock".into(),
            namespaces: vec!["moby".into(), "k8s.io".into()],
            stack_dump_dir: "/tmp".into(),
            pidfile: PathBuf::new(),
        }
    }
}

impl Default for CriConfig {
    fn default() -> Self {
        CriConfig {
            mode: RuntimeMode::Auto,
            sockets: vec![
                "/run/containerd/containerd.sock".into(),
                "/var/run/crio/crio.sock".into(),
                "/run/cri-dockerd.sock".into(),
            ],
        }
    }
}

impl Default for KernelLogConfig {
    fn default() -> Self {
        KernelLogConfig {
            enabled: true,
            source: KernelLogSource::Auto,
            path: "/dev/kmsg".into(),
            syslog_poll_interval: secs(1),
            accept_non_kernel: false,
            check_lookback: secs(600),
            retry_initial: secs(1),
            retry_max: secs(60),
            recent_events: 256,
            rules: Vec::new(),
        }
    }
}

impl Default for ProcScanConfig {
    fn default() -> Self {
        ProcScanConfig {
            enabled: true,
            proc_root: "/proc".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            sys_root: "/sys".into(),
            interval: secs(10),
            stuck_after: secs(30),
            runc_stuck_after: secs(60),
            runc_init_stuck_after: secs(60),
            read_deadline: secs(2),
        }
    }
}

impl Default for DumpConfig {
    fn default() -> Self {
        DumpConfig {
            enabled: true,
            trigger_states: vec![RuntimeState::Wedged, RuntimeState::Hung],
            cooldown: secs(600),
            max_per_hour: 3,
            wait: secs(30),
            background_wait: secs(1800),
            keep_files: 20,
            keep_bytes: ByteSize::mib(200),
            max_file_bytes: ByteSize::mib(64),
            clean_docker_dumps: false,
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            enabled: true,
            stop_timeout: secs(10),
            stop_grace: secs(30),
            recent_stops: 256,
            recent_exits: 256,
            max_stuck_series: 200,
        }
    }
}

/// A configuration that could not be loaded. The message names the key and, where the
/// problem is in the file, its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Load from a file, or the defaults when `path` is None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.validate()?;
            return Ok(config);
        };
        let text = read_bounded(path).map_err(|message| ConfigError {
            message: format!("cannot read config file {}: {message}", path.display()),
        })?;
        Config::parse(&text).map_err(|e| ConfigError {
            message: format!("{}: {}", path.display(), e.message),
        })
    }

    /// Parse and validate YAML text. An empty document gives the defaults.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| {
                let (line, column) = e
                    .location()
                    .map(|l| (l.line() as usize, l.column() as usize))
                    .unwrap_or((0, 0));
                let key = key_path_at_line(text, line)
                    .map(|k| format!(" (key `{k}`)"))
                    .unwrap_or_default();
                let rendered = e.to_string();
                let reason = first_line_of(&rendered);
                ConfigError {
                    message: format!("line {line}, column {column}{key}: {reason}"),
                }
            })?
        };
        let problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        let lines = key_lines(text);
        Err(ConfigError {
            message: problems
                .iter()
                .map(|p| match lines.get(p.key.as_str()) {
                    Some(line) => format!("line {line} (key `{}`): {}", p.key, p.message),
                    None => format!("key `{}`: {}", p.key, p.message),
                })
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    /// Every problem in the configuration, joined: each names its key and the allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                message: problems
                    .iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            })
        }
    }

    /// Bounds of every key and checks that span keys (see `bounds.rs` for the ranges).
    fn problems(&self) -> Vec<Problem> {
        let mut problems = bounds::check(self);
        let p = &self.probes;
        if p.slow_threshold > p.stall_threshold {
            problems.push(Problem::new(
                "probes.slow_threshold",
                "probes.slow_threshold must not exceed probes.stall_threshold",
            ));
        }
        if p.stall_threshold >= p.deadline {
            problems.push(Problem::new(
                "probes.stall_threshold",
                "probes.stall_threshold must be shorter than probes.deadline (a stall is declared \
                 while the probe is still in flight)",
            ));
        }
        if self.kernel_log.retry_max < self.kernel_log.retry_initial {
            problems.push(Problem::new(
                "kernel_log.retry_max",
                "kernel_log.retry_max must not be shorter than kernel_log.retry_initial",
            ));
        }
        for (index, ns) in self.containerd.namespaces.iter().enumerate() {
            if ns.is_empty()
                || ns.len() > bounds::MAX_NAMESPACE_LEN
                || !ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                problems.push(Problem::new(
                    "containerd.namespaces",
                    format!(
                        "containerd.namespaces[{index}] `{}` is not a valid containerd namespace \
                         (1 to {} of a-z, A-Z, 0-9, `.`, `_`, `-`)",
                        bounds::excerpt(ns),
                        bounds::MAX_NAMESPACE_LEN
                    ),
                ));
            }
        }
        for (index, state) in self.dumps.trigger_states.iter().enumerate() {
            if !RuntimeState::TRIGGERS.contains(state) {
                problems.push(Problem::new(
                    "dumps.trigger_states",
                    format!(
                        "dumps.trigger_states[{index}] `{}` is not one of slow, wedged, hung, down",
                        state.as_str()
                    ),
                ));
            }
        }
        for (index, rule) in self.kernel_log.rules.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&rule.pattern) {
                problems.push(Problem::new(
                    "kernel_log.rules",
                    format!(
                        "kernel_log.rules[{index}] `{}`: pattern does not compile: {}",
                        bounds::excerpt(&rule.name),
                        first_line_of(&e.to_string())
                    ),
                ));
            }
        }
        let ns = &self.node_status;
        let types = [
            &ns.runtime_unhealthy.type_name,
            &ns.tasks_stuck.type_name,
            &ns.stop_stuck.type_name,
        ];
        if types[0] == types[1] || types[0] == types[2] || types[1] == types[2] {
            problems.push(Problem::new(
                "node_status.tasks_stuck.type",
                "node_status: each condition needs a type of its own",
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            problems.push(Problem::new(
                "log.level",
                format!(
                    "log.level `{}` is not a log level (error, warn, info, debug, trace)",
                    bounds::excerpt(&self.log.level)
                ),
            ));
        }
        problems
    }

    /// The node name: configured, else `$NODE_NAME`, else the hostname.
    /// How `runtime` is to be probed.
    pub fn runtime_mode(&self, runtime: Runtime) -> RuntimeMode {
        match runtime {
            Runtime::Docker => self.docker.mode,
            Runtime::Containerd => self.containerd.mode,
            Runtime::Cri => self.cri.mode,
        }
    }

    pub fn resolved_node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        if let Ok(name) = std::env::var("NODE_NAME")
            && !name.is_empty()
        {
            if is_dns_subdomain(&name) {
                return name;
            }
            tracing::warn!(
                node_name = %bounds::excerpt(&name),
                bytes = name.len(),
                "$NODE_NAME is not a node name (a DNS subdomain of at most 253 characters): using the hostname"
            );
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into())
    }

    /// Where copied goroutine dumps are kept.
    pub fn dump_dir(&self) -> PathBuf {
        self.state_dir.join("dumps")
    }

    /// Where incident records are kept.
    pub fn incident_dir(&self) -> PathBuf {
        self.state_dir.join("incidents")
    }
}

fn first_line_of(s: &str) -> &str {
    let line = s.lines().next().unwrap_or(s);
    line.strip_prefix("error: ").unwrap_or(line)
}

/// The dotted path of the key on `line` (1-based) of a block-style YAML document, found from
/// indentation: `probes:` then `  count: 3` on line 3 gives `probes.count`.
fn key_path_at_line(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let target = lines.get(line.checked_sub(1)?)?;
    let mut indent = indentation(target);
    let mut path = vec![key_of(target)?];
    for previous in lines[..line - 1].iter().rev() {
        if previous.trim().is_empty() || previous.trim_start().starts_with('#') {
            continue;
        }
        let i = indentation(previous);
        if i < indent
            && let Some(key) = key_of(previous)
        {
            path.push(key);
            indent = i;
            if i == 0 {
                break;
            }
        }
    }
    path.reverse();
    Some(path.join("."))
}

/// The line (1-based) of every key of a block-style YAML document, by dotted path, in one
/// pass: the first occurrence of each path wins.
fn key_lines(text: &str) -> std::collections::HashMap<String, usize> {
    let mut lines = std::collections::HashMap::new();
    let mut stack: Vec<(usize, &str)> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some(key) = key_of(line) else { continue };
        let indent = indentation(line);
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        stack.push((indent, key));
        let path = stack.iter().map(|(_, k)| *k).collect::<Vec<_>>().join(".");
        lines.entry(path).or_insert(index + 1);
    }
    lines
}

/// Read a config file only if it is a regular file, and at most [`MAX_CONFIG_BYTES`]: a FIFO
/// is opened without blocking and refused, `/dev/zero` is refused before any read.
fn read_bounded(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.to_string())?;
    let metadata = file.metadata().map_err(|e| e.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file".into());
    }
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "{} bytes: larger than the {MAX_CONFIG_BYTES} bytes a configuration may have",
            metadata.len()
        ));
    }
    let mut bytes = Vec::new();
    // One byte more than allowed tells a file that grew after the check.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "larger than the {MAX_CONFIG_BYTES} bytes a configuration may have"
        ));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".into())
}

fn indentation(line: &str) -> usize {
    line.len() - line.trim_start_matches([' ', '-']).len()
}

fn key_of(line: &str) -> Option<&str> {
    let trimmed = line.trim_start_matches([' ', '-']);
    let (key, _) = trimmed.split_once(':')?;
    let key = key.trim().trim_matches(['"', '\'']);
    (!key.is_empty() && !key.contains(' ')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_yaml_is_exactly_the_built_in_default() {
        let parsed = Config::parse(DEFAULT_YAML).expect("default.yaml parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn defaults_match_the_issue() {
        let c = Config::default();
        assert_eq!(c.probes.interval, secs(5));
        assert_eq!(c.probes.stall_threshold, secs(10));
        assert_eq!(c.probes.deadline, secs(30));
        assert_eq!(c.containerd.namespaces, vec!["moby", "k8s.io"]);
        assert_eq!(c.dumps.keep_files, 20);
        assert_eq!(c.dumps.keep_bytes, ByteSize::mib(200));
        assert_eq!(c.lifecycle.stop_timeout, secs(10), "Docker's own default");
        assert_eq!(c.lifecycle.stop_grace, secs(30));
    }

    #[test]
    fn empty_and_partial_documents_fill_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
        let c = Config::parse("probes:\n  interval: 2s\n").unwrap();
        assert_eq!(c.probes.interval, secs(2));
        assert_eq!(c.probes.deadline, secs(30));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::parse("node_name: x\nprobes:\n  intervl: 5s\n").unwrap_err();
        assert!(e.message.contains("line 3"), "{}", e.message);
        assert!(e.message.contains("probes.intervl"), "{}", e.message);
    }

    #[test]
    fn bad_value_names_key_and_line() {
        let e = Config::parse("probes:\n  interval: 5s\n  deadline: soon\n").unwrap_err();
        assert!(e.message.contains("line 3"), "{}", e.message);
        assert!(e.message.contains("probes.deadline"), "{}", e.message);
        let e = Config::parse("dumps:\n  keep_files: -1\n").unwrap_err();
        assert!(e.message.contains("dumps.keep_files"), "{}", e.message);
    }

    #[test]
    fn cross_key_checks_name_both_keys() {
        let e = Config::parse("probes:\n  stall_threshold: 40s\n").unwrap_err();
        assert!(
            e.message.contains("probes.stall_threshold"),
            "{}",
            e.message
        );
        assert!(e.message.contains("probes.deadline"), "{}", e.message);
        let e = Config::parse("probes:\n  interval: 0s\n").unwrap_err();
        assert!(e.message.contains("probes.interval"), "{}", e.message);
    }

    #[test]
    fn invalid_namespace_state_and_regex_are_rejected() {
        let e = Config::parse("containerd:\n  namespaces: [\"bad ns\"]\n").unwrap_err();
        assert!(
            e.message.contains("containerd.namespaces[0]"),
            "{}",
            e.message
        );
        let e = Config::parse("dumps:\n  trigger_states: [stuck]\n").unwrap_err();
        assert!(
            e.message.contains("dumps.trigger_states") && e.message.contains("stuck"),
            "{}",
            e.message
        );
        let e = Config::parse("dumps:\n  trigger_states: [pending]\n").unwrap_err();
        assert!(
            e.message.contains("dumps.trigger_states[0]"),
            "{}",
            e.message
        );
        let e = Config::parse("kernel_log:\n  rules:\n    - name: x\n      pattern: \"(\"\n")
            .unwrap_err();
        assert!(e.message.contains("kernel_log.rules[0]"), "{}", e.message);
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        for text in [
            "node_name: [\n",
            "\t\tgarbage: : :",
            "probes: 5",
            "- a\n- b\n",
        ] {
            assert!(Config::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn key_path_from_indentation() {
        let text = "a: 1\nprobes:\n  # comment\n  x: 1\n  nested:\n    deep: 2\n";
        assert_eq!(
            key_path_at_line(text, 6).as_deref(),
            Some("probes.nested.deep")
        );
        assert_eq!(key_path_at_line(text, 1).as_deref(), Some("a"));
        assert_eq!(key_path_at_line(text, 99), None);
    }
}
