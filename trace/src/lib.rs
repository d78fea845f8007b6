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
//!
//! # Recording and replaying
//!
//! ```
//! use vsock_core::{Action, Config, Engine, Instant, LineRead};
//! use vsock_trace::{replay, TraceWriter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let path = std::env::temp_dir().join(format!("doc-{}.pcapng", std::process::id()));
//! let mut engine = Engine::new(Config::new(3), Instant::ZERO)?;
//! // Every payload kept whole; the trace shows wall-clock dates from this second on.
//! // Refused (an error) while the engine holds connections: see `Engine::set_recorder`.
//! engine.set_recorder(Some(Box::new(TraceWriter::create(&path, usize::MAX, 1_700_000_000)?)))?;
//!
//! // A host client connects and sends its line; the engine answers with actions.
//! let now = Instant::from_millis(1);
//! let conn = engine.handle_accept(now)?;
//! engine.handle_host_event(now, conn, vsock_core::HostEvent::Readable)?;
//! while let Some(action) = engine.poll_action() {
//!     if let Action::ReadConnectLine { conn, .. } = action {
//!         engine.handle_connect_line(now, conn, LineRead::Data(b"CONNECT 5000\n"))?;
//!     }
//! }
//! let _ = engine.poll_rx(now, 4096).map(|grant| match grant {
//!     vsock_core::RxGrant::Packet(p) => {
//!         let _ = p.send();
//!     }
//!     // Reads and seqpacket grants need a socket; this engine has none yet.
//!     _ => {}
//! });
//!
//! // Detaching the recorder (or dropping the engine) finishes the file.
//! drop(engine.set_recorder(None));
//! let replayed = replay(&std::fs::read(&path)?)?;
//! assert_eq!(replayed.to_guest, 1); // the REQUEST to the guest's port 5000
//! # std::fs::remove_file(&path)?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod event;
pub mod pcapng;
pub mod replay;
pub mod summary;
pub mod vsockmon;
mod writer;

pub use replay::{replay, replay_within, Divergence, ReplayError, Replayed, DEFAULT_MEMORY_BUDGET};
pub use writer::{TraceWriter, EVENTS, EVENTS_DESCRIPTION, PACKETS};
