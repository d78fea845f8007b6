//! The benchmark parts, one module each; `vsock-bench <part>` runs one.

pub mod engine;
pub mod idle;
pub mod latency;
pub mod relay;
pub mod setup;
pub mod streams;

use crate::Opts;

/// A part: its name, what it measures, and its runner.
pub type Part = (&'static str, &'static str, fn(&Opts));

/// The parts, in the order `scripts/bench` runs them.
pub const PARTS: &[Part] = &[
    (
        "engine",
        "the engine alone: ns and instructions per packet",
        engine::run,
    ),
    (
        "relay",
        "device vs relay thread: throughput, CPU, wakes, syscalls",
        relay::run,
    ),
    (
        "latency",
        "1-byte round trip, device vs socketpair",
        latency::run,
    ),
    (
        "streams",
        "1, 8, 64 parallel streams each way",
        streams::run,
    ),
    (
        "setup",
        "connection set-up rate, device vs connect+accept",
        setup::run,
    ),
    (
        "idle",
        "memory per idle connection, 10k and 100k",
        idle::run,
    ),
];
