//! gRPC method paths of the generated services.
//!
//! The kubelet routes calls by the exact HTTP/2 path
//! `/<proto package>.<Service>/<Method>`, so a wrong package, service or
//! method name breaks interop as surely as a wrong field number. Each
//! generated client here talks to the generated server in process, through
//! a wrapper that records the path of every request.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::codegen::tokio_stream;
use tonic::codegen::{Service, http};
use tonic::{Request, Response, Status};
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::podresources::v1 as pr;

/// Forwards every request to `inner` and remembers its path.
#[derive(Debug, Clone)]
struct PathRecorder<S> {
    inner: S,
    paths: Arc<Mutex<Vec<String>>>,
}

impl<S> PathRecorder<S> {
    fn new(inner: S) -> (Self, Arc<Mutex<Vec<String>>>) {
        let paths = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                inner,
                paths: Arc::clone(&paths),
            },
            paths,
        )
    }
}

impl<S, B> Service<http::Request<B>> for PathRecorder<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.paths.lock().unwrap().push(req.uri().path().to_owned());
        self.inner.call(req)
    }
}

fn recorded(paths: &Mutex<Vec<String>>) -> Vec<String> {
    paths.lock().unwrap().clone()
}

#[derive(Debug)]
struct Kubelet;

#[tonic::async_trait]
impl dp::registration_server::Registration for Kubelet {
    async fn register(&self, request: Request<dp::RegisterRequest>) -> Result<Response<dp::Empty>, Status> {
        if request.get_ref().version == vfplane_proto::DEVICE_PLUGIN_VERSION {
            Ok(Response::new(dp::Empty {}))
        } else {
            Err(Status::invalid_argument("unsupported version"))
        }
    }
}

#[derive(Debug)]
struct Plugin;

#[tonic::async_trait]
impl dp::device_plugin_server::DevicePlugin for Plugin {
    type ListAndWatchStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<dp::ListAndWatchResponse, Status>>>;

