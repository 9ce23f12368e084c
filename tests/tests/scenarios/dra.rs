//! vfplane as a DRA driver on the real cluster (Kubernetes 1.37), as a
//! scenario `cluster_systemd` runs on the systemd node after the demo and
//! the scrub scenario: the chart installed with `dra.enabled=true`, a VfPolicy whose
//! pool says `resourceApi: dra`, and a pod that gets a VF through a
//! ResourceClaimTemplate.
//!
//! - The node's ResourceSlice lists the pool's two VFs as devices of driver
//!   `vfplane.io` with their attributes (PCI address, PCIe root, pool, PF,
//!   VF index, IOMMU group), and the node's allocatable has no
//!   `vfplane.io/edge` (a DRA pool is not also a device-plugin resource).
//! - A pod running as user 1000 with no capabilities claims one VF of pool
//!   `edge`: the kubelet prepares the claim through vfplane's DRA socket,
//!   the container gets the VF's group node, its environment
//!   (`PCIDEVICE_VFPLANE_IO_EDGE_<device>`) and the profile's locked memory,
//!   and runs the driver's pktgen on it (the VF's own TX counter). The pod's
//!   status shows the device Healthy (the kubelet's health stream), and the
//!   NodeState names the pod's container as the VF's owner.
//! - The pod webhook reads the pod's claims: the container is marked as
//!   needing vfplane's NRI plugin (the pool's profile has locked memory and
//!   pids), and a pod claiming the pool's VFs without the CPU and memory limits the
//!   profile asks for is refused, naming the claim (a server-side dry run).
//! - The pod deleted with the agent paused (it scrubs a released VF within
//!   a second, too soon to watch), the kubelet unprepares the claim: the
//!   device is tainted `vfplane.io/scrubbing` and stays so while the VF is
//!   unscrubbed; the agent resumed scrubs it and the taint goes; the
//!   driver's checkpoint holds no claim.
//! - A claim for two VFs whose constraint cannot be met (`matchAttribute`
//!   on the VF index, which no two VFs share) leaves its pod Pending, and
//!   the pod's condition says the scheduler cannot allocate the claim.
//! - A claim with a `VfConfig` (MAC, VLAN 120, trust on, spoof checking
//!   off): while its pod runs the PF reports those settings for the pod's
//!   VF (the NodeState) and the pod's `_INFO` carries the MAC; the pod
//!   deleted, the scrub gives the VF its pool's settings again. A claim
//!   with VLAN 5000 is refused at prepare, and `kubectl describe pod`
//!   shows the reason.
//! - A claim for two VFs under one PCIe root (`matchAttribute`): the pod
//!   gets both VFs (both variables, both group nodes). Then, with the agent
//!   paused so nothing repairs it, one VF unbound from vfio-pci is
//!   Unhealthy in the pod's status and its device is tainted
//!   `vfplane.io/unhealthy`; the agent resumed binds it again, and it is
//!   Healthy with the taint gone.
//! - The DRA plugin killed (SIGKILL) with that claim prepared: the kubelet
//!   restarts it, the new process reads the claim from its checkpoint and
//!   the pod's VFs are reported Healthy again; the pod deleted, the new
//!   process unprepares the claim and the agent scrubs both VFs at once
//!   (an unprepared VF is released: no grace time).
//!
//! - The two scrub gates side by side: a pod holding a VF is deleted and a
//!   second pod asks for that same VF at once, first under the taint gate,
//!   then (`helm upgrade --set dra.scrubGate=bindingConditions`) under
//!   binding conditions, where every device carries them and the second
//!   claim's device status says `vfplane.io/scrubbed`. Under both the second
//!   pod runs only after the agent scrubbed the VF.
//!
//! The times it prints: claim to pod running and prepare, pod deleted to VF
//! tainted, to VF scrubbed and untainted (the VF allocatable again), unbind
//! to the taint and to Unhealthy in the pod's status, rebind to both
//! cleared, the plugin's restart, the two-VF pod deleted to both scrubbed,
//! and under each gate a released VF to its next tenant running.

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::campaign::median_and_worst;
use xtask::claims::{pool_selector, vf_claim_template};
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::session::{NAMESPACE, Session, dra_devices, node_vf_statuses, taint_keys};

const FRAMES: u32 = 200;

fn policy() -> &'static str {
    r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: dra-edge
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: 2
  deviceType: vfio-pci
  resourceName: edge
  resourceApi: dra
  containerProfile:
    memory: 64Mi
    lockedMemory: 64Mi
    pids: 256
"#
}

/// A pod of `claims` (a ResourceClaimTemplate's name) that shows its
/// environment and `/dev/vfio`, then sleeps (it opens no VF, so a VF can be
/// unbound under it).
fn sleeping_pod(name: &str, template: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  terminationGracePeriodSeconds: 1
  securityContext:
    runAsUser: 1000
    runAsGroup: 1000
    runAsNonRoot: true
  resourceClaims:
    - name: vfs
      resourceClaimTemplateName: {template}
  containers:
    - name: holder
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      securityContext:
        allowPrivilegeEscalation: false
        capabilities: {{drop: [ALL]}}
      command: ["sh", "-c", "env | grep ^PCIDEVICE_ | sort; echo vfio-nodes: $(ls /dev/vfio); exec sleep 86400"]
      resources:
        claims:
          - name: vfs
        limits:
          cpu: "1"
          memory: 128Mi
"#
    )
}

