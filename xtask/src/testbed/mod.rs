//! The emulated SR-IOV node: QEMU's `igb` (an Intel 82576 with SR-IOV)
//! behind an emulated `intel-iommu`, a Debian 6.12 guest kernel with the real
//! igb and vfio-pci drivers, busybox, and the workspace's binaries linked
//! statically and on `PATH`.
//!
//! [`Testbed::prepare`] installs and caches what it needs (idempotently);
//! [`Testbed::start`] boots a guest that runs one script as root and powers
//! off; [`RunningGuest::wait`] collects its output and exit code. Frames the
//! guest's PFs send leave through `-netdev dgram` as UDP datagrams on
//! 127.0.0.1 of QEMU's network namespace (the host's, or the cluster's,
//! where the host side's socket is then made too):
//! [`RunningGuest::pf_link`] gives the host side of each link.

mod cpio;
pub mod insns;
mod kernel;
mod rootfs;
pub mod wire;

use std::fs::{self, File};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};

pub use cpio::CpioArchive;
pub use kernel::GuestKernel;
pub use rootfs::NodeRootfs;
pub use wire::Wire;

const INIT_SCRIPT: &str = include_str!("init.sh");
const STAGE_SCRIPT: &str = include_str!("stage.sh");
const START_MARKER: &str = "VFPLANE-TESTBED-START";
const EXIT_MARKER: &str = "VFPLANE-TESTBED-EXIT ";

/// How the guest's NICs are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Topology {
    /// One igb PF at 0000:00:02.0 on the root bus (NUMA node unknown).
    #[default]
    SinglePf,
    /// Two NUMA nodes, the CPUs split between them (node 0 takes the odd
    /// one), a PF on each: 0000:00:02.0 behind nothing (node unknown) and
    /// 0000:21:00.0 behind a pxb-pcie on node 1.
    TwoNumaNodes,
    /// One igb PF at 0000:01:00.0 behind a PCIe root port without ACS
    /// (`disable-acs=on`): the kernel cannot tell the devices below the
    /// port apart for DMA, so the port, the PF and every VF it makes share
    /// one IOMMU group.
    SharedIommuGroup,
}

/// The PF's address in [`Topology::SharedIommuGroup`].
pub const SHARED_GROUP_PF: &str = "0000:01:00.0";

impl Topology {
    /// How many PFs (and so datagram links) the guest has.
    pub fn pf_count(self) -> usize {
        match self {
            Self::SinglePf | Self::SharedIommuGroup => 1,
            Self::TwoNumaNodes => 2,
        }
    }
}

/// What the guest runs as PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum GuestInit {
    /// busybox from the initramfs: the script runs straight after the
    /// kernel's drivers load (about 5 s to the script).
    #[default]
    Busybox,
    /// systemd, on the Debian root image (see [`NodeRootfs`]) booted from a
    /// virtio disk: a node as production runs it, with D-Bus and udev. The
    /// run's files are copied onto the disk's root before systemd starts,
    /// and the `vfplane-testbed` unit runs the script.
    Systemd,
}

/// What kind of acceleration QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: always works.
    Tcg,
    /// KVM: used only when a probe guest really ran under it on this machine.
    Kvm,
}

/// Options of one guest run.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// VFs the init creates on every PF before the script (0: none).
    pub vfs: u16,
    /// Guest memory in MiB, at most [`MAX_GUEST_MEMORY_MIB`].
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// PF layout.
    pub topology: Topology,
    /// Load the kernel VF driver (igbvf) at boot.
    pub kernel_vf_driver: bool,
    /// The guest is killed after this long.
    pub timeout: Duration,
    /// Extra files put into the guest: (guest path, contents, mode).
    pub files: Vec<(String, Vec<u8>, u32)>,
    /// Run QEMU inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// A management NIC (virtio-net, MAC [`MGMT_MAC`]) on this tap device,
    /// which must already exist in the guest's network namespace.
    pub tap: Option<String>,
    /// Move the root off the initramfs onto a tmpfs before anything runs
    /// (container runtimes cannot `pivot_root` out of an initramfs).
    pub root_on_tmpfs: bool,
    /// Load the kernel modules a Kubernetes node needs (overlayfs, bridge,
    /// veth, nf_tables, virtio-net).
    pub node_modules: bool,
    /// 2 MiB hugepages the guest kernel reserves at boot (its command line's
    /// `hugepagesz=2M hugepages=N`), taken out of `memory_mib`. The driver
    /// maps its DMA memory from them when it can (one process of the
    /// driver's examples with the default configuration takes 6: 8 MiB of
    /// buffers and a page per ring).
    pub hugepages_2m: u32,
    /// Under TCG, run every vCPU on one host thread (`-accel
    /// tcg,thread=single`) instead of one thread each. QEMU 10.0.2's
    /// multi-threaded TCG died under the reliability campaigns' VF resets
    /// (`iotlb_to_section: Assertion 'section_index < d->map.sections_nb'
    /// failed`: a vCPU's TLB kept a memory section the other vCPU's BAR
    /// change had just removed), and twice before that left a vCPU that
    /// never woke (guest RCU stalls, "timer wakeup didn't happen ...
    /// cpu=1", then the whole node frozen); a driver test guest once hung
    /// the same way between two VF opens. On by default; the testbed
    /// benchmarks turn it off to keep one host thread per vCPU, as their
    /// figures so far were measured.
    pub single_threaded_tcg: bool,
    /// More QEMU `-device` arguments (e.g. `virtio-rng-pci,bus=pcie.0,addr=0x9`):
    /// every device present at boot takes an IOMMU group before any VF is
    /// created, so one more renumbers the VFs' groups, as a node that
    /// reboots with a card added does.
    pub extra_devices: Vec<String>,
    /// Under TCG, load the instruction-counting plugin
    /// (`vfplane-guest-insns`, built on first use): the spans the guest's
    /// programs mark are read with [`RunningGuest::instruction_spans`].
    /// Needs `single_threaded_tcg` false (see [`Testbed::start`]'s errors).
    pub count_instructions: bool,
    /// What runs as PID 1.
    pub init: GuestInit,
}

