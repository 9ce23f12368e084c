//! Register map of the Intel 82576 Virtual Function (as QEMU's `igbvf`
//! emulates it), and the [`RegisterSpace`] seam the driver reads and writes
//! them through: a real BAR0 mapping or the in-memory device model.
//!
//! Offsets are BAR0 byte offsets; every access is 32 bits wide.

/// 32-bit register access to a device's BAR0.
///
/// Implemented by the mmapped BAR of a real VF ([`crate::vfio::MappedBar`],
/// volatile loads and stores) and by the device model
/// (`model::ModelRegisters`, feature `model`).
pub trait RegisterSpace {
    /// Reads the 32-bit register at byte `offset`.
    fn read32(&self, offset: u32) -> u32;
    /// Writes the 32-bit register at byte `offset`.
    fn write32(&self, offset: u32, value: u32);
}

impl<R: RegisterSpace + ?Sized> RegisterSpace for &R {
    fn read32(&self, offset: u32) -> u32 {
        (**self).read32(offset)
    }
    fn write32(&self, offset: u32, value: u32) {
        (**self).write32(offset, value);
    }
}

/// Size of a VF's BAR0.
pub const BAR0_SIZE: usize = 16 * 1024;

/// Device control.
pub const CTRL: u32 = 0x0000;
/// CTRL: VF software reset.
pub const CTRL_RST: u32 = 0x0400_0000;
/// Device status (mirrors the PF's).
pub const STATUS: u32 = 0x0008;
/// STATUS: link up.
pub const STATUS_LU: u32 = 0x0000_0002;
/// STATUS: speed bits.
pub const STATUS_SPEED_MASK: u32 = 0x0000_00C0;
/// STATUS speed: 1000 Mb/s.
pub const STATUS_SPEED_1000: u32 = 0x0000_0080;
/// STATUS speed: 100 Mb/s.
pub const STATUS_SPEED_100: u32 = 0x0000_0040;

/// Extended interrupt cause set.
pub const EICS: u32 = 0x1520;
/// Extended interrupt mask set (enable).
pub const EIMS: u32 = 0x1524;
/// Extended interrupt mask clear (disable).
pub const EIMC: u32 = 0x1528;
/// Extended interrupt auto clear.
pub const EIAC: u32 = 0x152C;
/// Extended interrupt auto mask.
pub const EIAM: u32 = 0x1530;
/// Extended interrupt cause read.
pub const EICR: u32 = 0x1580;
/// Interrupt throttle of vector `v`.
pub const fn eitr(vector: u32) -> u32 {
    0x1680 + 4 * vector
}
/// Interrupt vector allocation of queues 0 and 1.
pub const VTIVAR: u32 = 0x1700;
/// Interrupt vector allocation of the mailbox ("other" cause).
pub const VTIVAR_MISC: u32 = 0x1740;
/// IVAR entry: valid bit.
pub const IVAR_VALID: u32 = 0x80;
/// All three MSI-X vectors of a VF.
pub const EIMS_ALL: u32 = 0x7;

/// VF-to-PF mailbox control.
pub const VMMB: u32 = 0x0C40;
/// Mailbox message buffer, 16 dwords.
pub const VMBMEM: u32 = 0x0800;
/// Dwords in the mailbox message buffer.
pub const VMBMEM_WORDS: usize = 16;
/// VMMB: request for PF ready.
pub const VMMB_REQ: u32 = 0x01;
/// VMMB: VF acknowledges a PF message.
pub const VMMB_ACK: u32 = 0x02;
/// VMMB: VF owns the buffer.
pub const VMMB_VFU: u32 = 0x04;
/// VMMB: PF owns the buffer.
pub const VMMB_PFU: u32 = 0x08;
/// VMMB: PF wrote a message (read to clear).
pub const VMMB_PFSTS: u32 = 0x10;
/// VMMB: PF acknowledged the VF's message (read to clear).
pub const VMMB_PFACK: u32 = 0x20;
/// VMMB: PF reset in progress.
pub const VMMB_RSTI: u32 = 0x40;
/// VMMB: PF reset done (read to clear).
pub const VMMB_RSTD: u32 = 0x80;
/// VMMB bits that clear when read.
pub const VMMB_R2C_BITS: u32 = VMMB_RSTD | VMMB_PFSTS | VMMB_PFACK;

