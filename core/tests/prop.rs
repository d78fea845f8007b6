//! Property tests on the deterministic simulation (`sim`): random interleavings of guest and
//! host operations over many connections, with scripted host faults, rx-buffer starvation and
//! a clock that jumps past every timeout.
//!
//! 1. [`streams_arrive_in_order_or_the_connection_was_reset`]: every byte each side sent
//!    arrives in order at the other side, or the connection was reset (see "When a short
//!    stream is excused" below); nothing panics; memory stays within the `Config` bounds after
//!    every operation; once both sides shut down, the engine holds no connection.
//! 2. [`hostile_headers_never_break_the_engine`]: `Engine::handle_tx` on arbitrary 44-byte
//!    headers (random bytes, plausible garbage, and one-field mutations of valid headers of
//!    live connections), interleaved with normal traffic, never panics, memory stays bounded,
//!    everything is gone once both sides closed, and afterwards the engine still serves fresh
//!    connections in both directions.
//!
//! A failing case prints its `Setup` and operation list (shrunk); proptest also records its
//! seed in `prop.proptest-regressions` next to this file, and replays it first on the next run.
//! `PROPTEST_CASES=N` runs more cases.
//!
//! # The script and its finale
//!
//! A case is a [`Setup`] (engine limits and timeouts, some small enough to be hit; socket
//! buffers, rx ring and tx batch sizes; whether the applications read on their own; whether
//! socket readiness honours the engine's registered interest, as epoll does) and a list of
//! [`Act`]s: open connections either way (also to refusing, hanging or absent listeners, and
//! with bad or unfinished `CONNECT` lines, possibly split), writes of 0 to 200 KiB, partial
//! reads, automatic reading on or off, guest SHUTDOWN (RCV, SEND, both) and RST, host
//! `shutdown(SHUT_WR)`, close and socket errors, scripted host faults (refused reads and
//! writes, short reads and writes, tiny socket buffers, failing reads and writes), the clock
//! jumping (past connect and close timeouts too), guest rx buffers withheld and given back,
//! and the run loop turning once, until idle, or over a span of time.
//!
//! The finale then (1) lifts every fault and pause and lets both applications read everything
//! until nothing moves, without time passing; (2) half-closes every connection on both sides
//! (SHUTDOWN SEND, `shutdown(SHUT_WR)`) and runs past every timeout; (3) closes everything and
//! runs past every timeout again. The streams are checked after (1), so data must flow without
//! anybody closing, and after (2); after (2) and (3) the engine must hold no connection and no
//! socket may be left open.
//!
//! # When a short stream is excused
//!
//! For each connection:
//!
//! - **P1, order**: what the host application received is a prefix of what the guest
//!   application sent, and what the guest application received is a prefix of what the host
//!   application sent (after its `CONNECT` line; the host also receives the `OK` line first).
//! - **P2, end of file means complete**: if the host application saw the engine's
//!   `shutdown(SHUT_WR)`, it has every byte the guest sent; if the guest saw the engine's
//!   SHUTDOWN SEND, it has every byte the host application sent.
//! - **P3, complete unless reset**: otherwise a direction may be short only if the connection
//!   has one of these *causes*, each observable by one side or the other:
//!   - `guest_abort`: the guest sent RST (its application aborted, or Linux's close timeout
//!     fired after `close()`);
//!   - `host_fault`: the host socket failed (a scripted `EPOLLERR`, failed read or failed
//!     write) or the host application closed it (the engine's writes then fail with `EPIPE`:
//!     that is how a Unix-socket peer "resets");
//!   - `not_established`: the connection never opened from the point of view of the side
//!     that opened it: a guest connect that never got RESPONSE, or a host client that never
//!     received its whole `OK <port>` line (refused, timed out, or the table was full);
//!   - `close_timeout` (guest to host only): the guest closed (SHUTDOWN of both directions)
//!     at `t` and the engine closed the socket, without having written everything, no
//!     earlier than `t + Config::close_timeout`;
//!   - `guest_shut_rcv` (host to guest only): the guest shut down its receive side.
//! - **P4, no reset without a cause**: a reset the guest *sees* (an RST arriving before the
//!   guest finished: before it shut both directions, and before it both shut its send side and
//!   got the host's SHUTDOWN SEND) happens only on connections with `host_fault` or
//!   `not_established`. This keeps P3 from excusing spurious resets. The host side of a Unix
//!   socket sees no RST: a close by the engine is end of file to it (at most `ECONNRESET` when
//!   its own unread bytes were discarded), so the host side's "resets" are the `host_fault`
//!   causes the script itself injects.
//! - **P5**: the well-behaved simulated guest never trips a protocol-violation counter and is
//!   never sent more than its credit allows.
//! - Always, in both properties: no packet larger than the rx buffer it was granted, and no
//!   write to a socket after the engine's own `shutdown(SHUT_WR)`.

mod sim;

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use proptest::prelude::*;
use sim::{Listen, Sim, World, ECONNRESET, EPIPE, GUEST_CID, GUEST_CLOSE_TIMEOUT, RX_BUF};
use vsock_core::testing::guest_pkt;
use vsock_core::wire::{Header, Op, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND};
use vsock_core::{Config, ConnId, SocketError};

/// Host listeners `<uds>_<port>` and how they answer.
const HOST_LISTENERS: [(u32, Listen); 4] = [
    (100, Listen::Accept),
    (101, Listen::Accept),
    (102, Listen::Refuse),
    (103, Listen::Hang),
];
/// A host port nobody listens on.
const HOST_NOBODY: u32 = 104;
/// Guest listeners.
const GUEST_LISTENERS: [u32; 2] = [5000, 5001];
/// A guest port nobody listens on.
const GUEST_NOBODY: u32 = 5002;

// -------------------------------------------------------------------------------------------
// The script

