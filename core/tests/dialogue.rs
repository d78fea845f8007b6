//! One test per protocol rule, each written as a short dialogue at explicit timestamps between a
//! scripted guest, scripted host sockets and the engine.
//!
//! Every packet the engine sends the guest is compared field by field, every socket action
//! exactly (interest changes included), and the engine's counters in full: `assert_stats!` lists
//! the counters that must be non-zero and requires every other one to be zero.

use vsock_core::wire::{
    Header, Op, CONNECT_LINE_MAX, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};
use vsock_core::{
    Action, Config, ConnError, ConnId, ConnState, Direction, Engine, HostEvent, Instant, Interest,
    Io, LineRead, Origin, RxGrant, RxRead, SocketError, Stats, TableFull, Tx,
};

const GUEST_CID: u64 = 3;
const STREAM: u16 = 1;
/// `buffer_size` of `Config::new`: the `buf_alloc` in every header we send.
const BUF: u32 = 256 * 1024;
/// The guest's receive buffer (Linux's default).
const GUEST_BUF: u32 = 256 * 1024;
/// Payload room of a Linux rx buffer (4 KiB minus the header).
const ROOM: usize = 4096 - 44;
/// `host_port_first` of `Config::new`.
const HPF: u32 = 1 << 30;

const ECONNREFUSED: i32 = 111;
const ECONNRESET: i32 = 104;
const EPIPE: i32 = 32;

// -------------------------------------------------------------------------------------------
// Helpers

fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

fn engine() -> Engine {
    engine_with(|_| {})
}

fn engine_with(f: impl FnOnce(&mut Config)) -> Engine {
    let mut config = Config::new(GUEST_CID);
    f(&mut config);
    Engine::new(config, ms(0)).expect("valid config")
}

/// A packet from the guest to the host.
fn guest_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Header {
        src_cid: GUEST_CID.into(),
        dst_cid: HOST_CID.into(),
        src_port: src_port.into(),
        dst_port: dst_port.into(),
        len: len.into(),
        type_: STREAM.into(),
        op: op.to_u16().into(),
        flags: flags.into(),
        buf_alloc: buf_alloc.into(),
        fwd_cnt: fwd_cnt.into(),
    }
}

/// A packet from the host to the guest, as the engine must produce it.
fn host_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Header {
        src_cid: HOST_CID.into(),
        dst_cid: GUEST_CID.into(),
        src_port: src_port.into(),
        dst_port: dst_port.into(),
        len: len.into(),
        type_: STREAM.into(),
        op: op.to_u16().into(),
        flags: flags.into(),
        buf_alloc: buf_alloc.into(),
        fwd_cnt: fwd_cnt.into(),
    }
}

/// Feeds a guest packet that carries no payload; the engine must not ask for one.
fn tx(e: &mut Engine, now: Instant, h: Header) {
    match e.handle_tx(now, &h) {
        Tx::Done => {}
        Tx::Data(d) => {
            let len = d.len();
            // Complete it so the drop does not reset the connection before the panic reports.
            let _ = d.complete(Io::Done(0), &mut &vec![0; len][..]);
            panic!("packet {h:?} was offered to a socket ({len} bytes)");
        }
    }
}

/// Feeds a guest RW packet whose payload must be offered to the socket; `written` is what the
/// socket took of a direct write. Returns whether the engine asked for a direct write.
fn tx_data(e: &mut Engine, now: Instant, h: Header, payload: &[u8], written: Io) -> bool {
    assert_eq!(h.len.get() as usize, payload.len(), "test bug: len");
    match e.handle_tx(now, &h) {
        Tx::Data(d) => {
            assert_eq!(d.len(), payload.len());
            let direct = d.direct();
            assert_eq!(d.complete(written, &mut &payload[..]), Ok(()));
            direct
        }
        Tx::Done => panic!("RW {h:?} was not offered to the socket"),
    }
}

/// The next guest packet must be a control packet (or held data) with this op: send it.
fn expect_rx(e: &mut Engine, now: Instant, op: Op) -> Header {
    let (h, payload) = expect_rx_payload(e, now, op);
    assert!(payload.is_empty(), "{op:?} carries a payload: {payload:?}");
    h
}

/// The next guest packet must be a packet with this op: send it and return it with its payload.
fn expect_rx_payload(e: &mut Engine, now: Instant, op: Op) -> (Header, Vec<u8>) {
    match e.poll_rx(now, ROOM) {
        Some(RxGrant::Packet(p)) => {
            assert_eq!(
                p.header().op.get(),
                op.to_u16(),
                "expected {op:?}, got {:?}",
                p.header()
            );
            let payload = p.payload().to_vec();
            assert_eq!(p.header().len.get() as usize, payload.len());
            (p.send(), payload)
        }
        Some(RxGrant::Read(r)) => panic!("expected {op:?}, got {r:?}"),
        None => panic!("expected {op:?}, got nothing"),
    }
}

