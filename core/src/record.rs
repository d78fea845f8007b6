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

use crate::conn::ConnId;
use crate::engine::TableFull;
use crate::io::{Action, GuestBytes, HostEvent, Io, LineRead};
use crate::time::Instant;
use crate::wire::Header;
use crate::Config;

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
    /// The recorder was attached to an engine with this configuration. Always first.
    Start(&'a Config),
    /// The outcome of the payload of the packet from the guest reported just before.
    TxWritten(TxOutcome),
    /// [`Engine::handle_accept`](crate::Engine::handle_accept) and its result.
    Accept(Result<ConnId, TableFull>),
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
    /// [`Engine::poll_action`](crate::Engine::poll_action) returned this action (`None`:
    /// nothing, though it had connections to look at).
    Action(Option<Action>),
}

impl Event<'_> {
    /// The connection the event names, if any.
    pub fn conn(&self) -> Option<ConnId> {
        match *self {
            Event::Accept(Ok(conn))
            | Event::ConnectLine(conn, _)
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
