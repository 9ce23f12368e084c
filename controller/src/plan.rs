//! The pure part of the controller: from policies, nodes and what the agents
//! report, what each node's `NodeState.spec` should be, which policies fight
//! over which VFs, and each policy's status. No I/O here.
//!
//! # How policies merge on one PF
//! The policies that select a node (node selector) and one of its PFs (NIC
//! selector, matched against the PF the agent reports in `NodeState.status`)
//! are taken in priority order: lowest `priority` value first, then name.
//! Each claims the VF indexes it names (`pfNames: ["ens1f0#0-3"]`) or, when
//! it names none, every index below its `numVfs`; indexes at or above the
//! PF's `totalVfs` are dropped. A policy keeps the indexes no earlier policy
//! took; where it wanted taken ones, both policies record a conflict. The PF
//! gets the largest `numVfs` of the policies that kept VFs there, and the
//! MTU of the first of them that sets one.
//!
//! # Removal
//! A PF that was in the node's spec and no policy claims any more is written
//! with `numVfs: 0` until the agent reports it has no VFs, then dropped (a
//! PF missing from the spec is left alone by the agent, so dropping it at
//! once would leave its VFs behind).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use vfplane_proto::container_limits::ContainerLimits;
use vfplane_proto::node_state::{
    Condition, DeviceType, NodeState, NodeStateSpec, PfSpec, PfStatus, VfGroupSpec,
};
use vfplane_proto::vf_policy::{ContainerProfile, PolicyConflict, VfPolicy, VfPolicySpec, VfPolicyStatus};
use vfplane_proto::vf_range::{PfNameSelector, format_vf_range};

/// What one policy ends up with on one PF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The policy.
    pub policy: String,
    /// The PF's PCI address.
    pub pf: String,
    /// VF indexes the policy keeps.
    pub kept: BTreeSet<u16>,
}

/// The desired state of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodePlan {
    /// The node.
    pub node: String,
    /// Its `NodeState.spec`.
    pub spec: NodeStateSpec,
    /// What each selecting policy keeps, PF by PF.
    pub claims: Vec<Claim>,
    /// Conflicts, by the policy that records them.
    pub conflicts: Vec<(String, PolicyConflict)>,
    /// Policies whose NIC selector matched a PF here.
    pub matched_policies: BTreeSet<String>,
}

/// Whether a policy is on its way out (it no longer claims VFs).
pub fn is_deleting(policy: &VfPolicy) -> bool {
    policy.metadata.deletion_timestamp.is_some()
}

/// Whether `node` carries every label of the policy's node selector.
pub fn selects_node(spec: &VfPolicySpec, node: &Node) -> bool {
    let labels = node.labels();
    spec.node_selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// Whether the policy's NIC selector matches `pf`, and the VF indexes it
/// names there (`None`: all it creates).
pub fn selects_pf(spec: &VfPolicySpec, pf: &PfStatus) -> Option<Option<Vec<u16>>> {
    let nic = &spec.nic_selector;
    if let Some(vendor) = &nic.vendor
        && !vendor.eq_ignore_ascii_case(&pf.vendor)
    {
        return None;
    }
    if let Some(device) = &nic.device_id
        && !device.eq_ignore_ascii_case(&pf.device)
    {
        return None;
    }
    if !nic.pci_addresses.is_empty()
        && !nic
            .pci_addresses
            .iter()
            .any(|a| same_pci_address(a, &pf.pci_address))
    {
        return None;
    }
    if nic.pf_names.is_empty() {
        return Some(None);
    }
    let name = pf.name.as_deref()?;
    // Several entries for one PF (the webhook refuses overlaps) add up.
    let mut found = false;
    let mut vfs: Option<BTreeSet<u16>> = Some(BTreeSet::new());
    for entry in &nic.pf_names {
        let Ok(selector) = PfNameSelector::parse(entry) else {
            continue;
        };
        if selector.name != name {
            continue;
        }
        found = true;
        match (selector.vfs, vfs.as_mut()) {
            (Some(indexes), Some(all)) => all.extend(indexes),
            _ => vfs = None,
        }
    }
    found.then(|| vfs.map(|v| v.into_iter().collect()))
}

fn same_pci_address(a: &str, b: &str) -> bool {
    let normal = |s: &str| {
        let s = s.trim().to_ascii_lowercase();
        // `3b:00.0` is short for `0000:3b:00.0`.
        if s.matches(':').count() == 1 {
            format!("0000:{s}")
        } else {
            s
        }
    };
    normal(a) == normal(b)
}

/// Live policies in merge order: lowest priority value first, then name.
pub fn merge_order<'a>(policies: impl IntoIterator<Item = &'a VfPolicy>) -> Vec<&'a VfPolicy> {
    let mut live: Vec<&VfPolicy> = policies.into_iter().filter(|p| !is_deleting(p)).collect();
    live.sort_by_key(|p| (p.spec.priority, p.name_any()));
    live
}

