//! The CDI spec file naming every VF the plugin serves, so a CDI-aware
//! runtime resolves `vfplane.io/vf=<address>` on its own.
//!
//! One file, `<cdi-dir>/vfplane.io-vf.json`, for all pools (a CDI name must
//! be unique across spec files of one kind):
//!
//! ```json
//! {"cdiVersion":"0.5.0","kind":"vfplane.io/vf",
//!  "containerEdits":{"deviceNodes":[{"path":"/dev/vfio/vfio","hostPath":"/dev/vfio/vfio","permissions":"rw"}]},
//!  "devices":[{"name":"0000:00:12.0","containerEdits":{"deviceNodes":[
//!    {"path":"/dev/vfio/4","hostPath":"/dev/vfio/4","permissions":"rw"}]}}]}
//! ```
//!
//! `0.5.0` is the oldest CDI version allowing what the file uses (device
//! names starting with a digit, `hostPath`), so the most runtimes read it.
//! The file is replaced atomically (written beside, renamed over) whenever a
//! VF or its VFIO node changes, and removed when no VF has a node (a spec
//! without devices is invalid). It is left in place when the plugin stops:
//! a container restarted while the plugin is down still resolves its VF.
//!
//! These are this crate's own serde types for the CDI JSON. The
//! `container-device-interface` crate's types were the plan, but its fields
//! are `pub(crate)` (a spec can only be made by deserialising JSON) and it
//! brings ~220 crates, an HTTP client and a TLS stack with a C crypto
//! library into a node daemon; the integration tests read the file written
//! here with that crate's own parser and validator instead.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vfplane_host::PciAddress;
use vfplane_proto::pool::CDI_KIND;

use crate::health::VfioNode;

/// The spec file's name inside the CDI directory.
pub const SPEC_FILE_NAME: &str = "vfplane.io-vf.json";

/// The CDI version written.
pub const CDI_VERSION: &str = "0.5.0";

/// A CDI spec (the subset vfplane writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdiSpec {
    /// CDI version.
    pub cdi_version: String,
    /// `vfplane.io/vf`.
    pub kind: String,
    /// Edits for every container that gets any of the devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_edits: Option<ContainerEdits>,
    /// The devices.
    pub devices: Vec<CdiDevice>,
}

/// One CDI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdiDevice {
    /// The part after `=` in `vfplane.io/vf=<name>`: the PCI address.
    pub name: String,
    /// What the runtime does for it.
    pub container_edits: ContainerEdits,
}

/// Container edits (device nodes and hooks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerEdits {
    /// Device nodes to create in the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    /// OCI hooks the runtime runs for the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
    /// `NAME=value` environment entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
}

/// An OCI hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hook {
    /// The OCI hook point (`createRuntime`).
    pub hook_name: String,
    /// The program, a path in the runtime's namespace (the node's).
    pub path: String,
    /// Its arguments, `argv[0]` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// What the spec says for one VF: its VFIO node, and the locked-memory
/// limit, cpuset and pids bound its container gets through the OCI hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdiEntry {
    /// The VF's VFIO group node.
    pub node: VfioNode,
    /// RLIMIT_MEMLOCK in bytes for its container (the pool's profile).
    pub locked_memory_bytes: Option<u64>,
    /// The cpuset of its container: its NUMA node's CPUs and memory node
    /// (a `numaAligned` pool, the VF's node known).
    pub cpuset: Option<NumaCpuset>,
    /// `pids.max` of its container (the pool's profile).
    pub pids_max: Option<u64>,
}

impl CdiEntry {
    /// The entry of a VF with VFIO node `node` and these `facts`, in
    /// `pool`.
    pub fn new(
        node: VfioNode,
        pool: &vfplane_proto::pool::Pool,
        facts: Option<&crate::inventory::VfFacts>,
    ) -> Self {
        Self {
            node,
            locked_memory_bytes: pool.container_limits.locked_memory_bytes,
            cpuset: numa_cpuset(pool, facts),
            pids_max: pool.container_limits.pids_max,
        }
    }
}

/// What of `pool`'s profile only the OCI hook can give a container
/// (locked memory, the NUMA cpuset, pids), named for an error; `None`
/// when the pool asks none of it.
pub fn needs_hook(pool: &vfplane_proto::pool::Pool) -> Option<String> {
    let limits = &pool.container_limits;
    let mut wants = Vec::new();
    if let Some(bytes) = limits.locked_memory_bytes {
        wants.push(format!("RLIMIT_MEMLOCK of {bytes} bytes"));
    }
    if limits.numa_aligned {
        wants.push("the cpuset of the VF's NUMA node".to_owned());
    }
    if let Some(pids) = limits.pids_max {
        wants.push(format!("pids.max {pids}"));
    }
    (!wants.is_empty()).then(|| wants.join(", "))
}

