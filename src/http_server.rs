//! An HTTP/1 server with bounded connections, for the daemon's port and the cordoner's
//! webhook: `axum::serve` has no limit on connections, no timeout for idle connections or slow
//! request heads, and lets each connection buffer ~400 KB of head.
//!
//! * At most `max_connections` are open. At the cap, a new connection takes the place of the
//!   one that has been idle longest (no request in progress: nothing sent yet, a head still
//!   arriving, or kept alive between requests), so a flood of idle connections cannot keep
//!   Prometheus or kubelet out; only when every connection is serving a request is the new
//!   one closed at once.
//! * A connection without a complete request head for `idle_timeout` is closed (hyper's
//!   header-read timeout, which runs from the end of the previous response).
//! * A request must be answered and its response written within `response_timeout`.
//! * A request head may take at most `max_head_bytes`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub response_timeout: Duration,
    pub max_head_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> ConnectionLimits {
        ConnectionLimits {
            max_connections: 256,
            idle_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            // hyper's minimum read buffer; a GET from Prometheus or kubelet is a few hundred bytes.
            max_head_bytes: 16 * 1024,
        }
    }
}

/// After shutdown, how long requests in flight may take to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (EMFILE, ENOBUFS) instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning line per this long for the same trouble (cap reached, accept failing).
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    reason: &'static str,
}

static OPEN_CONNECTIONS: LazyLock<Gauge> = LazyLock::new(Gauge::default);
static CLOSED_CONNECTIONS: LazyLock<Family<CloseLabels, Counter>> = LazyLock::new(Family::default);

fn count_closed(reason: &'static str) {
    CLOSED_CONNECTIONS
        .get_or_create(&CloseLabels { reason })
        .inc();
}

/// Register the process-wide connection metrics in `registry`.
pub fn register_metrics(registry: &mut Registry) {
    registry.register(
        "hangwatch_http_connections",
        "HTTP connections open",
        OPEN_CONNECTIONS.clone(),
    );
    registry.register(
        "hangwatch_http_connections_closed",
        "HTTP connections closed by the server, by reason: idle_timeout (no complete request head in time), response_timeout, evicted (longest idle, at the connection cap), rejected (at the cap with every connection busy)",
        CLOSED_CONNECTIONS.clone(),
    );
}

#[derive(Clone, Copy, Debug)]
enum Activity {
    /// No request in progress since then.
    Idle(Instant),
    /// A request arrived then and its response is not written yet.
    Busy(Instant),
}

struct Slot {
    activity: Arc<watch::Sender<Activity>>,
    evict: CancellationToken,
}

#[derive(Default)]
struct Pool {
    slots: Mutex<HashMap<u64, Slot>>,
    next_id: AtomicU64,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection, evicting the longest-idle one at the cap; None when every
    /// connection is busy.
    fn admit(self: &Arc<Pool>, max: usize) -> Option<(Admitted, Arc<watch::Sender<Activity>>)> {
        let mut slots = self.lock();
        if slots.len() >= max {
            let longest_idle = slots
                .iter()
                .filter_map(|(id, slot)| match *slot.activity.borrow() {
                    Activity::Idle(since) => Some((since, *id)),
                    Activity::Busy(_) => None,
                })
                .min();
            let (_, id) = longest_idle?;
            if let Some(slot) = slots.remove(&id) {
                slot.evict.cancel();
                count_closed("evicted");
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(watch::Sender::new(Activity::Idle(Instant::now())));
        let evict = CancellationToken::new();
        slots.insert(
            id,
            Slot {
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        OPEN_CONNECTIONS.set(slots.len() as i64);
        Some((
            Admitted {
                pool: self.clone(),
                id,
                evict,
            },
            activity,
        ))
    }
}

/// A connection's place in the pool, given back when its task ends.
struct Admitted {
    pool: Arc<Pool>,
    id: u64,
    evict: CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut slots = self.pool.lock();
        slots.remove(&self.id);
        OPEN_CONNECTIONS.set(slots.len() as i64);
    }
}

/// Serve `app` on `listener` within `limits` until `shutdown`; then wait up to a second for
/// requests in flight. Fails only when the listener itself is unusable.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let pool = Arc::new(Pool::default());
    let mut connections = JoinSet::new();
    let mut last_cap_warning: Option<Instant> = None;
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    if pool.lock().len() >= limits.max_connections
                        && due(&mut last_cap_warning)
                    {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            "HTTP connection limit reached: closing the longest-idle connections to admit new ones"
                        );
                    }
                    match pool.admit(limits.max_connections) {
                        Some((admitted, activity)) => {
                            connections.spawn(connection(
                                stream,
                                app.clone(),
                                limits.clone(),
                                admitted,
                                activity,
                                shutdown.clone(),
                            ));
                        }
                        None => {
                            count_closed("rejected");
                            drop(stream);
                        }
                    }
                    // Let the new connection read its head before the next accept can evict it.
                    tokio::task::yield_now().await;
                }
                Err(e) if listener_unusable(&e) => {
                    return Err(format!("HTTP server cannot accept connections: {e}"));
                }
                Err(e) => {
                    if due(&mut last_accept_warning) {
                        tracing::warn!(error = %e, "HTTP server cannot accept a connection; retrying");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_WAIT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Whether a rate-limited warning may be logged now (and note that it was).
fn due(last: &mut Option<Instant>) -> bool {
    let now = Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
        return false;
    }
    *last = Some(now);
    true
}

/// Errors of the listener itself, as opposed to a connection that failed or fds running out.
fn listener_unusable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

async fn connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    admitted: Admitted,
    activity: Arc<watch::Sender<Activity>>,
    shutdown: CancellationToken,
) {
    let mut changes = activity.subscribe();
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let app = app.clone();
        let busy = BusyGuard::start(service_activity.clone());
        async move {
            let response = match app.oneshot(request.map(Body::new)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|inner| Body::new(TrackedBody { inner, _busy: busy })))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_head_bytes)
        .max_headers(64);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if e.is_timeout() {
                        count_closed("idle_timeout");
                    }
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                break;
            }
            () = admitted.evict.cancelled() => break,
            () = response_overdue(&mut changes, limits.response_timeout) => {
                count_closed("response_timeout");
                break;
            }
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    drop(admitted);
}

/// Completes when a request has been in progress longer than `limit`.
async fn response_overdue(changes: &mut watch::Receiver<Activity>, limit: Duration) {
    loop {
        let activity = *changes.borrow_and_update();
        match activity {
            Activity::Busy(since) => {
                tokio::select! {
                    () = tokio::time::sleep_until((since + limit).into()) => return,
                    changed = changes.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                }
            }
            Activity::Idle(_) => {
                if changes.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Marks the connection busy from the request's arrival until its response body is dropped
/// (written out, or abandoned with the connection).
struct BusyGuard(Arc<watch::Sender<Activity>>);

impl BusyGuard {
    fn start(activity: Arc<watch::Sender<Activity>>) -> BusyGuard {
        activity.send_replace(Activity::Busy(Instant::now()));
        BusyGuard(activity)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.send_replace(Activity::Idle(Instant::now()));
    }
}

struct TrackedBody {
    inner: Body,
    /// Held until the body is dropped.
    _busy: BusyGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
