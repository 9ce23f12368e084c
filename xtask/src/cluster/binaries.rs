//! The cluster's Go binaries (and helm, which installs the chart on it),
//! built from their Go modules by
//! `cluster/build-go-binaries.sh` (pinned versions live there) into a cache
//! outside the work tree, keyed by version, so a fresh clone on the same
//! machine reuses them and a missing cache rebuilds by itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    /// Directory holding helm.
    pub helm: PathBuf,
}

impl GoBinaries {
    /// A Kubernetes binary by name.
    pub fn kube(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }
}

/// Where the Go binaries are cached (see [`cache_root`]).
pub fn cache_dir() -> PathBuf {
    crate::cache::cache_root().join("go")
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

/// How many of the build's last output lines an error carries.
const ERROR_TAIL_LINES: usize = 8;

/// Runs the build script for one component. Its output goes to our stderr
/// as it comes; a failure is one error naming the component, with the
/// script's last lines (the refused module and version, or the compiler's
/// complaint).
fn build_component(script_path: &Path, cache: &Path, component: &str) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new("bash")
        .arg(script_path)
        .arg(cache)
        .arg(component)
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cluster/build-go-binaries.sh (is bash installed?)")?;
    let mut tail = std::collections::VecDeque::with_capacity(ERROR_TAIL_LINES);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if tail.len() == ERROR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().context("waiting for cluster/build-go-binaries.sh")?;
    if !status.success() {
        let tail: Vec<String> = tail.into_iter().collect();
        bail!(
            "building {component} from its Go modules failed ({status}); its last lines:\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

/// The build script's path and text.
fn script(workspace: &Path) -> Result<(PathBuf, String)> {
    let script_path = workspace.join("cluster/build-go-binaries.sh");
    let script = std::fs::read_to_string(&script_path)
        .with_context(|| format!("reading {}", script_path.display()))?;
    Ok((script_path, script))
}

/// The pinned helm release (`helm version --short` begins with it).
///
/// # Errors
/// The build script unreadable or pinning none.
pub fn helm_version(workspace: &Path) -> Result<String> {
    pinned(&script(workspace)?.1, "HELM_VERSION")
}

/// Builds helm alone when it is missing (the chart's checks need no
/// cluster) and returns its path.
///
/// # Errors
/// As [`ensure`].
pub fn ensure_helm(workspace: &Path) -> Result<PathBuf> {
    let (script_path, script) = script(workspace)?;
    let cache = cache_dir();
    build_component(&script_path, &cache, "helm")?;
    Ok(cache
        .join(format!("helm-{}", pinned(&script, "HELM_VERSION")?))
        .join("bin/helm"))
}

/// Builds what is missing (nothing when the cache is complete) and returns the paths.
///
/// # Errors
/// When `go` is missing, a module cannot be fetched, or a build fails; the
/// build's output is on stderr and the error names the component.
pub fn ensure(workspace: &Path) -> Result<GoBinaries> {
    let (script_path, script) = script(workspace)?;
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
        helm: cache
            .join(format!("helm-{}", pinned(&script, "HELM_VERSION")?))
            .join("bin"),
    };
    let begun = Instant::now();
    for component in ["etcd", "cni", "containerd", "kubernetes", "helm"] {
        build_component(&script_path, &cache, component)?;
    }
    let took = begun.elapsed().as_secs_f64();
    if took > 5.0 {
        eprintln!("cluster: Go binaries ready in {took:.0} s ({})", cache.display());
    }
    Ok(binaries)
}
