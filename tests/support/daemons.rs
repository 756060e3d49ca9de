//! Private containerd + dockerd instances for tests: own sockets, roots, state, exec-root,
//! pidfiles and TMPDIR under a fresh directory, so a test can SIGSTOP them without touching
//! the machine's own Docker. Dropping the value stops them and removes everything.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::wait_for;

/// Debian's docker CLI; `/usr/local/bin/docker` on some machines is an unrelated client.
pub const DOCKER_CLI: &str = "/usr/bin/docker";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct PrivateDaemons {
    pub dir: PathBuf,
    /// Laid out like a host's /run: docker.sock, containerd/containerd.sock, docker/ (dockerd's
    /// exec-root) and docker.pid. The DaemonSet mounts a host's /run the same way.
    pub run_dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub docker_socket: PathBuf,
    pub docker_exec_root: PathBuf,
    pub docker_pidfile: PathBuf,
    /// containerd's TMPDIR: where it writes `containerd.<pid>.stacks.log`.
    pub containerd_tmp: PathBuf,
    pub containerd_log: PathBuf,
    pub dockerd_log: PathBuf,
    containerd: Option<Child>,
    dockerd: Option<Child>,
}

/// Start-up can be slow on a loaded 2-core CI machine.
const START_DEADLINE: Duration = Duration::from_secs(60);

impl PrivateDaemons {
    /// containerd and dockerd, both answering.
    pub fn start() -> PrivateDaemons {
        let mut d = PrivateDaemons::containerd_only();
        d.start_dockerd();
        d
    }

