//! `vfplane-agent run --kube`: the node's `NodeState` object as the desired
//! state source, and its status subresource as where the status goes.
//!
//! - The object is cluster-scoped and named after the node. The agent only
//!   reads it: a `watcher` on all NodeStates with the field selector
//!   `metadata.name=<node>` (RBAC: get/list/watch `nodestates`), and writes
//!   its status with server-side apply (get/patch `nodestates/status`).
//! - The controller creates it. Until it exists, and after it is deleted,
//!   the agent waits and leaves the host as it is: removing VFs is asked for
//!   with an empty spec, never inferred from a missing object (a deleted
//!   object, an RBAC slip or a cache glitch must not take VFs from pods).
//! - Both API tasks run on a small tokio runtime beside the synchronous host
//!   loop of [`crate::run`]. The loop only reads the last spec seen (a
//!   mutex) and hands statuses over through a `watch` channel that keeps the
//!   latest: a slow or absent API server never delays host repair, and the
//!   last spec seen stays in force while the API server is away.
//! - A status is written only when it differs from the last one written to
//!   the same object; failed writes are retried with a bounded backoff.
//! - Each new status also goes to the Events task ([`crate::events`]),
//!   which posts what changed (RBAC: create/patch `events.k8s.io` events).

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, watcher as watch_objects};
use kube::{Client, Resource as _, ResourceExt as _};
use tokio::sync::watch;
use vfplane_host::error_chain;
use vfplane_proto::node_state::{NodeState, NodeStateSpec, NodeStateStatus};

use crate::source::{Desired, DesiredStateSource, Trigger};

/// The field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "vfplane-agent";

/// Why the kube source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// Neither an in-cluster service account nor a kubeconfig is usable.
    #[error(
        "no Kubernetes API access: neither an in-cluster service account \
         (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, and the token under \
         /var/run/secrets/kubernetes.io/serviceaccount) nor a kubeconfig (KUBECONFIG or \
         ~/.kube/config) could be used"
    )]
    NoConfig(#[source] kube::config::InferConfigError),
    /// A configuration was found but the client could not be built from it.
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// Delays between retries of a failed status write: `initial`, doubled
/// after every failure up to `max`, back to `initial` after a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

/// What the watch knows about the node's NodeState.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// No list has come back yet (API server not reached, or no rights).
    Unknown,
    /// The list came back without it: the controller has not made it yet.
    Missing,
    /// It was deleted (seen as a delete event, or missing from a relist).
    Deleted,
    /// It exists.
    Present {
        /// Its spec.
        spec: NodeStateSpec,
        /// `metadata.generation`.
        generation: Option<i64>,
        /// `metadata.uid`: a recreated object is a new object.
        uid: Option<String>,
    },
}

impl Watched {
    fn of(object: NodeState) -> Self {
        Self::Present {
            generation: object.metadata.generation,
            uid: object.metadata.uid,
            spec: object.spec,
        }
    }
}

/// A status to write, for the object it was computed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    /// `metadata.uid` of the object whose spec was applied.
    pub uid: Option<String>,
    /// The status.
    pub status: NodeStateStatus,
}

/// The node's NodeState as a [`DesiredStateSource`].
#[derive(Debug)]
pub struct KubeSource {
    node: String,
    api: Api<NodeState>,
    handle: tokio::runtime::Handle,
    watched: Arc<Mutex<Watched>>,
    status_tx: watch::Sender<Option<StatusUpdate>>,
    applied_uid: Option<String>,
}

