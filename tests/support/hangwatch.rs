//! Run the real `hangwatch` binary in tests and read what it serves.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::wait_for;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_hangwatch")
}

/// Probing fast enough that a call is in flight within half a second of a SIGSTOP, and a
/// stall declared 2 s after.
pub const FAST_PROBES: &str =
    "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 6s\n";

/// Whether `text` (from /metrics) puts `runtime` in `state`.
pub fn runtime_in_state(text: &str, runtime: &str, state: &str) -> bool {
    metric_value(
        text,
        "hangwatch_runtime_state",
        &[("runtime", runtime), ("state", state)],
    ) == Some(1.0)
}

/// The cordoner's own binary.
pub fn cordoner_binary() -> &'static str {
    env!("CARGO_BIN_EXE_hangwatch-cordoner")
}

/// The log lines a child process writes to its (piped) stderr, collected by a thread.
#[derive(Clone)]
pub struct ChildLog(Arc<Mutex<Vec<String>>>);

impl ChildLog {
    pub fn capture(child: &mut Child) -> ChildLog {
        let stderr = child.stderr.take().expect("stderr piped");
        let log = ChildLog(Arc::default());
        let sink = log.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        log
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The `listen` field of the first JSON log line whose message is `message`.
    pub fn listen_addr(&self, message: &str) -> Option<SocketAddr> {
        self.lines().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = v.get("fields")?;
            (fields.get("message")?.as_str()? == message)
                .then(|| fields.get("listen")?.as_str()?.parse::<SocketAddr>().ok())?
        })
    }
}

/// A fresh directory for state, configs and outputs of one test; removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/hwt-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub struct Hangwatch {
    child: Option<Child>,
    pub addr: SocketAddr,
    logs: ChildLog,
}

impl Hangwatch {
    /// Start `hangwatch run` with `config` (YAML without a `log` section) on an ephemeral
    /// port, and wait until it serves.
    pub fn start(config: &str, dir: &Path) -> Hangwatch {
        Hangwatch::start_with(config, dir, |_| {})
    }

    /// Like `start`, letting the caller adjust the command (e.g. run as another user).
    pub fn start_with(config: &str, dir: &Path, adjust: impl FnOnce(&mut Command)) -> Hangwatch {
        let config_path = dir.join("hangwatch.yaml");
        fs::write(
            &config_path,
            format!("{config}\nlog:\n  format: json\n  level: debug\n"),
        )
        .expect("write config");
        let mut command = Command::new(binary());
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "hangwatch=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("start hangwatch");
        let logs = ChildLog::capture(&mut child);
        let mut hw = Hangwatch {
            child: Some(child),
            addr: "127.0.0.1:1".parse().expect("addr"),
            logs,
        };
        let (addr, _) = wait_for(
            "hangwatch to start listening",
            Duration::from_secs(30),
            || {
                if let Some(Ok(Some(status))) = hw.child.as_mut().map(|c| c.try_wait()) {
                    panic!("hangwatch exited early with {status}:\n{}", hw.logs());
                }
                hw.logs.listen_addr("hangwatch started")
            },
        );
        hw.addr = addr;
        hw
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.logs.lines()
    }

    pub fn logs(&self) -> String {
        self.log_lines().join("\n")
    }

    /// GET `path`; returns status and body. Panics on transport errors or after 5 s.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.get_with_accept(path, "*/*")
    }

    pub fn get_with_accept(&self, path: &str, accept: &str) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut response = agent
            .get(&format!("http://{}{path}", self.addr))
            .header("Accept", accept)
            .call()
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}\n{}", self.logs()));
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .expect("read body");
        (status, body)
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}");
        body
    }

    /// Value of the first series of `name` carrying all `labels`.
    /// Whether `runtime` is in `state` now.
    pub fn runtime_is(&self, runtime: &str, state: &str) -> bool {
        runtime_in_state(&self.metrics(), runtime, state)
    }

    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric_value(&self.metrics(), name, labels)
    }

    /// GET `path` serving a JSON array (`/incidents`, `/events`); panics unless 200 and JSON.
    pub fn list(&self, path: &str) -> Vec<serde_json::Value> {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let (status, body) = self.get("/status");
        assert_eq!(status, 200);
        serde_json::from_str(&body).expect("/status is JSON")
    }

    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn threads(&self) -> usize {
        fs::read_dir(format!("/proc/{}/task", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Send SIGTERM and wait for the exit; returns how long it took and the status.
    pub fn terminate(mut self) -> (Duration, ExitStatus) {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let (status, _) = wait_for("hangwatch to exit", Duration::from_secs(10), || {
            child.try_wait().ok().flatten()
        });
        (start.elapsed(), status)
    }
}

impl Drop for Hangwatch {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Value of the first series of `name` (exact family/sample name) carrying all `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if !all {
            return None;
        }
        rest.rsplit(' ').next()?.parse().ok()
    })
}

/// Run `hangwatch` with `args` to completion (with a deadline); returns exit code, stdout,
/// stderr.
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_program(binary(), args)
}

/// Run `program` with `args` (at most 2 minutes); exit code, stdout, stderr.
pub fn run_program(program: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new("timeout")
        .arg("120")
        .arg(program)
        .args(args)
        .output()
        .expect("run program");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
