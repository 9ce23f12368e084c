//! A fake sysfs tree in a temporary directory, shaped like the real one the
//! testbed guest shows (relative symlinks included), for unit tests of this
//! crate and of the crates above it.
//!
//! It is a tree of plain files: written on its own, it does not react to
//! writes the way the kernel does, and tests that need a reaction call
//! [`FakeSysfs::add_vfs`] themselves. A [`Host`] made by
//! [`FakeKernel::host`] hands its writes to a [`FakeKernel`] instead, which
//! changes the tree as the kernel would: VFs appear and go with
//! `sriov_numvfs`, a probe binds the driver named in `driver_override`.
#![allow(clippy::missing_panics_doc)]

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::{Host, PciAddress};

/// A sysfs root and a dev root in a temporary directory.
#[derive(Debug)]
pub struct FakeSysfs {
    dir: tempfile::TempDir,
}

/// One PCI function to create.
#[derive(Debug, Clone)]
pub struct FakeDevice {
    /// Its address.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code.
    pub class: u32,
    /// NUMA node as the kernel prints it (-1 for unknown).
    pub numa_node: i32,
    /// Bound driver.
    pub driver: Option<String>,
    /// IOMMU group.
    pub iommu_group: Option<u32>,
}

impl FakeDevice {
    /// An Intel 82576 (igb) PF on driver igb, NUMA unknown, no IOMMU group.
    pub fn igb_pf(address: PciAddress) -> Self {
        Self {
            address,
            vendor: 0x8086,
            device: 0x10c9,
            class: 0x020000,
            numa_node: -1,
            driver: Some("igb".to_owned()),
            iommu_group: None,
        }
    }
}

impl FakeSysfs {
    /// An empty tree: `sys/bus/pci/devices`, `sys/kernel/iommu_groups`, `dev/vfio`.
    ///
    /// # Errors
    /// When the temporary directory cannot be made.
    pub fn new() -> io::Result<Self> {
        Self::with_dir(tempfile::tempdir()?)
    }

    /// An empty tree in a new directory under `parent` (a tmpfs, say, for
    /// many trees at once).
    ///
    /// # Errors
    /// When the directory cannot be made.
    pub fn new_in(parent: &Path) -> io::Result<Self> {
        Self::with_dir(tempfile::Builder::new().prefix("sysfs-").tempdir_in(parent)?)
    }

    fn with_dir(dir: tempfile::TempDir) -> io::Result<Self> {
        for sub in [
            "sys/bus/pci/devices",
            "sys/bus/pci/drivers",
            "sys/kernel/iommu_groups",
            "sys/devices/pci0000:00",
            "dev/vfio",
        ] {
            fs::create_dir_all(dir.path().join(sub))?;
        }
        fs::write(dir.path().join("sys/bus/pci/drivers_probe"), "")?;
        Ok(Self { dir })
    }

    /// A [`Host`] reading this tree.
    pub fn host(&self) -> Host {
        Host::new(self.sysfs_root(), self.dev_root())
    }

    /// The sysfs root (`<tmp>/sys`).
    pub fn sysfs_root(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    /// The dev root (`<tmp>/dev`).
    pub fn dev_root(&self) -> PathBuf {
        self.dir.path().join("dev")
    }

    /// The real directory of a device (`sys/devices/pci0000:00/<bdf>`).
    pub fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.sysfs_root()
            .join("devices/pci0000:00")
            .join(address.to_string())
    }