/// Engine and world configuration of one case.
#[derive(Clone, Debug)]
struct Setup {
    buffer_size: u32,
    /// Percent of `buffer_size` (at least one byte).
    threshold_pct: u32,
    max_connections: usize,
    pooled_buffers: usize,
    max_pending_resets: usize,
    connect_line_timeout_ms: u64,
    connect_timeout_ms: u64,
    close_timeout_ms: u64,
    host_capacity: usize,
    rx_ring: usize,
    rx_room: usize,
    tx_batch: usize,
    host_auto_read: bool,
    guest_auto_read: bool,
    /// Deliver socket readiness only within the interest the engine registered (epoll).
    honor_interest: bool,
}

impl Setup {
    fn config(&self) -> Config {
        let mut c = Sim::default_config();
        c.buffer_size = self.buffer_size;
        c.credit_update_threshold =
            ((u64::from(self.buffer_size) * u64::from(self.threshold_pct) / 100) as u32).max(1);
        c.max_connections = self.max_connections;
        c.pooled_buffers = self.pooled_buffers;
        c.max_pending_resets = self.max_pending_resets;
        c.connect_line_timeout = Duration::from_millis(self.connect_line_timeout_ms);
        c.connect_timeout = Duration::from_millis(self.connect_timeout_ms);
        c.close_timeout = Duration::from_millis(self.close_timeout_ms);
        c
    }

    fn world(&self) -> World {
        World {
            host_capacity: self.host_capacity,
            host_auto_read: self.host_auto_read,
            guest_auto_read: self.guest_auto_read,
            rx_ring: self.rx_ring,
            rx_room: self.rx_room,
            tx_batch: self.tx_batch,
            honor_interest: self.honor_interest,
        }
    }

    /// Long enough for every timeout of the engine and the guest to fire, twice.
    fn horizon(&self) -> Duration {
        let longest = [
            self.connect_line_timeout_ms,
            self.connect_timeout_ms,
            self.close_timeout_ms,
            GUEST_CLOSE_TIMEOUT.as_millis() as u64,
        ]
        .into_iter()
        .max()
        .unwrap();
        Duration::from_millis(2 * longest + 1000)
    }
}

/// How a host client's first bytes look.
#[derive(Clone, Copy, Debug)]
enum Line {
    /// `CONNECT <port>\n`.
    Valid,
    /// Not a `CONNECT` line.
    Garbage,
    /// A port out of range.
    BadPort,
    /// `CONNECT 50`, never finished: the client is closed on the line timeout (or end of file).
    Unfinished,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    BlockReads(usize),
    BlockWrites(usize),
    ReadChunk(Option<usize>),
    WriteChunk(Option<usize>),
    Capacity(usize),
    FailRead,
    FailWrite,
}

/// One scripted operation. `c` picks a connection among those opened so far: the one at
/// position `c % count`.
#[derive(Clone, Debug)]
enum Act {
    GuestConnect {
        port: u32,
    },
    HostConnect {
        port: u32,
        line: Line,
        /// Split the first bytes into two writes at this point.
        split: Option<usize>,
        trailing: usize,
    },
    GuestWrite {
        c: usize,
        len: usize,
    },
    HostWrite {
        c: usize,
        len: usize,
    },
    GuestRead {
        c: usize,
        n: usize,
    },
    HostRead {
        c: usize,
        n: usize,
    },
    AutoRead {
        c: usize,
        guest: bool,
        on: bool,
    },
    GuestShutdown {
        c: usize,
        flags: u32,
    },
    GuestRst {
        c: usize,
    },
    HostShutdownWrite {
        c: usize,
    },
    HostClose {
        c: usize,
    },
    HostError {
        c: usize,
    },
    HostFault {
        c: usize,
        fault: Fault,
    },
    Advance {
        ms: u64,
    },
    PauseRx {
        drop_posted: bool,
    },
    ResumeRx,
    Step,
    Run,
    RunFor {
        ms: u64,
    },
    Kick,
    /// A raw 44-byte header from the guest (property 2 only).
    Raw {
        header: RawHeader,
        short_payload: bool,
    },
    /// A valid header of a live connection with one field replaced (property 2 only).
    Mutate {
        c: usize,
        op: u16,
        field: u8,
        value: u64,
        short_payload: bool,
    },
}

/// 44 header bytes, shown decoded.
#[derive(Clone, Copy)]
struct RawHeader(Header);

impl fmt::Debug for RawHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

fn setup() -> impl Strategy<Value = Setup> {
    let buffer_size = prop_oneof![
        Just(4096u32),
        Just(16 * 1024),
        4096u32..=256 * 1024,
        Just(256 * 1024),
    ];
    let threshold_pct = prop_oneof![Just(0u32), 1u32..=100, Just(25), Just(100)];
    let host_capacity = prop_oneof![1usize..64, 64usize..4096, 4096usize..=64 * 1024];
    let rx_ring = prop_oneof![1usize..=4, 5usize..=128, Just(128)];
    let rx_room = prop_oneof![Just(RX_BUF - 44), 64usize..=1024, 1024usize..=RX_BUF - 44];
    (
        (
            buffer_size,
            threshold_pct,
            prop_oneof![1usize..=4, 5usize..=16, Just(64)],
            0usize..=3,
            prop_oneof![1usize..=3, Just(256usize)],
        ),
        (200u64..=6000, 200u64..=4000, 300u64..=12000),
        (host_capacity, rx_ring, rx_room, 1usize..=64),
        (
            prop::bool::weighted(0.6),
            prop::bool::weighted(0.6),
            prop::bool::weighted(0.75),
        ),
    )
        .prop_map(
            |(
                (buffer_size, threshold_pct, max_connections, pooled_buffers, max_pending_resets),
                (connect_line_timeout_ms, connect_timeout_ms, close_timeout_ms),
                (host_capacity, rx_ring, rx_room, tx_batch),
                (host_auto_read, guest_auto_read, honor_interest),
            )| Setup {
                buffer_size,
                threshold_pct,
                max_connections,
                pooled_buffers,
                max_pending_resets,
                connect_line_timeout_ms,
                connect_timeout_ms,
                close_timeout_ms,
                host_capacity,
                rx_ring,
                rx_room,
                tx_batch,
                host_auto_read,
                guest_auto_read,
                honor_interest,
            },
        )
}

