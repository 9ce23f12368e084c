//! A VF's health, in one vocabulary for the agent, the device plugin and
//! the controller.
//!
//! - [`Unready`]: one reason a VF cannot be handed to a container. The
//!   rules that find them are `vfplane_host::readiness` (the VFIO ones,
//!   which the agent and the plugin both apply) and the plugin's health
//!   probe (the PF's link and the agent's scrub word besides).
//! - [`VfHealth`]: the health the agent reports for each VF in the
//!   NodeState status. On the wire it is the string it has always been
//!   (`Healthy`, `Unhealthy: <reason>`, `Unhealthy: scrub failed: <why>`,
//!   `Scrubbing`, `Unmanaged`); in Rust a reader matches its variants
//!   instead of prefixes of that string.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pci::PciAddress;
use crate::vf_state::SCRUB_STALLED;

/// The kernel driver of a VF handed to a container.
pub const VFIO_PCI: &str = "vfio-pci";

/// One reason a VF cannot be handed to a container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unready {
    /// The PCI device does not exist (VFs removed, or never made).
    Gone,
    /// Bound to another driver, or to none.
    NotOnVfio(Option<String>),
    /// No IOMMU group: no IOMMU and no VFIO no-IOMMU mode.
    NoIommuGroup,
    /// Other devices share the IOMMU group: handing the VF to a container
    /// would hand them out too.
    NotIsolated(Vec<PciAddress>),
    /// The group has no node under the dev root.
    VfioNodeMissing(u32),
    /// Only a VFIO no-IOMMU node exists (no DMA isolation) and the pool
    /// does not allow it.
    NoIommuNotAllowed(u32),
    /// The PF's link is down.
    PfLinkDown {
        /// The PF.
        pf: PciAddress,
        /// Its interface.
        netdev: String,
    },
    /// The agent's scrub failed on the VF: it is quarantined.
    ScrubFailed,
    /// `scrub-pending` for longer than [`SCRUB_STALLED`]: nobody is
    /// finishing the scrub. (No age here: a reason that changed every probe
    /// would log the VF as newly unhealthy every probe.)
    ScrubStalled,
    /// The agent's state file holds a word this build does not know.
    UnknownState(String),
    /// sysfs could not be read.
    Unreadable(String),
}

impl Unready {
    /// A short stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Gone => "gone",
            Self::NotOnVfio(_) => "not_on_vfio",
            Self::NoIommuGroup => "no_iommu_group",
            Self::NotIsolated(_) => "not_isolated",
            Self::VfioNodeMissing(_) => "vfio_node_missing",
            Self::NoIommuNotAllowed(_) => "no_iommu_not_allowed",
            Self::PfLinkDown { .. } => "pf_link_down",
            Self::ScrubFailed => "scrub_failed",
            Self::ScrubStalled => "scrub_stalled",
            Self::UnknownState(_) => "unknown_state",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

/// Reasons joined for one line, `a; b`: the status's, the plugin's logs'
/// and its metrics' one way of listing why a VF is not ready.
pub fn join_reasons<T: fmt::Display>(reasons: &[T]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for Unready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Gone => f.write_str("the PCI device is gone"),
            Self::NotOnVfio(None) => write!(f, "not bound to {VFIO_PCI} (no driver)"),
            Self::NotOnVfio(Some(driver)) => write!(f, "bound to {driver}, not {VFIO_PCI}"),
            Self::NoIommuGroup => f.write_str("no IOMMU group (no IOMMU on the node?)"),
            Self::NotIsolated(others) => {
                let others: Vec<String> = others.iter().map(ToString::to_string).collect();
                write!(f, "IOMMU group shared with {}", others.join(", "))
            }
            Self::VfioNodeMissing(group) => write!(f, "/dev/vfio/{group} is missing"),
            Self::NoIommuNotAllowed(group) => write!(
                f,
                "only /dev/vfio/noiommu-{group} exists (no DMA isolation) and the pool does not set allowNoIommu"
            ),
            Self::PfLinkDown { pf, netdev } => write!(f, "link of PF {pf} ({netdev}) is down"),
            Self::ScrubFailed => f.write_str("scrub failed (quarantined)"),
            Self::ScrubStalled => write!(
                f,
                "scrub pending for over {} s, longer than a scrub takes (is the agent running?)",
                SCRUB_STALLED.as_secs()
            ),
            Self::UnknownState(word) => write!(f, "unknown VF state {word:?}"),
            Self::Unreadable(what) => write!(f, "cannot read sysfs: {what}"),
        }
    }
}

