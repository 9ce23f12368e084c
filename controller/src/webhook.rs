//! The admission webhook: checks `VfPolicy` objects beyond what the schema
//! and CEL can say, and pods asking for `vfplane.io/<pool>` against their
//! pool's container profile.
//!
//! | path | objects | operations | what |
//! |---|---|---|---|
//! | `/validate/vfpolicies` | VfPolicy | CREATE, UPDATE | overlapping or out-of-range VF ranges, PFs named twice, malformed `pfNames` / `pciAddresses`, the resource name, unreadable profile quantities, `numVfs` above a matched PF's `totalVfs` |
//! | `/validate/pods` | Pod | CREATE, UPDATE of `pods/resize` | containers of a pool whose profile wants limits must set them, at least the profile's values |
//! | `/mutate/pods` | Pod | CREATE, UPDATE of `pods/resize` | in [`PodMode::Mutate`], adds the missing limits (and equal requests) to a new pod instead of refusing it; in [`PodMode::Validate`], the same checks as `/validate/pods`. In both modes, marks containers whose profile the runtime applies as needing vfplane's NRI plugin (see [`pod`]). A resize is never mended: one that takes a limit below the profile is refused |
//!
//! Every other operation (DELETE, CONNECT, other pod subresources, plain
//! pod updates, which cannot change resources) is allowed.
//! Every problem found is reported in one message, each naming its field.
//!
//! `/validate/pods` is strict in both modes: registered after the mutating
//! webhook (as the API server runs them), it sees the completed pod and
//! passes it, and it still catches a pod the mutating webhook never saw.
//!
//! The server speaks HTTPS only (rustls with the ring provider) and re-reads
//! its certificate and key every [`CERT_RELOAD_PERIOD`], so cert-manager can
//! rotate them under a running webhook.

pub mod claims;
mod pod;
mod policy;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use vfplane_proto::vf_policy::{ContainerProfile, VfPolicy, VfPolicySpec};

pub use claims::{ClaimVfs, PodClaims};
pub use pod::{DEFAULT_HUGEPAGES_RESOURCE, PodChanges, PodVerdict, admit_pod};
pub use policy::{policy_problems, validate_qualified_name};

/// How often the certificate files are re-read by [`serve`].
pub const CERT_RELOAD_PERIOD: Duration = Duration::from_secs(10);
/// Largest request body accepted (an AdmissionReview carries the object and
/// its old version; the API server caps objects near 1.5 MiB).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Time a client gets to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client gets to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time open connections get to finish after shutdown is asked.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the webhook needs to know about the cluster; the controller implements it over its caches.
pub trait ClusterView: Send + Sync {
    /// Every PF the policy spec would select right now: nodes matching nodeSelector, PFs matching nicSelector (from NodeState status).
    fn selected_pfs(&self, spec: &VfPolicySpec) -> Vec<SelectedPf>;
    /// The container profile of the pool `vfplane.io/<pool>` (from the policy naming that resourceName; None when none or no profile).
    fn container_profile(&self, pool: &str) -> Option<ContainerProfile>;
    /// The pools some policy serves through DRA (`resourceApi: dra`).
    fn dra_pools(&self) -> Vec<String>;
}

/// A PF a policy selects, as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedPf {
    /// The node.
    pub node: String,
    /// The PF's PCI address.
    pub pci_address: String,
    /// The PF's interface name, when it has one.
    pub name: Option<String>,
    /// `sriov_totalvfs`.
    pub total_vfs: u16,
}

/// What pod admission does about missing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodMode {
    /// Refuse the pod, saying what to add.
    #[default]
    Validate,
    /// `/mutate/pods` adds the missing limits from the profile.
    Mutate,
}

/// The serving certificate (chain) and key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (`tls.crt`).
    pub cert: PathBuf,
    /// Private key, PKCS#8, PKCS#1 or SEC1 (`tls.key`).
    pub key: PathBuf,
}

/// Why the webhook could not serve, or could not read a request.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The listening socket.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file could not be read.
    #[error("cannot read {}", path.display())]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file is not the PEM expected.
    #[error("{}: {message}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key is unusable or does not belong to the certificate.
    #[error("the key {} does not fit the certificate {}", key.display(), cert.display())]
    KeyPair {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// The TLS configuration.
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
    /// A request body that is not an AdmissionReview request (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
}

/// The three webhook endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/validate/vfpolicies`.
    ValidatePolicies,
    /// `/validate/pods`.
    ValidatePods,
    /// `/mutate/pods`.
    MutatePods,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Self; 3] = [Self::ValidatePolicies, Self::ValidatePods, Self::MutatePods];

    /// The URL path it is served on.
    pub fn path(self) -> &'static str {
        match self {
            Self::ValidatePolicies => "/validate/vfpolicies",
            Self::ValidatePods => "/validate/pods",
            Self::MutatePods => "/mutate/pods",
        }
    }
}

