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
