//! One test per protocol rule, each written as a short dialogue at explicit timestamps between a
//! scripted guest, scripted host sockets and the engine.
//!
//! Every packet the engine sends the guest is compared field by field, every socket action
//! exactly (interest changes included), and the engine's counters in full: `assert_stats!` lists
//! the counters that must be non-zero and requires every other one to be zero.

#[macro_use]
mod helpers;

mod addressing;
mod commands;
mod connect_line;
mod credit;
mod limits;
mod open;
mod order;
mod review;
mod seqpacket;
mod shutdown;
mod sibling;
mod timers;
