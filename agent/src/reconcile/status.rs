//! The node's status and the device plugin's pool config as one pass
//! leaves them: each PF and VF read back, each VF's health (the VFIO
//! readiness check, then the spec's settings), the pools of ready VFs with
//! their limits, the conditions.

use std::collections::BTreeMap;
use std::fmt;

use vfplane_host::readiness::{VFIO_PCI, VfioFacts, vfio_readiness};
use vfplane_host::{HostModel, PciAddress, PhysicalFunction, error_chain};
use vfplane_proto::container_limits::ContainerLimits;
use vfplane_proto::node_state::{DeviceType, NodeStateSpec, NodeStateStatus, PfStatus, VfStatus};
use vfplane_proto::pool::ResourceApi;
use vfplane_proto::pool::{Pool, PoolConfig, validate_pool_name};
use vfplane_proto::vf_health::{Unready, VfHealth, join_reasons};

use super::{ApplyReport, PfPlan, Reconciler, VfPlan};
use crate::netlink::{VfLinkControl, VfLinkInfo, VfSetting};

impl<N: VfLinkControl> Reconciler<N> {
    /// The status and pool config of the node as it is now.
    pub(super) fn report(
        &self,
        spec: &NodeStateSpec,
        plans: &[PfPlan],
        model: &HostModel,
        pf_errors: &BTreeMap<PciAddress, String>,
    ) -> ApplyReport {
        let mut errors = Vec::new();
        let mut pools: BTreeMap<String, Vec<PciAddress>> = BTreeMap::new();
        // A pool whose groups (on several PFs) name different limits gets
        // the strictest: a container of the pool may get a VF of any of them.
        let mut limits: BTreeMap<String, ContainerLimits> = BTreeMap::new();
        // Which API serves each pool: the first group's; a group of another
        // policy that says otherwise is an error in the status.
        let mut apis: BTreeMap<String, ResourceApi> = BTreeMap::new();
        // Every vfio-pci pool the spec names is served, ready VFs or not: a
        // pool left out of the plugin's config is unknown to the kubelet,
        // and a kubelet that never knew a resource (a node rebooted before
        // its VFs came back, say) neither reports it at 0 nor refuses a pod
        // asking for it: the API server kept the count from before the
        // reboot and a pod was started without its VF. Served empty, the
        // pool is reported at 0 and such a pod is refused.
        for group in spec.pfs.iter().flat_map(|pf| &pf.vf_groups) {
            if group.device_type == DeviceType::VfioPci && validate_pool_name(&group.resource_name).is_ok() {
                pools.entry(group.resource_name.clone()).or_default();
                let entry = limits.entry(group.resource_name.clone()).or_default();
                *entry = entry.merge(group.container_limits);
                let api = *apis
                    .entry(group.resource_name.clone())
                    .or_insert(group.resource_api);
                if api != group.resource_api {
                    errors.push(format!(
                        "pool {}: its groups disagree on resourceApi ({} and {}); served by {}",
                        group.resource_name,
                        api.as_str(),
                        group.resource_api.as_str(),
                        api.as_str()
                    ));
                }
            }
        }
        // Pools of policies that select the node but none of its PFs.
        for name in &spec.pools {
            if validate_pool_name(name).is_ok() {
                pools.entry(name.clone()).or_default();
            } else {
                errors.push(format!("spec.pools: {name:?} is not a valid pool name"));
            }
        }
        let mut pfs = Vec::new();
        for pf in &model.pfs {
            let plan = plans.iter().find(|p| p.address == pf.pci.address);
            let ifname = pf.netdevs.first().map(|n| n.name.clone());
            let mut read_error = None;
            let links = match (&ifname, plan) {
                (Some(ifname), Some(_)) => self.netlink.vf_links(ifname).unwrap_or_else(|e| {
                    read_error = Some(format!(
                        "cannot read the VFs' settings through netlink on {ifname}: {}",
                        error_chain(&e)
                    ));
                    Vec::new()
                }),
                _ => Vec::new(),
            };
            let mut pf_error = pf_errors.get(&pf.pci.address).cloned().or(read_error);
            if let Some(plan) = plan
                && pf_error.is_none()
                && pf.num_vfs != plan.num_vfs
            {
                pf_error = Some(format!("numVfs is {}, spec wants {}", pf.num_vfs, plan.num_vfs));
            }
            // A count the spec changes but the PF still has (a process
            // holds a VF that would go): the VFs that go are handed out no
            // more, so that no new container takes one while the old ones
            // leave (a rollout evicts them).
            let doomed = plan
                .filter(|p| pf.num_vfs != p.num_vfs && pf.num_vfs != 0)
                .map(|p| Mismatch::Recreated {
                    from: pf.num_vfs,
                    to: p.num_vfs,
                });
            let mut vfs = Vec::new();
            for vf in &pf.vfs {
                let wanted = plan.and_then(|p| p.vfs.iter().find(|v| v.index == vf.index));
                let link = links.iter().find(|l| l.vf == u32::from(vf.index));
                let mut health = VfHealth::Unmanaged;
                if let (Some(doomed), Some(_)) = (&doomed, wanted) {
                    health = VfHealth::from_reasons(std::slice::from_ref(doomed));
                } else if let Some(wanted) = wanted {
                    let wanted = &self.effective(wanted, vf.pci.address);
                    let tenants_mac = self.mac_is_the_tenants(wanted, vf.pci.address);
                    let problem = vf_mismatch(vf, wanted, link, spec.allow_no_iommu, tenants_mac);
                    health = VfHealth::from_reasons(problem.as_slice());
                    if let Some(reason) = problem {
                        errors.push(format!(
                            "PF {} VF {} ({}): {reason}",
                            pf.pci.address, vf.index, vf.pci.address
                        ));
                    } else if wanted.device_type == DeviceType::VfioPci {
                        pools.entry(wanted.pool.clone()).or_default().push(vf.pci.address);
                    }
                }
                vfs.push(VfStatus {
                    index: vf.index,
                    pci_address: vf.pci.address.to_string(),
                    driver: vf.pci.driver.clone(),
                    mac: link.map(|l| l.mac.to_string()),
                    vlan: link.map_or(0, |l| l.vlan),
                    spoof_chk: link.and_then(|l| l.spoof_chk),
                    trust: link.and_then(|l| l.trust),
                    iommu_group: vf.pci.iommu_group,
                    isolated: vf.isolated,
                    health,
                    pool: wanted.map(|w| w.pool.clone()),
                    owner: None,
                    owner_pod_uid: None,
                    container: None,
                });
            }
            if let Some(message) = &pf_error
                && !pf_errors.contains_key(&pf.pci.address)
            {
                errors.push(format!("PF {}: {message}", pf.pci.address));
            }
            pfs.push(PfStatus {
                pci_address: pf.pci.address.to_string(),
                name: ifname,
                vendor: pf.pci.vendor.clone(),
                device: pf.pci.device.clone(),
                driver: pf.pci.driver.clone(),
                numa_node: pf.pci.numa_node,
                link: link_state(pf),
                total_vfs: pf.total_vfs,
                num_vfs: pf.num_vfs,
                error: pf_error,
                vfs,
            });
        }
        // A pool with no VF ready is written with `devices: []`.
        let pools = PoolConfig {
            pools: pools
                .into_iter()
                .map(|(name, devices)| Pool {
                    container_limits: limits.get(&name).copied().unwrap_or_default(),
                    resource_api: apis.get(&name).copied().unwrap_or_default(),
                    name,
                    selector: None,
                    devices: Some(devices),
                    preferred_allocation: Default::default(),
                    allow_no_iommu: spec.allow_no_iommu,
                })
                .collect(),
        };
        let status = NodeStateStatus {
            pfs,
            iommu_enabled: model.iommu.enabled,
            ..NodeStateStatus::default()
        };
        ApplyReport {
            status,
            pools,
            converged: errors.is_empty(),
            errors,
        }
    }
}

