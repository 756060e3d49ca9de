//! Runtime processes: which comms belong to the container runtime, and the evidence /proc
//! gives about a `runc` or `runc:[2:INIT]` that has lived too long.
//!
//! What the kernel shows of the exec-fifo hang (verified on 6.18): the blocked opener sleeps in
//! state S with wchan `wait_for_partner` (`pipe_wait` before 5.x) under `fifo_open`, and its
//! `syscall` file reads `257 0xffffff9c <path pointer> <flags> ...`. It has no descriptor for
//! the fifo yet, so `fd/` cannot name it; the path pointer can be read from `/proc/<pid>/mem`
//! (root), and flags tell the direction. runc's init holds the fifo as an `O_PATH` descriptor
//! and opens `/proc/self/fd/N` for writing, which resolves through its `fd/` links. Newer runc
//! opens the fifo on a separate thread, so every thread is examined. Without ptrace access the
//! path stays unknown; runc's arguments (`--root <dir> start <id>`: `<dir>/<id>/exec.fifo`)
//! would name it, but are not read.

use std::path::Path;

use super::files::{is_vanished, read_c_string, read_link, read_text};
use super::report::{BlockedOpen, Direction, ExecFifo, RuntimeKind, ThreadEvidence};
use super::stat::{parse_pid, parse_stat};

/// comm of a runtime process, as the kernel shows it (truncated to 15 bytes).
pub fn is_runtime_comm(comm: &[u8]) -> bool {
    matches!(
        comm,
        b"dockerd" | b"containerd" | b"runc" | b"docker-runc" | b"kubelet"
    ) || comm.starts_with(b"containerd-shim")
        // docker-containerd, docker-containerd-shim, docker-containerd-ctr: "docker-containe".
        || comm.starts_with(b"docker-containe")
        // runc:[0:PARENT], runc:[1:CHILD], runc:[2:INIT].
        || comm.starts_with(b"runc:[")
}

/// comm of a containerd shim (`containerd-shim`, `containerd-shim-runc-v2`, ...).
pub fn is_shim_comm(comm: &[u8]) -> bool {
    comm.starts_with(b"containerd-shim")
}

/// The runc kinds examined by age, from a process's comm.
pub fn runc_kind(comm: &[u8]) -> Option<RuntimeKind> {
    match comm {
        b"runc" | b"docker-runc" => Some(RuntimeKind::Runc),
        b"runc:[2:INIT]" => Some(RuntimeKind::RuncInit),
        _ => None,
    }
}

/// What was read about one runtime process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Examination {
    pub threads: Vec<ThreadEvidence>,
    /// Targets of its descriptors named `exec.fifo`.
    pub fifo_fds: Vec<String>,
    /// Its `cgroup` file, when readable.
    pub cgroup: Option<String>,
    /// Reads that failed for a reason other than the process going away.
    pub read_errors: u64,
}

impl Examination {
    /// The exec fifo a thread is blocked opening, and in which direction.
    fn blocked_fifo(&self) -> Option<(&str, Direction)> {
        self.threads
            .iter()
            .filter_map(|t| t.opening.as_ref())
            .find_map(|o| {
                let path = o.path.as_deref().filter(|p| is_exec_fifo(p))?;
                Some((path, o.direction))
            })
    }

    /// The exec fifo it is blocked opening, else one it holds. The partner is left for the
    /// caller, who knows the other processes.
    pub fn exec_fifo(&self) -> Option<ExecFifo> {
        let blocked = self.blocked_fifo();
        let path = blocked
            .map(|(p, _)| p)
            .or_else(|| self.fifo_fds.first().map(String::as_str))?;
        Some(ExecFifo {
            path: path.to_string(),
            container_id: fifo_container_id(path),
            held: self.fifo_fds.iter().any(|p| p == path),
            blocked_opening: blocked.map(|(_, d)| d),
            partner_pid: None,
        })
    }

    /// Holds `path` or is blocked opening it.
    pub fn touches(&self, path: &str) -> bool {
        self.fifo_fds.iter().any(|p| p == path)
            || self.blocked_fifo().is_some_and(|(p, _)| p == path)
    }
}

