//! Prometheus metrics, encoded by prometheus-client and served by axum
//! (`GET /metrics` in the OpenMetrics text format, `GET /healthz`): the
//! controller's and the agent's stack.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `vfplane_device_plugin_devices` | gauge | `pool`, `health` (`healthy`/`unhealthy`) |
//! | `vfplane_device_plugin_unhealthy_devices_by_reason` | gauge | `pool`, `reason` |
//! | `vfplane_device_plugin_allocations_total` | counter | `pool` (successful Allocate calls) |
//! | `vfplane_device_plugin_allocated_devices_total` | counter | `pool` |
//! | `vfplane_device_plugin_allocation_errors_total` | counter | `pool` (refused Allocate calls) |
//! | `vfplane_device_plugin_preferred_allocations_total` | counter | `pool` |
//! | `vfplane_device_plugin_registrations_total` | counter | `pool` (accepted by the kubelet) |
//! | `vfplane_device_plugin_registration_errors_total` | counter | `pool` |
//! | `vfplane_device_plugin_list_and_watch_streams` | gauge | `pool` (open streams) |
//! | `vfplane_device_plugin_list_and_watch_updates_total` | counter | `pool` (messages sent) |
//! | `vfplane_device_plugin_config_reloads_total` | counter | `result` (`ok`/`error`) |
//! | `vfplane_device_plugin_dra_prepares_total` | counter | `result` (`ok`/`error`: DRA claims prepared or refused) |
//! | `vfplane_device_plugin_dra_unprepares_total` | counter | `result` |
//! | `vfplane_device_plugin_dra_slice_writes_total` | counter | `result` (writes of the node's ResourceSlices) |
//! | `vfplane_device_plugin_scans_total` | counter | |
//! | `vfplane_device_plugin_scan_seconds_total` | counter | (time spent probing health) |
//! | `vfplane_device_plugin_discoveries_total` | counter | |
//! | `vfplane_device_plugin_discovery_seconds_total` | counter | (time spent in discoveries) |
//!
//! The counters live in atomics beside the code that counts (the gRPC
//! handlers, the scanner); a scrape takes a [`Snapshot`] of them and of the
//! pools' last scans, which a prometheus-client collector encodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::inventory::PoolView;

/// Node-wide counters.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Config reloads that took.
    pub config_reloads_ok: AtomicU64,
    /// Config reloads refused (bad file).
    pub config_reloads_error: AtomicU64,
    /// Health scans.
    pub scans: AtomicU64,
    /// Microseconds spent in health scans.
    pub scan_micros: AtomicU64,
    /// Full discoveries.
    pub discoveries: AtomicU64,
    /// Microseconds spent in full discoveries.
    pub discovery_micros: AtomicU64,
    /// DRA claims prepared.
    pub dra_prepares_ok: AtomicU64,
    /// DRA claims whose prepare was refused.
    pub dra_prepares_error: AtomicU64,
    /// DRA claims unprepared.
    pub dra_unprepares_ok: AtomicU64,
    /// DRA claims whose unprepare failed.
    pub dra_unprepares_error: AtomicU64,
    /// ResourceSlice writes (each a new pool generation).
    pub dra_slice_writes_ok: AtomicU64,
    /// ResourceSlice writes that failed.
    pub dra_slice_writes_error: AtomicU64,
}

/// Per-pool counters.
#[derive(Debug, Default)]
pub struct PoolMetrics {
    /// Successful Allocate calls.
    pub allocations: AtomicU64,
    /// Devices handed out by them.
    pub allocated_devices: AtomicU64,
    /// Refused Allocate calls.
    pub allocation_errors: AtomicU64,
    /// GetPreferredAllocation calls.
    pub preferred_allocations: AtomicU64,
    /// Registrations the kubelet accepted.
    pub registrations: AtomicU64,
    /// Registrations that failed.
    pub registration_errors: AtomicU64,
    /// Open ListAndWatch streams.
    pub streams: AtomicI64,
    /// ListAndWatch messages sent.
    pub updates_sent: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One pool's figures at scrape time.
#[derive(Debug)]
pub struct PoolSample<'a> {
    /// Pool name.
    pub pool: &'a str,
    /// Its counters.
    pub metrics: &'a PoolMetrics,
    /// Its devices as last scanned.
    pub view: Option<Arc<PoolView>>,
}

