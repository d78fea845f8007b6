//! A deterministic world around one engine: a simulated guest (the crate's model of Linux's
//! virtio-vsock stack, [`vsock_core::testing::LinuxGuest`], fed over a direct call with a
//! modelled rx ring), simulated host sockets with scripted faults, and a virtual clock.
//!
//! Everything runs on one thread in a fixed order, so a run is a pure function of the script.
//! `Sim::run` drives until nothing moves and panics if that never happens (the livelock guard);
//! `Sim::run_for` also moves the clock, jumping to the next deadline of the engine or guest.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use vsock_core::wire::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND};
use vsock_core::{
    Action, Config, ConnId, ConnState, Direction, Engine, HostEvent, Instant, Interest, Io,
    LineRead, RxGrant, SocketError, Tx,
};

// The guest's constants and types, for the tests (not every test binary uses them all).
#[allow(unused_imports)]
pub use vsock_core::testing::{
    pattern, GuestConn, GuestKey, LinuxGuest, GUEST_BUF_ALLOC, GUEST_CLOSE_TIMEOUT, GUEST_MAX_PKT,
};

pub const GUEST_CID: u64 = 3;
/// Linux posts rx buffers of 4 KiB (header included).
pub const RX_BUF: usize = 4096;

pub const ECONNREFUSED: i32 = 111;
pub const ENOENT: i32 = 2;
pub const EPIPE: i32 = 32;
pub const ECONNRESET: i32 = 104;

/// How `<uds_path>_<port>` answers a connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Accept,
    Refuse,
    /// The connect never completes.
    Hang,
}

/// One simulated host socket, seen from both ends: what the engine does to it and what the
/// host application does with it.
#[derive(Debug)]
pub struct HostSock {
    pub conn: ConnId,
    /// Bytes the engine wrote that the application has not read.
    pub inbound: VecDeque<u8>,
    /// Bytes the application read, in order.
    pub received: Vec<u8>,
    /// Bytes the application wrote that the engine has not read.
    pub outbound: VecDeque<u8>,
    /// Everything the application wrote, in order.
    pub sent_by_app: Vec<u8>,
    /// The application shut its write side.
    pub app_eof: bool,
    /// The application closed the socket: engine writes fail with EPIPE.
    pub app_closed: bool,
    /// Capacity of the socket buffer the engine writes into.
    pub capacity: usize,
    /// The engine shut its write side (the application sees end of file).
    pub shut_wr: bool,
    pub shut_rd: bool,
    pub closed: bool,
    pub interest: Interest,
    /// The application reads whatever arrives.
    pub auto_read: bool,
    /// Reads return at most this many bytes (short reads).
    pub read_chunk: Option<usize>,
    /// Writes take at most this many bytes (short writes).
    pub write_chunk: Option<usize>,
    /// The next N reads and writes report WouldBlock.
    pub block_reads: usize,
    pub block_writes: usize,
    pub fail_read: Option<SocketError>,
    pub fail_write: Option<SocketError>,
    /// The peer closed with our bytes unread (Linux's `ECONNRESET` on a Unix socket): reads
    /// return what it wrote first, then this error once, then end of file.
    pub pending_error: Option<SocketError>,
    /// A write was refused; fire Writable when room frees.
    write_blocked: bool,
    /// A scripted `block_reads`/`block_writes` refused an operation: its readiness edge is
    /// still to come (see [`Sim::rearm`]).
    missed_readable: bool,
    missed_writable: bool,
    /// `(guest_port, host_port)` of the connection, recorded as soon as the engine knows them
    /// (at `Connect` for guest-initiated connections, after the `CONNECT` line otherwise), so
    /// a socket can be matched to its guest connection after the engine forgot it.
    pub ports: Option<(u32, u32)>,
    /// When the engine closed the socket.
    pub closed_at: Option<Instant>,
    /// Writes the engine tried after its own `shutdown(SHUT_WR)` (each failed with EPIPE).
    pub writes_after_shut_wr: usize,
}

