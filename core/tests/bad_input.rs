//! Hostile input, one class per row: each gets its protocol reaction and exactly one named
//! counter, and nothing else moves. No RST is ever answered with an RST.

use vsock_core::testing::{guest_pkt, host_pkt};
use vsock_core::wire::{Header, Op, HOST_CID, SHUTDOWN_SEND};
use vsock_core::{
    Action, Config, ConnId, Engine, HostEvent, Instant, Io, LineRead, RxGrant, SocketError, Stats,
    Tx,
};

const GUEST_CID: u64 = 3;
/// Our `buffer_size`: the `buf_alloc` of every connection's packets.
const BUF: u32 = 4096;
/// Our `max_packet_payload`.
const MAX_PAYLOAD: u32 = 8192;
/// The guest's receive buffer.
const GUEST_BUF: u32 = 65536;
/// The ports of the connection a setup makes (guest side, host side).
const GP: u32 = 1000;
const HP: u32 = 2000;
/// Ports no connection uses.
const UGP: u32 = 1111;
const UHP: u32 = 2222;

const STREAM: u16 = 1;
const SEQPACKET: u16 = 2;
const RST: u16 = 3;

fn ms(n: u64) -> Instant {
    Instant::from_millis(n)
}

fn config() -> Config {
    let mut c = Config::new(GUEST_CID);
    c.buffer_size = BUF;
    c.credit_update_threshold = 1024;
    c.max_packet_payload = MAX_PAYLOAD;
    c.max_connections = 8;
    c
}

/// A guest header with a raw op, stream type, from the guest to the host.
fn hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    let mut h = guest_pkt(Op::Rw, src_port, dst_port, len, 0, GUEST_BUF, 0);
    h.op = op.into();
    h
}

fn op(o: Op) -> u16 {
    o.to_u16()
}

fn typed(mut h: Header, t: u16) -> Header {
    h.type_ = t.into();
    h
}

fn cids(mut h: Header, src: u64, dst: u64) -> Header {
    h.src_cid = src.into();
    h.dst_cid = dst.into();
    h
}

/// An RST from the host to the guest, as the engine must send it.
fn rst(src_port: u32, dst_port: u32, type_: u16, buf_alloc: u32) -> Header {
    let mut h = host_pkt(Op::Rst, src_port, dst_port, 0, 0, buf_alloc, 0);
    h.type_ = type_.into();
    h
}

/// Every counter of `Stats`, by name, and whether it counts a fault (as opposed to traffic).
fn counters(s: &Stats) -> Vec<(&'static str, u64, bool)> {
    macro_rules! list {
        (traffic: $($t:ident),*; faults: $($f:ident),* $(,)?) => {
            vec![$((stringify!($t), s.$t, false),)* $((stringify!($f), s.$f, true),)*]
        };
    }
    list!(
        traffic: tx_packets, tx_bytes, tx_direct_bytes, tx_buffered_bytes, rx_packets, rx_bytes,
            guest_connects, host_accepts, established, closed, rst_sent, rst_received,
            credit_updates_sent, credit_requests_sent, sibling_connects, sibling_accepts;
        faults: wrong_cid, reserved_cid_bits, unknown_type, unknown_op, oversize_len,
            control_payload, credit_violation, unknown_connection, request_for_existing,
            unexpected_response, data_after_shutdown, rst_for_unknown, connection_limit,
            accept_limit, rst_queue_full, payload_faults, connect_line_garbage,
            connect_line_too_long, connect_line_bad_port, connect_line_eof,
            connect_line_timeout, connect_timeout, connect_failed, connect_refused_by_guest,
            close_timeout, rst_undelivered, host_errors, stale_events, host_hangups,
            sibling_accepts_refused, sibling_refused, sibling_resets,
    )
}

fn counter(s: &Stats, name: &str) -> u64 {
    counters(s)
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter named {name}"))
        .1
}

