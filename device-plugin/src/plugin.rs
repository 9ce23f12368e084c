//! The running plugin: one gRPC server per pool, the scanner, the file
//! watches, kubelet restarts, live config reloads and graceful shutdown.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use vfplane_host::Host;
use vfplane_proto::container_env::info_env_var;
use vfplane_proto::deviceplugin::v1beta1::device_plugin_server::DevicePluginServer;
use vfplane_proto::pool::{Pool, PoolConfig, PoolConfigError, ResourceApi, pci_env_var};

use crate::cdi::CdiWriter;
use crate::inventory::Inventory;
use crate::metrics::{self, NodeMetrics, PoolSample, bump};
use crate::registration::{Kick, registration_loop};
use crate::scanner::{self, ScanCommand, ScanTiming};
use crate::server::{DevicePluginService, NodeContext, PoolShared};
use crate::watch::{FsEvent, WatchedDir, Watcher};
use crate::{Error, Result};

/// Prefix of every socket this plugin serves: `vfplane-<pool>.sock`.
pub const SOCKET_PREFIX: &str = "vfplane-";

/// The largest request a pool's gRPC server decodes; larger ones are
/// refused (`OutOfRange`) without ending the connection. The kubelet's
/// largest, an Allocate naming every VF of a node, is a few kB.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The socket file name of a pool.
pub fn socket_name(pool: &str) -> String {
    format!("{SOCKET_PREFIX}{pool}.sock")
}

/// How the plugin runs.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The pool config file.
    pub pool_config: PathBuf,
    /// The kubelet's device-plugin directory (`kubelet.sock` and ours).
    pub kubelet_dir: PathBuf,
    /// Where the host's sysfs is mounted.
    pub sysfs_root: PathBuf,
    /// Where the host's `/dev` is mounted.
    pub dev_root: PathBuf,
    /// Where the CDI spec is written; `None`: no CDI.
    pub cdi_dir: Option<PathBuf>,
    /// Where `vfplane-oci-hook` is installed for the runtime to run (a
    /// directory the node and this process see at the same path); `None`:
    /// not installed, and pools with a locked-memory limit refuse
    /// `Allocate`.
    pub oci_hook_dir: Option<PathBuf>,
    /// The VF state directory ([`vfplane_proto::vf_state`]).
    pub state_dir: PathBuf,
    /// The container runtime's NRI socket, which the plugin connects to
    /// (and reconnects to whenever the runtime restarts); `None`: no NRI,
    /// and pools with a container profile refuse `Allocate`.
    pub nri_socket: Option<PathBuf>,
    /// Serve metrics here.
    pub metrics_addr: Option<SocketAddr>,
    /// Period of the safety-net health probe; kernel events and inotify
    /// start a probe at once.
    pub rescan_interval: Duration,
    /// Full discovery period (safety net).
    pub discovery_interval: Duration,
    /// How long a stopping server may take to close its connections.
    pub drain_timeout: Duration,
    /// How long Allocate waits for the agent to scrub a VF the kubelet
    /// offers again before the scrub is done (the agent's 10 s grace after
    /// a release, then the scrub); refused after that.
    pub scrub_wait: Duration,
    /// Serve the pools whose `resourceApi` is `dra` as DRA driver
    /// `vfplane.io` (needs the API server: in-cluster config or
    /// KUBECONFIG); `None`: those pools are not served.
    pub dra: Option<crate::dra::DraConfig>,
}

