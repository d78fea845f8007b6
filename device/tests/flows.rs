//! Connection life cycles through the device, over real virtqueue memory and real Unix
//! sockets: connect, data, half-close in each direction, resets from each side, and a host
//! client's `CONNECT` exchange.

mod common;

use std::io::Write;
use std::net::Shutdown;

use common::*;
use vsock_core::wire::{Op, SocketType, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND};
use vsock_core::Direction;
use vsock_device::testing::Layout;

const PORT: u32 = 1234;

/// A bed with Linux-like rx buffers always posted.
fn bed() -> Bed {
    let mut bed = Bed::new();
    bed.post_rx(8, &Layout::Single);
    bed
}

/// The guest's payload bytes on `gp`, checking every packet is RW with a matching length.
fn rw_payload(got: &[(vsock_core::wire::Header, Vec<u8>)], gp: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (h, p) in got.iter().filter(|(h, _)| h.dst_port.get() == gp) {
        if op_of(h) == Op::Rw {
            assert_eq!(h.len.get() as usize, p.len(), "RW length matches payload");
            out.extend_from_slice(p);
        }
    }
    out
}

fn ops_to(got: &[(vsock_core::wire::Header, Vec<u8>)], gp: u32) -> Vec<Op> {
    got.iter()
        .filter(|(h, _)| h.dst_port.get() == gp)
        .map(|(h, _)| op_of(h))
        .collect()
}

