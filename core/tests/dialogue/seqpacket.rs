//! Seqpacket: message boundaries both ways, the negotiation that allows them, oversize and
//! odd messages, and the seqpacket listener's `CONNECT` message.

use crate::helpers::*;
use vsock_core::testing::{guest_seq_pkt, host_seq_pkt, pattern};
use vsock_core::wire::{SocketType, SEQ_EOM, SEQ_EOR};
use vsock_core::{Probe, RxGrant, SocketTypes};

const BOTH: SocketTypes = SocketTypes {
    stream: true,
    seqpacket: true,
};
const EMSGSIZE: i32 = 90;
const EPROTOTYPE: i32 = 91;
/// Payload room of a Linux 6.1 rx buffer.
const LINUX_ROOM: usize = 3732;

fn seq_engine() -> Engine {
    let mut e = engine();
    e.set_socket_types(ms(0), BOTH);
    e
}

/// The guest connects a seqpacket socket from `gp` to `hp`; the host socket connects at once.
/// Counters: tx_packets 1, guest_connects 1, established 1, rx_packets 1.
fn seq_connected(e: &mut Engine, now: Instant, gp: u32, hp: u32) -> ConnId {
    tx(
        e,
        now,
        guest_seq_pkt(Op::Request, gp, hp, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect {
            conn,
            port,
            socket_type: SocketType::SeqPacket,
            ..
        }) if port == hp => conn,
        other => panic!("expected a seqpacket Connect, got {other:?}"),
    };
    assert_eq!(e.conn_socket_type(conn), Some(SocketType::SeqPacket));
    expect_actions(e, &[interest(conn, false, true)]);
    assert_eq!(e.handle_host_event(now, conn, HostEvent::Connected), Ok(()));
    expect_actions(e, &[interest(conn, true, false)]);
    let buf = e.config().buffer_size;
    assert_eq!(
        expect_rx(e, now, Op::Response),
        host_seq_pkt(Op::Response, hp, gp, 0, 0, buf, 0)
    );
    expect_nothing(e, now);
    conn
}

/// A guest RW packet of a seqpacket connection, with `flags`; returns whether it was offered
/// for a direct write, after completing it with `written`.
fn seq_tx(
    e: &mut Engine,
    now: Instant,
    (gp, hp): (u32, u32),
    payload: &[u8],
    flags: u32,
    written: Io,
) -> bool {
    let h = guest_seq_pkt(Op::Rw, gp, hp, payload.len() as u32, flags, GUEST_BUF, 0);
    match e.handle_tx(now, &h) {
        Tx::Data(d) => {
            assert!(d.is_message());
            let direct = d.direct();
            assert_eq!(d.complete(written, &mut &payload[..]), Ok(()));
            direct
        }
        Tx::Done => panic!("RW {h:?} was not offered"),
    }
}

/// The engine owes a flush of exactly `message`; the socket takes it whole.
fn flush_message(e: &mut Engine, now: Instant, conn: ConnId, message: &[u8]) {
    assert_eq!(flush_bytes(e, conn), message, "one whole message per flush");
    assert_eq!(
        e.handle_host_write(now, conn, Io::Done(message.len())),
        Ok(())
    );
}

// -------------------------------------------------------------------------------------------
// Negotiation

#[test]
fn seqpacket_is_refused_until_the_driver_negotiates_it() {
    let mut e = engine();
    assert_eq!(e.socket_types(), SocketTypes::STREAM);
    tx(
        &mut e,
        ms(0),
        guest_seq_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[]);
    // The RST keeps the type of the packet it answers, or Linux would drop it.
    assert_eq!(
        expect_rx(&mut e, ms(0), Op::Rst),
        host_seq_pkt(Op::Rst, 80, 1000, 0, 0, 0, 0)
    );
    e.set_socket_types(ms(1), BOTH);
    let conn = seq_connected(&mut e, ms(2), 1001, 80);
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    assert_stats!(e, tx_packets: 2, unknown_type: 1, rx_packets: 2, rst_sent: 1,
        guest_connects: 1, established: 1);
}

