//! `hangwatch-cordoner`: an Alertmanager webhook receiver that cordons and taints the node an
//! alert labelled `hangwatch_action="cordon"` names, and undoes only what it did itself.
//!
//! It keeps no state of its own: what it did is recorded on each node (see `plan`), so any
//! number of replicas behind one Service agree without a leader, and a restart forgets nothing.

mod metrics;
mod nodes;
pub mod plan;
pub mod webhook;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

use metrics::{CordonerMetrics, ResultLabels};
use nodes::{Limits, Nodes, Outcome};

/// Alertmanager sends at most a few hundred alerts per notification; 1 MiB is plenty.
const MAX_BODY: usize = 1024 * 1024;
/// Bodies read at once: Alertmanager sends one notification at a time per group; more than
/// this in flight is a flood, answered 503 without reading.
const MAX_BODY_READS: usize = 8;
/// A body not received within this is abandoned (a slow sender holds no permit longer).
const BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Repeated warnings (rejected calls) are written at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Per node and action, at most this many alerts are listed in the reply.
const MAX_RESULTS_PER_NODE: usize = 100;
/// Where the token is read from when `--token-file` is not given.
const TOKEN_ENV: &str = "HANGWATCH_CORDONER_TOKEN";

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Address of the webhook, /healthz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9102")]
    pub listen: SocketAddr,
    /// File holding the bearer token Alertmanager must present (else $HANGWATCH_CORDONER_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Never hold more than this many nodes cordoned (the percentage applies too).
    #[arg(long)]
    pub max_cordoned: Option<usize>,
    /// Never hold more than this percentage of the cluster's nodes cordoned (at least one node).
    #[arg(long, default_value_t = 10.0)]
    pub max_cordoned_percent: f64,
    /// At most this many new cordons within --rate-window, cluster-wide.
    #[arg(long, default_value_t = 5)]
    pub max_new_cordons: usize,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,
    /// Send every patch with dryRun=All: the API server validates it and changes nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Log as text lines or JSON objects (level from $RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = hangwatch::config::LogFormat::Text)]
    pub log_format: hangwatch::config::LogFormat,
    /// Deadline of each Kubernetes API call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
}

struct Cordoner {
    token: String,
    dry_run: bool,
    limits: Limits,
    nodes: Nodes,
    metrics: Arc<CordonerMetrics>,
    /// One node at a time per replica: the cap check and the cordon are not atomic.
    busy: Mutex<()>,
    body_reads: Semaphore,
    unauthorized_log: LogLimiter,
    bad_request_log: LogLimiter,
}

/// Read the token, reach the API server's configuration, serve until SIGTERM/SIGINT.
pub async fn run(options: Options) -> Result<(), String> {
    let token = read_token(options.token_file.as_deref())?;
    if !(0.0..=100.0).contains(&options.max_cordoned_percent) {
        return Err("--max-cordoned-percent must be between 0 and 100".into());
    }
    let mut config = kube::Config::infer().await.map_err(|e| {
        format!("no Kubernetes API configuration (in-cluster service account or KUBECONFIG): {e}")
    })?;
    config.connect_timeout = Some(options.api_timeout);
    config.read_timeout = Some(options.api_timeout);
    config.write_timeout = Some(options.api_timeout);
    let client = kube::Client::try_from(config).map_err(|e| format!("Kubernetes client: {e}"))?;
    let metrics = Arc::new(CordonerMetrics::new(options.dry_run));
    let cordoner = Arc::new(Cordoner {
        token,
        dry_run: options.dry_run,
        limits: Limits {
            max_cordoned: options.max_cordoned,
            max_cordoned_percent: options.max_cordoned_percent,
            max_new_cordons: options.max_new_cordons,
            rate_window: options.rate_window,
        },
        nodes: Nodes::new(
            client,
            options.api_timeout,
            options.dry_run,
            metrics.clone(),
        ),
        metrics,
        busy: Mutex::new(()),
        body_reads: Semaphore::new(MAX_BODY_READS),
        unauthorized_log: LogLimiter::new(),
        bad_request_log: LogLimiter::new(),
    });
    let app = Router::new()
        .route("/webhook", post(receive))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(serve_metrics))
        .with_state(cordoner);
    let mut termination = hangwatch::daemon::Termination::new()?;
    let listener = hangwatch::http::bind(options.listen).await?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%listen, dry_run = options.dry_run, "cordoner listening");
    // A webhook call in flight is bounded by the API deadlines; shutdown does not wait on it.
    tokio::select! {
        served = hangwatch::http_server::serve(listener, app, Default::default(), Default::default()) => served,
        () = termination.recv() => Ok(()),
    }
}

fn read_token(file: Option<&std::path::Path>) -> Result<String, String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?,
        None => std::env::var(TOKEN_ENV)
            .map_err(|_| format!("no token: give --token-file or set {TOKEN_ENV}; the webhook never runs unauthenticated"))?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err("the webhook token is empty".into());
    }
    Ok(token)
}

async fn serve_metrics(State(cordoner): State<Arc<Cordoner>>, headers: HeaderMap) -> Response {
    hangwatch::http::metrics_reply(&headers, cordoner.metrics.encode())
}

