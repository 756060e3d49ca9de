//! A fake Kubernetes API server for the cordoner's and the node-status publisher's tests:
//! the one fake the project allows. It serves Nodes as the real API does (`v1` Node objects
//! with uid, resourceVersion, creationTimestamp, spec and status; `NodeList`), with the
//! `status` subresource (`/api/v1/nodes/{name}/status`: a write there changes only `status`,
//! a write to the node itself never changes `status`, as the real node strategies do), and
//! core/v1 Events (create, read, list, patch; 409 AlreadyExists on a name taken, 404 on a
//! patch of a missing one; an event's namespace must match its object's, `default` for a
//! Node). PATCH has the real semantics of each content type: `application/merge-patch+json`
//! (RFC 7386: a list is replaced whole, so a merge patch of `status.conditions` drops the
//! conditions it does not carry), `application/strategic-merge-patch+json` (maps merged,
//! `status.conditions` and `status.addresses` merged by their patch merge key `type`, other
//! lists replaced, `null` deletes, `$patch: delete` removes a list item) and
//! `application/json-patch+json` (RFC 6902); every kind honours a `metadata.resourceVersion`
//! precondition with 409 Conflict; condition times must be RFC 3339 (400 otherwise, as the
//! real decoder answers). Errors are real `Status` objects; every request is recorded. Modes:
//! every request hangs (`hang`) or answers 500 (`fail`). Server-side apply is not
//! implemented: nothing here sends it, and the fake answers it 415 rather than pretend.
//! `start_tls` serves the same behind TLS, as a real API server always is, with a
//! certificate for 127.0.0.1 from a throwaway CA (made with the `openssl` command).

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
    /// (namespace, name) → Event.
    events: BTreeMap<(String, String), Value>,
    requests: Vec<Recorded>,
}

#[derive(Clone)]
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    resource_version: Arc<AtomicU64>,
    hang: Arc<AtomicBool>,
    fail: Arc<AtomicBool>,
    conflicts: Arc<AtomicU64>,
}

pub struct FakeApiServer {
    shared: Shared,
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    tls: Option<Tls>,
}

/// The throwaway CA and the server's certificate, in a directory of their own.
struct Tls {
    dir: super::hangwatch::TempDir,
}

impl Tls {
    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA and a certificate it signs for 127.0.0.1 (an IP SAN, as the API server's
    /// certificate has for the service IP kubelet and pods reach it at).
    fn make() -> Tls {
        let dir = super::hangwatch::TempDir::new("api-tls");
        let d = dir.path();
        std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("san.ext");
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=fake-apiserver-ca",
            ],
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        ];
        for args in steps {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("run openssl (Debian package openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Tls { dir }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(self.dir.path().join("server.pem"))
            .expect("server.pem")
            .collect::<Result<Vec<_>, _>>()
            .expect("certificates");
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("server.key")).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
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
    failure(code, reason, message, name, "nodes")
}

/// A real `Status` failure object about the `kind` object `name`.
fn failure(code: StatusCode, reason: &str, message: String, name: &str, kind: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {"name": name, "kind": kind},
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
        Self::serve(nodes, None)
    }

    /// The same over HTTPS: `kubeconfig()` names the CA that signed the server's certificate.
    pub fn start_tls(nodes: &[&str]) -> FakeApiServer {
        Self::serve(nodes, Some(Tls::make()))
    }

    /// The CA of a TLS server.
    pub fn ca_path(&self) -> Option<std::path::PathBuf> {
        self.tls.as_ref().map(Tls::ca)
    }

