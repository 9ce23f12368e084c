//! GetPreferredAllocation: which VFs a container should get.
//!
//! For one container request (available IDs, must-include IDs, size):
//!
//! 1. every must-include ID is taken, first, in the kubelet's order;
//! 2. the rest come from one NUMA node when one can supply them all: the
//!    node the must-include VFs are on if they share one, else the node
//!    with the most candidates (`spread`) or the fewest that still fit
//!    (`pack`, best fit: keeps big nodes whole). VFs whose NUMA node the
//!    kernel does not know form a node of their own. When no node can,
//!    nodes are used in that order until the size is met;
//! 3. within a node, `spread` takes each next VF from the PF holding the
//!    fewest of this container's VFs (ties: the PF with the most left, then
//!    the lowest address); `pack` fills the PF already holding the most,
//!    else one that can take the rest alone (the one with the fewest free
//!    VFs that does), before the next.
//!
//! Only IDs this pool knows and reports Healthy are candidates; the answer
//! is shorter than the size when there are not enough. VFs awaiting their
//! scrub (handed out before, not yet scrubbed: Allocate would wait for
//! the agent) are taken, by the same rules, only when the others do not
//! suffice.

use std::collections::{BTreeMap, BTreeSet};

use vfplane_host::PciAddress;
use vfplane_proto::pool::AllocationPolicy;

use crate::inventory::PoolView;

#[derive(Debug, Clone, Copy)]
struct Candidate {
    address: PciAddress,
    numa: Option<u32>,
    pf: Option<PciAddress>,
}

/// The preferred IDs for one container.
pub fn preferred_allocation(
    view: &PoolView,
    policy: AllocationPolicy,
    available: &[String],
    must_include: &[String],
    size: usize,
    awaiting_scrub: &dyn Fn(PciAddress) -> bool,
) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    for id in must_include {
        if !chosen.contains(id) {
            chosen.push(id.clone());
        }
    }
    if chosen.len() >= size {
        return chosen;
    }
    let lookup = |id: &str| -> Option<Candidate> {
        let address: PciAddress = id.parse().ok()?;
        let device = view.get(address)?;
        Some(Candidate {
            address,
            numa: device.facts.as_ref().and_then(|f| f.numa_node),
            pf: device.facts.as_ref().and_then(|f| f.pf),
        })
    };
    let mut pf_load: BTreeMap<Option<PciAddress>, usize> = BTreeMap::new();
    let mut must_nodes: BTreeSet<Option<u32>> = BTreeSet::new();
    for id in &chosen {
        if let Some(c) = lookup(id) {
            *pf_load.entry(c.pf).or_default() += 1;
            must_nodes.insert(c.numa);
        }
    }
    let mut seen = BTreeSet::new();
    // Clean VFs first, then those awaiting their scrub.
    let mut tiers: [BTreeMap<Option<u32>, Vec<Candidate>>; 2] = Default::default();
    for id in available {
        if chosen.contains(id) || !seen.insert(id.as_str()) {
            continue;
        }
        let Some(candidate) = lookup(id) else { continue };
        if view.get(candidate.address).is_some_and(|d| d.health.is_healthy()) {
            let tier = usize::from(awaiting_scrub(candidate.address));
            tiers[tier].entry(candidate.numa).or_default().push(candidate);
        }
    }
    for mut by_node in tiers {
        let need = size.saturating_sub(chosen.len());
        if need == 0 {
            break;
        }
        let nodes = node_order(&by_node, &must_nodes, need, policy);
        let mut remaining = need;
        for node in nodes {
            if remaining == 0 {
                break;
            }
            let candidates = by_node.remove(&node).unwrap_or_default();
            let picked = pick_within_node(candidates, remaining, &mut pf_load, policy);
            remaining -= picked.len();
            chosen.extend(picked.into_iter().map(|c| c.address.to_string()));
        }
    }
    chosen
}

