//! Device reset in the middle of transfers, and save/restore: no descriptor is leaked, every
//! host socket is closed, the guest hears exactly one TRANSPORT_RESET after a restore, and
//! the device serves new connections afterwards.

mod common;

use std::io::Write;

use common::*;
use virtio_queue::QueueT;
use vsock_core::wire::Op;
use vsock_core::{Config, ConnId, Instant};
use vsock_device::testing::{Layout, RawDesc};
use vsock_device::{DeviceError, VsockDevice};

const PORT: u32 = 1234;

/// Reads what the host application has, and whether the socket then reported end of file.
fn app_drain(bed: &mut Bed, conn: ConnId) -> (Vec<u8>, bool) {
    app_read(bed.host.app(conn))
}

fn assert_holds_nothing(bed: &Bed, when: &str) {
    for (q, queue) in bed.queues.iter().enumerate() {
        assert_eq!(
            queue.next_avail(),
            queue.next_used(),
            "{when}: queue {q}: popped {} returned {}",
            queue.next_avail(),
            queue.next_used()
        );
        assert_eq!(
            bed.driver.used_idx(q),
            queue.next_used(),
            "{when}: queue {q}: published used index"
        );
    }
}

/// Opens a connection and checks data flows both ways on it.
fn new_connection_works(bed: &mut Bed, gp: u32, when: &str) -> ConnId {
    let (conn, _) = bed.connect(gp, PORT);
    bed.send(pkt(Op::Rw, gp, PORT, 4, 0, 0), b"ping", &Layout::Single);
    bed.run();
    assert_eq!(app_drain(bed, conn).0, b"ping", "{when}: guest to host");
    bed.host.app(conn).write_all(b"pong").unwrap();
    let got = bed.run();
    let back: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == gp && op_of(h) == Op::Rw)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(back, b"pong", "{when}: host to guest");
    conn
}

#[test]
fn reset_mid_transfer_leaks_no_descriptor_and_closes_every_socket() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::HeaderThenData);
    let (a, _) = bed.connect(42_000, PORT);
    let (b, _) = bed.connect(42_001, PORT);
    let now = bed.now;
    let accepted = bed.host.accept(bed.device.engine_mut(), now);
    let (c, _) = bed.connect(42_002, PORT);

    // Guest data the socket of `a` cannot take: it waits in the engine.
    small_send_buffer(&bed, a);
    let data = pattern(1, 60_000);
    for chunk in data.chunks(15_000) {
        bed.send(
            pkt(Op::Rw, 42_000, PORT, chunk.len() as u32, 0, 0),
            chunk,
            &Layout::Single,
        );
    }
    // Host data for `b`, more than the posted rx buffers hold.
    bed.host.app(b).write_all(&pattern(2, 100_000)).unwrap();
    bed.host.poke(bed.device.engine_mut(), now);
    // One serve: mid-transfer.
    let _ = bed.serve();
    assert!(bed.device.engine().stats().tx_buffered_bytes > 0);
    let rx_used = bed.driver.take_used(0);
    assert!(!rx_used.is_empty(), "some host data reached the guest");
    assert_eq!(bed.driver.take_used(1).len(), 4);
    assert_eq!(bed.driver.in_flight(1), 0, "every posted tx chain was used");
    // Leave rx buffers posted and a tx packet the device has not seen yet.
    bed.driver.post_rx(4096, &Layout::Single).unwrap();
    bed.send(pkt(Op::Rw, 42_001, PORT, 4, 0, 0), b"late", &Layout::Single);
    let rx_posted = bed.driver.in_flight(0);
    assert!(rx_posted > 0);

    bed.device.reset(bed.now);
    assert!(!bed.device.is_activated());
    assert_eq!(bed.device.acked_features(), 0);
    assert_holds_nothing(&bed, "after reset");
    // Serving a reset device is refused, but the sockets it owes a close are closed.
    match bed.try_serve() {
        Err(DeviceError::NotActivated) => {}
        other => panic!("serve on a reset device: {other:?}"),
    }
    assert_holds_nothing(&bed, "after a serve on the reset device");
    assert_eq!(bed.driver.in_flight(0), rx_posted, "no rx buffer was taken");
    let mut closed = bed.host.closed.clone();
    closed.sort_by_key(|c| c.to_raw());
    let mut all = vec![a, b, c, accepted];
    all.sort_by_key(|c| c.to_raw());
    assert_eq!(closed, all, "every host socket closed");
    assert!(bed.host.socks.is_empty());
    assert_eq!(bed.device.engine().connections(), 0);
    for conn in all {
        assert!(app_drain(&mut bed, conn).1, "{conn}: application sees EOF");
    }

    // The driver starts over on fresh rings; the device serves new connections.
    bed.reactivate(true);
    assert_holds_nothing(&bed, "after re-activation");
    let conn = new_connection_works(&mut bed, 42_000, "after reset");
    assert!(!bed.host.closed.contains(&conn));
    assert_eq!(bed.driver.take_used(2).len(), 0, "no event after a reset");
}

