//! The kernel log through syslog(2) (`klogctl`), for when `/dev/kmsg` may not be opened: an
//! unprivileged container's device cgroup refuses the device, while
//! `SYSLOG_ACTION_READ_ALL` only needs CAP_SYSLOG (not even that with
//! `kernel.dmesg_restrict=0`).
//!
//! READ_ALL copies the newest records as text, `<pri>[seconds.micros] message\n` (no
//! timestamp without printk.time), without sequence numbers and without waiting for new
//! ones. So it is polled, and what is new is told from timestamps: records newer than the
//! newest one seen, and at that same timestamp those not seen yet (by a hash of their line).

use std::collections::{HashMap, VecDeque};

use nix::errno::Errno;
use xxhash_rust::xxh3::xxh3_64;

use super::event::KernelLogCounters;
use super::reader::{KmsgRead, ReaderError, StartPosition, monotonic_now_usec};
use super::record::{Record, RecordError, number};

const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;

/// Used when the kernel reports no buffer size (the default `log_buf_len` is 128 KiB).
const FALLBACK_BUFFER_SIZE: usize = 128 * 1024;

/// The size of the kernel's log buffer.
fn kernel_buffer_size() -> Result<usize, Errno> {
    // SAFETY: SIZE_BUFFER neither reads nor writes a buffer; it returns the size.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(Errno::last());
    }
    Ok(usize::try_from(size).unwrap_or(0))
}

/// Copy the newest records that fit into `buffer`, without consuming them; the length copied.
fn read_all(buffer: &mut [u8]) -> Result<usize, Errno> {
    let length = libc::c_int::try_from(buffer.len()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: the kernel writes at most `length` bytes, and `buffer` holds at least that many.
        let copied =
            unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buffer.as_mut_ptr().cast(), length) };
        if copied >= 0 {
            return Ok(usize::try_from(copied).unwrap_or(0).min(buffer.len()));
        }
        match Errno::last() {
            Errno::EINTR => continue,
            errno => return Err(errno),
        }
    }
}

/// One record of READ_ALL's text: its line and the continuation lines (starting with a space)
/// after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogEntry<'a> {
    /// The record's bytes as read, continuation lines included: what tells seen records apart.
    pub raw: &'a [u8],
    /// Its own timestamp, else that of the record before it (0 at the start): records are
    /// ordered by it.
    pub ts_usec: u64,
    /// Whether the timestamp is the record's own.
    pub timestamped: bool,
    pub line: Result<SyslogLine<'a>, RecordError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogLine<'a> {
    pub facility: u8,
    pub level: u8,
    pub message: &'a [u8],
    /// The continuation lines, newline-separated, each still with its leading space.
    pub continuation: &'a [u8],
}

impl SyslogLine<'_> {
    /// The record the `/dev/kmsg` parser would have given: ` KEY=value` continuation lines go
    /// into the dictionary, any other continuation line is appended to the message.
    pub fn to_record(&self, seq: u64, ts_usec: u64) -> Record {
        let mut message = String::from_utf8_lossy(self.message).into_owned();
        let mut dictionary = Vec::new();
        for line in self.continuation.split(|&b| b == b'\n') {
            let Some(text) = line.strip_prefix(b" ") else {
                continue;
            };
            match text.iter().position(|&b| b == b'=') {
                Some(eq) if eq > 0 && !text[..eq].contains(&b' ') => dictionary.push((
                    String::from_utf8_lossy(&text[..eq]).into_owned(),
                    String::from_utf8_lossy(&text[eq + 1..]).into_owned(),
                )),
                _ => {
                    message.push('\n');
                    message.push_str(&String::from_utf8_lossy(text));
                }
            }
        }
        Record {
            facility: self.facility,
            level: self.level,
            seq,
            ts_usec,
            flags: '-',
            message,
            dictionary,
        }
    }
}

