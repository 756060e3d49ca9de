//! The hot loop: read `stat` of every task under a proc root.
//!
//! Directories are read with `readdir` on descriptors, files are opened with `openat` relative
//! to their directory, and every `stat` is read into one reused buffer: nothing is allocated
//! per task. Tasks that vanish between listing and reading are normal and not errors.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use super::stat::{TaskStat, parse_pid, parse_stat};

/// One task, as the walk hands it to its visitor.
#[derive(Debug, Clone, Copy)]
pub struct TaskEntry<'a> {
    pub pid: i32,
    pub tid: i32,
    pub stat: TaskStat<'a>,
}

impl TaskEntry<'_> {
    /// The thread-group leader, whose comm and age are the process's.
    pub fn is_leader(&self) -> bool {
        self.pid == self.tid
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkCounts {
    pub processes: u64,
    pub tasks: u64,
    /// Reads that failed for a reason other than the task having gone.
    pub read_errors: u64,
    /// `stat` files that could not be parsed.
    pub malformed: u64,
}

/// Reused state of the walk.
pub struct Walker {
    stat: Vec<u8>,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC);

/// Large enough for any `stat` line (about 300 bytes plus a comm of at most 64).
const STAT_BUFFER: usize = 4096;

impl Default for Walker {
    fn default() -> Self {
        Walker {
            stat: vec![0; STAT_BUFFER],
        }
    }
}

impl Walker {
    /// Call `visit` for every task under `proc_root`. Fails only when `proc_root` itself cannot
    /// be read.
    pub fn walk(
        &mut self,
        proc_root: &Path,
        mut visit: impl FnMut(&TaskEntry<'_>),
    ) -> nix::Result<WalkCounts> {
        let root = nix::fcntl::open(proc_root, DIR_FLAGS, Mode::empty())?;
        let mut listing = Dir::from_fd(root.try_clone().map_err(io_errno)?)?;
        let mut counts = WalkCounts::default();
        for entry in listing.iter() {
            let Ok(entry) = entry else {
                counts.read_errors += 1;
                continue;
            };
            let name = entry.file_name().to_bytes();
            let Some(pid) = parse_pid(name) else {
                continue;
            };
            let mut path = ShortPath::default();
            path.push(name);
            path.push(b"/task");
            let task_dir = match openat(&root, path.as_bytes(), DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(e) if vanished(e) => continue,
                Err(_) => {
                    counts.read_errors += 1;
                    continue;
                }
            };
            counts.processes += 1;
            self.walk_tasks(pid, task_dir, &mut counts, &mut visit);
        }
        Ok(counts)
    }

    fn walk_tasks(
        &mut self,
        pid: i32,
        task_dir: OwnedFd,
        counts: &mut WalkCounts,
        visit: &mut impl FnMut(&TaskEntry<'_>),
    ) {
        // readdir needs the directory by value, openat needs a descriptor of it while the
        // listing is borrowed: a duplicate serves both without unsafe code.
        let listing = task_dir
            .try_clone()
            .map_err(io_errno)
            .and_then(Dir::from_fd);
        let mut listing = match listing {
            Ok(listing) => listing,
            Err(e) if vanished(e) => return,
            Err(_) => {
                counts.read_errors += 1;
                return;
            }
        };
        for entry in listing.iter() {
            let Ok(entry) = entry else {
                counts.read_errors += 1;
                continue;
            };
            let name = entry.file_name().to_bytes();
            let Some(tid) = parse_pid(name) else {
                continue;
            };
            let mut path = ShortPath::default();
            path.push(name);
            path.push(b"/stat");
            match read_into(&task_dir, path.as_bytes(), &mut self.stat) {
                Ok(len) => {
                    counts.tasks += 1;
                    match parse_stat(&self.stat[..len]) {
                        Some(stat) => visit(&TaskEntry { pid, tid, stat }),
                        None => counts.malformed += 1,
                    }
                }
                Err(e) if vanished(e) => {}
                Err(_) => counts.read_errors += 1,
            }
        }
    }
}

/// Open `path` relative to `dir` and read it whole into `buf`; returns the length read.
fn read_into(dir: &impl AsFd, path: &[u8], buf: &mut [u8]) -> nix::Result<usize> {
    let fd = openat(dir, path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut len = 0;
    // procfs returns a whole `stat` in one read; a second read happens only if it did not.
    while len < buf.len() {
        let n = nix::unistd::read(&fd, &mut buf[len..])?;
        len += n;
        if n == 0 || buf[len - 1] == b'\n' {
            break;
        }
    }
    Ok(len)
}

/// A task that exited between being listed and being read: `ENOENT` on open, `ESRCH` on read.
pub fn vanished(e: Errno) -> bool {
    matches!(e, Errno::ENOENT | Errno::ESRCH)
}

fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// A relative path built on the stack: `<pid>/task` or `<tid>/stat`.
#[derive(Default)]
struct ShortPath {
    bytes: [u8; 32],
    len: usize,
}

impl ShortPath {
    /// Appends what fits; directory names from procfs are at most 10 digits.
    fn push(&mut self, part: &[u8]) {
        let end = (self.len + part.len()).min(self.bytes.len());
        let take = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&part[..take]);
        self.len = end;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_this_process_and_its_threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || rx.recv());
        let me = std::process::id() as i32;
        let mut mine = Vec::new();
        let counts = Walker::default()
            .walk(Path::new("/proc"), |t| {
                if t.pid == me {
                    mine.push(t.tid);
                }
            })
            .unwrap();
        tx.send(()).unwrap();
        thread.join().unwrap().unwrap();
        assert!(mine.contains(&me));
        assert!(mine.len() >= 2, "threads of this test: {mine:?}");
        assert!(counts.tasks >= counts.processes && counts.processes > 1);
        assert_eq!(counts.read_errors, 0);
    }

    #[test]
    fn missing_root_is_an_error() {
        assert!(
            Walker::default()
                .walk(Path::new("/nonexistent-proc"), |_| {})
                .is_err()
        );
    }

    #[test]
    fn path_buffer_truncates_instead_of_panicking() {
        let mut p = ShortPath::default();
        p.push(&[b'1'; 30]);
        p.push(b"/stat");
        assert_eq!(p.as_bytes().len(), 32);
    }
}
