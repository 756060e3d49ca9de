//! The kernel log detector and reader against the real `/dev/kmsg` (run as root): a real
//! memory-cgroup OOM kill of a process named `runc:[2:INIT]`, forged userspace lines, restarts
//! with a saved position, an overrun of the kernel's buffer, and an unreadable log.
//!
//! `/dev/kmsg` is shared with everything else on the machine, so each test looks only for its
//! own unique markers and pids. The tests here run one at a time: the overrun test floods the
//! buffer and changes a kernel setting.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hangwatch::config::{Config, KernelLogSource};
use hangwatch::heartbeat::Heartbeats;
use hangwatch::signal::{self, Signal, SignalReceiver};
use hangwatch::sources::kernel::detect::{
    KernelEvent, KernelLogCounters, KernelLogDetector, KernelSignal, KmsgRead, KmsgReader,
    LogSource, POSITION_FILE, Position, SavedPosition, StartPosition, check,
};
use hangwatch::sources::{Detector, DetectorContext};
use support::oom::{OomVictim, TestCgroup};
use support::{Sysctl, wait_for};
use tokio_util::sync::CancellationToken;

const KMSG: &str = "/dev/kmsg";

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unique() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-{name}-{}", unique()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Write one line into the kernel log. A fresh descriptor each time: the kernel rate-limits
/// writers per open file.
fn write_kmsg(line: &str) {
    let mut kmsg = fs::OpenOptions::new().write(true).open(KMSG).unwrap();
    kmsg.write_all(format!("{line}\n").as_bytes()).unwrap();
}

fn forged_oom_line(comm: &str) -> String {
    format!(
        "Memory cgroup out of memory: Killed process 424242 ({comm}) total-vm:1kB, anon-rss:1kB, file-rss:0kB, shmem-rss:0kB"
    )
}

fn config(state_dir: &Path, accept_non_kernel: bool) -> Config {
    let mut config = Config {
        state_dir: state_dir.to_path_buf(),
        ..Config::default()
    };
    config.kernel_log.accept_non_kernel = accept_non_kernel;
    config
}

/// What a running detector has sent so far.
#[derive(Default)]
struct Seen {
    events: Vec<(Instant, KernelEvent)>,
    counters: KernelLogCounters,
    counter_signals: usize,
    ups: usize,
    downs: Vec<(String, Option<Duration>)>,
}

/// A detector running on its own runtime, as the engine would run it.
struct Harness {
    runtime: tokio::runtime::Runtime,
    receiver: SignalReceiver,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    heartbeats: Heartbeats,
    seen: Seen,
}

impl Harness {
    fn start(config: Config, detector: KernelLogDetector) -> Harness {
        let budget = detector.heartbeat_budget();
        Harness::start_with_budget(config, detector, budget)
    }

    fn start_with_budget(config: Config, detector: KernelLogDetector, budget: Duration) -> Harness {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (sender, receiver) = signal::channel();
        let shutdown = CancellationToken::new();
        let heartbeats = Heartbeats::default();
        let heartbeat = heartbeats.register("kernel_log", budget);
        let ctx = DetectorContext {
            config: Arc::new(config),
            signals: sender,
            heartbeat,
            shutdown: shutdown.clone(),
        };
        let task = runtime.spawn(Box::new(detector).run(ctx));
        Harness {
            runtime,
            receiver,
            shutdown,
            task: Some(task),
            heartbeats,
            seen: Seen::default(),
        }
    }

    fn poll(&mut self) {
        while let Ok(signal) = self.receiver.try_recv() {
            let Signal::Source {
                source: hangwatch::sources::kernel::NAME,
                payload,
            } = signal
            else {
                panic!("unexpected signal {signal:?}");
            };
            match payload.downcast::<KernelSignal>() {
                Ok(KernelSignal::Event { event, .. }) => {
                    self.seen.events.push((Instant::now(), *event))
                }
                Ok(KernelSignal::Counters(delta)) => {
                    self.seen.counters += delta;
                    self.seen.counter_signals += 1;
                }
                Ok(KernelSignal::Up { .. }) => self.seen.ups += 1,
                Ok(KernelSignal::Down {
                    error, retry_in, ..
                }) => self.seen.downs.push((error, retry_in)),
                Err(other) => panic!("unexpected payload {other:?}"),
            }
        }
    }

    fn wait_up(&mut self) {
        wait_for("the kernel log to be up", Duration::from_secs(10), || {
            self.poll();
            (self.seen.ups > 0).then_some(())
        });
    }