/// A system call in progress, from `/proc/<pid>/task/<tid>/syscall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallInProgress {
    pub number: u64,
    pub args: [u64; 6],
}

/// `nr arg1..arg6 sp pc` while blocked in a system call; `running` or `-1 sp pc` otherwise.
pub fn parse_syscall(line: &str) -> Option<SyscallInProgress> {
    let mut fields = line.split_whitespace();
    let number = fields.next()?.parse().ok()?;
    let mut args = [0u64; 6];
    for arg in &mut args {
        let field = fields.next()?;
        *arg = u64::from_str_radix(field.strip_prefix("0x")?, 16).ok()?;
    }
    Some(SyscallInProgress { number, args })
}

/// Read everything about process `pid` the fifo diagnosis needs. Runs on a reader thread.
pub fn examine(proc_root: &Path, pid: i32) -> Examination {
    let dir = proc_root.join(pid.to_string());
    let mut read_errors = 0;
    let mut note = |e: std::io::Error| {
        if !is_vanished(&e) {
            read_errors += 1;
        }
    };
    let mut threads = Vec::new();
    match std::fs::read_dir(dir.join("task")) {
        Ok(entries) => {
            let tids = entries
                .flatten()
                .filter_map(|e| parse_pid(e.file_name().as_encoded_bytes()));
            for tid in tids {
                match examine_thread(&dir, tid) {
                    Ok(thread) => threads.push(thread),
                    Err(e) => note(e),
                }
            }
        }
        Err(e) => note(e),
    }
    let mut fifo_fds = Vec::new();
    match std::fs::read_dir(dir.join("fd")) {
        Ok(entries) => {
            for entry in entries.flatten() {
                match read_link(&entry.path()) {
                    Ok(target) if is_exec_fifo(&target) => fifo_fds.push(target),
                    Ok(_) => {}
                    Err(e) => note(e),
                }
            }
        }
        Err(e) => note(e),
    }
    let cgroup = read_text(&dir.join("cgroup")).map_err(&mut note).ok();
    // Reading `mem` takes the mm lock, which a thread in D may hold: then the blocked open's
    // path stays unknown rather than risk a blocked reader.
    let memory_readable = !threads.iter().any(|(t, _)| t.state == 'D');
    let mut threads: Vec<ThreadEvidence> = threads
        .into_iter()
        .map(|(mut thread, call)| {
            thread.opening = call.map(|c| blocked_open(&dir, pid, &c, memory_readable));
            thread
        })
        .collect();
    threads.sort_by_key(|t| t.tid);
    fifo_fds.sort();
    Examination {
        threads,
        fifo_fds,
        cgroup,
        read_errors,
    }
}

/// One thread's state, wchan and system call; with the `openat` it is sleeping in, if any.
fn examine_thread(
    process_dir: &Path,
    tid: i32,
) -> std::io::Result<(ThreadEvidence, Option<SyscallInProgress>)> {
    let task_dir = process_dir.join("task").join(tid.to_string());
    let stat = read_text(&task_dir.join("stat"))?;
    let state = parse_stat(stat.as_bytes()).map_or('?', |s| char::from(s.state));
    let wchan = read_text(&task_dir.join("wchan")).ok().and_then(wchan_name);
    let syscall = read_text(&task_dir.join("syscall"))
        .ok()
        .and_then(|line| parse_syscall(&line));
    let sleeping = matches!(state, 'S' | 'D');
    let open_call = syscall.filter(|s| sleeping && s.number == nix::libc::SYS_openat as u64);
    let thread = ThreadEvidence {
        tid,
        state,
        wchan,
        syscall: syscall.map(|s| s.number),
        opening: None,
        seconds_in_d: None,
    };
    Ok((thread, open_call))
}

