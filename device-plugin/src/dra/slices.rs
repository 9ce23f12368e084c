//! The node's ResourceSlices: one device per VF of the DRA pools.
//!
//! The pool is the node (`spec.pool.name` = node name; a DRA pool of
//! vfplane is the attribute `pool`), in as many slices of at most
//! [`DEVICES_PER_SLICE`] devices as it takes, named `<node>-vfplane.io-<n>`
//! and owned by the Node (deleted with it). Each device carries:
//!
//! - `resource.kubernetes.io/pciBusID` and `resource.kubernetes.io/pcieRoot`
//!   (the standard attributes), and in the driver's domain `pool`, `pf`,
//!   `vfIndex`, `numaNode`, `vendor`, `deviceID`, `iommuGroup` where known;
//! - taints, effect `NoSchedule` (the scheduler allocates the device to no
//!   new claim; a pod already using it keeps it and sees its health in its
//!   status, as with the device plugin): `vfplane.io/unhealthy` (value: the
//!   first reason) for a VF that is not healthy, `vfplane.io/scrubbing`
//!   while a released VF awaits or undergoes its scrub. A taint goes as soon
//!   as its condition clears.
//!
//! The publisher looks after every scan of the plugin, every change the
//! watch on the node's slices of this driver shows (the kubelet wipes them
//! when the driver has been gone 30 s, and on its own start) and every
//! [`RESYNC`]; it writes only when what is there differs from what should
//! be, bumping the pool's generation in every slice.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::resource::v1::{
    Device, DeviceAttribute, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use vfplane_proto::vf_state;

use super::{DRIVER_NAME, DraDevice, PoolRegistry, ScrubGate, dra_devices};
use crate::metrics::bump;
use crate::server::NodeContext;

/// Devices per slice: the API's limit when any device carries taints.
pub const DEVICES_PER_SLICE: usize = 64;
/// The safety-net period.
pub const RESYNC: Duration = Duration::from_secs(30);
/// The taint of an unhealthy VF.
pub const UNHEALTHY_TAINT: &str = "vfplane.io/unhealthy";
/// The taint of a released VF awaiting or undergoing its scrub.
pub const SCRUBBING_TAINT: &str = "vfplane.io/scrubbing";

/// The `pcieRoot` of a device whose resolved sysfs directory is `dir`:
/// the `pci<domain>:<bus>` component right under `devices`.
pub fn pcie_root(dir: &Path) -> Option<String> {
    let mut components = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    components.find(|c| c == "devices")?;
    components.next().filter(|c| c.starts_with("pci"))
}

fn string(value: impl Into<String>) -> DeviceAttribute {
    DeviceAttribute {
        string: Some(value.into()),
        ..DeviceAttribute::default()
    }
}

fn int(value: impl Into<i64>) -> DeviceAttribute {
    DeviceAttribute {
        int: Some(value.into()),
        ..DeviceAttribute::default()
    }
}

/// Whether a VF is released and not yet scrubbed (or being scrubbed).
fn awaiting_scrub(state_dir: &Path, device: &DraDevice) -> bool {
    let address = device.status.address;
    match vf_state::read_vf_state(state_dir, address) {
        Ok(Some(Ok(vf_state::VfState::ScrubPending))) => true,
        _ => matches!(vf_state::handed_out_at(state_dir, address), Ok(Some(_))),
    }
}