#[test]
fn streams_can_be_negotiated_away() {
    let mut e = engine();
    let stream = guest_connected(&mut e, ms(0), 999, 79, GUEST_BUF);
    e.set_socket_types(
        ms(1),
        SocketTypes {
            stream: false,
            seqpacket: true,
        },
    );
    // The live stream connection is reset, and a new stream REQUEST refused.
    expect_actions(&mut e, &[close(stream)]);
    expect_rx(&mut e, ms(1), Op::Rst);
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, 0, 0)
    );
    seq_connected(&mut e, ms(3), 1001, 81);
    assert_stats!(e, tx_packets: 3, guest_connects: 2, established: 2, rx_packets: 4,
        rst_sent: 2, unknown_type: 1, closed: 1);
}

#[test]
fn a_seqpacket_connect_refused_as_the_wrong_type_is_reset() {
    let mut e = seq_engine();
    tx(
        &mut e,
        ms(0),
        guest_seq_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    // A stream service at <uds_path>_80 refuses a seqpacket connect with EPROTOTYPE.
    assert_eq!(
        e.handle_host_event(
            ms(1),
            conn,
            HostEvent::ConnectFailed(SocketError(EPROTOTYPE))
        ),
        Ok(())
    );
    expect_actions(&mut e, &[close(conn)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_seq_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(1));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, connect_failed: 1, rx_packets: 1,
        rst_sent: 1, closed: 1);
}

// -------------------------------------------------------------------------------------------
// Guest to host

#[test]
fn a_message_in_one_packet_goes_straight_to_the_socket() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let msg = pattern(1, 3000);
    assert!(seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg,
        SEQ_EOM,
        Io::Done(3000)
    ));
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.buffer_memory(), 0, "nothing copied");
    let s = e.conn_stats(conn).unwrap();
    assert_eq!(
        (s.guest_bytes, s.host_written, s.buffered_bytes),
        (3000, 3000, 0)
    );
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 3000, tx_direct_bytes: 3000, messages_to_host: 1);
}

#[test]
fn a_message_the_socket_refuses_is_kept_whole_and_flushed_whole() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let first = pattern(1, 3000);
    let second = pattern(2, 10);
    assert!(seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &first,
        SEQ_EOM,
        Io::WouldBlock
    ));
    expect_actions(&mut e, &[interest(conn, true, true)]);
    // Behind a held message nothing goes direct.
    assert!(!seq_tx(
        &mut e,
        ms(2),
        (1000, 80),
        &second,
        SEQ_EOM,
        Io::Done(0)
    ));
    expect_actions(&mut e, &[]);
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    // Writable now: no more need to hear of it.
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    flush_message(&mut e, ms(3), conn, &first);
    expect_actions(&mut e, &[Action::Flush { conn }]);
    flush_message(&mut e, ms(3), conn, &second);
    expect_nothing(&mut e, ms(3));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 3010, tx_buffered_bytes: 3010, messages_to_host: 2);
}

#[test]
fn a_message_over_three_packets_reaches_the_socket_in_one_write() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let msg = pattern(3, 9000);
    // Linux splits a message into packets; only the last carries EOM.
    assert!(!seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg[..4000],
        0,
        Io::Done(0)
    ));
    // An unfinished message is not a write the socket is waiting for.
    expect_actions(&mut e, &[]);
    assert!(!seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg[4000..8000],
        0,
        Io::Done(0)
    ));
    expect_actions(&mut e, &[]);
    assert!(!seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg[8000..],
        SEQ_EOM,
        Io::Done(0)
    ));
    expect_actions(&mut e, &[Action::Flush { conn }]);
    flush_message(&mut e, ms(1), conn, &msg);
    expect_nothing(&mut e, ms(1));
    assert_stats!(e, tx_packets: 4, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 9000, tx_buffered_bytes: 9000, messages_to_host: 1);
}

