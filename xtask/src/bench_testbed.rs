//! Benchmarks of the driver on the testbed guest (TCG: absolute rates are
//! the emulator's, ratios between paths on the same run are the figures):
//!
//! - `cargo xtask bench testbed-pps`: TX and RX packets per second of the
//!   driver (`pktgen`, `rxcount` on a vfio-pci VF) against the kernel path
//!   (`afpacket_tx`, `afpacket_rx` on an igbvf VF of the same NIC), each the
//!   median of `rounds` runs in one guest, and the ratio.
//! - `cargo xtask bench hybrid`: the CPU an idle hybrid poller uses, and
//!   how long a frame takes to come back from a poller asleep on its
//!   interrupt, against one that busy-polls (`hybrid` example).
//!
//! Nothing here asserts a rate; a run fails only when a program fails or
//! its output is missing.

use std::fmt::Write as _;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use xtask::testbed::wire::{ETHERTYPE_TEST, test_frame};
use xtask::testbed::{GuestOptions, RunningGuest, Testbed};

const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xaa];
const HOST_MAC_TEXT: &str = "02:00:00:00:00:aa";
const SIZE: usize = 60;
/// Linux's "no buffer space": the host socket is full; send again.
const ENOBUFS: i32 = 105;

/// What `bench testbed-pps` measures.
#[derive(Debug, Clone)]
pub struct PpsOptions {
    /// Frames per run.
    pub frames: u32,
    /// Runs per path and direction (the median is reported).
    pub rounds: u32,
    /// Count guest instructions per frame with QEMU's TCG plugin.
    pub count_instructions: bool,
}

/// The `nth` (from 0) JSON line of the guest's output `pick` accepts;
/// an error when the program reported one.
fn wait_for_nth(
    guest: &RunningGuest,
    what: &str,
    timeout: Duration,
    nth: usize,
    pick: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let v = guest.json_line(what, timeout, nth, pick)?;
    if let Some(error) = v.get("error") {
        bail!("{what}: the guest program failed: {error}");
    }
    Ok(v)
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().with_context(|| format!("MAC {text:?}"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text:?}"))?;
    }
    Ok(mac)
}

