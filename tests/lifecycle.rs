//! Container stops through the real hangwatch binary and a private dockerd: a PID 1 that
//! ignores SIGTERM escalates to SIGKILL after the timeout, one that traps it does not; a
//! container frozen from above its own cgroup (so neither Docker nor runc can thaw it) makes a
//! stuck stop, reported at its deadline with the frozen tasks, in an incident, and cleared
//! when thawed; the event stream survives a dockerd restart and a cut connection without
//! counting anything twice.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use support::KilledOnDrop;
use support::daemons::{DOCKER_CLI, PrivateDaemons};
use support::hangwatch::{Hangwatch, TempDir, run_cli};
use support::{exclusive, wait_for};

const IMAGE: &str = "hwtest:lifecycle";
/// Short grace so a stuck stop is reported within seconds.
const GRACE: Duration = Duration::from_secs(2);
const CONFIG: &str = "probes:\n  interval: 500ms\nproc_scan:\n  interval: 500ms\n  stuck_after: 2s\nlifecycle:\n  stop_grace: 2s\n";
/// PID 1 without a SIGTERM handler: the kernel does not deliver SIGTERM to it.
const IGNORES_SIGTERM: &str = "sleep 1000";
const TRAPS_SIGTERM: &str = "trap 'exit 0' TERM; while true; do sleep 0.1; done";

fn start(daemons: &PrivateDaemons, dir: &TempDir) -> Hangwatch {
    daemons.import_image(IMAGE, &[]);
    Hangwatch::start(&daemons.hangwatch_config(dir.path(), CONFIG), dir.path())
}

fn run(daemons: &PrivateDaemons, name: &str, script: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", "-d", "--name", name, "--network", "none"];
    args.extend(extra);
    args.extend([IMAGE, "sh", "-c", script]);
    let id = daemons.docker_ok(&args);
    // A stop sent before the shell has installed its trap would be ignored like any other.
    wait_for(&format!("{name} running"), Duration::from_secs(30), || {
        (daemons.docker_ok(&["inspect", "-f", "{{.State.Running}}", name]) == "true").then_some(())
    });
    id
}

fn stops(hw: &Hangwatch) -> Value {
    let (code, body) = hw.get("/stops");
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("/stops is JSON")
}

fn recent_stop(hw: &Hangwatch, name: &str) -> Option<Value> {
    stops(hw)["recent"]
        .as_array()?
        .iter()
        .find(|s| s["container"]["name"] == name)
        .cloned()
}

fn metric(hw: &Hangwatch, name: &str) -> f64 {
    hw.metric(name, &[]).unwrap_or(0.0)
}

/// A family of the event streams' metrics, Docker's series.
fn docker_stream_metric(hw: &Hangwatch, name: &str) -> f64 {
    hw.metric(name, &[("runtime", "docker")]).unwrap_or(0.0)
}

fn stops_counted(hw: &Hangwatch) -> f64 {
    metric(hw, "hangwatch_container_stop_duration_seconds_count")
}

fn stuck_series(hw: &Hangwatch, id: &str) -> Option<String> {
    hw.metrics()
        .lines()
        .find(|l| {
            l.starts_with("hangwatch_stuck_container_stop_seconds{")
                && l.contains(&format!("container_id=\"{id}\""))
        })
        .map(str::to_string)
}

