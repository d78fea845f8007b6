//! Reading a trace back, and replaying it through a fresh engine.

use std::fmt;

use vsock_core::record::{Event, Grant, ResumeError, Snapshot, TxOutcome};
use vsock_core::wire::{Header, SocketType};
use vsock_core::{Config, ConnId, Engine, GuestBytes, Instant, Io, MemoryFault, RxGrant, Tx};

use crate::event::{self, Decoded, EventError, LINKTYPE_EVENTS};
use crate::pcapng::{FormatError, Reader, Way};
use crate::vsockmon::{self, RecordError, LINKTYPE_VSOCK};
use crate::writer::{EVENTS, PACKETS};

/// One record of a trace, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// The engine's configuration, and its state when the recorder was attached (a fresh
    /// engine's, unless mid-session).
    Start(Config, Snapshot),
    /// A packet between guest and device.
    Packet {
        /// True for a packet to the guest.
        to_guest: bool,
        /// Its header.
        header: Header,
        /// Its captured payload (possibly shorter than `header.len`).
        payload: &'a [u8],
    },
    /// A host-side input or an engine action.
    Event(Event<'a>),
    /// [`Event::RxMessage`], with the rooms read back, and the staged bytes.
    RxMessage(ConnId, Io, Vec<usize>, &'a [u8]),
}

/// A record with its place in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The record's number, from 1, as Wireshark numbers frames.
    pub number: usize,
    /// The engine's `now` when it was recorded, nanoseconds.
    pub ts_nanos: u64,
    /// The record.
    pub item: Item<'a>,
}

/// Why a file is not a trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TraceError {
    /// The container is damaged.
    Format(FormatError),
    /// The interfaces are not the two of a trace.
    Interfaces,
    /// A packet record is malformed.
    Record {
        /// The record's number.
        number: usize,
        /// What is wrong.
        error: RecordError,
    },
    /// An event record is malformed.
    Event {
        /// The record's number.
        number: usize,
        /// What is wrong.
        error: EventError,
    },
    /// The first record is not the configuration, or a second one appears.
    Start,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::Format(e) => write!(f, "{e}"),
            TraceError::Interfaces => f.write_str(
                "not a vsock trace: interface 0 must be LINKTYPE_VSOCK, interface 1 the host events",
            ),
            TraceError::Record { number, error } => write!(f, "record {number}: {error}"),
            TraceError::Event { number, error } => write!(f, "record {number}: {error}"),
            TraceError::Start => f.write_str("the first record, and only it, must be the start"),
        }
    }
}

impl std::error::Error for TraceError {}

impl From<FormatError> for TraceError {
    fn from(e: FormatError) -> Self {
        TraceError::Format(e)
    }
}

/// Reads every record of a trace.
///
/// # Errors
///
/// [`TraceError`].
pub fn read(bytes: &[u8]) -> Result<Vec<Entry<'_>>, TraceError> {
    let mut reader = Reader::new(bytes)?;
    let mut entries = Vec::new();
    while let Some(p) = reader.next_packet()? {
        let number = entries.len() + 1;
        let interfaces = &reader.interfaces;
        let fits = interfaces.len() >= 2
            && interfaces[PACKETS as usize].link_type == LINKTYPE_VSOCK
            && interfaces[EVENTS as usize].link_type == LINKTYPE_EVENTS
            && event::is_events_description(&interfaces[EVENTS as usize].description);
        let item = match p.interface {
            _ if !fits => return Err(TraceError::Interfaces),
            PACKETS => {
                let r = vsockmon::parse(p.data)
                    .map_err(|error| TraceError::Record { number, error })?;
                Item::Packet {
                    to_guest: p.way == Way::Outbound,
                    header: r.header,
                    payload: r.payload,
                }
            }
            EVENTS => match event::decode(p.data) {
                Ok(Decoded::Start(config, snapshot)) => Item::Start(config, snapshot),
                Ok(Decoded::Event(e)) => Item::Event(e),
                Ok(Decoded::RxMessage(conn, io, rooms, staged)) => {
                    Item::RxMessage(conn, io, rooms, staged)
                }
                Err(error) => return Err(TraceError::Event { number, error }),
            },
            _ => return Err(TraceError::Interfaces),
        };
        if matches!(item, Item::Start(..)) != entries.is_empty() {
            return Err(TraceError::Start);
        }
        entries.push(Entry {
            number,
            ts_nanos: p.ts_nanos,
            item,
        });
    }
    if entries.is_empty() {
        return Err(TraceError::Start);
    }
    Ok(entries)
}

