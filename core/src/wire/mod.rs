//! Wire formats, with no protocol logic.
//!
//! - [`Header`]: the 44-byte `virtio_vsock_hdr` exactly as it lies in guest memory, and the
//!   constants of the virtio-vsock device (section 5.10 of the virtio specification).
//! - [`Packet`]: a header that passed validation. Unknown types and operations, an oversize
//!   `len` and reserved CID bits are rejected with a named [`HeaderError`] before any state
//!   machine sees them.
//! - [`ConnectParser`] and [`OkLine`]: the hybrid-vsock host control protocol
//!   (`CONNECT <port>\n` from a host client, `OK <port>\n` in reply).

mod control;
mod header;

pub use control::{ConnectError, ConnectParser, ConnectStatus, OkLine, CONNECT_LINE_MAX};
pub use header::*;
