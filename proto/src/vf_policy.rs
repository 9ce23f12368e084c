//! `VfPolicy` (`vfplane.io/v1alpha1`, cluster-scoped): an operator's intent
//! for SR-IOV across the cluster. The controller merges the policies that
//! select a node into that node's [`NodeState`](crate::node_state::NodeState).
//!
//! Cluster-scoped on purpose: a policy selects nodes and NICs, which belong
//! to no namespace, and it defines an extended resource (`vfplane.io/<pool>`)
//! that every namespace sees under the same name. A namespaced policy would
//! suggest a tenant boundary that does not exist (two namespaces could not
//! both own `vfplane.io/fast`); who may *use* a pool is a question for
//! quotas and admission, not for where the policy lives.
//!
//! What the schema can say cheaply it says (ranges, enums, patterns and a
//! few CEL rules); the admission webhook checks the rest (overlapping VF
//! ranges, `numVfs` against what matched nodes report).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::container_limits::ContainerLimits;
use crate::node_state::Condition;
use crate::pool::ResourceApi;
use crate::quantity::{Quantity, QuantityError, parse_quantity};

/// Highest `priority` value (the lowest priority).
pub const LOWEST_PRIORITY: u8 = 99;
/// Most VFs a policy may ask of one PF (PCIe SR-IOV allows 65535; no NIC we
/// know of offers more than 256 per PF).
pub const MAX_NUM_VFS: u16 = 256;

/// An operator's SR-IOV intent: which nodes, which NICs, how many VFs, how
/// they are configured and which pool they go to.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[kube(
    group = "vfplane.io",
    version = "v1alpha1",
    kind = "VfPolicy",
    plural = "vfpolicies",
    shortname = "vfp",
    status = "VfPolicyStatus",
    printcolumn = r#"{"name":"Resource","type":"string","jsonPath":".spec.resourceName"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.matchedNodes"}"#,
    printcolumn = r#"{"name":"Requested","type":"integer","jsonPath":".status.requestedVfs"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyVfs"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    cel,
    validation = Rule::new("self.deviceType == 'vfio-pci' || !has(self.containerProfile) || !has(self.containerProfile.lockedMemory)")
        .message("containerProfile.lockedMemory applies to vfio-pci VFs only")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VfPolicySpec {
    /// Labels a node must carry to be selected; empty selects every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Which PFs of a selected node the policy applies to.
    pub nic_selector: NicSelector,
    /// VFs to create on each selected PF (the PF is set to this many when
    /// no higher-priority policy asks for more).
    #[schemars(range(min = 1, max = 256))]
    pub num_vfs: u16,
    /// How the VFs are handed to containers.
    #[serde(default)]
    pub device_type: DeviceType,
    /// The pool: pods ask for `vfplane.io/<resourceName>`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub resource_name: String,
    /// 0 (highest) to 99 (lowest). When two policies claim the same VFs,
    /// the one with the lower value keeps them; equal values are decided by
    /// name, alphabetically first wins.
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 99))]
    pub priority: u8,
    /// PF MTU in bytes; left alone when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 68, max = 9216))]
    pub mtu: Option<u32>,
    /// VLAN ID the PF tags the VFs' traffic with; 0 for none.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4094))]
    pub vlan: u16,
    /// MAC anti-spoof checking on transmit.
    #[serde(default = "default_true")]
    pub spoof_chk: bool,
    /// Trusted VFs may change their MAC and enter promiscuous mode.
    #[serde(default)]
    pub trust: bool,
    /// Transmit rate limit in Mbit/s; 0 for none.
    #[serde(default)]
    pub max_tx_rate_mbps: u32,
    /// Advertise VFs on nodes without an IOMMU. Off unless said: without an
    /// IOMMU a VF can DMA anywhere in host memory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_no_iommu: bool,
    /// Limits for the containers that get these VFs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_profile: Option<ContainerProfile>,
    /// How pods get the pool's VFs: `devicePlugin` (the default; pods ask
    /// for the extended resource `vfplane.io/<resourceName>`) or `dra`
    /// (the VFs are devices of driver `vfplane.io` in the node's
    /// ResourceSlices, attribute `vfplane.io/pool` = `resourceName`; pods
    /// get them through ResourceClaims of DeviceClass `vf.vfplane.io`).
    #[serde(default, skip_serializing_if = "ResourceApi::is_device_plugin")]
    pub resource_api: ResourceApi,
    /// How a change that re-creates a PF's VFs (its `numVfs`) moves across
    /// the nodes. Absent: every node at once, and a node where a container
    /// holds one of the VFs keeps refusing the change until the container
    /// is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// How disruptive a change of the policy may be. A change is disruptive on
