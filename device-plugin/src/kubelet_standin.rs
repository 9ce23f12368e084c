//! A kubelet stand-in that speaks the real device plugin API v1beta1: it
//! serves `Registration` on `kubelet.sock` in a directory, records every
//! registration, and connects to a plugin's socket as a `DevicePlugin`
//! client. [`KubeletStandin::restart`] does what a restarting kubelet does:
//! stops, wipes the directory (plugin sockets included), serves anew.
//!
//! Like the kubelet (1.37, `ManagerImpl.PluginConnected`), it connects to
//! the plugin's endpoint while it answers a registration (options, then a
//! `ListAndWatch` stream it keeps reading), and refuses a registration of
//! an endpoint it is still connected to with "device plugin already
//! connected: <path>". The connection is dropped when the plugin's stream
//! ends, or when the stand-in restarts.
//!
//! The tests of this crate use it in process; the `kubelet-standin` example
//! wraps it in a binary for the testbed.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;
use vfplane_proto::deviceplugin::v1beta1::registration_server::{
    Registration as RegistrationApi, RegistrationServer,
};

/// One registration the stand-in accepted.
#[derive(Debug, Clone)]
pub struct Registration {
    /// What the plugin sent.
    pub request: dp::RegisterRequest,
    /// When it arrived.
    pub at: Instant,
}

impl Registration {
    /// The plugin's socket: the endpoint inside the kubelet directory.
    pub fn socket(&self, kubelet_dir: &Path) -> PathBuf {
        kubelet_dir.join(&self.request.endpoint)
    }
}

/// The endpoints (socket paths) the stand-in is connected to.
type Connected = Arc<Mutex<HashSet<PathBuf>>>;

#[derive(Debug)]
struct RegistrationService {
    dir: PathBuf,
    registrations: mpsc::UnboundedSender<Registration>,
    refusals: mpsc::UnboundedSender<Registration>,
    connected: Connected,
    streams: Streams,
}

/// The tasks reading the plugins' streams, aborted when the stand-in stops
/// (a kubelet that exits closes its connections).
type Streams = Arc<Mutex<Vec<tokio::task::AbortHandle>>>;

impl RegistrationService {
    /// Connects to the plugin as the kubelet does: its options, then a
    /// `ListAndWatch` stream read until it ends, which drops the connection.
    async fn connect(&self, socket: PathBuf) -> Result<(), Status> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            Status::unavailable(format!("{what} {}: {e}", socket.display()))
        };
        let mut client = connect_plugin(&socket)
            .await
            .map_err(|e| unavailable("cannot dial", &e))?;
        client
            .get_device_plugin_options(dp::Empty {})
            .await
            .map_err(|e| unavailable("no options from", &e))?;
        let mut stream = client
            .list_and_watch(dp::Empty {})
            .await
            .map_err(|e| unavailable("no ListAndWatch from", &e))?
            .into_inner();
        let connected = Arc::clone(&self.connected);
        let task = tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
            lock(&connected).remove(&socket);
        });
        lock(&self.streams).push(task.abort_handle());
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[tonic::async_trait]
impl RegistrationApi for RegistrationService {
    /// Checks what the kubelet checks: the version, an endpoint that is a
    /// file name, a domain-qualified resource name.
    async fn register(&self, request: Request<dp::RegisterRequest>) -> Result<Response<dp::Empty>, Status> {
        let at = Instant::now();
        let request = request.into_inner();
        if request.version != vfplane_proto::DEVICE_PLUGIN_VERSION {
            return Err(Status::invalid_argument(format!(
                "unsupported device plugin API version {:?}",
                request.version
            )));
        }
        if request.endpoint.is_empty() || request.endpoint.contains('/') {
            return Err(Status::invalid_argument(format!(
                "endpoint {:?} is not a socket file name",
                request.endpoint
            )));
        }
        if !request.resource_name.contains('/') {
            return Err(Status::invalid_argument(format!(
                "resource name {:?} is not an extended resource name",
                request.resource_name
            )));
        }
        let socket = self.dir.join(&request.endpoint);
        if !lock(&self.connected).insert(socket.clone()) {
            let _ = self.refusals.send(Registration { request, at });
            return Err(Status::unknown(format!(
                "device plugin already connected: {}",
                socket.display()
            )));
        }
        if let Err(status) = self.connect(socket.clone()).await {
            lock(&self.connected).remove(&socket);
            return Err(status);
        }
        let _ = self.registrations.send(Registration { request, at });
        Ok(Response::new(dp::Empty {}))
    }
}

