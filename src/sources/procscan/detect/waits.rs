//! From a stuck task to what it waits on: the system call and its file, the block device
//! (loop backing file, device-mapper name, identity, requests in flight), the mount (FUSE
//! connection and the daemon serving it, NFS/CIFS server), the other tasks on the same mount
//! that likely hold the lock it waits for, and a [`WaitClass`].
//!
//! Only for tasks already judged stuck, never in the hot walk, and each task's chain is one job
//! on the scan's [`DeadlineRunner`](super::deadline::DeadlineRunner): any of these reads may
//! block behind the hang. No read here touches the waited-on file itself (a `stat` on a hung
//! FUSE file would wait on the daemon too): the file's mount comes from
//! `/proc/<pid>/fdinfo/<n>` (`mnt_id`) or from its path, devices from sysfs.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub use crate::domain::WaitClass;

use super::files::{read_c_string, read_link, read_text, read_text_up_to};

/// Holders listed per lock wait, and FUSE daemon candidates examined.
const MAX_HOLDERS: usize = 8;
/// Tasks examined when looking for tasks waiting on a mount (a bound on one job's work).
const MAX_TASKS_SEARCHED: usize = 65_536;
/// Bound on one mount table: thousands of mounts on a busy Kubernetes node.
const MOUNTINFO_LIMIT: u64 = 8 * 1024 * 1024;
/// Frames of the kernel stack that say where a task waits (the rest is how it got there).
const WAIT_FRAMES: usize = 4;

/// Where the chain's reads start: the real roots, or fixture trees.
#[derive(Debug, Clone)]
pub struct Roots {
    pub proc_root: PathBuf,
    pub sys_root: PathBuf,
}

