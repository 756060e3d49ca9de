//! The scanner over hand-written /proc and cgroup trees of two kinds of node:
//! - `v2-kubepods-systemd`: pure cgroup v2, kubelet's systemd driver, CRI-O and containerd
//!   containers, a paused container, a shim thread in D, a `runc` blocked on its fifo and a
//!   `runc:[2:INIT]` waiting for its start;
//! - `v1-docker`: hybrid cgroups, Docker with cgroupfs, a kubelet cgroupfs pod, a paused
//!   container, dockerd in D, and a comm that imitates the rest of a stat line.
//!
//! - `waits`: what stuck tasks wait on where this machine cannot produce it — an NFS server
//!   gone, a device-mapper volume over NVMe, an NVMe namespace written directly.
//!
//! Files follow the kernel's layouts (`<pid>/task/<tid>/{stat,wchan,stack,cgroup,syscall}`,
//! `<pid>/fd/*` links, `uptime`; `freezer.state`, `cgroup.events`). They carry no `mem`, as when
//! hangwatch lacks ptrace access: a blocked open then has no path.

mod support;

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangwatch::config::Config;
use hangwatch::sources::procscan::detect::{
    Direction, ProcScanner, RuntimeKind, ScanReport, Scope, StuckTask, WaitClass,
};

fn scan(node: &str) -> ScanReport {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/proc")
        .join(node);
    let mut config = Config::default();
    config.proc_scan.proc_root = root.join("proc");
    config.proc_scan.cgroup_root = root.join("cgroup");
    config.proc_scan.sys_root = root.join("sys");
    config.proc_scan.stuck_after = Duration::ZERO;
    let report = ProcScanner::new(&config).scan();
    assert_eq!(report.errors.total(), 0, "{:?}", report.errors);
    report
}

fn stuck(report: &ScanReport, tid: i32) -> &StuckTask {
    report
        .stuck_tasks
        .iter()
        .find(|t| t.tid == tid)
        .unwrap_or_else(|| panic!("task {tid} not stuck: {report:#?}"))
}

#[test]
fn v2_kubepods_node_attributes_crio_and_containerd_containers_to_pods() {
    let report = scan("v2-kubepods-systemd");
    assert_eq!(report.processes_scanned, 9);
    assert_eq!(report.tasks_scanned, 14);

    let postgres = stuck(&report, 4107);
    assert_eq!((postgres.pid, postgres.comm.as_str()), (4101, "postgres"));
    assert_eq!(postgres.scope, Scope::Container);
    assert_eq!(
        postgres.owner.container_id.as_deref(),
        Some("4c8e2a9f3b7d1e6c0a5f8b2d9e4c7a1f3b6d0e8c2a5f9b7d4e1c6a3f0b8d2e5c")
    );
    assert_eq!(
        postgres.owner.pod_uid.as_deref(),
        Some("6f1c3f4e-2b8a-4d51-9c3e-7a0b1d2e3f40")
    );
    assert_eq!(postgres.owner.runtime, Some("crio"));
    assert_eq!(postgres.owner.qos, Some("burstable"));
    assert_eq!(postgres.wchan.as_deref(), Some("rpc_wait_bit_killable"));
    let stack = postgres.kernel_stack.as_ref().unwrap();
    assert_eq!(stack[0], "rpc_wait_bit_killable+0x11/0x70 [sunrpc]");
    assert_eq!(stack.len(), 14);

    let java = stuck(&report, 4201);
    assert_eq!(java.scope, Scope::Container);
    assert_eq!(
        java.owner.container_id.as_deref(),
        Some("9a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9")
    );
    assert_eq!(
        java.owner.pod_uid.as_deref(),
        Some("0a9e8d7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c")
    );
    assert_eq!(java.owner.runtime, Some("containerd"));
    assert_eq!(java.owner.qos, Some("besteffort"));
    assert_eq!(java.kernel_stack, None, "no stack file: None, not an error");

    let kworker = stuck(&report, 77);
    assert_eq!(kworker.scope, Scope::Host);
    assert_eq!(kworker.comm, "kworker/u8:2+flush-8:0");

    let shim_thread = stuck(&report, 885);
    assert_eq!(shim_thread.scope, Scope::Runtime);

    // The paused container (cgroup.events: frozen 1) is frozen, not stuck.
    assert!(!report.stuck_tasks.iter().any(|t| t.pid == 4301));
    assert_eq!(report.frozen.tasks, 1);
    assert_eq!(report.frozen.by_container.len(), 1);
    assert_eq!(
        report.frozen.by_container[0].owner.pod_uid.as_deref(),
        Some("3d2c1b0a-9f8e-4d7c-a6b5-c4d3e2f1a0b9")
    );
    assert_eq!(report.frozen.by_container[0].owner.qos, Some("guaranteed"));

    assert_eq!(report.stuck_tasks.len(), 4);
    assert_eq!(report.dstate.container, 2);
    assert_eq!(report.dstate.runtime, 1);
    assert_eq!(report.dstate.host, 1);
    assert_eq!(report.dstate_not_stuck, 0);
    assert_eq!(report.containers.len(), 2);
    for container in &report.containers {
        assert_eq!((container.dstate_tasks, container.stuck_tasks), (1, 1));
    }
}

