//! The kube-runtime wiring: two controllers over one shared watch per kind.
//!
//! - **nodes**: one reconcile per Node. It merges the policies selecting the
//!   node ([`crate::plan::plan_node`]) and server-side-applies the result as
//!   the spec of the NodeState named after the node (field manager
//!   [`FIELD_MANAGER`], owner reference to the Node so the NodeState goes
//!   with it). Triggered by the Node, by its NodeState (the agent's status
//!   tells which PFs exist) and by a VfPolicy whose generation moved (a
//!   spec change or its deletion; not its status).
//! - **policies**: one reconcile per VfPolicy, inside a finalizer. Writes the
//!   policy's status (matched nodes, requested and ready VFs, conflicts);
//!   on deletion, keeps the finalizer until no agent reports a VF of the
//!   policy's pool that no live policy plans. Triggered by the policy, by
//!   any NodeState (agent status) and by a Node that is new, relabelled or
//!   deleted ([`node_selection_changes`]; not its status).
//!
//! Node, VfPolicy and NodeState are each watched once per process
//! ([`ClusterWatches`], one [`SharedWatch`] per kind): one watch, one
//! reflector store, read by both controllers and by the webhook's
//! [`StoreView`]. The watches run on every replica (the webhook needs the
//! stores on followers); the controllers subscribe when they start, on the
//! leader, and get a listing of what the stores hold, then every event.
//! Each event is in its store before any subscriber gets it, so a
//! reconcile never sees a store older than the event that caused it, and
//! no subscriber can hold up a watch (a slow one is given a listing again).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{DeleteOptions, Preconditions as K8sPreconditions};
use kube::api::PostParams;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, instrument, warn};
use vfplane_proto::node_state::NodeState;
use vfplane_proto::vf_policy::VfPolicy;

use crate::metrics::Metrics;
use crate::plan::{self, NodePlan};
use crate::rollout::{self, Admission, HoldingPod, Rollouts};
use crate::shared_watch::SharedWatch;
use crate::{Error, Result};

/// The field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "vfplane-controller";
/// The finalizer on every VfPolicy.
pub const POLICY_FINALIZER: &str = "vfplane.io/release-vfs";
/// How often a deleted policy's release is checked again.
pub const RELEASE_RECHECK: Duration = Duration::from_secs(5);
/// The least time between two computations of one policy's status while
/// its spec stays the same. Every NodeState change asks for one, and each
/// plans every node the policy selects: during a rollout over thousands of
/// nodes, back to back, they took the controller's CPU (`cargo xtask bench
/// scale`). A spec change is computed at once.
pub const POLICY_STATUS_EVERY: Duration = Duration::from_secs(1);
/// Node reconciles in flight at once: a policy change asks for every
/// node's, and each is a request to the API server.
pub const NODE_RECONCILES_AT_ONCE: u16 = 32;

/// When each policy's status was last computed, and for which generation
/// (see [`POLICY_STATUS_EVERY`]).
/// Clones share the record.
#[derive(Debug, Default, Clone)]
pub struct StatusThrottle {
    computed: Arc<std::sync::Mutex<HashMap<String, Computed>>>,
}

/// The generation a status was computed for, and when.
type Computed = (Option<i64>, tokio::time::Instant);

impl StatusThrottle {
    /// How long to wait before computing the status of `policy` at
    /// `generation` at `now`; `None` when it may be computed now, which is
    /// then recorded.
    pub fn wait(&self, policy: &str, generation: Option<i64>, now: tokio::time::Instant) -> Option<Duration> {
        let mut computed = self
            .computed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((seen, at)) = computed.get(policy)
            && *seen == generation
            && now < *at + POLICY_STATUS_EVERY
        {
            return Some(*at + POLICY_STATUS_EVERY - now);
        }
        computed.insert(policy.to_owned(), (generation, now));
        None
    }

    /// Forgets `policy` (deleted).
    pub fn forget(&self, policy: &str) {
        self.computed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(policy);
    }
}

