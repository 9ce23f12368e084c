//! The container behind each VF's owner: its pod UID and the limits it
//! actually runs under, read on the node.
//!
//! The kubelet names a VF's owner (`attribution`); the OCI hook recorded
//! the container when the runtime created it (`vfplane_proto::container_record`:
//! ID, first process, pod UID, cgroup). Matching the two by namespace, pod,
//! container and VF gives the owner's pod UID and its cgroup. Of the
//! cgroup (v2), `memory.max`, `cpu.max` and `pids.max` are read through
//! cgroups-rs's controllers. `cpuset.cpus.effective` and
//! `cpuset.mems.effective` are read from the same directory directly:
//! cgroups-rs (0.3.4, and 0.5.1 too) reads the cgroup v1 names
//! `cpuset.effective_cpus`/`cpuset.effective_mems` on v2 as well, and
//! answers an empty set. The locked-memory limit is the first process's,
//! from `/proc/<pid>/limits`.
//!
//! A value that breaks the pool's profile (`vfplane_proto::container_limits`)
//! or cannot be read is a problem on the VF's `container` status (of a
//! container that runs: not one whose first process is still runc's init,
//! whose rlimits runc sets after the hook that wrote the record, nor one
//! whose first process or cgroup is gone, which is ending):
//! a locked-memory limit below the pool's; `memory.max` or `cpu.max`
//! unset or below the profile's memory or CPU; for a pool with any
//! profile, nothing bounding the container's tasks (the tightest
//! `pids.max` from its cgroup up to the root), or a bound above the
//! profile's `pids`; for a `numaAligned` pool, effective CPUs or memory
//! nodes outside the VF's NUMA node, or hugepages in use on another node
//! (`hugetlb.<size>.numa_stat`, whose nodes are reported as
//! `hugepagesNodes`). Records of containers whose cgroup
//! and process are both gone are removed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use cgroups_rs::MaxValue;
use cgroups_rs::cpu::CpuController;
use cgroups_rs::memory::MemController;
use cgroups_rs::pid::PidController;
use vfplane_host::PciAddress;
use vfplane_proto::container_limits::ContainerLimits;
use vfplane_proto::container_record::{self, ContainerRecord};
use vfplane_proto::node_state::{NodeStateStatus, VfContainerStatus};
use vfplane_proto::pool::PoolConfig;
use vfplane_proto::vf_config::{self, VfOverrides};

use crate::attribution::Owners;

/// Where container records, cgroups and processes are found.
#[derive(Debug, Clone)]
pub struct ContainerView {
    /// The hook's records (`/run/vfplane/containers`).
    pub records_dir: PathBuf,
    /// The cgroup v2 mount (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The node's `/proc`.
    pub proc_root: PathBuf,
    /// The node's sysfs (NUMA nodes' CPUs).
    pub host: vfplane_host::Host,
    /// The VF state directory, where the DRA driver leaves the settings and
    /// profile of the claim a VF is prepared for (`vf_config`); `None`: no
    /// claim's profile is looked for.
    pub state_dir: Option<PathBuf>,
}

/// What the pool's profile asks of a container, as far as the node checks.
#[derive(Debug, Clone, Default)]
struct Wanted {
    limits: ContainerLimits,
    /// Whose profile that is, for the problems: `pool`, or `claim` (the
    /// pool's made stricter by the DRA claim the VF is prepared for).
    whose: &'static str,
    /// For a `numaAligned` pool whose VF's NUMA node is known: the node and
    /// its CPUs.
    numa: Option<(u32, String)>,
    /// How many CPUs the static CPU manager gave the container for itself.
    exclusive_cpus: usize,
}

