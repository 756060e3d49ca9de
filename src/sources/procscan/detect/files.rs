//! Small reads outside the hot loop. Each may block in the kernel, so callers run them through
//! the [`DeadlineRunner`](super::deadline::DeadlineRunner).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bound on what a detail read keeps: kernel stacks and cgroup files are far smaller.
const TEXT_LIMIT: u64 = 64 * 1024;

/// Bound on a path read from a process's memory (the kernel's own `PATH_MAX`).
const PATH_MAX: usize = 4096;

/// A small text file, lossily decoded.
pub fn read_text(path: &Path) -> io::Result<String> {
    read_text_up_to(path, TEXT_LIMIT)
}

/// A text file of at most `limit` bytes (a node's `mountinfo` can be megabytes).
pub fn read_text_up_to(path: &Path, limit: u64) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)?.take(limit).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The target of a symlink such as `/proc/<pid>/fd/<n>` or `/proc/<pid>/cwd`.
pub fn read_link(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
}

/// The NUL-terminated string at `address` in the memory of the process whose `mem` file this
/// is. Needs ptrace access (root). A string cut by an unmapped page or longer than `PATH_MAX`
/// is an error rather than a guess.
pub fn read_c_string(mem: &Path, address: u64) -> io::Result<String> {
    let mut buf = vec![0u8; PATH_MAX];
    let len = File::open(mem)?.read_at(&mut buf, address)?;
    let end = buf[..len]
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no NUL in range"))?;
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// The task or process went away: normal, never an error worth counting.
pub fn is_vanished(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(nix::libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_string_from_our_own_memory() {
        let text = c"/run/runc/x/exec.fifo";
        let address = text.as_ptr() as u64;
        let read = read_c_string(Path::new("/proc/self/mem"), address).unwrap();
        assert_eq!(read, "/run/runc/x/exec.fifo");
        assert!(read_c_string(Path::new("/proc/self/mem"), 8).is_err());
    }

    #[test]
    fn missing_files_are_vanished() {
        let e = read_text(Path::new("/proc/999999999/wchan")).unwrap_err();
        assert!(is_vanished(&e));
        let e = read_link(Path::new("/nonexistent/link")).unwrap_err();
        assert!(is_vanished(&e));
    }
}
