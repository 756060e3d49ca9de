//! A fake Kubernetes API server for the cordoner's tests: the one fake the project allows.
//! It serves Nodes as the real API does (`v1` Node objects with uid, resourceVersion,
//! creationTimestamp, spec and status; `NodeList`), applies PATCH with the real semantics of
//! the content types kube-rs sends (`application/merge-patch+json`, RFC 7386, honouring a
//! `metadata.resourceVersion` precondition with 409 Conflict; `application/json-patch+json`,
//! RFC 6902), answers errors with real `Status` objects, and records every request. Strategic
//! merge and server-side apply are not implemented: hangwatch sends neither, and the fake
//! answers them 415 rather than pretend.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct Cluster {
    nodes: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    resource_version: Arc<AtomicU64>,
    hang: Arc<AtomicBool>,
    conflicts: Arc<AtomicU64>,
}

pub struct FakeApiServer {
    shared: Shared,
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

fn node_json(name: &str, resource_version: u64) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": format!("6f1c2a4e-0000-4000-8000-{:012}", resource_version),
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {
            "podCIDR": "10.244.0.0/24",
            "podCIDRs": ["10.244.0.0/24"],
            "providerID": format!("kind://docker/test/{name}"),
        },
        "status": {
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "lastHeartbeatTime": "2026-11-23T00:00:00Z",
                "lastTransitionTime": "2026-11-01T00:00:00Z",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
            }],
            "addresses": [{"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": "v1.33.1",
                "containerRuntimeVersion": "docker://20.10.24",
                "kernelVersion": "6.18.44",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "machineID": "0", "systemUUID": "0", "bootID": "0",
                "kubeProxyVersion": "",
            },
        },
    })
}

