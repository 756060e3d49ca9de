//! What a stack is waiting for, and which daemon a dump came from.
//!
//! The rules come from the real dumps in `tests/fixtures/dumps/` (dockerd 20.10, containerd
//! 1.6) and from the function names of moby, containerd, go-runc, grpc-go and ttrpc across
//! their versions (including the vendored `.../vendor/...` names of pre-module builds, and the
//! `github.com/docker/containerd` API of Docker 17.03's containerd 0.2).
//!
//! Order matters: a lock wait at the top of the stack wins, then a call into the layer below
//! (containerd over gRPC, a shim over ttrpc, runc as a child process), then waits that are idle
//! or long by design, then requests, then everything else.

use serde::Serialize;

use super::parse::RawFrame;

/// Why a goroutine is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitKind {
    /// Waiting to acquire a `sync.Mutex` / `sync.RWMutex`.
    Lock,
    /// Blocked in a gRPC call to containerd (from dockerd, or any containerd client).
    Containerd,
    /// Blocked in a call to a containerd shim (ttrpc, or gRPC for the old v1 shim), or while
    /// starting one.
    Shim,
    /// Waiting for a runc invocation to finish (go-runc, or the process reaper).
    Runc,
    /// An API request handler waiting on something else (a channel, a condition, I/O).
    Request,
    /// A wait that is long by design: event subscriptions, `docker wait`/attach, process exit
    /// waits, container I/O copying.
    Stream,
    /// Background machinery: accept loops, signal handlers, GC, timers, transport loops, the
    /// daemon's main goroutine.
    Idle,
    /// On a CPU or runnable.
    Running,
    /// Waiting, for no reason the rules recognise.
    Other,
}

