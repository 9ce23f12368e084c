use super::*;
use crate::health::{Health, Unready};
use crate::inventory::DeviceStatus;
use vfplane_host::PciAddress;

fn vf() -> PciAddress {
    "0000:00:12.0".parse().unwrap()
}

fn device(health: Health) -> DraDevice {
    DraDevice {
        name: "0000-00-12-0".to_owned(),
        pool: Arc::new(serde_json::from_value(serde_json::json!({"name": "fast"})).unwrap()),
        status: DeviceStatus {
            address: vf(),
            facts: None,
            health,
            vfio_node: None,
            mac: None,
        },
    }
}

#[test]
fn a_clean_vf_is_ready_and_every_other_state_waits_or_fails() {
    let dir = tempfile::tempdir().unwrap();
    let clean = device(Health::default());
    assert_eq!(verdict(dir.path(), Some(&clean), None, "u1"), Verdict::Ready);
    assert_eq!(
        verdict(dir.path(), Some(&clean), Some("u1"), "u1"),
        Verdict::Ready,
        "held by the claim itself (prepared already)"
    );
    assert_eq!(
        verdict(dir.path(), Some(&clean), Some("u0"), "u1"),
        Verdict::Wait,
        "another prepared claim still holds it"
    );
    vf_state::mark_released(dir.path(), vf()).unwrap();
    assert_eq!(
        verdict(dir.path(), Some(&clean), None, "u1"),
        Verdict::Wait,
        "released, not scrubbed"
    );
    vf_state::clear_handed_out(dir.path(), vf()).unwrap();
    vf_state::write_vf_state(dir.path(), vf(), Some(VfState::ScrubPending)).unwrap();
    assert_eq!(
        verdict(dir.path(), Some(&clean), None, "u1"),
        Verdict::Wait,
        "being scrubbed"
    );
    vf_state::write_vf_state(dir.path(), vf(), Some(VfState::ScrubFailed)).unwrap();
    assert_eq!(
        verdict(dir.path(), Some(&clean), None, "u1"),
        Verdict::Failed("VF 0000:00:12.0 failed its scrub and is quarantined".to_owned())
    );
    vf_state::write_vf_state(dir.path(), vf(), None).unwrap();
    let unbound = device(Health {
        reasons: vec![Unready::NotOnVfio(None)],
    });
    assert!(
        matches!(verdict(dir.path(), Some(&unbound), None, "u1"), Verdict::Failed(why) if why.contains("not healthy")),
    );
    assert!(
        matches!(verdict(dir.path(), None, None, "u1"), Verdict::Failed(_)),
        "gone"
    );
}

fn claim(status: serde_json::Value) -> ResourceClaim {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "ns", "name": "c", "uid": "u1"},
        "spec": {"devices": {"requests": []}},
        "status": status,
    }))
    .unwrap()
}

fn allocation() -> serde_json::Value {
    let conditions =
        serde_json::json!({"bindingConditions": [SCRUBBED], "bindingFailureConditions": [SCRUB_FAILED]});
    let result = |device: &str, driver: &str| {
        let mut r =
            serde_json::json!({"request": "vf", "driver": driver, "pool": "node-a", "device": device});
        r.as_object_mut()
            .unwrap()
            .extend(conditions.as_object().unwrap().clone());
        r
    };
    serde_json::json!({"devices": {"results": [
        result("0000-00-12-0", DRIVER_NAME),
        result("0000-00-12-2", DRIVER_NAME),
        result("gpu-0", "gpu.example.com"),
        {"request": "vf", "driver": DRIVER_NAME, "pool": "node-a", "device": "0000-00-12-4"},
    ]}})
}

#[test]
fn only_our_devices_with_binding_conditions_and_no_verdict_are_unjudged() {
    assert!(
        unjudged(&claim(serde_json::json!({})), "node-a").is_empty(),
        "not allocated"
    );
    let fresh = claim(serde_json::json!({"allocation": allocation()}));
    assert_eq!(unjudged(&fresh, "node-a"), ["0000-00-12-0", "0000-00-12-2"]);
    assert!(unjudged(&fresh, "node-b").is_empty(), "another node's pool");
    let half = claim(serde_json::json!({
        "allocation": allocation(),
        "devices": [{"driver": DRIVER_NAME, "pool": "node-a", "device": "0000-00-12-0", "conditions": [
            {"type": SCRUBBED, "status": "True", "reason": "Scrubbed", "message": "", "lastTransitionTime": "2026-12-03T00:00:00Z"}
        ]}]
    }));
    assert_eq!(unjudged(&half, "node-a"), ["0000-00-12-2"]);
}

#[test]
fn the_apply_keeps_earlier_verdicts_adds_new_ones_and_is_empty_when_all_wait() {
    let now = "2026-12-03T01:02:03Z";
    let half = claim(serde_json::json!({
        "allocation": allocation(),
        "devices": [{"driver": DRIVER_NAME, "pool": "node-a", "device": "0000-00-12-0", "conditions": [
            {"type": SCRUBBED, "status": "True", "reason": "Scrubbed", "message": "m", "lastTransitionTime": "2026-12-03T00:00:00Z"}
        ]}]
    }));
    assert_eq!(
        status_apply(
            &half,
            "node-a",
            &[("0000-00-12-2".to_owned(), Verdict::Wait)],
            now
        ),
        None,
        "nothing new to say"
    );
    let body = status_apply(
        &half,
        "node-a",
        &[(
            "0000-00-12-2".to_owned(),
            Verdict::Failed("quarantined".to_owned()),
        )],
        now,
    )
    .unwrap();
    assert_eq!(
        body["metadata"],
        serde_json::json!({"name": "c", "namespace": "ns"})
    );
    let devices = body["status"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{body}");
    assert_eq!(devices[0]["device"], "0000-00-12-0");
    assert_eq!(devices[0]["conditions"][0]["type"], SCRUBBED);
    assert_eq!(
        devices[0]["conditions"][0]["lastTransitionTime"], "2026-12-03T00:00:00Z",
        "an earlier verdict is kept as it was"
    );
    assert_eq!(devices[1]["device"], "0000-00-12-2");
    assert_eq!(devices[1]["conditions"][0]["type"], SCRUB_FAILED);
    assert_eq!(devices[1]["conditions"][0]["message"], "quarantined");
    assert_eq!(devices[1]["conditions"][0]["lastTransitionTime"], now);
}
