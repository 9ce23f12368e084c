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

mod churn;
mod crashes;
mod faults;
mod isolation;
mod reboot;
mod restarts;
mod shared_group;
mod vf_removal;

pub use restarts::registration_latency;

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
    /// Pods created and deleted by the DRA churn campaign.
    pub dra_pods: u32,
    /// Churn pods at once, from their creation to their deletion.
    pub parallel: u32,
    /// SIGKILLs of the agent (the device plugin gets as many).
    pub kills: u32,
    /// Kubelet restarts.
    pub kubelet_restarts: u32,
    /// Seed of the random moments and VF counts.
    pub seed: u64,
    /// The node the campaigns run on.
    pub node_profile: crate::cluster::NodeProfile,
}

impl Options {
    /// The versions CI runs.
    pub fn short(seed: u64) -> Self {
        // Each campaign's logic once (one SIGKILL of the agent and one of
        // the device plugin, one kubelet restart); `long` is the
        // statistics.
        Self {
            pods: 6,
            dra_pods: 50,
            parallel: 3,
            kills: 1,
            kubelet_restarts: 1,
            seed,
            node_profile: crate::cluster::NodeProfile::default(),
        }
    }

    /// The versions the issue asks for (slow tests).
    pub fn long(seed: u64) -> Self {
        Self {
            pods: 200,
            dra_pods: 200,
            parallel: 3,
            kills: 50,
            kubelet_restarts: 20,
            seed,
            node_profile: crate::cluster::NodeProfile::default(),
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    /// Resident set, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// The descriptors by what they are: `tcp`, `unix`, `netlink` or
    /// `socket` (another family), an `anon_inode:[...]` kind, a device
    /// path, or `file`.
    pub fd_kinds: BTreeMap<String, u64>,
}

impl Footprint {
    /// The kinds of descriptor of which `self` has more than `before`, with
    /// both counts.
    pub fn grown_since(&self, before: &Footprint) -> Vec<String> {
        self.fd_kinds
            .iter()
            .filter_map(|(kind, &now)| {
                let then = before.fd_kinds.get(kind).copied().unwrap_or(0);
                (now > then).then(|| format!("{kind} {then} -> {now}"))
            })
            .collect()
    }
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

/// How a campaign pod asks for its VFs.
#[derive(Debug, Clone, Copy)]
enum Ask<'a> {
    /// `vfplane.io/churn: N` in its limits (the device plugin).
    Limit(u32),
    /// A claim made from this ResourceClaimTemplate (DRA).
    Claim(&'a str),
}

impl From<u32> for Ask<'_> {
    fn from(vfs: u32) -> Self {
        Self::Limit(vfs)
    }
}

/// A pod of user 1000 without capabilities, asking for VFs, running
/// `script`.
fn pod<'a>(name: &str, ask: impl Into<Ask<'a>>, script: &str) -> String {
    pod_as(name, ask.into(), script, Tenant::Unprivileged)
}

/// A campaign pod running as `tenant`.
fn pod_as(name: &str, ask: Ask<'_>, script: &str, tenant: Tenant) -> String {
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
    let (pod_claims, resources) = match ask {
        Ask::Limit(vfs) => (
            String::new(),
            format!("\n        limits:\n          vfplane.io/{POOL}: {vfs}"),
        ),
        Ask::Claim(template) => (
            format!("\n  resourceClaims:\n    - name: vfs\n      resourceClaimTemplateName: {template}"),
            "\n        claims:\n          - name: vfs".to_owned(),
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
  terminationGracePeriodSeconds: 1{pod_security}{pod_claims}
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", {script:?}]
      securityContext:
        {container_security}
      resources:{resources}
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
    churn_script_over(n, &format!("$(echo \"${env}\" | tr ',' ' ')"))
}

/// [`churn_script`] for a pod whose VFs come from a claim: one variable
/// per device, `PCIDEVICE_VFPLANE_IO_CHURN_<device>=<address>`.
fn churn_script_dra(n: u32) -> String {
    let prefix = format!("PCIDEVICE_VFPLANE_IO_{}_", POOL.to_uppercase());
    churn_script_over(
        n,
        &format!("$(env | grep ^{prefix} | grep -v _INFO= | cut -d= -f2)"),
    )
}

/// The churn script over the VFs `list` (shell words) names.
fn churn_script_over(n: u32, list: &str) -> String {
    let host = HOST_MAC.map(|b| format!("{b:02x}")).join(":");
    format!(
        "set -e; i=0; for vf in {list}; do \
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

    /// Creates the next churn pod, claiming its VFs through `template`;
    /// returns its name.
    fn create_claim_churn_pod(&mut self, template: &str) -> Result<String> {
        let n = self.next_pod;
        self.next_pod += 1;
        let name = format!("churn-{n}");
        self.cluster()
            .kubectl_stdin(
                &["apply", "-f", "-"],
                &pod(&name, Ask::Claim(template), &churn_script_dra(n)),
            )
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

    /// The agent's and the device plugin's footprints on the node.
    ///
    /// # Errors
    /// The node shell failing, or either process missing.
    pub fn footprints(&mut self) -> Result<(Footprint, Footprint)> {
        let mut out = Vec::new();
        for comm in [AGENT_COMM, PLUGIN_COMM] {
            // One `rss <KiB>` line per process, one `fd <kind>` line per
            // descriptor; a socket's family from its inode in the
            // process's own /proc/<pid>/net tables.
            let script = format!(
                r#"for p in $({}); do
  echo rss $(grep VmRSS /proc/$p/status | tr -dc 0-9)
  for f in /proc/$p/fd/*; do
    t=$(readlink $f) || continue
    case "$t" in
      socket:*) i=${{t#socket:[}}; i=${{i%]}}
        if cat /proc/$p/net/tcp /proc/$p/net/tcp6 2>/dev/null | grep -qE " $i( |$)"; then echo fd tcp
        elif grep -qE " $i( |$)" /proc/$p/net/unix 2>/dev/null; then echo fd unix
        elif grep -qE " $i( |$)" /proc/$p/net/netlink 2>/dev/null; then echo fd netlink
        else echo fd socket; fi ;;
      anon_inode:*|/dev/*) echo "fd $t" ;;
      *) echo fd file ;;
    esac
  done
done"#,
                pids_of(comm)
            );
            let text = self.session.cluster_mut().node_exec(&script)?;
            let mut rss = Vec::new();
            let mut fd_kinds = BTreeMap::new();
            for line in text.lines() {
                match line.split_once(' ') {
                    Some(("rss", kib)) => rss.push(kib.trim().parse::<u64>()?),
                    Some(("fd", kind)) => *fd_kinds.entry(kind.trim().to_owned()).or_insert(0) += 1,
                    _ => bail!("unexpected line from the {comm} footprint: {line:?}"),
                }
            }
            let [rss_kib] = rss[..] else {
                bail!("expected one {comm} process on the node, found: {text:?}");
            };
            out.push(Footprint {
                rss_kib,
                fds: fd_kinds.values().sum(),
                fd_kinds,
            });
        }
        let plugin = out.pop().context("the device plugin's footprint")?;
        let agent = out.pop().context("the agent's footprint")?;
        Ok((agent, plugin))
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
        // The CDI directory through chroot: on the systemd node /var/run is
        // a link to /run, which /proc/1/root/var/run would resolve in the
        // shell's own root.
        let listing = self.session.cluster_mut().node_exec(
            "cd /proc/1/root; echo marks: $(ls run/vfplane/vf-state | grep handed-out); \
             echo records: $(ls run/vfplane/containers 2>/dev/null | wc -l); \
             echo cdi: $(chroot /proc/1/root ls /var/run/cdi)",
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
        // Every campaign pod ran within its pool's profile: a limits Event
        // about one is a false alarm (as the agent once raised reading a
        // container runc had not started yet, or one that was ending).
        let alarms: Vec<String> = crate::session::events(self.cluster(), "default", "VfContainerLimits")?
            .iter()
            .map(|e| format!("{}: {}", e["involvedObject"]["name"], e["message"]))
            .collect();
        ensure!(
            alarms.is_empty(),
            "container-limit Events about campaign pods, which ran within the profile: {alarms:?}"
        );
        Ok(began.elapsed())
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

/// Runs the chosen campaigns on a fresh cluster with vfplane installed by
/// Helm, printing each one's figures; the report at the end.
///
/// # Errors
/// The cluster not coming up, or the first campaign that fails.
pub fn run(testbed: &crate::testbed::Testbed, options: &Options, which: &[&str]) -> Result<Report> {
    let mut session = Session::start(
        testbed,
        crate::cluster::ClusterOptions {
            node_profile: options.node_profile,
            ..crate::cluster::ClusterOptions::default()
        },
    )?;
    if which.contains(&"churn-dra") {
        session.install_vfplane_with(&["dra.enabled=true"])?;
    } else {
        session.install_vfplane()?;
    }
    let mut campaigns = Campaigns::prepare(&mut session, options.seed)?;
    for name in which {
        let began = Instant::now();
        let result = match *name {
            "churn" => campaigns.churn(options),
            "churn-dra" => campaigns.churn_dra(options),
            "crashes" => campaigns.crashes(options),
            "restarts" => campaigns.restarts(options),
            "faults" => campaigns.faults(),
            "isolation" => campaigns.isolation(),
            "reboot" => campaigns.reboot(testbed),
            "vf-removal" => campaigns.vf_removal(),
            "shared-group" => campaigns.shared_group(testbed),
            other => bail!(
                "no campaign {other:?}: churn, churn-dra, crashes, restarts, faults, vf-removal, reboot, isolation or shared-group"
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
            serde_yaml::from_str(&pod_as("q", Ask::Limit(1), "true", Tenant::RootWithMknod)).unwrap();
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

    #[test]
    fn a_claim_churn_pod_claims_through_its_template_and_reads_one_variable_per_vf() {
        let claimed: serde_yaml::Value =
            serde_yaml::from_str(&pod("c", Ask::Claim("churn-two"), &churn_script_dra(3))).unwrap();
        assert_eq!(
            claimed["spec"]["resourceClaims"][0]["resourceClaimTemplateName"],
            "churn-two"
        );
        let container = &claimed["spec"]["containers"][0];
        assert_eq!(container["resources"]["claims"][0]["name"], "vfs");
        assert!(container["resources"].get("limits").is_none(), "{container:?}");
        let script = container["command"][2].as_str().unwrap();
        assert!(
            script.contains(
                "for vf in $(env | grep ^PCIDEVICE_VFPLANE_IO_CHURN_ | grep -v _INFO= | cut -d= -f2); do"
            ),
            "{script}"
        );
        let limited: serde_yaml::Value = serde_yaml::from_str(&pod("p", 2, "true")).unwrap();
        assert_eq!(
            limited["spec"]["containers"][0]["resources"]["limits"]["vfplane.io/churn"],
            2
        );
        assert!(limited["spec"].get("resourceClaims").is_none());
    }
}
