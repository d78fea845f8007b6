//! Recording on every runtime, and replay: a session recorded through `vsock_trace::TraceWriter`
//! attached to the engine replays exactly through a fresh engine; the same trace mutated is
//! caught, with the record that differs named.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::Config;
use vsock_tests::{Rig, Runtime};
use vsock_trace::pcapng::Reader;
use vsock_trace::replay::{read, Item};
use vsock_trace::{replay, ReplayError, TraceWriter, PACKETS};

const LONG: Duration = Duration::from_secs(30);

/// A trace written into memory the test keeps a handle on.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A guest connection echoed by a host service, and a host client's `CONNECT` answered by a
/// guest listener, each closed from its own side; returns the trace.
fn record_session(rt: Runtime, snap: usize) -> Vec<u8> {
    let out = Shared::default();
    let writer = TraceWriter::new(out.clone(), snap, 1_700_000_000).unwrap();
    let mut rig = Rig::start_recorded(
        rt,
        Config::new(vsock_tests::GUEST_CID),
        Some(Box::new(writer)),
    );

    // The guest connects to an echo service.
    let listener = UnixListener::bind(rig.port_path(1234)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        s.write_all(&all).unwrap();
    });
    let key = rig.guest.stack.connect(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    rig.guest.stack.write(key, &data);
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("echoed", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    echo.join().unwrap();
    assert!(rig.guest.stack.conn(key).read == data);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);

    // A host client reaches the guest's listener.
    rig.guest.stack.listen(5000);
    let path = rig.listener();
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(b"CONNECT 5000\nping").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        got
    });
    rig.until("ping", LONG, |g| {
        g.stack
            .conns
            .values()
            .any(|c| c.read == b"ping" && c.peer_shut & SHUTDOWN_SEND != 0)
    });
    let key = *rig
        .guest
        .stack
        .conns
        .iter()
        .find(|(_, c)| c.read == b"ping")
        .unwrap()
        .0;
    rig.guest.stack.write(key, b"pong");
    rig.guest.stack.close(key);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    let got = String::from_utf8(client.join().unwrap()).unwrap();
    assert!(got.starts_with("OK ") && got.ends_with("\npong"), "{got:?}");
    // Dropping the driver drops the engine and its recorder.
    drop(rig.stop());
    let bytes = out.0.lock().unwrap().clone();
    bytes
}

fn recorded_session_replays_exactly(rt: Runtime) {
    let trace = record_session(rt, usize::MAX);
    let replayed = replay(&trace).unwrap_or_else(|e| panic!("{e}"));
    assert!(replayed.from_guest >= 4, "{replayed:?}");
    assert!(replayed.to_guest > 10, "{replayed:?}");
    assert!(replayed.actions > 5, "{replayed:?}");
    // Both directions' data are in the packets.
    let entries = read(&trace).unwrap();
    let payload = |to_guest: bool| -> usize {
        entries
            .iter()
            .map(|e| match &e.item {
                Item::Packet {
                    to_guest: t,
                    header,
                    payload,
                } if *t == to_guest && header.op.get() == 5 => {
                    assert_eq!(payload.len(), header.len.get() as usize);
                    payload.len()
                }
                _ => 0,
            })
            .sum()
    };
    assert_eq!(payload(false), 20_000 + 4);
    assert_eq!(payload(true), 20_000 + 4);
}

/// With a snap length, payloads are cut but lengths are kept, and the replay still matches.
fn snapped_session_replays(rt: Runtime) {
    let trace = record_session(rt, 16);
    let full = record_session(rt, usize::MAX);
    assert!(
        trace.len() < full.len() / 2,
        "{} vs {}",
        trace.len(),
        full.len()
    );
    replay(&trace).unwrap_or_else(|e| panic!("{e}"));
    for e in read(&trace).unwrap() {
        if let Item::Packet { payload, .. } = e.item {
            assert!(payload.len() <= 16);
        }
    }
}

/// Flips one byte of the `fwd_cnt` of a packet to the guest: the report names that record.
fn mutated_output_is_caught(rt: Runtime) {
    let mut trace = record_session(rt, usize::MAX);
    let entries = read(&trace).unwrap();
    let target = entries
        .iter()
        .filter(|e| matches!(e.item, Item::Packet { to_guest: true, .. }))
        .nth(5)
        .expect("enough packets to the guest")
        .number;
    // Find the record's bytes: the EPB data starts 28 bytes into the block.
    let mut reader = Reader::new(&trace).unwrap();
    let mut offset = None;
    for n in 1..=target {
        let p = reader.next_packet().unwrap().unwrap();
        if n == target {
            assert_eq!(p.interface, PACKETS);
            offset = Some(p.offset + 28);
        }
    }
    // fwd_cnt: the last 4 bytes of the virtio header (32 + 40).
    trace[offset.unwrap() + 72] ^= 0x40;
    match replay(&trace) {
        Err(ReplayError::Diverged(d)) => {
            assert_eq!(d.number, target, "{d}");
            assert_ne!(d.expected, d.actual);
            let report = d.to_string();
            assert!(report.contains("fwd_cnt"), "{report}");
        }
        other => panic!("the mutation went unnoticed: {other:?}"),
    }
}

