//! The part of a kubelet a rollout over held VFs needs, simulated per node:
//! pods bound to the node that hold a VF, and what a kubelet does when
//! such a pod is deleted.
//!
//! - A held VF is a process of the node with the VF's VFIO group open: a
//!   directory `proc/<pid>/fd` in the node's tree with a link to the
//!   group's node under its dev root, which is what the agent's holder
//!   scan reads. The agent refuses to re-create the PF's VFs while it
//!   exists.
//! - The node's pod-resources socket answers `List` (the kubelet's gRPC
//!   API, served on a unix socket in the node's directory) with the pod
//!   and its VF, so the agent names the pod as the VF's owner in the
//!   NodeState status.
//! - A Pod object (`spec.nodeName` set, so no scheduler is involved) in
//!   [`NAMESPACE`] stands for it on the API server. When it is deleted (an
//!   eviction sets its `deletionTimestamp`), [`follow_pods`] does what the
//!   kubelet would: the process ends, the pod leaves `List`, the agent is
//!   told, and the Pod object is removed (grace period 0).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, Event};
use vfplane_agent::source::Trigger;
use vfplane_host::PciAddress;
use vfplane_proto::podresources::v1 as pr;
use vfplane_proto::podresources::v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};

/// The namespace of the pods the fleet binds to its nodes.
pub const NAMESPACE: &str = "fleet";
/// The label on those pods.
pub const HOLDER_LABEL: &str = "vfplane.io/fleet-holder";

/// One pod holding one VF.
#[derive(Debug, Clone)]
struct Held {
    pod: String,
    uid: String,
    resource: String,
    address: PciAddress,
    pid: u32,
}

/// The simulated kubelet of one node. Clones share it.
#[derive(Debug, Clone)]
pub struct SimulatedKubelet {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    node: String,
    proc_root: PathBuf,
    dev_root: PathBuf,
    socket: PathBuf,
    held: Mutex<Vec<Held>>,
    trigger: Mutex<mpsc::Sender<Trigger>>,
}