    fn serve(nodes: &[&str], tls: Option<Tls>) -> FakeApiServer {
        let shared = Shared {
            cluster: Arc::default(),
            resource_version: Arc::new(AtomicU64::new(1000)),
            hang: Arc::default(),
            fail: Arc::default(),
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
            .route(
                "/api/v1/nodes/{name}/status",
                get(read_status).patch(patch_status),
            )
            .route(
                "/api/v1/namespaces/{namespace}/events",
                get(list_events).post(create_event),
            )
            .route(
                "/api/v1/namespaces/{namespace}/events/{name}",
                get(read_event).patch(patch_event),
            )
            .with_state(shared.clone());
        match tls.as_ref().map(Tls::acceptor) {
            None => {
                runtime.spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
            Some(acceptor) => {
                runtime.spawn(serve_tls(listener, acceptor, app));
            }
        }
        FakeApiServer {
            shared,
            addr,
            runtime: Some(runtime),
            tls,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig for this server (no credentials; the CA when it speaks TLS).
    pub fn kubeconfig(&self) -> String {
        let ca = self
            .ca_path()
            .map(|ca| format!("    certificate-authority: {}\n", ca.display()))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n{ca}\
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

    /// Answer every request 500 InternalError (until `fail(false)`), as an API server whose
    /// etcd is gone does.
    pub fn fail(&self, on: bool) {
        self.shared.fail.store(on, Ordering::Relaxed);
    }

    /// The node's condition of `type_name`, or Null.
    pub fn condition(&self, node: &str, type_name: &str) -> Value {
        self.node(node)["status"]["conditions"]
            .as_array()
            .and_then(|list| list.iter().find(|c| c["type"] == type_name))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Every stored Event, oldest name first.
    pub fn events(&self) -> Vec<Value> {
        self.shared
            .cluster
            .lock()
            .expect("lock")
            .events
            .values()
            .cloned()
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Each connection: the TLS handshake, then HTTP/1 into the same router. A failed handshake
/// (a client that does not trust the CA) closes that connection only.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    use tower::ServiceExt;
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| app.clone().oneshot(request),
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn wait_while_hung(shared: &Shared) {
    while shared.hang.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The 500 of `fail` mode, or None.
fn failing(shared: &Shared) -> Option<Response> {
    shared.fail.load(Ordering::Relaxed).then(|| {
        status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: etcdserver: request timed out".into(),
            "",
        )
    })
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
    if let Some(failed) = failing(&shared) {
        return failed;
    }
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
    read_node(shared, name, headers, "").await
}

/// The status subresource answers the whole Node, as the real one does.
async fn read_status(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    read_node(shared, name, headers, "/status").await
}

async fn read_node(shared: Shared, name: String, headers: HeaderMap, suffix: &str) -> Response {
    record(
        &shared,
        "GET",
        format!("/api/v1/nodes/{name}{suffix}"),
        &headers,
        b"",
    );
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
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

/// Which part of a Node a write may change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subresource {
    /// `/api/v1/nodes/{name}`: everything but `status`.
    Main,
    /// `/api/v1/nodes/{name}/status`: `status` only (and metadata).
    Status,
}

async fn patch(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_node(shared, name, query, headers, body, Subresource::Main).await
}

async fn patch_status(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_node(shared, name, query, headers, body, Subresource::Status).await
}

/// The list merge keys of a Node's strategic merge patch (`patchMergeKey` in the API types).
fn merge_key(path: &[&str]) -> Option<&'static str> {
    match path {
        ["status", "conditions"] | ["status", "addresses"] => Some("type"),
        ["spec", "taints"] => Some("key"),
        _ => None,
    }
}

/// Strategic merge patch: maps merge, `null` deletes, lists with a merge key merge item by
/// item (`$patch: delete` removes one), other lists are replaced.
fn strategic_merge(
    target: &mut Value,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<(), String> {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("made an object");
            for (key, value) in fields {
                if key.starts_with('$') {
                    return Err(format!("unsupported directive {key}"));
                }
                path.push(key.clone());
                let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                let list_key = merge_key(&keys);
                let dotted = keys.join(".");
                if value.is_null() {
                    object.remove(key);
                } else if let (Some(merge_key), Value::Array(items)) = (list_key, value) {
                    let list = object.entry(key.clone()).or_insert(json!([]));
                    if !list.is_array() {
                        *list = json!([]);
                    }
                    let list = list.as_array_mut().expect("made a list");
                    for item in items {
                        let id = item[merge_key].as_str().ok_or_else(|| {
                            format!("{dotted} item without its merge key {merge_key}")
                        })?;
                        let at = list.iter().position(|e| e[merge_key].as_str() == Some(id));
                        if item["$patch"] == "delete" {
                            if let Some(at) = at {
                                list.remove(at);
                            }
                            continue;
                        }
                        match at {
                            Some(at) => strategic_merge(&mut list[at], item, path)?,
                            None => list.push(item.clone()),
                        }
                    }
                } else {
                    strategic_merge(
                        object.entry(key.clone()).or_insert(Value::Null),
                        value,
                        path,
                    )?;
                }
                path.pop();
            }
        }
        other => *target = other.clone(),
    }
    Ok(())
}

/// What the real decoder refuses in a Node: condition times that are not RFC 3339.
fn invalid_node(node: &Value) -> Option<String> {
    for condition in node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for field in ["lastHeartbeatTime", "lastTransitionTime"] {
            match &condition[field] {
                Value::Null => {}
                Value::String(t) if humantime::parse_rfc3339(t).is_ok() => {}
                other => {
                    return Some(format!(
                        "Node in version \"v1\" cannot be handled as a Node: parsing time {other} as RFC 3339"
                    ));
                }
            }
        }
        if !matches!(
            condition["status"].as_str(),
            Some("True" | "False" | "Unknown")
        ) {
            return Some(format!(
                "status.conditions: Unsupported value: {}: supported values: \"True\", \"False\", \"Unknown\"",
                condition["status"]
            ));
        }
    }
    None
}

/// `dryRun=All` validates and answers the result without storing it, as the real API does.
async fn patch_node(
    shared: Shared,
    name: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Bytes,
    subresource: Subresource,
) -> Response {
    let dry_run = query.get("dryRun").map(String::as_str) == Some("All");
    let path = format!(
        "/api/v1/nodes/{name}{}{}",
        if subresource == Subresource::Status {
            "/status"
        } else {
            ""
        },
        if dry_run { "?dryRun=All" } else { "" }
    );
    record(&shared, "PATCH", path, &headers, &body);
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
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
    let kind = content_type.split(';').next().unwrap_or_default();
    if matches!(
        kind,
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) && let Some(wanted) = patch["metadata"]["resourceVersion"].as_str()
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
    match kind {
        "application/merge-patch+json" => merge_patch(&mut updated, &patch),
        "application/strategic-merge-patch+json" => {
            if let Err(e) = strategic_merge(&mut updated, &patch, &mut Vec::new()) {
                return status(StatusCode::BAD_REQUEST, "BadRequest", e, &name);
            }
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
                    "this fake applies json-patch, merge-patch and strategic-merge-patch only (got {other})"
                ),
                &name,
            );
        }
    }
    // The node strategies: the status subresource keeps the spec, the node keeps its status.
    match subresource {
        Subresource::Status => updated["spec"] = node["spec"].clone(),
        Subresource::Main => updated["status"] = node["status"].clone(),
    }
    if let Some(message) = invalid_node(&updated) {
        return status(StatusCode::BAD_REQUEST, "BadRequest", message, &name);
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

fn event_status(code: StatusCode, reason: &str, message: String, name: &str) -> Response {
    failure(code, reason, message, name, "events")
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// What the real validation refuses in a core/v1 Event.
fn invalid_event(namespace: &str, event: &Value) -> Option<String> {
    let object = &event["involvedObject"];
    let object_namespace = object["namespace"].as_str().unwrap_or_default();
    if object_namespace.is_empty() {
        if namespace != "default" {
            return Some(format!(
                "involvedObject.namespace: Invalid value: \"\": does not match event.namespace {namespace}"
            ));
        }
    } else if object_namespace != namespace {
        return Some(format!(
            "involvedObject.namespace: Invalid value: \"{object_namespace}\": does not match event.namespace"
        ));
    }
    if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        return Some("type: Unsupported value: supported values: \"Normal\", \"Warning\"".into());
    }
    if event["reason"].as_str().is_none_or(str::is_empty) || object["kind"].as_str().is_none() {
        return Some("reason and involvedObject.kind are required".into());
    }
    for field in ["firstTimestamp", "lastTimestamp"] {
        if let Some(t) = event[field].as_str()
            && humantime::parse_rfc3339(t).is_err()
        {
            return Some(format!("{field}: not RFC 3339: {t}"));
        }
    }
    None
}

async fn create_event(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &shared,
        "POST",
        format!("/api/v1/namespaces/{namespace}/events"),
        &headers,
        &body,
    );
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
    let Ok(mut event) = serde_json::from_slice::<Value>(&body) else {
        return event_status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "body is not JSON".into(),
            "",
        );
    };
    let name = event["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return event_status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value".into(),
            "",
        );
    }
    if let Some(message) = invalid_event(&namespace, &event) {
        return event_status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message, &name);
    }
    let mut cluster = shared.cluster.lock().expect("lock");
    let key = (namespace.clone(), name.clone());
    if cluster.events.contains_key(&key) {
        return event_status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("events \"{name}\" already exists"),
            &name,
        );
    }
    let rv = shared.resource_version.fetch_add(1, Ordering::Relaxed);
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["uid"] = json!(format!("7e2b0c1d-0000-4000-8000-{rv:012}"));
    event["metadata"]["resourceVersion"] = json!(rv.to_string());
    event["metadata"]["creationTimestamp"] = json!("2026-12-01T00:00:00Z");
    event["apiVersion"] = json!("v1");
    event["kind"] = json!("Event");
    cluster.events.insert(key, event.clone());
    json_response(StatusCode::CREATED, &event)
}