/// tshark reads the trace cleanly, sees in each packet what we wrote, and the Lua dissector
/// decodes every host event.
fn tshark_reads_the_trace(rt: Runtime) {
    if !vsock_tests::tshark::available() {
        assert!(
            std::env::var_os("VSOCK_REQUIRE_GUEST").is_none_or(|v| v != "1"),
            "tshark is required (scripts/test.sh installs it)"
        );
        eprintln!("SKIPPED tshark_reads_the_trace: no tshark; ./scripts/test.sh installs it");
        return;
    }
    let trace = record_session(rt, usize::MAX);
    let path = vsock_tests::temp_dir().join("session.pcapng");
    std::fs::write(&path, &trace).unwrap();
    let checked = vsock_tests::tshark::check(&path).unwrap_or_else(|e| panic!("{e}"));
    let entries = read(&trace).unwrap();
    let packets = entries
        .iter()
        .filter(|e| matches!(e.item, Item::Packet { .. }))
        .count();
    assert_eq!(checked.packets, packets);
    assert_eq!(checked.events, entries.len() - packets);
}

/// A seqpacket session: the guest's messages to an echo service (one needs several rx
/// buffers back), and a host client of `<uds_path>_seqpacket`; returns the trace.
fn record_seqpacket_session(rt: Runtime) -> Vec<u8> {
    use vsock_core::wire::SocketType;
    let out = Shared::default();
    let writer = TraceWriter::new(out.clone(), usize::MAX, 1_700_000_000).unwrap();
    let mut rig = Rig::start_recorded(
        rt,
        Config::new(vsock_tests::GUEST_CID),
        Some(Box::new(writer)),
    );
    // One rx buffer posted at a time: the 10 000-byte echo is staged, its tail recorded.
    rig.guest.rx_target = 1;
    let listener = vsock_host::bind_listener(&rig.port_path(1234), SocketType::SeqPacket).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 100_000];
        loop {
            let n = vsock_tests::read_seqpacket(&mut s, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert_eq!(s.write(&buf[..n]).unwrap(), n);
        }
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    for n in [1, 10_000, 300] {
        assert!(rig.guest.stack.send_message(key, &vec![7; n], false));
    }
    rig.until("echoed", LONG, |g| {
        g.stack.conn(key).messages_read.len() == 3
    });
    rig.guest.rx_target = 128;
    rig.guest.stack.close(key);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    echo.join().unwrap();

    rig.guest.stack.listen_seqpacket(5000);
    let mut path = rig.listener().into_os_string();
    path.push("_seqpacket");
    let client = std::thread::spawn(move || {
        let mut c =
            vsock_host::connect_unix(std::path::Path::new(&path), SocketType::SeqPacket).unwrap();
        c.set_nonblocking(false).unwrap();
        c.write_all(b"CONNECT 5000\n").unwrap();
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 64];
        let n = vsock_tests::read_seqpacket(&mut c, &mut buf).unwrap();
        assert!(buf[..n].starts_with(b"OK "));
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let n = vsock_tests::read_seqpacket(&mut c, &mut buf).unwrap();
        buf[..n].to_vec()
    });
    rig.until("ping", LONG, |g| {
        g.stack.conns.values().any(|c| c.read == b"ping")
    });
    let key = *rig
        .guest
        .stack
        .conns
        .iter()
        .find(|(_, c)| c.read == b"ping")
        .unwrap()
        .0;
    rig.guest.stack.send_message(key, b"pong", false);
    rig.until("sent", LONG, |g| g.stack.conn(key).to_send.is_empty());
    assert_eq!(client.join().unwrap(), b"pong");
    rig.guest.stack.close(key);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    let stopped = rig.stop();
    assert!(
        stopped.device().stats().rx_message_staged > 0,
        "nothing was staged: {:?}",
        stopped.device().stats()
    );
    drop(stopped);
    let bytes = out.0.lock().unwrap().clone();
    bytes
}

