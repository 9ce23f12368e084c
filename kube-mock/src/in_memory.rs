//! An in-memory stand-in for the parts of the Kubernetes API server the
//! controller speaks to: list and watch of Nodes, VfPolicies and NodeStates,
//! server-side apply of a NodeState's spec and a VfPolicy's status, JSON
//! patches (finalizers), deletion held back by finalizers, and failures
//! injected on chosen requests. It is a `tower::Service`, so the real kube
//! client, its watchers and the controller's runtime run over it unchanged.
//!
//! It keeps what a scenario needs to check: every request (method, path,
//! the virtual time it came at, and the answer's status), and the objects.
// A test double: a panic in it is the failure report of the test using it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The kinds served, by their plural.
pub const NODES: &str = "nodes";
pub const POLICIES: &str = "vfpolicies";
pub const STATES: &str = "nodestates";

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// One request the stand-in answered.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: Method,
    /// Path without the query.
    pub path: String,
    pub query: String,
    pub at: Instant,
    pub status: StatusCode,
}

/// A failure to answer instead of serving a request.
struct Failure {
    method: Method,
    path: String,
    status: StatusCode,
}

struct Event {
    resource_version: u64,
    kind: &'static str,
    object: Value,
}

/// A live watch: where its events go, and the one name it selects, if any.
struct Watcher {
    sender: mpsc::UnboundedSender<Bytes>,
    only: Option<String>,
}

/// The name a `fieldSelector=metadata.name=NAME` query selects.
fn name_selected(query: &str) -> Option<String> {
    let selector = query_value(query, "fieldSelector")?;
    let decoded = selector.replace("%3D", "=").replace("%3d", "=");
    decoded.strip_prefix("metadata.name=").map(str::to_owned)
}

#[derive(Default)]
struct State {
    resource_version: u64,
    objects: HashMap<&'static str, BTreeMap<String, Value>>,
    events: HashMap<&'static str, Vec<Event>>,
    watchers: HashMap<&'static str, Vec<Watcher>>,
    failures: VecDeque<Failure>,
    log: Vec<Logged>,
}

/// The stand-in. Cheap to clone; clones share the objects.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi").finish_non_exhaustive()
    }
}

fn plural_of(path: &str) -> Option<(&'static str, Option<String>, bool)> {
    let rest = if let Some(rest) = path.strip_prefix("/api/v1/") {
        rest
    } else {
        path.strip_prefix("/apis/vfplane.io/v1alpha1/")?
    };
    let mut parts = rest.split('/');
    let plural = match parts.next()? {
        "nodes" => NODES,
        "vfpolicies" => POLICIES,
        "nodestates" => STATES,
        _ => return None,
    };
    let name = parts.next().map(str::to_owned);
    let status = parts.next() == Some("status");
    Some((plural, name, status))
}

fn kind_of(plural: &str) -> (&'static str, &'static str) {
    match plural {
        NODES => ("v1", "Node"),
        POLICIES => ("vfplane.io/v1alpha1", "VfPolicy"),
        _ => ("vfplane.io/v1alpha1", "NodeState"),
    }
}

fn answer(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed_unsync())
        .unwrap()
}

fn failure(status: StatusCode, message: &str) -> Response<ResponseBody> {
    answer(
        status,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": "InternalError", "code": status.as_u16()}),
    )
}

fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl State {
    fn bump(&mut self) -> u64 {
        self.resource_version += 1;
        self.resource_version
    }

    /// Records an event and sends it to the live watchers of its kind.
    fn emit(&mut self, kind: &'static str, plural: &'static str, object: Value) {
        let resource_version = object["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(self.resource_version);
        let line = watch_line(kind, &object);
        self.events.entry(plural).or_default().push(Event {
            resource_version,
            kind,
            object,
        });
        if let Some(watchers) = self.watchers.get_mut(plural) {
            let name = self.events[plural]
                .last()
                .map(|e| e.object["metadata"]["name"].clone());
            watchers.retain(|w| {
                let wanted = w
                    .only
                    .as_deref()
                    .is_none_or(|n| name.as_ref().is_some_and(|v| v == n));
                !wanted || w.sender.send(line.clone()).is_ok()
            });
        }
    }

    /// Stores `object` (a new resourceVersion) and tells the watchers.
    fn store(&mut self, plural: &'static str, name: &str, mut object: Value) -> Value {
        let rv = self.bump();
        let (api_version, kind) = kind_of(plural);
        object["apiVersion"] = json!(api_version);
        object["kind"] = json!(kind);
        object["metadata"]["name"] = json!(name);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        // Like the API server: kinds with a spec count its changes in
        // metadata.generation (Nodes have none).
        if plural != NODES {
            let old = self.get(plural, name);
            let asked = object["metadata"]["generation"].as_i64();
            let generation = match &old {
                None => 1,
                Some(old) => {
                    let was = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    if old["spec"] == object["spec"] {
                        asked.unwrap_or(was).max(was)
                    } else {
                        was + 1
                    }
                }
            };
            object["metadata"]["generation"] = json!(generation);
        }
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{plural}-{name}"));
        }
        let existed = self
            .objects
            .entry(plural)
            .or_default()
            .insert(name.to_owned(), object.clone())
            .is_some();
        self.emit(if existed { "MODIFIED" } else { "ADDED" }, plural, object.clone());
        object
    }

    fn remove(&mut self, plural: &'static str, name: &str) {
        if let Some(mut object) = self.objects.entry(plural).or_default().remove(name) {
            let rv = self.bump();
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            self.emit("DELETED", plural, object);
        }
    }

    /// Stores the object after a change; deletes it instead when it is
    /// being deleted and no finalizer is left.
    fn store_or_finish(&mut self, plural: &'static str, name: &str, object: Value) -> Value {
        let deleting = !object["metadata"]["deletionTimestamp"].is_null();
        let finalizers_left = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            self.remove(plural, name);
            object
        } else {
            self.store(plural, name, object)
        }
    }

    fn get(&self, plural: &str, name: &str) -> Option<Value> {
        self.objects.get(plural)?.get(name).cloned()
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

impl FakeApi {
    /// A kube client whose every request this stand-in answers.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Adds or replaces an object as a user or another component would.
    pub fn put(&self, plural: &'static str, object: Value) {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.state.lock().unwrap().store(plural, &name, object);
    }

    /// Changes an object in place, as `kubectl edit` would.
    pub fn edit(&self, plural: &'static str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().unwrap();
        let mut object = state.get(plural, name).expect("the object to edit");
        change(&mut object);
        state.store(plural, name, object);
    }

    /// Deletes an object as `kubectl delete` would: at once without
    /// finalizers, otherwise by setting its deletionTimestamp.
    pub fn delete(&self, plural: &'static str, name: &str) {
        let mut state = self.state.lock().unwrap();
        let mut object = state.get(plural, name).expect("the object to delete");
        object["metadata"]["deletionTimestamp"] = json!("2026-11-23T12:00:00Z");
        // The API server counts the deletion marking as a new generation.
        if let Some(generation) = object["metadata"]["generation"].as_i64() {
            object["metadata"]["generation"] = json!(generation + 1);
        }
        state.store_or_finish(plural, name, object);
    }

    /// The object, if it exists.
    pub fn get(&self, plural: &'static str, name: &str) -> Option<Value> {
        self.state.lock().unwrap().get(plural, name)
    }

    /// Answers the next request of `method` whose path is `path` with
    /// `status` instead of serving it.
    pub fn fail_next(&self, method: Method, path: &str, status: StatusCode) {
        self.state.lock().unwrap().failures.push_back(Failure {
            method,
            path: path.to_owned(),
            status,
        });
    }

    /// Every request answered so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }

    /// Every request answered so far, one a line, for failure messages.
    pub fn describe_log(&self) -> String {
        self.log()
            .iter()
            .map(|l| format!("{} {}?{} -> {}", l.method, l.path, l.query, l.status))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The writes (anything but GET) answered so far, to `path`.
    pub fn writes_to(&self, path: &str) -> Vec<Logged> {
        self.log()
            .into_iter()
            .filter(|l| l.method != Method::GET && l.path == path)
            .collect()
    }

    async fn handle(&self, request: Request<Body>) -> Response<ResponseBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let mut state = self.state.lock().unwrap();
        let response = state.serve(&method, &path, &query, &content_type, &bytes);
        state.log.push(Logged {
            method,
            path,
            query,
            at: Instant::now(),
            status: response.status(),
        });
        response
    }
}

impl State {
    fn serve(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Response<ResponseBody> {
        if let Some(at) = self
            .failures
            .iter()
            .position(|f| f.method == method && f.path == path)
        {
            let failure_status = self.failures.remove(at).map(|f| f.status);
            return failure(
                failure_status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "injected failure",
            );
        }
        let Some((plural, name, status)) = plural_of(path) else {
            return failure(StatusCode::NOT_FOUND, &format!("no route for {path}"));
        };
        match (method, name) {
            (&Method::GET, None) if query_value(query, "watch") == Some("true") => self.watch(plural, query),
            (&Method::GET, None) => self.list(plural, query),
            (&Method::GET, Some(name)) => match self.get(plural, &name) {
                Some(object) => answer(StatusCode::OK, &object),
                None => failure(StatusCode::NOT_FOUND, &format!("{plural}/{name} not found")),
            },
            (&Method::PATCH, Some(name)) => {
                let Ok(patch) = serde_json::from_slice::<Value>(body) else {
                    return failure(StatusCode::BAD_REQUEST, "patch body is not JSON");
                };
                self.patch(plural, &name, status, content_type, patch)
            }
            _ => failure(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} {path} is not served"),
            ),
        }
    }

    fn list(&mut self, plural: &'static str, query: &str) -> Response<ResponseBody> {
        let only = name_selected(query);
        let items: Vec<Value> = self
            .objects
            .get(plural)
            .map(|o| {
                o.values()
                    .filter(|v| only.as_deref().is_none_or(|n| v["metadata"]["name"] == n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let (api_version, kind) = kind_of(plural);
        answer(
            StatusCode::OK,
            &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                    "metadata": {"resourceVersion": self.resource_version.to_string()},
                    "items": items}),
        )
    }

    fn watch(&mut self, plural: &'static str, query: &str) -> Response<ResponseBody> {
        let since: u64 = query_value(query, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let only = name_selected(query);
        let (sender, mut receiver) = mpsc::unbounded_channel::<Bytes>();
        for event in self.events.get(plural).into_iter().flatten() {
            if event.resource_version > since
                && only
                    .as_deref()
                    .is_none_or(|n| event.object["metadata"]["name"] == n)
            {
                sender.send(watch_line(event.kind, &event.object)).unwrap();
            }
        }
        self.watchers
            .entry(plural)
            .or_default()
            .push(Watcher { sender, only });
        let frames = futures::stream::poll_fn(move |cx| {
            receiver
                .poll_recv(cx)
                .map(|line| line.map(|l| Ok::<_, Infallible>(http_body::Frame::data(l))))
        });
        Response::builder()
            .status(StatusCode::OK)
            .body(StreamBody::new(frames).boxed_unsync())
            .unwrap()
    }

    fn patch(
        &mut self,
        plural: &'static str,
        name: &str,
        status: bool,
        content_type: &str,
        patch: Value,
    ) -> Response<ResponseBody> {
        let current = self.get(plural, name);
        let object = match content_type {
            // Server-side apply by the one manager that owns the field:
            // the applied `spec` or `status` replaces the old one.
            "application/apply-patch+yaml" => {
                let mut object = current.unwrap_or_else(|| json!({"metadata": {}}));
                if status {
                    object["status"] = patch["status"].clone();
                } else {
                    object["spec"] = patch["spec"].clone();
                    if let Some(owners) = patch["metadata"].get("ownerReferences") {
                        object["metadata"]["ownerReferences"] = owners.clone();
                    }
                }
                object
            }
            "application/json-patch+json" => {
                let Some(mut object) = current else {
                    return failure(StatusCode::NOT_FOUND, &format!("{plural}/{name} not found"));
                };
                // Like the API server, a `test` for null passes on a field
                // the object does not have.
                let ops: Vec<Value> = patch
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|op| {
                        let missing = op["path"]
                            .as_str()
                            .is_some_and(|path| object.pointer(path).is_none());
                        !(op["op"] == "test" && op["value"].is_null() && missing)
                    })
                    .cloned()
                    .collect();
                let Ok(ops) = serde_json::from_value::<json_patch::Patch>(Value::Array(ops)) else {
                    return failure(StatusCode::BAD_REQUEST, "not a JSON patch");
                };
                if json_patch::patch(&mut object, &ops).is_err() {
                    return failure(StatusCode::UNPROCESSABLE_ENTITY, "JSON patch test failed");
                }
                object
            }
            other => {
                return failure(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    &format!("content type {other} is not served"),
                );
            }
        };
        let stored = self.store_or_finish(plural, name, object);
        answer(StatusCode::OK, &stored)
    }
}
