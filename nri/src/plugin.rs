//! A plugin's connection to the runtime: connect to the NRI socket, serve
//! the `Plugin` service on one logical connection, register through the
//! `Runtime` service on the other, answer the runtime's calls through a
//! [`Plugin`], and connect again when the runtime goes away (containerd
//! makes its socket anew when it restarts and never reconnects to a
//! plugin itself).
//!
//! The runtime calls `Configure` as soon as it accepts the registration,
//! possibly before the registration's answer arrives, so the `Plugin`
//! service is served before `RegisterPlugin` is sent. It gives each call
//! 2 s (containerd's default): a plugin that does not answer in time is
//! disconnected, and the container is then created without its
//! adjustment. A [`Plugin`]'s methods are therefore synchronous and
//! quick: they read files, they do not wait on the network.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};

use crate::api;
use crate::mux::{self, MuxError, PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN};
use crate::ttrpc::{self, FrameError, Message, Reassembler, Request, Response, Status, code};

/// The service a plugin serves.
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
/// The service the runtime serves.
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// How long the runtime waits for a plugin's registration (containerd's default).
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);

/// How the plugin names itself to the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    name: String,
    index: String,
}

/// Why a registration cannot be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistrationError {
    /// An empty name.
    #[error("an NRI plugin needs a name")]
    NoName,
    /// An index that is not two ASCII digits.
    #[error("an NRI plugin's index is two digits (00-99), not {0:?}")]
    BadIndex(String),
}

impl Registration {
    /// A plugin called `name`, called in the order of `index` (two digits)
    /// among the runtime's plugins.
    ///
    /// # Errors
    /// An empty name, or an index that is not two ASCII digits.
    pub fn new(name: &str, index: &str) -> Result<Self, RegistrationError> {
        if name.is_empty() {
            return Err(RegistrationError::NoName);
        }
        if index.len() != 2 || !index.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RegistrationError::BadIndex(index.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            index: index.to_owned(),
        })
    }
}

/// Events a plugin takes, as the runtime's bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Events(i32);

impl Events {
    /// The mask of `events`: bit `event - 1` each. At least one event: an
    /// empty mask means every event to the runtime, adjustment validation
    /// included.
    pub fn of(events: &[api::Event]) -> Self {
        let mask = events
            .iter()
            .map(|e| *e as i32)
            .filter(|e| (1..api::Event::Last as i32).contains(e))
            .fold(0, |mask, e| mask | (1 << (e - 1)));
        Self(mask)
    }

    /// The mask.
    pub fn mask(self) -> i32 {
        self.0
    }
}

/// A call the plugin refuses: the runtime sees the code and message, and
/// for `CreateContainer` fails the container's creation with them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// A gRPC status code ([`code`]).
    pub code: i32,
    /// What is wrong, for the person who reads `kubectl describe pod`.
    pub message: String,
}

impl Refusal {
    /// The request asks for something that cannot be done.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: code::INVALID_ARGUMENT,
            message: message.into(),
        }
    }

    /// The node is not in a state to do it.
    pub fn precondition(message: impl Into<String>) -> Self {
        Self {
            code: code::FAILED_PRECONDITION,
            message: message.into(),
        }
    }
}

