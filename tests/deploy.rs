//! The Kubernetes manifests in `deploy/`: the PrometheusRule cannot drift from `rules/`, the
//! DaemonSet's config differs from the built-in defaults only where the host is mounted,
//! `kubectl kustomize` builds every kustomization and the output validates against the
//! Kubernetes schemas (`kubernetes-validate`, offline).

mod support;

use std::path::Path;
use std::process::Command;

use hangwatch::config::Config;
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const PROMETHEUS_RULE: &str = "deploy/base/prometheusrule.yaml";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The PrometheusRule for `rules/hangwatch.rules.yml`: its groups, verbatim, under `spec`.
fn generated_prometheus_rule() -> String {
    let rules = read("rules/hangwatch.rules.yml");
    let groups: String = rules
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("  {l}\n")
            }
        })
        .collect();
    format!(
        "# Generated from rules/hangwatch.rules.yml: do not edit. Regenerate with\n\
         #   HANGWATCH_REGENERATE=1 cargo test --test deploy\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: hangwatch\n  namespace: hangwatch\n  labels:\n    app.kubernetes.io/name: hangwatch\n\
         spec:\n{groups}"
    )
}

#[test]
fn prometheus_rule_is_generated_from_the_rule_files() {
    let expected = generated_prometheus_rule();
    let path = Path::new(ROOT).join(PROMETHEUS_RULE);
    if std::env::var_os("HANGWATCH_REGENERATE").is_some() {
        std::fs::write(&path, &expected).expect("write PrometheusRule");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == expected,
        "{PROMETHEUS_RULE} has drifted from rules/; regenerate: HANGWATCH_REGENERATE=1 cargo test --test deploy"
    );
    let parsed: Value = serde_saphyr::from_str(&committed).expect("PrometheusRule YAML");
    let rules: Value =
        serde_saphyr::from_str(&read("rules/hangwatch.rules.yml")).expect("rules YAML");
    assert_eq!(parsed["spec"]["groups"], rules["groups"]);
}

#[test]
fn daemonset_config_is_the_default_with_host_paths() {
    let config = Config::load(Some(&Path::new(ROOT).join("deploy/base/hangwatch.yaml")))
        .expect("valid config");
    let mut expected = Config::default();
    expected.node_status.enabled = true;
    expected.docker.socket = "/host/run/docker.sock".into();
    expected.docker.exec_root = "/host/run/docker".into();
    expected.docker.pidfile = "/host/run/docker.pid".into();
    expected.containerd.socket = "/host/run/containerd/containerd.sock".into();
    expected.containerd.stack_dump_dir = "/host/tmp".into();
    expected.cri.sockets = vec![
        "/host/run/containerd/containerd.sock".into(),
        "/host/run/crio/crio.sock".into(),
        "/host/run/cri-dockerd.sock".into(),
    ];
    expected.proc_scan.cgroup_root = "/host/sys/fs/cgroup".into();
    expected.proc_scan.sys_root = "/host/sys".into();
    assert_eq!(config, expected);
}