#[test]
fn guest_connect_is_answered_with_a_response_from_the_host() {
    let mut bed = bed();
    bed.host.listening.insert(PORT);
    bed.send(
        pkt(Op::Request, 40_000, PORT, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    let got = bed.run();
    assert_eq!(got.len(), 1, "exactly one answer: {got:?}");
    let (h, payload) = &got[0];
    assert!(payload.is_empty());
    assert_eq!(op_of(h), Op::Response);
    assert_eq!(h.src_cid.get(), HOST_CID);
    assert_eq!(h.dst_cid.get(), GUEST_CID);
    assert_eq!(h.src_port.get(), PORT);
    assert_eq!(h.dst_port.get(), 40_000);
    assert_eq!(h.type_.get(), SocketType::Stream.to_u16());
    assert_eq!(h.len.get(), 0);
    assert_eq!(h.buf_alloc.get(), 256 * 1024);
    assert_eq!(bed.host.apps.len(), 1, "one host socket connected");
    assert_eq!(bed.device.engine().stats().established, 1);
    assert_eq!(bed.driver.in_flight(1), 0, "the REQUEST's buffer came back");
}

#[test]
fn guest_connect_to_a_port_without_listener_is_reset_at_once() {
    let mut bed = bed();
    bed.send(pkt(Op::Request, 40_001, 999, 0, 0, 0), &[], &Layout::Single);
    let got = bed.run();
    assert_eq!(ops_to(&got, 40_001), vec![Op::Rst]);
    assert!(bed.host.apps.is_empty());
}

#[test]
fn data_flows_both_ways_over_many_packets() {
    let mut bed = bed();
    let gp = 40_002;
    let (conn, _) = bed.connect(gp, PORT);
    let mut sent = Vec::new();
    for i in 0..20u64 {
        let data = pattern(i, 1000 + 97 * i as usize);
        bed.send(
            pkt(Op::Rw, gp, PORT, data.len() as u32, 0, 0),
            &data,
            &Layout::HeaderThenData,
        );
        sent.extend_from_slice(&data);
    }
    bed.run();
    assert_eq!(app_read(bed.host.app(conn)).0, sent, "guest to host");

    let back = pattern(99, 100_000);
    bed.host.app(conn).write_all(&back).unwrap();
    let got = bed.run();
    assert_eq!(rw_payload(&got, gp), back, "host to guest");
    assert_eq!(bed.device.engine().stats().rx_bytes, back.len() as u64);
}

#[test]
fn guest_shutdown_send_gives_the_host_eof_and_host_data_still_flows() {
    let mut bed = bed();
    let gp = 40_003;
    let (conn, _) = bed.connect(gp, PORT);
    bed.send(pkt(Op::Rw, gp, PORT, 5, 0, 0), b"hello", &Layout::Single);
    bed.send(
        pkt(Op::Shutdown, gp, PORT, 0, SHUTDOWN_SEND, 0),
        &[],
        &Layout::Single,
    );
    let got = bed.run();
    assert!(
        !ops_to(&got, gp).contains(&Op::Rst),
        "half-close is not a close: {got:?}"
    );
    let (data, eof) = app_read(bed.host.app(conn));
    assert_eq!(data, b"hello", "the bytes before the shutdown arrive");
    assert!(eof, "the host application sees end of file");
    assert_eq!(bed.host.shut, vec![(conn, Direction::Write)]);

    // The other direction keeps flowing.
    let back = pattern(3, 20_000);
    bed.host.app(conn).write_all(&back).unwrap();
    let got = bed.run();
    assert_eq!(rw_payload(&got, gp), back);
    assert!(!ops_to(&got, gp).contains(&Op::Rst));
    assert!(!bed.host.closed.contains(&conn), "socket still open");

    // The host finishes too: the guest hears SHUTDOWN SEND, then both are done: RST.
    bed.host.app(conn).shutdown(Shutdown::Write).unwrap();
    let got = bed.run();
    let ops = ops_to(&got, gp);
    assert_eq!(ops, vec![Op::Shutdown, Op::Rst], "{got:?}");
    assert_eq!(bed.host.closed, vec![conn]);
}

#[test]
fn host_shutdown_write_gives_the_guest_shutdown_send_and_guest_data_still_flows() {
    let mut bed = bed();
    let gp = 40_004;
    let (conn, _) = bed.connect(gp, PORT);
    bed.host.app(conn).write_all(b"last words").unwrap();
    bed.host.app(conn).shutdown(Shutdown::Write).unwrap();
    let got = bed.run();
    assert_eq!(rw_payload(&got, gp), b"last words");
    let shutdowns: Vec<_> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == gp && op_of(h) == Op::Shutdown)
        .collect();
    assert_eq!(shutdowns.len(), 1, "one SHUTDOWN: {got:?}");
    assert_eq!(shutdowns[0].0.flags.get(), SHUTDOWN_SEND);
    let last = got.last().unwrap();
    assert_eq!(op_of(&last.0), Op::Shutdown, "EOF comes after the data");

    // The guest keeps sending.
    let data = pattern(4, 30_000);
    for chunk in data.chunks(4000) {
        bed.send(
            pkt(Op::Rw, gp, PORT, chunk.len() as u32, 0, 0),
            chunk,
            &Layout::Single,
        );
    }
    let got = bed.run();
    assert!(!ops_to(&got, gp).contains(&Op::Rst), "{got:?}");
    let (read, eof) = app_read(bed.host.app(conn));
    assert_eq!(read, data);
    assert!(!eof, "the host's read side is still open");

    // The guest closes its side too: both directions done, the connection is reset.
    bed.send(
        pkt(Op::Shutdown, gp, PORT, 0, SHUTDOWN_SEND | SHUTDOWN_RCV, 0),
        &[],
        &Layout::Single,
    );
    let got = bed.run();
    assert_eq!(ops_to(&got, gp), vec![Op::Rst]);
    assert_eq!(bed.host.closed, vec![conn]);
    assert!(app_read(bed.host.app(conn)).1, "host application sees EOF");
}

#[test]
fn guest_rst_closes_the_host_socket_silently() {
    let mut bed = bed();
    let gp = 40_005;
    let (conn, _) = bed.connect(gp, PORT);
    bed.host.app(conn).write_all(b"unread").unwrap();
    bed.send(pkt(Op::Rst, gp, PORT, 0, 0, 0), &[], &Layout::Single);
    let got = bed.run();
    assert!(
        ops_to(&got, gp).is_empty(),
        "nothing answers an RST: {got:?}"
    );
    assert_eq!(bed.host.closed, vec![conn]);
    assert!(!bed.host.socks.contains_key(&conn.to_raw()));
    let (_, eof) = app_read(bed.host.app(conn));
    assert!(eof, "the host application sees the close");
    assert_eq!(bed.device.engine().connections(), 0);
    assert_eq!(bed.device.engine().stats().rst_received, 1);
}

#[test]
fn host_close_with_guest_data_pending_resets_the_guest() {
    let mut bed = bed();
    let gp = 40_006;
    let (conn, _) = bed.connect(gp, PORT);
    small_send_buffer(&bed, conn);
    let data = pattern(6, 60_000);
    for chunk in data.chunks(20_000) {
        bed.send(
            pkt(Op::Rw, gp, PORT, chunk.len() as u32, 0, 0),
            chunk,
            &Layout::HeaderThenData,
        );
    }
    let got = bed.run();
    assert!(!ops_to(&got, gp).contains(&Op::Rst));
    assert!(
        bed.device.engine().stats().tx_buffered_bytes > 0,
        "some guest bytes wait in the engine for the socket"
    );
    // The host application goes away without reading.
    let app = bed.host.apps.remove(&conn.to_raw()).unwrap();
    drop(app);
    let got = bed.run();
    let ops = ops_to(&got, gp);
    assert_eq!(ops.last(), Some(&Op::Rst), "guest is reset: {got:?}");
    assert_eq!(ops.iter().filter(|&&o| o == Op::Rst).count(), 1);
    assert_eq!(bed.host.closed, vec![conn]);
    assert_eq!(bed.device.engine().connections(), 0);
}

#[test]
fn guest_data_after_the_host_closed_is_answered_with_rst() {
    let mut bed = bed();
    let gp = 40_007;
    let (conn, _) = bed.connect(gp, PORT);
    drop(bed.host.apps.remove(&conn.to_raw()).unwrap());
    bed.send(pkt(Op::Rw, gp, PORT, 4, 0, 0), b"ping", &Layout::Single);
    let got = bed.run();
    let ops = ops_to(&got, gp);
    assert_eq!(ops.last(), Some(&Op::Rst), "{got:?}");
    assert_eq!(bed.host.closed, vec![conn]);
}

#[test]
fn host_client_connect_reaches_the_guest_listener() {
    let mut bed = bed();
    let now = bed.now;
    let conn = bed.host.accept(bed.device.engine_mut(), now);
    bed.host.app(conn).write_all(b"CONNECT 5000\n").unwrap();
    let got = bed.run();
    assert_eq!(got.len(), 1, "{got:?}");
    let (req, _) = &got[0];
    assert_eq!(op_of(req), Op::Request);
    assert_eq!(req.dst_port.get(), 5000);
    assert_eq!(req.src_cid.get(), HOST_CID);
    assert_eq!(req.dst_cid.get(), GUEST_CID);
    let host_port = req.src_port.get();
    assert_eq!(host_port, 1 << 30, "the first host port");
    assert!(app_read(bed.host.app(conn)).0.is_empty(), "no OK yet");

    // The guest accepts.
    bed.send(
        pkt(Op::Response, 5000, host_port, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    bed.run();
    let (line, eof) = app_read(bed.host.app(conn));
    assert_eq!(line, format!("OK {host_port}\n").as_bytes());
    assert!(!eof);

    // Data both ways on the new connection.
    bed.host.app(conn).write_all(b"from host").unwrap();
    let got = bed.run();
    assert_eq!(rw_payload(&got, 5000), b"from host");
    bed.send(
        pkt(Op::Rw, 5000, host_port, 10, 0, 0),
        b"from guest",
        &Layout::Single,
    );
    bed.run();
    assert_eq!(app_read(bed.host.app(conn)).0, b"from guest");
}

#[test]
fn host_client_refused_by_the_guest_is_closed() {
    let mut bed = bed();
    let now = bed.now;
    let conn = bed.host.accept(bed.device.engine_mut(), now);
    bed.host.app(conn).write_all(b"CONNECT 5001\n").unwrap();
    let got = bed.run();
    let host_port = got[0].0.src_port.get();
    bed.send(pkt(Op::Rst, 5001, host_port, 0, 0, 0), &[], &Layout::Single);
    bed.run();
    assert_eq!(bed.host.closed, vec![conn]);
    let (line, eof) = app_read(bed.host.app(conn));
    assert!(line.is_empty(), "no OK line");
    assert!(eof);
}
