//! The kernel log through the whole daemon: real OOM kills become metrics and `/events`
//! within a second, attributed to containers by id and name; a restart does not count an
//! event twice; the same through syslog(2), also when `auto` falls back to it because the
//! device cgroup refuses `/dev/kmsg`; an unreadable kernel log leaves the rest of hangwatch
//! working.

mod support;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::daemons::PrivateDaemons;
use support::hangwatch::{Hangwatch, TempDir};
use support::oom::{OomVictim, TestCgroup};
use support::{Sysctl, exclusive, wait_for};

/// hangwatch watching only the kernel log.
fn kernel_only(state: &std::path::Path, extra: &str) -> String {
    format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n{extra}",
        state.display()
    )
}

fn oom_kills(hw: &Hangwatch, victim: &str) -> f64 {
    hw.metric(
        "hangwatch_oom_kills_total",
        &[("victim", victim), ("constraint", "memcg")],
    )
    .unwrap_or(0.0)
}

/// Start hangwatch again on the same state and show the OOM kill of `pid` is neither counted
/// nor served again.
fn restart_without_recounting(config: &str, dir: &Path, pid: u32) -> Hangwatch {
    let again = Hangwatch::start(config, dir);
    wait_kernel_log_up(&again);
    mark_read_position(&again);
    assert_eq!(
        oom_kills(&again, "runc_init"),
        0.0,
        "the kill was counted again after a restart"
    );
    assert!(
        !again
            .list("/events")
            .iter()
            .any(|e| e["fields"]["pid"] == pid),
        "the kill was replayed after a restart"
    );
    again
}

/// The OOM kill of `pid` as /events serves it.
fn oom_event(hw: &Hangwatch, pid: u32) -> serde_json::Value {
    hw.list("/events")
        .into_iter()
        .find(|e| e["rule"] == "oom_kill" && e["fields"]["pid"] == pid)
        .expect("the kill in /events")
}

fn wait_kernel_log_up(hw: &Hangwatch) {
    wait_for("kernel_log_up 1", Duration::from_secs(10), || {
        (hw.metric("hangwatch_kernel_log_up", &[]) == Some(1.0)).then_some(())
    });
}

fn source_gauge(hw: &Hangwatch, source: &str) -> Option<f64> {
    hw.metric("hangwatch_kernel_log_source", &[("source", source)])
}

/// `/status` is published at most every so often: wait for it to show the source.
fn wait_status_source(hw: &Hangwatch, source: &str) {
    wait_for("/status to show the source", Duration::from_secs(5), || {
        let status = hw.status_json();
        (status["kernel_log"]["source"] == source && status["kernel_log"]["up"] == true)
            .then_some(())
    });
}

/// A line in the kernel log from userspace (facility user): ignored by default, so once the
/// ignored-records counter moves, the reader has read past everything logged before it.
fn mark_read_position(hw: &Hangwatch) {
    let before = hw
        .metric("hangwatch_kernel_log_ignored_records_total", &[])
        .unwrap_or(0.0);
    let mut kmsg = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg");
    writeln!(kmsg, "hangwatch test marker").expect("write /dev/kmsg");
    wait_for(
        "the reader to pass the marker",
        Duration::from_secs(10),
        || {
            (hw.metric("hangwatch_kernel_log_ignored_records_total", &[])
                .unwrap_or(0.0)
                > before)
                .then_some(())
        },
    );
}

#[test]
fn runc_init_oom_kill_is_counted_within_a_second_and_not_again_after_a_restart() {
    let _serial = exclusive();
    let dir = TempDir::new("kernel-oom");
    let config = kernel_only(dir.path(), "");
    let hw = Hangwatch::start(&config, dir.path());
    wait_kernel_log_up(&hw);
    assert_eq!(oom_kills(&hw, "runc_init"), 0.0);

    let cgroup = TestCgroup::v1_memory_20mib();
    let victim = OomVictim::start("runc:[2:INIT]", &cgroup, dir.path());
    let pid = victim.pid;
    let killed_at = victim.allocate_until_killed();
    let (_, _) = wait_for(
        "oom_kills_total{victim=runc_init} +1",
        Duration::from_secs(5),
        || (oom_kills(&hw, "runc_init") == 1.0).then_some(()),
    );
    let latency = killed_at.elapsed();
    assert!(
        latency <= Duration::from_secs(1),
        "counted {latency:?} after the kill was seen"
    );
    let event = oom_event(&hw, pid);
    assert_eq!(event["fields"]["comm"], "runc:[2:INIT]");
    assert_eq!(event["oom"]["victim"], "runc_init");
    assert_eq!(event["oom"]["memcg"], cgroup.kernel_path.as_str());
    assert!(event["at"].is_string(), "{event}");

    let (_, status) = hw.terminate();
    assert!(status.success());
    restart_without_recounting(&config, dir.path(), pid);
}

