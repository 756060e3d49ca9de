//! Real kernel OOM kills for tests: a static helper, executed from a file named after the
//! victim's comm (the kernel takes a task's comm from that name), placed in a memory cgroup
//! the test creates, then made to allocate past the limit.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::helper_binary;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A memory cgroup for a test; on drop, whatever is left in it is killed and it is removed.
pub struct TestCgroup {
    pub path: PathBuf,
    /// The path as the kernel prints it (`/hangwatch-test-...`).
    pub kernel_path: String,
}

impl TestCgroup {
    /// A fresh cgroup under `hierarchy`, with each `(file, value)` written where the file
    /// exists (e.g. `memory.memsw.limit_in_bytes` is absent without swap accounting).
    pub fn create(hierarchy: &Path, limits: &[(&str, &str)]) -> TestCgroup {
        let name = format!(
            "hangwatch-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = hierarchy.join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        for (file, value) in limits {
            let limit = path.join(file);
            if limit.exists() {
                fs::write(&limit, value).unwrap_or_else(|e| panic!("{}: {e}", limit.display()));
            }
        }
        TestCgroup {
            path,
            kernel_path: format!("/{name}"),
        }
    }

    /// A cgroup in the v1 memory hierarchy limited to 20 MiB (memory and memory+swap).
    pub fn v1_memory_20mib() -> TestCgroup {
        TestCgroup::create(
            Path::new("/sys/fs/cgroup/memory"),
            &[
                ("memory.limit_in_bytes", "20971520"),
                ("memory.memsw.limit_in_bytes", "20971520"),
            ],
        )
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(pids) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in pids.lines().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a pid in our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A victim started in a cgroup, not yet allocating.
pub struct OomVictim {
    pub pid: u32,
    exe_dir: PathBuf,
    exit: JoinHandle<(std::process::ExitStatus, Instant)>,
    go: std::process::ChildStdin,
}

impl OomVictim {
    /// Start the helper as `comm` in `cgroup`, waiting for the go-ahead on stdin.
    pub fn start(comm: &str, cgroup: &TestCgroup, scratch: &Path) -> OomVictim {
        let exe_dir = scratch.join(format!("oom-exe-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir_all(&exe_dir).expect("exe dir");
        let exe = exe_dir.join(comm);
        fs::copy(helper_binary("oom_victim"), &exe).expect("copy helper");
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut child = Command::new(&exe)
            .arg("100")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the OOM victim");
        let pid = child.id();
        fs::write(cgroup.path.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
        let shown = fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
        assert_eq!(shown.trim_end(), comm, "the kernel's comm for the victim");
        let go = child.stdin.take().expect("stdin piped");
        let exit = std::thread::spawn(move || {
            let status = child.wait().expect("wait for the victim");
            (status, Instant::now())
        });
        OomVictim {
            pid,
            exe_dir,
            exit,
            go,
        }
    }

    /// Let it allocate; returns when the kernel has killed it, with the time its exit was
    /// seen. Panics if it survived.
    pub fn allocate_until_killed(mut self) -> Instant {
        self.go.write_all(b"g").expect("go-ahead");
        let (status, exited_at) = self.exit.join().expect("waiter thread");
        assert_eq!(status.signal(), Some(9), "the OOM killer killed the victim");
        let _ = fs::remove_dir_all(&self.exe_dir);
        exited_at
    }
}
