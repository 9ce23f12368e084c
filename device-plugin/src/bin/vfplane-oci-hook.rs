//! `vfplane-oci-hook memlock <bytes>`: the OCI `createRuntime` hook the
//! device plugin's CDI spec names for VFs of a pool with a locked-memory
//! limit. See `vfplane_device_plugin::oci_hook`.

use std::path::Path;
use std::process::ExitCode;

use vfplane_device_plugin::oci_hook;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = oci_hook::parse_args(&args)
        .and_then(|bytes| oci_hook::raise_memlock(bytes, std::io::stdin().lock(), Path::new("/proc")));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            // The runtime puts this in the container's creation error.
            eprintln!("vfplane-oci-hook: {}", vfplane_host::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