    /// Writes a file under the sysfs root (relative path), making parents.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, relative: impl AsRef<Path>, contents: &str) -> io::Result<()> {
        let path = self.sysfs_root().join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, contents)
    }

    /// Reads a file under the sysfs root.
    ///
    /// # Errors
    /// I/O errors.
    pub fn read(&self, relative: impl AsRef<Path>) -> io::Result<String> {
        fs::read_to_string(self.sysfs_root().join(relative))
    }

    /// Creates a PCI function with the attribute files and links the kernel has.
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_device(&self, device: &FakeDevice) -> io::Result<()> {
        let bdf = device.address.to_string();
        let dir = self.device_dir(device.address);
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("vendor"), format!("0x{:04x}\n", device.vendor))?;
        fs::write(dir.join("device"), format!("0x{:04x}\n", device.device))?;
        fs::write(dir.join("class"), format!("0x{:06x}\n", device.class))?;
        fs::write(dir.join("numa_node"), format!("{}\n", device.numa_node))?;
        fs::write(dir.join("driver_override"), "(null)\n")?;
        symlink(
            format!("../../../devices/pci0000:00/{bdf}"),
            self.sysfs_root().join("bus/pci/devices").join(&bdf),
        )?;
        if let Some(driver) = &device.driver {
            self.set_driver(device.address, Some(driver))?;
        }
        if let Some(group) = device.iommu_group {
            self.add_to_iommu_group(device.address, group)?;
        }
        Ok(())
    }

    /// Makes NUMA node `node` with these CPUs (`cpulist` text, `0-1`).
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_numa_node(&self, node: u32, cpulist: &str) -> io::Result<()> {
        let dir = self.sysfs_root().join(format!("devices/system/node/node{node}"));
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("cpulist"), format!("{cpulist}\n"))
    }

    /// Writes a device's 64-byte config space header with vendor, device
    /// and `command` filled in, the rest zero.
    ///
    /// # Errors
    /// I/O errors.
    pub fn set_command_register(&self, address: PciAddress, command: u16) -> io::Result<()> {
        let dir = self.device_dir(address);
        let hex = |name: &str| -> u16 {
            fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| u16::from_str_radix(t.trim().trim_start_matches("0x"), 16).ok())
                .unwrap_or(0)
        };
        let mut config = vec![0u8; 64];
        config[0..2].copy_from_slice(&hex("vendor").to_le_bytes());
        config[2..4].copy_from_slice(&hex("device").to_le_bytes());
        config[4..6].copy_from_slice(&command.to_le_bytes());
        fs::write(dir.join("config"), config)
    }

    /// Points a device's `driver` link at `driver`, or removes it.
    ///
    /// # Errors
    /// I/O errors.
    pub fn set_driver(&self, address: PciAddress, driver: Option<&str>) -> io::Result<()> {
        let link = self.device_dir(address).join("driver");
        remove_if_present(&link)?;
        if let Some(driver) = driver {
            fs::create_dir_all(self.sysfs_root().join("bus/pci/drivers").join(driver))?;
            symlink(format!("../../../bus/pci/drivers/{driver}"), link)?;
        }
        Ok(())
    }

    /// Puts a device into IOMMU group `group` (creating the group).
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_to_iommu_group(&self, address: PciAddress, group: u32) -> io::Result<()> {
        let bdf = address.to_string();
        let group_dir = self
            .sysfs_root()
            .join("kernel/iommu_groups")
            .join(group.to_string());
        fs::create_dir_all(group_dir.join("devices"))?;
        fs::write(group_dir.join("type"), "DMA\n")?;
        symlink(
            format!("../../../../devices/pci0000:00/{bdf}"),
            group_dir.join("devices").join(&bdf),
        )?;
        let link = self.device_dir(address).join("iommu_group");
        remove_if_present(&link)?;
        symlink(format!("../../../kernel/iommu_groups/{group}"), link)
    }

    /// Makes `/dev/vfio/<group>` exist (as a plain file standing for the node).
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_vfio_node(&self, group: u32) -> io::Result<()> {
        fs::write(self.dev_root().join("vfio").join(group.to_string()), "")
    }

    /// Makes `/dev/vfio/noiommu-<group>` exist: VFIO's no-IOMMU mode.
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_noiommu_vfio_node(&self, group: u32) -> io::Result<()> {
        fs::write(self.dev_root().join("vfio").join(format!("noiommu-{group}")), "")
    }

    /// Creates an SR-IOV PF with `total_vfs`, no VFs yet, and one netdev.
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_pf(&self, device: &FakeDevice, total_vfs: u16, netdev: &str) -> io::Result<()> {
        self.add_device(device)?;
        let dir = self.device_dir(device.address);
        fs::write(dir.join("sriov_totalvfs"), format!("{total_vfs}\n"))?;
        fs::write(dir.join("sriov_numvfs"), "0\n")?;
        fs::write(dir.join("sriov_offset"), "128\n")?;
        fs::write(dir.join("sriov_stride"), "2\n")?;
        fs::write(dir.join("sriov_vf_device"), "10ca\n")?;
        fs::write(dir.join("sriov_drivers_autoprobe"), "1\n")?;
        let net = dir.join("net").join(netdev);
        fs::create_dir_all(&net)?;
        fs::write(net.join("operstate"), "up\n")?;
        fs::write(net.join("carrier"), "1\n")?;
        fs::write(net.join("address"), "52:54:00:12:34:56\n")?;
        fs::write(net.join("mtu"), "1500\n")?;
        Ok(())
    }

    /// The address of VF `index` of `pf`, by the kernel's routing-ID rule with
    /// the 82576's offset 128 and stride 2.
    pub fn vf_address(pf: PciAddress, index: u16) -> PciAddress {
        let rid = (u32::from(pf.bus) << 8) | (u32::from(pf.device) << 3) | u32::from(pf.function);
        let vf = rid + 128 + 2 * u32::from(index);
        PciAddress {
            domain: pf.domain,
            bus: ((vf >> 8) & 0xff) as u8,
            device: ((vf >> 3) & 0x1f) as u8,
            function: (vf & 0x7) as u8,
        }
    }

    /// Creates `count` VFs of `pf` (as the kernel does after a `sriov_numvfs`
    /// write), each unbound, the first in IOMMU group `first_group` and the
    /// next ones in the following groups; `sriov_numvfs` is set to `count`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn add_vfs(
        &self,
        pf: PciAddress,
        count: u16,
        first_group: Option<u32>,
        numa_node: i32,
    ) -> io::Result<Vec<PciAddress>> {
        let mut vfs = Vec::new();
        for index in 0..count {
            let address = Self::vf_address(pf, index);
            self.add_device(&FakeDevice {
                address,
                vendor: 0x8086,
                device: 0x10ca,
                class: 0x020000,
                numa_node,
                driver: None,
                iommu_group: first_group.map(|g| g + u32::from(index)),
            })?;
            let vf_dir = self.device_dir(address);
            symlink(format!("../{pf}"), vf_dir.join("physfn"))?;
            fs::write(vf_dir.join("reset"), "")?;
            self.set_command_register(address, 0)?;
            symlink(
                format!("../{address}"),
                self.device_dir(pf).join(format!("virtfn{index}")),
            )?;
            vfs.push(address);
        }
        fs::write(self.device_dir(pf).join("sriov_numvfs"), format!("{count}\n"))?;
        Ok(vfs)
    }

    /// Removes a device's directory (its links stay and dangle, as they do
    /// for an instant when the kernel removes a VF).
    ///
    /// # Errors
    /// I/O errors.
    pub fn remove_device_dir(&self, address: PciAddress) -> io::Result<()> {
        fs::remove_dir_all(self.device_dir(address))
    }
}

