//! What the webhook checks in a `VfPolicy` beyond its schema and CEL rules:
//! VF ranges that overlap or reach past `numVfs`, PFs named twice, malformed
//! `pfNames` / `pciAddresses` entries, the extended-resource name, and
//! `numVfs` against what the matched PFs report.

use std::collections::BTreeMap;

use vfplane_proto::pci::PciAddress;
use vfplane_proto::pool::{RESOURCE_DOMAIN, validate_pool_name};
use vfplane_proto::vf_policy::VfPolicySpec;
use vfplane_proto::vf_range::{PfNameSelector, format_vf_range};

use super::ClusterView;
use vfplane_proto::quantity::parse_quantity;

/// At most this many PFs are named in one "numVfs is more than ..." problem
/// list; the rest are counted.
const MAX_PFS_NAMED: usize = 10;

/// Every problem with a policy spec, each a sentence naming the field. Empty
/// when the policy is acceptable.
pub fn policy_problems(spec: &VfPolicySpec, view: &dyn ClusterView) -> Vec<String> {
    let mut problems = Vec::new();
    resource_name_problems(&spec.resource_name, &mut problems);
    pf_name_problems(&spec.nic_selector.pf_names, spec.num_vfs, &mut problems);
    pci_address_problems(&spec.nic_selector.pci_addresses, &mut problems);
    profile_problems(spec, &mut problems);
    total_vfs_problems(spec, view, &mut problems);
    problems
}

/// Profile quantities the pod webhook will have to read.
fn profile_problems(spec: &VfPolicySpec, problems: &mut Vec<String>) {
    let Some(profile) = &spec.container_profile else {
        return;
    };
    for (field, value) in [
        ("cpu", &profile.cpu),
        ("memory", &profile.memory),
        ("hugepages", &profile.hugepages),
        ("lockedMemory", &profile.locked_memory),
    ] {
        if let Some(text) = value
            && let Err(error) = parse_quantity(text)
        {
            problems.push(format!("spec.containerProfile.{field}: {error}"));
        }
    }
}

fn resource_name_problems(name: &str, problems: &mut Vec<String>) {
    if let Err(error) = validate_pool_name(name) {
        problems.push(format!("spec.resourceName {name:?}: {error}"));
        return;
    }
    let full = format!("{RESOURCE_DOMAIN}/{name}");
    if let Err(error) = validate_qualified_name(&full) {
        problems.push(format!(
            "spec.resourceName {name:?}: {full} is not a valid extended resource name: {error}"
        ));
    }
}

/// Checks a Kubernetes qualified name (`prefix/name`): the optional prefix a
/// DNS-1123 subdomain of at most 253 characters, the name at most 63
/// characters of letters, digits, `-`, `_` and `.`, alphanumeric at both
/// ends.
///
/// # Errors
/// A sentence saying which part is wrong and why.
pub fn validate_qualified_name(text: &str) -> Result<(), String> {
    let (prefix, name) = match text.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, text),
    };
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 {
            return Err(format!("the prefix {prefix:?} must have 1 to 253 characters"));
        }
        for label in prefix.split('.') {
            let ok = !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
            if !ok {
                return Err(format!("the prefix {prefix:?} is not a DNS subdomain"));
            }
        }
    }
    if name.is_empty() {
        return Err("the name part is empty".to_owned());
    }
    if name.len() > 63 {
        return Err(format!(
            "the name part has {} characters; at most 63 are allowed",
            name.len()
        ));
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge(name.bytes().next()) || !edge(name.bytes().last()) {
        return Err("the name part must start and end with a letter or digit".to_owned());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("the name part may not contain {bad:?}"));
    }
    Ok(())
}

/// One parsed `pfNames` entry and where it was.
struct Entry<'a> {
    index: usize,
    text: &'a str,
    vfs: Option<Vec<u16>>,
}

