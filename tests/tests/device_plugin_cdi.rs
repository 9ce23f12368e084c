//! The CDI spec the device plugin writes, read back the way a runtime
//! reads it: by the `container-device-interface` crate's parser, schema
//! validator and device cache.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeMap;

use container_device_interface::cache::{new_cache, with_auto_refresh};
use container_device_interface::spec::read_spec;
use container_device_interface::spec_dirs::with_spec_dirs;
use vfplane_device_plugin::cdi::{CdiEntry, CdiWriter, NumaCpuset, SPEC_FILE_NAME};
use vfplane_device_plugin::health::VfioNode;
use vfplane_host::PciAddress;

#[test]
fn the_spec_passes_the_cdi_crates_validation_and_resolves_every_vf() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a: PciAddress = "0000:00:12.0".parse().expect("address");
    let b: PciAddress = "0000:21:10.6".parse().expect("address");
    let writer = CdiWriter::new(
        Some(dir.path().to_owned()),
        Some("/run/vfplane/bin/vfplane-oci-hook".into()),
    );
    writer
        .update(&BTreeMap::from([
            (
                a,
                CdiEntry {
                    node: VfioNode::Group(4),
                    locked_memory_bytes: Some(64 << 20),
                    cpuset: Some(NumaCpuset {
                        cpus: "2-3".to_owned(),
                        mems: "1".to_owned(),
                    }),
                    pids_max: Some(512),
                },
            ),
            (b, VfioNode::NoIommu(9).into()),
        ]))
        .expect("spec written");

    // Parsed and validated (JSON schema, version, names, edits).
    let path = dir.path().join(SPEC_FILE_NAME);
    let spec = read_spec(&path, 0).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(spec.get_vendor(), "vfplane.io");
    assert_eq!(spec.get_class(), "vf");
    let devices = spec.get_devices();
    assert_eq!(
        devices.keys().collect::<Vec<_>>(),
        ["0000:00:12.0", "0000:21:10.6"]
    );
    let device = &devices["0000:00:12.0"];
    assert_eq!(device.get_qualified_name(), "vfplane.io/vf=0000:00:12.0");
    let edits = serde_json::to_value(&device.edits().container_edits).expect("edits as JSON");
    assert_eq!(edits["deviceNodes"][0]["path"], "/dev/vfio/4");
    assert_eq!(edits["deviceNodes"][0]["hostPath"], "/dev/vfio/4");
    assert_eq!(edits["deviceNodes"][0]["permissions"], "rw");
    assert_eq!(edits["hooks"][0]["hookName"], "createRuntime");
    assert_eq!(edits["hooks"][0]["path"], "/run/vfplane/bin/vfplane-oci-hook");
    assert_eq!(
        edits["hooks"][0]["args"],
        serde_json::json!([
            "vfplane-oci-hook",
            "attach",
            "--vf",
            "0000:00:12.0",
            "--device",
            "/dev/vfio/4",
            "--pids-max",
            "512",
            "--memlock",
            "67108864"
        ])
    );
    let noiommu = serde_json::to_value(&devices["0000:21:10.6"].edits().container_edits).expect("edits");
    assert_eq!(noiommu["deviceNodes"][0]["path"], "/dev/vfio/noiommu-9");
    let mut spec = spec;
    let common =
        serde_json::to_value(&spec.edits().expect("spec-wide edits").container_edits).expect("edits as JSON");
    assert_eq!(common["deviceNodes"][0]["path"], "/dev/vfio/vfio");

    // Resolved by name from the directory, as a runtime's CDI cache does.
    let dir_name = dir.path().to_str().expect("utf-8 temp dir");
    let cache = new_cache(vec![with_spec_dirs(&[dir_name]), with_auto_refresh(false)]);
    let mut cache = cache.lock().expect("cache lock");
    cache.refresh().expect("refresh");
    assert!(cache.get_errors().is_empty(), "{:?}", cache.get_errors());
    assert_eq!(
        cache.list_devices(),
        ["vfplane.io/vf=0000:00:12.0", "vfplane.io/vf=0000:21:10.6"]
    );
    assert!(cache.get_device("vfplane.io/vf=0000:00:12.0").is_some());
}
