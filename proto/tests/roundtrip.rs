//! Wire-format checks for the generated kubelet API types.
//!
//! Every message of both protos is filled with non-default values in every
//! field, encoded and decoded again. A small independent wire walker checks
//! that each of those fields really reached the wire under the field number
//! upstream uses, and a few encodings are compared byte for byte with
//! hand-computed buffers.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;

use prost::Message;
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::podresources::v1 as pr;

/// Encodes `msg`, decodes it again and checks both copies are equal.
/// Returns the encoding.
fn roundtrip<M: Message + Default + PartialEq + Debug>(msg: &M) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    assert_eq!(bytes.len(), msg.encoded_len());
    let back = M::decode(bytes.as_slice()).unwrap();
    assert_eq!(&back, msg);
    // Length-delimited framing as used by streams must round-trip too.
    let framed = msg.encode_length_delimited_to_vec();
    assert_eq!(&M::decode_length_delimited(framed.as_slice()).unwrap(), msg);
    bytes
}

/// Reads a base-128 varint from the front of `buf`.
fn read_varint(buf: &mut &[u8]) -> u64 {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().unwrap();
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
    }
    panic!("varint longer than 10 bytes");
}

/// Top-level field numbers present in an encoded message, written without
/// prost so that it checks the encoder rather than mirrors it.
fn field_numbers(mut buf: &[u8]) -> BTreeSet<u64> {
    let mut fields = BTreeSet::new();
    while !buf.is_empty() {
        let key = read_varint(&mut buf);
        fields.insert(key >> 3);
        match key & 7 {
            0 => {
                read_varint(&mut buf);
            }
            1 => buf = &buf[8..],
            2 => {
                let len = usize::try_from(read_varint(&mut buf)).unwrap();
                buf = &buf[len..];
            }
            5 => buf = &buf[4..],
            other => panic!("unexpected wire type {other}"),
        }
    }
    fields
}