// -------------------------------------------------------------------------------------------
// Setups

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// A fresh engine.
    Nothing,
    /// A guest connection `GP -> HP`, established, its RESPONSE delivered.
    Established,
    /// `Established`, with 3000 guest bytes the socket refused held in the buffer.
    Buffered,
    /// `Established`, after the guest's SHUTDOWN SEND (and our `shutdown(SHUT_WR)`).
    GuestSendShut,
    /// The guest's REQUEST `GP -> HP`, the host connect still under way.
    GuestConnecting,
    /// A host client whose `CONNECT` line the engine is reading.
    HostClient,
    /// `Established` in a table of one: full.
    Full,
}

fn drain_actions(e: &mut Engine) -> Vec<Action> {
    let mut out = Vec::new();
    while let Some(a) = e.poll_action() {
        out.push(a);
        assert!(out.len() < 100, "poll_action never ends: {out:?}");
    }
    out
}

/// Every packet the engine has for the guest, sent; a read grant is a failure.
fn drain_rx(e: &mut Engine, now: Instant) -> Result<Vec<Header>, String> {
    let mut out = Vec::new();
    while let Some(g) = e.poll_rx(now, 65536) {
        match g {
            RxGrant::Packet(p) => out.push(p.send()),
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(r) => return Err(format!("unexpected {r:?}")),
        }
        if out.len() > 100 {
            return Err("poll_rx never ends".into());
        }
    }
    Ok(out)
}

fn build(setup: Setup) -> (Engine, Option<ConnId>) {
    let mut config = config();
    if setup == Setup::Full {
        config.max_connections = 1;
    }
    let mut e = Engine::new(config, ms(0)).expect("valid config");
    let now = ms(0);
    let conn = match setup {
        Setup::Nothing => None,
        Setup::HostClient => {
            let conn = e.handle_accept(now).expect("room");
            e.handle_host_event(now, conn, HostEvent::Readable)
                .expect("live");
            let acts = drain_actions(&mut e);
            assert!(
                acts.iter()
                    .any(|a| matches!(a, Action::ReadConnectLine { .. })),
                "setup: {acts:?}"
            );
            Some(conn)
        }
        Setup::GuestConnecting
        | Setup::Established
        | Setup::Buffered
        | Setup::GuestSendShut
        | Setup::Full => {
            assert!(matches!(
                e.handle_tx(now, &hdr(op(Op::Request), GP, HP, 0)),
                Tx::Done
            ));
            let conn = match e.poll_action() {
                Some(Action::Connect { conn, port: HP, .. }) => conn,
                other => panic!("setup: expected Connect, got {other:?}"),
            };
            drain_actions(&mut e);
            if setup != Setup::GuestConnecting {
                e.handle_host_event(now, conn, HostEvent::Connected)
                    .expect("live");
                let rx = drain_rx(&mut e, now).expect("setup");
                assert_eq!(rx.len(), 1, "setup: RESPONSE");
                drain_actions(&mut e);
            }
            if setup == Setup::Buffered {
                let payload = vec![9u8; 3000];
                match e.handle_tx(now, &hdr(op(Op::Rw), GP, HP, 3000)) {
                    Tx::Data(d) => d
                        .complete(Io::WouldBlock, &mut &payload[..])
                        .expect("setup: buffered"),
                    Tx::Done => panic!("setup: RW refused"),
                }
                drain_actions(&mut e);
            }
            if setup == Setup::GuestSendShut {
                let mut h = hdr(op(Op::Shutdown), GP, HP, 0);
                h.flags = SHUTDOWN_SEND.into();
                assert!(matches!(e.handle_tx(now, &h), Tx::Done));
                drain_actions(&mut e);
            }
            Some(conn)
        }
    };
    // A setup leaves nothing owed, so that everything afterwards is the reaction.
    assert_eq!(drain_rx(&mut e, now), Ok(vec![]), "setup {setup:?}");
    assert_eq!(drain_actions(&mut e), vec![], "setup {setup:?}");
    (e, conn)
}

