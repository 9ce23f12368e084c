//! The README's main command as a test: `xtask::demo::run`, the path of one
//! VF on the real cluster (helm install, a VfPolicy, a Deployment whose pod
//! runs the driver on its VF, webhook refusals through the API server, helm
//! upgrade and uninstall). The demo itself fails on any failed step and on
//! fewer frames counted than sent; this test also checks its report.

#![allow(clippy::expect_used)] // test: a panic is the failure report

use xtask::testbed::Testbed;

#[test]
fn the_demo_walks_one_vf_to_a_pod_on_the_real_cluster() {
    if !xtask::e2e::enabled(
        "the_demo_walks_one_vf_to_a_pod_on_the_real_cluster",
        xtask::e2e::CLUSTER,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed");
    let report = xtask::demo::run(&testbed).expect("every step of the demo passes");
    eprintln!("{}", report.table());
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