/// `openat(dirfd, path, flags, mode)` that has not returned.
fn blocked_open(
    process_dir: &Path,
    pid: i32,
    call: &SyscallInProgress,
    memory_readable: bool,
) -> BlockedOpen {
    let [dirfd, path_address, flags, ..] = call.args;
    // The syscall file prints the int argument zero-extended: take its low 32 bits.
    let dirfd = dirfd as u32 as i32;
    let direction = match flags as i32 & nix::libc::O_ACCMODE {
        nix::libc::O_RDONLY => Direction::Read,
        nix::libc::O_WRONLY => Direction::Write,
        _ => Direction::ReadWrite,
    };
    let path = memory_readable
        .then(|| read_c_string(&process_dir.join("mem"), path_address).ok())
        .flatten()
        .and_then(|raw| resolve_path(process_dir, pid, dirfd, &raw));
    BlockedOpen { path, direction }
}

/// Make the path an `openat` was given absolute, as seen from the host.
fn resolve_path(process_dir: &Path, pid: i32, dirfd: i32, raw: &str) -> Option<String> {
    if let Some(fd) = own_fd_path(raw, pid) {
        return read_link(&process_dir.join("fd").join(fd)).ok();
    }
    if raw.starts_with('/') {
        return Some(raw.to_string());
    }
    let base = if dirfd == nix::libc::AT_FDCWD {
        read_link(&process_dir.join("cwd"))
    } else {
        read_link(&process_dir.join("fd").join(dirfd.to_string()))
    };
    let base = base.ok()?;
    Some(format!("{}/{}", base.trim_end_matches('/'), raw))
}

/// `N` in `/proc/self/fd/N`, `/proc/thread-self/fd/N` or `/proc/<pid>/fd/N`.
fn own_fd_path(path: &str, pid: i32) -> Option<&str> {
    let rest = path.strip_prefix("/proc/")?;
    let (whose, rest) = rest.split_once('/')?;
    let fd = rest.strip_prefix("fd/")?;
    let own = whose == "self" || whose == "thread-self" || parse_pid(whose.as_bytes()) == Some(pid);
    (own && parse_pid(fd.as_bytes()).is_some()).then_some(fd)
}

/// The `wchan` file says `0` when the task is not sleeping.
pub fn wchan_name(text: String) -> Option<String> {
    let name = text.trim();
    (!name.is_empty() && name != "0").then(|| name.to_string())
}

pub fn is_exec_fifo(path: &str) -> bool {
    Path::new(path)
        .file_name()
        .is_some_and(|n| n == "exec.fifo")
}

