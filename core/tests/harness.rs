//! Whole-session scenarios: a Linux-like guest and scripted host sockets around one engine, on a
//! virtual clock.

mod sim;

use std::time::Duration;

use sim::{assert_bytes_eq, pattern, Listen, Sim, World};
use vsock_core::wire::{Op, SHUTDOWN_BOTH, SHUTDOWN_SEND};
use vsock_core::ConnState;

fn sim() -> Sim {
    Sim::new(Sim::default_config(), World::default())
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let mut s = sim();
    s.host_listen(1234, Listen::Accept);
    let g = s.guest_connect(1234);
    s.run();
    assert!(s.guest.conns[&g].established);
    let conn = s.host_sock_for_port(1234)[0];

    let up = pattern(1, 300_000);
    let down = pattern(2, 500_000);
    s.guest_write(g, &up);
    s.host_write(conn, &down);
    s.run();
    assert_bytes_eq(&s.sock(conn).received, &up);
    assert_bytes_eq(&s.guest.conns[&g].read, &down);
    s.assert_memory_bounded();
    // Every packet fit the guest's 4 KiB buffers.
    assert!(s
        .guest
        .log
        .iter()
        .all(|h| h.len.get() as usize <= 4096 - 44));
}

#[test]
fn host_connects_and_data_flows_both_ways() {
    let mut s = sim();
    s.guest_listen(5000);
    let conn = s.host_connect(b"CONNECT 5000\nfirst bytes").unwrap();
    s.run();
    let (guest_port, host_port) = s.engine.conn_ports(conn).unwrap();
    assert_eq!(guest_port, 5000);
    let g = (guest_port, host_port);
    assert_eq!(
        s.sock(conn).received,
        format!("OK {host_port}\n").into_bytes()
    );
    assert_eq!(s.guest.conns[&g].read, b"first bytes");

    s.guest_write(g, b"reply");
    s.host_write(conn, b" and more");
    s.run();
    assert_eq!(
        &s.sock(conn).received[format!("OK {host_port}\n").len()..],
        b"reply"
    );
    assert_eq!(s.guest.conns[&g].read, b"first bytes and more");
}

#[test]
fn slow_host_reader_loses_nothing_and_memory_stays_bounded() {
    let mut s = Sim::new(
        Sim::default_config(),
        World {
            host_auto_read: false,
            ..World::default()
        },
    );
    s.host_listen(7, Listen::Accept);
    let g = s.guest_connect(7);
    s.run();
    let conn = s.host_sock_for_port(7)[0];
    let data = pattern(3, 4 * 1024 * 1024);
    s.guest_write(g, &data);
    s.run();
    // The guest is blocked on credit: socket buffer (64 KiB) plus our buffer (256 KiB).
    let held = s.engine.conn_stats(conn).unwrap();
    assert_eq!(held.guest_bytes, 64 * 1024 + 256 * 1024);
    assert!(s.engine.buffer_memory() <= 256 * 1024);
    s.assert_memory_bounded();
    // Now the host reads in dribs and drabs; time passes; everything arrives in order.
    let mut rounds = 0;
    while s.sock(conn).received.len() < data.len() {
        s.host_read(conn, 10_000);
        s.run();
        s.advance(Duration::from_millis(1));
        rounds += 1;
        assert!(rounds < 10_000);
    }
    assert_bytes_eq(&s.sock(conn).received, &data);
    assert!(s.engine.stats().credit_updates_sent > 0);
}

#[test]
fn guest_that_stops_reading_is_never_overrun() {
    let mut s = Sim::new(
        Sim::default_config(),
        World {
            guest_auto_read: false,
            ..World::default()
        },
    );
    s.host_listen(7, Listen::Accept);
    let g = s.guest_connect(7);
    s.run();
    let conn = s.host_sock_for_port(7)[0];
    let data = pattern(4, 1024 * 1024);
    s.host_write(conn, &data);
    s.run();
    assert_eq!(
        s.guest.conns[&g].unread.len(),
        sim::GUEST_BUF_ALLOC as usize
    );
    assert_eq!(s.engine.stats().credit_requests_sent, 1);
    s.assert_memory_bounded();
    while s.guest.conns[&g].read.len() < data.len() {
        let n = s.guest.conns[&g].unread.len();
        s.guest_read(g, n);
        s.run();
    }
    assert_bytes_eq(&s.guest.conns[&g].read, &data);
    s.assert_memory_bounded();
}

