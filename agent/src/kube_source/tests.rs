//! The kube source against the mocked API server of `vfplane-kube-mock`, in the style
//! of kube-rs controller-rs's fixtures: every request's method, path, query,
//! content type and body is checked, and the answers are the JSON an API
//! server gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc;
use std::time::Instant;

use kube::client::Body;
use serde_json::{Value, json};
use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_kube_mock::{ApiServer, Seen, failure, json_response};
use vfplane_proto::node_state::{PfSpec, PfStatus};

use super::*;
use crate::netlink::fake::FakeNetlink;
use crate::reconcile::Reconciler;
use crate::run::{RunOptions, pass};

const NODE: &str = "node-1";
const PF: &str = "0000:00:02.0";
const STATUS_PATH: &str =
    "/apis/vfplane.io/v1alpha1/nodestates/node-1/status?&force=true&fieldManager=vfplane-agent";
const LIST_PATH: &str =
    "/apis/vfplane.io/v1alpha1/nodestates?&fieldSelector=metadata.name%3Dnode-1&limit=500";
const WATCH_PREFIX: &str = "/apis/vfplane.io/v1alpha1/nodestates?&watch=true&timeoutSeconds=";
const WATCH_REST: &str = "&fieldSelector=metadata.name%3Dnode-1&allowWatchBookmarks=true&resourceVersion=";

fn object(generation: i64, uid: &str, num_vfs: u16) -> Value {
    json!({
        "apiVersion": "vfplane.io/v1alpha1",
        "kind": "NodeState",
        "metadata": { "name": NODE, "uid": uid, "generation": generation, "resourceVersion": "41" },
        "spec": { "pfs": [{ "pciAddress": PF, "numVfs": num_vfs }] },
    })
}

fn list(items: &[Value]) -> Value {
    json!({
        "apiVersion": "vfplane.io/v1alpha1",
        "kind": "NodeStateList",
        "metadata": { "resourceVersion": "42" },
        "items": items,
    })
}

fn status(generation: i64, num_vfs: u16) -> NodeStateStatus {
    NodeStateStatus {
        pfs: vec![PfStatus {
            pci_address: PF.to_owned(),
            name: Some("eth0".to_owned()),
            vendor: "8086".to_owned(),
            device: "10c9".to_owned(),
            link: "up".to_owned(),
            total_vfs: 7,
            num_vfs,
            ..PfStatus::default()
        }],
        iommu_enabled: true,
        observed_generation: Some(generation),
        ..NodeStateStatus::default()
    }
}

fn update(uid: &str, status: NodeStateStatus) -> Option<StatusUpdate> {
    Some(StatusUpdate {
        uid: Some(uid.to_owned()),
        status,
    })
}

fn fast() -> Backoff {
    Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(100),
    }
}

/// A status writer on a mocked API server.
fn writer() -> (
    ApiServer,
    watch::Sender<Option<StatusUpdate>>,
    tokio::task::JoinHandle<()>,
) {
    let (client, handle) = vfplane_kube_mock::pair("default");
    let api = Api::<NodeState>::all(client);
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(write_statuses(api, NODE.to_owned(), rx, fast()));
    (handle, tx, task)
}

/// Checks a status write and that its body is `status`, as applied.
fn assert_status_patch(seen: &Seen, status: &NodeStateStatus) {
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.path_and_query, STATUS_PATH);
    assert_eq!(seen.content_type.as_deref(), Some("application/apply-patch+yaml"));
    let body = seen.body.as_ref().expect("a body");
    assert_eq!(
        *body,
        json!({
            "apiVersion": "vfplane.io/v1alpha1",
            "kind": "NodeState",
            "status": serde_json::to_value(status).unwrap(),
        })
    );
}

