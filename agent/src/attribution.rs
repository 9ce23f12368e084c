//! Who holds each VF: the kubelet's pod-resources API (`List`) says which
//! container was given which device of a `vfplane.io/` resource. The agent
//! writes that owner into the VF's status (`namespace/pod/container`), and a
//! watcher asks again every [`POLL_INTERVAL`] so an owner appears and clears
//! within that time of the kubelet's own view.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::time::Duration;

use vfplane_host::PciAddress;
use vfplane_proto::node_state::NodeStateStatus;
use vfplane_proto::podresources::v1 as pr;
use vfplane_proto::podresources::v1::pod_resources_lister_client::PodResourcesListerClient;

use crate::source::Trigger;

/// Resource names vfplane's device plugin serves start with this.
pub const RESOURCE_PREFIX: &str = "vfplane.io/";
/// The DRA driver whose claim devices are VFs.
pub const DRA_DRIVER: &str = "vfplane.io";
/// The CDI kind of a VF the DRA driver prepared: `vfplane.io/vf=<address>`.
const VF_CDI_PREFIX: &str = "vfplane.io/vf=";
/// How often the watcher asks the kubelet.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long one connect or `List` may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The container a VF was given to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// What it asked for: the `vfplane.io/` resource, or for a DRA claim
    /// `claim <namespace>/<name>`.
    pub resource: String,
    /// The CPUs the kubelet's static CPU manager gave the container for
    /// itself (pod-resources `cpu_ids`); empty without exclusive CPUs.
    pub exclusive_cpus: Vec<u32>,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.pod, self.container)
    }
}

/// Owners by VF address.
pub type Owners = BTreeMap<PciAddress, Owner>;

/// Why the owners could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AttributionError {
    /// The kubelet's socket did not answer.
    #[error("cannot connect to the kubelet's pod-resources socket {socket}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The kubelet answered `List` with an error.
    #[error("pod-resources List on {socket} failed")]
    List {
        /// The socket.
        socket: PathBuf,
        /// Its answer.
        #[source]
        source: tonic::Status,
    },
    /// Connect or `List` took too long.
    #[error("pod-resources List on {socket} took longer than {CALL_TIMEOUT:?}")]
    Timeout {
        /// The socket.
        socket: PathBuf,
    },
    /// The kubelet named a device of ours that is not a PCI address.
    #[error("the kubelet lists device {device:?} of {resource} for {owner}, which is not a PCI address")]
    BadDevice {
        /// The device ID.
        device: String,
        /// Its resource.
        resource: String,
        /// Who holds it.
        owner: String,
    },
    /// Two containers hold the same VF (the kubelet should never say so).
    #[error("VF {address} is listed for both {first} and {second}")]
    Twice {
        /// The VF.
        address: PciAddress,
        /// One holder.
        first: String,
        /// The other.
        second: String,
    },
}

/// The owners in one `List` answer, by PCI address: every device of a
/// `vfplane.io/` resource, and every device of a DRA claim prepared by
/// driver `vfplane.io` (its VF named by the CDI device
/// `vfplane.io/vf=<address>` the driver returned, or else by the device
/// name, the address with `-` for `:` and `.`).
///
/// # Errors
/// A device that is not a PCI address, or a VF listed twice.
pub fn owners_from(response: &pr::ListPodResourcesResponse) -> Result<Owners, AttributionError> {
    let mut owners = Owners::new();
    for pod in &response.pod_resources {
        for container in &pod.containers {
            let owner = |resource: &str| Owner {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                container: container.name.clone(),
                resource: resource.to_owned(),
                exclusive_cpus: container
                    .cpu_ids
                    .iter()
                    .filter_map(|c| u32::try_from(*c).ok())
                    .collect(),
            };
            let mut held: Vec<(String, Owner)> = Vec::new();
            for devices in &container.devices {
                if !devices.resource_name.starts_with(RESOURCE_PREFIX) {
                    continue;
                }
                for device in &devices.device_ids {
                    held.push((device.clone(), owner(&devices.resource_name)));
                }
            }
            for claim in &container.dynamic_resources {
                let resource = format!("claim {}/{}", claim.claim_namespace, claim.claim_name);
                for device in claim
                    .claim_resources
                    .iter()
                    .filter(|d| d.driver_name == DRA_DRIVER)
                {
                    let address = device
                        .cdi_devices
                        .iter()
                        .find_map(|c| c.name.strip_prefix(VF_CDI_PREFIX))
                        .map_or_else(|| address_of_device_name(&device.device_name), str::to_owned);
                    held.push((address, owner(&resource)));
                }
            }
            for (device, owner) in held {
                let address: PciAddress = device.parse().map_err(|_| AttributionError::BadDevice {
                    device: device.clone(),
                    resource: owner.resource.clone(),
                    owner: owner.to_string(),
                })?;
                if let Some(first) = owners.get(&address)
                    && first != &owner
                {
                    return Err(AttributionError::Twice {
                        address,
                        first: first.to_string(),
                        second: owner.to_string(),
                    });
                }
                owners.insert(address, owner);
            }
        }
    }
    Ok(owners)
}