/// Where a replay first went another way than the recording.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The record's number (Wireshark's frame number).
    pub number: usize,
    /// Its timestamp, nanoseconds.
    pub ts_nanos: u64,
    /// What the trace holds there.
    pub expected: String,
    /// What the replay did instead.
    pub actual: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replay diverges at record {} (t = {:.9} s)\n  recorded: {}\n  replayed: {}",
            self.number,
            self.ts_nanos as f64 / 1e9,
            self.expected,
            self.actual
        )
    }
}

impl std::error::Error for Divergence {}

/// The memory a replay grants the engine it builds, unless told otherwise: 1 GiB.
///
/// A trace is input, and its configuration decides what the engine may hold: a full buffer
/// for every connection, and the tables reserved for them ([`Engine::memory_bound`]). A
/// replay refuses a configuration whose bound is over its budget rather than let a small
/// hostile trace (its payloads cut by a snap length, replayed as zeros) make it hold
/// gigabytes. 1 GiB admits the default configuration (1,024 connections of 256 KiB: just
/// over 256 MiB) nearly four times over, and so any configuration within a few times the
/// defaults; it is what a CI runner or a laptop can give a replay without trouble, while the
/// separate caps it replaces (64 MiB buffers, 65,536 connections) let 4 TiB through.
/// [`replay_within`] takes another budget (`vsock-replay --memory-budget`).
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

/// Why a replay failed.
#[derive(Debug)]
pub enum ReplayError {
    /// The file is not a readable trace.
    Trace(TraceError),
    /// The recorded configuration lets the engine hold more memory than the replay's budget.
    TooLarge {
        /// What the configuration may hold at worst ([`Engine::memory_bound`]).
        needs: u64,
        /// The budget.
        budget: u64,
    },
    /// The recorded configuration is refused by the engine.
    Config(vsock_core::ConfigError),
    /// The recorded engine state is one no engine with the recorded configuration has.
    Snapshot(Snapshot),
    /// The replay went another way.
    Diverged(Divergence),
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Trace(e) => write!(f, "{e}"),
            ReplayError::Config(e) => write!(f, "the recorded configuration: {e}"),
            ReplayError::Snapshot(s) => write!(
                f,
                "the recorded engine state: {}",
                ResumeError::Snapshot(*s)
            ),
            ReplayError::TooLarge { needs, budget } => write!(
                f,
                "the recorded configuration lets the engine hold up to {needs} bytes \
                 ({:.1} MiB: its buffers times its connections, and their tables), over the \
                 replay's budget of {budget} bytes ({:.1} MiB)",
                *needs as f64 / f64::from(1 << 20),
                *budget as f64 / f64::from(1 << 20),
            ),
            ReplayError::Diverged(d) => write!(f, "{d}"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// A short description of a packet, for reports.
pub fn describe(to_guest: bool, header: &Header, payload: &[u8]) -> String {
    let op = match header.op.get() {
        1 => "REQUEST".to_string(),
        2 => "RESPONSE".into(),
        3 => "RST".into(),
        4 => "SHUTDOWN".into(),
        5 => "RW".into(),
        6 => "CREDIT_UPDATE".into(),
        7 => "CREDIT_REQUEST".into(),
        n => format!("op {n}"),
    };
    format!(
        "{} {op} {}:{} -> {}:{} len {} flags {:#x} buf_alloc {} fwd_cnt {}{}",
        if to_guest { "to guest" } else { "from guest" },
        header.src_cid.get(),
        header.src_port.get(),
        header.dst_cid.get(),
        header.dst_port.get(),
        header.len.get(),
        header.flags.get(),
        header.buf_alloc.get(),
        header.fwd_cnt.get(),
        if payload.len() < header.len.get() as usize {
            format!(" ({} bytes captured)", payload.len())
        } else {
            String::new()
        }
    )
}

fn describe_item(item: &Item<'_>) -> String {
    match item {
        Item::Start(c, s) => format!("start {c:?} {s:?}"),
        Item::Packet {
            to_guest,
            header,
            payload,
        } => describe(*to_guest, header, payload),
        Item::Event(e) => format!("{e:?}"),
        Item::RxMessage(conn, io, rooms, staged) => format!(
            "RxMessage({conn:?}, {io:?}, {rooms:?}, {} bytes staged)",
            staged.len()
        ),
    }
}

/// What a replay went through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records in the trace.
    pub records: usize,
    /// Packets from the guest fed in.
    pub from_guest: usize,
    /// Packets to the guest reproduced and compared.
    pub to_guest: usize,
    /// Host events fed in.
    pub events: usize,
    /// Actions reproduced and compared.
    pub actions: usize,
}

/// Replays `bytes`: builds an engine with the recorded configuration, feeds it every recorded
/// input at its recorded time, and compares every output with the recording.
///
/// # Errors
///
/// The first divergence, or why the file cannot be replayed.
pub fn replay(bytes: &[u8]) -> Result<Replayed, ReplayError> {
    replay_within(bytes, DEFAULT_MEMORY_BUDGET)
}

/// [`replay`], granting the engine at most `budget` bytes: a configuration whose
/// [`Engine::memory_bound`] is over it is refused before anything is built.
///
/// # Errors
///
/// As [`replay`].
pub fn replay_within(bytes: &[u8], budget: u64) -> Result<Replayed, ReplayError> {
    let entries = read(bytes).map_err(ReplayError::Trace)?;
    let Item::Start(config, snapshot) = &entries[0].item else {
        unreachable!("read checks the start");
    };
    config.validate().map_err(ReplayError::Config)?;
    let needs = Engine::memory_bound(config);
    if needs > budget {
        return Err(ReplayError::TooLarge { needs, budget });
    }
    let mut engine = Engine::resume(
        config.clone(),
        Instant::from_nanos(entries[0].ts_nanos),
        *snapshot,
    )
    .map_err(|e| match e {
        ResumeError::Config(e) => ReplayError::Config(e),
        ResumeError::Snapshot(s) => ReplayError::Snapshot(s),
    })?;
    let mut stats = Replayed {
        records: entries.len(),
        ..Replayed::default()
    };
    let mut i = 1;
    while i < entries.len() {
        i = step(&mut engine, &entries, i, &mut stats).map_err(ReplayError::Diverged)?;
    }
    Ok(stats)
}

/// A recorded payload as guest memory: bytes beyond what was captured (a snap length) read
/// as zeros.
struct Captured<'a>(&'a [u8]);