/// Split READ_ALL's text into records. Pure: malformed lines are entries whose `line` is an
/// error, never a panic.
pub fn parse_syslog_text(text: &[u8]) -> Vec<SyslogEntry<'_>> {
    // (start, end of the first line, end of the last continuation line)
    let mut spans: Vec<(usize, usize, usize)> = Vec::new();
    let mut start = 0;
    for line in text.split_inclusive(|&b| b == b'\n') {
        let end = start + line.len();
        let content_end = if line.ends_with(b"\n") { end - 1 } else { end };
        if content_end > start {
            match spans.last_mut() {
                Some(last) if text[start] == b' ' => last.2 = content_end,
                _ => spans.push((start, content_end, content_end)),
            }
        }
        start = end;
    }
    let mut previous_ts = 0;
    spans
        .into_iter()
        .map(|(start, first_end, end)| {
            let parsed = parse_line(&text[start..first_end]);
            let (ts_usec, timestamped) = match &parsed {
                Ok((Some(ts), _)) => (*ts, true),
                _ => (previous_ts, false),
            };
            previous_ts = ts_usec;
            let continuation = text.get(first_end + 1..end).unwrap_or_default();
            SyslogEntry {
                raw: &text[start..end],
                ts_usec,
                timestamped,
                line: parsed.map(|(_, line)| SyslogLine {
                    continuation,
                    ..line
                }),
            }
        })
        .collect()
}

/// `<pri>[seconds.micros][caller] message`: the timestamp and the caller id are optional.
fn parse_line(line: &[u8]) -> Result<(Option<u64>, SyslogLine<'_>), RecordError> {
    let rest = line.strip_prefix(b"<").ok_or(RecordError::NoPriority)?;
    let close = rest
        .iter()
        .position(|&b| b == b'>')
        .ok_or(RecordError::NoPriority)?;
    let pri: u32 = number(Some(&rest[..close]), "pri")?;
    let facility = u8::try_from(pri >> 3).map_err(|_| RecordError::PriorityOutOfRange(pri))?;
    // Masked to three bits, so the cast cannot truncate.
    let level = (pri & 7) as u8;
    let mut body = &rest[close + 1..];
    let mut ts_usec = None;
    let timestamp = bracketed(body, |b| b == b' ' || b == b'.' || b.is_ascii_digit());
    if let Some(field) = timestamp.filter(|field| field.contains(&b'.')) {
        ts_usec = Some(parse_timestamp(field)?);
        body = &body[field.len() + 2..];
        // CONFIG_PRINTK_CALLER adds `[  T123]` or `[  C1]`.
        if let Some(caller) = bracketed(body, |b| {
            b == b' ' || b == b'T' || b == b'C' || b.is_ascii_digit()
        }) {
            body = &body[caller.len() + 2..];
        }
        body = body.strip_prefix(b" ").unwrap_or(body);
    }
    Ok((
        ts_usec,
        SyslogLine {
            facility,
            level,
            message: body,
            continuation: &[],
        },
    ))
}

/// The text inside a leading `[...]` when every byte of it is `allowed`: a message of its own
/// that starts with `[drm]` (printk.time off) is no timestamp.
fn bracketed(text: &[u8], allowed: impl Fn(u8) -> bool) -> Option<&[u8]> {
    let inner = text.strip_prefix(b"[")?;
    let close = inner.iter().position(|&b| b == b']')?;
    let field = &inner[..close];
    (!field.is_empty() && field.iter().all(|&b| allowed(b))).then_some(field)
}

/// `    5.140900` → 5140900 µs.
fn parse_timestamp(field: &[u8]) -> Result<u64, RecordError> {
    let bad = || RecordError::BadTimestamp(String::from_utf8_lossy(field).into_owned());
    let text = std::str::from_utf8(field).map_err(|_| bad())?.trim_start();
    let (seconds, fraction) = text.split_once('.').ok_or_else(bad)?;
    if fraction.is_empty() || fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seconds: u64 = seconds.parse().map_err(|_| bad())?;
    let micros: u64 = format!("{fraction:0<6}").parse().map_err(|_| bad())?;
    seconds
        .checked_mul(1_000_000)
        .and_then(|us| us.checked_add(micros))
        .ok_or_else(bad)
}

/// What has been read: the newest timestamp and the hashes of the records at it (a multiset:
/// the same line can be logged twice within a microsecond).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampMark {
    pub ts_usec: u64,
    /// Sorted.
    pub seen: Vec<u64>,
}

/// Which records of one READ_ALL are new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Per entry, in order.
    pub new: Vec<bool>,
    /// The oldest record copied is newer than the newest seen: records in between were
    /// overwritten (how many is unknown).
    pub lost: bool,
    /// What has been read once these are.
    pub mark: Option<TimestampMark>,
}

