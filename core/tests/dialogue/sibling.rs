//! Sibling VMs: the guest connects to another VM's guest, and another VM's guest connects to
//! it, over a socket between the two engines.

use vsock_core::wire::SocketType;
use vsock_core::{SiblingRefusal, SocketTypes};

use crate::helpers::*;

const SIBLING: u64 = 4;
/// The sibling guest's port.
const SP: u32 = 49_152;

/// A guest packet to the sibling.
fn to_sibling(op: Op, gp: u32, sp: u32, len: u32, flags: u32) -> Header {
    let mut h = guest_pkt(op, gp, sp, len, flags, GUEST_BUF, 0);
    h.dst_cid = SIBLING.into();
    h
}

/// A packet from the sibling, as the engine must send it.
fn from_sibling(op: Op, sp: u32, gp: u32, len: u32, flags: u32, fwd: u32) -> Header {
    let mut h = host_pkt(op, sp, gp, len, flags, BUF, fwd);
    h.src_cid = SIBLING.into();
    h
}

/// The guest connects from `gp` to the sibling's port `sp`: the engine asks for a connect to
/// that CID, which the host side makes; the engine then waits for the sibling's reply.
fn connecting(e: &mut Engine, gp: u32, sp: u32) -> ConnId {
    tx(e, ms(0), to_sibling(Op::Request, gp, sp, 0, 0));
    let conn = match e.poll_action() {
        Some(Action::Connect {
            conn,
            cid: SIBLING,
            port,
            socket_type: SocketType::Stream,
        }) if port == sp => conn,
        other => panic!("expected a Connect to the sibling, got {other:?}"),
    };
    expect_actions(e, &[interest(conn, false, true)]);
    assert_eq!(
        e.handle_host_event(ms(0), conn, HostEvent::Connected),
        Ok(())
    );
    // Nothing for the guest until the sibling's guest accepted; the reply is read.
    expect_actions(e, &[interest(conn, true, false)]);
    expect_no_rx(e, ms(0));
    assert_eq!(e.conn_state(conn), Some(ConnState::GuestConnecting));
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
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

#[test]
fn a_connect_to_a_sibling_is_answered_once_its_guest_accepted() {
    let mut e = engine();
    let conn = connecting(&mut e, 1000, 80);
    // The reply, with the first stream bytes behind it in the same read.
    assert_eq!(
        e.handle_connect_line(ms(2), conn, LineRead::Data(b"OK 1000\nhi")),
        Ok(())
    );
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::Response),
        from_sibling(Op::Response, 80, 1000, 0, 0, 0)
    );
    let (h, payload) = expect_rx_payload(&mut e, ms(2), Op::Rw);
    assert_eq!(h, from_sibling(Op::Rw, 80, 1000, 2, 0, 0));
    assert_eq!(payload, b"hi");
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    read_would_block(&mut e, ms(2), ROOM, conn);
    expect_actions(&mut e, &[interest(conn, true, false)]);
    // The guest's bytes go to the socket as to a host's.
    assert!(tx_data(
        &mut e,
        ms(3),
        to_sibling(Op::Rw, 1000, 80, 3, 0),
        b"abc",
        Io::Done(3),
    ));
    assert_eq!(e.conn_stats(conn).unwrap().host_written, 3);
    assert_stats!(e, tx_packets: 2, tx_bytes: 3, tx_direct_bytes: 3, rx_packets: 2,
        rx_bytes: 2, guest_connects: 1, sibling_connects: 1, established: 1);
}

#[test]
fn a_sibling_that_refuses_or_is_unreachable_resets_the_guest_at_once() {
    // End of file before the reply: the sibling's guest refused (no listener there).
    let mut e = engine();
    let conn = connecting(&mut e, 1000, 80);
    assert_eq!(e.handle_connect_line(ms(2), conn, LineRead::Eof), Ok(()));
    assert_eq!(
        expect_rx(&mut e, ms(2), Op::Rst),
        from_sibling(Op::Rst, 80, 1000, 0, 0, 0)
    );
    expect_actions(&mut e, &[close(conn)]);
    assert_stats!(e, tx_packets: 1, rx_packets: 1, guest_connects: 1, sibling_connects: 1,
        sibling_refused: 1, rst_sent: 1, closed: 1);

    // Anything but the reply is a refusal too.
    let mut e = engine();
    let conn = connecting(&mut e, 1000, 80);
    assert_eq!(
        e.handle_connect_line(ms(2), conn, LineRead::Data(b"CONNECT 5\n")),
        Ok(())
    );
    expect_rx(&mut e, ms(2), Op::Rst);
    assert_eq!(e.stats().sibling_refused, 1);

    // No sibling with that CID: the host side fails the connect at once.
    let mut e = engine();
    tx(&mut e, ms(0), to_sibling(Op::Request, 1000, 80, 0, 0));
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, cid, .. }) => {
            assert_eq!(cid, SIBLING);
            conn
        }
        other => panic!("expected Connect, got {other:?}"),
    };
    assert_eq!(
        e.handle_host_event(ms(0), conn, HostEvent::ConnectFailed(SocketError(113))),
        Ok(())
    );
    assert_eq!(
        expect_rx(&mut e, ms(0), Op::Rst),
        from_sibling(Op::Rst, 80, 1000, 0, 0, 0)
    );
    assert_eq!(e.stats().connect_failed, 1);
}