    /// Only containerd (a containerd-only node).
    pub fn containerd_only() -> PrivateDaemons {
        for binary in ["containerd", "dockerd", "runc"] {
            assert!(
                which(binary),
                "{binary} not found: run tests/run.sh, which installs docker.io"
            );
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short path: unix socket paths are limited to 108 bytes.
        let dir = PathBuf::from(format!("/tmp/hwd-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in [
            "ctd-root",
            "ctd-state",
            "tmp",
            "docker-data",
            "run/docker",
            "run/containerd",
        ] {
            fs::create_dir_all(dir.join(sub)).expect("create daemon dirs");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let run_dir = dir.join("run");
        let mut d = PrivateDaemons {
            containerd_socket: run_dir.join("containerd/containerd.sock"),
            docker_socket: run_dir.join("docker.sock"),
            docker_exec_root: run_dir.join("docker"),
            docker_pidfile: run_dir.join("docker.pid"),
            containerd_tmp: dir.join("tmp"),
            run_dir,
            containerd_log: dir.join("containerd.log"),
            dockerd_log: dir.join("dockerd.log"),
            dir,
            containerd: None,
            dockerd: None,
        };
        d.start_containerd();
        d
    }

    fn start_containerd(&mut self) {
        let config = self.dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"info\"\n",
                root = self.dir.join("ctd-root").display(),
                state = self.dir.join("ctd-state").display(),
                sock = self.containerd_socket.display(),
            ),
        )
        .expect("write containerd config");
        let log = fs::File::create(&self.containerd_log).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("TMPDIR", &self.containerd_tmp)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        self.containerd = Some(child);
        let socket = self.containerd_socket.clone();
        wait_for("private containerd socket", START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
    }

    fn start_dockerd(&mut self) {
        let log = fs::File::create(&self.dockerd_log).expect("dockerd log");
        let child = Command::new("dockerd")
            .arg("--containerd")
            .arg(&self.containerd_socket)
            .arg("-H")
            .arg(format!("unix://{}", self.docker_socket.display()))
            .arg("--data-root")
            .arg(self.dir.join("docker-data"))
            .arg("--exec-root")
            .arg(&self.docker_exec_root)
            .arg("--pidfile")
            .arg(&self.docker_pidfile)
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--userland-proxy=false",
                "--storage-driver=overlay2",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        self.dockerd = Some(child);
        wait_for("private dockerd to answer", START_DEADLINE, || {
            self.docker(&["version", "--format", "{{.Server.Version}}"])
                .status
                .success()
                .then_some(())
        });
    }

    /// Stop dockerd (SIGTERM, as a service manager would) and start it again with the same
    /// sockets and state; returns once it answers.
    pub fn restart_dockerd(&mut self) {
        if let Some(child) = self.dockerd.take() {
            stop(child);
        }
        self.start_dockerd();
    }

    pub fn containerd_pid(&self) -> i32 {
        self.containerd
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("containerd running")
    }

    pub fn dockerd_pid(&self) -> i32 {
        self.dockerd
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("dockerd running")
    }

    /// Run the docker CLI against the private dockerd (with a deadline).
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("60")
            .arg(DOCKER_CLI)
            .arg("-H")
            .arg(format!("unix://{}", self.docker_socket.display()))
            .args(args)
            .output()
            .expect("run docker CLI")
    }

    /// Like `docker`, but panics with the CLI's output on failure; returns trimmed stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Import an image named `name` holding busybox (from Debian's busybox-static) and the
    /// given extra static executables at `/bin/<file name>`. No registry is needed.
    pub fn import_image(&self, name: &str, extra: &[&Path]) {
        let rootfs = self
            .dir
            .join(format!("rootfs-{}", name.replace([':', '/'], "-")));
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).expect("rootfs");
        fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static missing");
        for applet in ["sh", "sleep", "cat", "ls", "true", "kill", "trap"] {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        for file in extra {
            let target = bin.join(file.file_name().expect("file name"));
            fs::copy(file, target).expect("copy helper into rootfs");
        }
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C {} -c . | timeout 60 {DOCKER_CLI} -H unix://{} import - {name}",
                rootfs.display(),
                self.docker_socket.display()
            ))
            .stdout(Stdio::null())
            .status()
            .expect("docker import");
        assert!(status.success(), "docker import of {name} failed");
    }

    /// YAML for hangwatch pointing at these daemons, with `extra` appended verbatim.
    pub fn hangwatch_config(&self, state_dir: &Path, extra: &str) -> String {
        format!(
            "state_dir: {state}\n\
             docker:\n  mode: required\n  socket: {dsock}\n  exec_root: {exec}\n  pidfile: {pid}\n\
             containerd:\n  mode: required\n  socket: {csock}\n  stack_dump_dir: {tmp}\n\
             cri:\n  mode: disabled\n{extra}",
            state = state_dir.display(),
            dsock = self.docker_socket.display(),
            exec = self.docker_exec_root.display(),
            pid = self.docker_pidfile.display(),
            csock = self.containerd_socket.display(),
            tmp = self.containerd_tmp.display(),
        )
    }

    pub fn signal_dockerd(&self, signal: i32) {
        send(self.dockerd_pid(), signal);
    }

    pub fn signal_containerd(&self, signal: i32) {
        send(self.containerd_pid(), signal);
    }
}

pub fn send(pid: i32, signal: i32) {
    // SAFETY: kill(2) with a pid we started; no memory is involved.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

fn which(binary: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {binary}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for PrivateDaemons {
    fn drop(&mut self) {
        // Resume anything a test left stopped, or it can never exit.
        for child in [&self.dockerd, &self.containerd].into_iter().flatten() {
            // SAFETY: signalling our own children.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        if self.dockerd.is_some() {
            self.remove_all_containers();
        }
        for child in [self.dockerd.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            stop(child);
        }
        kill_leftover_shims(&self.containerd_socket);
        unmount_below(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl PrivateDaemons {
    fn remove_all_containers(&self) {
        let listed = self.docker(&["ps", "-aq"]);
        let listed = String::from_utf8_lossy(&listed.stdout).to_string();
        let ids: Vec<&str> = listed.split_whitespace().collect();
        if !ids.is_empty() {
            let mut rm = vec!["rm", "-f", "-v"];
            rm.extend(ids);
            self.docker(&rm);
        }
    }
}

fn stop(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    for _ in 0..150 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Shims outlive containerd by design; ours are the ones naming our socket.
pub fn kill_leftover_shims(socket: &Path) {
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let needle = socket.to_string_lossy().to_string();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&needle) {
            // SAFETY: a shim we started through our private containerd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Overlay and shm mounts dockerd made under our directory, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().to_string();
    let mut mounts: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").arg("-l").arg(&m).status();
    }
}
