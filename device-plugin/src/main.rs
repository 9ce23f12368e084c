//! `vfplane-device-plugin`: serves the pools of a pool config file to the
//! kubelet until SIGTERM or SIGINT, then stops gracefully (streams end,
//! connections drain, sockets removed).

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use vfplane_device_plugin::PluginConfig;
use vfplane_device_plugin::cli::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // VFPLANE_LOG like the other binaries (the chart sets it); RUST_LOG
    // still works when VFPLANE_LOG is not set.
    let filter = EnvFilter::try_from_env(vfplane_device_plugin::cli::LOG_ENV)
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let dra = args.dra_config();
    let mut config = PluginConfig::new(args.pool_config);
    config.dra = dra;
    config.kubelet_dir = args.kubelet_dir;
    config.sysfs_root = args.sysfs_root;
    config.dev_root = args.dev_root;
    config.cdi_dir = (!args.no_cdi).then_some(args.cdi_dir);
    config.oci_hook_dir = (!args.oci_hook_dir.as_os_str().is_empty()).then_some(args.oci_hook_dir);
    config.state_dir = args.state_dir;
    config.nri_socket = (!args.nri_socket.as_os_str().is_empty()).then_some(args.nri_socket);
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
