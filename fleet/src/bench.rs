//! The scale bench's measurements, against a real API server: a fleet of
//! simulated nodes ([`crate::spawn_agent`]) and vfplane's controller
//! running as separate processes, started by `cargo xtask bench scale`.
//!
//! Phases, each timed from the bench's one write (a VfPolicy applied with
//! server-side apply) to what the bench sees through its own watches of
//! NodeStates and VfPolicies:
//! 1. rollout: a policy selecting every node (4 VFs on `ens1f0`);
//! 2. idle: nothing changes for a while;
//! 3. numVfs 4 → 6;
//! 4. a pool's container profile set (the NodeState specs change, no VF);
//! 5. numVfs 6 → 5 rolled out with `rollout: {maxUnavailableNodes,
//!    evictPods: true}` while a pod holds a VF on every node
//!    ([`crate::kubelet`]): the controller evicts each node's pod in
//!    batches, the fleet's kubelets let the pods go.
//!
//! In every phase the bench counts, from its own watch of the NodeStates,
//! the nodes whose spec's VF count on [`FIRST_PF`] differs from the one
//! their agent reports (nodes in progress), and the most at once.
//!
//! and for each, the API server's requests (its own metrics:
//! `apiserver_request_total` by verb and resource, and
//! `apiserver_flowcontrol_dispatched_requests_total` by FlowSchema, which
//! the bench's installer makes one per vfplane client), the controllers'
//! CPU time and memory, etcd's size and one NodeState's.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt as _};
use vfplane_proto::node_state::NodeState;
use vfplane_proto::vf_policy::VfPolicy;

use crate::SimulatedKubelet;
use crate::kubelet::{self, NAMESPACE};
use crate::readings::{self, ProcessReading, Sample};
use vfplane_host::Host;
use vfplane_proto::vf_policy::RolloutStatus;

/// The bench's VfPolicy.
pub const POLICY: &str = "scale";
/// The PF every simulated node has, which the policy configures.
pub const FIRST_PF: &str = "0000:01:00.0";

/// A process to measure: a controller replica, the API server, etcd.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Its name in the report (for a replica, its identity in the Lease).
    pub name: String,
    /// Its process.
    pub pid: u32,
}

/// What the bench needs to know.
#[derive(Debug, Clone)]
pub struct BenchSetup {
    /// How many nodes the fleet has.
    pub nodes: usize,
    /// The controller's replicas.
    pub replicas: Vec<Measured>,
    /// The Lease naming the leader: namespace and name.
    pub lease: (String, String),
    /// etcd's client address (`host:port`), for its metrics.
    pub etcd: String,
    /// How long the idle phase lasts.
    pub idle: Duration,
    /// How long a phase may take before the bench gives up.
    pub phase_timeout: Duration,
    /// The fleet process, measured too.
    pub fleet_pid: u32,
    /// Other processes to measure (the API server, etcd), by name.
    pub others: Vec<Measured>,
    /// Every node's kubelet and host, to hold VFs in the last phase.
    pub kubelets: Vec<(SimulatedKubelet, Host)>,
    /// The last phase's `maxUnavailableNodes`.
    pub max_unavailable: u32,
}

/// Counters and gauges read at one instant.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    at: Option<Instant>,
    by_verb: BTreeMap<String, f64>,
    by_client: BTreeMap<String, f64>,
    rejected: BTreeMap<String, f64>,
    processes: BTreeMap<String, ProcessReading>,
    etcd_bytes: f64,
    etcd_in_use_bytes: f64,
}

/// One phase's figures.
#[derive(Debug, Clone)]
struct PhaseReport {
    name: String,
    /// Seconds from the write to: every NodeState's spec written, every
    /// node converged, the VfPolicy status counting every ready VF.
    spec_written: Option<f64>,
    converged: Option<f64>,
    policy_status: Option<f64>,
    /// The most nodes in progress at once.
    most_in_progress: usize,
    /// The policy's rollout status at the end.
    rollout: Option<RolloutStatus>,
    /// Pods the fleet's kubelets let go during the phase.
    pods_let_go: usize,
    before: Snapshot,
    after: Snapshot,
}

