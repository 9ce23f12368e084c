//! A pool of fixed-size packet buffers in one DMA region, and the
//! [`PacketBuf`] that returns its buffer to the pool when dropped.
//!
//! Nothing here allocates after [`Mempool::new`]: the free list is a stack
//! of indices with a slot for every buffer, made up front.
//!
//! A pool and its buffers belong to one thread (the one that polls the
//! queue they feed), as in ixy: the free list needs no lock, and being
//! `Cell`s it needs no borrow flag either (`Mempool` is not `Sync`).
//! Allocation and release are inlined into the driver's burst loops.

use std::cell::Cell;
use std::fmt;
use std::rc::Rc;

use thiserror::Error;

use crate::dma::{DmaAllocator, DmaError, DmaRegion};

/// Errors of the mempool.
#[derive(Debug, Error)]
pub enum MempoolError {
    /// Entry size not a power of two between 1 KiB and 16 KiB.
    #[error("mempool entry size {0} must be a power of two from 1024 to 16384")]
    EntrySize(usize),
    /// Zero entries or too many.
    #[error("mempool entry count {0} must be from 1 to 2^24")]
    EntryCount(usize),
    /// The DMA region could not be had.
    #[error("cannot allocate the mempool's DMA memory")]
    Dma(#[from] DmaError),
}

/// Fixed-size packet buffers in one DMA region.
pub struct Mempool {
    region: DmaRegion,
    entry_size: usize,
    entries: usize,
    /// Free buffer indices: a stack, `free[..free_top]`, one slot per buffer.
    free: Box<[Cell<u32>]>,
    /// How many indices `free` holds.
    free_top: Cell<usize>,
}

impl fmt::Debug for Mempool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mempool")
            .field("entries", &self.entries)
            .field("entry_size", &self.entry_size)
            .field("free", &self.free_count())
            .field("region", &self.region)
            .finish()
    }
}

impl Mempool {
    /// A pool of `entries` buffers of `entry_size` bytes each.
    ///
    /// # Errors
    /// Bad sizes, or DMA memory that cannot be had.
    pub fn new(dma: &dyn DmaAllocator, entries: usize, entry_size: usize) -> Result<Rc<Self>, MempoolError> {
        if !entry_size.is_power_of_two() || !(1024..=16384).contains(&entry_size) {
            return Err(MempoolError::EntrySize(entry_size));
        }
        if entries == 0 || entries > 1 << 24 {
            return Err(MempoolError::EntryCount(entries));
        }
        let region = dma.allocate(entries * entry_size)?;
        // Pop order hands out low indices first.
        let free = (0..entries as u32).rev().map(Cell::new).collect();
        Ok(Rc::new(Self {
            region,
            entry_size,
            entries,
            free,
            free_top: Cell::new(entries),
        }))
    }

    /// Bytes per buffer.
    pub fn entry_size(&self) -> usize {
        self.entry_size
    }

    /// Buffers in the pool.
    pub fn capacity(&self) -> usize {
        self.entries
    }

    /// Size of the pages backing the pool's memory: [`crate::dma::PAGE_2M`]
    /// for hugepages, [`crate::dma::PAGE_4K`] otherwise.
    pub fn page_size(&self) -> usize {
        self.region.page_size()
    }

    /// The NUMA nodes of the buffers' memory
    /// ([`crate::dma::DmaRegion::numa_nodes`]).
    ///
    /// # Errors
    /// The kernel's per-mapping NUMA report cannot be read.
    pub fn numa_nodes(&self) -> std::io::Result<std::collections::BTreeSet<u32>> {
        self.region.numa_nodes()
    }

    /// Buffers currently free.
    pub fn free_count(&self) -> usize {
        self.free_top.get()
    }

    /// One free buffer with length 0, or `None` when the pool is empty.
    #[inline]
    pub fn alloc(self: &Rc<Self>) -> Option<PacketBuf> {
        let index = self.pop()?;
        Some(PacketBuf {
            pool: Rc::clone(self),
            index,
            len: 0,
        })
    }

    #[inline]
    fn pop(&self) -> Option<u32> {
        // An empty list wraps to usize::MAX, which `get` refuses too: one
        // check for both.
        let top = self.free_top.get().wrapping_sub(1);
        let index = self.free.get(top)?.get();
        self.free_top.set(top);
        Some(index)
    }

