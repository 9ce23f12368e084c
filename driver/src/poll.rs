//! Hybrid polling: busy-poll a queue while frames come, then arm the
//! queue's MSI-X interrupt and sleep until it fires, so an idle queue burns
//! no core and a busy one never waits for an interrupt.
//!
//! Make a poller with [`Poller::for_device`]: it enables the device's RX
//! interrupt for [`PollMode::Hybrid`] and, when that fails (no MSI-X, VFIO
//! refuses the eventfd), falls back to [`PollMode::AlwaysPoll`]. The
//! fallback is never silent: it is logged, [`Poller::fallback`] says what
//! was asked for and why it could not be had, and [`PollStats::mode`] is
//! the mode in use.
//!
//! # Sleeping and waking
//! After `idle_polls` empty bursts the poller
//! 1. discards interrupts left over from before (an eventfd count from an
//!    interrupt that fired after the last wake; a cause the device latched
//!    while the vector was masked),
//! 2. unmasks the vector and looks at the ring once more (a frame that
//!    landed before the unmask raised no interrupt),
//! 3. sleeps until the interrupt or the caller's deadline, and masks the
//!    vector again.
//!
//! A wake by the interrupt goes back to busy polling; a sleep that ended at
//! the deadline leaves the poller idle, so the next call sleeps again after
//! one look at the ring instead of spinning `idle_polls` times first. A
//! wake whose next burst finds nothing is counted as spurious
//! ([`PollStats::spurious_wakeups`]).

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

    /// Forgets interrupts that fired before now (without blocking); returns
    /// whether there were any.
    fn discard_pending(&self) -> bool;
}

/// A device whose receive queue can raise an interrupt.
pub trait RxInterrupts: NicDevice {
    /// Sets up the RX queue's interrupt (vector, throttling, host eventfd).
    ///
    /// # Errors
    /// When the device or VFIO cannot.
    fn enable_rx_interrupt(&mut self) -> Result<(), PollError>;
    /// Unmasks the RX interrupt, after discarding any interrupt that fired
    /// or was latched before (so only a frame from now on wakes a sleep).
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

/// Counters of a [`Poller`], and the mode it runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollStats {
    /// The mode in use (after any fallback; see [`Poller::fallback`]).
    pub mode: PollMode,
    /// Bursts that returned frames.
    pub busy_polls: u64,
    /// Bursts that returned nothing.
    pub empty_polls: u64,
    /// Times the poller slept on the interrupt.
    pub sleeps: u64,
    /// Sleeps ended by the interrupt (not the timeout).
    pub wakeups: u64,
    /// Wakeups whose next burst found no frame.
    pub spurious_wakeups: u64,
}

/// Why a [`Poller`] does not run in the mode it was asked for.
#[derive(Debug)]
pub struct PollFallback {
    /// The mode asked for.
    pub requested: PollMode,
    /// Why the device's interrupt could not be enabled.
    pub reason: PollError,
}

/// Receives with a [`PollMode`].
#[derive(Debug, Default)]
pub struct Poller {
    mode: PollMode,
    idle: u32,
    /// The last sleep ended by the interrupt and no burst ran since.
    woken: bool,
    stats: PollStats,
    fallback: Option<PollFallback>,
}

impl Poller {
    /// A poller in `mode`, for a device whose interrupt the caller set up:
    /// for [`PollMode::Hybrid`] call [`RxInterrupts::enable_rx_interrupt`]
    /// on the device first (or use [`Poller::for_device`], which does and
    /// falls back when it fails).
    pub fn new(mode: PollMode) -> Self {
        Self {
            mode,
            idle: 0,
            woken: false,
            stats: PollStats {
                mode,
                ..PollStats::default()
            },
            fallback: None,
        }
    }

    /// A poller for `dev` in `mode`. For [`PollMode::Hybrid`] it enables
    /// the device's RX interrupt; when that fails the poller busy-polls
    /// ([`PollMode::AlwaysPoll`]) and keeps the reason.
    ///
    /// # Guarantees
    /// Never fails and never falls back silently: a fallback is logged at
    /// `warn`, [`Poller::fallback`] returns the mode asked for and the
    /// error, and [`PollStats::mode`] reads [`PollMode::AlwaysPoll`].
    pub fn for_device<D: RxInterrupts>(dev: &mut D, mode: PollMode) -> Self {
        if !matches!(mode, PollMode::Hybrid { .. }) {
            return Self::new(mode);
        }
        match dev.enable_rx_interrupt() {
            Ok(()) => Self::new(mode),
            Err(reason) => {
                tracing::warn!(
                    driver = dev.driver_name(),
                    requested = ?mode,
                    error = %crate::error_chain(&reason),
                    "cannot enable the RX interrupt: busy polling instead of hybrid polling"
                );
                let mut poller = Self::new(PollMode::AlwaysPoll);
                poller.fallback = Some(PollFallback {
                    requested: mode,
                    reason,
                });
                poller
            }
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> PollMode {
        self.mode
    }

    /// Why the poller busy-polls though hybrid polling was asked for;
    /// `None` when it runs in the mode asked for.
    pub fn fallback(&self) -> Option<&PollFallback> {
        self.fallback.as_ref()
    }

    /// The poller's counters.
    pub fn stats(&self) -> PollStats {
        self.stats
    }

    /// Counts a burst's outcome; true when it returned frames.
    fn counted(&mut self, n: usize) -> bool {
        let woken = std::mem::take(&mut self.woken);
        if n > 0 {
            self.stats.busy_polls += 1;
            self.idle = 0;
            return true;
        }
        self.stats.empty_polls += 1;
        if woken {
            self.stats.spurious_wakeups += 1;
        }
        self.idle = self.idle.saturating_add(1);
        false
    }

    /// Looks once, without waiting: up to `max` frames into `out`, counted
    /// in [`Self::stats`] as a busy or an empty poll. For a program that
    /// runs its own loop and does other work between looks; it never
    /// sleeps, whatever the mode.
    pub fn poll<D: NicDevice>(&mut self, dev: &mut D, out: &mut Vec<PacketBuf>, max: usize) -> usize {
        let n = dev.rx_burst(out, max);
        self.counted(n);
        n
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
            if self.counted(n) {
                return Ok(n);
            }
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
                    self.counted(n);
                    return Ok(n);
                }
                self.stats.sleeps += 1;
                let fired = dev.wait_rx_interrupt(left);
                dev.disarm_rx_interrupt();
                if fired? {
                    self.stats.wakeups += 1;
                    self.woken = true;
                    // Traffic again: busy-poll before the next sleep.
                    self.idle = 0;
                } else {
                    // The deadline: still idle, so the next call sleeps
                    // again after one look instead of spinning first.
                    return Ok(0);
                }
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
