//! Seqpacket messages through real virtqueues: a host message read with one `recvmsg` into
//! several rx chains, too few chains posted, a ring that can never hold a message, and guest
//! messages laid out in many descriptors.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};

use common::*;
use vsock_core::testing::{guest_seq_pkt, pattern};
use vsock_core::wire::{Header, Op, SocketType, SEQ_EOM};
use vsock_core::{Config, ConnId};
use vsock_device::testing::{Driver, Layout, RX_BUF_SIZE};

const ROOM: usize = RX_BUF_SIZE as usize - 44;

fn seq(op: Op, gp: u32, hp: u32, len: u32, flags: u32, fwd_cnt: u32) -> Header {
    guest_seq_pkt(op, gp, hp, len, flags, GUEST_BUF_ALLOC, fwd_cnt)
}

/// Opens a guest seqpacket connection from `gp` to port 1234; returns it.
fn seq_connect(bed: &mut Bed, gp: u32) -> ConnId {
    bed.host.listening.insert(1234);
    let before: BTreeSet<u64> = bed.host.apps.keys().copied().collect();
    bed.send(seq(Op::Request, gp, 1234, 0, 0, 0), &[], &Layout::Single);
    let got = bed.run();
    let (h, _) = got
        .iter()
        .find(|(h, _)| h.dst_port.get() == gp)
        .expect("an answer to the REQUEST");
    assert_eq!(op_of(h), Op::Response);
    assert_eq!(h.type_.get(), SocketType::SeqPacket.to_u16());
    let raw = *bed
        .host
        .apps
        .keys()
        .find(|k| !before.contains(k))
        .expect("a new host socket");
    ConnId::from_raw(raw)
}

/// The RW packets of `got`, checked to be one message: the payloads joined.
fn one_message(got: &[(Header, Vec<u8>)]) -> Vec<u8> {
    let rw: Vec<&(Header, Vec<u8>)> = got.iter().filter(|(h, _)| op_of(h) == Op::Rw).collect();
    assert!(!rw.is_empty(), "no data: {got:?}");
    for (i, (h, _)) in rw.iter().enumerate() {
        assert_eq!(h.type_.get(), 2);
        let eom = if i + 1 == rw.len() { SEQ_EOM } else { 0 };
        assert_eq!(h.flags.get(), eom, "EOM on the last packet only");
    }
    rw.iter().flat_map(|(_, p)| p.iter().copied()).collect()
}

#[test]
fn a_host_message_fills_several_rx_buffers_in_order() {
    for layout in [
        Layout::Single,
        Layout::HeaderThenData,
        Layout::Cuts(vec![20, 44, 300]),
        Layout::Indirect(Box::new(Layout::Cuts(vec![44, 1000]))),
    ] {
        let mut bed = Bed::new();
        bed.post_rx(16, &layout);
        let conn = seq_connect(&mut bed, 1000);
        let msg = pattern(1, 10_000);
        bed.host.app(conn).write_all(&msg).unwrap();
        let got = bed.run();
        let lens: Vec<u32> = got.iter().map(|(h, _)| h.len.get()).collect();
        assert_eq!(
            lens,
            [ROOM as u32, ROOM as u32, (10_000 - 2 * ROOM) as u32],
            "{layout:?}"
        );
        assert!(one_message(&got) == msg, "{layout:?}: the message whole");
        let s = bed.device.engine().stats();
        assert_eq!(s.messages_to_guest, 1);
    }
}