impl ContainerView {
    /// Writes each owned VF's pod UID and container into `status`, and
    /// removes records of containers that are gone.
    pub fn annotate(&self, status: &mut NodeStateStatus, owners: &Owners, pools: &PoolConfig) {
        let records = match container_record::read_records(&self.records_dir) {
            Ok((records, bad)) => {
                for path in bad {
                    tracing::warn!(path = %path.display(), "container record does not parse; removed");
                    let _ = std::fs::remove_file(path);
                }
                records
            }
            Err(error) => {
                tracing::warn!(dir = %self.records_dir.display(), %error, "cannot read container records");
                Vec::new()
            }
        };
        let (records, gone): (Vec<_>, Vec<_>) = records.into_iter().partition(|r| self.alive(r));
        for record in gone {
            tracing::debug!(id = %record.id, "container gone; its record is removed");
            let _ = std::fs::remove_file(container_record::record_path(&self.records_dir, &record.id));
        }
        let pools: BTreeMap<&str, &vfplane_proto::pool::Pool> =
            pools.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        for pf in &mut status.pfs {
            let numa_node = pf.numa_node;
            for vf in &mut pf.vfs {
                let pool = vf.pool.as_deref().and_then(|p| pools.get(p));
                vf.owner_pod_uid = None;
                vf.container = None;
                let Some((address, owner)) = vf
                    .pci_address
                    .parse::<PciAddress>()
                    .ok()
                    .and_then(|address| owners.get(&address).map(|owner| (address, owner)))
                else {
                    continue;
                };
                let record = records.iter().find(|r| {
                    r.namespace.as_deref() == Some(owner.namespace.as_str())
                        && r.pod.as_deref() == Some(owner.pod.as_str())
                        && r.container.as_deref() == Some(owner.container.as_str())
                        && r.vfs.contains(&vf.pci_address)
                });
                let Some(record) = record else {
                    continue;
                };
                vf.owner_pod_uid = record.pod_uid.clone();
                let pool_limits = pool.map(|p| p.container_limits).unwrap_or_default();
                let limits = self.with_claims_profile(address, pool_limits);
                let wanted = Wanted {
                    limits,
                    whose: if limits == pool_limits { "pool" } else { "claim" },
                    numa: Some(limits)
                        .filter(|l| l.numa_aligned)
                        .and(numa_node)
                        .and_then(|node| self.host.numa_node_cpus(node).ok().map(|cpus| (node, cpus))),
                    exclusive_cpus: owner.exclusive_cpus.len(),
                };
                vf.container = Some(self.read(record, &wanted));
            }
        }
    }

    /// `pool`'s limits made stricter by the profile of the DRA claim the VF
    /// at `address` is prepared for, if it is (a file that cannot be read
    /// fails the claim's prepare, which the reconciler answers).
    fn with_claims_profile(&self, address: PciAddress, pool: ContainerLimits) -> ContainerLimits {
        let Some(dir) = &self.state_dir else {
            return pool;
        };
        match vf_config::read_claim_config(dir, address) {
            Ok(Some(words)) => words
                .parse::<VfOverrides>()
                .map_or(pool, |claim| claim.limits_over(pool)),
            _ => pool,
        }
    }

    /// The container's cgroup directory, for either cgroup driver's form of
    /// the path (see [`container_record::cgroup_dir`]).
    fn cgroup_dir(&self, record: &ContainerRecord) -> Option<PathBuf> {
        container_record::cgroup_dir(&self.cgroup_root, record.cgroups_path.as_deref()?)
    }

    /// Whether the record's process is still runc's init (`runc:[2:INIT]`),
    /// not yet the container's program.
    fn starting(&self, record: &ContainerRecord) -> bool {
        std::fs::read_to_string(self.proc_root.join(record.pid.to_string()).join("comm"))
            .is_ok_and(|comm| comm.starts_with("runc:"))
    }

    fn alive(&self, record: &ContainerRecord) -> bool {
        let process = self.proc_root.join(record.pid.to_string()).exists();
        let cgroup = self.cgroup_dir(record).is_some_and(|d| d.exists());
        process || cgroup
    }