#[test]
fn container_oom_through_private_dockerd_names_the_container() {
    let _serial = exclusive();
    let daemons = PrivateDaemons::start();
    daemons.import_image("hwtest:oom", &[]);
    let dir = TempDir::new("kernel-container-oom");
    let config = daemons.hangwatch_config(dir.path(), "probes:\n  interval: 500ms\n");
    let hw = Hangwatch::start(&config, dir.path());
    wait_kernel_log_up(&hw);

    let output = daemons.docker(&[
        "run",
        "--name",
        "oom-victim",
        "--network",
        "none",
        "-m",
        "20m",
        "--memory-swap",
        "20m",
        "hwtest:oom",
        "sh",
        "-c",
        "x=a; while true; do x=$x$x; done",
    ]);
    assert_eq!(
        output.status.code(),
        Some(137),
        "the container was OOM-killed"
    );
    let id = daemons.docker_ok(&["inspect", "-f", "{{.Id}}", "oom-victim"]);
    let (event, _) = wait_for(
        "the container's OOM kill, named",
        Duration::from_secs(15),
        || {
            hw.list("/events").into_iter().find(|e| {
                e["rule"] == "oom_kill"
                    && e["owner"]["container_id"] == id.as_str()
                    && e["container_name"] == "oom-victim"
            })
        },
    );
    assert_eq!(event["oom"]["victim"], "container", "{event}");
    assert_eq!(event["oom"]["constraint"], "memcg");
    assert_eq!(event["oom"]["memcg"], format!("/docker/{id}"));
    assert!(oom_kills(&hw, "container") >= 1.0);
}

#[test]
fn missing_kernel_log_is_down_while_everything_else_works() {
    let dir = TempDir::new("kernel-missing");
    let config = kernel_only(
        dir.path(),
        "kernel_log:\n  path: /nonexistent/kmsg\n  retry_initial: 100ms\n  retry_max: 200ms\n",
    );
    let hw = Hangwatch::start(&config, dir.path());
    // kernel_log_up starts at 0: wait for the detector's own report instead.
    wait_for(
        "the kernel log reported down",
        Duration::from_secs(10),
        || {
            let status = hw.status_json();
            let error = status["kernel_log"]["error"].as_str()?.to_string();
            (status["kernel_log"]["up"] == false && error.contains("/nonexistent/kmsg"))
                .then_some(())
        },
    );
    assert_eq!(hw.metric("hangwatch_kernel_log_up", &[]), Some(0.0));
    assert_eq!(
        hw.get("/healthz").0,
        200,
        "a missing kernel log is not hangwatch failing"
    );
    assert!(hw.logs().contains("kernel log cannot be read"));
    assert!(!hw.logs().contains("panicked"));
}

