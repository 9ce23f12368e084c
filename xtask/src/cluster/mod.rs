//! A real one-node Kubernetes cluster whose node is the testbed guest.
//!
//! The control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler) runs on the host; the node (containerd, kubelet, the
//! CNI bridge) runs in the emulated SR-IOV guest. Everything lives in a
//! network namespace made for the run: the host side of the guest's
//! management NIC is `10.254.0.1`, the node is `10.254.0.2`, pods are
//! `10.244.0.0/24` and Services `10.96.0.0/16`, both routed to the node.
//! Clients (kubectl, helm, tests) run inside the namespace too
//! ([`Cluster::kubectl`], [`Cluster::command`]). Dropping the [`Cluster`]
//! stops the guest and every process, and deletes the namespace.
//!
//! Images come from no registry: [`images`] builds them as OCI archives and
//! the node imports them into containerd at boot.

pub mod binaries;
pub mod images;
mod netns;
pub mod pki;

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::process::log_tail;
use crate::testbed::{
    GuestInit, GuestOptions, MAX_GUEST_MEMORY_MIB, MGMT_MAC, RunningGuest, Testbed, Topology,
};
pub use binaries::GoBinaries;
pub use netns::Netns;
use pki::{ClusterPki, PkiNames};

/// The node's name.
pub const NODE_NAME: &str = "vfplane-node";
/// The host (control plane) side of the node's management link.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
/// The node's address.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 2);
/// Pod addresses on the node.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// Service ClusterIPs.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP (first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// The API server's port.
pub const APISERVER_PORT: u16 = 6443;
const TAP: &str = "vfpk0";

const NODE_SCRIPT: &str = include_str!("node.sh");

/// The fewest vCPUs a systemd node gets: CPU 0 reserved for the system
/// (`reservedSystemCPUs`), one for vfplane's pods and one exclusive CPU for a
/// Guaranteed pod.
pub const SYSTEMD_MIN_CPUS: u32 = 3;

/// How the node is built and configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NodeProfile {
    /// A node as production runs it: Debian with systemd as PID 1,
    /// containerd and the kubelet as systemd units, the systemd cgroup
    /// driver, the static CPU manager (CPU 0 reserved), the Topology
    /// Manager (`single-numa-node`), the Static memory manager and 2 MiB
    /// hugepages. The default: what kubeadm and nearly every distribution
    /// run.
    #[default]
    Systemd,
    /// busybox as init, containerd and the kubelet kept alive by shell
    /// loops, the cgroupfs driver, no CPU, memory or topology manager.
    Minimal,
}

impl NodeProfile {
    /// How the guest boots for this profile.
    pub fn init(self) -> GuestInit {
        match self {
            Self::Systemd => GuestInit::Systemd,
            Self::Minimal => GuestInit::Busybox,
        }
    }

    /// The profile's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Systemd => "systemd",
            Self::Minimal => "minimal",
        }
    }
}

/// What kind of cluster to start.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// How the node is built and configured.
    pub node_profile: NodeProfile,
    /// The guest: VFs at boot, memory, CPUs, NUMA topology. The cluster
    /// sets the namespace, the management NIC and the root itself, and
    /// raises memory to the testbed's most.
    pub guest: GuestOptions,
    /// Shell run in the node after kubelet starts (e.g. starting vfplane's
    /// node binaries as plain processes).
    pub node_extra: Option<String>,
}

impl ClusterOptions {
    /// The node a poll-mode-driver user runs, as the demo and the systemd
    /// cluster test boot it: the systemd profile on two NUMA nodes with a
    /// PF on each ([`Topology::TwoNumaNodes`]: 0000:00:02.0 of no NUMA node,
    /// 0000:21:00.0 on node 1) and five CPUs. The static CPU manager
    /// reserves CPU 0; node 1 (CPUs 3-4) can hand both its CPUs whole to one
    /// Guaranteed pod while node 0 keeps CPUs for vfplane's own pods and for
    /// a pod that cannot be aligned.
    pub fn two_numa_systemd() -> Self {
        Self {
            node_profile: NodeProfile::Systemd,
            guest: GuestOptions {
                topology: Topology::TwoNumaNodes,
                cpus: 5,
                ..GuestOptions::default()
            },
            node_extra: None,
        }
    }
}

