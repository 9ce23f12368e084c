//! `vfplane-agent`: the node agent binary. Thin: arguments in, library out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use vfplane_agent::kube_source::KubeSource;
use vfplane_agent::netlink::RtNetlink;
use vfplane_agent::reconcile::Reconciler;
use vfplane_agent::run::{RunOptions, StateFileSource, publish, read_state_file};
use vfplane_host::Host;

/// The vfplane node agent.
#[derive(Debug, Parser)]
#[command(name = "vfplane-agent", version, about)]
struct Cli {
    /// Where the host's sysfs is mounted.
    #[arg(long, global = true, default_value = "/sys", env = "VFPLANE_SYSFS_ROOT")]
    sysfs_root: PathBuf,
    /// Where the host's device nodes are (for /dev/vfio).
    #[arg(long, global = true, default_value = "/dev", env = "VFPLANE_DEV_ROOT")]
    dev_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the node's SR-IOV PFs, VFs, drivers and IOMMU groups.
    Discover {
        /// Print the stable JSON form (documented in the README), one line.
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
    },
}

#[derive(Debug, clap::Args)]
struct Target {
    /// Write the node's status here (JSON).
    #[arg(long)]
    status_file: Option<PathBuf>,
    /// Write the device plugin's pool config here (YAML).
    #[arg(long)]
    pool_config: Option<PathBuf>,
    /// Node name, for derived MACs (and with --kube, the NodeState's name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Where per-VF files for the device plugin go (the VFs' MACs).
    #[arg(long, default_value = vfplane_proto::vf_state::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where the host's /proc is (to see which VFs are in use).
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
}

impl Target {
    fn reconciler(&self, host: Host) -> Reconciler<RtNetlink> {
        let node = self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default()
        });
        Reconciler::new(host, RtNetlink, node, &self.proc_root)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VFPLANE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("vfplane-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let host = Host::new(cli.sysfs_root, cli.dev_root);
    match cli.command {
        Command::Discover { json, pretty } => {
            let model = host.discover().context("discovery failed")?;
            if json && pretty {
                println!("{}", serde_json::to_string_pretty(&model)?);
            } else if json {
                println!("{}", serde_json::to_string(&model)?);
            } else {
                print!("{}", vfplane_agent::discover::render_text(&model));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Apply { state_file, target } => {
            let spec = read_state_file(&state_file).map_err(anyhow::Error::msg)?;
            let started = std::time::Instant::now();
            let report = target.reconciler(host).apply(&spec);
            publish(
                &report,
                target.status_file.as_deref(),
                target.pool_config.as_deref(),
                Some(&target.state_dir),
            )
            .map_err(anyhow::Error::msg)?;
            for error in &report.errors {
                eprintln!("vfplane-agent: {error}");
            }
            if report.converged {
                eprintln!(
                    "vfplane-agent: the node matches the state file (apply took {} ms)",
                    started.elapsed().as_millis()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(2))
            }
        }
        Command::Run {
            state_file,
            kube,
            target,
            resync_seconds,
        } => {
            let options = RunOptions {
                status_file: target.status_file.clone(),
                pool_config: target.pool_config.clone(),
                state_dir: Some(target.state_dir.clone()),
                resync: Duration::from_secs(resync_seconds.max(1)),
            };
            let reconciler = target.reconciler(host);
            match state_file {
                Some(path) if !kube => {
                    vfplane_agent::run::run(&reconciler, &mut StateFileSource::new(path), &options)
                }
                _ => {
                    let node = target
                        .node_name
                        .clone()
                        .filter(|n| !n.is_empty())
                        .context("run --kube needs the node's name: --node-name or NODE_NAME (from the downward API's spec.nodeName)")?;
                    let mut source = KubeSource::connect(node)?;
                    vfplane_agent::run::run(&reconciler, &mut source, &options)
                }
            }
        }
    }
}
