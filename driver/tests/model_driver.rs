//! The igbvf driver against the in-memory 82576 VF model: bring-up and the
//! PF mailbox (ACK, NACK, pings, timeouts), RX and TX rings (wrap-around,
//! full rings, buffer exhaustion, reclaim), the model's IOMMU, hybrid polling.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers: a panic is the failure report

use std::time::{Duration, Instant};

use proptest::prelude::*;
use vfplane_driver::igbvf::{IgbVf, IgbVfConfig, IgbVfError, MacSource, multicast_hash};
use vfplane_driver::mailbox::{MailboxError, MailboxTiming};
use vfplane_driver::model::{Model, ModelConfig, ModelRegisters, PfBehaviour, PfConfig};
use vfplane_driver::poll::{PollError, PollMode, Poller, RxInterrupts};
use vfplane_driver::{MacAddress, NicDevice, PacketBuf};

const PF_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fn fast_config() -> IgbVfConfig {
    IgbVfConfig {
        rx_ring_size: 8,
        tx_ring_size: 8,
        pool_entries: 64,
        mailbox: MailboxTiming {
            timeout: Duration::from_millis(30),
            poll_interval: Duration::from_micros(50),
        },
        reset_timeout: Duration::from_millis(30),
        reset_settle: Duration::ZERO,
        ..IgbVfConfig::default()
    }
}

fn model_with(pf: PfConfig) -> Model {
    Model::new(ModelConfig {
        pf,
        ..ModelConfig::default()
    })
}

fn up(model: &Model, config: &IgbVfConfig) -> IgbVf<ModelRegisters> {
    IgbVf::new(model.registers(), &model.dma(), config).expect("device starts on the model")
}

fn frame(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&PF_MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32 ^ seq) as u8;
    }
    f
}

fn seq_of(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[14], bytes[15], bytes[16], bytes[17]])
}

fn packets(dev: &IgbVf<ModelRegisters>, frames: impl IntoIterator<Item = Vec<u8>>) -> Vec<PacketBuf> {
    frames
        .into_iter()
        .map(|f| {
            let mut buf = dev.mempool().alloc().expect("pool has room");
            buf.set_len(f.len());
            buf.as_mut_slice().copy_from_slice(&f);
            buf
        })
        .collect()
}

#[test]
fn pf_assigned_mac_is_used() {
    let model = model_with(PfConfig {
        assigned_mac: Some(PF_MAC),
        ..PfConfig::default()
    });
    let dev = up(&model, &fast_config());
    assert_eq!(dev.mac(), MacAddress(PF_MAC));
    assert_eq!(dev.mac_source(), MacSource::Pf);
    let msgs = model.vf_messages();
    assert_eq!(msgs.len(), 1, "only RESET: {msgs:x?}");
    assert_eq!(msgs[0][0], 0x01);
    assert!(dev.link().up);
    assert_eq!(dev.link().speed_mbps, 1000);
}

#[test]
fn reset_nack_leads_to_a_random_local_mac_the_pf_accepts() {
    let model = model_with(PfConfig::default());
    let dev = up(&model, &fast_config());
    assert_eq!(dev.mac_source(), MacSource::Random);
    assert!(dev.mac().is_local_unicast(), "{}", dev.mac());
    assert_eq!(model.pf_mac(), Some(dev.mac().0));
    let msgs = model.vf_messages();
    assert_eq!(msgs[1][0], 0x02, "SET_MAC_ADDR follows the NACK");
}

