//! Runtime probes against real private dockerd + containerd: stall detection from the age of
//! the probe in flight, layer attribution, recovery, no resource growth, `check`.

mod support;

use std::time::{Duration, Instant};

use support::daemons::PrivateDaemons;
use support::hangwatch::{
    FAST_PROBES, Hangwatch, TempDir, metric_value, run_cli, runtime_in_state,
};
use support::wait_for;

/// The stall threshold of [`FAST_PROBES`].
const STALL: Duration = Duration::from_secs(2);

fn gauge(hw: &Hangwatch, name: &str, runtime: &str) -> f64 {
    hw.metric(name, &[("runtime", runtime)])
        .unwrap_or_else(|| panic!("{name}{{runtime={runtime}}} missing"))
}

/// Poll /metrics until `done` holds. With `timed`, every scrape must answer within 100 ms.
fn poll(
    hw: &Hangwatch,
    what: &str,
    deadline: Duration,
    timed: bool,
    done: impl Fn(&str) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let asked = Instant::now();
        let text = hw.metrics();
        let took = asked.elapsed();
        assert!(
            !timed || took < Duration::from_millis(100),
            "/metrics took {took:?} while waiting for {what}"
        );
        if done(&text) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}\n{}",
            hw.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stalled(text: &str, runtime: &str) -> bool {
    metric_value(text, "hangwatch_runtime_stalled", &[("runtime", runtime)]) == Some(1.0)
}

fn healthy(text: &str, runtime: &str) -> bool {
    runtime_in_state(text, runtime, "healthy")
}

#[test]
fn healthy_daemons_are_up_with_latency_observed() {
    let _timing = support::exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("healthy");
    let hw = Hangwatch::start(
        &daemons.hangwatch_config(dir.path(), FAST_PROBES),
        dir.path(),
    );
    wait_for("both runtimes healthy", Duration::from_secs(20), || {
        (hw.runtime_is("docker", "healthy") && hw.runtime_is("containerd", "healthy")).then_some(())
    });
    for runtime in ["docker", "containerd"] {
        assert_eq!(gauge(&hw, "hangwatch_runtime_up", runtime), 1.0);
        assert_eq!(gauge(&hw, "hangwatch_runtime_stalled", runtime), 0.0);
    }
    let text = hw.metrics();
    for (runtime, operation) in [
        ("docker", "ping"),
        ("docker", "list_containers"),
        ("containerd", "version"),
        ("containerd", "list_tasks:moby"),
        ("containerd", "list_tasks:k8s.io"),
    ] {
        let count = metric_value(
            &text,
            "hangwatch_runtime_probe_duration_seconds_count",
            &[("runtime", runtime), ("operation", operation)],
        )
        .unwrap_or(0.0);
        assert!(
            count >= 1.0,
            "no latency observed for {runtime}/{operation}"
        );
    }
    assert!(text.contains("hangwatch_build_info{"), "build info missing");
    let status = hw.status_json();
    assert_eq!(status["runtimes"][0]["state"], "healthy", "{status}");
    let (code, _) = hw.get("/healthz");
    assert_eq!(code, 200);
}

/// One stall/recover cycle of the daemon `stop`/`cont` act on. Returns the time from the
/// SIGSTOP to `hangwatch_runtime_stalled{runtime=stalled_runtime} 1`.
fn stall_cycle(
    hw: &Hangwatch,
    stop: &dyn Fn(),
    cont: &dyn Fn(),
    stalled_runtime: &str,
    bystander: &str,
) -> Duration {
    stop();
    let detected = poll(hw, "stall", STALL + Duration::from_secs(3), true, |t| {
        assert!(
            !stalled(t, bystander),
            "{bystander} reported stalled while only {stalled_runtime} was stopped"
        );
        stalled(t, stalled_runtime)
    });
    cont();
    poll(hw, "recovery", Duration::from_secs(15), true, |t| {
        healthy(t, stalled_runtime) && healthy(t, bystander)
    });
    detected
}

fn assert_no_growth(hw: &Hangwatch, cycles: impl Fn() -> Duration) {
    let mut baseline = None;
    let mut worst = Duration::ZERO;
    for cycle in 0..10 {
        let detected = cycles();
        worst = worst.max(detected);
        // A probe's connection may be open at the instant of sampling: count after the
        // first cycle and allow that much jitter.
        let now = (hw.open_fds(), hw.threads());
        let base = *baseline.get_or_insert(now);
        assert!(
            now.0 <= base.0 + 2,
            "cycle {cycle}: fds grew from {} to {}",
            base.0,
            now.0
        );
        assert!(
            now.1 <= base.1,
            "cycle {cycle}: threads grew from {} to {}",
            base.1,
            now.1
        );
    }
    // The stall must be declared within threshold + 1 s of the first probe stuck (probes
    // start every 0.5 s, so within threshold + 1.5 s of the SIGSTOP).
    assert!(
        worst <= STALL + Duration::from_millis(1500),
        "slowest detection {worst:?}"
    );
    eprintln!("slowest detection over 10 cycles: {worst:?}");
}