/// The desired state of `node`. `ordered` comes from [`merge_order`];
/// `state` is the node's current NodeState, if any.
pub fn plan_node(node: &Node, ordered: &[&VfPolicy], state: Option<&NodeState>) -> NodePlan {
    let node_name = node.name_any();
    let profiles = pool_profiles(ordered.iter().copied());
    let selecting: Vec<&VfPolicy> = ordered
        .iter()
        .copied()
        .filter(|p| selects_node(&p.spec, node))
        .collect();
    let reported: &[PfStatus] = state
        .and_then(|s| s.status.as_ref())
        .map_or(&[], |s| s.pfs.as_slice());

    let mut pfs = Vec::new();
    let mut claims = Vec::new();
    let mut conflicts = Vec::new();
    let mut matched = BTreeSet::new();
    let mut allow_no_iommu = false;
    for pf in reported {
        // Index -> the policy holding it.
        let mut owner: BTreeMap<u16, &str> = BTreeMap::new();
        let mut groups = Vec::new();
        let mut num_vfs = 0u16;
        let mut mtu = None;
        for policy in &selecting {
            let Some(named) = selects_pf(&policy.spec, pf) else {
                continue;
            };
            let name = policy.metadata.name.as_deref().unwrap_or_default();
            matched.insert(name.to_owned());
            let limit = policy.spec.num_vfs.min(pf.total_vfs);
            let wanted: BTreeSet<u16> = match named {
                Some(indexes) => indexes.into_iter().filter(|&i| i < limit).collect(),
                None => (0..limit).collect(),
            };
            let mut lost: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
            let mut kept = BTreeSet::new();
            for index in wanted {
                match owner.get(&index) {
                    Some(&winner) => {
                        lost.entry(winner).or_default().insert(index);
                    }
                    None => {
                        kept.insert(index);
                    }
                }
            }
            for (winner, indexes) in lost {
                let vfs = format_vf_range(indexes.iter().copied());
                conflicts.push((
                    name.to_owned(),
                    PolicyConflict {
                        node: node_name.clone(),
                        pf: pf.pci_address.clone(),
                        policy: winner.to_owned(),
                        won: false,
                        vfs: vfs.clone(),
                    },
                ));
                conflicts.push((
                    winner.to_owned(),
                    PolicyConflict {
                        node: node_name.clone(),
                        pf: pf.pci_address.clone(),
                        policy: name.to_owned(),
                        won: true,
                        vfs,
                    },
                ));
            }
            if kept.is_empty() {
                continue;
            }
            for &index in &kept {
                owner.insert(index, name);
            }
            num_vfs = num_vfs.max(limit);
            mtu = mtu.or(policy.spec.mtu);
            allow_no_iommu |= policy.spec.allow_no_iommu;
            groups.push(VfGroupSpec {
                resource_name: policy.spec.resource_name.clone(),
                vf_range: format_vf_range(kept.iter().copied()),
                device_type: policy.spec.device_type,
                vlan: policy.spec.vlan,
                spoof_chk: policy.spec.spoof_chk,
                trust: policy.spec.trust,
                max_tx_rate_mbps: policy.spec.max_tx_rate_mbps,
                link_state: None,
                macs: Vec::new(),
                container_limits: container_limits(profiles.get(&policy.spec.resource_name)),
                resource_api: policy.spec.resource_api,
            });
            claims.push(Claim {
                policy: name.to_owned(),
                pf: pf.pci_address.clone(),
                kept,
            });
        }
        if !groups.is_empty() {
            pfs.push(PfSpec {
                pci_address: Some(pf.pci_address.clone()),
                pf_name: None,
                num_vfs,
                mtu,
                force: false,
                vf_groups: groups,
            });
        }
    }

    // PFs this controller configured before and no policy wants now go to
    // zero VFs, and leave the spec once the agent reports zero.
    if let Some(current) = state {
        for old in &current.spec.pfs {
            let Some(address) = old.pci_address.as_deref() else {
                continue;
            };
            if pfs.iter().any(|p| p.pci_address.as_deref() == Some(address)) {
                continue;
            }
            let now = reported.iter().find(|p| p.pci_address == address);
            if now.is_some_and(|p| p.num_vfs > 0) {
                pfs.push(PfSpec {
                    pci_address: Some(address.to_owned()),
                    num_vfs: 0,
                    ..PfSpec::default()
                });
            }
        }
    }
    pfs.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
    conflicts.sort();
    let pools: BTreeSet<String> = selecting
        .iter()
        // Only device-plugin pools: they are served at 0 so the kubelet
        // knows the resource; a DRA pool without VFs is simply no devices.
        .filter(|p| p.spec.device_type == DeviceType::VfioPci && p.spec.resource_api.is_device_plugin())
        .map(|p| p.spec.resource_name.clone())
        .collect();
    NodePlan {
        node: node_name,
        spec: NodeStateSpec {
            pfs,
            allow_no_iommu,
            pools: pools.into_iter().collect(),
        },
        claims,
        conflicts,
        matched_policies: matched,
    }
}

