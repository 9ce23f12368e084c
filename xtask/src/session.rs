//! A user's session on the real cluster with vfplane installed the way the
//! README says: every kubectl and helm command echoed as it runs, waits that
//! explain what they waited for, and on failure the pods, events and logs
//! of vfplane's parts. The demo and the real-node tests share it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::cluster::{Cluster, ClusterOptions, NODE_NAME};
use crate::testbed::Testbed;

/// The namespace vfplane is installed into.
pub const NAMESPACE: &str = "vfplane-system";

/// A running cluster, with helm at hand.
#[derive(Debug)]
pub struct Session {
    cluster: Cluster,
    workspace: PathBuf,
    helm: PathBuf,
}

impl Session {
    /// Starts the cluster (the testbed guest as its node) and finds helm.
    ///
    /// # Errors
    /// When helm cannot be installed or the cluster does not come up.
    pub fn start(testbed: &Testbed, options: ClusterOptions) -> Result<Self> {
        let workspace = testbed.workspace().to_path_buf();
        let helm = crate::helm::ensure_helm(&workspace)?;
        let cluster = Cluster::start(testbed, options)?;
        Ok(Self {
            cluster,
            workspace,
            helm,
        })
    }

    /// The cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster, for what changes it (node shells, waits).
    pub fn cluster_mut(&mut self) -> &mut Cluster {
        &mut self.cluster
    }

    /// Prints a command as a user would type it.
    pub fn echo(args: &[&str], program: &str) {
        let shown: Vec<String> = args
            .iter()
            .map(|a| {
                if a.contains([' ', '"', '{', '$']) {
                    format!("'{a}'")
                } else {
                    (*a).to_owned()
                }
            })
            .collect();
        eprintln!("$ {program} {}", shown.join(" "));
    }

    /// Prints a command's output, indented.
    pub fn show(text: &str) {
        for line in text.lines() {
            eprintln!("  {line}");
        }
    }

