//! The node's SR-IOV hardware seen through sysfs.
//!
//! [`Host`] reads PCI devices, Physical Functions, Virtual Functions and IOMMU
//! groups, and performs the few writes SR-IOV needs (`sriov_numvfs`, driver
//! binding). Every path lives under the sysfs and dev roots given at
//! construction, so the same code runs on `/sys` in production, on a host
//! tree mounted elsewhere inside a container, and on a fake tree in tests
//! (see [`fake`] with the `fake` feature).

mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod kernel_events;
mod model;
mod probe;
pub mod readiness;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use error::{HostError, Result};
pub use model::{
    HostModel, IommuGroup, IommuState, Netdev, PciDevice, PhysicalFunction, Problem, VirtualFunction,
};
pub use probe::{DeviceDir, ParseVfioNodeError, VfioNode, VfioNodes};
pub use vfplane_proto::error_chain;
pub use vfplane_proto::pci::{ParsePciAddressError, PciAddress};

use vfplane_proto::pci::parse_sysfs_hex;

/// The node's sysfs and device nodes, rooted where they are mounted.
#[derive(Debug, Clone)]
pub struct Host {
    sysfs: PathBuf,
    dev: PathBuf,
    /// Where writes go instead of the files, for a fake tree that has to
    /// react to them as the kernel does ([`fake::FakeKernel`]).
    #[cfg(any(test, feature = "fake"))]
    kernel: Option<std::sync::Arc<fake::FakeKernel>>,
}

impl Default for Host {
    fn default() -> Self {
        Self::new("/sys", "/dev")
    }
}

impl Host {
    /// A host whose sysfs is mounted at `sysfs_root` (normally `/sys`) and
    /// whose device nodes are under `dev_root` (normally `/dev`).
    pub fn new(sysfs_root: impl Into<PathBuf>, dev_root: impl Into<PathBuf>) -> Self {
        Self {
            sysfs: sysfs_root.into(),
            dev: dev_root.into(),
            #[cfg(any(test, feature = "fake"))]
            kernel: None,
        }
    }

    /// This host with its writes carried out by `kernel`, which changes the
    /// fake tree as the kernel would (VFs appear after a `sriov_numvfs`
    /// write, a probe binds the device).
    #[cfg(any(test, feature = "fake"))]
    #[must_use]
    pub fn with_fake_kernel(mut self, kernel: std::sync::Arc<fake::FakeKernel>) -> Self {
        self.kernel = Some(kernel);
        self
    }

    /// Writes `value` to the sysfs attribute `path`.
    fn write_attr(&self, path: &Path, value: &str) -> Result<()> {
        #[cfg(any(test, feature = "fake"))]
        let written = match &self.kernel {
            Some(kernel) => kernel.write(path, value),
            None => fs::write(path, value),
        };
        #[cfg(not(any(test, feature = "fake")))]
        let written = fs::write(path, value);
        written.map_err(|source| HostError::Write {
            path: path.to_owned(),
            value: value.to_owned(),
            source,
        })
    }

