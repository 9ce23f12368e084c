//! The vfplane kubelet device plugin.
//!
//! Every pool of the pool config file ([`vfplane_proto::pool`]) is one
//! extended resource, `vfplane.io/<pool>`, served on its own unix socket
//! `vfplane-<pool>.sock` in the kubelet's device-plugin directory:
//!
//! - ListAndWatch lists the pool's VFs by PCI address with their NUMA node
//!   and real health ([`health`]), and sends an update within 100 ms of a
//!   change ([`scanner`] says how);
//! - Allocate hands out `/dev/vfio/vfio` and `/dev/vfio/<group>`, the
//!   `PCIDEVICE_VFPLANE_IO_<POOL>` variables and CDI names ([`cdi`]);
//! - GetPreferredAllocation keeps a container on one NUMA node and spreads
//!   or packs across PFs ([`preferred`]);
//! - a kubelet restart (noticed by inotify on its directory) gets our
//!   sockets served and registered again at once;
//! - the config file is watched and applied live;
//! - an NRI plugin ([`nri`]) gives containers holding VFs their pools'
//!   profile (locked memory, pids, NUMA cpuset) through the runtime;
//! - metrics in Prometheus text ([`metrics`]);
//! - pools whose `resourceApi` is `dra` are served as DRA driver
//!   `vfplane.io` instead ([`dra`]): ResourceSlices, prepare and unprepare
//!   per claim, health to the kubelet.
//!
//! [`start`] runs it; the binary is a thin wrapper. `kubelet_standin`
//! (feature `kubelet-standin`) is a minimal kubelet for this crate's tests
//! and the testbed's `kubelet-standin` example; it is not in the plugin's
//! build.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

pub mod cdi;
pub mod cli;
pub mod dra;
pub mod health;
pub mod inventory;
#[cfg(feature = "kubelet-standin")]
pub mod kubelet_standin;
pub mod metrics;
pub mod nri;
pub mod oci_hook;
mod plugin;
pub mod preferred;
pub mod registration;
pub mod scanner;
mod server;
mod watch;

pub use plugin::{MAX_REQUEST_BYTES, PluginConfig, RunningPlugin, SOCKET_PREFIX, socket_name, start};

/// What can stop the plugin from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pool config file cannot be read.
    #[error("cannot read the pool config {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pool config file is refused (the message names the line).
    #[error("the pool config {path} is refused")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, with its line.
        #[source]
        source: vfplane_proto::pool::PoolConfigError,
    },
    /// A directory the plugin needs cannot be made.
    #[error("cannot make the directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A pool's socket cannot be bound.
    #[error("cannot serve on {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A directory cannot be watched.
    #[error("cannot watch {path} with inotify")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The API server's client cannot be made (the DRA driver needs it).
    #[error("cannot make a Kubernetes client for the DRA driver (in-cluster config or KUBECONFIG)")]
    Kube {
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The DRA driver cannot start.
    #[error("cannot start the DRA driver")]
    Dra(#[source] dra::DraError),
    /// A task or thread of the plugin died.
    #[error("plugin task failed: {0}")]
    Task(String),
}

/// Short form for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
