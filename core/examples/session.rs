//! A whole session through the engine, guest and host both simulated in memory: the guest
//! connects to a host service and the two exchange a mebibyte each way, then a host client
//! connects to a guest listener with `CONNECT`. Prints what happened and the engine's stats.
//!
//! Run with `cargo run --release -p vsock-core --example session`.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID, SHUTDOWN_BOTH};
use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant, Io, LineRead, RxGrant, Tx};

const GUEST_CID: u64 = 3;
const SIZE: usize = 1 << 20;

#[derive(Default)]
struct Socket {
    /// Bytes the engine wrote (the host application reads them).
    written: Vec<u8>,
    /// Bytes the host application wrote, not yet read by the engine.
    unread: VecDeque<u8>,
    closed: bool,
}

struct World {
    engine: Engine,
    now: Instant,
    sockets: HashMap<ConnId, Socket>,
    /// Payload the guest received, per (guest port, host port).
    guest_rx: HashMap<(u32, u32), Vec<u8>>,
    guest_log: Vec<Header>,
}

impl World {
    fn guest_send(&mut self, ports: (u32, u32), op: Op, flags: u32, payload: &[u8]) {
        let fwd_cnt = self.guest_rx.get(&ports).map_or(0, |v| v.len() as u32);
        let h = Packet {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: ports.0,
            dst_port: ports.1,
            len: payload.len() as u32,
            socket_type: SocketType::Stream,
            op,
            flags,
            buf_alloc: 256 * 1024,
            fwd_cnt,
        }
        .to_header();
        if let Tx::Data(d) = self.engine.handle_tx(self.now, &h) {
            let n = if d.direct() {
                // The socket takes at most 16 KiB at a time; the engine buffers the rest.
                let n = payload.len().min(16 * 1024);
                self.sockets
                    .get_mut(&d.conn())
                    .unwrap()
                    .written
                    .extend_from_slice(&payload[..n]);
                n
            } else {
                0
            };
            d.complete(Io::Done(n), &mut &payload[..]).unwrap();
        }
        self.drain();
    }

    fn drain(&mut self) {
        let now = self.now;
        loop {
            let mut busy = false;
            while let Some(action) = self.engine.poll_action() {
                busy = true;
                match action {
                    Action::Connect { conn, .. } => {
                        self.sockets.insert(conn, Socket::default());
                        self.engine
                            .handle_host_event(now, conn, HostEvent::Connected)
                            .unwrap();
                    }
                    Action::ReadConnectLine { conn, max } => {
                        let s = self.sockets.get_mut(&conn).unwrap();
                        let n = max.min(s.unread.len());
                        let bytes: Vec<u8> = s.unread.drain(..n).collect();
                        self.engine
                            .handle_connect_line(now, conn, LineRead::Data(&bytes))
                            .unwrap();
                    }
                    Action::Flush { conn } => {
                        let [a, b] = self.engine.host_bytes(conn).unwrap();
                        let n = a.len() + b.len();
                        let s = self.sockets.get_mut(&conn).unwrap();
                        s.written.extend(a.iter().chain(b));
                        self.engine
                            .handle_host_write(now, conn, Io::Done(n))
                            .unwrap();
                    }
                    Action::Close { conn } => self.sockets.get_mut(&conn).unwrap().closed = true,
                    Action::Shutdown { .. } | Action::Interest { .. } => {}
                }
            }
            while let Some(grant) = self.engine.poll_rx(now, 4096 - 44) {
                busy = true;
                let (h, data) = match grant {
                    RxGrant::Packet(p) => {
                        let data = p.payload().to_vec();
                        (p.send(), data)
                    }
                    RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                    RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                    RxGrant::Read(r) => {
                        let s = self.sockets.get_mut(&r.conn()).unwrap();
                        let n = r.max().min(s.unread.len());
                        let data: Vec<u8> = s.unread.drain(..n).collect();
                        let io = if n > 0 { Io::Done(n) } else { Io::WouldBlock };
                        match r.complete(io, &mut &data[..]).unwrap() {
                            Some(h) => (h, data),
                            None => continue,
                        }
                    }
                };
                let ports = (h.dst_port.get(), h.src_port.get());
                self.guest_rx.entry(ports).or_default().extend(data);
                self.guest_log.push(h);
            }
            if !busy {
                return;
            }
        }
    }
}

