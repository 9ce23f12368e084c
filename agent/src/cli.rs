//! The command line of `vfplane-agent`, in the library so that the flags
//! the Helm chart passes can be checked against the real parser.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The environment variable holding the log filter (a tracing `EnvFilter`
/// directive such as `info` or `vfplane_host=debug`).
pub const LOG_ENV: &str = "VFPLANE_LOG";

/// The vfplane node agent.
#[derive(Debug, Parser)]
#[command(name = "vfplane-agent", version, about)]
pub struct Cli {
    /// Where the host's sysfs is mounted.
    #[arg(long, global = true, default_value = "/sys", env = "VFPLANE_SYSFS_ROOT")]
    pub sysfs_root: PathBuf,
    /// Where the host's device nodes are (for /dev/vfio).
    #[arg(long, global = true, default_value = "/dev", env = "VFPLANE_DEV_ROOT")]
    pub dev_root: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the node's SR-IOV PFs, VFs, drivers and IOMMU groups.
    Discover {
        /// Print the stable JSON form (documented in docs/agent.md), one line.
        #[arg(long)]
        json: bool,
        /// With --json: indent it for people.
        #[arg(long, requires = "json")]
        pretty: bool,
    },
    /// Reconcile the node to a state file once; exit 0 only when it matches.
    Apply {
        /// The desired state: a NodeState document (YAML).
        #[arg(long)]
        state_file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Reconcile continuously: on desired state changes, device changes, and a timer.
    Run {
        /// The desired state: a NodeState document (YAML).
        #[arg(long, required_unless_present = "kube", conflicts_with = "kube")]
        state_file: Option<PathBuf>,
        /// Take the desired state from the cluster's NodeState named after
        /// the node (--node-name or NODE_NAME), and write its status there.
        #[arg(long)]
        kube: bool,
        #[command(flatten)]
        target: Target,
        /// Seconds between passes when nothing changes.
        #[arg(long, default_value_t = 30)]
        resync_seconds: u64,
        /// The kubelet's pod-resources socket: who holds each VF goes into
        /// the status (`owner`). Empty: owners are not reported.
        #[arg(long, default_value = vfplane_proto::POD_RESOURCES_SOCKET)]
        pod_resources_socket: PathBuf,
        /// Where the device plugin's OCI hook records the containers given
        /// VFs (pod UID, cgroup); read to complete each owner.
        #[arg(long, default_value = vfplane_proto::container_record::DEFAULT_RECORDS_DIR)]
        container_records: PathBuf,
        /// The node's cgroup v2 mount, where owners' limits are read.
        #[arg(long, default_value = "/sys/fs/cgroup")]
        cgroup_root: PathBuf,
        /// Serve Prometheus metrics (`/metrics`, `/healthz`) on this address
        /// (for example 0.0.0.0:9466). Absent: no metrics.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// Write the node's status here (JSON).
    #[arg(long)]
    pub status_file: Option<PathBuf>,
    /// Write the device plugin's pool config here (YAML).
    #[arg(long)]
    pub pool_config: Option<PathBuf>,
    /// Node name, for derived MACs (and with --kube, the NodeState's name).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where per-VF files for the device plugin go (the VFs' MACs).
    #[arg(long, default_value = vfplane_proto::vf_state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Where the host's /proc is (to see which VFs are in use).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
}
