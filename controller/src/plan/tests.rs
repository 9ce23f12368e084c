#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::Node;
use vfplane_proto::node_state::{NodeState, NodeStateStatus, PfStatus, VfStatus};
use vfplane_proto::vf_policy::VfPolicy;

use super::*;

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    let mut node = Node::default();
    node.metadata.name = Some(name.to_owned());
    node.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    node
}

fn policy(name: &str, spec_yaml: &str) -> VfPolicy {
    let text = format!(
        "apiVersion: vfplane.io/v1alpha1\nkind: VfPolicy\nmetadata:\n  name: {name}\n  generation: 3\nspec:\n{}",
        spec_yaml.lines().map(|l| format!("  {l}\n")).collect::<String>()
    );
    serde_yaml::from_str(&text).expect("test policy parses")
}

fn pf(address: &str, name: &str, total: u16, num: u16) -> PfStatus {
    PfStatus {
        pci_address: address.to_owned(),
        name: Some(name.to_owned()),
        vendor: "8086".to_owned(),
        device: "10c9".to_owned(),
        link: "up".to_owned(),
        total_vfs: total,
        num_vfs: num,
        ..PfStatus::default()
    }
}

fn state(node: &str, pfs: Vec<PfStatus>) -> NodeState {
    let mut state = NodeState::new(node, NodeStateSpec::default());
    state.status = Some(NodeStateStatus {
        pfs,
        iommu_enabled: true,
        ..NodeStateStatus::default()
    });
    state
}

fn healthy(pf: &mut PfStatus, pool: &str, indexes: impl IntoIterator<Item = u16>) {
    for index in indexes {
        pf.vfs.push(VfStatus {
            index,
            pci_address: format!("0000:00:10.{index}"),
            isolated: true,
            health: vfplane_proto::vf_health::VfHealth::Healthy,
            pool: Some(pool.to_owned()),
            ..VfStatus::default()
        });
    }
}

const FAST: &str = "nodeSelector: {sriov: \"true\"}\nnicSelector: {vendor: \"8086\"}\nnumVfs: 4\nresourceName: fast\npriority: 10\nvlan: 100\n";

