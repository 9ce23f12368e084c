//! Reliability campaigns on the real node: pods churned through the real
//! kubelet, the agent and the device plugin killed with SIGKILL, the
//! kubelet and containerd restarted, the PF's link taken down, the VFs
//! removed under a running pod, the node rebooted with its VFs' IOMMU
//! groups renumbered, and a pod trying to open VFIO groups not its own.
//! Each campaign prints what it did and its figures, and fails naming the
//! first thing that leaked or went wrong.
//!
//! Every campaign runs on one pool, [`POOL`]: [`TOTAL_VFS`] trusted
//! vfio-pci VFs of the testbed's PF, with locked memory for the driver.
//! Each pod the campaigns make runs the driver on every VF it was given:
//! first `pktgen` as it found the VF, whose MAC must be the spec's (a VF
//! handed out without its scrub would still carry the previous tenant's),
//! then `pktgen --mac` with a MAC of its own through the PF mailbox, so
//! the next tenant finds the VF dirty unless the agent scrubbed it.
//!
//! The checks between and after campaigns ([`Campaigns::check_clean`]):
//! every VF of the pool Healthy, unowned, carrying its spec MAC and
//! advertised; no handed-out mark, container record or CDI spec beyond
//! the plugin's one left on the node.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::cluster::images::VFPLANE_IMAGE;
use crate::cluster::{Cluster, NODE_NAME};
use crate::session::{AllocatableWatch, NAMESPACE, Session, allocatable, longest_not, node_vf_statuses};
use crate::testbed::wire::test_frame;
use crate::testbed::{SHARED_GROUP_PF, Topology};

/// The campaigns' pool.
pub const POOL: &str = "churn";
/// VFs in the pool (the testbed's 82576 has 7).
pub const TOTAL_VFS: usize = 6;
/// The MAC the long-lived pod of the crash campaign gives its VF.
const ANCHOR_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0xaa, 0x00, 0x01];
/// The source MAC of the frames the host sends it.
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
/// How long one pod may take to run its driver checks.
const POD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the node may take to settle after a campaign or a fault.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(180);
/// The device the reboot campaign's node boots with in addition: any PCI
/// device present at boot takes an IOMMU group before the VFs are made.
const REBOOT_EXTRA_DEVICE: &str = "virtio-rng-pci,bus=pcie.0,addr=0x9";

/// How much of each campaign to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Pods created and deleted by the churn campaign.
    pub pods: u32,
    /// Churn pods alive at once.
    pub parallel: u32,
    /// SIGKILLs of the agent (the device plugin gets as many).
    pub kills: u32,
    /// Kubelet restarts.
    pub kubelet_restarts: u32,
    /// Seed of the random moments and VF counts.
    pub seed: u64,
}

impl Options {
    /// The versions CI runs.
    pub fn short(seed: u64) -> Self {
        Self {
            pods: 12,
            parallel: 3,
            kills: 3,
            kubelet_restarts: 3,
            seed,
        }
    }

    /// The versions the issue asks for (slow tests).
    pub fn long(seed: u64) -> Self {
        Self {
            pods: 200,
            parallel: 3,
            kills: 50,
            kubelet_restarts: 20,
            seed,
        }
    }
}

/// A small, seeded xorshift: the campaigns' random moments, reproducible
/// from the seed they print.
#[derive(Debug, Clone)]
pub struct Moments(u64);

impl Moments {
    /// From a seed (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A duration in `[0, max)`.
    pub fn within(&mut self, max: Duration) -> Duration {
        let millis = u64::try_from(max.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(self.next() % millis)
    }

    /// 1 or 2.
    pub fn vfs(&mut self) -> u32 {
        1 + u32::from(!self.next().is_multiple_of(2))
    }
}

/// Median and worst of a list of durations, in seconds.
pub fn median_and_worst(times: &[Duration]) -> (f64, f64) {
    let mut sorted: Vec<f64> = times.iter().map(Duration::as_secs_f64).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let worst = sorted.last().copied().unwrap_or(f64::NAN);
    (median, worst)
}

/// What a campaign measured, printed at its end.
#[derive(Debug, Default)]
pub struct Report {
    lines: Vec<String>,
}

impl Report {
    fn add(&mut self, line: String) {
        eprintln!("campaign: {line}");
        self.lines.push(line);
    }

    /// Every figure, one per line.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// RSS and open descriptors of one of vfplane's node processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
}

/// The campaigns over one session with vfplane installed.
#[derive(Debug)]
pub struct Campaigns<'a> {
    session: &'a mut Session,
    /// Each VF of the pool and the MAC its spec gives it.
    clean_macs: BTreeMap<String, String>,
    moments: Moments,
    seed: u64,
    next_pod: u32,
    report: Report,
}

/// The pool's policy: trusted vfio-pci VFs (a tenant may set its MAC
/// through the PF) with the locked memory the driver needs.
fn policy() -> String {
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
  numVfs: {TOTAL_VFS}
  deviceType: vfio-pci
  resourceName: {POOL}
  trust: true
  containerProfile:
    lockedMemory: 64Mi
    pids: 64
"#
    )
}

/// Who a campaign pod's container runs as.
#[derive(Debug, Clone, Copy)]
enum Tenant {
    /// User 1000 without capabilities: what the campaigns' tenants are.
    Unprivileged,
    /// Root with the runtime's default capabilities plus `MKNOD`: the most
    /// a tenant gets short of `privileged`.
    RootWithMknod,
}

/// A pod of user 1000 without capabilities, asking for `vfs` VFs, running
/// `script`.
fn pod(name: &str, vfs: u32, script: &str) -> String {
    pod_as(name, vfs, script, Tenant::Unprivileged)
}

/// A campaign pod running as `tenant`.
fn pod_as(name: &str, vfs: u32, script: &str, tenant: Tenant) -> String {
    let (pod_security, container_security) = match tenant {
        Tenant::Unprivileged => (
            "\n  securityContext:\n    runAsUser: 1000\n    runAsGroup: 1000\n    runAsNonRoot: true",
            "allowPrivilegeEscalation: false\n        capabilities:\n          drop: [\"ALL\"]",
        ),
        Tenant::RootWithMknod => (
            "",
            "runAsUser: 0\n        capabilities:\n          add: [\"MKNOD\"]",
        ),
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
    campaign: "true"
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1{pod_security}
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", {script:?}]
      securityContext:
        {container_security}
      resources:
        limits:
          vfplane.io/{POOL}: {vfs}
"#
    )
}

/// The MAC pod `n` gives its `i`th VF: `02:00:00:cc:<n>:<i>`.
fn tenant_mac(n: u32, i: usize) -> String {
    format!(
        "02:00:00:cc:{:02x}:{:02x}",
        n % 256,
        (n / 256) * 4 + u32::try_from(i).unwrap_or(0)
    )
}

/// The churn pod's script: for each VF, the driver as found, then with the
/// pod's own MAC; `churn-ready` once done. Its frames go to the host's MAC
/// (out of the PF), not broadcast: other VFs of the PF would receive those,
/// the crash campaign's long-lived receiver among them.
fn churn_script(n: u32) -> String {
    let env = format!("PCIDEVICE_VFPLANE_IO_{}", POOL.to_uppercase());
    let host = HOST_MAC.map(|b| format!("{b:02x}")).join(":");
    format!(
        "set -e; i=0; for vf in $(echo \"${env}\" | tr ',' ' '); do \
         pktgen --pci $vf --dst {host} --count 1 --size 60; \
         pktgen --pci $vf --dst {host} --mac 02:00:00:cc:{:02x}:$(printf %02x $(({} + i))) --count 20 --size 60; \
         i=$((i + 1)); done; echo churn-ready; exec sleep 86400",
        n % 256,
        (n / 256) * 4
    )
}

