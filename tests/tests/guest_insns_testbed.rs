//! The testbed's instruction count (QEMU TCG plugin `vfplane-guest-insns`)
//! against known counts, on a real guest: `insns_calibrate` runs a span of
//! 2,000,000 instructions with a kept burst of 2,000 in it, and an empty
//! span, five times.
//!
//! A count below what the guest executed is a plugin that misses
//! instructions: never allowed. Above it: the other vCPU's and interrupts'
//! instructions in the same span, and a few of the marker calls; the
//! quietest of the five rounds must be within a small margin.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test: a panic is the failure report

use std::time::Duration;

use xtask::testbed::insns::Span;
use xtask::testbed::{GuestOptions, Testbed};

const ROUNDS: usize = 5;
const SPAN: u64 = 2_000_000;
const BURST: u64 = 2_000;

#[test]
fn the_plugin_counts_every_guest_instruction_of_a_span_and_a_burst() {
    if !xtask::e2e::enabled(
        "the_plugin_counts_every_guest_instruction_of_a_span_and_a_burst",
        xtask::e2e::TESTBED,
    ) {
        return;
    }
    let testbed = Testbed::prepare().expect("testbed prepares");
    let options = GuestOptions {
        count_instructions: true,
        // The plugin needs a host thread per vCPU (see GuestOptions).
        single_threaded_tcg: false,
        timeout: Duration::from_secs(300),
        ..GuestOptions::default()
    };
    let script = format!(
        "for i in $(seq {ROUNDS}); do insns_calibrate --iterations {} --burst {}; done",
        SPAN / 2,
        BURST / 2
    );
    let guest = testbed.start(&script, &options).expect("guest starts");
    let last = guest
        .json_line(
            "the last calibration",
            Duration::from_secs(240),
            ROUNDS - 1,
            |v| v["tool"] == "insns_calibrate",
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(last["span_instructions"], SPAN, "{last}");
    assert_eq!(last["burst_instructions"], BURST, "{last}");
    let spans = guest.instruction_spans().expect("the plugin's spans");
    let outcome = guest.wait().expect("guest finishes");
    assert_eq!(outcome.exit_code, 0, "{}", outcome.output);
    eprintln!("spans: {spans:#?}");
    assert_eq!(spans.len(), 2 * ROUNDS, "two spans a round: {spans:?}");
    let (full, empty): (Vec<Span>, Vec<Span>) = spans.chunks(2).map(|p| (p[0], p[1])).unzip();
    for span in &full {
        assert!(
            span.span_instructions >= SPAN,
            "a span counted fewer than it ran: {span:?}"
        );
        assert_eq!(span.bursts, 1, "{span:?}");
        assert!(
            span.burst_instructions >= BURST,
            "a burst counted fewer than it ran: {span:?}"
        );
        assert_eq!(span.dropped_instructions, 0, "{span:?}");
    }
    let quietest_span = full.iter().map(|s| s.span_instructions).min().unwrap();
    let quietest_burst = full.iter().map(|s| s.burst_instructions).min().unwrap();
    let quietest_empty = empty.iter().map(|s| s.span_instructions).min().unwrap();
    eprintln!(
        "quietest of {ROUNDS}: span {quietest_span} (ran {SPAN}), burst {quietest_burst} (ran {BURST}), empty span {quietest_empty}"
    );
    assert!(
        quietest_span <= SPAN + SPAN / 50,
        "span counted {quietest_span} for {SPAN}"
    );
    assert!(
        quietest_burst <= BURST + 64,
        "burst counted {quietest_burst} for {BURST}"
    );
    assert!(quietest_empty <= 64, "an empty span counted {quietest_empty}");
    for span in &empty {
        assert_eq!((span.bursts, span.burst_instructions), (0, 0), "{span:?}");
    }
}
