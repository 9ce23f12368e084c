//! The whole controller (`controller::run`: both controllers, their watch
//! streams, stores, finalizer and retries) against an in-memory API server
//! stand-in, in virtual time. Each scenario changes the cluster the way a
//! user or an agent would and checks what the controller wrote back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::{Value, json};
use vfplane_controller::controller;
use vfplane_controller::metrics::Metrics;
use vfplane_kube_mock::in_memory::{FakeApi, NODES, POLICIES, STATES};
use vfplane_proto::vf_range::parse_vf_range;

const PF: &str = "0000:00:02.0";

fn node(name: &str, labelled: bool) -> Value {
    let labels = if labelled {
        json!({"sriov": "true"})
    } else {
        json!({})
    };
    json!({"metadata": {"name": name, "labels": labels}})
}

fn policy(name: &str, priority: u8, pf_names: &str) -> Value {
    json!({
        "metadata": {"name": name, "generation": 1},
        "spec": {"nodeSelector": {"sriov": "true"}, "nicSelector": {"pfNames": [pf_names]},
                 "numVfs": 4, "resourceName": name, "priority": priority}
    })
}

/// A NodeState as an agent leaves it after its first discovery: one PF with
/// no VFs, no spec yet.
fn reported_state(node: &str) -> Value {
    json!({
        "metadata": {"name": node, "generation": 1},
        "spec": {},
        "status": {"iommuEnabled": true, "observedGeneration": 1, "pfs": [{
            "pciAddress": PF, "name": "eth0", "vendor": "8086", "device": "10c9",
            "link": "up", "totalVfs": 7, "numVfs": 0, "vfs": []}]}
    })
}

/// Does what the agent on `node` would: makes each PF's VFs what the spec
/// asks, puts them in their pools, and reports the generation it applied.
fn agent_catches_up(api: &FakeApi, node: &str) {
    api.edit(STATES, node, |state| {
        let spec_pfs = state["spec"]["pfs"].as_array().cloned().unwrap_or_default();
        let generation = state["metadata"]["generation"].clone();
        for pf in state["status"]["pfs"].as_array_mut().unwrap() {
            let Some(wanted) = spec_pfs.iter().find(|s| s["pciAddress"] == pf["pciAddress"]) else {
                continue;
            };
            let num_vfs = wanted["numVfs"].as_u64().unwrap();
            let mut vfs = Vec::new();
            for index in 0..num_vfs {
                let pool = wanted["vfGroups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|g| {
                        parse_vf_range(g["vfRange"].as_str().unwrap())
                            .unwrap()
                            .contains(&u16::try_from(index).unwrap())
                    })
                    .map(|g| g["resourceName"].clone());
                vfs.push(
                    json!({"index": index, "pciAddress": format!("0000:00:10.{index}"),
                                "isolated": true, "health": "Healthy", "pool": pool}),
                );
            }
            pf["numVfs"] = json!(num_vfs);
            pf["vfs"] = json!(vfs);
        }
        state["status"]["observedGeneration"] = generation;
    });
}

/// Starts the controller over `api`; it runs until the test ends.
fn start(api: &FakeApi) -> Arc<Metrics> {
    let metrics = Arc::new(Metrics::default());
    tokio::spawn(controller::run(
        api.client(),
        Arc::clone(&metrics),
        std::future::pending(),
    ));
    metrics
}

/// Waits (in virtual time, up to two minutes) for `check` to hold; on
/// timeout, fails with `what` and the requests answered so far.
async fn until(api: &FakeApi, what: &str, check: impl Fn(&FakeApi) -> bool) {
    within(api, what, Duration::from_secs(120), check).await;
}