fn mac_of(line: &Value) -> Result<[u8; 6]> {
    parse_mac(
        line["mac"]
            .as_str()
            .with_context(|| format!("no mac in {line}"))?,
    )
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn pps_of(line: &Value) -> f64 {
    line["pps"].as_f64().unwrap_or(0.0)
}

/// One path and direction's runs.
#[derive(Debug, Clone, Default)]
pub struct PpsRuns {
    /// Each run's rate, in run order.
    pub pps: Vec<f64>,
    /// Frames the receiving side counted over all runs (TX: on the host's
    /// end of the wire, from the sending VF's MACs; RX: in the guest
    /// program), of `frames` x runs sent.
    pub delivered: u64,
    /// Guest instructions per frame of each run (all vCPUs, kernel and
    /// user, from the program's first to its last frame), when counted.
    pub instructions: Vec<f64>,
    /// Of those, the receive bursts that returned frames, per frame (the
    /// driver's receiver only: its cost without empty polls).
    pub burst_instructions: Vec<f64>,
    /// Frames in each receive run's instruction span (all but those of
    /// its first burst).
    pub span_frames: Vec<u64>,
}

/// The table of `bench testbed-pps`.
#[derive(Debug, Clone)]
pub struct PpsReport {
    /// Frames per run.
    pub frames: u32,
    /// Driver TX.
    pub driver_tx: PpsRuns,
    /// Kernel TX.
    pub kernel_tx: PpsRuns,
    /// Driver RX.
    pub driver_rx: PpsRuns,
    /// Kernel RX.
    pub kernel_rx: PpsRuns,
    /// The DMA page size the driver's programs reported.
    pub dma_page_size: Value,
    /// The guest's accelerator.
    pub accel: String,
    /// The guest kernel's clocksource (with one that is not `tsc`, a clock
    /// read is a system call: both receivers read the clock per burst).
    pub clocksource: String,
}

impl PpsReport {
    /// The table as printed.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vfplane-driver (vfio-pci VF) vs igbvf + AF_PACKET (igbvf VF), same emulated 82576 ({} guest), {SIZE}-byte frames, \
             {} frames per run, median of {} runs in one guest (the emulator sets the ceiling; the ratio is the figure)",
            self.accel,
            self.frames,
            self.driver_tx.pps.len()
        );
        let _ = writeln!(
            out,
            "{:<4}  {:>12}  {:>12}  {:>7}  {:<30}  {:<30}",
            "dir", "driver pps", "kernel pps", "ratio", "driver runs (delivered)", "kernel runs (delivered)"
        );
        for (dir, driver, kernel) in [
            ("TX", &self.driver_tx, &self.kernel_tx),
            ("RX", &self.driver_rx, &self.kernel_rx),
        ] {
            let sent = u64::from(self.frames) * self.driver_tx.pps.len() as u64;
            let runs = |r: &PpsRuns| {
                let each = r.pps.iter().map(|p| format!("{p:.0}")).collect::<Vec<_>>();
                format!("{} ({}/{sent})", each.join(", "), r.delivered)
            };
            let (d, k) = (median(&driver.pps), median(&kernel.pps));
            let _ = writeln!(
                out,
                "{dir:<4}  {d:>12.0}  {k:>12.0}  {:>6.2}x  {:<30}  {:<30}",
                d / k,
                runs(driver),
                runs(kernel)
            );
        }
        let _ = writeln!(
            out,
            "driver DMA page size: {}; guest clocksource: {}. RX: the host sends each run's frames as fast as its socket takes them; \
             QEMU drops what the NIC cannot take in time, so fewer arrive than were sent, and the rate is \
             first to last frame received",
            self.dma_page_size, self.clocksource
        );
        // Counted runs have instructions; the plugin was not loaded otherwise.
        if !self.driver_tx.instructions.is_empty() {
            out.push_str(&self.instruction_table());
        }
        out
    }

    /// Guest instructions per frame, and what they say about the rates.
    fn instruction_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\nguest instructions per frame (QEMU TCG plugin vfplane-guest-insns: every vCPU, kernel and user, \
             from the program's first frame to its last, the program's own work on each frame included; RX: \
             less the driver's empty looks, over the frames after the first burst; the last column: the driver \
             program's looks that found frames, with its work on them, on their own vCPU), median of {} runs; the \
             rates above were taken with the plugin loaded. guest M/s: instructions per frame x pps, the guest \
             code the vCPUs ran per second; the rest of the time is QEMU's (its emulated NIC, the host's sockets)",
            self.driver_tx.instructions.len()
        );
        let _ = writeln!(
            out,
            "{:<4}  {:>14}  {:>14}  {:>7}  {:>16}  {:>16}  {:<32}",
            "dir",
            "driver insn/f",
            "kernel insn/f",
            "ratio",
            "driver guest M/s",
            "kernel guest M/s",
            "driver's looks with frames"
        );
        for (dir, driver, kernel) in [
            ("TX", &self.driver_tx, &self.kernel_tx),
            ("RX", &self.driver_rx, &self.kernel_rx),
        ] {
            let (d, k) = (median(&driver.instructions), median(&kernel.instructions));
            let bursts = if driver.burst_instructions.is_empty() {
                "-".to_owned()
            } else {
                let b = median(&driver.burst_instructions);
                format!("{b:.0} insn/f")
            };
            let _ = writeln!(
                out,
                "{dir:<4}  {d:>14.0}  {k:>14.0}  {:>6.1}x  {:>16.1}  {:>16.1}  {bursts:<32}",
                k / d,
                d * median(&driver.pps) / 1e6,
                k * median(&kernel.pps) / 1e6,
            );
        }
        out
    }
}

/// Sends `frames` test frames to `dst` as fast as the host's socket takes them.
fn blast(guest: &RunningGuest, dst: [u8; 6], frames: u32) -> Result<()> {
    let link = guest.pf_link(0).context("the guest has no PF link")?;
    for seq in 0..frames {
        let frame = test_frame(dst, HOST_MAC, seq, SIZE);
        while let Err(error) = link.send_frame(&frame) {
            if error.raw_os_error() != Some(ENOBUFS) {
                return Err(error).context("sending into the guest");
            }
        }
    }
    Ok(())
}

/// `cargo xtask bench testbed-pps`.
///
/// # Errors
/// When the guest cannot run or a program fails.
pub fn pps(testbed: &Testbed, options: &PpsOptions) -> Result<PpsReport> {
    let (n, rounds) = (options.frames, options.rounds);
    let script = format!(
        r#"
k=0000:00:12.0; u=0000:00:12.2
ifc=$(ls /sys/bus/pci/devices/$k/net/ | head -1)
ip link set $ifc up
echo $u > /sys/bus/pci/devices/$u/driver/unbind
echo vfio-pci > /sys/bus/pci/devices/$u/driver_override
echo $u > /sys/bus/pci/drivers_probe
for i in $(seq 30); do grep -q 1 /sys/class/net/$ifc/carrier 2>/dev/null && break; sleep 1; done
echo "{{\"clocksource\":\"$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"}}"
for round in $(seq {rounds}); do
  pktgen --pci $u --count {n} --size {SIZE} --dst {HOST_MAC_TEXT} --warmup 2000
  afpacket_tx --iface $ifc --count {n} --size {SIZE} --dst {HOST_MAC_TEXT} --warmup 2000
