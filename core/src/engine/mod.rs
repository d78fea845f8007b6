//! The engine: the connection table and every protocol decision, one type split by concern:
//!
//! - here: the struct, its construction, getters and recording hooks;
//! - [`guest`]: guest inputs (`handle_tx` and the completion of its payload);
//! - [`host`]: host inputs (accepts, the `CONNECT` line, socket events, write results);
//! - [`command`]: the clock and commands (timeouts, resets, stop);
//! - [`output`]: outputs (`poll_action`, `poll_rx`, `poll_timeout`) and delivery;
//! - [`upkeep`]: bookkeeping (reconcile, freeing, queues, deadlines);
//! - [`grant`]: the grant types that borrow the engine (`Tx`, `TxData`, `RxGrant`, `RxPacket`,
//!   `RxRead`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;

use hashbrown::HashMap;
use slab::Slab;
use tracing::{debug, trace};

mod command;
mod grant;
mod guest;
mod host;
mod output;
mod sibling;
mod sink;
mod upkeep;

use crate::conn::Next;
use grant::Source;
pub use grant::{MessageHeaders, RxGrant, RxMessage, RxPacket, RxProbe, RxRead, Tx, TxData};
use sink::Sink;

use crate::buf::Pool;
use crate::config::{Config, ConfigError};
use crate::conn::{owed_act, owed_rx, Conn, ConnId, ConnState, Key, Origin, Phase};
use crate::error::{ConnError, SiblingRefusal, TableFull};
use crate::io::{
    Action, Direction, GuestBytes, HostEvent, Io, LineRead, MemoryFault, Probe, SocketTypes,
};
use crate::record::{AttachError, Event, Grant, Recorder, ResumeError, Snapshot, TxOutcome};
use crate::stats::{ConnStats, Stats};
use crate::time::Instant;
use crate::wire::{
    ConnectError, ConnectParser, ConnectStatus, Header, HeaderError, OkLine, Op, Packet,
    SocketType, CID_RESERVED_MASK, HOST_CID, SEQ_EOM, SEQ_EOR, SHUTDOWN_BOTH, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
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
    /// The socket types the guest's driver negotiated.
    socket_types: SocketTypes,
    stats: Stats,
    /// Told of every input and output, when attached.
    sink: Sink,
}

#[derive(Clone, Copy, Debug)]
struct OrphanRst {
    /// The CID the packet was sent to, and the RST comes from.
    peer_cid: u32,
    guest_port: u32,
    host_port: u32,
    raw_type: u16,
}

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
            socket_types: SocketTypes::STREAM,
            stats: Stats::default(),
            config,
            sink: Sink::default(),
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
    ///   bytes and, for a seqpacket connection, its bitmap of message ends (an eighth of
    ///   that) and a second such buffer, the stage of a host message the guest's rx buffers
    ///   could not take at once (buffers pooled for reuse count among these: a buffer is only allocated when
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
        // A connection buffer and its bitmap of message ends (seqpacket), and a stage of the
        // same kind for the tail of a host message (seqpacket).
        let ring = u64::from(config.buffer_size);
        let per_conn = per_conn.saturating_add(2 * (ring + ring.div_ceil(64) * 8));
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

    /// The socket type of a live connection.
    pub fn conn_socket_type(&self, conn: ConnId) -> Option<SocketType> {
        self.get(conn).map(|c| c.key.socket_type)
    }

    /// The socket types the guest's driver negotiated (see
    /// [`set_socket_types`](Self::set_socket_types)).
    pub fn socket_types(&self) -> SocketTypes {
        self.socket_types
    }

    /// Whether a live connection's socket takes no more guest bytes: its peer hung up
    /// ([`HostEvent::HangUp`]) or it broke.
    pub fn conn_peer_gone(&self, conn: ConnId) -> bool {
        self.get(conn)
            .is_some_and(|c| c.host_hung_up || c.host_broken)
    }

    /// Who opened a live connection.
    pub fn conn_origin(&self, conn: ConnId) -> Option<Origin> {
        self.get(conn).map(|c| c.origin)
    }

    /// The `(guest_port, host_port)` of a live connection, once known.
    pub fn conn_ports(&self, conn: ConnId) -> Option<(u32, u32)> {
        sink::ports(&self.conns, conn)
    }

    /// The handles of every connection in the table, in slot order (for inspection: each
    /// one's [`conn_state`](Self::conn_state), [`conn_ports`](Self::conn_ports),
    /// [`conn_stats`](Self::conn_stats) and so on).
    pub fn conn_ids(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.conns
            .iter()
            .map(|(index, c)| ConnId::new(index as u32, c.generation))
    }

    /// The CID of a live connection's peer: the host's, or a sibling VM's.
    pub fn conn_peer_cid(&self, conn: ConnId) -> Option<u64> {
        self.get(conn).map(|c| u64::from(c.key.peer_cid))
    }

    /// Connections in the table, including those whose socket close is still owed.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes held in connection buffers (and seqpacket stages), in use or pooled.
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

    pub(super) fn get(&self, conn: ConnId) -> Option<&Conn> {
        self.conns
            .get(conn.index() as usize)
            .filter(|c| c.generation == conn.generation())
    }

    /// The slot of a handle the caller may still use: one whose `Close` was not issued yet.
    pub(super) fn lookup(&mut self, conn: ConnId) -> Result<usize, ConnError> {
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
    pub(super) fn slots_used(&self) -> usize {
        self.conns.iter().next_back().map_or(0, |(idx, _)| idx + 1)
    }

    pub(super) fn id(&self, idx: usize) -> ConnId {
        ConnId::new(idx as u32, self.conns[idx].generation)
    }

    pub(super) fn advance(&mut self, now: Instant) {
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
        let snapshot = Snapshot {
            next_generation: self.next_generation,
            next_host_port: self.next_host_port,
        };
        let old = self.sink.attach(
            recorder,
            self.now,
            &self.config,
            snapshot,
            self.socket_types,
        );
        Ok(old)
    }

    /// Whether a recorder is attached.
    pub fn is_recording(&self) -> bool {
        self.sink.is_on()
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
