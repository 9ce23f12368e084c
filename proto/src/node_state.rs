//! `NodeState` (`vfplane.io/v1alpha1`, cluster-scoped, one per node, named
//! after the node): the desired SR-IOV state of one node in `spec`, and what
//! the node really holds in `status`. The agent is its only status writer.
//!
//! Values a person can get wrong (device types, VF ranges, MACs) are kept as
//! strings and validated per PF by the agent, so one bad entry is reported on
//! its PF and never stops the others from converging.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::container_limits::ContainerLimits;
use crate::pool::ResourceApi;

/// Desired SR-IOV state of one node.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "vfplane.io",
    version = "v1alpha1",
    kind = "NodeState",
    plural = "nodestates",
    shortname = "vfns",
    status = "NodeStateStatus",
    printcolumn = r#"{"name":"Synced","type":"string","jsonPath":".status.conditions[?(@.type==\"Synced\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Owners","type":"string","priority":1,"description":"namespace/pod/container holding each VF (-o wide)","jsonPath":".status.pfs[*].vfs[*].owner"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStateSpec {
    /// The PFs to configure. PFs not listed are left alone.
    #[serde(default)]
    pub pfs: Vec<PfSpec>,
    /// Advertise VFs on a node without an IOMMU. Off unless said explicitly:
    /// without an IOMMU a VF can DMA anywhere in host memory.
    #[serde(default)]
    pub allow_no_iommu: bool,
    /// The vfio-pci pools of every policy that selects this node, whether
    /// or not one of the node's PFs matches it. The device plugin serves
    /// each, empty when the node has no ready VF for it, so the kubelet
    /// reports it at 0: a kubelet that never heard of a resource (after a
    /// reboot, say) keeps the count the API server had and starts a pod
    /// asking for it without a device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<String>,
}

/// One PF and the VFs to make on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PfSpec {
    /// The PF's PCI address (`0000:00:02.0`); this or `pfName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_address: Option<String>,
    /// The PF's network interface name; this or `pciAddress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pf_name: Option<String>,
    /// How many VFs the PF should have.
    pub num_vfs: u16,
    /// PF MTU in bytes, left as it is when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Allow shrinking below VFs that containers hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
    /// How the VFs are split into pools and configured.
    #[serde(default)]
    pub vf_groups: Vec<VfGroupSpec>,
}

/// A range of VFs of one PF, all configured alike and put in one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VfGroupSpec {
    /// The pool; advertised as `vfplane.io/<resourceName>`.
    pub resource_name: String,
    /// VF indexes, `"0-3"`, `"2"` or `"0-1,4"`.
    pub vf_range: String,
    /// `vfio-pci` (userspace drivers) or `netdevice` (the PF's kernel VF driver).
    #[serde(default)]
    pub device_type: DeviceType,
    /// VLAN ID the PF tags the VFs' traffic with; 0 for none.
    #[serde(default)]
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
    /// VF link state: `auto` (follows the PF), `enable` or `disable`. Left
    /// as the driver has it when absent (not every PF driver can set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_state: Option<String>,
    /// One MAC per VF of the range, in order. Empty: stable locally
    /// administered MACs derived from the node name, PF and VF index.
    #[serde(default)]
    pub macs: Vec<String>,
    /// The limits a container given one of these VFs runs under (the
    /// policy's `containerProfile`, in numbers).
    #[serde(default, skip_serializing_if = "ContainerLimits::is_empty")]
    pub container_limits: ContainerLimits,
    /// Which Kubernetes API hands the pool's VFs to pods (the policy's
    /// `resourceApi`).
    #[serde(default, skip_serializing_if = "ResourceApi::is_device_plugin")]
    pub resource_api: ResourceApi,
}

fn default_true() -> bool {
    true
}

/// How a group's VFs are handed to containers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DeviceType {
    /// Bound to vfio-pci for userspace drivers (the vfplane driver, DPDK).
    #[default]
    #[serde(rename = "vfio-pci")]
    VfioPci,
    /// Left to the PF's kernel VF driver; the container gets a netdev.
    #[serde(rename = "netdevice")]
    Netdevice,
}

impl DeviceType {
    /// Its name in NodeState and VfPolicy (`vfio-pci`, `netdevice`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VfioPci => "vfio-pci",
            Self::Netdevice => "netdevice",
        }
    }
}

impl std::fmt::Display for DeviceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the node holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStateStatus {
    /// Every SR-IOV PF of the node, listed in the spec or not.
    #[serde(default)]
    pub pfs: Vec<PfStatus>,
    /// Whether the node has an IOMMU.
    #[serde(default)]
    pub iommu_enabled: bool,
    /// `Synced` (the node matches the spec) and `Degraded` (something is
    /// wrong: a bad entry, a failed write, a VF that is not isolated).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last error of a sync, if the last sync had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_error: Option<String>,
}

