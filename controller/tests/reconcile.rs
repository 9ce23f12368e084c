//! Reconcile scenarios against a mocked API server: every request's method,
//! path, query and body is checked.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::{Value, json};
use vfplane_controller::Error;
use vfplane_controller::controller::{Context, StatusThrottle, reconcile_node, reconcile_policy, recorder};
use vfplane_controller::metrics::Metrics;
use vfplane_controller::rollout::Rollouts;
use vfplane_proto::node_state::{NodeState, NodeStateSpec, NodeStateStatus, PfStatus, VfStatus};
use vfplane_proto::vf_policy::VfPolicy;

type Handle = vfplane_kube_mock::ApiServer;

fn filled<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn node(name: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {"sriov": "true"}}
    }))
    .unwrap()
}

fn policy(name: &str, priority: u8, pf_names: &str, finalized: bool, deleting: bool) -> VfPolicy {
    let mut meta = json!({"name": name, "generation": 2});
    if finalized {
        meta["finalizers"] = json!(["vfplane.io/release-vfs"]);
    }
    if deleting {
        meta["deletionTimestamp"] = json!("2026-11-23T10:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "vfplane.io/v1alpha1", "kind": "VfPolicy", "metadata": meta,
        "spec": {"nodeSelector": {"sriov": "true"}, "nicSelector": {"pfNames": [pf_names]},
                 "numVfs": 4, "resourceName": name, "priority": priority}
    }))
    .unwrap()
}

fn state(node: &str, vfs_in_pool: Option<(&str, u16)>) -> NodeState {
    let mut pf = PfStatus {
        pci_address: "0000:00:02.0".into(),
        name: Some("eth0".into()),
        vendor: "8086".into(),
        device: "10c9".into(),
        link: "up".into(),
        total_vfs: 7,
        num_vfs: 0,
        ..PfStatus::default()
    };
    if let Some((pool, n)) = vfs_in_pool {
        pf.num_vfs = n;
        for index in 0..n {
            pf.vfs.push(VfStatus {
                index,
                pci_address: format!("0000:00:10.{index}"),
                isolated: true,
                health: vfplane_proto::vf_health::VfHealth::Healthy,
                pool: Some(pool.into()),
                ..VfStatus::default()
            });
        }
    }
    let mut s = NodeState::new(node, NodeStateSpec::default());
    s.status = Some(NodeStateStatus {
        pfs: vec![pf],
        iommu_enabled: true,
        ..NodeStateStatus::default()
    });
    s
}

fn context(nodes: Vec<Node>, policies: Vec<VfPolicy>, states: Vec<NodeState>) -> (Arc<Context>, Handle) {
    let (client, handle) = vfplane_kube_mock::pair("default");
    let ctx = Context {
        recorder: recorder(&client),
        rollouts: Rollouts::default(),
        evictions: client.clone(),
        client,
        nodes: filled(nodes),
        policies: filled(policies),
        states: filled(states),
        metrics: Arc::new(Metrics::default()),
        status_throttle: StatusThrottle::default(),
    };
    (Arc::new(ctx), handle)
}

/// The next request: method, path and query, content type, JSON body
/// (`Null` when empty), and the answer to give.
async fn next(handle: &mut Handle) -> (Method, String, Option<String>, Value, vfplane_kube_mock::Reply) {
    let (seen, reply) = handle.next().await;
    (
        seen.method,
        seen.path_and_query,
        seen.content_type,
        seen.body.unwrap_or(Value::Null),
        reply,
    )
}

/// No request came (the client may be gone, which ends the stream).
async fn no_request(handle: &mut Handle) -> bool {
    handle.within(Duration::from_millis(200)).await.is_none()
}

fn ok(send: vfplane_kube_mock::Reply, body: &Value) {
    send.json(StatusCode::OK.as_u16(), body);
}