/// 2 MiB hugepages a guest reserves unless told otherwise: 64 MiB, room
/// for five driver processes at once, small beside the cluster node's 2.5
/// GiB (1.6 GiB of it available once a pod has run).
pub const DEFAULT_HUGEPAGES_2M: u32 = 32;

/// The most memory a guest may have. From 2.75 GiB on, q35 keeps only 2 GiB
/// of RAM below 4 GiB and opens a 64-bit PCI window above RAM, where the
/// guest kernel then places the VFs' BARs; QEMU 10.0 truncates such a VF
/// BAR and every VF register reads 0 (testbed.md). Below it, all RAM is low
/// and the BARs stay in the 32-bit window.
pub const MAX_GUEST_MEMORY_MIB: u32 = 2560;

/// The management NIC's MAC address (see [`GuestOptions::tap`]).
pub const MGMT_MAC: &str = "52:54:00:76:66:01";

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            vfs: 0,
            memory_mib: 1024,
            cpus: 2,
            topology: Topology::SinglePf,
            kernel_vf_driver: false,
            timeout: Duration::from_secs(300),
            files: Vec::new(),
            netns: None,
            tap: None,
            root_on_tmpfs: false,
            node_modules: false,
            hugepages_2m: DEFAULT_HUGEPAGES_2M,
            single_threaded_tcg: true,
            extra_devices: Vec::new(),
            count_instructions: false,
            init: GuestInit::Busybox,
        }
    }
}

/// A prepared testbed: packages installed, kernel cached, binaries built.
#[derive(Debug)]
pub struct Testbed {
    workspace: PathBuf,
    dir: PathBuf,
    kernel: GuestKernel,
    base_initrd: PathBuf,
    binaries: GuestBinaries,
    accel: Accel,
    /// The systemd node's root image, built on first use.
    node_rootfs: std::sync::OnceLock<NodeRootfs>,
}

/// The host side of one PF's link: datagrams sent to 127.0.0.1:`guest_port`
/// arrive in the guest as received frames; frames the guest sends arrive on
/// `socket`. Both live in QEMU's network namespace.
#[derive(Debug)]
pub struct PfLink {
    /// Port QEMU listens on (host -> guest).
    pub guest_port: u16,
    /// Bound to the port QEMU sends to (guest -> host).
    pub socket: UdpSocket,
}

impl PfLink {
    /// Sends one Ethernet frame into the guest's PF port.
    ///
    /// # Errors
    /// Socket errors.
    pub fn send_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.socket.send_to(frame, ("127.0.0.1", self.guest_port))
    }
}

/// A booted guest.
#[derive(Debug)]
pub struct RunningGuest {
    child: Child,
    run_dir: PathBuf,
    links: Vec<PfLink>,
    started: Instant,
    timeout: Duration,
}

/// What a finished guest left.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// The script's exit code.
    pub exit_code: i32,
    /// The script's output (stdout and stderr), without testbed markers.
    pub output: String,
    /// The guest console (kernel log).
    pub console: String,
    /// Seconds from QEMU start to the script's start, when it started.
    pub script_started_after: Option<f64>,
}

impl GuestOutcome {
    /// The script's output parsed as JSON documents: every line that starts
    /// with `{` or `[` and parses.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.output
            .lines()
            .filter(|l| l.starts_with('{') || l.starts_with('['))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
}

impl Testbed {
    /// Installs host packages, caches the kernel, builds the workspace's
    /// binaries statically and the base initramfs. Safe to call from
    /// several processes at once (a file lock serialises them).
    ///
    /// # Errors
    /// When a package, the kernel or the build cannot be had.
    pub fn prepare() -> Result<Self> {
        let workspace = workspace_root();
        let dir = target_dir(&workspace).join("testbed");
        fs::create_dir_all(&dir)?;
        let lock = File::create(dir.join(".lock"))?;
        lock.lock().context("locking the testbed cache")?;
        prune_run_initrds(&dir.join("runs"));

        crate::process::run_checked(Command::new("bash").arg(workspace.join("testbed/install-host-deps.sh")))
            .context("installing the testbed's host packages")?;
        let kernel = kernel::ensure(&dir.join("kernel")).context("preparing the guest kernel")?;
        let binaries = build_guest_binaries(&workspace).context("building the guest binaries")?;
        let base_initrd = dir.join("base.cpio");
        build_base_initrd(&kernel, &base_initrd).context("building the base initramfs")?;
        let accel = choose_accel(&dir, &kernel, &base_initrd)?;
        drop(lock);
        Ok(Self {
            workspace,
            dir,
            kernel,
            base_initrd,
            binaries,
            accel,
            node_rootfs: std::sync::OnceLock::new(),
        })
    }

