//! The OCI hook the CDI spec names for every VF: `vfplane-oci-hook attach
//! --vf <address> [--device /dev/vfio/<group>] [--memlock <bytes>] [--cpus
//! <list> --mems <list>] [--pids-max <n>] [--records <dir>]`, run by the
//! container runtime (runc) as a `createRuntime` hook. It raises the
//! container's locked-memory limit to its pool's profile (`--memlock`),
//! gives its cgroup the VF's NUMA cpuset (`--cpus`/`--mems`) and the
//! profile's `pids.max` (`--pids-max`), hands the VF's group node in the
//! container to the container's user (`--device`: a container that is
//! not root can open it), and writes the container's record
//! (`vfplane_proto::container_record`: ID, pod UID, cgroup, VFs) for the
//! agent.
//!
//! Why a CDI hook, not an NRI plugin: the plugin already writes the CDI
//! spec each VF is injected from, so the hook travels with the VF to every
//! CDI-aware runtime (containerd 2, CRI-O) with nothing else to install or
//! configure; NRI would need a ttrpc client multiplexing the plugin and
//! runtime services on one socket, which no Rust crate provides.
//!
//! When it runs: runc calls `createRuntime` hooks after it created the
//! container's process (`runc init`, waiting) and applied its cgroups, and
//! before that process executes the container's program. The limit set
//! here on that process is inherited by the program through `execve`, so
//! it holds from the program's first instruction: no race with its first
//! `mmap` or `VFIO_IOMMU_MAP_DMA`. runc sets only the rlimits the OCI spec
//! lists, and containerd's and CRI-O's specs list no RLIMIT_MEMLOCK, so
//! nothing overwrites it afterwards.
//!
//! What it does: reads the container state (OCI runtime spec, "State") on
//! stdin and the container's `config.json` from its bundle; raises
//! RLIMIT_MEMLOCK of its `pid` to at least `<bytes>` (soft and hard; a
//! higher or unlimited limit is kept); writes the cpuset and `pids.max`
//! (a lower `pids.max` already there is kept); changes the owner of the
//! group node. Each is read back, and the hook fails when it does not
//! hold. A failing hook fails the container's creation with this hook's
//! message, so a container never starts with less than its pool's
//! profile. The record is best effort: a record that cannot be written is
//! said on stderr and the container starts (the agent then shows its VF's
//! owner without a pod UID).

use std::io::Read;
use std::path::{Path, PathBuf};

use rustix::process::{Pid, Resource, Rlimit, prlimit};
use serde::Deserialize;

/// The name the hook binary is installed under.
pub const HOOK_BINARY: &str = "vfplane-oci-hook";

/// The part of the OCI state the hook uses.
#[derive(Debug, Deserialize)]
struct OciState {
    /// The container's ID.
    id: String,
    /// The container's first process.
    #[serde(default)]
    pid: Option<i32>,
    /// Its bundle directory (holding `config.json`).
    #[serde(default)]
    bundle: Option<PathBuf>,
    /// Its OCI spec's annotations (the CRI's pod and container names).
    #[serde(default)]
    annotations: std::collections::BTreeMap<String, String>,
}

/// What one run of the hook is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The VF (PCI address) of the CDI device that named the hook.
    pub vf: String,
    /// RLIMIT_MEMLOCK to give the container, in bytes.
    pub memlock: Option<u64>,
    /// `cpuset.cpus` and `cpuset.mems` to give the container's cgroup.
    pub cpuset: Option<(String, String)>,
    /// `pids.max` to give the container's cgroup.
    pub pids_max: Option<u64>,
    /// The VF's VFIO group node in the container (`/dev/vfio/<group>`),
    /// handed to the container's user.
    pub device: Option<String>,
    /// Where container records go.
    pub records: PathBuf,
    /// The cgroup v2 mount the container's `cgroupsPath` is under.
    pub cgroup_root: PathBuf,
}

