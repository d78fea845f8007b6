//! The small errors of misusing the engine.

use std::fmt;

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

/// Why [`Engine::handle_sibling_accept`](crate::Engine::handle_sibling_accept) refused a
/// connection from a sibling VM. The caller closes the sibling's socket, which the sibling's
/// engine takes as a refusal (its guest gets an RST).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiblingRefusal {
    /// The connection table is full.
    TableFull,
    /// The guest's driver has not negotiated the connection's socket type.
    SocketType,
    /// The address is not one a sibling can have: the host's CID, the guest's own, or a port
    /// of `u32::MAX` (`VMADDR_PORT_ANY`).
    Address,
    /// A live connection has the same address.
    InUse,
}

impl fmt::Display for SiblingRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SiblingRefusal::TableFull => "connection table full",
            SiblingRefusal::SocketType => "socket type not negotiated by the guest",
            SiblingRefusal::Address => "not a sibling's address",
            SiblingRefusal::InUse => "a connection with that address exists",
        })
    }
}

impl std::error::Error for SiblingRefusal {}
