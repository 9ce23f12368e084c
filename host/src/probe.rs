//! What health probes read many times a second: a device's directory with
//! its links resolved once ([`DeviceDir`]), and the VFIO group nodes listed
//! in one directory read ([`VfioNodes`]). Cheap by design: a probe of a VF
//! is one `readlink` (plus a `stat` when it has no driver), and its PF's
//! link state two small reads per interface.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Host, HostError, Netdev, PciAddress, Result, link_name};

/// A PCI device's sysfs directory. Resolved ([`Host::resolve_device`]),
/// it is the real `devices/.../<address>` directory, so reading through it
/// walks no `bus/pci/devices` symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDir(PathBuf);

impl DeviceDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The driver it is bound to (the `driver` link's last component),
    /// `None` when unbound or gone.
    ///
    /// # Errors
    /// When the link exists but cannot be read.
    pub fn driver(&self) -> Result<Option<String>> {
        link_name(&self.0.join("driver"))
    }

    /// True while the device exists.
    pub fn is_present(&self) -> bool {
        self.0.is_dir()
    }

    /// The link state of its network interfaces (`net/*/operstate` and
    /// `carrier` only; no MAC or MTU), sorted by name. `None` when the
    /// `net` directory cannot be listed (no network driver, or gone).
    pub fn link_states(&self) -> Option<Vec<Netdev>> {
        let entries = fs::read_dir(self.0.join("net")).ok()?;
        let mut netdevs: Vec<Netdev> = entries
            .flatten()
            .map(|entry| {
                let path = entry.path();
                let operstate = fs::read_to_string(path.join("operstate"))
                    .map(|t| t.trim().to_owned())
                    .unwrap_or_else(|_| "unknown".to_owned());
                // The kernel answers EINVAL to a `carrier` read while the
                // interface is down: no reading, not an error.
                let carrier = fs::read_to_string(path.join("carrier"))
                    .ok()
                    .map(|t| t.trim() == "1");
                Netdev {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    operstate,
                    carrier,
                    mac: None,
                    mtu: None,
                }
            })
            .collect();
        netdevs.sort_by(|a, b| a.name.cmp(&b.name));
        Some(netdevs)
    }
}

/// The VFIO group node of a device, as it exists under the dev root.
/// Serialized as its path on the node ([`VfioNode::path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum VfioNode {
    /// `/dev/vfio/<group>`: a group behind a real IOMMU.
    Group(u32),
    /// `/dev/vfio/noiommu-<group>`: VFIO's no-IOMMU mode.
    NoIommu(u32),
}

impl VfioNode {
    /// The node's name inside `/dev/vfio`.
    pub fn file_name(self) -> String {
        match self {
            Self::Group(group) => group.to_string(),
            Self::NoIommu(group) => format!("noiommu-{group}"),
        }
    }

    /// Its path on the node and in the container: `/dev/vfio/<name>`.
    pub fn path(self) -> String {
        format!("/dev/vfio/{}", self.file_name())
    }

    /// The IOMMU group number.
    pub fn group(self) -> u32 {
        match self {
            Self::Group(group) | Self::NoIommu(group) => group,
        }
    }
}

/// A path that is not `/dev/vfio/<group>` or `/dev/vfio/noiommu-<group>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a VFIO group node (/dev/vfio/<group> or /dev/vfio/noiommu-<group>)")]
pub struct ParseVfioNodeError(String);

impl FromStr for VfioNode {
    type Err = ParseVfioNodeError;

    fn from_str(path: &str) -> std::result::Result<Self, ParseVfioNodeError> {
        let error = || ParseVfioNodeError(path.to_owned());
        let name = path.strip_prefix("/dev/vfio/").ok_or_else(error)?;
        let (noiommu, digits) = match name.strip_prefix("noiommu-") {
            Some(digits) => (true, digits),
            None => (false, name),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error());
        }
        let group = digits.parse().map_err(|_| error())?;
        Ok(if noiommu {
            Self::NoIommu(group)
        } else {
            Self::Group(group)
        })
    }
}

impl TryFrom<String> for VfioNode {
    type Error = ParseVfioNodeError;

    fn try_from(path: String) -> std::result::Result<Self, ParseVfioNodeError> {
        path.parse()
    }
}

impl From<VfioNode> for String {
    fn from(node: VfioNode) -> Self {
        node.path()
    }
}

/// The names in `<dev-root>/vfio`, listed once (one directory read instead
/// of a `stat` per group).
#[derive(Debug, Clone, Default)]
pub struct VfioNodes(HashSet<String>);

impl VfioNodes {
    /// The node of a group, when there is one.
    pub fn node(&self, group: u32) -> Option<VfioNode> {
        [VfioNode::Group(group), VfioNode::NoIommu(group)]
            .into_iter()
            .find(|node| self.0.contains(&node.file_name()))
    }
}

impl Host {
    /// A device's directory, links resolved; the `bus/pci/devices` link
    /// itself when it cannot be resolved (the device is gone: every read
    /// through it then says so).
    pub fn resolve_device(&self, address: PciAddress) -> DeviceDir {
        let link = self.device_dir(address);
        DeviceDir(fs::canonicalize(&link).unwrap_or(link))
    }

    /// Lists `<dev-root>/vfio`; a missing directory is an empty one.
    ///
    /// # Errors
    /// When it exists and cannot be listed.
    pub fn vfio_nodes(&self) -> Result<VfioNodes> {
        let dir = self.dev.join("vfio");
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(VfioNodes::default()),
            Err(source) => return Err(HostError::Read { path: dir, source }),
        };
        Ok(VfioNodes(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        ))
    }

    /// The VFIO node of one group, when it exists (two `stat`s at most).
    pub fn vfio_node(&self, group: u32) -> Option<VfioNode> {
        let dir = self.dev.join("vfio");
        [VfioNode::Group(group), VfioNode::NoIommu(group)]
            .into_iter()
            .find(|node| dir.join(node.file_name()).exists())
    }
}
