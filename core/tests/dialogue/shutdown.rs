//! Half-close and close.

use crate::helpers::*;

#[test]
fn guest_shutdown_send_waits_for_buffered_bytes_and_host_keeps_sending() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 10, 0, GUEST_BUF, 0),
        b"0123456789",
        Io::Done(4),
    );
    expect_actions(&mut e, &[interest(conn, true, true)]);
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_SEND, GUEST_BUF, 0),
    );
    // Six bytes still buffered: no shutdown(SHUT_WR) yet.
    expect_nothing(&mut e, ms(2));
    assert_eq!(e.conn_state(conn), Some(ConnState::GuestSendShut));
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(e.handle_host_write(ms(3), conn, Io::Done(6)), Ok(()));
    expect_actions(
        &mut e,
        &[Action::Shutdown {
            conn,
            direction: Direction::Write,
        }],
    );
    // No credit updates for a guest that sends no more.
    expect_nothing(&mut e, ms(3));

    // Host to guest still flows.
    assert_eq!(
        e.handle_host_event(ms(4), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    let h = read(&mut e, ms(4), ROOM, conn, ROOM, 7);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 7, 0, BUF, 10));
    read_would_block(&mut e, ms(4), ROOM, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(4));
    assert_eq!(e.conn_state(conn), Some(ConnState::GuestSendShut));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        rx_bytes: 7, tx_bytes: 10, tx_direct_bytes: 4, tx_buffered_bytes: 6);
}

/// Guest connection whose host socket reached end of file (SHUTDOWN SEND delivered).
fn host_eof(e: &mut Engine, now: Instant) -> ConnId {
    let conn = guest_connected(e, now, 1000, 80, GUEST_BUF);
    assert_eq!(e.handle_host_event(now, conn, HostEvent::Readable), Ok(()));
    expect_actions(e, &[interest(conn, false, false)]);
    let r = expect_read(e, now, ROOM, conn, ROOM);
    assert_eq!(
        r.complete(Io::Done(0), &mut &[][..]),
        Ok(Some(host_pkt(
            Op::Shutdown,
            80,
            1000,
            0,
            SHUTDOWN_SEND,
            BUF,
            0
        )))
    );
    assert_eq!(e.conn_state(conn), Some(ConnState::HostSendShut));
    // Nothing more to read: no readable interest, no packet.
    expect_nothing(e, now);
    conn
}

#[test]
fn host_eof_becomes_shutdown_and_guest_keeps_sending() {
    let mut e = engine();
    let conn = host_eof(&mut e, ms(0));
    let direct = tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 5, 0, GUEST_BUF, 0),
        b"hello",
        Io::Done(5),
    );
    assert!(direct);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.conn_state(conn), Some(ConnState::HostSendShut));
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::CreditRequest, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, BUF, 5)
    );
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 3,
        tx_bytes: 5, tx_direct_bytes: 5, credit_updates_sent: 1);
}

#[test]
fn both_directions_shut_resets_and_closes() {
    // Host end of file first, then the guest's SHUTDOWN SEND.
    let mut e = engine();
    let conn = host_eof(&mut e, ms(0));
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_SEND, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 3,
        rst_sent: 1, closed: 1);

    // The guest's SHUTDOWN SEND first, then host end of file.
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_SEND, GUEST_BUF, 0),
    );
    expect_actions(
        &mut e,
        &[Action::Shutdown {
            conn,
            direction: Direction::Write,
        }],
    );
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    let r = expect_read(&mut e, ms(2), ROOM, conn, ROOM);
    assert_eq!(
        r.complete(Io::Done(0), &mut &[][..]),
        Ok(Some(host_pkt(
            Op::Shutdown,
            80,
            1000,
            0,
            SHUTDOWN_SEND,
            BUF,
            0
        )))
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(2));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 3,
        rst_sent: 1, closed: 1);
}

