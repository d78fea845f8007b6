//! Recording a session at the engine boundary.
//!
//! An [`Engine`](crate::Engine) with a [`Recorder`] attached reports every input it is given
//! and every output it gives, in order, with the `now` of each. Nothing reaches the engine or
//! leaves it another way, so a recording is complete by construction: replaying its inputs
//! through a fresh engine built with the same configuration must reproduce its outputs.
//!
//! What is reported:
//!
//! - [`Recorder::packet`]: each packet between guest and device. A packet from the guest is
//!   reported once its fate is known (at [`TxData::complete`](crate::TxData::complete), or
//!   at once if it carries no payload for a socket), followed by [`Event::TxWritten`] when a
//!   socket was offered its payload. A packet to the guest is reported when it is committed.
//! - [`Recorder::event`]: the host side's inputs (a client accepted, its `CONNECT` bytes,
//!   socket events, write results, timeouts, the embedder's commands), the calls that take
//!   packets for the guest ([`Event::PollRx`], [`Event::RxRead`]), and the socket actions.
//!
//! Calls that cannot change the engine's state are not reported: the getters,
//! [`poll_timeout`](crate::Engine::poll_timeout), [`host_bytes`](crate::Engine::host_bytes),
//! and polls that find nothing to do and no time passed.
//!
//! # Attaching mid-session
//!
//! A recorder may be attached at any moment the engine holds no connection and owes the
//! guest no RST: [`Event::Start`] then carries, besides the configuration, the little state
//! such an engine still has that decides its outputs (a [`Snapshot`]: the generation the
//! next connection gets, and the next host port; the clock is the record's time), and
//! [`Engine::resume`](crate::Engine::resume) builds a fresh engine in that state. While a
//! connection is in the table (its buffers, credit, phase, deadlines, socket) or an RST is
//! owed, no record could tell a fresh engine enough, so
//! [`Engine::set_recorder`](crate::Engine::set_recorder) refuses with an [`AttachError`].

use crate::conn::ConnId;
use crate::error::{SiblingRefusal, TableFull};
use crate::io::{Action, GuestBytes, HostEvent, Io, LineRead, Probe, SocketTypes};
use crate::time::Instant;
use crate::wire::{Header, SocketType};
use crate::{Config, ConfigError};

use std::fmt;

/// Receives what crosses the engine boundary. Attached with
/// [`Engine::set_recorder`](crate::Engine::set_recorder).
///
/// The engine calls it synchronously and in order; it must not fail (a recorder that cannot
/// write keeps its error for the embedder to collect).
pub trait Recorder: Send {
    /// A packet between guest and device. `payload` gives the payload's bytes: `available` of
    /// them can be read (fewer than `header.len` when the guest's buffer held fewer, or for a
    /// packet whose payload the engine never looked at, which reports 0).
    fn packet(
        &mut self,
        now: Instant,
        to_guest: bool,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    );

    /// An input or output of the host side. `ports` are the connection's `(guest, host)`
    /// ports when the event names a connection that has them.
    fn event(&mut self, now: Instant, ports: Option<(u32, u32)>, event: &Event<'_>);
}

/// What [`Engine::poll_rx`](crate::Engine::poll_rx) granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Nothing to send.
    Nothing,
    /// A packet whose bytes the engine holds.
    Packet,
    /// A read from the connection's socket.
    Read(ConnId),
    /// A peek at the size of the next message on the connection's seqpacket socket.
    Probe(ConnId),
    /// A read of the next message on the connection's seqpacket socket, into as many rx
    /// buffers as it takes (the first is the one offered).
    Message(ConnId),
}

/// What became of the payload of a packet from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// The result of the direct write to the socket (`Io::Done(0)` when none was tried); the
    /// engine kept the rest.
    Written(Io),
    /// As `Written`, but the guest memory holding the rest could not be read: the connection
    /// was reset.
    Unreadable(Io),
    /// The payload was abandoned (the connection is reset).
    Abandoned,
}

