//! The real `hangwatch-cordoner` process against the fake API server, and a webhook client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::fake_apiserver::FakeApiServer;
use super::hangwatch::{ChildLog, cordoner_binary};
use super::wait_for;

pub const TOKEN: &str = "test-token-0c4f9a";

pub struct Cordoner {
    child: Child,
    pub addr: SocketAddr,
    logs: ChildLog,
}

/// Write the fake's kubeconfig and the token into `dir`; returns (kubeconfig, token file).
pub fn credentials(api: &FakeApiServer, dir: &Path) -> (PathBuf, PathBuf) {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write token");
    (kubeconfig, token)
}

impl Cordoner {
    /// Start `hangwatch-cordoner` on an ephemeral port with `args` added; wait until it listens.
    pub fn start(api: &FakeApiServer, dir: &Path, args: &[&str]) -> Cordoner {
        let (kubeconfig, token) = credentials(api, dir);
        let mut child = Command::new(cordoner_binary())
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--token-file",
            ])
            .arg(&token)
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "hangwatch=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hangwatch-cordoner");
        let logs = ChildLog::capture(&mut child);
        let mut cordoner = Cordoner {
            child,
            addr: "127.0.0.1:1".parse().expect("addr"),
            logs,
        };
        let (addr, _) = wait_for("the cordoner to listen", Duration::from_secs(30), || {
            if let Ok(Some(status)) = cordoner.child.try_wait() {
                panic!("cordoner exited with {status}:\n{}", cordoner.logs());
            }
            cordoner.logs.listen_addr("cordoner listening")
        });
        cordoner.addr = addr;
        cordoner
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lines().join("\n")
    }

    /// POST `body` to the webhook with `authorization` (a full header value, or none).
    pub fn post(&self, body: &str, authorization: Option<&str>) -> (u16, Value) {
        post(&format!("{}/webhook", self.url()), body, authorization)
    }

    /// POST with the right token.
    pub fn notify(&self, body: &str) -> (u16, Value) {
        self.post(body, Some(&format!("Bearer {TOKEN}")))
    }

    pub fn metrics(&self) -> String {
        let mut response = agent()
            .get(&format!("{}/metrics", self.url()))
            .call()
            .expect("GET /metrics");
        response.body_mut().read_to_string().expect("metrics body")
    }
}

impl Drop for Cordoner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

pub fn post(url: &str, body: &str, authorization: Option<&str>) -> (u16, Value) {
    let mut request = agent().post(url).header("Content-Type", "application/json");
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let mut response = request.send(body).expect("POST webhook");
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An Alertmanager v4 notification of `alerts` (each: node, status, fingerprint).
pub fn notification(alerts: &[(&str, &str, &str)]) -> String {
    let alerts: Vec<Value> = alerts
        .iter()
        .map(|(node, status, fingerprint)| {
            serde_json::json!({
                "status": status,
                "labels": {
                    "alertname": "HangwatchRuntimeHung", "node": node, "runtime": "docker",
                    "severity": "critical", "hangwatch_action": "cordon",
                },
                "annotations": {"summary": format!("docker on {node} is not answering")},
                "startsAt": "2026-11-23T10:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": fingerprint,
            })
        })
        .collect();
    let firing = alerts.iter().any(|a| a["status"] == "firing");
    serde_json::json!({
        "version": "4",
        "groupKey": "{}/{hangwatch_action=\"cordon\"}:{alertname=\"HangwatchRuntimeHung\"}",
        "truncatedAlerts": 0,
        "status": if firing { "firing" } else { "resolved" },
        "receiver": "hangwatch-cordoner",
        "groupLabels": {"alertname": "HangwatchRuntimeHung"},
        "commonLabels": {"alertname": "HangwatchRuntimeHung", "hangwatch_action": "cordon"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    })
    .to_string()
}
