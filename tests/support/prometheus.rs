//! The real Prometheus and Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`)
//! on loopback, for tests that evaluate dashboards and alerts end to end.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::wait_for;

/// A free loopback port (bound then released; fine for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn get_json(url: &str, query: &[(&str, &str)]) -> Result<Value, String> {
    let mut request = agent().get(url);
    for (k, v) in query {
        request = request.query(*k, *v);
    }
    let mut response = request.call().map_err(|e| format!("GET {url}: {e}"))?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("read {url}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("{url}: not JSON ({e}): {body}"))
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn spawn(binary: &str, args: &[String], log: PathBuf) -> Server {
        let file = fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary} (tests/run.sh installs it): {e}"));
        Server { child, log }
    }

    fn logs(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, what: &str, url: &str) {
        wait_for(what, Duration::from_secs(60), || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{what}: exited with {status}:\n{}", self.logs());
            }
            agent()
                .get(url)
                .call()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ())
        });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Prometheus {
    server: Server,
    pub url: String,
}

impl Prometheus {
    /// Start with `config` (prometheus.yml text) written into `dir`.
    pub fn start(config: &str, dir: &Path) -> Prometheus {
        let port = free_port();
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config).expect("write prometheus.yml");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", dir.join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_string(),
        ];
        let mut server = Server::spawn("prometheus", &args, dir.join("prometheus.log"));
        let url = format!("http://127.0.0.1:{port}");
        server.wait_ready("Prometheus ready", &format!("{url}/-/ready"));
        Prometheus { server, url }
    }

    /// An instant query: `Ok(result vector)` or the error Prometheus gave.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = get_json(&format!("{}/api/v1/query", self.url), &[("query", expr)])?;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Active alerts with their state (`pending`, `firing`).
    pub fn alerts(&self) -> Vec<Value> {
        get_json(&format!("{}/api/v1/alerts", self.url), &[])
            .ok()
            .and_then(|a| a["data"]["alerts"].as_array().cloned())
            .unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        self.server.logs()
    }
}

pub struct Alertmanager {
    server: Server,
    pub url: String,
    pub port: u16,
}

impl Alertmanager {
    /// Start with `config` (alertmanager.yml text) written into `dir`.
    pub fn start(config: &str, dir: &Path) -> Alertmanager {
        let port = free_port();
        let config_path = dir.join("alertmanager.yml");
        fs::write(&config_path, config).expect("write alertmanager.yml");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.path={}", dir.join("alertmanager").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            // No HA gossip: one instance, nothing to listen for.
            "--cluster.listen-address=".to_string(),
            "--log.level=warn".to_string(),
        ];
        let mut server = Server::spawn(
            "prometheus-alertmanager",
            &args,
            dir.join("alertmanager.log"),
        );
        let url = format!("http://127.0.0.1:{port}");
        server.wait_ready("Alertmanager ready", &format!("{url}/-/ready"));
        Alertmanager { server, url, port }
    }

    pub fn logs(&self) -> String {
        self.server.logs()
    }
}
