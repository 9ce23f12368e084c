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
//! (`vfplane.io/claim=<uid>-<device>`). The checkpoint is written before
//! the kubelet hears the answer; a claim already in it gets the same
//! answer again.
//!
//! Unprepare (the claim's last pod on the node is gone): the claim's CDI
//! spec goes, each VF is marked handed out, so the agent scrubs it and
//! nobody gets it before (the slice taints it meanwhile, and prepare
//! refuses it), and the claim leaves the checkpoint. An unknown UID is
//! already unprepared.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::resource::v1::ResourceClaim;
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};
use vfplane_host::PciAddress;
use vfplane_proto::dra::v1 as drapb;
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
}

/// The devices `claim` was allocated from this driver, checked against
/// `node_name` (the one pool this driver publishes per node).
///
/// # Errors
/// The claim is not allocated, names a device of another node's pool, or
/// carries configuration for this driver (not taken yet: it would be
/// silently ignored).
pub fn allocated_devices(claim: &ResourceClaim, node_name: &str) -> Result<Vec<Allocated>, String> {
    let id = claim_id(claim);
    let allocation = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .ok_or_else(|| format!("ResourceClaim {id} is not allocated"))?;
    if let Some(index) = allocation
        .config
        .iter()
        .flatten()
        .position(|c| c.opaque.as_ref().is_some_and(|o| o.driver == DRIVER_NAME))
    {
        return Err(format!(
            "ResourceClaim {id}: config[{index}] is opaque configuration for driver {DRIVER_NAME}, \
             which this version of vfplane does not take; remove it (the pool's settings and \
             profile apply)"
        ));
    }
    let mut by_device: BTreeMap<String, Allocated> = BTreeMap::new();
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
        let entry = by_device
            .entry(result.device.clone())
            .or_insert_with(|| Allocated {
                requests: Vec::new(),
                pool: result.pool.clone(),
                device: result.device.clone(),
            });
        if !entry.requests.contains(&base) {
            entry.requests.push(base);
        }
    }
    Ok(by_device.into_values().collect())
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
        let mut prepared = PreparedClaim {
            namespace: claim.namespace.clone(),
            name: claim.name.clone(),
            devices: Vec::with_capacity(chosen.len()),
        };
        for (wanted, device) in &chosen {
            let pool = &device.pool;
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
            env.push(ClaimEnv {
                device: device.name.clone(),
                pool: pool.name.clone(),
                address: now.address,
                info: crate::server::vf_info(&now, node),
            });
            prepared.devices.push(PreparedDevice {
                requests: wanted.requests.clone(),
                device: device.name.clone(),
                address: now.address,
                pool: pool.name.clone(),
            });
        }
        self.node.add_vf_edits(&entries);
        self.node
            .cdi
            .ensure(&entries)
            .map_err(|e| vfplane_host::error_chain(&e))?;
        self.node
            .cdi
            .write_claim(&claim.uid, &env)
            .map_err(|e| vfplane_host::error_chain(&e))?;
        checkpoint.claims.insert(claim.uid.clone(), prepared);
        if let Err(error) = checkpoint.write(&self.config.checkpoint_path()) {
            checkpoint.claims.remove(&claim.uid);
            let _ = self.node.cdi.remove_claim(&claim.uid);
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
        // Dirty first: once the claim leaves the checkpoint nothing else
        // says its VFs were used. Released: the kubelet unprepares only
        // after the claim's containers stopped, so the agent need not wait.
        for device in &prepared.devices {
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
                    device: "0000-00-12-0".into()
                },
                Allocated {
                    requests: vec!["pair".into()],
                    pool: "node-a".into(),
                    device: "0000-00-12-2".into()
                },
            ]
        );
    }

    #[test]
    fn another_nodes_pool_an_unallocated_claim_and_our_config_are_refused_by_name() {
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
        assert!(
            error.starts_with("ResourceClaim ns/c: config[1] is opaque configuration for driver vfplane.io"),
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
