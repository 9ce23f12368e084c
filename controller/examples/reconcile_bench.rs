//! One full pass of the controller at cluster scale against an in-process
//! API server stand-in: 1,000 nodes (two PFs each, reported by their
//! agents), 50 policies of mixed priorities and selectors. Every node's
//! NodeState spec is applied and every policy's status patched, through the
//! real kube client and its HTTP encoding; the stand-in answers each request
//! with its own body. Prints the pass time and the peak RSS.
//!
//! `cargo run --release -p vfplane-controller --example reconcile_bench`

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::json;
use vfplane_controller::controller::{Context, StatusThrottle, reconcile_node, reconcile_policy, recorder};
use vfplane_controller::metrics::Metrics;
use vfplane_controller::rollout::Rollouts;
use vfplane_proto::node_state::{NodeState, NodeStateSpec, NodeStateStatus, PfStatus};
use vfplane_proto::vf_policy::VfPolicy;

const NODES: usize = 1000;
const POLICIES: usize = 50;

fn filled<K: kube::Resource<DynamicType = ()> + Clone + 'static>(objects: Vec<K>) -> Store<K> {
    let (store, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    store
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let nodes: Vec<Node> = (0..NODES)
            .map(|i| {
                serde_json::from_value(json!({"metadata": {
                    "name": format!("worker-{i:04}"), "uid": format!("uid-{i}"),
                    "labels": {"rack": format!("r{}", i % 10), "sriov": "true"}}}))
            })
            .collect::<Result<_, _>>()?;
        let states: Vec<NodeState> = (0..NODES)
            .map(|i| {
                let mut s = NodeState::new(&format!("worker-{i:04}"), NodeStateSpec::default());
                let pf = |addr: &str, name: &str| PfStatus {
                    pci_address: addr.into(),
                    name: Some(name.into()),
                    vendor: "8086".into(),
                    device: "10c9".into(),
                    link: "up".into(),
                    total_vfs: 64,
                    ..PfStatus::default()
                };
                s.status = Some(NodeStateStatus {
                    pfs: vec![pf("0000:3b:00.0", "ens1f0"), pf("0000:3b:00.1", "ens1f1")],
                    iommu_enabled: true,
                    ..NodeStateStatus::default()
                });
                s
            })
            .collect();
        let policies: Vec<VfPolicy> = (0..POLICIES)
            .map(|i| {
                let pf = if i % 2 == 0 { "ens1f0" } else { "ens1f1" };
                let first = (i / 2) % 16 * 4;
                serde_json::from_value(json!({
                    "apiVersion": "vfplane.io/v1alpha1", "kind": "VfPolicy",
                    "metadata": {"name": format!("policy-{i:02}"), "generation": 1,
                                 "finalizers": ["vfplane.io/release-vfs"]},
                    "spec": {"nodeSelector": if i % 5 == 0 { json!({"sriov": "true"}) } else { json!({"rack": format!("r{}", i % 10)}) },
                             "nicSelector": {"pfNames": [format!("{pf}#{first}-{}", first + 5)]},
                             "numVfs": 64, "resourceName": format!("pool-{i:02}"), "priority": (i % 7) as u8}
                }))
            })
            .collect::<Result<_, _>>()?;

        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let by_name: Arc<std::collections::HashMap<String, serde_json::Value>> = Arc::new(
            policies
                .iter()
                .map(|p| Ok((p.metadata.name.clone().unwrap_or_default(), serde_json::to_value(p)?)))
                .collect::<Result<_, serde_json::Error>>()?,
        );
        let service = tower::service_fn(move |request: Request<Body>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let by_name = Arc::clone(&by_name);
            async move {
                let path = request.uri().path().to_owned();
                let bytes = request.into_body().collect_bytes().await?;
                // A status patch is answered with the whole object, as the
                // API server does; anything else with its own body.
                let answer = match path.strip_suffix("/status").and_then(|p| p.rsplit('/').next()) {
                    Some(name) if path.contains("/vfpolicies/") => {
                        let mut object = by_name.get(name).cloned().unwrap_or_default();
                        let sent: serde_json::Value = serde_json::from_slice(&bytes)?;
                        object["status"] = sent["status"].clone();
                        serde_json::to_vec(&object)?
                    }
                    _ => bytes.to_vec(),
                };
                Ok::<_, tower::BoxError>(Response::new(Body::from(answer)))
            }
        });
        let client = Client::new(service, "default");
        let ctx = Arc::new(Context {
            recorder: recorder(&client),
            rollouts: Rollouts::default(),
            evictions: client.clone(),
            client,
            nodes: filled(nodes.clone()),
            policies: filled(policies.clone()),
            states: filled(states),
            metrics: Arc::new(Metrics::default()),
            status_throttle: StatusThrottle::default(),
        });

        let begun = Instant::now();
        for node in &nodes {
            reconcile_node(Arc::new(node.clone()), Arc::clone(&ctx)).await?;
        }
        let nodes_done = begun.elapsed();
        for policy in &policies {
            reconcile_policy(Arc::new(policy.clone()), Arc::clone(&ctx)).await?;
        }
        let total = begun.elapsed();
        println!(
            "{{\"bench\":\"reconcile_full_pass\",\"nodes\":{NODES},\"policies\":{POLICIES},\"requests\":{},\"nodes_ms\":{:.1},\"policies_ms\":{:.1},\"total_ms\":{:.1},\"peak_rss_kib\":{}}}",
            requests.load(std::sync::atomic::Ordering::Relaxed),
            nodes_done.as_secs_f64() * 1e3,
            (total - nodes_done).as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            peak_rss_kib()
        );
        Ok(())
    })
}