fn pick() -> impl Strategy<Value = usize> {
    0usize..64
}

fn write_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..4096,
        3 => 4096usize..64 * 1024,
        1 => 64 * 1024usize..200 * 1024,
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => (1usize..=4).prop_map(Fault::BlockReads),
        3 => (1usize..=4).prop_map(Fault::BlockWrites),
        3 => prop::option::of(1usize..=3000).prop_map(Fault::ReadChunk),
        3 => prop::option::of(1usize..=3000).prop_map(Fault::WriteChunk),
        3 => prop_oneof![1usize..=64, 64usize..=64 * 1024].prop_map(Fault::Capacity),
        1 => Just(Fault::FailRead),
        1 => Just(Fault::FailWrite),
    ]
}

fn clock_ms() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..100, 100u64..3000, 3000u64..20_000]
}

/// The operations of property 1.
fn act() -> impl Strategy<Value = Act> {
    let host_port = prop_oneof![
        6 => Just(100u32),
        3 => Just(101),
        1 => Just(102),
        1 => Just(103),
        1 => Just(HOST_NOBODY),
    ];
    let guest_port = prop_oneof![
        6 => Just(GUEST_LISTENERS[0]),
        3 => Just(GUEST_LISTENERS[1]),
        1 => Just(GUEST_NOBODY),
    ];
    let line = prop_oneof![
        12 => Just(Line::Valid),
        1 => Just(Line::Garbage),
        1 => Just(Line::BadPort),
        1 => Just(Line::Unfinished),
    ];
    prop_oneof![
        5 => host_port.prop_map(|port| Act::GuestConnect { port }),
        5 => (guest_port, line, prop::option::weighted(0.3, pick()), prop_oneof![Just(0usize), 1usize..20_000])
            .prop_map(|(port, line, split, trailing)| Act::HostConnect { port, line, split, trailing }),
        14 => (pick(), write_len()).prop_map(|(c, len)| Act::GuestWrite { c, len }),
        14 => (pick(), write_len()).prop_map(|(c, len)| Act::HostWrite { c, len }),
        4 => (pick(), write_len()).prop_map(|(c, n)| Act::GuestRead { c, n }),
        4 => (pick(), write_len()).prop_map(|(c, n)| Act::HostRead { c, n }),
        3 => (pick(), any::<bool>(), any::<bool>()).prop_map(|(c, guest, on)| Act::AutoRead { c, guest, on }),
        3 => (pick(), prop_oneof![Just(SHUTDOWN_SEND), Just(SHUTDOWN_RCV), Just(SHUTDOWN_BOTH)])
            .prop_map(|(c, flags)| Act::GuestShutdown { c, flags }),
        1 => pick().prop_map(|c| Act::GuestRst { c }),
        2 => pick().prop_map(|c| Act::HostShutdownWrite { c }),
        1 => pick().prop_map(|c| Act::HostClose { c }),
        1 => pick().prop_map(|c| Act::HostError { c }),
        5 => (pick(), fault()).prop_map(|(c, fault)| Act::HostFault { c, fault }),
        5 => clock_ms().prop_map(|ms| Act::Advance { ms }),
        2 => any::<bool>().prop_map(|drop_posted| Act::PauseRx { drop_posted }),
        2 => Just(Act::ResumeRx),
        8 => Just(Act::Step),
        8 => Just(Act::Run),
        3 => clock_ms().prop_map(|ms| Act::RunFor { ms }),
        2 => Just(Act::Kick),
    ]
}

/// A header that is garbage, or plausible garbage (our guest's CID and ports near real ones).
fn raw_header() -> impl Strategy<Value = RawHeader> {
    let random = any::<[u8; 44]>().prop_map(|b| RawHeader(Header::read_from(&b).unwrap()));
    let port = prop_oneof![
        49152u32..49200,
        Just(100u32),
        Just(101),
        Just(103),
        Just(5000),
        (1u32 << 30)..(1 << 30) + 40,
        any::<u32>(),
    ];
    let plausible = (
        prop_oneof![4 => Just(GUEST_CID), 1 => any::<u64>(), 1 => Just(HOST_CID)],
        prop_oneof![4 => Just(HOST_CID), 1 => any::<u64>()],
        port.clone(),
        port,
        prop_oneof![Just(0u32), 1u32..5000, 60_000u32..70_000, any::<u32>()],
        prop_oneof![4 => Just(1u16), 1 => Just(2u16), 1 => any::<u16>()],
        prop_oneof![0u16..=8, any::<u16>()],
        prop_oneof![0u32..=3, any::<u32>()],
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(src_cid, dst_cid, src_port, dst_port, len, ty, op, flags, buf_alloc, fwd_cnt)| {
                RawHeader(Header {
                    src_cid: src_cid.into(),
                    dst_cid: dst_cid.into(),
                    src_port: src_port.into(),
                    dst_port: dst_port.into(),
                    len: len.into(),
                    type_: ty.into(),
                    op: op.into(),
                    flags: flags.into(),
                    buf_alloc: buf_alloc.into(),
                    fwd_cnt: fwd_cnt.into(),
                })
            },
        );
    prop_oneof![random, plausible]
}