/// One PF as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PfStatus {
    /// PCI address.
    pub pci_address: String,
    /// Network interface name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Vendor ID (4 hex digits).
    pub vendor: String,
    /// Device ID (4 hex digits).
    pub device: String,
    /// Bound driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// NUMA node when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_node: Option<u32>,
    /// `up`, `down` or `unknown` (from the interface's operstate and carrier).
    pub link: String,
    /// `sriov_totalvfs`.
    pub total_vfs: u16,
    /// `sriov_numvfs`.
    pub num_vfs: u16,
    /// What keeps this PF from matching its spec, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its VFs.
    #[serde(default)]
    pub vfs: Vec<VfStatus>,
}

/// One VF as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VfStatus {
    /// VF index on its PF.
    pub index: u16,
    /// PCI address.
    pub pci_address: String,
    /// Bound driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// MAC the PF assigned (from netlink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// VLAN the PF tags with (from netlink).
    #[serde(default)]
    pub vlan: u16,
    /// Anti-spoof checking (from netlink), when the PF driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spoof_chk: Option<bool>,
    /// Trust (from netlink), when the PF driver reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<bool>,
    /// IOMMU group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu_group: Option<u32>,
    /// Alone in its IOMMU group.
    pub isolated: bool,
    /// `Healthy`, `Unhealthy: <reason>` (`Unhealthy: scrub failed: <why>`
    /// while quarantined), `Scrubbing` or `Unmanaged`.
    #[schemars(with = "String")]
    pub health: crate::vf_health::VfHealth,
    /// The pool it is in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `namespace/pod/container` the kubelet gave it to (its pod-resources
    /// API), while that container exists; absent when nobody holds it or the
    /// kubelet does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The owner's pod UID, from the runtime's record of its container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_pod_uid: Option<String>,
    /// What the owner's container runs under, read on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<VfContainerStatus>,
}

impl VfStatus {
    /// The owner's namespace, pod and container, when the VF has one.
    pub fn owner_parts(&self) -> Option<(&str, &str, &str)> {
        let mut parts = self.owner.as_deref()?.splitn(3, '/');
        Some((parts.next()?, parts.next()?, parts.next()?))
    }
}

/// The container holding a VF, as the node sees it: its cgroup (cgroup
/// v2 files) and its first process's locked-memory limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VfContainerStatus {
    /// The runtime's container ID.
    pub id: String,
    /// Its cgroup, relative to the cgroup root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// `cpuset.cpus.effective`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// `cpuset.mems.effective`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mems: Option<String>,
    /// The NUMA nodes on which it holds hugepages (its cgroup's
    /// `hugetlb.<size>.numa_stat`), as a list (`1`, `0,1`); unset when it
    /// holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages_nodes: Option<String>,
    /// `memory.max`: bytes, or `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<String>,
    /// `cpu.max`: `<quota> <period>` in microseconds, the quota `max` when
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<String>,
    /// `pids.max`: a number, or `max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<String>,
    /// RLIMIT_MEMLOCK (soft) of its first process: bytes, or `unlimited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_memory: Option<String>,
    /// What breaks its pool's profile, or could not be read, one sentence each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A status condition in the Kubernetes style.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Synced` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// A standalone state file (`vfplane-agent run --state-file`): a NodeState
/// document; `apiVersion`, `kind` and `metadata` are optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateFile {
    /// `vfplane.io/v1alpha1` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// `NodeState` when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Ignored in standalone mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_yaml::Value>,
    /// The desired state.
    pub spec: NodeStateSpec,
}

/// Why a state file was refused as a whole.
#[derive(Debug, thiserror::Error)]
#[error("state file line {line}, column {column}: {message}")]
pub struct StateFileError {
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What the parser said.
    pub message: String,
}