/// a node when it changes the `numVfs` of a PF that has VFs: the kernel
/// re-creates them all, and a container holding one must go first. Other
/// changes (a profile, a VLAN) reach every node at once.
#[derive(KubeSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    /// The most nodes selected by this policy that may be in a disruptive
    /// change at once (a node counts from the controller writing its new
    /// spec until its agent reports the new VFs); the others keep their
    /// current spec for the PFs concerned until a place frees.
    #[serde(default = "default_max_unavailable_nodes")]
    #[schemars(range(min = 1))]
    pub max_unavailable_nodes: u32,
    /// Evict, through the Eviction API (so PodDisruptionBudgets hold), the
    /// pods that hold VFs of a PF whose VFs are re-created, on the nodes
    /// in the change; only those pods, never the rest of the node. Off: a
    /// node waits for those pods to end by themselves.
    #[serde(default)]
    pub evict_pods: bool,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable_nodes: default_max_unavailable_nodes(),
            evict_pods: false,
        }
    }
}

fn default_max_unavailable_nodes() -> u32 {
    1
}

/// Which PFs a policy applies to. Every field given must match; at least
/// one must be given. `pfNames` and `pciAddresses` are exclusive.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[x_kube(
    cel,
    validation = Rule::new("has(self.vendor) || has(self.deviceID) || size(self.pfNames) > 0 || size(self.pciAddresses) > 0")
        .message("nicSelector selects nothing: give vendor, deviceID, pfNames or pciAddresses"),
    validation = Rule::new("size(self.pfNames) == 0 || size(self.pciAddresses) == 0")
        .message("nicSelector: pfNames and pciAddresses are exclusive")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSelector {
    /// PCI vendor ID, 4 hex digits (`8086`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{4}$"))]
    pub vendor: Option<String>,
    /// PCI device ID of the PF, 4 hex digits (`10c9`).
    #[serde(default, rename = "deviceID", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{4}$"))]
    pub device_id: Option<String>,
    /// PF interface names, each optionally with the VF indexes the policy
    /// takes: `ens1f0`, `ens1f0#0-3`, `ens1f0#0-1,6`.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub pf_names: Vec<String>,
    /// PF PCI addresses (`0000:3b:00.0`).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub pci_addresses: Vec<String>,
}

pub use crate::node_state::DeviceType;

/// Limits for the containers that get a pool's VFs. Quantities are in the
/// Kubernetes form (`2`, `500m`, `4Gi`). When a profile asks for limits, the
/// admission webhook refuses a pod whose containers requesting the pool do
/// not set them.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerProfile {
    /// CPU limit the container must set (and at least this much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory limit the container must set (and at least this much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// `hugepages-2Mi` (or `hugepages-1Gi`) limit the container must set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<String>,
    /// Pin the container's CPUs and memory to the VFs' NUMA node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub numa_aligned: bool,
    /// Locked memory (RLIMIT_MEMLOCK) the container needs for DMA; vfio-pci
    /// pools only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_memory: Option<String>,
    /// The most processes and threads the container may run (`pids.max`
    /// of its cgroup, set by the container runtime from vfplane's NRI
    /// plugin). Absent: the runtime's
    /// bound, which the node then requires to exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4_194_304))]
    pub pids: Option<u32>,
}

/// The name vfplane's NRI plugin registers with the container runtime.
pub const NRI_PLUGIN_NAME: &str = "vfplane";

/// NRI's pod annotation (read by the runtime's default validator) naming
/// the plugins that must have processed a container before it is created;
/// `<key>/container.<name>` scopes it to one container. Its value is a YAML
/// list of plugin names.
pub const NRI_REQUIRED_PLUGINS_ANNOTATION: &str = "required-plugins.noderesource.dev";

