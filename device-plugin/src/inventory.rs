//! Which VFs each pool holds, and their health.
//!
//! Two kinds of reads, at two costs:
//!
//! - **Discovery** ([`Inventory::discover`]) reads every SR-IOV PF and VF
//!   through [`vfplane_host::Host::discover`] and decides pool membership
//!   ([`assign`]). It runs at start, when the config changes, when the set
//!   of PCI devices changes (a new listing shows it: VFs made or removed),
//!   when a VFIO node appears or goes, and every 30 s as a safety net (a
//!   driver override written, say).
//! - **Scan** ([`Inventory::scan`]) probes only the pool members' health
//!   (see [`crate::health`]): a few syscalls per VF, cheap enough to run
//!   every 50 ms on 256 VFs.
//!
//! Membership is sticky: once a VF is in a pool it stays listed (Unhealthy
//! when it is gone or no longer bound to vfio-pci) until that pool's config
//! changes, so a VF the kubelet handed to a pod never silently disappears
//! from the kubelet's view. A VF belongs to one pool at most: explicit
//! `devices` first (in pool order), then sticky members, then selectors (in
//! pool order).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use vfplane_host::{DeviceDir, Host, HostError, PciAddress, VfioNodes};
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::pool::{Pool, PoolConfig, PoolSelector};
use vfplane_proto::vf_state::{self, MAC_SUFFIX, ParseVfStateError, VfState};

use crate::health::{self, Health, KnownGroup, LinkState, VfioNode};

/// What does not change while a VF exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfFacts {
    /// Its address, the kubelet's device ID.
    pub address: PciAddress,
    /// Its PF; `None` for an explicitly listed device that is not a VF.
    pub pf: Option<PciAddress>,
    /// The N of the PF's `virtfnN`.
    pub vf_index: Option<u16>,
    /// NUMA node, when the kernel knows it.
    pub numa_node: Option<u32>,
    /// That node's CPUs (`cpulist`), read once per node at discovery.
    pub numa_cpus: Option<String>,
    /// Vendor ID (`8086`).
    pub vendor: String,
    /// Device ID (`10ca`).
    pub device: String,
    /// Its IOMMU group as discovery saw it.
    pub group: Option<KnownGroup>,
    /// Its sysfs directory, resolved at discovery.
    pub device_dir: DeviceDir,
}

/// A VF seen by discovery, with what selectors match on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Its facts.
    pub facts: VfFacts,
    /// Bound driver.
    pub driver: Option<String>,
    /// `driver_override`.
    pub driver_override: Option<String>,
}

/// One device of a pool as last scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Its address.
    pub address: PciAddress,
    /// Its facts; `None` for a listed device never seen.
    pub facts: Option<VfFacts>,
    /// Health and reasons.
    pub health: Health,
    /// The VFIO node, when it exists.
    pub vfio_node: Option<VfioNode>,
    /// The MAC the agent gave it, when known.
    pub mac: Option<String>,
}

impl DeviceStatus {
    /// The kubelet's view of it.
    pub fn kubelet_device(&self) -> dp::Device {
        dp::Device {
            id: self.address.to_string(),
            health: self.health.as_kubelet_str().to_owned(),
            topology: self
                .facts
                .as_ref()
                .and_then(|f| f.numa_node)
                .map(|node| dp::TopologyInfo {
                    nodes: vec![dp::NumaNode { id: i64::from(node) }],
                }),
        }
    }
}

/// A pool's devices, sorted by address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    /// The devices.
    pub devices: Vec<DeviceStatus>,
}

impl PoolView {
    /// The ListAndWatch message for this view.
    pub fn list_and_watch(&self) -> dp::ListAndWatchResponse {
        dp::ListAndWatchResponse {
            devices: self.devices.iter().map(DeviceStatus::kubelet_device).collect(),
        }
    }

