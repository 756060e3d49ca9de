//! The kernel log detector: reads `/dev/kmsg` as records arrive (or polls syslog(2) where
//! `/dev/kmsg` may not be opened), turns them into events and counter deltas, retries with
//! backoff when the log cannot be read, and keeps its position across restarts.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::MissedTickBehavior;

use super::KernelSignal;
use super::event::{KernelEvent, KernelLogCounters};
use super::pipeline::Pipeline;
use super::position::{BOOT_ID_PATH, Position, PositionStore};
use super::reader::{KmsgRead, KmsgReader, ReaderError, StartPosition};
use super::record::RecordError;
use super::source::{self, LogSource, OpenLog};
use super::syslog::SyslogReader;
use crate::config::{Config, KernelLogConfig};
use crate::signal::Signal;
use crate::sources::detector::{Detector, DetectorContext, DetectorFuture};

/// Beat, flush counter deltas and save the position this often.
const TICK: Duration = Duration::from_secs(1);
/// Longest silence of a healthy loop: a few ticks.
pub const HEARTBEAT_BUDGET: Duration = Duration::from_secs(5);
/// Records handled before going back to the timer and the shutdown check.
const BATCH: usize = 256;
/// After reading records, wait this long before reading again: a flood is then read in
/// batches (at 8k records/s, 200 per wake-up, under [`BATCH`]) instead of one wake-up per
/// record, and each wake-up (with cold caches on a busy node) costs more than the records it
/// reads. Meanwhile the descriptor is off the reactor, or every record would wake us anyway.
/// The kernel's ring holds more than twice that (128 KiB: ~500 OOM-kill records, 60 ms at
/// 8k/s). A record after a quiet spell is read at once.
const READ_PAUSE: Duration = Duration::from_millis(25);
/// How long the last counter increments may wait for room in the channel at shutdown.
const FINAL_SEND_DEADLINE: Duration = Duration::from_millis(200);
/// At most one log line per kind of trouble per this long.
const LOG_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct KernelLogDetector {
    boot_id_path: PathBuf,
}

impl Default for KernelLogDetector {
    fn default() -> Self {
        KernelLogDetector {
            boot_id_path: PathBuf::from(BOOT_ID_PATH),
        }
    }
}

impl KernelLogDetector {
    /// Read the boot id from elsewhere (tests simulate a reboot with it).
    pub fn with_boot_id_path(path: impl Into<PathBuf>) -> KernelLogDetector {
        KernelLogDetector {
            boot_id_path: path.into(),
        }
    }
}

impl Detector for KernelLogDetector {
    fn name(&self) -> String {
        "kernel_log".into()
    }

    fn heartbeat_budget(&self) -> Duration {
        HEARTBEAT_BUDGET
    }

    fn run(self: Box<Self>, ctx: DetectorContext) -> DetectorFuture {
        Box::pin(run(ctx, self.boot_id_path))
    }
}

/// Allows one log line per [`LOG_INTERVAL`] and counts the ones held back.
#[derive(Debug, Default)]
struct LogLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Some(number held back since the last line) when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|at| at.elapsed() < LOG_INTERVAL) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Why reading stopped.
enum Stop {
    /// Shutdown, or the engine is gone.
    Finished,
    Failed(ReaderError),
}

struct Run {
    ctx: DetectorContext,
    path: PathBuf,
    pipeline: Pipeline,
    store: PositionStore,
    /// How far reading got, across reopenings.
    position: Option<Position>,
    /// The fall back to syslog(2) has been explained at warn once.
    fallback_explained: bool,
    pending: KernelLogCounters,
    malformed_log: LogLimiter,
    lost_log: LogLimiter,
    proc_cgroup: ProcCgroupReader,
}

