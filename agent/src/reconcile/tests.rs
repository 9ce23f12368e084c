//! Reconcile passes on a fake sysfs tree and an in-memory netlink.

use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_proto::node_state::StateFile;
use vfplane_proto::vf_health::VfHealth;

use super::*;
use crate::netlink::fake::FakeNetlink;

const PF: &str = "0000:00:02.0";

/// The testbed's node with 4 VFs made: VFs 0-1 on vfio-pci, 2-3 on igbvf.
fn node() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut pf = FakeDevice::igb_pf(PF.parse().unwrap());
    pf.iommu_group = Some(3);
    fake.add_pf(&pf, 7, "eth0").unwrap();
    let vfs = fake.add_vfs(PF.parse().unwrap(), 4, Some(4), -1).unwrap();
    for (i, vf) in vfs.iter().enumerate() {
        if i < 2 {
            fake.set_driver(*vf, Some("vfio-pci")).unwrap();
            fake.add_vfio_node(4 + i as u32).unwrap();
        } else {
            fake.set_driver(*vf, Some("igbvf")).unwrap();
        }
    }
    fake
}

fn spec(text: &str) -> NodeStateSpec {
    StateFile::from_yaml(text).unwrap().spec
}

const GOOD: &str = r#"
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 4
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
        - resourceName: kernel
          vfRange: "2-3"
          deviceType: netdevice
          vlan: 100
          linkState: disable
"#;

/// A reconciler over `fake` whose PF reports 4 fresh VFs on eth0 (see
/// [`FakeNetlink::with_fresh_vfs`]); `setup` adjusts the stand-in first.
fn reconciler_with(fake: &FakeSysfs, setup: impl FnOnce(&FakeNetlink)) -> Reconciler<FakeNetlink> {
    let netlink = FakeNetlink::with_fresh_vfs("eth0", 4);
    setup(&netlink);
    // An empty process list: nobody holds any VF.
    let proc_root = fake.sysfs_root().join("no-processes");
    std::fs::create_dir_all(&proc_root).unwrap();
    Reconciler::new(fake.host(), netlink, "node-1", proc_root)
}

#[test]
fn converges_sets_link_attributes_and_writes_pools_for_vfio_vfs() {
    let fake = node();
    let agent = reconciler_with(&fake, |_| {});
    let report = agent.apply(&spec(GOOD));
    assert!(report.converged, "{:?}", report.errors);
    assert_eq!(
        agent.netlink().writes(),
        [
            "eth0 vf 0 mac",
            "eth0 vf 1 mac",
            "eth0 vf 2 mac",
            "eth0 vf 2 vlan",
            "eth0 vf 2 link_state",
            "eth0 vf 3 mac",
            "eth0 vf 3 vlan",
            "eth0 vf 3 link_state"
        ],
        "only what differs from the kernel's defaults is written"
    );
    let status = &report.status;
    assert_eq!(status.pfs[0].vfs[0].mac.as_deref(), Some("02:00:00:00:00:01"));
    assert_eq!(status.pfs[0].vfs[2].vlan, 100);
    assert_eq!(
        status.pfs[0].vfs[2].mac,
        Some(derived_mac("node-1", PF, 2).to_string())
    );
    assert!(
        status.pfs[0].vfs.iter().all(|vf| vf.health.is_healthy()),
        "{status:?}"
    );
    assert_eq!(status.conditions[0].status, "True");
    assert_eq!(report.pools.pools.len(), 1, "netdevice VFs are not advertised");
    assert_eq!(report.pools.pools[0].name, "fast");
    assert_eq!(report.pools.pools[0].listed_devices().len(), 2);

    // A second pass over a matching node writes nothing.
    agent.netlink().clear_writes();
    let again = agent.apply(&spec(GOOD));
    assert!(again.converged);
    assert!(
        agent.netlink().writes().is_empty(),
        "{:?}",
        agent.netlink().writes()
    );
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
        "4\n"
    );
}

#[test]
fn a_kernel_vf_mac_the_pf_lost_is_written_again_after_the_driver_probed() {
    let fake = node();
    // The PF loses the first MAC write to kernel-driver VF 2.
    let agent = reconciler_with(&fake, |n| n.lose_mac_writes(2, 1));
    let report = agent.apply(&spec(GOOD));
    assert!(report.converged, "{:?}", report.errors);
    let writes = agent.netlink().writes();
    assert_eq!(
        writes.iter().filter(|w| *w == "eth0 vf 2 mac").count(),
        2,
        "written, lost, read back and written again: {writes:?}"
    );
    assert_eq!(
        report.status.pfs[0].vfs[2].mac,
        Some(derived_mac("node-1", PF, 2).to_string())
    );
}