/// [`until`] with a deadline of its own.
async fn within(api: &FakeApi, what: &str, limit: Duration, check: impl Fn(&FakeApi) -> bool) {
    let steps = limit.as_millis() / 100;
    for _ in 0..steps {
        if check(api) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; requests:\n{}", api.describe_log());
}

fn spec_pf(api: &FakeApi, node: &str) -> Value {
    api.get(STATES, node)
        .map_or(Value::Null, |s| s["spec"]["pfs"][0].clone())
}

fn policy_status(api: &FakeApi, name: &str) -> Value {
    api.get(POLICIES, name)
        .map_or(Value::Null, |p| p["status"].clone())
}

/// Well under the policies' five-minute resync: what arrives by then came
/// through a watch event.
const SOON: Duration = Duration::from_secs(10);

const STATE_W1: &str = "/apis/vfplane.io/v1alpha1/nodestates/w1";

#[tokio::test(start_paused = true)]
async fn labelling_a_node_brings_its_vfs_and_unlabelling_winds_them_down() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", false));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("fast", 10, "eth0"));
    start(&api);

    // The policy selects no node yet: it gets its finalizer and a status
    // that says so, and the node's empty spec is left alone.
    until(&api, "status of a policy matching no node", |api| {
        policy_status(api, "fast")["matchedNodes"] == 0
    })
    .await;
    assert_eq!(
        api.get(POLICIES, "fast").unwrap()["metadata"]["finalizers"],
        json!(["vfplane.io/release-vfs"])
    );
    assert!(
        api.writes_to(STATE_W1).is_empty(),
        "{:?}",
        api.writes_to(STATE_W1)
    );

    // Label the node: its NodeState asks for the policy's VFs.
    api.edit(NODES, "w1", |n| n["metadata"]["labels"]["sriov"] = json!("true"));
    until(&api, "the spec of the labelled node", |api| {
        spec_pf(api, "w1")["numVfs"] == 4
    })
    .await;
    let pf = spec_pf(&api, "w1");
    assert_eq!(pf["pciAddress"], PF);
    assert_eq!(pf["vfGroups"][0]["resourceName"], "fast");
    assert_eq!(pf["vfGroups"][0]["vfRange"], "0-3");
    let state = api.get(STATES, "w1").unwrap();
    assert_eq!(state["metadata"]["ownerReferences"][0]["kind"], "Node");
    assert_eq!(state["metadata"]["ownerReferences"][0]["name"], "w1");
    until(&api, "the policy to count the node", |api| {
        let s = policy_status(api, "fast");
        s["matchedNodes"] == 1 && s["requestedVfs"] == 4 && s["readyVfs"] == 0
    })
    .await;

    // The agent applies it: the policy reports the VFs ready.
    agent_catches_up(&api, "w1");
    until(&api, "ready VFs in the policy status", |api| {
        policy_status(api, "fast")["readyVfs"] == 4
    })
    .await;

    // Unlabel the node: the PF winds down to zero VFs while the agent still
    // reports four, and leaves the spec once the agent reports zero.
    api.edit(NODES, "w1", |n| n["metadata"]["labels"] = json!({}));
    until(&api, "the wind-down of the unlabelled node", |api| {
        spec_pf(api, "w1")["numVfs"] == 0
    })
    .await;
    let groups = spec_pf(&api, "w1")["vfGroups"].clone();
    assert!(
        groups.as_array().is_none_or(Vec::is_empty),
        "no pool left: {groups}"
    );
    until(&api, "the policy to drop the node", |api| {
        policy_status(api, "fast")["matchedNodes"] == 0
    })
    .await;
    agent_catches_up(&api, "w1");
    until(&api, "the PF to leave the spec", |api| {
        api.get(STATES, "w1").unwrap()["spec"]["pfs"] == json!([])
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_apply_is_retried_after_the_backoff_and_counted() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", true));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("fast", 10, "eth0"));
    api.fail_next(Method::PATCH, STATE_W1, StatusCode::INTERNAL_SERVER_ERROR);
    let metrics = start(&api);

    until(&api, "the spec after a retry", |api| {
        spec_pf(api, "w1")["numVfs"] == 4
    })
    .await;
    let writes = api.writes_to(STATE_W1);
    assert_eq!(writes.len(), 2, "{writes:?}");
    assert_eq!(writes[0].status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(writes[1].status, StatusCode::OK);
    let waited = writes[1].at - writes[0].at;
    assert!(
        waited >= Duration::from_secs(10),
        "retried after {waited:?}, before the error policy's 10 s"
    );
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("vfplane_controller_reconcile_errors_total")
                && l.contains("controller=\"nodes\"")
                && l.ends_with(" 1")),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_deleted_policy_goes_only_after_its_vfs_are_released() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", true));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("fast", 10, "eth0"));
    start(&api);
    until(&api, "the spec", |api| spec_pf(api, "w1")["numVfs"] == 4).await;
    agent_catches_up(&api, "w1");
    until(&api, "ready VFs", |api| {
        policy_status(api, "fast")["readyVfs"] == 4
    })
    .await;

    api.delete(POLICIES, "fast");
    until(&api, "the pool to leave the spec", |api| {
        spec_pf(api, "w1")["numVfs"] == 0
    })
    .await;
    // The agent has not released the VFs: a minute later the policy is
    // still there, held by its finalizer.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let held = api
        .get(POLICIES, "fast")
        .expect("the policy, held by its finalizer");
    assert_eq!(held["metadata"]["finalizers"], json!(["vfplane.io/release-vfs"]));

    agent_catches_up(&api, "w1");
    until(&api, "the policy to go", |api| {
        api.get(POLICIES, "fast").is_none()
    })
    .await;
    until(&api, "the PF to leave the spec", |api| {
        api.get(STATES, "w1").unwrap()["spec"]["pfs"] == json!([])
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_higher_priority_policy_takes_the_contested_vfs_on_arrival() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", true));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("bulk", 50, "eth0#0-3"));
    start(&api);
    until(&api, "bulk's spec", |api| {
        spec_pf(api, "w1")["vfGroups"][0]["vfRange"] == "0-3"
    })
    .await;

    api.put(POLICIES, policy("voice", 1, "eth0#2-3"));
    until(&api, "the split between the two pools", |api| {
        let mut groups: Vec<(String, String)> = spec_pf(api, "w1")["vfGroups"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| (g["resourceName"].to_string(), g["vfRange"].to_string()))
            .collect();
        groups.sort();
        groups == [group("bulk", "0-1"), group("voice", "2-3")]
    })
    .await;
    until(&api, "both statuses to name the conflict", |api| {
        let lost = &policy_status(api, "bulk")["conflicts"][0];
        let won = &policy_status(api, "voice")["conflicts"][0];
        lost["policy"] == "voice"
            && lost["won"] == false
            && lost["vfs"] == "2-3"
            && won["policy"] == "bulk"
            && won["won"] == true
            && won["vfs"] == "2-3"
    })
    .await;
}

fn group(pool: &str, range: &str) -> (String, String) {
    (json!(pool).to_string(), json!(range).to_string())
}

/// How many reconciles `controller` ran, from the metrics.
fn reconciles(metrics: &Metrics, controller: &str) -> u64 {
    let text = metrics.encode();
    let prefix = format!("vfplane_controller_reconciles_total{{controller=\"{controller}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test(start_paused = true)]
async fn node_heartbeats_leave_policies_alone_but_new_relabelled_and_deleted_nodes_count() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", true));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("fast", 10, "eth0"));
    let metrics = start(&api);
    until(&api, "the policy to count w1", |api| {
        policy_status(api, "fast")["matchedNodes"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Five kubelet heartbeats (status only): no policy is recomputed.
    let before = reconciles(&metrics, "policies");
    assert!(before > 0);
    for beat in 0..5 {
        api.edit(NODES, "w1", |n| {
            n["status"]["conditions"] = json!([{"type": "Ready", "status": "True",
                "lastHeartbeatTime": format!("2026-11-23T12:00:{beat:02}Z")}]);
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    assert_eq!(
        reconciles(&metrics, "policies"),
        before,
        "heartbeats recomputed policies"
    );

    // A new node, a relabelled node and a deleted node each reach the
    // policy's status (well before its five-minute resync).
    api.put(STATES, reported_state("w2"));
    api.put(NODES, node("w2", true));
    within(&api, "the policy to count the new node", SOON, |api| {
        policy_status(api, "fast")["matchedNodes"] == 2
    })
    .await;
    api.edit(NODES, "w1", |n| n["metadata"]["labels"] = json!({}));
    within(&api, "the policy to drop the relabelled node", SOON, |api| {
        policy_status(api, "fast")["matchedNodes"] == 1
    })
    .await;
    api.delete(NODES, "w2");
    within(&api, "the policy to drop the deleted node", SOON, |api| {
        policy_status(api, "fast")["matchedNodes"] == 0
    })
    .await;
}

/// The requests to `plural`'s collection that `watch` picks: its watches
/// (`watch=true`) or its lists.
fn collection_reads(api: &FakeApi, plural: &str, watch: bool) -> usize {
    api.log()
        .iter()
        .filter(|l| {
            l.method == Method::GET
                && l.path.rsplit('/').next() == Some(plural)
                && l.query.split('&').any(|p| p == "watch=true") == watch
        })
        .count()
}

#[tokio::test(start_paused = true)]
async fn the_controllers_and_the_webhook_view_share_one_watch_per_kind() {
    let api = FakeApi::default();
    api.put(NODES, node("w1", true));
    api.put(STATES, reported_state("w1"));
    api.put(POLICIES, policy("fast", 10, "eth0"));
    // As `vfplane-controller run` does: the watches and the webhook's view
    // first, the controllers (on the leader) over the same watches.
    // On the leader, the readiness probe waits for the stores while the
    // controllers do (kube-runtime's own store readiness wakes only one of
    // several waiters; with it, the leader never became ready).
    let watches = controller::ClusterWatches::spawn(&api.client());
    let view = watches.view();
    let ready = tokio::spawn({
        let watches = watches.clone();
        async move { watches.listed().await }
    });
    tokio::spawn(controller::run_with(
        watches,
        api.client(),
        api.client(),
        Arc::new(Metrics::default()),
        std::future::pending(),
    ));
    until(&api, "the spec", |api| spec_pf(api, "w1")["numVfs"] == 4).await;
    assert!(
        tokio::time::timeout(SOON, ready)
            .await
            .expect("the stores never became ready")
            .unwrap()
    );
    agent_catches_up(&api, "w1");
    until(&api, "ready VFs", |api| {
        policy_status(api, "fast")["readyVfs"] == 4
    })
    .await;
    // A node joins and the view sees it; the controllers see it too.
    api.put(STATES, reported_state("w2"));
    api.put(NODES, node("w2", true));
    within(&api, "the policy to count the new node", SOON, |api| {
        policy_status(api, "fast")["matchedNodes"] == 2
    })
    .await;
    assert_eq!(view.nodes.state().len(), 2);
    assert_eq!(view.states.state().len(), 2);
    assert!(
        view.policies
            .state()
            .iter()
            .any(|p| p.status.as_ref().is_some_and(|s| s.ready_vfs == 4))
    );

    for plural in [NODES, POLICIES, STATES] {
        for (watch, what) in [(true, "watches"), (false, "lists")] {
            assert_eq!(
                collection_reads(&api, plural, watch),
                1,
                "{what} of {plural}:\n{}",
                api.describe_log()
            );
        }
    }
}
