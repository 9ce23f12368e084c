//! Unit tests of the host model on fake sysfs trees.

use std::fs;

use super::*;
use crate::fake::{FakeDevice, FakeSysfs};

fn addr(text: &str) -> PciAddress {
    text.parse().unwrap()
}

const PF: &str = "0000:00:02.0";

/// A node like the testbed's: one igb PF with IOMMU group 3 and `vfs` VFs in
/// groups 4.., the first one bound to vfio-pci with its /dev/vfio node.
fn testbed_like(vfs: u16) -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut pf = FakeDevice::igb_pf(addr(PF));
    pf.iommu_group = Some(3);
    fake.add_pf(&pf, 7, "eth0").unwrap();
    let made = fake.add_vfs(addr(PF), vfs, Some(4), -1).unwrap();
    if let Some(first) = made.first() {
        fake.set_driver(*first, Some("vfio-pci")).unwrap();
        fake.add_vfio_node(4).unwrap();
    }
    fake
}

#[test]
fn discovers_pf_vfs_groups_and_vfio_nodes() {
    let fake = testbed_like(4);
    let model = fake.host().discover().unwrap();
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert_eq!(
        model.iommu,
        IommuState {
            enabled: true,
            groups: 5
        }
    );
    assert_eq!(model.pfs.len(), 1);
    let pf = &model.pfs[0];
    assert_eq!(pf.pci.address, addr(PF));
    assert_eq!(
        (
            pf.pci.vendor.as_str(),
            pf.pci.device.as_str(),
            pf.pci.class.as_str()
        ),
        ("8086", "10c9", "020000")
    );
    assert_eq!(pf.pci.driver.as_deref(), Some("igb"));
    assert_eq!(pf.pci.numa_node, None);
    assert_eq!((pf.total_vfs, pf.num_vfs), (7, 4));
    assert_eq!(pf.vf_device.as_deref(), Some("10ca"));
    assert_eq!(pf.netdevs.len(), 1);
    assert_eq!(pf.netdevs[0].name, "eth0");
    assert_eq!(pf.netdevs[0].carrier, Some(true));
    assert_eq!(pf.netdevs[0].mtu, Some(1500));
    let addresses: Vec<String> = pf.vfs.iter().map(|vf| vf.pci.address.to_string()).collect();
    assert_eq!(
        addresses,
        ["0000:00:12.0", "0000:00:12.2", "0000:00:12.4", "0000:00:12.6"]
    );
    for (i, vf) in pf.vfs.iter().enumerate() {
        assert_eq!(usize::from(vf.index), i);
        assert_eq!(vf.pf, addr(PF));
        let group = vf.iommu.as_ref().unwrap();
        assert_eq!(group.id, 4 + i as u32);
        assert_eq!(group.members, [vf.pci.address]);
        assert!(vf.isolated);
    }
    assert_eq!(pf.vfs[0].pci.driver.as_deref(), Some("vfio-pci"));
    assert_eq!(pf.vfs[0].vfio_node, Some(crate::VfioNode::Group(4)));
    assert_eq!(pf.vfs[1].pci.driver, None);
    assert_eq!(pf.vfs[1].vfio_node, None);
}

#[test]
fn node_without_iommu_has_no_groups_and_nothing_isolated() {
    let fake = FakeSysfs::new().unwrap();
    fake.add_pf(&FakeDevice::igb_pf(addr(PF)), 7, "eth0").unwrap();
    fake.add_vfs(addr(PF), 2, None, 0).unwrap();
    let model = fake.host().discover().unwrap();
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert!(!model.iommu.enabled);
    let vfs = &model.pfs[0].vfs;
    assert_eq!(vfs.len(), 2);
    assert!(
        vfs.iter()
            .all(|vf| vf.iommu.is_none() && !vf.isolated && vf.vfio_node.is_none())
    );
    assert!(vfs.iter().all(|vf| vf.pci.numa_node == Some(0)));
}