/// A profile quantity that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.containerProfile.{field}: {source}")]
pub struct ProfileError {
    /// The profile's field (`cpu`, `memory`, `hugepages`, `lockedMemory`).
    pub field: &'static str,
    /// Why its text is not a quantity.
    #[source]
    pub source: QuantityError,
}

impl ContainerProfile {
    /// The profile of a pool that several policies name (`resourceName`):
    /// a container of the pool may get a VF of any of them, so each minimum
    /// is the largest of theirs, the pids bound the smallest, and
    /// `numaAligned` holds when any asks. The one rule for a pool's
    /// profile: the pod webhook checks pods against it and the controller
    /// gives it to every VF group of the pool. A quantity that does not
    /// parse loses to one that does (the policy webhook refuses such
    /// policies; one may exist if it was written while the webhook was
    /// down). `None` when no profile is given.
    pub fn strictest<'a>(
        profiles: impl IntoIterator<Item = &'a ContainerProfile>,
    ) -> Option<ContainerProfile> {
        fn larger(a: Option<String>, b: &Option<String>) -> Option<String> {
            let value = |text: &Option<String>| text.as_deref().and_then(|t| parse_quantity(t).ok());
            match (value(&a), value(b)) {
                (_, None) if a.is_some() => a,
                (None, _) => b.clone(),
                (Some(x), Some(y)) if y > x => b.clone(),
                _ => a,
            }
        }
        profiles.into_iter().fold(None, |merged, next| {
            let Some(merged) = merged else {
                return Some(next.clone());
            };
            Some(ContainerProfile {
                cpu: larger(merged.cpu, &next.cpu),
                memory: larger(merged.memory, &next.memory),
                hugepages: larger(merged.hugepages, &next.hugepages),
                numa_aligned: merged.numa_aligned || next.numa_aligned,
                locked_memory: larger(merged.locked_memory, &next.locked_memory),
                pids: match (merged.pids, next.pids) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            })
        })
    }

    /// The profile in numbers, as the node checks and applies it.
    ///
    /// # Errors
    /// The first quantity that does not parse, naming its field.
    pub fn limits(&self) -> Result<ContainerLimits, ProfileError> {
        fn read(field: &'static str, text: &Option<String>) -> Result<Option<Quantity>, ProfileError> {
            text.as_deref()
                .map(|t| parse_quantity(t).map_err(|source| ProfileError { field, source }))
                .transpose()
        }
        let units = |q: Option<Quantity>| q.and_then(|q| u64::try_from(q.ceil_units()).ok());
        // Hugepages are the pod webhook's: the kubelet gives them, the node
        // checks nothing of them yet; read for the error only.
        read("hugepages", &self.hugepages)?;
        Ok(ContainerLimits {
            locked_memory_bytes: units(read("lockedMemory", &self.locked_memory)?),
            numa_aligned: self.numa_aligned,
            memory_bytes: units(read("memory", &self.memory)?),
            cpu_millis: read("cpu", &self.cpu)?.and_then(|q| u64::try_from(q.ceil_millis()).ok()),
            pids_max: self.pids.map(u64::from),
        })
    }

    /// Whether the container runtime must adjust the container for this
    /// profile (locked memory, pids bound, NUMA cpuset), which vfplane's
    /// NRI plugin asks it to do.
    pub fn adjusted_by_runtime(&self) -> bool {
        self.locked_memory.is_some() || self.pids.is_some() || self.numa_aligned
    }

    /// Whether the profile asks containers for CPU and memory limits.
    pub fn wants_limits(&self) -> bool {
        self.cpu.is_some() || self.memory.is_some() || self.hugepages.is_some() || self.numa_aligned
    }
}

/// What the controller sees of a policy across the cluster.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VfPolicyStatus {
    /// Nodes the policy selects (node selector and at least one PF).
    #[serde(default)]
    pub matched_nodes: u32,
    /// VFs the policy holds in NodeState specs, summed over nodes.
    #[serde(default)]
    pub requested_vfs: u32,
    /// Of those, VFs the agents report present, in the pool and healthy.
    #[serde(default)]
    pub ready_vfs: u32,
    /// VFs claimed by another policy too: who won, where.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<PolicyConflict>,
    /// `Ready` (every requested VF is ready) and `Conflicted`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where a disruptive change stands across the selected nodes; absent
    /// when no selected node has one pending or under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Most nodes [`RolloutStatus::blocked`] lists.
