//! DMA memory: regions a device can read and write, each with a host address
//! and an IO virtual address (IOVA).
//!
//! [`DmaAllocator`] is the seam: [`VfioDma`] gives hugepage-backed (2 MiB)
//! or 4 KiB-page memory mapped into a VFIO container's IOMMU domain, and
//! the device model (`model::ModelDma`, feature `model`) gives plain memory the
//! model "DMAs" into. Every [`DmaRegion`] owns its memory: dropping it
//! unmaps it from the IOMMU first and then from the process.
//!
//! The device may access a region at any time once it is told about it,
//! so the region is never seen through a Rust reference while the device
//! may touch it: descriptor rings are read and written with volatile
//! accesses only, and packet buffers are lent out as slices only while no
//! descriptor points at them (see [`crate::mempool`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use vfio_ioctls::{VfioContainer, VfioError};

/// 4 KiB.
pub const PAGE_4K: usize = 4096;
/// 2 MiB.
pub const PAGE_2M: usize = 2 * 1024 * 1024;

/// Errors of DMA memory.
#[derive(Debug, Error)]
pub enum DmaError {
    /// A zero-length region was asked for.
    #[error("a DMA region cannot be empty")]
    Empty,
    /// mmap of host memory failed.
    #[error("cannot map {len} bytes of host memory ({kind})")]
    HostMap {
        /// Bytes asked for.
        len: usize,
        /// "2 MiB hugepages" or "4 KiB pages".
        kind: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No IOVA range left for the region.
    #[error("no free IOVA range of {len} bytes (aligned to {align}) inside the IOMMU's ranges")]
    IovaExhausted {
        /// Bytes asked for.
        len: usize,
        /// Alignment asked for.
        align: usize,
    },
    /// VFIO_IOMMU_MAP_DMA failed for lack of locked memory.
    #[error(
        "the locked-memory limit is too low: mapping {len} more bytes for DMA needs RLIMIT_MEMLOCK of at least \
         {needed} bytes ({needed_kib} KiB) but it is {limit}; raise it with `ulimit -l {needed_kib}` \
         (or `unlimited`), in a vfplane pod with the VfPolicy's containerProfile.lockedMemory, or grant \
         CAP_IPC_LOCK"
    )]
    LockedMemoryLimit {
        /// Bytes of this mapping.
        len: usize,
        /// Bytes this process needs locked in total.
        needed: u64,
        /// The same in KiB, as `ulimit -l` takes it.
        needed_kib: u64,
        /// The current limit, as text.
        limit: String,
    },
    /// VFIO_IOMMU_MAP_DMA failed.
    #[error("cannot map {len} bytes at IOVA {iova:#x} into the IOMMU")]
    IommuMap {
        /// IOVA.
        iova: u64,
        /// Bytes.
        len: usize,
        /// The VFIO error.
        #[source]
        source: VfioError,
    },
    /// The directory given for hugepages is not a hugetlbfs mount.
    #[error(
        "{dir} is not a hugetlbfs mount (in a pod: an emptyDir volume with medium HugePages-2Mi, and a \
         hugepages-2Mi limit on the container)"
    )]
    NotHugetlbfs {
        /// The directory.
        dir: PathBuf,
    },
    /// The hugetlbfs mount could not be read or a file made in it.
    #[error("cannot use the hugetlbfs mount {dir}")]
    Hugetlbfs {
        /// The directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The model's memory could not be allocated.
    #[error("cannot allocate {len} bytes of model memory")]
    ModelAlloc {
        /// Bytes asked for.
        len: usize,
    },
}

/// What keeps a region's memory alive; dropping it releases the memory
/// (unmapping it from the IOMMU first where it was mapped).
pub trait DmaBacking: fmt::Debug {}

/// A region of memory a device can DMA to and from.
pub struct DmaRegion {
    virt: NonNull<u8>,
    len: usize,
    iova: u64,
    page_size: usize,
    // Dropped after every use of `virt`: it owns the memory.
    _backing: Box<dyn DmaBacking>,
}