impl PluginConfig {
    /// The defaults of a node: `/var/lib/kubelet/device-plugins`, `/sys`,
    /// `/dev`, `/var/run/cdi`, `/run/vfplane/vf-state`, no metrics, a 1 s
    /// safety-net probe (kernel events and inotify start the others), a 30 s
    /// safety-net discovery, 5 s drain, 30 s wait for a pending scrub.
    pub fn new(pool_config: impl Into<PathBuf>) -> Self {
        Self {
            pool_config: pool_config.into(),
            kubelet_dir: PathBuf::from(vfplane_proto::DEVICE_PLUGIN_PATH),
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            cdi_dir: Some(PathBuf::from("/var/run/cdi")),
            oci_hook_dir: None,
            state_dir: PathBuf::from(vfplane_proto::vf_state::DEFAULT_STATE_DIR),
            nri_socket: Some(PathBuf::from(crate::nri::DEFAULT_SOCKET)),
            metrics_addr: None,
            rescan_interval: Duration::from_secs(1),
            discovery_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(5),
            scrub_wait: Duration::from_secs(30),
            dra: None,
        }
    }
}

/// A started plugin.
#[derive(Debug)]
pub struct RunningPlugin {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
    metrics_addr: Option<SocketAddr>,
}

impl RunningPlugin {
    /// Where metrics are served (with the real port when 0 was asked).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops gracefully: streams end, servers drain, sockets are removed.
    ///
    /// # Errors
    /// When the plugin had failed.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }

    /// Waits until the plugin stops on its own (it does only on failure).
    ///
    /// # Errors
    /// The failure.
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.task).await.map_err(|e| Error::Task(e.to_string()))?
    }
}

/// Installs `vfplane-oci-hook` (found beside this executable) into the
/// configured directory, when CDI is on; `None` (logged) when it cannot be.
fn install_oci_hook(config: &PluginConfig) -> Option<PathBuf> {
    let dir = config.oci_hook_dir.as_ref()?;
    config.cdi_dir.as_ref()?;
    let source = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|p| p.join(crate::oci_hook::HOOK_BINARY)));
    let Some(source) = source.filter(|s| s.exists()) else {
        tracing::warn!(dir = %dir.display(), "no vfplane-oci-hook beside this executable: pools with lockedMemory refuse Allocate");
        return None;
    };
    match crate::oci_hook::install(&source, dir) {
        Ok(path) => {
            tracing::info!(path = %path.display(), "OCI hook installed");
            Some(path)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot install the OCI hook: pools with lockedMemory refuse Allocate");
            None
        }
    }
}