/// Why one step of the hook (cgroup, device owner, record) failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The OCI spec names no cgroup.
    #[error("the OCI spec has no linux.cgroupsPath")]
    NoCgroupsPath,
    /// A systemd-style cgroup path (`slice:prefix:name`).
    #[error("cgroup path {0:?} is not a cgroupfs path (systemd cgroups are not supported)")]
    NotCgroupfs(String),
    /// The container's cgroup directory is missing.
    #[error("its cgroup {} does not exist", .0.display())]
    NoCgroup(PathBuf),
    /// The OCI spec names no root filesystem.
    #[error("the OCI spec names no root.path")]
    NoRootfs,
    /// A bound beyond what the kernel file takes.
    #[error("{0} is too large")]
    TooLarge(u64),
    /// A cgroup file could not be read or written.
    #[error("{action} {file}")]
    Cgroup {
        /// `reading`, `writing`, `reading back`.
        action: &'static str,
        /// The file.
        file: &'static str,
        /// The cause (boxed: cgroups-rs's error is large).
        #[source]
        source: Box<cgroups_rs::error::Error>,
    },
    /// A file could not be read, written or given to the user.
    #[error("{action} {}", path.display())]
    Io {
        /// What was done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A value that does not read back as written.
    #[error("{file} reads {value} after the write")]
    ReadBack {
        /// The file (or node).
        file: String,
        /// What it reads.
        value: String,
    },
}

