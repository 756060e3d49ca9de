//! The cordoner's API calls and the procedures built on them. Every call has a deadline; every
//! write is a merge patch conditional on the resourceVersion read (409 → read again), so two
//! replicas, or a human editing the node meanwhile, never lose each other's changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::Value;

use super::metrics::{ApiLabels, CordonerMetrics};
use super::plan::{self, NodeView, Release};

/// How often a conditional patch is retried after a conflict before giving up (Alertmanager
/// sends the notification again).
const CONFLICT_ATTEMPTS: usize = 5;
/// Page size of node lists: a 5,000-node cluster in ten requests of metadata only.
const LIST_PAGE: u32 = 500;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Absolute cap on nodes hangwatch holds cordoned (`None`: the percentage alone).
    pub max_cordoned: Option<usize>,
    pub max_cordoned_percent: f64,
    /// At most this many of the held cordons may be younger than `rate_window`.
    pub max_new_cordons: usize,
    pub rate_window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node was cordoned (or, with dry-run, the API server accepted the patch).
    Cordoned,
    /// Another alert already held the cordon; this one was added to it.
    Joined,
    /// Nothing to do: the alert already holds it, or the cordon is not hangwatch's to undo.
    Unchanged,
    Uncordoned,
    /// Other alerts still hold the cordon; this one was taken off it.
    Released,
    RefusedCap,
    RefusedRate,
    NodeNotFound,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Cordoned => "cordoned",
            Outcome::Joined => "joined",
            Outcome::Unchanged => "unchanged",
            Outcome::Uncordoned => "uncordoned",
            Outcome::Released => "released",
            Outcome::RefusedCap => "refused_cap",
            Outcome::RefusedRate => "refused_rate",
            Outcome::NodeNotFound => "node_not_found",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{verb} timed out after {after:?}")]
    Timeout { verb: &'static str, after: Duration },
    #[error("{verb}: {message}")]
    Failed { verb: &'static str, message: String },
    #[error("still conflicting after {CONFLICT_ATTEMPTS} attempts: the node keeps changing")]
    Conflicts,
}

enum PatchResult {
    Applied,
    Conflict,
}

pub struct Nodes {
    api: Api<Node>,
    timeout: Duration,
    dry_run: bool,
    metrics: Arc<CordonerMetrics>,
}

impl Nodes {
    pub fn new(
        client: kube::Client,
        timeout: Duration,
        dry_run: bool,
        metrics: Arc<CordonerMetrics>,
    ) -> Nodes {
        Nodes {
            api: Api::all(client),
            timeout,
            dry_run,
            metrics,
        }
    }

    fn count(&self, verb: &'static str, result: &'static str) {
        self.metrics
            .api_requests_total
            .get_or_create(&ApiLabels { verb, result })
            .inc();
    }

    /// Run one API call under the deadline and count its result.
    async fn call<T>(
        &self,
        verb: &'static str,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<Result<T, kube::Error>, ApiError> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                self.count(verb, "timeout");
                Err(ApiError::Timeout {
                    verb,
                    after: self.timeout,
                })
            }
            Ok(Ok(value)) => {
                self.count(verb, "ok");
                Ok(Ok(value))
            }
            Ok(Err(kube::Error::Api(status))) if status.is_conflict() => {
                self.count(verb, "conflict");
                Ok(Err(kube::Error::Api(status)))
            }
            Ok(Err(kube::Error::Api(status))) if status.is_not_found() => {
                self.count(verb, "not_found");
                Ok(Err(kube::Error::Api(status)))
            }
            Ok(Err(e)) => {
                self.count(verb, "error");
                Err(ApiError::Failed {
                    verb,
                    message: e.to_string(),
                })
            }
        }
    }

    async fn get(&self, name: &str) -> Result<Option<NodeView>, ApiError> {
        match self.call("get", self.api.get(name)).await? {
            Ok(node) => Ok(view(&node)),
            Err(_) => Ok(None),
        }
    }

    /// Every node's metadata (the annotations are all the cap needs), page by page.
    async fn list(&self) -> Result<Vec<NodeView>, ApiError> {
        let mut nodes = Vec::new();
        let mut params = ListParams::default().limit(LIST_PAGE);
        loop {
            let page = match self.call("list", self.api.list_metadata(&params)).await? {
                Ok(page) => page,
                Err(e) => {
                    return Err(ApiError::Failed {
                        verb: "list",
                        message: e.to_string(),
                    });
                }
            };
            nodes.extend(page.items.iter().filter_map(view));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(nodes),
            }
        }
    }

    async fn patch(&self, name: &str, patch: &Value) -> Result<PatchResult, ApiError> {
        let params = PatchParams {
            dry_run: self.dry_run,
            ..PatchParams::default()
        };
        match self
            .call("patch", self.api.patch(name, &params, &Patch::Merge(patch)))
            .await?
        {
            Ok(_) => Ok(PatchResult::Applied),
            // A vanished node is a conflict too: reading it again finds it gone.
            Err(_) => Ok(PatchResult::Conflict),
        }
    }

    /// Cordon and taint `name` for `alerts` (one patch for all), within the cap and the
    /// rate limit.
    pub async fn cordon(
        &self,
        name: &str,
        alerts: &BTreeSet<String>,
        limits: &Limits,
    ) -> Result<Outcome, ApiError> {
        for _ in 0..CONFLICT_ATTEMPTS {
            let Some(node) = self.get(name).await? else {
                return Ok(Outcome::NodeNotFound);
            };
            if node.cordoned_by_hangwatch() && node.cordon_alerts().is_superset(alerts) {
                return Ok(Outcome::Unchanged);
            }
            let joins = node.cordoned_by_hangwatch();
            // Tainting a node someone already cordoned costs no capacity: no cap for it.
            let takes_capacity = !joins && !node.unschedulable;
            let cap = if takes_capacity {
                let all = self.list().await?;
                let cap = self.note_cap(&all, limits);
                let held: Vec<&NodeView> = all.iter().filter(|n| n.holds_capacity()).collect();
                if held.len() >= cap {
                    return Ok(Outcome::RefusedCap);
                }
                let since = SystemTime::now() - limits.rate_window;
                let recent = held
                    .iter()
                    .filter(|n| n.cordoned_at().is_some_and(|t| t >= since))
                    .count();
                if recent >= limits.max_new_cordons {
                    return Ok(Outcome::RefusedRate);
                }
                Some(cap)
            } else {
                None
            };
            match self
                .patch(
                    name,
                    &plan::cordon_patch_for(&node, alerts, SystemTime::now()),
                )
                .await?
            {
                PatchResult::Conflict => continue,
                PatchResult::Applied if self.dry_run => return Ok(Outcome::Cordoned),
                PatchResult::Applied => {}
            }
            return match cap {
                Some(cap) => self.settle_race(name, cap).await,
                None if joins => Ok(Outcome::Joined),
                None => Ok(Outcome::Cordoned),
            };
        }
        Err(ApiError::Conflicts)
    }

    /// Replicas that cordoned at the same moment may together pass the cap. Each, after its
    /// own cordon, lists again and undoes every hangwatch cordon outside the earliest `cap`
    /// (by cordon time, then name): every replica computes the same set from the same nodes,
    /// so the excess is undone without a leader, whichever replica sees it first.
    async fn settle_race(&self, name: &str, cap: usize) -> Result<Outcome, ApiError> {
        let all = self.list().await?;
        let keep = plan::within_cap(&all, cap);
        for excess in all
            .iter()
            .filter(|n| n.holds_capacity() && !keep.contains(&n.name))
        {
            tracing::warn!(node = %excess.name, cap, "cordons made at the same time passed the cap; undoing the latest");
            self.undo(&excess.name).await?;
        }
        self.metrics.cordoned_nodes.set(keep.len() as i64);
        Ok(if keep.contains(name) {
            Outcome::Cordoned
        } else {
            Outcome::RefusedCap
        })
    }

    async fn undo(&self, name: &str) -> Result<(), ApiError> {
        for _ in 0..CONFLICT_ATTEMPTS {
            let Some(node) = self.get(name).await? else {
                return Ok(());
            };
            if !node.cordoned_by_hangwatch() {
                return Ok(());
            }
            if let PatchResult::Applied = self.patch(name, &plan::undo_patch(&node)).await? {
                return Ok(());
            }
        }
        Err(ApiError::Conflicts)
    }

    /// Take `alerts` off `name`'s cordon; undo the cordon when no alert holds it any more.
    pub async fn release(
        &self,
        name: &str,
        alerts: &BTreeSet<String>,
    ) -> Result<Outcome, ApiError> {
        for _ in 0..CONFLICT_ATTEMPTS {
            let Some(node) = self.get(name).await? else {
                return Ok(Outcome::NodeNotFound);
            };
            let (patch, outcome) = match plan::release_all(&node, alerts) {
                Release::NotOurs => return Ok(Outcome::Unchanged),
                Release::StillHeld(patch) => (patch, Outcome::Released),
                Release::Undo(patch) => (patch, Outcome::Uncordoned),
            };
            if let PatchResult::Applied = self.patch(name, &patch).await? {
                return Ok(outcome);
            }
        }
        Err(ApiError::Conflicts)
    }

    fn note_cap(&self, all: &[NodeView], limits: &Limits) -> usize {
        let cap = plan::cap(all.len(), limits.max_cordoned, limits.max_cordoned_percent);
        self.metrics.cordon_cap.set(cap as i64);
        self.metrics
            .cordoned_nodes
            .set(all.iter().filter(|n| n.holds_capacity()).count() as i64);
        cap
    }
}

fn view(object: &impl serde::Serialize) -> Option<NodeView> {
    serde_json::to_value(object)
        .ok()
        .as_ref()
        .and_then(NodeView::from_json)
}
