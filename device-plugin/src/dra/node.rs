//! `NodePrepareResources` and `NodeUnprepareResources`.
//!
//! The kubelet sends a claim's namespace, name and UID only; the driver
//! reads the ResourceClaim for what the scheduler allocated, and answers
//! per claim UID (an error for one claim does not fail the others).
//!
//! Prepare, for each of the claim's results of driver `vfplane.io`: the
//! device must be a VF of a DRA pool on this node, healthy, scrubbed since
//! its last tenant and in no other prepared claim. Its VFIO node and OCI
//! hook are the VF's entry in the node's CDI spec (`vfplane.io/vf=<addr>`,
//! as for the device plugin); its environment
//! (`PCIDEVICE_VFPLANE_IO_<POOL>_<DEVICE>` and `..._INFO`, which the in-pod
//! driver and vfplane's NRI plugin read) is the claim's own CDI spec
//! (`vfplane.io/claim=<uid>-<device>`). The claim's `VfConfig` settings
//! (MAC, VLAN, trust, spoof checking; see `vfplane_proto::vf_config`) go to
//! the agent, which alone writes VF settings, through the state directory;
//! prepare answers once the agent says the VF has them (or its pool's, for
//! a claim that sets none), and passes a refusal on. The checkpoint is
//! written before the kubelet hears the answer; a claim already in it gets
//! the same answer again.
//!
//! Unprepare (the claim's last pod on the node is gone): the claim's
//! settings and CDI spec go, each VF is marked handed out, so the agent
//! scrubs it (which writes the pool's settings again and checks them) and
//! nobody gets it before (the slice taints it meanwhile, and prepare
//! refuses it), and the claim leaves the checkpoint. An unknown UID is
//! already unprepared.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::resource::v1::{DeviceAllocationConfiguration, ResourceClaim};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use vfplane_host::PciAddress;
use vfplane_proto::dra::v1 as drapb;
use vfplane_proto::vf_config::{self, VfConfig, VfOverrides};
use vfplane_proto::vf_state;

use super::checkpoint::{Checkpoint, PreparedClaim, PreparedDevice};
use super::{DRIVER_NAME, DraConfig, DraDevice, PoolRegistry, dra_devices};
use crate::cdi::{CdiEntry, ClaimEnv};
use crate::inventory;
use crate::metrics::bump;
use crate::server::NodeContext;

/// The DRA service.
#[derive(Clone)]
pub struct DraNode {
    pub(crate) config: DraConfig,
    pub(crate) registry: PoolRegistry,
    pub(crate) node: Arc<NodeContext>,
    pub(crate) client: kube::Client,
    /// The prepared claims; held across a whole prepare or unprepare so
    /// two calls never hand out one VF twice.
    pub(crate) checkpoint: Arc<Mutex<Checkpoint>>,
}

impl std::fmt::Debug for DraNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DraNode")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One device the scheduler allocated to a claim from this driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The claim's requests it serves (base names).
    pub requests: Vec<String>,
    /// The pool named in the result.
    pub pool: String,
    /// The device name.
    pub device: String,
    /// The claim's (and its class's) `VfConfig` settings for it.
    pub settings: VfOverrides,
}