/// The operations of property 2: normal traffic (no host faults) and hostile headers.
fn hostile_act() -> impl Strategy<Value = Act> {
    prop_oneof![
        2 => prop_oneof![Just(100u32), Just(101), Just(103)].prop_map(|port| Act::GuestConnect { port }),
        2 => (prop_oneof![Just(5000u32), Just(5001)], 0usize..5000)
            .prop_map(|(port, trailing)| Act::HostConnect { port, line: Line::Valid, split: None, trailing }),
        3 => (pick(), 0usize..20_000).prop_map(|(c, len)| Act::GuestWrite { c, len }),
        3 => (pick(), 0usize..20_000).prop_map(|(c, len)| Act::HostWrite { c, len }),
        1 => (pick(), prop_oneof![Just(SHUTDOWN_SEND), Just(SHUTDOWN_RCV), Just(SHUTDOWN_BOTH)])
            .prop_map(|(c, flags)| Act::GuestShutdown { c, flags }),
        1 => pick().prop_map(|c| Act::HostClose { c }),
        1 => clock_ms().prop_map(|ms| Act::Advance { ms }),
        1 => any::<bool>().prop_map(|drop_posted| Act::PauseRx { drop_posted }),
        1 => Just(Act::ResumeRx),
        2 => Just(Act::Step),
        2 => Just(Act::Run),
        6 => (raw_header(), any::<bool>()).prop_map(|(header, short_payload)| Act::Raw { header, short_payload }),
        6 => (
            pick(),
            prop_oneof![4 => Just(Op::Rw.to_u16()), 4 => 1u16..=7, 1 => any::<u16>()],
            prop_oneof![3 => Just(4u8), 1 => 0u8..10],
            prop_oneof![0u64..8, 0u64..70_000, any::<u64>()],
            any::<bool>(),
        )
            .prop_map(|(c, op, field, value, short_payload)| Act::Mutate { c, op, field, value, short_payload }),
    ]
}

// -------------------------------------------------------------------------------------------
// Running a script

/// The most turns of the run loop one `Run` step of a script takes.
const RUN_TURNS: u32 = 5_000;

/// A connection the script opened.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// Opened by the guest: its guest key `(local_port, host_port)`.
    Guest((u32, u32)),
    /// Opened by a host client; `line` is the length of its `CONNECT` line if it was valid.
    Host { conn: ConnId, line: Option<usize> },
}

/// Bytes at `offset..offset + len` of stream `stream`: distinct per stream and position, so a
/// byte of another connection, a repeat or a gap shows.
fn stream_bytes(stream: u64, offset: usize, len: usize) -> Vec<u8> {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    (offset..offset + len)
        .map(|i| {
            let word = mix(stream.wrapping_mul(0x1_0000_0001) ^ mix(i as u64 / 8));
            (word >> (i % 8 * 8)) as u8
        })
        .collect()
}

struct Script {
    setup: Setup,
    sim: Sim,
    slots: Vec<Slot>,
    /// Host sockets (raw handles) given a scripted error or failed read or write.
    /// Sockets given a write fault: guest bytes may be lost, the guest sees a reset.
    host_faults: BTreeSet<u64>,
    /// Sockets given a read fault: the kernel refused bytes the host wrote, so those may be
    /// lost too (the guest sees a reset). Nothing else excuses a short host-to-guest stream:
    /// a peer that closes, even with our bytes unread, leaves its own bytes to be read.
    read_faults: BTreeSet<u64>,
    /// Property 2: the guest lies, so credit and protocol counters are not checked.
    hostile: bool,
}

impl Script {
    fn new(setup: &Setup, hostile: bool) -> Script {
        let mut sim = Sim::new(setup.config(), setup.world());
        for (port, mode) in HOST_LISTENERS {
            sim.host_listen(port, mode);
        }
        for port in GUEST_LISTENERS {
            sim.guest_listen(port);
        }
        Script {
            setup: setup.clone(),
            sim,
            slots: Vec::new(),
            host_faults: BTreeSet::new(),
            read_faults: BTreeSet::new(),
            hostile,
        }
    }

    fn slot(&self, c: usize) -> Option<(usize, Slot)> {
        if self.slots.is_empty() {
            return None;
        }
        let i = c % self.slots.len();
        Some((i, self.slots[i]))
    }

    fn guest_key(&self, slot: Slot) -> Option<(u32, u32)> {
        match slot {
            Slot::Guest(key) => Some(key),
            Slot::Host { conn, .. } => self.sim.any_sock(conn).ports,
        }
        .filter(|key| self.sim.guest.conns.contains_key(key))
    }

    /// The host socket of a connection, live or closed.
    fn host_conn(&self, slot: Slot) -> Option<ConnId> {
        match slot {
            Slot::Host { conn, .. } => Some(conn),
            Slot::Guest(key) => self
                .sim
                .all_socks()
                .find(|s| s.ports == Some(key))
                .map(|s| s.conn),
        }
    }

    /// The host socket of a connection, if the engine has not closed it.
    fn live_sock(&self, slot: Slot) -> Option<ConnId> {
        self.host_conn(slot)
            .filter(|conn| self.sim.host.contains_key(&conn.to_raw()))
    }

    /// Where the host-to-guest stream starts in what the host application sent.
    fn line_len(slot: Slot) -> usize {
        match slot {
            Slot::Guest(_) => 0,
            Slot::Host { line, .. } => line.unwrap_or(0),
        }
    }