#[tokio::test]
async fn a_new_policy_is_applied_to_the_node_state_by_server_side_apply() {
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![policy("fast", 10, "eth0#0-1", true, false)],
        vec![state("w1", None)],
    );
    let server = tokio::spawn(async move {
        let (method, uri, content_type, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(
            uri,
            "/apis/vfplane.io/v1alpha1/nodestates/w1?&force=true&fieldManager=vfplane-controller"
        );
        assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
        assert_eq!(body["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-w1");
        let pf = &body["spec"]["pfs"][0];
        assert_eq!(pf["pciAddress"], "0000:00:02.0");
        assert_eq!(pf["numVfs"], 4);
        assert_eq!(pf["vfGroups"][0]["resourceName"], "fast");
        assert_eq!(pf["vfGroups"][0]["vfRange"], "0-1");
        ok(send, &body);
    });
    reconcile_node(Arc::new(node("w1")), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_node_whose_spec_already_matches_gets_no_write() {
    let policies = vec![policy("fast", 10, "eth0#0-1", true, false)];
    let mut current = state("w1", None);
    let ordered = vfplane_controller::plan::merge_order(&policies);
    current.spec = vfplane_controller::plan::plan_node(&node("w1"), &ordered, Some(&current)).spec;
    let (ctx, mut handle) = context(vec![node("w1")], policies, vec![current]);
    reconcile_node(Arc::new(node("w1")), ctx).await.unwrap();
    assert!(no_request(&mut handle).await, "no request for an unchanged spec");
}

#[tokio::test]
async fn an_api_error_on_apply_is_reported_with_the_object() {
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![policy("fast", 10, "eth0", true, false)],
        vec![state("w1", None)],
    );
    let server = tokio::spawn(async move {
        let (_, _, _, _, send) = next(&mut handle).await;
        send.json(
            StatusCode::INTERNAL_SERVER_ERROR.as_u16(),
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd unavailable", "reason": "InternalError", "code": 500}),
        );
    });
    let error = reconcile_node(Arc::new(node("w1")), ctx).await.unwrap_err();
    server.await.unwrap();
    assert!(matches!(error, Error::Kube { .. }), "{error:?}");
    assert_eq!(error.to_string(), "applying the spec of NodeState/w1");
}

#[tokio::test]
async fn policy_status_reports_conflicts_and_ready_vfs() {
    let high = policy("high", 1, "eth0#0-1", true, false);
    let low = policy("low", 50, "eth0#1-3", true, false);
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![high, low.clone()],
        vec![state("w1", Some(("low", 4)))],
    );
    let server = tokio::spawn(async move {
        let (method, uri, content_type, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(
            uri,
            "/apis/vfplane.io/v1alpha1/vfpolicies/low/status?&force=true&fieldManager=vfplane-controller"
        );
        assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
        let status = &body["status"];
        assert_eq!(status["matchedNodes"], 1);
        assert_eq!(
            status["requestedVfs"], 2,
            "VFs 2-3; VF 1 went to the higher priority"
        );
        assert_eq!(status["readyVfs"], 2);
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(
            status["conflicts"][0],
            json!({"node": "w1", "pf": "0000:00:02.0", "policy": "high", "won": false, "vfs": "1"})
        );
        let conflicted = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Conflicted")
            .unwrap();
        assert_eq!(conflicted["reason"], "LostToHigherPriority");
        let mut answer = serde_json::to_value(policy("low", 50, "eth0#1-3", true, false)).unwrap();
        answer["status"] = status.clone();
        ok(send, &answer);
    });
    reconcile_policy(Arc::new(low), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_new_policy_first_gets_its_finalizer() {
    let fresh = policy("fast", 10, "eth0", false, false);
    let (ctx, mut handle) = context(vec![node("w1")], vec![fresh.clone()], vec![state("w1", None)]);
    let server = tokio::spawn(async move {
        let (method, uri, _, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(uri, "/apis/vfplane.io/v1alpha1/vfpolicies/fast?");
        let ops = body.as_array().expect("a JSON patch");
        assert!(
            ops.iter()
                .any(|op| op["path"] == "/metadata/finalizers"
                    && op["value"] == json!(["vfplane.io/release-vfs"])),
            "{body}"
        );
        let mut patched = serde_json::to_value(policy("fast", 10, "eth0", true, false)).unwrap();
        patched["metadata"]["resourceVersion"] = json!("2");
        ok(send, &patched);
    });
    reconcile_policy(Arc::new(fresh), ctx).await.unwrap();
    server.await.unwrap();
}

#[tokio::test]
async fn a_deleted_policy_keeps_its_finalizer_until_agents_report_its_vfs_gone() {
    let deleting = policy("fast", 10, "eth0", true, true);
    // The agent still reports 4 VFs in the pool: the finalizer stays, no request.
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![deleting.clone()],
        vec![state("w1", Some(("fast", 4)))],
    );
    let error = reconcile_policy(Arc::new(deleting.clone()), ctx)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::StillReleasing { count: 4, .. }),
        "{error:?}"
    );
    assert!(no_request(&mut handle).await);

    // The VFs are gone: the finalizer is removed.
    let (ctx, mut handle) = context(vec![node("w1")], vec![deleting.clone()], vec![state("w1", None)]);
    let server = tokio::spawn(async move {
        let (method, uri, _, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(uri, "/apis/vfplane.io/v1alpha1/vfpolicies/fast?");
        let ops = body.as_array().expect("a JSON patch");
        assert!(
            ops.iter()
                .any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
            "{body}"
        );
        ok(
            send,
            &serde_json::to_value(policy("fast", 10, "eth0", false, true)).unwrap(),
        );
    });
    reconcile_policy(Arc::new(deleting), ctx).await.unwrap();
    server.await.unwrap();
}

/// A policy's status is computed at most once a second while its spec
/// stays the same, and at once when its spec changes.
#[test]
fn a_policys_status_is_computed_at_most_once_a_second_unless_its_spec_changed() {
    use std::time::Duration;
    use vfplane_controller::controller::POLICY_STATUS_EVERY;
    let throttle = StatusThrottle::default();
    let t0 = tokio::time::Instant::now();
    assert_eq!(throttle.wait("fast", Some(1), t0), None, "the first is computed");
    let soon = t0 + Duration::from_millis(300);
    assert_eq!(
        throttle.wait("fast", Some(1), soon),
        Some(POLICY_STATUS_EVERY - Duration::from_millis(300))
    );
    assert_eq!(
        throttle.wait("voice", Some(1), soon),
        None,
        "another policy is its own"
    );
    assert_eq!(
        throttle.wait("fast", Some(2), soon),
        None,
        "a spec change is computed at once"
    );
    let later = soon + POLICY_STATUS_EVERY;
    assert_eq!(
        throttle.wait("fast", Some(2), later),
        None,
        "a second later it is computed again"
    );
    throttle.forget("fast");
    assert_eq!(throttle.wait("fast", Some(2), later), None);
}

/// A node reporting `reported` VFs of `eth0`, with the spec `fast` at
/// `written` VFs plans (the agent has seen it); VF 0 held by `owner`.
fn written_state(node_name: &str, written: u16, reported: u16, owner: Option<&str>) -> NodeState {
    let mut current = state(node_name, Some(("fast", reported)));
    let mut older = policy("fast", 10, "eth0", true, false);
    older.spec.num_vfs = written;
    let plan = vfplane_controller::plan::plan_node(&node(node_name), &[&older], Some(&current));
    current.spec = plan.spec;
    current.metadata.generation = Some(3);
    let status = current.status.as_mut().unwrap();
    status.observed_generation = Some(3);
    if let Some(owner) = owner {
        status.pfs[0].vfs[0].owner = Some(owner.to_owned());
        status.pfs[0].vfs[0].owner_pod_uid = Some("uid-pmd".to_owned());
    }
    current
}

fn rolled_out(max: u32, evict: bool) -> VfPolicy {
    let mut changed = policy("fast", 10, "eth0", true, false);
    changed.spec.num_vfs = 6;
    changed.spec.rollout = Some(vfplane_proto::vf_policy::RolloutSpec {
        max_unavailable_nodes: max,
        evict_pods: evict,
    });
    changed
}

#[tokio::test]
async fn a_numvfs_change_starts_on_as_many_nodes_as_the_rollout_allows_and_the_rest_keep_their_spec() {
    let (ctx, mut handle) = context(
        vec![node("w1"), node("w2")],
        vec![rolled_out(1, false)],
        vec![written_state("w1", 4, 4, None), written_state("w2", 4, 4, None)],
    );
    let first = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move { reconcile_node(Arc::new(node("w1")), ctx).await }
    });
    let (method, uri, _, body, send) = next(&mut handle).await;
    assert_eq!(method, Method::PATCH);
    assert!(
        uri.starts_with("/apis/vfplane.io/v1alpha1/nodestates/w1?"),
        "{uri}"
    );
    assert_eq!(body["spec"]["pfs"][0]["numVfs"], 6, "{body}");
    ok(send, &body);
    first.await.unwrap().unwrap();
    // w1's write is not in the store yet; w2 waits all the same, with the
    // spec it has: nothing to write.
    let action = reconcile_node(Arc::new(node("w2")), Arc::clone(&ctx))
        .await
        .unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(vfplane_controller::controller::ROLLOUT_WAIT_RECHECK)
    );
    assert!(no_request(&mut handle).await);
}