pub const ROLLOUT_NODES_LISTED: usize = 10;

/// Nodes of a policy by where their disruptive change stands.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Selected nodes with nothing disruptive left to do.
    #[serde(default)]
    pub nodes_done: u32,
    /// Nodes whose new spec is written and whose agent has not yet
    /// re-created the VFs.
    #[serde(default)]
    pub nodes_in_progress: u32,
    /// Nodes waiting for a place (`maxUnavailableNodes`); their spec is
    /// unchanged for the PFs concerned.
    #[serde(default)]
    pub nodes_pending: u32,
    /// Of the nodes in progress, those whose pods a PodDisruptionBudget
    /// keeps from being evicted.
    #[serde(default)]
    pub nodes_waiting_on_pdb: u32,
    /// Of the nodes in progress, those that cannot go on without someone
    /// acting (a pod holds a VF and `evictPods` is off, a process outside
    /// any pod holds one, the agent reports an error, an eviction failed).
    #[serde(default)]
    pub nodes_failed: u32,
    /// The first nodes (by name) waiting on a PDB or failed, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<RolloutBlock>,
}

/// One node a change cannot move on without help, and why.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutBlock {
    /// The node.
    pub node: String,
    /// `WaitingOnPdb`, `PodsHoldVfs`, `UnknownHolder`, `AgentError` or
    /// `EvictionFailed`.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// Two policies claiming the same VFs of one PF.
#[derive(KubeSchema, Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConflict {
    /// The node.
    pub node: String,
    /// The PF's PCI address.
    pub pf: String,
    /// The other policy.
    pub policy: String,
    /// Whether this policy kept the VFs (`true`) or lost them.
    pub won: bool,
    /// The VF indexes in dispute, `"0-3"`.
    pub vfs: String,
}

fn default_priority() -> u8 {
    LOWEST_PRIORITY
}

fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    const EXAMPLE: &str = r#"
apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: fast-io
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    vendor: "8086"
    pfNames: ["ens1f0#0-3"]
  numVfs: 7
  resourceName: fast
  priority: 10
  vlan: 100
  containerProfile:
    cpu: "2"
    memory: 1Gi
    hugepages: 1Gi
    numaAligned: true
    lockedMemory: 1Gi
"#;

    #[test]
    fn yaml_round_trip_keeps_every_field() {
        let policy: VfPolicy = serde_yaml::from_str(EXAMPLE).unwrap();
        assert_eq!(policy.spec.num_vfs, 7);
        assert_eq!(policy.spec.device_type, DeviceType::VfioPci);
        assert!(policy.spec.spoof_chk, "spoofChk defaults to on");
        assert_eq!(policy.spec.nic_selector.pf_names, ["ens1f0#0-3"]);
        let profile = policy.spec.container_profile.as_ref().unwrap();
        assert!(profile.wants_limits());
        let again: VfPolicy = serde_yaml::from_str(&serde_yaml::to_string(&policy).unwrap()).unwrap();
        assert_eq!(again.spec, policy.spec);
        assert_eq!(again.metadata, policy.metadata);
    }

    /// A VfPolicy as the API server holds it with the controller's status:
    /// every field set, in the form the types write.
    const FULL_POLICY: &str = r#"
apiVersion: vfplane.io/v1alpha1
kind: VfPolicy
metadata:
  name: voice
  generation: 4
  finalizers: ["vfplane.io/release-vfs"]
spec:
  nodeSelector:
    vfplane.io/sriov: "true"
  nicSelector:
    vendor: "8086"
    deviceID: "10c9"
    pfNames: ["ens1f0#0-3", "ens1f1"]
    pciAddresses: []
  numVfs: 8
  deviceType: netdevice
  resourceName: voice
  priority: 1
  mtu: 9000
  vlan: 42
  spoofChk: false
  trust: true
  maxTxRateMbps: 1000
  allowNoIommu: true
  containerProfile:
    cpu: "4"
    memory: 2Gi
    hugepages: 1Gi
    numaAligned: true
    lockedMemory: 1Gi
  rollout:
    maxUnavailableNodes: 50
    evictPods: true