    /// kubectl, echoed, output shown.
    ///
    /// # Errors
    /// kubectl failing, with its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        Self::echo(args, "kubectl");
        let out = self.cluster.kubectl_output(args)?;
        Self::show(&out);
        Ok(out)
    }

    /// `kubectl apply -f -` with `yaml`, echoed as a here-document.
    ///
    /// # Errors
    /// The API server refusing it.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        let out = self.apply_echoed(yaml)?;
        Self::show(&out);
        Ok(out)
    }

    fn apply_echoed(&self, yaml: &str) -> Result<String> {
        eprintln!("$ kubectl apply -f - <<EOF");
        Self::show(yaml);
        eprintln!("  EOF");
        self.cluster.kubectl_stdin(&["apply", "-f", "-"], yaml)
    }

    /// `kubectl apply` expected to be refused: returns the refusal.
    ///
    /// # Errors
    /// When the API server accepts it.
    pub fn apply_refused(&self, yaml: &str) -> Result<String> {
        match self.apply_echoed(yaml) {
            Ok(out) => bail!("the API server accepted what the webhook must refuse:\n{out}"),
            Err(error) => {
                let message = format!("{error:#}");
                Self::show(&message);
                Ok(message)
            }
        }
    }

    /// helm, echoed, inside the cluster's namespace.
    ///
    /// # Errors
    /// helm failing, with the vfplane pods' diagnostics.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        Self::echo(args, "helm");
        let mut command = self.cluster.command(&self.helm);
        crate::helm::isolate(&mut command, &self.workspace);
        let out = command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running helm")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "helm {} failed: {}{}\n{}",
                args.join(" "),
                stdout,
                String::from_utf8_lossy(&out.stderr),
                self.pod_diagnostics()
            );
        }
        let head: String = stdout.lines().take(12).collect::<Vec<_>>().join("\n");
        Self::show(&head);
        Ok(stdout)
    }

    /// Labels the node for vfplane and `helm install`s the chart with the
    /// image the node holds, waiting for every pod to be Ready.
    ///
    /// # Errors
    /// kubectl or helm failing.
    pub fn install_vfplane(&self) -> Result<()> {
        self.install_vfplane_with(&[])
    }

    /// [`Session::install_vfplane`] with more `--set` values
    /// (`dra.enabled=true`).
    ///
    /// # Errors
    /// kubectl or helm failing.
    pub fn install_vfplane_with(&self, sets: &[&str]) -> Result<()> {
        self.kubectl(&["label", "node", NODE_NAME, "vfplane.io/sriov=true", "--overwrite"])?;
        let mut args = vec![
            "install",
            "vfplane",
            "charts/vfplane",
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--set",
            "image.repository=vfplane.local/vfplane",
            "--set",
            "image.tag=dev",
            "--wait",
            "--timeout=10m",
        ];
        for set in sets {
            args.extend(["--set", set]);
        }
        self.helm(&args)?;
        Ok(())
    }

    /// The vfplane pods and their recent events, for errors.
    pub fn pod_diagnostics(&self) -> String {
        let pods = self
            .cluster
            .kubectl_output(&["get", "pods", "-A", "-o", "wide"])
            .unwrap_or_default();
        let events = self
            .cluster
            .kubectl_output(&["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"])
            .unwrap_or_default();
        let tail: Vec<&str> = events.lines().rev().take(15).collect();
        let mut logs = String::new();
        for (title, workload, container) in [
            ("node pod, agent", "daemonset/vfplane-node", "agent"),
            (
                "node pod, device-plugin",
                "daemonset/vfplane-node",
                "device-plugin",
            ),
        ] {
            logs.push_str(&format!("--- {title} ---\n"));
            let args = ["logs", "-n", NAMESPACE, workload, "-c", container, "--tail=15"];
            logs.push_str(&self.cluster.kubectl_output(&args).unwrap_or_default());
        }
        // Every replica: `deployment/...` picks one, maybe the standby.
        logs.push_str("--- controller replicas ---\n");
        let args = [
            "logs",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=controller",
            "-c",
            "controller",
            "--prefix",
            "--tail=15",
        ];
        logs.push_str(&self.cluster.kubectl_output(&args).unwrap_or_default());
        format!(
            "--- pods ---\n{pods}\n--- events in {NAMESPACE} (newest first) ---\n{}\n{logs}",
            tail.join("\n")
        )
    }

    /// Waits until `check` holds; on timeout the error carries the
    /// diagnostics.
    ///
    /// # Errors
    /// The timeout, or the control plane failing meanwhile.
    pub fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl FnMut(&Cluster) -> Result<bool>,
    ) -> Result<()> {
        let result = self.cluster.wait_until(what, timeout, check);
        result.map_err(|e| anyhow::anyhow!("{e:#}\n{}", self.pod_diagnostics()))
    }

    /// A kubectl answer trimmed, empty when kubectl failed.
    pub fn jsonpath(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl_output(args)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// The node's allocatable count of `vfplane.io/<pool>`, as kubectl
    /// prints it (empty when the node has none).
    pub fn allocatable(&self, pool: &str) -> String {
        allocatable(&self.cluster, pool)
    }

    /// Waits until the node's allocatable shows `count` VFs of `pool`.
    ///
    /// # Errors
    /// The timeout.
    pub fn wait_allocatable(&mut self, pool: &str, count: u32, timeout: Duration) -> Result<()> {
        let want = count.to_string();
        self.wait(
            &format!("vfplane.io/{pool}: {count} in the node's allocatable"),
            timeout,
            |c| Ok(allocatable(c, pool) == want),
        )
    }

    /// Whether the VF carries its handed-out mark on the node (given to a
    /// container and not scrubbed since). The node shell sees the node's
    /// files through PID 1's root.
    ///
    /// # Errors
    /// The node shell failing.
    pub fn vf_handed_out(&mut self, vf: &str) -> Result<bool> {
        let out = self.cluster.node_exec(&format!(
            "test -e /proc/1/root/run/vfplane/vf-state/{vf}.handed-out && echo marked || echo clean"
        ))?;
        Ok(out.trim() == "marked")
    }

    /// Waits until the node's NodeState says its (first) PF has no VFs:
    /// what deleting the last policy on it leads to.
    ///
    /// # Errors
    /// Not within `timeout`.
    pub fn wait_pf_without_vfs(&mut self, timeout: Duration) -> Result<()> {
        self.wait("the node's PF back to 0 VFs", timeout, |c| {
            Ok(c.kubectl_output(&[
                "get",
                "nodestate",
                NODE_NAME,
                "-o=jsonpath={.status.pfs[0].numVfs}",
            ])
            .is_ok_and(|v| v.trim() == "0"))
        })
    }

    /// Waits until the VF's handed-out mark is gone (the agent scrubbed
    /// it) and returns how long that took.
    ///
    /// # Errors
    /// The timeout, with the diagnostics.
    pub fn wait_scrubbed(&mut self, vf: &str, timeout: Duration) -> Result<Duration> {
        let began = std::time::Instant::now();
        while self.vf_handed_out(vf)? {
            if began.elapsed() > timeout {
                bail!(
                    "VF {vf} still marked handed out after {timeout:?}\n{}",
                    self.pod_diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(began.elapsed())
    }

    /// Waits (5 min at most) for the first JSON line of the driver tool
    /// `tool` in `pod`'s log that `wanted` accepts, and returns it. A line
    /// with an `error` is returned too, so the caller's check names it.
    ///
    /// # Errors
    /// No such line in time, with the diagnostics.
    pub fn driver_report(
        &mut self,
        pod: &str,
        tool: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let find = |logs: &str| {
            logs.lines()
                .filter(|l| l.starts_with('{'))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["tool"] == tool && (v.get("error").is_some() || wanted(v)))
        };
        self.wait(&format!("{pod}'s {tool} line"), Duration::from_secs(300), |c| {
            Ok(c.kubectl_output(&["logs", pod]).is_ok_and(|l| find(&l).is_some()))
        })?;
        let logs = self.cluster.kubectl_output(&["logs", pod])?;
        find(&logs).with_context(|| format!("{pod}'s {tool} line went from its log:\n{logs}"))
    }

    /// The agent container's log (empty when kubectl fails).
    pub fn agent_log(&self) -> String {
        self.jsonpath(&["logs", "-n", NAMESPACE, "daemonset/vfplane-node", "-c", "agent"])
    }

    /// Whether the agent's log says it scrubbed `vf`.
    pub fn agent_logged_scrub(&self, vf: &str) -> bool {
        self.agent_log()
            .lines()
            .any(|l| l.contains("VF scrubbed") && l.contains(vf))
    }

    /// The agent's metrics, fetched from inside the node pod's agent
    /// container (busybox `wget`), as Prometheus scrapes them.
    ///
    /// # Errors
    /// kubectl failing.
    pub fn agent_metrics(&self) -> Result<String> {
        self.cluster.kubectl_output(&[
            "exec",
            "-n",
            NAMESPACE,
            "daemonset/vfplane-node",
            "-c",
            "agent",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:9466/metrics",
        ])
    }
}

/// vfplane's DRA devices on the node, from its ResourceSlices (none when
/// kubectl fails).
pub fn dra_devices(cluster: &Cluster) -> Vec<serde_json::Value> {
    let Ok(slices) = cluster.kubectl_json(&["get", "resourceslices", "-o", "json"]) else {
        return Vec::new();
    };
    slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["spec"]["driver"] == "vfplane.io" && s["spec"]["nodeName"] == NODE_NAME)
        .flat_map(|s| s["spec"]["devices"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The keys of a ResourceSlice device's taints.
pub fn taint_keys(device: &serde_json::Value) -> Vec<String> {
    device["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["key"].as_str().map(str::to_owned))
        .collect()
}

/// The Events of `namespace` with this `reason`, as JSON, in the core/v1
/// view kubectl shows (`message`, `involvedObject`; the agent posts them
/// through events.k8s.io/v1).
///
/// # Errors
/// kubectl failing, or an answer that is not JSON.
pub fn events(cluster: &Cluster, namespace: &str, reason: &str) -> Result<Vec<serde_json::Value>> {
    let text = cluster.kubectl_output(&[
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        &format!("reason={reason}"),
        "-o",
        "json",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&text).context("the event list is not JSON")?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// The node's allocatable count of `vfplane.io/<pool>`, trimmed (empty
/// when the node has none or kubectl fails).
pub fn allocatable(cluster: &Cluster, pool: &str) -> String {
    cluster
        .kubectl_output(&[
            "get",
            "node",
            NODE_NAME,
            &format!("-o=jsonpath={{.status.allocatable.vfplane\\.io/{pool}}}"),
        ])
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// Every VF of every PF in the node's NodeState status, as JSON.
///
/// # Errors
/// kubectl failing, or an answer that is not JSON.
pub fn node_vf_statuses(cluster: &Cluster) -> Result<Vec<serde_json::Value>> {
    let text = cluster.kubectl_output(&["get", "nodestate", NODE_NAME, "-o", "json"])?;
    let state: serde_json::Value = serde_json::from_str(&text).context("the NodeState is not JSON")?;
    Ok(state["status"]["pfs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|pf| pf["vfs"].as_array().into_iter().flatten())
        .cloned()
        .collect())
}

/// The node's allocatable count of one pool as the API server sends it on
/// a watch (`kubectl get node -w`), each value with the moment it arrived.
/// A poll sees only the moments it asks at; the watch sees every status
/// the kubelet posts, so a dip is measured to the event, not to the poll.
#[derive(Debug)]
pub struct AllocatableWatch {
    child: std::process::Child,
    values: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AllocatableWatch {
    /// Starts the watch and waits for its first value (the node as it is).
    ///
    /// # Errors
    /// kubectl not starting, or no first value within `timeout`.
    pub fn start(cluster: &Cluster, pool: &str, timeout: Duration) -> Result<Self> {
        let mut child = cluster
            .kubectl()
            .args([
                "get",
                "node",
                NODE_NAME,
                "--watch",
                &format!("-o=jsonpath={{.status.allocatable.vfplane\\.io/{pool}}}{{\"\\n\"}}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting kubectl get node --watch")?;
        let stdout = child.stdout.take().context("kubectl's stdout")?;
        let values = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&values);
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut values) = sink.lock() {
                    values.push((Instant::now(), line.trim().to_owned()));
                }
            }
        });
        let watch = Self {
            child,
            values,
            reader: Some(reader),
        };
        let begun = Instant::now();
        while watch.latest().is_none() {
            if begun.elapsed() > timeout {
                bail!("kubectl get node --watch sent nothing in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(watch)
    }

    /// The last value the watch sent.
    pub fn latest(&self) -> Option<String> {
        self.values
            .lock()
            .ok()
            .and_then(|values| values.last().map(|(_, value)| value.clone()))
    }

    /// Stops the watch and returns every value it sent, in order.
    pub fn finish(mut self) -> Vec<(Instant, String)> {
        self.stop();
        self.values
            .lock()
            .map(|values| values.clone())
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Drop for AllocatableWatch {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The longest stretch in `values` (a watch's timeline) during which the
/// value was not `full`, counting a stretch still open at `end` up to `end`.
pub fn longest_not(values: &[(Instant, String)], full: &str, end: Instant) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for (at, value) in values {
        match (value == full, since) {
            (false, None) => since = Some(*at),
            (true, Some(start)) => {
                longest = longest.max(at.duration_since(start));
                since = None;
            }
            _ => {}
        }
    }
    if let Some(start) = since {
        longest = longest.max(end.saturating_duration_since(start));
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_not_measures_each_stretch_to_its_event() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let values: Vec<(Instant, String)> = [
            (0, "6"),
            (100, "0"),
            (900, "0"),
            (1300, "6"),
            (2000, "3"),
            (2400, "6"),
        ]
        .into_iter()
        .map(|(ms, v)| (at(ms), v.to_owned()))
        .collect();
        assert_eq!(longest_not(&values, "6", at(3000)), Duration::from_millis(1200));
        // A stretch still open at the end counts up to the end.
        let open = &values[..5];
        assert_eq!(longest_not(open, "6", at(4000)), Duration::from_millis(2000));
        assert_eq!(longest_not(&values[..1], "6", at(4000)), Duration::ZERO);
    }
}
