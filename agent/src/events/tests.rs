//! Which changes of the status make which Events.

use vfplane_proto::node_state::{PfStatus, VfContainerStatus};

use super::*;

fn status(vfs: Vec<VfStatus>) -> NodeStateStatus {
    NodeStateStatus {
        pfs: vec![PfStatus {
            vfs,
            ..PfStatus::default()
        }],
        ..NodeStateStatus::default()
    }
}

fn vf(health: &str) -> VfStatus {
    VfStatus {
        pci_address: "0000:00:12.0".to_owned(),
        health: health.to_owned().into(),
        ..VfStatus::default()
    }
}

fn owned(id: &str, problems: &[&str]) -> VfStatus {
    VfStatus {
        owner: Some("default/tenant-1/app".to_owned()),
        owner_pod_uid: Some("u1".to_owned()),
        container: Some(VfContainerStatus {
            id: id.to_owned(),
            problems: problems.iter().map(|p| (*p).to_owned()).collect(),
            ..VfContainerStatus::default()
        }),
        ..vf("Healthy")
    }
}

#[test]
fn a_quarantine_and_a_release_are_posted_once_each() {
    let healthy = status(vec![vf("Healthy")]);
    let failed = status(vec![vf("Unhealthy: scrub failed: function reset failed")]);
    assert_eq!(between(Some(&healthy), &healthy), []);
    let events = between(Some(&healthy), &failed);
    assert_eq!(
        events,
        [VfEvent::Quarantined {
            vf: "0000:00:12.0".to_owned(),
            why: "function reset failed".to_owned()
        }]
    );
    assert!(events[0].is_warning());
    assert_eq!(events[0].reason(), "VfQuarantined");
    assert_eq!(
        events[0].note(),
        "VF 0000:00:12.0 is quarantined, given to no pod until a scrub succeeds: function reset failed"
    );
    let regarding = events[0].regarding("node-1", Some("uid-n"));
    assert_eq!(
        (
            regarding.api_version.as_deref(),
            regarding.kind.as_deref(),
            regarding.name.as_deref(),
            regarding.uid.as_deref(),
            regarding.namespace.as_deref()
        ),
        (
            Some("vfplane.io/v1alpha1"),
            Some("NodeState"),
            Some("node-1"),
            Some("uid-n"),
            None
        )
    );
    assert_eq!(
        between(Some(&failed), &failed),
        [],
        "still quarantined: nothing new"
    );
    let released = between(Some(&failed), &healthy);
    assert_eq!(
        released,
        [VfEvent::Released {
            vf: "0000:00:12.0".to_owned()
        }]
    );
    assert!(!released[0].is_warning());
    // The agent's first status posts what is true.
    assert_eq!(between(None, &failed).len(), 1);
    assert_eq!(between(None, &healthy), []);
}

#[test]
fn limit_problems_are_posted_on_the_pod_when_new() {
    let none = status(vec![owned("c1", &[])]);
    let one = status(vec![owned("c1", &["memory.max is max"])]);
    let two = status(vec![owned("c1", &["memory.max is max", "pids.max is max"])]);
    assert_eq!(between(Some(&none), &none), []);
    let events = between(Some(&none), &one);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].reason(), "VfContainerLimits");
    assert_eq!(
        events[0].note(),
        "container app holding VF 0000:00:12.0 runs outside its pool's containerProfile: memory.max is max"
    );
    let pod = events[0].regarding("node-1", None);
    assert_eq!(
        (
            pod.kind.as_deref(),
            pod.namespace.as_deref(),
            pod.name.as_deref(),
            pod.uid.as_deref()
        ),
        (Some("Pod"), Some("default"), Some("tenant-1"), Some("u1"))
    );
    assert_eq!(between(Some(&one), &one), [], "said once");
    let more = between(Some(&one), &two);
    assert!(
        matches!(&more[..], [VfEvent::ContainerLimits { problems, .. }] if problems == &["pids.max is max"]),
        "{more:?}"
    );
    // Another container on the VF: its problems are its own.
    let next = status(vec![owned("c2", &["memory.max is max"])]);
    assert_eq!(between(Some(&one), &next).len(), 1);
    // Nobody holds it: nothing.
    assert_eq!(between(Some(&one), &status(vec![vf("Healthy")])), []);
}