/// Why a VF does not match its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mismatch {
    /// A VF of a vfio-pci pool that is not ready for VFIO: the check the
    /// device plugin applies too.
    Unready(Vec<Unready>),
    /// A VF of a netdevice pool on no driver or on vfio-pci.
    NotOnKernelDriver(Option<String>),
    /// The PF reports no settings for it.
    NoSettings,
    /// Its settings differ from the spec's.
    Settings(Vec<VfSetting>),
    /// The spec changes its PF's VF count: it goes once nothing holds a VF.
    Recreated {
        /// The PF's count.
        from: u16,
        /// The spec's.
        to: u16,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unready(reasons) => f.write_str(&join_reasons(reasons)),
            Self::NotOnKernelDriver(driver) => write!(
                f,
                "driver is {}, spec wants the kernel VF driver",
                driver.as_deref().unwrap_or("none")
            ),
            Self::NoSettings => f.write_str("the PF reports no settings for it"),
            Self::Recreated { from, to } => write!(
                f,
                "to be re-created: the spec changes numVfs from {from} to {to}, which waits until no process holds a VF of the PF"
            ),
            Self::Settings(differences) => write!(f, "{} differ from the spec", VfSetting::list(differences)),
        }
    }
}

/// Why a VF does not match its plan, if it does not.
fn vf_mismatch(
    vf: &vfplane_host::VirtualFunction,
    wanted: &VfPlan,
    link: Option<&VfLinkInfo>,
    allow_no_iommu: bool,
    tenants_mac: bool,
) -> Option<Mismatch> {
    let driver = vf.pci.driver.as_deref();
    if wanted.device_type == DeviceType::VfioPci {
        let reasons = vfio_readiness(&VfioFacts::of(vf), allow_no_iommu);
        if !reasons.is_empty() {
            return Some(Mismatch::Unready(reasons));
        }
    } else if driver.is_none() || driver == Some(VFIO_PCI) {
        return Some(Mismatch::NotOnKernelDriver(driver.map(str::to_owned)));
    }
    let Some(link) = link else {
        return Some(Mismatch::NoSettings);
    };
    let mut differences = link.differences(&wanted.settings);
    if tenants_mac {
        differences.retain(|d| *d != VfSetting::Mac);
    }
    (!differences.is_empty()).then_some(Mismatch::Settings(differences))
}

fn link_state(pf: &PhysicalFunction) -> String {
    match pf.netdevs.first() {
        None => "unknown".to_owned(),
        Some(n) if n.operstate == "up" || n.carrier == Some(true) => "up".to_owned(),
        Some(n) if n.operstate == "down" || n.carrier == Some(false) => "down".to_owned(),
        Some(_) => "unknown".to_owned(),
    }
}