#[test]
fn one_byte_messages_filling_the_whole_credit_keep_every_boundary() {
    let mut e = engine_with(|c| {
        c.buffer_size = 4096;
        c.credit_update_threshold = 1024;
    });
    e.set_socket_types(ms(0), BOTH);
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert!(seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &[0],
        SEQ_EOM,
        Io::WouldBlock
    ));
    expect_actions(&mut e, &[interest(conn, true, true)]);
    for i in 1..4096u32 {
        assert!(!seq_tx(
            &mut e,
            ms(1),
            (1000, 80),
            &[i as u8],
            SEQ_EOM,
            Io::Done(0)
        ));
    }
    // 4096 messages in one buffer of 4096 bytes: the boundaries take no room of it.
    assert_eq!(e.buffer_memory(), 4096);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Writable),
        Ok(())
    );
    for i in 0..4096u32 {
        assert_eq!(e.poll_action(), Some(Action::Flush { conn }), "message {i}");
        flush_message(&mut e, ms(2), conn, &[i as u8]);
    }
    expect_actions(&mut e, &[interest(conn, true, false)]);
    // The guest hears of the freed space.
    let h = expect_rx(&mut e, ms(2), Op::CreditUpdate);
    assert_eq!(h.fwd_cnt.get(), 4096);
    assert_eq!(e.stats().messages_to_host, 4096);
}

#[test]
fn a_partial_message_write_resets_the_connection() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    // An atomic send never takes part of a message; a socket that claims it did is broken.
    let msg = pattern(1, 100);
    seq_tx(&mut e, ms(1), (1000, 80), &msg, SEQ_EOM, Io::Done(40));
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(1), Op::Rst);
    let s = e.stats();
    assert_eq!((s.seqpacket_partial_write, s.guest_bytes_lost), (1, 100));
}

#[test]
fn a_partial_flush_resets_the_connection() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let msg = pattern(1, 100);
    seq_tx(&mut e, ms(1), (1000, 80), &msg, SEQ_EOM, Io::WouldBlock);
    actions(&mut e);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(e.handle_host_write(ms(2), conn, Io::Done(99)), Ok(()));
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(2), Op::Rst);
    assert_eq!(e.stats().seqpacket_partial_write, 1);
    assert_eq!(e.stats().guest_bytes_lost, 100);
}

#[test]
fn a_message_the_socket_calls_too_large_resets_the_connection() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let msg = pattern(1, 5000);
    seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg,
        SEQ_EOM,
        Io::Error(SocketError(EMSGSIZE)),
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(1), Op::Rst);
    let s = e.stats();
    assert_eq!((s.seqpacket_host_emsgsize, s.guest_bytes_lost), (1, 5000));
    assert_eq!(s.host_errors, 0, "not a broken socket: a refused message");
}

#[test]
fn eor_is_counted_and_dropped_and_the_message_delivered() {
    let mut e = seq_engine();
    let _conn = seq_connected(&mut e, ms(0), 1000, 80);
    let msg = pattern(1, 10);
    assert!(seq_tx(
        &mut e,
        ms(1),
        (1000, 80),
        &msg,
        SEQ_EOM | SEQ_EOR,
        Io::Done(10)
    ));
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.stats().seqpacket_eor_dropped, 1);
    assert_eq!(e.stats().messages_to_host, 1);
}

#[test]
fn empty_packets_close_an_open_message_or_are_dropped() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    // An empty message: nothing a Unix socket could be told without it reading as the end.
    tx(
        &mut e,
        ms(1),
        guest_seq_pkt(Op::Rw, 1000, 80, 0, SEQ_EOM, GUEST_BUF, 0),
    );
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.stats().seqpacket_empty_from_guest, 1);
    // An empty last packet ends the message its earlier packets began.
    let msg = pattern(1, 30);
    seq_tx(&mut e, ms(2), (1000, 80), &msg, 0, Io::Done(0));
    expect_actions(&mut e, &[]);
    tx(
        &mut e,
        ms(2),
        guest_seq_pkt(Op::Rw, 1000, 80, 0, SEQ_EOM, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[Action::Flush { conn }]);
    flush_message(&mut e, ms(2), conn, &msg);
    assert_eq!(e.stats().seqpacket_empty_from_guest, 1);
    assert_eq!(e.stats().messages_to_host, 1);
}

