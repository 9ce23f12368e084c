//! The Helm chart, rendered by the real helm (`xtask::helm`, pinned) for
//! several value sets: `helm lint --strict` passes, every manifest parses into
//! its Kubernetes type without a field lost on the way (a misplaced or
//! misspelt field fails), and the rendered objects have the properties the
//! design asks for: host paths, privileges, RBAC, webhooks, certificates.
//!
//! The first run builds helm from its Go module (see DEVELOPERS.md); later
//! runs use the copy in the project's cache outside the work tree.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::flowcontrol::v1::FlowSchema;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::api::resource::v1::DeviceClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use xtask::helm::{self, RELEASE_NAMESPACE, RenderedCase};

const NS: &str = RELEASE_NAMESPACE;
const SVC: &str = "vfplane-controller";

/// Every object the chart may render, by kind.
#[derive(Debug)]
enum Object {
    Deployment(Box<Deployment>),
    DaemonSet(Box<DaemonSet>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    Service(Box<Service>),
    Secret(Box<Secret>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    Validating(Box<ValidatingWebhookConfiguration>),
    Mutating(Box<MutatingWebhookConfiguration>),
    Crd(Box<CustomResourceDefinition>),
    DeviceClass(Box<DeviceClass>),
    FlowSchema(Box<FlowSchema>),
    /// cert-manager.io/v1 Issuer or Certificate (no k8s-openapi type).
    CertManager(Value),
    /// monitoring.coreos.com/v1 ServiceMonitor or PodMonitor (no k8s-openapi type).
    Monitoring(Value),
}

/// A closure taking one kind out of an [`Object`].
macro_rules! pick {
    ($variant:path) => {
        |o| match o {
            $variant(x) => Some(&**x),
            _ => None,
        }
    };
}

/// One case's objects.
#[derive(Debug)]
struct Rendered {
    name: &'static str,
    objects: Vec<Object>,
}

/// Whether the chart tests run: helm is in the project's cache, or
/// `cargo xtask test` asks for every end-to-end test (helm is built from
/// its Go module then).
fn helm_runs(test: &str) -> bool {
    let cached = helm::cached_helm(&xtask::testbed::workspace_root()).is_some();
    cached || xtask::e2e::enabled(test, "helm, built from its Go module (Go and the module proxy)")
}

/// Renders every case once per test binary (helm is built on first use).
/// A failure is kept too, so every test reports it without rendering again.
fn rendered() -> &'static [Rendered] {
    static RENDERED: OnceLock<Result<Vec<Rendered>, String>> = OnceLock::new();
    let result = RENDERED.get_or_init(|| {
        let workspace = xtask::testbed::workspace_root();
        let helm = helm::ensure_helm(&workspace).map_err(|e| format!("getting helm: {e:#}"))?;
        let cases =
            helm::lint_and_template(&workspace, &helm).map_err(|e| format!("helm lint/template: {e:#}"))?;
        std::panic::catch_unwind(|| cases.iter().map(parse_case).collect()).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "parsing the rendered chart panicked".to_owned())
        })
    });
    match result {
        Ok(rendered) => rendered,
        Err(e) => panic!("{e}"),
    }
}

fn case(name: &str) -> &'static Rendered {
    rendered()
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no rendered case {name}"))
}

fn parse_case(rendered: &RenderedCase) -> Rendered {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&rendered.yaml).enumerate() {
        let yaml: serde_yaml::Value = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("case {}: document {i} is not YAML: {e}", rendered.case.name));
        if yaml.is_null() {
            continue; // a document holding only helm's "# Source:" comment
        }
        let json = serde_json::to_value(&yaml).expect("YAML to JSON");
        let what = format!(
            "case {}, document {i} ({} {})",
            rendered.case.name, json["kind"], json["metadata"]["name"]
        );
        objects.push(parse_object(json, &what));
    }
    assert!(
        !objects.is_empty(),
        "case {} rendered nothing",
        rendered.case.name
    );
    Rendered {
        name: rendered.case.name,
        objects,
    }
}

fn parse_object(json: Value, what: &str) -> Object {
    let api_version = json["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = json["kind"].as_str().unwrap_or_default().to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("apps/v1", "Deployment") => Object::Deployment(strict(json, what)),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(strict(json, what)),
        ("v1", "ServiceAccount") => Object::ServiceAccount(strict(json, what)),
        ("v1", "Service") => Object::Service(strict(json, what)),
        ("v1", "Secret") => Object::Secret(strict(json, what)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(strict(json, what)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            Object::ClusterRoleBinding(strict(json, what))
        }
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(strict(json, what)),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(strict(json, what)),
        ("policy/v1", "PodDisruptionBudget") => Object::PodDisruptionBudget(strict(json, what)),
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
            Object::Validating(strict(json, what))
        }
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            Object::Mutating(strict(json, what))
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => Object::Crd(strict(json, what)),
        ("resource.k8s.io/v1", "DeviceClass") => Object::DeviceClass(strict(json, what)),
        ("flowcontrol.apiserver.k8s.io/v1", "FlowSchema") => Object::FlowSchema(strict(json, what)),
        ("cert-manager.io/v1", "Issuer" | "Certificate") => {
            check_cert_manager(&json, what);
            Object::CertManager(json)
        }
        ("monitoring.coreos.com/v1", "ServiceMonitor" | "PodMonitor") => {
            check_monitor(&json, what);
            Object::Monitoring(json)
        }
        _ => panic!("{what}: unexpected kind {kind} of {api_version}: the test must learn it"),
    }
}

/// Parses into `T`, then serializes back: every field of the manifest must
/// survive, so a field the type does not know (misspelt, misplaced, wrong
/// level) fails instead of being silently dropped as the API server would.
fn strict<T: DeserializeOwned + Serialize>(json: Value, what: &str) -> Box<T> {
    let typed: T = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let back = serde_json::to_value(&typed).expect("serialize back");
    let mut lost = Vec::new();
    diff(&json, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{what}: fields not in the Kubernetes type or changed by it: {lost:?}"
    );
    Box::new(typed)
}

fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                match b.get(k) {
                    Some(vb) => diff(va, vb, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k} (added)"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} became {b}")),
    }
}

