//! Container lifecycle: Docker's event stream, for the stop of every container (`kill` with
//! the stop signal → `kill` 9 → `die` → `stop`). The detector only forwards the events, once
//! each; the engine (`engine::stops`, `engine::lifecycle`) times the stops and decides which
//! are stuck.
//!
//! The stream is read with hyper over the unix socket rather than bollard's `events()`:
//! bollard ends its stream at the first line it cannot decode, and since a resume replays
//! from `since`, the same line would end every later connection too. Here a line that cannot
//! be understood is counted and skipped.
//!
//! Opening the stream has a deadline; the open stream has none (it is silent whenever no
//! container stops). Whether silence means "no stops" is the engine's call, from the docker
//! probe's verdict: a stalled dockerd also stalls its events.
//!
//! containerd's event service (`containerd.rs`, detector `lifecycle:containerd`) gives the
//! exits (`/tasks/exit`, with the exit status) and OOM kills (`/tasks/oom`) of every runtime
//! that runs on containerd, Docker or not; it publishes no event for a kill, so a stop's
//! start is not seen there.

pub mod containerd;
mod event;
mod stream;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;

pub use containerd::{TaskExit, TaskOom};
pub use event::{ContainerAction, ContainerEvent};

use crate::domain::Runtime;

/// Whose event stream: Docker's `/events` or containerd's event service. Its runtime's name
/// is the `runtime` label of the streams' metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventStream {
    Docker,
    Containerd,
}

impl EventStream {
    pub fn runtime(self) -> Runtime {
        match self {
            EventStream::Docker => Runtime::Docker,
            EventStream::Containerd => Runtime::Containerd,
        }
    }

    pub fn as_str(self) -> &'static str {
        self.runtime().as_str()
    }
}

impl std::fmt::Display for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the event stream followers tell the lifecycle source's state. `stream` is whose event
/// stream: Docker's `/events` or containerd's event service.
#[derive(Debug)]
pub enum LifecycleSignal {
    /// A Docker container event, each once (replays after a reconnection are dropped here).
    Event(Box<ContainerEvent>),
    /// containerd: a container's init process exited.
    TaskExit(TaskExit),
    /// containerd: the OOM killer killed a process of a container.
    TaskOom(TaskOom),
    /// The event stream is open; `reconnected` after it had broken.
    StreamUp {
        stream: EventStream,
        reconnected: bool,
    },
    /// The stream could not be opened or ended; the next attempt is in `retry_in`.
    StreamDown {
        stream: EventStream,
        error: String,
        retry_in: Duration,
    },
    /// An event that is not usable (logged by the detector).
    Malformed { stream: EventStream, reason: String },
    /// `check` does not read this stream (containerd's event service keeps no history).
    NotRead {
        stream: EventStream,
        reason: &'static str,
    },
}

impl From<LifecycleSignal> for Signal {
    fn from(signal: LifecycleSignal) -> Signal {
        Signal::source(crate::sources::lifecycle::NAME, signal)
    }
}
use event::{Parsed, parse_line};
use stream::{Backoff, Line, LineSplitter, Position, events_path, timestamp};

use crate::config::{Config, RuntimeMode};
use crate::signal::Signal;
use crate::sources::detector::{Detector, DetectorContext, DetectorFuture};
use crate::sources::runtime::detect::{classify_error, socket_present};

/// Lines longer than this are not events (Docker's are well under 64 KiB even with many labels).
const MAX_LINE: usize = 1024 * 1024;
/// Event keys remembered to drop replays after a resume: more than dockerd buffers (256).
const REMEMBERED_EVENTS: usize = 1024;
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long worked: the next failure starts the backoff afresh.
const CONNECTION_WORKED_AFTER: Duration = Duration::from_secs(10);
/// How often the loop beats while the stream is silent.
const BEAT_EVERY: Duration = Duration::from_secs(5);
/// How far back `hangwatch check` reads (dockerd buffers its last 256 events anyway).
pub const CHECK_LOOKBACK: Duration = Duration::from_secs(600);
/// Malformed lines logged per connection at most; all are counted.
const MALFORMED_LOGGED: u32 = 10;

/// The detector, when enabled and Docker may be present.
pub fn detector(config: &Config) -> Option<Box<dyn Detector>> {
    (config.lifecycle.enabled && config.docker.mode != RuntimeMode::Disabled)
        .then(|| Box::new(LifecycleDetector) as Box<dyn Detector>)
}

pub struct LifecycleDetector;

impl Detector for LifecycleDetector {
    fn name(&self) -> String {
        "lifecycle:docker".into()
    }

    fn heartbeat_budget(&self) -> Duration {
        // Beats every BEAT_EVERY, also while waiting out a backoff.
        Duration::from_secs(30)
    }

    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture {
        Box::pin(follow(ctx))
    }
}

/// Why a connection (or a subscription) ended.
enum Ended {
    Shutdown,
    Failed(String),
}

