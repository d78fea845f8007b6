//! The host side of hybrid vsock, written once for every runtime: the Unix sockets the engine's
//! [`Action`]s turn into system calls.
//!
//! - [`UdsPath`]: the base path `<uds_path>`; a guest connection to port `P` goes to
//!   `<uds_path>_P`, host clients connect to `<uds_path>` itself, or, for seqpacket
//!   connections, to `<uds_path>_seqpacket`.
//! - [`Listener`]: a socket host clients connect to (stream or seqpacket), bound
//!   non-blocking, with the path unlinked when it is dropped (and a stale file from a dead
//!   process replaced, a live listener refused).
//! - [`Host`]: the table of connection sockets. It implements
//!   [`vsock_device::HostSockets`], so [`VsockDevice::serve`] performs actions
//!   through it: non-blocking connects, the `CONNECT` line read in bounded pieces,
//!   half-closes, closes. Any socket error becomes an engine input (a reset), never a panic or
//!   a stopped loop. Sockets sit in slots indexed by [`ConnId::index`], which is also the key
//!   runtimes register them under.
//! - [`Driver`]: what every runtime runs: the device, the socket table, the listener, the
//!   clock, the accepts (a bounded round per wake-up, each client's line read at once), the
//!   retry after `EMFILE`, the device lifecycle through a [`vsock_device::Transport`], and
//!   the merged deadline. A runtime translates its events into [`Driver::accept`] and
//!   [`Driver::ready`] and sleeps for [`Driver::timeout`].
//! - [`DriverThread`]: a driver on a thread of its own, the one way the runtimes' ready-made
//!   loops, the daemon and the test rig run one.
//!
//! What differs between runtimes is only how a socket is watched. That is the [`Reactor`]
//! trait, and `vsock-mio` has its one implementation: sockets registered in a
//! `mio::Registry`. `vsock-tokio` and `vsock-smol` use it too: their sockets live in a private
//! `mio::Poll`, whose own descriptor they wait on (tokio through `AsyncFd`, smol through
//! `async_io::Async`) before draining its events as `vsock-mio` does. No protocol decision is
//! made here or there.
//!
//! This crate owns each socket's life (connect, the `CONNECT` line, shutdown, watching,
//! close); the device owns the data moved on it, every write included (a `sendmsg` with
//! `MSG_NOSIGNAL`: a peer that has gone is `EPIPE`, never `SIGPIPE`, whatever signal
//! disposition the embedding process keeps).
//!
//! # Example
//!
//! A guest's connect to port 1234, carried out by a [`Host`] on a reactor that watches
//! nothing (`vsock-mio`'s registers each socket in a `mio::Registry`):
//!
//! ```
//! use std::os::unix::net::{UnixListener, UnixStream};
//! use vsock_core::wire::{Op, Packet, SocketType, HOST_CID};
//! use vsock_core::{Config, ConnId, Engine, Instant, Interest, Tx};
//! use vsock_device::HostSockets;
//! use vsock_host::{Host, Reactor, UdsPath};
//!
//! struct Unwatched;
//!
//! impl Reactor for Unwatched {
//!     type Socket = UnixStream;
//!     fn register(&mut self, _: ConnId, s: UnixStream, _: Interest) -> std::io::Result<UnixStream> {
//!         Ok(s)
//!     }
//!     fn stream<'a>(&self, socket: &'a UnixStream) -> &'a UnixStream {
//!         socket
//!     }
//!     fn set_interest(&mut self, _: ConnId, _: &mut UnixStream, _: Interest) -> std::io::Result<()> {
//!         Ok(())
//!     }
//!     fn deregister(&mut self, _: ConnId, _: UnixStream) {}
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("vsock-host-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = UdsPath::new(dir.join("vsock"))?;
//! // The host service for vsock port 1234.
//! let service = UnixListener::bind(path.port(1234))?;
//! let mut host = Host::new(path, Unwatched);
//! let mut engine = Engine::new(Config::new(3), Instant::ZERO)?;
//!
//! let now = Instant::from_millis(1);
//! let request = Packet {
//!     src_cid: 3, dst_cid: HOST_CID, src_port: 50_000, dst_port: 1234, len: 0,
//!     socket_type: SocketType::Stream, op: Op::Request, flags: 0, buf_alloc: 65_536, fwd_cnt: 0,
//! };
//! assert!(matches!(engine.handle_tx(now, &request.to_header()), Tx::Done));
//! // `VsockDevice::serve` hands each action to the host sockets like this.
//! while let Some(action) = engine.poll_action() {
//!     host.perform(now, &mut engine, action);
//! }
//! let (_peer, _) = service.accept()?;
//! assert_eq!((host.len(), host.stats().connects), (1, 1));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! [`Action`]: vsock_core::Action
//! [`VsockDevice::serve`]: vsock_device::VsockDevice::serve
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{debug, warn};
use vsock_core::wire::{SocketType, CONNECT_LINE_MAX, HOST_CID};
use vsock_core::{
    Action, ConnId, Direction, Engine, HostEvent, Instant, Interest, LineRead, SocketError,
};
use vsock_device::HostSockets;

mod driver;
mod sibling;
mod thread;

pub use driver::{ConnSnapshot, Driver, DriverConfig, Readiness, Snapshot};
pub use sibling::{Delivery, SiblingLink, Siblings, INBOX_CONNECTS, INBOX_INSPECTIONS};
pub use thread::DriverThread;

/// The longest path a Unix socket address holds (`sun_path`, less its terminating zero).
pub const MAX_SOCKET_PATH: usize = 107;

/// Suffix room a port needs: `_4294967295`.
const PORT_SUFFIX_MAX: usize = 11;

/// Why a base path cannot serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The path is empty.
    Empty,
    /// `<path>_<port>` would not fit in a Unix socket address.
    TooLong {
        /// The path's length in bytes.
        len: usize,
        /// The longest base that leaves room for any port.
        max: usize,
    },
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Empty => f.write_str("the Unix socket path is empty"),
            PathError::TooLong { len, max } => write!(
                f,
                "the Unix socket path is {len} bytes; with a port suffix it must fit in \
                 {MAX_SOCKET_PATH}, so at most {max}"
            ),
        }
    }
}