fn check_cert_manager(json: &Value, what: &str) {
    let spec = json["spec"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no spec"));
    assert_eq!(json["metadata"]["namespace"], NS, "{what}: namespace");
    match json["kind"].as_str() {
        Some("Issuer") => {
            let keys: Vec<_> = spec.keys().map(String::as_str).collect();
            assert!(
                keys == ["selfSigned"] || keys == ["ca"],
                "{what}: an Issuer is selfSigned or ca: {keys:?}"
            );
            if let Some(ca) = spec.get("ca") {
                assert!(ca["secretName"].is_string(), "{what}: ca.secretName");
            }
        }
        _ => {
            for key in spec.keys() {
                assert!(
                    [
                        "secretName",
                        "isCA",
                        "commonName",
                        "dnsNames",
                        "duration",
                        "usages",
                        "privateKey",
                        "issuerRef"
                    ]
                    .contains(&key.as_str()),
                    "{what}: unknown Certificate field {key}"
                );
            }
            assert!(spec["secretName"].is_string(), "{what}: secretName");
            assert_eq!(spec["issuerRef"]["kind"], "Issuer", "{what}: issuerRef.kind");
            assert_eq!(
                spec["issuerRef"]["group"], "cert-manager.io",
                "{what}: issuerRef.group"
            );
            assert!(spec["issuerRef"]["name"].is_string(), "{what}: issuerRef.name");
        }
    }
}

fn check_monitor(json: &Value, what: &str) {
    assert_eq!(json["metadata"]["namespace"], NS, "{what}: namespace");
    // The controller's Service: its metrics; the node pod: the device
    // plugin's and the agent's.
    let (endpoints, ports) = match json["kind"].as_str() {
        Some("ServiceMonitor") => (&json["spec"]["endpoints"], &["metrics"][..]),
        _ => (
            &json["spec"]["podMetricsEndpoints"],
            &["metrics", "agent-metrics"][..],
        ),
    };
    let endpoints = endpoints
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no endpoints"));
    assert_eq!(
        endpoints
            .iter()
            .map(|e| e["port"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ports,
        "{what}: endpoint ports"
    );
    for endpoint in endpoints {
        assert_eq!(endpoint["path"], "/metrics", "{what}: path");
    }
    assert!(
        json["spec"]["selector"]["matchLabels"].is_object(),
        "{what}: selector"
    );
}

// ----- accessors -----

impl Rendered {
    fn kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for o in &self.objects {
            let kind = match o {
                Object::Deployment(_) => "Deployment",
                Object::DaemonSet(_) => "DaemonSet",
                Object::ServiceAccount(_) => "ServiceAccount",
                Object::ClusterRole(_) => "ClusterRole",
                Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
                Object::Role(_) => "Role",
                Object::RoleBinding(_) => "RoleBinding",
                Object::Service(_) => "Service",
                Object::Secret(_) => "Secret",
                Object::PodDisruptionBudget(_) => "PodDisruptionBudget",
                Object::Validating(_) => "ValidatingWebhookConfiguration",
                Object::Mutating(_) => "MutatingWebhookConfiguration",
                Object::Crd(_) => "CustomResourceDefinition",
                Object::DeviceClass(_) => "DeviceClass",
                Object::FlowSchema(_) => "FlowSchema",
                Object::CertManager(v) | Object::Monitoring(v) => match v["kind"].as_str() {
                    Some("Issuer") => "Issuer",
                    Some("Certificate") => "Certificate",
                    Some("ServiceMonitor") => "ServiceMonitor",
                    _ => "PodMonitor",
                },
            };
            *kinds.entry(kind).or_default() += 1;
        }
        kinds
    }

    fn one<'a, T>(&'a self, pick: impl Fn(&'a Object) -> Option<&'a T>, what: &str) -> &'a T {
        let found: Vec<&T> = self.objects.iter().filter_map(pick).collect();
        assert_eq!(found.len(), 1, "case {}: expected one {what}", self.name);
        found[0]
    }

    fn deployment(&self) -> &Deployment {
        self.one(pick!(Object::Deployment), "Deployment")
    }

    fn daemonset(&self) -> &DaemonSet {
        self.one(pick!(Object::DaemonSet), "DaemonSet")
    }

    fn service(&self) -> &Service {
        self.one(pick!(Object::Service), "Service")
    }

    fn secrets(&self) -> Vec<&Secret> {
        self.objects.iter().filter_map(pick!(Object::Secret)).collect()
    }

    fn validating(&self) -> Vec<&ValidatingWebhookConfiguration> {
        self.objects
            .iter()
            .filter_map(pick!(Object::Validating))
            .collect()
    }

    fn mutating(&self) -> Vec<&MutatingWebhookConfiguration> {
        self.objects.iter().filter_map(pick!(Object::Mutating)).collect()
    }

    fn cluster_role(&self, name: &str) -> &ClusterRole {
        self.one(
            |o| match o {
                Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(name) => Some(&**r),
                _ => None,
            },
            &format!("ClusterRole {name}"),
        )
    }

    fn cert_manager(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter_map(|o| match o {
                Object::CertManager(v) if v["kind"] == kind => Some(v),
                _ => None,
            })
            .collect()
    }
}

fn pod_spec_of_deployment(d: &Deployment) -> &PodSpec {
    d.spec.template.spec.as_ref().unwrap()
}

fn pod_spec_of_daemonset(d: &DaemonSet) -> &PodSpec {
    d.spec.template.spec.as_ref().unwrap()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn command_line(c: &Container) -> Vec<String> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect()
}

fn privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

/// Mount path -> (host path, read-only).
fn host_mounts(pod: &PodSpec, c: &Container) -> BTreeMap<String, (String, bool)> {
    let volumes = pod.volumes.as_ref().unwrap();
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let volume = volumes.iter().find(|v| v.name == m.name).unwrap_or_else(|| {
                panic!(
                    "container {} mounts volume {} that the pod does not have",
                    c.name, m.name
                )
            });
            let host = volume.host_path.as_ref()?;
            Some((
                m.mount_path.clone(),
                (host.path.clone(), m.read_only.unwrap_or(false)),
            ))
        })
        .collect()
}

fn env_field_ref(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)?
        .value_from
        .as_ref()?
        .field_ref
        .as_ref()
        .map(|f| f.field_path.clone())
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name)?.value.clone()
}

fn rules_as_set(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut set = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "non-resource URL rule: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    set.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    set
}

fn expected(rights: &[(&str, &str, &[&str])]) -> BTreeSet<(String, String, String)> {
    rights
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |verb| ((*group).to_owned(), (*resource).to_owned(), (*verb).to_owned()))
        })
        .collect()
}

/// Every service reference of the webhooks: (webhook name, client config).
fn webhook_clients(r: &Rendered) -> Vec<(String, &WebhookClientConfig)> {
    let mut out = Vec::new();
    for v in r.validating() {
        for w in v.webhooks.iter().flatten() {
            out.push((format!("validating {}", w.name), &w.client_config));
        }
    }
    for m in r.mutating() {
        for w in m.webhooks.iter().flatten() {
            out.push((format!("mutating {}", w.name), &w.client_config));
        }
    }
    out
}

fn webhook_annotations(r: &Rendered) -> Vec<Option<&BTreeMap<String, String>>> {
    r.validating()
        .iter()
        .map(|v| v.metadata.annotations.as_ref())
        .chain(r.mutating().iter().map(|m| m.metadata.annotations.as_ref()))
        .collect()
}

// ----- tests -----

#[test]
fn helm_lint_strict_passes() {
    if !helm_runs("helm_lint_strict_passes") {
        return;
    }
    let workspace = xtask::testbed::workspace_root();
    let helm = helm::ensure_helm(&workspace).unwrap_or_else(|e| panic!("{e:#}"));
    for case in helm::cases() {
        let out = helm::lint(&workspace, &helm, &case).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed"),
            "case {}: {out}",
            case.name
        );
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "case {}: {out}",
            case.name
        );
    }
}

#[test]
fn a_bad_value_is_refused_by_the_schema_with_its_name() {
    if !helm_runs("a_bad_value_is_refused_by_the_schema_with_its_name") {
        return;
    }
    let workspace = xtask::testbed::workspace_root();
    let helm = helm::ensure_helm(&workspace).unwrap_or_else(|e| panic!("{e:#}"));
    for (set, needle) in [
        ("webhook.podMode=patch", "webhook.podMode"),
        ("node.nodeSelektor.a=b", "nodeSelektor"),
        ("webhook.certManager.enabled=maybe", "webhook.certManager.enabled"),
    ] {
        let bad = helm::Case {
            name: "bad",
            values: vec![("--set", set)],
            api_versions: vec![],
        };
        let err = helm::template(&workspace, &helm, &bad).expect_err(set);
        assert!(format!("{err:#}").contains(needle), "{set}: {err:#}");
    }
}