/// One host process of the control plane, killed on drop.
#[derive(Debug)]
struct Service {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `program` inside `netns`, its output in `<dir>/<name>.log`.
    fn spawn(netns: &Netns, dir: &Path, name: &'static str, program: &Path, args: &[String]) -> Result<Self> {
        Self::spawn_with(netns, dir, name, program, args, &[])
    }

    /// [`Service::spawn`] with environment variables.
    fn spawn_with(
        netns: &Netns,
        dir: &Path,
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log)?;
        let child = netns
            .command(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { name, child, log })
    }
}

/// Flags kube-controller-manager and kube-scheduler share: one kubeconfig
/// for everything, secure port on loopback, no leader election (one replica).
fn component_flags(kubeconfig: &Path) -> Vec<String> {
    let config = kubeconfig.display();
    vec![
        format!("--kubeconfig={config}"),
        format!("--authentication-kubeconfig={config}"),
        format!("--authorization-kubeconfig={config}"),
        "--bind-address=127.0.0.1".into(),
        "--leader-elect=false".into(),
        "--v=1".into(),
    ]
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running cluster. Field order is drop order: guest, services, namespace.
#[derive(Debug)]
pub struct Cluster {
    guest: RunningGuest,
    /// What the node guest was started with (its files included), for a
    /// reboot.
    node_options: GuestOptions,
    services: Vec<Service>,
    netns: Netns,
    dir: PathBuf,
    kubeconfig: PathBuf,
    binaries: GoBinaries,
    /// Seconds each start-up step took, in order.
    pub timings: Vec<(String, f64)>,
}

/// Fails naming the first control plane process that has exited, with
/// the last lines of its log.
fn check_services(services: &mut [Service], step: &str) -> Result<()> {
    for service in services {
        if let Some(status) = service.child.try_wait()? {
            bail!(
                "{step}: {} exited ({status}); last lines of its log:\n{}",
                service.name,
                log_tail(&service.log, 20)
            );
        }
    }
    Ok(())
}

impl Cluster {
    /// Builds or reuses the Go binaries, starts the control plane, boots
    /// the node and waits until it is `Ready`.
    ///
    /// # Errors
    /// A step that fails or times out: the error names the step and holds
    /// the last log lines of the component that failed. Everything started
    /// so far is stopped.
    pub fn start(testbed: &Testbed, options: ClusterOptions) -> Result<Self> {
        let begun = Instant::now();
        let mut timings = Vec::new();
        let mut mark = |name: &str, since: &mut Instant| {
            timings.push((name.to_owned(), since.elapsed().as_secs_f64()));
            eprintln!("cluster: {name} ({:.1} s)", since.elapsed().as_secs_f64());
            *since = Instant::now();
        };
        let mut step = Instant::now();
        let binaries = binaries::ensure(testbed.workspace())?;
        mark("Go binaries", &mut step);

        let dir = run_dir(testbed.workspace())?;
        let names = PkiNames {
            node_name: NODE_NAME,
            node_ip: IpAddr::V4(NODE_IP),
            apiserver_ips: &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(HOST_IP),
                IpAddr::V4(KUBERNETES_SERVICE_IP),
            ],
        };
        let mut cluster = ControlPlane::start(&binaries, &dir, &names, |netns| {
            netns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            netns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
            netns.ip(&["link", "set", TAP, "up"])
        })?;
        let pki = cluster.pki.clone();
        let kubeconfig = cluster.kubeconfig.clone();
        let local_api = format!("https://127.0.0.1:{APISERVER_PORT}");
        let path = |p: &Path| p.display().to_string();
        let cluster_api = format!("https://{HOST_IP}:{APISERVER_PORT}");
        let component_config = |name: &str, user: &str, cert: &pki::CertFiles| -> Result<PathBuf> {
            let file = dir.join(format!("{name}.kubeconfig"));
            fs::write(&file, pki::kubeconfig(&local_api, &pki.ca.cert, user, cert)?)?;
            Ok(file)
        };
        let kcm_config = component_config(
            "controller-manager",
            "system:kube-controller-manager",
            &pki.controller_manager,
        )?;
        let scheduler_config = component_config("scheduler", "system:kube-scheduler", &pki.scheduler)?;
        mark("control plane API ready", &mut step);

        let mut start = |name: &'static str, program: PathBuf, args: Vec<String>| -> Result<()> {
            let service = Service::spawn(&cluster.netns, &dir, name, &program, &args)?;
            cluster.services.push(service);
            Ok(())
        };
        start(
            "kube-controller-manager",
            binaries.kube("kube-controller-manager"),
            [
                component_flags(&kcm_config),
                vec![
                    format!(
                        "--service-account-private-key-file={}",
                        path(&pki.service_account_key)
                    ),
                    format!("--root-ca-file={}", path(&pki.ca.cert)),
                    format!("--cluster-signing-cert-file={}", path(&pki.ca.cert)),
                    format!("--cluster-signing-key-file={}", path(&pki.ca.key)),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    "--use-service-account-credentials=true".into(),
                ],
            ]
            .concat(),
        )?;
        start(
            "kube-scheduler",
            binaries.kube("kube-scheduler"),
            component_flags(&scheduler_config),
        )?;

        // The node: binaries, configuration, credentials and images.
        let image_dir = dir.join("images");
        let built = images::build_node_images(testbed, &image_dir)?;
        mark("images built", &mut step);
        let mut files = Vec::new();
        let mut add_file = |guest: &str, host: &Path, mode: u32| -> Result<()> {
            let bytes = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            files.push((guest.to_owned(), bytes, mode));
            Ok(())
        };
        for name in ["kubelet", "kube-proxy"] {
            add_file(&format!("usr/local/bin/{name}"), &binaries.kube(name), 0o755)?;
        }
        for name in ["containerd", "containerd-shim-runc-v2", "ctr"] {
            add_file(
                &format!("usr/local/bin/{name}"),
                &binaries.containerd.join(name),
                0o755,
            )?;
        }
        for name in ["bridge", "host-local", "loopback"] {
            add_file(&format!("opt/cni/bin/{name}"), &binaries.cni.join(name), 0o755)?;
        }
        add_file("var/lib/kubelet/pki/ca.crt", &pki.ca.cert, 0o644)?;
        add_file(
            "var/lib/kubelet/pki/kubelet.crt",
            &pki.kubelet_serving.cert,
            0o644,
        )?;
        add_file("var/lib/kubelet/pki/kubelet.key", &pki.kubelet_serving.key, 0o600)?;
        for image in &built {
            add_file(
                &format!("var/lib/testbed/images/{}", image.file_name),
                &image.archive,
                0o644,
            )?;
        }
        let kubelet_kubeconfig = pki::kubeconfig(
            &cluster_api,
            &pki.ca.cert,
            &format!("system:node:{NODE_NAME}"),
            &pki.kubelet_client,
        )?;
        let kube_proxy_kubeconfig =
            pki::kubeconfig(&cluster_api, &pki.ca.cert, "system:kube-proxy", &pki.kube_proxy)?;
        let text_files = [
            ("var/lib/kubelet/kubeconfig", kubelet_kubeconfig),
            ("var/lib/kube-proxy/kubeconfig", kube_proxy_kubeconfig),
            (
                "var/lib/kubelet/config.yaml",
                kubelet_config(options.node_profile),
            ),
            (
                "etc/containerd/config.toml",
                containerd_config(options.node_profile),
            ),
            ("etc/cni/net.d/10-vfplane.conflist", cni_config()),
            (
                "etc/vfplane/node.env",
                format!(
                    "NODE_NAME={NODE_NAME}\nNODE_IP={NODE_IP}\nGATEWAY_IP={HOST_IP}\nMGMT_MAC={MGMT_MAC}\n\
                     POD_CIDR={POD_CIDR}\n"
                ),
            ),
        ];
        for (guest, text) in text_files {
            files.push((guest.to_owned(), text.into_bytes(), 0o644));
        }
        if let Some(extra) = &options.node_extra {
            files.push((
                "etc/vfplane/node-extra.sh".to_owned(),
                extra.clone().into_bytes(),
                0o755,
            ));
        }
        let mut guest_options = options.guest.clone();
        guest_options.memory_mib = guest_options.memory_mib.max(MAX_GUEST_MEMORY_MIB);
        if options.node_profile == NodeProfile::Systemd {
            // The static CPU manager reserves CPU 0: with two vCPUs, one
            // CPU is left for vfplane's own pods and a Guaranteed pod with
            // an integer CPU, which do not fit together.
            guest_options.cpus = guest_options.cpus.max(SYSTEMD_MIN_CPUS);
        }
        guest_options.netns = Some(cluster.netns.name().to_owned());
        guest_options.tap = Some(TAP.to_owned());
        guest_options.init = options.node_profile.init();
        // The systemd node has a disk and loads its modules itself.
        guest_options.root_on_tmpfs = options.node_profile == NodeProfile::Minimal;
        guest_options.node_modules = options.node_profile == NodeProfile::Minimal;
        guest_options.files.extend(files);
        let guest = testbed.start(NODE_SCRIPT, &guest_options)?;
        // Pods and Services are reached through the node.
        for cidr in [POD_CIDR, SERVICE_CIDR] {
            cluster
                .netns
                .ip(&["route", "add", cidr, "via", &NODE_IP.to_string()])?;
        }
        let mut cluster = Cluster {
            guest,
            node_options: guest_options,
            services: std::mem::take(&mut cluster.services),
            netns: cluster.into_netns(),
            dir,
            kubeconfig,
            binaries,
            timings,
        };
        cluster.wait_node_ready(Duration::from_secs(600))?;
        let total = begun.elapsed().as_secs_f64();
        cluster
            .timings
            .push(("node Ready".to_owned(), step.elapsed().as_secs_f64()));
        cluster.timings.push(("total".to_owned(), total));
        eprintln!(
            "cluster: node {NODE_NAME} Ready ({:.1} s; {total:.1} s from the command)",
            step.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    /// Reboots the node: the guest is powered off and a new one boots
    /// with the same files and options, as `change` leaves them. Its root
    /// is a tmpfs, so nothing of the node survives but what the API server
    /// holds: a node whose disks were wiped, or a diskless one. Returns
    /// once the kubelet of the new boot (a new boot ID) reports Ready.
    ///
    /// # Errors
    /// The new guest not starting or its node not Ready in `timeout`.
    pub fn reboot_node(
        &mut self,
        testbed: &Testbed,
        change: impl FnOnce(&mut GuestOptions),
        timeout: Duration,
    ) -> Result<()> {
        let boot_id = "-o=jsonpath={.status.nodeInfo.bootID}";
        let before = self.kubectl_output(&["get", "node", NODE_NAME, boot_id])?;
        change(&mut self.node_options);
        self.guest.power_off();
        self.guest = testbed.start(NODE_SCRIPT, &self.node_options)?;
        self.wait_until("the node's new boot", timeout, |c| {
            Ok(c.kubectl_output(&["get", "node", NODE_NAME, boot_id])
                .is_ok_and(|now| !now.trim().is_empty() && now.trim() != before.trim()))
        })?;
        self.wait_node_ready(timeout)
    }

    fn wait_node_ready(&mut self, timeout: Duration) -> Result<()> {
        let begun = Instant::now();
        let jsonpath = "-o=jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        loop {
            let out = self
                .kubectl()
                .args(["get", "node", NODE_NAME, jsonpath])
                .output()?;
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "True" {
                return Ok(());
            }
            if !self.guest.is_running() {
                bail!(
                    "node {NODE_NAME}: the guest stopped before the node was Ready\n{}",
                    self.node_logs()
                );
            }
            self.check_services("node Ready")?;
            if begun.elapsed() > timeout {
                bail!(
                    "node {NODE_NAME} not Ready after {timeout:?}\n{}",
                    self.node_logs()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Resident memory (MiB) of each control plane process and of QEMU
    /// (the whole guest as the host sees it), from `/proc/<pid>/status`.
    pub fn host_memory_mib(&self) -> Vec<(String, u64)> {
        let rss = |pid: u32| -> u64 {
            fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                })
                .unwrap_or(0)
                / 1024
        };
        let mut out: Vec<(String, u64)> = self
            .services
            .iter()
            .map(|s| (s.name.to_owned(), rss(s.child.id())))
            .collect();
        out.push(("qemu (guest)".to_owned(), rss(self.guest.pid())));
        out
    }

    /// The node's logs, for errors: script output, kubelet, containerd, console.
    pub fn node_logs(&self) -> String {
        format!(
            "--- node script ---\n{}\n--- kubelet (last 30 lines) ---\n{}\n--- containerd (last 15 lines) ---\n{}\n--- console (last 10 lines) ---\n{}",
            log_tail(&self.guest.run_dir().join("output.log"), 20),
            log_tail(&self.guest.serial_log(2), 30),
            log_tail(&self.guest.serial_log(3), 15),
            log_tail(&self.guest.console_log(), 10),
        )
    }

    fn check_services(&mut self, step: &str) -> Result<()> {
        check_services(&mut self.services, step)
    }

    /// `kubectl` with the admin kubeconfig, inside the cluster's namespace.
    pub fn kubectl(&self) -> Command {
        let mut command = self.netns.command(self.binaries.kube("kubectl"));
        command.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        command
    }

    /// Any program inside the cluster's namespace, with `KUBECONFIG` set.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut command = self.netns.command(program);
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Runs kubectl and returns stdout; fails with its stderr.
    ///
    /// # Errors
    /// kubectl's failure, with its message.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        kubectl_result(args, &self.kubectl().args(args).output()?)
    }

    /// Runs kubectl with `-o json` and parses the result.
    ///
    /// # Errors
    /// kubectl's failure or unparsable output.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.push("-o=json");
        let text = self.kubectl_output(&all)?;
        serde_json::from_str(&text).with_context(|| format!("parsing kubectl {} output", args.join(" ")))
    }

    /// Runs kubectl with `stdin` as its input (e.g. `apply -f -`).
    ///
    /// # Errors
    /// kubectl's failure, with its message.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        kubectl_with_stdin(self.kubectl(), args, stdin)
    }

    /// The network namespace everything runs in.
    pub fn netns_name(&self) -> &str {
        self.netns.name()
    }

    /// Runs `script` with `sh -c` as root on the node, through a privileged
    /// pod (`kube-system/node-shell`, host PID and network namespaces, so
    /// `/sys` and `/proc` are the node's) that is created on first use, the
    /// way `kubectl debug node/...` reaches a node. Returns stdout.
    ///
    /// # Errors
    /// When the pod cannot be started or the script fails.
    pub fn node_exec(&mut self, script: &str) -> Result<String> {
        let exists = self
            .kubectl_output(&[
                "get",
                "pod",
                "-n",
                "kube-system",
                "node-shell",
                "-o=jsonpath={.status.phase}",
            ])
            .is_ok_and(|phase| phase == "Running");
        if !exists {
            self.kubectl_stdin(&["apply", "-f", "-"], &node_shell_pod())?;
            self.wait_until("kube-system/node-shell Running", Duration::from_secs(120), |c| {
                Ok(c.kubectl_output(&[
                    "get",
                    "pod",
                    "-n",
                    "kube-system",
                    "node-shell",
                    "-o=jsonpath={.status.phase}",
                ])
                .is_ok_and(|phase| phase == "Running"))
            })?;
        }
        self.kubectl_output(&[
            "exec",
            "-n",
            "kube-system",
            "node-shell",
            "--",
            "sh",
            "-c",
            script,
        ])
        .with_context(|| format!("on the node: {script}"))
    }

    /// The guest (PF links, logs).
    pub fn guest(&self) -> &RunningGuest {
        &self.guest
    }

    /// The run directory (certificates, kubeconfigs, control plane logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The admin kubeconfig (valid inside the namespace).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The Go binaries the cluster runs.
    pub fn binaries(&self) -> &GoBinaries {
        &self.binaries
    }

    /// Polls `check` every second until it returns true.
    ///
    /// # Errors
    /// `what` with the node's logs when `timeout` passes, or the first
    /// error `check` returns, or a control plane process that exited.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let begun = Instant::now();
        loop {
            if check(self)? {
                return Ok(());
            }
            self.check_services(what)?;
            if !self.guest.is_running() {
                bail!("{what}: the node's guest stopped\n{}", self.node_logs());
            }
            if begun.elapsed() > timeout {
                bail!("{what}: not done after {timeout:?}\n{}", self.node_logs());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// etcd and kube-apiserver in a network namespace of their own: the
/// first half of [`Cluster::start`], and the whole control plane of the
/// scale bench, which has no node. Dropping it stops both and deletes the
/// namespace.
#[derive(Debug)]
pub struct ControlPlane {
    services: Vec<Service>,
    netns: Netns,
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    pki: ClusterPki,
}

impl ControlPlane {
    /// Generates the certificates for `names` into `<dir>/pki`, creates the
    /// namespace, runs `prepare` on it, starts etcd and kube-apiserver in
    /// it and waits until the API server is ready.
    ///
    /// # Errors
    /// A step that fails or times out, naming it; what was started is stopped.
    pub fn start(
        binaries: &GoBinaries,
        dir: &Path,
        names: &PkiNames<'_>,
        prepare: impl FnOnce(&Netns) -> Result<()>,
    ) -> Result<Self> {
        let pki =
            ClusterPki::generate(&dir.join("pki"), names).context("generating the cluster's certificates")?;
        let local_api = format!("https://127.0.0.1:{APISERVER_PORT}");
        let kubeconfig = dir.join("admin.kubeconfig");
        fs::write(
            &kubeconfig,
            pki::kubeconfig(&local_api, &pki.ca.cert, "admin", &pki.admin)?,
        )?;
        let netns = Netns::create()?;
        prepare(&netns)?;

        let mut services = Vec::new();
        let mut start = |name: &'static str, program: PathBuf, args: Vec<String>| -> Result<()> {
            services.push(Service::spawn(&netns, dir, name, &program, &args)?);
            Ok(())
        };
        let path = |p: &Path| p.display().to_string();
        let etcd_dir = dir.join("etcd");
        start(
            "etcd",
            binaries.etcd.join("etcd"),
            vec![
                "--name=default".into(),
                format!("--data-dir={}", path(&etcd_dir)),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=default=http://127.0.0.1:2380".into(),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        start(
            "kube-apiserver",
            binaries.kube("kube-apiserver"),
            vec![
                "--etcd-servers=http://127.0.0.1:2379".into(),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={APISERVER_PORT}"),
                format!("--advertise-address={HOST_IP}"),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--client-ca-file={}", path(&pki.ca.cert)),
                format!("--tls-cert-file={}", path(&pki.apiserver.cert)),
                format!("--tls-private-key-file={}", path(&pki.apiserver.key)),
                format!(
                    "--kubelet-client-certificate={}",
                    path(&pki.apiserver_kubelet_client.cert)
                ),
                format!("--kubelet-client-key={}", path(&pki.apiserver_kubelet_client.key)),
                format!("--kubelet-certificate-authority={}", path(&pki.ca.cert)),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", path(&pki.service_account_pub)),
                format!(
                    "--service-account-signing-key-file={}",
                    path(&pki.service_account_key)
                ),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--v=1".into(),
            ],
        )?;
        let mut plane = Self {
            services,
            netns,
            dir: dir.to_path_buf(),
            kubeconfig,
            kubectl: binaries.kube("kubectl"),
            pki,
        };
        plane.wait_for(
            "kube-apiserver ready",
            "kube-apiserver",
            Duration::from_secs(120),
            |c| Ok(c.kubectl_ok(&["get", "--raw=/readyz"])),
        )?;
        Ok(plane)
    }

    /// Starts `program` with `args` and `env` inside the namespace as one
    /// more service, its output in `<dir>/<name>.log`; stopped on drop.
    ///
    /// # Errors
    /// When it cannot be started.
    pub fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> Result<u32> {
        let mut service = Service::spawn_with(&self.netns, &self.dir, name, program, args, env)?;
        let pid = service.child.id();
        if let Some(status) = service.child.try_wait()? {
            bail!("{name} exited at once ({status})");
        }
        self.services.push(service);
        Ok(pid)
    }

    /// The process ID of the service named `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.child.id())
    }

    /// Fails naming the first service that has exited, with its log's end.
    ///
    /// # Errors
    /// That service's exit.
    pub fn check(&mut self, step: &str) -> Result<()> {
        check_services(&mut self.services, step)
    }

    /// kubectl as the admin, inside the namespace.
    pub fn kubectl(&self) -> Command {
        let mut command = self.netns.command(&self.kubectl);
        command.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        command
    }

    /// kubectl's stdout, or an error with its stderr.
    ///
    /// # Errors
    /// kubectl failing, with its message.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        kubectl_result(args, &self.kubectl().args(args).stdin(Stdio::null()).output()?)
    }

    /// Runs kubectl with `stdin` as its input (e.g. `apply -f -`).
    ///
    /// # Errors
    /// kubectl failing, with its message.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        kubectl_with_stdin(self.kubectl(), args, stdin)
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The certificates.
    pub fn pki(&self) -> &ClusterPki {
        &self.pki
    }

    /// The admin's kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The run directory (logs, certificates, etcd's data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.netns
            .command(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn wait_for(
        &mut self,
        what: &str,
        component: &str,
        timeout: Duration,
        check: impl Fn(&Self) -> Result<bool>,
    ) -> Result<()> {
        let begun = Instant::now();
        loop {
            if check(self)? {
                return Ok(());
            }
            check_services(&mut self.services, what)?;
            if begun.elapsed() > timeout {
                let log = self.dir.join(format!("{component}.log"));
                bail!(
                    "{what}: not done after {timeout:?}; last lines of {component}'s log:\n{}",
                    log_tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn into_netns(self) -> Netns {
        self.netns
    }
}

/// Runs `kubectl` (a command with its kubeconfig) with `args` and `stdin`
/// as its input; its stdout, or an error with its stderr.
fn kubectl_with_stdin(mut kubectl: Command, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = kubectl
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes())?;
    }
    kubectl_result(args, &child.wait_with_output()?)
}

/// kubectl's stdout, or an error with its stderr.
fn kubectl_result(args: &[&str], out: &std::process::Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The privileged pod [`Cluster::node_exec`] runs scripts in.
fn node_shell_pod() -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: node-shell
  namespace: kube-system
spec:
  nodeName: {NODE_NAME}
  hostPID: true
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  tolerations: [{{operator: Exists}}]
  containers:
    - name: shell
      image: {}
      imagePullPolicy: IfNotPresent
      command: ["sleep", "86400"]
      securityContext:
        privileged: true
"#,
        images::VFPLANE_IMAGE
    )
}

/// `target/cluster/run-<pid>`, emptied first; runs of dead processes are removed.
pub(crate) fn run_dir(workspace: &Path) -> Result<PathBuf> {
    let parent = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("cluster");
    fs::create_dir_all(&parent)?;
    for entry in fs::read_dir(&parent)?.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("run-")
            && pid.parse::<u32>().is_ok()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let dir = parent.join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The memory the systemd node's kubelet keeps for the system beside the
/// hard eviction threshold (64 MiB); the Static memory manager takes their
/// sum off NUMA node 0.
const SYSTEM_RESERVED_MEMORY_MIB: u32 = 192;
/// See [`SYSTEM_RESERVED_MEMORY_MIB`].
const EVICTION_HARD_MEMORY_MIB: u32 = 64;

/// The kubelet's configuration: containerd's socket, x509 and webhook
/// authentication, thresholds that fit the guest, a 2 s cap on container
/// restart backoff, node status computed every 500 ms and posted when it
/// changes. The systemd profile adds what its users run: the systemd
/// cgroup driver, the static CPU manager with CPU 0 reserved for the
/// system, the Topology Manager's `single-numa-node` policy and the Static
/// memory manager; the minimal one keeps cgroupfs and no managers.
fn kubelet_config(profile: NodeProfile) -> String {
    let managers = match profile {
        NodeProfile::Systemd => format!(
            r#"cgroupDriver: systemd
cpuManagerPolicy: static
reservedSystemCPUs: "0"
topologyManagerPolicy: single-numa-node
memoryManagerPolicy: Static
systemReserved:
  memory: {SYSTEM_RESERVED_MEMORY_MIB}Mi
reservedMemory:
  - numaNode: 0
    limits:
      memory: {}Mi
"#,
            SYSTEM_RESERVED_MEMORY_MIB + EVICTION_HARD_MEMORY_MIB
        ),
        NodeProfile::Minimal => "cgroupDriver: cgroupfs\n".to_owned(),
    };
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: /var/lib/kubelet/pki/ca.crt
authorization:
  mode: Webhook
{managers}containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
tlsCertFile: /var/lib/kubelet/pki/kubelet.crt
tlsPrivateKeyFile: /var/lib/kubelet/pki/kubelet.key
failSwapOn: false
resolvConf: /etc/resolv.conf
podCIDR: {POD_CIDR}
maxPods: 32
serializeImagePulls: false
evictionHard:
  memory.available: {EVICTION_HARD_MEMORY_MIB}Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A killed container comes back within 2 s rather than after a backoff of
# up to 5 min: the crash campaign kills vfplane's containers 100 times and
# measures vfplane's recovery, not the kubelet's patience.
crashLoopBackOff:
  maxContainerRestartPeriod: 2s
# A restarted kubelet reports every device resource as 0 until its plugin
# registers again (0.13-0.73 s measured here), and the API server sees the
# count only at the next node status update: every 10 s by default. At 1 s
# the restarts campaign saw a pool short for up to 1.11 s (on a watch of the
# node); at 500 ms the dip fits in issue 16's 1 s. The status is posted
# only when it changed (or every 5 min): an explicit update period would
# otherwise make the report period the same, a post every 500 ms.
nodeStatusUpdateFrequency: 500ms
nodeStatusReportFrequency: 5m
"#
    )
}

/// containerd 2's configuration: CRI with CDI on, runc (Debian's, from the
/// root image on the systemd node, from the initramfs on the minimal one)
/// with the profile's cgroup driver, overlayfs, our pause image pinned, CNI
/// from /opt/cni/bin.
fn containerd_config(profile: NodeProfile) -> String {
    let (runc, systemd_cgroup) = match profile {
        NodeProfile::Systemd => ("/usr/sbin/runc", true),
        NodeProfile::Minimal => ("/usr/bin/runc", false),
    };
    format!(
        r#"version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{}"

[plugins.'io.containerd.cri.v1.runtime']
  enable_cdi = true
  cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  SystemdCgroup = {systemd_cgroup}

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["/opt/cni/bin"]
  conf_dir = "/etc/cni/net.d"

# NRI is on by default; its default validator refuses to create a container
# whose pod names a required plugin that is not registered (vfplane's
# webhook names its plugin for containers the plugin adjusts).
[plugins.'io.containerd.nri.v1.nri'.default_validator]
  enable = true
"#,
        images::PAUSE_IMAGE,
    )
}

/// The pod network: a bridge on the node, addresses from [`POD_CIDR`].
fn cni_config() -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "vfplane-pods",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": "10.244.0.1"}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": "/run/cni-ipam",
            },
        }],
    })
    .to_string()
}
