//! The pure parts of following `GET /events`: the request path, lines out of body chunks
//! (bounded), the position to resume from, duplicates after a resume, and the backoff.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use super::event::ACTIONS;

/// The `/events` path: container events of the tracked actions from `since` (seconds with
/// nanoseconds, inclusive), until `until` when given (the daemon then answers with what it
/// buffered and closes; without it the stream stays open).
pub fn events_path(since: Option<&str>, until: Option<&str>) -> String {
    let actions: Vec<String> = ACTIONS.iter().map(|a| format!("\"{a}\"")).collect();
    let filters = format!(
        "{{\"type\":[\"container\"],\"event\":[{}]}}",
        actions.join(",")
    );
    let mut path = format!("/events?filters={}", query_escape(&filters));
    for (key, value) in [("since", since), ("until", until)] {
        if let Some(value) = value {
            path.push_str(&format!("&{key}={}", query_escape(value)));
        }
    }
    path
}

/// Docker's timestamp for `since`/`until`: `<seconds>.<nanoseconds>`.
pub fn timestamp(time_nano: i64) -> String {
    let time_nano = time_nano.max(0);
    format!(
        "{}.{:09}",
        time_nano / 1_000_000_000,
        time_nano % 1_000_000_000
    )
}

/// Percent-encode everything but RFC 3986's unreserved characters.
fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What [`LineSplitter::push`] found in a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// A line longer than the limit: dropped up to its newline.
    TooLong,
}

/// Splits a byte stream into newline-terminated lines, holding at most `max_line` bytes of an
/// unfinished line: a daemon sending garbage without newlines cannot grow memory.
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max_line: usize,
    /// Inside a line that was too long: skip to its end.
    skipping: bool,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> LineSplitter {
        LineSplitter {
            partial: Vec::new(),
            max_line,
            skipping: false,
        }
    }

    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut lines = Vec::new();
        while !chunk.is_empty() {
            let newline = memchr::memchr(b'\n', chunk);
            let (piece, rest) = match newline {
                Some(at) => (&chunk[..at], &chunk[at + 1..]),
                None => (chunk, &[][..]),
            };
            if !self.skipping {
                if self.partial.len() + piece.len() > self.max_line {
                    self.partial.clear();
                    self.skipping = true;
                    lines.push(Line::TooLong);
                } else {
                    self.partial.extend_from_slice(piece);
                }
            }
            if newline.is_some() {
                if !self.skipping && !self.partial.trim_ascii().is_empty() {
                    lines.push(Line::Complete(std::mem::take(&mut self.partial)));
                }
                self.partial.clear();
                self.skipping = false;
            }
            chunk = rest;
        }
        lines
    }
}

/// Where to resume after the stream broke, and which events were already sent: Docker replays
/// its buffered events from `since` (inclusive), so a resume delivers some events twice.
#[derive(Debug)]
pub struct Position {
    /// Newest event time seen, in the daemon's nanoseconds.
    newest: Option<i64>,
    recent: HashSet<EventKey>,
    order: VecDeque<EventKey>,
    capacity: usize,
}

/// An event's identity: time, container and action (Docker has no event id).
pub type EventKey = (i64, String, &'static str);

/// Resume this much before the newest event seen: dockerd stamps an event before it takes the
/// lock that orders the buffer, so events close in time can be published out of order.
const RESUME_OVERLAP_NANOS: i64 = 1_000_000_000;

impl Position {
    /// `capacity`: keys remembered; more than the daemon buffers (dockerd keeps 256 events), so
    /// whatever a resume replays is recognised.
    pub fn new(capacity: usize) -> Position {
        Position {
            newest: None,
            recent: HashSet::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Note an event time seen on the stream (also of lines that were not usable).
    pub fn saw_time(&mut self, time_nano: i64) {
        self.newest = Some(self.newest.map_or(time_nano, |n| n.max(time_nano)));
    }

    /// True the first time `key` is seen; false for a replay of an event already sent.
    pub fn first_time(&mut self, key: EventKey) -> bool {
        self.saw_time(key.0);
        if self.recent.contains(&key) {
            return false;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.recent.remove(&oldest);
        }
        self.recent.insert(key.clone());
        self.order.push_back(key);
        true
    }

    /// `since` for the next connection: a little before the newest event seen, or `start`
    /// (nanoseconds) when none was.
    pub fn resume_from(&self, start: i64) -> i64 {
        self.newest
            .map_or(start, |n| n.saturating_sub(RESUME_OVERLAP_NANOS))
    }
}

/// Bounded exponential backoff between connection attempts.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt; each call doubles the following one, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// After a connection that worked: start again from `initial`.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_filters_container_stop_actions_and_encodes_since() {
        let path = events_path(Some("1795404050.665773785"), None);
        assert_eq!(
            path,
            "/events?filters=%7B%22type%22%3A%5B%22container%22%5D%2C%22event%22%3A%5B%22kill%22%2C%22die%22%2C%22stop%22%2C%22destroy%22%5D%7D&since=1795404050.665773785"
        );
        assert!(events_path(None, Some("9.000000000")).ends_with("&until=9.000000000"));
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        assert_eq!(timestamp(1_795_404_050_000_000_123), "1795404050.000000123");
        assert_eq!(timestamp(-1), "0.000000000");
    }

    #[test]
    fn lines_across_chunks_and_blank_lines() {
        let mut s = LineSplitter::new(64);
        assert!(s.push(b"{\"a\"").is_empty());
        assert_eq!(
            s.push(b":1}\n\n{\"b\":2}\n{\"c\""),
            vec![
                Line::Complete(b"{\"a\":1}".to_vec()),
                Line::Complete(b"{\"b\":2}".to_vec())
            ]
        );
        assert_eq!(
            s.push(b":3}\n"),
            vec![Line::Complete(b"{\"c\":3}".to_vec())]
        );
    }

    #[test]
    fn an_endless_line_is_dropped_and_memory_stays_bounded() {
        let mut s = LineSplitter::new(16);
        assert_eq!(s.push(&[b'x'; 10]), vec![]);
        assert_eq!(s.push(&[b'x'; 10]), vec![Line::TooLong]);
        for _ in 0..1000 {
            assert!(s.push(&[b'y'; 1000]).is_empty());
            assert!(s.partial.capacity() <= 32);
        }
        assert_eq!(s.push(b"yy\nok\n"), vec![Line::Complete(b"ok".to_vec())]);
    }

    #[test]
    fn replayed_events_are_recognised_and_resume_overlaps() {
        let mut p = Position::new(3);
        assert_eq!(p.resume_from(42), 42, "nothing seen: from the start");
        assert!(p.first_time((5_000_000_000, "a".into(), "kill")));
        assert!(p.first_time((5_000_000_000, "b".into(), "kill")));
        assert!(
            p.first_time((5_000_000_000, "a".into(), "die")),
            "same time and id, other action"
        );
        assert!(!p.first_time((5_000_000_000, "a".into(), "kill")));
        assert_eq!(p.resume_from(42), 4_000_000_000);
        assert!(p.first_time((6_000_000_000, "c".into(), "stop")));
        assert!(
            p.first_time((5_000_000_000, "a".into(), "kill")),
            "forgotten beyond capacity"
        );
        p.saw_time(1);
        assert_eq!(p.resume_from(0), 5_000_000_000, "the newest time is kept");
    }

    #[test]
    fn backoff_doubles_up_to_its_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let waits: Vec<u64> = (0..5).map(|_| b.next_wait().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_wait(), Duration::from_millis(500));
    }
}
