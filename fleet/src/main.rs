//! `vfplane-fleet`: simulated SR-IOV nodes (the real agent's API path and
//! reconciler on fake sysfs trees), many in one process, for the scale
//! bench. Thin: arguments in, [`vfplane_fleet`] out.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use vfplane_fleet::{NodeShape, register, spawn_agent};

/// Simulated SR-IOV nodes for the scale bench.
#[derive(Debug, Parser)]
#[command(name = "vfplane-fleet")]
struct Cli {
    /// How many nodes.
    #[arg(long)]
    nodes: usize,
    /// Registers the Node objects (needs create/patch on nodes).
    #[arg(long)]
    admin_kubeconfig: PathBuf,
    /// The agents' credentials (the chart's agent RBAC).
    #[arg(long)]
    agent_kubeconfig: PathBuf,
    /// Where the nodes' sysfs trees go (a tmpfs).
    #[arg(long)]
    dir: PathBuf,
    /// Seconds between an agent's passes when nothing changes.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Threads of the runtime all agents' API tasks share.
    #[arg(long, default_value_t = 2)]
    io_threads: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VFPLANE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vfplane-fleet: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn client(kubeconfig: &Kubeconfig) -> anyhow::Result<Client> {
    let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.io_threads.max(1))
        .thread_name("vfplane-fleet-io")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let read = |path: &PathBuf| {
        Kubeconfig::read_from(path).with_context(|| format!("reading the kubeconfig {}", path.display()))
    };
    let (admin, agents) = (read(&cli.admin_kubeconfig)?, read(&cli.agent_kubeconfig)?);
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let shapes: Vec<NodeShape> = (0..cli.nodes).map(NodeShape::of).collect();

    let begun = Instant::now();
    runtime.block_on(async {
        let admin = client(&admin).await.context("the admin client")?;
        futures::stream::iter(&shapes)
            .map(|shape| register(admin.clone(), shape))
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        anyhow::Ok(())
    })?;
    println!(
        "fleet: {} Node objects registered ({:.1} s)",
        shapes.len(),
        begun.elapsed().as_secs_f64()
    );

    let begun = Instant::now();
    let resync = Duration::from_secs(cli.resync_seconds.max(1));
    let mut threads = Vec::with_capacity(shapes.len());
    for shape in &shapes {
        // Each agent its own client: its own connections, as on a fleet.
        let client = runtime
            .block_on(client(&agents))
            .with_context(|| format!("the client of {}", shape.name))?;
        threads.push(spawn_agent(shape, &cli.dir, client, runtime.handle(), resync)?);
    }
    println!(
        "fleet: {} agents running ({:.1} s)",
        threads.len(),
        begun.elapsed().as_secs_f64()
    );
    for thread in threads {
        // An agent's loop does not return; a panic ends the fleet.
        if thread.join().is_err() {
            anyhow::bail!("an agent thread panicked");
        }
    }
    Ok(())
}
