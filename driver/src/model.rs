//! An in-memory model of the 82576 VF as QEMU emulates it: registers, the
//! PF mailbox with a fake PF, advanced RX/TX descriptor rings and an IOMMU.
//!
//! Unit tests and benchmarks run the real driver code against it:
//! [`ModelRegisters`] is its BAR0, [`ModelDma`] hands out memory the model
//! "DMAs" into by IOVA. A descriptor that points at an IOVA no region maps
//! is refused like the IOMMU refuses it: the access is recorded as a fault
//! and no memory is touched.
//!
//! Like QEMU, a TDT write transmits synchronously; frames a test injects
//! are written into posted RX buffers at once, or dropped (counted as
//! missed) when no descriptor is free.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Duration;

use crate::dma::{DmaAllocator, DmaBacking, DmaError, DmaRegion, PAGE_4K};
use crate::regs::{self, RegisterSpace, desc, mbx};

/// How the fake PF answers the mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PfBehaviour {
    /// Acknowledges and replies like Linux igb.
    #[default]
    Answer,
    /// Never acknowledges (the VF's ack wait times out).
    Silent,
    /// Acknowledges but never replies (the VF's reply wait times out).
    AckOnly,
}

/// The fake PF's configuration.
#[derive(Debug, Clone, Default)]
pub struct PfConfig {
    /// How it answers.
    pub behaviour: PfBehaviour,
    /// MAC the PF assigned (RESET is ACKed with it); `None`: RESET is NACKed.
    pub assigned_mac: Option<[u8; 6]>,
    /// Whether the MAC was set by the administrator (SET_MAC_ADDR is NACKed).
    pub admin_mac: bool,
    /// VMMB reads RSTI stays set for after a VF reset (`u32::MAX`: forever).
    pub reset_reads: u32,
    /// Send a control message (ping) before every reply.
    pub ping_before_reply: bool,
    /// Acknowledge but never answer this many messages first (a PF busy
    /// with its own start-up).
    pub lose_first_replies: u32,
}

/// The model's configuration.
#[derive(Debug, Clone, Default)]
pub struct ModelConfig {
    /// The fake PF.
    pub pf: PfConfig,
    /// Link down at start.
    pub link_down: bool,
    /// Append 4 zero FCS bytes to received frames (PF RCTL.SECRC clear).
    pub append_fcs: bool,
    /// Do not keep transmitted frames (benchmarks), only count them.
    pub discard_tx: bool,
    /// Hold transmission: TDT writes queue descriptors but nothing is sent
    /// until [`Model::resume_tx`].
    pub tx_paused: bool,
    /// The host cannot have the device's interrupt (as when VFIO refuses
    /// MSI-X): enabling it fails with [`crate::poll::PollError::NoMsix`].
    pub no_msix: bool,
}

/// One IOVA range of the model's IOMMU.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    iova: u64,
    ptr: NonNull<u8>,
    len: usize,
}

/// The model's IOMMU: IOVA ranges and what they map to.
#[derive(Debug, Default)]
struct MemoryMap {
    mappings: Vec<Mapping>,
    next_iova: u64,
    faults: Vec<u64>,
}

