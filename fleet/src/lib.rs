//! Simulated SR-IOV nodes for the scale bench (`cargo xtask bench scale`).
//!
//! Each node is the real agent minus the hardware: its own `kube::Client`
//! (its own connections and watch, as on a real fleet), the real
//! [`KubeSource`] (watch of its NodeState, status by server-side apply,
//! Events) and the real [`Reconciler`] and loop ([`serve`]), reconciling a
//! [`FakeSysfs`] tree whose writes a [`FakeKernel`] plays as the kernel
//! would, with the PF's VF settings in a [`FakeNetlink`]. What reaches the
//! API server is what the agent sends; only sysfs and netlink are stand-ins.
//!
//! Node shapes vary with the node's index ([`NodeShape::of`]), so that a
//! fleet holds nodes with one PF and nodes with two on two NUMA nodes.

pub mod bench;
pub mod kubelet;
pub mod readings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use vfplane_agent::attribution::PodResources;
use vfplane_agent::kube_source::{Backoff, KubeSource};
use vfplane_agent::netlink::fake::FakeNetlink;
use vfplane_agent::reconcile::Reconciler;
use vfplane_agent::run::{RunOptions, serve};
use vfplane_host::fake::{FakeDevice, FakeKernel, FakeSysfs};
use vfplane_host::{Host, PciAddress};

pub use crate::kubelet::SimulatedKubelet;

/// The label every simulated node carries, for a policy's nodeSelector.
pub const SRIOV_LABEL: &str = "vfplane.io/sriov";
/// The label naming a node's NIC layout: `one-pf` or `two-numa`.
pub const LAYOUT_LABEL: &str = "vfplane.io/fleet-layout";
/// Field manager of the Node objects the fleet registers.
pub const FIELD_MANAGER: &str = "vfplane-fleet";

/// Why a node could not be simulated.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Its fake sysfs tree could not be made.
    #[error("building the sysfs tree of node {node} under {dir}")]
    Tree {
        /// The node.
        node: String,
        /// Where.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its simulated kubelet could not start.
    #[error(transparent)]
    Kubelet(#[from] kubelet::KubeletError),
    /// Its agent thread could not start.
    #[error("starting the agent thread of node {node}")]
    Thread {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API server refused its Node object.
    #[error("registering Node {node}")]
    Register {
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// One PF of a simulated node: an Intel 82576 (igb) with 7 VFs at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PfShape {
    /// Its PCI address.
    pub address: PciAddress,
    /// Its netdev.
    pub ifname: &'static str,
    /// Its NUMA node.
    pub numa_node: i32,
}

/// What a simulated node has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeShape {
    /// The node's name, `fleet-<index>` (five digits).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its PFs.
    pub pfs: Vec<PfShape>,
}

/// The 82576's `sriov_totalvfs`.
pub const TOTAL_VFS: u16 = 7;

impl NodeShape {
    /// Node `index`: every node has PF 0000:01:00.0 (`ens1f0`, NUMA node
    /// 0); every other node also has 0000:81:00.0 (`ens8f0`) on NUMA node 1.
    pub fn of(index: usize) -> Self {
        let two_numa = index % 2 == 1;
        let mut pfs = vec![PfShape {
            address: PciAddress {
                domain: 0,
                bus: 0x01,
                device: 0,
                function: 0,
            },
            ifname: "ens1f0",
            numa_node: 0,
        }];
        if two_numa {
            pfs.push(PfShape {
                address: PciAddress {
                    domain: 0,
                    bus: 0x81,
                    device: 0,
                    function: 0,
                },
                ifname: "ens8f0",
                numa_node: 1,
            });
        }
        let labels = BTreeMap::from([
            (SRIOV_LABEL.to_owned(), "true".to_owned()),
            (
                LAYOUT_LABEL.to_owned(),
                if two_numa { "two-numa" } else { "one-pf" }.to_owned(),
            ),
        ]);
        Self {
            name: format!("fleet-{index:05}"),
            labels,
            pfs,
        }
    }

    /// Its sysfs tree as the node boots: the PFs on igb, no VFs, each PF
    /// alone in an IOMMU group, NUMA nodes 0 and 1 with 16 CPUs each.
    fn tree(&self, parent: &Path) -> std::io::Result<FakeSysfs> {
        let tree = FakeSysfs::new_in(parent)?;
        tree.add_numa_node(0, "0-15")?;
        tree.add_numa_node(1, "16-31")?;
        for (group, pf) in (0..).zip(&self.pfs) {
            let mut device = FakeDevice::igb_pf(pf.address);
            device.numa_node = pf.numa_node;
            device.iommu_group = Some(group);
            tree.add_pf(&device, TOTAL_VFS, pf.ifname)?;
        }
        Ok(tree)
    }

    /// The PFs' VF settings as igb reports them for fresh VFs.
    fn netlink(&self) -> FakeNetlink {
        let netlink = FakeNetlink::default();
        for pf in &self.pfs {
            netlink.add_fresh_vfs(pf.ifname, u32::from(TOTAL_VFS));
        }
        netlink
    }
}

/// Registers (server-side apply) the Node object of `shape`: metadata and
/// labels only. No kubelet keeps it Ready and no node controller runs in
/// the bench's control plane to mark it otherwise; vfplane reads labels,
/// not readiness.
///
/// # Errors
/// The API server's refusal.
pub async fn register(client: Client, shape: &NodeShape) -> Result<(), FleetError> {
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": shape.name, "labels": shape.labels},
    });
    Api::<Node>::all(client)
        .patch(
            &shape.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(node),
        )
        .await
        .map_err(|source| FleetError::Register {
            node: shape.name.clone(),
            source,
        })?;
    Ok(())
}