/// What a reconcile reads and writes through.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every VfPolicy.
    pub policies: Store<VfPolicy>,
    /// Every NodeState.
    pub states: Store<NodeState>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// When each policy's status was last computed.
    pub status_throttle: StatusThrottle,
    /// Disruptive changes under way ([`crate::rollout`]).
    pub rollouts: Rollouts,
    /// Posts the rollouts' Events (evictions, blocks, completions).
    pub recorder: Recorder,
    /// The client of evictions: without kube's default retry of 429, which
    /// would hold a reconcile for minutes on a budget's refusal.
    pub evictions: Client,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("nodes", &self.nodes.state().len())
            .field("policies", &self.policies.state().len())
            .field("states", &self.states.state().len())
            .finish_non_exhaustive()
    }
}

impl Context {
    fn state_of(&self, node: &str) -> Option<Arc<NodeState>> {
        self.states.get(&ObjectRef::new(node))
    }

    fn policies(&self) -> Vec<Arc<VfPolicy>> {
        self.policies.state()
    }
}

/// How often a node waiting for a place in a rollout asks again when no
/// place freed (a freed place wakes the longest-waiting nodes at once).
pub const ROLLOUT_WAIT_RECHECK: Duration = Duration::from_secs(60);
/// How often the eviction of a pod a budget protects is asked again.
pub const EVICTION_RETRY: Duration = Duration::from_secs(10);

/// Reconciles one node: applies its NodeState spec when it differs, holding
/// back a disruptive change while the policies' rollouts have no place for
/// the node, and evicting the pods that hold VFs of a PF in a change the
/// policies allow it for ([`crate::rollout`]).
///
/// # Errors
/// The API refused the apply.
#[instrument(skip(node, ctx), fields(node = %node.name_any()))]
pub async fn reconcile_node(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("nodes");
    let name = node.name_any();
    let policies = ctx.policies();
    let ordered = plan::merge_order(policies.iter().map(|p| p.as_ref()));
    let state = ctx.state_of(&name);
    let now = tokio::time::Instant::now();
    if !plan::wants_node_state(&node, &ordered, state.as_deref()) {
        return Ok(Action::await_change());
    }
    let mut planned = plan::plan_node(&node, &ordered, state.as_deref());
    let current = state.as_deref().map(|s| &s.spec);
    let status = state.as_deref().and_then(|s| s.status.as_ref());
    let pending = rollout::disruptive_pfs(current, &planned.spec, status);
    let busy = state.as_deref().map(rollout::pfs_in_progress).unwrap_or_default();
    ctx.rollouts
        .observe(&name, !busy.is_empty(), pending.is_empty(), now);
    let mut next = Action::await_change();
    let mut admitted = false;
    if pending.is_empty() {
        ctx.rollouts.withdraw(&name);
    } else {
        let rule = rollout::governance(&planned.claims, &pending, &ordered);
        if !rule.limits.is_empty() {
            match ctx
                .rollouts
                .admit(&name, &rule.limits, &ctx.policies, &ctx.nodes, &ctx.states, now)
            {
                Admission::Admitted => {
                    admitted = true;
                    info!(pfs = ?pending, "admitted to a disruptive change");
                }
                Admission::Full { policy, busy, limit } => {
                    tracing::debug!(%policy, busy, limit, "waiting for a place in the rollout");
                    rollout::keep_current(&mut planned.spec, current, &pending);
                    next = Action::requeue(ROLLOUT_WAIT_RECHECK);
                }
            }
        }
    }
    if state.as_ref().is_none_or(|s| s.spec != planned.spec) {
        if let Err(error) = apply_node_state(&ctx.client, &node, &planned).await {
            if admitted {
                ctx.rollouts.withdraw(&name);
            }
            return Err(error);
        }
        info!(pfs = planned.spec.pfs.len(), "NodeState spec applied");
        // What the agent makes of it comes back as a NodeState event.
        return Ok(next);
    }
    if let Some(state) = state.as_deref()
        && !busy.is_empty()
        && let Some(wait) = evict_holders(&ctx, state, &planned, &busy, &ordered).await
    {
        next = Action::requeue(wait);
    }
    Ok(next)
}

