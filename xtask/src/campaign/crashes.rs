//! The crashes campaign: the agent and the device plugin SIGKILLed at random moments.

use super::*;

impl Campaigns<'_> {
    /// Crashes: a long-lived pod runs the driver's receive rings on its VF
    /// throughout. Each round deletes the previous churn pod (its scrub
    /// starts), creates the next, and at a random moment within 4 s
    /// SIGKILLs the agent or the device plugin (alternately), so kills land
    /// during scrubs, Allocates, hooks and registrations. The round ends
    /// when the node converged: the container back and ready, the churn
    /// pod running with clean VFs. A pod the kubelet rejects at admission
    /// (it had no healthy VF of the pool then) is counted and reported,
    /// with the logs of that moment saved, and the next pod must run. At
    /// the end the long-lived pod receives the frames the host sends it
    /// (its VF was never reset under it).
    ///
    /// # Errors
    /// A pod given a dirty VF, a round that does not converge, the
    /// long-lived pod losing its VF, a leak.
    pub fn crashes(&mut self, options: &Options) -> Result<()> {
        let anchor = "anchor";
        let anchor_vf = self.start_receiver(anchor)?;
        let mut converge: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        let mut previous: Option<String> = None;
        let mut rejected: Vec<String> = Vec::new();
        for round in 0..options.kills * 2 {
            let (container, comm) = if round.is_multiple_of(2) {
                ("agent", AGENT_COMM)
            } else {
                ("device-plugin", PLUGIN_COMM)
            };
            let (restarts_before, _) = self.container_state(container)?;
            if let Some(old) = previous.take() {
                self.delete_pods(&[old])?;
            }
            let vfs = self.moments.vfs();
            let name = self.create_churn_pod(vfs)?;
            std::thread::sleep(self.moments.within(Duration::from_secs(4)));
            let killed = self.kill(comm)?;
            self.session.wait(
                &format!("the {container} container restarted and ready after its kill"),
                SETTLE_TIMEOUT,
                |c| {
                    let (restarts, ready) = node_container_state(c, container)?;
                    Ok(restarts > restarts_before && ready)
                },
            )?;
            let outcome = self
                .churn_pod_outcome(&name)
                .with_context(|| format!("round {round}: after the kill of the {container}"))?;
            if let Err(why) = outcome {
                // The kubelet failed the pod at admission: it had no
                // healthy VF of the pool at that moment. Counted and shown
                // with the logs of that moment; the next pod must run.
                let saved = self.save_logs(&format!("crashes-rejected-{round}"));
                eprintln!(
                    "campaign: crashes: round {round}: pod {name} rejected by the kubelet ({why}); logs: {saved}"
                );
                rejected.push(format!("round {round} ({container} killed): {why}"));
                self.delete_pods(std::slice::from_ref(&name))?;
                let again = self.create_churn_pod(1)?;
                self.check_churn_pod(&again)
                    .with_context(|| format!("round {round}: the pod after a rejected one"))?;
                converge.entry(container).or_default().push(killed.elapsed());
                previous = Some(again);
                continue;
            }
            converge.entry(container).or_default().push(killed.elapsed());
            previous = Some(name);
        }
        if let Some(old) = previous.take() {
            self.delete_pods(&[old])?;
        }
        self.check_clean(&[(anchor, anchor_vf.as_str())])?;
        // The long-lived pod's rings still run: it receives what the host sends.
        let link = self
            .cluster()
            .guest()
            .pf_link(0)
            .context("the testbed has no PF link")?;
        for seq in 0..100 {
            link.send_frame(&test_frame(ANCHOR_MAC, HOST_MAC, seq, 60))?;
            std::thread::sleep(Duration::from_millis(2));
        }
        let began = Instant::now();
        let result = loop {
            let logs = self
                .cluster()
                .kubectl_output(&["logs", anchor])
                .unwrap_or_default();
            if let Some(result) = tool_lines(&logs, "rxcount")
                .into_iter()
                .find(|v| v.get("received").is_some())
            {
                break result;
            }
            ensure!(
                began.elapsed() < Duration::from_secs(60),
                "the long-lived pod received nothing after {} kills: its VF was lost\n{logs}",
                options.kills * 2
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        ensure!(
            result["received"] == 100 && result["bad"] == 0,
            "the long-lived pod's VF did not keep working through the kills: {result}"
        );
        let anchor_restarts = self.cluster().kubectl_output(&[
            "get",
            "pod",
            anchor,
            "-o=jsonpath={.status.containerStatuses[0].restartCount}",
        ])?;
        ensure!(
            anchor_restarts.trim() == "0",
            "the long-lived pod restarted: {anchor_restarts}"
        );
        self.delete_pods(&[anchor.to_owned()])?;
        self.check_clean(&[])?;
        for (container, times) in &converge {
            let (median, worst) = median_and_worst(times);
            self.report.add(format!(
                "crashes: {} SIGKILLs of the {container}: converged (container ready, next pod running on clean VFs) \
                 median {median:.1} s, worst {worst:.1} s after the kill",
                times.len()
            ));
        }
        self.report.add(format!(
            "crashes: the long-lived pod kept its VF {anchor_vf} throughout (100/100 frames received after the last kill); \
             no pod got a dirty VF; node clean at the end"
        ));
        self.report.add(format!(
            "crashes: pods the kubelet rejected at admission (no healthy VF of the pool at that moment): {} of {}{}",
            rejected.len(),
            options.kills * 2,
            if rejected.is_empty() { String::new() } else { format!(": {}", rejected.join("; ")) }
        ));
        Ok(())
    }
}
