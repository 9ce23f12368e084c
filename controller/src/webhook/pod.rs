//! Pod admission: containers asking for a `vfplane.io/<pool>`, or using a
//! ResourceClaim that asks for the pool's VFs (see [`super::claims`]),
//! whose policy has a container profile wanting limits must set CPU,
//! memory (and, when
//! named, hugepages) limits of at least the profile's values. In mutate mode
//! the missing ones are filled in with a JSONPatch instead of refused.
//!
//! On the mutating endpoint (either mode), a container of a pool whose
//! profile the container runtime applies (locked memory, pids, NUMA
//! cpuset: [`ContainerProfile::adjusted_by_runtime`]) is marked as needing
//! vfplane's NRI plugin ([`NRI_REQUIRED_PLUGINS_ANNOTATION`]): a runtime
//! with NRI's default validator then refuses to create it while the plugin
//! is not registered (a runtime or plugin restart), and the kubelet tries
//! again, instead of the container being created without its limits.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};
use vfplane_proto::pool::RESOURCE_DOMAIN;
use vfplane_proto::vf_policy::{ContainerProfile, NRI_PLUGIN_NAME, NRI_REQUIRED_PLUGINS_ANNOTATION};

use super::ClusterView;
use super::claims::{ClaimVfs, PodClaims};
use vfplane_proto::quantity::{Quantity, parse_quantity};

/// The hugepages resource added in mutate mode when the container names no
/// page size of its own.
pub const DEFAULT_HUGEPAGES_RESOURCE: &str = "hugepages-2Mi";

/// What pod admission decided.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PodVerdict {
    /// Reasons to refuse the pod; empty to admit it.
    pub problems: Vec<String>,
    /// JSONPatch operations (RFC 6902) to apply when admitted.
    pub patch: Vec<Value>,
    /// Warnings for the client (admitted or not).
    pub warnings: Vec<String>,
}

/// A resource a profile asks containers to limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Res {
    Cpu,
    Memory,
    Hugepages,
}

impl Res {
    /// How to name the limit to add, for people.
    fn limit_field(self) -> &'static str {
        match self {
            Self::Cpu => "resources.limits.cpu",
            Self::Memory => "resources.limits.memory",
            Self::Hugepages => "resources.limits.hugepages-2Mi or resources.limits.hugepages-1Gi",
        }
    }

    fn profile_field(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Memory => "memory",
            Self::Hugepages => "hugepages",
        }
    }

    fn is_key(self, key: &str) -> bool {
        match self {
            Self::Cpu => key == "cpu",
            Self::Memory => key == "memory",
            Self::Hugepages => key.starts_with("hugepages-"),
        }
    }
}

/// The profile's minimum for one resource: text as written and its value.
#[derive(Debug, Clone)]
struct Minimum {
    text: String,
    value: Quantity,
}

/// What pod admission may change in a pod it admits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PodChanges {
    /// Add the limits a profile asks for instead of refusing the pod
    /// (mutate mode).
    pub limits: bool,
    /// Mark containers the runtime adjusts for vfplane as needing its NRI
    /// plugin (the mutating endpoint, in both modes).
    pub nri_annotation: bool,
}

/// Checks (and with `changes`, completes) a pod being created; `claims`
/// says which of its ResourceClaims ask for vfplane's VFs.
pub fn admit_pod(pod: &Pod, view: &dyn ClusterView, changes: PodChanges, claims: &PodClaims) -> PodVerdict {
    let mut verdict = PodVerdict::default();
    let Some(spec) = &pod.spec else {
        return verdict;
    };
    let mutate = changes.limits;
    let mut needs_nri: Vec<&str> = Vec::new();
    let mut profiles: BTreeMap<String, Option<ContainerProfile>> = BTreeMap::new();
    let lists = [
        (
            "/spec/initContainers",
            spec.init_containers.as_deref().unwrap_or_default(),
        ),
        ("/spec/containers", spec.containers.as_slice()),
    ];
    for (list_path, containers) in lists {
        for (index, container) in containers.iter().enumerate() {
            let path = format!("{list_path}/{index}");
            let asks = pools_of(container, claims, view, &mut verdict);
            if check_container(container, &asks, &path, view, &mut profiles, mutate, &mut verdict) {
                needs_nri.push(&container.name);
            }
        }
    }
    if changes.nri_annotation {
        annotate_nri(pod, &needs_nri, &mut verdict);
    }
    verdict
}