/// The slice device of one VF. Under the taint gate a VF awaiting its
/// scrub is tainted; under the binding-conditions gate every device
/// carries the conditions instead ([`super::binding`]).
pub fn slice_device(device: &DraDevice, awaiting_scrub: bool, gate: ScrubGate) -> Device {
    let mut attributes = BTreeMap::new();
    let status = &device.status;
    attributes.insert(
        "resource.kubernetes.io/pciBusID".to_owned(),
        string(status.address.to_string()),
    );
    attributes.insert("pool".to_owned(), string(device.pool.name.clone()));
    if let Some(facts) = &status.facts {
        if let Some(root) = pcie_root(facts.device_dir.path()) {
            attributes.insert("resource.kubernetes.io/pcieRoot".to_owned(), string(root));
        }
        if let Some(pf) = facts.pf {
            attributes.insert("pf".to_owned(), string(pf.to_string()));
        }
        if let Some(index) = facts.vf_index {
            attributes.insert("vfIndex".to_owned(), int(index));
        }
        if let Some(numa) = facts.numa_node {
            attributes.insert("numaNode".to_owned(), int(numa));
        }
        attributes.insert("vendor".to_owned(), string(facts.vendor.clone()));
        attributes.insert("deviceID".to_owned(), string(facts.device.clone()));
    }
    if let Some(node) = status.vfio_node {
        attributes.insert("iommuGroup".to_owned(), int(node.group()));
    }
    let mut taints = Vec::new();
    if let Some(reason) = status.health.reasons.first() {
        taints.push(DeviceTaint {
            key: UNHEALTHY_TAINT.to_owned(),
            value: Some(reason.label().to_owned()),
            effect: "NoSchedule".to_owned(),
            time_added: None,
        });
    }
    if awaiting_scrub && gate == ScrubGate::Taint {
        taints.push(DeviceTaint {
            key: SCRUBBING_TAINT.to_owned(),
            value: None,
            effect: "NoSchedule".to_owned(),
            time_added: None,
        });
    }
    let binding = gate == ScrubGate::BindingConditions;
    Device {
        name: device.name.clone(),
        attributes: Some(attributes),
        taints: (!taints.is_empty()).then_some(taints),
        binding_conditions: binding.then(|| vec![super::binding::SCRUBBED.to_owned()]),
        binding_failure_conditions: binding.then(|| vec![super::binding::SCRUB_FAILED.to_owned()]),
        ..Device::default()
    }
}

/// The slice name of chunk `index` of `node`'s pool.
pub fn slice_name(node: &str, index: usize) -> String {
    format!("{node}-{DRIVER_NAME}-{index}")
}

/// The specs the node's slices should have (generation 0: set when
/// written), in name order; none when the node has no DRA VF.
pub fn desired_specs(node: &str, devices: &[Device]) -> Vec<(String, ResourceSliceSpec)> {
    let chunks: Vec<&[Device]> = devices.chunks(DEVICES_PER_SLICE).collect();
    let count = i64::try_from(chunks.len()).unwrap_or(i64::MAX);
    chunks
        .iter()
        .enumerate()
        .map(|(index, chunk)| {
            (
                slice_name(node, index),
                ResourceSliceSpec {
                    driver: DRIVER_NAME.to_owned(),
                    node_name: Some(node.to_owned()),
                    pool: ResourcePool {
                        name: node.to_owned(),
                        generation: 0,
                        resource_slice_count: count,
                    },
                    devices: Some(chunk.to_vec()),
                    ..ResourceSliceSpec::default()
                },
            )
        })
        .collect()
}

/// A spec as compared: generation and taint times aside.
fn comparable(spec: &ResourceSliceSpec) -> ResourceSliceSpec {
    let mut spec = spec.clone();
    spec.pool.generation = 0;
    for device in spec.devices.iter_mut().flatten() {
        for taint in device.taints.iter_mut().flatten() {
            taint.time_added = None;
        }
        if device.taints.as_ref().is_some_and(Vec::is_empty) {
            device.taints = None;
        }
        if device.attributes.as_ref().is_some_and(BTreeMap::is_empty) {
            device.attributes = None;
        }
    }
    spec
}

/// True when the slices on the server are exactly `desired` (one
/// generation across them, nothing extra).
pub fn in_sync(desired: &[(String, ResourceSliceSpec)], server: &BTreeMap<String, ResourceSlice>) -> bool {
    if desired.len() != server.len() {
        return false;
    }
    let generations: std::collections::BTreeSet<i64> =
        server.values().map(|s| s.spec.pool.generation).collect();
    generations.len() <= 1
        && desired.iter().all(|(name, spec)| {
            server
                .get(name)
                .is_some_and(|s| comparable(&s.spec) == comparable(spec))
        })
}

/// Keeps the taints' `timeAdded` of `server` where the same taint is on the
/// same device, so a rewrite does not move a taint's time.
fn keep_taint_times(spec: &mut ResourceSliceSpec, server: &BTreeMap<String, ResourceSlice>) {
    let mut times = BTreeMap::new();
    for slice in server.values() {
        for device in slice.spec.devices.iter().flatten() {
            for taint in device.taints.iter().flatten() {
                if let Some(time) = &taint.time_added {
                    times.insert(
                        (device.name.clone(), taint.key.clone(), taint.value.clone()),
                        time.clone(),
                    );
                }
            }
        }
    }
    for device in spec.devices.iter_mut().flatten() {
        for taint in device.taints.iter_mut().flatten() {
            taint.time_added = times
                .get(&(device.name.clone(), taint.key.clone(), taint.value.clone()))
                .cloned();
        }
    }
}

