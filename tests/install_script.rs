//! `scripts/install-deps.sh` stops nothing it did not start: a `containerd` already running
//! on the machine (here a copy of `sleep` under that name, which is what a `pkill -x
//! containerd` matches) is still running after the script took its install path.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::hangwatch::TempDir;
use support::wait_for;

/// Which script to run: the repository's, unless `HANGWATCH_INSTALL_SCRIPT` names another
/// (used to show that the earlier script, which killed by name, fails this test).
fn script() -> String {
    std::env::var("HANGWATCH_INSTALL_SCRIPT").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts/install-deps.sh")
            .to_string_lossy()
            .into_owned()
    })
}

const POLICY: &str = "/usr/sbin/policy-rc.d";

#[test]
fn a_containerd_the_script_did_not_start_survives_the_install() {
    let dir = TempDir::new("install-script");
    let fake = dir.path().join("containerd");
    std::fs::copy("/bin/sleep", &fake).expect("copy sleep");
    let mut bystander = Command::new(&fake)
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the bystander containerd");
    let comm_path = format!("/proc/{}/comm", bystander.id());
    // Its comm is the test's until the spawned child has exec'd.
    wait_for(
        "the bystander to run as containerd",
        Duration::from_secs(10),
        || {
            let comm = std::fs::read_to_string(&comm_path).ok()?;
            (comm.trim() == "containerd").then_some(())
        },
    );

    let policy_existed = Path::new(POLICY).exists();
    // A reinstall of a small package forces the install path on a machine that has all.
    let output = Command::new("timeout")
        .args(["600", "bash"])
        .arg(script())
        .arg("--test")
        .env("HANGWATCH_REINSTALL", "psmisc")
        .output()
        .expect("run install-deps.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "install-deps.sh failed: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("installing: ") && stdout.contains("psmisc"),
        "the install path was taken: {stdout}"
    );
    // No wait needed: the script has exited, so whatever it killed is dead already.
    let exited = bystander.try_wait().expect("try_wait");
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert_eq!(
        exited, None,
        "the script stopped a containerd it did not start"
    );
    if !policy_existed {
        assert!(
            !Path::new(POLICY).exists(),
            "the script removes the policy-rc.d it made"
        );
    }
}