/// What each node's NodeState says, as far as the phase looks.
#[derive(Debug, Clone, Copy, Default)]
struct NodeProgress {
    spec_ok: bool,
    converged: bool,
}

/// What a phase waits for.
#[derive(Debug, Clone, Copy)]
struct Target {
    /// VFs on [`FIRST_PF`] in the spec and, once converged, the status.
    num_vfs: u16,
    /// Whether the spec's VF groups must carry container limits.
    limits: bool,
}

impl Target {
    fn progress(self, state: &NodeState, since_generation: i64) -> NodeProgress {
        let generation = state.metadata.generation.unwrap_or(0);
        let spec_ok = generation > since_generation
            && state.spec.pfs.iter().any(|pf| {
                pf.num_vfs == self.num_vfs
                    && pf.vf_groups.iter().all(|g| {
                        !self.limits
                            || g.container_limits
                                != vfplane_proto::container_limits::ContainerLimits::default()
                    })
            });
        let converged = spec_ok
            && state.status.as_ref().is_some_and(|status| {
                status.observed_generation == Some(generation)
                    && status
                        .conditions
                        .iter()
                        .any(|c| c.type_ == "Synced" && c.status == "True")
                    && status.pfs.iter().any(|pf| {
                        pf.pci_address == FIRST_PF
                            && pf.num_vfs == self.num_vfs
                            && pf
                                .vfs
                                .iter()
                                .filter(|vf| vf.driver.as_deref() == Some("vfio-pci"))
                                .count()
                                == usize::from(self.num_vfs)
                    })
            });
        NodeProgress { spec_ok, converged }
    }
}

/// The bench's view of the cluster: the NodeStates and the policy, kept by
/// its watches.
struct View {
    states: HashMap<String, NodeState>,
    policy: Option<VfPolicy>,
}

