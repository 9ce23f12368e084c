//! What a container that holds VFs finds in its environment: the contract
//! between the device plugin's Allocate and the in-pod driver.
//!
//! For a pool `fast` the device plugin sets
//!
//! - `PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0,0000:00:12.2`: the container's
//!   VFs of that pool, comma-separated (see [`crate::pool::pci_env_var`]);
//! - `PCIDEVICE_VFPLANE_IO_FAST_INFO={"0000:00:12.0":{...},...}`: a JSON
//!   object keyed by address whose values are [`VfInfo`].
//!
//! ```json
//! {"0000:00:12.0":{"group":4,"vfioDevice":"/dev/vfio/4","numaNode":0,
//!   "pf":"0000:00:02.0","vfIndex":0,"mac":"52:54:00:aa:bb:01"}}
//! ```
//!
//! Fields that are not known are left out (`numaNode` on a machine
//! without NUMA information, `mac` when the agent set none).

use serde::{Deserialize, Serialize};

use crate::pci::{ParsePciAddressError, PciAddress};
use crate::pool::pci_env_var;

/// Suffix of the info variable: `PCIDEVICE_VFPLANE_IO_<POOL>_INFO`.
pub const INFO_SUFFIX: &str = "_INFO";

/// What the container is told about one VF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VfInfo {
    /// IOMMU group number.
    pub group: u32,
    /// The group's VFIO node in the container (`/dev/vfio/4`, or
    /// `/dev/vfio/noiommu-4` in VFIO no-IOMMU mode).
    pub vfio_device: String,
    /// NUMA node of the VF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// The VF's PF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pf: Option<PciAddress>,
    /// The N of the PF's `virtfnN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vf_index: Option<u16>,
    /// The MAC the agent gave the VF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// `PCIDEVICE_VFPLANE_IO_<POOL>_INFO`.
pub fn info_env_var(pool: &str) -> String {
    format!("{}{INFO_SUFFIX}", pci_env_var(pool))
}

/// Parses `PCIDEVICE_VFPLANE_IO_<POOL>`: comma-separated addresses
/// (spaces around them and empty items are ignored). The info variable is
/// plain JSON: parse it as a `BTreeMap<PciAddress, VfInfo>` with any JSON
/// library.
///
/// # Errors
/// The first item that is not a PCI address.
pub fn parse_address_list(value: &str) -> Result<Vec<PciAddress>, ParsePciAddressError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// Every VF an environment names (`NAME=value` entries, as an OCI spec
/// lists them): the addresses of each `PCIDEVICE_VFPLANE_IO_<POOL>`
/// variable, the info variables skipped, in the order they appear.
///
/// # Errors
/// The first `PCIDEVICE_VFPLANE_IO_<POOL>` variable whose value is not a
/// list of PCI addresses, with its name.
pub fn vfs_in_env<'a>(env: impl IntoIterator<Item = &'a str>) -> Result<Vec<PciAddress>, BadEnvVar> {
    let prefix = pci_env_var("");
    let mut vfs = Vec::new();
    for entry in env {
        let Some((name, value)) = entry.split_once('=') else {
            continue;
        };
        if !name.starts_with(&prefix) || name.ends_with(INFO_SUFFIX) || name.len() == prefix.len() {
            continue;
        }
        let parsed = parse_address_list(value).map_err(|source| BadEnvVar {
            name: name.to_owned(),
            source,
        })?;
        for vf in parsed {
            if !vfs.contains(&vf) {
                vfs.push(vf);
            }
        }
    }
    Ok(vfs)
}

/// A `PCIDEVICE_VFPLANE_IO_<POOL>` variable that is not a list of addresses.
#[derive(Debug, thiserror::Error)]
#[error("{name} is not a list of PCI addresses")]
pub struct BadEnvVar {
    /// The variable.
    pub name: String,
    /// The item that is not an address.
    #[source]
    pub source: ParsePciAddressError,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_vfs_of_every_pool_variable_are_found_and_the_info_skipped() {
        let env = [
            "PATH=/bin",
            "PCIDEVICE_VFPLANE_IO_FAST=0000:00:12.0, 0000:00:12.2",
            "PCIDEVICE_VFPLANE_IO_FAST_INFO={\"0000:00:12.0\":{}}",
            "PCIDEVICE_VFPLANE_IO_SLOW=0000:21:10.0,0000:00:12.0",
            "PCIDEVICE_VFPLANE_IO_=0000:00:13.0",
            "NOT_AN_ENTRY",
        ];
        let vfs: Vec<String> = vfs_in_env(env).unwrap().iter().map(ToString::to_string).collect();
        assert_eq!(vfs, ["0000:00:12.0", "0000:00:12.2", "0000:21:10.0"]);
        let error = vfs_in_env(["PCIDEVICE_VFPLANE_IO_FAST=12.0"]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "PCIDEVICE_VFPLANE_IO_FAST is not a list of PCI addresses"
        );
    }

    #[test]
    fn round_trips_and_names() {
        assert_eq!(info_env_var("fast-lane"), "PCIDEVICE_VFPLANE_IO_FAST_LANE_INFO");
        let address: PciAddress = "0000:00:12.0".parse().unwrap();
        let info = VfInfo {
            group: 4,
            vfio_device: "/dev/vfio/4".into(),
            numa_node: None,
            pf: Some("0000:00:02.0".parse().unwrap()),
            vf_index: Some(0),
            mac: None,
        };
        let text = serde_json::to_string(&BTreeMap::from([(address, info.clone())])).unwrap();
        assert_eq!(
            text,
            r#"{"0000:00:12.0":{"group":4,"vfioDevice":"/dev/vfio/4","pf":"0000:00:02.0","vfIndex":0}}"#
        );
        let back: BTreeMap<PciAddress, VfInfo> = serde_json::from_str(&text).unwrap();
        assert_eq!(back[&address], info);
        assert_eq!(
            parse_address_list(" 0000:00:12.0,0000:00:12.2,").unwrap().len(),
            2
        );
        assert!(parse_address_list("0000:00:12.0,nope").is_err());
    }
}