impl HostSock {
    fn new(conn: ConnId, capacity: usize) -> Self {
        HostSock {
            conn,
            inbound: VecDeque::new(),
            received: Vec::new(),
            outbound: VecDeque::new(),
            sent_by_app: Vec::new(),
            app_eof: false,
            app_closed: false,
            capacity,
            shut_wr: false,
            shut_rd: false,
            closed: false,
            interest: Interest::default(),
            auto_read: true,
            read_chunk: None,
            write_chunk: None,
            block_reads: 0,
            block_writes: 0,
            fail_read: None,
            fail_write: None,
            pending_error: None,
            write_blocked: false,
            missed_readable: false,
            missed_writable: false,
            ports: None,
            closed_at: None,
            writes_after_shut_wr: 0,
        }
    }

    /// The application sees end of file: the engine shut or closed, and everything was read.
    pub fn app_sees_eof(&self) -> bool {
        (self.shut_wr || self.closed) && self.inbound.is_empty()
    }

    fn write(&mut self, bufs: [&[u8]; 2]) -> Io {
        if self.shut_wr {
            // The engine's own `shutdown(SHUT_WR)` came first: EPIPE, and counted.
            self.writes_after_shut_wr += 1;
            return Io::Error(SocketError(EPIPE));
        }
        if let Some(e) = self.fail_write.take() {
            return Io::Error(e);
        }
        if self.app_closed {
            return Io::Error(SocketError(EPIPE));
        }
        if self.block_writes > 0 {
            self.block_writes -= 1;
            self.write_blocked = true;
            self.missed_writable = true;
            return Io::WouldBlock;
        }
        let total = bufs[0].len() + bufs[1].len();
        let room = self.capacity - self.inbound.len();
        let n = total.min(room).min(self.write_chunk.unwrap_or(usize::MAX));
        if n == 0 {
            self.write_blocked = true;
            return Io::WouldBlock;
        }
        let first = n.min(bufs[0].len());
        self.inbound.extend(&bufs[0][..first]);
        self.inbound.extend(&bufs[1][..n - first]);
        if n < total {
            self.write_blocked = true;
        }
        Io::Done(n)
    }

    /// Reads up to `max` bytes as the engine would; returns the bytes and the result.
    fn read(&mut self, max: usize) -> (Vec<u8>, Io) {
        if let Some(e) = self.fail_read.take() {
            return (Vec::new(), Io::Error(e));
        }
        if self.block_reads > 0 {
            self.block_reads -= 1;
            self.missed_readable = true;
            return (Vec::new(), Io::WouldBlock);
        }
        if self.outbound.is_empty() {
            if let Some(e) = self.pending_error.take() {
                return (Vec::new(), Io::Error(e));
            }
            return if self.app_eof || self.app_closed {
                (Vec::new(), Io::Done(0))
            } else {
                (Vec::new(), Io::WouldBlock)
            };
        }
        let n = max
            .min(self.outbound.len())
            .min(self.read_chunk.unwrap_or(usize::MAX));
        let bytes: Vec<u8> = self.outbound.drain(..n).collect();
        (bytes, Io::Done(n))
    }

    fn readable(&self) -> bool {
        !self.outbound.is_empty() || self.app_eof || self.app_closed || self.fail_read.is_some()
    }
}

/// Knobs of the simulated world.
#[derive(Clone, Debug)]
pub struct World {
    /// Socket buffer of each host socket.
    pub host_capacity: usize,
    /// Host sockets' applications read whatever arrives.
    pub host_auto_read: bool,
    /// Guest connections' applications read whatever arrives.
    pub guest_auto_read: bool,
    /// Rx buffers the guest keeps posted.
    pub rx_ring: usize,
    /// Payload room of each guest rx buffer.
    pub rx_room: usize,
    /// Most guest packets handled per step (models a tx queue batch).
    pub tx_batch: usize,
    /// Report readiness only for the interest the engine registered, as epoll does: a
    /// Readable or Writable event outside it is not delivered, and registering an interest
    /// reports the readiness the socket already has (`EPOLL_CTL_MOD`). Off by default: events
    /// then reach the engine whatever its interest.
    pub honor_interest: bool,
}