/// Runs the phases and returns the report.
///
/// # Errors
/// A write refused, a watch that fails for good, or a phase that does not
/// finish in time (naming how far it got).
pub async fn run(client: Client, setup: &BenchSetup) -> anyhow::Result<String> {
    let ticks = clock_ticks();
    let states_api = Api::<NodeState>::all(client.clone());
    let policies_api = Api::<VfPolicy>::all(client.clone());
    let mut states = watcher::watcher(states_api.clone(), watcher::Config::default()).boxed();
    let mut policies = watcher::watcher(
        policies_api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={POLICY}")),
    )
    .boxed();
    let mut view = View {
        states: HashMap::new(),
        policy: None,
    };
    let mut reports = Vec::new();

    let phases: [(&str, Target, serde_json::Value); 3] = [
        (
            "rollout (policy applied, 4 VFs a node)",
            Target {
                num_vfs: 4,
                limits: false,
            },
            policy(4, None, None),
        ),
        (
            "numVfs 4 -> 6",
            Target {
                num_vfs: 6,
                limits: false,
            },
            policy(6, None, None),
        ),
        (
            "pool profile set (lockedMemory 64Mi)",
            Target {
                num_vfs: 6,
                limits: true,
            },
            policy(6, Some(serde_json::json!({"lockedMemory": "64Mi"})), None),
        ),
    ];
    let let_go = Arc::new(AtomicUsize::new(0));
    for (index, (name, target, object)) in phases.into_iter().enumerate() {
        let report = phase(
            &client,
            setup,
            ticks,
            &mut view,
            (&mut states, &mut policies),
            name,
            target,
            object,
            &let_go,
        )
        .await?;
        eprintln!(
            "scale: {name}: specs {}, converged {}, policy status {}",
            seconds(report.spec_written),
            seconds(report.converged),
            seconds(report.policy_status)
        );
        reports.push(report);
        if index == 0 {
            // The steady state after the rollout: nothing changes.
            let before = snapshot(&client, setup, ticks).await?;
            eprintln!("scale: idle for {} s", setup.idle.as_secs());
            let until = tokio::time::Instant::now() + setup.idle;
            drain_until(&mut view, (&mut states, &mut policies), until).await;
            let after = snapshot(&client, setup, ticks).await?;
            reports.push(PhaseReport {
                name: format!("idle ({} s, nothing changes)", setup.idle.as_secs()),
                spec_written: None,
                converged: None,
                policy_status: None,
                most_in_progress: 0,
                rollout: None,
                pods_let_go: 0,
                before,
                after,
            });
        }
    }
    if !setup.kubelets.is_empty() {
        hold_a_vf_everywhere(&client, setup, &mut view, (&mut states, &mut policies)).await?;
        let follower = tokio::spawn(kubelet::follow_pods(
            client.clone(),
            setup
                .kubelets
                .iter()
                .map(|(k, _)| (k.node().to_owned(), k.clone()))
                .collect(),
            Arc::clone(&let_go),
        ));
        let name = format!(
            "numVfs 6 -> 5 over held VFs (maxUnavailableNodes {}, evictPods)",
            setup.max_unavailable
        );
        let rollout = serde_json::json!({"maxUnavailableNodes": setup.max_unavailable, "evictPods": true});
        let report = phase(
            &client,
            setup,
            ticks,
            &mut view,
            (&mut states, &mut policies),
            &name,
            Target {
                num_vfs: 5,
                limits: true,
            },
            policy(
                5,
                Some(serde_json::json!({"lockedMemory": "64Mi"})),
                Some(rollout),
            ),
            &let_go,
        )
        .await;
        follower.abort();
        let report = report?;
        eprintln!(
            "scale: {name}: converged {}, at most {} nodes in progress, {} pods let go",
            seconds(report.converged),
            report.most_in_progress,
            report.pods_let_go
        );
        reports.push(report);
    }
    let state_bytes = sizes(&client).await?;
    let (namespace, name) = &setup.lease;
    let leader = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading the Lease {namespace}/{name}"))?
        .spec
        .and_then(|spec| spec.holder_identity)
        .unwrap_or_default();
    Ok(render(setup, &reports, &state_bytes, &leader))
}

type Streams<'a> = (
    &'a mut futures::stream::BoxStream<'static, Result<Event<NodeState>, watcher::Error>>,
    &'a mut futures::stream::BoxStream<'static, Result<Event<VfPolicy>, watcher::Error>>,
);

fn policy(
    num_vfs: u16,
    profile: Option<serde_json::Value>,
    rollout: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "nodeSelector": {crate::SRIOV_LABEL: "true"},
        "nicSelector": {"pfNames": ["ens1f0"]},
        "numVfs": num_vfs,
        "resourceName": "fast",
        "deviceType": "vfio-pci",
    });
    if let Some(profile) = profile {
        spec["containerProfile"] = profile;
    }
    if let Some(rollout) = rollout {
        spec["rollout"] = rollout;
    }
    serde_json::json!({
        "apiVersion": "vfplane.io/v1alpha1",
        "kind": "VfPolicy",
        "metadata": {"name": POLICY},
        "spec": spec,
    })
}