fn pf_name_problems(entries: &[String], num_vfs: u16, problems: &mut Vec<String>) {
    let mut by_pf: BTreeMap<String, Vec<Entry<'_>>> = BTreeMap::new();
    for (index, text) in entries.iter().enumerate() {
        match PfNameSelector::parse(text) {
            Ok(selector) => {
                if let Some(vfs) = &selector.vfs {
                    let beyond: Vec<u16> = vfs.iter().copied().filter(|&vf| vf >= num_vfs).collect();
                    if !beyond.is_empty() {
                        problems.push(format!(
                            "spec.nicSelector.pfNames[{index}] {text:?}: VF {} is beyond numVfs {num_vfs} (the policy creates VFs {})",
                            format_vf_range(beyond),
                            vf_span(num_vfs),
                        ));
                    }
                }
                by_pf.entry(selector.name).or_default().push(Entry {
                    index,
                    text,
                    vfs: selector.vfs,
                });
            }
            Err(error) => problems.push(format!(
                "spec.nicSelector.pfNames[{index}]: {}",
                vfplane_proto::error_chain(&error)
            )),
        }
    }
    for (pf, entries) in &by_pf {
        for (i, a) in entries.iter().enumerate() {
            for b in &entries[i + 1..] {
                if let Some(problem) = overlap(pf, a, b) {
                    problems.push(problem);
                }
            }
        }
    }
}

fn vf_span(num_vfs: u16) -> String {
    match num_vfs {
        0 => "none".to_owned(),
        1 => "0".to_owned(),
        n => format!("0-{}", n - 1),
    }
}

/// The problem with two entries for one PF, if they claim a VF in common.
fn overlap(pf: &str, a: &Entry<'_>, b: &Entry<'_>) -> Option<String> {
    let both = format!(
        "spec.nicSelector.pfNames[{}] {:?} and pfNames[{}] {:?}",
        a.index, a.text, b.index, b.text
    );
    match (&a.vfs, &b.vfs) {
        (Some(x), Some(y)) => {
            let common = common_vfs(x, y);
            (!common.is_empty())
                .then(|| format!("{both} overlap: both take VF {} of {pf}", format_vf_range(common)))
        }
        (None, None) => Some(format!("{both} name the same PF {pf} twice")),
        _ => Some(format!(
            "{both} overlap: an entry without a VF range takes every VF of {pf}"
        )),
    }
}

/// VF indexes in both sorted lists.
pub(crate) fn common_vfs(a: &[u16], b: &[u16]) -> Vec<u16> {
    let (mut i, mut j) = (0, 0);
    let mut common = Vec::new();
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        match x.cmp(&y) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common.push(x);
                i += 1;
                j += 1;
            }
        }
    }
    common
}

fn pci_address_problems(entries: &[String], problems: &mut Vec<String>) {
    let mut seen: BTreeMap<PciAddress, usize> = BTreeMap::new();
    for (index, text) in entries.iter().enumerate() {
        match text.parse::<PciAddress>() {
            Ok(address) => {
                if let Some(first) = seen.insert(address, index) {
                    problems.push(format!(
                        "spec.nicSelector.pciAddresses[{index}] {text:?} names PF {address} again (already pciAddresses[{first}])"
                    ));
                    seen.insert(address, first);
                }
            }
            Err(error) => problems.push(format!("spec.nicSelector.pciAddresses[{index}]: {error}")),
        }
    }
}

fn total_vfs_problems(spec: &VfPolicySpec, view: &dyn ClusterView, problems: &mut Vec<String>) {
    let mut short: Vec<_> = view
        .selected_pfs(spec)
        .into_iter()
        .filter(|pf| spec.num_vfs > pf.total_vfs)
        .collect();
    short.sort_by(|a, b| (&a.node, &a.pci_address).cmp(&(&b.node, &b.pci_address)));
    let named = short.len().min(MAX_PFS_NAMED);
    for pf in &short[..named] {
        let name = pf.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        problems.push(format!(
            "spec.numVfs: numVfs {} is more than node {} PF {}{name} offers (totalVfs {})",
            spec.num_vfs, pf.node, pf.pci_address, pf.total_vfs
        ));
    }
    if short.len() > named {
        problems.push(format!(
            "spec.numVfs: and {} more PFs offer fewer than {} VFs",
            short.len() - named,
            spec.num_vfs
        ));
    }
}

#[cfg(test)]
mod tests {
    use vfplane_proto::vf_policy::{ContainerProfile, NicSelector};

    use super::*;
    use crate::webhook::SelectedPf;

    struct View(Vec<SelectedPf>);

    impl ClusterView for View {
        fn selected_pfs(&self, _: &VfPolicySpec) -> Vec<SelectedPf> {
            self.0.clone()
        }
        fn container_profile(&self, _: &str) -> Option<ContainerProfile> {
            None
        }
        fn dra_pools(&self) -> Vec<String> {
            Vec::new()
        }
    }

