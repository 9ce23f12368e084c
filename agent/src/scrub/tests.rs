//! Scrubs on a fake sysfs tree and the in-memory PF settings.

use std::fs;

use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_proto::node_state::{NodeStateSpec, StateFile};
use vfplane_proto::vf_state::{VfState, handed_out_at, handed_out_path, read_vf_state};

use super::*;
use crate::attribution::Owner;
use crate::netlink::fake::FakeNetlink;
use crate::netlink::{Mac, VfLinkInfo, derived_mac};

const PF: &str = "0000:00:02.0";
const SPEC: &str = r#"
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 2
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          vlan: 10
"#;

struct Node {
    fake: FakeSysfs,
    proc_root: tempfile::TempDir,
    state: tempfile::TempDir,
    reconciler: Reconciler<FakeNetlink>,
    spec: NodeStateSpec,
    vf: PciAddress,
}

/// One PF with two VFs on vfio-pci (groups 4 and 5), converged to `SPEC`,
/// VF 0 handed out a minute ago.
fn node() -> Node {
    let fake = FakeSysfs::new().unwrap();
    let pf = PF.parse().unwrap();
    fake.add_pf(&FakeDevice::igb_pf(pf), 7, "eth0").unwrap();
    let vfs = fake.add_vfs(pf, 2, Some(4), -1).unwrap();
    for (i, vf) in vfs.iter().enumerate() {
        fake.set_driver(*vf, Some("vfio-pci")).unwrap();
        fake.add_vfio_node(4 + i as u32).unwrap();
    }
    let proc_root = tempfile::tempdir().unwrap();
    let reconciler = Reconciler::new(
        fake.host(),
        FakeNetlink::with_fresh_vfs("eth0", 2),
        "node-1",
        proc_root.path(),
    );
    let spec = StateFile::from_yaml(SPEC).unwrap().spec;
    let report = reconciler.apply(&spec);
    assert!(report.converged, "{:?}", report.errors);
    let state = tempfile::tempdir().unwrap();
    let node = Node {
        fake,
        proc_root,
        state,
        reconciler,
        spec,
        vf: vfs[0],
    };
    node.hand_out(60);
    node
}

impl Node {
    fn scrubber(&self) -> Scrubber {
        Scrubber::new(self.state.path())
    }

    /// Marks VF 0 handed out `ago` seconds ago.
    fn hand_out(&self, ago: u64) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            - ago;
        fs::write(handed_out_path(self.state.path(), self.vf), format!("{at}\n")).unwrap();
    }

    /// The tenant changed what it could: the PF now reports another MAC
    /// and VLAN for VF 0.
    fn tenant_changes_settings(&self) {
        let netlink = self.reconciler.netlink();
        let mut info: VfLinkInfo = netlink.get("eth0", 0).unwrap();
        info.mac = Mac([0x02, 0xba, 0xd0, 0, 0, 1]);
        info.vlan = 99;
        netlink.insert("eth0", info);
    }

    fn state(&self) -> Option<VfState> {
        read_vf_state(self.state.path(), self.vf)
            .unwrap()
            .map(Result::unwrap)
    }

    fn reset_writes(&self) -> String {
        fs::read_to_string(self.fake.device_dir(self.vf).join("reset")).unwrap()
    }

    fn hold_group(&self, pid: u32, group: u32) {
        let fd_dir = self.proc_root.path().join(pid.to_string()).join("fd");
        fs::create_dir_all(&fd_dir).unwrap();
        std::os::unix::fs::symlink(format!("/dev/vfio/{group}"), fd_dir.join("7")).unwrap();
    }
}

fn owned_by(address: PciAddress) -> Owners {
    let mut owners = Owners::new();
    owners.insert(
        address,
        Owner {
            namespace: "default".to_owned(),
            pod: "pktgen".to_owned(),
            container: "app".to_owned(),
            resource: "vfplane.io/fast".to_owned(),
            exclusive_cpus: Vec::new(),
        },
    );
    owners
}

#[test]
fn a_released_vf_is_reset_restored_checked_and_unmarked() {
    let node = node();
    // igb has no VF link state: only what differs may be written.
    node.reconciler
        .netlink()
        .refuse(crate::netlink::VfSetting::LinkState);
    node.tenant_changes_settings();
    let outcomes = node
        .scrubber()
        .scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    assert!(
        matches!(outcomes.as_slice(), [ScrubOutcome::Scrubbed { address, .. }] if *address == node.vf),
        "{outcomes:?}"
    );
    assert_eq!(node.reset_writes(), "1", "a function reset through sysfs");
    let info = node.reconciler.netlink().get("eth0", 0).unwrap();
    assert_eq!(
        (info.mac, info.vlan),
        (derived_mac("node-1", PF, 0), 10),
        "the spec's settings are back"
    );
    assert_eq!(handed_out_at(node.state.path(), node.vf).unwrap(), None);
    assert_eq!(node.state(), None, "Healthy again");
}