impl std::error::Error for PathError {}

/// The base path `<uds_path>` of the hybrid-vsock sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdsPath {
    base: PathBuf,
}

impl UdsPath {
    /// Checks that `<base>` and every `<base>_<port>` fit in a Unix socket address.
    pub fn new(base: impl Into<PathBuf>) -> Result<Self, PathError> {
        let base = base.into();
        let len = base.as_os_str().len();
        if len == 0 {
            return Err(PathError::Empty);
        }
        let max = MAX_SOCKET_PATH - PORT_SUFFIX_MAX;
        if len > max {
            return Err(PathError::TooLong { len, max });
        }
        Ok(UdsPath { base })
    }

    /// `<uds_path>`: where host clients connect.
    pub fn listener(&self) -> &Path {
        &self.base
    }

    /// `<uds_path>_<port>`: where a guest connection to `port` goes.
    pub fn port(&self, port: u32) -> PathBuf {
        let mut s = self.base.clone().into_os_string();
        s.push(format!("_{port}"));
        PathBuf::from(s)
    }

    /// `<uds_path>_seqpacket`: where host clients of seqpacket connections connect (no port
    /// number makes this name, and it fits the room left for one).
    pub fn seqpacket_listener(&self) -> PathBuf {
        let mut s = self.base.clone().into_os_string();
        s.push("_seqpacket");
        PathBuf::from(s)
    }
}

fn socket_type(ty: SocketType) -> Type {
    match ty {
        SocketType::Stream => Type::STREAM,
        SocketType::SeqPacket => Type::SEQPACKET,
    }
}

/// A non-blocking Unix socket of type `ty`, connected to `path`. A Unix connect completes at
/// once or fails at once (a full backlog is would-block; a listener of the other type is
/// `EPROTOTYPE`).
///
/// The std type carries a seqpacket socket too: reads, writes and shutdowns on it are a
/// message socket's, one message per call.
pub fn connect_unix(path: &Path, ty: SocketType) -> io::Result<UnixStream> {
    match ty {
        SocketType::Stream => Ok(UnixStream::from(mio::net::UnixStream::connect(path)?)),
        SocketType::SeqPacket => {
            let socket = Socket::new(Domain::UNIX, socket_type(ty).cloexec(), None)?;
            socket.set_nonblocking(true)?;
            socket.connect(&SockAddr::unix(path)?)?;
            Ok(UnixStream::from(socket))
        }
    }
}

