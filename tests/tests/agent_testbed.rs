//! The node agent end to end on the emulated SR-IOV node: the real igb PF
//! driver takes VF MACs, VLANs and trust through our netlink code, VFs are
//! bound to vfio-pci and igbvf through sysfs, and the agent repairs what is
//! changed behind its back and survives `kill -9` mid-apply.

#![allow(clippy::expect_used)] // test helpers: a panic is the failure report

use serde_json::Value;
use xtask::testbed::{GuestOptions, Testbed};

const SCRIPT: &str = r#"
pf=/sys/bus/pci/devices/0000:00:02.0
section() { echo "=== $1"; cat "$2"; echo "=== end"; }
state() { cat > /tmp/$1.yaml; }
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }

state four <<'Y'
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 4
      vfGroups:
        - resourceName: fast
          vfRange: "0-1"
          macs: ["02:00:00:00:00:01", "02:00:00:00:00:02"]
        - resourceName: kernel
          vfRange: "2-3"
          deviceType: netdevice
          vlan: 100
          trust: true
Y
vfplane-agent apply --state-file /tmp/four.yaml --status-file /tmp/s1.json --pool-config /tmp/run/pools.yaml
echo "{\"step\":\"apply-four\",\"rc\":$?}"
echo "{\"step\":\"state-mac\",\"mac\":\"$(cat /run/vfplane/vf-state/0000:00:12.0.mac)\"}"
section status-four /tmp/s1.json
section pools-four /tmp/run/pools.yaml
vfplane-agent discover --json
for i in 2 3; do
  vf=$(basename "$(readlink $pf/virtfn$i)")
  echo "{\"step\":\"kernel-vf-mac\",\"index\":$i,\"mac\":\"$(cat /sys/bus/pci/devices/$vf/net/*/address)\"}"
done
vfplane-agent apply --state-file /tmp/four.yaml
echo "{\"step\":\"apply-four-again\",\"rc\":$?}"

state two <<'Y'
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 2
      vfGroups:
        - {resourceName: fast, vfRange: "0-1"}
Y
vfplane-agent apply --state-file /tmp/two.yaml
echo "{\"step\":\"apply-two\",\"rc\":$?,\"numVfs\":$(cat $pf/sriov_numvfs)}"

vfplane-agent run --state-file /tmp/two.yaml --status-file /tmp/s2.json --pool-config /tmp/run/pools.yaml 2>/tmp/run.log &
agent=$!
sleep 3
rss=$(awk '/VmRSS/ {print $2}' /proc/$agent/status)
echo 0 > $pf/sriov_numvfs
t0=$(ms)
n=0
while [ $n -lt 100 ]; do
  if [ "$(cat $pf/sriov_numvfs)" = 2 ] && [ "$(basename "$(readlink $pf/virtfn1/driver)")" = vfio-pci ]; then break; fi
  sleep 0.1; n=$((n+1))
done
drv() { basename "$(readlink $pf/virtfn$1/driver 2>/dev/null)" 2>/dev/null; }
echo "{\"step\":\"repair\",\"numVfs\":$(cat $pf/sriov_numvfs),\"drivers\":[\"$(drv 0)\",\"$(drv 1)\"],\"afterMs\":$(( $(ms) - t0 )),\"rssKiB\":$rss}"
kill $agent

state seven <<'Y'
spec:
  pfs:
    - pciAddress: "0000:00:02.0"
      numVfs: 7
      vfGroups:
        - {resourceName: fast, vfRange: "0-6"}
Y
vfplane-agent apply --state-file /tmp/seven.yaml &
victim=$!
sleep 0.4
kill -9 $victim
wait $victim
echo "{\"step\":\"killed\",\"numVfsAfterKill\":$(cat $pf/sriov_numvfs)}"
vfplane-agent apply --state-file /tmp/seven.yaml --status-file /tmp/s3.json
echo "{\"step\":\"apply-after-kill\",\"rc\":$?}"
section status-seven /tmp/s3.json
echo "{\"step\":\"leftovers\",\"files\":$(ls -A /tmp/run | wc -l)}"

echo 0 > $pf/sriov_numvfs
t0=$(ms); vfplane-agent apply --state-file /tmp/seven.yaml; rc=$?; t1=$(ms)
vfplane-agent apply --state-file /tmp/seven.yaml; t2=$(ms)
echo "{\"step\":\"timing\",\"rc\":$rc,\"sevenFromZeroMs\":$((t1 - t0)),\"noopMs\":$((t2 - t1))}"

state bad <<'Y'
spec:
  pfs:
    - pciAddress: "0000:99:00.0"
      numVfs: 2
    - pciAddress: "0000:00:02.0"
      numVfs: 3
      vfGroups:
        - {resourceName: fast, vfRange: "0-2"}
Y
vfplane-agent apply --state-file /tmp/bad.yaml --status-file /tmp/s4.json
echo "{\"step\":\"apply-bad\",\"rc\":$?,\"numVfs\":$(cat $pf/sriov_numvfs)}"
section status-bad /tmp/s4.json
"#;

/// The JSON document between `=== name` and `=== end`.
fn section(output: &str, name: &str) -> Value {
    let start = output
        .find(&format!("=== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}:\n{output}"));
    let body = &output[start + name.len() + 5..];
    let end = body.find("=== end").expect("section end");
    let text = &body[..end];
    serde_json::from_str(text)
        .or_else(|_| Ok::<_, ()>(Value::String(text.to_owned())))
        .expect("text")
}

fn step<'a>(lines: &'a [Value], name: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["step"] == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

