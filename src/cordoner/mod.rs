//! `hangwatch cordoner`: an Alertmanager webhook receiver that cordons and taints the node an
//! alert labelled `hangwatch_action="cordon"` names, and undoes only what it did itself.
//!
//! It keeps no state of its own: what it did is recorded on each node (see `plan`), so any
//! number of replicas behind one Service agree without a leader, and a restart forgets nothing.

mod metrics;
mod nodes;
pub mod plan;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::Mutex;

use metrics::{CordonerMetrics, ResultLabels};
use nodes::{Limits, Nodes, Outcome};

/// Alertmanager sends at most a few hundred alerts per notification; 1 MiB is plenty.
const MAX_BODY: usize = 1024 * 1024;
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
    #[arg(long, value_enum, default_value_t = crate::config::LogFormat::Text)]
    pub log_format: crate::config::LogFormat,
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
    /// One alert at a time per replica: the cap check and the cordon are not atomic.
    busy: Mutex<()>,
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
    });
    let app = Router::new()
        .route("/webhook", post(receive))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(serve_metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(cordoner);
    let mut termination = crate::daemon::Termination::new()?;
    let listener = crate::http::bind(options.listen).await?;
    let listen = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(%listen, dry_run = options.dry_run, "cordoner listening");
    // A webhook call in flight is bounded by the API deadlines; shutdown does not wait on it.
    tokio::select! {
        served = crate::http_server::serve(listener, app, Default::default(), Default::default()) => served,
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
    crate::http::metrics_reply(&headers, cordoner.metrics.encode())
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

/// Alertmanager retries a notification on a 5xx: an API failure answers 500 so the alert
/// comes again; refusals (cap, rate limit) are decisions and answer 200.
async fn receive(
    State(cordoner): State<Arc<Cordoner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !webhook::authorized(authorization, &cordoner.token) {
        tracing::warn!("webhook call without the right bearer token rejected");
        return reply(
            &cordoner,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            json!({"error": "unauthorized"}),
        );
    }
    let parsed = match webhook::parse(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            tracing::warn!(error = %e, "webhook payload rejected");
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
    for intent in &parsed.intents {
        let _one_at_a_time = cordoner.busy.lock().await;
        let (action, result) = if intent.firing {
            (
                "cordon",
                cordoner
                    .nodes
                    .cordon(&intent.node, &intent.alert, &cordoner.limits)
                    .await,
            )
        } else {
            (
                "release",
                cordoner.nodes.release(&intent.node, &intent.alert).await,
            )
        };
        let outcome = match result {
            Ok(outcome) => {
                log_outcome(action, intent, outcome);
                outcome.as_str()
            }
            Err(e) => {
                tracing::error!(node = %intent.node, alert = %intent.alert, action, error = %e, "Kubernetes API call failed; Alertmanager will retry");
                failed = true;
                "api_error"
            }
        };
        cordoner.metrics.decision(action, outcome);
        results.push(json!({"node": intent.node, "alert": intent.alert, "action": action, "outcome": outcome}));
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

fn log_outcome(action: &str, intent: &webhook::Intent, outcome: Outcome) {
    let (node, alert, outcome_name) = (&intent.node, &intent.alert, outcome.as_str());
    match outcome {
        Outcome::RefusedCap | Outcome::RefusedRate => {
            tracing::warn!(%node, %alert, action, outcome = outcome_name, "cordon refused by the safety limits")
        }
        Outcome::Unchanged => tracing::debug!(%node, %alert, action, outcome = outcome_name),
        _ => tracing::info!(%node, %alert, action, outcome = outcome_name),
    }
}
