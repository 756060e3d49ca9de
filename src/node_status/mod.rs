//! Node conditions (and Events) on the Kubernetes API, for the remediation tools that read
//! them: medik8s NodeHealthCheck, Cluster API MachineHealthCheck, draino, Karpenter.
//!
//! The publisher is a *reader* of the engine's snapshot, like the HTTP server: it derives
//! an opinion per owned condition from the latest snapshot (`conditions.rs`), keeps the
//! conditions as they stand on the node (`book.rs`) and patches them, from a task of its
//! own. It can never hold the engine up: the snapshot is a watch channel (the engine
//! replaces it, it never waits for a reader), so pending updates coalesce by themselves —
//! the latest state wins; every API call has `node_status.request_timeout`; a failure costs
//! a metric, a log line and a retry after `node_status.retry_interval`.
//!
//! It writes only its own Node's `status.conditions` (strategic merge, keyed by `type`, so
//! kubelet's `Ready` and every condition it does not own are left as they are), and reads
//! the owned ones back at start before writing anything.

pub mod book;
mod client;
pub mod conditions;
pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Snapshot;
use crate::heartbeat::Heartbeats;
use book::ConditionBook;
use client::{ApiClient, ApiError};
use conditions::ConditionKind;

pub use metrics::KubeMetrics;

/// The content type that merges `status.conditions` by `type` (its patch strategy), as
/// kubelet and node-problem-detector send it. A JSON merge patch would replace the list.
const STRATEGIC_MERGE: &str = "application/strategic-merge-patch+json";
/// The loop looks at the snapshot at most this often; the engine publishes every 250 ms.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// The loop's heartbeat budget: one API call plus slack.
pub fn heartbeat_budget(config: &Config) -> Duration {
    config
        .node_status
        .request_timeout
        .saturating_add(Duration::from_secs(30))
}

pub struct Publisher {
    config: Arc<Config>,
    client: ApiClient,
    node: String,
    book: ConditionBook,
    /// When the /proc scanner's verdicts mean something again after a start.
    scans_settled_at: Instant,
    /// No call before this (after a failure).
    retry_at: Option<Instant>,
    /// The last failure was logged: log again only once it recovers.
    failing: bool,
}

impl Publisher {
    /// None, with the reason logged, when the API configuration cannot be built: the
    /// daemon runs on without conditions.
    pub fn new(config: Arc<Config>) -> Result<Publisher, String> {
        let ns = &config.node_status;
        let client = ApiClient::from_config(&ns.kubeconfig, ns.request_timeout)?;
        let settle = config
            .proc_scan
            .stuck_after
            .saturating_add(config.proc_scan.interval);
        Ok(Publisher {
            node: config.resolved_node_name(),
            book: ConditionBook::new(ns),
            client,
            scans_settled_at: Instant::now() + settle,
            retry_at: None,
            failing: false,
            config,
        })
    }

    pub async fn run(
        mut self,
        mut snapshot: watch::Receiver<Arc<Snapshot>>,
        heartbeats: Heartbeats,
        shutdown: CancellationToken,
    ) {
        let heartbeat = heartbeats.register("node_status", heartbeat_budget(&self.config));
        tracing::info!(
            node = %self.node,
            server = %self.client.server(),
            conditions = %self.book.kinds().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(","),
            "publishing node conditions"
        );
        loop {
            heartbeat.beat();
            let latest = snapshot.borrow_and_update().clone();
            self.observe(&latest);
            let call = self.one_call();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = call => {}
            }
            metrics::set_pending(usize::from(
                !self.book.is_adopted() || self.book.has_pending_change(),
            ));
            heartbeat.beat();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(LOOK_EVERY) => {}
            }
        }
    }

    fn observe(&mut self, snapshot: &Snapshot) {
        let now = SystemTime::now();
        let settled = Instant::now() >= self.scans_settled_at;
        let kinds: Vec<ConditionKind> = self.book.kinds().collect();
        for kind in kinds {
            let opinion = conditions::opinion(kind, snapshot, settled);
            self.book.observe(kind, opinion, now);
        }
    }

    /// At most one API call per turn, so the loop beats between calls.
    async fn one_call(&mut self) {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let result = if !self.book.is_adopted() {
            self.read_back().await
        } else if self.book.patch_due(SystemTime::now()) {
            self.patch_conditions().await
        } else {
            return;
        };
        match result {
            Ok(()) => {
                self.retry_at = None;
                if self.failing {
                    self.failing = false;
                    tracing::info!("Kubernetes API server answers again");
                }
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + self.config.node_status.retry_interval);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %e, "Kubernetes API call failed; retrying, the latest state wins");
                }
            }
        }
    }

    /// Read the node's conditions and take over the owned ones.
    async fn read_back(&mut self) -> Result<(), ApiError> {
        let path = format!("/api/v1/nodes/{}", self.node);
        let node = self.client.call(Method::GET, &path, "", None).await?;
        let conditions = node["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        self.book.adopt(&conditions, SystemTime::now());
        tracing::info!(node = %self.node, "node conditions read back");
        Ok(())
    }

    async fn patch_conditions(&mut self) -> Result<(), ApiError> {
        let now = SystemTime::now();
        let patch = self.book.patch(now);
        let path = format!("/api/v1/nodes/{}/status", self.node);
        self.client
            .call(Method::PATCH, &path, STRATEGIC_MERGE, Some(&patch))
            .await?;
        self.book.patched(now);
        Ok(())
    }
}
