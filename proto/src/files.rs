//! The one way vfplane replaces a file that others read while it runs (the
//! pool config, the status file, VF state, container records, the CDI spec,
//! the installed hook binary): written to a temporary file beside the
//! target, then renamed over it, so a reader sees the old file or the new
//! one, never half of one.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Replaces `path` with `contents` atomically, creating its directory;
/// with `mode`, the file gets those permission bits before it appears.
/// The temporary file (`.<name>.tmp-<pid>`, unique per writing process) is
/// removed when a step fails.
///
/// # Errors
/// I/O errors, naming the step and the path.
pub fn write_atomically(path: &Path, contents: &[u8], mode: Option<u32>) -> io::Result<()> {
    let annotate =
        |e: io::Error, what: &str, p: &Path| io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| annotate(e, "creating", parent))?;
    }
    let temporary = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = fs::write(&temporary, contents)
        .map_err(|e| annotate(e, "writing", &temporary))
        .and_then(|()| match mode {
            Some(mode) => fs::set_permissions(&temporary, fs::Permissions::from_mode(mode))
                .map_err(|e| annotate(e, "setting the mode of", &temporary)),
            None => Ok(()),
        })
        .and_then(|()| fs::rename(&temporary, path).map_err(|e| annotate(e, "renaming onto", path)));
    if written.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    written
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn replaces_the_file_with_its_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/file");
        write_atomically(&path, b"one", None).unwrap();
        write_atomically(&path, b"two", Some(0o751)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o751);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file"]);
    }

    #[test]
    fn a_failed_write_names_the_path_and_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        write_atomically(&path, b"old", None).unwrap();
        // A directory where the file should go cannot be renamed over.
        let blocked = dir.path().join("blocked");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        let error = write_atomically(&blocked, b"new", None).unwrap_err();
        assert!(error.to_string().contains("renaming onto"), "{error}");
        assert!(
            error.to_string().contains(&blocked.display().to_string()),
            "{error}"
        );
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let temporaries = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count();
        assert_eq!(temporaries, 0);
        assert!(
            write_atomically(Path::new("/"), b"x", None).is_err(),
            "a path without a file name"
        );
    }
}