#[test]
fn every_case_renders_only_known_kinds_in_the_release_namespace() {
    if !helm_runs("every_case_renders_only_known_kinds_in_the_release_namespace") {
        return;
    }
    let expected_kinds = |extra: &[(&'static str, usize)]| {
        let mut kinds = BTreeMap::from([
            ("CustomResourceDefinition", 2),
            ("Deployment", 1),
            ("DaemonSet", 1),
            ("ServiceAccount", 2),
            ("ClusterRole", 2),
            ("ClusterRoleBinding", 2),
            ("Role", 1),
            ("RoleBinding", 1),
            ("Service", 1),
            ("PodDisruptionBudget", 1),
            ("FlowSchema", 1),
        ]);
        for (k, n) in extra {
            if *n == 0 {
                kinds.remove(k);
            } else {
                kinds.insert(k, *n);
            }
        }
        kinds
    };
    let fallback = [
        ("Secret", 1),
        ("ValidatingWebhookConfiguration", 1),
        ("MutatingWebhookConfiguration", 1),
    ];
    assert_eq!(case("defaults").kinds(), expected_kinds(&fallback));
    assert_eq!(
        case("cert-manager").kinds(),
        expected_kinds(&[
            ("Issuer", 2),
            ("Certificate", 2),
            ("ValidatingWebhookConfiguration", 1),
            ("MutatingWebhookConfiguration", 1)
        ])
    );
    assert_eq!(
        case("mutate").kinds(),
        expected_kinds(&[
            ("Secret", 1),
            ("ValidatingWebhookConfiguration", 1),
            ("MutatingWebhookConfiguration", 1)
        ])
    );
    assert_eq!(
        case("custom").kinds(),
        expected_kinds(&[
            ("Secret", 1),
            ("ValidatingWebhookConfiguration", 1),
            ("MutatingWebhookConfiguration", 1),
            ("FlowSchema", 0)
        ])
    );
    assert_eq!(
        case("dra").kinds(),
        expected_kinds(&[
            ("Secret", 1),
            ("ValidatingWebhookConfiguration", 1),
            ("MutatingWebhookConfiguration", 1),
            ("DeviceClass", 1)
        ])
    );
    assert_eq!(
        case("monitoring").kinds(),
        expected_kinds(&[
            ("Secret", 1),
            ("ValidatingWebhookConfiguration", 1),
            ("MutatingWebhookConfiguration", 1),
            ("ServiceMonitor", 1),
            ("PodMonitor", 1)
        ])
    );
    assert_eq!(
        case("no-webhook").kinds(),
        expected_kinds(&[("PodDisruptionBudget", 0)])
    );

    // Namespaced objects in the release namespace, cluster-scoped ones without
    // one; every object labelled.
    for r in rendered() {
        for o in &r.objects {
            let (meta, namespaced) = match o {
                Object::Deployment(x) => (&x.metadata, true),
                Object::DaemonSet(x) => (&x.metadata, true),
                Object::ServiceAccount(x) => (&x.metadata, true),
                Object::Role(x) => (&x.metadata, true),
                Object::RoleBinding(x) => (&x.metadata, true),
                Object::Service(x) => (&x.metadata, true),
                Object::Secret(x) => (&x.metadata, true),
                Object::PodDisruptionBudget(x) => (&x.metadata, true),
                Object::ClusterRole(x) => (&x.metadata, false),
                Object::ClusterRoleBinding(x) => (&x.metadata, false),
                Object::Validating(x) => (&x.metadata, false),
                Object::Mutating(x) => (&x.metadata, false),
                Object::DeviceClass(x) => (&x.metadata, false),
                Object::FlowSchema(x) => (&x.metadata, false),
                Object::Crd(_) | Object::CertManager(_) | Object::Monitoring(_) => continue,
            };
            let name = meta.name.as_deref().unwrap_or_default();
            assert_eq!(
                meta.namespace.as_deref(),
                namespaced.then_some(NS),
                "case {}: namespace of {name}",
                r.name
            );
            let labels = meta
                .labels
                .as_ref()
                .unwrap_or_else(|| panic!("{name}: no labels"));
            for key in [
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "app.kubernetes.io/component",
            ] {
                assert!(
                    labels.contains_key(key),
                    "case {}: {name} lacks label {key}",
                    r.name
                );
            }
            assert_eq!(
                labels["app.kubernetes.io/version"], "0.1.0",
                "{name}: version label"
            );
        }
    }
}

#[test]
fn crds_ship_from_the_chart_and_parse_as_custom_resource_definitions() {
    if !helm_runs("crds_ship_from_the_chart_and_parse_as_custom_resource_definitions") {
        return;
    }
    let dir = xtask::testbed::workspace_root().join(xtask::crdgen::CRD_DIR);
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let crd: Box<CustomResourceDefinition> =
            strict(serde_json::to_value(&yaml).unwrap(), &path.display().to_string());
        assert_eq!(crd.spec.group, "vfplane.io");
        assert_eq!(crd.spec.scope, "Cluster");
        assert!(
            crd.spec
                .versions
                .iter()
                .any(|v| v.name == "v1alpha1" && v.served && v.storage)
        );
        names.push(crd.metadata.name.clone().unwrap());
    }
    names.sort();
    assert_eq!(names, ["nodestates.vfplane.io", "vfpolicies.vfplane.io"]);

    // helm installs them from crds/: they are in the rendered chart.
    let mut rendered_names: Vec<_> = case("defaults")
        .objects
        .iter()
        .filter_map(|o| {
            if let Object::Crd(c) = o {
                c.metadata.name.clone()
            } else {
                None
            }
        })
        .collect();
    rendered_names.sort();
    assert_eq!(rendered_names, names);
}