/// Ten stall/recover cycles of `stopped`'s daemon while `bystander` must stay healthy; returns
/// hangwatch for further checks.
fn ten_stall_cycles(
    daemons: &PrivateDaemons,
    dir: &TempDir,
    stopped: &str,
    bystander: &str,
) -> Hangwatch {
    let hw = Hangwatch::start(
        &daemons.hangwatch_config(dir.path(), FAST_PROBES),
        dir.path(),
    );
    poll(&hw, "healthy start", Duration::from_secs(20), false, |t| {
        healthy(t, "docker") && healthy(t, "containerd")
    });
    let signal = |sig| match stopped {
        "docker" => daemons.signal_dockerd(sig),
        _ => daemons.signal_containerd(sig),
    };
    assert_no_growth(&hw, || {
        stall_cycle(
            &hw,
            &|| signal(libc::SIGSTOP),
            &|| signal(libc::SIGCONT),
            stopped,
            bystander,
        )
    });
    hw
}

#[test]
fn dockerd_sigstop_stalls_docker_only_and_recovers_ten_times() {
    let _timing = support::exclusive();
    let daemons = PrivateDaemons::start();
    ten_stall_cycles(
        &daemons,
        &TempDir::new("stopdocker"),
        "docker",
        "containerd",
    );
}

#[test]
fn containerd_sigstop_stalls_containerd_while_dockerd_stays_healthy() {
    let _timing = support::exclusive();
    let daemons = PrivateDaemons::start();
    let hw = ten_stall_cycles(&daemons, &TempDir::new("stopctd"), "containerd", "docker");
    let (elapsed, status) = hw.terminate();
    assert!(status.success(), "exit status {status}");
    assert!(
        elapsed < Duration::from_secs(2),
        "shutdown took {elapsed:?}"
    );
}

#[test]
fn shutdown_within_two_seconds_while_probes_hang() {
    let _timing = support::exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("shutdown");
    let hw = Hangwatch::start(
        &daemons.hangwatch_config(dir.path(), FAST_PROBES),
        dir.path(),
    );
    poll(&hw, "healthy start", Duration::from_secs(20), false, |t| {
        healthy(t, "docker")
    });
    daemons.signal_dockerd(libc::SIGSTOP);
    daemons.signal_containerd(libc::SIGSTOP);
    poll(&hw, "both stalled", Duration::from_secs(10), false, |t| {
        stalled(t, "docker") && stalled(t, "containerd")
    });
    let (elapsed, status) = hw.terminate();
    daemons.signal_containerd(libc::SIGCONT);
    daemons.signal_dockerd(libc::SIGCONT);
    assert!(status.success(), "exit status {status}");
    assert!(
        elapsed < Duration::from_secs(2),
        "shutdown took {elapsed:?} with hung probes"
    );
}

#[test]
fn check_reports_healthy_then_stalled_dockerd() {
    let _timing = support::exclusive();
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("check");
    let config = dir.path().join("check.yaml");
    std::fs::write(
        &config,
        // The kernel log is shared with tests that cause real OOM kills: leave it out of a
        // test about runtime probes.
        daemons.hangwatch_config(
            dir.path(),
            "probes:\n  stall_threshold: 2s\n  deadline: 5s\nkernel_log:\n  enabled: false\n",
        ),
    )
    .expect("write config");
    let config = config.to_string_lossy().to_string();

    let (code, out, err) = run_cli(&["check", "--config", &config]);
    assert_eq!(code, 0, "healthy check exit {code}\n{out}{err}");
    assert!(out.contains("OK"), "{out}");
    assert!(out.contains("docker") && out.contains("healthy"), "{out}");

    daemons.signal_dockerd(libc::SIGSTOP);
    let started = Instant::now();
    let (code, out, err) = run_cli(&["check", "--config", &config]);
    let took = started.elapsed();
    let (json_code, json, _) = run_cli(&["check", "--config", &config, "--format", "json"]);
    daemons.signal_dockerd(libc::SIGCONT);

    assert_eq!(code, 1, "stalled check exit {code}\n{out}{err}");
    assert!(out.contains("PROBLEM"), "{out}");
    assert!(out.contains("docker is hung"), "{out}");
    assert!(out.contains("no answer after"), "{out}");
    assert!(
        took < Duration::from_secs(5),
        "check took {took:?} against a hung dockerd"
    );
    assert_eq!(json_code, 1);
    let report: serde_json::Value = serde_json::from_str(&json).expect("check JSON");
    assert_eq!(report["outcome"], "problem");
    let docker = report["snapshot"]["runtimes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["runtime"] == "docker"))
        .expect("docker in report");
    assert_eq!(docker["state"], "hung");
    let containerd = report["snapshot"]["runtimes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["runtime"] == "containerd"))
        .expect("containerd in report");
    assert_eq!(
        containerd["state"], "healthy",
        "containerd must not be blamed for dockerd"
    );
}
