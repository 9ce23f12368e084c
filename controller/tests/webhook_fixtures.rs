#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The admission webhook against AdmissionReview fixtures
//! (`tests/fixtures/admission/*.json`, named after their case), and the
//! HTTPS server end to end.
//!
//! The TLS fixtures (`tests/fixtures/admission/tls/{cert,key}{1,2}.pem`) are
//! two self-signed pairs for `localhost` / `127.0.0.1`, generated once with
//!
//! ```sh
//! openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost \
//!   -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
//!   -addext basicConstraints=critical,CA:FALSE -days 36500 \
//!   -keyout keyN.pem -out certN.pem
//! ```
//!
//! (`CA:FALSE` because webpki refuses a CA certificate as the server's own;
//! the test trusts each certificate directly.) They expire in 2125.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use vfplane_controller::webhook::{
    ClaimVfs, ClusterView, Endpoint, PodClaims, PodMode, SelectedPf, TlsFiles, WebhookError, review, serve_on,
};
use vfplane_proto::pci::PciAddress;
use vfplane_proto::vf_policy::{ContainerProfile, VfPolicySpec};
use vfplane_proto::vf_range::PfNameSelector;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/admission")
}

/// Two nodes: worker-1 with a 7-VF PF (like the testbed's igb) and a big
/// one, worker-2 with a big one. Pools: `fast` (cpu 2, memory 1Gi,
/// NUMA-aligned), `huge` (cpu 1, memory 512Mi, hugepages 1Gi), `numa`
/// (NUMA-aligned, no values), `kernel` (a profile wanting no limits),
/// `plain` (no profile).
struct FakeCluster {
    pfs: Vec<SelectedPf>,
}

impl FakeCluster {
    fn new() -> Self {
        let pf = |node: &str, pci: &str, name: &str, total_vfs| SelectedPf {
            node: node.to_owned(),
            pci_address: pci.to_owned(),
            name: Some(name.to_owned()),
            total_vfs,
        };
        Self {
            pfs: vec![
                pf("worker-1", "0000:3b:00.0", "ens1f0", 7),
                pf("worker-1", "0000:3b:00.1", "ens1f1", 64),
                pf("worker-2", "0000:3b:00.0", "ens1f0", 64),
            ],
        }
    }
}

impl ClusterView for FakeCluster {
    fn selected_pfs(&self, spec: &VfPolicySpec) -> Vec<SelectedPf> {
        let nic = &spec.nic_selector;
        let names: BTreeSet<String> = nic
            .pf_names
            .iter()
            .filter_map(|n| PfNameSelector::parse(n).ok())
            .map(|s| s.name)
            .collect();
        let addresses: BTreeSet<PciAddress> =
            nic.pci_addresses.iter().filter_map(|a| a.parse().ok()).collect();
        self.pfs
            .iter()
            .filter(|pf| names.is_empty() || pf.name.as_ref().is_some_and(|n| names.contains(n)))
            .filter(|pf| addresses.is_empty() || addresses.contains(&pf.pci_address.parse().unwrap()))
            .cloned()
            .collect()
    }

    fn dra_pools(&self) -> Vec<String> {
        vec!["huge".to_owned(), "numa".to_owned()]
    }

    fn container_profile(&self, pool: &str) -> Option<ContainerProfile> {
        let text = |s: &str| Some(s.to_owned());
        match pool {
            "fast" => Some(ContainerProfile {
                cpu: text("2"),
                memory: text("1Gi"),
                numa_aligned: true,
                ..ContainerProfile::default()
            }),
            "huge" => Some(ContainerProfile {
                cpu: text("1"),
                memory: text("512Mi"),
                hugepages: text("1Gi"),
                ..ContainerProfile::default()
            }),
            "numa" => Some(ContainerProfile {
                numa_aligned: true,
                ..ContainerProfile::default()
            }),
            // Only what the runtime applies: no limits to check or add.
            "locked" => Some(ContainerProfile {
                locked_memory: text("64Mi"),
                pids: Some(64),
                ..ContainerProfile::default()
            }),
            "kernel" => Some(ContainerProfile::default()),
            _ => None,
        }
    }
}