#[test]
fn an_unfinished_message_at_shutdown_is_dropped_not_sent() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    let whole = pattern(1, 20);
    let part = pattern(2, 50);
    seq_tx(&mut e, ms(1), (1000, 80), &whole, SEQ_EOM, Io::WouldBlock);
    actions(&mut e);
    seq_tx(&mut e, ms(1), (1000, 80), &part, 0, Io::Done(0));
    tx(
        &mut e,
        ms(2),
        guest_seq_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_SEND, GUEST_BUF, 0),
    );
    assert_eq!(e.stats().seqpacket_partial_dropped, 1);
    assert_eq!(e.stats().guest_bytes_lost, 50);
    // The whole message still goes, and only then the end of file.
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    flush_message(&mut e, ms(3), conn, &whole);
    expect_actions(
        &mut e,
        &[Action::Shutdown {
            conn,
            direction: Direction::Write,
        }],
    );
    assert_eq!(e.conn_state(conn), Some(ConnState::GuestSendShut));
}

// -------------------------------------------------------------------------------------------
// Host to guest

/// The next rx grant must be a probe for `conn`: completed with `probe`.
fn expect_probe(e: &mut Engine, now: Instant, conn: ConnId, probe: Probe) -> Option<Header> {
    match e.poll_rx(now, LINUX_ROOM) {
        Some(RxGrant::Probe(p)) => {
            assert_eq!(p.conn(), conn);
            p.complete(probe)
        }
        Some(RxGrant::Packet(p)) => panic!("expected a probe, got {:?}", p.header()),
        Some(RxGrant::Read(r)) => panic!("expected a probe, got {r:?}"),
        Some(RxGrant::Message(m)) => panic!("expected a probe, got {m:?}"),
        None => panic!("expected a probe, got nothing"),
    }
}

/// The next rx grant must be a message of `len` bytes for `conn`, read into buffers of
/// `rooms`: the headers written.
fn expect_message(
    e: &mut Engine,
    now: Instant,
    conn: ConnId,
    len: usize,
    rooms: &[usize],
) -> Vec<Header> {
    match e.poll_rx(now, rooms[0]) {
        Some(RxGrant::Message(m)) => {
            assert_eq!((m.conn(), m.len()), (conn, len));
            assert_eq!(m.buffers_for(rooms.iter().copied()), Some(rooms.len()));
            let bytes = pattern(9, len);
            m.complete(Io::Done(len), rooms, &mut &bytes[..])
                .expect("the message read")
                .expect("packets for the guest")
                .collect()
        }
        Some(RxGrant::Packet(p)) => panic!("expected a message, got {:?}", p.header()),
        Some(RxGrant::Read(r)) => panic!("expected a message, got {r:?}"),
        Some(RxGrant::Probe(p)) => panic!("expected a message, got {p:?}"),
        None => panic!("expected a message, got nothing"),
    }
}

#[test]
fn a_host_message_is_probed_then_read_whole_across_buffers() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::Size(7564)), None);
    let headers = expect_message(&mut e, ms(1), conn, 7564, &[3732, 3732, 100]);
    assert_eq!(
        headers,
        [
            host_seq_pkt(Op::Rw, 80, 1000, 3732, 0, BUF, 0),
            host_seq_pkt(Op::Rw, 80, 1000, 3732, 0, BUF, 0),
            host_seq_pkt(Op::Rw, 80, 1000, 100, SEQ_EOM, BUF, 0),
        ]
    );
    // Still readable: the next probe finds the socket drained.
    assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::WouldBlock), None);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(1));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 4,
        rx_bytes: 7564, messages_to_guest: 1);
}

#[test]
fn small_host_messages_each_get_their_own_packet_with_eom() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    for len in [1, 2, 3, 4, 5, 6, 7] {
        assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::Size(len)), None);
        let h = expect_message(&mut e, ms(1), conn, len, &[LINUX_ROOM]);
        assert_eq!(
            h,
            [host_seq_pkt(Op::Rw, 80, 1000, len as u32, SEQ_EOM, BUF, 0)]
        );
    }
    assert_eq!(e.stats().messages_to_guest, 7);
}

