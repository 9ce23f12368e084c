//! The Helm chart's tooling: a pinned, real `helm` and the chart checks
//! (`helm lint --strict`, `helm template` of several value sets).
//!
//! helm is built from its Go module (`helm.sh/helm/v4`, the version pinned
//! in `cluster/build-go-binaries.sh`) with the cluster's other Go binaries,
//! into the same cache outside the work tree
//! ([`crate::cluster::binaries::ensure_helm`]). kubectl is the cluster's
//! own, built from `k8s.io/kubernetes` at the cluster's version. Each call
//! runs `helm version` to confirm the cached binary.

use std::fmt::Write as _;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, Result, bail};

/// Where helm keeps its cache, config and data, relative to the workspace.
pub const HELM_HOME: &str = "target/tools/helm/home";
/// The chart, relative to the workspace.
pub const CHART_DIR: &str = "charts/vfplane";
/// Release name used for rendering.
pub const RELEASE_NAME: &str = "vfplane";
/// Namespace used for rendering.
pub const RELEASE_NAMESPACE: &str = "vfplane-system";
/// Kubernetes version given to `helm lint` and `helm template` (the chart's minimum).
pub const KUBE_VERSION: &str = "1.30.0";

/// Makes sure the pinned helm is built and returns its path.
///
/// # Errors
/// Go missing, the module refused by the proxy, the build failing, or a
/// helm binary that does not run or reports another version.
pub fn ensure_helm(workspace: &Path) -> Result<PathBuf> {
    let helm = crate::cluster::binaries::ensure_helm(workspace)?;
    check_helm_version(&helm, &crate::cluster::binaries::helm_version(workspace)?)?;
    Ok(helm)
}

/// The pinned helm's path when it is built already (nothing is built).
pub fn cached_helm(workspace: &Path) -> Option<PathBuf> {
    let version = crate::cluster::binaries::helm_version(workspace).ok()?;
    let helm = crate::cluster::binaries::cache_dir()
        .join(format!("helm-{version}"))
        .join("bin/helm");
    helm.is_file().then_some(helm)
}

fn check_helm_version(helm: &Path, wanted: &str) -> Result<()> {
    let out = run_tool(
        Command::new(helm).args(["version", "--short"]),
        &helm.display().to_string(),
        "delete it and run again to rebuild it",
    )?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.trim().starts_with(wanted) {
        bail!(
            "{} reports version {:?}, expected {wanted}; delete it to rebuild it",
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
                ("--set", "controller.leaderElectionFlowSchema=false"),
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
            name: "dra",
            values: vec![("--set", "dra.enabled=true")],
            api_versions: vec![],
        },
        Case {
            name: "dra-binding",
            values: vec![("--set", "dra.enabled=true,dra.scrubGate=bindingConditions")],
            api_versions: vec![],
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
    let home = workspace.join(HELM_HOME);
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
    let version = crate::cluster::binaries::helm_version(workspace)?;
    let mut report = format!("helm {version}: `helm lint --strict` passed for every case\n");
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
