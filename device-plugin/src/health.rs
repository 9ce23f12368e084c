//! Health of one VF: what is probed in sysfs, `/dev` and the VF state
//! directory, and the rules that turn it into Healthy or Unhealthy.
//!
//! A VF is Healthy only when every one of these holds; each one that does
//! not is an [`Unready`] reason:
//!
//! 1. its PCI device directory exists ([`Unready::Gone`]);
//! 2. it is ready for VFIO, by the check the agent applies too
//!    ([`vfplane_host::readiness`]: bound to `vfio-pci`, alone in an IOMMU
//!    group, the group's node present, a no-IOMMU node only in a pool with
//!    `allowNoIommu`);
//! 3. its PF's link is not down ([`Unready::PfLinkDown`]): a PF with
//!    network interfaces none of which is up; a PF without one (not bound
//!    to a network driver) has no link state and does not count;
//! 4. the agent's scrub has not failed on it ([`Unready::ScrubFailed`], the
//!    VF quarantined), has not stalled ([`Unready::ScrubStalled`]:
//!    `scrub-pending` older than [`SCRUB_STALLED`], so no agent is
//!    finishing it) and its state file holds no word this plugin does not
//!    know ([`Unready::UnknownState`]; see [`vfplane_proto::vf_state`]).
//!
//! A scrub that is running (`scrub-pending`) leaves the VF Healthy. The
//! VF was freed when its pod left, and the scheduler counts it free from
//! that moment; were it Unhealthy to the kubelet for the few seconds of the
//! reset, a pod the scheduler placed on it would be refused at admission
//! ("requested number of devices unavailable"), and for good. Allocate
//! waits for the running scrub instead and refuses a VF still unscrubbed
//! after that wait (`server.rs`).
//!
//! Nothing is remembered: a VF whose causes went away is Healthy on the
//! next probe.

use std::fmt;
use std::time::Duration;

use vfplane_host::readiness::{VfioFacts, vfio_readiness};
use vfplane_host::{DeviceDir, Host, Netdev, PciAddress, VfioNodes};
pub use vfplane_proto::vf_health::Unready;
pub use vfplane_proto::vf_state::SCRUB_STALLED;
use vfplane_proto::vf_state::{ParseVfStateError, VfState};

pub use vfplane_host::VfioNode;

/// The link state of a PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// At least one of its interfaces is up.
    Up,
    /// It has interfaces and none is up; the first one's name.
    Down(String),
    /// No interface (or unreadable): no opinion.
    Unknown,
}

/// What one probe of a VF found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfObservation {
    /// The device directory exists.
    pub present: bool,
    /// The bound driver.
    pub driver: Option<String>,
    /// The IOMMU group.
    pub group: Option<u32>,
    /// Every member of the group, `None` when there is no group or it could
    /// not be read.
    pub group_members: Option<Vec<PciAddress>>,
    /// The group's VFIO node, when it exists.
    pub vfio_node: Option<VfioNode>,
    /// The PF's link.
    pub pf_link: LinkState,
    /// The agent's state file.
    pub state: Option<Result<VfState, ParseVfStateError>>,
    /// How long that file has held its word, when known.
    pub state_age: Option<Duration>,
    /// Something could not be read (other than a file being absent).
    pub read_error: Option<String>,
}

/// Healthy, or the reasons it is not.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    /// Empty when healthy.
    pub reasons: Vec<Unready>,
}

impl Health {
    /// True when nothing is wrong.
    pub fn is_healthy(&self) -> bool {
        self.reasons.is_empty()
    }

    /// `Healthy` or `Unhealthy`, as the kubelet wants it.
    pub fn as_kubelet_str(&self) -> &'static str {
        if self.is_healthy() {
            vfplane_proto::HEALTHY
        } else {
            vfplane_proto::UNHEALTHY
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_healthy() {
            return f.write_str("healthy");
        }
        f.write_str(&vfplane_proto::vf_health::join_reasons(&self.reasons))
    }
}

/// Applies the health rules (module docs) to one observation.
pub fn evaluate(
    address: PciAddress,
    pf: Option<PciAddress>,
    observation: &VfObservation,
    allow_no_iommu: bool,
) -> Health {
    if !observation.present {
        return Health {
            reasons: vec![Unready::Gone],
        };
    }
    let facts = VfioFacts {
        address,
        driver: observation.driver.as_deref(),
        group: observation.group,
        group_members: observation.group_members.as_deref(),
        vfio_node: observation.vfio_node,
    };
    let mut reasons = vfio_readiness(&facts, allow_no_iommu);
    if let (LinkState::Down(netdev), Some(pf)) = (&observation.pf_link, pf) {
        reasons.push(Unready::PfLinkDown {
            pf,
            netdev: netdev.clone(),
        });
    }
    match &observation.state {
        Some(Ok(VfState::ScrubPending)) if observation.state_age.is_some_and(|age| age > SCRUB_STALLED) => {
            reasons.push(Unready::ScrubStalled);
        }
        // A running scrub is Allocate's to wait for (module docs).
        None | Some(Ok(VfState::ScrubPending)) => {}
        Some(Ok(VfState::ScrubFailed)) => reasons.push(Unready::ScrubFailed),
        Some(Err(error)) => reasons.push(Unready::UnknownState(error.0.clone())),
    }
    if let Some(error) = &observation.read_error {
        reasons.push(Unready::Unreadable(error.clone()));
    }
    Health { reasons }
}

