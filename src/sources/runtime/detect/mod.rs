//! Runtime probes: the calls kubelet makes (`docker ps`, `/_ping`, containerd's API), each with
//! a hard deadline, never more than one of a kind in flight.
//!
//! The scheduler only starts calls and reports them; the engine declares a stall from the
//! age of the call in flight, long before the deadline fires.

mod containerd;
pub mod cri;
mod docker;
mod payload;
mod shims;

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::config::{Config, RuntimeMode};
use crate::containers::ContainerInfo;
use crate::domain::Runtime;
use crate::signal::Signal;
use crate::sources::detector::{Detector, DetectorContext, DetectorFuture};

pub use containerd::ContainerdClient;
pub use cri::CriClient;
pub use docker::DockerClient;
pub use payload::{
    Operation, ProbeFailure, ProbeSignal, StatusSubject, SubjectKind, UnknownTask, Unreachable,
    short_id,
};

/// The probe signals' address: the runtime source.
fn probe_signal(signal: ProbeSignal) -> Signal {
    Signal::source(crate::sources::runtime::NAME, signal)
}

/// What a successful probe call returns beyond "it answered".
#[derive(Debug, Default)]
pub struct ProbeAnswer {
    /// Containers the call listed, for naming container ids.
    pub containers: Option<Vec<ContainerInfo>>,
    /// containerd tasks listed as UNKNOWN (namespace, tasks with their shims).
    pub unknown_tasks: Option<(String, Vec<UnknownTask>)>,
}

pub type ProbeCall = Pin<Box<dyn Future<Output = Result<ProbeAnswer, ProbeFailure>> + Send>>;

/// A runtime API that can be probed.
pub trait RuntimeClient: Send + Sync + 'static {
    fn runtime(&self) -> Runtime;
    fn operations(&self) -> Vec<Operation>;
    /// What the next call of `operation` is about (the CRI status sample's pod or
    /// container), decided before it starts so a call that hangs is named.
    fn subject(&self, _operation: &Operation) -> Option<StatusSubject> {
        None
    }
    /// One call of `operation`. The caller bounds it with the deadline and may drop it.
    fn call(&self, operation: &Operation, subject: Option<&StatusSubject>) -> ProbeCall;
    /// How many calls of `operation` may follow one another in one interval, each started
    /// when the one before answered (never two in flight): the CRI status sample walks its
    /// rotation faster than one pod per interval.
    fn calls_per_interval(&self, _operation: &Operation) -> usize {
        1
    }
}

/// A client for every runtime that is not disabled.
pub fn clients(config: &Config) -> Vec<Arc<dyn RuntimeClient>> {
    let mut all: Vec<Arc<dyn RuntimeClient>> = Vec::new();
    if config.docker.mode != RuntimeMode::Disabled {
        all.push(Arc::new(DockerClient::new(
            &config.docker,
            config.probes.deadline,
        )));
    }
    if config.containerd.mode != RuntimeMode::Disabled {
        all.push(Arc::new(ContainerdClient::new(
            &config.containerd,
            &config.proc_scan.proc_root,
            config.probes.deadline,
        )));
    }
    if config.cri.mode != RuntimeMode::Disabled {
        all.push(Arc::new(CriClient::new(
            &config.cri,
            config.probes.deadline,
        )));
    }
    all
}

/// The probe detectors: one per runtime that is not disabled.
pub fn detectors(config: &Config) -> Vec<Box<dyn Detector>> {
    clients(config)
        .into_iter()
        .map(|client| {
            Box::new(ProbeDetector::new(client, heartbeat_budget(config))) as Box<dyn Detector>
        })
        .collect()
}

/// A fresh probe id, unique within the process.
fn next_probe_id() -> u64 {
    NEXT_PROBE_ID.fetch_add(1, Ordering::Relaxed)
}