#[test]
fn guest_close_with_data_the_socket_never_takes_times_out() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 10, 0, GUEST_BUF, 0),
        b"0123456789",
        Io::Done(4),
    );
    expect_actions(&mut e, &[interest(conn, true, true)]);
    tx(
        &mut e,
        ms(1000),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_BOTH, GUEST_BUF, 0),
    );
    expect_actions(
        &mut e,
        &[
            Action::Shutdown {
                conn,
                direction: Direction::Read,
            },
            interest(conn, false, true),
        ],
    );
    expect_no_rx(&mut e, ms(1000));
    assert_eq!(e.conn_state(conn), Some(ConnState::Closing));
    assert_eq!(e.poll_timeout(), Some(ms(9000)));
    e.handle_timeout(ms(8999));
    expect_nothing(&mut e, ms(8999));
    e.handle_timeout(ms(9000));
    assert_eq!(
        expect_rx(&mut e, ms(9000), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 4)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(9000));
    assert_eq!(e.connections(), 0);
    assert_eq!(
        e.buffer_memory(),
        256 * 1024,
        "the buffer went back to the pool"
    );
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        tx_bytes: 10, tx_direct_bytes: 4, tx_buffered_bytes: 6, close_timeout: 1,
        rst_sent: 1, closed: 1);
}

#[test]
fn guest_shutdown_both_with_nothing_buffered_is_reset_at_once() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_BOTH, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 2,
        rst_sent: 1, closed: 1);
}

#[test]
fn guest_rst_closes_the_socket_without_reply() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Rst, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[close(conn)]);
    // Readable data is not read any more, and the RST is not answered.
    expect_nothing(&mut e, ms(2));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 1,
        rst_received: 1, closed: 1);
}

/// After a host socket failed, the engine reads what the socket still holds: a grant of
/// `ROOM` completed with `read`.
fn read_broken(e: &mut Engine, now: Instant, conn: ConnId, read: Io) -> Option<Header> {
    let r = expect_read(e, now, ROOM, conn, ROOM);
    let n = match read {
        Io::Done(n) => n,
        _ => 0,
    };
    r.complete(read, &mut &vec![7u8; n][..])
        .expect("within the grant")
}

#[test]
fn host_socket_errors_deliver_what_is_left_then_reset_the_guest() {
    let mut e = engine();
    // An error event with bytes still in the socket (a peer that wrote a reply and closed
    // without reading): the guest is told the host takes no more, gets every byte, then the
    // reset.
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(1), a, HostEvent::Error(SocketError(ECONNRESET))),
        Ok(())
    );
    expect_actions(&mut e, &[interest(a, false, false)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Shutdown),
        host_pkt(Op::Shutdown, 80, 1000, 0, SHUTDOWN_RCV, BUF, 0)
    );
    assert_eq!(
        read_broken(&mut e, ms(1), a, Io::Done(100)),
        Some(host_pkt(Op::Rw, 80, 1000, 100, 0, BUF, 0))
    );
    assert_eq!(e.conn_state(a), Some(ConnState::Established));
    assert_eq!(read_broken(&mut e, ms(1), a, Io::Done(0)), None);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(a)]);
    expect_nothing(&mut e, ms(1));
    // The same, the socket's own error ending it instead of end of file.
    let c = guest_connected(&mut e, ms(2), 1002, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(2), c, HostEvent::Error(SocketError(ECONNRESET))),
        Ok(())
    );
    expect_actions(&mut e, &[interest(c, false, false)]);
    expect_rx(&mut e, ms(2), Op::Shutdown);
    assert_eq!(
        read_broken(&mut e, ms(2), c, Io::Error(SocketError(ECONNRESET))),
        None
    );
    expect_rx(&mut e, ms(2), Op::Rst);
    expect_actions(&mut e, &[close(c)]);
    // A failed read: nothing is left to deliver, so the reset is at once.
    let b = guest_connected(&mut e, ms(3), 1001, 80, GUEST_BUF);
    assert_eq!(e.handle_host_event(ms(3), b, HostEvent::Readable), Ok(()));
    expect_actions(&mut e, &[interest(b, false, false)]);
    let r = expect_read(&mut e, ms(3), ROOM, b, ROOM);
    assert_eq!(
        r.complete(Io::Error(SocketError(ECONNRESET)), &mut &[][..]),
        Ok(None)
    );
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::Rst),
        host_pkt(Op::Rst, 80, 1001, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(b)]);
    expect_nothing(&mut e, ms(3));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 3, guest_connects: 3, established: 3, rx_packets: 9,
        rx_bytes: 100, host_errors: 3, rst_sent: 3, closed: 3);
}

