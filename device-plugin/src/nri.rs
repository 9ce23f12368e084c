//! vfplane's NRI plugin: the container runtime asks it, as it creates a
//! container, how to adjust the container's spec, and it gives a container
//! that holds VFs its pools' profile:
//!
//! - `RLIMIT_MEMLOCK` as the profile's `lockedMemory` (the largest of its
//!   VFs' pools), which runc sets on the container's first process;
//! - `linux.resources.pids.limit` as the profile's `pids` (the smallest),
//!   which runc gives the container's cgroup (`TasksMax` of its scope under
//!   the systemd driver);
//! - the cpuset of the VFs' NUMA nodes for a `numaAligned` pool, only when
//!   the kubelet leaves the container's CPUs alone: with the static CPU
//!   manager every container's spec carries the kubelet's CPUs (exclusive
//!   ones for a Guaranteed container, the shared pool otherwise), and
//!   vfplane never widens or overrides them.
//!
//! Which VFs a container holds it reads from the container's environment
//! (`PCIDEVICE_VFPLANE_IO_<POOL>`, set by Allocate), and what each VF's pool
//! asks from the plugin's own table of the VFs it serves. A container
//! naming a VF the plugin does not serve is refused: it would otherwise
//! run without its pool's limits. Why NRI and not an OCI hook writing the
//! cgroup: ARCHITECTURE.md ("Container limits").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vfplane_host::PciAddress;
use vfplane_nri::{Events, Plugin, Refusal, api};

use crate::cdi::CdiEntry;
use crate::server::NodeContext;

/// The name vfplane registers with the runtime.
pub const PLUGIN_NAME: &str = vfplane_proto::vf_policy::NRI_PLUGIN_NAME;
/// Its place among the runtime's plugins (called in this order): after
/// the usual resource-policy plugins (`10`), so a cpuset they give is in
/// the request vfplane sees.
pub const PLUGIN_INDEX: &str = "50";
/// Where containerd listens for NRI plugins.
pub const DEFAULT_SOCKET: &str = "/var/run/nri/nri.sock";

/// The `RLIMIT_MEMLOCK` name in an OCI spec.
pub const MEMLOCK: &str = "RLIMIT_MEMLOCK";

/// The plugin, over the device plugin's table of the VFs it serves.
#[derive(Debug)]
pub(crate) struct ContainerLimits {
    node: Arc<NodeContext>,
}

impl ContainerLimits {
    pub(crate) fn new(node: Arc<NodeContext>) -> Self {
        Self { node }
    }
}

/// Whether vfplane's NRI plugin is registered with the runtime now.
#[derive(Debug, Default)]
pub struct NriState {
    connected: AtomicBool,
}

impl NriState {
    /// True while the plugin is registered with the runtime.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

impl Plugin for ContainerLimits {
    fn events(&self) -> Events {
        Events::of(&[api::Event::CreateContainer])
    }

    fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> Result<api::ContainerAdjustment, Refusal> {
        let table = self.node.vf_edits();
        let adjustment = adjustment(container, |vf| table.get(&vf).cloned())?;
        if adjustment != api::ContainerAdjustment::default() {
            tracing::info!(
                namespace = %pod.namespace,
                pod = %pod.name,
                container = %container.name,
                adjustment = %describe(&adjustment),
                "NRI: a VF container gets its pools' profile"
            );
        }
        Ok(adjustment)
    }

