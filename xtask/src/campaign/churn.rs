//! The churn campaigns: pods made and deleted through the real kubelet,
//! asking for the pool's VFs through the device plugin (`churn`) or
//! claiming them through vfplane's DRA driver (`churn-dra`).

use super::*;

impl Campaigns<'_> {
    /// Churn: `options.pods` pods of 1 or 2 VFs, `options.parallel` at
    /// once, created and deleted through the kubelet; then the node must
    /// be clean and the agent's and plugin's footprints back to what they
    /// were after the first tenth of the pods.
    ///
    /// # Errors
    /// A pod failing, a dirty VF, a leak.
    pub fn churn(&mut self, options: &Options) -> Result<()> {
        let began = Instant::now();
        let churned = self.churn_pods(options.pods, options.parallel, |campaigns| {
            let vfs = campaigns.moments.vfs();
            campaigns.create_churn_pod(vfs)
        })?;
        let settled = self.check_clean(&[])?;
        let footprints = self.footprints()?;
        let (median, worst) = median_and_worst(&churned.to_checked);
        self.report.add(format!(
            "churn: {} pods ({} VFs handed out, {} at once) in {:.0} s; pod created -> its VFs checked: median \
             {median:.1} s, worst {worst:.1} s; none got a dirty VF; settled and clean {:.1} s after the last delete",
            options.pods,
            churned.vfs_handed,
            options.parallel,
            began.elapsed().as_secs_f64(),
            settled.as_secs_f64()
        ));
        if let Some((at, baseline)) = churned.baseline {
            self.check_footprints("churn", at, &baseline, &footprints)?;
        }
        Ok(())
    }

    /// Makes `pods` pods with `create`, `parallel` of them at once between
    /// creation and deletion, and checks each (oldest first) as
    /// [`Self::check_churn_pod`] does. A checked pod is deleted, without
    /// waiting, as soon as the next one needs its place; the last are
    /// deleted at the end. The pods in flight overlap what a pod waits on
    /// (the scheduler, the kubelet, the scrub of a released VF) with the
    /// others' work: with one pod created at a time and waited for, that
    /// waiting was most of each pod's time.
    fn churn_pods(
        &mut self,
        pods: u32,
        parallel: u32,
        mut create: impl FnMut(&mut Self) -> Result<String>,
    ) -> Result<Churned> {
        let baseline_at = usize::try_from((pods / 10).clamp(1, 10))?;
        let mut churned = Churned::default();
        let mut order = ChurnOrder::new(pods, usize::try_from(parallel)?);
        loop {
            match order.next() {
                Step::Create => {
                    let created = Instant::now();
                    let name = create(self)?;
                    order.created((name, created));
                }
                Step::Delete((name, _)) => self.delete_pods(&[name])?,
                Step::Check((name, created)) => {
                    churned.vfs_handed += self.check_churn_pod(&name)?.len();
                    churned.to_checked.push(created.elapsed());
                    order.checked((name, created));
                    if churned.to_checked.len() == baseline_at {
                        churned.baseline = Some((baseline_at, self.footprints()?));
                    }
                }
                Step::DeleteAll(last) => {
                    let names: Vec<String> = last.into_iter().map(|(name, _)| name).collect();
                    self.delete_pods(&names)?;
                    return Ok(churned);
                }
            }
        }
    }

    /// Churn through DRA: the pool moved to `resourceApi: dra`, then
    /// `options.dra_pods` pods, each claiming 1 or 2 VFs through a
    /// ResourceClaimTemplate, `options.parallel` at once. Each pod
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
        let churned = self.churn_pods(options.dra_pods, options.parallel, |campaigns| {
            let template = if campaigns.moments.vfs() == 1 {
                "churn-one"
            } else {
                "churn-two"
            };
            campaigns.create_claim_churn_pod(template)
        })?;
        let last_delete = Instant::now();
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
        let (median, worst) = median_and_worst(&churned.to_checked);
        self.report.add(format!(
            "churn-dra: {} pods ({} VFs claimed, {} at once) in {:.0} s after moving the pool to \
             DRA ({:.1} s); pod created -> its VFs checked: median {median:.1} s, worst {worst:.1} s; none got a \
             dirty VF; last delete -> no claim left and every VF offered again {:.1} s; back on the device \
             plugin and clean {:.1} s",
            options.dra_pods,
            churned.vfs_handed,
            options.parallel,
            (began.elapsed() - settled - moved).as_secs_f64(),
            moved.as_secs_f64(),
            released.as_secs_f64(),
            settled.as_secs_f64()
        ));
        if let Some((at, baseline)) = churned.baseline {
            self.check_footprints("churn-dra", at, &baseline, &footprints)?;
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
        baseline_at: usize,
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

/// What [`Campaigns::churn_pods`] saw.
#[derive(Default)]
struct Churned {
    /// VFs the pods were given, over all pods.
    vfs_handed: usize,
    /// Pod created -> its driver checks seen passing, for each pod.
    to_checked: Vec<Duration>,
    /// The agent's and the plugin's footprints once the first pods (how
    /// many) were checked.
    baseline: Option<(usize, (Footprint, Footprint))>,
}

/// The order of a churn's steps: pods are created while fewer than
/// `parallel` are between creation and deletion; otherwise the oldest
/// checked pod is deleted to make room, or else the oldest unchecked pod is
/// checked. Once all are made and checked, the rest are deleted at once.
#[derive(Debug)]
struct ChurnOrder<P> {
    /// Pods still to create.
    to_make: u32,
    parallel: usize,
    /// Created, not yet checked, oldest first.
    in_flight: VecDeque<P>,
    /// Checked, not yet deleted, oldest first.
    checked: VecDeque<P>,
}

/// What a churn does next.
#[derive(Debug, PartialEq, Eq)]
enum Step<P> {
    /// Create a pod and hand it to [`ChurnOrder::created`].
    Create,
    /// Check this pod and hand it to [`ChurnOrder::checked`].
    Check(P),
    /// Delete this checked pod.
    Delete(P),
    /// Delete these, the last pods; the churn is done.
    DeleteAll(Vec<P>),
}

impl<P> ChurnOrder<P> {
    fn new(pods: u32, parallel: usize) -> Self {
        Self {
            to_make: pods,
            parallel: parallel.max(1),
            in_flight: VecDeque::new(),
            checked: VecDeque::new(),
        }
    }

    fn next(&mut self) -> Step<P> {
        let more = self.to_make > 0;
        if more && self.in_flight.len() + self.checked.len() < self.parallel {
            Step::Create
        } else if more && let Some(oldest) = self.checked.pop_front() {
            Step::Delete(oldest)
        } else if let Some(oldest) = self.in_flight.pop_front() {
            Step::Check(oldest)
        } else {
            Step::DeleteAll(self.checked.drain(..).collect())
        }
    }

    fn created(&mut self, pod: P) {
        self.to_make = self.to_make.saturating_sub(1);
        self.in_flight.push_back(pod);
    }

    fn checked(&mut self, pod: P) {
        self.checked.push_back(pod);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Runs an order to its end; returns its steps (pods numbered in the
    /// order they were made) and the most pods alive at once.
    fn run(pods: u32, parallel: usize) -> (Vec<Step<u32>>, usize) {
        let mut order = ChurnOrder::new(pods, parallel);
        let mut steps = Vec::new();
        let mut alive = BTreeSet::new();
        let mut most = 0;
        let mut next_pod = 0;
        loop {
            let step = order.next();
            match &step {
                Step::Create => {
                    order.created(next_pod);
                    alive.insert(next_pod);
                    next_pod += 1;
                }
                Step::Check(pod) => order.checked(*pod),
                Step::Delete(pod) => assert!(alive.remove(pod), "pod {pod} deleted twice"),
                Step::DeleteAll(last) => {
                    for pod in last {
                        assert!(alive.remove(pod), "pod {pod} deleted twice");
                    }
                }
            }
            most = most.max(alive.len());
            let done = matches!(step, Step::DeleteAll(_));
            steps.push(step);
            if done {
                assert!(alive.is_empty(), "pods never deleted: {alive:?}");
                return (steps, most);
            }
        }
    }

    #[test]
    fn every_pod_is_made_checked_and_deleted_once_with_at_most_parallel_alive() {
        for (pods, parallel) in [(0, 3), (1, 3), (2, 3), (6, 3), (50, 3), (5, 1), (7, 0)] {
            let (steps, most) = run(pods, parallel);
            let made = steps.iter().filter(|s| **s == Step::Create).count();
            let checked: Vec<u32> = steps
                .iter()
                .filter_map(|s| match s {
                    Step::Check(pod) => Some(*pod),
                    _ => None,
                })
                .collect();
            assert_eq!(made, pods as usize, "{pods} pods, {parallel} at once");
            assert_eq!(checked, (0..pods).collect::<Vec<_>>(), "checked in order");
            assert!(
                most <= parallel.max(1),
                "{most} alive at once, {parallel} allowed"
            );
        }
    }

    #[test]
    fn pods_are_checked_while_others_are_in_flight() {
        let (steps, most) = run(6, 3);
        assert_eq!(most, 3);
        assert_eq!(
            steps[..6],
            [
                Step::Create,
                Step::Create,
                Step::Create,
                Step::Check(0),
                Step::Delete(0),
                Step::Create,
            ]
        );
        assert_eq!(steps.last(), Some(&Step::DeleteAll(vec![3, 4, 5])));
    }
}