#[test]
fn a_sibling_that_never_answers_times_out() {
    let mut e = engine();
    let conn = connecting(&mut e, 1000, 80);
    assert_eq!(
        e.handle_connect_line(ms(2), conn, LineRead::Data(b"OK 10")),
        Ok(())
    );
    let deadline = e.poll_timeout().expect("the connect timeout");
    assert_eq!(deadline, ms(0) + e.config().connect_timeout);
    e.handle_timeout(deadline);
    expect_rx(&mut e, deadline, Op::Rst);
    assert_eq!(e.stats().connect_timeout, 1);
}

#[test]
fn a_seqpacket_reply_is_one_message_alone() {
    let mut e = engine();
    e.set_socket_types(
        ms(0),
        SocketTypes {
            stream: true,
            seqpacket: true,
        },
    );
    let mut h = to_sibling(Op::Request, 1000, 80, 0, 0);
    h.type_ = SocketType::SeqPacket.to_u16().into();
    tx(&mut e, ms(0), h);
    let conn = match e.poll_action() {
        Some(Action::Connect {
            conn,
            socket_type: SocketType::SeqPacket,
            ..
        }) => conn,
        other => panic!("expected a seqpacket Connect, got {other:?}"),
    };
    let _ = actions(&mut e);
    assert_eq!(
        e.handle_host_event(ms(0), conn, HostEvent::Connected),
        Ok(())
    );
    assert_eq!(
        e.handle_host_event(ms(0), conn, HostEvent::Readable),
        Ok(())
    );
    let _ = actions(&mut e);
    // A message holding more than the line is not the reply.
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"OK 1000\nmore")),
        Ok(())
    );
    expect_rx(&mut e, ms(1), Op::Rst);
    assert_eq!(e.stats().sibling_refused, 1);
}

/// A sibling's guest connects from `(SIBLING, SP)` to the guest's port `gp`: the REQUEST
/// goes out, and the guest answers.
fn sibling_accepted(e: &mut Engine, gp: u32) -> ConnId {
    let conn = e
        .handle_sibling_accept(ms(0), SIBLING, SP, gp, SocketType::Stream)
        .expect("accepted");
    // Nothing is read before the guest accepted.
    expect_actions(e, &[]);
    assert_eq!(
        expect_rx(e, ms(0), Op::Request),
        from_sibling(Op::Request, SP, gp, 0, 0, 0)
    );
    assert_eq!(e.conn_ports(conn), Some((gp, SP)));
    assert_eq!(e.conn_state(conn), Some(ConnState::HostConnecting));
    conn
}

#[test]
fn a_siblings_connect_reaches_the_guest_and_its_accept_answers_ok() {
    let mut e = engine();
    let conn = sibling_accepted(&mut e, 80);
    tx(&mut e, ms(1), to_sibling(Op::Response, 80, SP, 0, 0));
    // The sibling's engine reads this line as its guest's go-ahead.
    expect_actions(
        &mut e,
        &[Action::Flush { conn }, interest(conn, true, false)],
    );
    assert_eq!(flush_bytes(&e, conn), format!("OK {SP}\n").as_bytes());
    let n = flush_bytes(&e, conn).len();
    assert_eq!(e.handle_host_write(ms(1), conn, Io::Done(n)), Ok(()));
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    // The guest refusing (an RST to the REQUEST) closes the socket, which the sibling takes
    // as a refusal.
    let refused = e
        .handle_sibling_accept(ms(2), SIBLING, SP + 1, 81, SocketType::Stream)
        .unwrap();
    let _ = actions(&mut e);
    expect_rx(&mut e, ms(2), Op::Request);
    tx(&mut e, ms(2), to_sibling(Op::Rst, 81, SP + 1, 0, 0));
    expect_actions(&mut e, &[close(refused)]);
    assert_stats!(e, tx_packets: 2, rx_packets: 2, sibling_accepts: 2, established: 1,
        rst_received: 1, connect_refused_by_guest: 1, closed: 1);
}