/// The kernel's side of the writes a [`Host`] makes, played on a
/// [`FakeSysfs`]: what the real kernel does synchronously within the write
/// happens here before the write returns.
///
/// - `sriov_numvfs`: `n` above `sriov_totalvfs` is refused (`ERANGE`), a
///   change between two non-zero counts too (`EBUSY`); otherwise the VFs
///   are created (unbound, each in a new IOMMU group, on the PF's NUMA node)
///   or all removed.
/// - `drivers_probe`: the device is bound to the driver in its
///   `driver_override`, and a vfio-pci device gets its `/dev/vfio/<group>`;
///   without an override it stays unbound (no driver matches a fake device).
/// - `driver/unbind`: the device loses its driver (and its VFIO node).
/// - Any other attribute is written as a file.
#[derive(Debug)]
pub struct FakeKernel {
    tree: Arc<FakeSysfs>,
}

impl FakeKernel {
    /// The kernel of `tree`.
    pub fn new(tree: Arc<FakeSysfs>) -> Arc<Self> {
        Arc::new(Self { tree })
    }

    /// A [`Host`] on the tree whose writes go through this kernel.
    pub fn host(self: &Arc<Self>) -> Host {
        self.tree.host().with_fake_kernel(Arc::clone(self))
    }

    /// The tree.
    pub fn tree(&self) -> &FakeSysfs {
        &self.tree
    }