/// The JSON lines of `tool` in a log.
fn tool_lines(logs: &str, tool: &str) -> Vec<Value> {
    logs.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["tool"] == tool)
        .collect()
}

/// Processes whose `comm` is `comm` on the node, as a shell loop (busybox
/// has no pgrep).
fn pids_of(comm: &str) -> String {
    format!(
        "for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = {comm} ] && echo ${{p#/proc/}}; done"
    )
}

/// The agent's and the device plugin's process names (`comm`, 15 bytes).
const AGENT_COMM: &str = "vfplane-agent";
const PLUGIN_COMM: &str = "vfplane-device-";

impl<'a> Campaigns<'a> {
    /// Applies the pool's policy on a session with vfplane installed and
    /// waits for its VFs; records each VF's spec MAC.
    ///
    /// # Errors
    /// The pool not coming up.
    pub fn prepare(session: &'a mut Session, seed: u64) -> Result<Self> {
        eprintln!("campaign: seed {seed} (rerun with the same seed for the same moments)");
        session.apply(&policy())?;
        session.wait_allocatable(POOL, u32::try_from(TOTAL_VFS)?, SETTLE_TIMEOUT)?;
        let mut clean_macs = BTreeMap::new();
        for vf in node_vf_statuses(session.cluster())? {
            if vf["pool"] == POOL
                && let (Some(address), Some(mac)) = (vf["pciAddress"].as_str(), vf["mac"].as_str())
            {
                clean_macs.insert(address.to_owned(), mac.to_owned());
            }
        }
        ensure!(
            clean_macs.len() == TOTAL_VFS,
            "the NodeState reports {} VFs of pool {POOL} with a MAC, not {TOTAL_VFS}: {clean_macs:?}",
            clean_macs.len()
        );
        Ok(Self {
            session,
            clean_macs,
            moments: Moments::new(seed),
            seed,
            next_pod: 0,
            report: Report::default(),
        })
    }

