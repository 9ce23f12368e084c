//! `vfplane-agent run`: reconcile whenever the state file or the node
//! changes, and on a slow timer as a safety net.
//!
//! Change sources:
//! - the kernel's uevents (`NETLINK_KOBJECT_UEVENT`): VFs created or removed
//!   and drivers bound or unbound all emit one, so a change made behind the
//!   agent's back is seen at once (sysfs itself gives no inotify events);
//! - the state file's size and modification time, checked every 200 ms
//!   (works across editors' rename-into-place and ConfigMap symlink swaps);
//! - a periodic resync (`--resync-seconds`).
//!
//! Events are debounced for 100 ms, so a burst (making 7 VFs emits dozens of
//! uevents) costs one pass. Our own writes emit uevents too; the pass they
//! cause finds nothing to do and writes nothing, so the loop settles.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_KOBJECT_UEVENT};
use vfplane_proto::node_state::{NodeStateSpec, StateFile};
use vfplane_proto::vf_state;

use crate::netlink::VfLinkControl;
use crate::reconcile::{ApplyReport, Reconciler};

/// Why a pass happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The first pass.
    Start,
    /// The state file changed.
    StateFile,
    /// The kernel reported a device change.
    Uevent,
    /// The resync timer.
    Resync,
}

/// Options of the loop.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The desired state.
    pub state_file: PathBuf,
    /// Where the status goes (JSON).
    pub status_file: Option<PathBuf>,
    /// Where the pool config goes (YAML).
    pub pool_config: Option<PathBuf>,
    /// Where per-VF files for the device plugin go (MACs).
    pub state_dir: Option<PathBuf>,
    /// Time between passes when nothing happens.
    pub resync: Duration,
}

/// Reads the state file.
///
/// # Errors
/// A sentence naming the file and, for bad YAML, the line.
pub fn read_state_file(path: &Path) -> Result<NodeStateSpec, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read state file {}: {e}", path.display()))?;
    StateFile::from_yaml(&text)
        .map(|f| f.spec)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a pass's status, pool config, and the MAC of every pooled VF in
/// the state dir (`proto::vf_state`, read by the device plugin for the
/// `_INFO` variable), where asked.
///
/// # Errors
/// The first write that fails.
pub fn publish(
    report: &ApplyReport,
    status_file: Option<&Path>,
    pool_config: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<(), String> {
    if let Some(dir) = state_dir {
        for vf in report
            .status
            .pfs
            .iter()
            .flat_map(|pf| &pf.vfs)
            .filter(|vf| vf.pool.is_some())
        {
            let Ok(address) = vf.pci_address.parse() else {
                continue;
            };
            let have = vf_state::read_vf_mac(dir, address).ok().flatten();
            if have.as_deref() != vf.mac.as_deref() {
                vf_state::write_vf_mac(dir, address, vf.mac.as_deref())
                    .map_err(|e| format!("writing the MAC of {address} under {}: {e}", dir.display()))?;
            }
        }
    }
    if let Some(path) = status_file {
        let json = serde_json::to_string_pretty(&report.status).map_err(|e| e.to_string())?;
        crate::files::write_if_changed(path, &(json + "\n")).map_err(|e| e.to_string())?;
    }
    if let Some(path) = pool_config {
        let yaml = report.pools.to_yaml().map_err(|e| e.to_string())?;
        crate::files::write_if_changed(path, &yaml).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs until the process is killed. A state file that does not parse keeps
/// the last good spec in force and is reported in the status.
pub fn run<N: VfLinkControl>(reconciler: &Reconciler<N>, options: &RunOptions) -> ! {
    let (tx, rx) = mpsc::channel();
    spawn_uevent_listener(tx.clone());
    spawn_file_watcher(options.state_file.clone(), tx);
    let mut last_good: Option<NodeStateSpec> = None;
    let mut trigger = Trigger::Start;
    loop {
        let started = Instant::now();
        let (spec, file_error) = match read_state_file(&options.state_file) {
            Ok(spec) => {
                last_good = Some(spec.clone());
                (Some(spec), None)
            }
            Err(error) => (last_good.clone(), Some(error)),
        };
        if let Some(spec) = spec {
            let mut report = reconciler.apply(&spec);
            if let Some(error) = &file_error {
                let message = format!("{error}; the last good state is kept");
                report.errors.insert(0, message.clone());
                report.status.last_sync_error = Some(message);
            }
            if let Err(error) = publish(
                &report,
                options.status_file.as_deref(),
                options.pool_config.as_deref(),
                options.state_dir.as_deref(),
            ) {
                tracing::error!(%error, "cannot write status or pool config");
            }
            tracing::info!(?trigger, converged = report.converged, errors = ?report.errors, took = ?started.elapsed(), "pass done");
        } else if let Some(error) = file_error {
            tracing::error!(%error, "no valid state yet; waiting for the state file");
        }
        trigger = match rx.recv_timeout(options.resync) {
            Ok(first) => {
                // Debounce: take everything that arrives within 100 ms.
                let mut last = first;
                while let Ok(next) = rx.recv_timeout(Duration::from_millis(100)) {
                    last = next;
                }
                last
            }
            Err(RecvTimeoutError::Timeout) => Trigger::Resync,
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(options.resync);
                Trigger::Resync
            }
        };
    }
}

fn spawn_uevent_listener(tx: Sender<Trigger>) {
    std::thread::spawn(move || {
        let socket = Socket::new(NETLINK_KOBJECT_UEVENT).and_then(|mut socket| {
            socket.bind(&SocketAddr::new(0, 1))?;
            Ok(socket)
        });
        let socket = match socket {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "no uevent socket: changes behind the agent's back are seen at the next resync");
                return;
            }
        };
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(error) => {
                    tracing::warn!(%error, "uevent socket failed");
                    return;
                }
            };
            if is_relevant_uevent(&buf[..read.min(buf.len())]) && tx.send(Trigger::Uevent).is_err() {
                return;
            }
        }
    });
}

