//! `cargo xtask bench scale`: vfplane's controller and its API traffic on
//! a fleet of simulated nodes, against the cluster's real control plane
//! (etcd and kube-apiserver as the cluster runs them, without the guest).
//!
//! For each fleet size:
//! - the control plane starts in a namespace of its own, and the chart is
//!   installed with helm (CRDs, RBAC, the webhook configuration; no
//!   kube-controller-manager runs, so its Deployment and DaemonSet make no
//!   pods);
//! - the controller runs as two processes on the host with the args and
//!   environment of the chart's Deployment (leader election on, the
//!   webhook served), each as the controller's service account: a client
//!   certificate for `system:serviceaccount:vfplane-system:vfplane-controller`,
//!   so the chart's RBAC and API priority and fairness see it as they see
//!   the pod. The VfPolicy webhook is pointed at the first replica by URL;
//!   the pod webhooks keep their Service, which no pod ever reaches here;
//! - `vfplane-fleet` registers the Node objects and runs one simulated
//!   agent per node (the real agent's API code and reconciler, fake sysfs),
//!   as the agent's service account, then runs the phases and prints the
//!   figures ([`vfplane_fleet::bench`] in the fleet crate).
//!
//! Two FlowSchemas (`vfplane-agent`, `vfplane-controller`) send each
//! client's requests to the priority level it would get anyway
//! (`workload-low`, as the default `service-accounts` schema does), so that
//! the API server's own metrics count each client's requests.

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cluster::pki::{self, PkiNames};
use crate::cluster::{APISERVER_PORT, ControlPlane, GoBinaries, binaries, run_dir};
use crate::helm::{RELEASE_NAME, RELEASE_NAMESPACE};

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Fleet sizes, one control plane each, in order.
    pub nodes: Vec<usize>,
    /// Seconds of the idle phase.
    pub idle_seconds: u64,
    /// Seconds a phase may take before the bench gives up.
    pub phase_timeout_seconds: u64,
    /// `maxUnavailableNodes` of the rollout over held VFs.
    pub max_unavailable: u32,
}

/// The controller's service account, as the chart names it.
const CONTROLLER_SA: &str = "vfplane-controller";
/// The agent's service account.
const AGENT_SA: &str = "vfplane-agent";
/// Controller replicas.
const REPLICAS: usize = 2;
/// What the restart loop around a controller prints when it exits.
const RESTART_MARK: &str = "vfplane-controller exited; restarting";

/// Runs the bench for every fleet size; the reports, one after another.
///
/// # Errors
/// A step that fails, naming it.
pub fn scale(workspace: &Path, options: &ScaleOptions) -> Result<String> {
    let files = raise_open_files_limit(1 << 20)?;
    eprintln!("scale: open files limit {files}");
    let go = binaries::ensure(workspace)?;
    let built = crate::testbed::build_release_bins(workspace, &["vfplane-controller", "vfplane-fleet"])?;
    let find = |name: &str| -> Result<PathBuf> {
        built
            .iter()
            .find(|p| p.file_name().is_some_and(|f| f == name))
            .cloned()
            .with_context(|| format!("cargo built no {name}"))
    };
    let (controller, fleet) = (find("vfplane-controller")?, find("vfplane-fleet")?);
    let mut out = String::new();
    for &nodes in &options.nodes {
        let report = one_size(workspace, &go, &controller, &fleet, nodes, options)?;
        // Each size's report as soon as it is done: a later size may fail.
        println!("{report}");
        let _ = writeln!(out, "{report}");
    }
    Ok(out)
}

