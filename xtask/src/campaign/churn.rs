//! The churn campaigns: pods made and deleted through the real kubelet,
//! asking for the pool's VFs through the device plugin (`churn`) or
//! claiming them through vfplane's DRA driver (`churn-dra`).

use super::*;

impl Campaigns<'_> {
    /// Churn: `options.pods` pods of 1 or 2 VFs, `options.parallel` alive
    /// at once, created and deleted through the kubelet; then the node must
    /// be clean and the agent's and plugin's footprints back to what they
    /// were after the first tenth of the pods.
    ///
    /// # Errors
    /// A pod failing, a dirty VF, a leak.
    pub fn churn(&mut self, options: &Options) -> Result<()> {
        let began = Instant::now();
        let baseline_at = (options.pods / 10).clamp(1, 10);
        let mut baseline = None;
        let mut alive: VecDeque<String> = VecDeque::new();
        let mut vfs_handed = 0usize;
        for i in 0..options.pods {
            while alive.len() >= usize::try_from(options.parallel)? {
                if let Some(oldest) = alive.pop_front() {
                    self.delete_pods(&[oldest])?;
                }
            }
            let vfs = self.moments.vfs();
            let name = self.create_churn_pod(vfs)?;
            vfs_handed += self.check_churn_pod(&name)?.len();
            alive.push_back(name);
            if i + 1 == baseline_at {
                baseline = Some(self.footprints()?);
            }
        }
        self.delete_pods(&alive.drain(..).collect::<Vec<_>>())?;
        let settled = self.check_clean(&[])?;
        let (agent, plugin) = self.footprints()?;
        let churned = began.elapsed();
        self.report.add(format!(
            "churn: {} pods ({vfs_handed} VFs handed out, {} alive at once) in {:.0} s; none got a dirty VF; \
             settled and clean {:.1} s after the last delete",
            options.pods,
            options.parallel,
            churned.as_secs_f64(),
            settled.as_secs_f64()
        ));
        if let Some(baseline) = baseline {
            self.check_footprints("churn", baseline_at, &baseline, &(agent, plugin))?;
        }
        Ok(())
    }

    /// Churn through DRA: the pool moved to `resourceApi: dra`, then
    /// `options.dra_pods` pods, each claiming 1 or 2 VFs through a
    /// ResourceClaimTemplate, `options.parallel` alive at once. Each pod
    /// checks its VFs as the churn's do (found with the spec's MAC, then
    /// given its own). Then no claim may be left, every device untainted
    /// and in no prepared claim, the footprints back; the pool moved back
    /// to the device plugin and the node clean.
    ///
    /// # Errors
    /// A pod failing, a dirty VF, a claim or mark left, a leak.
    pub fn churn_dra(&mut self, options: &Options) -> Result<()> {
        let began = Instant::now();
        self.move_pool("dra")?;
        self.session.wait(
            "the pool's VFs offered in the node's ResourceSlice",
            SETTLE_TIMEOUT,
            |c| Ok(offered_devices(c) == TOTAL_VFS && allocatable(c, POOL) == "0"),
        )?;
        self.cluster()
            .kubectl_stdin(&["apply", "-f", "-"], &claim_templates())
            .context("the campaign's ResourceClaimTemplates")?;
        let moved = began.elapsed();
        let baseline_at = (options.dra_pods / 10).clamp(1, 10);
        let mut baseline = None;
        let mut alive: VecDeque<String> = VecDeque::new();
        let mut vfs_handed = 0usize;
        let mut to_checked = Vec::new();
        for i in 0..options.dra_pods {
            while alive.len() >= usize::try_from(options.parallel)? {
                if let Some(oldest) = alive.pop_front() {
                    self.delete_pods(&[oldest])?;
                }
            }
            let template = if self.moments.vfs() == 1 {
                "churn-one"
            } else {
                "churn-two"
            };
            let created = Instant::now();
            let name = self.create_claim_churn_pod(template)?;
            vfs_handed += self.check_churn_pod(&name)?.len();
            to_checked.push(created.elapsed());
            alive.push_back(name);
            if i + 1 == baseline_at {
                baseline = Some(self.footprints()?);
            }
        }
        let last_delete = Instant::now();
        self.delete_pods(&alive.drain(..).collect::<Vec<_>>())?;
        self.session.wait(
            "every claim gone and every VF offered again",
            SETTLE_TIMEOUT,
            |c| {
                let pods = c.kubectl_output(&["get", "pods", "-l", "campaign=true", "-o=name"])?;
                let claims = c.kubectl_output(&["get", "resourceclaims", "-o=name"])?;
                Ok(pods.trim().is_empty() && claims.trim().is_empty() && offered_devices(c) == TOTAL_VFS)
            },
        )?;
        let released = last_delete.elapsed();
        let checkpoint = self
            .session
            .cluster_mut()
            .node_exec("cat /proc/1/root/var/lib/kubelet/plugins/vfplane.io/checkpoint.json")?;
        let checkpoint: Value =
            serde_json::from_str(checkpoint.trim()).context("the DRA checkpoint is not JSON")?;
        ensure!(
            checkpoint["claims"] == serde_json::json!({}),
            "claims left in the DRA driver's checkpoint after every pod went: {}",
            checkpoint["claims"]
        );
        let footprints = self.footprints()?;
        self.move_pool("devicePlugin")?;
        let settled = self.check_clean(&[])?;
        let (median, worst) = median_and_worst(&to_checked);
        self.report.add(format!(
            "churn-dra: {} pods ({vfs_handed} VFs claimed, {} alive at once) in {:.0} s after moving the pool to \
             DRA ({:.1} s); pod created -> its VFs checked: median {median:.1} s, worst {worst:.1} s; none got a \
             dirty VF; last delete -> no claim left and every VF offered again {:.1} s; back on the device \
             plugin and clean {:.1} s",
            options.dra_pods,
            options.parallel,
            (began.elapsed() - settled - moved).as_secs_f64(),
            moved.as_secs_f64(),
            released.as_secs_f64(),
            settled.as_secs_f64()
        ));
        if let Some(baseline) = baseline {
            self.check_footprints("churn-dra", baseline_at, &baseline, &footprints)?;
        }
        Ok(())
    }

    /// Sets the pool's `resourceApi`.
    fn move_pool(&self, api: &str) -> Result<()> {
        self.cluster()
            .kubectl_output(&[
                "patch",
                "vfpolicy",
                POOL,
                "--type=merge",
                "-p",
                &format!(r#"{{"spec":{{"resourceApi":"{api}"}}}}"#),
            ])
            .with_context(|| format!("moving pool {POOL} to resourceApi {api}"))?;
        Ok(())
    }

    /// Reports the agent's and the plugin's footprints after the first
    /// `baseline_at` pods and at the end, and fails on growth: any more
    /// descriptors, or RSS beyond a quarter and 4 MiB.
    fn check_footprints(
        &mut self,
        what_campaign: &str,
        baseline_at: u32,
        (agent0, plugin0): &(Footprint, Footprint),
        (agent, plugin): &(Footprint, Footprint),
    ) -> Result<()> {
        let kinds = |f: &Footprint| {
            f.fd_kinds
                .iter()
                .map(|(kind, n)| format!("{n} {kind}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.report.add(format!(
            "{what_campaign}: after {baseline_at} pods -> at the end: agent RSS {} -> {} KiB, fds {} -> {} ({}); \
             device plugin RSS {} -> {} KiB, fds {} -> {} ({})",
            agent0.rss_kib,
            agent.rss_kib,
            agent0.fds,
            agent.fds,
            kinds(agent),
            plugin0.rss_kib,
            plugin.rss_kib,
            plugin0.fds,
            plugin.fds,
            kinds(plugin)
        ));
        for (what, before, after) in [("agent", agent0, agent), ("device plugin", plugin0, plugin)] {
            let grown = after.grown_since(before);
            ensure!(
                after.fds <= before.fds,
                "the {what} holds {} descriptors after the {what_campaign}, {} after the first {baseline_at} pods; \
                 more of: {}",
                after.fds,
                before.fds,
                grown.join(", ")
            );
            // Allocators keep freed pages: allow a quarter and 4 MiB,
            // far below what a leak per pod over this many pods gives.
            let allowed = before.rss_kib + before.rss_kib / 4 + 4096;
            ensure!(
                after.rss_kib <= allowed,
                "the {what}'s RSS grew from {} KiB to {} KiB over the {what_campaign}",
                before.rss_kib,
                after.rss_kib
            );
        }
        Ok(())
    }
}

/// Devices of the pool in the node's ResourceSlice that carry no taint.
fn offered_devices(cluster: &Cluster) -> usize {
    crate::session::dra_devices(cluster)
        .iter()
        .filter(|d| d["attributes"]["pool"]["string"] == POOL && crate::session::taint_keys(d).is_empty())
        .count()
}

/// The campaign's ResourceClaimTemplates: `churn-one` (one VF of the pool)
/// and `churn-two` (two).
fn claim_templates() -> String {
    let selector = crate::claims::pool_selector(POOL);
    [("one", 1), ("two", 2)]
        .iter()
        .map(|(name, count)| {
            crate::claims::vf_claim_template(&format!("churn-{name}"), "vfs", *count, &selector, "")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}
