//! Generates the Rust types, clients and servers for the kubelet gRPC APIs.
//!
//! `protoc` comes from `protoc-bin-vendored`, so building needs no system
//! protobuf compiler.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTOS: &[&str] = &[
    "proto/deviceplugin/v1beta1/api.proto",
    "proto/podresources/v1/api.proto",
    "proto/pluginregistration/v1/api.proto",
    "proto/dra/v1/api.proto",
    "proto/dra-health/v1alpha1/api.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    // Handing the path to prost-build directly does what exporting PROTOC
    // would, without `std::env::set_var` (unsafe since edition 2024).
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_with_config(config, PROTOS, &[PROTO_ROOT])?;
    Ok(())
}
