//! Interface 1: the host side's inputs and the engine's socket actions, one record each, in
//! an encoding of ours (described in `docs/trace-format.md`) on link type `LINKTYPE_USER0`.
//!
//! Every record starts with a 32-byte little-endian header; kind-specific bytes follow.

use std::fmt;
use std::time::Duration;

use vsock_core::record::{Event, Grant, Snapshot, TxOutcome};
use vsock_core::wire::{SocketType, HOST_CID};
use vsock_core::{
    Action, Config, ConnId, Direction, HostEvent, Interest, Io, LineRead, Probe, SiblingRefusal,
    SocketError, SocketTypes, TableFull,
};

/// `LINKTYPE_USER0`.
pub const LINKTYPE_EVENTS: u16 = 147;
/// The encoding's version, in every record's first byte. Version 2 added the engine's
/// [`Snapshot`] to `START`; version 3 added seqpacket sockets (the kinds `SOCKET_TYPES`,
/// `PROBE` and `RX_MESSAGE`, the socket type in `ACCEPT`, `ACTION` code 7 and `POLL_RX`
/// codes 3 and 4); version 4 added sibling VMs (the kinds `SIBLING_ACCEPT` and
/// `RESET_PEER`, `HOST` code 5 for a hang-up, and the CID of an `ACTION` connect in the upper half of its value; before,
/// every connect was to the host). A reader reads versions 1 to 3 too (their `START` is a fresh engine's in version
/// 1, versions 1 and 2 hold streams only, and none has siblings).
pub const VERSION: u8 = 4;
/// The oldest version this reader reads.
pub const OLDEST_VERSION: u8 = 1;
/// The length of the record header.
pub const HEADER_LEN: usize = 32;
/// The length of a `START` record's configuration.
pub const CONFIG_LEN: usize = 96;
/// The length of a `START` record's engine state, after the configuration (version 2 on).
pub const SNAPSHOT_LEN: usize = 16;

/// Written in the connection fields of an event that names no connection. Readers never
/// compare with it: whether an event names a connection is given by its kind and code
/// ([`names_conn`]), so every handle, this value included, reads back as itself.
const NO_CONN: u64 = u64::MAX;

/// Added to a `TX_WRITTEN` I/O code when the rest of the payload could not be read.
const UNREADABLE: u32 = 4;

/// Record kinds.
pub mod kind {
    /// The configuration; always the first record.
    pub const START: u8 = 1;
    /// The fate of the payload of the guest packet just before.
    pub const TX_WRITTEN: u8 = 2;
    /// A host client accepted.
    pub const ACCEPT: u8 = 3;
    /// Bytes of a host client's `CONNECT` line, or why there were none.
    pub const CONNECT_LINE: u8 = 4;
    /// A socket event.
    pub const HOST: u8 = 5;
    /// The result of a flush.
    pub const HOST_WRITE: u8 = 6;
    /// Deadlines fired.
    pub const TIMEOUT: u8 = 7;
    /// The embedder reset one connection.
    pub const RESET_CONNECTION: u8 = 8;
    /// The embedder reset every connection.
    pub const ABORT_ALL: u8 = 9;
    /// The device was reset.
    pub const RESET: u8 = 10;
    /// A guest rx buffer offered, and what it was granted.
    pub const POLL_RX: u8 = 11;
    /// The result of a read from a socket into a guest buffer.
    pub const RX_READ: u8 = 12;
    /// A socket action (or none).
    pub const ACTION: u8 = 13;
    /// The device stopped: connections dropped, RSTs owed to the guest.
    pub const STOP: u8 = 14;
    /// The socket types the driver negotiated (value: bit 0 stream, bit 1 seqpacket).
    pub const SOCKET_TYPES: u8 = 15;
    /// What a peek at a seqpacket socket found.
    pub const PROBE: u8 = 16;
    /// The result of reading a seqpacket message into guest buffers; the data holds each
    /// buffer's payload room, as u32.
    pub const RX_MESSAGE: u8 = 17;
    /// A sibling VM's guest connects (code 0: accepted, 1 to 4: refused, as
    /// `SiblingRefusal`'s variants in order; value: the sibling's CID, and the socket type
    /// in bits 32 to 47; data: this guest's port and the sibling's, as u32).
    pub const SIBLING_ACCEPT: u8 = 18;
    /// The sibling VM with the CID in the value went away.
    pub const RESET_PEER: u8 = 19;
}