#[test]
fn sibling_accepts_that_cannot_be_are_refused_with_a_reason() {
    let mut e = engine_with(|c| c.max_connections = 2);
    for (cid, sp, port, ty, why) in [
        (
            HOST_CID,
            SP,
            80,
            SocketType::Stream,
            SiblingRefusal::Address,
        ),
        (
            GUEST_CID,
            SP,
            80,
            SocketType::Stream,
            SiblingRefusal::Address,
        ),
        (1 << 32, SP, 80, SocketType::Stream, SiblingRefusal::Address),
        (
            SIBLING,
            SP,
            u32::MAX,
            SocketType::Stream,
            SiblingRefusal::Address,
        ),
        (
            SIBLING,
            u32::MAX,
            80,
            SocketType::Stream,
            SiblingRefusal::Address,
        ),
        // The guest negotiated streams only.
        (
            SIBLING,
            SP,
            80,
            SocketType::SeqPacket,
            SiblingRefusal::SocketType,
        ),
    ] {
        assert_eq!(e.handle_sibling_accept(ms(0), cid, sp, port, ty), Err(why));
    }
    e.handle_sibling_accept(ms(0), SIBLING, SP, 80, SocketType::Stream)
        .unwrap();
    assert_eq!(
        e.handle_sibling_accept(ms(0), SIBLING, SP, 80, SocketType::Stream),
        Err(SiblingRefusal::InUse)
    );
    // The same ports from another sibling, or from the host, are other connections.
    e.handle_sibling_accept(ms(0), SIBLING + 1, SP, 80, SocketType::Stream)
        .unwrap();
    assert_eq!(
        e.handle_sibling_accept(ms(0), SIBLING + 2, SP, 80, SocketType::Stream),
        Err(SiblingRefusal::TableFull)
    );
    assert_eq!(e.stats().sibling_accepts_refused, 8);
    assert_eq!(e.stats().sibling_accepts, 2);
}

#[test]
fn the_same_ports_with_the_host_and_a_sibling_are_two_connections() {
    let mut e = engine();
    let host = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let sibling = connecting(&mut e, 1000, 80);
    assert_ne!(host, sibling);
    assert_eq!(
        e.handle_connect_line(ms(2), sibling, LineRead::Data(b"OK 1000\n")),
        Ok(())
    );
    expect_rx(&mut e, ms(2), Op::Response);
    // Data to each goes to its own socket.
    let to_host = guest_pkt(Op::Rw, 1000, 80, 1, 0, GUEST_BUF, 0);
    match e.handle_tx(ms(3), &to_host) {
        Tx::Data(d) => {
            assert_eq!(d.conn(), host);
            d.complete(Io::Done(1), &mut &b"h"[..]).unwrap();
        }
        Tx::Done => panic!("no payload for the host"),
    }
    match e.handle_tx(ms(3), &to_sibling(Op::Rw, 1000, 80, 1, 0)) {
        Tx::Data(d) => {
            assert_eq!(d.conn(), sibling);
            d.complete(Io::Done(1), &mut &b"s"[..]).unwrap();
        }
        Tx::Done => panic!("no payload for the sibling"),
    }
    // An RST from the guest to the sibling leaves the host's connection alone.
    tx(&mut e, ms(4), to_sibling(Op::Rst, 1000, 80, 0, 0));
    let _ = actions(&mut e);
    assert_eq!(e.conn_state(sibling), None);
    assert_eq!(e.conn_state(host), Some(ConnState::Established));
}

#[test]
fn a_sibling_going_away_resets_its_connections_at_once() {
    let mut e = engine();
    let host = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let out = connecting(&mut e, 1001, 80);
    let inbound = sibling_accepted(&mut e, 90);
    let other = e
        .handle_sibling_accept(ms(0), SIBLING + 1, SP, 91, SocketType::Stream)
        .unwrap();
    let _ = actions(&mut e);
    expect_rx(&mut e, ms(0), Op::Request);
    e.reset_peer(ms(5), SIBLING);
    let mut rsts: Vec<(u64, u32)> = Vec::new();
    while let Some(RxGrant::Packet(p)) = e.poll_rx(ms(5), ROOM) {
        let h = p.send();
        assert_eq!(h.op.get(), Op::Rst.to_u16());
        rsts.push((h.src_cid.get(), h.dst_port.get()));
    }
    rsts.sort();
    assert_eq!(rsts, [(SIBLING, 90), (SIBLING, 1001)]);
    let mut closed: Vec<Action> = actions(&mut e);
    closed.sort_by_key(|a| a.conn());
    let mut want = vec![close(out), close(inbound)];
    want.sort_by_key(|a| a.conn());
    assert_eq!(closed, want);
    assert_eq!(e.conn_state(host), Some(ConnState::Established));
    assert_eq!(e.conn_state(other), Some(ConnState::HostConnecting));
    assert_eq!(e.stats().sibling_resets, 2);
    // The host's CID is never a sibling.
    e.reset_peer(ms(6), HOST_CID);
    assert_eq!(e.conn_state(host), Some(ConnState::Established));
}