#[test]
fn group_shared_by_two_devices_is_not_isolated() {
    let fake = testbed_like(2);
    // Another function lands in VF 1's group (group 5), as behind a
    // non-ACS bridge.
    let intruder = FakeDevice {
        address: addr("0000:00:03.0"),
        vendor: 0x1234,
        device: 0x1111,
        class: 0x030000,
        numa_node: -1,
        driver: None,
        iommu_group: Some(5),
    };
    fake.add_device(&intruder).unwrap();
    let model = fake.host().discover().unwrap();
    let vfs = &model.pfs[0].vfs;
    assert!(vfs[0].isolated);
    assert!(!vfs[1].isolated);
    assert_eq!(
        vfs[1].iommu.as_ref().unwrap().members,
        [addr("0000:00:03.0"), addr("0000:00:12.2")]
    );
}

#[test]
fn vf_that_vanished_mid_read_is_a_problem_and_the_rest_is_reported() {
    let fake = testbed_like(3);
    fake.remove_device_dir(addr("0000:00:12.2")).unwrap();
    let model = fake.host().discover().unwrap();
    let vfs: Vec<u16> = model.pfs[0].vfs.iter().map(|vf| vf.index).collect();
    assert_eq!(vfs, [0, 2]);
    assert_eq!(model.problems.len(), 1);
    assert_eq!(model.problems[0].address, Some(addr("0000:00:12.2")));
    assert!(
        model.problems[0].message.contains("vanished"),
        "{}",
        model.problems[0].message
    );
}

#[test]
fn garbage_files_name_the_file_and_do_not_hide_other_devices() {
    let fake = testbed_like(2);
    let second_pf = addr("0000:00:03.0");
    fake.add_pf(&FakeDevice::igb_pf(second_pf), 7, "eth1").unwrap();
    fake.write("devices/pci0000:00/0000:00:03.0/sriov_totalvfs", "lots\n")
        .unwrap();
    fake.write("devices/pci0000:00/0000:00:12.2/numa_node", "north\n")
        .unwrap();
    let model = fake.host().discover().unwrap();
    assert_eq!(
        model.pfs.len(),
        1,
        "the PF with a garbage total is reported as a problem"
    );
    assert_eq!(model.pfs[0].vfs.len(), 1);
    let messages: Vec<&str> = model.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(
        messages
            .iter()
            .any(|m| m.contains("sriov_totalvfs") && m.contains("\"lots\"")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("numa_node") && m.contains("\"north\"")),
        "{messages:?}"
    );
}