#[derive(Debug)]
enum Expect {
    /// Allowed, no patch.
    Allow,
    /// Allowed with exactly this JSONPatch.
    Patch(Value),
    /// Refused; the message holds every one of these.
    Deny(Vec<&'static str>),
    /// HTTP 400 with this in the message.
    BadRequest(&'static str),
}

struct Case {
    file: &'static str,
    endpoint: Endpoint,
    mode: PodMode,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    use Endpoint::{MutatePods, ValidatePods, ValidatePolicies};
    use Expect::{Allow, BadRequest, Deny, Patch};
    use PodMode::{Mutate, Validate};
    let case = |file, endpoint, mode, expect| Case {
        file,
        endpoint,
        mode,
        expect,
    };
    let fast_missing = r#"pod refused: container "dpdk" asks for vfplane.io/fast, whose policy requires limits: add resources.limits.cpu (at least "2") and resources.limits.memory (at least "1Gi")"#;
    vec![
        // VfPolicy: allowed.
        case("policy-allow-valid.json", ValidatePolicies, Validate, Allow),
        case(
            "policy-allow-disjoint-ranges.json",
            ValidatePolicies,
            Validate,
            Allow,
        ),
        case(
            "policy-allow-update-valid.json",
            ValidatePolicies,
            Validate,
            Allow,
        ),
        case(
            "policy-allow-delete-of-invalid.json",
            ValidatePolicies,
            Validate,
            Allow,
        ),
        // VfPolicy: refused.
        case(
            "policy-reject-overlapping-ranges.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                r#"VfPolicy "reject-overlapping-ranges" is refused: spec.nicSelector.pfNames[0] "ens1f0#0-3" and pfNames[1] "ens1f0#2-5" overlap: both take VF 2-3 of ens1f0"#,
            ]),
        ),
        case(
            "policy-reject-update-overlapping-ranges.json",
            ValidatePolicies,
            Validate,
            Deny(vec!["overlap: both take VF 2-3 of ens1f0"]),
        ),
        case(
            "policy-reject-same-pf-twice.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                r#"spec.nicSelector.pfNames[0] "ens1f0" and pfNames[1] "ens1f0" name the same PF ens1f0 twice"#,
            ]),
        ),
        case(
            "policy-reject-whole-pf-and-range.json",
            ValidatePolicies,
            Validate,
            Deny(vec!["an entry without a VF range takes every VF of ens1f0"]),
        ),
        case(
            "policy-reject-range-beyond-num-vfs.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                r#"spec.nicSelector.pfNames[0] "ens1f0#2-5": VF 4-5 is beyond numVfs 4 (the policy creates VFs 0-3)"#,
            ]),
        ),
        case(
            "policy-reject-range-at-num-vfs.json",
            ValidatePolicies,
            Validate,
            Deny(vec![r#""ens1f0#0-1,4": VF 4 is beyond numVfs 4"#]),
        ),
        case(
            "policy-reject-bad-resource-name.json",
            ValidatePolicies,
            Validate,
            Deny(vec![r#"spec.resourceName "fast lane""#, "' ' is not allowed"]),
        ),
        case(
            "policy-reject-resource-name-too-long.json",
            ValidatePolicies,
            Validate,
            Deny(vec!["spec.resourceName", "64 characters; at most 63"]),
        ),
        case(
            "policy-reject-num-vfs-above-total-vfs.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "spec.numVfs: numVfs 8 is more than node worker-1 PF 0000:3b:00.0 (ens1f0) offers (totalVfs 7)",
            ]),
        ),
        case(
            "policy-reject-malformed-pf-names.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "3 problems",
                r##"spec.nicSelector.pfNames[0]: pfNames entry "#0-3" has no interface name"##,
                "spec.nicSelector.pfNames[1]: ",
                "runs backwards",
                r#"spec.nicSelector.pfNames[2]: pfNames entry "ens1f2#x": vfRange part "x" is not N or N-M"#,
            ]),
        ),
        case(
            "policy-reject-malformed-pci-address.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "2 problems",
                r#"spec.nicSelector.pciAddresses[1]: invalid PCI address "0000:3b:00""#,
                r#"spec.nicSelector.pciAddresses[2]: invalid PCI address "3b:00.1""#,
            ]),
        ),
        case(
            "policy-reject-duplicate-pci-address.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                r#"spec.nicSelector.pciAddresses[1] "0000:3B:00.0" names PF 0000:3b:00.0 again (already pciAddresses[0])"#,
            ]),
        ),
        case(
            "policy-reject-unparseable-profile-quantity.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                r#"spec.containerProfile.cpu: "two" is not a Kubernetes quantity"#,
                r#"spec.containerProfile.memory: "1GB" is not a Kubernetes quantity: unknown suffix"#,
            ]),
        ),
        case(
            "policy-reject-not-a-vfpolicy-spec.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "the VfPolicy does not fit its schema",
                r#"invalid type: string "eight", expected u16"#,
            ]),
        ),
        case(
            "policy-reject-unknown-field.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "the VfPolicy does not fit its schema",
                "unknown field `numvfs`",
            ]),
        ),
        case(
            "policy-reject-many-problems.json",
            ValidatePolicies,
            Validate,
            Deny(vec![
                "5 problems",
                r#"spec.resourceName "-fast""#,
                r#""ens1f0#3-9": VF 8-9 is beyond numVfs 8"#,
                "spec.nicSelector.pfNames[2]: ",
                "overlap: both take VF 3 of ens1f0",
                "numVfs 8 is more than node worker-1 PF 0000:3b:00.0 (ens1f0) offers (totalVfs 7)",
            ]),
        ),
        case(
            "policy-allow-valid.json",
            ValidatePods,
            Validate,
            Deny(vec!["this webhook endpoint admits Pod objects, not VfPolicy"]),
        ),
        // Pods: allowed as they are, in every mode.
        case(
            "pod-allow-no-vfplane-resource.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case("pod-allow-no-vfplane-resource.json", MutatePods, Mutate, Allow),
        case(
            "pod-allow-pool-without-profile.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case("pod-allow-pool-without-profile.json", MutatePods, Mutate, Allow),
        case(
            "pod-allow-profile-without-limits.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case("pod-allow-limits-set.json", ValidatePods, Validate, Allow),
        // The pool's profile is numaAligned, which the runtime applies:
        // the container is marked as needing vfplane's NRI plugin.
        case(
            "pod-allow-limits-set.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/metadata/annotations", "value": {"required-plugins.noderesource.dev/container.dpdk": "[\"vfplane\"]"}},
            ])),
        ),
        case(
            "pod-allow-limits-above-in-other-units.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case(
            "pod-allow-hugepages-1gi-pages.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case(
            "pod-allow-update-without-limits.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case("pod-allow-subresource.json", ValidatePods, Validate, Allow),
        // In-place resize: checked like a new pod in both modes, never mended.
        case(
            "pod-allow-resize-within-profile.json",
            ValidatePods,
            Validate,
            Allow,
        ),
        case("pod-allow-resize-within-profile.json", MutatePods, Mutate, Allow),
        case(
            "pod-reject-resize-below-profile.json",
            ValidatePods,
            Validate,
            Deny(vec![
                "pod resize refused",
                r#"resources.limits.memory of at least "1Gi"; it has "512Mi""#,
            ]),
        ),
        case(
            "pod-reject-resize-below-profile.json",
            MutatePods,
            Mutate,
            Deny(vec![
                "pod resize refused",
                r#"resources.limits.memory of at least "1Gi"; it has "512Mi""#,
            ]),
        ),
        // Pods: refused in validate mode.
        case(
            "pod-reject-missing-limits.json",
            ValidatePods,
            Validate,
            Deny(vec![fast_missing]),
        ),
        case(
            "pod-reject-missing-limits.json",
            MutatePods,
            Validate,
            Deny(vec![fast_missing]),
        ),
        case(
            "pod-reject-missing-limits.json",
            ValidatePods,
            Mutate,
            Deny(vec![fast_missing]),
        ),
        case(
            "pod-reject-missing-memory-limit.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "dpdk" asks for vfplane.io/fast, whose policy requires limits: add resources.limits.memory (at least "1Gi")"#,
            ]),
        ),
        case(
            "pod-reject-missing-hugepages-limit.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "dpdk" asks for vfplane.io/huge, whose policy requires limits: add resources.limits.hugepages-2Mi or resources.limits.hugepages-1Gi (at least "1Gi")"#,
            ]),
        ),
        case(
            "pod-reject-cpu-limit-too-low.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "dpdk" asks for vfplane.io/fast, whose policy requires resources.limits.cpu of at least "2"; it has "1500m", which is less"#,
            ]),
        ),
        case(
            "pod-reject-memory-limit-too-low.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"resources.limits.memory of at least "1Gi"; it has "512Mi""#,
            ]),
        ),
        case(
            "pod-reject-memory-limit-1g-below-1gi.json",
            ValidatePods,
            Validate,
            Deny(vec![r#"resources.limits.memory of at least "1Gi"; it has "1G""#]),
        ),
        case(
            "pod-reject-hugepages-limit-too-low.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"resources.limits.hugepages-* (summed over page sizes) of at least "1Gi"; it has "512Mi""#,
            ]),
        ),
        case(
            "pod-reject-unparseable-limit.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "dpdk": resources.limits.memory: "1GB" is not a Kubernetes quantity: unknown suffix"#,
            ]),
        ),
        case(
            "pod-reject-init-container-missing-limits.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "setup" asks for vfplane.io/fast, whose policy requires limits: add resources.limits.cpu (at least "2")"#,
            ]),
        ),
        case(
            "pod-reject-numa-aligned-missing-limits.json",
            ValidatePods,
            Validate,
            Deny(vec![
                r#"container "dpdk" asks for vfplane.io/numa, whose policy requires limits: add resources.limits.cpu and resources.limits.memory"#,
            ]),
        ),
        case(
            "pod-reject-two-containers.json",
            ValidatePods,
            Validate,
            Deny(vec![
                "2 problems",
                r#"container "rx" asks for vfplane.io/fast, whose policy requires limits: add resources.limits.cpu (at least "2") and resources.limits.memory (at least "1Gi")"#,
                r#"container "tx" asks for vfplane.io/fast, whose policy requires resources.limits.cpu of at least "2"; it has "1""#,
            ]),
        ),
        // Pods: completed in mutate mode.
        case(
            "pod-mutate-adds-limits-and-requests.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/spec/containers/1/resources/limits/cpu", "value": "2"},
                {"op": "add", "path": "/spec/containers/1/resources/limits/memory", "value": "1Gi"},
                {"op": "add", "path": "/spec/containers/1/resources/requests/cpu", "value": "2"},
                {"op": "add", "path": "/spec/containers/1/resources/requests/memory", "value": "1Gi"},
                {"op": "add", "path": "/metadata/annotations", "value": {"required-plugins.noderesource.dev/container.dpdk": "[\"vfplane\"]"}},
            ])),
        ),
        case(
            "pod-mutate-adds-limits-and-requests.json",
            ValidatePods,
            Mutate,
            Deny(vec!["add resources.limits.cpu"]),
        ),
        case(
            "pod-mutate-adds-limits-and-requests.json",
            MutatePods,
            Validate,
            Deny(vec!["add resources.limits.cpu"]),
        ),
        case(
            "pod-mutate-adds-limits-map.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/spec/containers/0/resources/limits", "value": {"cpu": "2", "memory": "1Gi"}},
                {"op": "add", "path": "/spec/containers/0/resources/requests/cpu", "value": "2"},
                {"op": "add", "path": "/spec/containers/0/resources/requests/memory", "value": "1Gi"},
                {"op": "add", "path": "/metadata/annotations", "value": {"required-plugins.noderesource.dev/container.dpdk": "[\"vfplane\"]"}},
            ])),
        ),
        case(
            "pod-mutate-adds-hugepages.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/spec/containers/0/resources/limits/hugepages-2Mi", "value": "1Gi"},
                {"op": "add", "path": "/spec/containers/0/resources/limits/memory", "value": "512Mi"},
                {"op": "add", "path": "/spec/containers/0/resources/requests/hugepages-2Mi", "value": "1Gi"},
                {"op": "add", "path": "/spec/containers/0/resources/requests/memory", "value": "512Mi"},
            ])),
        ),
        case(
            "pod-mutate-keeps-higher-request.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/spec/containers/0/resources/limits/cpu", "value": "4"},
                {"op": "add", "path": "/spec/containers/0/resources/limits/memory", "value": "1Gi"},
                {"op": "add", "path": "/spec/containers/0/resources/requests/memory", "value": "1Gi"},
                {"op": "add", "path": "/metadata/annotations", "value": {"required-plugins.noderesource.dev/container.dpdk": "[\"vfplane\"]"}},
            ])),
        ),
        case(
            "pod-mutate-reject-limit-too-low.json",
            MutatePods,
            Mutate,
            Deny(vec![
                r#"resources.limits.cpu of at least "2"; it has "1", which is less"#,
            ]),
        ),
        case(
            "pod-mutate-reject-numa-aligned-without-values.json",
            MutatePods,
            Mutate,
            Deny(vec!["add resources.limits.cpu and resources.limits.memory"]),
        ),
        // Pods: NRI's required-plugins annotation (mutating endpoint, both
        // modes; never on the validating one, which cannot patch).
        case(
            "pod-nri-annotation-added.json",
            MutatePods,
            Validate,
            Patch(json!([
                {"op": "add", "path": "/metadata/annotations", "value": {"required-plugins.noderesource.dev/container.dpdk": "[\"vfplane\"]"}},
            ])),
        ),
        case("pod-nri-annotation-added.json", ValidatePods, Validate, Allow),
        case(
            "pod-nri-annotation-merged.json",
            MutatePods,
            Mutate,
            Patch(json!([
                {"op": "add", "path": "/metadata/annotations/required-plugins.noderesource.dev~1container.dpdk", "value": "[\"10-topology-aware\",\"vfplane\"]"},
            ])),
        ),
        case("pod-nri-annotation-kept.json", MutatePods, Validate, Allow),
        case(
            "pod-nri-annotation-garbage.json",
            MutatePods,
            Validate,
            Deny(vec![
                r#"annotation required-plugins.noderesource.dev/container.dpdk: "{vfplane: yes}" is not a list of NRI plugin names"#,
            ]),
        ),
        // Not an AdmissionReview request: HTTP 400.
        case(
            "bad-not-json.txt",
            ValidatePods,
            Validate,
            BadRequest("not an AdmissionReview"),
        ),
        case(
            "bad-not-an-admission-review.json",
            ValidatePolicies,
            Validate,
            BadRequest("not an admission.k8s.io AdmissionReview"),
        ),
        case(
            "bad-no-request.json",
            ValidatePods,
            Validate,
            BadRequest("has no request"),
        ),
        case(
            "bad-request-missing-uid.json",
            MutatePods,
            Mutate,
            BadRequest("missing field `uid`"),
        ),
    ]
}

