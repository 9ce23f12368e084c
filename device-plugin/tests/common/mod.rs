//! A fake node (sysfs, /dev, kubelet dir, pool config) and helpers shared
//! by the kubelet contract tests.
#![allow(
    dead_code,
    clippy::missing_panics_doc,
    clippy::unwrap_used,
    clippy::expect_used
)] // test helpers: a panic is the failure report

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use tonic::Streaming;
use tonic::transport::Channel;
use vfplane_device_plugin::kubelet_standin::{KubeletStandin, connect_plugin};
use vfplane_device_plugin::{PluginConfig, RunningPlugin};
use vfplane_host::PciAddress;
use vfplane_host::fake::{FakeDevice, FakeSysfs};
use vfplane_proto::deviceplugin::v1beta1 as dp;
use vfplane_proto::deviceplugin::v1beta1::device_plugin_client::DevicePluginClient;

/// Generous bound for things that take milliseconds; a failure report, not a timing test.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Pf {
    pub address: PciAddress,
    pub netdev: String,
    pub vfs: Vec<PciAddress>,
    pub groups: Vec<u32>,
}

pub struct Node {
    pub fake: FakeSysfs,
    pub dir: tempfile::TempDir,
    pub pfs: Vec<Pf>,
}

pub fn addr(text: &str) -> PciAddress {
    text.parse().unwrap()
}

impl Node {
    /// PFs at `0000:0N:00.0` (N = 1, 2, ...), each with `(numa, vfs)`; every
    /// VF on vfio-pci (override set), alone in its group, its node present.
    pub fn new(layout: &[(i32, u16)]) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .try_init();
        let fake = FakeSysfs::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut pfs = Vec::new();
        let mut group = 10;
        for (i, (numa, count)) in layout.iter().enumerate() {
            let address = PciAddress {
                domain: 0,
                bus: u8::try_from(i + 1).unwrap(),
                device: 0,
                function: 0,
            };
            let mut device = FakeDevice::igb_pf(address);
            device.numa_node = *numa;
            device.iommu_group = Some(group);
            group += 1;
            let netdev = format!("eth{i}");
            fake.add_pf(&device, 64, &netdev).unwrap();
            let vfs = fake.add_vfs(address, *count, Some(group), *numa).unwrap();
            let mut groups = Vec::new();
            for vf in &vfs {
                fake.set_driver(*vf, Some("vfio-pci")).unwrap();
                fake.write(format!("devices/pci0000:00/{vf}/driver_override"), "vfio-pci\n")
                    .unwrap();
                fake.add_vfio_node(group).unwrap();
                groups.push(group);
                group += 1;
            }
            pfs.push(Pf {
                address,
                netdev,
                vfs,
                groups,
            });
        }
        fs::create_dir_all(dir.path().join("kubelet")).unwrap();
        Self { fake, dir, pfs }
    }

    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config/pools.yaml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn cdi_dir(&self) -> PathBuf {
        self.dir.path().join("cdi")
    }

    pub fn write_config(&self, text: &str) {
        let path = self.config_path();
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Replace atomically, as the agent does.
        let temporary = path.with_extension("tmp");
        fs::write(&temporary, text).unwrap();
        fs::rename(&temporary, &path).unwrap();
    }

    pub fn plugin_config(&self) -> PluginConfig {
        let mut config = PluginConfig::new(self.config_path());
        // A fake tree sends no kernel events: the tests probe it often and
        // rediscover every 5 s (a node: 1 s and 30 s, events in between).
        config.rescan_interval = std::time::Duration::from_millis(50);
        config.discovery_interval = std::time::Duration::from_secs(5);
        config.kubelet_dir = self.kubelet_dir();
        config.sysfs_root = self.fake.sysfs_root();
        config.dev_root = self.fake.dev_root();
        config.cdi_dir = Some(self.cdi_dir());
        config.state_dir = self.state_dir();
        config.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        config.drain_timeout = Duration::from_secs(2);
        config
    }

    pub async fn start_plugin(&self) -> RunningPlugin {
        vfplane_device_plugin::start(self.plugin_config()).await.unwrap()
    }

    pub fn socket(&self, pool: &str) -> PathBuf {
        self.kubelet_dir().join(vfplane_device_plugin::socket_name(pool))
    }

    pub async fn standin(&self) -> KubeletStandin {
        KubeletStandin::start(self.kubelet_dir()).await.unwrap()
    }

    pub fn vf_dir(&self, vf: PciAddress) -> String {
        format!("devices/pci0000:00/{vf}")
    }

    /// Sets a PF's link: operstate and carrier.
    pub fn set_link(&self, pf: usize, up: bool) {
        let p = &self.pfs[pf];
        let net = format!("devices/pci0000:00/{}/net/{}", p.address, p.netdev);
        self.fake
            .write(format!("{net}/operstate"), if up { "up\n" } else { "down\n" })
            .unwrap();
        self.fake
            .write(format!("{net}/carrier"), if up { "1\n" } else { "0\n" })
            .unwrap();
    }

    pub fn vfio_node(&self, group: u32) -> PathBuf {
        self.fake.dev_root().join("vfio").join(group.to_string())
    }
}