    fn apply(&mut self, step: &Act) {
        match *step {
            Act::GuestConnect { port } => {
                let key = self.sim.guest_connect(port);
                self.slots.push(Slot::Guest(key));
            }
            Act::HostConnect {
                port,
                line,
                split,
                trailing,
            } => {
                let stream = 2 * self.slots.len() as u64 + 1;
                let (mut bytes, valid) = match line {
                    Line::Valid => (format!("CONNECT {port}\n").into_bytes(), true),
                    Line::Garbage => (b"CONNEKT 5000\n".to_vec(), false),
                    Line::BadPort => (b"CONNECT 99999999999\n".to_vec(), false),
                    Line::Unfinished => (b"CONNECT 50".to_vec(), false),
                };
                let line_len = bytes.len();
                if !matches!(line, Line::Unfinished) {
                    bytes.extend(stream_bytes(stream, 0, trailing));
                }
                let at = split.map_or(bytes.len(), |i| i % bytes.len());
                let Some(conn) = self.sim.host_connect(&bytes[..at]) else {
                    return; // Refused at accept: the table is full.
                };
                if at < bytes.len() {
                    self.sim.host_write(conn, &bytes[at..]);
                }
                self.slots.push(Slot::Host {
                    conn,
                    line: valid.then_some(line_len),
                });
            }
            Act::GuestWrite { c, len } => {
                let Some((i, slot)) = self.slot(c) else {
                    return;
                };
                let Some(key) = self.guest_key(slot) else {
                    return;
                };
                let g = &self.sim.guest.conns[&key];
                if g.closed || g.shut_wanted & SHUTDOWN_SEND != 0 {
                    return; // The application would get EPIPE.
                }
                let bytes = stream_bytes(2 * i as u64, g.sent_by_app.len(), len);
                self.sim.guest_write(key, &bytes);
            }
            Act::HostWrite { c, len } => {
                let Some((i, slot)) = self.slot(c) else {
                    return;
                };
                let Some(conn) = self.live_sock(slot) else {
                    return;
                };
                let s = self.sim.sock(conn);
                if s.app_eof || s.app_closed {
                    return;
                }
                let offset = s.sent_by_app.len().saturating_sub(Self::line_len(slot));
                let bytes = stream_bytes(2 * i as u64 + 1, offset, len);
                self.sim.host_write(conn, &bytes);
            }
            Act::GuestRead { c, n } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(key) = self.guest_key(slot) {
                    self.sim.guest_read(key, n);
                }
            }
            Act::HostRead { c, n } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(conn) = self.live_sock(slot) {
                    if !self.sim.sock(conn).app_closed {
                        self.sim.host_read(conn, n);
                    }
                }
            }
            Act::AutoRead { c, guest, on } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if guest {
                    if let Some(key) = self.guest_key(slot) {
                        self.sim.guest.conns.get_mut(&key).unwrap().auto_read = on;
                    }
                } else if let Some(conn) = self.live_sock(slot) {
                    let s = self.sim.sock(conn);
                    s.auto_read = on && !s.app_closed;
                }
            }
            Act::GuestShutdown { c, flags } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(key) = self.guest_key(slot) {
                    if !self.sim.guest.conns[&key].closed {
                        self.sim.guest_shutdown(key, flags);
                    }
                }
            }
            Act::GuestRst { c } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(key) = self.guest_key(slot) {
                    if !self.sim.guest.conns[&key].closed {
                        self.sim.guest_rst(key);
                    }
                }
            }
            Act::HostShutdownWrite { c } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(conn) = self.live_sock(slot) {
                    let s = self.sim.sock(conn);
                    if !s.app_eof && !s.app_closed {
                        self.sim.host_shutdown_write(conn);
                    }
                }
            }
            Act::HostClose { c } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(conn) = self.live_sock(slot) {
                    if !self.sim.sock(conn).app_closed {
                        self.sim.sock(conn).auto_read = false;
                        self.sim.host_close(conn);
                    }
                }
            }
            Act::HostError { c } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                if let Some(conn) = self.live_sock(slot) {
                    // What a Unix socket reports as an error: its peer closed with our bytes
                    // unread. What the peer wrote before is still there to read.
                    if !self.sim.sock(conn).app_closed {
                        self.sim.sock(conn).auto_read = false;
                        self.sim.host_close_unread(conn);
                    }
                }
            }
            Act::HostFault { c, fault } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                let Some(conn) = self.live_sock(slot) else {
                    return;
                };
                match fault {
                    Fault::FailWrite => {
                        self.host_faults.insert(conn.to_raw());
                    }
                    Fault::FailRead => {
                        self.read_faults.insert(conn.to_raw());
                    }
                    _ => {}
                }
                let s = self.sim.sock(conn);
                match fault {
                    Fault::BlockReads(n) => s.block_reads = n,
                    Fault::BlockWrites(n) => s.block_writes = n,
                    Fault::ReadChunk(n) => s.read_chunk = n,
                    Fault::WriteChunk(n) => s.write_chunk = n,
                    // Never below what the socket already holds.
                    Fault::Capacity(n) => s.capacity = n.max(s.inbound.len()),
                    Fault::FailRead => s.fail_read = Some(SocketError(ECONNRESET)),
                    Fault::FailWrite => s.fail_write = Some(SocketError(EPIPE)),
                }
            }
            Act::Advance { ms } => self.sim.advance(Duration::from_millis(ms)),
            Act::PauseRx { drop_posted } => {
                self.sim.rx_paused = true;
                if drop_posted {
                    self.sim.rx_posted = 0;
                }
            }
            Act::ResumeRx => self.sim.rx_paused = false,
            Act::Step => {
                self.sim.step();
            }
            Act::Run => self.run_some(),
            Act::RunFor { ms } => self.run_for_some(Duration::from_millis(ms)),
            Act::Kick => self.sim.kick(),
            Act::Raw {
                header,
                short_payload,
            } => {
                let header = header.0;
                let payload = self.payload_for(&header, short_payload);
                self.sim.guest_send_raw(header, payload);
            }
            Act::Mutate {
                c,
                op,
                field,
                value,
                short_payload,
            } => {
                let Some((_, slot)) = self.slot(c) else {
                    return;
                };
                let Some(key) = self.guest_key(slot) else {
                    return;
                };
                let g = &self.sim.guest.conns[&key];
                let mut h = guest_pkt(Op::Rw, key.0, key.1, 0, 0, sim::GUEST_BUF_ALLOC, g.fwd_cnt);
                h.op = op.into();
                let v32 = value as u32;
                let v16 = value as u16;
                match field {
                    0 => h.src_cid = value.into(),
                    1 => h.dst_cid = value.into(),
                    2 => h.src_port = v32.into(),
                    3 => h.dst_port = v32.into(),
                    4 => h.len = (v32 % 70_000).into(),
                    5 => h.len = v32.into(),
                    6 => h.type_ = v16.into(),
                    7 => h.flags = v32.into(),
                    8 => h.buf_alloc = v32.into(),
                    _ => h.fwd_cnt = v32.into(),
                }
                let payload = self.payload_for(&h, short_payload);
                self.sim.guest_send_raw(h, payload);
            }
        }
    }

    /// Runs the loop until nothing moves, or for at most [`RUN_TURNS`] turns: with a one-byte
    /// socket buffer or one-byte writes a large transfer takes a turn per byte, which is slow,
    /// not a livelock. (The finale lifts those faults and runs under the livelock guard.)
    fn run_some(&mut self) {
        for _ in 0..RUN_TURNS {
            if !self.sim.step() {
                break;
            }
        }
    }

    /// `Sim::run_for` with [`Script::run_some`]: the clock jumps from deadline to deadline
    /// (the engine's and the guest's) until `d` has passed.
    fn run_for_some(&mut self, d: Duration) {
        let end = self.sim.now + d;
        for _ in 0..64 {
            self.run_some();
            if self.sim.now >= end {
                break;
            }
            let next_guest = self
                .sim
                .guest
                .conns
                .values()
                .filter(|c| !c.closed)
                .filter_map(|c| c.close_deadline)
                .min();
            let next = [self.sim.engine.poll_timeout(), next_guest, Some(end)]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            self.sim.now = next.max(self.sim.now);
        }
    }

    /// The payload a guest buffer holds after `header`: `len` bytes, or fewer (a chain shorter
    /// than its header claims: reading it faults). Never more than `len`.
    fn payload_for(&self, header: &Header, short: bool) -> Vec<u8> {
        let len = header.len.get() as usize;
        let len = if len > 256 * 1024 {
            0
        } else if short {
            len / 2
        } else {
            len
        };
        stream_bytes(u64::MAX, 0, len)
    }

    fn assert_bounded(&self) {
        if self.hostile {
            let cfg = self.sim.engine.config();
            let bound = (cfg.max_connections + cfg.pooled_buffers) * cfg.buffer_size as usize;
            assert!(self.sim.engine.buffer_memory() <= bound);
            assert!(self.sim.engine.connections() <= cfg.max_connections);
        } else {
            self.sim.assert_memory_bounded();
        }
    }

    /// Lifts every pause and fault and lets the applications read everything, until nothing
    /// moves (no time passes).
    fn drain(&mut self) {
        self.sim.rx_paused = false;
        // Sockets and guest connections still to be made read everything too.
        self.sim.world.host_auto_read = true;
        self.sim.world.guest_auto_read = true;
        self.sim.world.host_capacity = self.sim.world.host_capacity.max(64 * 1024);
        for s in self.sim.host.values_mut() {
            s.capacity = s.capacity.max(64 * 1024);
            s.block_reads = 0;
            s.block_writes = 0;
            s.read_chunk = None;
            s.write_chunk = None;
            s.fail_read = None;
            s.fail_write = None;
            s.auto_read = !s.app_closed;
        }
        let keys: Vec<(u32, u32)> = self.sim.guest.conns.keys().copied().collect();
        for &key in &keys {
            self.sim.guest.conns.get_mut(&key).unwrap().auto_read = true;
            self.sim.guest_read(key, usize::MAX);
        }
        // Level-triggered readiness once interests settled, for sockets whose last event
        // was spent before the faults were lifted.
        self.sim.run();
        self.sim.kick();
        self.sim.run();
        self.assert_bounded();
    }

    /// Half-closes both sides of every connection (the guest's SHUTDOWN SEND, the host
    /// application's `shutdown(SHUT_WR)`) and runs past every timeout.
    fn half_close(&mut self) {
        let keys: Vec<(u32, u32)> = self.sim.guest.conns.keys().copied().collect();
        for &key in &keys {
            if !self.sim.guest.conns[&key].closed {
                self.sim.guest_shutdown(key, SHUTDOWN_SEND);
            }
        }
        let socks: Vec<ConnId> = self.sim.host.values().map(|s| s.conn).collect();
        for conn in socks {
            let s = self.sim.sock(conn);
            if !s.app_eof && !s.app_closed {
                self.sim.host_shutdown_write(conn);
            }
        }
        self.sim.run_for(self.setup.horizon());
        self.assert_bounded();
        if self.hostile {
            // A guest that lied about its counters may have wedged its own connections.
            return;
        }
        // Both directions of every connection are finished: the engine must have let go.
        assert_eq!(
            self.sim.engine.connections(),
            0,
            "connections left after both sides shut down"
        );
        assert!(self.sim.host.is_empty(), "host sockets left open");
    }

    /// Closes every connection on both sides and runs past every timeout: nothing may remain.
    fn close_everything(&mut self) {
        let keys: Vec<(u32, u32)> = self.sim.guest.conns.keys().copied().collect();
        for key in keys {
            let g = &self.sim.guest.conns[&key];
            if g.closed {
                continue;
            }
            if g.connecting {
                // Still no answer to its REQUEST (the engine's RST was never delivered):
                // the application gives up, as Linux's connect timeout makes it.
                self.sim.guest_rst(key);
            } else {
                self.sim.guest_close_now(key);
            }
        }
        let socks: Vec<ConnId> = self.sim.host.values().map(|s| s.conn).collect();
        for conn in socks {
            if !self.sim.sock(conn).app_closed {
                self.sim.host_close(conn);
            }
        }
        self.sim.run_for(self.setup.horizon());
        self.assert_bounded();
        assert_eq!(
            self.sim.engine.connections(),
            0,
            "connections left after everything closed"
        );
        assert!(self.sim.host.is_empty(), "host sockets never closed");
        let open: Vec<_> = self
            .sim
            .guest
            .conns
            .iter()
            .filter(|(_, g)| !g.closed)
            .map(|(k, _)| *k)
            .collect();
        assert!(open.is_empty(), "guest connections never closed: {open:?}");
    }

    /// P1 to P4 for every connection (see the module documentation).
    fn check_streams(&self) {
        let close_timeout = self.sim.engine.config().close_timeout;
        for (i, &slot) in self.slots.iter().enumerate() {
            let sock = self.host_conn(slot).map(|c| self.sim.any_sock(c));
            let guest = self.guest_key(slot).map(|k| &self.sim.guest.conns[&k]);
            let ctx = |what: &str| {
                format!(
                    "connection #{i} {slot:?} (ports {:?}): {what}\n  guest: {}\n  host: {}",
                    sock.and_then(|s| s.ports),
                    guest.map_or("none".to_string(), |g| format!(
                        "established {} rst_sent {} rst_received {} shut_sent {} peer_shut {} \
                         sent {} received {}+{} unsent {}",
                        g.established,
                        g.rst_sent,
                        g.rst_received,
                        g.shut_sent,
                        g.peer_shut,
                        g.sent_by_app.len(),
                        g.read.len(),
                        g.unread.len(),
                        g.to_send.len(),
                    )),
                    sock.map_or("none".to_string(), |s| format!(
                        "sent {} received {}+{} unread {} shut_wr {} closed {} at {:?} \
                         app_eof {} app_closed {} fault {}",
                        s.sent_by_app.len(),
                        s.received.len(),
                        s.inbound.len(),
                        s.outbound.len(),
                        s.shut_wr,
                        s.closed,
                        s.closed_at,
                        s.app_eof,
                        s.app_closed,
                        self.host_faults.contains(&s.conn.to_raw()),
                    )),
                )
            };

            // What each application sent and received, as streams.
            let empty = Vec::new();
            let g_sent = guest.map_or(&empty[..], |g| &g.sent_by_app[..]);
            let g_recv: Vec<u8> = guest.map_or(Vec::new(), |g| {
                g.read.iter().chain(g.unread.iter()).copied().collect()
            });
            let h_sent = sock.map_or(&empty[..], |s| {
                &s.sent_by_app[Self::line_len(slot).min(s.sent_by_app.len())..]
            });
            let h_all: Vec<u8> = sock.map_or(Vec::new(), |s| {
                s.received.iter().chain(s.inbound.iter()).copied().collect()
            });
            let mut never_ok = false;
            let h_recv: &[u8] = match slot {
                Slot::Guest(_) => &h_all,
                Slot::Host { line, .. } if sock.and_then(|s| s.ports).is_none() => {
                    // A bad line, or one cut short (end of file, error, line timeout).
                    let what = if line.is_some() { "unparsed" } else { "bad" };
                    assert!(
                        h_all.is_empty(),
                        "{}",
                        ctx(&format!("OK for a {what} line"))
                    );
                    assert!(guest.is_none(), "{}", ctx("guest connection for no line"));
                    continue;
                }
                Slot::Host { .. } => {
                    let (_, host_port) = sock.and_then(|s| s.ports).unwrap();
                    let ok = format!("OK {host_port}\n").into_bytes();
                    if h_all.len() < ok.len() {
                        assert!(ok.starts_with(&h_all), "{}", ctx("not an OK line"));
                        never_ok = true;
                        &[]
                    } else {
                        assert!(h_all.starts_with(&ok), "{}", ctx("not an OK line"));
                        &h_all[ok.len()..]
                    }
                }
            };

            // The causes that excuse a short stream.
            let guest_abort = guest.is_some_and(|g| g.rst_sent);
            let host_fault =
                sock.is_some_and(|s| s.app_closed || self.host_faults.contains(&s.conn.to_raw()));
            let read_fault = sock.is_some_and(|s| self.read_faults.contains(&s.conn.to_raw()));
            let not_established = match slot {
                Slot::Guest(_) => !guest.is_some_and(|g| g.established),
                Slot::Host { .. } => guest.is_none() || never_ok,
            };
            let close_timed_out = match (guest, sock) {
                (Some(g), Some(s)) if g.shut_sent == SHUTDOWN_BOTH => {
                    let closed_by_guest_at = g.close_deadline.map(|t| {
                        vsock_core::Instant::from_nanos(
                            t.as_nanos() - GUEST_CLOSE_TIMEOUT.as_nanos() as u64,
                        )
                    });
                    matches!((closed_by_guest_at, s.closed_at),
                        (Some(t), Some(closed)) if closed >= t + close_timeout)
                }
                _ => false,
            };
            let guest_shut_rcv = guest.is_some_and(|g| g.shut_sent & SHUTDOWN_RCV != 0);

            // P1.
            assert!(
                g_sent.starts_with(h_recv),
                "{}",
                ctx(&prefix_report("guest to host", h_recv, g_sent))
            );
            assert!(
                h_sent.starts_with(&g_recv),
                "{}",
                ctx(&prefix_report("host to guest", &g_recv, h_sent))
            );
            // P2.
            if sock.is_some_and(|s| s.shut_wr) {
                assert!(
                    h_recv.len() == g_sent.len(),
                    "{}",
                    ctx("host saw end of file before every guest byte")
                );
            }
            if guest.is_some_and(|g| g.peer_shut & SHUTDOWN_SEND != 0) {
                assert!(
                    g_recv.len() == h_sent.len(),
                    "{}",
                    ctx("guest saw SHUTDOWN SEND before every host byte")
                );
            }
            // P3.
            if h_recv.len() < g_sent.len() {
                assert!(
                    guest_abort || host_fault || read_fault || not_established || close_timed_out,
                    "{}",
                    ctx("guest to host stream short without a reset")
                );
            }
            if g_recv.len() < h_sent.len() {
                assert!(
                    guest_abort || read_fault || not_established || guest_shut_rcv,
                    "{}",
                    ctx("host to guest stream short without a reset")
                );
            }
            // P4.
            if let Some(g) = guest {
                let finished = g.shut_sent == SHUTDOWN_BOTH
                    || (g.shut_sent & SHUTDOWN_SEND != 0 && g.peer_shut & SHUTDOWN_SEND != 0);
                if g.rst_received && !finished {
                    assert!(
                        host_fault || read_fault || not_established,
                        "{}",
                        ctx("guest reset without a cause")
                    );
                }
            }
        }
    }

    /// P5.
    fn check_counters(&self) {
        let st = self.sim.engine.stats();
        assert_eq!(self.sim.guest.credit_violations, 0);
        assert_eq!(self.sim.guest.ignored_rsts, 0);
        let violations = [
            ("credit_violation", st.credit_violation),
            ("data_after_shutdown", st.data_after_shutdown),
            ("unexpected_response", st.unexpected_response),
            ("request_for_existing", st.request_for_existing),
            ("payload_faults", st.payload_faults),
            ("unknown_op", st.unknown_op),
            ("unknown_type", st.unknown_type),
            ("oversize_len", st.oversize_len),
            ("control_payload", st.control_payload),
            ("wrong_cid", st.wrong_cid),
            ("reserved_cid_bits", st.reserved_cid_bits),
        ];
        for (name, n) in violations {
            assert_eq!(n, 0, "the simulated guest tripped {name}");
        }
        self.check_invariants();
    }

    /// What the engine must never do, however the guest behaves: a packet that does not fit
    /// the rx buffer it was granted, or a write after its own `shutdown(SHUT_WR)`.
    fn check_invariants(&self) {
        let room = self.setup.rx_room;
        if let Some(h) = self
            .sim
            .guest
            .log
            .iter()
            .find(|h| h.len.get() as usize > room)
        {
            panic!("a packet larger than the guest's rx buffer ({room} bytes): {h:?}");
        }
        for s in self.sim.all_socks() {
            assert_eq!(
                s.writes_after_shut_wr, 0,
                "the engine wrote to {:?} after shutting it down",
                s.conn
            );
        }
    }
}