    fn wait_event(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&KernelEvent) -> bool,
    ) -> (KernelEvent, Instant) {
        wait_for(what, deadline, || {
            self.poll();
            self.seen
                .events
                .iter()
                .find(|(_, e)| matches(e))
                .map(|(at, e)| (e.clone(), *at))
        })
        .0
    }

    fn has_event(&self, matches: impl Fn(&KernelEvent) -> bool) -> bool {
        self.seen.events.iter().any(|(_, e)| matches(e))
    }

    /// Cancel and wait for the detector to return; returns how long that took.
    fn stop(mut self) -> (Seen, Duration) {
        let started = Instant::now();
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        self.runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await })
            .expect("the detector returns promptly at shutdown")
            .expect("the detector does not panic");
        let took = started.elapsed();
        self.poll();
        (self.seen, took)
    }
}

fn comm_is(comm: &str) -> impl Fn(&KernelEvent) -> bool + '_ {
    move |e| e.fields.comm.as_deref() == Some(comm)
}

fn saved_seq(state_dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(state_dir.join(POSITION_FILE)).ok()?;
    match SavedPosition::parse(&text)?.position {
        Position::Seq(seq) => Some(seq),
        Position::Timestamp(_) => None,
    }
}

/// A real OOM kill in a memory cgroup of `hierarchy` limited through `limits`, of a process
/// whose comm is `runc:[2:INIT]`; the event must arrive within 1 s of the kill.
fn real_oom_kill(hierarchy: &Path, limits: &[(&str, &str)]) {
    let _serial = serial();
    let state = temp_dir("oom-state");
    let mut harness = Harness::start(config(&state, false), KernelLogDetector::default());
    harness.wait_up();

    let cgroup = TestCgroup::create(hierarchy, limits);
    let scratch = temp_dir("oom-exe");
    let victim = OomVictim::start("runc:[2:INIT]", &cgroup, &scratch);
    let pid = victim.pid;
    let exited_at = victim.allocate_until_killed();
    let (event, received_at) =
        harness.wait_event("the OOM kill of the helper", Duration::from_secs(30), |e| {
            e.rule == "oom_kill" && e.fields.pid == Some(pid)
        });

    assert_eq!(event.facility, 0, "the kernel's own line");
    assert_eq!(event.fields.comm.as_deref(), Some("runc:[2:INIT]"));
    assert_eq!(event.victim_label(), Some("runc_init"));
    assert_eq!(event.constraint_label(), Some("memcg"));
    let oom = event.oom.as_ref().unwrap();
    assert_eq!(oom.memcg.as_deref(), Some(cgroup.kernel_path.as_str()));
    assert_eq!(oom.task_memcg.as_deref(), Some(cgroup.kernel_path.as_str()));
    assert_eq!(event.owner, None, "a test cgroup is not a container");
    let latency = received_at.saturating_duration_since(exited_at);
    println!(
        "OOM kill of pid {pid} in {}: event {} the helper's exit was seen",
        cgroup.kernel_path,
        if received_at <= exited_at {
            format!("{:?} before", exited_at - received_at)
        } else {
            format!("{latency:?} after")
        }
    );
    assert!(
        latency <= Duration::from_secs(1),
        "event delivered {latency:?} after the kill"
    );

    let (seen, took) = harness.stop();
    let kills = seen
        .events
        .iter()
        .filter(|(_, e)| e.rule == "oom_kill" && e.fields.pid == Some(pid))
        .count();
    assert_eq!(kills, 1, "one kill, one event");
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    let cgroup_dir = cgroup.path.clone();
    drop(cgroup);
    assert!(!cgroup_dir.exists(), "test cgroup removed");
    fs::remove_dir_all(scratch).unwrap();
}

#[test]
fn real_oom_kill_in_a_cgroup_v1_memory_cgroup() {
    let hierarchy = Path::new("/sys/fs/cgroup/memory");
    assert!(
        hierarchy.join("memory.limit_in_bytes").exists(),
        "this machine mounts the cgroup v1 memory controller at {}",
        hierarchy.display()
    );
    // Swap accounting off or no swap: the memsw limit may be missing; it is set when present.
    real_oom_kill(
        hierarchy,
        &[
            ("memory.limit_in_bytes", "20971520"),
            ("memory.memsw.limit_in_bytes", "20971520"),
        ],
    );
}

