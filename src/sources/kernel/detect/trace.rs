//! The kernel's own stack of a hung task, kept with its report.
//!
//! After `INFO: task <comm>:<pid> blocked for more than <n> seconds.` the kernel prints, as
//! records of their own, a taint line, the `echo 0 > ...` hint, `task:<comm> state:D ...
//! pid:<n> tgid:<n> ppid:<n> ...`, `Call Trace:` and the frames (on x86 between `<TASK>` and
//! `</TASK>`, with the user registers). That is the task's kernel stack, obtained without
//! CAP_SYS_ADMIN. The hung-task event is held back until its trace has arrived — its end marker,
//! a record that is not part of it, a gap in `seq`, a bound, or [`TraceCapture::flush_stale`]
//! on the detector's tick — and then carries it. Nothing is held while no report is open, so a
//! record outside a report costs one branch and no allocation.

use serde::{Deserialize, Serialize};

use super::event::KernelEvent;
use super::record::Record;
use super::rules::HUNG_TASK_RULE;

/// Frames kept per trace, and their total length: a trace is evidence, not a dump.
pub const MAX_TRACE_FRAMES: usize = 40;
pub const MAX_TRACE_BYTES: usize = 3 * 1024;
/// Records consumed for one report before it is released with what it has.
const MAX_REPORT_RECORDS: usize = 128;

/// A hung task's kernel stack as the kernel logged it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallTrace {
    /// `task:dd state:D stack:0 pid:812 tgid:812 ppid:1 ...`, when it came.
    pub task: Option<String>,
    /// Reliable frames, innermost first (`rwsem_down_read_slowpath+0x293/0x570`); the
    /// kernel's unreliable `? ` guesses and the register dump are left out.
    pub frames: Vec<String>,
    /// Frames were dropped at the bounds, or the report was cut by lost records.
    pub truncated: bool,
    /// The kernel's guess at the lock's holder, when it makes one (6.x with
    /// `CONFIG_DETECT_HUNG_TASK_BLOCKER`): `INFO: task stat:16425 <reader> blocked on an
    /// rw-semaphore likely owned by task touch:16407 <writer>`.
    pub blocker: Option<String>,
}

/// Holds at most one hung-task event while its trace arrives.
#[derive(Debug, Default)]
pub struct TraceCapture {
    open: Option<OpenReport>,
}

#[derive(Debug)]
struct OpenReport {
    event: KernelEvent,
    trace: CallTrace,
    phase: Phase,
    last_seq: u64,
    records: usize,
    bytes: usize,
    /// A detector tick has passed since it was opened.
    aged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Taint and hint lines, the `task:` line.
    Header,
    /// After `Call Trace:`.
    Frames,
    /// After the trace's end: the line naming the lock's likely holder may follow.
    Ended,
}

/// What a record is to an open report.
enum Part {
    Header,
    Task,
    TraceStart,
    Frame,
    Blocker,
    /// Inside the trace but not a frame: markers, registers, unreliable frames.
    Filler,
    End,
    Outside,
}

impl TraceCapture {
    /// The one hook, after the rules ran on `record`: feed the open report, then hold back the
    /// hung-task event `record` gave, if any. `events` keeps its order: an event released
    /// here comes before the record's own.
    pub fn intercept(&mut self, record: &Record, events: &mut Vec<KernelEvent>) {
        if self.open.is_none() && events.is_empty() {
            return;
        }
        let released = self.feed(record);
        let held = events
            .iter()
            .position(|e| e.rule == HUNG_TASK_RULE)
            .map(|at| events.remove(at));
        if let Some(released) = released {
            events.insert(0, released);
        }
        if let Some(event) = held {
            self.open = Some(OpenReport::new(event, record.seq));
        }
    }

    /// A record the rules do not see (another facility), which may come between a report's
    /// records: not part of the report, and no gap either.
    pub fn pass(&mut self, record: &Record) {
        if let Some(open) = self.open.as_mut()
            && record.seq == open.last_seq.wrapping_add(1)
        {
            open.last_seq = record.seq;
        }
    }

