//! The cluster's Go binaries, built from their Go modules by
//! `cluster/build-go-binaries.sh` (pinned versions live there) into a cache
//! outside the work tree, keyed by version, so a fresh clone on the same
//! machine reuses them and a missing cache rebuilds by itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

/// Paths of every Go binary the cluster runs.
#[derive(Debug, Clone)]
pub struct GoBinaries {
    /// Directory holding kube-apiserver, kube-controller-manager,
    /// kube-scheduler, kubelet, kube-proxy, kubectl.
    pub kubernetes: PathBuf,
    /// Directory holding etcd.
    pub etcd: PathBuf,
    /// Directory holding containerd, containerd-shim-runc-v2, ctr.
    pub containerd: PathBuf,
    /// Directory holding the CNI plugins bridge, host-local, loopback.
    pub cni: PathBuf,
}

impl GoBinaries {
    /// A Kubernetes binary by name.
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }
}

/// Where built binaries are cached: `$VFPLANE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/vfplane`, else `~/.cache/vfplane`; Go binaries under `go/`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("VFPLANE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vfplane")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/vfplane")))
        .unwrap_or_else(|| PathBuf::from("/var/cache/vfplane"));
    base.join("go")
}

/// Reads `NAME=value` pins from the build script, so Rust and the script
/// cannot disagree on a version.
fn pinned(script: &str, name: &str) -> Result<String> {
    script
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("cluster/build-go-binaries.sh pins no {name}"))
}

/// Builds what is missing (nothing when the cache is complete) and returns the paths.
///
/// # Errors
/// When `go` is missing, a module cannot be fetched, or a build fails; the
/// build's output is on stderr and the error names the component.
pub fn ensure(workspace: &Path) -> Result<GoBinaries> {
    let script_path = workspace.join("cluster/build-go-binaries.sh");
    let script = std::fs::read_to_string(&script_path)
        .with_context(|| format!("reading {}", script_path.display()))?;
    let cache = cache_dir();
    let binaries = GoBinaries {
        kubernetes: cache
            .join(format!("kubernetes-{}", pinned(&script, "KUBERNETES_VERSION")?))
            .join("bin"),
        etcd: cache
            .join(format!("etcd-{}", pinned(&script, "ETCD_VERSION")?))
            .join("bin"),
        containerd: cache
            .join(format!("containerd-{}", pinned(&script, "CONTAINERD_VERSION")?))
            .join("bin"),
        cni: cache
            .join(format!("cni-plugins-{}", pinned(&script, "CNI_PLUGINS_VERSION")?))
            .join("bin"),
    };
    let begun = Instant::now();
    for component in ["etcd", "cni", "containerd", "kubernetes"] {
        let status = Command::new("bash")
            .arg(&script_path)
            .arg(&cache)
            .arg(component)
            .status()
            .context("running cluster/build-go-binaries.sh (is bash installed?)")?;
        if !status.success() {
            bail!(
                "building {component} from its Go modules failed ({status}); its output is above. \
                 Is `go` (1.26) on PATH and the Go module proxy reachable?"
            );
        }
    }
    let took = begun.elapsed().as_secs_f64();
    if took > 5.0 {
        eprintln!("cluster: Go binaries ready in {took:.0} s ({})", cache.display());
    }
    Ok(binaries)
}
