//! Stall response against real private daemons: SIGUSR1 goroutine dumps of the stalled
//! daemon and the layer below, collection (also when the daemon writes only after SIGCONT),
//! cooldown, never signalling a process that is not the daemon, incidents that survive
//! restarts.

mod support;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::daemons::PrivateDaemons;
use support::hangwatch::{Hangwatch, TempDir};
use support::wait_for;

/// `support::hangwatch::FAST_PROBES` with dumps waited for briefly (a literal: it is
/// spliced into `format!` strings).
const FAST: &str = "probes:\n  interval: 500ms\n  slow_threshold: 1s\n  stall_threshold: 2s\n  deadline: 6s\n\
dumps:\n  wait: 2s\n  background_wait: 60s\n";

fn dump_entries<'a>(incident: &'a Value, daemon: &str) -> Vec<&'a Value> {
    incident["dumps"]
        .as_array()
        .map(|d| d.iter().filter(|e| e["daemon"] == daemon).collect())
        .unwrap_or_default()
}

fn dump_status(incident: &Value, daemon: &str) -> Option<String> {
    dump_entries(incident, daemon)
        .last()
        .and_then(|e| e["status"].as_str())
        .map(str::to_string)
}

fn dumps_counted(hw: &Hangwatch, daemon: &str, result: &str) -> f64 {
    hw.metric(
        "hangwatch_goroutine_dumps_total",
        &[("daemon", daemon), ("result", result)],
    )
    .unwrap_or(0.0)
}

fn healthy(hw: &Hangwatch, runtime: &str) -> bool {
    hw.runtime_is(runtime, "healthy")
}

fn copied_dumps(state_dir: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(state_dir.join("dumps"))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn stopped_dockerd_gets_dumped_with_containerd_and_the_incident_closes_with_both() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("dump-docker");
    let hw = Hangwatch::start(&daemons.hangwatch_config(dir.path(), FAST), dir.path());
    wait_for("healthy start", Duration::from_secs(20), || {
        (healthy(&hw, "docker") && healthy(&hw, "containerd")).then_some(())
    });

    daemons.signal_dockerd(libc::SIGSTOP);
    let (incident, _) = wait_for(
        "an open docker incident with dumps requested",
        Duration::from_secs(10),
        || {
            hw.list("/incidents").into_iter().find(|i| {
                i["runtime"] == "docker"
                    && i["ended_at"].is_null()
                    && !dump_entries(i, "containerd").is_empty()
            })
        },
    );
    let id = incident["id"].as_str().expect("id").to_string();
    assert_eq!(
        hw.metric("hangwatch_incident_open", &[("runtime", "docker")]),
        Some(1.0)
    );
    // containerd runs: its dump arrives while dockerd is still stopped.
    wait_for("containerd dump collected", Duration::from_secs(15), || {
        (dumps_counted(&hw, "containerd", "ok") >= 1.0).then_some(())
    });
    // dockerd is stopped: it cannot write yet, the dump is pending.
    wait_for("dockerd dump pending", Duration::from_secs(10), || {
        hw.list("/incidents")
            .into_iter()
            .find(|i| i["id"] == id.as_str())
            .and_then(|i| (dump_status(&i, "dockerd").as_deref() == Some("pending")).then_some(()))
    });
    assert_eq!(dumps_counted(&hw, "dockerd", "ok"), 0.0);

    daemons.signal_dockerd(libc::SIGCONT);
    let (closed, _) = wait_for(
        "incident closed with both dumps",
        Duration::from_secs(30),
        || {
            hw.list("/incidents").into_iter().find(|i| {
                i["id"] == id.as_str()
                    && !i["ended_at"].is_null()
                    && dump_status(i, "dockerd").as_deref() == Some("ok")
                    && dump_status(i, "containerd").as_deref() == Some("ok")
            })
        },
    );
    assert_eq!(
        hw.metric("hangwatch_incident_open", &[("runtime", "docker")]),
        Some(0.0)
    );
    assert_eq!(dumps_counted(&hw, "dockerd", "ok"), 1.0);
    assert!(
        hw.metric(
            "hangwatch_last_goroutine_dump_timestamp_seconds",
            &[("daemon", "dockerd")]
        )
        .unwrap_or(0.0)
            > 1.7e9
    );
    for daemon in ["dockerd", "containerd"] {
        let record = &dump_entries(&closed, daemon)[0]["record"];
        let copy = Path::new(record["path"].as_str().expect("copy path"));
        let text = std::fs::read_to_string(copy).expect("copied dump readable");
        assert!(
            text.contains("goroutine "),
            "{daemon} copy is not a goroutine dump"
        );
        assert!(
            copy.starts_with(dir.path().join("dumps")),
            "copy outside the dump dir: {copy:?}"
        );
        assert_eq!(
            record["pid"].as_i64(),
            Some(match daemon {
                "dockerd" => daemons.dockerd_pid(),
                _ => daemons.containerd_pid(),
            } as i64)
        );
    }
    assert!(
        closed["suspected_cause"]
            .as_str()
            .is_some_and(|c| c.contains("dockerd blocked")),
        "{closed}"
    );
    let persisted = std::fs::read_dir(dir.path().join("incidents"))
        .expect("incident dir")
        .count();
    assert!(persisted >= 1, "incident not persisted");
}

