//! The Intel 82576 Virtual Function driver: VF reset and the PF mailbox,
//! one RX and one TX queue on advanced descriptors, zero-copy bursts with
//! batched TX reclaim. Behaviour after DPDK's `igbvf` and Linux `igbvf`;
//! layout after ixy.rs.
//!
//! Generic over [`RegisterSpace`]: the same code drives a VF's mmapped BAR0
//! through VFIO and the in-memory `model` (feature `model`).

use std::marker::PhantomData;
use std::rc::Rc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::dma::{DmaAllocator, DmaError, DmaRegion};
use crate::mailbox::{Mailbox, MailboxError, MailboxTiming};
use crate::mempool::{Mempool, MempoolError, PacketBuf, PostedBuffers};
use crate::nic::{LinkStatus, MacAddress, NicDevice, Stats};
use crate::poll::{InterruptLine, PollError, RxInterrupts};
use crate::regs::{self, RegisterSpace, desc, mbx};

/// Descriptors reclaimed per DD check on the TX ring.
pub const TX_CLEAN_BATCH: usize = 32;
// `tx_burst` writes cmd_type_len and olinfo_status with one 64-bit store.
const _: () = assert!(desc::TX_STATUS_OFFSET == desc::TX_CMD_OFFSET + 4 && desc::TX_CMD_OFFSET == 8);
/// Largest frame without asking the PF for large packets.
pub const STANDARD_MAX_FRAME: u32 = 1518;
/// Most multicast addresses the PF takes.
pub const MAX_MULTICAST: usize = 30;