/// Starts the plugin: reads the pool config, starts the scanner and the
/// watches, serves every pool and registers it (when a kubelet is there).
/// Returns once every pool is served and its devices scanned.
///
/// # Errors
/// A pool config that does not parse (a missing file is no pools, served
/// when it appears), a kubelet directory that cannot be made or watched, a
/// socket that cannot be bound, a metrics address that cannot be bound.
pub async fn start(config: PluginConfig) -> Result<RunningPlugin> {
    let dra_client = match &config.dra {
        Some(_) => Some(
            kube::Client::try_default()
                .await
                .map_err(|source| Error::Kube { source })?,
        ),
        None => None,
    };
    let initial = match read_config(&config.pool_config)? {
        Some((text, parsed)) => Some((text, parsed)),
        None => {
            tracing::warn!(path = %config.pool_config.display(), "no pool config file yet; serving no pools until it appears");
            None
        }
    };
    fs::create_dir_all(&config.kubelet_dir).map_err(|source| Error::Dir {
        path: config.kubelet_dir.clone(),
        source,
    })?;
    if let Err(error) = fs::create_dir_all(&config.state_dir) {
        tracing::warn!(path = %config.state_dir.display(), %error, "cannot make the VF state directory");
    }
    remove_stale_sockets(&config.kubelet_dir);

    let node = Arc::new(NodeContext {
        host: Host::new(&config.sysfs_root, &config.dev_root),
        state_dir: config.state_dir.clone(),
        scrub_wait: config.scrub_wait,
        owners: RwLock::default(),
        cdi: CdiWriter::new(config.cdi_dir.clone(), install_oci_hook(&config)),
        edits: RwLock::default(),
        nri: crate::nri::NriState::default(),
        metrics: NodeMetrics::default(),
        scans: tokio::sync::watch::Sender::new(0),
    });
    let nri_task = config.nri_socket.clone().map(|socket| {
        let plugin = Arc::new(crate::nri::ContainerLimits::new(Arc::clone(&node)));
        tokio::spawn(async move {
            // The name and index are constants that pass the check.
            if let Ok(registration) =
                vfplane_nri::Registration::new(crate::nri::PLUGIN_NAME, crate::nri::PLUGIN_INDEX)
            {
                vfplane_nri::run(&socket, registration, plugin).await;
            }
        })
    });
    let registry: Arc<RwLock<BTreeMap<String, Arc<PoolShared>>>> = Arc::default();

    let mut metrics_addr = None;
    let mut metrics_task = None;
    if let Some(addr) = config.metrics_addr {
        let listener = metrics::bind(addr)
            .await
            .map_err(|source| Error::Metrics { addr, source })?;
        metrics_addr = listener.local_addr().ok();
        let node = Arc::clone(&node);
        let registry = Arc::clone(&registry);
        metrics_task = Some(tokio::spawn(metrics::serve(listener, move || {
            let pools = registry.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            let samples: Vec<PoolSample<'_>> = pools
                .values()
                .map(|p| PoolSample {
                    pool: &p.name,
                    metrics: &p.metrics,
                    view: p.current_view(),
                })
                .collect();
            metrics::render(&node.metrics, &samples)
        })));
        tracing::info!(addr = ?metrics_addr, "serving metrics");
    }

    let (event_tx, events) = mpsc::unbounded_channel();
    let watcher = Watcher::start(event_tx).map_err(|source| Error::Watch {
        path: config.kubelet_dir.clone(),
        source,
    })?;
    watcher
        .watch(WatchedDir::Kubelet, &config.kubelet_dir)
        .map_err(|source| Error::Watch {
            path: config.kubelet_dir.clone(),
            source,
        })?;
    let config_dir = config_dir(&config.pool_config);
    if let Err(error) = watcher.watch(WatchedDir::Config, &config_dir) {
        tracing::warn!(path = %config_dir.display(), %error, "cannot watch the pool config's directory; re-reading it every 2 s");
    }
    let _ = watcher.watch(WatchedDir::State, &config.state_dir);
    let _ = watcher.watch(WatchedDir::Vfio, &config.dev_root.join("vfio"));

    let (scan_tx, scan_rx) = std::sync::mpsc::channel();
    let inventory = Inventory::new(node.host.clone(), config.state_dir.clone());
    let timing = ScanTiming {
        rescan: config.rescan_interval,
        discovery: config.discovery_interval,
    };
    let scanner_node = Arc::clone(&node);
    let scanner_thread = std::thread::Builder::new()
        .name("vfplane-scanner".to_owned())
        .spawn(move || scanner::run(inventory, scan_rx, scanner_node, timing))
        .map_err(|e| Error::Task(format!("cannot start the scanner thread: {e}")))?;

    listen_to_the_kernel(&scan_tx, config.rescan_interval);

    let kubelet_socket = config.kubelet_dir.join(vfplane_proto::KUBELET_SOCKET);
    let mut supervisor = Supervisor {
        config,
        node,
        pools: BTreeMap::new(),
        registry,
        scanner: scan_tx,
        scanner_thread: Some(scanner_thread),
        watcher,
        events,
        last_config_text: None,
        metrics_task,
        nri_task,
        kubelet_socket,
        dra: None,
    };
    if let Some((text, parsed)) = initial {
        supervisor.last_config_text = Some(text);
        if let Err(error) = supervisor.apply(parsed).await {
            supervisor.shutdown().await;
            return Err(error);
        }
    }
    if let (Some(dra), Some(client)) = (supervisor.config.dra.clone(), dra_client) {
        match crate::dra::start(
            dra,
            client,
            Arc::clone(&supervisor.registry),
            Arc::clone(&supervisor.node),
        )
        .await
        {
            Ok(runtime) => supervisor.dra = Some(runtime),
            Err(error) => {
                supervisor.shutdown().await;
                return Err(Error::Dra(error));
            }
        }
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(supervisor.run(stop_rx));
    Ok(RunningPlugin {
        stop: Some(stop_tx),
        task,
        metrics_addr,
    })
}

/// Health follows the kernel's events: a uevent (a VF bound, unbound,
/// created, removed) or a link message (a PF's carrier) makes the scanner
/// probe at once; the periodic probe is only the safety net. Without a
/// socket, changes wait for that probe, and the log says so.
fn listen_to_the_kernel(scan: &std::sync::mpsc::Sender<ScanCommand>, rescan: Duration) {
    use vfplane_host::kernel_events::{spawn_link_listener, spawn_uevent_listener};
    let to_scanner = |scan: &std::sync::mpsc::Sender<ScanCommand>| {
        let scan = scan.clone();
        move || scan.send(ScanCommand::Scan).is_ok()
    };
    if let Err(error) = spawn_uevent_listener("vfplane-uevents", to_scanner(scan)) {
        tracing::warn!(%error, every = ?rescan, "no uevent socket: drivers bound or unbound and VFs gone are seen at the periodic probe");
    }
    if let Err(error) = spawn_link_listener("vfplane-links", to_scanner(scan)) {
        tracing::warn!(%error, every = ?rescan, "no rtnetlink socket: PF link changes are seen at the periodic probe");
    }
}

/// Reads and parses the pool config; `Ok(None)` when the file is missing.
fn read_config(path: &Path) -> Result<Option<(String, PoolConfig)>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::ReadConfig {
                path: path.to_owned(),
                source,
            });
        }
    };
    let parsed = parse_config(&text).map_err(|source| Error::Config {
        path: path.to_owned(),
        source,
    })?;
    warn_when_empty(path, &parsed);
    Ok(Some((text, parsed)))
}

