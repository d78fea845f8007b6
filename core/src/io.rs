//! The values that cross the engine boundary on the host side: socket events, I/O results and
//! socket actions.

use std::fmt;

use crate::conn::ConnId;
use crate::wire::SocketType;

/// An error a host socket reported, as an `errno` value (0 when the platform gave none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketError(pub i32);

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "socket error {}", self.0)
    }
}

impl From<&std::io::Error> for SocketError {
    fn from(e: &std::io::Error) -> Self {
        SocketError(e.raw_os_error().unwrap_or(0))
    }
}

/// The result of one read or write on a host socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Io {
    /// The call moved this many bytes. For a read, `Done(0)` is end of file.
    Done(usize),
    /// The socket was not ready (`EAGAIN`); nothing moved.
    WouldBlock,
    /// The call failed.
    Error(SocketError),
}

impl Io {
    /// Maps a `std::io` result, turning `WouldBlock` (and `Interrupted`, which a caller can
    /// simply retry later) into [`Io::WouldBlock`].
    pub fn from_result(r: &std::io::Result<usize>) -> Io {
        match r {
            Ok(n) => Io::Done(*n),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                Io::WouldBlock
            }
            Err(e) => Io::Error(SocketError::from(e)),
        }
    }
}

/// The result of reading a host client's `CONNECT` line, for
/// [`Engine::handle_connect_line`](crate::Engine::handle_connect_line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LineRead<'a> {
    /// These bytes were read (never empty: an empty read is [`LineRead::Eof`]).
    Data(&'a [u8]),
    /// The client closed the socket.
    Eof,
    /// Nothing to read yet.
    WouldBlock,
    /// The read failed.
    Error(SocketError),
}

/// What a peek at a seqpacket socket found: the size of its next message (a `recv` with
/// `MSG_PEEK | MSG_TRUNC` and no buffer), for
/// [`RxProbe::complete`](crate::RxProbe::complete).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Probe {
    /// The next message has this many bytes (more than zero).
    Size(usize),
    /// The next message was empty; the caller consumed it. (A Unix seqpacket read of 0 bytes
    /// is an empty message unless the peer shut down its sending side: the caller tells the
    /// two apart, with `POLLRDHUP`.)
    Empty,
    /// The peer shut down its sending side and every message was read.
    Eof,
    /// No message is queued.
    WouldBlock,
    /// The peek failed.
    Error(SocketError),
}

/// The socket types the guest's driver negotiated, for
/// [`Engine::set_socket_types`](crate::Engine::set_socket_types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketTypes {
    /// `SOCK_STREAM` connections.
    pub stream: bool,
    /// `SOCK_SEQPACKET` connections (`VIRTIO_VSOCK_F_SEQPACKET`).
    pub seqpacket: bool,
}

impl SocketTypes {
    /// Streams only: what a driver that negotiated no socket feature gets, and what an engine
    /// starts with.
    pub const STREAM: SocketTypes = SocketTypes {
        stream: true,
        seqpacket: false,
    };

    /// Whether connections of type `ty` are allowed.
    pub fn allows(self, ty: SocketType) -> bool {
        match ty {
            SocketType::Stream => self.stream,
            SocketType::SeqPacket => self.seqpacket,
        }
    }
}

impl Default for SocketTypes {
    fn default() -> Self {
        SocketTypes::STREAM
    }
}

/// Readiness and completion events of a host socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostEvent {
    /// The connect started by [`Action::Connect`] finished.
    Connected,
    /// The connect started by [`Action::Connect`] failed (no such socket, refused, ...).
    ConnectFailed(SocketError),
    /// The socket has bytes to read, or end of file, or a hang-up. A hang-up is reported as
    /// readable and writable, so the engine learns of it by reading and writing.
    Readable,
    /// The socket has room to write.
    Writable,
    /// The socket reported an error (`EPOLLERR`, `SO_ERROR`).
    Error(SocketError),
    /// The socket's peer will read no more: it closed, or shut down both directions
    /// (`EPOLLHUP`). What it sent before is still read. The guest is told at once with
    /// `SHUTDOWN` for its sending side, as a Linux peer's close would tell it; guest bytes
    /// still held for the socket are lost, and the guest gets an RST once what the socket
    /// holds for it is delivered.
    HangUp,
}

