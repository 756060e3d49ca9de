//! A small Kubernetes API client: the four calls the publisher makes (read its Node, patch
//! its Node's status, create and patch an Event), over hyper + rustls.
//!
//! Why not `kube` (which the cordoner uses): measured with release builds (fat LTO) and
//! `cargo bench --bench idle` (30 s, healthy private daemons; "on" = publishing to the fake
//! API server with a 5 s heartbeat):
//!
//! | daemon binary                 | size      | idle RSS off | idle RSS on (private) |
//! | ----------------------------- | --------- | ------------ | --------------------- |
//! | before node_status (216b475)  | 9.00 MiB  | 12.7 MiB     | -                     |
//! | this client (hyper + rustls)  | 11.25 MiB | 13.6 MiB     | 14.0 MiB (3.7 MiB)    |
//! | `kube` + `k8s-openapi` typed  | 13.10 MiB | 14.5 MiB     | 15.4 MiB (3.9 MiB)    |
//!
//! `kube` costs 1.85 MiB more binary and 1.4 MiB more RSS (file-backed text, which every
//! node pays) for four calls on JSON the publisher builds itself. This client uses only
//! crates already in the tree (hyper, hyper-util, hyper-rustls, rustls and ring come with
//! `kube` for the cordoner; base64 0.22 with bollard). What it supports of a kubeconfig is
//! what tests and in-cluster use need: server, CA (file or data), bearer token (inline or
//! file); not client certificates, exec plugins or proxies: those are refused with a
//! message, not ignored. TLS verifies the API server against the given CA only.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::Value;

use super::metrics::{RequestResult, count_request};

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// A Node with many images runs to a few hundred KiB; anything past this is not an answer.
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;
/// Bound service-account tokens are rotated in place by kubelet: read the file again this often.
const TOKEN_REREAD: Duration = Duration::from_secs(60);

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The API server answered with this status and message.
    Status(u16, String),
    Timeout,
    Unreachable(String),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Status(code, message) => write!(f, "HTTP {code}: {message}"),
            ApiError::Timeout => f.write_str("no answer within the request timeout"),
            ApiError::Unreachable(e) => write!(f, "unreachable: {e}"),
        }
    }
}

#[derive(Debug)]
enum Token {
    None,
    Inline(String),
    File {
        path: PathBuf,
        cached: Mutex<Option<(String, Instant)>>,
    },
}

impl Token {
    /// The bearer token. The file is a small one on a tmpfs that kubelet mounts: read in place.
    fn current(&self) -> Option<String> {
        match self {
            Token::None => None,
            Token::Inline(t) => Some(t.clone()),
            Token::File { path, cached } => {
                let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((token, at)) = cached.as_ref()
                    && at.elapsed() < TOKEN_REREAD
                {
                    return Some(token.clone());
                }
                match std::fs::read_to_string(path) {
                    Ok(token) => {
                        let token = token.trim().to_string();
                        *cached = Some((token.clone(), Instant::now()));
                        Some(token)
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the API token");
                        cached.as_ref().map(|(t, _)| t.clone())
                    }
                }
            }
        }
    }
}

pub struct ApiClient {
    server: String,
    token: Token,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

// The parts of a kubeconfig this client understands.
#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(rename = "current-context", default)]
    current_context: String,
    #[serde(default)]
    clusters: Vec<Named<KubeCluster>>,
    #[serde(default)]
    users: Vec<Named<KubeUser>>,
    #[serde(default)]
    contexts: Vec<Named<KubeContext>>,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Deserialize)]
struct KubeCluster {
    server: String,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<PathBuf>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
}

#[derive(Deserialize, Default)]
struct KubeUser {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate")]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    exec: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct KubeContext {
    cluster: String,
    user: Option<String>,
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("bad CA certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl ApiClient {
    /// From `kubeconfig` when given, else in-cluster: `KUBERNETES_SERVICE_HOST`/`_PORT`, the
    /// service account's token and CA.
    pub fn from_config(kubeconfig: &Path, timeout: Duration) -> Result<ApiClient, String> {
        if kubeconfig.as_os_str().is_empty() {
            Self::in_cluster(timeout)
        } else {
            Self::from_kubeconfig(kubeconfig, timeout)
        }
    }

    fn in_cluster(timeout: Duration) -> Result<ApiClient, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(
            |_| "not in a cluster: KUBERNETES_SERVICE_HOST is not set (set node_status.kubeconfig)",
        )?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let ca_path = Path::new(SERVICE_ACCOUNT).join("ca.crt");
        let ca = std::fs::read(&ca_path)
            .map_err(|e| format!("cannot read {}: {e}", ca_path.display()))?;
        let token = Token::File {
            path: Path::new(SERVICE_ACCOUNT).join("token"),
            cached: Mutex::new(None),
        };
        Self::build(format!("https://{host}:{port}"), token, Some(&ca), timeout)
    }