    /// One device.
    pub fn get(&self, address: PciAddress) -> Option<&DeviceStatus> {
        self.devices
            .binary_search_by(|d| d.address.cmp(&address))
            .ok()
            .and_then(|i| self.devices.get(i))
    }

    /// (healthy, unhealthy) counts.
    pub fn counts(&self) -> (usize, usize) {
        let healthy = self.devices.iter().filter(|d| d.health.is_healthy()).count();
        (healthy, self.devices.len() - healthy)
    }

    /// True when the kubelet would see a difference (IDs, health, NUMA).
    pub fn differs_for_kubelet(&self, other: &Self) -> bool {
        self.devices.len() != other.devices.len()
            || self.devices.iter().zip(&other.devices).any(|(a, b)| {
                a.address != b.address
                    || a.health.is_healthy() != b.health.is_healthy()
                    || a.facts.as_ref().and_then(|f| f.numa_node)
                        != b.facts.as_ref().and_then(|f| f.numa_node)
            })
    }
}

/// The VF state directory, read with one listing per scan.
#[derive(Debug, Clone, Default)]
pub struct StateDir {
    /// State files by VF.
    pub states: BTreeMap<PciAddress, Result<VfState, ParseVfStateError>>,
    /// How long each `scrub-pending` has been there (the stalled-scrub rule).
    pub pending_for: BTreeMap<PciAddress, std::time::Duration>,
    /// MAC files by VF.
    pub macs: BTreeMap<PciAddress, String>,
}

impl StateDir {
    /// Lists `dir` and reads the files named by PCI addresses. A missing
    /// directory is an empty one; an unreadable file is logged and skipped.
    pub fn read(dir: &Path) -> Self {
        let mut state = Self::default();
        let Ok(entries) = fs::read_dir(dir) else {
            return state;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (address, is_mac) = match name.strip_suffix(MAC_SUFFIX) {
                Some(address) => (address, true),
                None => (name, false),
            };
            let Ok(address) = address.parse::<PciAddress>() else {
                continue;
            };
            if is_mac {
                match vf_state::read_vf_mac(dir, address) {
                    Ok(Some(mac)) => {
                        state.macs.insert(address, mac);
                    }
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%address, %error, "cannot read the VF's MAC file"),
                }
            } else {
                match vf_state::read_vf_state(dir, address) {
                    Ok(Some(value)) => {
                        if value == Ok(VfState::ScrubPending)
                            && let Some(age) = pending_age(dir, address)
                        {
                            state.pending_for.insert(address, age);
                        }
                        state.states.insert(address, value);
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(%address, %error, "cannot read the VF's state file");
                        state
                            .states
                            .insert(address, Err(ParseVfStateError(format!("unreadable: {error}"))));
                    }
                }
            }
        }
        state
    }
}

/// Pool membership: which pool holds which VF.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Members by pool.
    pub members: BTreeMap<String, BTreeSet<PciAddress>>,
    /// The pool of every member.
    pub owners: BTreeMap<PciAddress, String>,
    /// Devices more than one pool wanted, as sentences.
    pub conflicts: Vec<String>,
}

/// True when a selector matches a candidate. The `drivers` field matches
/// the bound driver or the `driver_override`, so a VF the agent meant for
/// vfio-pci stays in its pool (Unhealthy) while it is unbound.
pub fn selector_matches(selector: &PoolSelector, candidate: &Candidate) -> bool {
    let facts = &candidate.facts;
    selector
        .vendor
        .as_ref()
        .is_none_or(|v| v.eq_ignore_ascii_case(&facts.vendor))
        && selector
            .device
            .as_ref()
            .is_none_or(|d| d.eq_ignore_ascii_case(&facts.device))
        && (selector.pf_addresses.is_empty()
            || facts.pf.is_some_and(|pf| selector.pf_addresses.contains(&pf)))
        && (selector.drivers.is_empty()
            || [&candidate.driver, &candidate.driver_override]
                .into_iter()
                .flatten()
                .any(|d| selector.drivers.contains(d)))
}