#[allow(clippy::too_many_arguments)]
async fn phase(
    client: &Client,
    setup: &BenchSetup,
    ticks: u64,
    view: &mut View,
    streams: Streams<'_>,
    name: &str,
    target: Target,
    object: serde_json::Value,
    let_go: &AtomicUsize,
) -> anyhow::Result<PhaseReport> {
    let (states, policies) = streams;
    // Catch up with what the watches have queued, then start the clock.
    drain_until(
        view,
        (&mut *states, &mut *policies),
        tokio::time::Instant::now() + Duration::from_millis(200),
    )
    .await;
    let since: HashMap<String, i64> = view
        .states
        .iter()
        .map(|(node, state)| (node.clone(), state.metadata.generation.unwrap_or(0)))
        .collect();
    let policy_generation = view
        .policy
        .as_ref()
        .and_then(|p| p.metadata.generation)
        .unwrap_or(0);
    let before = snapshot(client, setup, ticks).await?;
    let let_go_before = let_go.load(Ordering::Relaxed);
    let mut in_progress: std::collections::HashSet<String> = view
        .states
        .iter()
        .filter(|(_, state)| in_progress_on_first_pf(state))
        .map(|(node, _)| node.clone())
        .collect();
    let mut most_in_progress = in_progress.len();
    let started = Instant::now();
    Api::<VfPolicy>::all(client.clone())
        .patch(
            POLICY,
            &PatchParams::apply("vfplane-scale-bench").force(),
            &Patch::Apply(object),
        )
        .await
        .with_context(|| format!("{name}: applying the VfPolicy"))?;

    let wanted_vfs = u32::from(target.num_vfs) * u32::try_from(setup.nodes).unwrap_or(u32::MAX);
    let mut progress: HashMap<String, NodeProgress> = HashMap::new();
    let (mut spec_written, mut converged, mut policy_status) = (None, None, None);
    let deadline = tokio::time::Instant::now() + setup.phase_timeout;
    let policy_done = |view: &View| {
        view.policy.as_ref().is_some_and(|p| {
            let generation = p.metadata.generation.unwrap_or(0);
            p.status.as_ref().is_some_and(|s| {
                // A rollout's status counts the old VFs ready on nodes it
                // has not reached yet: with one, it must say done too.
                let rolled = p.spec.rollout.is_none()
                    || s.rollout.as_ref().is_some_and(|r| {
                        r.nodes_done as usize == setup.nodes
                            && r.nodes_in_progress == 0
                            && r.nodes_pending == 0
                    });
                generation > policy_generation
                    && s.observed_generation == Some(generation)
                    && s.matched_nodes as usize == setup.nodes
                    && s.ready_vfs == wanted_vfs
                    && s.requested_vfs == wanted_vfs
                    && rolled
            })
        })
    };
    while spec_written.is_none() || converged.is_none() || policy_status.is_none() {
        let changed = tokio::select! {
            event = states.next() => match event {
                Some(Ok(event)) => apply_state_event(view, event),
                Some(Err(error)) => { eprintln!("scale: NodeState watch: {error}; the watcher retries"); Vec::new() }
                None => anyhow::bail!("{name}: the NodeState watch ended"),
            },
            event = policies.next() => {
                match event {
                    Some(Ok(event)) => apply_policy_event(view, event),
                    Some(Err(error)) => eprintln!("scale: VfPolicy watch: {error}; the watcher retries"),
                    None => anyhow::bail!("{name}: the VfPolicy watch ended"),
                }
                Vec::new()
            },
            () = tokio::time::sleep_until(deadline) => {
                let specced = progress.values().filter(|p| p.spec_ok).count();
                let done = progress.values().filter(|p| p.converged).count();
                let lagging = progress
                    .iter()
                    .find(|(_, p)| !p.converged)
                    .and_then(|(node, _)| view.states.get(node))
                    .map(|state| format!("{}: status {:?}", state.name_any(), state.status))
                    .unwrap_or_default();
                anyhow::bail!(
                    "{name}: not finished after {:?}: {specced} of {} specs written, {done} nodes converged, \
                     policy status {:?}; a node behind: {lagging}",
                    setup.phase_timeout,
                    setup.nodes,
                    view.policy.as_ref().and_then(|p| p.status.as_ref())
                );
            }
        };
        for node in changed {
            if let Some(state) = view.states.get(&node) {
                let from = since.get(&node).copied().unwrap_or(0);
                if in_progress_on_first_pf(state) {
                    in_progress.insert(node.clone());
                } else {
                    in_progress.remove(&node);
                }
                progress.insert(node, target.progress(state, from));
            }
        }
        most_in_progress = most_in_progress.max(in_progress.len());
        let elapsed = started.elapsed().as_secs_f64();
        if spec_written.is_none() && progress.values().filter(|p| p.spec_ok).count() == setup.nodes {
            spec_written = Some(elapsed);
        }
        if converged.is_none() && progress.values().filter(|p| p.converged).count() == setup.nodes {
            converged = Some(elapsed);
        }
        if policy_status.is_none() && policy_done(view) {
            policy_status = Some(elapsed);
        }
    }
    let after = snapshot(client, setup, ticks).await?;
    Ok(PhaseReport {
        name: name.to_owned(),
        spec_written,
        converged,
        policy_status,
        most_in_progress,
        rollout: view
            .policy
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.rollout.clone()),
        pods_let_go: let_go.load(Ordering::Relaxed) - let_go_before,
        before,
        after,
    })
}

