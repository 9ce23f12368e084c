//! Who holds a VF's VFIO group open, from `/proc`: the guard before VFs
//! are removed.

use std::path::{Path, PathBuf};

/// Why the holders of a VFIO group could not be known. The scan guards
/// VF removal, so it fails closed: not knowing is never "nobody".
#[derive(Debug, thiserror::Error)]
pub enum HolderScanError {
    /// The process list itself could not be read.
    #[error("cannot list processes under {path}")]
    ListProcesses {
        /// The proc root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A live process's open files could not be read.
    #[error("cannot read the open files of pid {pid} ({path})")]
    ReadFds {
        /// The process.
        pid: u32,
        /// Its `fd` directory or one entry of it.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Processes that hold `/dev/vfio/<group>` open, by pid, found through
/// `<proc_root>/<pid>/fd`. The agent runs in the host's pid namespace, so
/// this sees container processes too. A process that exits during the scan
/// is skipped.
///
/// # Errors
/// The process list, or a live process's open files, cannot be read.
pub fn vfio_group_holders(proc_root: &Path, node: &Path, group: u32) -> Result<Vec<u32>, HolderScanError> {
    let gone = |e: &std::io::Error| {
        e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
    };
    let canonical = format!("/dev/vfio/{group}");
    let entries = std::fs::read_dir(proc_root).map_err(|source| HolderScanError::ListProcesses {
        path: proc_root.to_owned(),
        source,
    })?;
    let mut holders = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let fd_dir = entry.path().join("fd");
        let fds = match std::fs::read_dir(&fd_dir) {
            Ok(fds) => fds,
            Err(e) if gone(&e) => continue,
            Err(source) => {
                return Err(HolderScanError::ReadFds {
                    pid,
                    path: fd_dir,
                    source,
                });
            }
        };
        let mut holds = false;
        for fd in fds.flatten() {
            match std::fs::read_link(fd.path()) {
                Ok(target) if target == Path::new(&canonical) || target == node => holds = true,
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(source) => {
                    return Err(HolderScanError::ReadFds {
                        pid,
                        path: fd.path(),
                        source,
                    });
                }
            }
        }
        if holds {
            holders.push(pid);
        }
    }
    holders.sort_unstable();
    Ok(holders)
}