/// Decides pool membership (module docs give the order).
pub fn assign(
    config: &PoolConfig,
    candidates: &BTreeMap<PciAddress, Candidate>,
    sticky: &BTreeMap<String, BTreeSet<PciAddress>>,
) -> Assignment {
    let mut out = Assignment::default();
    for pool in &config.pools {
        out.members.insert(pool.name.clone(), BTreeSet::new());
    }
    let take = |out: &mut Assignment, pool: &str, address: PciAddress| {
        out.owners.insert(address, pool.to_owned());
        out.members.entry(pool.to_owned()).or_default().insert(address);
    };
    for pool in &config.pools {
        for &address in pool.listed_devices() {
            match out.owners.get(&address) {
                Some(owner) if owner != &pool.name => out.conflicts.push(format!(
                    "{address} is listed by pools {owner} and {}; it stays in {owner}",
                    pool.name
                )),
                Some(_) => {}
                None => take(&mut out, &pool.name, address),
            }
        }
    }
    for pool in &config.pools {
        for &address in sticky.get(&pool.name).into_iter().flatten() {
            if !out.owners.contains_key(&address) {
                take(&mut out, &pool.name, address);
            }
        }
    }
    for pool in &config.pools {
        let Some(selector) = &pool.selector else { continue };
        for (address, candidate) in candidates {
            if !selector_matches(selector, candidate) {
                continue;
            }
            match out.owners.get(address) {
                Some(owner) if owner != &pool.name => out.conflicts.push(format!(
                    "{address} matches the selector of pool {} but belongs to pool {owner}",
                    pool.name
                )),
                Some(_) => {}
                None => take(&mut out, &pool.name, *address),
            }
        }
    }
    out
}

/// Everything one scan found.
#[derive(Debug, Clone, Default)]
pub struct ScanResult {
    /// Each pool's devices.
    pub views: BTreeMap<String, PoolView>,
    /// The pool of every device.
    pub owners: BTreeMap<PciAddress, String>,
}

/// The node's VFs and the pools' membership; owned by the scanner.
#[derive(Debug)]
pub struct Inventory {
    host: Host,
    state_dir: PathBuf,
    config: PoolConfig,
    candidates: BTreeMap<PciAddress, Candidate>,
    facts: BTreeMap<PciAddress, VfFacts>,
    pci_set: Vec<PciAddress>,
    pf_dirs: BTreeMap<PciAddress, DeviceDir>,
    assignment: Assignment,
}

impl Inventory {
    /// An inventory with no pools.
    pub fn new(host: Host, state_dir: PathBuf) -> Self {
        Self {
            host,
            state_dir,
            config: PoolConfig::default(),
            candidates: BTreeMap::new(),
            facts: BTreeMap::new(),
            pci_set: Vec::new(),
            pf_dirs: BTreeMap::new(),
            assignment: Assignment::default(),
        }
    }

    /// The host read.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The config in force.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Puts a new config in force. Pools whose config changed (or that are
    /// new) lose their sticky members; the caller then calls
    /// [`Inventory::discover`].
    pub fn set_config(&mut self, config: PoolConfig) {
        let old: BTreeMap<&str, &Pool> = self.config.pools.iter().map(|p| (p.name.as_str(), p)).collect();
        let mut members = BTreeMap::new();
        for pool in &config.pools {
            if old.get(pool.name.as_str()) == Some(&pool)
                && let Some(set) = self.assignment.members.get(&pool.name)
            {
                members.insert(pool.name.clone(), set.clone());
            }
        }
        self.assignment.members = members;
        self.config = config;
    }

    /// True when the list of PCI devices differs from the one the last
    /// discovery saw (one directory listing).
    pub fn device_set_changed(&self) -> bool {
        match self.host.pci_addresses() {
            Ok(addresses) => addresses != self.pci_set,
            Err(_) => !self.pci_set.is_empty(),
        }
    }

