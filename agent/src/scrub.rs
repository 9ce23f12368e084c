//! Scrub on release: a VF that was handed to a container is reset and
//! given back its spec's settings before anyone else gets it.
//!
//! The device plugin marks a VF handed out (`vf_state::mark_handed_out`)
//! before it answers `Allocate`, and refuses a VF that carries a mark. The
//! agent scrubs a marked VF once it is released:
//! - the kubelet's pod-resources `List` names no container holding it (when
//!   the agent reads pod-resources; a kubelet that does not answer stops
//!   every scrub for that pass: not knowing is never "released"),
//! - no process holds its `/dev/vfio/<group>` open (the container's
//!   processes are gone), and
//! - the mark is older than [`GRACE`] (the kubelet records an allocation
//!   a moment after `Allocate` answers), unless the DRA driver wrote it as
//!   released (`vf_state::mark_released`: the kubelet unprepared the claim,
//!   which it does only after the claim's containers stopped).
//!
//! A scrub: state `scrub-pending` (the plugin keeps the VF Healthy to the
//! kubelet and holds an `Allocate` for it until the scrub ends), a
//! function-level reset through sysfs `reset` (given up after
//! [`RESET_TIMEOUT`]: a reset that hangs in the kernel quarantines its VF
//! and does not hold up the agent), the spec's MAC, VLAN,
//! spoof checking, trust, rate and link state written again through the
//! PF where they differ, then a check: the PF reports the spec's settings and the VF's
//! Bus Master Enable bit is clear (it cannot DMA; the reset disabled its
//! queues). Then the state and the mark are removed and the VF is Healthy.
//! A scrub that fails leaves state `scrub-failed` (quarantine: never
//! advertised) and the mark, and is tried again after [`RETRY`]; the
//! status says why.
//!
//! Crash safety: the mark and the state are files, written before the
//! reset and removed after the check, so an agent killed mid-scrub finds
//! the mark at its next start and scrubs again; the plugin refuses the VF
//! the whole time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vfplane_host::{Host, HostError, PCI_COMMAND_BUS_MASTER, PciAddress, error_chain};
use vfplane_proto::node_state::{NodeStateSpec, NodeStateStatus};
use vfplane_proto::vf_health::VfHealth;
use vfplane_proto::vf_state::{self, VfState};

use crate::attribution::Owners;
use crate::netlink::VfLinkControl;
use crate::reconcile::Reconciler;

/// A handed-out mark younger than this is left alone: the kubelet lists the
/// new owner a moment after `Allocate` answered.
pub const GRACE: Duration = Duration::from_secs(10);
/// A failed scrub is tried again after this long.
pub const RETRY: Duration = Duration::from_secs(30);
/// A function reset that has not returned after this long is given up on:
/// the VF is quarantined and the agent goes on. (The kernel itself waits
/// up to a minute for a device that is slow to come back from a reset;
/// one that takes longer than this is not fit to hand out meanwhile.)
pub const RESET_TIMEOUT: Duration = Duration::from_secs(10);
/// A released VF still open by a process is looked at again after this long.
const HOLDER_RECHECK: Duration = Duration::from_secs(1);