#[test]
fn a_vf_still_held_or_just_handed_out_or_of_unknown_owner_is_left_alone() {
    let node = node();
    let scrubber = node.scrubber();
    let scrub = |owners: Option<&Owners>| scrubber.scrub_released(&node.reconciler, &node.spec, owners, true);
    assert_eq!(scrub(Some(&owned_by(node.vf))), [], "the kubelet lists a holder");
    assert_eq!(scrubber.next_due(), None);
    assert_eq!(scrub(None), [], "the kubelet did not answer");
    node.hold_group(4242, 4);
    assert_eq!(
        scrub(Some(&Owners::new())),
        [],
        "a process still has the group open"
    );
    fs::remove_dir_all(node.proc_root.path().join("4242")).unwrap();
    node.hand_out(1);
    assert_eq!(scrub(Some(&Owners::new())), [], "younger than the grace time");
    let due = scrubber.next_due().unwrap();
    assert!(
        due <= GRACE - Duration::from_secs(1) && due > GRACE - Duration::from_secs(3),
        "looked at again when the grace ends: {due:?}"
    );
    assert_eq!(node.reset_writes(), "", "no reset in any of these");
    assert!(handed_out_at(node.state.path(), node.vf).unwrap().is_some());
    node.hand_out(60);
    assert_eq!(scrub(Some(&Owners::new())).len(), 1);
    assert_eq!(scrubber.next_due(), None);
}

#[test]
fn a_vf_the_dra_driver_released_is_scrubbed_without_the_grace_but_not_while_open() {
    let node = node();
    let scrubber = node.scrubber();
    vfplane_proto::vf_state::mark_released(node.state.path(), node.vf).unwrap();
    // Settings of the claim, left by a driver that died before it removed
    // them, and in force on the PF.
    let claim = "vlan=99".parse().unwrap();
    vfplane_proto::vf_config::write_claim_config(node.state.path(), node.vf, &claim).unwrap();
    node.tenant_changes_settings();
    node.hold_group(4242, 4);
    assert_eq!(
        scrubber.scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true),
        [],
        "a process still has the group open"
    );
    assert_eq!(node.reset_writes(), "");
    fs::remove_dir_all(node.proc_root.path().join("4242")).unwrap();
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    assert!(
        matches!(outcomes.as_slice(), [ScrubOutcome::Scrubbed { address, .. }] if *address == node.vf),
        "scrubbed in its first second: {outcomes:?}"
    );
    assert_eq!(handed_out_at(node.state.path(), node.vf).unwrap(), None);
    assert_eq!(
        vfplane_proto::vf_config::read_claim_config(node.state.path(), node.vf).unwrap(),
        None
    );
    let restored = node.reconciler.netlink().get("eth0", 0).unwrap();
    assert_eq!(restored.vlan, 10, "the spec's VLAN again: {restored:?}");
}

#[test]
fn without_pod_resources_the_open_group_alone_decides() {
    let node = node();
    let outcomes = node
        .scrubber()
        .scrub_released(&node.reconciler, &node.spec, None, false);
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
}

#[test]
fn a_failed_reset_quarantines_the_vf_says_why_and_is_retried() {
    let node = node();
    fs::remove_file(node.fake.device_dir(node.vf).join("reset")).unwrap();
    let scrubber = node.scrubber().retry_after(Duration::ZERO);
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    let expected = format!(
        "VF {vf}: the function reset failed: {vf} offers no function reset (no sysfs reset attribute)",
        vf = node.vf
    );
    assert_eq!(
        outcomes,
        [ScrubOutcome::Failed {
            address: node.vf,
            error: expected.clone()
        }]
    );
    assert_eq!(node.state(), Some(VfState::ScrubFailed), "quarantined");
    assert!(
        handed_out_at(node.state.path(), node.vf).unwrap().is_some(),
        "still refused"
    );
    let mut status = node.reconciler.apply(&node.spec).status;
    scrubber.annotate(&mut status);
    assert_eq!(
        status.pfs[0].vfs[0].health.to_string(),
        format!("Unhealthy: scrub failed: {expected}")
    );
    assert_eq!(status.pfs[0].vfs[1].health, VfHealth::Healthy);

    // The reset works again: the next try releases the VF.
    fs::write(node.fake.device_dir(node.vf).join("reset"), "").unwrap();
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    assert!(
        matches!(outcomes.as_slice(), [ScrubOutcome::Scrubbed { .. }]),
        "{outcomes:?}"
    );
    assert_eq!(node.state(), None);
}