/// The next guest packet must be a read grant for `conn` of exactly `max` bytes.
fn expect_read(e: &mut Engine, now: Instant, room: usize, conn: ConnId, max: usize) -> RxRead<'_> {
    match e.poll_rx(now, room) {
        Some(RxGrant::Read(r)) => {
            assert_eq!((r.conn(), r.max()), (conn, max), "read grant");
            r
        }
        Some(RxGrant::Packet(p)) => panic!("expected a read grant, got {p:?}"),
        None => panic!("expected a read grant, got nothing"),
    }
}

/// A read grant for `conn` of `max` bytes, completed with `n` bytes read: the header sent.
fn read(e: &mut Engine, now: Instant, room: usize, conn: ConnId, max: usize, n: usize) -> Header {
    let r = expect_read(e, now, room, conn, max);
    r.complete(Io::Done(n), &mut &vec![0u8; n][..])
        .expect("read within the grant")
        .expect("a packet for the guest")
}

fn expect_no_rx(e: &mut Engine, now: Instant) {
    if let Some(g) = e.poll_rx(now, ROOM) {
        match g {
            RxGrant::Packet(p) => panic!("unexpected packet {p:?}"),
            RxGrant::Read(r) => panic!("unexpected {r:?}"),
        }
    }
}

fn actions(e: &mut Engine) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = e.poll_action() {
        out.push(a);
        assert!(out.len() < 1000, "poll_action never ends: {out:?}");
    }
    out
}

fn expect_actions(e: &mut Engine, want: &[Action]) {
    assert_eq!(actions(e), want);
}

fn expect_nothing(e: &mut Engine, now: Instant) {
    expect_actions(e, &[]);
    expect_no_rx(e, now);
}

fn interest(conn: ConnId, readable: bool, writable: bool) -> Action {
    Action::Interest {
        conn,
        interest: Interest { readable, writable },
    }
}

fn close(conn: ConnId) -> Action {
    Action::Close { conn }
}

/// The bytes a flush would write, joined.
fn flush_bytes(e: &Engine, conn: ConnId) -> Vec<u8> {
    let [a, b] = e.host_bytes(conn).expect("live connection");
    [a, b].concat()
}

/// Checks every counter: those named have the values given, all others are zero.
macro_rules! assert_stats {
    ($e:expr $(, $field:ident : $value:expr)* $(,)?) => {{
        #[allow(unused_mut)]
        let mut want = Stats::default();
        $(want.$field = $value;)*
        assert_eq!(*$e.stats(), want);
    }};
}

/// After a short read the engine reads the socket again; this read finds it drained.
fn read_would_block(e: &mut Engine, now: Instant, room: usize, conn: ConnId) {
    match e.poll_rx(now, room) {
        Some(RxGrant::Read(r)) => {
            assert_eq!(r.conn(), conn, "read grant");
            assert_eq!(r.complete(Io::WouldBlock, &mut &[][..]), Ok(None));
        }
        Some(RxGrant::Packet(p)) => panic!("expected a read, got {:?}", p.header()),
        None => panic!("expected a read, got nothing"),
    }
}

/// After a read that did not fill its room, the engine reads again until the socket would
/// block, and only then waits for readability.
fn line_would_block(e: &mut Engine, now: Instant, conn: ConnId, max: usize) {
    expect_actions(e, &[Action::ReadConnectLine { conn, max }]);
    assert_eq!(
        e.handle_connect_line(now, conn, LineRead::WouldBlock),
        Ok(())
    );
    expect_actions(e, &[interest(conn, true, false)]);
}

/// The guest connects from `gp` to `hp` at `now`, the socket connects at once, the RESPONSE
/// goes out. Counters: tx_packets 1, guest_connects 1, established 1, rx_packets 1.
fn guest_connected(e: &mut Engine, now: Instant, gp: u32, hp: u32, guest_buf: u32) -> ConnId {
    tx(e, now, guest_pkt(Op::Request, gp, hp, 0, 0, guest_buf, 0));
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, port }) => {
            assert_eq!(port, hp);
            conn
        }
        other => panic!("expected Connect, got {other:?}"),
    };
    expect_actions(e, &[interest(conn, false, true)]);
    assert_eq!(e.handle_host_event(now, conn, HostEvent::Connected), Ok(()));
    expect_actions(e, &[interest(conn, true, false)]);
    let buf = e.config().buffer_size;
    assert_eq!(
        expect_rx(e, now, Op::Response),
        host_pkt(Op::Response, hp, gp, 0, 0, buf, 0)
    );
    expect_nothing(e, now);
    conn
}