/// Why a VF's scrub failed. Each names the VF.
#[derive(Debug, thiserror::Error)]
pub enum ScrubError {
    /// The state dir could not be read or written.
    #[error("VF {address}: cannot update its state under {dir}")]
    StateDir {
        /// The VF.
        address: PciAddress,
        /// The state dir.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The function-level reset failed.
    #[error("VF {address}: the function reset failed")]
    Reset {
        /// The VF.
        address: PciAddress,
        /// The cause.
        #[source]
        source: HostError,
    },
    /// The function reset did not return in time; it may still be stuck
    /// in the kernel.
    #[error("VF {address}: the function reset did not return within {waited:?}")]
    ResetHung {
        /// The VF.
        address: PciAddress,
        /// How long it was given.
        waited: Duration,
    },
    /// A reset started by an earlier scrub has not returned yet: no second
    /// one is started beside it.
    #[error("VF {address}: the function reset started {started:?} ago has not returned yet")]
    ResetStillRunning {
        /// The VF.
        address: PciAddress,
        /// How long ago that reset began.
        started: Duration,
    },
    /// No thread could be started for the reset.
    #[error("VF {address}: cannot start a thread for its function reset")]
    ResetThread {
        /// The VF.
        address: PciAddress,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the spec's settings through the PF failed.
    #[error("VF {address}: restoring its settings through {ifname} failed: {message}")]
    Restore {
        /// The VF.
        address: PciAddress,
        /// The PF's interface.
        ifname: String,
        /// What failed.
        message: String,
    },
    /// The check after the reset found the VF not as the spec wants it.
    #[error("VF {address}: after the reset, {problem}")]
    Check {
        /// The VF.
        address: PciAddress,
        /// What was found.
        problem: String,
    },
}

/// What happened to one marked VF in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubOutcome {
    /// Scrubbed: reset, restored, checked; handed out again from now on.
    Scrubbed {
        /// The VF.
        address: PciAddress,
        /// How long the scrub took.
        took: Duration,
    },
    /// The scrub failed; the VF is quarantined.
    Failed {
        /// The VF.
        address: PciAddress,
        /// Why, as a sentence.
        error: String,
    },
    /// The VF no longer exists: its mark was removed (a VF made again by a
    /// `sriov_numvfs` write comes up reset).
    Vanished {
        /// The VF.
        address: PciAddress,
    },
}

/// What [`Scrubber::consider`] made of one marked VF.
enum Considered {
    /// Scrubbed, failed, or vanished.
    Done(ScrubOutcome),
    /// Released, but not yet to be scrubbed: look again in this long.
    Waiting(Duration),
    /// A container holds it (or its mark went away meanwhile).
    Held,
}

/// The scrubs of one agent: the state dir and the last failure per VF.
#[derive(Debug)]
pub struct Scrubber {
    state_dir: PathBuf,
    retry: Duration,
    reset_timeout: Duration,
    next_due: Mutex<Option<Duration>>,
    failures: Mutex<BTreeMap<PciAddress, Failure>>,
    /// Resets whose thread has not returned, with when each began.
    resets_running: Arc<Mutex<BTreeMap<PciAddress, Instant>>>,
}

#[derive(Debug, Clone)]
struct Failure {
    at: Instant,
    error: String,
}

impl Scrubber {
    /// Scrubs VFs marked in `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            retry: RETRY,
            reset_timeout: RESET_TIMEOUT,
            next_due: Mutex::new(None),
            failures: Mutex::new(BTreeMap::new()),
            resets_running: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Gives a function reset `timeout` instead of [`RESET_TIMEOUT`].
    #[must_use]
    pub fn reset_within(mut self, timeout: Duration) -> Self {
        self.reset_timeout = timeout;
        self
    }