/// Applies a sleeping pod on `template`, waits until it has printed its
/// environment, and returns how long that took, its log and the PCI
/// addresses of the VFs the pool `pool` gave it (sorted).
fn run_sleeping_pod(
    session: &mut Session,
    pod: &str,
    template: &str,
    pool: &str,
) -> (Duration, String, Vec<String>) {
    let created = Instant::now();
    session.apply(&sleeping_pod(pod, template)).unwrap();
    session
        .wait(&format!("pod {pod}'s VFs"), Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", pod])
                .is_ok_and(|l| l.contains("vfio-nodes:")))
        })
        .unwrap_or_else(|e| panic!("pod {pod} runs: {e}"));
    let to_running = created.elapsed();
    let logs = session.kubectl(&["logs", pod]).unwrap();
    let prefix = format!("PCIDEVICE_VFPLANE_IO_{}_", pool.to_uppercase());
    let mut vfs: Vec<String> = logs
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| l.split_once('='))
        .filter(|(name, _)| !name.ends_with("_INFO"))
        .map(|(_, vf)| vf.to_owned())
        .collect();
    vfs.sort();
    (to_running, logs, vfs)
}

/// A template for two VFs of `pool` that share `attribute`.
fn two_vfs_sharing(name: &str, pool: &str, attribute: &str) -> String {
    vf_claim_template(
        name,
        "vfs",
        2,
        &pool_selector(pool),
        &format!("      constraints:\n        - requests: [\"vfs\"]\n          matchAttribute: {attribute}"),
    )
}