status:
  matchedNodes: 3
  requestedVfs: 12
  readyVfs: 10
  conflicts:
    - node: worker-2
      pf: "0000:3b:00.0"
      policy: bulk
      won: true
      vfs: "2-3"
  conditions:
    - type: Ready
      status: "False"
      reason: VfsPending
      message: 10 of 12 VFs ready
  observedGeneration: 4
  rollout:
    nodesDone: 1
    nodesInProgress: 2
    nodesPending: 0
    nodesWaitingOnPdb: 1
    nodesFailed: 1
    blocked:
      - node: worker-2
        reason: WaitingOnPdb
        message: the pod's disruption budget
      - node: worker-3
        reason: PodsHoldVfs
        message: pod team/pmd-0 holds a VF
"#;

    #[test]
    fn yaml_round_trip_of_spec_and_status_keeps_every_field() {
        let original: serde_yaml::Value = serde_yaml::from_str(FULL_POLICY).unwrap();
        let policy: VfPolicy = serde_yaml::from_str(FULL_POLICY).unwrap();
        let again = serde_yaml::to_value(&policy).unwrap();
        assert_eq!(
            again,
            original,
            "YAML -> VfPolicy -> YAML changed the document:\n{}",
            serde_yaml::to_string(&again).unwrap()
        );
        assert_eq!(policy.spec.device_type, DeviceType::Netdevice);
        assert_eq!(policy.status.as_ref().unwrap().conflicts[0].vfs, "2-3");
    }

    #[test]
    fn unknown_fields_and_device_types_are_refused_by_name() {
        let typo = EXAMPLE.replace("numVfs: 7", "numVfs: 7\n  numvfs: 3");
        let err = serde_yaml::from_str::<VfPolicy>(&typo).unwrap_err().to_string();
        assert!(err.contains("numvfs"), "{err}");
        let bad = EXAMPLE.replace("resourceName: fast", "resourceName: fast\n  deviceType: vfio");
        let err = serde_yaml::from_str::<VfPolicy>(&bad).unwrap_err().to_string();
        assert!(err.contains("vfio"), "{err}");
    }

    #[test]
    fn crd_is_cluster_scoped_with_columns_and_short_name() {
        let crd = VfPolicy::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["vfp".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Resource", "Priority", "Nodes", "Requested", "Ready", "Age"]
        );
        assert!(version.subresources.as_ref().unwrap().status.is_some());
    }

    fn cel_errors(value: serde_json::Value) -> Vec<String> {
        match VfPolicySpec::validate_cel(&value, None) {
            Ok(()) => Vec::new(),
            Err(errors) => vec![format!("{errors:?}")],
        }
    }

    #[test]
    fn cel_rules_refuse_what_they_state_and_pass_the_rest() {
        let spec = |nic: serde_json::Value, extra: serde_json::Value| {
            let mut v = serde_json::json!({
                "nicSelector": nic, "numVfs": 4, "resourceName": "fast", "deviceType": "vfio-pci"
            });
            if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                v.extend(extra.clone());
            }
            v
        };
        let none = serde_json::json!({});
        assert!(
            cel_errors(spec(
                serde_json::json!({"vendor": "8086", "pfNames": [], "pciAddresses": []}),
                none.clone()
            ))
            .is_empty()
        );
        let nothing = cel_errors(spec(
            serde_json::json!({"pfNames": [], "pciAddresses": []}),
            none.clone(),
        ));
        assert!(
            nothing.iter().any(|e| e.contains("selects nothing")),
            "{nothing:?}"
        );
        let both = cel_errors(spec(
            serde_json::json!({"pfNames": ["ens1f0"], "pciAddresses": ["0000:00:02.0"]}),
            none,
        ));
        assert!(both.iter().any(|e| e.contains("exclusive")), "{both:?}");
        let locked = cel_errors(spec(
            serde_json::json!({"vendor": "8086", "pfNames": [], "pciAddresses": []}),
            serde_json::json!({"deviceType": "netdevice", "containerProfile": {"lockedMemory": "1Gi"}}),
        ));
        assert!(locked.iter().any(|e| e.contains("lockedMemory")), "{locked:?}");
    }
}