/// The operations probed for each runtime, for the engine's trackers.
pub fn operations_for(config: &Config, runtime: Runtime) -> Vec<Operation> {
    match runtime {
        Runtime::Docker => docker::OPERATIONS.to_vec(),
        Runtime::Containerd => containerd::operations(&config.containerd.namespaces),
        Runtime::Cri => cri::OPERATIONS.to_vec(),
    }
}

static NEXT_PROBE_ID: AtomicU64 = AtomicU64::new(1);

/// The scheduler beats once per interval: 30 s, or four intervals when they are longer, so a
/// busy node does not fail its liveness and a long `probes.interval` does not either.
pub fn heartbeat_budget(config: &Config) -> Duration {
    Duration::from_secs(30).max(config.probes.interval.saturating_mul(4))
}

pub struct ProbeDetector {
    client: Arc<dyn RuntimeClient>,
    heartbeat_budget: Duration,
}

impl ProbeDetector {
    pub fn new(client: Arc<dyn RuntimeClient>, heartbeat_budget: Duration) -> ProbeDetector {
        ProbeDetector {
            client,
            heartbeat_budget,
        }
    }
}

impl Detector for ProbeDetector {
    fn name(&self) -> String {
        format!("probe:{}", self.client.runtime())
    }

    fn heartbeat_budget(&self) -> Duration {
        self.heartbeat_budget
    }

    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture {
        Box::pin(schedule(self.client, ctx))
    }
}

async fn schedule(client: Arc<dyn RuntimeClient>, ctx: DetectorContext) {
    let operations = client.operations();
    let mut in_flight: Vec<Option<JoinHandle<()>>> = operations.iter().map(|_| None).collect();
    let mut ticker = tokio::time::interval(ctx.config.probes.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = ctx.config.probes.deadline;

    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        ctx.heartbeat.beat();
        for (operation, slot) in operations.iter().zip(in_flight.iter_mut()) {
            if slot.as_ref().is_some_and(|h| !h.is_finished()) {
                continue;
            }
            let (started, finish) = start(client.as_ref(), operation, deadline);
            if !ctx.signals.send(started).await {
                break;
            }
            let signals = ctx.signals.clone();
            let calls = client.calls_per_interval(operation).max(1);
            let (client, operation) = (client.clone(), operation.clone());
            let interval = ctx.config.probes.interval;
            *slot = Some(tokio::spawn(async move {
                let began = tokio::time::Instant::now();
                let mut finish: Pin<Box<dyn Future<Output = Finished> + Send>> = Box::pin(finish);
                for done in 1.. {
                    let finished = finish.await;
                    for extra in finished.extras {
                        signals.send(extra).await;
                    }
                    signals.send(finished.signal).await;
                    // The next in the chain only after an answer, and within half an interval.
                    if !finished.answered || done >= calls || began.elapsed() > interval / 2 {
                        break;
                    }
                    let (started, next) = start(client.as_ref(), &operation, deadline);
                    if !signals.send(started).await {
                        break;
                    }
                    finish = Box::pin(next);
                }
            }));
        }
    }
    // Dropping the calls closes their connections; a hung daemon cannot hold shutdown.
    for handle in in_flight.into_iter().flatten() {
        handle.abort();
    }
}

/// What a finished probe call yields.
pub struct Finished {
    /// Its `ProbeFinished`.
    pub signal: Signal,
    /// To deliver before it: containers it listed, UNKNOWN tasks it saw.
    pub extras: Vec<Signal>,
    /// It answered successfully.
    pub answered: bool,
}

