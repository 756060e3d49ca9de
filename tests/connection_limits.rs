//! Connection floods against the daemon's HTTP port and the cordoner's webhook: started with
//! a soft fd limit of 1,024, hangwatch raises it; 2,000 slowloris connections cannot keep
//! `/healthz` and `/metrics` from answering within 100 ms, every held connection is closed by
//! the server within the idle timeout, and the descriptors come back. Loopback only.

mod support;

use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::cordoner::Cordoner;
use support::fake_apiserver::FakeApiServer;
use support::hangwatch::{Hangwatch, TempDir, metric_value};
use support::http_probe::{HeldConnections, get, memory_kib, raise_own_fd_limit, soft_fd_limit};
use support::{exclusive, wait_for};

/// The server's idle (and header-read) timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// The server's connection cap.
const MAX_CONNECTIONS: usize = 256;
const LATENCY_BUDGET: Duration = Duration::from_millis(100);

/// A burst of connections waits in the accept queue until the server has accepted it:
/// answers that began within this long of the burst's end may take up to `BURST_BUDGET`.
const BURST_SETTLE: Duration = Duration::from_millis(500);
/// Under a SYN retransmission (1 s): measured 30-470 ms on a loaded 2-core machine.
const BURST_BUDGET: Duration = Duration::from_millis(900);

/// GETs `paths` in turn on fresh connections until stopped; returns when each began and how
/// long it took.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<(Instant, Duration)>, String>>,
}

impl Prober {
    fn start(addr: std::net::SocketAddr, paths: &'static [&'static str]) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                for path in paths {
                    let began = Instant::now();
                    let (status, _, took) = get(addr, path, Duration::from_secs(2))?;
                    if status != 200 {
                        return Err(format!("{path} answered {status}"));
                    }
                    answers.push((began, took));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(answers)
        });
        Prober { stop, thread }
    }

    /// Stop; the slowest answer during the burst (begun before `settled`), the slowest
    /// after it, and how many answered. Asserts the budgets.
    fn finish(self, settled: Instant) -> (Duration, Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let answers = match self.thread.join().expect("prober thread") {
            Ok(answers) => answers,
            Err(e) => panic!("a probe failed during the flood: {e}"),
        };
        let slowest = |during_burst: bool| {
            answers
                .iter()
                .filter(|(began, _)| (*began < settled) == during_burst)
                .map(|(_, took)| *took)
                .max()
                .unwrap_or_default()
        };
        let (burst, held) = (slowest(true), slowest(false));
        assert!(
            burst < BURST_BUDGET,
            "slowest answer during the burst {burst:?}"
        );
        assert!(held < LATENCY_BUDGET, "slowest answer while held {held:?}");
        (burst, held, answers.len())
    }
}

/// Hold `count` slowloris connections to `addr`, trickling a header byte every 100 ms; returns
/// once the server has closed them all: when the burst of connections has settled, and how
/// long closing took after the last was opened.
fn hold_until_closed(
    addr: std::net::SocketAddr,
    count: usize,
    mut sample: impl FnMut(),
) -> (Instant, Duration) {
    let mut held = HeldConnections::open(addr, count);
    let opened = Instant::now();
    let (_, took) = wait_for(
        "the server to close every held connection",
        IDLE_TIMEOUT + Duration::from_secs(3),
        || {
            sample();
            held.trickle();
            std::thread::sleep(Duration::from_millis(100));
            (held.still_open() == 0).then_some(())
        },
    );
    assert!(opened.elapsed() <= IDLE_TIMEOUT + Duration::from_secs(3));
    (opened + BURST_SETTLE, took)
}

#[test]
fn two_thousand_slowloris_connections_under_a_1024_fd_limit_leave_healthz_and_metrics_answering() {
    let _timing = exclusive();
    let hard = raise_own_fd_limit();
    assert!(
        hard > 2_100,
        "the hard fd limit ({hard}) is too low for this test"
    );
    let dir = TempDir::new("slowloris");
    let config = format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n",
        dir.path().display()
    );
    let hw = Hangwatch::start_with(&config, dir.path(), |command| {
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: 1024,
                    rlim_max: hard,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    assert_eq!(
        soft_fd_limit(hw.pid()),
        Some(hard),
        "hangwatch raised its soft limit"
    );
    assert!(
        hw.log_lines()
            .iter()
            .any(|l| l.contains("open-file limit raised to the hard limit")
                && l.contains("\"raised_from\":\"1024\"")),
        "the start-up log says so:\n{}",
        hw.logs()
    );
    // The kernel log is opened after start: count from when it is being read.
    wait_for("the kernel log to be read", Duration::from_secs(10), || {
        (hw.metric("hangwatch_kernel_log_up", &[]) == Some(1.0)).then_some(())
    });
    let baseline_fds = hw.open_fds();
    let rss_before = memory_kib(hw.pid(), "VmRSS").expect("VmRSS");

    let prober = Prober::start(hw.addr, &["/healthz", "/metrics"]);
    let mut peak_fds = 0;
    let pid = hw.pid();
    let (settled, took) = hold_until_closed(hw.addr, 2_000, || {
        peak_fds = peak_fds.max(
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0),
        );
    });
    let (burst, slowest, answered) = prober.finish(settled);
    let rss_peak = memory_kib(hw.pid(), "VmHWM").expect("VmHWM");
    let (fds_after, _) = wait_for(
        "descriptors back to the baseline",
        Duration::from_secs(5),
        || {
            let now = hw.open_fds();
            (now <= baseline_fds).then_some(now)
        },
    );
    let rss_after = memory_kib(hw.pid(), "VmRSS").expect("VmRSS");
    println!(
        "2,000 held: {answered} probes, slowest {slowest:?} (during the burst {burst:?}); fds {baseline_fds} -> peak {peak_fds} -> {fds_after}; \
         all closed {took:?} after the last was opened; RSS {rss_before} KiB -> peak {rss_peak} KiB -> {rss_after} KiB"
    );
    assert!(answered >= 20, "only {answered} probes answered");
    assert!(
        peak_fds <= baseline_fds + MAX_CONNECTIONS + 8,
        "{peak_fds} fds open at the peak (baseline {baseline_fds})"
    );
    let metrics = hw.metrics();
    for reason in ["evicted", "idle_timeout"] {
        assert!(
            metric_value(
                &metrics,
                "hangwatch_http_connections_closed_total",
                &[("reason", reason)]
            )
            .unwrap_or(0.0)
                > 0.0,
            "no connection closed as {reason}"
        );
    }
    assert!(
        rss_peak < rss_before + 32 * 1024,
        "RSS peaked at {rss_peak} KiB"
    );
}

#[test]
fn the_cordoner_webhook_sheds_held_connections_and_keeps_answering() {
    let _timing = exclusive();
    raise_own_fd_limit();
    let dir = TempDir::new("cordoner-slowloris");
    let api = FakeApiServer::start(&["node-1"]);
    let cordoner = Cordoner::start(&api, dir.path(), &[]);
    let prober = Prober::start(cordoner.addr, &["/healthz", "/metrics"]);
    let (settled, took) = hold_until_closed(cordoner.addr, 600, || {});
    let (burst, slowest, answered) = prober.finish(settled);
    println!(
        "cordoner, 600 held: {answered} probes, slowest {slowest:?} (during the burst {burst:?}); all closed after {took:?}"
    );
    assert!(answered >= 10, "only {answered} probes answered");
    assert!(
        metric_value(
            &cordoner.metrics(),
            "hangwatch_http_connections_closed_total",
            &[("reason", "evicted")]
        )
        .unwrap_or(0.0)
            > 0.0
    );
}
