//! The driver's own cost per packet in `rx_burst` and `tx_burst`, on the
//! device model: the workload `cargo xtask bench driver` runs, once under
//! callgrind for instruction counts and once natively for ns/packet.
//!
//! `burst_cost --mode count|time --batch N [--packets P] [--runs R]`
//!
//! Each round: the model receives `batch` 60-byte frames into posted RX
//! buffers, the driver's `rx_burst` takes them and `tx_burst` queues the
//! same buffers for transmission, then the model transmits them.
//!
//! # How the driver's cost is kept apart from the model's
//!
//! - The model works outside the measured calls: frames are injected
//!   before `rx_burst`, and the model holds transmission
//!   ([`ModelConfig::tx_paused`]) so a TDT write only stores the register;
//!   the descriptors are processed by [`Model::resume_tx`] after
//!   `tx_burst` returned, the way a real device works after the doorbell
//!   while the CPU goes on.
//! - What remains of the model inside the measured calls is its register
//!   write (a `RefCell` borrow and a `match`, where a real VF's BAR write is
//!   one store). `xtask bench driver` runs this binary under callgrind with
//!   collection toggled on by `measured_rx_burst` / `measured_tx_burst`
//!   and toggled off again by the model's `RegisterSpace` methods (which
//!   the model keeps out of line for this), so nothing the model executes
//!   is counted, however the model changes. Counts are zeroed when
//!   `measurement_starts` is entered (bring-up and warm-up left out) and
//!   the process exits without tearing the device down, so the only model
//!   code that could run while counting is what the driver reaches through
//!   its register accesses. xtask fails when any function of
//!   `vfplane_driver::model` shows a cost in the driver-only count, or when
//!   a second run counting the model too does not differ from it by
//!   exactly the model's register functions' cost (the model's work was
//!   inlined into the driver's, out of the toggles' reach); it reports
//!   the model's instructions it left out in a column of its own.
//! - Timing (`--mode time`) covers the two burst calls only, the clock's
//!   own cost (calibrated) subtracted; there the model's register stores
//!   are in, and ns are noisy on a shared machine: the headline figure is
//!   the instruction count.

//!
//! # Figures (issue 15; rustc 1.95.0, x86_64, 2-core shared VM)
//!
//! Instructions per packet (driver only) and ns per packet, before and
//! after the first round of work on the burst paths:
//!
//! | batch | rx before | tx before | total before | ns before | rx after | tx after | total after | ns after |
//! |------:|----------:|----------:|-------------:|----------:|---------:|---------:|------------:|---------:|
//! |     1 |     166.0 |     224.0 |        390.0 |      53.3 |     98.0 |    203.0 |       301.0 |     23.6 |
//! |     4 |     134.5 |     128.0 |        262.5 |      40.2 |     57.5 |     86.0 |       143.5 |     11.2 |
//! |     8 |     129.2 |     112.0 |        241.2 |      36.1 |     50.8 |     66.5 |       117.2 |      9.3 |
//! |    32 |     125.3 |     100.0 |        225.3 |      34.7 |     45.7 |     51.9 |        97.6 |      6.7 |
//! |    64 |     124.7 |      98.3 |        223.0 |      34.0 |     44.8 |     50.1 |        95.0 |      6.2 |
//! |   256 |     124.2 |      97.1 |        221.3 |      33.9 |     44.2 |     48.8 |        93.1 |      5.8 |
//!
//! The model's register writes left out: 96 instructions per burst (RDT
//! 36, TDT 60). ns: medians of three runs of five, both builds alternating
//! on the same machine; the instruction counts are exact and repeatable.

#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::hint::black_box;
use std::time::{Duration, Instant};

use vfplane_driver::igbvf::IgbVf;
use vfplane_driver::model::{Model, ModelRegisters};
use vfplane_driver::{NicDevice, PacketBuf};

/// Bytes per frame: a minimal Ethernet frame without FCS.
const FRAME_LEN: usize = 60;

