//! The benchmarks' machinery works: each part's runs, tiny, on the mio loop, move every byte
//! and leave the engine's fault counters at zero (each run checks them itself). Nothing here
//! looks at a time.

use vsock_bench::parts::{engine, latency, relay, setup, streams};
use vsock_bench::rig::Runtime;
use vsock_bench::{median, Goal};

#[test]
fn every_engine_case_runs() {
    for case in engine::Case::ALL {
        engine::count_only(case, 100);
    }
}

#[test]
fn data_moves_both_ways_through_the_device() {
    let g2h = relay::device_g2h(Runtime::Mio, 2 << 20, None);
    assert!(g2h.packets >= 32, "2 MiB in packets of at most 64 KiB");
    let h2g = relay::device_h2g(Runtime::Mio, 2 << 20, None);
    assert!(
        h2g.packets >= (2 << 20) / 4052,
        "4 KiB rx buffers: {} packets",
        h2g.packets
    );
    relay::relay(1 << 20, relay::RX_CHUNK);
}

#[test]
fn paced_guest_still_sends_everything() {
    let run = relay::device_g2h(Runtime::Mio, 1 << 20, Some(2000));
    assert!(run.packets >= 16);
}

#[test]
fn ping_pong_set_up_and_streams_complete() {
    latency::device(Runtime::Mio, 20);
    setup::guest_to_host(Runtime::Mio, 20);
    setup::guest_to_host_batched(Runtime::Mio, 20, 8);
    setup::host_to_guest(Runtime::Mio, 20);
    streams::g2h(Runtime::Mio, 8, 1 << 20);
    streams::h2g(Runtime::Mio, 8, 1 << 20);
}

#[test]
fn medians_and_goals() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    assert!(median(&[]).is_nan());
    assert!(Goal::AtMost(1.5).met(1.5) && !Goal::AtMost(1.5).met(1.6));
    assert!(Goal::AtLeast(1.0).met(1.0) && !Goal::AtLeast(1.0).met(0.9));
    assert!(!Goal::AtMost(1.0).met(f64::NAN));
}