/// A host client is accepted and its socket turns readable: the engine asks for its line.
/// Counters: host_accepts 1.
fn client_reading(e: &mut Engine, now: Instant) -> ConnId {
    let conn = e.handle_accept(now).expect("room in the table");
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

/// A host client sends `CONNECT <gp>\n`, the REQUEST goes out with the returned host port.
/// Counters: host_accepts 1, rx_packets 1.
fn host_requesting(e: &mut Engine, now: Instant, gp: u32) -> (ConnId, u32) {
    let conn = client_reading(e, now);
    let line = format!("CONNECT {gp}\n");
    assert_eq!(
        e.handle_connect_line(now, conn, LineRead::Data(line.as_bytes())),
        Ok(())
    );
    expect_actions(e, &[]);
    let h = expect_rx(e, now, Op::Request);
    let hp = h.src_port.get();
    let buf = e.config().buffer_size;
    assert_eq!(h, host_pkt(Op::Request, hp, gp, 0, 0, buf, 0));
    assert_eq!(e.conn_ports(conn), Some((gp, hp)));
    (conn, hp)
}

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
        Some(Action::Connect { conn, port: 80 }) => conn,
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
        Some(Action::Connect { conn, port: 80 }) => conn,
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
        Some(Action::Connect { conn, port: 80 }) => conn,
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

// -------------------------------------------------------------------------------------------
// Opening: CONNECT lines that fail

/// A host client whose line read reports `read`: the engine must close it, tell the guest
/// nothing and count it once.
fn line_refused(read: LineRead<'_>) -> Engine {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    assert_eq!(e.handle_connect_line(ms(1), conn, read), Ok(()));
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Err(ConnError::Stale)
    );
    e
}

#[test]
fn connect_line_garbage_closes_client() {
    let e = line_refused(LineRead::Data(b"GET / HTTP/1.1\r\n"));
    assert_stats!(e, host_accepts: 1, connect_line_garbage: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_bad_port_closes_client() {
    let e = line_refused(LineRead::Data(b"CONNECT 4294967295\n"));
    assert_stats!(e, host_accepts: 1, connect_line_bad_port: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_eof_closes_client() {
    let e = line_refused(LineRead::Eof);
    assert_stats!(e, host_accepts: 1, connect_line_eof: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_read_error_closes_client() {
    let e = line_refused(LineRead::Error(SocketError(ECONNRESET)));
    assert_stats!(e, host_accepts: 1, host_errors: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_too_long_closes_client() {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    let mut line = b"CONNECT ".to_vec();
    line.resize(CONNECT_LINE_MAX, b'1');
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(&line[..40])),
        Ok(())
    );
    line_would_block(&mut e, ms(1), conn, CONNECT_LINE_MAX - 40);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    // Never asked for more than fits.
    expect_actions(
        &mut e,
        &[
            Action::ReadConnectLine {
                conn,
                max: CONNECT_LINE_MAX - 40,
            },
            interest(conn, false, false),
        ],
    );
    assert_eq!(
        e.handle_connect_line(ms(2), conn, LineRead::Data(&line[40..])),
        Ok(())
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(2));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, host_accepts: 1, connect_line_too_long: 1, closed: 1);
}

#[test]
fn connect_line_timeout_closes_client() {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 50")),
        Ok(())
    );
    line_would_block(&mut e, ms(1), conn, CONNECT_LINE_MAX - 10);
    assert_eq!(e.poll_timeout(), Some(ms(5000)));
    e.handle_timeout(ms(4999));
    expect_nothing(&mut e, ms(4999));
    e.handle_timeout(ms(5000));
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(5000));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, host_accepts: 1, connect_line_timeout: 1, closed: 1);
}

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

fn small_buffers(c: &mut Config) {
    c.buffer_size = 8192;
    c.credit_update_threshold = 2048;
    c.max_packet_payload = 4096;
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

// -------------------------------------------------------------------------------------------
// Half-close and close

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

// -------------------------------------------------------------------------------------------
// Handles, ports and limits

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
        Some(Action::Connect { conn, port }) if port == MAX - 2 => conn,
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

// -------------------------------------------------------------------------------------------
// Order and fairness

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

// -------------------------------------------------------------------------------------------
// Time

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

// -------------------------------------------------------------------------------------------
// Addressing

#[test]
fn wrong_cid_is_dropped_and_counted() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    // Another guest's RST and REQUEST, and packets not addressed to the host.
    for (src, dst, op) in [
        (4, HOST_CID, Op::Rst),
        (4, HOST_CID, Op::Request),
        (GUEST_CID, GUEST_CID, Op::Request),
        (GUEST_CID, 1, Op::CreditRequest),
    ] {
        let mut h = guest_pkt(op, 1000, 80, 0, 0, GUEST_BUF, 0);
        h.src_cid = src.into();
        h.dst_cid = dst.into();
        tx(&mut e, ms(1), h);
        expect_nothing(&mut e, ms(1));
    }
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    assert_stats!(e, tx_packets: 5, guest_connects: 1, established: 1, rx_packets: 1,
        wrong_cid: 4);
}

#[test]
fn shutdown_rcv_shuts_the_socket_read_side_and_stops_reads() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_RCV, GUEST_BUF, 0),
    );
    expect_actions(
        &mut e,
        &[
            Action::Shutdown {
                conn,
                direction: Direction::Read,
            },
            interest(conn, false, false),
        ],
    );
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    expect_nothing(&mut e, ms(2));
    // Guest to host still flows.
    assert!(tx_data(
        &mut e,
        ms(3),
        guest_pkt(Op::Rw, 1000, 80, 2, 0, GUEST_BUF, 0),
        b"hi",
        Io::Done(2),
    ));
    expect_nothing(&mut e, ms(3));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 2, tx_direct_bytes: 2);
}

