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
pub mod events;
pub mod metrics;

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Snapshot;
use crate::heartbeat::Heartbeats;
use crate::persist::{self, StateKind};
use book::ConditionBook;
use client::{ApiClient, ApiError};
use conditions::ConditionKind;
use events::{Draft, Ledger, RateLimit, Series};
use metrics::EventDrop;

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
    events: Option<EventQueue>,
}

/// Events waiting to be sent, and what was sent.
struct EventQueue {
    ledger: Ledger,
    path: PathBuf,
    /// No ledger on disk: the first snapshot's closed incidents are history, not news.
    first_look: bool,
    queue: VecDeque<Draft>,
    queued: HashSet<String>,
    limit: RateLimit,
    series_window: Duration,
    /// The rate-limit drops were logged: once per burst.
    dropping: bool,
}

impl Publisher {
    /// Fails when the API configuration cannot be built (no kubeconfig, not in a cluster);
    /// the daemon then logs why and runs on without conditions.
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
            events: ns.events.enabled.then(|| EventQueue::load(&config)),
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
            let queued = self.events.as_ref().map_or(0, |e| e.queue.len());
            metrics::set_pending(
                usize::from(!self.book.is_adopted() || self.book.has_pending_change()) + queued,
            );
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
        if let Some(events) = &mut self.events {
            events.observe(snapshot);
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
        } else if let Some(draft) = self.events.as_mut().and_then(|e| e.queue.pop_front()) {
            self.send_event(draft).await
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
        // The status subresource answers the whole Node: `get` on `nodes/status` is all the
        // RBAC this needs.
        let path = format!("/api/v1/nodes/{}/status", self.node);
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

impl Publisher {
    /// Create the event, or update its series; a failure puts it back at the head of the
    /// queue for the retry.
    async fn send_event(&mut self, draft: Draft) -> Result<(), ApiError> {
        let Some(events) = self.events.as_mut() else {
            return Ok(());
        };
        let now = SystemTime::now();
        if !events.limit.take(now) {
            events.drop_event(&draft, EventDrop::RateLimited);
            return Ok(());
        }
        events.dropping = false;
        let series_id = events::series_id(&draft);
        let window = events.series_window;
        let repeat = events
            .ledger
            .series(&series_id)
            .filter(|s| now.duration_since(s.last).unwrap_or_default() <= window)
            .cloned();
        let result = match repeat {
            Some(series) => {
                let path = format!(
                    "/api/v1/namespaces/{}/events/{}",
                    series.namespace, series.name
                );
                let patch = events::repeat_patch(&draft, series.count + 1, now);
                match self
                    .client
                    .call(Method::PATCH, &path, STRATEGIC_MERGE, Some(&patch))
                    .await
                {
                    Ok(_) => Ok(Series {
                        count: series.count + 1,
                        last: now,
                        ..series
                    }),
                    // Expired (the API server keeps events for an hour): a new one.
                    Err(ApiError::Status(404, _)) => self.create_event(&draft, now).await,
                    Err(e) => Err(e),
                }
            }
            None => self.create_event(&draft, now).await,
        };
        let Some(events) = self.events.as_mut() else {
            return Ok(());
        };
        match result {
            Ok(series) => {
                events.ledger.mark(&draft.key);
                events.queued.remove(&draft.key);
                events.ledger.set_series(series_id, series, window);
                events.save().await;
                Ok(())
            }
            Err(e) => {
                events.queue.push_front(draft);
                Err(e)
            }
        }
    }

    async fn create_event(&self, draft: &Draft, now: SystemTime) -> Result<Series, ApiError> {
        let (namespace, _) = events::placement(&draft.object, &self.node);
        let body = events::event_body(draft, &self.node, now);
        let series = Series {
            namespace: namespace.to_string(),
            name: events::event_name(draft, &self.node),
            count: 1,
            last: now,
        };
        let path = format!("/api/v1/namespaces/{namespace}/events");
        match self
            .client
            .call(Method::POST, &path, "application/json", Some(&body))
            .await
        {
            // 409: an earlier create that timed out did land.
            Ok(_) | Err(ApiError::Status(409, _)) => Ok(series),
            Err(e) => Err(e),
        }
    }
}

impl EventQueue {
    fn load(config: &Config) -> EventQueue {
        let path = config.state_dir.join("kube-events.json");
        let (ledger, first_look) = match std::fs::read(&path) {
            Ok(bytes) => match Ledger::from_json(&bytes) {
                Some(ledger) => (ledger, false),
                None => {
                    tracing::warn!(path = %path.display(), "unreadable events ledger; starting a new one");
                    (Ledger::default(), true)
                }
            },
            Err(_) => (Ledger::default(), true),
        };
        let events = &config.node_status.events;
        EventQueue {
            ledger,
            path,
            first_look,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            limit: RateLimit::new(events.max_per_minute),
            series_window: events.series_window,
            dropping: false,
        }
    }

    fn observe(&mut self, snapshot: &Snapshot) {
        if std::mem::take(&mut self.first_look) {
            for incident in snapshot.incidents.iter().filter(|i| i.ended_at.is_some()) {
                self.ledger
                    .mark(&format!("incident:{}:opened", incident.id));
                self.ledger
                    .mark(&format!("incident:{}:closed", incident.id));
            }
        }
        for draft in events::drafts(snapshot) {
            if self.ledger.contains(&draft.key) || self.queued.contains(&draft.key) {
                continue;
            }
            if self.queue.len() >= events::QUEUE_CAPACITY
                && let Some(oldest) = self.queue.pop_front()
            {
                self.drop_event(&oldest, EventDrop::QueueFull);
            }
            self.queued.insert(draft.key.clone());
            self.queue.push_back(draft);
        }
    }

    /// Not sent, and never to be: counted, logged once per burst.
    fn drop_event(&mut self, draft: &Draft, why: EventDrop) {
        metrics::count_dropped_event(why);
        self.queued.remove(&draft.key);
        self.ledger.mark(&draft.key);
        if !self.dropping {
            self.dropping = true;
            tracing::warn!(reason = draft.reason, why = ?why, "Kubernetes events dropped; counted in hangwatch_kube_events_dropped_total");
        }
    }

    /// Write the ledger off the async thread; a failure is counted and logged, and the
    /// next event writes it again.
    async fn save(&self) {
        let path = self.path.clone();
        let bytes = self.ledger.to_json();
        let written = tokio::task::spawn_blocking(move || {
            persist::write_atomically(&path, &bytes, StateKind::KubeEvents)
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot save the events ledger");
        }
    }
}