#[test]
fn pid_1_ignoring_sigterm_escalates_after_the_timeout_and_a_trapping_one_does_not() {
    let _timing = exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("lifecycle-escalation");
    let hw = start(&daemons, &dir);

    let ignoring = run(&daemons, "ignores-term", IGNORES_SIGTERM, &[]);
    let began = Instant::now();
    daemons.docker_ok(&["stop", "-t", "1", "ignores-term"]);
    let cli_seconds = began.elapsed().as_secs_f64();
    let (stop, _) = wait_for("the escalated stop", Duration::from_secs(10), || {
        recent_stop(&hw, "ignores-term")
    });
    assert_eq!(stop["escalated"], true, "{stop}");
    assert_eq!(stop["signals"], serde_json::json!([15, 9]), "{stop}");
    assert_eq!(stop["exit_code"], 137, "{stop}");
    assert_eq!(stop["container"]["image"], IMAGE, "{stop}");
    let duration = stop["duration_seconds"].as_f64().expect("duration");
    eprintln!(
        "escalated stop: {duration:.3} s by its events, `docker stop -t 1` took {cli_seconds:.3} s"
    );
    assert!(
        (1.0..2.0).contains(&duration),
        "the stop waited its 1 s timeout, then SIGKILL: {duration}"
    );
    assert_eq!(
        metric(&hw, "hangwatch_container_stop_escalations_total"),
        1.0
    );
    // containerd's `moby` namespace reports the same exit: listed and counted as an exit,
    // not as a second stop.
    let (exit, _) = wait_for(
        "the exit from containerd's events",
        Duration::from_secs(10),
        || {
            stops(&hw)["recent_exits"]
                .as_array()?
                .iter()
                .find(|e| e["container"]["id"] == ignoring.as_str())
                .cloned()
        },
    );
    assert_eq!(exit["containerd_namespace"], "moby", "{exit}");
    assert_eq!(exit["exit_status"], 137, "{exit}");
    assert_eq!(exit["container"]["name"], "ignores-term", "{exit}");
    assert_eq!(
        hw.metric(
            "hangwatch_container_exits_total",
            &[("runtime", "containerd"), ("reason", "signal_kill")]
        ),
        Some(1.0)
    );
    assert_eq!(stops_counted(&hw), 1.0);
    assert_eq!(stops(&hw)["recent"].as_array().map(Vec::len), Some(1));
    let sum = metric(&hw, "hangwatch_container_stop_duration_seconds_sum");
    assert!((sum - duration).abs() < 1e-6, "{sum} vs {duration}");
    assert_eq!(
        hw.metric(
            "hangwatch_container_stop_duration_seconds_bucket",
            &[("le", "1.0")]
        ),
        Some(0.0)
    );
    assert_eq!(
        hw.metric(
            "hangwatch_container_stop_duration_seconds_bucket",
            &[("le", "2.5")]
        ),
        Some(1.0)
    );

    run(&daemons, "traps-term", TRAPS_SIGTERM, &[]);
    daemons.docker_ok(&["stop", "-t", "10", "traps-term"]);
    let (stop, _) = wait_for("the clean stop", Duration::from_secs(10), || {
        recent_stop(&hw, "traps-term")
    });
    assert_eq!(stop["escalated"], false, "{stop}");
    assert_eq!(stop["signals"], serde_json::json!([15]), "{stop}");
    assert_eq!(stop["exit_code"], 0, "{stop}");
    assert!(
        stop["duration_seconds"].as_f64().expect("duration") < 1.0,
        "{stop}"
    );
    assert_eq!(stops_counted(&hw), 2.0);
    assert_eq!(
        metric(&hw, "hangwatch_container_stop_escalations_total"),
        1.0,
        "a handled SIGTERM is no escalation"
    );
    assert_eq!(metric(&hw, "hangwatch_stuck_container_stops"), 0.0);

    // `check` reads the same stops from dockerd's buffer and names the image that ignores
    // SIGTERM.
    let config = dir.path().join("check.yaml");
    std::fs::write(&config, daemons.hangwatch_config(dir.path(), "")).expect("write config");
    let (code, text, err) = run_cli(&["check", "--config", &config.to_string_lossy()]);
    assert!(code == 0 || code == 1, "{text}{err}");
    assert!(
        text.contains("images whose containers ignored their stop signal: hwtest:lifecycle (1)"),
        "{text}"
    );
    assert!(text.contains("traps-term"), "{text}");
    assert!(!text.contains("events not trustworthy"), "{text}");
    let (_, json, _) = run_cli(&[
        "check",
        "--config",
        &config.to_string_lossy(),
        "--format",
        "json",
    ]);
    let report: Value = serde_json::from_str(&json).expect("check JSON");
    assert_eq!(report["stops"]["recent"].as_array().map(Vec::len), Some(2));
}