#[test]
fn configured_mac_refused_by_an_admin_set_pf_is_an_error() {
    let model = model_with(PfConfig {
        assigned_mac: Some(PF_MAC),
        admin_mac: true,
        ..PfConfig::default()
    });
    let config = IgbVfConfig {
        mac: Some(MacAddress([0x02, 1, 2, 3, 4, 5])),
        ..fast_config()
    };
    let err = IgbVf::new(model.registers(), &model.dma(), &config).unwrap_err();
    assert!(matches!(err, IgbVfError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("administrator"));
}

#[test]
fn silent_pf_times_out_instead_of_hanging() {
    let model = model_with(PfConfig {
        behaviour: PfBehaviour::Silent,
        ..PfConfig::default()
    });
    let started = Instant::now();
    let err = IgbVf::new(model.registers(), &model.dma(), &fast_config()).unwrap_err();
    assert!(
        matches!(
            err,
            IgbVfError::Mailbox {
                source: MailboxError::AckTimeout { msg_type: 1, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn pf_that_acks_but_never_replies_times_out() {
    let model = model_with(PfConfig {
        behaviour: PfBehaviour::AckOnly,
        ..PfConfig::default()
    });
    let err = IgbVf::new(model.registers(), &model.dma(), &fast_config()).unwrap_err();
    assert!(
        matches!(
            err,
            IgbVfError::Mailbox {
                source: MailboxError::ReplyTimeout { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_lost_reply_is_retried_from_the_reset() {
    let model = model_with(PfConfig {
        lose_first_replies: 1,
        ..PfConfig::default()
    });
    let dev = up(&model, &fast_config());
    let resets = model.vf_messages().iter().filter(|m| m[0] == 0x01).count();
    assert_eq!(resets, 2, "RESET sent again after the lost reply");
    assert_eq!(model.pf_mac(), Some(dev.mac().0));

    let model = model_with(PfConfig {
        lose_first_replies: 5,
        ..PfConfig::default()
    });
    let err = IgbVf::new(model.registers(), &model.dma(), &fast_config()).unwrap_err();
    assert!(
        matches!(err, IgbVfError::Mailbox { .. }),
        "bounded retries: {err:?}"
    );
    assert_eq!(model.vf_messages().len(), 3, "three attempts, no more");
}

#[test]
fn pf_stuck_in_reset_times_out() {
    let model = model_with(PfConfig {
        reset_reads: u32::MAX,
        ..PfConfig::default()
    });
    let err = IgbVf::new(model.registers(), &model.dma(), &fast_config()).unwrap_err();
    assert!(matches!(err, IgbVfError::ResetTimeout(_)), "{err:?}");
}

#[test]
fn pings_during_requests_and_after_are_tolerated() {
    let model = model_with(PfConfig {
        ping_before_reply: true,
        ..PfConfig::default()
    });
    let config = IgbVfConfig {
        max_frame: 9000,
        ..fast_config()
    };
    let mut dev = up(&model, &config);
    // RESET, SET_MAC_ADDR and SET_LPE each had a ping before the reply.
    assert_eq!(dev.pf_pings(), 3);
    model.pf_ping();
    assert_eq!(dev.service_mailbox(), 1);
    assert_eq!(dev.pf_pings(), 4);
    assert_eq!(dev.service_mailbox(), 0);
}

#[test]
fn lpe_and_multicast_reach_the_pf() {
    let model = model_with(PfConfig::default());
    let groups = [
        MacAddress([0x01, 0x00, 0x5e, 0x00, 0x00, 0x01]),
        MacAddress([0x01, 0x00, 0x5e, 0x7f, 0xff, 0xfa]),
        MacAddress([0x33, 0x33, 0x00, 0x00, 0x00, 0xfb]),
    ];
    let config = IgbVfConfig {
        max_frame: 9018,
        multicast: groups.to_vec(),
        ..fast_config()
    };
    let mut dev = up(&model, &config);
    assert_eq!(model.max_frame(), 9018);
    let expected: Vec<u16> = groups.iter().map(|m| multicast_hash(*m)).collect();
    assert_eq!(model.multicast_hashes(), expected);
    dev.set_multicast(&groups[..1]).unwrap();
    assert_eq!(model.multicast_hashes(), expected[..1]);
    let too_many = vec![groups[0]; 31];
    assert!(dev.set_multicast(&too_many).is_err());
}

#[test]
fn bad_configuration_is_refused() {
    let model = model_with(PfConfig::default());
    for config in [
        IgbVfConfig {
            rx_ring_size: 100,
            ..fast_config()
        },
        IgbVfConfig {
            pool_entries: 8,
            ..fast_config()
        },
        IgbVfConfig {
            max_frame: 20_000,
            ..fast_config()
        },
    ] {
        assert!(matches!(
            IgbVf::new(model.registers(), &model.dma(), &config),
            Err(IgbVfError::Config(_))
        ));
    }
}

#[test]
fn tx_sends_exact_bytes_and_counts() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(i, 60 + i as usize * 100)).collect();
    let mut batch = packets(&dev, frames.clone());
    assert_eq!(dev.tx_burst(&mut batch), 5);
    assert!(batch.is_empty());
    assert_eq!(model.take_sent(), frames);
    let stats = dev.stats();
    assert_eq!(stats.tx_packets, 5);
    assert_eq!(stats.tx_bytes, frames.iter().map(|f| f.len() as u64).sum::<u64>());
    let (_, gptc, _, gotc) = dev.hw_counters();
    assert_eq!((gptc, u64::from(gotc)), (5, stats.tx_bytes));
}

#[test]
fn tx_full_ring_keeps_the_rest_and_reclaim_frees_buffers() {
    let model = Model::new(ModelConfig {
        tx_paused: true,
        ..ModelConfig::default()
    });
    let mut dev = up(&model, &fast_config());
    let pool = dev.mempool().clone();
    let free_at_start = pool.free_count();
    let mut batch = packets(&dev, (0..20).map(|i| frame(i, 64)));
    // A ring of 8 holds 7 in flight.
    assert_eq!(dev.tx_burst(&mut batch), 7);
    assert_eq!(batch.len(), 13);
    assert_eq!(dev.tx_burst(&mut batch), 0, "nothing done, nothing reclaimed");
    assert_eq!(dev.tx_in_flight(), 7);
    model.resume_tx();
    assert_eq!(model.sent_count(), 7);
    assert_eq!(dev.tx_burst(&mut batch), 7, "reclaim made room");
    assert_eq!(dev.tx_burst(&mut batch), 6);
    assert!(batch.is_empty());
    assert_eq!(dev.tx_reclaim_all(), 6);
    assert_eq!(dev.tx_in_flight(), 0);
    assert_eq!(pool.free_count(), free_at_start);
    let sent: Vec<u32> = model.take_sent().iter().map(|f| seq_of(f)).collect();
    assert_eq!(sent, (0..20).collect::<Vec<_>>(), "in order, across wrap-around");
}

#[test]
fn tx_refuses_empty_frames() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let empty = dev.mempool().alloc().unwrap();
    let mut batch = vec![empty];
    assert_eq!(dev.tx_burst(&mut batch), 1);
    assert_eq!(dev.stats().tx_drops, 1);
    assert_eq!(model.sent_count(), 0);
}

#[test]
fn rx_wraps_around_many_times_in_order() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let mut out = Vec::with_capacity(64);
    let mut next = 0u32;
    for round in 0..50u32 {
        let n = 1 + round % 7;
        for k in 0..n {
            assert!(model.inject(&frame(next + k, 64 + (k as usize % 3) * 500)));
        }
        assert_eq!(dev.rx_burst(&mut out, 64), n as usize);
        for (k, buf) in out.drain(..).enumerate() {
            assert_eq!(
                buf.as_slice(),
                frame(next + k as u32, 64 + (k % 3) * 500).as_slice()
            );
        }
        next += n;
    }
    assert_eq!(dev.stats().rx_packets, u64::from(next));
    assert_eq!(model.rx_missed(), 0);
}

#[test]
fn rx_ring_full_drops_at_the_device() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    // RDT = 7: the device may fill 7 of 8 descriptors.
    let accepted = (0..10).filter(|&i| model.inject(&frame(i, 64))).count();
    assert_eq!(accepted, 7);
    assert_eq!(model.rx_missed(), 3);
    let mut out = Vec::with_capacity(16);
    assert_eq!(dev.rx_burst(&mut out, 16), 7);
    assert!(model.inject(&frame(99, 64)));
}

#[test]
fn rx_burst_respects_max_and_capacity() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    for i in 0..6 {
        model.inject(&frame(i, 64));
    }
    let mut out = Vec::with_capacity(4);
    assert_eq!(dev.rx_burst(&mut out, 2), 2);
    assert_eq!(dev.rx_burst(&mut out, 100), 2, "only spare capacity");
    out.clear();
    assert_eq!(dev.rx_burst(&mut out, 100), 2);
}

#[test]
fn rx_buffer_exhaustion_stalls_then_recovers() {
    let model = model_with(PfConfig::default());
    let config = IgbVfConfig {
        pool_entries: 8 + 3,
        ..fast_config()
    };
    let mut dev = up(&model, &config);
    let mut held = Vec::with_capacity(64);
    for i in 0..7 {
        assert!(model.inject(&frame(i, 64)));
    }
    // Three spare buffers: three frames come out, then the pool is empty.
    assert_eq!(dev.rx_burst(&mut held, 64), 3);
    assert_eq!(dev.rx_burst(&mut held, 64), 0);
    assert!(dev.stats().rx_no_buffer >= 1);
    assert_eq!(dev.mempool().free_count(), 0);
    // The frames stay on the ring; the ring refills from the device's view.
    let first: Vec<u32> = held.drain(..).map(|b| seq_of(b.as_slice())).collect();
    assert_eq!(first, [0, 1, 2]);
    let mut out = Vec::with_capacity(64);
    assert_eq!(dev.rx_burst(&mut out, 64), 3);
    out.clear();
    assert_eq!(dev.rx_burst(&mut out, 64), 1);
    assert_eq!(seq_of(out[0].as_slice()), 6);
}

#[test]
fn oversized_frames_spanning_buffers_are_dropped() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    assert!(model.inject(&frame(1, 3000)));
    assert!(model.inject(&frame(2, 100)));
    let mut out = Vec::with_capacity(8);
    assert_eq!(dev.rx_burst(&mut out, 8), 1);
    assert_eq!(seq_of(out[0].as_slice()), 2);
    assert_eq!(dev.stats().rx_drops, 2, "both descriptors of the big frame");
}

#[test]
fn fcs_bytes_show_in_length_when_the_pf_keeps_them() {
    let model = Model::new(ModelConfig {
        append_fcs: true,
        ..ModelConfig::default()
    });
    let mut dev = up(&model, &fast_config());
    model.inject(&frame(1, 60));
    let mut out = Vec::with_capacity(8);
    dev.rx_burst(&mut out, 8);
    assert_eq!(out[0].len(), 64);
}

#[test]
fn descriptor_at_unmapped_iova_is_refused_by_the_model_iommu() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let bad = 0x4000_0000u64;
    // SAFETY: no DMA mapping of the device covers `bad` (the model's IOMMU
    // refusing it is what is tested).
    assert!(unsafe { dev.tx_raw_descriptor_for_isolation_test(bad, 64) });
    assert_eq!(model.dma_faults(), [bad]);
    assert_eq!(model.sent_count(), 0);
    // The driver carries on.
    let mut batch = packets(&dev, [frame(7, 64)]);
    assert_eq!(dev.tx_burst(&mut batch), 1);
    assert_eq!(model.take_sent(), [frame(7, 64)]);
}

#[test]
fn link_down_is_reported_and_waited_for_with_a_bound() {
    let model = Model::new(ModelConfig {
        link_down: true,
        ..ModelConfig::default()
    });
    let mut dev = up(&model, &fast_config());
    assert!(!dev.link().up);
    assert!(matches!(
        dev.wait_for_link(Duration::from_millis(30)),
        Err(IgbVfError::LinkDown(_))
    ));
    model.set_link(true);
    assert!(dev.wait_for_link(Duration::from_millis(30)).unwrap().up);
}

#[test]
fn dropping_the_device_stops_dma_and_returns_memory() {
    let model = model_with(PfConfig::default());
    let dev = up(&model, &fast_config());
    drop(dev);
    assert!(!model.inject(&frame(1, 64)), "RX queue disabled");
    assert_eq!(
        model.peek(vfplane_driver::regs::txdctl(0)) & vfplane_driver::regs::QUEUE_ENABLE,
        0
    );
}

#[test]
fn hybrid_poller_sleeps_when_idle_and_wakes_on_frames() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    dev.enable_rx_interrupt().unwrap();
    let mut poller = Poller::new(PollMode::Hybrid { idle_polls: 16 });
    let mut out = Vec::with_capacity(8);
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(20))
            .unwrap(),
        0
    );
    assert!(poller.stats().sleeps >= 1);
    assert!(poller.stats().empty_polls >= 16);
    model.inject(&frame(1, 64));
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(20))
            .unwrap(),
        1
    );
    // Armed, a frame raises the interrupt; disarmed, it does not.
    dev.arm_rx_interrupt();
    model.inject(&frame(2, 64));
    assert_eq!(model.interrupts(), 1);
    dev.disarm_rx_interrupt();
    model.inject(&frame(3, 64));
    assert_eq!(model.interrupts(), 1);

    let mut always = Poller::new(PollMode::AlwaysPoll);
    out.clear();
    assert_eq!(
        always
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        2
    );
    assert_eq!(
        always
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        0
    );
    assert_eq!(always.stats().sleeps, 0);
}