/// A direction of a host socket, for [`Action::Shutdown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// `shutdown(SHUT_RD)`: the guest will read no more.
    Read,
    /// `shutdown(SHUT_WR)`: the guest will send no more, and everything it sent was written.
    Write,
}

/// Which readiness of a socket the engine is waiting for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Interest {
    /// Tell the engine when the socket becomes readable.
    pub readable: bool,
    /// Tell the engine when the socket becomes writable.
    pub writable: bool,
}

/// Something the caller must do to a host socket. Drained with
/// [`Engine::poll_action`](crate::Engine::poll_action).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Open a non-blocking socket of `socket_type` (`SOCK_STREAM` or `SOCK_SEQPACKET`) for
    /// `conn` and connect it to `<uds_path>_<port>`, then report [`HostEvent::Connected`] or
    /// [`HostEvent::ConnectFailed`] (a listener of the other type refuses with `EPROTOTYPE`:
    /// a failed connect, like a missing listener).
    ///
    /// When `cid` is not the host's (2), the guest connected to a sibling VM: the caller
    /// connects `conn` to that VM's device (a socket pair of `socket_type`, the other end
    /// handed to that device's [`Engine::handle_sibling_accept`](crate::Engine::handle_sibling_accept)),
    /// or reports `ConnectFailed` at once when no such sibling is reachable. After
    /// `Connected`, the engine reads the sibling's `OK` reply before it tells its guest.
    Connect {
        /// The connection the new socket belongs to.
        conn: ConnId,
        /// The CID the guest connected to: the host's, or a sibling VM's.
        cid: u64,
        /// The vsock port the guest connected to.
        port: u32,
        /// The guest socket's type, and so the host socket's.
        socket_type: SocketType,
    },
    /// Read at most `max` bytes of the client's `CONNECT` line and report them with
    /// [`Engine::handle_connect_line`](crate::Engine::handle_connect_line). A seqpacket
    /// client's line is one message: read it whole, with room for one byte more than `max`,
    /// so that a longer message shows (and is refused as too long).
    ReadConnectLine {
        /// The accepted host client.
        conn: ConnId,
        /// The most bytes to read; more could not be kept.
        max: usize,
    },
    /// Write what [`Engine::host_bytes`](crate::Engine::host_bytes) returns for `conn` (one
    /// `writev`; on a seqpacket socket that is one whole message) and report the result with
    /// [`Engine::handle_host_write`](crate::Engine::handle_host_write).
    Flush {
        /// The connection with bytes for its socket.
        conn: ConnId,
    },
    /// Shut down one direction of the socket.
    Shutdown {
        /// The connection.
        conn: ConnId,
        /// Which direction.
        direction: Direction,
    },
    /// From now on, report these readiness events for the socket (and not others).
    Interest {
        /// The connection.
        conn: ConnId,
        /// The events wanted.
        interest: Interest,
    },
    /// Close the socket and forget `conn`: the handle is dead from now on.
    Close {
        /// The connection.
        conn: ConnId,
    },
}

impl Action {
    /// The connection the action is for.
    pub fn conn(&self) -> ConnId {
        match *self {
            Action::Connect { conn, .. }
            | Action::ReadConnectLine { conn, .. }
            | Action::Flush { conn }
            | Action::Shutdown { conn, .. }
            | Action::Interest { conn, .. }
            | Action::Close { conn } => conn,
        }
    }
}

/// Guest memory holding the payload of a tx packet, behind an interface.
///
/// The engine never sees guest memory as a Rust slice: `vsock-device` implements this over
/// descriptor chains, tests over plain byte slices.
pub trait GuestBytes {
    /// Copies `dst.len()` payload bytes, starting `offset` bytes into the payload, into `dst`.
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault>;
}

/// Guest memory could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryFault;

impl fmt::Display for MemoryFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("guest memory could not be read")
    }
}

impl std::error::Error for MemoryFault {}

impl GuestBytes for &[u8] {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.get(offset..end))
            .ok_or(MemoryFault)?;
        dst.copy_from_slice(src);
        Ok(())
    }
}
