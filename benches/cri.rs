//! The CRI probe's cost: one kubelet relist (`ListPodSandbox` + `ListContainers`) against a
//! private containerd with its CRI plugin running `HANGWATCH_CRI_PODS` host-network pods
//! (100 by default), through hangwatch's CRI client; then `hangwatch run` probing that
//! containerd natively and through CRI at default intervals for `HANGWATCH_IDLE_SECONDS`
//! (60 by default): CPU share of one core, RSS, and the relist as its probes saw it.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use support::cri::PrivateCri;
use support::hangwatch::{Hangwatch, TempDir, metric_value};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn status_kib(pid: i32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0.0)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = after_comm
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
}

fn main() {
    let pods = env("HANGWATCH_CRI_PODS", 100);
    let seconds = env("HANGWATCH_IDLE_SECONDS", 60);
    let daemon = PrivateCri::start();
    let created = Instant::now();
    for i in 0..pods {
        daemon.run_pod("bench", &format!("pod-{i}"), "app");
    }
    println!(
        "{pods} pods created through CRI in {:.1} s",
        created.elapsed().as_secs_f64()
    );

    let mut relists: Vec<Duration> = (0..20)
        .map(|_| {
            let began = Instant::now();
            let sandboxes = daemon
                .call(|mut c| async move {
                    c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                        .await
                })
                .expect("ListPodSandbox");
            let containers = daemon
                .call(|mut c| async move {
                    c.list_containers(cri::ListContainersRequest { filter: None })
                        .await
                })
                .expect("ListContainers");
            assert_eq!(sandboxes.items.len() as u64, pods);
            assert_eq!(containers.containers.len() as u64, pods);
            began.elapsed()
        })
        .collect();
    relists.sort();
    println!(
        "one relist (ListPodSandbox + ListContainers) against {pods} pods: median {:.1} ms, max {:.1} ms (20 runs)",
        relists[relists.len() / 2].as_secs_f64() * 1000.0,
        relists[relists.len() - 1].as_secs_f64() * 1000.0
    );

    let dir = TempDir::new("bench-cri");
    let config = daemon.hangwatch_config(
        dir.path(),
        "kernel_log:\n  enabled: false\nproc_scan:\n  enabled: false\n",
    );
    let hw = Hangwatch::start(&config, dir.path());
    let pid = hw.pid();
    std::thread::sleep(Duration::from_secs(6));
    let start_ticks = cpu_ticks(pid);
    let started = Instant::now();
    let mut peak_kib: f64 = 0.0;
    while started.elapsed() < Duration::from_secs(seconds) {
        peak_kib = peak_kib.max(status_kib(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_secs(1));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - start_ticks) as f64 / 100.0;
    let text = hw.metrics();
    let mean = |operation: &str| {
        let labels = [("runtime", "cri"), ("operation", operation)];
        let sum = metric_value(
            &text,
            "hangwatch_runtime_probe_duration_seconds_sum",
            &labels,
        );
        let count = metric_value(
            &text,
            "hangwatch_runtime_probe_duration_seconds_count",
            &labels,
        );
        match (sum, count) {
            (Some(s), Some(c)) if c > 0.0 => format!("{:.1} ms over {c} calls", 1000.0 * s / c),
            _ => "not observed".into(),
        }
    };
    println!(
        "hangwatch probing containerd + CRI ({pods} pods) at default intervals over {wall:.0} s \
         (kernel log and /proc scan off):"
    );
    println!(
        "  CPU: {cpu:.2} s = {:.3} % of one core",
        100.0 * cpu / wall
    );
    println!(
        "  RSS: {:.1} MiB at the end ({:.1} MiB peak sampled), private (RssAnon) {:.1} MiB",
        status_kib(pid, "VmRSS:") / 1024.0,
        peak_kib / 1024.0,
        status_kib(pid, "RssAnon:") / 1024.0
    );
    for operation in [
        "status",
        "list_pod_sandbox",
        "list_containers",
        "status_sample",
    ] {
        println!("  cri {operation}: {}", mean(operation));
    }
}
