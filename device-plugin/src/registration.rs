//! Registering a pool with the kubelet, and gRPC clients over unix sockets.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vfplane_proto::deviceplugin::v1beta1::registration_client::RegistrationClient;

use crate::metrics::bump;
use crate::server::{PoolShared, options};

/// How long one connect or call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed registration; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Opens a gRPC channel to a unix socket, within [`CALL_TIMEOUT`].
///
/// # Errors
/// When the socket does not answer.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    vfplane_proto::unix_grpc::connect_unix(path, CALL_TIMEOUT).await
}

/// Why one registration attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Our own socket did not answer (serve, check, then register).
    #[error("our socket {socket} does not answer")]
    SelfCheck {
        /// Our socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The kubelet's socket did not answer.
    #[error("cannot reach the kubelet at {socket}")]
    Connect {
        /// kubelet.sock.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// A step took longer than its time limit.
    #[error("{step} took longer than {CALL_TIMEOUT:?}")]
    Timeout {
        /// What was being done.
        step: &'static str,
    },
    /// The kubelet answered with an error.
    #[error("the kubelet refused the registration of {resource}: {status}")]
    Refused {
        /// The resource.
        resource: String,
        /// Its answer.
        status: tonic::Status,
    },
}

/// Connects to our own socket and asks for the options: proof that the
/// kubelet will be able to call us.
async fn self_check(socket: &Path) -> Result<(), RegisterError> {
    let err = |source: Box<dyn std::error::Error + Send + Sync>| RegisterError::SelfCheck {
        socket: socket.to_owned(),
        source,
    };
    let channel = connect_unix(socket).await.map_err(|e| err(Box::new(e)))?;
    DevicePluginClient::new(channel)
        .get_device_plugin_options(dp::Empty {})
        .await
        .map_err(|e| err(Box::new(e)))?;
    Ok(())
}

/// One attempt: check our socket, then Register, each step time-limited.
async fn register_once(shared: &PoolShared, kubelet_socket: &Path) -> Result<(), RegisterError> {
    tokio::time::timeout(CALL_TIMEOUT, self_check(&shared.socket_path))
        .await
        .map_err(|_| RegisterError::Timeout {
            step: "the check of our own socket",
        })??;
    tokio::time::timeout(CALL_TIMEOUT, register_with_kubelet(shared, kubelet_socket))
        .await
        .map_err(|_| RegisterError::Timeout {
            step: "the registration with the kubelet",
        })?
}

async fn register_with_kubelet(shared: &PoolShared, kubelet_socket: &Path) -> Result<(), RegisterError> {
    let channel = connect_unix(kubelet_socket)
        .await
        .map_err(|source| RegisterError::Connect {
            socket: kubelet_socket.to_owned(),
            source,
        })?;
    let endpoint = shared
        .socket_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let request = dp::RegisterRequest {
        version: vfplane_proto::DEVICE_PLUGIN_VERSION.to_owned(),
        endpoint,
        resource_name: shared.resource(),
        options: Some(options()),
    };
    RegistrationClient::new(channel)
        .register(request)
        .await
        .map_err(|status| RegisterError::Refused {
            resource: shared.resource(),
            status,
        })?;
    Ok(())
}

/// Asks a pool's registration task to register (again).
#[derive(Debug, Clone)]
pub(crate) struct Kick(Arc<watch::Sender<u64>>);

impl Kick {
    /// A kick and the receiver the registration task waits on (made here,
    /// before any kick, so none is missed).
    pub fn new() -> (Self, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0);
        (Self(Arc::new(tx)), rx)
    }

    pub fn kick(&self) {
        self.0
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }
}

/// Kicks that arrive this close together make one registration: a
/// restarting kubelet removes our socket (we serve it again: a kick) and
/// creates `kubelet.sock` (another kick) within moments.
const SETTLE: Duration = Duration::from_millis(20);

/// A socket file's identity: device and inode. A restarted kubelet binds a
/// new `kubelet.sock`, a socket we serve again is a new file.
type FileIdentity = (u64, u64);

fn identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// What one registration was made with: the kubelet's socket and ours.
/// The kubelet (1.37) refuses a second registration of an endpoint it is
/// connected to ("device plugin already connected"), and the refusal also
/// drops its record of the connection it keeps, so that connection's end is
/// never noticed and every later registration of the endpoint is refused
/// until the kubelet restarts. One registration per pair is the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Registered {
    kubelet: FileIdentity,
    ours: Option<FileIdentity>,
}

/// True when the kubelet refused because it already holds a connection to
/// this endpoint (its words, from `ManagerImpl.PluginConnected`).
fn already_connected(error: &RegisterError) -> bool {
    matches!(error, RegisterError::Refused { status, .. } if status.message().contains("already connected"))
}

/// Registers the pool each time it is kicked (pool started, socket served
/// again, `kubelet.sock` created), unless it is already registered with
/// this `kubelet.sock` for this socket of ours (see [`Registered`]).
/// Without a `kubelet.sock` it waits for the next kick; a failed attempt is
/// retried with exponential backoff (20 ms doubling to 5 s), and a new kick
/// restarts the backoff. A refusal because the kubelet is already
/// connected to our endpoint is not retried: that connection serves, and a
/// retry would only be refused again. Never polls while there is nothing
/// to do.
pub(crate) async fn registration_loop(
    shared: Arc<PoolShared>,
    kubelet_socket: PathBuf,
    mut kicks: watch::Receiver<u64>,
) {
    let mut registered: Option<Registered> = None;
    loop {
        if kicks.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SETTLE).await;
        kicks.borrow_and_update();
        let mut delay = FIRST_BACKOFF;
        loop {
            let Some(kubelet) = identity(&kubelet_socket) else {
                tracing::info!(pool = %shared.name, socket = %kubelet_socket.display(), "no kubelet yet; registering when kubelet.sock appears");
                break;
            };
            let pair = Registered {
                kubelet,
                ours: identity(&shared.socket_path),
            };
            if registered == Some(pair) {
                tracing::debug!(pool = %shared.name, "already registered with this kubelet for this socket");
                break;
            }
            match register_once(&shared, &kubelet_socket).await {
                Ok(()) => {
                    registered = Some(pair);
                    bump(&shared.metrics.registrations);
                    tracing::info!(
                        pool = %shared.name,
                        resource = %shared.resource(),
                        endpoint = %shared.socket_path.display(),
                        "registered with the kubelet"
                    );
                    break;
                }
                Err(error) if already_connected(&error) => {
                    registered = Some(pair);
                    bump(&shared.metrics.registration_errors);
                    tracing::warn!(
                        pool = %shared.name,
                        error = %vfplane_host::error_chain(&error),
                        "the kubelet keeps an earlier connection to our socket; not retrying"
                    );
                    break;
                }
                Err(error) => {
                    bump(&shared.metrics.registration_errors);
                    tracing::warn!(
                        pool = %shared.name,
                        error = %vfplane_host::error_chain(&error),
                        retry_in = ?delay,
                        "registration failed"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(delay) => delay = (delay * 2).min(MAX_BACKOFF),
                        changed = kicks.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            kicks.borrow_and_update();
                            delay = FIRST_BACKOFF;
                        }
                    }
                }
            }
        }
    }
}
