//! Files the agent writes: the pool config for the device plugin and the
//! status file. Both are replaced atomically (a temporary file beside the
//! target, then a rename), and only when their content changes, so readers
//! never see half a file and file watchers see no spurious change.

use std::fs;
use std::io;
use std::path::Path;

/// Writes `contents` to `path` atomically unless it already holds exactly
/// that. Returns whether it wrote.
///
/// # Errors
/// I/O errors, with the path.
pub fn write_if_changed(path: &Path, contents: &str) -> io::Result<bool> {
    if fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // One fixed temporary name: a write killed half-way leaves at most this
    // file, which the next write replaces.
    let tmp = path.with_file_name(format!(".{name}.vfplane-tmp"));
    let annotate =
        |e: io::Error, what: &str, p: &Path| io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| annotate(e, "creating", parent))?;
    }
    fs::write(&tmp, contents).map_err(|e| annotate(e, "writing", &tmp))?;
    fs::rename(&tmp, path).map_err(|e| annotate(e, "renaming onto", path))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_on_change_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/pools.yaml");
        assert!(write_if_changed(&path, "a").unwrap());
        assert!(!write_if_changed(&path, "a").unwrap());
        assert!(write_if_changed(&path, "b").unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "b");
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }
}
