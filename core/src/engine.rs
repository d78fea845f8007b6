//! The engine: the connection table and every protocol decision.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;

use hashbrown::HashMap;
use slab::Slab;
use tracing::{debug, trace};

use crate::buf::Pool;
use crate::config::{Config, ConfigError};
use crate::conn::{owed_act, owed_rx, Conn, ConnId, ConnState, Key, Origin, Phase};
use crate::io::{Action, Direction, GuestBytes, HostEvent, Interest, Io, LineRead, MemoryFault};
use crate::record::{AttachError, Event, Grant, Recorder, ResumeError, Snapshot, TxOutcome};
use crate::stats::{ConnStats, Stats};
use crate::time::Instant;
use crate::wire::{
    ConnectError, ConnectStatus, Header, HeaderError, OkLine, Op, Packet, SocketType,
    CID_RESERVED_MASK, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// The hybrid-vsock protocol engine.
///
/// Its methods fall into four groups (see the crate documentation for the run loop that ties
/// them together):
///
/// - **Getters** on `&self`: [`stats`](Self::stats), [`conn_stats`](Self::conn_stats),
///   [`conn_state`](Self::conn_state), [`connections`](Self::connections),
///   [`buffer_memory`](Self::buffer_memory), [`config`](Self::config).
/// - **Inputs**, `handle_*`, each taking `now`: a guest tx packet
///   ([`handle_tx`](Self::handle_tx)), a host client accepted
///   ([`handle_accept`](Self::handle_accept)) and its `CONNECT` bytes
///   ([`handle_connect_line`](Self::handle_connect_line)), socket events
///   ([`handle_host_event`](Self::handle_host_event)), the result of a flush
///   ([`handle_host_write`](Self::handle_host_write)), and the clock
///   ([`handle_timeout`](Self::handle_timeout)).
/// - **Commands**: [`abort_all`](Self::abort_all) and [`reset`](Self::reset).
/// - **Outputs**, `poll_*`: packets for the guest ([`poll_rx`](Self::poll_rx)), socket actions
///   ([`poll_action`](Self::poll_action)), the next deadline
///   ([`poll_timeout`](Self::poll_timeout)); and the bytes a flush writes
///   ([`host_bytes`](Self::host_bytes)).
///
/// After any input, drain `poll_action` and `poll_rx` (while the guest has rx buffers), then
/// arm a timer at `poll_timeout`.
pub struct Engine {
    config: Config,
    now: Instant,
    conns: Slab<Conn>,
    map: HashMap<Key, u32>,
    /// Connections that may owe the guest a packet, round-robin. Entries are validated when
    /// reached; a connection is listed at most once (`Conn::in_rx_queue`).
    rx_queue: VecDeque<(u32, u32)>,
    /// Connections that may owe the caller an action, round-robin.
    act_queue: VecDeque<(u32, u32)>,
    /// RST replies to packets that match no connection.
    resets: VecDeque<OrphanRst>,
    /// Connection deadlines, with lazy deletion: an entry counts only while the connection
    /// still has that exact deadline.
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    pool: Pool,
    next_generation: u32,
    next_host_port: u32,
    /// Host clients still sending their `CONNECT` line.
    reading_line: usize,
    stats: Stats,
    /// Told of every input and output, when attached.
    recorder: Option<Box<dyn Recorder>>,
}

#[derive(Clone, Copy, Debug)]
struct OrphanRst {
    guest_port: u32,
    host_port: u32,
    raw_type: u16,
}

/// The connection table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFull;

impl fmt::Display for TableFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection table full")
    }
}

impl std::error::Error for TableFull {}

/// Misuse of a connection handle or an I/O result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnError {
    /// The handle's connection is gone (its `Close` action was already issued).
    Stale,
    /// The connection is not in a state where this input means anything.
    WrongState,
    /// An I/O result claims more bytes than were offered; the connection was reset.
    Overrun,
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnError::Stale => "stale connection handle",
            ConnError::WrongState => "input does not apply to the connection's state",
            ConnError::Overrun => "I/O result larger than the bytes offered",
        })
    }
}

impl std::error::Error for ConnError {}

impl Engine {
    /// Builds an engine, reserving the connection table, queues and timer heap.
    pub fn new(config: Config, now: Instant) -> Result<Engine, ConfigError> {
        config.validate()?;
        let max = config.max_connections;
        Ok(Engine {
            now,
            conns: Slab::with_capacity(max),
            map: HashMap::with_capacity(max),
            rx_queue: VecDeque::with_capacity(2 * max),
            act_queue: VecDeque::with_capacity(2 * max),
            resets: VecDeque::with_capacity(config.max_pending_resets),
            timers: BinaryHeap::with_capacity(2 * max),
            // No more buffers than connections can be in use, so none more are worth keeping.
            pool: Pool::new(
                config.buffer_size as usize,
                config.pooled_buffers.min(config.max_connections),
            ),
            next_generation: 1,
            next_host_port: config.host_port_first,
            reading_line: 0,
            stats: Stats::default(),
            config,
            recorder: None,
        })
    }

    /// Builds an engine in the state a recorder attached mid-session was told
    /// ([`Event::Start`]): as [`new`](Self::new), then the next connection gets
    /// `snapshot.next_generation` and the next host client `snapshot.next_host_port`.
    ///
    /// # Errors
    ///
    /// [`ResumeError`]: the configuration is refused, or no engine with it has that state.
    pub fn resume(config: Config, now: Instant, snapshot: Snapshot) -> Result<Engine, ResumeError> {
        config.validate().map_err(ResumeError::Config)?;
        if !snapshot.fits(&config) {
            return Err(ResumeError::Snapshot(snapshot));
        }
        let mut engine = Engine::new(config, now).map_err(ResumeError::Config)?;
        engine.next_generation = snapshot.next_generation;
        engine.next_host_port = snapshot.next_host_port;
        Ok(engine)
    }

    /// The most heap memory an engine built with `config` can ever hold at once, in bytes,
    /// whatever its inputs (the recorder, the embedder's, not counted). An embedder that takes
    /// configurations from elsewhere (a trace's, in a replay) can refuse those beyond its
    /// budget. Saturates.
    ///
    /// It is the sum of what [`new`](Self::new) reserves and what can grow:
    ///
    /// - per connection (`max_connections` of them): a connection buffer of `buffer_size`
    ///   bytes (buffers pooled for reuse count among these: a buffer is only allocated when
    ///   the pool has none, so those in use and those pooled never outnumber the connections
    ///   the table has held), its slot in the table, two entries in the key map (whose
    ///   buckets are a power of two at most twice the capacity), two in each of the rx and
    ///   action queues, and six in the timer heap (reserved twice over; with lazy deletion a
    ///   connection can hold three live deadlines, so the heap may double once, both copies
    ///   held while it moves);
    /// - `max_pending_resets` owed RSTs, and the pool's list of `pooled_buffers` (at most
    ///   `max_connections`) buffers;
    /// - the engine itself.
    pub fn memory_bound(config: &Config) -> u64 {
        use std::mem::size_of;
        let n = |v: usize| v as u64;
        let max = n(config.max_connections);
        let per_conn = n(size_of::<Conn>() + size_of::<usize>())
            + 2 * n(size_of::<(Key, u32)>() + 1)
            + 2 * 2 * n(size_of::<(u32, u32)>())
            + 6 * n(size_of::<Reverse<(Instant, u32, u32)>>());
        let per_conn = per_conn.saturating_add(u64::from(config.buffer_size));
        max.saturating_mul(per_conn)
            .saturating_add(n(config.max_pending_resets).saturating_mul(n(size_of::<OrphanRst>())))
            .saturating_add(
                n(config.pooled_buffers.min(config.max_connections))
                    .saturating_mul(n(size_of::<crate::buf::Ring>())),
            )
            // The key map's smallest table and its trailing control group; the engine.
            .saturating_add(8 * n(size_of::<(Key, u32)>() + 1) + 16)
            .saturating_add(n(size_of::<Engine>()))
    }

    // ---------------------------------------------------------------------------------------
    // Getters

