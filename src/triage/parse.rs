//! The goroutine dump grammar, one logical line at a time.
//!
//! ```text
//! goroutine <N> [<state>(, <M> minutes)?(, locked to thread)?]:
//! <function>(<args>)
//! \t<file>:<line> +0x<off>
//! ...additional frames elided...
//! created by <function>( in goroutine <N>)?
//! \t<file>:<line> +0x<off>
//! <blank line>
//! ```
//!
//! Function names are normalised by dropping the argument list, so identical stacks with
//! different argument values compare equal. Only the first `max_frames` frames of a stack are
//! kept; all of them feed the stack hash that decides the bucket.

use std::borrow::Cow;

use xxhash_rust::xxh3::Xxh3;

/// Lines that open or close a dump written through a logger (containerd, shims, old dockerd).
const BEGIN_MARKER: &str = "=== BEGIN goroutine stack dump ===";
const END_MARKER: &str = "=== END goroutine stack dump ===";
/// Printed instead of frames for a goroutine running on another thread (crash dumps).
const STACK_UNAVAILABLE: &str = "goroutine running on other thread; stack unavailable";
const ELIDED: &str = "...additional frames elided...";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RawFrame {
    pub function: String,
    pub location: String,
}

/// A complete goroutine, borrowed from the parser's scratch space.
#[derive(Debug)]
pub(crate) struct Goroutine<'a> {
    pub id: u64,
    pub state: &'a str,
    /// Go prints the wait only from one minute on; 0 means "under a minute" or "not waiting".
    pub wait_minutes: u64,
    pub locked_to_thread: bool,
    /// The first frames of the stack, innermost first.
    pub frames: &'a [RawFrame],
    pub frames_total: u32,
    pub elided: bool,
    pub created_by: Option<&'a str>,
    pub stack_hash: u128,
}

