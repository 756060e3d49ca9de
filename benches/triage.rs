//! Throughput of goroutine-dump triage, in MB/s: `cargo bench --bench triage`.
//!
//! Inputs are built in memory first, so only parsing, bucketing and the report are timed:
//! the real fixtures concatenated (repeated to a sizeable input), a generated dockerd-like
//! dump, and the same dump escaped into one containerd log line.

#[path = "../tests/triage_common/mod.rs"]
mod triage_common;

use std::hint::black_box;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use hangwatch::triage::{TriageLimits, analyze};
use triage_common::GeneratedDump;

const FIXTURES: &[&str] = &[
    "goroutine-stacks-2026-11-23T000323Z.log",
    "goroutine-stacks-2026-11-23T000848Z.log",
    "containerd.3562.stacks.log",
];
const TARGET: usize = 64 * 1024 * 1024;
const RUNS: usize = 5;

fn fixtures_concatenated() -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dumps");
    let mut once = Vec::new();
    for name in FIXTURES {
        once.extend(std::fs::read(dir.join(name)).expect("fixture readable"));
        once.extend_from_slice(b"\n\n");
    }
    let mut all = Vec::with_capacity(TARGET + once.len());
    while all.len() < TARGET {
        all.extend_from_slice(&once);
    }
    all
}

fn generated(mut dump: GeneratedDump) -> Vec<u8> {
    let mut all = Vec::with_capacity(TARGET + 4096);
    dump.read_to_end(&mut all).expect("generated");
    all
}

fn measure(name: &str, input: &[u8]) {
    let limits = TriageLimits::default();
    let mut best = f64::INFINITY;
    let mut goroutines = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let triage = analyze(black_box(input), &limits).expect("reading memory");
        black_box(triage.render_text());
        best = best.min(start.elapsed().as_secs_f64());
        goroutines = triage.goroutines;
    }
    let mb = input.len() as f64 / 1e6;
    println!(
        "{name:<34} {mb:>7.1} MB  {goroutines:>8} goroutines  best of {RUNS}: {best:.3} s  {:>6.0} MB/s",
        mb / best
    );
}

fn main() {
    measure("real fixtures, concatenated", &fixtures_concatenated());
    measure(
        "generated dump",
        &generated(GeneratedDump::new(TARGET as u64)),
    );
    measure(
        "generated dump in a log line",
        &generated(GeneratedDump::embedded(TARGET as u64)),
    );
}
