//! The rollout scenario (`scenarios/rollout.rs`) on the minimal node
//! (busybox init, cgroupfs), as a slow test; CI runs it on the systemd node
//! in `cluster_systemd`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

#[path = "scenarios/rollout.rs"]
mod rollout;

use xtask::cluster::{ClusterOptions, NodeProfile};
use xtask::session::Session;
use xtask::testbed::Testbed;

/// Slow, because nothing in a rollout depends on the cgroup driver: the
/// eviction, the budget and the re-created VFs are the API server's, the
/// controller's and the agent's.
#[test]
#[ignore = "slow: the rollout on the minimal node; the systemd node's variant runs in CI"]
fn on_the_minimal_node_a_numvfs_change_evicts_the_holding_pod_through_its_budget() {
    if !xtask::e2e::enabled(
        "on_the_minimal_node_a_numvfs_change_evicts_the_holding_pod_through_its_budget",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let options = ClusterOptions {
        node_profile: NodeProfile::Minimal,
        ..ClusterOptions::default()
    };
    let mut session = Session::start(&testbed, options).expect("cluster");
    session.install_vfplane().expect("helm install");
    rollout::evict_through_a_budget(&mut session);
}
