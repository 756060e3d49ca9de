//! From a stuck task to what it waits on, against real kernel waits: a FUSE daemon
//! (`tests/helpers/stall_fuse.c`, spoken over /dev/fuse) that stops itself at a chosen request,
//! a loop device over a file on it, and a lookup that holds its directory's lock while it
//! waits. For each: the stuck task is classified, its chain names the device, the mount and
//! the stopped daemon, the kernel's call trace comes with the hung-task report where the
//! kernel makes one, and everything clears after SIGCONT. Needs root; run under
//! `flock /tmp/hangwatch-real-tests.lock` (FUSE, loop devices, kernel sysctls).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hangwatch::config::Config;
use hangwatch::sources::kernel::detect as kernel;
use hangwatch::sources::procscan::detect::{ProcScanner, StuckTask, WaitChain, WaitClass};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::hangwatch::Hangwatch;
use support::{KilledOnDrop, Sysctl, helper_binary, wait_for};

const DEADLINE: Duration = Duration::from_secs(20);
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// fusectl mounted for the test when the host had not (systemd mounts it on most hosts).
struct Fusectl {
    mounted_here: bool,
}

impl Fusectl {
    fn ensure() -> Fusectl {
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.contains(" - fusectl "));
        if !mounted {
            let status = Command::new("mount")
                .args(["-t", "fusectl", "fusectl", FUSECTL])
                .status()
                .expect("run mount");
            assert!(status.success(), "mount fusectl");
        }
        Fusectl {
            mounted_here: !mounted,
        }
    }
}

impl Drop for Fusectl {
    fn drop(&mut self) {
        if self.mounted_here {
            let _ = Command::new("umount").args(["-l", FUSECTL]).status();
        }
    }
}

/// The FUSE daemon and its mount. Dropped first: it aborts the connection, which fails every
/// request still waiting, so the tasks behind it can be reaped.
struct Fuse {
    daemon: Child,
    dir: PathBuf,
    mnt: PathBuf,
    dev: String,
}

impl Fuse {
    fn start(stop_on: &str) -> Fuse {
        let dir = std::env::temp_dir().join(format!("hw-waits-{}-{stop_on}", std::process::id()));
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let mut daemon = Command::new(helper_binary("stall_fuse"))
            .arg(&mnt)
            .args(["16", stop_on])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn stall_fuse");
        let mut line = String::new();
        BufReader::new(daemon.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "stall_fuse did not mount");
        let dev = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.split(' ').nth(4) == mnt.to_str())
            .and_then(|l| l.split(' ').nth(2).map(str::to_string))
            .expect("the mount in mountinfo");
        Fuse {
            daemon,
            dir,
            mnt,
            dev,
        }
    }

    fn pid(&self) -> i32 {
        self.daemon.id() as i32
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    fn is_stopped(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        })
    }

    fn resume(&self) {
        kill(Pid::from_raw(self.pid()), Signal::SIGCONT).unwrap();
    }

    fn connection(&self) -> PathBuf {
        let (major, minor) = self.dev.split_once(':').unwrap();
        let id = (major.parse::<u64>().unwrap() << 20) | minor.parse::<u64>().unwrap();
        Path::new(FUSECTL).join(id.to_string())
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = std::fs::write(self.connection().join("abort"), "1");
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGCONT);
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loop device, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }

    fn name(&self) -> &str {
        self.0.trim_start_matches("/dev/")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn spawn(program: &str, args: &[&str]) -> KilledOnDrop {
    KilledOnDrop(
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}")),
    )
}

fn scanner() -> ProcScanner {
    let mut config = Config::default();
    config.proc_scan.stuck_after = Duration::ZERO;
    ProcScanner::new(&config)
}

