//! The control plane in one process: the real controller (`controller::run`)
//! and the real agent (`KubeSource` + `Reconciler` + `pass`, as
//! `vfplane-agent run --kube` wires them) talk through one in-memory API
//! server stand-in, the agent reconciling a fake sysfs tree. What a user
//! writes (a VfPolicy) has to come out as the agent's pool config, and what
//! the agent reports has to come back as the policy's status.
//!
//! This is not the testbed: sysfs is a tree of files that does not react to
//! writes, and the API server is the stand-in of `controller/tests`. The
//! node here already holds the four isolated vfio-pci VFs the policy asks
//! for, so the agent's passes change pools and status, not the kernel. What
//! it proves is the contract between the two halves (NodeState spec and
//! status fields, generations, pools), which no other test runs both sides
//! of. The agent against a real kernel is `agent_testbed.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vfplane_agent::kube_source::{Backoff, KubeSource};
use vfplane_agent::netlink::fake::FakeNetlink;
use vfplane_agent::reconcile::Reconciler;
use vfplane_agent::run::{RunOptions, pass};
use vfplane_agent::source::Trigger;
use vfplane_controller::controller;
use vfplane_controller::metrics::Metrics;
use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_kube_mock::in_memory::{FakeApi, NODES, POLICIES, STATES};
use vfplane_proto::pool::PoolConfig;

const PF: &str = "0000:00:02.0";
const NODE: &str = "w1";

/// One igb PF (7 VFs at most) with 4 VFs, each alone in its IOMMU group and
/// bound to vfio-pci, as the agent leaves a node that got such a policy.
fn node_with_four_vfio_vfs() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut pf = FakeDevice::igb_pf(PF.parse().unwrap());
    pf.iommu_group = Some(3);
    fake.add_pf(&pf, 7, "eth0").unwrap();
    let vfs = fake.add_vfs(PF.parse().unwrap(), 4, Some(4), -1).unwrap();
    for (group, vf) in (4..).zip(&vfs) {
        fake.set_driver(*vf, Some("vfio-pci")).unwrap();
        fake.add_vfio_node(group).unwrap();
    }
    fake
}

/// The agent's loop (`vfplane-agent run --kube` without the uevent and
/// file watchers): a pass at start and after every trigger, until `stop`.
fn spawn_agent(
    api: &FakeApi,
    fake: &FakeSysfs,
    dir: &std::path::Path,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let handle = tokio::runtime::Handle::current();
    let mut source = KubeSource::new(handle, api.client(), NODE, Backoff::default());
    let reconciler = Reconciler::new(
        fake.host(),
        FakeNetlink::with_fresh_vfs("eth0", 4),
        NODE,
        fake.sysfs_root().join("no-proc"),
    );
    let options = RunOptions {
        status_file: Some(dir.join("status.json")),
        pool_config: Some(dir.join("pools.yaml")),
        state_dir: Some(dir.join("vf-state")),
        resync: Duration::from_secs(30),
        pod_resources: None,
        scrubber: None,
        containers: None,
        metrics: None,
    };
    std::thread::spawn(move || {
        let (tx, rx) = mpsc::channel();
        use vfplane_agent::source::DesiredStateSource as _;
        source.watch(tx);
        let mut trigger = Trigger::Start;
        while !stop.load(Ordering::Relaxed) {
            pass(&reconciler, &mut source, &options, trigger);
            trigger = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(t) => t,
                Err(_) => Trigger::Resync,
            };
        }
    })
}

/// Waits (real time, up to 20 s) for `check`.
async fn until(api: &FakeApi, what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; requests:\n{}", api.describe_log());
}

fn pools(dir: &std::path::Path) -> Option<PoolConfig> {
    let text = std::fs::read_to_string(dir.join("pools.yaml")).ok()?;
    serde_yaml::from_str(&text).ok()
}

fn pool_devices(dir: &std::path::Path, name: &str) -> Vec<String> {
    pools(dir)
        .and_then(|c| c.pools.into_iter().find(|p| p.name == name))
        .map(|p| p.listed_devices().iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

fn status(api: &FakeApi, policy: &str) -> Value {
    api.get(POLICIES, policy)
        .map_or(Value::Null, |p| p["status"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_becomes_the_agents_pool_and_the_agents_report_becomes_its_status() {
    let api = FakeApi::default();
    let fake = node_with_four_vfio_vfs();
    let dir = tempfile::tempdir().unwrap();
    api.put(
        NODES,
        json!({"metadata": {"name": NODE, "labels": {"vfplane.io/sriov": "true"}}}),
    );

    let metrics = Arc::new(Metrics::default());
    tokio::spawn(controller::run(
        api.client(),
        Arc::clone(&metrics),
        std::future::pending(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let agent = spawn_agent(&api, &fake, dir.path(), Arc::clone(&stop));

    // Before any policy the controller makes no NodeState and the agent,
    // finding none, leaves the node alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(api.get(STATES, NODE).is_none());
    assert!(pools(dir.path()).is_none(), "no pool config without a NodeState");

    // The user's policy. The controller creates the node's NodeState; the
    // agent applies it, reports the PF, and the controller plans the VFs.
    api.put(
        POLICIES,
        json!({
            "metadata": {"name": "fast"},
            "spec": {"nodeSelector": {"vfplane.io/sriov": "true"}, "nicSelector": {"pfNames": ["eth0"]},
                     "numVfs": 4, "resourceName": "fast", "priority": 10}
        }),
    );
    until(&api, "the agent's pool config to hold the policy's VFs", || {
        pool_devices(dir.path(), "fast").len() == 4
    })
    .await;
    assert_eq!(
        pool_devices(dir.path(), "fast"),
        ["0000:00:12.0", "0000:00:12.2", "0000:00:12.4", "0000:00:12.6"].map(String::from)
    );
    until(&api, "the policy's status to count the agent's ready VFs", || {
        let s = status(&api, "fast");
        s["matchedNodes"] == 1 && s["requestedVfs"] == 4 && s["readyVfs"] == 4
    })
    .await;
    let state = api.get(STATES, NODE).unwrap();
    assert_eq!(
        state["status"]["observedGeneration"], state["metadata"]["generation"],
        "the agent reported the generation it applied"
    );
    assert_eq!(state["spec"]["pfs"][0]["pciAddress"], PF);

    // A change of the policy travels the same way: a second pool takes two
    // of the VFs from a lower-priority policy.
    api.put(
        POLICIES,
        json!({
            "metadata": {"name": "voice"},
            "spec": {"nodeSelector": {"vfplane.io/sriov": "true"}, "nicSelector": {"pfNames": ["eth0#2-3"]},
                     "numVfs": 4, "resourceName": "voice", "priority": 1}
        }),
    );
    until(&api, "the agent to split the VFs between the pools", || {
        pool_devices(dir.path(), "fast").len() == 2 && pool_devices(dir.path(), "voice").len() == 2
    })
    .await;
    until(&api, "both statuses to follow the agent", || {
        let (fast, voice) = (status(&api, "fast"), status(&api, "voice"));
        fast["readyVfs"] == 2 && fast["conflicts"][0]["policy"] == "voice" && voice["readyVfs"] == 2
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || agent.join().unwrap())
        .await
        .unwrap();
}