    /// The configuration the engine was built with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Engine-wide counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The latest `now` seen (inputs never move it backwards).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Counters of a live connection.
    pub fn conn_stats(&self, conn: ConnId) -> Option<ConnStats> {
        self.get(conn).map(|c| c.stats)
    }

    /// The state of a live connection.
    pub fn conn_state(&self, conn: ConnId) -> Option<ConnState> {
        self.get(conn).map(Conn::state)
    }

    /// Who opened a live connection.
    pub fn conn_origin(&self, conn: ConnId) -> Option<Origin> {
        self.get(conn).map(|c| c.origin)
    }

    /// The `(guest_port, host_port)` of a live connection, once known.
    pub fn conn_ports(&self, conn: ConnId) -> Option<(u32, u32)> {
        // A host client has ports only once its CONNECT line named one: one refused (or
        // closed) while still sending it never had any, whatever its phase is now.
        self.get(conn)
            .filter(|c| {
                c.origin == Origin::Guest || matches!(c.line.status(), ConnectStatus::Complete(_))
            })
            .map(|c| (c.key.guest_port, c.key.host_port))
    }

    /// Connections in the table, including those whose socket close is still owed.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes held in connection buffers, in use or pooled.
    pub fn buffer_memory(&self) -> usize {
        (self.pool.outstanding + self.pool.idle()) * self.config.buffer_size as usize
    }

    /// Whether `poll_rx` or `poll_action` may have something: a hint for callers that want to
    /// avoid polling (it may be true when a poll then finds nothing).
    pub fn has_pending_output(&self) -> bool {
        !self.resets.is_empty() || !self.rx_queue.is_empty() || !self.act_queue.is_empty()
    }

    /// Whether [`poll_rx`](Self::poll_rx) may have a packet (it may then still find none, or
    /// find only data that needs more room than the buffer offered).
    pub fn has_pending_rx(&self) -> bool {
        !self.resets.is_empty() || !self.rx_queue.is_empty()
    }

    fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns
            .get(conn.index() as usize)
            .filter(|c| c.generation == conn.generation())
    }

    /// The slot of a handle the caller may still use: one whose `Close` was not issued yet.
    fn lookup(&mut self, conn: ConnId) -> Result<usize, ConnError> {
        match self.get(conn) {
            // After `Action::Close` the handle is dead even while the connection waits for its
            // RST to reach the guest.
            Some(c) if c.socket_open => Ok(conn.index() as usize),
            _ => {
                self.stats.stale_events += 1;
                trace!(%conn, "event for a stale connection");
                Err(ConnError::Stale)
            }
        }
    }

    /// One past the highest slot index in use: what a walk over every connection covers. Not
    /// the slab's capacity, which is reserved for `max_connections` (up to 2^20) however few
    /// connections there are, so that commands such as [`stop`](Self::stop) cost what the
    /// table holds, not what it could.
    fn slots_used(&self) -> usize {
        self.conns.iter().next_back().map_or(0, |(idx, _)| idx + 1)
    }

    fn id(&self, idx: usize) -> ConnId {
        ConnId::new(idx as u32, self.conns[idx].generation)
    }

    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    /// Attaches a recorder, which is first told the configuration and the engine's
    /// [`Snapshot`] (see [`crate::record`]), or detaches it (`None`, always allowed). Returns
    /// the one attached before.
    ///
    /// # Errors
    ///
    /// [`AttachError`] while a connection is in the table or an RST is owed to the guest: a
    /// trace starting then could not be replayed. The recorder is dropped and the one
    /// attached before stays.
    pub fn set_recorder(
        &mut self,
        recorder: Option<Box<dyn Recorder>>,
    ) -> Result<Option<Box<dyn Recorder>>, AttachError> {
        if recorder.is_some() {
            if !self.conns.is_empty() {
                return Err(AttachError::Connections(self.conns.len()));
            }
            if !self.resets.is_empty() {
                return Err(AttachError::PendingResets(self.resets.len()));
            }
            // With no connection, every queue and timer entry is stale and the table's free
            // slots are all there is: start them afresh, as in the engine a replay builds.
            self.conns.clear();
            self.rx_queue.clear();
            self.act_queue.clear();
            self.timers.clear();
        }
        let old = std::mem::replace(&mut self.recorder, recorder);
        let snapshot = Snapshot {
            next_generation: self.next_generation,
            next_host_port: self.next_host_port,
        };
        if let Some(r) = self.recorder.as_mut() {
            r.event(self.now, None, &Event::Start(&self.config, snapshot));
        }
        Ok(old)
    }

    /// Whether a recorder is attached.
    pub fn is_recording(&self) -> bool {
        self.recorder.is_some()
    }

    /// Reports `event` to the recorder, if any.
    fn note(&mut self, now: Instant, event: &Event<'_>) {
        if self.recorder.is_none() {
            return;
        }
        let ports = event.conn().and_then(|conn| self.conn_ports(conn));
        if let Some(r) = self.recorder.as_mut() {
            r.event(now, ports, event);
        }
    }

    /// Reports a packet to the recorder, if any.
    fn note_packet(
        &mut self,
        now: Instant,
        to_guest: bool,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    ) {
        if let Some(r) = self.recorder.as_mut() {
            r.packet(now, to_guest, header, payload, available);
        }
    }

    // ---------------------------------------------------------------------------------------
    // Inputs: the guest

    /// A packet from the guest's tx queue.
    ///
    /// `header` is the copy of the 44 header bytes the caller took out of guest memory. Its
    /// payload (for RW) is not read here: if the returned [`Tx`] is [`Tx::Data`], the caller
    /// offers the payload to the host socket and then completes it, so bytes the socket takes go
    /// there straight from guest memory and only the remainder is copied. Whatever the outcome,
    /// the caller returns the guest's buffer to the used ring.
    pub fn handle_tx(&mut self, now: Instant, header: &Header) -> Tx<'_> {
        match self.decide_tx(now, header) {
            Some((idx, conn, len, direct)) => Tx::Data(TxData {
                engine: self,
                idx,
                conn,
                len,
                direct,
                done: false,
                header: *header,
                now,
            }),
            None => {
                // No payload goes anywhere: the packet's story ends here.
                self.note_packet(now, false, header, &mut &[][..], 0);
                Tx::Done
            }
        }
    }

    /// Handles a guest packet; returns the payload's destination `(idx, conn, len, direct)`
    /// when it carries data for a socket.
    fn decide_tx(&mut self, now: Instant, header: &Header) -> Option<(usize, ConnId, usize, bool)> {
        self.advance(now);
        self.stats.tx_packets += 1;
        let raw_op = header.op.get();
        // Addressing first: a packet that is not from our guest to the host is dropped whatever
        // else is wrong with it, and never answered.
        let (src_cid, dst_cid) = (header.src_cid.get(), header.dst_cid.get());
        if (src_cid | dst_cid) & CID_RESERVED_MASK != 0 {
            self.stats.reserved_cid_bits += 1;
            debug!(
                src = src_cid,
                dst = dst_cid,
                "dropped packet with reserved CID bits"
            );
            return None;
        }
        if src_cid != self.config.guest_cid || dst_cid != HOST_CID {
            self.stats.wrong_cid += 1;
            debug!(
                src = src_cid,
                dst = dst_cid,
                "dropped packet with wrong CID"
            );
            return None;
        }
        // No credit we ever advertise lets a packet carry more than our buffer.
        let pkt = match Packet::parse(header, self.config.buffer_size) {
            Ok(p) => p,
            Err(e) => {
                self.bad_header(header, e);
                return None;
            }
        };
        if pkt.socket_type != SocketType::Stream {
            self.stats.unknown_type += 1;
            if raw_op != Op::Rst.to_u16() {
                self.reply_rst(header);
            }
            return None;
        }
        let key = Key {
            socket_type: pkt.socket_type,
            guest_port: pkt.src_port,
            host_port: pkt.dst_port,
        };
        trace!(?pkt, "guest packet");
        match pkt.op {
            Op::Request => {
                self.guest_request(key, &pkt);
                None
            }
            Op::Rst => {
                self.guest_rst(key);
                None
            }
            _ => self.guest_on_conn(key, &pkt, header),
        }
    }

    fn bad_header(&mut self, header: &Header, e: HeaderError) {
        debug!(?header, error = %e, "rejected guest header");
        let is_rst = header.op.get() == Op::Rst.to_u16();
        match e {
            HeaderError::ReservedCidBits => unreachable!("CIDs are checked before parsing"),
            HeaderError::UnknownType(_) => self.stats.unknown_type += 1,
            HeaderError::UnknownOp(_) => self.stats.unknown_op += 1,
            HeaderError::OversizeLen(_) => self.stats.oversize_len += 1,
            HeaderError::PayloadOnControl(_) => self.stats.control_payload += 1,
        }
        let key = Key {
            socket_type: SocketType::Stream,
            guest_port: header.src_port.get(),
            host_port: header.dst_port.get(),
        };
        let existing = if header.type_.get() == SocketType::Stream.to_u16() {
            self.map.get(&key).map(|&i| i as usize)
        } else {
            None
        };
        match existing {
            Some(idx) if is_rst => self.close_by_guest(idx),
            Some(idx) => self.reset_conn(idx),
            None if is_rst => {}
            None => self.reply_rst(header),
        }
    }

    fn reply_rst(&mut self, header: &Header) {
        if self.resets.len() >= self.config.max_pending_resets {
            self.stats.rst_queue_full += 1;
            return;
        }
        self.resets.push_back(OrphanRst {
            guest_port: header.src_port.get(),
            host_port: header.dst_port.get(),
            raw_type: header.type_.get(),
        });
    }

    fn guest_request(&mut self, key: Key, pkt: &Packet) {
        if let Some(&idx) = self.map.get(&key) {
            self.stats.request_for_existing += 1;
            debug!(?key, "REQUEST for an existing connection");
            self.reset_conn(idx as usize);
            return;
        }
        if self.conns.len() >= self.config.max_connections {
            self.stats.connection_limit += 1;
            debug!(?key, "connection table full; refusing REQUEST");
            self.reply_rst(&pkt.to_header());
            return;
        }
        let idx = self.insert(Conn::new(0, Origin::Guest, Phase::GuestConnecting, key));
        let c = &mut self.conns[idx];
        c.peer_buf_alloc = pkt.buf_alloc;
        c.peer_fwd_cnt = pkt.fwd_cnt;
        c.stats.guest_packets += 1;
        c.owed_act |= owed_act::CONNECT;
        self.bind_key(idx);
        self.stats.guest_connects += 1;
        let deadline = self.now + self.config.connect_timeout;
        self.set_deadline(idx, deadline);
        debug!(conn = %self.id(idx), port = key.host_port, guest_port = key.guest_port, "guest connects");
        self.reconcile(idx);
    }

    fn guest_rst(&mut self, key: Key) {
        match self.map.get(&key) {
            Some(&idx) => {
                self.stats.rst_received += 1;
                self.close_by_guest(idx as usize);
            }
            None => self.stats.rst_for_unknown += 1,
        }
    }

    fn guest_on_conn(
        &mut self,
        key: Key,
        pkt: &Packet,
        header: &Header,
    ) -> Option<(usize, ConnId, usize, bool)> {
        let Some(&idx) = self.map.get(&key) else {
            self.stats.unknown_connection += 1;
            debug!(?key, op = ?pkt.op, "packet for no connection");
            self.reply_rst(header);
            return None;
        };
        let idx = idx as usize;
        let c = &mut self.conns[idx];
        if c.phase == Phase::Resetting {
            // An RST is already on its way; the guest has not seen it yet.
            return None;
        }
        c.stats.guest_packets += 1;
        if c.peer_buf_alloc != pkt.buf_alloc || c.peer_fwd_cnt != pkt.fwd_cnt {
            c.peer_buf_alloc = pkt.buf_alloc;
            c.peer_fwd_cnt = pkt.fwd_cnt;
            c.credit_requested = false;
        }
        match pkt.op {
            Op::Response => {
                // A RESPONSE counts only once our REQUEST really reached the guest.
                if c.phase == Phase::HostConnecting && c.owed_rx & owed_rx::REQUEST == 0 {
                    c.phase = Phase::Established;
                    c.ok = Some((OkLine::new(key.host_port), 0));
                    c.deadline = None;
                    self.stats.established += 1;
                    debug!(conn = %self.id(idx), "host connection established");
                } else {
                    self.stats.unexpected_response += 1;
                    self.reset_conn(idx);
                }
            }
            Op::Shutdown => {
                c.guest_shut |= pkt.flags & SHUTDOWN_BOTH;
                trace!(conn = %ConnId::new(idx as u32, c.generation), flags = pkt.flags, "guest shutdown");
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => c.owed_rx |= owed_rx::CREDIT_UPDATE,
            Op::Rw => {
                // Data is allowed once the guest has seen the connection established (our
                // RESPONSE delivered, or its own RESPONSE received) and until its SHUTDOWN SEND.
                if c.phase != Phase::Established
                    || c.owed_rx & owed_rx::RESPONSE != 0
                    || c.guest_shut & SHUTDOWN_SEND != 0
                {
                    self.stats.data_after_shutdown += 1;
                    self.reset_conn(idx);
                } else if c.rx_cnt.wrapping_sub(c.last_fwd_sent) as usize + pkt.len as usize
                    > self.config.buffer_size as usize
                {
                    // The guest may have in flight at most the buffer we advertised, less what
                    // it had not yet been told we forwarded.
                    self.stats.credit_violation += 1;
                    debug!(conn = %self.id(idx), len = pkt.len, "guest exceeded its credit");
                    self.reset_conn(idx);
                } else if c.host_broken {
                    // Nowhere to go: the guest hears of the loss by an RST once the socket's
                    // bytes for it are delivered, and was told with SHUTDOWN RCV to stop.
                    c.rx_cnt = c.rx_cnt.wrapping_add(pkt.len);
                    self.stats.guest_bytes_lost += u64::from(pkt.len);
                } else if pkt.len > 0 {
                    let direct = c.host_pending() == 0 && c.writable && c.socket_open;
                    let conn = ConnId::new(idx as u32, c.generation);
                    return Some((idx, conn, pkt.len as usize, direct));
                }
            }
            Op::Request | Op::Rst => unreachable!("handled before the connection lookup"),
        }
        self.reconcile(idx);
        None
    }

    fn tx_complete(
        &mut self,
        idx: usize,
        len: usize,
        direct: bool,
        written: Io,
        payload: &mut dyn GuestBytes,
    ) -> Result<(), ConnError> {
        let c = &mut self.conns[idx];
        let n = match written {
            Io::Done(n) if n > len => {
                self.reset_conn(idx);
                return Err(ConnError::Overrun);
            }
            Io::Done(n) => n,
            Io::WouldBlock => {
                c.writable = false;
                0
            }
            Io::Error(e) => {
                debug!(conn = %ConnId::new(idx as u32, c.generation), error = %e, "host write failed");
                c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
                self.stats.guest_bytes_lost += len as u64;
                self.host_broken(idx);
                return Ok(());
            }
        };
        if direct && n < len {
            c.writable = false;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        c.stats.guest_bytes += len as u64;
        c.stats.host_written += n as u64;
        self.stats.tx_bytes += len as u64;
        self.stats.tx_direct_bytes += n as u64;
        let rest = len - n;
        if rest > 0 {
            if c.ring.is_none() {
                c.ring = Some(self.pool.take());
            }
            let ring = c.ring.as_mut().expect("ring was just provided");
            // The credit check in handle_tx guarantees the remainder fits.
            let (a, b) = ring.free_slices_mut();
            let first = a.len().min(rest);
            let copied = payload
                .copy_to(n, &mut a[..first])
                .and_then(|()| payload.copy_to(n + first, &mut b[..rest - first]));
            if copied.is_err() {
                self.stats.payload_faults += 1;
                self.reset_conn(idx);
                return Ok(());
            }
            ring.commit(rest);
            c.stats.buffered_bytes += rest as u64;
            self.stats.tx_buffered_bytes += rest as u64;
        }
        self.reconcile(idx);
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Inputs: the host

    /// A host client was accepted on the listener.
    ///
    /// The engine will ask for its `CONNECT` line with [`Action::ReadConnectLine`] once the
    /// socket is readable. On `Err`, close the socket: the table is full (counted).
    pub fn handle_accept(&mut self, now: Instant) -> Result<ConnId, TableFull> {
        let accepted = self.accept(now);
        self.note(now, &Event::Accept(accepted));
        accepted
    }

    fn accept(&mut self, now: Instant) -> Result<ConnId, TableFull> {
        self.advance(now);
        if self.conns.len() >= self.config.max_connections {
            self.stats.accept_limit += 1;
            debug!("connection table full; refusing host client");
            return Err(TableFull);
        }
        if self.reading_line >= self.config.max_pending_host_clients {
            // The slowest client makes room, not the newest: a client that has not sent its
            // line in all the time the others arrived must not keep a prompt one out.
            self.evict_oldest_pending();
        }
        let key = Key {
            socket_type: SocketType::Stream,
            guest_port: 0,
            host_port: 0,
        };
        let idx = self.insert(Conn::new(0, Origin::Host, Phase::ConnectLine, key));
        self.conns[idx].writable = true;
        self.reading_line += 1;
        self.stats.host_accepts += 1;
        let deadline = self.now + self.config.connect_line_timeout;
        self.set_deadline(idx, deadline);
        self.reconcile(idx);
        let id = self.id(idx);
        debug!(conn = %id, "host client accepted");
        Ok(id)
    }

    /// The result of reading a host client's `CONNECT` line after
    /// [`Action::ReadConnectLine`].
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle, [`ConnError::WrongState`] if the connection is
    /// not reading its line; nothing changes then.
    pub fn handle_connect_line(
        &mut self,
        now: Instant,
        conn: ConnId,
        read: LineRead<'_>,
    ) -> Result<(), ConnError> {
        self.note(now, &Event::ConnectLine(conn, read));
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if c.phase != Phase::ConnectLine {
            return Err(ConnError::WrongState);
        }
        match read {
            LineRead::Data(bytes) => {
                // Readable until a read would block (see `RxRead::complete`).
                match c.line.feed(bytes) {
                    ConnectStatus::Incomplete => {}
                    ConnectStatus::Complete(port) => self.host_request(idx, port),
                    ConnectStatus::Invalid(e) => {
                        match e {
                            ConnectError::Garbage => self.stats.connect_line_garbage += 1,
                            ConnectError::TooLong => self.stats.connect_line_too_long += 1,
                            ConnectError::PortOutOfRange => self.stats.connect_line_bad_port += 1,
                        }
                        debug!(%conn, error = %e, "refused CONNECT line");
                        self.close_host_client(idx);
                    }
                }
            }
            LineRead::Eof => {
                self.stats.connect_line_eof += 1;
                self.close_host_client(idx);
            }
            LineRead::WouldBlock => c.readable = false,
            LineRead::Error(e) => {
                debug!(%conn, error = %e, "host client read failed");
                self.stats.host_errors += 1;
                self.close_host_client(idx);
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// Closes the host client that has waited longest for its `CONNECT` line.
    fn evict_oldest_pending(&mut self) {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::ConnectLine)
            .min_by_key(|(_, c)| (c.deadline, c.generation))
            .map(|(idx, _)| idx);
        if let Some(idx) = oldest {
            self.stats.pending_evicted += 1;
            debug!(conn = %self.id(idx), "pending host clients full; closing the oldest");
            self.close_host_client(idx);
        }
    }

    /// Closes a host client that never became a connection: nothing is owed to the guest,
    /// only the socket's close.
    fn close_host_client(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase == Phase::ConnectLine {
            self.reading_line -= 1;
        }
        c.phase = Phase::Closed;
        c.deadline = None;
        self.free_if_done(idx);
    }

    fn host_request(&mut self, idx: usize, guest_port: u32) {
        let Some(host_port) = self.alloc_host_port(guest_port) else {
            // Unreachable while the table is smaller than the port range, but never panic.
            self.close_host_client(idx);
            return;
        };
        let c = &mut self.conns[idx];
        c.key = Key {
            socket_type: SocketType::Stream,
            guest_port,
            host_port,
        };
        c.phase = Phase::HostConnecting;
        self.reading_line -= 1;
        c.owed_rx |= owed_rx::REQUEST;
        self.bind_key(idx);
        let deadline = self.now + self.config.connect_timeout;
        self.set_deadline(idx, deadline);
        debug!(conn = %self.id(idx), guest_port, host_port, "host client connects");
    }

    /// A host port for a connection to `guest_port` that no live connection uses.
    fn alloc_host_port(&mut self, guest_port: u32) -> Option<u32> {
        for _ in 0..=self.config.max_connections {
            let port = self.next_host_port;
            self.next_host_port = if port >= u32::MAX - 1 {
                self.config.host_port_first
            } else {
                port + 1
            };
            let key = Key {
                socket_type: SocketType::Stream,
                guest_port,
                host_port: port,
            };
            if !self.map.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// An event from a connection's host socket.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle (counted); nothing changes then.
    pub fn handle_host_event(
        &mut self,
        now: Instant,
        conn: ConnId,
        event: HostEvent,
    ) -> Result<(), ConnError> {
        self.note(now, &Event::Host(conn, event));
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if !c.socket_open || matches!(c.phase, Phase::Resetting | Phase::Closed) {
            return Ok(());
        }
        trace!(%conn, ?event, "host event");
        match event {
            HostEvent::Connected => {
                if c.phase != Phase::GuestConnecting {
                    return Err(ConnError::WrongState);
                }
                c.phase = Phase::Established;
                c.writable = true;
                c.deadline = None;
                c.owed_rx |= owed_rx::RESPONSE;
                self.stats.established += 1;
                debug!(%conn, "guest connection established");
            }
            HostEvent::ConnectFailed(e) => {
                if c.phase != Phase::GuestConnecting {
                    return Err(ConnError::WrongState);
                }
                debug!(%conn, error = %e, "host connect failed");
                self.stats.connect_failed += 1;
                self.reset_conn(idx);
            }
            HostEvent::Readable => c.readable = true,
            HostEvent::Writable => c.writable = true,
            HostEvent::Error(e) => {
                debug!(%conn, error = %e, "host socket error");
                if c.phase == Phase::ConnectLine {
                    self.stats.host_errors += 1;
                    self.close_host_client(idx);
                } else {
                    self.host_broken(idx);
                }
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// The bytes a [`Action::Flush`] writes: the rest of the `OK` line, or buffered guest
    /// bytes, as at most two slices (for one `writev`).
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle.
    pub fn host_bytes(&self, conn: ConnId) -> Result<[&[u8]; 2], ConnError> {
        let c = self
            .get(conn)
            .filter(|c| c.socket_open)
            .ok_or(ConnError::Stale)?;
        if let Some((line, done)) = &c.ok {
            return Ok([&line.as_bytes()[*done as usize..], &[]]);
        }
        Ok(match &c.ring {
            Some(ring) => {
                let (a, b) = ring.as_slices();
                [a, b]
            }
            None => [&[], &[]],
        })
    }

    /// The result of writing [`host_bytes`](Self::host_bytes) to the socket.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle; [`ConnError::WrongState`] if no
    /// [`Action::Flush`] for it is outstanding (nothing changes); [`ConnError::Overrun`] if
    /// `result` claims more bytes than were offered (the connection is reset).
    pub fn handle_host_write(
        &mut self,
        now: Instant,
        conn: ConnId,
        result: Io,
    ) -> Result<(), ConnError> {
        self.note(now, &Event::HostWrite(conn, result));
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if !c.flush_outstanding {
            // Only the answer to an `Action::Flush` moves bytes: anything else would hand
            // the guest credit for bytes no socket took.
            return Err(ConnError::WrongState);
        }
        c.flush_outstanding = false;
        if c.phase != Phase::Established || !c.socket_open {
            return Ok(());
        }
        match result {
            Io::Done(n) => {
                let offered = match &c.ok {
                    Some((line, done)) => line.as_bytes().len() - *done as usize,
                    None => c.buffered(),
                };
                if n > offered {
                    self.reset_conn(idx);
                    return Err(ConnError::Overrun);
                }
                if n < offered {
                    c.writable = false;
                }
                if let Some((line, done)) = &mut c.ok {
                    *done += n as u8;
                    if *done as usize == line.as_bytes().len() {
                        c.ok = None;
                    }
                } else if let Some(ring) = &mut c.ring {
                    ring.consume(n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    c.stats.host_written += n as u64;
                }
            }
            Io::WouldBlock => c.writable = false,
            Io::Error(e) => {
                debug!(%conn, error = %e, "host write failed");
                self.host_broken(idx);
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// Fires every deadline at or before `now`. Early and repeated calls are harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.note(now, &Event::Timeout);
        self.advance(now);
        while let Some(&Reverse((at, index, generation))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let idx = index as usize;
            match self.conns.get(idx) {
                Some(c) if c.generation == generation && c.deadline == Some(at) => {}
                _ => continue,
            }
            self.conns[idx].deadline = None;
            self.expire(idx);
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }

    fn expire(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        debug!(conn = %ConnId::new(idx as u32, c.generation), phase = ?c.phase, "deadline passed");
        match c.phase {
            Phase::ConnectLine => {
                self.stats.connect_line_timeout += 1;
                self.close_host_client(idx);
            }
            Phase::HostConnecting | Phase::GuestConnecting => {
                self.stats.connect_timeout += 1;
                self.reset_conn(idx);
            }
            Phase::Established => {
                self.stats.close_timeout += 1;
                self.reset_conn(idx);
            }
            Phase::Resetting => {
                self.stats.rst_undelivered += 1;
                c.owed_rx = 0;
                c.phase = Phase::Closed;
                self.unbind_key(idx);
                self.free_if_done(idx);
            }
            Phase::Closed => {}
        }
    }

    // ---------------------------------------------------------------------------------------
    // Commands

    /// Resets one connection: an RST to the guest, the socket closed, anything buffered
    /// dropped. For a caller that cannot keep its side of the stream (a packet it could not
    /// publish after all, a socket it lost), so the loss is never silent.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle.
    pub fn reset_connection(&mut self, now: Instant, conn: ConnId) -> Result<(), ConnError> {
        self.note(now, &Event::ResetConnection(conn));
        self.advance(now);
        let idx = self.lookup(conn)?;
        self.stats.resets_by_caller += 1;
        self.reset_conn(idx);
        Ok(())
    }

    /// Resets every connection: each gets an RST to the guest and its socket closed. For a
    /// clean shutdown of a running device.
    pub fn abort_all(&mut self, now: Instant) {
        self.note(now, &Event::AbortAll);
        self.advance(now);
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            match c.phase {
                Phase::ConnectLine => self.close_host_client(idx),
                Phase::Resetting | Phase::Closed => {}
                _ => self.reset_conn(idx),
            }
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }

    /// Forgets every connection without telling the guest, which is assumed to have forgotten
    /// them too (a device reset, or a restore that sends a transport reset). Every socket gets
    /// its [`Action::Close`]; pending RST replies are dropped.
    pub fn reset(&mut self, now: Instant) {
        self.note(now, &Event::Reset);
        self.advance(now);
        self.resets.clear();
        self.forget_all();
    }

    /// Forgets every connection because the device stopped while the guest's driver may still
    /// hold them (a paused VM whose queues stop and start again): every socket gets its
    /// [`Action::Close`], and the guest is owed an RST for each connection it may know, sent
    /// whenever it next posts rx buffers, with no deadline. A driver that was reset meanwhile
    /// ignores RSTs for connections it does not know. Beyond `max_pending_resets`, RSTs are
    /// dropped and counted.
    pub fn stop(&mut self, now: Instant) {
        self.note(now, &Event::Stop);
        self.advance(now);
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            if matches!(c.phase, Phase::ConnectLine | Phase::Closed) {
                continue;
            }
            if self.resets.len() >= self.config.max_pending_resets {
                self.stats.rst_queue_full += 1;
                continue;
            }
            self.resets.push_back(OrphanRst {
                guest_port: c.key.guest_port,
                host_port: c.key.host_port,
                raw_type: c.key.socket_type.to_u16(),
            });
        }
        self.forget_all();
    }

    fn forget_all(&mut self) {
        for idx in 0..self.slots_used() {
            if !self.conns.contains(idx) {
                continue;
            }
            let c = &mut self.conns[idx];
            if c.phase == Phase::ConnectLine {
                self.reading_line -= 1;
            }
            c.owed_rx = 0;
            c.phase = Phase::Closed;
            c.deadline = None;
            self.unbind_key(idx);
            self.free_if_done(idx);
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Outputs

    /// The next socket action, if any. Drain after every input.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        // A poll with no connection to look at changes nothing, and is not worth a record.
        let looked = !self.act_queue.is_empty();
        let action = self.next_action();
        if looked {
            self.note(self.now, &Event::Action(action));
        }
        action
    }

    fn next_action(&mut self) -> Option<Action> {
        let mut budget = self.act_queue.len();
        while budget > 0 {
            budget -= 1;
            let &(index, generation) = self.act_queue.front()?;
            let idx = index as usize;
            let live = matches!(self.conns.get(idx), Some(c) if c.generation == generation && c.in_act_queue);
            if !live {
                self.act_queue.pop_front();
                continue;
            }
            let conn = ConnId::new(index, generation);
            let c = &mut self.conns[idx];
            if c.owed_act & owed_act::CLOSE != 0 {
                c.owed_act = 0;
                c.socket_open = false;
                c.in_act_queue = false;
                self.act_queue.pop_front();
                self.free_if_done(idx);
                debug!(%conn, "close socket");
                return Some(Action::Close { conn });
            }
            let bit = c.owed_act & c.owed_act.wrapping_neg();
            c.owed_act &= !bit;
            self.act_queue.pop_front();
            if c.owed_act != 0 {
                self.act_queue.push_back((index, generation));
            } else {
                c.in_act_queue = false;
            }
            let action = match bit {
                owed_act::CONNECT => Some(Action::Connect {
                    conn,
                    port: c.key.host_port,
                }),
                owed_act::READ_LINE => {
                    (c.phase == Phase::ConnectLine && c.readable).then(|| Action::ReadConnectLine {
                        conn,
                        max: c.line.room(),
                    })
                }
                owed_act::SHUT_RD => Some(Action::Shutdown {
                    conn,
                    direction: Direction::Read,
                }),
                owed_act::FLUSH => (c.writable && c.host_pending() > 0).then(|| {
                    c.flush_outstanding = true;
                    Action::Flush { conn }
                }),
                owed_act::SHUT_WR => Some(Action::Shutdown {
                    conn,
                    direction: Direction::Write,
                }),
                owed_act::INTEREST => {
                    let want = Self::wanted_interest(c);
                    (want != c.interest).then(|| {
                        c.interest = want;
                        Action::Interest {
                            conn,
                            interest: want,
                        }
                    })
                }
                _ => unreachable!("unknown action bit {bit:#x}"),
            };
            if action.is_some() {
                trace!(?action, "action");
                return action;
            }
            budget += 1;
        }
        None
    }

    /// The next packet for the guest, given an rx buffer with `room` bytes after the header.
    ///
    /// Nothing changes until the returned grant is completed: dropping it gives the same grant
    /// on the next call.
    #[must_use]
    pub fn poll_rx(&mut self, now: Instant, room: usize) -> Option<RxGrant<'_>> {
        // A poll that finds no connection to look at and no time passed changes nothing.
        let looked = now > self.now || !self.resets.is_empty() || !self.rx_queue.is_empty();
        let decision = self.next_rx_grant(now, room);
        if looked {
            let grant = match decision {
                None => Grant::Nothing,
                Some(RxDecision::Orphan(_) | RxDecision::Packet { .. }) => Grant::Packet,
                Some(RxDecision::Read { conn, .. }) => Grant::Read(conn),
            };
            self.note(now, &Event::PollRx { room, grant });
        }
        Some(match decision? {
            RxDecision::Orphan(header) => RxGrant::Packet(RxPacket {
                engine: self,
                source: Source::Orphan,
                header,
                held: 0,
            }),
            RxDecision::Packet { idx, header, held } => RxGrant::Packet(RxPacket {
                engine: self,
                source: Source::Conn(idx),
                header,
                held,
            }),
            RxDecision::Read { idx, conn, max } => RxGrant::Read(RxRead {
                engine: self,
                idx,
                conn,
                max,
            }),
        })
    }

    fn next_rx_grant(&mut self, now: Instant, room: usize) -> Option<RxDecision> {
        self.advance(now);
        if let Some(r) = self.resets.front() {
            let header = Packet {
                src_cid: HOST_CID,
                dst_cid: self.config.guest_cid,
                src_port: r.host_port,
                dst_port: r.guest_port,
                len: 0,
                socket_type: SocketType::Stream,
                op: Op::Rst,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            }
            .to_header();
            let mut header = header;
            header.type_ = r.raw_type.into();
            return Some(RxDecision::Orphan(header));
        }
        let mut budget = self.rx_queue.len();
        while budget > 0 {
            budget -= 1;
            let &(index, generation) = self.rx_queue.front()?;
            let idx = index as usize;
            let live = matches!(self.conns.get(idx), Some(c) if c.generation == generation && c.in_rx_queue);
            if !live {
                self.rx_queue.pop_front();
                continue;
            }
            match self.next_rx(idx, room) {
                Next::Packet { op, flags, held } => {
                    let header = self.header(idx, op, flags, held as u32);
                    return Some(RxDecision::Packet { idx, header, held });
                }
                Next::Read(max) => {
                    let conn = ConnId::new(index, generation);
                    return Some(RxDecision::Read { idx, conn, max });
                }
                Next::Blocked => {
                    self.rx_queue.rotate_left(1);
                }
                Next::Nothing => {
                    self.rx_queue.pop_front();
                    self.conns[idx].in_rx_queue = false;
                }
            }
        }
        None
    }

    /// The earliest deadline, if any: call [`handle_timeout`](Self::handle_timeout) then.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, index, generation))) = self.timers.peek() {
            match self.conns.get(index as usize) {
                Some(c) if c.generation == generation && c.deadline == Some(at) => return Some(at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    fn next_rx(&self, idx: usize, room: usize) -> Next {
        let c = &self.conns[idx];
        let control = |op| Next::Packet {
            op,
            flags: 0,
            held: 0,
        };
        if c.owed_rx & owed_rx::RST != 0 {
            return control(Op::Rst);
        }
        if c.owed_rx & owed_rx::RESPONSE != 0 {
            return control(Op::Response);
        }
        if c.owed_rx & owed_rx::REQUEST != 0 {
            return control(Op::Request);
        }
        if c.owed_rx & owed_rx::SHUTDOWN_RCV != 0 {
            return Next::Packet {
                op: Op::Shutdown,
                flags: SHUTDOWN_RCV,
                held: 0,
            };
        }
        let mut blocked = false;
        let credit = c.peer_credit() as usize;
        if c.to_guest_open() {
            let held = c.line.leftover().len();
            let max = credit
                .min(room)
                .min(self.config.max_packet_payload as usize);
            if held > 0 || c.readable {
                if max > 0 && held > 0 {
                    return Next::Packet {
                        op: Op::Rw,
                        flags: 0,
                        held: held.min(max),
                    };
                }
                if max > 0 {
                    return Next::Read(max);
                }
                if credit > 0 {
                    blocked = true;
                } else if !c.credit_requested {
                    return control(Op::CreditRequest);
                }
            }
        }
        if c.owed_rx & owed_rx::CREDIT_UPDATE != 0 {
            return control(Op::CreditUpdate);
        }
        if blocked {
            Next::Blocked
        } else {
            Next::Nothing
        }
    }

    fn header(&self, idx: usize, op: Op, flags: u32, len: u32) -> Header {
        let c = &self.conns[idx];
        Packet {
            src_cid: HOST_CID,
            dst_cid: self.config.guest_cid,
            src_port: c.key.host_port,
            dst_port: c.key.guest_port,
            len,
            socket_type: c.key.socket_type,
            op,
            flags,
            buf_alloc: self.config.buffer_size,
            fwd_cnt: c.fwd_cnt,
        }
        .to_header()
    }

    /// Records that `header` reached the guest on connection `idx`.
    fn delivered(&mut self, idx: usize, header: &Header) {
        let c = &mut self.conns[idx];
        let len = header.len.get();
        c.last_fwd_sent = c.fwd_cnt;
        c.owed_rx &= !owed_rx::CREDIT_UPDATE;
        c.stats.host_packets += 1;
        c.stats.host_bytes += u64::from(len);
        c.tx_cnt = c.tx_cnt.wrapping_add(len);
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += u64::from(len);
        match Op::from_u16(header.op.get()) {
            Some(Op::Rst) => {
                c.owed_rx = 0;
                self.stats.rst_sent += 1;
                c.phase = Phase::Closed;
                c.deadline = None;
                self.unbind_key(idx);
                self.free_if_done(idx);
                return;
            }
            Some(Op::Response) => c.owed_rx &= !owed_rx::RESPONSE,
            Some(Op::Request) => c.owed_rx &= !owed_rx::REQUEST,
            Some(Op::Shutdown) => {
                let flags = header.flags.get();
                if flags & SHUTDOWN_SEND != 0 {
                    c.shutdown_sent = true;
                }
                if flags & SHUTDOWN_RCV != 0 {
                    c.owed_rx &= !owed_rx::SHUTDOWN_RCV;
                }
            }
            Some(Op::CreditUpdate) => self.stats.credit_updates_sent += 1,
            Some(Op::CreditRequest) => {
                c.credit_requested = true;
                self.stats.credit_requests_sent += 1;
            }
            _ => {}
        }
        self.reconcile(idx);
    }

    // ---------------------------------------------------------------------------------------
    // Bookkeeping

    fn insert(&mut self, mut conn: Conn) -> usize {
        conn.generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.conns.insert(conn)
    }

    fn bind_key(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        c.keyed = true;
        self.map.insert(c.key, idx as u32);
    }

    fn unbind_key(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.keyed {
            c.keyed = false;
            self.map.remove(&c.key);
        }
    }

    /// Removes a closed connection once its socket close was issued.
    fn free_if_done(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase != Phase::Closed {
            return;
        }
        Self::forget_unopened_socket(c);
        if c.socket_open {
            let c = &mut self.conns[idx];
            c.owed_act = owed_act::CLOSE;
            if !c.in_act_queue {
                c.in_act_queue = true;
                let generation = c.generation;
                Self::enqueue(
                    &mut self.act_queue,
                    &self.conns,
                    idx as u32,
                    generation,
                    |c| c.in_act_queue,
                );
            }
            return;
        }
        self.unbind_key(idx);
        let c = self.conns.remove(idx);
        if let Some(ring) = c.ring {
            self.pool.give(ring);
        }
        self.stats.closed += 1;
        trace!(conn = %ConnId::new(idx as u32, c.generation), "connection removed");
    }

    /// A guest connection whose [`Action::Connect`] was never handed out has no socket: the
    /// caller must see no action for it at all, not even a `Close`.
    fn forget_unopened_socket(c: &mut Conn) {
        if c.owed_act & owed_act::CONNECT != 0 {
            c.socket_open = false;
            c.owed_act = 0;
            // Its queue entry is skipped when reached (poll_action never sees an empty set).
            c.in_act_queue = false;
        }
    }

    /// The host socket of connection `idx` failed (an error, or a write that failed): it takes
    /// no more guest bytes, so those it holds are dropped and the guest is told at once with
    /// SHUTDOWN RCV (its sends fail instead of waiting for credit). What the socket still holds
    /// for the guest (a peer that wrote a reply and closed without reading keeps its bytes in
    /// our socket) is read and delivered, and then the guest gets an RST: only a reset tells it
    /// that bytes it sent were lost. With nothing left to deliver, the reset is at once.
    fn host_broken(&mut self, idx: usize) {
        self.stats.host_errors += 1;
        let c = &mut self.conns[idx];
        if c.host_broken {
            return;
        }
        if !c.to_guest_open() || !c.socket_open {
            self.reset_conn(idx);
            return;
        }
        c.host_broken = true;
        // Reading finds what is left, then end of file or the error itself.
        c.readable = true;
        c.writable = false;
        c.owed_rx |= owed_rx::SHUTDOWN_RCV;
        let lost = c.host_pending() as u64;
        self.stats.guest_bytes_lost += lost;
        if let Some(ring) = c.ring.take() {
            self.pool.give(ring);
        }
        c.ok = None;
        self.reconcile(idx);
    }

    /// Resets a connection: RST to the guest, close the socket, drop what it holds.
    fn reset_conn(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if matches!(c.phase, Phase::Resetting | Phase::Closed) {
            return;
        }
        debug!(conn = %ConnId::new(idx as u32, c.generation), "reset");
        if c.phase == Phase::ConnectLine {
            self.close_host_client(idx);
            return;
        }
        Self::forget_unopened_socket(c);
        c.phase = Phase::Resetting;
        c.owed_rx = owed_rx::RST;
        c.owed_act = if c.socket_open { owed_act::CLOSE } else { 0 };
        if let Some(ring) = c.ring.take() {
            self.pool.give(ring);
        }
        c.ok = None;
        let deadline = self.now + self.config.close_timeout;
        self.set_deadline(idx, deadline);
        self.reconcile(idx);
    }

    /// The guest reset the connection: close the socket, send nothing.
    fn close_by_guest(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase == Phase::HostConnecting {
            self.stats.connect_refused_by_guest += 1;
        }
        c.phase = Phase::Closed;
        c.owed_rx = 0;
        c.deadline = None;
        self.unbind_key(idx);
        self.free_if_done(idx);
    }

    fn set_deadline(&mut self, idx: usize, at: Instant) {
        let c = &mut self.conns[idx];
        c.deadline = Some(at);
        let generation = c.generation;
        if self.timers.len() == self.timers.capacity() {
            let conns = &self.conns;
            self.timers.retain(|Reverse((t, i, g))| {
                matches!(conns.get(*i as usize), Some(c) if c.generation == *g && c.deadline == Some(*t))
            });
        }
        self.timers.push(Reverse((at, idx as u32, generation)));
    }

    fn enqueue(
        queue: &mut VecDeque<(u32, u32)>,
        conns: &Slab<Conn>,
        index: u32,
        generation: u32,
        listed: impl Fn(&Conn) -> bool,
    ) {
        if queue.len() == queue.capacity() {
            queue.retain(|&(i, g)| matches!(conns.get(i as usize), Some(c) if c.generation == g && listed(c)));
        }
        queue.push_back((index, generation));
    }

    fn wanted_interest(c: &Conn) -> Interest {
        match c.phase {
            Phase::ConnectLine => Interest {
                readable: !c.readable,
                writable: false,
            },
            Phase::GuestConnecting => Interest {
                readable: false,
                writable: true,
            },
            Phase::Established => Interest {
                readable: !c.readable
                    && c.to_guest_open()
                    && c.line.leftover().is_empty()
                    && c.peer_credit() > 0,
                writable: !c.writable && c.host_pending() > 0,
            },
            Phase::HostConnecting | Phase::Resetting | Phase::Closed => Interest::default(),
        }
    }

    /// Brings a connection's derived state up to date after anything changed: what it owes
    /// the socket and the guest, whether it is finished, and its queue memberships.
    fn reconcile(&mut self, idx: usize) {
        let threshold = self.config.credit_update_threshold;
        let buffer_size = self.config.buffer_size;
        let close_deadline = self.now + self.config.close_timeout;
        let c = &mut self.conns[idx];
        match c.phase {
            Phase::Closed | Phase::Resetting => {}
            Phase::ConnectLine => {
                if c.readable && c.line.room() > 0 {
                    c.owed_act |= owed_act::READ_LINE;
                }
            }
            Phase::GuestConnecting | Phase::HostConnecting => {}
            Phase::Established => {
                let pending = c.host_pending();
                if pending > 0 && c.writable && c.socket_open && !c.flush_outstanding {
                    c.owed_act |= owed_act::FLUSH;
                }
                if c.ring.as_ref().is_some_and(|r| r.len() == 0) {
                    let ring = c.ring.take().expect("checked above");
                    self.pool.give(ring);
                }
                // A broken socket gets no end of file: the host must not take a stream that
                // lost bytes for a whole one.
                if c.guest_shut & SHUTDOWN_SEND != 0
                    && pending == 0
                    && !c.host_wr_shut
                    && !c.host_broken
                {
                    c.host_wr_shut = true;
                    c.owed_act |= owed_act::SHUT_WR;
                }
                if c.guest_shut & SHUTDOWN_RCV != 0 && !c.host_rd_shut {
                    c.host_rd_shut = true;
                    c.owed_act |= owed_act::SHUT_RD;
                }
                if c.host_broken && !c.to_guest_open() {
                    // Neither direction can carry anything more.
                    self.reset_conn(idx);
                    return;
                }
                let to_host_done = c.host_wr_shut && pending == 0;
                let to_guest_done =
                    (c.host_eof && c.shutdown_sent) || c.guest_shut & SHUTDOWN_RCV != 0;
                if to_host_done && to_guest_done {
                    debug!(conn = %ConnId::new(idx as u32, c.generation), "both directions finished");
                    self.reset_conn(idx);
                    return;
                }
                // Tell the guest about freed buffer space before it would stall.
                let freed = c.fwd_cnt.wrapping_sub(c.last_fwd_sent);
                let seen_free = buffer_size.saturating_sub(c.rx_cnt.wrapping_sub(c.last_fwd_sent));
                if c.guest_shut & SHUTDOWN_SEND == 0
                    && freed > 0
                    && (freed >= threshold || seen_free < threshold)
                {
                    c.owed_rx |= owed_rx::CREDIT_UPDATE;
                }
                if c.guest_shut == SHUTDOWN_BOTH && c.deadline.is_none() {
                    self.set_deadline(idx, close_deadline);
                }
            }
        }
        let c = &mut self.conns[idx];
        if c.socket_open && Self::wanted_interest(c) != c.interest {
            c.owed_act |= owed_act::INTEREST;
        }
        let generation = c.generation;
        if c.owed_act != 0 && !c.in_act_queue {
            c.in_act_queue = true;
            Self::enqueue(
                &mut self.act_queue,
                &self.conns,
                idx as u32,
                generation,
                |c| c.in_act_queue,
            );
        }
        let c = &self.conns[idx];
        if !c.in_rx_queue && !matches!(self.next_rx(idx, usize::MAX), Next::Nothing) {
            self.conns[idx].in_rx_queue = true;
            Self::enqueue(
                &mut self.rx_queue,
                &self.conns,
                idx as u32,
                generation,
                |c| c.in_rx_queue,
            );
        }
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("now", &self.now)
            .field("connections", &self.conns.len())
            .field("pending_resets", &self.resets.len())
            .finish_non_exhaustive()
    }
}

enum Next {
    Packet {
        op: Op,
        flags: u32,
        held: usize,
    },
    Read(usize),
    /// Data is waiting but this rx buffer has no room for payload.
    Blocked,
    Nothing,
}

/// What `poll_rx` decided, before it borrows the engine for the grant.
enum RxDecision {
    Orphan(Header),
    Packet {
        idx: usize,
        header: Header,
        held: usize,
    },
    Read {
        idx: usize,
        conn: ConnId,
        max: usize,
    },
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Orphan,
    Conn(usize),
}

/// What [`Engine::handle_tx`] made of a guest packet.
#[must_use]
pub enum Tx<'a> {
    /// The packet is fully handled (or dropped, or answered; see [`Stats`]).
    Done,
    /// The packet carries payload for a connection's socket: offer it, then
    /// [`complete`](TxData::complete).
    Data(TxData<'a>),
}

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tx::Done => f.write_str("Done"),
            Tx::Data(d) => f
                .debug_struct("Data")
                .field("conn", &d.conn)
                .field("len", &d.len)
                .field("direct", &d.direct)
                .finish(),
        }
    }
}

/// Guest payload on its way to a host socket.
///
/// If [`direct`](Self::direct) is true, write the payload straight from guest memory to the
/// connection's socket (once, non-blocking) and pass the result to
/// [`complete`](Self::complete); otherwise pass `Io::Done(0)`. The engine copies whatever the
/// socket did not take into the connection's buffer. Dropping this without completing it loses
/// the payload, so the connection is reset.
#[must_use]
pub struct TxData<'a> {
    engine: &'a mut Engine,
    idx: usize,
    conn: ConnId,
    len: usize,
    direct: bool,
    done: bool,
    /// The packet, for the recorder.
    header: Header,
    now: Instant,
}

impl TxData<'_> {
    /// The connection the payload belongs to.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty payload is handled without a `TxData`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the caller should write the payload to the socket now. False when earlier bytes
    /// are still buffered (they must go first) or the socket is known not to be writable.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Finishes the packet. `written` is the result of the direct write (`Io::Done(0)` if none
    /// was tried); `payload` gives access to the bytes the socket did not take.
    ///
    /// # Errors
    ///
    /// [`ConnError::Overrun`] if `written` claims more than [`len`](Self::len) bytes; the
    /// connection is reset.
    pub fn complete(mut self, written: Io, payload: &mut dyn GuestBytes) -> Result<(), ConnError> {
        self.done = true;
        let written = if self.direct { written } else { Io::Done(0) };
        if self.engine.recorder.is_none() {
            return self
                .engine
                .tx_complete(self.idx, self.len, self.direct, written, payload);
        }
        let (now, header, len) = (self.now, self.header, self.len);
        self.engine.note_packet(now, false, &header, payload, len);
        // Whether the payload could be read decides the outcome, so replay must know it.
        let mut watched = Watched {
            inner: payload,
            faulted: false,
        };
        let result = self
            .engine
            .tx_complete(self.idx, len, self.direct, written, &mut watched);
        let outcome = if watched.faulted {
            TxOutcome::Unreadable(written)
        } else {
            TxOutcome::Written(written)
        };
        self.engine.note(now, &Event::TxWritten(outcome));
        result
    }
}

/// Guest bytes that remember whether a read of them failed.
struct Watched<'a> {
    inner: &'a mut dyn GuestBytes,
    faulted: bool,
}

impl GuestBytes for Watched<'_> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        let r = self.inner.copy_to(offset, dst);
        self.faulted |= r.is_err();
        r
    }
}

impl Drop for TxData<'_> {
    fn drop(&mut self) {
        if !self.done {
            if self.engine.recorder.is_some() {
                let (now, header) = (self.now, self.header);
                self.engine
                    .note_packet(now, false, &header, &mut &[][..], 0);
                self.engine
                    .note(now, &Event::TxWritten(TxOutcome::Abandoned));
            }
            debug!(conn = %self.conn, "tx payload abandoned; resetting");
            self.engine.stats.payload_faults += 1;
            self.engine.reset_conn(self.idx);
        }
    }
}

/// A packet for the guest's rx queue, from [`Engine::poll_rx`].
#[must_use]
pub enum RxGrant<'a> {
    /// A packet whose bytes the engine holds: write the header and payload, then
    /// [`send`](RxPacket::send).
    Packet(RxPacket<'a>),
    /// Data to read from a host socket straight into the guest buffer, after the header.
    Read(RxRead<'a>),
}

/// A packet whose bytes the engine holds.
#[must_use]
pub struct RxPacket<'a> {
    engine: &'a mut Engine,
    source: Source,
    header: Header,
    held: usize,
}

impl fmt::Debug for RxPacket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxPacket")
            .field("header", &self.header)
            .finish()
    }
}

impl RxPacket<'_> {
    /// The header to write.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The payload to write after the header (empty for control packets).
    pub fn payload(&self) -> &[u8] {
        match self.source {
            Source::Conn(idx) => &self.engine.conns[idx].line.leftover()[..self.held],
            Source::Orphan => &[],
        }
    }

    /// The packet is in the guest's buffer: commit it. Returns the header.
    pub fn send(self) -> Header {
        let header = self.header;
        if self.engine.recorder.is_some() {
            let payload = match self.source {
                Source::Conn(idx) => &self.engine.conns[idx].line.leftover()[..self.held],
                Source::Orphan => &[],
            };
            if let Some(r) = self.engine.recorder.as_mut() {
                r.packet(
                    self.engine.now,
                    true,
                    &header,
                    &mut &payload[..],
                    payload.len(),
                );
            }
        }
        match self.source {
            Source::Orphan => {
                self.engine.resets.pop_front();
                self.engine.stats.rx_packets += 1;
                self.engine.stats.rst_sent += 1;
            }
            Source::Conn(idx) => {
                if self.held > 0 {
                    self.engine.conns[idx].line.consume_leftover(self.held);
                }
                self.engine.rx_queue.rotate_left(1);
                self.engine.delivered(idx, &header);
            }
        }
        header
    }
}

/// Data to read from a host socket into a guest rx buffer.
///
/// Read at most [`max`](Self::max) bytes from the connection's socket into the buffer, after
/// the header, then [`complete`](Self::complete) with the result and write the returned
/// header. Dropping it changes nothing.
#[must_use]
pub struct RxRead<'a> {
    engine: &'a mut Engine,
    idx: usize,
    conn: ConnId,
    max: usize,
}

impl fmt::Debug for RxRead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxRead")
            .field("conn", &self.conn)
            .field("max", &self.max)
            .finish()
    }
}