/// Evicts the pods holding VFs of the node's PFs in a change (`busy`)
/// when every policy keeping VFs there allows it, once the agent has seen
/// the spec (it then names the holders and hands none of those VFs out).
/// When to look again, if a pod could not be evicted.
async fn evict_holders(
    ctx: &Context,
    state: &NodeState,
    planned: &NodePlan,
    busy: &std::collections::BTreeSet<String>,
    ordered: &[&VfPolicy],
) -> Option<Duration> {
    let node = &planned.node;
    let seen = state.status.as_ref().and_then(|s| s.observed_generation);
    if seen != state.metadata.generation {
        tracing::debug!(?seen, generation = ?state.metadata.generation, "no eviction before the agent has seen the spec");
        return None;
    }
    let rule = rollout::governance(&planned.claims, busy, ordered);
    if !rule.evict {
        tracing::debug!(pfs = ?busy, "no eviction: not every policy with VFs there says evictPods");
        return None;
    }
    let mut retry = None;
    let mut trouble = None;
    for pod in rollout::holding_pods(state, busy) {
        if !ctx.rollouts.first_eviction(node, &pod) {
            continue;
        }
        info!(pod = %format!("{}/{}", pod.namespace, pod.name), vfs = %pod.vfs.join(", "), "evicting the pod holding VFs of a PF in a change");
        let api: Api<Pod> = Api::namespaced(ctx.evictions.clone(), &pod.namespace);
        // The body by hand: kube's `Api::evict` names the field
        // `delete_options`, which the API server ignores, and with it the
        // UID precondition.
        let eviction = Eviction {
            metadata: kube::api::ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            delete_options: Some(DeleteOptions {
                preconditions: pod.uid.clone().map(|uid| K8sPreconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteOptions::default()
            }),
        };
        let holds = pod.vfs.join(", ");
        let asked: Result<kube::core::Status, _> = api
            .create_subresource("eviction", &pod.name, &PostParams::default(), &eviction)
            .await;
        match asked {
            Ok(_) => {
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), vfs = %holds, "evicted");
                let note = format!("node {node} re-creates the VFs of its PF; this pod holds {holds}");
                post_event(
                    ctx,
                    &pod_reference(&pod),
                    EventType::Normal,
                    "EvictedForVfChange",
                    note,
                )
                .await;
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(kube::Error::Api(status)) if status.code == 429 => {
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), message = %status.message, "eviction refused; asked again later");
                ctx.rollouts.eviction_failed(node, &pod);
                retry = Some(EVICTION_RETRY);
                trouble.get_or_insert(vfplane_proto::vf_policy::RolloutBlock {
                    node: node.clone(),
                    reason: rollout::reasons::WAITING_ON_PDB.to_owned(),
                    message: format!(
                        "evicting pod {}/{} (holds {holds}): {}",
                        pod.namespace, pod.name, status.message
                    ),
                });
            }
            Err(error) => {
                ctx.rollouts.eviction_failed(node, &pod);
                retry = Some(EVICTION_RETRY);
                warn!(error = %error, pod = %format!("{}/{}", pod.namespace, pod.name), "eviction failed");
                trouble.get_or_insert(vfplane_proto::vf_policy::RolloutBlock {
                    node: node.clone(),
                    reason: rollout::reasons::EVICTION_FAILED.to_owned(),
                    message: format!(
                        "evicting pod {}/{} (holds {holds}): {error}",
                        pod.namespace, pod.name
                    ),
                });
            }
        }
    }
    let concerned: std::collections::BTreeSet<&str> = planned
        .claims
        .iter()
        .filter(|c| busy.contains(&c.pf))
        .map(|c| c.policy.as_str())
        .collect();
    if retry.is_none() {
        // Every holder is on its way out: an earlier block is over.
        if ctx.rollouts.note(node, None) {
            ctx.rollouts.touch_policies(concerned.iter().copied());
        }
        return None;
    }
    if let Some(block) = trouble
        && ctx.rollouts.note(node, Some(block.clone()))
    {
        // The policies' status says so: nothing else would ask for it, as
        // no NodeState changes.
        ctx.rollouts.touch_policies(concerned.iter().copied());
        for name in &concerned {
            if let Some(policy) = ctx.policies.get(&ObjectRef::new(name)) {
                let note = format!("node {}: {}", block.node, block.message);
                post_event(
                    ctx,
                    &policy.object_ref(&()),
                    EventType::Warning,
                    &block.reason,
                    note,
                )
                .await;
            }
        }
    }
    retry
}

