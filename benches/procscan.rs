//! The /proc scan against its floor, at 10k and 50k tasks.
//!
//! Spawns helper processes of 1,000 sleeping threads each until the machine has the wanted
//! number of tasks (raising `kernel.pid_max` and `kernel.threads-max` when needed, and
//! restoring them), then alternates blocks of scans by hangwatch's scanner and by a minimal C
//! loop that only opens and reads every `/proc/*/task/*/stat`. Reports medians, the ratio to
//! the floor (target: at most 1.3) and how time grows from 10k to 50k tasks.
//!
//! Run as root: `cargo bench --bench procscan`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hangwatch::config::Config;
use hangwatch::sources::procscan::detect::ProcScanner;

const THREADS_PER_HELPER: usize = 1000;
const BLOCKS: usize = 3;
const RUNS_PER_BLOCK: usize = 8;

/// A sysctl set for the benchmark and put back afterwards.
struct Sysctl {
    path: &'static str,
    original: String,
}

impl Sysctl {
    fn at_least(path: &'static str, wanted: u64) -> Sysctl {
        let original = std::fs::read_to_string(path).expect("read sysctl");
        let current: u64 = original.trim().parse().expect("sysctl value");
        if current < wanted {
            std::fs::write(path, wanted.to_string()).expect("raise sysctl (needs root)");
            println!("raised {path} from {current} to {wanted}");
        }
        Sysctl { path, original }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.original.trim());
    }
}

struct Helpers(Vec<Child>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

fn tasks_on_machine() -> usize {
    std::fs::read_dir("/proc")
        .expect("list /proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read_dir(e.path().join("task")).ok())
        .map(Iterator::count)
        .sum()
}

/// Start helpers until about `total` tasks exist.
fn spawn_tasks(total: usize) -> Helpers {
    let helper = support::helper_binary("procscan_block");
    let mut helpers = Helpers(Vec::new());
    let missing = total.saturating_sub(tasks_on_machine());
    for _ in 0..missing.div_ceil(THREADS_PER_HELPER) {
        let mut child = Command::new(&helper)
            .args(["threads", &(THREADS_PER_HELPER - 1).to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn threads helper");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read helper");
        assert_eq!(line.trim(), "0", "helper failed to start its threads");
        helpers.0.push(child);
    }
    helpers
}

fn floor_runs(floor: &Path, runs: usize) -> Vec<(Duration, u64)> {
    // One extra run first: the floor pays its own cold start, as the scanner does.
    let output = Command::new(floor)
        .arg((runs + 1).to_string())
        .output()
        .expect("run floor");
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .skip(1)
        .map(|line| {
            let (ns, count) = line.split_once(' ').expect("floor output");
            (
                Duration::from_nanos(ns.parse().expect("ns")),
                count.parse().expect("count"),
            )
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct Measurement {
    tasks: u64,
    floor_ms: f64,
    walk_ms: f64,
    scan_ms: f64,
}

fn measure(total: usize, floor: &Path) -> Measurement {
    let helpers = spawn_tasks(total);
    let mut scanner = ProcScanner::new(&Config::default());
    scanner.scan();
    let (mut floor_ms, mut walk_ms, mut scan_ms, mut tasks) = (vec![], vec![], vec![], vec![]);
    for _ in 0..BLOCKS {
        for (time, _) in floor_runs(floor, RUNS_PER_BLOCK) {
            floor_ms.push(time.as_secs_f64() * 1e3);
        }
        for _ in 0..RUNS_PER_BLOCK {
            let report = scanner.scan();
            assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
            walk_ms.push(report.walk_seconds * 1e3);
            scan_ms.push(report.duration_seconds * 1e3);
            tasks.push(report.tasks_scanned as f64);
        }
    }
    drop(helpers);
    Measurement {
        tasks: median(tasks) as u64,
        floor_ms: median(floor_ms),
        walk_ms: median(walk_ms),
        scan_ms: median(scan_ms),
    }
}

fn main() {
    let _pid_max = Sysctl::at_least("/proc/sys/kernel/pid_max", 4_194_304);
    let _threads_max = Sysctl::at_least("/proc/sys/kernel/threads-max", 120_000);
    let floor = support::helper_binary("procscan_floor");
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>7} {:>12}",
        "tasks", "floor ms", "walk ms", "scan ms", "ratio", "µs per task"
    );
    let results: Vec<Measurement> = [10_000, 50_000]
        .into_iter()
        .map(|total| {
            let r = measure(total, &floor);
            println!(
                "{:>8} {:>10.2} {:>10.2} {:>10.2} {:>7.2} {:>12.3}",
                r.tasks,
                r.floor_ms,
                r.walk_ms,
                r.scan_ms,
                r.scan_ms / r.floor_ms,
                r.scan_ms * 1e3 / r.tasks as f64
            );
            r
        })
        .collect();
    if let [small, large] = results.as_slice() {
        let task_growth = large.tasks as f64 / small.tasks as f64;
        println!(
            "linearity: tasks x{:.2}, scan time x{:.2}, floor time x{:.2}",
            task_growth,
            large.scan_ms / small.scan_ms,
            large.floor_ms / small.floor_ms
        );
    }
}
