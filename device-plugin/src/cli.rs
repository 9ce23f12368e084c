//! The command line of `vfplane-device-plugin`, in the library so that the
//! flags the Helm chart passes can be checked against the real parser.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The environment variable holding the log filter (a tracing `EnvFilter`
/// directive such as `info` or `vfplane_host=debug`).
pub const LOG_ENV: &str = "VFPLANE_LOG";

/// Kubelet device plugin for vfplane VF pools.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The pool config file (YAML; see docs/device-plugin.md). Watched: changes apply live.
    #[arg(long, env = "VFPLANE_POOL_CONFIG")]
    pub pool_config: PathBuf,
    /// The kubelet's device-plugin directory.
    #[arg(long, default_value = vfplane_proto::DEVICE_PLUGIN_PATH)]
    pub kubelet_dir: PathBuf,
    /// Where the host's sysfs is mounted.
    #[arg(long, default_value = "/sys")]
    pub sysfs_root: PathBuf,
    /// Where the host's /dev is mounted.
    #[arg(long, default_value = "/dev")]
    pub dev_root: PathBuf,
    /// Where the CDI spec file is written.
    #[arg(long, default_value = "/var/run/cdi")]
    pub cdi_dir: PathBuf,
    /// Write no CDI spec and return no CDI device names.
    #[arg(long)]
    pub no_cdi: bool,
    /// Where the OCI hook (`vfplane-oci-hook`, beside this binary) is
    /// installed for the container runtime, which runs it in the node's
    /// namespaces: the directory must be at the same path on the node.
    /// Empty: not installed (pools with lockedMemory then refuse Allocate).
    #[arg(long, default_value = "/run/vfplane/bin")]
    pub oci_hook_dir: PathBuf,
    /// The container runtime's NRI socket: the plugin registers there and
    /// gives containers holding VFs their pool's profile. Empty: no NRI
    /// (pools with a container profile then refuse Allocate).
    #[arg(long, default_value = crate::nri::DEFAULT_SOCKET)]
    pub nri_socket: PathBuf,
    /// The VF state directory the agent writes (scrub states, MACs).
    #[arg(long, default_value = vfplane_proto::vf_state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Serve Prometheus metrics on this address (for example 0.0.0.0:9465).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Period of the safety-net health probe in milliseconds; kernel
    /// events (uevents, PF link messages) and inotify (`/dev/vfio`, the VF
    /// state directory) start a probe at once.
    #[arg(long, default_value_t = 1000)]
    pub rescan_interval_ms: u64,
    /// Also serve the pools whose resourceApi is `dra`, as DRA driver
    /// `vfplane.io`: ResourceSlices for this node, prepare and unprepare
    /// for the kubelet, device health (needs the API server and
    /// --node-name). Without it those pools are not served.
    #[arg(long, requires = "node_name")]
    pub dra: bool,
    /// This node's name (the chart passes the pod's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The kubelet's plugin registry directory (the DRA registration socket).
    #[arg(long, default_value = vfplane_proto::dra::PLUGIN_REGISTRY_PATH)]
    pub kubelet_registry_dir: PathBuf,
    /// The kubelet's plugins directory (the DRA socket and checkpoint go in
    /// `<dir>/vfplane.io`).
    #[arg(long, default_value = vfplane_proto::dra::PLUGINS_PATH)]
    pub kubelet_plugins_dir: PathBuf,
    /// How a VF released by a claim is kept from the next claim until it is
    /// scrubbed: a device taint, or binding conditions (docs/dra.md).
    #[arg(long, value_enum, default_value_t = crate::dra::ScrubGate::Taint)]
    pub dra_scrub_gate: crate::dra::ScrubGate,
}

impl Args {
    /// The DRA driver's settings, when `--dra` is given.
    pub fn dra_config(&self) -> Option<crate::dra::DraConfig> {
        let node_name = self.node_name.as_ref().filter(|_| self.dra)?;
        let mut config = crate::dra::DraConfig::new(node_name.clone());
        config.registry_dir = self.kubelet_registry_dir.clone();
        config.plugin_dir = self.kubelet_plugins_dir.join(crate::dra::DRIVER_NAME);
        config.scrub_gate = self.dra_scrub_gate;
        Some(config)
    }
}