/// The `SO_SNDBUF` value to set on a seqpacket socket so that it takes a message of
/// `message` bytes: Linux doubles the value it is given (up to twice `net.core.wmem_max`),
/// and refuses a message longer than the result less 32 bytes.
pub fn seqpacket_send_buffer(message: usize) -> usize {
    (message + 32).div_ceil(2)
}

/// The largest message a seqpacket socket takes once asked to take `message` bytes (see
/// [`seqpacket_send_buffer`]): less than `message` when `net.core.wmem_max` caps the send
/// buffer below what it needs.
///
/// # Errors
///
/// A socket pair cannot be made.
pub fn seqpacket_message_limit(message: usize) -> io::Result<usize> {
    let (a, _b) = Socket::pair(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
    a.set_send_buffer_size(seqpacket_send_buffer(message))?;
    Ok(a.send_buffer_size()?.saturating_sub(32))
}

/// Binds a Unix listening socket at `path` (blocking, as the standard library makes it). A
/// socket file left by a process that died is replaced; a path where something still listens
/// is refused with `AddrInUse`, and a path that holds anything but a socket with
/// `AlreadyExists`. The daemon binds its vhost-user socket with it too.
///
/// # Errors
///
/// The bind's error, with the path in the message.
pub fn bind_unix_listener(path: &Path) -> io::Result<UnixListener> {
    bind_listener(path, SocketType::Stream)
}

/// Binds a listening Unix socket of type `ty` at `path` (blocking), as [`bind_unix_listener`]
/// does for streams. The std type carries a seqpacket listener too: its `accept` gives
/// seqpacket sockets.
///
/// # Errors
///
/// The bind's error, with the path in the message.
pub fn bind_listener(path: &Path, ty: SocketType) -> io::Result<UnixListener> {
    let bind = || -> io::Result<UnixListener> {
        match ty {
            SocketType::Stream => UnixListener::bind(path),
            SocketType::SeqPacket => {
                let socket = Socket::new(Domain::UNIX, socket_type(ty).cloexec(), None)?;
                socket.bind(&SockAddr::unix(path)?)?;
                socket.listen(128)?;
                Ok(UnixListener::from(socket))
            }
        }
    };
    match bind() {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            // Only a refused connect means a file left behind. Anything else is a live socket:
            // a listener that answers or has a full backlog, or one of another type (which
            // refuses a connect of this type with EPROTOTYPE), which must not be unlinked
            // from under its owner. The probe never blocks.
            match connect_unix(path, ty) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                // Gone since the bind: the path is free.
                Err(e) if e.kind() == ErrorKind::NotFound => return bind(),
                _ => {
                    return Err(io::Error::new(
                        ErrorKind::AddrInUse,
                        format!("{} is in use by a live socket", path.display()),
                    ))
                }
            }
            // Never remove anything but a socket file.
            let is_socket = std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if !is_socket {
                return Err(io::Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            debug!(path = %path.display(), "replacing a stale socket file");
            std::fs::remove_file(path)?;
            bind()
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot bind {}: {e}", path.display()),
        )),
    }
}

/// A listening socket for host clients. Dropping it unlinks its path.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    path: PathBuf,
    socket_type: SocketType,
}

impl Listener {
    /// Binds a stream listener at `path`, non-blocking. A socket file left by a process that
    /// died is replaced; a path where something still listens is refused with `AddrInUse`.
    ///
    /// # Errors
    ///
    /// The bind's error, with the path in the message.
    pub fn bind(path: &Path) -> io::Result<Listener> {
        Self::bind_typed(path, SocketType::Stream)
    }

    /// Binds a listener of type `ty` at `path`, non-blocking, as [`bind`](Self::bind).
    ///
    /// # Errors
    ///
    /// The bind's error, with the path in the message.
    pub fn bind_typed(path: &Path, ty: SocketType) -> io::Result<Listener> {
        let socket = bind_listener(path, ty)?;
        socket.set_nonblocking(true)?;
        Ok(Listener {
            socket,
            path: path.to_path_buf(),
            socket_type: ty,
        })
    }

    /// The type of the sockets it accepts.
    pub fn socket_type(&self) -> SocketType {
        self.socket_type
    }

    /// The next pending client, non-blocking: `Ok(None)` when there is none.
    ///
    /// # Errors
    ///
    /// An accept error other than would-block (`EMFILE` and friends): the caller logs it and
    /// tries again later; the listener stays usable.
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        match self.socket.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bound path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != ErrorKind::NotFound {
                warn!(path = %self.path.display(), error = %e, "cannot unlink listener");
            }
        }
    }
}

