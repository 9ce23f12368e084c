//! A `numVfs` change rolled out over a node where a pod holds a VF, on the
//! real cluster: the policy's `rollout` evicts that pod (and only it)
//! through the Eviction API, a PodDisruptionBudget holds the eviction back
//! until it allows it, and the pod's replacement gets a VF of the new set,
//! with the spec's settings.
//!
//! - A Deployment's pod (user 1000, no capabilities, the pool's locked
//!   memory) runs the driver on the pool's one VF with its rings running,
//!   and gives the VF its own MAC through the PF (the pool's VFs are
//!   trusted). A budget says one such pod must be available.
//! - The policy goes from 1 VF to 2, `rollout: {maxUnavailableNodes: 1,
//!   evictPods: true}`. The agent cannot re-create the VFs while the pod
//!   holds one; it stops handing that VF out. The controller's eviction
//!   meets the budget: the policy's status shows the node waiting on it,
//!   with an Event, and the pod keeps running.
//! - The budget lets one pod go: the controller evicts the pod (an Event on
//!   it), the agent re-creates the VFs, and the replacement pod runs the
//!   driver on a VF of the new set; the old VF's handed-out mark went
//!   through a scrub. The policy's status says done,
//!   with an Event.
//!
//! The times it prints: budget relaxed to pod evicted, to the VFs
//! re-created, to the replacement's driver running.

use std::time::{Duration, Instant};

use serde_json::Value;
use xtask::cluster::NODE_NAME;
use xtask::cluster::images::VFPLANE_IMAGE;
use xtask::session::{Session, events, node_vf_statuses};

const POOL: &str = "rolling";
const TENANT_MAC: &str = "02:00:00:00:02:02";

fn policy(num_vfs: u16) -> String {
    format!(
        r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: {POOL}
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: {num_vfs}
  deviceType: vfio-pci
  resourceName: {POOL}
  trust: true
  containerProfile:
    lockedMemory: 64Mi
    pids: 64
  rollout:
    maxUnavailableNodes: 1
    evictPods: true
"#
    )
}

/// The Deployment whose pod holds a VF with its driver running.
fn deployment() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: pmd
spec:
  replicas: 1
  selector:
    matchLabels: {{app: pmd}}
  template:
    metadata:
      labels: {{app: pmd}}
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
          command: ["sh", "-c", "rxcount --mac {TENANT_MAC} --count 100000000 --timeout 86400; exec sleep 86400"]
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

fn budget(min_available: u32) -> String {
    format!(
        r#"apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: pmd
spec:
  minAvailable: {min_available}
  selector:
    matchLabels: {{app: pmd}}
"#
    )
}

