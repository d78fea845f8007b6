//! The `trace` target: any file through the trace reader, the replay and the `--summary`
//! report of `vsock-replay`.
//!
//! Checks: no panic, and (run with `-rss_limit_mb`) memory bounded by the file's size. A file
//! the pcapng reader accepts record by record is also what `replay::read` accepts.

use vsock_trace::pcapng::Reader;
use vsock_trace::{event, replay, vsockmon};

/// Runs one input.
pub fn run(data: &[u8]) {
    // The container, packet by packet, and each record's own decoding.
    if let Ok(mut reader) = Reader::new(data) {
        // Every packet block is at least 32 bytes, so this bounds a reader that loops.
        let mut left = data.len() / 12 + 2;
        while let Ok(Some(packet)) = reader.next_packet() {
            left = left
                .checked_sub(1)
                .expect("the reader returned more packets than fit");
            let _ = vsockmon::parse(packet.data);
            let _ = event::decode(packet.data);
            let _ = event::fields(packet.data);
        }
    }
    // The trace as replay reads it, its summary, and the replay itself.
    if let Ok(entries) = replay::read(data) {
        let _ = vsock_trace::summary::summary(&mut std::io::sink(), &entries);
    }
    let _ = vsock_trace::replay(data);
}