/// A NUMA node's CPUs and memory node, as cpuset lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaCpuset {
    /// `cpuset.cpus`, e.g. `2-3`.
    pub cpus: String,
    /// `cpuset.mems`, the node's number.
    pub mems: String,
}

impl From<VfioNode> for CdiEntry {
    fn from(node: VfioNode) -> Self {
        Self {
            node,
            locked_memory_bytes: None,
            cpuset: None,
            pids_max: None,
        }
    }
}

/// The cpuset a container given the VF with these `facts` of `pool` gets:
/// for a `numaAligned` pool, the CPUs and memory node of the VF's NUMA node
/// (read at discovery); `None` otherwise, and when the node is unknown (a
/// machine without NUMA information: every CPU is as near as any other) or
/// its CPUs could not be read (logged at discovery).
pub fn numa_cpuset(
    pool: &vfplane_proto::pool::Pool,
    facts: Option<&crate::inventory::VfFacts>,
) -> Option<NumaCpuset> {
    if !pool.container_limits.numa_aligned {
        return None;
    }
    let facts = facts?;
    Some(NumaCpuset {
        cpus: facts.numa_cpus.clone()?,
        mems: facts.numa_node?.to_string(),
    })
}

/// A device node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceNode {
    /// Path in the container.
    pub path: String,
    /// Path on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// cgroup permissions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

fn node(path: &str) -> DeviceNode {
    DeviceNode {
        path: path.to_owned(),
        host_path: Some(path.to_owned()),
        permissions: Some("rw".to_owned()),
    }
}

/// The spec for these VFs; `None` when there are none. Every VF gets a
/// `createRuntime` hook running `hook` (the installed `vfplane-oci-hook`)
/// when there is one: it records the container, and sets the VF's
/// locked-memory limit when it has one.
pub fn spec_for(devices: &BTreeMap<PciAddress, CdiEntry>, hook: Option<&Path>) -> Option<CdiSpec> {
    if devices.is_empty() {
        return None;
    }
    Some(CdiSpec {
        cdi_version: CDI_VERSION.to_owned(),
        kind: CDI_KIND.to_owned(),
        container_edits: Some(ContainerEdits {
            device_nodes: vec![node("/dev/vfio/vfio")],
            hooks: Vec::new(),
            env: Vec::new(),
        }),
        devices: devices
            .iter()
            .map(|(address, entry)| CdiDevice {
                name: address.to_string(),
                container_edits: ContainerEdits {
                    device_nodes: vec![node(&entry.node.path())],
                    hooks: hook
                        .map(|hook| vec![attach_hook(hook, *address, entry)])
                        .unwrap_or_default(),
                    env: Vec::new(),
                },
            })
            .collect(),
    })
}

/// `vfplane-oci-hook attach --vf <address> --device <node> [--pids-max
/// <n>] [--memlock <bytes>]` as a `createRuntime` hook: the NRI plugin
/// gives the container its profile, the hook checks its spec carries it
/// (the cpuset is not checked: under the static CPU manager the kubelet's
/// CPUs stay).
fn attach_hook(path: &Path, address: PciAddress, entry: &CdiEntry) -> Hook {
    let attach = crate::oci_hook::Attach {
        vf: address.to_string(),
        memlock: entry.locked_memory_bytes,
        pids_max: entry.pids_max,
        device: Some(entry.node.path()),
        records: PathBuf::from(vfplane_proto::container_record::DEFAULT_RECORDS_DIR),
    };
    let mut args = vec![crate::oci_hook::HOOK_BINARY.to_owned()];
    args.extend(attach.to_args());
    Hook {
        hook_name: "createRuntime".to_owned(),
        path: path.display().to_string(),
        args,
    }
}