#[test]
fn one_look_polls_are_counted_and_never_wait() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let mut poller = Poller::new(PollMode::Hybrid { idle_polls: 1 });
    let mut out = Vec::with_capacity(8);
    for _ in 0..3 {
        assert_eq!(poller.poll(&mut dev, &mut out, 8), 0);
    }
    model.inject(&frame(1, 64));
    model.inject(&frame(2, 64));
    assert_eq!(poller.poll(&mut dev, &mut out, 8), 2);
    assert_eq!(
        out.iter().map(|b| seq_of(b.as_slice())).collect::<Vec<_>>(),
        [1, 2]
    );
    let stats = poller.stats();
    assert_eq!((stats.empty_polls, stats.busy_polls, stats.sleeps), (3, 1, 0));
}

#[test]
fn hybrid_polling_without_an_interrupt_falls_back_to_busy_polling_and_says_why() {
    let model = Model::new(ModelConfig {
        no_msix: true,
        ..ModelConfig::default()
    });
    let mut dev = up(&model, &fast_config());
    let hybrid = PollMode::Hybrid { idle_polls: 16 };
    let mut poller = Poller::for_device(&mut dev, hybrid);
    assert_eq!(poller.mode(), PollMode::AlwaysPoll);
    assert_eq!(
        poller.stats().mode,
        PollMode::AlwaysPoll,
        "the stats show the mode in use"
    );
    let fallback = poller.fallback().expect("the fallback is kept");
    assert_eq!(fallback.requested, hybrid);
    assert!(
        matches!(fallback.reason, PollError::NoMsix),
        "{:?}",
        fallback.reason
    );
    // It still receives, and busy-polls instead of sleeping.
    let mut out = Vec::with_capacity(8);
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        0
    );
    model.inject(&frame(1, 64));
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        1
    );
    assert_eq!(poller.stats().sleeps, 0);
    assert_eq!(model.interrupt_waits(), 0);

    // Busy polling asked for needs no interrupt, and is no fallback.
    let always = Poller::for_device(&mut dev, PollMode::AlwaysPoll);
    assert!(always.fallback().is_none());
}

