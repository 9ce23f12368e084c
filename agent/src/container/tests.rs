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
        state_dir: Some(dir.path().join("state")),
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
    // The pod's cgroup bounds its tasks, as a kubelet with podPidsLimit
    // makes it; the container's own pids.max is "max".
    fs::write(cgroup.parent().unwrap().join("pids.max"), "1024\n").unwrap();
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
            hook_micros: 0,
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
            exclusive_cpus: Vec::new(),
        },
    )])
}

fn pools() -> PoolConfig {
    PoolConfig {
        pools: vec![Pool {
            name: "fast".to_owned(),
            devices: Some(vec![VF.parse().unwrap()]),
            selector: None,
            preferred_allocation: Default::default(),
            allow_no_iommu: false,
            container_limits: ContainerLimits {
                locked_memory_bytes: Some(64 << 20),
                ..ContainerLimits::default()
            },
            resource_api: Default::default(),
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
            hugepages_nodes: None,
            memory_max: Some("134217728".to_owned()),
            cpu_max: Some("100000 100000".to_owned()),
            pids_max: Some("max".to_owned()),
            locked_memory: Some("67108864".to_owned()),
            problems: Vec::new(),
        })
    );
}

#[test]
fn a_vf_prepared_for_a_claim_is_checked_against_the_claims_profile() {
    // The container has 64 MiB of locked memory and 128 MiB of memory: what
    // the pool asks. Its claim asks 256 MiB of locked memory and 512 MiB of
    // memory, and a looser pids bound than none (which changes nothing).
    let node = node("67108864");
    let state = node.view.state_dir.clone().unwrap();
    fs::create_dir_all(&state).unwrap();
    vfplane_proto::vf_config::write_claim_config(
        &state,
        VF.parse().unwrap(),
        &"vlan=7 lockedmemory=268435456 memory=536870912".parse().unwrap(),
    )
    .unwrap();
    let mut first = status();
    node.view.annotate(&mut first, &owners(), &pools());
    let container = first.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        container.problems,
        [
            "memory.max is 134217728, the claim's profile wants a memory limit of at least 536870912 bytes",
            "RLIMIT_MEMLOCK is 67108864 bytes, below the claim's lockedMemory of 268435456 bytes",
        ]
    );
    // Settings alone leave the pool's profile, which the container meets.
    vfplane_proto::vf_config::write_claim_config(&state, VF.parse().unwrap(), &"vlan=7".parse().unwrap())
        .unwrap();
    let mut again = status();
    node.view.annotate(&mut again, &owners(), &pools());
    assert_eq!(
        again.pfs[0].vfs[0].container.clone().unwrap().problems,
        Vec::<String>::new()
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
fn a_systemd_cgroup_path_is_read_from_its_scope_in_the_slices() {
    let node = node("67108864");
    // The systemd driver's form: the scope sits in the pod's slice, each
    // dash of the slice's name one level down.
    let scope = node.view.cgroup_root.join(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-c1.scope",
    );
    fs::create_dir_all(scope.parent().unwrap()).unwrap();
    fs::rename(node.view.cgroup_root.join(CGROUP.trim_start_matches('/')), &scope).unwrap();
    fs::write(scope.join("memory.max"), "268435456\n").unwrap();
    // The pod's slice bounds its tasks, as the pod's cgroup does above.
    fs::write(scope.parent().unwrap().join("pids.max"), "1024\n").unwrap();
    let mut record = read_records(&node.view.records_dir).unwrap().0.remove(0);
    record.cgroups_path = Some("kubepods-besteffort-podu1.slice:cri-containerd:c1".to_owned());
    write_record(&node.view.records_dir, &record).unwrap();
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(container.problems, Vec::<String>::new());
    assert_eq!(
        container.memory_max.as_deref(),
        Some("268435456"),
        "read from the scope"
    );
    assert_eq!(container.cpus.as_deref(), Some("0-1"));
    assert_eq!(
        container.cgroup.as_deref(),
        Some(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podu1.slice/cri-containerd-c1.scope"
        ),
        "the directory, not the driver's form"
    );
}

#[test]
fn a_container_on_exclusive_cpus_without_a_quota_meets_the_profiles_cpu() {
    let node = node("67108864");
    let dir = node.view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    fs::write(dir.join("cpu.max"), "max 100000\n").unwrap();
    let problems = |owners: &Owners, cpu_millis: u64| {
        let mut pools = pools();
        pools.pools[0].container_limits.cpu_millis = Some(cpu_millis);
        let mut status = status();
        node.view.annotate(&mut status, owners, &pools);
        status.pfs[0].vfs[0].container.clone().unwrap().problems
    };
    assert_eq!(
        problems(&owners(), 1000),
        ["cpu.max is \"max 100000\", the pool's profile wants a CPU limit of at least 1000 millicores"],
        "no quota and no CPU of its own: nothing bounds what it gets"
    );
    let mut exclusive = owners();
    for owner in exclusive.values_mut() {
        owner.exclusive_cpus = vec![2];
    }
    assert_eq!(
        problems(&exclusive, 1000),
        Vec::<String>::new(),
        "one exclusive CPU is 1000 millicores"
    );
    assert_eq!(
        problems(&exclusive, 2000).len(),
        1,
        "one exclusive CPU is not 2000 millicores"
    );
}

#[test]
fn a_container_not_started_or_ending_breaks_no_limit() {
    // A locked-memory limit below the pool's, read while runc's init still
    // runs (runc sets the rlimits after the hook wrote the record).
    let node = node("8388608");
    fs::write(node.view.proc_root.join("4242/comm"), "runc:[2:INIT]\n").unwrap();
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!((container.locked_memory, container.problems), (None, vec![]));
    // Started: the same limit is a problem.
    fs::write(node.view.proc_root.join("4242/comm"), "pktgen\n").unwrap();
    node.view.annotate(&mut status, &owners(), &pools());
    assert_eq!(
        status.pfs[0].vfs[0].container.clone().unwrap().problems,
        ["RLIMIT_MEMLOCK is 8388608 bytes, below the pool's lockedMemory of 67108864 bytes"]
    );
    // Ending: its process gone, its cgroup not yet.
    fs::rename(node.view.proc_root.join("4242"), node.view.proc_root.join("4243")).unwrap();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!((container.locked_memory, container.problems), (None, vec![]));
    fs::rename(node.view.proc_root.join("4243"), node.view.proc_root.join("4242")).unwrap();
    // Ending: its cgroup gone, its process not yet.
    fs::remove_dir_all(node.view.cgroup_root.join(CGROUP.trim_start_matches('/'))).unwrap();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!((container.memory_max, container.problems), (None, vec![]));
}

#[test]
fn a_cgroup_path_that_names_no_cgroup_is_a_problem() {
    let node = node("67108864");
    let mut record = read_records(&node.view.records_dir).unwrap().0.remove(0);
    record.cgroups_path = Some("kubepods.slice:cri-containerd".to_owned());
    write_record(&node.view.records_dir, &record).unwrap();
    let mut status = status();
    node.view.annotate(&mut status, &owners(), &pools());
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        container.problems,
        ["cgroup path \"kubepods.slice:cri-containerd\" names no cgroup under the cgroup root"]
    );
}

