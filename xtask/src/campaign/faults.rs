//! The faults campaign: the PF's link taken down and up under a pod.

use super::*;

impl Campaigns<'_> {
    /// Faults: the PF's link taken down under a running pod (the pool's
    /// VFs Unhealthy, the node's allocatable 0) and up again (back), with
    /// how long each took as the API server showed it.
    ///
    /// # Errors
    /// The health not following the link, a leak.
    pub fn faults(&mut self) -> Result<()> {
        let name = self.create_churn_pod(1)?;
        let held = self.check_churn_pod(&name)?;
        let pf = self
            .session
            .jsonpath(&["get", "nodestate", NODE_NAME, "-o=jsonpath={.status.pfs[0].name}"]);
        ensure!(!pf.is_empty(), "the NodeState names no PF interface");
        let mut times = Vec::new();
        for (state, want) in [("down", 0), ("up", u32::try_from(TOTAL_VFS)?)] {
            self.session
                .cluster_mut()
                .node_exec(&format!("ip link set {pf} {state}"))?;
            let began = Instant::now();
            self.session
                .wait_allocatable(POOL, want, SETTLE_TIMEOUT)
                .with_context(|| format!("after the PF link went {state}"))?;
            times.push((state, began.elapsed()));
        }
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        for (state, took) in times {
            self.report.add(format!(
                "faults: PF {pf} link {state} -> allocatable as the API server shows it: {:.1} s (pod on {} kept running)",
                took.as_secs_f64(),
                held.join(", ")
            ));
        }
        Ok(())
    }
}
