//! Malformed, truncated and random inputs: always a result, never a panic, counts consistent.

mod triage_common;

use std::io::{BufReader, Cursor};
use std::path::Path;

use hangwatch::triage::{Triage, TriageLimits, WaitKind, analyze};
use triage_common::go_quote;

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dumps")
            .join(name),
    )
    .expect("fixture readable")
}

fn run(input: &[u8], limits: &TriageLimits) -> Triage {
    analyze(input, limits).expect("reading a slice cannot fail")
}

fn assert_consistent(t: &Triage, limits: &TriageLimits) {
    let grouped: u64 = t.buckets.iter().map(|b| b.count).sum();
    assert_eq!(grouped + t.overflow.goroutines, t.goroutines);
    assert_eq!(t.by_kind.values().sum::<u64>(), t.goroutines);
    assert!(t.blocked_goroutines <= t.goroutines);
    assert!(t.buckets.len() <= limits.max_buckets);
    assert!(
        t.buckets
            .iter()
            .all(|b| b.frames.len() <= limits.max_frames_per_stack)
    );
    assert!(!t.summary().contains('\n'));
    assert!(t.render_text().starts_with(&t.summary()));
    serde_json::to_string(t).expect("serialises");
}

/// Goroutine headers wholly inside `prefix`.
fn complete_headers(prefix: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(prefix);
    text.split('\n')
        .filter(|line| line.starts_with("goroutine ") && line.ends_with("]:"))
        .count() as u64
}

#[test]
fn a_dump_cut_at_every_byte_offset() {
    let dump = fixture_bytes("shim-runc-v2-start-blocked.txt");
    let limits = TriageLimits::default();
    let full = run(&dump, &limits);
    assert_eq!(full.goroutines, 7);
    assert_eq!(full.input.truncated_goroutines, 0);
    for cut in 0..dump.len() {
        let prefix = &dump[..cut];
        let t = run(prefix, &limits);
        assert_consistent(&t, &limits);
        assert_eq!(t.goroutines, complete_headers(prefix), "cut at {cut}");
        let mid_line = cut > 0 && dump[cut - 1] != b'\n';
        // Only the line the cut went through may fail to parse.
        assert!(
            t.input.malformed_lines <= u64::from(mid_line),
            "cut at {cut}"
        );
        assert!(t.input.truncated_goroutines <= 1, "cut at {cut}");
        let last_line = &prefix[prefix
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)..];
        if last_line.starts_with(b"\t") {
            // Cut inside a frame: the goroutine is still counted, and reported as cut short.
            assert_eq!(t.input.truncated_goroutines, 1, "cut at {cut}");
            assert!(t.summary().ends_with("[dump cut short]"), "cut at {cut}");
        }
    }
}

#[test]
fn an_embedded_dump_cut_at_every_byte_offset() {
    let dump = String::from_utf8(fixture_bytes("shim-runc-v2-start-blocked.txt")).expect("utf-8");
    let log = format!(
        "time=\"2026-11-23T00:08:48Z\" level=info msg={} runtime=io.containerd.runc.v2\n",
        go_quote(&format!(
            "=== BEGIN goroutine stack dump ===\n{dump}\n=== END goroutine stack dump ==="
        ))
    );
    let limits = TriageLimits::default();
    let full = run(log.as_bytes(), &limits);
    assert_eq!((full.goroutines, full.input.embedded_dumps), (7, 1));
    let mut previous = 0;
    for cut in 0..log.len() {
        let t = run(&log.as_bytes()[..cut], &limits);
        assert_consistent(&t, &limits);
        assert!(
            t.goroutines >= previous,
            "goroutines only appear as the cut moves on"
        );
        assert!(t.goroutines <= 7);
        previous = t.goroutines;
    }
    assert_eq!(previous, 7);
}

