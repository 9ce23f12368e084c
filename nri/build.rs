//! Generates the Rust types of the NRI v1alpha1 messages (prost). The
//! services are framed by hand over ttrpc (src/ttrpc.rs), so no service
//! code is generated. `protoc` comes from `protoc-bin-vendored`.

use std::error::Error;

const PROTO_ROOT: &str = "proto";
const PROTO: &str = "proto/nri/v1alpha1/api.proto";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    config.compile_protos(&[PROTO], &[PROTO_ROOT])?;
    Ok(())
}