/// Answers one AdmissionReview body: the decision wrapped in a review that
/// echoes the request's uid and apiVersion. Never panics on any input.
///
/// # Errors
/// [`WebhookError::BadRequest`] when the body is not JSON, not an
/// AdmissionReview or carries no request.
pub fn review(
    endpoint: Endpoint,
    body: &[u8],
    view: &dyn ClusterView,
    pod_mode: PodMode,
    claims: &PodClaims,
) -> Result<AdmissionReview<DynamicObject>, WebhookError> {
    let bad = |m: String| WebhookError::BadRequest(m);
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| bad(format!("the request body is not an AdmissionReview: {e}")))?;
    if review.types.kind != "AdmissionReview" || !review.types.api_version.starts_with("admission.k8s.io/") {
        return Err(bad(format!(
            "the request body is a {} {:?}, not an admission.k8s.io AdmissionReview",
            review.types.api_version, review.types.kind
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| bad("the AdmissionReview has no request".to_owned()))?;
    let response = decide(endpoint, &request, view, pod_mode, claims);
    let name = request
        .object
        .as_ref()
        .or(request.old_object.as_ref())
        .and_then(|o| {
            o.metadata
                .name
                .clone()
                .or_else(|| o.metadata.generate_name.clone())
        })
        .unwrap_or_else(|| request.name.clone());
    tracing::info!(
        uid = %request.uid,
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %name,
        operation = ?request.operation,
        endpoint = endpoint.path(),
        allowed = response.allowed,
        patched = response.patch.is_some(),
        reason = %response.result.message,
        "admission decision"
    );
    Ok(response.into_review())
}

fn decide(
    endpoint: Endpoint,
    request: &AdmissionRequest<DynamicObject>,
    view: &dyn ClusterView,
    pod_mode: PodMode,
    claims: &PodClaims,
) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    match endpoint {
        Endpoint::ValidatePolicies => decide_policy(request, view, response),
        Endpoint::ValidatePods => decide_pod(request, view, PodChanges::default(), claims, response),
        Endpoint::MutatePods => {
            let changes = PodChanges {
                limits: pod_mode == PodMode::Mutate,
                nri_annotation: true,
            };
            decide_pod(request, view, changes, claims, response)
        }
    }
}

/// The request's object as `T`, or the reason it is not one.
fn object_as<T: serde::de::DeserializeOwned>(
    request: &AdmissionRequest<DynamicObject>,
    expected_kind: &str,
) -> Result<T, String> {
    if request.kind.kind != expected_kind {
        return Err(format!(
            "this webhook endpoint admits {expected_kind} objects, not {} ({}/{}); check the webhook configuration",
            request.kind.kind, request.kind.group, request.kind.version
        ));
    }
    let object = request
        .object
        .as_ref()
        .ok_or_else(|| format!("the {expected_kind} request has no object"))?;
    serde_json::to_value(object)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("the {expected_kind} does not fit its schema: {e}"))
}

fn problems_message(subject: &str, problems: &[String]) -> String {
    match problems {
        [one] => format!("{subject}: {one}"),
        many => format!("{subject}: {} problems: {}", many.len(), many.join("; ")),
    }
}

fn decide_policy(
    request: &AdmissionRequest<DynamicObject>,
    view: &dyn ClusterView,
    response: AdmissionResponse,
) -> AdmissionResponse {
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let policy: VfPolicy = match object_as(request, "VfPolicy") {
        Ok(policy) => policy,
        Err(reason) => return response.deny(reason),
    };
    let problems = policy_problems(&policy.spec, view);
    if problems.is_empty() {
        response
    } else {
        let name = policy.metadata.name.as_deref().unwrap_or(&request.name);
        response.deny(problems_message(
            &format!("VfPolicy {name:?} is refused"),
            &problems,
        ))
    }
}

fn decide_pod(
    request: &AdmissionRequest<DynamicObject>,
    view: &dyn ClusterView,
    changes: PodChanges,
    claims: &PodClaims,
    mut response: AdmissionResponse,
) -> AdmissionResponse {
    // An in-place resize (`pods/resize`, UPDATE) may lower a limit below the
    // pool's profile after the pod was admitted: it is checked like a new
    // pod, and refused rather than mended.
    let resize = request.operation == Operation::Update && request.sub_resource.as_deref() == Some("resize");
    if !resize && (request.operation != Operation::Create || request.sub_resource.is_some()) {
        return response;
    }
    let pod: Pod = match object_as(request, "Pod") {
        Ok(pod) => pod,
        Err(reason) => return response.deny(reason),
    };
    // A resize is never mended, and cannot change annotations.
    let changes = if resize { PodChanges::default() } else { changes };
    let verdict = admit_pod(&pod, view, changes, claims);
    if !verdict.warnings.is_empty() {
        response.warnings = Some(verdict.warnings);
    }
    if !verdict.problems.is_empty() {
        let what = if resize {
            "pod resize refused"
        } else {
            "pod refused"
        };
        return response.deny(problems_message(what, &verdict.problems));
    }
    if verdict.patch.is_empty() {
        return response;
    }
    // `with_patch` takes kube's `json_patch::Patch`; it is built from its
    // JSON form so this crate needs no direct json-patch dependency.
    let patch = match serde_json::from_value(serde_json::Value::Array(verdict.patch)) {
        Ok(patch) => patch,
        Err(e) => return response.deny(format!("internal error building the pod patch: {e}")),
    };
    let fallback = response.clone();
    response
        .with_patch(patch)
        .unwrap_or_else(|e| fallback.deny(format!("internal error serializing the pod patch: {e}")))
}

