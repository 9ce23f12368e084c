//! vfplane as a DRA driver on the real cluster (Kubernetes 1.37, the
//! systemd node): the chart installed with `dra.enabled=true`, a VfPolicy
//! whose pool says `resourceApi: dra`, and a pod that gets a VF through a
//! ResourceClaimTemplate.
//!
//! - The node's ResourceSlice lists the pool's two VFs as devices of driver
//!   `vfplane.io` with their attributes (PCI address, PCIe root, pool, PF,
//!   VF index, IOMMU group), and the node's allocatable has no
//!   `vfplane.io/fast` (a DRA pool is not also a device-plugin resource).
//! - A pod running as user 1000 with no capabilities claims one VF of pool
//!   `fast`: the kubelet prepares the claim through vfplane's DRA socket,
//!   the container gets the VF's group node, its environment
//!   (`PCIDEVICE_VFPLANE_IO_FAST_<device>`) and the profile's locked memory,
//!   and runs the driver's pktgen on it (the VF's own TX counter). The pod's
//!   status shows the device Healthy (the kubelet's health stream).
//! - The pod deleted, the kubelet unprepares the claim: the device is
//!   tainted `vfplane.io/scrubbing` while the agent scrubs the VF, and the
//!   taint goes once the VF is scrubbed; the driver's checkpoint holds no
//!   claim.
//!
//! The times it prints: claim to pod running, pod deleted to VF tainted, to
//! VF scrubbed, and to the taint gone (the VF allocatable again).

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::cluster::{ClusterOptions, NODE_NAME};
use xtask::session::Session;
use xtask::testbed::Testbed;

const FRAMES: u64 = 200;

fn policy() -> &'static str {
    r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: dra-fast
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: 2
  deviceType: vfio-pci
  resourceName: fast
  resourceApi: dra
  containerProfile:
    lockedMemory: 64Mi
    pids: 256
"#
}

fn claim_and_pod() -> String {
    format!(
        r#"apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata:
  name: one-vf
spec:
  spec:
    devices:
      requests:
        - name: vf
          exactly:
            deviceClassName: vf.vfplane.io
            selectors:
              - cel:
                  expression: device.attributes["vfplane.io"].pool == "fast"
---
apiVersion: v1
kind: Pod
metadata:
  name: dra-pktgen
spec:
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsUser: 1000
    runAsGroup: 1000
    runAsNonRoot: true
  resourceClaims:
    - name: vf
      resourceClaimTemplateName: one-vf
  containers:
    - name: pktgen
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {{drop: [ALL]}}
      command: ["sh", "-c", "env | grep ^PCIDEVICE_ | sort; echo vfio-nodes: $(ls /dev/vfio); grep 'locked memory' /proc/self/limits; pktgen --count {FRAMES} --size 60 --dst 02:00:00:00:00:aa && exec sleep 86400"]
      resources:
        claims:
          - name: vf
        limits:
          cpu: "1"
          memory: 128Mi
"#
    )
}