/// The running pods of the Deployment: `(name, uid)`.
fn pmd_pods(session: &Session) -> Vec<(String, String)> {
    let text = session.jsonpath(&["get", "pods", "-l", "app=pmd", "-o", "json"]);
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                p["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The first `rxcount` line of `pod`'s log saying it is ready.
fn driver_ready(session: &mut Session, pod: &str) -> Value {
    let line = session
        .driver_report(pod, "rxcount", |v| v["event"] == "ready")
        .expect("the driver reports");
    assert!(line.get("error").is_none(), "{pod}: {line}");
    line
}

fn rollout_status(session: &Session) -> Value {
    let text = session.jsonpath(&["get", "vfpolicy", POOL, "-o=jsonpath={.status.rollout}"]);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// The scenario, on a session with vfplane installed and the node's first
/// PF at 0 VFs; it leaves the PF at 0 VFs again.
pub fn evict_through_a_budget(session: &mut Session) {
    session.apply(&policy(1)).expect("policy");
    session
        .wait_allocatable(POOL, 1, Duration::from_secs(300))
        .expect("the pool");
    session.apply(&budget(1)).expect("budget");
    session.apply(&deployment()).expect("deployment");
    session
        .wait("the pmd pod", Duration::from_secs(120), |c| {
            Ok(c.kubectl_output(&["get", "pods", "-l", "app=pmd", "-o=name"])
                .is_ok_and(|n| !n.trim().is_empty()))
        })
        .unwrap();
    let (first, first_uid) = pmd_pods(session).remove(0);
    let ready = driver_ready(session, &first);
    let old_vf = ready["pci"].as_str().unwrap().to_owned();
    assert_eq!(ready["mac"], TENANT_MAC, "the tenant's MAC on its VF: {ready}");
    session
        .wait("the pod as the VF's owner", Duration::from_secs(60), |c| {
            Ok(node_vf_statuses(c)?
                .iter()
                .any(|v| v["pciAddress"] == old_vf.as_str() && v["ownerPodUid"] == first_uid.as_str()))
        })
        .unwrap();

    // 1 -> 2 VFs: the budget refuses the eviction; the pod keeps its VF.
    session.apply(&policy(2)).expect("the change");
    session
        .wait(
            "the policy's status: the node waiting on the budget",
            Duration::from_secs(120),
            |c| {
                let text = c.kubectl_output(&["get", "vfpolicy", POOL, "-o=jsonpath={.status.rollout}"])?;
                let rollout: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                Ok(rollout["nodesWaitingOnPdb"] == 1)
            },
        )
        .unwrap_or_else(|error| {
            let objects = session.jsonpath(&["get", "vfpolicy,nodestate", "-o", "yaml"]);
            panic!("{error:#}\n--- the policy and the NodeState ---\n{objects}")
        });
    let rollout = rollout_status(session);
    let blocked = &rollout["blocked"][0];
    assert_eq!(blocked["node"], NODE_NAME, "{rollout}");
    assert_eq!(blocked["reason"], "WaitingOnPdb", "{rollout}");
    assert!(
        blocked["message"].as_str().unwrap_or_default().contains(&first)
            && blocked["message"]
                .as_str()
                .unwrap_or_default()
                .contains("disruption budget"),
        "the pod and the budget named: {rollout}"
    );
    assert_eq!(rollout["nodesInProgress"], 1, "{rollout}");
    session
        .wait("the WaitingOnPdb Event", Duration::from_secs(60), |c| {
            Ok(!events(c, "default", "WaitingOnPdb")?.is_empty())
        })
        .unwrap();
    let held = node_vf_statuses(session.cluster())
        .unwrap()
        .into_iter()
        .find(|v| v["pciAddress"] == old_vf.as_str())
        .unwrap_or(Value::Null);
    assert!(
        held["health"]
            .as_str()
            .is_some_and(|h| h.contains("to be re-created")),
        "the held VF is handed out no more: {held}"
    );
    assert_eq!(session.allocatable(POOL), "0", "no VF of the old set is offered");
    assert_eq!(
        pmd_pods(session),
        [(first.clone(), first_uid.clone())],
        "the pod runs on"
    );
    assert_eq!(
        session.jsonpath(&[
            "get",
            "nodestate",
            NODE_NAME,
            "-o=jsonpath={.status.pfs[0].numVfs}"
        ]),
        "1",
        "the VFs are not re-created under the pod"
    );

    // The budget lets one go: evicted, re-created, the replacement runs.
    let relaxed = Instant::now();
    session.apply(&budget(0)).expect("budget relaxed");
    session
        .wait("the pod evicted", Duration::from_secs(120), |c| {
            Ok(!events(c, "default", "EvictedForVfChange")?.is_empty())
        })
        .unwrap();
    let evicted = relaxed.elapsed();
    session
        .wait("the PF at 2 VFs", Duration::from_secs(180), |c| {
            Ok(c.kubectl_output(&[
                "get",
                "nodestate",
                NODE_NAME,
                "-o=jsonpath={.status.pfs[0].numVfs}",
            ])
            .is_ok_and(|n| n.trim() == "2"))
        })
        .unwrap();
    let recreated = relaxed.elapsed();
    let replacement = loop {
        let pods = pmd_pods(session);
        if let Some((name, _)) = pods.iter().find(|(_, uid)| *uid != first_uid) {
            break name.clone();
        }
        assert!(
            relaxed.elapsed() < Duration::from_secs(300),
            "no replacement: {pods:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let ready = driver_ready(session, &replacement);
    let running = relaxed.elapsed();
    let new_vf = ready["pci"].as_str().unwrap().to_owned();
    let statuses = node_vf_statuses(session.cluster()).unwrap();
    let status = statuses
        .iter()
        .find(|v| v["pciAddress"] == new_vf.as_str())
        .unwrap_or(&Value::Null);
    assert_eq!(status["pool"], POOL, "a VF of the new set: {status}");
    assert!(
        session.agent_logged_scrub(&old_vf),
        "the old tenant's VF went through a scrub:\n{}",
        session.agent_log()
    );
    let events_on_pod = events(session.cluster(), "default", "EvictedForVfChange").unwrap();
    assert!(
        events_on_pod
            .iter()
            .any(|e| e["involvedObject"]["name"] == first.as_str()
                && e["message"].as_str().is_some_and(|m| m.contains(&old_vf))),
        "the Event on the evicted pod names its VF: {events_on_pod:?}"
    );
    session
        .wait("the policy's rollout done", Duration::from_secs(60), |c| {
            let text = c.kubectl_output(&["get", "vfpolicy", POOL, "-o=jsonpath={.status.rollout}"])?;
            let rollout: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            Ok(rollout["nodesDone"] == 1 && rollout["nodesInProgress"] == 0 && rollout["nodesPending"] == 0)
        })
        .unwrap();
    session
        .wait("the RolloutComplete Event", Duration::from_secs(60), |c| {
            Ok(!events(c, "default", "RolloutComplete")?.is_empty())
        })
        .unwrap();
    eprintln!(
        "budget relaxed -> pod evicted {:.1} s, -> VFs re-created {:.1} s, -> replacement's driver running {:.1} s \
         (VF {old_vf} -> {new_vf})",
        evicted.as_secs_f64(),
        recreated.as_secs_f64(),
        running.as_secs_f64(),
    );

    // Clean up: the PF back to 0 VFs.
    session
        .kubectl(&["delete", "deployment", "pmd", "--wait=true"])
        .unwrap();
    session.kubectl(&["delete", "pdb", "pmd"]).unwrap();
    session.wait_scrubbed(&new_vf, Duration::from_secs(120)).unwrap();
    session
        .kubectl(&["delete", "vfpolicy", POOL, "--wait=true", "--timeout=300s"])
        .unwrap();
    session.wait_pf_without_vfs(Duration::from_secs(300)).unwrap();
}