    /// The sysfs root.
    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs
    }

    /// The dev root.
    pub fn dev_root(&self) -> &Path {
        &self.dev
    }

    fn devices_dir(&self) -> PathBuf {
        self.sysfs.join("bus/pci/devices")
    }

    fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.devices_dir().join(address.to_string())
    }

    fn iommu_groups_dir(&self) -> PathBuf {
        self.sysfs.join("kernel/iommu_groups")
    }

    /// `/dev/vfio/<group>` under the dev root.
    pub fn vfio_group_node(&self, group: u32) -> PathBuf {
        self.dev.join("vfio").join(group.to_string())
    }

    /// Addresses of every PCI function on the node, sorted.
    ///
    /// # Errors
    /// When `bus/pci/devices` cannot be listed. Entries whose names are not
    /// PCI addresses are skipped.
    pub fn pci_addresses(&self) -> Result<Vec<PciAddress>> {
        let dir = self.devices_dir();
        let entries = list_dir(&dir)?;
        let mut addresses = Vec::new();
        for entry in entries {
            match entry.file_name().to_str().map(str::parse::<PciAddress>) {
                Some(Ok(address)) => addresses.push(address),
                _ => tracing::debug!(entry = ?entry.file_name(), "skipping a non-PCI entry"),
            }
        }
        addresses.sort();
        Ok(addresses)
    }

    /// Reads one PCI function.
    ///
    /// # Errors
    /// [`HostError::DeviceNotFound`] when it does not exist; read or parse
    /// errors naming the file otherwise.
    pub fn pci_device(&self, address: PciAddress) -> Result<PciDevice> {
        let dir = self.existing_device_dir(address)?;
        let id = |name: &'static str, width: usize| -> Result<String> {
            let path = dir.join(name);
            let text = read_attr(&path)?;
            let value = parse_sysfs_hex(&text).ok_or_else(|| HostError::Parse {
                path: path.clone(),
                value: text.trim().to_owned(),
                expected: "a hexadecimal number",
            })?;
            Ok(format!("{value:0width$x}"))
        };
        let numa_path = dir.join("numa_node");
        let numa_node = match read_optional_attr(&numa_path)? {
            None => None,
            Some(text) => {
                let value: i64 = text.trim().parse().map_err(|_| HostError::Parse {
                    path: numa_path.clone(),
                    value: text.trim().to_owned(),
                    expected: "a NUMA node number",
                })?;
                u32::try_from(value).ok()
            }
        };
        let driver_override = read_optional_attr(&dir.join("driver_override"))?
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty() && text != "(null)");
        Ok(PciDevice {
            address,
            vendor: id("vendor", 4)?,
            device: id("device", 4)?,
            class: id("class", 6)?,
            driver: link_name(&dir.join("driver"))?,
            driver_override,
            numa_node,
            iommu_group: self.iommu_group_id(address)?,
        })
    }

    fn existing_device_dir(&self, address: PciAddress) -> Result<PathBuf> {
        let dir = self.device_dir(address);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(HostError::DeviceNotFound { address, path: dir })
        }
    }

    /// The IOMMU group number of a device, `None` without an IOMMU.
    ///
    /// # Errors
    /// When the device is missing or its `iommu_group` link is not a number.
    pub fn iommu_group_id(&self, address: PciAddress) -> Result<Option<u32>> {
        let path = self.existing_device_dir(address)?.join("iommu_group");
        match link_name(&path)? {
            None => Ok(None),
            Some(name) => name.parse().map(Some).map_err(|_| HostError::Parse {
                path,
                value: name,
                expected: "an IOMMU group number",
            }),
        }
    }

    /// An IOMMU group with its members.
    ///
    /// # Errors
    /// When the group directory cannot be listed.
    pub fn iommu_group(&self, id: u32) -> Result<IommuGroup> {
        let dir = self.iommu_groups_dir().join(id.to_string()).join("devices");
        let entries = list_dir(&dir)?;
        let mut members = Vec::new();
        for entry in entries {
            let name = entry.file_name();
            let address = name
                .to_str()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| HostError::Parse {
                    path: entry.path(),
                    value: name.to_string_lossy().into_owned(),
                    expected: "a PCI address",
                })?;
            members.push(address);
        }
        members.sort();
        Ok(IommuGroup { id, members })
    }

    /// Whether the node has DMA remapping, and how many groups it has.
    ///
    /// # Errors
    /// When `kernel/iommu_groups` exists but cannot be listed.
    pub fn iommu_state(&self) -> Result<IommuState> {
        let dir = self.iommu_groups_dir();
        let groups = match fs::read_dir(&dir) {
            Ok(entries) => entries.filter_map(|e| e.ok()).count(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(HostError::Read { path: dir, source }),
        };
        let groups = u32::try_from(groups).unwrap_or(u32::MAX);
        Ok(IommuState {
            enabled: groups > 0,
            groups,
        })
    }

    /// True when the function has an SR-IOV capability (`sriov_totalvfs`).
    pub fn is_physical_function(&self, address: PciAddress) -> bool {
        self.device_dir(address).join("sriov_totalvfs").is_file()
    }

    /// `sriov_totalvfs` of a PF.
    ///
    /// # Errors
    /// [`HostError::NotPhysicalFunction`] for a device without SR-IOV.
    pub fn total_vfs(&self, pf: PciAddress) -> Result<u16> {
        self.sriov_count(pf, "sriov_totalvfs")
    }

    /// `sriov_numvfs` of a PF.
    ///
    /// # Errors
    /// [`HostError::NotPhysicalFunction`] for a device without SR-IOV.
    pub fn num_vfs(&self, pf: PciAddress) -> Result<u16> {
        self.sriov_count(pf, "sriov_numvfs")
    }

    fn sriov_count(&self, pf: PciAddress, name: &str) -> Result<u16> {
        let dir = self.existing_device_dir(pf)?;
        let path = dir.join(name);
        let text = match read_optional_attr(&path)? {
            Some(text) => text,
            None => return Err(HostError::NotPhysicalFunction { address: pf }),
        };
        text.trim().parse().map_err(|_| HostError::Parse {
            path,
            value: text.trim().to_owned(),
            expected: "a VF count",
        })
    }

    /// The VFs of a PF as `(index, address)` from its `virtfnN` links, by index.
    ///
    /// # Errors
    /// When the PF is missing or a link cannot be read.
    pub fn vf_addresses(&self, pf: PciAddress) -> Result<Vec<(u16, PciAddress)>> {
        let dir = self.existing_device_dir(pf)?;
        let entries = list_dir(&dir)?;
        let mut vfs = Vec::new();
        for entry in entries {
            let name = entry.file_name();
            let Some(index) = name.to_str().and_then(|n| n.strip_prefix("virtfn")) else {
                continue;
            };
            let path = entry.path();
            let index: u16 = index.parse().map_err(|_| HostError::Parse {
                path: path.clone(),
                value: name.to_string_lossy().into_owned(),
                expected: "virtfn<N>",
            })?;
            let Some(target) = link_name(&path)? else { continue };
            let address = target.parse().map_err(|_| HostError::Parse {
                path,
                value: target,
                expected: "a link to a PCI address",
            })?;
            vfs.push((index, address));
        }
        vfs.sort();
        Ok(vfs)
    }

    /// The PF of a VF (its `physfn` link), `None` for a device that is not a VF.
    ///
    /// # Errors
    /// When the device is missing or the link does not name a PCI address.
    pub fn physfn(&self, vf: PciAddress) -> Result<Option<PciAddress>> {
        let path = self.existing_device_dir(vf)?.join("physfn");
        match link_name(&path)? {
            None => Ok(None),
            Some(target) => target.parse().map(Some).map_err(|_| HostError::Parse {
                path,
                value: target,
                expected: "a link to a PCI address",
            }),
        }
    }

    /// The network interfaces of a device (`<device>/net/*`), sorted by name.
    ///
    /// # Errors
    /// When an interface's attributes cannot be read.
    pub fn netdevs(&self, address: PciAddress) -> Result<Vec<Netdev>> {
        let dir = self.existing_device_dir(address)?.join("net");
        let Some(entries) = list_optional_dir(&dir)? else {
            return Ok(Vec::new());
        };
        let mut netdevs = Vec::new();
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let trimmed = |name: &str| -> Result<Option<String>> {
                Ok(read_optional_attr(&path.join(name))?.map(|t| t.trim().to_owned()))
            };
            // The kernel answers EINVAL to a `carrier` read while the
            // interface is down: that is "unknown", not an error.
            let carrier = match fs::read_to_string(path.join("carrier")) {
                Ok(text) => Some(text.trim() == "1"),
                Err(_) => None,
            };
            let mtu_path = path.join("mtu");
            let mtu = match trimmed("mtu")? {
                None => None,
                Some(text) => Some(text.parse().map_err(|_| HostError::Parse {
                    path: mtu_path,
                    value: text,
                    expected: "an MTU",
                })?),
            };
            netdevs.push(Netdev {
                operstate: trimmed("operstate")?.unwrap_or_else(|| "unknown".to_owned()),
                carrier,
                mac: trimmed("address")?,
                mtu,
                name,
            });
        }
        netdevs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(netdevs)
    }

    /// Reads one VF of a PF.
    ///
    /// # Errors
    /// When the VF or its IOMMU group cannot be read.
    pub fn virtual_function(
        &self,
        pf: PciAddress,
        index: u16,
        address: PciAddress,
    ) -> Result<VirtualFunction> {
        let pci = self.pci_device(address)?;
        let iommu = match pci.iommu_group {
            Some(id) => Some(self.iommu_group(id)?),
            None => None,
        };
        let isolated = iommu.as_ref().is_some_and(|g| g.members == [address]);
        let vfio_node = pci.iommu_group.and_then(|id| self.vfio_node(id));
        Ok(VirtualFunction {
            index,
            pf,
            pci,
            iommu,
            isolated,
            vfio_node,
        })
    }

    /// Reads one PF and all its VFs. VFs that cannot be read are returned as
    /// problems beside the PF, so one bad VF does not hide the others.
    ///
    /// # Errors
    /// When the PF itself cannot be read.
    pub fn physical_function(&self, address: PciAddress) -> Result<(PhysicalFunction, Vec<Problem>)> {
        let pci = self.pci_device(address)?;
        let total_vfs = self.total_vfs(address)?;
        let num_vfs = self.num_vfs(address)?;
        let vf_device_path = self.device_dir(address).join("sriov_vf_device");
        let vf_device = match read_optional_attr(&vf_device_path)? {
            None => None,
            Some(text) => Some(format!(
                "{:04x}",
                parse_sysfs_hex(&text).ok_or_else(|| HostError::Parse {
                    path: vf_device_path,
                    value: text.trim().to_owned(),
                    expected: "a hexadecimal device ID",
                })?
            )),
        };
        let netdevs = self.netdevs(address)?;
        let mut vfs = Vec::new();
        let mut problems = Vec::new();
        for (index, vf) in self.vf_addresses(address)? {
            match self.virtual_function(address, index, vf) {
                Ok(vf) => vfs.push(vf),
                Err(error) => problems.push(Problem {
                    address: Some(vf),
                    message: if error.is_vanished() {
                        format!(
                            "VF {index} of {address} vanished while it was read: {}",
                            error_chain(&error)
                        )
                    } else {
                        format!("VF {index} of {address}: {}", error_chain(&error))
                    },
                }),
            }
        }
        Ok((
            PhysicalFunction {
                pci,
                total_vfs,
                num_vfs,
                vf_device,
                netdevs,
                vfs,
            },
            problems,
        ))
    }

    /// Reads everything SR-IOV on the node. A device that cannot be read is
    /// reported in [`HostModel::problems`] and the rest is still returned.
    ///
    /// # Errors
    /// Only when the PCI device list itself cannot be read.
    pub fn discover(&self) -> Result<HostModel> {
        let iommu = self.iommu_state()?;
        let mut pfs = Vec::new();
        let mut problems = Vec::new();
        for address in self.pci_addresses()? {
            if !self.is_physical_function(address) {
                continue;
            }
            match self.physical_function(address) {
                Ok((pf, vf_problems)) => {
                    pfs.push(pf);
                    problems.extend(vf_problems);
                }
                Err(error) => problems.push(Problem {
                    address: Some(address),
                    message: error_chain(&error),
                }),
            }
        }
        Ok(HostModel {
            sysfs_root: self.sysfs.display().to_string(),
            iommu,
            pfs,
            problems,
        })
    }

    /// Sets the number of VFs of a PF. A change between two non-zero counts
    /// goes through 0, as the kernel requires; asking for the current count
    /// writes nothing.
    ///
    /// # Errors
    /// [`HostError::TooManyVfs`] above `sriov_totalvfs` (nothing is written);
    /// a write error naming the file when the kernel refuses.
    pub fn set_num_vfs(&self, pf: PciAddress, requested: u16) -> Result<()> {
        let total = self.total_vfs(pf)?;
        if requested > total {
            return Err(HostError::TooManyVfs {
                address: pf,
                requested,
                total,
            });
        }
        let current = self.num_vfs(pf)?;
        let dir = self.device_dir(pf);
        // New VFs come up without a driver: a kernel VF driver probing at
        // creation talks to the PF (reset, MAC negotiation) while the agent
        // is setting the VF's MAC through the PF, and igb then kept a random
        // MAC now and then. The agent binds each VF itself once the PF has
        // configured it. Kernels before 4.12 lack the file and always probe.
        let autoprobe = dir.join("sriov_drivers_autoprobe");
        if requested > current && autoprobe.exists() {
            self.write_attr(&autoprobe, "0")?;
        }
        let path = dir.join("sriov_numvfs");
        for step in num_vfs_steps(current, requested) {
            tracing::info!(pf = %pf, from = current, to = step, "writing sriov_numvfs");
            self.write_attr(&path, &step.to_string())?;
        }
        Ok(())
    }

    /// Binds a device to `driver` through `driver_override` and
    /// `drivers_probe`, unbinding it from another driver first. Binding to
    /// the driver it already has does nothing.
    ///
    /// # Errors
    /// Write errors naming the file, and [`HostError::BindFailed`] when the
    /// device ends up on another driver (the driver is not loaded, say).
    pub fn bind_driver(&self, address: PciAddress, driver: &str) -> Result<()> {
        if driver.is_empty() || driver.contains(['/', '\n', '\0']) || driver.starts_with('.') {
            return Err(HostError::InvalidDriverName(driver.to_owned()));
        }
        let dir = self.existing_device_dir(address)?;
        let current = link_name(&dir.join("driver"))?;
        if current.as_deref() == Some(driver) {
            return Ok(());
        }
        self.write_attr(&dir.join("driver_override"), driver)?;
        if current.is_some() {
            self.write_attr(&dir.join("driver/unbind"), &address.to_string())?;
        }
        self.write_attr(&self.sysfs.join("bus/pci/drivers_probe"), &address.to_string())?;
        let bound = link_name(&dir.join("driver"))?;
        if bound.as_deref() == Some(driver) {
            tracing::info!(device = %address, driver, "bound");
            Ok(())
        } else {
            Err(HostError::BindFailed {
                address,
                wanted: driver.to_owned(),
                actual: bound.unwrap_or_else(|| "no driver".to_owned()),
            })
        }
    }

    /// The CPUs of NUMA node `node`, as the kernel lists them
    /// (`devices/system/node/node<N>/cpulist`, e.g. `0-3,8-11`).
    ///
    /// # Errors
    /// [`HostError::Read`] when the node does not exist or cannot be read.
    pub fn numa_node_cpus(&self, node: u32) -> Result<String> {
        let path = self.sysfs.join(format!("devices/system/node/node{node}/cpulist"));
        fs::read_to_string(&path)
            .map(|text| text.trim().to_owned())
            .map_err(|source| HostError::Read { path, source })
    }

    /// Resets one function through sysfs `reset`: the kernel picks the
    /// method (`reset_method`; a function-level reset for an SR-IOV VF),
    /// saving and restoring its config space around it. The kernel refuses
    /// (`EBUSY`, say) while a driver has the device in use.
    ///
    /// # Errors
    /// [`HostError::NoFunctionReset`] when the device offers no reset, and
    /// the write error naming the file.
    pub fn reset_function(&self, address: PciAddress) -> Result<()> {
        let path = self.existing_device_dir(address)?.join("reset");
        if !path.exists() {
            return Err(HostError::NoFunctionReset { address });
        }
        self.write_attr(&path, "1")?;
        tracing::info!(device = %address, "function reset");
        Ok(())
    }

    /// The PCI command register of a device, from its config space
    /// (`config`, offset 4, little-endian).
    ///
    /// # Errors
    /// Read errors, and [`HostError::Parse`] for a config space shorter
    /// than 6 bytes.
    pub fn command_register(&self, address: PciAddress) -> Result<u16> {
        let path = self.existing_device_dir(address)?.join("config");
        let bytes = fs::read(&path).map_err(|source| HostError::Read {
            path: path.clone(),
            source,
        })?;
        match bytes.get(4..6) {
            Some(&[low, high]) => Ok(u16::from_le_bytes([low, high])),
            _ => Err(HostError::Parse {
                path,
                value: format!("{} bytes", bytes.len()),
                expected: "a config space of at least 6 bytes",
            }),
        }
    }

    /// Unbinds a device from its driver and clears `driver_override`, so it
    /// stays unbound until something binds it. An unbound device is left as it is.
    ///
    /// # Errors
    /// Write errors naming the file.
    pub fn unbind_driver(&self, address: PciAddress) -> Result<()> {
        let dir = self.existing_device_dir(address)?;
        if link_name(&dir.join("driver"))?.is_some() {
            self.write_attr(&dir.join("driver/unbind"), &address.to_string())?;
        }
        Ok(())
    }
}

