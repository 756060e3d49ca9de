//! The proc scan detector: registered when enabled, sends a report per interval, beats its
//! heartbeat, keeps the async runtime responsive while scanning, and stops on shutdown.

mod support;

use support::KilledOnDrop;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangwatch::config::Config;
use hangwatch::heartbeat::Heartbeats;
use hangwatch::signal::{self, Signal};
use hangwatch::sources::procscan::{self, detect::ScanReport};
use hangwatch::sources::{DetectorContext, registered};
use tokio_util::sync::CancellationToken;

#[test]
fn registered_only_when_enabled() {
    let mut config = Config::default();
    let config_arc = Arc::new(config.clone());
    let names: Vec<String> = registered()
        .iter()
        .flat_map(|s| s.detectors(&config_arc))
        .map(|d| d.name())
        .collect();
    assert!(names.contains(&"proc_scan".to_string()), "{names:?}");
    config.proc_scan.enabled = false;
    assert!(procscan::detect::detector(&config).is_none());
}

/// Scans run on their own thread: a current-thread runtime keeps waking its timers on time
/// while scans of many tasks run back to back, and shutdown returns at once.
#[test]
fn scans_off_the_async_thread_report_and_stop_promptly() {
    // Thousands of threads make each (debug-build) scan long enough that running it on the
    // async thread would delay the timers below by far more than the bound.
    let helper = support::helper_binary("procscan_block");
    let mut threads = KilledOnDrop(
        Command::new(helper)
            .args(["threads", "8000"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn threads helper"),
    );
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(threads.0.stdout.as_mut().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "0");

    let mut config = Config::default();
    config.proc_scan.interval = Duration::from_millis(1);
    let config = Arc::new(config);
    let detector = procscan::detect::detector(&config).expect("enabled by default");
    let heartbeats = Heartbeats::default();
    let (signals, mut received) = signal::channel();
    let shutdown = CancellationToken::new();
    let ctx = DetectorContext {
        config: config.clone(),
        signals,
        heartbeat: heartbeats.register(detector.name(), detector.heartbeat_budget()),
        shutdown: shutdown.clone(),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let running = tokio::spawn(detector.run(ctx));
        let mut reports = Vec::new();
        let mut worst_lateness = Duration::ZERO;
        let start = Instant::now();
        while reports.len() < 5 {
            assert!(start.elapsed() < Duration::from_secs(60), "too few reports");
            let tick = Instant::now();
            tokio::select! {
                signal = received.recv() => match signal {
                    Some(Signal::Source { source: procscan::NAME, payload }) => {
                        let report: Box<ScanReport> = payload.downcast().expect("a scan report");
                        reports.push(report);
                    }
                    other => panic!("unexpected signal {other:?}"),
                },
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    worst_lateness = worst_lateness.max(tick.elapsed().saturating_sub(Duration::from_millis(5)));
                }
            }
        }
        let longest_scan = reports.iter().map(|r| r.duration_seconds).fold(0.0, f64::max);
        assert!(reports.iter().all(|r| r.tasks_scanned > 8000));
        assert!(
            longest_scan > 0.04,
            "scans too short ({longest_scan} s) to show a blocked runtime"
        );
        // A scan on the async thread would delay a timer by up to a whole scan.
        let bound = Duration::from_millis(100).min(Duration::from_secs_f64(longest_scan / 2.0));
        assert!(
            worst_lateness < bound,
            "timers ran {worst_lateness:?} late during scans of up to {longest_scan} s"
        );
        assert!(heartbeats.stale().is_empty());

        shutdown.cancel();
        let stopped = Instant::now();
        tokio::time::timeout(Duration::from_secs(2), running)
            .await
            .expect("detector stops on shutdown")
            .expect("detector task");
        assert!(stopped.elapsed() < Duration::from_millis(500));
    });
}
