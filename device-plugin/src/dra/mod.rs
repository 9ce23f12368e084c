//! vfplane as a DRA driver: the pools whose `resourceApi` is `dra` are
//! handed to pods through ResourceClaims instead of extended resources.
//!
//! It runs in the device plugin's process, over the same scanner, health,
//! CDI spec, NRI plugin and VF state as the device-plugin pools: one
//! inventory, so a VF is offered by one API only (its pool's).
//!
//! - [`registration`]: the kubelet finds `<registry>/vfplane.io-reg.sock`
//!   and learns from it where the DRA socket is and what it serves.
//! - [`node`]: `NodePrepareResources` and `NodeUnprepareResources` on
//!   `<plugins>/vfplane.io/dra.sock`, per claim UID, checkpointed
//!   ([`checkpoint`]), each claim's VFs named to the runtime in CDI.
//! - [`health`]: `NodeWatchResources`, every VF's health for the status of
//!   the pods using it.
//! - [`slices`]: the node's ResourceSlice, one device per VF of the DRA
//!   pools, with taints for an unhealthy VF and for one awaiting its scrub.
//!
//! Why the plugin and not the agent publishes the slices: the kubelet ties
//! a driver's slices to its registration (it wipes them when the driver's
//! socket is gone for 30 s, and on its own start), and the plugin is what
//! re-registers; its scanner is also what sees health change first.

pub mod authority;
pub mod binding;
pub mod checkpoint;
pub mod health;
pub mod node;
pub mod registration;
pub mod slices;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use vfplane_host::PciAddress;
use vfplane_proto::pool::{Pool, ResourceApi};
use vfplane_proto::vf_config::{self, VfOverrides};

use crate::inventory::DeviceStatus;
use crate::server::PoolShared;

pub use vfplane_proto::dra::{DEVICE_CLASS, DRIVER_NAME};

/// The CDI kind of a prepared claim's devices (their environment):
/// `vfplane.io/claim=<claim UID>-<device>`.
pub const CLAIM_CDI_KIND: &str = "vfplane.io/claim";

/// How the DRA driver runs.
#[derive(Debug, Clone)]
pub struct DraConfig {
    /// This node's name: the ResourceSlice's node and pool.
    pub node_name: String,
    /// The kubelet's plugin registry directory (the registration socket).
    pub registry_dir: PathBuf,
    /// The driver's own directory (the DRA socket and the checkpoint),
    /// `<plugins>/vfplane.io`.
    pub plugin_dir: PathBuf,
    /// How a released VF is kept from the next claim until scrubbed.
    pub scrub_gate: ScrubGate,
}

/// How a VF released by a claim is kept from the next claim until the
/// agent has scrubbed it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ScrubGate {
    /// A `NoSchedule` taint (`vfplane.io/scrubbing`) on the device from the
    /// release until the scrub ends: the scheduler does not allocate it.
    #[default]
    Taint,
    /// Binding conditions (KEP-5007) on every device: the scheduler may
    /// allocate a VF still to be scrubbed, and holds the pod until the
    /// driver says the VF is clean ([`binding`]).
    BindingConditions,
}

impl DraConfig {
    /// The kubelet's defaults for a node called `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            registry_dir: PathBuf::from(vfplane_proto::dra::PLUGIN_REGISTRY_PATH),
            plugin_dir: PathBuf::from(vfplane_proto::dra::PLUGINS_PATH).join(DRIVER_NAME),
            scrub_gate: ScrubGate::default(),
        }
    }

    /// The DRA service's socket.
    pub fn dra_socket(&self) -> PathBuf {
        self.plugin_dir.join("dra.sock")
    }

    /// The registration socket.
    pub fn registration_socket(&self) -> PathBuf {
        self.registry_dir.join(format!("{DRIVER_NAME}-reg.sock"))
    }

    /// The checkpoint of prepared claims.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.plugin_dir.join("checkpoint.json")
    }
}

/// A VF's device name in the ResourceSlice: its PCI address as a DNS
/// label, `0000:00:12.0` -> `0000-00-12-0`.
pub fn device_name(address: PciAddress) -> String {
    address.to_string().replace([':', '.'], "-")
}

/// One VF of a DRA pool as last scanned.
#[derive(Debug, Clone)]
pub struct DraDevice {
    /// Its name in the ResourceSlice.
    pub name: String,
    /// Its pool's settings.
    pub pool: Arc<Pool>,
    /// Its scan.
    pub status: DeviceStatus,
}

