//! Handles, ports and limits.

use crate::helpers::*;

#[test]
fn stale_handle_after_close_is_a_counted_no_op() {
    let mut e = engine();
    // Closed and gone: the guest reset it.
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Rst, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[close(a)]);
    assert_eq!(e.conn_state(a), None);
    assert_eq!(
        e.handle_host_event(ms(2), a, HostEvent::Readable),
        Err(ConnError::Stale)
    );
    assert_eq!(
        e.handle_host_write(ms(2), a, Io::Done(1)),
        Err(ConnError::Stale)
    );
    assert_eq!(
        e.handle_connect_line(ms(2), a, LineRead::Eof),
        Err(ConnError::Stale)
    );
    assert_eq!(e.host_bytes(a), Err(ConnError::Stale));
    expect_nothing(&mut e, ms(2));

    // The slot is reused; the old handle still reaches nothing.
    let b = guest_connected(&mut e, ms(3), 1001, 80, GUEST_BUF);
    assert_eq!(b.index(), a.index());
    assert_ne!(b, a);
    assert_eq!(
        e.handle_host_event(ms(3), a, HostEvent::Error(SocketError(ECONNRESET))),
        Err(ConnError::Stale)
    );
    assert_eq!(e.conn_state(b), Some(ConnState::Established));
    expect_nothing(&mut e, ms(3));

    // Close issued while the RST is still on its way to the guest: the handle is already dead.
    assert_eq!(e.reset_connection(ms(4), b), Ok(()));
    expect_actions(&mut e, &[close(b)]);
    assert_eq!(
        e.handle_host_event(ms(4), b, HostEvent::Writable),
        Err(ConnError::Stale)
    );
    assert_eq!(
        e.handle_host_write(ms(4), b, Io::Done(0)),
        Err(ConnError::Stale)
    );
    assert_eq!(e.host_bytes(b), Err(ConnError::Stale));
    expect_actions(&mut e, &[]);
    assert_eq!(
        expect_rx(&mut e, ms(4), Op::Rst),
        host_pkt(Op::Rst, 80, 1001, 0, 0, BUF, 0)
    );
    expect_nothing(&mut e, ms(4));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, tx_packets: 3, guest_connects: 2, established: 2, rx_packets: 3,
        rst_received: 1, resets_by_caller: 1, rst_sent: 1, closed: 2, stale_events: 6);
}

#[test]
fn host_port_allocation_never_collides_with_a_live_connection() {
    const MAX: u32 = u32::MAX;
    let mut e = engine_with(|c| c.host_port_first = MAX - 3);
    // A: the first port.
    let (a, hp_a) = host_requesting(&mut e, ms(0), 5000);
    assert_eq!(hp_a, MAX - 3);
    // The guest connects from 5000 to the next port the allocator would pick.
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Request, 5000, MAX - 2, 0, 0, GUEST_BUF, 0),
    );
    let g = match e.poll_action() {
        Some(Action::Connect { conn, port, .. }) if port == MAX - 2 => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(&mut e, &[interest(g, false, true)]);
    // B skips the port the guest's connection uses.
    let (b, hp_b) = host_requesting(&mut e, ms(2), 5000);
    assert_eq!(hp_b, MAX - 1);
    // The guest refuses A; C wraps around (never u32::MAX) to A's free port.
    tx(&mut e, ms(3), guest_pkt(Op::Rst, 5000, MAX - 3, 0, 0, 0, 0));
    expect_actions(&mut e, &[close(a)]);
    let (c, hp_c) = host_requesting(&mut e, ms(4), 5000);
    assert_eq!(hp_c, MAX - 3);
    // A different guest port may share a host port with a live connection.
    let (d, hp_d) = host_requesting(&mut e, ms(5), 6000);
    assert_eq!(hp_d, MAX - 2);
    // Every live connection keeps its own identity.
    assert_eq!(e.conn_ports(g), Some((5000, MAX - 2)));
    assert_eq!(e.conn_ports(b), Some((5000, MAX - 1)));
    assert_eq!(e.conn_ports(c), Some((5000, MAX - 3)));
    assert_eq!(e.conn_ports(d), Some((6000, MAX - 2)));
    expect_nothing(&mut e, ms(5));
    assert_stats!(e, host_accepts: 4, guest_connects: 1, tx_packets: 2, rx_packets: 4,
        rst_received: 1, connect_refused_by_guest: 1, closed: 1);
}

#[test]
fn full_table_refuses_requests_and_clients() {
    let mut e = engine_with(|c| c.max_connections = 2);
    let a = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let b = e.handle_accept(ms(1)).expect("room for the second");
    expect_actions(&mut e, &[interest(b, true, false)]);
    // The guest's REQUEST is answered with RST at once.
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Request, 1001, 81, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::Rst),
        host_pkt(Op::Rst, 81, 1001, 0, 0, 0, 0)
    );
    expect_nothing(&mut e, ms(2));
    // A host client is refused.
    assert_eq!(e.handle_accept(ms(3)), Err(TableFull));
    expect_nothing(&mut e, ms(3));
    assert_eq!(e.connections(), 2);
    // Room again once one is gone.
    tx(
        &mut e,
        ms(4),
        guest_pkt(Op::Rst, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    expect_actions(&mut e, &[close(a)]);
    let c = e.handle_accept(ms(5)).expect("room again");
    expect_actions(&mut e, &[interest(c, true, false)]);
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 2,
        host_accepts: 2, connection_limit: 1, accept_limit: 1, rst_sent: 1,
        rst_received: 1, closed: 1);
}