/// Why the hook failed. Each message names the container and the limit.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The command line is not `attach --vf <address> [--device
    /// /dev/vfio/<group>] [--memlock <bytes>] [--cpus <list> --mems <list>]
    /// [--pids-max <n>] [--records <dir>] [--cgroup-root <dir>]`.
    #[error(
        "usage: {HOOK_BINARY} attach --vf <address> [--device /dev/vfio/<group>] [--memlock <bytes>] \
         [--cpus <list> --mems <list>] [--pids-max <n>] [--records <dir>] [--cgroup-root <dir>] (got {0:?})"
    )]
    Usage(Vec<String>),
    /// The container's cgroup could not be found or its pids.max set.
    #[error("container {id}: cannot give its cgroup pids.max {pids}")]
    Pids {
        /// The container.
        id: String,
        /// The bound asked for.
        pids: u64,
        /// What went wrong.
        #[source]
        source: Box<StepError>,
    },
    /// The VF's device node in the container could not be given to the
    /// container's user.
    #[error("container {id}: cannot give {device} to its user {uid}:{gid}")]
    DeviceOwner {
        /// The container.
        id: String,
        /// The node, as the container sees it.
        device: String,
        /// The container's user.
        uid: u32,
        /// The container's group.
        gid: u32,
        /// What went wrong.
        #[source]
        source: Box<StepError>,
    },
    /// The container's cgroup could not be found or set.
    #[error("container {id}: cannot give its cgroup cpuset.cpus {cpus:?} and cpuset.mems {mems:?}")]
    Cpuset {
        /// The container.
        id: String,
        /// The CPUs asked for.
        cpus: String,
        /// The memory nodes asked for.
        mems: String,
        /// What went wrong.
        #[source]
        source: Box<StepError>,
    },
    /// stdin did not hold an OCI state.
    #[error("the container state on stdin is not an OCI state")]
    State(#[source] serde_json::Error),
    /// stdin could not be read.
    #[error("cannot read the container state from stdin")]
    Stdin(#[source] std::io::Error),
    /// The state has no pid (the hook ran at a stage without a process).
    #[error("container {id}: the state has no pid; the hook must run as createRuntime")]
    NoPid {
        /// The container.
        id: String,
    },
    /// prlimit refused.
    #[error("container {id}: cannot raise RLIMIT_MEMLOCK of pid {pid} to {bytes} bytes")]
    Set {
        /// The container.
        id: String,
        /// Its process.
        pid: i32,
        /// The limit asked for.
        bytes: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The limit read back is below what was set.
    #[error("container {id}: RLIMIT_MEMLOCK of pid {pid} reads back as {found} after setting {bytes} bytes")]
    Check {
        /// The container.
        id: String,
        /// Its process.
        pid: i32,
        /// The limit asked for.
        bytes: u64,
        /// What `/proc/<pid>/limits` says.
        found: String,
    },
}

/// The hook's command line (after `argv[0]`): `attach --vf <address>
/// [--memlock <bytes>] [--records <dir>]`.
///
/// # Errors
/// [`HookError::Usage`] for anything else.
pub fn parse_args(args: &[String]) -> Result<Attach, HookError> {
    let usage = || HookError::Usage(args.to_vec());
    let (verb, flags) = args.split_first().ok_or_else(usage)?;
    if verb != "attach" || flags.len() % 2 != 0 {
        return Err(usage());
    }
    let mut vf = None;
    let mut memlock = None;
    let mut cpus: Option<String> = None;
    let mut mems: Option<String> = None;
    let mut pids_max = None;
    let mut device = None;
    let mut records = PathBuf::from(vfplane_proto::container_record::DEFAULT_RECORDS_DIR);
    let mut cgroup_root = PathBuf::from("/sys/fs/cgroup");
    for pair in flags.chunks(2) {
        match (pair[0].as_str(), &pair[1]) {
            ("--vf", value) if vf.is_none() => vf = Some(value.clone()),
            ("--memlock", value) if memlock.is_none() => memlock = Some(value.parse().map_err(|_| usage())?),
            ("--cpus", value) if cpus.is_none() && vfplane_host::parse_cpu_list(value).is_some() => {
                cpus = Some(value.clone());
            }
            ("--mems", value) if mems.is_none() && vfplane_host::parse_cpu_list(value).is_some() => {
                mems = Some(value.clone());
            }
            ("--pids-max", value) if pids_max.is_none() => {
                pids_max = Some(value.parse().ok().filter(|n| *n > 0).ok_or_else(usage)?);
            }
            ("--device", value) if device.is_none() && is_vfio_group_node(value) => {
                device = Some(value.clone());
            }
            ("--records", value) => records = PathBuf::from(value),
            ("--cgroup-root", value) => cgroup_root = PathBuf::from(value),
            _ => return Err(usage()),
        }
    }
    let cpuset = match (cpus, mems) {
        (Some(cpus), Some(mems)) => Some((cpus, mems)),
        (None, None) => None,
        _ => return Err(usage()),
    };
    Ok(Attach {
        vf: vf.ok_or_else(usage)?,
        memlock,
        cpuset,
        pids_max,
        device,
        records,
        cgroup_root,
    })
}

/// `/dev/vfio/<group>` or `/dev/vfio/noiommu-<group>`, nothing else (the
/// hook changes the owner of this file only).
fn is_vfio_group_node(path: &str) -> bool {
    path.strip_prefix("/dev/vfio/")
        .map(|name| name.strip_prefix("noiommu-").unwrap_or(name))
        .is_some_and(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()))
}

/// Runs the hook on the container state read from `state`: the limit when
/// asked (an error fails the container), then the record (an error is
/// returned beside success, for stderr).
///
/// # Errors
/// A state that does not parse, or the limit not set.
pub fn run(attach: &Attach, state: impl Read, proc_root: &Path) -> Result<Option<StepError>, HookError> {
    let started = std::time::Instant::now();
    let mut text = String::new();
    let mut state = state;
    state.read_to_string(&mut text).map_err(HookError::Stdin)?;
    let state: OciState = serde_json::from_str(&text).map_err(HookError::State)?;
    let Some(pid) = state.pid.filter(|p| *p > 0) else {
        return Err(HookError::NoPid { id: state.id });
    };
    if let Some(bytes) = attach.memlock {
        raise_memlock(&state.id, pid, bytes, proc_root)?;
    }
    let bundle = Bundle::read(&state);
    if let Some((cpus, mems)) = &attach.cpuset {
        set_cpuset(attach, &state.id, bundle.cgroups_path.as_deref(), cpus, mems)?;
    }
    if let Some(pids) = attach.pids_max {
        set_pids_max(attach, &state.id, bundle.cgroups_path.as_deref(), pids)?;
    }
    if let Some(device) = &attach.device {
        own_device(&state.id, pid, device, &bundle, proc_root)?;
    }
    Ok(record(attach, &state, pid, bundle.cgroups_path, started).err())
}

/// What the hook reads of the container's OCI spec (`config.json` in its
/// bundle); each part absent when the spec does not say it or cannot be
/// read.
#[derive(Debug, Default)]
struct Bundle {
    /// `linux.cgroupsPath`.
    cgroups_path: Option<String>,
    /// `process.user.uid` and `gid`.
    user: Option<(u32, u32)>,
    /// `root.path`, made absolute against the bundle.
    rootfs: Option<PathBuf>,
}

impl Bundle {
    fn read(state: &OciState) -> Self {
        let Some(dir) = state.bundle.as_ref() else {
            return Self::default();
        };
        let Some(config) = std::fs::read(dir.join("config.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        else {
            return Self::default();
        };
        let id = |value: &serde_json::Value| value.as_u64().and_then(|v| u32::try_from(v).ok());
        let user = &config["process"]["user"];
        Self {
            cgroups_path: config["linux"]["cgroupsPath"].as_str().map(str::to_owned),
            user: id(&user["uid"]).map(|uid| (uid, id(&user["gid"]).unwrap_or(0))),
            rootfs: config["root"]["path"].as_str().map(|root| dir.join(root)),
        }
    }
}

/// Gives the VF's group node in the container (`device`) to the
/// container's user, so a program that is not root can open it. The node
/// is the container's own (runc made it in the container's `/dev`, which
/// no other container sees); the node on the host is not touched. It is
/// reached through the container's first process, which at
/// `createRuntime` is in the container's mount namespace and has not yet
/// switched to the container's root: `/proc/<pid>/root/<rootfs>/<device>`.
/// Nothing to do for a container running as root.
fn own_device(id: &str, pid: i32, device: &str, bundle: &Bundle, proc_root: &Path) -> Result<(), HookError> {
    use std::os::unix::fs::MetadataExt as _;
    let Some((uid, gid)) = bundle.user else {
        return Ok(());
    };
    if (uid, gid) == (0, 0) {
        return Ok(());
    }
    let fail = |source: StepError| HookError::DeviceOwner {
        id: id.to_owned(),
        device: device.to_owned(),
        uid,
        gid,
        source: Box::new(source),
    };
    let rootfs = bundle.rootfs.as_ref().ok_or_else(|| fail(StepError::NoRootfs))?;
    let path = proc_root
        .join(pid.to_string())
        .join("root")
        .join(rootfs.strip_prefix("/").unwrap_or(rootfs))
        .join(device.trim_start_matches('/'));
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| fail(StepError::Io { action, path, source })
    };
    std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(io("chown", &path))?;
    let meta = std::fs::symlink_metadata(&path).map_err(io("reading", &path))?;
    if (meta.uid(), meta.gid()) != (uid, gid) {
        return Err(fail(StepError::ReadBack {
            file: path.display().to_string(),
            value: format!("owner {}:{}", meta.uid(), meta.gid()),
        }));
    }
    Ok(())
}

/// The container's cgroup directory, which must exist; the error says why
/// it cannot be found.
fn container_cgroup(attach: &Attach, cgroups_path: Option<&str>) -> Result<PathBuf, StepError> {
    let path = cgroups_path.ok_or(StepError::NoCgroupsPath)?;
    if path.contains(':') {
        return Err(StepError::NotCgroupfs(path.to_owned()));
    }
    let dir = vfplane_proto::container_record::cgroup_dir(&attach.cgroup_root, path)
        .ok_or_else(|| StepError::NotCgroupfs(path.to_owned()))?;
    if !dir.is_dir() {
        return Err(StepError::NoCgroup(dir));
    }
    Ok(dir)
}

/// Lowers `pids.max` of the container's cgroup to `pids` (through
/// cgroups-rs; a lower bound already there is kept) and checks it.
fn set_pids_max(attach: &Attach, id: &str, cgroups_path: Option<&str>, pids: u64) -> Result<(), HookError> {
    use cgroups_rs::MaxValue;
    use cgroups_rs::pid::PidController;
    let fail = |source: StepError| HookError::Pids {
        id: id.to_owned(),
        pids,
        source: Box::new(source),
    };
    let cgroup = |action: &'static str| {
        move |source| {
            fail(StepError::Cgroup {
                action,
                file: "pids.max",
                source: Box::new(source),
            })
        }
    };
    let dir = container_cgroup(attach, cgroups_path).map_err(fail)?;
    let wanted = i64::try_from(pids).map_err(|_| fail(StepError::TooLarge(pids)))?;
    let controller = PidController::new(dir, true);
    let current = controller.get_pid_max().map_err(cgroup("reading"))?;
    if matches!(current, MaxValue::Value(have) if have <= wanted) {
        return Ok(());
    }
    controller
        .set_pid_max(MaxValue::Value(wanted))
        .map_err(cgroup("writing"))?;
    match controller.get_pid_max().map_err(cgroup("reading back"))? {
        MaxValue::Value(have) if have <= wanted => Ok(()),
        other => Err(fail(StepError::ReadBack {
            file: "pids.max".to_owned(),
            value: format!("{other:?}"),
        })),
    }
}

