//! The container image, run the way the DaemonSet runs it: built from the Dockerfile by a
//! private dockerd, started with exactly the DaemonSet's host mounts, capabilities, hostPID,
//! read-only root and user (read from `kubectl kustomize deploy/base`, so the test follows the
//! manifest), it must see a stalled dockerd (and take its goroutine dump) and a task in D state
//! in a container — proving the manifest's permissions suffice.
//!
//! Needs the static release binary (`tests/run.sh` and `scripts/build-image.sh` build it).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::daemons::PrivateDaemons;
use support::hangwatch::{TempDir, metric_value};
use support::prometheus::free_port;
use support::{helper_binary, wait_for};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const STATIC_BINARY: &str = "target/x86_64-unknown-linux-gnu/release/hangwatch";

fn daemonset() -> Value {
    let output = Command::new("kubectl")
        .args(["kustomize", "deploy/base"])
        .current_dir(ROOT)
        .output()
        .expect("kubectl kustomize");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .split("\n---\n")
        .map(|d| serde_saphyr::from_str::<Value>(d).expect("manifest YAML"))
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

/// `docker run` options equivalent to the DaemonSet's pod: host paths through `host_path`,
/// the ConfigMap from `config_dir`.
fn docker_run_options(
    ds: &Value,
    host_path: impl Fn(&str) -> PathBuf,
    config_dir: &Path,
) -> Vec<String> {
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    let mut options = vec![];
    if pod["hostPID"] == true {
        options.push("--pid=host".to_string());
    }
    if security["readOnlyRootFilesystem"] == true {
        options.push("--read-only".to_string());
    }
    if security["allowPrivilegeEscalation"] == false {
        options.push("--security-opt=no-new-privileges".to_string());
    }
    assert_ne!(
        security["privileged"], true,
        "the DaemonSet must not be privileged"
    );
    options.push(format!(
        "--user={}:{}",
        security["runAsUser"].as_i64().unwrap_or(0),
        security["runAsGroup"].as_i64().unwrap_or(0)
    ));
    for cap in security["capabilities"]["drop"]
        .as_array()
        .into_iter()
        .flatten()
    {
        options.push(format!("--cap-drop={}", cap.as_str().expect("cap")));
    }
    for cap in security["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
    {
        options.push(format!("--cap-add={}", cap.as_str().expect("cap")));
    }
    for env in container["env"].as_array().into_iter().flatten() {
        if env["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName" {
            options.push(format!(
                "--env={}=image-test-node",
                env["name"].as_str().expect("name")
            ));
        }
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("volume for mount");
        let source = if let Some(path) = volume["hostPath"]["path"].as_str() {
            host_path(path)
        } else if volume.get("configMap").is_some() {
            config_dir.to_path_buf()
        } else {
            panic!("unsupported volume {volume}");
        };
        let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
        options.push(format!(
            "--volume={}:{}{read_only}",
            source.display(),
            mount["mountPath"].as_str().expect("mountPath")
        ));
    }
    options
}

/// The DaemonSet's config with probe and scan intervals short enough for a test.
fn test_config() -> String {
    let mut config = std::fs::read_to_string(Path::new(ROOT).join("deploy/base/hangwatch.yaml"))
        .expect("config");
    for (from, to) in [
        ("  interval: 5s ", "  interval: 500ms "),
        ("  stall_threshold: 10s ", "  stall_threshold: 2s "),
        ("  interval: 10s\n", "  interval: 1s\n"),
        ("  stuck_after: 30s ", "  stuck_after: 3s "),
        ("  wait: 30s ", "  wait: 2s "),
    ] {
        assert!(config.contains(from), "deploy config has no `{from}`");
        config = config.replacen(from, to, 1);
    }
    config
}

fn get(url: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .unwrap_or_default()
}

#[test]
fn image_with_the_daemonsets_permissions_sees_a_stalled_dockerd_and_a_dstate_task() {
    let binary = Path::new(ROOT).join(STATIC_BINARY);
    assert!(
        binary.exists(),
        "{STATIC_BINARY} missing: build it with scripts/build-image.sh (tests/run.sh does)"
    );
    let daemons = PrivateDaemons::start();
    daemons.docker_ok(&["build", "--quiet", "-t", "hangwatch:image-test", ROOT]);
    daemons.import_image("hwtest:dstate", &[&helper_binary("procscan_block")]);

    let dir = TempDir::new("image");
    let config_dir = dir.path().join("config");
    let state_dir = dir.path().join("state");
    std::fs::create_dir_all(&config_dir).expect("config dir");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    std::fs::write(config_dir.join("hangwatch.yaml"), test_config()).expect("config");
    let host_path = |path: &str| -> PathBuf {
        match path {
            "/run" => daemons.run_dir.clone(),
            "/tmp" => daemons.containerd_tmp.clone(),
            "/var/lib/hangwatch" => state_dir.clone(),
            other => PathBuf::from(other),
        }
    };
    let ds = daemonset();
    let port = free_port();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name=hangwatch".into(),
        "--network=host".into(),
    ];
    args.extend(docker_run_options(&ds, host_path, &config_dir));
    args.push("hangwatch:image-test".into());
    args.extend(
        ds["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("arg").to_string()),
    );
    args.push(format!("--listen=127.0.0.1:{port}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemons.docker_ok(&args);
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let logs =
        || String::from_utf8_lossy(&daemons.docker(&["logs", "hangwatch"]).stderr).into_owned();
    let gauge =
        |name: &str, labels: &[(&str, &str)]| metric_value(&get(&metrics_url), name, labels);

    wait_for(
        "both runtimes healthy, seen from the container",
        Duration::from_secs(30),
        || {
            let ok = |runtime| {
                gauge(
                    "hangwatch_runtime_state",
                    &[("runtime", runtime), ("state", "healthy")],
                ) == Some(1.0)
            };
            (ok("docker") && ok("containerd")).then_some(())
        },
    );
    assert!(
        get(&metrics_url).contains("node=\"image-test-node\""),
        "NODE_NAME from the downward API names the node"
    );

    let id = daemons.docker_ok(&[
        "run",
        "-d",
        "--name",
        "dstate",
        "--network",
        "none",
        "hwtest:dstate",
        "/bin/procscan_block",
        "vfork",
    ]);
    wait_for(
        "the container's task stuck in D",
        Duration::from_secs(30),
        || {
            gauge(
                "hangwatch_container_dstate_tasks",
                &[("container_id", id.as_str()), ("container_name", "dstate")],
            )
            .filter(|v| *v >= 1.0)
        },
    );

    daemons.signal_dockerd(libc::SIGSTOP);
    wait_for("docker stalled", Duration::from_secs(15), || {
        (gauge("hangwatch_runtime_stalled", &[("runtime", "docker")]) == Some(1.0)).then_some(())
    });
    daemons.signal_dockerd(libc::SIGCONT);
    wait_for(
        "dockerd's goroutine dump collected through the pidfd",
        Duration::from_secs(30),
        || {
            gauge(
                "hangwatch_goroutine_dumps_total",
                &[("daemon", "dockerd"), ("result", "ok")],
            )
            .filter(|v| *v >= 1.0)
        },
    );
    let copies = std::fs::read_dir(state_dir.join("dumps"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(copies >= 1, "no dump copied into the state dir\n{}", logs());
    assert!(!logs().contains("panicked"), "{}", logs());
}
