//! One reconcile pass: NodeState spec in, writes to sysfs and netlink, the
//! node's real status out.
//!
//! # Guarantees
//! - Idempotent: a pass over a node that matches writes nothing.
//! - State lives in sysfs and the PF driver, never in the agent: a pass
//!   that was killed at any instant is finished by the next one.
//! - A bad PF entry is reported on that PF; every other PF still converges,
//!   and nothing already configured is torn down because of it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use vfplane_host::readiness::VFIO_PCI;
use vfplane_host::{Host, HostModel, PciAddress, PhysicalFunction, error_chain};
use vfplane_proto::node_state::{Condition, DeviceType, NodeStateSpec, NodeStateStatus, PfSpec};
use vfplane_proto::pool::{PoolConfig, validate_pool_name};
use vfplane_proto::vf_config::{self, VfOverrides};
use vfplane_proto::vf_range::parse_vf_range;

use crate::netlink::{Mac, VfLinkControl, VfLinkInfo, VfLinkMode, VfLinkSettings, VfSetting, derived_mac};

/// What one pass did and found.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The node as it is after the pass.
    pub status: NodeStateStatus,
    /// The pools the device plugin should serve.
    pub pools: PoolConfig,
    /// True when every PF of the spec matches it.
    pub converged: bool,
    /// Why not, one line per problem.
    pub errors: Vec<String>,
}

