//! Where xtask caches what it builds outside the work tree (a leaf).

use std::path::PathBuf;

/// Where what is built outside the work tree is cached:
/// `$VFPLANE_CACHE_DIR`, else `$XDG_CACHE_HOME/vfplane`, else
/// `~/.cache/vfplane`. Go binaries are under `go/`, the systemd node's
/// root image under `node-rootfs/`.
pub fn cache_root() -> PathBuf {
    std::env::var_os("VFPLANE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vfplane")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/vfplane")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/vfplane"))
}