/// Pure: the records newer than `after` (all of them when None), and the mark after them.
/// Assumes records are copied in the order of their timestamps, as the kernel logs them.
pub fn select_new(entries: &[SyslogEntry<'_>], after: Option<&TimestampMark>) -> Selection {
    let mut seen_at_mark: HashMap<u64, usize> = HashMap::new();
    if let Some(mark) = after {
        for &hash in &mark.seen {
            *seen_at_mark.entry(hash).or_default() += 1;
        }
    }
    let new = entries
        .iter()
        .map(|entry| match after {
            None => true,
            Some(mark) if entry.ts_usec > mark.ts_usec => true,
            Some(mark) if entry.ts_usec < mark.ts_usec => false,
            Some(_) => match seen_at_mark.get_mut(&xxh3_64(entry.raw)) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    false
                }
                _ => true,
            },
        })
        .collect();
    let lost = after.is_some_and(|mark| {
        entries
            .iter()
            .find(|e| e.timestamped)
            .is_some_and(|oldest| oldest.ts_usec > mark.ts_usec)
    });
    let mark = match entries.iter().map(|e| e.ts_usec).max() {
        Some(newest) if after.is_none_or(|mark| newest >= mark.ts_usec) => {
            let mut seen: Vec<u64> = entries
                .iter()
                .filter(|e| e.ts_usec == newest)
                .map(|e| xxh3_64(e.raw))
                .collect();
            seen.sort_unstable();
            Some(TimestampMark {
                ts_usec: newest,
                seen,
            })
        }
        _ => after.cloned(),
    };
    Selection { new, lost, mark }
}

/// Polls syslog(2): each [`poll`](SyslogReader::poll) queues the new records, which
/// [`read_next`](SyslogReader::read_next) hands out as the `/dev/kmsg` reader does.
#[derive(Debug)]
pub struct SyslogReader {
    buffer: Box<[u8]>,
    mark: Option<TimestampMark>,
    not_before_usec: Option<u64>,
    /// Records have no seq here: hangwatch numbers the ones it reads, leaving a gap where
    /// records were lost so the OOM correlator drops its context as it does for `/dev/kmsg`.
    next_seq: u64,
    queue: VecDeque<KmsgRead>,
    counters: KernelLogCounters,
}

impl SyslogReader {
    /// Fails as an unreadable `/dev/kmsg` does: EPERM without CAP_SYSLOG when
    /// `kernel.dmesg_restrict` is 1.
    pub fn open(start: StartPosition) -> Result<SyslogReader, ReaderError> {
        let size = kernel_buffer_size().map_err(|errno| ReaderError::Syslog {
            action: "SIZE_BUFFER",
            errno,
        })?;
        let mut reader = SyslogReader {
            buffer: vec![0; if size > 0 { size } else { FALLBACK_BUFFER_SIZE }].into_boxed_slice(),
            mark: None,
            not_before_usec: None,
            next_seq: 0,
            queue: VecDeque::new(),
            counters: KernelLogCounters::default(),
        };
        match start {
            // A seq saved by the /dev/kmsg reader means nothing here: only new records.
            StartPosition::End | StartPosition::AfterSeq(_) => {
                let length = reader.read()?;
                let entries = parse_syslog_text(&reader.buffer[..length]);
                reader.mark = select_new(&entries, None).mark;
            }
            StartPosition::AfterTimestamp(mark) => {
                reader.mark = Some(mark);
                reader.poll()?;
            }
            StartPosition::LookBack(window) => {
                let now = monotonic_now_usec().map_err(ReaderError::Clock)?;
                let window = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
                reader.not_before_usec = Some(now.saturating_sub(window));
                reader.poll()?;
            }
        }
        Ok(reader)
    }

    fn read(&mut self) -> Result<usize, ReaderError> {
        read_all(&mut self.buffer).map_err(|errno| ReaderError::Syslog {
            action: "READ_ALL",
            errno,
        })
    }

    /// Read the kernel log once and queue what is new.
    pub fn poll(&mut self) -> Result<(), ReaderError> {
        let length = self.read()?;
        let entries = parse_syslog_text(&self.buffer[..length]);
        let selection = select_new(&entries, self.mark.as_ref());
        if selection.lost {
            self.counters.lost += 1;
            self.next_seq += 1;
        }
        for (entry, _) in entries.iter().zip(&selection.new).filter(|(_, new)| **new) {
            if self.not_before_usec.is_some_and(|t| entry.ts_usec < t) {
                continue;
            }
            self.counters.records_read += 1;
            let read = match &entry.line {
                Ok(line) => KmsgRead::Record(line.to_record(self.next_seq, entry.ts_usec)),
                Err(error) => {
                    self.counters.malformed += 1;
                    KmsgRead::Malformed(error.clone())
                }
            };
            self.next_seq += 1;
            self.queue.push_back(read);
        }
        self.mark = selection.mark;
        Ok(())
    }

