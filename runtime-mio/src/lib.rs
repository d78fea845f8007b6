//! Drives the `vsock-core` engine from a [mio](https://docs.rs/mio) event loop.
//!
//! This crate will hold the adapter for synchronous virtual machine monitors: an embeddable
//! driver that registers the host listener, the connection sockets, the queue notifiers and a
//! timer in the caller's `mio::Registry`, translates readiness into engine inputs and engine
//! actions into system calls, and a ready-made loop for a thread of its own. It contains no
//! protocol logic; every decision is made by `vsock-core`.
#![forbid(unsafe_code)]