/// Whether `description`, an interface's `if_description`, names this encoding in a version
/// this reader reads (`vsock host events, encoding v1` to `v4`).
pub fn is_events_description(description: &str) -> bool {
    description
        .strip_prefix("vsock host events, encoding v")
        .and_then(|v| v.parse::<u8>().ok())
        .is_some_and(|v| (OLDEST_VERSION..=VERSION).contains(&v))
}

/// An event read back from a record: [`Event`] with owned configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// [`Event::Start`], with the configuration owned.
    Start(Config, Snapshot),
    /// [`Event::RxMessage`], with the rooms owned and the staged bytes borrowed.
    RxMessage(ConnId, Io, Vec<usize>, &'a [u8]),
    /// Any other event.
    Event(Event<'a>),
}

/// Why a record is not an event of this encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventError {
    /// Shorter than its header or than its kind needs.
    Short,
    /// Another version of the encoding.
    Version(u8),
    /// A `START` field holds a value its type cannot (a `u32` field over 2^32 − 1): reading
    /// it cut would replay another configuration than the one recorded.
    OutOfRange(&'static str),
    /// An unknown kind or code.
    Unknown {
        /// The kind.
        kind: u8,
        /// The code.
        code: u32,
    },
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Short => f.write_str("event record too short"),
            EventError::Version(v) => write!(
                f,
                "event encoding version {v}, not {OLDEST_VERSION} to {VERSION}"
            ),
            EventError::OutOfRange(field) => write!(f, "start field {field} out of range"),
            EventError::Unknown { kind, code } => {
                write!(f, "unknown event kind {kind} code {code}")
            }
        }
    }
}

impl std::error::Error for EventError {}

fn io_code(io: Io) -> (u32, u64) {
    match io {
        Io::Done(n) => (0, n as u64),
        Io::WouldBlock => (1, 0),
        Io::Error(e) => (2, e.0 as u32 as u64),
    }
}

fn io_from(kind: u8, code: u32, value: u64) -> Result<Io, EventError> {
    Ok(match code {
        0 => Io::Done(value as usize),
        1 => Io::WouldBlock,
        2 => Io::Error(SocketError(value as u32 as i32)),
        _ => return Err(EventError::Unknown { kind, code }),
    })
}