    /// The systemd node's root image, built (once, cached outside the work
    /// tree) when first asked for.
    ///
    /// # Errors
    /// When the image cannot be built (see [`rootfs::ensure`]).
    pub fn node_rootfs(&self) -> Result<&NodeRootfs> {
        if let Some(rootfs) = self.node_rootfs.get() {
            return Ok(rootfs);
        }
        let cache = crate::cache::cache_root().join("node-rootfs");
        fs::create_dir_all(&cache)?;
        let lock = File::create(cache.join(".lock"))?;
        lock.lock().context("locking the node root image cache")?;
        let built =
            rootfs::ensure(&cache, &self.kernel).context("preparing the systemd node's root image")?;
        drop(lock);
        Ok(self.node_rootfs.get_or_init(|| built))
    }

    /// The binaries that are on the guest's PATH: the product's and the
    /// tests' own.
    pub fn binaries(&self) -> impl Iterator<Item = &PathBuf> {
        self.binaries.product.iter().chain(&self.binaries.tests_only)
    }

    /// What vfplane ships (its image): no test feature, no test tool.
    pub fn product_binaries(&self) -> &[PathBuf] {
        &self.binaries.product
    }

    /// The acceleration guests use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The workspace root.
    pub fn workspace(&self) -> &Path {
        &self.workspace
    }