/// Whether `node` needs a NodeState at all: some live policy selects it,
/// or it has one already (to wind down what it holds).
pub fn wants_node_state(node: &Node, ordered: &[&VfPolicy], state: Option<&NodeState>) -> bool {
    state.is_some() || ordered.iter().any(|p| selects_node(&p.spec, node))
}

/// A policy's status from the plans of every node. `generation` is the
/// policy's `metadata.generation`.
pub fn policy_status<'a>(
    policy: &VfPolicy,
    plans: impl IntoIterator<Item = (&'a NodePlan, Option<&'a NodeState>)>,
) -> VfPolicyStatus {
    let name = policy.name_any();
    let mut status = VfPolicyStatus {
        observed_generation: policy.metadata.generation,
        ..VfPolicyStatus::default()
    };
    for (plan, state) in plans {
        if plan.matched_policies.contains(&name) {
            status.matched_nodes += 1;
        }
        for claim in plan.claims.iter().filter(|c| c.policy == name) {
            status.requested_vfs += claim.kept.len() as u32;
            status.ready_vfs += ready_vfs(state, &claim.pf, &claim.kept, &policy.spec.resource_name);
        }
        status.conflicts.extend(
            plan.conflicts
                .iter()
                .filter(|(holder, _)| *holder == name)
                .map(|(_, c)| c.clone()),
        );
    }
    status.conflicts.sort();
    let ready = if status.requested_vfs == 0 {
        condition(
            "Ready",
            "False",
            "NothingSelected",
            "no node and PF match the policy yet",
        )
    } else if status.ready_vfs == status.requested_vfs {
        condition(
            "Ready",
            "True",
            "AllVfsReady",
            &format!("{} VFs ready on {} nodes", status.ready_vfs, status.matched_nodes),
        )
    } else {
        condition(
            "Ready",
            "False",
            "VfsNotReady",
            &format!("{} of {} VFs ready", status.ready_vfs, status.requested_vfs),
        )
    };
    let lost: Vec<&PolicyConflict> = status.conflicts.iter().filter(|c| !c.won).collect();
    let conflicted = if let Some(first) = lost.first() {
        condition(
            "Conflicted",
            "True",
            "LostToHigherPriority",
            &format!(
                "{} conflicts; e.g. VFs {} of {} on {} are held by policy {}",
                lost.len(),
                first.vfs,
                first.pf,
                first.node,
                first.policy
            ),
        )
    } else if let Some(first) = status.conflicts.first() {
        condition(
            "Conflicted",
            "True",
            "WonOverLowerPriority",
            &format!(
                "{} conflicts won; e.g. VFs {} of {} on {} also wanted by policy {}",
                status.conflicts.len(),
                first.vfs,
                first.pf,
                first.node,
                first.policy
            ),
        )
    } else {
        condition(
            "Conflicted",
            "False",
            "NoConflict",
            "no other policy claims these VFs",
        )
    };
    status.conditions = vec![ready, conflicted];
    status
}

