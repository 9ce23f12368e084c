//! The reboot campaign: the node rebooted with its VFs' IOMMU groups renumbered.

use super::*;

impl Campaigns<'_> {
    /// The node rebooted with one more PCI device, which takes an IOMMU
    /// group at boot, so every VF's group number changes. Its root is a
    /// tmpfs: the VFs, their settings, the plugin's state and the CDI
    /// specs are all made again by vfplane from the NodeState. The pool
    /// must come back in its new groups and a pod must run the driver on
    /// a VF of it (its group node is the new one, or the driver cannot
    /// open the VF).
    ///
    /// # Errors
    /// The node not coming back, the groups not changing (the reboot
    /// would prove nothing), the pool not advertised again, the pod
    /// failing, anything left behind.
    pub fn reboot(&mut self, testbed: &crate::testbed::Testbed) -> Result<()> {
        let before = pool_groups(self.cluster())?;
        ensure!(
            before.len() == TOTAL_VFS,
            "the NodeState reports {} VFs of pool {POOL} with a group before the reboot: {before:?}",
            before.len()
        );
        let began = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.extra_devices.push(REBOOT_EXTRA_DEVICE.to_owned()),
            Duration::from_secs(600),
        )?;
        let ready = began.elapsed();
        let mut after = BTreeMap::new();
        self.session.wait(
            "the pool's VFs made again in new IOMMU groups and advertised",
            Duration::from_secs(600),
            |c| {
                let groups = pool_groups(c)?;
                let renumbered =
                    groups.len() == TOTAL_VFS && groups.iter().all(|(vf, g)| before.get(vf) != Some(g));
                after = groups;
                Ok(renumbered && allocatable(c, POOL) == TOTAL_VFS.to_string())
            },
        )?;
        let advertised = began.elapsed();
        self.wait_webhook()?;
        let webhook = began.elapsed();
        let name = self.create_churn_pod(1)?;
        let held = self.check_churn_pod(&name)?;
        let pod_ran = began.elapsed();
        self.delete_pods(&[name])?;
        self.check_clean(&[])?;
        let groups =
            |map: &BTreeMap<String, u64>| map.values().map(u64::to_string).collect::<Vec<_>>().join(",");
        self.report.add(format!(
            "reboot: node powered off and booted with one more PCI device: Ready (new boot) {:.1} s after the \
             power-off, pool {POOL} advertised again in new IOMMU groups ({} -> {}) at {:.1} s, vfplane's admission \
             webhook answering at {:.1} s, a pod ran the driver on {} at {:.1} s",
            ready.as_secs_f64(),
            groups(&before),
            groups(&after),
            advertised.as_secs_f64(),
            webhook.as_secs_f64(),
            held.join(", "),
            pod_ran.as_secs_f64()
        ));
        Ok(())
    }
}

/// The IOMMU group of each VF of the pool, as the NodeState reports it.
fn pool_groups(cluster: &Cluster) -> Result<BTreeMap<String, u64>> {
    Ok(node_vf_statuses(cluster)?
        .iter()
        .filter(|vf| vf["pool"] == POOL)
        .filter_map(|vf| Some((vf["pciAddress"].as_str()?.to_owned(), vf["iommuGroup"].as_u64()?)))
        .collect())
}
