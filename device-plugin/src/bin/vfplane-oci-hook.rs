//! `vfplane-oci-hook attach --vf <address> [--device /dev/vfio/<group>]
//! [--pids-max <n>] [--memlock <bytes>] [--records <dir>]`: the OCI
//! `createRuntime` hook the device plugin's CDI spec names for every VF
//! (the spec renders it with `oci_hook::Attach::to_args`). See
//! `vfplane_device_plugin::oci_hook`.

use std::path::Path;
use std::process::ExitCode;

use vfplane_device_plugin::oci_hook;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = oci_hook::parse_args(&args)
        .and_then(|attach| oci_hook::run(&attach, std::io::stdin().lock(), Path::new("/proc")));
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(record_error)) => {
            // The container starts; its VF's owner shows no pod UID.
            eprintln!(
                "vfplane-oci-hook: no container record: {}",
                vfplane_host::error_chain(&record_error)
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            // The runtime puts this in the container's creation error.
            eprintln!("vfplane-oci-hook: {}", vfplane_host::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
