//! Which of a pod's ResourceClaims ask for vfplane's VFs, and of which
//! pools: the pod webhook checks a container that uses such a claim against
//! the pool's profile, as it checks one asking for `vfplane.io/<pool>`.
//!
//! A claim asks for vfplane's VFs through a request (or a `firstAvailable`
//! subrequest) of DeviceClass [`DEVICE_CLASS`]. Its pool is what its CEL
//! selectors compare `device.attributes["vfplane.io"].pool` with (`==` and
//! a string literal); a vfplane request without such a selector may get a
//! VF of any DRA pool, so the pod is checked against each of them.
//!
//! The pod names its claims by template (`resourceClaimTemplateName`) or
//! by claim (`resourceClaimName`); the webhook reads them from the API
//! server when the pod is admitted ([`resolve`]). One that cannot be read
//! (not made yet, or the webhook may not read it) is admitted with a
//! warning: vfplane cannot tell whether it asks for VFs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::resource::v1::{
    DeviceSelector, ResourceClaim, ResourceClaimSpec, ResourceClaimTemplate,
};
use serde_json::Value;
use vfplane_proto::dra::{DEVICE_CLASS, DRIVER_NAME};

/// How long the webhook waits for one claim or template (its own timeout,
/// set by the chart, is longer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What one of the pod's claims asks of vfplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimVfs {
    /// VFs of these pools.
    Pools(BTreeSet<String>),
    /// VFs of any DRA pool (a vfplane request without a pool selector).
    AnyPool,
    /// The claim or its template could not be read: why.
    Unread(String),
}

/// The pod's claims that ask for vfplane's VFs (and those that could not
/// be read), by the name the pod gives them in `spec.resourceClaims`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodClaims(pub BTreeMap<String, ClaimVfs>);

/// What `spec` asks of vfplane; `None` when no request is for
/// [`DEVICE_CLASS`].
pub fn vfs_of_claim(spec: &ResourceClaimSpec) -> Option<ClaimVfs> {
    let mut pools = BTreeSet::new();
    let mut any_pool = false;
    let mut ours = false;
    let requests = spec.devices.as_ref().and_then(|d| d.requests.as_ref());
    for request in requests.into_iter().flatten() {
        let exact = request
            .exactly
            .as_ref()
            .map(|e| (e.device_class_name.as_str(), e.selectors.as_deref()));
        let alternatives = request
            .first_available
            .iter()
            .flatten()
            .map(|s| (s.device_class_name.as_str(), s.selectors.as_deref()));
        for (class, selectors) in exact.into_iter().chain(alternatives) {
            if class != DEVICE_CLASS {
                continue;
            }
            ours = true;
            let named: Vec<String> = selectors
                .unwrap_or_default()
                .iter()
                .filter_map(|s: &DeviceSelector| s.cel.as_ref())
                .filter_map(|cel| pool_in(&cel.expression))
                .collect();
            if named.is_empty() {
                any_pool = true;
            }
            pools.extend(named);
        }
    }
    match (ours, any_pool) {
        (false, _) => None,
        (true, true) => Some(ClaimVfs::AnyPool),
        (true, false) => Some(ClaimVfs::Pools(pools)),
    }
}

/// The pool a CEL expression compares vfplane's `pool` attribute with:
/// `device.attributes["vfplane.io"].pool == "fast"` (either quote, either
/// side of `==`).
fn pool_in(expression: &str) -> Option<String> {
    let attribute = format!("device.attributes[\"{DRIVER_NAME}\"].pool");
    let compact: String = expression.split_whitespace().collect();
    let compact = compact.replace('\'', "\"");
    let literal = |text: &str| -> Option<String> {
        let rest = text.strip_prefix('"')?;
        let end = rest.find('"')?;
        Some(rest[..end].to_owned())
    };
    if let Some(at) = compact.find(&format!("{attribute}==")) {
        return literal(&compact[at + attribute.len() + 2..]);
    }
    let at = compact.find(&format!("=={attribute}"))?;
    let before = &compact[..at];
    let start = before[..before.len().checked_sub(1)?].rfind('"')?;
    literal(&before[start..])
}

