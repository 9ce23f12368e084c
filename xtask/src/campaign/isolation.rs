//! The isolation campaign: a pod trying to open VFIO groups not its own.

use super::*;

impl Campaigns<'_> {
    /// A pod can open only its own VF's group. The pod runs as root with
    /// the runtime's default capabilities plus `MKNOD` (the most a tenant
    /// gets without `privileged`); it sees only its own group's node and
    /// the VFIO container in `/dev/vfio`, and when it makes nodes of its
    /// own for every other VFIO group on the node (their numbers read on
    /// the node), opening each is refused by the container's device
    /// cgroup ("Operation not permitted"), while the same made-up node of
    /// its own group opens: the refusal is the cgroup's, not a wrong
    /// device number.
    ///
    /// # Errors
    /// The pod seeing or opening another group, or the check not running.
    pub fn isolation(&mut self) -> Result<()> {
        // "crw------- 1 root root 243, 3 Nov 29 10:00 12": group 12 is
        // minor 3 of the VFIO group major. The node's own /dev, through PID
        // 1's root: the node shell's /dev is a copy made when its container
        // started (after a reboot, before the VFs existed).
        let listing = self
            .session
            .cluster_mut()
            .node_exec("ls -l /proc/1/root/dev/vfio")?;
        let mut groups = BTreeMap::new();
        for line in listing.lines().filter(|l| l.starts_with('c')) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let (Some(major), Some(minor), Some(name)) = (words.get(4), words.get(5), words.last()) else {
                continue;
            };
            if *name == "vfio" {
                continue;
            }
            let major: u32 = major
                .trim_end_matches(',')
                .parse()
                .with_context(|| format!("major in {line:?}"))?;
            let minor: u32 = minor.parse().with_context(|| format!("minor in {line:?}"))?;
            groups.insert((*name).to_owned(), (major, minor));
        }
        ensure!(
            groups.len() >= 2,
            "the node has {} VFIO groups, too few to check isolation:\n{listing}",
            groups.len()
        );
        let minors: Vec<u32> = groups.values().map(|(_, minor)| *minor).collect();
        let name = "isolation";
        let pod = pod_as(
            name,
            Ask::Limit(1),
            &isolation_script(&minors),
            Tenant::RootWithMknod,
        );
        self.cluster()
            .kubectl_stdin(&["apply", "-f", "-"], &pod)
            .context("creating the isolation pod")?;
        self.session
            .wait("the isolation pod's checks", POD_TIMEOUT, |c| {
                Ok(c.kubectl_output(&["logs", name])
                    .is_ok_and(|l| l.contains("isolation-done")))
            })?;
        let logs = self.cluster().kubectl_output(&["logs", name])?;
        let field = |prefix: &str| {
            logs.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let own = field("own:");
        let own_group = own.split_whitespace().next().unwrap_or_default().to_owned();
        let Some((major, own_minor)) = groups.get(&own_group).copied() else {
            bail!("the pod's own group {own_group:?} is not a VFIO group of the node {groups:?}:\n{logs}");
        };
        ensure!(
            own.ends_with(&format!(" {major}:{own_minor}")),
            "the pod's node of group {own_group} is not {major}:{own_minor} as on the node:\n{logs}"
        );
        let mut seen: Vec<String> = field("nodes:").split_whitespace().map(str::to_owned).collect();
        seen.sort();
        let mut want = vec![own_group.clone(), "vfio".to_owned()];
        want.sort();
        ensure!(
            seen == want,
            "the pod sees {seen:?} in /dev/vfio, not only its group and the container {want:?}:\n{logs}"
        );
        ensure!(
            field(&format!("minor {own_minor}:")) == "opened",
            "the control failed: the pod's own node of its group {own_group} (minor {own_minor}) did not open, so the other refusals prove nothing:\n{logs}"
        );
        let mut refused = 0;
        for (group, (_, minor)) in &groups {
            if *group == own_group {
                continue;
            }
            let outcome = field(&format!("minor {minor}:"));
            ensure!(
                outcome.ends_with("Operation not permitted"),
                "group {group} (minor {minor}) was not refused by the pod's device cgroup: {outcome:?}\n{logs}"
            );
            refused += 1;
        }
        self.delete_pods(&[name.to_owned()])?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "isolation: a root pod with MKNOD holding group {own_group} saw only it in /dev/vfio; its own made-up node of it opened, the {refused} other VFIO groups of the node were refused (Operation not permitted)"
        ));
        Ok(())
    }
}

/// The isolation pod's script: lists `/dev/vfio`, then makes its own
/// node for each group minor in `minors` (and for its own group, as the
/// control) and opens it read-write, printing one line per minor.
fn isolation_script(minors: &[u32]) -> String {
    let minors = minors.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    format!(
        "echo \"nodes: $(ls /dev/vfio | tr '\\n' ' ')\"; \
         grep CapEff /proc/self/status; \
         own=$(ls /dev/vfio | grep -v '^vfio$'); \
         set -- $(stat -c '%t %T' /dev/vfio/$own); \
         echo \"own: $own $((0x$1)):$((0x$2))\"; \
         for m in $((0x$2)) {minors}; do \
           if ! mknod /tmp/g$m c $((0x$1)) $m 2>/tmp/err; then echo \"minor $m: mknod: $(cat /tmp/err)\"; \
           elif (exec 3<>/tmp/g$m) 2>/tmp/err; then echo \"minor $m: opened\"; \
           else echo \"minor $m: $(cat /tmp/err)\"; fi; \
         done; echo isolation-done; exec sleep 86400"
    )
}