/// RX queue `q` base.
const fn rxq(q: u32) -> u32 {
    0x2800 + 0x100 * q
}
/// TX queue `q` base.
const fn txq(q: u32) -> u32 {
    0x3800 + 0x100 * q
}
/// RX descriptor base, low 32 bits.
pub const fn rdbal(q: u32) -> u32 {
    rxq(q)
}
/// RX descriptor base, high 32 bits.
pub const fn rdbah(q: u32) -> u32 {
    rxq(q) + 0x04
}
/// RX ring length in bytes.
pub const fn rdlen(q: u32) -> u32 {
    rxq(q) + 0x08
}
/// Split and replication control.
pub const fn srrctl(q: u32) -> u32 {
    rxq(q) + 0x0C
}
/// RX descriptor head.
pub const fn rdh(q: u32) -> u32 {
    rxq(q) + 0x10
}
/// RX descriptor tail.
pub const fn rdt(q: u32) -> u32 {
    rxq(q) + 0x18
}
/// RX descriptor control.
pub const fn rxdctl(q: u32) -> u32 {
    rxq(q) + 0x28
}
/// TX descriptor base, low 32 bits.
pub const fn tdbal(q: u32) -> u32 {
    txq(q)
}
/// TX descriptor base, high 32 bits.
pub const fn tdbah(q: u32) -> u32 {
    txq(q) + 0x04
}
/// TX ring length in bytes.
pub const fn tdlen(q: u32) -> u32 {
    txq(q) + 0x08
}
/// TX descriptor head.
pub const fn tdh(q: u32) -> u32 {
    txq(q) + 0x10
}
/// TX descriptor tail.
pub const fn tdt(q: u32) -> u32 {
    txq(q) + 0x18
}
/// TX descriptor control.
pub const fn txdctl(q: u32) -> u32 {
    txq(q) + 0x28
}

/// SRRCTL: packet buffer size field (1 KiB units).
pub const SRRCTL_BSIZEPKT_MASK: u32 = 0x7F;
/// SRRCTL: advanced one-buffer descriptors.
pub const SRRCTL_DESCTYPE_ADV_ONEBUF: u32 = 0x0200_0000;
/// SRRCTL: drop frames when no descriptor is free.
pub const SRRCTL_DROP_EN: u32 = 0x8000_0000;
/// RXDCTL/TXDCTL: queue enable.
pub const QUEUE_ENABLE: u32 = 0x0200_0000;
/// TXDCTL: write-back threshold 1 (the 82576 VF erratum DPDK works around).
pub const TXDCTL_WTHRESH_1: u32 = 1 << 16;

/// Good packets received.
pub const VFGPRC: u32 = 0x0F10;
/// Good packets transmitted.
pub const VFGPTC: u32 = 0x0F14;
/// Good octets received.
pub const VFGORC: u32 = 0x0F18;
/// Good octets transmitted.
pub const VFGOTC: u32 = 0x0F34;
/// Multicast packets received.
pub const VFMPRC: u32 = 0x0F3C;

/// Advanced descriptor layout (16 bytes each).
pub mod desc {
    /// Size of one descriptor.
    pub const SIZE: usize = 16;
    /// RX write-back: status/error dword offset.
    pub const RX_STATUS_OFFSET: usize = 8;
    /// RX write-back: length word offset.
    pub const RX_LENGTH_OFFSET: usize = 12;
    /// RX status: descriptor done.
    pub const RX_DD: u32 = 0x1;
    /// RX status: end of packet.
    pub const RX_EOP: u32 = 0x2;
    /// RX error: frame error (any RXE bit).
    pub const RX_ERR_MASK: u32 = 0xFFF0_0000;
    /// TX: cmd_type_len dword offset.
    pub const TX_CMD_OFFSET: usize = 8;
    /// TX: olinfo_status / write-back status dword offset.
    pub const TX_STATUS_OFFSET: usize = 12;
    /// TX: data descriptor type.
    pub const TX_DTYP_DATA: u32 = 0x0030_0000;
    /// TX: end of packet.
    pub const TX_EOP: u32 = 0x0100_0000;
    /// TX: insert FCS.
    pub const TX_IFCS: u32 = 0x0200_0000;
    /// TX: report status.
    pub const TX_RS: u32 = 0x0800_0000;
    /// TX: extended (advanced) descriptor.
    pub const TX_DEXT: u32 = 0x2000_0000;
    /// TX: length field.
    pub const TX_LEN_MASK: u32 = 0xFFFF;
    /// TX: PAYLEN shift in olinfo_status.
    pub const TX_PAYLEN_SHIFT: u32 = 14;
    /// TX write-back: descriptor done.
    pub const TX_DD: u32 = 0x1;
}

/// PF mailbox message words.
pub mod mbx {
    /// Reset request / reply.
    pub const RESET: u32 = 0x01;
    /// Set the VF's MAC address.
    pub const SET_MAC_ADDR: u32 = 0x02;
    /// Set multicast hashes.
    pub const SET_MULTICAST: u32 = 0x03;
    /// Set VLAN filter.
    pub const SET_VLAN: u32 = 0x04;
    /// Set large packet (max frame) size.
    pub const SET_LPE: u32 = 0x05;
    /// Unsolicited PF control message (ping).
    pub const PF_CONTROL_MSG: u32 = 0x0100;
    /// Message type mask (word 0).
    pub const TYPE_MASK: u32 = 0xFFFF;
    /// MSGINFO shift (word 0).
    pub const MSGINFO_SHIFT: u32 = 16;
    /// Reply: acknowledged.
    pub const ACK: u32 = 0x8000_0000;
    /// Reply: refused.
    pub const NACK: u32 = 0x4000_0000;
    /// Reply: clear to send.
    pub const CTS: u32 = 0x2000_0000;
}
