//! Ranking, the one-line verdict and the text report.

use std::cmp::Reverse;
use std::fmt::Write as _;

use super::bucket::Aggregated;
use super::classify::{WaitKind, key, short_function};
use super::{Bucket, Daemon, InputStats, Ranking, Triage};

/// Blocked buckets shown in the text report.
const SHOWN_BUCKETS: usize = 5;
/// Frames shown per bucket, from its anchor.
const SHOWN_FRAMES: usize = 5;
/// Clauses in the summary line.
const SUMMARY_CLAUSES: usize = 3;
const MAX_LOCK_HOLDERS: usize = 3;

pub(crate) fn finish(aggregated: Aggregated, input: InputStats) -> Triage {
    let Aggregated {
        mut buckets,
        dumps,
        dumps_total,
        dump_daemons,
        overflow,
        goroutines,
        by_kind,
    } = aggregated;

    // Stable: equal buckets keep first-seen order.
    buckets.sort_by_key(|b| {
        (
            !b.kind.is_blocked(),
            Reverse(b.count),
            Reverse(b.wait_minutes.max),
        )
    });
    for (id, bucket) in buckets.iter_mut().enumerate() {
        bucket.id = id;
    }
    let blocked: Vec<usize> = buckets
        .iter()
        .filter(|b| b.kind.is_blocked())
        .map(|b| b.id)
        .collect();
    let mut by_wait = blocked.clone();
    by_wait.sort_by_key(|&id| {
        (
            Reverse(buckets[id].wait_minutes.max),
            Reverse(buckets[id].count),
        )
    });
    let holders: Vec<Vec<usize>> = buckets.iter().map(|b| lock_holders(b, &buckets)).collect();
    for (bucket, holders) in buckets.iter_mut().zip(holders) {
        bucket.possible_lock_holders = holders;
    }

    let daemon = match dump_daemons.as_slice() {
        [] => Daemon::Unknown,
        [one] => *one,
        _ => Daemon::Mixed,
    };
    let blocked_goroutines = by_kind
        .iter()
        .filter(|(kind, _)| kind.is_blocked())
        .map(|(_, n)| n)
        .sum();
    let mut triage = Triage {
        daemon,
        summary: String::new(),
        goroutines,
        blocked_goroutines,
        by_kind,
        dumps,
        dumps_total,
        buckets,
        ranking: Ranking {
            by_count: blocked,
            by_wait,
        },
        overflow,
        input,
    };
    triage.summary = summary_line(&triage, &dump_daemons);
    triage
}

/// Blocked buckets (other than lock waits) whose stacks pass through the function that waits
/// for `bucket`'s lock: that function likely took the lock there and is stuck holding it.
fn lock_holders(bucket: &Bucket, all: &[Bucket]) -> Vec<usize> {
    let (WaitKind::Lock, Some(site)) = (bucket.kind, bucket.site.as_deref()) else {
        return Vec::new();
    };
    all.iter()
        .filter(|b| b.kind.is_blocked() && b.kind != WaitKind::Lock)
        .filter(|b| b.frames.iter().any(|f| key(&f.function) == site))
        .map(|b| b.id)
        .take(MAX_LOCK_HOLDERS)
        .collect()
}

fn minutes(m: u64) -> String {
    if m == 0 {
        "<1 min".to_string()
    } else {
        format!("{m} min")
    }
}

fn wait_range(bucket: &Bucket) -> String {
    let range = bucket.wait_minutes;
    if range.min == range.max {
        minutes(range.max)
    } else if range.min == 0 {
        format!("<1–{} min", range.max)
    } else {
        format!("{}–{} min", range.min, range.max)
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Blocked buckets that tell one story: all calls into the same layer, or all waits on locks
/// (or in requests) at the same site.
struct Group<'a> {
    kind: WaitKind,
    site: Option<&'a str>,
    detail: Option<&'a str>,
    transport: Option<&'a str>,
    count: u64,
    max_wait: u64,
    holder_kind: Option<WaitKind>,
}

fn groups(triage: &Triage) -> Vec<Group<'_>> {
    let mut groups: Vec<Group<'_>> = Vec::new();
    for &id in &triage.ranking.by_count {
        let bucket = &triage.buckets[id];
        let per_site = matches!(bucket.kind, WaitKind::Lock | WaitKind::Request);
        let site = if per_site {
            bucket.site.as_deref()
        } else {
            None
        };
        let holder_kind = bucket
            .possible_lock_holders
            .first()
            .map(|&h| triage.buckets[h].kind);
        match groups
            .iter_mut()
            .find(|g| g.kind == bucket.kind && g.site == site)
        {
            Some(group) => {
                group.count += bucket.count;
                group.max_wait = group.max_wait.max(bucket.wait_minutes.max);
                if group.detail != bucket.detail.as_deref() {
                    group.detail = None;
                }
                if group.transport != transport(bucket.detail.as_deref()) {
                    group.transport = None;
                }
                group.holder_kind = group.holder_kind.or(holder_kind);
            }
            None => groups.push(Group {
                kind: bucket.kind,
                site,
                detail: bucket.detail.as_deref(),
                transport: transport(bucket.detail.as_deref()),
                count: bucket.count,
                max_wait: bucket.wait_minutes.max,
                holder_kind,
            }),
        }
    }
    // Waits on the layer below come first: they usually explain the lock waits above them.
    groups.sort_by_key(|g| (!is_layer(g.kind), Reverse(g.count), Reverse(g.max_wait)));
    groups
}