/// Adds, for each of `containers`, vfplane's NRI plugin to NRI's
/// required-plugins annotation of that container (keeping plugins the pod
/// already names there).
fn annotate_nri(pod: &Pod, containers: &[&str], verdict: &mut PodVerdict) {
    let existing = pod.metadata.annotations.as_ref();
    let mut added = serde_json::Map::new();
    for name in containers {
        let key = format!("{NRI_REQUIRED_PLUGINS_ANNOTATION}/container.{name}");
        let mut plugins: Vec<String> = match existing.and_then(|a| a.get(&key)) {
            None => Vec::new(),
            Some(value) => match serde_yaml::from_str::<Vec<String>>(value) {
                Ok(plugins) => plugins,
                Err(error) => {
                    verdict.problems.push(format!(
                        "annotation {key}: {value:?} is not a list of NRI plugin names ({error})"
                    ));
                    continue;
                }
            },
        };
        if plugins.iter().any(|p| p == NRI_PLUGIN_NAME) {
            continue;
        }
        plugins.push(NRI_PLUGIN_NAME.to_owned());
        added.insert(key, Value::String(Value::from(plugins).to_string()));
    }
    if added.is_empty() {
        return;
    }
    match existing {
        None => verdict.patch.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": Value::Object(added),
        })),
        Some(_) => {
            for (key, value) in added {
                // `add` replaces a member that exists (RFC 6902 4.1).
                verdict.patch.push(json!({
                    "op": "add",
                    "path": format!("/metadata/annotations/{}", escape_token(&key)),
                    "value": value,
                }));
            }
        }
    }
}

/// How a container asks for a pool's VFs.
#[derive(Debug, Clone)]
struct Ask {
    /// For messages: `vfplane.io/<pool>`, or the claim it asks through.
    how: String,
    /// The container profile of the claims it asks through, which make
    /// the pool's stricter.
    claim_profile: Option<ContainerProfile>,
}

impl Ask {
    fn by_resource(key: &str) -> Self {
        Self {
            how: key.to_owned(),
            claim_profile: None,
        }
    }

    /// Adds a claim's profile (the strictest of the claims').
    fn with_claims(mut self, profile: Option<&ContainerProfile>) -> Self {
        self.claim_profile = ContainerProfile::strictest(self.claim_profile.iter().chain(profile));
        self
    }
}

/// The pools a container asks for, each with how it asks: `vfplane.io/<pool>`
/// by request or limit, or through one of the pod's claims that asks for
/// vfplane's VFs (`claims`), with that claim's profile. A claim the webhook
/// could not read is a warning; one whose `VfConfig` vfplane cannot take,
/// a problem.
fn pools_of(
    container: &Container,
    claims: &PodClaims,
    view: &dyn ClusterView,
    verdict: &mut PodVerdict,
) -> BTreeMap<String, Ask> {
    let prefix = format!("{RESOURCE_DOMAIN}/");
    let Some(resources) = &container.resources else {
        return BTreeMap::new();
    };
    let mut pools: BTreeMap<String, Ask> = resources
        .limits
        .iter()
        .chain(resources.requests.iter())
        .flat_map(|map| map.keys())
        .filter_map(|key| {
            key.strip_prefix(&prefix)
                .map(|pool| (pool.to_owned(), Ask::by_resource(key)))
        })
        .collect();
    let mut through = |pool: &str, how: String, profile: &Option<ContainerProfile>| {
        let ask = pools.remove(pool).unwrap_or(Ask {
            how,
            claim_profile: None,
        });
        pools.insert(pool.to_owned(), ask.with_claims(profile.as_ref()));
    };
    for used in resources.claims.iter().flatten() {
        let claim = &used.name;
        match claims.0.get(claim) {
            None => {}
            Some(ClaimVfs::Pools {
                pools: named,
                profile,
            }) => {
                for pool in named {
                    through(
                        pool,
                        format!("VFs of pool {pool} through claim {claim:?}"),
                        profile,
                    );
                }
            }
            Some(ClaimVfs::AnyPool { profile }) => {
                for pool in view.dra_pools() {
                    through(
                        &pool,
                        format!("VFs of any DRA pool (so of {pool}) through claim {claim:?}"),
                        profile,
                    );
                }
            }
            Some(ClaimVfs::BadConfig(why)) => verdict.problems.push(format!(
                "container {:?} uses claim {claim:?}: {why}",
                container.name
            )),
            Some(ClaimVfs::Unread(why)) => verdict.warnings.push(format!(
                "container {:?} uses claim {claim:?}: {why}; vfplane did not check it against a pool's \
                 container profile",
                container.name
            )),
        }
    }
    pools
}