/// The order NUMA nodes are drawn from (module docs, step 2).
fn node_order(
    by_node: &BTreeMap<Option<u32>, Vec<Candidate>>,
    must_nodes: &BTreeSet<Option<u32>>,
    need: usize,
    policy: AllocationPolicy,
) -> Vec<Option<u32>> {
    let count = |node: &Option<u32>| by_node.get(node).map_or(0, Vec::len);
    let mut nodes: Vec<Option<u32>> = by_node.keys().copied().collect();
    // Unknown NUMA (None) sorts last among equals.
    let node_key = |node: &Option<u32>| (node.is_none(), *node);
    if must_nodes.len() == 1
        && let Some(node) = must_nodes.iter().next()
        && count(node) >= need
    {
        let node = *node;
        nodes.retain(|n| *n != node);
        nodes.sort_by_key(|n| (std::cmp::Reverse(count(n)), node_key(n)));
        nodes.insert(0, node);
        return nodes;
    }
    let fits: Vec<Option<u32>> = nodes.iter().copied().filter(|n| count(n) >= need).collect();
    let best = match policy {
        AllocationPolicy::Spread => fits
            .iter()
            .copied()
            .min_by_key(|n| (std::cmp::Reverse(count(n)), node_key(n))),
        AllocationPolicy::Pack => fits.iter().copied().min_by_key(|n| (count(n), node_key(n))),
    };
    // Without one node that fits: the must-include nodes first, then the
    // biggest, so the container spans as few nodes as possible.
    nodes.sort_by_key(|n| (!must_nodes.contains(n), std::cmp::Reverse(count(n)), node_key(n)));
    if let Some(best) = best {
        nodes.retain(|n| *n != best);
        nodes.insert(0, best);
    }
    nodes
}