#[test]
fn garbage_in_ids_and_links_is_an_error_not_a_panic() {
    let fake = testbed_like(1);
    let host = fake.host();
    let vf = addr("0000:00:12.0");
    fake.write("devices/pci0000:00/0000:00:12.0/vendor", "\u{0}\u{ff}junk")
        .unwrap();
    let err = host.pci_device(vf).unwrap_err();
    assert!(matches!(err, HostError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("vendor"));
    // Non-UTF-8 content is a read error naming the file.
    fs::write(fake.device_dir(vf).join("vendor"), [0xff, 0xfe]).unwrap();
    assert!(host.pci_device(vf).unwrap_err().to_string().contains("vendor"));
    // A virtfn link that points at something that is not an address.
    let link = fake.device_dir(addr(PF)).join("virtfn5");
    std::os::unix::fs::symlink("../not-a-device", &link).unwrap();
    let err = host.vf_addresses(addr(PF)).unwrap_err();
    assert!(err.to_string().contains("virtfn5"), "{err}");
    // Discovery reports it as a problem of the PF instead of failing.
    let model = host.discover().unwrap();
    assert!(model.pfs.is_empty());
    assert!(model.problems.iter().any(|p| p.message.contains("virtfn5")));
}

#[test]
fn unreadable_file_is_a_read_error_naming_it() {
    let fake = testbed_like(1);
    let vf = addr("0000:00:12.0");
    // A directory where a file should be cannot be read as a file, even as root.
    let path = fake.device_dir(vf).join("class");
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    let err = fake.host().pci_device(vf).unwrap_err();
    assert!(matches!(err, HostError::Read { .. }), "{err}");
    assert!(err.to_string().contains("class"), "{err}");
}

#[test]
fn unknown_device_is_device_not_found() {
    let fake = testbed_like(0);
    let host = fake.host();
    let missing = addr("0000:42:00.0");
    let err = host.pci_device(missing).unwrap_err();
    assert!(matches!(err, HostError::DeviceNotFound { .. }));
    assert!(err.to_string().contains("0000:42:00.0"));
    assert!(matches!(
        host.set_num_vfs(missing, 1),
        Err(HostError::DeviceNotFound { .. })
    ));
    assert!(matches!(
        host.bind_driver(missing, "vfio-pci"),
        Err(HostError::DeviceNotFound { .. })
    ));
}

#[test]
fn num_vfs_beyond_total_is_refused_and_nothing_is_written() {
    let fake = testbed_like(2);
    let err = fake.host().set_num_vfs(addr(PF), 8).unwrap_err();
    assert!(
        matches!(
            err,
            HostError::TooManyVfs {
                requested: 8,
                total: 7,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at most 7"));
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs")
            .unwrap()
            .trim(),
        "2"
    );
}

#[test]
fn set_num_vfs_on_a_device_without_sriov_is_refused() {
    let fake = testbed_like(1);
    let err = fake.host().set_num_vfs(addr("0000:00:12.0"), 1).unwrap_err();
    assert!(matches!(err, HostError::NotPhysicalFunction { .. }), "{err}");
}

#[test]
fn set_num_vfs_writes_the_count() {
    let fake = testbed_like(0);
    fake.host().set_num_vfs(addr(PF), 4).unwrap();
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs").unwrap(),
        "4"
    );
}

#[test]
fn new_vfs_are_created_without_driver_autoprobe() {
    let fake = testbed_like(0);
    let autoprobe = "devices/pci0000:00/0000:00:02.0/sriov_drivers_autoprobe";
    assert_eq!(fake.read(autoprobe).unwrap().trim(), "1");
    fake.host().set_num_vfs(addr(PF), 2).unwrap();
    assert_eq!(fake.read(autoprobe).unwrap(), "0");
}

#[test]
fn num_vfs_changes_between_non_zero_counts_go_through_zero() {
    assert_eq!(num_vfs_steps(0, 4), [4]);
    assert_eq!(num_vfs_steps(4, 4), Vec::<u16>::new());
    assert_eq!(num_vfs_steps(4, 0), [0]);
    assert_eq!(num_vfs_steps(4, 2), [0, 2]);
    assert_eq!(num_vfs_steps(2, 7), [0, 7]);
}

#[test]
fn bind_writes_override_unbind_and_probe_then_checks_the_result() {
    let fake = testbed_like(2);
    let host = fake.host();
    let vf = addr("0000:00:12.2");
    fake.set_driver(vf, Some("igbvf")).unwrap();
    // The fake tree does not rebind by itself, so the bind is reported as failed...
    let err = host.bind_driver(vf, "vfio-pci").unwrap_err();
    assert!(
        matches!(&err, HostError::BindFailed { actual, .. } if actual == "igbvf"),
        "{err}"
    );
    // ...after writing exactly what the kernel needs.
    assert_eq!(
        fake.read("devices/pci0000:00/0000:00:12.2/driver_override")
            .unwrap(),
        "vfio-pci"
    );
    assert_eq!(fake.read("bus/pci/drivers/igbvf/unbind").unwrap(), "0000:00:12.2");
    assert_eq!(fake.read("bus/pci/drivers_probe").unwrap(), "0000:00:12.2");
    // Already on the wanted driver: nothing to do.
    fake.set_driver(vf, Some("vfio-pci")).unwrap();
    host.bind_driver(vf, "vfio-pci").unwrap();
    assert!(matches!(
        host.bind_driver(vf, "../evil"),
        Err(HostError::InvalidDriverName(_))
    ));
    assert!(matches!(
        host.bind_driver(vf, ""),
        Err(HostError::InvalidDriverName(_))
    ));
}

#[test]
fn link_down_pf_has_no_carrier() {
    let fake = testbed_like(0);
    fake.write("devices/pci0000:00/0000:00:02.0/net/eth0/operstate", "down\n")
        .unwrap();
    fs::remove_file(fake.device_dir(addr(PF)).join("net/eth0/carrier")).unwrap();
    let netdevs = fake.host().netdevs(addr(PF)).unwrap();
    assert_eq!(netdevs[0].operstate, "down");
    assert_eq!(netdevs[0].carrier, None);
}

#[test]
fn physfn_and_iommu_group_of_a_vf() {
    let fake = testbed_like(2);
    let host = fake.host();
    assert_eq!(host.physfn(addr("0000:00:12.2")).unwrap(), Some(addr(PF)));
    assert_eq!(host.physfn(addr(PF)).unwrap(), None);
    assert_eq!(host.iommu_group_id(addr("0000:00:12.2")).unwrap(), Some(5));
}

#[test]
fn vf_addresses_follow_offset_and_stride() {
    assert_eq!(FakeSysfs::vf_address(addr(PF), 0), addr("0000:00:12.0"));
    assert_eq!(FakeSysfs::vf_address(addr(PF), 3), addr("0000:00:12.6"));
    assert_eq!(
        FakeSysfs::vf_address(addr("0000:21:00.0"), 0),
        addr("0000:21:10.0")
    );
}

#[test]
fn model_json_round_trips_with_camel_case_fields() {
    let fake = testbed_like(1);
    let model = fake.host().discover().unwrap();
    let json = serde_json::to_value(&model).unwrap();
    let pf = &json["pfs"][0];
    assert_eq!(pf["address"], "0000:00:02.0");
    assert_eq!(pf["totalVfs"], 7);
    assert_eq!(pf["vfs"][0]["iommu"]["id"], 4);
    assert_eq!(pf["vfs"][0]["driver"], "vfio-pci");
    let back: HostModel = serde_json::from_value(json).unwrap();
    assert_eq!(back, model);
}

#[test]
fn function_reset_writes_reset_and_the_command_register_is_read_from_config() {
    let fake = testbed_like(2);
    let host = fake.host();
    let vf = FakeSysfs::vf_address(addr(PF), 0);
    assert_eq!(host.command_register(vf).unwrap() & PCI_COMMAND_BUS_MASTER, 0);
    fake.set_command_register(vf, 0x0406).unwrap();
    assert_eq!(host.command_register(vf).unwrap(), 0x0406);
    host.reset_function(vf).unwrap();
    let reset = fake.device_dir(vf).join("reset");
    assert_eq!(std::fs::read_to_string(&reset).unwrap(), "1");
    std::fs::remove_file(&reset).unwrap();
    let err = host.reset_function(vf).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{vf} offers no function reset (no sysfs reset attribute)")
    );
    std::fs::write(fake.device_dir(vf).join("config"), [0u8; 4]).unwrap();
    let err = host.command_register(vf).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot parse \"4 bytes\" as a config space"),
        "{err}"
    );
}

