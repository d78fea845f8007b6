//! `vsock-replay`: replays a recorded trace through a fresh engine, or summarizes it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vsock_trace::summary::summarize;

/// Replays a vsock trace (recorded with `vhost-user-vsock --record`, or by any embedder's
/// `TraceWriter`) through a fresh engine with the recorded configuration, comparing every
/// output with the recording. Exits 0 when the replay matches; otherwise prints the first
/// divergence (record number, as Wireshark numbers frames; what the trace holds; what the
/// replay did) and exits 1. Exit 2: the file is not a readable trace, or its configuration
/// is refused (one that lets the engine hold more than the memory budget is: a trace is
/// input).
#[derive(Debug, Parser)]
#[command(name = "vsock-replay", version, verbatim_doc_comment)]
struct Args {
    /// Print the trace's connections, bytes each way, resets and timings instead of replaying.
    #[arg(long)]
    summary: bool,

    /// The most memory, in MiB, the replayed engine may hold at worst (its buffers times its
    /// connections, and their tables); a trace whose configuration allows more is refused.
    #[arg(long, value_name = "MIB", default_value_t = vsock_trace::DEFAULT_MEMORY_BUDGET >> 20)]
    memory_budget: u64,

    /// The trace file (pcapng).
    file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let bytes = match std::fs::read(&args.file) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("vsock-replay: {}: {e}", args.file.display());
            return ExitCode::from(2);
        }
    };
    if args.summary {
        return match summarize(&bytes) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vsock-replay: {}: {e}", args.file.display());
                ExitCode::from(2)
            }
        };
    }
    match vsock_trace::replay_within(&bytes, args.memory_budget.saturating_mul(1 << 20)) {
        Ok(r) => {
            println!(
                "{}: replay matches: {} records; {} packets from the guest and {} host events fed in; \
                 {} packets to the guest and {} actions reproduced",
                args.file.display(),
                r.records,
                r.from_guest,
                r.events,
                r.to_guest,
                r.actions
            );
            ExitCode::SUCCESS
        }
        Err(vsock_trace::ReplayError::Diverged(d)) => {
            println!("{}: {d}", args.file.display());
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vsock-replay: {}: {e}", args.file.display());
            ExitCode::from(2)
        }
    }
}
