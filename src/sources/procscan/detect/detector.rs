//! The scanner as a detector: a dedicated thread scans every `proc_scan.interval`; the async
//! side forwards each report (a `Box<ScanReport>` payload) and beats the heartbeat.
//!
//! A dedicated thread rather than `spawn_blocking`: the async runtime never waits for a scan
//! (not even at shutdown, which would otherwise wait for a scan in progress to finish).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc as async_mpsc;

use super::{MAX_ABANDONED_READERS, ProcScanner, ScanReport};
use crate::config::Config;
use crate::signal::Signal;
use crate::sources::detector::{Detector, DetectorContext, DetectorFuture};

/// Allowance for the walk itself in the heartbeat budget: seconds even at 50k tasks on a slow
/// node, so a scan that takes longer is itself a finding.
const WALK_ALLOWANCE: Duration = Duration::from_secs(30);

/// The detector, when enabled in `config`.
pub fn detector(config: &Config) -> Option<Box<dyn Detector>> {
    config
        .proc_scan
        .enabled
        .then(|| Box::new(ProcScanDetector::new(config)) as Box<dyn Detector>)
}

pub struct ProcScanDetector {
    budget: Duration,
}

impl ProcScanDetector {
    pub fn new(config: &Config) -> ProcScanDetector {
        // Longest healthy gap between two reports: one interval plus the longest scan.
        let reads = config
            .proc_scan
            .read_deadline
            .saturating_mul(MAX_ABANDONED_READERS as u32);
        ProcScanDetector {
            budget: config
                .proc_scan
                .interval
                .saturating_add(reads)
                .saturating_add(WALK_ALLOWANCE),
        }
    }
}

impl Detector for ProcScanDetector {
    fn name(&self) -> String {
        "proc_scan".into()
    }

    fn heartbeat_budget(&self) -> Duration {
        self.budget
    }

    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture {
        Box::pin(run(ctx))
    }
}

async fn run(ctx: DetectorContext) {
    let (report_tx, mut reports) = async_mpsc::channel::<ScanReport>(1);
    let (stop, stopped) = mpsc::channel::<()>();
    let scanner = ProcScanner::new(&ctx.config);
    let interval = ctx.config.proc_scan.interval;
    let spawned = std::thread::Builder::new()
        .name("hangwatch-procscan".into())
        .spawn(move || scan_loop(scanner, interval, &report_tx, &stopped));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the proc scan thread");
        return;
    }
    loop {
        let report = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            report = reports.recv() => report,
        };
        let Some(report) = report else {
            tracing::error!("the proc scan thread stopped");
            break;
        };
        ctx.heartbeat.beat();
        if report.errors.total() > 0 {
            tracing::debug!(errors = ?report.errors, "proc scan had errors");
        }
        let delivered = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            delivered = ctx.signals.send(Signal::source(crate::sources::procscan::NAME, Box::new(report))) => delivered,
        };
        if !delivered {
            break;
        }
    }
    // Wakes the scan thread if it is waiting; a scan in progress finishes and then sees the
    // closed channel.
    drop(stop);
}

fn scan_loop(
    mut scanner: ProcScanner,
    interval: Duration,
    reports: &async_mpsc::Sender<ScanReport>,
    stopped: &mpsc::Receiver<()>,
) {
    loop {
        let started = Instant::now();
        if reports.blocking_send(scanner.scan()).is_err() {
            return;
        }
        match stopped.recv_timeout(interval.saturating_sub(started.elapsed())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
