//! The kernel log detector: OOM kills (whose victim is `runc:[2:INIT]` wedges the runtime),
//! hung tasks, lockups, RCU stalls, filesystem errors, pids and conntrack limits.
//!
//! `/dev/kmsg` → [`KmsgReader`] (records, exact loss accounting), or syslog(2) polled by
//! [`SyslogReader`] where `/dev/kmsg` may not be opened (same records, new ones told by
//! timestamp) → [`Pipeline`] (facility filter → one `RegexSet` pass over the rules → OOM
//! correlator → classification) → [`KernelEvent`]s, sent as
//! [`KernelSignal::Event`] by [`KernelLogDetector`]; [`check`] does
//! the same once, synchronously, over a look-back window.

mod conditions;
mod correlate;
mod detector;
mod event;
mod pipeline;
mod position;
mod reader;
mod record;
mod rules;
mod source;
mod syslog;
mod trace;

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;

pub use conditions::{ActiveCondition, KernelConditions};
pub use detector::{HEARTBEAT_BUDGET, KernelLogDetector};
pub use event::{
    EventFields, HungTaskScope, KernelEvent, KernelLogCounters, OomConstraint, OomInfo, OomVictim,
    RUNC_INIT_COMM, classify_hung_task, classify_oom_victim, is_runtime_comm, kernel_time_to_wall,
    owner_of_path,
};
pub use pipeline::Pipeline;
pub use position::{BOOT_ID_PATH, POSITION_FILE, Position, SavedPosition};
pub use reader::{KmsgRead, KmsgReader, RECORD_BUFFER_SIZE, ReaderError, StartPosition};
pub use record::{FACILITY_KERN, Record, RecordError, parse_record};
pub use rules::{DEFAULT_RULES_YAML, HUNG_TASK_RULE, OOM_KILL_RULE, RuleError, default_rules};
pub use source::{LogSource, falls_back_to_syslog};
pub use syslog::{
    SyslogEntry, SyslogLine, SyslogReader, TimestampMark, parse_syslog_text, select_new,
};
pub use trace::{CallTrace, MAX_TRACE_BYTES, MAX_TRACE_FRAMES};

use crate::config::Config;
use crate::signal::Signal;
use crate::sources::detector::Detector;

/// What the kernel log detector tells the kernel source's state.
#[derive(Debug)]
pub enum KernelSignal {
    /// A record matched a rule; `at`: when the kernel logged it, on the wall clock.
    Event {
        event: Box<KernelEvent>,
        at: SystemTime,
    },
    /// Counter increments since the previous one of these (at most one per second).
    Counters(KernelLogCounters),
    /// The kernel log is open and being read, through `source`.
    Up { path: PathBuf, source: LogSource },
    /// The kernel log cannot be read. `retry_in`: when the next attempt is made; None when
    /// none will be (the rules do not compile).
    Down {
        path: PathBuf,
        error: String,
        retry_in: Option<Duration>,
    },
}

impl From<KernelSignal> for Signal {
    fn from(signal: KernelSignal) -> Signal {
        Signal::source(crate::sources::kernel::NAME, signal)
    }
}

/// The detector, unless `kernel_log.enabled` is off.
pub fn detector(config: &Config) -> Option<Box<dyn Detector>> {
    config
        .kernel_log
        .enabled
        .then(|| Box::new(KernelLogDetector::default()) as Box<dyn Detector>)
}

/// Longest time [`check`] keeps reading when records keep arriving.
const CHECK_READ_BUDGET: Duration = Duration::from_secs(5);

/// What [`check`] found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub events: Vec<KernelEvent>,
    pub counters: KernelLogCounters,
    /// The interface read.
    pub source: LogSource,
}

#[derive(Debug, Error)]
pub enum CheckError {
    #[error(transparent)]
    Rules(#[from] RuleError),
    #[error(transparent)]
    Reader(#[from] ReaderError),
}

/// For `hangwatch check`: the events among the records logged within
/// `kernel_log.check_lookback`, read synchronously without waiting for new ones.
pub fn check(config: &Config) -> Result<CheckReport, CheckError> {
    let kernel = &config.kernel_log;
    let mut pipeline = Pipeline::new(kernel, &config.containerd.namespaces)?;
    let mut log = source::open(kernel, StartPosition::LookBack(kernel.check_lookback))?.log;
    let give_up = Instant::now() + CHECK_READ_BUDGET;
    let mut events = Vec::new();
    while Instant::now() < give_up {
        match log.read_next()? {
            KmsgRead::Drained => break,
            KmsgRead::Skipped | KmsgRead::Malformed(_) => {}
            KmsgRead::Record(record) => events.extend(pipeline.process(&record)),
        }
    }
    events.extend(pipeline.flush());
    for event in &mut events {
        if let Some(pid) = Pipeline::hung_task_pid(event) {
            let text = read_proc_cgroup_blocking(config, pid);
            pipeline.attribute_hung_task(event, text.as_deref());
        }
    }
    let mut counters = log.take_counters();
    counters += pipeline.take_counters();
    Ok(CheckReport {
        events,
        counters,
        source: log.source(),
    })
}

/// `/proc/<pid>/cgroup` within `proc_scan.read_deadline`: the read takes the cgroup mutex,
/// which a hung task may hold. A read that overruns is left behind on its own thread.
fn read_proc_cgroup_blocking(config: &Config, pid: u32) -> Option<String> {
    let path = config
        .proc_scan
        .proc_root
        .join(pid.to_string())
        .join("cgroup");
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("hangwatch-proc-cgroup".into())
        .spawn(move || {
            let _ = tx.send(std::fs::read_to_string(path));
        })
        .ok()?;
    rx.recv_timeout(config.proc_scan.read_deadline).ok()?.ok()
}