impl fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaRegion")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

impl DmaRegion {
    /// Wraps memory owned by `backing`.
    ///
    /// # Safety
    /// `virt..virt + len` must be valid for reads and writes, aligned to 64
    /// bytes, and owned by `backing` until `backing` is dropped; the device
    /// must see the same bytes at `iova..iova + len`; nothing else may hold a
    /// Rust reference to the memory.
    pub unsafe fn from_raw_parts(
        virt: NonNull<u8>,
        len: usize,
        iova: u64,
        page_size: usize,
        backing: Box<dyn DmaBacking>,
    ) -> Self {
        Self {
            virt,
            len,
            iova,
            page_size,
            _backing: backing,
        }
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true for an allocated region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's IOVA (what the device is told).
    #[inline]
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The NUMA nodes the region's pages are on, read from
    /// `/proc/self/numa_maps` (the line of the mapping that starts at the
    /// region). Empty when no mapping starts there (the device model's
    /// memory) or its pages are not present yet.
    ///
    /// # Errors
    /// `/proc/self/numa_maps` cannot be read (a kernel without NUMA).
    pub fn numa_nodes(&self) -> std::io::Result<std::collections::BTreeSet<u32>> {
        let maps = std::fs::read_to_string("/proc/self/numa_maps")?;
        Ok(numa_nodes_of_mapping(&maps, self.virt.as_ptr() as usize))
    }

    /// Page size backing the region (4 KiB or 2 MiB).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Host address of the start of the region.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.virt.as_ptr()
    }

    /// Whether `offset..offset + len` lies inside the region.
    fn contains(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Volatile 32-bit read at `offset`; `None` when out of range or unaligned.
    pub fn read_u32(&self, offset: usize) -> Option<u32> {
        if !self.contains(offset, 4) || !offset.is_multiple_of(4) {
            return None;
        }
        // SAFETY: in range (checked above) of memory valid for reads
        // (`from_raw_parts` contract), 4-aligned since the base is 64-aligned.
        Some(unsafe { self.virt.as_ptr().add(offset).cast::<u32>().read_volatile() })
    }

    /// Volatile 32-bit write at `offset`; returns false when out of range or
    /// unaligned. `&mut self`: no other reference to the region can be
    /// reading the bytes.
    pub fn write_u32(&mut self, offset: usize, value: u32) -> bool {
        if !self.contains(offset, 4) || !offset.is_multiple_of(4) {
            return false;
        }
        // SAFETY: in range and aligned (checked above) of memory valid for
        // writes; no Rust reference to it exists (`from_raw_parts` contract).
        unsafe { self.virt.as_ptr().add(offset).cast::<u32>().write_volatile(value) };
        true
    }

    /// Fills `len` bytes at `offset` with `value` (volatile writes); false
    /// when out of range. `&mut self`, as for `write_u32`.
    pub fn fill(&mut self, offset: usize, len: usize, value: u8) -> bool {
        if !self.contains(offset, len) {
            return false;
        }
        for i in 0..len {
            // SAFETY: offset + i < len (checked above); memory valid for writes.
            unsafe { self.virt.as_ptr().add(offset + i).write_volatile(value) };
        }
        true
    }
}

/// Gives DMA regions.
pub trait DmaAllocator {
    /// A region of at least `len` bytes, zeroed, 64-byte aligned, mapped for
    /// the device.
    ///
    /// # Errors
    /// When memory, IOVA space or the locked-memory limit runs out.
    fn allocate(&self, len: usize) -> Result<DmaRegion, DmaError>;
}

/// First-fit allocator of IOVA ranges inside the ranges the IOMMU allows.
#[derive(Debug, Clone, Default)]
pub struct IovaAllocator {
    /// Free ranges `[start, end)`, sorted, disjoint, never adjacent.
    free: Vec<(u64, u64)>,
}

impl IovaAllocator {
    /// Lowest IOVA handed out: page 0 and the first MiB stay unmapped so a
    /// zeroed descriptor can never reach real memory.
    pub const FLOOR: u64 = 1 << 20;
    /// Highest IOVA (exclusive) handed out when the IOMMU does not report its
    /// ranges: 39 bits, what every VT-d with 3-level tables accepts.
    pub const DEFAULT_CEILING: u64 = 1 << 39;

