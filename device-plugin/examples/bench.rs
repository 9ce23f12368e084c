//! `device-plugin-bench`: the device plugin's figures on a fake node with
//! 256 VFs (8 PFs of 32, two NUMA nodes), measured against the real
//! `vfplane-device-plugin` binary running as its own process, with an
//! in-process kubelet stand-in talking to it over its unix socket:
//!
//! - Allocate latency (one VF, and four VFs, per call): p50, p99, max;
//! - time from a fake-sysfs change (a VF's driver link removed or
//!   restored) to the ListAndWatch update: a fake tree sends no kernel
//!   event, so this is the safety-net probe's latency (the testbed measures
//!   the uevent path on the real kernel); and from a `/dev/vfio` node
//!   removed (an inotify-watched change) to the update;
//! - time from `kubelet.sock` being created anew (a kubelet restart that
//!   wiped the directory) to the plugin's Register arriving;
//! - the plugin's RSS and open descriptors after 200 warm-up Allocates and
//!   after the timed ones (`--allocations N` of one VF, N of four: a leak
//!   per call shows as growth);
//! - the plugin's RSS (VmRSS, VmHWM) and its CPU use while idle over 30 s
//!   (the cost of the default 1 s safety-net probes and 5 s discoveries),
//!   and the time one probe of all 256 VFs takes.
//!
//! ```text
//! cargo build --release -p vfplane-device-plugin --bins --examples
//! target/release/examples/device-plugin-bench [--plugin PATH] [--allocations N]
//! ```
//!
//! Prints figures; asserts nothing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfplane_device_plugin::kubelet_standin::{KubeletStandin, connect_plugin};
use vfplane_host::PciAddress;
use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_proto::deviceplugin::v1beta1 as dp;

const PFS: u8 = 8;
const VFS_PER_PF: u16 = 32;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

struct Node {
    fake: FakeSysfs,
    dir: tempfile::TempDir,
    vfs: Vec<(PciAddress, u32)>,
}

fn build_node() -> BenchResult<Node> {
    let fake = FakeSysfs::new()?;
    let dir = tempfile::tempdir()?;
    let mut vfs = Vec::new();
    let mut group = 100;
    for pf in 1..=PFS {
        let address = PciAddress::new(0, pf, 0, 0)?;
        let numa = if pf <= PFS / 2 { 0 } else { 1 };
        let mut device = FakeDevice::igb_pf(address);
        device.numa_node = numa;
        fake.add_pf(&device, 64, &format!("eth{pf}"))?;
        for vf in fake.add_vfs(address, VFS_PER_PF, Some(group), numa)? {
            fake.set_driver(vf, Some("vfio-pci"))?;
            fake.write(format!("devices/pci0000:00/{vf}/driver_override"), "vfio-pci\n")?;
            fake.add_vfio_node(group)?;
            vfs.push((vf, group));
            group += 1;
        }
    }
    std::fs::create_dir_all(dir.path().join("kubelet"))?;
    std::fs::write(
        dir.path().join("pools.yaml"),
        "pools:\n  - name: bench\n    selector: {vendor: \"8086\", device: \"10ca\"}\n",
    )?;
    Ok(Node { fake, dir, vfs })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} p50={:?} p99={:?} max={:?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples.last().copied().unwrap_or_default()
    );
}

fn proc_status(pid: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_owned())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn plugin_path() -> BenchResult<PathBuf> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--plugin" {
            return Ok(PathBuf::from(args.next().ok_or("--plugin needs a path")?));
        }
    }
    // target/<profile>/examples/device-plugin-bench -> target/<profile>/vfplane-device-plugin
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or("cannot find the target directory")?;
    Ok(dir.join("vfplane-device-plugin"))
}

fn allocations() -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--allocations")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

async fn next_update(
    stream: &mut tonic::Streaming<dp::ListAndWatchResponse>,
    want: impl Fn(&dp::ListAndWatchResponse) -> bool,
) -> BenchResult<Instant> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .map_err(|_| "no update within 10 s")??
            .ok_or("stream ended")?;
        if want(&message) {
            return Ok(Instant::now());
        }
    }
}

