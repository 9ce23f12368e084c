//! The NUMA scenario (`scenarios/numa.rs`) on the minimal node: busybox
//! init, cgroupfs, no CPU manager, one CPU per NUMA node; vfplane's NRI
//! plugin puts the VF's NUMA cpuset into the container's spec. The systemd
//! node's variant runs in `cluster_systemd.rs`, on the node it shares with
//! the demo and the other scenarios.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

#[path = "scenarios/numa.rs"]
mod numa;

use xtask::cluster::{ClusterOptions, NodeProfile};
use xtask::session::Session;
use xtask::testbed::{GuestOptions, Testbed, Topology};

/// Slow, for CI's hour: on the minimal node CI runs the short campaigns,
/// whose pods run the driver as user 1000 under a profile of locked memory
/// and pids (owner, limits, their checks, the scrub on cgroupfs); what
/// only this test proves there is vfplane's own NUMA cpuset (no static CPU
/// manager).
#[test]
#[ignore = "slow: the minimal node's NUMA cpuset (4-5 min on 2026-12-03); the systemd node's variant runs in CI"]
fn on_the_minimal_node_a_numa_aligned_pools_container_runs_on_its_vfs_numa_node() {
    if !xtask::e2e::enabled(
        "on_the_minimal_node_a_numa_aligned_pools_container_runs_on_its_vfs_numa_node",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let options = ClusterOptions {
        node_profile: NodeProfile::Minimal,
        guest: GuestOptions {
            topology: Topology::TwoNumaNodes,
            cpus: 2,
            ..GuestOptions::default()
        },
        node_extra: None,
    };
    let mut session = Session::start(&testbed, options).expect("cluster");
    session.install_vfplane().expect("helm install");
    numa::numa_aligned(&mut session, NodeProfile::Minimal);
}
