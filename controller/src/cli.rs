//! The command line of `vfplane-controller`, in the library so that the
//! flags the Helm chart passes can be checked against the real parser.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The environment variable holding the log filter (a tracing `EnvFilter`
/// directive such as `info` or `vfplane_host=debug`).
pub const LOG_ENV: &str = "VFPLANE_LOG";

/// The vfplane cluster controller.
#[derive(Debug, Parser)]
#[command(name = "vfplane-controller", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (and the webhook when --webhook-addr is given).
    Run(RunArgs),
}

/// The flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Metrics (/metrics) and probes (/healthz, /readyz).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Serve the admission webhook (HTTPS) here; off when absent.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub webhook_addr: Option<SocketAddr>,
    /// The webhook's certificate (PEM); re-read when it changes.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The webhook's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// The pod webhook: refuse pods missing limits, or add them.
    #[arg(long, value_enum, default_value_t = PodWebhookMode::Validate)]
    pub pod_webhook_mode: PodWebhookMode,
    /// The pod webhook reads the ResourceClaims and ResourceClaimTemplates
    /// a pod names, and checks containers that get vfplane's VFs through
    /// them (DRA) against their pool's profile. Needs `get` on both.
    #[arg(long)]
    pub pod_webhook_reads_claims: bool,
    /// The Lease for leader election, in POD_NAMESPACE.
    #[arg(long, default_value = "vfplane-controller")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Run the controllers without a Lease (one replica only).
    #[arg(long)]
    pub no_leader_election: bool,
}

/// What the pod webhook does with a pod missing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodWebhookMode {
    /// Refuse it, saying what to add.
    Validate,
    /// Add the limits.
    Mutate,
}
