//! A `numaAligned` pool on the real cluster with two NUMA nodes: the
//! testbed's `TwoNumaNodes` guest (one CPU each) as the node, the PF
//! 0000:21:00.0 behind a PCIe expander bridge on node 1. A Guaranteed pod
//! given a VF of that PF runs on node 1's CPU and memory, the pod sees it
//! in `/proc/self/status`, and the agent reads it back into the VF's status
//! with no problem. On the minimal node (no CPU manager) vfplane's NRI
//! plugin put the VF's NUMA cpuset into the container's spec; on the
//! systemd node the kubelet's static CPU manager, Topology Manager and
//! memory manager placed it from the plugin's TopologyInfo (CPU 0 is
//! reserved, CPU 1 on node 1 is the exclusive one), and vfplane left the
//! kubelet's cpuset alone; its `memory.max`, `cpu.max` and `pids.max` are what the
//! profile says. When the policy then asks for more memory than the
//! running container has, the agent says so in the VF's status, in a
//! Kubernetes Event on the pod and in its metrics.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

use std::time::Duration;

use serde_json::Value;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::cluster::{ClusterOptions, NodeProfile};
use xtask::session::{Session, events, node_vf_statuses};
use xtask::testbed::{GuestOptions, Testbed, Topology};

/// The policy, its profile's memory `memory`.
fn policy(memory: &str) -> String {
    format!(
        r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: near
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:21:00.0"]
  numVfs: 1
  deviceType: vfio-pci
  resourceName: near
  containerProfile:
    cpu: "1"
    memory: {memory}
    numaAligned: true
    lockedMemory: 64Mi
    pids: 128
"#
    )
}

fn pod() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: near
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", "grep -E 'Cpus_allowed_list|Mems_allowed_list' /proc/self/status; pktgen --count 100 --size 60 && exec sleep 86400"]
      resources:
        requests:
          vfplane.io/near: 1
          cpu: "1"
          memory: 128Mi
        limits:
          vfplane.io/near: 1
          cpu: "1"
          memory: 128Mi
"#
    )
}