async fn read_event(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    record(
        &shared,
        "GET",
        format!("/api/v1/namespaces/{namespace}/events/{name}"),
        &headers,
        b"",
    );
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
    let cluster = shared.cluster.lock().expect("lock");
    match cluster.events.get(&(namespace, name.clone())) {
        Some(event) => json_response(StatusCode::OK, event),
        None => event_status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("events \"{name}\" not found"),
            &name,
        ),
    }
}

async fn list_events(
    State(shared): State<Shared>,
    Path(namespace): Path<String>,
    headers: HeaderMap,
) -> Response {
    record(
        &shared,
        "GET",
        format!("/api/v1/namespaces/{namespace}/events"),
        &headers,
        b"",
    );
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
    let cluster = shared.cluster.lock().expect("lock");
    let items: Vec<&Value> = cluster
        .events
        .iter()
        .filter(|((ns, _), _)| *ns == namespace)
        .map(|(_, e)| e)
        .collect();
    let rv = shared.resource_version.load(Ordering::Relaxed);
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": "v1", "kind": "EventList",
                "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

/// Merge and strategic-merge patches of an Event (it has no merge-keyed list, so both merge
/// maps and replace lists).
async fn patch_event(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &shared,
        "PATCH",
        format!("/api/v1/namespaces/{namespace}/events/{name}"),
        &headers,
        &body,
    );
    wait_while_hung(&shared).await;
    if let Some(failed) = failing(&shared) {
        return failed;
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !matches!(
        content_type.split(';').next().unwrap_or_default(),
        "application/merge-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return event_status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            format!(
                "this fake patches events with merge or strategic merge only (got {content_type})"
            ),
            &name,
        );
    }
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return event_status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "body is not JSON".into(),
            &name,
        );
    };
    let mut cluster = shared.cluster.lock().expect("lock");
    let Some(event) = cluster
        .events
        .get(&(namespace.clone(), name.clone()))
        .cloned()
    else {
        return event_status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("events \"{name}\" not found"),
            &name,
        );
    };
    let mut updated = event;
    merge_patch(&mut updated, &patch);
    if let Some(message) = invalid_event(&namespace, &updated) {
        return event_status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message, &name);
    }
    let rv = shared.resource_version.fetch_add(1, Ordering::Relaxed);
    updated["metadata"]["resourceVersion"] = json!(rv.to_string());
    cluster.events.insert((namespace, name), updated.clone());
    json_response(StatusCode::OK, &updated)
}
