//! The owner's container on a fake cgroup tree, `/proc` and record dir.

use std::fs;

use vfplane_proto::container_record::{ContainerRecord, read_records, write_record};
use vfplane_proto::node_state::{PfStatus, VfStatus};
use vfplane_proto::pool::Pool;

use super::*;
use crate::attribution::Owner;

const VF: &str = "0000:00:12.0";
const CGROUP: &str = "/kubepods/besteffort/podu1/c1";

struct Node {
    _dir: tempfile::TempDir,
    _sysfs: vfplane_host::fake::FakeSysfs,
    view: ContainerView,
}

/// A node whose container c1 (pid 4242, pod default/tenant-1, uid u1) holds
/// the VF, with a cgroup and `/proc` entry; the pool asks for 64 MiB.
fn node(memlock_soft: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let sysfs = vfplane_host::fake::FakeSysfs::new().unwrap();
    sysfs.add_numa_node(0, "0").unwrap();
    sysfs.add_numa_node(1, "1").unwrap();
    let view = ContainerView {
        records_dir: dir.path().join("records"),
        cgroup_root: dir.path().join("cgroup"),
        proc_root: dir.path().join("proc"),
        host: sysfs.host(),
    };
    let cgroup = view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    fs::create_dir_all(&cgroup).unwrap();
    for (file, text) in [
        ("memory.max", "134217728\n"),
        ("memory.high", "max\n"),
        ("memory.low", "0\n"),
        ("memory.min", "0\n"),
        ("cpu.max", "100000 100000\n"),
        ("pids.max", "max\n"),
        ("cpuset.cpus.effective", "0-1\n"),
        ("cpuset.mems.effective", "0\n"),
    ] {
        fs::write(cgroup.join(file), text).unwrap();
    }
    let proc = view.proc_root.join("4242");
    fs::create_dir_all(&proc).unwrap();
    fs::write(
        proc.join("limits"),
        format!("Limit                     Soft Limit           Hard Limit           Units\nMax locked memory         {memlock_soft}             {memlock_soft}             bytes\n"),
    )
    .unwrap();
    write_record(
        &view.records_dir,
        &ContainerRecord {
            id: "c1".to_owned(),
            pid: 4242,
            pod_uid: Some("u1".to_owned()),
            namespace: Some("default".to_owned()),
            pod: Some("tenant-1".to_owned()),
            container: Some("app".to_owned()),
            cgroups_path: Some(CGROUP.to_owned()),
            vfs: vec![VF.to_owned()],
        },
    )
    .unwrap();
    Node {
        _dir: dir,
        _sysfs: sysfs,
        view,
    }
}

fn status() -> NodeStateStatus {
    NodeStateStatus {
        pfs: vec![PfStatus {
            vfs: vec![VfStatus {
                pci_address: VF.to_owned(),
                pool: Some("fast".to_owned()),
                ..VfStatus::default()
            }],
            ..PfStatus::default()
        }],
        ..NodeStateStatus::default()
    }
}

fn owners() -> Owners {
    Owners::from([(
        VF.parse().unwrap(),
        Owner {
            namespace: "default".to_owned(),
            pod: "tenant-1".to_owned(),
            container: "app".to_owned(),
            resource: "vfplane.io/fast".to_owned(),
        },
    )])
}

fn pools() -> PoolConfig {
    PoolConfig {
        pools: vec![Pool {
            name: "fast".to_owned(),
            devices: vec![VF.parse().unwrap()],
            selector: None,
            preferred_allocation: Default::default(),
            allow_no_iommu: false,
            locked_memory_bytes: Some(64 << 20),
            numa_aligned: false,
        }],
    }
}

#[test]
fn the_owners_pod_uid_and_limits_are_read_from_its_record_and_cgroup() {
    let node = node("67108864");
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let vf = &status.pfs[0].vfs[0];
    assert_eq!(vf.owner_pod_uid.as_deref(), Some("u1"));
    assert_eq!(
        vf.container,
        Some(VfContainerStatus {
            id: "c1".to_owned(),
            cgroup: Some(CGROUP.to_owned()),
            cpus: Some("0-1".to_owned()),
            mems: Some("0".to_owned()),
            memory_max: Some("134217728".to_owned()),
            cpu_max: Some("100000 100000".to_owned()),
            pids_max: Some("max".to_owned()),
            locked_memory: Some("67108864".to_owned()),
            problems: Vec::new(),
        })
    );
}

#[test]
fn a_locked_memory_limit_below_the_profile_is_a_problem() {
    let node = node("8388608");
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        container.problems,
        ["RLIMIT_MEMLOCK is 8388608 bytes, below the pool's lockedMemory of 67108864 bytes"]
    );
}

#[test]
fn a_vf_nobody_holds_shows_no_container_and_records_of_gone_containers_are_removed() {
    let node = node("67108864");
    let mut status = status();
    node.view.annotate(&mut status, &Owners::new(), &pools());
    assert_eq!(status.pfs[0].vfs[0].container, None);
    assert_eq!(
        read_records(&node.view.records_dir).unwrap().0.len(),
        1,
        "alive: kept"
    );
    fs::remove_dir_all(&node.view.proc_root).unwrap();
    fs::remove_dir_all(&node.view.cgroup_root).unwrap();
    node.view.annotate(&mut status, &owners(), &pools());
    assert_eq!(status.pfs[0].vfs[0].container, None, "no record left to match");
    assert_eq!(
        read_records(&node.view.records_dir).unwrap().0.len(),
        0,
        "gone: removed"
    );
}

#[test]
fn a_systemd_cgroup_path_is_named_as_unreadable() {
    let node = node("67108864");
    let mut record = read_records(&node.view.records_dir).unwrap().0.remove(0);
    record.cgroups_path = Some("kubepods-besteffort.slice:cri-containerd:c1".to_owned());
    write_record(&node.view.records_dir, &record).unwrap();
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        container.problems,
        [
            "cgroup path \"kubepods-besteffort.slice:cri-containerd:c1\" is not a cgroupfs path under the cgroup root"
        ]
    );
}

#[test]
fn a_numa_aligned_pools_container_off_its_vfs_node_is_a_problem() {
    let node = node("67108864");
    let mut pools = pools();
    pools.pools[0].numa_aligned = true;
    let mut status = status();
    status.pfs[0].numa_node = Some(1);
    // The fake cgroup says CPUs 0-1, memory node 0: not NUMA node 1's.
    node.view.annotate(&mut status, &owners(), &pools);
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        container.problems,
        [
            "effective CPUs \"0-1\" are not within NUMA node 1's CPUs 1",
            "effective memory nodes \"0\" are not NUMA node 1"
        ]
    );
    // Aligned: no problem.
    let cgroup = node.view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    fs::write(cgroup.join("cpuset.cpus.effective"), "1\n").unwrap();
    fs::write(cgroup.join("cpuset.mems.effective"), "1\n").unwrap();
    node.view.annotate(&mut status, &owners(), &pools);
    assert_eq!(
        status.pfs[0].vfs[0].container.clone().unwrap().problems,
        Vec::<String>::new()
    );
}