impl KubeSource {
    /// Connects with `kube::Client::try_default` (the in-cluster service
    /// account, or `KUBECONFIG` / `~/.kube/config`), its API tasks on
    /// `runtime` (a multi-thread runtime; called from outside it).
    ///
    /// # Errors
    /// No usable configuration (naming both).
    pub fn connect(
        node: impl Into<String>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, KubeSourceError> {
        let client = runtime
            .block_on(Client::try_default())
            .map_err(|error| match error {
                kube::Error::InferConfig(error) => KubeSourceError::NoConfig(error),
                other => KubeSourceError::Client(other),
            })?;
        Ok(Self::new(runtime, client, node, Backoff::default()))
    }

    /// A source for the NodeState named `node`, its API tasks spawned on
    /// `handle`. The status writer starts now, the watch with
    /// [`DesiredStateSource::watch`].
    pub fn new(
        handle: tokio::runtime::Handle,
        client: Client,
        node: impl Into<String>,
        backoff: Backoff,
    ) -> Self {
        let node = node.into();
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(node.clone()),
            },
        );
        let api = Api::<NodeState>::all(client);
        let (status_tx, status_rx) = watch::channel(None);
        handle.spawn(post_events(recorder, node.clone(), status_rx.clone()));
        handle.spawn(write_statuses(api.clone(), node.clone(), status_rx, backoff));
        Self {
            node,
            api,
            handle,
            watched: Arc::new(Mutex::new(Watched::Unknown)),
            status_tx,
            applied_uid: None,
        }
    }

    /// What the watch knows now.
    pub fn watched(&self) -> Watched {
        self.watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl DesiredStateSource for KubeSource {
    fn watch(&mut self, tx: Sender<Trigger>) {
        self.handle.spawn(watch_node_state(
            self.api.clone(),
            self.node.clone(),
            Arc::clone(&self.watched),
            move || {
                // The loop may be gone only when the process ends.
                let _ = tx.send(Trigger::Desired);
            },
        ));
    }

    fn desired(&mut self) -> Desired {
        match self.watched() {
            Watched::Present {
                spec,
                generation,
                uid,
            } => {
                self.applied_uid = uid;
                Desired::Apply {
                    spec,
                    generation,
                    warning: None,
                }
            }
            Watched::Unknown | Watched::Missing | Watched::Deleted => Desired::Wait,
        }
    }

    fn report_status(&mut self, status: &NodeStateStatus) {
        self.status_tx.send_replace(Some(StatusUpdate {
            uid: self.applied_uid.clone(),
            status: status.clone(),
        }));
    }
}

/// Watches the NodeState named `node` and keeps `watched` current, calling
/// `changed` after every change. Runs until the task is dropped; API errors
/// are logged and retried with the watcher's default backoff, and the last
/// state seen stays in force meanwhile.
pub async fn watch_node_state(
    api: Api<NodeState>,
    node: String,
    watched: Arc<Mutex<Watched>>,
    changed: impl Fn() + Send + 'static,
) {
    let config = watcher::Config::default()
        .fields(&format!("metadata.name={node}"))
        .timeout(watch_timeout_secs(&node));
    let stream = watch_objects(api, config).default_backoff();
    futures::pin_mut!(stream);
    // Objects of a (re)list, committed at its end.
    let mut listed: Option<NodeState> = None;
    while let Some(event) = stream.next().await {
        let new = match event {
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), node = %node, "watching NodeState failed; retrying, the last spec seen stays in force");
                continue;
            }
            Ok(Event::Init) => {
                listed = None;
                continue;
            }
            Ok(Event::InitApply(object)) => {
                if object.name_any() == node {
                    listed = Some(object);
                }
                continue;
            }
            Ok(Event::InitDone) => match listed.take() {
                Some(object) => Watched::of(object),
                None => Watched::Missing,
            },
            Ok(Event::Apply(object)) if object.name_any() == node => Watched::of(object),
            Ok(Event::Delete(object)) if object.name_any() == node => Watched::Deleted,
            Ok(Event::Apply(_) | Event::Delete(_)) => continue,
        };
        if update(&watched, new, &node) {
            changed();
        }
    }
}

/// The server-side timeout of the node's watch, between 150 and 290
/// seconds, fixed per node by its name. Agents started together (a fleet
/// installed at once, a DaemonSet rolled) would otherwise all reconnect
/// in the same second every 290 s (kube-runtime's default), and the API
/// server turned a share of those away (`cargo xtask bench scale`: 4,768
/// watches ending within one 100 s phase at 5,000 nodes, 185 rejected),
/// each refused agent then listing again. client-go spreads its watches
/// the same way, with a random timeout.
pub fn watch_timeout_secs(node: &str) -> u32 {
    // FNV-1a: stable across builds and processes, unlike std's hasher.
    let hash = node.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    150 + hash % 141
}

