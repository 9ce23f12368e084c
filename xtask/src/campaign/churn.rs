//! The churn campaign: pods made and deleted through the real kubelet.

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
        if let Some((agent0, plugin0)) = baseline {
            let kinds = |f: &Footprint| {
                f.fd_kinds
                    .iter()
                    .map(|(kind, n)| format!("{n} {kind}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            self.report.add(format!(
                "churn: after {baseline_at} pods -> at the end: agent RSS {} -> {} KiB, fds {} -> {} ({}); \
                 device plugin RSS {} -> {} KiB, fds {} -> {} ({})",
                agent0.rss_kib,
                agent.rss_kib,
                agent0.fds,
                agent.fds,
                kinds(&agent),
                plugin0.rss_kib,
                plugin.rss_kib,
                plugin0.fds,
                plugin.fds,
                kinds(&plugin)
            ));
            for (what, before, after) in [("agent", &agent0, &agent), ("device plugin", &plugin0, &plugin)] {
                let grown = after.grown_since(before);
                ensure!(
                    after.fds <= before.fds,
                    "the {what} holds {} descriptors after the churn, {} after the first {baseline_at} pods; \
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
                    "the {what}'s RSS grew from {} KiB to {} KiB over the churn",
                    before.rss_kib,
                    after.rss_kib
                );
            }
        }
        Ok(())
    }
}