/// Checks one container; true when a pool it asks for has a profile the
/// runtime applies through vfplane's NRI plugin.
fn check_container(
    container: &Container,
    asks: &BTreeMap<String, Ask>,
    path: &str,
    view: &dyn ClusterView,
    profiles: &mut BTreeMap<String, Option<ContainerProfile>>,
    mutate: bool,
    verdict: &mut PodVerdict,
) -> bool {
    let name = &container.name;
    let empty = BTreeMap::new();
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref()).unwrap_or(&empty);
    let requests = resources.and_then(|r| r.requests.as_ref()).unwrap_or(&empty);
    // What mutate mode adds: resource -> (largest minimum, pool asking it).
    let mut to_add: BTreeMap<Res, Minimum> = BTreeMap::new();
    let mut numa_aligned = false;
    let mut needs_nri = false;
    for (pool, ask) in asks {
        let resource = &ask.how;
        let pools_profile = profiles
            .entry(pool.clone())
            .or_insert_with(|| view.container_profile(pool))
            .clone();
        // A claim's profile makes the pool's stricter.
        let (profile, whose) = match &ask.claim_profile {
            None => (pools_profile, "whose policy requires"),
            Some(claims) => (
                ContainerProfile::strictest(pools_profile.iter().chain(Some(claims))),
                "whose policy and claim require",
            ),
        };
        needs_nri |= profile
            .as_ref()
            .is_some_and(ContainerProfile::adjusted_by_runtime);
        let Some(profile) = profile.filter(ContainerProfile::wants_limits) else {
            continue;
        };
        numa_aligned |= profile.numa_aligned;
        let mut needs = vec![
            (Res::Cpu, profile.cpu.as_deref()),
            (Res::Memory, profile.memory.as_deref()),
        ];
        if let Some(hugepages) = profile.hugepages.as_deref() {
            needs.push((Res::Hugepages, Some(hugepages)));
        }
        // Missing limits: (resource, minimum if the profile gives one).
        let mut missing: Vec<(Res, Option<Minimum>)> = Vec::new();
        for (res, min_text) in needs {
            let minimum = match min_text.map(|text| parse_quantity(text).map(|value| (text, value))) {
                None => None,
                Some(Ok((text, value))) => Some(Minimum {
                    text: text.to_owned(),
                    value,
                }),
                Some(Err(error)) => {
                    verdict.problems.push(format!(
                        "the policy of {resource} has a containerProfile.{} the webhook cannot read ({error}); fix the VfPolicy",
                        res.profile_field()
                    ));
                    continue;
                }
            };
            match limit_of(limits, res) {
                Ok(None) => missing.push((res, minimum)),
                Ok(Some(present)) => {
                    if let Some(minimum) = &minimum
                        && present.value < minimum.value
                    {
                        verdict.problems.push(format!(
                            "container {name:?} asks for {resource}, {whose} {} of at least {:?}; it has {}, which is less",
                            res.limit_field_single(&present.key),
                            minimum.text,
                            present.text,
                        ));
                    }
                }
                Err(error) => verdict.problems.push(format!("container {name:?}: {error}")),
            }
        }
        let unfillable: Vec<&(Res, Option<Minimum>)> = missing
            .iter()
            .filter(|(_, minimum)| !mutate || minimum.is_none())
            .collect();
        if !unfillable.is_empty() {
            let items: Vec<String> = unfillable
                .iter()
                .map(|(res, minimum)| match minimum {
                    Some(m) => format!("{} (at least {:?})", res.limit_field(), m.text),
                    None => res.limit_field().to_owned(),
                })
                .collect();
            verdict.problems.push(format!(
                "container {name:?} asks for {resource}, {whose} limits: add {}",
                and_list(&items)
            ));
        }
        if mutate {
            for (res, minimum) in missing {
                if let Some(minimum) = minimum {
                    let slot = to_add.entry(res).or_insert_with(|| minimum.clone());
                    if minimum.value > slot.value {
                        *slot = minimum;
                    }
                }
            }
        }
    }
    if !to_add.is_empty() {
        patch_container(container, path, requests, &to_add, numa_aligned, verdict);
    }
    needs_nri
}

impl Res {
    /// `resources.limits.<key>` for a limit the container has.
    fn limit_field_single(self, key: &str) -> String {
        match self {
            Self::Hugepages => "resources.limits.hugepages-* (summed over page sizes)".to_owned(),
            _ => format!("resources.limits.{key}"),
        }
    }
}