#[test]
fn on_the_systemd_node_a_numa_aligned_pools_guaranteed_container_runs_on_its_vfs_numa_node() {
    if !xtask::e2e::enabled(
        "on_the_systemd_node_a_numa_aligned_pools_guaranteed_container_runs_on_its_vfs_numa_node",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    numa_aligned(NodeProfile::Systemd);
}

#[test]
fn on_the_minimal_node_a_numa_aligned_pools_container_runs_on_its_vfs_numa_node() {
    if !xtask::e2e::enabled(
        "on_the_minimal_node_a_numa_aligned_pools_container_runs_on_its_vfs_numa_node",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    numa_aligned(NodeProfile::Minimal);
}

/// One cluster at a time: its guest alone takes most of the machine's two
/// cores (the two tests of this file would otherwise run at once).
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn numa_aligned(node_profile: NodeProfile) {
    let _cluster = ONE_CLUSTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let testbed = Testbed::prepare().expect("testbed");
    let options = ClusterOptions {
        node_profile,
        guest: GuestOptions {
            topology: Topology::TwoNumaNodes,
            // The systemd node reserves CPU 0 for the system and vfplane's
            // own pods take a share of the rest: node 1 needs CPUs of its
            // own to hand out whole.
            cpus: if node_profile == NodeProfile::Systemd {
                4
            } else {
                2
            },
            ..GuestOptions::default()
        },
        node_extra: None,
    };
    let mut session = Session::start(&testbed, options).expect("cluster");
    let cpus = session
        .cluster_mut()
        .node_exec("cat /sys/devices/system/node/node1/cpulist")
        .unwrap();
    let node1_cpus = cpus.trim().to_owned();
    let expected = if node_profile == NodeProfile::Systemd {
        "2-3"
    } else {
        "1"
    };
    assert_eq!(node1_cpus, expected, "the node's NUMA node 1 CPUs");
    session.install_vfplane().expect("helm install");
    session.apply(&policy("128Mi")).expect("policy");
    session
        .wait_allocatable("near", 1, Duration::from_secs(300))
        .expect("the pool");
    session.apply(&pod()).unwrap();
    session
        .wait("the pod's pktgen report", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "near"])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })
        .unwrap();
    let logs = session.kubectl(&["logs", "near"]).unwrap();
    let field = |name: &str| {
        logs.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_owned()
    };
    let allowed = field("Cpus_allowed_list:");
    match node_profile {
        NodeProfile::Minimal => assert_eq!(allowed, node1_cpus, "vfplane's NUMA cpuset: node 1's CPUs"),
        NodeProfile::Systemd => assert!(
            ["2", "3"].contains(&allowed.as_str()),
            "one exclusive CPU of node 1, the static CPU manager's, aligned by the Topology Manager: {allowed}"
        ),
    }
    assert_eq!(
        field("Mems_allowed_list:"),
        "1",
        "the container's memory on NUMA node 1"
    );
    let report: Value = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap();
    assert!(report.get("error").is_none(), "{report}");
    assert!(
        report["pci"].as_str().is_some_and(|p| p.starts_with("0000:21:")),
        "a VF of the node-1 PF: {report}"
    );
    session
        .wait(
            "the container's cpuset in the VF's status",
            Duration::from_secs(60),
            |c| {
                Ok(node_vf_statuses(c)?.iter().any(|vf| {
                    vf["container"]["cpus"] == allowed.as_str()
                        && vf["container"]["mems"] == "1"
                        && vf["container"]["problems"].as_array().is_none_or(Vec::is_empty)
                }))
            },
        )
        .unwrap_or_else(|e| {
            let statuses = node_vf_statuses(session.cluster()).unwrap_or_default();
            panic!("{e:#}\n--- the VFs' statuses ---\n{statuses:#?}")
        });
    // What the runtime and the hook gave the container, in its cgroup and
    // in the status: the profile's memory, one CPU, 128 tasks.
    let vf = node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .find(|v| v["container"].is_object())
        .unwrap();
    let container = &vf["container"];
    // The kubelet drops the CFS quota of a container on exclusive CPUs:
    // its CPU is its own.
    let cpu_max = match node_profile {
        NodeProfile::Systemd => "max 100000",
        NodeProfile::Minimal => "100000 100000",
    };
    assert_eq!(
        [
            &container["memoryMax"],
            &container["cpuMax"],
            &container["pidsMax"]
        ],
        [
            &Value::from("134217728"),
            &Value::from(cpu_max),
            &Value::from("128")
        ],
        "{container}"
    );
    let cgroup = container["cgroup"].as_str().unwrap().to_owned();
    let files = session
        .cluster_mut()
        .node_exec(&format!(
            "cd /proc/1/root/sys/fs/cgroup{cgroup} && cat memory.max cpu.max pids.max"
        ))
        .unwrap();
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        ["134217728", cpu_max, "128"],
        "read in the node's cgroup fs"
    );

    // The policy now wants 256 MiB; the running container has 128 MiB.
    session.apply(&policy("256Mi")).expect("policy with more memory");
    let problem =
        "memory.max is 134217728, the pool's profile wants a memory limit of at least 268435456 bytes";
    session
        .wait(
            "the limit problem in the VF's status",
            Duration::from_secs(120),
            |c| {
                Ok(node_vf_statuses(c)?.iter().any(|v| {
                    v["container"]["problems"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p == problem))
                }))
            },
        )
        .unwrap();
    session
        .wait("the Event on the pod", Duration::from_secs(60), |c| {
            Ok(events(c, "default", "VfContainerLimits")?.iter().any(|e| {
                e["involvedObject"]["kind"] == "Pod"
                    && e["involvedObject"]["name"] == "near"
                    && e["type"] == "Warning"
                    && e["message"].as_str().is_some_and(|m| m.contains(problem))
            }))
        })
        .unwrap();
    let metrics = session.agent_metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vfplane_agent_vf_container_problems{")
                && l.contains(r#"pod="near""#)
                && l.ends_with(" 1")),
        "one problem in the metrics:\n{metrics}"
    );
}