#[test]
fn the_node_pod_mounts_the_host_and_no_container_is_privileged() {
    if !helm_runs("the_node_pod_mounts_the_host_and_no_container_is_privileged") {
        return;
    }
    let ds = case("defaults").daemonset();
    let spec = &ds.spec;
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("RollingUpdate")
    );
    let pod = pod_spec_of_daemonset(ds);
    assert_eq!(
        pod.host_network,
        Some(true),
        "netlink to the PF needs the host netns"
    );
    assert_eq!(pod.host_pid, Some(true), "the agent scans the host's /proc");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(
        pod.node_selector.as_ref().unwrap(),
        &BTreeMap::from([
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("vfplane.io/sriov".to_owned(), "true".to_owned())
        ]),
        "only labelled Linux nodes by default"
    );
    assert!(
        pod.tolerations.is_none(),
        "no toleration by default: {:?}",
        pod.tolerations
    );
    assert_eq!(pod.containers.len(), 2);

    let agent = container(pod, "agent");
    assert_eq!(
        command_line(agent),
        [
            "vfplane-agent",
            "run",
            "--kube",
            "--pool-config=/var/lib/vfplane/pools.yaml",
            "--state-dir=/run/vfplane/vf-state",
            "--metrics-addr=0.0.0.0:9466"
        ]
    );
    assert_eq!(
        env_field_ref(agent, "NODE_NAME").as_deref(),
        Some("spec.nodeName")
    );
    assert_eq!(env_value(agent, "VFPLANE_LOG").as_deref(), Some("info"));
    // Least privilege: root (sysfs and the state directories are root's)
    // with three capabilities, each needed (see the template's comment).
    assert!(!privileged(agent));
    let sc = agent.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(
        caps.add.as_deref(),
        Some(
            &[
                "NET_ADMIN".to_owned(),
                "SYS_PTRACE".to_owned(),
                "DAC_READ_SEARCH".to_owned()
            ][..]
        )
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let mounts = host_mounts(pod, agent);
    for (path, read_only) in [
        ("/sys", false),
        // It checks a VF's group node exists, never opens it.
        ("/dev/vfio", true),
        ("/var/lib/kubelet/pod-resources", true),
        // Read only: the agent reads VF containers' cgroups, never writes them.
        ("/sys/fs/cgroup", true),
        ("/run/vfplane", false),
        ("/var/lib/vfplane", false),
    ] {
        assert_eq!(
            mounts.get(path),
            Some(&(path.to_owned(), read_only)),
            "agent mount {path} (read-only {read_only}); all: {mounts:?}"
        );
    }

    let plugin = container(pod, "device-plugin");
    assert_eq!(
        command_line(plugin),
        [
            "vfplane-device-plugin",
            "--pool-config=/var/lib/vfplane/pools.yaml",
            "--metrics-addr=0.0.0.0:9465"
        ]
    );
    assert!(!privileged(plugin));
    let sc = plugin.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert!(sc.capabilities.as_ref().unwrap().add.is_none());
    let expected: BTreeMap<String, (String, bool)> = [
        ("/var/lib/kubelet/device-plugins", false),
        ("/var/run/cdi", false),
        ("/sys", true),
        ("/dev/vfio", true),
        // The handed-out marks of the VFs it gives out (scrub on release).
        ("/run/vfplane", false),
        ("/var/lib/vfplane", true),
        // The runtime's NRI socket: the plugin adjusts VF containers' specs.
        ("/var/run/nri", false),
    ]
    .into_iter()
    .map(|(p, ro)| (p.to_owned(), (p.to_owned(), ro)))
    .collect();
    assert_eq!(
        host_mounts(pod, plugin),
        expected,
        "device plugin mounts exactly these"
    );

    // Only the agent holds API credentials.
    assert_eq!(pod.automount_service_account_token, Some(false));
    let token_mounts = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .filter(|m| m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount")
            .count()
    };
    assert_eq!(token_mounts(agent), 1);
    assert_eq!(token_mounts(plugin), 0);
    let token = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "api-token")
        .unwrap();
    let sources = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert!(sources.iter().any(|s| s.service_account_token.is_some()));
    assert_eq!(pod.service_account_name.as_deref(), Some("vfplane-agent"));

    // The DaemonSet selects its own pods.
    let selector = spec.selector.match_labels.as_ref().unwrap();
    let labels = spec.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
}

#[test]
fn the_controller_runs_two_replicas_with_leader_election_and_a_locked_down_container() {
    if !helm_runs("the_controller_runs_two_replicas_with_leader_election_and_a_locked_down_container") {
        return;
    }
    let r = case("defaults");
    let d = r.deployment();
    assert_eq!(d.spec.replicas, Some(2));
    let pod = pod_spec_of_deployment(d);
    let c = container(pod, "controller");
    assert_eq!(c.image.as_deref(), Some("ghcr.io/vfplane/vfplane:0.1.0"));
    assert_eq!(
        command_line(c),
        [
            "vfplane-controller",
            "run",
            "--metrics-addr=0.0.0.0:8080",
            "--webhook-addr=0.0.0.0:8443",
            "--tls-cert=/etc/vfplane/tls/tls.crt",
            "--tls-key=/etc/vfplane/tls/tls.key",
            "--lease-name=vfplane-controller",
            "--pod-webhook-mode=validate"
        ]
    );
    assert_eq!(env_field_ref(c, "POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(
        env_field_ref(c, "POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    let ports: BTreeMap<_, _> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("metrics".to_owned(), 8080), ("webhook".to_owned(), 8443)])
    );
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert!(!privileged(c));
    let pod_sc = pod.security_context.as_ref().unwrap();
    assert_eq!(pod_sc.run_as_non_root, Some(true));
    assert!(pod_sc.run_as_user.is_some_and(|u| u != 0));
    assert!(c.resources.as_ref().unwrap().requests.is_some());

    // The TLS secret is mounted where the arguments say.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/vfplane/tls")
        .unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("vfplane-webhook-tls")
    );

    // Replicas spread across nodes.
    let anti = pod.affinity.as_ref().unwrap().pod_anti_affinity.as_ref().unwrap();
    let preferred = anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(
        preferred[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    let pod_labels = d
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    let anti_labels = preferred[0]
        .pod_affinity_term
        .label_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert!(anti_labels.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));

    // The Service reaches the controller pods: 443 -> the webhook port.
    let svc = r.service();
    assert_eq!(svc.metadata.name.as_deref(), Some(SVC));
    let svc_spec = svc.spec.as_ref().unwrap();
    let selector = svc_spec.selector.as_ref().unwrap();
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let port = svc_spec.ports.iter().flatten().find(|p| p.port == 443).unwrap();
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
            "webhook".into()
        ))
    );
}

#[test]
fn rbac_is_least_privilege_and_exactly_what_the_code_calls() {
    if !helm_runs("rbac_is_least_privilege_and_exactly_what_the_code_calls") {
        return;
    }
    for r in rendered() {
        // No wildcard anywhere.
        for o in &r.objects {
            let rules = match o {
                Object::ClusterRole(c) => c.rules.clone().unwrap_or_default(),
                Object::Role(c) => c.rules.clone().unwrap_or_default(),
                _ => continue,
            };
            for rule in &rules {
                let all = rule
                    .verbs
                    .iter()
                    .chain(rule.resources.iter().flatten())
                    .chain(rule.api_groups.iter().flatten());
                for word in all {
                    assert!(!word.contains('*'), "case {}: wildcard in {rule:?}", r.name);
                }
            }
        }

        let controller = r.cluster_role("vfplane-controller");
        let mut controller_rules: Vec<(&str, &str, &[&str])> = vec![
            ("vfplane.io", "vfpolicies", &["get", "list", "watch", "patch"]),
            ("vfplane.io", "vfpolicies/status", &["patch"]),
            (
                "vfplane.io",
                "nodestates",
                &["get", "list", "watch", "create", "patch"],
            ),
            ("", "nodes", &["get", "list", "watch"]),
            // A rollout's evictions and Events (controller/src/controller.rs:
            // evict_holders, post_event).
            ("", "pods/eviction", &["create"]),
            ("events.k8s.io", "events", &["create", "patch"]),
        ];
        if r.name == "dra" || r.name == "dra-binding" {
            // The pod webhook reads the claims a pod names
            // (controller/src/webhook/claims.rs).
            controller_rules.extend([
                ("resource.k8s.io", "resourceclaimtemplates", &["get"][..]),
                ("resource.k8s.io", "resourceclaims", &["get"][..]),
            ]);
        }
        assert_eq!(
            rules_as_set(controller.rules.as_deref().unwrap()),
            expected(&controller_rules),
            "case {}: controller ClusterRole",
            r.name
        );
        let agent = r.cluster_role("vfplane-agent");
        let mut node_pod: Vec<(&str, &str, &[&str])> = vec![
            ("vfplane.io", "nodestates", &["get", "list", "watch"]),
            ("vfplane.io", "nodestates/status", &["patch"]),
            ("events.k8s.io", "events", &["create", "patch"]),
        ];
        if r.name == "dra" || r.name == "dra-binding" {
            // The device plugin as DRA driver (dra/node.rs reads claims;
            // dra/slices.rs reads the Node and keeps the slices).
            node_pod.extend([
                ("resource.k8s.io", "resourceclaims", &["get"][..]),
                (
                    "resource.k8s.io",
                    "resourceslices",
                    &["get", "list", "watch", "create", "update", "delete"][..],
                ),
                ("", "nodes", &["get"][..]),
            ]);
        }
        if r.name == "dra-binding" {
            // dra/binding.rs watches the claims and applies its devices'
            // conditions to their status, for its own driver.
            node_pod.extend([
                ("resource.k8s.io", "resourceclaims", &["list", "watch"][..]),
                ("resource.k8s.io", "resourceclaims/status", &["patch"][..]),
                (
                    "resource.k8s.io",
                    "resourceclaims/driver",
                    &["associated-node:patch"][..],
                ),
            ]);
        }
        assert_eq!(
            rules_as_set(agent.rules.as_deref().unwrap()),
            expected(&node_pod),
            "case {}: agent ClusterRole",
            r.name
        );

        let role = r.one(pick!(Object::Role), "Role");
        assert_eq!(role.metadata.namespace.as_deref(), Some(NS));
        let rules = role.rules.as_deref().unwrap();
        assert_eq!(
            rules_as_set(rules),
            expected(&[("coordination.k8s.io", "leases", &["get", "create", "update"])])
        );
        for rule in rules.iter().filter(|r| r.verbs.iter().any(|v| v != "create")) {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&["vfplane-controller".to_owned()][..]),
                "get/update only on the controller's Lease"
            );
        }

        // Bindings: each role to its own ServiceAccount, the one its pods use.
        let pod_accounts = [
            pod_spec_of_deployment(r.deployment())
                .service_account_name
                .clone()
                .unwrap(),
            pod_spec_of_daemonset(r.daemonset())
                .service_account_name
                .clone()
                .unwrap(),
        ];
        for o in &r.objects {
            let (role_ref, subjects) = match o {
                Object::ClusterRoleBinding(b) => (&b.role_ref, &b.subjects),
                Object::RoleBinding(b) => (&b.role_ref, &b.subjects),
                _ => continue,
            };
            let subjects = subjects.as_deref().unwrap();
            assert_eq!(subjects.len(), 1);
            assert_eq!(subjects[0].kind, "ServiceAccount");
            assert_eq!(subjects[0].namespace.as_deref(), Some(NS));
            assert!(pod_accounts.contains(&subjects[0].name), "{subjects:?}");
            assert!(
                role_ref.name.starts_with(&subjects[0].name),
                "{} bound to {}",
                role_ref.name,
                subjects[0].name
            );
        }
    }
}