/// runc keeps the fifo in its state directory `<root>/<container id>/exec.fifo`.
pub fn fifo_container_id(path: &str) -> Option<String> {
    let parent = Path::new(path).parent()?.file_name()?;
    Some(parent.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_comms_including_truncated_ones() {
        for comm in [
            &b"dockerd"[..],
            b"containerd",
            b"containerd-shim",
            b"runc",
            b"runc:[2:INIT]",
            b"runc:[1:CHILD]",
            b"kubelet",
            b"docker-containe",
            b"docker-runc",
        ] {
            assert!(is_runtime_comm(comm), "{}", String::from_utf8_lossy(comm));
        }
        for comm in [
            &b"docker"[..],
            b"containerd2",
            b"runcx",
            b"bash",
            b"kworker/0:1",
            b"",
        ] {
            assert!(!is_runtime_comm(comm), "{}", String::from_utf8_lossy(comm));
        }
        assert!(is_shim_comm(b"containerd-shim"));
        assert!(!is_shim_comm(b"containerd"));
        assert_eq!(runc_kind(b"runc"), Some(RuntimeKind::Runc));
        assert_eq!(runc_kind(b"runc:[2:INIT]"), Some(RuntimeKind::RuncInit));
        assert_eq!(runc_kind(b"runc:[1:CHILD]"), None);
    }

    #[test]
    fn syscall_lines() {
        let blocked = "257 0xffffff9c 0x7fff9dfdbae6 0x80000 0x0 0x1b003680 0x1b0036a0 0x7fff9dfda490 0x437f11\n";
        let s = parse_syscall(blocked).unwrap();
        assert_eq!(s.number, 257);
        assert_eq!(s.args[0] as u32 as i32, nix::libc::AT_FDCWD);
        assert_eq!(s.args[1], 0x7fff9dfdbae6);
        assert_eq!(s.args[2], 0x80000);
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffd 0x4000\n"), None);
        assert_eq!(parse_syscall("257 0x1 0x2\n"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn own_fd_paths() {
        assert_eq!(own_fd_path("/proc/self/fd/3", 10), Some("3"));
        assert_eq!(own_fd_path("/proc/thread-self/fd/12", 10), Some("12"));
        assert_eq!(own_fd_path("/proc/10/fd/4", 10), Some("4"));
        assert_eq!(own_fd_path("/proc/11/fd/4", 10), None);
        assert_eq!(own_fd_path("/proc/self/fd/x", 10), None);
        assert_eq!(own_fd_path("/run/runc/a/exec.fifo", 10), None);
    }

    #[test]
    fn fifo_names() {
        let p = "/run/containerd/runc/k8s.io/abc/exec.fifo";
        assert!(is_exec_fifo(p));
        assert!(!is_exec_fifo(
            "/run/containerd/runc/k8s.io/abc/exec.fifo.old"
        ));
        assert!(!is_exec_fifo("pipe:[1234]"));
        assert_eq!(fifo_container_id(p).as_deref(), Some("abc"));
        assert_eq!(wchan_name("0".into()), None);
        assert_eq!(
            wchan_name("wait_for_partner".into()).as_deref(),
            Some("wait_for_partner")
        );
    }

    /// A fake process: `runc` with an S thread blocked in openat on a path stored in `mem`
    /// at 0x100, and optionally a second thread in D.
    fn fake_runc(with_d_thread: bool) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "procscan-exam-{}-{with_d_thread}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let stat = |tid: i32, state: char| {
            format!("{tid} (runc) {state} 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 2 0 5 0 0\n")
        };
        let mut threads = vec![(7, 'S', "257 0xffffff9c 0x100 0x0 0x0 0x0 0x0 0x7ff0 0x4000")];
        if with_d_thread {
            threads.push((8, 'D', "running"));
        }
        for (tid, state, syscall) in threads {
            let dir = root.join(format!("7/task/{tid}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("stat"), stat(tid, state)).unwrap();
            std::fs::write(dir.join("wchan"), "wait_for_partner").unwrap();
            std::fs::write(dir.join("syscall"), syscall).unwrap();
        }
        let mut mem = vec![0u8; 0x100];
        mem.extend_from_slice(b"/run/runc/c1/exec.fifo\0");
        std::fs::write(root.join("7/mem"), mem).unwrap();
        std::fs::create_dir_all(root.join("7/fd")).unwrap();
        root
    }

    #[test]
    fn blocked_open_path_is_read_from_memory() {
        let root = fake_runc(false);
        let exam = examine(&root, 7);
        std::fs::remove_dir_all(&root).unwrap();
        let opening = exam.threads[0].opening.as_ref().unwrap();
        assert_eq!(opening.path.as_deref(), Some("/run/runc/c1/exec.fifo"));
        assert_eq!(opening.direction, Direction::Read);
        let fifo = exam.exec_fifo().unwrap();
        assert_eq!(fifo.container_id.as_deref(), Some("c1"));
        assert!(!fifo.held);
        assert!(exam.touches("/run/runc/c1/exec.fifo"));
    }

    #[test]
    fn memory_is_not_read_while_a_thread_is_in_d() {
        let root = fake_runc(true);
        let exam = examine(&root, 7);
        std::fs::remove_dir_all(&root).unwrap();
        let opening = exam.threads[0].opening.as_ref().unwrap();
        assert_eq!(opening.path, None);
        assert_eq!(exam.threads[1].state, 'D');
        assert_eq!(exam.exec_fifo(), None);
    }

    #[test]
    fn examines_this_process() {
        let exam = examine(Path::new("/proc"), std::process::id() as i32);
        assert!(!exam.threads.is_empty());
        assert!(exam.cgroup.is_some());
        assert_eq!(exam.read_errors, 0);
    }
}
