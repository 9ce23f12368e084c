//! The scanner thread: keeps every pool's device view current.
//!
//! # Events first, a slow probe as the safety net
//!
//! The kubelet must hear of a health change within 100 ms. Most of what
//! decides health lives in sysfs (driver links, IOMMU group members, PF
//! `operstate`/`carrier`, device directories), and sysfs sends no inotify
//! events for changes the kernel makes. The kernel says so another way:
//! uevents (a VF bound, unbound, created, removed) and rtnetlink link
//! messages (a PF's carrier), which `plugin` listens to
//! ([`vfplane_host::kernel_events`]) and turns into `ScanCommand::Scan`;
//! inotify covers `/dev/vfio` (a VFIO group node created or removed: probed
//! at once, then a discovery) and the VF state directory the agent writes.
//! A probe is cheap: only the pool members, one `readlink` of each VF's
//! `driver` link (a `stat` more when there is none), one listing each of
//! `/dev/vfio`, the VF state directory and the PCI devices, and two small
//! reads per PF netdev (`operstate`, `carrier`); IOMMU groups come from
//! discovery (a group changes only when a PCI device comes or goes, which
//! the device listing catches). On a 256-VF fake tree that is about 2 ms.
//! Commands queued while a probe runs are served by the next one, so a
//! burst of events costs one or two probes. Every `rescan_interval` (1 s by
//! default, at a fixed rate) a probe runs anyway: the safety net for what
//! sends no event, and the only source on a fake tree.
//!
//! The expensive full discovery (every PF and VF, for membership) runs only
//! when the list of PCI devices changed (one directory listing per tick), a
//! `/dev/vfio` node came or went, the config changed, or once per
//! `discovery_interval` (30 s) as a safety net for changes nothing signals
//! (a `driver_override` written).
//!
//! It runs on its own OS thread so that sysfs reads never stall the async
//! runtime serving Allocate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use vfplane_host::PciAddress;
use vfplane_proto::pool::{PoolConfig, ResourceApi};

use crate::cdi::CdiEntry;
use crate::inventory::{Inventory, PoolView};
use crate::metrics::bump;
use crate::server::{NodeContext, PoolShared};

/// What the scanner is asked to do.
#[derive(Debug)]
pub(crate) enum ScanCommand {
    /// A new config and the pools that serve it; `done` is answered after
    /// the first scan under it was published.
    Config {
        config: PoolConfig,
        pools: BTreeMap<String, Arc<PoolShared>>,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// Something health-related changed (an inotify event): scan now.
    Scan,
    /// Something membership-related changed: discover, then scan, now.
    Discover,
    /// End the thread.
    Stop,
}

/// How soon after a change of the PCI device list discovery looks again.
const FOLLOW_UP: Duration = Duration::from_millis(200);

/// Timing of the scanner.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScanTiming {
    pub rescan: Duration,
    pub discovery: Duration,
}