/// Applies the `add` operations of a JSONPatch (all the webhook emits).
fn apply_adds(mut doc: Value, patch: &Value) -> Value {
    for op in patch.as_array().unwrap() {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let key = last.replace("~1", "/").replace("~0", "~");
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("{path}: no parent"));
        target.as_object_mut().unwrap().insert(key, op["value"].clone());
    }
    doc
}

#[test]
fn every_fixture_gives_its_expected_outcome() {
    let view = FakeCluster::new();
    let mut failures = Vec::new();
    for case in cases() {
        let body = std::fs::read(fixtures().join(case.file)).unwrap();
        let label = format!("{} at {} ({:?})", case.file, case.endpoint.path(), case.mode);
        let result = review(case.endpoint, &body, &view, case.mode, &PodClaims::default());
        let review = match (&case.expect, result) {
            (Expect::BadRequest(words), Err(WebhookError::BadRequest(message))) => {
                if !message.contains(words) {
                    failures.push(format!("{label}: 400 message {message:?} lacks {words:?}"));
                }
                continue;
            }
            (_, Err(error)) => {
                failures.push(format!("{label}: unexpected error {error}"));
                continue;
            }
            (Expect::BadRequest(_), Ok(review)) => {
                failures.push(format!("{label}: expected 400, got {:?}", review.response));
                continue;
            }
            (_, Ok(review)) => review,
        };
        // The response echoes the request's uid and apiVersion.
        let request: Value = serde_json::from_slice(&body).unwrap();
        let answer = serde_json::to_value(&review).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{label}");
        assert_eq!(answer["kind"], "AdmissionReview", "{label}");
        assert_eq!(answer["response"]["uid"], request["request"]["uid"], "{label}");
        assert!(answer.get("request").is_none(), "{label}");
        let response = review.response.unwrap();
        let patch: Option<Value> = response
            .patch
            .as_ref()
            .map(|p| serde_json::from_slice(p).unwrap());
        match &case.expect {
            Expect::Allow => {
                if !response.allowed || patch.is_some() {
                    failures.push(format!(
                        "{label}: expected a plain allow, got allowed={} message={:?} patch={patch:?}",
                        response.allowed, response.result.message
                    ));
                }
            }
            Expect::Patch(expected) => {
                if !response.allowed || patch.as_ref() != Some(expected) {
                    failures.push(format!(
                        "{label}: expected patch {expected}, got allowed={} message={:?} patch={patch:?}",
                        response.allowed, response.result.message
                    ));
                    continue;
                }
                assert_eq!(answer["response"]["patchType"], "JSONPatch", "{label}");
                // The completed pod passes the validating endpoint.
                let mut again = request.clone();
                again["request"]["object"] = apply_adds(request["request"]["object"].clone(), expected);
                let body = serde_json::to_vec(&again).unwrap();
                let checked = vfplane_controller::webhook::review(
                    Endpoint::ValidatePods,
                    &body,
                    &view,
                    PodMode::Validate,
                    &PodClaims::default(),
                )
                .unwrap()
                .response
                .unwrap();
                if !checked.allowed {
                    failures.push(format!(
                        "{label}: the patched pod is still refused: {}",
                        checked.result.message
                    ));
                }
            }
            Expect::Deny(words) => {
                let message = &response.result.message;
                if response.allowed || patch.is_some() {
                    failures.push(format!(
                        "{label}: expected a refusal, got allowed={} patch={patch:?}",
                        response.allowed
                    ));
                }
                for word in words {
                    if !message.contains(word) {
                        failures.push(format!("{label}: message {message:?} lacks {word:?}"));
                    }
                }
            }
            Expect::BadRequest(_) => unreachable!(),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_fixture_file_has_a_case() {
    let used: BTreeSet<&str> = cases().iter().map(|c| c.file).collect();
    let present: BTreeSet<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    let unused: Vec<&String> = present.iter().filter(|f| !used.contains(f.as_str())).collect();
    let missing: Vec<&&str> = used.iter().filter(|f| !present.contains(**f)).collect();
    assert!(unused.is_empty(), "fixtures without a case: {unused:?}");
    assert!(missing.is_empty(), "cases without a fixture: {missing:?}");
}

#[test]
fn numa_aligned_pool_with_lower_request_warns_about_qos() {
    let view = FakeCluster::new();
    let mut request: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pod-mutate-adds-limits-map.json")).unwrap())
            .unwrap();
    request["request"]["object"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("1");
    let body = serde_json::to_vec(&request).unwrap();
    let response = review(
        Endpoint::MutatePods,
        &body,
        &view,
        PodMode::Mutate,
        &PodClaims::default(),
    )
    .unwrap()
    .response
    .unwrap();
    assert!(response.allowed, "{}", response.result.message);
    let warnings = response.warnings.unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Guaranteed QoS") && w.contains("\"dpdk\"")),
        "{warnings:?}"
    );
}

// --- HTTPS ---------------------------------------------------------------

fn tls_fixture(name: &str) -> PathBuf {
    fixtures().join("tls").join(name)
}

fn cert_der(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(tls_fixture(name)).unwrap()
}

fn install_pair(dir: &Path, n: u8) {
    // Key first, then certificate: a reload between the two sees a mismatch
    // and keeps the old pair until the next period.
    std::fs::copy(tls_fixture(&format!("key{n}.pem")), dir.join("tls.key")).unwrap();
    std::fs::copy(tls_fixture(&format!("cert{n}.pem")), dir.join("tls.crt")).unwrap();
}

struct Reply {
    status: u16,
    body: Vec<u8>,
    server_cert: CertificateDer<'static>,
}

/// A TLS connection to the webhook on `port`, trusting both fixture pairs.
async fn tls_connect(port: u16) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der("cert1.pem")).unwrap();
    roots.add(cert_der("cert2.pem")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

async fn https(port: u16, method: &str, path: &str, body: Vec<u8>) -> Reply {
    let tls = tls_connect(port).await;
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        body,
        server_cert,
    }
}