    /// The figures so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    fn cluster(&self) -> &Cluster {
        self.session.cluster()
    }

    /// Creates the next churn pod, asking for `vfs` VFs; returns its name.
    fn create_churn_pod(&mut self, vfs: u32) -> Result<String> {
        let n = self.next_pod;
        self.next_pod += 1;
        let name = format!("churn-{n}");
        self.cluster()
            .kubectl_stdin(&["apply", "-f", "-"], &pod(&name, vfs, &churn_script(n)))
            .with_context(|| format!("creating pod {name}"))?;
        Ok(name)
    }

    /// Waits until pod `name` ran its driver checks, and checks them: each
    /// VF found with its spec MAC, then carrying the pod's own.
    fn check_churn_pod(&mut self, name: &str) -> Result<Vec<String>> {
        match self.churn_pod_outcome(name)? {
            Ok(vfs) => Ok(vfs),
            Err(rejected) => bail!("pod {name} was rejected by the kubelet: {rejected}"),
        }
    }

    /// [`Self::check_churn_pod`], except that a pod the kubelet rejected at
    /// admission (`UnexpectedAdmissionError`) is `Ok(Err(why))`.
    fn churn_pod_outcome(&mut self, name: &str) -> Result<std::result::Result<Vec<String>, String>> {
        let began = Instant::now();
        let logs = loop {
            let logs = self.cluster().kubectl_output(&["logs", name]).unwrap_or_default();
            if logs.contains("churn-ready") {
                break logs;
            }
            let phase = self
                .cluster()
                .kubectl_output(&["get", "pod", name, "-o=jsonpath={.status.phase}"])
                .unwrap_or_default();
            if phase == "Failed" || phase == "Succeeded" || logs.contains("\"error\"") {
                let why = self
                    .cluster()
                    .kubectl_output(&[
                        "get",
                        "pod",
                        name,
                        "-o=jsonpath={.status.reason}: {.status.message}",
                    ])
                    .unwrap_or_default();
                if why.starts_with("UnexpectedAdmissionError") {
                    return Ok(Err(why));
                }
                bail!("pod {name} ended ({phase}; {why}) before its driver checks passed:\n{logs}");
            }
            if began.elapsed() > POD_TIMEOUT {
                bail!(
                    "pod {name} did not finish its driver checks in {POD_TIMEOUT:?} (phase {phase:?}):\n{logs}\n{}",
                    self.session.pod_diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let n: u32 = name.trim_start_matches("churn-").parse()?;
        let lines = tool_lines(&logs, "pktgen");
        ensure!(
            !lines.is_empty() && lines.len().is_multiple_of(2),
            "pod {name}: expected two pktgen lines per VF:\n{logs}"
        );
        let mut vfs = Vec::new();
        for (i, pair) in lines.chunks(2).enumerate() {
            let vf = pair[0]["pci"].as_str().unwrap_or_default().to_owned();
            let found = pair[0]["mac"].as_str().unwrap_or_default();
            let Some(clean) = self.clean_macs.get(&vf) else {
                bail!(
                    "pod {name} got {vf}, not a VF of pool {POOL}: {:?}",
                    self.clean_macs.keys()
                );
            };
            ensure!(
                found == clean,
                "VF {vf} was handed to pod {name} dirty: its MAC is {found}, the spec's is {clean}"
            );
            let set = pair[1]["mac"].as_str().unwrap_or_default();
            ensure!(
                set == tenant_mac(n, i),
                "pod {name} could not give VF {vf} its MAC {} (the PF kept {set})",
                tenant_mac(n, i)
            );
            vfs.push(vf);
        }
        Ok(Ok(vfs))
    }

    /// Deletes pods without waiting.
    fn delete_pods(&self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["delete", "pod", "--wait=false"];
        args.extend(names.iter().map(String::as_str));
        self.cluster().kubectl_output(&args)?;
        Ok(())
    }

    /// The VFs removed under a running pod: something other than vfplane
    /// (an operator's script, another tool) writes 0 to the PF's
    /// `sriov_numvfs` while a pod runs the driver on one of them. (A VF
    /// has no sysfs `remove` of its own: the PF removes its VFs.) The
    /// kernel removes the VFs in order and, at the one the pod holds,
    /// waits for the pod to let go of it, so the write blocks; the pod
    /// must keep running meanwhile and its VF leave the allocatable. Once the pod is deleted the removal completes,
    /// and vfplane must make the pool again from the NodeState: VFs
    /// re-created, bound, scrubbed, advertised, and a pod must run on
    /// them with nothing left behind.
    ///
    /// # Errors
    /// The pod dying while it held its VF, the pool not coming back,
    /// anything left behind.
    pub fn vf_removal(&mut self) -> Result<()> {
        let name = "holder".to_owned();
        let held = self.start_receiver(&name)?;
        let pf = self.session.jsonpath(&[
            "get",
            "nodestate",
            NODE_NAME,
            "-o=jsonpath={.status.pfs[0].pciAddress}",
        ]);
        ensure!(!pf.is_empty(), "the NodeState names no PF");
        // The node shell is made on first use: before the clock starts.
        self.session.cluster_mut().node_exec("true")?;
        let began = Instant::now();
        self.session.cluster_mut().node_exec(&format!(
            "setsid sh -c 'echo 0 > /sys/bus/pci/devices/{pf}/sriov_numvfs; echo $? > /tmp/vf-removal-done' \
             > /dev/null 2>&1 &"
        ))?;
        // The removal waits for the pod, which must keep running; the VF
        // on its way out is no longer offered (its driver is gone).
        self.session
            .wait_allocatable(POOL, u32::try_from(TOTAL_VFS - 1)?, Duration::from_secs(60))?;
        let withdrawn = began.elapsed();
        std::thread::sleep(Duration::from_secs(10));
        let phase = self
            .cluster()
            .kubectl_output(&["get", "pod", &name, "-o=jsonpath={.status.phase}"])?;
        ensure!(
            phase == "Running",
            "pod {name} is {phase:?} while the removal of its VF waits for it"
        );
        let done = self
            .session
            .cluster_mut()
            .node_exec("cat /tmp/vf-removal-done 2>/dev/null || echo waiting")?;
        ensure!(
            done.trim() == "waiting",
            "the removal finished ({}) while the pod still held its VF",
            done.trim()
        );
        let deleted = Instant::now();
        self.delete_pods(&[name])?;
        let mut finished = None;
        while deleted.elapsed() < SETTLE_TIMEOUT {
            let done = self
                .session
                .cluster_mut()
                .node_exec("cat /tmp/vf-removal-done 2>/dev/null || echo waiting")?;
            if done.trim() != "waiting" {
                finished = Some(deleted.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let finished = finished.context("the removal did not finish after the pod was deleted")?;
        // Clean: every VF of the pool made again, Healthy, with its spec MAC,
        // unowned and advertised.
        self.check_clean(&[])?;
        let clean = deleted.elapsed();
        let name = self.create_churn_pod(1)?;
        let next = self.check_churn_pod(&name)?;
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "vf-removal: {pf}'s VFs removed from outside (sriov_numvfs 0) under a pod receiving on {}: the pod kept \
             running and the removal waited for it ({:.0} s checked), the VF out of the allocatable in {:.1} s; \
             after its deletion the removal finished in {:.1} s and the pool was made again and clean at {:.1} s; \
             the next pod ran on {} (logs: {})",
            held,
            deleted.duration_since(began).as_secs_f64(),
            withdrawn.as_secs_f64(),
            finished.as_secs_f64(),
            clean.as_secs_f64(),
            next.join(", "),
            self.save_logs("vf-removal")
        ));
        Ok(())
    }

    /// Starts pod `name` receiving on one VF of the pool with the driver
    /// (holding the VF open) under [`ANCHOR_MAC`]; returns its VF once the
    /// driver is up.
    fn start_receiver(&mut self, name: &str) -> Result<String> {
        let mac = ANCHOR_MAC.map(|b| format!("{b:02x}")).join(":");
        self.cluster().kubectl_stdin(
            &["apply", "-f", "-"],
            &pod(
                name,
                1,
                &format!("rxcount --mac {mac} --count 100 --timeout 86400"),
            ),
        )?;
        let began = Instant::now();
        loop {
            let logs = self.cluster().kubectl_output(&["logs", name]).unwrap_or_default();
            if let Some(ready) = tool_lines(&logs, "rxcount")
                .into_iter()
                .find(|v| v["event"] == "ready")
            {
                ensure!(
                    ready["mac"] == mac.as_str(),
                    "pod {name}'s VF did not take its MAC: {ready}"
                );
                return Ok(ready["pci"].as_str().unwrap_or_default().to_owned());
            }
            ensure!(
                !logs.contains("\"error\"") && began.elapsed() < POD_TIMEOUT,
                "pod {name}'s driver did not start:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The node rebooted with one more PCI device, which takes an IOMMU
    /// group at boot, so every VF's group number changes. Its root is a
    /// tmpfs: the VFs, their settings, the plugin's state and the CDI
    /// specs are all made again by vfplane from the NodeState. The pool
    /// must come back in its new groups and a pod must run the driver on
    /// a VF of it (its group node is the new one, or the driver cannot
    /// open the VF).
    ///
    /// # Errors
    /// The node not coming back, the groups not changing (the reboot
    /// would prove nothing), the pool not advertised again, the pod
    /// failing, anything left behind.
    pub fn reboot(&mut self, testbed: &crate::testbed::Testbed) -> Result<()> {
        let before = pool_groups(self.cluster())?;
        ensure!(
            before.len() == TOTAL_VFS,
            "the NodeState reports {} VFs of pool {POOL} with a group before the reboot: {before:?}",
            before.len()
        );
        let began = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.extra_devices.push(REBOOT_EXTRA_DEVICE.to_owned()),
            Duration::from_secs(600),
        )?;
        let ready = began.elapsed();
        let mut after = BTreeMap::new();
        self.session.wait(
            "the pool's VFs made again in new IOMMU groups and advertised",
            Duration::from_secs(600),
            |c| {
                let groups = pool_groups(c)?;
                let renumbered =
                    groups.len() == TOTAL_VFS && groups.iter().all(|(vf, g)| before.get(vf) != Some(g));
                after = groups;
                Ok(renumbered && allocatable(c, POOL) == TOTAL_VFS.to_string())
            },
        )?;
        let advertised = began.elapsed();
        self.wait_webhook()?;
        let webhook = began.elapsed();
        let name = self.create_churn_pod(1)?;
        let held = self.check_churn_pod(&name)?;
        let pod_ran = began.elapsed();
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        let groups =
            |map: &BTreeMap<String, u64>| map.values().map(u64::to_string).collect::<Vec<_>>().join(",");
        self.report.add(format!(
            "reboot: node powered off and booted with one more PCI device: Ready (new boot) {:.1} s after the \
             power-off, pool {POOL} advertised again in new IOMMU groups ({} -> {}) at {:.1} s, vfplane's admission \
             webhook answering at {:.1} s, a pod ran the driver on {} at {:.1} s",
            ready.as_secs_f64(),
            groups(&before),
            groups(&after),
            advertised.as_secs_f64(),
            webhook.as_secs_f64(),
            held.join(", "),
            pod_ran.as_secs_f64()
        ));
        Ok(())
    }

    /// Waits until vfplane's admission webhook answers again after a
    /// reboot, for pods and for policies, three times in a row. It runs on
    /// the node too: until both controller replicas are back and the
    /// Service points at their new addresses, a pod asking for a VF or a
    /// policy change is refused (failure policy Fail), and a call that
    /// reaches a replica on its way up is reset (seen once right after a
    /// pod passed). A server-side dry run goes through admission without
    /// changing anything.
    fn wait_webhook(&mut self) -> Result<()> {
        let probe = pod("reboot-probe", 1, "true");
        let mut in_a_row = 0;
        self.session.wait(
            "vfplane's admission webhook answering again (3 times in a row)",
            Duration::from_secs(300),
            |c| {
                let pod_admitted = c
                    .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &probe)
                    .is_ok();
                let policy_admitted = c
                    .kubectl_output(&[
                        "patch",
                        "vfpolicy",
                        POOL,
                        "--dry-run=server",
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"labels":{"vfplane.io/probe":"dry-run"}}}"#,
                    ])
                    .is_ok();
                in_a_row = if pod_admitted && policy_admitted {
                    in_a_row + 1
                } else {
                    0
                };
                Ok(in_a_row >= 3)
            },
        )
    }

    /// Points the pool's policy at the PF at `address`.
    fn select_pf(&mut self, address: &str) -> Result<()> {
        let patch = format!(r#"{{"spec":{{"nicSelector":{{"pciAddresses":["{address}"]}}}}}}"#);
        self.session
            .kubectl(&["patch", "vfpolicy", POOL, "--type=merge", "-p", &patch])?;
        Ok(())
    }

    /// Shared group: the node rebooted with its PF behind a PCIe root port
    /// without ACS ([`Topology::SharedIommuGroup`]), so the kernel puts the
    /// port, the PF and every VF it makes in one IOMMU group; the pool's
    /// policy then points at the PF's new address. The agent makes the VFs
    /// and binds them to vfio-pci, and must report each as not isolated;
    /// the plugin must never advertise one: every allocatable of the pool
    /// the API server sends (on a watch, from before the policy change to
    /// the end) is 0, and a pod asking for a VF is not scheduled. Then the
    /// node boots its usual topology again, the policy points back, and
    /// the pool must come back clean.
    ///
    /// # Errors
    /// A VF of the shared group advertised or reported isolated, a pod
    /// scheduled on it, or the pool not coming back.
    pub fn shared_group(&mut self, testbed: &crate::testbed::Testbed) -> Result<()> {
        let began = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.topology = Topology::SharedIommuGroup,
            Duration::from_secs(600),
        )?;
        let ready = began.elapsed();
        // The new boot's kubelet starts knowing no device resource, and the
        // API server still shows the pool's count from before the reboot.
        // The policy still names the old PF, absent now, so the pool has
        // no VF; it must still be served, empty, so that the kubelet
        // reports it at 0 (a kubelet that never heard of it kept the old
        // count and started a pod asking for a VF without one).
        self.session.wait(
            "the pool with no VF reported at 0 by the new boot's kubelet",
            Duration::from_secs(300),
            |c| Ok(allocatable(c, POOL) == "0"),
        )?;
        let zero = began.elapsed();
        self.wait_webhook()?;
        let watch = AllocatableWatch::start(self.session.cluster(), POOL, Duration::from_secs(30))?;
        self.select_pf(SHARED_GROUP_PF)?;
        let mut shared = Vec::new();
        self.session.wait(
            "the pool's VFs made in the shared group and reported not isolated",
            Duration::from_secs(300),
            |c| {
                shared = node_vf_statuses(c)?
                    .into_iter()
                    .filter(|vf| vf["pool"] == POOL && vf["driver"] == "vfio-pci")
                    .collect();
                Ok(shared.len() == TOTAL_VFS)
            },
        )?;
        let made = began.elapsed();
        let groups: std::collections::BTreeSet<u64> =
            shared.iter().filter_map(|vf| vf["iommuGroup"].as_u64()).collect();
        let group = match groups.iter().collect::<Vec<_>>().as_slice() {
            [group] if groups.len() == 1 => **group,
            _ => bail!("the pool's VFs are not in one IOMMU group: {groups:?}"),
        };
        for vf in &shared {
            ensure!(
                vf["isolated"] == false && vf["health"].as_str().is_some_and(|h| h.starts_with("Unhealthy")),
                "a VF of the shared group is reported isolated or healthy: {vf}"
            );
        }
        let members = self
            .session
            .cluster_mut()
            .node_exec(&format!("ls /sys/kernel/iommu_groups/{group}/devices"))?;
        let members: Vec<&str> = members.split_whitespace().collect();
        ensure!(
            members.contains(&SHARED_GROUP_PF) && members.len() > TOTAL_VFS + 1,
            "IOMMU group {group} holds {members:?}, not the PF and its {TOTAL_VFS} VFs with the port"
        );
        // A pod asking for a VF: the scheduler finds none.
        let name = self.create_churn_pod(1)?;
        let resource = format!("vfplane.io/{POOL}");
        self.session
            .wait("the scheduler refusing the pod", Duration::from_secs(60), |c| {
                Ok(crate::session::events(c, "default", "FailedScheduling")?
                    .iter()
                    .any(|e| {
                        e["involvedObject"]["name"] == name.as_str()
                            && e["message"].as_str().is_some_and(|m| m.contains(&resource))
                    }))
            })?;
        let phase = self.session.jsonpath(&[
            "get",
            "pod",
            &name,
            "-o=jsonpath={.status.phase}/{.spec.nodeName}",
        ]);
        ensure!(
            phase == "Pending/",
            "pod {name} was not left pending unscheduled: {phase}"
        );
        self.delete_pods(&[name])?;
        let seen = watch.finish();
        let advertised: Vec<&String> = seen
            .iter()
            .map(|(_, value)| value)
            .filter(|value| value.as_str() != "0")
            .collect();
        ensure!(
            advertised.is_empty(),
            "the pool's allocatable was not 0 while its VFs were in a shared IOMMU group: {advertised:?}"
        );
        let health = shared
            .first()
            .and_then(|vf| vf["health"].as_str())
            .unwrap_or_default()
            .to_owned();

        // Back to the usual topology: the pool must come back clean.
        let back = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.topology = Topology::SinglePf,
            Duration::from_secs(600),
        )?;
        self.wait_webhook()?;
        self.select_pf("0000:00:02.0")?;
        self.session
            .wait_allocatable(POOL, u32::try_from(TOTAL_VFS)?, Duration::from_secs(300))?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "shared-group: node booted with its PF behind a root port without ACS: Ready {:.1} s after the power-off, \
             the pool (no VF yet) reported at 0 at {:.1} s; {TOTAL_VFS} VFs made and bound at {:.1} s, all in IOMMU group {group} with {} devices ({}), each \
             reported \"{health}\"; allocatable of {POOL} 0 throughout ({} values on the watch); a pod asking \
             for one left unscheduled (FailedScheduling); usual topology again: pool back and clean {:.1} s after \
             that power-off",
            ready.as_secs_f64(),
            zero.as_secs_f64(),
            made.as_secs_f64(),
            members.len(),
            members.join(" "),
            seen.len(),
            back.elapsed().as_secs_f64(),
        ));
        Ok(())
    }

    /// A pod can open only its own VF's group. The pod runs as root with
    /// the runtime's default capabilities plus `MKNOD` (the most a tenant
    /// gets without `privileged`); it sees only its own group's node and
    /// the VFIO container in `/dev/vfio`, and when it makes nodes of its
    /// own for every other VFIO group on the node (their numbers read on
    /// the node), opening each is refused by the container's device
    /// cgroup ("Operation not permitted"), while the same made-up node of
    /// its own group opens: the refusal is the cgroup's, not a wrong
    /// device number.
    ///
    /// # Errors
    /// The pod seeing or opening another group, or the check not running.
    pub fn isolation(&mut self) -> Result<()> {
        // "crw------- 1 root root 243, 3 Nov 29 10:00 12": group 12 is
        // minor 3 of the VFIO group major. The node's own /dev, through PID
        // 1's root: the node shell's /dev is a copy made when its container
        // started (after a reboot, before the VFs existed).
        let listing = self
            .session
            .cluster_mut()
            .node_exec("ls -l /proc/1/root/dev/vfio")?;
        let mut groups = BTreeMap::new();
        for line in listing.lines().filter(|l| l.starts_with('c')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (Some(major), Some(minor), Some(name)) = (words.get(4), words.get(5), words.last()) else {
                continue;
            };
            if *name == "vfio" {
                continue;
            }
            let major: u32 = major
                .trim_end_matches(',')
                .parse()
                .with_context(|| format!("major in {line:?}"))?;
            let minor: u32 = minor.parse().with_context(|| format!("minor in {line:?}"))?;
            groups.insert((*name).to_owned(), (major, minor));
        }
        ensure!(
            groups.len() >= 2,
            "the node has {} VFIO groups, too few to check isolation:\n{listing}",
            groups.len()
        );
        let minors: Vec<u32> = groups.values().map(|(_, minor)| *minor).collect();
        let name = "isolation";
        let pod = pod_as(name, 1, &isolation_script(&minors), Tenant::RootWithMknod);
        self.cluster()
            .kubectl_stdin(&["apply", "-f", "-"], &pod)
            .context("creating the isolation pod")?;
        self.session
            .wait("the isolation pod's checks", POD_TIMEOUT, |c| {
                Ok(c.kubectl_output(&["logs", name])
                    .is_ok_and(|l| l.contains("isolation-done")))
            })?;
        let logs = self.cluster().kubectl_output(&["logs", name])?;
        let field = |prefix: &str| {
            logs.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let own = field("own:");
        let own_group = own.split_whitespace().next().unwrap_or_default().to_owned();
        let Some((major, own_minor)) = groups.get(&own_group).copied() else {
            bail!("the pod's own group {own_group:?} is not a VFIO group of the node {groups:?}:\n{logs}");
        };
        ensure!(
            own.ends_with(&format!(" {major}:{own_minor}")),
            "the pod's node of group {own_group} is not {major}:{own_minor} as on the node:\n{logs}"
        );
        let mut seen: Vec<String> = field("nodes:").split_whitespace().map(str::to_owned).collect();
        seen.sort();
        let mut want = vec![own_group.clone(), "vfio".to_owned()];
        want.sort();
        ensure!(
            seen == want,
            "the pod sees {seen:?} in /dev/vfio, not only its group and the container {want:?}:\n{logs}"
        );
        ensure!(
            field(&format!("minor {own_minor}:")) == "opened",
            "the control failed: the pod's own node of its group {own_group} (minor {own_minor}) did not open, so the other refusals prove nothing:\n{logs}"
        );
        let mut refused = 0;
        for (group, (_, minor)) in &groups {
            if *group == own_group {
                continue;
            }
            let outcome = field(&format!("minor {minor}:"));
            ensure!(
                outcome.ends_with("Operation not permitted"),
                "group {group} (minor {minor}) was not refused by the pod's device cgroup: {outcome:?}\n{logs}"
            );
            refused += 1;
        }
        self.delete_pods(&[name.to_owned()])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "isolation: a root pod with MKNOD holding group {own_group} saw only it in /dev/vfio; its own made-up node of it opened, the {refused} other VFIO groups of the node were refused (Operation not permitted)"
        ));
        Ok(())
    }

    /// The agent's and the device plugin's footprints on the node.
    ///
    /// # Errors
    /// The node shell failing, or either process missing.
    pub fn footprints(&mut self) -> Result<(Footprint, Footprint)> {
        let mut out = Vec::new();
        for comm in [AGENT_COMM, PLUGIN_COMM] {
            let script = format!(
                "for p in $({}); do echo $(grep VmRSS /proc/$p/status | tr -dc 0-9) $(ls /proc/$p/fd | wc -l); done",
                pids_of(comm)
            );
            let text = self.session.cluster_mut().node_exec(&script)?;
            let numbers: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            let [rss_kib, fds] = numbers[..] else {
                bail!("expected one {comm} process on the node, found: {text:?}");
            };
            out.push(Footprint { rss_kib, fds });
        }
        Ok((out[0], out[1]))
    }

    /// Waits until nothing of the campaign's pods is left (`keep` excepted)
    /// and checks the node is clean: see the module's doc.
    ///
    /// # Errors
    /// The first leak found.
    pub fn check_clean(&mut self, keep: &[(&str, &str)]) -> Result<Duration> {
        let began = Instant::now();
        let kept: Vec<&str> = keep.iter().map(|(pod, _)| *pod).collect();
        self.session
            .wait("the campaign's pods gone", SETTLE_TIMEOUT, |c| {
                let names = c.kubectl_output(&["get", "pods", "-l", "campaign=true", "-o=name"])?;
                Ok(names
                    .lines()
                    .all(|l| kept.contains(&l.trim_start_matches("pod/"))))
            })?;
        let free = TOTAL_VFS - keep.len();
        // Allocatable counts the healthy VFs, held or not.
        self.session
            .wait_allocatable(POOL, u32::try_from(TOTAL_VFS)?, SETTLE_TIMEOUT)?;
        let clean_macs = self.clean_macs.clone();
        let held: BTreeMap<&str, &str> = keep.iter().map(|(pod, vf)| (*vf, *pod)).collect();
        // Every released VF scrubbed: its mark gone, its spec MAC back.
        self.session.wait(
            &format!("{free} VFs of {POOL} unowned, healthy and with their spec MACs"),
            SETTLE_TIMEOUT,
            |c| {
                let statuses = node_vf_statuses(c)?;
                Ok(clean_macs.iter().all(|(vf, mac)| {
                    statuses.iter().any(|s| {
                        s["pciAddress"] == vf.as_str()
                            && s["health"] == "Healthy"
                            && (held.contains_key(vf.as_str())
                                || (s["owner"].is_null() && s["mac"] == mac.as_str()))
                    })
                }))
            },
        )?;
        let listing = self.session.cluster_mut().node_exec(
            "cd /proc/1/root; echo marks: $(ls run/vfplane/vf-state | grep handed-out); \
             echo records: $(ls run/vfplane/containers 2>/dev/null | wc -l); echo cdi: $(ls var/run/cdi)",
        )?;
        let field = |name: &str| {
            listing
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let marks = field("marks:");
        let marked_ok = marks.iter().all(|m| held.keys().any(|vf| m.starts_with(vf)));
        ensure!(
            marked_ok && marks.len() == keep.len(),
            "handed-out marks left for VFs nobody holds: {marks:?} (held: {held:?})"
        );
        let records: usize = field("records:")
            .first()
            .and_then(|n| n.parse().ok())
            .unwrap_or(usize::MAX);
        ensure!(
            records <= keep.len(),
            "{records} container records left with {} container(s) holding VFs",
            keep.len()
        );
        let cdi = field("cdi:");
        ensure!(
            cdi == ["vfplane.io-vf.json"],
            "CDI specs on the node other than the plugin's one: {cdi:?}"
        );
        Ok(began.elapsed())
    }

    /// Churn: `options.pods` pods of 1 or 2 VFs, `options.parallel` alive
    /// at once, created and deleted through the kubelet; then the node must
    /// be clean and the agent's and plugin's footprints back to what they
    /// were after the first tenth of the pods.
    ///
    /// # Errors
    /// A pod failing, a dirty VF, a leak.
    pub fn churn(&mut self, options: &Options) -> Result<()> {
        let began = Instant::now();
        let baseline_at = (options.pods / 10).clamp(1, 10);
        let mut baseline = None;
        let mut alive: VecDeque<String> = VecDeque::new();
        let mut vfs_handed = 0usize;
        for i in 0..options.pods {
            while alive.len() >= usize::try_from(options.parallel)? {
                if let Some(oldest) = alive.pop_front() {
                    self.delete_pods(&[oldest])?;
                }
            }
            let vfs = self.moments.vfs();
            let name = self.create_churn_pod(vfs)?;
            vfs_handed += self.check_churn_pod(&name)?.len();
            alive.push_back(name);
            if i + 1 == baseline_at {
                baseline = Some(self.footprints()?);
            }
        }
        self.delete_pods(&alive.drain(..).collect::<Vec<_>>())?;
        let settled = self.check_clean(&[])?;
        let (agent, plugin) = self.footprints()?;
        let churned = began.elapsed();
        self.report.add(format!(
            "churn: {} pods ({vfs_handed} VFs handed out, {} alive at once) in {:.0} s; none got a dirty VF; \
             settled and clean {:.1} s after the last delete",
            options.pods,
            options.parallel,
            churned.as_secs_f64(),
            settled.as_secs_f64()
        ));
        if let Some((agent0, plugin0)) = baseline {
            self.report.add(format!(
                "churn: after {baseline_at} pods -> at the end: agent RSS {} -> {} KiB, fds {} -> {}; \
                 device plugin RSS {} -> {} KiB, fds {} -> {}",
                agent0.rss_kib,
                agent.rss_kib,
                agent0.fds,
                agent.fds,
                plugin0.rss_kib,
                plugin.rss_kib,
                plugin0.fds,
                plugin.fds
            ));
            for (what, before, after) in [("agent", agent0, agent), ("device plugin", plugin0, plugin)] {
                ensure!(
                    after.fds <= before.fds,
                    "the {what} holds {} descriptors after the churn, {} after the first {baseline_at} pods",
                    after.fds,
                    before.fds
                );
                // Allocators keep freed pages: allow a quarter and 4 MiB,
                // far below what a leak per pod over this many pods gives.
                let allowed = before.rss_kib + before.rss_kib / 4 + 4096;
                ensure!(
                    after.rss_kib <= allowed,
                    "the {what}'s RSS grew from {} KiB to {} KiB over the churn",
                    before.rss_kib,
                    after.rss_kib
                );
            }
        }
        Ok(())
    }

    /// The node pod's container `container`: (restart count, ready).
    fn container_state(&self, container: &str) -> Result<(u64, bool)> {
        node_container_state(self.cluster(), container)
    }

    /// Kills every process named `comm` on the node: the agent and the
    /// device plugin with SIGKILL (a crash), the kubelet and containerd
    /// with SIGTERM (a restart, as a service manager does it; the node
    /// starts them again a second later). Returns when it was done. The
    /// kubelet and containerd carry `kubectl exec`'s stream, so they are
    /// signalled a second after the node shell returns.
    fn kill(&mut self, comm: &str) -> Result<Instant> {
        let restart = matches!(comm, "kubelet" | "containerd");
        let signal = if restart { "TERM" } else { "KILL" };
        let kill = format!("for p in $({}); do kill -{signal} $p; done", pids_of(comm));
        let script = if restart {
            format!(
                "[ -n \"$({})\" ] && echo found; (sleep 1; {kill}) > /dev/null 2>&1 &",
                pids_of(comm)
            )
        } else {
            format!("[ -n \"$({})\" ] && echo found; {kill}", pids_of(comm))
        };
        let out = self.session.cluster_mut().node_exec(&script)?;
        ensure!(out.contains("found"), "no {comm} process on the node");
        let killed = Instant::now();
        if restart {
            std::thread::sleep(Duration::from_secs(1));
            return Ok(killed + Duration::from_secs(1));
        }
        Ok(killed)
    }

    /// Crashes: a long-lived pod runs the driver's receive rings on its VF
    /// throughout. Each round deletes the previous churn pod (its scrub
    /// starts), creates the next, and at a random moment within 4 s
    /// SIGKILLs the agent or the device plugin (alternately), so kills land
    /// during scrubs, Allocates, hooks and registrations. The round ends
    /// when the node converged: the container back and ready, the churn
    /// pod running with clean VFs. A pod the kubelet rejects at admission
    /// (it had no healthy VF of the pool then) is counted and reported,
    /// with the logs of that moment saved, and the next pod must run. At
    /// the end the long-lived pod receives the frames the host sends it
    /// (its VF was never reset under it).
    ///
    /// # Errors
    /// A pod given a dirty VF, a round that does not converge, the
    /// long-lived pod losing its VF, a leak.
    pub fn crashes(&mut self, options: &Options) -> Result<()> {
        let anchor = "anchor";
        let anchor_vf = self.start_receiver(anchor)?;
        let mut converge: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        let mut previous: Option<String> = None;
        let mut rejected: Vec<String> = Vec::new();
        for round in 0..options.kills * 2 {
            let (container, comm) = if round.is_multiple_of(2) {
                ("agent", AGENT_COMM)
            } else {
                ("device-plugin", PLUGIN_COMM)
            };
            let (restarts_before, _) = self.container_state(container)?;
            if let Some(old) = previous.take() {
                self.delete_pods(&[old])?;
            }
            let vfs = self.moments.vfs();
            let name = self.create_churn_pod(vfs)?;
            std::thread::sleep(self.moments.within(Duration::from_secs(4)));
            let killed = self.kill(comm)?;
            self.session.wait(
                &format!("the {container} container restarted and ready after its kill"),
                SETTLE_TIMEOUT,
                |c| {
                    let (restarts, ready) = node_container_state(c, container)?;
                    Ok(restarts > restarts_before && ready)
                },
            )?;
            let outcome = self
                .churn_pod_outcome(&name)
                .with_context(|| format!("round {round}: after the kill of the {container}"))?;
            if let Err(why) = outcome {
                // The kubelet failed the pod at admission: it had no
                // healthy VF of the pool at that moment. Counted and shown
                // with the logs of that moment; the next pod must run.
                let saved = self.save_logs(&format!("crashes-rejected-{round}"));
                eprintln!(
                    "campaign: crashes: round {round}: pod {name} rejected by the kubelet ({why}); logs: {saved}"
                );
                rejected.push(format!("round {round} ({container} killed): {why}"));
                self.delete_pods(std::slice::from_ref(&name))?;
                let again = self.create_churn_pod(1)?;
                self.check_churn_pod(&again)
                    .with_context(|| format!("round {round}: the pod after a rejected one"))?;
                converge.entry(container).or_default().push(killed.elapsed());
                previous = Some(again);
                continue;
            }
            converge.entry(container).or_default().push(killed.elapsed());
            previous = Some(name);
        }
        if let Some(old) = previous.take() {
            self.delete_pods(&[old])?;
        }
        self.check_clean(&[(anchor, anchor_vf.as_str())])?;
        // The long-lived pod's rings still run: it receives what the host sends.
        let link = self
            .cluster()
            .guest()
            .pf_link(0)
            .context("the testbed has no PF link")?;
        for seq in 0..100 {
            link.send_frame(&test_frame(ANCHOR_MAC, HOST_MAC, seq, 60))?;
            std::thread::sleep(Duration::from_millis(2));
        }
        let began = Instant::now();
        let result = loop {
            let logs = self
                .cluster()
                .kubectl_output(&["logs", anchor])
                .unwrap_or_default();
            if let Some(result) = tool_lines(&logs, "rxcount")
                .into_iter()
                .find(|v| v.get("received").is_some())
            {
                break result;
            }
            ensure!(
                began.elapsed() < Duration::from_secs(60),
                "the long-lived pod received nothing after {} kills: its VF was lost\n{logs}",
                options.kills * 2
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        ensure!(
            result["received"] == 100 && result["bad"] == 0,
            "the long-lived pod's VF did not keep working through the kills: {result}"
        );
        let anchor_restarts = self.cluster().kubectl_output(&[
            "get",
            "pod",
            anchor,
            "-o=jsonpath={.status.containerStatuses[0].restartCount}",
        ])?;
        ensure!(
            anchor_restarts.trim() == "0",
            "the long-lived pod restarted: {anchor_restarts}"
        );
        self.delete_pods(&[anchor.to_owned()])?;
        self.check_clean(&[])?;
        for (container, times) in &converge {
            let (median, worst) = median_and_worst(times);
            self.report.add(format!(
                "crashes: {} SIGKILLs of the {container}: converged (container ready, next pod running on clean VFs) \
                 median {median:.1} s, worst {worst:.1} s after the kill",
                times.len()
            ));
        }
        self.report.add(format!(
            "crashes: the long-lived pod kept its VF {anchor_vf} throughout (100/100 frames received after the last kill); \
             no pod got a dirty VF; node clean at the end"
        ));
        self.report.add(format!(
            "crashes: pods the kubelet rejected at admission (no healthy VF of the pool at that moment): {} of {}{}",
            rejected.len(),
            options.kills * 2,
            if rejected.is_empty() { String::new() } else { format!(": {}", rejected.join("; ")) }
        ));
        Ok(())
    }

    /// Saves the agent's, the plugin's and the controller's logs (and the
    /// previous containers' after a kill) and the NodeState beside the
    /// cluster's own logs; returns where, or why not.
    fn save_logs(&self, campaign: &str) -> String {
        // Beside the run directories, not in one: a later run removes those
        // of dead processes.
        let parent = self.cluster().dir().parent().unwrap_or(self.cluster().dir());
        let dir = parent.join(format!("campaign-logs-{}-{campaign}", self.seed));
        if let Err(error) = std::fs::create_dir_all(&dir) {
            return format!("not saved ({error})");
        }
        let node = ["-n", NAMESPACE, "daemonset/vfplane-node", "-c"];
        for (file, args) in [
            ("agent.log", [&node[..], &["agent"]].concat()),
            (
                "agent.previous.log",
                [&node[..], &["agent", "--previous"]].concat(),
            ),
            ("device-plugin.log", [&node[..], &["device-plugin"]].concat()),
            (
                "device-plugin.previous.log",
                [&node[..], &["device-plugin", "--previous"]].concat(),
            ),
            (
                "controller.log",
                vec!["-n", NAMESPACE, "deployment/vfplane-controller"],
            ),
        ] {
            let mut all = vec!["logs"];
            all.extend(args);
            let text = self
                .cluster()
                .kubectl_output(&all)
                .unwrap_or_else(|e| format!("{e:#}"));
            let _ = std::fs::write(dir.join(file), strip_ansi(&text));
        }
        for (file, kind) in [("nodestate.yaml", "nodestate"), ("node.yaml", "node")] {
            let text = self
                .cluster()
                .kubectl_output(&["get", kind, NODE_NAME, "-o", "yaml"])
                .unwrap_or_else(|e| format!("{e:#}"));
            let _ = std::fs::write(dir.join(file), text);
        }
        dir.display().to_string()
    }

    /// The device plugin's log, without colour codes.
    fn plugin_log(&self) -> Result<String> {
        let raw = self.cluster().kubectl_output(&[
            "logs",
            "-n",
            NAMESPACE,
            "daemonset/vfplane-node",
            "-c",
            "device-plugin",
        ])?;
        Ok(strip_ansi(&raw))
    }

    /// Restarts: the kubelet stopped (SIGTERM) `options.kubelet_restarts`
    /// times (the node's service loop starts it again after 1 s; it wipes
    /// the device-plugin directory). Each time: how long the plugin took from
    /// the new `kubelet.sock` to its registration (from its log), the
    /// longest stretch the API server showed the pool's allocatable below
    /// its healthy VFs (every status the kubelet posts, from a watch), and a pod created right after the kill must get clean
    /// VFs. Then containerd restarted once the same way.
    ///
    /// # Errors
    /// A pod failing, a registration that never comes, a leak.
    pub fn restarts(&mut self, options: &Options) -> Result<()> {
        let mut registrations = Vec::new();
        let mut dips = Vec::new();
        let mut pod_times = Vec::new();
        let mut rejected = Vec::new();
        for _ in 0..options.kubelet_restarts {
            let log_before = self.plugin_log()?.lines().count();
            // Every allocatable the kubelet posts, as the API server sends
            // it, from before the kill until the plugin registered again and
            // the pool is back.
            let watch = AllocatableWatch::start(self.session.cluster(), POOL, Duration::from_secs(30))?;
            let killed = self.kill("kubelet")?;
            let name = self.create_churn_pod(1)?;
            let full = TOTAL_VFS.to_string();
            let registered = loop {
                // Allocatable counts the healthy VFs, held or not.
                let back = watch.latest().as_deref() == Some(full.as_str());
                // The kubelet serves the logs: nothing while it restarts.
                let log = self.plugin_log().unwrap_or_default();
                let new: Vec<&str> = log.lines().skip(log_before).collect();
                if let Some(latency) = registration_latency(&new)
                    && back
                {
                    break latency;
                }
                ensure!(
                    killed.elapsed() < SETTLE_TIMEOUT,
                    "no registration with the restarted kubelet in {SETTLE_TIMEOUT:?}; the plugin's log since:\n{}",
                    new.join("\n")
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            let longest = longest_not(&watch.finish(), &full, Instant::now());
            registrations.push(registered);
            dips.push(longest);
            match self.churn_pod_outcome(&name)? {
                Ok(_) => pod_times.push(killed.elapsed()),
                Err(why) => {
                    // Admitted by the new kubelet before the plugin had
                    // re-registered: the kubelet fails such a pod (it
                    // restores the resource from its checkpoint with no
                    // healthy device). A pod created now must run.
                    rejected.push(why);
                    let again = self.create_churn_pod(1)?;
                    self.check_churn_pod(&again)?;
                    self.delete_pods(&[again])?;
                }
            }
            self.delete_pods(&[name])?;
            self.check_clean(&[])?;
        }
        let (median, worst) = median_and_worst(&registrations);
        self.report.add(format!(
            "restarts: {} kubelet restarts: plugin registered {median:.2} s (median), {worst:.2} s (worst) after the new kubelet.sock",
            registrations.len()
        ));
        let (median, worst) = median_and_worst(&dips);
        let over_a_second = dips.iter().filter(|d| **d > Duration::from_secs(1)).count();
        self.report.add(format!(
            "restarts: allocatable below the pool's healthy VFs for {median:.2} s (median), {worst:.2} s (worst) per restart, \
             over 1 s in {over_a_second} of {}, as the API server sent it on a watch",
            dips.len()
        ));
        let (median, worst) = median_and_worst(&pod_times);
        let mut line = format!(
            "restarts: of {} pods created right after a kubelet stop, {} ran on clean VFs ({median:.1} s median, {worst:.1} s worst after the stop)",
            options.kubelet_restarts,
            pod_times.len(),
        );
        if let Some(first) = rejected.first() {
            line.push_str(&format!(
                "; {} rejected by the new kubelet before the plugin re-registered ({first}); a pod created after that ran each time",
                if rejected.len() == 1 { "1 was".to_owned() } else { format!("{} were", rejected.len()) }
            ));
        }
        self.report.add(line);

        // containerd, once (SIGTERM): running containers live on in their
        // shims.
        let (plugin_restarts, _) = self.container_state("device-plugin")?;
        let killed = self.kill("containerd")?;
        let name = self.create_churn_pod(1)?;
        self.check_churn_pod(&name)?;
        let after = killed.elapsed();
        // Creations the runtime's NRI validator refused while vfplane's
        // plugin had not registered again (the kubelet retried them).
        let events = self.cluster().kubectl_output(&[
            "get",
            "events",
            &format!("--field-selector=involvedObject.name={name}"),
            "-o=jsonpath={range .items[*]}{.count} {.message}{\"\\n\"}{end}",
        ])?;
        let refused: u32 = events
            .lines()
            .filter(|line| {
                line.contains(&format!(
                    "required plugin \"{}\" not present",
                    vfplane_proto::vf_policy::NRI_PLUGIN_NAME
                ))
            })
            .filter_map(|line| line.split_whitespace().next()?.parse::<u32>().ok())
            .sum();
        let (plugin_restarts_after, ready) = self.container_state("device-plugin")?;
        ensure!(
            ready && plugin_restarts_after == plugin_restarts,
            "the device plugin restarted ({plugin_restarts} -> {plugin_restarts_after}) or is not ready after containerd's restart"
        );
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "restarts: containerd stopped and restarted: vfplane's containers kept running, a new pod ran on clean VFs {:.1} s after the kill \
             (its container's creation refused {refused} time(s) by the runtime's NRI validator until vfplane's plugin registered again)",
            after.as_secs_f64()
        ));
        Ok(())
    }

    /// Faults: the PF's link taken down under a running pod (the pool's
    /// VFs Unhealthy, the node's allocatable 0) and up again (back), with
    /// how long each took as the API server showed it.
    ///
    /// # Errors
    /// The health not following the link, a leak.
    pub fn faults(&mut self) -> Result<()> {
        let name = self.create_churn_pod(1)?;
        let held = self.check_churn_pod(&name)?;
        let pf = self
            .session
            .jsonpath(&["get", "nodestate", NODE_NAME, "-o=jsonpath={.status.pfs[0].name}"]);
        ensure!(!pf.is_empty(), "the NodeState names no PF interface");
        let mut times = Vec::new();
        for (state, want) in [("down", 0), ("up", u32::try_from(TOTAL_VFS)?)] {
            self.session
                .cluster_mut()
                .node_exec(&format!("ip link set {pf} {state}"))?;
            let began = Instant::now();
            self.session
                .wait_allocatable(POOL, want, SETTLE_TIMEOUT)
                .with_context(|| format!("after the PF link went {state}"))?;
            times.push((state, began.elapsed()));
        }
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        for (state, took) in times {
            self.report.add(format!(
                "faults: PF {pf} link {state} -> allocatable as the API server shows it: {:.1} s (pod on {} kept running)",
                took.as_secs_f64(),
                held.join(", ")
            ));
        }
        Ok(())
    }
}

/// The isolation pod's script: lists `/dev/vfio`, then makes its own
/// node for each group minor in `minors` (and for its own group, as the
/// control) and opens it read-write, printing one line per minor.
fn isolation_script(minors: &[u32]) -> String {
    let minors = minors.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    format!(
        "echo \"nodes: $(ls /dev/vfio | tr '\\n' ' ')\"; \
         grep CapEff /proc/self/status; \
         own=$(ls /dev/vfio | grep -v '^vfio$'); \
         set -- $(stat -c '%t %T' /dev/vfio/$own); \
         echo \"own: $own $((0x$1)):$((0x$2))\"; \
         for m in $((0x$2)) {minors}; do \
           if ! mknod /tmp/g$m c $((0x$1)) $m 2>/tmp/err; then echo \"minor $m: mknod: $(cat /tmp/err)\"; \
           elif (exec 3<>/tmp/g$m) 2>/tmp/err; then echo \"minor $m: opened\"; \
           else echo \"minor $m: $(cat /tmp/err)\"; fi; \
         done; echo isolation-done; exec sleep 86400"
    )
}

/// The IOMMU group of each VF of the pool, as the NodeState reports it.
fn pool_groups(cluster: &Cluster) -> Result<BTreeMap<String, u64>> {
    Ok(node_vf_statuses(cluster)?
        .iter()
        .filter(|vf| vf["pool"] == POOL)
        .filter_map(|vf| Some((vf["pciAddress"].as_str()?.to_owned(), vf["iommuGroup"].as_u64()?)))
        .collect())
}

/// A container of the node pod: (restart count, ready).
fn node_container_state(cluster: &Cluster, container: &str) -> Result<(u64, bool)> {
    let pods = cluster.kubectl_json(&[
        "get",
        "pods",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/component=node",
    ])?;
    let status = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["status"]["containerStatuses"].as_array().into_iter().flatten())
        .find(|s| s["name"] == container)
        .with_context(|| format!("no {container} container in the node pod"))?;
    Ok((
        status["restartCount"].as_u64().unwrap_or(0),
        status["ready"].as_bool().unwrap_or(false),
    ))
}

/// Removes ANSI colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Seconds since midnight of a tracing line's RFC 3339 timestamp
/// (`2026-11-29T10:36:38.233315Z ...`).
fn seconds_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// From the plugin's log lines after a kubelet restart: the time from the
/// last `kubelet.sock created` to the first registration after it.
pub fn registration_latency(lines: &[&str]) -> Option<Duration> {
    let created = lines.iter().rposition(|l| l.contains("kubelet.sock created"))?;
    let registered = lines[created..]
        .iter()
        .find(|l| l.contains("registered with the kubelet"))?;
    let mut delta = seconds_of_day(registered)? - seconds_of_day(lines[created])?;
    if delta < 0.0 {
        delta += 86_400.0;
    }
    Some(Duration::from_secs_f64(delta))
}

/// Runs the chosen campaigns on a fresh cluster with vfplane installed by
/// Helm, printing each one's figures; the report at the end.
///
/// # Errors
/// The cluster not coming up, or the first campaign that fails.
pub fn run(testbed: &crate::testbed::Testbed, options: &Options, which: &[&str]) -> Result<Report> {
    let mut session = Session::start(testbed, crate::cluster::ClusterOptions::default())?;
    session.install_vfplane()?;
    let mut campaigns = Campaigns::prepare(&mut session, options.seed)?;
    for name in which {
        let began = Instant::now();
        let result = match *name {
            "churn" => campaigns.churn(options),
            "crashes" => campaigns.crashes(options),
            "restarts" => campaigns.restarts(options),
            "faults" => campaigns.faults(),
            "isolation" => campaigns.isolation(),
            "reboot" => campaigns.reboot(testbed),
            "vf-removal" => campaigns.vf_removal(),
            "shared-group" => campaigns.shared_group(testbed),
            other => bail!(
                "no campaign {other:?}: churn, crashes, restarts, faults, vf-removal, reboot, isolation or shared-group"
            ),
        };
        if let Err(error) = result {
            let saved = campaigns.save_logs(name);
            return Err(error.context(format!("campaign {name} failed; vfplane's logs: {saved}")));
        }
        let mut line = String::new();
        let _ = write!(line, "{name}: done in {:.0} s", began.elapsed().as_secs_f64());
        campaigns.report.add(line);
    }
    Ok(std::mem::take(&mut campaigns.report))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn registration_latency_is_from_the_last_socket_to_the_next_registration() {
        let lines = [
            "2026-11-29T10:00:00.000000Z  INFO kubelet.sock created: the kubelet (re)started; registering again",
            "2026-11-29T10:00:05.000000Z  INFO kubelet.sock created: the kubelet (re)started; registering again",
            "2026-11-29T10:00:05.250000Z  INFO registered with the kubelet pool=churn",
        ];
        let latency = registration_latency(&lines).unwrap();
        assert!((latency.as_secs_f64() - 0.25).abs() < 1e-6, "{latency:?}");
        assert_eq!(registration_latency(&lines[..2]), None);
        let across_midnight = [
            "2026-11-29T23:59:59.900000Z  INFO kubelet.sock created",
            "2026-11-30T00:00:00.100000Z  INFO registered with the kubelet",
        ];
        let latency = registration_latency(&across_midnight).unwrap();
        assert!((latency.as_secs_f64() - 0.2).abs() < 1e-6, "{latency:?}");
    }

    #[test]
    fn ansi_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x"),
            "2026  INFO x"
        );
    }

    #[test]
    fn moments_repeat_with_their_seed_and_stay_in_range() {
        let (mut a, mut b) = (Moments::new(7), Moments::new(7));
        for _ in 0..100 {
            let d = a.within(Duration::from_secs(4));
            assert_eq!(d, b.within(Duration::from_secs(4)));
            assert!(d < Duration::from_secs(4));
            assert!((1..=2).contains(&a.vfs()));
            b.vfs();
        }
    }

    #[test]
    fn median_and_worst_of_durations() {
        let times = [3, 1, 2].map(Duration::from_secs);
        assert_eq!(median_and_worst(&times), (2.0, 3.0));
    }

    #[test]
    fn campaign_pods_are_yaml_with_their_tenant_s_security() {
        let tenant: serde_yaml::Value = serde_yaml::from_str(&pod("p", 2, "echo 'a \"b\"'")).unwrap();
        assert_eq!(tenant["spec"]["securityContext"]["runAsUser"], 1000);
        let container = &tenant["spec"]["containers"][0];
        assert_eq!(container["command"][2], "echo 'a \"b\"'");
        assert_eq!(container["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(container["resources"]["limits"]["vfplane.io/churn"], 2);
        let root: serde_yaml::Value =
            serde_yaml::from_str(&pod_as("q", 1, "true", Tenant::RootWithMknod)).unwrap();
        assert!(root["spec"].get("securityContext").is_none());
        let container = &root["spec"]["containers"][0];
        assert_eq!(container["securityContext"]["runAsUser"], 0);
        assert_eq!(container["securityContext"]["capabilities"]["add"][0], "MKNOD");
        assert_eq!(root["metadata"]["labels"]["campaign"], "true");
    }

    #[test]
    fn tenant_macs_match_the_script() {
        assert_eq!(tenant_mac(5, 1), "02:00:00:cc:05:01");
        assert_eq!(tenant_mac(300, 0), "02:00:00:cc:2c:04");
        assert!(churn_script(300).contains("02:00:00:cc:2c:$(printf %02x $((4 + i)))"));
    }
}