#[tokio::test]
async fn pods_holding_vfs_of_a_pf_in_a_change_are_evicted_once_and_a_budget_is_waited_on() {
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![rolled_out(5, true)],
        vec![written_state("w1", 6, 4, Some("team/pmd-0/app"))],
    );
    // A PodDisruptionBudget refuses: a Warning on the policy, a retry.
    let run = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move { reconcile_node(Arc::new(node("w1")), ctx).await }
    });
    let (method, uri, _, body, send) = next(&mut handle).await;
    assert_eq!(
        (method, uri.as_str()),
        (Method::POST, "/api/v1/namespaces/team/pods/pmd-0/eviction?")
    );
    assert_eq!(body["kind"], "Eviction");
    assert_eq!(body["metadata"]["name"], "pmd-0");
    assert_eq!(body["deleteOptions"]["preconditions"]["uid"], "uid-pmd", "{body}");
    send.json(
        429,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 429, "reason": "TooManyRequests",
                "message": "Cannot evict pod as it would violate the pod's disruption budget."}),
    );
    let (method, uri, _, body, send) = next(&mut handle).await;
    assert_eq!(method, Method::POST);
    assert!(
        uri.starts_with("/apis/events.k8s.io/v1/namespaces/default/events"),
        "{uri}"
    );
    assert_eq!(body["reason"], "WaitingOnPdb");
    assert_eq!(body["regarding"]["kind"], "VfPolicy");
    assert!(
        body["note"].as_str().unwrap().contains("disruption budget"),
        "{body}"
    );
    ok(send, &body);
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(vfplane_controller::controller::EVICTION_RETRY)
    );
    let notes = ctx.rollouts.notes();
    assert_eq!(notes["w1"].reason, "WaitingOnPdb");

    // The budget allows it now: evicted, with a Normal event on the pod.
    let run = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move { reconcile_node(Arc::new(node("w1")), ctx).await }
    });
    let (method, uri, _, body, send) = next(&mut handle).await;
    assert_eq!(
        (method, uri.as_str()),
        (Method::POST, "/api/v1/namespaces/team/pods/pmd-0/eviction?")
    );
    assert_eq!(body["deleteOptions"]["preconditions"]["uid"], "uid-pmd", "{body}");
    send.json(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}),
    );
    let (_, uri, _, body, send) = next(&mut handle).await;
    assert!(
        uri.starts_with("/apis/events.k8s.io/v1/namespaces/team/events"),
        "{uri}"
    );
    assert_eq!(body["reason"], "EvictedForVfChange");
    assert_eq!(body["regarding"]["name"], "pmd-0");
    ok(send, &body);
    run.await.unwrap().unwrap();
    assert!(ctx.rollouts.notes().is_empty(), "the block is over");
    // Asked once: the pod is on its way out.
    reconcile_node(Arc::new(node("w1")), Arc::clone(&ctx))
        .await
        .unwrap();
    assert!(no_request(&mut handle).await);
}

#[tokio::test]
async fn a_policy_without_evict_pods_never_evicts() {
    let (ctx, mut handle) = context(
        vec![node("w1")],
        vec![rolled_out(5, false)],
        vec![written_state("w1", 6, 4, Some("team/pmd-0/app"))],
    );
    reconcile_node(Arc::new(node("w1")), ctx).await.unwrap();
    assert!(no_request(&mut handle).await);
}
