//! One cluster on the systemd node as production runs it (systemd as PID 1,
//! the systemd cgroup driver, static CPU manager, Topology and memory
//! managers; two NUMA nodes with a PF on each, five CPUs:
//! `ClusterOptions::two_numa_systemd`), and on it in turn:
//! - the README's main command, `xtask::demo`: helm install, a VfPolicy, a
//!   Deployment whose pod runs the driver on its VF, webhook refusals
//!   through the API server, the pool through DRA, helm upgrade and
//!   uninstall, the node back at 0 VFs;
//! - vfplane installed again with `dra.enabled=true`: the scrub,
//!   attribution and locked-memory scenario of the device-plugin path
//!   (`scenarios/scrub.rs`);
//! - with its policy gone and the PF back to 0 VFs, a `numVfs` change
//!   rolled out over a pod holding a VF, through its PodDisruptionBudget
//!   (`scenarios/rollout.rs`);
//! - the PF back to 0 VFs again, the DRA scenarios
//!   (`scenarios/dra.rs`);
//! - the NUMA scenario on the node-1 PF (`scenarios/numa.rs`), last, since
//!   it restarts containerd and the kubelet.
//!
//! One boot serves them all: every boot of this node costs about two
//! minutes under TCG, and CI's hour holds few.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

#[path = "scenarios/dra.rs"]
mod dra;
#[path = "scenarios/numa.rs"]
mod numa;
#[path = "scenarios/rollout.rs"]
mod rollout;
#[path = "scenarios/scrub.rs"]
mod scrub;

use xtask::cluster::NodeProfile;
use xtask::demo::DemoReport;
use xtask::testbed::Testbed;

#[test]
fn on_the_systemd_node_the_demo_passes_and_vfs_are_scrubbed_claimed_and_numa_aligned() {
    if !xtask::e2e::enabled(
        "on_the_systemd_node_the_demo_passes_and_vfs_are_scrubbed_claimed_and_numa_aligned",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let (report, mut session) =
        xtask::demo::run_keeping_cluster(&testbed).expect("every step of the demo passes");
    eprintln!("{}", report.table());
    check_the_demos_report(&report);
    session
        .install_vfplane_with(&["dra.enabled=true"])
        .expect("helm install with DRA");
    scrub::scrub_and_quarantine(&mut session);
    scrub::clean_up(&mut session);
    rollout::evict_through_a_budget(&mut session);
    dra::claims(&mut session);
    numa::numa_aligned(&mut session, NodeProfile::Systemd);
}

/// The demo fails on any failed step and on fewer frames counted than
/// sent; its report holds what each step saw.
fn check_the_demos_report(report: &DemoReport) {
    assert_eq!(report.vfs, 2, "the policy's two VFs are ready");
    assert!(
        report.vf.starts_with("0000:00:12."),
        "the pod got a VF of the PF: {:?}",
        report.vf
    );
    assert!(
        report.owner.starts_with("default/pktgen-") && report.owner.ends_with("/pktgen"),
        "the VF's owner in the NodeState status: {:?}",
        report.owner
    );
    assert!(report.scrubbed, "the VF is scrubbed after its pod is deleted");
    assert_eq!(
        report.locked_memory, "67108864",
        "the profile's lockedMemory in the pod"
    );
    assert_eq!(report.frames_sent, 2000, "the VF's own TX counter");
    assert!(
        report.frames_counted >= report.frames_sent,
        "the host counted {} of {} frames",
        report.frames_counted,
        report.frames_sent
    );
    assert!(
        report.refusals[0].contains("spec.numVfs"),
        "{}",
        report.refusals[0]
    );
    assert!(
        report.refusals[1].contains("resources.limits.cpu"),
        "{}",
        report.refusals[1]
    );
}
