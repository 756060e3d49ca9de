//! Turns a byte stream into the logical lines of a goroutine dump, in bounded memory.
//!
//! Two shapes arrive here:
//! - a plain dump (dockerd's `goroutine-stacks-*.log`, containerd's `containerd.<pid>.stacks.log`),
//!   where physical lines are dump lines;
//! - a log file (containerd's own log, which is also where shims' dumps end up), where a whole
//!   dump is one quoted, escaped field: `msg="=== BEGIN goroutine stack dump ===\ngoroutine 27
//!   [running]:\n..."` (logfmt) or `"msg":"=== BEGIN ..."` (JSON). Inside that field `\n` ends a
//!   logical line and `\t`, `\"`, `\\`, `\xNN`, `\uNNNN` are decoded; the closing quote ends the
//!   dump and the rest of the physical line (trailing fields) is skipped.
//!
//! A logical line keeps at most `max_line_len` bytes; the excess is dropped and counted, so a
//! 100 MB line never sits in memory.

use memchr::{memchr, memchr3, memmem};

/// Opens a dump embedded in a quoted log field (logfmt and JSON both quote it).
const EMBEDDED_BEGIN: &[u8] = b"\"=== BEGIN goroutine stack dump ===";
/// The opening marker must start this close to the beginning of its physical line; a log prefix
/// (journald, `time=`, `level=`) is far shorter. Bounding it keeps the search linear.
const MARKER_WINDOW: usize = 4096;