    /// What the container runs under, with what breaks the profile.
    fn read(&self, record: &ContainerRecord, wanted: &Wanted) -> VfContainerStatus {
        // The directory under the cgroup root, whichever driver's form the
        // runtime gave (the systemd driver's names a scope in its slices).
        let cgroup = self
            .cgroup_dir(record)
            .and_then(|dir| {
                dir.strip_prefix(&self.cgroup_root)
                    .ok()
                    .map(|d| format!("/{}", d.display()))
            })
            .or_else(|| record.cgroups_path.clone());
        let mut status = VfContainerStatus {
            id: record.id.clone(),
            cgroup,
            ..VfContainerStatus::default()
        };
        if !self.proc_root.join(record.pid.to_string()).exists() {
            // Its first process has exited: the container has ended, and
            // its cgroup is on its way out (the cgroupfs driver's lingers
            // until the kubelet removes it).
            tracing::debug!(id = %record.id, pid = record.pid, "container ending: its process is gone");
            return status;
        }
        if self.starting(record) {
            // The hook that wrote the record runs before runc sets the
            // container's rlimits and starts its program: what its first
            // process has now is not what the container runs under. Read
            // at a later pass (the periodic one at the latest).
            tracing::debug!(id = %record.id, "container not started yet; its limits are read later");
            return status;
        }
        let mut problems = Vec::new();
        match self.cgroup_dir(record) {
            Some(dir) if dir.exists() => {
                let memory = MemController::new(dir.clone(), true);
                match memory.get_mem() {
                    Ok(set) => {
                        status.memory_max = set.max.map(max_text);
                        let wanted_by = wanted;
                        if let Some(wanted) = wanted.limits.memory_bytes {
                            match set.max {
                                Some(MaxValue::Value(have)) if u64::try_from(have).is_ok_and(|h| h >= wanted) => {}
                                have => problems.push(format!(
                                    "memory.max is {}, the {}'s profile wants a memory limit of at least {wanted} bytes",
                                    have.map_or_else(|| "not set".to_owned(), max_text),
                                    wanted_by.whose
                                )),
                            }
                        }
                    }
                    Err(e) => problems.push(format!("cannot read memory.max: {e}")),
                }
                let cpu = CpuController::new(dir.clone(), true);
                match (cpu.cfs_quota(), cpu.cfs_period()) {
                    (Ok(quota), Ok(period)) => {
                        let text = if quota < 0 {
                            "max".to_owned()
                        } else {
                            quota.to_string()
                        };
                        // A container on exclusive CPUs runs without a CFS
                        // quota (the kubelet drops it for them): its CPUs
                        // are its limit.
                        let exclusive_millis = u128::try_from(wanted.exclusive_cpus).unwrap_or(0) * 1000;
                        let whose = wanted.whose;
                        if let Some(wanted) = wanted.limits.cpu_millis {
                            let have = if quota < 0 && exclusive_millis > 0 {
                                Some(exclusive_millis)
                            } else {
                                u64::try_from(quota)
                                    .ok()
                                    .filter(|_| period > 0)
                                    .map(|q| u128::from(q) * 1000 / u128::from(period))
                            };
                            if have.is_none_or(|h| h < u128::from(wanted)) {
                                problems.push(format!(
                                    "cpu.max is \"{text} {period}\", the {whose}'s profile wants a CPU limit of at least {wanted} millicores"
                                ));
                            }
                        }
                        status.cpu_max = Some(format!("{text} {period}"));
                    }
                    (Err(e), _) | (_, Err(e)) => problems.push(format!("cannot read cpu.max: {e}")),
                }
                match PidController::new(dir.clone(), true).get_pid_max() {
                    Ok(max) => status.pids_max = Some(max_text(max)),
                    Err(e) => problems.push(format!("cannot read pids.max: {e}")),
                }
                if wanted.limits.any() {
                    match self.pids_bound(&dir) {
                        Ok(bound) => {
                            if let Some(problem) = pids_problem(bound, wanted.limits.pids_max, wanted.whose) {
                                problems.push(problem);
                            }
                        }
                        Err(e) => problems.push(vfplane_proto::error_chain(&e)),
                    }
                }
                // cgroups-rs reads v1 names here on v2 (see the module doc).
                for (file, slot) in [
                    ("cpuset.cpus.effective", &mut status.cpus),
                    ("cpuset.mems.effective", &mut status.mems),
                ] {
                    match std::fs::read_to_string(dir.join(file)) {
                        Ok(text) => *slot = Some(text.trim().to_owned()),
                        Err(e) => problems.push(format!("cannot read {file}: {e}")),
                    }
                }
                match hugepages_nodes(&dir) {
                    Ok(nodes) => status.hugepages_nodes = node_list(&nodes),
                    Err(e) => problems.push(e),
                }
            }
            // The runtime removes a container's cgroup when it ends (under
            // systemd, its scope goes with its last process): an ending
            // container runs under no limit and breaks none.
            Some(dir) => {
                tracing::debug!(id = %record.id, cgroup = %dir.display(), "container ending: its cgroup is gone");
                return status;
            }
            None => problems.push(format!(
                "cgroup path {:?} names no cgroup under the cgroup root",
                record.cgroups_path.as_deref().unwrap_or("")
            )),
        }
        match vfplane_host::memlock_limits(&self.proc_root, record.pid).map(|(soft, _)| soft) {
            Some(soft) => {
                status.locked_memory = Some(soft.map_or_else(|| "unlimited".to_owned(), |b| b.to_string()));
                let whose_memlock = wanted.whose;
                if let (Some(wanted), Some(have)) = (wanted.limits.locked_memory_bytes, soft)
                    && have < wanted
                {
                    problems.push(format!(
                        "RLIMIT_MEMLOCK is {have} bytes, below the {}'s lockedMemory of {wanted} bytes",
                        whose_memlock
                    ));
                }
            }
            None => problems.push(format!("cannot read the limits of pid {}", record.pid)),
        }
        if let Some((node, node_cpus)) = &wanted.numa {
            let within = |have: &Option<String>, allowed: &str| {
                let have = have.as_deref().and_then(vfplane_host::parse_cpu_list);
                let allowed = vfplane_host::parse_cpu_list(allowed);
                matches!((have, allowed), (Some(h), Some(a)) if !h.is_empty() && h.is_subset(&a))
            };
            if !within(&status.cpus, node_cpus) {
                problems.push(format!(
                    "effective CPUs {:?} are not within NUMA node {node}'s CPUs {node_cpus}",
                    status.cpus.as_deref().unwrap_or("")
                ));
            }
            if !within(&status.mems, &node.to_string()) {
                problems.push(format!(
                    "effective memory nodes {:?} are not NUMA node {node}",
                    status.mems.as_deref().unwrap_or("")
                ));
            }
            // Hugepages in use are where they are; none in use is no problem.
            if let Some(nodes) = &status.hugepages_nodes
                && nodes != &node.to_string()
            {
                problems.push(format!(
                    "hugepages are on NUMA nodes {nodes:?}, not the VF's NUMA node {node}"
                ));
            }
        }
        // A process gone since the look above ended mid-read (files of its
        // cgroup vanishing, its limits unreadable): ending, as there.
        if !problems.is_empty() && !self.proc_root.join(record.pid.to_string()).exists() {
            tracing::debug!(id = %record.id, ?problems, "container ended while read; no problem reported");
            problems.clear();
        }
        status.problems = problems;
        status
    }
}