#[test]
fn a_message_beyond_the_posted_buffers_is_staged_and_follows_as_they_come() {
    for event_idx in [true, false] {
        let mut bed = Bed::with_config(Config::new(GUEST_CID), event_idx);
        bed.driver.post_rx(RX_BUF_SIZE as usize, &Layout::Single);
        let conn = seq_connect(&mut bed, 1000);
        bed.driver.post_rx(RX_BUF_SIZE as usize, &Layout::Single);
        let msg = pattern(2, 10_000);
        bed.host.app(conn).write_all(&msg).unwrap();
        // One buffer: the message is read whole, its first part goes into it, the rest waits
        // in the engine (a Linux guest posts more only once half its ring is used).
        let first = bed.run();
        assert_eq!(first.len(), 1, "one packet");
        assert_eq!(
            (first[0].0.len.get(), first[0].0.flags.get()),
            (ROOM as u32, 0)
        );
        assert_eq!(bed.device.stats().rx_message_staged, 1);
        // The guest posts two more; it must kick for them (the device asked to hear of them).
        bed.driver.post_rx(RX_BUF_SIZE as usize, &Layout::Single);
        bed.driver.post_rx(RX_BUF_SIZE as usize, &Layout::Single);
        let asked = if event_idx {
            bed.driver.kick_needed(0, 2)
        } else {
            bed.driver.used_flags(0) & 1 == 0
        };
        assert!(asked, "event_idx {event_idx}: no kick asked for");
        let mut got = first;
        got.extend(bed.run());
        assert!(one_message(&got) == msg, "event_idx {event_idx}");
        assert_eq!(bed.driver.in_flight(0), 0);
        assert_eq!(bed.device.engine().stats().messages_to_guest, 1);
    }
}

#[test]
fn a_message_larger_than_a_small_ring_is_staged() {
    let mut bed = Bed::with_driver(Config::new(GUEST_CID), true, Driver::with_queue_size(4));
    bed.post_rx(4, &Layout::Single);
    let conn = seq_connect(&mut bed, 1000);
    // Four buffers of 4052 bytes hold 16 208 of 20 000: the rest follows as they come back.
    let msg = pattern(3, 20_000);
    bed.host.app(conn).write_all(&msg).unwrap();
    let got = bed.run();
    assert_eq!(got.len(), 5, "packets");
    assert!(one_message(&got) == msg);
}

#[test]
fn a_message_neither_ring_nor_stage_can_hold_resets_the_connection() {
    let config = Config::new(GUEST_CID).with_buffer_size(4096);
    let mut bed = Bed::with_driver(config, true, Driver::with_queue_size(4));
    bed.post_rx(4, &Layout::Single);
    let conn = seq_connect(&mut bed, 1000);
    // 16 208 bytes of buffers and a 4096-byte stage can never hold 30 000.
    bed.host.app(conn).write_all(&pattern(3, 30_000)).unwrap();
    let got = bed.run();
    assert_eq!(got.len(), 1, "one packet");
    assert_eq!(op_of(&got[0].0), Op::Rst);
    assert_eq!(bed.device.stats().rx_message_unplaceable, 1);
    let (_, eof) = app_read(bed.host.app(conn));
    assert!(eof, "the host socket is closed");
    // The RST's buffer was posted again; the three others never left the guest.
    assert_eq!(bed.driver.in_flight(0), 4);
}