/// A cgroup parent of our own, removed (in every hierarchy) when the test ends.
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> CgroupParent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        CgroupParent(format!("hwlife-{}-{n}", std::process::id()))
    }

    fn freezer_state(&self) -> PathBuf {
        Path::new("/sys/fs/cgroup/freezer")
            .join(&self.0)
            .join("freezer.state")
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let _ = std::fs::write(self.freezer_state(), "THAWED");
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&self.0));
            }
        }
    }
}

/// The parent frozen through the v1 freezer; thawed on drop, so a failing test does not leave
/// a container nobody can remove.
struct Frozen<'a>(&'a CgroupParent);

impl<'a> Frozen<'a> {
    fn freeze(parent: &'a CgroupParent) -> Frozen<'a> {
        std::fs::write(parent.freezer_state(), "FROZEN").expect("freeze the parent cgroup");
        Frozen(parent)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.freezer_state(), "THAWED");
    }
}

/// Freezing the container's own cgroup does not make a stuck stop on this kind of node: runc
/// thaws a container it finds frozen before SIGKILL, and a cgroup v2 freeze lets SIGKILL
/// through. Frozen from its parent, the container keeps its SIGKILL pending like a task in D.
#[test]
fn a_frozen_container_makes_a_stuck_stop_reported_with_its_tasks_until_thawed() {
    let _timing = exclusive();
    assert!(
        Path::new("/sys/fs/cgroup/freezer").is_dir(),
        "this test needs the cgroup v1 freezer (hybrid hierarchy)"
    );
    let parent = CgroupParent::new();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("lifecycle-stuck");
    let hw = start(&daemons, &dir);
    let cgroup_parent = format!("/{}", parent.0);
    let id = run(
        &daemons,
        "frozen",
        IGNORES_SIGTERM,
        &["--cgroup-parent", &cgroup_parent],
    );
    let frozen = Frozen::freeze(&parent);

    let began = Instant::now();
    let stop = docker_in_background(&daemons, &["stop", "-t", "1", "frozen"]);
    let timeout_and_grace = Duration::from_secs(1) + GRACE;
    wait_for(
        "the stuck stop",
        timeout_and_grace + Duration::from_secs(10),
        || (metric(&hw, "hangwatch_stuck_container_stops") == 1.0).then_some(()),
    );
    let latency = began.elapsed();
    eprintln!(
        "stuck stop reported {latency:?} after `docker stop -t 1` began (timeout + grace = {timeout_and_grace:?})"
    );
    assert!(
        latency >= timeout_and_grace,
        "reported before its deadline: {latency:?}"
    );
    assert!(
        latency < timeout_and_grace + Duration::from_secs(3),
        "reported late: {latency:?}"
    );
    let series = stuck_series(&hw, &id).expect("per-container series");
    assert!(series.contains("container_name=\"frozen\""), "{series}");

    let (stuck, _) = wait_for(
        "the frozen tasks as evidence",
        Duration::from_secs(15),
        || {
            let view = stops(&hw);
            let stop = view["in_progress"]
                .as_array()?
                .iter()
                .find(|s| s["container"]["id"] == id.as_str())?
                .clone();
            (stop["held_by"]["frozen_tasks"].as_u64()? >= 1).then_some(stop)
        },
    );
    assert_eq!(stuck["stuck"], true, "{stuck}");
    assert_eq!(stuck["escalated"], true, "{stuck}");
    assert_eq!(stuck["container"]["image"], IMAGE, "{stuck}");

    let (incident, _) = wait_for(
        "an open incident naming the stuck stop and its frozen task",
        Duration::from_secs(15),
        || {
            hw.list("/incidents").into_iter().find(|i| {
                i["ended_at"].is_null()
                    && i["evidence"].as_array().is_some_and(|e| {
                        e.iter().any(|e| {
                            e["evidence"] == "stuck_stop"
                                && e["container_id"] == id.as_str()
                                && e["held_by"]["frozen_tasks"].as_u64() >= Some(1)
                        })
                    })
            })
        },
    );
    assert_eq!(incident["runtime"], "docker", "{incident}");
    assert_eq!(incident["layer"], "container", "{incident}");
    assert_eq!(
        incident["stuck_stops"],
        serde_json::json!([id]),
        "{incident}"
    );
    let cause = incident["suspected_cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("stop of container frozen (image hwtest:lifecycle) stuck for")
            && cause.contains("frozen task(s)"),
        "{cause}"
    );
    let incident_id = incident["id"].as_str().expect("id").to_string();

    drop(frozen);
    wait_for(
        "the stop to end and its series to go",
        Duration::from_secs(15),
        || {
            (metric(&hw, "hangwatch_stuck_container_stops") == 0.0
                && stuck_series(&hw, &id).is_none())
            .then_some(())
        },
    );
    let ended = recent_stop(&hw, "frozen").expect("the ended stop");
    assert_eq!(ended["was_stuck"], true, "{ended}");
    assert_eq!(ended["ended_by"], "died", "{ended}");
    assert_eq!(ended["exit_code"], 137, "{ended}");
    assert!(
        ended["duration_seconds"].as_f64() >= Some(timeout_and_grace.as_secs_f64()),
        "{ended}"
    );
    assert_eq!(stops_counted(&hw), 1.0);
    wait_for("the incident to close", Duration::from_secs(15), || {
        hw.list("/incidents")
            .into_iter()
            .find(|i| i["id"] == incident_id.as_str() && !i["ended_at"].is_null())
    });
    drop(stop);
}