    /// The next queued record; [`KmsgRead::Drained`] until the next poll.
    pub fn read_next(&mut self) -> KmsgRead {
        self.queue.pop_front().unwrap_or(KmsgRead::Drained)
    }

    /// What has been read, to resume from after a restart.
    pub fn mark(&self) -> Option<&TimestampMark> {
        self.mark.as_ref()
    }

    /// Counts since the last call: records read, lost, malformed.
    pub fn take_counters(&mut self) -> KernelLogCounters {
        self.counters.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Vec<SyslogEntry<'_>> {
        parse_syslog_text(text.as_bytes())
    }

    fn record(text: &str) -> Record {
        let parsed = entries(text);
        assert_eq!(parsed.len(), 1, "{parsed:?}");
        parsed[0]
            .line
            .as_ref()
            .unwrap()
            .to_record(7, parsed[0].ts_usec)
    }

    #[test]
    fn parses_priority_timestamp_and_message() {
        let r = record("<6>[    5.140900] NET: Registered protocol family 10\n");
        assert_eq!((r.facility, r.level, r.seq), (0, 6, 7));
        assert_eq!(r.ts_usec, 5_140_900);
        assert_eq!(r.message, "NET: Registered protocol family 10");
        assert!(r.dictionary.is_empty());
        let r = record("<12>[13730.783974] written by root");
        assert_eq!((r.facility, r.level), (1, 4));
        assert_eq!(r.ts_usec, 13_730_783_974);
    }

    #[test]
    fn caller_id_and_semicolons_are_not_part_of_the_message() {
        let r = record("<3>[   12.000001][  T812] a;b [x]\n");
        assert_eq!(r.message, "a;b [x]");
        assert_eq!(r.ts_usec, 12_000_001);
    }

