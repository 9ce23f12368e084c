//! The NUMA scenario: a `numaAligned` pool on the real cluster with two NUMA nodes: the
//! testbed's `TwoNumaNodes` guest as the node, the PF 0000:21:00.0 behind a
//! PCIe expander bridge on node 1. A Guaranteed pod given a VF of that PF
//! runs on node 1's CPUs and memory, the pod sees it in `/proc/self/status`,
//! and the agent reads it back into the VF's status with no problem.
//!
//! On the minimal node (no CPU manager; one CPU per NUMA node) vfplane's
//! NRI plugin put the VF's NUMA cpuset into the container's spec.
//!
//! On the systemd node (five vCPUs: node 0 has CPUs 0-2, CPU 0 reserved;
//! node 1 has CPUs 3-4) the kubelet's static CPU manager, Topology Manager
//! and memory manager placed the pod from the plugin's TopologyInfo, and
//! vfplane left the kubelet's cpuset alone. The pod is the one a poll-mode
//! driver runs in: two exclusive CPUs (node 1's both), 2 MiB hugepages from
//! an `emptyDir: {medium: HugePages-2Mi}` volume, which the driver takes
//! its DMA memory from (the driver reports those pages on node 1, the
//! agent reads them on node 1 from the container's hugetlb cgroup), and it
//! sends frames the host counts. A second pod asking for a VF of that pool
//! and one exclusive CPU cannot be aligned (node 1 has no CPU left): the
//! kubelet refuses it with `TopologyAffinityError`, and vfplane reports
//! nothing about it. Then containerd and the kubelet are restarted and
//! systemd reloads its units: the pod keeps its VF and its limits, read
//! back from its cgroup, and vfplane's parts converge again.
//!
//! On both: the container runs as user 1000 with no capability (so
//! without CAP_IPC_LOCK) and pins its DMA memory within the profile's
//! `lockedMemory` through the VF's group node, whose owner it is. Its
//! `memory.max`, `cpu.max` and `pids.max` are what the profile says. When
//! the policy then asks for more memory than the running container has,
//! the agent says so in the VF's status, in a Kubernetes Event on the pod
//! and in its metrics.
//!
//! The caller boots the node (the `TwoNumaNodes` topology, five CPUs on the
//! systemd node, two on the minimal one) and installs vfplane.

use std::time::Duration;

use serde_json::Value;
use xtask::cluster::NodeProfile;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::session::{Session, events, node_vf_statuses};
use xtask::testbed::wire::ETHERTYPE_TEST;

/// The policy, its profile's memory `memory`; on the systemd node its
/// profile asks for hugepages too.
fn policy(node_profile: NodeProfile, memory: &str) -> String {
    let hugepages = match node_profile {
        NodeProfile::Systemd => "\n    hugepages: 16Mi",
        NodeProfile::Minimal => "",
    };
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
  numVfs: 2
  deviceType: vfio-pci
  resourceName: near
  containerProfile:
    cpu: "1"
    memory: {memory}
    numaAligned: true
    lockedMemory: 64Mi
    pids: 128{hugepages}
"#
    )
}

/// The pod: on the minimal node one CPU; on the systemd node two
/// exclusive CPUs and 16 MiB of 2 MiB hugepages mounted at `/hugepages`,
/// where the driver takes its DMA memory from; after its frames it keeps
/// the VF (and its DMA memory) open in `rxcount`, waiting on the VF's
/// interrupt, so that the agent sees the hugepages held.
fn pod(node_profile: NodeProfile) -> String {
    let (cpu, command, hugepages, volumes) = match node_profile {
        NodeProfile::Minimal => ("1", "pktgen --count 100 --size 60 && exec sleep 86400", "", ""),
        NodeProfile::Systemd => (
            "2",
            "pktgen --count 100 --size 60 --hugepages-dir /hugepages && \
             exec rxcount --hugepages-dir /hugepages --mode hybrid --count 1000000000 --timeout 86400",
            "\n          hugepages-2Mi: 16Mi",
            "\n      volumeMounts:\n        - {name: hugepages, mountPath: /hugepages}\n  volumes:\n    - name: hugepages\n      emptyDir: {medium: HugePages-2Mi}",
        ),
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: near
spec:
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsUser: 1000
    runAsGroup: 1000
    runAsNonRoot: true
    fsGroup: 1000
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", "echo uid $(id -u); grep -E 'CapEff|Cpus_allowed_list|Mems_allowed_list' /proc/self/status; {command}"]
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
      resources:
        requests:
          vfplane.io/near: 1
          cpu: "{cpu}"
          memory: 128Mi{hugepages}
        limits:
          vfplane.io/near: 1
          cpu: "{cpu}"
          memory: 128Mi{hugepages}{volumes}
"#
    )
}