/// `grpc` / `ttrpc` from a detail like `leases.Create (grpc)`.
fn transport(detail: Option<&str>) -> Option<&str> {
    let inner = detail?.rsplit_once(" (")?.1.strip_suffix(')')?;
    matches!(inner, "grpc" | "ttrpc").then_some(inner)
}

fn is_layer(kind: WaitKind) -> bool {
    matches!(kind, WaitKind::Containerd | WaitKind::Shim | WaitKind::Runc)
}

fn layer_phrase(kind: WaitKind) -> &'static str {
    match kind {
        WaitKind::Containerd => "calling containerd",
        WaitKind::Shim => "calling the shim",
        WaitKind::Runc => "waiting on runc",
        _ => "waiting",
    }
}

fn clause(group: &Group<'_>) -> String {
    let n = group.count;
    let site = group.site.map(short_function).unwrap_or("unknown code");
    let mut text = match group.kind {
        WaitKind::Containerd | WaitKind::Shim => {
            let via = group
                .transport
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            format!(
                "{} blocked {}{via}",
                plural(n, "goroutine"),
                layer_phrase(group.kind)
            )
        }
        WaitKind::Runc => format!("{} waiting on runc", plural(n, "goroutine")),
        WaitKind::Lock => format!(
            "{n} waiting on {} in {site}",
            group.detail.unwrap_or("a lock")
        ),
        _ => format!("{} waiting in {site}", plural(n, "request")),
    };
    if group.max_wait == 0 {
        text.push_str(" for <1 min");
    } else {
        let _ = write!(text, " for up to {} min", group.max_wait);
    }
    if let Some(holder) = group.holder_kind {
        let _ = write!(text, " (holder likely {})", layer_phrase(holder));
    }
    text
}

fn daemon_label(daemons: &[Daemon]) -> String {
    if daemons.is_empty() {
        return Daemon::Unknown.name().to_string();
    }
    daemons
        .iter()
        .map(|d| d.name())
        .collect::<Vec<_>>()
        .join("+")
}

fn summary_line(triage: &Triage, daemons: &[Daemon]) -> String {
    let label = daemon_label(daemons);
    let mut line = if triage.goroutines == 0 {
        format!("{label}: no goroutines found")
    } else {
        let groups = groups(triage);
        if groups.is_empty() {
            format!(
                "{label}: nothing blocked ({} idle, waiting by design or running)",
                plural(triage.goroutines, "goroutine")
            )
        } else {
            let clauses: Vec<String> = groups.iter().take(SUMMARY_CLAUSES).map(clause).collect();
            let mut line = format!("{label}: {}", clauses.join("; "));
            if groups.len() > SUMMARY_CLAUSES {
                let more = (groups.len() - SUMMARY_CLAUSES) as u64;
                let _ = write!(
                    line,
                    "; +{more} more blocked {}",
                    if more == 1 { "group" } else { "groups" }
                );
            }
            line
        }
    };
    if triage.input.truncated_goroutines > 0 {
        line.push_str(" [dump cut short]");
    }
    line
}

/// `/build/.../daemon/start.go:181` → `daemon/start.go:181`.
fn short_location(location: &str) -> &str {
    let mut cut = location.len();
    for _ in 0..2 {
        match location[..cut].rfind('/') {
            Some(at) => cut = at,
            None => return location,
        }
    }
    &location[cut + 1..]
}