/// VFs of `indexes` on `pf` the agent reports present, in `pool` and healthy.
fn ready_vfs(state: Option<&NodeState>, pf: &str, indexes: &BTreeSet<u16>, pool: &str) -> u32 {
    let Some(status) = state.and_then(|s| s.status.as_ref()) else {
        return 0;
    };
    let Some(pf) = status.pfs.iter().find(|p| p.pci_address == pf) else {
        return 0;
    };
    pf.vfs
        .iter()
        .filter(|vf| {
            indexes.contains(&vf.index) && vf.pool.as_deref() == Some(pool) && vf.health.is_healthy()
        })
        .count() as u32
}

/// VFs that still carry a deleted policy's pool on some node although no
/// live policy plans them there: `(node, pf, index)`. The finalizer lets the
/// policy go when this is empty and every agent has caught up.
pub fn leftover_vfs<'a>(
    resource_name: &str,
    plans: impl IntoIterator<Item = (&'a NodePlan, Option<&'a NodeState>)>,
) -> Vec<(String, String, u16)> {
    let mut leftover = Vec::new();
    for (plan, state) in plans {
        let Some(status) = state.and_then(|s| s.status.as_ref()) else {
            continue;
        };
        for pf in &status.pfs {
            let planned: BTreeSet<u16> = plan
                .spec
                .pfs
                .iter()
                .filter(|p| p.pci_address.as_deref() == Some(pf.pci_address.as_str()))
                .flat_map(|p| &p.vf_groups)
                .filter(|g| g.resource_name == resource_name)
                .filter_map(|g| vfplane_proto::vf_range::parse_vf_range(&g.vf_range).ok())
                .flatten()
                .collect();
            for vf in &pf.vfs {
                if vf.pool.as_deref() == Some(resource_name) && !planned.contains(&vf.index) {
                    leftover.push((plan.node.clone(), pf.pci_address.clone(), vf.index));
                }
            }
        }
    }
    leftover
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
    }
}

/// Each pool's profile ([`ContainerProfile::strictest`] of every live
/// policy naming it), the one the pod webhook checks pods against.
pub fn pool_profiles<'a>(
    policies: impl IntoIterator<Item = &'a VfPolicy>,
) -> BTreeMap<String, ContainerProfile> {
    let mut named: BTreeMap<&str, Vec<&ContainerProfile>> = BTreeMap::new();
    for policy in merge_order(policies) {
        if let Some(profile) = &policy.spec.container_profile {
            named
                .entry(policy.spec.resource_name.as_str())
                .or_default()
                .push(profile);
        }
    }
    named
        .into_iter()
        .filter_map(|(pool, profiles)| Some((pool.to_owned(), ContainerProfile::strictest(profiles)?)))
        .collect()
}

/// A pool's profile in numbers. The policy webhook refuses a policy whose
/// quantities do not parse, so an unreadable one (written while the webhook
/// was down) gives no limit, with a warning; the pod webhook refuses the
/// pool's pods, naming the policy's field.
fn container_limits(profile: Option<&ContainerProfile>) -> ContainerLimits {
    let Some(profile) = profile else {
        return ContainerLimits::default();
    };
    profile.limits().unwrap_or_else(|error| {
        tracing::warn!(%error, "a pool's containerProfile does not parse; its VF groups get no limits");
        ContainerLimits::default()
    })
}

#[cfg(test)]
mod tests;
