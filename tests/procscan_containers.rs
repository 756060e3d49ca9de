//! The /proc scanner through the daemon against real containers of a private dockerd:
//! D-state tasks attributed to the container's id and name with their wchan, a helper thread
//! in D, a paused container reported frozen and never stuck, a host task in D, and
//! per-container series that go away when the container's tasks do.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::KilledOnDrop;
use support::daemons::PrivateDaemons;
use support::hangwatch::{Hangwatch, TempDir, metric_value};
use support::{helper_binary, wait_for};

const SCAN: &str = "probes:\n  interval: 500ms\nproc_scan:\n  interval: 500ms\n  stuck_after: 2s\n";

fn stuck_tasks(hw: &Hangwatch) -> Vec<Value> {
    hw.status_json()["proc_scan"]["stuck_tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn container_dstate(hw: &Hangwatch, id: &str) -> Option<(f64, String)> {
    let text = hw.metrics();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("hangwatch_container_dstate_tasks{")
                && l.contains(&format!("container_id=\"{id}\""))
        })?
        .to_string();
    metric_value(
        &text,
        "hangwatch_container_dstate_tasks",
        &[("container_id", id)],
    )
    .map(|v| (v, line))
}

fn scans(hw: &Hangwatch) -> f64 {
    hw.metric("hangwatch_proc_scan_duration_seconds_count", &[])
        .unwrap_or(0.0)
}

fn start(daemons: &PrivateDaemons, dir: &TempDir) -> Hangwatch {
    daemons.import_image("hwtest:procscan", &[&helper_binary("procscan_block")]);
    Hangwatch::start(&daemons.hangwatch_config(dir.path(), SCAN), dir.path())
}

fn run_container(daemons: &PrivateDaemons, name: &str, args: &[&str]) -> String {
    let mut command = vec![
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        "hwtest:procscan",
    ];
    command.extend(args);
    daemons.docker_ok(&command)
}

#[test]
fn container_tasks_in_d_are_stuck_named_and_cleared() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("procscan-containers");
    let hw = start(&daemons, &dir);

    let vfork = run_container(&daemons, "dstate-vfork", &["/bin/procscan_block", "vfork"]);
    let thread = run_container(
        &daemons,
        "dstate-thread",
        &["/bin/procscan_block", "vfork-thread"],
    );

    for (id, name) in [(&vfork, "dstate-vfork"), (&thread, "dstate-thread")] {
        let ((count, series), _) = wait_for(
            &format!("{name} stuck in D"),
            Duration::from_secs(30),
            || {
                container_dstate(&hw, id)
                    .filter(|(_, line)| line.contains(&format!("container_name=\"{name}\"")))
            },
        );
        assert!(count >= 1.0, "{series}");
        let max = hw
            .metric(
                "hangwatch_container_dstate_max_seconds",
                &[("container_id", id)],
            )
            .expect("max seconds series");
        assert!(max >= 2.0, "stuck before stuck_after: {max}");
    }
    assert!(
        hw.metric("hangwatch_dstate_tasks", &[("scope", "container")])
            .unwrap_or(0.0)
            >= 2.0
    );

    let tasks = stuck_tasks(&hw);
    let of = |id: &str| -> Vec<&Value> {
        tasks
            .iter()
            .filter(|t| t["owner"]["container_id"] == id)
            .collect()
    };
    let vfork_task = of(&vfork)[0];
    assert_eq!(vfork_task["scope"], "container");
    assert_eq!(vfork_task["comm"], "procscan_block");
    assert!(
        vfork_task["wchan"].as_str().is_some_and(|w| !w.is_empty()),
        "{vfork_task}"
    );
    let thread_task = of(&thread)[0];
    assert_ne!(
        thread_task["pid"], thread_task["tid"],
        "the helper thread, not the main thread: {thread_task}"
    );
    assert_eq!(
        hw.status_json()["proc_scan"]["containers"][&vfork]["name"],
        "dstate-vfork",
        "names come with the scan in /status"
    );

    daemons.docker_ok(&["rm", "-f", "dstate-vfork", "dstate-thread"]);
    wait_for(
        "the per-container series to go",
        Duration::from_secs(30),
        || {
            (container_dstate(&hw, &vfork).is_none() && container_dstate(&hw, &thread).is_none())
                .then_some(())
        },
    );
}

#[test]
fn paused_container_is_frozen_never_stuck_and_unpause_clears_it() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("procscan-paused");
    let hw = start(&daemons, &dir);
    let id = run_container(&daemons, "paused", &["sleep", "1000"]);
    daemons.docker_ok(&["pause", "paused"]);
    wait_for(
        "the paused container's tasks frozen",
        Duration::from_secs(30),
        || (hw.metric("hangwatch_frozen_tasks", &[]).unwrap_or(0.0) >= 1.0).then_some(()),
    );
    // Past stuck_after (2 s) by several scans (every 0.5 s): still frozen, never stuck.
    let seen = scans(&hw);
    wait_for("eight more scans", Duration::from_secs(30), || {
        (scans(&hw) >= seen + 8.0).then_some(())
    });
    assert!(
        container_dstate(&hw, &id).is_none(),
        "a paused container reported stuck"
    );
    assert!(
        !stuck_tasks(&hw)
            .iter()
            .any(|t| t["owner"]["container_id"] == id.as_str())
    );
    let frozen = &hw.status_json()["proc_scan"]["frozen"]["by_container"];
    assert!(
        frozen
            .as_array()
            .is_some_and(|f| f.iter().any(|c| c["owner"]["container_id"] == id.as_str())),
        "{frozen}"
    );
    daemons.docker_ok(&["unpause", "paused"]);
    wait_for("frozen tasks back to 0", Duration::from_secs(30), || {
        (hw.metric("hangwatch_frozen_tasks", &[]) == Some(0.0)).then_some(())
    });
}

#[test]
fn host_task_in_d_has_scope_host() {
    let dir = TempDir::new("procscan-host");
    let config = format!(
        "state_dir: {}\ndocker:\n  mode: disabled\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\nkernel_log:\n  enabled: false\n{SCAN}",
        dir.path().display()
    );
    let hw = Hangwatch::start(&config, dir.path());
    let helper = KilledOnDrop(
        Command::new(helper_binary("procscan_block"))
            .arg("vfork")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the vfork helper"),
    );
    let pid = i64::from(helper.0.id());
    let (task, _) = wait_for("the host task stuck", Duration::from_secs(30), || {
        stuck_tasks(&hw).into_iter().find(|t| t["pid"] == pid)
    });
    assert_eq!(task["scope"], "host");
    assert!(task["owner"]["container_id"].is_null());
    assert!(
        hw.metric("hangwatch_dstate_tasks", &[("scope", "host")])
            .unwrap_or(0.0)
            >= 1.0
    );
}