#[test]
fn numa_node_cpus_are_read_and_a_missing_node_is_named() {
    let fake = testbed_like(0);
    fake.add_numa_node(1, "2-3").unwrap();
    assert_eq!(fake.host().numa_node_cpus(1).unwrap(), "2-3");
    let err = fake.host().numa_node_cpus(7).unwrap_err();
    assert!(
        err.to_string().contains("devices/system/node/node7/cpulist"),
        "{err}"
    );
}

#[test]
fn cpu_lists_parse_ranges_and_refuse_garbage() {
    let set = |v: &[u32]| v.iter().copied().collect::<std::collections::BTreeSet<_>>();
    assert_eq!(
        parse_cpu_list("0-3,8,10-11\n"),
        Some(set(&[0, 1, 2, 3, 8, 10, 11]))
    );
    assert_eq!(parse_cpu_list(""), Some(set(&[])));
    for bad in ["a", "3-1", "1-", "0-99999999"] {
        assert_eq!(parse_cpu_list(bad), None, "{bad}");
    }
}

#[test]
fn a_resolved_device_dir_reads_driver_presence_and_link_state_without_the_bus_link() {
    let fake = testbed_like(2);
    let host = fake.host();
    let vf = FakeSysfs::vf_address(addr(PF), 0);
    let dir = host.resolve_device(vf);
    // Resolved: the real directory, not the bus/pci/devices link.
    assert!(!dir.path().starts_with(host.sysfs_root().join("bus")), "{dir:?}");
    assert_eq!(dir.driver().unwrap().as_deref(), Some("vfio-pci"));
    assert!(dir.is_present());
    fake.set_driver(vf, None).unwrap();
    assert_eq!(dir.driver().unwrap(), None);

    let pf = host.resolve_device(addr(PF));
    let links = pf.link_states().expect("the PF has a net directory");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].name, "eth0");
    assert_eq!(
        (links[0].mac.as_deref(), links[0].mtu),
        (None, None),
        "only link state is read"
    );
    assert_eq!(dir.link_states(), None, "a VF on vfio-pci has no net directory");

    // Gone: no driver, not present, no error.
    fake.remove_device_dir(vf).unwrap();
    assert_eq!(dir.driver().unwrap(), None);
    assert!(!dir.is_present());
    let gone = host.resolve_device(addr("0000:7f:00.0"));
    assert_eq!(gone.driver().unwrap(), None);
    assert!(!gone.is_present());
}

