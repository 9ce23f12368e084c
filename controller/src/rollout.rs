//! Rolling a disruptive change across the nodes (`VfPolicy.spec.rollout`).
//!
//! A change is disruptive on a node when it changes the `numVfs` of a PF
//! that has VFs: the kernel takes a new count only from zero, so the agent
//! removes every VF and makes the new ones, and refuses while a process
//! holds one. Such a change goes through three stages, all read from the
//! NodeState (so a new leader picks a rollout up where it stands):
//!
//! - **pending**: the planned spec changes the PF's `numVfs` and the
//!   written spec does not yet. A node of a policy with a `rollout` stays
//!   pending (its spec keeps the PF's current entry, every other change
//!   applies) while as many of the policy's nodes as `maxUnavailableNodes`
//!   are busy;
//! - **in progress** (busy): the written spec's `numVfs` differs from what
//!   the agent reports. With `evictPods`, the controller evicts the pods the
//!   agent names as owners of the PF's VFs, through the Eviction API;
//! - **done**: the agent reports the spec's count.
//!
//! The pure part ([`disruptive_pfs`], [`pfs_in_progress`], [`governance`],
//! [`rollout_status`]) is tested directly; [`Rollouts`] is the in-memory
//! ledger that makes admissions from concurrent reconciles count right
//! before their writes come back through the watch.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::time::Instant;
use vfplane_proto::node_state::{NodeState, NodeStateSpec, NodeStateStatus};
use vfplane_proto::vf_policy::{ROLLOUT_NODES_LISTED, RolloutBlock, RolloutStatus, VfPolicy};

use crate::plan::{Claim, NodePlan, selects_node};

/// How long an admission counts before its write shows in the store; past
/// it, the store alone says whether the node is busy.
const ADMISSION_UNSEEN_FOR: Duration = Duration::from_secs(30);

/// Why a node's change cannot move on by itself; the `reason` word of a
/// [`RolloutBlock`].
pub mod reasons {
    /// A PodDisruptionBudget refuses the eviction of a pod holding a VF.
    pub const WAITING_ON_PDB: &str = "WaitingOnPdb";
    /// Pods hold VFs of the PF and the policy does not evict them.
    pub const PODS_HOLD_VFS: &str = "PodsHoldVfs";
    /// The agent reports an error on the PF (a holder outside any pod,
    /// a write the kernel refused).
    pub const AGENT_ERROR: &str = "AgentError";
    /// The Eviction API refused for another reason than a budget.
    pub const EVICTION_FAILED: &str = "EvictionFailed";
}

fn pf_status<'a>(
    status: Option<&'a NodeStateStatus>,
    address: &str,
) -> Option<&'a vfplane_proto::node_state::PfStatus> {
    status?.pfs.iter().find(|pf| pf.pci_address == address)
}

/// PFs whose VFs writing `planned` over `current` would re-create now: the
/// planned `numVfs` differs from the written one and from the count the
/// agent reports, and the agent reports VFs.
pub fn disruptive_pfs(
    current: Option<&NodeStateSpec>,
    planned: &NodeStateSpec,
    status: Option<&NodeStateStatus>,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pf in &planned.pfs {
        let Some(address) = pf.pci_address.as_deref() else {
            continue;
        };
        let written = current
            .and_then(|c| c.pfs.iter().find(|p| p.pci_address.as_deref() == Some(address)))
            .map(|p| p.num_vfs);
        if written == Some(pf.num_vfs) {
            continue;
        }
        if let Some(reported) = pf_status(status, address)
            && reported.num_vfs > 0
            && reported.num_vfs != pf.num_vfs
        {
            out.insert(address.to_owned());
        }
    }
    out
}

/// PFs of the written spec whose `numVfs` the agent does not report (yet).
pub fn pfs_in_progress(state: &NodeState) -> BTreeSet<String> {
    let status = state.status.as_ref();
    state
        .spec
        .pfs
        .iter()
        .filter_map(|pf| {
            let address = pf.pci_address.as_deref()?;
            let reported = pf_status(status, address)?;
            (reported.num_vfs != pf.num_vfs).then(|| address.to_owned())
        })
        .collect()
}

/// Writes the current spec's entry (or none) for each of `pfs` into `spec`:
/// what a pending node is written with.
pub fn keep_current(spec: &mut NodeStateSpec, current: Option<&NodeStateSpec>, pfs: &BTreeSet<String>) {
    spec.pfs
        .retain(|pf| pf.pci_address.as_deref().is_none_or(|a| !pfs.contains(a)));
    if let Some(current) = current {
        spec.pfs.extend(
            current
                .pfs
                .iter()
                .filter(|pf| pf.pci_address.as_deref().is_some_and(|a| pfs.contains(a)))
                .cloned(),
        );
    }
    spec.pfs.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
}