/// How a runtime watches sockets: the one thing that differs between event loops.
pub trait Reactor {
    /// The runtime's handle of a watched socket.
    type Socket;

    /// Starts watching a new non-blocking socket of `conn` for `interest`: readable for a host
    /// client just accepted (whose `CONNECT` line is awaited), both for a socket connected to
    /// `<uds_path>_<port>`.
    ///
    /// # Errors
    ///
    /// Registration failed; the socket is dropped and the connection reset.
    fn register(
        &mut self,
        conn: ConnId,
        stream: UnixStream,
        interest: Interest,
    ) -> io::Result<Self::Socket>;

    /// The stream inside a handle, for reads, writes and shutdowns.
    fn stream<'a>(&self, socket: &'a Self::Socket) -> &'a UnixStream;

    /// Report these readiness events of `conn`'s socket from now on. A reactor may report
    /// more than asked (the engine ignores readiness it did not ask for), never less.
    ///
    /// # Errors
    ///
    /// The event source refused the change; the connection is reset.
    fn set_interest(
        &mut self,
        conn: ConnId,
        socket: &mut Self::Socket,
        interest: Interest,
    ) -> io::Result<()>;

    /// Watches `fd`, edge-triggered, for the guest's kicks of `queue`, in place of (and
    /// closing) any descriptor watched for it before; `None` stops watching. A kick only has
    /// to wake the loop: the descriptor is never read. See [`vsock_device::KickFd`].
    ///
    /// # Errors
    ///
    /// The reactor cannot watch kicks (the default) or refused the descriptor: the transport
    /// keeps waking the loop for that queue itself.
    fn watch_kick(&mut self, queue: u16, fd: Option<std::os::fd::OwnedFd>) -> io::Result<()> {
        let _ = (queue, fd);
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Stops watching `conn`'s socket; dropping the handle closes it.
    fn deregister(&mut self, conn: ConnId, socket: Self::Socket);
}

vsock_core::counters! {
/// Counters of the host side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostStats {
    /// Connects to `<uds_path>_<port>` that succeeded.
    pub connects: u64,
    /// Connects that failed (no such socket, refused, backlog full).
    pub connect_failures: u64,
    /// Sockets the runtime could not register (`EMFILE`, ...): reset.
    pub register_failures: u64,
    /// Host clients refused because the engine's table was full.
    pub refused_clients: u64,
    /// Sockets closed.
    pub closes: u64,
}
}

/// The host sockets of one device, in a table indexed by connection slot
/// ([`ConnId::index`], small and dense): the slot is also what runtimes register a socket
/// under, so an event leads straight back to its connection.
pub struct Host<R: Reactor> {
    path: UdsPath,
    sockets: Sockets<R::Socket>,
    reactor: R,
    stats: HostStats,
    /// The send buffer size each seqpacket socket is given; 0 for the kernel's default.
    seqpacket_send_buffer: usize,
    /// Where connects to other CIDs go, if the VM has siblings.
    siblings: Option<SiblingLink>,
    /// Sibling sockets closed since the driver last looked, with the sibling's CID: kept
    /// open until it knows whether the device dropped every connection (see
    /// [`take_parked`](Self::take_parked)).
    parked: Vec<(u64, UnixStream)>,
}