#[test]
fn idle_hybrid_poller_sleeps_and_a_frame_wakes_it() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let mut poller = Poller::for_device(&mut dev, PollMode::Hybrid { idle_polls: 16 });
    assert!(poller.fallback().is_none());
    assert_eq!(poller.stats().mode, PollMode::Hybrid { idle_polls: 16 });
    let mut out = Vec::with_capacity(8);

    // Idle: it spins 16 empty polls, then sleeps until the deadline.
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        0
    );
    let idle = poller.stats();
    assert_eq!(idle.sleeps, 1, "{idle:?}");
    assert_eq!(idle.wakeups, 0);
    assert_eq!(idle.empty_polls, 16);
    assert_eq!(model.interrupt_waits(), 1);

    // Still idle: the next call looks once and sleeps again, no spinning.
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        0
    );
    let still = poller.stats();
    assert_eq!(still.sleeps, 2);
    assert_eq!(still.empty_polls, idle.empty_polls + 1, "{still:?}");

    // A frame while it sleeps: the interrupt wakes it and it receives.
    model.arrive_during_next_sleep(&frame(7, 64));
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_secs(5))
            .unwrap(),
        1
    );
    assert_eq!(seq_of(out[0].as_slice()), 7);
    let woke = poller.stats();
    assert_eq!(woke.sleeps, 3);
    assert_eq!(woke.wakeups, 1, "{woke:?}");
    assert_eq!(woke.spurious_wakeups, 0);
    assert_eq!(model.interrupts(), 1);
    // Masked again once awake: a frame now raises no interrupt.
    model.inject(&frame(8, 64));
    assert_eq!(model.interrupts(), 1);
}