/// A seqpacket session replays exactly, and tshark shows its packets' type and `EOM`.
fn seqpacket_session_replays_and_tshark_shows_it(rt: Runtime) {
    let trace = record_seqpacket_session(rt);
    let replayed = replay(&trace).unwrap_or_else(|e| panic!("{e}"));
    assert!(replayed.to_guest > 8, "{replayed:?}");
    let entries = read(&trace).unwrap();
    // Messages each way end with EOM: three and "ping" from the host side (four), three and
    // "pong" from the guest (four).
    let eom = |to_guest: bool| {
        entries
            .iter()
            .filter(|e| {
                matches!(&e.item, Item::Packet { to_guest: t, header, .. }
                    if *t == to_guest && header.op.get() == 5 && header.flags.get() == 1)
            })
            .count()
    };
    assert_eq!((eom(false), eom(true)), (4, 4));
    let summary = vsock_trace::summary::summarize(&trace).unwrap().to_string();
    assert!(
        summary.contains("(3 messages guest->host, 3 host->guest)")
            && summary.contains("(1 messages guest->host, 1 host->guest)"),
        "{summary}"
    );
    if !vsock_tests::tshark::available() {
        assert!(
            std::env::var_os("VSOCK_REQUIRE_GUEST").is_none_or(|v| v != "1"),
            "tshark is required (scripts/test.sh installs it)"
        );
        return;
    }
    let path = vsock_tests::temp_dir().join("seqpacket.pcapng");
    std::fs::write(&path, &trace).unwrap();
    vsock_tests::tshark::check(&path).unwrap_or_else(|e| panic!("{e}"));
    let frames = vsock_tests::tshark::frames(&path, "vsockseq.eom == 1").unwrap();
    assert_eq!(frames.len(), 8, "tshark's EOM packets: {frames:?}");
    let seq = vsock_tests::tshark::frames(&path, "vsock.virtio.type == 2").unwrap();
    let ours = entries
        .iter()
        .filter(|e| matches!(&e.item, Item::Packet { header, .. } if header.type_.get() == 2))
        .count();
    assert_eq!(seq.len(), ours, "every seqpacket packet shows as type 2");
}

/// The committed regression traces (`tests/traces`, recorded from a real Linux guest through
/// the daemon) replay exactly, and tshark reads each cleanly.
#[test]
fn committed_traces_replay_exactly() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "pcapng") {
            let trace = std::fs::read(&path).unwrap();
            let replayed = replay(&trace).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(replayed.to_guest > 0, "{}: {replayed:?}", path.display());
            if vsock_tests::tshark::available() {
                vsock_tests::tshark::check(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            names.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "guest-mio.pcapng",
            "guest-smol.pcapng",
            "guest-tokio.pcapng"
        ],
        "the committed traces"
    );
}

/// A real guest's trace with one input changed (the result of one socket write the device
/// made for the guest): the replay goes another way, and the report says where.
#[test]
fn a_mutated_input_in_a_real_trace_is_caught() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/guest-mio.pcapng");
    let mut trace = std::fs::read(path).unwrap();
    let entries = read(&trace).unwrap();
    // The first direct write that moved bytes: claim it moved one byte less.
    let target = entries
        .iter()
        .find(|e| {
            matches!(
                e.item,
                Item::Event(vsock_core::record::Event::TxWritten(
                    vsock_core::record::TxOutcome::Written(vsock_core::Io::Done(n))
                )) if n > 1
            )
        })
        .expect("a direct write in the trace")
        .number;
    let mut reader = Reader::new(&trace).unwrap();
    let mut value_at = 0;
    for n in 1..=target {
        let p = reader.next_packet().unwrap().unwrap();
        if n == target {
            // The event's value field: 16 bytes into the record, which starts 28 into the block.
            value_at = p.offset + 28 + 16;
        }
    }
    trace[value_at] = trace[value_at].wrapping_sub(1);
    match replay(&trace) {
        Err(ReplayError::Diverged(d)) => {
            assert!(d.number > target, "{d}");
            eprintln!("{d}");
        }
        other => panic!("the mutation went unnoticed: {other:?}"),
    }
}

macro_rules! on_each_runtime {
    ($($check:ident),* $(,)?) => {
        mod mio { $( #[test] fn $check() { super::$check(vsock_tests::Runtime::Mio) } )* }
        mod tokio { $( #[test] fn $check() { super::$check(vsock_tests::Runtime::Tokio) } )* }
        mod smol { $( #[test] fn $check() { super::$check(vsock_tests::Runtime::Smol) } )* }
    };
}

on_each_runtime!(
    recorded_session_replays_exactly,
    snapped_session_replays,
    mutated_output_is_caught,
    tshark_reads_the_trace,
    seqpacket_session_replays_and_tshark_shows_it,
);