#[test]
fn guest_that_stops_posting_rx_buffers_stalls_without_growth() {
    let mut s = sim();
    s.host_listen(7, Listen::Accept);
    let g = s.guest_connect(7);
    s.run();
    let conn = s.host_sock_for_port(7)[0];
    s.rx_paused = true;
    s.rx_posted = 0;
    s.host_write(conn, &pattern(5, 100_000));
    for _ in 0..100 {
        s.guest_connect(7);
    }
    s.run();
    s.assert_memory_bounded();
    s.rx_paused = false;
    s.run();
    assert_bytes_eq(&s.guest.conns[&g].read, &pattern(5, 100_000));
}

#[test]
fn half_close_each_way_keeps_the_other_direction() {
    let mut s = sim();
    s.host_listen(9, Listen::Accept);
    let g = s.guest_connect(9);
    s.run();
    let conn = s.host_sock_for_port(9)[0];
    // Guest sends and shuts its write side; the host still sends afterwards.
    s.guest_write(g, b"request");
    s.guest_shutdown(g, SHUTDOWN_SEND);
    s.run();
    assert!(s.sock(conn).app_sees_eof());
    assert_eq!(s.sock(conn).received, b"request");
    assert_eq!(s.engine.conn_state(conn), Some(ConnState::GuestSendShut));
    s.host_write(conn, b"response");
    s.run();
    assert_eq!(s.guest.conns[&g].read, b"response");
    // Host finishes: the connection closes with RST after both sides are done.
    s.host_shutdown_write(conn);
    s.run();
    assert!(s.guest.conns[&g].closed);
    assert!(s.any_sock(conn).closed);
    assert_eq!(s.engine.connections(), 0);

    // The mirror image.
    let g = s.guest_connect(9);
    s.run();
    let conn = *s.host_sock_for_port(9).last().unwrap();
    s.host_write(conn, b"hello");
    s.host_shutdown_write(conn);
    s.run();
    assert_eq!(s.guest.conns[&g].peer_shut, SHUTDOWN_SEND);
    assert_eq!(s.engine.conn_state(conn), Some(ConnState::HostSendShut));
    s.guest_write(g, b"still talking");
    s.run();
    assert_eq!(s.sock(conn).received, b"still talking");
    s.guest_close(g);
    s.run();
    assert!(s.any_sock(conn).closed);
    assert_eq!(s.engine.connections(), 0);
}

#[test]
fn guest_close_with_unflushed_data_is_reset_after_the_close_timeout() {
    let mut s = Sim::new(
        Sim::default_config(),
        World {
            host_auto_read: false,
            ..World::default()
        },
    );
    s.host_listen(9, Listen::Accept);
    let g = s.guest_connect(9);
    s.run();
    let conn = s.host_sock_for_port(9)[0];
    s.guest_write(g, &pattern(6, 200_000));
    s.guest_close(g);
    s.run_for(Duration::from_secs(20));
    assert_eq!(s.engine.stats().close_timeout, 1);
    assert!(s.any_sock(conn).closed);
    assert_eq!(s.engine.connections(), 0);
}

#[test]
fn host_reset_mid_transfer_reaches_the_guest() {
    let mut s = sim();
    s.host_listen(9, Listen::Accept);
    let g = s.guest_connect(9);
    s.run();
    let conn = s.host_sock_for_port(9)[0];
    s.host_close_unread(conn);
    s.run();
    assert!(s.guest.conns[&g].reset);
    assert_eq!(s.engine.stats().host_errors, 1);
    // The host application closing while the guest sends is a reset too (EPIPE on write).
    let g = s.guest_connect(9);
    s.run();
    let conn = *s.host_sock_for_port(9).last().unwrap();
    s.host_close(conn);
    s.run();
    s.guest_write(g, b"into the void");
    s.run();
    assert!(s.guest.conns[&g].reset);
    assert_eq!(s.engine.connections(), 0);
}

/// A host peer that writes its reply and closes without reading what the guest sent: the
/// guest gets every byte of the reply, then the reset (its own bytes were not all read).
#[test]
fn reply_then_close_delivers_the_whole_reply_then_resets() {
    let mut s = sim();
    s.host_listen(9, Listen::Accept);
    let g = s.guest_connect(9);
    s.run();
    let conn = s.host_sock_for_port(9)[0];
    s.sock(conn).auto_read = false;
    s.guest_write(g, &pattern(1, 400_000));
    s.run();
    let reply = pattern(2, 300_000);
    s.host_write(conn, &reply);
    s.host_close_unread(conn);
    s.run();
    let gc = &s.guest.conns[&g];
    assert_bytes_eq(&gc.read, &reply);
    assert!(
        gc.reset,
        "the guest's unread bytes are only told by a reset"
    );
    assert_eq!(s.engine.connections(), 0);
}

