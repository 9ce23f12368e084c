//! The demo: the path of one VF to a pod on the real cluster, the way a
//! user gets there: `helm install`, a VfPolicy, a Deployment asking for the
//! pool. Every command a user would type (kubectl, helm) is echoed as it
//! runs, each step is timed, and the host counts the frames the pod's
//! driver sends on the PF's wire. Any failed step, and fewer frames counted
//! than sent, is an error.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cluster::images::VFPLANE_IMAGE;
use crate::cluster::{ClusterOptions, NODE_NAME};
use crate::session::{NAMESPACE, Session};
use crate::testbed::Testbed;
use crate::testbed::wire::ETHERTYPE_TEST;

/// The policy's name and pool.
const POLICY: &str = "fast-io";
const POOL: &str = "fast";
const FRAMES: u32 = 2000;

/// What the demo did, for the closing table.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    /// The VfPolicy.
    pub policy: String,
    /// The node.
    pub node: String,
    /// VFs the policy made ready.
    pub vfs: u64,
    /// The pod that got a VF.
    pub pod: String,
    /// The VF it got.
    pub vf: String,
    /// Its owner as the node's status named it.
    pub owner: String,
    /// Whether the agent scrubbed the VF after the pod was deleted.
    pub scrubbed: bool,
    /// The pod's RLIMIT_MEMLOCK (soft) in bytes, from its /proc/self/limits.
    pub locked_memory: String,
    /// What the pod's /dev/vfio holds.
    pub vfio_nodes: String,
    /// Frames the pod's driver sent (its VF's own TX counter).
    pub frames_sent: u64,
    /// Frames the host counted on the PF's wire.
    pub frames_counted: u64,
    /// Seconds each step took, in order.
    pub steps: Vec<(String, f64)>,
    /// Milestones: helm install to pods Ready, policy to allocatable, pod to first frame.
    pub milestones: Vec<(String, f64)>,
    /// The webhook's answers to the two bad objects.
    pub refusals: Vec<String>,
    /// The VF the DRA claim got.
    pub dra_vf: String,
    /// Its health in the claim pod's status, as the kubelet showed it.
    pub dra_health: String,
    /// Frames the claim pod's driver sent (its VF's own TX counter).
    pub dra_frames_sent: u64,
    /// Whether the agent scrubbed the claim's VF after its pod.
    pub dra_scrubbed: bool,
}

impl DemoReport {
    /// The closing table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let rows = [
            ("policy", self.policy.clone()),
            ("node", self.node.clone()),
            ("VFs ready", self.vfs.to_string()),
            ("pod", self.pod.clone()),
            ("VF given", self.vf.clone()),
            ("its owner (NodeState status)", self.owner.clone()),
            ("its locked-memory limit", self.locked_memory.clone()),
            ("its /dev/vfio", self.vfio_nodes.clone()),
            (
                "scrubbed after the pod",
                if self.scrubbed { "yes" } else { "no" }.to_owned(),
            ),
            ("frames sent (VF counter)", self.frames_sent.to_string()),
            ("frames counted on the wire", self.frames_counted.to_string()),
            ("DRA: VF claimed", self.dra_vf.clone()),
            ("DRA: its health (pod status)", self.dra_health.clone()),
            ("DRA: frames sent", self.dra_frames_sent.to_string()),
            (
                "DRA: scrubbed after the pod",
                if self.dra_scrubbed { "yes" } else { "no" }.to_owned(),
            ),
        ];
        for (name, value) in rows {
            out.push_str(&format!("  {name:<30} {value}\n"));
        }
        for (name, seconds) in self.milestones.iter().chain(&self.steps) {
            out.push_str(&format!("  {name:<30} {seconds:>7.1} s\n"));
        }
        out
    }
}

struct Demo {
    session: Session,
    step: usize,
    report: DemoReport,
}

const STEPS: usize = 8;

impl Demo {
    fn begin(&mut self, title: &str) -> Instant {
        self.step += 1;
        eprintln!("\n== [{}/{STEPS}] {title}", self.step);
        Instant::now()
    }

    fn end(&mut self, title: &str, began: Instant) {
        let seconds = began.elapsed().as_secs_f64();
        eprintln!("   ({title}: {seconds:.1} s)");
        self.report.steps.push((title.to_owned(), seconds));
    }
}

fn policy_yaml(num_vfs: u32, name: &str) -> String {
    format!(
        r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: {name}
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: {num_vfs}
  deviceType: vfio-pci
  resourceName: {POOL}
  containerProfile:
    cpu: "1"
    memory: 128Mi
    lockedMemory: 64Mi
"#
    )
}