#[test]
fn frames_taken_while_masked_do_not_wake_the_next_sleep() {
    let model = model_with(PfConfig::default());
    let mut dev = up(&model, &fast_config());
    let mut poller = Poller::for_device(&mut dev, PollMode::Hybrid { idle_polls: 4 });
    let mut out = Vec::with_capacity(8);
    // Frames arrive and are taken while the vector is masked (busy
    // polling): each latches the queue's cause in EICR.
    for seq in 0..3 {
        model.inject(&frame(seq, 64));
        assert_eq!(
            poller
                .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
                .unwrap(),
            1
        );
    }
    assert_eq!(
        model.peek(vfplane_driver::regs::EICR) & 1,
        1,
        "the cause is latched"
    );
    // An interrupt that fired after a wake left a count on the eventfd.
    model.signal_stale_interrupt();
    // Idle now: it sleeps, and neither the latched cause nor the stale
    // count ends the sleep.
    assert_eq!(
        poller
            .recv(&mut dev, &mut out, 8, Duration::from_millis(5))
            .unwrap(),
        0
    );
    let stats = poller.stats();
    assert_eq!(stats.sleeps, 1, "{stats:?}");
    assert_eq!(stats.wakeups, 0, "no spurious wakeup: {stats:?}");
    assert_eq!(stats.spurious_wakeups, 0);
    assert_eq!(model.interrupts(), 0, "unmasking sent no message for old causes");
}

