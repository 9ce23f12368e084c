//! `vfplane-agent run`: reconcile whenever the desired state or the node
//! changes, and on a slow timer as a safety net.
//!
//! The desired state comes from a [`DesiredStateSource`] ([`crate::source`]): the state file
//! ([`StateFileSource`]) or the node's `NodeState` object
//! ([`crate::kube_source::KubeSource`]). The loop is the same for both:
//! the source says what to apply (or to wait and leave the host alone), the
//! [`Reconciler`] applies it, the files are written, and the source gets the
//! status back (the kube source writes it to the API server, in the
//! background: the loop never waits on the network).
//!
//! Change sources:
//! - the kernel's uevents (`NETLINK_KOBJECT_UEVENT`): VFs created or removed
//!   and drivers bound or unbound all emit one, so a change made behind the
//!   agent's back is seen at once (sysfs itself gives no inotify events);
//! - the desired state source: the state file's size and modification time,
//!   checked every 200 ms (works across editors' rename-into-place and
//!   ConfigMap symlink swaps), or a change of the NodeState's spec;
//! - a periodic resync (`--resync-seconds`).
//!
//! Events are debounced for 100 ms, so a burst (making 7 VFs emits dozens of
//! uevents) costs one pass. Our own writes emit uevents too; the pass they
//! cause finds nothing to do and writes nothing, so the loop settles.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant, SystemTime};

use vfplane_host::error_chain;
use vfplane_proto::node_state::{NodeStateSpec, StateFile};
use vfplane_proto::vf_state;

use crate::attribution::{self, PodResources};
use crate::container::ContainerView;
use crate::netlink::VfLinkControl;
use crate::reconcile::{ApplyReport, Reconciler};
use crate::scrub::{ScrubOutcome, Scrubber};
use crate::source::{Desired, DesiredStateSource, Trigger};

/// The shortest wait before a pass for a released VF's scrub.
const SCRUB_RECHECK_MIN: Duration = Duration::from_millis(200);

/// The state file as a source: read at every pass; a file that stops
/// parsing keeps the last good spec in force, reported in the status.
#[derive(Debug, Clone)]
pub struct StateFileSource {
    path: PathBuf,
    last_good: Option<NodeStateSpec>,
}

impl StateFileSource {
    /// A source reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            last_good: None,
        }
    }
}

impl DesiredStateSource for StateFileSource {
    fn watch(&mut self, tx: Sender<Trigger>) {
        spawn_file_watcher(self.path.clone(), tx);
    }

    fn desired(&mut self) -> Desired {
        match read_state_file(&self.path) {
            Ok(spec) => {
                self.last_good = Some(spec.clone());
                Desired::Apply {
                    spec,
                    generation: None,
                    warning: None,
                }
            }
            Err(error) => match &self.last_good {
                Some(spec) => Desired::Apply {
                    spec: spec.clone(),
                    generation: None,
                    warning: Some(format!("{}; the last good state is kept", error_chain(&error))),
                },
                None => {
                    tracing::error!(error = %error_chain(&error), "no valid state yet; waiting for the state file");
                    Desired::Wait
                }
            },
        }
    }
}

/// Options of the loop.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the status goes (JSON).
    pub status_file: Option<PathBuf>,
    /// Where the pool config goes (YAML).
    pub pool_config: Option<PathBuf>,
    /// Where per-VF files for the device plugin go (MACs).
    pub state_dir: Option<PathBuf>,
    /// Time between passes when nothing happens.
    pub resync: Duration,
    /// The kubelet's pod-resources API, to write who holds each VF into
    /// the status (`None`: owners are not reported).
    pub pod_resources: Option<std::sync::Arc<PodResources>>,
    /// Scrubs VFs released by their containers (`None`: no scrubs; the
    /// device plugin then refuses a VF it handed out once).
    pub scrubber: Option<std::sync::Arc<Scrubber>>,
    /// Completes each owner with its container (pod UID, limits); needs
    /// `pod_resources`.
    pub containers: Option<ContainerView>,
    /// Follows every pass and scrub (`None`: no metrics).
    pub metrics: Option<std::sync::Arc<crate::metrics::AgentMetrics>>,
}

