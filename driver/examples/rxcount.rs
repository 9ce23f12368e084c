//! Counts `--count` test frames received on a VF, with a timeout, and
//! reports the count and the rate (first to last frame).
//!
//! `rxcount [--pci ..] [--count 10000] [--timeout 60] [--mode poll|hybrid]
//!  [--idle-polls 10000] [--idle-timeout S] [--rounds 1]`
//!
//! Prints `{"event":"ready",..}` once the VF is up (send after it), then
//! one result line. With `--idle-timeout`, it stops that long after the
//! last frame even when fewer than `--count` came (a rate measurement under
//! loss). `--rounds N` counts N times in turn on the same open VF, a ready
//! line before each. In hybrid mode, a VF whose interrupt cannot be had is
//! busy-polled: `irq_error` says why and `mode_in_use` is `AlwaysPoll`.
//! Each round is a span of the testbed's instruction count
//! (`vfplane-guest-insns`) from its first burst with frames to its last;
//! busy polling marks each look (kept with the work on its frames, or
//! dropped when empty); `span_frames` is how many frames the span holds.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Args, check_frame, emit, identity, open, run};
use vfplane_driver::NicDevice;
use vfplane_driver::igbvf::IgbVf;
use vfplane_driver::poll::{PollMode, Poller};
use vfplane_driver::vfio::VfioVf;
use vfplane_guest_insns::marker::{Mark, mark};

fn main() {
    run("rxcount", || {
        let args = Args::parse()?;
        let count: u64 = args.num("count", 10_000)?;
        let timeout = Duration::from_secs_f64(args.num("timeout", 60.0)?);
        let mode = match args.get("mode").unwrap_or("poll") {
            "poll" => PollMode::AlwaysPoll,
            "hybrid" => PollMode::Hybrid {
                idle_polls: args.num("idle-polls", 10_000)?,
            },
            other => return Err(format!("--mode {other:?}: poll or hybrid")),
        };
        let idle_timeout = match args.get("idle-timeout") {
            Some(_) => Some(Duration::from_secs_f64(args.num("idle-timeout", 1.0)?)),
            None => None,
        };
        let rounds: u32 = args.num("rounds", 1)?;
        let pci = args.pci()?;
        let mut dev = open(&args)?;
        // Hybrid polling falls back to busy polling, with the reason, when
        // the VF's interrupt cannot be had.
        let mut poller = Poller::for_device(&mut dev, mode);
        let irq_error = poller.fallback().map(|f| common::chain(&f.reason));
        for _ in 0..rounds {
            count_round(
                &mut dev,
                &mut poller,
                &pci,
                mode,
                irq_error.as_deref(),
                count,
                timeout,
                idle_timeout,
            )?;
        }
        Ok(())
    });
}