#[test]
fn real_oom_kill_in_a_cgroup_v2_memory_cgroup_where_available() {
    let hierarchy = Path::new("/sys/fs/cgroup/unified");
    let controllers = fs::read_to_string(hierarchy.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "memory") {
        println!(
            "SKIPPED: the cgroup v2 hierarchy at {} has no memory controller (controllers: {:?}); \
             the v1 memory hierarchy holds it on this machine",
            hierarchy.display(),
            controllers.trim()
        );
        return;
    }
    fs::write(hierarchy.join("cgroup.subtree_control"), "+memory").unwrap();
    real_oom_kill(
        hierarchy,
        &[("memory.max", "20971520"), ("memory.swap.max", "0")],
    );
}

#[test]
fn forged_userspace_oom_line_is_ignored_by_default_and_accepted_when_configured() {
    let _serial = serial();
    let strict_state = temp_dir("forge-strict");
    let mut strict = Harness::start(config(&strict_state, false), KernelLogDetector::default());
    let mut lenient = Harness::start(
        config(&temp_dir("forge-lenient"), true),
        KernelLogDetector::default(),
    );
    strict.wait_up();
    lenient.wait_up();

    let comm = format!("hw-forge-{}", unique());
    write_kmsg(&forged_oom_line(&comm));
    let (event, _) = lenient.wait_event(
        "the forged line accepted",
        Duration::from_secs(10),
        comm_is(&comm),
    );
    assert_eq!(event.rule, "oom_kill");
    assert_eq!(event.facility, 1, "root's lines arrive with facility user");

    // The strict detector has read past the forged record, counted it, and made nothing of it.
    wait_for(
        "the strict detector to pass the forged record",
        Duration::from_secs(10),
        || {
            strict.poll();
            (saved_seq(&strict_state).is_some_and(|seq| seq >= event.seq)
                && strict.seen.counters.ignored_non_kernel >= 1)
                .then_some(())
        },
    );
    let (seen, _) = strict.stop();
    assert!(
        !seen.events.iter().any(|(_, e)| comm_is(&comm)(e)),
        "forged line became an event"
    );
    assert!(seen.counters.records_read >= 1);
    lenient.stop();
}

#[test]
fn restart_neither_repeats_nor_misses_events() {
    let _serial = serial();
    let state = temp_dir("restart");
    let before = format!("hw-before-{}", unique());
    let while_stopped = format!("hw-stopped-{}", unique());

    // A run that sees no event still saves where it stopped, so nothing logged while it is
    // stopped is missed.
    let mut quiet = Harness::start(config(&state, true), KernelLogDetector::default());
    quiet.wait_up();
    quiet.stop();
    assert!(
        saved_seq(&state).is_some(),
        "position saved without any event"
    );
    let after_quiet = format!("hw-after-quiet-{}", unique());
    write_kmsg(&forged_oom_line(&after_quiet));

    let mut first = Harness::start(config(&state, true), KernelLogDetector::default());
    first.wait_up();
    write_kmsg(&forged_oom_line(&before));
    let (event_before, _) =
        first.wait_event("the first event", Duration::from_secs(10), comm_is(&before));
    assert!(
        first.has_event(comm_is(&after_quiet)),
        "the event logged after a quiet run is delivered on restart"
    );
    let (_, took) = first.stop();
    assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    assert!(
        saved_seq(&state).is_some_and(|seq| seq >= event_before.seq),
        "position saved at shutdown"
    );

    write_kmsg(&forged_oom_line(&while_stopped));

    let mut second = Harness::start(config(&state, true), KernelLogDetector::default());
    second.wait_up();
    second.wait_event(
        "the event written while stopped",
        Duration::from_secs(10),
        comm_is(&while_stopped),
    );
    // Records are delivered in seq order, so a replay of the first would have come before.
    assert!(
        !second.has_event(comm_is(&before)),
        "event delivered twice across a restart"
    );
    second.stop();

    // Another boot (a different boot id): the saved seq means nothing, reading starts at the end.
    let boot_id = state.join("other-boot-id");
    fs::write(&boot_id, "00000000-0000-0000-0000-000000000000\n").unwrap();
    let after_reboot = format!("hw-rebooted-{}", unique());
    let mut third = Harness::start(
        config(&state, true),
        KernelLogDetector::with_boot_id_path(&boot_id),
    );
    third.wait_up();
    write_kmsg(&forged_oom_line(&after_reboot));
    third.wait_event(
        "an event after the simulated reboot",
        Duration::from_secs(10),
        comm_is(&after_reboot),
    );
    assert!(!third.has_event(comm_is(&while_stopped)));
    assert!(!third.has_event(comm_is(&before)));
    third.stop();
}