#[test]
fn a_kernel_vf_mac_the_pf_never_keeps_is_reported_after_three_writes() {
    let fake = node();
    let agent = reconciler_with(&fake, |_| {});
    agent.netlink().lose_mac_writes(2, usize::MAX);
    let report = agent.apply(&spec(GOOD));
    assert!(!report.converged);
    let errors = report.errors.join("\n");
    assert!(
        errors.contains(
            "VF 2 (0000:00:12.4): the PF kept another MAC than the spec's after 3 writes and driver rebinds"
        ),
        "{errors}"
    );
}

#[test]
fn a_pools_limits_are_the_strictest_of_its_groups() {
    let fake = node();
    let agent = reconciler_with(&fake, |_| {});
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 4\n      vfGroups:\n        - {resourceName: fast, vfRange: \"0\", containerLimits: {lockedMemoryBytes: 1048576, pidsMax: 100}}\n        - {resourceName: fast, vfRange: \"1\", containerLimits: {lockedMemoryBytes: 67108864, pidsMax: 512, numaAligned: true}}\n";
    let report = agent.apply(&spec(text));
    assert!(report.converged, "{:?}", report.errors);
    let limits = report.pools.pools[0].container_limits;
    assert_eq!(
        (limits.locked_memory_bytes, limits.pids_max, limits.numa_aligned),
        (Some(67_108_864), Some(100), true)
    );
    let yaml = report.pools.to_yaml().unwrap();
    assert!(yaml.contains("lockedMemoryBytes: 67108864"), "{yaml}");
}

#[test]
fn bad_pf_entries_are_reported_and_the_good_one_still_converges() {
    for (bad, words) in [
        (
            r#"{pciAddress: "0000:99:00.0", numVfs: 1}"#,
            "no SR-IOV PF 0000:99:00.0",
        ),
        (
            r#"{pciAddress: "0000:zz:00.0", numVfs: 1}"#,
            "invalid PCI address",
        ),
        (
            r#"{pfName: eth9, numVfs: 1}"#,
            "no SR-IOV PF with interface \"eth9\"",
        ),
    ] {
        let fake = node();
        let agent = reconciler_with(&fake, |_| {});
        let text = format!("{GOOD}    - {bad}\n");
        let report = agent.apply(&spec(&text));
        assert!(!report.converged);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert!(report.errors[0].contains(words), "{}", report.errors[0]);
        assert!(report.status.pfs[0].error.is_none());
        assert!(report.status.pfs[0].vfs.iter().all(|vf| vf.health.is_healthy()));
        assert_eq!(report.status.conditions[0].status, "False");
        assert_eq!(report.pools.pools.len(), 1, "the good PF's pool is still written");
    }
}

#[test]
fn invalid_values_on_a_pf_name_the_problem_and_change_nothing_there() {
    let cases = [
        (
            "numVfs: 8",
            "numVfs 8 is beyond what the device supports (sriov_totalvfs 7)",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: a, vfRange: \"0-2\"}, {resourceName: b, vfRange: \"2-3\"}]",
            "VF 2 is already in vfGroup \"a\"",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: a, vfRange: \"3-5\"}]",
            "names VF 4, but numVfs is 4",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: a, vfRange: \"0\", macs: [\"02:00:00:00:00\"]}]",
            "invalid MAC",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: \"a b\", vfRange: \"0\"}]",
            "not a valid resource name",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: a, vfRange: \"x\"}]",
            "vfRange part \"x\"",
        ),
        (
            "numVfs: 4\n      vfGroups: [{resourceName: a, vfRange: \"0\", linkState: up}]",
            "unknown linkState \"up\"",
        ),
    ];
    for (body, words) in cases {
        let fake = node();
        let agent = reconciler_with(&fake, |_| {});
        let text = format!("spec:\n  pfs:\n    - pciAddress: \"{PF}\"\n      {body}\n");
        let report = agent.apply(&spec(&text));
        assert!(!report.converged, "{body}");
        assert!(
            report.errors.iter().any(|e| e.contains(words)),
            "{body}: {:?}",
            report.errors
        );
        assert!(
            report.status.pfs[0]
                .error
                .as_deref()
                .is_some_and(|e| e.contains(words))
        );
        assert!(
            agent.netlink().writes().is_empty(),
            "nothing written for a bad entry"
        );
        assert_eq!(
            fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
            "4\n"
        );
    }
}

#[test]
fn a_refused_setting_is_reported_on_its_vf() {
    let fake = node();
    let agent = reconciler_with(&fake, |n| n.refuse(crate::netlink::VfSetting::Vlan));
    let report = agent.apply(&spec(GOOD));
    assert!(!report.converged);
    assert!(
        report.errors[0].contains("setting vlan of VF 2 on eth0"),
        "{:?}",
        report.errors
    );
}

#[test]
fn vfs_on_the_wrong_driver_are_unhealthy_and_kept_out_of_the_pool() {
    let fake = node();
    // The kernel refuses the rebind here (the fake tree does not react), as
    // when vfio-pci is not loaded.
    fake.set_driver("0000:00:12.0".parse().unwrap(), Some("igbvf"))
        .unwrap();
    let agent = reconciler_with(&fake, |_| {});
    let report = agent.apply(&spec(GOOD));
    assert!(!report.converged);
    let vf0 = &report.status.pfs[0].vfs[0];
    assert!(
        vf0.health
            .to_string()
            .starts_with("Unhealthy: bound to igbvf, not vfio-pci"),
        "{}",
        vf0.health
    );
    assert_eq!(
        report.pools.pools[0].listed_devices(),
        ["0000:00:12.2".parse().unwrap()]
    );
}

#[test]
fn no_iommu_keeps_vfio_vfs_out_unless_allowed() {
    let fake = FakeSysfs::new().unwrap();
    fake.add_pf(&FakeDevice::igb_pf(PF.parse().unwrap()), 7, "eth0")
        .unwrap();
    // VFIO's no-IOMMU mode: each VF bound to vfio-pci gets a group whose
    // node is `noiommu-<group>`.
    let vfs = fake.add_vfs(PF.parse().unwrap(), 2, Some(10), -1).unwrap();
    for (group, vf) in (10..).zip(&vfs) {
        fake.set_driver(*vf, Some("vfio-pci")).unwrap();
        fake.add_noiommu_vfio_node(group).unwrap();
    }
    let text = "spec:\n  pfs:\n    - {pciAddress: \"0000:00:02.0\", numVfs: 2, vfGroups: [{resourceName: a, vfRange: \"0-1\"}]}\n";
    let agent = reconciler_with(&fake, |_| {});
    let report = agent.apply(&spec(text));
    assert!(!report.converged);
    assert!(
        report.errors[0].contains(
            "only /dev/vfio/noiommu-10 exists (no DMA isolation) and the pool does not set allowNoIommu"
        ),
        "{:?}",
        report.errors
    );
    // Served with no VF (the kubelet reports it at 0), not left out.
    assert_eq!(report.pools.pools.len(), 1);
    assert_eq!(report.pools.pools[0].name, "a");
    assert_eq!(report.pools.pools[0].devices, Some(Vec::new()));
    let allowed = text.replace("spec:\n", "spec:\n  allowNoIommu: true\n");
    let report = agent.apply(&spec(&allowed));
    assert!(report.converged, "{:?}", report.errors);
    assert!(report.pools.pools[0].allow_no_iommu);
    assert_eq!(report.pools.pools[0].listed_devices(), vfs);
}

#[test]
fn a_vfio_vf_without_an_iommu_group_is_unhealthy_even_where_no_iommu_is_allowed() {
    // No IOMMU and VFIO's no-IOMMU mode off: vfio-pci gives the VF no
    // group, so no container could open it. The device plugin keeps such
    // a VF out; the agent's status says the same (the one readiness check).
    let fake = FakeSysfs::new().unwrap();
    fake.add_pf(&FakeDevice::igb_pf(PF.parse().unwrap()), 7, "eth0")
        .unwrap();
    for vf in fake.add_vfs(PF.parse().unwrap(), 2, None, -1).unwrap() {
        fake.set_driver(vf, Some("vfio-pci")).unwrap();
    }
    let text = "spec:\n  allowNoIommu: true\n  pfs:\n    - {pciAddress: \"0000:00:02.0\", numVfs: 2, vfGroups: [{resourceName: a, vfRange: \"0-1\"}]}\n";
    let report = reconciler_with(&fake, |_| {}).apply(&spec(text));
    assert!(!report.converged);
    let vf0 = &report.status.pfs[0].vfs[0];
    assert_eq!(
        vf0.health,
        VfHealth::Unhealthy("no IOMMU group (no IOMMU on the node?)".into()),
        "{vf0:?}"
    );
    assert_eq!(report.pools.pools[0].devices, Some(Vec::new()));
}

#[test]
fn a_pool_whose_pf_is_absent_is_served_empty_and_netdevice_pools_never() {
    // After a reboot into another topology, say: the PF the spec names is
    // not on the node. The pool must still reach the plugin, empty, so
    // that the kubelet knows the resource and reports it at 0.
    let fake = node();
    let agent = reconciler_with(&fake, |_| {});
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:09.0\"\n      numVfs: 2\n      vfGroups:\n        - {resourceName: gone, vfRange: \"0\", deviceType: vfio-pci}\n        - {resourceName: kernel, vfRange: \"1\", deviceType: netdevice}\n";
    let report = agent.apply(&spec(text));
    assert!(!report.converged);
    assert!(
        report.errors.iter().any(|e| e.contains("0000:00:09.0")),
        "{:?}",
        report.errors
    );
    let pools = pool_sizes(&report);
    assert_eq!(pools, [("gone", Some(0))]);
    let written = report.pools.to_yaml().unwrap();
    assert_eq!(
        vfplane_proto::pool::PoolConfig::from_yaml(&written).unwrap(),
        report.pools
    );

    // A pool the spec names with no PF at all (the controller found none
    // of the policy's PFs on the node): served empty too. An invalid name
    // is reported, not written (the plugin would refuse the whole file).
    let only_named = "spec:\n  pools: [elsewhere, \"Bad Name\"]\n";
    let report = agent.apply(&spec(only_named));
    let pools = pool_sizes(&report);
    assert_eq!(pools, [("elsewhere", Some(0))]);
    assert!(
        report.errors.iter().any(|e| e.contains("Bad Name")),
        "{:?}",
        report.errors
    );
}

#[test]
fn a_netlink_read_that_fails_for_the_status_is_reported_on_the_pf() {
    let fake = node();
    // The apply's own read works; the status's read after it fails.
    let agent = reconciler_with(&fake, |n| n.fail_reads_from(1));
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 4\n      vfGroups:\n        - {resourceName: fast, vfRange: \"0-1\", deviceType: vfio-pci}\n";
    let report = agent.apply(&spec(text));
    let pf = &report.status.pfs[0];
    assert!(
        pf.error
            .as_deref()
            .is_some_and(|e| e.contains("cannot read the VFs' settings") && e.contains("eth0")),
        "{:?}",
        pf.error
    );
    assert!(
        !report.converged,
        "a PF whose settings cannot be read is not converged"
    );
}

#[test]
fn an_unreadable_process_list_keeps_vfs_it_cannot_vouch_for() {
    let fake = node();
    let missing = fake.sysfs_root().join("no-such-proc");
    let agent = Reconciler::new(fake.host(), FakeNetlink::default(), "node-1", &missing);
    let report = agent.apply(&spec(
        "spec:\n  pfs:\n    - {pciAddress: \"0000:00:02.0\", numVfs: 2}\n",
    ));
    assert!(!report.converged);
    assert!(
        report.errors[0].contains("cannot tell whether VF") && report.errors[0].contains("no-such-proc"),
        "{:?}",
        report.errors
    );
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
        "4\n",
        "nothing written: not knowing who holds a VF is never \"nobody\""
    );
}

#[test]
fn holder_scan_skips_processes_that_are_gone_and_names_a_missing_proc() {
    let proc_root = tempfile::tempdir().unwrap();
    // A process listed without its fd directory: it exited during the scan.
    std::fs::create_dir_all(proc_root.path().join("17")).unwrap();
    std::fs::create_dir_all(proc_root.path().join("4242/fd")).unwrap();
    std::os::unix::fs::symlink("/dev/vfio/4", proc_root.path().join("4242/fd/7")).unwrap();
    let node = std::path::Path::new("/dev/vfio/4");
    assert_eq!(vfio_group_holders(proc_root.path(), node, 4).unwrap(), [4242]);
    let other = std::path::Path::new("/dev/vfio/5");
    assert!(vfio_group_holders(proc_root.path(), other, 5).unwrap().is_empty());
    let missing = proc_root.path().join("absent");
    let error = vfio_group_holders(&missing, node, 4).unwrap_err().to_string();
    assert!(error.contains("absent"), "{error}");
}

#[test]
fn shrinking_numvfs_writes_through_zero_and_spares_vfs_in_use() {
    let fake = node();
    // A process holds VF 0's group open.
    let proc_root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(proc_root.path().join("4242/fd")).unwrap();
    std::os::unix::fs::symlink("/dev/vfio/4", proc_root.path().join("4242/fd/7")).unwrap();
    let agent = Reconciler::new(fake.host(), FakeNetlink::default(), "node-1", proc_root.path());
    let text = "spec:\n  pfs:\n    - {pciAddress: \"0000:00:02.0\", numVfs: 2}\n";
    let report = agent.apply(&spec(text));
    assert!(!report.converged);
    assert!(
        report.errors[0].contains("in use by pid [4242]"),
        "{:?}",
        report.errors
    );
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
        "4\n",
        "nothing written"
    );
    // force: the kernel gets 0 then 2 (the fake keeps the last write).
    let forced = text.replace("numVfs: 2}", "numVfs: 2, force: true}");
    agent.apply(&spec(&forced));
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
        "2"
    );
}

