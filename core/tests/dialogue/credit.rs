//! Data and credit, guest to host and host to guest.

use crate::helpers::*;

// -------------------------------------------------------------------------------------------
// Guest to host data and credit

#[test]
fn guest_data_goes_straight_to_the_socket() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let direct = tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 5, 0, GUEST_BUF, 0),
        b"hello",
        Io::Done(5),
    );
    assert!(direct, "an idle writable socket takes the payload directly");
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.buffer_memory(), 0, "nothing was buffered");
    let cs = e.conn_stats(conn).expect("live");
    assert_eq!(
        (
            cs.guest_packets,
            cs.guest_bytes,
            cs.host_written,
            cs.buffered_bytes
        ),
        (2, 5, 5, 0)
    );
    assert_stats!(e, tx_packets: 2, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 5, tx_direct_bytes: 5);
}

#[test]
fn partial_write_buffers_the_rest_and_flushes_on_writable() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let direct = tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 10, 0, GUEST_BUF, 0),
        b"0123456789",
        Io::Done(4),
    );
    assert!(direct);
    expect_actions(&mut e, &[interest(conn, true, true)]);
    assert_eq!(flush_bytes(&e, conn), b"456789");
    // More data while bytes are buffered: never written directly (order), just buffered.
    let direct = tx_data(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1000, 80, 3, 0, GUEST_BUF, 0),
        b"abc",
        Io::Done(0),
    );
    assert!(!direct);
    expect_nothing(&mut e, ms(2));
    assert_eq!(flush_bytes(&e, conn), b"456789abc");

    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(e.handle_host_write(ms(3), conn, Io::Done(5)), Ok(()));
    expect_actions(&mut e, &[interest(conn, true, true)]);
    assert_eq!(flush_bytes(&e, conn), b"9abc");
    assert_eq!(
        e.handle_host_event(ms(4), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(e.handle_host_write(ms(4), conn, Io::Done(4)), Ok(()));
    expect_nothing(&mut e, ms(4));
    assert_eq!(flush_bytes(&e, conn), b"");

    // fwd_cnt counts every byte the socket took.
    tx(
        &mut e,
        ms(5),
        guest_pkt(Op::CreditRequest, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(5), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, BUF, 13)
    );
    let cs = e.conn_stats(conn).expect("live");
    assert_eq!(
        (cs.guest_bytes, cs.host_written, cs.buffered_bytes),
        (13, 13, 9)
    );
    assert_stats!(e, tx_packets: 4, guest_connects: 1, established: 1, rx_packets: 2,
        tx_bytes: 13, tx_direct_bytes: 4, tx_buffered_bytes: 9, credit_updates_sent: 1);
}

#[test]
fn credit_update_when_forwarded_bytes_cross_the_threshold() {
    let mut e = engine_with(small_buffers);
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let payload = vec![7u8; 2000];
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 2000, 0, GUEST_BUF, 0),
        &payload,
        Io::Done(2000),
    );
    // 2000 < 2048 forwarded, and the guest still sees 6192 free: no update yet.
    expect_nothing(&mut e, ms(1));
    tx_data(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1000, 80, 100, 0, GUEST_BUF, 0),
        &payload[..100],
        Io::Done(100),
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, 8192, 2100)
    );
    expect_nothing(&mut e, ms(2));
    let _ = conn;
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        tx_bytes: 2100, tx_direct_bytes: 2100, credit_updates_sent: 1);
}

#[test]
fn credit_update_when_the_guest_sees_our_buffer_nearly_full() {
    let mut e = engine_with(small_buffers);
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let payload = vec![7u8; 4096];
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 4096, 0, GUEST_BUF, 0),
        &payload,
        Io::WouldBlock,
    );
    expect_actions(&mut e, &[interest(conn, true, true)]);
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 3000, 0, GUEST_BUF, 0),
        &payload[..3000],
        Io::Done(0),
    );
    // Nothing was forwarded: nothing to announce.
    expect_nothing(&mut e, ms(1));
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Writable),
        Ok(())
    );
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(e.handle_host_write(ms(2), conn, Io::Done(100)), Ok(()));
    expect_actions(&mut e, &[interest(conn, true, true)]);
    // Only 100 bytes forwarded, but the guest believes 1096 bytes are free (< 2048).
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, 8192, 100)
    );
    expect_nothing(&mut e, ms(2));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        tx_bytes: 7096, tx_buffered_bytes: 7096, credit_updates_sent: 1);
}