// -------------------------------------------------------------------------------------------
// The table

#[derive(Clone, Copy, Debug)]
enum Bad {
    /// A guest tx packet (an RW payload, if asked for, is offered and fully taken).
    Packet(Header),
    /// Bytes of the host client's `CONNECT` line.
    Line(&'static [u8]),
}

#[derive(Clone, Copy, Debug)]
enum Reaction {
    /// One RST to the guest, for no connection: `src_port` (host side) to `dst_port`, with this
    /// type; no socket action.
    Rst {
        src_port: u32,
        dst_port: u32,
        type_: u16,
    },
    /// As `Rst`, from another CID than the host's: a packet to that CID, which has no
    /// connection there.
    RstFrom {
        cid: u64,
        src_port: u32,
        dst_port: u32,
    },
    /// The setup's connection is reset: one RST with its ports, and its socket closed.
    Reset,
    /// The setup's socket is closed; the guest is told nothing.
    Close,
    /// Nothing happens, and the setup's connection (if any) is untouched.
    Drop,
}

struct Row {
    name: &'static str,
    setup: Setup,
    input: Bad,
    reaction: Reaction,
    counter: &'static str,
}

fn rows() -> Vec<Row> {
    use Bad::{Line, Packet};
    use Reaction::{Close, Drop, Reset};
    use Setup::*;
    let orphan = |type_| Reaction::Rst {
        src_port: UHP,
        dst_port: UGP,
        type_,
    };
    let unknown = |o: Op| Packet(hdr(op(o), UGP, UHP, 0));
    let live = |o: Op, len| Packet(hdr(op(o), GP, HP, len));
    let row = |name, setup, input, reaction, counter| Row {
        name,
        setup,
        input,
        reaction,
        counter,
    };
    let mut long_line = b"CONNECT ".to_vec();
    long_line.resize(64, b'7');
    let long_line: &'static [u8] = long_line.leak();
    vec![
        row(
            "unknown op",
            Nothing,
            Packet(hdr(9, UGP, UHP, 0)),
            orphan(STREAM),
            "unknown_op",
        ),
        row(
            "unknown op on a live connection",
            Established,
            Packet(hdr(0, GP, HP, 0)),
            Reset,
            "unknown_op",
        ),
        row(
            "unknown op from another CID (addressing is checked first)",
            Nothing,
            Packet(cids(hdr(9, UGP, UHP, 0), 4, HOST_CID)),
            Drop,
            "wrong_cid",
        ),
        row(
            "unknown type",
            Nothing,
            Packet(typed(hdr(op(Op::Request), UGP, UHP, 0), 3)),
            orphan(3),
            "unknown_type",
        ),
        row(
            "SEQPACKET type (unsupported)",
            Nothing,
            Packet(typed(hdr(op(Op::Request), UGP, UHP, 0), SEQPACKET)),
            orphan(SEQPACKET),
            "unknown_type",
        ),
        row(
            "RW beyond credit",
            Buffered,
            live(Op::Rw, BUF - 3000 + 1),
            Reset,
            "credit_violation",
        ),
        row(
            "RW larger than any credit (more than our buffer)",
            Established,
            live(Op::Rw, BUF + 1),
            Reset,
            "oversize_len",
        ),
        row(
            "RW on unknown connection",
            Nothing,
            Packet(hdr(op(Op::Rw), UGP, UHP, 10)),
            orphan(STREAM),
            "unknown_connection",
        ),
        row(
            "SHUTDOWN on unknown connection",
            Nothing,
            unknown(Op::Shutdown),
            orphan(STREAM),
            "unknown_connection",
        ),
        row(
            "CREDIT_UPDATE on unknown connection",
            Nothing,
            unknown(Op::CreditUpdate),
            orphan(STREAM),
            "unknown_connection",
        ),
        row(
            "CREDIT_REQUEST on unknown connection",
            Nothing,
            unknown(Op::CreditRequest),
            orphan(STREAM),
            "unknown_connection",
        ),
        row(
            "RESPONSE on unknown connection",
            Nothing,
            unknown(Op::Response),
            orphan(STREAM),
            "unknown_connection",
        ),
        row(
            "REQUEST for an existing connection",
            Established,
            live(Op::Request, 0),
            Reset,
            "request_for_existing",
        ),
        row(
            "REQUEST while the table is full",
            Full,
            unknown(Op::Request),
            orphan(STREAM),
            "connection_limit",
        ),
        row(
            "wrong src CID",
            Established,
            Packet(cids(hdr(op(Op::Request), GP, HP, 0), 4, HOST_CID)),
            Drop,
            "wrong_cid",
        ),
        row(
            "dst CID the guest's own",
            Established,
            Packet(cids(hdr(op(Op::Rw), GP, HP, 0), GUEST_CID, GUEST_CID)),
            Drop,
            "wrong_cid",
        ),
        row(
            "data to another CID, where the connection is not",
            Established,
            Packet(cids(hdr(op(Op::Rw), GP, HP, 0), GUEST_CID, 5)),
            Reaction::RstFrom {
                cid: 5,
                src_port: HP,
                dst_port: GP,
            },
            "unknown_connection",
        ),
        row(
            "reserved src CID bits",
            Established,
            Packet(cids(
                hdr(op(Op::Shutdown), GP, HP, 0),
                GUEST_CID | 1 << 32,
                HOST_CID,
            )),
            Drop,
            "reserved_cid_bits",
        ),
        row(
            "reserved dst CID bits",
            Nothing,
            Packet(cids(
                hdr(op(Op::Request), UGP, UHP, 0),
                GUEST_CID,
                HOST_CID | 1 << 63,
            )),
            Drop,
            "reserved_cid_bits",
        ),
        row(
            "oversize len",
            Nothing,
            Packet(hdr(op(Op::Rw), UGP, UHP, BUF + 1)),
            orphan(STREAM),
            "oversize_len",
        ),
        row(
            "oversize len on a live connection",
            Established,
            live(Op::Rw, MAX_PAYLOAD + 1),
            Reset,
            "oversize_len",
        ),
        row(
            "RW beyond credit in one packet",
            Buffered,
            live(Op::Rw, BUF),
            Reset,
            "credit_violation",
        ),
        row(
            "control op with payload",
            Established,
            live(Op::Shutdown, 4),
            Reset,
            "control_payload",
        ),
        row(
            "control op with payload, no connection",
            Nothing,
            Packet(hdr(op(Op::Request), UGP, UHP, 1)),
            orphan(STREAM),
            "control_payload",
        ),
        row(
            "RESPONSE never asked for",
            Established,
            live(Op::Response, 0),
            Reset,
            "unexpected_response",
        ),
        row(
            "RESPONSE to the guest's own REQUEST",
            GuestConnecting,
            live(Op::Response, 0),
            Reset,
            "unexpected_response",
        ),
        row(
            "data after SHUTDOWN SEND",
            GuestSendShut,
            live(Op::Rw, 5),
            Reset,
            "data_after_shutdown",
        ),
        row(
            "data before the connection is established",
            GuestConnecting,
            live(Op::Rw, 5),
            Reset,
            "data_after_shutdown",
        ),
        row(
            "RST for unknown connection",
            Nothing,
            unknown(Op::Rst),
            Drop,
            "rst_for_unknown",
        ),
        row(
            "RST for a live connection",
            Established,
            live(Op::Rst, 0),
            Close,
            "rst_received",
        ),
        row(
            "RST with payload on a live connection",
            Established,
            live(Op::Rst, 4),
            Close,
            "control_payload",
        ),
        row(
            "RST with unknown type",
            Nothing,
            Packet(typed(hdr(RST, UGP, UHP, 0), 7)),
            Drop,
            "unknown_type",
        ),
        row(
            "RST of SEQPACKET type",
            Nothing,
            Packet(typed(hdr(RST, UGP, UHP, 0), SEQPACKET)),
            Drop,
            "unknown_type",
        ),
        row(
            "RST from another CID",
            Established,
            Packet(cids(hdr(RST, GP, HP, 0), 4, HOST_CID)),
            Drop,
            "wrong_cid",
        ),
        row(
            "CONNECT-line garbage",
            HostClient,
            Line(b"HELO 5000\n"),
            Close,
            "connect_line_garbage",
        ),
        row(
            "CONNECT-line too long",
            HostClient,
            Line(long_line),
            Close,
            "connect_line_too_long",
        ),
        row(
            "CONNECT-line bad port",
            HostClient,
            Line(b"CONNECT 99999999999\n"),
            Close,
            "connect_line_bad_port",
        ),
    ]
}

/// Feeds the bad input; returns what reached the guest and the socket actions.
fn feed(
    e: &mut Engine,
    conn: Option<ConnId>,
    input: Bad,
) -> Result<(Vec<Header>, Vec<Action>), String> {
    let now = ms(1);
    match input {
        Bad::Packet(h) => {
            if let Tx::Data(d) = e.handle_tx(now, &h) {
                let len = d.len();
                d.complete(Io::Done(len), &mut &vec![0u8; len][..])
                    .map_err(|err| format!("payload: {err}"))?;
                return Err(format!("the payload of {len} bytes was accepted"));
            }
        }
        Bad::Line(bytes) => {
            let conn = conn.ok_or("test bug: no host client")?;
            e.handle_connect_line(now, conn, LineRead::Data(bytes))
                .map_err(|err| format!("handle_connect_line: {err}"))?;
        }
    }
    let rx = drain_rx(e, now)?;
    Ok((rx, drain_actions(e)))
}

/// Runs one row; `Err` says how it went wrong.
fn check(row: &Row) -> Result<(), String> {
    let (mut e, conn) = build(row.setup);
    let before = e.stats().clone();
    let state_before = conn.and_then(|c| e.conn_state(c));
    let (rx, acts) = feed(&mut e, conn, row.input)?;

    // The reaction.
    let want_rx: Vec<Header>;
    let want_acts: Vec<Action>;
    match row.reaction {
        Reaction::Rst {
            src_port,
            dst_port,
            type_,
        } => {
            want_rx = vec![rst(src_port, dst_port, type_, 0)];
            want_acts = vec![];
        }
        Reaction::RstFrom {
            cid,
            src_port,
            dst_port,
        } => {
            let mut h = rst(src_port, dst_port, STREAM, 0);
            h.src_cid = cid.into();
            want_rx = vec![h];
            want_acts = vec![];
        }
        Reaction::Reset => {
            let conn = conn.ok_or("test bug: Reset needs a connection")?;
            want_rx = vec![rst(HP, GP, STREAM, BUF)];
            want_acts = vec![Action::Close { conn }];
        }
        Reaction::Close => {
            let conn = conn.ok_or("test bug: Close needs a connection")?;
            want_rx = vec![];
            want_acts = vec![Action::Close { conn }];
        }
        Reaction::Drop => {
            want_rx = vec![];
            want_acts = vec![];
        }
    }
    if rx != want_rx {
        return Err(format!("to the guest: {rx:?}, expected {want_rx:?}"));
    }
    if acts != want_acts {
        return Err(format!("actions: {acts:?}, expected {want_acts:?}"));
    }
    if let Some(conn) = conn {
        let state = e.conn_state(conn);
        match row.reaction {
            Reaction::Drop if state != state_before => {
                return Err(format!(
                    "connection changed from {state_before:?} to {state:?}"
                ));
            }
            Reaction::Reset | Reaction::Close if state.is_some() => {
                return Err(format!("connection still there: {state:?}"));
            }
            _ => {}
        }
    }

    // No RST in reply to an RST.
    if let Bad::Packet(h) = row.input {
        if h.op.get() == RST && rx.iter().any(|r| r.op.get() == RST) {
            return Err("an RST was answered with an RST".into());
        }
    }

    // The counters: the named one moved by one, no other fault counter moved.
    let after = e.stats();
    let named = counter(after, row.counter) as i128 - counter(&before, row.counter) as i128;
    if named != 1 {
        return Err(format!("{} moved by {named}", row.counter));
    }
    let moved: Vec<_> = counters(&before)
        .into_iter()
        .zip(counters(after))
        .filter(|((name, a, fault), (_, b, _))| *fault && a != b && *name != row.counter)
        .map(|((name, a, _), (_, b, _))| format!("{name} {a} -> {b}"))
        .collect();
    if !moved.is_empty() {
        return Err(format!("other fault counters moved: {moved:?}"));
    }
    let packets = matches!(row.input, Bad::Packet(_)) as u64;
    if after.tx_packets != before.tx_packets + packets {
        return Err(format!(
            "tx_packets {} -> {}",
            before.tx_packets, after.tx_packets
        ));
    }
    if after.rst_sent != before.rst_sent + want_rx.len() as u64 {
        return Err(format!(
            "rst_sent {} -> {}",
            before.rst_sent, after.rst_sent
        ));
    }
    if after.rx_packets != before.rx_packets + want_rx.len() as u64 {
        return Err(format!(
            "rx_packets {} -> {}",
            before.rx_packets, after.rx_packets
        ));
    }
    Ok(())
}

#[test]
fn every_malformed_class_gets_its_reaction() {
    let rows = rows();
    let failures: Vec<String> = rows
        .iter()
        .filter_map(|row| check(row).err().map(|e| format!("{}: {e}", row.name)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn no_rst_is_ever_answered_with_rst() {
    // Every packet of the table, turned into an RST (keeping its other faults), gets no
    // packet at all in reply; at most the socket of a connection it names is closed.
    let mut failures = Vec::new();
    for row in rows() {
        let Bad::Packet(mut h) = row.input else {
            continue;
        };
        if !matches!(h.op.get(), 1..=7) {
            continue; // the op is the fault being tested
        }
        h.op = RST.into();
        let (mut e, conn) = build(row.setup);
        match feed(&mut e, conn, Bad::Packet(h)) {
            Err(err) => failures.push(format!("{}: {err}", row.name)),
            Ok((rx, acts)) => {
                if !rx.is_empty() {
                    failures.push(format!("{}: RST answered with {rx:?}", row.name));
                }
                if acts
                    .iter()
                    .any(|a| !matches!(a, Action::Close { conn: c } if Some(*c) == conn))
                {
                    failures.push(format!("{}: actions {acts:?}", row.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An RST for a connection whose own RST is still on its way withdraws ours.
    let (mut e, conn) = build(Setup::Established);
    let conn = conn.expect("a connection");
    e.handle_host_event(ms(1), conn, HostEvent::Error(SocketError(104)))
        .expect("live");
    assert!(matches!(e.handle_tx(ms(1), &hdr(RST, GP, HP, 0)), Tx::Done));
    assert_eq!(drain_rx(&mut e, ms(1)), Ok(vec![]));
    assert_eq!(drain_actions(&mut e), vec![Action::Close { conn }]);
    assert_eq!(e.conn_state(conn), None);
    assert_eq!(e.stats().rst_sent, 0);
    assert_eq!(e.stats().rst_received, 1);
    assert_eq!(e.connections(), 0);

    // Nor is an RST answered when the connection state is already gone on our side.
    let (mut e, _) = build(Setup::Nothing);
    for _ in 0..3 {
        assert!(matches!(
            e.handle_tx(ms(1), &hdr(RST, UGP, UHP, 0)),
            Tx::Done
        ));
    }
    assert_eq!(drain_rx(&mut e, ms(1)), Ok(vec![]));
    assert_eq!(e.stats().rst_for_unknown, 3);
}