/// One event at the engine boundary, other than a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The recorder was attached to an engine with this configuration, in this state (a
    /// fresh engine's, unless it was attached mid-session). Always first.
    Start(&'a Config, Snapshot),
    /// The outcome of the payload of the packet from the guest reported just before.
    TxWritten(TxOutcome),
    /// [`Engine::handle_accept`](crate::Engine::handle_accept) (a client of the stream
    /// listener) or [`Engine::handle_seqpacket_accept`](crate::Engine::handle_seqpacket_accept),
    /// and its result.
    Accept(SocketType, Result<ConnId, TableFull>),
    /// [`Engine::set_socket_types`](crate::Engine::set_socket_types).
    SocketTypes(SocketTypes),
    /// [`Engine::handle_sibling_accept`](crate::Engine::handle_sibling_accept), and its
    /// result.
    SiblingAccept {
        /// The sibling guest's CID.
        peer_cid: u64,
        /// The sibling guest's port.
        peer_port: u32,
        /// This guest's port it connects to.
        port: u32,
        /// The socket type.
        socket_type: SocketType,
        /// The connection, or why none.
        result: Result<ConnId, SiblingRefusal>,
    },
    /// [`Engine::reset_peer`](crate::Engine::reset_peer).
    ResetPeer(u64),
    /// [`Engine::handle_connect_line`](crate::Engine::handle_connect_line).
    ConnectLine(ConnId, LineRead<'a>),
    /// [`Engine::handle_host_event`](crate::Engine::handle_host_event).
    Host(ConnId, HostEvent),
    /// [`Engine::handle_host_write`](crate::Engine::handle_host_write).
    HostWrite(ConnId, Io),
    /// [`Engine::handle_timeout`](crate::Engine::handle_timeout).
    Timeout,
    /// [`Engine::reset_connection`](crate::Engine::reset_connection).
    ResetConnection(ConnId),
    /// [`Engine::abort_all`](crate::Engine::abort_all).
    AbortAll,
    /// [`Engine::reset`](crate::Engine::reset).
    Reset,
    /// [`Engine::stop`](crate::Engine::stop).
    Stop,
    /// [`Engine::poll_rx`](crate::Engine::poll_rx) with `room` bytes, and what it granted.
    /// A granted packet that is committed follows as a packet; one dropped, as nothing.
    PollRx {
        /// The room the caller offered.
        room: usize,
        /// The grant.
        grant: Grant,
    },
    /// [`RxRead::complete`](crate::RxRead::complete) with the read's result; the packet it
    /// makes, if any, follows with the bytes read as its payload.
    RxRead(ConnId, Io),
    /// [`RxProbe::complete`](crate::RxProbe::complete) with what the peek found; the packet
    /// it makes (end of file), if any, follows.
    Probe(ConnId, Probe),
    /// [`RxMessage::complete`](crate::RxMessage::complete) with the read's result, the
    /// payload room of each rx buffer used, and the bytes read into the stage
    /// ([`RxMessage::stage`](crate::RxMessage::stage); empty if none); the packets it makes
    /// follow, one per buffer.
    RxMessage(ConnId, Io, &'a [usize], &'a [u8]),
    /// [`Engine::poll_action`](crate::Engine::poll_action) returned this action (`None`:
    /// nothing, though it had connections to look at).
    Action(Option<Action>),
}

impl Event<'_> {
    /// The connection the event names, if any.
    pub fn conn(&self) -> Option<ConnId> {
        match *self {
            Event::Accept(_, Ok(conn))
            | Event::SiblingAccept {
                result: Ok(conn), ..
            }
            | Event::ConnectLine(conn, _)
            | Event::Probe(conn, _)
            | Event::RxMessage(conn, ..)
            | Event::PollRx {
                grant: Grant::Probe(conn) | Grant::Message(conn),
                ..
            }
            | Event::Host(conn, _)
            | Event::HostWrite(conn, _)
            | Event::ResetConnection(conn)
            | Event::RxRead(conn, _)
            | Event::PollRx {
                grant: Grant::Read(conn),
                ..
            } => Some(conn),
            Event::Action(Some(action)) => Some(action.conn()),
            _ => None,
        }
    }
}

/// What an engine that holds no connection and owes no RST keeps of its past that decides
/// its outputs, besides its configuration and clock. Told to a recorder in
/// [`Event::Start`]; [`Engine::resume`](crate::Engine::resume) builds an engine in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Snapshot {
    /// The generation the next connection gets (never 0).
    pub next_generation: u32,
    /// The host port the next host client's connection gets (from `host_port_first` up to
    /// `u32::MAX - 1`).
    pub next_host_port: u32,
}

impl Snapshot {
    /// The state of an engine just built with `config`.
    pub fn fresh(config: &Config) -> Snapshot {
        Snapshot {
            next_generation: 1,
            next_host_port: config.host_port_first,
        }
    }

    /// Whether an engine with `config` can be in this state.
    pub fn fits(&self, config: &Config) -> bool {
        self.next_generation != 0
            && self.next_host_port >= config.host_port_first
            && self.next_host_port < u32::MAX
    }
}

/// Why [`Engine::set_recorder`](crate::Engine::set_recorder) refused a recorder: the engine
/// holds state no record can hand a fresh engine, so its trace could not be replayed. Attach
/// before the first connection, or once the table is empty and every RST sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachError {
    /// This many connections are in the table (counting those whose close is still owed).
    Connections(usize),
    /// This many RSTs are owed to the guest.
    PendingResets(usize),
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::Connections(n) => write!(
                f,
                "cannot record mid-session: {n} connections are open, and a trace cannot \
                 carry their state"
            ),
            AttachError::PendingResets(n) => write!(
                f,
                "cannot record mid-session: {n} RSTs are owed to the guest, and a trace \
                 cannot carry them"
            ),
        }
    }
}

impl std::error::Error for AttachError {}

/// Why [`Engine::resume`](crate::Engine::resume) refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeError {
    /// The configuration is refused, as by [`Engine::new`](crate::Engine::new).
    Config(ConfigError),
    /// No engine with the configuration can be in that state.
    Snapshot(Snapshot),
}

impl fmt::Display for ResumeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResumeError::Config(e) => write!(f, "{e}"),
            ResumeError::Snapshot(s) => write!(
                f,
                "no engine with this configuration has next generation {} and next host \
                 port {}",
                s.next_generation, s.next_host_port
            ),
        }
    }
}

impl std::error::Error for ResumeError {}