/// A simulated node: its agent's thread, its kubelet, its host.
#[derive(Debug)]
pub struct SimulatedNode {
    /// The agent's thread (it runs until the process ends).
    pub agent: std::thread::JoinHandle<()>,
    /// The node's kubelet (pods holding VFs).
    pub kubelet: SimulatedKubelet,
    /// The node's host, as the agent sees it.
    pub host: Host,
}

/// Starts the agent of node `shape` on its own thread: its tree under
/// `parent`, its API tasks on `handle` through `client`, a pass every
/// `resync` when nothing changes (the agent's `--resync-seconds`), its
/// owners from the node's [`SimulatedKubelet`].
///
/// # Errors
/// The tree, the kubelet's socket or the thread could not be made.
pub fn spawn_agent(
    shape: &NodeShape,
    parent: &Path,
    client: Client,
    handle: &tokio::runtime::Handle,
    resync: Duration,
) -> Result<SimulatedNode, FleetError> {
    let tree = shape.tree(parent).map_err(|source| FleetError::Tree {
        node: shape.name.clone(),
        dir: parent.to_path_buf(),
        source,
    })?;
    let node_dir = tree.sysfs_root().parent().unwrap_or(parent).to_path_buf();
    // The node's processes: none until a pod holds a VF (the agent scans
    // /proc before it removes VFs, and refuses when it cannot).
    let proc_root = node_dir.join("proc");
    std::fs::create_dir_all(&proc_root).map_err(|source| FleetError::Tree {
        node: shape.name.clone(),
        dir: proc_root.clone(),
        source,
    })?;
    let (tx, rx) = mpsc::channel();
    let kubelet = SimulatedKubelet::start(
        &shape.name,
        &proc_root,
        &tree.dev_root(),
        &node_dir.join("pod-resources.sock"),
        tx.clone(),
        handle,
    )?;
    let kernel = FakeKernel::new(Arc::new(tree));
    let host = kernel.host();
    let reconciler = Reconciler::new(host.clone(), shape.netlink(), shape.name.clone(), proc_root)
        .with_handed_out_marks(node_dir.join("vf-state"));
    let options = RunOptions {
        status_file: None,
        pool_config: Some(node_dir.join("pools.yaml")),
        state_dir: Some(node_dir.join("vf-state")),
        resync,
        pod_resources: Some(Arc::new(PodResources::new(kubelet.socket(), handle.clone()))),
        scrubber: None,
        containers: None,
        metrics: None,
    };
    let mut source = KubeSource::new(handle.clone(), client, shape.name.clone(), Backoff::default());
    let agent = std::thread::Builder::new()
        .name(shape.name.clone())
        .stack_size(512 * 1024)
        .spawn(move || {
            // The kernel (and its tree) lives as long as the agent.
            let _kernel = kernel;
            serve(&reconciler, &mut source, &options, tx, &rx)
        })
        .map_err(|source| FleetError::Thread {
            node: shape.name.clone(),
            source,
        })?;
    Ok(SimulatedNode { agent, kubelet, host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_alternate_between_one_pf_and_two_numa_nodes() {
        let one = NodeShape::of(0);
        assert_eq!(one.name, "fleet-00000");
        assert_eq!(one.pfs.len(), 1);
        assert_eq!(one.labels[LAYOUT_LABEL], "one-pf");
        let two = NodeShape::of(4321);
        assert_eq!(two.name, "fleet-04321");
        assert_eq!(two.pfs.len(), 2);
        assert_eq!(two.pfs[1].numa_node, 1);
        assert_eq!(two.labels[LAYOUT_LABEL], "two-numa");
    }

    #[test]
    fn a_nodes_tree_shows_its_pfs_without_vfs() {
        let dir = tempfile_dir();
        let shape = NodeShape::of(1);
        let tree = shape.tree(&dir).unwrap();
        let model = tree.host().discover().unwrap();
        assert!(model.problems.is_empty(), "{:?}", model.problems);
        let pfs: Vec<_> = model
            .pfs
            .iter()
            .map(|pf| (pf.pci.address, pf.total_vfs, pf.num_vfs))
            .collect();
        assert_eq!(pfs, [(shape.pfs[0].address, 7, 0), (shape.pfs[1].address, 7, 0)]);
        drop(tree);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A simulated node against the in-memory API stand-in: it reports its
    /// PFs, applies a spec by creating VFs through the fake kernel and
    /// binding them to vfio-pci, and reports the generation it applied.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_simulated_node_applies_its_spec_and_reports_it() {
        use vfplane_kube_mock::in_memory::{FakeApi, STATES};
        let api = FakeApi::default();
        let dir = tempfile_dir();
        let shape = NodeShape::of(1);
        api.put(
            STATES,
            serde_json::json!({
                "metadata": {"name": shape.name},
                "spec": {"pfs": [{"pciAddress": "0000:81:00.0", "numVfs": 3,
                                  "vfGroups": [{"resourceName": "fast", "vfRange": "0-2", "deviceType": "vfio-pci"}]}]}
            }),
        );
        let handle = tokio::runtime::Handle::current();
        let _agent = spawn_agent(&shape, &dir, api.client(), &handle, Duration::from_secs(30)).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            let state = api.get(STATES, &shape.name).unwrap();
            if state["status"]["observedGeneration"] == state["metadata"]["generation"]
                && state["status"]["pfs"]
                    .as_array()
                    .is_some_and(|pfs| pfs.len() == 2)
            {
                break state["status"].clone();
            }
            assert!(std::time::Instant::now() < deadline, "no status: {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let second = &status["pfs"][1];
        assert_eq!(second["pciAddress"], "0000:81:00.0");
        assert_eq!(second["numVfs"], 3, "{status}");
        assert_eq!(status["conditions"][0]["status"], "True", "{status}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vfplane-fleet-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
