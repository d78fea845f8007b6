//! Recorded vsock traces: every packet between guest and device, in a pcapng file that
//! Wireshark and tshark dissect as vsock.
//!
//! - [`pcapng`]: the container (one section, interfaces, packets with nanosecond timestamps),
//!   a writer into any `io::Write` and a reader over a file in memory.
//! - [`vsockmon`]: interface 0, the packets, in Linux's `vsockmon` layout (link type 271).
//! - [`event`]: interface 1, the host side's inputs and the engine's socket actions, in an
//!   encoding of ours (link type 147, `LINKTYPE_USER0`).
//! - [`TraceWriter`]: a `vsock_core::record::Recorder` that writes a trace as the engine runs.
//!
//! The format is described in `docs/trace-format.md`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod event;
pub mod pcapng;
pub mod replay;
pub mod vsockmon;
mod writer;

pub use replay::{replay, Divergence, ReplayError, Replayed};
pub use writer::{TraceWriter, EVENTS, EVENTS_DESCRIPTION, PACKETS};