/// Writes the record of `event` into `out` (cleared first): header, then data. `ports` are
/// the connection's `(guest, host)` ports, if known. A `CONNECT` read is kept whole (at most
/// a line's worth of bytes): the engine hands what follows the line to the guest, so replay
/// needs every byte.
pub fn encode(out: &mut Vec<u8>, ports: Option<(u32, u32)>, event: &Event<'_>) {
    let mut conn = event.conn().map_or(NO_CONN, ConnId::to_raw);
    let (kind, code, value): (u8, u32, u64) = match *event {
        Event::Start(..) => (kind::START, 0, 0),
        Event::TxWritten(TxOutcome::Written(io)) => {
            let (c, v) = io_code(io);
            (kind::TX_WRITTEN, c, v)
        }
        Event::TxWritten(TxOutcome::Abandoned) => (kind::TX_WRITTEN, 3, 0),
        Event::TxWritten(TxOutcome::Unreadable(io)) => {
            let (c, v) = io_code(io);
            (kind::TX_WRITTEN, UNREADABLE + c, v)
        }
        Event::SiblingAccept {
            peer_cid,
            socket_type,
            result,
            ..
        } => (
            kind::SIBLING_ACCEPT,
            match result {
                Ok(_) => 0,
                Err(SiblingRefusal::TableFull) => 1,
                Err(SiblingRefusal::SocketType) => 2,
                Err(SiblingRefusal::Address) => 3,
                Err(SiblingRefusal::InUse) => 4,
            },
            peer_cid | u64::from(socket_type.to_u16()) << 32,
        ),
        Event::ResetPeer(cid) => (kind::RESET_PEER, 0, cid),
        Event::Accept(ty, Ok(_)) => (kind::ACCEPT, 0, u64::from(ty.to_u16())),
        Event::Accept(ty, Err(TableFull)) => (kind::ACCEPT, 1, u64::from(ty.to_u16())),
        Event::SocketTypes(t) => (
            kind::SOCKET_TYPES,
            0,
            u64::from(t.stream) | u64::from(t.seqpacket) << 1,
        ),
        Event::Probe(_, probe) => match probe {
            Probe::Size(n) => (kind::PROBE, 0, n as u64),
            Probe::Empty => (kind::PROBE, 1, 0),
            Probe::Eof => (kind::PROBE, 2, 0),
            Probe::WouldBlock => (kind::PROBE, 3, 0),
            Probe::Error(e) => (kind::PROBE, 4, e.0 as u32 as u64),
        },
        Event::RxMessage(_, io, _, _) => {
            let (c, v) = io_code(io);
            (kind::RX_MESSAGE, c, v)
        }
        Event::ConnectLine(_, read) => match read {
            LineRead::Data(bytes) => (kind::CONNECT_LINE, 0, bytes.len() as u64),
            LineRead::Eof => (kind::CONNECT_LINE, 1, 0),
            LineRead::WouldBlock => (kind::CONNECT_LINE, 2, 0),
            LineRead::Error(e) => (kind::CONNECT_LINE, 3, e.0 as u32 as u64),
        },
        Event::Host(_, ev) => match ev {
            HostEvent::Connected => (kind::HOST, 0, 0),
            HostEvent::ConnectFailed(e) => (kind::HOST, 1, e.0 as u32 as u64),
            HostEvent::Readable => (kind::HOST, 2, 0),
            HostEvent::Writable => (kind::HOST, 3, 0),
            HostEvent::Error(e) => (kind::HOST, 4, e.0 as u32 as u64),
            HostEvent::HangUp => (kind::HOST, 5, 0),
        },
        Event::HostWrite(_, io) => {
            let (c, v) = io_code(io);
            (kind::HOST_WRITE, c, v)
        }
        Event::Timeout => (kind::TIMEOUT, 0, 0),
        Event::ResetConnection(_) => (kind::RESET_CONNECTION, 0, 0),
        Event::AbortAll => (kind::ABORT_ALL, 0, 0),
        Event::Reset => (kind::RESET, 0, 0),
        Event::Stop => (kind::STOP, 0, 0),
        Event::PollRx { room, grant } => {
            let code = match grant {
                Grant::Nothing => 0,
                Grant::Packet => 1,
                Grant::Read(_) => 2,
                Grant::Probe(_) => 3,
                Grant::Message(_) => 4,
            };
            (kind::POLL_RX, code, room as u64)
        }
        Event::RxRead(_, io) => {
            let (c, v) = io_code(io);
            (kind::RX_READ, c, v)
        }
        Event::Action(action) => match action {
            None => (kind::ACTION, 0, 0),
            Some(Action::Connect {
                cid,
                port,
                socket_type,
                ..
            }) => (
                kind::ACTION,
                match socket_type {
                    SocketType::Stream => 1,
                    SocketType::SeqPacket => 7,
                },
                u64::from(port) | (cid & 0xffff_ffff) << 32,
            ),
            Some(Action::ReadConnectLine { max, .. }) => (kind::ACTION, 2, max as u64),
            Some(Action::Flush { .. }) => (kind::ACTION, 3, 0),
            Some(Action::Shutdown { direction, .. }) => (
                kind::ACTION,
                4,
                match direction {
                    Direction::Read => 0,
                    Direction::Write => 1,
                },
            ),
            Some(Action::Interest { interest, .. }) => (
                kind::ACTION,
                5,
                u64::from(interest.readable) | u64::from(interest.writable) << 1,
            ),
            Some(Action::Close { .. }) => (kind::ACTION, 6, 0),
        },
    };
    if matches!(event, Event::Accept(_, Err(_))) {
        conn = NO_CONN;
    }
    let (guest_port, host_port) = ports.unwrap_or((0, 0));
    out.clear();
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&(conn as u32).to_le_bytes());
    out.extend_from_slice(&((conn >> 32) as u32).to_le_bytes());
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
    out.extend_from_slice(&guest_port.to_le_bytes());
    out.extend_from_slice(&host_port.to_le_bytes());
    match *event {
        Event::Start(config, snapshot) => {
            encode_config(out, config);
            out.extend_from_slice(&u64::from(snapshot.next_generation).to_le_bytes());
            out.extend_from_slice(&u64::from(snapshot.next_host_port).to_le_bytes());
        }
        Event::ConnectLine(_, LineRead::Data(bytes)) => {
            out.extend_from_slice(bytes);
        }
        Event::SiblingAccept {
            peer_port, port, ..
        } => {
            out.extend_from_slice(&port.to_le_bytes());
            out.extend_from_slice(&peer_port.to_le_bytes());
        }
        Event::RxMessage(_, _, rooms, staged) => {
            out.extend_from_slice(&(rooms.len() as u32).to_le_bytes());
            for &room in rooms {
                out.extend_from_slice(&u32::try_from(room).unwrap_or(u32::MAX).to_le_bytes());
            }
            out.extend_from_slice(staged);
        }
        _ => {}
    }
}