#[test]
fn reset_of_an_idle_or_inactive_device_is_harmless() {
    let mut bed = Bed::new();
    bed.device.reset(bed.now);
    bed.device.reset(bed.now);
    assert!(matches!(bed.try_serve(), Err(DeviceError::NotActivated)));
    bed.reactivate(false);
    bed.post_rx(4, &Layout::Single);
    new_connection_works(&mut bed, 42_100, "after idle reset");
}

#[test]
fn reset_drops_an_owed_transport_reset() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::Single);
    let state = bed.save();
    bed.restore(&state);
    bed.device.reset(bed.now);
    bed.reactivate(true);
    bed.driver.post_event().unwrap();
    let _ = bed.serve();
    assert!(
        bed.driver.take_used(2).is_empty(),
        "the new driver gets no stale event"
    );
}

/// Takes the used event buffers and checks they are exactly `n` TRANSPORT_RESETs.
fn assert_transport_resets(bed: &mut Bed, n: usize, when: &str) {
    let used = bed.driver.take_used(2);
    assert_eq!(used.len(), n, "{when}: events: {used:?}");
    for u in used {
        assert_eq!(u.len, 4, "{when}: event used length");
        assert_eq!(u.bytes, 0u32.to_le_bytes(), "{when}: TRANSPORT_RESET id");
    }
}

#[test]
fn restore_in_place_continues_the_queues_and_resets_the_transport_once() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::Single);
    let old = new_connection_works(&mut bed, 43_000, "before save");
    bed.driver.post_event().unwrap();
    // Work the device has not seen at save time: continues after the restore.
    bed.send(
        pkt(Op::Request, 43_001, PORT, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    bed.send(
        pkt(Op::Rw, 43_000, PORT, 5, 0, 0),
        b"stale",
        &Layout::Single,
    );

    let before: Vec<_> = bed.queues.iter().map(|q| q.state()).collect();
    let state = bed.save();
    assert_eq!(state.guest_cid, GUEST_CID);
    assert!(state.activated);
    assert_eq!(state.acked_features, bed.device.acked_features());
    assert_eq!(state.queues.to_vec(), before);

    let queues = bed.device.restore(bed.now, &state).unwrap();
    for (q, queue) in queues.iter().enumerate() {
        assert_eq!(queue.state(), before[q], "queue {q} restored as saved");
    }
    bed.queues = queues;
    let got = bed.run();
    assert_transport_resets(&mut bed, 1, "after restore");
    assert_eq!(bed.device.stats().event_chains, 1);

    // The old connection is gone on the host side, without an RST of ours (the guest dropped
    // it on the transport reset); its late packet is answered as unknown.
    assert_eq!(bed.host.closed, vec![old]);
    let (stale, eof) = app_drain(&mut bed, old);
    assert!(stale.is_empty(), "the stale packet reached no socket");
    assert!(eof, "the old host socket was closed");
    let to_old: Vec<Op> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == 43_000)
        .map(|(h, _)| op_of(h))
        .collect();
    assert_eq!(to_old, vec![Op::Rst], "{got:?}");
    // The REQUEST posted before the save was served after the restore.
    let answer: Vec<Op> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == 43_001)
        .map(|(h, _)| op_of(h))
        .collect();
    assert_eq!(answer, vec![Op::Response]);
    assert_eq!(bed.driver.in_flight(1), 0, "every tx chain came back");

    // The guest connects again, even from the old port.
    new_connection_works(&mut bed, 43_000, "after restore");
    // Exactly one event: a later buffer stays unused.
    bed.driver.post_event().unwrap();
    bed.run();
    assert_transport_resets(&mut bed, 0, "later");
    assert_eq!(bed.driver.in_flight(2), 1);
}

#[test]
fn transport_reset_waits_for_an_event_buffer_posted_after_the_restore() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::Single);
    let old = new_connection_works(&mut bed, 43_100, "before save");
    let state = bed.save();
    bed.restore(&state);
    for _ in 0..3 {
        let served = bed.serve();
        assert!(!served.notify_event);
    }
    assert_eq!(bed.device.stats().event_chains, 0);
    assert_eq!(bed.host.closed, vec![old], "sockets close without waiting");

    bed.driver.post_event().unwrap();
    let served = bed.serve();
    assert!(
        served.notify_event,
        "the guest is interrupted for the event"
    );
    assert_transport_resets(&mut bed, 1, "posted after restore");
    bed.driver.post_event().unwrap();
    let served = bed.serve();
    assert!(!served.notify_event);
    assert_transport_resets(&mut bed, 0, "second buffer");
    new_connection_works(&mut bed, 43_100, "after restore");
}