fn status(code: StatusCode, reason: &str, message: String, name: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": "nodes"},
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("made an object");
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// RFC 6902 JSON patch (add, remove, replace, test) on JSON pointers.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let (parent_path, last) = path.rsplit_once('/').ok_or("bad path")?;
        let last = last.replace("~1", "/").replace("~0", "~");
        match op["op"].as_str() {
            Some("test") => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("remove") => {
                let parent = target.pointer_mut(parent_path).ok_or("no parent")?;
                match parent {
                    Value::Object(o) => {
                        o.remove(&last).ok_or("nothing to remove")?;
                    }
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if i >= a.len() {
                            return Err("index out of range".into());
                        }
                        a.remove(i);
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            Some("add") | Some("replace") => {
                let parent = target.pointer_mut(parent_path).ok_or("no parent")?;
                let value = op["value"].clone();
                match parent {
                    Value::Object(o) => {
                        o.insert(last, value);
                    }
                    Value::Array(a) if last == "-" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if op["op"] == "add" {
                            a.insert(i.min(a.len()), value);
                        } else if i < a.len() {
                            a[i] = value;
                        }
                    }
                    _ => return Err("bad parent".into()),
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

impl FakeApiServer {
    /// Serve `nodes` on a loopback port, from a runtime of its own.
    pub fn start(nodes: &[&str]) -> FakeApiServer {
        let shared = Shared {
            cluster: Arc::default(),
            resource_version: Arc::new(AtomicU64::new(1000)),
            hang: Arc::default(),
            conflicts: Arc::default(),
        };
        {
            let mut cluster = shared.cluster.lock().expect("lock");
            for name in nodes {
                let rv = shared.resource_version.fetch_add(1, Ordering::Relaxed);
                cluster
                    .nodes
                    .insert((*name).to_string(), node_json(name, rv));
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = Router::new()
            .route("/api/v1/nodes", get(list))
            .route("/api/v1/nodes/{name}", get(read).patch(patch))
            .with_state(shared.clone());
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApiServer {
            shared,
            addr,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.url()
        )
    }

    pub fn node(&self, name: &str) -> Value {
        self.shared
            .cluster
            .lock()
            .expect("lock")
            .nodes
            .get(name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Change a node as another client would (e.g. a human's `kubectl cordon`).
    pub fn edit_node(&self, name: &str, edit: impl FnOnce(&mut Value)) {
        let mut cluster = self.shared.cluster.lock().expect("lock");
        let rv = self.shared.resource_version.fetch_add(1, Ordering::Relaxed);
        let node = cluster.nodes.get_mut(name).expect("node");
        edit(node);
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.cluster.lock().expect("lock").requests.clone()
    }

    pub fn patches(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect()
    }

    /// Another client writes each node just before each of the next `n` patches (a label
    /// change), so a patch conditional on what was read meets 409 Conflict.
    pub fn interleave_writes(&self, n: u64) {
        self.shared.conflicts.store(n, Ordering::Relaxed);
    }

    /// Make every request hang (until `hang(false)`), as an overloaded API server does.
    pub fn hang(&self, on: bool) {
        self.shared.hang.store(on, Ordering::Relaxed);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

async fn wait_while_hung(shared: &Shared) {
    while shared.hang.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn record(shared: &Shared, method: &str, path: String, headers: &HeaderMap, body: &[u8]) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    shared
        .cluster
        .lock()
        .expect("lock")
        .requests
        .push(Recorded {
            method: method.into(),
            path,
            content_type,
            body,
        });
}

/// `limit` and `continue` paginate (the token is the next item's offset here, opaque to
/// clients as the real one is); an `Accept` of `as=PartialObjectMetadataList` gets metadata
/// only, as `kube`'s `list_metadata` asks.
async fn list(
    State(shared): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    record(&shared, "GET", "/api/v1/nodes".into(), &headers, b"");
    wait_while_hung(&shared).await;
    let cluster = shared.cluster.lock().expect("lock");
    let rv = shared.resource_version.load(Ordering::Relaxed);
    let start: usize = query
        .get("continue")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let all: Vec<&Value> = cluster.nodes.values().collect();
    let page: Vec<&Value> = all.iter().skip(start).take(limit).copied().collect();
    let next = start + page.len();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if next < all.len() {
        metadata["continue"] = json!(next.to_string());
        metadata["remainingItemCount"] = json!(all.len() - next);
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let body = if accept.contains("as=PartialObjectMetadataList") {
        json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadataList",
            "metadata": metadata,
            "items": page.iter().map(|n| json!({
                "apiVersion": "meta.k8s.io/v1",
                "kind": "PartialObjectMetadata",
                "metadata": n["metadata"],
            })).collect::<Vec<_>>(),
        })
    } else {
        json!({"apiVersion": "v1", "kind": "NodeList", "metadata": metadata, "items": page})
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn read(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    record(
        &shared,
        "GET",
        format!("/api/v1/nodes/{name}"),
        &headers,
        b"",
    );
    wait_while_hung(&shared).await;
    let cluster = shared.cluster.lock().expect("lock");
    match cluster.nodes.get(&name) {
        Some(node) => (
            [(header::CONTENT_TYPE, "application/json")],
            node.to_string(),
        )
            .into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{name}\" not found"),
            &name,
        ),
    }
}

/// `dryRun=All` validates and answers the result without storing it, as the real API does.
async fn patch(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let dry_run = query.get("dryRun").map(String::as_str) == Some("All");
    let path = format!(
        "/api/v1/nodes/{name}{}",
        if dry_run { "?dryRun=All" } else { "" }
    );
    record(&shared, "PATCH", path, &headers, &body);
    wait_while_hung(&shared).await;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "body is not JSON".into(),
            &name,
        );
    };
    let mut cluster = shared.cluster.lock().expect("lock");
    let interleaved = shared
        .conflicts
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok();
    if interleaved && let Some(node) = cluster.nodes.get_mut(&name) {
        let rv = shared.resource_version.fetch_add(1, Ordering::Relaxed);
        let writes = node["metadata"]["labels"]["example.com/writes"]
            .as_str()
            .unwrap_or("0")
            .parse::<u64>()
            .unwrap_or(0);
        node["metadata"]["labels"]["example.com/writes"] = json!((writes + 1).to_string());
        node["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    let Some(node) = cluster.nodes.get(&name).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("nodes \"{name}\" not found"),
            &name,
        );
    };
    let mut updated = node.clone();
    match content_type.split(';').next().unwrap_or_default() {
        "application/merge-patch+json" => {
            if let Some(wanted) = patch["metadata"]["resourceVersion"].as_str()
                && node["metadata"]["resourceVersion"].as_str() != Some(wanted)
            {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                    &name,
                );
            }
            merge_patch(&mut updated, &patch);
        }
        "application/json-patch+json" => {
            if let Err(e) = json_patch(&mut updated, &patch) {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e, &name);
            }
        }
        other => {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!(
                    "this fake applies application/json-patch+json and application/merge-patch+json only (got {other})"
                ),
                &name,
            );
        }
    }
    if dry_run {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            updated.to_string(),
        )
            .into_response();
    }
    let rv = shared.resource_version.fetch_add(1, Ordering::Relaxed);
    updated["metadata"]["resourceVersion"] = json!(rv.to_string());
    cluster.nodes.insert(name, updated.clone());
    (
        [(header::CONTENT_TYPE, "application/json")],
        updated.to_string(),
    )
        .into_response()
}