async fn run(ctx: DetectorContext, boot_id_path: PathBuf) {
    let config = Arc::clone(&ctx.config);
    let kernel = &config.kernel_log;
    let pipeline = match Pipeline::new(kernel, &config.containerd.namespaces) {
        Ok(pipeline) => pipeline,
        Err(e) => {
            tracing::error!(error = %e, "kernel log rules do not compile: kernel log not watched");
            let signal = KernelSignal::Down {
                path: kernel.path.clone(),
                error: e.to_string(),
                retry_in: None,
            };
            if send(&ctx, signal).await {
                idle_until_shutdown(&ctx).await;
            }
            return;
        }
    };
    let mut store = PositionStore::open(&config.state_dir, &boot_id_path).await;
    let first_start = store.start_position().await;
    let mut run = Run {
        path: kernel.path.clone(),
        pipeline,
        store,
        position: None,
        fallback_explained: false,
        pending: KernelLogCounters::default(),
        malformed_log: LogLimiter::default(),
        lost_log: LogLimiter::default(),
        proc_cgroup: ProcCgroupReader::new(&config),
        ctx,
    };
    let mut backoff = kernel.retry_initial;
    loop {
        let start = run
            .position
            .as_ref()
            .map_or_else(|| first_start.clone(), Position::resume);
        let stop = match open_watched(kernel, start.clone()).await {
            Ok((watched, kmsg_refused)) => {
                backoff = kernel.retry_initial;
                let source = watched.source();
                run.explain_source(source, kmsg_refused.as_ref(), &start);
                let up = KernelSignal::Up {
                    path: run.path.clone(),
                    source,
                };
                if !send(&run.ctx, up).await {
                    Stop::Finished
                } else {
                    match watched {
                        Watched::Kmsg(reader) => run.pump_kmsg(reader).await,
                        Watched::Syslog(reader) => {
                            run.pump_syslog(reader, kernel.syslog_poll_interval).await
                        }
                    }
                }
            }
            Err(e) => Stop::Failed(e),
        };
        let Stop::Failed(error) = stop else { break };
        tracing::warn!(
            path = %run.path.display(),
            errno = ?error.errno(),
            error = %error,
            retry_in = ?backoff,
            "kernel log cannot be read; retrying"
        );
        let down = KernelSignal::Down {
            path: run.path.clone(),
            error: error.to_string(),
            retry_in: Some(backoff),
        };
        if !send(&run.ctx, down).await || !run.wait(backoff).await {
            break;
        }
        backoff = (backoff * 2).min(kernel.retry_max);
    }
    run.flush_final_counters().await;
    run.store.save_now(run.saved_position().as_ref()).await;
}

/// An open kernel log, ready to be read from the async threads.
enum Watched {
    /// Registered for readiness: records are read as they arrive.
    Kmsg(AsyncFd<KmsgReader>),
    /// Cannot be waited on: polled.
    Syslog(SyslogReader),
}

impl Watched {
    fn source(&self) -> LogSource {
        match self {
            Watched::Kmsg(_) => LogSource::Kmsg,
            Watched::Syslog(_) => LogSource::Syslog,
        }
    }
}

/// Open off the async threads (starting at the end scans the whole kernel buffer once), then
/// register `/dev/kmsg` for readiness. Also returns why `auto` did not read `/dev/kmsg`.
async fn open_watched(
    kernel: &KernelLogConfig,
    start: StartPosition,
) -> Result<(Watched, Option<ReaderError>), ReaderError> {
    let config = kernel.clone();
    let opened = tokio::task::spawn_blocking(move || source::open(&config, start))
        .await
        .map_err(|join| ReaderError::Watch {
            path: kernel.path.clone(),
            source: io::Error::other(join),
        })??;
    let watched = match opened.log {
        OpenLog::Syslog(reader) => Watched::Syslog(reader),
        OpenLog::Kmsg(reader) => {
            Watched::Kmsg(register(reader).map_err(|source| ReaderError::Watch {
                path: kernel.path.clone(),
                source,
            })?)
        }
    };
    Ok((watched, opened.kmsg_refused))
}

/// Register `/dev/kmsg` with the reactor for readiness. A record already waiting makes it
/// ready at once (the kernel polls the file when it is added to the epoll set).
fn register(reader: KmsgReader) -> io::Result<AsyncFd<KmsgReader>> {
    // SAFETY: the reader owns its descriptor, never replaces or closes it while it lives,
    // and `as_raw_fd` always returns that one.
    unsafe { AsyncFd::register_with_interest(reader, Interest::READABLE) }
        .map_err(|failed| failed.into_parts().1)
}

/// Deliver a signal unless shutdown comes first; false when it did or the engine is gone.
async fn send(ctx: &DetectorContext, signal: KernelSignal) -> bool {
    tokio::select! {
        biased;
        _ = ctx.shutdown.cancelled() => false,
        delivered = ctx.signals.send(signal.into()) => delivered,
    }
}

async fn idle_until_shutdown(ctx: &DetectorContext) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            _ = tick.tick() => ctx.heartbeat.beat(),
        }
    }
}

impl Run {
    /// Say which source is read; why not `/dev/kmsg` at warn the first time only, since every
    /// reopening after a failure decides the same way.
    fn explain_source(
        &mut self,
        source: LogSource,
        kmsg_refused: Option<&ReaderError>,
        start: &StartPosition,
    ) {
        match kmsg_refused {
            Some(refused) if !self.fallback_explained => {
                self.fallback_explained = true;
                tracing::warn!(
                    source = source.label(),
                    kmsg_error = %refused,
                    ?start,
                    "/dev/kmsg may not be opened: reading the kernel log through syslog(2)"
                );
            }
            _ => tracing::info!(
                source = source.label(),
                path = %self.path.display(),
                ?start,
                "reading the kernel log"
            ),
        }
    }