/// One round: a ready line, frames counted, a result line.
#[allow(clippy::too_many_arguments)]
fn count_round(
    dev: &mut IgbVf<VfioVf>,
    poller: &mut Poller,
    pci: &str,
    mode: PollMode,
    irq_error: Option<&str>,
    count: u64,
    timeout: Duration,
    idle_timeout: Option<Duration>,
) -> Result<(), String> {
    {
        let mut ready = identity(dev, pci);
        ready["tool"] = "rxcount".into();
        ready["event"] = "ready".into();
        emit(&ready);
        let (hw_before, _, _, _) = dev.hw_counters();
        let mut batch = Vec::with_capacity(64);
        let (mut good, mut bad, mut other) = (0u64, 0u64, 0u64);
        let mut seen = SeenSeqs::new(count);
        let (mut min_len, mut max_len) = (usize::MAX, 0usize);
        let mut first: Option<Instant> = None;
        let mut last = Instant::now();
        let deadline = Instant::now() + timeout;
        let mut span = common::ReceiveSpan::default();
        // Busy polling runs its own loop of single looks, each marked for
        // the instruction count: a look that found frames is kept with the
        // work on them, an empty one dropped. Hybrid polling waits in the
        // library and is not marked.
        let busy = poller.mode() == PollMode::AlwaysPoll;
        let mut empty_looks = 0u32;
        // One clock read per burst with frames (the last frame's time), and
        // one per 64 empty looks.
        let mut now = Instant::now();
        while good < count {
            if busy {
                // The whole turn of the loop is the look's.
                mark(Mark::BurstBegin);
            }
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                break;
            }
            if let (Some(idle), Some(_)) = (idle_timeout, first)
                && now.duration_since(last) > idle
            {
                break;
            }
            if busy {
                if poller.poll(dev, &mut batch, 64) == 0 {
                    mark(Mark::BurstDrop);
                    empty_looks = empty_looks.wrapping_add(1);
                    if empty_looks.is_multiple_of(64) {
                        now = Instant::now();
                    }
                    std::hint::spin_loop();
                    continue;
                }
            } else {
                let wait = left.min(Duration::from_millis(200));
                let n = poller
                    .recv(dev, &mut batch, 64, wait)
                    .map_err(|e| common::chain(&e))?;
                if n == 0 {
                    now = Instant::now();
                    continue;
                }
            }
            now = Instant::now();
            first.get_or_insert(now);
            last = now;
            for buf in batch.drain(..) {
                let frame = buf.as_slice();
                min_len = min_len.min(frame.len());
                max_len = max_len.max(frame.len());
                if frame.len() >= 14 && frame[12..14] != common::ETHERTYPE_TEST.to_be_bytes() {
                    other += 1;
                    continue;
                }
                match check_frame(frame) {
                    Some(seq) => {
                        good += 1;
                        seen.insert(seq);
                    }
                    None => bad += 1,
                }
            }
            if busy {
                mark(Mark::BurstKeep);
            }
            span.received(good);
        }
        let span_frames = span.end(good);
        let seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
        let stats = dev.stats();
        let (hw_rx, _, _, _) = dev.hw_counters();
        let ps = poller.stats();
        let mut line = identity(dev, pci);
        line["tool"] = "rxcount".into();
        line["expected"] = count.into();
        line["received"] = good.into();
        line["unique"] = seen.len().into();
        line["bad"] = bad.into();
        line["other"] = other.into();
        line["timed_out"] = (good < count).into();
        line["min_len"] = if max_len == 0 { 0 } else { min_len }.into();
        line["max_len"] = max_len.into();
        line["seconds"] = seconds.into();
        line["span_frames"] = span_frames.into();
        line["pps"] = if seconds > 0.0 {
            (good as f64 / seconds).round()
        } else {
            0.0
        }
        .into();
        line["hw_rx_packets"] = hw_rx.wrapping_sub(hw_before).into();
        line["rx_drops"] = stats.rx_drops.into();
        line["rx_errors"] = stats.rx_errors.into();
        line["rx_no_buffer"] = stats.rx_no_buffer.into();
        line["mode"] = format!("{mode:?}").into();
        line["mode_in_use"] = format!("{:?}", ps.mode).into();
        line["irq_error"] = irq_error.into();
        line["poll"] = serde_json::json!({
            "busy_polls": ps.busy_polls, "empty_polls": ps.empty_polls,
            "sleeps": ps.sleeps, "wakeups": ps.wakeups,
            "spurious_wakeups": ps.spurious_wakeups,
        });
        emit(&line);
        Ok(())
    }
}

/// The distinct sequence numbers received: a bit per number below the
/// count expected (a few instructions a frame, where hashing would cost
/// more than the driver's own work), a set for any above it.
struct SeenSeqs {
    bits: Vec<u64>,
    below: u64,
    distinct_below: u64,
    above: HashSet<u32>,
}

impl SeenSeqs {
    fn new(count: u64) -> Self {
        Self {
            bits: vec![0; usize::try_from(count.div_ceil(64)).unwrap_or(0)],
            below: count,
            distinct_below: 0,
            above: HashSet::new(),
        }
    }

    fn insert(&mut self, seq: u32) {
        if u64::from(seq) < self.below {
            let (word, bit) = ((seq / 64) as usize, seq % 64);
            if self.bits[word] & (1 << bit) == 0 {
                self.bits[word] |= 1 << bit;
                self.distinct_below += 1;
            }
        } else {
            self.above.insert(seq);
        }
    }

    fn len(&self) -> u64 {
        self.distinct_below + self.above.len() as u64
    }
}
