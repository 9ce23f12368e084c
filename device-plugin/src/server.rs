//! The `DevicePlugin` gRPC service of one pool.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vfplane_host::{Host, PciAddress};
use vfplane_proto::container_env::{VfInfo, info_env_var};
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::pool::{Pool, cdi_device_name, pci_env_var, resource_name};
use vfplane_proto::vf_state;

use crate::cdi::{CdiEntry, CdiWriter};
use crate::inventory::{self, DeviceStatus, PoolView};
use crate::metrics::{NodeMetrics, PoolMetrics, bump};
use crate::preferred::preferred_allocation;

/// How often a VF's handed-out mark is looked at meanwhile.
const SCRUB_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What every pool shares: the host, the VF state dir, pool ownership of
/// every VF, the CDI spec writer, node metrics.
#[derive(Debug)]
pub(crate) struct NodeContext {
    pub host: Host,
    pub state_dir: PathBuf,
    /// How long Allocate waits for a VF's pending scrub.
    pub scrub_wait: std::time::Duration,
    pub owners: RwLock<Arc<BTreeMap<PciAddress, String>>>,
    pub cdi: CdiWriter,
    /// What a container of each VF with a VFIO node gets (its node, its
    /// pool's profile), as last scanned and as handed out since: what the
    /// NRI plugin adjusts containers from.
    pub edits: RwLock<Arc<BTreeMap<PciAddress, CdiEntry>>>,
    /// Whether the NRI plugin is registered with the runtime.
    pub nri: crate::nri::NriState,
    pub metrics: NodeMetrics,
    /// Counts the scanner's passes: the DRA driver's slices and health
    /// stream look again after each.
    pub scans: watch::Sender<u64>,
}