    /// An allocator over the given usable ranges (`[start, end]`, inclusive
    /// end as VFIO reports them), clipped to `[FLOOR, ceiling)`.
    pub fn new(ranges: &[(u64, u64)], ceiling: u64) -> Self {
        let mut free: Vec<(u64, u64)> = ranges
            .iter()
            .filter_map(|&(start, last)| {
                let start = start.max(Self::FLOOR);
                let end = last.saturating_add(1).min(ceiling);
                (start < end).then_some((start, end))
            })
            .collect();
        free.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(free.len());
        for (start, end) in free {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Self { free: merged }
    }

    /// The default window `[FLOOR, 2^39)`.
    pub fn with_default_window() -> Self {
        Self::new(&[(0, Self::DEFAULT_CEILING - 1)], Self::DEFAULT_CEILING)
    }

    /// Takes `len` bytes aligned to `align` (a power of two).
    pub fn allocate(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        for i in 0..self.free.len() {
            let (start, end) = self.free[i];
            let Some(aligned) = start.checked_add(align - 1).map(|v| v & !(align - 1)) else {
                continue;
            };
            let Some(stop) = aligned.checked_add(len) else {
                continue;
            };
            if stop > end {
                continue;
            }
            // Split [start, end) into [start, aligned) + used + [stop, end).
            let mut pieces = Vec::with_capacity(2);
            if start < aligned {
                pieces.push((start, aligned));
            }
            if stop < end {
                pieces.push((stop, end));
            }
            self.free.splice(i..=i, pieces);
            return Some(aligned);
        }
        None
    }

    /// Gives `[start, start + len)` back.
    pub fn free(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = start.saturating_add(len);
        let at = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(at, (start, end));
        // Merge with neighbours.
        if at + 1 < self.free.len() && self.free[at].1 >= self.free[at + 1].0 {
            self.free[at].1 = self.free[at].1.max(self.free[at + 1].1);
            self.free.remove(at + 1);
        }
        if at > 0 && self.free[at - 1].1 >= self.free[at].0 {
            self.free[at - 1].1 = self.free[at - 1].1.max(self.free[at].1);
            self.free.remove(at);
        }
    }

    /// The free ranges `[start, end)`.
    pub fn free_ranges(&self) -> &[(u64, u64)] {
        &self.free
    }
}

/// The nodes (`N<node>=<pages>` fields) of the `numa_maps` line of the
/// mapping starting at `start`.
fn numa_nodes_of_mapping(numa_maps: &str, start: usize) -> std::collections::BTreeSet<u32> {
    numa_maps
        .lines()
        .find(|line| {
            line.split_whitespace()
                .next()
                .and_then(|addr| usize::from_str_radix(addr, 16).ok())
                == Some(start)
        })
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter_map(|field| {
            let (node, pages) = field.strip_prefix('N')?.split_once('=')?;
            let node = node.parse::<u32>().ok()?;
            (pages.parse::<u64>().ok()? > 0).then_some(node)
        })
        .collect()
}

/// Which pages back DMA memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PagePolicy {
    /// 2 MiB hugepages when the system has them free, 4 KiB pages otherwise.
    #[default]
    Auto,
    /// 2 MiB hugepages (anonymous, `MAP_HUGETLB`) or fail.
    Hugepages,
    /// 4 KiB pages only.
    SmallPages,
    /// Hugepages from files in this hugetlbfs mount (the mount's page
    /// size), or fail. In a Kubernetes pod this is the container's
    /// `emptyDir: {medium: HugePages-2Mi}` volume: the pages the kubelet
    /// accounted to the pod, on the NUMA node its memory is bound to. Each
    /// region's file is unlinked as soon as it is mapped, so its pages go
    /// back when the region is dropped or the process dies.
    HugetlbfsDir(PathBuf),
}

/// `statfs(2)`'s `f_type` of a hugetlbfs mount.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The page size of the hugetlbfs mount at `dir`.
fn hugetlbfs_page_size(dir: &Path) -> Result<usize, DmaError> {
    let io = |source| DmaError::Hugetlbfs {
        dir: dir.to_owned(),
        source,
    };
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs is a plain C struct; all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct statfs statfs writes into.
    if unsafe { libc::statfs(c_dir.as_ptr(), &mut fs) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    if fs.f_type as i64 != HUGETLBFS_MAGIC {
        return Err(DmaError::NotHugetlbfs { dir: dir.to_owned() });
    }
    usize::try_from(fs.f_bsize)
        .ok()
        .filter(|size| size.is_power_of_two() && *size >= PAGE_2M)
        .ok_or_else(|| {
            io(std::io::Error::other(format!(
                "page size {} of the mount",
                fs.f_bsize
            )))
        })
}

/// Distinguishes the files one process makes in a hugetlbfs mount.
static HUGETLBFS_FILES: AtomicU64 = AtomicU64::new(0);

/// Anonymous host memory from mmap; munmapped on drop.
#[derive(Debug)]
struct HostMemory {
    ptr: NonNull<u8>,
    len: usize,
    page_size: usize,
}

// SAFETY: HostMemory is a plain owned anonymous mapping; nothing in it is
// tied to the thread that made it.
unsafe impl Send for HostMemory {}

impl HostMemory {
    fn map(len: usize, page_size: usize) -> Result<Self, DmaError> {
        let len = len.div_ceil(page_size) * page_size;
        let huge = page_size == PAGE_2M;
        let mut flags = libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        if huge {
            flags |= libc::MAP_SHARED | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB;
        } else {
            flags |= libc::MAP_PRIVATE;
        }
        // SAFETY: an anonymous mapping at an address of the kernel's choice
        // aliases nothing; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        let kind = if huge { "2 MiB hugepages" } else { "4 KiB pages" };
        let ptr = mapped(ptr, len, kind)?;
        Ok(Self { ptr, len, page_size })
    }

    /// `len` bytes (rounded up to the mount's page size) of a new file in
    /// the hugetlbfs mount `dir`, mapped shared and populated; the file is
    /// unlinked before this returns, so only the mapping holds its pages.
    fn map_hugetlbfs(dir: &Path, len: usize) -> Result<Self, DmaError> {
        let page_size = hugetlbfs_page_size(dir)?;
        let len = len.div_ceil(page_size) * page_size;
        let io = |source| DmaError::Hugetlbfs {
            dir: dir.to_owned(),
            source,
        };
        let n = HUGETLBFS_FILES.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("vfplane-dma-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        // Unlinked at once: the mapping below keeps the pages, and nothing
        // is left behind in the mount when the process goes.
        std::fs::remove_file(&path).map_err(io)?;
        // hugetlbfs takes no write(2): its size is set by ftruncate only.
        file.set_len(len as u64).map_err(io)?;
        // SAFETY: a shared mapping of a file only this process can reach
        // (unlinked above), at an address of the kernel's choice; it aliases
        // no other memory of the process. The result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        let ptr = mapped(ptr, len, "hugepages of a hugetlbfs mount")?;
        // The file is closed here; the mapping keeps it (and its pages).
        drop(file);
        Ok(Self { ptr, len, page_size })
    }
}

/// What `mmap` of `len` bytes of `kind` returned, as a pointer or the OS
/// error (read right after the call, before anything else can change it).
fn mapped(ptr: *mut libc::c_void, len: usize, kind: &'static str) -> Result<NonNull<u8>, DmaError> {
    if ptr == libc::MAP_FAILED {
        return Err(DmaError::HostMap {
            len,
            kind,
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(ptr.cast::<u8>()).ok_or(DmaError::HostMap {
        len,
        kind: "null mapping",
        source: std::io::Error::other("mmap returned null"),
    })
}

impl Drop for HostMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr + len` is exactly the mapping made in `map`, and
        // it is unmapped only here, once.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(len = self.len, error = %std::io::Error::last_os_error(), "munmap of DMA memory failed");
        }
    }
}

/// The current RLIMIT_MEMLOCK soft limit (None: unlimited or unreadable).
pub fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Shared state of a [`VfioDma`] and the regions it gave.
#[derive(Debug)]
struct VfioDmaState {
    iova: IovaAllocator,
    mapped_bytes: u64,
}

/// The shared IOVA state, even after a thread panicked holding it: every
/// change to it is one call that cannot panic halfway (an allocation, a
/// free, a counter update), so a poisoned lock still guards consistent
/// state. Treating poison as "no IOVA left" (as this once did) misreported
/// the cause and leaked the ranges of every region dropped afterwards.
fn lock_state(state: &Mutex<VfioDmaState>) -> std::sync::MutexGuard<'_, VfioDmaState> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// DMA memory mapped into a VFIO container's IOMMU domain.
pub struct VfioDma {
    container: Arc<VfioContainer>,
    state: Arc<Mutex<VfioDmaState>>,
    policy: PagePolicy,
}

impl fmt::Debug for VfioDma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioDma")
            .field("policy", &self.policy)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A region mapped into the IOMMU: unmapped from the IOMMU, then from the
/// process, on drop.
struct VfioMapping {
    container: Arc<VfioContainer>,
    state: Arc<Mutex<VfioDmaState>>,
    iova: u64,
    // Dropped (munmapped) after `drop` below has unmapped the IOVA.
    host: HostMemory,
}

impl fmt::Debug for VfioMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioMapping")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl DmaBacking for VfioMapping {}

impl Drop for VfioMapping {
    fn drop(&mut self) {
        match self.container.vfio_dma_unmap(self.iova, self.host.len) {
            Ok(()) => {
                let mut state = lock_state(&self.state);
                state.iova.free(self.iova, self.host.len as u64);
                state.mapped_bytes = state.mapped_bytes.saturating_sub(self.host.len as u64);
            }
            // The IOVA stays reserved: the device might still reach it.
            Err(error) => {
                tracing::error!(iova = self.iova, len = self.host.len, %error, "VFIO DMA unmap failed")
            }
        }
    }
}

impl VfioDma {
    /// DMA memory for `container`, with IOVAs from `iova`.
    pub fn new(container: Arc<VfioContainer>, iova: IovaAllocator, policy: PagePolicy) -> Self {
        Self {
            container,
            state: Arc::new(Mutex::new(VfioDmaState {
                iova,
                mapped_bytes: 0,
            })),
            policy,
        }
    }

    /// Bytes currently mapped for DMA.
    pub fn mapped_bytes(&self) -> u64 {
        lock_state(&self.state).mapped_bytes
    }

    /// Host memory of `page_size` pages, mapped into the IOMMU.
    fn map_pages(&self, len: usize, page_size: usize) -> Result<DmaRegion, DmaError> {
        self.map_host(HostMemory::map(len, page_size)?)
    }

    /// `host` mapped into the IOMMU.
    fn map_host(&self, host: HostMemory) -> Result<DmaRegion, DmaError> {
        let mut state = lock_state(&self.state);
        let iova = state
            .iova
            .allocate(host.len as u64, host.page_size as u64)
            .ok_or(DmaError::IovaExhausted {
                len: host.len,
                align: host.page_size,
            })?;
        // SAFETY: `host` is a fresh mapping only this process holds, owned by the VfioMapping
        // built below, which unmaps the IOVA before the memory goes; no Rust
        // reference to it exists and the driver touches it only through
        // volatile accesses or while the device has no descriptor on it.
        let mapped = unsafe { self.container.vfio_dma_map(iova, host.len, host.ptr.as_ptr()) };
        if let Err(source) = mapped {
            state.iova.free(iova, host.len as u64);
            let enomem = matches!(&source, VfioError::IommuDmaMap(e) if e.errno() == libc::ENOMEM);
            if enomem {
                let needed = state.mapped_bytes + host.len as u64;
                let needed_kib = needed.div_ceil(1024);
                return Err(DmaError::LockedMemoryLimit {
                    len: host.len,
                    needed,
                    needed_kib,
                    limit: memlock_limit().map_or_else(|| "unlimited".to_owned(), |l| format!("{l} bytes")),
                });
            }
            return Err(DmaError::IommuMap {
                iova,
                len: host.len,
                source,
            });
        }
        state.mapped_bytes += host.len as u64;
        drop(state);
        let (ptr, page_size, full_len) = (host.ptr, host.page_size, host.len);
        let backing = VfioMapping {
            container: Arc::clone(&self.container),
            state: Arc::clone(&self.state),
            iova,
            host,
        };
        tracing::debug!(iova, len = full_len, page_size, "DMA region mapped");
        // SAFETY: the mapping is page aligned (>= 64), valid for reads and
        // writes, zeroed (fresh anonymous memory, or a new hugetlbfs file's
        // pages, which the kernel zeroes at fault), owned by `backing`, and the
        // IOMMU maps `iova` to it for the device.
        Ok(unsafe { DmaRegion::from_raw_parts(ptr, full_len, iova, page_size, Box::new(backing)) })
    }
}

impl DmaAllocator for VfioDma {
    fn allocate(&self, len: usize) -> Result<DmaRegion, DmaError> {
        if len == 0 {
            return Err(DmaError::Empty);
        }
        match &self.policy {
            PagePolicy::HugetlbfsDir(dir) => self.map_host(HostMemory::map_hugetlbfs(dir, len)?),
            PagePolicy::Hugepages => self.map_pages(len, PAGE_2M),
            PagePolicy::SmallPages => self.map_pages(len, PAGE_4K),
            // Hugepages can fail at either step: mmap, when none are free
            // (or a hugetlb cgroup's reservation limit says no), or the
            // IOMMU mapping, when the pages could not be faulted in (a
            // hugetlb cgroup's `hugetlb.2MB.max` is enforced at fault time,
            // which MAP_POPULATE does not report; VFIO's pinning then fails,
            // as under a kubelet that gives a pod no hugepages).
            PagePolicy::Auto => self.map_pages(len, PAGE_2M).or_else(|error| {
                tracing::info!(len, error = %crate::error_chain(&error), "2 MiB hugepages cannot back DMA memory; using 4 KiB pages");
                self.map_pages(len, PAGE_4K)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_poisoned_iova_lock_still_allocates_and_frees() {
        let state = Arc::new(Mutex::new(VfioDmaState {
            iova: IovaAllocator::with_default_window(),
            mapped_bytes: 0,
        }));
        let holder = Arc::clone(&state);
        let panicked = std::thread::spawn(move || {
            let _guard = holder.lock().unwrap();
            panic!("a thread dies holding the IOVA lock");
        })
        .join();
        assert!(panicked.is_err() && state.is_poisoned());
        let iova = lock_state(&state).iova.allocate(4096, 4096);
        assert_eq!(iova, Some(IovaAllocator::FLOOR), "poison is not exhaustion");
        lock_state(&state).iova.free(IovaAllocator::FLOOR, 4096);
        assert_eq!(
            lock_state(&state).iova.allocate(4096, 4096),
            Some(IovaAllocator::FLOOR)
        );
    }

    #[test]
    fn numa_nodes_are_read_from_the_mappings_own_line() {
        let maps = "\
55d0c0a00000 default file=/usr/bin/pktgen mapped=12 N0=12 kernelpagesize_kB=4
7f4c00000000 default file=/hugepages/vfplane-dma-7-0\\040(deleted) huge dirty=2 N1=2 kernelpagesize_kB=2048
7f4c00400000 default anon=3 dirty=3 N0=1 N1=2 kernelpagesize_kB=4
7f4c00800000 default anon=0 N0=0 kernelpagesize_kB=4
";
        assert_eq!(numa_nodes_of_mapping(maps, 0x7f4c_0000_0000), [1].into());
        assert_eq!(numa_nodes_of_mapping(maps, 0x7f4c_0040_0000), [0, 1].into());
        assert!(
            numa_nodes_of_mapping(maps, 0x7f4c_0080_0000).is_empty(),
            "no page present"
        );
        assert!(
            numa_nodes_of_mapping(maps, 0x7f4c_0000_1000).is_empty(),
            "not a mapping's start"
        );
    }

    #[test]
    fn a_directory_that_is_not_hugetlbfs_is_named() {
        let dir = std::env::temp_dir();
        match hugetlbfs_page_size(&dir) {
            Err(DmaError::NotHugetlbfs { dir: named }) => assert_eq!(named, dir),
            other => panic!("{other:?}"),
        }
        let missing = dir.join("vfplane-no-such-dir");
        let error = hugetlbfs_page_size(&missing).unwrap_err();
        assert!(
            matches!(&error, DmaError::Hugetlbfs { dir, source } if *dir == missing
                && source.kind() == std::io::ErrorKind::NotFound),
            "{error:?}"
        );
    }

    #[test]
    fn iova_ranges_are_clipped_and_merged() {
        let a = IovaAllocator::new(
            &[(0, 0xfedf_ffff), (0xfef0_0000, u64::MAX), (0x1000, 0x2000)],
            1 << 39,
        );
        assert_eq!(a.free_ranges(), &[(1 << 20, 0xfee0_0000), (0xfef0_0000, 1 << 39)]);
    }

    #[test]
    fn iova_allocation_respects_alignment_and_reuses() {
        let mut a = IovaAllocator::with_default_window();
        let x = a.allocate(4096, 4096).unwrap();
        let y = a.allocate(PAGE_2M as u64, PAGE_2M as u64).unwrap();
        assert_eq!(x, IovaAllocator::FLOOR);
        assert_eq!(y % PAGE_2M as u64, 0);
        assert!(y >= x + 4096);
        a.free(x, 4096);
        a.free(y, PAGE_2M as u64);
        assert_eq!(
            a.free_ranges(),
            IovaAllocator::with_default_window().free_ranges()
        );
    }

    #[test]
    fn iova_exhaustion_is_none() {
        let mut a = IovaAllocator::new(&[(0x10_0000, 0x10_ffff)], 1 << 39);
        assert!(a.allocate(0x1_0000, 4096).is_some());
        assert!(a.allocate(4096, 4096).is_none());
        assert!(a.allocate(0, 4096).is_none());
    }

    proptest! {
        #[test]
        fn iova_allocations_never_overlap_and_free_restores(
            sizes in proptest::collection::vec((1u64..64, 0u32..3), 1..40)
        ) {
            let mut a = IovaAllocator::new(&[(0, (1 << 26) - 1)], 1 << 39);
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for (pages, align_pow) in sizes {
                let len = pages * 4096;
                let align = 4096u64 << (align_pow * 4);
                if let Some(start) = a.allocate(len, align) {
                    prop_assert_eq!(start % align, 0);
                    prop_assert!(start >= IovaAllocator::FLOOR && start + len <= 1 << 26);
                    for &(s, l) in &taken {
                        prop_assert!(start + len <= s || s + l <= start);
                    }
                    taken.push((start, len));
                }
            }
            for (s, l) in taken.into_iter().rev() {
                a.free(s, l);
            }
            prop_assert_eq!(a.free_ranges(), &[(IovaAllocator::FLOOR, 1u64 << 26)]);
        }
    }
}