/// One pool's figures at one scrape.
#[derive(Debug, Default)]
struct PoolFigures {
    pool: String,
    healthy: u64,
    unhealthy: u64,
    by_reason: BTreeMap<&'static str, u64>,
    counters: [u64; 7],
    streams: i64,
}

/// Every figure at one scrape, encoded by [`Collector::encode`].
#[derive(Debug, Default)]
pub struct Snapshot {
    pools: Vec<PoolFigures>,
    reloads_ok: u64,
    reloads_error: u64,
    scans: u64,
    scan_seconds: f64,
    discoveries: u64,
    discovery_seconds: f64,
    /// (prepares, unprepares, slice writes), each (ok, error).
    dra: [(u64, u64); 3],
}

/// A per-pool counter: name (without `_total`), help, and where it is.
type PoolCounter = (&'static str, &'static str, fn(&PoolMetrics) -> &AtomicU64);

/// The per-pool counters; their values sit in [`PoolFigures::counters`] in
/// this order.
const POOL_COUNTERS: [PoolCounter; 7] = [
    ("allocations", "Successful Allocate calls.", |m| &m.allocations),
    ("allocated_devices", "Devices handed out by Allocate.", |m| {
        &m.allocated_devices
    }),
    ("allocation_errors", "Allocate calls refused.", |m| {
        &m.allocation_errors
    }),
    ("preferred_allocations", "GetPreferredAllocation calls.", |m| {
        &m.preferred_allocations
    }),
    ("registrations", "Registrations the kubelet accepted.", |m| {
        &m.registrations
    }),
    ("registration_errors", "Registration attempts that failed.", |m| {
        &m.registration_errors
    }),
    ("list_and_watch_updates", "ListAndWatch messages sent.", |m| {
        &m.updates_sent
    }),
];