fn kind_label(bucket: &Bucket) -> String {
    let kind = match bucket.kind {
        WaitKind::Lock => "lock",
        WaitKind::Containerd => "containerd",
        WaitKind::Shim => "shim",
        WaitKind::Runc => "runc",
        WaitKind::Request => "request",
        WaitKind::Stream => "by design",
        WaitKind::Idle => "idle",
        WaitKind::Running => "running",
        WaitKind::Other => "other",
    };
    match &bucket.detail {
        Some(detail) => format!("{kind}: {detail}"),
        None => kind.to_string(),
    }
}

pub(crate) fn render_text(triage: &Triage) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", triage.summary);
    let count = |kinds: &[WaitKind]| -> u64 {
        kinds
            .iter()
            .map(|k| triage.by_kind.get(k).copied().unwrap_or(0))
            .sum()
    };
    let _ = writeln!(
        out,
        "{} in {}: {} blocked, {} idle or waiting by design, {} running, {} other",
        plural(triage.goroutines, "goroutine"),
        plural(triage.dumps_total, "dump"),
        triage.blocked_goroutines,
        count(&[WaitKind::Idle, WaitKind::Stream]),
        count(&[WaitKind::Running]),
        count(&[WaitKind::Other]),
    );
    for &id in triage.ranking.by_count.iter().take(SHOWN_BUCKETS) {
        render_bucket(&mut out, &triage.buckets[id]);
    }
    let hidden_longest: Vec<String> = triage
        .ranking
        .by_wait
        .iter()
        .take(SHOWN_BUCKETS)
        .filter(|id| {
            !triage
                .ranking
                .by_count
                .iter()
                .take(SHOWN_BUCKETS)
                .any(|s| s == *id)
        })
        .map(|&id| format!("#{id} ({})", minutes(triage.buckets[id].wait_minutes.max)))
        .collect();
    if !hidden_longest.is_empty() {
        let _ = writeln!(out, "Also waiting long: {}", hidden_longest.join(", "));
    }
    if triage.overflow.goroutines > 0 {
        let _ = writeln!(
            out,
            "{} with further distinct stacks not grouped (bucket limit reached)",
            plural(triage.overflow.goroutines, "goroutine")
        );
    }
    let input = &triage.input;
    let _ = writeln!(
        out,
        "Input: {} bytes, {} lines; {} malformed, {} cut at the line limit, {} cut short",
        input.bytes,
        input.lines,
        plural(input.malformed_lines, "line"),
        plural(input.truncated_lines, "line"),
        plural(input.truncated_goroutines, "goroutine"),
    );
    out
}

fn render_bucket(out: &mut String, bucket: &Bucket) {
    let _ = writeln!(
        out,
        "#{} {} × {} [{}, {}]{}",
        bucket.id,
        bucket.count,
        kind_label(bucket),
        bucket.state,
        wait_range(bucket),
        bucket
            .site
            .as_deref()
            .map(|s| format!(" in {}", short_function(s)))
            .unwrap_or_default(),
    );
    let shown = bucket.frames.iter().skip(bucket.anchor).take(SHOWN_FRAMES);
    for frame in shown {
        let _ = writeln!(
            out,
            "    {}  {}",
            short_function(&frame.function),
            short_location(&frame.location)
        );
    }
    let below = bucket.frames_total as usize
        - (bucket.anchor + SHOWN_FRAMES).min(bucket.frames_total as usize);
    if below > 0 || bucket.anchor > 0 {
        let _ = writeln!(
            out,
            "    ({} above, {} below)",
            plural(bucket.anchor as u64, "frame"),
            plural(below as u64, "frame")
        );
    }
    if !bucket.possible_lock_holders.is_empty() {
        let ids: Vec<String> = bucket
            .possible_lock_holders
            .iter()
            .map(|id| format!("#{id}"))
            .collect();
        let _ = writeln!(out, "    likely lock holder: {}", ids.join(", "));
    }
    let ids: Vec<String> = bucket.example_ids.iter().map(u64::to_string).collect();
    let _ = writeln!(out, "    goroutines {}", ids.join(", "));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(minutes(0), "<1 min");
        assert_eq!(minutes(7), "7 min");
        assert_eq!(plural(1, "dump"), "1 dump");
        assert_eq!(plural(2, "dump"), "2 dumps");
        assert_eq!(transport(Some("leases.Create (grpc)")), Some("grpc"));
        assert_eq!(transport(Some("go-runc (*Runc).Start")), None);
        assert_eq!(
            short_location("/a/b/daemon/start.go:181"),
            "daemon/start.go:181"
        );
        assert_eq!(short_location("start.go:1"), "start.go:1");
        assert_eq!(
            daemon_label(&[Daemon::Containerd, Daemon::Shim]),
            "containerd+shim"
        );
    }
}