#[test]
fn a_host_message_beyond_the_credit_waits_for_the_guest() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    // 200 000 bytes, then a second message of 100 000: 300 000 > 256 KiB of credit.
    assert_eq!(
        expect_probe(&mut e, ms(1), conn, Probe::Size(200_000)),
        None
    );
    let rooms = vec![65_536, 65_536, 65_536, 3_392];
    expect_message(&mut e, ms(1), conn, 200_000, &rooms);
    assert_eq!(
        expect_probe(&mut e, ms(1), conn, Probe::Size(100_000)),
        None
    );
    // Not whole within the credit left (62 144): ask, once.
    expect_rx(&mut e, ms(1), Op::CreditRequest);
    expect_nothing(&mut e, ms(1));
    // The guest read the first message and says so.
    tx(
        &mut e,
        ms(2),
        guest_seq_pkt(Op::CreditUpdate, 1000, 80, 0, 0, GUEST_BUF, 200_000),
    );
    let h = expect_message(&mut e, ms(2), conn, 100_000, &[65_536, 34_464]);
    assert_eq!(h[1].flags.get(), SEQ_EOM);
    assert_eq!(e.stats().messages_to_guest, 2);
    assert_eq!(e.stats().credit_requests_sent, 1);
}

#[test]
fn a_host_message_larger_than_the_guest_buffer_resets_both_ends() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    // The guest could never take it whole: RST, and the host socket is closed.
    assert_eq!(
        expect_probe(&mut e, ms(1), conn, Probe::Size(GUEST_BUF as usize + 1)),
        None
    );
    expect_actions(&mut e, &[close(conn)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_seq_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    assert_eq!(e.stats().seqpacket_oversize_from_host, 1);
    assert_eq!(e.stats().messages_to_guest, 0);
}

#[test]
fn an_empty_host_message_is_dropped_and_end_of_file_shuts_down() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::Empty), None);
    assert_eq!(e.stats().seqpacket_empty_from_host, 1);
    let h = expect_probe(&mut e, ms(1), conn, Probe::Eof).expect("a SHUTDOWN");
    assert_eq!(
        h,
        host_seq_pkt(Op::Shutdown, 80, 1000, 0, SHUTDOWN_SEND, BUF, 0)
    );
    assert_eq!(e.conn_state(conn), Some(ConnState::HostSendShut));
    expect_nothing(&mut e, ms(1));
}

#[test]
fn a_message_read_that_does_not_match_its_probe_resets() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    expect_probe(&mut e, ms(1), conn, Probe::Size(500));
    match e.poll_rx(ms(1), LINUX_ROOM) {
        Some(RxGrant::Message(m)) => {
            // Rooms that are not exactly the buffers it takes are misuse too.
            assert_eq!(
                m.complete(Io::Done(600), &[LINUX_ROOM], &mut &[0u8; 600][..])
                    .map(|h| h.map(|h| h.count())),
                Err(ConnError::Overrun)
            );
        }
        _ => panic!("expected a message grant"),
    }
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(1), Op::Rst);
}

// -------------------------------------------------------------------------------------------
// The seqpacket listener

/// A client of the seqpacket listener whose socket is readable: the engine asks for its
/// line. Counters: host_accepts 1.
fn seq_client_reading(e: &mut Engine, now: Instant) -> ConnId {
    let conn = e.handle_seqpacket_accept(now).expect("room");
    assert_eq!(e.conn_socket_type(conn), Some(SocketType::SeqPacket));
    expect_actions(e, &[interest(conn, true, false)]);
    assert_eq!(e.handle_host_event(now, conn, HostEvent::Readable), Ok(()));
    expect_actions(
        e,
        &[
            Action::ReadConnectLine {
                conn,
                max: CONNECT_LINE_MAX,
            },
            interest(conn, false, false),
        ],
    );
    conn
}