impl Default for World {
    fn default() -> Self {
        World {
            host_capacity: 64 * 1024,
            host_auto_read: true,
            guest_auto_read: true,
            rx_ring: 128,
            rx_room: RX_BUF - 44,
            tx_batch: 64,
            honor_interest: false,
        }
    }
}

/// The engine, a guest and a host, on one virtual clock.
pub struct Sim {
    pub engine: Engine,
    pub now: Instant,
    pub world: World,
    // Guest side.
    /// The guest's vsock stack: its sockets (`guest.conns`, `guest.conn(key)`), listeners,
    /// the packets it received (`guest.log`), and its counters (`guest.credit_violations`,
    /// `guest.ignored_rsts`).
    pub guest: LinuxGuest,
    /// Rx buffers currently posted.
    pub rx_posted: usize,
    /// The guest stopped posting rx buffers.
    pub rx_paused: bool,
    // Host side.
    pub host: BTreeMap<u64, HostSock>,
    pub listeners: BTreeMap<u32, Listen>,
    pub closed_socks: Vec<HostSock>,
    pending_events: VecDeque<(ConnId, HostEvent)>,
    /// Host clients refused at accept.
    pub refused_accepts: usize,
    /// Actions seen, in order.
    pub actions: Vec<Action>,
    pub steps: u64,
}

impl Sim {
    pub fn new(config: Config, world: World) -> Sim {
        let now = Instant::from_secs(1);
        let rx_posted = world.rx_ring;
        let mut guest = LinuxGuest::new(GUEST_CID);
        guest.auto_read = world.guest_auto_read;
        Sim {
            engine: Engine::new(config, now).expect("valid config"),
            now,
            world,
            guest,
            rx_posted,
            rx_paused: false,
            host: BTreeMap::new(),
            listeners: BTreeMap::new(),
            closed_socks: Vec::new(),
            pending_events: VecDeque::new(),
            refused_accepts: 0,
            actions: Vec::new(),
            steps: 0,
        }
    }

    pub fn default_config() -> Config {
        Config::new(GUEST_CID)
    }

    // ---------------------------------------------------------------------------------------
    // Scripting the guest (forwarded to the Linux stack model)

    /// The guest stack picks up `World::guest_auto_read` for the sockets it creates next.
    fn sync_guest_knobs(&mut self) {
        self.guest.auto_read = self.world.guest_auto_read;
    }

    /// The guest application connects to host port `port`; returns the guest connection key.
    pub fn guest_connect(&mut self, port: u32) -> GuestKey {
        self.sync_guest_knobs();
        self.guest.connect(port)
    }

    pub fn guest_listen(&mut self, port: u32) {
        self.guest.listen(port);
    }

    /// The guest application writes `bytes` (sent as credit allows).
    pub fn guest_write(&mut self, key: GuestKey, bytes: &[u8]) {
        self.guest.write(key, bytes);
    }

    /// The guest application shuts down directions (SHUTDOWN_RCV / SHUTDOWN_SEND), after its
    /// queued bytes went out.
    pub fn guest_shutdown(&mut self, key: GuestKey, flags: u32) {
        self.guest.shutdown(key, flags);
    }

    /// The guest application closes: shut both, then wait for the host's RST (or time out).
    pub fn guest_close(&mut self, key: GuestKey) {
        self.guest.close(key);
    }

    /// The guest application closes at once, like `close()` on Linux: bytes it had not sent
    /// yet are dropped (its blocked `send` never completed), SHUTDOWN of both directions goes
    /// out, and the close timeout runs.
    pub fn guest_close_now(&mut self, key: GuestKey) {
        self.guest.close_now(key);
    }

    /// The guest resets the connection at once.
    pub fn guest_rst(&mut self, key: GuestKey) {
        self.guest.rst(key);
    }

    /// The guest application reads up to `n` unread bytes.
    pub fn guest_read(&mut self, key: GuestKey, n: usize) -> usize {
        self.guest.read(key, n)
    }