    /// Release the held event if it was already held at the previous call: its trace, if
    /// any, would have come within microseconds of its report.
    pub fn flush_stale(&mut self) -> Option<KernelEvent> {
        let open = self.open.as_mut()?;
        if !open.aged {
            open.aged = true;
            return None;
        }
        self.flush()
    }

    /// The seq of the held event's record.
    pub fn held_seq(&self) -> Option<u64> {
        self.open.as_ref().map(|open| open.event.seq)
    }

    /// Release the held event now (the end of what `check` reads).
    pub fn flush(&mut self) -> Option<KernelEvent> {
        self.open.take().map(OpenReport::release)
    }

    fn feed(&mut self, record: &Record) -> Option<KernelEvent> {
        let open = self.open.as_mut()?;
        if record.seq != open.last_seq.wrapping_add(1) {
            open.trace.truncated |= open.phase == Phase::Frames;
            return self.flush();
        }
        open.last_seq = record.seq;
        if record.facility != open.event.facility {
            // Someone else's record between the report's (the report's are all the kernel's).
            return None;
        }
        open.records += 1;
        let line = record.message.trim();
        match part_of(line, open.phase) {
            Part::Header => {}
            Part::Task => {
                if open.trace.task.is_some() || !same_pid(line, &open.event) {
                    return self.flush();
                }
                open.trace.task = Some(bounded(line, MAX_TRACE_BYTES));
            }
            Part::TraceStart => open.phase = Phase::Frames,
            Part::Frame => open.push_frame(line),
            Part::Filler => {}
            Part::End => open.phase = Phase::Ended,
            Part::Blocker => {
                open.trace.blocker = Some(bounded(line, MAX_TRACE_BYTES));
                return self.flush();
            }
            Part::Outside => return self.flush(),
        }
        if open.records >= MAX_REPORT_RECORDS {
            open.trace.truncated = true;
            return self.flush();
        }
        None
    }
}

impl OpenReport {
    fn new(event: KernelEvent, seq: u64) -> OpenReport {
        OpenReport {
            event,
            trace: CallTrace::default(),
            phase: Phase::Header,
            last_seq: seq,
            records: 0,
            bytes: 0,
            aged: false,
        }
    }

    fn push_frame(&mut self, frame: &str) {
        if self.trace.frames.len() >= MAX_TRACE_FRAMES || self.bytes + frame.len() > MAX_TRACE_BYTES
        {
            self.trace.truncated = true;
            return;
        }
        self.bytes += frame.len();
        self.trace.frames.push(frame.to_string());
    }

    fn release(self) -> KernelEvent {
        let mut event = self.event;
        if self.trace.task.is_some() || !self.trace.frames.is_empty() {
            event.call_trace = Some(self.trace);
        }
        event
    }
}

fn part_of(line: &str, phase: Phase) -> Part {
    if phase == Phase::Ended {
        let names_holder = line.starts_with("INFO: task ")
            && (line.contains(" likely owned by task ")
                || line.contains(" likely last held by task "));
        return if names_holder {
            Part::Blocker
        } else {
            Part::Outside
        };
    }
    if phase == Phase::Header {
        return if line.starts_with("task:") {
            Part::Task
        } else if line.eq_ignore_ascii_case("call trace:") {
            Part::TraceStart
        } else if line.starts_with("Not tainted")
            || line.starts_with("Tainted:")
            || line.starts_with("\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\"")
            || line.starts_with("Workqueue:")
        {
            Part::Header
        } else {
            Part::Outside
        };
    }
    if line == "</TASK>" {
        Part::End
    } else if line.starts_with('<') && line.ends_with('>') || line.starts_with("? ") {
        Part::Filler
    } else if is_frame(line) {
        Part::Frame
    } else if is_register_line(line) {
        Part::Filler
    } else {
        Part::Outside
    }
}

/// `symbol+0xoff/0xlen`, optionally with a module: `rpc_wait_bit_killable+0x11/0x70 [sunrpc]`.
fn is_frame(line: &str) -> bool {
    let Some((symbol, offset)) = line.split_once('+') else {
        return false;
    };
    !symbol.is_empty()
        && symbol
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        && offset.starts_with("0x")
}

