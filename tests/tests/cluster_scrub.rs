//! Scrub on release, on the real cluster: vfplane installed by Helm, a pool
//! of one VF, so every tenant gets the same VF.
//!
//! - Tenant 1 runs the driver on the VF. While its pod lives the VF carries
//!   a handed-out mark and is not scrubbed, although the driver process
//!   exited (the pod-resources API still names the pod).
//! - After tenant 1 is deleted the agent scrubs the VF (function reset,
//!   the spec's settings written again and checked) and the mark goes;
//!   tenant 2 gets the same VF with the spec's MAC.
//! - With the VF's reset methods disabled on the node (`reset_method`
//!   emptied, so sysfs `reset` fails), the scrub after tenant 2 fails: the
//!   VF is quarantined (its status says why, the node's allocatable drops
//!   to 0) and tenant 3 stays Pending. Once the reset works again, the
//!   retried scrub releases the VF and tenant 3 runs on it.
//!
//! The times it prints: pod deleted to VF scrubbed, and quarantine to
//! release after the fault is cleared.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::cluster::{ClusterOptions, NODE_NAME};
use xtask::session::{NAMESPACE, Session};
use xtask::testbed::Testbed;

const POOL: &str = "solo";

fn policy() -> String {
    format!(
        r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: solo
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: 1
  deviceType: vfio-pci
  resourceName: {POOL}
"#
    )
}

/// A pod whose driver sends 200 frames on the pool's VF, then sleeps.
fn tenant(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", "pktgen --count 200 --size 60 && exec sleep 86400"]
      resources:
        limits:
          vfplane.io/{POOL}: 1
"#
    )
}

/// Waits for the pod's pktgen report and returns it.
fn report(session: &mut Session, pod: &str) -> Value {
    session
        .wait(&format!("{pod}'s pktgen report"), Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", pod])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })
        .expect("pktgen reports");
    let logs = session.cluster().kubectl_output(&["logs", pod]).unwrap();
    let line: Value = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON line from pktgen");
    assert!(line.get("error").is_none(), "{pod}: {line}");
    line
}

/// The VF's entry in the NodeState status.
fn vf_status(session: &Session, vf: &str) -> Value {
    let text = session
        .cluster()
        .kubectl_output(&["get", "nodestate", NODE_NAME, "-o", "json"])
        .unwrap();
    let state: Value = serde_json::from_str(&text).unwrap();
    state["status"]["pfs"][0]["vfs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["pciAddress"] == vf)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_released_vf_is_scrubbed_before_the_next_tenant_and_quarantined_when_its_reset_fails() {
    let testbed = Testbed::prepare().expect("testbed");
    let mut session = Session::start(&testbed, ClusterOptions::default()).expect("cluster");
    session.install_vfplane().expect("helm install");
    session.apply(&policy()).expect("policy");
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(300))
        .expect("the pool");

    // Tenant 1.
    session.apply(&tenant("tenant-1")).unwrap();
    let first = report(&mut session, "tenant-1");
    let vf = first["pci"].as_str().unwrap().to_owned();
    let spec_mac = vf_status(&session, &vf)["mac"].as_str().unwrap().to_owned();
    assert_eq!(
        first["mac"],
        spec_mac.as_str(),
        "tenant 1 runs with the spec's MAC"
    );
    assert!(
        session.vf_handed_out(&vf).unwrap(),
        "a VF handed out carries its mark"
    );
    // The driver has exited; the pod still holds the VF: no scrub.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        session.vf_handed_out(&vf).unwrap(),
        "not scrubbed while its pod lives"
    );

    // Released: scrubbed.
    session
        .kubectl(&["delete", "pod", "tenant-1", "--wait=true"])
        .unwrap();
    let scrubbed_after = session.wait_scrubbed(&vf, Duration::from_secs(120)).unwrap();
    eprintln!(
        "pod deleted -> VF {vf} scrubbed: {:.1} s",
        scrubbed_after.as_secs_f64()
    );
    let log = session
        .cluster()
        .kubectl_output(&["logs", "-n", NAMESPACE, "daemonset/vfplane-node", "-c", "agent"])
        .unwrap();
    assert!(
        log.lines().any(|l| l.contains("VF scrubbed") && l.contains(&vf)),
        "the agent logged the scrub of {vf}:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("function reset") && l.contains(&vf)),
        "the scrub reset the function:\n{log}"
    );

    // Tenant 2 gets the same VF, with the spec's MAC.
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(60))
        .unwrap();
    session.apply(&tenant("tenant-2")).unwrap();
    let second = report(&mut session, "tenant-2");
    assert_eq!(second["pci"], vf.as_str(), "the pool has one VF");
    assert_eq!(second["mac"], spec_mac.as_str(), "the spec's MAC after the scrub");
    assert_eq!(second["hw_tx_packets"], 200, "{second}");

    // Its reset disabled, the VF's next scrub fails: quarantined.
    let reset_method = format!("/sys/bus/pci/devices/{vf}/reset_method");
    session
        .cluster_mut()
        .node_exec(&format!("echo > {reset_method}"))
        .unwrap();
    session
        .kubectl(&["delete", "pod", "tenant-2", "--wait=true"])
        .unwrap();
    session
        .wait(
            "the VF quarantined in the status",
            Duration::from_secs(120),
            |c| {
                let text = c.kubectl_output(&["get", "nodestate", NODE_NAME, "-o", "json"])?;
                let state: Value = serde_json::from_str(&text)?;
                Ok(state["status"]["pfs"][0]["vfs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|v| {
                        v["pciAddress"] == vf.as_str()
                            && v["health"].as_str().is_some_and(|h| {
                                h.starts_with("Unhealthy: scrub failed")
                                    && h.contains("function reset failed")
                            })
                    }))
            },
        )
        .unwrap();
    let quarantined = Instant::now();
    session
        .wait_allocatable(POOL, 0, Duration::from_secs(60))
        .unwrap();
    session.apply(&tenant("tenant-3")).unwrap();
    std::thread::sleep(Duration::from_secs(10));
    let phase = session.jsonpath(&["get", "pod", "tenant-3", "-o=jsonpath={.status.phase}"]);
    assert_eq!(phase, "Pending", "a quarantined VF is given to nobody");
    assert!(
        session.vf_handed_out(&vf).unwrap(),
        "still marked while quarantined"
    );

    // The reset works again: the retried scrub releases the VF.
    session
        .cluster_mut()
        .node_exec(&format!("echo default > {reset_method}"))
        .unwrap();
    let third = report(&mut session, "tenant-3");
    assert_eq!(third["pci"], vf.as_str());
    assert_eq!(third["mac"], spec_mac.as_str());
    eprintln!(
        "quarantined -> released and handed to tenant 3: {:.1} s (retry every 30 s)",
        quarantined.elapsed().as_secs_f64()
    );
}