/// What the policies with VFs on some PFs allow of a change there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Governance {
    /// Each policy with a `rollout` that keeps VFs there, with its
    /// `maxUnavailableNodes`.
    pub limits: Vec<(String, u32)>,
    /// Whether pods holding VFs there may be evicted: every policy keeping
    /// VFs there says `evictPods`.
    pub evict: bool,
}

/// The [`Governance`] of `pfs` from the node's planned `claims`.
pub fn governance(claims: &[Claim], pfs: &BTreeSet<String>, ordered: &[&VfPolicy]) -> Governance {
    let mut limits = Vec::new();
    let mut evict = true;
    let mut any = false;
    let names: BTreeSet<&str> = claims
        .iter()
        .filter(|c| pfs.contains(&c.pf))
        .map(|c| c.policy.as_str())
        .collect();
    for policy in ordered {
        let name = policy.metadata.name.as_deref().unwrap_or_default();
        if !names.contains(name) {
            continue;
        }
        any = true;
        match &policy.spec.rollout {
            Some(rollout) => {
                limits.push((name.to_owned(), rollout.max_unavailable_nodes));
                evict &= rollout.evict_pods;
            }
            None => evict = false,
        }
    }
    Governance {
        limits,
        evict: any && evict,
    }
}

/// A pod holding a VF of a PF, as the agent names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HoldingPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID, when the agent read it (the eviction is then refused if
    /// the name now belongs to another pod).
    pub uid: Option<String>,
    /// The VFs it holds there: `<PF> VF <index> (<address>)`.
    pub vfs: Vec<String>,
}

impl HoldingPod {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.namespace,
            self.name,
            self.uid.as_deref().unwrap_or_default()
        )
    }
}

/// The pods the agent names as owners of VFs of `pfs`.
pub fn holding_pods(state: &NodeState, pfs: &BTreeSet<String>) -> Vec<HoldingPod> {
    let mut pods: BTreeMap<(String, String), HoldingPod> = BTreeMap::new();
    for pf in state.status.iter().flat_map(|s| &s.pfs) {
        if !pfs.contains(&pf.pci_address) {
            continue;
        }
        for vf in &pf.vfs {
            let Some((namespace, name, _)) = vf.owner_parts() else {
                continue;
            };
            let pod = pods
                .entry((namespace.to_owned(), name.to_owned()))
                .or_insert_with(|| HoldingPod {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    uid: vf.owner_pod_uid.clone(),
                    vfs: Vec::new(),
                });
            pod.vfs
                .push(format!("{} VF {} ({})", pf.pci_address, vf.index, vf.pci_address));
        }
    }
    pods.into_values().collect()
}

/// Where one node stands in one policy's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRollout {
    /// Nothing disruptive to do.
    Done,
    /// Waiting for a place.
    Pending,
    /// Under way; blocked, and why, when it cannot go on by itself.
    InProgress(Option<RolloutBlock>),
}

/// Where `plan`'s node stands in `policy`'s change: only the PFs where the
/// policy keeps VFs count. `note` is the ledger's word on the node (an
/// eviction a budget refused, say); `evict` the policy's `evictPods`.
pub fn node_rollout(
    policy: &str,
    evict: bool,
    plan: &NodePlan,
    state: Option<&NodeState>,
    note: Option<&RolloutBlock>,
) -> NodeRollout {
    let Some(state) = state else {
        return NodeRollout::Done;
    };
    let mine: BTreeSet<String> = plan
        .claims
        .iter()
        .filter(|c| c.policy == policy)
        .map(|c| c.pf.clone())
        .collect();
    let busy: BTreeSet<String> = pfs_in_progress(state).intersection(&mine).cloned().collect();
    if !busy.is_empty() {
        if let Some(note) = note {
            return NodeRollout::InProgress(Some(note.clone()));
        }
        let node = plan.node.clone();
        let pods = holding_pods(state, &busy);
        if let Some(pod) = pods.first()
            && !evict
        {
            return NodeRollout::InProgress(Some(RolloutBlock {
                node,
                reason: reasons::PODS_HOLD_VFS.to_owned(),
                message: format!(
                    "pod {}/{} holds {} and the policy does not evict (rollout.evictPods); {} pods hold VFs here",
                    pod.namespace,
                    pod.name,
                    pod.vfs.join(", "),
                    pods.len()
                ),
            }));
        }
        let agent_error = state
            .status
            .iter()
            .flat_map(|s| &s.pfs)
            .filter(|pf| busy.contains(&pf.pci_address))
            .find_map(|pf| pf.error.clone());
        if pods.is_empty()
            && let Some(error) = agent_error
            && state.status.as_ref().and_then(|s| s.observed_generation) == state.metadata.generation
        {
            return NodeRollout::InProgress(Some(RolloutBlock {
                node,
                reason: reasons::AGENT_ERROR.to_owned(),
                message: error,
            }));
        }
        return NodeRollout::InProgress(None);
    }
    let pending = disruptive_pfs(Some(&state.spec), &plan.spec, state.status.as_ref());
    if pending.iter().any(|pf| mine.contains(pf)) {
        NodeRollout::Pending
    } else {
        NodeRollout::Done
    }
}

