//! Interrupts and kicks: with EVENT_IDX, one interrupt per queue per serve at most and none
//! when the driver's `used_event` says so; without it, correct behaviour all the same. And the
//! work budget: `Served::more` when more chains are queued than one call takes.

mod common;

use std::io::Write;

use common::*;
use virtio_queue::QueueT;
use vsock_core::wire::Op;
use vsock_core::Config;
use vsock_device::testing::{Driver, Layout};

const PORT: u32 = 1234;
const GP: u32 = 45_000;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Sends `n` one-byte packets; the bytes follow `expected_bytes` from `*seq` on.
fn send_seq(bed: &mut Bed, seq: &mut usize, n: usize) {
    for _ in 0..n {
        bed.send(
            pkt(Op::Rw, GP, PORT, 1, 0, 0),
            &[b'a' + (*seq % 26) as u8],
            &Layout::Single,
        );
        *seq += 1;
    }
}

fn send_bytes(bed: &mut Bed, n: usize) {
    send_seq(bed, &mut 0, n);
}

fn expected_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 26) as u8).collect()
}

/// Reads the host application's bytes, serving in between, until `n` arrived (tiny packets
/// fill a Unix socket's buffer long before its byte count says so, so some wait in the
/// engine until the application reads).
fn app_read_n(bed: &mut Bed, conn: vsock_core::ConnId, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..100 {
        out.extend(app_read_all(bed.host.app(conn)));
        if out.len() >= n {
            break;
        }
        bed.run();
    }
    out
}