/// Every directory under deploy/ holding a kustomization.
fn kustomizations() -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![Path::new(ROOT).join("deploy")];
    while let Some(dir) = stack.pop() {
        if dir.join("kustomization.yaml").exists() {
            found.push(
                dir.strip_prefix(ROOT)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
        for entry in std::fs::read_dir(&dir).expect("read deploy dir").flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

fn kustomize(dir: &str) -> String {
    let output = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(ROOT)
        .output()
        .expect("kubectl (tests/run.sh installs it)");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn kustomizations_build_and_validate_against_the_kubernetes_schemas() {
    let dirs = kustomizations();
    assert!(dirs.contains(&"deploy/base".to_string()), "{dirs:?}");
    let scratch = support::hangwatch::TempDir::new("deploy");
    for dir in dirs {
        let manifests = kustomize(&dir);
        let file = scratch
            .path()
            .join(format!("{}.yaml", dir.replace('/', "_")));
        std::fs::write(&file, &manifests).expect("write manifests");
        for version in ["1.29.0", "1.33.0"] {
            let output = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet", "-k", version])
                .arg(&file)
                .output()
                .expect("kubernetes-validate (pip; tests/run.sh installs it)");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                output.status.success(),
                "{dir} against Kubernetes {version}:\n{text}"
            );
            // Custom resources have no schema there; everything else must have one.
            for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(
                    line.contains("monitoring.coreos.com/v1"),
                    "{dir}: unexpected unvalidated kind: {line}"
                );
            }
        }
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_saphyr::from_str(d).expect("manifest YAML"))
        .collect()
}

#[test]
fn daemonset_is_unprivileged_least_capability_and_runs_everywhere() {
    let docs = documents(&kustomize("deploy/base"));
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(
        pod["tolerations"][0]["operator"], "Exists",
        "must run on every node"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        security["capabilities"]["add"],
        serde_json::json!(["SYS_PTRACE", "SYSLOG"])
    );
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for mount in container["volumeMounts"].as_array().expect("mounts") {
        let writable = mount["readOnly"] != true;
        assert!(
            !writable || mount["mountPath"] == "/var/lib/hangwatch",
            "only the state dir is writable: {mount}"
        );
    }
    let config = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("ConfigMap");
    let text = config["data"]["hangwatch.yaml"]
        .as_str()
        .expect("config in ConfigMap");
    assert_eq!(text, read("deploy/base/hangwatch.yaml"));
    let monitor = docs
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert!(docs.iter().any(|d| d["kind"] == "PrometheusRule"));
}

#[test]
fn cordoner_may_touch_nodes_only_and_runs_two_unprivileged_replicas() {
    let docs = documents(&kustomize("deploy/base"));
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "hangwatch-cordoner")
        .expect("ClusterRole");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "patch"]}]),
        "least privilege: nodes get/list/patch and nothing else"
    );
    let roles = docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
        .count();
    assert_eq!(
        roles, 2,
        "the cordoner's and the DaemonSet's node-status role, no other"
    );
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("cordoner Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "hangwatch-cordoner");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        container["image"], "hangwatch-cordoner:0.1.0",
        "the cordoner's own image"
    );
    let token_file = args
        .iter()
        .find_map(|a| a.strip_prefix("--token-file="))
        .expect("--token-file");
    let mount = &container["volumeMounts"][0];
    assert!(token_file.starts_with(mount["mountPath"].as_str().expect("mountPath")));
    assert_eq!(
        pod["volumes"][0]["secret"]["secretName"],
        "hangwatch-cordoner-token"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The flags the manifest passes are ones the binary accepts.
    let (code, _, stderr) = support::hangwatch::run_program(
        support::hangwatch::cordoner_binary(),
        &args.iter().copied().chain(["--help"]).collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn the_daemonset_may_patch_node_status_and_write_events_and_nothing_else() {
    let docs = documents(&kustomize("deploy/base"));
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "hangwatch-node-status")
        .expect("ClusterRole hangwatch-node-status");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["get", "patch"]},
            {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        ]),
        "least privilege: nodes/status get/patch, events create/patch"
    );
    let binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "hangwatch-node-status"
        })
        .expect("binding");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "hangwatch", "namespace": "hangwatch"}])
    );
    let account = docs
        .iter()
        .find(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "hangwatch")
        .expect("ServiceAccount");
    assert_eq!(
        account["automountServiceAccountToken"], false,
        "not by default"
    );
    let daemonset = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "hangwatch");
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "where needed: the DaemonSet"
    );
    let cordoner = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("cordoner");
    assert_ne!(
        cordoner["spec"]["template"]["spec"]["serviceAccountName"],
        "hangwatch"
    );
    let config = Config::load(Some(&Path::new(ROOT).join("deploy/base/hangwatch.yaml")))
        .expect("valid config");
    assert!(config.node_status.enabled, "on in deploy/");
    assert!(!Config::default().node_status.enabled, "off on a laptop");
}

#[test]
fn alertmanager_route_for_the_cordoner_is_valid() {
    let output = Command::new("amtool")
        .args(["check-config", "deploy/alertmanager/cordoner-route.yaml"])
        .current_dir(ROOT)
        .output()
        .expect("amtool (Debian package prometheus-alertmanager; tests/run.sh installs it)");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let route = read("deploy/alertmanager/cordoner-route.yaml");
    assert!(route.contains("send_resolved: true") && route.contains("type: Bearer"));
}

#[test]
fn network_policies_admit_only_the_monitoring_namespace_to_each_port() {
    let docs = documents(&kustomize("deploy/base"));
    let workload = |kind: &str| -> Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("{kind}"))["spec"]["template"]
            .clone()
    };
    for (component, kind, port) in [
        ("watchdog", "DaemonSet", "metrics"),
        ("cordoner", "Deployment", "webhook"),
    ] {
        let policy = docs
            .iter()
            .find(|d| {
                d["kind"] == "NetworkPolicy"
                    && d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                        == component
            })
            .unwrap_or_else(|| panic!("a NetworkPolicy for the {component}"));
        let selected = policy["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .expect("matchLabels");
        let labels = &workload(kind)["metadata"]["labels"];
        for (key, value) in selected {
            assert_eq!(&labels[key], value, "{component}: selects the pods");
        }
        assert_eq!(
            policy["spec"]["policyTypes"],
            serde_json::json!(["Ingress"])
        );
        let ingress = policy["spec"]["ingress"].as_array().expect("ingress rules");
        assert_eq!(ingress.len(), 1, "{component}: one rule");
        assert_eq!(
            ingress[0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "monitoring"
        );
        assert_eq!(
            ingress[0]["ports"],
            serde_json::json!([{"port": port, "protocol": "TCP"}])
        );
        let ports = workload(kind)["spec"]["containers"][0]["ports"].clone();
        assert!(
            ports
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == port)),
            "{component}: the container names its port {port}"
        );
    }
}