fn prefix_report(what: &str, got: &[u8], sent: &[u8]) -> String {
    match got.iter().zip(sent).position(|(a, b)| a != b) {
        Some(at) => format!(
            "{what}: received bytes differ from sent at byte {at} (received {}, sent {})",
            got.len(),
            sent.len()
        ),
        None => format!(
            "{what}: received {} bytes but only {} were sent",
            got.len(),
            sent.len()
        ),
    }
}

fn run_script(setup: &Setup, steps: &[Act]) {
    let mut s = Script::new(setup, false);
    for step in steps {
        s.apply(step);
        s.assert_bounded();
    }
    s.drain();
    s.check_streams();
    s.half_close();
    s.check_streams();
    s.close_everything();
    s.check_counters();
}

fn run_hostile(setup: &Setup, steps: &[Act]) {
    let mut s = Script::new(setup, true);
    for step in steps {
        s.apply(step);
        s.assert_bounded();
    }
    s.drain();
    s.half_close();
    s.close_everything();
    s.check_invariants();

    // A fresh connection each way still works, with data both ways and a clean close.
    s.sim.world = World::default();
    s.sim.host_listen(200, Listen::Accept);
    s.sim.guest_listen(6000);
    let up = stream_bytes(1, 0, 100_000);
    let down = stream_bytes(2, 0, 100_000);

    let g = s.sim.guest_connect(200);
    s.sim.guest_write(g, &up);
    s.sim.run();
    let conn = s
        .sim
        .all_socks()
        .find(|h| h.ports == Some(g))
        .expect("a fresh guest connection reaches the host")
        .conn;
    s.sim.host_write(conn, &down);
    s.sim.run();
    sim::assert_bytes_eq(&s.sim.any_sock(conn).received, &up);
    sim::assert_bytes_eq(&s.sim.guest.conns[&g].read, &down);
    s.close_everything();

    let mut first = b"CONNECT 6000\n".to_vec();
    first.extend(&down);
    let conn = s
        .sim
        .host_connect(&first)
        .expect("room for a fresh host client");
    s.sim.run();
    let g = s.sim.any_sock(conn).ports.expect("the CONNECT line parsed");
    s.sim.guest_write(g, &up);
    s.sim.run();
    let ok = format!("OK {}\n", g.1).into_bytes();
    let received = &s.sim.any_sock(conn).received;
    assert!(
        received.starts_with(&ok),
        "no OK line for a fresh host client"
    );
    sim::assert_bytes_eq(&received[ok.len()..], &up);
    sim::assert_bytes_eq(&s.sim.guest.conns[&g].read, &down);
    s.close_everything();
}

