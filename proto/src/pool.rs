//! The pool config file: which VFs the device plugin advertises, under which
//! resource name, and how it picks among them. The agent writes it; it can
//! also be written by hand.
//!
//! ```yaml
//! pools:
//!   - name: fast                     # advertised as vfplane.io/fast
//!     devices: ["0000:00:12.0"]      # explicit VF addresses ([]: none now, reported at 0), and/or
//!     selector:                      # every VF that matches all given fields
//!       vendor: "8086"
//!       device: "10ca"
//!       pfAddresses: ["0000:00:02.0"]
//!       drivers: ["vfio-pci"]
//!     preferredAllocation: spread    # or pack
//!     allowNoIommu: false            # advertise VFs on a node without an IOMMU
//!     containerLimits:               # what containers given its VFs run under
//!       lockedMemoryBytes: 67108864
//!       numaAligned: true
//!       memoryBytes: 268435456
//!       cpuMillis: 1000
//!       pidsMax: 512
//!     resourceApi: devicePlugin      # or dra: VFs through ResourceClaims
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::container_limits::ContainerLimits;
use crate::pci::PciAddress;

/// The resource-name prefix of every pool: `vfplane.io/<pool>`.
pub const RESOURCE_DOMAIN: &str = "vfplane.io";

/// The CDI kind of vfplane devices: CDI names are `vfplane.io/vf=<address>`.
pub const CDI_KIND: &str = "vfplane.io/vf";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolConfig {
    /// The pools, each advertised as its own resource.
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// One pool: one extended resource, one device plugin socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    /// Pool name; the resource is `vfplane.io/<name>`.
    pub name: String,
    /// VFs by PCI address. `Some` of an empty list (`devices: []`) is a
    /// pool that holds no VF now and is still served, so the kubelet
    /// reports it at 0; absent (`None`) means "by the selector only".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<PciAddress>>,
    /// VFs by their properties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<PoolSelector>,
    /// How the plugin prefers devices when the kubelet asks.
    #[serde(default)]
    pub preferred_allocation: AllocationPolicy,
    /// Advertise VFs healthy on a node without an IOMMU (no isolation at
    /// all). Off unless said explicitly.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_no_iommu: bool,
    /// The limits every container given a VF of the pool runs under: the
    /// OCI hook the CDI spec names sets locked memory, the NUMA cpuset and
    /// pids; the agent checks them all.
    #[serde(default, skip_serializing_if = "ContainerLimits::is_empty")]
    pub container_limits: ContainerLimits,
    /// Which Kubernetes API hands the pool's VFs to pods: the device
    /// plugin (the default) or DRA. A pool is served by one of them only,
    /// so no VF is ever offered twice.
    #[serde(default, skip_serializing_if = "ResourceApi::is_device_plugin")]
    pub resource_api: ResourceApi,
}

/// Which Kubernetes API hands a pool's VFs to pods.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ResourceApi {
    /// The kubelet device plugin API: pods ask for the extended resource
    /// `vfplane.io/<pool>`.
    #[default]
    DevicePlugin,
    /// Dynamic Resource Allocation: the VFs are devices of driver
    /// `vfplane.io` in the node's ResourceSlices, and pods get them through
    /// ResourceClaims.
    Dra,
}

impl ResourceApi {
    /// True for [`ResourceApi::DevicePlugin`].
    pub fn is_device_plugin(&self) -> bool {
        *self == Self::DevicePlugin
    }

    /// Its name in the pool config, NodeState and VfPolicy.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DevicePlugin => "devicePlugin",
            Self::Dra => "dra",
        }
    }
}

/// Selects every VF that matches all the fields given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolSelector {
    /// Vendor ID, 4 hex digits (`8086`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    /// VF device ID, 4 hex digits (`10ca`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// VFs of these PFs only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pf_addresses: Vec<PciAddress>,
    /// VFs bound to one of these drivers only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drivers: Vec<String>,
}