fn reply(
    cordoner: &Cordoner,
    status: StatusCode,
    result: &'static str,
    body: serde_json::Value,
) -> Response {
    cordoner
        .metrics
        .webhook_requests_total
        .get_or_create(&ResultLabels { result })
        .inc();
    (status, axum::Json(body)).into_response()
}

/// Read a request body of at most [`MAX_BODY`] within [`BODY_DEADLINE`], holding one of the
/// [`MAX_BODY_READS`] permits; `Err` is the response that refuses it.
async fn read_body(cordoner: &Cordoner, body: Body) -> Result<Bytes, Response> {
    let Ok(_permit) = cordoner.body_reads.try_acquire() else {
        return Err(reply(
            cordoner,
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            json!({"error": "too many webhook bodies in flight; Alertmanager retries"}),
        ));
    };
    match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let error = e.into_inner();
            let (status, result, message) = if error.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("bodies over {MAX_BODY} bytes are refused"),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("body not read: {error}"),
                )
            };
            Err(reply(cordoner, status, result, json!({"error": message})))
        }
        Err(_) => Err(reply(
            cordoner,
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            json!({"error": format!("body not received within {BODY_DEADLINE:?}")}),
        )),
    }
}

/// Alertmanager retries a notification on a 5xx: an API failure answers 500 so the alert
/// comes again; refusals (cap, rate limit) are decisions and answer 200. The token is
/// checked from the headers before any of the body is read.
async fn receive(State(cordoner): State<Arc<Cordoner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !webhook::authorized(authorization, &cordoner.token) {
        if let Some(suppressed) = cordoner.unauthorized_log.allow() {
            tracing::warn!(
                suppressed_since_last = suppressed,
                "webhook call without the right bearer token rejected (counted in hangwatch_cordoner_webhook_requests_total{{result=\"unauthorized\"}})"
            );
        }
        return reply(
            &cordoner,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!({"error": "unauthorized"}),
        );
    }
    let body = match read_body(&cordoner, body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let parsed = match webhook::parse(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            if let Some(suppressed) = cordoner.bad_request_log.allow() {
                tracing::warn!(error = %e, suppressed_since_last = suppressed, "webhook payload rejected");
            }
            return reply(
                &cordoner,
                StatusCode::BAD_REQUEST,
                "bad_request",
                json!({"error": e}),
            );
        }
    };
    if parsed.truncated > 0 {
        tracing::warn!(
            left_out = parsed.truncated,
            "Alertmanager truncated this notification (max_alerts); the rest come later"
        );
    }
    for skip in &parsed.skipped {
        cordoner.metrics.decision("none", skip.as_str());
    }
    let mut results = Vec::new();
    let mut failed = false;
    for node in webhook::per_node(&parsed.intents) {
        for (action, alerts) in [
            (Action::Cordon, &node.firing),
            (Action::Release, &node.resolved),
        ] {
            if alerts.is_empty() {
                continue;
            }
            let _one_at_a_time = cordoner.busy.lock().await;
            let result = match action {
                Action::Cordon => {
                    cordoner
                        .nodes
                        .cordon(&node.node, alerts, &cordoner.limits)
                        .await
                }
                Action::Release => cordoner.nodes.release(&node.node, alerts).await,
            };
            let outcome = match result {
                Ok(outcome) => {
                    log_outcome(action, &node.node, alerts, outcome);
                    outcome.as_str()
                }
                Err(e) => {
                    tracing::error!(node = %node.node, alerts = alerts.len(), action = action.as_str(), error = %e, "Kubernetes API call failed; Alertmanager will retry");
                    failed = true;
                    "api_error"
                }
            };
            for _ in alerts {
                cordoner.metrics.decision(action.as_str(), outcome);
            }
            for alert in alerts.iter().take(MAX_RESULTS_PER_NODE) {
                results.push(json!({"node": node.node, "alert": alert, "action": action.as_str(), "outcome": outcome}));
            }
        }
    }
    let body = json!({"dry_run": cordoner.dry_run, "results": results});
    if failed {
        reply(
            &cordoner,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            body,
        )
    } else {
        reply(&cordoner, StatusCode::OK, "ok", body)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Cordon,
    Release,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Cordon => "cordon",
            Action::Release => "release",
        }
    }
}

/// At most one line per [`LOG_EVERY`] for a repeated warning; the rest are counted and the
/// count is given on the next line.
struct LogLimiter {
    last: std::sync::Mutex<Option<std::time::Instant>>,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            last: std::sync::Mutex::new(None),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(std::time::Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

fn log_outcome(action: Action, node: &str, alerts: &BTreeSet<String>, outcome: Outcome) {
    let (action, outcome_name, count) = (action.as_str(), outcome.as_str(), alerts.len());
    let alert = alerts.first().map(String::as_str).unwrap_or_default();
    match outcome {
        Outcome::RefusedCap | Outcome::RefusedRate => {
            tracing::warn!(%node, %alert, alerts = count, action, outcome = outcome_name, "cordon refused by the safety limits")
        }
        Outcome::Unchanged => {
            tracing::debug!(%node, %alert, alerts = count, action, outcome = outcome_name)
        }
        _ => tracing::info!(%node, %alert, alerts = count, action, outcome = outcome_name),
    }
}
