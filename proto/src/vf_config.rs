//! A claim's settings for its VFs: the opaque `VfConfig` parameters of a
//! ResourceClaim (driver `vfplane.io`), and the files through which the DRA
//! driver hands them to the agent, which alone writes VF settings.
//!
//! ```yaml
//! config:
//! - opaque:
//!     driver: vfplane.io
//!     parameters:
//!       apiVersion: vfplane.io/v1alpha1
//!       kind: VfConfig
//!       mac: 02:aa:bb:cc:dd:01   # one device only
//!       vlan: 120                # 0: untagged
//!       trust: true
//!       spoofChk: false
//!       containerProfile:        # merged with the pool's: the strictest of each
//!         lockedMemory: 256Mi
//!         memory: 512Mi
//! ```
//!
//! Each setting left out keeps the pool's (its VfPolicy). The container
//! profile is the pool's made stricter, never weaker: it is merged with the
//! pool's as the profiles of two policies of one pool are
//! ([`ContainerProfile::strictest`]): each minimum (cpu, memory, hugepages,
//! lockedMemory) the larger, the pids bound the smaller, `numaAligned` when
//! either asks. It is the profile of the containers that use the claim: the
//! pod webhook checks them against it, the runtime applies its locked
//! memory, pids bound and NUMA cpuset, and the agent checks their cgroups.
//!
//! The hand-over, in the VF state directory ([`crate::vf_state`]):
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `<address>.claim-config` | the DRA driver, at prepare, for every VF it prepares | the claim's settings as words (`mac=02:aa:bb:cc:dd:01 vlan=120 trust=on spoofchk=off`), and its profile's limits in numbers when it has one (`lockedmemory=268435456 memory=536870912 cpu=2000 pids=64 numa=on`, each when set); empty: the pool's. The agent gives the VF these while the file is there (and counts the VF as held), and the scrub removes it. |
//! | `<address>.claim-config-result` | the agent, after writing them | `config: <the words>` and then `applied` or `failed: <why>`. The driver answers prepare once it reads the result for the words it wrote. |

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::container_limits::ContainerLimits;
use crate::mac::{Mac, MacError};
use crate::pci::PciAddress;
use crate::vf_policy::{ContainerProfile, ProfileError};

/// `apiVersion` of [`VfConfig`].
pub const API_VERSION: &str = "vfplane.io/v1alpha1";
/// `kind` of [`VfConfig`].
pub const KIND: &str = "VfConfig";
/// The highest VLAN ID (4095 is reserved).
pub const MAX_VLAN: u16 = 4094;

/// Suffix of the file holding a prepared VF's claim settings.
pub const CLAIM_CONFIG_SUFFIX: &str = ".claim-config";
/// Suffix of the file holding the agent's answer to them.
pub const CLAIM_CONFIG_RESULT_SUFFIX: &str = ".claim-config-result";

/// The parameters as a claim writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VfConfig {
    /// [`API_VERSION`].
    pub api_version: String,
    /// [`KIND`].
    pub kind: String,
    /// Administrative MAC of the VF (unicast, not zero). A claim's config
    /// with a MAC must apply to one device only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// VLAN ID the PF tags the VF's traffic with; 0 for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// Trusted VF (may change its MAC and enter promiscuous mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<bool>,
    /// MAC anti-spoof checking on transmit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoof_chk: Option<bool>,
    /// The profile of the containers that use the claim, merged with the
    /// pool's (the strictest of each field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_profile: Option<ContainerProfile>,
}

/// Why a claim's parameters are not a `VfConfig` vfplane takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VfConfigError {
    /// Not the shape of a `VfConfig` (an unknown field, a wrong type).
    #[error("{0}")]
    Shape(String),
    /// Another `apiVersion`.
    #[error("apiVersion {0:?} is not {API_VERSION}")]
    ApiVersion(String),
    /// Another `kind`.
    #[error("kind {0:?} is not {KIND}")]
    Kind(String),
    /// A MAC a VF cannot have.
    #[error("mac: {0}")]
    Mac(#[from] MacError),
    /// A VLAN ID out of range.
    #[error("vlan {0} is out of range (0 to {MAX_VLAN}; 0 for none)")]
    Vlan(u16),
    /// A profile quantity that does not parse.
    #[error("containerProfile.{}: {}", .0.field, .0.source)]
    Profile(ProfileError),
    /// A word of the state file that is not a setting.
    #[error(
        "{0:?} is not a VF setting (mac=, vlan=, trust=on|off, spoofchk=on|off) or limit (lockedmemory=, \
         memory=, cpu=, pids=, numa=on)"
    )]
    Word(String),
}