    fn spec(pf_names: &[&str], num_vfs: u16) -> VfPolicySpec {
        VfPolicySpec {
            node_selector: BTreeMap::new(),
            nic_selector: NicSelector {
                pf_names: pf_names.iter().map(|s| (*s).to_owned()).collect(),
                ..NicSelector::default()
            },
            num_vfs,
            device_type: Default::default(),
            resource_name: "fast".to_owned(),
            priority: 10,
            mtu: None,
            vlan: 0,
            spoof_chk: true,
            trust: false,
            max_tx_rate_mbps: 0,
            allow_no_iommu: false,
            container_profile: None,
            resource_api: Default::default(),
            rollout: None,
        }
    }

    fn problems(pf_names: &[&str], num_vfs: u16) -> Vec<String> {
        policy_problems(&spec(pf_names, num_vfs), &View(Vec::new()))
    }

    #[test]
    fn common_vfs_of_sorted_lists() {
        assert_eq!(common_vfs(&[0, 1, 2, 3], &[2, 3, 4, 5]), [2, 3]);
        assert_eq!(common_vfs(&[0, 1], &[2, 3]), [] as [u16; 0]);
        assert_eq!(common_vfs(&[0, 2, 4, 6], &[1, 2, 3, 6, 7]), [2, 6]);
        assert_eq!(common_vfs(&[], &[1]), [] as [u16; 0]);
    }

    #[test]
    fn overlapping_ranges_on_one_pf_are_refused() {
        let found = problems(&["ens1f0#0-3", "ens1f0#2-5"], 8);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("overlap: both take VF 2-3 of ens1f0"),
            "{found:?}"
        );
        assert!(found[0].contains("pfNames[0] \"ens1f0#0-3\" and pfNames[1] \"ens1f0#2-5\""));
    }

    #[test]
    fn disjoint_ranges_and_other_pfs_pass() {
        assert!(problems(&["ens1f0#0-3", "ens1f0#4-7", "ens1f1#0-3"], 8).is_empty());
        assert!(problems(&["ens1f0#0-1,6", "ens1f0#2-5,7"], 8).is_empty());
        assert!(problems(&["ens1f0", "ens1f1"], 8).is_empty());
    }

    #[test]
    fn a_pf_named_twice_or_whole_and_ranged_is_refused() {
        let twice = problems(&["ens1f0", "ens1f0"], 4);
        assert!(twice[0].contains("same PF ens1f0 twice"), "{twice:?}");
        let mixed = problems(&["ens1f0#0-1", "ens1f0"], 4);
        assert!(mixed[0].contains("without a VF range"), "{mixed:?}");
    }

    #[test]
    fn ranges_at_or_past_num_vfs_are_refused() {
        let found = problems(&["ens1f0#2-5"], 4);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("VF 4-5 is beyond numVfs 4 (the policy creates VFs 0-3)"),
            "{found:?}"
        );
        assert!(problems(&["ens1f0#0-3"], 4).is_empty());
        assert!(problems(&["ens1f0#1"], 1)[0].contains("creates VFs 0)"));
    }

    #[test]
    fn every_problem_is_reported_not_only_the_first() {
        let mut s = spec(&["ens1f0#0-3", "ens1f0#3", "#1", "eth0#9"], 4);
        s.resource_name = "-bad".to_owned();
        let found = policy_problems(&s, &View(Vec::new()));
        assert_eq!(found.len(), 4, "{found:?}");
    }

    #[test]
    fn qualified_names() {
        assert!(validate_qualified_name("vfplane.io/fast").is_ok());
        assert!(validate_qualified_name("vfplane.io/fast_lane.v2").is_ok());
        assert!(validate_qualified_name(&format!("vfplane.io/{}", "a".repeat(63))).is_ok());
        assert!(validate_qualified_name(&format!("vfplane.io/{}", "a".repeat(64))).is_err());
        assert!(validate_qualified_name("Vfplane.io/fast").is_err());
        assert!(validate_qualified_name("vfplane.io/fast-").is_err());
        assert!(validate_qualified_name("vfplane.io/").is_err());
        assert!(validate_qualified_name("vfplane.io/a/b").is_err());
    }

    #[test]
    fn total_vfs_names_at_most_ten_pfs() {
        let pfs = (0..12)
            .map(|i| SelectedPf {
                node: format!("node-{i:02}"),
                pci_address: "0000:3b:00.0".to_owned(),
                name: None,
                total_vfs: 7,
            })
            .collect();
        let found = policy_problems(&spec(&[], 8), &View(pfs));
        assert_eq!(found.len(), 11, "{found:?}");
        assert!(found[0].contains("node node-00 PF 0000:3b:00.0 offers (totalVfs 7)"));
        assert!(found[10].contains("2 more PFs"));
    }
}
