//! An OOM storm through the real `/dev/kmsg` against a running `hangwatch run` (private state
//! dir, no runtimes): kill records of `runc:[2:INIT]` in the kernel 6.x format, two records
//! per kill (`oom-kill:...` then `Memory cgroup out of memory: Killed process ...`), written at
//! level 6 at a paced rate of *records* per second. Reports CPU per record (utime + stime from
//! `/proc/<pid>/stat`, the whole process, idle work included), records lost (hangwatch's own
//! metric, and what was written but never read), kills counted, and peak RSS (VmHWM) against
//! the idle RSS before the flood. A fresh daemon per case, logging at the default level.
//!
//! Cases (all by default, or those named as arguments): `2k` and `8k` (20,000 kills at 2,000
//! and 8,000 records/s), `8k-busy` (8k while two busy loops keep both cores busy), `storm`
//! (5,000 kills/min for `HANGWATCH_STORM_SECONDS`, 60 s by default; the 10 minutes
//! is `HANGWATCH_STORM_SECONDS=600`). `HANGWATCH_FLOOD_KILLS` changes the 20,000. The kernel's write rate limit is lifted
//! (`printk_devkmsg=on`) and restored, also when the bench panics. Run it under the real-tests
//! flock: it shares `/dev/kmsg` with every other test on the machine.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::hangwatch::{Hangwatch, TempDir, metric_value};
use support::{KilledOnDrop, Sysctl};

const CONTAINER: &str = "4f3c1e2d8b7a6950a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718";
const POD: &str = "pod0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b";
/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

fn proc_status_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of the whole process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the comm, state is index 0: utime (field 14) is index 11, stime index 12.
    field(11) + field(12)
}

/// The counters the bench compares with what it wrote.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    read: f64,
    lost: f64,
    kills: f64,
}

impl Counts {
    fn of(hw: &Hangwatch) -> Counts {
        let text = hw.metrics();
        let value =
            |name, labels: &[(&str, &str)]| metric_value(&text, name, labels).unwrap_or(0.0);
        Counts {
            read: value("hangwatch_kernel_log_records_total", &[]),
            lost: value("hangwatch_kernel_log_lost_records_total", &[]),
            kills: value(
                "hangwatch_oom_kills_total",
                &[("victim", "runc_init"), ("constraint", "memcg")],
            ),
        }
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            read: self.read - before.read,
            lost: self.lost - before.lost,
            kills: self.kills - before.kills,
        }
    }
}

/// Writes the kill pairs, one `write(2)` per record on one descriptor (the rate limit is off).
struct Writer {
    kmsg: std::fs::File,
    line: String,
    next_pid: u32,
}

impl Writer {
    fn open() -> Writer {
        Writer {
            kmsg: OpenOptions::new()
                .write(true)
                .open("/dev/kmsg")
                .expect("open /dev/kmsg for writing"),
            line: String::with_capacity(512),
            next_pid: 3_000_000,
        }
    }

    fn write_kill(&mut self) {
        let pid = self.next_pid;
        self.next_pid += 1;
        let memcg = format!("/kubepods/burstable/{POD}/{CONTAINER}");
        self.line.clear();
        let _ = writeln!(
            self.line,
            "<6>oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={CONTAINER},mems_allowed=0,oom_memcg={memcg},task_memcg={memcg},task=runc:[2:INIT],pid={pid},uid=0"
        );
        self.kmsg
            .write_all(self.line.as_bytes())
            .expect("write /dev/kmsg");
        self.line.clear();
        let _ = writeln!(
            self.line,
            "<6>Memory cgroup out of memory: Killed process {pid} (runc:[2:INIT]) total-vm:1100228kB, anon-rss:19872kB, file-rss:4236kB, shmem-rss:0kB, UID:0 pgtables:212kB oom_score_adj:-998"
        );
        self.kmsg
            .write_all(self.line.as_bytes())
            .expect("write /dev/kmsg");
    }

