//! Kubernetes Events the agent posts, each read off the change between two
//! statuses of the node (so an Event says what the status already says,
//! once, when it becomes true):
//!
//! | reason | type | regarding | when |
//! |---|---|---|---|
//! | `VfContainerLimits` | Warning | the owner's Pod | a VF owner's container has limits that break the pool's profile (new problems only) |
//! | `VfQuarantined` | Warning | the NodeState | a released VF's scrub failed: it is given to nobody |
//! | `VfReleased` | Normal | the NodeState | a quarantined VF's scrub succeeded: it is handed out again |
//!
//! The kube source posts them through kube-runtime's event recorder
//! (`events.k8s.io/v1`; RBAC: create and patch `events`), which folds
//! repeats into a series. An agent restart posts what is true at its first
//! status again.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource as _;
use vfplane_proto::node_state::{NodeState, NodeStateStatus, VfStatus};
use vfplane_proto::vf_health::VfHealth;

/// One Event to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfEvent {
    /// Limits of a VF owner's container break the pool's profile.
    ContainerLimits {
        /// The VF.
        vf: String,
        /// The owner: namespace, pod, container.
        namespace: String,
        /// Its pod.
        pod: String,
        /// Its pod's UID, when known.
        pod_uid: Option<String>,
        /// Its container.
        container: String,
        /// The problems not posted before, as the status says them.
        problems: Vec<String>,
    },
    /// A scrub failed: the VF is quarantined.
    Quarantined {
        /// The VF.
        vf: String,
        /// Why, as the status says it.
        why: String,
    },
    /// A quarantined VF was scrubbed: handed out again.
    Released {
        /// The VF.
        vf: String,
    },
}

impl VfEvent {
    /// `Warning` or `Normal`.
    pub fn is_warning(&self) -> bool {
        !matches!(self, Self::Released { .. })
    }

    /// The Event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ContainerLimits { .. } => "VfContainerLimits",
            Self::Quarantined { .. } => "VfQuarantined",
            Self::Released { .. } => "VfReleased",
        }
    }

    /// The Event's action.
    pub fn action(&self) -> &'static str {
        match self {
            Self::ContainerLimits { .. } => "CheckLimits",
            Self::Quarantined { .. } | Self::Released { .. } => "Scrub",
        }
    }

    /// The Event's note, a sentence naming the VF.
    pub fn note(&self) -> String {
        match self {
            Self::ContainerLimits {
                vf,
                container,
                problems,
                ..
            } => format!(
                "container {container} holding VF {vf} runs outside its pool's containerProfile: {}",
                problems.join("; ")
            ),
            Self::Quarantined { vf, why } => {
                format!("VF {vf} is quarantined, given to no pod until a scrub succeeds: {why}")
            }
            Self::Released { vf } => format!("VF {vf} was scrubbed and is handed out again"),
        }
    }

    /// What the Event is about: the owner's Pod, or the node's NodeState
    /// (`node`, `uid`).
    pub fn regarding(&self, node: &str, uid: Option<&str>) -> ObjectReference {
        match self {
            Self::ContainerLimits {
                namespace,
                pod,
                pod_uid,
                ..
            } => ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                namespace: Some(namespace.clone()),
                name: Some(pod.clone()),
                uid: pod_uid.clone(),
                ..ObjectReference::default()
            },
            Self::Quarantined { .. } | Self::Released { .. } => ObjectReference {
                api_version: Some(NodeState::api_version(&()).into_owned()),
                kind: Some(NodeState::kind(&()).into_owned()),
                name: Some(node.to_owned()),
                uid: uid.map(str::to_owned),
                ..ObjectReference::default()
            },
        }
    }
}

fn vfs(status: &NodeStateStatus) -> BTreeMap<&str, &VfStatus> {
    status
        .pfs
        .iter()
        .flat_map(|pf| pf.vfs.iter())
        .map(|vf| (vf.pci_address.as_str(), vf))
        .collect()
}

/// The Events the change from `previous` (`None`: the agent's first
/// status) to `current` calls for.
pub fn between(previous: Option<&NodeStateStatus>, current: &NodeStateStatus) -> Vec<VfEvent> {
    let before = previous.map(vfs).unwrap_or_default();
    let mut events = Vec::new();
    for (address, vf) in vfs(current) {
        let was = before.get(address);
        let quarantined = |v: &VfStatus| matches!(v.health, VfHealth::Quarantined(_));
        if let VfHealth::Quarantined(why) = &vf.health
            && !was.is_some_and(|w| quarantined(w))
        {
            events.push(VfEvent::Quarantined {
                vf: address.to_owned(),
                why: why.clone(),
            });
        }
        if vf.health.is_healthy() && was.is_some_and(|w| quarantined(w)) {
            events.push(VfEvent::Released {
                vf: address.to_owned(),
            });
        }
        let (Some(container), Some((namespace, pod, name))) = (&vf.container, vf.owner_parts()) else {
            continue;
        };
        let posted: &[String] = was
            .and_then(|w| w.container.as_ref())
            .filter(|c| c.id == container.id)
            .map_or(&[], |c| c.problems.as_slice());
        let new: Vec<String> = container
            .problems
            .iter()
            .filter(|p| !posted.contains(p))
            .cloned()
            .collect();
        if !new.is_empty() {
            events.push(VfEvent::ContainerLimits {
                vf: address.to_owned(),
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                pod_uid: vf.owner_pod_uid.clone(),
                container: name.to_owned(),
                problems: new,
            });
        }
    }
    events
}

#[cfg(test)]
mod tests;
