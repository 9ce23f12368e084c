//! The production-shaped node's ground, on the emulated SR-IOV node booted
//! with systemd as PID 1 from the Debian root image: the node is what the
//! cluster's systemd profile claims (systemd, cgroup v2 with every
//! controller, the SR-IOV and container modules loaded by
//! systemd-modules-load, hugepages on both NUMA nodes), and systemd does
//! what vfplane's design relies on: a limit written straight into a
//! cgroup file of a scope systemd manages is put back by systemd at the
//! next `daemon-reload` or property change, while a limit set as the
//! unit's property (what runc does with the systemd driver for what the
//! container's spec asks) holds. That is why vfplane adjusts the spec
//! (NRI) rather than writing cgroup files (ARCHITECTURE.md).

#![allow(clippy::expect_used)] // test helpers: a panic is the failure report

use xtask::testbed::{GuestInit, GuestOptions, Testbed, Topology};

/// Prints `key=value` lines the test reads.
const SCRIPT: &str = r#"
systemctl is-system-running --wait > /dev/null 2>&1
echo "pid1=$(cat /proc/1/comm)"
echo "state=$(systemctl is-system-running)"
echo "failed=$(systemctl --failed --no-legend --plain | awk '{print $1}' | tr '\n' ' ')"
echo "controllers=$(cat /sys/fs/cgroup/cgroup.controllers)"
echo "modules=$(for m in igb vfio_pci vfio_iommu_type1 overlay br_netfilter nf_tables; do [ -d /sys/module/$m ] && printf '%s ' $m; done)"
for node in 0 1; do
  echo "node${node}_hugepages=$(cat /sys/devices/system/node/node$node/hugepages/hugepages-2048kB/nr_hugepages)"
  echo "node${node}_cpus=$(cat /sys/devices/system/node/node$node/cpulist)"
done
echo "memlock_default=$(systemctl show -p DefaultLimitMEMLOCK --value)"

systemd-run --scope --unit=raw-limit sleep 600 > /dev/null 2>&1 &
systemd-run --scope --unit=property-limit -p TasksMax=64 sleep 600 > /dev/null 2>&1 &
raw=/sys/fs/cgroup/system.slice/raw-limit.scope
property=/sys/fs/cgroup/system.slice/property-limit.scope
# Until systemd has started both scopes and written the unit's own TasksMax
# into the raw one: a write before that is overwritten as the scope starts.
for i in $(seq 100); do
  [ "$(systemctl is-active raw-limit.scope property-limit.scope | tr '\n' ' ')" = "active active " ] &&
    [ "$(cat $raw/pids.max 2>/dev/null)" = "$(systemctl show -p TasksMax --value raw-limit.scope)" ] && break
  sleep 0.1
done
echo 64 > $raw/pids.max
echo "raw_written=$(cat $raw/pids.max)"
systemctl daemon-reload
echo "raw_after_reload=$(cat $raw/pids.max)"
echo "property_after_reload=$(cat $property/pids.max)"
echo 64 > $raw/pids.max
systemctl set-property --runtime raw-limit.scope CPUWeight=50
echo "raw_after_property_change=$(cat $raw/pids.max)"
"#;

#[test]
fn the_systemd_node_boots_as_production_runs_and_systemd_reverts_raw_cgroup_writes() {
    if !xtask::e2e::enabled(
        "the_systemd_node_boots_as_production_runs_and_systemd_reverts_raw_cgroup_writes",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let options = GuestOptions {
        init: GuestInit::Systemd,
        topology: Topology::TwoNumaNodes,
        cpus: 4,
        memory_mib: 2048,
        ..GuestOptions::default()
    };
    let outcome = testbed.run(SCRIPT, &options, false).expect("guest runs");
    assert_eq!(
        outcome.exit_code, 0,
        "script failed:\n{}\n--- console ---\n{}",
        outcome.output, outcome.console
    );
    let value = |key: &str| -> String {
        outcome
            .output
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in:\n{}", outcome.output))
            .trim()
            .to_owned()
    };
    assert_eq!(value("pid1"), "systemd");
    assert_eq!(value("state"), "running", "failed units: {}", value("failed"));
    for controller in ["cpuset", "cpu", "memory", "hugetlb", "pids"] {
        assert!(
            value("controllers").split(' ').any(|c| c == controller),
            "cgroup v2 has no {controller}: {}",
            value("controllers")
        );
    }
    assert_eq!(
        value("modules"),
        "igb vfio_pci vfio_iommu_type1 overlay br_netfilter nf_tables",
        "systemd-modules-load loaded the node's modules"
    );
    // The kernel spreads the boot-time hugepages over the NUMA nodes.
    let half = (xtask::testbed::DEFAULT_HUGEPAGES_2M / 2).to_string();
    assert_eq!(
        (value("node0_hugepages"), value("node1_hugepages")),
        (half.clone(), half)
    );
    assert_eq!(
        (value("node0_cpus"), value("node1_cpus")),
        ("0-1".to_owned(), "2-3".to_owned())
    );
    // systemd's own default, which containerd's unit keeps: 8 MiB.
    assert_eq!(value("memlock_default"), "8388608");

    // The premise of applying limits through the runtime: systemd owns the
    // files of the units it manages.
    assert_eq!(value("raw_written"), "64");
    assert_ne!(
        value("raw_after_reload"),
        "64",
        "daemon-reload puts back the unit's TasksMax"
    );
    assert_eq!(value("property_after_reload"), "64", "a unit property holds");
    assert_ne!(
        value("raw_after_property_change"),
        "64",
        "a property change puts back the unit's TasksMax"
    );
    eprintln!(
        "systemd node: script started {:.1} s after boot",
        outcome.script_started_after.unwrap_or_default()
    );
}