#[test]
fn stopped_containerd_is_dumped_after_sigcont_and_dockerd_is_not_signalled() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("dump-ctd");
    let hw = Hangwatch::start(&daemons.hangwatch_config(dir.path(), FAST), dir.path());
    wait_for("healthy start", Duration::from_secs(20), || {
        (healthy(&hw, "docker") && healthy(&hw, "containerd")).then_some(())
    });
    daemons.signal_containerd(libc::SIGSTOP);
    wait_for("containerd dump pending", Duration::from_secs(15), || {
        hw.list("/incidents").into_iter().find(|i| {
            i["runtime"] == "containerd"
                && dump_status(i, "containerd").as_deref() == Some("pending")
        })
    });
    daemons.signal_containerd(libc::SIGCONT);
    let (incident, _) = wait_for("containerd dump collected", Duration::from_secs(30), || {
        hw.list("/incidents").into_iter().find(|i| {
            i["runtime"] == "containerd" && dump_status(i, "containerd").as_deref() == Some("ok")
        })
    });
    assert!(
        dump_entries(&incident, "dockerd").is_empty(),
        "dockerd was asked for a dump: {incident}"
    );
    assert_eq!(
        dumps_counted(&hw, "dockerd", "ok") + dumps_counted(&hw, "dockerd", "failed"),
        0.0
    );
    let docker_dumps = std::fs::read_dir(&daemons.docker_exec_root)
        .expect("exec root")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("goroutine-stacks-")
        })
        .count();
    assert_eq!(docker_dumps, 0, "dockerd wrote a dump: it was signalled");
    assert_eq!(copied_dumps(dir.path(), "containerd-").len(), 1);
    assert_eq!(
        hw.list("/incidents")
            .iter()
            .filter(|i| i["runtime"] == "docker")
            .count(),
        0,
        "docker blamed"
    );
}

#[test]
fn second_stall_within_cooldown_sends_no_signal() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("cooldown");
    let config = format!("{FAST}  cooldown: 10m\n");
    let hw = Hangwatch::start(&daemons.hangwatch_config(dir.path(), &config), dir.path());
    for round in 0..2 {
        wait_for("healthy", Duration::from_secs(30), || {
            (healthy(&hw, "docker") && healthy(&hw, "containerd")).then_some(())
        });
        daemons.signal_containerd(libc::SIGSTOP);
        wait_for("containerd incident", Duration::from_secs(15), || {
            hw.list("/incidents")
                .into_iter()
                .filter(|i| i["runtime"] == "containerd" && i["ended_at"].is_null())
                .find(|i| !dump_entries(i, "containerd").is_empty())
        });
        daemons.signal_containerd(libc::SIGCONT);
        if round == 0 {
            wait_for("first dump", Duration::from_secs(30), || {
                (dumps_counted(&hw, "containerd", "ok") == 1.0).then_some(())
            });
        }
    }
    wait_for("both incidents closed", Duration::from_secs(30), || {
        let all = hw.list("/incidents");
        (all.len() == 2 && all.iter().all(|i| !i["ended_at"].is_null())).then_some(())
    });
    assert_eq!(dumps_counted(&hw, "containerd", "cooldown"), 1.0);
    assert_eq!(
        dumps_counted(&hw, "containerd", "ok"),
        1.0,
        "second stall signalled containerd"
    );
    let newest = &hw.list("/incidents")[0];
    assert_eq!(
        dump_status(newest, "containerd").as_deref(),
        Some("skipped"),
        "{newest}"
    );
    assert_eq!(copied_dumps(dir.path(), "containerd-").len(), 1);
}

