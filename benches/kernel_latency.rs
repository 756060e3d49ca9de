//! Latency from `write(/dev/kmsg)` to the counter moving in `/metrics`, through the release
//! daemon (target p99 ≤ 50 ms). Userspace lines are accepted for the measurement
//! (`accept_non_kernel: true`) and the kernel's write rate limit is lifted, then restored.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

use support::Sysctl;
use support::hangwatch::{Hangwatch, TempDir};

const SAMPLES: usize = 300;

fn oom_events(hw: &Hangwatch) -> f64 {
    hw.metric("hangwatch_kernel_events_total", &[("rule", "oom_kill")])
        .unwrap_or(0.0)
}

fn main() {
    let _unlimited = Sysctl::set("/proc/sys/kernel/printk_devkmsg", "on");

    let dir = TempDir::new("bench-kmsg");
    let config = format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\nkernel_log:\n  accept_non_kernel: true\n",
        dir.path().display()
    );
    let hw = Hangwatch::start(&config, dir.path());
    std::thread::sleep(Duration::from_secs(1));
    let mut latencies = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let before = oom_events(&hw);
        // With its newline, as the kernel ends its own: a record without one is kept open for
        // a continuation and no reader sees it until the next record is logged (6.x).
        let line = format!(
            "Memory cgroup out of memory: Killed process {} (bench) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:1kB oom_score_adj:0\n",
            4_000_000 + i
        );
        let mut kmsg = OpenOptions::new()
            .write(true)
            .open("/dev/kmsg")
            .expect("open /dev/kmsg");
        let written = Instant::now();
        kmsg.write_all(line.as_bytes()).expect("write /dev/kmsg");
        while oom_events(&hw) <= before {
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "event {i} never counted"
            );
        }
        latencies.push(written.elapsed());
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "write(/dev/kmsg) → hangwatch_kernel_events_total moved, {SAMPLES} samples (includes one /metrics scrape):"
    );
    println!(
        "  p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}
