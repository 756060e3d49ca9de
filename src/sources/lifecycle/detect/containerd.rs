//! containerd's event service, for container exits without Docker: `Events.Subscribe`
//! filtered to `/tasks/exit` (with the exit status) and `/tasks/oom` in the configured
//! namespaces. containerd publishes nothing when a task is killed, so this does not begin
//! stops; it ends the ones /proc saw (a kill pending) with their exit code, and counts exits.
//!
//! The service has no history: events published while the subscription is down are lost, and
//! a subscription starts from now.
//!
//! Opening has the probe deadline; the open stream has none (it is silent while no container
//! exits). containerd (grpc-go) sends a streaming call's response headers only with its first
//! message, so a subscription's response does not arrive until some container exits: the
//! opening is bounded by a `Version` call on the subscription's own connection instead, and
//! the subscription is then held open without a deadline. Its channel sets no request timeout
//! (the probes' channel does, which would end the stream).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::events::{TaskExit as WireTaskExit, TaskOom as WireTaskOom};
use containerd_client::services::v1::SubscribeRequest;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::tonic::transport::{Channel, Endpoint};
use containerd_client::tonic::{Code, Status, Streaming};
use containerd_client::types::Envelope;
use hyper_util::rt::TokioIo;
use prost::Message;

use super::stream::Backoff;
// Reconnecting, beating and logging as Docker's stream does.
use super::{
    BEAT_EVERY, CONNECTION_WORKED_AFTER, Ended, EventStream, LifecycleSignal, MALFORMED_LOGGED,
    RECONNECT_INITIAL, RECONNECT_MAX,
};
use crate::config::{Config, RuntimeMode};
use crate::sources::detector::{Detector, DetectorContext, DetectorFuture};
use crate::sources::runtime::detect::{classify_error, socket_present};

pub const TOPIC_EXIT: &str = "/tasks/exit";
pub const TOPIC_OOM: &str = "/tasks/oom";
const TYPE_EXIT: &str = "containerd.events.TaskExit";
const TYPE_OOM: &str = "containerd.events.TaskOOM";

/// A container's main (init) process exited: containerd's `/tasks/exit` where the process is
/// the container's own (an exec'd process has an id of its own and is not reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskExit {
    /// containerd's namespace (`k8s.io` for kubelet's containers, `moby` for Docker's).
    pub namespace: String,
    pub container_id: String,
    pub pid: u32,
    /// 128 + the signal for a process killed by one (137: SIGKILL).
    pub exit_status: u32,
    pub exited_at: SystemTime,
}

/// The OOM killer killed a process of a container (`/tasks/oom`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOom {
    pub namespace: String,
    pub container_id: String,
    /// When containerd published it.
    pub at: SystemTime,
}

/// What one envelope of the subscription is.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Exit(TaskExit),
    Oom(TaskOom),
    /// An exec'd process exited, or an event of a namespace or topic not followed.
    NotFollowed,
    Malformed(String),
}

/// The subscription's filters: each topic in each namespace (filters are alternatives; the
/// conditions within one must all hold). Namespaces that are not valid containerd names are
/// left out (containerd would refuse them, and they cannot be quoted safely).
pub fn filters(namespaces: &[String]) -> Vec<String> {
    namespaces
        .iter()
        .filter(|n| valid_namespace(n))
        .flat_map(|namespace| {
            [TOPIC_EXIT, TOPIC_OOM]
                .map(|topic| format!("namespace==\"{namespace}\",topic==\"{topic}\""))
        })
        .collect()
}