/// Reads the claims `pod` (JSON, from an AdmissionReview) names, in
/// `namespace`, and says which ask for vfplane's VFs.
pub async fn resolve(client: &kube::Client, namespace: &str, pod: &Value) -> PodClaims {
    let mut claims = PodClaims::default();
    for entry in pod["spec"]["resourceClaims"].as_array().into_iter().flatten() {
        let Some(name) = entry["name"].as_str() else {
            continue;
        };
        let read = if let Some(template) = entry["resourceClaimTemplateName"].as_str() {
            let api: kube::Api<ResourceClaimTemplate> = kube::Api::namespaced(client.clone(), namespace);
            read(api.get(template), "ResourceClaimTemplate", namespace, template)
                .await
                .map(|t| t.spec.and_then(|s| s.spec).unwrap_or_default())
        } else if let Some(claim) = entry["resourceClaimName"].as_str() {
            let api: kube::Api<ResourceClaim> = kube::Api::namespaced(client.clone(), namespace);
            read(api.get(claim), "ResourceClaim", namespace, claim)
                .await
                .map(|c| c.spec.unwrap_or_default())
        } else {
            continue;
        };
        match read {
            Ok(spec) => {
                if let Some(vfs) = vfs_of_claim(&spec) {
                    claims.0.insert(name.to_owned(), vfs);
                }
            }
            Err(why) => {
                claims.0.insert(name.to_owned(), ClaimVfs::Unread(why));
            }
        }
    }
    claims
}

async fn read<T>(
    get: impl Future<Output = Result<T, kube::Error>>,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<T, String> {
    match tokio::time::timeout(READ_TIMEOUT, get).await {
        Ok(Ok(object)) => Ok(object),
        Ok(Err(error)) => Err(format!(
            "cannot read {kind} {namespace}/{name}: {}",
            vfplane_proto::error_chain(&error)
        )),
        Err(_) => Err(format!(
            "cannot read {kind} {namespace}/{name}: no answer within {} s",
            READ_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(requests: Value) -> ResourceClaimSpec {
        serde_json::from_value(serde_json::json!({"devices": {"requests": requests}})).unwrap()
    }

    #[test]
    fn the_pool_is_read_from_the_selectors_equality_either_way_round() {
        assert_eq!(
            pool_in(r#"device.attributes["vfplane.io"].pool == "fast""#).as_deref(),
            Some("fast")
        );
        assert_eq!(
            pool_in(r#"device.attributes['vfplane.io'].pool=='slow'"#).as_deref(),
            Some("slow")
        );
        assert_eq!(
            pool_in(r#"device.attributes["vfplane.io"].numaNode == 0 && "edge" == device.attributes["vfplane.io"].pool"#)
                .as_deref(),
            Some("edge")
        );
        assert_eq!(pool_in(r#"device.attributes["vfplane.io"].pool != "fast""#), None);
        assert_eq!(
            pool_in(r#"device.attributes["gpu.example.com"].pool == "fast""#),
            None
        );
    }

    #[test]
    fn only_requests_of_vfplanes_class_count_and_one_without_a_pool_means_any() {
        let gpu = serde_json::json!({"name": "gpu", "exactly": {"deviceClassName": "gpu.example.com"}});
        assert_eq!(vfs_of_claim(&spec(serde_json::json!([gpu.clone()]))), None);
        let fast = serde_json::json!({"name": "vf", "exactly": {"deviceClassName": "vf.vfplane.io",
            "selectors": [{"cel": {"expression": "device.attributes[\"vfplane.io\"].pool == \"fast\""}}]}});
        let slow_or_fast = serde_json::json!({"name": "alt", "firstAvailable": [
            {"name": "a", "deviceClassName": "vf.vfplane.io",
             "selectors": [{"cel": {"expression": "device.attributes[\"vfplane.io\"].pool == \"slow\""}}]},
            {"name": "b", "deviceClassName": "gpu.example.com"}]});
        assert_eq!(
            vfs_of_claim(&spec(serde_json::json!([gpu, fast.clone(), slow_or_fast]))),
            Some(ClaimVfs::Pools(["fast".to_owned(), "slow".to_owned()].into()))
        );
        let any = serde_json::json!({"name": "any", "exactly": {"deviceClassName": "vf.vfplane.io"}});
        assert_eq!(
            vfs_of_claim(&spec(serde_json::json!([fast, any]))),
            Some(ClaimVfs::AnyPool)
        );
    }
}