fn decode_pem_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    assert!(
        text.starts_with("-----BEGIN CERTIFICATE-----"),
        "not a PEM certificate: {text:.60}"
    );
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

#[test]
fn fallback_mode_webhooks_trust_the_generated_ca_and_point_at_the_service() {
    if !helm_runs("fallback_mode_webhooks_trust_the_generated_ca_and_point_at_the_service") {
        return;
    }
    for name in ["defaults", "custom", "mutate", "monitoring"] {
        let r = case(name);
        let secrets = r.secrets();
        assert_eq!(secrets.len(), 1, "case {name}");
        let secret = secrets[0];
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(secret.metadata.name.as_deref(), Some("vfplane-webhook-tls"));
        let data = secret.data.as_ref().unwrap();
        let ca = &data["ca.crt"].0;
        let crt = &data["tls.crt"].0;
        assert!(
            std::str::from_utf8(&data["tls.key"].0)
                .unwrap()
                .contains("PRIVATE KEY-----")
        );
        assert_ne!(ca, crt, "the serving certificate is not the CA");
        // The serving certificate names the service as the API server calls it.
        let der = decode_pem_der(crt);
        let has = |needle: &str| der.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(
            has(&format!("{SVC}.{NS}.svc")),
            "case {name}: no SAN {SVC}.{NS}.svc"
        );
        decode_pem_der(ca);

        let clients = webhook_clients(r);
        assert!(!clients.is_empty());
        for (webhook, client) in clients {
            assert_eq!(
                client.ca_bundle.as_ref().map(|b| &b.0),
                Some(ca),
                "case {name}: {webhook} caBundle"
            );
            let svc = client.service.as_ref().unwrap();
            assert_eq!(
                (svc.name.as_str(), svc.namespace.as_str(), svc.port),
                (SVC, NS, Some(443))
            );
            assert!(client.url.is_none());
        }
        assert!(
            webhook_annotations(r)
                .iter()
                .all(|a| a.is_none_or(|a| !a.contains_key("cert-manager.io/inject-ca-from")))
        );
        assert!(r.cert_manager("Certificate").is_empty() && r.cert_manager("Issuer").is_empty());
    }
}

#[test]
fn the_validating_webhooks_cover_policies_and_only_vf_pods() {
    if !helm_runs("the_validating_webhooks_cover_policies_and_only_vf_pods") {
        return;
    }
    let r = case("defaults");
    // In validate mode the pod webhook mutates too: only to add NRI's
    // required-plugins annotation (the handler's tests hold what it adds).
    let mutating = r.mutating();
    assert_eq!(mutating.len(), 1);
    let webhooks = mutating[0].webhooks.as_deref().unwrap();
    assert_eq!(webhooks.len(), 1);
    assert_eq!(webhooks[0].name, "pods.vfplane.io");
    assert_eq!(
        webhooks[0]
            .client_config
            .service
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/mutate/pods")
    );
    check_pod_rules(webhooks[0].rules.as_deref().unwrap());
    check_vf_pod_condition(&webhooks[0].match_conditions.as_deref().unwrap()[0].expression);
    let v = r.validating();
    let webhooks = v[0].webhooks.as_deref().unwrap();
    let names: Vec<_> = webhooks.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["vfpolicies.vfplane.io", "pods.vfplane.io"]);
    for w in webhooks {
        assert_eq!(w.admission_review_versions, ["v1"]);
        assert_eq!(w.side_effects, "None");
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(w.timeout_seconds, Some(5));
    }
    let policies = &webhooks[0];
    assert_eq!(
        policies.client_config.service.as_ref().unwrap().path.as_deref(),
        Some("/validate/vfpolicies")
    );
    let rule = &policies.rules.as_deref().unwrap()[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&["vfplane.io".to_owned()][..]));
    assert_eq!(rule.api_versions.as_deref(), Some(&["v1alpha1".to_owned()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["vfpolicies".to_owned()][..]));
    assert_eq!(
        rule.operations.as_deref(),
        Some(&["CREATE".to_owned(), "UPDATE".to_owned()][..])
    );
    assert!(policies.match_conditions.is_none());

    let pods = &webhooks[1];
    assert_eq!(
        pods.client_config.service.as_ref().unwrap().path.as_deref(),
        Some("/validate/pods")
    );
    check_pod_rules(pods.rules.as_deref().unwrap());
    let conditions = pods.match_conditions.as_deref().unwrap();
    assert_eq!(conditions.len(), 1);
    check_vf_pod_condition(&conditions[0].expression);
}