#[test]
fn host_write_errors_drop_the_guest_bytes_and_reset_the_guest() {
    let mut e = engine();
    // The direct write fails: the guest is told at once that the host takes no more, what it
    // sends meanwhile is dropped, and once the socket has nothing left for it, the reset.
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 5, 0, GUEST_BUF, 0),
        b"hello",
        Io::Error(SocketError(EPIPE)),
    );
    expect_actions(&mut e, &[interest(a, false, false)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Shutdown),
        host_pkt(Op::Shutdown, 80, 1000, 0, SHUTDOWN_RCV, BUF, 0)
    );
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 3, 0, GUEST_BUF, 0),
    );
    assert_eq!(read_broken(&mut e, ms(1), a, Io::Done(0)), None);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(a)]);
    expect_nothing(&mut e, ms(1));
    // The flush of buffered bytes fails; the socket's read then fails too.
    let b = guest_connected(&mut e, ms(2), 1001, 80, GUEST_BUF);
    tx_data(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1001, 80, 5, 0, GUEST_BUF, 0),
        b"hello",
        Io::WouldBlock,
    );
    expect_actions(&mut e, &[interest(b, true, true)]);
    assert_eq!(e.handle_host_event(ms(3), b, HostEvent::Writable), Ok(()));
    expect_actions(
        &mut e,
        &[Action::Flush { conn: b }, interest(b, true, false)],
    );
    assert_eq!(
        e.handle_host_write(ms(3), b, Io::Error(SocketError(EPIPE))),
        Ok(())
    );
    expect_actions(&mut e, &[interest(b, false, false)]);
    expect_rx(&mut e, ms(3), Op::Shutdown);
    assert_eq!(
        read_broken(&mut e, ms(3), b, Io::Error(SocketError(ECONNRESET))),
        None
    );
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::Rst),
        host_pkt(Op::Rst, 80, 1001, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(b)]);
    expect_nothing(&mut e, ms(3));
    assert_eq!(e.connections(), 0);
    assert_eq!(
        e.buffer_memory(),
        256 * 1024,
        "b's buffer went back to the pool"
    );
    assert_stats!(e, tx_packets: 5, guest_connects: 2, established: 2, rx_packets: 6,
        tx_bytes: 5, tx_buffered_bytes: 5, host_errors: 2, guest_bytes_lost: 13, rst_sent: 2,
        closed: 2);
}

#[test]
fn rst_the_guest_never_takes_is_dropped_after_the_close_timeout() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(e.reset_connection(ms(1), conn), Ok(()));
    expect_actions(&mut e, &[close(conn)]);
    // The guest posts no rx buffer: the RST waits, for at most the close timeout.
    assert_eq!(e.connections(), 1);
    assert_eq!(e.poll_timeout(), Some(ms(8001)));
    e.handle_timeout(ms(8000));
    assert_eq!(e.connections(), 1);
    e.handle_timeout(ms(8001));
    assert_eq!(e.connections(), 0);
    expect_nothing(&mut e, ms(8001));
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 1,
        resets_by_caller: 1, rst_undelivered: 1, closed: 1);
}

