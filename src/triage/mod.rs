//! Triage of Go goroutine dumps from dockerd, containerd and containerd shims.
//!
//! When a runtime hangs, hangwatch makes the daemons dump their goroutines (SIGUSR1). A dump
//! of a wedged dockerd holds hundreds of goroutines; this module reduces it to what a human
//! needs in seconds: which daemon, how many goroutines are blocked, on what (a lock, containerd,
//! a shim, runc), where in the daemon, and for how long.
//!
//! ```no_run
//! use hangwatch::triage::{analyze_file, TriageLimits};
//! let triage = analyze_file("/var/run/docker/goroutine-stacks-2026-11-23T000848Z.log".as_ref(),
//!                           &TriageLimits::default())?;
//! println!("{}", triage.summary());      // one line, for incident records
//! print!("{}", triage.render_text());    // a few lines for a human
//! let json = serde_json::to_string(&triage)?;  // everything, for machines
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Pipeline: `lines` splits the input into logical lines (unescaping a dump embedded in a
//! containerd log line), `parse` recognises goroutines, `bucket` groups identical stacks and
//! classifies each group once (`classify`), `report` ranks the groups and writes the
//! verdict. Input is read in chunks through `BufRead`; memory is bounded by [`TriageLimits`],
//! never by the size of the input.

mod bucket;
mod classify;
mod lines;
mod parse;
mod report;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use classify::{WaitKind, short_function};

use bucket::Aggregator;
use lines::{Event, LineSplitter};
use parse::{DumpParser, GoroutineSink};

/// Bounds on memory and output size. Peak memory is roughly
/// `max_buckets × max_frames_per_stack × 2 × max_symbol_len` in the worst case (every stack
/// distinct and every name long), plus one line of `max_line_len`; real dumps need far less.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriageLimits {
    /// Longer lines are cut (and counted in `truncated_lines`).
    pub max_line_len: usize,
    /// Distinct stacks kept; goroutines of further stacks are counted in `overflow`.
    pub max_buckets: usize,
    /// Frames kept per stack (all frames still decide which stacks are identical).
    pub max_frames_per_stack: usize,
    /// Function names and file locations are kept up to this many bytes.
    pub max_symbol_len: usize,
    /// Goroutine ids kept per bucket as examples.
    pub max_example_ids: usize,
    /// Dumps (one per `=== BEGIN goroutine stack dump ===` in a log) listed in `dumps`.
    pub max_dumps: usize,
}

impl Default for TriageLimits {
    fn default() -> Self {
        Self {
            max_line_len: 8 * 1024,
            max_buckets: 1000,
            max_frames_per_stack: 32,
            max_symbol_len: 512,
            max_example_ids: 5,
            max_dumps: 64,
        }
    }
}

/// Which program wrote a dump, guessed from its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Daemon {
    Dockerd,
    Containerd,
    Shim,
    /// Several dumps of different daemons (or frames of several in one dump).
    Mixed,
    Unknown,
}

impl Daemon {
    pub fn name(self) -> &'static str {
        match self {
            Self::Dockerd => "dockerd",
            Self::Containerd => "containerd",
            Self::Shim => "shim",
            Self::Mixed => "mixed",
            Self::Unknown => "unknown daemon",
        }
    }
}

/// The result of triaging one input (a dump file, or a log holding one or more dumps).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Triage {
    pub daemon: Daemon,
    /// The one-line verdict (also returned by [`Triage::summary`]).
    pub summary: String,
    pub goroutines: u64,
    /// Goroutines whose wait kind [`WaitKind::is_blocked`].
    pub blocked_goroutines: u64,
    pub by_kind: BTreeMap<WaitKind, u64>,
    /// The dumps found, in input order (at most `max_dumps`; `dumps_total` counts all).
    pub dumps: Vec<DumpInfo>,
    pub dumps_total: u64,
    /// Groups of identical stacks: blocked ones first, most goroutines first.
    pub buckets: Vec<Bucket>,
    pub ranking: Ranking,
    pub overflow: Overflow,
    pub input: InputStats,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DumpInfo {
    pub daemon: Daemon,
    pub goroutines: u64,
}