/// The settings a claim gives a VF, checked; `None` keeps the pool's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VfOverrides {
    /// Administrative MAC.
    pub mac: Option<Mac>,
    /// Port VLAN.
    pub vlan: Option<u16>,
    /// Trust.
    pub trust: Option<bool>,
    /// Anti-spoof checking.
    pub spoof_chk: Option<bool>,
    /// The claim's container profile in numbers (not yet merged with the
    /// pool's: [`VfOverrides::limits_over`]).
    pub limits: Option<ContainerLimits>,
}

impl VfConfig {
    /// Reads and checks a claim's opaque parameters.
    ///
    /// # Errors
    /// What is wrong with them, by field.
    pub fn overrides_from(parameters: &serde_json::Value) -> Result<VfOverrides, VfConfigError> {
        let config: VfConfig =
            serde_json::from_value(parameters.clone()).map_err(|e| VfConfigError::Shape(e.to_string()))?;
        config.overrides()
    }

    /// The settings, checked.
    ///
    /// # Errors
    /// The first field that is wrong.
    pub fn overrides(&self) -> Result<VfOverrides, VfConfigError> {
        if self.api_version != API_VERSION {
            return Err(VfConfigError::ApiVersion(self.api_version.clone()));
        }
        if self.kind != KIND {
            return Err(VfConfigError::Kind(self.kind.clone()));
        }
        if let Some(vlan) = self.vlan.filter(|v| *v > MAX_VLAN) {
            return Err(VfConfigError::Vlan(vlan));
        }
        Ok(VfOverrides {
            mac: self.mac.as_deref().map(str::parse).transpose()?,
            vlan: self.vlan,
            trust: self.trust,
            spoof_chk: self.spoof_chk,
            limits: self
                .container_profile
                .as_ref()
                .map(ContainerProfile::limits)
                .transpose()
                .map_err(VfConfigError::Profile)?,
        })
    }
}

