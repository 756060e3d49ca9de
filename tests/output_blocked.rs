//! hangwatch's stdout and stderr into a pipe that nobody drains (a hung runtime stops
//! draining its containers' output): a flood of kernel records and a stopped dockerd are
//! still all counted and the stall declared on time, `/healthz` and `/metrics` answer within
//! 100 ms, lines are dropped and counted; once the pipe is drained, logging resumes with a
//! line saying how many were dropped.

mod support;

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::daemons::PrivateDaemons;
use support::hangwatch::{TempDir, binary, metric_value};
use support::http_probe::get;
use support::{Sysctl, exclusive, wait_for};

const RECORDS: usize = 1_200;
const LATENCY_BUDGET: Duration = Duration::from_millis(100);

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything readable from the (non-blocking) read end now.
fn read_available(read: &mut std::fs::File, into: &mut Vec<u8>) {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match read.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => panic!("read the pipe: {e}"),
        }
    }
}

fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn message(line: &serde_json::Value) -> &str {
    line["fields"]["message"].as_str().unwrap_or("")
}

/// Timed GET that must answer 200 within the budget; returns the body.
fn answered(addr: SocketAddr, path: &str, slowest: &mut Duration) -> String {
    let (status, body, took) =
        get(addr, path, Duration::from_secs(3)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(status, 200, "{path}: {body}");
    *slowest = (*slowest).max(took);
    body
}

fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)], slowest: &mut Duration) -> f64 {
    metric_value(&answered(addr, "/metrics", slowest), name, labels).unwrap_or(0.0)
}

#[test]
fn undrained_output_drops_log_lines_and_nothing_else() {
    let _timing = exclusive();
    // Every record reaches the kernel log, however fast they are written.
    let _unlimited = Sysctl::set("/proc/sys/kernel/printk_devkmsg", "on");
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("undrained");
    let config = daemons.hangwatch_config(
        dir.path(),
        "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 6s\n\
         kernel_log:\n  accept_non_kernel: true\n  rules:\n    - name: flood_test\n      pattern: '^hw-flood-'\n      severity: warning\n      kind: temporary\n\
         log:\n  format: json\n  level: info\n",
    );
    let config_path = dir.path().join("hangwatch.yaml");
    std::fs::write(&config_path, config).expect("write config");

    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let mut read = std::fs::File::from(read);
    nix::fcntl::fcntl(
        &read,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .expect("non-blocking read end");
    let child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&config_path)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "hangwatch=debug,info")
        .stdin(Stdio::null())
        .stdout(write.try_clone().expect("dup"))
        .stderr(write.try_clone().expect("dup"))
        .spawn()
        .expect("start hangwatch");
    let _running = Running(child);

    // Read the output only until hangwatch says where it listens.
    let mut output = Vec::new();
    let (addr, _) = wait_for("hangwatch started", Duration::from_secs(30), || {
        read_available(&mut read, &mut output);
        json_lines(&output).iter().find_map(|l| {
            (message(l) == "hangwatch started")
                .then(|| l["fields"]["listen"].as_str()?.parse::<SocketAddr>().ok())?
        })
    });
    let mut slowest = Duration::ZERO;
    wait_for("docker healthy", Duration::from_secs(20), || {
        (metric(
            addr,
            "hangwatch_runtime_state",
            &[("runtime", "docker"), ("state", "healthy")],
            &mut slowest,
        ) == 1.0)
            .then_some(())
    });
    output.clear();
    read_available(&mut read, &mut output);

    // From here on nobody reads. Fill the pipe through a description of our own, so that
    // O_NONBLOCK does not reach hangwatch's.
    let mut filler = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", write.as_raw_fd()))
        .expect("second write description of the pipe");
    loop {
        match filler.write(b"filler\n") {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("fill the pipe: {e}"),
        }
    }

    let records_before = metric(
        addr,
        "hangwatch_kernel_log_records_total",
        &[],
        &mut slowest,
    );
    daemons.signal_dockerd(libc::SIGSTOP);
    let stopped_at = Instant::now();
    let id = std::process::id();
    let mut kmsg = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg");
    let mut stall_seen = None;
    for batch in 0..RECORDS / 100 {
        for n in 0..100 {
            writeln!(kmsg, "hw-flood-{id} record {batch}-{n}").expect("write /dev/kmsg");
        }
        // Read back before the next batch, so the kernel's buffer never overruns.
        wait_for("the batch counted", Duration::from_secs(10), || {
            let counted = metric(
                addr,
                "hangwatch_kernel_events_total",
                &[("rule", "flood_test")],
                &mut slowest,
            );
            if stall_seen.is_none()
                && metric(
                    addr,
                    "hangwatch_runtime_stalled",
                    &[("runtime", "docker")],
                    &mut slowest,
                ) == 1.0
            {
                stall_seen = Some(stopped_at.elapsed());
            }
            answered(addr, "/healthz", &mut slowest);
            (counted >= ((batch + 1) * 100) as f64).then_some(())
        });
    }
    let (stall, _) = wait_for("the stall declared", Duration::from_secs(10), || {
        stall_seen.or_else(|| {
            (metric(
                addr,
                "hangwatch_runtime_stalled",
                &[("runtime", "docker")],
                &mut slowest,
            ) == 1.0)
                .then(|| stopped_at.elapsed())
        })
    });
    let metrics = answered(addr, "/metrics", &mut slowest);
    let events = metric_value(
        &metrics,
        "hangwatch_kernel_events_total",
        &[("rule", "flood_test")],
    );
    let records = metric_value(&metrics, "hangwatch_kernel_log_records_total", &[]).unwrap_or(0.0);
    let lost =
        metric_value(&metrics, "hangwatch_kernel_log_lost_records_total", &[]).unwrap_or(0.0);
    let dropped = metric_value(&metrics, "hangwatch_log_lines_dropped_total", &[]).unwrap_or(0.0);
    println!(
        "{RECORDS} records: {events:?} events, {} records read, {lost} lost; stall after {stall:?}; \
         {dropped} log lines dropped; slowest answer {slowest:?}",
        records - records_before
    );
    assert_eq!(events, Some(RECORDS as f64), "every record counted");
    assert_eq!(lost, 0.0);
    // stall_threshold 2 s + interval 0.5 s + evaluate 0.25 s, and slack for a loaded machine.
    assert!(
        stall < Duration::from_secs(5),
        "stall declared after {stall:?}"
    );
    assert!(
        dropped > 0.0,
        "no log line was dropped: the pipe was not full?"
    );
    assert!(slowest < LATENCY_BUDGET, "slowest answer {slowest:?}");

    // Drain: the queued lines, then the summary, then new lines again.
    daemons.signal_dockerd(libc::SIGCONT);
    let mut drained = Vec::new();
    let (summary, _) = wait_for(
        "the summary line after draining",
        Duration::from_secs(20),
        || {
            read_available(&mut read, &mut drained);
            let lines = json_lines(&drained);
            let summary = lines
                .iter()
                .position(|l| message(l).ends_with("log lines dropped while output was blocked"))?;
            let resumed = lines[summary + 1..].iter().any(|l| {
                message(l) == "runtime state changed" && l["fields"]["state"] == "healthy"
            });
            resumed.then(|| lines[summary].clone())
        },
    );
    let reported = summary["fields"]["dropped_lines"].as_f64().unwrap_or(0.0);
    assert!(
        reported >= dropped,
        "the summary counts every drop: {summary}"
    );
    assert_eq!(summary["level"], "WARN");
}