done
rxcount --pci $u --count {n} --timeout 600 --idle-timeout 3 --rounds {rounds}
afpacket_rx --iface $ifc --count {n} --timeout 600 --idle-timeout 3 --rounds {rounds}
"#
    );
    let guest_options = GuestOptions {
        vfs: 2,
        kernel_vf_driver: true,
        timeout: Duration::from_secs(1800),
        // One host thread per vCPU, as every figure of this bench so far.
        single_threaded_tcg: false,
        count_instructions: options.count_instructions,
        ..GuestOptions::default()
    };
    let guest = testbed.start(&script, &guest_options)?;
    let wire = guest.listen_wire(0)?;
    let long = Duration::from_secs(900);

    let mut report = PpsReport {
        frames: n,
        driver_tx: PpsRuns::default(),
        kernel_tx: PpsRuns::default(),
        driver_rx: PpsRuns::default(),
        kernel_rx: PpsRuns::default(),
        clocksource: String::new(),
        dma_page_size: Value::Null,
        accel: format!("{:?}", testbed.accel()),
    };
    // The driver's VF takes a new random MAC at every open, the kernel's
    // keeps one: frames on the wire are counted per path over all runs.
    let mut macs: [Vec<[u8; 6]>; 2] = [Vec::new(), Vec::new()];
    let clocksource = guest.json_line("clocksource", long, 0, |v| v.get("clocksource").is_some())?;
    report.clocksource = clocksource["clocksource"].as_str().unwrap_or_default().to_owned();
    for round in 0..rounds as usize {
        for (i, (tool, runs)) in [
            ("pktgen", &mut report.driver_tx),
            ("afpacket_tx", &mut report.kernel_tx),
        ]
        .into_iter()
        .enumerate()
        {
            let line = wait_for_nth(&guest, tool, long, round, |v| v["tool"] == tool)?;
            eprintln!("bench testbed-pps: {line}");
            runs.pps.push(pps_of(&line));
            let mac = mac_of(&line)?;
            if !macs[i].contains(&mac) {
                macs[i].push(mac);
            }
            if tool == "pktgen" {
                report.dma_page_size = line["dma_page_size"].clone();
            }
        }
    }
    wire.settle(Duration::from_secs(1));
    for (i, runs) in [&mut report.driver_tx, &mut report.kernel_tx]
        .into_iter()
        .enumerate()
    {
        runs.delivered = macs[i]
            .iter()
            .map(|&mac| wire.take_from(mac, ETHERTYPE_TEST).len() as u64)
            .sum();
    }
    drop(wire);
    for (tool, runs) in [
        ("rxcount", &mut report.driver_rx),
        ("afpacket_rx", &mut report.kernel_rx),
    ] {
        for round in 0..rounds as usize {
            let ready = wait_for_nth(&guest, &format!("{tool} ready"), long, round, |v| {
                v["tool"] == tool && v["event"] == "ready"
            })?;
            blast(&guest, mac_of(&ready)?, n)?;
            let line = wait_for_nth(&guest, &format!("{tool} result"), long, round, |v| {
                v["tool"] == tool && v.get("received").is_some()
            })?;
            eprintln!("bench testbed-pps: {line}");
            runs.pps.push(pps_of(&line));
            runs.delivered += line["received"].as_u64().unwrap_or(0);
            runs.span_frames.push(line["span_frames"].as_u64().unwrap_or(0));
        }
    }
    if options.count_instructions {
        count_instructions(&guest, &mut report, rounds as usize)?;
    }
    let outcome = guest.wait()?;
    if outcome.exit_code != 0 {
        bail!(
            "the guest script failed (exit {}):\n{}",
            outcome.exit_code,
            outcome.output
        );
    }
    Ok(report)
}

