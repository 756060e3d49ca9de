//! A private containerd **with its CRI plugin**, for tests of what kubelet sees: own socket,
//! root, state and TMPDIR under a fresh directory, started in a mount namespace of its own
//! with a tmpfs over `/run`, because containerd 1.6's shims hard-code `/run/containerd/s/`
//! and `/run/containerd/runc` (the machine's own `/run/containerd` is never touched). A local
//! busybox image (no registry) is the sandbox image; pods are host-network (no CNI) and are
//! created through hangwatch's own CRI client. Dropping the value removes the pods, stops
//! containerd and removes everything.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use containerd_client::tonic;
use containerd_client::tonic::transport::Channel;
use hangwatch::sources::runtime::detect::cri::{runtime_service, unix_channel};
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;

use super::daemons::{kill_leftover_shims, send};
use super::wait_for;

/// The image every pod and container runs: busybox, `sleep` as its entrypoint.
pub const IMAGE: &str = "hangwatch.local/busybox:1";

/// Every harness call has this deadline (a test that stops containerd must not hang).
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const START_DEADLINE: Duration = Duration::from_secs(60);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct PrivateCri {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub tmp: PathBuf,
    /// The pods' cgroup parent, removed on drop (CRI's default, `/k8s.io`, would be left on
    /// the machine).
    cgroup_parent: String,
    containerd: Option<Child>,
    rt: tokio::runtime::Runtime,
}

/// A pod created through CRI, with its one container.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub sandbox_id: String,
    pub container: String,
    pub container_id: String,
}

