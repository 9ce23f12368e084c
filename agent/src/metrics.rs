//! The agent's Prometheus metrics, served on `--metrics-addr` (`/metrics`,
//! `/healthz`) with prometheus-client and axum, the controller's stack.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `vfplane_agent_vf_info` | gauge (1) | `pf`, `vf`, `pool`, `health`, and the owner: `namespace`, `pod`, `container`, `pod_uid` (empty when nobody holds the VF) |
//! | `vfplane_agent_vf_container_problems` | gauge | `vf`, `pool`, `namespace`, `pod`, `container`: how many of the owner's limits break the pool's profile |
//! | `vfplane_agent_scrubs_total` | counter | `result` (`scrubbed`, `failed`, `vanished`) |
//! | `vfplane_agent_scrub_duration_seconds` | histogram | (scrubs that succeeded) |
//! | `vfplane_agent_passes_total` | counter | |
//! | `vfplane_agent_converged` | gauge | 1 when the last pass found the node as the spec wants it |
//!
//! `health` is one word: `healthy`, `unhealthy`, `quarantined` (a scrub
//! failed), `scrubbing`, `unmanaged`. The per-VF series follow the status
//! of every pass: a VF's series goes when the VF goes, and its owner
//! labels change with the owner (the series with the old owner goes).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vfplane_proto::node_state::NodeStateStatus;

use crate::scrub::ScrubOutcome;

/// Labels of `vf_info`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VfLabels {
    /// The PF's PCI address.
    pub pf: String,
    /// The VF's PCI address.
    pub vf: String,
    /// Its pool; empty for a VF in none.
    pub pool: String,
    /// One word; see the module doc.
    pub health: &'static str,
    /// The owner's namespace.
    pub namespace: String,
    /// The owner's pod.
    pub pod: String,
    /// The owner's container.
    pub container: String,
    /// The owner's pod UID.
    pub pod_uid: String,
}

/// Labels of `vf_container_problems`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OwnerLabels {
    /// The VF's PCI address.
    pub vf: String,
    /// Its pool.
    pub pool: String,
    /// The owner's namespace.
    pub namespace: String,
    /// The owner's pod.
    pub pod: String,
    /// The owner's container.
    pub container: String,
}

/// Labels of `scrubs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrubLabels {
    /// `scrubbed`, `failed` or `vanished`.
    pub result: &'static str,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    vf_info: Family<VfLabels, Gauge>,
    problems: Family<OwnerLabels, Gauge>,
    scrubs: Family<ScrubLabels, Counter>,
    scrub_seconds: Histogram,
    passes: Counter,
    converged: Gauge,
    /// The per-VF series of the last status, to remove those that go.
    shown: Mutex<(HashSet<VfLabels>, HashSet<OwnerLabels>)>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vfplane_agent");
        let vf_info = Family::<VfLabels, Gauge>::default();
        let problems = Family::<OwnerLabels, Gauge>::default();
        let scrubs = Family::<ScrubLabels, Counter>::default();
        // 10 ms to ~80 s.
        let scrub_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        let passes = Counter::default();
        let converged = Gauge::default();
        registry.register(
            "vf_info",
            "One series per VF of the node: its pool, health and owner",
            vf_info.clone(),
        );
        registry.register(
            "vf_container_problems",
            "Limits of the VF owner's container that break the pool's containerProfile",
            problems.clone(),
        );
        registry.register("scrubs", "Scrubs of released VFs, by result", scrubs.clone());
        registry.register(
            "scrub_duration_seconds",
            "Time a successful scrub took (reset, restore, check)",
            scrub_seconds.clone(),
        );
        registry.register("passes", "Reconcile passes run", passes.clone());
        registry.register(
            "converged",
            "1 when the last pass found the node as the spec wants it",
            converged.clone(),
        );
        Self {
            registry,
            vf_info,
            problems,
            scrubs,
            scrub_seconds,
            passes,
            converged,
            shown: Mutex::new((HashSet::new(), HashSet::new())),
        }
    }
}

impl AgentMetrics {
    /// Follows a pass's status: per-VF series, and whether it converged.
    pub fn observe_pass(&self, status: &NodeStateStatus, converged: bool) {
        self.passes.inc();
        self.converged.set(i64::from(converged));
        let mut vfs = HashSet::new();
        let mut owners = HashSet::new();
        for pf in &status.pfs {
            for vf in &pf.vfs {
                let (namespace, pod, container) = vf.owner_parts().unwrap_or_default();
                let (namespace, pod, container) =
                    (namespace.to_owned(), pod.to_owned(), container.to_owned());
                let pool = vf.pool.clone().unwrap_or_default();
                let labels = VfLabels {
                    pf: pf.pci_address.clone(),
                    vf: vf.pci_address.clone(),
                    pool: pool.clone(),
                    health: vf.health.label(),
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    container: container.clone(),
                    pod_uid: vf.owner_pod_uid.clone().unwrap_or_default(),
                };
                self.vf_info.get_or_create(&labels).set(1);
                vfs.insert(labels);
                if let Some(status) = &vf.container {
                    let labels = OwnerLabels {
                        vf: vf.pci_address.clone(),
                        pool,
                        namespace,
                        pod,
                        container,
                    };
                    let count = i64::try_from(status.problems.len()).unwrap_or(i64::MAX);
                    self.problems.get_or_create(&labels).set(count);
                    owners.insert(labels);
                }
            }
        }
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        for gone in shown.0.difference(&vfs) {
            self.vf_info.remove(gone);
        }
        for gone in shown.1.difference(&owners) {
            self.problems.remove(gone);
        }
        *shown = (vfs, owners);
    }

    /// Counts a scrub.
    pub fn observe_scrub(&self, outcome: &ScrubOutcome) {
        let result = match outcome {
            ScrubOutcome::Scrubbed { took, .. } => {
                self.scrub_seconds.observe(took.as_secs_f64());
                "scrubbed"
            }
            ScrubOutcome::Failed { .. } => "failed",
            ScrubOutcome::Vanished { .. } => "vanished",
        };
        self.scrubs.get_or_create(&ScrubLabels { result }).inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Serves `/metrics` and `/healthz` on `addr` as a task on `runtime` (a
/// multi-thread runtime; called from outside it), for the life of the
/// process. Returns once the address is bound.
///
/// # Errors
/// The address cannot be bound, named.
pub fn spawn_server(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    runtime: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot serve metrics on {addr}: {e}")))?;
    tracing::info!(%addr, "serving metrics");
    runtime.spawn(async move {
        if let Err(error) = axum::serve(listener, router(metrics)).await {
            tracing::error!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

/// The router, apart so tests can call it without a socket.
pub fn router(metrics: Arc<AgentMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics)
}

async fn metrics_text(State(metrics): State<Arc<AgentMetrics>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

#[cfg(test)]
mod tests;
