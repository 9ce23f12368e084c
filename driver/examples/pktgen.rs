//! Sends `--count` frames of `--size` bytes from a VF and reports the rate.
//!
//! `pktgen [--pci 0000:00:12.0] [--count 10000] [--size 60] [--batch 32]
//!  [--dst ff:ff:ff:ff:ff:ff] [--warmup 0]`
//!
//! Frames: dst, the VF's MAC, ethertype 0x88b5, a 32-bit sequence number,
//! then byte i = (i ^ seq) as u8. Warm-up frames (ethertype 0x88b6) go
//! first and are not timed. Prints one JSON line: `requested` (the
//! argument), `sent` (frames the driver queued on the TX ring),
//! `hw_tx_packets` (the VF's own TX counter). The timed frames are one span
//! of the testbed's instruction count (`vfplane-guest-insns`).

mod common;

use std::time::{Duration, Instant};

use common::{Args, ETHERTYPE_TEST, ETHERTYPE_WARMUP, emit, fill_frame, identity, open, run};
use vfplane_driver::{MacAddress, NicDevice};
use vfplane_guest_insns::marker::{Mark, mark};

fn send<D: NicDevice>(
    dev: &mut D,
    dst: [u8; 6],
    ethertype: u16,
    count: u32,
    size: usize,
    batch: usize,
) -> Result<(), String> {
    let pool = dev.mempool().clone();
    let src = dev.mac().0;
    let mut pending = Vec::with_capacity(batch);
    let mut next = 0u32;
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < count || !pending.is_empty() {
        while next < count && pending.len() < batch {
            let Some(mut buf) = pool.alloc() else { break };
            buf.set_len(size);
            fill_frame(buf.as_mut_slice(), dst, src, ethertype, next);
            pending.push(buf);
            next += 1;
        }
        dev.tx_burst(&mut pending);
        if Instant::now() > deadline {
            return Err(format!("stuck after {next} frames: the TX ring does not drain"));
        }
    }
    Ok(())
}

fn main() {
    run("pktgen", || {
        let args = Args::parse()?;
        let count: u32 = args.num("count", 10_000)?;
        let size: usize = args.num("size", 60)?;
        let batch: usize = args.num("batch", 32)?;
        let warmup: u32 = args.num("warmup", 0)?;
        if !(18..=2048).contains(&size) {
            return Err(format!("--size {size}: 18..=2048"));
        }
        let dst = args
            .get("dst")
            .unwrap_or("ff:ff:ff:ff:ff:ff")
            .parse::<MacAddress>()
            .map_err(|e| e.to_string())?
            .0;
        let pci = args.pci()?;
        let mut dev = open(&args)?;
        if warmup > 0 {
            send(&mut dev, dst, ETHERTYPE_WARMUP, warmup, size, batch)?;
        }
        let (_, tx_before, _, _) = dev.hw_counters();
        let driver_before = dev.stats().tx_packets;
        let started = Instant::now();
        mark(Mark::SpanBegin);
        send(&mut dev, dst, ETHERTYPE_TEST, count, size, batch)?;
        mark(Mark::SpanEnd);
        let seconds = started.elapsed().as_secs_f64();
        let (_, tx_after, _, _) = dev.hw_counters();
        let stats = dev.stats();
        let mut line = identity(&dev, &pci);
        line["tool"] = "pktgen".into();
        // What the driver queued to the NIC (its own counter), not the count
        // asked for; hw_tx_packets is the NIC's own counter of frames sent.
        line["requested"] = count.into();
        line["sent"] = stats.tx_packets.wrapping_sub(driver_before).into();
        line["size"] = size.into();
        line["batch"] = batch.into();
        line["warmup"] = warmup.into();
        line["seconds"] = seconds.into();
        line["pps"] = (f64::from(count) / seconds).round().into();
        line["hw_tx_packets"] = tx_after.wrapping_sub(tx_before).into();
        line["tx_packets"] = stats.tx_packets.into();
        line["tx_drops"] = stats.tx_drops.into();
        emit(&line);
        Ok(())
    });
}
