//! The scrub gate by binding conditions (KEP-5007), the alternative to the
//! `vfplane.io/scrubbing` taint ([`super::ScrubGate`]).
//!
//! Under this gate every device in the slice carries the binding condition
//! [`SCRUBBED`] and the binding failure condition [`SCRUB_FAILED`], and no
//! scrubbing taint: the scheduler may allocate a VF whose scrub is still to
//! come, and then holds the pod in its PreBind step until the claim's
//! device status says [`SCRUBBED`] (or gives the allocation up when it says
//! [`SCRUB_FAILED`], or after its binding timeout, 10 minutes by default).
//!
//! This task watches the ResourceClaims and, for each device of this node's
//! pool allocated to a claim and not yet judged, writes one of the two
//! conditions into the claim's `status.devices` (server-side apply, field
//! manager [`FIELD_MANAGER`]) once the VF is clean: no handed-out mark, no
//! scrub running or failed, healthy, and in no other prepared claim. A VF
//! that is quarantined, unhealthy or gone fails the binding, so the
//! scheduler tries another device. It looks again after every scan of the
//! plugin (the agent's scrub ends with one) and every [`RECHECK`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::resource::v1::ResourceClaim;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use vfplane_proto::vf_state::{self, VfState};

use super::checkpoint::Checkpoint;
use super::{DRIVER_NAME, DraDevice, PoolRegistry, dra_devices};
use crate::server::NodeContext;

/// The binding condition: the VF was scrubbed since its last tenant.
pub const SCRUBBED: &str = "vfplane.io/scrubbed";
/// The binding failure condition: the VF cannot be handed out.
pub const SCRUB_FAILED: &str = "vfplane.io/scrub-failed";
/// The field manager of the conditions this task applies.
pub const FIELD_MANAGER: &str = "vfplane.io-binding";
/// How often pending claims are looked at without any event.
pub const RECHECK: Duration = Duration::from_secs(5);

/// What the gate says of one allocated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Clean: the pod may bind.
    Ready,
    /// It will not become clean: the scheduler must choose again.
    Failed(String),
    /// Its scrub is still to come or running, or another claim holds it.
    Wait,
}

/// Judges one allocated device. `holder` is the prepared claim holding its
/// VF, if any; `claim_uid` the claim being judged.
pub fn verdict(
    state_dir: &std::path::Path,
    device: Option<&DraDevice>,
    holder: Option<&str>,
    claim_uid: &str,
) -> Verdict {
    let Some(device) = device else {
        return Verdict::Failed("no longer a VF of a DRA pool on this node".to_owned());
    };
    let address = device.status.address;
    match vf_state::read_vf_state(state_dir, address) {
        Ok(Some(Ok(VfState::ScrubFailed))) => {
            return Verdict::Failed(format!("VF {address} failed its scrub and is quarantined"));
        }
        Ok(Some(Ok(VfState::ScrubPending))) => return Verdict::Wait,
        _ => {}
    }
    if matches!(vf_state::handed_out(state_dir, address), Ok(Some(_)) | Err(_)) {
        return Verdict::Wait;
    }
    if holder.is_some_and(|uid| uid != claim_uid) {
        return Verdict::Wait;
    }
    if let Some(reason) = device.status.health.reasons.first() {
        return Verdict::Failed(format!("VF {address} is not healthy: {}", reason.label()));
    }
    Verdict::Ready
}

/// The devices of this node's pool in a claim's allocation that carry
/// binding conditions and have neither of ours set in the claim's status.
pub fn unjudged(claim: &ResourceClaim, node: &str) -> Vec<String> {
    let Some(allocation) = claim.status.as_ref().and_then(|s| s.allocation.as_ref()) else {
        return Vec::new();
    };
    allocation
        .devices
        .as_ref()
        .and_then(|d| d.results.as_ref())
        .into_iter()
        .flatten()
        .filter(|r| r.driver == DRIVER_NAME && r.pool == node)
        .filter(|r| r.binding_conditions.as_ref().is_some_and(|c| !c.is_empty()))
        .filter(|r| judged(claim, node, &r.device).is_none())
        .map(|r| r.device.clone())
        .collect()
}

/// Our condition on a device in the claim's status, if set: its type and
/// whether it is True.
fn judged(claim: &ResourceClaim, node: &str, device: &str) -> Option<String> {
    claim
        .status
        .as_ref()?
        .devices
        .as_ref()?
        .iter()
        .filter(|d| d.driver == DRIVER_NAME && d.pool == node && d.device == device)
        .flat_map(|d| d.conditions.iter().flatten())
        .find(|c| (c.type_ == SCRUBBED || c.type_ == SCRUB_FAILED) && c.status == "True")
        .map(|c| c.type_.clone())
}