fn one_size(
    workspace: &Path,
    go: &GoBinaries,
    controller: &Path,
    fleet: &Path,
    nodes: usize,
    options: &ScaleOptions,
) -> Result<String> {
    let begun = Instant::now();
    let dir = run_dir(workspace)?;
    let names = PkiNames {
        node_name: "unused-node",
        node_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
        apiserver_ips: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    };
    let mut plane = ControlPlane::start(go, &dir, &names, |_| Ok(()))?;
    eprintln!(
        "scale: control plane ready ({:.1} s)",
        begun.elapsed().as_secs_f64()
    );

    let service_account = |sa: &str| format!("system:serviceaccount:{RELEASE_NAMESPACE}:{sa}");
    let api = format!("https://127.0.0.1:{APISERVER_PORT}");
    let kubeconfig_for = |sa: &str| -> Result<PathBuf> {
        let cert = plane.pki().issue(
            sa,
            &service_account(sa),
            Some("system:serviceaccounts"),
            &[],
            false,
        )?;
        let file = dir.join(format!("{sa}.kubeconfig"));
        fs::write(
            &file,
            pki::kubeconfig(&api, &plane.pki().ca.cert, &service_account(sa), &cert)?,
        )?;
        Ok(file)
    };
    let controller_kubeconfig = kubeconfig_for(CONTROLLER_SA)?;
    let agent_kubeconfig = kubeconfig_for(AGENT_SA)?;
    let webhook_cert = plane
        .pki()
        .issue("webhook", "vfplane-webhook", None, &["127.0.0.1"], true)?;

    install_chart(workspace, go, &plane)?;
    let webhook_port = 19443;
    point_policy_webhook_at(
        &plane,
        &format!("https://127.0.0.1:{webhook_port}/validate/vfpolicies"),
    )?;
    plane.kubectl_stdin(&["apply", "-f", "-"], &flow_schemas())?;

    let (args, env) = chart_controller_command(&plane)?;
    let mut replicas = Vec::new();
    for index in 0..REPLICAS {
        let identity = format!("{CONTROLLER_SA}-{index}");
        let args: Vec<String> = args
            .iter()
            .map(|arg| match arg.split_once('=') {
                Some(("--metrics-addr", _)) => format!("--metrics-addr=127.0.0.1:{}", 18080 + index),
                Some(("--webhook-addr", _)) => format!("--webhook-addr=127.0.0.1:{}", webhook_port + index),
                Some(("--tls-cert", _)) => format!("--tls-cert={}", webhook_cert.cert.display()),
                Some(("--tls-key", _)) => format!("--tls-key={}", webhook_cert.key.display()),
                _ => arg.clone(),
            })
            .collect();
        let mut env: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        env.extend([
            ("POD_NAME", identity.clone()),
            ("POD_NAMESPACE", RELEASE_NAMESPACE.to_owned()),
            ("KUBECONFIG", controller_kubeconfig.display().to_string()),
        ]);
        let name: &'static str = if index == 0 {
            "controller-0"
        } else {
            "controller-1"
        };
        // Restarted when it exits (a lost lease ends the process), as the
        // kubelet restarts the pod's container.
        let mut looped = vec![
            "-c".to_owned(),
            format!("while :; do \"$0\" \"$@\"; echo \"{RESTART_MARK} ($?)\"; sleep 1; done"),
            controller.display().to_string(),
        ];
        looped.extend(args);
        let pid = plane.spawn(name, Path::new("/bin/sh"), &looped, &env)?;
        replicas.push(format!("{identity}={pid}"));
    }
    wait_for_leader(&mut plane)?;
    eprintln!(
        "scale: controllers running, one leads ({:.1} s)",
        begun.elapsed().as_secs_f64()
    );

    let trees = PathBuf::from(format!("/dev/shm/vfplane-fleet-{}", std::process::id()));
    let mut command = plane.netns().command(fleet);
    command
        .arg(format!("--nodes={nodes}"))
        .arg(format!("--admin-kubeconfig={}", plane.kubeconfig().display()))
        .arg(format!("--agent-kubeconfig={}", agent_kubeconfig.display()))
        .arg(format!("--dir={}", trees.display()))
        .arg(format!("--idle-seconds={}", options.idle_seconds))
        .arg(format!("--max-unavailable={}", options.max_unavailable))
        .arg(format!(
            "--phase-timeout-seconds={}",
            options.phase_timeout_seconds
        ))
        .arg(format!("--lease={RELEASE_NAMESPACE}/{RELEASE_NAME}-controller"));
    for replica in &replicas {
        command.arg(format!("--controller={replica}"));
    }
    for service in ["kube-apiserver", "etcd"] {
        if let Some(pid) = plane.pid(service) {
            command.arg(format!("--measure={service}={pid}"));
        }
    }
    let out = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running vfplane-fleet");
    let _ = fs::remove_dir_all(&trees);
    let out = out?;
    // A replica that lost its lease exits and is restarted: the report
    // says how often.
    let mut report = String::from_utf8_lossy(&out.stdout).into_owned();
    for (index, name) in ["controller-0", "controller-1"].iter().enumerate() {
        let log = dir.join(format!("{name}.log"));
        let restarts = fs::read_to_string(&log)
            .map(|text| text.matches(RESTART_MARK).count())
            .unwrap_or(0);
        if restarts > 0 {
            let _ = writeln!(
                report,
                "NOTE: vfplane-controller-{index} exited and was restarted {restarts} time(s); its CPU time restarts \
                 from 0 (its log: {})",
                log.display()
            );
        }
    }
    plane.check("the scale bench")?;
    if !out.status.success() {
        bail!(
            "vfplane-fleet failed ({}); the controllers' logs are in {}\n{report}",
            out.status,
            dir.display()
        );
    }
    eprintln!(
        "scale: {nodes} nodes done ({:.1} s)",
        begun.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn install_chart(workspace: &Path, go: &GoBinaries, plane: &ControlPlane) -> Result<()> {
    let mut command = plane.netns().command(go.helm.join("helm"));
    crate::helm::isolate(&mut command, workspace);
    let out = command
        .arg(format!("--kubeconfig={}", plane.kubeconfig().display()))
        .args([
            "install",
            RELEASE_NAME,
            "charts/vfplane",
            "--namespace",
            RELEASE_NAMESPACE,
            "--create-namespace",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running helm install")?;
    if !out.status.success() {
        bail!(
            "helm install failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The chart's VfPolicy webhook, called at `url` (the first replica on
/// loopback) with the cluster CA as its trust anchor.
fn point_policy_webhook_at(plane: &ControlPlane, url: &str) -> Result<()> {
    use base64::Engine as _;
    let name = format!("{RELEASE_NAME}-validating");
    let config: serde_json::Value = serde_json::from_str(&plane.kubectl_output(&[
        "get",
        "validatingwebhookconfiguration",
        &name,
        "-o",
        "json",
    ])?)?;
    let index = config["webhooks"]
        .as_array()
        .and_then(|hooks| hooks.iter().position(|h| h["name"] == "vfpolicies.vfplane.io"))
        .context("the chart's validating webhooks have no vfpolicies.vfplane.io")?;
    let ca = base64::engine::general_purpose::STANDARD.encode(fs::read(&plane.pki().ca.cert)?);
    let patch = serde_json::json!([{
        "op": "replace",
        "path": format!("/webhooks/{index}/clientConfig"),
        "value": {"url": url, "caBundle": ca},
    }]);
    plane.kubectl_output(&[
        "patch",
        "validatingwebhookconfiguration",
        &name,
        "--type=json",
        &format!("--patch={patch}"),
    ])?;
    Ok(())
}

/// One FlowSchema per vfplane client, to the priority level the default
/// `service-accounts` schema gives them.
fn flow_schemas() -> String {
    [AGENT_SA, CONTROLLER_SA]
        .iter()
        .map(|sa| {
            format!(
                "apiVersion: flowcontrol.apiserver.k8s.io/v1
kind: FlowSchema
metadata:
  name: {sa}
spec:
  matchingPrecedence: 800
  priorityLevelConfiguration:
    name: workload-low
  distinguisherMethod:
    type: ByUser
  rules:
    - subjects:
        - kind: ServiceAccount
          serviceAccount: {{name: {sa}, namespace: {RELEASE_NAMESPACE}}}
      resourceRules:
        - {{verbs: ['*'], apiGroups: ['*'], resources: ['*'], clusterScope: true, namespaces: ['*']}}
      nonResourceRules:
        - {{verbs: ['*'], nonResourceURLs: ['*']}}
"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Arguments, and environment variables by name.
type ChartCommand = (Vec<String>, Vec<(String, String)>);

/// The controller container's arguments (its command after the program,
/// then its args) and plain environment values, as the chart's Deployment
/// has them.
fn chart_controller_command(plane: &ControlPlane) -> Result<ChartCommand> {
    let name = format!("{RELEASE_NAME}-controller");
    let deployment: serde_json::Value = serde_json::from_str(&plane.kubectl_output(&[
        "get",
        "deployment",
        "-n",
        RELEASE_NAMESPACE,
        &name,
        "-o",
        "json",
    ])?)?;
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let strings = |field: &str| -> Vec<String> {
        container[field]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|a| a.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The command's words after the program (`run`), then the args.
    let args: Vec<String> = strings("command")
        .into_iter()
        .skip(1)
        .chain(strings("args"))
        .collect();
    if args.is_empty() {
        bail!("the chart's controller container has no command or args");
    }
    let env = container["env"]
        .as_array()
        .map(|env| {
            env.iter()
                .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Ok((args, env))
}

fn wait_for_leader(plane: &mut ControlPlane) -> Result<()> {
    let lease = format!("{RELEASE_NAME}-controller");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let holder = plane
            .kubectl_output(&[
                "get",
                "lease",
                "-n",
                RELEASE_NAMESPACE,
                &lease,
                "-o=jsonpath={.spec.holderIdentity}",
            ])
            .unwrap_or_default();
        if !holder.trim().is_empty() {
            return Ok(());
        }
        plane.check("waiting for a controller to lead")?;
        if Instant::now() > deadline {
            bail!(
                "no controller took the Lease {lease} in 60 s; their logs are in {}",
                plane.dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Raises the open-file limit to its ceiling for this process and the
/// processes it starts: every simulated agent holds its own connections,
/// and the API server one per connection.
///
/// # Errors
/// When the limit cannot be read or set.
pub fn raise_open_files_limit(wanted: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let target = wanted.max(hard);
    // Root may raise the hard limit up to fs.nr_open; others keep theirs.
    if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok(target);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setting RLIMIT_NOFILE")?;
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_schemas_name_both_clients_and_route_them_to_workload_low() {
        let yaml = flow_schemas();
        let docs: Vec<serde_yaml::Value> = yaml
            .split("---\n")
            .map(|doc| serde_yaml::from_str(doc).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        for (doc, sa) in docs.iter().zip([AGENT_SA, CONTROLLER_SA]) {
            assert_eq!(doc["metadata"]["name"].as_str(), Some(sa));
            assert_eq!(
                doc["spec"]["priorityLevelConfiguration"]["name"].as_str(),
                Some("workload-low")
            );
            let subject = &doc["spec"]["rules"][0]["subjects"][0]["serviceAccount"];
            assert_eq!(subject["name"].as_str(), Some(sa));
            assert_eq!(subject["namespace"].as_str(), Some(RELEASE_NAMESPACE));
        }
    }
}