/// What a stuck task waits on, as far as /proc and /sys tell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaitChain {
    pub class: WaitClass,
    /// System call number (`/proc/<pid>/task/<tid>/syscall`); None outside a system call.
    pub syscall: Option<u64>,
    /// The descriptor the call operates on.
    pub fd: Option<i32>,
    /// The file: the descriptor's target, or the path the call was given.
    pub file: Option<String>,
    pub block_device: Option<BlockDevice>,
    /// The mount the file is on.
    pub mount: Option<Mount>,
    /// Lock waits: other tasks on the same mount that wait on its server or device, the
    /// likely holders.
    pub holders: Vec<Holder>,
    /// Why `/proc/<pid>/stack` is not in the report.
    pub kernel_stack_omitted: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockDevice {
    /// `major:minor`.
    pub dev: String,
    /// Kernel name: `loop0`, `dm-0`, `nvme0n1`.
    pub name: String,
    /// Loop: the backing file, and the mount it is on.
    pub backing_file: Option<String>,
    pub backing_mount: Option<Mount>,
    /// Device mapper: its name (`vg0-data`) and the devices under it.
    pub dm_name: Option<String>,
    pub slaves: Vec<String>,
    /// md: its RAID level.
    pub md_level: Option<String>,
    /// Identity from the device: model and serial (nvme, virtio, SCSI).
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Requests in flight: reads, writes (`inflight`).
    pub inflight: Option<[u64; 2]>,
    /// Reads and writes completed (`stat`), to tell progress between scans.
    pub completed_ios: Option<u64>,
    /// Whether requests completed since the previous scan; None on the first sighting.
    pub progressing: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mount {
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
    /// `major:minor` of the filesystem.
    pub dev: String,
    /// NFS/CIFS: the server (`addr=` or the source's host).
    pub server: Option<String>,
    pub fuse: Option<FuseConnection>,
}

impl Mount {
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype == "fuseblk" || self.fstype.starts_with("fuse.")
    }

    pub fn is_network(&self) -> bool {
        matches!(
            self.fstype.as_str(),
            "nfs" | "nfs4" | "cifs" | "smb3" | "ceph" | "9p"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FuseConnection {
    /// The directory under `fs/fuse/connections`.
    pub connection: u64,
    /// Requests waiting for the daemon; None when fusectl is not mounted.
    pub waiting: Option<u64>,
    /// The process serving it, when it could be told.
    pub daemon: Option<TaskBrief>,
    /// Processes holding `/dev/fuse` open.
    pub daemon_candidates: usize,
}

/// A process or task, as `stat` and `wchan` show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskBrief {
    pub pid: i32,
    pub comm: String,
    /// `R`, `S`, `D`, `T` (stopped), ...
    pub state: char,
    pub wchan: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Holder {
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    pub state: char,
    pub wchan: Option<String>,
    pub file: Option<String>,
}

impl WaitChain {
    /// The chain in one phrase: "block I/O to /dev/loop0 (loop over /m/data on FUSE mount /m
    /// served by pid 7 stall_fuse (stopped); 1 FUSE request waiting)".
    pub fn describe(&self) -> String {
        let mut text = self.class.describe().to_string();
        match (&self.block_device, &self.mount, &self.file) {
            (Some(device), None, _) => text.push_str(&format!(" to /dev/{}", device.name)),
            (_, _, Some(file)) => text.push_str(&format!(" on {file}")),
            _ => {}
        }
        let mut details = Vec::new();
        if let Some(mount) = &self.mount {
            details.push(mount.describe());
        }
        if let Some(device) = &self.block_device {
            let about = device.describe();
            match &self.mount {
                Some(_) if about.is_empty() => details.push(format!("on /dev/{}", device.name)),
                Some(_) => details.push(format!("on /dev/{}: {}", device.name, about.join(", "))),
                None => details.extend(about),
            }
        }
        if !self.holders.is_empty() {
            let holders: Vec<String> = self
                .holders
                .iter()
                .map(|h| {
                    let wchan = h
                        .wchan
                        .as_deref()
                        .map(|w| format!(", {w}"))
                        .unwrap_or_default();
                    format!("{} pid {} ({}{wchan})", h.comm, h.pid, h.state)
                })
                .collect();
            details.push(format!("likely held by {}", holders.join(", ")));
        }
        if !details.is_empty() {
            text.push_str(", ");
            text.push_str(&details.join("; "));
        }
        text
    }
}

impl BlockDevice {
    fn describe(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if let Some(file) = &self.backing_file {
            let on = self
                .backing_mount
                .as_ref()
                .map(|m| format!(" on {}", m.describe()))
                .unwrap_or_default();
            parts.push(format!("whose backing file is {file}{on}"));
        }
        if let Some(name) = &self.dm_name {
            parts.push(format!(
                "device-mapper {name} over {}",
                self.slaves.join(", ")
            ));
        }
        if let Some(level) = &self.md_level {
            parts.push(format!("md {level} over {}", self.slaves.join(", ")));
        }
        if let Some(model) = &self.model {
            let serial = self
                .serial
                .as_deref()
                .map(|s| format!(" serial {s}"))
                .unwrap_or_default();
            parts.push(format!("{model}{serial}"));
        }
        if let Some([reads, writes]) = self.inflight {
            let progress = match self.progressing {
                Some(true) => ", completing",
                Some(false) => ", none completed since the last scan",
                None => "",
            };
            parts.push(format!("{} request(s) in flight{progress}", reads + writes));
        }
        parts
    }
}

impl Mount {
    fn describe(&self) -> String {
        if let Some(fuse) = &self.fuse {
            let served = match &fuse.daemon {
                Some(d) => format!(
                    " served by pid {} {} ({})",
                    d.pid,
                    d.comm,
                    state_name(d.state)
                ),
                None if fuse.daemon_candidates > 1 => {
                    format!(" (one of {} FUSE daemons)", fuse.daemon_candidates)
                }
                None => " (daemon not found)".into(),
            };
            let waiting = fuse
                .waiting
                .map(|n| format!("; {n} FUSE request(s) waiting"))
                .unwrap_or_default();
            return format!("FUSE mount {}{served}{waiting}", self.mount_point);
        }
        if self.is_network() {
            let server = self
                .server
                .as_deref()
                .map(|s| format!(" from server {s}"))
                .unwrap_or_default();
            return format!("{} mount {}{server}", self.fstype, self.mount_point);
        }
        format!(
            "{} mount {} ({})",
            self.fstype, self.mount_point, self.source
        )
    }
}

/// `T` → "stopped".
pub fn state_name(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "in D",
        'T' | 't' => "stopped",
        'Z' => "zombie",
        'X' => "dead",
        _ => "unknown state",
    }
}

/// The mount tables read in one scan, by mount namespace: with many stuck tasks, each table
/// is read and parsed once. The lock is never held while reading.
#[derive(Debug, Clone, Default)]
pub struct MountTables(Arc<Mutex<HashMap<String, Arc<Vec<MountEntry>>>>>);

impl MountTables {
    fn of(&self, proc_dir: &Path) -> Arc<Vec<MountEntry>> {
        let namespace = read_link(&proc_dir.join("ns/mnt")).ok();
        let cached = namespace.as_ref().and_then(|ns| {
            self.0
                .lock()
                .ok()
                .and_then(|tables| tables.get(ns).cloned())
        });
        if let Some(table) = cached {
            return table;
        }
        let table = Arc::new(
            read_text_up_to(&proc_dir.join("mountinfo"), MOUNTINFO_LIMIT)
                .map(|t| parse_mountinfo(&t))
                .unwrap_or_default(),
        );
        if let (Some(ns), Ok(mut tables)) = (namespace, self.0.lock()) {
            tables.insert(ns, table.clone());
        }
        table
    }
}

/// Everything one stuck task's chain needs, owned so it can run on a reader thread.
pub struct ChainRequest {
    pub roots: Roots,
    pub mounts: MountTables,
    pub pid: i32,
    pub tid: i32,
    pub wchan: Option<String>,
    pub stack: Option<Vec<String>>,
}

/// Resolve one task's chain (without holders and FUSE daemons, which need the whole scan).
pub fn resolve(request: &ChainRequest) -> WaitChain {
    let proc_dir = request.roots.proc_root.join(request.pid.to_string());
    let task_dir = proc_dir.join("task").join(request.tid.to_string());
    let syscall = read_text(&task_dir.join("syscall"))
        .ok()
        .and_then(|t| parse_syscall(&t));
    let mounts = request.mounts.of(&proc_dir);
    let mut chain = WaitChain {
        class: WaitClass::Unknown,
        syscall: syscall.as_ref().map(|s| s.nr),
        fd: None,
        file: None,
        block_device: None,
        mount: None,
        holders: Vec::new(),
        kernel_stack_omitted: None,
    };
    let target = syscall.as_ref().and_then(|s| target_of(&proc_dir, s));
    if let Some(target) = target {
        chain.fd = target.fd;
        let mount = target
            .mnt_id
            .and_then(|id| mounts.iter().find(|m| m.id == id))
            .or_else(|| mount_of_path(&mounts, &target.path));
        let sys_root = &request.roots.sys_root;
        if let Some(dev) = block_dev_of(sys_root, &target.path) {
            chain.block_device = Some(block_device(sys_root, &dev, &mounts));
        } else if let Some(mount) = mount {
            // A filesystem on a block device: the device its I/O waits on.
            let on_device = !mount.dev.starts_with("0:")
                && sys_root.join("dev/block").join(&mount.dev).exists();
            if on_device {
                chain.block_device = Some(block_device(sys_root, &mount.dev, &mounts));
            }
            chain.mount = Some(mount.to_mount(sys_root));
        }
        chain.file = Some(target.path);
    }
    chain.class = classify(request.wchan.as_deref(), request.stack.as_deref(), &chain);
    chain
}

/// `nr arg0 .. arg5 sp pc`; "running" or `-1 ...` (not in a system call) give None.
#[derive(Debug, Clone, PartialEq)]
struct Syscall {
    nr: u64,
    args: [u64; 6],
}

fn parse_syscall(text: &str) -> Option<Syscall> {
    let mut words = text.split_whitespace();
    let nr = words.next()?.parse::<u64>().ok()?;
    let mut args = [0u64; 6];
    for arg in &mut args {
        let word = words.next()?;
        *arg = u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()?;
    }
    Some(Syscall { nr, args })
}

/// Which argument names the file.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Operand {
    Fd(usize),
    /// A path, relative to the working directory.
    Path(usize),
    /// A path relative to the directory descriptor in the first argument.
    AtPath(usize),
}

#[cfg(target_arch = "x86_64")]
fn operand(nr: u64) -> Option<Operand> {
    Some(match nr {
        // read write close fstat lseek ioctl pread64 pwrite64 readv writev
        0 | 1 | 3 | 5 | 8 | 16 | 17 | 18 | 19 | 20 => Operand::Fd(0),
        // fcntl flock fsync fdatasync ftruncate getdents64 fallocate syncfs preadv pwritev
        72 | 73 | 74 | 75 | 77 | 217 | 285 | 306 | 295 | 296 | 327 | 328 => Operand::Fd(0),
        // open stat lstat access truncate rename mkdir rmdir creat link unlink readlink chmod chown
        2 | 4 | 6 | 21 | 76 | 82 | 83 | 84 | 85 | 86 | 87 | 89 | 90 | 92 => Operand::Path(0),
        // openat mkdirat fchownat newfstatat unlinkat renameat faccessat renameat2 statx openat2 faccessat2
        257 | 258 | 260 | 262 | 263 | 264 | 269 | 316 | 332 | 437 | 439 => Operand::AtPath(1),
        _ => return None,
    })
}

#[cfg(target_arch = "aarch64")]
fn operand(nr: u64) -> Option<Operand> {
    Some(match nr {
        // fcntl flock ftruncate fallocate close getdents64 lseek read write readv writev pread64 pwrite64 fsync fdatasync
        25 | 32 | 46 | 47 | 57 | 61 | 62 | 63 | 64 | 65 | 66 | 67 | 68 | 82 | 83 | 29 => {
            Operand::Fd(0)
        }
        // mkdirat unlinkat renameat faccessat openat newfstatat renameat2 statx openat2 faccessat2
        34 | 35 | 38 | 48 | 56 | 79 | 276 | 291 | 437 | 439 => Operand::AtPath(1),
        _ => return None,
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn operand(_nr: u64) -> Option<Operand> {
    None
}

const AT_FDCWD: i32 = -100;

struct Target {
    path: String,
    fd: Option<i32>,
    /// The mount's id from `fdinfo`.
    mnt_id: Option<u64>,
}

fn target_of(proc_dir: &Path, syscall: &Syscall) -> Option<Target> {
    let arg = |i: usize| syscall.args.get(i).copied().unwrap_or_default();
    match operand(syscall.nr)? {
        Operand::Fd(i) => {
            let fd = i32::try_from(arg(i)).ok()?;
            let path = read_link(&proc_dir.join("fd").join(fd.to_string())).ok()?;
            let mnt_id = read_text(&proc_dir.join("fdinfo").join(fd.to_string()))
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("mnt_id:"))
                        .and_then(|v| v.trim().parse().ok())
                });
            Some(Target {
                path,
                fd: Some(fd),
                mnt_id,
            })
        }
        Operand::Path(i) | Operand::AtPath(i) => {
            let raw = read_c_string(&proc_dir.join("mem"), arg(i)).ok()?;
            let path = if raw.starts_with('/') {
                raw
            } else {
                // The directory argument is an int: the syscall file shows it as 32 bits.
                let dirfd = arg(0) as u32 as i32;
                let base = match operand(syscall.nr)? {
                    Operand::AtPath(_) if dirfd != AT_FDCWD => {
                        read_link(&proc_dir.join("fd").join(dirfd.to_string())).ok()?
                    }
                    _ => read_link(&proc_dir.join("cwd")).ok()?,
                };
                format!("{}/{raw}", base.trim_end_matches('/'))
            };
            Some(Target {
                path,
                fd: None,
                mnt_id: None,
            })
        }
    }
}

/// One line of `mountinfo`.
#[derive(Debug, Clone, PartialEq)]
pub struct MountEntry {
    id: u64,
    dev: String,
    mount_point: String,
    fstype: String,
    source: String,
    super_options: String,
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let mut head = head.split(' ');
            let id = head.next()?.parse().ok()?;
            let _parent = head.next()?;
            let dev = head.next()?.to_string();
            let _root = head.next()?;
            let mount_point = unescape_octal(head.next()?);
            let mut tail = tail.split(' ');
            Some(MountEntry {
                id,
                dev,
                mount_point,
                fstype: tail.next()?.to_string(),
                source: unescape_octal(tail.next().unwrap_or_default()),
                super_options: tail.next().unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal.
fn unescape_octal(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')));
        match escaped.and_then(|n| u8::try_from(n).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount whose mount point is the longest prefix of `path` (the last such, as mounted
/// later over it).
fn mount_of_path<'m>(mounts: &'m [MountEntry], path: &str) -> Option<&'m MountEntry> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    mounts
        .iter()
        .filter(|m| {
            let point = m.mount_point.trim_end_matches('/');
            point.is_empty()
                || path == point
                || path
                    .strip_prefix(point)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|m| m.mount_point.trim_end_matches('/').len())
}

impl MountEntry {
    fn to_mount(&self, sys_root: &Path) -> Mount {
        let mut mount = Mount {
            mount_point: self.mount_point.clone(),
            fstype: self.fstype.clone(),
            source: self.source.clone(),
            dev: self.dev.clone(),
            server: None,
            fuse: None,
        };
        if mount.is_network() {
            mount.server = self
                .super_options
                .split(',')
                .find_map(|o| o.strip_prefix("addr="))
                .map(str::to_string)
                .or_else(|| server_of_source(&self.source));
        }
        if mount.is_fuse() {
            mount.fuse = fuse_connection(sys_root, &self.dev);
        }
        mount
    }
}

/// `server:/export` (NFS) or `//server/share` (CIFS).
fn server_of_source(source: &str) -> Option<String> {
    if let Some(rest) = source.strip_prefix("//") {
        return rest.split('/').next().map(str::to_string);
    }
    let (host, _) = source.split_once(":/")?;
    (!host.is_empty()).then(|| host.trim_matches(['[', ']']).to_string())
}

/// fusectl names a connection by the superblock's device number (`major << 20 | minor`).
fn fuse_connection(sys_root: &Path, dev: &str) -> Option<FuseConnection> {
    let (major, minor) = dev.split_once(':')?;
    let connection = (major.parse::<u64>().ok()? << 20) | minor.parse::<u64>().ok()?;
    let waiting = read_text(
        &sys_root
            .join("fs/fuse/connections")
            .join(connection.to_string())
            .join("waiting"),
    )
    .ok()
    .and_then(|t| t.trim().parse().ok());
    Some(FuseConnection {
        connection,
        waiting,
        daemon: None,
        daemon_candidates: 0,
    })
}

/// A `/dev/<name>` that sysfs knows as a block device: its `major:minor`.
fn block_dev_of(sys_root: &Path, path: &str) -> Option<String> {
    let name = path.strip_prefix("/dev/")?;
    let name = name.rsplit('/').next()?;
    if name.is_empty() || name.starts_with('.') {
        return None;
    }
    let dev = read_text(&sys_root.join("class/block").join(name).join("dev")).ok()?;
    Some(dev.trim().to_string())
}

fn block_device(sys_root: &Path, dev: &str, mounts: &[MountEntry]) -> BlockDevice {
    let base = sys_root.join("dev/block").join(dev);
    let text = |file: &str| {
        read_text(&base.join(file))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    let name = text("uevent")
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME="))
                .map(str::to_string)
        })
        .or_else(|| {
            read_link(&base)
                .ok()
                .and_then(|l| l.rsplit('/').next().map(str::to_string))
        })
        .unwrap_or_else(|| dev.to_string());
    let backing_file = text("loop/backing_file");
    let backing_mount = backing_file
        .as_deref()
        .and_then(|f| mount_of_path(mounts, f))
        .map(|m| m.to_mount(sys_root));
    let mut slaves: Vec<String> = fs::read_dir(base.join("slaves"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    slaves.sort();
    let inflight = text("inflight").and_then(|t| {
        let mut n = t.split_whitespace().map(|w| w.parse::<u64>().ok());
        Some([n.next()??, n.next()??])
    });
    let completed_ios = text("stat").and_then(|t| {
        let fields: Vec<u64> = t.split_whitespace().map_while(|w| w.parse().ok()).collect();
        Some(fields.first()?.saturating_add(*fields.get(4)?))
    });
    BlockDevice {
        dev: dev.to_string(),
        name,
        backing_file,
        backing_mount,
        dm_name: text("dm/name"),
        slaves,
        md_level: text("md/level"),
        model: text("device/model").or_else(|| text("device/device/model")),
        serial: text("device/serial")
            .or_else(|| text("serial"))
            .or_else(|| text("device/device/serial")),
        inflight,
        completed_ios,
        progressing: None,
    }
}

/// Frame (function) names that say what kind of wait it is.
const FREEZER: &[&str] = &["__refrigerator", "do_freezer_trap", "freezer_"];
const MEMORY: &[&str] = &[
    "shrink_",
    "try_to_free",
    "throttle_direct_reclaim",
    "reclaim_throttle",
    "mem_cgroup_handle_over_high",
    "__alloc_pages_slowpath",
    "balance_dirty_pages",
    "congestion_wait",
];
/// Lock waits, also the VFS functions that take an inode's rwsem: since the scheduler's own
/// functions (`rwsem_down_*`, `mutex_lock`) are left out of `wchan` and `stack`, they are
/// where a lock wait shows on a 6.x kernel.
const LOCK: &[&str] = &[
    "rwsem_down_",
    "down_read",
    "down_write",
    "mutex_lock",
    "__mutex_lock",
    "inode_lock",
    "walk_component",
    "lookup_slow",
    "open_last_lookups",
    "filename_create",
    "do_unlinkat",
    "do_rmdir",
    "lock_rename",
    "do_truncate",
    "chown_common",
    "chmod_common",
];
const SERVER: &[&str] = &[
    "request_wait_answer",
    "fuse_",
    "rpc_wait_bit_killable",
    "rpc_",
    "nfs_",
    "nfs4_",
    "cifs_",
    "smb2_",
    "wait_for_response",
];
const BLOCK: &[&str] = &[
    "submit_bio_wait",
    "blk_mq_get_tag",
    "io_schedule",
    "bit_wait_io",
    "folio_wait_bit",
    "wait_on_page_bit",
    "blkdev_",
    "jbd2_",
    "__wait_on_buffer",
];
const PIPE: &[&str] = &[
    "pipe_wait",
    "pipe_read",
    "pipe_write",
    "anon_pipe_",
    "wait_for_partner",
    "fifo_open",
];

fn classify(wchan: Option<&str>, stack: Option<&[String]>, chain: &WaitChain) -> WaitClass {
    let frames: Vec<&str> = wchan
        .into_iter()
        .chain(
            stack
                .unwrap_or_default()
                .iter()
                .take(WAIT_FRAMES)
                .map(|f| f.split_once('+').map_or(f.as_str(), |(symbol, _)| symbol)),
        )
        .collect();
    let any = |set: &[&str]| frames.iter().any(|f| set.iter().any(|p| f.starts_with(p)));
    let mount = chain.mount.as_ref().or(chain
        .block_device
        .as_ref()
        .and_then(|d| d.backing_mount.as_ref()));
    let pipe = chain
        .file
        .as_deref()
        .is_some_and(|f| f.starts_with("pipe:") || f.ends_with(".fifo"));
    if any(FREEZER) {
        WaitClass::Freezer
    } else if any(MEMORY) {
        WaitClass::MemoryReclaim
    } else if any(LOCK) {
        WaitClass::Lock
    } else if chain.block_device.is_some() || any(BLOCK) {
        WaitClass::BlockIo
    } else if any(SERVER) || mount.is_some_and(|m| m.is_fuse() || m.is_network()) {
        WaitClass::FsServer
    } else if pipe || any(PIPE) {
        WaitClass::RuntimePipe
    } else {
        WaitClass::Unknown
    }
}

/// Whether a task waits on a filesystem server (a likely holder of a lock on its mount).
fn waits_on_server(wchan: &str) -> bool {
    SERVER.iter().any(|p| wchan.starts_with(p)) || BLOCK.iter().any(|p| wchan.starts_with(p))
}

/// Per scan, after the chains: the processes holding `/dev/fuse` open (the FUSE daemons), and
/// the tasks outside D waiting on each mount some lock waiter is on. One job: a walk of
/// every process's descriptors and every task's `wchan`, done only when a chain needs it.
#[derive(Debug, Default)]
pub struct ScanWide {
    /// `/dev/fuse` holders with their command-line arguments.
    pub fuse_daemons: Vec<(TaskBrief, Vec<String>)>,
    /// Mount `dev` → tasks waiting on its server.
    pub waiters: BTreeMap<String, Vec<Holder>>,
}

pub struct ScanWideRequest {
    pub roots: Roots,
    pub mounts: MountTables,
    pub want_fuse_daemons: bool,
    /// Mount devs whose lock waiters need holders.
    pub lock_mounts: Vec<String>,
    /// Tasks whose chains are already known (the stuck ones): not searched again.
    pub known_tids: Vec<i32>,
}

pub fn scan_wide(request: &ScanWideRequest) -> ScanWide {
    let mut found = ScanWide::default();
    let Ok(dir) = fs::read_dir(&request.roots.proc_root) else {
        return found;
    };
    let mut searched = 0usize;
    for entry in dir.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let proc_dir = entry.path();
        if request.want_fuse_daemons && holds_dev_fuse(&proc_dir) {
            let brief = brief(&proc_dir, pid);
            let cmdline = read_text(&proc_dir.join("cmdline"))
                .map(|c| c.split('\0').map(str::to_string).collect())
                .unwrap_or_default();
            if let Some(brief) = brief {
                found.fuse_daemons.push((brief, cmdline));
            }
        }
        if request.lock_mounts.is_empty() || searched >= MAX_TASKS_SEARCHED {
            continue;
        }
        let Ok(tasks) = fs::read_dir(proc_dir.join("task")) else {
            continue;
        };
        let mut mounts = None;
        for task in tasks.filter_map(|e| e.ok()) {
            searched += 1;
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if request.known_tids.contains(&tid) {
                continue;
            }
            let task_dir = task.path();
            let Some(wchan) = read_text(&task_dir.join("wchan"))
                .ok()
                .filter(|w| waits_on_server(w))
            else {
                continue;
            };
            let Some(syscall) = read_text(&task_dir.join("syscall"))
                .ok()
                .and_then(|t| parse_syscall(&t))
            else {
                continue;
            };
            let Some(target) = target_of(&proc_dir, &syscall) else {
                continue;
            };
            let mounts = mounts.get_or_insert_with(|| request.mounts.of(&proc_dir));
            let mount = target
                .mnt_id
                .and_then(|id| mounts.iter().find(|m| m.id == id))
                .or_else(|| mount_of_path(mounts, &target.path));
            let Some(mount) = mount.filter(|m| request.lock_mounts.contains(&m.dev)) else {
                continue;
            };
            let Some(task_brief) = brief(&task_dir, tid) else {
                continue;
            };
            let list = found.waiters.entry(mount.dev.clone()).or_default();
            if list.len() < MAX_HOLDERS {
                list.push(Holder {
                    pid,
                    tid,
                    comm: task_brief.comm,
                    state: task_brief.state,
                    wchan: Some(wchan.trim().to_string()),
                    file: Some(target.path),
                });
            }
        }
    }
    found
}

fn holds_dev_fuse(proc_dir: &Path) -> bool {
    let Ok(fds) = fs::read_dir(proc_dir.join("fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .any(|fd| read_link(&fd.path()).is_ok_and(|target| target == "/dev/fuse"))
}

/// `stat` and `wchan` of a process or task directory.
fn brief(dir: &Path, pid: i32) -> Option<TaskBrief> {
    let stat = read_text(&dir.join("stat")).ok()?;
    let parsed = super::stat::parse_stat(stat.as_bytes())?;
    let wchan = read_text(&dir.join("wchan"))
        .ok()
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty() && w != "0");
    Some(TaskBrief {
        pid,
        comm: String::from_utf8_lossy(parsed.comm).into_owned(),
        state: char::from(parsed.state),
        wchan,
    })
}

/// A stuck task's chain with what names the task, while the scan completes the chains.
#[derive(Debug, Clone)]
pub struct StuckChain {
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    pub wchan: Option<String>,
    pub chain: WaitChain,
}

/// Fill in what needs the whole scan: FUSE daemons (the one holder of `/dev/fuse`, or the
/// one whose command line names the mount point) and lock holders (stuck tasks on the same
/// mount waiting on something else, and the tasks outside D the wide scan found).
pub fn complete(chains: &mut [StuckChain], wide: &ScanWide) {
    let snapshot: Vec<StuckChain> = chains.to_vec();
    for StuckChain { tid, chain, .. } in chains.iter_mut() {
        for mount in chain_mounts(chain) {
            if let Some(fuse) = mount.fuse.as_mut() {
                fuse.daemon_candidates = wide.fuse_daemons.len();
                fuse.daemon = match wide.fuse_daemons.as_slice() {
                    [(only, _)] => Some(only.clone()),
                    many => {
                        let named: Vec<&TaskBrief> = many
                            .iter()
                            .filter(|(_, args)| args.contains(&mount.mount_point))
                            .map(|(b, _)| b)
                            .collect();
                        match named.as_slice() {
                            [one] => Some((*one).clone()),
                            _ => None,
                        }
                    }
                };
            }
        }
        if chain.class != WaitClass::Lock {
            continue;
        }
        let Some(dev) = chain.mount.as_ref().map(|m| m.dev.clone()) else {
            continue;
        };
        let mut holders: Vec<Holder> = snapshot
            .iter()
            .filter(|other| {
                other.tid != *tid
                    && other.chain.class != WaitClass::Lock
                    && other.chain.mount.as_ref().is_some_and(|m| m.dev == dev)
            })
            .map(|other| Holder {
                pid: other.pid,
                tid: other.tid,
                comm: other.comm.clone(),
                state: 'D',
                wchan: other.wchan.clone(),
                file: other.chain.file.clone(),
            })
            .collect();
        holders.extend(wide.waiters.get(&dev).into_iter().flatten().cloned());
        holders.truncate(MAX_HOLDERS);
        chain.holders = holders;
    }
}

fn chain_mounts(chain: &mut WaitChain) -> impl Iterator<Item = &mut Mount> {
    let WaitChain {
        mount,
        block_device,
        ..
    } = chain;
    mount
        .as_mut()
        .into_iter()
        .chain(block_device.as_mut().and_then(|d| d.backing_mount.as_mut()))
}

/// Whether a chain needs the FUSE daemons found.
pub fn needs_fuse_daemon(chain: &WaitChain) -> bool {
    chain.mount.as_ref().is_some_and(Mount::is_fuse)
        || chain
            .block_device
            .as_ref()
            .and_then(|d| d.backing_mount.as_ref())
            .is_some_and(Mount::is_fuse)
}

/// The mount a lock waiter's holders are searched on.
pub fn lock_mount(chain: &WaitChain) -> Option<&str> {
    (chain.class == WaitClass::Lock)
        .then_some(chain.mount.as_ref())
        .flatten()
        .map(|m| m.dev.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 0:40 / /mnt/fuse\\040y rw,nosuid,nodev,relatime shared:30 - fuse.sshfs user@host:/srv rw,user_id=0,group_id=0
46 22 0:52 / /mnt/nfs rw,relatime shared:31 - nfs4 10.0.0.5:/export rw,vers=4.2,addr=10.0.0.5,clientaddr=10.0.0.9
47 22 0:53 / /mnt/share rw,relatime - cifs //files.example/share rw,vers=3.1.1
";

    #[test]
    fn mountinfo_fields_escapes_and_longest_prefix() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].mount_point, "/mnt/fuse y");
        assert_eq!(mounts[1].fstype, "fuse.sshfs");
        assert_eq!(mount_of_path(&mounts, "/mnt/fuse y/a/b").unwrap().id, 45);
        assert_eq!(mount_of_path(&mounts, "/mnt/fuse yy").unwrap().id, 22);
        assert_eq!(mount_of_path(&mounts, "/mnt/nfs").unwrap().id, 46);
        assert_eq!(
            mount_of_path(&mounts, "/mnt/nfs/f (deleted)").unwrap().id,
            46
        );
        let sys = Path::new("/nonexistent");
        let nfs = mounts[2].to_mount(sys);
        assert_eq!(nfs.server.as_deref(), Some("10.0.0.5"));
        let cifs = mounts[3].to_mount(sys);
        assert_eq!(cifs.server.as_deref(), Some("files.example"));
        let fuse = mounts[1].to_mount(sys).fuse.unwrap();
        assert_eq!((fuse.connection, fuse.waiting), (40, None));
        assert_eq!(
            server_of_source("[fd00::1]:/export").as_deref(),
            Some("fd00::1")
        );
    }

    #[test]
    fn syscall_lines() {
        let s = parse_syscall("1 0x1 0x56019394f000 0x1000 0x7f747feb34f0 0x0 0x0 0x7ffc 0x7f74")
            .unwrap();
        assert_eq!((s.nr, s.args[0], s.args[2]), (1, 1, 0x1000));
        assert_eq!(parse_syscall("running"), None);
        assert_eq!(parse_syscall("-1 0x7ffc 0x7f74"), None);
        assert_eq!(parse_syscall("1 0x1"), None);
    }

    fn chain(file: Option<&str>, mount: Option<Mount>) -> WaitChain {
        WaitChain {
            class: WaitClass::Unknown,
            syscall: None,
            fd: None,
            file: file.map(str::to_string),
            block_device: None,
            mount,
            holders: Vec::new(),
            kernel_stack_omitted: None,
        }
    }

    #[test]
    fn classes_from_frames_and_files() {
        let fuse = parse_mountinfo(MOUNTINFO)[1].to_mount(Path::new("/nonexistent"));
        let on_fuse = chain(Some("/mnt/fuse y/f"), Some(fuse));
        let plain = chain(None, None);
        let stack = |frames: &[&str]| frames.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        assert_eq!(
            classify(Some("walk_component"), None, &on_fuse),
            WaitClass::Lock
        );
        assert_eq!(
            classify(Some("request_wait_answer"), None, &on_fuse),
            WaitClass::FsServer
        );
        assert_eq!(classify(None, None, &on_fuse), WaitClass::FsServer);
        assert_eq!(
            classify(Some("submit_bio_wait"), None, &plain),
            WaitClass::BlockIo
        );
        assert_eq!(
            classify(
                None,
                Some(&stack(&["rpc_wait_bit_killable+0x11/0x70 [sunrpc]"])),
                &plain
            ),
            WaitClass::FsServer
        );
        assert_eq!(
            classify(Some("__refrigerator"), None, &plain),
            WaitClass::Freezer
        );
        assert_eq!(
            classify(Some("shrink_folio_list"), None, &plain),
            WaitClass::MemoryReclaim
        );
        assert_eq!(
            classify(Some("x"), None, &chain(Some("pipe:[123]"), None)),
            WaitClass::RuntimePipe
        );
        assert_eq!(
            classify(Some("kernel_clone"), None, &plain),
            WaitClass::Unknown
        );
    }

    #[test]
    fn descriptions_name_the_chain() {
        let mut fuse = parse_mountinfo(MOUNTINFO)[1].to_mount(Path::new("/nonexistent"));
        if let Some(f) = fuse.fuse.as_mut() {
            f.waiting = Some(1);
            f.daemon = Some(TaskBrief {
                pid: 7,
                comm: "sshfs".into(),
                state: 'T',
                wchan: None,
            });
        }
        let mut c = chain(None, None);
        c.class = WaitClass::BlockIo;
        c.block_device = Some(BlockDevice {
            dev: "7:0".into(),
            name: "loop0".into(),
            backing_file: Some("/mnt/fuse y/data".into()),
            backing_mount: Some(fuse),
            dm_name: None,
            slaves: Vec::new(),
            md_level: None,
            model: None,
            serial: None,
            inflight: Some([0, 1]),
            completed_ios: Some(3),
            progressing: Some(false),
        });
        assert_eq!(
            c.describe(),
            "block I/O to /dev/loop0, whose backing file is /mnt/fuse y/data on FUSE mount \
             /mnt/fuse y served by pid 7 sshfs (stopped); 1 FUSE request(s) waiting; \
             1 request(s) in flight, none completed since the last scan"
        );
    }

    #[test]
    fn holders_and_fuse_daemons_need_the_whole_scan() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let sys = Path::new("/nonexistent");
        let stuck = |tid: i32, class: WaitClass, mount: &MountEntry, wchan: &str| StuckChain {
            pid: tid,
            tid,
            comm: format!("t{tid}"),
            wchan: Some(wchan.into()),
            chain: WaitChain {
                class,
                ..chain(Some("/f"), Some(mount.to_mount(sys)))
            },
        };
        let mut chains = vec![
            stuck(1, WaitClass::Lock, &mounts[2], "walk_component"),
            stuck(2, WaitClass::FsServer, &mounts[2], "rpc_wait_bit_killable"),
            stuck(3, WaitClass::FsServer, &mounts[1], "request_wait_answer"),
        ];
        let daemon = |pid: i32| TaskBrief {
            pid,
            comm: "sshfs".into(),
            state: 'T',
            wchan: None,
        };
        let mut wide = ScanWide {
            fuse_daemons: vec![
                (daemon(70), vec!["lxcfs".into(), "/var/lib/lxcfs".into()]),
                (
                    daemon(71),
                    vec![
                        "sshfs".into(),
                        "user@host:/srv".into(),
                        "/mnt/fuse y".into(),
                    ],
                ),
            ],
            ..ScanWide::default()
        };
        wide.waiters.insert(
            "0:52".into(),
            vec![Holder {
                pid: 9,
                tid: 9,
                comm: "touch".into(),
                state: 'S',
                wchan: Some("rpc_wait_bit_killable".into()),
                file: None,
            }],
        );
        complete(&mut chains, &wide);
        let holders: Vec<(i32, Option<&str>)> = chains[0]
            .chain
            .holders
            .iter()
            .map(|h| (h.pid, h.wchan.as_deref()))
            .collect();
        assert_eq!(
            holders,
            [
                (2, Some("rpc_wait_bit_killable")),
                (9, Some("rpc_wait_bit_killable"))
            ]
        );
        assert!(
            chains[1].chain.holders.is_empty(),
            "only lock waits have holders"
        );
        // Two daemons: the one whose arguments name the mount point.
        let fuse = chains[2]
            .chain
            .mount
            .as_ref()
            .unwrap()
            .fuse
            .as_ref()
            .unwrap();
        assert_eq!(fuse.daemon.as_ref().map(|d| d.pid), Some(71));
        assert_eq!(fuse.daemon_candidates, 2);
        wide.fuse_daemons.pop();
        wide.fuse_daemons.push((daemon(72), vec!["other".into()]));
        complete(&mut chains, &wide);
        let fuse = chains[2]
            .chain
            .mount
            .as_ref()
            .unwrap()
            .fuse
            .as_ref()
            .unwrap();
        assert_eq!(fuse.daemon, None, "not guessed");
    }
}