fn deployment_yaml() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: pktgen
spec:
  replicas: 1
  selector:
    matchLabels: {{app: pktgen}}
  template:
    metadata:
      labels: {{app: pktgen}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: pktgen
          image: {VFPLANE_IMAGE}
          imagePullPolicy: IfNotPresent
          # The VF comes from PCIDEVICE_VFPLANE_IO_FAST alone.
          command: ["sh", "-c", "echo vfio-nodes: $(ls /dev/vfio); grep 'locked memory' /proc/self/limits; pktgen --count {FRAMES} --size 60 --dst 02:00:00:00:00:aa && exec sleep 86400"]
          resources:
            limits:
              vfplane.io/{POOL}: 1
              cpu: "1"
              memory: 128Mi
"#
    )
}

/// A ResourceClaimTemplate for one VF of `pool` and a pod that claims it
/// through the template: non-root, no capabilities. It shows its
/// environment, `/dev/vfio` and locked-memory limit, then runs pktgen on
/// the VF (found from its `PCIDEVICE_VFPLANE_IO_<POOL>_<device>` variable).
pub fn claim_pod_yaml(pod: &str, pool: &str, frames: u32) -> String {
    let template =
        crate::claims::vf_claim_template("one-vf", "vf", 1, &crate::claims::pool_selector(pool), "");
    format!(
        r#"{template}---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
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
      command: ["sh", "-c", "env | grep ^PCIDEVICE_ | sort; echo vfio-nodes: $(ls /dev/vfio); grep 'locked memory' /proc/self/limits; pktgen --count {frames} --size 60 --dst 02:00:00:00:00:aa && exec sleep 86400"]
      resources:
        claims:
          - name: vf
        limits:
          cpu: "1"
          memory: 128Mi
"#
    )
}

fn bad_pod_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: no-limits
spec:
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      command: ["sleep", "60"]
      resources:
        limits:
          vfplane.io/{POOL}: 1
"#
    )
}

/// Runs the whole demo and returns its report.
///
/// # Errors
/// The first step that fails, with the diagnostics of the parts involved;
/// also when the host counted fewer frames than the pod's VF sent.
pub fn run(testbed: &Testbed) -> Result<DemoReport> {
    run_keeping_cluster(testbed).map(|(report, _cluster)| report)
}

