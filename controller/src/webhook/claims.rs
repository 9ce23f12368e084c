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
//! A claim's `VfConfig` (opaque parameters of driver `vfplane.io` for
//! its vfplane requests, or for all of them) may carry a
//! `containerProfile`, which makes the pool's stricter for the containers
//! using the claim: the webhook checks them against the strictest of both.
//! A `VfConfig` vfplane cannot take refuses the pod (prepare would refuse
//! the claim). A DeviceClass's config is not read here: vfplane's chart
//! installs its DeviceClass without one.
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
use vfplane_proto::vf_config::VfConfig;
use vfplane_proto::vf_policy::ContainerProfile;

/// How long the webhook waits for one claim or template (its own timeout,
/// set by the chart, is longer).
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// What one of the pod's claims asks of vfplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimVfs {
    /// VFs of these pools.
    Pools {
        /// The pools its selectors name.
        pools: BTreeSet<String>,
        /// Its `VfConfig`'s container profile (the strictest of several).
        profile: Option<ContainerProfile>,
    },
    /// VFs of any DRA pool (a vfplane request without a pool selector).
    AnyPool {
        /// Its `VfConfig`'s container profile (the strictest of several).
        profile: Option<ContainerProfile>,
    },
    /// A `VfConfig` of it that vfplane cannot take: why.
    BadConfig(String),
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
    // Our requests' names, and `request/subrequest` for alternatives.
    let mut our_requests: BTreeSet<String> = BTreeSet::new();
    let requests = spec.devices.as_ref().and_then(|d| d.requests.as_ref());
    for request in requests.into_iter().flatten() {
        let exact_is_ours = request
            .exactly
            .as_ref()
            .is_some_and(|e| e.device_class_name == DEVICE_CLASS);
        if exact_is_ours {
            our_requests.insert(request.name.clone());
        }
        for sub in request.first_available.iter().flatten() {
            if sub.device_class_name == DEVICE_CLASS {
                our_requests.insert(request.name.clone());
                our_requests.insert(format!("{}/{}", request.name, sub.name));
            }
        }
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
    if !ours {
        return None;
    }
    let profile = match profile_of(spec, &our_requests) {
        Ok(profile) => profile,
        Err(why) => return Some(ClaimVfs::BadConfig(why)),
    };
    Some(if any_pool {
        ClaimVfs::AnyPool { profile }
    } else {
        ClaimVfs::Pools { pools, profile }
    })
}

/// The container profile of the claim's `VfConfig`s that apply to its
/// vfplane requests (`our_requests`; a config naming no request applies to
/// all), the strictest of them.
fn profile_of(
    spec: &ResourceClaimSpec,
    our_requests: &BTreeSet<String>,
) -> Result<Option<ContainerProfile>, String> {
    let configs = spec.devices.as_ref().and_then(|d| d.config.as_ref());
    let mut profiles = Vec::new();
    for (index, config) in configs.into_iter().flatten().enumerate() {
        let Some(opaque) = config.opaque.as_ref().filter(|o| o.driver == DRIVER_NAME) else {
            continue;
        };
        let applies = config
            .requests
            .as_ref()
            .is_none_or(|named| named.is_empty() || named.iter().any(|r| our_requests.contains(r)));
        if !applies {
            continue;
        }
        let bad = |why: String| format!("config[{index}] is not a VfConfig vfplane takes: {why}");
        let parameters: VfConfig =
            serde_json::from_value(opaque.parameters.0.clone()).map_err(|e| bad(e.to_string()))?;
        parameters.overrides().map_err(|e| bad(e.to_string()))?;
        profiles.extend(parameters.container_profile);
    }
    Ok(ContainerProfile::strictest(&profiles))
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
            Some(ClaimVfs::Pools {
                pools: ["fast".to_owned(), "slow".to_owned()].into(),
                profile: None
            })
        );
        let any = serde_json::json!({"name": "any", "exactly": {"deviceClassName": "vf.vfplane.io"}});
        assert_eq!(
            vfs_of_claim(&spec(serde_json::json!([fast, any]))),
            Some(ClaimVfs::AnyPool { profile: None })
        );
    }

    fn with_config(requests: Value, config: Value) -> ResourceClaimSpec {
        serde_json::from_value(serde_json::json!({"devices": {"requests": requests, "config": config}}))
            .unwrap()
    }

    fn vf_config(requests: Value, fields: Value) -> Value {
        let mut parameters = serde_json::json!({"apiVersion": "vfplane.io/v1alpha1", "kind": "VfConfig"});
        parameters
            .as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        serde_json::json!({"requests": requests, "opaque": {"driver": "vfplane.io", "parameters": parameters}})
    }

    #[test]
    fn a_claims_vfconfig_profile_for_its_vfplane_requests_is_read_and_a_bad_one_named() {
        let vf = serde_json::json!({"name": "vf", "exactly": {"deviceClassName": "vf.vfplane.io"}});
        let gpu = serde_json::json!({"name": "gpu", "exactly": {"deviceClassName": "gpu.example.com"}});
        let requests = serde_json::json!([vf, gpu]);
        // For every request, and for ours by name: the strictest of both.
        let spec = with_config(
            requests.clone(),
            serde_json::json!([
                vf_config(serde_json::json!([]), serde_json::json!({"containerProfile": {"memory": "1Gi", "pids": 100}})),
                vf_config(serde_json::json!(["vf"]), serde_json::json!({"containerProfile": {"memory": "2Gi", "pids": 200}})),
                // Another driver's, and one for the other request: not ours.
                {"opaque": {"driver": "gpu.example.com", "parameters": {"memory": "9Gi"}}},
                vf_config(serde_json::json!(["gpu"]), serde_json::json!({"containerProfile": {"memory": "8Gi"}})),
            ]),
        );
        let Some(ClaimVfs::AnyPool {
            profile: Some(profile),
        }) = vfs_of_claim(&spec)
        else {
            panic!("{:?}", vfs_of_claim(&spec));
        };
        assert_eq!(
            (profile.memory.as_deref(), profile.pids),
            (Some("2Gi"), Some(100))
        );
        // Settings only: no profile.
        let spec = with_config(
            requests.clone(),
            serde_json::json!([vf_config(serde_json::json!([]), serde_json::json!({"vlan": 7}))]),
        );
        assert_eq!(vfs_of_claim(&spec), Some(ClaimVfs::AnyPool { profile: None }));
        // One vfplane cannot take.
        let spec = with_config(
            requests,
            serde_json::json!([vf_config(
                serde_json::json!(["vf"]),
                serde_json::json!({"containerProfile": {"memory": "lots"}})
            )]),
        );
        let Some(ClaimVfs::BadConfig(why)) = vfs_of_claim(&spec) else {
            panic!("{:?}", vfs_of_claim(&spec));
        };
        assert!(
            why.starts_with("config[0] is not a VfConfig vfplane takes: containerProfile.memory: "),
            "{why}"
        );
    }
}