    /// Reads every PF and VF and recomputes membership. Returns the
    /// conflicts found (devices several pools want).
    ///
    /// # Errors
    /// When the PCI device list cannot be read at all.
    pub fn discover(&mut self) -> Result<Vec<String>, HostError> {
        self.pci_set = self.host.pci_addresses()?;
        let model = self.host.discover()?;
        for problem in &model.problems {
            tracing::debug!(address = ?problem.address, message = %problem.message, "discovery problem");
        }
        let mut candidates = BTreeMap::new();
        let mut node_cpus: BTreeMap<u32, Option<String>> = BTreeMap::new();
        let mut numa_cpus = |node: Option<u32>| -> Option<String> {
            let node = node?;
            node_cpus
                .entry(node)
                .or_insert_with(|| {
                    self.host
                        .numa_node_cpus(node)
                        .inspect_err(|e| tracing::warn!(node, error = %vfplane_host::error_chain(e), "cannot read the NUMA node's CPUs"))
                        .ok()
                })
                .clone()
        };
        self.pf_dirs = model
            .pfs
            .iter()
            .map(|pf| (pf.pci.address, self.host.resolve_device(pf.pci.address)))
            .collect();
        for pf in &model.pfs {
            for vf in &pf.vfs {
                let facts = VfFacts {
                    address: vf.pci.address,
                    pf: Some(vf.pf),
                    vf_index: Some(vf.index),
                    numa_node: vf.pci.numa_node,
                    numa_cpus: numa_cpus(vf.pci.numa_node),
                    vendor: vf.pci.vendor.clone(),
                    device: vf.pci.device.clone(),
                    group: vf.iommu.as_ref().map(|g| KnownGroup {
                        id: g.id,
                        members: g.members.clone(),
                    }),
                    device_dir: self.host.resolve_device(vf.pci.address),
                };
                candidates.insert(
                    vf.pci.address,
                    Candidate {
                        facts,
                        driver: vf.pci.driver.clone(),
                        driver_override: vf.pci.driver_override.clone(),
                    },
                );
            }
        }
        // Explicit devices that are not VFs of an SR-IOV PF still get facts.
        for pool in &self.config.pools {
            for &address in pool.listed_devices() {
                if candidates.contains_key(&address) {
                    continue;
                }
                if let Ok(pci) = self.host.pci_device(address) {
                    let group = pci
                        .iommu_group
                        .and_then(|id| self.host.iommu_group(id).ok())
                        .map(|g| KnownGroup {
                            id: g.id,
                            members: g.members,
                        });
                    self.facts.insert(
                        address,
                        VfFacts {
                            address,
                            pf: self.host.physfn(address).ok().flatten(),
                            vf_index: None,
                            numa_node: pci.numa_node,
                            numa_cpus: numa_cpus(pci.numa_node),
                            vendor: pci.vendor,
                            device: pci.device,
                            group,
                            device_dir: self.host.resolve_device(address),
                        },
                    );
                }
            }
        }
        for (address, candidate) in &candidates {
            self.facts.insert(*address, candidate.facts.clone());
        }
        self.candidates = candidates;
        let assignment = assign(&self.config, &self.candidates, &self.assignment.members);
        // Keep facts of members (a gone VF keeps its NUMA node and PF) and of
        // present candidates; forget the rest.
        let candidates = &self.candidates;
        self.facts
            .retain(|address, _| candidates.contains_key(address) || assignment.owners.contains_key(address));
        let conflicts = assignment.conflicts.clone();
        self.assignment = assignment;
        Ok(conflicts)
    }