/// `cases` cases, unless the `PROPTEST_CASES` environment variable asks for another number
/// (for a longer hunt: `PROPTEST_CASES=20000 cargo test -p vsock-core --test prop`).
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        max_shrink_iters: 8192,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn streams_arrive_in_order_or_the_connection_was_reset(
        setup in setup(),
        steps in prop::collection::vec(act(), 1..150),
    ) {
        run_script(&setup, &steps);
    }

    #[test]
    fn hostile_headers_never_break_the_engine(
        setup in setup(),
        steps in prop::collection::vec(hostile_act(), 1..120),
    ) {
        run_hostile(&setup, &steps);
    }
}

// -------------------------------------------------------------------------------------------
// Reductions of failures the properties found

/// Feeds the engine guest packets back to back (one tx batch, no `poll_action` in between),
/// then drains its socket actions and checks that every `Close` is for a socket whose
/// `Connect` came first: a socket the engine never asked for does not exist to be closed.
fn actions_after_batch(packets: &[(Op, u32)]) -> Vec<vsock_core::Action> {
    use vsock_core::{Action, Engine, Instant};
    let now = Instant::from_secs(1);
    let mut engine = Engine::new(Sim::default_config(), now).unwrap();
    for &(op, guest_port) in packets {
        let header = guest_pkt(op, guest_port, 100, 0, 0, sim::GUEST_BUF_ALLOC, 0);
        let _ = engine.handle_tx(now, &header);
    }
    let actions: Vec<Action> = std::iter::from_fn(|| engine.poll_action()).collect();
    for (i, action) in actions.iter().enumerate() {
        if let Action::Close { conn } = action {
            assert!(
                actions[..i]
                    .iter()
                    .any(|a| matches!(a, Action::Connect { conn: c, .. } if c == conn)),
                "Close of a socket never connected: {actions:?}"
            );
        }
    }
    actions
}

/// Property 1, shrunk: `[GuestConnect { port: 100 }, GuestRst { c: 0 }]` (the guest's REQUEST
/// and RST in one tx batch) panicked the simulation with "close of a live socket".
#[test]
fn guest_rst_in_the_batch_of_its_request() {
    actions_after_batch(&[(Op::Request, 49152), (Op::Rst, 49152)]);
}

/// Property 2, shrunk: a second REQUEST for the same ports in the same batch resets the first
/// connection before its `Connect` was issued.
#[test]
fn duplicate_request_in_one_batch() {
    actions_after_batch(&[(Op::Request, 49152), (Op::Request, 49152)]);
}