#[test]
fn v2_kubepods_node_reports_stuck_runc_init_and_shim() {
    let report = scan("v2-kubepods-systemd");
    let kinds: Vec<(RuntimeKind, i32)> = report
        .runtime_processes
        .iter()
        .map(|p| (p.kind, p.pid))
        .collect();
    // runc 1300 is 10 s old: below runc_stuck_after.
    assert_eq!(
        kinds,
        [
            (RuntimeKind::Runc, 1200),
            (RuntimeKind::RuncInit, 4401),
            (RuntimeKind::Shim, 880)
        ]
    );
    assert_eq!(report.runtime_count(RuntimeKind::Runc), 1);

    // The serialized form carries the label values the engine uses.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["runtime_processes"][0]["kind"], "runc");
    assert_eq!(json["runtime_processes"][1]["kind"], "runc_init");
    assert_eq!(
        json["runtime_processes"][1]["threads"][0]["opening"]["direction"],
        "write"
    );
    let mut scopes: Vec<&str> = json["stuck_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["scope"].as_str())
        .collect();
    scopes.sort();
    assert_eq!(scopes, ["container", "container", "host", "runtime"]);

    let runc = &report.runtime_processes[0];
    assert_eq!(runc.age_seconds, 50_000.0);
    assert_eq!(runc.threads.len(), 2);
    let opener = &runc.threads[1];
    assert_eq!(opener.tid, 1203);
    assert_eq!(opener.wchan.as_deref(), Some("wait_for_partner"));
    assert_eq!(opener.syscall, Some(257));
    let opening = opener.opening.as_ref().unwrap();
    assert_eq!(opening.direction, Direction::Read);
    assert_eq!(opening.path, None, "no mem file: the path is unknown");
    assert_eq!(runc.threads[0].opening, None, "futex is not an open");
    assert_eq!(runc.exec_fifo, None);

    let init = &report.runtime_processes[1];
    assert_eq!(init.comm, "runc:[2:INIT]");
    assert_eq!(init.age_seconds, 2_000.0);
    let id = "7e6d5c4b3a291807f6e5d4c3b2a1908f7e6d5c4b3a291807f6e5d4c3b2a1908f";
    assert_eq!(init.owner.container_id.as_deref(), Some(id));
    assert_eq!(
        init.owner.pod_uid.as_deref(),
        Some("0a9e8d7c-6b5a-4f3e-8d2c-1b0a9f8e7d6c")
    );
    let fifo = init.exec_fifo.as_ref().unwrap();
    assert_eq!(
        fifo.path,
        format!("/run/containerd/runc/k8s.io/{id}/exec.fifo")
    );
    assert_eq!(fifo.container_id.as_deref(), Some(id));
    assert!(fifo.held);
    assert_eq!(fifo.partner_pid, None);
    assert_eq!(
        init.threads[0].opening.as_ref().unwrap().direction,
        Direction::Write
    );

    let shim = &report.runtime_processes[2];
    assert_eq!(shim.comm, "containerd-shim");
    assert_eq!(shim.age_seconds, 10_000.0);
    assert_eq!(shim.threads.len(), 1);
    assert_eq!(shim.threads[0].tid, 885);
    assert_eq!(
        shim.threads[0].wchan.as_deref(),
        Some("folio_wait_bit_common")
    );
    assert!(shim.threads[0].seconds_in_d.is_some());
}

#[test]
fn v1_docker_node_attributes_docker_and_cgroupfs_kubepods() {
    let report = scan("v1-docker");
    assert_eq!(report.processes_scanned, 6);
    assert_eq!(report.tasks_scanned, 8);

    let mysqld = stuck(&report, 2310);
    assert_eq!(mysqld.pid, 2301);
    assert_eq!(mysqld.scope, Scope::Container);
    assert_eq!(
        mysqld.owner.container_id.as_deref(),
        Some("d1d2d3d4d5d6d7d8d9d0e1e2e3e4e5e6e7e8e9e0f1f2f3f4f5f6f7f8f9f0a1a2")
    );
    assert_eq!(mysqld.owner.runtime, Some("docker"));
    assert_eq!(mysqld.owner.pod_uid, None);
    assert_eq!(mysqld.wchan.as_deref(), Some("jbd2_log_wait_commit"));

    let java = stuck(&report, 2501);
    assert_eq!(java.scope, Scope::Container);
    assert_eq!(
        java.owner.container_id.as_deref(),
        Some("f0e1d2c3b4a5968778695a4b3c2d1e0ff0e1d2c3b4a5968778695a4b3c2d1e0f")
    );
    assert_eq!(
        java.owner.pod_uid.as_deref(),
        Some("8b7a6c5d-4e3f-4a2b-9c1d-0e9f8a7b6c5d")
    );
    assert_eq!(java.owner.qos, Some("burstable"));

    let dockerd = stuck(&report, 1507);
    assert_eq!((dockerd.pid, dockerd.scope), (1500, Scope::Runtime));
    assert!(!dockerd.owner.is_container());

    let evil = stuck(&report, 3001);
    assert_eq!(evil.comm, "evil) D 1 (x");
    assert_eq!(evil.scope, Scope::Host);

    // `docker pause` on cgroup v1: freezer.state FROZEN.
    assert!(!report.stuck_tasks.iter().any(|t| t.pid == 2401));
    assert_eq!(report.frozen.tasks, 1);
    assert_eq!(
        report.frozen.by_container[0].owner.container_id.as_deref(),
        Some("e5e4e3e2e1e0d9d8d7d6d5d4d3d2d1d0c9c8c7c6c5c4c3c2c1c0b9b8b7b6b5b4")
    );

    assert_eq!(report.dstate.container, 2);
    assert_eq!(report.dstate.runtime, 1);
    assert_eq!(report.dstate.host, 1);
    assert!(report.runtime_processes.is_empty());
}

/// `status` files: the paused nginx has SIGKILL pending for its process (`ShdPnd`), a mysqld
/// thread in D for itself (`SigPnd`), java only SIGTERM; the host's `evil` has SIGKILL pending
/// too but is no container's (its status is never read).
#[test]
fn v1_docker_node_lists_container_tasks_with_sigkill_pending_frozen_or_in_d() {
    let report = scan("v1-docker");
    let mut killed: Vec<(i32, &str, bool)> = report
        .kill_pending
        .iter()
        .map(|t| (t.tid, t.comm.as_str(), t.frozen))
        .collect();
    killed.sort_unstable();
    assert_eq!(killed, [(2310, "mysqld", false), (2401, "nginx", true)]);
    let nginx = report
        .kill_pending
        .iter()
        .find(|t| t.tid == 2401)
        .expect("nginx");
    assert_eq!(
        nginx.owner.container_id.as_deref(),
        Some("e5e4e3e2e1e0d9d8d7d6d5d4d3d2d1d0c9c8c7c6c5c4c3c2c1c0b9b8b7b6b5b4")
    );
    assert_eq!(nginx.seconds_pending, 0.0, "first seen by this scan");
    assert_eq!(report.kill_pending_unread, 0);
}

#[test]
fn durations_accumulate_across_scans_of_the_same_tree() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc/v1-docker");
    let mut config = Config::default();
    config.proc_scan.proc_root = root.join("proc");
    config.proc_scan.cgroup_root = root.join("cgroup");
    config.proc_scan.stuck_after = Duration::from_millis(50);
    let mut scanner = ProcScanner::new(&config);
    let first_seen = Instant::now();
    let first = scanner.scan();
    assert!(first.stuck_tasks.is_empty());
    assert_eq!(first.dstate_not_stuck, 4);
    let (second, _) = support::wait_for(
        "the D tasks to become stuck",
        Duration::from_secs(10),
        || {
            let report = scanner.scan();
            (!report.stuck_tasks.is_empty()).then_some(report)
        },
    );
    assert!(first_seen.elapsed() >= Duration::from_millis(50));
    assert_eq!(second.stuck_tasks.len(), 4);
    assert!(second.stuck_tasks.iter().all(|t| t.seconds_in_d >= 0.05));
    let container = &second.containers[0];
    assert!(container.max_seconds_in_d >= 0.05);
}