#[test]
fn a_policy_becomes_a_pf_spec_on_the_nodes_it_selects() {
    let policies = [policy("fast", FAST)];
    let ordered = merge_order(&policies);
    let worker = node("worker-1", &[("sriov", "true")]);
    let st = state("worker-1", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let plan = plan_node(&worker, &ordered, Some(&st));
    assert_eq!(plan.spec.pfs.len(), 1);
    let planned = &plan.spec.pfs[0];
    assert_eq!(planned.pci_address.as_deref(), Some("0000:3b:00.0"));
    assert_eq!(planned.num_vfs, 4);
    assert_eq!(planned.vf_groups[0].resource_name, "fast");
    assert_eq!(planned.vf_groups[0].vf_range, "0-3");
    assert_eq!(
        planned.vf_groups[0].device_type,
        vfplane_proto::node_state::DeviceType::VfioPci
    );
    assert_eq!(planned.vf_groups[0].vlan, 100);
    assert!(plan.conflicts.is_empty());

    // A node without the label gets nothing and needs no NodeState.
    let other = node("worker-2", &[]);
    assert!(!wants_node_state(&other, &ordered, None));
    assert!(wants_node_state(&worker, &ordered, None));
    let other_state = state("worker-2", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let plan = plan_node(&other, &ordered, Some(&other_state));
    assert!(plan.spec.pfs.is_empty());
    assert!(plan.spec.pools.is_empty(), "not selected: no pool either");
    // No status yet: nothing known to configure, but the node is selected.
    let plan = plan_node(&worker, &ordered, None);
    assert!(plan.spec.pfs.is_empty());
    assert_eq!(
        plan.spec.pools,
        ["fast"],
        "the selected node serves the pool, at 0"
    );
}

#[test]
fn a_selected_node_without_the_pf_still_names_the_vfio_pools() {
    // After a reboot the policy's PF is not on the node (or not yet): its
    // vfio-pci pool is still named, so the plugin serves it empty and the
    // kubelet reports 0 instead of the count from before. A netdevice
    // pool is never advertised, so never named.
    let kernel = "nodeSelector:\n  sriov: \"true\"\nnicSelector:\n  pciAddresses: [\"0000:3b:00.0\"]\nnumVfs: 2\nresourceName: kernel\ndeviceType: netdevice\n";
    let gone = "nodeSelector:\n  sriov: \"true\"\nnicSelector:\n  pciAddresses: [\"0000:3b:00.0\"]\nnumVfs: 2\nresourceName: fast\n";
    let policies = [policy("fast", gone), policy("kernel", kernel)];
    let ordered = merge_order(&policies);
    let worker = node("worker-1", &[("sriov", "true")]);
    let st = state("worker-1", vec![pf("0000:5e:00.0", "ens9f0", 7, 0)]);
    let plan = plan_node(&worker, &ordered, Some(&st));
    assert!(plan.spec.pfs.is_empty(), "{:?}", plan.spec.pfs);
    assert_eq!(plan.spec.pools, ["fast"]);
}

#[test]
fn the_profile_reaches_the_node_in_numbers() {
    use vfplane_proto::container_limits::ContainerLimits;
    let with = format!(
        "{FAST}containerProfile: {{lockedMemory: 64Mi, memory: 1Gi, cpu: 1500m, pids: 512, numaAligned: true, hugepages: 2Gi}}\n"
    );
    let worker = node("worker-1", &[("sriov", "true")]);
    let st = state("worker-1", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let full = ContainerLimits {
        locked_memory_bytes: Some(64 << 20),
        numa_aligned: true,
        memory_bytes: Some(1 << 30),
        cpu_millis: Some(1500),
        pids_max: Some(512),
    };
    let whole_cpus = format!("{FAST}containerProfile: {{cpu: \"2\"}}\n");
    let two_cpus = ContainerLimits {
        cpu_millis: Some(2000),
        ..ContainerLimits::default()
    };
    for (yaml, limits) in [
        (with.as_str(), full),
        (whole_cpus.as_str(), two_cpus),
        (FAST, ContainerLimits::default()),
    ] {
        let policies = [policy("fast", yaml)];
        let plan = plan_node(&worker, &merge_order(&policies), Some(&st));
        assert_eq!(plan.spec.pfs[0].vf_groups[0].container_limits, limits, "{yaml}");
    }
}

/// Two policies give one pool on different PFs with different profiles:
/// the webhook's profile of the pool and every VF group's limits are the
/// same strictest one, whichever policy comes first in merge order.
#[test]
fn a_pool_named_by_two_policies_has_one_profile_for_the_webhook_and_the_node() {
    use vfplane_proto::container_limits::ContainerLimits;
    let first = "nodeSelector: {sriov: \"true\"}\nnicSelector: {pfNames: [ens1f0]}\nnumVfs: 2\nresourceName: fast\npriority: 1\n\
                 containerProfile: {cpu: \"1\", memory: 2Gi, pids: 512}\n";
    let second = "nodeSelector: {sriov: \"true\"}\nnicSelector: {pfNames: [ens1f1]}\nnumVfs: 2\nresourceName: fast\npriority: 2\n\
                  containerProfile: {cpu: 1500m, memory: 1Gi, lockedMemory: 64Mi, pids: 64, numaAligned: true}\n";
    let other = "nodeSelector: {sriov: \"true\"}\nnicSelector: {pfNames: [ens2f0]}\nnumVfs: 1\nresourceName: slow\n\
                 containerProfile: {cpu: \"4\"}\n";
    let policies = [policy("a", first), policy("b", second), policy("c", other)];
    let profiles = pool_profiles(&policies);
    let fast = ContainerProfile {
        cpu: Some("1500m".to_owned()),
        memory: Some("2Gi".to_owned()),
        hugepages: None,
        numa_aligned: true,
        locked_memory: Some("64Mi".to_owned()),
        pids: Some(64),
    };
    assert_eq!(profiles.get("fast"), Some(&fast));
    assert_eq!(
        profiles["slow"].cpu.as_deref(),
        Some("4"),
        "another pool's is its own"
    );

    let worker = node("worker-1", &[("sriov", "true")]);
    let st = state(
        "worker-1",
        vec![
            pf("0000:3b:00.0", "ens1f0", 7, 0),
            pf("0000:3b:00.1", "ens1f1", 7, 0),
        ],
    );
    let plan = plan_node(&worker, &merge_order(&policies), Some(&st));
    let limits: Vec<ContainerLimits> = plan
        .spec
        .pfs
        .iter()
        .flat_map(|pf| &pf.vf_groups)
        .map(|group| group.container_limits)
        .collect();
    let strictest = ContainerLimits {
        locked_memory_bytes: Some(64 << 20),
        numa_aligned: true,
        memory_bytes: Some(2 << 30),
        cpu_millis: Some(1500),
        pids_max: Some(64),
    };
    assert_eq!(limits, [strictest, strictest]);
    assert_eq!(
        fast.limits(),
        Ok(strictest),
        "the webhook's profile in numbers is the node's"
    );
}

#[test]
fn an_unreadable_profile_loses_to_a_readable_one_and_alone_gives_no_limits() {
    let bad = ContainerProfile {
        memory: Some("lots".to_owned()),
        ..ContainerProfile::default()
    };
    let good = ContainerProfile {
        memory: Some("1Gi".to_owned()),
        ..ContainerProfile::default()
    };
    assert_eq!(ContainerProfile::strictest([&bad, &good]), Some(good.clone()));
    assert_eq!(ContainerProfile::strictest([&good, &bad]), Some(good));
    let error = bad.limits().unwrap_err();
    assert_eq!(error.field, "memory");
    assert!(
        error
            .to_string()
            .starts_with("spec.containerProfile.memory: \"lots\""),
        "{error}"
    );
    assert_eq!(container_limits(Some(&bad)), ContainerLimits::default());
}

#[test]
fn nic_selectors_match_vendor_device_names_and_addresses() {
    let p = pf("0000:3b:00.0", "ens1f0", 7, 0);
    let spec = |nic: &str| policy("p", &format!("nicSelector: {nic}\nnumVfs: 2\nresourceName: r\n")).spec;
    assert_eq!(selects_pf(&spec("{vendor: \"8086\"}"), &p), Some(None));
    assert_eq!(selects_pf(&spec("{vendor: \"15B3\"}"), &p), None);
    assert_eq!(selects_pf(&spec("{deviceID: \"10C9\"}"), &p), Some(None));
    assert_eq!(selects_pf(&spec("{pfNames: [ens1f1]}"), &p), None);
    assert_eq!(
        selects_pf(&spec("{pfNames: [\"ens1f0#1-2\"]}"), &p),
        Some(Some(vec![1, 2]))
    );
    assert_eq!(
        selects_pf(&spec("{pfNames: [\"ens1f0#0\", \"ens1f0#3\"]}"), &p),
        Some(Some(vec![0, 3]))
    );
    assert_eq!(selects_pf(&spec("{pciAddresses: [\"3b:00.0\"]}"), &p), Some(None));
    assert_eq!(selects_pf(&spec("{pciAddresses: [\"0000:3c:00.0\"]}"), &p), None);
    assert_eq!(
        selects_pf(&spec("{vendor: \"8086\", pfNames: [ens1f1]}"), &p),
        None
    );
}

#[test]
fn higher_priority_keeps_contested_vfs_and_both_policies_say_so() {
    let policies = [
        policy(
            "low",
            "nicSelector: {pfNames: [\"ens1f0#0-5\"]}\nnumVfs: 6\nresourceName: bulk\npriority: 50\n",
        ),
        policy(
            "high",
            "nicSelector: {pfNames: [\"ens1f0#2-3\"]}\nnumVfs: 4\nresourceName: fast\npriority: 5\n",
        ),
    ];
    let ordered = merge_order(&policies);
    assert_eq!(ordered[0].metadata.name.as_deref(), Some("high"));
    let st = state("n1", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let plan = plan_node(&node("n1", &[]), &ordered, Some(&st));
    let planned = &plan.spec.pfs[0];
    assert_eq!(
        planned.num_vfs, 6,
        "the largest numVfs of the policies that kept VFs"
    );
    let groups: Vec<(&str, &str)> = planned
        .vf_groups
        .iter()
        .map(|g| (g.resource_name.as_str(), g.vf_range.as_str()))
        .collect();
    assert_eq!(groups, [("fast", "2-3"), ("bulk", "0-1,4-5")]);
    let low = policy_status(&policies[0], [(&plan, Some(&st))]);
    let high = policy_status(&policies[1], [(&plan, Some(&st))]);
    assert_eq!(low.conflicts.len(), 1);
    assert!(!low.conflicts[0].won);
    assert_eq!(low.conflicts[0].policy, "high");
    assert_eq!(low.conflicts[0].vfs, "2-3");
    assert!(high.conflicts[0].won);
    assert_eq!(high.conflicts[0].policy, "low");
    let reason = |s: &VfPolicyStatus, t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| c.reason.clone())
            .unwrap()
    };
    assert_eq!(reason(&low, "Conflicted"), "LostToHigherPriority");
    assert_eq!(reason(&high, "Conflicted"), "WonOverLowerPriority");
    assert_eq!(low.requested_vfs, 4);
    assert_eq!(high.requested_vfs, 2);
}

#[test]
fn equal_priorities_are_decided_by_name() {
    let spec = "nicSelector: {vendor: \"8086\"}\nnumVfs: 2\nresourceName: r\npriority: 7\n";
    let policies = [policy("zeta", spec), policy("alpha", spec)];
    let ordered = merge_order(&policies);
    let st = state("n1", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let plan = plan_node(&node("n1", &[]), &ordered, Some(&st));
    assert_eq!(plan.claims.len(), 1);
    assert_eq!(plan.claims[0].policy, "alpha");
}

#[test]
fn vfs_beyond_total_vfs_are_not_planned() {
    let policies = [policy(
        "big",
        "nicSelector: {vendor: \"8086\"}\nnumVfs: 16\nresourceName: r\n",
    )];
    let st = state("n1", vec![pf("0000:3b:00.0", "ens1f0", 7, 0)]);
    let plan = plan_node(&node("n1", &[]), &merge_order(&policies), Some(&st));
    assert_eq!(plan.spec.pfs[0].num_vfs, 7);
    assert_eq!(plan.spec.pfs[0].vf_groups[0].vf_range, "0-6");
}

#[test]
fn a_pf_no_policy_wants_goes_to_zero_then_leaves_the_spec() {
    let policies = [policy("fast", FAST)];
    let worker = node("worker-1", &[("sriov", "true")]);
    let mut st = state("worker-1", vec![pf("0000:3b:00.0", "ens1f0", 7, 4)]);
    st.spec = plan_node(&worker, &merge_order(&policies), Some(&st)).spec;
    // The policy is deleted: the PF is written with zero VFs...
    let mut deleting = policies[0].clone();
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    let gone = [deleting];
    let ordered = merge_order(&gone);
    assert!(ordered.is_empty(), "a deleting policy claims nothing");
    let plan = plan_node(&worker, &ordered, Some(&st));
    assert_eq!(plan.spec.pfs.len(), 1);
    assert_eq!(plan.spec.pfs[0].num_vfs, 0);
    assert!(plan.spec.pfs[0].vf_groups.is_empty());
    // ...until the agent reports zero; then it leaves the spec.
    st.spec = plan.spec;
    st.status.as_mut().unwrap().pfs[0].num_vfs = 0;
    let plan = plan_node(&worker, &ordered, Some(&st));
    assert!(plan.spec.pfs.is_empty());
}

#[test]
fn status_counts_ready_vfs_from_what_agents_report() {
    let policies = [policy("fast", FAST)];
    let ordered = merge_order(&policies);
    let nodes = [node("a", &[("sriov", "true")]), node("b", &[("sriov", "true")])];
    let mut pa = pf("0000:3b:00.0", "ens1f0", 7, 4);
    healthy(&mut pa, "fast", 0..4);
    let mut pb = pf("0000:3b:00.0", "ens1f0", 7, 4);
    healthy(&mut pb, "fast", 0..3);
    pb.vfs[2].health = vfplane_proto::vf_health::VfHealth::Unhealthy("bound to igbvf, not vfio-pci".into());
    let states = [state("a", vec![pa]), state("b", vec![pb])];
    let plans: Vec<NodePlan> = nodes
        .iter()
        .zip(&states)
        .map(|(n, s)| plan_node(n, &ordered, Some(s)))
        .collect();
    let status = policy_status(&policies[0], plans.iter().zip(states.iter().map(Some)));
    assert_eq!(status.matched_nodes, 2);
    assert_eq!(status.requested_vfs, 8);
    assert_eq!(status.ready_vfs, 6, "4 on a; 2 healthy of 3 on b");
    assert_eq!(status.observed_generation, Some(3));
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "VfsNotReady")
    );
    assert_eq!(ready.message, "6 of 8 VFs ready");
}

#[test]
fn leftovers_are_vfs_of_the_pool_no_live_policy_plans() {
    let worker = node("w", &[("sriov", "true")]);
    let mut p = pf("0000:3b:00.0", "ens1f0", 7, 4);
    healthy(&mut p, "fast", 0..4);
    let st = state("w", vec![p]);
    let plan = plan_node(&worker, &[], Some(&st));
    let left = leftover_vfs("fast", [(&plan, Some(&st))]);
    assert_eq!(left.len(), 4);
    assert_eq!(left[0], ("w".to_owned(), "0000:3b:00.0".to_owned(), 0));
    // A live policy with the same pool still plans them: nothing left over.
    let policies = [policy("fast2", FAST)];
    let plan = plan_node(&worker, &merge_order(&policies), Some(&st));
    assert!(leftover_vfs("fast", [(&plan, Some(&st))]).is_empty());
}
