//! `cargo xtask bench container-limits`: what a pool's container profile
//! adds to a container's creation on the real node, per node profile
//! (cgroup driver).
//!
//! A pod is timed from `kubectl apply` until the API server reports it
//! `Running` (the host polls as fast as kubectl answers, tens of
//! milliseconds). Three kinds of pod, each `sleep` in vfplane's image with
//! the same CPU and memory limits: no VF (vfplane's NRI plugin is still
//! asked about its container, and answers nothing), a VF of a pool without
//! a profile (the device plugin's Allocate, the CDI spec and its OCI hook),
//! and a VF of the same pool once its policy has a profile (the plugin
//! also adjusts the spec: RLIMIT_MEMLOCK and the pids limit, which the
//! runtime applies through its cgroup driver: a scope property under
//! systemd, a file under cgroupfs). The pool's VFs are the same in both
//! phases; each phase interleaves its VF pods with no-VF pods, whose times
//! show how the machine drifted between the phases.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::cluster::images::VFPLANE_IMAGE;
use crate::cluster::{ClusterOptions, NodeProfile};
use crate::session::{Session, node_vf_statuses};
use crate::testbed::Testbed;

/// The pool's name.
const POOL: &str = "bench";

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct LimitsBenchOptions {
    /// The node.
    pub node_profile: NodeProfile,
    /// Pods of each kind per phase.
    pub pods: u32,
}

/// The pool's policy, with a profile the runtime applies or none.
fn policy(profile: bool) -> String {
    let profile = if profile {
        "\n  containerProfile:\n    lockedMemory: 64Mi\n    pids: 64"
    } else {
        ""
    };
    format!(
        r#"apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: {POOL}
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    pciAddresses: ["0000:00:02.0"]
  numVfs: 2
  deviceType: vfio-pci
  resourceName: {POOL}{profile}
"#
    )
}

/// A pod running `script`, with a VF of the pool or without.
fn pod(name: &str, vf: bool, script: &str) -> String {
    let vf = if vf {
        format!("\n          vfplane.io/{POOL}: 1")
    } else {
        String::new()
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: {VFPLANE_IMAGE}
      imagePullPolicy: IfNotPresent
      command: ["sh", "-c", {script:?}]
      resources:
        limits:
          cpu: 100m
          memory: 64Mi{vf}
"#
    )
}

/// Creates the pod and returns how long until it was `Running`; deletes it
/// and waits until its VF (if any) is free again.
fn time_pod(session: &mut Session, name: &str, vf: bool) -> Result<Duration> {
    let began = Instant::now();
    session
        .cluster()
        .kubectl_stdin(&["apply", "-f", "-"], &pod(name, vf, "exec sleep 3600"))?;
    let ran = loop {
        let phase = session
            .cluster()
            .kubectl_output(&["get", "pod", name, "-o=jsonpath={.status.phase}"])
            .unwrap_or_default();
        if phase == "Running" {
            break began.elapsed();
        }
        ensure!(phase != "Failed", "pod {name} failed");
        ensure!(
            began.elapsed() < Duration::from_secs(180),
            "pod {name} not Running after 180 s"
        );
    };
    session.kubectl(&["delete", "pod", name, "--wait=true"])?;
    if vf {
        session.wait(
            "the pool's VFs free and scrubbed",
            Duration::from_secs(120),
            |c| {
                Ok(node_vf_statuses(c)?
                    .iter()
                    .filter(|v| v["pool"] == POOL)
                    .all(|v| v["owner"].is_null() && v["health"] == "Healthy"))
            },
        )?;
    }
    Ok(ran)
}

/// The median of `times`, in milliseconds.
fn median_ms(times: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    match ms.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => ms[n / 2],
        n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
    }
}

/// Runs the bench and returns its table.
///
/// # Errors
/// The cluster not coming up, a pod failing, the profile not reaching a
/// container.
pub fn container_limits(testbed: &Testbed, options: &LimitsBenchOptions) -> Result<String> {
    ensure!(options.pods > 0, "--pods must be at least 1");
    let mut session = Session::start(
        testbed,
        ClusterOptions {
            node_profile: options.node_profile,
            ..ClusterOptions::default()
        },
    )?;
    session.install_vfplane()?;
    let mut table = format!(
        "container creation on the {} node, pod applied -> Running, median of {} each (ms)\n",
        options.node_profile.name(),
        options.pods
    );
    let mut added = Vec::new();
    for profile in [false, true] {
        session.apply(&policy(profile))?;
        session.wait_allocatable(POOL, 2, Duration::from_secs(300))?;
        if profile {
            // Only once the plugin knows the profile is a phase measured:
            // a probe container must run with the pool's locked memory.
            let limit = 64 * 1024 * 1024;
            session.wait("the profile in a VF container", Duration::from_secs(120), |c| {
                let _ = c.kubectl_output(&["delete", "pod", "probe", "--wait=true", "--ignore-not-found"]);
                c.kubectl_stdin(
                    &["apply", "-f", "-"],
                    &pod(
                        "probe",
                        true,
                        "grep 'locked memory' /proc/self/limits; exec sleep 3600",
                    ),
                )?;
                let mut logs = String::new();
                for _ in 0..60 {
                    logs = c.kubectl_output(&["logs", "probe"]).unwrap_or_default();
                    if logs.contains("locked memory") {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Ok(logs.split_whitespace().any(|w| w == limit.to_string()))
            })?;
            session.kubectl(&["delete", "pod", "probe", "--wait=true"])?;
        }
        let (mut without_vf, mut with_vf) = (Vec::new(), Vec::new());
        for i in 0..options.pods {
            without_vf.push(time_pod(&mut session, &format!("plain-{profile}-{i}"), false)?);
            with_vf.push(time_pod(&mut session, &format!("vf-{profile}-{i}"), true)?);
        }
        let (plain, vf) = (median_ms(&without_vf), median_ms(&with_vf));
        added.push(vf - plain);
        let kind = if profile {
            "a VF, pool with a profile (lockedMemory, pids)"
        } else {
            "a VF, pool without a profile"
        };
        let list = |times: &[Duration]| {
            times
                .iter()
                .map(|t| format!("{:.0}", t.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>()
                .join(" ")
        };
        writeln!(
            table,
            "  no VF                        {plain:8.0}   [{}]",
            list(&without_vf)
        )?;
        writeln!(
            table,
            "  {kind:<28} {vf:8.0}   [{}]  (+{:.0} over no VF)",
            list(&with_vf),
            vf - plain
        )?;
    }
    writeln!(
        table,
        "  the profile's own cost (VF with profile - VF without, each over its phase's no-VF pods): {:+.0} ms",
        added[1] - added[0]
    )
    .context("formatting")?;
    Ok(table)
}