/// Writes `cpuset.cpus` and `cpuset.mems` of the container's cgroup
/// (through cgroups-rs) and checks the effective sets it gets.
fn set_cpuset(
    attach: &Attach,
    id: &str,
    cgroups_path: Option<&str>,
    cpus: &str,
    mems: &str,
) -> Result<(), HookError> {
    use cgroups_rs::cpuset::CpuSetController;
    let fail = |source: StepError| HookError::Cpuset {
        id: id.to_owned(),
        cpus: cpus.to_owned(),
        mems: mems.to_owned(),
        source: Box::new(source),
    };
    let writing = |file: &'static str| {
        move |source| {
            fail(StepError::Cgroup {
                action: "writing",
                file,
                source: Box::new(source),
            })
        }
    };
    let dir = container_cgroup(attach, cgroups_path).map_err(fail)?;
    let cpuset = CpuSetController::new(dir.clone(), true);
    cpuset.set_mems(mems).map_err(writing("cpuset.mems"))?;
    cpuset.set_cpus(cpus).map_err(writing("cpuset.cpus"))?;
    // cgroups-rs reads cgroup v1 names for the effective sets on v2: read
    // cgroup v2's own files.
    for (file, wanted) in [("cpuset.cpus.effective", cpus), ("cpuset.mems.effective", mems)] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| {
            fail(StepError::Io {
                action: "reading",
                path: path.clone(),
                source,
            })
        })?;
        if vfplane_host::parse_cpu_list(&text) != vfplane_host::parse_cpu_list(wanted) {
            return Err(fail(StepError::ReadBack {
                file: file.to_owned(),
                value: format!("{:?}", text.trim()),
            }));
        }
    }
    Ok(())
}

