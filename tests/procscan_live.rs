//! The /proc scanner against real tasks on this kernel: D-state processes and threads, v1 and
//! v2 frozen cgroups, runc processes blocked on `exec.fifo`, and heavy process churn.
//! Needs root (cgroups, kernel stacks, other processes' memory).

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use hangwatch::config::Config;
use hangwatch::sources::procscan::detect::{
    Direction, ProcScanner, RuntimeKind, ScanReport, Scope, StuckRuntimeProcess,
};
use support::{helper_binary, wait_for};

const DEADLINE: Duration = Duration::from_secs(20);

/// A helper process, killed when the test ends however it ends.
struct Helper {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Helper {
    fn spawn(program: &Path, args: &[&str]) -> Helper {
        let mut child = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn helper");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Helper { child, stdout }
    }

    fn block(args: &[&str]) -> Helper {
        Helper::spawn(&helper_binary("procscan_block"), args)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The line the helper prints once it is in place (it exits, closing stdout, on failure).
    fn announced(&mut self) -> i32 {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read helper");
        line.trim()
            .parse()
            .unwrap_or_else(|_| panic!("helper announced {line:?}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(stuck_after: Duration) -> Config {
    let mut config = Config::default();
    config.proc_scan.stuck_after = stuck_after;
    config.proc_scan.runc_stuck_after = Duration::from_secs(1);
    config.proc_scan.runc_init_stuck_after = Duration::from_secs(1);
    config
}

fn task_state(pid: i32, tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

fn wait_for_state(pid: i32, tid: i32, state: char) {
    wait_for(&format!("task {tid} in state {state}"), DEADLINE, || {
        (task_state(pid, tid) == Some(state)).then_some(())
    });
}

fn wchan(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
}

fn has_stuck(report: &ScanReport, tid: i32) -> bool {
    report.stuck_tasks.iter().any(|t| t.tid == tid)
}

#[test]
fn host_process_in_d_becomes_stuck_after_the_threshold_with_its_wchan() {
    let stuck_after = Duration::from_millis(600);
    let mut helper = Helper::block(&["vfork"]);
    let pid = helper.announced();
    assert_eq!(pid, helper.pid());
    wait_for_state(pid, pid, 'D');

    let mut scanner = ProcScanner::new(&config(stuck_after));
    let first_seen = Instant::now();
    let first = scanner.scan();
    assert!(!has_stuck(&first, pid), "stuck at first sight: {first:#?}");
    assert!(first.dstate_not_stuck >= 1);
    assert!(first.dstate.host >= 1);

    let (report, _) = wait_for("the vfork parent to be stuck", DEADLINE, || {
        let report = scanner.scan();
        has_stuck(&report, pid).then_some(report)
    });
    assert!(first_seen.elapsed() >= stuck_after);
    let task = report.stuck_tasks.iter().find(|t| t.tid == pid).unwrap();
    assert_eq!(task.pid, pid);
    assert_eq!(task.state, 'D');
    assert_eq!(task.scope, Scope::Host);
    assert!(!task.owner.is_container());
    assert_eq!(task.comm, "procscan_block");
    assert!(task.seconds_in_d >= stuck_after.as_secs_f64(), "{task:?}");
    assert_eq!(task.wchan.as_deref(), Some("kernel_clone"));
    let stack = task
        .kernel_stack
        .as_ref()
        .expect("root reads the kernel stack");
    assert!(
        stack.iter().any(|f| f.starts_with("kernel_clone+")),
        "{stack:?}"
    );
    assert_eq!(report.errors.total(), 0, "{:?}", report.errors);

    // Once it leaves D it is forgotten: back in D later it starts from zero.
    helper.kill();
    wait_for("the helper to leave D", DEADLINE, || {
        (!has_stuck(&scanner.scan(), pid)).then_some(())
    });
}

#[test]
fn thread_in_d_is_found_with_its_own_tid() {
    let mut helper = Helper::block(&["vfork-thread"]);
    let pid = helper.pid();
    let tid = helper.announced();
    assert_ne!(tid, pid);
    wait_for_state(pid, tid, 'D');
    wait_for_state(pid, pid, 'S');

    let mut scanner = ProcScanner::new(&config(Duration::ZERO));
    let report = scanner.scan();
    let task = report
        .stuck_tasks
        .iter()
        .find(|t| t.pid == pid)
        .unwrap_or_else(|| panic!("thread not found: {report:#?}"));
    assert_eq!(task.tid, tid);
    assert_eq!(task.wchan.as_deref(), Some("kernel_clone"));
    assert!(!has_stuck(&report, pid), "the main thread is not in D");
}

/// A cgroup made for one test and removed afterwards (its processes killed first).
struct TestCgroup {
    dir: PathBuf,
    helper: Option<Helper>,
}

impl TestCgroup {
    fn create(dir: PathBuf) -> TestCgroup {
        std::fs::create_dir_all(&dir).expect("create cgroup (needs root)");
        TestCgroup { dir, helper: None }
    }

    fn adopt(&mut self, helper: Helper) {
        std::fs::write(self.dir.join("cgroup.procs"), helper.pid().to_string())
            .expect("move helper into cgroup");
        self.helper = Some(helper);
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value).expect("write cgroup file");
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Thaw first: a frozen task does not die until thawed.
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        self.helper.take();
        let start = Instant::now();
        while std::fs::remove_dir(&self.dir).is_err() && start.elapsed() < DEADLINE {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn fake_container_id(tag: u32) -> String {
    format!(
        "{:064x}",
        0xfeed_0000_u64 + u64::from(tag) + u64::from(std::process::id())
    )
}

#[test]
fn tasks_in_a_frozen_v1_cgroup_are_frozen_not_stuck() {
    let id = fake_container_id(1);
    let base =
        Path::new("/sys/fs/cgroup/freezer").join(format!("hangwatch-test-{}", std::process::id()));
    let mut cgroup = TestCgroup::create(base.join(&id));
    let mut helper = Helper::block(&["threads", "2"]);
    helper.announced();
    let pid = helper.pid();
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    assert_eq!(tids.len(), 3);
    cgroup.adopt(helper);
    cgroup.write("freezer.state", "FROZEN");
    wait_for("the freezer to report FROZEN", DEADLINE, || {
        (cgroup.read("freezer.state").trim() == "FROZEN").then_some(())
    });
    for &tid in &tids {
        wait_for_state(pid, tid, 'D');
    }

    let mut scanner = ProcScanner::new(&config(Duration::ZERO));
    let report = scanner.scan();
    for &tid in &tids {
        assert!(!has_stuck(&report, tid), "frozen task {tid} reported stuck");
    }
    let ours = report
        .frozen
        .by_container
        .iter()
        .find(|c| c.owner.container_id.as_deref() == Some(id.as_str()))
        .unwrap_or_else(|| panic!("frozen container missing: {:#?}", report.frozen));
    assert_eq!(ours.tasks, 3);
    assert!(report.frozen.tasks >= 3);
    assert!(
        !report
            .containers
            .iter()
            .any(|c| c.owner.container_id.as_deref() == Some(id.as_str()))
    );

    cgroup.write("freezer.state", "THAWED");
    for &tid in &tids {
        wait_for_state(pid, tid, 'S');
    }
    let report = scanner.scan();
    assert!(
        !report
            .frozen
            .by_container
            .iter()
            .any(|c| c.owner.container_id.as_deref() == Some(id.as_str())),
        "still frozen after THAWED: {:#?}",
        report.frozen
    );
    for &tid in &tids {
        assert!(!has_stuck(&report, tid));
    }
}

#[test]
fn d_task_in_a_frozen_v2_cgroup_is_frozen_not_stuck() {
    let unified = Path::new("/sys/fs/cgroup/unified");
    assert!(
        unified.join("cgroup.controllers").exists(),
        "this machine mounts cgroup v2 at {}",
        unified.display()
    );
    let id = fake_container_id(2);
    let base = unified.join(format!("hangwatch-test-{}", std::process::id()));
    let mut cgroup = TestCgroup::create(base.join(&id));
    let mut helper = Helper::block(&["vfork"]);
    let pid = helper.announced();
    wait_for_state(pid, pid, 'D');
    cgroup.adopt(helper);
    // Migration wakes the task briefly (it shows R) before it sleeps in D again.
    wait_for_state(pid, pid, 'D');

    let mut scanner = ProcScanner::new(&config(Duration::ZERO));
    let report = scanner.scan();
    assert!(has_stuck(&report, pid), "before freezing it is stuck");
    let stuck = report.stuck_tasks.iter().find(|t| t.tid == pid).unwrap();
    assert_eq!(stuck.owner.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(stuck.scope, Scope::Container);
    assert!(
        report
            .containers
            .iter()
            .any(|c| c.owner.container_id.as_deref() == Some(id.as_str()))
    );

    cgroup.write("cgroup.freeze", "1");
    wait_for("cgroup.events to say frozen", DEADLINE, || {
        cgroup
            .read("cgroup.events")
            .contains("frozen 1")
            .then_some(())
    });
    // A vfork parent stays in D when frozen through v2 (other tasks show S).
    wait_for_state(pid, pid, 'D');
    let report = scanner.scan();
    assert!(!has_stuck(&report, pid), "frozen task reported stuck");
    assert!(
        report
            .frozen
            .by_container
            .iter()
            .any(|c| c.owner.container_id.as_deref() == Some(id.as_str()))
    );
}

/// A private directory laid out like runc's state: `<dir>/<id>/exec.fifo`, with the helper
/// reachable as `<dir>/runc` so that its comm is `runc`.
struct RuncState {
    dir: PathBuf,
    fifo: PathBuf,
    runc: PathBuf,
    id: String,
}

impl RuncState {
    fn new(tag: u32) -> RuncState {
        let id = fake_container_id(tag);
        let dir = std::env::temp_dir().join(format!("hangwatch-runc-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(&id)).unwrap();
        let fifo = dir.join(&id).join("exec.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let runc = dir.join("runc");
        std::os::unix::fs::symlink(helper_binary("procscan_block"), &runc).unwrap();
        RuncState {
            dir,
            fifo,
            runc,
            id,
        }
    }

    fn spawn(&self, mode: &str) -> Helper {
        let mut helper = Helper::spawn(&self.runc, &[mode, self.fifo.to_str().unwrap()]);
        assert_eq!(helper.announced(), helper.pid());
        helper
    }

    fn fifo(&self) -> String {
        self.fifo.to_string_lossy().into_owned()
    }
}

impl Drop for RuncState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_fifo_wait(pid: i32) {
    wait_for("the fifo open to block", DEADLINE, || {
        (wchan(pid).trim() == "wait_for_partner").then_some(())
    });
}

fn stuck_process(report: &ScanReport, pid: i32) -> Option<StuckRuntimeProcess> {
    report
        .runtime_processes
        .iter()
        .find(|p| p.pid == pid)
        .cloned()
}

/// Scan until `pid` is reported as a stuck runtime process; checks it was not reported
/// while younger than the threshold (1 s in these tests).
fn wait_until_stuck(scanner: &mut ProcScanner, pid: i32) -> StuckRuntimeProcess {
    let young = scanner.scan();
    if let Some(early) = stuck_process(&young, pid) {
        assert!(early.age_seconds >= 1.0, "reported while young: {early:?}");
    }
    let (process, _) = wait_for("the runtime process to be reported", DEADLINE, || {
        stuck_process(&scanner.scan(), pid)
    });
    assert!(process.age_seconds >= 1.0, "{process:?}");
    process
}

#[test]
fn runc_blocked_reading_exec_fifo_with_no_init_is_stuck_with_evidence() {
    let state = RuncState::new(3);
    let runc = state.spawn("fifo-read");
    let pid = runc.pid();
    wait_for_fifo_wait(pid);

    let mut scanner = ProcScanner::new(&config(Duration::from_secs(30)));
    let process = wait_until_stuck(&mut scanner, pid);
    assert_eq!(process.kind, RuntimeKind::Runc);
    assert_eq!(process.comm, "runc");
    assert!(!process.evidence_timed_out);
    let thread = process.threads.iter().find(|t| t.tid == pid).unwrap();
    assert_eq!(thread.state, 'S');
    assert_eq!(thread.wchan.as_deref(), Some("wait_for_partner"));
    assert_eq!(thread.syscall, Some(nix::libc::SYS_openat as u64));
    let opening = thread.opening.as_ref().expect("blocked open");
    assert_eq!(opening.path.as_deref(), Some(state.fifo().as_str()));
    assert_eq!(opening.direction, Direction::Read);
    let fifo = process.exec_fifo.expect("exec fifo evidence");
    assert_eq!(fifo.path, state.fifo());
    assert_eq!(fifo.container_id.as_deref(), Some(state.id.as_str()));
    assert_eq!(fifo.blocked_opening, Some(Direction::Read));
    assert!(!fifo.held, "the blocked opener has no descriptor yet");
    assert_eq!(fifo.partner_pid, None);
    assert!(fifo.is_orphaned_wait());
}

#[test]
fn runc_init_blocked_writing_exec_fifo_is_stuck_with_evidence() {
    let state = RuncState::new(4);
    let init = state.spawn("fifo-init");
    let pid = init.pid();
    wait_for_fifo_wait(pid);

    let mut scanner = ProcScanner::new(&config(Duration::from_secs(30)));
    let process = wait_until_stuck(&mut scanner, pid);
    assert_eq!(process.kind, RuntimeKind::RuncInit);
    assert_eq!(process.comm, "runc:[2:INIT]");
    let fifo = process.exec_fifo.expect("exec fifo evidence");
    assert_eq!(fifo.path, state.fifo());
    assert!(fifo.held, "init holds the fifo as an O_PATH descriptor");
    assert_eq!(fifo.blocked_opening, Some(Direction::Write));
    assert_eq!(fifo.partner_pid, None);
    // It opened /proc/self/fd/N: the path is resolved through its descriptor.
    let opening = process
        .threads
        .iter()
        .find_map(|t| t.opening.clone())
        .expect("blocked open");
    assert_eq!(opening.path.as_deref(), Some(state.fifo().as_str()));
}

#[test]
fn runc_waiting_on_a_live_init_has_a_partner_until_the_init_is_killed() {
    let state = RuncState::new(5);
    let mut init = state.spawn("fifo-hold");
    let init_pid = init.pid();
    let runc = state.spawn("fifo-read");
    let runc_pid = runc.pid();
    wait_for_fifo_wait(runc_pid);

    let mut scanner = ProcScanner::new(&config(Duration::from_secs(30)));
    let process = wait_until_stuck(&mut scanner, runc_pid);
    let fifo = process.exec_fifo.expect("exec fifo evidence");
    assert_eq!(fifo.partner_pid, Some(init_pid));
    assert!(!fifo.is_orphaned_wait());
    let report = scanner.scan();
    let init_report = stuck_process(&report, init_pid).expect("init reported too");
    assert_eq!(init_report.kind, RuntimeKind::RuncInit);
    let init_fifo = init_report.exec_fifo.expect("init fifo");
    assert!(init_fifo.held);
    assert_eq!(init_fifo.blocked_opening, None);
    assert_eq!(init_fifo.partner_pid, Some(runc_pid));

    // The OOM killer takes the init: runc now waits forever on its exec.fifo.
    init.kill();
    let report = scanner.scan();
    assert!(stuck_process(&report, init_pid).is_none());
    let fifo = stuck_process(&report, runc_pid)
        .and_then(|p| p.exec_fifo)
        .expect("runc still reported");
    assert_eq!(fifo.partner_pid, None);
    assert!(fifo.is_orphaned_wait());
}

#[test]
fn heavy_process_churn_surfaces_no_errors() {
    let mut churn = Helper::block(&["churn", "1000", "4"]);
    churn.announced();
    let mut scanner = ProcScanner::new(&config(Duration::ZERO));
    let mut scans = 0;
    let mut tasks_seen = Vec::new();
    let start = Instant::now();
    while churn.child.try_wait().expect("wait churn").is_none() {
        assert!(start.elapsed() < DEADLINE, "churn helper did not finish");
        let report = scanner.scan();
        assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
        assert!(!report.errors.proc_unreadable);
        tasks_seen.push(report.tasks_scanned);
        scans += 1;
    }
    let mut summary = String::new();
    churn.stdout.read_line(&mut summary).unwrap();
    let spawned: u64 = summary
        .trim()
        .strip_prefix("spawned ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("churn summary {summary:?}"));
    assert!(spawned >= 3000, "only {spawned} processes spawned");
    assert!(scans >= 20, "only {scans} scans during churn");
    // The churn was visible: the task count moved between scans.
    let (min, max) = (
        tasks_seen.iter().min().unwrap(),
        tasks_seen.iter().max().unwrap(),
    );
    assert!(max > min, "task count never changed: {tasks_seen:?}");
}
