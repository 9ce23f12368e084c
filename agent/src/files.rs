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
    vfplane_proto::files::write_atomically(path, contents.as_bytes(), None)?;
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