/// The pod webhook sees new pods and in-place resizes, nothing else.
fn check_pod_rules(rules: &[k8s_openapi::api::admissionregistration::v1::RuleWithOperations]) {
    let seen: Vec<(Vec<String>, Vec<String>)> = rules
        .iter()
        .map(|r| (r.operations.clone().unwrap(), r.resources.clone().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            (vec!["CREATE".to_owned()], vec!["pods".to_owned()]),
            (vec!["UPDATE".to_owned()], vec!["pods/resize".to_owned()]),
        ]
    );
    for r in rules {
        assert_eq!(r.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(r.api_versions.as_deref(), Some(&["v1".to_owned()][..]));
    }
}

/// Runs the matchCondition with a CEL interpreter on pods, as the API server
/// would with `object` bound to the pod.
/// Whether the webhook match condition `expression` sends `pod`.
fn sends(expression: &str, pod: &Value) -> bool {
    let program = cel::Program::compile(expression).unwrap_or_else(|e| panic!("CEL {expression}: {e}"));
    let mut context = cel::Context::default();
    context.add_variable("object", pod.clone()).unwrap();
    match program.execute(&context) {
        Ok(cel::Value::Bool(b)) => b,
        other => panic!("CEL on {pod}: {other:?}"),
    }
}

fn check_vf_pod_condition(expression: &str) {
    let sent = |pod: Value| sends(expression, &pod);
    let pod = |containers: Value, init: Option<Value>| {
        let mut spec = serde_json::json!({ "containers": containers });
        if let Some(init) = init {
            spec["initContainers"] = init;
        }
        serde_json::json!({ "apiVersion": "v1", "kind": "Pod", "spec": spec })
    };
    let plain = serde_json::json!({ "name": "app", "image": "x" });
    let cpu = serde_json::json!({ "name": "app", "resources": { "limits": { "cpu": "1" }, "requests": { "memory": "1Gi" } } });
    let vf_limit = serde_json::json!({ "name": "dp", "resources": { "limits": { "cpu": "1", "vfplane.io/fast": "1" } } });
    let vf_request =
        serde_json::json!({ "name": "dp", "resources": { "requests": { "vfplane.io/slow": "2" } } });
    let lookalike = serde_json::json!({ "name": "x", "resources": { "limits": { "example.com/vfplane.io": "1", "vfplane.iox/a": "1" } } });

    assert!(
        !sent(pod(serde_json::json!([plain.clone()]), None)),
        "a pod with no resources"
    );
    assert!(
        !sent(pod(serde_json::json!([cpu.clone()]), None)),
        "cpu/memory only"
    );
    assert!(!sent(pod(serde_json::json!([lookalike]), None)), "other domains");
    assert!(!sent(pod(
        serde_json::json!([plain.clone()]),
        Some(serde_json::json!([cpu.clone()]))
    )));
    assert!(sent(pod(serde_json::json!([vf_limit]), None)), "a VF in limits");
    assert!(
        sent(pod(serde_json::json!([cpu, vf_request.clone()]), None)),
        "a VF in requests, second container"
    );
    assert!(
        sent(pod(
            serde_json::json!([plain]),
            Some(serde_json::json!([vf_request]))
        )),
        "a VF in an init container"
    );
}

#[test]
fn with_dra_the_pod_webhooks_also_see_pods_that_name_claims_and_may_read_them() {
    if !helm_runs("with_dra_the_pod_webhooks_also_see_pods_that_name_claims_and_may_read_them") {
        return;
    }
    let r = case("dra");
    let c = container(pod_spec_of_deployment(r.deployment()), "controller");
    assert!(command_line(c).contains(&"--pod-webhook-reads-claims".to_owned()));
    let defaults = case("defaults");
    let c = container(pod_spec_of_deployment(defaults.deployment()), "controller");
    assert!(!command_line(c).contains(&"--pod-webhook-reads-claims".to_owned()));

    let claims_pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": {
        "resourceClaims": [{"name": "vf", "resourceClaimTemplateName": "one-vf"}],
        "containers": [{"name": "app", "resources": {"claims": [{"name": "vf"}]}}]}});
    let no_claims = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "spec": {
        "resourceClaims": [], "containers": [{"name": "app", "image": "x"}]}});
    let conditions: Vec<String> = r
        .mutating()
        .iter()
        .flat_map(|m| m.webhooks.clone().unwrap_or_default())
        .filter(|w| w.name == "pods.vfplane.io")
        .map(|w| w.match_conditions.unwrap_or_default()[0].expression.clone())
        .chain(
            r.validating()
                .iter()
                .flat_map(|v| v.webhooks.clone().unwrap_or_default())
                .filter(|w| w.name == "pods.vfplane.io")
                .map(|w| w.match_conditions.unwrap_or_default()[0].expression.clone()),
        )
        .collect();
    assert_eq!(conditions.len(), 2, "the mutating and the validating pod webhook");
    for expression in &conditions {
        check_vf_pod_condition(expression);
        assert!(sends(expression, &claims_pod), "a pod naming a claim");
        assert!(!sends(expression, &no_claims), "an empty list of claims");
    }
    let without = defaults.mutating()[0].webhooks.as_deref().unwrap()[0]
        .match_conditions
        .as_deref()
        .unwrap()[0]
        .expression
        .clone();
    assert!(
        !sends(&without, &claims_pod),
        "without DRA, claims alone do not send a pod"
    );
}

#[test]
fn mutate_mode_replaces_the_validating_pod_webhook_with_a_mutating_one() {
    if !helm_runs("mutate_mode_replaces_the_validating_pod_webhook_with_a_mutating_one") {
        return;
    }
    let r = case("mutate");
    let c = container(pod_spec_of_deployment(r.deployment()), "controller");
    assert!(command_line(c).contains(&"--pod-webhook-mode=mutate".to_owned()));

    let validating = r.validating();
    let names: Vec<_> = validating[0]
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["vfpolicies.vfplane.io"],
        "no validating pod webhook in mutate mode"
    );

    let mutating = r.mutating();
    assert_eq!(mutating.len(), 1);
    let webhooks = mutating[0].webhooks.as_deref().unwrap();
    assert_eq!(webhooks.len(), 1);
    let w = &webhooks[0];
    assert_eq!(w.name, "pods.vfplane.io");
    assert_eq!(
        w.client_config.service.as_ref().unwrap().path.as_deref(),
        Some("/mutate/pods")
    );
    assert_eq!(w.side_effects, "None");
    assert_eq!(w.admission_review_versions, ["v1"]);
    assert_eq!(w.timeout_seconds, Some(5));
    check_pod_rules(w.rules.as_deref().unwrap());
    check_vf_pod_condition(&w.match_conditions.as_deref().unwrap()[0].expression);
}