/// What the plugin does with the runtime's calls.
pub trait Plugin: Send + Sync + 'static {
    /// The events it takes.
    fn events(&self) -> Events;

    /// The runtime's pods and containers when the plugin connects (after
    /// every reconnection too). Updates returned are applied to them.
    ///
    /// # Errors
    /// A refusal: the runtime then does not take the plugin.
    fn synchronize(
        &self,
        _pods: &[api::PodSandbox],
        _containers: &[api::Container],
    ) -> Result<Vec<api::ContainerUpdate>, Refusal> {
        Ok(Vec::new())
    }

    /// A container about to be created: its adjustment.
    ///
    /// # Errors
    /// A refusal fails the container's creation with its message.
    fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> Result<api::ContainerAdjustment, Refusal>;

    /// A container's resources about to be updated (the kubelet's CPU
    /// manager moves exclusive CPUs this way).
    ///
    /// # Errors
    /// A refusal fails the update.
    fn update_container(
        &self,
        _pod: &api::PodSandbox,
        _container: &api::Container,
        _resources: Option<&api::LinuxResources>,
    ) -> Result<Vec<api::ContainerUpdate>, Refusal> {
        Ok(Vec::new())
    }

    /// A container about to be stopped.
    ///
    /// # Errors
    /// A refusal, which the runtime logs.
    fn stop_container(&self, _pod: &api::PodSandbox, _container: &api::Container) -> Result<(), Refusal> {
        Ok(())
    }

    /// Any other event the plugin takes (a container removed, started...).
    fn state_change(
        &self,
        _event: api::Event,
        _pod: Option<&api::PodSandbox>,
        _container: Option<&api::Container>,
    ) {
    }

    /// The plugin was registered with the runtime (`true`), or its
    /// connection ended (`false`): while it is not connected, the runtime
    /// creates containers without its adjustments.
    fn connection_changed(&self, _connected: bool) {}
}