/// A config without pools is valid (a node with nothing to offer yet) but
/// is seldom meant: an empty file, or the pools under another key. Said
/// once per config read, naming the file.
fn warn_when_empty(path: &Path, config: &PoolConfig) {
    if config.pools.is_empty() {
        tracing::warn!(path = %path.display(), "the pool config defines no pools: no resource is offered to the kubelet");
    }
}

/// Parses a pool config, and refuses pools whose container variables
/// would collide: `fast-lane` and `fast.lane` both make
/// `PCIDEVICE_VFPLANE_IO_FAST_LANE`, and `fast-info` makes the variable
/// that is `fast`'s `_INFO`.
pub(crate) fn parse_config(text: &str) -> Result<PoolConfig, PoolConfigError> {
    let config = PoolConfig::from_yaml(text)?;
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for pool in &config.pools {
        for var in [pci_env_var(&pool.name), info_env_var(&pool.name)] {
            if let Some(other) = seen.insert(var.clone(), &pool.name) {
                let line = text
                    .lines()
                    .position(|l| {
                        l.trim_start()
                            .trim_start_matches('-')
                            .trim_start()
                            .strip_prefix("name:")
                            .is_some_and(|v| v.trim().trim_matches(['"', '\'']) == pool.name)
                    })
                    .map_or(0, |i| i + 1);
                return Err(PoolConfigError::Invalid {
                    line,
                    pool: pool.name.clone(),
                    reason: format!(
                        "its container variable {var} is also pool {other:?}'s; rename one of them"
                    ),
                });
            }
        }
    }
    Ok(config)
}

fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Removes sockets a previous run of this plugin left behind (a crash, or
/// a pool removed while it was down). The kubelet cannot use them.
fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(SOCKET_PREFIX) && name.ends_with(".sock") {
            match fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(socket = %entry.path().display(), "removed a stale socket"),
                Err(error) => {
                    tracing::warn!(socket = %entry.path().display(), %error, "cannot remove a stale socket")
                }
            }
        }
    }
}