/// A Guaranteed pod with a VF of the node-1 pool and one exclusive CPU,
/// which node 1 no longer has.
fn unalignable_pod() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: far
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sleep", "86400"]
      resources:
        requests:
          vfplane.io/near: 1
          cpu: "1"
          memory: 128Mi
          hugepages-2Mi: 16Mi
        limits:
          vfplane.io/near: 1
          cpu: "1"
          memory: 128Mi
          hugepages-2Mi: 16Mi
"#
    )
}

/// The scenario on `session`'s node, vfplane installed.
pub fn numa_aligned(session: &mut Session, node_profile: NodeProfile) {
    let cpus = session
        .cluster_mut()
        .node_exec("cat /sys/devices/system/node/node1/cpulist")
        .unwrap();
    let node1_cpus = cpus.trim().to_owned();
    let expected = if node_profile == NodeProfile::Systemd {
        "3-4"
    } else {
        "1"
    };
    assert_eq!(node1_cpus, expected, "the node's NUMA node 1 CPUs");
    session.apply(&policy(node_profile, "128Mi")).expect("policy");
    session
        .wait_allocatable("near", 2, Duration::from_secs(300))
        .expect("the pool");
    // The node-1 PF's wire (its link is the guest's second).
    let wire = session
        .cluster()
        .guest()
        .listen_wire(1)
        .expect("listen on the node-1 PF's link");
    let created = std::time::Instant::now();
    session.apply(&pod(node_profile)).unwrap();
    session
        .wait("the pod's pktgen report", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "near"])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })
        .unwrap();
    let to_report = created.elapsed();
    let logs = session.kubectl(&["logs", "near"]).unwrap();
    let field = |name: &str| {
        logs.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_default()
            .to_owned()
    };
    // Not root and no capability (no CAP_IPC_LOCK): the VF's group node is
    // the container user's, and its locked-memory limit the profile's.
    assert_eq!(field("uid"), "1000", "the container's user");
    assert_eq!(
        field("CapEff:"),
        "0000000000000000",
        "the container's capabilities"
    );
    let allowed = field("Cpus_allowed_list:");
    match node_profile {
        NodeProfile::Minimal => assert_eq!(allowed, node1_cpus, "vfplane's NUMA cpuset: node 1's CPUs"),
        NodeProfile::Systemd => assert_eq!(
            allowed, node1_cpus,
            "node 1's two CPUs, exclusive, the static CPU manager's, aligned by the Topology Manager"
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
    let mac: Vec<u8> = report["mac"]
        .as_str()
        .unwrap_or_default()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    let mac: [u8; 6] = mac
        .try_into()
        .unwrap_or_else(|_| panic!("the VF's MAC: {report}"));
    wire.settle(Duration::from_secs(2));
    assert_eq!(
        wire.take_from(mac, ETHERTYPE_TEST).len(),
        100,
        "frames the host counted on the node-1 PF's wire"
    );
    if node_profile == NodeProfile::Systemd {
        // The driver's DMA memory: the pod's hugepages, on node 1.
        assert_eq!(
            [&report["dma_page_size"], &report["dma_numa_nodes"]],
            [&Value::from(2_097_152), &serde_json::json!([1])],
            "{report}"
        );
        println!(
            "pod created -> first frames sent and reported: {:.1} s",
            to_report.as_secs_f64()
        );
    }
    session
        .wait(
            "the container's cpuset in the VF's status",
            Duration::from_secs(60),
            |c| {
                Ok(node_vf_statuses(c)?.iter().any(|vf| {
                    vf["container"]["cpus"] == allowed.as_str()
                        && vf["container"]["mems"] == "1"
                        && (node_profile == NodeProfile::Minimal || vf["container"]["hugepagesNodes"] == "1")
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

    if node_profile == NodeProfile::Systemd {
        unalignable_pod_is_refused_by_the_kubelet(session);
        restarts_keep_the_pods_vf_and_limits(session, &cgroup, &allowed);
    }

    // The policy now wants 256 MiB; the running container has 128 MiB.
    session
        .apply(&policy(node_profile, "256Mi"))
        .expect("policy with more memory");
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
    if node_profile == NodeProfile::Systemd {
        policy_deleted_while_the_kubelet_is_down_leaves_no_count(session);
    }
}

/// The policy deleted while the node's kubelet is down (vfplane's pods run
/// on, so the VFs go): once the kubelet is back, the node offers none of
/// the pool. The kubelet restores each resource of its checkpoint with no
/// device until its plugin registers again, and vfplane's plugin no longer
/// serves the pool, so the count the scheduler reads stays 0.
fn policy_deleted_while_the_kubelet_is_down_leaves_no_count(session: &mut Session) {
    session
        .kubectl(&["delete", "pod", "near", "--wait=true"])
        .unwrap();
    session
        .wait_allocatable("near", 2, Duration::from_secs(120))
        .expect("the pool whole again");
    let kubelet = main_pid(session.cluster(), "kubelet").unwrap();
    // The exec that asks for it ends with the kubelet: the node's own
    // shell stops it, waits and starts it again.
    // As in `restart_unit`: the stream's own error proves nothing either
    // way, the kubelet's absence below does.
    if let Err(error) = session.cluster_mut().node_exec(
        "(sleep 3; chroot /proc/1/root sh -c 'systemctl stop kubelet; sleep 60; systemctl start kubelet') \
         > /dev/null 2>&1 &",
    ) {
        eprintln!("the exec asking for the kubelet stop ended with: {error:#}");
    }
    session
        .wait("the kubelet stopped", Duration::from_secs(30), |c| {
            Ok(main_pid(c, "kubelet").is_err())
        })
        .unwrap();
    session
        .kubectl(&["delete", "vfpolicy", "near", "--wait=true", "--timeout=50s"])
        .unwrap();
    assert!(
        main_pid(session.cluster(), "kubelet").is_err(),
        "the policy went while the kubelet was down"
    );
    assert_eq!(
        session.allocatable("near"),
        "2",
        "the API server still holds the count the kubelet posted before it stopped"
    );
    session
        .wait("the kubelet back", Duration::from_secs(180), |c| {
            Ok(main_pid(c, "kubelet").is_ok_and(|now| now != kubelet && now != "0"))
        })
        .unwrap();
    session
        .wait(
            "no VF of the deleted pool offered",
            Duration::from_secs(120),
            |c| Ok(["", "0"].contains(&xtask::session::allocatable(c, "near").as_str())),
        )
        .unwrap();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = session.allocatable("near");
        assert!(
            ["", "0"].contains(&now.as_str()),
            "the deleted pool offered again: {now}"
        );
    }
}

/// Node 1 has no CPU left: the kubelet's Topology Manager refuses a pod
/// that wants node 1's VF and an exclusive CPU, and vfplane says nothing
/// about it (it never ran, and no VF was handed to it).
fn unalignable_pod_is_refused_by_the_kubelet(session: &mut Session) {
    session.apply(&unalignable_pod()).unwrap();
    session
        .wait(
            "the kubelet's refusal of pod far",
            Duration::from_secs(120),
            |c| {
                let pod = c.kubectl_json(&["get", "pod", "far", "-o", "json"])?;
                Ok(pod["status"]["phase"] == "Failed")
            },
        )
        .unwrap();
    let pod = session
        .cluster()
        .kubectl_json(&["get", "pod", "far", "-o", "json"])
        .unwrap();
    assert_eq!(
        pod["status"]["reason"], "TopologyAffinityError",
        "{:#}",
        pod["status"]
    );
    let held: Vec<Value> = node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .filter(|vf| vf["owner"].is_string() || vf["container"].is_object())
        .collect();
    assert!(
        held.iter().all(|vf| vf["owner"] == "default/near/app"),
        "only pod near holds a VF: {held:#?}"
    );
    for reason in ["VfContainerLimits", "VfQuarantined"] {
        let about_far: Vec<Value> = events(session.cluster(), "default", reason)
            .unwrap()
            .into_iter()
            .filter(|e| e["involvedObject"]["name"] == "far")
            .collect();
        assert!(
            about_far.is_empty(),
            "vfplane said nothing about far: {about_far:#?}"
        );
    }
    session.kubectl(&["delete", "pod", "far", "--wait=true"]).unwrap();
}

/// The main PID of systemd unit `unit` on the node.
fn main_pid(cluster: &xtask::cluster::Cluster, unit: &str) -> Result<String, anyhow::Error> {
    Ok(cluster
        .kubectl_output(&[
            "exec",
            "-n",
            "kube-system",
            "node-shell",
            "--",
            "chroot",
            "/proc/1/root",
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            unit,
        ])?
        .trim()
        .to_owned())
}

/// `systemctl restart unit` on the node's own root, three seconds after the
/// exec that asks for it has returned (a restart of containerd or the
/// kubelet ends the exec stream it came by); returns once the unit runs
/// with a new main process and the node answers an exec again.
fn restart_unit(session: &mut Session, unit: &str) {
    // After the previous restart the node may take a moment to answer an
    // exec again (containerd's socket comes up after its main process).
    let mut before = String::new();
    session
        .wait(&format!("{unit}'s main PID"), Duration::from_secs(60), |c| {
            Ok(main_pid(c, unit).map(|pid| before = pid).is_ok())
        })
        .unwrap();
    // The stream may still be closing when the restart cuts it (a busy
    // machine): its error says nothing; the new main PID below is the proof.
    if let Err(error) = session.cluster_mut().node_exec(&format!(
        "(sleep 3; chroot /proc/1/root systemctl restart {unit}) > /dev/null 2>&1 &"
    )) {
        eprintln!("the exec asking for the {unit} restart ended with: {error:#}");
    }
    session
        .wait(&format!("{unit} restarted"), Duration::from_secs(180), |c| {
            Ok(main_pid(c, unit).is_ok_and(|now| now != before && now != "0"))
        })
        .unwrap();
}

/// containerd restarted, the kubelet restarted, systemd's units reloaded:
/// the pod runs on, with its VF, CPUs and limits (read back from its
/// cgroup), and the agent reports it as before.
fn restarts_keep_the_pods_vf_and_limits(session: &mut Session, cgroup: &str, cpus: &str) {
    let read_back = |session: &mut Session| {
        session
            .cluster_mut()
            .node_exec(&format!(
                "cd /proc/1/root/sys/fs/cgroup{cgroup} && cat memory.max cpu.max pids.max cpuset.cpus.effective \
                 cpuset.mems.effective && grep 'locked memory' /proc/$(head -n1 cgroup.procs)/limits"
            ))
            .unwrap()
    };
    let before = read_back(session);
    let vf_before = held_vf(session);
    restart_unit(session, "containerd");
    restart_unit(session, "kubelet");
    session
        .cluster_mut()
        .node_exec("chroot /proc/1/root systemctl daemon-reload")
        .unwrap();
    session
        .wait(
            "the node Ready and pod near Running",
            Duration::from_secs(180),
            |c| {
                let ready = c.kubectl_output(&[
                    "get",
                    "node",
                    "-o=jsonpath={.items[0].status.conditions[?(@.type==\"Ready\")].status}",
                ])?;
                let phase = c.kubectl_output(&["get", "pod", "near", "-o=jsonpath={.status.phase}"])?;
                Ok(ready == "True" && phase == "Running")
            },
        )
        .unwrap();
    let pod = session
        .cluster()
        .kubectl_json(&["get", "pod", "near", "-o", "json"])
        .unwrap();
    assert_eq!(
        pod["status"]["containerStatuses"][0]["restartCount"], 0,
        "the container ran through the restarts: {:#}",
        pod["status"]
    );
    assert_eq!(
        read_back(session),
        before,
        "the container's cgroup limits after the restarts"
    );
    assert!(before.contains("134217728") && before.contains(cpus), "{before}");
    session
        .wait_allocatable("near", 2, Duration::from_secs(120))
        .expect("the pool offered again by the re-registered plugin");
    session
        .wait(
            "the VF's owner and container after the restarts",
            Duration::from_secs(120),
            |c| {
                Ok(node_vf_statuses(c)?.iter().any(|vf| {
                    vf["pciAddress"] == vf_before.as_str()
                        && vf["owner"] == "default/near/app"
                        && vf["container"]["hugepagesNodes"] == "1"
                        && vf["container"]["problems"].as_array().is_none_or(Vec::is_empty)
                }))
            },
        )
        .unwrap();
}

/// The VF pod near holds.
fn held_vf(session: &Session) -> String {
    node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .find(|vf| vf["owner"] == "default/near/app")
        .and_then(|vf| vf["pciAddress"].as_str().map(str::to_owned))
        .expect("pod near's VF")
}