/// A VF's health in the NodeState status (module docs). Serialized as its
/// [`Display`](fmt::Display) text, read back by [`FromStr`], which takes any
/// string: one it does not know is kept as [`VfHealth::Other`] and counts
/// as not healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum VfHealth {
    /// As the spec wants it and, for a VFIO pool, ready to hand out.
    Healthy,
    /// Not as the spec wants it, or not ready; why, for people.
    Unhealthy(String),
    /// Its scrub failed: kept out of its pool until a retried scrub
    /// succeeds; why the last one failed.
    Quarantined(String),
    /// Its scrub runs (or was cut short by a crash and runs again).
    Scrubbing,
    /// No policy wants it.
    #[default]
    Unmanaged,
    /// A word this build does not know (written by another version).
    Other(String),
}

const HEALTHY: &str = "Healthy";
const UNHEALTHY: &str = "Unhealthy: ";
const QUARANTINED: &str = "Unhealthy: scrub failed: ";
const SCRUBBING: &str = "Scrubbing";
const UNMANAGED: &str = "Unmanaged";

impl VfHealth {
    /// Healthy when nothing is wrong; otherwise Unhealthy with the
    /// reasons, joined.
    pub fn from_reasons<T: fmt::Display>(reasons: &[T]) -> Self {
        if reasons.is_empty() {
            return Self::Healthy;
        }
        Self::Unhealthy(join_reasons(reasons))
    }

    /// True for [`VfHealth::Healthy`] only.
    pub fn is_healthy(&self) -> bool {
        *self == Self::Healthy
    }

    /// One lower-case word for metric labels: `healthy`, `unhealthy`,
    /// `quarantined`, `scrubbing`, `unmanaged` (a word this build does
    /// not know counts as `unhealthy`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy(_) | Self::Other(_) => "unhealthy",
            Self::Quarantined(_) => "quarantined",
            Self::Scrubbing => "scrubbing",
            Self::Unmanaged => "unmanaged",
        }
    }
}

impl fmt::Display for VfHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Healthy => f.write_str(HEALTHY),
            Self::Unhealthy(why) => write!(f, "{UNHEALTHY}{why}"),
            Self::Quarantined(why) => write!(f, "{QUARANTINED}{why}"),
            Self::Scrubbing => f.write_str(SCRUBBING),
            Self::Unmanaged => f.write_str(UNMANAGED),
            Self::Other(text) => f.write_str(text),
        }
    }
}

impl FromStr for VfHealth {
    type Err = Infallible;

    fn from_str(text: &str) -> Result<Self, Infallible> {
        Ok(match text {
            HEALTHY => Self::Healthy,
            SCRUBBING => Self::Scrubbing,
            UNMANAGED => Self::Unmanaged,
            _ => {
                if let Some(why) = text.strip_prefix(QUARANTINED) {
                    Self::Quarantined(why.to_owned())
                } else if let Some(why) = text.strip_prefix(UNHEALTHY) {
                    Self::Unhealthy(why.to_owned())
                } else {
                    Self::Other(text.to_owned())
                }
            }
        })
    }
}

impl From<String> for VfHealth {
    fn from(text: String) -> Self {
        match text.parse() {
            Ok(health) => health,
            Err(never) => match never {},
        }
    }
}

impl From<VfHealth> for String {
    fn from(health: VfHealth) -> Self {
        health.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_health_reads_back_from_its_text_and_unknown_words_are_kept() {
        for health in [
            VfHealth::Healthy,
            VfHealth::Unhealthy("bound to igbvf, not vfio-pci".into()),
            VfHealth::Quarantined("function reset failed".into()),
            VfHealth::Scrubbing,
            VfHealth::Unmanaged,
        ] {
            let text = health.to_string();
            assert_eq!(text.parse::<VfHealth>(), Ok(health.clone()), "{text}");
            let json = serde_json::to_string(&health).unwrap_or_default();
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<VfHealth>(&json).ok(), Some(health));
        }
        assert_eq!(
            "Unhealthy: scrub failed: reset hung".parse::<VfHealth>(),
            Ok(VfHealth::Quarantined("reset hung".into()))
        );
        let other: VfHealth = "Degraded".to_owned().into();
        assert_eq!(other, VfHealth::Other("Degraded".into()));
        assert!(!other.is_healthy());
        assert_eq!(other.label(), "unhealthy");
        assert_eq!(other.to_string(), "Degraded");
    }

    #[test]
    fn reasons_make_one_health() {
        assert_eq!(VfHealth::from_reasons::<Unready>(&[]), VfHealth::Healthy);
        let reasons = [
            Unready::NotOnVfio(Some("igbvf".into())),
            Unready::VfioNodeMissing(4),
        ];
        assert_eq!(
            VfHealth::from_reasons(&reasons).to_string(),
            "Unhealthy: bound to igbvf, not vfio-pci; /dev/vfio/4 is missing"
        );
        assert_eq!(
            join_reasons(&reasons),
            "bound to igbvf, not vfio-pci; /dev/vfio/4 is missing"
        );
    }
}