impl StateFile {
    /// Parses a state file. Only the shape is checked here; values are
    /// checked per PF by the agent.
    ///
    /// # Errors
    /// YAML that does not parse or fit the schema, with its line.
    pub fn from_yaml(text: &str) -> Result<Self, StateFileError> {
        let file: Self = serde_yaml::from_str(text).map_err(|error| {
            let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
            StateFileError {
                line,
                column,
                message: error.to_string(),
            }
        })?;
        if let Some(kind) = &file.kind
            && kind != "NodeState"
        {
            return Err(StateFileError {
                line: 0,
                column: 0,
                message: format!("kind is {kind:?}, not NodeState"),
            });
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    const EXAMPLE: &str = r#"
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 4
      mtu: 1500
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          deviceType: vfio-pci
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
        - resourceName: kernel
          vfRange: "2-3"
          deviceType: netdevice
          vlan: 100
          spoofChk: false
          trust: true
          maxTxRateMbps: 100
"#;

    #[test]
    fn parses_the_documented_example_with_defaults() {
        let file = StateFile::from_yaml(EXAMPLE).unwrap();
        let pf = &file.spec.pfs[0];
        assert_eq!(pf.pci_address.as_deref(), Some("0000:00:02.0"));
        assert_eq!((pf.num_vfs, pf.mtu, pf.force), (4, Some(1500), false));
        let fast = &pf.vf_groups[0];
        assert_eq!(
            (fast.vlan, fast.spoof_chk, fast.trust, fast.max_tx_rate_mbps),
            (0, true, false, 0)
        );
        assert_eq!(fast.macs.len(), 2);
        let kernel = &pf.vf_groups[1];
        assert_eq!(kernel.device_type, DeviceType::Netdevice);
        assert_eq!(
            (
                kernel.vlan,
                kernel.spoof_chk,
                kernel.trust,
                kernel.max_tx_rate_mbps
            ),
            (100, false, true, 100)
        );
        let back = StateFile::from_yaml(&serde_yaml::to_string(&file).unwrap()).unwrap();
        assert_eq!(back, file);
    }

    #[test]
    fn full_node_state_documents_are_accepted() {
        let text =
            format!("apiVersion: vfplane.io/v1alpha1\nkind: NodeState\nmetadata:\n  name: node-1\n{EXAMPLE}");
        assert_eq!(StateFile::from_yaml(&text).unwrap().spec.pfs.len(), 1);
        let wrong = "kind: VfPolicy\nspec: {}\n";
        assert!(
            StateFile::from_yaml(wrong)
                .unwrap_err()
                .to_string()
                .contains("not NodeState")
        );
    }

    #[test]
    fn unknown_fields_and_bad_yaml_name_the_line() {
        let typo = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVf: 4\n";
        let err = StateFile::from_yaml(typo).unwrap_err();
        assert_eq!(err.line, 4, "{err}");
        assert!(err.to_string().contains("numVf"), "{err}");
        let err = StateFile::from_yaml("spec: [\n").unwrap_err();
        assert!(err.line >= 1, "{err}");
        let dpdk = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 4\n      vfGroups:\n        - {resourceName: a, vfRange: \"0\", deviceType: dpdk}\n";
        let err = StateFile::from_yaml(dpdk).unwrap_err();
        assert_eq!(err.line, 6, "{err}");
        assert!(
            err.to_string()
                .contains("unknown variant `dpdk`, expected `vfio-pci` or `netdevice`"),
            "{err}"
        );
    }

    /// A NodeState as the API server holds it once the controller applied
    /// its spec and the agent wrote its status: every field set.
    const FULL_NODE_STATE: &str = r#"
apiVersion: vfplane.io/v1alpha1
kind: NodeState
metadata:
  name: worker-1
  generation: 3
  ownerReferences:
    - apiVersion: v1
      kind: Node
      name: worker-1
      uid: 6b1e0c1a-0000-4000-8000-000000000001
spec:
  allowNoIommu: true
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 4
      mtu: 9000
      force: true
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          deviceType: vfio-pci
          vlan: 0
          spoofChk: true
          trust: false
          maxTxRateMbps: 0
          linkState: enable
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
    - pfName: ens1f1
      numVfs: 0
      vfGroups: []
status:
  iommuEnabled: true
  observedGeneration: 3
  lastSyncError: "0000:00:03.0: sriov_numvfs: Device or resource busy"
  conditions:
    - type: Synced
      status: "False"
      reason: ApplyFailed
      message: one PF could not be changed
  pfs:
    - pciAddress: "0000:00:02.0"
      name: eth0
      vendor: "8086"
      device: "10c9"
      driver: igb
      numaNode: 0
      link: up
      totalVfs: 7
      numVfs: 4
      error: "0000:00:10.2 is not alone in its IOMMU group"
      vfs:
        - index: 0
          pciAddress: "0000:00:10.0"
          driver: vfio-pci
          mac: "02:00:00:00:00:01"
          vlan: 0
          iommuGroup: 12
          isolated: true
          health: Healthy
          pool: fast
          owner: default/trader-0/main
"#;

    #[test]
    fn node_state_yaml_round_trip_keeps_every_field() {
        let original: serde_yaml::Value = serde_yaml::from_str(FULL_NODE_STATE).unwrap();
        let state: NodeState = serde_yaml::from_str(FULL_NODE_STATE).unwrap();
        let again = serde_yaml::to_value(&state).unwrap();
        assert_eq!(
            again,
            original,
            "YAML -> NodeState -> YAML changed the document:\n{}",
            serde_yaml::to_string(&again).unwrap()
        );
        let status = state.status.as_ref().unwrap();
        assert_eq!(
            status.pfs[0].vfs[0].owner.as_deref(),
            Some("default/trader-0/main")
        );
        assert_eq!(state.spec.pfs[1].pf_name.as_deref(), Some("ens1f1"));
    }

    #[test]
    fn crd_is_cluster_scoped_in_vfplane_io() {
        let crd = NodeState::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("nodestates.vfplane.io"));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
        assert!(
            crd.spec.versions[0]
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }
}
