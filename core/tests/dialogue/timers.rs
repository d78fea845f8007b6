//! Time: the clock, timeouts and deadlines.

use crate::helpers::*;

#[test]
fn older_now_is_clamped() {
    let mut e = engine();
    let conn = e.handle_accept(ms(10_000)).expect("room");
    expect_actions(&mut e, &[interest(conn, true, false)]);
    assert_eq!(e.now(), ms(10_000));
    // An input from the past does not move the clock back: its deadline counts from 10 s.
    tx(
        &mut e,
        ms(5_000),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.now(), ms(10_000));
    let g = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(g, false, true)]);
    assert_eq!(e.poll_timeout(), Some(ms(12_000)));
    // A timeout call from the past fires nothing.
    e.handle_timeout(ms(1));
    assert_eq!(e.now(), ms(10_000));
    expect_nothing(&mut e, ms(1));
    e.handle_timeout(ms(12_000));
    assert_eq!(
        expect_rx(&mut e, ms(3), Op::Rst),
        host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0)
    );
    assert_eq!(e.now(), ms(12_000));
    expect_actions(&mut e, &[close(g)]);
    assert_eq!(e.poll_timeout(), Some(ms(15_000)));
    assert_stats!(e, host_accepts: 1, tx_packets: 1, guest_connects: 1, connect_timeout: 1,
        rx_packets: 1, rst_sent: 1, closed: 1);
}

#[test]
fn early_and_repeated_timeouts_are_harmless() {
    let mut e = engine();
    e.handle_timeout(ms(0));
    expect_nothing(&mut e, ms(0));
    let conn = client_reading(&mut e, ms(0));
    for t in [0, 1, 4_999, 4_999] {
        e.handle_timeout(ms(t));
        expect_nothing(&mut e, ms(t));
        assert_eq!(e.conn_state(conn), Some(ConnState::ReadingConnectLine));
    }
    e.handle_timeout(ms(5_000));
    expect_actions(&mut e, &[close(conn)]);
    for t in [5_000, 5_000, 6_000, 60_000] {
        e.handle_timeout(ms(t));
        expect_nothing(&mut e, ms(t));
    }
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, host_accepts: 1, connect_line_timeout: 1, closed: 1);
}

#[test]
fn poll_timeout_reports_the_nearest_deadline() {
    let mut e = engine();
    assert_eq!(e.poll_timeout(), None);
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let g = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(g, false, true)]);
    assert_eq!(e.poll_timeout(), Some(ms(2_000)));
    let h = client_reading(&mut e, ms(1_000));
    assert_eq!(
        e.poll_timeout(),
        Some(ms(2_000)),
        "connect at 2 s, line at 6 s"
    );
    assert_eq!(
        e.handle_host_event(ms(1_100), g, HostEvent::Connected),
        Ok(())
    );
    assert_eq!(
        e.poll_timeout(),
        Some(ms(6_000)),
        "the connect deadline is gone"
    );
    assert_eq!(
        e.handle_connect_line(ms(1_500), h, LineRead::Data(b"CONNECT 7\n")),
        Ok(())
    );
    assert_eq!(
        e.poll_timeout(),
        Some(ms(3_500)),
        "the guest has 2 s to answer"
    );
    // The guest gets our RESPONSE and REQUEST before it answers or sends data.
    while let Some(grant) = e.poll_rx(ms(1_550), 4096) {
        match grant {
            RxGrant::Packet(p) => drop(p.send()),
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(_) => panic!("no data is readable yet"),
        }
    }
    tx(
        &mut e,
        ms(1_600),
        guest_pkt(Op::Response, 7, HPF, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.poll_timeout(), None);
    // A guest that shuts both directions with data still held gets a close deadline.
    let payload = [1u8; 4];
    tx_data(
        &mut e,
        ms(2_000),
        guest_pkt(Op::Rw, 1000, 80, 4, 0, GUEST_BUF, 0),
        &payload,
        Io::WouldBlock,
    );
    tx(
        &mut e,
        ms(2_000),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_BOTH, GUEST_BUF, 0),
    );
    assert_eq!(e.poll_timeout(), Some(ms(10_000)));
}