    /// Pushes up to `n` buffers of length `len` onto `out` (never beyond its
    /// spare capacity, so it never allocates); returns how many.
    pub fn alloc_batch(self: &Rc<Self>, out: &mut Vec<PacketBuf>, n: usize, len: usize) -> usize {
        let len = len.min(self.entry_size) as u32;
        let n = n.min(out.capacity() - out.len()).min(self.free_count());
        for _ in 0..n {
            if let Some(index) = self.pop() {
                out.push(PacketBuf {
                    pool: Rc::clone(self),
                    index,
                    len,
                });
            }
        }
        n
    }

    #[inline]
    fn release(&self, index: u32) {
        let top = self.free_top.get();
        // Every index is free at most once and `free` has a slot for each,
        // so there is always room.
        debug_assert!(top < self.free.len(), "more buffers released than the pool has");
        if let Some(slot) = self.free.get(top) {
            slot.set(index);
            self.free_top.set(top + 1);
        }
    }

    /// IOVA of buffer `index`.
    #[inline]
    fn iova_of(&self, index: u32) -> u64 {
        self.region.iova() + self.offset(index) as u64
    }

    #[inline]
    fn offset(&self, index: u32) -> usize {
        index as usize * self.entry_size
    }
}

/// Buffers of one pool posted on a device's receive ring, one per
/// descriptor, held by index: no [`PacketBuf`] (and so no reference count
/// update) per buffer while it sits on the ring. A received buffer leaves as
/// a `PacketBuf` and a fresh one from the pool takes its slot in one step.
///
/// Every index in `slots` was taken off `pool`'s free list and is neither
/// back on it nor in a `PacketBuf`: the slots own their buffers, uniquely,
/// and give them back to the pool on drop. Nothing outside this module
/// can put an index into a slot.
pub(crate) struct PostedBuffers {
    pool: Rc<Mempool>,
    slots: Box<[u32]>,
}

impl fmt::Debug for PostedBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostedBuffers")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl PostedBuffers {
    /// `count` buffers taken from `pool`; `None` (and none taken) when it
    /// has fewer free.
    pub(crate) fn take(pool: &Rc<Mempool>, count: usize) -> Option<Self> {
        if pool.free_count() < count {
            return None;
        }
        let slots = (0..count).map(|_| pool.pop()).collect::<Option<Box<[u32]>>>()?;
        Some(Self {
            pool: Rc::clone(pool),
            slots,
        })
    }

    /// IOVA of the buffer in `slot` (`None` past the last slot).
    #[inline]
    pub(crate) fn iova(&self, slot: usize) -> Option<u64> {
        self.slots.get(slot).map(|&index| self.pool.iova_of(index))
    }

    /// Hands the buffer in `slot` out as a packet of `len` bytes (clamped
    /// to the buffer size) and puts a fresh buffer from the pool in its
    /// place; returns the packet and the fresh buffer's IOVA. `None`, with
    /// nothing changed, when the pool has no free buffer (or past the last
    /// slot).
    #[inline]
    pub(crate) fn exchange(&mut self, slot: usize, len: usize) -> Option<(PacketBuf, u64)> {
        let posted = self.slots.get_mut(slot)?;
        let pool = &self.pool;
        let fresh = pool.pop()?;
        let index = std::mem::replace(posted, fresh);
        let packet = PacketBuf {
            pool: Rc::clone(pool),
            index,
            len: len.min(pool.entry_size) as u32,
        };
        Some((packet, pool.iova_of(fresh)))
    }
}

impl Drop for PostedBuffers {
    fn drop(&mut self) {
        for &index in &self.slots {
            self.pool.release(index);
        }
    }
}

/// One packet buffer of a [`Mempool`]; returns to the pool on drop.
///
/// While the application holds a `PacketBuf` no descriptor points at its
/// memory (the driver keeps posted buffers to itself), so its bytes can be
/// lent out as ordinary slices. Nothing else reaches them: the pool keeps
/// its [`DmaRegion`] to itself, so no safe code can write a buffer's bytes
/// while a slice of them is lent out.
///
/// ```compile_fail
/// // The pool does not hand out its region.
/// fn region_of(pool: &vfplane_driver::Mempool) {
///     let _ = pool.region();
/// }
/// ```
///
/// ```compile_fail
/// // A region is written only through `&mut`: a shared reference cannot
/// // write memory another reference may be reading.
/// fn write_shared(region: &vfplane_driver::dma::DmaRegion) {
///     region.write_u32(0, 1);
/// }
/// ```
///
/// ```
/// // What the two above would do, done the allowed way.
/// fn write_owned(region: &mut vfplane_driver::dma::DmaRegion) -> bool {
///     region.write_u32(0, 1) && region.fill(4, 4, 0)
/// }
/// fn lengths(buf: &mut vfplane_driver::PacketBuf) -> usize {
///     buf.as_mut_slice().len() + buf.as_slice().len()
/// }
/// ```
pub struct PacketBuf {
    pool: Rc<Mempool>,
    index: u32,
    len: u32,
}