/// The server-side apply body that sets our conditions on a claim: every
/// device already judged keeps its condition (an apply that left it out
/// would remove it), and each new verdict that is not `Wait` is added.
pub fn status_apply(
    claim: &ResourceClaim,
    node: &str,
    verdicts: &[(String, Verdict)],
    now: &str,
) -> Option<serde_json::Value> {
    let mut devices = Vec::new();
    let results = claim
        .status
        .as_ref()
        .and_then(|s| s.allocation.as_ref())
        .and_then(|a| a.devices.as_ref())
        .and_then(|d| d.results.as_ref())?;
    let mut added = false;
    for result in results
        .iter()
        .filter(|r| r.driver == DRIVER_NAME && r.pool == node)
    {
        let condition = if let Some(kind) = judged(claim, node, &result.device) {
            let old = claim
                .status
                .as_ref()
                .and_then(|s| s.devices.as_ref())
                .into_iter()
                .flatten()
                .filter(|d| d.driver == DRIVER_NAME && d.pool == node && d.device == result.device)
                .flat_map(|d| d.conditions.iter().flatten())
                .find(|c| c.type_ == kind)?;
            serde_json::to_value(old).ok()?
        } else {
            let (kind, reason, message) = match verdicts.iter().find(|(d, _)| *d == result.device) {
                Some((_, Verdict::Ready)) => (
                    SCRUBBED,
                    "Scrubbed",
                    "the VF was scrubbed since its last tenant".to_owned(),
                ),
                Some((_, Verdict::Failed(why))) => (SCRUB_FAILED, "CannotHandOut", why.clone()),
                _ => continue,
            };
            added = true;
            serde_json::json!({
                "type": kind,
                "status": "True",
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
            })
        };
        devices.push(serde_json::json!({
            "driver": DRIVER_NAME,
            "pool": node,
            "device": result.device,
            "conditions": [condition],
        }));
    }
    if !added {
        return None;
    }
    Some(serde_json::json!({
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {
            "name": claim.metadata.name,
            "namespace": claim.metadata.namespace,
        },
        "status": {"devices": devices},
    }))
}

/// Runs the gate until the task is aborted.
pub(crate) async fn run(
    client: kube::Client,
    node_name: String,
    registry: PoolRegistry,
    node: Arc<NodeContext>,
    checkpoint: Arc<tokio::sync::Mutex<Checkpoint>>,
) {
    let api: kube::Api<ResourceClaim> = kube::Api::all(client.clone());
    let mut events = watcher(api, watcher::Config::default()).boxed();
    // Claims with devices of ours still to judge, by namespace/name.
    let mut pending: BTreeMap<(String, String), ResourceClaim> = BTreeMap::new();
    let mut scans = node.scans.subscribe();
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(claim) | watcher::Event::InitApply(claim))) => {
                    let key = (claim.metadata.namespace.clone().unwrap_or_default(), claim.metadata.name.clone().unwrap_or_default());
                    if unjudged(&claim, &node_name).is_empty() {
                        pending.remove(&key);
                    } else {
                        pending.insert(key, claim);
                    }
                }
                Some(Ok(watcher::Event::Delete(claim))) => {
                    pending.remove(&(claim.metadata.namespace.clone().unwrap_or_default(), claim.metadata.name.clone().unwrap_or_default()));
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                Some(Err(error)) => {
                    tracing::warn!(error = %vfplane_host::error_chain(&error), "watching ResourceClaims failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                None => return,
            },
            changed = scans.changed() => if changed.is_err() { return },
            _ = recheck.tick() => {}
        }
        if pending.is_empty() {
            continue;
        }
        let devices = dra_devices(&registry);
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let mut applies = Vec::new();
        {
            let prepared = checkpoint.lock().await;
            for claim in pending.values() {
                let uid = claim.metadata.uid.clone().unwrap_or_default();
                let verdicts: Vec<(String, Verdict)> = unjudged(claim, &node_name)
                    .into_iter()
                    .map(|name| {
                        let device = devices.get(&name);
                        let holder = device.and_then(|d| prepared.holder(d.status.address));
                        let verdict = verdict(&node.state_dir, device, holder, &uid);
                        (name, verdict)
                    })
                    .collect();
                if let Some(body) = status_apply(claim, &node_name, &verdicts, &now) {
                    applies.push((claim.clone(), verdicts, body));
                }
            }
        }
        for (claim, verdicts, body) in applies {
            let namespace = claim.metadata.namespace.clone().unwrap_or_default();
            let name = claim.metadata.name.clone().unwrap_or_default();
            let api: kube::Api<ResourceClaim> = kube::Api::namespaced(client.clone(), &namespace);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch_status(&name, &params, &Patch::Apply(&body)).await {
                Ok(updated) => {
                    tracing::info!(claim = %format!("{namespace}/{name}"), ?verdicts, "binding conditions set");
                    let key = (namespace, name);
                    if unjudged(&updated, &node_name).is_empty() {
                        pending.remove(&key);
                    } else {
                        pending.insert(key, updated);
                    }
                }
                Err(error) => {
                    tracing::warn!(claim = %format!("{namespace}/{name}"), error = %vfplane_host::error_chain(&error), "cannot set the binding conditions; trying again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
