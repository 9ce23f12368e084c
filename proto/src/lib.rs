//! Wire contracts vfplane speaks with the kubelet.
//!
//! Rust types, tonic clients and tonic servers for the kubelet gRPC APIs,
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
//! - [`pluginregistration::v1`], [`dra::v1`] and [`dra::health_v1alpha1`]:
//!   the kubelet plugin registry and the DRA driver services (a DRA driver
//!   registers through the first and serves the other two).
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
pub mod mac;
pub mod node_state;
pub mod pci;
pub mod pool;
pub mod quantity;
pub mod unix_grpc;
pub mod vf_config;
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

/// Kubelet plugin registration API, through which a DRA driver registers.
pub mod pluginregistration {
    /// Registration API `v1` (protobuf package `pluginregistration`).
    #[allow(missing_docs)] // generated: not every proto field carries a comment
    pub mod v1 {
        tonic::include_proto!("pluginregistration");
    }
}

/// Kubelet Dynamic Resource Allocation APIs.
pub mod dra {
    /// The DRA plugin service `v1` (protobuf package
    /// `k8s.io.kubelet.pkg.apis.dra.v1`).
    #[allow(missing_docs)] // generated: not every proto field carries a comment
    pub mod v1 {
        tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
    }

    /// The DRA resource health service `v1alpha1` (protobuf package
    /// `v1alpha1`).
    #[allow(missing_docs)] // generated: not every proto field carries a comment
    pub mod health_v1alpha1 {
        tonic::include_proto!("v1alpha1");
    }

    /// vfplane's DRA driver name: ResourceSlices, claims' results and CDI
    /// use it.
    pub const DRIVER_NAME: &str = "vfplane.io";

    /// The DeviceClass the chart installs, selecting every vfplane VF.
    pub const DEVICE_CLASS: &str = "vf.vfplane.io";

    /// [`PluginInfo::type`](crate::pluginregistration::v1::PluginInfo::type)
    /// of a DRA driver.
    pub const PLUGIN_TYPE: &str = "DRAPlugin";

    /// How the kubelet names [`v1`]'s service in
    /// [`PluginInfo::supported_versions`](crate::pluginregistration::v1::PluginInfo::supported_versions)
    /// (not its gRPC name).
    pub const DRA_PLUGIN_SERVICE: &str = "v1.DRAPlugin";

    /// How the kubelet names [`health_v1alpha1`]'s service in
    /// `supported_versions`.
    pub const HEALTH_SERVICE: &str = "v1alpha1.DRAResourceHealth";

    /// The kubelet's plugin registry directory, where a driver's
    /// registration socket goes.
    pub const PLUGIN_REGISTRY_PATH: &str = "/var/lib/kubelet/plugins_registry";

    /// The parent of every driver's own directory (its DRA socket).
    pub const PLUGINS_PATH: &str = "/var/lib/kubelet/plugins";
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
