#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use super::*;
use vfplane_proto::node_state::{PfStatus, VfStatus};
use vfplane_proto::podresources::v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};

fn devices(resource: &str, ids: &[&str]) -> pr::ContainerDevices {
    pr::ContainerDevices {
        resource_name: resource.to_owned(),
        device_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        topology: None,
    }
}

fn pod(namespace: &str, name: &str, containers: Vec<(&str, Vec<pr::ContainerDevices>)>) -> pr::PodResources {
    pr::PodResources {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        containers: containers
            .into_iter()
            .map(|(name, devices)| pr::ContainerResources {
                name: name.to_owned(),
                devices,
                ..Default::default()
            })
            .collect(),
    }
}

fn sample() -> pr::ListPodResourcesResponse {
    pr::ListPodResourcesResponse {
        pod_resources: vec![
            pod(
                "trading",
                "gw-0",
                vec![
                    (
                        "main",
                        vec![devices("vfplane.io/fast", &["0000:00:12.0", "0000:00:12.2"])],
                    ),
                    ("sidecar", vec![devices("example.com/gpu", &["gpu-0"])]),
                ],
            ),
            pod("default", "idle", vec![("app", Vec::new())]),
            pod(
                "telco",
                "upf",
                vec![("dp", vec![devices("vfplane.io/slow", &["0000:21:10.0"])])],
            ),
        ],
    }
}

fn address(s: &str) -> PciAddress {
    s.parse().unwrap()
}

#[test]
fn owners_are_the_containers_given_vfplane_devices() {
    let owners = owners_from(&sample()).unwrap();
    assert_eq!(owners.len(), 3, "{owners:?}");
    assert_eq!(owners[&address("0000:00:12.0")].to_string(), "trading/gw-0/main");
    assert_eq!(owners[&address("0000:00:12.2")].to_string(), "trading/gw-0/main");
    assert_eq!(owners[&address("0000:21:10.0")].to_string(), "telco/upf/dp");
    assert_eq!(owners[&address("0000:21:10.0")].resource, "vfplane.io/slow");
}

fn claim(namespace: &str, name: &str, devices: Vec<(&str, &str, &[&str])>) -> pr::DynamicResource {
    pr::DynamicResource {
        claim_name: name.to_owned(),
        claim_namespace: namespace.to_owned(),
        claim_resources: devices
            .into_iter()
            .map(|(driver, device, cdi)| pr::ClaimResource {
                cdi_devices: cdi
                    .iter()
                    .map(|n| pr::CdiDevice {
                        name: (*n).to_owned(),
                    })
                    .collect(),
                driver_name: driver.to_owned(),
                pool_name: "node-a".to_owned(),
                device_name: device.to_owned(),
            })
            .collect(),
    }
}

#[test]
fn a_dra_claims_vfs_are_owned_by_the_containers_that_use_the_claim() {
    let mut sample = sample();
    sample.pod_resources.push(pr::PodResources {
        name: "dra-pod".to_owned(),
        namespace: "ran".to_owned(),
        containers: vec![pr::ContainerResources {
            name: "du".to_owned(),
            cpu_ids: vec![3, 4],
            dynamic_resources: vec![claim(
                "ran",
                "du-vfs",
                vec![
                    (
                        DRA_DRIVER,
                        "0000-00-12-4",
                        &["vfplane.io/claim=uid-0000-00-12-4", "vfplane.io/vf=0000:00:12.4"],
                    ),
                    (DRA_DRIVER, "0000-00-12-6", &[]),
                    ("gpu.example.com", "gpu-0", &["example.com/gpu=0"]),
                ],
            )],
            ..Default::default()
        }],
    });
    let owners = owners_from(&sample).unwrap();
    assert_eq!(owners.len(), 5, "{owners:?}");
    for vf in ["0000:00:12.4", "0000:00:12.6"] {
        let owner = &owners[&address(vf)];
        assert_eq!(owner.to_string(), "ran/dra-pod/du");
        assert_eq!(owner.resource, "claim ran/du-vfs");
        assert_eq!(owner.exclusive_cpus, [3, 4]);
    }
}

