//! Drives the `vsock-core` engine from smol (`async-io`).
//!
//! This crate will hold the adapter for asynchronous virtual machine monitors built on smol: one
//! future per device over `async_io::Async` sockets, with a clean shutdown. It contains no
//! protocol logic; every decision is made by `vsock-core`.
#![forbid(unsafe_code)]