#[test]
fn guest_connect_without_listener_is_reset_at_once() {
    let mut s = sim();
    let g = s.guest_connect(4444);
    let start = s.now;
    s.run();
    assert!(s.guest.conns[&g].reset);
    assert_eq!(s.now, start, "no time passed: the RST came at once");
    assert_eq!(s.engine.stats().connect_failed, 1);
}

#[test]
fn host_connect_to_a_port_nobody_listens_on_is_closed() {
    let mut s = sim();
    let conn = s.host_connect(b"CONNECT 77\n").unwrap();
    s.run();
    let sock = s.any_sock(conn);
    assert!(sock.closed);
    assert!(sock.received.is_empty(), "no OK line");
    assert_eq!(s.engine.stats().connect_refused_by_guest, 1);
}

#[test]
fn many_connections_each_moving_data() {
    // 300 host clients connect at once, so all may be reading their CONNECT line together.
    let mut config = Sim::default_config();
    config.max_pending_host_clients = 300;
    let mut s = Sim::new(config, World::default());
    s.host_listen(80, Listen::Accept);
    s.guest_listen(81);
    let mut guest_side = Vec::new();
    for i in 0..300 {
        let g = s.guest_connect(80);
        s.guest_write(g, &pattern(i, 5000));
        guest_side.push((g, i));
    }
    let mut host_side = Vec::new();
    for i in 0..300u64 {
        let mut bytes = b"CONNECT 81\n".to_vec();
        bytes.extend(pattern(1000 + i, 7000));
        host_side.push((s.host_connect(&bytes).unwrap(), i));
    }
    s.run();
    for (g, i) in guest_side {
        let conn = s
            .host
            .values()
            .find(|h| s.engine.conn_ports(h.conn) == Some(g))
            .unwrap()
            .conn;
        assert_bytes_eq(&s.host[&conn.to_raw()].received, &pattern(i, 5000));
    }
    for (conn, i) in host_side {
        let g = s.engine.conn_ports(conn).unwrap();
        assert_bytes_eq(&s.guest.conns[&g].read, &pattern(1000 + i, 7000));
    }
    s.assert_memory_bounded();
}

#[test]
fn host_clients_still_sending_connect_cannot_fill_the_table() {
    let mut config = Sim::default_config();
    config.max_pending_host_clients = 4;
    let mut s = Sim::new(config, World::default());
    s.host_listen(80, Listen::Accept);
    s.guest_listen(5000);
    // Four silent clients take all the room for pending clients...
    let slow: Vec<_> = (0..4)
        .map(|_| s.host_connect(b"CONN").expect("room"))
        .collect();
    s.run();
    // ...a prompt client still gets in, and the one that waited longest makes room...
    let prompt = s
        .host_connect(b"CONNECT 5000\n")
        .expect("a prompt client is accepted");
    s.run();
    assert_eq!(s.engine.stats().pending_evicted, 1);
    assert_eq!(s.engine.stats().accept_limit, 0);
    assert!(
        s.any_sock(slow[0]).closed,
        "the oldest pending client was closed"
    );
    assert!(slow[1..].iter().all(|&c| !s.any_sock(c).closed));
    assert!(
        s.any_sock(prompt).received.starts_with(b"OK "),
        "the prompt client is served"
    );
    // ...and the guest can still connect.
    let g = s.guest_connect(80);
    s.run();
    assert!(s.guest.conns[&g].established);
}

/// A storm of slow clients never keeps a prompt one out, however many there are.
#[test]
fn a_flood_of_slow_clients_never_keeps_a_prompt_one_out() {
    let mut config = Sim::default_config();
    config.max_pending_host_clients = 8;
    let mut s = Sim::new(config, World::default());
    s.guest_listen(5000);
    for _ in 0..300 {
        assert!(s.host_connect(b"CONNECT 50").is_some());
        s.run_bounded(100);
    }
    let prompt = s.host_connect(b"CONNECT 5000\n").expect("accepted");
    s.run();
    assert!(s.any_sock(prompt).received.starts_with(b"OK "));
    assert_eq!(s.engine.stats().pending_evicted, 300 - 8 + 1);
    assert!(s.engine.connections() <= 8 + 1);
}

#[test]
fn connect_close_cycles_leave_nothing_behind() {
    let mut s = sim();
    s.host_listen(80, Listen::Accept);
    for i in 0..500 {
        let g = s.guest_connect(80);
        s.guest_write(g, &pattern(i, 100));
        s.guest_close(g);
        s.run();
    }
    assert_eq!(s.engine.connections(), 0);
    assert!(s.host.is_empty());
    assert_eq!(s.engine.stats().closed, 500);
    assert!(
        s.guest
            .log
            .iter()
            .filter(|h| h.op.get() == Op::Rst.to_u16())
            .count()
            == 500
    );
    let _ = SHUTDOWN_BOTH;
}
