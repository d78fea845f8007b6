//! A sans-IO virtio-vsock engine for hybrid vsock.
//!
//! A guest talks `AF_VSOCK` through its virtio-vsock driver; the host side relays each stream
//! connection to a Unix socket. A guest connecting to vsock port `P` reaches the Unix socket
//! `<uds_path>_P`; a host program that connects to `<uds_path>` and writes `CONNECT <port>\n`
//! gets `OK <host_port>\n` and is then joined to the guest's listener on that port.
//!
//! This crate is the protocol engine of that relay, and nothing else:
//!
//! - **It is** a synchronous state machine. It consumes guest tx packets, host socket events
//!   and the results of I/O it asked for, and emits packets for the guest's rx queue, socket
//!   actions and deadlines. Every decision of the protocol (virtio 1.2 section 5.10 and the
//!   hybrid-vsock `CONNECT`/`OK` exchange) is made here, once.
//! - **It is not** an event loop, a device or a socket library. It performs no I/O, reads no
//!   clock, spawns no thread and takes no lock. Guest memory is reached only through
//!   [`GuestBytes`] and through reads the caller makes into it. The three runtime crates drive
//!   it over real sockets, one per event loop; `vsock-device` binds it to virtqueues.
//!
//! Because every input is a plain value with an explicit `now` ([`Instant`], nanoseconds from
//! an epoch the caller picks), a session can be recorded at the engine boundary and replayed
//! byte for byte.
//!
//! # Method groups
//!
//! [`Engine`]'s methods come in four groups:
//!
//! | group | names | what |
//! | --- | --- | --- |
//! | getters | [`stats`](Engine::stats), [`conn_state`](Engine::conn_state), ... | read-only views |
//! | inputs | `handle_*` | a guest packet, a host client, a socket event, an I/O result, the clock |
//! | commands | [`abort_all`](Engine::abort_all), [`reset`](Engine::reset) | decisions of the embedder |
//! | outputs | `poll_*`, [`host_bytes`](Engine::host_bytes) | guest packets, socket actions, deadlines |
//!
//! # The run loop
//!
//! Every driver follows the same loop; the runtime crates implement exactly this:
//!
//! 1. Wait for something: a kick of the guest's tx queue, new rx buffers, readiness of a
//!    host socket or of the listener, or the deadline last returned by
//!    [`poll_timeout`](Engine::poll_timeout).
//! 2. Feed it in, with the current time:
//!    - each tx packet to [`handle_tx`](Engine::handle_tx). If it returns [`Tx::Data`] and
//!      [`TxData::direct`] is true, write the payload from guest memory to that connection's
//!      socket (one non-blocking `write`), then [`TxData::complete`] with the result; the
//!      engine copies what the socket refused. Return every tx buffer to the used ring.
//!    - a client accepted on the listener to [`handle_accept`](Engine::handle_accept);
//!    - socket readiness to [`handle_host_event`](Engine::handle_host_event);
//!    - a passed deadline to [`handle_timeout`](Engine::handle_timeout).
//! 3. Drain [`poll_action`](Engine::poll_action) until it returns `None`, performing each
//!    [`Action`] and reporting results: [`Action::Connect`] with a `Connected` or
//!    `ConnectFailed` event, [`Action::ReadConnectLine`] with
//!    [`handle_connect_line`](Engine::handle_connect_line), [`Action::Flush`] (write
//!    [`host_bytes`](Engine::host_bytes)) with [`handle_host_write`](Engine::handle_host_write).
//! 4. While the guest has rx buffers, take [`poll_rx`](Engine::poll_rx) and fill one buffer
//!    per grant: an [`RxGrant::Packet`] is copied (header, then [`RxPacket::payload`]) and
//!    committed with [`RxPacket::send`]; an [`RxGrant::Read`] is filled by reading the socket
//!    straight into the buffer after the header, then [`RxRead::complete`] returns the header to
//!    write last. Publish the used buffers and notify the guest once.
//! 5. Steps 3 and 4 feed each other (a flush frees credit, a delivered RST closes a socket):
//!    repeat them until both are empty, then arm one timer at `poll_timeout` and go back to 1.
//!
//! Each `poll_*` call does a bounded amount of work and returns one item, so a driver can stop
//! after a budget and come back later without starving other work.
//!
//! ## A complete example
//!
//! The guest and the host below are plain memory: the guest connects to port 1234, says
//! hello, and reads the host's answer.
//!
//! ```
//! use std::collections::HashMap;
//! use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID};
//! use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant, Io, RxGrant, Tx};
//!
//! const GUEST_CID: u64 = 3;
//! fn guest_packet(op: Op, len: u32) -> Header {
//!     Packet {
//!         src_cid: GUEST_CID, dst_cid: HOST_CID, src_port: 50_000, dst_port: 1234, len,
//!         socket_type: SocketType::Stream, op, flags: 0, buf_alloc: 65_536, fwd_cnt: 0,
//!     }
//!     .to_header()
//! }
//!
//! let mut engine = Engine::new(Config::new(GUEST_CID), Instant::ZERO).unwrap();
//! // The host: socket contents by connection, as (written by the engine, to be read by it).
//! let mut sockets: HashMap<ConnId, (Vec<u8>, Vec<u8>)> = HashMap::new();
//! let mut to_guest: Vec<(Header, Vec<u8>)> = Vec::new();
//!
//! // One pass of steps 3 to 5 of the run loop.
//! fn drain(
//!     now: Instant,
//!     engine: &mut Engine,
//!     sockets: &mut HashMap<ConnId, (Vec<u8>, Vec<u8>)>,
//!     to_guest: &mut Vec<(Header, Vec<u8>)>,
//! ) {
//!     loop {
//!         let mut busy = false;
//!         while let Some(action) = engine.poll_action() {
//!             busy = true;
//!             match action {
//!                 Action::Connect { conn, port, .. } => {
//!                     assert_eq!(port, 1234); // connect to "<uds_path>_1234"
//!                     sockets.insert(conn, (Vec::new(), Vec::new()));
//!                     engine.handle_host_event(now, conn, HostEvent::Connected).unwrap();
//!                 }
//!                 Action::Flush { conn } => {
//!                     let [a, b] = engine.host_bytes(conn).unwrap();
//!                     let (a, b) = (a.to_vec(), b.to_vec());
//!                     sockets.get_mut(&conn).unwrap().0.extend(a.iter().chain(&b));
//!                     engine.handle_host_write(now, conn, Io::Done(a.len() + b.len())).unwrap();
//!                 }
//!                 Action::Close { conn } => drop(sockets.remove(&conn)),
//!                 _ => {} // interest changes and shutdowns need nothing here
//!             }
//!         }
//!         // The guest always has a 4 KiB buffer posted.
//!         while let Some(grant) = engine.poll_rx(now, 4096 - 44) {
//!             busy = true;
//!             match grant {
//!                 RxGrant::Packet(p) => {
//!                     let payload = p.payload().to_vec();
//!                     to_guest.push((p.send(), payload));
//!                 }
//!                 RxGrant::Read(r) => {
//!                     // Read the socket straight into the guest buffer.
//!                     let unread = &mut sockets.get_mut(&r.conn()).unwrap().1;
//!                     let n = unread.len().min(r.max());
//!                     let data: Vec<u8> = unread.drain(..n).collect();
//!                     let io = if n == 0 { Io::WouldBlock } else { Io::Done(n) };
//!                     if let Some(h) = r.complete(io, &mut &data[..]).unwrap() {
//!                         to_guest.push((h, data));
//!                     }
//!                 }
//!                 // Seqpacket message grants; this guest has only stream sockets.
//!                 RxGrant::Probe(_) | RxGrant::Message(_) => unreachable!(),
//!             }
//!         }
//!         if !busy {
//!             return;
//!         }
//!     }
//! }
//!
//! // The guest connects.
//! let now = Instant::from_millis(1);
//! assert!(matches!(engine.handle_tx(now, &guest_packet(Op::Request, 0)), Tx::Done));
//! drain(now, &mut engine, &mut sockets, &mut to_guest);
//! assert_eq!(to_guest[0].0.op.get(), Op::Response.to_u16());
//! let conn = *sockets.keys().next().unwrap();
//!
//! // The guest says hello; the socket takes it straight from "guest memory".
//! let now = Instant::from_millis(2);
//! let hello = b"hello";
//! if let Tx::Data(data) = engine.handle_tx(now, &guest_packet(Op::Rw, 5)) {
//!     assert!(data.direct());
//!     sockets.get_mut(&conn).unwrap().0.extend_from_slice(hello);
//!     data.complete(Io::Done(5), &mut &hello[..]).unwrap();
//! }
//! drain(now, &mut engine, &mut sockets, &mut to_guest);
//! assert_eq!(sockets[&conn].0, b"hello");
//!
//! // The host answers; readiness reaches the engine, which grants a read into an rx buffer.
//! let now = Instant::from_millis(3);
//! sockets.get_mut(&conn).unwrap().1.extend_from_slice(b"world");
//! engine.handle_host_event(now, conn, HostEvent::Readable).unwrap();
//! drain(now, &mut engine, &mut sockets, &mut to_guest);
//! let (header, payload) = to_guest.last().unwrap();
//! assert_eq!(header.op.get(), Op::Rw.to_u16());
//! assert_eq!(payload, b"world");
//! assert_eq!(engine.stats().rx_bytes, 5);
//!
//! // Nothing is pending, so no deadline.
//! assert_eq!(engine.poll_timeout(), None);
//! ```
//!
//! # Failures
//!
//! Three kinds, three mechanisms:
//!
//! - **Bad input** from the guest or a host peer (a malformed header, data beyond credit, a
//!   garbage `CONNECT` line, a socket error) never returns an error and never panics. It gets a
//!   protocol reaction (an RST, a drop, a close) and increments one named counter in
//!   [`Stats`].
//! - **Misuse** by the caller (a stale [`ConnId`], an I/O result larger than what was offered)
//!   returns a small error such as [`ConnError`]; the engine stays consistent.
//! - **A broken internal invariant** panics. The engine holds no locks and shares nothing, so
//!   a caller that catches the panic can drop the engine without poisoning anything else.
//!
//! # Memory
//!
//! All capacity is fixed by [`Config`]: the connection table, the queues and the timer heap
//! are reserved in [`Engine::new`]. A connection buffer (guest bytes a socket refused, at most
//! the credit we advertised) is drawn from a pool when first needed and returned when drained,
//! so an idle connection costs bytes, not kilobytes. Owed packets are bits in a per-connection
//! set, not a queue. The steady state allocates nothing.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod buf;
mod config;
mod conn;
mod engine;
mod error;
mod io;
pub mod record;
mod stats;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod time;
pub mod wire;

pub use config::{Config, ConfigError};
pub use conn::{ConnId, ConnState, Origin};
pub use engine::{
    Engine, MessageHeaders, RxGrant, RxMessage, RxPacket, RxProbe, RxRead, Tx, TxData,
};
pub use error::{ConnError, SiblingRefusal, TableFull};
pub use io::{
    Action, Direction, GuestBytes, HostEvent, Interest, Io, LineRead, MemoryFault, Probe,
    SocketError, SocketTypes,
};
pub use stats::{ConnStats, Counter, Counters, Stats};
pub use time::Instant;