/// Adds the VF to the container's record, made from the state and the
/// bundle's `config.json`.
fn record(
    attach: &Attach,
    state: &OciState,
    pid: i32,
    cgroups_path: Option<String>,
    started: std::time::Instant,
) -> Result<(), StepError> {
    use vfplane_proto::container_record::{ContainerRecord, read_record, write_record};
    let dir = &attach.records;
    let annotation = |key: &str| state.annotations.get(key).cloned();
    let io = |action: &'static str| {
        move |source| StepError::Io {
            action,
            path: vfplane_proto::container_record::record_path(dir, &state.id),
            source,
        }
    };
    let mut record = read_record(dir, &state.id)
        .map_err(io("reading the container record"))?
        .unwrap_or_else(|| ContainerRecord {
            id: state.id.clone(),
            ..ContainerRecord::default()
        });
    record.pid = pid;
    record.pod_uid = annotation("io.kubernetes.cri.sandbox-uid");
    record.namespace = annotation("io.kubernetes.cri.sandbox-namespace");
    record.pod = annotation("io.kubernetes.cri.sandbox-name");
    record.container = annotation("io.kubernetes.cri.container-name");
    record.cgroups_path = cgroups_path;
    if !record.vfs.contains(&attach.vf) {
        record.vfs.push(attach.vf.clone());
        record.vfs.sort();
    }
    let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    record.hook_micros = record.hook_micros.saturating_add(took);
    write_record(dir, &record).map_err(io("writing the container record"))
}

/// Raises RLIMIT_MEMLOCK of process `pid` (container `id`) to at least
/// `bytes` and checks it under `proc_root` (`/proc`).
///
/// # Errors
/// prlimit refusing, or a limit that does not read back.
fn raise_memlock(id: &str, pid: i32, bytes: u64, proc_root: &Path) -> Result<(), HookError> {
    let id = id.to_owned();
    let set_error = |source: std::io::Error| HookError::Set {
        id: id.clone(),
        pid,
        bytes,
        source,
    };
    let target =
        Pid::from_raw(pid).ok_or_else(|| set_error(std::io::Error::from(rustix::io::Errno::SRCH)))?;
    // prlimit always sets, so the current limits come from /proc.
    let unreadable = || {
        set_error(std::io::Error::other(format!(
            "{}/{pid}/limits has no locked-memory line",
            proc_root.display()
        )))
    };
    let (soft, hard) = vfplane_host::memlock_limits(proc_root, pid).ok_or_else(unreadable)?;
    let raise = |limit: Option<u64>| limit.map(|value| value.max(bytes));
    let wanted = Rlimit {
        current: raise(soft),
        maximum: raise(hard),
    };
    prlimit(Some(target), Resource::Memlock, wanted).map_err(|e| set_error(e.into()))?;
    let (soft, hard) = vfplane_host::memlock_limits(proc_root, pid).ok_or_else(unreadable)?;
    let holds = |limit: Option<u64>| limit.is_none_or(|value| value >= bytes);
    if !(holds(soft) && holds(hard)) {
        let show = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
        return Err(HookError::Check {
            id,
            pid,
            bytes,
            found: format!("soft {} hard {}", show(soft), show(hard)),
        });
    }
    Ok(())
}

/// Where the plugin installs the hook binary so the runtime, in the node's
/// namespaces, can run it: `<dir>/vfplane-oci-hook`.
pub fn installed_path(dir: &Path) -> PathBuf {
    dir.join(HOOK_BINARY)
}