/// Why a VF could not be held or let go.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// The fake process could not be made or removed.
    #[error("node {node}: the process holding {address} under {}", dir.display())]
    Process {
        /// The node.
        node: String,
        /// The VF.
        address: PciAddress,
        /// Its directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API server refused the Pod.
    #[error("node {node}: creating Pod {NAMESPACE}/{pod}")]
    Pod {
        /// The node.
        node: String,
        /// The pod.
        pod: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The pod-resources socket could not be bound.
    #[error("node {node}: binding {}", socket.display())]
    Socket {
        /// The node.
        node: String,
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

struct Lister(Arc<Inner>);

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(
        &self,
        _: tonic::Request<pr::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::ListPodResourcesResponse>, tonic::Status> {
        let held = self.0.held.lock().unwrap_or_else(PoisonError::into_inner);
        let pod_resources = held
            .iter()
            .map(|h| pr::PodResources {
                name: h.pod.clone(),
                namespace: NAMESPACE.to_owned(),
                containers: vec![pr::ContainerResources {
                    name: "app".to_owned(),
                    devices: vec![pr::ContainerDevices {
                        resource_name: h.resource.clone(),
                        device_ids: vec![h.address.to_string()],
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
            })
            .collect();
        Ok(tonic::Response::new(pr::ListPodResourcesResponse {
            pod_resources,
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: tonic::Request<pr::AllocatableResourcesRequest>,
    ) -> Result<tonic::Response<pr::AllocatableResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the fleet's kubelet answers List only",
        ))
    }

    async fn get(
        &self,
        _: tonic::Request<pr::GetPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::GetPodResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "the fleet's kubelet answers List only",
        ))
    }
}

impl SimulatedKubelet {
    /// The kubelet of `node`, whose processes are under `proc_root` and
    /// VFIO nodes under `dev_root`; its pod-resources socket is served on
    /// `handle` at `socket`; `trigger` reaches the node's agent.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn start(
        node: &str,
        proc_root: &Path,
        dev_root: &Path,
        socket: &Path,
        trigger: mpsc::Sender<Trigger>,
        handle: &tokio::runtime::Handle,
    ) -> Result<Self, KubeletError> {
        let _ = std::fs::remove_file(socket);
        let listener = {
            let _entered = handle.enter();
            tokio::net::UnixListener::bind(socket).map_err(|source| KubeletError::Socket {
                node: node.to_owned(),
                socket: socket.to_path_buf(),
                source,
            })?
        };
        let inner = Arc::new(Inner {
            node: node.to_owned(),
            proc_root: proc_root.to_path_buf(),
            dev_root: dev_root.to_path_buf(),
            socket: socket.to_path_buf(),
            held: Mutex::new(Vec::new()),
            trigger: Mutex::new(trigger),
        });
        handle.spawn(
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(Lister(Arc::clone(&inner))))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        Ok(Self { inner })
    }

    /// The pod-resources socket.
    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    fn poke_agent(&self) {
        let _ = self
            .inner
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Trigger::Owners);
    }

    /// Runs a pod on the node holding the VF at `address` (IOMMU group
    /// `group`) of pool `resource`: its Pod object, its process with the
    /// group open, its entry in `List`. The pod is `holder-<node>`.
    ///
    /// # Errors
    /// The API server's refusal, or the process's directory.
    pub async fn hold(
        &self,
        client: &Client,
        address: PciAddress,
        group: u32,
        resource: &str,
    ) -> Result<(), KubeletError> {
        let node = &self.inner.node;
        let name = format!("holder-{node}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": {HOLDER_LABEL: "true"}},
            "spec": {
                "nodeName": node,
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 30,
                "containers": [{"name": "app", "image": "registry.invalid/pmd:none"}],
            },
        }))
        .map_err(|error| KubeletError::Process {
            node: node.clone(),
            address,
            dir: self.inner.proc_root.clone(),
            source: std::io::Error::other(error),
        })?;
        let created = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|source| KubeletError::Pod {
                node: node.clone(),
                pod: name.clone(),
                source,
            })?;
        self.run_holder(
            &name,
            created.metadata.uid.as_deref().unwrap_or_default(),
            address,
            group,
            resource,
        )
    }

    /// The node's side of [`Self::hold`]: the pod's process with the VF's
    /// group open, and its entry in `List`; the agent is told.
    ///
    /// # Errors
    /// The process's directory could not be made.
    pub fn run_holder(
        &self,
        pod: &str,
        uid: &str,
        address: PciAddress,
        group: u32,
        resource: &str,
    ) -> Result<(), KubeletError> {
        let node = &self.inner.node;
        let pid = 1000 + group;
        let dir = self.inner.proc_root.join(pid.to_string()).join("fd");
        let made = std::fs::create_dir_all(&dir).and_then(|()| {
            std::os::unix::fs::symlink(
                self.inner.dev_root.join("vfio").join(group.to_string()),
                dir.join("3"),
            )
        });
        made.map_err(|source| KubeletError::Process {
            node: node.clone(),
            address,
            dir: dir.clone(),
            source,
        })?;
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Held {
                pod: pod.to_owned(),
                uid: uid.to_owned(),
                resource: resource.to_owned(),
                address,
                pid,
            });
        self.poke_agent();
        Ok(())
    }

    /// What the kubelet does for a deleted pod: its processes end, it
    /// leaves `List`, the agent is told. True when the pod held a VF here.
    ///
    /// # Errors
    /// The process's directory could not be removed.
    pub fn pod_gone(&self, pod: &str, uid: &str) -> Result<bool, KubeletError> {
        let gone: Vec<Held> = {
            let mut held = self.inner.held.lock().unwrap_or_else(PoisonError::into_inner);
            let (gone, kept) = held.drain(..).partition(|h| h.pod == pod && h.uid == uid);
            *held = kept;
            gone
        };
        for h in &gone {
            let dir = self.inner.proc_root.join(h.pid.to_string());
            std::fs::remove_dir_all(&dir).map_err(|source| KubeletError::Process {
                node: self.inner.node.clone(),
                address: h.address,
                dir,
                source,
            })?;
        }
        if !gone.is_empty() {
            self.poke_agent();
        }
        Ok(!gone.is_empty())
    }

    /// Pods holding a VF here now.
    pub fn held(&self) -> usize {
        self.inner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Follows the fleet's pods until the watch ends: a pod with a
/// `deletionTimestamp` is let go on its node ([`SimulatedKubelet::pod_gone`])
/// and its object removed, as the kubelet does once its containers are
/// gone. `gone` counts the pods it let go.
pub async fn follow_pods(
    client: Client,
    kubelets: HashMap<String, SimulatedKubelet>,
    gone: Arc<std::sync::atomic::AtomicUsize>,
) {
    let api = Api::<Pod>::namespaced(client, NAMESPACE);
    let config = watcher::Config::default().labels(&format!("{HOLDER_LABEL}=true"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "the fleet's pod watch; the watcher retries");
                continue;
            }
        };
        if pod.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let (Some(name), Some(uid)) = (pod.metadata.name.as_deref(), pod.metadata.uid.as_deref()) else {
            continue;
        };
        let Some(kubelet) = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .and_then(|node| kubelets.get(node))
        else {
            continue;
        };
        match kubelet.pod_gone(name, uid) {
            Ok(true) => {
                gone.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(error = %vfplane_host::error_chain(&error), "letting a pod go"),
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        if let Err(error) = api.delete(name, &params).await
            && !matches!(&error, kube::Error::Api(status) if status.code == 404)
        {
            tracing::warn!(%error, pod = name, "removing a deleted pod");
        }
    }
}

#[cfg(test)]
mod tests {
    use vfplane_agent::attribution::PodResources;

    use super::*;

    #[test]
    fn a_held_vf_has_a_holder_process_and_an_owner_until_its_pod_is_gone() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = std::env::temp_dir().join(format!("vfplane-fleet-kubelet-{}", std::process::id()));
        let (proc_root, dev_root) = (dir.join("proc"), dir.join("dev"));
        std::fs::create_dir_all(&proc_root).unwrap();
        let (tx, rx) = mpsc::channel();
        let kubelet = SimulatedKubelet::start(
            "fleet-00001",
            &proc_root,
            &dev_root,
            &dir.join("pod-resources.sock"),
            tx,
            runtime.handle(),
        )
        .unwrap();
        let vf: PciAddress = "0000:01:10.0".parse().unwrap();
        kubelet
            .run_holder("holder-fleet-00001", "uid-1", vf, 7, "vfplane.io/fast")
            .unwrap();
        assert_eq!(rx.try_recv().unwrap(), Trigger::Owners, "the agent is told");
        let group_node = dev_root.join("vfio/7");
        let holders = vfplane_agent::reconcile::vfio_group_holders(&proc_root, &group_node, 7).unwrap();
        assert_eq!(holders, [1007], "the agent's scan sees the group held");
        let owners = PodResources::new(kubelet.socket(), runtime.handle().clone())
            .owners()
            .unwrap();
        assert_eq!(owners[&vf].to_string(), "fleet/holder-fleet-00001/app");
        assert_eq!(owners[&vf].resource, "vfplane.io/fast");

        assert!(
            !kubelet.pod_gone("holder-fleet-00001", "another-uid").unwrap(),
            "another pod of that name"
        );
        assert!(kubelet.pod_gone("holder-fleet-00001", "uid-1").unwrap());
        assert_eq!(rx.try_recv().unwrap(), Trigger::Owners);
        assert!(
            vfplane_agent::reconcile::vfio_group_holders(&proc_root, &group_node, 7)
                .unwrap()
                .is_empty()
        );
        let owners = PodResources::new(kubelet.socket(), runtime.handle().clone())
            .owners()
            .unwrap();
        assert!(owners.is_empty(), "{owners:?}");
        assert_eq!(kubelet.held(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
