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
use xtask::session::{NAMESPACE, Session, node_vf_statuses};
use xtask::testbed::Testbed;

const POOL: &str = "solo";

/// The pool's policy, with or without `containerProfile.lockedMemory`.
fn policy(locked_memory: bool) -> String {
    let profile = if locked_memory {
        "  containerProfile:\n    lockedMemory: 64Mi\n"
    } else {
        ""
    };
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
{profile}"#
    )
}

/// A pod whose driver sends 200 frames on the pool's VF, then sleeps; it
/// first prints its locked-memory limit.
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
      command: ["sh", "-c", "grep 'locked memory' /proc/self/limits; pktgen --count 200 --size 60 && exec sleep 86400"]
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
    node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .find(|v| v["pciAddress"] == vf)
        .unwrap_or(Value::Null)
}

#[test]
fn a_released_vf_is_scrubbed_before_the_next_tenant_and_quarantined_when_its_reset_fails() {
    let testbed = Testbed::prepare().expect("testbed");
    let mut session = Session::start(&testbed, ClusterOptions::default()).expect("cluster");
    session.install_vfplane().expect("helm install");
    session.apply(&policy(false)).expect("policy");
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(300))
        .expect("the pool");

    // Without the profile's locked memory, the driver cannot pin its DMA
    // memory under the runtime's 8 MiB default, and says so.
    session.apply(&tenant("tenant-0")).unwrap();
    session
        .wait("tenant-0's driver error", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "tenant-0"])
                .is_ok_and(|l| l.contains("\"error\"")))
        })
        .unwrap();
    let logs = session.cluster().kubectl_output(&["logs", "tenant-0"]).unwrap();
    assert!(
        logs.contains("the locked-memory limit is too low") && logs.contains("containerProfile.lockedMemory"),
        "the driver names the limit and the fix:\n{logs}"
    );
    let vf0 = session.jsonpath(&[
        "get",
        "nodestate",
        NODE_NAME,
        "-o=jsonpath={.status.pfs[0].vfs[0].pciAddress}",
    ]);
    session
        .kubectl(&["delete", "pod", "tenant-0", "--wait=true"])
        .unwrap();
    session.wait_scrubbed(&vf0, Duration::from_secs(120)).unwrap();

    // With it, the CDI spec names the hook for the pool's VF.
    session.apply(&policy(true)).expect("policy with lockedMemory");
    session
        .wait("the OCI hook in the CDI spec", Duration::from_secs(120), |c| {
            Ok(c.kubectl_output(&[
                "get",
                "nodestate",
                NODE_NAME,
                "-o=jsonpath={.spec.pfs[0].vfGroups[0].lockedMemoryBytes}",
            ])
            .is_ok_and(|v| v.trim() == "67108864"))
        })
        .unwrap();
    let cdi = |session: &mut Session| {
        session
            .cluster_mut()
            .node_exec("cat /proc/1/root/var/run/cdi/vfplane.io-vf.json")
            .unwrap_or_default()
    };
    let began = Instant::now();
    while !cdi(&mut session).contains("\"67108864\"") {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no hook in the CDI spec:\n{}",
            cdi(&mut session)
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Tenant 1.
    session.apply(&tenant("tenant-1")).unwrap();
    let first = report(&mut session, "tenant-1");
    let logs = session.cluster().kubectl_output(&["logs", "tenant-1"]).unwrap();
    let limit = logs
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap_or_default();
    assert_eq!(
        limit.split_whitespace().collect::<Vec<_>>(),
        ["Max", "locked", "memory", "67108864", "67108864", "bytes"],
        "the hook raised the container's limit before its first instruction"
    );
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
    // The owner's pod UID and container, from the hook's record and the
    // container's cgroup, in the VF's status.
    let uid = session.jsonpath(&["get", "pod", "tenant-1", "-o=jsonpath={.metadata.uid}"]);
    session
        .wait(
            "the owner's pod UID in the status",
            Duration::from_secs(60),
            |c| {
                Ok(node_vf_statuses(c)?
                    .iter()
                    .any(|v| v["pciAddress"] == vf.as_str() && v["ownerPodUid"] == uid.as_str()))
            },
        )
        .unwrap();
    let container = vf_status(&session, &vf)["container"].clone();
    assert_eq!(container["lockedMemory"], "67108864", "{container}");
    assert!(
        container["problems"].as_array().is_none_or(Vec::is_empty),
        "{container}"
    );
    let cgroup = container["cgroup"].as_str().unwrap().to_owned();
    let files = session
        .cluster_mut()
        .node_exec(&format!(
            "cd /proc/1/root/sys/fs/cgroup{cgroup} && cat memory.max cpu.max pids.max cpuset.cpus.effective"
        ))
        .unwrap();
    let files: Vec<&str> = files.lines().collect();
    assert_eq!(
        [
            container["memoryMax"].as_str(),
            container["cpuMax"].as_str(),
            container["pidsMax"].as_str(),
            container["cpus"].as_str()
        ],
        [
            files.first().copied(),
            files.get(1).copied(),
            files.get(2).copied(),
            files.get(3).copied()
        ],
        "the status holds what the container's cgroup says"
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
                Ok(node_vf_statuses(c)?.iter().any(|v| {
                    v["pciAddress"] == vf.as_str()
                        && v["health"].as_str().is_some_and(|h| {
                            h.starts_with("Unhealthy: scrub failed") && h.contains("function reset failed")
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
