//! The OCI hook the CDI spec names for every VF: `vfplane-oci-hook attach
//! --vf <address> [--device /dev/vfio/<group>] [--memlock <bytes>]
//! [--pids-max <n>] [--records <dir>]`, run by the container runtime (runc)
//! as a `createRuntime` hook. It applies no limit: vfplane's NRI plugin
//! ([`crate::nri`]) puts the pool's profile into the container's spec, and
//! runc applies the spec through the node's cgroup driver. The hook
//!
//! - checks that the spec runc is applying carries the profile
//!   (`process.rlimits` RLIMIT_MEMLOCK of at least `--memlock`,
//!   `linux.resources.pids.limit` of at most `--pids-max`): a container the
//!   NRI plugin did not adjust (NRI off in the runtime, the plugin not
//!   connected) fails to be created, with a message saying so, instead of
//!   running without its pool's profile (the runtime creates containers
//!   without a plugin's adjustments while the plugin is away);
//! - hands the VF's group node in the container to the container's user
//!   (`--device`), so a container that is not root can open it: NRI cannot,
//!   as the runtime does not tell plugins the container's user;
//! - writes the container's record (`vfplane_proto::container_record`: ID,
//!   process, pod, cgroup, VFs) for the agent, which needs the container's
//!   first process, known only once it exists.
//!
//! When it runs: runc calls `createRuntime` hooks after it created the
//! container's process (`runc init`, waiting) and before that process
//! executes the container's program. The bundle's `config.json` is the spec
//! runc applies. A failing hook fails the container's creation with this
//! hook's message. The record is best effort: a record that cannot be
//! written is said on stderr and the container starts (the agent then
//! shows its VF's owner without a pod UID).

use std::io::Read;
use std::path::{Path, PathBuf};

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
    /// The RLIMIT_MEMLOCK the container's spec must give, in bytes.
    pub memlock: Option<u64>,
    /// The pids limit the container's spec must not exceed.
    pub pids_max: Option<u64>,
    /// The VF's VFIO group node in the container (`/dev/vfio/<group>`),
    /// handed to the container's user.
    pub device: Option<String>,
    /// Where container records go.
    pub records: PathBuf,
}

/// Why one step of the hook (cgroup, device owner, record) failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The OCI spec names no root filesystem.
    #[error("the OCI spec names no root.path")]
    NoRootfs,
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
    /// [--pids-max <n>] [--records <dir>]`.
    #[error(
        "usage: {HOOK_BINARY} attach --vf <address> [--device /dev/vfio/<group>] [--memlock <bytes>] \
         [--pids-max <n>] [--records <dir>] (got {0:?})"
    )]
    Usage(Vec<String>),
    /// The container's spec lacks what its pool's profile gives: the NRI
    /// plugin did not adjust it.
    #[error(
        "container {id}: its spec does not give it {wanted} (it has {found}): vfplane's NRI plugin did not \
         adjust it; is NRI enabled in the container runtime, and vfplane's device plugin running?"
    )]
    NotAdjusted {
        /// The container.
        id: String,
        /// What the pool's profile gives.
        wanted: String,
        /// What the spec has.
        found: String,
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
}

/// The hook's command line (after `argv[0]`): `attach --vf <address>
/// [--device /dev/vfio/<group>] [--memlock <bytes>] [--pids-max <n>]
/// [--records <dir>]`.
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
    let mut pids_max = None;
    let mut device = None;
    let mut records = PathBuf::from(vfplane_proto::container_record::DEFAULT_RECORDS_DIR);
    for pair in flags.chunks(2) {
        match (pair[0].as_str(), &pair[1]) {
            ("--vf", value) if vf.is_none() => vf = Some(value.clone()),
            ("--memlock", value) if memlock.is_none() => memlock = Some(value.parse().map_err(|_| usage())?),
            ("--pids-max", value) if pids_max.is_none() => {
                pids_max = Some(value.parse().ok().filter(|n| *n > 0).ok_or_else(usage)?);
            }
            ("--device", value) if device.is_none() && is_vfio_group_node(value) => {
                device = Some(value.clone());
            }
            ("--records", value) => records = PathBuf::from(value),
            _ => return Err(usage()),
        }
    }
    Ok(Attach {
        vf: vf.ok_or_else(usage)?,
        memlock,
        pids_max,
        device,
        records,
    })
}