impl<R: Reactor> fmt::Debug for Host<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("path", &self.path)
            .field("sockets", &self.sockets.live)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<R: Reactor> Host<R> {
    /// A host side for `path`, watching sockets with `reactor`.
    pub fn new(path: UdsPath, reactor: R) -> Self {
        Host {
            path,
            sockets: Sockets::default(),
            reactor,
            stats: HostStats::default(),
            seqpacket_send_buffer: 0,
            siblings: None,
            parked: Vec::new(),
        }
    }

    /// The sibling sockets closed since the last call, with each one's sibling CID. Their
    /// connections are gone; the sockets are still open (they were duplicated before the
    /// reactor dropped them) so that the caller decides when the siblings see them close:
    /// at once for one connection's end, or after the siblings were told the device dropped
    /// every connection, so that their guests see a reset rather than an end of file.
    pub fn take_parked(&mut self) -> Vec<(u64, UnixStream)> {
        std::mem::take(&mut self.parked)
    }

    /// Parks every sibling socket still open, as if each connection had closed: for a
    /// driver about to go away, which hands them to the siblings with its departure notice.
    pub fn park_siblings(&mut self) {
        for slot in 0..self.sockets.slots.len() {
            let Some((conn, _, peer_cid)) = &self.sockets.slots[slot] else {
                continue;
            };
            if *peer_cid == HOST_CID {
                continue;
            }
            let conn = *conn;
            if let Some((socket, peer_cid)) = self.sockets.remove(conn) {
                if let Ok(dup) = self.reactor.stream(&socket).try_clone() {
                    self.parked.push((peer_cid, dup));
                }
                self.reactor.deregister(conn, socket);
            }
        }
    }

    /// Routes the guest's connects to other CIDs through `link` (`None`: every such connect
    /// fails at once, and the guest gets an RST).
    pub fn set_siblings(&mut self, link: Option<SiblingLink>) {
        self.siblings = link;
    }

    /// Takes the socket of a connection a sibling's guest opened, which
    /// [`Engine::handle_sibling_accept`] made `conn`: it is watched from now on. Returns
    /// whether it could be; if not, the connection is reset.
    pub fn adopt_sibling(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        conn: ConnId,
        peer_cid: u64,
        socket: UnixStream,
    ) -> bool {
        if engine.conn_socket_type(conn) == Some(SocketType::SeqPacket) {
            self.size_send_buffer(&socket);
        }
        let interest = Interest {
            readable: true,
            writable: false,
        };
        match self.reactor.register(conn, socket, interest) {
            Ok(socket) => {
                self.sockets.insert(conn, socket, peer_cid);
                true
            }
            Err(e) => {
                warn!(%conn, error = %e, "cannot watch a sibling's socket");
                self.stats.register_failures += 1;
                let _ =
                    engine.handle_host_event(now, conn, HostEvent::Error(SocketError::from(&e)));
                false
            }
        }
    }

    /// The base path.
    pub fn path(&self) -> &UdsPath {
        &self.path
    }

    /// Counters.
    pub fn stats(&self) -> &HostStats {
        &self.stats
    }

    /// The reactor.
    pub fn reactor(&self) -> &R {
        &self.reactor
    }

    /// The reactor.
    pub fn reactor_mut(&mut self) -> &mut R {
        &mut self.reactor
    }

    /// The socket of a live connection.
    pub fn socket(&self, conn: ConnId) -> Option<&R::Socket> {
        self.sockets.get(conn)
    }

    /// The live connection whose socket sits in table slot `slot`, for a runtime turning a
    /// readiness event back into its connection.
    pub fn conn_at(&self, slot: u32) -> Option<ConnId> {
        self.sockets.conn_at(slot)
    }

    /// Live sockets.
    pub fn len(&self) -> usize {
        self.sockets.live
    }

    /// Whether no socket is live.
    pub fn is_empty(&self) -> bool {
        self.sockets.live == 0
    }

    /// Takes a client accepted on the [`Listener`]: the engine gets it, or it is closed at once
    /// when the engine's table is full. Returns its connection.
    pub fn adopt_client(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        stream: UnixStream,
    ) -> Option<ConnId> {
        self.adopt(now, engine, stream, SocketType::Stream)
    }

    /// Takes a client accepted on the seqpacket [`Listener`], as
    /// [`adopt_client`](Self::adopt_client) does a stream client.
    pub fn adopt_seqpacket_client(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        socket: UnixStream,
    ) -> Option<ConnId> {
        self.adopt(now, engine, socket, SocketType::SeqPacket)
    }

    fn adopt(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        stream: UnixStream,
        ty: SocketType,
    ) -> Option<ConnId> {
        let accepted = match ty {
            SocketType::Stream => engine.handle_accept(now),
            SocketType::SeqPacket => engine.handle_seqpacket_accept(now),
        };
        let Ok(conn) = accepted else {
            self.stats.refused_clients += 1;
            return None;
        };
        if ty == SocketType::SeqPacket {
            self.size_send_buffer(&stream);
        }
        let interest = Interest {
            readable: true,
            writable: false,
        };
        match self.reactor.register(conn, stream, interest) {
            Ok(socket) => {
                self.sockets.insert(conn, socket, HOST_CID);
                Some(conn)
            }
            Err(e) => {
                warn!(%conn, error = %e, "cannot watch a host client");
                self.stats.register_failures += 1;
                let _ =
                    engine.handle_host_event(now, conn, HostEvent::Error(SocketError::from(&e)));
                None
            }
        }
    }

    fn stream(&self, conn: ConnId) -> Option<&UnixStream> {
        self.sockets.get(conn).map(|s| self.reactor.stream(s))
    }

    /// Gives a seqpacket socket the send buffer a guest message of the whole connection
    /// buffer needs (Linux refuses a message longer than the send buffer less 32 bytes). The
    /// driver checked at start that the kernel grants it; a refusal here leaves the default,
    /// and a message too large for it is reset and counted (`seqpacket_host_emsgsize`).
    fn size_send_buffer(&self, socket: &UnixStream) {
        if self.seqpacket_send_buffer > 0 {
            let _ = socket2::SockRef::from(socket).set_send_buffer_size(self.seqpacket_send_buffer);
        }
    }

    /// Sets the send buffer size each seqpacket socket is given (see
    /// [`seqpacket_send_buffer`]); 0 leaves the kernel's default.
    pub fn set_seqpacket_send_buffer(&mut self, bytes: usize) {
        self.seqpacket_send_buffer = bytes;
    }

    /// Connects `conn` to `(cid, port)`: for the host's CID, a non-blocking Unix socket to
    /// `<uds_path>_<port>` (a Unix socket connects at once or fails at once: a full backlog
    /// is would-block, which the guest sees as a refusal; a service of the other socket type
    /// is EPROTOTYPE, a refusal too); for a sibling VM's, a socket pair whose other end waits
    /// in its inbox, or an immediate failure.
    fn connect(
        &mut self,
        now: Instant,
        engine: &mut Engine,
        conn: ConnId,
        cid: u64,
        port: u32,
        ty: SocketType,
    ) {
        let connected = if cid == HOST_CID {
            connect_unix(&self.path.port(port), ty)
        } else {
            let from_port = engine
                .conn_ports(conn)
                .map_or(0, |(guest_port, _)| guest_port);
            match &self.siblings {
                Some(link) => link.connect(cid, from_port, port, ty),
                // EHOSTUNREACH: this VM has no siblings.
                None => Err(io::Error::from_raw_os_error(113)),
            }
        };
        let event = match connected {
            // Writable says when the connect completes.
            Ok(stream) => {
                if ty == SocketType::SeqPacket {
                    self.size_send_buffer(&stream);
                }
                let interest = Interest {
                    readable: true,
                    writable: true,
                };
                self.register_connected(conn, stream, interest, cid)
            }
            Err(e) => {
                debug!(%conn, cid, port, error = %e, "connect failed");
                self.stats.connect_failures += 1;
                HostEvent::ConnectFailed(SocketError::from(&e))
            }
        };
        let _ = engine.handle_host_event(now, conn, event);
    }

    fn register_connected(
        &mut self,
        conn: ConnId,
        stream: UnixStream,
        interest: Interest,
        peer_cid: u64,
    ) -> HostEvent {
        match self.reactor.register(conn, stream, interest) {
            Ok(socket) => {
                self.sockets.insert(conn, socket, peer_cid);
                self.stats.connects += 1;
                HostEvent::Connected
            }
            Err(e) => {
                warn!(%conn, error = %e, "cannot watch a connected socket");
                self.stats.register_failures += 1;
                HostEvent::ConnectFailed(SocketError::from(&e))
            }
        }
    }

    fn read_line(&mut self, now: Instant, engine: &mut Engine, conn: ConnId, max: usize) {
        let mut buf = [0u8; CONNECT_LINE_MAX + 1];
        // A seqpacket client's line is one message, read whole: one byte more than the line
        // may hold shows a message too long (the kernel drops what a read does not take).
        let seqpacket = engine.conn_socket_type(conn) == Some(SocketType::SeqPacket);
        let max = if seqpacket { max + 1 } else { max }.min(buf.len());
        let Some(mut stream) = self.stream(conn) else {
            return;
        };
        let mut result = stream.read(&mut buf[..max]);
        if seqpacket && matches!(result, Ok(0)) {
            // A 0 is an empty message or end of file, and a non-blocking seqpacket read can
            // report end of file while the line sent just before the shutdown is queued (the
            // kernel looks at the queue, then at the shutdown). Read once more: a shutdown
            // seen means all sent before it is queued. An empty message in place of the line,
            // with nothing behind it yet, is taken as the client giving up.
            result = match stream.read(&mut buf[..max]) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(0),
                other => other,
            };
        }
        let read = match &result {
            Ok(0) => LineRead::Eof,
            Ok(n) => LineRead::Data(&buf[..*n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                LineRead::WouldBlock
            }
            Err(e) => LineRead::Error(SocketError::from(e)),
        };
        let _ = engine.handle_connect_line(now, conn, read);
    }
}

