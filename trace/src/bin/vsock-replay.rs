//! `vsock-replay`: replays a recorded trace through a fresh engine, or summarizes it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vsock_trace::replay::read;
use vsock_trace::summary::summary;

/// Replays a vsock trace (recorded with `vhost-user-vsock --record`, or by any embedder's
/// `TraceWriter`) through a fresh engine with the recorded configuration, comparing every
/// output with the recording. Exits 0 when the replay matches; otherwise prints the first
/// divergence (record number, as Wireshark numbers frames; what the trace holds; what the
/// replay did) and exits 1. Exit 2: the file is not a readable trace.
#[derive(Debug, Parser)]
#[command(name = "vsock-replay", version, verbatim_doc_comment)]
struct Args {
    /// Print the trace's connections, bytes each way, resets and timings instead of replaying.
    #[arg(long)]
    summary: bool,

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
        return match read(&bytes) {
            Ok(entries) => match summary(&mut std::io::stdout().lock(), &entries) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vsock-replay: {e}");
                    ExitCode::from(2)
                }
            },
            Err(e) => {
                eprintln!("vsock-replay: {}: {e}", args.file.display());
                ExitCode::from(2)
            }
        };
    }
    match vsock_trace::replay(&bytes) {
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
