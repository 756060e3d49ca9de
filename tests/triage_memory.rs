//! Triage streams: 100 MB of input (a generated dump, one 100 MB line, a 100 MB log line with
//! an embedded dump) goes through with a small, fixed peak heap. A counting global allocator
//! measures the peak; buffering the input would exceed the bound many times over.

mod triage_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, BufReader, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use hangwatch::triage::{TriageLimits, analyze};
use triage_common::GeneratedDump;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            let now = if new_size >= layout.size() {
                CURRENT.fetch_add(new_size - layout.size(), Ordering::SeqCst) + new_size
                    - layout.size()
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::SeqCst)
                    - (layout.size() - new_size)
            };
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests in this binary measure one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const HUNDRED_MB: u64 = 100 * 1024 * 1024;
const PEAK_LIMIT: usize = 16 * 1024 * 1024;

/// Runs `f` and returns its result with the heap growth at its peak.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let _guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(base);
    eprintln!("peak heap growth: {peak} bytes");
    (out, peak)
}

#[test]
fn the_allocator_sees_buffering() {
    let (len, peak) = peak_during(|| {
        let mut all = Vec::new();
        GeneratedDump::new(32 * 1024 * 1024)
            .read_to_end(&mut all)
            .expect("generated");
        all.len()
    });
    assert!(len >= 32 * 1024 * 1024);
    assert!(peak >= len, "a buffered input would show: peak {peak}");
}

#[test]
fn a_100_mb_dump_streams_in_small_memory() {
    let ((triage, produced), peak) = peak_during(|| {
        let mut dump = GeneratedDump::new(HUNDRED_MB);
        let triage = analyze(BufReader::new(&mut dump), &TriageLimits::default()).expect("analyze");
        (triage, dump.goroutines())
    });
    assert!(triage.input.bytes >= HUNDRED_MB);
    assert_eq!(triage.goroutines, produced);
    assert!(triage.goroutines > 100_000);
    assert_eq!(triage.input.malformed_lines, 0);
    assert!(triage.blocked_goroutines > 0);
    assert!(peak < PEAK_LIMIT, "peak heap {peak} bytes");
}

#[test]
fn a_100_mb_line_without_newline_streams_in_small_memory() {
    let (triage, peak) = peak_during(|| {
        let line = io::repeat(b'x').take(HUNDRED_MB);
        analyze(BufReader::new(line), &TriageLimits::default()).expect("analyze")
    });
    assert_eq!(triage.input.bytes, HUNDRED_MB);
    assert_eq!((triage.input.lines, triage.input.truncated_lines), (1, 1));
    assert_eq!(triage.goroutines, 0);
    assert!(peak < PEAK_LIMIT, "peak heap {peak} bytes");
}

#[test]
fn a_100_mb_log_line_with_an_embedded_dump_streams_in_small_memory() {
    let ((triage, produced), peak) = peak_during(|| {
        let mut log = GeneratedDump::embedded(HUNDRED_MB);
        let triage = analyze(BufReader::new(&mut log), &TriageLimits::default()).expect("analyze");
        (triage, log.goroutines())
    });
    assert_eq!(triage.input.embedded_dumps, 1);
    assert_eq!(triage.goroutines, produced);
    assert_eq!(triage.input.malformed_lines, 0);
    assert!(peak < PEAK_LIMIT, "peak heap {peak} bytes");
}
