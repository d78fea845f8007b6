//! Opening: the guest connects, and a host client connects.

use crate::helpers::*;

// -------------------------------------------------------------------------------------------
// Opening: the guest connects

#[test]
fn guest_connect_is_answered_once_the_socket_connects() {
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, port: 80, .. }) => conn,
        other => panic!("expected Connect to port 80, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    assert_eq!(e.conn_state(conn), Some(ConnState::GuestConnecting));
    assert_eq!(e.conn_origin(conn), Some(Origin::Guest));
    assert_eq!(e.conn_ports(conn), Some((1000, 80)));
    // Nothing for the guest until the socket is connected.
    expect_no_rx(&mut e, ms(1));
    assert_eq!(e.poll_timeout(), Some(ms(2000)));

    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Connected),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, true, false)]);
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::Response),
        host_pkt(Op::Response, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(3));
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    assert_eq!(e.poll_timeout(), None, "the connect deadline is gone");
    // A second Connected is misuse, and changes nothing.
    assert_eq!(
        e.handle_host_event(ms(4), conn, HostEvent::Connected),
        Err(ConnError::WrongState)
    );
    expect_nothing(&mut e, ms(4));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 1);
}

#[test]
fn guest_connect_failure_is_reset_at_once() {
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, port: 80, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    assert_eq!(
        e.handle_host_event(
            ms(1),
            conn,
            HostEvent::ConnectFailed(SocketError(ECONNREFUSED))
        ),
        Ok(())
    );
    // The RST is there at the same instant: no timer has to pass.
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, tx_packets: 1, guest_connects: 1, connect_failed: 1, rx_packets: 1,
        rst_sent: 1, closed: 1);
}

#[test]
fn guest_connect_timeout_is_reset() {
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, port: 80, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    assert_eq!(e.poll_timeout(), Some(ms(2000)));
    e.handle_timeout(ms(1999));
    expect_nothing(&mut e, ms(1999));
    e.handle_timeout(ms(2000));
    assert_eq!(
        expect_rx(&mut e, ms(2000), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(2000));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 1, guest_connects: 1, connect_timeout: 1, rx_packets: 1,
        rst_sent: 1, closed: 1);
}

#[test]
fn guest_giving_up_before_the_connect_starts_needs_no_socket_action() {
    // The run loop feeds a whole tx batch before draining actions: a REQUEST and the guest's
    // RST in one batch. No socket was ever opened, so none may be closed.
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Rst, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_nothing(&mut e, ms(0));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, rst_received: 1, closed: 1);

    // A REQUEST and a duplicate of it in one batch: the guest is reset, still no socket action.
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(0), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(0));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 2, guest_connects: 1, request_for_existing: 1, rx_packets: 1,
        rst_sent: 1, closed: 1);

    // abort_all and reset before the Connect was handed out: nothing to close either.
    for reset in [false, true] {
        let mut e = engine();
        tx(
            &mut e,
            ms(0),
            guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
        );
        if reset {
            e.reset(ms(1));
        } else {
            e.abort_all(ms(1));
            assert_eq!(
                expect_rx(&mut e, ms(1), Op::Rst),
                host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
            );
        }
        expect_nothing(&mut e, ms(1));
        assert_eq!(e.connections(), 0, "reset: {reset}");
    }
}

// -------------------------------------------------------------------------------------------
// Opening: a host client connects

#[test]
fn host_connect_line_becomes_request_and_ok_reply() {
    let mut e = engine();
    let conn = e.handle_accept(ms(0)).expect("room");
    assert_eq!(e.conn_state(conn), Some(ConnState::ReadingConnectLine));
    assert_eq!(e.conn_origin(conn), Some(Origin::Host));
    assert_eq!(e.conn_ports(conn), None);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[
            Action::ReadConnectLine { conn, max: 64 },
            interest(conn, false, false),
        ],
    );
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 5000\n")),
        Ok(())
    );
    expect_actions(&mut e, &[]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Request),
        host_pkt(Op::Request, HPF, 5000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.conn_state(conn), Some(ConnState::HostConnecting));
    assert_eq!(e.conn_ports(conn), Some((5000, HPF)));
    assert_eq!(flush_bytes(&e, conn), b"", "no OK before the guest accepts");

    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Response, 5000, HPF, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    // The socket has not reported would-block since the line: still known readable.
    expect_actions(&mut e, &[Action::Flush { conn }]);
    let ok = format!("OK {HPF}\n");
    assert_eq!(flush_bytes(&e, conn), ok.as_bytes());
    // The socket takes 5 bytes, then the rest once writable.
    assert_eq!(e.handle_host_write(ms(2), conn, Io::Done(5)), Ok(()));
    expect_actions(&mut e, &[interest(conn, false, true)]);
    assert_eq!(flush_bytes(&e, conn), &ok.as_bytes()[5..]);
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, false, false)],
    );
    assert_eq!(
        e.handle_host_write(ms(3), conn, Io::Done(ok.len() - 5)),
        Ok(())
    );
    assert_eq!(flush_bytes(&e, conn), b"");
    // The engine reads until the socket would block, then waits for readability.
    read_would_block(&mut e, ms(3), 4052, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(3));
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, host_accepts: 1, tx_packets: 1, rx_packets: 1, established: 1);
}

