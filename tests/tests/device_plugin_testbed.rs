//! The device plugin end to end on the emulated SR-IOV node: real igb PF,
//! real intel-iommu groups, real vfio-pci. The guest makes two VFs, binds
//! them to vfio-pci, starts `vfplane-device-plugin` and the
//! `kubelet-standin` example (which prints JSON lines), then unbinds one VF
//! and binds it back, and takes the PF's link down and up; this test reads
//! the lines. The plugin's periodic probe is pushed past the test, so every
//! health change it sees came through a kernel event.

#![allow(clippy::expect_used)] // test helpers: a panic is the failure report

use serde_json::Value;
use xtask::testbed::{GuestOptions, Testbed};

const SCRIPT: &str = r#"
set -e
pf=/sys/bus/pci/devices/0000:00:02.0
echo 2 > $pf/sriov_numvfs
# Enabling SR-IOV resets igb's PF: its link is down until auto-negotiation
# ends, and the plugin rightly calls the VFs Unhealthy meanwhile. The
# first ListAndWatch answer checked below is the one of a ready node.
i=0
until [ "$(cat $pf/net/*/carrier 2>/dev/null)" = 1 ]; do
  i=$((i+1)); [ $i -le 100 ] || { echo "the PF has no carrier 10 s after making VFs"; exit 1; }
  sleep 0.1
done
for link in $pf/virtfn0 $pf/virtfn1; do
  vf=$(basename "$(readlink $link)")
  echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
  echo "$vf" > /sys/bus/pci/drivers_probe
done
vf1=$(basename "$(readlink $pf/virtfn1)")
mkdir -p /etc/vfplane /var/lib/kubelet/device-plugins
cat > /etc/vfplane/pools.yaml <<EOF
pools:
  - name: testbed
    selector:
      vendor: "8086"
      device: "10ca"
      pfAddresses: ["0000:00:02.0"]
      drivers: [vfio-pci]
EOF
# The safety-net probe is pushed past the test: every health change below
# reaches the kubelet through a kernel event (uevent, rtnetlink) or nothing.
vfplane-device-plugin --pool-config /etc/vfplane/pools.yaml --rescan-interval-ms 600000 > /tmp/plugin.log 2>&1 &
plugin=$!
kubelet-standin --kubelet-dir /var/lib/kubelet/device-plugins --resource vfplane.io/testbed \
  --allocate 1 --ready-file /tmp/ready --stop-file /tmp/stop --timeout-secs 120 &
standin=$!
i=0
while [ ! -e /tmp/ready ]; do
  sleep 0.1
  i=$((i+1))
  if [ $i -gt 900 ]; then echo "the stand-in never got ready"; sed 's/^/plugin: /' /tmp/plugin.log; exit 1; fi
done
echo "{\"event\":\"unbind\",\"vf\":\"$vf1\",\"uptime\":$(cut -d' ' -f1 /proc/uptime)}"
echo "$vf1" > /sys/bus/pci/drivers/vfio-pci/unbind
sleep 3
echo "{\"event\":\"bind\",\"vf\":\"$vf1\",\"uptime\":$(cut -d' ' -f1 /proc/uptime)}"
echo "$vf1" > /sys/bus/pci/drivers_probe
sleep 3
pfnet=$(basename $pf/net/*)
echo "{\"event\":\"link-down\",\"uptime\":$(cut -d' ' -f1 /proc/uptime)}"
ip link set "$pfnet" down
sleep 3
echo "{\"event\":\"link-up\",\"uptime\":$(cut -d' ' -f1 /proc/uptime)}"
ip link set "$pfnet" up
i=0
until [ "$(cat $pf/net/*/carrier 2>/dev/null)" = 1 ]; do
  i=$((i+1)); [ $i -le 100 ] || { echo "the PF has no carrier 10 s after link up"; break; }
  sleep 0.1
done
sleep 2
touch /tmp/stop
code=0
wait $standin || code=$?
echo "{\"event\":\"standin-exit\",\"code\":$code}"
printf '{"event":"cdi","spec":%s}\n' "$(tr -d '\n' < /var/run/cdi/vfplane.io-vf.json)"
kill -TERM $plugin
code=0
wait $plugin || code=$?
left=$(ls /var/lib/kubelet/device-plugins | grep -c '^vfplane-' || true)
echo "{\"event\":\"plugin-exit\",\"code\":$code,\"socketsLeft\":$left}"
sed 's/^/plugin: /' /tmp/plugin.log
"#;

fn events<'a>(lines: &'a [Value], event: &str) -> Vec<(usize, &'a Value)> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l["event"] == event)
        .collect()
}

fn health_of<'a>(devices_event: &'a Value, id: &str) -> Option<&'a str> {
    devices_event["devices"]
        .as_array()?
        .iter()
        .find(|d| d["id"] == id)?["health"]
        .as_str()
}