/// Our driver's devices in the node's ResourceSlices.
fn slice_devices(session: &Session) -> Vec<Value> {
    let Ok(slices) = session
        .cluster()
        .kubectl_json(&["get", "resourceslices", "-o", "json"])
    else {
        return Vec::new();
    };
    slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["spec"]["driver"] == "vfplane.io" && s["spec"]["nodeName"] == NODE_NAME)
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn taint_keys(device: &Value) -> Vec<String> {
    device["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn a_pod_gets_a_vf_through_a_resource_claim_and_the_vf_is_scrubbed_after_it() {
    if !xtask::e2e::enabled(
        "a_pod_gets_a_vf_through_a_resource_claim_and_the_vf_is_scrubbed_after_it",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let mut session = Session::start(&testbed, ClusterOptions::default()).expect("cluster");
    session
        .install_vfplane_with(&["dra.enabled=true"])
        .expect("helm install with DRA");
    session.apply(policy()).expect("policy");

    // The slice: two VFs with their attributes, untainted.
    let began = Instant::now();
    let devices = loop {
        let devices = slice_devices(&session);
        if devices.len() == 2 && devices.iter().all(|d| taint_keys(d).is_empty()) {
            break devices;
        }
        assert!(
            began.elapsed() < Duration::from_secs(300),
            "the node's ResourceSlice has {devices:?}\n{}",
            session.pod_diagnostics()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    session.kubectl(&["get", "resourceslices", "-o", "wide"]).unwrap();
    for device in &devices {
        let attributes = &device["attributes"];
        let address = attributes["resource.kubernetes.io/pciBusID"]["string"]
            .as_str()
            .unwrap_or_default();
        assert!(address.starts_with("0000:00:12."), "{device}");
        assert_eq!(
            device["name"].as_str().unwrap(),
            address.replace([':', '.'], "-"),
            "the device name is its address"
        );
        assert_eq!(
            attributes["resource.kubernetes.io/pcieRoot"]["string"], "pci0000:00",
            "{device}"
        );
        assert_eq!(attributes["pool"]["string"], "fast", "{device}");
        assert_eq!(attributes["pf"]["string"], "0000:00:02.0", "{device}");
        assert!(attributes["iommuGroup"]["int"].is_i64(), "{device}");
        assert!(attributes["vfIndex"]["int"].is_i64(), "{device}");
    }
    assert_eq!(
        session.allocatable("fast"),
        "",
        "a DRA pool is not also an extended resource"
    );

    // A non-root pod claims one VF and runs the driver on it.
    let created = Instant::now();
    session.apply(&claim_and_pod()).expect("claim template and pod");
    session
        .wait("the DRA pod's pktgen report", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "dra-pktgen"])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })
        .expect("pktgen ran");
    let to_running = created.elapsed();
    let logs = session.kubectl(&["logs", "dra-pktgen"]).unwrap();
    let report: Value = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("pktgen's JSON line");
    assert!(report.get("error").is_none(), "pktgen failed: {report}");
    assert_eq!(report["hw_tx_packets"].as_u64(), Some(FRAMES), "{report}");
    let vf = report["pci"].as_str().unwrap().to_owned();
    let device = vf.replace([':', '.'], "-");
    let variable = format!(
        "PCIDEVICE_VFPLANE_IO_FAST_{}={vf}",
        device.to_uppercase().replace('-', "_")
    );
    assert!(logs.lines().any(|l| l == variable), "no {variable} in\n{logs}");
    let locked = logs
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_default();
    assert_eq!(
        locked, "67108864",
        "the profile's lockedMemory in the pod:\n{logs}"
    );
    let group = devices
        .iter()
        .find(|d| d["name"] == device.as_str())
        .map(|d| d["attributes"]["iommuGroup"]["int"].to_string())
        .unwrap();
    let mut nodes: Vec<&str> = logs
        .lines()
        .find_map(|l| l.strip_prefix("vfio-nodes:"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    nodes.sort_unstable();
    let mut expected = vec!["vfio", group.as_str()];
    expected.sort_unstable();
    assert_eq!(nodes, expected, "the pod's /dev/vfio");

    // The kubelet shows the device's health from the driver's stream.
    session
        .wait(
            "the device Healthy in the pod's status",
            Duration::from_secs(60),
            |c| {
                Ok(c.kubectl_json(&["get", "pod", "dra-pktgen", "-o", "json"])
                    .is_ok_and(|pod| {
                        pod["status"]["containerStatuses"][0]["allocatedResourcesStatus"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .flat_map(|s| s["resources"].as_array().cloned().unwrap_or_default())
                            .any(|r| {
                                r["health"] == "Healthy"
                                    && r["resourceID"] == format!("vfplane.io/vf={vf}").as_str()
                            })
                    }))
            },
        )
        .expect("health in the pod status");
    session
        .kubectl(&[
            "get",
            "pod",
            "dra-pktgen",
            "-o=jsonpath={.status.containerStatuses[0].allocatedResourcesStatus}",
        ])
        .unwrap();

    // Released: tainted while the agent scrubs it, untainted after.
    session
        .kubectl(&["delete", "pod", "dra-pktgen", "--wait=true"])
        .unwrap();
    let deleted = Instant::now();
    let mut tainted_after = None;
    loop {
        let devices = slice_devices(&session);
        let ours = devices.iter().find(|d| d["name"] == device.as_str());
        let keys = ours.map(taint_keys).unwrap_or_default();
        if keys.iter().any(|k| k == "vfplane.io/scrubbing") && tainted_after.is_none() {
            tainted_after = Some(deleted.elapsed());
            session.kubectl(&["get", "resourceslices", "-o", "yaml"]).unwrap();
        }
        if tainted_after.is_some() && ours.is_some() && keys.is_empty() {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(180),
            "device {device} after the pod's deletion: {ours:?} (tainted after {tainted_after:?})\n{}",
            session.pod_diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let untainted_after = deleted.elapsed();
    assert!(
        !session.vf_handed_out(&vf).unwrap(),
        "VF {vf} scrubbed before its taint went"
    );
    assert!(
        session.agent_logged_scrub(&vf),
        "the agent did not log the scrub of {vf}"
    );
    let checkpoint = session
        .cluster_mut()
        .node_exec("cat /proc/1/root/var/lib/kubelet/plugins/vfplane.io/checkpoint.json")
        .unwrap();
    let checkpoint: Value = serde_json::from_str(checkpoint.trim()).expect("the checkpoint parses");
    assert_eq!(
        checkpoint["claims"],
        serde_json::json!({}),
        "no claim left prepared"
    );

    eprintln!(
        "cluster_dra: claim template and pod applied -> pktgen done {:.1} s; pod deleted -> VF tainted {:.1} s -> \
         scrubbed and untainted {:.1} s",
        to_running.as_secs_f64(),
        tainted_after.unwrap_or_default().as_secs_f64(),
        untainted_after.as_secs_f64()
    );
}