/// Whether the node's spec asks a VF count on [`FIRST_PF`] other than the
/// one its agent reports: the node is in a change (or has not reported).
fn in_progress_on_first_pf(state: &NodeState) -> bool {
    let written = state
        .spec
        .pfs
        .iter()
        .find(|pf| pf.pci_address.as_deref() == Some(FIRST_PF))
        .map(|pf| pf.num_vfs);
    let reported = state
        .status
        .as_ref()
        .and_then(|s| s.pfs.iter().find(|pf| pf.pci_address == FIRST_PF))
        .map(|pf| pf.num_vfs);
    written.is_some() && written != reported
}

/// Puts a pod holding VF 0 of [`FIRST_PF`] on every node (its namespace
/// first, with the `default` ServiceAccount the API server's admission
/// wants and no controller-manager here makes), and waits until every
/// node's agent names the pod as the VF's owner.
async fn hold_a_vf_everywhere(
    client: &Client,
    setup: &BenchSetup,
    view: &mut View,
    streams: Streams<'_>,
) -> anyhow::Result<()> {
    let (states, policies) = streams;
    let apply = PatchParams::apply("vfplane-scale-bench").force();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            NAMESPACE,
            &apply,
            &Patch::Apply(
                serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
            ),
        )
        .await
        .context("creating the fleet's namespace")?;
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .patch(
            "default",
            &apply,
            &Patch::Apply(serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}})),
        )
        .await
        .context("creating the fleet namespace's default ServiceAccount")?;
    let begun = Instant::now();
    let first: vfplane_host::PciAddress = FIRST_PF.parse().context("the first PF's address")?;
    futures::stream::iter(&setup.kubelets)
        .map(|(kubelet, host)| async move {
            let model = host
                .discover()
                .with_context(|| format!("discovering node {}", kubelet.node()))?;
            let vf = model
                .pfs
                .iter()
                .find(|pf| pf.pci.address == first)
                .and_then(|pf| pf.vfs.iter().find(|vf| vf.index == 0))
                .with_context(|| format!("node {}: no VF 0 on {FIRST_PF}", kubelet.node()))?;
            let group = vf.pci.iommu_group.with_context(|| {
                format!(
                    "node {}: VF {} has no IOMMU group",
                    kubelet.node(),
                    vf.pci.address
                )
            })?;
            kubelet
                .hold(client, vf.pci.address, group, "vfplane.io/fast")
                .await
                .map_err(|error| anyhow::anyhow!(vfplane_host::error_chain(&error)))
        })
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await?;
    let owned = |view: &View| {
        view.states
            .values()
            .filter(|state| {
                state.status.iter().flat_map(|s| &s.pfs).any(|pf| {
                    pf.pci_address == FIRST_PF && pf.vfs.iter().any(|vf| vf.index == 0 && vf.owner.is_some())
                })
            })
            .count()
    };
    let deadline = tokio::time::Instant::now() + setup.phase_timeout;
    while owned(view) < setup.nodes {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} of {} nodes report their VF's owner after {:?}",
            owned(view),
            setup.nodes,
            setup.phase_timeout
        );
        drain_until(
            view,
            (&mut *states, &mut *policies),
            tokio::time::Instant::now() + Duration::from_millis(500),
        )
        .await;
    }
    eprintln!(
        "scale: a pod holds a VF on each of {} nodes, named as its owner ({:.1} s)",
        setup.nodes,
        begun.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Applies the watches' events until `until`.
async fn drain_until(view: &mut View, streams: Streams<'_>, until: tokio::time::Instant) {
    let (states, policies) = streams;
    loop {
        tokio::select! {
            Some(Ok(event)) = states.next() => { apply_state_event(view, event); }
            Some(Ok(event)) = policies.next() => apply_policy_event(view, event),
            () = tokio::time::sleep_until(until) => return,
        }
    }
}

/// Keeps `view` current; the nodes whose NodeState changed.
fn apply_state_event(view: &mut View, event: Event<NodeState>) -> Vec<String> {
    match event {
        Event::Apply(state) | Event::InitApply(state) => {
            let name = state.name_any();
            view.states.insert(name.clone(), state);
            vec![name]
        }
        Event::Delete(state) => {
            let name = state.name_any();
            view.states.remove(&name);
            vec![name]
        }
        Event::Init | Event::InitDone => Vec::new(),
    }
}

fn apply_policy_event(view: &mut View, event: Event<VfPolicy>) {
    match event {
        Event::Apply(policy) | Event::InitApply(policy) => view.policy = Some(policy),
        Event::Delete(_) => view.policy = None,
        Event::Init | Event::InitDone => {}
    }
}

async fn snapshot(client: &Client, setup: &BenchSetup, ticks: u64) -> anyhow::Result<Snapshot> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("reading the API server's /metrics")?;
    let samples = readings::parse_prometheus(&text);
    let etcd_address = setup.etcd.clone();
    let etcd = tokio::task::spawn_blocking(move || readings::http_get(&etcd_address, "/metrics")).await??;
    let etcd = readings::parse_prometheus(&etcd);
    let gauge =
        |samples: &[Sample], name: &str| samples.iter().find(|s| s.name == name).map_or(0.0, |s| s.value);
    let mut processes = BTreeMap::new();
    let proc_root = Path::new("/proc");
    for replica in &setup.replicas {
        // A replica between two of its restarts reads as nothing.
        let pid = readings::working_process(proc_root, replica.pid);
        let reading = readings::read_process(proc_root, pid, ticks).unwrap_or_default();
        processes.insert(format!("controller {}", replica.name), reading);
    }
    for other in &setup.others {
        processes.insert(
            other.name.clone(),
            readings::read_process(proc_root, other.pid, ticks)?,
        );
    }
    processes.insert(
        "fleet (all agents)".to_owned(),
        readings::read_process(proc_root, setup.fleet_pid, ticks)?,
    );
    Ok(Snapshot {
        at: Some(Instant::now()),
        by_verb: readings::sum_by(
            &samples,
            "apiserver_request_total",
            &["verb", "resource", "subresource", "code"],
        ),
        by_client: readings::sum_by(
            &samples,
            "apiserver_flowcontrol_dispatched_requests_total",
            &["flow_schema"],
        ),
        rejected: readings::sum_by(
            &samples,
            "apiserver_flowcontrol_rejected_requests_total",
            &["flow_schema", "reason"],
        ),
        processes,
        etcd_bytes: gauge(&etcd, "etcd_mvcc_db_total_size_in_bytes"),
        etcd_in_use_bytes: gauge(&etcd, "etcd_mvcc_db_total_size_in_use_in_bytes"),
    })
}

