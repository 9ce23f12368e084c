//! The shared-group campaign: VFs in one IOMMU group.

use super::*;

impl Campaigns<'_> {
    /// Shared group: the node rebooted with its PF behind a PCIe root port
    /// without ACS ([`Topology::SharedIommuGroup`]), so the kernel puts the
    /// port, the PF and every VF it makes in one IOMMU group; the pool's
    /// policy then points at the PF's new address. The agent makes the VFs
    /// and binds them to vfio-pci, and must report each as not isolated;
    /// the plugin must never advertise one: every allocatable of the pool
    /// the API server sends (on a watch, from before the policy change to
    /// the end) is 0, and a pod asking for a VF is not scheduled. Then the
    /// node boots its usual topology again, the policy points back, and
    /// the pool must come back clean.
    ///
    /// # Errors
    /// A VF of the shared group advertised or reported isolated, a pod
    /// scheduled on it, or the pool not coming back.
    pub fn shared_group(&mut self, testbed: &crate::testbed::Testbed) -> Result<()> {
        let began = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.topology = Topology::SharedIommuGroup,
            Duration::from_secs(600),
        )?;
        let ready = began.elapsed();
        // The new boot's kubelet starts knowing no device resource, and the
        // API server still shows the pool's count from before the reboot.
        // The policy still names the old PF, absent now, so the pool has
        // no VF; it must still be served, empty, so that the kubelet
        // reports it at 0 (a kubelet that never heard of it kept the old
        // count and started a pod asking for a VF without one).
        self.session.wait(
            "the pool with no VF reported at 0 by the new boot's kubelet",
            Duration::from_secs(300),
            |c| Ok(allocatable(c, POOL) == "0"),
        )?;
        let zero = began.elapsed();
        self.wait_webhook()?;
        let watch = AllocatableWatch::start(self.session.cluster(), POOL, Duration::from_secs(30))?;
        self.select_pf(SHARED_GROUP_PF)?;
        let mut shared = Vec::new();
        self.session.wait(
            "the pool's VFs made in the shared group and reported not isolated",
            Duration::from_secs(300),
            |c| {
                shared = node_vf_statuses(c)?
                    .into_iter()
                    .filter(|vf| vf["pool"] == POOL && vf["driver"] == "vfio-pci")
                    .collect();
                Ok(shared.len() == TOTAL_VFS)
            },
        )?;
        let made = began.elapsed();
        let groups: std::collections::BTreeSet<u64> =
            shared.iter().filter_map(|vf| vf["iommuGroup"].as_u64()).collect();
        let group = match groups.iter().collect::<Vec<_>>().as_slice() {
            [group] if groups.len() == 1 => **group,
            _ => bail!("the pool's VFs are not in one IOMMU group: {groups:?}"),
        };
        for vf in &shared {
            ensure!(
                vf["isolated"] == false && vf["health"].as_str().is_some_and(|h| h.starts_with("Unhealthy")),
                "a VF of the shared group is reported isolated or healthy: {vf}"
            );
        }
        let members = self
            .session
            .cluster_mut()
            .node_exec(&format!("ls /sys/kernel/iommu_groups/{group}/devices"))?;
        let members: Vec<&str> = members.split_whitespace().collect();
        ensure!(
            members.contains(&SHARED_GROUP_PF) && members.len() > TOTAL_VFS + 1,
            "IOMMU group {group} holds {members:?}, not the PF and its {TOTAL_VFS} VFs with the port"
        );
        // A pod asking for a VF: the scheduler finds none.
        let name = self.create_churn_pod(1)?;
        let resource = format!("vfplane.io/{POOL}");
        self.session
            .wait("the scheduler refusing the pod", Duration::from_secs(60), |c| {
                Ok(crate::session::events(c, "default", "FailedScheduling")?
                    .iter()
                    .any(|e| {
                        e["involvedObject"]["name"] == name.as_str()
                            && e["message"].as_str().is_some_and(|m| m.contains(&resource))
                    }))
            })?;
        let phase = self.session.jsonpath(&[
            "get",
            "pod",
            &name,
            "-o=jsonpath={.status.phase}/{.spec.nodeName}",
        ]);
        ensure!(
            phase == "Pending/",
            "pod {name} was not left pending unscheduled: {phase}"
        );
        self.delete_pods(&[name])?;
        let seen = watch.finish();
        let advertised: Vec<&String> = seen
            .iter()
            .map(|(_, value)| value)
            .filter(|value| value.as_str() != "0")
            .collect();
        ensure!(
            advertised.is_empty(),
            "the pool's allocatable was not 0 while its VFs were in a shared IOMMU group: {advertised:?}"
        );
        let health = shared
            .first()
            .and_then(|vf| vf["health"].as_str())
            .unwrap_or_default()
            .to_owned();

        // Back to the usual topology: the pool must come back clean.
        let back = Instant::now();
        self.session.cluster_mut().reboot_node(
            testbed,
            |guest| guest.topology = Topology::SinglePf,
            Duration::from_secs(600),
        )?;
        self.wait_webhook()?;
        self.select_pf("0000:00:02.0")?;
        self.session
            .wait_allocatable(POOL, u32::try_from(TOTAL_VFS)?, Duration::from_secs(300))?;
        self.check_clean(&[])?;
        self.report.add(format!(
            "shared-group: node booted with its PF behind a root port without ACS: Ready {:.1} s after the power-off, \
             the pool (no VF yet) reported at 0 at {:.1} s; {TOTAL_VFS} VFs made and bound at {:.1} s, all in IOMMU group {group} with {} devices ({}), each \
             reported \"{health}\"; allocatable of {POOL} 0 throughout ({} values on the watch); a pod asking \
             for one left unscheduled (FailedScheduling); usual topology again: pool back and clean {:.1} s after \
             that power-off",
            ready.as_secs_f64(),
            zero.as_secs_f64(),
            made.as_secs_f64(),
            members.len(),
            members.join(" "),
            seen.len(),
            back.elapsed().as_secs_f64(),
        ));
        Ok(())
    }

    /// Points the pool's policy at the PF at `address`.
    fn select_pf(&mut self, address: &str) -> Result<()> {
        let patch = format!(r#"{{"spec":{{"nicSelector":{{"pciAddresses":["{address}"]}}}}}}"#);
        self.session
            .kubectl(&["patch", "vfpolicy", POOL, "--type=merge", "-p", &patch])?;
        Ok(())
    }
}