fn pod_reference(pod: &HoldingPod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: pod.uid.clone(),
        ..ObjectReference::default()
    }
}

/// Posts one Event; a refusal is logged, not retried (the status says
/// the same).
async fn post_event(
    ctx: &Context,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Rollout".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, regarding).await {
        warn!(%error, reason, "cannot post an event");
    }
}

/// The recorder of the controller's Events.
pub fn recorder(client: &Client) -> Recorder {
    Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        },
    )
}

/// The server-side apply of one node's spec.
///
/// # Errors
/// The API refused it.
pub async fn apply_node_state(client: &Client, node: &Node, planned: &NodePlan) -> Result<()> {
    let api: Api<NodeState> = Api::all(client.clone());
    let mut owner = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "name": planned.node,
        "blockOwnerDeletion": false,
    });
    if let Some(uid) = node.meta().uid.as_deref() {
        owner["uid"] = json!(uid);
    }
    let body = json!({
        "apiVersion": "vfplane.io/v1alpha1",
        "kind": "NodeState",
        "metadata": {
            "name": planned.node,
            "ownerReferences": if node.meta().uid.is_some() { json!([owner]) } else { json!([]) },
        },
        "spec": planned.spec,
    });
    api.patch(
        &planned.node,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Kube {
        action: "applying the spec of",
        object: format!("NodeState/{}", planned.node),
        source,
    })?;
    Ok(())
}

/// Plans of the nodes `selector` selects (all when `None`), with their
/// NodeStates. A policy's status only needs the nodes it selects.
fn plans(ctx: &Context, selector: Option<&VfPolicy>) -> Vec<(NodePlan, Option<Arc<NodeState>>)> {
    let policies = ctx.policies();
    let ordered = plan::merge_order(policies.iter().map(|p| p.as_ref()));
    ctx.nodes
        .state()
        .iter()
        .filter(|node| selector.is_none_or(|p| plan::selects_node(&p.spec, node)))
        .map(|node| {
            let state = ctx.state_of(&node.name_any());
            (plan::plan_node(node, &ordered, state.as_deref()), state)
        })
        .collect()
}

/// Reconciles one policy inside its finalizer.
///
/// # Errors
/// API failures, or (on deletion) VFs still being released.
#[instrument(skip(policy, ctx), fields(policy = %policy.name_any()))]
pub async fn reconcile_policy(policy: Arc<VfPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("policies");
    let api: Api<VfPolicy> = Api::all(ctx.client.clone());
    let name = policy.name_any();
    finalizer(&api, POLICY_FINALIZER, policy, |event| async {
        match event {
            FinalizerEvent::Apply(policy) => apply_policy_status(&api, &policy, &ctx).await,
            FinalizerEvent::Cleanup(policy) => {
                ctx.status_throttle.forget(&policy.name_any());
                release_policy(&policy, &ctx)
            }
        }
    })
    .await
    .map_err(|error| match error {
        kube::runtime::finalizer::Error::ApplyFailed(inner)
        | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner,
        other => Error::Finalizer {
            policy: name,
            source: Box::new(other),
        },
    })
}