impl WaitKind {
    /// The kinds a hang verdict is about.
    pub fn is_blocked(self) -> bool {
        matches!(
            self,
            Self::Lock | Self::Containerd | Self::Shim | Self::Runc | Self::Request
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Classified {
    pub kind: WaitKind,
    /// The daemon function where the wait is decided (the caller of `Lock`, the API call, ...).
    pub site: Option<String>,
    /// What is waited for: `sync.Mutex`, `leases.Create`, `go-runc.(*Runc).Start`, ...
    pub detail: Option<String>,
    /// Index of the most telling frame, where a short listing of the stack should start.
    pub anchor: usize,
}

impl Classified {
    fn new(kind: WaitKind, anchor: usize) -> Self {
        Self {
            kind,
            site: None,
            detail: None,
            anchor,
        }
    }
}

/// The function name with any `.../vendor/` prefix of a pre-module build removed.
pub(crate) fn key(function: &str) -> &str {
    let tail = match function.rfind("/vendor/") {
        Some(at) => &function[at + "/vendor/".len()..],
        None => function,
    };
    // GOPATH-era vendoring inside containerd 0.2 used `vendor/src/`.
    tail.strip_prefix("src/").unwrap_or(tail)
}

/// The import path of a function's package: up to the first `.` after the last `/`.
fn package(key: &str) -> &str {
    let head_end = key.find(['(', '[']).unwrap_or(key.len());
    let slash = key[..head_end].rfind('/').map_or(0, |i| i + 1);
    match key[slash..].find('.') {
        Some(dot) => &key[..slash + dot],
        None => key,
    }
}

fn is_std(key: &str) -> bool {
    let package = package(key);
    let first = package.split('/').next().unwrap_or(package);
    !first.contains('.') && first != "main"
}

const PLUMBING_PREFIXES: &[&str] = &[
    "golang.org/x/",
    "google.golang.org/grpc",
    "google.golang.org/protobuf",
    "github.com/golang/protobuf",
    "github.com/gogo/protobuf",
    "github.com/containerd/ttrpc",
    "github.com/stevvooe/ttrpc",
];

/// The standard library and the RPC libraries: frames that say how, not where, a daemon waits.
fn is_plumbing(key: &str) -> bool {
    is_std(key) || PLUMBING_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// `a/b/c.(*T).m` → `c.(*T).m`, for display.
pub fn short_function(function: &str) -> &str {
    let function = key(function);
    let head_end = function.find(['(', '[']).unwrap_or(function.len());
    match function[..head_end].rfind('/') {
        Some(at) => &function[at + 1..],
        None => function,
    }
}

const RUNNING_STATES: &[&str] = &[
    "running",
    "runnable",
    "GC assist marking",
    "GC worker (active)",
    "GC mark termination",
    "preempted",
    "copystack",
    "garbage collection",
    "garbage collection scan",
    "dumping heap",
    "stopping the world",
    "flushing proc caches",
    "debug call",
];

const IDLE_STATES: &[&str] = &[
    "GC worker (idle)",
    "GC sweep wait",
    "GC scavenge wait",
    "GC weak to strong wait",
    "finalizer wait",
    "force gc (idle)",
    "timer goroutine (idle)",
    "trace reader (blocked)",
    "cleanup wait",
    "wait for GC cycle",
    "sleep",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockMode {
    Mutex,
    Write,
    Read,
}

impl LockMode {
    fn label(self) -> &'static str {
        match self {
            Self::Mutex => "sync.Mutex",
            Self::Write => "sync.RWMutex",
            Self::Read => "sync.RWMutex (read)",
        }
    }
}

fn lock_frame(key: &str) -> Option<LockMode> {
    let key = key.strip_prefix("internal/").unwrap_or(key);
    match key {
        "sync.(*Mutex).Lock" | "sync.(*Mutex).lockSlow" | "sync.runtime_SemacquireMutex" => {
            Some(LockMode::Mutex)
        }
        "sync.(*RWMutex).Lock" | "sync.runtime_SemacquireRWMutex" => Some(LockMode::Write),
        "sync.(*RWMutex).RLock" | "sync.runtime_SemacquireRWMutexR" => Some(LockMode::Read),
        _ => None,
    }
}

fn lock_state(state: &str) -> Option<LockMode> {
    match state {
        "sync.Mutex.Lock" => Some(LockMode::Mutex),
        "sync.RWMutex.Lock" => Some(LockMode::Write),
        "sync.RWMutex.RLock" => Some(LockMode::Read),
        _ => None,
    }
}

/// Helpers that only take a lock (`locker.(*Locker).Lock`, `(*client).lock`): the interesting
/// site is their caller.
fn is_lock_wrapper(key: &str) -> bool {
    let method = key.rsplit('.').next().unwrap_or(key);
    matches!(method, "Lock" | "RLock" | "lock" | "rlock" | "Lock.func1")
}

/// Waits long by design (`Stream`) or background machinery (`Idle`), recognised by a frame at
/// the top of the stack (up to and including the first daemon frame).
const TOP_PATTERNS: &[(&str, WaitKind)] = &[
    // Runtime, signals, listeners, idle connections.
    ("os/signal.signal_recv", WaitKind::Idle),
    ("os/signal.loop", WaitKind::Idle),
    ("runtime.ensureSigM", WaitKind::Idle),
    ("internal/poll.(*FD).Accept", WaitKind::Idle),
    ("net.(*netFD).accept", WaitKind::Idle),
    ("net/http.(*connReader).backgroundRead", WaitKind::Idle),
    ("net/http.(*conn).readRequest", WaitKind::Idle),
    ("net/http.(*persistConn).readLoop", WaitKind::Idle),
    ("net/http.(*persistConn).writeLoop", WaitKind::Idle),
    ("time.Sleep", WaitKind::Idle),
    // RPC transports (calls through them were recognised before this table is consulted).
    ("google.golang.org/grpc", WaitKind::Idle),
    ("github.com/containerd/ttrpc", WaitKind::Idle),
    ("github.com/stevvooe/ttrpc", WaitKind::Idle),
    ("golang.org/x/net/http2", WaitKind::Idle),
    // Event plumbing shared by dockerd and containerd.
    ("github.com/docker/go-events.", WaitKind::Idle),
    (
        "containerd/events/exchange.(*Exchange).Subscribe",
        WaitKind::Stream,
    ),
    (
        "containerd/services/events.(*service).Subscribe",
        WaitKind::Stream,
    ),
    (
        "containerd/plugins/services/events.(*service).Subscribe",
        WaitKind::Stream,
    ),
    ("github.com/containerd/fifo.(*fifo).Read", WaitKind::Stream),
    ("github.com/containerd/fifo.(*fifo).Write", WaitKind::Stream),
    // dockerd.
    ("main.(*DaemonCli).start", WaitKind::Idle),
    ("main.(*DaemonCli).setupConfigReloadTrap", WaitKind::Idle),
    ("docker/docker/pkg/signal.Trap", WaitKind::Idle),
    ("docker/daemon.(*Daemon).setupDumpStackTrap", WaitKind::Idle),
    ("docker/daemon.setupDumpStackTrap", WaitKind::Idle),
    ("docker/daemon.(*Daemon).execCommandGC", WaitKind::Idle),
    ("docker/daemon/stats.(*Collector).Run", WaitKind::Idle),
    ("docker/daemon.(*statsCollector).run", WaitKind::Idle),
    (
        "docker/daemon.(*Daemon).ProcessClusterNotifications",
        WaitKind::Idle,
    ),
    ("docker/api/server.(*Server).serveAPI", WaitKind::Idle),
    ("docker/api/server.(*Server).Wait", WaitKind::Idle),
    (
        "docker/libcontainerd/remote.(*client).processEventStream",
        WaitKind::Idle,
    ),
    (
        "docker/libcontainerd.(*remote).handleEventStream",
        WaitKind::Idle,
    ),
    (
        "docker/libcontainerd.(*remote).runContainerdDaemon",
        WaitKind::Idle,
    ),
    (
        "docker/libcontainerd/supervisor.(*remote).monitorDaemon",
        WaitKind::Idle,
    ),
    ("github.com/docker/libnetwork", WaitKind::Idle),
    ("github.com/docker/docker/libnetwork", WaitKind::Idle),
    ("github.com/moby/buildkit/", WaitKind::Idle),
    ("go.opencensus.io/", WaitKind::Idle),
    ("docker/daemon/logger.(*Copier)", WaitKind::Stream),
    ("docker/pkg/ioutils.(*BytesPipe).Read", WaitKind::Stream),
    ("docker/container/stream.(*Config).", WaitKind::Stream),
    ("docker/container.(*State).Wait.func", WaitKind::Stream),
    ("docker/daemon.(*Daemon).containerAttach", WaitKind::Stream),
    ("docker/daemon.(*Daemon).ContainerWait", WaitKind::Stream),
    ("docker/daemon.(*Daemon).ContainerLogs", WaitKind::Stream),
    (
        "docker/daemon.(*Daemon).SubscribeToEvents",
        WaitKind::Stream,
    ),
    ("(*containerRouter).postContainersWait", WaitKind::Stream),
    ("(*systemRouter).getEvents", WaitKind::Stream),
    ("docker/pkg/pubsub.", WaitKind::Stream),
    // containerd.
    ("containerd/cmd/containerd/command.App.func", WaitKind::Idle),
    (
        "containerd/cmd/containerd/command.handleSignals",
        WaitKind::Idle,
    ),
    ("containerd/gc/scheduler.(*gcScheduler).run", WaitKind::Idle),
    ("containerd/plugins/gc.(*gcScheduler).run", WaitKind::Idle),
    ("containerd/runtime/restart/monitor.", WaitKind::Idle),
    ("containerd/metrics/cgroups", WaitKind::Idle),
    ("containerd/core/metrics/cgroups", WaitKind::Idle),
    ("github.com/fsnotify/fsnotify.", WaitKind::Idle),
    ("containerd/pkg/cri/", WaitKind::Idle),
    ("containerd/internal/cri/", WaitKind::Idle),
    ("containerd/pkg/oom", WaitKind::Idle),
    ("k8s.io/client-go/", WaitKind::Idle),
    ("k8s.io/apimachinery/pkg/util/wait", WaitKind::Idle),
    ("containerd/runtime/v2.(*binary).Start.func", WaitKind::Idle),
    (
        "containerd/core/runtime/v2.(*binary).Start.func",
        WaitKind::Idle,
    ),
    // Shims.
    ("runtime/v2/shim.reap", WaitKind::Idle),
    ("runtime/v2/shim.handleSignals", WaitKind::Idle),
    ("runtime/v2/shim.serve", WaitKind::Idle),
    ("runtime/v2/shim.Run", WaitKind::Idle),
    ("v2/pkg/shim.", WaitKind::Idle),
    ("runtime/v1/shim.(*Service).checkProcesses", WaitKind::Idle),
    ("(*service).forward", WaitKind::Idle),
    ("(*service).processExits", WaitKind::Idle),
    ("containerd/pkg/process.(*Init).Wait", WaitKind::Stream),
    (
        "containerd/pkg/process.(*execProcess).Wait",
        WaitKind::Stream,
    ),
    ("(*service).Wait", WaitKind::Stream),
];

/// Idle goroutines recognised by who started them.
const IDLE_CREATORS: &[&str] = &["os/signal.", "runtime.ensureSigM", "go.opencensus.io/"];

/// Goroutines started per incoming API call: when one of these waits in daemon code for no
/// reason recognised above, a client is waiting for it.
const REQUEST_CREATORS: &[&str] = &[
    "net/http.(*Server).Serve",
    "google.golang.org/grpc.(*Server).serveStreams",
    "google.golang.org/grpc.(*Server).serverWorker",
    "google.golang.org/grpc.(*Server).handleStream",
    "ttrpc.(*serverConn).run",
];

pub(crate) fn classify(state: &str, frames: &[RawFrame], created_by: Option<&str>) -> Classified {
    if RUNNING_STATES.contains(&state) {
        return Classified::new(WaitKind::Running, 0);
    }
    let keys: Vec<&str> = frames.iter().map(|f| key(&f.function)).collect();
    let first_app = keys.iter().position(|k| !is_plumbing(k));

    if let Some(found) = classify_lock(state, &keys) {
        return found;
    }
    if let Some(found) = classify_layer(&keys) {
        return found;
    }
    let creator = created_by.map(key);
    let with_site = |kind: WaitKind| {
        let mut found = Classified::new(kind, first_app.unwrap_or(0));
        found.site = first_app.map(|i| keys[i].to_string());
        found
    };
    if IDLE_STATES.contains(&state) || (keys.len() == 1 && keys[0] == "runtime.goexit") {
        return with_site(WaitKind::Idle);
    }
    let top = &keys[..first_app.map_or(keys.len(), |i| i + 1)];
    if let Some(kind) = TOP_PATTERNS
        .iter()
        .find(|(pattern, _)| top.iter().any(|k| k.contains(pattern)))
        .map(|(_, kind)| *kind)
    {
        return with_site(kind);
    }
    if let Some(creator) = creator {
        if IDLE_CREATORS.iter().any(|p| creator.starts_with(p)) {
            return with_site(WaitKind::Idle);
        }
        if first_app.is_some() && REQUEST_CREATORS.iter().any(|p| creator.contains(p)) {
            return with_site(WaitKind::Request);
        }
    }
    with_site(WaitKind::Other)
}

fn classify_lock(state: &str, keys: &[&str]) -> Option<Classified> {
    let leading = keys.iter().take_while(|k| is_std(k)).count();
    let mode = keys[..leading]
        .iter()
        .find_map(|k| lock_frame(k))
        .or_else(|| lock_state(state))?;
    let site = (leading..keys.len()).find(|&i| !is_lock_wrapper(keys[i]));
    let mut found = Classified::new(WaitKind::Lock, site.unwrap_or(0));
    found.site = site.map(|i| keys[i].to_string());
    found.detail = Some(mode.label().to_string());
    Some(found)
}

/// Scans from the top for the first call into the layer below.
fn classify_layer(keys: &[&str]) -> Option<Classified> {
    for (i, k) in keys.iter().enumerate() {
        if is_grpc_client_call(k) {
            if let Some(found) = rpc_call(keys, i, Transport::Grpc) {
                return Some(found);
            }
        } else if is_ttrpc_client_call(k) {
            if let Some(found) = rpc_call(keys, i, Transport::Ttrpc) {
                return Some(found);
            }
        } else if k.starts_with("github.com/containerd/go-runc.") {
            let method = short_function(k);
            let kind = if method.ends_with(").Events") {
                WaitKind::Stream
            } else {
                WaitKind::Runc
            };
            return Some(with_caller(keys, i, kind, method.to_string()));
        } else if is_process_wait(k) {
            // A wait under go-runc is named after the runc command, found on a later step.
            let under_go_runc = keys[i + 1..]
                .iter()
                .any(|k| k.starts_with("github.com/containerd/go-runc."));
            if !under_go_runc && let Some(found) = child_process_wait(keys, i) {
                return Some(found);
            }
        }
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Grpc,
    Ttrpc,
}

fn is_grpc_client_call(key: &str) -> bool {
    package(key).starts_with("google.golang.org/grpc")
        && [
            ".invoke",
            ".Invoke",
            "clientStream",
            "csAttempt",
            "NewStream",
            "recvResponse",
            "pickerWrapper",
        ]
        .iter()
        .any(|m| key.contains(m))
}

fn is_ttrpc_client_call(key: &str) -> bool {
    let package = package(key);
    (package == "github.com/containerd/ttrpc" || package == "github.com/stevvooe/ttrpc")
        && (key.contains("(*Client).") || key.contains("(*clientStream)"))
}

/// A call through an RPC library: the first daemon frame below it says which API is called
/// (client interceptors such as containerd's `namespaceInterceptor` sit in between).
fn rpc_call(keys: &[&str], call: usize, transport: Transport) -> Option<Classified> {
    let api = (call + 1..keys.len()).find(|&j| {
        !is_plumbing(keys[j])
            && !keys[j].contains("Interceptor")
            && !keys[j].contains("interceptor")
    })?;
    let api_key = keys[api];
    let containerd_api = api_key.contains("github.com/containerd/containerd")
        || api_key.contains("github.com/docker/containerd/")
        || api_key.contains("/libcontainerd");
    let shim_api = api_key.contains("/shim/v1")
        || api_key.contains("/runtime/v1/shim")
        || api_key.contains("/runtime/v2/task.")
        || api_key.contains("/runtime/task/")
        || api_key.contains("runtime/v2.(*shim")
        || api_key.contains("runtime/v2/shim.");
    let method = rpc_method(api_key);
    let long_by_design = method.ends_with(".Wait")
        || method.ends_with(".Subscribe")
        || method.ends_with(".Events")
        || (method.ends_with(".Recv")
            && (method.contains("Subscribe") || method.contains("Events")));
    let kind = if long_by_design && (containerd_api || shim_api) {
        WaitKind::Stream
    } else if transport == Transport::Ttrpc {
        // From a shim, ttrpc goes up to containerd (event forwarding); elsewhere down to a shim.
        if api_key.contains("events") {
            WaitKind::Containerd
        } else {
            WaitKind::Shim
        }
    } else if shim_api {
        WaitKind::Shim
    } else if containerd_api {
        WaitKind::Containerd
    } else {
        WaitKind::Other
    };
    let detail = match transport {
        Transport::Grpc => format!("{method} (grpc)"),
        Transport::Ttrpc => format!("{method} (ttrpc)"),
    };
    let mut found = Classified::new(kind, api);
    found.detail = Some(detail);
    found.site = (api + 1..keys.len())
        .find(|&j| !is_plumbing(keys[j]) && !is_generated_client(keys[j]))
        .or(Some(api))
        .map(|j| keys[j].to_string());
    Some(found)
}

/// Generated API wrappers and containerd's client library sit between the daemon code and
/// the transport; the site is the daemon frame that made the call.
fn is_generated_client(key: &str) -> bool {
    key.contains("Client).")
        || key.contains("github.com/containerd/containerd.")
        || key.contains("github.com/containerd/containerd/v2/client.")
        || key.contains("/proxy.")
}

/// `.../leases/v1.(*leasesClient).Create` → `leases.Create`; `types.(*aPIClient).Signal` →
/// `api.Signal`; other functions keep their short name.
fn rpc_method(key: &str) -> String {
    let short = short_function(key);
    if let Some(start) = short.find("(*")
        && let Some(len) = short[start..].find(").")
    {
        let receiver = &short[start + 2..start + len];
        let method = &short[start + len + 2..];
        if let Some(service) = receiver
            .strip_suffix("Client")
            .map(|s| s.trim_start_matches("ttrpc"))
            .filter(|s| !s.is_empty())
        {
            let service = if service.eq_ignore_ascii_case("api") {
                "api"
            } else {
                service
            };
            return format!("{service}.{method}");
        }
    }
    short.to_string()
}

fn is_process_wait(key: &str) -> bool {
    matches!(
        key,
        "os/exec.(*Cmd).Wait"
            | "os/exec.(*Cmd).Run"
            | "os/exec.(*Cmd).Output"
            | "os/exec.(*Cmd).CombinedOutput"
            | "os.(*Process).Wait"
            | "os.(*Process).wait"
            | "syscall.Wait4"
    ) || key.contains("reaper.(*Monitor).Wait")
}

/// A wait for a child process counts when containerd's runtime code started it.
fn child_process_wait(keys: &[&str], wait: usize) -> Option<Classified> {
    const SHIM_START: &[&str] = &["runtime/v2.(*binary).Start", "runtime/v2/shim.Command"];
    const RUNTIME_PATHS: &[&str] = &[
        "/runtime/v2/runc",
        "/pkg/process.",
        "/runtime/v1/linux",
        "/runtime/v1/shim",
        "/linux/proc",
        "/linux/shim",
        "containerd-shim",
        "github.com/docker/containerd/runtime",
        "github.com/docker/containerd/supervisor",
    ];
    let below = &keys[wait + 1..];
    if let Some(at) = below
        .iter()
        .position(|k| SHIM_START.iter().any(|p| k.contains(p)))
    {
        return Some(with_caller(
            keys,
            wait + 1 + at,
            WaitKind::Shim,
            "starting shim".to_string(),
        ));
    }
    below
        .iter()
        .position(|k| RUNTIME_PATHS.iter().any(|p| k.contains(p)))?;
    Some(with_caller(
        keys,
        wait,
        WaitKind::Runc,
        format!("child process exit ({})", short_function(keys[wait])),
    ))
}

fn with_caller(keys: &[&str], at: usize, kind: WaitKind, detail: String) -> Classified {
    let site =
        (at + 1..keys.len()).find(|&j| !is_plumbing(keys[j]) && !keys[j].contains("go-runc."));
    // The listing starts at the runc call itself; the site says who made it.
    let mut found = Classified::new(kind, at);
    found.site = site.map(|j| keys[j].to_string());
    found.detail = Some(detail);
    found
}

/// Which daemon a stack belongs to, judged from daemon-specific packages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Evidence {
    pub dockerd: bool,
    pub containerd: bool,
    pub shim: bool,
}

const DOCKERD_MARKERS: &[&str] = &[
    "main.(*DaemonCli)",
    "github.com/docker/docker/daemon",
    "github.com/docker/docker/api/server",
    "github.com/docker/docker/cmd/dockerd",
    "github.com/docker/docker/libcontainerd",
    "github.com/docker/docker/container",
    "github.com/moby/moby/v2/daemon",
    "github.com/docker/libnetwork.",
];
const CONTAINERD_MARKERS: &[&str] = &[
    "containerd/cmd/containerd/command.",
    "github.com/containerd/containerd/services/",
    "github.com/containerd/containerd/v2/plugins/services/",
    "github.com/containerd/containerd/pkg/cri/",
    "github.com/containerd/containerd/v2/internal/cri/",
    "github.com/containerd/containerd/gc/scheduler",
    "github.com/containerd/containerd/runtime/v2.(*",
    "github.com/containerd/containerd/runtime/v1/linux.(*",
    "github.com/containerd/containerd/metadata.",
    "github.com/docker/containerd/supervisor.",
];
const SHIM_MARKERS: &[&str] = &[
    "runtime/v2/shim.Run",
    "runtime/v2/shim.run",
    "runtime/v2/shim.serve",
    "runtime/v2/shim.reap",
    "runtime/v2/shim.handleSignals",
    "runtime/v2/shim.dumpStacks",
    "/pkg/shim.Run",
    "/pkg/shim.run",
    "/pkg/shim.serve",
    "runtime/v2/runc/v2.(*service)",
    "runtime/v2/runc/task.(*service)",
    "containerd-shim-runc-v2/task.(*service)",
    "runtime/v1/shim.(*Service)",
    "main.executeShim",
];

pub(crate) fn evidence(frames: &[RawFrame], created_by: Option<&str>) -> Evidence {
    let names = frames.iter().map(|f| f.function.as_str()).chain(created_by);
    let mut evidence = Evidence::default();
    for name in names {
        let name = key(name);
        let has = |markers: &[&str]| markers.iter().any(|m| name.contains(m));
        evidence.dockerd |= has(DOCKERD_MARKERS);
        evidence.containerd |= has(CONTAINERD_MARKERS);
        evidence.shim |= has(SHIM_MARKERS);
    }
    evidence
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(names: &[&str]) -> Vec<RawFrame> {
        names
            .iter()
            .map(|n| RawFrame {
                function: n.to_string(),
                location: "x.go:1".to_string(),
            })
            .collect()
    }

    #[test]
    fn packages_and_short_names() {
        assert_eq!(package("github.com/a/b.(*T).m"), "github.com/a/b");
        assert_eq!(package("sync.(*Mutex).Lock"), "sync");
        assert_eq!(package("net/http.(*conn).serve"), "net/http");
        assert_eq!(package("gopkg.in/yaml%2ev2.(*p).x"), "gopkg.in/yaml%2ev2");
        assert!(is_std("internal/poll.(*FD).Read"));
        assert!(!is_std("main.main"));
        assert!(!is_std("github.com/a/b.f"));
        assert_eq!(
            short_function(
                "github.com/docker/docker/vendor/google.golang.org/grpc/transport.(*Stream).Read"
            ),
            "transport.(*Stream).Read"
        );
        assert_eq!(
            short_function("main.(*DaemonCli).start"),
            "main.(*DaemonCli).start"
        );
        assert_eq!(
            rpc_method(
                "github.com/containerd/containerd/api/services/leases/v1.(*leasesClient).Create"
            ),
            "leases.Create"
        );
        assert_eq!(
            rpc_method("github.com/docker/containerd/api/grpc/types.(*aPIClient).Signal"),
            "api.Signal"
        );
        assert_eq!(
            rpc_method(
                "github.com/containerd/containerd/api/runtime/task/v2.(*ttrpctaskClient).Start"
            ),
            "task.Start"
        );
    }

    #[test]
    fn mutex_wait_names_the_caller_past_lock_wrappers() {
        let stack = frames(&[
            "sync.runtime_SemacquireMutex",
            "sync.(*Mutex).lockSlow",
            "sync.(*Mutex).Lock",
            "github.com/docker/docker/pkg/locker.(*Locker).Lock",
            "github.com/docker/docker/libcontainerd.(*client).lock",
            "github.com/docker/docker/libcontainerd.(*client).Signal",
        ]);
        let c = classify("semacquire", &stack, None);
        assert_eq!(c.kind, WaitKind::Lock);
        assert_eq!(c.detail.as_deref(), Some("sync.Mutex"));
        assert_eq!(
            c.site.as_deref(),
            Some("github.com/docker/docker/libcontainerd.(*client).Signal")
        );
        assert_eq!(c.anchor, 5);
    }

    #[test]
    fn lock_states_of_newer_go_and_rwmutex_reads() {
        let stack = frames(&[
            "internal/sync.runtime_SemacquireMutex",
            "internal/sync.(*Mutex).lockSlow",
            "main.f",
        ]);
        assert_eq!(
            classify("sync.Mutex.Lock", &stack, None).kind,
            WaitKind::Lock
        );
        let stack = frames(&[
            "sync.runtime_SemacquireRWMutexR",
            "sync.(*RWMutex).RLock",
            "main.g",
        ]);
        let c = classify("sync.RWMutex.RLock", &stack, None);
        assert_eq!(c.detail.as_deref(), Some("sync.RWMutex (read)"));
        let waitgroup = frames(&[
            "sync.runtime_Semacquire",
            "sync.(*WaitGroup).Wait",
            "main.h",
        ]);
        assert_ne!(
            classify("semacquire", &waitgroup, None).kind,
            WaitKind::Lock
        );
    }

    #[test]
    fn grpc_call_to_containerd_and_event_streams() {
        let call = frames(&[
            "google.golang.org/grpc/internal/transport.(*Stream).waitOnHeader",
            "google.golang.org/grpc.(*csAttempt).recvMsg",
            "google.golang.org/grpc.invoke",
            "github.com/containerd/containerd.namespaceInterceptor.unary",
            "google.golang.org/grpc.(*ClientConn).Invoke",
            "github.com/containerd/containerd/api/services/containers/v1.(*containersClient).Get",
            "github.com/containerd/containerd.(*remoteContainers).Get",
            "github.com/containerd/containerd.(*Client).LoadContainer",
            "github.com/docker/docker/libcontainerd/remote.(*client).getContainer",
        ]);
        let c = classify("select", &call, Some("net/http.(*Server).Serve"));
        assert_eq!(c.kind, WaitKind::Containerd);
        assert_eq!(c.detail.as_deref(), Some("containers.Get (grpc)"));
        assert_eq!(
            c.site.as_deref(),
            Some("github.com/docker/docker/libcontainerd/remote.(*client).getContainer")
        );
        let stream = frames(&[
            "google.golang.org/grpc.(*clientStream).RecvMsg",
            "github.com/containerd/containerd/api/services/events/v1.(*eventsSubscribeClient).Recv",
            "github.com/containerd/containerd.(*eventRemote).Subscribe.func1",
        ]);
        assert_eq!(classify("select", &stream, None).kind, WaitKind::Stream);
    }

    #[test]
    fn ttrpc_to_shim_and_runc_waits() {
        let shim = frames(&[
            "github.com/containerd/ttrpc.(*Client).dispatch",
            "github.com/containerd/ttrpc.(*Client).Call",
            "github.com/containerd/containerd/runtime/v2/task.(*taskClient).Start",
            "github.com/containerd/containerd/runtime/v2.(*shimTask).Start",
            "github.com/containerd/containerd/services/tasks.(*local).Start",
        ]);
        let c = classify("select", &shim, None);
        assert_eq!(
            (c.kind, c.detail.as_deref()),
            (WaitKind::Shim, Some("task.Start (ttrpc)"))
        );
        let exit = frames(&[
            "github.com/containerd/ttrpc.(*Client).Call",
            "github.com/containerd/containerd/runtime/v2/task.(*taskClient).Wait",
        ]);
        assert_eq!(classify("select", &exit, None).kind, WaitKind::Stream);
        let runc = frames(&[
            "github.com/containerd/containerd/sys/reaper.(*Monitor).Wait",
            "github.com/containerd/go-runc.Monitor.Wait",
            "github.com/containerd/go-runc.(*Runc).Start",
            "github.com/containerd/containerd/pkg/process.(*Init).Start",
        ]);
        let c = classify("chan receive", &runc, None);
        assert_eq!(c.kind, WaitKind::Runc);
        assert_eq!(
            c.site.as_deref(),
            Some("github.com/containerd/containerd/pkg/process.(*Init).Start")
        );
        let dockerd_child = frames(&[
            "syscall.Wait4",
            "os.(*Process).Wait",
            "os/exec.(*Cmd).Wait",
            "github.com/docker/docker/libcontainerd.(*remote).runContainerdDaemon.func1",
        ]);
        assert_eq!(
            classify("syscall", &dockerd_child, None).kind,
            WaitKind::Idle
        );
    }

    #[test]
    fn requests_idle_and_other() {
        let request = frames(&[
            "github.com/docker/docker/daemon.(*Daemon).Kill",
            "github.com/docker/docker/daemon.(*Daemon).ContainerKill",
        ]);
        let c = classify("chan receive", &request, Some("net/http.(*Server).Serve"));
        assert_eq!(c.kind, WaitKind::Request);
        assert_eq!(
            c.site.as_deref(),
            Some("github.com/docker/docker/daemon.(*Daemon).Kill")
        );
        assert_eq!(
            classify("chan receive", &request, None).kind,
            WaitKind::Other
        );
        assert_eq!(classify("running", &request, None).kind, WaitKind::Running);
        assert_eq!(classify("sleep", &request, None).kind, WaitKind::Idle);
        let accept = frames(&[
            "internal/poll.runtime_pollWait",
            "internal/poll.(*FD).Accept",
            "main.serve",
        ]);
        assert_eq!(classify("IO wait", &accept, None).kind, WaitKind::Idle);
        assert_eq!(
            classify("syscall", &frames(&["runtime.goexit"]), None).kind,
            WaitKind::Idle
        );
    }

    #[test]
    fn daemon_evidence() {
        let e = evidence(&frames(&["main.(*DaemonCli).start"]), None);
        assert!(e.dockerd && !e.containerd && !e.shim);
        let e = evidence(
            &[],
            Some("github.com/containerd/containerd/cmd/containerd/command.serve"),
        );
        assert!(e.containerd);
        let e = evidence(
            &frames(&["github.com/containerd/containerd/runtime/v2/shim.reap"]),
            None,
        );
        assert!(e.shim);
    }
}