impl Snapshot {
    /// The figures of `node` and `pools` now.
    pub fn take(node: &NodeMetrics, pools: &[PoolSample<'_>]) -> Self {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let pools = pools
            .iter()
            .map(|sample| {
                let (healthy, unhealthy) = sample.view.as_ref().map_or((0, 0), |v| v.counts());
                let mut by_reason = BTreeMap::new();
                for device in sample.view.iter().flat_map(|v| v.devices.iter()) {
                    for reason in &device.health.reasons {
                        *by_reason.entry(reason.label()).or_default() += 1;
                    }
                }
                PoolFigures {
                    pool: sample.pool.to_owned(),
                    healthy: healthy as u64,
                    unhealthy: unhealthy as u64,
                    by_reason,
                    counters: POOL_COUNTERS.map(|(_, _, get)| load(get(sample.metrics))),
                    streams: sample.metrics.streams.load(Ordering::Relaxed),
                }
            })
            .collect();
        Self {
            pools,
            reloads_ok: load(&node.config_reloads_ok),
            reloads_error: load(&node.config_reloads_error),
            scans: load(&node.scans),
            scan_seconds: load(&node.scan_micros) as f64 / 1e6,
            discoveries: load(&node.discoveries),
            discovery_seconds: load(&node.discovery_micros) as f64 / 1e6,
            dra: [
                (load(&node.dra_prepares_ok), load(&node.dra_prepares_error)),
                (load(&node.dra_unprepares_ok), load(&node.dra_unprepares_error)),
                (
                    load(&node.dra_slice_writes_ok),
                    load(&node.dra_slice_writes_error),
                ),
            ],
        }
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "devices",
            "Devices advertised per pool, by health.",
            None,
            MetricType::Gauge,
        )?;
        for p in &self.pools {
            for (health, count) in [("healthy", p.healthy), ("unhealthy", p.unhealthy)] {
                let labels = [("pool", p.pool.as_str()), ("health", health)];
                ConstGauge::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "unhealthy_devices_by_reason",
            "Unhealthy devices per pool, by reason (a device may have several).",
            None,
            MetricType::Gauge,
        )?;
        for p in &self.pools {
            for (reason, count) in &p.by_reason {
                let labels = [("pool", p.pool.as_str()), ("reason", reason)];
                ConstGauge::new(*count).encode(family.encode_family(&labels)?)?;
            }
        }
        for (i, (name, help, _)) in POOL_COUNTERS.iter().enumerate() {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.pools {
                let labels = [("pool", p.pool.as_str())];
                ConstCounter::new(p.counters[i]).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "list_and_watch_streams",
            "Open ListAndWatch streams.",
            None,
            MetricType::Gauge,
        )?;
        for p in &self.pools {
            let labels = [("pool", p.pool.as_str())];
            ConstGauge::new(p.streams).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "config_reloads",
            "Pool config reloads, by result.",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [("ok", self.reloads_ok), ("error", self.reloads_error)] {
            ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
        }
        for ((name, help), (ok, error)) in [
            ("dra_prepares", "DRA claims prepared, by result."),
            ("dra_unprepares", "DRA claims unprepared, by result."),
            (
                "dra_slice_writes",
                "Writes of the node's ResourceSlices, by result.",
            ),
        ]
        .into_iter()
        .zip(self.dra)
        {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (result, count) in [("ok", ok), ("error", error)] {
                ConstCounter::new(count).encode(family.encode_family(&[("result", result)])?)?;
            }
        }
        ConstCounter::new(self.scans).encode(encoder.encode_descriptor(
            "scans",
            "Health scans.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.scan_seconds).encode(encoder.encode_descriptor(
            "scan_seconds",
            "Time spent in health scans.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.discoveries).encode(encoder.encode_descriptor(
            "discoveries",
            "Full sysfs discoveries.",
            None,
            MetricType::Counter,
        )?)?;
        ConstCounter::new(self.discovery_seconds).encode(encoder.encode_descriptor(
            "discovery_seconds",
            "Time spent in full sysfs discoveries.",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

/// Renders every metric in the OpenMetrics text format.
pub fn render(node: &NodeMetrics, pools: &[PoolSample<'_>]) -> String {
    let mut registry = Registry::with_prefix("vfplane_device_plugin");
    registry.register_collector(Box::new(Snapshot::take(node, pools)));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Serves `GET /metrics` (from `render`) and `GET /healthz` on `listener`
/// until the task is dropped; a server that fails is logged.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let router = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = Arc::clone(&render);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        render(),
                    )
                        .into_response()
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(error) = axum::serve(listener, router).await {
        tracing::error!(%error, "the metrics server stopped");
    }
}

/// Binds the metrics listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_pool_labels() {
        let node = NodeMetrics::default();
        bump(&node.config_reloads_error);
        bump(&node.dra_prepares_ok);
        bump(&node.dra_slice_writes_error);
        let pool = PoolMetrics::default();
        bump(&pool.allocations);
        pool.streams.fetch_add(2, Ordering::Relaxed);
        let text = render(
            &node,
            &[PoolSample {
                pool: "fast",
                metrics: &pool,
                view: Some(Arc::new(PoolView::default())),
            }],
        );
        for line in [
            "vfplane_device_plugin_devices{pool=\"fast\",health=\"healthy\"} 0",
            "vfplane_device_plugin_allocations_total{pool=\"fast\"} 1",
            "vfplane_device_plugin_list_and_watch_streams{pool=\"fast\"} 2",
            "vfplane_device_plugin_registrations_total{pool=\"fast\"} 0",
            "vfplane_device_plugin_config_reloads_total{result=\"error\"} 1",
            "vfplane_device_plugin_scan_seconds_total 0.0",
            "vfplane_device_plugin_dra_prepares_total{result=\"ok\"} 1",
            "vfplane_device_plugin_dra_unprepares_total{result=\"error\"} 0",
            "vfplane_device_plugin_dra_slice_writes_total{result=\"error\"} 1",
            "# TYPE vfplane_device_plugin_allocations counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
