//! Triage of real dumps (dockerd 20.10 and containerd 1.6.20 captured on this kind of machine),
//! of a dump shaped like seed incident 002, and of dumps embedded in containerd's log.

mod triage_common;

use std::io::{BufReader, Cursor};
use std::path::{Path, PathBuf};

use hangwatch::triage::{Daemon, Triage, TriageLimits, WaitKind, analyze, analyze_file};
use triage_common::go_quote;

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dumps")
        .join(name)
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).expect("fixture readable")
}

fn fixture(name: &str) -> Triage {
    analyze_file(&fixture_path(name), &TriageLimits::default()).expect("fixture triaged")
}

const IDLE_DOCKERD: &str = "goroutine-stacks-2026-11-23T000323Z.log";
const BLOCKED_DOCKERD: &str = "goroutine-stacks-2026-11-23T000848Z.log";
const CONTAINERD: &str = "containerd.3562.stacks.log";
const SEED_002: &str = "seed002-dockerd-17.03-blocked-on-containerd.log";
const SHIM: &str = "shim-runc-v2-start-blocked.txt";

fn kind_count(triage: &Triage, kind: WaitKind) -> u64 {
    triage.by_kind.get(&kind).copied().unwrap_or(0)
}

fn assert_clean_input(triage: &Triage) {
    assert_eq!(triage.input.malformed_lines, 0);
    assert_eq!(triage.input.truncated_lines, 0);
    assert_eq!(triage.input.truncated_goroutines, 0);
}

#[test]
fn idle_dockerd_has_nothing_blocked() {
    let t = fixture(IDLE_DOCKERD);
    assert_clean_input(&t);
    assert_eq!(t.daemon, Daemon::Dockerd);
    assert_eq!(t.goroutines, 37);
    assert_eq!(t.blocked_goroutines, 0);
    assert!(t.ranking.by_count.is_empty() && t.ranking.by_wait.is_empty());
    assert_eq!(
        kind_count(&t, WaitKind::Running),
        1,
        "the goroutine writing the dump"
    );
    assert_eq!(
        t.summary(),
        "dockerd: nothing blocked (37 goroutines idle, waiting by design or running)"
    );
    let main = t
        .buckets
        .iter()
        .find(|b| b.frames[0].function == "main.(*DaemonCli).start")
        .expect("main goroutine");
    assert_eq!(
        (main.kind, main.state.as_str()),
        (WaitKind::Idle, "chan receive")
    );
    // containerd's event stream is a long wait by design, not a hang.
    let events = t
        .buckets
        .iter()
        .filter(|b| b.detail.as_deref() == Some("eventsSubscribe.Recv (grpc)"))
        .count();
    assert_eq!(events, 2);
    assert!(t.buckets.iter().all(|b| b.daemons == vec![Daemon::Dockerd]));
}

#[test]
fn blocked_dockerd_shows_calls_into_stopped_containerd() {
    let t = fixture(BLOCKED_DOCKERD);
    assert_clean_input(&t);
    assert_eq!(t.daemon, Daemon::Dockerd);
    assert_eq!(t.goroutines, 48);
    assert_eq!(t.blocked_goroutines, 2);
    let blocked: Vec<_> = t
        .ranking
        .by_count
        .iter()
        .map(|&id| &t.buckets[id])
        .collect();
    assert_eq!(blocked.len(), 2);
    let mut calls: Vec<_> = blocked
        .iter()
        .map(|b| {
            assert_eq!(b.kind, WaitKind::Containerd);
            assert_eq!(b.state, "select");
            assert_eq!(b.count, 1);
            // Captured seconds after containerd was stopped: Go prints no minutes yet.
            assert_eq!((b.wait_minutes.min, b.wait_minutes.max), (0, 0));
            (
                b.example_ids[0],
                b.detail.clone().unwrap_or_default(),
                b.site.clone().unwrap_or_default(),
            )
        })
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        vec![
            (
                158,
                "leases.Create (grpc)".to_string(),
                "github.com/docker/docker/libcontainerd/remote.(*client).Create".to_string()
            ),
            (
                162,
                "containers.Get (grpc)".to_string(),
                "github.com/docker/docker/libcontainerd/remote.(*client).getContainer".to_string()
            ),
        ]
    );
    let stop = blocked
        .iter()
        .find(|b| b.example_ids == [162])
        .expect("stop call");
    let anchor = &stop.frames[stop.anchor];
    assert_eq!(
        anchor.function,
        "github.com/containerd/containerd/api/services/containers/v1.(*containersClient).Get"
    );
    assert!(
        anchor
            .location
            .ends_with("/api/services/containers/v1/containers.pb.go:681")
    );
    assert!(
        stop.frames
            .iter()
            .any(|f| f.function == "github.com/docker/docker/daemon.(*Daemon).ContainerStop"),
        "the docker stop request is in the stack"
    );
    assert_eq!(
        t.summary(),
        "dockerd: 2 goroutines blocked calling containerd (grpc) for <1 min"
    );
    // The 5-minute waits in this dump are event streams and attach/wait requests.
    let long_waits: Vec<_> = t
        .buckets
        .iter()
        .filter(|b| b.wait_minutes.max == 5)
        .collect();
    assert!(!long_waits.is_empty());
    assert!(long_waits.iter().all(|b| !b.kind.is_blocked()));
    let text = t.render_text();
    assert!(
        text.contains("#0 1 × containerd: containers.Get (grpc) [select, <1 min]"),
        "{text}"
    );
    assert!(
        text.contains("v1.(*containersClient).Get  v1/containers.pb.go:681"),
        "{text}"
    );
}

