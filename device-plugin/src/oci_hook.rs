//! The OCI hook the CDI spec names for VFs of a pool with a locked-memory
//! profile: `vfplane-oci-hook memlock <bytes>`, run by the container
//! runtime (runc) as a `createRuntime` hook.
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
//! stdin, raises RLIMIT_MEMLOCK of its `pid` to at least `<bytes>` (soft and
//! hard; a higher or unlimited limit is kept), then reads the limit back
//! from `/proc/<pid>/limits` and fails when it is not there. A failing
//! hook fails the container's creation with this hook's message, so a
//! container never starts with less than its pool's profile.

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
}

/// Why the hook failed. Each message names the container and the limit.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The command line is not `memlock <bytes>`.
    #[error("usage: {HOOK_BINARY} memlock <bytes> (got {0:?})")]
    Usage(Vec<String>),
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

/// The hook's command line: `memlock <bytes>`.
///
/// # Errors
/// [`HookError::Usage`] for anything else.
pub fn parse_args(args: &[String]) -> Result<u64, HookError> {
    match args {
        [verb, bytes] if verb == "memlock" => bytes.parse().map_err(|_| HookError::Usage(args.to_vec())),
        _ => Err(HookError::Usage(args.to_vec())),
    }
}

/// Raises the container's RLIMIT_MEMLOCK to at least `bytes` and checks it
/// under `proc_root` (`/proc`). Returns the container ID and pid.
///
/// # Errors
/// A state without a pid, prlimit refusing, or a limit that does not read
/// back.
pub fn raise_memlock(bytes: u64, state: impl Read, proc_root: &Path) -> Result<(String, i32), HookError> {
    let mut text = String::new();
    let mut state = state;
    state.read_to_string(&mut text).map_err(HookError::Stdin)?;
    let state: OciState = serde_json::from_str(&text).map_err(HookError::State)?;
    let id = state.id;
    let Some(pid) = state.pid.filter(|p| *p > 0) else {
        return Err(HookError::NoPid { id });
    };
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
    let (soft, hard) = memlock_limits(proc_root, pid).ok_or_else(unreadable)?;
    let raise = |limit: Option<u64>| limit.map(|value| value.max(bytes));
    let wanted = Rlimit {
        current: raise(soft),
        maximum: raise(hard),
    };
    prlimit(Some(target), Resource::Memlock, wanted).map_err(|e| set_error(e.into()))?;
    let (soft, hard) = memlock_limits(proc_root, pid).ok_or_else(unreadable)?;
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
    Ok((id, pid))
}

/// The soft and hard RLIMIT_MEMLOCK of a process from the "Max locked
/// memory" line of `<proc_root>/<pid>/limits`; `None` stands for
/// unlimited.
fn memlock_limits(proc_root: &Path, pid: i32) -> Option<(Option<u64>, Option<u64>)> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max locked memory"))?;
    let mut fields = line["Max locked memory".len()..].split_whitespace();
    let parse = |field: Option<&str>| -> Option<Option<u64>> {
        match field? {
            "unlimited" => Some(None),
            number => number.parse().ok().map(Some),
        }
    };
    Some((parse(fields.next())?, parse(fields.next())?))
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
    use super::*;

    #[test]
    fn the_command_line_is_memlock_and_a_byte_count() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(parse_args(&args(&["memlock", "67108864"])).ok(), Some(67_108_864));
        for bad in [&["memlock"][..], &["memlock", "64Mi"], &["cpuset", "1"], &[]] {
            let err = parse_args(&args(bad)).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.starts_with("usage: vfplane-oci-hook memlock <bytes>")),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_state_without_pid_or_not_a_state_is_refused_by_name() {
        let proc_root = Path::new("/proc");
        let err = raise_memlock(
            1,
            br#"{"ociVersion":"1.2.0","id":"c1","status":"creating"}"#.as_slice(),
            proc_root,
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("container c1: the state has no pid; the hook must run as createRuntime")
        );
        let err = raise_memlock(1, b"garbage".as_slice(), proc_root)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the container state on stdin is not an OCI state")
        );
    }

    #[test]
    fn the_limit_of_a_child_process_is_raised_and_read_back() {
        // A child with a lowered soft limit stands for runc's waiting init.
        // Only the soft limit is lowered: raising a hard limit needs
        // CAP_SYS_RESOURCE, which runc has on a node and a test sandbox may
        // not; the hard limit it keeps must be at least 1 MiB here.
        let proc_root = Path::new("/proc");
        let own = memlock_limits(proc_root, i32::try_from(std::process::id()).unwrap_or(0));
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
        while memlock_limits(proc_root, pid).map(|l| l.0) != Some(Some(65536)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                memlock_limits(proc_root, pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let state =
            format!(r#"{{"ociVersion":"1.2.0","id":"c2","status":"created","pid":{pid},"bundle":"/b"}}"#);
        let result =
            raise_memlock(1 << 20, state.as_bytes(), proc_root).map_err(|e| vfplane_host::error_chain(&e));
        let found = memlock_limits(proc_root, pid);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(result, Ok(("c2".to_owned(), pid)));
        assert_eq!(
            found,
            Some((Some(1 << 20), hard)),
            "the soft limit raised, the hard one kept"
        );
    }
}
