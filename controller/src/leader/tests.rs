#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::{LeaseConfig, try_acquire_or_renew};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/vfplane/leases/vfplane-controller";

fn setup() -> (Api<Lease>, Handle, LeaseConfig) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "vfplane");
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

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: StatusCode, body: &Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

/// A timestamp as a Lease carries it (microseconds).
fn micro(t: Timestamp) -> Value {
    serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(t)).unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

async fn next(
    handle: &mut Handle,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("a request in time")
        .expect("a request");
    assert_eq!(request.method(), method);
    assert_eq!(request.uri().path(), path);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (body, send)
}

#[tokio::test]
async fn a_missing_lease_is_created_with_us_as_holder() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        respond(send, StatusCode::NOT_FOUND, &not_found());
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
        respond(send, StatusCode::CREATED, &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn a_live_lease_of_another_replica_is_left_alone() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        respond(send, StatusCode::OK, &lease("controller-b", 5, 3));
        // No write may follow.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), handle.next_request())
                .await
                .is_err(),
            "a live lease must not be written"
        );
    });
    assert!(!try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_its_resource_version() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        respond(send, StatusCode::OK, &lease("controller-b", 60, 3));
        let (body, send) = next(&mut handle, Method::PUT, PATH).await;
        assert_eq!(
            body["metadata"]["resourceVersion"], "41",
            "optimistic concurrency"
        );
        assert_eq!(body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(body["spec"]["leaseTransitions"], 4);
        assert_eq!(body["spec"]["renewTime"], micro(now()));
        respond(send, StatusCode::OK, &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn losing_the_race_for_an_expired_lease_is_not_an_error() {
    let (api, mut handle, config) = setup();
    let server = tokio::spawn(async move {
        let (_, send) = next(&mut handle, Method::GET, PATH).await;
        respond(send, StatusCode::OK, &lease("", 60, 3));
        let (_, send) = next(&mut handle, Method::PUT, PATH).await;
        respond(
            send,
            StatusCode::CONFLICT,
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
        respond(send, StatusCode::OK, &lease("controller-a", 2, 7));
        let (body, send) = next(&mut handle, Method::PUT, PATH).await;
        assert_eq!(body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(body["spec"]["leaseTransitions"], 7);
        assert_eq!(body["spec"]["renewTime"], micro(now()));
        assert_ne!(body["spec"]["acquireTime"], body["spec"]["renewTime"]);
        respond(send, StatusCode::OK, &body);
    });
    assert!(try_acquire_or_renew(&api, &config, now()).await.unwrap());
    server.await.unwrap();
}