impl fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PacketBuf")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

impl PacketBuf {
    /// Bytes of packet data.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the packet has no data.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room in the buffer.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.pool.entry_size
    }

    /// Sets the packet length (clamped to the capacity).
    #[inline]
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.pool.entry_size) as u32;
    }

    /// IOVA of the first byte, what a descriptor points at.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.pool.iova_of(self.index)
    }

    /// Index of the buffer in its pool.
    #[inline]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The pool the buffer returns to.
    #[inline]
    pub fn pool(&self) -> &Rc<Mempool> {
        &self.pool
    }

    #[inline]
    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: index < entries, so the offset is inside the pool's region.
        unsafe { self.pool.region.as_ptr().add(self.pool.offset(self.index)) }
    }

    /// The packet's bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the buffer lies inside the pool's region, which lives as
        // long as `self.pool`; this PacketBuf is the only owner of the index
        // and no descriptor points at it while it is held (module docs), so
        // nothing writes the bytes while the slice lives.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.len as usize) }
    }

    /// The packet's bytes, writable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.len as usize) }
    }

    /// The whole buffer (capacity bytes), writable; use with `set_len`.
    #[inline]
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_mut_slice`; the whole entry belongs to this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.data_ptr(), self.pool.entry_size) }
    }
}

impl Drop for PacketBuf {
    #[inline]
    fn drop(&mut self) {
        self.pool.release(self.index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelDma;

    #[test]
    fn buffers_return_on_drop_and_do_not_overlap() {
        let dma = ModelDma::standalone();
        let pool = Mempool::new(&dma, 8, 2048).unwrap();
        let mut held = Vec::with_capacity(8);
        assert_eq!(pool.alloc_batch(&mut held, 100, 60), 8);
        assert!(pool.alloc().is_none());
        let mut iovas: Vec<u64> = held.iter().map(PacketBuf::iova).collect();
        iovas.sort_unstable();
        iovas.dedup();
        assert_eq!(iovas.len(), 8);
        for pair in iovas.windows(2) {
            assert!(pair[1] - pair[0] >= 2048);
        }
        for (i, buf) in held.iter_mut().enumerate() {
            buf.as_mut_slice().fill(i as u8);
        }
        for (i, buf) in held.iter().enumerate() {
            assert!(buf.as_slice().iter().all(|&b| b == i as u8));
        }
        held.truncate(3);
        assert_eq!(pool.free_count(), 5);
        drop(held);
        assert_eq!(pool.free_count(), 8);
    }

    #[test]
    fn posted_buffers_are_exchanged_and_given_back() {
        let dma = ModelDma::standalone();
        let pool = Mempool::new(&dma, 6, 2048).unwrap();
        assert!(PostedBuffers::take(&pool, 7).is_none());
        assert_eq!(pool.free_count(), 6, "nothing taken when too few");
        let mut posted = PostedBuffers::take(&pool, 4).unwrap();
        assert_eq!(pool.free_count(), 2);
        let before = posted.iova(1).unwrap();
        let (packet, fresh) = posted.exchange(1, 5000).unwrap();
        assert_eq!(packet.iova(), before, "the posted buffer leaves");
        assert_eq!(posted.iova(1), Some(fresh), "a fresh one takes its slot");
        assert_ne!(fresh, before);
        assert_eq!(packet.len(), 2048, "length clamped to the buffer");
        let (second, _) = posted.exchange(2, 60).unwrap();
        assert_eq!(pool.free_count(), 0);
        assert!(posted.exchange(3, 60).is_none(), "empty pool: nothing changes");
        assert!(posted.exchange(4, 60).is_none() && posted.iova(4).is_none());
        drop((packet, second));
        assert_eq!(pool.free_count(), 2);
        drop(posted);
        assert_eq!(pool.free_count(), 6);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dma = ModelDma::standalone();
        assert!(matches!(
            Mempool::new(&dma, 8, 1500),
            Err(MempoolError::EntrySize(1500))
        ));
        assert!(matches!(
            Mempool::new(&dma, 0, 2048),
            Err(MempoolError::EntryCount(0))
        ));
    }

    #[test]
    fn set_len_is_clamped() {
        let dma = ModelDma::standalone();
        let pool = Mempool::new(&dma, 1, 1024).unwrap();
        let mut buf = pool.alloc().unwrap();
        buf.set_len(5000);
        assert_eq!(buf.len(), 1024);
        assert_eq!(buf.buffer_mut().len(), 1024);
    }
}