#[test]
fn containerd_dump_is_recognised_and_idle() {
    let t = fixture(CONTAINERD);
    assert_clean_input(&t);
    assert_eq!(t.daemon, Daemon::Containerd);
    assert_eq!(t.goroutines, 36);
    assert_eq!(t.blocked_goroutines, 0);
    assert_eq!(kind_count(&t, WaitKind::Other), 0);
    let main = t
        .buckets
        .iter()
        .find(|b| b.example_ids.contains(&1))
        .expect("goroutine 1");
    assert_eq!(main.kind, WaitKind::Idle);
    assert_eq!(main.wait_minutes.max, 5);
}

#[test]
fn oom_storm_dump_names_containerd_and_the_lock() {
    let t = fixture(SEED_002);
    assert_clean_input(&t);
    assert_eq!(t.daemon, Daemon::Dockerd);
    assert_eq!(t.goroutines, 200);
    assert_eq!(t.blocked_goroutines, 193);
    assert_eq!(kind_count(&t, WaitKind::Lock), 160);
    assert_eq!(kind_count(&t, WaitKind::Containerd), 24);

    let ps = &t.buckets[t.ranking.by_count[0]];
    assert_eq!(ps.kind, WaitKind::Lock);
    assert_eq!(ps.count, 120);
    assert_eq!(ps.detail.as_deref(), Some("sync.Mutex"));
    assert_eq!(
        ps.site.as_deref(),
        Some("github.com/docker/docker/daemon.(*Daemon).reducePsContainer")
    );
    assert_eq!((ps.wait_minutes.min, ps.wait_minutes.max), (1, 2903));
    assert_eq!(ps.example_ids.len(), 5);

    let stop_waiters = &t.buckets[t.ranking.by_count[1]];
    assert_eq!(stop_waiters.count, 40);
    assert_eq!(
        stop_waiters.site.as_deref(),
        Some("github.com/docker/docker/daemon.(*Daemon).killWithSignal")
    );

    let holder = &t.buckets[t.ranking.by_count[2]];
    assert_eq!(holder.kind, WaitKind::Containerd);
    assert_eq!(holder.count, 24);
    assert_eq!(holder.detail.as_deref(), Some("api.Signal (grpc)"));
    assert_eq!(
        holder.site.as_deref(),
        Some("github.com/docker/docker/libcontainerd.(*client).Signal")
    );
    assert_eq!(
        (holder.wait_minutes.min, holder.wait_minutes.max),
        (1204, 2903)
    );
    assert_eq!(stop_waiters.possible_lock_holders, vec![holder.id]);
    assert!(
        ps.possible_lock_holders.is_empty(),
        "no stack shares reducePsContainer"
    );

    let request = &t.buckets[t.ranking.by_count[3]];
    assert_eq!((request.kind, request.count), (WaitKind::Request, 9));

    assert_eq!(t.buckets[t.ranking.by_wait[0]].wait_minutes.max, 2903);
    assert_eq!(
        t.summary(),
        "dockerd: 24 goroutines blocked calling containerd (grpc) for up to 2903 min; \
         120 waiting on sync.Mutex in daemon.(*Daemon).reducePsContainer for up to 2903 min; \
         40 waiting on sync.Mutex in daemon.(*Daemon).killWithSignal for up to 2902 min \
         (holder likely calling containerd); +1 more blocked group"
    );
    let text = t.render_text();
    assert!(text.starts_with(&t.summary()), "{text}");
    assert!(text.contains("likely lock holder: #2"), "{text}");
    assert!(text.lines().count() < 50, "readable in seconds:\n{text}");
}