#[test]
fn a_pidfile_naming_another_process_is_never_signalled() {
    let dir = TempDir::new("impostor");
    // A socket nobody answers on (so docker stalls), owned by this test process, not dockerd.
    let socket = dir.path().join("docker.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let mut sleeper = Command::new("sleep").arg("300").spawn().expect("sleep");
    let pidfile = dir.path().join("docker.pid");
    std::fs::write(&pidfile, sleeper.id().to_string()).expect("pidfile");
    let config = format!(
        "state_dir: {state}\n{FAST}docker:\n  mode: required\n  socket: {sock}\n  exec_root: {state}\n  pidfile: {pid}\ncontainerd:\n  mode: disabled\ncri:\n  mode: disabled\n",
        state = dir.path().display(),
        sock = socket.display(),
        pid = pidfile.display(),
    );
    let hw = Hangwatch::start(&config, dir.path());
    wait_for("the dump attempt to fail", Duration::from_secs(15), || {
        (dumps_counted(&hw, "dockerd", "failed") >= 1.0).then_some(())
    });
    // SIGUSR1's default action would have killed sleep.
    assert!(
        sleeper.try_wait().expect("try_wait").is_none(),
        "sleep was signalled"
    );
    // The incident's listing follows at the next evaluation (updates are coalesced).
    let (detail, _) = wait_for(
        "the refusal in the incident",
        Duration::from_secs(5),
        || {
            let incident = hw.list("/incidents").into_iter().next()?;
            let detail = dump_entries(&incident, "dockerd")
                .first()?
                .get("detail")?
                .as_str()?
                .to_string();
            Some(detail)
        },
    );
    assert!(
        detail.contains("not dockerd") && detail.contains("refusing"),
        "{detail}\n{}",
        hw.logs()
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    drop(listener);
}

#[test]
fn incidents_on_disk_are_served_again_after_a_restart() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("restart");
    let config = daemons.hangwatch_config(dir.path(), FAST);
    let hw = Hangwatch::start(&config, dir.path());
    wait_for("healthy", Duration::from_secs(20), || {
        healthy(&hw, "containerd").then_some(())
    });
    daemons.signal_containerd(libc::SIGSTOP);
    let (incident, _) = wait_for("incident", Duration::from_secs(15), || {
        hw.list("/incidents").into_iter().next()
    });
    daemons.signal_containerd(libc::SIGCONT);
    wait_for(
        "incident closed and persisted",
        Duration::from_secs(30),
        || {
            let closed = hw
                .list("/incidents")
                .into_iter()
                .any(|i| !i["ended_at"].is_null());
            let file = std::fs::read_dir(dir.path().join("incidents"))
                .ok()?
                .flatten()
                .next()?;
            let on_disk: Value = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
            (closed && !on_disk["ended_at"].is_null()).then_some(())
        },
    );
    let (_, status) = hw.terminate();
    assert!(status.success());

    let again = Hangwatch::start(&config, dir.path());
    let served = again.list("/incidents");
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0]["id"], incident["id"]);
    assert!(!served[0]["ended_at"].is_null());
    let (code, one) = again.get(&format!(
        "/incidents/{}",
        incident["id"].as_str().expect("id")
    ));
    assert_eq!(code, 200, "{one}");
    let (code, _) = again.get("/incidents/no-such-incident");
    assert_eq!(code, 404);
}

/// hangwatch may see a daemon's socket under another path than the one the daemon bound (a
/// host directory mounted elsewhere in the DaemonSet). containerd has no pidfile: only its
/// socket, matched by device and inode, can name it.
#[test]
fn daemon_found_through_another_path_to_its_socket() {
    let daemons = PrivateDaemons::start();
    let dir = TempDir::new("socket-alias");
    let alias = dir.path().join("elsewhere.sock");
    std::os::unix::fs::symlink(&daemons.containerd_socket, &alias).expect("symlink");
    let config = format!(
        "state_dir: {state}\n{FAST}docker:\n  mode: disabled\ncontainerd:\n  mode: required\n  socket: {alias}\n  stack_dump_dir: {tmp}\n  pidfile: \"\"\ncri:\n  mode: disabled\nkernel_log:\n  enabled: false\n",
        state = dir.path().display(),
        alias = alias.display(),
        tmp = daemons.containerd_tmp.display(),
    );
    let hw = Hangwatch::start(&config, dir.path());
    wait_for("healthy", Duration::from_secs(20), || {
        healthy(&hw, "containerd").then_some(())
    });
    daemons.signal_containerd(libc::SIGSTOP);
    wait_for("containerd signalled", Duration::from_secs(15), || {
        hw.list("/incidents")
            .into_iter()
            .find(|i| dump_status(i, "containerd").as_deref() == Some("pending"))
    });
    daemons.signal_containerd(libc::SIGCONT);
    wait_for("containerd dump collected", Duration::from_secs(30), || {
        (dumps_counted(&hw, "containerd", "ok") == 1.0).then_some(())
    });
}