/// Puts the plugin's spans beside the runs they measured. The script runs
/// `pktgen`, `afpacket_tx` in turn `rounds` times, then `rxcount` and
/// `afpacket_rx` `rounds` rounds each, and each run is one span, so the
/// spans come in that order.
fn count_instructions(guest: &RunningGuest, report: &mut PpsReport, rounds: usize) -> Result<()> {
    let spans = guest.instruction_spans()?;
    ensure!(
        spans.len() == 4 * rounds,
        "the counting plugin wrote {} spans, not the {} the runs mark: {spans:?}",
        spans.len(),
        4 * rounds
    );
    let (tx, rx) = spans.split_at(2 * rounds);
    let frames = f64::from(report.frames);
    for pair in tx.chunks(2) {
        report
            .driver_tx
            .instructions
            .push(pair[0].span_instructions as f64 / frames);
        report
            .kernel_tx
            .instructions
            .push(pair[1].span_instructions as f64 / frames);
    }
    let (driver, kernel) = rx.split_at(rounds);
    for (runs, spans) in [(&mut report.driver_rx, driver), (&mut report.kernel_rx, kernel)] {
        ensure!(
            runs.span_frames.len() == spans.len(),
            "runs and spans differ in number"
        );
        for (span, &frames) in spans.iter().zip(&runs.span_frames) {
            ensure!(frames > 0, "a receive run's span holds no frame");
            let frames = frames as f64;
            // Empty looks are the driver's wait for frames, not their cost.
            let work = span.span_instructions.saturating_sub(span.dropped_instructions);
            runs.instructions.push(work as f64 / frames);
            if span.bursts > 0 {
                runs.burst_instructions
                    .push(span.burst_instructions as f64 / frames);
            }
        }
    }
    Ok(())
}

/// What `bench hybrid` measures.
#[derive(Debug, Clone)]
pub struct HybridOptions {
    /// Seconds of no traffic over which the idle CPU is taken.
    pub idle_seconds: u32,
    /// Frames echoed, one at a time.
    pub frames: u32,
    /// Pause between frames (the poller goes back to sleep in it).
    pub gap: Duration,
}

/// One poll mode's figures.
#[derive(Debug, Clone)]
pub struct HybridRun {
    /// `Hybrid { .. }` or `AlwaysPoll`, as the program ran it.
    pub mode: String,
    /// CPU of one core while idle, percent.
    pub idle_cpu_percent: f64,
    /// Over how many seconds.
    pub idle_seconds: f64,
    /// The poller's counters over the idle span.
    pub idle_poll: Value,
    /// Round trips host -> guest -> host, in order, milliseconds; `None`:
    /// no echo within a second.
    pub rtt_ms: Vec<Option<f64>>,
    /// The poller's counters over the echo.
    pub echo_poll: Value,
}

impl HybridRun {
    fn answered(&self) -> Vec<f64> {
        self.rtt_ms.iter().flatten().copied().collect()
    }
}

/// The table of `bench hybrid`.
#[derive(Debug, Clone)]
pub struct HybridReport {
    /// Hybrid, then busy polling.
    pub runs: Vec<HybridRun>,
    /// Gap between frames.
    pub gap: Duration,
    /// The guest's accelerator.
    pub accel: String,
}

