//! What the node holds, as plain serialisable data. This is the JSON that
//! `vfplane-agent discover --json` prints; field names are camelCase and
//! stable (see "discover JSON" in docs/agent.md).

use serde::{Deserialize, Serialize};

use crate::PciAddress;

/// One PCI function as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PciDevice {
    /// `0000:00:02.0`.
    pub address: PciAddress,
    /// Vendor ID, 4 lower-case hex digits without `0x` (`8086`).
    pub vendor: String,
    /// Device ID, 4 lower-case hex digits (`10ca`).
    pub device: String,
    /// Class code, 6 hex digits (`020000` is an Ethernet controller).
    pub class: String,
    /// Bound driver (`igb`, `vfio-pci`), absent when unbound.
    pub driver: Option<String>,
    /// `driver_override` when set.
    pub driver_override: Option<String>,
    /// NUMA node of the device; absent when the kernel says -1 (unknown).
    pub numa_node: Option<u32>,
    /// IOMMU group number; absent when the device has no group (no IOMMU).
    pub iommu_group: Option<u32>,
}

/// A network interface the kernel made for a PF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Netdev {
    /// Interface name (`eth0`, `ens1f0`).
    pub name: String,
    /// `operstate`: `up`, `down`, `unknown`, ...
    pub operstate: String,
    /// `carrier`; absent when the interface is administratively down (the
    /// kernel then refuses the read).
    pub carrier: Option<bool>,
    /// MAC address as the kernel prints it.
    pub mac: Option<String>,
    /// MTU in bytes.
    pub mtu: Option<u32>,
}

/// An IOMMU group and every PCI function in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IommuGroup {
    /// Group number (the name of `/sys/kernel/iommu_groups/<id>` and `/dev/vfio/<id>`).
    pub id: u32,
    /// Every function in the group, sorted.
    pub members: Vec<PciAddress>,
}

/// A Virtual Function of a PF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualFunction {
    /// The N of the PF's `virtfnN` link.
    pub index: u16,
    /// The PF it belongs to.
    pub pf: PciAddress,
    /// The VF's own PCI view.
    #[serde(flatten)]
    pub pci: PciDevice,
    /// Its IOMMU group with all members; absent without an IOMMU.
    pub iommu: Option<IommuGroup>,
    /// True when the VF is alone in its IOMMU group, so handing it to one
    /// container hands out nothing else.
    pub isolated: bool,
    /// Its group's VFIO node (`/dev/vfio/<group>`, or
    /// `/dev/vfio/noiommu-<group>` in VFIO's no-IOMMU mode) when it exists:
    /// the VF is bound to vfio-pci.
    #[serde(rename = "vfioDevice")]
    pub vfio_node: Option<crate::VfioNode>,
}

/// An SR-IOV Physical Function and its VFs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PhysicalFunction {
    /// The PF's own PCI view.
    #[serde(flatten)]
    pub pci: PciDevice,
    /// `sriov_totalvfs`: how many VFs the device can make.
    pub total_vfs: u16,
    /// `sriov_numvfs`: how many exist now.
    pub num_vfs: u16,
    /// `sriov_vf_device`: the device ID its VFs have, 4 hex digits.
    pub vf_device: Option<String>,
    /// Network interfaces of the PF (usually one).
    pub netdevs: Vec<Netdev>,
    /// The VFs, by index. A VF that vanished while it was read is left out
    /// and named in [`HostModel::problems`].
    pub vfs: Vec<VirtualFunction>,
}

/// Whether DMA remapping is present on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IommuState {
    /// True when `/sys/kernel/iommu_groups` holds at least one group.
    pub enabled: bool,
    /// Number of IOMMU groups on the node.
    pub groups: u32,
}

/// Something that could not be read, and what it was about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// The device it concerns, when there is one.
    pub address: Option<PciAddress>,
    /// The error, with its causes, as one line.
    pub message: String,
}

/// Everything SR-IOV on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostModel {
    /// The sysfs root this was read from.
    pub sysfs_root: String,
    /// IOMMU presence.
    pub iommu: IommuState,
    /// Every SR-IOV capable function, sorted by address.
    pub pfs: Vec<PhysicalFunction>,
    /// Devices or files that could not be read; everything else is complete.
    pub problems: Vec<Problem>,
}
