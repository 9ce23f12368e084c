//! `vfplane-controller run`: the cluster controller, its admission webhook,
//! metrics and health probes. The webhook and the probes serve on every
//! replica; the controllers run only on the replica holding the Lease.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{error, info};
use vfplane_controller::cli::{Cli, Command, PodWebhookMode, RunArgs};
use vfplane_controller::controller;
use vfplane_controller::leader::{self, LeaseConfig};
use vfplane_controller::metrics::{self, Metrics};
use vfplane_controller::webhook::{self, PodMode, TlsFiles};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(vfplane_controller::cli::LOG_ENV)
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Run(args) = Cli::parse().command;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("vfplane-controller: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vfplane-controller: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let config = kube::Config::infer().await.context(
        "no Kubernetes credentials: neither the in-cluster service account nor a kubeconfig (KUBECONFIG or ~/.kube/config) was found",
    )?;
    let client = Client::try_from(config.clone()).context("building the API client")?;
    // Evictions without kube's default retry of 429: a budget's refusal is
    // a verdict the rollout waits on, not a transient failure to retry for
    // minutes inside one request.
    let mut no_retry = config;
    no_retry.default_retry = false;
    let evictions = Client::try_from(no_retry).context("building the eviction client")?;
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    let on_signal = Arc::clone(&stop_tx);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = on_signal.send(true);
    });

    let probes = tokio::spawn(metrics::serve(args.metrics_addr, Arc::clone(&metrics), stopped()));

    // One watch per kind, on every replica: the webhook's view reads their
    // stores, and the controllers subscribe to them if this replica leads.
    let watches = controller::ClusterWatches::spawn(&client);
    let view = watches.view();
    {
        let (watches, metrics) = (watches.clone(), Arc::clone(&metrics));
        tokio::spawn(async move {
            if watches.listed().await {
                metrics.set_ready(true);
                info!("caches filled; ready");
            }
        });
    }
    let webhook = match (args.webhook_addr, args.tls_cert, args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            let mode = match args.pod_webhook_mode {
                PodWebhookMode::Validate => PodMode::Validate,
                PodWebhookMode::Mutate => PodMode::Mutate,
            };
            Some(tokio::spawn(webhook::serve(
                addr,
                TlsFiles { cert, key },
                Arc::new(view),
                mode,
                args.pod_webhook_reads_claims.then(|| client.clone()),
                stopped(),
            )))
        }
        _ => None,
    };

    let identity = args
        .identity
        .unwrap_or_else(|| format!("vfplane-controller-{}", std::process::id()));
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), &args.namespace);
    let lease = LeaseConfig::new(args.lease_name, identity);
    let outcome: Result<()> = if args.no_leader_election {
        metrics.set_leader(true);
        controller::run_with(watches, client, evictions, Arc::clone(&metrics), stopped()).await;
        Ok(())
    } else {
        tokio::select! {
            () = leader::acquire(&lease_api, &lease) => {
                metrics.set_leader(true);
                tokio::select! {
                    () = controller::run_with(watches, client, evictions, Arc::clone(&metrics), stopped()) => Ok(()),
                    lost = leader::keep(&lease_api, &lease) => Err(anyhow::Error::new(lost)),
                }
            }
            () = stopped() => Ok(()),
        }
    };
    metrics.set_leader(false);
    if !args.no_leader_election {
        leader::release(&lease_api, &lease).await;
    }
    if let Err(error) = &outcome {
        error!(%error, "stopping: another replica may lead now");
    }
    // Leadership lost or the controllers ended: stop serving too, so the
    // pod restarts and stands as a candidate again.
    let _ = stop_tx.send(true);
    if let Some(webhook) = webhook {
        match webhook.await {
            Ok(Err(error)) => error!(%error, "webhook stopped"),
            Err(error) => error!(%error, "webhook task failed"),
            Ok(Ok(())) => {}
        }
    }
    let _ = probes.await;
    outcome
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