fn encode_config(out: &mut Vec<u8>, c: &Config) {
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    for v in [
        c.guest_cid,
        u64::from(c.buffer_size),
        u64::from(c.max_packet_payload),
        c.max_connections as u64,
        c.max_pending_host_clients as u64,
        nanos(c.connect_line_timeout),
        nanos(c.connect_timeout),
        nanos(c.close_timeout),
        u64::from(c.host_port_first),
        u64::from(c.credit_update_threshold),
        c.max_pending_resets as u64,
        c.pooled_buffers as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn decode_config(data: &[u8]) -> Result<Config, EventError> {
    if data.len() < CONFIG_LEN {
        return Err(EventError::Short);
    }
    let v = |i: usize| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let narrow = |i: usize, field: &'static str| {
        u32::try_from(v(i)).map_err(|_| EventError::OutOfRange(field))
    };
    let size = |i: usize, field: &'static str| {
        usize::try_from(v(i)).map_err(|_| EventError::OutOfRange(field))
    };
    let mut c = Config::new(v(0));
    c.buffer_size = narrow(1, "buffer_size")?;
    c.max_packet_payload = narrow(2, "max_packet_payload")?;
    c.max_connections = size(3, "max_connections")?;
    c.max_pending_host_clients = size(4, "max_pending_host_clients")?;
    c.connect_line_timeout = Duration::from_nanos(v(5));
    c.connect_timeout = Duration::from_nanos(v(6));
    c.close_timeout = Duration::from_nanos(v(7));
    c.host_port_first = narrow(8, "host_port_first")?;
    c.credit_update_threshold = narrow(9, "credit_update_threshold")?;
    c.max_pending_resets = size(10, "max_pending_resets")?;
    c.pooled_buffers = size(11, "pooled_buffers")?;
    Ok(c)
}

/// The fields of a record header, as the dissector shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    /// The kind.
    pub kind: u8,
    /// The connection, if the event names one.
    pub conn: Option<ConnId>,
    /// The kind-specific code.
    pub code: u32,
    /// The kind-specific value.
    pub value: u64,
    /// The connection's guest port (0 if unknown).
    pub guest_port: u32,
    /// The connection's host port (0 if unknown).
    pub host_port: u32,
}