    /// Carries out a write of `value` to `path` (a path under the tree's
    /// sysfs root).
    ///
    /// # Errors
    /// What the kernel would refuse, as the `io::Error` it returns, and
    /// I/O errors of the tree.
    pub fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let root = self.tree.sysfs_root();
        let relative: Vec<String> = path
            .strip_prefix(&root)
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, "outside the fake sysfs tree"))?
            .components()
            .filter_map(|c| match c {
                Component::Normal(name) => Some(name.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect();
        let parts: Vec<&str> = relative.iter().map(String::as_str).collect();
        match parts.as_slice() {
            ["bus", "pci", "drivers_probe"] => self.probe(parse_address(value)?),
            ["bus", "pci", "devices", device, "sriov_numvfs"] => {
                let count = value
                    .trim()
                    .parse::<u16>()
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                self.set_num_vfs(parse_address(device)?, count)
            }
            ["bus", "pci", "devices", device, "driver", "unbind"] => {
                let address = parse_address(device)?;
                self.drop_vfio_node(address)?;
                self.tree.set_driver(address, None)
            }
            _ => fs::write(path, value),
        }
    }

    fn set_num_vfs(&self, pf: PciAddress, count: u16) -> io::Result<()> {
        let dir = self.tree.device_dir(pf);
        let read_number = |name: &str| -> io::Result<u16> {
            fs::read_to_string(dir.join(name))?
                .trim()
                .parse()
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
        };
        let (current, total) = (read_number("sriov_numvfs")?, read_number("sriov_totalvfs")?);
        if count > total {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        if count == current {
            return Ok(());
        }
        if current != 0 && count != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        if count == 0 {
            return self.remove_vfs(pf);
        }
        let numa_node = fs::read_to_string(dir.join("numa_node"))?
            .trim()
            .parse()
            .unwrap_or(-1);
        self.tree
            .add_vfs(pf, count, Some(self.next_free_group()?), numa_node)?;
        Ok(())
    }

    fn remove_vfs(&self, pf: PciAddress) -> io::Result<()> {
        let dir = self.tree.device_dir(pf);
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if !entry.file_name().to_string_lossy().starts_with("virtfn") {
                continue;
            }
            let target = fs::read_link(entry.path())?;
            let vf = parse_address(&target.file_name().unwrap_or_default().to_string_lossy())?;
            self.drop_vfio_node(vf)?;
            let group_link = self.tree.device_dir(vf).join("iommu_group");
            if let Ok(group) = fs::read_link(&group_link) {
                let group_dir = group_link.parent().unwrap_or(dir.as_path()).join(group);
                fs::remove_dir_all(group_dir)?;
            }
            self.tree.remove_device_dir(vf)?;
            fs::remove_file(
                self.tree
                    .sysfs_root()
                    .join("bus/pci/devices")
                    .join(vf.to_string()),
            )?;
            fs::remove_file(entry.path())?;
        }
        fs::write(dir.join("sriov_numvfs"), "0\n")
    }

    fn probe(&self, address: PciAddress) -> io::Result<()> {
        let dir = self.tree.device_dir(address);
        let wanted = fs::read_to_string(dir.join("driver_override"))?;
        let wanted = wanted.trim();
        if wanted.is_empty() || wanted == "(null)" {
            return Ok(());
        }
        self.tree.set_driver(address, Some(wanted))?;
        if wanted == "vfio-pci"
            && let Some(group) = self.group_of(address)
        {
            self.tree.add_vfio_node(group)?;
        }
        Ok(())
    }

    fn drop_vfio_node(&self, address: PciAddress) -> io::Result<()> {
        match self.group_of(address) {
            Some(group) => remove_if_present(&self.tree.dev_root().join("vfio").join(group.to_string())),
            None => Ok(()),
        }
    }

    fn group_of(&self, address: PciAddress) -> Option<u32> {
        fs::read_link(self.tree.device_dir(address).join("iommu_group"))
            .ok()?
            .file_name()?
            .to_str()?
            .parse()
            .ok()
    }

    /// One past the highest IOMMU group in the tree.
    fn next_free_group(&self) -> io::Result<u32> {
        let mut next = 0;
        for entry in fs::read_dir(self.tree.sysfs_root().join("kernel/iommu_groups"))? {
            if let Ok(group) = entry?.file_name().to_string_lossy().parse::<u32>() {
                next = next.max(group + 1);
            }
        }
        Ok(next)
    }
}

fn parse_address(text: &str) -> io::Result<PciAddress> {
    text.trim()
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