/// Why a connection to the runtime ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The socket could not be reached.
    #[error("connecting to {socket}")]
    Connect {
        /// The socket's path.
        socket: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The multiplexed socket could not be read.
    #[error(transparent)]
    Mux(#[from] MuxError),
    /// A logical connection carried something that is not ttrpc.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The runtime did not answer the registration in time.
    #[error("the runtime did not answer RegisterPlugin within {0:?}")]
    RegistrationTimeout(Duration),
    /// The runtime refused the registration.
    #[error("the runtime refused the registration: {0}")]
    Refused(String),
    /// The runtime's answer could not be decoded.
    #[error("decoding the runtime's answer to {method}")]
    Decode {
        /// The call.
        method: &'static str,
        /// The cause.
        #[source]
        source: prost::DecodeError,
    },
    /// The socket closed before the registration was answered.
    #[error("the runtime closed the connection before answering RegisterPlugin")]
    ClosedEarly,
}

/// Calls awaiting the runtime's answer, by stream.
type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Response>>>>;

/// The state of one connection's `Plugin` service.
struct Server<P> {
    plugin: Arc<P>,
    /// Pods and containers of a synchronization split over several requests.
    sync_pods: Vec<api::PodSandbox>,
    sync_containers: Vec<api::Container>,
}

impl<P: Plugin> Server<P> {
    fn dispatch(&mut self, request: &Request) -> Response {
        if request.service != PLUGIN_SERVICE {
            return refusal(Refusal {
                code: code::UNIMPLEMENTED,
                message: format!("service {}", request.service),
            });
        }
        match self.call(&request.method, &request.payload) {
            Ok(payload) => Response {
                status: None,
                payload,
            },
            Err(refused) => refusal(refused),
        }
    }

    fn call(&mut self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Refusal> {
        fn decode<M: prost::Message + Default>(method: &str, payload: &[u8]) -> Result<M, Refusal> {
            M::decode(payload).map_err(|e| Refusal::invalid(format!("decoding the {method} request: {e}")))
        }
        let plugin = Arc::clone(&self.plugin);
        match method {
            "Configure" => {
                let request: api::ConfigureRequest = decode(method, payload)?;
                tracing::info!(
                    runtime = %request.runtime_name,
                    version = %request.runtime_version,
                    request_timeout_ms = request.request_timeout,
                    "NRI: configured by the runtime"
                );
                Ok(api::ConfigureResponse {
                    events: plugin.events().mask(),
                }
                .encode_to_vec())
            }
            "Synchronize" => {
                let request: api::SynchronizeRequest = decode(method, payload)?;
                self.sync_pods.extend(request.pods);
                self.sync_containers.extend(request.containers);
                if request.more {
                    return Ok(api::SynchronizeResponse {
                        update: Vec::new(),
                        more: true,
                    }
                    .encode_to_vec());
                }
                let pods = std::mem::take(&mut self.sync_pods);
                let containers = std::mem::take(&mut self.sync_containers);
                tracing::info!(
                    pods = pods.len(),
                    containers = containers.len(),
                    "NRI: synchronized with the runtime"
                );
                let update = plugin.synchronize(&pods, &containers)?;
                Ok(api::SynchronizeResponse { update, more: false }.encode_to_vec())
            }
            "CreateContainer" => {
                let request: api::CreateContainerRequest = decode(method, payload)?;
                let pod = request.pod.unwrap_or_default();
                let container = request.container.unwrap_or_default();
                let adjust = plugin.create_container(&pod, &container)?;
                Ok(api::CreateContainerResponse {
                    adjust: Some(adjust),
                    update: Vec::new(),
                    evict: Vec::new(),
                }
                .encode_to_vec())
            }
            "UpdateContainer" => {
                let request: api::UpdateContainerRequest = decode(method, payload)?;
                let pod = request.pod.unwrap_or_default();
                let container = request.container.unwrap_or_default();
                let update = plugin.update_container(&pod, &container, request.linux_resources.as_ref())?;
                Ok(api::UpdateContainerResponse {
                    update,
                    evict: Vec::new(),
                }
                .encode_to_vec())
            }
            "StopContainer" => {
                let request: api::StopContainerRequest = decode(method, payload)?;
                plugin.stop_container(
                    &request.pod.unwrap_or_default(),
                    &request.container.unwrap_or_default(),
                )?;
                Ok(api::StopContainerResponse { update: Vec::new() }.encode_to_vec())
            }
            "StateChange" => {
                let request: api::StateChangeEvent = decode(method, payload)?;
                let event = api::Event::try_from(request.event).unwrap_or(api::Event::Unknown);
                plugin.state_change(event, request.pod.as_ref(), request.container.as_ref());
                Ok(api::Empty {}.encode_to_vec())
            }
            "Shutdown" => Ok(api::Empty {}.encode_to_vec()),
            other => Err(Refusal {
                code: code::UNIMPLEMENTED,
                message: format!("method {other}"),
            }),
        }
    }
}

fn refusal(refused: Refusal) -> Response {
    Response {
        status: Some(Status {
            code: refused.code,
            message: refused.message,
        }),
        payload: Vec::new(),
    }
}

/// Serves one connection to the runtime until the runtime closes it:
/// registers, answers every call, returns `Ok` at the end of the stream.
///
/// # Errors
/// The registration refused or unanswered, or bytes that are not the
/// protocol.
pub async fn serve<S, P>(
    stream: S,
    registration: &Registration,
    plugin: Arc<P>,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    P: Plugin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (out, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let writing = tokio::spawn(async move {
        while let Some(bytes) = outgoing.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let pending: Pending = Arc::default();
    let connection_plugin = Arc::clone(&plugin);
    let reading = {
        let out = out.clone();
        let pending = Arc::clone(&pending);
        tokio::spawn(async move {
            let mut server = Server {
                plugin,
                sync_pods: Vec::new(),
                sync_containers: Vec::new(),
            };
            let mut plugin_conn = Reassembler::default();
            let mut runtime_conn = Reassembler::default();
            while let Some((conn, payload)) = mux::read_frame(&mut reader).await? {
                match conn {
                    PLUGIN_SERVICE_CONN => {
                        for message in plugin_conn.push(&payload)? {
                            answer(&mut server, &message, &out)?;
                        }
                    }
                    RUNTIME_SERVICE_CONN => {
                        for message in runtime_conn.push(&payload)? {
                            let waiting = pending.lock().ok().and_then(|mut p| p.remove(&message.stream));
                            match (message.kind, waiting) {
                                (ttrpc::TYPE_RESPONSE, Some(waiting)) => {
                                    if let Ok(response) = Response::decode(message.data.as_slice()) {
                                        let _ = waiting.send(response);
                                    }
                                }
                                _ => tracing::debug!(
                                    stream = message.stream,
                                    kind = message.kind,
                                    "NRI: a message on the runtime connection nobody waits for"
                                ),
                            }
                        }
                    }
                    other => tracing::debug!(conn = other, "NRI: a frame on an unknown connection"),
                }
            }
            Ok::<(), ConnectionError>(())
        })
    };

    let registered = register(registration, &out, &pending).await;
    let ended = if let Err(error) = registered {
        reading.abort();
        Err(error)
    } else {
        tracing::info!(plugin = %registration.name, index = %registration.index, "NRI: registered with the runtime");
        connection_plugin.connection_changed(true);
        let result = reading.await.unwrap_or(Ok(()));
        connection_plugin.connection_changed(false);
        result
    };
    drop(out);
    let _ = writing.await;
    ended
}

fn answer<P: Plugin>(
    server: &mut Server<P>,
    message: &Message,
    out: &mpsc::UnboundedSender<Vec<u8>>,
) -> Result<(), FrameError> {
    if message.kind != ttrpc::TYPE_REQUEST {
        tracing::debug!(
            stream = message.stream,
            kind = message.kind,
            "NRI: not a request on the plugin connection"
        );
        return Ok(());
    }
    let response = match Request::decode(message.data.as_slice()) {
        Ok(request) => server.dispatch(&request),
        Err(error) => refusal(Refusal::invalid(format!("decoding a ttrpc request: {error}"))),
    };
    let reply = Message {
        stream: message.stream,
        kind: ttrpc::TYPE_RESPONSE,
        flags: 0,
        data: response.encode_to_vec(),
    }
    .encode()?;
    let _ = out.send(mux::frames(PLUGIN_SERVICE_CONN, &reply));
    Ok(())
}

async fn register(
    registration: &Registration,
    out: &mpsc::UnboundedSender<Vec<u8>>,
    pending: &Pending,
) -> Result<(), ConnectionError> {
    const STREAM: u32 = 1;
    let (answer, answered) = oneshot::channel();
    if let Ok(mut pending) = pending.lock() {
        pending.insert(STREAM, answer);
    }
    let request = Request {
        service: RUNTIME_SERVICE.to_owned(),
        method: "RegisterPlugin".to_owned(),
        payload: api::RegisterPluginRequest {
            plugin_name: registration.name.clone(),
            plugin_idx: registration.index.clone(),
        }
        .encode_to_vec(),
        timeout_nano: i64::try_from(REGISTRATION_TIMEOUT.as_nanos()).unwrap_or(i64::MAX),
        metadata: Vec::new(),
    };
    let message = Message {
        stream: STREAM,
        kind: ttrpc::TYPE_REQUEST,
        flags: 0,
        data: request.encode_to_vec(),
    }
    .encode()?;
    let _ = out.send(mux::frames(RUNTIME_SERVICE_CONN, &message));
    let response = match tokio::time::timeout(REGISTRATION_TIMEOUT, answered).await {
        Err(_) => return Err(ConnectionError::RegistrationTimeout(REGISTRATION_TIMEOUT)),
        Ok(Err(_)) => return Err(ConnectionError::ClosedEarly),
        Ok(Ok(response)) => response,
    };
    match response.status {
        Some(status) if status.code != code::OK => Err(ConnectionError::Refused(status.message)),
        _ => api::Empty::decode(response.payload.as_slice())
            .map(|_| ())
            .map_err(|source| ConnectionError::Decode {
                method: "RegisterPlugin",
                source,
            }),
    }
}

/// Connects to the runtime's NRI socket and serves it, connecting again
/// (after 0.5 s, doubling to 5 s while it fails) whenever the connection
/// ends. Never returns.
pub async fn run<P: Plugin>(socket: &Path, registration: Registration, plugin: Arc<P>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = match tokio::net::UnixStream::connect(socket).await {
            Ok(stream) => {
                backoff = Duration::from_millis(500);
                serve(stream, &registration, Arc::clone(&plugin)).await
            }
            Err(source) => Err(ConnectionError::Connect {
                socket: socket.display().to_string(),
                source,
            }),
        };
        match outcome {
            Ok(()) => tracing::warn!("NRI: the runtime closed the connection; connecting again"),
            Err(error) => {
                tracing::warn!(error = %vfplane_proto::error_chain(&error), retry_in = ?backoff, "NRI: no connection to the runtime");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