#[test]
fn agent_converges_repairs_and_survives_kill_on_the_real_kernel() {
    if !xtask::e2e::enabled(
        "agent_converges_repairs_and_survives_kill_on_the_real_kernel",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let options = GuestOptions {
        kernel_vf_driver: true,
        ..GuestOptions::default()
    };
    let outcome = testbed.run(SCRIPT, &options, false).expect("guest runs");
    let out = &outcome.output;
    assert_eq!(
        outcome.exit_code, 0,
        "{out}\n--- console ---\n{}",
        outcome.console
    );
    let lines = outcome.json_lines();

    // 4 VFs: two on vfio-pci with explicit MACs, two on igbvf with VLAN 100.
    assert_eq!(step(&lines, "apply-four")["rc"], 0, "{out}");
    assert_eq!(
        step(&lines, "state-mac")["mac"],
        "02:00:00:00:00:01",
        "the MAC the device plugin puts in _INFO"
    );
    let status = section(out, "status-four");
    let vfs = status["pfs"][0]["vfs"].as_array().expect("vfs");
    assert_eq!(vfs.len(), 4);
    assert_eq!(
        (vfs[0]["driver"].as_str(), vfs[0]["mac"].as_str()),
        (Some("vfio-pci"), Some("02:00:00:00:00:01"))
    );
    assert_eq!(
        (vfs[1]["driver"].as_str(), vfs[1]["mac"].as_str()),
        (Some("vfio-pci"), Some("02:00:00:00:00:02"))
    );
    for vf in &vfs[2..] {
        assert_eq!(vf["driver"], "igbvf");
        assert_eq!(vf["vlan"], 100);
        assert_eq!(vf["trust"], true, "trust read back from the PF: {vf}");
        assert_eq!(vf["health"], "Healthy");
    }
    for vf in &vfs[..2] {
        assert_eq!(vf["trust"], false, "the spec's default read back: {vf}");
    }
    // The kernel VF driver's interface carries the MAC the agent gave the VF.
    for index in [2usize, 3] {
        let kernel = lines
            .iter()
            .find(|l| l["step"] == "kernel-vf-mac" && l["index"] == index)
            .expect("mac line");
        assert_eq!(kernel["mac"], vfs[index]["mac"], "VF {index}");
    }
    let discovered = lines.iter().find(|l| l["pfs"].is_array()).expect("discover");
    let groups: Vec<&Value> = discovered["pfs"][0]["vfs"]
        .as_array()
        .expect("vfs")
        .iter()
        .map(|v| &v["vfioDevice"])
        .collect();
    assert!(
        groups[0].is_string() && groups[1].is_string() && groups[2].is_null(),
        "{groups:?}"
    );
    let pools = section(out, "pools-four");
    let pools = pools.as_str().expect("yaml text");
    assert!(
        pools.contains("name: fast") && pools.contains("0000:00:12.2") && !pools.contains("kernel"),
        "{pools}"
    );
    assert_eq!(step(&lines, "apply-four-again")["rc"], 0);

    // Down to 2, then an external `echo 0 > sriov_numvfs` is repaired by `run`.
    assert_eq!(step(&lines, "apply-two")["numVfs"], 2);
    let repair = step(&lines, "repair");
    assert_eq!(repair["numVfs"], 2, "{out}");
    assert_eq!(
        repair["drivers"],
        serde_json::json!(["vfio-pci", "vfio-pci"]),
        "the repaired VFs are back on vfio-pci: {out}"
    );
    eprintln!(
        "repair after {} ms; agent RSS {} KiB",
        repair["afterMs"], repair["rssKiB"]
    );

    // kill -9 in the middle of an apply (2 -> 7 VFs goes through 0): the
    // kernel's count is one the apply writes, never anything else; then a
    // plain apply converges.
    let after_kill = &step(&lines, "killed")["numVfsAfterKill"];
    assert!(
        *after_kill == 0 || *after_kill == 2 || *after_kill == 7,
        "numVfs after the kill: {after_kill}\n{out}"
    );
    assert_eq!(step(&lines, "apply-after-kill")["rc"], 0, "{out}");
    let seven = section(out, "status-seven");
    let vfs = seven["pfs"][0]["vfs"].as_array().expect("vfs");
    assert_eq!(vfs.len(), 7);
    assert!(
        vfs.iter()
            .all(|vf| vf["driver"] == "vfio-pci" && vf["health"] == "Healthy"),
        "{seven}"
    );
    assert_eq!(
        step(&lines, "leftovers")["files"],
        1,
        "only pools.yaml, no temporary files"
    );
    let timing = step(&lines, "timing");
    assert_eq!(timing["rc"], 0);
    eprintln!(
        "apply of 7 VFs from 0: {} ms; no-op apply: {} ms",
        timing["sevenFromZeroMs"], timing["noopMs"]
    );

    // A bad PF entry: reported, exit non-zero, and the good PF converged.
    let bad = step(&lines, "apply-bad");
    assert_eq!(bad["rc"], 2);
    assert_eq!(bad["numVfs"], 3);
    let status = section(out, "status-bad");
    assert!(
        status["lastSyncError"]
            .as_str()
            .is_some_and(|e| e.contains("no SR-IOV PF 0000:99:00.0")),
        "{status}"
    );
    assert!(status["pfs"][0]["error"].is_null());
    assert!(
        status["pfs"][0]["vfs"]
            .as_array()
            .expect("vfs")
            .iter()
            .all(|vf| vf["health"] == "Healthy")
    );
}