#[test]
fn cert_manager_mode_issues_the_certificate_and_injects_the_ca() {
    if !helm_runs("cert_manager_mode_issues_the_certificate_and_injects_the_ca") {
        return;
    }
    let r = case("cert-manager");
    assert!(
        r.secrets().is_empty(),
        "cert-manager writes the Secret, the chart does not"
    );

    let certificates = r.cert_manager("Certificate");
    let issuers = r.cert_manager("Issuer");
    let by_name = |list: &[&'static Value], name: &str| -> &'static Value {
        list.iter()
            .copied()
            .find(|v| v["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    // serving Certificate -> CA Issuer -> CA Certificate's Secret; CA Certificate -> self-signed Issuer.
    let serving = certificates
        .iter()
        .copied()
        .find(|c| c["spec"]["isCA"] != true)
        .unwrap();
    let ca_cert = certificates
        .iter()
        .copied()
        .find(|c| c["spec"]["isCA"] == true)
        .unwrap();
    let ca_issuer = by_name(&issuers, serving["spec"]["issuerRef"]["name"].as_str().unwrap());
    assert_eq!(
        ca_issuer["spec"]["ca"]["secretName"],
        ca_cert["spec"]["secretName"]
    );
    let self_signed = by_name(&issuers, ca_cert["spec"]["issuerRef"]["name"].as_str().unwrap());
    assert!(self_signed["spec"]["selfSigned"].is_object());

    assert_eq!(
        serving["spec"]["secretName"], "vfplane-webhook-tls",
        "the Secret the controller mounts"
    );
    let dns: Vec<_> = serving["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(dns.contains(&format!("{SVC}.{NS}.svc").as_str()), "{dns:?}");
    assert!(
        serving["spec"]["usages"]
            .as_array()
            .unwrap()
            .contains(&Value::from("server auth"))
    );

    let inject = format!("{NS}/{}", serving["metadata"]["name"].as_str().unwrap());
    let annotations = webhook_annotations(r);
    assert!(!annotations.is_empty());
    for a in annotations {
        assert_eq!(a.unwrap().get("cert-manager.io/inject-ca-from"), Some(&inject));
    }
    for (webhook, client) in webhook_clients(r) {
        assert!(
            client.ca_bundle.is_none(),
            "{webhook}: the CA injector fills caBundle"
        );
        assert_eq!(client.service.as_ref().unwrap().name, SVC);
    }
}

#[test]
fn custom_values_reach_every_pod() {
    if !helm_runs("custom_values_reach_every_pod") {
        return;
    }
    let r = case("custom");
    // cert-manager.io/v1 exists in this case, but the values turned it off.
    assert!(r.cert_manager("Certificate").is_empty());
    assert_eq!(r.deployment().spec.replicas, Some(3));

    let ds = pod_spec_of_daemonset(r.daemonset());
    assert_eq!(
        ds.node_selector.as_ref().unwrap(),
        &BTreeMap::from([
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            ("sriov.example.com/nic".to_owned(), "intel".to_owned())
        ]),
        "a null removes a default key, a new key is added"
    );
    let tolerations = ds.tolerations.as_deref().unwrap();
    assert_eq!(tolerations.len(), 1);
    assert_eq!(
        (
            tolerations[0].key.as_deref(),
            tolerations[0].value.as_deref(),
            tolerations[0].effect.as_deref()
        ),
        (Some("dedicated"), Some("dpdk"), Some("NoSchedule"))
    );
    assert_eq!(ds.priority_class_name.as_deref(), Some("vfplane-node"));
    let hosts: BTreeSet<_> = ds
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref())
        .map(|h| h.path.as_str())
        .collect();
    assert!(
        hosts.contains("/data/kubelet/pod-resources") && hosts.contains("/data/kubelet/device-plugins"),
        "{hosts:?}"
    );
    // Inside the containers the kubelet paths stay the standard ones.
    assert!(host_mounts(ds, container(ds, "device-plugin")).contains_key("/var/lib/kubelet/device-plugins"));

    let pods = [pod_spec_of_deployment(r.deployment()), ds];
    for pod in pods {
        assert_eq!(pod.image_pull_secrets.as_ref().unwrap()[0].name, "regcred");
        for c in &pod.containers {
            assert_eq!(
                c.image.as_deref(),
                Some("registry.example.com/net/vfplane:0.1.0-rc1"),
                "{}",
                c.name
            );
            assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
            assert_eq!(
                env_value(c, "VFPLANE_LOG").as_deref(),
                Some("debug"),
                "{}",
                c.name
            );
        }
    }
}

#[test]
fn monitoring_objects_select_what_exposes_metrics() {
    if !helm_runs("monitoring_objects_select_what_exposes_metrics") {
        return;
    }
    let r = case("monitoring");
    let svc = r.service();
    let svc_labels = svc.metadata.labels.as_ref().unwrap();
    assert!(
        svc.spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("metrics"))
    );
    let ds = r.daemonset();
    let ds_labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    let plugin = container(pod_spec_of_daemonset(ds), "device-plugin");
    assert!(
        plugin
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("metrics") && p.container_port == 9465)
    );
    let agent = container(pod_spec_of_daemonset(ds), "agent");
    assert!(
        agent
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("agent-metrics") && p.container_port == 9466)
    );
    let monitors: Vec<&Value> = r
        .objects
        .iter()
        .filter_map(|o| {
            if let Object::Monitoring(v) = o {
                Some(v)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(monitors.len(), 2);
    for m in monitors {
        let targets = if m["kind"] == "ServiceMonitor" {
            svc_labels
        } else {
            ds_labels
        };
        for (k, v) in m["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                targets.get(k).map(String::as_str),
                v.as_str(),
                "{} selects {k}",
                m["kind"]
            );
        }
    }
    assert!(
        case("defaults")
            .objects
            .iter()
            .all(|o| !matches!(o, Object::Monitoring(_)))
    );

    // Asked for, but the cluster has no Prometheus Operator API: nothing rendered.
    let workspace = xtask::testbed::workspace_root();
    let helm = helm::ensure_helm(&workspace).unwrap_or_else(|e| panic!("{e:#}"));
    let without_api = helm::Case {
        name: "monitoring-without-api",
        values: vec![("--set", "metrics.serviceMonitor.enabled=true")],
        api_versions: vec![],
    };
    let rendered = helm::template(&workspace, &helm, &without_api).unwrap_or_else(|e| panic!("{e:#}"));
    let parsed = parse_case(&rendered);
    assert!(parsed.objects.iter().all(|o| !matches!(o, Object::Monitoring(_))));
}

#[test]
fn without_the_webhook_there_is_no_certificate_and_no_tls_argument() {
    if !helm_runs("without_the_webhook_there_is_no_certificate_and_no_tls_argument") {
        return;
    }
    let r = case("no-webhook");
    assert!(r.validating().is_empty() && r.mutating().is_empty() && r.secrets().is_empty());
    let d = r.deployment();
    let pod = pod_spec_of_deployment(d);
    let c = container(pod, "controller");
    let args = command_line(c);
    assert!(
        args.iter()
            .all(|a| !a.starts_with("--tls-") && !a.starts_with("--webhook-addr")),
        "{args:?}"
    );
    assert!(pod.volumes.is_none());
    assert!(
        r.service()
            .spec
            .as_ref()
            .unwrap()
            .ports
            .iter()
            .flatten()
            .all(|p| p.port != 443)
    );
}

/// The environment variables a binary reads: those behind its flags (clap's
/// `env = ...`, subcommands included) and its log filter.
fn environment_of(command: &clap::Command, log_env: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::from([log_env.to_owned()]);
    let mut stack = vec![command.clone()];
    while let Some(c) = stack.pop() {
        for arg in c.get_arguments() {
            if let Some(name) = arg.get_env() {
                names.insert(name.to_string_lossy().into_owned());
            }
        }
        stack.extend(c.get_subcommands().cloned());
    }
    names
}

/// Every container the chart runs, with its flags and environment, is
/// accepted by the real binary's own command-line parser: a renamed flag or
/// an environment variable nobody reads (a log level that never arrives)
/// fails here rather than in a crash-looping pod.
#[test]
fn every_container_command_line_and_environment_is_what_its_binary_reads() {
    if !helm_runs("every_container_command_line_and_environment_is_what_its_binary_reads") {
        return;
    }
    use clap::{CommandFactory as _, Parser as _};
    let mut checked = BTreeSet::new();
    for r in rendered() {
        let mut pods = vec![pod_spec_of_daemonset(r.daemonset())];
        if r.objects.iter().any(|o| matches!(o, Object::Deployment(_))) {
            pods.push(pod_spec_of_deployment(r.deployment()));
        }
        for c in pods
            .iter()
            .flat_map(|p| p.containers.iter().chain(p.init_containers.iter().flatten()))
        {
            let args = command_line(c);
            let (parsed, known_env) = match args[0].as_str() {
                "vfplane-agent" => (
                    vfplane_agent::cli::Cli::try_parse_from(&args).map(|_| ()),
                    environment_of(&vfplane_agent::cli::Cli::command(), vfplane_agent::cli::LOG_ENV),
                ),
                "vfplane-device-plugin" => (
                    vfplane_device_plugin::cli::Args::try_parse_from(&args).map(|_| ()),
                    environment_of(
                        &vfplane_device_plugin::cli::Args::command(),
                        vfplane_device_plugin::cli::LOG_ENV,
                    ),
                ),
                "vfplane-controller" => (
                    vfplane_controller::cli::Cli::try_parse_from(&args).map(|_| ()),
                    environment_of(
                        &vfplane_controller::cli::Cli::command(),
                        vfplane_controller::cli::LOG_ENV,
                    ),
                ),
                other => panic!(
                    "case {}: container {} runs {other}, a binary this test does not know",
                    r.name, c.name
                ),
            };
            if let Err(error) = parsed {
                panic!(
                    "case {}: container {}: `{}` is refused by the binary:\n{error}",
                    r.name,
                    c.name,
                    args.join(" ")
                );
            }
            for var in c.env.iter().flatten() {
                assert!(
                    known_env.contains(&var.name),
                    "case {}: container {} sets {} which {} never reads (it reads {known_env:?})",
                    r.name,
                    c.name,
                    var.name,
                    args[0]
                );
            }
            checked.insert(args[0].clone());
        }
    }
    assert_eq!(
        checked,
        BTreeSet::from(["vfplane-agent", "vfplane-controller", "vfplane-device-plugin"].map(String::from)),
        "every binary was checked"
    );
}

/// With `dra.enabled` the device plugin container serves the DRA pools: it
/// is told its node, gets the kubelet's plugin directories at the node's
/// own paths and the API token, the node pod's role reads claims and keeps
/// ResourceSlices, and the DeviceClass selects the driver's devices. By
/// default none of it is there.
#[test]
fn dra_enabled_gives_the_plugin_its_sockets_token_rights_and_the_device_class() {
    if !helm_runs("dra_enabled_gives_the_plugin_its_sockets_token_rights_and_the_device_class") {
        return;
    }
    let off = case("defaults");
    let plugin = container(pod_spec_of_daemonset(off.daemonset()), "device-plugin");
    assert!(!command_line(plugin).iter().any(|a| a == "--dra"));
    assert!(off.objects.iter().all(|o| !matches!(o, Object::DeviceClass(_))));

    let on = case("dra");
    let pod = pod_spec_of_daemonset(on.daemonset());
    let plugin = container(pod, "device-plugin");
    let args = command_line(plugin);
    for wanted in [
        "--dra",
        "--node-name=$(NODE_NAME)",
        "--kubelet-registry-dir=/var/lib/kubelet/plugins_registry",
        "--kubelet-plugins-dir=/var/lib/kubelet/plugins",
    ] {
        assert!(args.iter().any(|a| a == wanted), "{wanted} not in {args:?}");
    }
    let node_name = plugin
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    let mounts: BTreeMap<&str, &str> = plugin
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        mounts.get("plugins-registry"),
        Some(&"/var/lib/kubelet/plugins_registry")
    );
    assert_eq!(mounts.get("plugins"), Some(&"/var/lib/kubelet/plugins"));
    assert!(mounts.contains_key("api-token"), "{mounts:?}");
    for (volume, path) in [
        ("plugins-registry", "/var/lib/kubelet/plugins_registry"),
        ("plugins", "/var/lib/kubelet/plugins"),
    ] {
        let host = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.as_str());
        assert_eq!(
            host,
            Some(path),
            "volume {volume}: the same path on the node as in the container"
        );
    }
    let rules: Vec<&PolicyRule> = on.cluster_role("vfplane-agent").rules.iter().flatten().collect();
    let allows = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["get", "list", "watch", "create", "update", "delete"] {
        assert!(
            allows("resource.k8s.io", "resourceslices", verb),
            "resourceslices {verb}"
        );
    }
    assert!(allows("resource.k8s.io", "resourceclaims", "get"));
    assert!(
        !allows("resource.k8s.io", "resourceclaims", "update"),
        "claims are only read"
    );
    assert!(allows("", "nodes", "get"));
    let class = on.one(pick!(Object::DeviceClass), "DeviceClass");
    assert_eq!(class.metadata.name.as_deref(), Some("vf.vfplane.io"));
    let expression = class
        .spec
        .as_ref()
        .unwrap()
        .selectors
        .iter()
        .flatten()
        .filter_map(|s| s.cel.as_ref())
        .map(|c| c.expression.as_str())
        .collect::<Vec<_>>();
    assert_eq!(expression, [r#"device.driver == "vfplane.io""#]);
    assert!(args.iter().any(|a| a == "--dra-scrub-gate=taint"), "{args:?}");
    assert!(!allows("resource.k8s.io", "resourceclaims/status", "patch"));
}

#[test]
fn the_binding_conditions_gate_gets_its_flag_and_the_right_to_set_its_devices_conditions() {
    if !helm_runs("the_binding_conditions_gate_gets_its_flag_and_the_right_to_set_its_devices_conditions") {
        return;
    }
    let rendered = case("dra-binding");
    let plugin = container(pod_spec_of_daemonset(rendered.daemonset()), "device-plugin");
    let args = command_line(plugin);
    assert!(
        args.iter().any(|a| a == "--dra-scrub-gate=binding-conditions"),
        "{args:?}"
    );
    let rules: Vec<&PolicyRule> = rendered
        .cluster_role("vfplane-agent")
        .rules
        .iter()
        .flatten()
        .collect();
    let allows = |resource: &str, verb: &str, name: Option<&str>| {
        rules.iter().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == "resource.k8s.io")
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
                && name.is_none_or(|n| r.resource_names.iter().flatten().any(|x| x == n))
        })
    };
    assert!(allows("resourceclaims", "list", None));
    assert!(allows("resourceclaims", "watch", None));
    assert!(allows("resourceclaims/status", "patch", None));
    assert!(allows(
        "resourceclaims/driver",
        "associated-node:patch",
        Some("vfplane.io")
    ));
    assert!(
        !allows("resourceclaims/driver", "arbitrary-node:patch", None),
        "only for claims allocated on its own node"
    );
}

