//! Drives the `vsock-core` engine from a tokio runtime.
//!
//! This crate will hold the adapter for asynchronous virtual machine monitors built on tokio:
//! one future per device, over `AsyncFd` and `UnixStream`, with a clean shutdown that resets the
//! guest's connections and closes the host sockets. It contains no protocol logic; every
//! decision is made by `vsock-core`.
#![forbid(unsafe_code)]