/// `pool` as the containers of a claim that gave its VF `settings` see it:
/// its container limits made stricter by the claim's profile
/// ([`VfOverrides::limits_over`]).
pub fn pool_for_claim<'a>(pool: &'a Pool, settings: &VfOverrides) -> Cow<'a, Pool> {
    let limits = settings.limits_over(pool.container_limits);
    if limits == pool.container_limits {
        return Cow::Borrowed(pool);
    }
    Cow::Owned(Pool {
        container_limits: limits,
        ..pool.clone()
    })
}

/// [`pool_for_claim`] for the VF at `address` of DRA pool `pool`, from the
/// settings its claim left in the state directory `state_dir`; the pool as
/// it is when the VF is not prepared for a claim (or its file cannot be
/// read, which the agent reports).
pub fn pool_for_prepared_vf<'a>(pool: &'a Pool, state_dir: &Path, address: PciAddress) -> Cow<'a, Pool> {
    let settings = vf_config::read_claim_config(state_dir, address)
        .ok()
        .flatten()
        .and_then(|words| words.parse::<VfOverrides>().ok())
        .unwrap_or_default();
    pool_for_claim(pool, &settings)
}

/// The pools of the running config, shared with the supervisor, which
/// replaces the map whenever the config changes.
pub(crate) type PoolRegistry = Arc<RwLock<BTreeMap<String, Arc<PoolShared>>>>;

/// Every VF of the DRA pools, by device name, as last scanned.
pub(crate) fn dra_devices(registry: &PoolRegistry) -> BTreeMap<String, DraDevice> {
    let pools = registry.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut devices = BTreeMap::new();
    for shared in pools.values() {
        let pool = shared.config();
        if pool.resource_api != ResourceApi::Dra {
            continue;
        }
        let Some(view) = shared.current_view() else {
            continue;
        };
        for status in &view.devices {
            let name = device_name(status.address);
            devices.insert(
                name.clone(),
                DraDevice {
                    name,
                    pool: Arc::clone(&pool),
                    status: status.clone(),
                },
            );
        }
    }
    devices
}

/// Why the DRA driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DraError {
    /// A directory it needs cannot be made.
    #[error("cannot make the directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A socket cannot be bound.
    #[error("cannot serve on {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
}

/// The running DRA driver: its servers and publisher.
#[derive(Debug)]
pub(crate) struct DraRuntime {
    config: DraConfig,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds a unix socket at `path`, replacing a stale one.
fn bind(path: &std::path::Path) -> Result<tokio::net::UnixListener, DraError> {
    let err = |source| DraError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err(e)),
        _ => {}
    }
    tokio::net::UnixListener::bind(path).map_err(err)
}