pub async fn client(socket: impl AsRef<std::path::Path>) -> DevicePluginClient<Channel> {
    connect_plugin(socket).await.unwrap()
}

pub async fn list_and_watch(client: &mut DevicePluginClient<Channel>) -> Streaming<dp::ListAndWatchResponse> {
    client.list_and_watch(dp::Empty {}).await.unwrap().into_inner()
}

/// The next ListAndWatch message that satisfies `want`; panics with the
/// last message seen after [`WAIT`].
pub async fn wait_for(
    stream: &mut Streaming<dp::ListAndWatchResponse>,
    what: &str,
    want: impl Fn(&dp::ListAndWatchResponse) -> bool,
) -> dp::ListAndWatchResponse {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Ok(Ok(Some(message))) => {
                if want(&message) {
                    return message;
                }
                last = Some(message);
            }
            Ok(Ok(None)) => panic!("stream ended while waiting for {what}; last: {last:?}"),
            Ok(Err(status)) => panic!("stream failed while waiting for {what}: {status}"),
            Err(_) => panic!("no update with {what} within {WAIT:?}; last: {last:?}"),
        }
    }
}

pub fn health_of(message: &dp::ListAndWatchResponse, id: PciAddress) -> Option<String> {
    let id = id.to_string();
    message
        .devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.clone())
}

pub fn is(message: &dp::ListAndWatchResponse, id: PciAddress, health: &str) -> bool {
    health_of(message, id).as_deref() == Some(health)
}

pub async fn metrics_text(plugin: &RunningPlugin) -> String {
    http_get(plugin, "/metrics").await
}

/// The whole HTTP/1.1 answer (head and body) of `GET path` on the plugin's
/// metrics address; the request asks the server to close the connection,
/// so the answer ends at EOF.
pub async fn http_get(plugin: &RunningPlugin, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = plugin.metrics_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

pub fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Makes VF `index` of PF `pf` (as a raised `sriov_numvfs` does), on
/// vfio-pci, alone in `group`, its node present.
pub fn add_vf(node: &Node, pf: usize, index: u16, group: u32) -> PciAddress {
    let pf_address = node.pfs[pf].address;
    let address = FakeSysfs::vf_address(pf_address, index);
    let numa = fs::read_to_string(node.fake.device_dir(pf_address).join("numa_node"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    node.fake
        .add_device(&FakeDevice {
            address,
            vendor: 0x8086,
            device: 0x10ca,
            class: 0x020000,
            numa_node: numa,
            driver: Some("vfio-pci".into()),
            iommu_group: Some(group),
        })
        .unwrap();
    let dir = node.fake.device_dir(address);
    std::os::unix::fs::symlink(format!("../{pf_address}"), dir.join("physfn")).unwrap();
    std::os::unix::fs::symlink(
        format!("../{address}"),
        node.fake.device_dir(pf_address).join(format!("virtfn{index}")),
    )
    .unwrap();
    node.fake.add_vfio_node(group).unwrap();
    address
}

/// Polls a metric until `want` holds (the plugin updates some a moment
/// after the effect a test can see); returns its value.
pub async fn wait_metric(plugin: &RunningPlugin, line_prefix: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics_text(plugin).await;
        if let Some(value) = metric(&text, line_prefix)
            && want(value)
        {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line_prefix} never as wanted:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