#[test]
fn event_idx_batches_tx_interrupts_and_honours_used_event() {
    let mut bed = Bed::new();
    assert!(bed.device.event_idx());
    bed.post_rx(8, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    // The driver took every used buffer: used_event is the used index.
    let mut seq = 0;

    // A batch of five tx chains: one interrupt for all of them.
    let notified = bed.device.stats().notifications;
    send_seq(&mut bed, &mut seq, 5);
    let served = bed.serve();
    assert!(served.notify_tx, "the driver asked for the next used entry");
    assert!(!served.notify_rx, "nothing for rx");
    assert_eq!(bed.device.stats().notifications, notified + 1);
    assert_eq!(bed.driver.used_idx(1), bed.queues[1].next_used());

    // The driver has not looked at the used ring (used_event still behind): no interrupt.
    send_seq(&mut bed, &mut seq, 3);
    let served = bed.serve();
    assert!(!served.notify_tx, "used_event is behind the last batch");
    assert_eq!(bed.device.stats().notifications, notified + 1);

    // The driver asks to be interrupted only after three more used entries.
    let used = bed.driver.take_used(1);
    assert_eq!(used.len(), 8);
    let idx = bed.driver.used_idx(1);
    bed.driver.set_used_event(1, idx.wrapping_add(2));
    send_seq(&mut bed, &mut seq, 2);
    assert!(!bed.serve().notify_tx, "entries idx+1, idx+2: not yet");
    send_seq(&mut bed, &mut seq, 1);
    assert!(bed.serve().notify_tx, "entry idx+3 passes used_event");
    send_seq(&mut bed, &mut seq, 1);
    assert!(!bed.serve().notify_tx, "after it, silence again");

    // used_event in the middle of a batch: still one interrupt.
    bed.driver.take_used(1);
    let idx = bed.driver.used_idx(1);
    bed.driver.set_used_event(1, idx.wrapping_add(3));
    send_seq(&mut bed, &mut seq, 6);
    assert!(bed.serve().notify_tx);
    bed.run();
    assert_eq!(app_read_n(&mut bed, conn, seq), expected_bytes(seq));
}

#[test]
fn event_idx_batches_rx_interrupts() {
    let mut bed = Bed::new();
    bed.post_rx(16, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    // Several rx buffers in one serve: one interrupt.
    bed.host
        .app(conn)
        .write_all(&pattern(1, 3 * 4052 + 10))
        .unwrap();
    bed.host.poke(bed.device.engine_mut(), bed.now);
    let used_before = bed.driver.used_idx(0);
    let served = bed.serve();
    assert!(served.notify_rx);
    let used_now = bed.driver.used_idx(0);
    assert_eq!(
        used_now.wrapping_sub(used_before),
        4,
        "four buffers in one serve"
    );
    // Not taken by the driver: no interrupt for more.
    bed.host.app(conn).write_all(b"more").unwrap();
    bed.host.poke(bed.device.engine_mut(), bed.now);
    let served = bed.serve();
    assert!(!served.notify_rx, "used_event is behind");
    assert_ne!(bed.driver.used_idx(0), used_now, "but the buffer was used");
    // Taken: the next one interrupts.
    bed.driver.take_used(0);
    bed.host.app(conn).write_all(b"again").unwrap();
    bed.host.poke(bed.device.engine_mut(), bed.now);
    assert!(bed.serve().notify_rx);
}

#[test]
fn event_idx_asks_for_kicks_only_when_it_needs_them() {
    let mut bed = Bed::new();
    // Out of rx buffers with a RESPONSE to deliver: the device wants the next rx kick.
    bed.host.listening.insert(PORT);
    bed.send(pkt(Op::Request, GP, PORT, 0, 0, 0), &[], &Layout::Single);
    let _ = bed.serve();
    assert_eq!(bed.driver.avail_event(0), bed.queues[0].next_avail());
    bed.driver.post_rx(4096, &Layout::Single).unwrap();
    assert!(bed.driver.kick_needed(0, 1), "rx kick wanted");
    // After draining tx the device wants a kick for the next tx chain.
    assert_eq!(bed.driver.avail_event(1), bed.queues[1].next_avail());
    bed.send(
        pkt(Op::CreditRequest, GP, PORT, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    assert!(bed.driver.kick_needed(1, 1), "tx kick wanted");
    let got = bed.run();
    let ops: Vec<Op> = got.iter().map(|(h, _)| op_of(h)).collect();
    // The RESPONSE carries our credit, which answers the CREDIT_REQUEST too.
    assert_eq!(ops, vec![Op::Response]);
    assert_eq!(bed.driver.in_flight(1), 0);
}

#[test]
fn without_event_idx_every_batch_interrupts_and_flows_are_correct() {
    let mut bed = Bed::with_config(Config::new(GUEST_CID), false);
    assert!(!bed.device.event_idx());
    bed.post_rx(8, &Layout::HeaderThenData);
    let (conn, _) = bed.connect(GP, PORT);
    for round in 0..3 {
        send_bytes(&mut bed, 4);
        let served = bed.serve();
        assert!(
            served.notify_tx,
            "round {round}: interrupt without EVENT_IDX"
        );
        assert_eq!(
            bed.driver.used_flags(1) & VRING_USED_F_NO_NOTIFY,
            0,
            "round {round}: tx kicks enabled again after draining"
        );
    }
    bed.run();
    let mut want = Vec::new();
    for _ in 0..3 {
        want.extend_from_slice(&expected_bytes(4));
    }
    assert_eq!(app_read_n(&mut bed, conn, 12), want);

    let data = pattern(2, 50_000);
    bed.host.app(conn).write_all(&data).unwrap();
    let before = bed.served.len();
    let got = bed.run();
    assert!(
        bed.served[before..].iter().any(|s| s.notify_rx),
        "rx interrupts"
    );
    let received: Vec<u8> = got
        .iter()
        .filter(|(h, _)| op_of(h) == Op::Rw)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(received, data);

    // Out of rx buffers: notifications on, so the driver's next post kicks.
    bed.rx_layout = None;
    bed.host.app(conn).write_all(&pattern(3, 100_000)).unwrap();
    bed.run();
    assert_eq!(bed.driver.in_flight(0), 0, "every rx buffer used");
    bed.host.poke(bed.device.engine_mut(), bed.now);
    let _ = bed.serve();
    assert_eq!(bed.driver.used_flags(0) & VRING_USED_F_NO_NOTIFY, 0);
}

#[test]
fn notifications_are_counted_once_per_flag() {
    let mut bed = Bed::with_config(Config::new(GUEST_CID), false);
    bed.post_rx(8, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    bed.host.app(conn).write_all(&pattern(4, 20_000)).unwrap();
    send_bytes(&mut bed, 10);
    bed.run();
    let flags: u64 = bed
        .served
        .iter()
        .map(|s| u64::from(s.notify_rx) + u64::from(s.notify_tx) + u64::from(s.notify_event))
        .sum();
    assert_eq!(bed.device.stats().notifications, flags);
}

#[test]
fn more_than_a_budget_of_tx_chains_takes_several_serves() {
    let driver = Driver::with_queue_size(1024);
    let mut bed = Bed::with_driver(Config::new(GUEST_CID), true, driver);
    bed.post_rx(8, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    let n = 700;
    send_bytes(&mut bed, n);
    let mut serves = Vec::new();
    let mut taken = Vec::new();
    loop {
        let served = bed.serve();
        let used = bed.driver.take_used(1).len();
        serves.push(served);
        taken.push(used);
        if !served.more {
            break;
        }
        assert!(
            !bed.driver.kick_needed(1, 0)
                || bed.driver.avail_event(1) != bed.queues[1].next_avail(),
            "the device did not re-enable kicks with work left"
        );
        assert!(serves.len() < 10, "the work never finished: {taken:?}");
    }
    assert!(
        serves.len() >= 3,
        "700 chains take several calls: {taken:?}"
    );
    assert!(serves[0].more);
    assert!(taken[0] < n && taken[0] > 0, "{taken:?}");
    assert_eq!(taken.iter().sum::<usize>(), n, "{taken:?}");
    assert!(serves.iter().all(|s| s.notify_tx), "each batch interrupts");
    assert_eq!(bed.driver.in_flight(1), 0);
    bed.run();
    assert_eq!(app_read_n(&mut bed, conn, n), expected_bytes(n));
}

#[test]
fn more_rx_packets_than_a_budget_are_all_delivered_once() {
    let driver = Driver::with_queue_size(1024);
    let mut bed = Bed::with_driver(Config::new(GUEST_CID), true, driver);
    for _ in 0..600 {
        bed.driver.post_rx(4096, &Layout::Single).unwrap();
    }
    bed.host.listening.insert(PORT);
    // 300 connects at once: 300 RESPONSEs owed, more than one budget of rx chains.
    let n = 300u32;
    for i in 0..n {
        bed.send(
            pkt(Op::Request, GP + i, PORT, 0, 0, 0),
            &[],
            &Layout::Single,
        );
    }
    let mut responses = std::collections::BTreeMap::new();
    for round in 0.. {
        assert!(round < 20, "the work never finished");
        let served = bed.serve();
        for u in bed.driver.take_used(0) {
            let (h, _) = vsock_device::testing::parse_rx(&u);
            assert_eq!(op_of(&h), Op::Response);
            *responses.entry(h.dst_port.get()).or_insert(0) += 1;
        }
        bed.driver.take_used(1);
        if !served.more {
            break;
        }
    }
    assert_eq!(responses.len(), n as usize, "every connect answered");
    assert!(responses.values().all(|&c| c == 1), "each once");
    assert_eq!(bed.queues[0].next_used(), bed.queues[0].next_avail());
    assert_eq!(bed.driver.in_flight(0), 600 - n as usize);
}
