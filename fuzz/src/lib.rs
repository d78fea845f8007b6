//! The fuzz targets' bodies, as library functions so that the seed generator
//! (`examples/seeds.rs`) and the targets share them. Each `fuzz_targets/<name>.rs` calls one
//! `run`; see README.md for how to run them.

pub mod connect_line;
pub mod device;
pub mod engine;
pub mod trace;
pub mod wire;