/// Stores `new`, logging what it means; true when it changed anything.
fn update(watched: &Mutex<Watched>, new: Watched, node: &str) -> bool {
    let mut current = watched.lock().unwrap_or_else(PoisonError::into_inner);
    // A relist that misses an object we had means it was deleted meanwhile.
    let new = match (&*current, new) {
        (Watched::Present { .. } | Watched::Deleted, Watched::Missing) => Watched::Deleted,
        (_, new) => new,
    };
    if *current == new {
        return false;
    }
    match (&*current, &new) {
        (_, Watched::Missing) => tracing::info!(
            node,
            "waiting for NodeState {node}: the controller creates it; the host is left as it is until then"
        ),
        (_, Watched::Deleted) => tracing::info!(
            node,
            "NodeState {node} was deleted; the host is left as it is (VFs are removed only by an empty spec)"
        ),
        (Watched::Present { .. }, Watched::Present { generation, .. }) => {
            tracing::info!(node, ?generation, "NodeState {node} changed");
        }
        (_, Watched::Present { generation, .. }) => {
            tracing::info!(node, ?generation, "NodeState {node} found");
        }
        (_, Watched::Unknown) => {}
    }
    *current = new;
    true
}

/// Writes `status` to the NodeState's status subresource with server-side
/// apply, as [`FIELD_MANAGER`], forcing ownership of the status fields.
///
/// # Errors
/// The API server's refusal, or no answer.
pub async fn patch_status(
    api: &Api<NodeState>,
    node: &str,
    status: &NodeStateStatus,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({
        "apiVersion": NodeState::api_version(&()),
        "kind": NodeState::kind(&()),
        "status": status,
    });
    api.patch_status(
        node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Posts the Events each new status calls for ([`crate::events`]) until
/// the source is dropped. A refused post is logged, not retried: the
/// status says the same.
pub async fn post_events(
    recorder: Recorder,
    node: String,
    mut statuses: watch::Receiver<Option<StatusUpdate>>,
) {
    let mut previous: Option<NodeStateStatus> = None;
    while statuses.changed().await.is_ok() {
        let Some(update) = statuses.borrow_and_update().clone() else {
            continue;
        };
        for event in crate::events::between(previous.as_ref(), &update.status) {
            let posted = KubeEvent {
                type_: if event.is_warning() {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: event.reason().to_owned(),
                note: Some(event.note()),
                action: event.action().to_owned(),
                secondary: None,
            };
            let regarding = event.regarding(&node, update.uid.as_deref());
            match recorder.publish(&posted, &regarding).await {
                Ok(()) => tracing::info!(reason = event.reason(), note = %event.note(), "event posted"),
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), reason = event.reason(), "cannot post an event");
                }
            }
        }
        previous = Some(update.status);
    }
}

/// Writes every new status that arrives on `statuses` (only the latest
/// counts), skipping one equal to the last written for the same object.
/// A failed write is logged and retried after `backoff`; a 404 (the object
/// is gone) drops the status until the next one. Ends when the sender is
/// dropped.
pub async fn write_statuses(
    api: Api<NodeState>,
    node: String,
    mut statuses: watch::Receiver<Option<StatusUpdate>>,
    backoff: Backoff,
) {
    let mut written: Option<StatusUpdate> = None;
    let mut delay = backoff.initial;
    loop {
        let pending = statuses.borrow_and_update().clone();
        let update = match pending {
            Some(update) if written.as_ref() != Some(&update) => update,
            _ => {
                if statuses.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        match patch_status(&api, &node, &update.status).await {
            Ok(()) => {
                tracing::debug!(node = %node, "NodeState status written");
                written = Some(update);
                delay = backoff.initial;
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                tracing::info!(node = %node, "NodeState is gone; its status is not written");
                delay = backoff.initial;
                if statuses.changed().await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(error = %error_chain(&error), node = %node, retry_in = ?delay, "cannot write the NodeState status; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}

#[cfg(test)]
mod tests;
