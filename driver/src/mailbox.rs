//! The VF side of the 82576 VF-to-PF mailbox, after Linux `igbvf/mbx.c`.
//!
//! Every wait has a deadline: a PF that never answers becomes an error,
//! never a hang. Unsolicited PF control messages (pings) that arrive while
//! a reply is awaited are acknowledged and skipped.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::regs::{self, RegisterSpace, mbx};

/// Errors of the mailbox.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MailboxError {
    /// The VF could not take the mailbox buffer.
    #[error("timed out after {0:?} taking the mailbox buffer (the PF holds it)")]
    LockTimeout(Duration),
    /// The PF did not acknowledge a message.
    #[error("the PF did not acknowledge message {msg_type:#x} within {timeout:?}")]
    AckTimeout {
        /// Message type sent.
        msg_type: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// The PF did not reply.
    #[error("the PF did not reply to message {msg_type:#x} within {timeout:?}")]
    ReplyTimeout {
        /// Message type sent.
        msg_type: u32,
        /// How long we waited.
        timeout: Duration,
    },
    /// The reply was for another message.
    #[error("the PF replied {reply:#x} to message {msg_type:#x}")]
    UnexpectedReply {
        /// Message type sent.
        msg_type: u32,
        /// Word 0 of the reply.
        reply: u32,
    },
    /// A message longer than the buffer.
    #[error("a mailbox message holds at most 16 words, not {0}")]
    TooLong(usize),
}

/// Mailbox timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxTiming {
    /// Longest wait for each step (lock, ack, reply).
    pub timeout: Duration,
    /// Sleep between polls.
    pub poll_interval: Duration,
}

impl Default for MailboxTiming {
    fn default() -> Self {
        // Linux and DPDK: 2000 polls of 500 µs.
        Self {
            timeout: Duration::from_secs(1),
            poll_interval: Duration::from_micros(500),
        }
    }
}

/// The VF's view of the mailbox: a software copy of the read-to-clear bits.
#[derive(Debug, Default)]
pub struct Mailbox {
    seen: u32,
    timing: MailboxTiming,
    pings: u64,
}

impl Mailbox {
    /// A mailbox with the given timing.
    pub fn new(timing: MailboxTiming) -> Self {
        Self {
            seen: 0,
            timing,
            pings: 0,
        }
    }

    /// PF control messages (pings) seen so far.
    pub fn pings(&self) -> u64 {
        self.pings
    }

    /// Forgets the bits seen (after a VF reset).
    pub fn clear(&mut self) {
        self.seen = 0;
    }

    fn read(&mut self, regs: &impl RegisterSpace) -> u32 {
        let value = regs.read32(regs::VMMB) | self.seen;
        self.seen |= value & regs::VMMB_R2C_BITS;
        value
    }

    /// Whether any of `mask` is set; forgets those bits.
    pub fn check_bits(&mut self, regs: &impl RegisterSpace, mask: u32) -> bool {
        let value = self.read(regs);
        self.seen &= !mask;
        value & mask != 0
    }

    fn wait_bits(&mut self, regs: &impl RegisterSpace, mask: u32) -> bool {
        let deadline = Instant::now() + self.timing.timeout;
        loop {
            if self.check_bits(regs, mask) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(self.timing.poll_interval);
        }
    }

    fn lock(&mut self, regs: &impl RegisterSpace) -> Result<(), MailboxError> {
        let deadline = Instant::now() + self.timing.timeout;
        loop {
            regs.write32(regs::VMMB, regs::VMMB_VFU);
            if self.read(regs) & regs::VMMB_VFU != 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MailboxError::LockTimeout(self.timing.timeout));
            }
            std::thread::sleep(self.timing.poll_interval);
        }
    }

    /// Sends `msg` and waits for the PF's acknowledgement.
    ///
    /// # Errors
    /// Lock or acknowledgement timeouts.
    pub fn write_posted(&mut self, regs: &impl RegisterSpace, msg: &[u32]) -> Result<(), MailboxError> {
        if msg.len() > regs::VMBMEM_WORDS {
            return Err(MailboxError::TooLong(msg.len()));
        }
        let msg_type = msg.first().copied().unwrap_or(0) & mbx::TYPE_MASK;
        self.lock(regs)?;
        // Stale message and ack bits belong to what we are overwriting.
        self.check_bits(regs, regs::VMMB_PFSTS);
        self.check_bits(regs, regs::VMMB_PFACK);
        for (i, word) in msg.iter().enumerate() {
            regs.write32(regs::VMBMEM + 4 * i as u32, *word);
        }
        // REQ without VFU also gives the buffer back.
        regs.write32(regs::VMMB, regs::VMMB_REQ);
        if !self.wait_bits(regs, regs::VMMB_PFACK) {
            return Err(MailboxError::AckTimeout {
                msg_type,
                timeout: self.timing.timeout,
            });
        }
        Ok(())
    }

    /// Reads one PF message into `out` if one is waiting (no wait); returns
    /// its word 0. Control messages are counted and returned too.
    pub fn try_read(
        &mut self,
        regs: &impl RegisterSpace,
        out: &mut [u32],
    ) -> Result<Option<u32>, MailboxError> {
        if !self.check_bits(regs, regs::VMMB_PFSTS) {
            return Ok(None);
        }
        self.lock(regs)?;
        for (i, word) in out.iter_mut().enumerate().take(regs::VMBMEM_WORDS) {
            *word = regs.read32(regs::VMBMEM + 4 * i as u32);
        }
        let first = regs.read32(regs::VMBMEM);
        // ACK without VFU releases the buffer.
        regs.write32(regs::VMMB, regs::VMMB_ACK);
        if first & mbx::TYPE_MASK == mbx::PF_CONTROL_MSG {
            self.pings += 1;
        }
        Ok(Some(first))
    }

    /// Waits for the PF's reply (skipping control messages) into `out`.
    ///
    /// # Errors
    /// No reply before the timeout.
    pub fn read_posted(
        &mut self,
        regs: &impl RegisterSpace,
        msg_type: u32,
        out: &mut [u32],
    ) -> Result<u32, MailboxError> {
        let deadline = Instant::now() + self.timing.timeout;
        loop {
            if let Some(first) = self.try_read(regs, out)? {
                if first & mbx::TYPE_MASK != mbx::PF_CONTROL_MSG {
                    return Ok(first);
                }
                tracing::debug!(word = first, "PF control message while awaiting a reply");
                continue;
            }
            if Instant::now() >= deadline {
                return Err(MailboxError::ReplyTimeout {
                    msg_type,
                    timeout: self.timing.timeout,
                });
            }
            std::thread::sleep(self.timing.poll_interval);
        }
    }

    /// Sends `msg` and returns the PF's reply word 0 (the rest in `reply`).
    ///
    /// # Errors
    /// Timeouts, or a reply to another message type.
    pub fn request(
        &mut self,
        regs: &impl RegisterSpace,
        msg: &[u32],
        reply: &mut [u32],
    ) -> Result<u32, MailboxError> {
        let msg_type = msg.first().copied().unwrap_or(0) & mbx::TYPE_MASK;
        self.write_posted(regs, msg)?;
        let first = self.read_posted(regs, msg_type, reply)?;
        if first & mbx::TYPE_MASK != msg_type {
            return Err(MailboxError::UnexpectedReply {
                msg_type,
                reply: first,
            });
        }
        Ok(first)
    }
}