/// containerd's rule for namespace names: letters, digits, `.`, `_` and `-`.
fn valid_namespace(namespace: &str) -> bool {
    !namespace.is_empty()
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Decode one envelope; `namespaces` are those followed.
pub fn decode(envelope: &Envelope, namespaces: &[String]) -> Decoded {
    if !namespaces.contains(&envelope.namespace) {
        return Decoded::NotFollowed;
    }
    let Some(payload) = &envelope.event else {
        return Decoded::Malformed(format!("{} without a payload", envelope.topic));
    };
    // containerd names the type without the `type.googleapis.com/` prefix Any asks for.
    let type_name = payload
        .type_url
        .rsplit_once('/')
        .map_or(payload.type_url.as_str(), |(_, name)| name);
    let published = envelope.timestamp.as_ref().map(wall_time);
    match (envelope.topic.as_str(), type_name) {
        (TOPIC_EXIT, TYPE_EXIT) => match WireTaskExit::decode(payload.value.as_slice()) {
            Err(e) => Decoded::Malformed(format!("{TOPIC_EXIT}: {e}")),
            Ok(exit) if exit.container_id.is_empty() => {
                Decoded::Malformed(format!("{TOPIC_EXIT} without a container id"))
            }
            Ok(exit) if exit.id != exit.container_id => Decoded::NotFollowed,
            Ok(exit) => Decoded::Exit(TaskExit {
                namespace: envelope.namespace.clone(),
                exited_at: exit
                    .exited_at
                    .as_ref()
                    .map(wall_time)
                    .or(published)
                    .unwrap_or(UNIX_EPOCH),
                container_id: exit.container_id,
                pid: exit.pid,
                exit_status: exit.exit_status,
            }),
        },
        (TOPIC_OOM, TYPE_OOM) => match WireTaskOom::decode(payload.value.as_slice()) {
            Err(e) => Decoded::Malformed(format!("{TOPIC_OOM}: {e}")),
            Ok(oom) if oom.container_id.is_empty() => {
                Decoded::Malformed(format!("{TOPIC_OOM} without a container id"))
            }
            Ok(oom) => Decoded::Oom(TaskOom {
                namespace: envelope.namespace.clone(),
                container_id: oom.container_id,
                at: published.unwrap_or(UNIX_EPOCH),
            }),
        },
        (TOPIC_EXIT | TOPIC_OOM, other) => Decoded::Malformed(format!(
            "{} carries {other:?}, not the event of its topic",
            envelope.topic
        )),
        _ => Decoded::NotFollowed,
    }
}

/// A protobuf timestamp on the wall clock (before 1970 or out of range: the epoch).
fn wall_time(t: &prost_types::Timestamp) -> SystemTime {
    let seconds = u64::try_from(t.seconds).unwrap_or(0);
    let nanos = u32::try_from(t.nanos).unwrap_or(0).min(999_999_999);
    UNIX_EPOCH
        .checked_add(Duration::new(seconds, nanos))
        .unwrap_or(UNIX_EPOCH)
}

/// The detector, when enabled and containerd may be present.
pub fn detector(config: &Config) -> Option<Box<dyn Detector>> {
    (config.lifecycle.enabled
        && config.containerd.mode != RuntimeMode::Disabled
        && !filters(&config.containerd.namespaces).is_empty())
    .then(|| Box::new(ContainerdEventsDetector) as Box<dyn Detector>)
}

pub struct ContainerdEventsDetector;

impl Detector for ContainerdEventsDetector {
    fn name(&self) -> String {
        "lifecycle:containerd".into()
    }

    fn heartbeat_budget(&self) -> Duration {
        // Beats every BEAT_EVERY, also while opening and while waiting out a backoff.
        Duration::from_secs(30)
    }

    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture {
        Box::pin(follow(ctx))
    }
}

fn up(reconnected: bool) -> LifecycleSignal {
    LifecycleSignal::StreamUp {
        stream: EventStream::Containerd,
        reconnected,
    }
}

async fn follow(ctx: DetectorContext) {
    let socket = ctx.config.containerd.socket.clone();
    let namespaces = ctx.config.containerd.namespaces.clone();
    let deadline = ctx.config.probes.deadline;
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    let mut subscriptions = 0u64;
    loop {
        ctx.heartbeat.beat();
        let error = match opened(&ctx, &socket, deadline).await {
            None => return,
            Some(Err(error)) => error,
            Some(Ok(channel)) => {
                subscriptions += 1;
                tracing::info!(socket = %socket.display(), ?namespaces, "following containerd task events");
                if !ctx.signals.send(up(subscriptions > 1).into()).await {
                    return;
                }
                let began = tokio::time::Instant::now();
                match subscribe(channel, &ctx, &namespaces).await {
                    Ended::Shutdown => return,
                    Ended::Failed(error) => {
                        if began.elapsed() >= CONNECTION_WORKED_AFTER {
                            backoff.reset();
                        }
                        error
                    }
                }
            }
        };
        let retry_in = backoff.next_wait();
        tracing::debug!(%error, ?retry_in, "containerd event stream down");
        let down = LifecycleSignal::StreamDown {
            stream: EventStream::Containerd,
            error,
            retry_in,
        };
        if !ctx.signals.send(down.into()).await || !wait(&ctx, retry_in).await {
            return;
        }
    }
}

/// A connection of the subscription's own on which containerd answered `Version` within
/// `deadline`; None at shutdown.
async fn opened(
    ctx: &DetectorContext,
    socket: &std::path::Path,
    deadline: Duration,
) -> Option<Result<Channel, String>> {
    if let Err(failure) = socket_present(socket) {
        return Some(Err(failure.to_string()));
    }
    let channel = channel(socket.to_path_buf(), deadline);
    let mut version = VersionClient::new(channel.clone());
    let answer = tokio::time::timeout(deadline, version.version(()));
    tokio::pin!(answer);
    let mut beat = tokio::time::interval(BEAT_EVERY);
    // A hung containerd makes this last the whole deadline: keep beating meanwhile.
    let answered = loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return None,
            answered = &mut answer => break answered,
            _ = beat.tick() => ctx.heartbeat.beat(),
        }
    };
    Some(match answered {
        Ok(Ok(_)) => Ok(channel),
        Ok(Err(status)) => Err(describe(&status)),
        Err(_) => Err(format!("no answer to Version within {deadline:?}")),
    })
}