impl HybridReport {
    /// The table as printed.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "hybrid polling on a vfio-pci VF ({} guest, 2 vCPUs): idle CPU from /proc/self/stat (utime + stime) \
             over an idle span; round trip host -> echo -> host of one frame every {} ms",
            self.accel,
            self.gap.as_millis()
        );
        let _ = writeln!(
            out,
            "{:<26}  {:>10}  {:>8}  {:>9}  {:>9}  {:>9}  {:>8}  {:>9}  {:>8}",
            "mode", "idle CPU %", "echoed", "rtt med", "rtt p90", "rtt max", "sleeps", "wakeups", "spurious"
        );
        for run in &self.runs {
            let mut rtts = run.answered();
            rtts.sort_by(f64::total_cmp);
            let at = |q: f64| {
                rtts.get(((rtts.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            let _ = writeln!(
                out,
                "{:<26}  {:>10.2}  {:>4}/{:<3}  {:>7.2}ms  {:>7.2}ms  {:>7.2}ms  {:>8}  {:>9}  {:>8}",
                run.mode,
                run.idle_cpu_percent,
                rtts.len(),
                run.rtt_ms.len(),
                at(0.5),
                at(0.9),
                at(1.0),
                run.echo_poll["sleeps"],
                run.echo_poll["wakeups"],
                run.echo_poll["spurious_wakeups"],
            );
        }
        if let [hybrid, poll, ..] = self.runs.as_slice() {
            let mut h = hybrid.answered();
            let mut p = poll.answered();
            h.sort_by(f64::total_cmp);
            p.sort_by(f64::total_cmp);
            let _ = writeln!(
                out,
                "wake latency (median round trip hybrid - busy polling): {:.2} ms; worst hybrid round trip {:.2} ms",
                median(&h) - median(&p),
                h.last().copied().unwrap_or(f64::NAN)
            );
            let _ = writeln!(
                out,
                "idle span: hybrid {:.1} s, counters {}; busy polling {:.1} s, counters {}",
                hybrid.idle_seconds, hybrid.idle_poll, poll.idle_seconds, poll.idle_poll
            );
        }
        out
    }
}

/// Sends one frame and waits up to a second for its echo; the round trip.
fn round_trip(link_socket: &UdpSocket, guest_port: u16, vf: [u8; 6], seq: u32) -> Result<Option<f64>> {
    let frame = test_frame(vf, HOST_MAC, seq, SIZE);
    let want = test_frame(HOST_MAC, vf, seq, SIZE);
    let started = Instant::now();
    link_socket.send_to(&frame, ("127.0.0.1", guest_port))?;
    let mut buf = [0u8; 2048];
    while started.elapsed() < Duration::from_secs(1) {
        match link_socket.recv(&mut buf) {
            Ok(n) if buf[..n] == want[..] => return Ok(Some(started.elapsed().as_secs_f64() * 1e3)),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving the echo"),
        }
    }
    Ok(None)
}

/// `cargo xtask bench hybrid`.
///
/// # Errors
/// When the guest cannot run or a program fails.
pub fn hybrid(testbed: &Testbed, options: &HybridOptions) -> Result<HybridReport> {
    let (idle, frames) = (options.idle_seconds, options.frames);
    let script = format!(
        r#"
vf=0000:00:12.0
echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
echo $vf > /sys/bus/pci/drivers_probe
hybrid --pci $vf --mode hybrid --idle-seconds {idle} --count {frames} --idle-timeout 120
hybrid --pci $vf --mode poll --idle-seconds {idle} --count {frames} --idle-timeout 120
"#
    );
    let guest_options = GuestOptions {
        vfs: 1,
        timeout: Duration::from_secs(1200),
        // One host thread per vCPU, as every figure of this bench so far.
        single_threaded_tcg: false,
        ..GuestOptions::default()
    };
    let guest = testbed.start(&script, &guest_options)?;
    let link = guest.pf_link(0).context("the guest has no PF link")?;
    let socket = link.socket.try_clone()?;
    socket.set_read_timeout(Some(Duration::from_millis(20)))?;
    let long = Duration::from_secs(600);
    let mut runs = Vec::new();
    for nth in 0..2 {
        let idle_line = wait_for_nth(&guest, "hybrid idle phase", long, nth, |v| {
            v["tool"] == "hybrid" && v["phase"] == "idle"
        })?;
        eprintln!("bench hybrid: {idle_line}");
        let ready = wait_for_nth(&guest, "hybrid echo_ready", long, nth, |v| {
            v["tool"] == "hybrid" && v["event"] == "echo_ready"
        })?;
        let vf = mac_of(&ready)?;
        // Drain what came before (nothing should have).
        let mut buf = [0u8; 2048];
        while socket.recv(&mut buf).is_ok() {}
        let mut rtt_ms = Vec::new();
        for seq in 0..frames {
            std::thread::sleep(options.gap);
            rtt_ms.push(round_trip(&socket, link.guest_port, vf, seq)?);
        }
        let result = wait_for_nth(&guest, "hybrid result", long, nth, |v| {
            v["tool"] == "hybrid" && v.get("echoed").is_some()
        })?;
        eprintln!("bench hybrid: {result}");
        runs.push(HybridRun {
            mode: result["poll"]["mode_in_use"].as_str().unwrap_or("?").to_owned(),
            idle_cpu_percent: idle_line["cpu_percent"].as_f64().unwrap_or(f64::NAN),
            idle_seconds: idle_line["seconds"].as_f64().unwrap_or(f64::NAN),
            idle_poll: idle_line["poll"].clone(),
            rtt_ms,
            echo_poll: result["poll"].clone(),
        });
    }
    let outcome = guest.wait()?;
    if outcome.exit_code != 0 {
        bail!(
            "the guest script failed (exit {}):\n{}",
            outcome.exit_code,
            outcome.output
        );
    }
    Ok(HybridReport {
        runs,
        gap: options.gap,
        accel: format!("{:?}", testbed.accel()),
    })
}