impl Attach {
    /// The hook's command line (after `argv[0]`) that [`parse_args`] reads
    /// back as `self`: what the CDI spec names. `--records` only when not
    /// the default.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["attach".to_owned(), "--vf".to_owned(), self.vf.clone()];
        if let Some(device) = &self.device {
            args.extend(["--device".to_owned(), device.clone()]);
        }
        if let Some(pids) = self.pids_max {
            args.extend(["--pids-max".to_owned(), pids.to_string()]);
        }
        if let Some(bytes) = self.memlock {
            args.extend(["--memlock".to_owned(), bytes.to_string()]);
        }
        if self.records != Path::new(vfplane_proto::container_record::DEFAULT_RECORDS_DIR) {
            args.extend(["--records".to_owned(), self.records.display().to_string()]);
        }
        args
    }
}

/// `/dev/vfio/<group>` or `/dev/vfio/noiommu-<group>`, nothing else (the
/// hook changes the owner of this file only).
fn is_vfio_group_node(path: &str) -> bool {
    path.strip_prefix("/dev/vfio/")
        .map(|name| name.strip_prefix("noiommu-").unwrap_or(name))
        .is_some_and(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()))
}

/// Runs the hook on the container state read from `state`: the spec's
/// check and the device's owner (an error fails the container), then the
/// record (an error is returned beside success, for stderr).
///
/// # Errors
/// A state that does not parse, a spec without the pool's profile, a
/// device node that cannot be given to the container's user.
pub fn run(attach: &Attach, state: impl Read, proc_root: &Path) -> Result<Option<StepError>, HookError> {
    let started = std::time::Instant::now();
    let mut text = String::new();
    let mut state = state;
    state.read_to_string(&mut text).map_err(HookError::Stdin)?;
    let state: OciState = serde_json::from_str(&text).map_err(HookError::State)?;
    let Some(pid) = state.pid.filter(|p| *p > 0) else {
        return Err(HookError::NoPid { id: state.id });
    };
    let bundle = Bundle::read(&state);
    check_adjusted(attach, &state.id, &bundle)?;
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
    /// The soft limit of `process.rlimits` RLIMIT_MEMLOCK.
    memlock: Option<u64>,
    /// `linux.resources.pids.limit`.
    pids_limit: Option<i64>,
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
            memlock: config["process"]["rlimits"].as_array().and_then(|rlimits| {
                rlimits
                    .iter()
                    .filter(|r| r["type"] == crate::nri::MEMLOCK)
                    .filter_map(|r| r["soft"].as_u64())
                    .max()
            }),
            pids_limit: config["linux"]["resources"]["pids"]["limit"].as_i64(),
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

/// Checks that the spec runc applies gives the container what its pool's
/// profile asks: RLIMIT_MEMLOCK of at least `--memlock`, a pids limit of at
/// most `--pids-max`.
///
/// # Errors
/// [`HookError::NotAdjusted`], naming what is missing.
fn check_adjusted(attach: &Attach, id: &str, bundle: &Bundle) -> Result<(), HookError> {
    let not_adjusted = |wanted: String, found: String| HookError::NotAdjusted {
        id: id.to_owned(),
        wanted,
        found,
    };
    if let Some(bytes) = attach.memlock
        && bundle.memlock.is_none_or(|have| have < bytes)
    {
        return Err(not_adjusted(
            format!("RLIMIT_MEMLOCK of at least {bytes} bytes"),
            bundle
                .memlock
                .map_or_else(|| "no RLIMIT_MEMLOCK".to_owned(), |have| format!("{have} bytes")),
        ));
    }
    if let Some(pids) = attach.pids_max
        && bundle
            .pids_limit
            .is_none_or(|have| have <= 0 || u64::try_from(have).is_ok_and(|have| have > pids))
    {
        return Err(not_adjusted(
            format!("a pids limit of at most {pids}"),
            bundle
                .pids_limit
                .map_or_else(|| "no pids limit".to_owned(), |have| format!("pids limit {have}")),
        ));
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
    let target = installed_path(dir);
    let binary = std::fs::read(source)
        .map_err(|e| std::io::Error::new(e.kind(), format!("reading {}: {e}", source.display())))?;
    vfplane_proto::files::write_atomically(&target, &binary, Some(0o755))?;
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
                "67108864",
                "--pids-max",
                "256",
            ]))
            .ok(),
            Some(Attach {
                vf: "0000:00:12.0".to_owned(),
                memlock: Some(67_108_864),
                pids_max: Some(256),
                device: None,
                records: PathBuf::from("/run/vfplane/containers"),
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
            &["attach", "--vf", "a", "--cpus", "1", "--mems", "0"],
            &["attach", "--vf", "a", "--cgroup-root", "/sys/fs/cgroup"],
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

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Any command line, and any one built from the hook's own words:
        /// parsed or refused with the usage line, never a panic.
        #[test]
        fn any_command_line_is_parsed_or_refused_with_the_usage(
            words in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(&HOOK_WORDS[..]).prop_map(|w: &str| w.to_owned()),
                    ".{0,12}",
                ],
                0..10,
            ),
        ) {
            if let Err(error) = parse_args(&words) {
                proptest::prop_assert!(
                    error.to_string().starts_with("usage: vfplane-oci-hook attach --vf <address>"),
                    "{}",
                    error
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// The container state the runtime writes on stdin, mutated: run
        /// or refused by name, never a panic.
        #[test]
        fn any_container_state_is_run_or_refused_by_name(
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 0..6),
        ) {
            let mut state = br#"{"ociVersion":"1.2.0","id":"c1","status":"creating","pid":0,"bundle":"/nonexistent/bundle"}"#.to_vec();
            for (at, byte) in edits {
                let i = at.index(state.len());
                state[i] = byte;
            }
            let records = tempfile::tempdir().unwrap();
            let attach = Attach {
                vf: "0000:00:12.0".to_owned(),
                memlock: Some(64 << 20),
                pids_max: None,
                device: None,
                records: records.path().to_owned(),
            };
            if let Err(error) = run(&attach, state.as_slice(), Path::new("/nonexistent/proc")) {
                proptest::prop_assert!(!error.to_string().is_empty());
            }
        }
    }

    /// The words the hook's command line is made of, for the property test.
    const HOOK_WORDS: [&str; 12] = [
        "attach",
        "--vf",
        "--device",
        "--memlock",
        "--pids-max",
        "--records",
        "0000:00:12.0",
        "/dev/vfio/7",
        "/dev/vfio/noiommu-1",
        "64",
        "0",
        "-1",
    ];

    #[test]
    fn what_the_cdi_spec_renders_parses_back_to_the_same_request() {
        for vf in ["0000:00:12.0", "0001:3b:10.7"] {
            for device in [None, Some("/dev/vfio/12"), Some("/dev/vfio/noiommu-3")] {
                for memlock in [None, Some(67_108_864)] {
                    for pids_max in [None, Some(1), Some(4_194_304)] {
                        for records in ["/run/vfplane/containers", "/tmp/records"] {
                            let attach = Attach {
                                vf: vf.to_owned(),
                                memlock,
                                pids_max,
                                device: device.map(str::to_owned),
                                records: PathBuf::from(records),
                            };
                            assert_eq!(
                                parse_args(&attach.to_args()).ok(),
                                Some(attach.clone()),
                                "{attach:?}"
                            );
                        }
                    }
                }
            }
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

    /// A bundle whose config.json is `config`, and the state naming it.
    fn bundle_state(work: &Path, id: &str, config: &str) -> String {
        let bundle = work.join(format!("bundle-{id}"));
        std::fs::create_dir_all(&bundle).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(bundle.join("config.json"), config).unwrap_or_else(|e| panic!("{e}"));
        format!(
            r#"{{"ociVersion":"1.2.0","id":"{id}","status":"created","pid":4242,"bundle":"{}",
                "annotations":{{"io.kubernetes.cri.sandbox-uid":"u1","io.kubernetes.cri.sandbox-namespace":"default",
                "io.kubernetes.cri.sandbox-name":"tenant-1","io.kubernetes.cri.container-name":"app"}}}}"#,
            bundle.display()
        )
    }

    #[test]
    fn a_spec_with_the_profile_passes_and_the_record_lists_both_vfs() {
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let records = work.path().join("records");
        let state = bundle_state(
            work.path(),
            "c2",
            r#"{"process":{"rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024},
                {"type":"RLIMIT_MEMLOCK","hard":1048576,"soft":1048576}]},
               "linux":{"cgroupsPath":"kubepods-besteffort-podu1.slice:cri-containerd:c2",
                        "resources":{"pids":{"limit":128}}}}"#,
        );
        let mut results = Vec::new();
        for vf in ["0000:00:12.2", "0000:00:12.0"] {
            let attach = Attach {
                vf: vf.to_owned(),
                memlock: Some(1 << 20),
                pids_max: Some(256),
                device: None,
                records: records.clone(),
            };
            results.push(
                run(&attach, state.as_bytes(), Path::new("/proc"))
                    .map(|record_error| record_error.map(|e| vfplane_host::error_chain(&e)))
                    .map_err(|e| vfplane_host::error_chain(&e)),
            );
        }
        assert_eq!(results, [Ok(None), Ok(None)], "spec checked, record written");
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
                4242,
                Some("u1"),
                Some("default"),
                Some("tenant-1"),
                Some("app"),
                Some("kubepods-besteffort-podu1.slice:cri-containerd:c2"),
                &["0000:00:12.0".to_owned(), "0000:00:12.2".to_owned()][..]
            )
        );
        assert!(record.hook_micros > 0, "the two runs' time is summed: {record:?}");
    }

    #[test]
    fn a_spec_the_nri_plugin_did_not_adjust_fails_the_container_saying_so() {
        let work = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let attach = Attach {
            vf: "0000:00:12.0".to_owned(),
            memlock: Some(64 << 20),
            pids_max: Some(256),
            device: None,
            records: work.path().join("records"),
        };
        let check = |id: &str, config: &str| {
            run(
                &attach,
                bundle_state(work.path(), id, config).as_bytes(),
                Path::new("/proc"),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        };
        let memlock = check("c3", r#"{"linux":{"resources":{"pids":{"limit":256}}}}"#);
        assert_eq!(
            memlock,
            Err("container c3: its spec does not give it RLIMIT_MEMLOCK of at least 67108864 bytes (it has no \
                 RLIMIT_MEMLOCK): vfplane's NRI plugin did not adjust it; is NRI enabled in the container \
                 runtime, and vfplane's device plugin running?"
                .to_owned())
        );
        let low = check(
            "c4",
            r#"{"process":{"rlimits":[{"type":"RLIMIT_MEMLOCK","hard":8388608,"soft":8388608}]}}"#,
        );
        assert!(
            low.as_ref().is_err_and(|e| e.contains("(it has 8388608 bytes)")),
            "{low:?}"
        );
        let pids = check(
            "c5",
            r#"{"process":{"rlimits":[{"type":"RLIMIT_MEMLOCK","hard":67108864,"soft":67108864}]},
                "linux":{"resources":{"pids":{"limit":4096}}}}"#,
        );
        assert!(
            pids.as_ref()
                .is_err_and(|e| e.contains("a pids limit of at most 256 (it has pids limit 4096)")),
            "{pids:?}"
        );
        let unlimited = check(
            "c6",
            r#"{"process":{"rlimits":[{"type":"RLIMIT_MEMLOCK","hard":67108864,"soft":67108864}]},
                "linux":{"resources":{"pids":{"limit":-1}}}}"#,
        );
        assert!(unlimited.is_err(), "-1 is no limit: {unlimited:?}");
        let stricter = check(
            "c7",
            r#"{"process":{"rlimits":[{"type":"RLIMIT_MEMLOCK","hard":134217728,"soft":134217728}]},
                "linux":{"resources":{"pids":{"limit":100}}}}"#,
        );
        assert_eq!(
            stricter,
            Ok(()),
            "more locked memory and fewer tasks than the profile pass"
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
            user: Some((uid, gid)),
            rootfs: Some(bundle.join("rootfs")),
            ..Bundle::default()
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