/// Publishes the node's slices until the task is aborted.
pub(crate) async fn publish(
    client: kube::Client,
    node_name: String,
    gate: ScrubGate,
    registry: PoolRegistry,
    node: Arc<NodeContext>,
) {
    let owner = loop {
        match kube::Api::<Node>::all(client.clone()).get(&node_name).await {
            Ok(found) => {
                break found.metadata.uid.map(|uid| OwnerReference {
                    api_version: "v1".to_owned(),
                    kind: "Node".to_owned(),
                    name: node_name.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: None,
                });
            }
            Err(error) => {
                tracing::warn!(node = %node_name, error = %vfplane_host::error_chain(&error), "cannot read the Node (for the ResourceSlices' owner); trying again");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    let api: kube::Api<ResourceSlice> = kube::Api::all(client);
    let selector = format!("spec.nodeName={node_name},spec.driver={DRIVER_NAME}");
    let mut events = watcher(api.clone(), watcher::Config::default().fields(&selector)).boxed();
    let mut server: BTreeMap<String, ResourceSlice> = BTreeMap::new();
    let mut listing: BTreeMap<String, ResourceSlice> = BTreeMap::new();
    let mut listed = false;
    let mut scans = node.scans.subscribe();
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(slice))) => {
                    if let Some(name) = slice.metadata.name.clone() { server.insert(name, slice); }
                }
                Some(Ok(watcher::Event::Delete(slice))) => {
                    if let Some(name) = &slice.metadata.name { server.remove(name); }
                }
                Some(Ok(watcher::Event::Init)) => listing.clear(),
                Some(Ok(watcher::Event::InitApply(slice))) => {
                    if let Some(name) = slice.metadata.name.clone() { listing.insert(name, slice); }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    server = std::mem::take(&mut listing);
                    listed = true;
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %vfplane_host::error_chain(&error), "watching the node's ResourceSlices failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                None => return,
            },
            changed = scans.changed() => if changed.is_err() { return },
            _ = resync.tick() => {}
        }
        if !listed {
            continue;
        }
        let devices = dra_devices(&registry);
        let slice_devices: Vec<Device> = devices
            .values()
            .map(|d| slice_device(d, awaiting_scrub(&node.state_dir, d), gate))
            .collect();
        let desired = desired_specs(&node_name, &slice_devices);
        if in_sync(&desired, &server) {
            continue;
        }
        match write(&api, &desired, &server, owner.as_ref()).await {
            Ok(written) => {
                bump(&node.metrics.dra_slice_writes_ok);
                tracing::info!(
                    slices = desired.len(),
                    devices = slice_devices.len(),
                    generation = written,
                    "ResourceSlices published"
                );
                // The watch brings what was written; until then, nothing
                // is written again for the same reason.
                for (name, spec) in &desired {
                    let mut spec = spec.clone();
                    spec.pool.generation = written;
                    server.insert(
                        name.clone(),
                        ResourceSlice {
                            metadata: ObjectMeta {
                                name: Some(name.clone()),
                                ..ObjectMeta::default()
                            },
                            spec,
                        },
                    );
                }
                server.retain(|name, _| desired.iter().any(|(n, _)| n == name));
            }
            Err(error) => {
                bump(&node.metrics.dra_slice_writes_error);
                tracing::warn!(error = %vfplane_host::error_chain(&error), "cannot publish the ResourceSlices; trying again");
            }
        }
    }
}

