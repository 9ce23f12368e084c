#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use serde_json::{Value, json};

use super::{LeaderError, LeaseConfig, keep, try_acquire_or_renew};

type Handle = vfplane_kube_mock::ApiServer;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/vfplane/leases/vfplane-controller";

fn setup() -> (Api<Lease>, Handle, LeaseConfig) {
    let (client, handle) = vfplane_kube_mock::pair("vfplane");
    let config = LeaseConfig::new("vfplane-controller", "controller-a");
    (Api::namespaced(client, "vfplane"), handle, config)
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn lease(holder: &str, renewed_ago_secs: i64, transitions: i32) -> Value {
    let renewed = now() - SignedDuration::from_secs(renewed_ago_secs);
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "vfplane-controller", "namespace": "vfplane", "resourceVersion": "41"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": renewed.to_string(),
            "renewTime": renewed.to_string(),
            "leaseTransitions": transitions,
        }
    })
}

/// A timestamp as a Lease carries it (microseconds).
fn micro(t: Timestamp) -> Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(t)).unwrap()
}

fn not_found() -> Value {
    vfplane_kube_mock::failure(404, "NotFound")
}

/// The next request, checked to be `method` on `path`; its JSON body
/// (`Null` when empty) and the answer to give.
async fn next(handle: &mut Handle, method: Method, path: &str) -> (Value, vfplane_kube_mock::Reply) {
    let (seen, reply) = handle.next().await;
    assert_eq!(seen.method, method);
    assert_eq!(seen.path_and_query.split('?').next(), Some(path));
    (seen.body.unwrap_or(Value::Null), reply)
}

#[tokio::test]
async fn a_missing_lease_is_created_with_us_as_holder() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        send.json(StatusCode::NOT_FOUND.as_u16(), &not_found());
        let (body, send) = next(
            &mut handle,
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/vfplane/leases",
        )
        .await;
        assert_eq!(body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        assert_eq!(body["spec"]["renewTime"], body["spec"]["acquireTime"]);
        send.json(StatusCode::CREATED.as_u16(), &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_left_alone() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        send.json(StatusCode::OK.as_u16(), &lease("controller-b", 5, 3));
        // No write may follow: a live lease is not written.
        handle.quiet_for(Duration::from_millis(200)).await;
    });
    assert!(!try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_its_resource_version() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        send.json(StatusCode::OK.as_u16(), &lease("controller-b", 60, 3));
        let (body, send) = next(&mut handle, Method::PUT, PATH).await;
        assert_eq!(
            body["metadata"]["resourceVersion"], "41",
            "optimistic concurrency"
        );
        assert_eq!(body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        assert_eq!(body["spec"]["renewTime"], micro(now()));
        send.json(StatusCode::OK.as_u16(), &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn losing_the_race_for_an_expired_lease_is_not_an_error() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        send.json(StatusCode::OK.as_u16(), &lease("", 60, 3));
        let (_, send) = next(&mut handle, Method::PUT, PATH).await;
        send.json(StatusCode::CONFLICT.as_u16(),
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        );
    });
    assert!(!try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn our_lease_is_renewed_without_a_transition() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        send.json(StatusCode::OK.as_u16(), &lease("controller-a", 2, 7));
        let (body, send) = next(&mut handle, Method::PUT, PATH).await;
        assert_eq!(body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(body["spec"]["leaseTransitions"], 7);
        assert_eq!(body["spec"]["renewTime"], micro(now()));
        assert_ne!(body["spec"]["acquireTime"], body["spec"]["renewTime"]);
        send.json(StatusCode::OK.as_u16(), &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

/// A renewal the API server never answers (held in a queue, say) ends the
/// lead before the lease could expire: another replica may take it
/// `leaseDurationSeconds` after the last renewal started, and by then this
/// one has stopped.
#[tokio::test(start_paused = true)]
async fn a_renewal_left_unanswered_ends_the_lead_before_the_lease_expires() {
    let (api, mut handle, config) = setup();
    let lease_duration = config.lease_duration;
    let began = tokio::time::Instant::now();
    let keeper = tokio::spawn(async move { keep(&api, &config).await });
    // The first renewal goes through; it started 2 s (renew_every) in.
    let (_, send) = next(&mut handle, Method::GET, PATH).await;
    send.json(StatusCode::OK.as_u16(), &lease("controller-a", 2, 0));
    let (body, send) = next(&mut handle, Method::PUT, PATH).await;
    send.json(StatusCode::OK.as_u16(), &body);
    let renewed_at = tokio::time::Instant::now();
    // The next one is read and never answered.
    let (_, unanswered) = next(&mut handle, Method::GET, PATH).await;
    let lost = tokio::time::timeout(Duration::from_secs(120), keeper)
        .await
        .expect("the lead still held two minutes after a renewal went unanswered")
        .unwrap();
    let LeaderError::Lost { .. } = lost;
    let stopped = tokio::time::Instant::now();
    assert!(
        stopped < renewed_at + lease_duration,
        "stopped {:?} after the last renewal, the lease lasts {lease_duration:?}",
        stopped - renewed_at
    );
    assert!(
        stopped - began >= Duration::from_secs(4),
        "not before the second attempt"
    );
    drop(unanswered);
}
