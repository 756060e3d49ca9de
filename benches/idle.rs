//! Idle cost of `hangwatch run` with healthy private daemons at default intervals:
//! RSS (peak and at the end) and CPU share of one core over a window (60 s by default,
//! `HANGWATCH_IDLE_SECONDS` to change), and the binary's size. Targets: private memory
//! (RssAnon) ≤ 6 MiB, RSS ≤ 12 MiB (the rest is the binary's text, shared page cache),
//! CPU ≤ 0.2 % of a core. `HANGWATCH_IDLE_NODE_STATUS=1` also publishes node conditions
//! to the fake API server (heartbeat every 5 s instead of 5 min, so the client's cost shows).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::daemons::PrivateDaemons;
use support::hangwatch::{Hangwatch, TempDir};

fn proc_field(pid: i32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the comm: state is index 0, utime is field 14 of stat (index 11), stime 15.
    field(11) + field(12)
}

fn main() {
    let seconds: u64 = std::env::var("HANGWATCH_IDLE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("bench-idle");
    let api = std::env::var_os("HANGWATCH_IDLE_NODE_STATUS")
        .map(|_| support::fake_apiserver::FakeApiServer::start(&["bench-node"]));
    let extra = match &api {
        Some(api) => {
            let kubeconfig = dir.path().join("kubeconfig");
            std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
            format!(
                "node_name: bench-node\nnode_status:\n  enabled: true\n  kubeconfig: {}\n  heartbeat_period: 5s\n",
                kubeconfig.display()
            )
        }
        None => String::new(),
    };
    let hw = Hangwatch::start(&daemons.hangwatch_config(dir.path(), &extra), dir.path());
    let pid = hw.pid();
    // Let start-up (first probes, allocations) settle before measuring.
    std::thread::sleep(Duration::from_secs(5));
    let ticks_per_second = 100.0;
    let start_ticks = cpu_ticks(pid);
    let started = Instant::now();
    let mut peak_rss_kib = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        peak_rss_kib = peak_rss_kib.max(proc_field(pid, "status", "VmRSS:"));
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu_seconds = (cpu_ticks(pid) - start_ticks) as f64 / ticks_per_second;
    let wall = started.elapsed().as_secs_f64();
    let end_rss_kib = proc_field(pid, "status", "VmRSS:");
    let hwm_kib = proc_field(pid, "status", "VmHWM:");
    let anon_kib = proc_field(pid, "status", "RssAnon:");
    let file_kib = proc_field(pid, "status", "RssFile:");
    let size = std::fs::metadata(support::hangwatch::binary())
        .map(|m| m.len())
        .unwrap_or(0);
    let publishing = match &api {
        Some(api) => format!(
            ", node conditions published ({} status patches)",
            api.patches().len()
        ),
        None => String::new(),
    };
    println!("idle over {wall:.0} s with healthy private daemons, default intervals{publishing}:");
    println!(
        "  CPU: {cpu_seconds:.2} s = {:.3} % of one core",
        100.0 * cpu_seconds / wall
    );
    println!(
        "  RSS: {:.1} MiB at the end, {:.1} MiB peak sampled, {:.1} MiB high-water mark",
        end_rss_kib as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0,
        hwm_kib as f64 / 1024.0
    );
    println!(
        "  of which private (RssAnon) {:.1} MiB, binary text mapped from the page cache (RssFile) {:.1} MiB",
        anon_kib as f64 / 1024.0,
        file_kib as f64 / 1024.0
    );
    println!("  threads: {}, open fds: {}", hw.threads(), hw.open_fds());
    println!(
        "  binary: {:.2} MiB ({})",
        size as f64 / 1048576.0,
        support::hangwatch::binary()
    );
}