/// The link state of a PF from its interfaces: up when any is up; an
/// interface is down when its `operstate` says `down`,
/// `lowerlayerdown` or `notpresent`, or its `carrier` is 0.
pub fn link_state(netdevs: &[Netdev]) -> LinkState {
    let Some(first) = netdevs.first() else {
        return LinkState::Unknown;
    };
    let down = |n: &Netdev| {
        matches!(n.operstate.as_str(), "down" | "lowerlayerdown" | "notpresent") || n.carrier == Some(false)
    };
    if netdevs.iter().all(down) {
        LinkState::Down(first.name.clone())
    } else {
        LinkState::Up
    }
}

/// Reads a PF's link state; an unreadable or vanished PF has no opinion
/// (its VFs are gone too, and say so themselves).
pub fn probe_pf_link(host: &Host, pf: PciAddress) -> LinkState {
    match host.netdevs(pf) {
        Ok(netdevs) => link_state(&netdevs),
        Err(_) => LinkState::Unknown,
    }
}

/// Probes one VF's sysfs and dev entries afresh, group included (Allocate
/// uses it on the VFs it hands out). The PF link and the VF state come from
/// the caller.
pub fn probe_vf(
    host: &Host,
    address: PciAddress,
    pf_link: LinkState,
    state: Option<Result<VfState, ParseVfStateError>>,
) -> VfObservation {
    let dir = host.resolve_device(address);
    let mut observation = VfObservation {
        present: true,
        driver: None,
        group: None,
        group_members: None,
        vfio_node: None,
        pf_link,
        state,
        state_age: None,
        read_error: None,
    };
    match dir.driver() {
        Ok(driver) => observation.driver = driver,
        Err(error) => observation.read_error = Some(vfplane_host::error_chain(&error)),
    }
    if observation.driver.is_none() && !dir.is_present() {
        observation.present = false;
        observation.read_error = None;
        return observation;
    }
    match host.iommu_group_id(address) {
        Ok(group) => observation.group = group,
        Err(error) if error.is_vanished() => {}
        Err(error) => observation.read_error = Some(vfplane_host::error_chain(&error)),
    }
    if let Some(group) = observation.group {
        match host.iommu_group(group) {
            Ok(g) => observation.group_members = Some(g.members),
            Err(error) if error.is_vanished() => {}
            Err(error) => observation.read_error = Some(vfplane_host::error_chain(&error)),
        }
        observation.vfio_node = host.vfio_node(group);
    }
    observation
}

/// What discovery learned about a VF's IOMMU group. Group membership
/// changes only when a PCI device is added or removed, which changes the
/// PCI device list and so triggers a new discovery: the fast probe need not
/// read it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownGroup {
    /// The group number.
    pub id: u32,
    /// Its members.
    pub members: Vec<PciAddress>,
}

/// The per-tick probe: the VF's `driver` link (plus a `stat` of its
/// directory when there is none) and its VFIO node; the group comes from
/// discovery. `device` is the VF's directory resolved at discovery, so each
/// probe walks no symlink.
pub fn probe_vf_fast(
    vfio_nodes: &VfioNodes,
    device: &DeviceDir,
    group: Option<&KnownGroup>,
    pf_link: LinkState,
    state: Option<Result<VfState, ParseVfStateError>>,
) -> VfObservation {
    let mut observation = VfObservation {
        present: true,
        driver: None,
        group: group.map(|g| g.id),
        group_members: group.map(|g| g.members.clone()),
        vfio_node: None,
        pf_link,
        state,
        state_age: None,
        read_error: None,
    };
    match device.driver() {
        Ok(driver) => observation.driver = driver,
        Err(error) => observation.read_error = Some(vfplane_host::error_chain(&error)),
    }
    if observation.driver.is_none() && !device.is_present() {
        observation.present = false;
        observation.read_error = None;
        return observation;
    }
    if let Some(group) = group {
        observation.vfio_node = vfio_nodes.node(group.id);
    }
    observation
}