/// What the splitter hands to its consumer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// One logical line, without its line terminator. `truncated` when bytes were dropped.
    Line { text: &'a [u8], truncated: bool },
    /// A dump embedded in a log line starts; the lines that follow belong to it.
    EmbeddedStart,
    /// The embedded dump's quoted field closed (or its physical line ended).
    EmbeddedEnd,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LineStats {
    pub bytes: u64,
    pub lines: u64,
    pub truncated_lines: u64,
    pub embedded_dumps: u64,
    /// The input ended in the middle of a line (or of an embedded dump): it was cut short.
    pub ended_mid_line: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Embedded,
    /// After an embedded dump's closing quote: ignore the rest of the physical line.
    SkipLine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Inside `\xNN` (raw byte) or `\uNNNN` / `\UNNNNNNNN` (code point).
    Hex {
        left: u8,
        value: u32,
        raw_byte: bool,
    },
}

pub(crate) struct LineSplitter {
    max_line_len: usize,
    line: Vec<u8>,
    truncated: bool,
    mode: Mode,
    escape: Escape,
    stats: LineStats,
}

impl LineSplitter {
    pub(crate) fn new(max_line_len: usize) -> Self {
        let max_line_len = max_line_len.max(1);
        Self {
            max_line_len,
            line: Vec::with_capacity(max_line_len.min(8192)),
            truncated: false,
            mode: Mode::Plain,
            escape: Escape::None,
            stats: LineStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> LineStats {
        self.stats
    }

    /// Feed the next chunk of input; events are delivered to `sink` as lines complete.
    pub(crate) fn feed(&mut self, chunk: &[u8], sink: &mut impl FnMut(Event<'_>)) {
        self.stats.bytes += chunk.len() as u64;
        let mut rest = chunk;
        while !rest.is_empty() {
            let used = match self.mode {
                Mode::Plain => self.feed_plain(rest, sink),
                Mode::Embedded => self.feed_embedded(rest, sink),
                Mode::SkipLine => match memchr(b'\n', rest) {
                    Some(i) => {
                        self.mode = Mode::Plain;
                        i + 1
                    }
                    None => rest.len(),
                },
            };
            rest = &rest[used..];
        }
    }

    /// The input is exhausted: flush what is pending.
    pub(crate) fn finish(&mut self, sink: &mut impl FnMut(Event<'_>)) {
        match self.mode {
            Mode::Plain => {
                if !self.line.is_empty() || self.truncated {
                    self.stats.ended_mid_line = true;
                    self.emit(sink);
                }
            }
            Mode::Embedded => {
                self.stats.ended_mid_line = true;
                if !self.line.is_empty() || self.truncated {
                    self.emit(sink);
                }
                sink(Event::EmbeddedEnd);
            }
            Mode::SkipLine => {}
        }
        self.mode = Mode::Plain;
        self.escape = Escape::None;
    }

    /// Plain mode: returns how many bytes of `rest` it consumed.
    fn feed_plain(&mut self, rest: &[u8], sink: &mut impl FnMut(Event<'_>)) -> usize {
        let newline = memchr(b'\n', rest);
        let piece = &rest[..newline.unwrap_or(rest.len())];
        let before = self.line.len();
        // Keep enough of the line to find the marker even when lines are capped shorter.
        let cap = self.max_line_len.max(MARKER_WINDOW + EMBEDDED_BEGIN.len());
        let take = piece.len().min(cap - before);
        self.line.extend_from_slice(&piece[..take]);
        if take < piece.len() {
            self.truncated = true;
        }
        if before < MARKER_WINDOW
            && let Some(at) = self.find_embedded_marker(before)
        {
            // The bytes already kept after the marker are the start of the embedded dump.
            let tail = self.line.split_off(at + EMBEDDED_BEGIN.len());
            self.line.clear();
            self.truncated = false;
            self.mode = Mode::Embedded;
            self.stats.embedded_dumps += 1;
            sink(Event::EmbeddedStart);
            // The tail holds no newline; if it closes the field, SkipLine drops the rest.
            self.feed_embedded(&tail, sink);
            // Whatever of `piece` was not kept yet continues the embedded dump.
            return take;
        }
        match newline {
            Some(i) => {
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                self.emit(sink);
                i + 1
            }
            None => rest.len(),
        }
    }

    /// Looks for the embedded-dump marker in the part of the line appended since `appended_at`
    /// (with enough overlap to catch a marker split across chunks).
    fn find_embedded_marker(&self, appended_at: usize) -> Option<usize> {
        let from = appended_at.saturating_sub(EMBEDDED_BEGIN.len() - 1);
        let window_end = self.line.len().min(MARKER_WINDOW + EMBEDDED_BEGIN.len());
        if from >= window_end {
            return None;
        }
        memmem::find(&self.line[from..window_end], EMBEDDED_BEGIN).map(|i| from + i)
    }

    /// Embedded mode: decodes escapes; returns how many bytes of `rest` it consumed.
    fn feed_embedded(&mut self, rest: &[u8], sink: &mut impl FnMut(Event<'_>)) -> usize {
        let mut i = 0;
        while i < rest.len() {
            if self.escape != Escape::None {
                if self.feed_escape(rest[i], sink) {
                    i += 1;
                }
                continue;
            }
            let Some(off) = memchr3(b'\\', b'"', b'\n', &rest[i..]) else {
                self.push(&rest[i..]);
                return rest.len();
            };
            self.push(&rest[i..i + off]);
            i += off;
            match rest[i] {
                b'\\' => self.escape = Escape::Backslash,
                b'"' => {
                    self.end_embedded(sink);
                    self.mode = Mode::SkipLine;
                    return i + 1;
                }
                _ => {
                    // A raw newline inside the field: the log line was cut; what follows is
                    // ordinary text again.
                    self.end_embedded(sink);
                    self.mode = Mode::Plain;
                    return i + 1;
                }
            }
            i += 1;
        }
        rest.len()
    }

    fn end_embedded(&mut self, sink: &mut impl FnMut(Event<'_>)) {
        if !self.line.is_empty() || self.truncated {
            self.emit(sink);
        }
        sink(Event::EmbeddedEnd);
    }

    /// Consumes one byte of an escape sequence. Returns false when the byte does not belong to
    /// the sequence and must be read again as ordinary input.
    fn feed_escape(&mut self, byte: u8, sink: &mut impl FnMut(Event<'_>)) -> bool {
        match self.escape {
            Escape::None => false,
            Escape::Backslash => {
                self.escape = Escape::None;
                match byte {
                    b'n' => self.emit(sink),
                    b't' => self.push_byte(b'\t'),
                    // A `\r` before `\n` would only leave a stray byte at the end of the line.
                    b'r' => {}
                    b'x' => self.start_hex(2, true),
                    b'u' => self.start_hex(4, false),
                    b'U' => self.start_hex(8, false),
                    b'a' => self.push_byte(0x07),
                    b'b' => self.push_byte(0x08),
                    b'f' => self.push_byte(0x0c),
                    b'v' => self.push_byte(0x0b),
                    b'"' | b'\\' | b'\'' | b'/' => self.push_byte(byte),
                    other => {
                        self.push_byte(b'\\');
                        self.push_byte(other);
                    }
                }
                true
            }
            Escape::Hex {
                left,
                value,
                raw_byte,
            } => {
                let Some(digit) = (byte as char).to_digit(16) else {
                    // Malformed escape: keep what it said literally and re-read this byte.
                    self.escape = Escape::None;
                    self.push(if raw_byte { b"\\x" } else { b"\\u" });
                    return false;
                };
                let value = (value << 4) | digit;
                if left > 1 {
                    self.escape = Escape::Hex {
                        left: left - 1,
                        value,
                        raw_byte,
                    };
                    return true;
                }
                self.escape = Escape::None;
                if raw_byte {
                    self.push_byte(value as u8);
                } else {
                    let ch = char::from_u32(value).unwrap_or(char::REPLACEMENT_CHARACTER);
                    let mut utf8 = [0u8; 4];
                    self.push(ch.encode_utf8(&mut utf8).as_bytes());
                }
                true
            }
        }
    }

    fn start_hex(&mut self, digits: u8, raw_byte: bool) {
        self.escape = Escape::Hex {
            left: digits,
            value: 0,
            raw_byte,
        };
    }

    /// Appends up to the line cap; the excess is dropped and the line marked truncated.
    fn push(&mut self, bytes: &[u8]) {
        let room = self.max_line_len.saturating_sub(self.line.len());
        if bytes.len() > room {
            self.line.extend_from_slice(&bytes[..room]);
            self.truncated = true;
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn push_byte(&mut self, byte: u8) {
        self.push(&[byte]);
    }

    fn emit(&mut self, sink: &mut impl FnMut(Event<'_>)) {
        if self.line.len() > self.max_line_len {
            self.line.truncate(self.max_line_len);
            self.truncated = true;
        }
        self.stats.lines += 1;
        if self.truncated {
            self.stats.truncated_lines += 1;
        }
        sink(Event::Line {
            text: &self.line,
            truncated: self.truncated,
        });
        self.line.clear();
        self.truncated = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owned {
        Line(String, bool),
        Start,
        End,
    }

    fn split(input: &[u8], max: usize, chunk: usize) -> (Vec<Owned>, LineStats) {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(max);
        let mut sink = |e: Event<'_>| {
            out.push(match e {
                Event::Line { text, truncated } => {
                    Owned::Line(String::from_utf8_lossy(text).into_owned(), truncated)
                }
                Event::EmbeddedStart => Owned::Start,
                Event::EmbeddedEnd => Owned::End,
            })
        };
        for piece in input.chunks(chunk) {
            splitter.feed(piece, &mut sink);
        }
        splitter.finish(&mut sink);
        (out, splitter.stats())
    }

    fn line(s: &str) -> Owned {
        Owned::Line(s.to_string(), false)
    }

    #[test]
    fn plain_lines_split_on_newline_and_drop_cr() {
        for chunk in [1, 2, 3, 100] {
            let (events, stats) = split(b"a\r\n\nbc\nlast", 100, chunk);
            assert_eq!(events, vec![line("a"), line(""), line("bc"), line("last")]);
            assert!(stats.ended_mid_line);
            assert_eq!(stats.lines, 4);
        }
    }

    #[test]
    fn long_lines_are_capped_and_counted() {
        for chunk in [1, 7, 1000] {
            let (events, stats) = split(b"0123456789\nab\n", 4, chunk);
            assert_eq!(
                events,
                vec![Owned::Line("0123".into(), true), line("ab")],
                "chunk {chunk}"
            );
            assert_eq!(stats.truncated_lines, 1);
            assert!(!stats.ended_mid_line);
        }
    }

    #[test]
    fn embedded_logfmt_dump_is_unescaped() {
        let input = br#"before
time="2026-11-23T00:08:48Z" level=info msg="=== BEGIN goroutine stack dump ===\ngoroutine 27 [running]:\nmain.f(\"x\")\n\tmain.go:1 +0x1\n\n=== END goroutine stack dump ===" runtime=io.containerd.runc.v2
after
"#;
        for chunk in [1, 2, 5, 4096] {
            let (events, stats) = split(input, 1000, chunk);
            assert_eq!(
                events,
                vec![
                    line("before"),
                    Owned::Start,
                    line(""),
                    line("goroutine 27 [running]:"),
                    line("main.f(\"x\")"),
                    line("\tmain.go:1 +0x1"),
                    line(""),
                    line("=== END goroutine stack dump ==="),
                    Owned::End,
                    line("after"),
                ],
                "chunk {chunk}"
            );
            assert_eq!(stats.embedded_dumps, 1);
        }
    }

    #[test]
    fn embedded_json_escapes_are_decoded() {
        let input = br#"{"level":"info","msg":"=== BEGIN goroutine stack dump ===\ngo\u0072outine \x31 [a\\b]:\n\t\u00e9"}"#;
        for chunk in [1, 3, 1000] {
            let (events, _) = split(input, 1000, chunk);
            assert_eq!(
                events,
                vec![
                    Owned::Start,
                    line(""),
                    line("goroutine 1 [a\\b]:"),
                    line("\t\u{e9}"),
                    Owned::End
                ]
            );
        }
    }

    #[test]
    fn embedded_dump_cut_by_end_of_input_or_raw_newline() {
        let (events, stats) = split(br#"msg="=== BEGIN goroutine stack dump ===\nab"#, 100, 3);
        assert_eq!(events, vec![Owned::Start, line(""), line("ab"), Owned::End]);
        assert!(stats.ended_mid_line);

        let (events, _) = split(
            b"msg=\"=== BEGIN goroutine stack dump ===\\nab\nplain\n",
            100,
            2,
        );
        assert_eq!(
            events,
            vec![
                Owned::Start,
                line(""),
                line("ab"),
                Owned::End,
                line("plain")
            ]
        );
    }

    #[test]
    fn embedded_dump_lines_are_capped() {
        let input = b"msg=\"=== BEGIN goroutine stack dump ===\\n0123456789\\nab\"\n";
        let (events, stats) = split(input, 4, 1);
        assert_eq!(
            events,
            vec![
                Owned::Start,
                line(""),
                Owned::Line("0123".into(), true),
                line("ab"),
                Owned::End
            ]
        );
        assert_eq!(stats.truncated_lines, 1);
    }

    #[test]
    fn marker_far_into_a_line_is_not_an_embedded_dump() {
        let mut input = vec![b'x'; MARKER_WINDOW + 100];
        input.extend_from_slice(b"\"=== BEGIN goroutine stack dump ===\\n\n");
        let (events, stats) = split(&input, 1 << 20, 512);
        assert_eq!(events.len(), 1);
        assert_eq!(stats.embedded_dumps, 0);
    }

    #[test]
    fn malformed_escapes_are_kept_literally() {
        let input = b"msg=\"=== BEGIN goroutine stack dump ===\\n\\xZZ\\q\"";
        let (events, _) = split(input, 100, 1);
        assert_eq!(
            events,
            vec![Owned::Start, line(""), line("\\xZZ\\q"), Owned::End]
        );
    }
}
