//! The HTTP server: `/metrics`, `/healthz`, `/status`, `/incidents`, and each source
//! section's own path (`/events`, `/stops`). It only reads what the engine publishes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::engine::Snapshot;
use crate::heartbeat::Heartbeats;
use crate::http_server::ConnectionLimits;
use crate::metrics::{
    CLASSIC_CONTENT_TYPE, Metrics, OPENMETRICS_CONTENT_TYPE, openmetrics_to_classic,
    wants_openmetrics,
};

#[derive(Clone)]
pub struct Readers {
    pub metrics: Arc<Metrics>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub heartbeats: Heartbeats,
}

pub fn router(readers: Readers) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/incidents", get(incidents))
        .route("/incidents/{id}", get(incident))
        .fallback(section_endpoint)
        .with_state(readers)
}

/// Connections the kernel may hold for accept: a burst of connections (a flood, or many
/// clients at once) overflowing the default would drop SYNs, and a dropped SYN costs the
/// client a 1 s retransmission however fast the server is. Capped by `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

/// Bind `addr`; the error names the address so a port clash is obvious.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    bound().map_err(|e| format!("cannot listen on {addr}: {e}"))
}

pub async fn serve(listener: TcpListener, readers: Readers, shutdown: CancellationToken) {
    let limits = ConnectionLimits::default();
    if let Err(e) = crate::http_server::serve(listener, router(readers), limits, shutdown).await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// Register the metrics of hangwatch's own output and HTTP connections (process-wide) in
/// `registry`: the daemon's and the cordoner's.
pub fn register_server_metrics(registry: &mut prometheus_client::registry::Registry) {
    crate::output::register_metrics(registry);
    crate::http_server::register_metrics(registry);
}

async fn metrics(State(readers): State<Readers>, headers: HeaderMap) -> Response {
    metrics_reply(&headers, readers.metrics.encode())
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), text format 0.0.4 otherwise.
pub fn metrics_reply(headers: &HeaderMap, openmetrics: String) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if wants_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            openmetrics,
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)],
            openmetrics_to_classic(&openmetrics),
        )
            .into_response()
    }
}

async fn healthz(State(readers): State<Readers>) -> Response {
    let stale = readers.heartbeats.stale();
    if stale.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let mut body = String::from("stalled loops:\n");
    for s in stale {
        body.push_str(&format!(
            "  {} silent for {:.1}s (budget {:.1}s)\n",
            s.name,
            s.silent_for.as_secs_f64(),
            s.budget.as_secs_f64()
        ));
    }
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn status(State(readers): State<Readers>) -> Response {
    let snapshot = readers.snapshot.borrow().clone();
    axum::Json(snapshot.as_ref()).into_response()
}

/// Newest first.
async fn incidents(State(readers): State<Readers>) -> Response {
    let snapshot = readers.snapshot.borrow().clone();
    axum::Json(snapshot.incidents.as_ref()).into_response()
}

async fn incident(State(readers): State<Readers>, Path(id): Path<String>) -> Response {
    let snapshot = readers.snapshot.borrow().clone();
    match snapshot.incidents.iter().find(|i| i.id == id) {
        Some(incident) => axum::Json(incident).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no incident {id}\n")).into_response(),
    }
}

/// A path a source's section serves: `/events` (recent kernel events, newest first), `/stops`
/// (container stops: the event stream's health, stops in progress, recent stops).
async fn section_endpoint(State(readers): State<Readers>, method: Method, uri: Uri) -> Response {
    let snapshot = readers.snapshot.borrow().clone();
    match snapshot.endpoint(uri.path()) {
        Some(value) if method == Method::GET => axum::Json(value).into_response(),
        Some(_) => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        None => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    }
}
