#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector;
use kube::runtime::watcher;
use vfplane_proto::node_state::{PfSpec, PfStatus, VfStatus};

use super::*;
use crate::plan::{merge_order, plan_node};

const PF: &str = "0000:01:00.0";

fn node(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"sriov": "true"}}
    }))
    .unwrap()
}

fn policy(name: &str, num_vfs: u16, rollout: &str) -> VfPolicy {
    let text = format!(
        "apiVersion: vfplane.io/v1alpha1\nkind: VfPolicy\nmetadata:\n  name: {name}\n  generation: 2\nspec:\n  \
         nodeSelector: {{sriov: \"true\"}}\n  nicSelector: {{pfNames: [ens1f0]}}\n  numVfs: {num_vfs}\n  \
         resourceName: {name}\n{rollout}"
    );
    serde_yaml::from_str(&text).expect("test policy parses")
}

/// A node whose agent reports `reported` VFs of PF and whose spec asks
/// `written` (none: no spec entry); `owners` names who holds VF 0.
fn state(name: &str, written: Option<u16>, reported: u16, owner: Option<&str>) -> NodeState {
    let mut state = NodeState::new(name, NodeStateSpec::default());
    state.metadata.generation = Some(5);
    if let Some(num_vfs) = written {
        state.spec.pfs.push(PfSpec {
            pci_address: Some(PF.to_owned()),
            num_vfs,
            ..PfSpec::default()
        });
    }
    let vfs = (0..reported)
        .map(|index| VfStatus {
            index,
            pci_address: format!("0000:01:10.{index}"),
            pool: Some("fast".to_owned()),
            owner: (index == 0).then(|| owner.map(str::to_owned)).flatten(),
            owner_pod_uid: (index == 0 && owner.is_some()).then(|| "uid-1".to_owned()),
            ..VfStatus::default()
        })
        .collect();
    state.status = Some(NodeStateStatus {
        pfs: vec![PfStatus {
            pci_address: PF.to_owned(),
            name: Some("ens1f0".to_owned()),
            vendor: "8086".to_owned(),
            device: "10c9".to_owned(),
            link: "up".to_owned(),
            total_vfs: 7,
            num_vfs: reported,
            vfs,
            ..PfStatus::default()
        }],
        observed_generation: Some(5),
        ..NodeStateStatus::default()
    });
    state
}

fn planned(policies: &[VfPolicy], state: &NodeState) -> NodePlan {
    plan_node(
        &node(state.metadata.name.as_deref().unwrap()),
        &merge_order(policies),
        Some(state),
    )
}

#[test]
fn a_count_change_on_a_pf_with_vfs_is_disruptive_and_one_from_zero_is_not() {
    let policies = [policy("fast", 6, "")];
    let with_vfs = state("a", Some(4), 4, None);
    let plan = planned(&policies, &with_vfs);
    assert_eq!(
        disruptive_pfs(Some(&with_vfs.spec), &plan.spec, with_vfs.status.as_ref()),
        BTreeSet::from([PF.to_owned()])
    );
    let empty = state("b", None, 0, None);
    let plan = planned(&policies, &empty);
    assert!(disruptive_pfs(Some(&empty.spec), &plan.spec, empty.status.as_ref()).is_empty());
    // Written already: under way, not pending.
    let written = state("c", Some(6), 4, None);
    let plan = planned(&policies, &written);
    assert!(disruptive_pfs(Some(&written.spec), &plan.spec, written.status.as_ref()).is_empty());
    assert_eq!(pfs_in_progress(&written), BTreeSet::from([PF.to_owned()]));
    assert!(pfs_in_progress(&with_vfs).is_empty());
}

#[test]
fn a_pending_node_keeps_the_pfs_current_entry_and_takes_the_rest() {
    let current = state("a", Some(4), 4, None);
    let mut spec = planned(&[policy("fast", 6, "")], &current).spec;
    spec.pools.push("other".to_owned());
    keep_current(&mut spec, Some(&current.spec), &BTreeSet::from([PF.to_owned()]));
    assert_eq!(spec.pfs, current.spec.pfs);
    assert_eq!(spec.pools, ["fast", "other"], "the rest of the change applies");
}

#[test]
fn evictions_need_every_policy_with_vfs_on_the_pf_to_allow_them() {
    let evicting = policy(
        "fast",
        6,
        "  rollout: {maxUnavailableNodes: 3, evictPods: true}\n",
    );
    let current = state("a", Some(4), 4, None);
    let pfs = BTreeSet::from([PF.to_owned()]);
    let plan = planned(std::slice::from_ref(&evicting), &current);
    let rule = governance(&plan.claims, &pfs, &merge_order([&evicting]));
    assert_eq!(
        rule,
        Governance {
            limits: vec![("fast".to_owned(), 3)],
            evict: true
        }
    );
    // A second policy on the PF without a rollout protects its pods.
    let mut other = policy("slow", 6, "");
    other.spec.nic_selector.pf_names = vec!["ens1f0#4-5".to_owned()];
    other.spec.priority = 1;
    let both = [evicting, other];
    let plan = planned(&both, &current);
    let rule = governance(&plan.claims, &pfs, &merge_order(&both));
    assert_eq!(rule.limits, [("fast".to_owned(), 3)]);
    assert!(!rule.evict);
}