impl PrivateCri {
    pub fn start() -> PrivateCri {
        for binary in ["containerd", "ctr", "runc", "unshare", "tar", "sha256sum"] {
            assert!(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {binary}"))
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()),
                "{binary} not found: run tests/run.sh, which installs docker.io"
            );
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!("/tmp/hwc-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["root", "state", "tmp", "run", "logs", "image"] {
            fs::create_dir_all(dir.join(sub)).expect("create CRI daemon dirs");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut d = PrivateCri {
            socket: dir.join("run/containerd.sock"),
            tmp: dir.join("tmp"),
            cgroup_parent: format!("/hwc-{}-{n}", std::process::id()),
            dir,
            containerd: None,
            rt,
        };
        d.start_containerd();
        d.import_image();
        d
    }

    fn start_containerd(&mut self) {
        let config = self.dir.join("containerd.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"info\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n\
                 \x20 sandbox_image = \"{IMAGE}\"\n\
                 \x20 restrict_oom_score_adj = true\n\
                 \x20 disable_apparmor = true\n\
                 \x20 stream_server_address = \"127.0.0.1\"\n\
                 \x20 stream_server_port = \"0\"\n\
                 \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
                 \x20   bin_dir = \"{cni}\"\n\
                 \x20   conf_dir = \"{cni}\"\n",
                root = self.dir.join("root").display(),
                state = self.dir.join("state").display(),
                sock = self.socket.display(),
                cni = self.dir.join("cni").display(),
            ),
        )
        .expect("write containerd config");
        let log = fs::File::create(self.log_path()).expect("containerd log");
        // A tmpfs over /run in a mount namespace of its own: the shims' hard-coded
        // /run/containerd/s and runc's root land there, not on the machine's /run.
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c"])
            .arg(format!(
                "mount -t tmpfs -o mode=755 hangwatch-cri /run && mkdir -p /run/containerd && \
                 exec containerd --config {}",
                config.display()
            ))
            .env("TMPDIR", &self.tmp)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start containerd in its own mount namespace");
        self.containerd = Some(child);
        let socket = self.socket.clone();
        wait_for("private CRI containerd socket", START_DEADLINE, || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        });
        wait_for("CRI Status to answer", START_DEADLINE, || {
            self.call(|mut c| async move { c.status(cri::StatusRequest { verbose: false }).await })
                .ok()
        });
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The cgroup parent every pod is created under (`/hwc-<pid>-<n>`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub fn containerd_pid(&self) -> i32 {
        self.containerd
            .as_ref()
            .map(|c| c.id() as i32)
            .expect("containerd running")
    }

    /// One CRI call through hangwatch's own client, with a deadline.
    pub fn call<T, F>(
        &self,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
    ) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client();
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_DEADLINE, call(client)).await {
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => Err("timed out".into()),
            }
        })
    }

    /// CRI `StopContainer` with a 1 s timeout, as kubelet sends it for a short grace period.
    pub fn stop_container(&self, container_id: &str) -> Result<cri::StopContainerResponse, String> {
        let container_id = container_id.to_string();
        self.call(|mut c| async move {
            c.stop_container(cri::StopContainerRequest {
                container_id,
                timeout: 1,
            })
            .await
        })
    }

    /// A client made within the harness's runtime (tonic spawns its connection task there).
    fn client(&self) -> RuntimeServiceClient<Channel> {
        let _entered = self.rt.enter();
        runtime_service(&self.socket, CALL_DEADLINE)
    }

    /// Spawn a call in the background (it may hang: that is the point); abandoned on drop.
    pub fn spawn_call<T: Send + 'static, F>(
        &self,
        call: impl FnOnce(RuntimeServiceClient<Channel>) -> F,
        deadline: Duration,
    ) -> std::thread::JoinHandle<Result<T, String>>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        let socket = self.socket.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let future = {
            let _entered = rt.enter();
            call(runtime_service(&socket, deadline))
        };
        std::thread::spawn(move || {
            rt.block_on(async {
                match tokio::time::timeout(deadline, future).await {
                    Ok(Ok(response)) => Ok(response.into_inner()),
                    Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                    Err(_) => Err("timed out".into()),
                }
            })
        })
    }

    /// An OCI image archive built by hand (a busybox-static layer, its config, a manifest and
    /// an index) imported into namespace `k8s.io`, where the CRI plugin finds it.
    fn import_image(&self) {
        let image = self.dir.join("image");
        let rootfs = image.join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).expect("rootfs");
        fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static missing");
        for applet in ["sh", "sleep", "tail", "true"] {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
        let layout = image.join("layout");
        let blobs = layout.join("blobs/sha256");
        fs::create_dir_all(&blobs).expect("blobs dir");
        let layer = image.join("layer.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."));
        let layer_bytes = fs::read(&layer).expect("read layer");
        let layer_digest = blob(&blobs, &layer_bytes);
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Entrypoint": ["/bin/sleep", "1000000"] },
            "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
        })
        .to_string();
        let config_digest = blob(&blobs, config.as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{config_digest}"),
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{layer_digest}"),
                "size": layer_bytes.len(),
            }],
        })
        .to_string();
        let manifest_digest = blob(&blobs, manifest.as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "annotations": {
                    "io.containerd.image.name": IMAGE,
                    "org.opencontainers.image.ref.name": IMAGE,
                },
            }],
        });
        fs::write(layout.join("index.json"), index.to_string()).expect("index");
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .expect("oci-layout");
        let archive = image.join("image.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."));
        run(Command::new("timeout")
            .arg("60")
            .arg("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .stdout(Stdio::null()));
        wait_for("CRI to see the imported image", START_DEADLINE, || {
            let mut images = {
                let _entered = self.rt.enter();
                ImageServiceClient::new(unix_channel(&self.socket, CALL_DEADLINE))
            };
            let request = cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                verbose: false,
            };
            self.rt
                .block_on(async {
                    tokio::time::timeout(CALL_DEADLINE, images.image_status(request)).await
                })
                .ok()?
                .ok()?
                .into_inner()
                .image
        });
    }

    /// A host-network pod `namespace/name` with one running container `container`.
    pub fn run_pod(&self, namespace: &str, name: &str, container: &str) -> Pod {
        self.run_pod_with(namespace, name, container, &["/bin/sleep", "1000000"], None)
    }

    /// Like [`run_pod`](Self::run_pod), the container running `command`, with a memory limit
    /// when given (CRI's `memory_limit_in_bytes`: the container's own memory cgroup).
    pub fn run_pod_with(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        command: &[&str],
        memory_limit: Option<i64>,
    ) -> Pod {
        let sandbox_config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            log_directory: self.dir.join("logs").join(name).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let config = sandbox_config.clone();
        let sandbox_id = self
            .call(|mut c| async move {
                c.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config),
                    runtime_handler: String::new(),
                })
                .await
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", self.log()))
            .pod_sandbox_id;
        let container_config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: container.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: command.iter().map(|c| c.to_string()).collect(),
            log_path: format!("{container}.log"),
            linux: memory_limit.map(|limit| cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: limit,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = sandbox_id.clone();
        let container_id = self
            .call(|mut c| async move {
                c.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: id,
                    config: Some(container_config),
                    sandbox_config: Some(sandbox_config),
                })
                .await
            })
            .unwrap_or_else(|e| panic!("CreateContainer {container}: {e}\n{}", self.log()))
            .container_id;
        let id = container_id.clone();
        self.call(|mut c| async move {
            c.start_container(cri::StartContainerRequest { container_id: id })
                .await
        })
        .unwrap_or_else(|e| panic!("StartContainer {container}: {e}\n{}", self.log()));
        Pod {
            name: name.into(),
            namespace: namespace.into(),
            sandbox_id,
            container: container.into(),
            container_id,
        }
    }

    /// The pid of a running container's process, from CRI's verbose status.
    pub fn container_pid(&self, container_id: &str) -> i32 {
        let id = container_id.to_string();
        let status = self
            .call(|mut c| async move {
                c.container_status(cri::ContainerStatusRequest {
                    container_id: id,
                    verbose: true,
                })
                .await
            })
            .expect("ContainerStatus");
        let info: HashMap<String, String> = status.info;
        let text = info.get("info").expect("verbose info");
        let v: serde_json::Value = serde_json::from_str(text).expect("info is JSON");
        v.get("pid")
            .and_then(|p| p.as_i64())
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 0)
            .expect("a pid in the verbose info")
    }

    /// The shim of a running container: the parent of its process (one shim per pod in 1.6).
    pub fn shim_pid(&self, container_id: &str) -> i32 {
        let pid = self.container_pid(container_id);
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("container's stat");
        let after = stat.rsplit_once(')').expect("stat has comm").1;
        let ppid: i32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("ppid");
        let comm = fs::read_to_string(format!("/proc/{ppid}/comm")).expect("shim comm");
        assert!(comm.starts_with("containerd-shim"), "parent is {comm}");
        ppid
    }

    /// YAML for hangwatch probing this containerd natively (namespace `k8s.io`) and through
    /// CRI; no Docker.
    pub fn hangwatch_config(&self, state_dir: &Path, extra: &str) -> String {
        format!(
            "state_dir: {state}\n\
             docker:\n  mode: disabled\n\
             containerd:\n  mode: required\n  socket: {sock}\n  namespaces: [k8s.io]\n  stack_dump_dir: {tmp}\n\
             cri:\n  mode: required\n  sockets: [{sock}]\n{extra}",
            state = state_dir.display(),
            sock = self.socket.display(),
            tmp = self.tmp.display(),
        )
    }

    /// Kill containerd (SIGKILL to the harness's own child) and wait for it to be gone; for
    /// tests without pods (their shims would be left in its mount namespace).
    pub fn kill_containerd(&mut self) {
        if let Some(mut child) = self.containerd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start containerd again on the same socket, root and state after [`kill_containerd`].
    ///
    /// [`kill_containerd`]: Self::kill_containerd
    pub fn start_containerd_again(&mut self) {
        assert!(self.containerd.is_none(), "containerd is still running");
        self.start_containerd();
    }

    pub fn signal_containerd(&self, signal: i32) {
        send(self.containerd_pid(), signal);
    }

    /// Stop and remove every pod (bounded: a test may leave containerd stopped or a shim frozen).
    fn remove_pods(&self) {
        let Ok(pods) = self.call(|mut c| async move {
            c.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
                .await
        }) else {
            return;
        };
        for pod in pods.items {
            let id = pod.id.clone();
            let _ = self.call(|mut c| async move {
                c.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id })
                    .await
            });
            let id = pod.id;
            let _ = self.call(|mut c| async move {
                c.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
                    .await
            });
        }
    }
}

