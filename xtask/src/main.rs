//! `cargo xtask`: the testbed, the demo, and the project's other chores.

mod bench;
mod bench_testbed;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use xtask::testbed::{GuestInit, GuestOptions, Testbed, Topology};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The emulated SR-IOV node.
    Testbed {
        #[command(subcommand)]
        command: TestbedCommand,
    },
    /// A real one-node Kubernetes cluster: control plane on the host, the
    /// testbed guest as its node.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The demo: vfplane installed by Helm on the real cluster, a VfPolicy,
    /// a pod running the driver on its VF, the host counting the frames.
    Demo,
    /// Reliability campaigns on the real cluster (vfplane installed by
    /// Helm): pod churn, SIGKILLs of the agent and the device plugin,
    /// kubelet and containerd restarts, PF link faults, VFs removed under
    /// a pod, a reboot renumbering IOMMU groups, a pod opening other VFIO
    /// groups, VFs in a shared IOMMU group. Prints each one's figures;
    /// fails on a dirty VF, a lost VF, a group opened, a shared VF
    /// advertised or anything left behind.
    Campaign {
        /// Which, in order: churn, churn-dra, crashes, restarts, faults,
        /// vf-removal, reboot, isolation, shared-group. The default is all
        /// but churn-dra: a run that names churn-dra installs vfplane with
        /// DRA on for all its campaigns (CI runs it after crashes, faults,
        /// vf-removal and isolation).
        #[arg(
            value_delimiter = ',',
            default_value = "churn,crashes,restarts,faults,vf-removal,reboot,isolation,shared-group"
        )]
        which: Vec<String>,
        /// The lengths the reliability issue asks for (200 pods, 50 + 50
        /// kills, 20 kubelet restarts); CI runs the short ones.
        #[arg(long)]
        long: bool,
        /// Pods of the churn campaign (overrides --long's).
        #[arg(long)]
        pods: Option<u32>,
        /// Pods of the DRA churn campaign (overrides --long's).
        #[arg(long)]
        dra_pods: Option<u32>,
        /// SIGKILLs of the agent, and as many of the plugin.
        #[arg(long)]
        kills: Option<u32>,
        /// Kubelet restarts.
        #[arg(long)]
        restarts: Option<u32>,
        /// Seed of the random moments (default: the time).
        #[arg(long)]
        seed: Option<u64>,
        /// The node the campaigns run on.
        #[arg(long, value_enum, default_value_t)]
        node_profile: xtask::cluster::NodeProfile,
    },
    /// Builds vfplane's image (the static node and controller binaries,
    /// the driver's examples, busybox) as an OCI archive.
    Image {
        /// Where to write it.
        #[arg(long, default_value = "target/images/vfplane.tar")]
        out: PathBuf,
    },
    /// Writes the chart's CRDs from the Rust types (`--check`: fail if stale).
    Crdgen {
        /// Only compare; fail when the chart's CRDs differ from the types.
        #[arg(long)]
        check: bool,
    },
    /// Lints the Helm chart (`helm lint --strict`) and renders it for every
    /// value set the tests use, into target/helm/<case>.yaml.
    Helm,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Everything CI checks: formatting, clippy, and every test (testbed included).
    Test {
        /// Also run the slow tests (marked #[ignore = "slow: ..."]).
        #[arg(long)]
        slow: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The igbvf driver's instructions per packet in rx_burst and tx_burst
    /// on the device model, counted by callgrind with the model's own work
    /// left out, and ns per packet measured natively beside them.
    Driver {
        /// Batch sizes, one row each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,32,64,256")]
        batches: Vec<usize>,
        /// Packets counted under callgrind per batch size.
        #[arg(long, default_value_t = 8192)]
        packets: usize,
        /// Packets per timed run.
        #[arg(long, default_value_t = 200_000)]
        timed_packets: usize,
        /// Timed runs per batch size; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// TX and RX packets per second of the driver against igbvf +
    /// AF_PACKET on the testbed guest, medians and their ratio.
    TestbedPps {
        /// Frames per run.
        #[arg(long, default_value_t = 20_000)]
        frames: u32,
        /// Runs per path and direction; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Also count the guest instructions per frame of each path, with
        /// QEMU's TCG plugin `vfplane-guest-insns` loaded (which slows the
        /// guest: take rates from a run without it).
        #[arg(long)]
        instructions: bool,
    },
    /// Hybrid polling on the testbed guest: idle CPU, and the round trip
    /// of a frame to a sleeping poller against a busy-polling one.
    Hybrid {
        /// Seconds of no traffic the idle CPU is taken over.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u32,
        /// Frames echoed, one at a time.
        #[arg(long, default_value_t = 50)]
        frames: u32,
        /// Milliseconds between frames.
        #[arg(long, default_value_t = 200)]
        gap_ms: u64,
    },
    /// vfplane's controller and API traffic on fleets of simulated nodes
    /// (the real agent's API code over fake sysfs) against the cluster's
    /// real control plane, without the guest: policy rollout and change
    /// times, requests per client and verb, idle traffic, controller CPU and
    /// memory, etcd and NodeState sizes.
    Scale {
        /// Fleet sizes, each on a fresh control plane.
        #[arg(long, value_delimiter = ',', default_value = "100")]
        nodes: Vec<usize>,
        /// Seconds of the idle phase (nothing changes).
        #[arg(long, default_value_t = 120)]
        idle_seconds: u64,
        /// Seconds a phase may take before the bench fails.
        #[arg(long, default_value_t = 1200)]
        phase_timeout_seconds: u64,
        /// `maxUnavailableNodes` of the last phase, which rolls numVfs
        /// over a VF held on every node.
        #[arg(long, default_value_t = 50)]
        max_unavailable: u32,
    },
    /// What a pool's container profile adds to a container's creation on
    /// the real node: pods applied -> Running, with no VF, with a VF of a
    /// pool without a profile and with one whose profile the runtime
    /// applies, medians side by side.
    ContainerLimits {
        /// The node (its cgroup driver).
        #[arg(long, value_enum, default_value_t)]
        node_profile: xtask::cluster::NodeProfile,
        /// Pods of each kind per phase.
        #[arg(long, default_value_t = 7)]
        pods: u32,
    },
}

#[derive(Debug, Subcommand)]
enum TestbedCommand {
    /// Install, fetch and build everything the testbed needs, then stop.
    Prepare,
    /// Boot the node, run FILE as root inside it, print its output, exit with its code.
    Run {
        /// The shell script to run in the guest.
        #[arg(long)]
        script: PathBuf,
        #[command(flatten)]
        guest: GuestArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Build the cluster's Go binaries from their Go modules (or find them
    /// cached), then stop.
    Build,
    /// Start the cluster, print how to reach it, and keep it until the
    /// command gets SIGINT, SIGTERM or SIGHUP, or --hold seconds have
    /// passed; then stop the guest and the control plane and remove the
    /// network namespace.
    Up {
        #[command(flatten)]
        guest: GuestArgs,
        /// Stop after this many seconds (default: run until interrupted).
        #[arg(long)]
        hold: Option<u64>,
        /// A shell script the node runs once kubelet has started.
        #[arg(long)]
        node_script: Option<PathBuf>,
        /// The node: `systemd` (systemd as init, the systemd cgroup driver,
        /// the kubelet's CPU, memory and topology managers, hugepages) or
        /// `minimal` (busybox as init, cgroupfs, no managers).
        #[arg(long, value_enum, default_value_t)]
        node_profile: xtask::cluster::NodeProfile,
    },
}

#[derive(Debug, clap::Args)]
struct GuestArgs {
    /// VFs to create on every PF before the script runs.
    #[arg(long, default_value_t = 0)]
    vfs: u16,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Two NUMA nodes with a PF on each (0000:00:02.0 and 0000:21:00.0).
    #[arg(long)]
    numa: bool,
    /// Load the kernel VF driver (igbvf) at boot.
    #[arg(long)]
    kernel_vf_driver: bool,
    /// Kill the guest after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// PID 1: `busybox` from the initramfs, or `systemd` on the Debian
    /// root image (the cluster's node chooses its own: see
    /// --node-profile).
    #[arg(long, value_enum, default_value_t)]
    init: GuestInit,
}

impl GuestArgs {
    fn options(&self) -> GuestOptions {
        GuestOptions {
            vfs: self.vfs,
            memory_mib: self.memory,
            cpus: self.cpus,
            topology: if self.numa {
                Topology::TwoNumaNodes
            } else {
                Topology::SinglePf
            },
            kernel_vf_driver: self.kernel_vf_driver,
            timeout: Duration::from_secs(self.timeout),
            init: self.init,
            ..GuestOptions::default()
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let begun = Instant::now();
    match cli.command {
        Command::Testbed {
            command: TestbedCommand::Prepare,
        } => {
            let testbed = Testbed::prepare()?;
            eprintln!(
                "testbed: ready in {:.1} s ({:?}, {} guest binaries, {} of them in vfplane's image)",
                begun.elapsed().as_secs_f64(),
                testbed.accel(),
                testbed.binaries().count(),
                testbed.product_binaries().len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Testbed {
            command: TestbedCommand::Run { script, guest },
        } => {
            let text =
                std::fs::read_to_string(&script).with_context(|| format!("reading {}", script.display()))?;
            run_guest(&text, &guest.options(), begun)
        }
        Command::Demo => run_demo(begun),
        Command::Campaign {
            which,
            long,
            pods,
            dra_pods,
            kills,
            restarts,
            seed,
            node_profile,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs())
            });
            let mut options = if long {
                xtask::campaign::Options::long(seed)
            } else {
                xtask::campaign::Options::short(seed)
            };
            options.pods = pods.unwrap_or(options.pods);
            options.dra_pods = dra_pods.unwrap_or(options.dra_pods);
            options.kills = kills.unwrap_or(options.kills);
            options.kubelet_restarts = restarts.unwrap_or(options.kubelet_restarts);
            options.node_profile = node_profile;
            let testbed = Testbed::prepare()?;
            let which: Vec<&str> = which.iter().map(String::as_str).collect();
            match xtask::campaign::run(&testbed, &options, &which) {
                Ok(report) => {
                    eprintln!(
                        "\n== campaigns (seed {seed}, {:.0} s)\n{}",
                        begun.elapsed().as_secs_f64(),
                        report.text()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!(
                        "\ncampaign FAILED (seed {seed}) after {:.0} s: {error:#}",
                        begun.elapsed().as_secs_f64()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Test { slow } => run_tests(slow, begun),
        Command::Bench {
            command:
                BenchCommand::Driver {
                    batches,
                    packets,
                    timed_packets,
                    runs,
                },
        } => {
            let options = bench::DriverBenchOptions {
                batches,
                packets,
                timed_packets,
                runs,
            };
            let report = bench::driver(&xtask::testbed::workspace_root(), &options)?;
            let table = report.table();
            print!("{table}");
            let saved = xtask::testbed::workspace_root().join("target/bench/driver/table.txt");
            std::fs::write(&saved, &table).with_context(|| format!("writing {}", saved.display()))?;
            eprintln!(
                "bench driver: done in {:.0} s; table in {}",
                begun.elapsed().as_secs_f64(),
                saved.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::TestbedPps {
                    frames,
                    rounds,
                    instructions,
                },
        } => {
            let testbed = Testbed::prepare()?;
            let options = bench_testbed::PpsOptions {
                frames,
                rounds,
                count_instructions: instructions,
            };
            let report = bench_testbed::pps(&testbed, &options)?;
            print!("{}", report.table());
            eprintln!(
                "bench testbed-pps: done in {:.0} s",
                begun.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::Hybrid {
                    idle_seconds,
                    frames,
                    gap_ms,
                },
        } => {
            let testbed = Testbed::prepare()?;
            let options = bench_testbed::HybridOptions {
                idle_seconds,
                frames,
                gap: Duration::from_millis(gap_ms),
            };
            let report = bench_testbed::hybrid(&testbed, &options)?;
            print!("{}", report.table());
            eprintln!("bench hybrid: done in {:.0} s", begun.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command:
                BenchCommand::Scale {
                    nodes,
                    idle_seconds,
                    phase_timeout_seconds,
                    max_unavailable,
                },
        } => {
            let options = xtask::bench_scale::ScaleOptions {
                nodes,
                idle_seconds,
                phase_timeout_seconds,
                max_unavailable,
            };
            let workspace = xtask::testbed::workspace_root();
            // Each size's report is printed as it is done.
            let report = xtask::bench_scale::scale(&workspace, &options)?;
            let saved = workspace.join("target/bench/scale/report.txt");
            if let Some(parent) = saved.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&saved, &report)?;
            eprintln!(
                "bench scale: done in {:.0} s; report in {}",
                begun.elapsed().as_secs_f64(),
                saved.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::ContainerLimits { node_profile, pods },
        } => {
            let testbed = Testbed::prepare()?;
            let options = xtask::bench_limits::LimitsBenchOptions { node_profile, pods };
            let table = xtask::bench_limits::container_limits(&testbed, &options)?;
            print!("{table}");
            eprintln!(
                "bench container-limits: done in {:.0} s",
                begun.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Image { out } => {
            let testbed = Testbed::prepare()?;
            let spec = xtask::cluster::images::vfplane_image(&testbed)?;
            let image = xtask::oci::write_archive(&spec, &out)?;
            eprintln!(
                "image: {} {} ({} MiB) -> {}\n  import: ctr -n k8s.io images import {}",
                image.reference,
                image.manifest_digest,
                image.archive_bytes >> 20,
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster {
            command: ClusterCommand::Build,
        } => {
            let binaries = xtask::cluster::binaries::ensure(&xtask::testbed::workspace_root())?;
            eprintln!(
                "cluster: Go binaries ready in {:.1} s:\n  {}\n  {}\n  {}\n  {}",
                begun.elapsed().as_secs_f64(),
                binaries.kubernetes.display(),
                binaries.etcd.display(),
                binaries.containerd.display(),
                binaries.cni.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster {
            command:
                ClusterCommand::Up {
                    guest,
                    hold,
                    node_script,
                    node_profile,
                },
        } => {
            let node_extra = node_script
                .map(|p| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            cluster_up(&guest, hold, node_extra, node_profile)
        }
        Command::Helm => {
            let report = xtask::helm::run(&xtask::testbed::workspace_root())?;
            eprint!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Crdgen { check } => {
            let written = xtask::crdgen::run(&xtask::testbed::workspace_root(), check)?;
            for path in &written {
                eprintln!("crdgen: wrote {}", path.display());
            }
            if check || written.is_empty() {
                eprintln!("crdgen: the chart's CRDs match the types");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Formatting, lints, then the tests. The testbed is prepared first so its
/// one-time installs and builds are reported apart from the tests' own time.
fn run_tests(slow: bool, begun: Instant) -> Result<ExitCode> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let workspace = xtask::testbed::workspace_root();
    let step = |name: &str, args: &[&str]| -> Result<bool> {
        eprintln!("xtask test: {name} ({:.0} s)", begun.elapsed().as_secs_f64());
        // Incremental state doubles a debug build's size on disk and buys
        // nothing in a run that builds once. Every end-to-end test runs.
        let status = std::process::Command::new(&cargo)
            .current_dir(&workspace)
            .env("CARGO_INCREMENTAL", "0")
            .env(xtask::e2e::ENV, "1")
            .args(args)
            .status()?;
        if !status.success() {
            eprintln!("xtask test: {name} failed");
        }
        Ok(status.success())
    };
    if !step("cargo fmt --check", &["fmt", "--all", "--", "--check"])? {
        return Ok(ExitCode::FAILURE);
    }
    if !step(
        "cargo clippy",
        &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
    )? {
        return Ok(ExitCode::FAILURE);
    }
    // The QEMU plugin's own code is behind a feature the workspace build
    // leaves off.
    if !step(
        "cargo clippy (the QEMU plugin)",
        &[
            "clippy",
            "-p",
            "vfplane-guest-insns",
            "--features",
            "plugin",
            "--",
            "-D",
            "warnings",
        ],
    )? {
        return Ok(ExitCode::FAILURE);
    }
    if !step(
        "cargo xtask crdgen --check",
        &["run", "-q", "-p", "xtask", "--", "crdgen", "--check"],
    )? {
        return Ok(ExitCode::FAILURE);
    }
    eprintln!(
        "xtask test: preparing the testbed ({:.0} s)",
        begun.elapsed().as_secs_f64()
    );
    let testbed = Testbed::prepare()?;
    eprintln!(
        "xtask test: testbed ready, {:?} ({:.0} s)",
        testbed.accel(),
        begun.elapsed().as_secs_f64()
    );
    eprintln!(
        "xtask test: the cluster's Go binaries ({:.0} s)",
        begun.elapsed().as_secs_f64()
    );
    xtask::cluster::binaries::ensure(&workspace)?;
    // Every test binary runs even when one fails, so one run shows every failure.
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if slow {
        args.extend(["--", "--include-ignored"]);
    }
    let passed = step("cargo test", &args)?;
    // The driver runs optimised in every pod and on the testbed; its model
    // tests run optimised too, because the optimiser is where rustc 1.95.0
    // once broke it (a PF-assigned MAC read as zero only under --release).
    // Built exactly as the guest's binaries are, so the dependencies the
    // testbed compiled are reused rather than built a third time.
    eprintln!(
        "xtask test: cargo test --release -p vfplane-driver ({:.0} s)",
        begun.elapsed().as_secs_f64()
    );
    let release = std::process::Command::new(&cargo)
        .current_dir(&workspace)
        .env("RUSTFLAGS", xtask::testbed::GUEST_RUSTFLAGS)
        .args(["test", "--release", "--target", xtask::testbed::GUEST_TARGET])
        .args(["-p", "vfplane-driver"])
        .status()?;
    if !release.success() {
        eprintln!("xtask test: cargo test --release -p vfplane-driver failed");
    }
    let passed = release.success() && passed;
    eprintln!("xtask test: done in {:.0} s", begun.elapsed().as_secs_f64());
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The demo on the real cluster, then its table.
fn run_demo(begun: Instant) -> Result<ExitCode> {
    let testbed = Testbed::prepare()?;
    let report = xtask::demo::run(&testbed);
    let total = begun.elapsed().as_secs_f64();
    match report {
        Ok(report) => {
            eprintln!("\n== The path of one VF, end to end\n{}", report.table());
            eprintln!("demo finished in {total:.0} s: every step passed");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("\ndemo FAILED after {total:.0} s: {error:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `cargo xtask cluster up`: the cluster until interrupted.
fn cluster_up(
    guest: &GuestArgs,
    hold: Option<u64>,
    node_extra: Option<String>,
    node_profile: xtask::cluster::NodeProfile,
) -> Result<ExitCode> {
    let testbed = Testbed::prepare()?;
    let options = xtask::cluster::ClusterOptions {
        node_profile,
        guest: guest.options(),
        node_extra,
    };
    // Taken before the start, so that a signal during it stops the cluster
    // once it is up instead of leaving its processes behind (the default
    // action of SIGTERM ends xtask without running any Drop).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop))
            .with_context(|| format!("handling signal {signal}"))?;
    }
    let cluster = xtask::cluster::Cluster::start(&testbed, options)?;
    let nodes = cluster.kubectl_output(&["get", "nodes", "-o", "wide"])?;
    eprintln!("{nodes}");
    eprintln!(
        "cluster: up. From another shell:\n  ip netns exec {} {} --kubeconfig {} get pods -A\n\
         control plane logs: {}\nnode logs: {}",
        cluster.netns_name(),
        cluster.binaries().kube("kubectl").display(),
        cluster.kubeconfig().display(),
        cluster.dir().display(),
        cluster.guest().run_dir().display()
    );
    let until = hold.map(|s| std::time::Instant::now() + Duration::from_secs(s));
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && until.is_none_or(|t| std::time::Instant::now() < t)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("cluster: stopping");
    drop(cluster);
    Ok(ExitCode::SUCCESS)
}

fn run_guest(script: &str, options: &GuestOptions, begun: Instant) -> Result<ExitCode> {
    let testbed = Testbed::prepare()?;
    let prepared = begun.elapsed().as_secs_f64();
    let outcome = testbed.run(script, options, true)?;
    if let Some(after) = outcome.script_started_after {
        eprintln!(
            "testbed: prepared in {prepared:.1} s, script started {:.1} s after boot ({:.1} s after the command), exit {}",
            after,
            prepared + after,
            outcome.exit_code
        );
    }
    Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)))
}
