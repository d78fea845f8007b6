//! A sans-IO virtio-vsock engine for hybrid vsock.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod buf;
mod config;
mod conn;
mod engine;
mod io;
mod stats;
pub mod time;
pub mod wire;

pub use config::{Config, ConfigError};
pub use conn::{ConnId, ConnState, Origin};
pub use engine::{ConnError, Engine, RxGrant, RxPacket, RxRead, TableFull, Tx, TxData};
pub use io::{
    Action, Direction, GuestBytes, HostEvent, Interest, Io, LineRead, MemoryFault, SocketError,
};
pub use stats::{ConnStats, Stats};
pub use time::Instant;