/// The real thing: `/dev/kmsg` refused to an unprivileged hangwatch (dmesg_restrict).
#[test]
fn kernel_log_refused_by_the_kernel_is_down_with_eperm() {
    let _serial = exclusive();
    let dir = TempDir::new("kernel-eperm");
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown state dir");
    let _restrict = Sysctl::set("/proc/sys/kernel/dmesg_restrict", "1");
    let config = kernel_only(
        dir.path(),
        "kernel_log:\n  retry_initial: 100ms\n  retry_max: 200ms\n",
    );
    let hw = Hangwatch::start_with(&config, dir.path(), |command| {
        command.uid(65534).gid(65534);
    });
    let (error, _) = wait_for(
        "the kernel log reported down",
        Duration::from_secs(10),
        || {
            let status = hw.status_json();
            (status["kernel_log"]["up"] == false).then(|| {
                status["kernel_log"]["error"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
        },
    );
    assert!(error.to_lowercase().contains("not permitted"), "{error}");
    assert!(
        error.contains("/dev/kmsg") && error.contains("syslog(2)"),
        "auto tried syslog(2) too: {error}"
    );
    assert_eq!(hw.metric("hangwatch_kernel_log_up", &[]), Some(0.0));
    assert_eq!(source_gauge(&hw, "syslog"), Some(0.0));
    assert_eq!(hw.get("/healthz").0, 200);
}

#[test]
fn runc_init_oom_kill_through_syslog_is_counted_once_across_a_restart() {
    let _serial = exclusive();
    let dir = TempDir::new("kernel-syslog-oom");
    let config = kernel_only(dir.path(), "kernel_log:\n  source: syslog\n");
    let hw = Hangwatch::start(&config, dir.path());
    wait_kernel_log_up(&hw);
    assert_eq!(source_gauge(&hw, "syslog"), Some(1.0));
    assert_eq!(source_gauge(&hw, "kmsg"), Some(0.0));
    wait_status_source(&hw, "syslog");
    assert_eq!(oom_kills(&hw, "runc_init"), 0.0);

    let cgroup = TestCgroup::v1_memory_20mib();
    let victim = OomVictim::start("runc:[2:INIT]", &cgroup, dir.path());
    let pid = victim.pid;
    let killed_at = victim.allocate_until_killed();
    wait_for(
        "oom_kills_total{victim=runc_init} +1 through syslog(2)",
        Duration::from_secs(10),
        || (oom_kills(&hw, "runc_init") == 1.0).then_some(()),
    );
    let latency = killed_at.elapsed();
    println!(
        "OOM kill of pid {pid} counted {latency:?} after it was seen, through syslog(2) polled every 1s"
    );
    assert!(
        latency <= Duration::from_secs(3),
        "counted {latency:?} after the kill: more than the 1 s poll interval allows"
    );
    let event = oom_event(&hw, pid);
    assert_eq!(event["fields"]["comm"], "runc:[2:INIT]");
    assert_eq!(event["facility"], 0, "the kernel's own line");
    assert_eq!(event["oom"]["victim"], "runc_init");
    assert_eq!(
        event["oom"]["constraint"], "memcg",
        "joined with the oom-kill: line"
    );
    assert_eq!(event["oom"]["memcg"], cgroup.kernel_path.as_str());

    let (_, status) = hw.terminate();
    assert!(status.success());
    let saved = std::fs::read_to_string(dir.path().join("kmsg.position")).expect("position saved");
    assert!(saved.contains("ts_usec="), "{saved}");

    let again = restart_without_recounting(&config, dir.path(), pid);
    assert!(
        again.logs().contains("AfterTimestamp"),
        "resumed from the saved timestamp"
    );
}

/// A v1 devices cgroup that refuses `/dev/kmsg` (char 1:11), as an unprivileged container's
/// does; removed on drop (after the processes in it are gone).
struct KmsgDeniedCgroup(PathBuf);

impl KmsgDeniedCgroup {
    fn create(tag: &str) -> KmsgDeniedCgroup {
        let path = Path::new("/sys/fs/cgroup/devices")
            .join(format!("hwtest-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).expect("create a devices cgroup (cgroup v1, as root)");
        std::fs::write(path.join("devices.deny"), "c 1:11 rwm").expect("deny /dev/kmsg");
        KmsgDeniedCgroup(path)
    }

    /// Make `command`'s process join the cgroup before it runs anything.
    fn enter(&self, command: &mut std::process::Command) {
        let procs =
            CString::new(self.0.join("cgroup.procs").as_os_str().as_bytes()).expect("cgroup path");
        // SAFETY: between fork and exec only async-signal-safe calls: open, write, close.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written == 1 { Ok(()) } else { Err(error) }
            });
        }
    }
}

impl Drop for KmsgDeniedCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn auto_falls_back_to_syslog_when_the_device_cgroup_refuses_kmsg() {
    let _serial = exclusive();
    let cgroup = KmsgDeniedCgroup::create("kmsg-denied");
    let dir = TempDir::new("kernel-auto-fallback");
    let config = kernel_only(dir.path(), "");
    let started = Instant::now();
    let hw = Hangwatch::start_with(&config, dir.path(), |command| cgroup.enter(command));
    wait_kernel_log_up(&hw);
    println!(
        "kernel log up through the fallback {:?} after start",
        started.elapsed()
    );
    assert_eq!(source_gauge(&hw, "syslog"), Some(1.0));
    assert_eq!(source_gauge(&hw, "kmsg"), Some(0.0));
    wait_status_source(&hw, "syslog");
    let fallback: Vec<String> = hw
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("reading the kernel log through syslog(2)"))
        .collect();
    assert_eq!(fallback.len(), 1, "explained once: {fallback:?}");
    assert!(fallback[0].contains("WARN"), "{}", fallback[0]);
    assert!(
        fallback[0].contains("EPERM"),
        "the device cgroup's refusal is the reason: {}",
        fallback[0]
    );
    // It really reads: a line logged now is seen.
    mark_read_position(&hw);
    let (_, status) = hw.terminate();
    assert!(status.success());
}