/// The devices `claim` was allocated from this driver, checked against
/// `node_name` (the one pool this driver publishes per node), each with the
/// `VfConfig` settings that apply to it: the class's configuration first,
/// then the claim's, a later field over an earlier one.
///
/// # Errors
/// The claim is not allocated, names a device of another node's pool, or
/// carries configuration for this driver that is not a `VfConfig`, or
/// gives one MAC to several devices.
pub fn allocated_devices(claim: &ResourceClaim, node_name: &str) -> Result<Vec<Allocated>, String> {
    let id = claim_id(claim);
    let allocation = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .ok_or_else(|| format!("ResourceClaim {id} is not allocated"))?;
    // (device, the request it serves, as the result names it).
    let mut by_device: BTreeMap<String, (Allocated, Vec<String>)> = BTreeMap::new();
    for result in allocation
        .results
        .iter()
        .flatten()
        .filter(|r| r.driver == DRIVER_NAME)
    {
        if result.pool != node_name {
            return Err(format!(
                "ResourceClaim {id}: device {} is of pool {}, not this node's ({node_name})",
                result.device, result.pool
            ));
        }
        let base = result.request.split('/').next().unwrap_or_default().to_owned();
        let (entry, full) = by_device.entry(result.device.clone()).or_insert_with(|| {
            (
                Allocated {
                    requests: Vec::new(),
                    pool: result.pool.clone(),
                    device: result.device.clone(),
                    settings: VfOverrides::default(),
                },
                Vec::new(),
            )
        });
        if !entry.requests.contains(&base) {
            entry.requests.push(base);
        }
        full.push(result.request.clone());
    }
    let mut configs: Vec<(usize, &DeviceAllocationConfiguration)> = allocation
        .config
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| c.opaque.as_ref().is_some_and(|o| o.driver == DRIVER_NAME))
        .collect();
    // The class's first: the claim's own settings win.
    configs.sort_by_key(|(_, c)| c.source != "FromClass");
    for (index, config) in configs {
        let Some(opaque) = &config.opaque else { continue };
        let from = if config.source == "FromClass" {
            "its DeviceClass"
        } else {
            "the claim"
        };
        let settings = VfConfig::overrides_from(&opaque.parameters.0).map_err(|error| {
            format!(
                "ResourceClaim {id}: config[{index}] (from {from}) is not a {kind} of {api}: {error}",
                kind = vf_config::KIND,
                api = vf_config::API_VERSION
            )
        })?;
        let applies = |full: &[String]| {
            let named = config.requests.as_deref().unwrap_or_default();
            named.is_empty()
                || full.iter().any(|request| {
                    named
                        .iter()
                        .any(|n| n == request || request.split('/').next() == Some(n.as_str()))
                })
        };
        let targets: Vec<&mut Allocated> = by_device
            .values_mut()
            .filter(|(_, full)| applies(full))
            .map(|(entry, _)| entry)
            .collect();
        if let Some(mac) = settings.mac
            && targets.len() > 1
        {
            return Err(format!(
                "ResourceClaim {id}: config[{index}] gives MAC {mac} to {} devices ({}); a MAC \
                 is for one VF: name one request in the config's requests",
                targets.len(),
                targets
                    .iter()
                    .map(|t| t.device.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for target in targets {
            target.settings = target.settings.then(settings);
        }
    }
    Ok(by_device.into_values().map(|(entry, _)| entry).collect())
}

fn claim_id(claim: &ResourceClaim) -> String {
    format!(
        "{}/{}",
        claim.metadata.namespace.as_deref().unwrap_or_default(),
        claim.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The kubelet's answer for one prepared claim.
fn response_devices(node_name: &str, uid: &str, prepared: &PreparedClaim) -> Vec<drapb::Device> {
    prepared
        .devices
        .iter()
        .map(|d| drapb::Device {
            request_names: d.requests.clone(),
            pool_name: node_name.to_owned(),
            device_name: d.device.clone(),
            cdi_device_ids: vec![
                vfplane_proto::pool::cdi_device_name(d.address),
                crate::cdi::claim_cdi_device_name(uid, &d.device),
            ],
            share_id: None,
        })
        .collect()
}

impl DraNode {
    async fn read_claim(&self, claim: &drapb::Claim) -> Result<ResourceClaim, String> {
        let id = format!("{}/{}", claim.namespace, claim.name);
        if claim.namespace.is_empty() || claim.name.is_empty() || claim.uid.is_empty() {
            return Err(format!(
                "the kubelet named claim {id:?} with UID {:?}: namespace, name and UID are all required",
                claim.uid
            ));
        }
        let api: kube::Api<ResourceClaim> = kube::Api::namespaced(self.client.clone(), &claim.namespace);
        let found = api.get(&claim.name).await.map_err(|e| {
            format!(
                "cannot read ResourceClaim {id}: {}",
                vfplane_host::error_chain(&e)
            )
        })?;
        let uid = found.metadata.uid.as_deref().unwrap_or_default();
        if uid != claim.uid {
            return Err(format!(
                "ResourceClaim {id} has UID {uid}, not {}: it was deleted and made again",
                claim.uid
            ));
        }
        Ok(found)
    }

    /// Prepares one claim; the checkpoint is locked by the caller.
    async fn prepare_one(
        &self,
        checkpoint: &mut Checkpoint,
        claim: &drapb::Claim,
    ) -> Result<Vec<drapb::Device>, String> {
        if let Some(prepared) = checkpoint.claims.get(&claim.uid) {
            return Ok(response_devices(&self.config.node_name, &claim.uid, prepared));
        }
        let began = std::time::Instant::now();
        let found = self.read_claim(claim).await?;
        let allocated = allocated_devices(&found, &self.config.node_name)?;
        let id = format!("{}/{}", claim.namespace, claim.name);
        if !self.node.cdi.enabled() {
            return Err(format!(
                "cannot prepare {id}: this plugin writes no CDI spec (--no-cdi), and a DRA device \
                 reaches its container only through CDI"
            ));
        }
        let devices = dra_devices(&self.registry);
        let mut chosen: Vec<(Allocated, DraDevice)> = Vec::with_capacity(allocated.len());
        for wanted in allocated {
            let device = devices.get(&wanted.device).cloned().ok_or_else(|| {
                format!(
                    "ResourceClaim {id}: device {} is not a VF of a vfplane DRA pool on node {} \
                     (it left its pool, or vanished, since it was allocated)",
                    wanted.device, self.config.node_name
                )
            })?;
            if let Some(other) = checkpoint.holder(device.status.address) {
                return Err(format!(
                    "ResourceClaim {id}: device {} is prepared for claim {other} already",
                    wanted.device
                ));
            }
            chosen.push((wanted, device));
        }
        let addresses: BTreeSet<PciAddress> = chosen.iter().map(|(_, d)| d.status.address).collect();
        crate::server::wait_for_scrubs(&self.node, DRIVER_NAME, &addresses).await;

        let mut entries: Vec<(PciAddress, CdiEntry)> = Vec::with_capacity(chosen.len());
        let mut env = Vec::with_capacity(chosen.len());
        let mut settings = Vec::with_capacity(chosen.len());
        let mut prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices: Vec::with_capacity(chosen.len()),
        };
        for (wanted, device) in &chosen {
            // The claim's profile makes the pool's stricter for its
            // containers: the CDI entry, the runtime's edits and the
            // profile check are of that.
            let pool = super::pool_for_claim(&device.pool, &wanted.settings);
            let pool = pool.as_ref();
            let now = inventory::probe_now(
                &self.node.host,
                &self.node.state_dir,
                &device.status,
                pool.allow_no_iommu,
            );
            if !now.health.is_healthy() {
                return Err(format!(
                    "ResourceClaim {id}: device {} ({}) is unhealthy: {}",
                    device.name, now.address, now.health
                ));
            }
            crate::server::refuse_unscrubbed(&self.node, &format!("pool {}", pool.name), now.address)
                .map_err(|status| format!("ResourceClaim {id}: {}", status.message()))?;
            crate::server::check_profile_can_be_applied(&self.node, pool)
                .map_err(|status| format!("ResourceClaim {id}: {}", status.message()))?;
            let node = now
                .vfio_node
                .ok_or_else(|| format!("ResourceClaim {id}: device {} has no VFIO node", device.name))?;
            entries.push((now.address, CdiEntry::new(node, pool, now.facts.as_ref())));
            let mut info = crate::server::vf_info(&now, node);
            if let Some(mac) = wanted.settings.mac {
                info.mac = Some(mac.to_string());
            }
            env.push(ClaimEnv {
                device: device.name.clone(),
                pool: pool.name.clone(),
                address: now.address,
                info,
            });
            settings.push((device.name.clone(), now.address, wanted.settings));
            prepared.devices.push(PreparedDevice {
                requests: wanted.requests.clone(),
                device: device.name.clone(),
                address: now.address,
                pool: pool.name.clone(),
            });
        }
        let undo = |checkpoint: &mut Checkpoint| {
            checkpoint.claims.remove(&claim.uid);
            let _ = self.node.cdi.remove_claim(&claim.uid);
            for (_, address, _) in &settings {
                let _ = vf_config::clear_claim_config(&self.node.state_dir, *address);
            }
        };
        // The settings first: their file is also what the scanner reads a
        // prepared VF's profile from when it rewrites the CDI entries and
        // the runtime's edits, so it must be there before they are written.
        if let Err(error) = give_settings(&self.node.state_dir, &id, &settings, SETTINGS_TIMEOUT).await {
            undo(checkpoint);
            return Err(error);
        }
        self.node.add_vf_edits(&entries);
        let written = self
            .node
            .cdi
            .ensure(&entries)
            .and_then(|()| self.node.cdi.write_claim(&claim.uid, &env));
        if let Err(error) = written {
            undo(checkpoint);
            return Err(vfplane_host::error_chain(&error));
        }
        checkpoint.claims.insert(claim.uid.clone(), prepared);
        if let Err(error) = checkpoint.write(&self.config.checkpoint_path()) {
            undo(checkpoint);
            return Err(vfplane_host::error_chain(&error));
        }
        let prepared = checkpoint
            .claims
            .get(&claim.uid)
            .ok_or("the claim left the checkpoint")?;
        tracing::info!(
            claim = %id,
            uid = %claim.uid,
            devices = ?prepared.devices.iter().map(|d| d.address.to_string()).collect::<Vec<_>>(),
            took_ms = began.elapsed().as_millis(),
            "claim prepared"
        );
        Ok(response_devices(&self.config.node_name, &claim.uid, prepared))
    }

    /// Unprepares one claim; the checkpoint is locked by the caller.
    fn unprepare_one(&self, checkpoint: &mut Checkpoint, claim: &drapb::Claim) -> Result<(), String> {
        let Some(prepared) = checkpoint.claims.get(&claim.uid).cloned() else {
            tracing::debug!(uid = %claim.uid, "unprepare of a claim not prepared here: nothing to do");
            return Ok(());
        };
        // The claim's settings go (the agent gives the VF its pool's again,
        // and the scrub checks them). Then dirty: once the claim leaves
        // the checkpoint nothing else says its VFs were used. Released: the
        // kubelet unprepares only after the claim's containers stopped, so
        // the agent need not wait.
        for device in &prepared.devices {
            vf_config::clear_claim_config(&self.node.state_dir, device.address).map_err(|error| {
                format!(
                    "cannot remove device {} ({})'s claim settings under {}: {error}",
                    device.device,
                    device.address,
                    self.node.state_dir.display()
                )
            })?;
            vf_state::mark_released(&self.node.state_dir, device.address).map_err(|error| {
                format!(
                    "cannot mark device {} ({}) for its scrub under {}: {error}",
                    device.device,
                    device.address,
                    self.node.state_dir.display()
                )
            })?;
        }
        self.node
            .cdi
            .remove_claim(&claim.uid)
            .map_err(|e| vfplane_host::error_chain(&e))?;
        checkpoint.claims.remove(&claim.uid);
        if let Err(error) = checkpoint.write(&self.config.checkpoint_path()) {
            checkpoint.claims.insert(claim.uid.clone(), prepared);
            return Err(vfplane_host::error_chain(&error));
        }
        tracing::info!(
            claim = %format!("{}/{}", prepared.namespace, prepared.name),
            uid = %claim.uid,
            "claim unprepared; its VFs are scrubbed before anyone gets them"
        );
        Ok(())
    }
}

/// How long prepare waits for the agent to give a claim's VFs their
/// settings (one agent pass; the agent looks at the state directory every
/// 200 ms).
pub const SETTINGS_TIMEOUT: Duration = Duration::from_secs(20);

/// Hands each device's settings to the agent (`vf_config`) and waits for
/// its answer, so that a claim's container starts on a VF that has them:
/// its claim's, or its pool's when the claim sets none (a VF the last
/// claim was refused on may still carry part of that claim's settings
/// until the agent has been by).
///
/// # Errors
/// A file that cannot be written or read, the agent's refusal (the
/// message the kubelet shows in the pod's events), or no answer within
/// `timeout`.
async fn give_settings(
    dir: &Path,
    id: &str,
    devices: &[(String, PciAddress, VfOverrides)],
    timeout: Duration,
) -> Result<(), String> {
    for (device, address, settings) in devices {
        vf_config::write_claim_config(dir, *address, settings).map_err(|error| {
            format!(
                "ResourceClaim {id}: cannot write device {device} ({address})'s settings under {}: {error}",
                dir.display()
            )
        })?;
    }
    let deadline = Instant::now() + timeout;
    for (device, address, settings) in devices {
        let words = settings.to_string();
        let shown = if words.is_empty() {
            "its pool's".to_owned()
        } else {
            words.clone()
        };
        loop {
            match vf_config::read_claim_config_result(dir, *address) {
                Ok(Some(answer)) if answer.config == words => match answer.outcome {
                    Ok(()) => break,
                    Err(why) => {
                        return Err(format!(
                            "ResourceClaim {id}: device {device} ({address}) cannot take the settings \
                             {shown}: {why}"
                        ));
                    }
                },
                Err(error) => {
                    return Err(format!(
                        "ResourceClaim {id}: cannot read the agent's answer for device {device} ({address}): {error}"
                    ));
                }
                Ok(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "ResourceClaim {id}: vfplane's agent did not give device {device} ({address}) the \
                     settings {shown} within {} s; is it running on this node?",
                    timeout.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl drapb::dra_plugin_server::DraPlugin for DraNode {
    async fn node_prepare_resources(
        &self,
        request: Request<drapb::NodePrepareResourcesRequest>,
    ) -> Result<Response<drapb::NodePrepareResourcesResponse>, Status> {
        let request = request.into_inner();
        let mut checkpoint = self.checkpoint.lock().await;
        let mut claims = std::collections::HashMap::with_capacity(request.claims.len());
        for claim in &request.claims {
            let answer = match self.prepare_one(&mut checkpoint, claim).await {
                Ok(devices) => {
                    bump(&self.node.metrics.dra_prepares_ok);
                    drapb::NodePrepareResourceResponse {
                        devices,
                        error: String::new(),
                    }
                }
                Err(error) => {
                    bump(&self.node.metrics.dra_prepares_error);
                    tracing::warn!(claim = %format!("{}/{}", claim.namespace, claim.name), uid = %claim.uid, %error, "prepare refused");
                    drapb::NodePrepareResourceResponse {
                        devices: Vec::new(),
                        error,
                    }
                }
            };
            claims.insert(claim.uid.clone(), answer);
        }
        Ok(Response::new(drapb::NodePrepareResourcesResponse { claims }))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<drapb::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<drapb::NodeUnprepareResourcesResponse>, Status> {
        let request = request.into_inner();
        let mut checkpoint = self.checkpoint.lock().await;
        let mut claims = std::collections::HashMap::with_capacity(request.claims.len());
        for claim in &request.claims {
            let error = match self.unprepare_one(&mut checkpoint, claim) {
                Ok(()) => {
                    bump(&self.node.metrics.dra_unprepares_ok);
                    String::new()
                }
                Err(error) => {
                    bump(&self.node.metrics.dra_unprepares_error);
                    tracing::warn!(uid = %claim.uid, %error, "unprepare failed");
                    error
                }
            };
            claims.insert(claim.uid.clone(), drapb::NodeUnprepareResourceResponse { error });
        }
        Ok(Response::new(drapb::NodeUnprepareResourcesResponse { claims }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(results: serde_json::Value, config: serde_json::Value) -> ResourceClaim {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"namespace": "ns", "name": "c", "uid": "u1"},
            "spec": {"devices": {"requests": []}},
            "status": {"allocation": {"devices": {"results": results, "config": config}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_claims_devices_of_this_driver_are_taken_with_their_base_requests() {
        let claim = claim(
            serde_json::json!([
                {"request": "vf", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-0"},
                {"request": "pair/first", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-2"},
                {"request": "gpu", "driver": "gpu.example.com", "pool": "node-a", "device": "gpu-0"}
            ]),
            serde_json::json!([]),
        );
        let devices = allocated_devices(&claim, "node-a").unwrap();
        assert_eq!(
            devices,
            [
                Allocated {
                    requests: vec!["vf".into()],
                    pool: "node-a".into(),
                    device: "0000-00-12-0".into(),
                    settings: VfOverrides::default(),
                },
                Allocated {
                    requests: vec!["pair".into()],
                    pool: "node-a".into(),
                    device: "0000-00-12-2".into(),
                    settings: VfOverrides::default(),
                },
            ]
        );
    }

    #[test]
    fn another_nodes_pool_an_unallocated_claim_and_config_that_is_no_vfconfig_are_refused_by_name() {
        let other = claim(
            serde_json::json!([{"request": "vf", "driver": "vfplane.io", "pool": "node-b", "device": "0000-00-12-0"}]),
            serde_json::json!([]),
        );
        let error = allocated_devices(&other, "node-a").unwrap_err();
        assert_eq!(
            error,
            "ResourceClaim ns/c: device 0000-00-12-0 is of pool node-b, not this node's (node-a)"
        );

        let mut unallocated = other.clone();
        unallocated.status = None;
        assert_eq!(
            allocated_devices(&unallocated, "node-a").unwrap_err(),
            "ResourceClaim ns/c is not allocated"
        );

        let configured = claim(
            serde_json::json!([{"request": "vf", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-0"}]),
            serde_json::json!([
                {"source": "FromClaim", "opaque": {"driver": "gpu.example.com", "parameters": {}}},
                {"source": "FromClaim", "opaque": {"driver": "vfplane.io", "parameters": {"mac": "x"}}}
            ]),
        );
        let error = allocated_devices(&configured, "node-a").unwrap_err();
        assert_eq!(
            error,
            "ResourceClaim ns/c: config[1] (from the claim) is not a VfConfig of vfplane.io/v1alpha1: \
             missing field `apiVersion`"
        );
        let out_of_range = claim(
            serde_json::json!([{"request": "vf", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-0"}]),
            serde_json::json!([{"source": "FromClaim", "opaque": {"driver": "vfplane.io",
                "parameters": {"apiVersion": "vfplane.io/v1alpha1", "kind": "VfConfig", "vlan": 5000}}}]),
        );
        assert!(
            allocated_devices(&out_of_range, "node-a")
                .unwrap_err()
                .ends_with("vlan 5000 is out of range (0 to 4094; 0 for none)")
        );
    }

    fn vf_config(fields: serde_json::Value) -> serde_json::Value {
        let mut parameters = serde_json::json!({"apiVersion": "vfplane.io/v1alpha1", "kind": "VfConfig"});
        parameters
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        parameters
    }

    #[test]
    fn settings_go_to_the_devices_of_their_requests_the_claims_over_the_classs() {
        let results = serde_json::json!([
            {"request": "data", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-0"},
            {"request": "pair/first", "driver": "vfplane.io", "pool": "node-a", "device": "0000-00-12-2"}
        ]);
        let configured = claim(
            results.clone(),
            serde_json::json!([
                {"source": "FromClaim", "requests": ["data"], "opaque": {"driver": "vfplane.io",
                    "parameters": vf_config(serde_json::json!({"mac": "02:aa:00:00:00:01", "vlan": 20}))}},
                {"source": "FromClass", "opaque": {"driver": "vfplane.io",
                    "parameters": vf_config(serde_json::json!({"vlan": 10, "spoofChk": false}))}},
                {"source": "FromClaim", "requests": ["pair/first"], "opaque": {"driver": "vfplane.io",
                    "parameters": vf_config(serde_json::json!({"trust": true}))}}
            ]),
        );
        let devices = allocated_devices(&configured, "node-a").unwrap();
        assert_eq!(
            devices[0].settings.to_string(),
            "mac=02:aa:00:00:00:01 vlan=20 spoofchk=off"
        );
        assert_eq!(devices[1].settings.to_string(), "vlan=10 trust=on spoofchk=off");

        let one_mac_two_vfs = claim(
            results,
            serde_json::json!([{"source": "FromClaim", "opaque": {"driver": "vfplane.io",
                "parameters": vf_config(serde_json::json!({"mac": "02:aa:00:00:00:01"}))}}]),
        );
        assert_eq!(
            allocated_devices(&one_mac_two_vfs, "node-a").unwrap_err(),
            "ResourceClaim ns/c: config[0] gives MAC 02:aa:00:00:00:01 to 2 devices (0000-00-12-0, \
             0000-00-12-2); a MAC is for one VF: name one request in the config's requests"
        );
    }

    #[tokio::test]
    async fn prepare_waits_for_the_agents_answer_and_passes_its_refusal_on() {
        let dir = tempfile::tempdir().unwrap();
        let address: PciAddress = "0000:00:12.0".parse().unwrap();
        let settings: VfOverrides = "vlan=20".parse().unwrap();
        let devices = vec![("0000-00-12-0".to_owned(), address, settings)];
        // An agent that answers once it sees the settings.
        let agent = |outcome: Result<(), String>| {
            let dir = dir.path().to_owned();
            tokio::spawn(async move {
                loop {
                    if let Ok(Some(config)) = vf_config::read_claim_config(&dir, address) {
                        let answer = vf_config::ClaimConfigResult { config, outcome };
                        vf_config::write_claim_config_result(&dir, address, &answer).unwrap();
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        let answered = agent(Ok(()));
        give_settings(dir.path(), "ns/c", &devices, Duration::from_secs(5))
            .await
            .unwrap();
        answered.await.unwrap();

        vf_config::clear_claim_config(dir.path(), address).unwrap();
        let refused = agent(Err("setting vlan of VF 0 on eth0: Operation not supported".into()));
        let error = give_settings(dir.path(), "ns/c", &devices, Duration::from_secs(5))
            .await
            .unwrap_err();
        refused.await.unwrap();
        assert_eq!(
            error,
            "ResourceClaim ns/c: device 0000-00-12-0 (0000:00:12.0) cannot take the settings vlan=20: \
             setting vlan of VF 0 on eth0: Operation not supported"
        );

        // No agent: the settings file alone, and a timeout that says so.
        let error = give_settings(dir.path(), "ns/c", &devices, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            error.contains("vfplane's agent did not give device 0000-00-12-0"),
            "{error}"
        );
    }

    #[test]
    fn the_answer_names_the_vf_and_the_claims_own_cdi_device() {
        let prepared = PreparedClaim {
            namespace: "ns".into(),
            name: "c".into(),
            devices: vec![PreparedDevice {
                requests: vec!["vf".into()],
                device: "0000-00-12-0".into(),
                address: "0000:00:12.0".parse().unwrap(),
                pool: "fast".into(),
            }],
        };
        let devices = response_devices("node-a", "u1", &prepared);
        assert_eq!(devices.len(), 1);
        assert_eq!(devices[0].pool_name, "node-a");
        assert_eq!(devices[0].device_name, "0000-00-12-0");
        assert_eq!(devices[0].request_names, ["vf"]);
        assert_eq!(
            devices[0].cdi_device_ids,
            ["vfplane.io/vf=0000:00:12.0", "vfplane.io/claim=u1-0000-00-12-0"]
        );
    }
}