    fn connection_changed(&self, connected: bool) {
        self.node.nri.connected.store(connected, Ordering::Relaxed);
    }
}

/// The adjustment a container gets, given what each VF's pool asks
/// (`edits`; `None` for a VF the plugin does not serve).
///
/// # Errors
/// A VF variable that does not parse, or a VF the plugin does not serve.
pub(crate) fn adjustment(
    container: &api::Container,
    edits: impl Fn(PciAddress) -> Option<CdiEntry>,
) -> Result<api::ContainerAdjustment, Refusal> {
    let vfs = vfplane_proto::container_env::vfs_in_env(container.env.iter().map(String::as_str))
        .map_err(|e| Refusal::invalid(vfplane_proto::error_chain(&e)))?;
    if vfs.is_empty() {
        return Ok(api::ContainerAdjustment::default());
    }
    let mut memlock: Option<u64> = None;
    let mut pids: Option<u64> = None;
    let mut cpus = BTreeSet::new();
    let mut mems = BTreeSet::new();
    for vf in vfs {
        let entry = edits(vf).ok_or_else(|| {
            Refusal::precondition(format!(
                "vfplane serves no VF {vf} (it left its pool, or lost its VFIO node, since it was handed \
                 out): the container would run without its pool's profile"
            ))
        })?;
        memlock = memlock.max(entry.locked_memory_bytes);
        pids = match (pids, entry.pids_max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(cpuset) = entry.cpuset {
            cpus.extend(vfplane_host::parse_cpu_list(&cpuset.cpus).unwrap_or_default());
            mems.extend(vfplane_host::parse_cpu_list(&cpuset.mems).unwrap_or_default());
        }
    }
    let kubelet_cpus = container
        .linux
        .as_ref()
        .and_then(|l| l.resources.as_ref())
        .and_then(|r| r.cpu.as_ref())
        .is_some_and(|cpu| !cpu.cpus.is_empty());

    let mut adjust = api::ContainerAdjustment::default();
    if let Some(bytes) = memlock {
        adjust.rlimits.push(api::PosixRlimit {
            r#type: MEMLOCK.to_owned(),
            hard: bytes,
            soft: bytes,
        });
    }
    let mut resources = api::LinuxResources::default();
    if let Some(limit) = pids {
        resources.pids = Some(api::LinuxPids {
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
        });
    }
    if !cpus.is_empty() && !mems.is_empty() && !kubelet_cpus {
        resources.cpu = Some(api::LinuxCpu {
            cpus: cpu_list(&cpus),
            mems: cpu_list(&mems),
            ..Default::default()
        });
    }
    if resources != api::LinuxResources::default() {
        adjust.linux = Some(api::LinuxContainerAdjustment {
            resources: Some(resources),
            ..Default::default()
        });
    }
    Ok(adjust)
}

/// `0-3,8` form of a set of numbers.
fn cpu_list(set: &BTreeSet<u32>) -> String {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &n in set {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => ranges.push((n, n)),
        }
    }
    ranges
        .iter()
        .map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") })
        .collect::<Vec<_>>()
        .join(",")
}

/// The adjustment in a few words, for the log.
fn describe(adjust: &api::ContainerAdjustment) -> String {
    let mut parts = BTreeMap::new();
    for rlimit in &adjust.rlimits {
        parts.insert(rlimit.r#type.clone(), rlimit.soft.to_string());
    }
    if let Some(resources) = adjust.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        if let Some(pids) = &resources.pids {
            parts.insert("pids".to_owned(), pids.limit.to_string());
        }
        if let Some(cpu) = &resources.cpu {
            parts.insert("cpus".to_owned(), cpu.cpus.clone());
            parts.insert("mems".to_owned(), cpu.mems.clone());
        }
    }
    parts
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdi::NumaCpuset;
    use crate::health::VfioNode;

    fn entry(memlock: Option<u64>, pids: Option<u64>, numa: Option<(&str, &str)>) -> CdiEntry {
        CdiEntry {
            node: VfioNode::Group(4),
            locked_memory_bytes: memlock,
            cpuset: numa.map(|(cpus, mems)| NumaCpuset {
                cpus: cpus.to_owned(),
                mems: mems.to_owned(),
            }),
            pids_max: pids,
        }
    }

    fn container(env: &[&str], kubelet_cpus: &str) -> api::Container {
        api::Container {
            env: env.iter().map(|e| (*e).to_owned()).collect(),
            linux: Some(api::LinuxContainer {
                resources: Some(api::LinuxResources {
                    cpu: Some(api::LinuxCpu {
                        cpus: kubelet_cpus.to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn table(vf_addr: PciAddress) -> Option<CdiEntry> {
        match vf_addr.to_string().as_str() {
            "0000:00:12.0" => Some(entry(Some(64 << 20), Some(512), Some(("2-3", "1")))),
            "0000:00:12.2" => Some(entry(Some(128 << 20), Some(256), Some(("4", "2")))),
            "0000:00:12.4" => Some(entry(None, None, None)),
            _ => None,
        }
    }

    #[test]
    fn a_container_without_vfs_is_left_as_it_is() {
        let adjust = adjustment(&container(&["PATH=/bin"], ""), table).unwrap();
        assert_eq!(adjust, api::ContainerAdjustment::default());
    }

    #[test]
    fn a_vf_container_gets_its_pools_memlock_pids_and_numa_cpuset() {
        let adjust = adjustment(&container(&["PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0"], ""), table).unwrap();
        assert_eq!(
            adjust.rlimits,
            [api::PosixRlimit {
                r#type: "RLIMIT_MEMLOCK".into(),
                hard: 64 << 20,
                soft: 64 << 20
            }]
        );
        let resources = adjust.linux.unwrap().resources.unwrap();
        assert_eq!(resources.pids, Some(api::LinuxPids { limit: 512 }));
        let cpu = resources.cpu.unwrap();
        assert_eq!((cpu.cpus.as_str(), cpu.mems.as_str()), ("2-3", "1"));
    }

    #[test]
    fn several_vfs_take_the_largest_memlock_the_smallest_pids_and_every_node() {
        let adjust = adjustment(
            &container(
                &[
                    "PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0",
                    "PCIDEVICE_VFPLANE_IO_SLOW=0000:00:12.2,0000:00:12.4",
                ],
                "",
            ),
            table,
        )
        .unwrap();
        assert_eq!(
            adjust.rlimits.len(),
            1,
            "one entry per rlimit: the runtime refuses two"
        );
        assert_eq!(adjust.rlimits[0].soft, 128 << 20);
        let resources = adjust.linux.unwrap().resources.unwrap();
        assert_eq!(resources.pids, Some(api::LinuxPids { limit: 256 }));
        let cpu = resources.cpu.unwrap();
        assert_eq!((cpu.cpus.as_str(), cpu.mems.as_str()), ("2-4", "1-2"));
        assert_eq!(
            describe(
                &adjustment(&container(&["PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0"], ""), table).unwrap()
            ),
            "RLIMIT_MEMLOCK=67108864 cpus=2-3 mems=1 pids=512"
        );
    }

    #[test]
    fn the_kubelets_cpus_are_never_overridden() {
        let adjust = adjustment(
            &container(&["PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0"], "3"),
            table,
        )
        .unwrap();
        let resources = adjust.linux.unwrap().resources.unwrap();
        assert_eq!(resources.cpu, None, "the static CPU manager's cpuset stays");
        assert_eq!(
            resources.pids,
            Some(api::LinuxPids { limit: 512 }),
            "the rest still applies"
        );
        assert_eq!(adjust.rlimits.len(), 1);
    }

    #[test]
    fn a_pool_without_a_profile_adjusts_nothing() {
        let adjust = adjustment(
            &container(&["PCIDEVICE_VFPLANE_IO_PLAIN=0000:00:12.4"], ""),
            table,
        )
        .unwrap();
        assert_eq!(adjust, api::ContainerAdjustment::default());
    }

    #[test]
    fn a_vf_vfplane_does_not_serve_or_a_garbled_variable_is_refused_by_name() {
        let refused =
            adjustment(&container(&["PCIDEVICE_VFPLANE_IO_FAST=0000:00:13.0"], ""), table).unwrap_err();
        assert_eq!(refused.code, vfplane_nri::ttrpc::code::FAILED_PRECONDITION);
        assert!(
            refused.message.starts_with("vfplane serves no VF 0000:00:13.0"),
            "{}",
            refused.message
        );
        let garbled = adjustment(&container(&["PCIDEVICE_VFPLANE_IO_FAST=12.0"], ""), table).unwrap_err();
        assert_eq!(garbled.code, vfplane_nri::ttrpc::code::INVALID_ARGUMENT);
        assert!(
            garbled
                .message
                .starts_with("PCIDEVICE_VFPLANE_IO_FAST is not a list of PCI addresses"),
            "{}",
            garbled.message
        );
    }

    #[test]
    fn cpu_lists_are_ranges() {
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8].into_iter().collect()), "0-2,5,7-8");
        assert_eq!(cpu_list(&[3].into_iter().collect()), "3");
    }
}