#[test]
fn host_connect_line_split_over_single_bytes() {
    let mut e = engine();
    let conn = e.handle_accept(ms(0)).expect("room");
    expect_actions(&mut e, &[interest(conn, true, false)]);
    let line = b"CONNECT 5000\n";
    for (i, b) in line.iter().enumerate() {
        let now = ms(1 + i as u64);
        assert_eq!(e.handle_host_event(now, conn, HostEvent::Readable), Ok(()));
        expect_actions(
            &mut e,
            &[
                Action::ReadConnectLine {
                    conn,
                    max: CONNECT_LINE_MAX - i,
                },
                interest(conn, false, false),
            ],
        );
        assert_eq!(
            e.handle_connect_line(now, conn, LineRead::Data(&[*b])),
            Ok(())
        );
        if i + 1 < line.len() {
            line_would_block(&mut e, now, conn, CONNECT_LINE_MAX - i - 1);
            expect_no_rx(&mut e, now);
            assert_eq!(e.conn_state(conn), Some(ConnState::ReadingConnectLine));
        }
    }
    let now = ms(1 + line.len() as u64);
    expect_actions(&mut e, &[]);
    assert_eq!(
        expect_rx(&mut e, now, Op::Request),
        host_pkt(Op::Request, HPF, 5000, 0, 0, BUF, 0)
    );
    tx(
        &mut e,
        now,
        guest_pkt(Op::Response, 5000, HPF, 0, 0, GUEST_BUF, 0),
    );
    // The socket was readable when the line ended: no interest change is needed.
    expect_actions(&mut e, &[Action::Flush { conn }]);
    assert_eq!(flush_bytes(&e, conn), format!("OK {HPF}\n").as_bytes());
    assert_stats!(e, host_accepts: 1, tx_packets: 1, rx_packets: 1, established: 1);
}

#[test]
fn stream_bytes_after_connect_line_reach_the_guest_first_after_response() {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 5000\nhello")),
        Ok(())
    );
    expect_actions(&mut e, &[]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Request),
        host_pkt(Op::Request, HPF, 5000, 0, 0, BUF, 0)
    );
    // No data before the guest accepted, even though the socket has more.
    expect_no_rx(&mut e, ms(1));
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    expect_nothing(&mut e, ms(2));

    tx(
        &mut e,
        ms(3),
        guest_pkt(Op::Response, 5000, HPF, 0, 0, GUEST_BUF, 0),
    );
    // The socket is known readable: no readable interest; the OK line is owed.
    expect_actions(&mut e, &[Action::Flush { conn }]);
    // The bytes that followed the line go first, then the socket is read.
    let (h, payload) = expect_rx_payload(&mut e, ms(3), Op::Rw);
    assert_eq!(h, host_pkt(Op::Rw, HPF, 5000, 5, 0, BUF, 0));
    assert_eq!(payload, b"hello");
    let h = read(&mut e, ms(3), ROOM, conn, ROOM, 6);
    assert_eq!(h, host_pkt(Op::Rw, HPF, 5000, 6, 0, BUF, 0));
    read_would_block(&mut e, ms(3), ROOM, conn);
    expect_no_rx(&mut e, ms(3));
    assert_eq!(flush_bytes(&e, conn), format!("OK {HPF}\n").as_bytes());
    assert_eq!(e.conn_stats(conn).map(|s| s.host_bytes), Some(11));
    assert_stats!(e, host_accepts: 1, tx_packets: 1, rx_packets: 3, rx_bytes: 11,
        established: 1);
}

#[test]
fn guest_rst_refuses_host_request() {
    let mut e = engine();
    let (conn, hp) = host_requesting(&mut e, ms(0), 5000);
    assert_eq!(hp, HPF);
    tx(&mut e, ms(1), guest_pkt(Op::Rst, 5000, HPF, 0, 0, 0, 0));
    expect_actions(&mut e, &[close(conn)]);
    // An RST is never answered; no OK line is ever written.
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.host_bytes(conn), Err(ConnError::Stale));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, host_accepts: 1, tx_packets: 1, rx_packets: 1, rst_received: 1,
        connect_refused_by_guest: 1, closed: 1);
}

#[test]
fn host_connect_timeout_resets_guest_and_closes_client() {
    let mut e = engine();
    let (conn, hp) = host_requesting(&mut e, ms(10), 5000);
    assert_eq!(e.poll_timeout(), Some(ms(2010)));
    e.handle_timeout(ms(2009));
    expect_nothing(&mut e, ms(2009));
    e.handle_timeout(ms(2010));
    assert_eq!(
        expect_rx(&mut e, ms(2010), Op::Rst),
        host_pkt(Op::Rst, hp, 5000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(2010));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, host_accepts: 1, rx_packets: 2, rst_sent: 1, connect_timeout: 1,
        closed: 1);
}