    /// Boots a guest that runs `script` (a POSIX sh script) as root.
    ///
    /// # Errors
    /// When QEMU cannot be started or the run directory cannot be written.
    pub fn start(&self, script: &str, options: &GuestOptions) -> Result<RunningGuest> {
        if options.memory_mib > MAX_GUEST_MEMORY_MIB {
            bail!(
                "guest memory {} MiB is above the testbed's {MAX_GUEST_MEMORY_MIB} MiB: with more, \
                 q35 maps the VFs' BARs above 4 GiB, where QEMU 10.0 leaves them dead",
                options.memory_mib
            );
        }
        if u64::from(options.hugepages_2m) * 2 > u64::from(options.memory_mib) / 4 {
            bail!(
                "{} hugepages of 2 MiB are more than a quarter of the guest's {} MiB",
                options.hugepages_2m,
                options.memory_mib
            );
        }
        let root_image = match options.init {
            GuestInit::Busybox => None,
            GuestInit::Systemd => Some(self.node_rootfs()?.image.clone()),
        };
        let run_dir = tempdir_in(&self.dir.join("runs"))?;
        let initrd = run_dir.join(RUN_INITRD);
        let mut bytes = fs::read(&self.base_initrd)?;
        let mut run = CpioArchive::new();
        let env = format!(
            "VFPLANE_TESTBED_VFS={}\nVFPLANE_TESTBED_KERNEL_VF_DRIVER={}\n\
             VFPLANE_TESTBED_ROOT_ON_TMPFS={}\nVFPLANE_TESTBED_NODE_MODULES={}\n\
             VFPLANE_TESTBED_INIT={}\n",
            options.vfs,
            u8::from(options.kernel_vf_driver),
            u8::from(options.root_on_tmpfs),
            u8::from(options.node_modules),
            match options.init {
                GuestInit::Busybox => "busybox",
                GuestInit::Systemd => "systemd",
            },
        );
        run.file("etc/vfplane/testbed.env", 0o644, env.as_bytes());
        // On the systemd node the run's files go onto the disk's root: the
        // initramfs holds them under overlay/ until /init copies them.
        let prefix = match options.init {
            GuestInit::Busybox => "",
            GuestInit::Systemd => "overlay/",
        };
        let mut add = |path: &str, mode: u32, contents: &[u8]| {
            let path = format!("{prefix}{}", path.trim_start_matches('/'));
            run.parents(&path);
            run.file(&path, mode, contents);
        };
        for binary in self.binaries() {
            let name = binary
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            add(&format!("usr/local/bin/{name}"), 0o755, &fs::read(binary)?);
        }
        add("etc/vfplane/script", 0o755, script.as_bytes());
        if options.init == GuestInit::Systemd {
            add("etc/vfplane/testbed.env", 0o644, env.as_bytes());
            add("etc/vfplane/stage.sh", 0o644, STAGE_SCRIPT.as_bytes());
        }
        for (path, contents, mode) in &options.files {
            add(path, *mode, contents);
        }
        bytes.extend_from_slice(&run.finish());
        fs::write(&initrd, bytes)?;

        let mut links = Vec::new();
        let mut netdev_args = Vec::new();
        for index in 0..options.topology.pf_count() {
            // UDP rather than unix datagrams: a unix datagram socket queues
            // only net.unix.max_dgram_qlen (10) frames, and line-rate bursts
            // were lost whenever the reader was descheduled.
            let socket = udp_socket(options.netns.as_deref())?;
            let host_port = socket.local_addr()?.port();
            let guest_port = udp_socket(options.netns.as_deref())?.local_addr()?.port();
            netdev_args.push(format!(
                "dgram,id=n{index},local.type=inet,local.host=127.0.0.1,local.port={guest_port},\
                 remote.type=inet,remote.host=127.0.0.1,remote.port={host_port}"
            ));
            links.push(PfLink { guest_port, socket });
        }

        let mut qemu = match &options.netns {
            Some(netns) => {
                let mut ip = Command::new("ip");
                ip.args(["netns", "exec", netns, "qemu-system-x86_64"]);
                ip
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let accel = match self.accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        };
        if self.accel == Accel::Tcg && options.single_threaded_tcg {
            // QEMU refuses `-machine accel=` beside `-accel`.
            qemu.args(["-machine", "q35", "-accel", "tcg,thread=single"]);
        } else {
            qemu.arg("-machine").arg(format!("q35,accel={accel}"));
        }
        if options.count_instructions {
            ensure!(
                self.accel == Accel::Tcg,
                "counting guest instructions needs TCG (a QEMU plugin), not {:?}",
                self.accel
            );
            ensure!(
                !options.single_threaded_tcg,
                "counting guest instructions needs a host thread per vCPU (single_threaded_tcg \
                 false): with QEMU 10.0.2's single-threaded TCG and the plugin loaded, the guest \
                 kernel crashed at boot (stack corruption), twice in two runs"
            );
            let plugin = insns::build_plugin(&self.workspace)?;
            qemu.arg("-plugin").arg(format!(
                "file={},out={}",
                plugin.display(),
                run_dir.join(insns::SPANS_FILE).display()
            ));
        }
        for device in &options.extra_devices {
            qemu.arg("-device").arg(device);
        }
        qemu.args([
            "-cpu",
            "max",
            "-smp",
            &options.cpus.to_string(),
            "-m",
            &options.memory_mib.to_string(),
        ]);
        qemu.args(["-display", "none", "-monitor", "none", "-no-reboot"]);
        // Without this, QEMU places VF BARs above 4 GiB, truncates them and
        // every VF register reads 0 (testbed.md).
        qemu.args(["-global", "q35-pcihost.pci-hole64-size=0"]);
        qemu.arg("-serial")
            .arg(format!("file:{}", run_dir.join("console.log").display()));
        qemu.arg("-serial")
            .arg(format!("file:{}", run_dir.join("output.log").display()));
        // Two more ports for long-running guest services' logs (ttyS2, ttyS3).
        for port in [2, 3] {
            qemu.arg("-serial").arg(format!(
                "file:{}",
                run_dir.join(format!("serial{port}.log")).display()
            ));
        }
        if let Some(tap) = &options.tap {
            // A fixed slot, clear of the PF (00:02.0) and its VFs (00:12.x,
            // 00:13.x), so the management NIC moves no SR-IOV address.
            qemu.args([
                "-netdev",
                &format!("tap,id=mgmt,ifname={tap},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=mgmt,mac={MGMT_MAC},bus=pcie.0,addr=0x8"),
            ]);
        }
        match options.topology {
            Topology::SinglePf => {
                qemu.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
                qemu.args(["-device", "igb,netdev=n0"]);
            }
            Topology::TwoNumaNodes => {
                let half = options.memory_mib / 2;
                qemu.args(["-object", &format!("memory-backend-ram,id=m0,size={half}M")]);
                qemu.args(["-object", &format!("memory-backend-ram,id=m1,size={half}M")]);
                // The CPUs split in halves, node 0 taking the odd one.
                let cpus = options.cpus.max(2);
                let first = cpus.div_ceil(2);
                let range = |from: u32, to: u32| {
                    if from == to {
                        from.to_string()
                    } else {
                        format!("{from}-{to}")
                    }
                };
                qemu.args([
                    "-numa",
                    &format!("node,nodeid=0,cpus={},memdev=m0", range(0, first - 1)),
                    "-numa",
                    &format!("node,nodeid=1,cpus={},memdev=m1", range(first, cpus - 1)),
                ]);
                qemu.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
                qemu.args(["-device", "igb,netdev=n0,bus=pcie.0,addr=2"]);
                qemu.args(["-device", "pxb-pcie,id=pxb1,bus_nr=32,numa_node=1,bus=pcie.0"]);
                qemu.args(["-device", "pcie-root-port,id=rp1,bus=pxb1,chassis=1"]);
                qemu.args(["-device", "igb,netdev=n1,bus=rp1"]);
            }
            Topology::SharedIommuGroup => {
                qemu.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
                qemu.args([
                    "-device",
                    "pcie-root-port,id=rp0,bus=pcie.0,addr=0x3,chassis=3,disable-acs=on",
                ]);
                qemu.args(["-device", "igb,netdev=n0,bus=rp0"]);
            }
        }
        for arg in &netdev_args {
            qemu.arg("-netdev").arg(arg);
        }
        if let Some(image) = &root_image {
            // snapshot=on: the guest's writes go to a temporary overlay,
            // so every boot starts from the same image. A fixed slot clear
            // of the PFs, their VFs and the management NIC (0x8).
            qemu.args([
                "-drive",
                &format!(
                    "file={},if=none,id=rootdisk,format=raw,snapshot=on",
                    image.display()
                ),
                "-device",
                "virtio-blk-pci,drive=rootdisk,bus=pcie.0,addr=0x7",
            ]);
        }
        qemu.arg("-kernel").arg(&self.kernel.vmlinuz);
        qemu.arg("-initrd").arg(&initrd);
        let mut cmdline = "console=ttyS0 intel_iommu=on panic=-1 quiet loglevel=4".to_owned();
        if options.hugepages_2m > 0 {
            cmdline.push_str(&format!(" hugepagesz=2M hugepages={}", options.hugepages_2m));
        }
        qemu.arg("-append").arg(cmdline);
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = qemu.spawn().context("starting qemu-system-x86_64")?;
        Ok(RunningGuest {
            child,
            run_dir,
            links,
            started,
            timeout: options.timeout,
        })
    }

    /// Boots a guest, runs `script`, echoes its output to stderr as it comes
    /// when `echo` is set, and returns the outcome.
    ///
    /// # Errors
    /// When the guest cannot start, or hangs past the timeout.
    pub fn run(&self, script: &str, options: &GuestOptions, echo: bool) -> Result<GuestOutcome> {
        self.start(script, options)?.wait_echoing(echo)
    }
}

impl Drop for RunningGuest {
    /// A guest never outlives its owner: QEMU is killed if still running.
    /// Its initramfs (hundreds of MiB for a cluster node) goes with it; the
    /// logs stay.
    fn drop(&mut self) {
        self.power_off();
        let _ = fs::remove_file(self.run_dir.join(RUN_INITRD));
    }
}

/// The name of a run's initramfs in its run directory.
const RUN_INITRD: &str = "initrd.cpio";

/// Removes the initramfs of runs whose owner died without dropping its
/// guest (a killed test). QEMU reads the file whole when it starts, so
/// only files older than any start can take are touched.
fn prune_run_initrds(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let initrd = entry.path().join(RUN_INITRD);
        let stale = fs::metadata(&initrd)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(15 * 60));
        if stale {
            let _ = fs::remove_file(&initrd);
        }
    }
}