fn health(message: &dp::ListAndWatchResponse, id: &str) -> Option<String> {
    message
        .devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.clone())
}

async fn scrape(addr: std::net::SocketAddr) -> BenchResult<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::main]
async fn main() -> BenchResult<()> {
    let plugin_bin = plugin_path()?;
    let node = build_node()?;
    let kubelet_dir = node.dir.path().join("kubelet");
    println!(
        "fake node: {} VFs on {PFS} PFs, 2 NUMA nodes; plugin {}",
        node.vfs.len(),
        plugin_bin.display()
    );
    let mut kubelet = KubeletStandin::start(&kubelet_dir).await?;
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = Command::new(&plugin_bin)
        .arg("--pool-config")
        .arg(node.dir.path().join("pools.yaml"))
        .arg("--kubelet-dir")
        .arg(&kubelet_dir)
        .arg("--sysfs-root")
        .arg(node.fake.sysfs_root())
        .arg("--dev-root")
        .arg(node.fake.dev_root())
        .arg("--cdi-dir")
        .arg(node.dir.path().join("cdi"))
        .arg("--state-dir")
        .arg(node.dir.path().join("state"))
        .arg("--metrics-addr")
        .arg(metrics_addr.to_string())
        .args(
            std::env::var("BENCH_RESCAN_MS")
                .map(|ms| vec!["--rescan-interval-ms".to_owned(), ms])
                .unwrap_or_default(),
        )
        .env(
            "RUST_LOG",
            std::env::var("BENCH_PLUGIN_LOG").unwrap_or_else(|_| "error".to_owned()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", plugin_bin.display()))?;
    let pid = child.id();
    let _plugin = Plugin(child);
    let started = Instant::now();
    let registration = kubelet
        .next_registration(Duration::from_secs(30))
        .await
        .ok_or("the plugin did not register")?;
    println!("start to Register: {:?}", registration.at - started);
    let mut client = connect_plugin(registration.socket(&kubelet_dir)).await?;
    let mut stream = client.list_and_watch(dp::Empty {}).await?.into_inner();
    let first = stream.message().await?.ok_or("no first list")?;
    println!("first ListAndWatch: {} devices", first.devices.len());

    // Allocate latency over the unix socket.
    let ids: Vec<String> = node.vfs.iter().map(|(vf, _)| vf.to_string()).collect();
    let request = |ids: &[String]| dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: ids.to_vec(),
        }],
    };
    // A VF given out carries a mark until the agent scrubbed it; the
    // plugin refuses it meanwhile. Standing in for the agent, the bench
    // clears the marks after each call, outside the timed section.
    let state_dir = node.dir.path().join("state");
    let scrubbed = |ids: &[String]| -> BenchResult<()> {
        for id in ids {
            vfplane_proto::vf_state::clear_handed_out(&state_dir, id.parse()?)?;
        }
        Ok(())
    };
    for i in 0..200 {
        let call = &ids[i % ids.len()..=i % ids.len()];
        client.allocate(request(call)).await?;
        scrubbed(call)?;
    }
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let (rss_warm, fds_warm) = (proc_status(pid, "VmRSS:").unwrap_or_default(), open_fds());
    for per_call in [1usize, 4] {
        let mut samples = Vec::with_capacity(allocations());
        for i in 0..allocations() {
            let start = (i * per_call) % (ids.len() - per_call);
            let given = &ids[start..start + per_call];
            let call = request(given);
            let t = Instant::now();
            client.allocate(call).await?;
            samples.push(t.elapsed());
            scrubbed(given)?;
        }
        summary(&format!("Allocate, {per_call} VF(s) per call"), samples);
    }
    println!(
        "plugin after 200 warm-up Allocates: VmRSS {rss_warm}, {fds_warm} fds; after {} more: VmRSS {}, {} fds",
        2 * allocations(),
        proc_status(pid, "VmRSS:").unwrap_or_default(),
        open_fds()
    );
    let mut samples = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        client
            .get_preferred_allocation(dp::PreferredAllocationRequest {
                container_requests: vec![dp::ContainerPreferredAllocationRequest {
                    available_device_i_ds: ids.clone(),
                    must_include_device_i_ds: Vec::new(),
                    allocation_size: 4,
                }],
            })
            .await?;
        samples.push(t.elapsed());
    }
    summary("GetPreferredAllocation, 4 of 256", samples);

    // Fake sysfs change -> ListAndWatch update: no kernel event comes from
    // a fake tree, so the safety-net probe finds it.
    let mut down = Vec::new();
    let mut up = Vec::new();
    for round in 0..40 {
        let (vf, _) = node.vfs[(round * 7) % node.vfs.len()];
        let id = vf.to_string();
        // Spread the changes over the probe period.
        tokio::time::sleep(Duration::from_millis(7 * (round as u64 % 10))).await;
        let t = Instant::now();
        node.fake.set_driver(vf, None)?;
        let at = next_update(&mut stream, |m| health(m, &id).as_deref() == Some("Unhealthy")).await?;
        down.push(at - t);
        tokio::time::sleep(Duration::from_millis(3 * (round as u64 % 10))).await;
        let t = Instant::now();
        node.fake.set_driver(vf, Some("vfio-pci"))?;
        let at = next_update(&mut stream, |m| health(m, &id).as_deref() == Some("Healthy")).await?;
        up.push(at - t);
    }
    summary(
        "fake sysfs, driver unbound -> Unhealthy update (safety-net probe)",
        down,
    );
    summary(
        "fake sysfs, driver bound -> Healthy update (safety-net probe)",
        up,
    );

    // /dev/vfio node removed -> update (inotify-driven).
    let mut samples = Vec::new();
    for round in 0..40 {
        let (vf, group) = node.vfs[(round * 11) % node.vfs.len()];
        let id = vf.to_string();
        let path = node.fake.dev_root().join("vfio").join(group.to_string());
        tokio::time::sleep(Duration::from_millis(7 * (round as u64 % 10))).await;
        let t = Instant::now();
        std::fs::remove_file(&path)?;
        let at = next_update(&mut stream, |m| health(m, &id).as_deref() == Some("Unhealthy")).await?;
        samples.push(at - t);
        node.fake.add_vfio_node(group)?;
        next_update(&mut stream, |m| health(m, &id).as_deref() == Some("Healthy")).await?;
    }
    summary("/dev/vfio node removed -> Unhealthy update", samples);
    drop(stream);

    // kubelet restart -> Register.
    let mut samples = Vec::new();
    for _ in 0..20 {
        let created = kubelet.restart().await?;
        loop {
            let registration = kubelet
                .next_registration(Duration::from_secs(10))
                .await
                .ok_or("no registration after a kubelet restart")?;
            if registration.at >= created {
                samples.push(registration.at - created);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    summary("kubelet.sock recreated -> Register", samples);

    // Idle cost and memory.
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let before = cpu_ticks(pid).ok_or("cannot read the plugin's CPU time")?;
    let idle = Duration::from_secs(30);
    tokio::time::sleep(idle).await;
    let after = cpu_ticks(pid).ok_or("cannot read the plugin's CPU time")?;
    println!(
        "idle CPU over {idle:?}: {:.2} % of one core",
        (after - before) as f64 / ticks_per_second / idle.as_secs_f64() * 100.0
    );
    let text = scrape(metrics_addr).await?;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let scans = value("vfplane_device_plugin_scans_total");
    println!(
        "health probe of all {} VFs: {:.2} ms on average over {scans} probes",
        node.vfs.len(),
        value("vfplane_device_plugin_scan_seconds_total") / scans * 1e3
    );
    let discoveries = value("vfplane_device_plugin_discoveries_total");
    println!(
        "full discovery of all {} VFs: {:.2} ms on average over {discoveries} discoveries",
        node.vfs.len(),
        value("vfplane_device_plugin_discovery_seconds_total") / discoveries * 1e3
    );
    println!(
        "plugin RSS: VmRSS {} VmHWM {}",
        proc_status(pid, "VmRSS:").unwrap_or_default(),
        proc_status(pid, "VmHWM:").unwrap_or_default()
    );
    Ok(())
}