#[test]
fn a_seqpacket_client_connects_with_one_message_and_gets_one_back() {
    let mut e = seq_engine();
    let conn = seq_client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 5000\n")),
        Ok(())
    );
    let h = expect_rx(&mut e, ms(1), Op::Request);
    let hp = h.src_port.get();
    assert_eq!(h, host_seq_pkt(Op::Request, hp, 5000, 0, 0, BUF, 0));
    tx(
        &mut e,
        ms(2),
        guest_seq_pkt(Op::Response, 5000, hp, 0, 0, GUEST_BUF, 0),
    );
    // The reply is one message, written whole.
    let ok = format!("OK {hp}\n");
    expect_actions(&mut e, &[Action::Flush { conn }]);
    flush_message(&mut e, ms(2), conn, ok.as_bytes());
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    // Then messages flow: the client's first one is read as a message.
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    expect_probe(&mut e, ms(3), conn, Probe::Size(5));
    let h = expect_message(&mut e, ms(3), conn, 5, &[LINUX_ROOM]);
    assert_eq!(h, [host_seq_pkt(Op::Rw, hp, 5000, 5, SEQ_EOM, BUF, 0)]);
    assert_eq!(
        e.stats().messages_to_host,
        0,
        "the OK line is not a guest message"
    );
}