/// Makes the descriptor writes before it visible to the device before the
/// register write (RDT/TDT doorbell) after it: the device must never see a
/// tail that covers descriptors it cannot read yet. Linux's `dma_wmb()`,
/// DPDK's `rte_io_wmb()`.
///
/// x86: stores are not reordered with other stores, and that includes the
/// uncached store to the BAR after the write-back stores to DMA memory
/// (Intel SDM vol. 3A, 9.2.2 "Memory Ordering in P6 and More Recent
/// Processor Families"; the device snoops the cache, and the ring memory is
/// ordinary write-back memory, never write-combining, and written with no
/// non-temporal stores). So only the compiler must be kept from moving the
/// stores; descriptor writes and register writes are volatile, which it
/// does not reorder among themselves, and the compiler fence also holds any
/// plain store in place. An `mfence` (a `SeqCst` fence) here cost one per
/// burst and bought nothing.
///
/// aarch64: a CPU barrier over the outer-shareable domain, stores only
/// (`dmb oshst`, what Linux's `dma_wmb()` is there); Rust's fences are
/// inner-shareable only. Elsewhere: a `SeqCst` fence, conservatively.
#[inline(always)]
fn descriptors_before_doorbell() {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    #[cfg(target_arch = "aarch64")]
    // SAFETY: a barrier instruction: it changes no register, no memory, no
    // flag and not the stack. Not `nomem`, so the compiler also keeps
    // memory accesses on their side of it.
    unsafe {
        std::arch::asm!("dmb oshst", options(nostack, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Keeps the reads of a descriptor's write-back after the read of its DD
/// bit that said the device was done with it. Linux's `dma_rmb()`.
///
/// x86: loads are not reordered with other loads (SDM vol. 3A, 9.2.2), and
/// the descriptor reads are volatile: a compiler fence. aarch64: `dmb
/// oshld`. Elsewhere: an `Acquire` fence, as before.
#[inline(always)]
fn write_back_after_dd() {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::Acquire);
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as in `descriptors_before_doorbell`.
    unsafe {
        std::arch::asm!("dmb oshld", options(nostack, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
}

/// Errors of the igbvf driver.
#[derive(Debug, Error)]
pub enum IgbVfError {
    /// A bad configuration value.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The PF did not finish the VF's reset.
    #[error("the PF did not finish resetting the VF within {0:?} (RSTI/RSTD stayed set)")]
    ResetTimeout(Duration),
    /// A mailbox exchange failed.
    #[error("PF mailbox: {context}")]
    Mailbox {
        /// What was being asked.
        context: &'static str,
        /// The mailbox error.
        #[source]
        source: MailboxError,
    },
    /// The PF answered RESET with neither ACK nor NACK.
    #[error("the PF answered RESET with {0:#x}")]
    BadResetReply(u32),
    /// The PF refused a request.
    #[error("the PF refused {what} (reply {reply:#x})")]
    Refused {
        /// The request.
        what: String,
        /// Reply word 0.
        reply: u32,
    },
    /// A queue did not report enabled.
    #[error("the {0} queue did not enable within 100 ms")]
    QueueEnable(&'static str),
    /// Ring memory could not be had.
    #[error("cannot allocate the {ring} ring")]
    RingMemory {
        /// Which ring.
        ring: &'static str,
        /// The DMA error.
        #[source]
        source: DmaError,
    },
    /// The mempool could not be made.
    #[error("cannot create the mempool")]
    Mempool(#[from] MempoolError),
    /// The link did not come up.
    #[error("link still down after {0:?}")]
    LinkDown(Duration),
}

/// Configuration of an igbvf device.
#[derive(Debug, Clone)]
pub struct IgbVfConfig {
    /// RX descriptors (power of two, 8..=4096).
    pub rx_ring_size: usize,
    /// TX descriptors (power of two, 8..=4096).
    pub tx_ring_size: usize,
    /// Buffers in the mempool (more than `rx_ring_size`).
    pub pool_entries: usize,
    /// Bytes per buffer (power of two, 1024..=16384).
    pub buffer_size: usize,
    /// Largest frame; above 1518 the PF is asked for large packets (SET_LPE).
    pub max_frame: u32,
    /// MAC to use; `None`: the PF's, or a random local one when the PF has none.
    pub mac: Option<MacAddress>,
    /// Multicast addresses to receive (SET_MULTICAST), at most 30.
    pub multicast: Vec<MacAddress>,
    /// Mailbox timing.
    pub mailbox: MailboxTiming,
    /// Longest wait for the PF to finish a VF reset.
    pub reset_timeout: Duration,
    /// Pause between the RESET message and reading its reply (Linux: 10 ms).
    pub reset_settle: Duration,
    /// Bring-up attempts (VF reset and mailbox exchange) before a mailbox
    /// timeout is returned.
    pub reset_attempts: u32,
}

impl Default for IgbVfConfig {
    fn default() -> Self {
        Self {
            rx_ring_size: 512,
            tx_ring_size: 512,
            pool_entries: 4096,
            buffer_size: 2048,
            max_frame: STANDARD_MAX_FRAME,
            mac: None,
            multicast: Vec::new(),
            mailbox: MailboxTiming::default(),
            reset_timeout: Duration::from_millis(100),
            reset_settle: Duration::from_millis(10),
            reset_attempts: 3,
        }
    }
}

impl IgbVfConfig {
    fn validate(&self) -> Result<(), IgbVfError> {
        for (name, size) in [
            ("rx_ring_size", self.rx_ring_size),
            ("tx_ring_size", self.tx_ring_size),
        ] {
            if !size.is_power_of_two() || !(8..=4096).contains(&size) {
                return Err(IgbVfError::Config(format!(
                    "{name} {size} must be a power of two from 8 to 4096"
                )));
            }
        }
        if self.pool_entries <= self.rx_ring_size {
            return Err(IgbVfError::Config(format!(
                "pool_entries {} must exceed rx_ring_size {}",
                self.pool_entries, self.rx_ring_size
            )));
        }
        if self.multicast.len() > MAX_MULTICAST {
            return Err(IgbVfError::Config(format!(
                "at most {MAX_MULTICAST} multicast addresses, not {}",
                self.multicast.len()
            )));
        }
        if !(64..=9728).contains(&self.max_frame) {
            return Err(IgbVfError::Config(format!(
                "max_frame {} must be 64..=9728",
                self.max_frame
            )));
        }
        Ok(())
    }
}

/// Where the VF's MAC came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacSource {
    /// Assigned by the PF (RESET was ACKed with it).
    Pf,
    /// From the configuration, accepted by the PF.
    Configured,
    /// The PF had none (RESET NACK): a random locally administered one,
    /// accepted by the PF.
    Random,
}

/// The page size (bytes) behind each of a device's DMA regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaPageSizes {
    /// The packet buffers.
    pub mempool: usize,
    /// The RX descriptor ring.
    pub rx_ring: usize,
    /// The TX descriptor ring.
    pub tx_ring: usize,
}

impl DmaPageSizes {
    /// The one page size of every region, or `None` when they differ (the
    /// hugepages ran out part way through under `PagePolicy::Auto`).
    pub fn uniform(self) -> Option<usize> {
        (self.mempool == self.rx_ring && self.rx_ring == self.tx_ring).then_some(self.mempool)
    }
}

/// A descriptor ring in DMA memory.
#[derive(Debug)]
struct Ring {
    mem: DmaRegion,
    count: usize,
}

impl Ring {
    fn new(dma: &dyn DmaAllocator, count: usize, ring: &'static str) -> Result<Self, IgbVfError> {
        let mem = dma
            .allocate(count * desc::SIZE)
            .map_err(|source| IgbVfError::RingMemory { ring, source })?;
        Ok(Self { mem, count })
    }

    fn mask(&self) -> usize {
        self.count - 1
    }

    /// The ring's descriptors, for as long as the ring is borrowed.
    fn descriptors(&self) -> Descriptors<'_> {
        Descriptors {
            base: self.mem.as_ptr(),
            mask: self.mask(),
            _ring: PhantomData,
        }
    }

    fn read_u32(&self, index: usize, offset: usize) -> u32 {
        self.descriptors().read_u32(index, offset)
    }

    fn write_u32(&self, index: usize, offset: usize, value: u32) {
        self.descriptors().write_u32(index, offset, value);
    }

    fn write_u64(&self, index: usize, offset: usize, value: u64) {
        self.descriptors().write_u64(index, offset, value);
    }
}

/// A ring's descriptor memory: its base address and index mask, copied out
/// of the [`Ring`] so the burst loops hold them in registers rather than
/// reload them from the queue around every volatile access. Borrows the
/// ring, so the memory outlives it.
#[derive(Clone, Copy)]
struct Descriptors<'ring> {
    /// Start of the ring's region, `(mask + 1) * desc::SIZE` bytes, 64-aligned.
    base: *mut u8,
    /// Descriptors in the ring minus one (the count is a power of two).
    mask: usize,
    _ring: PhantomData<&'ring Ring>,
}

impl Descriptors<'_> {
    #[inline(always)]
    fn ptr(self, index: usize, offset: usize) -> *mut u8 {
        debug_assert!(offset < desc::SIZE);
        let at = (index & self.mask) * desc::SIZE + (offset & (desc::SIZE - 1));
        // SAFETY: index is masked below the descriptor count, offset below
        // 16, and the ring's region (borrowed for this view's lifetime)
        // holds count * 16 bytes.
        unsafe { self.base.add(at) }
    }

    #[inline(always)]
    fn read_u32(self, index: usize, offset: usize) -> u32 {
        debug_assert!(offset.is_multiple_of(4));
        // SAFETY: `ptr` stays inside the ring; the ring is 64-aligned and
        // the offsets used are multiples of 4, so the address is 4-aligned;
        // volatile because the device writes it.
        unsafe { self.ptr(index, offset).cast::<u32>().read_volatile() }
    }

    #[inline(always)]
    fn write_u32(self, index: usize, offset: usize, value: u32) {
        debug_assert!(offset.is_multiple_of(4));
        // SAFETY: as in `read_u32`.
        unsafe {
            self.ptr(index, offset)
                .cast::<u32>()
                .write_volatile(value.to_le())
        }
    }

    #[inline(always)]
    fn write_u64(self, index: usize, offset: usize, value: u64) {
        debug_assert!(offset.is_multiple_of(8));
        // SAFETY: as in `read_u32`; the offsets used are 0 and 8, and
        // descriptors are 16 bytes, so the address is 8-aligned.
        unsafe {
            self.ptr(index, offset)
                .cast::<u64>()
                .write_volatile(value.to_le())
        }
    }
}

/// The receive queue.
#[derive(Debug)]
struct RxQueue {
    ring: Ring,
    /// The buffer each descriptor points at (a received buffer is
    /// exchanged for a fresh one).
    bufs: PostedBuffers,
    /// Next descriptor to look at.
    next: usize,
    /// Inside a frame that spans several descriptors (dropped to its EOP).
    discarding: bool,
}

/// The transmit queue.
#[derive(Debug)]
struct TxQueue {
    ring: Ring,
    bufs: Vec<Option<PacketBuf>>,
    /// Oldest descriptor not yet reclaimed.
    clean: usize,
    /// Next descriptor to fill.
    tail: usize,
    /// Descriptors given to the device and not reclaimed.
    in_flight: usize,
}

/// An 82576 VF with one RX and one TX queue.
///
/// Owns its register space (for a real VF, the VFIO device) and releases
/// it last, after the device was reset and the rings and buffers freed.
#[derive(Debug)]
pub struct IgbVf<R: RegisterSpace> {
    mbx: Mailbox,
    mac: MacAddress,
    mac_source: MacSource,
    stats: Stats,
    rx: RxQueue,
    tx: TxQueue,
    pool: Rc<Mempool>,
    max_frame: u32,
    irq_enabled: bool,
    // Last: the registers (and VFIO device) outlive the DMA memory above.
    regs: R,
}

impl<R: RegisterSpace> IgbVf<R> {
    /// Resets the VF, talks to the PF (RESET, SET_MAC_ADDR when needed,
    /// SET_LPE, SET_MULTICAST) and starts both queues. Does not wait for
    /// link: see [`Self::wait_for_link`].
    ///
    /// # Errors
    /// Configuration, reset, mailbox, DMA memory or queue start failures.
    pub fn new(regs: R, dma: &dyn DmaAllocator, config: &IgbVfConfig) -> Result<Self, IgbVfError> {
        config.validate()?;
        let mut mbx = Mailbox::new(config.mailbox);
        let mut attempt = 1;
        let (mac, mac_source) = loop {
            match negotiate(&regs, &mut mbx, config) {
                Ok(done) => break done,
                // A PF busy with its own start-up can miss a message: start
                // over from the VF reset, a bounded number of times.
                Err(error @ (IgbVfError::Mailbox { .. } | IgbVfError::ResetTimeout(_)))
                    if attempt < config.reset_attempts =>
                {
                    tracing::warn!(%error, attempt, "VF bring-up failed; resetting again");
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        };

        let pool = Mempool::new(dma, config.pool_entries, config.buffer_size)?;
        let rx = RxQueue {
            ring: Ring::new(dma, config.rx_ring_size, "RX")?,
            bufs: PostedBuffers::take(&pool, config.rx_ring_size)
                .ok_or_else(|| IgbVfError::Config("the mempool cannot fill the RX ring".to_owned()))?,
            next: 0,
            discarding: false,
        };
        let tx = TxQueue {
            ring: Ring::new(dma, config.tx_ring_size, "TX")?,
            bufs: (0..config.tx_ring_size).map(|_| None).collect(),
            clean: 0,
            tail: 0,
            in_flight: 0,
        };
        let mut dev = Self {
            mbx,
            mac,
            mac_source,
            stats: Stats::default(),
            rx,
            tx,
            pool,
            max_frame: config.max_frame,
            irq_enabled: false,
            regs,
        };
        dev.start_rx()?;
        dev.start_tx()?;
        tracing::info!(mac = %dev.mac, source = ?dev.mac_source, "igbvf started");
        Ok(dev)
    }

    fn start_rx(&mut self) -> Result<(), IgbVfError> {
        let r = &self.regs;
        r.write32(regs::rxdctl(0), 0);
        let ring = &self.rx.ring;
        let iova = ring.mem.iova();
        r.write32(regs::rdbal(0), iova as u32);
        r.write32(regs::rdbah(0), (iova >> 32) as u32);
        r.write32(regs::rdlen(0), (ring.count * desc::SIZE) as u32);
        let bsize = (self.pool.entry_size() / 1024) as u32 & regs::SRRCTL_BSIZEPKT_MASK;
        r.write32(
            regs::srrctl(0),
            regs::SRRCTL_DROP_EN | regs::SRRCTL_DESCTYPE_ADV_ONEBUF | bsize,
        );
        for i in 0..ring.count {
            let iova = self.rx.bufs.iova(i).ok_or_else(|| {
                IgbVfError::Config("the RX ring has more descriptors than buffers".to_owned())
            })?;
            ring.write_u64(i, 0, iova);
            ring.write_u64(i, 8, 0);
        }
        descriptors_before_doorbell();
        r.write32(regs::rxdctl(0), regs::QUEUE_ENABLE);
        wait_enabled(r, regs::rxdctl(0), "RX")?;
        r.write32(regs::rdh(0), 0);
        r.write32(regs::rdt(0), (ring.count - 1) as u32);
        Ok(())
    }

    fn start_tx(&mut self) -> Result<(), IgbVfError> {
        let r = &self.regs;
        r.write32(regs::txdctl(0), 0);
        let ring = &self.tx.ring;
        let iova = ring.mem.iova();
        r.write32(regs::tdlen(0), (ring.count * desc::SIZE) as u32);
        r.write32(regs::tdbal(0), iova as u32);
        r.write32(regs::tdbah(0), (iova >> 32) as u32);
        r.write32(regs::tdh(0), 0);
        r.write32(regs::tdt(0), 0);
        r.write32(regs::txdctl(0), regs::QUEUE_ENABLE | regs::TXDCTL_WTHRESH_1);
        wait_enabled(r, regs::txdctl(0), "TX")
    }

    /// Waits (bounded) for STATUS.LU; returns the link state.
    ///
    /// # Errors
    /// [`IgbVfError::LinkDown`] when the link is still down at the deadline.
    pub fn wait_for_link(&mut self, timeout: Duration) -> Result<LinkStatus, IgbVfError> {
        let deadline = Instant::now() + timeout;
        loop {
            let link = self.link();
            if link.up {
                return Ok(link);
            }
            self.service_mailbox();
            if Instant::now() >= deadline {
                return Err(IgbVfError::LinkDown(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Acknowledges any waiting PF message (pings); returns how many were read.
    pub fn service_mailbox(&mut self) -> usize {
        let mut words = [0u32; regs::VMBMEM_WORDS];
        let mut n = 0;
        while let Ok(Some(word)) = self.mbx.try_read(&self.regs, &mut words) {
            tracing::debug!(word, "PF message");
            n += 1;
            if n > 16 {
                break;
            }
        }
        n
    }

    /// PF control messages (pings) seen.
    pub fn pf_pings(&self) -> u64 {
        self.mbx.pings()
    }

    /// Where the MAC came from.
    pub fn mac_source(&self) -> MacSource {
        self.mac_source
    }

    /// The largest frame configured.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Sets the multicast addresses the VF receives (at most 30).
    ///
    /// # Errors
    /// Too many addresses, or the PF refused or did not answer.
    pub fn set_multicast(&mut self, addrs: &[MacAddress]) -> Result<(), IgbVfError> {
        if addrs.len() > MAX_MULTICAST {
            return Err(IgbVfError::Config(format!(
                "at most {MAX_MULTICAST} multicast addresses"
            )));
        }
        set_multicast(&self.regs, &mut self.mbx, addrs)
    }

    /// The device's hardware counters (VFGPRC, VFGPTC, VFGORC, VFGOTC):
    /// (rx packets, tx packets, rx octets, tx octets), 32-bit wrapping.
    pub fn hw_counters(&self) -> (u32, u32, u32, u32) {
        (
            self.regs.read32(regs::VFGPRC),
            self.regs.read32(regs::VFGPTC),
            self.regs.read32(regs::VFGORC),
            self.regs.read32(regs::VFGOTC),
        )
    }

    /// The page sizes behind the device's DMA memory, as mapped (with
    /// [`crate::dma::PagePolicy::Auto`] this says whether hugepages were
    /// had).
    pub fn dma_page_sizes(&self) -> DmaPageSizes {
        DmaPageSizes {
            mempool: self.pool.page_size(),
            rx_ring: self.rx.ring.mem.page_size(),
            tx_ring: self.tx.ring.mem.page_size(),
        }
    }

    /// The NUMA nodes the device's DMA memory is on (packet buffers and
    /// both rings), as the kernel reports them; see
    /// [`crate::dma::DmaRegion::numa_nodes`].
    ///
    /// # Errors
    /// The kernel's per-mapping NUMA report cannot be read.
    pub fn dma_numa_nodes(&self) -> std::io::Result<std::collections::BTreeSet<u32>> {
        let mut nodes = self.pool.numa_nodes()?;
        nodes.extend(self.rx.ring.mem.numa_nodes()?);
        nodes.extend(self.tx.ring.mem.numa_nodes()?);
        Ok(nodes)
    }

    /// The register space.
    pub fn registers(&self) -> &R {
        &self.regs
    }

    /// TX descriptors given to the device and not yet reclaimed.
    pub fn tx_in_flight(&self) -> usize {
        self.tx.in_flight
    }

    /// Reclaims every transmitted descriptor (one DD check each); returns
    /// how many buffers went back to the pool.
    pub fn tx_reclaim_all(&mut self) -> usize {
        let tx = &mut self.tx;
        let mut n = 0;
        while tx.in_flight > 0 && tx.ring.read_u32(tx.clean, desc::TX_STATUS_OFFSET) & desc::TX_DD != 0 {
            tx.bufs[tx.clean] = None;
            tx.clean = (tx.clean + 1) & tx.ring.mask();
            tx.in_flight -= 1;
            n += 1;
        }
        n
    }

    /// Batched reclaim: frees `TX_CLEAN_BATCH` descriptors per DD check of
    /// the batch's last descriptor (the device completes in order).
    fn tx_reclaim(&mut self) {
        let tx = &mut self.tx;
        let ring = tx.ring.descriptors();
        let mask = ring.mask;
        // Exactly one slot per descriptor.
        let Some(slots) = tx.bufs.get_mut(..=mask) else {
            return;
        };
        let mut clean = tx.clean;
        let mut in_flight = tx.in_flight;
        while in_flight > 0 {
            let batch = in_flight.min(TX_CLEAN_BATCH);
            let last = (clean + batch - 1) & mask;
            if ring.read_u32(last, desc::TX_STATUS_OFFSET) & desc::TX_DD == 0 {
                break;
            }
            // The batch's slots: up to the ring's end, then from its start;
            // their buffers go back to their pools.
            // (Dropped where they lie: no copy of each onto the stack.)
            let end = clean + batch;
            let (to_end, from_start) = if end <= slots.len() {
                (clean..end, 0..0)
            } else {
                (clean..slots.len(), 0..end - slots.len())
            };
            for slot in slots.get_mut(to_end).unwrap_or_default() {
                *slot = None;
            }
            for slot in slots.get_mut(from_start).unwrap_or_default() {
                *slot = None;
            }
            clean = end & mask;
            in_flight -= batch;
        }
        tx.clean = clean;
        tx.in_flight = in_flight;
    }

    /// Points the next RX descriptor the device will fill at `iova` instead
    /// of its buffer (`None` puts the buffer back). Only for proving IOMMU
    /// isolation on the testbed: the device is told to write memory this
    /// process never mapped for it.
    ///
    /// # Safety
    /// The device writes the next frame it receives at `iova`. If `iova` is
    /// inside this device's DMA mappings, that is memory the driver owns: a
    /// buffer lent out as a [`PacketBuf`] slice, another buffer or a
    /// descriptor ring, written behind every reference to it. The caller
    /// must pass an IOVA that no DMA mapping of this device covers (which
    /// is what an isolation test is about), or `None`.
    ///
    /// ```compile_fail,E0133
    /// // Not callable from safe code.
    /// fn aim<R: vfplane_driver::regs::RegisterSpace>(dev: &mut vfplane_driver::IgbVf<R>, iova: u64) {
    ///     dev.rx_point_next_descriptor_for_isolation_test(Some(iova));
    /// }
    /// ```
    #[doc(hidden)]
    pub unsafe fn rx_point_next_descriptor_for_isolation_test(&mut self, iova: Option<u64>) {
        let rx = &self.rx;
        let i = rx.next;
        let target = iova.or_else(|| rx.bufs.iova(i));
        if let Some(target) = target {
            rx.ring.write_u64(i, 0, target);
            rx.ring.write_u64(i, 8, 0);
            descriptors_before_doorbell();
        }
    }

    /// Sends a descriptor of `len` bytes at `iova` that no buffer backs.
    /// Only for proving IOMMU isolation on the testbed: the device is told
    /// to read memory this process never mapped for it. Returns whether the
    /// ring had room; the descriptor is reclaimed like any other.
    ///
    /// # Safety
    /// The device reads `len` bytes at `iova` while the call returns. If
    /// `iova` is inside this device's DMA mappings, it reads memory the
    /// driver may be lending out as a writable [`PacketBuf`] slice at that
    /// moment (a read racing a write). The caller must pass an IOVA that no
    /// DMA mapping of this device covers.
    ///
    /// ```compile_fail,E0133
    /// // Not callable from safe code.
    /// fn aim<R: vfplane_driver::regs::RegisterSpace>(dev: &mut vfplane_driver::IgbVf<R>, iova: u64) {
    ///     dev.tx_raw_descriptor_for_isolation_test(iova, 64);
    /// }
    /// ```
    #[doc(hidden)]
    pub unsafe fn tx_raw_descriptor_for_isolation_test(&mut self, iova: u64, len: u16) -> bool {
        self.tx_reclaim();
        let tx = &mut self.tx;
        if tx.in_flight + 1 >= tx.ring.count {
            return false;
        }
        let i = tx.tail;
        let cmd =
            u32::from(len) | desc::TX_DTYP_DATA | desc::TX_DEXT | desc::TX_IFCS | desc::TX_EOP | desc::TX_RS;
        tx.ring.write_u64(i, 0, iova);
        tx.ring.write_u32(i, desc::TX_CMD_OFFSET, cmd);
        tx.ring
            .write_u32(i, desc::TX_STATUS_OFFSET, u32::from(len) << desc::TX_PAYLEN_SHIFT);
        tx.bufs[i] = None;
        tx.tail = (i + 1) & tx.ring.mask();
        tx.in_flight += 1;
        descriptors_before_doorbell();
        self.regs.write32(regs::tdt(0), tx.tail as u32);
        true
    }
}

impl<R: RegisterSpace> NicDevice for IgbVf<R> {
    fn driver_name(&self) -> &'static str {
        "igbvf"
    }

    fn rx_burst(&mut self, out: &mut Vec<PacketBuf>, max: usize) -> usize {
        let rx = &mut self.rx;
        let stats = &mut self.stats;
        let ring = rx.ring.descriptors();
        let mask = ring.mask;
        // The queue's state in locals for the loop, stored back after it.
        let start = rx.next;
        let mut next = start;
        // What a descriptor's DD, EOP and error bits read for a whole good
        // frame in one buffer (one test for the common case), or, while a
        // frame that spans buffers is dropped to its end, a value they never
        // read.
        const WHOLE_FRAME: u32 = desc::RX_DD | desc::RX_EOP;
        const NOTHING: u32 = u32::MAX;
        let mut accept = if rx.discarding { NOTHING } else { WHOLE_FRAME };
        // Frames go straight into `out`'s spare capacity: never past it, so
        // `out` never reallocates, and no capacity check per frame.
        let spare = out.spare_capacity_mut();
        let max = max.min(spare.len());
        let mut received = 0;
        // Counted here and added to `stats` once per burst.
        let mut bytes = 0u64;
        while received < max {
            let status = u32::from_le(ring.read_u32(next, desc::RX_STATUS_OFFSET));
            let iova = if status & (desc::RX_DD | desc::RX_EOP | desc::RX_ERR_MASK) == accept {
                // Read the rest of the write-back only after DD.
                write_back_after_dd();
                let len = (u32::from_le(ring.read_u32(next, desc::RX_LENGTH_OFFSET)) & 0xFFFF) as usize;
                let Some((buf, fresh)) = rx.bufs.exchange(next, len) else {
                    // Leave the frame on the ring until buffers come back.
                    stats.rx_no_buffer += 1;
                    break;
                };
                bytes += buf.len() as u64;
                spare[received].write(buf);
                received += 1;
                fresh
            } else {
                if status & desc::RX_DD == 0 {
                    break;
                }
                write_back_after_dd();
                if status & desc::RX_ERR_MASK != 0 {
                    stats.rx_errors += 1;
                }
                stats.rx_drops += 1;
                // Dropped (an error, or a frame spanning buffers, to its
                // last one): the buffer is posted again.
                let Some(same) = rx.bufs.iova(next) else {
                    break;
                };
                accept = if status & desc::RX_EOP == 0 {
                    NOTHING
                } else {
                    WHOLE_FRAME
                };
                same
            };
            ring.write_u64(next, 0, iova);
            ring.write_u64(next, 8, 0);
            next = (next + 1) & mask;
        }
        // SAFETY: the first `received` slots of the spare capacity were
        // initialised above (`MaybeUninit::write`), and `received <= max <=
        // spare.len()`, so the new length stays within the capacity.
        unsafe { out.set_len(out.len() + received) };
        rx.next = next;
        rx.discarding = accept != WHOLE_FRAME;
        stats.rx_packets += received as u64;
        stats.rx_bytes += bytes;
        // The device fills at most all descriptors but one before RDT moves
        // (RDT == RDH means empty), so a burst that consumed any did not come
        // back round to `start`.
        if next != start {
            descriptors_before_doorbell();
            // The device may fill up to, not including, RDT.
            let tail = (next + mask) & mask;
            self.regs.write32(regs::rdt(0), tail as u32);
        }
        received
    }

    fn tx_burst(&mut self, packets: &mut Vec<PacketBuf>) -> usize {
        self.tx_reclaim();
        let tx = &mut self.tx;
        let room = tx.ring.count - 1 - tx.in_flight;
        let n = packets.len().min(room);
        if n == 0 {
            return 0;
        }
        let ring = tx.ring.descriptors();
        let mask = ring.mask;
        // Exactly one slot per descriptor, so a masked index needs no check.
        let Some(slots) = tx.bufs.get_mut(..=mask) else {
            return 0;
        };
        // The queue's tail in a local for the loop, stored back after it.
        let start = tx.tail;
        let mut tail = start;
        // Counted here and added to `stats` once per burst.
        let mut bytes = 0u64;
        for buf in packets.drain(..n) {
            let len = buf.len();
            if len == 0 || len > desc::TX_LEN_MASK as usize {
                refuse(buf, &mut self.stats.tx_drops);
                continue;
            }
            let slot = &mut slots[tail & mask];
            let cmd_type_len =
                len as u32 | desc::TX_DTYP_DATA | desc::TX_DEXT | desc::TX_IFCS | desc::TX_EOP | desc::TX_RS;
            let olinfo_status = (len as u32) << desc::TX_PAYLEN_SHIFT;
            ring.write_u64(tail, 0, buf.iova());
            // cmd_type_len and olinfo_status in one store (offsets 8 and 12).
            ring.write_u64(
                tail,
                desc::TX_CMD_OFFSET,
                u64::from(cmd_type_len) | u64::from(olinfo_status) << 32,
            );
            bytes += len as u64;
            // The slot of a descriptor not in flight is empty (reclaim
            // empties them in ring order); were it not, its buffer could
            // still be read by the device and must not go back to the pool,
            // so it is forgotten rather than dropped.
            debug_assert!(slot.is_none(), "TX slot {tail} still holds a buffer");
            std::mem::forget(slot.replace(buf));
            tail = (tail + 1) & mask;
        }
        let queued = (tail + mask + 1 - start) & mask;
        tx.tail = tail;
        tx.in_flight += queued;
        self.stats.tx_packets += queued as u64;
        self.stats.tx_bytes += bytes;
        if queued > 0 {
            descriptors_before_doorbell();
            self.regs.write32(regs::tdt(0), tail as u32);
        }
        n
    }

    fn link(&self) -> LinkStatus {
        let status = self.regs.read32(regs::STATUS);
        let up = status & regs::STATUS_LU != 0;
        let speed_mbps = match (up, status & regs::STATUS_SPEED_MASK) {
            (false, _) => 0,
            (true, regs::STATUS_SPEED_1000) => 1000,
            (true, regs::STATUS_SPEED_100) => 100,
            (true, _) => 10,
        };
        LinkStatus { up, speed_mbps }
    }

    fn mac(&self) -> MacAddress {
        self.mac
    }

    fn stats(&self) -> Stats {
        self.stats
    }

    fn mempool(&self) -> &Rc<Mempool> {
        &self.pool
    }
}

impl<R: RegisterSpace + InterruptLine> RxInterrupts for IgbVf<R> {
    fn enable_rx_interrupt(&mut self) -> Result<(), PollError> {
        self.regs.enable()?;
        let r = &self.regs;
        // RX queue 0 -> vector 0; mailbox -> vector 2 (left masked).
        r.write32(regs::VTIVAR, regs::IVAR_VALID);
        r.write32(regs::VTIVAR_MISC, regs::IVAR_VALID | 2);
        // No throttling. The vector is unmasked only while the poller
        // sleeps and masked as soon as it wakes, so there is no storm to
        // moderate, and throttling would only delay the wake. It also
        // doubled every wake on QEMU's igb: when the throttle timer
        // expires, QEMU sends the vector's message again whether or not a
        // cause is pending or the vector is masked
        // (`igb_intrmgr_on_msix_throttling_timer`), one spurious wakeup
        // per frame for a queue that sleeps between frames.
        r.write32(regs::eitr(0), 0);
        // Auto-clear the cause when the message is sent.
        r.write32(regs::EIAC, 1);
        r.write32(regs::EIAM, 1);
        r.write32(regs::EIMC, regs::EIMS_ALL);
        self.irq_enabled = true;
        Ok(())
    }

    fn arm_rx_interrupt(&mut self) {
        if self.irq_enabled {
            // Frames received while the vector was masked left their cause
            // latched in EICR (write 1 to clear): unmasking with it set
            // sends the message at once, for frames already taken. An
            // interrupt that fired after the last wake left a count on the
            // eventfd. Neither may end the sleep that follows.
            self.regs.write32(regs::EICR, 1);
            self.regs.discard_pending();
            self.regs.write32(regs::EIMS, 1);
        }
    }

    fn disarm_rx_interrupt(&mut self) {
        if self.irq_enabled {
            self.regs.write32(regs::EIMC, 1);
        }
    }

    fn wait_rx_interrupt(&self, timeout: Duration) -> Result<bool, PollError> {
        if !self.irq_enabled {
            return Err(PollError::NotEnabled);
        }
        self.regs.wait(timeout)
    }
}

impl<R: RegisterSpace> Drop for IgbVf<R> {
    fn drop(&mut self) {
        // Stop all DMA before the rings and buffers are freed.
        self.regs.write32(regs::EIMC, regs::EIMS_ALL);
        self.regs.write32(regs::rxdctl(0), 0);
        self.regs.write32(regs::txdctl(0), 0);
        self.regs.write32(regs::CTRL, regs::CTRL_RST);
    }
}

/// A frame `tx_burst` cannot send (empty, or more than one descriptor
/// takes): its buffer goes back to its pool. Out of line, so the loop keeps
/// the frame in registers rather than on the stack for this rare path.
#[cold]
#[inline(never)]
fn refuse(buf: PacketBuf, drops: &mut u64) {
    *drops += 1;
    drop(buf);
}

/// Reset, RESET message, MAC, LPE, multicast: everything asked of the PF.
fn negotiate(
    regs: &impl RegisterSpace,
    mbx: &mut Mailbox,
    config: &IgbVfConfig,
) -> Result<(MacAddress, MacSource), IgbVfError> {
    let pf_mac = reset(regs, mbx, config)?;
    let (mac, mac_source) = match (config.mac, pf_mac) {
        (Some(wanted), Some(pf)) if wanted == pf => (pf, MacSource::Pf),
        (Some(wanted), _) => {
            set_mac(regs, mbx, wanted)?;
            (wanted, MacSource::Configured)
        }
        (None, Some(pf)) => (pf, MacSource::Pf),
        (None, None) => {
            let mac = random_local_mac();
            set_mac(regs, mbx, mac)?;
            (mac, MacSource::Random)
        }
    };
    if config.max_frame > STANDARD_MAX_FRAME {
        request(regs, mbx, &[mbx::SET_LPE, config.max_frame], "SET_LPE")?;
    }
    if !config.multicast.is_empty() {
        set_multicast(regs, mbx, &config.multicast)?;
    }
    Ok((mac, mac_source))
}

fn wait_enabled(r: &impl RegisterSpace, reg: u32, which: &'static str) -> Result<(), IgbVfError> {
    let deadline = Instant::now() + Duration::from_millis(100);
    while r.read32(reg) & regs::QUEUE_ENABLE == 0 {
        if Instant::now() >= deadline {
            return Err(IgbVfError::QueueEnable(which));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Ok(())
}

/// VF reset and RESET message; the PF's MAC if it assigned one.
fn reset(
    r: &impl RegisterSpace,
    mbx: &mut Mailbox,
    config: &IgbVfConfig,
) -> Result<Option<MacAddress>, IgbVfError> {
    r.write32(regs::EIMC, regs::EIMS_ALL);
    r.write32(regs::CTRL, r.read32(regs::CTRL) | regs::CTRL_RST);
    mbx.clear();
    let deadline = Instant::now() + config.reset_timeout;
    while mbx.check_bits(r, regs::VMMB_RSTD | regs::VMMB_RSTI) {
        if Instant::now() >= deadline {
            return Err(IgbVfError::ResetTimeout(config.reset_timeout));
        }
        std::thread::sleep(Duration::from_micros(5));
    }
    mbx.write_posted(r, &[mbx::RESET])
        .map_err(|source| IgbVfError::Mailbox {
            context: "RESET",
            source,
        })?;
    std::thread::sleep(config.reset_settle);
    let mut reply = [0u32; 3];
    let first = mbx
        .read_posted(r, mbx::RESET, &mut reply)
        .map_err(|source| IgbVfError::Mailbox {
            context: "RESET reply",
            source,
        })?;
    tracing::debug!(first, "RESET reply");
    match first & !mbx::CTS {
        w if w == mbx::RESET | mbx::ACK => {
            let mac = mac_from_words(reply[1], reply[2]);
            Ok((!mac.is_zero()).then_some(mac))
        }
        w if w == mbx::RESET | mbx::NACK => Ok(None),
        other => Err(IgbVfError::BadResetReply(other)),
    }
}

/// The MAC in a mailbox message's words 1 and 2, low byte first.
///
/// Not inlined on purpose, so the bytes are assembled from two register
/// values rather than from loads of the reply buffer. Inlined, LLVM's
/// AggressiveInstCombine in rustc 1.95.0 merged those loads into one 64-bit
/// load and "zero-extended" it to the 48-bit MAC, invalid IR that later
/// passes folded to 00:00:00:00:00:00 in release builds only
/// (llvm/llvm-project#207229). The model test `pf_assigned_mac_is_used`
/// found it; `cargo xtask test` runs the driver's tests under `--release`.
#[inline(never)]
fn mac_from_words(low: u32, high: u32) -> MacAddress {
    let [a, b, c, d] = low.to_le_bytes();
    let [e, f, _, _] = high.to_le_bytes();
    MacAddress([a, b, c, d, e, f])
}

fn request(
    r: &impl RegisterSpace,
    mbx: &mut Mailbox,
    msg: &[u32],
    what: &'static str,
) -> Result<(), IgbVfError> {
    let mut reply = [0u32; 1];
    let first = mbx
        .request(r, msg, &mut reply)
        .map_err(|source| IgbVfError::Mailbox {
            context: what,
            source,
        })?;
    if first & mbx::ACK == 0 || first & mbx::NACK != 0 {
        return Err(IgbVfError::Refused {
            what: what.to_owned(),
            reply: first,
        });
    }
    Ok(())
}

fn set_mac(r: &impl RegisterSpace, mbx: &mut Mailbox, mac: MacAddress) -> Result<(), IgbVfError> {
    let m = mac.0;
    let msg = [
        mbx::SET_MAC_ADDR,
        u32::from_le_bytes([m[0], m[1], m[2], m[3]]),
        u32::from_le_bytes([m[4], m[5], 0, 0]),
    ];
    request(r, mbx, &msg, "SET_MAC_ADDR").map_err(|e| match e {
        IgbVfError::Refused { reply, .. } => IgbVfError::Refused {
            what: format!("SET_MAC_ADDR {mac} (an administrator may have set the VF's MAC)"),
            reply,
        },
        other => other,
    })
}

/// The 12-bit multicast hash the PF's MTA uses (filter type 0).
pub fn multicast_hash(mac: MacAddress) -> u16 {
    ((u16::from(mac.0[4]) >> 4) | (u16::from(mac.0[5]) << 4)) & 0xFFF
}

fn set_multicast(r: &impl RegisterSpace, mbx: &mut Mailbox, addrs: &[MacAddress]) -> Result<(), IgbVfError> {
    let count = addrs.len().min(MAX_MULTICAST);
    let mut msg = [0u32; regs::VMBMEM_WORDS];
    msg[0] = mbx::SET_MULTICAST | ((count as u32) << mbx::MSGINFO_SHIFT);
    for (i, mac) in addrs.iter().take(count).enumerate() {
        let hash = u32::from(multicast_hash(*mac));
        msg[1 + i / 2] |= if i % 2 == 0 { hash } else { hash << 16 };
    }
    let words = 1 + count.div_ceil(2);
    request(r, mbx, &msg[..words], "SET_MULTICAST")
}

/// A random locally administered unicast MAC.
pub fn random_local_mac() -> MacAddress {
    let mut bytes = [0u8; 6];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got != bytes.len() as isize {
        // No entropy source: mix the clock and the pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mixed = (nanos ^ (u128::from(std::process::id()) << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        bytes.copy_from_slice(&mixed.to_le_bytes()[..6]);
    }
    bytes[0] = (bytes[0] & 0xFC) | 0x02;
    MacAddress(bytes)
}
