//! `vfplane-agent`: the node agent binary. Thin: arguments in, library out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VFPLANE_LOG").unwrap_or_else(|_| "warn".into()),
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
    }
}
