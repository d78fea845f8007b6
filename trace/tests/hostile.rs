//! A damaged or hostile trace never panics the reader or the replay: it is refused with a
//! named error, or replayed to a divergence.

use vsock_core::{Action, Config, Engine, HostEvent, Instant, LineRead, RxGrant};
use vsock_trace::replay::{read, replay};
use vsock_trace::TraceWriter;

mod common;
use common::Shared;

/// A small session: a host client's CONNECT reaches the guest.
fn trace() -> Vec<u8> {
    let out = Shared::default();
    let mut engine = Engine::new(Config::new(3), Instant::ZERO).unwrap();
    engine
        .set_recorder(Some(Box::new(
            TraceWriter::new(out.clone(), usize::MAX, 0).unwrap(),
        )))
        .unwrap();
    let now = Instant::from_millis(1);
    let conn = engine.handle_accept(now).unwrap();
    engine
        .handle_host_event(now, conn, HostEvent::Readable)
        .unwrap();
    while let Some(action) = engine.poll_action() {
        if let Action::ReadConnectLine { conn, .. } = action {
            engine
                .handle_connect_line(now, conn, LineRead::Data(b"CONNECT 5000\nhello"))
                .unwrap();
        }
    }
    while let Some(grant) = engine.poll_rx(now, 4096) {
        match grant {
            RxGrant::Packet(p) => {
                let _ = p.send();
            }
            RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
            RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
            RxGrant::Read(_) => break,
        }
    }
    engine.handle_timeout(Instant::from_secs(10));
    while engine.poll_action().is_some() {}
    drop(engine.set_recorder(None));
    let bytes = out.bytes();
    assert!(replay(&bytes).is_ok());
    bytes
}

/// xorshift64: the next of a reproducible sequence of changes.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn every_truncation_is_refused_or_replayed() {
    let good = trace();
    for len in 0..good.len() {
        let cut = &good[..len];
        // Never a panic; a cut inside a block is a named error.
        let _ = read(cut);
        let _ = replay(cut);
    }
}

#[test]
fn every_single_byte_change_is_refused_or_replayed() {
    let good = trace();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for at in 0..good.len() {
        for _ in 0..4 {
            let r = next(&mut state);
            let mut bad = good.clone();
            bad[at] ^= (r as u8) | 1;
            let _ = read(&bad);
            let _ = replay(&bad);
        }
    }
}

#[test]
fn random_changes_to_a_real_guest_trace_never_panic() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/traces/guest-mio.pcapng");
    let good = std::fs::read(path).unwrap();
    assert!(replay(&good).is_ok());
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3000 {
        let r = next(&mut state);
        let mut bad = good.clone();
        let at = (r >> 16) as usize % bad.len();
        bad[at] ^= (r as u8) | 1;
        // Payload bytes are not the engine's to check (they move between socket and guest
        // memory directly), so many changes replay fine; none may panic.
        let _ = replay(&bad);
    }
}

/// Any change to the header of a packet the device sent the guest is caught: those are the
/// engine's outputs, compared exactly.
#[test]
fn every_change_to_a_packet_to_the_guest_is_caught() {
    use vsock_trace::pcapng::{Reader, Way};
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/traces/guest-mio.pcapng");
    let good = std::fs::read(path).unwrap();
    let mut headers = Vec::new();
    let mut reader = Reader::new(&good).unwrap();
    while let Some(p) = reader.next_packet().unwrap() {
        if p.interface == vsock_trace::PACKETS && p.way == Way::Outbound {
            // The record's data starts 28 bytes into its block; the virtio header 32 into it.
            headers.push(p.offset + 28 + 32);
        }
    }
    assert!(headers.len() > 20);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for &at in &headers {
        for _ in 0..8 {
            let r = next(&mut state);
            let mut bad = good.clone();
            let byte = at + (r >> 20) as usize % 44;
            bad[byte] ^= (r as u8) | 1;
            assert!(
                replay(&bad).is_err(),
                "a change at byte {byte} went unnoticed"
            );
        }
    }
}