#[test]
fn a_malformed_event_buffer_is_returned_and_the_next_one_gets_the_event() {
    let mut bed = Bed::new();
    let state = bed.save();
    bed.restore(&state);
    let bad = [
        // Read-only.
        vec![RawDesc {
            addr: vsock_device::testing::SCRATCH,
            len: 4,
            flags: 0,
        }],
        // Too short for an event.
        vec![RawDesc {
            addr: vsock_device::testing::SCRATCH,
            len: 3,
            flags: 2,
        }],
        // Outside guest memory.
        vec![RawDesc {
            addr: vsock_device::testing::MEM_SIZE,
            len: 4,
            flags: 2,
        }],
    ];
    let mut heads = Vec::new();
    for chain in &bad {
        heads.push(bed.driver.post_raw(2, chain).unwrap());
    }
    let good = bed.driver.post_event().unwrap();
    let served = bed.serve();
    assert!(served.notify_event);
    let used = bed.driver.take_used(2);
    let got: Vec<(u16, u32)> = used.iter().map(|u| (u.head, u.len)).collect();
    let mut want: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 0)).collect();
    want.push((good, 4));
    assert_eq!(got, want, "bad buffers back empty, then the event");
    assert_eq!(bed.device.stats().event_bad_chain, 3);
    assert_eq!(bed.device.stats().event_chains, 1);
}

#[test]
fn restore_twice_before_delivery_still_sends_one_event() {
    let mut bed = Bed::new();
    let state = bed.save();
    bed.restore(&state);
    let state = bed.save();
    bed.restore(&state);
    bed.driver.post_event().unwrap();
    bed.driver.post_event().unwrap();
    let _ = bed.serve();
    let _ = bed.serve();
    assert_transport_resets(&mut bed, 1, "two restores");
}

#[test]
fn restore_into_a_new_device_continues_where_the_old_one_stopped() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::Single);
    new_connection_works(&mut bed, 43_200, "before save");
    bed.send(
        pkt(Op::Request, 43_201, PORT, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    bed.driver.post_event().unwrap();
    let state = bed.save();

    // Migration: a new device on the same guest memory.
    let now = Instant::from_secs(100);
    let mut device = VsockDevice::new(Config::new(GUEST_CID), now).unwrap();
    let queues = device.restore(now, &state).unwrap();
    assert!(device.is_activated());
    assert_eq!(device.acked_features(), state.acked_features);
    assert!(device.event_idx());
    bed.device = device;
    bed.queues = queues;
    bed.now = now;
    bed.host = TestHost::default();
    bed.host.listening.insert(PORT);
    let got = bed.run();
    assert_transport_resets(&mut bed, 1, "migrated");
    let answer: Vec<Op> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == 43_201)
        .map(|(h, _)| op_of(h))
        .collect();
    assert_eq!(
        answer,
        vec![Op::Response],
        "pending REQUEST served: {got:?}"
    );
    assert_eq!(bed.driver.in_flight(1), 0);
    new_connection_works(&mut bed, 43_200, "migrated");
}

#[test]
fn restore_refuses_an_invalid_queue_state_and_changes_nothing() {
    let mut bed = Bed::new();
    bed.post_rx(4, &Layout::Single);
    let conn = new_connection_works(&mut bed, 43_300, "before");
    let mut state = bed.save();
    state.queues[1].size = 3; // not a power of two
    assert!(matches!(
        bed.device.restore(bed.now, &state),
        Err(vsock_device::DeviceError::Queue(
            virtio_queue::Error::InvalidSize
        ))
    ));
    // Features the device never offered are refused the same way.
    let mut state = bed.save();
    state.acked_features |= 1 << 40;
    assert!(matches!(
        bed.device.restore(bed.now, &state),
        Err(vsock_device::DeviceError::Features(
            vsock_device::FeatureError::NotOffered(_)
        ))
    ));
    assert_eq!(bed.device.engine().connections(), 1, "connections kept");
    bed.send(pkt(Op::Rw, 43_300, PORT, 2, 0, 0), b"ok", &Layout::Single);
    bed.run();
    assert_eq!(app_drain(&mut bed, conn).0, b"ok");
    assert!(bed.driver.take_used(2).is_empty());
}