/// Whether an event of `kind` with `code` names a connection (its connection fields hold a
/// handle) or not (they hold all-ones, to be ignored). The kind and code say it, not the
/// fields' value: a handle can be any 64-bit value, all-ones included.
pub fn names_conn(kind: u8, code: u32) -> bool {
    match kind {
        kind::ACCEPT | kind::SIBLING_ACCEPT => code == 0,
        kind::CONNECT_LINE
        | kind::HOST
        | kind::HOST_WRITE
        | kind::RESET_CONNECTION
        | kind::RX_READ
        | kind::PROBE
        | kind::RX_MESSAGE => true,
        kind::POLL_RX => (2..=4).contains(&code),
        kind::ACTION => code != 0,
        // START, TX_WRITTEN, TIMEOUT, ABORT_ALL, RESET, STOP; and kinds of later versions,
        // whose fields this reader does not know.
        _ => false,
    }
}

/// Reads a record header.
///
/// # Errors
///
/// [`EventError::Short`], [`EventError::Version`].
pub fn fields(record: &[u8]) -> Result<(Fields, &[u8]), EventError> {
    if record.len() < HEADER_LEN {
        return Err(EventError::Short);
    }
    if !(OLDEST_VERSION..=VERSION).contains(&record[0]) {
        return Err(EventError::Version(record[0]));
    }
    let hdr_len = usize::from(u16::from_le_bytes([record[2], record[3]]));
    if hdr_len < HEADER_LEN || hdr_len > record.len() {
        return Err(EventError::Short);
    }
    let u32_at = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4"));
    let raw = u64::from(u32_at(4)) | u64::from(u32_at(8)) << 32;
    let (kind, code) = (record[1], u32_at(12));
    let fields = Fields {
        kind,
        conn: names_conn(kind, code).then(|| ConnId::from_raw(raw)),
        code,
        value: u64::from_le_bytes(record[16..24].try_into().expect("8")),
        guest_port: u32_at(24),
        host_port: u32_at(28),
    };
    Ok((fields, &record[hdr_len..]))
}