/// Copies the hook binary `source` to `<dir>/vfplane-oci-hook`, atomically
/// (written beside, renamed over), executable. Returns the installed path.
///
/// # Errors
/// I/O errors, naming the file.
pub fn install(source: &Path, dir: &Path) -> Result<PathBuf, std::io::Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let target = installed_path(dir);
    let annotate = |what: &str, path: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| annotate("creating", dir, e))?;
    let temporary = dir.join(format!(".{HOOK_BINARY}.tmp-{}", std::process::id()));
    std::fs::copy(source, &temporary).map_err(|e| annotate("copying", source, e))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| annotate("making executable", &temporary, e))?;
    std::fs::rename(&temporary, &target).map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        annotate("installing", &target, e)
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use vfplane_proto::container_record::read_record;

    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_command_line_is_attach_with_a_vf_and_options() {
        assert_eq!(
            parse_args(&args(&[
                "attach",
                "--vf",
                "0000:00:12.0",
                "--memlock",
                "67108864"
            ]))
            .ok(),
            Some(Attach {
                vf: "0000:00:12.0".to_owned(),
                memlock: Some(67_108_864),
                cpuset: None,
                pids_max: None,
                device: None,
                records: PathBuf::from("/run/vfplane/containers"),
                cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            })
        );
        assert_eq!(
            parse_args(&args(&["attach", "--records", "/tmp/r", "--vf", "0000:00:12.0"]))
                .ok()
                .map(|a| (a.memlock, a.records)),
            Some((None, PathBuf::from("/tmp/r")))
        );
        for bad in [
            &["attach"][..],
            &["attach", "--memlock", "64Mi", "--vf", "x"],
            &["attach", "--vf"],
            &["memlock", "1"],
            &["attach", "--vf", "a", "--vf", "b"],
            &["attach", "--vf", "a", "--cpus", "1"],
            &["attach", "--vf", "a", "--cpus", "x", "--mems", "0"],
            &["attach", "--vf", "a", "--pids-max", "0"],
            &["attach", "--vf", "a", "--pids-max", "many"],
            &["attach", "--vf", "a", "--device", "/dev/vfio/../../etc/shadow"],
            &["attach", "--vf", "a", "--device", "/dev/vfio/vfio"],
            &["attach", "--vf", "a", "--device", "/dev/sda"],
            &[],
        ] {
            let err = parse_args(&args(bad)).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.starts_with("usage: vfplane-oci-hook attach --vf <address>")),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_state_without_pid_or_not_a_state_is_refused_by_name() {
        let proc_root = Path::new("/proc");
        let attach = parse_args(&args(&[
            "attach",
            "--vf",
            "0000:00:12.0",
            "--records",
            "/nonexistent",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        let err = run(
            &attach,
            br#"{"ociVersion":"1.2.0","id":"c1","status":"creating"}"#.as_slice(),
            proc_root,
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("container c1: the state has no pid; the hook must run as createRuntime")
        );
        let err = run(&attach, b"garbage".as_slice(), proc_root)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the container state on stdin is not an OCI state")
        );
    }

    #[test]
    fn the_limit_is_raised_and_read_back_and_the_record_lists_both_vfs() {
        // A child with a lowered soft limit stands for runc's waiting init.
        // Only the soft limit is lowered: raising a hard limit needs
        // CAP_SYS_RESOURCE, which runc has on a node and a test sandbox may
        // not; the hard limit it keeps must be at least 1 MiB here.
        let proc_root = Path::new("/proc");
        let own = vfplane_host::memlock_limits(proc_root, i32::try_from(std::process::id()).unwrap_or(0));
        let Some((_, hard)) = own else {
            panic!("no locked-memory line in /proc/self/limits");
        };
        assert!(
            hard.is_none_or(|h| h >= 1 << 20),
            "this test needs a hard RLIMIT_MEMLOCK of at least 1 MiB, not {hard:?}"
        );
        let mut child = std::process::Command::new("sh")
            .args(["-c", "ulimit -S -l 64 && exec sleep 30"])
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = i32::try_from(child.id()).unwrap_or_else(|e| panic!("{e}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while vfplane_host::memlock_limits(proc_root, pid).map(|l| l.0) != Some(Some(65536)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                vfplane_host::memlock_limits(proc_root, pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bundle = work.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            bundle.join("config.json"),
            r#"{"linux":{"cgroupsPath":"/kubepods/besteffort/podu1/c2"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let records = work.path().join("records");
        let state = format!(
            r#"{{"ociVersion":"1.2.0","id":"c2","status":"created","pid":{pid},"bundle":"{}",
                "annotations":{{"io.kubernetes.cri.sandbox-uid":"u1","io.kubernetes.cri.sandbox-namespace":"default",
                "io.kubernetes.cri.sandbox-name":"tenant-1","io.kubernetes.cri.container-name":"app"}}}}"#,
            bundle.display()
        );
        let mut results = Vec::new();
        for vf in ["0000:00:12.2", "0000:00:12.0"] {
            let attach = Attach {
                vf: vf.to_owned(),
                memlock: Some(1 << 20),
                cpuset: None,
                pids_max: None,
                device: None,
                records: records.clone(),
                cgroup_root: PathBuf::from("/nonexistent"),
            };
            results.push(
                run(&attach, state.as_bytes(), proc_root)
                    .map(|record_error| record_error.map(|e| vfplane_host::error_chain(&e)))
                    .map_err(|e| vfplane_host::error_chain(&e)),
            );
        }
        let found = vfplane_host::memlock_limits(proc_root, pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(results, [Ok(None), Ok(None)], "limit set, record written");
        assert_eq!(
            found,
            Some((Some(1 << 20), hard)),
            "the soft limit raised, the hard one kept"
        );
        let record = read_record(&records, "c2")
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no record"));
        assert_eq!(
            (
                record.pid,
                record.pod_uid.as_deref(),
                record.namespace.as_deref(),
                record.pod.as_deref(),
                record.container.as_deref(),
                record.cgroups_path.as_deref(),
                record.vfs.as_slice()
            ),
            (
                pid,
                Some("u1"),
                Some("default"),
                Some("tenant-1"),
                Some("app"),
                Some("/kubepods/besteffort/podu1/c2"),
                &["0000:00:12.0".to_owned(), "0000:00:12.2".to_owned()][..]
            )
        );
        assert!(record.hook_micros > 0, "the two runs' time is summed: {record:?}");
    }

    #[test]
    fn the_cpuset_is_written_to_the_containers_cgroup_and_its_effective_sets_checked() {
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = work.path().join("cgroup");
        let dir = root.join("kubepods/besteffort/podu1/c3");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let attach = |cgroup_root: &Path| {
            let mut attach = parse_args(&args(&[
                "attach",
                "--vf",
                "0000:21:10.0",
                "--cpus",
                "1",
                "--mems",
                "1",
            ]))
            .unwrap_or_else(|e| panic!("{e}"));
            attach.cgroup_root = cgroup_root.to_owned();
            attach
        };
        let path = Some("/kubepods/besteffort/podu1/c3");
        // The kernel would compute the effective sets; the fake tree says
        // what it "computed".
        std::fs::write(dir.join("cpuset.cpus.effective"), "1\n").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.join("cpuset.mems.effective"), "1\n").unwrap_or_else(|e| panic!("{e}"));
        let result =
            set_cpuset(&attach(&root), "c3", path, "1", "1").map_err(|e| vfplane_host::error_chain(&e));
        assert_eq!(result, Ok(()));
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.cpus")).ok().as_deref(),
            Some("1")
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.mems")).ok().as_deref(),
            Some("1")
        );
        // A parent without CPU 1 leaves another effective set: refused.
        std::fs::write(dir.join("cpuset.cpus.effective"), "0\n").unwrap_or_else(|e| panic!("{e}"));
        let err = set_cpuset(&attach(&root), "c3", path, "1", "1").map_err(|e| vfplane_host::error_chain(&e));
        assert_eq!(
            err,
            Err(
                "container c3: cannot give its cgroup cpuset.cpus \"1\" and cpuset.mems \"1\": \
                 cpuset.cpus.effective reads \"0\" after the write"
                    .to_owned()
            )
        );
        let err = set_cpuset(&attach(&root), "c3", Some("kubepods.slice:cri:c3"), "1", "1")
            .map_err(|e| vfplane_host::error_chain(&e));
        assert!(
            err.as_ref()
                .is_err_and(|e| e.ends_with("is not a cgroupfs path (systemd cgroups are not supported)")),
            "{err:?}"
        );
        let err = set_cpuset(&attach(&root), "c3", Some("/kubepods/gone"), "1", "1")
            .map_err(|e| vfplane_host::error_chain(&e));
        assert!(
            err.as_ref().is_err_and(|e| e.contains("does not exist")),
            "{err:?}"
        );
    }

    #[test]
    fn pids_max_is_lowered_to_the_profile_and_a_lower_bound_kept() {
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = work.path().join("cgroup");
        let dir = root.join("kubepods/besteffort/podu1/c4");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mut attach = parse_args(&args(&["attach", "--vf", "0000:00:12.0", "--pids-max", "256"]))
            .unwrap_or_else(|e| panic!("{e}"));
        attach.cgroup_root = root.clone();
        let path = Some("/kubepods/besteffort/podu1/c4");
        let pids = |text: &str| {
            std::fs::write(dir.join("pids.max"), text).unwrap_or_else(|e| panic!("{e}"));
            let result = set_pids_max(&attach, "c4", path, 256).map_err(|e| vfplane_host::error_chain(&e));
            let after = std::fs::read_to_string(dir.join("pids.max")).unwrap_or_default();
            (result, after.trim().to_owned())
        };
        assert_eq!(pids("max\n"), (Ok(()), "256".to_owned()), "unbounded: set");
        assert_eq!(pids("4096\n"), (Ok(()), "256".to_owned()), "looser: lowered");
        assert_eq!(pids("100\n"), (Ok(()), "100".to_owned()), "stricter: kept");
        let err = set_pids_max(&attach, "c4", Some("/kubepods/gone"), 256)
            .map_err(|e| vfplane_host::error_chain(&e));
        assert!(
            err.as_ref().is_err_and(
                |e| e.starts_with("container c4: cannot give its cgroup pids.max 256:")
                    && e.contains("does not exist")
            ),
            "{err:?}"
        );
    }

    #[test]
    fn the_vfs_node_in_the_container_goes_to_the_containers_user() {
        use std::os::unix::fs::MetadataExt as _;
        // /proc/<pid>/root/<rootfs>/dev/vfio/<group> as a plain tree.
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let proc_root = work.path().join("proc");
        let bundle = work.path().join("bundle");
        let node_dir = proc_root
            .join("42/root")
            .join(bundle.strip_prefix("/").unwrap_or(&bundle))
            .join("rootfs/dev/vfio");
        std::fs::create_dir_all(&node_dir).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(node_dir.join("7"), "").unwrap_or_else(|e| panic!("{e}"));
        // As root, give the node to another user; otherwise to our own
        // (the only chown a user may make).
        let me = std::fs::metadata(&node_dir)
            .map(|m| (m.uid(), m.gid()))
            .unwrap_or_default();
        let (uid, gid) = if me.0 == 0 { (1000, 2000) } else { me };
        let with_user = |uid: u32, gid: u32| Bundle {
            cgroups_path: None,
            user: Some((uid, gid)),
            rootfs: Some(bundle.join("rootfs")),
        };
        let result = own_device("c5", 42, "/dev/vfio/7", &with_user(uid, gid), &proc_root)
            .map_err(|e| vfplane_host::error_chain(&e));
        assert_eq!(result, Ok(()));
        let owner = std::fs::metadata(node_dir.join("7"))
            .map(|m| (m.uid(), m.gid()))
            .ok();
        assert_eq!(owner, Some((uid, gid)));
        // A root container: nothing is touched (not even a missing node).
        let result = own_device("c5", 42, "/dev/vfio/9", &with_user(0, 0), &proc_root)
            .map_err(|e| vfplane_host::error_chain(&e));
        assert_eq!(result, Ok(()));
        // A node that is not there fails the container, by name.
        let err = own_device("c5", 42, "/dev/vfio/9", &with_user(uid, gid), &proc_root)
            .map_err(|e| vfplane_host::error_chain(&e));
        assert!(
            err.as_ref().is_err_and(|e| e.starts_with(&format!(
                "container c5: cannot give /dev/vfio/9 to its user {uid}:{gid}: chown "
            ))),
            "{err:?}"
        );
        // The bundle's config.json gives the user and the rootfs.
        std::fs::create_dir_all(&bundle).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            bundle.join("config.json"),
            r#"{"process":{"user":{"uid":1000,"gid":3000}},"root":{"path":"rootfs"},"linux":{"cgroupsPath":"/kubepods/x"}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let state = OciState {
            id: "c5".to_owned(),
            pid: Some(42),
            bundle: Some(bundle.clone()),
            annotations: std::collections::BTreeMap::new(),
        };
        let read = Bundle::read(&state);
        assert_eq!(
            (read.cgroups_path.as_deref(), read.user, read.rootfs),
            (
                Some("/kubepods/x"),
                Some((1000, 3000)),
                Some(bundle.join("rootfs"))
            )
        );
    }
}