/// The task's chain once a scan sees it stuck with one that `done` accepts.
fn stuck_with(
    scanner: &mut ProcScanner,
    pid: u32,
    what: &str,
    done: impl Fn(&WaitChain) -> bool,
) -> StuckTask {
    let mut last = None;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, DEADLINE, || {
            let report = scanner.scan();
            let task = report
                .stuck_tasks
                .into_iter()
                .find(|t| t.pid == pid as i32)?;
            last = Some(task.clone());
            task.wait.as_ref().is_some_and(&done).then_some(task)
        })
        .0
    }));
    found.unwrap_or_else(|_| panic!("{what}: last seen {last:#?}"))
}

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Until the process has exited (reaped by `try_wait`).
fn exits(child: &mut KilledOnDrop, what: &str) {
    wait_for(what, DEADLINE, || child.0.try_wait().ok().flatten());
}

#[test]
fn block_io_to_a_loop_device_over_a_stopped_fuse_daemon() {
    let _serial = support::exclusive();
    let mut tasks: Vec<KilledOnDrop> = Vec::new();
    let _fusectl = Fusectl::ensure();
    let fuse = Fuse::start("write");
    let device = LoopDevice::attach(&fuse.path("data"));
    tasks.push(spawn(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", device.0),
            "bs=4096",
            "count=1",
            "oflag=direct",
        ],
    ));
    let dd = tasks[0].0.id();
    let mut scanner = scanner();
    // Until the loop worker's write has reached the daemon and stopped it.
    let task = stuck_with(&mut scanner, dd, "dd stuck on the loop device", |c| {
        c.block_device
            .as_ref()
            .and_then(|d| d.backing_mount.as_ref())
            .and_then(|m| m.fuse.as_ref())
            .is_some_and(|f| f.daemon.as_ref().is_some_and(|d| d.state == 'T'))
    });
    assert!(fuse.is_stopped());
    let chain = task.wait.as_ref().unwrap();
    assert_eq!(chain.class, WaitClass::BlockIo, "{chain:#?}");
    assert_eq!(chain.syscall, Some(1), "write(2)");
    assert_eq!(chain.file.as_deref(), Some(device.0.as_str()));
    let loop_dev = chain.block_device.as_ref().unwrap();
    assert_eq!(loop_dev.name, device.name());
    assert_eq!(loop_dev.backing_file.as_deref(), fuse.path("data").to_str());
    let mount = loop_dev.backing_mount.as_ref().unwrap();
    assert_eq!(mount.dev, fuse.dev);
    assert_eq!(mount.fstype, "fuse.stall_fuse");
    let connection = mount.fuse.as_ref().unwrap();
    let daemon = connection.daemon.as_ref().unwrap();
    assert_eq!((daemon.pid, daemon.state), (fuse.pid(), 'T'));
    assert!(connection.waiting.is_some_and(|n| n >= 1), "{connection:?}");
    assert!(loop_dev.inflight.is_some_and(|[r, w]| r + w >= 1));
    let text = chain.describe();
    assert!(
        text.starts_with(&format!(
            "block I/O to /dev/{}, whose backing file is",
            device.name()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "served by pid {} stall_fuse (stopped)",
            fuse.pid()
        )),
        "{text}"
    );
    // Next scan: nothing completed in between.
    let again = stuck_with(&mut scanner, dd, "a second sighting", |c| {
        c.block_device
            .as_ref()
            .is_some_and(|d| d.progressing.is_some())
    });
    let progressing = again.wait.unwrap().block_device.unwrap().progressing;
    assert_eq!(progressing, Some(false));

    fuse.resume();
    exits(&mut tasks[0], "dd completes once the daemon answers");
    let report = scanner.scan();
    assert!(report.stuck_tasks.iter().all(|t| t.pid != dd as i32));
}

