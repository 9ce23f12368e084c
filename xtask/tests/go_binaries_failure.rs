//! `cargo xtask cluster build` when the Go module proxy refuses a module:
//! the command stops with one error that names the component and carries
//! the refusal, and nothing half-built lands in the cache. The `go` on PATH
//! is a stand-in that answers as `go` does when the proxy refuses; it is
//! the only stand-in (the script and xtask are the real ones).

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

const REFUSAL: &str = "go: go.etcd.io/etcd/server/v3@v3.6.16: reading \
https://proxy.golang.org/go.etcd.io/etcd/server/v3/@v/v3.6.16.zip: 403 Forbidden";

#[test]
fn a_refused_module_stops_the_build_naming_the_component_and_the_refusal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let go = bin.join("go");
    std::fs::write(&go, format!("#!/bin/sh\necho '{REFUSAL}' >&2\nexit 1\n")).expect("fake go");
    std::fs::set_permissions(&go, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cache = dir.path().join("cache");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["cluster", "build"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("PATH", path)
        .env("VFPLANE_CACHE_DIR", &cache)
        .output()
        .expect("run xtask");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the build succeeded: {stderr}");
    // The error (the last lines) names the component and carries the refusal.
    let error = stderr
        .rsplit_once("xtask: ")
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no error printed: {stderr}"));
    assert!(
        error.starts_with("building etcd from its Go modules failed"),
        "{error}"
    );
    assert!(error.contains(REFUSAL), "{error}");
    // Nothing half-built is in the cache.
    assert!(
        !cache.join("go/etcd-v3.6.16/bin/etcd").exists(),
        "a half-built etcd was cached"
    );
    assert!(
        !cache.join("go/etcd-v3.6.16").exists(),
        "an etcd cache dir was made"
    );
}