    fn from_kubeconfig(path: &Path, timeout: Duration) -> Result<ApiClient, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
        let config: Kubeconfig = serde_saphyr::from_str(&text)
            .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
        let context = config
            .contexts
            .iter()
            .find(|c| c.name == config.current_context)
            .ok_or_else(|| format!("kubeconfig has no context `{}`", config.current_context))?;
        let cluster = config
            .clusters
            .iter()
            .find(|c| c.name == context.value.cluster)
            .ok_or_else(|| format!("kubeconfig has no cluster `{}`", context.value.cluster))?;
        let user = context
            .value
            .user
            .as_ref()
            .and_then(|u| config.users.iter().find(|n| &n.name == u))
            .map(|n| &n.value);
        if let Some(user) = user
            && (user.client_certificate.is_some()
                || user.client_certificate_data.is_some()
                || user.exec.is_some())
        {
            return Err(
                "kubeconfig: client certificates and exec plugins are not supported; use a token"
                    .into(),
            );
        }
        let token = match user {
            Some(KubeUser { token: Some(t), .. }) => Token::Inline(t.clone()),
            Some(KubeUser {
                token_file: Some(p),
                ..
            }) => Token::File {
                path: p.clone(),
                cached: Mutex::new(None),
            },
            _ => Token::None,
        };
        let ca = match (
            &cluster.value.certificate_authority_data,
            &cluster.value.certificate_authority,
        ) {
            (Some(data), _) => Some(
                base64_decode(data)
                    .ok_or("kubeconfig: certificate-authority-data is not base64")?,
            ),
            (None, Some(file)) => Some(
                std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?,
            ),
            (None, None) => None,
        };
        let server = cluster.value.server.trim_end_matches('/').to_string();
        Self::build(server, token, ca.as_deref(), timeout)
    }

    fn build(
        server: String,
        token: Token,
        ca: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ApiClient, String> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(ca)?)
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(2)
            .build(connector);
        Ok(ApiClient {
            server,
            token,
            http,
            timeout,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// One call, answer read whole, all within the request timeout; counted by result. A
    /// call abandoned at the deadline drops its connection.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let result = tokio::time::timeout(
            self.timeout,
            self.call_unbounded(method, path, content_type, body),
        )
        .await
        .unwrap_or(Err(ApiError::Timeout));
        count_request(match &result {
            Ok(_) => RequestResult::Ok,
            Err(ApiError::Status(404 | 409, _)) => RequestResult::Conflict,
            Err(ApiError::Status(..)) => RequestResult::Error,
            Err(ApiError::Timeout) => RequestResult::Timeout,
            Err(ApiError::Unreachable(_)) => RequestResult::Unreachable,
        });
        result
    }

    async fn call_unbounded(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server))
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("hangwatch/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = self.token.current() {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(bytes))
            .map_err(|e| ApiError::Unreachable(e.to_string()))?;
        let response = self
            .http
            .request(request)
            .await
            .map_err(|e| ApiError::Unreachable(error_chain(&e)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ApiError::Unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.is_success() {
            if value.is_null() {
                return Err(ApiError::Unreachable("the answer is not JSON".into()));
            }
            return Ok(value);
        }
        let message = value["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
        Err(ApiError::Status(status.as_u16(), message))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Standard base64 (RFC 4648) of a kubeconfig's `*-data` fields, whitespace ignored.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_with_a_token_and_ca_data_is_understood() {
        let dir = std::env::temp_dir().join(format!("hangwatch-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: http://127.0.0.1:1/\n\
             users:\n- name: u\n  user:\n    token: abc\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n",
        )
        .expect("write");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let _guard = rt.enter();
        let client = ApiClient::from_config(&path, Duration::from_secs(1)).expect("client");
        assert_eq!(client.server(), "http://127.0.0.1:1");
        assert_eq!(client.token.current().as_deref(), Some("abc"));
        std::fs::write(
            &path,
            "current-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://x\n\
             users:\n- name: u\n  user:\n    client-certificate-data: Zm9v\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n",
        )
        .expect("write");
        let refused = ApiClient::from_config(&path, Duration::from_secs(1)).err();
        assert!(refused.is_some_and(|e| e.contains("not supported")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