/// Sets a sysctl for the test and restores the old value however the test ends.
/// The size of the kernel's log buffer (`log_buf_len`).
fn kernel_log_buffer_size() -> usize {
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: this action reads no buffer; it returns the size.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    usize::try_from(size).expect("klogctl SIZE_BUFFER")
}

/// The seq of the oldest record the kernel still holds, read through a fresh descriptor with
/// nothing of the reader under test.
fn oldest_seq_held() -> u64 {
    let mut kmsg = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(KMSG)
        .unwrap();
    let mut buffer = vec![0u8; 8192];
    let length = kmsg.read(&mut buffer).unwrap();
    let text = String::from_utf8_lossy(&buffer[..length]);
    text.split(',').nth(1).unwrap().parse().unwrap()
}

/// Read with `reader` until `marker` is seen; returns the seqs of all records read.
fn read_until(reader: &mut KmsgReader, marker: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    wait_for(marker, Duration::from_secs(10), || {
        loop {
            match reader.read_next().unwrap() {
                KmsgRead::Record(record) => {
                    seqs.push(record.seq);
                    if record.message.contains(marker) {
                        return Some(());
                    }
                }
                KmsgRead::Drained => return None,
                KmsgRead::Skipped | KmsgRead::Malformed(_) => {}
            }
        }
    });
    seqs
}

#[test]
fn overrun_counts_lost_records_exactly_from_the_seq_gap() {
    let _serial = serial();
    let buffer_size = kernel_log_buffer_size();
    assert!(buffer_size > 0);
    let _unlimited = Sysctl::set("/proc/sys/kernel/printk_devkmsg", "on");

    let mut attempts = 0;
    loop {
        attempts += 1;
        let id = unique();
        let mut reader = KmsgReader::open(Path::new(KMSG), StartPosition::End).unwrap();
        let start_marker = format!("hw-overrun-start-{id}");
        write_kmsg(&start_marker);
        let start_seq = *read_until(&mut reader, &start_marker).last().unwrap();
        reader.take_counters();

        // Four buffers' worth, and more records than the buffer has descriptors for.
        let line = format!("hw-overrun-flood-{id} {}\n", "x".repeat(100));
        let records = 4 * buffer_size / line.len() + buffer_size / 16;
        let mut kmsg = fs::OpenOptions::new().write(true).open(KMSG).unwrap();
        for _ in 0..records {
            kmsg.write_all(line.as_bytes()).unwrap();
        }

        let oldest = oldest_seq_held();
        let first = loop {
            match reader.read_next().unwrap() {
                KmsgRead::Record(record) => break record.seq,
                KmsgRead::Skipped | KmsgRead::Malformed(_) => {}
                KmsgRead::Drained => panic!("nothing to read after the flood"),
            }
        };
        if first != oldest && attempts < 3 {
            // Another writer overwrote one more record between the two reads: measure again.
            continue;
        }
        assert_eq!(
            first, oldest,
            "the reader resumes at the oldest record held"
        );
        let lost = reader.take_counters().lost;
        assert!(oldest > start_seq + 1, "the flood overran the buffer");
        assert_eq!(lost, oldest - (start_seq + 1), "lost = the seq gap");

        // The reader goes on: every later record is read once, none lost.
        let end_marker = format!("hw-overrun-end-{id}");
        write_kmsg(&end_marker);
        let mut seqs = vec![first];
        seqs.extend(read_until(&mut reader, &end_marker));
        let end_seq = *seqs.last().unwrap();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "contiguous after the overrun"
        );
        let counters = reader.take_counters();
        assert_eq!(counters.lost, 0);
        assert_eq!(lost + 1 + counters.records_read, end_seq - start_seq);
        println!(
            "buffer {buffer_size} bytes, {records} records written, {lost} lost (seq {start_seq} -> {oldest})"
        );
        return;
    }
}

