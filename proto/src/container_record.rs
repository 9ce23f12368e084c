//! Container records: what the OCI hook (`vfplane-oci-hook attach`) learns
//! about a container given VFs, for the agent.
//!
//! The kubelet's pod-resources API names a VF's container by namespace,
//! pod and container name only. The runtime knows more at the moment it
//! creates the container: its ID, its first process, the pod's UID (CRI
//! annotations) and its cgroup. The hook writes that here, one JSON file
//! per container, `<dir>/<container-id>.json`, replaced atomically; a
//! container given several VFs gets one hook run per VF and one record
//! listing them all. The agent reads the records to complete each VF's
//! owner and to read the container's limits; it removes records whose
//! cgroup is gone.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the hook writes records and the agent reads them.
pub const DEFAULT_RECORDS_DIR: &str = "/run/vfplane/containers";

/// One container given VFs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecord {
    /// The runtime's container ID.
    pub id: String,
    /// Its first process, in the node's PID namespace.
    pub pid: i32,
    /// The pod's UID (`io.kubernetes.cri.sandbox-uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's namespace (`io.kubernetes.cri.sandbox-namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name (`io.kubernetes.cri.sandbox-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The container's name (`io.kubernetes.cri.container-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// `linux.cgroupsPath` of its OCI spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroups_path: Option<String>,
    /// The VFs (PCI addresses) its CDI devices named.
    #[serde(default)]
    pub vfs: Vec<String>,
    /// Microseconds the hook's runs for this container took, summed over
    /// its VFs (from reading the state to writing this record; the
    /// runtime's fork and exec of the hook are not in it): what the limits
    /// work adds to the container's creation.
    #[serde(default)]
    pub hook_micros: u64,
}

/// The directory of a container's cgroup under the cgroup v2 mount `root`,
/// for either form of `linux.cgroupsPath`:
/// - the `cgroupfs` driver's absolute path (`/kubepods/burstable/pod<uid>/<id>`);
/// - the `systemd` driver's `slice:prefix:name`
///   (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`), which is the
///   scope `<prefix>-<name>.scope` inside the slice, each dash of a slice's
///   name one level down (`kubepods.slice/kubepods-burstable.slice/...`), as
///   systemd lays slices out.
///
/// `None` for a relative path or a systemd form that names no unit.
pub fn cgroup_dir(root: &Path, cgroups_path: &str) -> Option<PathBuf> {
    if !cgroups_path.contains(':') {
        if !cgroups_path.starts_with('/') {
            return None;
        }
        return Some(root.join(cgroups_path.trim_start_matches('/')));
    }
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return None;
    }
    let unit = if name.ends_with(".slice") {
        name.to_owned()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    Some(root.join(systemd_slice_path(slice)?).join(unit))
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice`; `-.slice` is the root.
fn systemd_slice_path(slice: &str) -> Option<PathBuf> {
    let stem = slice.strip_suffix(".slice")?;
    if stem == "-" {
        return Some(PathBuf::new());
    }
    if stem.is_empty()
        || stem.contains('/')
        || stem.starts_with('-')
        || stem.ends_with('-')
        || stem.contains("--")
    {
        return None;
    }
    let mut path = PathBuf::new();
    let mut name = String::new();
    for part in stem.split('-') {
        if !name.is_empty() {
            name.push('-');
        }
        name.push_str(part);
        path.push(format!("{name}.slice"));
    }
    Some(path)
}

/// `<dir>/<id>.json`.
pub fn record_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Reads one container's record; `Ok(None)` without one.
///
/// # Errors
/// I/O errors other than a missing file, and a record that does not parse.
pub fn read_record(dir: &Path, id: &str) -> io::Result<Option<ContainerRecord>> {
    match fs::read(record_path(dir, id)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a record, atomically (beside, then renamed over).
///
/// # Errors
/// I/O errors; a container ID that is not a plain file name.
pub fn write_record(dir: &Path, record: &ContainerRecord) -> io::Result<()> {
    if record.id.is_empty() || record.id.contains(['/', '\0']) || record.id.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("container ID {:?} cannot name a record file", record.id),
        ));
    }
    let path = record_path(dir, &record.id);
    let text = serde_json::to_string(record).map_err(io::Error::other)?;
    crate::files::write_atomically(&path, (text + "\n").as_bytes(), None)
}

/// Every record in `dir` that parses (none when `dir` does not exist),
/// with the files that did not, for the caller to report.
///
/// # Errors
/// I/O errors listing the directory.
pub fn read_records(dir: &Path) -> io::Result<(Vec<ContainerRecord>, Vec<PathBuf>)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => return Err(e),
    };
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if id.starts_with('.') {
            continue;
        }
        match read_record(dir, id) {
            Ok(Some(record)) => records.push(record),
            Ok(None) => {}
            Err(_) => bad.push(path),
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok((records, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_drivers_cgroup_paths_name_their_directory() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(root, "/kubepods/burstable/podu1/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/burstable/podu1/c1"))
        );
        assert_eq!(
            cgroup_dir(root, "kubepods-burstable-podu1.slice:cri-containerd:c1"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podu1.slice/cri-containerd-c1.scope"
            ))
        );
        // A Guaranteed pod's slice is one level under kubepods.slice.
        assert_eq!(
            cgroup_dir(root, "kubepods-podu2.slice:cri-containerd:c2"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-podu2.slice/cri-containerd-c2.scope"
            ))
        );
        assert_eq!(
            cgroup_dir(root, ":runc:c3"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/runc-c3.scope")),
            "no slice: system.slice"
        );
        assert_eq!(
            cgroup_dir(root, "-.slice::c4"),
            Some(PathBuf::from("/sys/fs/cgroup/c4.scope")),
            "the root slice, no prefix"
        );
        for refused in [
            "kubepods/c1",
            "kubepods.slice:cri-containerd",
            "a--b.slice:p:c",
            "-a.slice:p:c",
            "kubepods:p:c",
            "kubepods.slice:p:../c",
            "a:b:c:d",
        ] {
            assert_eq!(cgroup_dir(root, refused), None, "{refused}");
        }
    }

    #[test]
    fn records_round_trip_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("container-records-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(read_records(&dir).ok(), Some((Vec::new(), Vec::new())));
        let record = ContainerRecord {
            id: "c0ffee".to_owned(),
            pid: 42,
            pod_uid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".to_owned()),
            namespace: Some("default".to_owned()),
            pod: Some("tenant-1".to_owned()),
            container: Some("app".to_owned()),
            cgroups_path: Some("/kubepods/besteffort/pod1b4e28ba/c0ffee".to_owned()),
            vfs: vec!["0000:00:12.0".to_owned()],
            hook_micros: 1800,
        };
        write_record(&dir, &record).unwrap_or_else(|e| panic!("{e}"));
        fs::write(dir.join("garbled.json"), "{").unwrap_or_else(|e| panic!("{e}"));
        let (records, bad) = read_records(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(records, std::slice::from_ref(&record));
        assert_eq!(bad, [dir.join("garbled.json")]);
        let bad_id = ContainerRecord {
            id: "../escape".to_owned(),
            ..record
        };
        assert!(write_record(&dir, &bad_id).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