/// The controller's Lease requests go to the `leader-election` priority
/// level: only those (leases in the release namespace), and only the
/// controller's service account.
#[test]
fn the_controllers_leader_election_has_its_own_flow_schema() {
    if !helm_runs("the_controllers_leader_election_has_its_own_flow_schema") {
        return;
    }
    let rendered = case("defaults");
    let schema = rendered.one(pick!(Object::FlowSchema), "FlowSchema");
    let spec = &schema.spec;
    assert_eq!(spec.priority_level_configuration.name, "leader-election");
    let precedence = spec.matching_precedence.expect("matchingPrecedence");
    assert!(
        (101..9000).contains(&precedence),
        "after the system's leader election (100), before service-accounts (9000): {precedence}"
    );
    let rules = spec.rules.as_ref().expect("rules");
    assert_eq!(rules.len(), 1);
    let subjects = &rules[0].subjects;
    assert_eq!(subjects.len(), 1);
    let account = subjects[0].service_account.as_ref().expect("a service account");
    assert_eq!((account.name.as_str(), account.namespace.as_str()), (SVC, NS));
    let resources = rules[0].resource_rules.as_ref().expect("resource rules");
    assert_eq!(resources.len(), 1);
    assert_eq!(resources[0].api_groups, ["coordination.k8s.io"]);
    assert_eq!(resources[0].resources, ["leases"]);
    assert_eq!(resources[0].namespaces.as_deref(), Some(&[NS.to_owned()][..]));
    assert!(rules[0].non_resource_rules.is_none());
    // The controller's ServiceAccount is the one the Deployment runs as.
    let deployment = rendered.deployment();
    let pod = deployment.spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some(SVC));
}
