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
