//! Which process to signal, and signalling it safely.
//!
//! The daemon is the process that owns the listening socket hangwatch probes: the socket's
//! path is looked up in the candidate's `/proc/<pid>/net/unix` (its own network namespace),
//! and the inode found there must be one of its fds. A pidfile is the fallback. Either way the
//! executable is verified before anything is sent, and the signal goes through a pidfd opened
//! *before* the verification, so a PID reused in between can never be signalled.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use serde::Serialize;

use crate::domain::Runtime;

/// Executable names a runtime's daemon runs as (Docker ≤ 17.x shipped `docker-containerd`).
fn executables(daemon: Runtime) -> &'static [&'static str] {
    match daemon {
        Runtime::Docker => &["dockerd"],
        Runtime::Containerd => &["containerd", "docker-containerd"],
        Runtime::Cri => &["containerd", "crio", "cri-dockerd"],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FoundBy {
    SocketOwner,
    Pidfile,
}

/// A verified daemon process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    #[serde(with = "crate::domain::as_daemon")]
    pub daemon: Runtime,
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of stat): identifies the process.
    pub start_time: u64,
    pub found_by: FoundBy,
}

/// Find the daemon serving `socket`, else the one named by `pidfile`.
pub fn resolve(
    daemon: Runtime,
    socket: &Path,
    pidfile: Option<&Path>,
    proc_root: &Path,
) -> Result<Target, String> {
    if let Some(target) = socket_owner(daemon, socket, proc_root) {
        return Ok(target);
    }
    let name = daemon.daemon_name();
    let Some(pidfile) = pidfile.filter(|p| !p.as_os_str().is_empty()) else {
        return Err(format!(
            "no {name} process owns {} and no pidfile is configured",
            socket.display()
        ));
    };
    let text = fs::read_to_string(pidfile).map_err(|e| {
        format!(
            "no {name} owns {}; pidfile {}: {e}",
            socket.display(),
            pidfile.display()
        )
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        format!(
            "pidfile {} does not hold a pid: {:?}",
            pidfile.display(),
            text.trim()
        )
    })?;
    verify(daemon, pid, proc_root, FoundBy::Pidfile)
}

/// Check that `pid` runs one of the daemon's executables; return its identity.
pub fn verify(
    daemon: Runtime,
    pid: i32,
    proc_root: &Path,
    found_by: FoundBy,
) -> Result<Target, String> {
    let dir = proc_root.join(pid.to_string());
    let exe = fs::read_link(dir.join("exe"))
        .map_err(|e| format!("pid {pid}: cannot read its executable: {e}"))?;
    let name = executable_name(&exe);
    if !executables(daemon).contains(&name.as_str()) {
        return Err(format!(
            "pid {pid} runs {} which is not {}: refusing to signal it",
            exe.display(),
            daemon.daemon_name()
        ));
    }
    let stat = fs::read_to_string(dir.join("stat")).map_err(|e| format!("pid {pid}: {e}"))?;
    let start_time = stat_start_time(&stat).ok_or_else(|| format!("pid {pid}: unreadable stat"))?;
    Ok(Target {
        daemon,
        pid,
        start_time,
        found_by,
    })
}

/// `/usr/bin/dockerd (deleted)` (binary upgraded under a running daemon) → `dockerd`.
fn executable_name(exe: &Path) -> String {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(" (deleted)").to_string()
}

/// Start time (field 22) from the text of `/proc/<pid>/stat`; the comm may hold spaces and
/// parentheses, so fields are counted after the last `)`.
fn stat_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn socket_owner(daemon: Runtime, socket: &Path, proc_root: &Path) -> Option<Target> {
    let wanted = fs::metadata(socket).ok().map(|m| (m.dev(), m.ino()));
    let entries = fs::read_dir(proc_root).ok()?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let dir = entry.path();
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !executables(daemon)
            .iter()
            .any(|e| e.starts_with(comm.trim()))
        {
            continue;
        }
        let Ok(table) = fs::read_to_string(dir.join("net/unix")) else {
            continue;
        };
        let same_file =
            |bound: &Path| bound == socket || wanted.is_some_and(|w| same_inode(&dir, bound, w));
        let inodes = listening_inodes(&table, same_file);
        if inodes.is_empty() || !holds_socket(&dir, &inodes) {
            continue;
        }
        if let Ok(target) = verify(daemon, pid, proc_root, FoundBy::SocketOwner) {
            return Some(target);
        }
    }
    None
}

