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
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
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

/// Reconciles one node: applies its NodeState spec when it differs.
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
    if !plan::wants_node_state(&node, &ordered, state.as_deref()) {
        return Ok(Action::await_change());
    }
    let planned = plan::plan_node(&node, &ordered, state.as_deref());
    if state.as_ref().is_some_and(|s| s.spec == planned.spec) {
        return Ok(Action::await_change());
    }
    apply_node_state(&ctx.client, &node, &planned).await?;
    info!(pfs = planned.spec.pfs.len(), "NodeState spec applied");
    Ok(Action::await_change())
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
    let status = plan::policy_status(policy, plans.iter().map(|(p, s)| (p, s.as_deref())));
    if policy.status.as_ref() == Some(&status) {
        return Ok(Action::requeue(Duration::from_secs(300)));
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
/// resolves; the watches stop with them. A process that also serves the
/// webhook shares one set of watches through [`run_with`] instead.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let (watches, watching) = ClusterWatches::new(&client);
    let controllers = run_with(watches, client, metrics, shutdown);
    // The watches never end on their own (their watchers retry), so this
    // ends when the controllers do.
    futures::future::select(pin!(controllers), pin!(watching)).await;
}

/// Runs both controllers over `watches` until `shutdown` resolves. They
/// subscribe here: each starts from a listing of the stores, waiting for
/// the first one if need be (see [`crate::shared_watch`]).
pub async fn run_with(
    watches: ClusterWatches,
    client: Client,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = futures::FutureExt::shared(shutdown);
    let ctx = Arc::new(Context {
        client,
        nodes: watches.nodes.store(),
        policies: watches.policies.store(),
        states: watches.states.store(),
        metrics,
        status_throttle: StatusThrottle::default(),
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