async fn follow(ctx: DetectorContext) {
    let socket = ctx.config.docker.socket.clone();
    let deadline = ctx.config.probes.deadline;
    // Stops that began before hangwatch are not ours to time: start from now.
    let start = nanos_since_epoch(SystemTime::now());
    let mut position = Position::new(REMEMBERED_EVENTS);
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut connections = 0u64;
    loop {
        ctx.heartbeat.beat();
        let since = timestamp(position.resume_from(start));
        let path = events_path(Some(&since), None);
        let opening = tokio::time::timeout(deadline, open(&socket, &path));
        tokio::pin!(opening);
        let mut beat = tokio::time::interval(BEAT_EVERY);
        // A hung dockerd makes opening last the whole deadline: keep beating meanwhile.
        let opened = loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                opened = &mut opening => break opened,
                _ = beat.tick() => ctx.heartbeat.beat(),
            }
        };
        let error = match opened {
            Ok(Ok(body)) => {
                connections += 1;
                tracing::info!(socket = %socket.display(), %since, "following docker events");
                let up = LifecycleSignal::StreamUp {
                    stream: EventStream::Docker,
                    reconnected: connections > 1,
                };
                if !ctx.signals.send(up.into()).await {
                    return;
                }
                let began = tokio::time::Instant::now();
                match read(body, &ctx, &mut position).await {
                    Ended::Shutdown => return,
                    Ended::Failed(error) => {
                        if began.elapsed() >= CONNECTION_WORKED_AFTER {
                            backoff.reset();
                        }
                        error
                    }
                }
            }
            Ok(Err(error)) => error,
            Err(_) => format!("no answer to GET /events within {deadline:?}"),
        };
        let retry_in = backoff.next_wait();
        tracing::debug!(%error, ?retry_in, "docker event stream down");
        let down = LifecycleSignal::StreamDown {
            stream: EventStream::Docker,
            error,
            retry_in,
        };
        if !ctx.signals.send(down.into()).await || !wait(&ctx, retry_in).await {
            return;
        }
    }
}

/// Wait out a backoff, beating meanwhile; false at shutdown.
async fn wait(ctx: &DetectorContext, backoff: Duration) -> bool {
    let until = tokio::time::Instant::now() + backoff;
    let mut beat = tokio::time::interval(BEAT_EVERY);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return false,
            _ = tokio::time::sleep_until(until) => return true,
            _ = beat.tick() => ctx.heartbeat.beat(),
        }
    }
}

/// `GET path` on the socket; the body once the headers say 200. The caller bounds it.
async fn open(socket: &Path, path: &str) -> Result<Incoming, String> {
    socket_present(socket).map_err(|failure| failure.to_string())?;
    let client: Client<UnixConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(UnixConnector);
    let response = client
        .get(hyperlocal::Uri::new(socket, path).into())
        .await
        .map_err(|e| classify_error(&e).to_string())?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET /events answered HTTP {status}"));
    }
    Ok(response.into_body())
}

/// Forward the events of one connection until it ends.
async fn read(mut body: Incoming, ctx: &DetectorContext, position: &mut Position) -> Ended {
    let mut lines = LineSplitter::new(MAX_LINE);
    let mut beat = tokio::time::interval(BEAT_EVERY);
    let mut logged = 0u32;
    loop {
        let frame = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ended::Shutdown,
            _ = beat.tick() => {
                ctx.heartbeat.beat();
                continue;
            }
            frame = body.frame() => frame,
        };
        let chunk = match frame {
            None => return Ended::Failed("the daemon closed the event stream".into()),
            Some(Err(e)) => return Ended::Failed(format!("event stream broke: {e}")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        for line in lines.push(&chunk) {
            let signal = match line {
                Line::Complete(line) => match parse_line(&line) {
                    Parsed::Event(event) => {
                        let key = (
                            event.time_nano,
                            event.container.id.clone(),
                            event.action.as_str(),
                        );
                        if !position.first_time(key) {
                            continue;
                        }
                        LifecycleSignal::Event(event)
                    }
                    Parsed::Malformed { reason, time_nano } => {
                        if let Some(time_nano) = time_nano {
                            position.saw_time(time_nano);
                        }
                        malformed(reason, &mut logged)
                    }
                },
                Line::TooLong => {
                    malformed(format!("a line longer than {MAX_LINE} bytes"), &mut logged)
                }
            };
            if !ctx.signals.send(signal.into()).await {
                return Ended::Shutdown;
            }
        }
    }
}

fn malformed(reason: String, logged: &mut u32) -> LifecycleSignal {
    if *logged < MALFORMED_LOGGED {
        *logged += 1;
        tracing::warn!(%reason, "docker event not understood; skipped");
    }
    LifecycleSignal::Malformed {
        stream: EventStream::Docker,
        reason,
    }
}

/// What [`check`] read.
#[derive(Debug, Default)]
pub struct CheckEvents {
    pub events: Vec<ContainerEvent>,
    /// Why each unusable line was skipped.
    pub malformed: Vec<String>,
}

/// `hangwatch check`: the events dockerd still buffers from the last [`CHECK_LOOKBACK`], read
/// once (with `until`, the daemon answers and closes) within `deadline`.
pub async fn check(socket: PathBuf, deadline: Duration) -> Result<CheckEvents, String> {
    let now = nanos_since_epoch(SystemTime::now());
    let lookback = i64::try_from(CHECK_LOOKBACK.as_nanos()).unwrap_or(i64::MAX);
    let path = events_path(
        Some(&timestamp(now.saturating_sub(lookback))),
        Some(&timestamp(now)),
    );
    let read_all = async {
        let mut body = open(&socket, &path).await?;
        let mut found = CheckEvents::default();
        let mut lines = LineSplitter::new(MAX_LINE);
        let mut note = |line: Line| match line {
            Line::Complete(line) => match parse_line(&line) {
                Parsed::Event(event) => found.events.push(*event),
                Parsed::Malformed { reason, .. } => found.malformed.push(reason),
            },
            Line::TooLong => found
                .malformed
                .push(format!("a line longer than {MAX_LINE} bytes")),
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("event stream broke: {e}"))?;
            if let Ok(data) = frame.into_data() {
                lines.push(&data).into_iter().for_each(&mut note);
            }
        }
        lines.push(b"\n").into_iter().for_each(&mut note);
        Ok(found)
    };
    tokio::time::timeout(deadline, read_all)
        .await
        .unwrap_or_else(|_| Err(format!("no answer to GET /events within {deadline:?}")))
}

fn nanos_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
