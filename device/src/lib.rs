//! The virtio-vsock device model: `vsock-core` bound to virtqueues in guest memory.
//!
//! This crate will hold the device (type 19): feature negotiation, the config space, the rx, tx
//! and event queues on the rust-vmm crates `virtio-queue` and `vm-memory`, reset, and
//! save/restore. It lends guest memory to the runtimes so that bytes move between a host socket
//! and the guest without a bounce buffer.
