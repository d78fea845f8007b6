//! Random sessions, a recorder attached at the first moment the engine allows after a random
//! number of inputs (connections made, closed, reset, stopped before it): every trace
//! replays exactly.

use vsock_core::testing::guest_pkt;
use vsock_core::wire::Op;
use vsock_core::{
    Action, Config, ConnId, Engine, HostEvent, Instant, Io, LineRead, RxGrant, SocketError, Tx,
};
use vsock_trace::TraceWriter;
mod common;
use common::Shared;

/// xorshift64: a reproducible sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_sessions_recorded_late_replay_exactly() {
    let mut st = 0x9e37_79b9_7f4a_7c15u64;
    let mut attached_late = 0;
    let mut totals = (0usize, 0usize, 0usize);
    for round in 0..3000 {
        let mut c = Config::new(3);
        c.max_connections = 1 + (next(&mut st) % 4) as usize;
        c.buffer_size = 64 + (next(&mut st) % 300) as u32;
        c.credit_update_threshold = 1 + (next(&mut st) % c.buffer_size as u64) as u32;
        c.max_packet_payload = 1 + (next(&mut st) % 200) as u32;
        c.max_pending_resets = (next(&mut st) % 3) as usize;
        c.max_pending_host_clients = 1 + (next(&mut st) % 3) as usize;
        let mut e = Engine::new(c, Instant::ZERO).unwrap();
        let mut out = Shared::default();
        let attach_after = next(&mut st) % 200;
        let mut attached = false;
        let mut conns: Vec<ConnId> = Vec::new();
        let mut ts = 0u64;
        for step in 0..300u64 {
            if !attached && step >= attach_after {
                let o = Shared::default();
                if e.set_recorder(Some(Box::new(
                    TraceWriter::new(o.clone(), usize::MAX, 0).unwrap(),
                )))
                .is_ok()
                {
                    attached = true;
                    out = o;
                    if step > 0 {
                        attached_late += 1;
                    }
                }
            }
            let r = next(&mut st);
            ts = ts
                .wrapping_add(r % 2_000_000_000)
                .saturating_sub(500_000_000);
            let now = Instant::from_nanos(ts);
            let conn = if conns.is_empty() {
                ConnId::from_raw(r)
            } else {
                conns[(r >> 8) as usize % conns.len()]
            };
            let v = (r >> 20) % 500;
            let io = match (r >> 30) % 4 {
                0 => Io::Done(v as usize % 100),
                1 => Io::WouldBlock,
                2 => Io::Error(SocketError(104)),
                _ => Io::Done(0),
            };
            match (r >> 4) % 16 {
                0..=3 => {
                    let ops = [
                        Op::Request,
                        Op::Response,
                        Op::Rst,
                        Op::Shutdown,
                        Op::Rw,
                        Op::Rw,
                        Op::CreditUpdate,
                        Op::CreditRequest,
                    ];
                    let op = ops[(r >> 40) as usize % ops.len()];
                    let len = if op == Op::Rw { (v % 120) as u32 } else { 0 };
                    let src_port = 100 + (r >> 48) as u32 % 3;
                    let dst_port = if (r >> 52) % 2 == 0 {
                        200
                    } else {
                        (1 << 30) + (r >> 53) as u32 % 3
                    };
                    let flags = (r >> 56) as u32 % 4;
                    let buf_alloc = (r >> 16) as u32 % 1000;
                    let h = guest_pkt(op, src_port, dst_port, len, flags, buf_alloc, 0);
                    let payload = vec![7u8; len as usize];
                    if let Tx::Data(d) = e.handle_tx(now, &h) {
                        if v % 7 == 0 {
                            drop(d)
                        } else {
                            let _ = d.complete(io, &mut &payload[..]);
                        }
                    }
                }
                4 => {
                    if let Ok(c) = e.handle_accept(now) {
                        conns.push(c)
                    }
                }
                5 => {
                    let line: &[u8] = match v % 3 {
                        0 => b"CONNECT 200\n",
                        1 => b"CONNECT 201\nxyz",
                        _ => b"CONN",
                    };
                    let _ = e.handle_connect_line(
                        now,
                        conn,
                        match v % 5 {
                            0 => LineRead::Eof,
                            1 => LineRead::WouldBlock,
                            2 => LineRead::Error(SocketError(5)),
                            _ => LineRead::Data(line),
                        },
                    );
                }
                6 | 7 => {
                    let _ = e.handle_host_event(
                        now,
                        conn,
                        match v % 5 {
                            0 => HostEvent::Connected,
                            1 => HostEvent::ConnectFailed(SocketError(111)),
                            2 => HostEvent::Readable,
                            3 => HostEvent::Writable,
                            _ => HostEvent::Error(SocketError(104)),
                        },
                    );
                }
                8 => {
                    let _ = e.handle_host_write(now, conn, io);
                }
                9 => e.handle_timeout(now),
                10 => {
                    if v % 10 == 0 {
                        let _ = e.reset_connection(now, conn);
                    }
                }
                11 => {
                    if v % 20 == 0 {
                        match v % 3 {
                            0 => e.abort_all(now),
                            1 => e.reset(now),
                            _ => e.stop(now),
                        }
                    }
                }
                _ => {
                    while let Some(a) = e.poll_action() {
                        if let Action::Connect { conn, .. } = a {
                            conns.push(conn)
                        }
                    }
                    while let Some(g) = e.poll_rx(now, v as usize) {
                        match g {
                            RxGrant::Packet(p) => {
                                if v % 9 != 0 {
                                    let _ = p.send();
                                } else {
                                    break;
                                }
                            }
                            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                            RxGrant::Read(rd) => {
                                let b = vec![1u8; rd.max()];
                                let _ = rd.complete(io, &mut &b[..]);
                            }
                        }
                    }
                }
            }
        }
        drop(e.set_recorder(None));
        drop(e);
        if !attached {
            continue;
        }
        let bytes = out.bytes();
        let res = vsock_trace::replay(&bytes);
        if let Ok(r) = &res {
            totals.0 += r.records;
            totals.1 += r.to_guest;
            totals.2 += r.actions;
        }
        if let Err(err) = res {
            panic!("round {round} (attached after {attach_after}): {err}");
        }
    }
    // Most sessions were recorded from a later moment, and they did things.
    assert!(attached_late > 2000, "{attached_late}");
    assert!(totals.1 > 10_000 && totals.2 > 10_000, "{totals:?}");
}