impl NodeContext {
    pub fn vf_edits(&self) -> Arc<BTreeMap<PciAddress, CdiEntry>> {
        Arc::clone(
            &self
                .edits
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Adds VFs just handed out to the table (the scanner replaces it
    /// whole at its next scan).
    pub fn add_vf_edits(&self, devices: &[(PciAddress, CdiEntry)]) {
        let mut edits = self
            .edits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if devices.iter().all(|(a, e)| edits.get(a) == Some(e)) {
            return;
        }
        let mut table = BTreeMap::clone(&edits);
        table.extend(devices.iter().cloned());
        *edits = Arc::new(table);
    }

    pub fn owners(&self) -> Arc<BTreeMap<PciAddress, String>> {
        Arc::clone(
            &self
                .owners
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

/// One pool's state, shared by its gRPC service, the scanner that
/// publishes its devices and the supervisor.
#[derive(Debug)]
pub(crate) struct PoolShared {
    pub name: String,
    pub socket_path: PathBuf,
    pub config: RwLock<Arc<Pool>>,
    /// The devices as last scanned; `None` before the first scan. Receivers
    /// are woken only when the kubelet would see a difference.
    pub view: watch::Sender<Option<Arc<PoolView>>>,
    /// Set when the pool stops: its streams end.
    pub stopped: watch::Sender<bool>,
    pub metrics: PoolMetrics,
    pub node: Arc<NodeContext>,
}

impl PoolShared {
    pub fn new(pool: Pool, socket_path: PathBuf, node: Arc<NodeContext>) -> Self {
        Self {
            name: pool.name.clone(),
            socket_path,
            config: RwLock::new(Arc::new(pool)),
            view: watch::Sender::new(None),
            stopped: watch::Sender::new(false),
            metrics: PoolMetrics::default(),
            node,
        }
    }

    pub fn config(&self) -> Arc<Pool> {
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    pub fn set_config(&self, pool: Pool) {
        *self
            .config
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(pool);
    }

    pub fn current_view(&self) -> Option<Arc<PoolView>> {
        self.view.borrow().clone()
    }

    pub fn resource(&self) -> String {
        resource_name(&self.name)
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct DevicePluginService {
    pub shared: Arc<PoolShared>,
}

/// Decrements the open-stream gauge when a stream task ends, however.
struct StreamGuard(Arc<PoolShared>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.metrics.streams.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(pool = %self.0.name, "ListAndWatch stream closed");
    }
}

#[tonic::async_trait]
impl dp::device_plugin_server::DevicePlugin for DevicePluginService {
    type ListAndWatchStream = ReceiverStream<Result<dp::ListAndWatchResponse, Status>>;

    async fn get_device_plugin_options(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    /// Sends the pool's devices now and again on every change the kubelet
    /// would see, from a spawned task feeding a channel; a failed send means
    /// the kubelet left, and the task ends.
    async fn list_and_watch(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let shared = Arc::clone(&self.shared);
        let (tx, rx) = mpsc::channel(4);
        let mut views = shared.view.subscribe();
        let mut stopped = shared.stopped.subscribe();
        shared.metrics.streams.fetch_add(1, Ordering::Relaxed);
        tracing::info!(pool = %shared.name, "ListAndWatch stream opened");
        let guard = StreamGuard(Arc::clone(&shared));
        tokio::spawn(async move {
            let _guard = guard;
            loop {
                let current = views.borrow_and_update().clone();
                if let Some(view) = current {
                    let message = view.list_and_watch();
                    let devices = message.devices.len();
                    if tx.send(Ok(message)).await.is_err() {
                        tracing::info!(pool = %shared.name, "the kubelet left the ListAndWatch stream");
                        return;
                    }
                    bump(&shared.metrics.updates_sent);
                    tracing::debug!(pool = %shared.name, devices, "ListAndWatch update sent");
                }
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { return },
                    _ = stopped.wait_for(|s| *s) => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        bump(&self.shared.metrics.preferred_allocations);
        let view = self
            .shared
            .current_view()
            .ok_or_else(|| Status::unavailable("the pool's devices are not scanned yet"))?;
        let policy = self.shared.config().preferred_allocation;
        let dir = &self.shared.node.state_dir;
        // VFs awaiting their scrub come last: Allocate would wait for it.
        let awaiting_scrub =
            |address: PciAddress| matches!(vf_state::handed_out_at(dir, address), Ok(Some(_)));
        let container_responses = request
            .into_inner()
            .container_requests
            .iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                dp::ContainerPreferredAllocationResponse {
                    device_i_ds: preferred_allocation(
                        &view,
                        policy,
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                        &awaiting_scrub,
                    ),
                }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let request = request.into_inner();
        let requested: BTreeSet<PciAddress> = request
            .container_requests
            .iter()
            .flat_map(|c| &c.devices_ids)
            .filter_map(|id| id.parse().ok())
            .collect();
        wait_for_scrubs(&self.shared.node, &self.shared.name, &requested).await;
        match self.allocate_all(&request) {
            Ok((response, devices)) => {
                bump(&self.shared.metrics.allocations);
                self.shared
                    .metrics
                    .allocated_devices
                    .fetch_add(devices as u64, Ordering::Relaxed);
                Ok(Response::new(response))
            }
            Err(status) => {
                bump(&self.shared.metrics.allocation_errors);
                tracing::warn!(pool = %self.shared.name, code = ?status.code(), message = status.message(), "Allocate refused");
                Err(status)
            }
        }
    }

    async fn pre_start_container(
        &self,
        _request: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

/// The options every pool advertises.
pub(crate) fn options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

impl DevicePluginService {
    /// The response and the number of devices it hands out.
    fn allocate_all(&self, request: &dp::AllocateRequest) -> Result<(dp::AllocateResponse, usize), Status> {
        let shared = &self.shared;
        let view = shared
            .current_view()
            .ok_or_else(|| Status::unavailable("the pool's devices are not scanned yet"))?;
        if request.container_requests.is_empty() {
            return Err(Status::invalid_argument(
                "AllocateRequest has no container requests",
            ));
        }
        let pool = shared.config();
        let owners = shared.node.owners();
        let mut seen = BTreeSet::new();
        let mut container_responses = Vec::with_capacity(request.container_requests.len());
        let mut count = 0;
        for (index, container) in request.container_requests.iter().enumerate() {
            let known = self.validate_ids(index, &container.devices_ids, &view, &owners, &mut seen)?;
            let mut fresh = Vec::with_capacity(known.len());
            for device in known {
                let now = inventory::probe_now(
                    &shared.node.host,
                    &shared.node.state_dir,
                    device,
                    pool.allow_no_iommu,
                );
                if !now.health.is_healthy() {
                    return Err(Status::failed_precondition(format!(
                        "device {} of {} is unhealthy: {}",
                        now.address,
                        shared.resource(),
                        now.health
                    )));
                }
                refuse_unscrubbed(&shared.node, &shared.resource(), now.address)?;
                fresh.push(now);
            }
            count += fresh.len();
            container_responses.push(self.container_response(&pool, &fresh)?);
        }
        // Every VF in the answer is dirty from now until the agent scrubs
        // it: the mark is on disk before the kubelet hears of the VF.
        for address in &seen {
            vf_state::mark_handed_out(&shared.node.state_dir, *address).map_err(|error| {
                Status::internal(format!(
                    "cannot mark device {address} handed out under {}: {error}",
                    shared.node.state_dir.display()
                ))
            })?;
        }
        Ok((dp::AllocateResponse { container_responses }, count))
    }

    /// Checks one container's IDs: present, well-formed, not repeated, of
    /// this pool. Returns the devices in request order.
    fn validate_ids<'v>(
        &self,
        index: usize,
        ids: &[String],
        view: &'v PoolView,
        owners: &BTreeMap<PciAddress, String>,
        seen: &mut BTreeSet<PciAddress>,
    ) -> Result<Vec<&'v DeviceStatus>, Status> {
        let resource = self.shared.resource();
        if ids.is_empty() {
            return Err(Status::invalid_argument(format!(
                "container request {index} names no device of {resource}"
            )));
        }
        let mut devices = Vec::with_capacity(ids.len());
        for id in ids {
            if id.trim().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "container request {index} holds an empty device ID"
                )));
            }
            let address: PciAddress = id.parse().map_err(|e| {
                Status::invalid_argument(format!("device ID {id:?} is not a device of {resource}: {e}"))
            })?;
            if !seen.insert(address) {
                return Err(Status::invalid_argument(format!(
                    "device ID {id} is requested more than once"
                )));
            }
            match (view.get(address), owners.get(&address)) {
                (Some(device), _) => devices.push(device),
                (None, Some(owner)) if owner != &self.shared.name => {
                    return Err(Status::invalid_argument(format!(
                        "device ID {id} belongs to {}, not {resource}",
                        resource_name(owner)
                    )));
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown device ID {id}: not a device of {resource}"
                    )));
                }
            }
        }
        Ok(devices)
    }

    fn container_response(
        &self,
        pool: &Pool,
        devices: &[DeviceStatus],
    ) -> Result<dp::ContainerAllocateResponse, Status> {
        let cdi = &self.shared.node.cdi;
        check_profile_can_be_applied(&self.shared.node, pool)?;
        let mut specs = vec![device_spec("/dev/vfio/vfio")];
        let mut nodes: Vec<(PciAddress, CdiEntry)> = Vec::with_capacity(devices.len());
        let mut infos = BTreeMap::new();
        let mut addresses = Vec::with_capacity(devices.len());
        for device in devices {
            // A healthy device has a VFIO node; refuse rather than hand out
            // a device without one should that ever not hold.
            let node = device.vfio_node.ok_or_else(|| {
                Status::failed_precondition(format!("device {} has no VFIO node", device.address))
            })?;
            let path = node.path();
            if !specs.iter().any(|s| s.host_path == path) {
                specs.push(device_spec(&path));
            }
            nodes.push((device.address, CdiEntry::new(node, pool, device.facts.as_ref())));
            infos.insert(device.address, vf_info(device, node));
            addresses.push(device.address.to_string());
        }
        let info = serde_json::to_string(&infos)
            .map_err(|e| Status::internal(format!("cannot render the VF info: {e}")))?;
        let envs = [
            (pci_env_var(&pool.name), addresses.join(",")),
            (info_env_var(&pool.name), info),
        ]
        .into_iter()
        .collect();
        self.shared.node.add_vf_edits(&nodes);
        let cdi_devices = if cdi.enabled() {
            cdi.ensure(&nodes)
                .map_err(|e| Status::internal(vfplane_host::error_chain(&e)))?;
            nodes
                .iter()
                .map(|(address, _)| dp::CdiDevice {
                    name: cdi_device_name(*address),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(dp::ContainerAllocateResponse {
            envs,
            mounts: Vec::new(),
            devices: specs,
            annotations: Default::default(),
            cdi_devices,
        })
    }
}

/// Waits, up to the node's `scrub_wait`, while a VF of `requested` carries a
/// handed-out mark and is not quarantined, or is being scrubbed. The kubelet
/// offers a VF again the moment its last pod is gone, seconds before the
/// agent has scrubbed it (it lets the release settle, then resets the VF),
/// and a refused Allocate fails the pod for good (the kubelet does not
/// retry). Waiting holds up that one pod's admission for a few seconds
/// instead; [`refuse_unscrubbed`] still refuses a VF marked after it. `who`
/// names the pool or driver in the log.
pub(crate) async fn wait_for_scrubs(node: &NodeContext, who: &str, requested: &BTreeSet<PciAddress>) {
    let dir = &node.state_dir;
    // Marked and not quarantined, or its scrub running: the agent
    // writes `scrub-pending` before the reset and clears the mark and
    // the state one after the other, so either may be seen alone.
    let pending = |address: &PciAddress| match vf_state::read_vf_state(dir, *address) {
        Ok(Some(Ok(vf_state::VfState::ScrubFailed))) => false,
        Ok(Some(Ok(vf_state::VfState::ScrubPending))) => true,
        _ => matches!(vf_state::handed_out_at(dir, *address), Ok(Some(_))),
    };
    let began = tokio::time::Instant::now();
    let mut waited_for: Vec<PciAddress> = Vec::new();
    loop {
        let waiting: Vec<PciAddress> = requested.iter().copied().filter(pending).collect();
        if waiting.is_empty() {
            if !waited_for.is_empty() {
                tracing::info!(pool = %who, vfs = ?waited_for, waited = ?began.elapsed(), "scrubbed meanwhile; handing out");
            }
            return;
        }
        if began.elapsed() >= node.scrub_wait {
            return;
        }
        if waited_for.is_empty() {
            tracing::info!(pool = %who, vfs = ?waiting, "the kubelet asks for VFs the agent has not scrubbed yet; waiting for the scrub");
            waited_for = waiting;
        }
        tokio::time::sleep(SCRUB_POLL).await;
    }
}

/// Refuses a VF handed out before and not scrubbed since, or under a scrub
/// that is still running: its last container may be gone a moment before
/// the agent notices, and the kubelet offers it again in that moment (a
/// running scrub leaves the VF Healthy, `health.rs`). `what` names where
/// the VF comes from (`vfplane.io/fast`, `pool fast`).
pub(crate) fn refuse_unscrubbed(node: &NodeContext, what: &str, address: PciAddress) -> Result<(), Status> {
    let dir = &node.state_dir;
    if let Ok(Some(Ok(vf_state::VfState::ScrubPending))) = vf_state::read_vf_state(dir, address) {
        return Err(Status::failed_precondition(format!(
            "device {address} of {what} is being scrubbed by the agent (waited {:?}); it is \
             offered again once scrubbed",
            node.scrub_wait
        )));
    }
    match vf_state::handed_out_at(dir, address) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Status::failed_precondition(format!(
            "device {address} of {what} was given to a container before and the agent has not \
             scrubbed it yet (waited {:?}); it is offered again once scrubbed",
            node.scrub_wait
        ))),
        Err(error) => Err(Status::internal(format!(
            "cannot read the handed-out mark of device {address} under {}: {error}",
            dir.display()
        ))),
    }
}

/// Refuses a VF of a pool whose profile the OCI hook must check when this
/// plugin cannot name the hook (no CDI or no hook installed); warns, without
/// refusing, while vfplane's NRI plugin is not registered with the runtime.
pub(crate) fn check_profile_can_be_applied(node: &NodeContext, pool: &Pool) -> Result<(), Status> {
    let Some(wants) = crate::cdi::needs_hook(pool) else {
        return Ok(());
    };
    if !node.nri.connected() {
        // Not a refusal: the runtime may be restarting (the plugin
        // reconnects within seconds), and a pod refused here is
        // failed for good by the kubelet. A container created
        // before the plugin is back fails at the hook's check,
        // which the kubelet retries.
        tracing::warn!(
            pool = %pool.name,
            wants = %wants,
            "handing out a VF while vfplane's NRI plugin is not registered with the container runtime: \
             the container starts only once it is (is NRI enabled in the runtime, and its socket \
             mounted at --nri-socket?)"
        );
    }
    if !node.cdi.has_hook() {
        return Err(Status::failed_precondition(format!(
            "pool {} gives its containers {wants}, which vfplane-oci-hook checks, \
             but this plugin writes no CDI spec or has no vfplane-oci-hook installed (--no-cdi, \
             or --oci-hook-dir unset or not writable)",
            pool.name
        )));
    }
    Ok(())
}

/// What a container is told about a VF with VFIO node `node`.
pub(crate) fn vf_info(device: &DeviceStatus, node: crate::health::VfioNode) -> VfInfo {
    let facts = device.facts.as_ref();
    VfInfo {
        group: node.group(),
        vfio_device: node.path(),
        numa_node: facts.and_then(|f| f.numa_node),
        pf: facts.and_then(|f| f.pf),
        vf_index: facts.and_then(|f| f.vf_index),
        mac: device.mac.clone(),
    }
}

/// A read-write device node at the same path on the host and in the
/// container. The dev root is where this process sees the host's `/dev`;
/// the kubelet and the runtime see it at `/dev`.
fn device_spec(path: &str) -> dp::DeviceSpec {
    dp::DeviceSpec {
        container_path: path.to_owned(),
        host_path: path.to_owned(),
        permissions: "rw".to_owned(),
    }
}