impl VfOverrides {
    /// Whether it keeps every pool setting.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `self` with what `later` sets over it (a class's config first, then
    /// the claim's, as the API orders them). Settings: the later one's;
    /// profiles: the strictest of both.
    #[must_use]
    pub fn then(self, later: Self) -> Self {
        Self {
            mac: later.mac.or(self.mac),
            vlan: later.vlan.or(self.vlan),
            trust: later.trust.or(self.trust),
            spoof_chk: later.spoof_chk.or(self.spoof_chk),
            limits: match (self.limits, later.limits) {
                (Some(a), Some(b)) => Some(a.merge(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// Whether it changes any of the VF's own settings (its profile aside).
    pub fn sets_the_vf(&self) -> bool {
        Self {
            limits: None,
            ..*self
        } != Self::default()
    }

    /// The limits of a container using the VF: `pool`'s, made stricter by
    /// the claim's profile.
    pub fn limits_over(&self, pool: ContainerLimits) -> ContainerLimits {
        self.limits.map_or(pool, |claim| pool.merge(claim))
    }
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

/// The state file's words: `mac=02:aa:bb:cc:dd:01 vlan=120 trust=on
/// spoofchk=off`, each only when set; empty when none is.
impl fmt::Display for VfOverrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words = Vec::new();
        if let Some(mac) = self.mac {
            words.push(format!("mac={mac}"));
        }
        if let Some(vlan) = self.vlan {
            words.push(format!("vlan={vlan}"));
        }
        if let Some(trust) = self.trust {
            words.push(format!("trust={}", on_off(trust)));
        }
        if let Some(spoof_chk) = self.spoof_chk {
            words.push(format!("spoofchk={}", on_off(spoof_chk)));
        }
        if let Some(limits) = self.limits {
            let numbers = [
                ("lockedmemory", limits.locked_memory_bytes),
                ("memory", limits.memory_bytes),
                ("cpu", limits.cpu_millis),
                ("pids", limits.pids_max),
            ];
            for (key, value) in numbers {
                if let Some(value) = value {
                    words.push(format!("{key}={value}"));
                }
            }
            if limits.numa_aligned {
                words.push("numa=on".to_owned());
            }
            if limits.is_empty() {
                // A profile that asks nothing still says there was one.
                words.push("profile=none".to_owned());
            }
        }
        f.write_str(&words.join(" "))
    }
}

impl FromStr for VfOverrides {
    type Err = VfConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut overrides = Self::default();
        for word in s.split_whitespace() {
            let bad = || VfConfigError::Word(word.to_owned());
            let (key, value) = word.split_once('=').ok_or_else(bad)?;
            let flag = |value: &str| match value {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err(bad()),
            };
            match key {
                "mac" => overrides.mac = Some(value.parse()?),
                "vlan" => {
                    let vlan: u16 = value.parse().map_err(|_| bad())?;
                    if vlan > MAX_VLAN {
                        return Err(VfConfigError::Vlan(vlan));
                    }
                    overrides.vlan = Some(vlan);
                }
                "trust" => overrides.trust = Some(flag(value)?),
                "spoofchk" => overrides.spoof_chk = Some(flag(value)?),
                "lockedmemory" | "memory" | "cpu" | "pids" => {
                    let number: u64 = value.parse().map_err(|_| bad())?;
                    let limits = overrides.limits.get_or_insert_default();
                    let field = match key {
                        "lockedmemory" => &mut limits.locked_memory_bytes,
                        "memory" => &mut limits.memory_bytes,
                        "cpu" => &mut limits.cpu_millis,
                        _ => &mut limits.pids_max,
                    };
                    *field = Some(number);
                }
                "numa" => {
                    overrides.limits.get_or_insert_default().numa_aligned = flag(value)?;
                }
                "profile" if value == "none" => {
                    overrides.limits.get_or_insert_default();
                }
                _ => return Err(bad()),
            }
        }
        Ok(overrides)
    }
}

/// `<dir>/<address>.claim-config`.
pub fn claim_config_path(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(format!("{address}{CLAIM_CONFIG_SUFFIX}"))
}

/// `<dir>/<address>.claim-config-result`.
pub fn claim_config_result_path(dir: &Path, address: PciAddress) -> PathBuf {
    dir.join(format!("{address}{CLAIM_CONFIG_RESULT_SUFFIX}"))
}

/// Writes a prepared VF's claim settings (and removes an earlier result),
/// atomically.
///
/// # Errors
/// I/O errors.
pub fn write_claim_config(dir: &Path, address: PciAddress, overrides: &VfOverrides) -> io::Result<()> {
    remove(&claim_config_result_path(dir, address))?;
    crate::files::write_atomically(
        &claim_config_path(dir, address),
        format!("{overrides}\n").as_bytes(),
        None,
    )
}

/// The claim settings of a VF, as text (see [`VfOverrides`]'s `FromStr`),
/// when it has them: a VF with the file is prepared for a claim.
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn read_claim_config(dir: &Path, address: PciAddress) -> io::Result<Option<String>> {
    read(&claim_config_path(dir, address)).map(|text| text.map(|t| t.trim().to_owned()))
}

/// Removes a VF's claim settings and their result; missing files are fine.
///
/// # Errors
/// I/O errors.
pub fn clear_claim_config(dir: &Path, address: PciAddress) -> io::Result<()> {
    remove(&claim_config_path(dir, address))?;
    remove(&claim_config_result_path(dir, address))
}

/// What the agent did with a VF's claim settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimConfigResult {
    /// The settings it read, as text.
    pub config: String,
    /// `Ok`: the PF reports them; `Err`: why not.
    pub outcome: Result<(), String>,
}

/// Writes the agent's result, atomically.
///
/// # Errors
/// I/O errors.
pub fn write_claim_config_result(
    dir: &Path,
    address: PciAddress,
    result: &ClaimConfigResult,
) -> io::Result<()> {
    let outcome = match &result.outcome {
        Ok(()) => "applied".to_owned(),
        // One line: the reader takes everything after the prefix.
        Err(why) => format!("failed: {}", why.replace('\n', " ")),
    };
    crate::files::write_atomically(
        &claim_config_result_path(dir, address),
        format!("config: {}\n{outcome}\n", result.config).as_bytes(),
        None,
    )
}

/// The agent's result for a VF's claim settings, if it wrote one. A file
/// that is not in the form [`write_claim_config_result`] writes is none.
///
/// # Errors
/// I/O errors other than the file not existing.
pub fn read_claim_config_result(dir: &Path, address: PciAddress) -> io::Result<Option<ClaimConfigResult>> {
    let Some(text) = read(&claim_config_result_path(dir, address))? else {
        return Ok(None);
    };
    let mut lines = text.lines();
    let config = lines
        .next()
        .and_then(|l| l.strip_prefix("config:"))
        .map(str::trim);
    let outcome = match lines.next() {
        Some("applied") => Some(Ok(())),
        Some(line) => line.strip_prefix("failed: ").map(|why| Err(why.to_owned())),
        None => None,
    };
    Ok(config.zip(outcome).map(|(config, outcome)| ClaimConfigResult {
        config: config.to_owned(),
        outcome,
    }))
}

/// The VFs that have claim settings in `dir` (none when `dir` does not
/// exist).
///
/// # Errors
/// I/O errors reading the directory.
pub fn configured_vfs(dir: &Path) -> io::Result<Vec<PciAddress>> {
    crate::vf_state::vfs_with_suffix(dir, CLAIM_CONFIG_SUFFIX)
}

fn read(path: &Path) -> io::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> PciAddress {
        "0000:00:10.0".parse().unwrap()
    }

    #[test]
    fn a_claims_parameters_become_checked_settings_and_their_words() {
        let overrides = VfConfig::overrides_from(&serde_json::json!({
            "apiVersion": "vfplane.io/v1alpha1", "kind": "VfConfig",
            "mac": "02:aa:bb:cc:dd:01", "vlan": 120, "trust": true, "spoofChk": false
        }))
        .unwrap();
        assert_eq!(overrides.mac, Some(Mac([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01])));
        let words = overrides.to_string();
        assert_eq!(words, "mac=02:aa:bb:cc:dd:01 vlan=120 trust=on spoofchk=off");
        assert_eq!(words.parse::<VfOverrides>().unwrap(), overrides);
        assert_eq!("".parse::<VfOverrides>().unwrap(), VfOverrides::default());
        assert!(VfOverrides::default().is_empty());
    }

    #[test]
    fn bad_parameters_are_refused_naming_the_field() {
        let refuse = |value: serde_json::Value| VfConfig::overrides_from(&value).unwrap_err().to_string();
        let base = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"apiVersion": API_VERSION, "kind": KIND});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            refuse(base(serde_json::json!({"vlan": 5000}))),
            "vlan 5000 is out of range (0 to 4094; 0 for none)"
        );
        assert!(
            refuse(base(serde_json::json!({"mac": "01:00:5e:00:00:01"})))
                .starts_with("mac: MAC 01:00:5e:00:00:01 is a multicast")
        );
        assert!(refuse(base(serde_json::json!({"mtu": 9000}))).contains("unknown field `mtu`"));
        assert!(refuse(base(serde_json::json!({"trust": "yes"}))).contains("invalid type"));
        assert!(refuse(serde_json::json!({"apiVersion": "v1", "kind": KIND})).contains("apiVersion \"v1\""));
        assert!(
            refuse(serde_json::json!({"apiVersion": API_VERSION, "kind": "NetConfig"}))
                .contains("kind \"NetConfig\"")
        );
        assert!(matches!(
            "vlan=4095".parse::<VfOverrides>(),
            Err(VfConfigError::Vlan(4095))
        ));
        assert!(matches!(
            "trust=yes".parse::<VfOverrides>(),
            Err(VfConfigError::Word(_))
        ));
    }

    #[test]
    fn a_claims_profile_only_makes_the_pools_stricter_and_rides_in_the_words() {
        let overrides = VfConfig::overrides_from(&serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND,
            "containerProfile": {"lockedMemory": "256Mi", "memory": "64Mi", "pids": 500, "numaAligned": true}
        }))
        .unwrap();
        assert!(!overrides.sets_the_vf(), "a profile alone changes no VF setting");
        let words = overrides.to_string();
        assert_eq!(words, "lockedmemory=268435456 memory=67108864 pids=500 numa=on");
        assert_eq!(words.parse::<VfOverrides>().unwrap(), overrides);
        let pool = ContainerLimits {
            locked_memory_bytes: Some(64 << 20),
            memory_bytes: Some(128 << 20),
            cpu_millis: Some(1000),
            pids_max: Some(128),
            numa_aligned: false,
        };
        // More locked memory, and a tighter NUMA placement, than the pool's;
        // less memory and a looser pids bound lose to the pool's.
        assert_eq!(
            overrides.limits_over(pool),
            ContainerLimits {
                locked_memory_bytes: Some(256 << 20),
                memory_bytes: Some(128 << 20),
                cpu_millis: Some(1000),
                pids_max: Some(128),
                numa_aligned: true,
            }
        );
        assert_eq!(VfOverrides::default().limits_over(pool), pool);
        // An empty profile still round-trips as a profile.
        let empty = VfOverrides {
            limits: Some(ContainerLimits::default()),
            ..VfOverrides::default()
        };
        assert_eq!(empty.to_string().parse::<VfOverrides>().unwrap(), empty);
        // A class's profile and a claim's: the strictest of both.
        let class = VfOverrides {
            limits: Some(ContainerLimits {
                pids_max: Some(64),
                ..ContainerLimits::default()
            }),
            ..VfOverrides::default()
        };
        let both = class.then(overrides).limits.unwrap();
        assert_eq!(
            (both.pids_max, both.locked_memory_bytes),
            (Some(64), Some(256 << 20))
        );
        let refused = VfConfig::overrides_from(&serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND, "containerProfile": {"lockedMemory": "lots"}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            refused.starts_with("containerProfile.lockedMemory: "),
            "{refused}"
        );
        let unknown = VfConfig::overrides_from(&serde_json::json!({
            "apiVersion": API_VERSION, "kind": KIND, "containerProfile": {"lockedMem": "1Mi"}
        }))
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("unknown field `lockedMem`"), "{unknown}");
    }

    #[test]
    fn the_claims_setting_wins_over_the_class_field_by_field() {
        let class = VfOverrides {
            vlan: Some(10),
            trust: Some(false),
            ..VfOverrides::default()
        };
        let claim = VfOverrides {
            vlan: Some(20),
            ..VfOverrides::default()
        };
        let both = class.then(claim);
        assert_eq!((both.vlan, both.trust), (Some(20), Some(false)));
    }

    #[test]
    fn the_files_round_trip_and_a_new_config_drops_the_old_result() {
        let dir = tempfile::tempdir().unwrap();
        let overrides: VfOverrides = "vlan=7".parse().unwrap();
        write_claim_config(dir.path(), address(), &overrides).unwrap();
        assert_eq!(
            read_claim_config(dir.path(), address()).unwrap().as_deref(),
            Some("vlan=7")
        );
        assert_eq!(configured_vfs(dir.path()).unwrap(), vec![address()]);
        assert_eq!(read_claim_config_result(dir.path(), address()).unwrap(), None);
        let failed = ClaimConfigResult {
            config: "vlan=7".into(),
            outcome: Err("netlink said no\nreally".into()),
        };
        write_claim_config_result(dir.path(), address(), &failed).unwrap();
        let read = read_claim_config_result(dir.path(), address()).unwrap().unwrap();
        assert_eq!(read.outcome, Err("netlink said no really".into()));
        write_claim_config(dir.path(), address(), &overrides).unwrap();
        assert_eq!(read_claim_config_result(dir.path(), address()).unwrap(), None);
        clear_claim_config(dir.path(), address()).unwrap();
        assert_eq!(read_claim_config(dir.path(), address()).unwrap(), None);
        assert!(configured_vfs(dir.path()).unwrap().is_empty());
    }
}
