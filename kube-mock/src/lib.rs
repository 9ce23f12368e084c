//! A mocked Kubernetes API server for unit tests, on tower-test: a
//! [`kube::Client`] wired to an [`ApiServer`] the test drives, each request
//! as the server sees it ([`Seen`]: method, path and query, content type,
//! JSON body), and JSON answers ([`Reply`]). The agent's and the
//! controller's tests share it: one way to script the API server.
//!
//! [`in_memory`] is the other double, for whole-loop tests: a stateful
//! in-memory API server (list/watch, server-side apply, patches,
//! finalizers, injected failures) that the real kube client and the
//! controller's runtime run over unchanged.

pub mod in_memory;

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, SendResponse};

/// How long [`ApiServer::next`] waits for a request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The server side of the mock.
#[derive(Debug)]
pub struct ApiServer {
    handle: mock::Handle<Request<Body>, Response<Body>>,
}

/// One request as the API server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its method.
    pub method: Method,
    /// Its path and query.
    pub path_and_query: String,
    /// Its `Content-Type`, when it has one.
    pub content_type: Option<String>,
    /// Its body as JSON; `None` when empty.
    pub body: Option<Value>,
}

/// The answer to one request.
#[derive(Debug)]
pub struct Reply(SendResponse<Response<Body>>);

/// A client talking to a new mock, with `namespace` as its default.
pub fn pair(namespace: &str) -> (kube::Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, namespace), ApiServer { handle })
}

/// Reads a request the way a server does.
///
/// # Panics
/// A body that cannot be read or is not JSON (a test failure).
pub async fn seen(request: Request<Body>) -> Seen {
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect_bytes()
        .await
        .unwrap_or_else(|e| panic!("reading a request body: {e}"));
    Seen {
        method: parts.method,
        path_and_query: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: (!bytes.is_empty()).then(|| {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("a request body that is not JSON: {e}"))
        }),
    }
}

impl ApiServer {
    /// The next request, within [`REQUEST_TIMEOUT`].
    ///
    /// # Panics
    /// No request in time, or the client gone (a test failure).
    pub async fn next(&mut self) -> (Seen, Reply) {
        let (request, send) = tokio::time::timeout(REQUEST_TIMEOUT, self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request within {REQUEST_TIMEOUT:?}"))
            .unwrap_or_else(|| panic!("the client is gone"));
        (seen(request).await, Reply(send))
    }

    /// The request that arrives within `wait`, if one does (`None` also
    /// when the client is gone).
    pub async fn within(&mut self, wait: Duration) -> Option<(Seen, Reply)> {
        match tokio::time::timeout(wait, self.handle.next_request()).await {
            Ok(Some((request, send))) => Some((seen(request).await, Reply(send))),
            _ => None,
        }
    }

    /// Checks that no request arrives within `wait`.
    ///
    /// # Panics
    /// A request arrived (a test failure), naming it.
    pub async fn quiet_for(&mut self, wait: Duration) {
        if let Some((seen, _)) = self.within(wait).await {
            panic!("unexpected request {seen:?}");
        }
    }

    /// The raw tower-test handle, for a test that serves many requests in a
    /// loop of its own.
    pub fn into_handle(self) -> mock::Handle<Request<Body>, Response<Body>> {
        self.handle
    }
}

impl Reply {
    /// Answers `status` with `body` as JSON.
    ///
    /// # Panics
    /// Never for a valid status code (a test failure otherwise).
    pub fn json(self, status: u16, body: &Value) {
        self.0.send_response(json_response(status, body));
    }
}

/// A response of `status` with `body` as JSON.
///
/// # Panics
/// An invalid status code (a test failure).
pub fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap_or_default()))
        .unwrap_or_else(|e| panic!("a response of status {status}: {e}"))
}

/// The `Status` object the API server answers a failure with.
pub fn failure(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "code": code, "message": reason,
    })
}
