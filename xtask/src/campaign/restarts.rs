//! The restarts campaign: the kubelet and containerd restarted.

use super::*;

impl Campaigns<'_> {
    /// Restarts: the kubelet stopped (SIGTERM) `options.kubelet_restarts`
    /// times (the node's service loop starts it again after 1 s; it wipes
    /// the device-plugin directory). Each time: how long the plugin took from
    /// the new `kubelet.sock` to its registration (from its log), the
    /// longest stretch the API server showed the pool's allocatable below
    /// its healthy VFs (every status the kubelet posts, from a watch), and a pod created right after the kill must get clean
    /// VFs. Then containerd restarted once the same way.
    ///
    /// # Errors
    /// A pod failing, a registration that never comes, a leak.
    pub fn restarts(&mut self, options: &Options) -> Result<()> {
        let mut registrations = Vec::new();
        let mut dips = Vec::new();
        let mut pod_times = Vec::new();
        let mut rejected = Vec::new();
        for _ in 0..options.kubelet_restarts {
            let log_before = self.plugin_log()?.lines().count();
            // Every allocatable the kubelet posts, as the API server sends
            // it, from before the kill until the plugin registered again and
            // the pool is back.
            let watch = AllocatableWatch::start(self.session.cluster(), POOL, Duration::from_secs(30))?;
            let killed = self.kill("kubelet")?;
            let name = self.create_churn_pod(1)?;
            let full = TOTAL_VFS.to_string();
            let registered = loop {
                // Allocatable counts the healthy VFs, held or not.
                let back = watch.latest().as_deref() == Some(full.as_str());
                // The kubelet serves the logs: nothing while it restarts.
                let log = self.plugin_log().unwrap_or_default();
                let new: Vec<&str> = log.lines().skip(log_before).collect();
                if let Some(latency) = registration_latency(&new)
                    && back
                {
                    break latency;
                }
                ensure!(
                    killed.elapsed() < SETTLE_TIMEOUT,
                    "no registration with the restarted kubelet in {SETTLE_TIMEOUT:?}; the plugin's log since:\n{}",
                    new.join("\n")
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            let longest = longest_not(&watch.finish(), &full, Instant::now());
            registrations.push(registered);
            dips.push(longest);
            match self.churn_pod_outcome(&name)? {
                Ok(_) => pod_times.push(killed.elapsed()),
                Err(why) => {
                    // Admitted by the new kubelet before the plugin had
                    // re-registered: the kubelet fails such a pod (it
                    // restores the resource from its checkpoint with no
                    // healthy device). A pod created now must run.
                    rejected.push(why);
                    let again = self.create_churn_pod(1)?;
                    self.check_churn_pod(&again)?;
                    self.delete_pods(&[again])?;
                }
            }
            self.delete_pods(&[name])?;
            self.check_clean(&[])?;
        }
        let (median, worst) = median_and_worst(&registrations);
        self.report.add(format!(
            "restarts: {} kubelet restarts: plugin registered {median:.2} s (median), {worst:.2} s (worst) after the new kubelet.sock",
            registrations.len()
        ));
        let (median, worst) = median_and_worst(&dips);
        let over_a_second = dips.iter().filter(|d| **d > Duration::from_secs(1)).count();
        self.report.add(format!(
            "restarts: allocatable below the pool's healthy VFs for {median:.2} s (median), {worst:.2} s (worst) per restart, \
             over 1 s in {over_a_second} of {}, as the API server sent it on a watch",
            dips.len()
        ));
        let (median, worst) = median_and_worst(&pod_times);
        let mut line = format!(
            "restarts: of {} pods created right after a kubelet stop, {} ran on clean VFs ({median:.1} s median, {worst:.1} s worst after the stop)",
            options.kubelet_restarts,
            pod_times.len(),
        );
        if let Some(first) = rejected.first() {
            line.push_str(&format!(
                "; {} rejected by the new kubelet before the plugin re-registered ({first}); a pod created after that ran each time",
                if rejected.len() == 1 { "1 was".to_owned() } else { format!("{} were", rejected.len()) }
            ));
        }
        self.report.add(line);

        // containerd, once (SIGTERM): running containers live on in their
        // shims.
        let (plugin_restarts, _) = self.container_state("device-plugin")?;
        let killed = self.kill("containerd")?;
        let name = self.create_churn_pod(1)?;
        self.check_churn_pod(&name)?;
        let after = killed.elapsed();
        // Creations the runtime's NRI validator refused while vfplane's
        // plugin had not registered again (the kubelet retried them).
        let events = self.cluster().kubectl_output(&[
            "get",
            "events",
            &format!("--field-selector=involvedObject.name={name}"),
            "-o=jsonpath={range .items[*]}{.count} {.message}{\"\\n\"}{end}",
        ])?;
        let refused: u32 = events
            .lines()
            .filter(|line| {
                line.contains(&format!(
                    "required plugin \"{}\" not present",
                    vfplane_proto::vf_policy::NRI_PLUGIN_NAME
                ))
            })
            .filter_map(|line| line.split_whitespace().next()?.parse::<u32>().ok())
            .sum();
        let (plugin_restarts_after, ready) = self.container_state("device-plugin")?;
        ensure!(
            ready && plugin_restarts_after == plugin_restarts,
            "the device plugin restarted ({plugin_restarts} -> {plugin_restarts_after}) or is not ready after containerd's restart"
        );
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "restarts: containerd stopped and restarted: vfplane's containers kept running, a new pod ran on clean VFs {:.1} s after the kill \
             (its container's creation refused {refused} time(s) by the runtime's NRI validator until vfplane's plugin registered again)",
            after.as_secs_f64()
        ));
        Ok(())
    }
}

/// Seconds since midnight of a tracing line's RFC 3339 timestamp
/// (`2026-11-29T10:36:38.233315Z ...`).
fn seconds_of_day(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// From the plugin's log lines after a kubelet restart: the time from the
/// last `kubelet.sock created` to the first registration after it.
pub fn registration_latency(lines: &[&str]) -> Option<Duration> {
    let created = lines.iter().rposition(|l| l.contains("kubelet.sock created"))?;
    let registered = lines[created..]
        .iter()
        .find(|l| l.contains("registered with the kubelet"))?;
    let mut delta = seconds_of_day(registered)? - seconds_of_day(lines[created])?;
    if delta < 0.0 {
        delta += 86_400.0;
    }
    Some(Duration::from_secs_f64(delta))
}