#[test]
fn a_trusted_vf_handed_out_keeps_its_tenants_mac_and_an_untrusted_one_is_repaired() {
    let fake = node();
    let state = tempfile::tempdir().unwrap();
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 4\n      vfGroups:\n        - {resourceName: trusted, vfRange: \"0\", trust: true, macs: [\"02:00:00:00:00:01\"]}\n        - {resourceName: plain, vfRange: \"1\", macs: [\"02:00:00:00:00:02\"]}\n";
    let agent = reconciler_with(&fake, |_| {}).with_handed_out_marks(state.path());
    assert!(agent.apply(&spec(text)).converged);
    let vfs: Vec<PciAddress> = ["0000:00:12.0", "0000:00:12.2"]
        .map(|a| a.parse().unwrap())
        .to_vec();
    for vf in &vfs {
        vfplane_proto::vf_state::mark_handed_out(state.path(), *vf).unwrap();
    }
    // Both tenants change their MAC (only a trusted VF could, on igb; the
    // other stands for anything else that changed it).
    let tenant: Mac = "02:00:00:00:01:01".parse().unwrap();
    for index in [0, 1] {
        let mut link = agent.netlink().get("eth0", index).unwrap();
        link.mac = tenant;
        agent.netlink().insert("eth0", link);
    }
    agent.netlink().clear_writes();
    let report = agent.apply(&spec(text));
    assert!(report.converged, "{:?}", report.errors);
    let writes = agent.netlink().writes();
    assert_eq!(
        writes,
        ["eth0 vf 1 mac"],
        "the trusted VF's MAC is its tenant's, the other one is repaired"
    );
    assert_eq!(agent.netlink().get("eth0", 0).unwrap().mac, tenant);
    assert_eq!(
        agent.netlink().get("eth0", 1).unwrap().mac.to_string(),
        "02:00:00:00:00:02",
        "the untrusted VF's MAC is repaired: {writes:?}"
    );
    let vf0 = &report.status.pfs[0].vfs[0];
    assert!(vf0.health.is_healthy(), "{vf0:?}");
    assert_eq!(
        report
            .pools
            .pools
            .iter()
            .find(|p| p.name == "trusted")
            .map(|p| p.listed_devices().len()),
        Some(1)
    );
    // Released (the mark gone): the spec's MAC again.
    vfplane_proto::vf_state::clear_handed_out(state.path(), vfs[0]).unwrap();
    assert!(agent.apply(&spec(text)).converged);
    assert_eq!(
        agent.netlink().get("eth0", 0).unwrap().mac.to_string(),
        "02:00:00:00:00:01"
    );
}

#[test]
fn a_dra_claims_settings_are_written_answered_and_dropped_with_the_claim() {
    let fake = node();
    let state = tempfile::tempdir().unwrap();
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 4\n      vfGroups:\n        - {resourceName: dra, vfRange: \"0-1\", vlan: 10, macs: [\"02:00:00:00:00:01\", \"02:00:00:00:00:02\"]}\n";
    let agent = reconciler_with(&fake, |_| {}).with_handed_out_marks(state.path());
    assert!(agent.apply(&spec(text)).converged);
    let vf0: PciAddress = "0000:00:12.0".parse().unwrap();
    let vf1: PciAddress = "0000:00:12.2".parse().unwrap();
    let claim: vfplane_proto::vf_config::VfOverrides =
        "mac=02:aa:00:00:00:07 vlan=120 trust=on".parse().unwrap();
    vfplane_proto::vf_config::write_claim_config(state.path(), vf0, &claim).unwrap();
    // Prepared with no settings of its own: the pool's, answered all the same.
    vfplane_proto::vf_config::write_claim_config(state.path(), vf1, &Default::default()).unwrap();
    agent.netlink().clear_writes();
    let report = agent.apply(&spec(text));
    assert!(report.converged, "{:?}", report.errors);
    assert_eq!(
        agent.netlink().writes(),
        ["eth0 vf 0 mac", "eth0 vf 0 vlan", "eth0 vf 0 trust"]
    );
    let link = agent.netlink().get("eth0", 0).unwrap();
    assert_eq!(
        (link.mac.to_string().as_str(), link.vlan, link.trust),
        ("02:aa:00:00:00:07", 120, Some(true))
    );
    let vf_status = &report.status.pfs[0].vfs[0];
    assert!(
        vf_status.health.is_healthy(),
        "the claim's settings are not a mismatch: {vf_status:?}"
    );
    let answer = |vf| {
        vfplane_proto::vf_config::read_claim_config_result(state.path(), vf)
            .unwrap()
            .unwrap()
    };
    assert_eq!(answer(vf0).config, "mac=02:aa:00:00:00:07 vlan=120 trust=on");
    assert_eq!(answer(vf0).outcome, Ok(()));
    assert_eq!((answer(vf1).config.as_str(), answer(vf1).outcome), ("", Ok(())));
    // The next pass keeps them and writes nothing; and the VF is trusted
    // now, so a MAC its tenant sets is the tenant's.
    let mut link = agent.netlink().get("eth0", 0).unwrap();
    link.mac = "02:00:00:00:01:01".parse().unwrap();
    agent.netlink().insert("eth0", link);
    agent.netlink().clear_writes();
    assert!(agent.apply(&spec(text)).converged);
    assert!(
        agent.netlink().writes().is_empty(),
        "{:?}",
        agent.netlink().writes()
    );

    // Settings the agent does not understand are answered as a failure,
    // and the VF keeps the pool's.
    std::fs::write(
        vfplane_proto::vf_config::claim_config_path(state.path(), vf1),
        "vlan=9999\n",
    )
    .unwrap();
    assert!(agent.apply(&spec(text)).converged);
    let failed = answer(vf1).outcome.unwrap_err();
    assert!(failed.contains("vlan 9999 is out of range"), "{failed}");
    assert_eq!(agent.netlink().get("eth0", 1).unwrap().vlan, 10);

    // The claim gone: the spec's settings again.
    vfplane_proto::vf_config::clear_claim_config(state.path(), vf0).unwrap();
    assert!(agent.apply(&spec(text)).converged);
    let link = agent.netlink().get("eth0", 0).unwrap();
    assert_eq!(
        (link.mac.to_string().as_str(), link.vlan, link.trust),
        ("02:00:00:00:00:01", 10, Some(false))
    );
}

/// Each written pool's name and how many devices it lists (`None`: by
/// selector only).
fn pool_sizes(report: &ApplyReport) -> Vec<(&str, Option<usize>)> {
    report
        .pools
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.devices.as_ref().map(Vec::len)))
        .collect()
}

#[test]
fn vfs_waiting_to_be_recreated_are_handed_out_no_more() {
    let fake = node();
    let proc_root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(proc_root.path().join("4242/fd")).unwrap();
    std::os::unix::fs::symlink("/dev/vfio/4", proc_root.path().join("4242/fd/7")).unwrap();
    let agent = Reconciler::new(fake.host(), FakeNetlink::default(), "node-1", proc_root.path());
    let text = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 2\n      vfGroups:\n        \
                - {resourceName: fast, vfRange: \"0-1\", deviceType: vfio-pci}\n";
    let report = agent.apply(&spec(text));
    assert!(!report.converged);
    let pf = &report.status.pfs[0];
    assert_eq!(pf.num_vfs, 4, "nothing written while VF 0 is held");
    for vf in pf.vfs.iter().filter(|vf| vf.index < 2) {
        let health = vf.health.to_string();
        assert!(
            health.contains("to be re-created") && health.contains("from 4 to 2"),
            "VF {}: {health}",
            vf.index
        );
    }
    let pool = report.pools.pools.iter().find(|p| p.name == "fast").unwrap();
    assert_eq!(
        pool.devices.as_deref(),
        Some(&[][..]),
        "served empty: no VF that goes is handed out"
    );
}
