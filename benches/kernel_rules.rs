//! Records per second through parse → facility filter → rules → OOM correlator on one core,
//! with the built-in rules and a realistic mix: most records match nothing, some come from
//! userspace, a few are OOM sequences (header, task table, summary, kill) and hung tasks.
//!
//! Then the same through an OOM storm alone: every record is half of a kill of
//! `runc:[2:INIT]` (the summary line, then the kill), as the kernel 6.x logs them.
//!
//! `cargo bench --bench kernel_rules`. Target: at least 500k records/s.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hangwatch::config::KernelLogConfig;
use hangwatch::sources::kernel::detect::{Pipeline, parse_record};

const RECORDS: usize = 200_000;
const ROUNDS: usize = 5;

const CONTAINER: &str = "cfc5e58cb4a990e6c9fedaf9a71d71688c0ef4455a81767a51b403512c0d2cee";

/// Ordinary kernel chatter, as a busy container node logs it.
const NOISE: [&str; 12] = [
    "docker0: port 3(veth4c1e2f0) entered blocking state",
    "docker0: port 3(veth4c1e2f0) entered forwarding state",
    "IPv6: ADDRCONF(NETDEV_CHANGE): veth4c1e2f0: link becomes ready",
    "eth0: renamed from veth91ab3c2",
    "EXT4-fs (dm-3): mounted filesystem with ordered data mode. Opts: (null)",
    "overlayfs: upper fs does not support RENAME_WHITEOUT.",
    "audit: type=1400 audit(1700000000.123:456): apparmor=\"STATUS\" operation=\"profile_load\" name=\"docker-default\" pid=1234 comm=\"apparmor_parser\"",
    "TCP: request_sock_TCP: Possible SYN flooding on port 8080. Sending cookies.  Check SNMP counters.",
    "nfs: server 10.0.0.5 not responding, still trying",
    "device veth4c1e2f0 entered promiscuous mode",
    "IPVS: rr: TCP 10.96.0.1:443 - no destination available",
    "xfs filesystem being remounted at /var/lib/kubelet supports timestamps until 2038 (0x7fffffff)",
];

fn oom_sequence(pid: u32) -> Vec<String> {
    let mut lines = vec![
        "java invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0".to_string(),
        format!("CPU: 1 PID: {pid} Comm: java Not tainted 6.1.0-18-amd64 #1 Debian 6.1.76-1"),
        "Call Trace:".to_string(),
        " <TASK>".to_string(),
        " dump_stack_lvl+0x44/0x5c".to_string(),
        " dump_header+0x4a/0x211".to_string(),
        " oom_kill_process.cold+0xb/0x10".to_string(),
        " </TASK>".to_string(),
        "memory: usage 524288kB, limit 524288kB, failcnt 210".to_string(),
        format!("Memory cgroup stats for /docker/{CONTAINER}:"),
        "[  pid  ]   uid  tgid total_vm      rss pgtables_bytes swapents oom_score_adj name"
            .to_string(),
    ];
    for i in 0..8 {
        lines.push(format!(
            "[  {:>5}]  1000 {:>5}   100000    50000   800000        0             0 java",
            pid + i,
            pid + i
        ));
    }
    lines.push(format!("oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={CONTAINER},mems_allowed=0,oom_memcg=/docker/{CONTAINER},task_memcg=/docker/{CONTAINER},task=java,pid={pid},uid=1000"));
    lines.push(format!("Memory cgroup out of memory: Killed process {pid} (java) total-vm:400000kB, anon-rss:200000kB, file-rss:0kB, shmem-rss:0kB, UID:1000 pgtables:800kB oom_score_adj:0"));
    lines.push(format!(
        "oom_reaper: reaped process {pid} (java), now anon-rss:0kB, file-rss:0kB, shmem-rss:0kB"
    ));
    lines
}

/// The mix, as raw `/dev/kmsg` records with consecutive seqs.
fn corpus() -> Vec<Vec<u8>> {
    let mut records = Vec::with_capacity(RECORDS);
    let mut seq = 1000u64;
    let mut push = |records: &mut Vec<Vec<u8>>, pri: u32, message: &str| {
        records.push(format!("{pri},{seq},{},-;{message}\n", seq * 1000).into_bytes());
        seq += 1;
    };
    let mut i = 0usize;
    while records.len() < RECORDS {
        match i % 1000 {
            // One OOM sequence (24 records) and one hung task per 1000 iterations.
            0 => {
                for line in oom_sequence(10_000 + (i / 1000) as u32) {
                    push(&mut records, 3, &line);
                }
            }
            500 => push(
                &mut records,
                3,
                "INFO: task dockerd:812 blocked for more than 120 seconds.",
            ),
            n if n % 10 == 0 => push(
                &mut records,
                14,
                "Killed process 1 (forged) total-vm:1kB, anon-rss:1kB",
            ),
            n => push(&mut records, 6, NOISE[n % NOISE.len()]),
        }
        i += 1;
    }
    records.truncate(RECORDS);
    records
}

/// An OOM storm: kill pairs of `runc:[2:INIT]` in a pod's container, as the kernel 6.x logs them.
fn storm_corpus() -> Vec<Vec<u8>> {
    let memcg = format!("/kubepods/burstable/pod0f3e1b2c-4d5e-4f60-8a9b-0c1d2e3f4a5b/{CONTAINER}");
    let mut records = Vec::with_capacity(RECORDS);
    let mut seq = 1000u64;
    for pid in 3_000_000u32.. {
        if records.len() >= RECORDS {
            break;
        }
        for message in [
            format!(
                "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={CONTAINER},mems_allowed=0,oom_memcg={memcg},task_memcg={memcg},task=runc:[2:INIT],pid={pid},uid=0"
            ),
            format!(
                "Memory cgroup out of memory: Killed process {pid} (runc:[2:INIT]) total-vm:1100228kB, anon-rss:19872kB, file-rss:4236kB, shmem-rss:0kB, UID:0 pgtables:212kB oom_score_adj:-998"
            ),
        ] {
            records.push(format!("6,{seq},{},-;{message}\n", seq * 1000).into_bytes());
            seq += 1;
        }
    }
    records
}

/// Records per second through the pipeline: (median, best, events per round).
fn measure(records: &[Vec<u8>]) -> (f64, f64, usize) {
    let mut pipeline = Pipeline::new(
        &KernelLogConfig::default(),
        &["moby".into(), "k8s.io".into()],
    )
    .expect("built-in rules compile");
    let mut rates = Vec::new();
    let mut events = 0usize;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        for raw in records {
            if let Ok(record) = parse_record(black_box(raw)) {
                events += black_box(pipeline.process(&record)).len();
            }
        }
        let elapsed: Duration = started.elapsed();
        rates.push(records.len() as f64 / elapsed.as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    (rates[ROUNDS / 2], rates[ROUNDS - 1], events / ROUNDS)
}

fn main() {
    let (median, best, events) = measure(&corpus());
    println!(
        "kernel_rules: {RECORDS} records x {ROUNDS} rounds, {events} events per round; \
         median {median:.0} records/s, best {best:.0} records/s (one core; target 500000)",
    );
    let (median, best, events) = measure(&storm_corpus());
    println!(
        "kernel_rules, OOM storm: {RECORDS} records x {ROUNDS} rounds, {events} events per round; \
         median {median:.0} records/s ({:.2} µs/record), best {best:.0} records/s",
        1e6 / median,
    );
}