#[test]
fn plugin_serves_real_vfs_and_follows_vfio_binding() {
    if !xtask::e2e::enabled(
        "plugin_serves_real_vfs_and_follows_vfio_binding",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let outcome = testbed
        .run(
            SCRIPT,
            &GuestOptions::default(),
            std::env::var_os("VFPLANE_TESTBED_ECHO").is_some(),
        )
        .expect("guest runs");
    let report = format!(
        "--- output ---\n{}\n--- console ---\n{}",
        outcome.output, outcome.console
    );
    assert_eq!(outcome.exit_code, 0, "script failed\n{report}");
    let lines = outcome.json_lines();

    let registration = events(&lines, "registration");
    assert_eq!(registration.len(), 1, "{report}");
    let registration = registration[0].1;
    assert_eq!(registration["version"], "v1beta1");
    assert_eq!(registration["endpoint"], "vfplane-testbed.sock");
    assert_eq!(registration["resource"], "vfplane.io/testbed");
    assert_eq!(registration["preferredAllocation"], true);

    let updates = events(&lines, "devices");
    let first = updates.first().expect("a ListAndWatch update").1;
    let ids: Vec<String> = first["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "two VFs advertised: {first}\n{report}");
    for id in &ids {
        assert_eq!(health_of(first, id), Some("Healthy"), "{first}\n{report}");
    }

    // Allocate: /dev/vfio/vfio and the group node that exists in the guest.
    let allocate = events(&lines, "allocate");
    let allocate = allocate.first().expect("an allocate line").1;
    let container = &allocate["containers"][0];
    let specs = container["devices"].as_array().expect("device specs");
    assert_eq!(specs.len(), 2, "{allocate}");
    assert_eq!(specs[0]["hostPath"], "/dev/vfio/vfio");
    let group_path = specs[1]["hostPath"].as_str().expect("group path");
    assert!(group_path.starts_with("/dev/vfio/"), "{allocate}");
    for spec in specs {
        assert_eq!(spec["hostPathExists"], true, "{spec}");
        assert_eq!(spec["permissions"], "rw");
        assert_eq!(spec["containerPath"], spec["hostPath"]);
    }
    let preferred = &events(&lines, "preferred")[0].1["ids"][0];
    let allocated = preferred.as_str().expect("a preferred id");
    assert_eq!(container["envs"]["PCIDEVICE_VFPLANE_IO_TESTBED"], allocated);
    let info: Value = serde_json::from_str(
        container["envs"]["PCIDEVICE_VFPLANE_IO_TESTBED_INFO"]
            .as_str()
            .expect("info variable"),
    )
    .expect("info is JSON");
    let group: u64 = group_path
        .trim_start_matches("/dev/vfio/")
        .parse()
        .expect("group number");
    assert_eq!(info[allocated]["group"], group);
    assert_eq!(info[allocated]["pf"], "0000:00:02.0");
    assert_eq!(info[allocated]["vfioDevice"], group_path);
    assert_eq!(container["cdiDevices"][0], format!("vfplane.io/vf={allocated}"));

    // Unbinding VF 1 from vfio-pci turns it Unhealthy; binding it back, Healthy.
    let unbind = events(&lines, "unbind");
    let (unbind_at, unbind) = unbind.first().expect("unbind line");
    let vf = unbind["vf"].as_str().expect("vf");
    let (bind_at, bind) = *events(&lines, "bind").first().expect("bind line");
    let went_bad = updates
        .iter()
        .find(|(i, u)| i > unbind_at && *i < bind_at && health_of(u, vf) == Some("Unhealthy"))
        .unwrap_or_else(|| panic!("no Unhealthy update for {vf} after the unbind\n{report}"));
    let came_back = updates
        .iter()
        .find(|(i, u)| *i > bind_at && health_of(u, vf) == Some("Healthy"))
        .unwrap_or_else(|| panic!("no Healthy update for {vf} after the bind\n{report}"));
    let other = ids.iter().find(|id| *id != vf).expect("the other VF");
    assert_eq!(
        health_of(went_bad.1, other),
        Some("Healthy"),
        "the other VF stays Healthy: {}",
        went_bad.1
    );
    // A figure for the report (/proc/uptime has 10 ms resolution), not an assertion.
    let delay = |from: &Value, to: &Value| {
        to["uptime"].as_f64().unwrap_or(f64::NAN) - from["uptime"].as_f64().unwrap_or(f64::NAN)
    };
    eprintln!(
        "testbed: unbind -> Unhealthy update {:.2} s, bind -> Healthy update {:.2} s, Allocate {} us",
        delay(unbind, went_bad.1),
        delay(bind, came_back.1),
        allocate["micros"]
    );

    // The PF's link down makes both VFs Unhealthy, its return Healthy: PF
    // carrier reaches the plugin through rtnetlink link messages.
    let (down_at, down) = *events(&lines, "link-down").first().expect("link-down line");
    let (up_at, up) = *events(&lines, "link-up").first().expect("link-up line");
    let both = |u: &Value, health: &str| ids.iter().all(|id| health_of(u, id) == Some(health));
    let link_lost = updates
        .iter()
        .find(|(i, u)| *i > down_at && *i < up_at && both(u, "Unhealthy"))
        .unwrap_or_else(|| panic!("no update with both VFs Unhealthy after the PF link went down\n{report}"));
    let link_back = updates
        .iter()
        .find(|(i, u)| *i > up_at && both(u, "Healthy"))
        .unwrap_or_else(|| panic!("no update with both VFs Healthy after the PF link came back\n{report}"));
    eprintln!(
        "testbed: PF link down -> Unhealthy update {:.2} s, link up -> Healthy update {:.2} s (carrier included)",
        delay(down, link_lost.1),
        delay(up, link_back.1),
    );

    let standin = &events(&lines, "standin-exit")[0].1;
    assert_eq!(standin["code"], 0, "{report}");
    let cdi = &events(&lines, "cdi").first().expect("cdi line").1["spec"];
    assert_eq!(cdi["kind"], "vfplane.io/vf");
    assert_eq!(cdi["devices"].as_array().map(Vec::len), Some(2), "{cdi}");
    let exit = &events(&lines, "plugin-exit")[0].1;
    assert_eq!(exit["code"], 0, "plugin exits 0 on SIGTERM\n{report}");
    assert_eq!(exit["socketsLeft"], 0, "plugin removed its socket\n{report}");
}
