//! What every dialogue shares: the engine under test, packet builders, and the checks.

pub use vsock_core::testing::{guest_pkt, host_pkt, GUEST_CID};
pub use vsock_core::wire::{
    Header, Op, CONNECT_LINE_MAX, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};
pub use vsock_core::{
    Action, Config, ConnError, ConnId, ConnState, Direction, Engine, HostEvent, Instant, Interest,
    Io, LineRead, Origin, RxGrant, RxRead, SocketError, Stats, TableFull, Tx,
};

/// `buffer_size` of `Config::new`: the `buf_alloc` in every header we send.
pub const BUF: u32 = 256 * 1024;
/// The guest's receive buffer (Linux's default).
pub const GUEST_BUF: u32 = 256 * 1024;
/// Payload room of a Linux rx buffer (4 KiB minus the header).
pub const ROOM: usize = 4096 - 44;
/// `host_port_first` of `Config::new`.
pub const HPF: u32 = 1 << 30;

pub const ECONNREFUSED: i32 = 111;
pub const ECONNRESET: i32 = 104;
pub const EPIPE: i32 = 32;

pub fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

pub fn engine() -> Engine {
    engine_with(|_| {})
}

pub fn engine_with(f: impl FnOnce(&mut Config)) -> Engine {
    let mut config = Config::new(GUEST_CID);
    f(&mut config);
    Engine::new(config, ms(0)).expect("valid config")
}

/// Feeds a guest packet that carries no payload; the engine must not ask for one.
pub fn tx(e: &mut Engine, now: Instant, h: Header) {
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
pub fn tx_data(e: &mut Engine, now: Instant, h: Header, payload: &[u8], written: Io) -> bool {
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
pub fn expect_rx(e: &mut Engine, now: Instant, op: Op) -> Header {
    let (h, payload) = expect_rx_payload(e, now, op);
    assert!(payload.is_empty(), "{op:?} carries a payload: {payload:?}");
    h
}

/// The next guest packet must be a packet with this op: send it and return it with its payload.
pub fn expect_rx_payload(e: &mut Engine, now: Instant, op: Op) -> (Header, Vec<u8>) {
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
        Some(RxGrant::Probe(p)) => panic!("stream connections only: {p:?}"),
        Some(RxGrant::Message(m)) => panic!("stream connections only: {m:?}"),
        Some(RxGrant::Read(r)) => panic!("expected {op:?}, got {r:?}"),
        None => panic!("expected {op:?}, got nothing"),
    }
}

/// The next guest packet must be a read grant for `conn` of exactly `max` bytes.
pub fn expect_read(
    e: &mut Engine,
    now: Instant,
    room: usize,
    conn: ConnId,
    max: usize,
) -> RxRead<'_> {
    match e.poll_rx(now, room) {
        Some(RxGrant::Probe(p)) => panic!("stream connections only: {p:?}"),
        Some(RxGrant::Message(m)) => panic!("stream connections only: {m:?}"),
        Some(RxGrant::Read(r)) => {
            assert_eq!((r.conn(), r.max()), (conn, max), "read grant");
            r
        }
        Some(RxGrant::Packet(p)) => panic!("expected a read grant, got {p:?}"),
        None => panic!("expected a read grant, got nothing"),
    }
}

/// A read grant for `conn` of `max` bytes, completed with `n` bytes read: the header sent.
pub fn read(
    e: &mut Engine,
    now: Instant,
    room: usize,
    conn: ConnId,
    max: usize,
    n: usize,
) -> Header {
    let r = expect_read(e, now, room, conn, max);
    r.complete(Io::Done(n), &mut &vec![0u8; n][..])
        .expect("read within the grant")
        .expect("a packet for the guest")
}

pub fn expect_no_rx(e: &mut Engine, now: Instant) {
    if let Some(g) = e.poll_rx(now, ROOM) {
        match g {
            RxGrant::Packet(p) => panic!("unexpected packet {p:?}"),
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(r) => panic!("unexpected {r:?}"),
        }
    }
}

pub fn actions(e: &mut Engine) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = e.poll_action() {
        out.push(a);
        assert!(out.len() < 1000, "poll_action never ends: {out:?}");
    }
    out
}

pub fn expect_actions(e: &mut Engine, want: &[Action]) {
    assert_eq!(actions(e), want);
}

pub fn expect_nothing(e: &mut Engine, now: Instant) {
    expect_actions(e, &[]);
    expect_no_rx(e, now);
}

pub fn interest(conn: ConnId, readable: bool, writable: bool) -> Action {
    Action::Interest {
        conn,
        interest: Interest { readable, writable },
    }
}

pub fn close(conn: ConnId) -> Action {
    Action::Close { conn }
}

/// The bytes a flush would write, joined.
pub fn flush_bytes(e: &Engine, conn: ConnId) -> Vec<u8> {
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
pub fn read_would_block(e: &mut Engine, now: Instant, room: usize, conn: ConnId) {
    match e.poll_rx(now, room) {
        Some(RxGrant::Probe(p)) => panic!("stream connections only: {p:?}"),
        Some(RxGrant::Message(m)) => panic!("stream connections only: {m:?}"),
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
pub fn line_would_block(e: &mut Engine, now: Instant, conn: ConnId, max: usize) {
    expect_actions(e, &[Action::ReadConnectLine { conn, max }]);
    assert_eq!(
        e.handle_connect_line(now, conn, LineRead::WouldBlock),
        Ok(())
    );
    expect_actions(e, &[interest(conn, true, false)]);
}

/// The guest connects from `gp` to `hp` at `now`, the socket connects at once, the RESPONSE
/// goes out. Counters: tx_packets 1, guest_connects 1, established 1, rx_packets 1.
pub fn guest_connected(e: &mut Engine, now: Instant, gp: u32, hp: u32, guest_buf: u32) -> ConnId {
    tx(e, now, guest_pkt(Op::Request, gp, hp, 0, 0, guest_buf, 0));
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, port, .. }) => {
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
pub fn client_reading(e: &mut Engine, now: Instant) -> ConnId {
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
pub fn host_requesting(e: &mut Engine, now: Instant, gp: u32) -> (ConnId, u32) {
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

/// Small buffers, so a few packets reach the credit thresholds.
pub fn small_buffers(c: &mut Config) {
    c.buffer_size = 8192;
    c.credit_update_threshold = 2048;
    c.max_packet_payload = 4096;
}
