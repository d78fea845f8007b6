//! Order and fairness.

use crate::helpers::*;

#[test]
fn owed_packets_go_out_in_priority_order() {
    let mut e = engine_with(small_buffers);
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    // The socket connects and its peer writes at once: RESPONSE goes before any data.
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Connected),
        Ok(())
    );
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Response),
        host_pkt(Op::Response, 80, 1000, 0, 0, 8192, 0)
    );
    // The guest's data crosses the credit threshold while the socket has data for it: the
    // data packet goes first and carries the credit, so no CREDIT_UPDATE follows.
    let payload = vec![1u8; 3000];
    tx_data(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1000, 80, 3000, 0, GUEST_BUF, 0),
        &payload,
        Io::Done(3000),
    );
    let h = read(&mut e, ms(2), ROOM, conn, ROOM, 10);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 10, 0, 8192, 3000));
    read_would_block(&mut e, ms(2), ROOM, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(2));
    // Without data to carry it, the CREDIT_UPDATE goes alone.
    tx_data(
        &mut e,
        ms(3),
        guest_pkt(Op::Rw, 1000, 80, 3000, 0, GUEST_BUF, 0),
        &payload,
        Io::Done(3000),
    );
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, 8192, 6000)
    );
    // An RST to an unknown connection goes before everything a connection owes.
    assert_eq!(
        e.handle_host_event(ms(4), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    tx(
        &mut e,
        ms(4),
        guest_pkt(Op::CreditRequest, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    tx(
        &mut e,
        ms(4),
        guest_pkt(Op::Shutdown, 1002, 82, 0, SHUTDOWN_BOTH, 0, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(4), Op::Rst),
        host_pkt(Op::Rst, 82, 1002, 0, 0, 0, 0)
    );
    // An RST owed on the connection replaces data and CREDIT_UPDATE.
    assert_eq!(e.reset_connection(ms(5), conn), Ok(()));
    assert_eq!(
        expect_rx(&mut e, ms(5), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, 8192, 6000)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(5));
    assert_stats!(e, tx_packets: 5, guest_connects: 1, established: 1, rx_packets: 5,
        rx_bytes: 10, tx_bytes: 6000, tx_direct_bytes: 6000, credit_updates_sent: 1,
        unknown_connection: 1, resets_by_caller: 1, rst_sent: 2, closed: 1);
}

#[test]
fn rst_goes_before_an_owed_response() {
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(conn, false, true)]);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Connected),
        Ok(())
    );
    assert_eq!(e.reset_connection(ms(1), conn), Ok(()));
    // The RESPONSE never goes out: the guest learns of the reset alone.
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, resets_by_caller: 1,
        rx_packets: 1, rst_sent: 1, closed: 1);
}

#[test]
fn connections_with_data_take_turns() {
    let mut e = engine();
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let b = guest_connected(&mut e, ms(0), 1001, 80, GUEST_BUF);
    assert_eq!(e.handle_host_event(ms(1), a, HostEvent::Readable), Ok(()));
    assert_eq!(e.handle_host_event(ms(1), b, HostEvent::Readable), Ok(()));
    expect_actions(
        &mut e,
        &[interest(a, false, false), interest(b, false, false)],
    );
    // Full reads: both stay readable, and they alternate.
    for round in 0..3u32 {
        let h = read(&mut e, ms(2), 100, a, 100, 100);
        assert_eq!(
            h,
            host_pkt(Op::Rw, 80, 1000, 100, 0, BUF, 0),
            "round {round}"
        );
        let h = read(&mut e, ms(2), 100, b, 100, 100);
        assert_eq!(
            h,
            host_pkt(Op::Rw, 80, 1001, 100, 0, BUF, 0),
            "round {round}"
        );
    }
    // A drains; B gets every turn from then on.
    let h = read(&mut e, ms(3), 100, a, 100, 1);
    assert_eq!(h.len.get(), 1);
    read(&mut e, ms(3), 100, b, 100, 100);
    // A's next read finds its socket drained: it waits for readability.
    read_would_block(&mut e, ms(3), 100, a);
    read(&mut e, ms(3), 100, b, 100, 100);
    expect_actions(&mut e, &[interest(a, true, false)]);
    assert_stats!(e, tx_packets: 2, guest_connects: 2, established: 2, rx_packets: 11,
        rx_bytes: 801);
}