/// The `sriov_numvfs` writes that take a PF from `current` to `requested`
/// VFs: none when equal, through 0 between two non-zero counts.
pub fn num_vfs_steps(current: u16, requested: u16) -> Vec<u16> {
    match (current, requested) {
        (c, r) if c == r => Vec::new(),
        (0, r) => vec![r],
        (_, 0) => vec![0],
        (_, r) => vec![0, r],
    }
}

/// The soft and hard RLIMIT_MEMLOCK of process `pid`, from the "Max locked
/// memory" line of `<proc_root>/<pid>/limits`; `None` inside stands for
/// unlimited, `None` outside for a process or line that cannot be read.
pub fn memlock_limits(proc_root: &Path, pid: i32) -> Option<(Option<u64>, Option<u64>)> {
    let text = fs::read_to_string(proc_root.join(pid.to_string()).join("limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
    let mut fields = line["Max locked memory".len()..].split_whitespace();
    let parse = |field: Option<&str>| -> Option<Option<u64>> {
        match field? {
            "unlimited" => Some(None),
            number => number.parse().ok().map(Some),
        }
    };
    Some((parse(fields.next())?, parse(fields.next())?))
}

/// The CPUs (or memory nodes) of a kernel list such as `0-3,8,10-11`;
/// `None` for text that is not one. An empty list is an empty set.
pub fn parse_cpu_list(text: &str) -> Option<std::collections::BTreeSet<u32>> {
    let mut set = std::collections::BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = part.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if first > last || last - first > 65_535 {
            return None;
        }
        set.extend(first..=last);
    }
    Some(set)
}

/// The command register's Bus Master Enable bit: set, the function can
/// start DMA.
pub const PCI_COMMAND_BUS_MASTER: u16 = 1 << 2;

fn read_attr(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads an attribute that may legitimately be absent.
/// The entries of a directory, every read error naming it.
fn list_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    list_optional_dir(dir)?.ok_or_else(|| HostError::Read {
        path: dir.to_owned(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })
}

/// The entries of a directory, `None` when it does not exist.
fn list_optional_dir(dir: &Path) -> Result<Option<Vec<fs::DirEntry>>> {
    let read_error = |source| HostError::Read {
        path: dir.to_owned(),
        source,
    };
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.map_err(read_error))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(read_error(source)),
    }
}

fn read_optional_attr(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The last component of a symlink's target (`driver -> ../../bus/pci/drivers/igb`
/// gives `igb`), `None` when there is no link.
fn link_name(path: &Path) -> Result<Option<String>> {
    match fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        // A gone device: its directory, or the directory the link was in.
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(None),
        Err(source) => Err(HostError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests;