/// A webhook server on a free port of 127.0.0.1 with the first fixture
/// pair in `dir`, reloading every `period`.
struct Server {
    port: u16,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), vfplane_controller::webhook::WebhookError>>,
}

impl Server {
    async fn start(dir: &Path, period: Duration) -> Self {
        install_pair(dir, 1);
        let files = TlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_on(
            listener,
            files,
            Arc::new(FakeCluster::new()),
            PodMode::Mutate,
            None,
            period,
            async {
                let _ = stopped.await;
            },
        ));
        Self { port, stop, task }
    }

    /// Stops the server and checks that it stopped cleanly.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// A pod review the webhook answers with 200 (and a denial).
async fn good_review(port: u16) {
    let body = std::fs::read(fixtures().join("pod-reject-missing-limits.json")).unwrap();
    let reply = https(port, "POST", "/validate/pods", body).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_server_answers_refuses_garbage_and_reloads_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let period = Duration::from_millis(100);
    let server = Server::start(dir.path(), period).await;
    let port = server.port;

    // A valid review: 200, uid echoed.
    let body = std::fs::read(fixtures().join("pod-reject-missing-limits.json")).unwrap();
    let request: Value = serde_json::from_slice(&body).unwrap();
    let reply = https(port, "POST", "/validate/pods", body).await;
    assert_eq!(reply.status, 200, "{}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.server_cert, cert_der("cert1.pem"));
    let answer: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(answer["response"]["uid"], request["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], false);

    // The mutating path in mutate mode patches.
    let body = std::fs::read(fixtures().join("pod-mutate-adds-limits-and-requests.json")).unwrap();
    let reply = https(port, "POST", "/mutate/pods", body).await;
    assert_eq!(reply.status, 200);
    let answer: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");

    // Garbage: 400 with a message; wrong path: 404; wrong method: 405.
    let reply = https(port, "POST", "/validate/vfpolicies", b"\x00garbage{".to_vec()).await;
    assert_eq!(reply.status, 400);
    assert!(String::from_utf8_lossy(&reply.body).contains("not an AdmissionReview"));
    let reply = https(port, "POST", "/validate/nodes", b"{}".to_vec()).await;
    assert_eq!(reply.status, 404);
    let reply = https(port, "GET", "/validate/pods", Vec::new()).await;
    assert_eq!(reply.status, 405);

    // A broken certificate file is not taken: the old pair keeps serving.
    std::fs::write(dir.path().join("tls.crt"), "not a certificate\n").unwrap();
    tokio::time::sleep(period * 3).await;
    let reply = https(port, "POST", "/validate/pods", Vec::new()).await;
    assert_eq!(reply.server_cert, cert_der("cert1.pem"));

    // Rotation: the new pair is presented within a few reload periods.
    install_pair(dir.path(), 2);
    let started = Instant::now();
    loop {
        let reply = https(port, "POST", "/validate/pods", Vec::new()).await;
        if reply.server_cert == cert_der("cert2.pem") {
            break;
        }
        assert!(
            started.elapsed() < period * 30,
            "the rotated certificate was not served after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(period / 4).await;
    }

    server.stop().await;
}

/// Clients that send too much, too little or nothing at all: each is
/// refused or left to its own connection, the server keeps answering, and
/// it stops cleanly after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_server_survives_huge_truncated_plaintext_and_stalled_clients() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(10)).await;
    let port = server.port;
    good_review(port).await;

    // Over the body limit: 413, and the next review is answered.
    let huge = vec![b' '; vfplane_controller::webhook::MAX_BODY_BYTES + 1];
    let reply = https(port, "POST", "/validate/pods", huge).await;
    assert_eq!(reply.status, 413);
    good_review(port).await;

    // A body cut short: the client promises 100 kB, sends a few bytes and
    // closes.
    let mut tls = tls_connect(port).await;
    tls.write_all(
        b"POST /validate/pods HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"apiVersion\":",
    )
    .await
    .unwrap();
    tls.shutdown().await.unwrap();
    drop(tls);
    good_review(port).await;

    // Not TLS at all: the handshake fails and the connection is closed.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff garbage")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a plaintext client was never hung up on");
    good_review(port).await;

    // Stalled clients held open while others are served: TCP connections
    // that never start TLS, TLS connections that stop halfway through the
    // headers, and one that stops halfway through its body.
    let mut stalled_tcp = Vec::new();
    for _ in 0..32 {
        stalled_tcp.push(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut stalled_tls = Vec::new();
    for _ in 0..8 {
        let mut tls = tls_connect(port).await;
        tls.write_all(b"POST /validate/pods HTTP/1.1\r\nhost: loc")
            .await
            .unwrap();
        tls.flush().await.unwrap();
        stalled_tls.push(tls);
    }
    let mut stalled_body = tls_connect(port).await;
    stalled_body
        .write_all(b"POST /validate/pods HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .unwrap();
    stalled_body.flush().await.unwrap();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(15), good_review(port))
            .await
            .expect("a review was not answered while stalled clients were connected");
    }

    // Shutdown is not held up by them either (the drain gives up on them).
    drop(stalled_tcp);
    server.stop().await;
    drop((stalled_tls, stalled_body));
}

#[tokio::test]
async fn serve_refuses_a_key_that_does_not_fit_the_certificate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tls_fixture("cert1.pem"), dir.path().join("tls.crt")).unwrap();
    std::fs::copy(tls_fixture("key2.pem"), dir.path().join("tls.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
    };
    let error = serve_on(
        listener,
        files,
        Arc::new(FakeCluster::new()),
        PodMode::Validate,
        None,
        Duration::from_secs(10),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, WebhookError::KeyPair { .. }), "{error}");
    let missing = TlsFiles {
        cert: dir.path().join("missing.crt"),
        key: dir.path().join("tls.key"),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = serve_on(
        listener,
        missing,
        Arc::new(FakeCluster::new()),
        PodMode::Validate,
        None,
        Duration::from_secs(10),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("missing.crt"), "{error}");
}

#[test]
fn truncated_and_mangled_bodies_never_panic() {
    let view = FakeCluster::new();
    for case in cases() {
        let body = std::fs::read(fixtures().join(case.file)).unwrap();
        // No strict prefix of a JSON document is one: every body cut before
        // the document's last character (trailing whitespace aside) is a
        // bad request that says the body is not an AdmissionReview.
        let end = body.trim_ascii_end().len();
        for cut in (0..end).step_by(37).chain([end - 1]) {
            for endpoint in Endpoint::ALL {
                match review(
                    endpoint,
                    &body[..cut],
                    &view,
                    PodMode::Mutate,
                    &PodClaims::default(),
                ) {
                    Err(WebhookError::BadRequest(message)) => assert!(
                        message.starts_with("the request body is not an AdmissionReview"),
                        "{}: cut at {cut}: {message}",
                        case.file
                    ),
                    other => panic!("{}: cut at {cut}: {other:?}", case.file),
                }
            }
        }
        // A mangled body is answered (a review with the request's uid) or
        // refused as a bad request; nothing else, and no panic.
        let text = String::from_utf8_lossy(&body);
        // (Some fixtures are not JSON at all: they have no uid to answer.)
        let uid = serde_json::from_slice::<Value>(&body)
            .map(|v| v["request"]["uid"].clone())
            .unwrap_or(Value::Null);
        for (from, to) in [
            ("\"1\"", "null"),
            ("\"2\"", "2"),
            ("{", "["),
            ("\"CREATE\"", "\"create\""),
        ] {
            let mangled = text.replacen(from, to, 1);
            for endpoint in Endpoint::ALL {
                match review(
                    endpoint,
                    mangled.as_bytes(),
                    &view,
                    PodMode::Mutate,
                    &PodClaims::default(),
                ) {
                    Ok(answer) => {
                        let answer = serde_json::to_value(&answer).unwrap();
                        assert_eq!(answer["response"]["uid"], uid, "{}: {from} -> {to}", case.file);
                    }
                    Err(WebhookError::BadRequest(message)) => {
                        assert!(!message.is_empty(), "{}: {from} -> {to}", case.file);
                    }
                    Err(other) => panic!("{}: {from} -> {to}: {other}", case.file),
                }
            }
        }
    }
}

/// A pod whose container `dpdk` uses its claim `vfs` (and asks for no
/// `vfplane.io/` resource), with no limits.
fn claim_pod_review() -> Vec<u8> {
    let mut request: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pod-reject-missing-limits.json")).unwrap())
            .unwrap();
    let pod = &mut request["request"]["object"]["spec"];
    pod["resourceClaims"] = json!([{"name": "vfs", "resourceClaimTemplateName": "one-vf"}]);
    pod["containers"][1]["resources"] = json!({"claims": [{"name": "vfs"}]});
    serde_json::to_vec(&request).unwrap()
}

#[test]
fn a_container_using_a_claim_for_a_pools_vfs_is_checked_against_that_pools_profile() {
    let view = FakeCluster::new();
    let body = claim_pod_review();
    let decide = |claims: PodClaims, mode: PodMode, endpoint: Endpoint| {
        review(endpoint, &body, &view, mode, &claims)
            .unwrap()
            .response
            .unwrap()
    };
    let of = |vfs: ClaimVfs| PodClaims([("vfs".to_owned(), vfs)].into());
    let fast = |profile: Option<ContainerProfile>| ClaimVfs::Pools {
        pools: ["fast".to_owned()].into(),
        profile,
    };

    let refused = decide(of(fast(None)), PodMode::Validate, Endpoint::ValidatePods);
    assert!(!refused.allowed);
    assert!(
        refused.result.message.contains(
            "container \"dpdk\" asks for VFs of pool fast through claim \"vfs\", whose policy requires limits: add \
             resources.limits.cpu (at least \"2\") and resources.limits.memory (at least \"1Gi\")"
        ),
        "{}",
        refused.result.message
    );

    // Mutate mode fills them in, as for `vfplane.io/fast`.
    let mended = decide(of(fast(None)), PodMode::Mutate, Endpoint::MutatePods);
    assert!(mended.allowed, "{}", mended.result.message);
    let patch = serde_json::to_string(&mended.patch.map(|p| String::from_utf8(p).unwrap())).unwrap();
    assert!(patch.contains("/spec/containers/1/resources/limits"), "{patch}");

    // A claim for any DRA pool is checked against each (the fake's: huge and numa).
    let any = decide(
        of(ClaimVfs::AnyPool { profile: None }),
        PodMode::Validate,
        Endpoint::ValidatePods,
    );
    assert!(!any.allowed);
    assert!(
        any.result
            .message
            .contains("VFs of any DRA pool (so of huge) through claim \"vfs\""),
        "{}",
        any.result.message
    );

    // A claim whose VfConfig asks more memory than the pool's profile: the
    // strictest of both; its bad VfConfig refuses the pod.
    let stricter = decide(
        of(fast(Some(ContainerProfile {
            memory: Some("4Gi".to_owned()),
            ..ContainerProfile::default()
        }))),
        PodMode::Validate,
        Endpoint::ValidatePods,
    );
    assert!(!stricter.allowed);
    assert!(
        stricter.result.message.contains(
            "container \"dpdk\" asks for VFs of pool fast through claim \"vfs\", whose policy and claim require \
             limits: add resources.limits.cpu (at least \"2\") and resources.limits.memory (at least \"4Gi\")"
        ),
        "{}",
        stricter.result.message
    );
    let bad = decide(
        of(ClaimVfs::BadConfig(
            "config[0] is not a VfConfig vfplane takes: containerProfile.memory: lots".to_owned(),
        )),
        PodMode::Mutate,
        Endpoint::MutatePods,
    );
    assert!(!bad.allowed);
    assert!(
        bad.result
            .message
            .contains("container \"dpdk\" uses claim \"vfs\": config[0] is not a VfConfig vfplane takes"),
        "{}",
        bad.result.message
    );

    // Not ours, or not readable: admitted; the latter with a warning.
    let other = decide(PodClaims::default(), PodMode::Validate, Endpoint::ValidatePods);
    assert!(other.allowed, "{}", other.result.message);
    assert!(other.warnings.unwrap_or_default().is_empty());
    let unread = decide(
        of(ClaimVfs::Unread(
            "cannot read ResourceClaimTemplate telco/one-vf: NotFound".to_owned(),
        )),
        PodMode::Validate,
        Endpoint::ValidatePods,
    );
    assert!(unread.allowed, "{}", unread.result.message);
    let warnings = unread.warnings.unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("uses claim \"vfs\": cannot read ResourceClaimTemplate telco/one-vf")),
        "{warnings:?}"
    );
}