/// containerd's own log, where its dump and the shims' dumps are escaped into one line each.
fn containerd_log(quote: fn(&str) -> String, shape: fn(&str) -> String) -> String {
    let dump = |text: &str| {
        format!("=== BEGIN goroutine stack dump ===\n{text}\n=== END goroutine stack dump ===")
    };
    let mut log = String::new();
    log.push_str(&shape("\"starting containerd\""));
    log.push_str(&shape(&quote(&dump(&fixture_text(CONTAINERD)))));
    log.push_str(&shape(
        "\"goroutine stack dump written to /tmp/containerd.3562.stacks.log\"",
    ));
    log.push_str(&shape(&quote(&dump(&fixture_text(SHIM)))));
    log
}

fn logfmt_line(msg: &str) -> String {
    format!(
        "Nov 23 00:08:48 node containerd[3562]: time=\"2026-11-23T00:08:48.1Z\" level=info msg={msg} runtime=io.containerd.runc.v2\n"
    )
}

fn json_line(msg: &str) -> String {
    format!("{{\"level\":\"info\",\"msg\":{msg},\"time\":\"2026-11-23T00:08:48Z\"}}\n")
}

fn json_quote(text: &str) -> String {
    serde_json::to_string(text).expect("string serialises")
}

fn check_containerd_log(t: &Triage) {
    assert_eq!(t.input.embedded_dumps, 2);
    assert_eq!(t.input.malformed_lines, 0);
    assert_eq!(t.input.other_lines, 2, "the two ordinary log lines");
    assert_eq!(t.dumps_total, 2);
    assert_eq!(
        t.dumps
            .iter()
            .map(|d| (d.daemon, d.goroutines))
            .collect::<Vec<_>>(),
        vec![(Daemon::Containerd, 36), (Daemon::Shim, 7)]
    );
    assert_eq!(t.daemon, Daemon::Mixed);
    assert_eq!(t.goroutines, 43);
    assert_eq!(t.blocked_goroutines, 1);
    let runc = &t.buckets[t.ranking.by_count[0]];
    assert_eq!(runc.kind, WaitKind::Runc);
    assert_eq!(runc.detail.as_deref(), Some("go-runc.(*Runc).Start"));
    assert_eq!(
        runc.site.as_deref(),
        Some("github.com/containerd/containerd/pkg/process.(*Init).start")
    );
    assert_eq!(runc.wait_minutes.max, 51);
    assert_eq!(runc.daemons, vec![Daemon::Shim]);
    assert_eq!(
        t.summary(),
        "containerd+shim: 1 goroutine waiting on runc for up to 51 min"
    );

    // Same goroutines as the plain dumps, kind for kind.
    let plain_containerd = fixture(CONTAINERD);
    let plain_shim =
        analyze(Cursor::new(fixture_text(SHIM)), &TriageLimits::default()).expect("shim dump");
    for (kind, n) in &t.by_kind {
        let plain = plain_containerd.by_kind.get(kind).unwrap_or(&0)
            + plain_shim.by_kind.get(kind).unwrap_or(&0);
        assert_eq!(*n, plain, "{kind:?}");
    }
}

#[test]
fn dumps_embedded_in_a_logfmt_log_are_unescaped() {
    let log = containerd_log(go_quote, logfmt_line);
    assert!(
        !log.contains("\ngoroutine "),
        "every dump is inside one log line"
    );
    let t = analyze(Cursor::new(log), &TriageLimits::default()).expect("log triaged");
    check_containerd_log(&t);
}