#[derive(Debug, Clone)]
enum Op {
    Inject(u8),
    Rx(u8),
    Tx(u8),
    DropHeld,
    PauseTx(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..20).prop_map(Op::Inject),
        (1u8..20).prop_map(Op::Rx),
        (1u8..20).prop_map(Op::Tx),
        Just(Op::DropHeld),
        any::<bool>().prop_map(Op::PauseTx),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the interleaving: frames come out in order with their
    /// bytes, every injected frame is either received, still on the ring or
    /// counted missed, frames sent leave in order, and no buffer is lost.
    #[test]
    fn rings_keep_order_and_buffers_are_conserved(ops in proptest::collection::vec(op(), 1..80)) {
        let model = model_with(PfConfig::default());
        let config = IgbVfConfig { pool_entries: 24, ..fast_config() };
        let mut dev = up(&model, &config);
        let pool = dev.mempool().clone();
        let mut held: Vec<PacketBuf> = Vec::with_capacity(256);
        let mut injected = 0u32;
        let mut accepted: Vec<u32> = Vec::new();
        let mut received: Vec<u32> = Vec::new();
        let mut to_send = 0u32;
        let mut queued: Vec<u32> = Vec::new();
        for op in ops {
            match op {
                Op::Inject(n) => for _ in 0..n {
                    if model.inject(&frame(injected, 60 + injected as usize % 200)) {
                        accepted.push(injected);
                    }
                    injected += 1;
                },
                Op::Rx(n) => {
                    let before = held.len();
                    dev.rx_burst(&mut held, usize::from(n));
                    for buf in &held[before..] {
                        let seq = seq_of(buf.as_slice());
                        let expected = frame(seq, 60 + seq as usize % 200);
                        prop_assert_eq!(buf.as_slice(), expected.as_slice());
                        received.push(seq);
                    }
                }
                Op::Tx(n) => {
                    let mut batch = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        let Some(mut buf) = pool.alloc() else { break };
                        let f = frame(1_000_000 + to_send, 64);
                        buf.set_len(f.len());
                        buf.as_mut_slice().copy_from_slice(&f);
                        batch.push(buf);
                        to_send += 1;
                    }
                    let first = to_send - batch.len() as u32;
                    let took = dev.tx_burst(&mut batch);
                    queued.extend((0..took as u32).map(|k| 1_000_000 + first + k));
                    // Frames not taken are dropped here: renumber.
                    to_send -= batch.len() as u32;
                }
                Op::DropHeld => held.clear(),
                Op::PauseTx(p) => model.pause_tx(p),
            }
            // Conservation: free + RX ring (8) + TX in flight + held == pool.
            prop_assert_eq!(
                pool.free_count() + 8 + dev.tx_in_flight() + held.len(),
                pool.capacity()
            );
        }
        prop_assert_eq!(&received[..], &accepted[..received.len()]);
        prop_assert_eq!(accepted.len() as u64 + model.rx_missed(), u64::from(injected));
        model.resume_tx();
        let sent: Vec<u32> = model.take_sent().iter().map(|f| seq_of(f)).collect();
        prop_assert_eq!(sent, queued);
    }
}
