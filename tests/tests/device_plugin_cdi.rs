//! The CDI spec the device plugin writes, read back the way a runtime
//! reads it: by the `container-device-interface` crate's parser, schema
//! validator and device cache; for one set of VFs in full, and for random
//! sets of VFs, nodes and profiles (proptest, 256 cases).

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

/// Any PCI address.
fn address() -> impl proptest::strategy::Strategy<Value = PciAddress> {
    use proptest::strategy::Strategy as _;
    (0u32..=0xffff, 0u32..=0xff, 0u32..32, 0u32..8).prop_map(|(domain, bus, device, function)| {
        format!("{domain:04x}:{bus:02x}:{device:02x}.{function}")
            .parse()
            .expect("a well-formed address")
    })
}

/// Any VF entry: either kind of VFIO node, with or without each limit.
fn entry() -> impl proptest::strategy::Strategy<Value = CdiEntry> {
    use proptest::strategy::Strategy as _;
    (
        proptest::bool::ANY,
        0u32..100_000,
        proptest::option::of(1u64..(1 << 40)),
        proptest::option::of((0u32..256, 0u32..16, 0u32..8)),
        proptest::option::of(1u64..4_194_304),
    )
        .prop_map(
            |(noiommu, group, locked_memory_bytes, cpuset, pids_max)| CdiEntry {
                node: if noiommu {
                    VfioNode::NoIommu(group)
                } else {
                    VfioNode::Group(group)
                },
                locked_memory_bytes,
                cpuset: cpuset.map(|(first, more, mems)| NumaCpuset {
                    cpus: format!("{first}-{}", first + more),
                    mems: mems.to_string(),
                }),
                pids_max,
            },
        )
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Whatever VFs, nodes and profiles the plugin serves, the file it
    /// writes is a valid CDI spec that names every VF, gives each its own
    /// group node and, with the hook installed, calls it for that VF.
    #[test]
    fn every_spec_the_plugin_writes_is_valid_cdi(
        devices in proptest::collection::btree_map(address(), entry(), 1..12),
        hook in proptest::bool::ANY,
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let writer = CdiWriter::new(
            Some(dir.path().to_owned()),
            hook.then(|| "/run/vfplane/bin/vfplane-oci-hook".into()),
        );
        writer.update(&devices).expect("spec written");
        let spec = read_spec(&dir.path().join(SPEC_FILE_NAME), 0)
            .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{e:#}")))?;
        let read = spec.get_devices();
        let names: Vec<String> = read.keys().cloned().collect();
        let wanted: Vec<String> = devices.keys().map(ToString::to_string).collect();
        proptest::prop_assert_eq!(names, wanted);
        for (address, entry) in &devices {
            let edits = serde_json::to_value(&read[&address.to_string()].edits().container_edits)
                .expect("edits as JSON");
            proptest::prop_assert_eq!(&edits["deviceNodes"][0]["path"], &entry.node.path());
            proptest::prop_assert_eq!(&edits["deviceNodes"][0]["hostPath"], &entry.node.path());
            if hook {
                let args = edits["hooks"][0]["args"].as_array().cloned().unwrap_or_default();
                let vf = args.iter().position(|a| a == "--vf").map(|i| &args[i + 1]);
                proptest::prop_assert_eq!(vf, Some(&serde_json::Value::from(address.to_string())));
            } else {
                proptest::prop_assert!(edits.get("hooks").is_none_or(serde_json::Value::is_null), "{edits}");
            }
        }
    }
}