#[test]
fn dumps_embedded_in_a_json_log_are_unescaped() {
    let log = containerd_log(json_quote, json_line);
    let t = analyze(Cursor::new(log), &TriageLimits::default()).expect("log triaged");
    check_containerd_log(&t);
}

#[test]
fn reading_in_tiny_chunks_gives_the_same_result() {
    let log = containerd_log(go_quote, logfmt_line);
    let whole = analyze(Cursor::new(&log), &TriageLimits::default()).expect("log triaged");
    for capacity in [1, 2, 3, 7, 64] {
        let chunked = analyze(
            BufReader::with_capacity(capacity, log.as_bytes()),
            &TriageLimits::default(),
        )
        .expect("log triaged");
        assert_eq!(chunked, whole, "chunk size {capacity}");
    }
}

#[test]
fn json_shape() {
    let t = fixture(SEED_002);
    let json = serde_json::to_value(&t).expect("serialises");
    assert_eq!(json["daemon"], "dockerd");
    assert_eq!(json["goroutines"], 200);
    assert_eq!(json["blocked_goroutines"], 193);
    assert_eq!(json["by_kind"]["lock"], 160);
    assert_eq!(json["by_kind"]["containerd"], 24);
    assert_eq!(json["summary"], t.summary());
    assert_eq!(json["dumps"][0]["daemon"], "dockerd");
    let bucket = &json["buckets"][0];
    assert_eq!(bucket["id"], 0);
    assert_eq!(bucket["kind"], "lock");
    assert_eq!(bucket["state"], "semacquire");
    assert_eq!(bucket["count"], 120);
    assert_eq!(bucket["wait_minutes"]["max"], 2903);
    assert_eq!(bucket["daemons"][0], "dockerd");
    assert_eq!(bucket["frames"][0]["function"], "sync.runtime_Semacquire");
    assert_eq!(
        bucket["frames"][0]["location"],
        "/usr/local/go/src/runtime/sema.go:47"
    );
    assert_eq!(bucket["anchor"], 2);
    assert_eq!(bucket["created_by"], "net/http.(*Server).Serve");
    assert_eq!(json["buckets"][1]["possible_lock_holders"][0], 2);
    assert_eq!(json["ranking"]["by_count"][0], 0);
    assert_eq!(json["overflow"]["goroutines"], 0);
    assert_eq!(json["input"]["malformed_lines"], 0);
}

#[test]
fn bucket_limit_counts_the_rest_as_overflow() {
    let limits = TriageLimits {
        max_buckets: 2,
        ..TriageLimits::default()
    };
    let t = analyze_file(&fixture_path(SEED_002), &limits).expect("triaged");
    assert_eq!(t.buckets.len(), 2);
    assert_eq!(t.goroutines, 200);
    let in_buckets: u64 = t.buckets.iter().map(|b| b.count).sum();
    assert_eq!(in_buckets + t.overflow.goroutines, 200);
    assert_eq!(
        t.overflow.by_kind.values().sum::<u64>(),
        t.overflow.goroutines
    );
    assert_eq!(
        t.blocked_goroutines, 193,
        "overflow goroutines are still classified"
    );
    assert_eq!(t.overflow.max_wait_minutes, 91275);
    assert!(t.render_text().contains("bucket limit reached"));
}

#[test]
fn frame_limit_keeps_stacks_apart() {
    let limits = TriageLimits {
        max_frames_per_stack: 3,
        ..TriageLimits::default()
    };
    let capped = analyze_file(&fixture_path(BLOCKED_DOCKERD), &limits).expect("triaged");
    let full = fixture(BLOCKED_DOCKERD);
    assert_eq!(capped.buckets.len(), full.buckets.len());
    assert!(capped.buckets.iter().all(|b| b.frames.len() <= 3));
    assert!(capped.buckets.iter().any(|b| b.frames_total > 3));
}

#[test]
fn missing_file_error_names_the_path() {
    let path = Path::new("/nonexistent/goroutine-stacks-x.log");
    let err = analyze_file(path, &TriageLimits::default()).expect_err("no such file");
    assert!(
        err.to_string()
            .contains("/nonexistent/goroutine-stacks-x.log"),
        "{err}"
    );
}