/// Starts the driver: the DRA socket first (the kubelet calls it as soon
/// as it has our registration), then the registration socket, then the
/// slice publisher.
pub(crate) async fn start(
    config: DraConfig,
    client: kube::Client,
    registry: PoolRegistry,
    node: Arc<crate::server::NodeContext>,
) -> Result<DraRuntime, DraError> {
    for dir in [&config.plugin_dir, &config.registry_dir] {
        std::fs::create_dir_all(dir).map_err(|source| DraError::Dir {
            path: dir.clone(),
            source,
        })?;
    }
    let checkpoint = checkpoint::Checkpoint::read(&config.checkpoint_path())?;
    tracing::info!(prepared = checkpoint.claims.len(), path = %config.checkpoint_path().display(), "DRA checkpoint read");
    let checkpoint = Arc::new(tokio::sync::Mutex::new(checkpoint));
    let service = node::DraNode {
        config: config.clone(),
        registry: Arc::clone(&registry),
        node: Arc::clone(&node),
        client: client.clone(),
        checkpoint: Arc::clone(&checkpoint),
    };
    let health = health::DraHealth {
        node_name: config.node_name.clone(),
        registry: Arc::clone(&registry),
        node: Arc::clone(&node),
    };
    let dra_listener = bind(&config.dra_socket())?;
    let dra_server = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(
                vfplane_proto::dra::v1::dra_plugin_server::DraPluginServer::new(service)
                    .max_decoding_message_size(crate::MAX_REQUEST_BYTES),
            )
            .add_service(
                vfplane_proto::dra::health_v1alpha1::dra_resource_health_server::DraResourceHealthServer::new(
                    health,
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(dra_listener))
            .await;
        if let Err(error) = result {
            tracing::error!(error = %vfplane_host::error_chain(&error), "the DRA server failed");
        }
    });
    let registration = registration::DraRegistration {
        endpoint: config.dra_socket(),
    };
    // The kubelet's registration client sends an :authority h2 refuses;
    // each connection goes through the relay ([`authority`]) to the server.
    let reg_listener = bind(&config.registration_socket())?;
    let (to_server, incoming) = tokio::sync::mpsc::channel::<std::io::Result<tokio::io::DuplexStream>>(4);
    let reg_server = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(
                vfplane_proto::pluginregistration::v1::registration_server::RegistrationServer::new(
                    registration,
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(incoming))
            .await;
        if let Err(error) = result {
            tracing::error!(error = %vfplane_host::error_chain(&error), "the DRA registration server failed");
        }
    });
    let reg_relay = tokio::spawn(async move {
        loop {
            let kubelet = match reg_listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept on the registration socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (server_end, relay_end) = tokio::io::duplex(64 * 1024);
            if to_server.send(Ok(server_end)).await.is_err() {
                return;
            }
            let (kubelet_read, mut kubelet_write) = kubelet.into_split();
            let (mut relay_read, relay_write) = tokio::io::split(relay_end);
            tokio::spawn(async move {
                if let Err(error) = authority::client_to_server(kubelet_read, relay_write).await {
                    tracing::debug!(%error, "registration connection from the kubelet ended");
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut relay_read, &mut kubelet_write).await;
            });
        }
    });
    tracing::info!(
        driver = DRIVER_NAME,
        dra = %config.dra_socket().display(),
        registration = %config.registration_socket().display(),
        "DRA driver serving"
    );
    let mut tasks = vec![dra_server, reg_server, reg_relay];
    if config.scrub_gate == ScrubGate::BindingConditions {
        tasks.push(tokio::spawn(binding::run(
            client.clone(),
            config.node_name.clone(),
            Arc::clone(&registry),
            Arc::clone(&node),
            checkpoint,
        )));
    }
    tasks.push(tokio::spawn(slices::publish(
        client,
        config.node_name.clone(),
        config.scrub_gate,
        registry,
        node,
    )));
    Ok(DraRuntime { config, tasks })
}

impl DraRuntime {
    /// Stops serving and removes both sockets, the registration first (the
    /// kubelet then deregisters the driver). The slices stay: the kubelet
    /// removes them if the driver does not come back within 30 s.
    pub(crate) fn stop(self) {
        for socket in [self.config.registration_socket(), self.config.dra_socket()] {
            if let Err(error) = std::fs::remove_file(&socket)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(socket = %socket.display(), %error, "cannot remove our socket");
            }
        }
        for task in self.tasks {
            task.abort();
        }
        tracing::info!("DRA driver stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_dns_labels_of_the_address() {
        let address: PciAddress = "0000:00:12.0".parse().unwrap();
        assert_eq!(device_name(address), "0000-00-12-0");
        let address: PciAddress = "0000:af:1f.7".parse().unwrap();
        assert_eq!(device_name(address), "0000-af-1f-7");
    }

    #[test]
    fn a_prepared_vfs_containers_get_the_pools_profile_made_stricter_by_its_claims() {
        let pool: Pool = serde_yaml::from_str(
            "name: fast\nselector: {}\ncontainerLimits: {lockedMemoryBytes: 1000, pidsMax: 64}\n",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let address: PciAddress = "0000:00:12.0".parse().unwrap();
        // Not prepared: the pool as it is.
        assert!(matches!(
            pool_for_prepared_vf(&pool, dir.path(), address),
            Cow::Borrowed(_)
        ));
        // Prepared with settings only: still the pool's profile.
        vf_config::write_claim_config(dir.path(), address, &"vlan=7".parse().unwrap()).unwrap();
        assert_eq!(
            pool_for_prepared_vf(&pool, dir.path(), address).container_limits,
            pool.container_limits
        );
        // A claim asking more locked memory and a looser pids bound: it gets
        // the memory, the pool's bound stays.
        vf_config::write_claim_config(
            dir.path(),
            address,
            &"lockedmemory=4096 pids=500".parse().unwrap(),
        )
        .unwrap();
        let limits = pool_for_prepared_vf(&pool, dir.path(), address).container_limits;
        assert_eq!(
            (limits.locked_memory_bytes, limits.pids_max),
            (Some(4096), Some(64))
        );
        // Garbage in the file: the pool's (the agent reports the file).
        std::fs::write(
            vf_config::claim_config_path(dir.path(), address),
            "lockedmemory=lots\n",
        )
        .unwrap();
        assert_eq!(
            pool_for_prepared_vf(&pool, dir.path(), address).container_limits,
            pool.container_limits
        );
    }
}
