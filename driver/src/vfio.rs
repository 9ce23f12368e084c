//! A VF opened through VFIO: container, group and device (through
//! `vfio-ioctls`), Memory Space and Bus Master set in the PCI command
//! register, BAR0 mmapped, the IOMMU's usable IOVA ranges read, MSI-X
//! vector 0 routed to an eventfd on request.
//!
//! Every system call that `vfio-ioctls` does not wrap is in this module,
//! each `unsafe` with its own `// SAFETY:`.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE, vfio_iommu_type1_info,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::dma::IovaAllocator;
use crate::poll::{InterruptLine, PollError};
use crate::regs::{BAR0_SIZE, RegisterSpace};

vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// PCI command register offset in config space.
const PCI_COMMAND: u64 = 0x04;
/// Memory Space | Bus Master.
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x0006;

/// Errors of opening a VF through VFIO.
#[derive(Debug, Error)]
pub enum VfioOpenError {
    /// No such PCI device.
    #[error("no PCI device {pci} (no {path})")]
    NoDevice {
        /// The address.
        pci: String,
        /// The sysfs path looked at.
        path: PathBuf,
    },
    /// Bound to another driver (or none).
    #[error(
        "{pci} is bound to {driver}, not vfio-pci: bind it with \
         `echo vfio-pci > /sys/bus/pci/devices/{pci}/driver_override` and \
         `echo {pci} > /sys/bus/pci/drivers_probe` (after unbinding it)"
    )]
    NotVfioPci {
        /// The address.
        pci: String,
        /// Its driver ("no driver" when unbound).
        driver: String,
    },
    /// No IOMMU group: IOMMU off.
    #[error("{pci} has no IOMMU group: is the IOMMU on (intel_iommu=on / amd_iommu=on)?")]
    NoIommuGroup {
        /// The address.
        pci: String,
    },
    /// `/dev/vfio/<group>` missing.
    #[error(
        "{path} is missing: the VF's group {group} is not bound to vfio-pci on this node, \
         or the container was not given the device (the device plugin's Allocate passes \
         /dev/vfio/vfio and /dev/vfio/{group})"
    )]
    GroupNodeMissing {
        /// The group.
        group: u32,
        /// The missing node.
        path: PathBuf,
    },
    /// `/dev/vfio/vfio` missing.
    #[error("/dev/vfio/vfio is missing: load vfio (modprobe vfio-pci) or pass the node into the container")]
    ContainerNodeMissing,
    /// Another device in the group keeps it from being viable.
    #[error(
        "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci \
         (or be unbound), but {others}"
    )]
    GroupNotViable {
        /// The group.
        group: u32,
        /// The devices in the way, with their drivers.
        others: String,
    },
    /// A VFIO call failed.
    #[error("VFIO: {context}")]
    Vfio {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: VfioError,
    },
    /// Config space could not be read or written.
    #[error("cannot {what} the PCI command register of {pci}")]
    Config {
        /// The address.
        pci: String,
        /// Read or write.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// BAR0 cannot be mmapped.
    #[error("BAR0 of {pci} cannot be mapped: {reason}")]
    Bar {
        /// The address.
        pci: String,
        /// Why.
        reason: String,
    },
    /// VFIO_IOMMU_GET_INFO failed.
    #[error("VFIO_IOMMU_GET_INFO failed")]
    IommuInfo(#[source] io::Error),
}

/// What VFIO_IOMMU_GET_INFO reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// Page sizes the IOMMU maps (bitmap).
    pub page_sizes: u64,
    /// Usable IOVA ranges `[start, end]` (empty: not reported).
    pub iova_ranges: Vec<(u64, u64)>,
}

impl IommuInfo {
    /// An IOVA allocator inside the usable ranges (below 2^39 either way).
    pub fn iova_allocator(&self) -> IovaAllocator {
        if self.iova_ranges.is_empty() {
            IovaAllocator::with_default_window()
        } else {
            IovaAllocator::new(&self.iova_ranges, IovaAllocator::DEFAULT_CEILING)
        }
    }
}

