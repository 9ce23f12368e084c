//! The real cluster: kube-apiserver, controller-manager and scheduler on the
//! host, kubelet and containerd in the emulated SR-IOV guest (the minimal
//! node), and vfplane's
//! agent and device plugin started in the node as plain processes. Proves
//! that the kubelet takes our device plugin: the pool shows in the node's
//! allocatable; a pod asking for a VF runs the driver's `pktgen` on it and
//! the host counts the frames; unbinding the VF shows as Unhealthy in the
//! pod's `allocatedResourcesStatus` and rebinding as Healthy; and after a
//! kubelet restart the plugin registers again and the next pod gets a VF.

#![allow(clippy::expect_used)] // test: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::cluster::{Cluster, ClusterOptions, NODE_NAME, NodeProfile};
use xtask::testbed::Testbed;

const ETHERTYPE_TEST: [u8; 2] = [0x88, 0xb5];
const VF0_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const VF1_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const FRAMES: u32 = 2000;

/// In the node after kubelet starts: the agent makes two vfio-pci VFs with
/// fixed MACs for pool `fast`, then the device plugin serves the pool.
const NODE_EXTRA: &str = r#"
mkdir -p /etc/vfplane
cat > /tmp/state.yaml <<'Y'
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 2
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          deviceType: vfio-pci
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
          containerLimits:
            lockedMemoryBytes: 67108864
Y
VFPLANE_LOG=warn vfplane-agent apply --state-file /tmp/state.yaml --status-file /tmp/status.json \
  --pool-config /etc/vfplane/pools.yaml
echo "node: agent applied: $(cat /etc/vfplane/pools.yaml | tr '\n' ' ')"
(vfplane-device-plugin --pool-config /etc/vfplane/pools.yaml 2>&1 | sed 's/^/device-plugin: /') &
"#;

fn pod(name: &str, command: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: [\"sh\", \"-c\", {command:?}]
      resources:
        limits:
          vfplane.io/fast: 1
"
    )
}

fn pod_phase(cluster: &Cluster, name: &str) -> String {
    cluster
        .kubectl_output(&["get", "pod", name, "-o=jsonpath={.status.phase}"])
        .unwrap_or_default()
}

/// The resource health the kubelet reports for `pod`'s container:
/// (resourceID, health) pairs of `vfplane.io/fast`.
fn allocated_health(cluster: &Cluster, pod: &str) -> Vec<(String, String)> {
    let Ok(pod) = cluster.kubectl_json(&["get", "pod", pod]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for status in pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for resource in status["allocatedResourcesStatus"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if resource["name"] != "vfplane.io/fast" {
                continue;
            }
            for r in resource["resources"].as_array().into_iter().flatten() {
                out.push((
                    r["resourceID"].as_str().unwrap_or_default().to_owned(),
                    r["health"].as_str().unwrap_or_default().to_owned(),
                ));
            }
        }
    }
    out
}

fn allocatable_fast(cluster: &Cluster) -> Option<String> {
    cluster
        .kubectl_output(&[
            "get",
            "node",
            NODE_NAME,
            "-o=jsonpath={.status.allocatable.vfplane\\.io/fast}",
        ])
        .ok()
        .filter(|s| !s.trim().is_empty())
}

fn node_shell(cluster: &mut Cluster, script: &str) -> String {
    cluster
        .node_exec(script)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.node_logs()))
}