#[test]
fn a_seqpacket_line_must_be_one_whole_message() {
    for (line, garbage, too_long) in [
        (&b"CONNECT 5000\nhello"[..], 1, 0),
        (b"CONNECT 5000", 1, 0),
        (b"CONNECT 50", 1, 0),
        (&[b'7'; 64][..], 1, 0),
        (
            b"CONNECT 500000000000000000000000000000000000000000000000000000000",
            0,
            1,
        ),
    ] {
        let mut e = seq_engine();
        let conn = seq_client_reading(&mut e, ms(0));
        assert_eq!(
            e.handle_connect_line(ms(1), conn, LineRead::Data(line)),
            Ok(())
        );
        expect_actions(&mut e, &[close(conn)]);
        expect_no_rx(&mut e, ms(1));
        let s = e.stats();
        assert_eq!(
            (s.connect_line_garbage, s.connect_line_too_long),
            (garbage, too_long),
            "{:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[test]
fn a_seqpacket_client_is_refused_while_the_guest_has_no_seqpacket() {
    let mut e = engine();
    let conn = seq_client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 5000\n")),
        Ok(())
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_no_rx(&mut e, ms(1));
    assert_stats!(e, host_accepts: 1, seqpacket_clients_refused: 1, closed: 1);
}

#[test]
fn stream_and_seqpacket_connections_on_the_same_ports_are_apart() {
    let mut e = seq_engine();
    let stream = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    // Linux gives each socket its own port, but the type is part of the key all the same.
    let seq = seq_connected(&mut e, ms(1), 1000, 80);
    assert_ne!(stream, seq);
    tx(&mut e, ms(2), guest_seq_pkt(Op::Rst, 1000, 80, 0, 0, 0, 0));
    expect_actions(&mut e, &[close(seq)]);
    assert_eq!(e.conn_state(stream), Some(ConnState::Established));
}

#[test]
fn a_guest_message_larger_than_our_buffer_breaks_the_credit() {
    let mut e = engine_with(|c| {
        c.buffer_size = 8192;
        c.credit_update_threshold = 2048;
    });
    e.set_socket_types(ms(0), BOTH);
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    // A guest other than Linux (which refuses such a send) sends 8192 bytes without EOM,
    // and then one more: the message could never be whole within the buffer.
    seq_tx(&mut e, ms(1), (1000, 80), &pattern(1, 8192), 0, Io::Done(0));
    expect_nothing(&mut e, ms(1));
    tx(
        &mut e,
        ms(2),
        guest_seq_pkt(Op::Rw, 1000, 80, 1, SEQ_EOM, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(2), Op::Rst);
    assert_eq!(e.stats().credit_violation, 1);
    assert_eq!(e.stats().messages_to_host, 0, "no part of it was written");
}

#[test]
fn seqpacket_connections_time_out_as_streams_do() {
    let mut e = seq_engine();
    // A guest connect whose socket never connects.
    tx(
        &mut e,
        ms(0),
        guest_seq_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    actions(&mut e);
    // A seqpacket client that never names its port.
    let client = e.handle_seqpacket_accept(ms(0)).expect("room");
    actions(&mut e);
    e.handle_timeout(ms(2000));
    expect_actions(&mut e, &[close(conn)]);
    assert_eq!(
        expect_rx(&mut e, ms(2000), Op::Rst),
        host_seq_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    e.handle_timeout(ms(5000));
    expect_actions(&mut e, &[close(client)]);
    let s = e.stats();
    assert_eq!((s.connect_timeout, s.connect_line_timeout), (1, 1));
}

#[test]
fn a_peer_that_closed_with_messages_unread_still_delivers_what_it_sent() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    // Unix reports the close first, then the messages sent before it.
    assert_eq!(
        expect_probe(&mut e, ms(1), conn, Probe::Error(SocketError(ECONNRESET))),
        None
    );
    // The guest is told at once that its sends go nowhere.
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Shutdown),
        host_seq_pkt(Op::Shutdown, 80, 1000, 0, SHUTDOWN_RCV, BUF, 0)
    );
    assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::Size(3)), None);
    let h = expect_message(&mut e, ms(1), conn, 3, &[LINUX_ROOM]);
    assert_eq!(h, [host_seq_pkt(Op::Rw, 80, 1000, 3, SEQ_EOM, BUF, 0)]);
    // Then the end, and only then the reset.
    assert_eq!(expect_probe(&mut e, ms(1), conn, Probe::Eof), None);
    expect_actions(&mut e, &[close(conn)]);
    expect_rx(&mut e, ms(1), Op::Rst);
    assert_eq!(e.stats().messages_to_guest, 1);
}

#[test]
fn an_empty_message_flood_lets_other_connections_go_first() {
    let mut e = seq_engine();
    let a = seq_connected(&mut e, ms(0), 1000, 80);
    let b = seq_connected(&mut e, ms(0), 1001, 80);
    for c in [a, b] {
        assert_eq!(e.handle_host_event(ms(1), c, HostEvent::Readable), Ok(()));
    }
    actions(&mut e);
    assert_eq!(expect_probe(&mut e, ms(1), a, Probe::Empty), None);
    // b's turn, though a is still readable.
    assert_eq!(expect_probe(&mut e, ms(1), b, Probe::Size(2)), None);
}

#[test]
fn a_message_beyond_the_buffers_at_hand_is_staged_and_ends_later() {
    let mut e = seq_engine();
    let conn = seq_connected(&mut e, ms(0), 1000, 80);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    actions(&mut e);
    expect_probe(&mut e, ms(1), conn, Probe::Size(10_000));
    let msg = pattern(4, 10_000);
    match e.poll_rx(ms(1), LINUX_ROOM) {
        Some(RxGrant::Message(mut m)) => {
            // One buffer posted: the rest is read into the engine's stage.
            assert!(m.stage(0).is_none() && m.stage(10_000).is_none());
            m.stage(10_000 - LINUX_ROOM)
                .expect("a stage")
                .copy_from_slice(&msg[LINUX_ROOM..]);
            let h: Vec<Header> = m
                .complete(Io::Done(10_000), &[LINUX_ROOM], &mut &msg[..LINUX_ROOM])
                .unwrap()
                .unwrap()
                .collect();
            assert_eq!(h, [host_seq_pkt(Op::Rw, 80, 1000, 3732, 0, BUF, 0)]);
        }
        _ => panic!("expected a message grant"),
    }
    // The rest follows from the stage, in buffers as they come; the last ends the message.
    let (h, p) = expect_rx_payload(&mut e, ms(2), Op::Rw);
    assert_eq!((h.len.get(), h.flags.get()), (ROOM as u32, 0));
    assert!(p == msg[3732..3732 + ROOM]);
    let (h, p) = expect_rx_payload(&mut e, ms(2), Op::Rw);
    assert_eq!(
        (h.len.get(), h.flags.get()),
        ((10_000 - 3732 - ROOM) as u32, SEQ_EOM)
    );
    assert!(p == msg[3732 + ROOM..]);
    assert_eq!(e.stats().messages_to_guest, 1);
    // Only then the next probe.
    expect_probe(&mut e, ms(2), conn, Probe::WouldBlock);
}