/// The health the kubelet shows for each of a pod's DRA devices
/// (`vfplane.io/vf=<address>` -> Healthy, Unhealthy or Unknown).
fn pod_health(session: &Session, pod: &str) -> Vec<(String, String)> {
    let Ok(pod) = session.cluster().kubectl_json(&["get", "pod", pod, "-o", "json"]) else {
        return Vec::new();
    };
    let mut health: Vec<(String, String)> = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| {
            c["allocatedResourcesStatus"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|s| s["resources"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["resourceID"].as_str().unwrap_or_default().to_owned(),
                r["health"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    health.sort();
    health
}

/// The taint keys of one of our devices (None when the slice lacks it).
fn device_taints(session: &Session, device: &str) -> Option<Vec<String>> {
    dra_devices(session.cluster())
        .iter()
        .find(|d| d["name"] == device)
        .map(taint_keys)
}

/// Sends `signal` to every node process whose `comm` is `comm` (the node
/// shell has the node's PID namespace); returns how many it signalled.
fn signal_node_processes(session: &mut Session, comm: &str, signal: &str) -> usize {
    let out = session
        .cluster_mut()
        .node_exec(&format!(
            "n=0; for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = {comm} ] && kill -{signal} ${{p#/proc/}} && n=$((n+1)); done; echo $n"
        ))
        .unwrap();
    out.trim().parse().unwrap_or(0)
}

/// The scenarios, on a session with vfplane installed with
/// `dra.enabled=true` and no VfPolicy on the node's PF.
pub fn claims(session: &mut Session) {
    session.apply(policy()).expect("policy");

    // The slice: two VFs with their attributes, untainted.
    let began = Instant::now();
    let devices = loop {
        let devices = dra_devices(session.cluster());
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
        assert_eq!(attributes["pool"]["string"], "edge", "{device}");
        assert_eq!(attributes["pf"]["string"], "0000:00:02.0", "{device}");
        assert!(attributes["iommuGroup"]["int"].is_i64(), "{device}");
        assert!(attributes["vfIndex"]["int"].is_i64(), "{device}");
    }
    assert_eq!(
        session.allocatable("edge"),
        "",
        "a DRA pool is not also an extended resource"
    );

    // A non-root pod claims one VF and runs the driver on it.
    let created = Instant::now();
    session
        .apply(&xtask::demo::claim_pod_yaml("dra-pktgen", "edge", FRAMES))
        .expect("claim template and pod");
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
    assert_eq!(
        report["hw_tx_packets"].as_u64(),
        Some(u64::from(FRAMES)),
        "{report}"
    );
    let vf = report["pci"].as_str().unwrap().to_owned();
    let device = vf.replace([':', '.'], "-");
    let variable = format!(
        "PCIDEVICE_VFPLANE_IO_EDGE_{}={vf}",
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

    // The agent names the claim's container as the VF's owner (the
    // kubelet's pod-resources lists DRA claims' devices too).
    let owned_by = |c: &xtask::cluster::Cluster, owner: &str| {
        node_vf_statuses(c).is_ok_and(|vfs| {
            vfs.iter()
                .any(|v| v["pciAddress"] == vf.as_str() && v["owner"] == owner)
        })
    };
    session
        .wait(
            "the claim's VF owned in the NodeState",
            Duration::from_secs(60),
            |c| Ok(owned_by(c, "default/dra-pktgen/pktgen")),
        )
        .expect("the owner of a DRA VF");

    let prepared_in = prepare_times(session);
    assert_eq!(prepared_in.len(), 1, "one claim prepared: {prepared_in:?}");

    the_pod_webhook_checks_containers_that_claim_vfs(session);

    // Released: tainted until the agent scrubs it. The agent scrubs a
    // released VF within a second, often before `kubectl delete` returns,
    // so it is paused here to hold the VF released and unscrubbed: the
    // taint must stay; the agent resumed scrubs it and the taint goes.
    let scrubs_before = scrub_lines(session, &vf);
    assert_eq!(
        signal_node_processes(session, "vfplane-agent", "STOP"),
        1,
        "the agent paused"
    );
    let released = Instant::now();
    session
        .kubectl(&["delete", "pod", "dra-pktgen", "--wait=true"])
        .unwrap();
    let tainted = |s: &Session| {
        device_taints(s, &device).is_some_and(|t| t.iter().any(|k| k == "vfplane.io/scrubbing"))
    };
    wait_for(session, "the released VF tainted", Duration::from_secs(60), |s| {
        tainted(s)
    });
    let tainted_after = released.elapsed();
    session.kubectl(&["get", "resourceslices", "-o", "yaml"]).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let still_tainted = tainted(session);
    let still_marked = session.vf_handed_out(&vf).unwrap();
    let resumed = Instant::now();
    assert_eq!(
        signal_node_processes(session, "vfplane-agent", "CONT"),
        1,
        "the agent resumed"
    );
    assert!(
        still_tainted && still_marked,
        "unscrubbed, the VF must stay marked ({still_marked}) and tainted ({still_tainted})"
    );
    wait_for(
        session,
        "the VF scrubbed and untainted",
        Duration::from_secs(120),
        |s| device_taints(s, &device).is_some_and(|t| t.is_empty()),
    );
    let untainted_after = resumed.elapsed();
    assert!(
        !session.vf_handed_out(&vf).unwrap(),
        "VF {vf} scrubbed before its taint went"
    );
    assert_eq!(
        scrub_lines(session, &vf),
        scrubs_before + 1,
        "the agent logged one more scrub of {vf}"
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
        "cluster_dra: claim template and pod applied -> pktgen done {:.1} s (prepare {} ms); pod delete issued \
         (agent paused) -> VF tainted {:.1} s; agent resumed -> scrubbed and untainted {:.1} s",
        to_running.as_secs_f64(),
        prepared_in[0],
        tainted_after.as_secs_f64(),
        untainted_after.as_secs_f64()
    );

    unsatisfiable_claim_stays_pending_and_says_why(session);
    a_claims_settings_reach_its_vf_and_leave_with_it(session);
    two_vfs_through_an_unbind_and_a_plugin_kill(session);
    the_plugins_footprint_serving_the_pool_by_each_api(session);

    // The two scrub gates, side by side: the next tenant of a just-released
    // VF, under the taint and then under binding conditions.
    let rounds = gate_rounds();
    let taint: Vec<NextTenant> = (0..rounds)
        .map(|i| next_tenant_of_a_released_vf(session, "taint", i))
        .collect();
    session
        .helm(&[
            "upgrade",
            "vfplane",
            "charts/vfplane",
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "dra.scrubGate=bindingConditions",
            "--wait",
            "--timeout=10m",
        ])
        .unwrap();
    wait_for(
        session,
        "every device carrying the binding condition",
        Duration::from_secs(120),
        |s| {
            let devices = dra_devices(s.cluster());
            devices.len() == 2
                && devices.iter().all(|d| {
                    d["bindingConditions"] == serde_json::json!(["vfplane.io/scrubbed"])
                        && d["bindingFailureConditions"] == serde_json::json!(["vfplane.io/scrub-failed"])
                        && taint_keys(d).is_empty()
                })
        },
    );
    let binding: Vec<NextTenant> = (0..rounds)
        .map(|i| next_tenant_of_a_released_vf(session, "binding", i))
        .collect();
    let figures = |rounds: &[NextTenant]| {
        let running: Vec<Duration> = rounds.iter().map(|r| r.next_running).collect();
        let scrubbed: Vec<Duration> = rounds.iter().map(|r| r.scrubbed).collect();
        let each: Vec<String> = running
            .iter()
            .map(|d| format!("{:.1}", d.as_secs_f64()))
            .collect();
        let (median, worst) = median_and_worst(&running);
        let (scrub_median, _) = median_and_worst(&scrubbed);
        format!(
            "median {median:.1} s, worst {worst:.1} s (rounds: {} s; scrubbed after a median {scrub_median:.1} s)",
            each.join(", ")
        )
    };
    eprintln!(
        "cluster_dra: released VF -> next tenant running, {rounds} round(s) per gate: taint {}; binding conditions {}",
        figures(&taint),
        figures(&binding)
    );
    // The pool goes and its PF back to 0 VFs, for what runs next on the node.
    session
        .kubectl(&["delete", "vfpolicy", "dra-edge", "--wait=true", "--timeout=300s"])
        .unwrap();
    session.wait_pf_without_vfs(Duration::from_secs(300)).unwrap();
    two_vfs_on_one_numa_node(session);
}

/// The node-1 PF (0000:21:00.0, behind the PCIe expander bridge on NUMA
/// node 1) as a DRA pool: its devices carry `numaNode: 1`, and a pod
/// claiming two VFs that must share `vfplane.io/numaNode` gets both. Then
/// the pool goes and the PF is back at 0 VFs.
fn two_vfs_on_one_numa_node(session: &mut Session) {
    const NUMA_PF: &str = "0000:21:00.0";
    session
        .apply(&format!(
            r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: dra-node1
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["{NUMA_PF}"]
  numVfs: 2
  deviceType: vfio-pci
  resourceName: node1
  resourceApi: dra
"#
        ))
        .unwrap();
    let of_the_pool = |s: &Session| -> Vec<Value> {
        dra_devices(s.cluster())
            .into_iter()
            .filter(|d| d["attributes"]["pool"]["string"] == "node1")
            .collect()
    };
    wait_for(
        session,
        "the node-1 pool's two VFs offered, on NUMA node 1",
        Duration::from_secs(300),
        |s| {
            let devices = of_the_pool(s);
            devices.len() == 2
                && devices
                    .iter()
                    .all(|d| d["attributes"]["numaNode"]["int"] == 1 && taint_keys(d).is_empty())
        },
    );
    eprintln!("the node-1 pool's devices: {}", Value::from(of_the_pool(session)));
    session
        .apply(&two_vfs_sharing(
            "two-vfs-one-numa-node",
            "node1",
            "vfplane.io/numaNode",
        ))
        .unwrap();
    let (to_running, logs, vfs) = run_sleeping_pod(session, "dra-numa", "two-vfs-one-numa-node", "node1");
    assert_eq!(vfs.len(), 2, "two VFs in the pod's environment:\n{logs}");
    for vf in &vfs {
        let numa = session
            .cluster_mut()
            .node_exec(&format!("cat /sys/bus/pci/devices/{vf}/numa_node"))
            .unwrap();
        assert_eq!(numa.trim(), "1", "VF {vf} is on NUMA node 1 by the node's sysfs");
    }
    eprintln!(
        "cluster_dra: two VFs sharing vfplane.io/numaNode -> pod running {:.1} s, with {}",
        to_running.as_secs_f64(),
        vfs.join(" and ")
    );
    session
        .kubectl(&["delete", "pod", "dra-numa", "--wait=true"])
        .unwrap();
    session
        .kubectl(&["delete", "vfpolicy", "dra-node1", "--wait=true", "--timeout=300s"])
        .unwrap();
    session
        .wait("the node-1 PF back to 0 VFs", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&[
                "get",
                "nodestate",
                xtask::cluster::NODE_NAME,
                &format!("-o=jsonpath={{.status.pfs[?(@.pciAddress==\"{NUMA_PF}\")].numVfs}}"),
            ])
            .is_ok_and(|v| v.trim() == "0"))
        })
        .unwrap();
}

/// The plugin process's resident memory (KiB) and CPU time (clock ticks,
/// user + system), read from its `/proc` entry on the node.
fn plugin_footprint(session: &mut Session) -> (u64, u64) {
    let out = session
        .cluster_mut()
        .node_exec(
            "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = vfplane-device- ] && \
             { awk '/^VmRSS/ {print $2}' $p/status; cut -d' ' -f14,15 $p/stat; }; done; true",
        )
        .unwrap();
    let numbers: Vec<u64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert_eq!(numbers.len(), 3, "one plugin process: {out:?}");
    (numbers[0], numbers[1] + numbers[2])
}

/// The plugin idle for 20 s: its RSS (KiB) and CPU (ms per minute; the
/// node's clock tick is 10 ms).
fn idle_plugin(session: &mut Session) -> (u64, u64) {
    let (_, before) = plugin_footprint(session);
    std::thread::sleep(Duration::from_secs(20));
    let (rss, after) = plugin_footprint(session);
    (rss, (after - before) * 10 * 3)
}

/// The plugin's footprint, idle, with the pool's two VFs served through
/// DRA and then, the policy moved to `resourceApi: devicePlugin`, through
/// the device plugin; then the pool goes back to DRA.
fn the_plugins_footprint_serving_the_pool_by_each_api(session: &mut Session) {
    let dra = idle_plugin(session);
    let move_to = |session: &Session, api: &str| {
        session
            .kubectl(&[
                "patch",
                "vfpolicy",
                "dra-edge",
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"resourceApi":"{api}"}}}}"#),
            ])
            .unwrap();
    };
    move_to(session, "devicePlugin");
    session
        .wait_allocatable("edge", 2, Duration::from_secs(120))
        .unwrap();
    let device_plugin = idle_plugin(session);
    move_to(session, "dra");
    wait_for(
        session,
        "the pool's VFs back in the ResourceSlice",
        Duration::from_secs(120),
        |s| {
            let devices = dra_devices(s.cluster());
            devices.len() == 2 && devices.iter().all(|d| taint_keys(d).is_empty())
        },
    );
    eprintln!(
        "cluster_dra: the plugin idle, 20 s each, serving the pool's 2 VFs: through DRA {} KiB RSS, {} ms CPU per \
         minute; through the device plugin {} KiB RSS, {} ms CPU per minute",
        dra.0, dra.1, device_plugin.0, device_plugin.1
    );
}