#[test]
fn a_fuse_request_the_stopped_daemon_never_answers() {
    let _serial = support::exclusive();
    let mut tasks: Vec<KilledOnDrop> = Vec::new();
    let _fusectl = Fusectl::ensure();
    let fuse = Fuse::start("write");
    let data = fuse.path("data");
    tasks.push(spawn(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", data.display()),
            "bs=4096",
            "count=1",
            "conv=notrunc",
        ],
    ));
    let dd = tasks[0].0.id();
    wait_for("the daemon stops at the write", DEADLINE, || {
        (fuse.is_stopped() && state_of(dd) == Some('S')).then_some(())
    });
    // A signal turns FUSE's interruptible wait into a killable one (D), as a stop's SIGTERM
    // does to a container's process; dd handles SIGUSR1 (it prints its counts).
    kill(Pid::from_raw(dd as i32), Signal::SIGUSR1).unwrap();
    let mut scanner = scanner();
    let task = stuck_with(&mut scanner, dd, "dd in D behind the daemon", |c| {
        c.mount
            .as_ref()
            .and_then(|m| m.fuse.as_ref())
            .is_some_and(|f| f.daemon.is_some())
    });
    let chain = task.wait.as_ref().unwrap();
    assert_eq!(chain.class, WaitClass::FsServer, "{chain:#?}");
    assert_eq!(chain.fd, Some(1));
    assert_eq!(chain.file.as_deref(), data.to_str());
    let mount = chain.mount.as_ref().unwrap();
    assert_eq!(mount.mount_point, fuse.mnt.to_str().unwrap());
    let connection = mount.fuse.as_ref().unwrap();
    assert_eq!(connection.daemon.as_ref().unwrap().pid, fuse.pid());
    assert!(connection.waiting.is_some_and(|n| n >= 1), "{connection:?}");
    assert!(
        chain.describe().contains(&format!(
            "FUSE mount {} served by pid {} stall_fuse (stopped)",
            fuse.mnt.display(),
            fuse.pid()
        )),
        "{}",
        chain.describe()
    );

    fuse.resume();
    exits(&mut tasks[0], "dd completes once the daemon answers");
    assert!(
        scanner
            .scan()
            .stuck_tasks
            .iter()
            .all(|t| t.pid != dd as i32)
    );
}