/// [`run`], then the cluster it ran on (vfplane uninstalled, the PF at 0
/// VFs), for tests that go on on the same node instead of booting another.
///
/// # Errors
/// As [`run`].
pub fn run_keeping_cluster(testbed: &Testbed) -> Result<(DemoReport, Session)> {
    eprintln!(
        "\n== [1/{STEPS}] A real cluster: Kubernetes control plane on the host, the emulated SR-IOV guest as its node (systemd, two NUMA nodes, a PF on each)"
    );
    let began = Instant::now();
    let session = Session::start(testbed, ClusterOptions::two_numa_systemd())?;
    let mut demo = Demo {
        session,
        step: 1,
        report: DemoReport {
            policy: POLICY.to_owned(),
            node: NODE_NAME.to_owned(),
            ..DemoReport::default()
        },
    };
    demo.session.kubectl(&["get", "nodes", "-o", "wide"])?;
    demo.end("cluster up, node Ready", began);
    let wire = demo.session.cluster().guest().listen_wire(0)?;

    // 2. helm install.
    let began = demo.begin("Install vfplane with Helm (CRDs, controller, node DaemonSet, RBAC, webhook)");
    let install = Instant::now();
    demo.session.install_vfplane()?;
    let ready = install.elapsed().as_secs_f64();
    demo.report
        .milestones
        .push(("helm install -> pods Ready".to_owned(), ready));
    demo.session
        .kubectl(&["get", "pods", "-n", NAMESPACE, "-o", "wide"])?;
    demo.end("helm install", began);

    // 3. The policy.
    let began = demo.begin("A VfPolicy: two vfio-pci VFs of the node's PF in pool `fast`");
    demo.session.apply(&policy_yaml(2, POLICY))?;
    let applied = Instant::now();
    demo.session.wait(
        "vfplane.io/fast: 2 in the node's allocatable",
        Duration::from_secs(300),
        |c| {
            Ok(c.kubectl_output(&[
                "get",
                "node",
                NODE_NAME,
                "-o=jsonpath={.status.allocatable.vfplane\\.io/fast}",
            ])
            .is_ok_and(|v| v.trim() == "2"))
        },
    )?;
    demo.report.milestones.push((
        "policy -> pool allocatable".to_owned(),
        applied.elapsed().as_secs_f64(),
    ));
    demo.session.wait(
        "the policy's status: 2 VFs ready",
        Duration::from_secs(120),
        |c| {
            Ok(
                c.kubectl_output(&["get", "vfpolicy", POLICY, "-o=jsonpath={.status.readyVfs}"])
                    .is_ok_and(|v| v.trim() == "2"),
            )
        },
    )?;
    demo.session.kubectl(&["get", "vfpolicies"])?;
    demo.session.kubectl(&["get", "nodestates"])?;
    demo.report.vfs = demo
        .session
        .jsonpath(&["get", "vfpolicy", POLICY, "-o=jsonpath={.status.readyVfs}"])
        .parse()
        .unwrap_or(0);
    demo.end("policy to allocatable", began);

    // 4. A Deployment asks for a VF; its driver sends frames.
    let began = demo
        .begin("A Deployment of one asks for vfplane.io/fast: its pod runs the driver's pktgen on the VF");
    demo.session.apply(&deployment_yaml())?;
    let created = Instant::now();
    demo.session
        .wait("the pktgen pod's report", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", "deployment/pktgen"])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })?;
    demo.report.milestones.push((
        "pod created -> pktgen done".to_owned(),
        created.elapsed().as_secs_f64(),
    ));
    demo.session
        .kubectl(&["get", "pods", "-l", "app=pktgen", "-o", "wide"])?;
    let logs = demo.session.kubectl(&["logs", "deployment/pktgen"])?;
    let line: serde_json::Value = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .context("no JSON line from pktgen")?;
    if let Some(error) = line.get("error") {
        bail!("pktgen failed in the pod: {error}");
    }
    demo.report.pod = demo.session.jsonpath(&[
        "get",
        "pods",
        "-l",
        "app=pktgen",
        "-o=jsonpath={.items[0].metadata.name}",
    ]);
    demo.report.vf = line["pci"].as_str().unwrap_or_default().to_owned();
    // Isolation: the container has the VFIO container node and its own
    // VF's group node, not the other VF's.
    let nodes: Vec<String> = logs
        .lines()
        .find_map(|l| l.strip_prefix("vfio-nodes:"))
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let group = demo.session.jsonpath(&[
        "get",
        "nodestate",
        NODE_NAME,
        &format!(
            "-o=jsonpath={{.status.pfs[0].vfs[?(@.pciAddress==\"{}\")].iommuGroup}}",
            demo.report.vf
        ),
    ]);
    let mut expected = vec!["vfio".to_owned(), group.clone()];
    expected.sort();
    let mut listed = nodes.clone();
    listed.sort();
    ensure!(
        listed == expected,
        "the pod's /dev/vfio holds {nodes:?}, not exactly vfio and its VF's group {group}"
    );
    demo.report.vfio_nodes = nodes.join(" ");
    // The pool's profile asks for 64 MiB of locked memory; the OCI hook
    // gave it to the container before its first instruction.
    demo.report.locked_memory = logs
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or("not shown")
        .to_owned();
    ensure!(
        demo.report.locked_memory == "67108864",
        "the pod's locked-memory limit is {}, not the profile's 64 MiB",
        demo.report.locked_memory
    );
    demo.report.frames_sent = line["hw_tx_packets"].as_u64().unwrap_or(0);
    // The agent names the VF's holder in the node's status (from the
    // kubelet's pod-resources API).
    let owner_path = format!(
        "-o=jsonpath={{.status.pfs[0].vfs[?(@.pciAddress==\"{}\")].owner}}",
        demo.report.vf
    );
    let expected_owner = format!("default/{}/pktgen", demo.report.pod);
    demo.session.wait(
        "the VF's owner in the NodeState status",
        Duration::from_secs(60),
        |c| {
            Ok(c.kubectl_output(&["get", "nodestate", NODE_NAME, &owner_path])
                .is_ok_and(|o| o.trim() == expected_owner))
        },
    )?;
    demo.report.owner = expected_owner;
    demo.report.milestones.push((
        "pod created -> owner in status".to_owned(),
        created.elapsed().as_secs_f64(),
    ));
    demo.session.kubectl(&["get", "nodestates", "-o", "wide"])?;
    wire.settle(Duration::from_secs(2));
    demo.report.frames_counted = wire.take_ethertype(ETHERTYPE_TEST).len() as u64;
    eprintln!(
        "host: {} test frames arrived on the PF's wire; the VF counted {} sent",
        demo.report.frames_counted, demo.report.frames_sent
    );
    demo.end("pod to frames", began);

    // 5. The webhook refuses bad input through the real API server.
    let began =
        demo.begin("The admission webhook refuses a bad VfPolicy and a pod that breaks the pool's profile");
    let policy_refusal = demo.session.apply_refused(&policy_yaml(9, "too-many"))?;
    ensure!(
        policy_refusal.contains("spec.numVfs"),
        "the VfPolicy refusal does not name spec.numVfs: {policy_refusal}"
    );
    let pod_refusal = demo.session.apply_refused(&bad_pod_yaml())?;
    ensure!(
        pod_refusal.contains("resources.limits.cpu"),
        "the pod refusal does not name resources.limits.cpu: {pod_refusal}"
    );
    demo.report.refusals = vec![policy_refusal, pod_refusal];
    demo.end("webhook refusals", began);

    // 6. helm upgrade with changed values.
    let began = demo.begin("helm upgrade with changed values (logLevel=debug, dra.enabled=true)");
    demo.session.helm(&[
        "upgrade",
        "vfplane",
        "charts/vfplane",
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "logLevel=debug",
        "--set",
        "dra.enabled=true",
        "--wait",
        "--timeout=10m",
    ])?;
    let level = demo.session.jsonpath(&[
        "get",
        "daemonset",
        "-n",
        NAMESPACE,
        "vfplane-node",
        "-o=jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"VFPLANE_LOG\")].value}",
    ]);
    ensure!(
        level == "debug",
        "after the upgrade the node pod's VFPLANE_LOG is {level:?}"
    );
    demo.session.kubectl(&["get", "pods", "-n", NAMESPACE])?;
    demo.session.kubectl(&["get", "deviceclasses"])?;
    demo.end("helm upgrade", began);

    // 7. The Deployment goes, its VF is scrubbed; the pool moves to DRA and
    // a pod claims a VF through a ResourceClaimTemplate.
    let began = demo.begin(
        "The Deployment deleted (its VF scrubbed); the pool moved to DRA; a pod claims a VF with a ResourceClaimTemplate",
    );
    demo.session
        .kubectl(&["delete", "deployment", "pktgen", "--wait=true"])?;
    let deleted = Instant::now();
    demo.session.wait(
        "the VF's owner cleared from the status",
        Duration::from_secs(120),
        |c| {
            Ok(c.kubectl_output(&["get", "nodestate", NODE_NAME, &owner_path])
                .is_ok_and(|o| o.trim().is_empty()))
        },
    )?;
    demo.report.milestones.push((
        "deployment deleted -> owner cleared".to_owned(),
        deleted.elapsed().as_secs_f64(),
    ));
    // Released, the VF is reset and given its spec's settings again before
    // anyone else can have it: its handed-out mark goes when that is done.
    let vf = demo.report.vf.clone();
    demo.session.wait_scrubbed(&vf, Duration::from_secs(120))?;
    demo.report.milestones.push((
        "deployment deleted -> VF scrubbed".to_owned(),
        deleted.elapsed().as_secs_f64(),
    ));
    demo.report.scrubbed = demo.session.agent_logged_scrub(&vf);
    ensure!(demo.report.scrubbed, "the agent did not log the scrub of VF {vf}");
    eprintln!(
        "agent: VF {vf} scrubbed (function reset, spec settings checked); handed out again from now on"
    );
    dra_step(&mut demo)?;
    demo.end("the pool through DRA", began);

    // 8. Clean up: the node goes back to 0 VFs.
    let began = demo.begin("Clean up: delete the policy, helm uninstall; the node is back to 0 VFs");
    demo.session
        .kubectl(&["delete", "vfpolicy", POLICY, "--wait=true", "--timeout=300s"])?;
    demo.session.wait_pf_without_vfs(Duration::from_secs(300))?;
    demo.session
        .helm(&["uninstall", "vfplane", "--namespace", NAMESPACE, "--wait"])?;
    let numvfs = demo
        .session
        .cluster_mut()
        .node_exec("cat /sys/bus/pci/devices/0000:00:02.0/sriov_numvfs")?;
    eprintln!(
        "$ cat /sys/bus/pci/devices/0000:00:02.0/sriov_numvfs   # on the node\n  {}",
        numvfs.trim()
    );
    ensure!(
        numvfs.trim() == "0",
        "after uninstall the PF has {} VFs",
        numvfs.trim()
    );
    demo.end("clean up", began);

    ensure!(
        demo.report.frames_sent == u64::from(FRAMES),
        "the pod's VF sent {} frames, not {FRAMES}",
        demo.report.frames_sent
    );
    ensure!(
        demo.report.frames_counted >= demo.report.frames_sent,
        "the host counted {} frames but the VF sent {}",
        demo.report.frames_counted,
        demo.report.frames_sent
    );
    Ok((demo.report, demo.session))
}

/// The pool moved to DRA, a pod claims one VF, runs pktgen on it and is
/// deleted; the VF is scrubbed and offered again.
fn dra_step(demo: &mut Demo) -> Result<()> {
    const POD: &str = "dra-pktgen";
    demo.session.kubectl(&[
        "patch",
        "vfpolicy",
        POLICY,
        "--type=merge",
        "-p",
        r#"{"spec":{"resourceApi":"dra"}}"#,
    ])?;
    let moved = Instant::now();
    demo.session.wait(
        "the pool's two VFs as untainted devices in the node's ResourceSlice",
        Duration::from_secs(180),
        |c| {
            let devices = crate::session::dra_devices(c);
            Ok(devices.len() == 2 && devices.iter().all(|d| crate::session::taint_keys(d).is_empty()))
        },
    )?;
    demo.report.milestones.push((
        "pool moved to DRA -> ResourceSlice".to_owned(),
        moved.elapsed().as_secs_f64(),
    ));
    demo.session.kubectl(&["get", "resourceslices"])?;
    let allocatable = demo.session.allocatable(POOL);
    ensure!(
        allocatable.is_empty() || allocatable == "0",
        "the pool is still a device-plugin resource: allocatable {allocatable}"
    );
    demo.session.apply(&claim_pod_yaml(POD, POOL, FRAMES))?;
    let created = Instant::now();
    demo.session
        .wait("the claim pod's pktgen report", Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", POD])
                .is_ok_and(|l| l.contains("\"tool\":\"pktgen\"")))
        })?;
    demo.report.milestones.push((
        "claim pod created -> pktgen done".to_owned(),
        created.elapsed().as_secs_f64(),
    ));
    demo.session.kubectl(&["get", "resourceclaims"])?;
    let logs = demo.session.kubectl(&["logs", POD])?;
    let line: serde_json::Value = logs
        .lines()
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str(l).ok())
        .context("no JSON line from the claim pod's pktgen")?;
    if let Some(error) = line.get("error") {
        bail!("pktgen failed in the claim pod: {error}");
    }
    demo.report.dra_vf = line["pci"].as_str().unwrap_or_default().to_owned();
    demo.report.dra_frames_sent = line["hw_tx_packets"].as_u64().unwrap_or(0);
    ensure!(
        demo.report.dra_frames_sent == u64::from(FRAMES),
        "the claim pod's VF sent {} frames, not {FRAMES}",
        demo.report.dra_frames_sent
    );
    let vf = demo.report.dra_vf.clone();
    let resource = format!("vfplane.io/vf={vf}");
    let health_path = "-o=jsonpath={.status.containerStatuses[0].allocatedResourcesStatus[0].resources[0]}";
    demo.session.wait(
        "the claimed VF Healthy in the pod's status",
        Duration::from_secs(60),
        |c| {
            Ok(c.kubectl_json(&["get", "pod", POD, "-o", "json"])
                .is_ok_and(|pod| {
                    let status =
                        &pod["status"]["containerStatuses"][0]["allocatedResourcesStatus"][0]["resources"][0];
                    status["resourceID"] == resource.as_str() && status["health"] == "Healthy"
                }))
        },
    )?;
    demo.session.kubectl(&["get", "pod", POD, health_path])?;
    demo.report.dra_health = "Healthy".to_owned();

    demo.session.kubectl(&["delete", "pod", POD, "--wait=true"])?;
    let deleted = Instant::now();
    demo.session.wait_scrubbed(&vf, Duration::from_secs(120))?;
    demo.report.dra_scrubbed = demo.session.agent_logged_scrub(&vf);
    ensure!(
        demo.report.dra_scrubbed,
        "the agent did not log the scrub of VF {vf}"
    );
    let device = vf.replace([':', '.'], "-");
    demo.session.wait(
        "the claim's VF offered again, untainted",
        Duration::from_secs(60),
        |c| {
            Ok(crate::session::dra_devices(c)
                .iter()
                .any(|d| d["name"] == device.as_str() && crate::session::taint_keys(d).is_empty()))
        },
    )?;
    demo.report.milestones.push((
        "claim pod deleted -> VF scrubbed, offered".to_owned(),
        deleted.elapsed().as_secs_f64(),
    ));
    eprintln!("agent: VF {vf} scrubbed after the claim; the driver offers it again");
    demo.session
        .kubectl(&["delete", "resourceclaimtemplate", "one-vf", "--wait=true"])?;
    Ok(())
}