impl MemoryMap {
    fn translate(&mut self, iova: u64, len: usize) -> Option<*mut u8> {
        let found = self.mappings.iter().find(|m| {
            iova >= m.iova
                && iova
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= m.iova + m.len as u64)
        });
        match found {
            // SAFETY: iova - m.iova < m.len (checked above), inside the allocation.
            Some(m) => Some(unsafe { m.ptr.as_ptr().add((iova - m.iova) as usize) }),
            None => {
                self.faults.push(iova);
                None
            }
        }
    }

    fn read(&mut self, iova: u64, out: &mut [u8]) -> bool {
        let Some(src) = self.translate(iova, out.len()) else {
            return false;
        };
        // SAFETY: `src..src + len` lies in a live mapping (translate); the
        // driver holds no reference to device-visible memory (dma module
        // contract), and `out` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) };
        true
    }

    fn write(&mut self, iova: u64, data: &[u8]) -> bool {
        let Some(dst) = self.translate(iova, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`; `data` is a distinct Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        true
    }

    fn read_u32(&mut self, iova: u64) -> Option<u32> {
        let mut b = [0u8; 4];
        self.read(iova, &mut b).then(|| u32::from_le_bytes(b))
    }

    fn read_u64(&mut self, iova: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(iova, &mut b).then(|| u64::from_le_bytes(b))
    }
}

/// Model memory: freed and unmapped from the model's IOMMU on drop.
struct ModelBacking {
    map: Rc<RefCell<MemoryMap>>,
    ptr: NonNull<u8>,
    layout: Layout,
}

impl fmt::Debug for ModelBacking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelBacking")
            .field("len", &self.layout.size())
            .finish()
    }
}

impl DmaBacking for ModelBacking {}

impl Drop for ModelBacking {
    fn drop(&mut self) {
        self.map.borrow_mut().mappings.retain(|m| m.ptr != self.ptr);
        // SAFETY: `ptr` came from `alloc_zeroed(layout)` in `ModelDma::allocate`
        // and is freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// DMA memory for the model: heap memory at IOVAs of the model's IOMMU.
#[derive(Debug, Clone)]
pub struct ModelDma {
    map: Rc<RefCell<MemoryMap>>,
}

impl ModelDma {
    /// Memory not attached to any model (for mempool tests).
    pub fn standalone() -> Self {
        Self {
            map: Rc::new(RefCell::new(MemoryMap {
                next_iova: 0x10_0000,
                ..MemoryMap::default()
            })),
        }
    }
}

impl DmaAllocator for ModelDma {
    fn allocate(&self, len: usize) -> Result<DmaRegion, DmaError> {
        if len == 0 {
            return Err(DmaError::Empty);
        }
        let len = len.div_ceil(PAGE_4K) * PAGE_4K;
        let layout = Layout::from_size_align(len, PAGE_4K).map_err(|_| DmaError::ModelAlloc { len })?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or(DmaError::ModelAlloc { len })?;
        let iova = {
            let mut map = self.map.borrow_mut();
            let iova = map.next_iova;
            // Leave a page hole between regions so overruns fault.
            map.next_iova += len as u64 + PAGE_4K as u64;
            map.mappings.push(Mapping { iova, ptr, len });
            iova
        };
        let backing = ModelBacking {
            map: Rc::clone(&self.map),
            ptr,
            layout,
        };
        // SAFETY: fresh zeroed heap memory, 4 KiB aligned, owned by `backing`
        // (freed and unmapped on its drop), mapped at `iova` in the model.
        Ok(unsafe { DmaRegion::from_raw_parts(ptr, len, iova, PAGE_4K, Box::new(backing)) })
    }
}

/// Words of a mailbox message.
type Message = Vec<u32>;

/// The model's state.
#[derive(Debug)]
struct State {
    config: ModelConfig,
    regs: Vec<u32>,
    map: Rc<RefCell<MemoryMap>>,
    // Mailbox, device side.
    vmmb: u32,
    rsti_reads_left: u32,
    pf_queue: VecDeque<Message>,
    pf_outstanding: bool,
    cts: bool,
    vf_messages: Vec<Message>,
    mac: Option<[u8; 6]>,
    max_frame: u32,
    multicast: Vec<u16>,
    vf_enabled: bool,
    // Data path.
    link_up: bool,
    sent: Vec<Vec<u8>>,
    sent_count: u64,
    partial: Vec<u8>,
    partial_bad: bool,
    rx_missed: u64,
    interrupts: u64,
    /// Interrupt messages sent and not yet taken by the host (an eventfd's count).
    signalled: u64,
    /// Sleeps the driver began on the interrupt line.
    waits: u64,
    /// Frames delivered when the driver next sleeps on the interrupt line.
    arrive_while_asleep: Vec<Vec<u8>>,
    gprc: u32,
    gptc: u32,
    gorc: u32,
    gotc: u32,
}

impl State {
    fn reg(&self, offset: u32) -> u32 {
        self.regs.get(offset as usize / 4).copied().unwrap_or(0)
    }

    fn set(&mut self, offset: u32, value: u32) {
        if let Some(slot) = self.regs.get_mut(offset as usize / 4) {
            *slot = value;
        }
    }

    fn read(&mut self, offset: u32) -> u32 {
        match offset {
            regs::VMMB => {
                let value = self.vmmb;
                self.vmmb &= !regs::VMMB_R2C_BITS;
                if self.vmmb & regs::VMMB_RSTI != 0 && self.rsti_reads_left != u32::MAX {
                    self.rsti_reads_left = self.rsti_reads_left.saturating_sub(1);
                    if self.rsti_reads_left == 0 {
                        self.vmmb = (self.vmmb & !regs::VMMB_RSTI) | regs::VMMB_RSTD;
                    }
                }
                value
            }
            regs::STATUS => {
                if self.link_up {
                    regs::STATUS_LU | regs::STATUS_SPEED_1000 | 0x8000_0000
                } else {
                    0x8000_0000
                }
            }
            regs::EICR => {
                let value = self.reg(regs::EICR);
                self.set(regs::EICR, 0);
                value
            }
            regs::VFGPRC => self.gprc,
            regs::VFGPTC => self.gptc,
            regs::VFGORC => self.gorc,
            regs::VFGOTC => self.gotc,
            _ => self.reg(offset),
        }
    }

    fn write(&mut self, offset: u32, value: u32) {
        match offset {
            regs::CTRL => {
                if value & regs::CTRL_RST != 0 {
                    self.vf_reset();
                }
                self.set(regs::CTRL, value & !regs::CTRL_RST);
            }
            regs::VMMB => self.vf_mailbox_write(value),
            regs::EIMS => {
                let v = self.reg(regs::EIMS) | value;
                self.set(regs::EIMS, v);
                // Unmasking a vector whose cause is latched sends it now.
                self.send_pending_interrupts();
            }
            // Write 1 to clear.
            regs::EICR => {
                let v = self.reg(regs::EICR) & !value;
                self.set(regs::EICR, v);
            }
            regs::EIMC => {
                let v = self.reg(regs::EIMS) & !value;
                self.set(regs::EIMS, v);
            }
            o if o == regs::tdt(0) => {
                self.set(o, value);
                self.transmit();
            }
            _ => self.set(offset, value),
        }
    }

    fn vf_reset(&mut self) {
        for q in [regs::rxdctl(0), regs::txdctl(0)] {
            let v = self.reg(q) & !regs::QUEUE_ENABLE;
            self.set(q, v);
        }
        self.set(regs::EIMS, 0);
        self.vf_enabled = false;
        self.cts = false;
        self.pf_queue.clear();
        self.pf_outstanding = false;
        self.rsti_reads_left = self.config.pf.reset_reads.max(1);
        self.vmmb = regs::VMMB_RSTI;
    }

    fn vf_mailbox_write(&mut self, value: u32) {
        if value & regs::VMMB_VFU != 0 {
            if self.vmmb & regs::VMMB_PFU == 0 {
                self.vmmb |= regs::VMMB_VFU;
            }
        } else {
            self.vmmb &= !regs::VMMB_VFU;
        }
        if value & regs::VMMB_REQ != 0 {
            self.pf_receive();
        }
        if value & regs::VMMB_ACK != 0 {
            self.pf_outstanding = false;
            self.pf_deliver();
        }
    }

    fn mailbox_words(&self) -> Message {
        (0..regs::VMBMEM_WORDS as u32)
            .map(|i| self.reg(regs::VMBMEM + 4 * i))
            .collect()
    }

    /// The fake PF reads the VF's message and queues its reply.
    fn pf_receive(&mut self) {
        let msg = self.mailbox_words();
        self.vf_messages.push(msg.clone());
        if self.config.pf.behaviour == PfBehaviour::Silent {
            return;
        }
        self.vmmb |= regs::VMMB_PFACK;
        if self.config.pf.behaviour == PfBehaviour::AckOnly {
            return;
        }
        if self.config.pf.lose_first_replies > 0 {
            self.config.pf.lose_first_replies -= 1;
            return;
        }
        let msg_type = msg[0] & mbx::TYPE_MASK;
        let reply = if msg_type == mbx::RESET {
            self.cts = true;
            self.vf_enabled = true;
            self.mac = self.config.pf.assigned_mac;
            match self.config.pf.assigned_mac {
                Some(mac) => vec![
                    mbx::RESET | mbx::ACK,
                    u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]),
                    u32::from_le_bytes([mac[4], mac[5], 0, 0]),
                ],
                None => vec![mbx::RESET | mbx::NACK, 0, 0],
            }
        } else if !self.cts {
            vec![msg_type | mbx::NACK]
        } else {
            let ok = match msg_type {
                mbx::SET_MAC_ADDR => {
                    let a = msg[1].to_le_bytes();
                    let b = msg[2].to_le_bytes();
                    let mac = [a[0], a[1], a[2], a[3], b[0], b[1]];
                    let valid = mac[0] & 1 == 0 && mac != [0; 6];
                    let allowed = !self.config.pf.admin_mac || self.mac == Some(mac);
                    if valid && allowed {
                        self.mac = Some(mac);
                    }
                    valid && allowed
                }
                mbx::SET_MULTICAST => {
                    let count = ((msg[0] >> mbx::MSGINFO_SHIFT) & 0xFF).min(30) as usize;
                    self.multicast = (0..count)
                        .map(|i| {
                            let word = msg[1 + i / 2];
                            if i % 2 == 0 {
                                word as u16
                            } else {
                                (word >> 16) as u16
                            }
                        })
                        .collect();
                    true
                }
                mbx::SET_LPE => {
                    let ok = (64..=9728).contains(&msg[1]);
                    if ok {
                        self.max_frame = msg[1];
                    }
                    ok
                }
                mbx::SET_VLAN => true,
                _ => false,
            };
            vec![msg[0] | if ok { mbx::ACK } else { mbx::NACK } | mbx::CTS]
        };
        if self.config.pf.ping_before_reply {
            self.pf_queue.push_back(vec![mbx::PF_CONTROL_MSG | mbx::CTS]);
        }
        self.pf_queue.push_back(reply);
        self.pf_deliver();
    }

    fn pf_deliver(&mut self) {
        if self.pf_outstanding {
            return;
        }
        if let Some(msg) = self.pf_queue.pop_front() {
            for (i, word) in msg.iter().enumerate() {
                self.set(regs::VMBMEM + 4 * i as u32, *word);
            }
            self.vmmb |= regs::VMMB_PFSTS;
            self.pf_outstanding = true;
        }
    }

    fn ring(&self, bal: u32, bah: u32, len: u32) -> (u64, u32) {
        let base = u64::from(self.reg(bal)) | (u64::from(self.reg(bah)) << 32);
        (base, self.reg(len) / desc::SIZE as u32)
    }

    fn transmit(&mut self) {
        if self.reg(regs::txdctl(0)) & regs::QUEUE_ENABLE == 0 || !self.vf_enabled || self.config.tx_paused {
            return;
        }
        let (base, count) = self.ring(regs::tdbal(0), regs::tdbah(0), regs::tdlen(0));
        if count == 0 {
            return;
        }
        let tail = self.reg(regs::tdt(0)) % count;
        let mut head = self.reg(regs::tdh(0)) % count;
        let map = Rc::clone(&self.map);
        let mut map = map.borrow_mut();
        while head != tail {
            let at = base + u64::from(head) * desc::SIZE as u64;
            let (Some(addr), Some(cmd)) = (map.read_u64(at), map.read_u32(at + 8)) else {
                head = (head + 1) % count;
                continue;
            };
            let len = (cmd & desc::TX_LEN_MASK) as usize;
            let start = self.partial.len();
            self.partial.resize(start + len, 0);
            if !map.read(addr, &mut self.partial[start..]) {
                // The IOMMU refused the read: nothing of this frame goes out.
                self.partial_bad = true;
            }
            if cmd & desc::TX_EOP != 0 {
                let frame = std::mem::take(&mut self.partial);
                if !self.partial_bad && !frame.is_empty() && self.link_up {
                    self.sent_count += 1;
                    self.gptc = self.gptc.wrapping_add(1);
                    self.gotc = self.gotc.wrapping_add(frame.len() as u32);
                    if self.config.discard_tx {
                        self.partial = frame;
                        self.partial.clear();
                    } else {
                        self.sent.push(frame);
                    }
                }
                self.partial_bad = false;
            }
            // Like QEMU: DD is written back even when the buffer faulted.
            if cmd & desc::TX_RS != 0 {
                map.write(at + desc::TX_STATUS_OFFSET as u64, &desc::TX_DD.to_le_bytes());
            }
            head = (head + 1) % count;
        }
        self.set(regs::tdh(0), head);
    }

    fn receive(&mut self, frame: &[u8]) -> bool {
        if self.reg(regs::rxdctl(0)) & regs::QUEUE_ENABLE == 0 || !self.vf_enabled || !self.link_up {
            self.rx_missed += 1;
            return false;
        }
        let (base, count) = self.ring(regs::rdbal(0), regs::rdbah(0), regs::rdlen(0));
        if count == 0 {
            self.rx_missed += 1;
            return false;
        }
        let bsize = match (self.reg(regs::srrctl(0)) & regs::SRRCTL_BSIZEPKT_MASK) as usize * 1024 {
            0 => 2048,
            n => n,
        };
        let data: std::borrow::Cow<'_, [u8]> = if self.config.append_fcs {
            let mut v = frame.to_vec();
            v.extend_from_slice(&[0; 4]);
            v.into()
        } else {
            frame.into()
        };
        let needed = data.len().div_ceil(bsize).max(1) as u32;
        let head = self.reg(regs::rdh(0)) % count;
        let tail = self.reg(regs::rdt(0)) % count;
        let available = (tail + count - head) % count;
        if available < needed {
            self.rx_missed += 1;
            return false;
        }
        let map = Rc::clone(&self.map);
        let mut map = map.borrow_mut();
        let mut head = head;
        for (i, chunk) in data.chunks(bsize).enumerate() {
            let at = base + u64::from(head) * desc::SIZE as u64;
            let Some(addr) = map.read_u64(at) else {
                return false;
            };
            map.write(addr, chunk);
            let mut status = desc::RX_DD;
            if i + 1 == needed as usize {
                status |= desc::RX_EOP;
            }
            let mut wb = [0u8; 16];
            wb[8..12].copy_from_slice(&status.to_le_bytes());
            wb[12..14].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            map.write(at, &wb);
            head = (head + 1) % count;
        }
        drop(map);
        self.set(regs::rdh(0), head);
        self.gprc = self.gprc.wrapping_add(1);
        self.gorc = self.gorc.wrapping_add(data.len() as u32);
        // RX queue 0's vector, if mapped, latches its cause; unmasked, it
        // fires.
        let ivar = self.reg(regs::VTIVAR);
        if ivar & regs::IVAR_VALID != 0 {
            let bit = 1 << (ivar & 0x3);
            let cause = self.reg(regs::EICR) | bit;
            self.set(regs::EICR, cause);
            self.send_pending_interrupts();
        }
        true
    }

    /// Sends the message of every unmasked vector whose cause is set (the
    /// host's eventfd counts it), then clears the causes EIAC auto-clears,
    /// as the 82576 (and QEMU's igb) does.
    fn send_pending_interrupts(&mut self) {
        let firing = self.reg(regs::EICR) & self.reg(regs::EIMS) & regs::EIMS_ALL;
        if firing == 0 {
            return;
        }
        self.interrupts += u64::from(firing.count_ones());
        self.signalled += u64::from(firing.count_ones());
        let left = self.reg(regs::EICR) & !(firing & self.reg(regs::EIAC));
        self.set(regs::EICR, left);
    }
}

/// A model 82576 VF; clones share the device.
#[derive(Debug, Clone)]
pub struct Model {
    state: Rc<RefCell<State>>,
}

/// The model's BAR0.
#[derive(Debug, Clone)]
pub struct ModelRegisters {
    state: Rc<RefCell<State>>,
}

// Out of line on purpose: `cargo xtask bench driver` counts the driver's
// instructions with callgrind and stops counting on entry to these two
// functions, so the model's work behind a register access is never charged
// to the driver. Inlined into the driver's burst functions, it would be.
impl RegisterSpace for ModelRegisters {
    #[inline(never)]
    fn read32(&self, offset: u32) -> u32 {
        self.state.borrow_mut().read(offset)
    }

    #[inline(never)]
    fn write32(&self, offset: u32, value: u32) {
        self.state.borrow_mut().write(offset, value);
    }
}

impl crate::poll::InterruptLine for ModelRegisters {
    fn enable(&mut self) -> Result<(), crate::poll::PollError> {
        if self.state.borrow().config.no_msix {
            return Err(crate::poll::PollError::NoMsix);
        }
        Ok(())
    }

    fn wait(&self, _timeout: Duration) -> Result<bool, crate::poll::PollError> {
        // The model cannot block: report whether an interrupt message was
        // sent since the last wait or discard (an eventfd's count, read and
        // zeroed). Frames a test injects while the poller "sleeps" must be
        // injected before the wait, so a test sees a sleep that no frame
        // ends as a timeout.
        let mut state = self.state.borrow_mut();
        state.waits += 1;
        // Frames "on the wire" during this sleep arrive now.
        for frame in std::mem::take(&mut state.arrive_while_asleep) {
            state.receive(&frame);
        }
        Ok(std::mem::take(&mut state.signalled) > 0)
    }

    fn discard_pending(&self) -> bool {
        std::mem::take(&mut self.state.borrow_mut().signalled) > 0
    }
}

impl Model {
    /// The device the benchmarks measure (`benches/burst.rs`,
    /// `examples/burst_cost.rs`): 512-descriptor rings, a 4096-buffer pool,
    /// a fast mailbox and no reset settle, on a model that does not keep
    /// what it sends and, with `tx_paused`, holds transmission until
    /// [`Model::resume_tx`].
    ///
    /// # Errors
    /// When the driver cannot bring the modelled VF up.
    pub fn benchmark_device(
        tx_paused: bool,
    ) -> Result<(Self, crate::igbvf::IgbVf<ModelRegisters>), crate::igbvf::IgbVfError> {
        let model = Self::new(ModelConfig {
            discard_tx: true,
            tx_paused,
            ..ModelConfig::default()
        });
        let config = crate::igbvf::IgbVfConfig {
            rx_ring_size: 512,
            tx_ring_size: 512,
            pool_entries: 4096,
            mailbox: crate::mailbox::MailboxTiming {
                timeout: Duration::from_millis(100),
                poll_interval: Duration::from_micros(10),
            },
            reset_settle: Duration::ZERO,
            ..crate::igbvf::IgbVfConfig::default()
        };
        let dev = crate::igbvf::IgbVf::new(model.registers(), &model.dma(), &config)?;
        Ok((model, dev))
    }

    /// A model VF.
    pub fn new(config: ModelConfig) -> Self {
        let map = Rc::new(RefCell::new(MemoryMap {
            next_iova: 0x10_0000,
            ..MemoryMap::default()
        }));
        let link_up = !config.link_down;
        Self {
            state: Rc::new(RefCell::new(State {
                config,
                regs: vec![0; regs::BAR0_SIZE / 4],
                map,
                vmmb: 0,
                rsti_reads_left: 0,
                pf_queue: VecDeque::new(),
                pf_outstanding: false,
                cts: false,
                vf_messages: Vec::new(),
                mac: None,
                max_frame: 1518,
                multicast: Vec::new(),
                vf_enabled: false,
                link_up,
                sent: Vec::new(),
                sent_count: 0,
                partial: Vec::new(),
                partial_bad: false,
                rx_missed: 0,
                interrupts: 0,
                signalled: 0,
                waits: 0,
                arrive_while_asleep: Vec::new(),
                gprc: 0,
                gptc: 0,
                gorc: 0,
                gotc: 0,
            })),
        }
    }

    /// The model's BAR0, for the driver.
    pub fn registers(&self) -> ModelRegisters {
        ModelRegisters {
            state: Rc::clone(&self.state),
        }
    }

    /// DMA memory the model can reach, for the driver.
    pub fn dma(&self) -> ModelDma {
        ModelDma {
            map: Rc::clone(&self.state.borrow().map),
        }
    }

    /// Delivers a frame from the wire; false when it was dropped (no free
    /// descriptor, queue disabled, link down).
    pub fn inject(&self, frame: &[u8]) -> bool {
        self.state.borrow_mut().receive(frame)
    }

    /// Frames transmitted so far (taken).
    pub fn take_sent(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.state.borrow_mut().sent)
    }

    /// Frames transmitted in all.
    pub fn sent_count(&self) -> u64 {
        self.state.borrow().sent_count
    }

    /// Frames dropped on receive for want of a descriptor.
    pub fn rx_missed(&self) -> u64 {
        self.state.borrow().rx_missed
    }

    /// IOVAs the IOMMU refused.
    pub fn dma_faults(&self) -> Vec<u64> {
        self.state.borrow().map.borrow().faults.clone()
    }

    /// Holds (`true`) or releases transmission; releasing sends what is queued.
    pub fn pause_tx(&self, paused: bool) {
        let mut state = self.state.borrow_mut();
        state.config.tx_paused = paused;
        if !paused {
            state.transmit();
        }
    }

    /// Releases transmission (see [`ModelConfig::tx_paused`]).
    pub fn resume_tx(&self) {
        self.pause_tx(false);
    }

    /// Sets the link state.
    pub fn set_link(&self, up: bool) {
        self.state.borrow_mut().link_up = up;
    }

    /// The PF sends an unsolicited control message (a ping).
    pub fn pf_ping(&self) {
        let mut state = self.state.borrow_mut();
        let word = mbx::PF_CONTROL_MSG | if state.cts { mbx::CTS } else { 0 };
        state.pf_queue.push_back(vec![word]);
        state.pf_deliver();
    }

    /// Messages the VF sent the PF.
    pub fn vf_messages(&self) -> Vec<Vec<u32>> {
        self.state.borrow().vf_messages.clone()
    }

    /// The MAC the PF has for the VF.
    pub fn pf_mac(&self) -> Option<[u8; 6]> {
        self.state.borrow().mac
    }

    /// The max frame size the VF asked for.
    pub fn max_frame(&self) -> u32 {
        self.state.borrow().max_frame
    }

    /// Multicast hashes the VF set.
    pub fn multicast_hashes(&self) -> Vec<u16> {
        self.state.borrow().multicast.clone()
    }

    /// Interrupt messages sent for RX queue 0's vector.
    pub fn interrupts(&self) -> u64 {
        self.state.borrow().interrupts
    }

    /// Times the driver slept on the interrupt line (called its `wait`).
    pub fn interrupt_waits(&self) -> u64 {
        self.state.borrow().waits
    }

    /// Delivers `frame` from the wire when the driver next sleeps on the
    /// interrupt line (the model cannot block, so "a frame arrives while
    /// the poller sleeps" is staged this way).
    pub fn arrive_during_next_sleep(&self, frame: &[u8]) {
        self.state.borrow_mut().arrive_while_asleep.push(frame.to_vec());
    }

    /// Makes the host side of the interrupt see a message the device never
    /// sent (what an interrupt that fired after the last wake leaves on an
    /// eventfd).
    pub fn signal_stale_interrupt(&self) {
        self.state.borrow_mut().signalled += 1;
    }

    /// A register's raw value (no read side effects).
    pub fn peek(&self, offset: u32) -> u32 {
        self.state.borrow().reg(offset)
    }
}