/// A uevent about a PCI device, a network interface or a VFIO group.
fn is_relevant_uevent(message: &[u8]) -> bool {
    message
        .split(|&b| b == 0)
        .any(|field| matches!(field, b"SUBSYSTEM=pci" | b"SUBSYSTEM=net" | b"SUBSYSTEM=vfio"))
}

fn spawn_file_watcher(path: PathBuf, tx: Sender<Trigger>) {
    std::thread::spawn(move || {
        let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
            let meta = std::fs::metadata(p).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        };
        let mut last = stamp(&path);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = stamp(&path);
            if now != last {
                last = now;
                if tx.send(Trigger::StateFile).is_err() {
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uevent_filter_takes_pci_net_and_vfio() {
        assert!(is_relevant_uevent(
            b"add@/devices/pci0000:00/0000:00:12.0\0ACTION=add\0SUBSYSTEM=pci\0"
        ));
        assert!(is_relevant_uevent(b"bind@/x\0SUBSYSTEM=vfio\0"));
        assert!(!is_relevant_uevent(b"change@/x\0SUBSYSTEM=block\0"));
        assert!(!is_relevant_uevent(b"SUBSYSTEM=pcie"));
    }

    #[test]
    fn publish_writes_macs_of_pooled_vfs_only() {
        use vfplane_proto::node_state::{NodeStateStatus, PfStatus, VfStatus};
        let dir = tempfile::tempdir().unwrap();
        let vf = |index: u16, pool: Option<&str>| VfStatus {
            index,
            pci_address: format!("0000:00:12.{}", index * 2),
            mac: Some(format!("02:00:00:00:00:0{index}")),
            pool: pool.map(str::to_owned),
            ..VfStatus::default()
        };
        let status = NodeStateStatus {
            pfs: vec![PfStatus {
                vfs: vec![vf(0, Some("fast")), vf(1, None)],
                ..PfStatus::default()
            }],
            ..NodeStateStatus::default()
        };
        let report = ApplyReport {
            status,
            pools: Default::default(),
            converged: true,
            errors: Vec::new(),
        };
        publish(&report, None, None, Some(dir.path())).unwrap();
        let read = |a: &str| vf_state::read_vf_mac(dir.path(), a.parse().unwrap()).unwrap();
        assert_eq!(read("0000:00:12.0").as_deref(), Some("02:00:00:00:00:00"));
        assert_eq!(read("0000:00:12.2"), None);
    }

    #[test]
    fn state_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        assert!(
            read_state_file(&path)
                .unwrap_err()
                .contains("cannot read state file")
        );
        std::fs::write(&path, "spec:\n  pfs: [\n").unwrap();
        let err = read_state_file(&path).unwrap_err();
        assert!(err.contains("state.yaml") && err.contains("line"), "{err}");
    }
}
