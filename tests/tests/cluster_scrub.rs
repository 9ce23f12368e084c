//! The scrub scenario (`scenarios/scrub.rs`) on the minimal node (busybox
//! init, cgroupfs), as a slow test; CI runs it on the systemd node in
//! `cluster_systemd`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

#[path = "scenarios/scrub.rs"]
mod scrub;

use xtask::cluster::{ClusterOptions, NodeProfile};
use xtask::session::Session;
use xtask::testbed::Testbed;

/// Slow, because nothing in the scrub depends on the cgroup driver and CI
/// proves the minimal node's container limits elsewhere: the short
/// campaigns, which run on the minimal node, run their pods' driver as user
/// 1000 within a profile's locked memory and pids, and check every VF of
/// theirs scrubbed.
#[test]
#[ignore = "slow: the scrub on the minimal node (5 min on 2026-12-03); the systemd node's variant runs in CI"]
fn on_the_minimal_node_a_released_vf_is_scrubbed_before_the_next_tenant_and_quarantined_when_its_reset_fails()
{
    if !xtask::e2e::enabled(
        "on_the_minimal_node_a_released_vf_is_scrubbed_before_the_next_tenant_and_quarantined_when_its_reset_fails",
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
    scrub::scrub_and_quarantine(&mut session);
    scrub::clean_up(&mut session);
}