fn main() {
    let started = std::time::Instant::now();
    let mut w = World {
        engine: Engine::new(Config::new(GUEST_CID), Instant::ZERO).unwrap(),
        now: Instant::ZERO,
        sockets: HashMap::new(),
        guest_rx: HashMap::new(),
        guest_log: Vec::new(),
    };
    let up: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let down: Vec<u8> = (0..SIZE).map(|i| (i % 241) as u8).collect();

    // The guest connects to host port 1234.
    let ports = (50_000, 1234);
    w.guest_send(ports, Op::Request, 0, &[]);
    let conn = *w.sockets.keys().next().unwrap();
    println!(
        "guest 3:{} -> host 2:{}: {:?}",
        ports.0,
        ports.1,
        w.engine.conn_state(conn).unwrap()
    );

    // A mebibyte each way, in 64 KiB guest packets and 4 KiB host reads.
    w.sockets.get_mut(&conn).unwrap().unread.extend(&down);
    w.engine
        .handle_host_event(w.now, conn, HostEvent::Readable)
        .unwrap();
    for chunk in up.chunks(64 * 1024) {
        w.now = w.now + Duration::from_micros(100);
        w.guest_send(ports, Op::Rw, 0, chunk);
        w.engine
            .handle_host_event(w.now, conn, HostEvent::Writable)
            .unwrap();
        w.drain();
        // The guest reads what arrived and says so.
        w.guest_send(ports, Op::CreditUpdate, 0, &[]);
    }
    assert_eq!(
        w.sockets[&conn].written, up,
        "host received the guest's bytes in order"
    );
    assert_eq!(
        w.guest_rx[&ports], down,
        "guest received the host's bytes in order"
    );
    println!(
        "moved {} bytes guest->host and {} bytes host->guest, intact",
        up.len(),
        down.len()
    );

    // The guest closes; the engine flushes, shuts the socket and sends RST.
    w.guest_send(ports, Op::Shutdown, SHUTDOWN_BOTH, &[]);
    let last = w.guest_log.last().unwrap();
    println!(
        "guest closed; engine answered op {} and closed the socket: {}",
        last.op.get(),
        w.sockets[&conn].closed
    );

    // A host client connects to guest port 5000 with the CONNECT line.
    let client = w.engine.handle_accept(w.now).unwrap();
    let mut s = Socket::default();
    s.unread.extend(b"CONNECT 5000\nhi guest");
    w.sockets.insert(client, s);
    w.engine
        .handle_host_event(w.now, client, HostEvent::Readable)
        .unwrap();
    w.drain();
    let request = *w.guest_log.last().unwrap();
    println!(
        "host client asked for guest port 5000; guest saw op {} from host port {}",
        request.op.get(),
        request.src_port.get()
    );
    let ports = (5000, request.src_port.get());
    w.guest_send(ports, Op::Response, 0, &[]);
    println!(
        "client read {:?}; guest read {:?}",
        String::from_utf8_lossy(&w.sockets[&client].written),
        String::from_utf8_lossy(&w.guest_rx[&ports])
    );

    let s = w.engine.stats();
    println!("\nengine stats:");
    println!(
        "  tx packets {} ({} bytes: {} direct, {} buffered)",
        s.tx_packets, s.tx_bytes, s.tx_direct_bytes, s.tx_buffered_bytes
    );
    println!("  rx packets {} ({} bytes)", s.rx_packets, s.rx_bytes);
    println!(
        "  credit updates sent {}, RSTs sent {}",
        s.credit_updates_sent, s.rst_sent
    );
    println!(
        "  connections now {}, closed {}",
        w.engine.connections(),
        s.closed
    );
    println!("wall time {:?}", started.elapsed());
}