/// Picks up to `need` VFs of one node by the PF policy (module docs, step 3).
fn pick_within_node(
    mut candidates: Vec<Candidate>,
    need: usize,
    pf_load: &mut BTreeMap<Option<PciAddress>, usize>,
    policy: AllocationPolicy,
) -> Vec<Candidate> {
    candidates.sort_by_key(|c| c.address);
    let mut picked = Vec::new();
    while picked.len() < need && !candidates.is_empty() {
        let mut free: BTreeMap<Option<PciAddress>, usize> = BTreeMap::new();
        for c in &candidates {
            *free.entry(c.pf).or_default() += 1;
        }
        let still = need - picked.len();
        let load = |pf: &Option<PciAddress>| pf_load.get(pf).copied().unwrap_or(0);
        let pf = match policy {
            AllocationPolicy::Spread => free
                .iter()
                .min_by_key(|(pf, n)| (load(pf), std::cmp::Reverse(**n), **pf))
                .map(|(pf, _)| *pf),
            AllocationPolicy::Pack => free
                .iter()
                .min_by_key(|(pf, n)| {
                    let fits = **n >= still;
                    (
                        std::cmp::Reverse(load(pf)),
                        !fits,
                        if fits { **n } else { usize::MAX - **n },
                        **pf,
                    )
                })
                .map(|(pf, _)| *pf),
        };
        let Some(pf) = pf else { break };
        let Some(index) = candidates.iter().position(|c| c.pf == pf) else {
            break;
        };
        let candidate = candidates.remove(index);
        *pf_load.entry(pf).or_default() += 1;
        picked.push(candidate);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{Health, Unready};
    use crate::inventory::{DeviceStatus, VfFacts};

    /// (address, pf, numa, healthy)
    fn view(devices: &[(&str, &str, Option<u32>, bool)]) -> PoolView {
        let mut devices: Vec<DeviceStatus> = devices
            .iter()
            .map(|(address, pf, numa, healthy)| DeviceStatus {
                address: address.parse().unwrap(),
                facts: Some(VfFacts {
                    address: address.parse().unwrap(),
                    pf: Some(pf.parse().unwrap()),
                    vf_index: Some(0),
                    numa_node: *numa,
                    numa_cpus: None,
                    vendor: "8086".into(),
                    device: "10ca".into(),
                    group: None,
                    device_dir: vfplane_host::Host::new("/nonexistent", "/nonexistent")
                        .resolve_device(address.parse().unwrap()),
                }),
                health: if *healthy {
                    Health::default()
                } else {
                    Health {
                        reasons: vec![Unready::Gone],
                    }
                },
                vfio_node: None,
                mac: None,
            })
            .collect();
        devices.sort_by_key(|d| d.address);
        PoolView { devices }
    }

    const A: &str = "0000:01:00.0";
    const B: &str = "0000:02:00.0";
    const C: &str = "0000:81:00.0";

    /// Two PFs (A, B) on NUMA 0 with 3 VFs each, one PF (C) on NUMA 1 with 4.
    fn node() -> PoolView {
        view(&[
            ("0000:01:10.0", A, Some(0), true),
            ("0000:01:10.2", A, Some(0), true),
            ("0000:01:10.4", A, Some(0), true),
            ("0000:02:10.0", B, Some(0), true),
            ("0000:02:10.2", B, Some(0), true),
            ("0000:02:10.4", B, Some(0), true),
            ("0000:81:10.0", C, Some(1), true),
            ("0000:81:10.2", C, Some(1), true),
            ("0000:81:10.4", C, Some(1), true),
            ("0000:81:10.6", C, Some(1), true),
        ])
    }

    fn all(view: &PoolView) -> Vec<String> {
        view.devices.iter().map(|d| d.address.to_string()).collect()
    }

    fn numa_of(view: &PoolView, ids: &[String]) -> BTreeSet<Option<u32>> {
        ids.iter()
            .map(|id| {
                view.get(id.parse().unwrap())
                    .and_then(|d| d.facts.as_ref().unwrap().numa_node)
            })
            .collect()
    }

    #[test]
    fn spread_stays_on_one_node_and_alternates_pfs() {
        let v = node();
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 4, &|_| false);
        assert_eq!(got.len(), 4);
        assert_eq!(numa_of(&v, &got).len(), 1, "{got:?}");
        // Both nodes fit 4 (node 0 has 6): spread picks the node with the most.
        assert_eq!(numa_of(&v, &got), BTreeSet::from([Some(0)]));
        let on_a = got.iter().filter(|id| id.starts_with("0000:01")).count();
        assert_eq!(on_a, 2, "two per PF: {got:?}");
    }

    #[test]
    fn pack_fills_one_pf_of_the_best_fitting_node() {
        let v = node();
        let got = preferred_allocation(&v, AllocationPolicy::Pack, &all(&v), &[], 3, &|_| false);
        // Node 1 (4 VFs) is the best fit for 3; all on PF C.
        assert_eq!(got, ["0000:81:10.0", "0000:81:10.2", "0000:81:10.4"]);
        let got = preferred_allocation(&v, AllocationPolicy::Pack, &all(&v), &[], 5, &|_| false);
        // Only node 0 fits 5: one PF filled (3), then the other.
        assert_eq!(numa_of(&v, &got), BTreeSet::from([Some(0)]));
        assert_eq!(got[..3], ["0000:01:10.0", "0000:01:10.2", "0000:01:10.4"]);
    }

    #[test]
    fn must_include_comes_first_and_pulls_its_node() {
        let v = node();
        let must = vec!["0000:81:10.6".to_owned()];
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &must, 3, &|_| false);
        assert_eq!(got[0], "0000:81:10.6");
        assert_eq!(got.len(), 3);
        assert_eq!(numa_of(&v, &got), BTreeSet::from([Some(1)]), "{got:?}");
        // must_include alone already meets the size.
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &must, 1, &|_| false);
        assert_eq!(got, must);
    }

    #[test]
    fn spans_nodes_only_when_no_node_fits() {
        let v = node();
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 8, &|_| false);
        assert_eq!(got.len(), 8);
        assert_eq!(numa_of(&v, &got).len(), 2);
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 20, &|_| false);
        assert_eq!(got.len(), 10, "everything available, no more");
    }

    #[test]
    fn unhealthy_unknown_and_duplicate_ids_are_not_candidates() {
        let v = view(&[("0000:01:10.0", A, None, false), ("0000:01:10.2", A, None, true)]);
        let available = vec![
            "0000:01:10.0".to_owned(),
            "0000:01:10.2".to_owned(),
            "0000:01:10.2".to_owned(),
            "0000:09:10.0".to_owned(),
            "junk".to_owned(),
        ];
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &available, &[], 2, &|_| false);
        assert_eq!(got, ["0000:01:10.2"]);
    }

    #[test]
    fn vfs_awaiting_their_scrub_come_only_after_the_clean_ones() {
        let v = node();
        // PF A's VFs await their scrub: node 0 has 3 clean VFs left, node
        // 1 has 4, so spread takes node 1, as if PF A's were not there.
        let dirty = |address: PciAddress| address.to_string().starts_with("0000:01");
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 2, &dirty);
        assert_eq!(got, ["0000:81:10.0", "0000:81:10.2"]);
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 2, &|_| false);
        assert_eq!(
            numa_of(&v, &got),
            BTreeSet::from([Some(0)]),
            "node 0 when all are clean: {got:?}"
        );
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &all(&v), &[], 8, &dirty);
        assert_eq!(got.len(), 8);
        assert!(
            got[..7].iter().all(|id| !id.starts_with("0000:01")),
            "the seven clean VFs first: {got:?}"
        );
        assert!(got[7].starts_with("0000:01"), "{got:?}");
        // Only dirty ones left: they are still offered (Allocate waits).
        let only_dirty: Vec<String> = all(&v)
            .into_iter()
            .filter(|id| id.starts_with("0000:01"))
            .collect();
        let got = preferred_allocation(&v, AllocationPolicy::Spread, &only_dirty, &[], 1, &dirty);
        assert_eq!(got.len(), 1);
    }
}