/// The PCI address a DRA device name stands for: `0000-00-12-0` ->
/// `0000:00:12.0` (returned as given when it has not that shape, so the
/// parse that follows names it).
fn address_of_device_name(name: &str) -> String {
    let parts: Vec<&str> = name.split('-').collect();
    match parts.as_slice() {
        [domain, bus, slot, function] => format!("{domain}:{bus}:{slot}.{function}"),
        _ => name.to_owned(),
    }
}

/// Writes each VF's owner into `status` (and clears it for VFs nobody holds).
pub fn annotate(status: &mut NodeStateStatus, owners: &Owners) {
    for vf in status.pfs.iter_mut().flat_map(|pf| pf.vfs.iter_mut()) {
        vf.owner = vf
            .pci_address
            .parse::<PciAddress>()
            .ok()
            .and_then(|address| owners.get(&address))
            .map(Owner::to_string);
    }
}

/// A client of the kubelet's pod-resources socket, for synchronous callers
/// (never from inside the runtime: [`Self::owners`] blocks on it).
#[derive(Debug, Clone)]
pub struct PodResources {
    socket: PathBuf,
    runtime: tokio::runtime::Handle,
}

impl PodResources {
    /// A client of the socket at `socket` (nothing is connected yet), its
    /// calls run on `runtime` (a multi-thread runtime, whose workers drive
    /// the I/O while a caller outside it waits).
    pub fn new(socket: impl Into<PathBuf>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            socket: socket.into(),
            runtime,
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Asks the kubelet who holds which VF.
    ///
    /// # Errors
    /// The socket does not answer, `List` fails or takes too long, or its
    /// answer names a device that is not a PCI address.
    pub fn owners(&self) -> Result<Owners, AttributionError> {
        let socket = self.socket.clone();
        let response = self.runtime.block_on(async {
            let call = async {
                let channel = vfplane_proto::unix_grpc::connect_unix(&socket, CALL_TIMEOUT)
                    .await
                    .map_err(|source| AttributionError::Connect {
                        socket: socket.clone(),
                        source,
                    })?;
                PodResourcesListerClient::new(channel)
                    .list(pr::ListPodResourcesRequest {})
                    .await
                    .map(tonic::Response::into_inner)
                    .map_err(|source| AttributionError::List {
                        socket: socket.clone(),
                        source,
                    })
            };
            tokio::time::timeout(CALL_TIMEOUT, call)
                .await
                .map_err(|_| AttributionError::Timeout {
                    socket: socket.clone(),
                })?
        })?;
        owners_from(&response)
    }
}

/// Asks the kubelet every [`POLL_INTERVAL`] on a thread of its own and
/// sends [`Trigger::Owners`] when the answer differs from the last one, so
/// the agent's next pass writes the new owners. A kubelet that does not
/// answer is logged once per outage, not every poll.
pub fn spawn_owner_watch(client: PodResources, tx: Sender<Trigger>) {
    std::thread::spawn(move || {
        let mut last: Option<Owners> = None;
        let mut failing = false;
        loop {
            match client.owners() {
                Ok(owners) => {
                    failing = false;
                    if last.as_ref() != Some(&owners) {
                        last = Some(owners);
                        if tx.send(Trigger::Owners).is_err() {
                            return;
                        }
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(error = %vfplane_host::error_chain(&error), "cannot read VF owners from the kubelet");
                    }
                    failing = true;
                }
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    });
}

#[cfg(test)]
mod tests;
