//! Hybrid polling: busy-poll a queue while frames come, then arm the
//! queue's MSI-X interrupt and sleep until it fires, so an idle queue burns
//! no core and a busy one never waits for an interrupt.

use std::time::{Duration, Instant};

use thiserror::Error;

use crate::mempool::PacketBuf;
use crate::nic::NicDevice;

/// Errors of interrupt-driven waiting.
#[derive(Debug, Error)]
pub enum PollError {
    /// The device has no MSI-X vector to use.
    #[error("the device offers no MSI-X interrupt")]
    NoMsix,
    /// The eventfd could not be made.
    #[error("cannot create the interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// VFIO_DEVICE_SET_IRQS refused.
    #[error("VFIO refused to route MSI-X vector 0 to the eventfd")]
    SetIrqs(#[source] vfio_ioctls::VfioError),
    /// Waiting on the eventfd failed.
    #[error("waiting for the interrupt failed")]
    Wait(#[source] std::io::Error),
    /// Interrupts were not enabled first.
    #[error("interrupts are not enabled on this device")]
    NotEnabled,
}

/// The host side of a device interrupt: an eventfd VFIO signals, or the
/// model's flag.
pub trait InterruptLine {
    /// Routes the device's MSI-X vector 0 to this line.
    ///
    /// # Errors
    /// When the device or VFIO cannot.
    fn enable(&mut self) -> Result<(), PollError>;

    /// Blocks until the interrupt fires or `timeout` passes; true if it fired.
    ///
    /// # Errors
    /// When waiting fails or the line is not enabled.
    fn wait(&self, timeout: Duration) -> Result<bool, PollError>;
}

/// A device whose receive queue can raise an interrupt.
pub trait RxInterrupts: NicDevice {
    /// Sets up the RX queue's interrupt (vector, throttling, host eventfd).
    ///
    /// # Errors
    /// When the device or VFIO cannot.
    fn enable_rx_interrupt(&mut self) -> Result<(), PollError>;
    /// Unmasks the RX interrupt.
    fn arm_rx_interrupt(&mut self);
    /// Masks the RX interrupt.
    fn disarm_rx_interrupt(&mut self);
    /// Sleeps until the RX interrupt fires or `timeout` passes.
    ///
    /// # Errors
    /// When waiting fails.
    fn wait_rx_interrupt(&self, timeout: Duration) -> Result<bool, PollError>;
}

/// How a queue is waited on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Busy-poll always: lowest latency, one core always busy.
    AlwaysPoll,
    /// Busy-poll `idle_polls` empty bursts, then sleep on the interrupt.
    Hybrid {
        /// Empty polls before sleeping.
        idle_polls: u32,
    },
}

impl Default for PollMode {
    fn default() -> Self {
        Self::Hybrid { idle_polls: 10_000 }
    }
}

/// Counters of a [`Poller`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// Bursts that returned frames.
    pub busy_polls: u64,
    /// Bursts that returned nothing.
    pub empty_polls: u64,
    /// Times the poller slept on the interrupt.
    pub sleeps: u64,
    /// Sleeps ended by the interrupt (not the timeout).
    pub wakeups: u64,
}

/// Receives with a [`PollMode`].
#[derive(Debug, Default)]
pub struct Poller {
    mode: PollMode,
    idle: u32,
    stats: PollStats,
}

impl Poller {
    /// A poller in `mode`. For [`PollMode::Hybrid`] call
    /// [`RxInterrupts::enable_rx_interrupt`] on the device first.
    pub fn new(mode: PollMode) -> Self {
        Self {
            mode,
            idle: 0,
            stats: PollStats::default(),
        }
    }

    /// The poller's counters.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// Receives up to `max` frames into `out`, waiting at most `timeout`
    /// for the first; returns how many (0 on timeout).
    ///
    /// # Errors
    /// When sleeping on the interrupt fails.
    pub fn recv<D: RxInterrupts>(
        &mut self,
        dev: &mut D,
        out: &mut Vec<PacketBuf>,
        max: usize,
        timeout: Duration,
    ) -> Result<usize, PollError> {
        let deadline = Instant::now() + timeout;
        let mut spins = 0u32;
        loop {
            let n = dev.rx_burst(out, max);
            if n > 0 {
                self.stats.busy_polls += 1;
                self.idle = 0;
                return Ok(n);
            }
            self.stats.empty_polls += 1;
            self.idle = self.idle.saturating_add(1);
            if let PollMode::Hybrid { idle_polls } = self.mode
                && self.idle >= idle_polls
            {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(0);
                }
                dev.arm_rx_interrupt();
                // A frame that landed before the unmask raised no interrupt:
                // look once more before sleeping.
                let n = dev.rx_burst(out, max);
                if n > 0 {
                    dev.disarm_rx_interrupt();
                    self.stats.busy_polls += 1;
                    self.idle = 0;
                    return Ok(n);
                }
                self.stats.sleeps += 1;
                let fired = dev.wait_rx_interrupt(left);
                dev.disarm_rx_interrupt();
                if fired? {
                    self.stats.wakeups += 1;
                }
                self.idle = 0;
                continue;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && Instant::now() >= deadline {
                return Ok(0);
            }
            std::hint::spin_loop();
        }
    }
}