    /// Queues a raw packet from the guest, for bad-input tests.
    pub fn guest_send_raw(&mut self, header: Header, payload: Vec<u8>) {
        self.guest.send_raw(header, payload);
    }

    // ---------------------------------------------------------------------------------------
    // Scripting the host

    /// `<uds_path>_<port>` exists and answers connects as `mode` says.
    pub fn host_listen(&mut self, port: u32, mode: Listen) {
        self.listeners.insert(port, mode);
    }

    /// A host client connects to the device's listener and writes `bytes` (its CONNECT line,
    /// perhaps followed by data). Returns its handle, or `None` if refused.
    pub fn host_connect(&mut self, bytes: &[u8]) -> Option<ConnId> {
        match self.engine.handle_accept(self.now) {
            Ok(conn) => {
                let mut s = HostSock::new(conn, self.world.host_capacity);
                s.auto_read = self.world.host_auto_read;
                s.outbound.extend(bytes);
                s.sent_by_app.extend_from_slice(bytes);
                self.host.insert(conn.to_raw(), s);
                if !bytes.is_empty() {
                    self.pending_events.push_back((conn, HostEvent::Readable));
                }
                Some(conn)
            }
            Err(_) => {
                self.refused_accepts += 1;
                None
            }
        }
    }

    pub fn sock(&mut self, conn: ConnId) -> &mut HostSock {
        self.host.get_mut(&conn.to_raw()).expect("live host socket")
    }

    /// The host application writes `bytes` on the socket.
    pub fn host_write(&mut self, conn: ConnId, bytes: &[u8]) {
        let s = self.sock(conn);
        s.outbound.extend(bytes);
        s.sent_by_app.extend_from_slice(bytes);
        self.pending_events.push_back((conn, HostEvent::Readable));
    }

    /// The host application shuts its write side.
    pub fn host_shutdown_write(&mut self, conn: ConnId) {
        self.sock(conn).app_eof = true;
        self.pending_events.push_back((conn, HostEvent::Readable));
    }

    /// The host application closes its socket.
    pub fn host_close(&mut self, conn: ConnId) {
        self.sock(conn).app_closed = true;
        self.pending_events.push_back((conn, HostEvent::Readable));
        self.pending_events.push_back((conn, HostEvent::Writable));
    }

    /// The host application closes its socket without reading what the engine wrote: the
    /// socket reports an error (as Linux does with `ECONNRESET`), yet still holds the bytes the
    /// application wrote before it closed.
    pub fn host_close_unread(&mut self, conn: ConnId) {
        let s = self.sock(conn);
        s.app_closed = true;
        s.pending_error = Some(SocketError(ECONNRESET));
        self.pending_events
            .push_back((conn, HostEvent::Error(SocketError(ECONNRESET))));
    }

    /// The host application reads up to `n` bytes.
    pub fn host_read(&mut self, conn: ConnId, n: usize) -> usize {
        let s = self.sock(conn);
        let n = n.min(s.inbound.len());
        let bytes: Vec<u8> = s.inbound.drain(..n).collect();
        s.received.extend(bytes);
        if n > 0 && s.write_blocked {
            s.write_blocked = false;
            self.pending_events.push_back((conn, HostEvent::Writable));
        }
        n
    }

    /// Host socket for the guest connection `key` (guest-initiated: by port order of creation).
    pub fn host_sock_for_port(&self, port: u32) -> Vec<ConnId> {
        self.host
            .values()
            .filter(|s| {
                self.engine
                    .conn_ports(s.conn)
                    .is_some_and(|(_, h)| h == port)
            })
            .map(|s| s.conn)
            .collect()
    }

    /// Delivers an event to the engine as a socket would.
    pub fn host_event(&mut self, conn: ConnId, ev: HostEvent) {
        self.pending_events.push_back((conn, ev));
    }

    // ---------------------------------------------------------------------------------------
    // Driving