    /// The current membership.
    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    /// Probes every member's health.
    pub fn scan(&self) -> ScanResult {
        let state = StateDir::read(&self.state_dir);
        // Unlistable, no VF has a node: each is Unhealthy with the reason.
        let vfio_nodes = self.host.vfio_nodes().unwrap_or_else(|error| {
            tracing::warn!(error = %vfplane_host::error_chain(&error), "cannot list the VFIO nodes");
            VfioNodes::default()
        });
        let mut pf_links: BTreeMap<PciAddress, LinkState> = BTreeMap::new();
        let mut result = ScanResult {
            owners: self.assignment.owners.clone(),
            ..ScanResult::default()
        };
        for pool in &self.config.pools {
            let mut view = PoolView::default();
            for &address in self.assignment.members.get(&pool.name).into_iter().flatten() {
                let facts = self.facts.get(&address).cloned();
                let pf = facts.as_ref().and_then(|f| f.pf);
                let link = match pf {
                    Some(pf) => pf_links
                        .entry(pf)
                        .or_insert_with(|| match self.pf_dirs.get(&pf) {
                            Some(dir) => health::probe_pf_link_fast(dir),
                            None => health::probe_pf_link(&self.host, pf),
                        })
                        .clone(),
                    None => LinkState::Unknown,
                };
                let state_of = state.states.get(&address).cloned();
                let mut observation = match &facts {
                    Some(facts) => health::probe_vf_fast(
                        &vfio_nodes,
                        &facts.device_dir,
                        facts.group.as_ref(),
                        link,
                        state_of,
                    ),
                    // A listed device never seen: read everything.
                    None => health::probe_vf(&self.host, address, link, state_of),
                };
                observation.state_age = state.pending_for.get(&address).copied();
                let health = health::evaluate(address, pf, &observation, pool.allow_no_iommu);
                view.devices.push(DeviceStatus {
                    address,
                    facts,
                    health,
                    vfio_node: observation.vfio_node,
                    mac: state.macs.get(&address).cloned(),
                });
            }
            result.views.insert(pool.name.clone(), view);
        }
        result
    }
}

/// Probes a few devices now, for Allocate: the same rules as a scan, on
/// fresh reads, with the facts the last scan had.
pub fn probe_now(host: &Host, state_dir: &Path, known: &DeviceStatus, allow_no_iommu: bool) -> DeviceStatus {
    let address = known.address;
    let pf = known.facts.as_ref().and_then(|f| f.pf);
    let link = pf.map_or(LinkState::Unknown, |pf| health::probe_pf_link(host, pf));
    let state = match vf_state::read_vf_state(state_dir, address) {
        Ok(state) => state,
        Err(error) => Some(Err(ParseVfStateError(format!("unreadable: {error}")))),
    };
    let pending = state == Some(Ok(VfState::ScrubPending));
    let mut observation = health::probe_vf(host, address, link, state);
    if pending {
        observation.state_age = pending_age(state_dir, address);
    }
    DeviceStatus {
        address,
        facts: known.facts.clone(),
        health: health::evaluate(address, pf, &observation, allow_no_iommu),
        vfio_node: observation.vfio_node,
        mac: vf_state::read_vf_mac(state_dir, address).ok().flatten(),
    }
}