/// A detail read that never returns: a task whose `cgroup` file is a fifo with no writer, so
/// opening it blocks like a read stuck on a kernel lock. Each scan loses at most one
/// `read_deadline` to it, and once `MAX_ABANDONED_READERS` (4) readers are stuck the scanner
/// stops trying until they come back.
#[test]
fn a_hung_detail_read_never_hangs_the_scan() {
    let root = std::env::temp_dir().join(format!("procscan-hung-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let task = root.join("proc/50/task/50");
    std::fs::create_dir_all(&task).unwrap();
    std::fs::write(root.join("proc/uptime"), "100.00 150.00\n").unwrap();
    std::fs::write(
        task.join("stat"),
        "50 (app) D 1 50 50 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 900 0 0\n",
    )
    .unwrap();
    std::fs::write(task.join("wchan"), "folio_wait_bit_common").unwrap();
    let cgroup = task.join("cgroup");
    nix::unistd::mkfifo(&cgroup, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();

    let read_deadline = Duration::from_millis(200);
    let mut config = Config::default();
    config.proc_scan.proc_root = root.join("proc");
    config.proc_scan.cgroup_root = root.join("cgroup");
    config.proc_scan.stuck_after = Duration::ZERO;
    config.proc_scan.read_deadline = read_deadline;
    let mut scanner = ProcScanner::new(&config);
    for abandoned in 1..=4 {
        let start = Instant::now();
        let report = scanner.scan();
        let took = start.elapsed();
        assert!(
            took >= read_deadline && took < read_deadline * 5,
            "{took:?}"
        );
        assert_eq!(report.errors.detail_timeouts, 1);
        assert_eq!(report.errors.abandoned_readers, abandoned);
        let stuck = &report.stuck_tasks[0];
        assert!(!stuck.owner.is_container());
        if abandoned < 4 {
            // The rest of the scan went on with a fresh reader.
            assert_eq!(stuck.wchan.as_deref(), Some("folio_wait_bit_common"));
        } else {
            // At the cap: wchan, stack and the wait chain are not attempted.
            assert_eq!(
                (stuck.wchan.as_deref(), report.errors.detail_skipped),
                (None, 3)
            );
            assert_eq!(stuck.wait, None);
        }
    }
    let start = Instant::now();
    let report = scanner.scan();
    assert!(start.elapsed() < read_deadline, "at the cap nothing waits");
    assert_eq!(report.errors.detail_timeouts, 0);
    assert!(report.errors.detail_skipped >= 1);
    assert_eq!(report.stuck_tasks.len(), 1, "the task is still reported");

    // The reads come back: the stuck readers exit and attribution works again.
    let id = "c".repeat(64);
    let replacement = root.join("cgroup.new");
    std::fs::write(
        &replacement,
        format!("0::/system.slice/docker-{id}.scope\n"),
    )
    .unwrap();
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&cgroup)
        .expect("readers are waiting on the fifo");
    std::fs::rename(&replacement, &cgroup).unwrap();
    drop(writer);
    let (report, _) = support::wait_for("the readers to recover", Duration::from_secs(10), || {
        let report = scanner.scan();
        (report.errors.abandoned_readers == 0 && report.stuck_tasks[0].owner.is_container())
            .then_some(report)
    });
    assert_eq!(
        report.stuck_tasks[0].owner.container_id.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(report.errors.total(), 0);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn waits_on_an_nfs_server_a_dm_volume_and_an_nvme_namespace() {
    let report = scan("waits");
    assert_eq!(report.stuck_tasks.len(), 3);

    let postgres = stuck(&report, 3101).wait.as_ref().unwrap();
    assert_eq!(postgres.class, WaitClass::FsServer);
    assert_eq!((postgres.syscall, postgres.fd), (Some(0), Some(5)));
    let nfs = postgres.mount.as_ref().unwrap();
    assert_eq!(
        (
            nfs.fstype.as_str(),
            nfs.mount_point.as_str(),
            nfs.server.as_deref()
        ),
        ("nfs4", "/var/lib/pg", Some("10.0.0.5"))
    );
    assert_eq!(
        postgres.block_device, None,
        "an NFS mount has no block device"
    );
    assert_eq!(
        postgres.describe(),
        "a filesystem server on /var/lib/pg/base/16384/1259, nfs4 mount /var/lib/pg from server 10.0.0.5"
    );
    assert_eq!(
        postgres.kernel_stack_omitted.as_deref(),
        Some("not provided by this kernel or gone")
    );

    let java = stuck(&report, 3201).wait.as_ref().unwrap();
    assert_eq!(java.class, WaitClass::BlockIo);
    assert_eq!(java.file.as_deref(), Some("/data/db/commit.log"));
    let dm = java.block_device.as_ref().unwrap();
    assert_eq!((dm.name.as_str(), dm.dev.as_str()), ("dm-0", "253:0"));
    assert_eq!(dm.dm_name.as_deref(), Some("vg0-data"));
    assert_eq!(dm.slaves, ["nvme0n1"]);
    assert_eq!(dm.inflight, Some([0, 3]));
    assert_eq!(
        java.describe(),
        "block I/O on /data/db/commit.log, xfs mount /data (/dev/mapper/vg0-data); \
         on /dev/dm-0: device-mapper vg0-data over nvme0n1, 3 request(s) in flight"
    );

    let dd = stuck(&report, 3301).wait.as_ref().unwrap();
    assert_eq!(dd.class, WaitClass::BlockIo);
    let nvme = dd.block_device.as_ref().unwrap();
    assert_eq!(nvme.name, "nvme0n1");
    assert_eq!(nvme.model.as_deref(), Some("Samsung SSD 980 PRO 1TB"));
    assert_eq!(nvme.serial.as_deref(), Some("S5GXNX0R123456"));
    assert_eq!(nvme.inflight, Some([0, 12]));
    assert_eq!(nvme.completed_ios, Some(81234 + 551234));
    assert_eq!(nvme.progressing, None, "first sighting");
    assert_eq!(
        dd.describe(),
        "block I/O to /dev/nvme0n1, Samsung SSD 980 PRO 1TB serial S5GXNX0R123456; \
         12 request(s) in flight"
    );
}
