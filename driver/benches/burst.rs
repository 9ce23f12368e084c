//! Driver cost per packet, RX + TX, against the in-memory device model.
//!
//! Each round: the model receives `batch` 60-byte frames into posted
//! buffers (not timed), then the driver's `rx_burst` takes them and
//! `tx_burst` sends the same buffers back (timed: descriptor reads and
//! writes, buffer recycling, the two doorbells, batched TX reclaim, plus
//! the model's own TX descriptor processing behind the TDT write).
//!
//! Prints ns/packet and Mpps per core for batch sizes 1..256, then runs the
//! same under criterion. `cargo bench -p vfplane-driver --bench burst`.

#![allow(clippy::expect_used, clippy::unwrap_used)] // bench: a panic is the failure report

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use vfplane_driver::igbvf::IgbVf;
use vfplane_driver::model::{Model, ModelRegisters};
use vfplane_driver::{NicDevice, PacketBuf};

const BATCHES: [usize; 6] = [1, 4, 16, 32, 64, 256];

fn device() -> (Model, IgbVf<ModelRegisters>) {
    Model::benchmark_device(false).expect("device on the model")
}

/// One round; returns the time spent in the driver's burst calls.
fn round(
    model: &Model,
    dev: &mut IgbVf<ModelRegisters>,
    batch: usize,
    frame: &[u8],
    bufs: &mut Vec<PacketBuf>,
) -> Duration {
    for _ in 0..batch {
        model.inject(frame);
    }
    let started = Instant::now();
    let mut got = 0;
    while got < batch {
        got += dev.rx_burst(bufs, batch - got);
    }
    while !bufs.is_empty() {
        dev.tx_burst(bufs);
    }
    let spent = started.elapsed();
    black_box(got);
    spent
}

fn summary() {
    let frame = [0x5au8; 60];
    println!("driver cost per packet, RX+TX, device model (60-byte frames):");
    for batch in BATCHES {
        let (model, mut dev) = device();
        let mut bufs = Vec::with_capacity(batch);
        // Warm up, then measure about 0.3 s.
        for _ in 0..1000 {
            round(&model, &mut dev, batch, &frame, &mut bufs);
        }
        let mut spent = Duration::ZERO;
        let mut packets = 0u64;
        let wall = Instant::now();
        while wall.elapsed() < Duration::from_millis(300) {
            spent += round(&model, &mut dev, batch, &frame, &mut bufs);
            packets += batch as u64;
        }
        let ns = spent.as_nanos() as f64 / packets as f64;
        println!(
            "  batch {batch:>3}: {ns:>7.1} ns/packet  {:>6.2} Mpps  ({packets} packets)",
            1e3 / ns
        );
    }
}

fn bench(c: &mut Criterion) {
    let frame = [0x5au8; 60];
    let mut group = c.benchmark_group("rx_tx_burst");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for batch in BATCHES {
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            let (model, mut dev) = device();
            let mut bufs = Vec::with_capacity(batch);
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| round(&model, &mut dev, batch, &frame, &mut bufs))
                    .sum()
            });
        });
    }
    group.finish();
}

fn main() {
    summary();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
