//! Leader election on a `coordination.k8s.io/v1` Lease, so two controller
//! replicas can run and only one writes.
//!
//! The protocol is the one client-go's leaderelection speaks, so the Lease
//! reads the same in `kubectl get lease`: a holder renews `renewTime` every
//! [`LeaseConfig::renew_every`]; a candidate takes the Lease when it is
//! missing, released (no holder) or not renewed for
//! `leaseDurationSeconds`. Every write carries the `resourceVersion` it
//! read, so two candidates racing for an expired Lease cannot both win: the
//! API server refuses the second with 409 Conflict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tracing::{info, warn};

/// Who we are and how the Lease is kept.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and a candidate retries).
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// Defaults as client-go's: 15 s lease, renewed every 5 s... here 2 s
    /// retry so a failover takes at most about 17 s.
    pub fn new(name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// Why leadership could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Renewal failed for longer than the lease lasts: another replica may
    /// lead now, so this one must stop writing.
    #[error("lost the lease {name}: not renewed for {elapsed:?}")]
    Lost {
        /// The Lease.
        name: String,
        /// Time since the last successful renewal.
        elapsed: Duration,
    },
}

/// One round of the protocol: take or renew the Lease. `Ok(true)` when
/// this replica holds it afterwards.
///
/// # Errors
/// API errors other than a lost race (409), which is `Ok(false)`.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let duration_secs = i32::try_from(config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let Some(current) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return lost_race_is_false(api.create(&PostParams::default(), &lease).await.map(|_| true));
    };
    let spec = current.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if !ours && holder_is_live(&spec, now) {
        return Ok(false);
    }
    let mut next = current.clone();
    let mut new_spec = spec.clone();
    new_spec.renew_time = Some(MicroTime(now));
    new_spec.lease_duration_seconds = Some(duration_secs);
    if !ours {
        info!(lease = %config.name, previous = ?spec.holder_identity, "taking over an expired lease");
        new_spec.holder_identity = Some(config.identity.clone());
        new_spec.acquire_time = Some(MicroTime(now));
        new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    next.spec = Some(new_spec);
    // `replace` sends the resourceVersion we read: a concurrent writer wins
    // and we get 409.
    lost_race_is_false(
        api.replace(&config.name, &PostParams::default(), &next)
            .await
            .map(|_| true),
    )
}

fn holder_is_live(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(holder) = spec.holder_identity.as_deref() else {
        return false;
    };
    if holder.is_empty() {
        return false;
    }
    let (Some(renewed), Some(secs)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds) else {
        return false;
    };
    renewed
        .0
        .saturating_add(SignedDuration::from_secs(i64::from(secs)))
        .is_ok_and(|until| until > now)
}

fn lost_race_is_false(result: Result<bool, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        other => other,
    }
}

/// Gives the Lease up (no holder) so another replica takes over at once.
/// Best effort: a failure only means the others wait for the expiry.
pub async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => info!(lease = %config.name, "lease released"),
        Err(error) => warn!(lease = %config.name, %error, "could not release the lease"),
    }
}

/// Waits until this replica holds the Lease. Calls `on_change(true)` when
/// it does.
pub async fn acquire(api: &Api<Lease>, config: &LeaseConfig) {
    let mut logged = false;
    loop {
        match try_acquire_or_renew(api, config, Timestamp::now()).await {
            Ok(true) => {
                info!(lease = %config.name, identity = %config.identity, "leading");
                return;
            }
            Ok(false) if !logged => {
                info!(lease = %config.name, "another replica leads; standing by");
                logged = true;
            }
            Ok(false) => {}
            Err(error) => warn!(lease = %config.name, %error, "lease check failed"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews the Lease for as long as this replica holds it; returns the
/// reason it stopped holding it.
///
/// Another replica may take the Lease `lease_duration` after the
/// `renewTime` of the last renewal, which is when that renewal started.
/// So every attempt is bounded by the time left until
/// `lease_duration - renew_every` after the last successful one started: a
/// renewal the API server holds back (a queue of API priority and
/// fairness, a stalled connection) ends the lead in time instead of
/// leaving two replicas writing.
pub async fn keep(api: &Api<Lease>, config: &LeaseConfig) -> LeaderError {
    let deadline_after = config.lease_duration.saturating_sub(config.renew_every);
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        let started = tokio::time::Instant::now();
        let deadline = last_renewed + deadline_after;
        let attempt = tokio::time::timeout_at(deadline, try_acquire_or_renew(api, config, Timestamp::now()));
        match attempt.await {
            Ok(Ok(true)) => last_renewed = started,
            Ok(Ok(false)) => {
                return LeaderError::Lost {
                    name: config.name.clone(),
                    elapsed: last_renewed.elapsed(),
                };
            }
            Ok(Err(error)) => warn!(lease = %config.name, %error, "renewal failed"),
            Err(_) => warn!(lease = %config.name, "renewal not answered before the renew deadline"),
        }
        // Stop before the lease can expire under another replica's eyes.
        if tokio::time::Instant::now() + config.renew_every >= last_renewed + config.lease_duration {
            return LeaderError::Lost {
                name: config.name.clone(),
                elapsed: last_renewed.elapsed(),
            };
        }
    }
}

#[cfg(test)]
mod tests;