/// An empty host message is dropped and counted, and a message behind it still arrives,
/// with the peer's shutdown both before and after the device looks: a 0-byte peek after the
/// shutdown is told apart from end of file.
#[test]
fn an_empty_host_message_is_dropped_and_what_follows_arrives() {
    for shut_first in [false, true] {
        let mut bed = Bed::new();
        bed.post_rx(8, &Layout::Single);
        let conn = seq_connect(&mut bed, 1000);
        let app = bed.host.app(conn);
        assert_eq!(app.write(&[]).unwrap(), 0, "an empty message");
        app.write_all(b"after").unwrap();
        if shut_first {
            app.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut got = bed.run();
        if !shut_first {
            bed.host
                .app(conn)
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
            got.extend(bed.run());
        }
        assert_eq!(one_message(&got), b"after", "shut first: {shut_first}");
        let last = got.last().unwrap();
        assert_eq!(op_of(&last.0), Op::Shutdown, "then end of file: {got:?}");
        let s = bed.device.engine().stats();
        assert_eq!(s.seqpacket_empty_from_host, 1);
        assert_eq!(s.messages_to_guest, 1);
    }
}

#[test]
fn a_guest_message_in_many_pieces_reaches_the_socket_whole() {
    let mut bed = Bed::new();
    bed.post_rx(8, &Layout::Single);
    let conn = seq_connect(&mut bed, 1000);
    // 101 descriptors: more than one direct write takes, so the message is copied, and
    // still written whole.
    let cuts: Vec<usize> = (1..=100).map(|i| 44 + i * 40).collect();
    let msg = pattern(4, 5000);
    bed.send(
        seq(Op::Rw, 1000, 1234, 5000, SEQ_EOM, 0),
        &msg,
        &Layout::Cuts(cuts),
    );
    // A second message over two packets, each in two descriptors.
    let second = pattern(5, 3000);
    bed.send(
        seq(Op::Rw, 1000, 1234, 1000, 0, 0),
        &second[..1000],
        &Layout::HeaderThenData,
    );
    bed.send(
        seq(Op::Rw, 1000, 1234, 2000, SEQ_EOM, 0),
        &second[1000..],
        &Layout::HeaderThenData,
    );
    bed.run();
    let app = bed.host.app(conn);
    let mut buf = vec![0u8; 10_000];
    let n = app.read(&mut buf).unwrap();
    assert!(buf[..n] == msg[..], "first message whole ({n} bytes)");
    let n = app.read(&mut buf).unwrap();
    assert!(buf[..n] == second[..], "second message whole ({n} bytes)");
    let s = bed.device.engine().stats();
    assert_eq!(s.messages_to_host, 2);
    assert_eq!(s.tx_direct_bytes, 0, "neither could go direct");
}

#[test]
fn a_guest_message_in_one_descriptor_goes_direct() {
    let mut bed = Bed::new();
    bed.post_rx(8, &Layout::Single);
    let conn = seq_connect(&mut bed, 1000);
    let msg = pattern(6, 60_000);
    bed.send(
        seq(Op::Rw, 1000, 1234, 60_000, SEQ_EOM, 0),
        &msg,
        &Layout::HeaderThenData,
    );
    bed.run();
    let mut buf = vec![0u8; 70_000];
    let n = bed.host.app(conn).read(&mut buf).unwrap();
    assert!(buf[..n] == msg[..]);
    let s = bed.device.engine().stats();
    assert_eq!((s.tx_direct_bytes, s.tx_buffered_bytes), (60_000, 0));
}

#[test]
fn a_guest_message_reaches_the_socket_whole_in_every_layout() {
    for layout in [
        Layout::Single,
        Layout::HeaderThenData,
        Layout::Cuts(vec![20, 44, 50, 90]),
        Layout::Bytewise,
        Layout::Indirect(Box::new(Layout::Cuts(vec![44, 60]))),
        Layout::Indirect(Box::new(Layout::Bytewise)),
    ] {
        let mut bed = Bed::new();
        bed.post_rx(8, &Layout::Single);
        let conn = seq_connect(&mut bed, 1000);
        // One message in one packet, and one over two packets, in this layout.
        let one = pattern(7, 100);
        let two = pattern(8, 150);
        // (Served after each: a bytewise packet takes over half the queue's descriptors.)
        bed.send(seq(Op::Rw, 1000, 1234, 100, SEQ_EOM, 0), &one, &layout);
        bed.run();
        bed.send(seq(Op::Rw, 1000, 1234, 60, 0, 0), &two[..60], &layout);
        bed.run();
        bed.send(seq(Op::Rw, 1000, 1234, 90, SEQ_EOM, 0), &two[60..], &layout);
        bed.run();
        let app = bed.host.app(conn);
        let mut buf = [0u8; 1000];
        let n = app.read(&mut buf).unwrap();
        assert!(buf[..n] == one[..], "{layout:?}: first message whole");
        let n = app.read(&mut buf).unwrap();
        assert!(buf[..n] == two[..], "{layout:?}: second message whole");
        assert_eq!(
            bed.device.engine().stats().messages_to_host,
            2,
            "{layout:?}"
        );
    }
}