/// Decodes a record.
///
/// # Errors
///
/// [`EventError`].
pub fn decode(record: &[u8]) -> Result<Decoded<'_>, EventError> {
    let (f, data) = fields(record)?;
    let unknown = || EventError::Unknown {
        kind: f.kind,
        code: f.code,
    };
    let conn = || f.conn.ok_or(EventError::Short);
    let errno = SocketError(f.value as u32 as i32);
    let event = match f.kind {
        kind::START => {
            let config = decode_config(data)?;
            let snapshot = if record[0] == 1 {
                // Version 1 was only ever written by recorders attached to fresh engines.
                Snapshot::fresh(&config)
            } else {
                let state = data
                    .get(CONFIG_LEN..CONFIG_LEN + SNAPSHOT_LEN)
                    .ok_or(EventError::Short)?;
                let v = |i: usize, field: &'static str| {
                    let v = u64::from_le_bytes(state[i..i + 8].try_into().expect("8 bytes"));
                    u32::try_from(v).map_err(|_| EventError::OutOfRange(field))
                };
                Snapshot {
                    next_generation: v(0, "next_generation")?,
                    next_host_port: v(8, "next_host_port")?,
                }
            };
            return Ok(Decoded::Start(config, snapshot));
        }
        kind::TX_WRITTEN => Event::TxWritten(match f.code {
            3 => TxOutcome::Abandoned,
            c if c >= UNREADABLE => {
                TxOutcome::Unreadable(io_from(f.kind, c - UNREADABLE, f.value)?)
            }
            c => TxOutcome::Written(io_from(f.kind, c, f.value)?),
        }),
        kind::SIBLING_ACCEPT => {
            let ports = data.get(..8).ok_or(EventError::Short)?;
            let u32_at = |at: usize| u32::from_le_bytes(ports[at..at + 4].try_into().expect("4"));
            let socket_type = u16::try_from(f.value >> 32)
                .ok()
                .and_then(SocketType::from_u16)
                .ok_or_else(unknown)?;
            Event::SiblingAccept {
                peer_cid: f.value & 0xffff_ffff,
                peer_port: u32_at(4),
                port: u32_at(0),
                socket_type,
                result: match f.code {
                    0 => Ok(conn()?),
                    1 => Err(SiblingRefusal::TableFull),
                    2 => Err(SiblingRefusal::SocketType),
                    3 => Err(SiblingRefusal::Address),
                    4 => Err(SiblingRefusal::InUse),
                    _ => return Err(unknown()),
                },
            }
        }
        kind::RESET_PEER => Event::ResetPeer(f.value),
        kind::ACCEPT => {
            // Versions 1 and 2 wrote 0: stream listeners were all there was.
            let ty = match f.value {
                0 | 1 => SocketType::Stream,
                2 => SocketType::SeqPacket,
                _ => return Err(unknown()),
            };
            match f.code {
                0 => Event::Accept(ty, Ok(conn()?)),
                1 => Event::Accept(ty, Err(TableFull)),
                _ => return Err(unknown()),
            }
        }
        kind::SOCKET_TYPES if f.code == 0 && f.value < 4 => Event::SocketTypes(SocketTypes {
            stream: f.value & 1 != 0,
            seqpacket: f.value & 2 != 0,
        }),
        kind::PROBE => Event::Probe(
            conn()?,
            match f.code {
                0 => Probe::Size(f.value as usize),
                1 => Probe::Empty,
                2 => Probe::Eof,
                3 => Probe::WouldBlock,
                4 => Probe::Error(errno),
                _ => return Err(unknown()),
            },
        ),
        kind::RX_MESSAGE => {
            let count = data
                .get(..4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                .ok_or(EventError::Short)?;
            let rooms_end = count
                .checked_mul(4)
                .and_then(|n| n.checked_add(4))
                .filter(|&end| end <= data.len())
                .ok_or(EventError::Short)?;
            let rooms = data[4..rooms_end]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                .collect();
            return Ok(Decoded::RxMessage(
                conn()?,
                io_from(f.kind, f.code, f.value)?,
                rooms,
                &data[rooms_end..],
            ));
        }
        kind::CONNECT_LINE => Event::ConnectLine(
            conn()?,
            match f.code {
                0 => LineRead::Data(data),
                1 => LineRead::Eof,
                2 => LineRead::WouldBlock,
                3 => LineRead::Error(errno),
                _ => return Err(unknown()),
            },
        ),
        kind::HOST => Event::Host(
            conn()?,
            match f.code {
                0 => HostEvent::Connected,
                1 => HostEvent::ConnectFailed(errno),
                2 => HostEvent::Readable,
                3 => HostEvent::Writable,
                4 => HostEvent::Error(errno),
                5 => HostEvent::HangUp,
                _ => return Err(unknown()),
            },
        ),
        kind::HOST_WRITE => Event::HostWrite(conn()?, io_from(f.kind, f.code, f.value)?),
        kind::TIMEOUT => Event::Timeout,
        kind::RESET_CONNECTION => Event::ResetConnection(conn()?),
        kind::ABORT_ALL => Event::AbortAll,
        kind::RESET => Event::Reset,
        kind::STOP => Event::Stop,
        kind::POLL_RX => Event::PollRx {
            room: f.value as usize,
            grant: match f.code {
                0 => Grant::Nothing,
                1 => Grant::Packet,
                2 => Grant::Read(conn()?),
                3 => Grant::Probe(conn()?),
                4 => Grant::Message(conn()?),
                _ => return Err(unknown()),
            },
        },
        kind::RX_READ => Event::RxRead(conn()?, io_from(f.kind, f.code, f.value)?),
        kind::ACTION => Event::Action(match f.code {
            0 => None,
            1 | 7 => Some(Action::Connect {
                conn: conn()?,
                cid: if record[0] < 4 {
                    HOST_CID
                } else {
                    f.value >> 32
                },
                port: f.value as u32,
                socket_type: if f.code == 7 {
                    SocketType::SeqPacket
                } else {
                    SocketType::Stream
                },
            }),
            2 => Some(Action::ReadConnectLine {
                conn: conn()?,
                max: f.value as usize,
            }),
            3 => Some(Action::Flush { conn: conn()? }),
            4 => Some(Action::Shutdown {
                conn: conn()?,
                direction: if f.value == 0 {
                    Direction::Read
                } else {
                    Direction::Write
                },
            }),
            5 => Some(Action::Interest {
                conn: conn()?,
                interest: Interest {
                    readable: f.value & 1 != 0,
                    writable: f.value & 2 != 0,
                },
            }),
            6 => Some(Action::Close { conn: conn()? }),
            _ => return Err(unknown()),
        }),
        _ => return Err(unknown()),
    };
    Ok(Decoded::Event(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips() {
        // All-ones was once read back as "no connection"; every handle must come back.
        for raw in [
            7 << 32 | 3,
            u64::MAX,
            0,
            u64::from(u32::MAX),
            u64::MAX << 32,
        ] {
            round_trips(ConnId::from_raw(raw));
        }
        let mut buf = Vec::new();
        let mut config = Config::new(42);
        config.connect_timeout = Duration::from_millis(1234);
        config.pooled_buffers = 3;
        let snapshot = Snapshot {
            next_generation: 77,
            next_host_port: 1 << 31,
        };
        encode(&mut buf, None, &Event::Start(&config, snapshot));
        assert_eq!(buf.len(), HEADER_LEN + CONFIG_LEN + SNAPSHOT_LEN);
        assert_eq!(decode(&buf), Ok(Decoded::Start(config.clone(), snapshot)));
        // A field its type cannot hold is refused, not cut.
        let mut wide = buf.clone();
        wide[HEADER_LEN + 8 + 4] = 1;
        assert_eq!(decode(&wide), Err(EventError::OutOfRange("buffer_size")));
        let mut wide = buf.clone();
        wide[HEADER_LEN + CONFIG_LEN + 4] = 1;
        assert_eq!(
            decode(&wide),
            Err(EventError::OutOfRange("next_generation"))
        );
        // A version 2 start cut after the configuration is short.
        assert_eq!(
            decode(&buf[..HEADER_LEN + CONFIG_LEN]),
            Err(EventError::Short)
        );
        // Version 1: the configuration alone, a fresh engine.
        buf[0] = 1;
        buf.truncate(HEADER_LEN + CONFIG_LEN);
        assert_eq!(
            decode(&buf),
            Ok(Decoded::Start(config.clone(), Snapshot::fresh(&config)))
        );
    }

    fn round_trips(c: ConnId) {
        let e = SocketError(104);
        let events = [
            Event::TxWritten(TxOutcome::Written(Io::Done(5))),
            Event::TxWritten(TxOutcome::Written(Io::WouldBlock)),
            Event::TxWritten(TxOutcome::Written(Io::Error(e))),
            Event::TxWritten(TxOutcome::Abandoned),
            Event::TxWritten(TxOutcome::Unreadable(Io::Done(0))),
            Event::TxWritten(TxOutcome::Unreadable(Io::Error(e))),
            Event::Accept(SocketType::Stream, Ok(c)),
            Event::Accept(SocketType::SeqPacket, Ok(c)),
            Event::Accept(SocketType::Stream, Err(TableFull)),
            Event::Accept(SocketType::SeqPacket, Err(TableFull)),
            Event::SocketTypes(SocketTypes {
                stream: true,
                seqpacket: true,
            }),
            Event::SocketTypes(SocketTypes {
                stream: false,
                seqpacket: true,
            }),
            Event::Probe(c, Probe::Size(212_960)),
            Event::Probe(c, Probe::Empty),
            Event::Probe(c, Probe::Eof),
            Event::Probe(c, Probe::WouldBlock),
            Event::Probe(c, Probe::Error(e)),
            Event::PollRx {
                room: 3732,
                grant: Grant::Probe(c),
            },
            Event::PollRx {
                room: 3732,
                grant: Grant::Message(c),
            },
            Event::ConnectLine(c, LineRead::Data(b"CONNECT 5\n")),
            Event::ConnectLine(c, LineRead::Eof),
            Event::ConnectLine(c, LineRead::WouldBlock),
            Event::ConnectLine(c, LineRead::Error(e)),
            Event::Host(c, HostEvent::Connected),
            Event::Host(c, HostEvent::ConnectFailed(e)),
            Event::Host(c, HostEvent::Readable),
            Event::Host(c, HostEvent::Writable),
            Event::Host(c, HostEvent::Error(e)),
            Event::Host(c, HostEvent::HangUp),
            Event::HostWrite(c, Io::Done(1 << 20)),
            Event::Timeout,
            Event::ResetConnection(c),
            Event::AbortAll,
            Event::Reset,
            Event::Stop,
            Event::PollRx {
                room: 4052,
                grant: Grant::Nothing,
            },
            Event::PollRx {
                room: 0,
                grant: Grant::Packet,
            },
            Event::PollRx {
                room: 9,
                grant: Grant::Read(c),
            },
            Event::RxRead(c, Io::Done(0)),
            Event::Action(None),
            Event::Action(Some(Action::Connect {
                conn: c,
                cid: HOST_CID,
                port: 80,
                socket_type: SocketType::Stream,
            })),
            Event::Action(Some(Action::Connect {
                conn: c,
                cid: HOST_CID,
                port: 81,
                socket_type: SocketType::SeqPacket,
            })),
            Event::Action(Some(Action::Connect {
                conn: c,
                cid: 0,
                port: u32::MAX - 1,
                socket_type: SocketType::Stream,
            })),
            Event::Action(Some(Action::Connect {
                conn: c,
                cid: u64::from(u32::MAX),
                port: 5,
                socket_type: SocketType::SeqPacket,
            })),
            Event::SiblingAccept {
                peer_cid: 4,
                peer_port: 49_152,
                port: 1234,
                socket_type: SocketType::SeqPacket,
                result: Ok(c),
            },
            Event::SiblingAccept {
                peer_cid: 7,
                peer_port: 1,
                port: u32::MAX,
                socket_type: SocketType::Stream,
                result: Err(SiblingRefusal::Address),
            },
            Event::SiblingAccept {
                peer_cid: 7,
                peer_port: 1,
                port: 2,
                socket_type: SocketType::Stream,
                result: Err(SiblingRefusal::InUse),
            },
            Event::ResetPeer(9),
            Event::Action(Some(Action::ReadConnectLine { conn: c, max: 64 })),
            Event::Action(Some(Action::Flush { conn: c })),
            Event::Action(Some(Action::Shutdown {
                conn: c,
                direction: Direction::Write,
            })),
            Event::Action(Some(Action::Interest {
                conn: c,
                interest: Interest {
                    readable: true,
                    writable: false,
                },
            })),
            Event::Action(Some(Action::Close { conn: c })),
        ];
        let mut buf = Vec::new();
        for event in events {
            encode(&mut buf, Some((1, 2)), &event);
            assert_eq!(decode(&buf), Ok(Decoded::Event(event)), "{event:?}");
            let (f, _) = fields(&buf).unwrap();
            assert_eq!((f.guest_port, f.host_port), (1, 2));
            assert_eq!(f.conn, event.conn(), "{event:?}");
        }
        let rooms = [3732, 3732, 100];
        for (io, staged) in [
            (Io::Done(7564), &b""[..]),
            (Io::Done(7570), b"staged"),
            (Io::WouldBlock, b""),
            (Io::Error(e), b""),
        ] {
            encode(
                &mut buf,
                Some((1, 2)),
                &Event::RxMessage(c, io, &rooms, staged),
            );
            assert_eq!(
                decode(&buf),
                Ok(Decoded::RxMessage(c, io, rooms.to_vec(), staged))
            );
            assert_eq!(fields(&buf).unwrap().0.conn, Some(c));
        }
    }

    #[test]
    fn bad_records_are_named() {
        assert_eq!(decode(&[1; 10]), Err(EventError::Short));
        let mut buf = Vec::new();
        encode(&mut buf, None, &Event::Timeout);
        buf[0] = VERSION + 1;
        assert_eq!(decode(&buf), Err(EventError::Version(VERSION + 1)));
        buf[0] = 0;
        assert_eq!(decode(&buf), Err(EventError::Version(0)));
        buf[0] = 1;
        buf[1] = 200;
        assert!(matches!(
            decode(&buf),
            Err(EventError::Unknown { kind: 200, .. })
        ));
    }
}