impl<R: Reactor> HostSockets for Host<R>
where
    R::Socket: AsFd,
{
    fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
        self.sockets.get(conn).map(|s| s.as_fd())
    }

    fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action) {
        // Everything logged while carrying out an action names its connection.
        let _span = tracing::trace_span!("vsock_conn", conn = %action.conn()).entered();
        match action {
            Action::Connect {
                conn,
                cid,
                port,
                socket_type,
            } => self.connect(now, engine, conn, cid, port, socket_type),
            Action::ReadConnectLine { conn, max } => self.read_line(now, engine, conn, max),
            // The device writes to sockets itself (`VsockDevice::serve`).
            Action::Flush { .. } => {}
            Action::Shutdown { conn, direction } => {
                if let Some(stream) = self.stream(conn) {
                    let how = match direction {
                        Direction::Read => Shutdown::Read,
                        Direction::Write => Shutdown::Write,
                    };
                    // A peer that is already gone makes this fail; nothing is lost by it.
                    let _ = stream.shutdown(how);
                }
            }
            Action::Interest { conn, interest } => {
                if let Some(socket) = self.sockets.get_mut(conn) {
                    if let Err(e) = self.reactor.set_interest(conn, socket, interest) {
                        // Without the readiness it waits for the connection would stall.
                        warn!(%conn, error = %e, "cannot change what a socket is watched for");
                        self.stats.register_failures += 1;
                        let _ = engine.handle_host_event(
                            now,
                            conn,
                            HostEvent::Error(SocketError::from(&e)),
                        );
                    }
                }
            }
            Action::Close { conn } => {
                if let Some((socket, peer_cid)) = self.sockets.remove(conn) {
                    if peer_cid != HOST_CID {
                        // Kept open a moment longer: see `take_parked`.
                        match self.reactor.stream(&socket).try_clone() {
                            Ok(dup) => self.parked.push((peer_cid, dup)),
                            Err(e) => debug!(%conn, error = %e, "closing a sibling socket at once"),
                        }
                    }
                    self.reactor.deregister(conn, socket);
                    self.stats.closes += 1;
                }
            }
        }
    }
}