/// Why the state file gave no spec.
#[derive(Debug, thiserror::Error)]
pub enum ReadStateError {
    /// The file cannot be read.
    #[error("cannot read state file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not a NodeState document.
    #[error("state file {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        #[source]
        source: vfplane_proto::node_state::StateFileError,
    },
}

/// Why a pass's files could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A VF's MAC file in the state directory.
    #[error("cannot write the MAC of {address} under {}", dir.display())]
    Mac {
        /// The VF.
        address: vfplane_host::PciAddress,
        /// The state directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The status or pool config file.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The status or pool config did not serialize (a bug).
    #[error("cannot serialize the {what}: {message}")]
    Serialize {
        /// `status` or `pool config`.
        what: &'static str,
        /// The serializer's message.
        message: String,
    },
}

/// Reads the state file.
///
/// # Errors
/// [`ReadStateError`], naming the file and, for bad YAML, the line.
pub fn read_state_file(path: &Path) -> Result<NodeStateSpec, ReadStateError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReadStateError::Read {
        path: path.to_owned(),
        source,
    })?;
    StateFile::from_yaml(&text)
        .map(|f| f.spec)
        .map_err(|source| ReadStateError::Parse {
            path: path.to_owned(),
            source,
        })
}

/// Writes a pass's status, pool config, and the MAC of every pooled VF in
/// the state dir (`proto::vf_state`, read by the device plugin for the
/// `_INFO` variable), where asked.
///
/// # Errors
/// [`PublishError`] for the first write that fails.
pub fn publish(
    report: &ApplyReport,
    status_file: Option<&Path>,
    pool_config: Option<&Path>,
    state_dir: Option<&Path>,
) -> Result<(), PublishError> {
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
                vf_state::write_vf_mac(dir, address, vf.mac.as_deref()).map_err(|source| {
                    PublishError::Mac {
                        address,
                        dir: dir.to_owned(),
                        source,
                    }
                })?;
            }
        }
    }
    let write = |path: &Path, text: &str| {
        crate::files::write_if_changed(path, text).map_err(|source| PublishError::Write {
            path: path.to_owned(),
            source,
        })
    };
    if let Some(path) = status_file {
        let json = serde_json::to_string_pretty(&report.status).map_err(|e| PublishError::Serialize {
            what: "status",
            message: e.to_string(),
        })?;
        write(path, &(json + "\n"))?;
    }
    if let Some(path) = pool_config {
        let yaml = report.pools.to_yaml().map_err(|e| PublishError::Serialize {
            what: "pool config",
            message: e.to_string(),
        })?;
        write(path, &yaml)?;
    }
    Ok(())
}

/// Runs until the process is killed: one pass at start, then one per
/// (debounced) trigger.
pub fn run<N: VfLinkControl, S: DesiredStateSource>(
    reconciler: &Reconciler<N>,
    source: &mut S,
    options: &RunOptions,
) -> ! {
    let (tx, rx) = mpsc::channel();
    spawn_uevent_listener(tx.clone());
    if let Some(client) = &options.pod_resources {
        attribution::spawn_owner_watch(PodResources::clone(client), tx.clone());
    }
    if let Some(view) = &options.containers {
        spawn_records_watcher(view.records_dir.clone(), tx.clone());
    }
    if let Some(scrubber) = &options.scrubber {
        spawn_marks_watcher(scrubber.state_dir().to_path_buf(), tx.clone());
    }
    serve(reconciler, source, options, tx, &rx)
}