impl RunningGuest {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Powers the guest off at once (QEMU killed, as a power cut), and
    /// waits for QEMU to be gone.
    pub fn power_off(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Whether QEMU still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The log file of serial port `ttyS<port>` (2 or 3: free for guest services).
    pub fn serial_log(&self, port: u8) -> PathBuf {
        self.run_dir.join(format!("serial{port}.log"))
    }

    /// The guest kernel's console log.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Starts collecting every frame PF `index` sends (see [`Wire`]).
    ///
    /// # Errors
    /// No such PF, or its socket cannot be cloned or set up.
    pub fn listen_wire(&self, index: usize) -> Result<Wire> {
        let link = self
            .pf_link(index)
            .with_context(|| format!("the guest has no PF link {index}"))?;
        Ok(Wire::listen(link.socket.try_clone()?)?)
    }

    /// The host side of PF `index`'s link.
    pub fn pf_link(&self, index: usize) -> Option<&PfLink> {
        self.links.get(index)
    }

    /// The directory holding this run's logs.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Output the script has written so far (markers removed).
    pub fn output_so_far(&self) -> String {
        clean_output(&fs::read_to_string(self.run_dir.join("output.log")).unwrap_or_default()).0
    }

    /// Waits for the `nth` (from 0) line of the script's output that is a
    /// JSON object `pick` accepts, and returns it.
    ///
    /// # Errors
    /// The script ends, or `timeout` passes, before that line appears: the
    /// error names `what` and holds the script's output and the last lines
    /// of the guest kernel's console (where a hung guest says why).
    pub fn json_line(
        &self,
        what: &str,
        timeout: Duration,
        nth: usize,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (output, ended) =
                clean_output(&fs::read_to_string(self.run_dir.join("output.log")).unwrap_or_default());
            let found = output
                .lines()
                .filter(|l| l.starts_with('{'))
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| pick(v))
                .nth(nth);
            if let Some(v) = found {
                return Ok(v);
            }
            let stopped = self.qemu_exited();
            if ended.is_some() || stopped || Instant::now() >= deadline {
                let console = crate::process::log_tail(&self.console_log(), 40);
                match ended {
                    Some(code) => bail!(
                        "the guest script ended (exit {code}) with no {what}\n\
                         --- script output ---\n{output}\n--- console (last lines) ---\n{console}"
                    ),
                    None if stopped => bail!(
                        "the guest stopped before its script printed {what}\n\
                         --- script output ---\n{output}\n--- console (last lines) ---\n{console}"
                    ),
                    None => bail!(
                        "no {what} within {timeout:?}\n\
                         --- script output ---\n{output}\n--- console (last lines) ---\n{console}"
                    ),
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The instruction counts of the spans the guest's programs marked so
    /// far, in the order they ended (see [`insns`]).
    ///
    /// # Errors
    /// The plugin wrote a line that is not a span. A guest started without
    /// [`GuestOptions::count_instructions`] has none: an empty list.
    pub fn instruction_spans(&self) -> Result<Vec<insns::Span>> {
        insns::read_spans(&self.run_dir.join(insns::SPANS_FILE))
    }

    /// Whether QEMU has exited (a zombie not yet waited for counts), seen
    /// through `/proc` so that `&self` will do.
    fn qemu_exited(&self) -> bool {
        match fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// Waits for the guest to power off.
    ///
    /// # Errors
    /// When it runs past its timeout (it is killed; the error holds the console).
    pub fn wait(self) -> Result<GuestOutcome> {
        self.wait_echoing(false)
    }

    /// Waits like [`Self::wait`], echoing the script's output to stderr as it comes.
    ///
    /// # Errors
    /// As [`Self::wait`].
    pub fn wait_echoing(mut self, echo: bool) -> Result<GuestOutcome> {
        let output_path = self.run_dir.join("output.log");
        let mut echoed = 0u64;
        let mut script_started_after = None;
        let status = loop {
            if (echo || script_started_after.is_none())
                && let Some(text) = read_from(&output_path, echoed)
            {
                if script_started_after.is_none() && text.contains(START_MARKER) {
                    script_started_after = Some(self.started.elapsed().as_secs_f64());
                }
                if echo && let Some(end) = text.rfind('\n') {
                    eprint!("{}", clean_output(&text[..=end]).0);
                    echoed += end as u64 + 1;
                }
            }
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if self.started.elapsed() > self.timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let console = fs::read_to_string(self.run_dir.join("console.log")).unwrap_or_default();
                let output = self.output_so_far();
                bail!(
                    "testbed guest timed out after {:?}\n--- script output ---\n{output}\n--- console ---\n{console}",
                    self.timeout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let raw = fs::read_to_string(&output_path).unwrap_or_default();
        let console = fs::read_to_string(self.run_dir.join("console.log")).unwrap_or_default();
        let (output, exit_code) = clean_output(&raw);
        if echo {
            let tail = &raw[usize::try_from(echoed).unwrap_or(0).min(raw.len())..];
            eprint!("{}", clean_output(tail).0);
        }
        let Some(exit_code) = exit_code else {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            bail!(
                "testbed guest ended ({status}) without reporting the script's exit code\n\
                 --- qemu ---\n{stderr}\n--- script output ---\n{output}\n--- console ---\n{console}"
            );
        };
        Ok(GuestOutcome {
            exit_code,
            output,
            console,
            script_started_after,
        })
    }
}

/// Strips carriage returns and the testbed's markers; returns the output
/// and the exit code if the guest reported one.
fn clean_output(raw: &str) -> (String, Option<i32>) {
    let mut output = String::new();
    let mut exit_code = None;
    for line in raw.replace('\r', "").split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if bare == START_MARKER {
            continue;
        }
        if let Some(code) = bare.strip_prefix(EXIT_MARKER) {
            exit_code = code.trim().parse().ok();
            continue;
        }
        output.push_str(line);
    }
    (output, exit_code)
}

/// What a file holds from `offset` on, if it can be read.
fn read_from(path: &Path, offset: u64) -> Option<String> {
    let mut file = File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

/// A UDP socket on 127.0.0.1 (a free port) in the network namespace
/// `netns`, or in ours. A socket stays in the namespace it was made in, so
/// a short-lived thread enters the namespace, binds, and hands it back.
fn udp_socket(netns: Option<&str>) -> Result<UdpSocket> {
    let Some(netns) = netns else {
        return Ok(UdpSocket::bind("127.0.0.1:0")?);
    };
    let path = Path::new("/run/netns").join(netns);
    let handle =
        File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<UdpSocket> {
                nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {netns}"))?;
                Ok(UdpSocket::bind("127.0.0.1:0")?)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread binding a socket in {netns} panicked"))?
    })
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    fs::create_dir_all(parent)?;
    let pid = std::process::id();
    for attempt in 0..1000u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!("run-{pid}-{nanos:08x}-{attempt}"));
        if fs::create_dir(&dir).is_ok() {
            return Ok(dir);
        }
    }
    bail!("cannot make a run directory under {}", parent.display())
}

/// How the guest's binaries are built: optimised, linked statically (the
/// guest has no libc of its own), for an explicit target so the host's
/// release builds keep their own artifacts.
pub const GUEST_RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// The target of the guest's binaries; see [`GUEST_RUSTFLAGS`].
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The packages whose binaries and examples run in the guest (on the node,
/// or in the node's pods).
pub const GUEST_PACKAGES: [&str; 3] = ["vfplane-agent", "vfplane-device-plugin", "vfplane-driver"];
/// Packages of which only the binaries go into the guest: the controller
/// runs in a pod of the cluster (the vfplane image holds it).
pub const GUEST_BIN_ONLY_PACKAGES: [&str; 1] = ["vfplane-controller"];

/// The driver's examples vfplane's image carries: the tools a user runs in
/// a pod on a VF. The other examples (the kubelet stand-in, benchmarks, the
/// isolation probe, the kernel-path comparison) are the tests' own and go
/// to the testbed only.
pub const IMAGE_EXAMPLES: [&str; 4] = ["pktgen", "rxcount", "echo", "hybrid"];

/// The guest's binaries, statically linked.
#[derive(Debug, Clone, Default)]
pub struct GuestBinaries {
    /// What vfplane ships: the binaries of [`GUEST_PACKAGES`] and
    /// [`GUEST_BIN_ONLY_PACKAGES`], built without any test feature, and
    /// [`IMAGE_EXAMPLES`].
    pub product: Vec<PathBuf>,
    /// The examples only the tests run (some built with the device
    /// plugin's `kubelet-standin` feature).
    pub tests_only: Vec<PathBuf>,
}

/// Builds [`GuestBinaries`] for the guest in two cargo invocations over the
/// same packages (so that their dependencies unify the same way and are
/// built once): the product without test features, then the tests' own
/// examples with the `kubelet-standin` feature, which changes only the
/// device plugin's library and leaves the product's binaries as they are.
fn build_guest_binaries(workspace: &Path) -> Result<GuestBinaries> {
    let mut product_args = vec!["--bins"];
    for example in IMAGE_EXAMPLES {
        product_args.extend(["--example", example]);
    }
    let product = cargo_build_guest(workspace, &product_args)?;
    let tests = cargo_build_guest(
        workspace,
        &[
            "--features",
            "vfplane-device-plugin/kubelet-standin",
            "--examples",
        ],
    )?;
    let tests_only = tests
        .into_iter()
        .filter(|t| {
            t.example
                && !IMAGE_EXAMPLES
                    .iter()
                    .any(|e| t.path.file_name() == Some((*e).as_ref()))
        })
        .map(|t| t.path)
        .collect();
    Ok(GuestBinaries {
        product: product.into_iter().map(|t| t.path).collect(),
        tests_only,
    })
}

/// One executable a cargo build made.
struct BuiltExecutable {
    path: PathBuf,
    example: bool,
}

/// `cargo build --release` of [`GUEST_PACKAGES`] and
/// [`GUEST_BIN_ONLY_PACKAGES`] for the guest with `args` (the targets and
/// features); the executables it made, without examples of the bin-only
/// packages, sorted.
fn cargo_build_guest(workspace: &Path, args: &[&str]) -> Result<Vec<BuiltExecutable>> {
    let packages: Vec<&str> = GUEST_PACKAGES
        .iter()
        .chain(&GUEST_BIN_ONLY_PACKAGES)
        .copied()
        .collect();
    cargo_build_release(workspace, &packages, args)
}

/// The binaries of `packages` (`--bins`), built as the guest's are (static,
/// release): they run on the host as well. Used for host-side tools such
/// as the scale bench's controller and fleet.
///
/// # Errors
/// cargo failing.
pub fn build_release_bins(workspace: &Path, packages: &[&str]) -> Result<Vec<PathBuf>> {
    Ok(cargo_build_release(workspace, packages, &["--bins"])?
        .into_iter()
        .filter(|b| !b.example)
        .map(|b| b.path)
        .collect())
}

fn cargo_build_release(workspace: &Path, packages: &[&str], args: &[&str]) -> Result<Vec<BuiltExecutable>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    // Build scripts (ring's, for one) ask cargo to rerun when variables like
    // CARGO_PKG_NAME change, and cargo compares its own environment: the one
    // inherited from whoever calls us (xtask, or a test binary of another
    // package) would rebuild them on every change of caller.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_BIN_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let out = command
        .current_dir(workspace)
        .env("RUSTFLAGS", GUEST_RUSTFLAGS)
        .args(["build", "--release", "--target", GUEST_TARGET])
        .args(packages.iter().flat_map(|p| ["-p", p]))
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!(
            "cargo build of {} ({}) failed",
            packages.join(", "),
            args.join(" ")
        );
    }
    let mut built = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(exe) = message["executable"].as_str() else {
            continue;
        };
        let example = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "example"));
        let package = message["package_id"].as_str().unwrap_or_default();
        let bin_only = GUEST_BIN_ONLY_PACKAGES
            .iter()
            .any(|p| package.contains(&format!("/{p}#")) || package.contains(&format!("#{p}@")));
        if example && bin_only {
            continue;
        }
        built.push(BuiltExecutable {
            path: PathBuf::from(exe),
            example,
        });
    }
    built.sort_by(|a, b| a.path.cmp(&b.path));
    built.dedup_by(|a, b| a.path == b.path);
    Ok(built)
}