#[test]
fn unreadable_kernel_log_is_reported_down_and_retried() {
    let _serial = serial();
    let not_a_device = temp_dir("not-a-device");
    for (path, expected) in [
        (PathBuf::from("/nonexistent-hangwatch/kmsg"), "ENOENT"),
        (not_a_device.clone(), "not a character device"),
    ] {
        let mut config = config(&temp_dir("down-state"), false);
        config.kernel_log.path = path.clone();
        config.kernel_log.retry_initial = Duration::from_millis(50);
        config.kernel_log.retry_max = Duration::from_millis(200);
        let mut harness = Harness::start(config, KernelLogDetector::default());
        wait_for("four failed attempts", Duration::from_secs(10), || {
            harness.poll();
            (harness.seen.downs.len() >= 4).then_some(())
        });
        let (seen, took) = harness.stop();
        assert_eq!(seen.ups, 0);
        for (error, _) in &seen.downs {
            assert!(error.contains(expected), "{error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
        }
        let backoffs: Vec<Option<Duration>> = seen.downs.iter().take(4).map(|d| d.1).collect();
        assert_eq!(
            backoffs,
            [50, 100, 200, 200].map(|ms| Some(Duration::from_millis(ms))),
            "exponential backoff, capped"
        );
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    }
}

#[test]
fn check_reads_back_over_the_look_back_window_without_waiting() {
    let _serial = serial();
    let comm = format!("hw-check-{}", unique());
    write_kmsg(&forged_oom_line(&comm));
    let mut config = config(&temp_dir("check"), true);
    config.kernel_log.check_lookback = Duration::from_secs(600);
    let started = Instant::now();
    let report = check(&config).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        report.events.iter().any(comm_is(&comm)),
        "recent event found"
    );
    assert!(report.counters.records_read >= 1);

    config.kernel_log.accept_non_kernel = false;
    let report = check(&config).unwrap();
    assert!(!report.events.iter().any(comm_is(&comm)));
    assert!(report.counters.ignored_non_kernel >= 1);
}

#[test]
fn check_reads_back_through_syslog_too() {
    let _serial = serial();
    let comm = format!("hw-check-syslog-{}", unique());
    write_kmsg(&forged_oom_line(&comm));
    let mut config = config(&temp_dir("check-syslog"), true);
    config.kernel_log.source = KernelLogSource::Syslog;
    config.kernel_log.check_lookback = Duration::from_secs(600);
    let started = Instant::now();
    let report = check(&config).unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(report.source, LogSource::Syslog);
    let event = report
        .events
        .iter()
        .find(|e| comm_is(&comm)(e))
        .expect("recent event found through syslog(2)");
    assert_eq!(event.facility, 1, "facility kept from <pri>");
    assert!(report.counters.records_read >= 1);

    // Nothing older than the window: a window of zero reads back nothing of what is held.
    config.kernel_log.check_lookback = Duration::ZERO;
    let report = check(&config).unwrap();
    assert!(!report.events.iter().any(comm_is(&comm)));
}

#[test]
fn beats_while_silent_or_backing_off_and_batches_counters() {
    let _serial = serial();
    let budget = Duration::from_millis(2500);
    let mut reading = Harness::start_with_budget(
        config(&temp_dir("beat-reading"), false),
        KernelLogDetector::default(),
        budget,
    );
    let mut down = config(&temp_dir("beat-down"), false);
    down.kernel_log.path = PathBuf::from("/nonexistent-hangwatch/kmsg");
    down.kernel_log.retry_initial = Duration::from_secs(30);
    down.kernel_log.retry_max = Duration::from_secs(60);
    let mut backing_off = Harness::start_with_budget(down, KernelLogDetector::default(), budget);
    reading.wait_up();

    let started = Instant::now();
    for i in 0..20 {
        write_kmsg(&format!("hw-batch-{}-{i}", unique()));
    }
    // Three budgets long, whatever the log does: neither loop may go stale.
    wait_for("three heartbeat budgets", budget * 4, || {
        reading.poll();
        backing_off.poll();
        assert_eq!(reading.heartbeats.stale(), [], "reading loop went stale");
        assert_eq!(
            backing_off.heartbeats.stale(),
            [],
            "backoff loop went stale"
        );
        (started.elapsed() >= budget * 3 && reading.seen.counters.records_read >= 20).then_some(())
    });
    let elapsed_ticks = started.elapsed().as_secs() as usize + 2;
    assert!(
        reading.seen.counter_signals <= elapsed_ticks,
        "{} counter signals for {} records: not batched",
        reading.seen.counter_signals,
        reading.seen.counters.records_read
    );
    assert_eq!(
        backing_off.seen.downs.len(),
        1,
        "one attempt within the first backoff"
    );
    let (_, took) = backing_off.stop();
    assert!(
        took < Duration::from_secs(2),
        "shutdown during a 30 s backoff took {took:?}"
    );
    reading.stop();
}
