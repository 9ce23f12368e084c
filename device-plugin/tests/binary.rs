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

/// The plugin's stderr when it starts on `config`.
fn start_with(config: &str) -> (bool, String) {
    let node = Node::new(&[(0, 1)]);
    node.write_config(config);
    let output = Command::new(env!("CARGO_BIN_EXE_vfplane-device-plugin"))
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
        .arg(node.state_dir())
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