/// The NUMA nodes on which the cgroup `dir` holds hugepages, of any size:
/// the `N<node>=<bytes>` fields of each `hugetlb.<size>.numa_stat` (cgroup
/// v2 writes one line, `total=<bytes> N0=<bytes> ...`). Empty when it
/// holds none, or the hugetlb controller is not enabled for it.
fn hugepages_nodes(dir: &std::path::Path) -> Result<std::collections::BTreeSet<u32>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut nodes = std::collections::BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name
            .to_str()
            .filter(|n| n.starts_with("hugetlb.") && n.ends_with(".numa_stat"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(entry.path()).map_err(|e| format!("cannot read {name}: {e}"))?;
        nodes.extend(numa_stat_nodes(&text));
    }
    Ok(nodes)
}

/// The nodes with a non-zero count in a `numa_stat` line's `N<node>=<n>`
/// fields (the first line only: cgroup v1's second line is hierarchical).
fn numa_stat_nodes(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.lines()
        .next()
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(|field| {
            let (node, count) = field.strip_prefix('N')?.split_once('=')?;
            let node = node.parse::<u32>().ok()?;
            (count.parse::<u64>().ok()? > 0).then_some(node)
        })
}

/// `nodes` as a list (`0,1`), `None` when empty.
fn node_list(nodes: &std::collections::BTreeSet<u32>) -> Option<String> {
    (!nodes.is_empty()).then(|| nodes.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
}

impl ContainerView {
    /// The tightest `pids.max` on the path from the container's cgroup
    /// `dir` up to (not including) the cgroup root, which has none: the
    /// most tasks the container can have. `None`: unbounded. A cgroup
    /// without the file (its parent does not enable the pids controller)
    /// bounds nothing.
    fn pids_bound(&self, dir: &std::path::Path) -> Result<Option<i64>, PidsMaxReadError> {
        let mut bound: Option<i64> = None;
        for cgroup in dir.ancestors().take_while(|d| *d != self.cgroup_root.as_path()) {
            if !cgroup.join("pids.max").exists() {
                continue;
            }
            match PidController::new(cgroup.to_path_buf(), true).get_pid_max() {
                Ok(MaxValue::Value(value)) => bound = Some(bound.map_or(value, |b| b.min(value))),
                Ok(MaxValue::Max) => {}
                Err(source) => {
                    return Err(PidsMaxReadError {
                        cgroup: cgroup.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok(bound)
    }
}

/// A `pids.max` on the way up from the container's cgroup could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read pids.max of {}", cgroup.display())]
struct PidsMaxReadError {
    /// The cgroup whose file it is.
    cgroup: PathBuf,
    /// The cause.
    #[source]
    source: cgroups_rs::error::Error,
}

/// What breaks the profile in the container's bound on tasks: none at all
/// (a pool with a profile wants one), or one above the profile's `pids`.
fn pids_problem(bound: Option<i64>, wanted: Option<u64>, whose: &str) -> Option<String> {
    match (bound, wanted) {
        (None, None) => Some(
            "pids.max is max up to the cgroup root: nothing bounds the container's processes \
             (set containerProfile.pids, or the kubelet's podPidsLimit)"
                .to_owned(),
        ),
        (None, Some(wanted)) => Some(format!(
            "pids.max is max up to the cgroup root, the {whose}'s profile wants at most {wanted}"
        )),
        (Some(have), Some(wanted)) if u64::try_from(have).map_or(true, |h| h > wanted) => Some(format!(
            "the container may run {have} processes (the tightest pids.max above it), the {whose}'s profile wants at most {wanted}"
        )),
        _ => None,
    }
}

fn max_text(value: MaxValue) -> String {
    match value {
        MaxValue::Max => "max".to_owned(),
        MaxValue::Value(v) => v.to_string(),
    }
}

#[cfg(test)]
mod tests;