#[test]
fn kubelet_runs_a_pod_on_a_vf_from_our_device_plugin() {
    if !xtask::e2e::enabled(
        "kubelet_runs_a_pod_on_a_vf_from_our_device_plugin",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let mut cluster = Cluster::start(
        &testbed,
        // The minimal node: it boots in less of CI's hour, and the demo
        // and the scenarios of `cluster_systemd` run on the systemd node.
        ClusterOptions {
            node_profile: NodeProfile::Minimal,
            node_extra: Some(NODE_EXTRA.to_owned()),
            ..ClusterOptions::default()
        },
    )
    .expect("cluster starts and the node is Ready");
    let wire = cluster.guest().listen_wire(0).expect("listen on the PF link");

    // 1. The pool reaches the node's allocatable through the real kubelet.
    let begun = Instant::now();
    cluster
        .wait_until(
            "vfplane.io/fast in the node's allocatable",
            Duration::from_secs(180),
            |c| Ok(allocatable_fast(c).as_deref() == Some("2")),
        )
        .expect("allocatable");
    eprintln!(
        "smoke: allocatable vfplane.io/fast=2 after {:.1} s",
        begun.elapsed().as_secs_f64()
    );

    // 2. A pod asking for one VF runs pktgen on it from the environment alone.
    let created = Instant::now();
    let script = format!(
        "echo VFIO: $(ls /dev/vfio | tr '\\n' ' '); echo TOOLS: $(ls /usr/local/bin | tr '\\n' ' '); \
         env | grep '^PCIDEVICE_'; \
         pktgen --count {FRAMES} --size 60 --dst 02:00:00:00:00:aa && sleep 3600"
    );
    cluster
        .kubectl_stdin(&["apply", "-f", "-"], &pod("tenant-a", &script))
        .expect("create tenant-a");
    cluster
        .wait_until("tenant-a's pktgen line", Duration::from_secs(240), |c| {
            let phase = pod_phase(c, "tenant-a");
            anyhow::ensure!(
                phase != "Failed",
                "tenant-a failed: {}",
                c.kubectl_output(&["logs", "tenant-a"]).unwrap_or_default()
            );
            Ok(c.kubectl_output(&["logs", "tenant-a"])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })
        .expect("tenant-a runs pktgen");
    let first_frame_after = created.elapsed().as_secs_f64();
    let logs = cluster.kubectl_output(&["logs", "tenant-a"]).expect("logs");
    eprintln!("smoke: tenant-a logs:\n{logs}");
    let line: Value = logs
        .lines()
        .find(|l| l.contains("\"tool\":\"pktgen\""))
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("pktgen JSON line");
    let vf = logs
        .lines()
        .find_map(|l| l.strip_prefix("PCIDEVICE_VFPLANE_IO_FAST="))
        .expect("PCIDEVICE_VFPLANE_IO_FAST in the container")
        .trim()
        .to_owned();
    assert_eq!(line["pci"], vf.as_str(), "pktgen drove the VF the plugin gave");
    let vfio_line = logs.lines().find(|l| l.starts_with("VFIO:")).expect("VFIO line");
    let groups: Vec<&str> = vfio_line.trim_start_matches("VFIO:").split_whitespace().collect();
    assert!(
        groups.contains(&"vfio"),
        "the container has /dev/vfio/vfio: {vfio_line}"
    );
    assert_eq!(
        groups.len(),
        2,
        "exactly the container node and one group: {vfio_line}"
    );
    // vfplane's image holds what ships and none of the tests' own tools
    // (the kubelet stand-in, benchmarks, probes).
    let tools = logs
        .lines()
        .find(|l| l.starts_with("TOOLS:"))
        .expect("TOOLS line");
    assert_eq!(
        tools
            .trim_start_matches("TOOLS:")
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "echo",
            "hybrid",
            "pktgen",
            "rxcount",
            "vfplane-agent",
            "vfplane-controller",
            "vfplane-device-plugin",
            "vfplane-oci-hook"
        ],
        "the programs in vfplane's image"
    );
    let mac = if vf == "0000:00:12.0" { VF0_MAC } else { VF1_MAC };
    wire.settle(Duration::from_secs(2));
    let counted = wire.take_from(mac, ETHERTYPE_TEST).len();
    eprintln!(
        "smoke: pod created -> pktgen done in {first_frame_after:.1} s; {FRAMES} sent by {vf}, the host counted {counted}"
    );
    assert_eq!(line["hw_tx_packets"], FRAMES, "the VF's own counter");
    assert_eq!(
        counted, FRAMES as usize,
        "frames the host counted on the PF's wire"
    );

    // 3. Health: unbinding the VF from vfio-pci is Unhealthy in the pod's
    // allocatedResourcesStatus, rebinding it Healthy.
    cluster
        .wait_until("tenant-a's VF Healthy", Duration::from_secs(60), |c| {
            Ok(allocated_health(c, "tenant-a") == [(vf.clone(), "Healthy".to_owned())])
        })
        .expect("Healthy first");
    let unbound = Instant::now();
    node_shell(
        &mut cluster,
        &format!("echo {vf} > /sys/bus/pci/drivers/vfio-pci/unbind"),
    );
    cluster
        .wait_until(
            "tenant-a's VF Unhealthy after unbind",
            Duration::from_secs(60),
            |c| Ok(allocated_health(c, "tenant-a") == [(vf.clone(), "Unhealthy".to_owned())]),
        )
        .expect("Unhealthy");
    eprintln!(
        "smoke: unbind -> Unhealthy in the pod status within {:.1} s (kubectl exec included)",
        unbound.elapsed().as_secs_f64()
    );
    let rebound = Instant::now();
    node_shell(&mut cluster, &format!("echo {vf} > /sys/bus/pci/drivers_probe"));
    cluster
        .wait_until(
            "tenant-a's VF Healthy after rebind",
            Duration::from_secs(60),
            |c| Ok(allocated_health(c, "tenant-a") == [(vf.clone(), "Healthy".to_owned())]),
        )
        .expect("Healthy again");
    eprintln!(
        "smoke: rebind -> Healthy in the pod status within {:.1} s (kubectl exec included)",
        rebound.elapsed().as_secs_f64()
    );

    // 4. A kubelet restart: the plugin registers again and a new pod gets the other VF.
    // The kubelet's own log (ttyS2, kept across its restarts, on either node
    // profile) shows each start of its sync loop.
    let kubelet_starts = |c: &Cluster| {
        std::fs::read_to_string(c.guest().serial_log(2))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Starting kubelet main sync loop"))
            .count()
    };
    let starts_before = kubelet_starts(&cluster);
    assert!(starts_before >= 1, "no kubelet start in its log");
    // In the background, a second later: the exec stream itself runs through the kubelet.
    node_shell(
        &mut cluster,
        "(sleep 1; for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = kubelet ] && kill ${p#/proc/}; done) \
         > /dev/null 2>&1 &",
    );
    let restarted = Instant::now();
    cluster
        .wait_until("the kubelet restarted", Duration::from_secs(60), |c| {
            Ok(kubelet_starts(c) == starts_before + 1)
        })
        .expect("kubelet killed and started again");
    // The plugin sees the new kubelet.sock and registers a second time: the
    // kubelet's own log (kept across its restarts) has both requests. Only
    // two: kubelet 1.37 refuses a registration of an endpoint it is
    // connected to ("device plugin already connected") and the refusal
    // wedges it for that endpoint.
    let kubelet_log = cluster.guest().serial_log(2);
    let registrations = || {
        let log = std::fs::read_to_string(&kubelet_log).unwrap_or_default();
        let requests = log
            .lines()
            .filter(|l| {
                l.contains("Got registration request from device plugin") && l.contains("vfplane.io/fast")
            })
            .count();
        let refused = log
            .lines()
            .filter(|l| l.contains("device plugin already connected"))
            .count();
        (requests, refused)
    };
    cluster
        .wait_until(
            "the new kubelet took the plugin's registration",
            Duration::from_secs(240),
            |_| Ok(registrations().0 >= 2),
        )
        .expect("plugin registered again");
    eprintln!(
        "smoke: kubelet killed -> plugin registered with the new kubelet after {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        registrations(),
        (2, 0),
        "(registration requests, refusals) in the kubelet's log after its restart"
    );
    cluster
        .kubectl_stdin(
            &["apply", "-f", "-"],
            &pod("tenant-b", "env | grep '^PCIDEVICE_'; ls /dev/vfio"),
        )
        .expect("create tenant-b");
    cluster
        .wait_until("tenant-b Succeeded", Duration::from_secs(180), |c| {
            let phase = pod_phase(c, "tenant-b");
            anyhow::ensure!(phase != "Failed", "tenant-b failed");
            Ok(phase == "Succeeded")
        })
        .expect("tenant-b runs");
    let logs_b = cluster.kubectl_output(&["logs", "tenant-b"]).expect("logs b");
    let vf_b = logs_b
        .lines()
        .find_map(|l| l.strip_prefix("PCIDEVICE_VFPLANE_IO_FAST="))
        .expect("tenant-b got a VF")
        .trim()
        .to_owned();
    assert_ne!(vf_b, vf, "tenant-a still holds its VF; tenant-b gets the other");
    eprintln!("smoke: cluster start-up steps: {:?}", cluster.timings);
    eprintln!("smoke: host memory (RSS MiB): {:?}", cluster.host_memory_mib());
    let meminfo = node_shell(
        &mut cluster,
        "grep -E '^(MemTotal|MemAvailable|Shmem):' /proc/meminfo",
    );
    eprintln!("smoke: guest memory:\n{meminfo}");
}
