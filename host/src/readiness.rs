//! Whether a VF can be handed to a container through VFIO: the one check
//! the agent (its status and pools) and the device plugin (what it
//! advertises, what Allocate hands out) both apply.
//!
//! A VF is ready for VFIO when
//! 1. it is bound to `vfio-pci` ([`Unready::NotOnVfio`]);
//! 2. it has an IOMMU group ([`Unready::NoIommuGroup`]) and is alone in it
//!    ([`Unready::NotIsolated`]): handing it to a container hands out the
//!    whole group;
//! 3. its group has a node under the dev root
//!    ([`Unready::VfioNodeMissing`]); a `noiommu-<group>` node (VFIO's
//!    no-IOMMU mode, no DMA isolation) counts only where the pool sets
//!    `allowNoIommu` ([`Unready::NoIommuNotAllowed`]).
//!
//! The plugin adds what it alone watches (the PF's link, the agent's scrub
//! word); the agent adds what it alone wants (the spec's settings).

use crate::{PciAddress, VfioNode, VirtualFunction};
pub use vfplane_proto::vf_health::{Unready, VFIO_PCI};

/// What the VFIO rules read of one VF, from wherever it was read: the
/// agent's model ([`VfioFacts::of`]) or the plugin's fast probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VfioFacts<'a> {
    /// The VF.
    pub address: PciAddress,
    /// The bound driver.
    pub driver: Option<&'a str>,
    /// Its IOMMU group.
    pub group: Option<u32>,
    /// Every member of the group; `None` when it is not known (no group,
    /// or it could not be read), which no rule counts against the VF.
    pub group_members: Option<&'a [PciAddress]>,
    /// The group's VFIO node, when it exists.
    pub vfio_node: Option<VfioNode>,
}

impl<'a> VfioFacts<'a> {
    /// The facts of a VF of the node's model.
    pub fn of(vf: &'a VirtualFunction) -> Self {
        Self {
            address: vf.pci.address,
            driver: vf.pci.driver.as_deref(),
            group: vf.pci.iommu_group,
            group_members: vf.iommu.as_ref().map(|g| g.members.as_slice()),
            vfio_node: vf.vfio_node,
        }
    }
}

/// The reasons (module docs) the VF is not ready for VFIO; empty when it is.
pub fn vfio_readiness(facts: &VfioFacts<'_>, allow_no_iommu: bool) -> Vec<Unready> {
    let mut reasons = Vec::new();
    if facts.driver != Some(VFIO_PCI) {
        reasons.push(Unready::NotOnVfio(facts.driver.map(str::to_owned)));
    }
    let Some(group) = facts.group else {
        reasons.push(Unready::NoIommuGroup);
        return reasons;
    };
    if let Some(members) = facts.group_members {
        let others: Vec<PciAddress> = members.iter().copied().filter(|m| *m != facts.address).collect();
        if !others.is_empty() {
            reasons.push(Unready::NotIsolated(others));
        }
    }
    match facts.vfio_node {
        None => reasons.push(Unready::VfioNodeMissing(group)),
        Some(VfioNode::NoIommu(group)) if !allow_no_iommu => reasons.push(Unready::NoIommuNotAllowed(group)),
        Some(_) => {}
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    const VF: &str = "0000:00:12.0";
    const OTHER: &str = "0000:00:12.2";

    fn address(text: &str) -> PciAddress {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn a_vfio_vf_alone_in_its_group_with_its_node_is_ready() {
        let members = [address(VF)];
        let facts = VfioFacts {
            address: address(VF),
            driver: Some(VFIO_PCI),
            group: Some(4),
            group_members: Some(&members),
            vfio_node: Some(VfioNode::Group(4)),
        };
        assert_eq!(vfio_readiness(&facts, false), []);
    }

    #[test]
    fn each_rule_names_its_reason() {
        let shared = [address(VF), address(OTHER)];
        let base = VfioFacts {
            address: address(VF),
            driver: Some(VFIO_PCI),
            group: Some(4),
            group_members: Some(&shared),
            vfio_node: None,
        };
        assert_eq!(
            vfio_readiness(&base, false),
            [
                Unready::NotIsolated(vec![address(OTHER)]),
                Unready::VfioNodeMissing(4)
            ]
        );
        let unbound = VfioFacts {
            driver: Some("igbvf"),
            group: None,
            group_members: None,
            ..base
        };
        assert_eq!(
            vfio_readiness(&unbound, true),
            [Unready::NotOnVfio(Some("igbvf".into())), Unready::NoIommuGroup]
        );
        let noiommu = VfioFacts {
            group_members: None,
            vfio_node: Some(VfioNode::NoIommu(4)),
            ..base
        };
        assert_eq!(vfio_readiness(&noiommu, false), [Unready::NoIommuNotAllowed(4)]);
        assert_eq!(vfio_readiness(&noiommu, true), []);
    }
}