/// The age of a VF's state file; `None` (no opinion) when it cannot be read.
fn pending_age(dir: &Path, address: PciAddress) -> Option<std::time::Duration> {
    vf_state::vf_state_age(dir, address)
        .inspect_err(|error| tracing::warn!(%address, %error, "cannot read the age of the VF's state file"))
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> PciAddress {
        text.parse().unwrap()
    }

    fn candidate(
        address: &str,
        pf: &str,
        driver: Option<&str>,
        over: Option<&str>,
    ) -> (PciAddress, Candidate) {
        (
            addr(address),
            Candidate {
                facts: VfFacts {
                    address: addr(address),
                    pf: Some(addr(pf)),
                    vf_index: Some(0),
                    numa_node: None,
                    numa_cpus: None,
                    vendor: "8086".into(),
                    device: "10ca".into(),
                    group: None,
                    device_dir: Host::new("/nonexistent", "/nonexistent").resolve_device(addr(address)),
                },
                driver: driver.map(Into::into),
                driver_override: over.map(Into::into),
            },
        )
    }

    fn config(text: &str) -> PoolConfig {
        PoolConfig::from_yaml(text).unwrap()
    }

    #[test]
    fn selectors_match_every_given_field() {
        let (_, c) = candidate("0000:00:12.0", "0000:00:02.0", None, Some("vfio-pci"));
        let all = PoolSelector::default();
        assert!(selector_matches(&all, &c));
        let sel = |text: &str| -> PoolSelector { serde_yaml::from_str(text).unwrap() };
        assert!(selector_matches(&sel("{vendor: \"8086\", device: \"10CA\"}"), &c));
        assert!(!selector_matches(&sel("{device: \"1515\"}"), &c));
        assert!(selector_matches(&sel("{pfAddresses: [\"0000:00:02.0\"]}"), &c));
        assert!(!selector_matches(&sel("{pfAddresses: [\"0000:00:03.0\"]}"), &c));
        // driver_override counts: an unbound VF meant for vfio-pci matches.
        assert!(selector_matches(&sel("{drivers: [vfio-pci]}"), &c));
        assert!(!selector_matches(&sel("{drivers: [igbvf]}"), &c));
    }

    #[test]
    fn explicit_then_sticky_then_selectors_and_one_pool_per_vf() {
        let candidates: BTreeMap<_, _> = [
            candidate("0000:00:12.0", "0000:00:02.0", Some("vfio-pci"), None),
            candidate("0000:00:12.2", "0000:00:02.0", Some("vfio-pci"), None),
            candidate("0000:00:12.4", "0000:00:02.0", Some("igbvf"), None),
        ]
        .into_iter()
        .collect();
        let config = config(
            "pools:\n  - name: all\n    selector: {drivers: [vfio-pci]}\n  - name: one\n    devices: [\"0000:00:12.2\"]\n",
        );
        let a = assign(&config, &candidates, &BTreeMap::new());
        assert_eq!(
            a.members["all"]
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["0000:00:12.0"]
        );
        assert_eq!(
            a.members["one"]
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["0000:00:12.2"]
        );
        assert_eq!(a.owners[&addr("0000:00:12.2")], "one");
        assert_eq!(a.conflicts.len(), 1, "{:?}", a.conflicts);
        // 12.0 leaves vfio-pci entirely (no override): it stays in "all" as a sticky member.
        let mut moved = candidates.clone();
        moved.insert(
            addr("0000:00:12.0"),
            candidate("0000:00:12.0", "0000:00:02.0", Some("igbvf"), None).1,
        );
        let b = assign(&config, &moved, &a.members);
        assert!(b.members["all"].contains(&addr("0000:00:12.0")));
        // Without stickiness (the pool's config changed) it is not selected.
        let c = assign(&config, &moved, &BTreeMap::new());
        assert!(!c.members["all"].contains(&addr("0000:00:12.0")));
    }

    #[test]
    fn view_differences_the_kubelet_sees() {
        let device = |health: Health| DeviceStatus {
            address: addr("0000:00:12.0"),
            facts: None,
            health,
            vfio_node: None,
            mac: None,
        };
        let a = PoolView {
            devices: vec![device(Health::default())],
        };
        let b = PoolView {
            devices: vec![device(Health {
                reasons: vec![health::Unready::Gone],
            })],
        };
        let c = PoolView {
            devices: vec![device(Health {
                reasons: vec![health::Unready::VfioNodeMissing(4)],
            })],
        };
        assert!(a.differs_for_kubelet(&b));
        assert!(
            !b.differs_for_kubelet(&c),
            "a new reason alone is not news to the kubelet"
        );
        assert_eq!(a.counts(), (1, 0));
        assert_eq!(b.list_and_watch().devices[0].health, "Unhealthy");
        assert!(a.get(addr("0000:00:12.0")).is_some());
        assert!(a.get(addr("0000:00:12.2")).is_none());
    }
}