/// A process a test stopped with SIGSTOP, resumed when the value is dropped (also on panic).
pub struct Stopped(pub i32);

impl Stopped {
    pub fn stop(pid: i32) -> Stopped {
        send(pid, libc::SIGSTOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: resuming a process the test stopped.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Write `bytes` as a blob named by its sha256; returns the hex digest.
fn blob(dir: &Path, bytes: &[u8]) -> String {
    let tmp = dir.join("incoming");
    fs::write(&tmp, bytes).expect("write blob");
    let out = Command::new("sha256sum")
        .arg(&tmp)
        .output()
        .expect("sha256sum");
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string();
    fs::rename(&tmp, dir.join(&digest)).expect("name blob");
    digest
}

fn run(command: &mut Command) {
    let status = command.status().expect("run command");
    assert!(status.success(), "{command:?} failed");
}

impl Drop for PrivateCri {
    fn drop(&mut self) {
        if let Some(child) = &self.containerd {
            // SAFETY: resuming our own child, which a test may have stopped.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
        }
        self.remove_pods();
        if let Some(mut child) = self.containerd.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let stopped = wait_for_exit(&mut child, Duration::from_secs(15));
            if !stopped {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Shims outlive containerd; with them gone the mount namespace and its mounts go.
        kill_leftover_shims(&self.socket);
        // Empty once the pods are gone; rmdir removes nothing else.
        if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = fs::remove_dir(
                    hierarchy
                        .path()
                        .join(self.cgroup_parent.trim_start_matches('/')),
                );
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn wait_for_exit(child: &mut Child, deadline: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