async fn apply_policy_status(api: &Api<VfPolicy>, policy: &VfPolicy, ctx: &Context) -> Result<Action> {
    let name = policy.name_any();
    if let Some(wait) =
        ctx.status_throttle
            .wait(&name, policy.metadata.generation, tokio::time::Instant::now())
    {
        return Ok(Action::requeue(wait));
    }
    let plans = plans(ctx, Some(policy));
    let mut status = plan::policy_status(policy, plans.iter().map(|(p, s)| (p, s.as_deref())));
    let notes = ctx.rollouts.notes();
    status.rollout = rollout::rollout_status(
        policy,
        plans.iter().map(|(p, s)| (p, s.as_deref(), notes.get(&p.node))),
    );
    if policy.status.as_ref() == Some(&status) {
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let before = policy.status.as_ref().and_then(|s| s.rollout.as_ref());
    if let Some((type_, reason, note)) = rollout_event(before, status.rollout.as_ref()) {
        post_event(ctx, &policy.object_ref(&()), type_, reason, note).await;
    }
    let body = json!({
        "apiVersion": "vfplane.io/v1alpha1",
        "kind": "VfPolicy",
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Kube {
        action: "patching the status of",
        object: format!("VfPolicy/{name}"),
        source,
    })?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The Event a policy's rollout calls for, from its status before and now:
/// the change done on every node, or nodes that newly cannot go on.
fn rollout_event(
    before: Option<&vfplane_proto::vf_policy::RolloutStatus>,
    now: Option<&vfplane_proto::vf_policy::RolloutStatus>,
) -> Option<(EventType, &'static str, String)> {
    let underway = |s: &vfplane_proto::vf_policy::RolloutStatus| s.nodes_pending + s.nodes_in_progress;
    let now = now?;
    if before.is_some_and(|b| underway(b) > 0) && underway(now) == 0 {
        return Some((
            EventType::Normal,
            "RolloutComplete",
            format!("the change is done on all {} nodes", now.nodes_done),
        ));
    }
    let failed_before = before.map_or(0, |b| b.nodes_failed);
    if now.nodes_failed > failed_before
        && let Some(block) = now
            .blocked
            .iter()
            .find(|b| b.reason != rollout::reasons::WAITING_ON_PDB)
    {
        return Some((
            EventType::Warning,
            "RolloutStalled",
            format!(
                "{} nodes cannot go on by themselves; node {} ({}): {}",
                now.nodes_failed, block.node, block.reason, block.message
            ),
        ));
    }
    None
}

/// The finalizer's cleanup: done when no agent reports a VF of the pool
/// that no live policy plans, and every agent saw the spec without it.
fn release_policy(policy: &VfPolicy, ctx: &Context) -> Result<Action> {
    let plans = plans(ctx, None);
    let leftover = plan::leftover_vfs(
        &policy.spec.resource_name,
        plans.iter().map(|(p, s)| (p, s.as_deref())),
    );
    let behind: Vec<&str> = plans
        .iter()
        .filter_map(|(_, s)| s.as_deref())
        .filter(|s| {
            let seen = s.status.as_ref().and_then(|st| st.observed_generation);
            s.metadata.generation.is_some() && seen < s.metadata.generation
        })
        .map(|s| s.metadata.name.as_deref().unwrap_or_default())
        .collect();
    if let Some((node, pf, index)) = leftover.first() {
        return Err(Error::StillReleasing {
            policy: policy.name_any(),
            count: leftover.len(),
            first: format!("{node} {pf} #{index}"),
        });
    }
    if let Some(node) = behind.first() {
        return Err(Error::StillReleasing {
            policy: policy.name_any(),
            count: 0,
            first: format!("agent on {node} has not applied the latest spec"),
        });
    }
    info!("every VF released; the policy can go");
    Ok(Action::await_change())
}

/// How failed reconciles are retried.
pub fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |_, error, ctx| match error {
        Error::StillReleasing { .. } => {
            info!(%error, "waiting");
            Action::requeue(RELEASE_RECHECK)
        }
        _ => {
            warn!(error = %error, source = ?std::error::Error::source(error), "reconcile failed");
            ctx.metrics.error(controller, error);
            Action::requeue(Duration::from_secs(10))
        }
    }
}

/// The one watch of each kind that the controllers and the webhook's view
/// share. Cheap to clone; clones share the watches.
#[derive(Clone, Debug)]
pub struct ClusterWatches {
    /// Every Node.
    pub nodes: SharedWatch<Node>,
    /// Every VfPolicy.
    pub policies: SharedWatch<VfPolicy>,
    /// Every NodeState.
    pub states: SharedWatch<NodeState>,
}

impl ClusterWatches {
    /// The three watches, and the future that runs them. Nothing is
    /// watched until that future runs; dropping it stops the watches and
    /// ends their subscriptions.
    pub fn new(client: &Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        fn watch<K>(client: &Client) -> (SharedWatch<K>, impl Future<Output = ()> + Send + 'static)
        where
            K: Resource<DynamicType = ()>
                + Clone
                + std::fmt::Debug
                + serde::de::DeserializeOwned
                + Send
                + Sync
                + 'static,
        {
            let events = watcher(
                Api::<K>::all(client.clone()),
                watcher::Config::default().any_semantic(),
            )
            .default_backoff();
            SharedWatch::new(events)
        }
        let (nodes, watching_nodes) = watch(client);
        let (policies, watching_policies) = watch(client);
        let (states, watching_states) = watch(client);
        let watching = async move {
            futures::join!(watching_nodes, watching_policies, watching_states);
        };
        (
            Self {
                nodes,
                policies,
                states,
            },
            watching,
        )
    }

    /// Starts the three watches on the runtime, each on a task of its
    /// own; they run until the process ends. Every replica runs them: the
    /// webhook answers on followers too.
    pub fn spawn(client: &Client) -> Self {
        let (watches, watching) = Self::new(client);
        tokio::spawn(watching);
        watches
    }

    /// Waits until each store has held a complete listing; false if a
    /// watch stopped first. Any number of tasks may wait at once,
    /// alongside the controllers (see [`SharedWatch::store`]).
    pub async fn listed(&self) -> bool {
        let (nodes, policies, states) =
            futures::join!(self.nodes.listed(), self.policies.listed(), self.states.listed());
        nodes && policies && states
    }

    /// The webhook's view, over the watches' stores.
    pub fn view(&self) -> StoreView {
        StoreView {
            nodes: self.nodes.store(),
            policies: self.policies.store(),
            states: self.states.store(),
        }
    }
}

/// Runs both controllers, over watches of their own, until `shutdown`
/// resolves; the watches stop with them; evictions go through `client` too
/// (see [`run_with`]). A process that also serves the webhook shares one
/// set of watches through [`run_with`] instead.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (watches, watching) = ClusterWatches::new(&client);
    let controllers = run_with(watches, client.clone(), client, metrics, shutdown);
    // The watches never end on their own (their watchers retry), so this
    // ends when the controllers do.
    futures::future::select(pin!(controllers), pin!(watching)).await;
}

/// Runs both controllers over `watches` until `shutdown` resolves;
/// `evictions` is the client of the rollouts' evictions (one that does not
/// retry a 429 itself: a PodDisruptionBudget's refusal is one). They
/// subscribe here: each starts from a listing of the stores, waiting for
/// the first one if need be (see [`crate::shared_watch`]).
pub async fn run_with(
    watches: ClusterWatches,
    client: Client,
    evictions: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let (wake_tx, mut wake_rx) = tokio::sync::mpsc::unbounded_channel();
    let (wake_policies_tx, mut wake_policies_rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: watches.nodes.store(),
        policies: watches.policies.store(),
        states: watches.states.store(),
        metrics,
        status_throttle: StatusThrottle::default(),
        rollouts: Rollouts::new(wake_tx, wake_policies_tx),
        evictions,
        recorder: recorder(&client),
    });

    // The node controller. Nodes depend on a policy's spec and on its
    // deletion, both of which bump its generation; its status (written by
    // the policy controller) must not send every node through a reconcile.
    let policy_generations = watches
        .policies
        .subscribe()
        .touched_objects()
        .predicate_filter(predicates::generation, PredicateConfig::default());
    let all_nodes = ctx.nodes.clone();
    let nodes = Controller::for_stream(watches.nodes.subscribe().applied_objects(), ctx.nodes.clone())
        .watches_stream(policy_generations, move |_policy: VfPolicy| {
            all_nodes
                .state()
                .iter()
                .map(|n| ObjectRef::from_obj(n.as_ref()))
                .collect::<Vec<_>>()
        })
        .watches_stream(
            watches.states.subscribe().touched_objects(),
            |state: NodeState| Some(ObjectRef::<Node>::new(&state.name_any())),
        )
        .reconcile_on(futures::stream::poll_fn(move |cx| wake_rx.poll_recv(cx)))
        .with_config(kube::runtime::controller::Config::default().concurrency(NODE_RECONCILES_AT_ONCE))
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_node, error_policy("nodes"), Arc::clone(&ctx))
        .for_each(|_| std::future::ready(()));

    // The policy controller.
    let every_policy = |store: &Store<VfPolicy>| {
        store
            .state()
            .iter()
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect::<Vec<_>>()
    };
    let (for_nodes, for_states) = (ctx.policies.clone(), ctx.policies.clone());
    let policies = Controller::for_stream(
        watches.policies.subscribe().applied_objects(),
        ctx.policies.clone(),
    )
    .watches_stream(
        node_selection_changes(watches.nodes.subscribe()),
        move |_node: Node| every_policy(&for_nodes),
    )
    .watches_stream(
        watches.states.subscribe().touched_objects(),
        move |_state: NodeState| every_policy(&for_states),
    )
    .reconcile_on(futures::stream::poll_fn(move |cx| wake_policies_rx.poll_recv(cx)))
    .graceful_shutdown_on(shutdown)
    .run(reconcile_policy, error_policy("policies"), ctx)
    .for_each(|_| std::future::ready(()));

    futures::join!(nodes, policies);
}