#[test]
fn rst_replies_to_unknown_connections_are_bounded() {
    let mut e = engine_with(|c| c.max_pending_resets = 2);
    for port in [1, 2, 3] {
        tx(
            &mut e,
            ms(0),
            guest_pkt(Op::CreditRequest, port, 80, 0, 0, GUEST_BUF, 0),
        );
    }
    assert_eq!(
        expect_rx(&mut e, ms(0), Op::Rst),
        host_pkt(Op::Rst, 80, 1, 0, 0, 0, 0)
    );
    assert_eq!(
        expect_rx(&mut e, ms(0), Op::Rst),
        host_pkt(Op::Rst, 80, 2, 0, 0, 0, 0)
    );
    expect_nothing(&mut e, ms(0));
    // Room again once delivered.
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::CreditRequest, 4, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 4, 0, 0, 0, 0)
    );
    assert_stats!(e, tx_packets: 4, unknown_connection: 4, rst_queue_full: 1, rx_packets: 3,
        rst_sent: 3);
}

#[test]
fn a_host_peer_that_hangs_up_is_a_close_the_guest_hears_at_once() {
    let mut e = engine();
    // Nothing of the guest's held: the guest is told at once that its sends will fail, gets
    // what the socket holds, then the end of the stream; a clean close, no reset.
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(e.handle_host_event(ms(1), a, HostEvent::HangUp), Ok(()));
    expect_actions(&mut e, &[interest(a, false, false)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Shutdown),
        host_pkt(Op::Shutdown, 80, 1000, 0, SHUTDOWN_RCV, BUF, 0)
    );
    assert_eq!(
        read(&mut e, ms(1), ROOM, a, ROOM, 10),
        host_pkt(Op::Rw, 80, 1000, 10, 0, BUF, 0)
    );
    let r = expect_read(&mut e, ms(1), ROOM, a, ROOM);
    assert_eq!(
        r.complete(Io::Done(0), &mut &[][..]),
        Ok(Some(host_pkt(
            Op::Shutdown,
            80,
            1000,
            0,
            SHUTDOWN_SEND,
            BUF,
            0
        )))
    );
    // The guest closes too (Linux answers both shutdowns with its own RST).
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Rst, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[close(a)]);
    assert_eq!(e.stats().guest_bytes_lost, 0);
    assert_eq!(e.stats().host_hangups, 1);

    // Bytes the guest sent before it heard are lost: the guest gets the reset it needs.
    let b = guest_connected(&mut e, ms(3), 1001, 80, GUEST_BUF);
    assert_eq!(e.handle_host_event(ms(3), b, HostEvent::HangUp), Ok(()));
    let _ = actions(&mut e);
    match e.handle_tx(ms(3), &guest_pkt(Op::Rw, 1001, 80, 5, 0, GUEST_BUF, 0)) {
        Tx::Done => {}
        Tx::Data(_) => panic!("bytes offered to a socket whose peer hung up"),
    }
    assert_eq!(e.stats().guest_bytes_lost, 5);
    expect_rx(&mut e, ms(3), Op::Shutdown);
    let r = expect_read(&mut e, ms(3), ROOM, b, ROOM);
    assert_eq!(r.complete(Io::Done(0), &mut &[][..]), Ok(None));
    expect_rx(&mut e, ms(3), Op::Rst);
    expect_actions(&mut e, &[close(b)]);

    // Guest bytes still held for the socket when it hangs up: lost, and the reset follows.
    let c = guest_connected(&mut e, ms(4), 1002, 80, GUEST_BUF);
    // The socket refuses them: they wait in the connection buffer.
    let _ = tx_data(
        &mut e,
        ms(4),
        guest_pkt(Op::Rw, 1002, 80, 3, 0, GUEST_BUF, 0),
        b"abc",
        Io::WouldBlock,
    );
    let _ = actions(&mut e);
    let lost = e.stats().guest_bytes_lost;
    assert_eq!(e.handle_host_event(ms(4), c, HostEvent::HangUp), Ok(()));
    assert_eq!(e.stats().guest_bytes_lost, lost + 3);
    let _ = actions(&mut e);
    expect_rx(&mut e, ms(4), Op::Shutdown);
    let r = expect_read(&mut e, ms(4), ROOM, c, ROOM);
    assert_eq!(r.complete(Io::Done(0), &mut &[][..]), Ok(None));
    expect_rx(&mut e, ms(4), Op::Rst);
    assert_eq!(e.stats().host_hangups, 3);
}