impl GuestBytes for Captured<'_> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        let have = self.0.get(offset..).unwrap_or_default();
        let n = have.len().min(dst.len());
        dst[..n].copy_from_slice(&have[..n]);
        dst[n..].fill(0);
        Ok(())
    }
}

/// Guest memory that could not be read when the trace was recorded.
struct Unreadable;

impl GuestBytes for Unreadable {
    fn copy_to(&mut self, _offset: usize, _dst: &mut [u8]) -> Result<(), MemoryFault> {
        Err(MemoryFault)
    }
}

fn diverge(entry: &Entry<'_>, actual: impl Into<String>) -> Divergence {
    Divergence {
        number: entry.number,
        ts_nanos: entry.ts_nanos,
        expected: describe_item(&entry.item),
        actual: actual.into(),
    }
}

/// The recorded packet to the guest at `i`, if that is what it holds.
fn packet_to_guest<'a>(entries: &'a [Entry<'a>], i: usize) -> Option<(&'a Header, &'a [u8])> {
    match entries.get(i).map(|e| &e.item) {
        Some(Item::Packet {
            to_guest: true,
            header,
            payload,
        }) => Some((header, payload)),
        _ => None,
    }
}

/// Compares a packet the replay made with the recorded one at `i`.
fn same_packet(
    entries: &[Entry<'_>],
    i: usize,
    header: &Header,
    payload: &[u8],
) -> Result<(), Divergence> {
    let Some((want, captured)) = packet_to_guest(entries, i) else {
        let entry = &entries[i.min(entries.len() - 1)];
        return Err(diverge(entry, describe(true, header, payload)));
    };
    let n = captured.len().min(payload.len());
    if want != header || captured[..n] != payload[..n] {
        return Err(diverge(&entries[i], describe(true, header, payload)));
    }
    Ok(())
}

/// Replays the input at `i` (with the records that complete it); returns the next index.
fn step(
    engine: &mut Engine,
    entries: &[Entry<'_>],
    i: usize,
    stats: &mut Replayed,
) -> Result<usize, Divergence> {
    let entry = &entries[i];
    let now = Instant::from_nanos(entry.ts_nanos);
    let next = entries.get(i + 1).map(|e| &e.item);
    match &entry.item {
        Item::Start(..) => Err(diverge(entry, "a second start")),
        Item::Packet {
            to_guest: false,
            header,
            payload,
        } => {
            stats.from_guest += 1;
            match (engine.handle_tx(now, header), next) {
                (Tx::Done, Some(Item::Event(Event::TxWritten(_)))) => Err(diverge(
                    &entries[i + 1],
                    "the packet carried nothing for a socket",
                )),
                (Tx::Done, _) => Ok(i + 1),
                (Tx::Data(data), Some(Item::Event(Event::TxWritten(outcome)))) => {
                    match *outcome {
                        TxOutcome::Written(io) => {
                            let _ = data.complete(io, &mut Captured(payload));
                        }
                        TxOutcome::Unreadable(io) => {
                            let _ = data.complete(io, &mut Unreadable);
                        }
                        TxOutcome::Abandoned => drop(data),
                    }
                    Ok(i + 2)
                }
                (Tx::Data(data), _) => {
                    let what = format!("payload of {} bytes for {}", data.len(), data.conn());
                    drop(data);
                    Err(diverge(entries.get(i + 1).unwrap_or(entry), what))
                }
            }
        }
        Item::Packet { to_guest: true, .. } => {
            Err(diverge(entry, "no packet for the guest was granted here"))
        }
        Item::Event(event) => {
            stats.events += 1;
            replay_event(engine, entries, i, now, event, stats)
        }
        Item::RxMessage(..) => Err(diverge(entry, "no message read was granted here")),
    }
}

fn replay_event(
    engine: &mut Engine,
    entries: &[Entry<'_>],
    i: usize,
    now: Instant,
    event: &Event<'_>,
    stats: &mut Replayed,
) -> Result<usize, Divergence> {
    let entry = &entries[i];
    match *event {
        Event::Start(..) => return Err(diverge(entry, "a second start")),
        Event::TxWritten(_) => {
            return Err(diverge(entry, "no packet from the guest awaited its write"))
        }
        Event::Accept(ty, want) => {
            let got = match ty {
                SocketType::Stream => engine.handle_accept(now),
                SocketType::SeqPacket => engine.handle_seqpacket_accept(now),
            };
            if got != want {
                return Err(diverge(entry, format!("Accept({ty:?}, {got:?})")));
            }
        }
        Event::SocketTypes(types) => engine.set_socket_types(now, types),
        Event::SiblingAccept {
            peer_cid,
            peer_port,
            port,
            socket_type,
            result: want,
        } => {
            let got = engine.handle_sibling_accept(now, peer_cid, peer_port, port, socket_type);
            if got != want {
                return Err(diverge(entry, format!("SiblingAccept({got:?})")));
            }
        }
        Event::ResetPeer(cid) => engine.reset_peer(now, cid),
        Event::Probe(..) => return Err(diverge(entry, "no probe was granted here")),
        Event::RxMessage(..) => unreachable!("read as Item::RxMessage"),
        Event::ConnectLine(conn, read) => {
            let _ = engine.handle_connect_line(now, conn, read);
        }
        Event::Host(conn, ev) => {
            let _ = engine.handle_host_event(now, conn, ev);
        }
        Event::HostWrite(conn, io) => {
            let _ = engine.handle_host_write(now, conn, io);
        }
        Event::Timeout => engine.handle_timeout(now),
        Event::ResetConnection(conn) => {
            let _ = engine.reset_connection(now, conn);
        }
        Event::AbortAll => engine.abort_all(now),
        Event::Reset => engine.reset(now),
        Event::Stop => engine.stop(now),
        Event::RxRead(..) => return Err(diverge(entry, "no read was granted here")),
        Event::Action(want) => {
            stats.actions += 1;
            let got = engine.poll_action();
            if got != want {
                return Err(diverge(entry, format!("Action({got:?})")));
            }
        }
        Event::PollRx { room, grant } => {
            return poll_rx(engine, entries, i, now, room, grant, stats);
        }
    }
    Ok(i + 1)
}

fn poll_rx(
    engine: &mut Engine,
    entries: &[Entry<'_>],
    i: usize,
    now: Instant,
    room: usize,
    grant: Grant,
    stats: &mut Replayed,
) -> Result<usize, Divergence> {
    let entry = &entries[i];
    match (engine.poll_rx(now, room), grant) {
        (None, Grant::Nothing) => Ok(i + 1),
        (Some(RxGrant::Packet(p)), Grant::Packet) => {
            if packet_to_guest(entries, i + 1).is_none() {
                // Granted, then dropped by the device: nothing changed.
                return Ok(i + 1);
            }
            same_packet(entries, i + 1, p.header(), p.payload())?;
            let _ = p.send();
            stats.to_guest += 1;
            Ok(i + 2)
        }
        (Some(RxGrant::Read(r)), Grant::Read(conn)) if r.conn() == conn => {
            let Some(Item::Event(Event::RxRead(_, io))) = entries.get(i + 1).map(|e| &e.item)
            else {
                return Ok(i + 1);
            };
            let recorded = packet_to_guest(entries, i + 2);
            let bytes = recorded.map_or(&[][..], |(_, payload)| payload);
            match r.complete(*io, &mut &bytes[..]) {
                Ok(Some(header)) => {
                    // The bytes came from the socket, not the engine: compare the header.
                    let Some((want, _)) = recorded else {
                        return Err(diverge(
                            entries.get(i + 2).unwrap_or(&entries[i + 1]),
                            describe(true, &header, &[]),
                        ));
                    };
                    if *want != header {
                        return Err(diverge(&entries[i + 2], describe(true, &header, &[])));
                    }
                    stats.to_guest += 1;
                    Ok(i + 3)
                }
                Ok(None) | Err(_) => {
                    if recorded.is_some() {
                        return Err(diverge(&entries[i + 2], "no packet from the read"));
                    }
                    Ok(i + 2)
                }
            }
        }
        (Some(RxGrant::Probe(p)), Grant::Probe(conn)) if p.conn() == conn => {
            let Some(Item::Event(Event::Probe(_, probe))) = entries.get(i + 1).map(|e| &e.item)
            else {
                return Ok(i + 1);
            };
            let recorded = packet_to_guest(entries, i + 2);
            match (p.complete(*probe), recorded) {
                (Some(header), Some((want, _))) if *want == header => {
                    stats.to_guest += 1;
                    Ok(i + 3)
                }
                (Some(header), _) => Err(diverge(
                    entries.get(i + 2).unwrap_or(&entries[i + 1]),
                    describe(true, &header, &[]),
                )),
                (None, Some(_)) => Err(diverge(&entries[i + 2], "no packet from the probe")),
                (None, None) => Ok(i + 2),
            }
        }
        (Some(RxGrant::Message(mut m)), Grant::Message(conn)) if m.conn() == conn => {
            let Some(Item::RxMessage(_, io, rooms, staged)) = entries.get(i + 1).map(|e| &e.item)
            else {
                return Ok(i + 1);
            };
            if !staged.is_empty() {
                // The tail the device read into the engine's stage.
                match m.stage(staged.len()) {
                    Some(stage) => stage.copy_from_slice(staged),
                    None => {
                        return Err(diverge(
                            &entries[i + 1],
                            format!("no stage of {} bytes", staged.len()),
                        ))
                    }
                }
            }
            // The packets the read made follow, one per buffer; their payloads, in order, are
            // the message.
            let mut bytes = Vec::new();
            let mut k = i + 2;
            while let Some((_, payload)) = packet_to_guest(entries, k) {
                bytes.extend_from_slice(payload);
                k += 1;
            }
            match m.complete(*io, rooms, &mut Captured(&bytes)) {
                Ok(Some(headers)) => {
                    let mut at = i + 2;
                    for header in headers {
                        match packet_to_guest(entries, at) {
                            Some((want, _)) if *want == header => {}
                            _ => {
                                let entry = entries.get(at).unwrap_or(&entries[at - 1]);
                                return Err(diverge(entry, describe(true, &header, &[])));
                            }
                        }
                        stats.to_guest += 1;
                        at += 1;
                    }
                    if at != k {
                        return Err(diverge(&entries[at], "no more packets from the message"));
                    }
                    Ok(at)
                }
                Ok(None) | Err(_) => {
                    if k > i + 2 {
                        return Err(diverge(&entries[i + 2], "no packet from the message read"));
                    }
                    Ok(i + 2)
                }
            }
        }
        (got, _) => {
            let got = match got {
                None => "nothing".to_string(),
                Some(RxGrant::Packet(p)) => {
                    format!("grant of {}", describe(true, p.header(), p.payload()))
                }
                Some(RxGrant::Read(r)) => {
                    format!("read grant for {} of {} bytes", r.conn(), r.max())
                }
                Some(RxGrant::Probe(p)) => format!("probe grant for {}", p.conn()),
                Some(RxGrant::Message(m)) => {
                    format!("message grant for {} of {} bytes", m.conn(), m.len())
                }
            };
            Err(diverge(entry, got))
        }
    }
}