/// Round-trips `msg` and checks that exactly the field numbers in
/// `expected` appear on the wire, i.e. no field was left at its default.
fn check<M: Message + Default + PartialEq + Debug>(msg: &M, expected: &[u64]) {
    let bytes = roundtrip(msg);
    let want: BTreeSet<u64> = expected.iter().copied().collect();
    assert_eq!(
        field_numbers(&bytes),
        want,
        "fields on the wire for {}",
        std::any::type_name::<M>()
    );
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn map(items: &[(&str, &str)]) -> HashMap<String, String> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

mod deviceplugin {
    use super::*;

    fn options() -> dp::DevicePluginOptions {
        dp::DevicePluginOptions {
            pre_start_required: true,
            get_preferred_allocation_available: true,
        }
    }

    fn topology() -> dp::TopologyInfo {
        dp::TopologyInfo {
            nodes: vec![
                dp::NumaNode { id: 0 },
                dp::NumaNode { id: 1 },
                dp::NumaNode { id: -1 },
            ],
        }
    }

    fn device(id: &str) -> dp::Device {
        dp::Device {
            id: id.to_owned(),
            health: vfplane_proto::UNHEALTHY.to_owned(),
            topology: Some(topology()),
        }
    }

    fn container_allocate_response() -> dp::ContainerAllocateResponse {
        dp::ContainerAllocateResponse {
            envs: map(&[("PCIDEVICE_VFPLANE_IO_VF", "0000:3b:02.1"), ("MTU", "9000")]),
            mounts: vec![dp::Mount {
                container_path: "/dev/hugepages".to_owned(),
                host_path: "/mnt/huge".to_owned(),
                read_only: true,
            }],
            devices: vec![
                dp::DeviceSpec {
                    container_path: "/dev/vfio/42".to_owned(),
                    host_path: "/dev/vfio/42".to_owned(),
                    permissions: "rw".to_owned(),
                },
                dp::DeviceSpec {
                    container_path: "/dev/vfio/vfio".to_owned(),
                    host_path: "/dev/vfio/vfio".to_owned(),
                    permissions: "rwm".to_owned(),
                },
            ],
            annotations: map(&[("vfplane.io/vf", "0000:3b:02.1")]),
            cdi_devices: vec![dp::CdiDevice {
                name: "vfplane.io/vf=0000:3b:02.1".to_owned(),
            }],
        }
    }

    #[test]
    fn device_plugin_options() {
        check(&options(), &[1, 2]);
    }

    #[test]
    fn register_request() {
        check(
            &dp::RegisterRequest {
                version: vfplane_proto::DEVICE_PLUGIN_VERSION.to_owned(),
                endpoint: "vfplane-vf.sock".to_owned(),
                resource_name: "vfplane.io/vf".to_owned(),
                options: Some(options()),
            },
            &[1, 2, 3, 4],
        );
    }

    #[test]
    fn empty() {
        check(&dp::Empty {}, &[]);
    }

    #[test]
    fn list_and_watch_response() {
        check(
            &dp::ListAndWatchResponse {
                devices: vec![device("0000:3b:02.0"), device("0000:3b:02.1")],
            },
            &[1],
        );
    }

    #[test]
    fn topology_info() {
        check(&topology(), &[1]);
    }

    #[test]
    fn numa_node() {
        check(&dp::NumaNode { id: 3 }, &[1]);
        check(&dp::NumaNode { id: i64::MIN }, &[1]);
    }

    #[test]
    fn device_message() {
        check(&device("0000:3b:02.1"), &[1, 2, 3]);
    }

    #[test]
    fn pre_start_container_request() {
        check(
            &dp::PreStartContainerRequest {
                devices_ids: strings(&["0000:3b:02.0", "0000:3b:02.1"]),
            },
            &[1],
        );
    }

    #[test]
    fn pre_start_container_response() {
        check(&dp::PreStartContainerResponse {}, &[]);
    }

    #[test]
    fn preferred_allocation_request() {
        let container = dp::ContainerPreferredAllocationRequest {
            available_device_i_ds: strings(&["a", "b", "c"]),
            must_include_device_i_ds: strings(&["b"]),
            allocation_size: 2,
        };
        check(&container, &[1, 2, 3]);
        check(
            &dp::PreferredAllocationRequest {
                container_requests: vec![container.clone(), container],
            },
            &[1],
        );
    }

    #[test]
    fn preferred_allocation_response() {
        let container = dp::ContainerPreferredAllocationResponse {
            device_i_ds: strings(&["b", "c"]),
        };
        check(&container, &[1]);
        check(
            &dp::PreferredAllocationResponse {
                container_responses: vec![container],
            },
            &[1],
        );
    }

    #[test]
    fn allocate_request() {
        let container = dp::ContainerAllocateRequest {
            devices_ids: strings(&["0000:3b:02.1"]),
        };
        check(&container, &[1]);
        check(
            &dp::AllocateRequest {
                container_requests: vec![container],
            },
            &[1],
        );
    }

    #[test]
    fn cdi_device() {
        check(
            &dp::CdiDevice {
                name: "vfplane.io/vf=0000:3b:02.1".to_owned(),
            },
            &[1],
        );
    }

    #[test]
    fn allocate_response() {
        check(&container_allocate_response(), &[1, 2, 3, 4, 5]);
        check(
            &dp::AllocateResponse {
                container_responses: vec![container_allocate_response(), container_allocate_response()],
            },
            &[1],
        );
    }

    #[test]
    fn mount() {
        check(
            &dp::Mount {
                container_path: "/etc/vfplane".to_owned(),
                host_path: "/var/lib/vfplane".to_owned(),
                read_only: true,
            },
            &[1, 2, 3],
        );
    }

    #[test]
    fn device_spec() {
        check(
            &dp::DeviceSpec {
                container_path: "/dev/vfio/7".to_owned(),
                host_path: "/dev/vfio/7".to_owned(),
                permissions: "rwm".to_owned(),
            },
            &[1, 2, 3],
        );
    }
}

mod podresources {
    use super::*;

    fn topology() -> pr::TopologyInfo {
        pr::TopologyInfo {
            nodes: vec![pr::NumaNode { id: 1 }, pr::NumaNode { id: 2 }],
        }
    }

    fn container_devices() -> pr::ContainerDevices {
        pr::ContainerDevices {
            resource_name: "vfplane.io/vf".to_owned(),
            device_ids: strings(&["0000:3b:02.0", "0000:3b:02.1"]),
            topology: Some(topology()),
        }
    }

    fn container_memory() -> pr::ContainerMemory {
        pr::ContainerMemory {
            memory_type: "hugepages-1Gi".to_owned(),
            size: 4 << 30,
            topology: Some(topology()),
        }
    }

    fn claim_resource() -> pr::ClaimResource {
        pr::ClaimResource {
            cdi_devices: vec![pr::CdiDevice {
                name: "vfplane.io/vf=0000:3b:02.1".to_owned(),
            }],
            driver_name: "vf.vfplane.io".to_owned(),
            pool_name: "node-1".to_owned(),
            device_name: "pf0-vf1".to_owned(),
        }
    }

    fn dynamic_resource() -> pr::DynamicResource {
        pr::DynamicResource {
            claim_name: "net-claim".to_owned(),
            claim_namespace: "tenant-a".to_owned(),
            claim_resources: vec![claim_resource(), claim_resource()],
        }
    }

    fn container_resources() -> pr::ContainerResources {
        pr::ContainerResources {
            name: "dpdk".to_owned(),
            devices: vec![container_devices()],
            cpu_ids: vec![2, 3, 66, 67],
            memory: vec![container_memory()],
            dynamic_resources: vec![dynamic_resource()],
        }
    }

    fn pod_resources() -> pr::PodResources {
        pr::PodResources {
            name: "router-0".to_owned(),
            namespace: "tenant-a".to_owned(),
            containers: vec![container_resources()],
        }
    }

    #[test]
    fn allocatable_resources_request() {
        check(&pr::AllocatableResourcesRequest {}, &[]);
    }

    #[test]
    fn allocatable_resources_response() {
        check(
            &pr::AllocatableResourcesResponse {
                devices: vec![container_devices()],
                cpu_ids: vec![0, 1, 2, 3, 127],
                memory: vec![container_memory()],
            },
            &[1, 2, 3],
        );
    }

    #[test]
    fn list_pod_resources_request() {
        check(&pr::ListPodResourcesRequest {}, &[]);
    }

    #[test]
    fn list_pod_resources_response() {
        check(
            &pr::ListPodResourcesResponse {
                pod_resources: vec![pod_resources(), pod_resources()],
            },
            &[1],
        );
    }

    #[test]
    fn pod_resources_message() {
        check(&pod_resources(), &[1, 2, 3]);
    }

    #[test]
    fn container_resources_message() {
        check(&container_resources(), &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn container_memory_message() {
        check(&container_memory(), &[1, 2, 3]);
    }

    #[test]
    fn container_devices_message() {
        check(&container_devices(), &[1, 2, 3]);
    }

    #[test]
    fn topology_info() {
        check(&topology(), &[1]);
    }

    #[test]
    fn numa_node() {
        check(&pr::NumaNode { id: 7 }, &[1]);
    }

    #[test]
    fn dynamic_resource_message() {
        // Field 1 is a tombstone upstream: the message starts at 2.
        check(&dynamic_resource(), &[2, 3, 4]);
    }

    #[test]
    fn claim_resource_message() {
        check(&claim_resource(), &[1, 2, 3, 4]);
    }

    #[test]
    fn cdi_device() {
        check(
            &pr::CdiDevice {
                name: "vfplane.io/vf=0000:3b:02.0".to_owned(),
            },
            &[1],
        );
    }

    #[test]
    fn get_pod_resources_request() {
        check(
            &pr::GetPodResourcesRequest {
                pod_name: "router-0".to_owned(),
                pod_namespace: "tenant-a".to_owned(),
            },
            &[1, 2],
        );
    }

    #[test]
    fn get_pod_resources_response() {
        check(
            &pr::GetPodResourcesResponse {
                pod_resources: Some(pod_resources()),
            },
            &[1],
        );
    }
}

/// Encodings compared with bytes worked out by hand from the protobuf
/// encoding rules: key = (field_number << 3) | wire_type, wire type 0 for
/// varints and 2 for strings, bytes, sub-messages and packed repeats.
mod wire_bytes {
    use super::*;

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn register_request_version_only() {
        let msg = dp::RegisterRequest {
            version: "v1beta1".to_owned(),
            ..Default::default()
        };
        assert_eq!(msg.encode_to_vec(), concat(&[&[0x0a, 0x07], b"v1beta1"]));
    }

    #[test]
    fn register_request_all_fields() {
        let msg = dp::RegisterRequest {
            version: "v1beta1".to_owned(),
            endpoint: "vf.sock".to_owned(),
            resource_name: "x/vf".to_owned(),
            options: Some(dp::DevicePluginOptions {
                pre_start_required: true,
                get_preferred_allocation_available: true,
            }),
        };
        let want = concat(&[
            &[0x0a, 0x07],
            b"v1beta1",
            &[0x12, 0x07],
            b"vf.sock",
            &[0x1a, 0x04],
            b"x/vf",
            // options: field 4, 4 bytes: field 1 = 1, field 2 = 1
            &[0x22, 0x04, 0x08, 0x01, 0x10, 0x01],
        ]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn device_with_topology() {
        let msg = dp::Device {
            id: "a".to_owned(),
            health: "Healthy".to_owned(),
            topology: Some(dp::TopologyInfo {
                nodes: vec![dp::NumaNode { id: 1 }],
            }),
        };
        let want = concat(&[
            &[0x0a, 0x01],
            b"a",
            &[0x12, 0x07],
            b"Healthy",
            // topology (3) { nodes (1) { ID (1) = 1 } }
            &[0x1a, 0x04, 0x0a, 0x02, 0x08, 0x01],
        ]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn container_preferred_allocation_request() {
        let msg = dp::ContainerPreferredAllocationRequest {
            available_device_i_ds: strings(&["a", "b"]),
            must_include_device_i_ds: strings(&["b"]),
            allocation_size: 2,
        };
        let want = concat(&[
            &[0x0a, 0x01],
            b"a",
            &[0x0a, 0x01],
            b"b",
            &[0x12, 0x01],
            b"b",
            &[0x18, 0x02],
        ]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn container_allocate_response_annotations_and_cdi() {
        let msg = dp::ContainerAllocateResponse {
            annotations: map(&[("k", "v")]),
            cdi_devices: vec![dp::CdiDevice { name: "d".to_owned() }],
            mounts: vec![dp::Mount {
                read_only: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let want = concat(&[
            // mounts (2) { read_only (3) = true }
            &[0x12, 0x02, 0x18, 0x01],
            // annotations (4): map entry { key (1) = "k", value (2) = "v" }
            &[0x22, 0x06, 0x0a, 0x01, b'k', 0x12, 0x01, b'v'],
            // cdi_devices (5) { name (1) = "d" }
            &[0x2a, 0x03, 0x0a, 0x01, b'd'],
        ]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn container_resources_packed_cpu_ids() {
        let msg = pr::ContainerResources {
            name: "c".to_owned(),
            cpu_ids: vec![1, 300],
            ..Default::default()
        };
        // cpu_ids (3) is packed: one length-delimited run of varints,
        // 300 = 0xac 0x02.
        let want = concat(&[&[0x0a, 0x01], b"c", &[0x1a, 0x03, 0x01, 0xac, 0x02]]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn dynamic_resource_starts_at_field_two() {
        let msg = pr::DynamicResource {
            claim_name: "c".to_owned(),
            claim_namespace: "n".to_owned(),
            ..Default::default()
        };
        assert_eq!(
            msg.encode_to_vec(),
            concat(&[&[0x12, 0x01], b"c", &[0x1a, 0x01], b"n"])
        );
    }

    #[test]
    fn claim_resource_all_fields() {
        let msg = pr::ClaimResource {
            cdi_devices: vec![pr::CdiDevice { name: "x".to_owned() }],
            driver_name: "d".to_owned(),
            pool_name: "p".to_owned(),
            device_name: "v".to_owned(),
        };
        let want = concat(&[
            &[0x0a, 0x03, 0x0a, 0x01, b'x'],
            &[0x12, 0x01, b'd'],
            &[0x1a, 0x01, b'p'],
            &[0x22, 0x01, b'v'],
        ]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn container_memory_size_is_varint_field_two() {
        let msg = pr::ContainerMemory {
            memory_type: "m".to_owned(),
            size: 1 << 30,
            topology: None,
        };
        // 2^30 as varint: 0x80 0x80 0x80 0x80 0x04
        let want = concat(&[&[0x0a, 0x01], b"m", &[0x10, 0x80, 0x80, 0x80, 0x80, 0x04]]);
        assert_eq!(msg.encode_to_vec(), want);
    }

    #[test]
    fn get_pod_resources_request() {
        let msg = pr::GetPodResourcesRequest {
            pod_name: "p".to_owned(),
            pod_namespace: "n".to_owned(),
        };
        assert_eq!(msg.encode_to_vec(), vec![0x0a, 0x01, b'p', 0x12, 0x01, b'n']);
    }

    #[test]
    fn decodes_hand_written_list_and_watch_response() {
        // devices (1) { ID (1) = "v", health (2) = "Unhealthy" }
        let bytes = concat(&[&[0x0a, 0x0e, 0x0a, 0x01, b'v', 0x12, 0x09], b"Unhealthy"]);
        let msg = dp::ListAndWatchResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(
            msg,
            dp::ListAndWatchResponse {
                devices: vec![dp::Device {
                    id: "v".to_owned(),
                    health: vfplane_proto::UNHEALTHY.to_owned(),
                    topology: None,
                }],
            }
        );
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // A newer kubelet may send fields we do not know: field 15 varint and
        // field 16 string are ignored, field 1 still decodes.
        let bytes = concat(&[
            &[0x78, 0x05],
            &[0x82, 0x01, 0x02, b'h', b'i'],
            &[0x0a, 0x01],
            b"v",
        ]);
        let msg = dp::RegisterRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(msg.version, "v");
        assert_eq!(msg.endpoint, "");
    }
}

mod garbled {
    use super::*;

    #[test]
    fn truncated_string_is_an_error() {
        // Field 1 claims 7 bytes but only 3 follow.
        let bytes = [0x0a, 0x07, b'v', b'1', b'b'];
        assert!(dp::RegisterRequest::decode(&bytes[..]).is_err());
    }

    #[test]
    fn wrong_wire_type_is_an_error() {
        // Field 1 of RegisterRequest is a string, sent here as a varint.
        let bytes = [0x08, 0x01];
        assert!(dp::RegisterRequest::decode(&bytes[..]).is_err());
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let bytes = [0x0a, 0x02, 0xff, 0xfe];
        assert!(dp::Device::decode(&bytes[..]).is_err());
    }

    #[test]
    fn overlong_varint_is_an_error() {
        let mut bytes = vec![0x08];
        bytes.extend([0xff; 11]);
        assert!(dp::NumaNode::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn field_number_zero_is_an_error() {
        assert!(pr::ListPodResourcesResponse::decode(&[0x02, 0x00][..]).is_err());
    }

    #[test]
    fn every_truncation_of_a_full_message_fails_cleanly() {
        // Cutting a valid encoding anywhere must never panic; most cuts
        // land inside a field and must be reported as errors.
        let full = pr::ListPodResourcesResponse {
            pod_resources: vec![pr::PodResources {
                name: "router-0".to_owned(),
                namespace: "tenant-a".to_owned(),
                containers: vec![pr::ContainerResources {
                    name: "dpdk".to_owned(),
                    cpu_ids: vec![4, 5],
                    ..Default::default()
                }],
            }],
        }
        .encode_to_vec();
        // The message is a single top-level field, so every proper prefix
        // cuts it and must fail.
        for cut in 1..full.len() {
            assert!(
                pr::ListPodResourcesResponse::decode(&full[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }

    #[test]
    fn pseudo_random_garbage_never_panics() {
        // xorshift so the test is deterministic without extra crates.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut errors = 0;
        for _ in 0..2000 {
            let len = usize::try_from(state % 64).unwrap();
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.push(state.to_le_bytes()[0]);
            }
            if dp::AllocateResponse::decode(bytes.as_slice()).is_err() {
                errors += 1;
            }
            let _ = pr::GetPodResourcesResponse::decode(bytes.as_slice());
        }
        assert!(errors > 0, "random bytes should mostly fail to decode");
    }
}
