//! Wire contracts vfplane speaks with the kubelet.
//!
//! Rust types, tonic clients and tonic servers for two kubelet gRPC APIs,
//! generated at build time from `.proto` files in this crate that match the
//! upstream definitions field for field:
//!
//! - [`deviceplugin::v1beta1`]: the device plugin API. The kubelet serves
//!   [`Registration`](deviceplugin::v1beta1::registration_server::Registration)
//!   on [`KUBELET_SOCKET`] inside [`DEVICE_PLUGIN_PATH`]; each plugin serves
//!   [`DevicePlugin`](deviceplugin::v1beta1::device_plugin_server::DevicePlugin)
//!   on its own socket in the same directory.
//! - [`podresources::v1`]: the pod-resources API the kubelet serves on
//!   [`POD_RESOURCES_SOCKET`], which says which devices went to which
//!   container.
//!
//! `protoc` is vendored, so building this crate needs no system protobuf
//! compiler.
//!
//! Beside them, the files and CRDs the other crates share (`node_state`,
//! `vf_policy`, `pool`, `vf_state`, `container_record`, ...), and
//! [`error_chain`], the one way every crate prints an error with its
//! causes.

#![warn(missing_docs)]

pub mod container_env;
pub mod container_limits;
pub mod container_record;
pub mod files;
pub mod node_state;
pub mod pci;
pub mod pool;
pub mod quantity;
pub mod unix_grpc;
pub mod vf_health;
pub mod vf_policy;
pub mod vf_range;
pub mod vf_state;

/// Kubelet device plugin API.
pub mod deviceplugin {
    /// Device plugin API `v1beta1` (protobuf package `v1beta1`).
    #[allow(missing_docs)] // generated: not every proto field carries a comment
    pub mod v1beta1 {
        tonic::include_proto!("v1beta1");
    }
}

/// Kubelet pod-resources API.
pub mod podresources {
    /// Pod-resources API `v1` (protobuf package `v1`).
    #[allow(missing_docs)] // generated: not every proto field carries a comment
    pub mod v1 {
        tonic::include_proto!("v1");
    }
}

/// Device plugin API version sent in
/// [`RegisterRequest::version`](deviceplugin::v1beta1::RegisterRequest::version).
pub const DEVICE_PLUGIN_VERSION: &str = "v1beta1";

/// Directory holding the kubelet's registration socket and every device
/// plugin's socket.
pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins";

/// File name of the kubelet's registration socket inside
/// [`DEVICE_PLUGIN_PATH`].
pub const KUBELET_SOCKET: &str = "kubelet.sock";

/// Full path of the kubelet's pod-resources socket.
pub const POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// [`Device::health`](deviceplugin::v1beta1::Device::health) of a usable
/// device.
pub const HEALTHY: &str = "Healthy";

/// [`Device::health`](deviceplugin::v1beta1::Device::health) of a device the
/// kubelet must not hand out.
pub const UNHEALTHY: &str = "Unhealthy";

/// An error and its sources on one line: `a: b: c`. Errors keep their cause
/// as `#[source]` and do not repeat it in their own message, so this prints
/// each once.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
