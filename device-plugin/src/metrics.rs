//! Prometheus metrics in the text exposition format, served by a tiny
//! HTTP/1.1 server on tokio (`GET /metrics`, `GET /healthz`).
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
//! | `vfplane_device_plugin_scans_total` | counter | |
//! | `vfplane_device_plugin_scan_seconds_total` | counter | (time spent probing health) |
//! | `vfplane_device_plugin_discoveries_total` | counter | |
//! | `vfplane_device_plugin_discovery_seconds_total` | counter | (time spent in discoveries) |

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders every metric.
pub fn render(node: &NodeMetrics, pools: &[PoolSample<'_>]) -> String {
    let mut out = String::new();
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "vfplane_device_plugin_devices",
        "gauge",
        "Devices advertised per pool, by health.",
    );
    for sample in pools {
        let (healthy, unhealthy) = sample.view.as_ref().map_or((0, 0), |v| v.counts());
        let pool = escape(sample.pool);
        let _ = writeln!(
            out,
            "vfplane_device_plugin_devices{{pool=\"{pool}\",health=\"healthy\"}} {healthy}"
        );
        let _ = writeln!(
            out,
            "vfplane_device_plugin_devices{{pool=\"{pool}\",health=\"unhealthy\"}} {unhealthy}"
        );
    }
    family(
        &mut out,
        "vfplane_device_plugin_unhealthy_devices_by_reason",
        "gauge",
        "Unhealthy devices per pool, by reason (a device may have several).",
    );
    for sample in pools {
        let mut by_reason: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        if let Some(view) = &sample.view {
            for device in &view.devices {
                for reason in &device.health.reasons {
                    *by_reason.entry(reason.label()).or_default() += 1;
                }
            }
        }
        for (reason, count) in by_reason {
            let _ = writeln!(
                out,
                "vfplane_device_plugin_unhealthy_devices_by_reason{{pool=\"{}\",reason=\"{reason}\"}} {count}",
                escape(sample.pool)
            );
        }
    }
    let per_pool: [PoolFamily; 8] = [
        (
            "vfplane_device_plugin_allocations_total",
            "counter",
            "Successful Allocate calls.",
            |m| load(&m.allocations),
        ),
        (
            "vfplane_device_plugin_allocated_devices_total",
            "counter",
            "Devices handed out by Allocate.",
            |m| load(&m.allocated_devices),
        ),
        (
            "vfplane_device_plugin_allocation_errors_total",
            "counter",
            "Allocate calls refused.",
            |m| load(&m.allocation_errors),
        ),
        (
            "vfplane_device_plugin_preferred_allocations_total",
            "counter",
            "GetPreferredAllocation calls.",
            |m| load(&m.preferred_allocations),
        ),
        (
            "vfplane_device_plugin_registrations_total",
            "counter",
            "Registrations the kubelet accepted.",
            |m| load(&m.registrations),
        ),
        (
            "vfplane_device_plugin_registration_errors_total",
            "counter",
            "Registration attempts that failed.",
            |m| load(&m.registration_errors),
        ),
        (
            "vfplane_device_plugin_list_and_watch_streams",
            "gauge",
            "Open ListAndWatch streams.",
            |m| m.streams.load(Ordering::Relaxed),
        ),
        (
            "vfplane_device_plugin_list_and_watch_updates_total",
            "counter",
            "ListAndWatch messages sent.",
            |m| load(&m.updates_sent),
        ),
    ];
    for (name, kind, help, get) in per_pool {
        family(&mut out, name, kind, help);
        for sample in pools {
            let _ = writeln!(
                out,
                "{name}{{pool=\"{}\"}} {}",
                escape(sample.pool),
                get(sample.metrics)
            );
        }
    }
    family(
        &mut out,
        "vfplane_device_plugin_config_reloads_total",
        "counter",
        "Pool config reloads, by result.",
    );
    let _ = writeln!(
        out,
        "vfplane_device_plugin_config_reloads_total{{result=\"ok\"}} {}",
        load(&node.config_reloads_ok)
    );
    let _ = writeln!(
        out,
        "vfplane_device_plugin_config_reloads_total{{result=\"error\"}} {}",
        load(&node.config_reloads_error)
    );
    family(
        &mut out,
        "vfplane_device_plugin_scans_total",
        "counter",
        "Health scans.",
    );
    let _ = writeln!(out, "vfplane_device_plugin_scans_total {}", load(&node.scans));
    family(
        &mut out,
        "vfplane_device_plugin_scan_seconds_total",
        "counter",
        "Time spent in health scans.",
    );
    let _ = writeln!(
        out,
        "vfplane_device_plugin_scan_seconds_total {:.6}",
        node.scan_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    family(
        &mut out,
        "vfplane_device_plugin_discoveries_total",
        "counter",
        "Full sysfs discoveries.",
    );
    let _ = writeln!(
        out,
        "vfplane_device_plugin_discoveries_total {}",
        load(&node.discoveries)
    );
    family(
        &mut out,
        "vfplane_device_plugin_discovery_seconds_total",
        "counter",
        "Time spent in full sysfs discoveries.",
    );
    let _ = writeln!(
        out,
        "vfplane_device_plugin_discovery_seconds_total {:.6}",
        node.discovery_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    out
}

/// A per-pool metric: name, type, help, and how to read it.
type PoolFamily = (&'static str, &'static str, &'static str, fn(&PoolMetrics) -> i64);

fn load(counter: &AtomicU64) -> i64 {
    i64::try_from(counter.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
}

/// Serves `GET /metrics` (from `render`) and `GET /healthz` until the task
/// is dropped. One request per connection; requests larger than 8 KiB or
/// slower than 5 s are dropped.
pub async fn serve<F>(listener: TcpListener, render: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            if let Err(error) = handle(stream, render.as_ref()).await {
                tracing::debug!(%peer, %error, "metrics: request failed");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            buffer.extend_from_slice(&chunk[..n]);
            if buffer.windows(4).any(|w| w == b"\r\n\r\n") || buffer.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if buffer.len() > 8192 {
                return Ok(false);
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), read_head).await {
        Ok(Ok(true)) => {}
        _ => return Ok(()),
    }
    let head = String::from_utf8_lossy(&buffer);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or_default()) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render()),
        ("GET", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
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
            "# TYPE vfplane_device_plugin_allocations_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