pub(crate) fn run(
    mut inventory: Inventory,
    commands: Receiver<ScanCommand>,
    node: Arc<NodeContext>,
    timing: ScanTiming,
) {
    let mut pools: BTreeMap<String, Arc<PoolShared>> = BTreeMap::new();
    let mut last_discovery = Instant::now();
    let mut next_tick = Instant::now();
    let mut last_conflicts: Vec<String> = Vec::new();
    let mut last_cdi_error: Option<String> = None;
    let mut follow_up: Option<Instant> = None;
    loop {
        let mut discover = false;
        let mut quick_first = false;
        let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        let first = match commands.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
            Ok(command) => Some(command),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Take every command that is already queued: one scan serves them all.
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| commands.try_recv().ok()))
        {
            match command {
                ScanCommand::Stop => return,
                ScanCommand::Scan => {}
                ScanCommand::Discover => {
                    discover = true;
                    // A VFIO node came or went: publish its health now,
                    // before the slower discovery.
                    quick_first = true;
                }
                ScanCommand::Config {
                    config,
                    pools: new_pools,
                    done,
                } => {
                    inventory.set_config(config);
                    pools = new_pools;
                    discover = true;
                    waiting.extend(done);
                }
            }
        }
        let set_changed = inventory.device_set_changed();
        if quick_first && !set_changed {
            let result = inventory.scan();
            for (name, shared) in &pools {
                if let Some(view) = result.views.get(name) {
                    publish(shared, view.clone());
                }
            }
        }
        // Membership must be current before this scan when something
        // changed; the periodic safety-net discovery runs after it, so it
        // never delays a health update.
        let periodic =
            last_discovery.elapsed() >= timing.discovery || follow_up.is_some_and(|at| Instant::now() >= at);
        if discover || set_changed {
            discover_now(&mut inventory, &node, &mut last_conflicts);
            last_discovery = Instant::now();
            // The kernel makes a VF's directory before its `virtfn`/`physfn`
            // links: look again shortly in case this saw one half made.
            follow_up = set_changed.then(|| Instant::now() + FOLLOW_UP);
        }
        let started = Instant::now();
        let mut result = inventory.scan();
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        node.metrics.scan_micros.fetch_add(micros, Ordering::Relaxed);
        bump(&node.metrics.scans);
        *node
            .owners
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(result.owners);
        let mut cdi_devices: BTreeMap<PciAddress, CdiEntry> = BTreeMap::new();
        for (name, shared) in &pools {
            let view = result.views.remove(name).unwrap_or_default();
            let pool = shared.config();
            let dra = pool.resource_api == ResourceApi::Dra;
            cdi_devices.extend(view.devices.iter().filter_map(|d| {
                d.vfio_node.map(|vfio| {
                    // A VF prepared for a claim: its claim's profile.
                    let pool = if dra {
                        crate::dra::pool_for_prepared_vf(&pool, &node.state_dir, d.address)
                    } else {
                        std::borrow::Cow::Borrowed(&*pool)
                    };
                    (d.address, CdiEntry::new(vfio, &pool, d.facts.as_ref()))
                })
            }));
            publish(shared, view);
        }
        {
            let mut edits = node
                .edits
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if **edits != cdi_devices {
                *edits = Arc::new(cdi_devices.clone());
            }
        }
        match node.cdi.update(&cdi_devices) {
            Ok(()) => last_cdi_error = None,
            Err(error) => {
                let message = vfplane_host::error_chain(&error);
                if last_cdi_error.as_ref() != Some(&message) {
                    tracing::error!(error = %message, "cannot write the CDI spec");
                    last_cdi_error = Some(message);
                }
            }
        }
        for done in waiting {
            let _ = done.send(());
        }
        node.scans.send_modify(|n| *n = n.wrapping_add(1));
        if periodic && !(discover || set_changed) {
            discover_now(&mut inventory, &node, &mut last_conflicts);
            last_discovery = Instant::now();
            follow_up = None;
        }
        // The periodic probe keeps a fixed rate (the period does not stretch
        // by the scan's length) and only a due tick moves it: probes started
        // by events must not push the safety net away (they did, one period
        // per event, and a busy node's periodic probe never came).
        if Instant::now() >= next_tick {
            next_tick += timing.rescan;
            if next_tick <= Instant::now() {
                next_tick = Instant::now() + timing.rescan;
            }
        }
    }
}

/// Runs a full discovery, logs new conflicts, counts it.
fn discover_now(inventory: &mut Inventory, node: &NodeContext, last_conflicts: &mut Vec<String>) {
    let started = Instant::now();
    match inventory.discover() {
        Ok(conflicts) => {
            if conflicts != *last_conflicts {
                for conflict in &conflicts {
                    tracing::warn!(conflict = %conflict, "a VF is wanted by several pools");
                }
                *last_conflicts = conflicts;
            }
        }
        Err(error) => tracing::warn!(error = %vfplane_host::error_chain(&error), "discovery failed"),
    }
    bump(&node.metrics.discoveries);
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    node.metrics.discovery_micros.fetch_add(micros, Ordering::Relaxed);
}

/// Puts a pool's new view in place; wakes its streams only when the kubelet
/// would see a difference. Logs every device that changed health.
fn publish(shared: &PoolShared, view: PoolView) {
    let pool = shared.name.as_str();
    shared.view.send_if_modified(|current| {
        let changed = match current.as_deref() {
            None => {
                let (healthy, unhealthy) = view.counts();
                tracing::info!(pool, healthy, unhealthy, "pool devices scanned");
                for device in view.devices.iter().filter(|d| !d.health.is_healthy()) {
                    tracing::warn!(pool, device = %device.address, reasons = %device.health, "device unhealthy");
                }
                true
            }
            Some(old) => {
                log_transitions(pool, old, &view);
                old.differs_for_kubelet(&view)
            }
        };
        *current = Some(Arc::new(view));
        changed
    });
}

fn log_transitions(pool: &str, old: &PoolView, new: &PoolView) {
    let before: BTreeSet<PciAddress> = old.devices.iter().map(|d| d.address).collect();
    for device in &new.devices {
        match old.get(device.address) {
            None => {
                tracing::info!(pool, device = %device.address, health = %device.health, "device added to the pool")
            }
            Some(previous) if previous.health != device.health => {
                if device.health.is_healthy() {
                    tracing::info!(pool, device = %device.address, "device healthy again");
                } else {
                    tracing::warn!(pool, device = %device.address, reasons = %device.health, "device unhealthy");
                }
            }
            Some(_) => {}
        }
    }
    for address in before {
        if new.get(address).is_none() {
            tracing::info!(pool, device = %address, "device left the pool");
        }
    }
}