/// The node events a policy's status depends on: a node's labels (its
/// selection) and its existence. Kubelets update their Node's status all
/// the time; passed on, each update would recompute every policy over every
/// node it selects. A new node, a label change and a deletion pass; so does
/// every node after a relist (the watch may have missed deletions).
pub fn node_selection_changes<S>(events: S) -> impl futures::Stream<Item = Result<Node, watcher::Error>>
where
    S: futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>>,
{
    let mut labels: HashMap<String, u64> = HashMap::new();
    events.filter_map(move |event| {
        let passed = match event {
            Err(error) => Some(Err(error)),
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                let mut hasher = DefaultHasher::new();
                node.labels().hash(&mut hasher);
                let hash = hasher.finish();
                (labels.insert(node.name_any(), hash) != Some(hash)).then_some(Ok(node))
            }
            Ok(watcher::Event::Delete(node)) => {
                labels.remove(&node.name_any());
                Some(Ok(node))
            }
            Ok(watcher::Event::Init) => {
                labels.clear();
                None
            }
            Ok(watcher::Event::InitDone) => None,
        };
        std::future::ready(passed)
    })
}

/// The webhook's view of the cluster, over the stores of the
/// [`ClusterWatches`] that every replica keeps (the webhook answers on
/// followers too).
#[derive(Clone)]
pub struct StoreView {
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every VfPolicy.
    pub policies: Store<VfPolicy>,
    /// Every NodeState.
    pub states: Store<NodeState>,
}

