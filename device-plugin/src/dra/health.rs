//! `NodeWatchResources`: every VF's health, for the status of the pods
//! using it (`allocatedResourcesStatus`).
//!
//! The kubelet takes each message as the complete list and forgets a device
//! it has not heard of within the device's timeout (it then shows
//! `Unknown`), so the list goes out whenever a VF's health changes and at
//! least every [`RESEND`] otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vfplane_proto::dra::health_v1alpha1 as hp;

use super::{DraDevice, PoolRegistry, dra_devices};
use crate::server::NodeContext;

/// The longest time between two messages.
pub const RESEND: Duration = Duration::from_secs(10);
/// How long the kubelet may trust one message (three missed resends).
pub const TIMEOUT_SECONDS: i64 = 30;
// A missed resend does not make the kubelet forget a device.
const _: () = assert!(RESEND.as_secs() * 2 < TIMEOUT_SECONDS.unsigned_abs());

/// The kubelet truncates longer messages.
const MAX_MESSAGE: usize = 1024;

/// The health service.
#[derive(Debug, Clone)]
pub struct DraHealth {
    pub(crate) node_name: String,
    pub(crate) registry: PoolRegistry,
    pub(crate) node: Arc<NodeContext>,
}

/// The health entries of `devices` in pool `pool_name`, sorted by device
/// name, stamped `now` (Unix seconds).
pub fn health_list(
    pool_name: &str,
    devices: &BTreeMap<String, DraDevice>,
    now: i64,
) -> Vec<hp::DeviceHealth> {
    devices
        .values()
        .map(|device| {
            let healthy = device.status.health.is_healthy();
            let mut message = if healthy {
                String::new()
            } else {
                device.status.health.to_string()
            };
            if message.len() > MAX_MESSAGE {
                let mut end = MAX_MESSAGE - 3;
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                message.truncate(end);
                message.push_str("...");
            }
            hp::DeviceHealth {
                device: Some(hp::DeviceIdentifier {
                    pool_name: pool_name.to_owned(),
                    device_name: device.name.clone(),
                }),
                health: if healthy {
                    hp::HealthStatus::Healthy
                } else {
                    hp::HealthStatus::Unhealthy
                } as i32,
                last_updated_time: now,
                health_check_timeout_seconds: TIMEOUT_SECONDS,
                message,
            }
        })
        .collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The part of a list that, when it changes, is sent at once.
fn health_key(list: &[hp::DeviceHealth]) -> Vec<(String, i32, String)> {
    list.iter()
        .map(|d| {
            (
                d.device
                    .as_ref()
                    .map(|i| i.device_name.clone())
                    .unwrap_or_default(),
                d.health,
                d.message.clone(),
            )
        })
        .collect()
}

#[tonic::async_trait]
impl hp::dra_resource_health_server::DraResourceHealth for DraHealth {
    type NodeWatchResourcesStream = ReceiverStream<Result<hp::NodeWatchResourcesResponse, Status>>;

    async fn node_watch_resources(
        &self,
        _request: Request<hp::NodeWatchResourcesRequest>,
    ) -> Result<Response<Self::NodeWatchResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut scans = self.node.scans.subscribe();
        tracing::info!("the kubelet opened the DRA health stream");
        tokio::spawn(async move {
            let mut last_key = None;
            let mut resend = tokio::time::interval(RESEND);
            resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // The first tick is at once: the stream starts with the list.
                let due = tokio::select! {
                    _ = resend.tick() => true,
                    changed = scans.changed() => {
                        if changed.is_err() { return }
                        false
                    }
                    () = tx.closed() => return,
                };
                let devices = dra_devices(&this.registry);
                let list = health_list(&this.node_name, &devices, unix_now());
                let key = health_key(&list);
                if due || last_key.as_ref() != Some(&key) {
                    if last_key.as_ref() != Some(&key) {
                        tracing::debug!(devices = list.len(), "DRA health changed; sending");
                    }
                    let message = hp::NodeWatchResourcesResponse { devices: list };
                    if tx.send(Ok(message)).await.is_err() {
                        tracing::info!("the kubelet left the DRA health stream");
                        return;
                    }
                    last_key = Some(key);
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use crate::inventory::DeviceStatus;
    use vfplane_proto::vf_health::Unready;

    fn device(address: &str, reasons: Vec<Unready>) -> DraDevice {
        let address: vfplane_host::PciAddress = address.parse().unwrap();
        let pool: vfplane_proto::pool::Pool = serde_yaml::from_str("name: fast\nselector: {}\n").unwrap();
        DraDevice {
            name: super::super::device_name(address),
            pool: Arc::new(pool),
            status: DeviceStatus {
                address,
                facts: None,
                health: Health { reasons },
                vfio_node: None,
                mac: None,
            },
        }
    }

    #[test]
    fn every_vf_is_listed_with_its_health_and_why_and_a_timeout_past_the_resend() {
        let devices: BTreeMap<String, DraDevice> = [
            device("0000:00:12.0", vec![]),
            device("0000:00:12.2", vec![Unready::NotOnVfio(Some("igbvf".into()))]),
        ]
        .into_iter()
        .map(|d| (d.name.clone(), d))
        .collect();
        let list = health_list("node-a", &devices, 1_700_000_000);
        assert_eq!(list.len(), 2);
        let ids: Vec<_> = list
            .iter()
            .map(|d| {
                d.device
                    .as_ref()
                    .map(|i| (i.pool_name.as_str(), i.device_name.as_str()))
            })
            .collect();
        assert_eq!(
            ids,
            [Some(("node-a", "0000-00-12-0")), Some(("node-a", "0000-00-12-2"))]
        );
        assert_eq!(list[0].health, hp::HealthStatus::Healthy as i32);
        assert!(list[0].message.is_empty());
        assert_eq!(list[1].health, hp::HealthStatus::Unhealthy as i32);
        assert!(list[1].message.contains("igbvf"), "{}", list[1].message);
        assert!(list.iter().all(|d| d.last_updated_time == 1_700_000_000));
        assert!(
            list.iter()
                .all(|d| d.health_check_timeout_seconds == TIMEOUT_SECONDS)
        );
    }
}