/// Receives what the parser recognises.
pub(crate) trait GoroutineSink {
    fn goroutine(&mut self, goroutine: &Goroutine<'_>);
    /// A `=== BEGIN goroutine stack dump ===` marker: a new dump (maybe of another process).
    fn dump_start(&mut self);
    fn dump_end(&mut self);
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ParseStats {
    pub malformed_lines: u64,
    /// Lines outside any goroutine that are not dump syntax (other log lines, crash headers).
    pub other_lines: u64,
    pub truncated_goroutines: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    FunctionOrEnd,
    FrameLocation,
    CreatorLocation,
}

#[derive(Debug)]
struct Current {
    id: u64,
    state: String,
    wait_minutes: u64,
    locked_to_thread: bool,
    kept: usize,
    total: u32,
    elided: bool,
    created_by: Option<String>,
    expect: Expect,
}

pub(crate) struct DumpParser {
    max_frames: usize,
    max_symbol_len: usize,
    current: Option<Current>,
    /// Reused across goroutines; only `current.kept` entries are live.
    frames: Vec<RawFrame>,
    hasher: Xxh3,
    stats: ParseStats,
}

impl DumpParser {
    pub(crate) fn new(max_frames: usize, max_symbol_len: usize) -> Self {
        Self {
            max_frames,
            max_symbol_len: max_symbol_len.max(16),
            current: None,
            frames: Vec::new(),
            hasher: Xxh3::new(),
            stats: ParseStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> ParseStats {
        self.stats
    }

    pub(crate) fn line(&mut self, raw: &[u8], truncated: bool, sink: &mut impl GoroutineSink) {
        let text = match std::str::from_utf8(raw) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(raw),
        };
        let line = text.trim_end();
        if line.is_empty() {
            self.finish(false, sink);
            return;
        }
        if line.starts_with("goroutine ") {
            if let Some(header) = parse_header(line) {
                self.finish(false, sink);
                self.start(header);
                return;
            }
            if line == STACK_UNAVAILABLE && self.current.is_some() {
                return;
            }
        }
        if line.contains(BEGIN_MARKER) {
            self.finish(false, sink);
            sink.dump_start();
            return;
        }
        if line.contains(END_MARKER) {
            self.finish(false, sink);
            sink.dump_end();
            return;
        }
        let Some(current) = self.current.as_mut() else {
            if line.starts_with("goroutine ") {
                self.stats.malformed_lines += 1;
            } else {
                self.stats.other_lines += 1;
            }
            return;
        };
        let indented = line.starts_with(['\t', ' ']);
        let expects_location = matches!(
            current.expect,
            Expect::FrameLocation | Expect::CreatorLocation
        );
        if expects_location {
            let of_frame = current.expect == Expect::FrameLocation;
            current.expect = Expect::FunctionOrEnd;
            if indented {
                match parse_location(line) {
                    Some(location) => self.set_location(of_frame, location),
                    None => self.stats.malformed_lines += 1,
                }
                return;
            }
        }
        // The line is counted once as malformed: for standing where a location belongs, or
        // for fitting no rule (it is still read as a frame when it is one).
        let mut malformed = expects_location;
        if indented || truncated {
            malformed = true;
        } else if line == ELIDED {
            current.elided = true;
        } else if let Some(creator) = line.strip_prefix("created by ") {
            match normalise_creator(creator) {
                Some(function) => {
                    self.hasher.update(b"\x02");
                    self.hasher.update(function.as_bytes());
                    let kept = clip(function, self.max_symbol_len).to_string();
                    current.created_by = Some(kept);
                    current.expect = Expect::CreatorLocation;
                }
                None => malformed = true,
            }
        } else {
            match normalise_function(line) {
                Some(function) => self.push_frame(function),
                None => malformed = true,
            }
        }
        if malformed {
            self.stats.malformed_lines += 1;
        }
    }

    /// A dump boundary found by the line splitter: the current goroutine ends there.
    pub(crate) fn boundary<S: GoroutineSink>(&mut self, sink: &mut S, event: fn(&mut S)) {
        self.finish(false, sink);
        event(sink);
    }

    /// End of input. `cut` tells that the input stopped in the middle of a line.
    pub(crate) fn finish_input(&mut self, cut: bool, sink: &mut impl GoroutineSink) {
        self.finish(cut, sink);
    }

    fn start(&mut self, header: Header<'_>) {
        self.hasher.reset();
        self.hasher.update(header.state.as_bytes());
        self.hasher.update(b"\x00");
        self.current = Some(Current {
            id: header.id,
            state: clip(header.state, self.max_symbol_len).to_string(),
            wait_minutes: header.wait_minutes,
            locked_to_thread: header.locked_to_thread,
            kept: 0,
            total: 0,
            elided: false,
            created_by: None,
            expect: Expect::FunctionOrEnd,
        });
    }

    fn push_frame(&mut self, function: &str) {
        let Some(current) = self.current.as_mut() else {
            return;
        };
        self.hasher.update(b"\x01");
        self.hasher.update(function.as_bytes());
        current.total = current.total.saturating_add(1);
        current.expect = Expect::FrameLocation;
        if current.kept >= self.max_frames {
            return;
        }
        if self.frames.len() == current.kept {
            self.frames.push(RawFrame::default());
        }
        let frame = &mut self.frames[current.kept];
        frame.function.clear();
        frame.function.push_str(clip(function, self.max_symbol_len));
        frame.location.clear();
        current.kept += 1;
    }

    fn set_location(&mut self, of_frame: bool, location: &str) {
        self.hasher.update(b"\x03");
        self.hasher.update(location.as_bytes());
        let Some(current) = self.current.as_ref() else {
            return;
        };
        // The location of a frame past the kept ones, or of `created by`, only feeds the hash.
        if of_frame && current.kept > 0 && current.total as usize <= self.max_frames {
            let frame = &mut self.frames[current.kept - 1];
            frame.location.push_str(clip(location, self.max_symbol_len));
        }
    }

    fn finish(&mut self, cut: bool, sink: &mut impl GoroutineSink) {
        let Some(current) = self.current.take() else {
            return;
        };
        let waiting_for_location = current.expect != Expect::FunctionOrEnd;
        if cut || waiting_for_location || current.total == 0 {
            self.stats.truncated_goroutines += 1;
        }
        let goroutine = Goroutine {
            id: current.id,
            state: &current.state,
            wait_minutes: current.wait_minutes,
            locked_to_thread: current.locked_to_thread,
            frames: &self.frames[..current.kept],
            frames_total: current.total,
            elided: current.elided,
            created_by: current.created_by.as_deref(),
            stack_hash: self.hasher.digest128(),
        };
        sink.goroutine(&goroutine);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Header<'a> {
    pub id: u64,
    pub state: &'a str,
    pub wait_minutes: u64,
    pub locked_to_thread: bool,
}

/// `goroutine 1 [chan receive, 5 minutes, locked to thread]:`. Newer runtimes may put fields
/// between the id and the bracket (`gp=0x... m=nil`) and further items inside it; both are
/// tolerated.
pub(crate) fn parse_header(line: &str) -> Option<Header<'_>> {
    let rest = line.strip_prefix("goroutine ")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let id = rest[..digits].parse().ok()?;
    let rest = &rest[digits..];
    let open = rest.find('[')?;
    if !rest[..open].is_empty() && !rest[..open].starts_with(' ') {
        return None;
    }
    let inner = rest[open + 1..].strip_suffix("]:")?;
    let mut items = inner.split(", ");
    let state = items.next()?.trim();
    let state = state.strip_suffix(" (scan)").unwrap_or(state);
    if state.is_empty() || state.contains(['[', ']']) {
        return None;
    }
    let mut header = Header {
        id,
        state,
        wait_minutes: 0,
        locked_to_thread: false,
    };
    for item in items {
        if let Some(minutes) = item.strip_suffix(" minutes") {
            header.wait_minutes = minutes.trim().parse().ok()?;
        } else if item == "locked to thread" {
            header.locked_to_thread = true;
        }
    }
    Some(header)
}

/// `pkg.(*T).method.func1(0xc000517380, {0x..., 0x17}, ...)` → `pkg.(*T).method.func1`.
///
/// The argument list is the last balanced `(...)` of the line; receivers like `(*T)` and type
/// parameters like `[...]` come before it and are kept.
pub(crate) fn normalise_function(line: &str) -> Option<&str> {
    if !line.ends_with(')') {
        return None;
    }
    let mut depth = 0usize;
    for (i, byte) in line.bytes().enumerate().rev() {
        match byte {
            b')' => depth += 1,
            b'(' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return valid_symbol(&line[..i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// `created by pkg.f in goroutine 7` (Go 1.21+) or `created by pkg.f`.
fn normalise_creator(rest: &str) -> Option<&str> {
    let rest = rest.trim();
    let name = match rest.rsplit_once(" in goroutine ") {
        Some((name, id)) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => rest,
    };
    valid_symbol(name)
}

fn valid_symbol(name: &str) -> Option<&str> {
    (!name.is_empty() && !name.contains(char::is_whitespace)).then_some(name)
}

/// `\t/path/to/file.go:123 +0x1a` → `/path/to/file.go:123`. Also accepts inlined frames (no
/// offset), `fp=`/`sp=`/`pc=` suffixes of system tracebacks, and space indentation from
/// copy-pasted dumps.
pub(crate) fn parse_location(line: &str) -> Option<&str> {
    let mut location = line.trim();
    for cut in [" +0x", " fp="] {
        if let Some(at) = location.find(cut) {
            location = &location[..at];
        }
    }
    let (file, number) = location.rsplit_once(':')?;
    let valid =
        !file.is_empty() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    valid.then_some(location)
}

/// At most `max` bytes of `text`, cut on a character boundary.
pub(crate) fn clip(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let h = parse_header("goroutine 1 [chan receive, 5 minutes]:");
        assert_eq!(
            h,
            Some(Header {
                id: 1,
                state: "chan receive",
                wait_minutes: 5,
                locked_to_thread: false
            })
        );
        let h = parse_header("goroutine 17 [syscall, 91275 minutes, locked to thread]:").unwrap();
        assert_eq!(
            (h.state, h.wait_minutes, h.locked_to_thread),
            ("syscall", 91275, true)
        );
        let h =
            parse_header("goroutine 9 gp=0xc000007a40 m=nil [sync.Mutex.Lock (scan)]:").unwrap();
        assert_eq!((h.id, h.state), (9, "sync.Mutex.Lock"));
        let h = parse_header("goroutine 3 [select, 2 minutes, synctest bubble 1]:").unwrap();
        assert_eq!(h.wait_minutes, 2);
        for bad in [
            "goroutine x [running]:",
            "goroutine 1 [running]",
            "goroutine 1 []:",
            "goroutine 1 [chan receive, many minutes]:",
            "goroutine 99999999999999999999999 [running]:",
            "goroutine 1x [running]:",
        ] {
            assert_eq!(parse_header(bad), None, "{bad}");
        }
    }

    #[test]
    fn function_names_lose_their_arguments_only() {
        let cases = [
            (
                "main.(*DaemonCli).start(0xc000517380, 0xc0000a4f00)",
                "main.(*DaemonCli).start",
            ),
            ("main.runDaemon(...)", "main.runDaemon"),
            (
                "main.newDaemonCommand.func1(0xc0006e8600?, {0xc0000e0000?, 0xe?, 0xe?})",
                "main.newDaemonCommand.func1",
            ),
            (
                "github.com/docker/docker/pkg/signal.DumpStacks({0x7fff952eea6e, 0x17})",
                "github.com/docker/docker/pkg/signal.DumpStacks",
            ),
            ("os/signal.signal_recv()", "os/signal.signal_recv"),
            (
                "github.com/x/y.(*Cache[...]).Get.func2.3(0x1, {0x2, 0x3}, ...)",
                "github.com/x/y.(*Cache[...]).Get.func2.3",
            ),
            (
                "gopkg.in/yaml%2ev2.(*parser).parse(0xc0001)",
                "gopkg.in/yaml%2ev2.(*parser).parse",
            ),
            ("panic({0x55d1a0, 0xc000012345})", "panic"),
            (
                "main.F[go.shape.func(int)](0x1)",
                "main.F[go.shape.func(int)]",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(normalise_function(line), Some(want), "{line}");
        }
        for bad in ["no parens", "(0x1)", "a b(0x1)", "f(0x1", "f0x1)", ")"] {
            assert_eq!(normalise_function(bad), None, "{bad}");
        }
    }

    #[test]
    fn creators_and_locations() {
        assert_eq!(
            normalise_creator("net/http.(*Server).Serve in goroutine 7"),
            Some("net/http.(*Server).Serve")
        );
        assert_eq!(
            normalise_creator("os/signal.Notify.func1.1"),
            Some("os/signal.Notify.func1.1")
        );
        assert_eq!(normalise_creator("a b"), None);
        assert_eq!(
            parse_location("\t/usr/lib/go-1.19/src/runtime/sema.go:517 +0x14c"),
            Some("/usr/lib/go-1.19/src/runtime/sema.go:517")
        );
        assert_eq!(
            parse_location("\tdocker_unix.go:14"),
            Some("docker_unix.go:14")
        );
        assert_eq!(
            parse_location("\t/my dir/x.go:12 +0x1 fp=0xc0 sp=0xc1 pc=0x4"),
            Some("/my dir/x.go:12")
        );
        assert_eq!(
            parse_location("        /go/src/a.go:3 +0x9"),
            Some("/go/src/a.go:3")
        );
        for bad in ["\tno-line", "\tfile.go:", "\t:12", "\tfile.go:1a"] {
            assert_eq!(parse_location(bad), None, "{bad}");
        }
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("aé", 3), "aé");
    }
}
