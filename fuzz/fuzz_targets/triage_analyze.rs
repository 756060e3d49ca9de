//! Feeds arbitrary bytes to the goroutine-dump triage. The first byte picks small limits and
//! a read chunk size, so caps, truncation and chunk boundaries are all exercised.
#![no_main]

use std::io::BufReader;

use hangwatch::triage::{TriageLimits, analyze};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, input)) = data.split_first() else {
        return;
    };
    let limits = TriageLimits {
        max_line_len: 1 + usize::from(shape & 0x3f) * 4,
        max_buckets: 1 + usize::from(shape >> 6) * 3,
        max_frames_per_stack: 1 + usize::from(shape % 5),
        max_symbol_len: 16,
        max_example_ids: 2,
        max_dumps: 2,
    };
    let chunk = 1 + usize::from(shape % 7);
    let chunked =
        analyze(BufReader::with_capacity(chunk, input), &limits).expect("reading a slice");
    let whole = analyze(input, &limits).expect("reading a slice");
    assert_eq!(
        chunked, whole,
        "the result must not depend on how the input is chunked"
    );

    let grouped: u64 = whole.buckets.iter().map(|b| b.count).sum();
    assert_eq!(grouped + whole.overflow.goroutines, whole.goroutines);
    assert!(whole.blocked_goroutines <= whole.goroutines);
    assert!(whole.buckets.len() <= limits.max_buckets);
    for bucket in &whole.buckets {
        assert!(bucket.frames.len() <= limits.max_frames_per_stack);
        assert!(bucket.anchor < bucket.frames.len().max(1));
    }
    assert!(!whole.summary().contains('\n'));
    let _ = whole.render_text();
    serde_json::to_string(&whole).expect("serialises");
});