#[test]
fn credit_request_is_answered() {
    let mut e = engine();
    guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 3, 0, GUEST_BUF, 0),
        b"abc",
        Io::Done(3),
    );
    expect_nothing(&mut e, ms(1));
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::CreditRequest, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[]);
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, BUF, 3)
    );
    expect_nothing(&mut e, ms(2));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        tx_bytes: 3, tx_direct_bytes: 3, credit_updates_sent: 1);
}

// -------------------------------------------------------------------------------------------
// Host to guest data and credit

#[test]
fn host_data_read_is_bounded_by_room_credit_and_packet_size() {
    let mut e = engine_with(|c| c.max_packet_payload = 1000);
    let conn = guest_connected(&mut e, ms(0), 1000, 80, 2500);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    // Room-bound: a small rx buffer.
    let h = read(&mut e, ms(1), 300, conn, 300, 300);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 300, 0, BUF, 0));
    // Packet-size-bound: credit 2200, room 4052.
    let h = read(&mut e, ms(1), ROOM, conn, 1000, 1000);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 1000, 0, BUF, 0));
    // Credit-bound: 2500 - 1300 = 1200 > 1000, then 200.
    let h = read(&mut e, ms(1), ROOM, conn, 1000, 1000);
    assert_eq!(h.len.get(), 1000);
    let h = read(&mut e, ms(1), ROOM, conn, 200, 150);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 150, 0, BUF, 0));
    // Only a read that would block proves the socket drained.
    read_would_block(&mut e, ms(1), ROOM, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.conn_stats(conn).map(|s| s.host_bytes), Some(2450));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 5,
        rx_bytes: 2450);
}

#[test]
fn exhausted_guest_credit_asks_once_and_resumes_on_update() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, 100);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    let h = read(&mut e, ms(1), ROOM, conn, 100, 100);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 100, 0, BUF, 0));
    // No credit: one CREDIT_REQUEST, then nothing however often we ask.
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::CreditRequest),
        host_pkt(Op::CreditRequest, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(1));
    expect_nothing(&mut e, ms(2));
    // A guest packet that does not change its credit does not trigger a second request.
    tx(
        &mut e,
        ms(3),
        guest_pkt(Op::CreditRequest, 1000, 80, 0, 0, 100, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::CreditUpdate),
        host_pkt(Op::CreditUpdate, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(3));
    // The guest read 60 bytes: 60 bytes of credit.
    tx(
        &mut e,
        ms(4),
        guest_pkt(Op::CreditUpdate, 1000, 80, 0, 0, 100, 60),
    );
    let h = read(&mut e, ms(4), ROOM, conn, 60, 60);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 60, 0, BUF, 0));
    assert_eq!(
        expect_rx(&mut e, ms(4), Op::CreditRequest),
        host_pkt(Op::CreditRequest, 80, 1000, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(4));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 6,
        rx_bytes: 160, credit_requests_sent: 2, credit_updates_sent: 1);
}

#[test]
fn dropped_grant_changes_nothing() {
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
    expect_actions(&mut e, &[interest(conn, true, false)]);
    // A packet grant dropped: the same packet again.
    let stats = e.stats().clone();
    let first = match e.poll_rx(ms(1), ROOM) {
        Some(RxGrant::Packet(p)) => *p.header(),
        _ => panic!("expected the RESPONSE"),
    };
    assert_eq!(*e.stats(), stats);
    assert_eq!(
        expect_rx(&mut e, ms(1), Op::Response),
        first,
        "same packet after a drop"
    );

    // A read grant dropped: the same grant again, and the credit is untouched.
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    let stats = e.stats().clone();
    drop(expect_read(&mut e, ms(2), ROOM, conn, ROOM));
    drop(expect_read(&mut e, ms(2), ROOM, conn, ROOM));
    assert_eq!(*e.stats(), stats);
    assert_eq!(e.conn_stats(conn).map(|s| s.host_packets), Some(1));
    let h = read(&mut e, ms(2), ROOM, conn, ROOM, 10);
    assert_eq!(h, host_pkt(Op::Rw, 80, 1000, 10, 0, BUF, 0));
    read_would_block(&mut e, ms(2), ROOM, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 2,
        rx_bytes: 10);
}

#[test]
fn would_block_read_sends_nothing() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    expect_actions(&mut e, &[interest(conn, false, false)]);
    let r = expect_read(&mut e, ms(1), ROOM, conn, ROOM);
    assert_eq!(r.complete(Io::WouldBlock, &mut &[][..]), Ok(None));
    expect_actions(&mut e, &[interest(conn, true, false)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    assert_stats!(e, tx_packets: 1, guest_connects: 1, established: 1, rx_packets: 1);
}