/// The agent's loop without the host's own watchers (uevents, the kubelet,
/// records, marks): the source's watch sending to `tx`, a pass at start,
/// after every trigger on `rx` and at each resync. [`run`] is this with the
/// watchers; a simulated node (the scale bench's fleet) is this alone.
pub fn serve<N: VfLinkControl, S: DesiredStateSource>(
    reconciler: &Reconciler<N>,
    source: &mut S,
    options: &RunOptions,
    tx: mpsc::Sender<Trigger>,
    rx: &mpsc::Receiver<Trigger>,
) -> ! {
    source.watch(tx);
    let mut trigger = Trigger::Start;
    loop {
        pass(reconciler, source, options, trigger);
        // A released VF waiting for its grace time or its last process is
        // looked at again soon, not at the next resync.
        let wait = options
            .scrubber
            .as_ref()
            .and_then(|scrubber| scrubber.next_due())
            .map_or(options.resync, |due| {
                options.resync.min(due.max(SCRUB_RECHECK_MIN))
            });
        trigger = next_trigger(rx, wait);
    }
}

/// One pass of the loop: asks the source, applies, writes the files and
/// hands the status back to the source. `None` when the source said to
/// wait (nothing on the host or in the files is touched then).
pub fn pass<N: VfLinkControl, S: DesiredStateSource>(
    reconciler: &Reconciler<N>,
    source: &mut S,
    options: &RunOptions,
    trigger: Trigger,
) -> Option<ApplyReport> {
    let started = Instant::now();
    let Desired::Apply {
        spec,
        generation,
        warning,
    } = source.desired()
    else {
        return None;
    };
    let mut report = reconciler.apply(&spec);
    report.status.observed_generation = generation;
    // A kubelet that does not answer leaves every owner unknown for this
    // pass (no owner shown, no scrub); the watcher logs the outage.
    let owners = options.pod_resources.as_ref().and_then(|client| {
        client
            .owners()
            .inspect_err(|error| {
                tracing::debug!(error = %vfplane_host::error_chain(error), "VF owners unknown this pass");
            })
            .ok()
    });
    if options.pod_resources.is_some() {
        let empty = attribution::Owners::new();
        let owners = owners.as_ref().unwrap_or(&empty);
        attribution::annotate(&mut report.status, owners);
        if let Some(view) = &options.containers {
            view.annotate(&mut report.status, owners, &report.pools);
        }
    }
    if let Some(scrubber) = &options.scrubber {
        let outcomes = scrubber.scrub_released(
            reconciler,
            &spec,
            owners.as_ref(),
            options.pod_resources.is_some(),
        );
        for outcome in &outcomes {
            if let Some(metrics) = &options.metrics {
                metrics.observe_scrub(outcome);
            }
            if let ScrubOutcome::Failed { error, .. } = outcome {
                report
                    .errors
                    .push(format!("scrub failed, VF quarantined: {error}"));
            }
        }
        scrubber.annotate(&mut report.status);
    }
    if let Some(warning) = warning {
        report.errors.insert(0, warning.clone());
        report.status.last_sync_error = Some(warning);
    }
    if let Err(error) = publish(
        &report,
        options.status_file.as_deref(),
        options.pool_config.as_deref(),
        options.state_dir.as_deref(),
    ) {
        tracing::error!(error = %error_chain(&error), "cannot write status or pool config");
    }
    source.report_status(&report.status);
    if let Some(metrics) = &options.metrics {
        metrics.observe_pass(&report.status, report.converged);
    }
    tracing::info!(?trigger, converged = report.converged, errors = ?report.errors, took = ?started.elapsed(), "pass done");
    Some(report)
}

/// Waits for the next trigger, debounced: everything that arrives within
/// 100 ms of the first counts as one.
fn next_trigger(rx: &Receiver<Trigger>, resync: Duration) -> Trigger {
    match rx.recv_timeout(resync) {
        Ok(first) => {
            let mut last = first;
            while let Ok(next) = rx.recv_timeout(Duration::from_millis(100)) {
                last = next;
            }
            last
        }
        Err(RecvTimeoutError::Timeout) => Trigger::Resync,
        Err(RecvTimeoutError::Disconnected) => {
            std::thread::sleep(resync);
            Trigger::Resync
        }
    }
}