    /// One round of the canonical run loop. Returns whether anything happened.
    pub fn step(&mut self) -> bool {
        self.steps += 1;
        let mut progress = false;
        let now = self.now;

        // Socket events.
        while let Some((conn, ev)) = self.pending_events.pop_front() {
            let Some(sock) = self.host.get(&conn.to_raw()).filter(|s| !s.closed) else {
                continue;
            };
            let wanted = match ev {
                HostEvent::Readable => sock.interest.readable,
                HostEvent::Writable => sock.interest.writable,
                _ => true,
            };
            if self.world.honor_interest && !wanted {
                // Reported when the interest is registered, if the socket is still ready.
                continue;
            }
            let _ = self.engine.handle_host_event(now, conn, ev);
            progress = true;
        }

        // Guest tx queue.
        progress |= self.guest.pump(now);
        for _ in 0..self.world.tx_batch {
            let Some((h, payload)) = self.guest.poll_tx() else {
                break;
            };
            progress = true;
            self.deliver_tx(h, &payload);
        }

        // Socket actions.
        while let Some(action) = self.engine.poll_action() {
            progress = true;
            self.actions.push(action);
            self.perform(action);
        }

        // Rx queue.
        while self.rx_posted > 0 {
            let Some(grant) = self.engine.poll_rx(now, self.world.rx_room) else {
                break;
            };
            let delivered = match grant {
                RxGrant::Packet(p) => {
                    let payload = p.payload().to_vec();
                    let h = p.send();
                    Some((h, payload))
                }
                RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                RxGrant::Read(r) => {
                    let sock = self
                        .host
                        .get_mut(&r.conn().to_raw())
                        .expect("read grant for a socket the engine closed");
                    let (bytes, io) = sock.read(r.max());
                    let more = sock.readable();
                    let conn = r.conn();
                    let h = r
                        .complete(io, &mut &bytes[..])
                        .expect("read within the grant");
                    if more && matches!(io, Io::Done(n) if n > 0) {
                        // Short read that left data: the next chunk "arrives".
                        self.pending_events.push_back((conn, HostEvent::Readable));
                    }
                    self.rearm(conn);
                    h.map(|h| (h, bytes))
                }
            };
            progress = true;
            if let Some((h, payload)) = delivered {
                self.rx_posted -= 1;
                self.sync_guest_knobs();
                self.guest.receive(&h, &payload);
            }
        }
        if !self.rx_paused && self.rx_posted < self.world.rx_ring {
            // The guest driver refills its ring; more packets may now go out.
            self.rx_posted = self.world.rx_ring;
            progress |= self.engine.has_pending_output();
        }

        // Host applications read.
        let conns: Vec<ConnId> = self
            .host
            .values()
            .filter(|s| s.auto_read)
            .map(|s| s.conn)
            .collect();
        for conn in conns {
            if self.host_read(conn, usize::MAX) > 0 {
                progress = true;
            }
        }

        // Clocks.
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
            // A loop that sleeps until the next deadline must never be handed one that has
            // passed: it would wake at once, forever.
            let next = self.engine.poll_timeout();
            assert!(
                next.is_none_or(|t| t > now),
                "handle_timeout({now:?}) left a passed deadline {next:?}"
            );
            progress = true;
        }
        progress |= self.guest.handle_timeout(now);
        progress
    }

    fn deliver_tx(&mut self, h: Header, payload: &[u8]) {
        let now = self.now;
        let conn = match self.engine.handle_tx(now, &h) {
            Tx::Done => None,
            Tx::Data(d) => {
                let written = if d.direct() {
                    let sock = self
                        .host
                        .get_mut(&d.conn().to_raw())
                        .expect("direct write to a closed socket");
                    sock.write([payload, &[]])
                } else {
                    Io::Done(0)
                };
                let conn = d.conn();
                d.complete(written, &mut &payload[..])
                    .expect("write within the payload");
                Some(conn)
            }
        };
        if let Some(conn) = conn {
            self.rearm(conn);
        }
    }

    fn perform(&mut self, action: Action) {
        let now = self.now;
        match action {
            Action::Connect { conn, port, .. } => {
                let mut s = HostSock::new(conn, self.world.host_capacity);
                s.auto_read = self.world.host_auto_read;
                s.ports = self.engine.conn_ports(conn);
                match self.listeners.get(&port) {
                    Some(Listen::Accept) => {
                        self.host.insert(conn.to_raw(), s);
                        self.pending_events.push_back((conn, HostEvent::Connected));
                    }
                    Some(Listen::Hang) => {
                        self.host.insert(conn.to_raw(), s);
                    }
                    Some(Listen::Refuse) => {
                        self.host.insert(conn.to_raw(), s);
                        self.pending_events
                            .push_back((conn, HostEvent::ConnectFailed(SocketError(ECONNREFUSED))));
                    }
                    None => {
                        self.host.insert(conn.to_raw(), s);
                        self.pending_events
                            .push_back((conn, HostEvent::ConnectFailed(SocketError(ENOENT))));
                    }
                }
            }
            Action::ReadConnectLine { conn, max } => {
                let sock = self
                    .host
                    .get_mut(&conn.to_raw())
                    .expect("line read on a live socket");
                let (bytes, io) = sock.read(max);
                let read = match io {
                    Io::Done(0) => LineRead::Eof,
                    Io::Done(_) => LineRead::Data(&bytes),
                    Io::WouldBlock => LineRead::WouldBlock,
                    Io::Error(e) => LineRead::Error(e),
                };
                self.engine
                    .handle_connect_line(now, conn, read)
                    .expect("line read for a connection reading its line");
                if self.engine.conn_state(conn) == Some(ConnState::HostConnecting) {
                    let ports = self.engine.conn_ports(conn);
                    self.host.get_mut(&conn.to_raw()).unwrap().ports = ports;
                }
                let sock = &self.host[&conn.to_raw()];
                if sock.readable() && matches!(io, Io::Done(n) if n > 0 && n < max) {
                    self.pending_events.push_back((conn, HostEvent::Readable));
                }
                self.rearm(conn);
            }
            Action::Flush { conn } => {
                let [a, b] = self
                    .engine
                    .host_bytes(conn)
                    .expect("flush of a live connection");
                let (a, b) = (a.to_vec(), b.to_vec());
                let sock = self
                    .host
                    .get_mut(&conn.to_raw())
                    .expect("flush of a live socket");
                let io = sock.write([&a, &b]);
                self.engine
                    .handle_host_write(now, conn, io)
                    .expect("write within the offered bytes");
                self.rearm(conn);
            }
            Action::Shutdown { conn, direction } => {
                let sock = self
                    .host
                    .get_mut(&conn.to_raw())
                    .expect("shutdown of a live socket");
                match direction {
                    Direction::Write => sock.shut_wr = true,
                    Direction::Read => sock.shut_rd = true,
                }
            }
            Action::Interest { conn, interest } => {
                let sock = self
                    .host
                    .get_mut(&conn.to_raw())
                    .expect("interest of a live socket");
                sock.interest = interest;
                if self.world.honor_interest {
                    self.report_readiness(conn);
                }
            }
            Action::Close { conn } => {
                let mut sock = self
                    .host
                    .remove(&conn.to_raw())
                    .expect("close of a live socket");
                sock.closed = true;
                sock.closed_at = Some(now);
                // What the application had not read yet it can still read.
                let rest: Vec<u8> = sock.inbound.drain(..).collect();
                sock.received.extend(rest);
                self.closed_socks.push(sock);
            }
        }
    }

    /// After a scripted `block_reads`/`block_writes` refused an operation, the data or room
    /// "arrives" at once: an edge-triggered socket then reports the readiness edge the refusal
    /// implied was still to come. (Without it a scripted refusal would be a lost wake-up, which
    /// no kernel produces.)
    fn rearm(&mut self, conn: ConnId) {
        let Some(s) = self.host.get_mut(&conn.to_raw()) else {
            return;
        };
        if std::mem::take(&mut s.missed_readable) && s.readable() {
            self.pending_events.push_back((conn, HostEvent::Readable));
        }
        if std::mem::take(&mut s.missed_writable) {
            self.pending_events.push_back((conn, HostEvent::Writable));
        }
    }

    /// Level-triggered readiness, as an epoll loop re-arming every socket would report it:
    /// each live socket that is ready in a way the engine asked for gets that event. Recovers
    /// from the edge-triggered model's lost wake-ups after scripted `block_reads`/`block_writes`
    /// (a refused read or write whose data or room then "arrives" without a new event).
    /// Sockets whose connect is still under way are left alone.
    pub fn kick(&mut self) {
        let conns: Vec<ConnId> = self.host.values().map(|s| s.conn).collect();
        for conn in conns {
            self.report_readiness(conn);
        }
    }

    /// Queues the events a socket is ready for within its registered interest (nothing while
    /// its connect is under way: the connect's outcome is reported by itself).
    fn report_readiness(&mut self, conn: ConnId) {
        let Some(s) = self.host.get(&conn.to_raw()) else {
            return;
        };
        if s.closed || self.engine.conn_state(conn) == Some(ConnState::GuestConnecting) {
            return;
        }
        if s.interest.readable && s.readable() {
            self.pending_events.push_back((conn, HostEvent::Readable));
        }
        let can_write = s.app_closed || s.fail_write.is_some() || s.inbound.len() < s.capacity;
        if s.interest.writable && can_write {
            self.pending_events.push_back((conn, HostEvent::Writable));
        }
    }

    /// Every host socket the engine ever had, live or closed.
    pub fn all_socks(&self) -> impl Iterator<Item = &HostSock> {
        self.host.values().chain(self.closed_socks.iter())
    }

    /// Steps until nothing happens. Panics after `limit` steps (a livelock).
    pub fn run(&mut self) {
        self.run_bounded(200_000);
    }

    pub fn run_bounded(&mut self, limit: u64) {
        let start = self.steps;
        while self.step() {
            assert!(
                self.steps - start < limit,
                "livelock: still busy after {limit} steps at {}",
                self.now
            );
        }
    }

    /// Runs, moving the clock from deadline to deadline, until `d` has passed.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        loop {
            self.run();
            let next_engine = self.engine.poll_timeout();
            let next_guest = self.guest.next_deadline();
            let next = [next_engine, next_guest, Some(end)]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            if next <= self.now && self.now >= end {
                break;
            }
            self.now = next.max(self.now);
            self.step();
            if self.now >= end {
                self.run();
                break;
            }
        }
    }

    /// Advances the clock by `d` without running.
    pub fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
    }

    // ---------------------------------------------------------------------------------------
    // Checks

    /// The host socket (live or closed) of a connection.
    pub fn any_sock(&self, conn: ConnId) -> &HostSock {
        self.host
            .get(&conn.to_raw())
            .or_else(|| self.closed_socks.iter().rev().find(|s| s.conn == conn))
            .expect("known socket")
    }

    /// Asserts that the engine's memory stays within what its Config allows.
    pub fn assert_memory_bounded(&self) {
        let cfg = self.engine.config();
        let bound = (cfg.max_connections + cfg.pooled_buffers) * cfg.buffer_size as usize;
        assert!(
            self.engine.buffer_memory() <= bound,
            "buffer memory above the configured bound"
        );
        assert!(self.engine.connections() <= cfg.max_connections);
        assert_eq!(
            self.guest.credit_violations, 0,
            "the engine overran the guest's credit"
        );
    }
}

/// A deterministic byte pattern for payloads: every position distinct modulo 251.
/// A tiny seeded generator for tests that script random sizes.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

pub fn shutdown_flags() -> (u32, u32) {
    (SHUTDOWN_RCV, SHUTDOWN_SEND)
}

/// Compares two byte streams, reporting the first difference instead of dumping them.
#[track_caller]
pub fn assert_bytes_eq(actual: &[u8], expected: &[u8]) {
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "streams differ at byte {i} (lengths {} and {})",
            actual.len(),
            expected.len()
        );
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "stream lengths differ (contents agree up to the shorter)"
    );
}