/// A reset that never returns (here a FIFO nobody reads, so the write to
/// `reset` blocks in `open`, as a write to a device stuck in the kernel's
/// reset would): the scrub gives up after its timeout and quarantines the
/// VF, the next pass starts no second reset beside the stuck one, and once
/// the stuck write returns the VF is scrubbed as usual.
#[test]
fn a_reset_that_hangs_quarantines_the_vf_and_the_agent_goes_on() {
    let node = node();
    let reset = node.fake.device_dir(node.vf).join("reset");
    fs::remove_file(&reset).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&reset).status().unwrap();
    assert!(made.success(), "mkfifo {}", reset.display());
    let scrubber = node
        .scrubber()
        .retry_after(Duration::ZERO)
        .reset_within(Duration::from_millis(300));
    let owners = Owners::new();
    let began = Instant::now();
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&owners), true);
    assert!(began.elapsed() < Duration::from_secs(5), "the pass returned");
    assert_eq!(
        outcomes,
        [ScrubOutcome::Failed {
            address: node.vf,
            error: format!("VF {}: the function reset did not return within 300ms", node.vf),
        }]
    );
    assert_eq!(node.state(), Some(VfState::ScrubFailed), "quarantined");
    assert!(handed_out_at(node.state.path(), node.vf).unwrap().is_some());

    // Tried again while the first reset is still stuck: refused at once.
    let began = Instant::now();
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&owners), true);
    assert!(began.elapsed() < Duration::from_millis(300), "no wait");
    let [ScrubOutcome::Failed { error, .. }] = outcomes.as_slice() else {
        panic!("{outcomes:?}");
    };
    assert!(
        error.starts_with(&format!("VF {}: the function reset started ", node.vf))
            && error.ends_with(" ago has not returned yet"),
        "{error}"
    );
    assert_eq!(node.state(), Some(VfState::ScrubFailed));

    // The stuck write goes through (a reader opens the FIFO) and returns.
    let written = fs::read_to_string(&reset).unwrap();
    assert_eq!(written.trim(), "1");
    let waiting = Instant::now();
    while lock(&scrubber.resets_running).contains_key(&node.vf) {
        assert!(
            waiting.elapsed() < Duration::from_secs(5),
            "the reset thread did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::remove_file(&reset).unwrap();
    fs::write(&reset, "").unwrap();
    let outcomes = scrubber.scrub_released(&node.reconciler, &node.spec, Some(&owners), true);
    assert!(
        matches!(outcomes.as_slice(), [ScrubOutcome::Scrubbed { .. }]),
        "{outcomes:?}"
    );
    assert_eq!(node.state(), None);
    assert_eq!(handed_out_at(node.state.path(), node.vf).unwrap(), None);
}

#[test]
fn a_failed_scrub_is_not_retried_before_the_retry_time() {
    let node = node();
    fs::remove_file(node.fake.device_dir(node.vf).join("reset")).unwrap();
    let scrubber = node.scrubber();
    let owners = Owners::new();
    assert_eq!(
        scrubber
            .scrub_released(&node.reconciler, &node.spec, Some(&owners), true)
            .len(),
        1
    );
    assert_eq!(
        scrubber.scrub_released(&node.reconciler, &node.spec, Some(&owners), true),
        [],
        "within {RETRY:?} of the failure"
    );
    let due = scrubber.next_due().unwrap();
    assert!(due > RETRY - Duration::from_secs(5) && due <= RETRY, "{due:?}");
}

#[test]
fn a_vf_that_can_still_dma_after_the_reset_fails_the_check() {
    let node = node();
    node.fake.set_command_register(node.vf, 0x0006).unwrap();
    let outcomes = node
        .scrubber()
        .scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    let [ScrubOutcome::Failed { error, .. }] = outcomes.as_slice() else {
        panic!("{outcomes:?}");
    };
    assert_eq!(
        error,
        &format!(
            "VF {}: after the reset, Bus Master Enable is still set (command register 0x0006)",
            node.vf
        )
    );
    assert_eq!(node.state(), Some(VfState::ScrubFailed));
}

#[test]
fn settings_the_pf_does_not_keep_fail_the_check() {
    let node = node();
    node.reconciler.netlink().lose_mac_writes(0, 1);
    node.tenant_changes_settings();
    let outcomes = node
        .scrubber()
        .scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    let [ScrubOutcome::Failed { error, .. }] = outcomes.as_slice() else {
        panic!("{outcomes:?}");
    };
    assert!(
        error.ends_with("after the reset, the PF reports other mac than the spec's"),
        "{error}"
    );
}

#[test]
fn an_agent_killed_mid_scrub_scrubs_again_at_its_next_start() {
    let node = node();
    // The state a crash between reset and check leaves behind.
    vf_state::write_vf_state(node.state.path(), node.vf, Some(VfState::ScrubPending)).unwrap();
    let mut status = node.reconciler.apply(&node.spec).status;
    let restarted = node.scrubber();
    restarted.annotate(&mut status);
    assert_eq!(status.pfs[0].vfs[0].health, VfHealth::Scrubbing);
    let outcomes = restarted.scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    assert!(
        matches!(outcomes.as_slice(), [ScrubOutcome::Scrubbed { .. }]),
        "{outcomes:?}"
    );
    assert_eq!(node.state(), None);
}

#[test]
fn the_marks_of_a_vf_that_vanished_are_removed() {
    let node = node();
    vf_state::write_vf_state(node.state.path(), node.vf, Some(VfState::ScrubFailed)).unwrap();
    fs::remove_dir_all(node.fake.device_dir(node.vf)).unwrap();
    let outcomes = node
        .scrubber()
        .scrub_released(&node.reconciler, &node.spec, Some(&Owners::new()), true);
    assert_eq!(outcomes, [ScrubOutcome::Vanished { address: node.vf }]);
    assert_eq!(handed_out_at(node.state.path(), node.vf).unwrap(), None);
    assert_eq!(node.state(), None);
}
