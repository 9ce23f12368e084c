//! `vfplane-fleet`: simulated SR-IOV nodes (the real agent's API path and
//! reconciler on fake sysfs trees), many in one process, and the scale
//! bench's measurements over them. Thin: arguments in, [`vfplane_fleet`]
//! out. `cargo xtask bench scale` starts it; it is not run by hand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use vfplane_fleet::bench::{BenchSetup, Measured};
use vfplane_fleet::{NodeShape, register, spawn_agent};

/// Simulated SR-IOV nodes and the scale bench's phases.
#[derive(Debug, Parser)]
#[command(name = "vfplane-fleet")]
struct Cli {
    /// How many nodes.
    #[arg(long)]
    nodes: usize,
    /// The bench's own credentials: registers the Node objects, applies
    /// the VfPolicy, watches, reads the API server's metrics.
    #[arg(long)]
    admin_kubeconfig: PathBuf,
    /// The agents' credentials (the chart's agent RBAC).
    #[arg(long)]
    agent_kubeconfig: PathBuf,
    /// Where the nodes' sysfs trees go (a tmpfs).
    #[arg(long)]
    dir: PathBuf,
    /// Seconds between an agent's passes when nothing changes (the
    /// agent's default).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Threads of the runtime all agents' API tasks share.
    #[arg(long, default_value_t = 2)]
    io_threads: usize,
    /// A controller replica to measure: `<identity>=<pid>`.
    #[arg(long = "controller", value_parser = parse_replica)]
    controllers: Vec<Measured>,
    /// Another process to measure: `<name>=<pid>`.
    #[arg(long = "measure", value_parser = parse_replica)]
    others: Vec<Measured>,
    /// The controllers' Lease: `<namespace>/<name>`.
    #[arg(long, default_value = "vfplane-system/vfplane-controller")]
    lease: String,
    /// etcd's client address, for its metrics.
    #[arg(long, default_value = "127.0.0.1:2379")]
    etcd: String,
    /// Seconds of the idle phase.
    #[arg(long, default_value_t = 120)]
    idle_seconds: u64,
    /// Seconds a phase may take.
    #[arg(long, default_value_t = 900)]
    phase_timeout_seconds: u64,
    /// `maxUnavailableNodes` of the last phase's rollout over held VFs.
    #[arg(long, default_value_t = 50)]
    max_unavailable: u32,
}

fn parse_replica(text: &str) -> Result<Measured, String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected <identity>=<pid>"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{text:?}: {pid:?} is not a process ID"))?;
    Ok(Measured {
        name: name.to_owned(),
        pid,
    })
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
    let (namespace, lease) = cli
        .lease
        .split_once('/')
        .with_context(|| format!("--lease {:?}: expected <namespace>/<name>", cli.lease))?;
    // The agents' API tasks share one runtime; the bench has its own, so
    // that its clock is not behind thousands of agents' tasks.
    let agents_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.io_threads.max(1))
        .thread_name("fleet-agents-io")
        .enable_all()
        .build()
        .context("cannot start the agents' runtime")?;
    let bench_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("fleet-bench")
        .enable_all()
        .build()
        .context("cannot start the bench's runtime")?;
    let read = |path: &PathBuf| {
        Kubeconfig::read_from(path).with_context(|| format!("reading the kubeconfig {}", path.display()))
    };
    let (admin, agents) = (read(&cli.admin_kubeconfig)?, read(&cli.agent_kubeconfig)?);
    std::fs::create_dir_all(&cli.dir).with_context(|| format!("creating {}", cli.dir.display()))?;
    let shapes: Vec<NodeShape> = (0..cli.nodes).map(NodeShape::of).collect();

    let begun = Instant::now();
    let admin = bench_runtime.block_on(async {
        let admin = client(&admin).await.context("the bench's client")?;
        futures::stream::iter(&shapes)
            .map(|shape| register(admin.clone(), shape))
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        anyhow::Ok(admin)
    })?;
    eprintln!(
        "fleet: {} Node objects registered ({:.1} s)",
        shapes.len(),
        begun.elapsed().as_secs_f64()
    );

    let begun = Instant::now();
    let resync = Duration::from_secs(cli.resync_seconds.max(1));
    let mut kubelets = Vec::with_capacity(shapes.len());
    for shape in &shapes {
        // Each agent its own client: its own connections, as on a fleet.
        let client = agents_runtime
            .block_on(client(&agents))
            .with_context(|| format!("the client of {}", shape.name))?;
        // The thread runs until the process ends.
        let node = spawn_agent(shape, &cli.dir, client, agents_runtime.handle(), resync)?;
        kubelets.push((node.kubelet, node.host));
    }
    eprintln!(
        "fleet: {} agents running ({:.1} s)",
        shapes.len(),
        begun.elapsed().as_secs_f64()
    );

    let setup = BenchSetup {
        nodes: cli.nodes,
        replicas: cli.controllers.clone(),
        lease: (namespace.to_owned(), lease.to_owned()),
        etcd: cli.etcd.clone(),
        idle: Duration::from_secs(cli.idle_seconds),
        phase_timeout: Duration::from_secs(cli.phase_timeout_seconds),
        fleet_pid: std::process::id(),
        others: cli.others.clone(),
        kubelets,
        max_unavailable: cli.max_unavailable,
    };
    let report = bench_runtime.block_on(vfplane_fleet::bench::run(admin, &setup))?;
    print!("{report}");
    Ok(())
}