/// The `rollout` section of `policy`'s status from every node it selects:
/// present when the policy has a `rollout`, or when some node is pending or
/// in progress.
pub fn rollout_status<'a>(
    policy: &VfPolicy,
    nodes: impl IntoIterator<Item = (&'a NodePlan, Option<&'a NodeState>, Option<&'a RolloutBlock>)>,
) -> Option<RolloutStatus> {
    let name = policy.metadata.name.as_deref().unwrap_or_default();
    let evict = policy.spec.rollout.as_ref().is_some_and(|r| r.evict_pods);
    let mut status = RolloutStatus::default();
    let mut blocked = Vec::new();
    for (plan, state, note) in nodes {
        if !plan.matched_policies.contains(name) {
            continue;
        }
        match node_rollout(name, evict, plan, state, note) {
            NodeRollout::Done => status.nodes_done += 1,
            NodeRollout::Pending => status.nodes_pending += 1,
            NodeRollout::InProgress(block) => {
                status.nodes_in_progress += 1;
                if let Some(block) = block {
                    if block.reason == reasons::WAITING_ON_PDB {
                        status.nodes_waiting_on_pdb += 1;
                    } else {
                        status.nodes_failed += 1;
                    }
                    blocked.push(block);
                }
            }
        }
    }
    if policy.spec.rollout.is_none() && status.nodes_pending == 0 && status.nodes_in_progress == 0 {
        return None;
    }
    blocked.sort();
    blocked.truncate(ROLLOUT_NODES_LISTED);
    status.blocked = blocked;
    Some(status)
}

/// The answer to a node's request for a place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The node may be written with its change.
    Admitted,
    /// A policy has no place left: its name, its busy nodes, its limit.
    Full {
        /// The policy.
        policy: String,
        /// Its busy nodes.
        busy: usize,
        /// Its `maxUnavailableNodes`.
        limit: u32,
    },
}

/// The in-memory ledger of rollouts: which nodes are busy (from the
/// store, and admitted ones before their write is seen), which wait for a
/// place, what the last eviction of a node's pods met, which pods were
/// evicted. Clones share it. Rebuilt from the store by a new leader.
#[derive(Debug, Clone, Default)]
pub struct Rollouts {
    ledger: Arc<Mutex<Ledger>>,
    wake: Option<tokio::sync::mpsc::UnboundedSender<ObjectRef<Node>>>,
    wake_policies: Option<tokio::sync::mpsc::UnboundedSender<ObjectRef<VfPolicy>>>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// Whether `busy` was filled from the whole store once.
    counted: bool,
    /// Nodes the store shows with a PF in progress.
    busy: BTreeSet<String>,
    /// Nodes admitted, until their write shows in the store.
    admitted: HashMap<String, Instant>,
    /// Nodes waiting for a place, oldest first.
    waiting: BTreeMap<u64, String>,
    waiting_since: HashMap<String, u64>,
    next: u64,
    /// The last eviction trouble of each node.
    notes: HashMap<String, RolloutBlock>,
    /// Pods (`namespace/name/uid`) evicted already, by node; forgotten
    /// when the node is no longer busy.
    evicted: HashMap<String, HashSet<String>>,
}

impl Ledger {
    fn is_busy(&self, node: &str, now: Instant) -> bool {
        self.busy.contains(node)
            || self
                .admitted
                .get(node)
                .is_some_and(|at| now < *at + ADMISSION_UNSEEN_FOR)
    }

    /// Every node counted busy at `now`: busy in the store, or admitted and
    /// not yet seen.
    fn busy_nodes(&self, now: Instant) -> BTreeSet<String> {
        let mut all = self.busy.clone();
        all.extend(
            self.admitted
                .iter()
                .filter(|(_, at)| now < **at + ADMISSION_UNSEEN_FOR)
                .map(|(n, _)| n.clone()),
        );
        all
    }
}

impl Rollouts {
    /// A ledger that sends the nodes to reconcile again, when a place
    /// frees, on `wake`, and the policies whose status a node's note
    /// changes on `wake_policies` (no NodeState changes with it).
    pub fn new(
        wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<Node>>,
        wake_policies: tokio::sync::mpsc::UnboundedSender<ObjectRef<VfPolicy>>,
    ) -> Self {
        Self {
            ledger: Arc::default(),
            wake: Some(wake),
            wake_policies: Some(wake_policies),
        }
    }