/// A limit the container has: its key, text and value.
struct Present {
    key: String,
    text: String,
    value: Quantity,
}

/// The container's limit for `res` (hugepages summed over page sizes).
fn limit_of(
    limits: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    res: Res,
) -> Result<Option<Present>, String> {
    let mut found: Option<Present> = None;
    for (key, quantity) in limits.iter().filter(|(key, _)| res.is_key(key)) {
        let value = parse_quantity(&quantity.0).map_err(|e| format!("resources.limits.{key}: {e}"))?;
        found = Some(match found {
            None => Present {
                key: key.clone(),
                text: format!("{:?}", quantity.0),
                value,
            },
            Some(before) => Present {
                key: before.key,
                text: format!("{} + {:?}", before.text, quantity.0),
                value: before.value.saturating_add(value),
            },
        });
    }
    Ok(found)
}

fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// RFC 6901 escaping of one reference token.
fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Adds the missing limits (and equal requests where requests are absent).
fn patch_container(
    container: &Container,
    path: &str,
    requests: &BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    to_add: &BTreeMap<Res, Minimum>,
    numa_aligned: bool,
    verdict: &mut PodVerdict,
) {
    let name = &container.name;
    let mut limits: BTreeMap<String, String> = BTreeMap::new();
    let mut new_requests: BTreeMap<String, String> = BTreeMap::new();
    for (&res, minimum) in to_add {
        let request = requests.iter().find(|(key, _)| res.is_key(key));
        let key = match (res, request) {
            (Res::Cpu, _) => "cpu".to_owned(),
            (Res::Memory, _) => "memory".to_owned(),
            (Res::Hugepages, Some((key, _))) => key.clone(),
            (Res::Hugepages, None) => DEFAULT_HUGEPAGES_RESOURCE.to_owned(),
        };
        let mut limit = minimum.text.clone();
        match request {
            None => {
                new_requests.insert(key.clone(), limit.clone());
            }
            Some((request_key, request)) => match parse_quantity(&request.0) {
                Err(error) => {
                    verdict.problems.push(format!(
                        "container {name:?}: resources.requests.{request_key}: {error}"
                    ));
                    continue;
                }
                // A limit below the request would be refused by the API
                // server: the request is the limit then.
                Ok(value) if value > minimum.value => limit.clone_from(&request.0),
                Ok(value) => {
                    if numa_aligned && value != minimum.value && res != Res::Hugepages {
                        verdict.warnings.push(format!(
                            "container {name:?}: resources.requests.{key} {:?} differs from the added limit {limit:?}, so the pod does not get the Guaranteed QoS a numaAligned pool needs",
                            request.0
                        ));
                    }
                }
            },
        }
        limits.insert(key, limit);
    }
    let resources = container.resources.as_ref();
    let resources_path = format!("{path}/resources");
    let as_object = |map: &BTreeMap<String, String>| {
        Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    };
    let Some(resources) = resources else {
        let mut value = serde_json::Map::new();
        value.insert("limits".to_owned(), as_object(&limits));
        if !new_requests.is_empty() {
            value.insert("requests".to_owned(), as_object(&new_requests));
        }
        verdict
            .patch
            .push(json!({"op": "add", "path": resources_path, "value": value}));
        return;
    };
    for (field, map, existing) in [
        ("limits", &limits, resources.limits.is_some()),
        ("requests", &new_requests, resources.requests.is_some()),
    ] {
        if map.is_empty() {
            continue;
        }
        if existing {
            for (key, value) in map {
                verdict.patch.push(json!({
                    "op": "add",
                    "path": format!("{resources_path}/{field}/{}", escape_token(key)),
                    "value": value,
                }));
            }
        } else {
            verdict.patch.push(json!({
                "op": "add",
                "path": format!("{resources_path}/{field}"),
                "value": as_object(map),
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_read_like_sentences() {
        let s = |v: &[&str]| and_list(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(s(&[]), "");
        assert_eq!(s(&["a"]), "a");
        assert_eq!(s(&["a", "b"]), "a and b");
        assert_eq!(s(&["a", "b", "c"]), "a, b and c");
    }

    #[test]
    fn pointer_tokens_are_escaped() {
        assert_eq!(escape_token("vfplane.io/fast"), "vfplane.io~1fast");
        assert_eq!(escape_token("a~b"), "a~0b");
    }
}
