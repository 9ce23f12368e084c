//! The foundation, end to end on the emulated SR-IOV node: the real igb PF
//! driver, a real intel-iommu, vfio-pci, and `vfplane-agent discover` reading
//! the kernel's sysfs.

#![allow(clippy::expect_used)] // test helpers: a panic is the failure report

use serde_json::Value;
use xtask::testbed::{GuestOptions, Testbed};

const SCRIPT: &str = r#"
set -e
pf=/sys/bus/pci/devices/0000:00:02.0
vfplane-agent discover --json
echo 4 > $pf/sriov_numvfs
vfplane-agent discover --json
vf=$(basename "$(readlink $pf/virtfn0)")
echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
echo "$vf" > /sys/bus/pci/drivers_probe
vfplane-agent discover --json
"#;

fn pf(model: &Value) -> &Value {
    let pfs = model["pfs"].as_array().expect("pfs is an array");
    assert_eq!(pfs.len(), 1, "one PF in the guest: {model}");
    &pfs[0]
}

#[test]
fn discovers_the_pf_makes_isolated_vfs_and_binds_vfio() {
    if !xtask::e2e::enabled(
        "discovers_the_pf_makes_isolated_vfs_and_binds_vfio",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let outcome = testbed
        .run(SCRIPT, &GuestOptions::default(), false)
        .expect("guest runs");
    assert_eq!(
        outcome.exit_code, 0,
        "script failed:\n{}\n--- console ---\n{}",
        outcome.output, outcome.console
    );
    let models = outcome.json_lines();
    assert_eq!(models.len(), 3, "three discover runs:\n{}", outcome.output);

    // Before: the 82576 PF on igb, SR-IOV capable with 7 VFs, none made yet.
    let before = pf(&models[0]);
    assert_eq!(models[0]["iommu"]["enabled"], true);
    assert_eq!(before["address"], "0000:00:02.0");
    assert_eq!(
        (before["vendor"].as_str(), before["device"].as_str()),
        (Some("8086"), Some("10c9"))
    );
    assert_eq!(before["driver"], "igb");
    assert_eq!(before["totalVfs"], 7);
    assert_eq!(before["numVfs"], 0);
    assert_eq!(before["vfs"].as_array().map(Vec::len), Some(0));

    // After `echo 4 > sriov_numvfs`: 4 VFs 8086:10ca, each alone in its own group.
    let after = pf(&models[1]);
    assert_eq!(after["numVfs"], 4);
    let vfs = after["vfs"].as_array().expect("vfs");
    assert_eq!(vfs.len(), 4);
    let mut groups = Vec::new();
    for (index, vf) in vfs.iter().enumerate() {
        assert_eq!(vf["index"], index);
        assert_eq!(vf["device"], "10ca");
        assert_eq!(vf["pf"], "0000:00:02.0");
        assert_eq!(vf["isolated"], true, "VF {index} isolated: {vf}");
        let members = vf["iommu"]["members"].as_array().expect("members");
        assert_eq!(members, &[vf["address"].clone()], "the group holds only the VF");
        groups.push(vf["iommu"]["id"].as_u64().expect("group id"));
    }
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(groups.len(), 4, "every VF in its own IOMMU group");
    assert!(
        models[1]["problems"].as_array().is_some_and(Vec::is_empty),
        "{}",
        models[1]
    );

    // After binding VF 0 to vfio-pci: its /dev/vfio/<group> exists.
    let bound = &pf(&models[2])["vfs"][0];
    assert_eq!(bound["driver"], "vfio-pci");
    let group = bound["iommu"]["id"].as_u64().expect("group");
    assert_eq!(bound["vfioDevice"], format!("/dev/vfio/{group}"));
    let others = pf(&models[2])["vfs"].as_array().expect("vfs")[1..].to_vec();
    assert!(
        others.iter().all(|vf| vf["vfioDevice"].is_null()),
        "only VF 0 has a VFIO node"
    );
}