/// The JSON size of two NodeStates: a one-PF node's and a two-PF node's.
async fn sizes(client: &Client) -> anyhow::Result<Vec<(String, usize)>> {
    let mut sizes = Vec::new();
    for index in [0, 1] {
        let name = crate::NodeShape::of(index).name;
        let request =
            http::Request::get(format!("/apis/vfplane.io/v1alpha1/nodestates/{name}")).body(Vec::new())?;
        let text = client
            .request_text(request)
            .await
            .with_context(|| format!("reading NodeState {name}"))?;
        // The object, not an error's body.
        serde_json::from_str::<NodeState>(&text).with_context(|| format!("NodeState {name}: {text}"))?;
        sizes.push((name, text.len()));
    }
    Ok(sizes)
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"))
}

fn render(
    setup: &BenchSetup,
    reports: &[PhaseReport],
    state_bytes: &[(String, usize)],
    leader: &str,
) -> String {
    let mut out = String::new();
    let nodes = setup.nodes as f64;
    let _ = writeln!(
        out,
        "scale bench: {} simulated nodes, {} controller replicas (leader: {leader})",
        setup.nodes,
        setup.replicas.len()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<66} {:>10} {:>10} {:>14} {:>12}",
        "phase", "specs", "converged", "policy status", "most busy"
    );
    for report in reports.iter().filter(|r| r.converged.is_some()) {
        let _ = writeln!(
            out,
            "{:<66} {:>10} {:>10} {:>14} {:>12}",
            report.name,
            seconds(report.spec_written),
            seconds(report.converged),
            seconds(report.policy_status),
            report.most_in_progress
        );
    }
    let _ = writeln!(
        out,
        "(most busy: the most nodes at once whose spec's VF count on {FIRST_PF} differs from the agent's report)"
    );
    for report in reports
        .iter()
        .filter(|r| r.rollout.is_some() || r.pods_let_go > 0)
    {
        let _ = writeln!(
            out,
            "{}: {} pods let go by the fleet's kubelets; the policy's rollout status at the end: {}",
            report.name,
            report.pods_let_go,
            report.rollout.as_ref().map_or_else(
                || "none".to_owned(),
                |r| serde_json::to_string(r).unwrap_or_default()
            )
        );
    }
    for report in reports {
        let span = match (report.before.at, report.after.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        // A change is counted per node; the idle phase per node and minute.
        let idle = report.converged.is_none();
        let (per, unit) = if idle {
            (nodes * (span / 60.0).max(f64::EPSILON), "per node per minute")
        } else {
            (nodes, "per node")
        };
        let _ = writeln!(out);
        let _ = writeln!(out, "== {} ({span:.1} s)", report.name);
        let _ = writeln!(out, "requests by client (FlowSchema)            count   {unit}");
        for (client, count) in readings::growth(&report.before.by_client, &report.after.by_client) {
            let _ = writeln!(out, "  {client:<38} {count:>8.0}   {:>8.3}", count / per);
        }
        for (key, count) in readings::growth(&report.before.rejected, &report.after.rejected) {
            let _ = writeln!(out, "  rejected: {key:<28} {count:>8.0}   {:>8.3}", count / per);
        }
        let _ = writeln!(
            out,
            "requests by verb, resource, subresource, code  count   {unit}"
        );
        for (key, count) in readings::growth(&report.before.by_verb, &report.after.by_verb) {
            let _ = writeln!(out, "  {key:<42} {count:>8.0}   {:>8.3}", count / per);
        }
        let _ = writeln!(
            out,
            "process                                 CPU s   CPU %   RSS MiB  peak RSS MiB"
        );
        for (name, after) in &report.after.processes {
            let before = report.before.processes.get(name).copied().unwrap_or_default();
            let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64();
            let _ = writeln!(
                out,
                "  {name:<36} {cpu:>6.1}  {:>6.1}  {:>8.1}  {:>12.1}",
                100.0 * cpu / span.max(f64::EPSILON),
                after.rss_kib as f64 / 1024.0,
                after.peak_rss_kib as f64 / 1024.0
            );
        }
        let _ = writeln!(
            out,
            "etcd database: {:.1} MiB ({:.1} MiB in use)",
            report.after.etcd_bytes / 1_048_576.0,
            report.after.etcd_in_use_bytes / 1_048_576.0
        );
    }
    let _ = writeln!(out);
    for (name, bytes) in state_bytes {
        let _ = writeln!(out, "NodeState {name} as JSON: {bytes} bytes");
    }
    out
}

/// The kernel's clock tick (`getconf CLK_TCK`), for `/proc/<pid>/stat`
/// times; 100, Linux's USER_HZ, when getconf is missing.
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}