/// The link state of a PF from its interfaces' `operstate` and `carrier`
/// only (the per-tick form of [`probe_pf_link`]).
pub fn probe_pf_link_fast(pf: &DeviceDir) -> LinkState {
    pf.link_states()
        .map_or(LinkState::Unknown, |netdevs| link_state(&netdevs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> PciAddress {
        text.parse().unwrap()
    }

    fn good(address: PciAddress) -> VfObservation {
        VfObservation {
            present: true,
            driver: Some(vfplane_host::readiness::VFIO_PCI.to_owned()),
            group: Some(4),
            group_members: Some(vec![address]),
            vfio_node: Some(VfioNode::Group(4)),
            pf_link: LinkState::Up,
            state: None,
            state_age: None,
            read_error: None,
        }
    }

    #[test]
    fn each_rule_makes_its_reason() {
        let vf = addr("0000:00:12.0");
        let pf = Some(addr("0000:00:02.0"));
        assert!(evaluate(vf, pf, &good(vf), false).is_healthy());
        let cases: Vec<(VfObservation, &str)> = vec![
            (
                VfObservation {
                    present: false,
                    ..good(vf)
                },
                "gone",
            ),
            (
                VfObservation {
                    driver: None,
                    ..good(vf)
                },
                "not_on_vfio",
            ),
            (
                VfObservation {
                    driver: Some("igbvf".into()),
                    ..good(vf)
                },
                "not_on_vfio",
            ),
            (
                VfObservation {
                    group: None,
                    group_members: None,
                    vfio_node: None,
                    ..good(vf)
                },
                "no_iommu_group",
            ),
            (
                VfObservation {
                    group_members: Some(vec![vf, addr("0000:00:12.2")]),
                    ..good(vf)
                },
                "not_isolated",
            ),
            (
                VfObservation {
                    vfio_node: None,
                    ..good(vf)
                },
                "vfio_node_missing",
            ),
            (
                VfObservation {
                    vfio_node: Some(VfioNode::NoIommu(4)),
                    ..good(vf)
                },
                "no_iommu_not_allowed",
            ),
            (
                VfObservation {
                    pf_link: LinkState::Down("eth0".into()),
                    ..good(vf)
                },
                "pf_link_down",
            ),
            (
                VfObservation {
                    state: Some(Ok(VfState::ScrubFailed)),
                    ..good(vf)
                },
                "scrub_failed",
            ),
            (
                VfObservation {
                    state: Some(Err(ParseVfStateError("weird".into()))),
                    ..good(vf)
                },
                "unknown_state",
            ),
        ];
        for (observation, label) in cases {
            let health = evaluate(vf, pf, &observation, false);
            assert!(!health.is_healthy(), "{label}");
            assert_eq!(health.reasons[0].label(), label, "{health}");
            assert_eq!(health.as_kubelet_str(), vfplane_proto::UNHEALTHY);
        }
        let no_iommu = VfObservation {
            vfio_node: Some(VfioNode::NoIommu(4)),
            ..good(vf)
        };
        assert!(evaluate(vf, pf, &no_iommu, true).is_healthy());
        // A running scrub is not a health matter: Allocate waits for it.
        let scrubbing = VfObservation {
            state: Some(Ok(VfState::ScrubPending)),
            ..good(vf)
        };
        assert!(evaluate(vf, pf, &scrubbing, false).is_healthy());
        let young = VfObservation {
            state_age: Some(SCRUB_STALLED - Duration::from_secs(1)),
            ..scrubbing.clone()
        };
        assert!(evaluate(vf, pf, &young, false).is_healthy());
        // Pending past any scrub's length: nobody is finishing it.
        let stalled = VfObservation {
            state_age: Some(SCRUB_STALLED + Duration::from_secs(1)),
            ..scrubbing
        };
        let health = evaluate(vf, pf, &stalled, false);
        assert_eq!(health.reasons, [Unready::ScrubStalled]);
        assert_eq!(health.reasons[0].label(), "scrub_stalled");
        assert_eq!(
            health.to_string(),
            "scrub pending for over 60 s, longer than a scrub takes (is the agent running?)"
        );
    }

    #[test]
    fn link_state_rules() {
        let netdev = |operstate: &str, carrier: Option<bool>| Netdev {
            name: "eth0".into(),
            operstate: operstate.into(),
            carrier,
            mac: None,
            mtu: None,
        };
        assert_eq!(link_state(&[]), LinkState::Unknown);
        assert_eq!(link_state(&[netdev("up", Some(true))]), LinkState::Up);
        assert_eq!(link_state(&[netdev("unknown", Some(true))]), LinkState::Up);
        assert_eq!(
            link_state(&[netdev("down", None)]),
            LinkState::Down("eth0".into())
        );
        assert_eq!(
            link_state(&[netdev("up", Some(false))]),
            LinkState::Down("eth0".into())
        );
    }

    #[test]
    fn reasons_read_well() {
        let reason = Unready::NotOnVfio(Some("igbvf".into()));
        assert_eq!(reason.to_string(), "bound to igbvf, not vfio-pci");
        let health = Health {
            reasons: vec![Unready::Gone, Unready::VfioNodeMissing(4)],
        };
        assert_eq!(
            health.to_string(),
            "the PCI device is gone; /dev/vfio/4 is missing"
        );
    }
}