fn device() -> (Model, IgbVf<ModelRegisters>) {
    Model::benchmark_device(true).expect("device on the model")
}

/// The RX call callgrind counts (its symbol toggles collection on and off).
#[inline(never)]
fn measured_rx_burst(dev: &mut IgbVf<ModelRegisters>, out: &mut Vec<PacketBuf>, max: usize) -> usize {
    dev.rx_burst(out, max)
}

/// The TX call callgrind counts.
#[inline(never)]
fn measured_tx_burst(dev: &mut IgbVf<ModelRegisters>, packets: &mut Vec<PacketBuf>) -> usize {
    dev.tx_burst(packets)
}

/// Where callgrind zeroes its counts (`--zero-before`): everything before
/// it (bring-up, warm-up) is left out.
#[inline(never)]
fn measurement_starts() {
    black_box(());
}

/// One round; returns the time spent in the two burst calls.
fn round(
    model: &Model,
    dev: &mut IgbVf<ModelRegisters>,
    batch: usize,
    frame: &[u8],
    bufs: &mut Vec<PacketBuf>,
) -> Duration {
    for _ in 0..batch {
        assert!(model.inject(frame), "the RX ring has room for a batch");
    }
    let started = Instant::now();
    let got = measured_rx_burst(dev, bufs, batch);
    let sent = measured_tx_burst(dev, bufs);
    let spent = started.elapsed();
    // The model's TX work, after the measured calls.
    model.resume_tx();
    model.pause_tx(true);
    assert_eq!((got, sent), (batch, batch), "one call each moves the whole batch");
    assert!(bufs.is_empty());
    spent
}

/// Median time of an empty `Instant` pair, what every round's time carries.
fn clock_cost() -> Duration {
    let mut samples: Vec<Duration> = (0..10_001)
        .map(|_| {
            let started = Instant::now();
            black_box(&started);
            started.elapsed()
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> T {
    let flag = format!("--{name}");
    match args.iter().position(|a| *a == flag) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a value")),
        None => default.unwrap_or_else(|| panic!("{flag} is required")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode: String = arg(&args, "mode", None);
    let batch: usize = arg(&args, "batch", None);
    let packets: usize = arg(&args, "packets", Some(8192));
    let runs: usize = arg(&args, "runs", Some(5));
    assert!((1..=256).contains(&batch), "--batch must be 1..=256");
    let frame = [0x5au8; FRAME_LEN];
    let (model, mut dev) = device();
    let mut bufs = Vec::with_capacity(batch);
    let rounds = packets.div_ceil(batch);
    match mode.as_str() {
        "count" => {
            // Warm up: the rings wrap and reach their steady state.
            for _ in 0..rounds {
                round(&model, &mut dev, batch, &frame, &mut bufs);
            }
            measurement_starts();
            for _ in 0..rounds {
                round(&model, &mut dev, batch, &frame, &mut bufs);
            }
            println!("{}", rounds * batch);
            // No teardown: its register writes would toggle callgrind's
            // collection on inside the model (see the module docs). Not
            // `process::exit` either: callgrind then charges the frames
            // still open to `main` and its callers.
            std::mem::forget(dev);
            std::mem::forget(model);
        }
        "time" => {
            let clock = clock_cost();
            // Warm the rings and caches.
            for _ in 0..rounds {
                round(&model, &mut dev, batch, &frame, &mut bufs);
            }
            let mut per_run: Vec<f64> = (0..runs)
                .map(|_| {
                    let spent: Duration = (0..rounds)
                        .map(|_| round(&model, &mut dev, batch, &frame, &mut bufs).saturating_sub(clock))
                        .sum();
                    spent.as_nanos() as f64 / (rounds * batch) as f64
                })
                .collect();
            per_run.sort_by(f64::total_cmp);
            println!("{:.2}", per_run[per_run.len() / 2]);
        }
        other => panic!("--mode {other}: count or time"),
    }
}
