//! A vhost-user backend for the hybrid vsock device, so that any vhost-user frontend (QEMU's
//! `vhost-user-vsock-pci`, for one) can give its guest a vsock device whose connections reach
//! host programs over Unix sockets.
//!
//! `vhost-user-backend` runs the vhost-user protocol and watches the queue kicks on its own
//! threads. Its callbacks ([`VsockBackend`]) only record what changed in [`Shared`] and wake
//! the runtime; the runtime (mio, tokio or smol, see [`RuntimeKind`]) serves the device
//! through [`VhostTransport`], with the same `vsock-mio` driver an embedding VMM uses. The
//! runtime and the host listener live as long as the daemon; frontends come and go.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod backend;
mod runtime;
pub mod sandbox;
pub mod service;
pub mod stats;
pub mod vms;

pub use backend::{Memory, MemoryAtomic, Shared, VhostTransport, VsockBackend};
pub use runtime::{start, Report, Running, RuntimeKind};
