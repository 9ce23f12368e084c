//! One cluster on the systemd node (systemd as PID 1, the systemd cgroup
//! driver, static CPU manager, Topology and memory managers), vfplane
//! installed once by Helm with `dra.enabled=true`, and two scenarios on it
//! in turn: the scrub, attribution and locked-memory scenario of the
//! device-plugin path (`scenarios/scrub.rs`), then, with its policy gone and
//! the PF back to 0 VFs, the DRA scenarios (`scenarios/dra.rs`). One boot
//! and one install serve both: CI's hour holds no more boots.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

#[path = "scenarios/dra.rs"]
mod dra;
#[path = "scenarios/scrub.rs"]
mod scrub;

use xtask::cluster::ClusterOptions;
use xtask::session::Session;
use xtask::testbed::Testbed;

#[test]
fn on_the_systemd_node_vfs_are_scrubbed_between_tenants_and_served_through_resource_claims() {
    if !xtask::e2e::enabled(
        "on_the_systemd_node_vfs_are_scrubbed_between_tenants_and_served_through_resource_claims",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let mut session = Session::start(&testbed, ClusterOptions::default()).expect("cluster");
    session
        .install_vfplane_with(&["dra.enabled=true"])
        .expect("helm install with DRA");
    scrub::scrub_and_quarantine(&mut session);
    scrub::clean_up(&mut session);
    dra::claims(&mut session);
}