// -------------------------------------------------------------------------------------------
// Commands

/// One connection in each phase: guest-connecting, established (guest), host-connecting and a
/// client still sending its line. Returns them in that order, with the host port of the third.
fn one_of_each(e: &mut Engine) -> ([ConnId; 4], u32) {
    tx(
        e,
        ms(0),
        guest_pkt(Op::Request, 999, 79, 0, 0, GUEST_BUF, 0),
    );
    let connecting = match e.poll_action() {
        Some(Action::Connect { conn, port: 79 }) => conn,
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

// -------------------------------------------------------------------------------------------
// Rules from review: nothing changes before the guest has seen it, and only a flush's own
// result moves bytes.

#[test]
fn response_before_the_request_reached_the_guest_is_refused() {
    let mut e = engine();
    let h = client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), h, LineRead::Data(b"CONNECT 7\n")),
        Ok(())
    );
    // The REQUEST is owed but not delivered; the port it will carry is the first one.
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Response, 7, HPF, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.stats().unexpected_response, 1);
    // The connection is reset: the guest gets an RST, never the stale REQUEST, and the
    // client its close.
    assert_eq!(expect_rx(&mut e, ms(3), Op::Rst).dst_port.get(), 7);
    expect_actions(&mut e, &[close(h)]);
    expect_no_rx(&mut e, ms(3));
}

#[test]
fn data_before_the_response_reached_the_guest_is_refused() {
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
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Connected),
        Ok(())
    );
    // The RESPONSE is owed but not delivered: the guest cannot know it may send.
    // It is refused without reaching the socket.
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1000, 80, 10, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.stats().data_after_shutdown, 1);
    assert_eq!(expect_rx(&mut e, ms(3), Op::Rst).dst_port.get(), 1000);
}

#[test]
fn a_write_result_without_a_flush_is_refused_and_changes_nothing() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let payload = [5u8; 100];
    // The socket takes 40 bytes; 60 wait in the buffer, and no Flush is out yet.
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 100, 0, GUEST_BUF, 0),
        &payload,
        Io::Done(40),
    );
    assert_eq!(
        e.handle_host_write(ms(2), conn, Io::Done(60)),
        Err(ConnError::WrongState)
    );
    assert_eq!(flush_bytes(&e, conn).len(), 60, "the buffer is untouched");
    // Once writable, the Flush goes out and its result is taken, once.
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    let acts = actions(&mut e);
    assert!(acts.contains(&Action::Flush { conn }), "{acts:?}");
    assert_eq!(e.handle_host_write(ms(4), conn, Io::Done(60)), Ok(()));
    assert_eq!(
        e.handle_host_write(ms(5), conn, Io::Done(60)),
        Err(ConnError::WrongState),
        "a second report of the same write"
    );
    assert_eq!(e.conn_stats(conn).unwrap().host_written, 100);
}

#[test]
fn reset_connection_sends_rst_and_closes() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(e.reset_connection(ms(1), conn), Ok(()));
    assert_eq!(e.stats().resets_by_caller, 1);
    expect_actions(&mut e, &[close(conn)]);
    let rst = expect_rx(&mut e, ms(2), Op::Rst);
    assert_eq!((rst.src_port.get(), rst.dst_port.get()), (80, 1000));
    assert_eq!(e.reset_connection(ms(3), conn), Err(ConnError::Stale));
}

#[test]
fn end_of_file_behind_a_short_read_is_not_missed() {
    // An edge-triggered caller reports the socket readable once, for data and the peer's
    // shutdown together. The short read that takes the data must not be taken as "drained".
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    let h = read(&mut e, ms(1), 4052, conn, 4052, 5);
    assert_eq!(h.len.get(), 5);
    // No new event comes; the engine reads again and finds the end of file.
    let h = read(&mut e, ms(1), 4052, conn, 4052, 0);
    assert_eq!(h.op.get(), Op::Shutdown.to_u16());
    assert_eq!(h.flags.get(), SHUTDOWN_SEND);
}