    #[test]
    fn without_printk_time_the_record_takes_the_timestamp_before_it() {
        let parsed = entries("<6>[    1.000000] first\n<6>[drm] no time\n<4>plain\n");
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1].ts_usec, 1_000_000);
        assert!(!parsed[1].timestamped);
        let line = parsed[1].line.as_ref().unwrap();
        assert_eq!(line.message, b"[drm] no time");
        assert_eq!(parsed[2].line.as_ref().unwrap().message, b"plain");
        assert_eq!(entries("<6>no time at all\n")[0].ts_usec, 0);
    }

    #[test]
    fn continuation_lines_belong_to_the_record_before() {
        let text = "<6>[    1.000000] usb 1-1: new device\n SUBSYSTEM=usb\n DEVICE=c189:1\n  more text\n<6>[    2.000000] next\n";
        let parsed = entries(text);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            parsed[0].raw,
            b"<6>[    1.000000] usb 1-1: new device\n SUBSYSTEM=usb\n DEVICE=c189:1\n  more text"
        );
        let r = parsed[0].line.as_ref().unwrap().to_record(0, 1);
        assert_eq!(r.message, "usb 1-1: new device\n more text");
        assert_eq!(
            r.dictionary,
            vec![
                ("SUBSYSTEM".to_string(), "usb".to_string()),
                ("DEVICE".to_string(), "c189:1".to_string())
            ]
        );
    }

    #[test]
    fn malformed_lines_are_typed_errors() {
        let cases: [(&str, RecordError); 5] = [
            ("no priority", RecordError::NoPriority),
            ("<6 unclosed", RecordError::NoPriority),
            (
                "<99999>[ 1.000000] x",
                RecordError::PriorityOutOfRange(99999),
            ),
            (
                "<6>[ 1.0000001] x",
                RecordError::BadTimestamp(" 1.0000001".into()),
            ),
            (
                "<6>[99999999999999999999.000000] x",
                RecordError::BadTimestamp("99999999999999999999.000000".into()),
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(entries(line)[0].line, Err(expected), "{line}");
        }
        assert!(matches!(
            entries("<six>[ 1.0] x")[0].line,
            Err(RecordError::NotANumber { field: "pri", .. })
        ));
        // A continuation line with nothing before it is a record of its own, and malformed.
        assert_eq!(entries(" orphan")[0].line, Err(RecordError::NoPriority));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        const ALPHABET: &[u8] = b"<>[]. 0123456789TC\nabc=\xff\x00";
        let mut state: u32 = 0x9e37_79b9;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    ALPHABET[state as usize % ALPHABET.len()]
                })
                .collect();
            let parsed = parse_syslog_text(&bytes);
            for entry in &parsed {
                if let Ok(line) = &entry.line {
                    let _ = line.to_record(0, entry.ts_usec);
                }
            }
            let _ = select_new(&parsed, None);
        }
    }

    fn mark_after(text: &str) -> TimestampMark {
        select_new(&entries(text), None).mark.unwrap()
    }

    fn new_messages(text: &str, after: &TimestampMark) -> (Vec<String>, bool) {
        let parsed = entries(text);
        let selection = select_new(&parsed, Some(after));
        let messages = parsed
            .iter()
            .zip(&selection.new)
            .filter(|(_, new)| **new)
            .map(|(e, _)| String::from_utf8_lossy(e.line.as_ref().unwrap().message).into_owned())
            .collect();
        (messages, selection.lost)
    }

    #[test]
    fn only_records_newer_than_the_mark_are_new() {
        let first = "<6>[ 1.000000] a\n<6>[ 2.000000] b\n";
        let mark = mark_after(first);
        assert_eq!(mark.ts_usec, 2_000_000);
        assert_eq!(mark.seen.len(), 1);
        let (new, lost) = new_messages(&format!("{first}<6>[ 3.000000] c\n"), &mark);
        assert_eq!((new, lost), (vec!["c".to_string()], false));
        let (new, _) = new_messages(first, &mark);
        assert!(new.is_empty(), "nothing new, nothing again");
    }

    #[test]
    fn identical_timestamps_tell_records_apart_by_line_and_count() {
        let first = "<6>[ 1.000000] a\n<6>[ 2.000000] same\n<6>[ 2.000000] other\n";
        let mark = mark_after(first);
        assert_eq!(mark.seen.len(), 2);
        // Later in the same microsecond: a new line and a second copy of one already seen.
        let later = format!("{first}<6>[ 2.000000] same\n<6>[ 2.000000] third\n");
        let (new, _) = new_messages(&later, &mark);
        assert_eq!(new, ["same", "third"]);
        let mark = select_new(&entries(&later), Some(&mark)).mark.unwrap();
        assert_eq!(mark.seen.len(), 4);
        assert!(new_messages(&later, &mark).0.is_empty());
    }

    #[test]
    fn a_wrapped_ring_counts_as_lost() {
        let mark = mark_after("<6>[ 1.000000] a\n<6>[ 2.000000] b\n");
        let (new, lost) = new_messages("<6>[ 5.000000] e\n<6>[ 6.000000] f\n", &mark);
        assert_eq!(new, ["e", "f"]);
        assert!(lost);
        // The newest seen record is still there: nothing lost even though older ones are gone.
        let (new, lost) = new_messages("<6>[ 2.000000] b\n<6>[ 6.000000] f\n", &mark);
        assert_eq!((new, lost), (vec!["f".to_string()], false));
    }

    #[test]
    fn an_empty_read_keeps_the_mark() {
        let mark = mark_after("<6>[ 1.000000] a\n");
        let selection = select_new(&[], Some(&mark));
        assert_eq!(selection.mark, Some(mark));
        assert!(!selection.lost);
        assert_eq!(select_new(&[], None).mark, None);
    }

    #[test]
    fn malformed_lines_are_new_once() {
        let first = "<6>[ 1.000000] a\ngarbage\n";
        let mark = mark_after(first);
        let parsed = entries(first);
        assert_eq!(
            parsed[1].ts_usec, 1_000_000,
            "ordered after the record before it"
        );
        assert_eq!(select_new(&parsed, Some(&mark)).new, [false, false]);
        let later = format!("{first}<6>[ 2.000000] b\nmore garbage\n");
        assert_eq!(
            select_new(&entries(&later), Some(&mark)).new,
            [false, false, true, true]
        );
    }

    #[test]
    fn resuming_from_a_saved_mark_reads_what_came_after() {
        // What a restart does: the mark from the last run, the buffer as it is now.
        let mark = mark_after("<6>[ 1.000000] a\n<3>[ 1.000000] b\n");
        let now =
            "<6>[ 1.000000] a\n<3>[ 1.000000] b\n<3>[ 1.000000] while stopped\n<6>[ 4.000000] d\n";
        let (new, lost) = new_messages(now, &mark);
        assert_eq!(new, ["while stopped", "d"]);
        assert!(!lost);
    }
}