impl std::fmt::Debug for StoreView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreView").finish_non_exhaustive()
    }
}

impl crate::webhook::ClusterView for StoreView {
    fn selected_pfs(&self, spec: &vfplane_proto::vf_policy::VfPolicySpec) -> Vec<crate::webhook::SelectedPf> {
        let mut out = Vec::new();
        for node in self.nodes.state() {
            if !plan::selects_node(spec, &node) {
                continue;
            }
            let name = node.name_any();
            let Some(state) = self.states.get(&ObjectRef::new(&name)) else {
                continue;
            };
            for pf in state.status.iter().flat_map(|s| &s.pfs) {
                if plan::selects_pf(spec, pf).is_some() {
                    out.push(crate::webhook::SelectedPf {
                        node: name.clone(),
                        pci_address: pf.pci_address.clone(),
                        name: pf.name.clone(),
                        total_vfs: pf.total_vfs,
                    });
                }
            }
        }
        out
    }

    fn container_profile(&self, pool: &str) -> Option<vfplane_proto::vf_policy::ContainerProfile> {
        let policies = self.policies.state();
        plan::pool_profiles(policies.iter().map(|p| p.as_ref())).remove(pool)
    }

    fn dra_pools(&self) -> Vec<String> {
        let mut pools: Vec<String> = self
            .policies
            .state()
            .iter()
            .filter(|p| p.spec.resource_api == vfplane_proto::pool::ResourceApi::Dra)
            .map(|p| p.spec.resource_name.clone())
            .collect();
        pools.sort();
        pools.dedup();
        pools
    }
}