#[tokio::test]
async fn status_is_written_by_server_side_apply_on_the_status_subresource() {
    let (mut api, tx, _task) = writer();
    let status = status(7, 4);
    tx.send_replace(update("u1", status.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &status);
    let body = seen.body.unwrap();
    assert_eq!(body["status"]["observedGeneration"], 7);
    assert_eq!(body["status"]["pfs"][0]["numVfs"], 4);
    assert_eq!(body["status"]["iommuEnabled"], true);
    send.json(200, &object(7, "u1", 4));
}

#[tokio::test]
async fn an_unchanged_status_is_written_once() {
    let (mut api, tx, task) = writer();
    let first = status(7, 4);
    tx.send_replace(update("u1", first.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &first);
    send.json(200, &object(7, "u1", 4));

    // The next passes report the same status: nothing is sent.
    tx.send_replace(update("u1", first.clone()));
    tx.send_replace(update("u1", first.clone()));
    api.quiet_for(Duration::from_millis(300)).await;

    // A changed status is sent.
    let second = status(8, 2);
    tx.send_replace(update("u1", second.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &second);
    send.json(200, &object(8, "u1", 2));

    // The same status for a recreated object (new uid) is sent again: the
    // new object has no status yet.
    tx.send_replace(update("u2", second.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &second);
    send.json(200, &object(1, "u2", 2));
    api.quiet_for(Duration::from_millis(200)).await;
    assert!(!task.is_finished());
}

#[tokio::test]
async fn failed_status_writes_are_retried_with_backoff_without_panicking() {
    let (mut api, tx, task) = writer();
    let status = status(7, 4);
    tx.send_replace(update("u1", status.clone()));

    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &status);
    let failed_at = Instant::now();
    send.json(500, &failure(500, "InternalError"));

    let (seen, send) = api.next().await;
    let first_retry = failed_at.elapsed();
    assert_status_patch(&seen, &status);
    let conflict_at = Instant::now();
    send.json(409, &failure(409, "Conflict"));

    let (seen, send) = api.next().await;
    let second_retry = conflict_at.elapsed();
    assert_status_patch(&seen, &status);
    send.json(200, &object(7, "u1", 4));

    // 50 ms after the first failure, doubled (capped at 100 ms) after the next.
    assert!(first_retry >= Duration::from_millis(50), "{first_retry:?}");
    assert!(second_retry >= Duration::from_millis(100), "{second_retry:?}");

    // Written now: the same status is not sent again, the writer lives on.
    tx.send_replace(update("u1", status));
    api.quiet_for(Duration::from_millis(300)).await;
    assert!(!task.is_finished());
}

#[tokio::test]
async fn a_gone_object_drops_the_status_until_the_next_one() {
    let (mut api, tx, task) = writer();
    let first = status(7, 4);
    tx.send_replace(update("u1", first.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &first);
    send.json(404, &failure(404, "NotFound"));
    // No retry of a status for an object that is gone.
    api.quiet_for(Duration::from_millis(300)).await;

    let second = status(1, 4);
    tx.send_replace(update("u2", second.clone()));
    let (seen, send) = api.next().await;
    assert_status_patch(&seen, &second);
    send.json(200, &object(1, "u2", 4));
    assert!(!task.is_finished());
}

#[test]
fn a_relist_without_the_object_counts_as_deleted() {
    let watched = Mutex::new(Watched::Unknown);
    assert!(update_watched(&watched, Watched::Missing));
    assert!(!update_watched(&watched, Watched::Missing), "no change, no pass");
    let present = Watched::Present {
        spec: NodeStateSpec::default(),
        generation: Some(1),
        uid: Some("u1".to_owned()),
    };
    assert!(update_watched(&watched, present.clone()));
    assert!(
        !update_watched(&watched, present),
        "a status-only update is no change"
    );
    assert!(update_watched(&watched, Watched::Missing));
    assert_eq!(*watched.lock().unwrap(), Watched::Deleted);
}

fn update_watched(watched: &Mutex<Watched>, new: Watched) -> bool {
    super::update(watched, new, NODE)
}

// ---- the source in the loop, on a fake node ----

/// A node with one igb PF and 4 VFs.
fn node() -> FakeSysfs {
    let fake = FakeSysfs::new().unwrap();
    let mut pf = FakeDevice::igb_pf(PF.parse().unwrap());
    pf.iommu_group = Some(3);
    fake.add_pf(&pf, 7, "eth0").unwrap();
    fake.add_vfs(PF.parse().unwrap(), 4, Some(4), -1).unwrap();
    fake
}

fn num_vfs(fake: &FakeSysfs) -> String {
    fake.read("devices/pci0000:00/0000:00:02.0/sriov_numvfs")
        .unwrap()
        .trim()
        .to_owned()
}

/// An API server that answers the list with `items`, each watch with the
/// next of `watches` (newline-separated events; later watches hang), and
/// status patches with 200; it records every request.
struct Cluster {
    runtime: tokio::runtime::Runtime,
    seen: Arc<Mutex<Vec<Seen>>>,
    source: KubeSource,
}

impl Cluster {
    fn start(items: Vec<Value>, watches: Vec<Vec<Value>>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        let (client, server) = vfplane_kube_mock::pair("default");
        let mut handle = server.into_handle();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        runtime.spawn(async move {
            let mut watches = watches.into_iter();
            let mut hanging = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let request = vfplane_kube_mock::seen(request).await;
                record.lock().unwrap().push(request.clone());
                match request.method.as_str() {
                    "GET" if request.path_and_query.contains("watch=true") => match watches.next() {
                        Some(events) => {
                            let mut lines = Vec::new();
                            for event in events {
                                serde_json::to_writer(&mut lines, &event).unwrap();
                                lines.push(b'\n');
                            }
                            send.send_response(
                                http::Response::builder()
                                    .status(200)
                                    .body(Body::from(lines))
                                    .unwrap(),
                            );
                        }
                        None => hanging.push(send),
                    },
                    "GET" => send.send_response(json_response(200, &list(&items))),
                    "PATCH" => send.send_response(json_response(200, &object(3, "u1", 2))),
                    _ => send.send_response(json_response(405, &failure(405, "MethodNotAllowed"))),
                }
            }
        });
        let source = KubeSource::new(runtime.handle().clone(), client, NODE, fast());
        Self {
            runtime,
            seen,
            source,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `check` holds for what the API server saw.
    fn wait_for_requests(&self, what: &str, check: impl Fn(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = self.seen();
            if check(&seen) {
                return seen;
            }
            assert!(Instant::now() < deadline, "no {what} within 5 s: {seen:#?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_for_state(&self, want: impl Fn(&Watched) -> bool) -> Watched {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let watched = self.source.watched();
            if want(&watched) {
                return watched;
            }
            assert!(Instant::now() < deadline, "still {watched:?} after 5 s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn assert_list_and_watch(seen: &[Seen]) {
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].path_and_query, LIST_PATH);
    assert_eq!(seen[1].method, "GET");
    assert!(
        seen[1].path_and_query.starts_with(WATCH_PREFIX),
        "{}",
        seen[1].path_and_query
    );
    // The node's own watch timeout, not kube-runtime's 290 s for everyone.
    let rest = format!("{}{WATCH_REST}", watch_timeout_secs(NODE));
    assert!(
        seen[1].path_and_query[WATCH_PREFIX.len()..].starts_with(&rest),
        "{}",
        seen[1].path_and_query
    );
}

/// Watch timeouts spread a fleet's reconnections over 150-290 s, the same
/// for a node every time.
#[test]
fn watch_timeouts_are_spread_across_nodes_and_fixed_per_node() {
    let timeouts: Vec<u32> = (0..5000)
        .map(|i| watch_timeout_secs(&format!("node-{i:05}")))
        .collect();
    assert!(timeouts.iter().all(|t| (150..=290).contains(t)));
    assert_eq!(watch_timeout_secs("node-00042"), timeouts[42]);
    // No second of the window holds more than 2 % of the fleet (an even
    // spread is 0.7 %).
    let mut per_second = std::collections::BTreeMap::new();
    for t in &timeouts {
        *per_second.entry(*t).or_insert(0_usize) += 1;
    }
    let busiest = per_second.values().max().copied().unwrap_or_default();
    assert!(
        busiest <= 100,
        "{busiest} of 5,000 watches end in the same second"
    );
    assert!(per_second.len() > 130, "{} distinct timeouts", per_second.len());
}

fn options(dir: &std::path::Path) -> RunOptions {
    RunOptions {
        status_file: Some(dir.join("status.json")),
        pool_config: Some(dir.join("pools.yaml")),
        state_dir: Some(dir.join("vf-state")),
        resync: Duration::from_secs(30),
        pod_resources: None,
        scrubber: None,
        containers: None,
        metrics: None,
    }
}

#[test]
fn the_named_nodestate_is_applied_and_its_status_written() {
    let fake = node();
    let reconciler = Reconciler::new(
        fake.host(),
        FakeNetlink::default(),
        NODE,
        fake.sysfs_root().join("no-proc"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(vec![object(3, "u1", 2)], Vec::new());
    let (tx, rx) = mpsc::channel();
    cluster.source.watch(tx);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Trigger::Desired);
    assert_eq!(
        cluster.source.desired(),
        Desired::Apply {
            spec: NodeStateSpec {
                pfs: vec![PfSpec {
                    pci_address: Some(PF.to_owned()),
                    num_vfs: 2,
                    ..PfSpec::default()
                }],
                allow_no_iommu: false,
                pools: Vec::new(),
            },
            generation: Some(3),
            warning: None,
        }
    );

    let report = pass(
        &reconciler,
        &mut cluster.source,
        &options(dir.path()),
        Trigger::Desired,
    )
    .unwrap();
    assert_eq!(num_vfs(&fake), "2", "the spec was applied");
    assert_eq!(report.status.observed_generation, Some(3));
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("status.json")).unwrap()).unwrap();
    assert_eq!(file["observedGeneration"], 3);

    let seen = cluster.wait_for_requests("status patch", |s| s.iter().any(|r| r.method == "PATCH"));
    assert_list_and_watch(&seen);
    let patch = seen.iter().find(|r| r.method == "PATCH").unwrap();
    assert_status_patch(patch, &report.status);

    // The next pass finds the same status: no second write.
    pass(
        &reconciler,
        &mut cluster.source,
        &options(dir.path()),
        Trigger::Resync,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cluster.seen().iter().filter(|r| r.method == "PATCH").count(), 1);
    drop(cluster.runtime);
}

#[test]
fn without_a_nodestate_the_agent_waits_and_leaves_the_host_alone() {
    let fake = node();
    let reconciler = Reconciler::new(
        fake.host(),
        FakeNetlink::default(),
        NODE,
        fake.sysfs_root().join("no-proc"),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(Vec::new(), Vec::new());
    assert_eq!(cluster.source.desired(), Desired::Wait, "nothing heard yet");
    let (tx, rx) = mpsc::channel();
    cluster.source.watch(tx);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Trigger::Desired);
    assert_eq!(cluster.source.watched(), Watched::Missing);
    assert_eq!(cluster.source.desired(), Desired::Wait);

    assert!(
        pass(
            &reconciler,
            &mut cluster.source,
            &options(dir.path()),
            Trigger::Desired
        )
        .is_none()
    );
    assert_eq!(num_vfs(&fake), "4", "the host is untouched");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file written"
    );

    // The agent listed and watched, and did nothing else: no create, no status.
    let seen = cluster.wait_for_requests("watch", |s| s.len() >= 2);
    std::thread::sleep(Duration::from_millis(300));
    let seen_later = cluster.seen();
    assert_list_and_watch(&seen);
    assert_eq!(seen_later.len(), 2, "{seen_later:#?}");
    drop(cluster.runtime);
}

#[test]
fn a_deleted_nodestate_leaves_the_host_as_it_is() {
    let fake = node();
    let reconciler = Reconciler::new(
        fake.host(),
        FakeNetlink::default(),
        NODE,
        fake.sysfs_root().join("no-proc"),
    );
    let dir = tempfile::tempdir().unwrap();
    let deleted = json!({ "type": "DELETED", "object": object(3, "u1", 2) });
    let mut cluster = Cluster::start(vec![object(3, "u1", 2)], vec![vec![deleted]]);
    let (tx, _rx) = mpsc::channel();
    cluster.source.watch(tx);
    cluster.wait_for_state(|w| *w == Watched::Deleted);
    assert_eq!(cluster.source.desired(), Desired::Wait);
    assert!(
        pass(
            &reconciler,
            &mut cluster.source,
            &options(dir.path()),
            Trigger::Desired
        )
        .is_none()
    );
    assert_eq!(num_vfs(&fake), "4", "the VFs stay");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file written"
    );
    let seen = cluster.seen();
    assert_list_and_watch(&seen);
    assert!(seen.iter().all(|r| r.method == "GET"), "{seen:#?}");
    drop(cluster.runtime);
}
