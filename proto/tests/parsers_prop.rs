//! Property tests for every parser of outside input in `vfplane-proto`:
//! random and mutated inputs never panic, every error names what it read,
//! and what a formatter writes parses back to the same value. Each
//! `proptest!` case runs [`CASES`] inputs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test: a panic is the failure report

use proptest::prelude::*;
use vfplane_proto::container_env::parse_address_list;
use vfplane_proto::node_state::StateFile;
use vfplane_proto::pci::PciAddress;
use vfplane_proto::pool::PoolConfig;
use vfplane_proto::quantity::{Quantity, parse_quantity};
use vfplane_proto::vf_policy::VfPolicySpec;
use vfplane_proto::vf_range::{PfNameSelector, format_vf_range, parse_vf_range};

/// Inputs per property.
const CASES: u32 = 2_000;

/// A valid pool config and state file, mutated byte-wise below.
const POOL_CONFIG: &str = "pools:\n  - name: fast\n    devices: [\"0000:00:10.0\", \"0000:00:10.2\"]\n    selector:\n      vendor: \"8086\"\n      drivers: [\"vfio-pci\"]\n    containerLimits:\n      lockedMemoryBytes: 67108864\n      pidsMax: 64\n";
const STATE_FILE: &str = "spec:\n  pfs:\n    - pciAddress: \"0000:00:02.0\"\n      numVfs: 2\n      vfGroups:\n        - resourceName: fast\n          vfRange: \"0-1\"\n          deviceType: vfio-pci\n";

const POLICY_SPEC: &str = "nodeSelector: {vfplane.io/sriov: \"true\"}\nnicSelector: {pciAddresses: [\"0000:00:02.0\"]}\nnumVfs: 6\ndeviceType: vfio-pci\nresourceName: churn\ntrust: true\ncontainerProfile: {lockedMemory: 64Mi, pids: 64, cpu: \"2\", memory: 1Gi}\n";

/// `text` with up to eight bytes replaced, inserted or removed.
fn mutated(text: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8).prop_map(move |edits| {
        let mut bytes = text.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len().max(1));
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i.min(bytes.len()), byte),
                _ if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn pci_addresses_round_trip_and_garbage_is_named(
        domain in any::<u16>(), bus in any::<u8>(), device in 0u8..32, function in 0u8..8,
        garbage in ".{0,24}",
    ) {
        let address = PciAddress::new(domain, bus, device, function).unwrap();
        prop_assert_eq!(address.to_string().parse::<PciAddress>(), Ok(address));
        if let Err(error) = garbage.parse::<PciAddress>() {
            prop_assert_eq!(&error.input, &garbage);
            prop_assert!(error.to_string().contains("invalid PCI address"));
        }
        let _ = parse_address_list(&garbage);
    }

    #[test]
    fn vf_ranges_round_trip_and_garbage_is_named(
        indexes in prop::collection::btree_set(0u16..512, 1..40),
        garbage in "[0-9, -]{0,16}|.{0,16}",
    ) {
        let text = format_vf_range(indexes.iter().copied());
        prop_assert_eq!(parse_vf_range(&text).unwrap(), indexes.into_iter().collect::<Vec<_>>());
        if let Err(error) = parse_vf_range(&garbage) {
            prop_assert!(error.to_string().starts_with("vfRange"), "{}", error);
        }
        let _ = PfNameSelector::parse(&garbage);
    }

    #[test]
    fn quantities_read_their_value_and_garbage_is_named(
        units in 0u64..1_000_000_000, suffix in prop::sample::select(vec![("", 1u128), ("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1_000), ("M", 1_000_000), ("G", 1_000_000_000)]),
        garbage in ".{0,16}",
    ) {
        let (text, scale) = suffix;
        let quantity = parse_quantity(&format!("{units}{text}")).unwrap();
        prop_assert_eq!(quantity.ceil_units(), u128::from(units) * scale);
        match parse_quantity(&garbage) {
            Ok(q) => prop_assert_eq!(q.to_string().parse::<Quantity>().map(|r| r == q), Ok(true)),
            Err(error) => prop_assert_eq!(&error.text, &garbage),
        }
    }

    #[test]
    fn a_mutated_pool_config_parses_or_says_where(text in mutated(POOL_CONFIG)) {
        if let Err(error) = PoolConfig::from_yaml(&text) {
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn a_mutated_state_file_parses_or_says_where(text in mutated(STATE_FILE)) {
        if let Err(error) = StateFile::from_yaml(&text) {
            prop_assert!(error.to_string().contains("line"), "{}", error);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// A policy spec as the API server could hold it (mutated YAML): read
    /// or refused, its profile read or refused naming the field.
    #[test]
    fn a_mutated_policy_spec_parses_or_is_refused(text in mutated(POLICY_SPEC)) {
        if let Ok(spec) = serde_yaml::from_str::<VfPolicySpec>(&text)
            && let Some(profile) = &spec.container_profile
            && let Err(error) = profile.limits()
        {
            prop_assert!(error.to_string().starts_with("spec.containerProfile."), "{}", error);
        }
    }
}

#[test]
fn the_unmutated_inputs_parse() {
    PoolConfig::from_yaml(POOL_CONFIG).unwrap();
    StateFile::from_yaml(STATE_FILE).unwrap();
    let spec: VfPolicySpec = serde_yaml::from_str(POLICY_SPEC).unwrap();
    spec.container_profile.unwrap().limits().unwrap();
}
