//! Scrub on release, attribution and locked memory on the real cluster, as
//! a scenario on a session with vfplane installed by Helm: a pool of one
//! trusted VF (a tenant may change its MAC through the PF), so every tenant
//! gets the same VF. Every tenant runs as user 1000 with no capabilities
//! (no CAP_IPC_LOCK).
//!
//! - Tenant 0, without the profile's `lockedMemory`: the driver cannot pin
//!   its DMA memory and its error names the limit and the fix.
//! - Tenant 1, with it: vfplane's NRI plugin put RLIMIT_MEMLOCK and the
//!   pids bound into its spec (runc applied them before its first
//!   instruction) and the OCI hook gave it the VF's group node, so it runs
//!   the driver (DMA mapped). It changes the VF's MAC through the PF mailbox and is
//!   deleted while its receive rings run. While its pod lives the VF
//!   carries a handed-out mark and its owner (status, metrics); after the
//!   pod is deleted the agent scrubs the VF (function reset, the spec's
//!   settings written again and checked), the mark and owner go.
//! - Tenant 2 gets the same VF with the spec's MAC; of frames the host
//!   sends to tenant 1's MAC and to the spec's MAC, it receives only the
//!   latter.
//! - With the VF's reset methods disabled on the node (`reset_method`
//!   emptied, so sysfs `reset` fails), the scrub after tenant 2 fails: the
//!   VF is quarantined (status, Event, metric; the node's allocatable drops
//!   to 0) and tenant 3 stays Pending. Once the reset works again, the
//!   retried scrub releases the VF (Event) and tenant 3 runs on it.
//!
//! It runs on both nodes: the systemd one (systemd cgroup driver, static
//! CPU manager) in CI (`cluster_systemd`, before the DRA scenarios on the
//! same cluster), and the minimal one (cgroupfs) as a slow test
//! (`cluster_scrub`).
//!
//! The times it prints: pod applied and running to attributed, what the
//! OCI hook took per container, pod deleted to VF scrubbed, and quarantine
//! to release after the fault is cleared.

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::cluster::NODE_NAME;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::session::{Session, events, node_vf_statuses};
use xtask::testbed::wire::test_frame;

const POOL: &str = "solo";
/// The MAC tenant 1 gives the VF through the PF mailbox.
const TENANT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x01];
const TENANT_MAC_TEXT: &str = "02:00:00:00:01:01";
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];

/// The pool's policy, with or without `containerProfile.lockedMemory`.
fn policy(locked_memory: bool) -> String {
    let profile = if locked_memory {
        "  containerProfile:\n    lockedMemory: 64Mi\n    pids: 64\n"
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
  trust: true
{profile}"#
    )
}

/// A pod of user 1000 without capabilities that prints its user, its
/// effective capabilities and its locked-memory limit, then runs
/// `program` (a driver example) and sleeps.
fn tenant(name: &str, program: &str) -> String {
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
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", "echo uid $(id -u); grep CapEff /proc/self/status; grep 'locked memory' /proc/self/limits; {program} ; exec sleep 86400"]
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
      resources:
        limits:
          vfplane.io/{POOL}: 1
"#
    )
}