/// Start one call of `operation`: the `ProbeStarted` signal to deliver first, and the call,
/// bounded by `deadline`, resolving to its `ProbeFinished`.
pub fn start(
    client: &dyn RuntimeClient,
    operation: &Operation,
    deadline: Duration,
) -> (Signal, impl Future<Output = Finished> + Send + 'static) {
    let id = next_probe_id();
    let started = Instant::now();
    let runtime = client.runtime();
    let subject = client.subject(operation);
    let call = client.call(operation, subject.as_ref());
    let operation = operation.clone();
    let signal = probe_signal(ProbeSignal::Started {
        runtime,
        operation: operation.clone(),
        id,
        at: started,
        subject,
    });
    let finish = async move {
        let mut extras = Vec::new();
        let result = match tokio::time::timeout(deadline, call).await {
            Ok(Ok(answer)) => {
                if let Some(containers) = answer.containers {
                    extras.push(Signal::ContainersSeen(containers));
                }
                if let Some((namespace, tasks)) = answer.unknown_tasks {
                    extras.push(probe_signal(ProbeSignal::UnknownTasks { namespace, tasks }));
                }
                Ok(())
            }
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(ProbeFailure::Timeout),
        };
        let answered = result.is_ok();
        let finished = probe_signal(ProbeSignal::Finished {
            runtime,
            operation,
            id,
            started,
            finished: Instant::now(),
            result,
        });
        Finished {
            signal: finished,
            extras,
            answered,
        }
    };
    (signal, finish)
}

/// Whether the socket file is there to dial. `Path::exists` would call a socket we may not
/// look at "missing"; permission problems must be told apart.
pub fn socket_present(socket: &std::path::Path) -> Result<(), ProbeFailure> {
    match socket.try_exists() {
        Ok(true) => Ok(()),
        Ok(false) => Err(ProbeFailure::Unreachable(Unreachable::SocketMissing)),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(ProbeFailure::Unreachable(Unreachable::PermissionDenied))
        }
        Err(e) => Err(ProbeFailure::Unreachable(Unreachable::Other(e.to_string()))),
    }
}

/// Classify a client error by the I/O error at the root of its chain: connection-level
/// problems make the runtime unreachable; anything else is an error in the reply.
pub fn classify_error(error: &(dyn StdError + 'static)) -> ProbeFailure {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io_error) = e.downcast_ref::<io::Error>() {
            return match io_error.kind() {
                io::ErrorKind::NotFound => ProbeFailure::Unreachable(Unreachable::SocketMissing),
                io::ErrorKind::ConnectionRefused => ProbeFailure::Unreachable(Unreachable::Refused),
                io::ErrorKind::PermissionDenied => {
                    ProbeFailure::Unreachable(Unreachable::PermissionDenied)
                }
                io::ErrorKind::TimedOut => ProbeFailure::Timeout,
                _ => ProbeFailure::Error(error_chain(error)),
            };
        }
        cause = e.source();
    }
    ProbeFailure::Error(error_chain(error))
}

/// "outer: inner: root" for an error and its sources, without repeating identical texts.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = cause {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scheduler beats once per `probes.interval`: its budget must outlast the interval, or
    /// `/healthz` fails and kubelet restarts a healthy pod.
    #[test]
    fn the_heartbeat_budget_outlasts_any_interval() {
        let mut config = Config::default();
        assert_eq!(heartbeat_budget(&config), Duration::from_secs(30));
        config.probes.interval = Duration::from_secs(45);
        assert!(heartbeat_budget(&config) > config.probes.interval * 2);
        config.probes.interval = Duration::MAX;
        assert_eq!(
            heartbeat_budget(&config),
            Duration::MAX,
            "saturates, never panics"
        );
    }

    #[derive(Debug)]
    struct Wrapper(io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error")
        }
    }
    impl StdError for Wrapper {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn io_root_cause_decides_unreachable_or_error() {
        let refused = Wrapper(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(
            classify_error(&refused),
            ProbeFailure::Unreachable(Unreachable::Refused)
        );
        let missing = Wrapper(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(
            classify_error(&missing),
            ProbeFailure::Unreachable(Unreachable::SocketMissing)
        );
        let denied = Wrapper(io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            classify_error(&denied),
            ProbeFailure::Unreachable(Unreachable::PermissionDenied)
        );
        let reset = Wrapper(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "reset by peer",
        ));
        match classify_error(&reset) {
            ProbeFailure::Error(text) => assert_eq!(text, "client error: reset by peer"),
            other => panic!("expected error, got {other:?}"),
        }
    }
}
