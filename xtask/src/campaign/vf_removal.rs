//! The VF-removal campaign: the VFs removed from outside under a running pod.

use super::*;

impl Campaigns<'_> {
    /// The VFs removed under a running pod: something other than vfplane
    /// (an operator's script, another tool) writes 0 to the PF's
    /// `sriov_numvfs` while a pod runs the driver on one of them. (A VF
    /// has no sysfs `remove` of its own: the PF removes its VFs.) The
    /// kernel removes the VFs in order and, at the one the pod holds,
    /// waits for the pod to let go of it, so the write blocks; the pod
    /// must keep running meanwhile and its VF leave the allocatable. Once the pod is deleted the removal completes,
    /// and vfplane must make the pool again from the NodeState: VFs
    /// re-created, bound, scrubbed, advertised, and a pod must run on
    /// them with nothing left behind.
    ///
    /// # Errors
    /// The pod dying while it held its VF, the pool not coming back,
    /// anything left behind.
    pub fn vf_removal(&mut self) -> Result<()> {
        let name = "holder".to_owned();
        let held = self.start_receiver(&name)?;
        let pf = self.session.jsonpath(&[
            "get",
            "nodestate",
            NODE_NAME,
            "-o=jsonpath={.status.pfs[0].pciAddress}",
        ]);
        ensure!(!pf.is_empty(), "the NodeState names no PF");
        // The node shell is made on first use: before the clock starts.
        self.session.cluster_mut().node_exec("true")?;
        let began = Instant::now();
        self.session.cluster_mut().node_exec(&format!(
            "setsid sh -c 'echo 0 > /sys/bus/pci/devices/{pf}/sriov_numvfs; echo $? > /tmp/vf-removal-done' \
             > /dev/null 2>&1 &"
        ))?;
        // The removal waits for the pod, which must keep running; the VF
        // on its way out is no longer offered (its driver is gone).
        self.session
            .wait_allocatable(POOL, u32::try_from(TOTAL_VFS - 1)?, Duration::from_secs(60))?;
        let withdrawn = began.elapsed();
        std::thread::sleep(Duration::from_secs(10));
        let phase = self
            .cluster()
            .kubectl_output(&["get", "pod", &name, "-o=jsonpath={.status.phase}"])?;
        ensure!(
            phase == "Running",
            "pod {name} is {phase:?} while the removal of its VF waits for it"
        );
        let done = self
            .session
            .cluster_mut()
            .node_exec("cat /tmp/vf-removal-done 2>/dev/null || echo waiting")?;
        ensure!(
            done.trim() == "waiting",
            "the removal finished ({}) while the pod still held its VF",
            done.trim()
        );
        let deleted = Instant::now();
        self.delete_pods(&[name])?;
        let mut finished = None;
        while deleted.elapsed() < SETTLE_TIMEOUT {
            let done = self
                .session
                .cluster_mut()
                .node_exec("cat /tmp/vf-removal-done 2>/dev/null || echo waiting")?;
            if done.trim() != "waiting" {
                finished = Some(deleted.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let finished = finished.context("the removal did not finish after the pod was deleted")?;
        // Clean: every VF of the pool made again, Healthy, with its spec MAC,
        // unowned and advertised.
        self.check_clean(&[])?;
        let clean = deleted.elapsed();
        let name = self.create_churn_pod(1)?;
        let next = self.check_churn_pod(&name)?;
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "vf-removal: {pf}'s VFs removed from outside (sriov_numvfs 0) under a pod receiving on {}: the pod kept \
             running and the removal waited for it ({:.0} s checked), the VF out of the allocatable in {:.1} s; \
             after its deletion the removal finished in {:.1} s and the pool was made again and clean at {:.1} s; \
             the next pod ran on {} (logs: {})",
            held,
            deleted.duration_since(began).as_secs_f64(),
            withdrawn.as_secs_f64(),
            finished.as_secs_f64(),
            clean.as_secs_f64(),
            next.join(", "),
            self.save_logs("vf-removal")
        ));
        Ok(())
    }

    /// Starts pod `name` receiving on one VF of the pool with the driver
    /// (holding the VF open) under [`ANCHOR_MAC`]; returns its VF once the
    /// driver is up.
    pub(super) fn start_receiver(&mut self, name: &str) -> Result<String> {
        let mac = ANCHOR_MAC.map(|b| format!("{b:02x}")).join(":");
        self.cluster().kubectl_stdin(
            &["apply", "-f", "-"],
            &pod(
                name,
                1,
                &format!("rxcount --mac {mac} --count 100 --timeout 86400"),
            ),
        )?;
        let began = Instant::now();
        loop {
            let logs = self.cluster().kubectl_output(&["logs", name]).unwrap_or_default();
            if let Some(ready) = tool_lines(&logs, "rxcount")
                .into_iter()
                .find(|v| v["event"] == "ready")
            {
                ensure!(
                    ready["mac"] == mac.as_str(),
                    "pod {name}'s VF did not take its MAC: {ready}"
                );
                return Ok(ready["pci"].as_str().unwrap_or_default().to_owned());
            }
            ensure!(
                !logs.contains("\"error\"") && began.elapsed() < POD_TIMEOUT,
                "pod {name}'s driver did not start:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