/// A channel with a connect timeout and no request timeout: the subscription lasts as long as
/// containerd runs. It connects on first use.
fn channel(socket: PathBuf, deadline: Duration) -> Channel {
    // The URI is required by tonic but unused: the connector dials the unix socket.
    Endpoint::from_static("http://containerd.sock")
        .connect_timeout(deadline)
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
}

/// Subscribe and forward the exits and OOM kills until the stream ends.
async fn subscribe(channel: Channel, ctx: &DetectorContext, namespaces: &[String]) -> Ended {
    let request = SubscribeRequest {
        filters: filters(namespaces),
    };
    let mut client = EventsClient::new(channel);
    // Resolves with the first event (see the module's comment): no deadline.
    let response = client.subscribe(request);
    tokio::pin!(response);
    let mut beat = tokio::time::interval(BEAT_EVERY);
    let mut stream: Streaming<Envelope> = loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ended::Shutdown,
            _ = beat.tick() => ctx.heartbeat.beat(),
            response = &mut response => match response {
                Ok(response) => break response.into_inner(),
                Err(status) => return Ended::Failed(describe(&status)),
            },
        }
    };
    let mut logged = 0u32;
    loop {
        let message = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ended::Shutdown,
            _ = beat.tick() => {
                ctx.heartbeat.beat();
                continue;
            }
            message = stream.message() => message,
        };
        let envelope = match message {
            Ok(Some(envelope)) => envelope,
            Ok(None) => return Ended::Failed("containerd ended the event stream".into()),
            Err(status) if status.code() == Code::Internal => {
                // A message tonic could not decode as an Envelope: counted, and the stream,
                // which tonic does not read past it, is opened again.
                let reason = format!("not an event envelope: {}", status.message());
                let malformed = LifecycleSignal::Malformed {
                    stream: EventStream::Containerd,
                    reason: reason.clone(),
                };
                if !ctx.signals.send(malformed.into()).await {
                    return Ended::Shutdown;
                }
                return Ended::Failed(reason);
            }
            Err(status) => return Ended::Failed(describe(&status)),
        };
        let signal = match decode(&envelope, namespaces) {
            Decoded::NotFollowed => continue,
            Decoded::Exit(exit) => LifecycleSignal::TaskExit(exit),
            Decoded::Oom(oom) => LifecycleSignal::TaskOom(oom),
            Decoded::Malformed(reason) => {
                if logged < MALFORMED_LOGGED {
                    logged += 1;
                    tracing::warn!(%reason, "containerd event not understood; skipped");
                }
                LifecycleSignal::Malformed {
                    stream: EventStream::Containerd,
                    reason,
                }
            }
        };
        if !ctx.signals.send(signal.into()).await {
            return Ended::Shutdown;
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

/// A gRPC failure in words: the connection-level cause when there is one.
fn describe(status: &Status) -> String {
    match status.code() {
        Code::Unavailable | Code::Unknown => {
            let cause = classify_error(status).to_string();
            if status.message().is_empty() || cause.contains(status.message()) {
                cause
            } else {
                format!("{cause} ({})", status.message())
            }
        }
        code => format!("{code:?}: {}", status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::{Any, Timestamp};

    fn envelope(namespace: &str, topic: &str, type_url: &str, value: Vec<u8>) -> Envelope {
        Envelope {
            timestamp: Some(Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
            namespace: namespace.into(),
            topic: topic.into(),
            event: Some(Any {
                type_url: type_url.into(),
                value,
            }),
        }
    }

    fn exit(container_id: &str, id: &str, status: u32) -> Vec<u8> {
        WireTaskExit {
            container_id: container_id.into(),
            id: id.into(),
            pid: 4242,
            exit_status: status,
            exited_at: Some(Timestamp {
                seconds: 1_800_000_001,
                nanos: 7,
            }),
        }
        .encode_to_vec()
    }

    fn followed() -> Vec<String> {
        vec!["k8s.io".into(), "moby".into()]
    }

    #[test]
    fn filters_name_each_topic_in_each_valid_namespace() {
        assert_eq!(
            filters(&["k8s.io".into(), "bad\"ns".into()]),
            [
                "namespace==\"k8s.io\",topic==\"/tasks/exit\"",
                "namespace==\"k8s.io\",topic==\"/tasks/oom\""
            ]
        );
        assert!(filters(&[]).is_empty(), "nothing to follow: no detector");
    }

    #[test]
    fn an_init_exit_is_decoded_with_its_status_and_time() {
        let e = envelope("k8s.io", TOPIC_EXIT, TYPE_EXIT, exit("c1", "c1", 137));
        assert_eq!(
            decode(&e, &followed()),
            Decoded::Exit(TaskExit {
                namespace: "k8s.io".into(),
                container_id: "c1".into(),
                pid: 4242,
                exit_status: 137,
                exited_at: UNIX_EPOCH + Duration::new(1_800_000_001, 7),
            })
        );
        let prefixed = envelope(
            "moby",
            TOPIC_EXIT,
            "type.googleapis.com/containerd.events.TaskExit",
            exit("c1", "c1", 0),
        );
        assert!(matches!(decode(&prefixed, &followed()), Decoded::Exit(_)));
    }

    #[test]
    fn an_exec_exit_and_other_namespaces_are_not_the_container() {
        let exec = envelope("k8s.io", TOPIC_EXIT, TYPE_EXIT, exit("c1", "exec-3", 1));
        assert_eq!(decode(&exec, &followed()), Decoded::NotFollowed);
        let other = envelope("default", TOPIC_EXIT, TYPE_EXIT, exit("c1", "c1", 1));
        assert_eq!(decode(&other, &followed()), Decoded::NotFollowed);
    }

    #[test]
    fn an_oom_is_decoded_at_its_publication_time() {
        let oom = WireTaskOom {
            container_id: "c2".into(),
        }
        .encode_to_vec();
        assert_eq!(
            decode(&envelope("k8s.io", TOPIC_OOM, TYPE_OOM, oom), &followed()),
            Decoded::Oom(TaskOom {
                namespace: "k8s.io".into(),
                container_id: "c2".into(),
                at: UNIX_EPOCH + Duration::new(1_800_000_000, 5),
            })
        );
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let cases = [
            envelope("k8s.io", TOPIC_EXIT, TYPE_EXIT, vec![0xff, 0xff, 0xff]),
            envelope("k8s.io", TOPIC_EXIT, TYPE_OOM, Vec::new()),
            envelope("k8s.io", TOPIC_OOM, TYPE_OOM, Vec::new()),
            envelope("k8s.io", TOPIC_EXIT, TYPE_EXIT, exit("", "", 0)),
            Envelope {
                event: None,
                ..envelope("k8s.io", TOPIC_EXIT, TYPE_EXIT, Vec::new())
            },
        ];
        for case in &cases {
            assert!(
                matches!(decode(case, &followed()), Decoded::Malformed(_)),
                "{case:?}"
            );
        }
        let before_1970 = Timestamp {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(wall_time(&before_1970), UNIX_EPOCH);
        let far = Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert!(wall_time(&far) > UNIX_EPOCH, "no overflow");
    }
}