/// A device BAR mmapped through VFIO; unmapped on drop.
#[derive(Debug)]
pub struct MappedBar {
    ptr: NonNull<u8>,
    len: usize,
}

impl MappedBar {
    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never true for an open BAR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn in_range(&self, offset: u32) -> bool {
        offset.is_multiple_of(4) && (offset as usize) + 4 <= self.len
    }
}

impl RegisterSpace for MappedBar {
    fn read32(&self, offset: u32) -> u32 {
        if !self.in_range(offset) {
            return u32::MAX;
        }
        // SAFETY: offset is 4-aligned and inside the live mapping (checked
        // above); device memory is read with a volatile 32-bit load.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset as usize)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        if !self.in_range(offset) {
            return;
        }
        // SAFETY: as in `read32`, with a volatile 32-bit store.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset as usize)
                .cast::<u32>()
                .write_volatile(value)
        }
    }
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map_bar0`, unmapped once.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of BAR0 failed");
        }
    }
}

/// A VF opened through VFIO.
pub struct VfioVf {
    pci: String,
    group: u32,
    // Field order is drop order: BAR, eventfd, then device, then container.
    bar0: MappedBar,
    irq: Option<EventFd>,
    device: VfioDevice,
    container: Arc<VfioContainer>,
    iommu: IommuInfo,
}

impl std::fmt::Debug for VfioVf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioVf")
            .field("pci", &self.pci)
            .field("group", &self.group)
            .field("bar0", &self.bar0)
            .field("iommu", &self.iommu)
            .finish_non_exhaustive()
    }
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Checks what can be checked in sysfs and /dev before VFIO is asked, so
/// the errors say what is wrong; returns the sysfs path and IOMMU group.
///
/// `sysfs` is normally `/sys`, `dev_vfio` normally `/dev/vfio`.
///
/// # Errors
/// The first problem found.
pub fn precheck(sysfs: &Path, dev_vfio: &Path, pci: &str) -> Result<(PathBuf, u32), VfioOpenError> {
    let device = sysfs.join("bus/pci/devices").join(pci);
    if !device.exists() {
        return Err(VfioOpenError::NoDevice {
            pci: pci.to_owned(),
            path: device,
        });
    }
    let driver = link_name(&device.join("driver")).unwrap_or_else(|| "no driver".to_owned());
    if driver != "vfio-pci" {
        return Err(VfioOpenError::NotVfioPci {
            pci: pci.to_owned(),
            driver,
        });
    }
    let group = link_name(&device.join("iommu_group"))
        .and_then(|g| g.parse::<u32>().ok())
        .ok_or_else(|| VfioOpenError::NoIommuGroup { pci: pci.to_owned() })?;
    let mut blockers = Vec::new();
    let members = sysfs.join(format!("kernel/iommu_groups/{group}/devices"));
    if let Ok(entries) = fs::read_dir(&members) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(drv) = link_name(&entry.path().join("driver"))
                && !matches!(drv.as_str(), "vfio-pci" | "pci-stub" | "pcieport")
            {
                blockers.push(format!("{name} is bound to {drv}"));
            }
        }
    }
    if !blockers.is_empty() {
        blockers.sort();
        return Err(VfioOpenError::GroupNotViable {
            group,
            others: blockers.join(", "),
        });
    }
    let node = dev_vfio.join(group.to_string());
    if !node.exists() {
        return Err(VfioOpenError::GroupNodeMissing { group, path: node });
    }
    if !dev_vfio.join("vfio").exists() {
        return Err(VfioOpenError::ContainerNodeMissing);
    }
    Ok((device, group))
}

/// Reads VFIO_IOMMU_GET_INFO with its capability chain.
fn iommu_info(container: &VfioContainer) -> Result<IommuInfo, VfioOpenError> {
    let header = std::mem::size_of::<vfio_iommu_type1_info>();
    let mut argsz = header;
    for _ in 0..2 {
        // u64 words keep the buffer 8-aligned for the kernel's structs.
        let mut buf = vec![0u64; argsz.div_ceil(8)];
        let bytes_len = buf.len() * 8;
        let info = vfio_iommu_type1_info {
            argsz: argsz as u32,
            ..Default::default()
        };
        // SAFETY: `buf` holds at least `header` bytes and is 8-aligned, as
        // `vfio_iommu_type1_info` needs; the write is in bounds.
        unsafe { buf.as_mut_ptr().cast::<vfio_iommu_type1_info>().write(info) };
        // SAFETY: VFIO_IOMMU_GET_INFO writes at most `argsz` bytes (our
        // buffer's size) into the struct we pass; the container fd is live.
        let rc = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                container,
                VFIO_IOMMU_GET_INFO(),
                buf.as_mut_ptr().cast::<u8>(),
            )
        };
        if rc < 0 {
            return Err(VfioOpenError::IommuInfo(io::Error::last_os_error()));
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let word = |at: usize| -> u32 {
            bytes
                .get(at..at + 4)
                .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        let dword = |at: usize| -> u64 { u64::from(word(at)) | (u64::from(word(at + 4)) << 32) };
        let needed = word(0) as usize;
        if needed > bytes_len {
            argsz = needed;
            continue;
        }
        let flags = word(4);
        let mut info = IommuInfo {
            page_sizes: dword(8),
            iova_ranges: Vec::new(),
        };
        if flags & VFIO_IOMMU_INFO_CAPS != 0 {
            let mut at = word(16) as usize;
            let mut hops = 0;
            while at != 0 && at + 16 <= bytes.len() && hops < 32 {
                let id = word(at) & 0xFFFF;
                let next = word(at + 4) as usize;
                if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                    let n = word(at + 8) as usize;
                    for k in 0..n.min(1024) {
                        let r = at + 16 + 16 * k;
                        if r + 16 > bytes.len() {
                            break;
                        }
                        info.iova_ranges.push((dword(r), dword(r + 8)));
                    }
                }
                at = next;
                hops += 1;
            }
        }
        return Ok(info);
    }
    Err(VfioOpenError::IommuInfo(io::Error::other(
        "capability chain kept growing",
    )))
}

fn pread_exact(fd: i32, buf: &mut [u8], offset: u64) -> io::Result<()> {
    // SAFETY: pread writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short config read"));
    }
    Ok(())
}

fn pwrite_exact(fd: i32, buf: &[u8], offset: u64) -> io::Result<()> {
    // SAFETY: pwrite reads at most `buf.len()` bytes from `buf`.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), offset as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short config write"));
    }
    Ok(())
}

impl VfioVf {
    /// Opens the VF at `pci` (`dddd:bb:dd.f`), bound to vfio-pci.
    ///
    /// # Errors
    /// See [`VfioOpenError`]: each says what to fix.
    pub fn open(pci: &str) -> Result<Self, VfioOpenError> {
        let (sysfs_path, group) = precheck(Path::new("/sys"), Path::new("/dev/vfio"), pci)?;
        let container = Arc::new(VfioContainer::new(None).map_err(|source| match source {
            VfioError::OpenContainer(e) if e.kind() == io::ErrorKind::NotFound => {
                VfioOpenError::ContainerNodeMissing
            }
            source => VfioOpenError::Vfio {
                context: "opening the container /dev/vfio/vfio".to_owned(),
                source,
            },
        })?);
        let device =
            VfioDevice::new(&sysfs_path, container.clone(), false).map_err(|source| match source {
                VfioError::GroupViable => VfioOpenError::GroupNotViable {
                    group,
                    others: "the kernel says so (a device outside sysfs' list, or a bridge)".to_owned(),
                },
                VfioError::OpenGroup(e, _) if e.kind() == io::ErrorKind::NotFound => {
                    VfioOpenError::GroupNodeMissing {
                        group,
                        path: PathBuf::from(format!("/dev/vfio/{group}")),
                    }
                }
                source => VfioOpenError::Vfio {
                    context: format!("opening {pci} in group {group}"),
                    source,
                },
            })?;
        let fd = device.as_raw_fd();

        // vfio-pci's reset on open cleared the command register, and QEMU
        // maps a VF's BARs only while Memory Space is set.
        let config = device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
        let mut cmd = [0u8; 2];
        pread_exact(fd, &mut cmd, config + PCI_COMMAND).map_err(|source| VfioOpenError::Config {
            pci: pci.to_owned(),
            what: "read",
            source,
        })?;
        let value = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY_MASTER;
        pwrite_exact(fd, &value.to_le_bytes(), config + PCI_COMMAND).map_err(|source| {
            VfioOpenError::Config {
                pci: pci.to_owned(),
                what: "write",
                source,
            }
        })?;

        let bar0 = map_bar0(&device, pci)?;
        let iommu = iommu_info(&container)?;
        tracing::info!(pci, group, page_sizes = iommu.page_sizes, ranges = ?iommu.iova_ranges, "VF opened through VFIO");
        Ok(Self {
            pci: pci.to_owned(),
            group,
            bar0,
            irq: None,
            device,
            container,
            iommu,
        })
    }

    /// The PCI address.
    pub fn pci(&self) -> &str {
        &self.pci
    }

    /// The IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// The container, for DMA mappings.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// What the IOMMU reported.
    pub fn iommu(&self) -> &IommuInfo {
        &self.iommu
    }

    /// BAR0.
    pub fn bar0(&self) -> &MappedBar {
        &self.bar0
    }
}

fn map_bar0(device: &VfioDevice, pci: &str) -> Result<MappedBar, VfioOpenError> {
    let index = VFIO_PCI_BAR0_REGION_INDEX;
    let flags = device.get_region_flags(index);
    let size = device.get_region_size(index) as usize;
    let offset = device.get_region_offset(index);
    let bar_err = |reason: String| VfioOpenError::Bar {
        pci: pci.to_owned(),
        reason,
    };
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(bar_err(format!("VFIO does not allow mmap (flags {flags:#x})")));
    }
    if size < BAR0_SIZE {
        return Err(bar_err(format!("{size} bytes, an 82576 VF has {BAR0_SIZE}")));
    }
    // SAFETY: a fresh shared mapping of the device fd's BAR0 region at an
    // address of the kernel's choice; it aliases no Rust memory, and the
    // result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(bar_err(format!("mmap: {}", io::Error::last_os_error())));
    }
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| bar_err("mmap returned null".to_owned()))?;
    Ok(MappedBar { ptr, len: size })
}

impl RegisterSpace for VfioVf {
    fn read32(&self, offset: u32) -> u32 {
        self.bar0.read32(offset)
    }

    fn write32(&self, offset: u32, value: u32) {
        self.bar0.write32(offset, value);
    }
}

impl InterruptLine for VfioVf {
    fn enable(&mut self) -> Result<(), PollError> {
        if self.irq.is_some() {
            return Ok(());
        }
        let efd = EventFd::new(EFD_NONBLOCK).map_err(PollError::EventFd)?;
        self.device.enable_msix(vec![&efd]).map_err(PollError::SetIrqs)?;
        self.irq = Some(efd);
        Ok(())
    }

    fn wait(&self, timeout: Duration) -> Result<bool, PollError> {
        let efd = self.irq.as_ref().ok_or(PollError::NotEnabled)?;
        let mut pfd = libc::pollfd {
            fd: efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(PollError::Wait(err));
        }
        if rc == 0 {
            return Ok(false);
        }
        // Drain the counter (non-blocking); WouldBlock means a racing read.
        match efd.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(PollError::Wait(e)),
        }
    }

    fn discard_pending(&self) -> bool {
        // Non-blocking: Ok when the count was above zero (and is now zero),
        // WouldBlock when it was zero.
        self.irq.as_ref().is_some_and(|efd| efd.read().is_ok())
    }
}

impl Drop for VfioVf {
    fn drop(&mut self) {
        if self.irq.is_some()
            && let Err(error) = self.device.disable_msix()
        {
            tracing::warn!(%error, "disabling MSI-X failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vfplane-driver-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("sys/bus/pci/devices")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/igbvf")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/iommu_groups/5/devices")).unwrap();
        fs::create_dir_all(root.join("dev/vfio")).unwrap();
        root
    }

    fn add_device(root: &Path, pci: &str, driver: Option<&str>, group: u32) {
        let dev = root.join("sys/devices/pci0000:00").join(pci);
        fs::create_dir_all(&dev).unwrap();
        symlink(&dev, root.join("sys/bus/pci/devices").join(pci)).unwrap();
        if let Some(d) = driver {
            symlink(root.join("sys/bus/pci/drivers").join(d), dev.join("driver")).unwrap();
        }
        let g = root.join(format!("sys/kernel/iommu_groups/{group}"));
        fs::create_dir_all(g.join("devices")).unwrap();
        symlink(&g, dev.join("iommu_group")).unwrap();
        symlink(&dev, g.join("devices").join(pci)).unwrap();
    }

    #[test]
    fn precheck_explains_each_problem() {
        let root = tree("precheck");
        let (sys, dev) = (root.join("sys"), root.join("dev/vfio"));
        let pci = "0000:00:12.0";
        assert!(matches!(
            precheck(&sys, &dev, pci),
            Err(VfioOpenError::NoDevice { .. })
        ));

        add_device(&root, pci, Some("igbvf"), 5);
        let err = precheck(&sys, &dev, pci).unwrap_err();
        assert!(matches!(&err, VfioOpenError::NotVfioPci { driver, .. } if driver == "igbvf"));
        assert!(err.to_string().contains("driver_override"));

        fs::remove_file(root.join("sys/devices/pci0000:00").join(pci).join("driver")).unwrap();
        symlink(
            root.join("sys/bus/pci/drivers/vfio-pci"),
            root.join("sys/devices/pci0000:00").join(pci).join("driver"),
        )
        .unwrap();
        add_device(&root, "0000:00:12.1", Some("igbvf"), 5);
        let err = precheck(&sys, &dev, pci).unwrap_err();
        assert!(matches!(err, VfioOpenError::GroupNotViable { group: 5, .. }));
        assert!(err.to_string().contains("0000:00:12.1 is bound to igbvf"));

        fs::remove_file(root.join("sys/devices/pci0000:00/0000:00:12.1/driver")).unwrap();
        let err = precheck(&sys, &dev, pci).unwrap_err();
        assert!(matches!(err, VfioOpenError::GroupNodeMissing { group: 5, .. }));
        assert!(err.to_string().contains("/dev/vfio/5"));

        fs::write(dev.join("5"), b"").unwrap();
        assert!(matches!(
            precheck(&sys, &dev, pci),
            Err(VfioOpenError::ContainerNodeMissing)
        ));
        fs::write(dev.join("vfio"), b"").unwrap();
        let (path, group) = precheck(&sys, &dev, pci).unwrap();
        assert_eq!(group, 5);
        assert!(path.ends_with(pci));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn iommu_info_without_ranges_uses_the_default_window() {
        let info = IommuInfo::default();
        assert_eq!(
            info.iova_allocator().free_ranges(),
            IovaAllocator::with_default_window().free_ranges()
        );
        let info = IommuInfo {
            page_sizes: 0x4020_1000,
            iova_ranges: vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 48) - 1)],
        };
        assert_eq!(
            info.iova_allocator().free_ranges(),
            &[(IovaAllocator::FLOOR, 0xfee0_0000), (0xfef0_0000, 1 << 39)]
        );
    }
}