/// Why the spec file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the CDI spec {path}")]
pub struct CdiError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Keeps the spec file in step with the VFs; shared by the scanner (which
/// rewrites it when VFs change) and Allocate (which makes sure a VF it
/// hands out is in it).
#[derive(Debug)]
pub struct CdiWriter {
    dir: Option<PathBuf>,
    hook: Option<PathBuf>,
    written: Mutex<Option<BTreeMap<PciAddress, CdiEntry>>>,
}

impl CdiWriter {
    /// Writes under `dir`; `None` disables CDI (no file, no CDI names).
    /// `hook` is the installed `vfplane-oci-hook` the spec names for VFs
    /// with a locked-memory limit (`None`: not installed).
    pub fn new(dir: Option<PathBuf>, hook: Option<PathBuf>) -> Self {
        Self {
            dir,
            hook,
            written: Mutex::new(None),
        }
    }

    /// True when CDI is on.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// True when the spec can carry the OCI hook: CDI is on and the hook
    /// is installed.
    pub fn has_hook(&self) -> bool {
        self.dir.is_some() && self.hook.is_some()
    }

    /// The spec file's path, when CDI is on.
    pub fn path(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(SPEC_FILE_NAME))
    }

    /// Makes the file hold exactly these VFs; writes only when they differ
    /// from what was last written.
    ///
    /// # Errors
    /// When the file cannot be written or removed.
    pub fn update(&self, devices: &BTreeMap<PciAddress, CdiEntry>) -> Result<(), CdiError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if written.as_ref() == Some(devices) {
            return Ok(());
        }
        write_spec(dir, devices, self.hook.as_deref())?;
        *written = Some(devices.clone());
        Ok(())
    }

    /// Makes sure these VFs are in the file (with these nodes), adding them
    /// to what is there when they are not.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn ensure(&self, devices: &[(PciAddress, CdiEntry)]) -> Result<(), CdiError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = written.clone().unwrap_or_default();
        if devices.iter().all(|(a, n)| current.get(a) == Some(n)) && written.is_some() {
            return Ok(());
        }
        let mut merged = current;
        merged.extend(devices.iter().cloned());
        write_spec(dir, &merged, self.hook.as_deref())?;
        *written = Some(merged);
        Ok(())
    }
}

/// What a prepared DRA claim's container learns about one of its VFs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimEnv {
    /// The VF's device name in the ResourceSlice.
    pub device: String,
    /// Its vfplane pool.
    pub pool: String,
    /// Its address.
    pub address: PciAddress,
    /// Its info.
    pub info: vfplane_proto::container_env::VfInfo,
}

impl ClaimEnv {
    /// `PCIDEVICE_VFPLANE_IO_<POOL>_<DEVICE>`: one variable per VF, so a
    /// container given VFs of one pool by several claims sees each.
    pub fn variable(&self) -> String {
        format!(
            "{}_{}",
            vfplane_proto::pool::pci_env_var(&self.pool),
            self.device.to_ascii_uppercase().replace('-', "_")
        )
    }
}

/// The spec file of a prepared claim: `vfplane.io-claim_<uid>.json`.
pub fn claim_spec_file_name(uid: &str) -> String {
    format!("vfplane.io-claim_{uid}.json")
}

/// The CDI name of a prepared claim's device:
/// `vfplane.io/claim=<uid>-<device>`.
pub fn claim_cdi_device_name(uid: &str, device: &str) -> String {
    format!("{}={uid}-{device}", crate::dra::CLAIM_CDI_KIND)
}

/// The spec of a prepared claim: one device per VF, holding its
/// environment (the VFIO node and the hook are the VF's own CDI device).
pub fn claim_spec(uid: &str, devices: &[ClaimEnv]) -> Result<CdiSpec, serde_json::Error> {
    let mut out = Vec::with_capacity(devices.len());
    for device in devices {
        let var = device.variable();
        let info: BTreeMap<String, &vfplane_proto::container_env::VfInfo> =
            [(device.address.to_string(), &device.info)].into_iter().collect();
        out.push(CdiDevice {
            name: format!("{uid}-{}", device.device),
            container_edits: ContainerEdits {
                device_nodes: Vec::new(),
                hooks: Vec::new(),
                env: vec![
                    format!("{var}={}", device.address),
                    format!(
                        "{var}{}={}",
                        vfplane_proto::container_env::INFO_SUFFIX,
                        serde_json::to_string(&info)?
                    ),
                ],
            },
        });
    }
    Ok(CdiSpec {
        cdi_version: CDI_VERSION.to_owned(),
        kind: crate::dra::CLAIM_CDI_KIND.to_owned(),
        container_edits: None,
        devices: out,
    })
}

impl CdiWriter {
    /// Writes a prepared claim's spec.
    ///
    /// # Errors
    /// CDI off, or the file cannot be written.
    pub fn write_claim(&self, uid: &str, devices: &[ClaimEnv]) -> Result<(), CdiError> {
        let dir = self.dir.clone().unwrap_or_default();
        let path = dir.join(claim_spec_file_name(uid));
        let err = |source| CdiError {
            path: path.clone(),
            source,
        };
        if self.dir.is_none() {
            return Err(err(io::Error::other("CDI is off (--no-cdi)")));
        }
        let spec = claim_spec(uid, devices).map_err(|e| err(io::Error::other(e)))?;
        let text = serde_json::to_string_pretty(&spec).map_err(|e| err(io::Error::other(e)))?;
        vfplane_proto::files::write_atomically(&path, (text + "\n").as_bytes(), None).map_err(err)
    }