/// The accept task of one socket: it feeds the pool's server, so the
/// socket can be served anew (after the kubelet wiped it) without
/// restarting the server or dropping its open ListAndWatch streams.
#[derive(Debug)]
struct Acceptor {
    task: JoinHandle<()>,
    /// (device, inode) of the socket file we bound, so we remove only ours.
    identity: (u64, u64),
}

#[derive(Debug)]
struct PoolRuntime {
    shared: Arc<PoolShared>,
    incoming: mpsc::Sender<io::Result<UnixStream>>,
    acceptor: Option<Acceptor>,
    server: JoinHandle<()>,
    server_stop: Option<oneshot::Sender<()>>,
    registration: JoinHandle<()>,
    kick: Kick,
}

impl PoolRuntime {
    /// Starts the pool's gRPC server and registration task. Nothing is
    /// listening yet: [`PoolRuntime::serve_socket`] does that.
    fn start(shared: Arc<PoolShared>, kubelet_socket: PathBuf) -> Self {
        let (incoming, incoming_rx) = mpsc::channel::<io::Result<UnixStream>>(16);
        let (server_stop, stop_rx) = oneshot::channel::<()>();
        let service = DevicePluginService {
            shared: Arc::clone(&shared),
        };
        let name = shared.name.clone();
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(DevicePluginServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES))
                .serve_with_incoming_shutdown(ReceiverStream::new(incoming_rx), async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(error) = result {
                tracing::error!(pool = %name, error = %vfplane_host::error_chain(&error), "gRPC server failed");
            }
        });
        let (kick, kicks) = Kick::new();
        let registration = tokio::spawn(registration_loop(Arc::clone(&shared), kubelet_socket, kicks));
        Self {
            shared,
            incoming,
            acceptor: None,
            server,
            server_stop: Some(server_stop),
            registration,
            kick,
        }
    }

    /// Binds the pool's socket (replacing whatever is at its path) and
    /// accepts on it; the previous socket, if any, stops accepting.
    fn serve_socket(&mut self) -> Result<()> {
        let path = &self.shared.socket_path;
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(Error::Bind {
                    path: path.clone(),
                    source: e,
                });
            }
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        let meta = fs::metadata(path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        let incoming = self.incoming.clone();
        let name = self.shared.name.clone();
        let task = tokio::spawn(async move {
            let mut connections = UnixListenerStream::new(listener);
            while let Some(connection) = connections.next().await {
                match connection {
                    Ok(stream) => {
                        if incoming.send(Ok(stream)).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        // EMFILE and friends: do not spin.
                        tracing::warn!(pool = %name, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        if let Some(old) = self.acceptor.replace(Acceptor {
            task,
            identity: (meta.dev(), meta.ino()),
        }) {
            old.task.abort();
        }
        tracing::info!(pool = %self.shared.name, socket = %path.display(), "serving");
        Ok(())
    }

    /// True when our socket file is still at its path.
    fn socket_is_ours(&self) -> bool {
        let Some(acceptor) = &self.acceptor else {
            return false;
        };
        fs::metadata(&self.shared.socket_path)
            .map(|m| (m.dev(), m.ino()) == acceptor.identity)
            .unwrap_or(false)
    }

    /// Serves the socket again when it is gone, then registers.
    fn ensure_served_and_register(&mut self) {
        if !self.socket_is_ours() {
            tracing::info!(pool = %self.shared.name, "our socket is gone; serving it again");
            if let Err(error) = self.serve_socket() {
                tracing::error!(pool = %self.shared.name, error = %vfplane_host::error_chain(&error), "cannot serve the pool");
                return;
            }
        }
        self.kick.kick();
    }

    /// Stops: the socket is removed (if still ours), streams end, the
    /// server drains for at most `drain`.
    async fn stop(mut self, drain: Duration) {
        // The socket goes first, so a kubelet that sees its stream end finds
        // nothing to reconnect to.
        self.registration.abort();
        if self.socket_is_ours()
            && let Err(error) = fs::remove_file(&self.shared.socket_path)
        {
            tracing::warn!(socket = %self.shared.socket_path.display(), %error, "cannot remove our socket");
        }
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.task.abort();
        }
        let _ = self.shared.stopped.send(true);
        if let Some(stop) = self.server_stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(drain, &mut self.server).await.is_err() {
            tracing::warn!(pool = %self.shared.name, "connections did not close in time; closing them");
            self.server.abort();
        }
        tracing::info!(pool = %self.shared.name, "pool stopped");
    }
}

struct Supervisor {
    config: PluginConfig,
    node: Arc<NodeContext>,
    pools: BTreeMap<String, PoolRuntime>,
    registry: Arc<RwLock<BTreeMap<String, Arc<PoolShared>>>>,
    scanner: std::sync::mpsc::Sender<ScanCommand>,
    scanner_thread: Option<std::thread::JoinHandle<()>>,
    watcher: Watcher,
    events: mpsc::UnboundedReceiver<FsEvent>,
    last_config_text: Option<String>,
    metrics_task: Option<JoinHandle<()>>,
    /// The NRI plugin's connection loop.
    nri_task: Option<JoinHandle<()>>,
    kubelet_socket: PathBuf,
    /// The DRA driver, when on.
    dra: Option<crate::dra::DraRuntime>,
}

/// How often the config file is re-read even without an inotify event (a
/// safety net for mounts that do not deliver events).
const CONFIG_POLL: Duration = Duration::from_secs(2);

impl Supervisor {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) -> Result<()> {
        let mut poll = tokio::time::interval(CONFIG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                event = self.events.recv() => match event {
                    Some(event) => self.on_event(event).await,
                    None => break,
                },
                _ = poll.tick() => {
                    self.reload().await;
                    if !self.watcher.is_watching(WatchedDir::Vfio) {
                        let _ = self.watcher.watch(WatchedDir::Vfio, &self.config.dev_root.join("vfio"));
                    }
                    if !self.watcher.is_watching(WatchedDir::Kubelet) {
                        self.kubelet_dir_gone();
                    }
                }
            }
        }
        self.shutdown().await;
        Ok(())
    }

    async fn on_event(&mut self, event: FsEvent) {
        match event.target {
            WatchedDir::Kubelet => {
                if event.overflowed() {
                    for pool in self.pools.values_mut() {
                        pool.ensure_served_and_register();
                    }
                } else if event.directory_gone() {
                    self.watcher.forget(WatchedDir::Kubelet);
                    self.kubelet_dir_gone();
                } else if event.is(vfplane_proto::KUBELET_SOCKET) {
                    if event.created() {
                        tracing::info!("kubelet.sock created: the kubelet (re)started; registering again");
                        for pool in self.pools.values_mut() {
                            pool.ensure_served_and_register();
                        }
                    } else if event.removed() {
                        tracing::info!("kubelet.sock removed: the kubelet stopped");
                    }
                } else if event.removed() {
                    let name = event.name.as_ref().map(|n| n.to_string_lossy().into_owned());
                    if let Some(pool) = self.pools.values_mut().find(|p| {
                        p.shared.socket_path.file_name().map(|f| f.to_string_lossy())
                            == name.as_deref().map(Into::into)
                    }) {
                        pool.ensure_served_and_register();
                    }
                }
            }
            WatchedDir::Config => {
                let file_name = self.config.pool_config.file_name().map(|n| n.to_owned());
                let relevant = event.overflowed()
                    || event.directory_gone()
                    || event.name.is_none()
                    || event.name == file_name
                    || event
                        .name
                        .as_ref()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".."));
                if event.directory_gone() {
                    self.watcher.forget(WatchedDir::Config);
                }
                if relevant {
                    self.reload().await;
                }
            }
            WatchedDir::Vfio => {
                if event.directory_gone() {
                    self.watcher.forget(WatchedDir::Vfio);
                }
                let _ = self.scanner.send(ScanCommand::Discover);
            }
            WatchedDir::State => {
                if event.directory_gone() {
                    self.watcher.forget(WatchedDir::State);
                }
                let _ = self.scanner.send(ScanCommand::Scan);
            }
        }
    }

    /// The kubelet directory itself was removed: make it again, watch it
    /// again, serve every socket again.
    fn kubelet_dir_gone(&mut self) {
        let dir = self.config.kubelet_dir.clone();
        if let Err(error) = fs::create_dir_all(&dir) {
            tracing::warn!(path = %dir.display(), %error, "cannot make the kubelet directory again");
            return;
        }
        match self.watcher.watch(WatchedDir::Kubelet, &dir) {
            Ok(()) => {
                tracing::info!(path = %dir.display(), "kubelet directory made again; serving again");
                for pool in self.pools.values_mut() {
                    pool.ensure_served_and_register();
                }
            }
            Err(error) => tracing::warn!(path = %dir.display(), %error, "cannot watch the kubelet directory"),
        }
    }

    /// Re-reads the config file; applies it when it changed and parses. A
    /// bad file is logged and the last good config keeps serving; a missing
    /// one too (the writer may be between delete and create).
    async fn reload(&mut self) {
        if !self.watcher.is_watching(WatchedDir::Config) {
            let dir = config_dir(&self.config.pool_config);
            let _ = self.watcher.watch(WatchedDir::Config, &dir);
        }
        let text = match fs::read_to_string(&self.config.pool_config) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(error) => {
                tracing::warn!(path = %self.config.pool_config.display(), %error, "cannot read the pool config");
                return;
            }
        };
        if self.last_config_text.as_deref() == Some(text.as_str()) {
            return;
        }
        self.last_config_text = Some(text.clone());
        match parse_config(&text) {
            Ok(parsed) => {
                tracing::info!(path = %self.config.pool_config.display(), pools = parsed.pools.len(), "pool config changed; applying");
                warn_when_empty(&self.config.pool_config, &parsed);
                match self.apply(parsed).await {
                    Ok(()) => bump(&self.node.metrics.config_reloads_ok),
                    Err(error) => {
                        bump(&self.node.metrics.config_reloads_error);
                        tracing::error!(error = %vfplane_host::error_chain(&error), "cannot apply the pool config");
                    }
                }
            }
            Err(error) => {
                bump(&self.node.metrics.config_reloads_error);
                tracing::error!(
                    path = %self.config.pool_config.display(),
                    error = %error,
                    "the new pool config is refused; the last good one keeps serving"
                );
            }
        }
    }

    /// Makes the running pools match `config`: removed pools stop, new ones
    /// start, changed ones take their new settings in place (their server,
    /// socket and streams stay), unchanged ones are not touched.
    async fn apply(&mut self, config: PoolConfig) -> Result<()> {
        let wanted: BTreeMap<String, Pool> =
            config.pools.iter().map(|p| (p.name.clone(), p.clone())).collect();
        let mut shared_pools: BTreeMap<String, Arc<PoolShared>> = BTreeMap::new();
        let mut new_pools = Vec::new();
        // A pool that moved to DRA stops being a device-plugin resource
        // (its PoolShared is made anew below, so nothing of its server
        // stays).
        let moved: Vec<String> = self
            .pools
            .keys()
            .filter(|n| wanted.get(*n).is_some_and(|p| p.resource_api == ResourceApi::Dra))
            .cloned()
            .collect();
        for name in moved {
            if let Some(runtime) = self.pools.remove(&name) {
                tracing::info!(pool = %name, "pool moved to DRA: no longer a device-plugin resource");
                runtime.stop(self.config.drain_timeout).await;
            }
        }
        let dra_before = self
            .registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (name, pool) in &wanted {
            if pool.resource_api == ResourceApi::Dra {
                let shared = match dra_before.get(name) {
                    Some(shared) if shared.config().resource_api == ResourceApi::Dra => {
                        if *shared.config() != *pool {
                            shared.set_config(pool.clone());
                        }
                        Arc::clone(shared)
                    }
                    _ => Arc::new(PoolShared::new(
                        pool.clone(),
                        PathBuf::new(),
                        Arc::clone(&self.node),
                    )),
                };
                shared_pools.insert(name.clone(), shared);
                continue;
            }
            match self.pools.get(name) {
                Some(runtime) => {
                    if *runtime.shared.config() != *pool {
                        tracing::info!(pool = %name, "pool settings changed");
                        runtime.shared.set_config(pool.clone());
                    }
                    shared_pools.insert(name.clone(), Arc::clone(&runtime.shared));
                }
                None => {
                    let socket = self.config.kubelet_dir.join(socket_name(name));
                    let shared = Arc::new(PoolShared::new(pool.clone(), socket, Arc::clone(&self.node)));
                    shared_pools.insert(name.clone(), Arc::clone(&shared));
                    new_pools.push(shared);
                }
            }
        }
        let (done_tx, done_rx) = oneshot::channel();
        let _ = self.scanner.send(ScanCommand::Config {
            config,
            pools: shared_pools.clone(),
            done: Some(done_tx),
        });
        let _ = done_rx.await;
        *self
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = shared_pools;

        let removed: Vec<String> = self
            .pools
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        // (DRA pools have no runtime: leaving the registry is all.)
        for name in removed {
            if let Some(runtime) = self.pools.remove(&name) {
                tracing::info!(pool = %name, "pool removed from the config");
                runtime.stop(self.config.drain_timeout).await;
            }
        }
        let mut failure = None;
        for shared in new_pools {
            let name = shared.name.clone();
            let mut runtime = PoolRuntime::start(shared, self.kubelet_socket.clone());
            match runtime.serve_socket() {
                Ok(()) => {
                    runtime.kick.kick();
                    self.pools.insert(name, runtime);
                }
                Err(error) => {
                    runtime.stop(Duration::ZERO).await;
                    failure.get_or_insert(error);
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    async fn shutdown(&mut self) {
        tracing::info!("shutting down");
        let _ = self.scanner.send(ScanCommand::Stop);
        let drain = self.config.drain_timeout;
        let pools = std::mem::take(&mut self.pools);
        let stops: Vec<_> = pools.into_values().map(|p| tokio::spawn(p.stop(drain))).collect();
        for stop in stops {
            let _ = stop.await;
        }
        if let Some(task) = self.metrics_task.take() {
            task.abort();
        }
        if let Some(task) = self.nri_task.take() {
            task.abort();
        }
        if let Some(dra) = self.dra.take() {
            dra.stop();
        }
        if let Some(thread) = self.scanner_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_whose_variables_collide_are_refused_with_the_line() {
        for (a, b) in [
            ("fast-lane", "fast.lane"),
            ("fast", "fast-info"),
            ("fast_info", "fast"),
        ] {
            let text =
                format!("pools:\n  - name: {a}\n    selector: {{}}\n  - name: {b}\n    selector: {{}}\n");
            let error = parse_config(&text).unwrap_err();
            assert!(
                matches!(&error, PoolConfigError::Invalid { line: 4, .. }),
                "{a} {b}: {error}"
            );
            assert!(error.to_string().contains("PCIDEVICE_VFPLANE_IO_FAST"), "{error}");
        }
        assert!(
            parse_config("pools:\n  - name: fast\n    selector: {}\n  - name: slow\n    selector: {}\n")
                .is_ok()
        );
    }
}