    async fn get_device_plugin_options(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(dp::DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: true,
        }))
    }

    async fn list_and_watch(
        &self,
        _request: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let snapshot = |health: &str| {
            Ok(dp::ListAndWatchResponse {
                devices: vec![dp::Device {
                    id: "0000:3b:02.1".to_owned(),
                    health: health.to_owned(),
                    topology: None,
                }],
            })
        };
        let updates = vec![
            snapshot(vfplane_proto::HEALTHY),
            snapshot(vfplane_proto::UNHEALTHY),
        ];
        Ok(Response::new(tokio_stream::iter(updates)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|req| {
                let size = usize::try_from(req.allocation_size).unwrap_or(0);
                dp::ContainerPreferredAllocationResponse {
                    device_i_ds: req.available_device_i_ds.into_iter().take(size).collect(),
                }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|req| dp::ContainerAllocateResponse {
                envs: HashMap::from([("VFS".to_owned(), req.devices_ids.join(","))]),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(dp::AllocateResponse { container_responses }))
    }

    async fn pre_start_container(
        &self,
        _request: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

#[derive(Debug)]
struct PodResourcesKubelet;

#[tonic::async_trait]
impl pr::pod_resources_lister_server::PodResourcesLister for PodResourcesKubelet {
    async fn list(
        &self,
        _request: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: vec![pr::PodResources {
                name: "router-0".to_owned(),
                ..Default::default()
            }],
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _request: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Ok(Response::new(pr::AllocatableResourcesResponse {
            cpu_ids: vec![0, 1],
            ..Default::default()
        }))
    }

    async fn get(
        &self,
        request: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(pr::GetPodResourcesResponse {
            pod_resources: Some(pr::PodResources {
                name: req.pod_name,
                namespace: req.pod_namespace,
                containers: Vec::new(),
            }),
        }))
    }
}

#[test]
fn service_names() {
    assert_eq!(dp::registration_server::SERVICE_NAME, "v1beta1.Registration");
    assert_eq!(dp::device_plugin_server::SERVICE_NAME, "v1beta1.DevicePlugin");
    assert_eq!(
        pr::pod_resources_lister_server::SERVICE_NAME,
        "v1.PodResourcesLister"
    );
}

#[tokio::test]
async fn registration_paths() {
    let (svc, paths) = PathRecorder::new(dp::registration_server::RegistrationServer::new(Kubelet));
    let mut client = dp::registration_client::RegistrationClient::new(svc);

    client
        .register(dp::RegisterRequest {
            version: vfplane_proto::DEVICE_PLUGIN_VERSION.to_owned(),
            endpoint: "vf.sock".to_owned(),
            resource_name: "vfplane.io/vf".to_owned(),
            options: None,
        })
        .await
        .unwrap();
    let status = client
        .register(dp::RegisterRequest {
            version: "v1alpha".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    assert_eq!(
        recorded(&paths),
        ["/v1beta1.Registration/Register", "/v1beta1.Registration/Register"]
    );
}

#[tokio::test]
async fn device_plugin_paths() {
    let (svc, paths) = PathRecorder::new(dp::device_plugin_server::DevicePluginServer::new(Plugin));
    let mut client = dp::device_plugin_client::DevicePluginClient::new(svc);

    let options = client
        .get_device_plugin_options(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    assert!(options.get_preferred_allocation_available);

    let mut stream = client.list_and_watch(dp::Empty {}).await.unwrap().into_inner();
    let mut health = Vec::new();
    while let Some(update) = stream.message().await.unwrap() {
        health.extend(update.devices.into_iter().map(|d| d.health));
    }
    assert_eq!(health, [vfplane_proto::HEALTHY, vfplane_proto::UNHEALTHY]);

    let preferred = client
        .get_preferred_allocation(dp::PreferredAllocationRequest {
            container_requests: vec![dp::ContainerPreferredAllocationRequest {
                available_device_i_ds: vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
                must_include_device_i_ds: Vec::new(),
                allocation_size: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(preferred.container_responses[0].device_i_ds, ["a", "b"]);

    let allocated = client
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["a".to_owned(), "b".to_owned()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allocated.container_responses[0].envs["VFS"], "a,b");

    client
        .pre_start_container(dp::PreStartContainerRequest {
            devices_ids: vec!["a".to_owned()],
        })
        .await
        .unwrap();

    assert_eq!(
        recorded(&paths),
        [
            "/v1beta1.DevicePlugin/GetDevicePluginOptions",
            "/v1beta1.DevicePlugin/ListAndWatch",
            "/v1beta1.DevicePlugin/GetPreferredAllocation",
            "/v1beta1.DevicePlugin/Allocate",
            "/v1beta1.DevicePlugin/PreStartContainer",
        ]
    );
}

#[tokio::test]
async fn pod_resources_paths() {
    let (svc, paths) = PathRecorder::new(pr::pod_resources_lister_server::PodResourcesListerServer::new(
        PodResourcesKubelet,
    ));
    let mut client = pr::pod_resources_lister_client::PodResourcesListerClient::new(svc);

    let list = client
        .list(pr::ListPodResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.pod_resources[0].name, "router-0");

    let allocatable = client
        .get_allocatable_resources(pr::AllocatableResourcesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allocatable.cpu_ids, [0, 1]);

    let pod = client
        .get(pr::GetPodResourcesRequest {
            pod_name: "router-0".to_owned(),
            pod_namespace: "tenant-a".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_resources
        .unwrap();
    assert_eq!(
        (pod.name.as_str(), pod.namespace.as_str()),
        ("router-0", "tenant-a")
    );

    assert_eq!(
        recorded(&paths),
        [
            "/v1.PodResourcesLister/List",
            "/v1.PodResourcesLister/GetAllocatableResources",
            "/v1.PodResourcesLister/Get",
        ]
    );
}