/// What one round of [`next_tenant_of_a_released_vf`] measured.
struct NextTenant {
    /// The first pod's delete issued -> the VF's mark gone (the scrub).
    scrubbed: Duration,
    /// The first pod's delete issued -> the second pod running on the
    /// same VF.
    next_running: Duration,
}

/// Rounds of each scrub gate's comparison: `VFPLANE_DRA_GATE_ROUNDS`, 1
/// unless set (CI runs one; the figures in docs/dra.md took more).
fn gate_rounds() -> usize {
    std::env::var("VFPLANE_DRA_GATE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// A template for exactly the VF at `address`.
fn the_vf_at(name: &str, address: &str) -> String {
    vf_claim_template(
        name,
        "vfs",
        1,
        &format!(r#"device.attributes["resource.kubernetes.io"].pciBusID == "{address}""#),
        "",
    )
}

/// A pod holds the first VF; it is deleted and at once a second pod asks
/// for that same VF. The second must not run before the agent scrubbed the
/// VF (the mark is gone and the agent logged one more scrub of it), and it
/// must run.
fn next_tenant_of_a_released_vf(session: &mut Session, gate: &str, index: usize) -> NextTenant {
    const VF: &str = "0000:00:12.0";
    let round = format!("{gate}-{index}");
    let template = format!("the-vf-{round}");
    session.apply(&the_vf_at(&template, VF)).unwrap();
    let first = format!("first-{round}");
    let second = format!("second-{round}");
    session.apply(&sleeping_pod(&first, &template)).unwrap();
    session
        .wait("the first tenant running", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", &first])
                .is_ok_and(|l| l.contains("vfio-nodes:")))
        })
        .unwrap();
    let scrubs_before = scrub_lines(session, VF);
    let deleted = Instant::now();
    session
        .kubectl(&["delete", "pod", &first, "--wait=true"])
        .unwrap();
    session.apply(&sleeping_pod(&second, &template)).unwrap();
    let mut scrubbed = None;
    loop {
        let running = session
            .cluster()
            .kubectl_output(&["logs", &second])
            .is_ok_and(|l| l.contains("vfio-nodes:"));
        if scrubbed.is_none() && !session.vf_handed_out(VF).unwrap() {
            scrubbed = Some(deleted.elapsed());
        }
        if running {
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(180),
            "{round}: the second tenant of {VF} not running\n{}",
            session.pod_diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let next_running = deleted.elapsed();
    assert!(
        scrubbed.is_some(),
        "{round}: the second tenant runs on {VF}, whose handed-out mark is still there"
    );
    assert_eq!(
        scrub_lines(session, VF),
        scrubs_before + 1,
        "{round}: the agent scrubbed {VF} once between the tenants"
    );
    session.kubectl(&["get", "resourceclaims", "-o", "wide"]).unwrap();
    if gate == "binding" {
        let claims = session
            .cluster()
            .kubectl_json(&["get", "resourceclaims", "-o", "json"])
            .unwrap();
        let ours = claims["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["metadata"]["ownerReferences"][0]["name"] == second.as_str())
            .cloned()
            .unwrap_or_default();
        let condition = &ours["status"]["devices"][0]["conditions"][0];
        assert_eq!(
            (condition["type"].as_str(), condition["status"].as_str()),
            (Some("vfplane.io/scrubbed"), Some("True")),
            "the second tenant's claim: {ours}"
        );
    }
    session
        .kubectl(&["delete", "pod", &second, "--wait=true"])
        .unwrap();
    session.wait_scrubbed(VF, Duration::from_secs(120)).unwrap();
    NextTenant {
        scrubbed: scrubbed.unwrap_or_default(),
        next_running,
    }
}

/// How many scrubs of `vf` the agent's log shows.
fn scrub_lines(session: &Session, vf: &str) -> usize {
    session
        .agent_log()
        .lines()
        .filter(|l| l.contains("VF scrubbed") && l.contains(vf))
        .count()
}

/// Two VFs that must share their VF index: no two do, so the scheduler
/// cannot allocate the claim and says so; nothing is allocated.
fn unsatisfiable_claim_stays_pending_and_says_why(session: &mut Session) {
    session
        .apply(&two_vfs_sharing(
            "two-vfs-one-index",
            "edge",
            "vfplane.io/vfIndex",
        ))
        .unwrap();
    session
        .apply(&sleeping_pod("dra-unsatisfiable", "two-vfs-one-index"))
        .unwrap();
    let condition = "-o=jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].message}";
    session
        .wait("the unsatisfiable pod's reason", Duration::from_secs(120), |c| {
            Ok(c.kubectl_output(&["get", "pod", "dra-unsatisfiable", condition])
                .is_ok_and(|m| m.contains("cannot allocate all claims")))
        })
        .expect("the scheduler's reason in the pod's condition");
    session
        .kubectl(&["get", "pod", "dra-unsatisfiable", condition])
        .unwrap();
    session.kubectl(&["get", "resourceclaims"]).unwrap();
    assert_eq!(
        session.jsonpath(&["get", "pod", "dra-unsatisfiable", "-o=jsonpath={.status.phase}"]),
        "Pending"
    );
    let claims = session
        .cluster()
        .kubectl_json(&["get", "resourceclaims", "-o", "json"])
        .unwrap();
    let of_the_pod: Vec<&Value> = claims["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["metadata"]["ownerReferences"][0]["name"] == "dra-unsatisfiable")
        .collect();
    assert_eq!(of_the_pod.len(), 1, "the pod's claim: {claims}");
    for claim in of_the_pod {
        assert!(
            claim["status"]["allocation"].is_null(),
            "a claim was allocated: {claim}"
        );
    }
    session
        .kubectl(&["delete", "pod", "dra-unsatisfiable", "--wait=true"])
        .unwrap();
}

/// The pod webhook reads a pod's claims: the claim pod's container, whose
/// pool's profile the runtime applies (locked memory, pids), was marked as
/// needing vfplane's NRI plugin; and a pod claiming the pool's VFs without
/// the CPU and memory limits the profile asks for (its `memory` asks for
/// both) is refused (a server-side dry run), with the reason naming the
/// claim.
fn the_pod_webhook_checks_containers_that_claim_vfs(session: &mut Session) {
    let annotation = session.jsonpath(&[
        "get",
        "pod",
        "dra-pktgen",
        "-o=jsonpath={.metadata.annotations.required-plugins\\.noderesource\\.dev/container\\.pktgen}",
    ]);
    assert!(
        annotation.contains("vfplane"),
        "the webhook marks the claim pod's container as needing vfplane's NRI plugin: {annotation:?}"
    );
    let unlimited = r#"apiVersion: v1
kind: Pod
metadata:
  name: dra-no-memory-limit
spec:
  resourceClaims:
    - name: vf
      resourceClaimTemplateName: one-vf
  containers:
    - name: app
      image: busybox
      command: ["sleep", "60"]
      resources:
        claims:
          - name: vf
"#;
    refused_by_the_webhook(
        session,
        "a claim pod without limits",
        unlimited,
        "container \"app\" asks for VFs of pool edge through claim \"vf\", whose policy requires limits: add \
         resources.limits.cpu and resources.limits.memory (at least \"64Mi\")",
    );
}

/// Applies `yaml` as a server-side dry run, which the pod webhook must
/// refuse with a message containing `expected`.
fn refused_by_the_webhook(session: &Session, what: &str, yaml: &str, expected: &str) {
    let refused = session
        .cluster()
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], yaml)
        .expect_err(what);
    let message = format!("{refused:#}");
    eprintln!("the webhook on {what}: {message}");
    assert!(message.contains(expected), "{message}");
}

/// A template for one VF of pool `edge` with the opaque configuration
/// `parameters` (YAML, indented for its place).
fn one_vf_configured(name: &str, parameters: &str) -> String {
    vf_claim_template(
        name,
        "vf",
        1,
        &pool_selector("edge"),
        &format!(
            "      config:\n        - requests: [\"vf\"]\n          opaque:\n            driver: vfplane.io\n            \
             parameters:\n              apiVersion: vfplane.io/v1alpha1\n              kind: VfConfig\n{parameters}"
        ),
    )
}

/// The NodeState's report of the VF at `address` (what the PF says of it).
fn vf_status(session: &Session, address: &str) -> Option<Value> {
    node_vf_statuses(session.cluster())
        .ok()?
        .into_iter()
        .find(|v| v["pciAddress"] == address)
}

/// A claim's `VfConfig`: the PF reports its MAC, VLAN, trust and spoof
/// checking for the pod's VF while the pod runs, the pod's environment
/// carries its MAC, its container runs under the claim's profile (more
/// locked memory and a tighter pids bound than the pool's), and the scrub
/// after the pod gives the VF its pool's settings again. A pod whose
/// claim's settings are out of range is refused by the webhook, and one
/// admitted before its template existed is refused at prepare, `kubectl
/// describe pod` showing why; a pod with less memory than its claim's
/// profile asks is refused by the webhook.
fn a_claims_settings_reach_its_vf_and_leave_with_it(session: &mut Session) {
    const MAC: &str = "02:aa:bb:cc:dd:01";
    session
        .apply(&one_vf_configured(
            "one-vf-configured",
            &format!(
                "              mac: \"{MAC}\"\n              vlan: 120\n              trust: true\n              \
                 spoofChk: false\n              containerProfile:\n                lockedMemory: 96Mi\n                \
                 pids: 128"
            ),
        ))
        .unwrap();
    let created = Instant::now();
    session
        .apply(&sleeping_pod("dra-configured", "one-vf-configured"))
        .unwrap();
    session
        .wait("the configured pod running", Duration::from_secs(300), |c| {
            Ok(
                c.kubectl_output(&["get", "pod", "dra-configured", "-o=jsonpath={.status.phase}"])
                    .is_ok_and(|p| p == "Running"),
            )
        })
        .expect("the configured pod runs");
    let to_running = created.elapsed();
    let logs = session.kubectl(&["logs", "dra-configured"]).unwrap();
    let info = logs
        .lines()
        .find(|l| l.starts_with("PCIDEVICE_VFPLANE_IO_EDGE_") && l.contains("_INFO="))
        .and_then(|l| l.split_once('=').map(|(_, v)| v.to_owned()))
        .expect("the VF's _INFO variable");
    let info: Value = serde_json::from_str(&info).expect("_INFO is JSON");
    let (vf, vf_info) = info
        .as_object()
        .and_then(|o| o.iter().next())
        .map(|(k, v)| (k.clone(), v.clone()))
        .expect("one VF in _INFO");
    assert_eq!(vf_info["mac"], MAC, "the claim's MAC in the pod's _INFO: {info}");
    // The agent's report, read back from the PF through netlink.
    let status = vf_status(session, &vf).expect("the VF in the NodeState");
    eprintln!("the configured VF in the NodeState: {status}");
    assert_eq!(
        (
            &status["mac"],
            &status["vlan"],
            &status["trust"],
            &status["spoofChk"]
        ),
        (
            &serde_json::json!(MAC),
            &serde_json::json!(120),
            &serde_json::json!(true),
            &serde_json::json!(false)
        ),
        "the PF reports the claim's settings for {vf}: {status}"
    );
    assert_eq!(
        status["health"], "Healthy",
        "the claim's settings are no mismatch: {status}"
    );
    let prepared = prepare_times(session);
    // The claim's profile over the pool's (lockedMemory 64Mi, pids 256):
    // what the runtime gave the container, as the agent read it from the
    // container's /proc and cgroup.
    wait_for(
        session,
        "the container under its claim's profile in the VF's status",
        Duration::from_secs(90),
        |s| {
            vf_status(s, &vf).is_some_and(|v| {
                v["container"]["lockedMemory"] == "100663296" && v["container"]["pidsMax"] == "128"
            })
        },
    );
    let container = vf_status(session, &vf).unwrap()["container"].clone();
    eprintln!("the configured VF's container: {container}");
    assert!(
        container["problems"].as_array().is_none_or(Vec::is_empty),
        "the container meets its claim's profile: {container}"
    );
    // More memory in the claim's profile than the pod's limit: refused by
    // the webhook, naming the claim's minimum.
    session
        .apply(&one_vf_configured(
            "one-vf-big",
            "              containerProfile:\n                memory: 256Mi",
        ))
        .unwrap();
    refused_by_the_webhook(
        session,
        "a pod below its claim's profile",
        &sleeping_pod("dra-too-small", "one-vf-big"),
        "container \"holder\" asks for VFs of pool edge through claim \"vfs\", whose policy and claim require \
         resources.limits.memory of at least \"256Mi\"; it has \"128Mi\", which is less",
    );

    let released = Instant::now();
    session
        .kubectl(&["delete", "pod", "dra-configured", "--wait=true"])
        .unwrap();
    wait_for(
        session,
        "the configured VF scrubbed back to its pool's settings",
        Duration::from_secs(120),
        |s| {
            vf_status(s, &vf).is_some_and(|v| {
                v["vlan"] == 0 && v["trust"] == false && v["spoofChk"] == true && v["mac"] != MAC
            }) && device_taints(s, &vf.replace([':', '.'], "-")).is_some_and(|t| t.is_empty())
        },
    );
    let restored_after = released.elapsed();
    assert!(!session.vf_handed_out(&vf).unwrap(), "VF {vf} scrubbed");
    eprintln!(
        "the VF after its scrub: {}",
        vf_status(session, &vf).unwrap_or_default()
    );

    // Out of range: the webhook, which reads the pod's claim templates,
    // refuses the pod naming the field.
    session
        .apply(&one_vf_configured("one-vf-bad-vlan", "              vlan: 5000"))
        .unwrap();
    refused_by_the_webhook(
        session,
        "a pod whose claim's VfConfig vfplane cannot take",
        &sleeping_pod("dra-bad-settings", "one-vf-bad-vlan"),
        "container \"holder\" uses claim \"vfs\": config[0] is not a VfConfig vfplane takes: vlan 5000 is out of \
         range (0 to 4094; 0 for none)",
    );
    // A pod admitted before its template exists (the webhook cannot read
    // it, and warns): prepare refuses the claim, the reason in the pod's
    // events.
    session
        .apply(&sleeping_pod("dra-bad-settings", "one-vf-bad-vlan-late"))
        .unwrap();
    session
        .apply(&one_vf_configured(
            "one-vf-bad-vlan-late",
            "              vlan: 5000",
        ))
        .unwrap();
    session
        .wait("the refusal in the pod's events", Duration::from_secs(120), |c| {
            Ok(c.kubectl_output(&["describe", "pod", "dra-bad-settings"])
                .is_ok_and(|d| d.contains("vlan 5000 is out of range")))
        })
        .expect("the prepare refusal shown by kubectl describe pod");
    let described = session.kubectl(&["describe", "pod", "dra-bad-settings"]).unwrap();
    assert!(
        described.contains("config[0] (from the claim) is not a VfConfig of vfplane.io/v1alpha1"),
        "{described}"
    );
    assert_eq!(
        session.jsonpath(&["get", "pod", "dra-bad-settings", "-o=jsonpath={.status.phase}"]),
        "Pending"
    );
    session
        .kubectl(&["delete", "pod", "dra-bad-settings", "--wait=true"])
        .unwrap();

    eprintln!(
        "cluster_dra: claim with VfConfig applied -> pod running {:.1} s (prepare {} ms, the agent's answer \
         included); pod delete issued -> VF back to its pool's settings and untainted {:.1} s",
        to_running.as_secs_f64(),
        prepared.last().copied().unwrap_or_default(),
        restored_after.as_secs_f64()
    );
}

/// Two VFs under one PCIe root: the pod gets both; one unbound is
/// Unhealthy and tainted until the agent binds it again; the plugin killed
/// and restarted keeps the claim and unprepares it; both VFs scrubbed.
fn two_vfs_through_an_unbind_and_a_plugin_kill(session: &mut Session) {
    let prepared_before = prepare_times(session).len();
    session
        .apply(&two_vfs_sharing(
            "two-vfs-one-root",
            "edge",
            "resource.kubernetes.io/pcieRoot",
        ))
        .unwrap();
    let (to_running, logs, vfs) = run_sleeping_pod(session, "dra-pair", "two-vfs-one-root", "edge");
    assert_eq!(
        vfs,
        ["0000:00:12.0", "0000:00:12.2"],
        "both VFs in the pod's environment:\n{logs}"
    );
    let nodes = logs
        .lines()
        .find_map(|l| l.strip_prefix("vfio-nodes:"))
        .unwrap_or_default()
        .split_whitespace()
        .count();
    assert_eq!(nodes, 3, "vfio and both groups in the pod's /dev/vfio:\n{logs}");
    let all_healthy: Vec<(String, String)> = vfs
        .iter()
        .map(|vf| (format!("vfplane.io/vf={vf}"), "Healthy".to_owned()))
        .collect();
    wait_for(
        session,
        "both VFs Healthy in the pod's status",
        Duration::from_secs(60),
        |s| pod_health(s, "dra-pair") == all_healthy,
    );

    // Unbound with the agent paused (it would bind the VF again at once):
    // Unhealthy and tainted; the agent resumed binds it, both clear.
    let vf = vfs[0].clone();
    let device = vf.replace([':', '.'], "-");
    assert_eq!(
        signal_node_processes(session, "vfplane-agent", "STOP"),
        1,
        "the agent paused"
    );
    let unbound = Instant::now();
    session
        .cluster_mut()
        .node_exec(&format!("echo {vf} > /sys/bus/pci/drivers/vfio-pci/unbind"))
        .unwrap();
    let mut tainted_after = None;
    let mut unhealthy_after = None;
    while tainted_after.is_none() || unhealthy_after.is_none() {
        if tainted_after.is_none()
            && device_taints(session, &device).is_some_and(|t| t.iter().any(|k| k == "vfplane.io/unhealthy"))
        {
            tainted_after = Some(unbound.elapsed());
        }
        if unhealthy_after.is_none()
            && pod_health(session, "dra-pair")
                .iter()
                .any(|(id, health)| id.ends_with(&vf) && health == "Unhealthy")
        {
            unhealthy_after = Some(unbound.elapsed());
        }
        if unbound.elapsed() > Duration::from_secs(60) {
            signal_node_processes(session, "vfplane-agent", "CONT");
            panic!(
                "after unbinding {vf}: taint after {tainted_after:?}, Unhealthy after {unhealthy_after:?}\n{:?}\n{}",
                pod_health(session, "dra-pair"),
                session.pod_diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    session.kubectl(&["get", "resourceslices", "-o", "yaml"]).unwrap();
    session
        .kubectl(&[
            "get",
            "pod",
            "dra-pair",
            "-o=jsonpath={.status.containerStatuses[0].allocatedResourcesStatus}",
        ])
        .unwrap();
    let resumed = Instant::now();
    assert_eq!(
        signal_node_processes(session, "vfplane-agent", "CONT"),
        1,
        "the agent resumed"
    );
    wait_for(
        session,
        "the VF bound, Healthy and untainted again",
        Duration::from_secs(60),
        |s| {
            pod_health(s, "dra-pair") == all_healthy
                && device_taints(s, &device).is_some_and(|t| t.is_empty())
        },
    );
    let recovered_after = resumed.elapsed();
    let driver = session
        .cluster_mut()
        .node_exec(&format!("basename $(readlink /sys/bus/pci/devices/{vf}/driver)"))
        .unwrap();
    assert_eq!(driver.trim(), "vfio-pci", "the agent bound {vf} again");

    let prepared_in = prepare_times(session);
    assert_eq!(
        prepared_in.len(),
        prepared_before + 1,
        "one more claim prepared: {prepared_in:?}"
    );

    // The plugin killed with the claim prepared: the kubelet restarts it
    // and the new process knows the claim from its checkpoint.
    // (`comm` is the program name cut to 15 bytes.)
    assert_eq!(
        signal_node_processes(session, "vfplane-device-", "KILL"),
        1,
        "the plugin killed"
    );
    let killed = Instant::now();
    wait_for(
        session,
        "the plugin restarted with the claim from its checkpoint",
        Duration::from_secs(120),
        |s| {
            s.jsonpath(&[
                "logs",
                "-n",
                NAMESPACE,
                "daemonset/vfplane-node",
                "-c",
                "device-plugin",
            ])
            .lines()
            .any(|l| l.contains("DRA checkpoint read") && l.contains("prepared=1"))
        },
    );
    let restarted_after = killed.elapsed();
    session
        .kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])
        .unwrap();
    wait_for(
        session,
        "both VFs Healthy from the new plugin",
        Duration::from_secs(90),
        |s| pod_health(s, "dra-pair") == all_healthy,
    );
    let logs_after = session.kubectl(&["logs", "dra-pair"]).unwrap();
    assert_eq!(logs_after, logs, "the pod ran on untouched");

    let scrubs_before: Vec<usize> = vfs.iter().map(|vf| scrub_lines(session, vf)).collect();
    let deleted = Instant::now();
    session
        .kubectl(&["delete", "pod", "dra-pair", "--wait=true"])
        .unwrap();
    for (vf, before) in vfs.iter().zip(scrubs_before) {
        session.wait_scrubbed(vf, Duration::from_secs(120)).unwrap();
        assert_eq!(
            scrub_lines(session, vf),
            before + 1,
            "the agent logged one more scrub of {vf}"
        );
    }
    let scrubbed_after = deleted.elapsed();
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
        "cluster_dra: two-VF pod applied -> running {:.1} s (prepare {} ms); unbind -> tainted {:.1} s, -> Unhealthy in the pod's status {:.1} s; \
         agent resumed -> Healthy and untainted {:.1} s; plugin killed -> restarted with the claim {:.1} s; \
         pod deleted -> both VFs scrubbed {:.1} s",
        to_running.as_secs_f64(),
        prepared_in[prepared_before],
        tainted_after.unwrap_or_default().as_secs_f64(),
        unhealthy_after.unwrap_or_default().as_secs_f64(),
        recovered_after.as_secs_f64(),
        restarted_after.as_secs_f64(),
        scrubbed_after.as_secs_f64()
    );
}

/// The prepare times (ms) the plugin's current container logged.
fn prepare_times(session: &Session) -> Vec<u64> {
    session
        .jsonpath(&[
            "logs",
            "-n",
            NAMESPACE,
            "daemonset/vfplane-node",
            "-c",
            "device-plugin",
        ])
        .lines()
        .filter(|l| l.contains("claim prepared"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("took_ms=")))
        .filter_map(|ms| ms.parse().ok())
        .collect()
}

/// Polls `done` every 250 ms until it holds, or panics with the diagnostics.
fn wait_for(session: &Session, what: &str, timeout: Duration, mut done: impl FnMut(&Session) -> bool) {
    let began = Instant::now();
    while !done(session) {
        assert!(
            began.elapsed() < timeout,
            "{what}: not after {timeout:?}\n{}",
            session.pod_diagnostics()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