/// How a pool prefers devices for a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AllocationPolicy {
    /// Across as many PFs as possible (failure and bandwidth isolation).
    #[default]
    Spread,
    /// Onto as few PFs as possible (keeps whole PFs free).
    Pack,
}

/// Why a pool config was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoolConfigError {
    /// Not YAML, or not this schema (unknown field, wrong type).
    #[error("pool config line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// Parsed, but a value is not allowed.
    #[error("pool config line {line}: pool {pool:?}: {reason}")]
    Invalid {
        /// 1-based line of the pool's `name:` (0 when not found).
        line: usize,
        /// The pool's name.
        pool: String,
        /// What is wrong.
        reason: String,
    },
}

impl PoolConfig {
    /// Parses and validates a pool config file's text.
    ///
    /// # Errors
    /// [`PoolConfigError::Syntax`] with the line and column for YAML that
    /// does not parse or does not fit the schema (an unknown field
    /// included); [`PoolConfigError::Invalid`] with the pool's line for a bad
    /// pool name, a duplicate pool, or a pool that selects nothing.
    pub fn from_yaml(text: &str) -> Result<Self, PoolConfigError> {
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|error| {
                let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
                PoolConfigError::Syntax {
                    line,
                    column,
                    message: error.to_string(),
                }
            })?
        };
        config.validate(text)?;
        Ok(config)
    }

    /// The file's text as the agent writes it.
    ///
    /// # Errors
    /// Only if serialisation fails, which it does not for these types.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        serde_yaml::to_string(self)
    }

    fn validate(&self, text: &str) -> Result<(), PoolConfigError> {
        let mut seen = BTreeSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            // The line of this pool's `name:`, not of an earlier pool of the
            // same name.
            let earlier = self.pools[..i].iter().filter(|p| p.name == pool.name).count();
            let line = line_of_pool(text, &pool.name, earlier);
            let invalid = |reason: String| PoolConfigError::Invalid {
                line,
                pool: pool.name.clone(),
                reason,
            };
            validate_pool_name(&pool.name).map_err(|e| invalid(e.to_string()))?;
            if !seen.insert(pool.name.as_str()) {
                return Err(invalid("a pool of this name is already defined".to_owned()));
            }
            if pool.devices.is_none() && pool.selector.is_none() {
                return Err(invalid(
                    "neither devices nor selector given (devices: [] for a pool that holds no VF now)"
                        .to_owned(),
                ));
            }
            if let Some(selector) = &pool.selector {
                for (field, value) in [("vendor", &selector.vendor), ("device", &selector.device)] {
                    if let Some(value) = value
                        && (value.len() != 4 || !value.bytes().all(|b| b.is_ascii_hexdigit()))
                    {
                        return Err(invalid(format!("selector.{field} {value:?} is not 4 hex digits")));
                    }
                }
                if selector
                    .drivers
                    .iter()
                    .any(|d| d.is_empty() || d.contains(['/', ' ']))
                {
                    return Err(invalid(
                        "selector.drivers holds an invalid driver name".to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Pool {
    /// The VFs listed by address (none when only a selector is given).
    pub fn listed_devices(&self) -> &[PciAddress] {
        self.devices.as_deref().unwrap_or_default()
    }

    /// `vfplane.io/<name>`.
    pub fn resource_name(&self) -> String {
        resource_name(&self.name)
    }
}

/// `vfplane.io/<pool>`.
pub fn resource_name(pool: &str) -> String {
    format!("{RESOURCE_DOMAIN}/{pool}")
}

/// The environment variable holding a pool's PCI addresses in a container:
/// `PCIDEVICE_VFPLANE_IO_<POOL>`, the pool upper-cased with every character
/// that is not a letter or digit made `_` (the form DPDK applications read).
pub fn pci_env_var(pool: &str) -> String {
    let pool: String = pool
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("PCIDEVICE_VFPLANE_IO_{pool}")
}

/// The CDI name of a VF: `vfplane.io/vf=<address>`.
pub fn cdi_device_name(address: PciAddress) -> String {
    format!("{CDI_KIND}={address}")
}

/// Why a pool name cannot be a resource name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolNameError {
    /// Nothing was given.
    #[error("the pool name is empty")]
    Empty,
    /// More than 63 characters.
    #[error("the pool name has {0} characters; at most 63 are allowed")]
    TooLong(usize),
    /// It starts or ends with something else than a letter or digit.
    #[error(
        "{RESOURCE_DOMAIN}/{0} is not a valid resource name: it must start and end with a letter or digit"
    )]
    Edge(String),
    /// A character a qualified name does not allow.
    #[error(
        "{RESOURCE_DOMAIN}/{name} is not a valid resource name: {character:?} is not allowed (letters, digits, '-', '_', '.')"
    )]
    Character {
        /// The name.
        name: String,
        /// The first character not allowed.
        character: char,
    },
}

