//! Checks the testbed's instruction count (`vfplane-guest-insns`) against
//! known counts: a span around `--iterations` turns of a two-instruction
//! loop, with a kept burst around the first `--burst` of them, then the
//! same span with nothing in it.
//!
//! `insns_calibrate [--iterations 1000000] [--burst 1000]`
//!
//! Prints one JSON line with the instructions the loops executed; the
//! plugin's spans hold what QEMU counted.

mod common;

use common::{Args, emit, run};
use vfplane_guest_insns::marker::{Mark, SPIN_INSTRUCTIONS, mark, spin};

fn main() {
    run("insns_calibrate", || {
        let args = Args::parse()?;
        let iterations: u64 = args.num("iterations", 1_000_000)?;
        let burst: u64 = args.num("burst", 1_000)?.min(iterations);
        mark(Mark::SpanBegin);
        mark(Mark::BurstBegin);
        spin(burst);
        mark(Mark::BurstKeep);
        spin(iterations - burst);
        mark(Mark::SpanEnd);
        mark(Mark::SpanBegin);
        mark(Mark::SpanEnd);
        emit(&serde_json::json!({
            "tool": "insns_calibrate",
            "span_instructions": iterations * SPIN_INSTRUCTIONS,
            "burst_instructions": burst * SPIN_INSTRUCTIONS,
        }));
        Ok(())
    });
}