#[test]
fn a_numa_aligned_pools_container_off_its_vfs_node_is_a_problem() {
    let node = node("67108864");
    let mut pools = pools();
    pools.pools[0].container_limits.numa_aligned = true;
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

#[test]
fn hugepages_off_the_vfs_node_are_reported_and_a_problem_for_a_numa_aligned_pool() {
    let node = node("67108864");
    let cgroup = node.view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    fs::write(cgroup.join("cpuset.cpus.effective"), "1\n").unwrap();
    fs::write(cgroup.join("cpuset.mems.effective"), "1\n").unwrap();
    // cgroup v2's numa_stat: one line; none held of 1 GiB pages.
    fs::write(
        cgroup.join("hugetlb.2MB.numa_stat"),
        "total=4194304 N0=4194304 N1=0\n",
    )
    .unwrap();
    fs::write(cgroup.join("hugetlb.1GB.numa_stat"), "total=0 N0=0 N1=0\n").unwrap();
    let mut pools = pools();
    let mut status = status();
    status.pfs[0].numa_node = Some(1);
    // Not numaAligned: reported, no problem.
    node.view.annotate(&mut status, &owners(), &pools);
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(container.hugepages_nodes.as_deref(), Some("0"));
    assert_eq!(container.problems, Vec::<String>::new());
    pools.pools[0].container_limits.numa_aligned = true;
    node.view.annotate(&mut status, &owners(), &pools);
    assert_eq!(
        status.pfs[0].vfs[0].container.clone().unwrap().problems,
        ["hugepages are on NUMA nodes \"0\", not the VF's NUMA node 1"]
    );
    // On the VF's node, or none held: no problem.
    fs::write(
        cgroup.join("hugetlb.2MB.numa_stat"),
        "total=4194304 N0=0 N1=4194304\n",
    )
    .unwrap();
    node.view.annotate(&mut status, &owners(), &pools);
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!(
        (container.hugepages_nodes.as_deref(), container.problems),
        (Some("1"), vec![])
    );
    fs::write(cgroup.join("hugetlb.2MB.numa_stat"), "total=0 N0=0 N1=0\n").unwrap();
    node.view.annotate(&mut status, &owners(), &pools);
    let container = status.pfs[0].vfs[0].container.clone().unwrap();
    assert_eq!((container.hugepages_nodes, container.problems), (None, vec![]));
}

#[test]
fn memory_and_cpu_limits_below_the_profile_or_unset_are_problems() {
    let node = node("67108864");
    let cgroup = node.view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    let mut pools = pools();
    pools.pools[0].container_limits.memory_bytes = Some(128 << 20);
    pools.pools[0].container_limits.cpu_millis = Some(1000);
    let problems = |memory: &str, cpu: &str| {
        fs::write(cgroup.join("memory.max"), memory).unwrap();
        fs::write(cgroup.join("cpu.max"), cpu).unwrap();
        let mut status = status();
        node.view.annotate(&mut status, &owners(), &pools);
        status.pfs[0].vfs[0].container.clone().unwrap().problems
    };
    // Exactly the profile (128 MiB, one CPU as 100000/100000) and more: fine.
    assert_eq!(problems("134217728\n", "100000 100000\n"), Vec::<String>::new());
    assert_eq!(problems("268435456\n", "150000 100000\n"), Vec::<String>::new());
    assert_eq!(
        problems("67108864\n", "50000 100000\n"),
        [
            "memory.max is 67108864, the pool's profile wants a memory limit of at least 134217728 bytes",
            "cpu.max is \"50000 100000\", the pool's profile wants a CPU limit of at least 1000 millicores"
        ]
    );
    assert_eq!(
        problems("max\n", "max 100000\n"),
        [
            "memory.max is max, the pool's profile wants a memory limit of at least 134217728 bytes",
            "cpu.max is \"max 100000\", the pool's profile wants a CPU limit of at least 1000 millicores"
        ]
    );
}

#[test]
fn a_pool_with_a_profile_wants_the_containers_tasks_bounded() {
    let node = node("67108864");
    let cgroup = node.view.cgroup_root.join(CGROUP.trim_start_matches('/'));
    let pod = cgroup.parent().unwrap().to_owned();
    let problems = |pools: &PoolConfig| {
        let mut status = status();
        node.view.annotate(&mut status, &owners(), pools);
        status.pfs[0].vfs[0].container.clone().unwrap().problems
    };
    // Bounded by the pod's cgroup (1024): fine without `pids`.
    assert_eq!(problems(&pools()), Vec::<String>::new());
    // Nothing bounds it: a problem, naming the fixes.
    fs::write(pod.join("pids.max"), "max\n").unwrap();
    assert_eq!(
        problems(&pools()),
        [
            "pids.max is max up to the cgroup root: nothing bounds the container's processes \
          (set containerProfile.pids, or the kubelet's podPidsLimit)"
        ]
    );
    // A pool without a profile asks nothing.
    let mut plain = pools();
    plain.pools[0].container_limits = ContainerLimits::default();
    assert_eq!(problems(&plain), Vec::<String>::new());
    // With `pids: 256`: the container's own 256 holds; a looser bound not.
    let mut bounded = pools();
    bounded.pools[0].container_limits.pids_max = Some(256);
    fs::write(cgroup.join("pids.max"), "256\n").unwrap();
    assert_eq!(problems(&bounded), Vec::<String>::new());
    fs::write(cgroup.join("pids.max"), "max\n").unwrap();
    fs::write(pod.join("pids.max"), "1024\n").unwrap();
    assert_eq!(
        problems(&bounded),
        [
            "the container may run 1024 processes (the tightest pids.max above it), the pool's profile wants at most 256"
        ]
    );
}