/// The stand-in.
#[derive(Debug)]
pub struct KubeletStandin {
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Registration>,
    rx: mpsc::UnboundedReceiver<Registration>,
    refusals_tx: mpsc::UnboundedSender<Registration>,
    refusals: mpsc::UnboundedReceiver<Registration>,
    streams: Streams,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl KubeletStandin {
    /// Serves `kubelet.sock` in `dir` (made when missing).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub async fn start(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (refusals_tx, refusals) = mpsc::unbounded_channel();
        let mut standin = Self {
            dir: dir.into(),
            tx,
            rx,
            refusals_tx,
            refusals,
            streams: Streams::default(),
            server: None,
        };
        standin.serve()?;
        Ok(standin)
    }

    /// The kubelet directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/kubelet.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(vfplane_proto::KUBELET_SOCKET)
    }

    /// Binds `kubelet.sock` and serves Registration; returns the instant
    /// the socket was created.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn serve(&mut self) -> io::Result<Instant> {
        fs::create_dir_all(&self.dir)?;
        let path = self.socket_path();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        let created = Instant::now();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // A new kubelet process: no connections yet.
        let service = RegistrationService {
            dir: self.dir.clone(),
            registrations: self.tx.clone(),
            refusals: self.refusals_tx.clone(),
            connected: Connected::default(),
            streams: Arc::clone(&self.streams),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stop_rx.await;
                })
                .await;
        });
        self.server = Some((stop_tx, task));
        Ok(created)
    }

    /// Stops serving and removes `kubelet.sock`.
    pub async fn stop(&mut self) {
        for stream in lock(&self.streams).drain(..) {
            stream.abort();
        }
        if let Some((stop, mut task)) = self.server.take() {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let _ = fs::remove_file(self.socket_path());
    }

    /// What a restarting kubelet does: stop, remove every file in the
    /// directory (plugin sockets included), serve `kubelet.sock` anew.
    /// Returns the instant the new `kubelet.sock` was created.
    ///
    /// # Errors
    /// When the directory cannot be cleaned or the socket bound.
    pub async fn restart(&mut self) -> io::Result<Instant> {
        self.stop().await;
        self.wipe()?;
        self.serve()
    }

    /// Removes every file in the directory (not subdirectories).
    ///
    /// # Errors
    /// When the directory cannot be listed or a file removed.
    pub fn wipe(&self) -> io::Result<()> {
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// The next registration, waiting at most `timeout`.
    pub async fn next_registration(&mut self, timeout: Duration) -> Option<Registration> {
        tokio::time::timeout(timeout, self.rx.recv()).await.ok().flatten()
    }

    /// The next registration of `resource`, skipping others, waiting at
    /// most `timeout` in all.
    pub async fn next_registration_of(&mut self, resource: &str, timeout: Duration) -> Option<Registration> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let registration = self.next_registration(left).await?;
            if registration.request.resource_name == resource {
                return Some(registration);
            }
        }
    }

    /// Registrations received and not yet taken.
    pub fn take_registrations(&mut self) -> Vec<Registration> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).collect()
    }

    /// Registrations refused because the endpoint was still connected, not
    /// yet taken.
    pub fn take_refusals(&mut self) -> Vec<Registration> {
        std::iter::from_fn(|| self.refusals.try_recv().ok()).collect()
    }
}

/// A `DevicePlugin` client on a plugin's socket, as the kubelet makes one.
///
/// # Errors
/// When the socket does not answer.
pub async fn connect_plugin(
    socket: impl AsRef<Path>,
) -> Result<DevicePluginClient<Channel>, tonic::transport::Error> {
    Ok(DevicePluginClient::new(
        crate::registration::connect_unix(socket).await?,
    ))
}