#[test]
fn holders_are_the_pods_the_agent_names_with_their_vfs() {
    let busy = state("a", Some(6), 4, Some("team/pmd-0/app"));
    let pods = holding_pods(&busy, &BTreeSet::from([PF.to_owned()]));
    assert_eq!(
        pods,
        [HoldingPod {
            namespace: "team".to_owned(),
            name: "pmd-0".to_owned(),
            uid: Some("uid-1".to_owned()),
            vfs: vec![format!("{PF} VF 0 (0000:01:10.0)")],
        }]
    );
    assert!(holding_pods(&busy, &BTreeSet::new()).is_empty());
}

#[test]
fn the_status_counts_nodes_by_stage_and_names_the_blocked() {
    let policy = policy("fast", 6, "  rollout: {maxUnavailableNodes: 1}\n");
    let policies = [policy.clone()];
    let done = state("a-done", Some(6), 6, None);
    let pending = state("b-pending", Some(4), 4, None);
    let held = state("c-held", Some(6), 4, Some("team/pmd-0/app"));
    let mut erring = state("d-error", Some(6), 4, None);
    erring.status.as_mut().unwrap().pfs[0].error =
        Some("not changing numVfs 4 -> 6: VF 0 is in use by pid [77]".to_owned());
    let moving = state("e-moving", Some(6), 0, None);
    let pdb = RolloutBlock {
        node: "f-pdb".to_owned(),
        reason: reasons::WAITING_ON_PDB.to_owned(),
        message: "Cannot evict pod as it would violate the pod's disruption budget.".to_owned(),
    };
    let waiting = state("f-pdb", Some(6), 4, Some("team/pmd-1/app"));
    let states = [done, pending, held, erring, moving, waiting];
    let plans: Vec<NodePlan> = states.iter().map(|s| planned(&policies, s)).collect();
    let status = rollout_status(
        &policy,
        plans.iter().zip(&states).map(|(p, s)| {
            let note = (p.node == "f-pdb").then_some(&pdb);
            (p, Some(s), note)
        }),
    )
    .unwrap();
    assert_eq!(
        (
            status.nodes_done,
            status.nodes_pending,
            status.nodes_in_progress,
            status.nodes_waiting_on_pdb,
            status.nodes_failed
        ),
        (1, 1, 4, 1, 2),
        "{status:?}"
    );
    let reasons: Vec<(&str, &str)> = status
        .blocked
        .iter()
        .map(|b| (b.node.as_str(), b.reason.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("c-held", reasons::PODS_HOLD_VFS),
            ("d-error", reasons::AGENT_ERROR),
            ("f-pdb", reasons::WAITING_ON_PDB)
        ]
    );
    assert!(
        status.blocked[0].message.contains("team/pmd-0"),
        "{:?}",
        status.blocked[0]
    );
    // Without a rollout and nothing under way, no section at all.
    let plain = self::policy("fast", 6, "");
    let plan = planned(std::slice::from_ref(&plain), &states[0]);
    assert_eq!(rollout_status(&plain, [(&plan, Some(&states[0]), None)]), None);
}

fn store<K>(objects: Vec<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

#[tokio::test]
async fn admissions_count_busy_nodes_before_their_writes_are_seen_and_wake_the_waiting() {
    let policy = policy("fast", 6, "  rollout: {maxUnavailableNodes: 2}\n");
    let names = ["n0", "n1", "n2", "n3"];
    // n0 is busy in the store already; the others wait to start.
    let states: Vec<NodeState> = names
        .iter()
        .map(|n| state(n, Some(if *n == "n0" { 6 } else { 4 }), 4, None))
        .collect();
    let (policies, nodes, states) = (
        store(vec![policy]),
        store(names.iter().map(|n| node(n)).collect()),
        store(states),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (policy_tx, _policy_rx) = tokio::sync::mpsc::unbounded_channel();
    let ledger = Rollouts::new(tx, policy_tx);
    let limits = [("fast".to_owned(), 2)];
    let now = Instant::now();
    let ask = |node: &str| ledger.admit(node, &limits, &policies, &nodes, &states, now);
    assert_eq!(ask("n1"), Admission::Admitted);
    // n1's write is not in the store yet; it counts all the same.
    assert_eq!(
        ask("n2"),
        Admission::Full {
            policy: "fast".to_owned(),
            busy: 2,
            limit: 2
        }
    );
    assert_eq!(
        ask("n3"),
        Admission::Full {
            policy: "fast".to_owned(),
            busy: 2,
            limit: 2
        }
    );
    assert_eq!(ledger.busy_count(now), 2);
    // n0 finishes: the longest-waiting nodes are woken, in order.
    ledger.observe("n0", false, true, now);
    assert_eq!(rx.try_recv().unwrap(), ObjectRef::new("n2"));
    assert_eq!(rx.try_recv().unwrap(), ObjectRef::new("n3"));
    assert_eq!(ask("n2"), Admission::Admitted);
    assert!(matches!(ask("n3"), Admission::Full { busy: 2, .. }));
    // An admission whose write failed gives its place back.
    ledger.withdraw("n2");
    assert_eq!(ask("n3"), Admission::Admitted);
    // An admission never seen stops counting after a while.
    let later = now + ADMISSION_UNSEEN_FOR + Duration::from_secs(1);
    assert_eq!(ledger.busy_count(later), 0);
}