    /// `kills` pairs at `records_per_second`, paced every half millisecond.
    fn flood(&mut self, kills: u64, records_per_second: f64) -> Duration {
        let started = Instant::now();
        let mut written = 0;
        while written < kills {
            let due = (started.elapsed().as_secs_f64() * records_per_second / 2.0) as u64;
            while written < due.min(kills) {
                self.write_kill();
                written += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        started.elapsed()
    }
}

/// Two busy loops, one per core, killed (by their pid) when dropped.
fn busy_loops() -> Vec<KilledOnDrop> {
    (0..2)
        .map(|_| {
            KilledOnDrop(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("start a busy loop"),
            )
        })
        .collect()
}

fn start_daemon(dir: &TempDir) -> Hangwatch {
    let config = format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\nkernel_log:\n  accept_non_kernel: true\n",
        dir.path().display()
    );
    // The default log level: the support module starts the daemon at debug.
    let hw = Hangwatch::start_with(&config, dir.path(), |command| {
        command.env("RUST_LOG", "info");
    });
    // Let start-up (first scan of the kernel buffer, first /proc scan) settle.
    std::thread::sleep(Duration::from_secs(3));
    hw
}

/// Wait until every record written is read or counted lost (the detector hands its counters
/// over once a second), at most 30 s.
fn wait_for_records(hw: &Hangwatch, before: Counts, records: f64) -> Counts {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = Counts::of(hw).since(before);
        if counts.read + counts.lost >= records || Instant::now() > give_up {
            return counts;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn flood_case(name: &str, kills: u64, records_per_second: f64, busy: bool) {
    let dir = TempDir::new("bench-flood");
    let hw = start_daemon(&dir);
    let pid = hw.pid();
    let idle_rss = proc_status_kib(pid, "VmRSS:");
    let idle_hwm = proc_status_kib(pid, "VmHWM:");
    let before = Counts::of(&hw);
    let _busy = busy.then(busy_loops);
    let mut writer = Writer::open();
    let ticks_before = cpu_ticks(pid);
    let took = writer.flood(kills, records_per_second);
    let records = 2.0 * kills as f64;
    let counts = wait_for_records(&hw, before, records);
    let cpu_seconds = (cpu_ticks(pid) - ticks_before) as f64 / TICKS_PER_SECOND;
    let peak = proc_status_kib(pid, "VmHWM:");
    println!(
        "{name}: {kills} kills = {records} records in {:.1} s ({:.0} records/s){}",
        took.as_secs_f64(),
        records / took.as_secs_f64(),
        if busy { ", both cores kept busy" } else { "" }
    );
    println!(
        "  kills counted {}/{kills}; records lost {} (metric), {} written but not read; CPU {:.2} s = {:.1} µs/record",
        counts.kills,
        counts.lost,
        (records - counts.read).max(0.0),
        cpu_seconds,
        1e6 * cpu_seconds / records
    );
    println!(
        "  RSS idle {:.1} MiB (high-water mark before the flood {:.1} MiB), peak {:.1} MiB = idle + {:.2} MiB",
        idle_rss as f64 / 1024.0,
        idle_hwm as f64 / 1024.0,
        peak as f64 / 1024.0,
        (peak as f64 - idle_rss as f64) / 1024.0
    );
}

fn storm_case() {
    let seconds: u64 = std::env::var("HANGWATCH_STORM_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = TempDir::new("bench-storm");
    let hw = start_daemon(&dir);
    let pid = hw.pid();
    // Idle first (as long as the storm, at most 2 minutes), to tell the storm's share from the
    // daemon's own.
    let idle_seconds = seconds.min(120);
    let idle_ticks = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(idle_seconds));
    let idle_cpu = (cpu_ticks(pid) - idle_ticks) as f64 / TICKS_PER_SECOND;
    let idle_rss = proc_status_kib(pid, "VmRSS:");
    let before = Counts::of(&hw);
    let kills = 5_000 * seconds / 60;
    let mut writer = Writer::open();
    let ticks_before = cpu_ticks(pid);
    let took = writer.flood(kills, 2.0 * 5_000.0 / 60.0);
    let cpu = (cpu_ticks(pid) - ticks_before) as f64 / TICKS_PER_SECOND;
    let counts = wait_for_records(&hw, before, 2.0 * kills as f64);
    let wall = took.as_secs_f64();
    println!(
        "storm: 5,000 kills/min for {wall:.0} s: {} kills counted of {kills}, {} lost; RSS idle {:.1} MiB, peak {:.1} MiB",
        counts.kills,
        counts.lost,
        idle_rss as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    println!(
        "  CPU {:.3} % of one core during the storm, {:.3} % idle before it: the storm costs {:.3} %",
        100.0 * cpu / wall,
        100.0 * idle_cpu / idle_seconds as f64,
        100.0 * (cpu / wall - idle_cpu / idle_seconds as f64)
    );
}

fn main() {
    let chosen: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |case: &str| chosen.is_empty() || chosen.iter().any(|c| c == case);
    let kills: u64 = std::env::var("HANGWATCH_FLOOD_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let _unlimited = Sysctl::set("/proc/sys/kernel/printk_devkmsg", "on");
    if wanted("2k") {
        flood_case("2k", kills, 2_000.0, false);
    }
    if wanted("8k") {
        flood_case("8k", kills, 8_000.0, false);
    }
    if wanted("8k-busy") {
        flood_case("8k-busy", kills, 8_000.0, true);
    }
    if wanted("storm") {
        storm_case();
    }
}