    /// Tries a failed scrub again after `retry` instead of [`RETRY`].
    #[must_use]
    pub fn retry_after(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Scrubs every released VF (see the module doc). `owners` is `None`
    /// when the agent reads pod-resources and the kubelet did not answer:
    /// then nothing is scrubbed. `watch_owners` says whether the agent reads
    /// pod-resources at all.
    pub fn scrub_released<N: VfLinkControl>(
        &self,
        reconciler: &Reconciler<N>,
        spec: &NodeStateSpec,
        owners: Option<&Owners>,
        watch_owners: bool,
    ) -> Vec<ScrubOutcome> {
        if watch_owners && owners.is_none() {
            return Vec::new();
        }
        let marked = match vf_state::handed_out_vfs(&self.state_dir) {
            Ok(marked) => marked,
            Err(error) => {
                tracing::warn!(dir = %self.state_dir.display(), %error, "cannot list handed-out VFs");
                return Vec::new();
            }
        };
        let mut outcomes = Vec::new();
        let mut next_due: Option<Duration> = None;
        for address in marked {
            match self.consider(reconciler, spec, owners, address) {
                Considered::Done(outcome) => outcomes.push(outcome),
                Considered::Waiting(due) => next_due = Some(next_due.map_or(due, |d| d.min(due))),
                Considered::Held => {}
            }
        }
        *lock(&self.next_due) = next_due;
        outcomes
    }

    /// When the soonest released VF the last pass left for later (in its
    /// grace time, still open by a process, or before a retry) is due for
    /// another look; `None` when none waits.
    pub fn next_due(&self) -> Option<Duration> {
        *lock(&self.next_due)
    }

    fn consider<N: VfLinkControl>(
        &self,
        reconciler: &Reconciler<N>,
        spec: &NodeStateSpec,
        owners: Option<&Owners>,
        address: PciAddress,
    ) -> Considered {
        if reconciler
            .host()
            .pci_device(address)
            .is_err_and(|e| e.is_vanished())
        {
            let cleared = vf_state::clear_handed_out(&self.state_dir, address)
                .and_then(|()| vf_state::write_vf_state(&self.state_dir, address, None));
            if let Err(error) = cleared {
                tracing::warn!(%address, %error, "cannot clear the marks of a vanished VF");
            }
            self.lock().remove(&address);
            return Considered::Done(ScrubOutcome::Vanished { address });
        }
        if let Some(owner) = owners.and_then(|o| o.get(&address)) {
            tracing::trace!(%address, %owner, "held: not scrubbed");
            return Considered::Held;
        }
        let Ok(Some(mark)) = vf_state::handed_out(&self.state_dir, address) else {
            return Considered::Held;
        };
        let age = mark.at.elapsed().unwrap_or_default();
        if !mark.released && age < GRACE {
            return Considered::Waiting(GRACE - age);
        }
        if let Some(failure) = self.lock().get(&address)
            && failure.at.elapsed() < self.retry
        {
            return Considered::Waiting(self.retry - failure.at.elapsed());
        }
        match reconciler.vfio_holders(address) {
            Ok(holders) if holders.is_empty() => {}
            Ok(holders) => {
                tracing::debug!(%address, ?holders, "released by the kubelet, still open: scrub waits");
                return Considered::Waiting(HOLDER_RECHECK);
            }
            Err(error) => {
                tracing::warn!(%address, error = %error_chain(&error), "cannot tell whether the VF is still open: scrub waits");
                return Considered::Waiting(HOLDER_RECHECK);
            }
        }
        let started = Instant::now();
        let outcome = match self.scrub(reconciler, spec, address) {
            Ok(()) => {
                self.lock().remove(&address);
                let took = started.elapsed();
                tracing::info!(%address, ?took, "VF scrubbed");
                ScrubOutcome::Scrubbed { address, took }
            }
            Err(error) => {
                let error = error_chain(&error);
                tracing::error!(%address, %error, "scrub failed: the VF is quarantined");
                let _ = vf_state::write_vf_state(&self.state_dir, address, Some(VfState::ScrubFailed));
                self.lock().insert(
                    address,
                    Failure {
                        at: Instant::now(),
                        error: error.clone(),
                    },
                );
                ScrubOutcome::Failed { address, error }
            }
        };
        Considered::Done(outcome)
    }

    /// Reset, restore, check; the state and mark are cleared only when all
    /// three passed.
    fn scrub<N: VfLinkControl>(
        &self,
        reconciler: &Reconciler<N>,
        spec: &NodeStateSpec,
        address: PciAddress,
    ) -> Result<(), ScrubError> {
        let dir = &self.state_dir;
        let state_error = |source| ScrubError::StateDir {
            address,
            dir: dir.clone(),
            source,
        };
        vf_state::write_vf_state(dir, address, Some(VfState::ScrubPending)).map_err(state_error)?;
        // A DRA claim's settings go with the claim (the driver removes
        // them at unprepare; one left by a driver that died between is
        // dropped here): what follows restores the spec's.
        vfplane_proto::vf_config::clear_claim_config(dir, address).map_err(state_error)?;
        self.reset(reconciler.host(), address)?;
        if let Some((ifname, index, want)) = reconciler.spec_of_vf(spec, address) {
            let restore = |message: String| ScrubError::Restore {
                address,
                ifname: ifname.clone(),
                message,
            };
            let read = || -> Result<crate::netlink::VfLinkInfo, ScrubError> {
                let links = reconciler
                    .netlink()
                    .vf_links(&ifname)
                    .map_err(|e| restore(format!("reading its settings: {}", error_chain(&e))))?;
                links
                    .into_iter()
                    .find(|l| l.vf == u32::from(index))
                    .ok_or_else(|| restore(format!("the PF does not report VF {index}")))
            };
            // What differs is written, as the reconcile does: a PF driver
            // refuses settings it does not have (igb: link state), and
            // reports none for them.
            let differences = read()?.differences(&want);
            if !differences.is_empty() {
                tracing::info!(%address, differences = %crate::netlink::VfSetting::list(&differences), "restoring the spec's VF settings");
                reconciler
                    .netlink()
                    .set_vf(&ifname, u32::from(index), &want, &differences)
                    .map_err(|e| restore(error_chain(&e)))?;
            }
            let left = read()?.differences(&want);
            if !left.is_empty() {
                return Err(ScrubError::Check {
                    address,
                    problem: format!(
                        "the PF reports other {} than the spec's",
                        crate::netlink::VfSetting::list(&left)
                    ),
                });
            }
        }
        let command = reconciler
            .host()
            .command_register(address)
            .map_err(|e| ScrubError::Check {
                address,
                problem: format!("its command register cannot be read: {}", error_chain(&e)),
            })?;
        if command & PCI_COMMAND_BUS_MASTER != 0 {
            return Err(ScrubError::Check {
                address,
                problem: format!("Bus Master Enable is still set (command register {command:#06x})"),
            });
        }
        // The state first, the mark last: the device plugin holds an
        // Allocate while either is there, and a VF seen with neither is
        // clean. A crash between the two leaves the mark: scrubbed again.
        vf_state::write_vf_state(dir, address, None).map_err(state_error)?;
        vf_state::clear_handed_out(dir, address).map_err(state_error)?;
        Ok(())
    }

    /// The function reset of `address`, on a thread of its own, waited for
    /// up to the reset timeout. A write to sysfs `reset` that never
    /// returns (a device that does not come back, a kernel lock held
    /// elsewhere) leaves its thread blocked in the kernel, where nothing
    /// can cancel it; the scrub fails instead of the agent stopping, and
    /// no further reset of the VF is started until that one returns.
    fn reset(&self, host: &Host, address: PciAddress) -> Result<(), ScrubError> {
        {
            let mut running = lock(&self.resets_running);
            if let Some(began) = running.get(&address) {
                return Err(ScrubError::ResetStillRunning {
                    address,
                    started: began.elapsed(),
                });
            }
            running.insert(address, Instant::now());
        }
        let (done, answer) = mpsc::sync_channel(1);
        let host = host.clone();
        let running = Arc::clone(&self.resets_running);
        let spawned = std::thread::Builder::new()
            .name(format!("reset {address}"))
            .spawn(move || {
                let result = host.reset_function(address);
                lock(&running).remove(&address);
                // The scrub may have stopped waiting; then nobody listens.
                let _ = done.send(result);
            });
        if let Err(source) = spawned {
            lock(&self.resets_running).remove(&address);
            return Err(ScrubError::ResetThread { address, source });
        }
        match answer.recv_timeout(self.reset_timeout) {
            Ok(result) => result.map_err(|source| ScrubError::Reset { address, source }),
            Err(RecvTimeoutError::Timeout) => {
                tracing::error!(%address, waited = ?self.reset_timeout, "the function reset has not returned; its thread is left to the kernel");
                Err(ScrubError::ResetHung {
                    address,
                    waited: self.reset_timeout,
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(ScrubError::ResetThread {
                address,
                source: std::io::Error::other("the reset's thread ended without an answer"),
            }),
        }
    }

    /// Writes the scrub state of each VF into its health in `status`:
    /// `Scrubbing` while a scrub runs (or was cut short by a crash), and
    /// `Unhealthy: scrub failed: <why>` while quarantined.
    pub fn annotate(&self, status: &mut NodeStateStatus) {
        let failures = self.lock().clone();
        for vf in status.pfs.iter_mut().flat_map(|pf| pf.vfs.iter_mut()) {
            let Ok(address) = vf.pci_address.parse::<PciAddress>() else {
                continue;
            };
            match vf_state::read_vf_state(&self.state_dir, address) {
                Ok(Some(Ok(VfState::ScrubFailed))) => {
                    let why = failures
                        .get(&address)
                        .map_or("reason lost with an agent restart; retried", |f| f.error.as_str());
                    vf.health = VfHealth::Quarantined(why.to_owned());
                }
                Ok(Some(Ok(VfState::ScrubPending))) => vf.health = VfHealth::Scrubbing,
                _ => {}
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PciAddress, Failure>> {
        lock(&self.failures)
    }
}

/// A panic elsewhere while holding one of these locks leaves only records
/// behind that stay valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