/// Stalls are declared within seconds, and a stop without SIGKILL is stuck 3 + 2 s after its
/// first kill.
const STALL_CONFIG: &str = "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 6s\n\
dumps:\n  enabled: false\nlifecycle:\n  stop_timeout: 3s\n  stop_grace: 2s\n";

fn events_stream(hw: &Hangwatch) -> Value {
    stops(hw)["events_stream"].clone()
}

fn docker_in_background(daemons: &PrivateDaemons, args: &[&str]) -> KilledOnDrop {
    KilledOnDrop(
        Command::new("timeout")
            .arg("90")
            .arg(DOCKER_CLI)
            .arg("-H")
            .arg(format!("unix://{}", daemons.docker_socket.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker CLI in the background"),
    )
}

/// dockerd stopped (SIGSTOP) in the middle of a stop: its events stop with it. hangwatch must
/// neither read the silence as "nothing is stopping" nor lose the stop it saw begin.
#[test]
fn a_stalled_dockerd_makes_its_silence_untrusted_and_the_stop_it_began_goes_stuck() {
    let _timing = exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("lifecycle-stalled");
    daemons.import_image(IMAGE, &[]);
    let hw = Hangwatch::start(
        &daemons.hangwatch_config(dir.path(), STALL_CONFIG),
        dir.path(),
    );
    wait_for("a trusted event stream", Duration::from_secs(30), || {
        (events_stream(&hw)["healthy"] == true).then_some(())
    });
    let id = run(&daemons, "slow", IGNORES_SIGTERM, &[]);
    let began = Instant::now();
    // SIGKILL would only come after a minute.
    let stop = docker_in_background(&daemons, &["stop", "-t", "60", "slow"]);
    wait_for("the stop begun", Duration::from_secs(15), || {
        stops(&hw)["in_progress"]
            .as_array()?
            .iter()
            .any(|s| s["container"]["id"] == id.as_str())
            .then_some(())
    });
    daemons.signal_dockerd(libc::SIGSTOP);

    let (stream, _) = wait_for(
        "the stream no longer trusted",
        Duration::from_secs(15),
        || {
            let stream = events_stream(&hw);
            (stream["healthy"] == false).then_some(stream)
        },
    );
    assert!(
        stream["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("docker is hung")),
        "{stream}"
    );
    assert_eq!(stream["connected"], true, "{stream}");
    wait_for("the stop stuck", Duration::from_secs(15), || {
        (metric(&hw, "hangwatch_stuck_container_stops") == 1.0).then_some(())
    });
    let latency = began.elapsed();
    eprintln!("stuck {latency:?} after the stop began, no event since its first kill");
    assert!(
        latency >= Duration::from_secs(5),
        "before its deadline: {latency:?}"
    );
    let stuck = stops(&hw)["in_progress"][0].clone();
    assert_eq!(stuck["stuck"], true, "{stuck}");
    assert_eq!(stuck["signals"], serde_json::json!([15]), "{stuck}");
    let (incident, _) = wait_for(
        "the stall incident holding the stuck stop",
        Duration::from_secs(15),
        || {
            hw.list("/incidents")
                .into_iter()
                .find(|i| i["ended_at"].is_null() && i["stuck_stops"] == serde_json::json!([id]))
        },
    );
    assert_eq!(
        incident["layer"], "dockerd",
        "the stop joined the stall: {incident}"
    );
    assert_eq!(hw.list("/incidents").len(), 1, "one incident, not two");

    daemons.signal_dockerd(libc::SIGCONT);
    wait_for("the stream trusted again", Duration::from_secs(30), || {
        (events_stream(&hw)["healthy"] == true).then_some(())
    });
    daemons.docker_ok(&["kill", "slow"]);
    wait_for("the stop ended", Duration::from_secs(15), || {
        (metric(&hw, "hangwatch_stuck_container_stops") == 0.0 && stuck_series(&hw, &id).is_none())
            .then(|| recent_stop(&hw, "slow"))
            .flatten()
    });
    drop(stop);
}

/// Wait until the event stream has been opened again `times` times.
fn wait_reconnected(hw: &Hangwatch, times: f64) {
    wait_for("the event stream back", Duration::from_secs(60), || {
        (docker_stream_metric(hw, "hangwatch_lifecycle_events_stream_reconnects_total") >= times
            && docker_stream_metric(hw, "hangwatch_lifecycle_events_stream_up") == 1.0)
            .then_some(())
    });
}

/// Stop a container that exits on SIGTERM and wait until hangwatch has recorded the stop.
fn clean_stop(daemons: &PrivateDaemons, hw: &Hangwatch, name: &str) {
    run(daemons, name, TRAPS_SIGTERM, &[]);
    daemons.docker_ok(&["stop", name]);
    wait_for(
        &format!("the stop of {name} recorded"),
        Duration::from_secs(15),
        || recent_stop(hw, name),
    );
}

/// Remove `name` and wait for its `destroy`, the newest event: then exactly `events` events
/// must have been applied. Events arrive in order, so a replay counted twice shows here.
fn remove_and_count(daemons: &PrivateDaemons, hw: &Hangwatch, name: &str, events: f64) {
    daemons.docker_ok(&["rm", name]);
    wait_for(
        &format!("{events} events applied"),
        Duration::from_secs(15),
        || (docker_stream_metric(hw, "hangwatch_lifecycle_events_total") >= events).then_some(()),
    );
    assert_eq!(
        docker_stream_metric(hw, "hangwatch_lifecycle_events_total"),
        events
    );
}

fn recent_names(hw: &Hangwatch) -> Vec<String> {
    stops(hw)["recent"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s["container"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn dockerd_restart_reconnects_without_double_counting() {
    let _timing = exclusive();
    let mut daemons = PrivateDaemons::start();
    let dir = TempDir::new("lifecycle-restart");
    let hw = start(&daemons, &dir);
    clean_stop(&daemons, &hw, "before");
    // kill, die, stop, destroy.
    remove_and_count(&daemons, &hw, "before", 4.0);

    daemons.restart_dockerd();
    wait_reconnected(&hw, 1.0);
    clean_stop(&daemons, &hw, "after");
    remove_and_count(&daemons, &hw, "after", 8.0);
    assert_eq!(stops_counted(&hw), 2.0);
    assert_eq!(recent_names(&hw), ["after", "before"]);
    assert_eq!(
        docker_stream_metric(&hw, "hangwatch_lifecycle_events_malformed_total"),
        0.0
    );
    let (code, _) = hw.get("/healthz");
    assert_eq!(code, 200, "{}", hw.logs());
    assert!(!hw.logs().contains("panicked"), "{}", hw.logs());
}

/// A unix socket in front of dockerd's whose open connections can be cut, leaving dockerd and
/// the events it buffers as they are.
struct Proxy {
    path: PathBuf,
    open: Arc<Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(path: PathBuf, upstream: PathBuf) -> Proxy {
        let listener = UnixListener::bind(&path).expect("bind the proxy socket");
        let open: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let tracked = open.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                {
                    let mut open = tracked.lock().unwrap_or_else(|p| p.into_inner());
                    for stream in [&client, &server] {
                        if let Ok(handle) = stream.try_clone() {
                            open.push(handle);
                        }
                    }
                }
                std::thread::spawn(move || pump(client, server_copy));
                std::thread::spawn(move || pump(server, client_copy));
            }
        });
        Proxy { path, open }
    }

    /// Close every connection open now.
    fn cut(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for stream in open.drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pump(mut from: UnixStream, mut to: UnixStream) {
    let mut buffer = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buffer) {
        if n == 0 || to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// The `since` of the newest "following docker events" log line, as a wall-clock time.
fn last_resume_point(hw: &Hangwatch) -> Option<SystemTime> {
    hw.log_lines().iter().rev().find_map(|line| {
        let v: Value = serde_json::from_str(line).ok()?;
        let fields = v.get("fields")?;
        if fields.get("message")?.as_str()? != "following docker events" {
            return None;
        }
        let (secs, nanos) = fields.get("since")?.as_str()?.split_once('.')?;
        Some(SystemTime::UNIX_EPOCH + Duration::new(secs.parse().ok()?, nanos.parse().ok()?))
    })
}

#[test]
fn events_replayed_after_a_cut_stream_are_not_counted_twice() {
    let _timing = exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("lifecycle-cut");
    let proxy = Proxy::start(
        dir.path().join("docker.sock"),
        daemons.docker_socket.clone(),
    );
    daemons.import_image(IMAGE, &[]);
    let config = daemons.hangwatch_config(dir.path(), CONFIG).replace(
        &format!("socket: {}", daemons.docker_socket.display()),
        &format!("socket: {}", proxy.path.display()),
    );
    let hw = Hangwatch::start(&config, dir.path());
    wait_for("the event stream open", Duration::from_secs(30), || {
        (docker_stream_metric(&hw, "hangwatch_lifecycle_events_stream_up") == 1.0).then_some(())
    });

    clean_stop(&daemons, &hw, "first");
    wait_for(
        "kill, die and stop applied",
        Duration::from_secs(15),
        || (docker_stream_metric(&hw, "hangwatch_lifecycle_events_total") >= 3.0).then_some(()),
    );
    let first = recent_stop(&hw, "first").expect("first stop");
    let died = humantime::parse_rfc3339(first["ended_at"].as_str().expect("ended_at"))
        .expect("RFC 3339 time");
    proxy.cut();
    wait_reconnected(&hw, 1.0);
    let resumed = last_resume_point(&hw).expect("a resume logged");
    assert!(
        resumed < died,
        "the resume must replay the first stop's events for this test to mean anything: \
         {resumed:?} vs {died:?}"
    );

    clean_stop(&daemons, &hw, "second");
    assert_eq!(
        stops_counted(&hw),
        2.0,
        "the replayed stop was counted again"
    );
    remove_and_count(&daemons, &hw, "second", 7.0);
    assert_eq!(recent_names(&hw), ["second", "first"]);
}
