//! The `vfplane-device-plugin` binary: flags, registration, and a graceful
//! stop on SIGTERM that removes its sockets.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_registers_and_removes_its_socket_on_sigterm() {
    let node = Node::new(&[(0, 2)]);
    node.write_config("pools:\n  - name: fast\n    selector: {drivers: [vfio-pci]}\n");
    let mut kubelet = node.standin().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfplane-device-plugin"))
        .arg("--pool-config")
        .arg(node.config_path())
        .arg("--kubelet-dir")
        .arg(node.kubelet_dir())
        .arg("--sysfs-root")
        .arg(node.fake.sysfs_root())
        .arg("--dev-root")
        .arg(node.fake.dev_root())
        .arg("--cdi-dir")
        .arg(node.cdi_dir())
        .arg("--state-dir")
        .arg(node.state_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let registration = kubelet.next_registration(WAIT).await;
    let socket = node.socket("fast");
    let served = socket.exists();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < WAIT, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let registration = registration.unwrap_or_else(|| panic!("no registration; log:\n{log}"));
    assert_eq!(registration.request.resource_name, "vfplane.io/fast");
    assert!(served, "{log}");
    assert!(exit.success(), "{exit:?}\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(!socket.exists(), "socket removed on SIGTERM\n{log}");
    assert!(
        node.cdi_dir().join("vfplane.io-vf.json").exists(),
        "the CDI spec stays for containers that restart"
    );
}

/// The plugin binary on `node`'s fake tree, without CDI.
fn plugin_on(node: &Node) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vfplane-device-plugin"));
    command
        .arg("--pool-config")
        .arg(node.config_path())
        .arg("--kubelet-dir")
        .arg(node.kubelet_dir())
        .arg("--sysfs-root")
        .arg(node.fake.sysfs_root())
        .arg("--dev-root")
        .arg(node.fake.dev_root())
        .arg("--no-cdi")
        .arg("--state-dir")
        .arg(node.state_dir());
    command
}

/// The plugin's stderr when it starts on `config`.
fn start_with(config: &str) -> (bool, String) {
    let node = Node::new(&[(0, 1)]);
    node.write_config(config);
    let output = plugin_on(&node)
        .output()
        .unwrap_or_else(|e| panic!("running the plugin: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_exits_non_zero_naming_the_line() {
    let (ok, log) =
        start_with("pools:\n  - name: fast\n    devices: [\"0000:00:12.0\"]\n    preferedAllocation: pack\n");
    assert!(!ok);
    assert!(log.contains("line 4"), "{log}");
    assert!(log.contains("preferedAllocation"), "{log}");
    // Each cause once: the file's error does not repeat what it wraps.
    let (ok, log) = start_with(
        "pools:\n  - name: fast\n    devices: [\"0000:00:12.0\"]\n  - name: fast\n    devices: [\"0000:00:12.0\"]\n",
    );
    assert!(!ok);
    assert_eq!(
        log.matches("a pool of this name is already defined").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("pool config line 4").count(), 1, "{log}");
}

/// A config that yields no pools is served (nothing to offer yet) but said
/// in the log, naming the file: at start and again when a reload empties it.
#[test]
fn a_config_without_pools_is_said_in_the_log_naming_the_file() {
    use std::io::{BufRead, BufReader};
    let node = Node::new(&[(0, 1)]);
    node.write_config("");
    let mut child = plugin_on(&node)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let path = node.config_path().display().to_string();
    let mut log = String::new();
    let mut wait_for = |what: &str| {
        let deadline = Instant::now() + WAIT;
        while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            log.push_str(&line);
            log.push('\n');
            if line.contains(what) && line.contains(&path) {
                return true;
            }
        }
        false
    };
    let empty = "the pool config defines no pools";
    let at_start = wait_for(empty);
    node.write_config("pools:\n  - name: fast\n    selector: {drivers: [vfio-pci]}\n");
    let applied = wait_for("pool config changed; applying");
    node.write_config("# every pool removed\npools: []\n");
    let at_reload = wait_for(empty);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    assert!(at_start, "no warning at start naming {path}:\n{log}");
    assert!(applied, "the good config was not applied:\n{log}");
    assert!(at_reload, "no warning when a reload empties it:\n{log}");
}
