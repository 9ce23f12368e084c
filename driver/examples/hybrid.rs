//! Hybrid polling on a real VF, for `cargo xtask bench hybrid`: the CPU an
//! idle poller uses, then an echo whose round trips the host times.
//!
//! `hybrid [--pci ..] [--mode hybrid|poll] [--idle-polls 10000]
//!  [--idle-seconds 5] [--count 50] [--idle-timeout 60]`
//!
//! 1. `{"event":"ready",..}`, then the poller waits `--idle-seconds` with
//!    no traffic (send nothing): `{"phase":"idle",..}` gives the process's
//!    user + system CPU time over that span (`/proc/self/stat`) as
//!    `cpu_percent` of one CPU, and the poller's counters.
//! 2. `{"event":"echo_ready",..}`: every frame received is sent back with
//!    its MACs swapped, until `--count` were or none came for
//!    `--idle-timeout` s; then one result line with the poller's counters.
//!
//! In hybrid mode a VF whose interrupt cannot be had is busy-polled:
//! `irq_error` says why and `mode_in_use` is `AlwaysPoll`.

mod common;

use std::time::{Duration, Instant};

use common::{Args, cpu_seconds, emit, identity, open, run};
use vfplane_driver::NicDevice;
use vfplane_driver::poll::{PollMode, PollStats, Poller};

fn poll_json(ps: PollStats) -> serde_json::Value {
    serde_json::json!({
        "mode_in_use": format!("{:?}", ps.mode),
        "busy_polls": ps.busy_polls, "empty_polls": ps.empty_polls,
        "sleeps": ps.sleeps, "wakeups": ps.wakeups,
        "spurious_wakeups": ps.spurious_wakeups,
    })
}

fn main() {
    run("hybrid", || {
        let args = Args::parse()?;
        let mode = match args.get("mode").unwrap_or("hybrid") {
            "poll" => PollMode::AlwaysPoll,
            "hybrid" => PollMode::Hybrid {
                idle_polls: args.num("idle-polls", 10_000)?,
            },
            other => return Err(format!("--mode {other:?}: poll or hybrid")),
        };
        let idle_span = Duration::from_secs_f64(args.num("idle-seconds", 5.0)?);
        let count: u64 = args.num("count", 50)?;
        let idle_timeout = Duration::from_secs_f64(args.num("idle-timeout", 60.0)?);
        let pci = args.pci()?;
        let mut dev = open(&args)?;
        let mut poller = Poller::for_device(&mut dev, mode);
        let irq_error = poller.fallback().map(|f| common::chain(&f.reason));
        let mut ready = identity(&dev, &pci);
        ready["tool"] = "hybrid".into();
        ready["event"] = "ready".into();
        ready["irq_error"] = irq_error.clone().into();
        emit(&ready);

        // 1. Idle.
        let mut batch = Vec::with_capacity(64);
        let mut unexpected = 0u64;
        let cpu_before = cpu_seconds()?;
        let started = Instant::now();
        while started.elapsed() < idle_span {
            let left = idle_span.saturating_sub(started.elapsed());
            unexpected += poller
                .recv(&mut dev, &mut batch, 64, left.min(Duration::from_millis(200)))
                .map_err(|e| common::chain(&e))? as u64;
            batch.clear();
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds()? - cpu_before;
        let mut idle = serde_json::json!({
            "tool": "hybrid", "phase": "idle", "mode": format!("{mode:?}"),
            "seconds": wall, "cpu_seconds": cpu, "cpu_percent": 100.0 * cpu / wall,
            "unexpected_frames": unexpected, "irq_error": irq_error,
        });
        idle["poll"] = poll_json(poller.stats());
        emit(&idle);

        // 2. Echo.
        let mut ready = identity(&dev, &pci);
        ready["tool"] = "hybrid".into();
        ready["event"] = "echo_ready".into();
        emit(&ready);
        let before = poller.stats();
        let mut echoed = 0u64;
        let mut last = Instant::now();
        while echoed < count && last.elapsed() < idle_timeout {
            let n = poller
                .recv(&mut dev, &mut batch, 64, Duration::from_millis(200))
                .map_err(|e| common::chain(&e))?;
            if n == 0 {
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
            while !batch.is_empty() {
                echoed += dev.tx_burst(&mut batch) as u64;
            }
        }
        let after = poller.stats();
        let mut line = identity(&dev, &pci);
        line["tool"] = "hybrid".into();
        line["mode"] = format!("{mode:?}").into();
        line["irq_error"] = irq_error.into();
        line["echoed"] = echoed.into();
        line["timed_out"] = (echoed < count).into();
        // The echo phase's own counters.
        line["poll"] = poll_json(PollStats {
            mode: after.mode,
            busy_polls: after.busy_polls - before.busy_polls,
            empty_polls: after.empty_polls - before.empty_polls,
            sleeps: after.sleeps - before.sleeps,
            wakeups: after.wakeups - before.wakeups,
            spurious_wakeups: after.spurious_wakeups - before.spurious_wakeups,
        });
        emit(&line);
        Ok(())
    });
}