    /// Removes a claim's spec; an absent one is fine.
    ///
    /// # Errors
    /// It exists and cannot be removed.
    pub fn remove_claim(&self, uid: &str) -> Result<(), CdiError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join(claim_spec_file_name(uid));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CdiError { path, source: e }),
            _ => Ok(()),
        }
    }
}

fn write_spec(
    dir: &Path,
    devices: &BTreeMap<PciAddress, CdiEntry>,
    hook: Option<&Path>,
) -> Result<(), CdiError> {
    let path = dir.join(SPEC_FILE_NAME);
    let err = |source| CdiError {
        path: path.clone(),
        source,
    };
    let Some(spec) = spec_for(devices, hook) else {
        return match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(e)),
            _ => Ok(()),
        };
    };
    let text = serde_json::to_string_pretty(&spec).map_err(|e| err(io::Error::other(e)))?;
    vfplane_proto::files::write_atomically(&path, (text + "\n").as_bytes(), None).map_err(err)?;
    tracing::debug!(path = %path.display(), devices = devices.len(), "CDI spec written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replaces_and_removes_the_spec() {
        let dir = tempfile::tempdir().unwrap();
        let writer = CdiWriter::new(Some(dir.path().to_owned()), None);
        let a: PciAddress = "0000:00:12.0".parse().unwrap();
        let b: PciAddress = "0000:00:12.2".parse().unwrap();
        writer
            .update(&BTreeMap::from([(a, VfioNode::Group(4).into())]))
            .unwrap();
        let path = dir.path().join(SPEC_FILE_NAME);
        let spec: CdiSpec = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(spec.kind, "vfplane.io/vf");
        assert_eq!(spec.devices[0].name, "0000:00:12.0");
        assert_eq!(
            spec.devices[0].container_edits.device_nodes[0].path,
            "/dev/vfio/4"
        );
        writer.ensure(&[(b, VfioNode::NoIommu(5).into())]).unwrap();
        let spec: CdiSpec = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(spec.devices.len(), 2);
        assert_eq!(
            spec.devices[1].container_edits.device_nodes[0].path,
            "/dev/vfio/noiommu-5"
        );
        writer.update(&BTreeMap::new()).unwrap();
        assert!(!path.exists());
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert!(names.is_empty(), "no temporary files left: {names:?}");
        let off = CdiWriter::new(None, None);
        assert!(!off.enabled());
        off.update(&BTreeMap::from([(a, VfioNode::Group(4).into())]))
            .unwrap();
    }

    #[test]
    fn every_vf_gets_the_hook_when_it_is_installed_with_its_limit_and_no_cpuset() {
        let a: PciAddress = "0000:00:12.0".parse().unwrap();
        let b: PciAddress = "0000:00:12.2".parse().unwrap();
        let devices = BTreeMap::from([
            (
                a,
                CdiEntry {
                    node: VfioNode::Group(4),
                    locked_memory_bytes: Some(64 << 20),
                    cpuset: Some(NumaCpuset {
                        cpus: "2-3".to_owned(),
                        mems: "1".to_owned(),
                    }),
                    pids_max: Some(512),
                },
            ),
            (b, VfioNode::Group(5).into()),
        ]);
        let hook = Path::new("/run/vfplane/bin/vfplane-oci-hook");
        let spec = spec_for(&devices, Some(hook)).unwrap();
        assert_eq!(
            spec.devices[0].container_edits.hooks,
            [Hook {
                hook_name: "createRuntime".to_owned(),
                path: "/run/vfplane/bin/vfplane-oci-hook".to_owned(),
                args: [
                    "vfplane-oci-hook",
                    "attach",
                    "--vf",
                    "0000:00:12.0",
                    "--device",
                    "/dev/vfio/4",
                    "--pids-max",
                    "512",
                    "--memlock",
                    "67108864"
                ]
                .map(str::to_owned)
                .to_vec(),
            }]
        );
        assert_eq!(
            spec.devices[1].container_edits.hooks[0].args,
            [
                "vfplane-oci-hook",
                "attach",
                "--vf",
                "0000:00:12.2",
                "--device",
                "/dev/vfio/5"
            ],
            "no limit: the record only"
        );
        let without = spec_for(&devices, None).unwrap();
        assert!(without.devices[0].container_edits.hooks.is_empty());
    }
}