/// What keeps a VF container from being created without its profile while
/// vfplane's NRI plugin is away (a runtime or plugin restart), which no
/// test can time: the webhook named vfplane's plugin as required for
/// tenant-1's container, and the node's runtime refuses to create a
/// container whose required plugin is not registered (shown with a plugin
/// that never registers), which the kubelet reports and retries.
fn nri_guard(session: &mut Session) {
    let required = session.jsonpath(&[
        "get",
        "pod",
        "tenant-1",
        r"-o=jsonpath={.metadata.annotations.required-plugins\.noderesource\.dev/container\.app}",
    ]);
    assert_eq!(
        required, r#"["vfplane"]"#,
        "the webhook's NRI annotation on tenant-1"
    );
    session
        .apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: needs-absent-plugin
  annotations:
    required-plugins.noderesource.dev/container.app: '["vfplane-absent"]'
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sleep", "86400"]
"#
        ))
        .unwrap();
    session
        .wait(
            "the runtime refusing a container whose required NRI plugin is absent",
            Duration::from_secs(120),
            |c| {
                Ok(c.kubectl_output(&[
                    "get",
                    "events",
                    "--field-selector=involvedObject.name=needs-absent-plugin",
                    "-o=jsonpath={.items[*].message}",
                ])
                .is_ok_and(|m| m.contains(r#"required plugin "vfplane-absent" not present"#)))
            },
        )
        .unwrap();
    assert_ne!(
        session.jsonpath(&["get", "pod", "needs-absent-plugin", "-o=jsonpath={.status.phase}"]),
        "Running"
    );
    session
        .kubectl(&["delete", "pod", "needs-absent-plugin", "--wait=true"])
        .unwrap();
}

/// The first JSON line of `tool` in the pod's log that `wanted` accepts;
/// a line with an `error` fails the test.
fn report(session: &mut Session, pod: &str, tool: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let line = session
        .driver_report(pod, tool, wanted)
        .expect("the driver reports");
    assert!(line.get("error").is_none(), "{pod}: {line}");
    line
}

/// The pod's log line starting with `prefix`, split in words.
fn log_words(session: &Session, pod: &str, prefix: &str) -> Vec<String> {
    let logs = session.cluster().kubectl_output(&["logs", pod]).unwrap();
    logs.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The VF's entry in the NodeState status.
fn vf_status(session: &Session, vf: &str) -> Value {
    node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .find(|v| v["pciAddress"] == vf)
        .unwrap_or(Value::Null)
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// The scenario, on a session with vfplane installed (the chart's
/// defaults, with or without `dra.enabled`); it leaves the pool's policy
/// and tenant 3 in place ([`clean_up`] removes them).
pub fn scrub_and_quarantine(session: &mut Session) {
    session.apply(&policy(false)).expect("policy");
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(300))
        .expect("the pool");

    // Without the profile's locked memory, the driver of a non-root
    // container cannot pin its DMA memory under the runtime's 8 MiB
    // default, and says so.
    session
        .apply(&tenant("tenant-0", "pktgen --count 200 --size 60"))
        .unwrap();
    session
        .wait("tenant-0's driver error", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "tenant-0"])
                .is_ok_and(|l| l.contains("\"error\"")))
        })
        .unwrap();
    let logs = session.cluster().kubectl_output(&["logs", "tenant-0"]).unwrap();
    assert!(
        logs.contains("uid 1000") && logs.contains("CapEff:\t0000000000000000"),
        "tenant 0 is user 1000 without capabilities:\n{logs}"
    );
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

    // With it, the CDI spec names the hook with the limits for the VF.
    session.apply(&policy(true)).expect("policy with lockedMemory");
    session
        .wait("the OCI hook in the CDI spec", Duration::from_secs(120), |c| {
            Ok(c.kubectl_output(&[
                "get",
                "nodestate",
                NODE_NAME,
                "-o=jsonpath={.spec.pfs[0].vfGroups[0].containerLimits.lockedMemoryBytes}",
            ])
            .is_ok_and(|v| v.trim() == "67108864"))
        })
        .unwrap();
    let cdi = |session: &mut Session| {
        session
            .cluster_mut()
            // Inside the node's root: /var/run is a link to /run on the
            // systemd node, which /proc/1/root/var/run would resolve in
            // the shell's own root.
            .node_exec("chroot /proc/1/root cat /var/run/cdi/vfplane.io-vf.json")
            .unwrap_or_default()
    };
    let began = Instant::now();
    while !cdi(session).contains("\"67108864\"") {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no hook in the CDI spec:\n{}",
            cdi(session)
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Tenant 1: the driver runs (DMA mapped) as user 1000, changes the
    // VF's MAC through the PF and keeps its receive rings running.
    let applied = Instant::now();
    session
        .apply(&tenant(
            "tenant-1",
            &format!("rxcount --mac {TENANT_MAC_TEXT} --count 100000000 --timeout 86400"),
        ))
        .unwrap();
    let ready = report(session, "tenant-1", "rxcount", |v| v["event"] == "ready");
    let running = Instant::now();
    nri_guard(session);
    assert_eq!(
        log_words(session, "tenant-1", "Max locked memory"),
        ["Max", "locked", "memory", "67108864", "67108864", "bytes"],
        "the hook raised the container's limit before its first instruction"
    );
    assert_eq!(log_words(session, "tenant-1", "uid"), ["uid", "1000"]);
    assert_eq!(
        log_words(session, "tenant-1", "CapEff:"),
        ["CapEff:", "0000000000000000"],
        "no CAP_IPC_LOCK"
    );
    assert_eq!(
        ready["mac"], TENANT_MAC_TEXT,
        "the PF took tenant 1's MAC: {ready}"
    );
    let vf = ready["pci"].as_str().unwrap().to_owned();
    assert!(
        session.vf_handed_out(&vf).unwrap(),
        "a VF handed out carries its mark"
    );
    // Its owner: pod UID and container from the hook's record and the
    // container's cgroup, in the VF's status and the agent's metrics.
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
    eprintln!(
        "tenant 1 attributed: {:.1} s after its pod was applied, {:.1} s after its driver was seen running \
         (the test polls the NodeState every 0.5 s)",
        applied.elapsed().as_secs_f64(),
        running.elapsed().as_secs_f64()
    );
    let status = vf_status(session, &vf);
    assert_eq!(status["owner"], "default/tenant-1/app", "{status}");
    let container = status["container"].clone();
    assert_eq!(container["lockedMemory"], "67108864", "{container}");
    assert_eq!(
        container["pidsMax"], "64",
        "the NRI plugin bounded the container's tasks: {container}"
    );
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
    let metrics = session.agent_metrics().unwrap();
    let owner_series = format!(
        r#"vf="{vf}",pool="{POOL}",health="healthy",namespace="default",pod="tenant-1",container="app",pod_uid="{uid}"}} 1"#
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("vfplane_agent_vf_info{") && l.ends_with(&owner_series)),
        "the owner in the VF's metric labels:\n{metrics}"
    );
    let record = session
        .cluster_mut()
        .node_exec(&format!(
            "cat /proc/1/root/run/vfplane/containers/{}.json",
            container["id"].as_str().unwrap()
        ))
        .unwrap();
    let record: Value = serde_json::from_str(record.trim()).unwrap();
    eprintln!(
        "OCI hook time for tenant 1's container (the spec's check, device owner, record): {} us",
        record["hookMicros"]
    );
    // The pod holds the VF: no scrub, though frames keep arriving.
    let link = session.cluster().guest().pf_link(0).unwrap();
    for seq in 0..50 {
        link.send_frame(&test_frame(TENANT_MAC, HOST_MAC, 1000 + seq, 60))
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        session.vf_handed_out(&vf).unwrap(),
        "not scrubbed while its pod lives"
    );

    // Released, its rings running and its MAC changed: scrubbed.
    session
        .kubectl(&["delete", "pod", "tenant-1", "--wait=true"])
        .unwrap();
    let scrubbed_after = session.wait_scrubbed(&vf, Duration::from_secs(120)).unwrap();
    eprintln!(
        "pod deleted -> VF {vf} scrubbed: {:.1} s",
        scrubbed_after.as_secs_f64()
    );
    let log = session.agent_log();
    assert!(
        log.lines().any(|l| l.contains("VF scrubbed") && l.contains(&vf)),
        "the agent logged the scrub of {vf}:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("function reset") && l.contains(&vf)),
        "the scrub reset the function:\n{log}"
    );
    session
        .wait("the owner gone from the status", Duration::from_secs(60), |c| {
            Ok(node_vf_statuses(c)?
                .iter()
                .any(|v| v["pciAddress"] == vf.as_str() && v["owner"].is_null() && v["container"].is_null()))
        })
        .unwrap();
    let metrics = session.agent_metrics().unwrap();
    assert!(
        !metrics.contains("tenant-1"),
        "the owner gone from the metrics:\n{metrics}"
    );
    assert!(
        metrics.contains(r#"vfplane_agent_scrubs_total{result="scrubbed"}"#),
        "{metrics}"
    );

    // Tenant 2 gets the same VF with the spec's MAC, and of the frames the
    // host sends to tenant 1's MAC and to the spec's, only the latter.
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(60))
        .unwrap();
    session
        .apply(&tenant("tenant-2", "rxcount --count 150 --timeout 30"))
        .unwrap();
    let ready = report(session, "tenant-2", "rxcount", |v| v["event"] == "ready");
    assert_eq!(ready["pci"], vf.as_str(), "the pool has one VF");
    let spec_mac = vf_status(session, &vf)["mac"].as_str().unwrap().to_owned();
    assert_ne!(spec_mac, TENANT_MAC_TEXT);
    assert_eq!(ready["mac"], spec_mac.as_str(), "the spec's MAC after the scrub");
    let link = session.cluster().guest().pf_link(0).unwrap();
    for seq in 0..50 {
        link.send_frame(&test_frame(TENANT_MAC, HOST_MAC, 1000 + seq, 60))
            .unwrap();
    }
    for seq in 0..100 {
        link.send_frame(&test_frame(parse_mac(&spec_mac), HOST_MAC, seq, 60))
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = report(session, "tenant-2", "rxcount", |v| v.get("received").is_some());
    assert_eq!(
        (&second["received"], &second["unique"], &second["bad"]),
        (&Value::from(100), &Value::from(100), &Value::from(0)),
        "the spec's 100 frames and none of the 50 to tenant 1's MAC: {second}"
    );

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
    session
        .wait("the quarantine Event", Duration::from_secs(60), |c| {
            // About the NodeState, cluster-scoped: its Events are in default.
            Ok(events(c, "default", "VfQuarantined")?.iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|n| n.contains(&vf) && n.contains("function reset failed"))
            }))
        })
        .unwrap();
    assert!(
        session
            .agent_metrics()
            .unwrap()
            .lines()
            .any(|l| l.starts_with("vfplane_agent_vf_info{")
                && l.contains(&format!(r#"vf="{vf}""#))
                && l.contains(r#"health="quarantined""#)),
        "quarantined in the metrics"
    );
    session
        .apply(&tenant("tenant-3", "pktgen --count 200 --size 60"))
        .unwrap();
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
    let third = report(session, "tenant-3", "pktgen", |v| v.get("sent").is_some());
    assert_eq!(third["pci"], vf.as_str());
    assert_eq!(third["mac"], spec_mac.as_str());
    assert_eq!(third["hw_tx_packets"], 200, "{third}");
    eprintln!(
        "quarantined -> released and handed to tenant 3: {:.1} s (retry every 30 s)",
        quarantined.elapsed().as_secs_f64()
    );
    session
        .wait("the release Event", Duration::from_secs(60), |c| {
            Ok(events(c, "default", "VfReleased")?
                .iter()
                .any(|e| e["message"].as_str().is_some_and(|n| n.contains(&vf))))
        })
        .unwrap();
}

/// Removes what [`scrub_and_quarantine`] left: tenant 3 (its VF scrubbed)
/// and the pool's policy, until the node's PF is back to 0 VFs.
pub fn clean_up(session: &mut Session) {
    let vf = session.jsonpath(&[
        "get",
        "nodestate",
        NODE_NAME,
        "-o=jsonpath={.status.pfs[0].vfs[0].pciAddress}",
    ]);
    session
        .kubectl(&["delete", "pod", "tenant-3", "--wait=true"])
        .unwrap();
    session.wait_scrubbed(&vf, Duration::from_secs(120)).unwrap();
    session
        .kubectl(&["delete", "vfpolicy", POOL, "--wait=true", "--timeout=300s"])
        .unwrap();
    session.wait_pf_without_vfs(Duration::from_secs(300)).unwrap();
}
