//! Receives frames, swaps source and destination MAC, sends them back: the
//! same buffers, no copy.
//!
//! `echo [--pci ..] [--count 0 (forever)] [--idle-timeout 30]`
//!
//! Prints `{"event":"ready",..}` once up, then one result line when
//! `--count` frames were echoed or nothing came for `--idle-timeout` s.

mod common;

use std::time::{Duration, Instant};

use common::{Args, emit, identity, open, run};
use vfplane_driver::NicDevice;

fn main() {
    run("echo", || {
        let args = Args::parse()?;
        let count: u64 = args.num("count", 0)?;
        let idle = Duration::from_secs_f64(args.num("idle-timeout", 30.0)?);
        let pci = args.pci()?;
        let mut dev = open(&args)?;
        let mut ready = identity(&dev, &pci);
        ready["tool"] = "echo".into();
        ready["event"] = "ready".into();
        emit(&ready);

        let mut batch = Vec::with_capacity(64);
        let mut echoed = 0u64;
        let mut last = Instant::now();
        let mut spins = 0u32;
        while count == 0 || echoed < count {
            if dev.rx_burst(&mut batch, 64) == 0 && batch.is_empty() {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && last.elapsed() > idle {
                    break;
                }
                std::hint::spin_loop();
                continue;
            }
            last = Instant::now();
            for buf in &mut batch {
                let frame = buf.as_mut_slice();
                if frame.len() >= 12 {
                    let (dst, src) = frame.split_at_mut(6);
                    dst.swap_with_slice(&mut src[..6]);
                }
            }
            echoed += dev.tx_burst(&mut batch) as u64;
        }
        let stats = dev.stats();
        let mut line = identity(&dev, &pci);
        line["tool"] = "echo".into();
        line["echoed"] = echoed.into();
        line["rx_packets"] = stats.rx_packets.into();
        line["tx_packets"] = stats.tx_packets.into();
        line["idle_timeout"] = (count != 0 && echoed < count).into();
        emit(&line);
        Ok(())
    });
}