/// Programs from the host's Debian packages that the guest runs, and where.
const GUEST_HOST_PROGRAMS: [(&str, &str); 2] = [("runc", "usr/bin/runc"), ("nft", "usr/sbin/nft")];

/// The part of the initramfs that changes only with the kernel or the init:
/// busybox, modules, runc and nft with their libraries, /init.
fn build_base_initrd(kernel: &GuestKernel, path: &Path) -> Result<()> {
    let mut archive = CpioArchive::new();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "etc/vfplane",
        "lib",
        "lib/modules",
    ] {
        archive.dir(dir, 0o755);
    }
    for dir in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "var",
        "var/run",
        "lib64",
        "lib/x86_64-linux-gnu",
    ] {
        archive.dir(dir, 0o755);
    }
    archive.dir("lib/modules/vfplane", 0o755);
    archive.char_device("dev/console", 0o600, 5, 1);
    archive.char_device("dev/null", 0o666, 1, 3);
    archive.file(
        "bin/busybox",
        0o755,
        &fs::read("/bin/busybox").context("reading /bin/busybox")?,
    );
    archive.symlink("bin/sh", "busybox");
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes());
    archive.file("etc/vfplane/stage.sh", 0o644, STAGE_SCRIPT.as_bytes());
    archive.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n");
    archive.file("etc/group", 0o644, b"root:x:0:\n");
    let names = |list: &[PathBuf], file: &str, archive: &mut CpioArchive| -> Result<()> {
        let mut text = String::new();
        for module in list {
            let name = module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            archive.file(&format!("lib/modules/vfplane/{name}"), 0o644, &fs::read(module)?);
            text.push_str(&name);
            text.push('\n');
        }
        archive.file(file, 0o644, text.as_bytes());
        Ok(())
    };
    names(&kernel.boot_modules, "etc/vfplane/boot-modules", &mut archive)?;
    names(
        &kernel.optional_modules,
        "etc/vfplane/optional-modules",
        &mut archive,
    )?;
    names(&kernel.node_modules, "etc/vfplane/node-modules", &mut archive)?;
    names(&kernel.root_modules, "etc/vfplane/root-modules", &mut archive)?;
    // Host programs the guest runs, with the shared libraries `ldd` names:
    // runc for containers, nft for kube-proxy's nftables mode.
    let mut libraries = std::collections::BTreeSet::new();
    for (program, guest_path) in GUEST_HOST_PROGRAMS {
        let host_path = which(program)
            .with_context(|| format!("{program} (testbed/install-host-deps.sh installs it)"))?;
        archive.parents(guest_path);
        archive.file(guest_path, 0o755, &fs::read(&host_path)?);
        libraries.extend(shared_libraries(&host_path)?);
    }
    for lib in libraries {
        let guest = lib.to_string_lossy().trim_start_matches('/').to_owned();
        archive.parents(&guest);
        archive.file(&guest, 0o755, &fs::read(&lib)?);
    }
    let bytes = archive.finish();
    if fs::read(path).ok().as_deref() != Some(bytes.as_slice()) {
        fs::write(path, bytes)?;
    }
    Ok(())
}