    /// Read `/dev/kmsg` as records arrive, until shutdown or a read error.
    ///
    /// Registered with the reactor only while the log is quiet. Once records come, the
    /// descriptor is taken off it and read every [`READ_PAUSE`] until a read finds nothing:
    /// the kernel wakes a waiting reader for every record it logs, so staying registered
    /// would wake the thread for each record of a flood during the very pauses meant to
    /// batch them.
    async fn pump_kmsg(&mut self, mut watched: AsyncFd<KmsgReader>) -> Stop {
        if let Some(seq) = watched.get_ref().last_seq() {
            self.position = Some(Position::Seq(seq));
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Stop::Finished,
                _ = tick.tick() => {
                    if !self.on_tick().await {
                        return Stop::Finished;
                    }
                    continue;
                }
                ready = watched.readable() => {
                    if let Err(source) = ready {
                        return Stop::Failed(ReaderError::Watch { path: self.path.clone(), source });
                    }
                }
            }
            let mut reader = watched.into_inner();
            if let Some(stop) = self.read_while_records_come(&mut reader, &mut tick).await {
                return stop;
            }
            watched = match register(reader) {
                Ok(watched) => watched,
                Err(source) => {
                    return Stop::Failed(ReaderError::Watch {
                        path: self.path.clone(),
                        source,
                    });
                }
            };
        }
    }

    /// Read what is there, pause, read again, until a read finds nothing (None) or reading
    /// must stop. The ticks go on meanwhile.
    async fn read_while_records_come(
        &mut self,
        reader: &mut KmsgReader,
        tick: &mut tokio::time::Interval,
    ) -> Option<Stop> {
        loop {
            let records = match self.read_batch(reader).await {
                Ok(0) => return None,
                Ok(records) => records,
                Err(stop) => return Some(stop),
            };
            // A full batch: more is waiting, read on after the timer and the shutdown check.
            let pause = if records < BATCH {
                READ_PAUSE
            } else {
                Duration::ZERO
            };
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Some(Stop::Finished),
                _ = tick.tick() => {
                    if !self.on_tick().await {
                        return Some(Stop::Finished);
                    }
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Up to [`BATCH`] records, until the log is drained; how many were read.
    async fn read_batch(&mut self, reader: &mut KmsgReader) -> Result<usize, Stop> {
        let mut records = 0;
        while records < BATCH {
            let read = reader.read_next();
            if let Some(seq) = reader.last_seq() {
                self.position = Some(Position::Seq(seq));
            }
            match read {
                Ok(KmsgRead::Drained) => break,
                Ok(read) => {
                    records += 1;
                    if !self.handle(read).await {
                        return Err(Stop::Finished);
                    }
                }
                Err(error) => {
                    self.collect_counters(reader.take_counters());
                    return Err(Stop::Failed(error));
                }
            }
        }
        self.collect_counters(reader.take_counters());
        self.ctx.heartbeat.beat();
        Ok(records)
    }

    /// Poll syslog(2) every `poll_interval`, until shutdown or a read error.
    async fn pump_syslog(&mut self, mut reader: SyslogReader, poll_interval: Duration) -> Stop {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // What opening or the last poll queued (a 1 MiB copy and parse: fine inline).
            loop {
                match reader.read_next() {
                    KmsgRead::Drained => break,
                    read => {
                        if !self.handle(read).await {
                            return Stop::Finished;
                        }
                    }
                }
            }
            // Only once its records are handled, so a restart never skips them.
            if let Some(mark) = reader.mark() {
                self.position = Some(Position::Timestamp(mark.clone()));
            }
            self.collect_counters(reader.take_counters());
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Stop::Finished,
                _ = tick.tick() => {
                    if !self.on_tick().await {
                        return Stop::Finished;
                    }
                }
                _ = poll.tick() => {
                    if let Err(error) = reader.poll() {
                        self.collect_counters(reader.take_counters());
                        return Stop::Failed(error);
                    }
                }
            }
        }
    }

    /// Turn one read into events; false when shutdown came first or the engine is gone.
    async fn handle(&mut self, read: KmsgRead) -> bool {
        match read {
            KmsgRead::Drained | KmsgRead::Skipped => {}
            KmsgRead::Malformed(error) => self.log_malformed(&error),
            KmsgRead::Record(record) => {
                for event in self.pipeline.process(&record) {
                    if !self.deliver(event).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Wait out a backoff, beating meanwhile; false at shutdown.
    async fn wait(&mut self, backoff: Duration) -> bool {
        let until = tokio::time::Instant::now() + backoff;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(until) => return true,
                _ = tick.tick() => {
                    self.ctx.heartbeat.beat();
                    if !self.flush_counters().await {
                        return false;
                    }
                }
            }
        }
    }

    fn collect_counters(&mut self, read: KernelLogCounters) {
        if read.lost > 0
            && let Some(suppressed) = self.lost_log.allow()
        {
            tracing::warn!(
                path = %self.path.display(),
                lost = read.lost,
                earlier_reports_suppressed = suppressed,
                "kernel log records were overwritten before they could be read"
            );
        }
        self.pending += read;
        self.pending += self.pipeline.take_counters();
    }

    /// The position to save: never past a hung-task report held for its call trace, so a
    /// restart reads it again rather than losing it.
    fn saved_position(&self) -> Option<Position> {
        match (&self.position, self.pipeline.held_seq()) {
            (Some(Position::Seq(seq)), Some(held)) => {
                Some(Position::Seq((*seq).min(held.saturating_sub(1))))
            }
            (position, _) => position.clone(),
        }
    }

    /// Every [`TICK`] while reading: beat, hand over counters, save the position (throttled).
    /// False when the engine is gone.
    async fn on_tick(&mut self) -> bool {
        self.ctx.heartbeat.beat();
        if let Some(event) = self.pipeline.flush_stale()
            && !self.deliver(event).await
        {
            return false;
        }
        if !self.flush_counters().await {
            return false;
        }
        self.store
            .save_throttled(self.saved_position().as_ref())
            .await;
        true
    }

    /// Send the counter increments gathered since the last flush; false when the engine is gone.
    async fn flush_counters(&mut self) -> bool {
        if self.pending.is_zero() {
            return true;
        }
        let delta = self.pending.take();
        send(&self.ctx, KernelSignal::Counters(delta)).await
    }

    /// At shutdown: hand over the last increments if the engine still takes them at once.
    async fn flush_final_counters(&mut self) {
        if self.pending.is_zero() {
            return;
        }
        let last = Signal::from(KernelSignal::Counters(self.pending.take()));
        let _ = tokio::time::timeout(FINAL_SEND_DEADLINE, self.ctx.signals.send(last)).await;
    }

    fn log_malformed(&mut self, error: &RecordError) {
        if let Some(suppressed) = self.malformed_log.allow() {
            tracing::warn!(
                path = %self.path.display(),
                error = %error,
                earlier_reports_suppressed = suppressed,
                "malformed kernel log record skipped"
            );
        }
    }

    async fn deliver(&mut self, mut event: KernelEvent) -> bool {
        if let Some(pid) = Pipeline::hung_task_pid(&event) {
            let text = self.proc_cgroup.read(pid).await;
            self.pipeline
                .attribute_hung_task(&mut event, text.as_deref());
        }
        tracing::debug!(
            rule = %event.rule,
            seq = event.seq,
            message = %event.message,
            "kernel event"
        );
        let at = super::kernel_time_to_wall(event.ts_usec);
        let event = Box::new(event);
        send(&self.ctx, KernelSignal::Event { event, at }).await
    }
}

/// Reads `/proc/<pid>/cgroup`, which takes the cgroup mutex, so it can block behind the very
/// hang being reported: each read has a deadline, and while one is stuck no other is started.
struct ProcCgroupReader {
    proc_root: PathBuf,
    deadline: Duration,
    in_flight: Arc<AtomicUsize>,
}

impl ProcCgroupReader {
    fn new(config: &Config) -> ProcCgroupReader {
        ProcCgroupReader {
            proc_root: config.proc_scan.proc_root.clone(),
            deadline: config.proc_scan.read_deadline,
            in_flight: Arc::default(),
        }
    }

    async fn read(&self, pid: u32) -> Option<String> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        let in_flight = Arc::clone(&self.in_flight);
        in_flight.fetch_add(1, Ordering::AcqRel);
        let work = tokio::task::spawn_blocking(move || {
            let text = std::fs::read_to_string(path);
            in_flight.fetch_sub(1, Ordering::AcqRel);
            text
        });
        match tokio::time::timeout(self.deadline, work).await {
            Ok(Ok(Ok(text))) => Some(text),
            Ok(_) => None,
            Err(_) => {
                tracing::warn!(pid, deadline = ?self.deadline, "reading /proc/<pid>/cgroup of a hung task timed out");
                None
            }
        }
    }
}
