//! The cross-runtime conformance suite.
//!
//! This crate will hold the scenarios that every runtime must pass over real Unix sockets, a
//! simulated guest driver over real virtqueue memory, the replay of recorded traces and the
//! real-guest runs under QEMU.
#![forbid(unsafe_code)]