#[derive(Clone)]
struct AppState {
    view: Arc<dyn ClusterView>,
    pod_mode: PodMode,
    claim_reader: Option<kube::Client>,
}

/// The webhook's routes (without TLS): the three endpoints, POST only;
/// 404 elsewhere. With `claim_reader`, the pod endpoints read the
/// ResourceClaims (or templates) a pod names, to check containers that get
/// vfplane's VFs through DRA; without, only `vfplane.io/<pool>` resources
/// are seen.
pub fn router(view: Arc<dyn ClusterView>, pod_mode: PodMode, claim_reader: Option<kube::Client>) -> Router {
    let mut router = Router::new();
    for endpoint in Endpoint::ALL {
        router = router.route(
            endpoint.path(),
            post(move |State(state): State<AppState>, body: Bytes| async move {
                let claims = pod_claims(&state, endpoint, &body).await;
                handle(&state, endpoint, &body, &claims)
            }),
        );
    }
    router
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: the webhook serves /validate/vfpolicies, /validate/pods and /mutate/pods\n",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState {
            view,
            pod_mode,
            claim_reader,
        })
}

/// The claims of the pod in a pod endpoint's request (none for a body
/// that is not one, which [`review`] then refuses).
async fn pod_claims(state: &AppState, endpoint: Endpoint, body: &[u8]) -> PodClaims {
    let (Some(client), Endpoint::ValidatePods | Endpoint::MutatePods) = (&state.claim_reader, endpoint)
    else {
        return PodClaims::default();
    };
    let Ok(review) = serde_json::from_slice::<serde_json::Value>(body) else {
        return PodClaims::default();
    };
    let request = &review["request"];
    match (request["namespace"].as_str(), request.get("object")) {
        (Some(namespace), Some(pod)) if pod["spec"]["resourceClaims"].is_array() => {
            claims::resolve(client, namespace, pod).await
        }
        _ => PodClaims::default(),
    }
}

fn handle(state: &AppState, endpoint: Endpoint, body: &[u8], claims: &PodClaims) -> Response {
    match review(endpoint, body, state.view.as_ref(), state.pod_mode, claims) {
        Ok(review) => axum::Json(review).into_response(),
        Err(error) => {
            tracing::warn!(endpoint = endpoint.path(), %error, "bad admission request");
            (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
        }
    }
}

/// Serves the webhook over HTTPS on `addr` until `shutdown` completes,
/// re-reading the certificate every [`CERT_RELOAD_PERIOD`].
///
/// # Errors
/// The address cannot be bound, or the certificate and key do not load.
pub async fn serve(
    addr: SocketAddr,
    tls: TlsFiles,
    view: Arc<dyn ClusterView>,
    pod_mode: PodMode,
    claim_reader: Option<kube::Client>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| WebhookError::Bind { addr, source })?;
    serve_on(
        listener,
        tls,
        view,
        pod_mode,
        claim_reader,
        CERT_RELOAD_PERIOD,
        shutdown,
    )
    .await
}

/// [`serve`] on a listener already bound (tests bind `127.0.0.1:0`), with
/// the certificate re-read every `reload_period`.
///
/// # Errors
/// The certificate and key do not load at start.
pub async fn serve_on(
    listener: TcpListener,
    tls: TlsFiles,
    view: Arc<dyn ClusterView>,
    pod_mode: PodMode,
    claim_reader: Option<kube::Client>,
    reload_period: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = Arc::new(tls::ReloadingCert::load(tls.clone(), provider.clone())?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(WebhookError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let app = router(view, pod_mode, claim_reader);
    let (stop_tx, stop_rx) = watch::channel(false);

    let mut reload_stop = stop_rx.clone();
    let reloader = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(reload_period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = reload_stop.changed() => return,
            }
            let resolver = resolver.clone();
            match tokio::task::spawn_blocking(move || resolver.refresh()).await {
                Ok(Ok(true)) => tracing::info!(cert = %tls.cert.display(), "webhook certificate reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(error = %vfplane_proto::error_chain(&error), "webhook certificate not reloaded; keeping the previous one")
                }
                Err(error) => tracing::warn!(%error, "webhook certificate reload task failed"),
            }
        }
    });

    tracing::info!(addr = ?listener.local_addr().ok(), "admission webhook serving");
    let mut shutdown = std::pin::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(tcp, peer, acceptor.clone(), app.clone(), stop_rx.clone()));
                }
                Err(error) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(%error, "accepting a webhook connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::info!(open = connections.len(), "admission webhook stopping");
    let _ = stop_tx.send(true);
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    let _ = reloader.await;
    Ok(())
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "webhook TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "webhook TLS handshake timed out");
            return;
        }
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "webhook connection ended with an error");
    }
}