impl RxRead<'_> {
    /// The connection whose socket to read.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The most bytes to read.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Reports the read. Returns the header to publish, or `None` if nothing goes to the guest
    /// (the socket had nothing, or failed: the connection is then reset).
    ///
    /// `Io::Done(0)` is end of file; the buffer then carries a SHUTDOWN instead of data.
    ///
    /// # Errors
    ///
    /// [`ConnError::Overrun`] if `read` claims more than [`max`](Self::max) bytes; the
    /// connection is reset and nothing is published.
    pub fn complete(
        self,
        read: Io,
        payload: &mut dyn GuestBytes,
    ) -> Result<Option<Header>, ConnError> {
        let engine = self.engine;
        let idx = self.idx;
        if engine.recorder.is_none() {
            return Self::finish(engine, idx, self.conn, self.max, read);
        }
        let now = engine.now;
        engine.note(now, &Event::RxRead(self.conn, read));
        let result = Self::finish(engine, idx, self.conn, self.max, read);
        if let Ok(Some(header)) = &result {
            let n = header.len.get() as usize;
            engine.note_packet(now, true, header, payload, n);
        }
        result
    }

    fn finish(
        engine: &mut Engine,
        idx: usize,
        conn: ConnId,
        max: usize,
        read: Io,
    ) -> Result<Option<Header>, ConnError> {
        let c = &mut engine.conns[idx];
        match read {
            Io::Done(n) if n > max => {
                engine.reset_conn(idx);
                Err(ConnError::Overrun)
            }
            Io::Done(0) if c.host_broken => {
                // Everything the broken socket held reached the guest; the bytes it could not
                // take did not, which only a reset tells.
                debug!(conn = %conn, "end of file on a broken host socket");
                engine.reset_conn(idx);
                Ok(None)
            }
            Io::Done(0) => {
                debug!(conn = %conn, "host end of file");
                c.host_eof = true;
                c.readable = false;
                let header = engine.header(idx, Op::Shutdown, SHUTDOWN_SEND, 0);
                engine.rx_queue.rotate_left(1);
                engine.delivered(idx, &header);
                Ok(Some(header))
            }
            Io::Done(n) => {
                // A short read does not prove the socket drained: the peer's end of file may
                // sit behind the data, its edge already reported. Readiness is given up only
                // on would-block, so edge-triggered callers never miss it.
                let header = engine.header(idx, Op::Rw, 0, n as u32);
                engine.rx_queue.rotate_left(1);
                engine.delivered(idx, &header);
                Ok(Some(header))
            }
            Io::WouldBlock => {
                c.readable = false;
                engine.reconcile(idx);
                Ok(None)
            }
            Io::Error(e) => {
                debug!(conn = %conn, error = %e, "host read failed");
                // A broken socket's error was counted when it broke.
                if !c.host_broken {
                    engine.stats.host_errors += 1;
                }
                engine.reset_conn(idx);
                Ok(None)
            }
        }
    }
}