#[test]
fn malformed_lines_are_counted_and_goroutines_kept() {
    let input = "\
goroutine 1 [chan receive, 3 minutes]:
main.main()
garbage inside a goroutine
\t/src/main.go:10 +0x1
\tstray location line
main.helper(0x1
created by
\tnot-a-location

goroutine oops [running]:
goroutine 2 [select]:
sync.(*Mutex).Lock(0xc000012345)
main.locked()
\t/src/main.go:20 +0x2
";
    let limits = TriageLimits::default();
    let t = run(input.as_bytes(), &limits);
    assert_consistent(&t, &limits);
    assert_eq!(t.goroutines, 2);
    // "garbage" (where a location belongs), the location after it, the stray location, the
    // unbalanced function, the empty creator, its bad location, the bad header, and
    // `main.locked()` where the Lock frame's location belongs (still read as a frame).
    assert_eq!(t.input.malformed_lines, 8);
    assert_eq!(t.input.other_lines, 0);
    assert_eq!(
        t.buckets
            .iter()
            .find(|b| b.example_ids == [2])
            .map(|b| b.kind),
        Some(WaitKind::Lock)
    );
}

#[test]
fn text_around_dumps_is_not_malformed() {
    let input = "\
Nov 23 00:08:48 node dockerd[2170]: level=info msg=\"Processing signal 'user defined signal 1'\"
SIGQUIT: quit
PC=0x46b2a1 m=0 sigcode=0

goroutine 1 [running]:
main.main()
\t/src/main.go:10 +0x1
";
    let limits = TriageLimits::default();
    let t = run(input.as_bytes(), &limits);
    assert_eq!(
        (t.goroutines, t.input.malformed_lines, t.input.other_lines),
        (1, 0, 3)
    );
}

#[test]
fn binary_and_invalid_utf8_input() {
    let mut input = b"goroutine 1 [running]:\nmain.\xff\xfe()\n\t/src/\xc3.go:1 +0x1\n".to_vec();
    input.extend((0..=255u8).cycle().take(10_000));
    let limits = TriageLimits::default();
    let t = run(&input, &limits);
    assert_consistent(&t, &limits);
    assert!(t.goroutines >= 1);
}

#[test]
fn long_lines_are_cut_and_counted() {
    let mut input = b"goroutine 1 [select, 9 minutes]:\nmain.f(".to_vec();
    input.extend(std::iter::repeat_n(b'7', 1 << 20));
    input.extend_from_slice(
        b")\n\t/src/main.go:1 +0x1\n\ngoroutine 2 [running]:\nmain.g()\n\t/src/main.go:2\n",
    );
    let limits = TriageLimits::default();
    let t = run(&input, &limits);
    assert_consistent(&t, &limits);
    assert_eq!(t.goroutines, 2);
    assert_eq!(t.input.truncated_lines, 1);
    assert_eq!(
        t.input.malformed_lines, 2,
        "the cut frame and its orphaned location"
    );
}

#[test]
fn empty_input() {
    let limits = TriageLimits::default();
    let t = run(b"", &limits);
    assert_eq!(t.goroutines, 0);
    assert_eq!(t.summary(), "unknown daemon: no goroutines found");
}

/// Deterministic xorshift64*, so CI runs the same cases every time without extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&[u8]] = &[
    b"goroutine 7 [",
    b"]:\n",
    b", 12 minutes",
    b", locked to thread",
    b"created by ",
    b" in goroutine 3",
    b"...additional frames elided...\n",
    b"\t/src/x.go:1 +0x1\n",
    b"(0xc000012345, {0x1, 0x2})\n",
    b"\"=== BEGIN goroutine stack dump ===",
    b"=== END goroutine stack dump ===",
    b"\\n",
    b"\\t",
    b"\\\"",
    b"\\u00e9",
    b"\\x4",
    b"\"",
    b"\n\n",
    b"(",
    b")",
    b"sync.(*Mutex).Lock",
    b"google.golang.org/grpc.invoke",
    b"github.com/containerd/ttrpc.(*Client).Call",
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(input.len() + 1);
        match rng.below(5) {
            0 if !input.is_empty() => {
                let at = at.min(input.len() - 1);
                input[at] = rng.next() as u8;
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, token.iter().copied());
            }
            2 => {
                let end = (at + rng.below(64)).min(input.len());
                input.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(256)).min(input.len());
                let copy = input[at..end].to_vec();
                let to = rng.below(input.len() + 1);
                input.splice(to..to, copy);
            }
            _ => input.truncate(at),
        }
    }
}

#[test]
fn random_mutations_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        "goroutine-stacks-2026-11-23T000848Z.log",
        "containerd.3562.stacks.log",
        "shim-runc-v2-start-blocked.txt",
    ]
    .iter()
    .map(|name| fixture_bytes(name))
    .chain(std::iter::once(
        format!(
            "msg={}\n",
            go_quote(&String::from_utf8_lossy(&fixture_bytes(
                "shim-runc-v2-start-blocked.txt"
            )))
        )
        .into_bytes(),
    ))
    .collect();
    let mut rng = Rng(0x5eed_0002);
    for round in 0..1500 {
        let mut input = seeds[round % seeds.len()].clone();
        let window = rng.below(input.len());
        input.drain(..window.min(input.len().saturating_sub(4096)));
        mutate(&mut rng, &mut input);
        let limits = TriageLimits {
            max_line_len: 8 + rng.below(200),
            max_buckets: 1 + rng.below(8),
            max_frames_per_stack: 1 + rng.below(6),
            max_symbol_len: 16 + rng.below(64),
            max_example_ids: rng.below(3),
            max_dumps: rng.below(3),
        };
        let whole = run(&input, &limits);
        assert_consistent(&whole, &limits);
        let chunk = 1 + rng.below(16);
        let chunked = analyze(
            BufReader::with_capacity(chunk, Cursor::new(&input)),
            &limits,
        )
        .expect("reads");
        assert_eq!(chunked, whole, "round {round}: chunking changed the result");
    }
}
