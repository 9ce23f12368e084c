//! `vfplane-agent`: the node agent binary. Thin: arguments in, library out.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use vfplane_agent::attribution::PodResources;
use vfplane_agent::cli::{Cli, Command, Target};
use vfplane_agent::container::ContainerView;
use vfplane_agent::kube_source::KubeSource;
use vfplane_agent::metrics::AgentMetrics;
use vfplane_agent::netlink::RtNetlink;
use vfplane_agent::reconcile::Reconciler;
use vfplane_agent::run::{RunOptions, StateFileSource, publish, read_state_file};
use vfplane_agent::scrub::Scrubber;
use vfplane_host::Host;

fn reconciler(target: &Target, host: Host) -> Reconciler<RtNetlink> {
    let node = target.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    Reconciler::new(host, RtNetlink, node, &target.proc_root).with_handed_out_marks(&target.state_dir)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(vfplane_agent::cli::LOG_ENV)
                .unwrap_or_else(|_| "info".into()),
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
            let spec = read_state_file(&state_file)?;
            let started = std::time::Instant::now();
            let report = reconciler(&target, host).apply(&spec);
            publish(
                &report,
                target.status_file.as_deref(),
                target.pool_config.as_deref(),
                Some(&target.state_dir),
            )?;
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
            pod_resources_socket,
            container_records,
            cgroup_root,
            metrics_addr,
        } => {
            // The one runtime of the process: the API tasks, the metrics
            // server and the pod-resources calls. The reconcile loop runs
            // on this thread, outside it, and blocks on it where it must.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("vfplane-agent-io")
                .enable_all()
                .build()
                .context("cannot start the agent's runtime")?;
            let handle = runtime.handle().clone();
            let metrics = match metrics_addr {
                Some(addr) => {
                    let metrics = std::sync::Arc::new(AgentMetrics::default());
                    vfplane_agent::metrics::spawn_server(addr, std::sync::Arc::clone(&metrics), &handle)?;
                    Some(metrics)
                }
                None => None,
            };
            let pod_resources = (!pod_resources_socket.as_os_str().is_empty())
                .then(|| std::sync::Arc::new(PodResources::new(pod_resources_socket, handle.clone())));
            let options = RunOptions {
                status_file: target.status_file.clone(),
                pool_config: target.pool_config.clone(),
                state_dir: Some(target.state_dir.clone()),
                resync: Duration::from_secs(resync_seconds.max(1)),
                pod_resources,
                scrubber: Some(std::sync::Arc::new(Scrubber::new(&target.state_dir))),
                containers: Some(ContainerView {
                    records_dir: container_records,
                    cgroup_root,
                    proc_root: target.proc_root.clone(),
                    host: host.clone(),
                    state_dir: Some(target.state_dir.clone()),
                }),
                metrics,
            };
            let reconciler = reconciler(&target, host);
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
                    let mut source = KubeSource::connect(node, handle)?;
                    vfplane_agent::run::run(&reconciler, &mut source, &options)
                }
            }
        }
    }
}