#[test]
fn a_dra_device_of_ours_that_names_no_vf_is_named() {
    let response = pr::ListPodResourcesResponse {
        pod_resources: vec![pr::PodResources {
            name: "p".to_owned(),
            namespace: "ns".to_owned(),
            containers: vec![pr::ContainerResources {
                name: "c".to_owned(),
                dynamic_resources: vec![claim("ns", "cl", vec![(DRA_DRIVER, "nic-7", &[])])],
                ..Default::default()
            }],
        }],
    };
    let error = owners_from(&response).unwrap_err().to_string();
    assert!(
        error.contains("\"nic-7\"") && error.contains("claim ns/cl") && error.contains("ns/p/c"),
        "{error}"
    );
}

#[test]
fn a_device_of_ours_that_is_not_a_pci_address_is_named() {
    let response = pr::ListPodResourcesResponse {
        pod_resources: vec![pod(
            "ns",
            "p",
            vec![("c", vec![devices("vfplane.io/fast", &["vf-7"])])],
        )],
    };
    let error = owners_from(&response).unwrap_err().to_string();
    assert!(error.contains("\"vf-7\"") && error.contains("ns/p/c"), "{error}");
}

#[test]
fn one_vf_listed_for_two_containers_is_an_error() {
    let response = pr::ListPodResourcesResponse {
        pod_resources: vec![
            pod(
                "a",
                "one",
                vec![("c", vec![devices("vfplane.io/fast", &["0000:00:12.0"])])],
            ),
            pod(
                "b",
                "two",
                vec![("c", vec![devices("vfplane.io/fast", &["0000:00:12.0"])])],
            ),
        ],
    };
    let error = owners_from(&response).unwrap_err().to_string();
    assert!(error.contains("a/one/c") && error.contains("b/two/c"), "{error}");
}

#[test]
fn annotate_sets_and_clears_owners() {
    let vf = |address: &str, owner: Option<&str>| VfStatus {
        pci_address: address.to_owned(),
        owner: owner.map(str::to_owned),
        ..VfStatus::default()
    };
    let mut status = NodeStateStatus {
        pfs: vec![PfStatus {
            vfs: vec![vf("0000:00:12.0", None), vf("0000:00:12.2", Some("gone/pod/c"))],
            ..PfStatus::default()
        }],
        ..NodeStateStatus::default()
    };
    let mut owners = Owners::new();
    owners.insert(
        address("0000:00:12.0"),
        Owner {
            namespace: "ns".into(),
            pod: "p".into(),
            container: "c".into(),
            resource: "vfplane.io/fast".into(),
            exclusive_cpus: Vec::new(),
        },
    );
    annotate(&mut status, &owners);
    let got: Vec<Option<&str>> = status.pfs[0].vfs.iter().map(|v| v.owner.as_deref()).collect();
    assert_eq!(got, [Some("ns/p/c"), None]);
}

/// A kubelet stand-in serving `List` with a canned answer.
struct Lister(pr::ListPodResourcesResponse);

#[tonic::async_trait]
impl PodResourcesLister for Lister {
    async fn list(
        &self,
        _: tonic::Request<pr::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::ListPodResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.clone()))
    }

    async fn get_allocatable_resources(
        &self,
        _: tonic::Request<pr::AllocatableResourcesRequest>,
    ) -> Result<tonic::Response<pr::AllocatableResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }

    async fn get(
        &self,
        _: tonic::Request<pr::GetPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::GetPodResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }
}

#[test]
fn the_client_reads_owners_over_the_kubelet_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kubelet.sock");
    let server_runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = {
        let _guard = server_runtime.enter();
        tokio::net::UnixListener::bind(&socket).unwrap()
    };
    server_runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(Lister(sample())))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let client = PodResources::new(&socket, server_runtime.handle().clone());
    let owners = client.owners().unwrap();
    assert_eq!(owners[&address("0000:00:12.2")].to_string(), "trading/gw-0/main");
    assert_eq!(owners.len(), 3);
}

#[test]
fn a_missing_socket_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let error = PodResources::new(&socket, runtime.handle().clone())
        .owners()
        .unwrap_err();
    let text = vfplane_host::error_chain(&error);
    assert!(text.contains("absent.sock"), "{text}");
}
