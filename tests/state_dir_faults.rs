//! The state directory full, read-only or not a directory, then healed: failed writes are
//! counted in `hangwatch_state_write_failures_total{kind="kernel_position"}`, the kernel-log
//! position is saved again once writes work, no `*.tmp` file is left behind, and a restart
//! counts no kernel record twice.

mod support;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::hangwatch::{Hangwatch, TempDir};
use support::{exclusive, wait_for};

/// A small tmpfs mounted for the test, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "hwtest"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs at {}", path.display());
        Tmpfs(path.to_path_buf())
    }

    fn remount(&self, option: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{option}")])
            .arg(&self.0)
            .status()
            .expect("run mount");
        assert!(status.success(), "remount {option}");
    }

    /// Fill the filesystem to the last byte.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let mut file = std::fs::File::create(&filler).expect("create filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn config(state: &Path) -> String {
    format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n\
         proc_scan:\n  enabled: false\nlifecycle:\n  enabled: false\n\
         kernel_log:\n  source: kmsg\n  accept_non_kernel: true\n",
        state.display()
    )
}

/// A hung-task report written into the kernel log (facility user, accepted by the config).
/// One open per record: `printk_devkmsg=ratelimit` limits writes per open file.
fn hung_task_record(tag: &str) {
    let mut kmsg = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .expect("open /dev/kmsg");
    // One write: each write(2) is one record, and `writeln!` writes in pieces.
    let line = format!("INFO: task {tag}:4242 blocked for more than 120 seconds.\n");
    kmsg.write_all(line.as_bytes()).expect("write /dev/kmsg");
}

fn hung_tasks(hw: &Hangwatch) -> f64 {
    hw.metric("hangwatch_kernel_events_total", &[("rule", "hung_task")])
        .unwrap_or(0.0)
}

fn write_failures(hw: &Hangwatch) -> f64 {
    hw.metric(
        "hangwatch_state_write_failures_total",
        &[("kind", "kernel_position")],
    )
    .unwrap_or(0.0)
}

fn wait_counted(hw: &Hangwatch, n: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hung_tasks(hw) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} hung tasks not counted (now {}):\n{}",
            hung_tasks(hw),
            hw.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(state: &Path, dir: &Path) -> Hangwatch {
    let hw = Hangwatch::start(&config(state), dir);
    wait_for("kernel_log_up 1", Duration::from_secs(10), || {
        (hw.metric("hangwatch_kernel_log_up", &[]) == Some(1.0)).then_some(())
    });
    hw
}

/// The seq saved in the position file, if it holds one.
fn saved_seq(state: &Path) -> Option<u64> {
    std::fs::read_to_string(state.join("kmsg.position"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("seq=")?.parse().ok())
}

fn wait_saved_beyond(state: &Path, seq: u64) -> u64 {
    wait_for("the position saved again", Duration::from_secs(15), || {
        saved_seq(state).filter(|s| *s > seq)
    })
    .0
}

fn no_temporary_files(state: &Path) {
    let left: Vec<String> = std::fs::read_dir(state)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

/// After a restart, one more record is the only one counted. Records are read in order, so
/// once it is served, anything read again from before it would have been counted already.
fn restart_counts_nothing_again(state: &Path, dir: &Path, tag: &str, round: u32) -> Hangwatch {
    let hw = start(state, dir);
    let marker = format!("{tag}-r{round}");
    hung_task_record(&marker);
    wait_for("the new record served", Duration::from_secs(10), || {
        hw.list("/events")
            .iter()
            .any(|e| e["fields"]["comm"] == marker.as_str())
            .then_some(())
    });
    assert_eq!(
        hung_tasks(&hw),
        1.0,
        "records from before the restart were counted again"
    );
    hw
}

/// hangwatch on a state dir of its own tmpfs, one record counted and its position saved:
/// the start of every fault case. Bound in this order so that the tmpfs is unmounted before
/// the directory is removed.
fn counting_on_tmpfs(name: &str, tag: &str) -> (TempDir, String, Tmpfs, Hangwatch, u64) {
    let dir = TempDir::new(name);
    let tag = format!("{tag}{}", std::process::id());
    let mount = Tmpfs::mount(&dir.path().join("state"));
    let hw = start(&mount.0, dir.path());
    hung_task_record(&tag);
    wait_counted(&hw, 1.0);
    let first = wait_saved_beyond(&mount.0, 0);
    (dir, tag, mount, hw, first)
}

#[test]
fn a_full_state_dir_is_counted_and_never_recounted() {
    let _serial = exclusive();
    let (dir, tag, mount, hw, first) = counting_on_tmpfs("state-full", "hwfull");
    let state = mount.0.clone();

    let filler = mount.fill();
    for _ in 0..3 {
        hung_task_record(&tag);
    }
    wait_counted(&hw, 4.0);
    wait_for("a failed write counted", Duration::from_secs(10), || {
        (write_failures(&hw) >= 1.0).then_some(())
    });
    let (_, status) = hw.terminate();
    assert!(status.success());
    no_temporary_files(&state);
    assert!(
        saved_seq(&state).is_none_or(|s| s > first),
        "the stale position was left to be resumed from"
    );

    std::fs::remove_file(&filler).expect("free the space");
    let hw = restart_counts_nothing_again(&state, dir.path(), &tag, 1);
    // Emptying the stale file frees its space, so a retry may have saved the position
    // before the exit; either way the restart must not have resumed from `first`.
    let healed = wait_saved_beyond(&state, first);
    assert_eq!(write_failures(&hw), 0.0);
    let (_, status) = hw.terminate();
    assert!(status.success());
    assert!(saved_seq(&state) >= Some(healed));
    restart_counts_nothing_again(&state, dir.path(), &tag, 2);
}

#[test]
fn a_read_only_state_dir_is_retried_until_it_heals() {
    let _serial = exclusive();
    let (dir, tag, mount, hw, first) = counting_on_tmpfs("state-ro", "hwro");
    let state = mount.0.clone();

    mount.remount("ro");
    hung_task_record(&tag);
    wait_counted(&hw, 2.0);
    wait_for("a failed write counted", Duration::from_secs(10), || {
        (write_failures(&hw) >= 1.0).then_some(())
    });
    mount.remount("rw");
    let healed = wait_saved_beyond(&state, first);
    println!("position saved again after the remount: seq {first} -> {healed}");
    no_temporary_files(&state);
    let (_, status) = hw.terminate();
    assert!(status.success());
    restart_counts_nothing_again(&state, dir.path(), &tag, 1);
}

#[test]
fn a_state_dir_that_is_a_file_is_counted_then_healed() {
    let _serial = exclusive();
    let dir = TempDir::new("state-file");
    let tag = format!("hwfile{}", std::process::id());
    let state = dir.path().join("state");
    std::fs::write(&state, "not a directory").expect("a file in its place");
    let hw = start(&state, dir.path());
    hung_task_record(&tag);
    wait_counted(&hw, 1.0);
    wait_for("a failed write counted", Duration::from_secs(10), || {
        (write_failures(&hw) >= 1.0).then_some(())
    });
    assert_eq!(hw.get("/healthz").0, 200, "hangwatch keeps serving");

    std::fs::remove_file(&state).expect("heal");
    wait_saved_beyond(&state, 0);
    let (_, status) = hw.terminate();
    assert!(status.success());
    restart_counts_nothing_again(&state, dir.path(), &tag, 1);
}
