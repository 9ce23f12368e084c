//! `vfplane-device-plugin`: serves the pools of a pool config file to the
//! kubelet until SIGTERM or SIGINT, then stops gracefully (streams end,
//! connections drain, sockets removed).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use vfplane_device_plugin::PluginConfig;

/// Kubelet device plugin for vfplane VF pools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The pool config file (YAML; see the README). Watched: changes apply live.
    #[arg(long, env = "VFPLANE_POOL_CONFIG")]
    pool_config: PathBuf,
    /// The kubelet's device-plugin directory.
    #[arg(long, default_value = vfplane_proto::DEVICE_PLUGIN_PATH)]
    kubelet_dir: PathBuf,
    /// Where the host's sysfs is mounted.
    #[arg(long, default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Where the host's /dev is mounted.
    #[arg(long, default_value = "/dev")]
    dev_root: PathBuf,
    /// Where the CDI spec file is written.
    #[arg(long, default_value = "/var/run/cdi")]
    cdi_dir: PathBuf,
    /// Write no CDI spec and return no CDI device names.
    #[arg(long)]
    no_cdi: bool,
    /// The VF state directory the agent writes (scrub states, MACs).
    #[arg(long, default_value = vfplane_proto::vf_state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Serve Prometheus metrics on this address (for example 0.0.0.0:9465).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Health probe period in milliseconds.
    #[arg(long, default_value_t = 50)]
    rescan_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut config = PluginConfig::new(args.pool_config);
    config.kubelet_dir = args.kubelet_dir;
    config.sysfs_root = args.sysfs_root;
    config.dev_root = args.dev_root;
    config.cdi_dir = (!args.no_cdi).then_some(args.cdi_dir);
    config.state_dir = args.state_dir;
    config.metrics_addr = args.metrics_addr;
    config.rescan_interval = Duration::from_millis(args.rescan_interval_ms.max(1));

    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut plugin = vfplane_device_plugin::start(config)
        .await
        .map_err(|e| anyhow::anyhow!(vfplane_host::error_chain(&e)))?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT"),
        result = plugin.wait() => {
            return result.map_err(|e| anyhow::anyhow!(vfplane_host::error_chain(&e)));
        }
    }
    plugin
        .shutdown()
        .await
        .map_err(|e| anyhow::anyhow!(vfplane_host::error_chain(&e)))?;
    tracing::info!("stopped");
    Ok(())
}