#[test]
fn vfio_nodes_are_listed_once_and_a_missing_directory_is_empty() {
    let fake = testbed_like(2);
    let host = fake.host();
    let nodes = host.vfio_nodes().unwrap();
    assert_eq!(nodes.node(4), Some(VfioNode::Group(4)));
    assert_eq!(nodes.node(5), None);
    assert_eq!(host.vfio_node(4), Some(VfioNode::Group(4)));
    assert_eq!(host.vfio_node(5), None);
    fs::write(fake.dev_root().join("vfio/noiommu-5"), "").unwrap();
    assert_eq!(host.vfio_nodes().unwrap().node(5), Some(VfioNode::NoIommu(5)));
    assert_eq!(host.vfio_node(5), Some(VfioNode::NoIommu(5)));
    assert_eq!(VfioNode::NoIommu(5).path(), "/dev/vfio/noiommu-5");

    let empty = Host::new(fake.sysfs_root(), fake.dev_root().join("absent"));
    assert_eq!(empty.vfio_nodes().unwrap().node(4), None);
}

/// The fake kernel plays the writes a Host makes: VFs come and go with
/// `sriov_numvfs`, a probe binds the override's driver and vfio-pci brings
/// the group's node, and what the kernel refuses is refused.
#[test]
fn fake_kernel_creates_binds_and_removes_vfs_as_the_kernel_does() {
    let tree = std::sync::Arc::new(testbed_like(0));
    let kernel = crate::fake::FakeKernel::new(std::sync::Arc::clone(&tree));
    let host = kernel.host();
    host.set_num_vfs(addr(PF), 4).unwrap();
    let vfs = host.vf_addresses(addr(PF)).unwrap();
    assert_eq!(vfs.len(), 4);
    let groups: Vec<_> = vfs
        .iter()
        .map(|(_, vf)| host.iommu_group_id(*vf).unwrap())
        .collect();
    assert_eq!(
        groups,
        [Some(4), Some(5), Some(6), Some(7)],
        "each VF in a new group"
    );

    let (_, first) = vfs[0];
    host.bind_driver(first, "vfio-pci").unwrap();
    assert_eq!(
        host.pci_device(first).unwrap().driver.as_deref(),
        Some("vfio-pci")
    );
    assert!(host.vfio_group_node(4).exists());
    host.unbind_driver(first).unwrap();
    assert_eq!(host.pci_device(first).unwrap().driver, None);
    assert!(
        !host.vfio_group_node(4).exists(),
        "the node goes with the binding"
    );
    host.bind_driver(first, "vfio-pci").unwrap();

    // 4 -> 2 goes through 0: the old VFs, their groups and nodes are gone.
    host.set_num_vfs(addr(PF), 2).unwrap();
    assert_eq!(host.num_vfs(addr(PF)).unwrap(), 2);
    assert_eq!(host.vf_addresses(addr(PF)).unwrap().len(), 2);
    assert!(!host.vfio_group_node(4).exists());
    let model = host.discover().unwrap();
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    assert_eq!(model.iommu.groups, 3, "the PF's group and two VFs'");

    // What the kernel refuses: beyond sriov_totalvfs, and between two
    // non-zero counts. Nothing changes.
    let numvfs = tree
        .sysfs_root()
        .join("bus/pci/devices")
        .join(PF)
        .join("sriov_numvfs");
    let beyond = kernel.write(&numvfs, "8").unwrap_err();
    assert_eq!(beyond.raw_os_error(), Some(libc::ERANGE));
    let busy = kernel.write(&numvfs, "3").unwrap_err();
    assert_eq!(busy.raw_os_error(), Some(libc::EBUSY));
    assert_eq!(host.num_vfs(addr(PF)).unwrap(), 2);
    host.set_num_vfs(addr(PF), 0).unwrap();
    assert!(host.vf_addresses(addr(PF)).unwrap().is_empty());
    assert_eq!(host.discover().unwrap().iommu.groups, 1);
}