/// Why a PF entry of the spec is refused: nothing is written for it, and
/// every other PF still converges.
#[derive(Debug, thiserror::Error)]
pub enum PfEntryError {
    /// Both ways of naming the PF.
    #[error("give pciAddress or pfName, not both")]
    BothNames,
    /// Neither.
    #[error("give pciAddress or pfName")]
    NoName,
    /// `pciAddress` is not one.
    #[error(transparent)]
    Address(#[from] vfplane_host::ParsePciAddressError),
    /// No SR-IOV PF has that address.
    #[error("no SR-IOV PF {0} on this node")]
    NoPfAt(PciAddress),
    /// No SR-IOV PF has that interface.
    #[error("no SR-IOV PF with interface {0:?} on this node")]
    NoPfNamed(String),
    /// More VFs than the device has.
    #[error("numVfs {num_vfs} is beyond what the device supports (sriov_totalvfs {total_vfs})")]
    TooManyVfs {
        /// Asked.
        num_vfs: u16,
        /// `sriov_totalvfs`.
        total_vfs: u16,
    },
    /// A VF group is wrong.
    #[error("vfGroup {group:?}")]
    Group {
        /// Its resource name.
        group: String,
        /// What is wrong.
        #[source]
        source: GroupError,
    },
    /// VFs to configure on a PF without a netdev.
    #[error("the PF has no network interface, so its VFs cannot be configured")]
    NoNetdev,
}

/// What is wrong with a VF group.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// Its resource name.
    #[error(transparent)]
    PoolName(#[from] vfplane_proto::pool::PoolNameError),
    /// VLAN beyond 802.1Q.
    #[error("vlan {0} is beyond 4094")]
    Vlan(u16),
    /// `linkState`.
    #[error(transparent)]
    LinkState(#[from] crate::netlink::LinkModeError),
    /// `vfRange`.
    #[error(transparent)]
    Range(#[from] vfplane_proto::vf_range::VfRangeError),
    /// A VF the PF will not have.
    #[error("vfRange {range:?} names VF {index}, but numVfs is {num_vfs}")]
    BeyondNumVfs {
        /// The range.
        range: String,
        /// The first index beyond.
        index: u16,
        /// numVfs.
        num_vfs: u16,
    },
    /// Not one MAC per VF.
    #[error("{macs} MACs for {vfs} VFs; give one per VF or none")]
    MacCount {
        /// MACs given.
        macs: usize,
        /// VFs in the range.
        vfs: usize,
    },
    /// A MAC.
    #[error(transparent)]
    Mac(#[from] crate::netlink::MacError),
    /// A VF in two groups.
    #[error("VF {index} is already in vfGroup {other:?} (ranges overlap)")]
    Overlap {
        /// The VF.
        index: u16,
        /// The other group.
        other: String,
    },
}

/// Why writing a PF's spec stopped.
#[derive(Debug, thiserror::Error)]
pub enum PfWriteError {
    /// The PF went between discovery and the write.
    #[error("the PF vanished")]
    Vanished,
    /// A sysfs read or write.
    #[error(transparent)]
    Host(#[from] vfplane_host::HostError),
    /// A netlink request.
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    /// VFs that would go may be in use, and nobody can tell.
    #[error(
        "not changing numVfs {from} -> {to}: cannot tell whether VF {index} ({address}) is in use; \
         set force: true to do it anyway"
    )]
    HoldersUnknown {
        /// numVfs now.
        from: u16,
        /// numVfs wanted.
        to: u16,
        /// The VF.
        index: u16,
        /// Its address.
        address: PciAddress,
        /// Why.
        #[source]
        source: HolderScanError,
    },
    /// VFs that would go are in use.
    #[error(
        "not changing numVfs {from} -> {to}: VF {index} ({address}) is in use by pid {holders:?}; \
         set force: true to do it anyway"
    )]
    InUse {
        /// numVfs now.
        from: u16,
        /// numVfs wanted.
        to: u16,
        /// The VF.
        index: u16,
        /// Its address.
        address: PciAddress,
        /// The processes holding its group.
        holders: Vec<u32>,
    },
    /// Some VFs could not be configured (the others were).
    #[error("{}", vf_problems(.0))]
    Vfs(Vec<VfProblem>),
}

/// One VF that could not be configured.
#[derive(Debug)]
pub struct VfProblem {
    /// Its index.
    pub index: u16,
    /// Its address, when it exists.
    pub address: Option<PciAddress>,
    /// Why.
    pub error: VfWriteError,
}

fn vf_problems(problems: &[VfProblem]) -> String {
    problems
        .iter()
        .map(|p| match p.address {
            Some(address) => format!("VF {} ({address}): {}", p.index, error_chain(&p.error)),
            None => format!("VF {} {}", p.index, error_chain(&p.error)),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why one VF could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VfWriteError {
    /// numVfs was written, the VF is not there.
    #[error("does not exist after setting numVfs")]
    Missing,
    /// A sysfs read or write.
    #[error(transparent)]
    Host(#[from] vfplane_host::HostError),
    /// A netlink request.
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    /// The PF's driver has no kernel VF driver vfplane knows.
    #[error("no known kernel VF driver for PF driver {0:?}")]
    NoKernelDriver(String),
    /// The PF stopped reporting the VF.
    #[error("the PF {ifname} no longer reports VF {index}")]
    NotReported {
        /// The PF.
        ifname: String,
        /// The VF.
        index: u16,
    },
    /// The PF kept another MAC.
    #[error("the PF kept another MAC than the spec's after {0} writes and driver rebinds")]
    MacNotKept(u32),
}

/// Why the holders of a VF's VFIO group are not known.
#[derive(Debug, thiserror::Error)]
pub enum HoldersError {
    /// Its IOMMU group cannot be read.
    #[error(transparent)]
    Host(#[from] vfplane_host::HostError),
    /// The process scan failed.
    #[error(transparent)]
    Scan(#[from] HolderScanError),
}

/// Where the agent finds the node.
#[derive(Debug)]
pub struct Reconciler<N> {
    host: Host,
    netlink: N,
    node_name: String,
    proc_root: PathBuf,
    /// The state directory holding the device plugin's handed-out marks
    /// (`None`: no VF is known to be held).
    handed_out_marks: Option<PathBuf>,
}

/// One VF as the spec wants it.
#[derive(Debug, Clone)]
struct VfPlan {
    index: u16,
    pool: String,
    device_type: DeviceType,
    settings: VfLinkSettings,
}

/// One PF as the spec wants it, validated against the node.
#[derive(Debug, Clone)]
struct PfPlan {
    address: PciAddress,
    ifname: Option<String>,
    num_vfs: u16,
    mtu: Option<u32>,
    force: bool,
    vfs: Vec<VfPlan>,
}

impl<N: VfLinkControl> Reconciler<N> {
    /// A reconciler for the node named `node_name` (used to derive MACs),
    /// seeing processes under `proc_root` (to tell which VFs are in use).
    pub fn new(host: Host, netlink: N, node_name: impl Into<String>, proc_root: impl Into<PathBuf>) -> Self {
        Self {
            host,
            netlink,
            node_name: node_name.into(),
            proc_root: proc_root.into(),
            handed_out_marks: None,
        }
    }

    /// Reads the device plugin's handed-out marks in `state_dir`: a trusted
    /// VF handed to a container keeps the MAC its tenant gave it through
    /// the PF (a trusted VF may; rewriting it would cut the tenant off),
    /// and is not unhealthy for it. The scrub after the container is gone
    /// writes the spec's MAC again. Every other setting is still repaired.
    #[must_use]
    pub fn with_handed_out_marks(mut self, state_dir: impl Into<PathBuf>) -> Self {
        self.handed_out_marks = Some(state_dir.into());
        self
    }

    /// Whether the spec leaves the VF's MAC to its tenant now: trusted, and
    /// handed out or prepared for a DRA claim (a mark that cannot be read
    /// counts as one: leaving a MAC alone is the safe side).
    fn mac_is_the_tenants(&self, vf: &VfPlan, address: PciAddress) -> bool {
        vf.settings.trust
            && self.handed_out_marks.as_deref().is_some_and(|dir| {
                !matches!(vfplane_proto::vf_state::handed_out_at(dir, address), Ok(None))
                    || !matches!(vf_config::read_claim_config(dir, address), Ok(None))
            })
    }

    /// The settings a DRA claim gives the VF at `address`, as their text
    /// and read (`None`: not prepared for a claim, or no state directory).
    /// A file that cannot be read or parsed is an `Err` for the claim's
    /// result; the VF then keeps the spec's settings.
    fn claim_settings(&self, address: PciAddress) -> Option<(String, Result<VfOverrides, String>)> {
        let dir = self.handed_out_marks.as_deref()?;
        match vf_config::read_claim_config(dir, address) {
            Ok(None) => None,
            Ok(Some(text)) => {
                let read = text.parse::<VfOverrides>().map_err(|e| e.to_string());
                Some((text, read))
            }
            Err(error) => Some((
                String::new(),
                Err(format!(
                    "cannot read {}: {error}",
                    vf_config::claim_config_path(dir, address).display()
                )),
            )),
        }
    }

    /// The VF as it should be now: the spec's plan with a DRA claim's
    /// settings over it.
    fn effective(&self, vf: &VfPlan, address: PciAddress) -> VfPlan {
        let mut effective = vf.clone();
        if let Some((_, Ok(claim))) = self.claim_settings(address) {
            let settings = &mut effective.settings;
            settings.mac = claim.mac.unwrap_or(settings.mac);
            settings.vlan = claim.vlan.unwrap_or(settings.vlan);
            settings.trust = claim.trust.unwrap_or(settings.trust);
            settings.spoof_chk = claim.spoof_chk.unwrap_or(settings.spoof_chk);
        }
        effective
    }

    /// The host this reconciles.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The PF side of VF settings.
    pub(crate) fn netlink(&self) -> &N {
        &self.netlink
    }

    /// Where the spec puts the VF at `address`: its PF's interface, its
    /// index and the link settings it should have. `None` when no PF of the
    /// spec makes that VF (or its PF has no interface).
    pub(crate) fn spec_of_vf(
        &self,
        spec: &NodeStateSpec,
        address: PciAddress,
    ) -> Option<(String, u16, VfLinkSettings)> {
        let model = self.host.discover().ok()?;
        for pf_spec in &spec.pfs {
            let Ok(plan) = self.plan(pf_spec, &model) else {
                continue;
            };
            let Ok(vfs) = self.host.vf_addresses(plan.address) else {
                continue;
            };
            let Some(&(index, _)) = vfs.iter().find(|(_, a)| *a == address) else {
                continue;
            };
            let vf = plan.vfs.iter().find(|v| v.index == index)?;
            return Some((plan.ifname.clone()?, index, vf.settings));
        }
        None
    }

    /// The processes that hold the VFIO group of the VF at `address` open
    /// (none for a VF without an IOMMU group).
    pub(crate) fn vfio_holders(&self, address: PciAddress) -> Result<Vec<u32>, HoldersError> {
        let Some(group) = self.host.iommu_group_id(address)? else {
            return Ok(Vec::new());
        };
        Ok(vfio_group_holders(
            &self.proc_root,
            &self.host.vfio_group_node(group),
            group,
        )?)
    }

    /// Brings the node to `spec` as far as it can and reports what it holds.
    pub fn apply(&self, spec: &NodeStateSpec) -> ApplyReport {
        let mut errors = Vec::new();
        let mut pf_errors: BTreeMap<PciAddress, String> = BTreeMap::new();
        let model = match self.host.discover() {
            Ok(model) => model,
            Err(error) => {
                let message = format!("discovery failed: {}", error_chain(&error));
                return ApplyReport {
                    status: NodeStateStatus {
                        conditions: conditions(false, std::slice::from_ref(&message)),
                        last_sync_error: Some(message.clone()),
                        ..NodeStateStatus::default()
                    },
                    pools: PoolConfig::default(),
                    converged: false,
                    errors: vec![message],
                };
            }
        };

        let mut plans = Vec::new();
        let mut claimed = BTreeSet::new();
        for (position, pf_spec) in spec.pfs.iter().enumerate() {
            match self.plan(pf_spec, &model) {
                Ok(plan) if !claimed.insert(plan.address) => {
                    let message = format!(
                        "pfs[{position}]: PF {} is listed twice; this entry is ignored",
                        plan.address
                    );
                    errors.push(message);
                }
                Ok(plan) => plans.push(plan),
                Err((address, error)) => {
                    let message = format!("pfs[{position}] ({}): {}", pf_label(pf_spec), error_chain(&error));
                    if let Some(address) = address {
                        pf_errors.insert(address, message.clone());
                    }
                    errors.push(message);
                }
            }
        }
        for plan in &plans {
            if let Err(error) = self.execute(plan, &model) {
                let message = format!("PF {}: {}", plan.address, error_chain(&error));
                pf_errors.insert(plan.address, message.clone());
                errors.push(message);
            }
        }

        let after = match self.host.discover() {
            Ok(model) => model,
            Err(error) => {
                let message = format!("discovery after apply failed: {}", error_chain(&error));
                errors.push(message);
                model
            }
        };
        let mut report = self.report(spec, &plans, &after, &pf_errors);
        report.errors.splice(0..0, errors);
        report.converged = report.errors.is_empty();
        report.status.conditions = conditions(report.converged, &report.errors);
        report.status.last_sync_error = report.errors.first().cloned();
        report
    }

    /// Validates one PF entry against the node.
    fn plan(
        &self,
        pf_spec: &PfSpec,
        model: &HostModel,
    ) -> Result<PfPlan, (Option<PciAddress>, PfEntryError)> {
        let pf = match (&pf_spec.pci_address, &pf_spec.pf_name) {
            (Some(_), Some(_)) => return Err((None, PfEntryError::BothNames)),
            (None, None) => return Err((None, PfEntryError::NoName)),
            (Some(text), None) => {
                let address: PciAddress = text.parse().map_err(|e| (None, PfEntryError::Address(e)))?;
                model
                    .pfs
                    .iter()
                    .find(|pf| pf.pci.address == address)
                    .ok_or((None, PfEntryError::NoPfAt(address)))?
            }
            (None, Some(name)) => model
                .pfs
                .iter()
                .find(|pf| pf.netdevs.iter().any(|n| &n.name == name))
                .ok_or_else(|| (None, PfEntryError::NoPfNamed(name.clone())))?,
        };
        let address = pf.pci.address;
        let fail = |error: PfEntryError| (Some(address), error);
        if pf_spec.num_vfs > pf.total_vfs {
            return Err(fail(PfEntryError::TooManyVfs {
                num_vfs: pf_spec.num_vfs,
                total_vfs: pf.total_vfs,
            }));
        }
        let ifname = pf.netdevs.first().map(|n| n.name.clone());
        let mut taken: BTreeMap<u16, String> = BTreeMap::new();
        let mut vfs = Vec::new();
        for group in &pf_spec.vf_groups {
            let bad = |source: GroupError| {
                fail(PfEntryError::Group {
                    group: group.resource_name.clone(),
                    source,
                })
            };
            validate_pool_name(&group.resource_name).map_err(|e| bad(e.into()))?;
            if group.vlan > 4094 {
                return Err(bad(GroupError::Vlan(group.vlan)));
            }
            let link_state = match &group.link_state {
                None => None,
                Some(text) => Some(text.parse::<VfLinkMode>().map_err(|e| bad(e.into()))?),
            };
            let indexes = parse_vf_range(&group.vf_range).map_err(|e| bad(e.into()))?;
            if let Some(&beyond) = indexes.iter().find(|&&i| i >= pf_spec.num_vfs) {
                return Err(bad(GroupError::BeyondNumVfs {
                    range: group.vf_range.clone(),
                    index: beyond,
                    num_vfs: pf_spec.num_vfs,
                }));
            }
            if !group.macs.is_empty() && group.macs.len() != indexes.len() {
                return Err(bad(GroupError::MacCount {
                    macs: group.macs.len(),
                    vfs: indexes.len(),
                }));
            }
            let macs: Vec<Mac> = group
                .macs
                .iter()
                .map(|m| m.parse::<Mac>().map_err(|e| bad(e.into())))
                .collect::<Result<_, _>>()?;
            for (position, &index) in indexes.iter().enumerate() {
                if let Some(other) = taken.insert(index, group.resource_name.clone()) {
                    return Err(bad(GroupError::Overlap { index, other }));
                }
                let mac = macs
                    .get(position)
                    .copied()
                    .unwrap_or_else(|| derived_mac(&self.node_name, &address.to_string(), index));
                vfs.push(VfPlan {
                    index,
                    pool: group.resource_name.clone(),
                    device_type: group.device_type,
                    settings: VfLinkSettings {
                        mac,
                        vlan: group.vlan,
                        spoof_chk: group.spoof_chk,
                        trust: group.trust,
                        max_tx_rate_mbps: group.max_tx_rate_mbps,
                        link_state,
                    },
                });
            }
        }
        if !vfs.is_empty() && ifname.is_none() {
            return Err(fail(PfEntryError::NoNetdev));
        }
        Ok(PfPlan {
            address,
            ifname,
            num_vfs: pf_spec.num_vfs,
            mtu: pf_spec.mtu,
            force: pf_spec.force,
            vfs,
        })
    }

    /// Writes what differs for one PF.
    fn execute(&self, plan: &PfPlan, model: &HostModel) -> Result<(), PfWriteError> {
        let pf = model
            .pfs
            .iter()
            .find(|pf| pf.pci.address == plan.address)
            .ok_or(PfWriteError::Vanished)?;
        if let (Some(mtu), Some(ifname)) = (plan.mtu, &plan.ifname)
            && pf.netdevs.first().and_then(|n| n.mtu) != Some(mtu)
        {
            self.netlink.set_mtu(ifname, mtu)?;
        }
        if pf.num_vfs != plan.num_vfs {
            // VFs that would go away (all of them when the count changes
            // between two non-zero values) must not be in use.
            let doomed: Vec<_> = pf
                .vfs
                .iter()
                .filter(|vf| plan.num_vfs == 0 || pf.num_vfs != 0 || vf.index >= plan.num_vfs)
                .collect();
            if !plan.force {
                for vf in doomed {
                    if let Some(group) = vf.pci.iommu_group
                        && vf.pci.driver.as_deref() == Some(VFIO_PCI)
                    {
                        let holders =
                            vfio_group_holders(&self.proc_root, &self.host.vfio_group_node(group), group)
                                .map_err(|source| PfWriteError::HoldersUnknown {
                                    from: pf.num_vfs,
                                    to: plan.num_vfs,
                                    index: vf.index,
                                    address: vf.pci.address,
                                    source,
                                })?;
                        if !holders.is_empty() {
                            return Err(PfWriteError::InUse {
                                from: pf.num_vfs,
                                to: plan.num_vfs,
                                index: vf.index,
                                address: vf.pci.address,
                                holders,
                            });
                        }
                    }
                }
            }
            self.host.set_num_vfs(plan.address, plan.num_vfs)?;
        }
        let vf_addresses = self.host.vf_addresses(plan.address)?;
        let links = match &plan.ifname {
            Some(ifname) if !plan.vfs.is_empty() => self.netlink.vf_links(ifname)?,
            _ => Vec::new(),
        };
        let mut problems = Vec::new();
        for vf in &plan.vfs {
            let Some(&(_, address)) = vf_addresses.iter().find(|(index, _)| *index == vf.index) else {
                problems.push(VfProblem {
                    index: vf.index,
                    address: None,
                    error: VfWriteError::Missing,
                });
                continue;
            };
            if let Err(error) = self.configure_vf(plan, pf, vf, address, &links) {
                problems.push(VfProblem {
                    index: vf.index,
                    address: Some(address),
                    error,
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PfWriteError::Vfs(problems))
        }
    }

    /// Configures one VF, and answers a DRA claim's settings for it (the
    /// driver waits for that answer before the claim's pod starts).
    fn configure_vf(
        &self,
        plan: &PfPlan,
        pf: &PhysicalFunction,
        vf: &VfPlan,
        address: PciAddress,
        links: &[VfLinkInfo],
    ) -> Result<(), VfWriteError> {
        let claim = self.claim_settings(address);
        let dir = self.handed_out_marks.as_deref();
        let answered = match (&claim, dir) {
            (Some(_), Some(dir)) => vf_config::read_claim_config_result(dir, address).ok().flatten(),
            _ => None,
        };
        // Settings not answered yet are written whole, the MAC too; after
        // that a trusted VF's MAC is its tenant's, as for any VF handed out.
        let unanswered = claim.as_ref().is_some_and(|(config, _)| {
            !answered
                .as_ref()
                .is_some_and(|answer| answer.config == *config && answer.outcome.is_ok())
        });
        let result =
            self.configure_effective_vf(plan, pf, &self.effective(vf, address), address, links, unanswered);
        if let (Some((config, read)), Some(dir)) = (claim, dir) {
            let outcome = match (read, &result) {
                (Err(why), _) => Err(format!("the claim's settings are not understood: {why}")),
                (Ok(_), Err(error)) => Err(error_chain(error)),
                (Ok(_), Ok(())) => Ok(()),
            };
            let answer = vf_config::ClaimConfigResult { config, outcome };
            // Written when it changes only: every pass reaches here.
            if answered.as_ref() != Some(&answer)
                && let Err(error) = vf_config::write_claim_config_result(dir, address, &answer)
            {
                tracing::warn!(%address, %error, "cannot write the answer to a claim's VF settings");
            }
        }
        result
    }

    fn configure_effective_vf(
        &self,
        plan: &PfPlan,
        pf: &PhysicalFunction,
        vf: &VfPlan,
        address: PciAddress,
        links: &[VfLinkInfo],
        claims_mac_unwritten: bool,
    ) -> Result<(), VfWriteError> {
        let mut mac_changed = false;
        if let Some(ifname) = &plan.ifname {
            // A VF the PF does not report at all gets every setting.
            let mut differences = match links.iter().find(|l| l.vf == u32::from(vf.index)) {
                Some(have) => have.differences(&vf.settings),
                None => VfSetting::ALL.to_vec(),
            };
            if self.mac_is_the_tenants(vf, address) && !claims_mac_unwritten {
                differences.retain(|d| *d != VfSetting::Mac);
            }
            mac_changed = differences.contains(&VfSetting::Mac);
            if !differences.is_empty() {
                tracing::info!(pf = %plan.address, vf = vf.index, differences = %VfSetting::list(&differences), "setting VF link attributes");
                self.netlink
                    .set_vf(ifname, u32::from(vf.index), &vf.settings, &differences)?;
            }
        }
        let driver = if vf.device_type == DeviceType::VfioPci {
            VFIO_PCI.to_owned()
        } else {
            kernel_vf_driver(pf.pci.driver.as_deref()).ok_or_else(|| {
                VfWriteError::NoKernelDriver(pf.pci.driver.clone().unwrap_or_else(|| "none".to_owned()))
            })?
        };
        // A kernel VF driver reads its MAC from the PF only when it probes:
        // after a MAC change, rebind it so the interface carries the new MAC.
        let rebind = mac_changed && vf.device_type == DeviceType::Netdevice;
        if rebind {
            self.host.unbind_driver(address)?;
        }
        self.host.bind_driver(address, &driver)?;
        if let (true, Some(ifname)) = (rebind, &plan.ifname) {
            self.confirm_kernel_vf_mac(ifname, vf, address, &driver)?;
        }
        Ok(())
    }

    /// The PF's MAC for a kernel-driver VF, read back after its driver
    /// probed: a VF driver's reset handshake with the PF can race the MAC
    /// write. The MAC is written and the driver rebound again, a bounded
    /// number of times, until the PF reports the spec's MAC.
    fn confirm_kernel_vf_mac(
        &self,
        ifname: &str,
        vf: &VfPlan,
        address: PciAddress,
        driver: &str,
    ) -> Result<(), VfWriteError> {
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let links = self.netlink.vf_links(ifname)?;
            let Some(link) = links.iter().find(|l| l.vf == u32::from(vf.index)) else {
                return Err(VfWriteError::NotReported {
                    ifname: ifname.to_owned(),
                    index: vf.index,
                });
            };
            if !link.differences(&vf.settings).contains(&VfSetting::Mac) {
                return Ok(());
            }
            if attempt == ATTEMPTS {
                break;
            }
            tracing::warn!(vf = vf.index, mac = %link.mac, attempt, "the PF reports another MAC after the VF driver probed; setting it again");
            self.netlink
                .set_vf(ifname, u32::from(vf.index), &vf.settings, &[VfSetting::Mac])?;
            self.host.unbind_driver(address)?;
            self.host.bind_driver(address, driver)?;
        }
        Err(VfWriteError::MacNotKept(ATTEMPTS))
    }
}

fn pf_label(spec: &PfSpec) -> String {
    spec.pci_address
        .clone()
        .or_else(|| spec.pf_name.clone())
        .unwrap_or_else(|| "unnamed".to_owned())
}

/// The kernel VF driver of a PF driver.
fn kernel_vf_driver(pf_driver: Option<&str>) -> Option<String> {
    let driver = match pf_driver? {
        "igb" => "igbvf",
        "ixgbe" => "ixgbevf",
        "i40e" | "ice" => "iavf",
        "mlx5_core" => "mlx5_core",
        "bnxt_en" => "bnxt_en",
        _ => return None,
    };
    Some(driver.to_owned())
}

/// `Synced` and `Degraded` for a pass.
fn conditions(converged: bool, errors: &[String]) -> Vec<Condition> {
    let message = if errors.is_empty() {
        "the node matches the spec".to_owned()
    } else {
        errors.join("; ")
    };
    vec![
        Condition {
            type_: "Synced".to_owned(),
            status: if converged { "True" } else { "False" }.to_owned(),
            reason: if converged { "Converged" } else { "NotConverged" }.to_owned(),
            message: message.clone(),
        },
        Condition {
            type_: "Degraded".to_owned(),
            status: if errors.is_empty() { "False" } else { "True" }.to_owned(),
            reason: if errors.is_empty() {
                "AllHealthy"
            } else {
                "Problems"
            }
            .to_owned(),
            message,
        },
    ]
}

mod holders;
mod status;

pub use holders::{HolderScanError, vfio_group_holders};

#[cfg(test)]
mod tests;