fn spawn_uevent_listener(tx: Sender<Trigger>) {
    let spawned = vfplane_host::kernel_events::spawn_uevent_listener("vfplane-uevents", move || {
        tx.send(Trigger::Uevent).is_ok()
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no uevent socket: changes behind the agent's back are seen at the next resync");
    }
}

fn spawn_file_watcher(path: PathBuf, tx: Sender<Trigger>) {
    spawn_change_watcher(
        move || {
            let meta = std::fs::metadata(&path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        },
        Trigger::Desired,
        tx,
    );
}

/// Watches the OCI hook's container records: the kubelet lists a VF's
/// owner at `Allocate`, before the container (and its record) exists, so
/// the pass that completes the owner with its container runs when the
/// record appears, not at the next resync.
fn spawn_records_watcher(dir: PathBuf, tx: Sender<Trigger>) {
    spawn_change_watcher(
        move || {
            let mut stamps: Vec<(std::ffi::OsString, Option<SystemTime>)> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .map(|e| (e.file_name(), e.metadata().ok().and_then(|m| m.modified().ok())))
                        .collect()
                })
                .unwrap_or_default();
            stamps.sort();
            stamps
        },
        Trigger::Containers,
        tx,
    );
}

/// Watches the VFs' handed-out marks: a VF the DRA driver marks released
/// (the kubelet unprepared its claim) is scrubbed at once, with no other
/// event to start the pass (no uevent, and the kubelet's pod-resources
/// never listed it). And a DRA claim's VF settings: the driver waits for
/// the agent to write them before the claim's pod starts.
fn spawn_marks_watcher(dir: PathBuf, tx: Sender<Trigger>) {
    spawn_change_watcher(
        move || {
            let mut marks: Vec<(String, Option<SystemTime>)> = std::fs::read_dir(&dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .filter(|e| {
                            let name = e.file_name();
                            let name = name.to_string_lossy();
                            name.ends_with(vf_state::HANDED_OUT_SUFFIX)
                                || name.ends_with(vfplane_proto::vf_config::CLAIM_CONFIG_SUFFIX)
                        })
                        .map(|e| {
                            (
                                e.file_name().to_string_lossy().into_owned(),
                                e.metadata().ok().and_then(|m| m.modified().ok()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            marks.sort();
            marks
        },
        Trigger::Marks,
        tx,
    );
}

/// Sends `trigger` whenever `stamp()` changes, looked at every 200 ms,
/// until the loop is gone.
fn spawn_change_watcher<T: PartialEq + Send + 'static>(
    stamp: impl Fn() -> T + Send + 'static,
    trigger: Trigger,
    tx: Sender<Trigger>,
) {
    std::thread::spawn(move || {
        let mut last = stamp();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = stamp();
            if now != last {
                last = now;
                if tx.send(trigger).is_err() {
                    return;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::fake::FakeNetlink;

    #[test]
    fn a_new_or_removed_container_record_triggers_a_pass() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (tx, rx) = mpsc::channel();
        spawn_records_watcher(dir.path().to_owned(), tx);
        std::thread::sleep(Duration::from_millis(300));
        assert!(rx.try_recv().is_err(), "nothing changed yet");
        std::fs::write(dir.path().join("c1.json"), "{}").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).ok(),
            Some(Trigger::Containers)
        );
        std::fs::remove_file(dir.path().join("c1.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).ok(),
            Some(Trigger::Containers)
        );
    }

    #[test]
    fn a_mark_written_or_removed_triggers_a_pass_and_other_files_do_not() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (tx, rx) = mpsc::channel();
        spawn_marks_watcher(dir.path().to_owned(), tx);
        std::thread::sleep(Duration::from_millis(300));
        let vf: vfplane_host::PciAddress = "0000:00:12.0".parse().unwrap_or_else(|e| panic!("{e}"));
        vf_state::write_vf_mac(dir.path(), vf, Some("02:00:00:00:00:01")).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            rx.recv_timeout(Duration::from_millis(600)).is_err(),
            "a MAC file is no mark"
        );
        vf_state::mark_released(dir.path(), vf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)).ok(), Some(Trigger::Marks));
        vf_state::clear_handed_out(dir.path(), vf).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rx.recv_timeout(Duration::from_secs(2)).ok(), Some(Trigger::Marks));
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
    fn state_file_source_waits_then_applies_and_keeps_the_last_good_spec() {
        use vfplane_host::fake::{FakeDevice, FakeSysfs};
        const PF: &str = "0000:00:02.0";
        let fake = FakeSysfs::new().unwrap();
        fake.add_pf(&FakeDevice::igb_pf(PF.parse().unwrap()), 7, "eth0")
            .unwrap();
        fake.add_vfs(PF.parse().unwrap(), 4, Some(4), -1).unwrap();
        let numvfs = || fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap();
        let reconciler = Reconciler::new(
            fake.host(),
            FakeNetlink::default(),
            "node-1",
            fake.sysfs_root().join("no-proc"),
        );
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        let options = RunOptions {
            status_file: Some(dir.path().join("out/status.json")),
            pool_config: Some(dir.path().join("out/pools.yaml")),
            state_dir: None,
            resync: Duration::from_secs(30),
            pod_resources: None,
            scrubber: None,
            metrics: None,
            containers: None,
        };
        let mut source = StateFileSource::new(&state);

        // No file yet: wait, touch nothing.
        assert_eq!(source.desired(), Desired::Wait);
        assert!(pass(&reconciler, &mut source, &options, Trigger::Start).is_none());
        assert_eq!(numvfs().trim(), "4");
        assert!(!dir.path().join("out").exists());

        std::fs::write(
            &state,
            "spec:\n  pfs: [{pciAddress: \"0000:00:02.0\", numVfs: 2}]\n",
        )
        .unwrap();
        let report = pass(&reconciler, &mut source, &options, Trigger::Desired).unwrap();
        assert!(report.converged, "{:?}", report.errors);
        assert_eq!(numvfs().trim(), "2");
        assert_eq!(report.status.observed_generation, None);
        assert!(dir.path().join("out/status.json").exists());

        // A file that stops parsing: the last good spec, with the reason first.
        std::fs::write(&state, "spec:\n  pfs: [\n").unwrap();
        let Desired::Apply {
            spec,
            generation,
            warning,
        } = source.desired()
        else {
            panic!("the last good spec should stay in force");
        };
        assert_eq!(spec.pfs[0].num_vfs, 2);
        assert_eq!(generation, None);
        let warning = warning.unwrap();
        assert!(
            warning.contains("state.yaml") && warning.ends_with("the last good state is kept"),
            "{warning}"
        );
        let report = pass(&reconciler, &mut source, &options, Trigger::Desired).unwrap();
        // The node still matches the spec in force; the file's problem is
        // reported as the first error and the last sync error.
        assert!(report.converged);
        assert_eq!(numvfs().trim(), "2");
        assert!(
            report.errors[0].ends_with("the last good state is kept"),
            "{:?}",
            report.errors
        );
        assert_eq!(
            report.status.last_sync_error.as_deref(),
            Some(report.errors[0].as_str())
        );
    }

    #[test]
    fn state_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        let err = error_chain(&read_state_file(&path).unwrap_err());
        assert!(
            err.starts_with(&format!("cannot read state file {}: ", path.display())),
            "{err}"
        );
        std::fs::write(&path, "spec:\n  pfs: [\n").unwrap();
        let err = error_chain(&read_state_file(&path).unwrap_err());
        assert!(
            err.starts_with(&format!("state file {}: state file line ", path.display())),
            "{err}"
        );
    }
}