fn which(name: &str) -> Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
    {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not installed")
}

/// The shared libraries `ldd` names for a binary (the loader included).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Picks KVM only when a probe guest really reached its init under KVM on
/// this machine (the result is cached); TCG otherwise.
/// `VFPLANE_TESTBED_ACCEL=tcg|kvm` overrides the probe.
fn choose_accel(dir: &Path, kernel: &GuestKernel, base_initrd: &Path) -> Result<Accel> {
    match std::env::var("VFPLANE_TESTBED_ACCEL").as_deref() {
        Ok("tcg") => return Ok(Accel::Tcg),
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok(other) if !other.is_empty() => bail!("VFPLANE_TESTBED_ACCEL must be tcg or kvm, not {other:?}"),
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return Ok(Accel::Tcg);
    }
    let cached = dir.join("kvm-probe");
    if let Ok(text) = fs::read_to_string(&cached) {
        return Ok(if text.trim() == "kvm" {
            Accel::Kvm
        } else {
            Accel::Tcg
        });
    }
    let probe = Testbed {
        workspace: workspace_root(),
        dir: dir.to_path_buf(),
        kernel: kernel.clone(),
        base_initrd: base_initrd.to_path_buf(),
        binaries: GuestBinaries::default(),
        accel: Accel::Kvm,
        node_rootfs: std::sync::OnceLock::new(),
    };
    let options = GuestOptions {
        timeout: Duration::from_secs(60),
        ..GuestOptions::default()
    };
    let works = probe
        .run(
            "cat /sys/bus/pci/devices/0000:00:02.0/sriov_totalvfs",
            &options,
            false,
        )
        .map(|outcome| outcome.exit_code == 0 && outcome.output.trim() == "7")
        .unwrap_or(false);
    let accel = if works { Accel::Kvm } else { Accel::Tcg };
    eprintln!(
        "testbed: KVM probe {}; using {accel:?}",
        if works { "ran a guest" } else { "failed" }
    );
    fs::write(&cached, if works { "kvm\n" } else { "tcg\n" })?;
    Ok(accel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cleaned_of_markers_and_carriage_returns() {
        let raw = "VFPLANE-TESTBED-START\r\nhello\r\n{\"a\":1}\r\nVFPLANE-TESTBED-EXIT 3\r\n";
        let (output, code) = clean_output(raw);
        assert_eq!(output, "hello\n{\"a\":1}\n");
        assert_eq!(code, Some(3));
        let (_, code) = clean_output("VFPLANE-TESTBED-START\nhalf");
        assert_eq!(code, None);
    }

    #[test]
    fn json_lines_skip_text() {
        let outcome = GuestOutcome {
            exit_code: 0,
            output: "text\n{\"x\": 2}\n{broken\n[1]\n".to_owned(),
            console: String::new(),
            script_started_after: None,
        };
        assert_eq!(
            outcome.json_lines(),
            [serde_json::json!({"x": 2}), serde_json::json!([1])]
        );
    }
}
