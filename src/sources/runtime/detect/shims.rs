//! Which containerd shim serves a task, and what it is doing, from /proc: for the tasks
//! containerd lists as UNKNOWN (their shim did not answer its state call, and containerd
//! reports pid 0). Run off the async threads: /proc reads may block.
//!
//! A shim is a `containerd-shim*` process whose `-id` argument is the task's id (one shim per
//! Docker container) or its pod sandbox's id (one shim per pod with CRI); in the second case
//! the task is a child of the shim whose cgroup path names the container.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;

use super::UnknownTask;

/// A node runs tens of thousands of processes at most; past this the walk stops.
const MAX_PROCESSES: usize = 100_000;
/// Enough for a shim's command line (`-namespace`, `-id`, `-address`).
const MAX_CMDLINE: u64 = 4096;
const MAX_CGROUP: u64 = 16 * 1024;

struct Process {
    pid: i32,
    ppid: i32,
    comm: String,
    state: char,
}

/// Each id with its shim's pid, state and wchan where /proc shows them.
pub fn describe(proc_root: &Path, ids: &[String]) -> Vec<UnknownTask> {
    let processes = processes(proc_root);
    let shims: HashMap<i32, &Process> = processes
        .iter()
        .filter(|p| p.comm.starts_with("containerd-shim"))
        .map(|p| (p.pid, p))
        .collect();
    let shim_ids: HashMap<String, i32> = shims
        .keys()
        .filter_map(|pid| {
            Some((
                shim_id(&read_bounded(proc_root, *pid, "cmdline", MAX_CMDLINE)?)?,
                *pid,
            ))
        })
        .collect();
    ids.iter()
        .map(|id| {
            let shim = shim_ids.get(id).copied().or_else(|| {
                processes
                    .iter()
                    .filter(|p| shims.contains_key(&p.ppid))
                    .find(|p| {
                        read_bounded(proc_root, p.pid, "cgroup", MAX_CGROUP)
                            .is_some_and(|c| String::from_utf8_lossy(&c).contains(id.as_str()))
                    })
                    .map(|p| p.ppid)
            });
            let shim_process = shim.and_then(|pid| shims.get(&pid));
            UnknownTask {
                container_id: id.clone(),
                shim_pid: shim,
                shim_state: shim_process.map(|p| p.state),
                shim_wchan: shim.and_then(|pid| {
                    let raw = read_bounded(proc_root, pid, "wchan", 256)?;
                    let text = String::from_utf8_lossy(&raw).trim().to_string();
                    (!text.is_empty() && text != "0").then_some(text)
                }),
            }
        })
        .collect()
}

fn processes(proc_root: &Path) -> Vec<Process> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .take(MAX_PROCESSES)
        .filter_map(|pid| {
            let stat = read_bounded(proc_root, pid, "stat", 4096)?;
            parse_stat(pid, &String::from_utf8_lossy(&stat))
        })
        .collect()
}

/// `pid (comm) S ppid ...`; comm may hold spaces and parentheses, so it ends at the last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Process> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(Process {
        pid,
        ppid,
        comm,
        state,
    })
}

/// The value after `-id` in a NUL-separated command line.
fn shim_id(cmdline: &[u8]) -> Option<String> {
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(arg) = args.next() {
        if arg == b"-id" {
            return args
                .next()
                .map(|id| String::from_utf8_lossy(id).into_owned());
        }
    }
    None
}

fn read_bounded(proc_root: &Path, pid: i32, file: &str, max: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    fs::File::open(proc_root.join(pid.to_string()).join(file))
        .ok()?
        .take(max)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_parentheses_in_comm() {
        let p = parse_stat(42, "42 (a) b) T 7 42 42 0").expect("parses");
        assert_eq!((p.comm.as_str(), p.state, p.ppid), ("a) b", 'T', 7));
        assert!(parse_stat(1, "garbage").is_none());
    }

    #[test]
    fn the_id_argument_of_a_shim() {
        let cmdline = b"/usr/bin/containerd-shim-runc-v2\0-namespace\0k8s.io\0-id\0abc123\0-address\0/run/x.sock\0";
        assert_eq!(shim_id(cmdline), Some("abc123".into()));
        assert_eq!(shim_id(b"containerd-shim\0-id"), None);
    }

    #[test]
    fn a_fake_proc_tree_names_the_shim_of_a_pod_container() {
        let root = std::env::temp_dir().join(format!("hangwatch-shims-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let write = |pid: &str, file: &str, text: &[u8]| {
            fs::create_dir_all(root.join(pid)).expect("mkdir");
            fs::write(root.join(pid).join(file), text).expect("write");
        };
        write("10", "stat", b"10 (containerd-shim) T 1 10 10 0");
        write("10", "cmdline", b"containerd-shim-runc-v2\0-id\0sandbox1\0");
        write("10", "wchan", b"do_signal_stop");
        write("11", "stat", b"11 (sleep) S 10 11 11 0");
        write("11", "cgroup", b"0::/k8s.io/container1\n");
        let found = describe(
            &root,
            &["container1".into(), "sandbox1".into(), "gone".into()],
        );
        assert_eq!(found[0].shim_pid, Some(10));
        assert_eq!(found[0].shim_state, Some('T'));
        assert_eq!(found[0].shim_wchan.as_deref(), Some("do_signal_stop"));
        assert_eq!(found[1].shim_pid, Some(10));
        assert_eq!(found[2].shim_pid, None);
        let _ = fs::remove_dir_all(&root);
    }
}