/// Writes `desired` over `server`'s slices with the next generation;
/// returns that generation.
async fn write(
    api: &kube::Api<ResourceSlice>,
    desired: &[(String, ResourceSliceSpec)],
    server: &BTreeMap<String, ResourceSlice>,
    owner: Option<&OwnerReference>,
) -> Result<i64, kube::Error> {
    let generation = server.values().map(|s| s.spec.pool.generation).max().unwrap_or(0) + 1;
    for (name, spec) in desired {
        let mut spec = spec.clone();
        spec.pool.generation = generation;
        keep_taint_times(&mut spec, server);
        let mut slice = ResourceSlice {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                owner_references: owner.map(|o| vec![o.clone()]),
                ..ObjectMeta::default()
            },
            spec,
        };
        match server.get(name).and_then(|s| s.metadata.resource_version.clone()) {
            Some(version) => {
                slice.metadata.resource_version = Some(version);
                api.replace(name, &PostParams::default(), &slice).await?;
            }
            None => {
                api.create(&PostParams::default(), &slice).await?;
            }
        }
    }
    for name in server.keys().filter(|n| !desired.iter().any(|(d, _)| d == *n)) {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    Ok(generation)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pcie_root_is_the_component_under_devices() {
        assert_eq!(
            pcie_root(Path::new("/sys/devices/pci0000:00/0000:00:02.0/0000:01:00.2")).as_deref(),
            Some("pci0000:00")
        );
        assert_eq!(
            pcie_root(Path::new("/host/sys/devices/pci0000:3a/0000:3a:00.0")).as_deref(),
            Some("pci0000:3a")
        );
        assert_eq!(pcie_root(Path::new("/tmp/fake/0000:00:12.0")), None);
    }

    fn device(name: &str, tainted: bool) -> Device {
        Device {
            name: name.to_owned(),
            taints: tainted.then(|| {
                vec![DeviceTaint {
                    key: UNHEALTHY_TAINT.to_owned(),
                    value: Some("not_on_vfio".to_owned()),
                    effect: "NoSchedule".to_owned(),
                    time_added: None,
                }]
            }),
            ..Device::default()
        }
    }

    #[test]
    fn a_pool_of_many_vfs_is_cut_into_slices_that_know_their_count() {
        let devices: Vec<Device> = (0..130).map(|i| device(&format!("d{i}"), false)).collect();
        let specs = desired_specs("node-a", &devices);
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].0, "node-a-vfplane.io-0");
        assert!(
            specs
                .iter()
                .all(|(_, s)| s.pool.resource_slice_count == 3 && s.pool.name == "node-a")
        );
        assert_eq!(specs[2].1.devices.as_ref().map(Vec::len), Some(2));
        assert!(desired_specs("node-a", &[]).is_empty(), "no VF: no slice");
    }

    #[test]
    fn in_sync_ignores_generation_and_taint_times_and_sees_everything_else() {
        let desired = desired_specs("n", &[device("a", true)]);
        let mut on_server = desired[0].1.clone();
        on_server.pool.generation = 7;
        for taint in on_server
            .devices
            .iter_mut()
            .flatten()
            .flat_map(|d| d.taints.iter_mut().flatten())
        {
            taint.time_added = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        }
        let slice = |spec: ResourceSliceSpec| ResourceSlice {
            metadata: ObjectMeta::default(),
            spec,
        };
        let server: BTreeMap<_, _> = [(desired[0].0.clone(), slice(on_server.clone()))].into();
        assert!(in_sync(&desired, &server));

        let healed = desired_specs("n", &[device("a", false)]);
        assert!(!in_sync(&healed, &server), "a taint cleared is a change");
        let mut extra = server.clone();
        extra.insert("n-vfplane.io-9".to_owned(), slice(on_server));
        assert!(!in_sync(&desired, &extra), "a stale slice is a change");
        assert!(
            !in_sync(&desired, &BTreeMap::new()),
            "wiped by the kubelet is a change"
        );
    }

    #[test]
    fn a_rewrite_keeps_the_time_a_taint_was_added() {
        let time =
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut old = desired_specs("n", &[device("a", true)]).remove(0).1;
        for taint in old
            .devices
            .iter_mut()
            .flatten()
            .flat_map(|d| d.taints.iter_mut().flatten())
        {
            taint.time_added = Some(time.clone());
        }
        let server: BTreeMap<_, _> = [(
            "n-vfplane.io-0".to_owned(),
            ResourceSlice {
                metadata: ObjectMeta::default(),
                spec: old,
            },
        )]
        .into();
        let mut new = desired_specs("n", &[device("a", true), device("b", true)])
            .remove(0)
            .1;
        keep_taint_times(&mut new, &server);
        let times: Vec<_> = new
            .devices
            .iter()
            .flatten()
            .map(|d| d.taints.as_ref().and_then(|t| t[0].time_added.clone()))
            .collect();
        assert_eq!(
            times,
            [Some(time), None],
            "b's taint is new: the server stamps it"
        );
    }
}