    /// Asks for the status of `policies` again.
    pub fn touch_policies<'a>(&self, policies: impl IntoIterator<Item = &'a str>) {
        if let Some(wake) = &self.wake_policies {
            for policy in policies {
                let _ = wake.send(ObjectRef::new(policy));
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what the store shows of `node` (`written`: its spec already
    /// carries the change it was admitted for, or none was). A node that
    /// stops being busy frees its place: the longest-waiting nodes are
    /// woken.
    pub fn observe(&self, node: &str, busy: bool, written: bool, now: Instant) {
        let mut ledger = self.lock();
        let was = ledger.is_busy(node, now);
        if busy {
            ledger.busy.insert(node.to_owned());
        } else {
            ledger.busy.remove(node);
            ledger.notes.remove(node);
            ledger.evicted.remove(node);
        }
        if written || busy {
            ledger.admitted.remove(node);
        }
        if was && !ledger.is_busy(node, now) {
            self.wake_some(&mut ledger, 2);
        }
    }

    fn wake_some(&self, ledger: &mut Ledger, count: usize) {
        for _ in 0..count {
            let Some((_, node)) = ledger.waiting.pop_first() else {
                return;
            };
            ledger.waiting_since.remove(&node);
            if let Some(wake) = &self.wake {
                let _ = wake.send(ObjectRef::new(&node));
            }
        }
    }

    /// Asks a place for `node` under every limit of `limits`: admitted when
    /// each policy has fewer busy nodes (among those it selects) than its
    /// `maxUnavailableNodes`, and then counted busy at once.
    pub fn admit(
        &self,
        node: &str,
        limits: &[(String, u32)],
        policies: &Store<VfPolicy>,
        nodes: &Store<Node>,
        states: &Store<NodeState>,
        now: Instant,
    ) -> Admission {
        let mut ledger = self.lock();
        if !ledger.counted {
            for state in states.state() {
                if !pfs_in_progress(&state).is_empty()
                    && let Some(name) = state.metadata.name.clone()
                {
                    ledger.busy.insert(name);
                }
            }
            ledger.counted = true;
        }
        let busy_nodes = ledger.busy_nodes(now);
        for (policy, limit) in limits {
            let Some(spec) = policies.get(&ObjectRef::new(policy)).map(|p| p.spec.clone()) else {
                continue;
            };
            let busy = busy_nodes
                .iter()
                .filter(|n| n.as_str() != node)
                .filter(|n| {
                    nodes
                        .get(&ObjectRef::new(n.as_str()))
                        .is_some_and(|found| selects_node(&spec, &found))
                })
                .count();
            if busy >= *limit as usize {
                let full = Admission::Full {
                    policy: policy.clone(),
                    busy,
                    limit: *limit,
                };
                if !ledger.waiting_since.contains_key(node) {
                    let seq = ledger.next;
                    ledger.next += 1;
                    ledger.waiting.insert(seq, node.to_owned());
                    ledger.waiting_since.insert(node.to_owned(), seq);
                }
                return full;
            }
        }
        if let Some(seq) = ledger.waiting_since.remove(node) {
            ledger.waiting.remove(&seq);
        }
        ledger.admitted.insert(node.to_owned(), now);
        Admission::Admitted
    }

    /// Forgets `node`'s admission (its write failed) and that it waits.
    pub fn withdraw(&self, node: &str) {
        let mut ledger = self.lock();
        ledger.admitted.remove(node);
        if let Some(seq) = ledger.waiting_since.remove(node) {
            ledger.waiting.remove(&seq);
        }
    }

    /// Records that the eviction of `pod` on `node` was asked; false when
    /// it had been already (the pod is on its way out).
    pub fn first_eviction(&self, node: &str, pod: &HoldingPod) -> bool {
        self.lock()
            .evicted
            .entry(node.to_owned())
            .or_default()
            .insert(pod.key())
    }

    /// Forgets that `pod` on `node` was evicted, so it is asked again (the
    /// request failed).
    pub fn eviction_failed(&self, node: &str, pod: &HoldingPod) {
        if let Some(pods) = self.lock().evicted.get_mut(node) {
            pods.remove(&pod.key());
        }
    }

    /// Sets (or with `None` clears) `node`'s note; true when it changed.
    pub fn note(&self, node: &str, note: Option<RolloutBlock>) -> bool {
        let mut ledger = self.lock();
        match note {
            Some(note) => ledger.notes.insert(node.to_owned(), note.clone()).as_ref() != Some(&note),
            None => ledger.notes.remove(node).is_some(),
        }
    }

    /// Every node's note.
    pub fn notes(&self) -> HashMap<String, RolloutBlock> {
        self.lock().notes.clone()
    }

    /// Nodes counted busy now (for tests and logs).
    pub fn busy_count(&self, now: Instant) -> usize {
        self.lock().busy_nodes(now).len()
    }
}

#[cfg(test)]
mod tests;
