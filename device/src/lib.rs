//! The virtio-vsock device model: `vsock-core`'s engine bound to virtqueues in guest memory.
//!
//! [`VsockDevice`] is device type 19 with three queues (rx 0, tx 1, event 2), on the rust-vmm
//! crates `virtio-queue` (split rings) and `vm-memory`. It knows descriptor chains and guest
//! memory, not sockets or executors: a runtime owns the host sockets, implements
//! [`HostSockets`], and calls [`VsockDevice::serve`] whenever it is woken.
//!
//! Bytes move between sockets and guest memory without a bounce buffer: a tx payload is written
//! to its socket with one `writev` over the chain's pieces (only what the socket refuses is
//! copied, into the engine's bounded buffer), and an rx buffer is filled with one `readv`,
//! its header written last.
//!
//! The device owns every data transfer on a connection's socket: those two, and the flush of
//! what the engine buffered (the `OK` line, guest bytes a socket refused before), each a
//! `sendmsg`/`recvmsg` with `MSG_DONTWAIT` (and `MSG_NOSIGNAL` for writes). The runtime's
//! [`HostSockets`] owns the socket's life: connect, the `CONNECT` line, shutdown, interest,
//! close.
//!
//! Guest memory is hostile: every chain is returned to the used ring however malformed, every
//! malformed chain is counted in [`DeviceStats`], and no input from guest memory panics the
//! device or stops it serving.
//!
//! # Example
//!
//! A guest connects to port 1234 and sends five bytes; a socket pair stands in for the host
//! service at `<uds_path>_1234`. The guest's driver side here is `testing::Driver`, from the
//! `test-utils` feature; a VMM has the real guest's rings instead. `vsock-host`'s `Host` is the
//! real [`HostSockets`]; this one only connects.
//!
//! ```
//! use std::io::Read;
//! use std::os::fd::{AsFd, BorrowedFd};
//! use std::os::unix::net::UnixStream;
//! use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID};
//! use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant};
//! use vsock_device::testing::{parse_rx, Driver, Layout};
//! use vsock_device::{HostSockets, Queues, VsockDevice};
//!
//! struct OneSocket {
//!     socket: UnixStream,
//!     conn: Option<ConnId>,
//! }
//!
//! impl HostSockets for OneSocket {
//!     fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
//!         (self.conn == Some(conn)).then(|| self.socket.as_fd())
//!     }
//!     fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action) {
//!         // Reads of the `CONNECT` line, shutdowns, interest and closes need nothing here.
//!         if let Action::Connect { conn, .. } = action {
//!             self.conn = Some(conn);
//!             engine.handle_host_event(now, conn, HostEvent::Connected).unwrap();
//!         }
//!     }
//! }
//!
//! fn packet(op: Op, len: u32) -> Header {
//!     Packet {
//!         src_cid: 3, dst_cid: HOST_CID, src_port: 50_000, dst_port: 1234, len,
//!         socket_type: SocketType::Stream, op, flags: 0, buf_alloc: 65_536, fwd_cnt: 0,
//!     }
//!     .to_header()
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (socket, mut service) = UnixStream::pair()?;
//! let mut host = OneSocket { socket, conn: None };
//! let mut device = VsockDevice::new(Config::new(3), Instant::ZERO)?;
//!
//! // The driver negotiates features, sets up the three rings and activates the device.
//! let mut guest = Driver::new();
//! device.ack_features(device.features())?;
//! let mut queues = guest.device_queues(false);
//! let [rx, tx, event] = &mut queues;
//! device.activate(Queues { rx, tx, event });
//!
//! // The guest posts an rx buffer and connects; woken by its kick, the device serves.
//! guest.post_rx(4096, &Layout::Single);
//! guest.send(&packet(Op::Request, 0), &[], &Layout::Single);
//! let now = Instant::from_millis(1);
//! let served = device.serve(now, &guest.mem, Queues { rx, tx, event }, &mut host)?;
//! assert!(served.notify_rx);
//! let (response, _) = parse_rx(&guest.take_used(0)[0]);
//! assert_eq!(response.op.get(), Op::Response.to_u16());
//!
//! // Its payload goes from guest memory straight to the socket.
//! guest.send(&packet(Op::Rw, 5), b"hello", &Layout::HeaderThenData);
//! let now = Instant::from_millis(2);
//! let _ = device.serve(now, &guest.mem, Queues { rx, tx, event }, &mut host)?;
//! let mut hello = [0; 5];
//! service.read_exact(&mut hello)?;
//! assert_eq!(&hello, b"hello");
//! // Every tx buffer goes back to the guest.
//! assert_eq!(guest.take_used(1).len(), 2);
//! # Ok(())
//! # }
//! ```

mod device;
mod memory;
#[cfg(feature = "test-utils")]
pub mod testing;
mod transport;

pub use device::{
    DeviceError, DeviceState, DeviceStats, FeatureError, HostSockets, Queues, Served, VsockDevice,
};
pub use transport::{DeviceRequest, KickFd, Transport};
pub use virtio_queue;
pub use vm_memory;
pub use vsock_core;