/// Goroutines with identical stacks (state, functions and locations, creator), whatever their
/// argument values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Position in [`Triage::buckets`]; rankings and lock holders refer to it.
    pub id: usize,
    pub kind: WaitKind,
    pub state: String,
    /// Daemon function where the wait is decided (caller of `Lock`, maker of the RPC, ...).
    pub site: Option<String>,
    /// What is waited for: `sync.Mutex`, `leases.Create (grpc)`, `go-runc.(*Runc).Start`, ...
    pub detail: Option<String>,
    pub count: u64,
    pub wait_minutes: WaitRange,
    pub locked_to_thread: u64,
    pub example_ids: Vec<u64>,
    /// The daemons whose dumps contained this stack.
    pub daemons: Vec<Daemon>,
    /// The first frames, innermost first.
    pub frames: Vec<Frame>,
    /// Frames in the stack, kept or not.
    pub frames_total: u32,
    /// The runtime elided frames of a very deep stack.
    pub elided: bool,
    /// Index in `frames` of the most telling frame (a short listing starts there).
    pub anchor: usize,
    pub created_by: Option<String>,
    /// For lock waits: blocked buckets whose stacks pass through the function that waits for
    /// the lock — the likely holders.
    pub possible_lock_holders: Vec<usize>,
}

/// Minutes a goroutine has been waiting, as the runtime prints them (0: under a minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WaitRange {
    pub min: u64,
    pub max: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Frame {
    pub function: String,
    pub location: String,
}

/// Blocked buckets, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ranking {
    /// Most goroutines first (ties: longest wait).
    pub by_count: Vec<usize>,
    /// Longest wait first (ties: most goroutines).
    pub by_wait: Vec<usize>,
}

/// Goroutines whose stacks arrived after `max_buckets` distinct stacks were already kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Overflow {
    pub goroutines: u64,
    pub by_kind: BTreeMap<WaitKind, u64>,
    pub max_wait_minutes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InputStats {
    pub bytes: u64,
    pub lines: u64,
    /// Lines inside a goroutine that fit no rule of the format.
    pub malformed_lines: u64,
    /// Lines outside goroutines (other log lines, crash headers).
    pub other_lines: u64,
    /// Lines longer than `max_line_len`, cut.
    pub truncated_lines: u64,
    /// Goroutines cut short by the end of the input (still counted).
    pub truncated_goroutines: u64,
    /// Dumps found escaped inside log lines.
    pub embedded_dumps: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TriageError {
    #[error("cannot open goroutine dump {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read goroutine dump {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// Triage a dump (or a log holding dumps) read from `input`, in chunks.
pub fn analyze<R: BufRead>(mut input: R, limits: &TriageLimits) -> io::Result<Triage> {
    let mut splitter = LineSplitter::new(limits.max_line_len);
    let mut parser = DumpParser::new(limits.max_frames_per_stack, limits.max_symbol_len);
    let mut aggregator = Aggregator::new(limits);
    let mut deliver = |event: Event<'_>| match event {
        Event::Line { text, truncated } => parser.line(text, truncated, &mut aggregator),
        Event::EmbeddedStart => parser.boundary(&mut aggregator, GoroutineSink::dump_start),
        Event::EmbeddedEnd => parser.boundary(&mut aggregator, GoroutineSink::dump_end),
    };
    loop {
        let chunk = match input.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        let len = chunk.len();
        splitter.feed(chunk, &mut deliver);
        input.consume(len);
    }
    splitter.finish(&mut deliver);
    let line_stats = splitter.stats();
    parser.finish_input(line_stats.ended_mid_line, &mut aggregator);
    let parse_stats = parser.stats();
    let input = InputStats {
        bytes: line_stats.bytes,
        lines: line_stats.lines,
        malformed_lines: parse_stats.malformed_lines,
        other_lines: parse_stats.other_lines,
        truncated_lines: line_stats.truncated_lines,
        truncated_goroutines: parse_stats.truncated_goroutines,
        embedded_dumps: line_stats.embedded_dumps,
    };
    Ok(report::finish(aggregator.finish(), input))
}

/// Triage the dump at `path`; errors name the path.
pub fn analyze_file(path: &Path, limits: &TriageLimits) -> Result<Triage, TriageError> {
    let file = File::open(path).map_err(|source| TriageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    analyze(BufReader::with_capacity(64 * 1024, file), limits).map_err(|source| TriageError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Triage {
    /// One line for incident records, e.g. `dockerd: 57 goroutines blocked calling containerd
    /// (grpc) for up to 5 min; 12 waiting on sync.Mutex in daemon.(*Daemon).ContainerStop`.
    pub fn summary(&self) -> String {
        self.summary.clone()
    }

    /// A short report for a human: the verdict, then the top blocked groups with their most
    /// telling frames.
    pub fn render_text(&self) -> String {
        report::render_text(self)
    }
}