/// `RIP: 0033:0x7f...`, `RAX: ffff...`, `R10: ...`, `Code: ...`: the user registers.
fn is_register_line(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(name, value)| {
        let register = (2..=6).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        register && value.bytes().next().is_some_and(|b| b.is_ascii_hexdigit())
    })
}

/// The `task:` line names the reported task (`pid:<n>`), when both say.
fn same_pid(line: &str, event: &KernelEvent) -> bool {
    let pid = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("pid:"))
        .and_then(|p| p.parse::<u32>().ok());
    match (pid, event.fields.pid) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

fn bounded(text: &str, limit: usize) -> String {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelLogConfig;
    use crate::sources::kernel::detect::pipeline::Pipeline;
    use crate::sources::kernel::detect::record::parse_record;

    /// A 6.18 report as /dev/kmsg gave it on this machine (trimmed registers).
    const REPORT: &[&str] = &[
        "3,500,359354024,-;INFO: task stat:16425 blocked for more than 2 seconds.",
        "3,501,359355607,-;      Not tainted 6.18.44-fc-v1045 #1",
        "3,502,359356635,-;\"echo 0 > /proc/sys/kernel/hung_task_timeout_secs\" disables this message.",
        "6,503,359358453,-;task:stat            state:D stack:0     pid:16425 tgid:16425 ppid:16423  task_flags:0x400000 flags:0x00080001",
        "6,504,359358486,-;Call Trace:",
        "6,505,359358488,-; <TASK>",
        "6,506,359358506,-; __schedule+0x3dc/0xf60",
        "6,507,359358844,-; schedule+0x23/0xa0",
        "6,508,359358850,-; rwsem_down_read_slowpath+0x293/0x570",
        "6,509,359358959,-; ? try_to_unlazy+0x5d/0xe0",
        "6,510,359358989,-; down_read+0x44/0xc0",
        "6,511,359358991,-; walk_component+0xf7/0x190",
        "6,512,359359293,-; RIP: 0033:0x7f62efe5ab3a",
        "6,513,359359297,-; RAX: ffffffffffffffda RBX: 0000000000000900 RCX: 00007f62efe5ab3a",
        "6,514,359359365,-; </TASK>",
    ];

    fn pipeline() -> Pipeline {
        Pipeline::new(&KernelLogConfig::default(), &[]).unwrap()
    }

    fn feed(p: &mut Pipeline, lines: &[&str]) -> Vec<KernelEvent> {
        lines
            .iter()
            .flat_map(|l| p.process(&parse_record(l.as_bytes()).unwrap()))
            .collect()
    }

    #[test]
    fn the_report_waits_for_its_trace_and_carries_it() {
        let mut p = pipeline();
        assert!(
            feed(&mut p, REPORT).is_empty(),
            "held past </TASK> for a blocker line"
        );
        let events = feed(&mut p, &["6,515,359359400,-;eth0: link up"]);
        assert_eq!(events.len(), 1);
        let trace = events[0].call_trace.as_ref().unwrap();
        assert!(
            trace
                .task
                .as_deref()
                .unwrap()
                .contains("pid:16425 tgid:16425")
        );
        assert_eq!(
            trace.frames,
            [
                "__schedule+0x3dc/0xf60",
                "schedule+0x23/0xa0",
                "rwsem_down_read_slowpath+0x293/0x570",
                "down_read+0x44/0xc0",
                "walk_component+0xf7/0x190",
            ]
        );
        assert!(!trace.truncated);
        assert_eq!(trace.blocker, None);
        assert_eq!(events[0].fields.pid, Some(16425));
    }

    #[test]
    fn the_kernels_guess_at_the_holder_ends_the_report() {
        let mut p = pipeline();
        assert!(feed(&mut p, REPORT).is_empty());
        let events = feed(
            &mut p,
            &[
                "3,515,359359372,-;INFO: task stat:16425 <reader> blocked on an rw-semaphore likely owned by task touch:16407 <writer>",
                "6,516,359361719,-;task:touch           state:S stack:0     pid:16407 tgid:16407 ppid:16405",
            ],
        );
        assert_eq!(events.len(), 1);
        let trace = events[0].call_trace.as_ref().unwrap();
        assert!(
            trace
                .blocker
                .as_deref()
                .is_some_and(|b| b.ends_with("likely owned by task touch:16407 <writer>"))
        );
        assert_eq!(
            trace.frames.len(),
            5,
            "the holder's own trace is not mixed in"
        );
    }

    #[test]
    fn an_unrelated_record_or_a_second_report_releases_the_first() {
        let mut p = pipeline();
        let mut lines = REPORT[..8].to_vec();
        lines.push("3,508,359358999,-;INFO: task dd:77 blocked for more than 2 seconds.");
        lines.push("6,509,359359000,-;eth0: link up");
        let events = feed(&mut p, &lines);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].fields.pid, Some(16425));
        assert_eq!(events[0].call_trace.as_ref().unwrap().frames.len(), 2);
        assert_eq!(events[1].fields.pid, Some(77));
        assert_eq!(events[1].call_trace, None, "nothing of a trace came");
    }

    #[test]
    fn a_gap_truncates_and_a_stale_report_is_flushed_on_the_second_tick() {
        let mut p = pipeline();
        assert!(feed(&mut p, &REPORT[..7]).is_empty());
        let events = feed(&mut p, &["6,600,359359000,-; schedule+0x23/0xa0"]);
        assert!(events[0].call_trace.as_ref().unwrap().truncated);

        assert!(feed(&mut p, &REPORT[..3]).is_empty());
        assert_eq!(p.held_seq(), Some(500));
        assert!(p.flush_stale().is_none());
        let released = p.flush_stale().unwrap();
        assert_eq!(released.call_trace, None);
        assert!(p.flush_stale().is_none());
    }

    #[test]
    fn records_of_another_facility_inside_a_report_are_stepped_over() {
        let mut p = pipeline();
        let mut lines = REPORT.to_vec();
        lines.insert(8, "14,508,359358851,-;systemd-journald[1]: user record");
        let renumbered: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (head, rest) = l.split_once(';').unwrap();
                let mut fields: Vec<&str> = head.split(',').collect();
                let seq = (500 + i).to_string();
                fields[1] = &seq;
                format!("{};{rest}", fields.join(","))
            })
            .collect();
        let refs: Vec<&str> = renumbered.iter().map(String::as_str).collect();
        assert!(feed(&mut p, &refs).is_empty());
        let events: Vec<KernelEvent> = p.flush().into_iter().collect();
        assert_eq!(events.len(), 1);
        let trace = events[0].call_trace.as_ref().unwrap();
        assert_eq!(trace.frames.len(), 5);
        assert!(!trace.truncated);
    }

    #[test]
    fn frames_are_bounded() {
        let mut p = pipeline();
        let mut lines: Vec<String> = REPORT[..6].iter().map(|l| l.to_string()).collect();
        for i in 0..100 {
            lines.push(format!("6,{},1,-; frame_{i}+0x1/0x2", 506 + i));
        }
        lines.push("6,606,1,-; </TASK>".into());
        lines.push("6,607,1,-;eth0: link up".into());
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let events = feed(&mut p, &refs);
        let trace = events[0].call_trace.as_ref().unwrap();
        assert_eq!(trace.frames.len(), MAX_TRACE_FRAMES);
        assert!(trace.truncated);
    }

    #[test]
    fn a_task_line_of_another_pid_is_not_taken() {
        let mut p = pipeline();
        let events = feed(
            &mut p,
            &[
                REPORT[0],
                "6,501,1,-;task:other state:D stack:0 pid:9 tgid:9 ppid:1 flags:0x0",
            ],
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].call_trace, None);
    }

    #[test]
    fn lines_that_look_like_frames_or_registers() {
        assert!(is_frame("rpc_wait_bit_killable+0x11/0x70 [sunrpc]"));
        assert!(is_frame("__x64_sys_statx+0x90/0xf0"));
        assert!(!is_frame("eth0: link up"));
        assert!(!is_frame("+0x1"));
        assert!(is_register_line("RIP: 0033:0x7f62efe5ab3a"));
        assert!(is_register_line(
            "R10: 0000000000000fff R11: 0000000000000202"
        ));
        assert!(!is_register_line("EXT4-fs (vda): mounted"));
        assert!(!is_register_line(
            "INFO: task dd:77 blocked for more than 2 seconds."
        ));
    }
}