/// Checks that `vfplane.io/<name>` is a valid extended-resource name: the
/// name part must be a Kubernetes qualified name (at most 63 characters,
/// alphanumerics with `-`, `_` or `.` inside, alphanumeric at both ends).
///
/// # Errors
/// [`PoolNameError`], saying what is wrong.
pub fn validate_pool_name(name: &str) -> Result<(), PoolNameError> {
    if name.is_empty() {
        return Err(PoolNameError::Empty);
    }
    if name.len() > 63 {
        return Err(PoolNameError::TooLong(name.len()));
    }
    let bytes = name.as_bytes();
    let edge_ok = |b: u8| b.is_ascii_alphanumeric();
    if !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1]) {
        return Err(PoolNameError::Edge(name.to_owned()));
    }
    if let Some(character) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(PoolNameError::Character {
            name: name.to_owned(),
            character,
        });
    }
    Ok(())
}

/// The 1-based line of the `skip`-th (from 0) `name: <pool>` in the text,
/// 0 when not found.
fn line_of_pool(text: &str, pool: &str, skip: usize) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, line)| {
            let line = line.trim_start().trim_start_matches('-').trim_start();
            line.strip_prefix("name:")
                .map(|value| value.trim().trim_matches(['"', '\'']) == pool)
                .unwrap_or(false)
        })
        .nth(skip)
        .map_or(0, |(index, _)| index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
pools:
  - name: fast
    devices: ["0000:00:12.0"]
    selector:
      vendor: "8086"
      device: "10ca"
      pfAddresses: ["0000:00:02.0"]
      drivers: ["vfio-pci"]
    preferredAllocation: pack
  - name: slow
    devices: ["0000:00:12.2"]
"#;

    #[test]
    fn parses_the_documented_example() {
        let config = PoolConfig::from_yaml(EXAMPLE).unwrap();
        assert_eq!(config.pools.len(), 2);
        let fast = &config.pools[0];
        assert_eq!(fast.resource_name(), "vfplane.io/fast");
        assert_eq!(
            fast.listed_devices(),
            ["0000:00:12.0".parse::<PciAddress>().unwrap()]
        );
        assert_eq!(fast.preferred_allocation, AllocationPolicy::Pack);
        let selector = fast.selector.as_ref().unwrap();
        assert_eq!(
            selector.pf_addresses,
            ["0000:00:02.0".parse::<PciAddress>().unwrap()]
        );
        assert_eq!(config.pools[1].preferred_allocation, AllocationPolicy::Spread);
        assert!(!config.pools[1].allow_no_iommu);
        // Written and read back, it is the same config.
        assert_eq!(PoolConfig::from_yaml(&config.to_yaml().unwrap()).unwrap(), config);
    }

    #[test]
    fn empty_file_is_no_pools() {
        assert_eq!(PoolConfig::from_yaml("").unwrap(), PoolConfig::default());
        assert_eq!(
            PoolConfig::from_yaml("pools: []\n").unwrap(),
            PoolConfig::default()
        );
    }

    #[test]
    fn unknown_field_names_the_line() {
        let text = "pools:\n  - name: fast\n    devices: [\"0000:00:12.0\"]\n    prefferedAllocation: pack\n";
        let err = PoolConfig::from_yaml(text).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, PoolConfigError::Syntax { line: 4, .. }),
            "{message}"
        );
        assert!(message.contains("prefferedAllocation"), "{message}");
    }

    #[test]
    fn yaml_that_does_not_parse_names_the_line() {
        let err = PoolConfig::from_yaml("pools:\n  - name: fast\n   devices: [\n").unwrap_err();
        assert!(
            matches!(err, PoolConfigError::Syntax { line, .. } if line >= 2),
            "{err}"
        );
        let err =
            PoolConfig::from_yaml("pools:\n  - name: fast\n    devices: [\"0000:00:99.0\"]\n").unwrap_err();
        assert!(err.to_string().contains("invalid PCI address"), "{err}");
        assert!(matches!(err, PoolConfigError::Syntax { line: 3, .. }), "{err}");
    }

    #[test]
    fn invalid_pool_names_are_refused_with_their_line() {
        for (name, words) in [
            ("\"fast lane\"", "' '"),
            ("-fast", "start and end"),
            ("\"fast/1\"", "'/'"),
            ("\"\"", "empty"),
            (&"a".repeat(64), "at most 63"),
        ] {
            let text = format!(
                "pools:\n  - name: ok\n    devices: [\"0000:00:12.0\"]\n  - name: {name}\n    devices: [\"0000:00:12.2\"]\n"
            );
            let err = PoolConfig::from_yaml(&text).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(words), "{name}: {message}");
            if !name.is_empty() && name != "\"\"" {
                assert!(
                    matches!(err, PoolConfigError::Invalid { line: 4, .. }),
                    "{name}: {message}"
                );
            }
        }
    }

    #[test]
    fn duplicate_and_empty_pools_are_refused() {
        let dup = "pools:\n  - name: a\n    devices: [\"0000:00:12.0\"]\n  - name: a\n    devices: [\"0000:00:12.2\"]\n";
        assert_eq!(
            PoolConfig::from_yaml(dup).unwrap_err().to_string(),
            "pool config line 4: pool \"a\": a pool of this name is already defined",
            "the line of the second definition"
        );
        let empty = "pools:\n  - name: a\n";
        assert!(
            PoolConfig::from_yaml(empty)
                .unwrap_err()
                .to_string()
                .contains("neither devices nor selector given")
        );
        // An explicitly empty list is a pool that holds no VF now: served,
        // at 0. It survives the agent's round trip as such.
        let none_now = PoolConfig::from_yaml("pools:\n  - name: a\n    devices: []\n").unwrap();
        assert_eq!(none_now.pools[0].devices, Some(Vec::new()));
        assert!(none_now.pools[0].listed_devices().is_empty());
        let again = PoolConfig::from_yaml(&none_now.to_yaml().unwrap()).unwrap();
        assert_eq!(again, none_now);
        let vendor = "pools:\n  - name: a\n    selector: {vendor: \"0x8086\"}\n";
        assert!(
            PoolConfig::from_yaml(vendor)
                .unwrap_err()
                .to_string()
                .contains("4 hex digits")
        );
    }

    #[test]
    fn env_var_and_cdi_names() {
        assert_eq!(pci_env_var("fast"), "PCIDEVICE_VFPLANE_IO_FAST");
        assert_eq!(pci_env_var("fast-lane.v2"), "PCIDEVICE_VFPLANE_IO_FAST_LANE_V2");
        assert_eq!(
            cdi_device_name("0000:00:12.0".parse().unwrap()),
            "vfplane.io/vf=0000:00:12.0"
        );
    }
}