#[test]
fn a_lock_held_by_a_task_waiting_on_the_stopped_daemon() {
    let _serial = support::exclusive();
    let mut tasks: Vec<KilledOnDrop> = Vec::new();
    let started_usec = kernel_now_usec();
    // The kernel reports this one: a lookup waiting on the directory's rwsem, uninterruptible.
    let _warnings = Sysctl::set("/proc/sys/kernel/hung_task_warnings", "10");
    let _timeout = Sysctl::set("/proc/sys/kernel/hung_task_timeout_secs", "1");
    let _fusectl = Fusectl::ensure();
    let fuse = Fuse::start("lookup");
    // The daemon, from before the hang: it reads the kernel log from its end.
    let state = fuse.dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let hw = Hangwatch::start(
        &format!(
            "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n\
             lifecycle:\n  enabled: false\nkernel_log:\n  source: kmsg\n\
             proc_scan:\n  interval: 250ms\n  stuck_after: 0s\n",
            state.display()
        ),
        &fuse.dir,
    );
    // The create holds the directory's lock while its LOOKUP waits on the stopped daemon.
    let new = fuse.path("new");
    tasks.push(spawn("touch", &[new.to_str().unwrap()]));
    let holder = tasks[0].0.id();
    wait_for("the daemon stops at the lookup", DEADLINE, || {
        (fuse.is_stopped() && state_of(holder) == Some('S')).then_some(())
    });
    let other = fuse.path("other");
    tasks.push(spawn("stat", &[other.to_str().unwrap()]));
    let waiter = tasks[1].0.id();
    let mut scanner = scanner();
    let task = stuck_with(&mut scanner, waiter, "stat waits on the lock", |c| {
        !c.holders.is_empty()
    });
    let chain = task.wait.as_ref().unwrap();
    assert_eq!(chain.class, WaitClass::Lock, "{chain:#?}");
    assert_eq!(chain.file.as_deref(), other.to_str(), "the path from statx");
    assert_eq!(chain.mount.as_ref().unwrap().dev, fuse.dev);
    let held_by = &chain.holders[0];
    assert_eq!((held_by.pid, held_by.state), (holder as i32, 'S'));
    assert_eq!(held_by.wchan.as_deref(), Some("request_wait_answer"));
    assert_eq!(held_by.file.as_deref(), new.to_str());
    assert!(
        chain.describe().contains(&format!(
            "likely held by touch pid {holder} (S, request_wait_answer)"
        )),
        "{}",
        chain.describe()
    );

    // The kernel's report of the waiter, with its call trace.
    let mut config = Config::default();
    config.kernel_log.check_lookback = Duration::from_secs(120);
    let (event, _) = wait_for("the kernel's hung-task report", DEADLINE, || {
        let report = kernel::check(&config).ok()?;
        report.events.into_iter().find(|e| {
            e.rule == kernel::HUNG_TASK_RULE
                && e.fields.pid == Some(waiter)
                && e.ts_usec >= started_usec
        })
    });
    let trace = event
        .call_trace
        .as_ref()
        .expect("the call trace is attached");
    assert!(
        trace
            .task
            .as_deref()
            .is_some_and(|t| t.contains(&format!("pid:{waiter} "))),
        "{trace:?}"
    );
    assert!(
        trace
            .frames
            .iter()
            .any(|f| f.starts_with("rwsem_down_read_slowpath+")),
        "{trace:?}"
    );
    assert!(trace.frames.len() <= kernel::MAX_TRACE_FRAMES);

    // The daemon: /status carries the chain, the metric its class, /events the trace.
    wait_for("the chain in /status", DEADLINE, || {
        let status = hw.status_json();
        let tasks = status["proc_scan"]["stuck_tasks"].as_array()?.clone();
        let task = tasks.iter().find(|t| t["pid"] == waiter)?;
        (task["wait"]["class"] == "lock"
            && task["wait"]["mount"]["fuse"]["daemon"]["pid"] == fuse.pid()
            && task["wait"]["holders"][0]["pid"] == holder)
            .then_some(())
    });
    let locked = || {
        hw.metric(
            "hangwatch_stuck_tasks",
            &[("scope", "host"), ("wait", "lock")],
        )
    };
    assert!(locked().is_some_and(|n| n >= 1.0));
    wait_for("the call trace in /events", DEADLINE, || {
        hw.list("/events").into_iter().find(|e| {
            e["rule"] == "hung_task"
                && e["fields"]["pid"] == waiter
                && e["call_trace"]["frames"].as_array().is_some_and(|f| {
                    f.iter().any(|f| {
                        f.as_str()
                            .is_some_and(|f| f.starts_with("rwsem_down_read_slowpath+"))
                    })
                })
        })
    });

    // `hangwatch check` prints both: the chain from /proc, the trace from the kernel log.
    let out = check_report(&fuse.dir);
    assert!(
        out.contains(&format!("waits on a kernel lock on {}", other.display())),
        "{out}"
    );
    assert!(
        out.contains(&format!("likely held by touch pid {holder}")),
        "{out}"
    );
    assert!(out.contains("[lock]"), "{out}");
    assert!(
        out.contains("call trace:") && out.contains("rwsem_down_read_slowpath"),
        "{out}"
    );

    fuse.resume();
    exits(&mut tasks[0], "touch returns once the daemon answers");
    exits(&mut tasks[1], "stat returns once the lock is free");
    let report = scanner.scan();
    assert!(
        report
            .stuck_tasks
            .iter()
            .all(|t| t.pid != waiter as i32 && t.pid != holder as i32)
    );
    wait_for("the daemon's count clears", DEADLINE, || {
        (locked() == Some(0.0)).then_some(())
    });
}

/// `hangwatch check`'s text, with the runtimes left alone (this test is about the kernel).
fn check_report(dir: &Path) -> String {
    let config = dir.join("check.yaml");
    std::fs::write(
        &config,
        "docker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\nlifecycle:\n  enabled: false\n",
    )
    .unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_hangwatch"))
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .expect("run hangwatch check");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The printk clock (CLOCK_MONOTONIC), in microseconds.
fn kernel_now_usec() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    Duration::from(now).as_micros() as u64
}
