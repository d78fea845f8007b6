//! `vsock-replay --summary` over traces whose timestamps do not only go forward: the engine
//! takes a `now` that steps back (it keeps its own clock monotonic), and records it as given.

use vsock_core::testing::guest_pkt;
use vsock_core::wire::Op;
use vsock_core::{Action, Config, Engine, HostEvent, Instant, RxGrant, Tx};
use vsock_trace::replay::read;
use vsock_trace::summary::summary;
use vsock_trace::{replay, TraceWriter};

mod common;
use common::Shared;

fn from_guest(op: Op, src_port: u32) -> vsock_core::wire::Header {
    guest_pkt(op, src_port, 80, 0, 0, 65536, 0)
}

/// A guest connection whose packets' `now` goes 100 s (the start), 50 s, 200 s, 20 s.
fn stepping_back() -> Vec<u8> {
    let out = Shared::default();
    let mut e = Engine::new(Config::new(3), Instant::from_secs(100)).unwrap();
    e.set_recorder(Some(Box::new(
        TraceWriter::new(out.clone(), usize::MAX, 0).unwrap(),
    )))
    .unwrap();
    let t = Instant::from_secs;
    assert!(matches!(
        e.handle_tx(t(50), &from_guest(Op::Request, 7000)),
        Tx::Done
    ));
    while let Some(a) = e.poll_action() {
        if let Action::Connect { conn, .. } = a {
            e.handle_host_event(t(200), conn, HostEvent::Connected)
                .unwrap();
        }
    }
    while let Some(g) = e.poll_rx(t(20), 4096) {
        if let RxGrant::Packet(p) = g {
            let _ = p.send();
        }
    }
    assert!(matches!(
        e.handle_tx(t(10), &from_guest(Op::Rst, 7000)),
        Tx::Done
    ));
    while e.poll_action().is_some() {}
    drop(e.set_recorder(None));
    out.bytes()
}

#[test]
fn a_summary_of_a_clock_stepping_back_is_sane() {
    let trace = stepping_back();
    // The engine allows it, and so does the replay.
    replay(&trace).unwrap_or_else(|err| panic!("{err}"));
    let entries = read(&trace).unwrap();
    let mut text = Vec::new();
    summary(&mut text, &entries).unwrap();
    let text = String::from_utf8(text).unwrap();
    eprintln!("{text}");
    // The records span 10 s to 200 s, not in order.
    assert!(text.contains("over 190.000 s"), "{text}");
    assert!(text.contains("the clock steps back 4 times"), "{text}");
    // The connection's packets are at 50 s, 200 s (the RESPONSE, at the engine's clock)
    // and 10 s: seen from the earliest record on, for 190 s.
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("stream"))
        .expect("the connection's line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1], "7000", "{line}");
    assert_eq!(fields[6..8], ["0.000", "190.000"], "{line}");
}

/// The library's summary is the one the binary prints, for any trace it reads.
#[test]
fn summarize_reads_and_summarizes() {
    let trace = stepping_back();
    let s = vsock_trace::summary::summarize(&trace).unwrap();
    assert_eq!(
        (s.first_nanos, s.last_nanos),
        (10_000_000_000, 200_000_000_000)
    );
    assert_eq!(s.steps_back, 4);
    assert_eq!(s.connections.len(), 1);
    let mut text = Vec::new();
    summary(&mut text, &read(&trace).unwrap()).unwrap();
    assert_eq!(String::from_utf8(text).unwrap(), s.to_string());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vsock-replay"))
        .arg("--summary")
        .arg(write_temp("summary", &trace))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), s.to_string());
    assert!(vsock_trace::summary::summarize(b"not a trace").is_err());
}

fn write_temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("vsock-trace-{name}-{}.pcapng", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}
