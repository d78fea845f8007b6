//! Commands: abort, stop and reset.

use crate::helpers::*;

/// One connection in each phase: guest-connecting, established (guest), host-connecting and a
/// client still sending its line. Returns them in that order, with the host port of the third.
fn one_of_each(e: &mut Engine) -> ([ConnId; 4], u32) {
    tx(
        e,
        ms(0),
        guest_pkt(Op::Request, 999, 79, 0, 0, GUEST_BUF, 0),
    );
    let connecting = match e.poll_action() {
        Some(Action::Connect { conn, port: 79, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(e, &[interest(connecting, false, true)]);
    let established = guest_connected(e, ms(0), 1000, 80, GUEST_BUF);
    let (requesting, hp) = host_requesting(e, ms(0), 5000);
    let line = client_reading(e, ms(0));
    ([connecting, established, requesting, line], hp)
}

#[test]
fn abort_all_resets_every_connection() {
    let mut e = engine();
    let ([connecting, established, requesting, line], hp) = one_of_each(&mut e);
    e.abort_all(ms(1));
    let mut rsts = Vec::new();
    while let Some(grant) = e.poll_rx(ms(1), ROOM) {
        match grant {
            RxGrant::Packet(p) => rsts.push(p.send()),
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(r) => panic!("unexpected {r:?}"),
        }
    }
    rsts.sort_by_key(|h| h.dst_port.get());
    assert_eq!(
        rsts,
        [
            host_pkt(Op::Rst, 79, 999, 0, 0, BUF, 0),
            host_pkt(Op::Rst, 80, 1000, 0, 0, BUF, 0),
            host_pkt(Op::Rst, hp, 5000, 0, 0, BUF, 0),
        ]
    );
    let mut closed = actions(&mut e);
    closed.sort_by_key(|a| a.conn());
    let mut want = vec![
        close(connecting),
        close(established),
        close(requesting),
        close(line),
    ];
    want.sort_by_key(|a| a.conn());
    assert_eq!(closed, want);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, tx_packets: 2, guest_connects: 2, established: 1, host_accepts: 2,
        rx_packets: 5, rst_sent: 3, closed: 4);
}

#[test]
fn stop_closes_every_socket_and_owes_the_guest_rsts_without_deadline() {
    let mut e = engine();
    let ([connecting, established, requesting, line], hp) = one_of_each(&mut e);
    e.stop(ms(1));
    // The sockets close at once; the guest is told only when it posts buffers again.
    let mut closed = actions(&mut e);
    closed.sort_by_key(|a| a.conn());
    let mut want = vec![
        close(connecting),
        close(established),
        close(requesting),
        close(line),
    ];
    want.sort_by_key(|a| a.conn());
    assert_eq!(closed, want);
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None, "nothing waits for a deadline");
    // However long the VM stays paused.
    e.handle_timeout(ms(3_600_000));
    let mut rsts = Vec::new();
    while let Some(grant) = e.poll_rx(ms(3_600_001), ROOM) {
        match grant {
            RxGrant::Packet(p) => rsts.push(p.send()),
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(r) => panic!("unexpected {r:?}"),
        }
    }
    rsts.sort_by_key(|h| h.dst_port.get());
    assert_eq!(
        rsts,
        [
            host_pkt(Op::Rst, 79, 999, 0, 0, 0, 0),
            host_pkt(Op::Rst, 80, 1000, 0, 0, 0, 0),
            host_pkt(Op::Rst, hp, 5000, 0, 0, 0, 0),
        ]
    );
    expect_nothing(&mut e, ms(3_600_001));
    assert_stats!(e, tx_packets: 2, guest_connects: 2, established: 1, host_accepts: 2,
        rx_packets: 5, rst_sent: 3, closed: 4);
}

#[test]
fn stop_owes_no_more_rsts_than_the_queue_holds() {
    let mut e = engine_with(|c| c.max_pending_resets = 1);
    let _ = one_of_each(&mut e);
    e.stop(ms(1));
    let _ = actions(&mut e);
    let mut n = 0;
    while let Some(grant) = e.poll_rx(ms(1), ROOM) {
        match grant {
            RxGrant::Packet(p) => {
                assert_eq!(p.header().op.get(), Op::Rst.to_u16());
                let _ = p.send();
                n += 1;
            }
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(r) => panic!("unexpected {r:?}"),
        }
    }
    assert_eq!(n, 1);
    assert_eq!(e.stats().rst_queue_full, 2);
}

#[test]
fn reset_closes_every_socket_and_tells_the_guest_nothing() {
    let mut e = engine();
    let ([connecting, established, requesting, line], _) = one_of_each(&mut e);
    // An RST reply is pending too, and data waits in a buffer.
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Rw, 1234, 4321, 0, 0, GUEST_BUF, 0),
    );
    tx_data(
        &mut e,
        ms(0),
        guest_pkt(Op::Rw, 1000, 80, 3, 0, GUEST_BUF, 0),
        b"abc",
        Io::WouldBlock,
    );
    expect_actions(&mut e, &[interest(established, true, true)]);
    e.reset(ms(1));
    expect_no_rx(&mut e, ms(1));
    let mut closed = actions(&mut e);
    closed.sort_by_key(|a| a.conn());
    let mut want = vec![
        close(connecting),
        close(established),
        close(requesting),
        close(line),
    ];
    want.sort_by_key(|a| a.conn());
    assert_eq!(closed, want);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_eq!(
        e.buffer_memory(),
        256 * 1024,
        "the buffer went back to the pool"
    );
    assert_stats!(e, tx_packets: 4, guest_connects: 2, established: 1, host_accepts: 2,
        rx_packets: 2, unknown_connection: 1, tx_bytes: 3, tx_buffered_bytes: 3, closed: 4);
}
