//! Side by side in one guest: the same emulated NIC's VFs sending the same
//! frames through this driver (a vfio-pci VF, `pktgen`) and through the
//! kernel (an igbvf VF, AF_PACKET `sendto`, `afpacket_tx`), the host counting
//! what reaches the wire per source MAC. A measurement, not a pass/fail on
//! speed: it prints both rates and their ratio and asserts only that every
//! frame arrived. Slow (three rounds of 20,000 frames each way under TCG):
//! `cargo xtask test --slow`, or
//! `VFPLANE_E2E=1 cargo test -p vfplane-tests --test driver_kernel_path -- --ignored --nocapture`.

#![allow(clippy::expect_used)] // a panic is the failure report

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use xtask::testbed::{GuestOptions, Testbed};

const COUNT: u32 = 20_000;
const ROUNDS: u32 = 3;

fn script() -> String {
    format!(
        r#"
k=0000:00:12.0; u=0000:00:12.2
ifc=$(ls /sys/bus/pci/devices/$k/net/ | head -1)
ip link set $ifc up
echo $u > /sys/bus/pci/devices/$u/driver/unbind
echo vfio-pci > /sys/bus/pci/devices/$u/driver_override
echo $u > /sys/bus/pci/drivers_probe
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do grep -q 1 /sys/class/net/$ifc/carrier 2>/dev/null && break; sleep 1; done
for round in $(seq {ROUNDS}); do
  pktgen --pci $u --count {COUNT} --size 60 --dst 02:00:00:00:00:aa --warmup 2000
  afpacket_tx --iface $ifc --count {COUNT} --size 60 --dst 02:00:00:00:00:aa --warmup 2000
done
"#
    )
}

/// Counts datagrams with the test ethertype (0x88b5) per source MAC.
fn count_on_wire(socket: UdpSocket) -> Arc<Mutex<BTreeMap<String, u32>>> {
    let counts = Arc::new(Mutex::new(BTreeMap::new()));
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
    let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
    let shared = Arc::clone(&counts);
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) if n >= 14 && buf[12..14] == [0x88, 0xb5] => {
                    let src = buf[6..12]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    *shared.lock().expect("lock").entry(src).or_insert(0) += 1;
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Arc::strong_count(&shared) == 1 {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    counts
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[test]
#[ignore = "slow: 120,000 frames through TCG; run with --ignored"]
fn userspace_driver_versus_kernel_path_on_the_same_nic() {
    if !xtask::e2e::enabled(
        "userspace_driver_versus_kernel_path_on_the_same_nic",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let options = GuestOptions {
        vfs: 2,
        kernel_vf_driver: true,
        timeout: Duration::from_secs(900),
        ..GuestOptions::default()
    };
    let guest = testbed.start(&script(), &options).expect("guest starts");
    let socket = guest
        .pf_link(0)
        .expect("link")
        .socket
        .try_clone()
        .expect("socket");
    let counts = count_on_wire(socket);
    let outcome = guest.wait().expect("guest runs");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(outcome.exit_code, 0, "{}", outcome.output);
    let lines = outcome.json_lines();
    assert!(
        lines.iter().all(|l| l.get("error").is_none()),
        "{}",
        outcome.output
    );
    // A VF with no MAC from the PF picks a random one at every open, so
    // frames are attributed by each run's own MAC.
    let rates = |tool: &str| -> (Vec<f64>, Vec<String>) {
        let runs: Vec<&Value> = lines
            .iter()
            .filter(|l| l["tool"] == tool && l["pps"].is_number())
            .collect();
        assert_eq!(runs.len(), ROUNDS as usize, "{tool} rounds:\n{}", outcome.output);
        let mut macs: Vec<String> = runs
            .iter()
            .filter_map(|l| l["mac"].as_str().map(str::to_owned))
            .collect();
        macs.sort();
        macs.dedup();
        (runs.iter().filter_map(|l| l["pps"].as_f64()).collect(), macs)
    };
    let (vfio, vfio_mac) = rates("pktgen");
    let (kernel, kernel_mac) = rates("afpacket_tx");
    let counts = counts.lock().expect("lock").clone();
    let on_wire = |macs: &[String]| {
        macs.iter()
            .map(|m| counts.get(m).copied().unwrap_or(0))
            .sum::<u32>()
    };
    println!(
        "vfio-pci + vfplane-driver: {:?} pps (median {:.0}), {} frames on the wire",
        vfio,
        median(vfio.clone()),
        on_wire(&vfio_mac)
    );
    println!(
        "igbvf + AF_PACKET:        {:?} pps (median {:.0}), {} frames on the wire",
        kernel,
        median(kernel.clone()),
        on_wire(&kernel_mac)
    );
    println!("frames on the wire by source MAC: {counts:?}; runs' MACs: {vfio_mac:?} / {kernel_mac:?}");
    println!(
        "ratio (median userspace / median kernel): {:.2}",
        median(vfio) / median(kernel)
    );
    assert_eq!(
        on_wire(&vfio_mac),
        COUNT * ROUNDS,
        "every userspace frame reached the wire"
    );
    assert_eq!(
        on_wire(&kernel_mac),
        COUNT * ROUNDS,
        "every kernel-path frame reached the wire"
    );
}