/// Sockets by connection slot. A slot holds the generation's handle too, so a stale handle
/// never reaches a newer connection's socket.
struct Sockets<S> {
    /// Each socket with its connection and the CID at its far end (the host's, or a
    /// sibling's).
    slots: Vec<Option<(ConnId, S, u64)>>,
    live: usize,
}

impl<S> Default for Sockets<S> {
    fn default() -> Self {
        Sockets {
            slots: Vec::new(),
            live: 0,
        }
    }
}

impl<S> Sockets<S> {
    fn get(&self, conn: ConnId) -> Option<&S> {
        match self.slots.get(conn.index() as usize) {
            Some(Some((c, s, _))) if *c == conn => Some(s),
            _ => None,
        }
    }

    fn get_mut(&mut self, conn: ConnId) -> Option<&mut S> {
        match self.slots.get_mut(conn.index() as usize) {
            Some(Some((c, s, _))) if *c == conn => Some(s),
            _ => None,
        }
    }

    fn conn_at(&self, slot: u32) -> Option<ConnId> {
        match self.slots.get(slot as usize) {
            Some(Some((c, _, _))) => Some(*c),
            _ => None,
        }
    }

    /// Stores `conn`'s socket. The engine reuses a slot only once its connection's socket was
    /// closed, so the slot is free; a socket still there (a caller that skipped a close) is
    /// dropped, which closes it.
    fn insert(&mut self, conn: ConnId, socket: S, peer_cid: u64) {
        let i = conn.index() as usize;
        if i >= self.slots.len() {
            self.slots.resize_with(i + 1, || None);
        }
        if self.slots[i].replace((conn, socket, peer_cid)).is_none() {
            self.live += 1;
        }
    }

    fn remove(&mut self, conn: ConnId) -> Option<(S, u64)> {
        let slot = self.slots.get_mut(conn.index() as usize)?;
        if !matches!(slot, Some((c, _, _)) if *c == conn) {
            return None;
        }
        self.live -= 1;
        slot.take().map(|(_, s, cid)| (s, cid))
    }
}