/// Whether `bound` (a path as the daemon sees it) is the file `wanted` (device, inode) we
/// dial. Looked up through the daemon's own root, so it holds across mount namespaces and
/// when hangwatch sees the socket elsewhere (e.g. host /run mounted at /host/run).
fn same_inode(process_dir: &Path, bound: &Path, wanted: (u64, u64)) -> bool {
    let relative = bound.strip_prefix("/").unwrap_or(bound);
    fs::metadata(process_dir.join("root").join(relative))
        .is_ok_and(|m| (m.dev(), m.ino()) == wanted)
}

/// Inodes of listening sockets whose bound path `is_ours`, from `/proc/<pid>/net/unix`:
/// `Num RefCount Protocol Flags Type St Inode Path`, flag 0x10000 = listening.
fn listening_inodes(table: &str, is_ours: impl Fn(&Path) -> bool) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
            let inode: u64 = fields.get(6)?.parse().ok()?;
            let path = Path::new(fields.get(7)?);
            (flags & 0x10000 != 0 && is_ours(path)).then_some(inode)
        })
        .collect()
}

fn holds_socket(dir: &Path, inodes: &[u64]) -> bool {
    let Ok(fds) = fs::read_dir(dir.join("fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path()).ok().is_some_and(|link| {
            let link = link.to_string_lossy();
            link.strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| inodes.contains(&n))
        })
    })
}

/// Send SIGUSR1 to `target` if, and only if, it is still the same verified process.
/// Never SIGQUIT: Go dumps on SIGQUIT but then exits.
pub fn send_dump_signal(target: &Target, proc_root: &Path) -> Result<(), String> {
    let pid = Pid::from_raw(target.pid).ok_or_else(|| format!("invalid pid {}", target.pid))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())
        .map_err(|e| format!("pidfd_open({}): {e}", target.pid))?;
    let now = verify(target.daemon, target.pid, proc_root, target.found_by)?;
    if now.start_time != target.start_time {
        return Err(format!(
            "pid {} is now another process (start time changed): not signalling",
            target.pid
        ));
    }
    // The pidfd polls readable once its process has exited: if it has not, the process we
    // just verified through /proc is the one the pidfd names.
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let no_wait = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let ready = poll(&mut fds, Some(&no_wait)).map_err(|e| format!("poll(pidfd): {e}"))?;
    if ready > 0 {
        return Err(format!(
            "{} (pid {}) exited before it could be signalled",
            target.daemon, target.pid
        ));
    }
    pidfd_send_signal(pidfd.as_fd(), Signal::USR1)
        .map_err(|e| format!("pidfd_send_signal({}, SIGUSR1): {e}", target.pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_after_a_comm_with_spaces_and_parens() {
        let stat = "42 (weird) name) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 1";
        assert_eq!(stat_start_time(stat), Some(98765));
        assert_eq!(stat_start_time("garbage"), None);
    }

    #[test]
    fn deleted_binary_still_matches() {
        assert_eq!(
            executable_name(Path::new("/usr/bin/dockerd (deleted)")),
            "dockerd"
        );
        assert_eq!(
            executable_name(Path::new("/usr/bin/containerd")),
            "containerd"
        );
    }

    #[test]
    fn only_listening_sockets_on_the_path() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 111 /run/docker.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 222 /run/docker.sock\n\
            0000000000000000: 00000002 00000000 00010000 0001 01 333 /run/other.sock\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 444\n";
        let ours = |p: &Path| p == Path::new("/run/docker.sock");
        assert_eq!(listening_inodes(table, ours), vec![111]);
        assert!(listening_inodes("garbage\nnot a table", ours).is_empty());
    }
}
