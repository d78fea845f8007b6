//! Recording edge cases at the engine boundary, each replayed exactly.

use vsock_core::testing::guest_pkt;
use vsock_core::wire::Op;
use vsock_core::{Action, Config, Engine, GuestBytes, HostEvent, Instant, Io, MemoryFault, Tx};
use vsock_trace::replay::{read, Item};
use vsock_trace::{replay, TraceWriter};

mod common;
use common::{settle, Shared};

fn from_guest(op: Op, len: u32) -> vsock_core::wire::Header {
    guest_pkt(op, 50_000, 80, len, 0, 65536, 0)
}

/// An engine with a recorder writing into memory.
fn recording() -> (Engine, Shared) {
    let out = Shared::default();
    let mut e = Engine::new(Config::new(3), Instant::ZERO).unwrap();
    e.set_recorder(Some(Box::new(
        TraceWriter::new(out.clone(), usize::MAX, 0).unwrap(),
    )))
    .unwrap();
    (e, out)
}

/// The guest connects to port 80 and the host side accepts: established.
fn connect(e: &mut Engine, now: Instant) {
    assert!(matches!(
        e.handle_tx(now, &from_guest(Op::Request, 0)),
        Tx::Done
    ));
    settle(e, now);
}

struct Faulty;

impl GuestBytes for Faulty {
    fn copy_to(&mut self, _: usize, _: &mut [u8]) -> Result<(), MemoryFault> {
        Err(MemoryFault)
    }
}

/// A payload the guest's memory could not give (its buffer shorter than its header said, or
/// outside memory): the engine resets the connection, and the replay does the same.
#[test]
fn an_unreadable_payload_replays_as_a_reset() {
    let (mut e, out) = recording();
    let now = Instant::from_millis(1);
    connect(&mut e, now);
    // Nothing written directly, and the rest cannot be read: a reset.
    match e.handle_tx(now, &from_guest(Op::Rw, 100)) {
        Tx::Data(d) => {
            let _ = d.complete(Io::WouldBlock, &mut Faulty);
        }
        Tx::Done => panic!("the payload went nowhere"),
    }
    settle(&mut e, now);
    assert_eq!(e.stats().payload_faults, 1);
    // And one abandoned outright.
    connect(&mut e, now);
    match e.handle_tx(now, &from_guest(Op::Rw, 10)) {
        Tx::Data(d) => drop(d),
        Tx::Done => panic!("the payload went nowhere"),
    }
    settle(&mut e, now);
    assert_eq!(e.stats().payload_faults, 2);
    drop(e.set_recorder(None));

    let trace = out.bytes();
    replay(&trace).unwrap_or_else(|err| panic!("{err}"));
    let outcomes: Vec<_> = read(&trace)
        .unwrap()
        .into_iter()
        .filter_map(|entry| match entry.item {
            Item::Event(vsock_core::record::Event::TxWritten(o)) => Some(o),
            _ => None,
        })
        .collect();
    use vsock_core::record::TxOutcome;
    assert_eq!(
        outcomes,
        [TxOutcome::Unreadable(Io::WouldBlock), TxOutcome::Abandoned]
    );
}

/// A stop (a paused VM) with a connection open: recorded, and replayed with its RST.
#[test]
fn a_stop_replays_with_its_rst() {
    let (mut e, out) = recording();
    let now = Instant::from_millis(1);
    connect(&mut e, now);
    e.stop(Instant::from_millis(2));
    settle(&mut e, Instant::from_secs(600));
    assert_eq!(e.stats().rst_sent, 1);
    drop(e.set_recorder(None));
    let trace = out.bytes();
    let replayed = replay(&trace).unwrap_or_else(|err| panic!("{err}"));
    assert!(replayed.to_guest >= 2, "{replayed:?}");
    assert!(read(&trace)
        .unwrap()
        .iter()
        .any(|entry| entry.item == Item::Event(vsock_core::record::Event::Stop)));
}

/// A handle the embedder made up (here the raw value all-ones, which the format once used
/// for "no connection") is recorded as given, read back as given, and replayed as the stale
/// handle it is.
#[test]
fn an_all_ones_handle_is_read_back() {
    let (mut e, out) = recording();
    let now = Instant::from_millis(1);
    let bogus = vsock_core::ConnId::from_raw(u64::MAX);
    assert!(e
        .handle_host_event(now, bogus, HostEvent::Readable)
        .is_err());
    assert!(e.reset_connection(now, bogus).is_err());
    assert_eq!(e.stats().stale_events, 2);
    drop(e.set_recorder(None));
    let trace = out.bytes();
    let entries = read(&trace).unwrap_or_else(|err| panic!("{err}"));
    use vsock_core::record::Event;
    assert_eq!(
        entries[1].item,
        Item::Event(Event::Host(bogus, HostEvent::Readable))
    );
    assert_eq!(entries[2].item, Item::Event(Event::ResetConnection(bogus)));
    replay(&trace).unwrap_or_else(|err| panic!("{err}"));
}

fn guest_packet(op: Op, guest_port: u32, host_port: u32) -> vsock_core::wire::Header {
    let mut h = from_guest(op, 0);
    h.src_port.set(guest_port);
    h.dst_port.set(host_port);
    h
}

/// A host client connects, names guest port 5000, and the guest accepts; returns its host
/// port.
fn host_client(e: &mut Engine, now: Instant) -> u32 {
    let conn = e.handle_accept(now).unwrap();
    e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
    while let Some(a) = e.poll_action() {
        if let Action::ReadConnectLine { conn, .. } = a {
            e.handle_connect_line(now, conn, vsock_core::LineRead::Data(b"CONNECT 5000\n"))
                .unwrap();
        }
    }
    settle(e, now);
    let (_, host_port) = e.conn_ports(conn).unwrap();
    assert!(matches!(
        e.handle_tx(now, &guest_packet(Op::Response, 5000, host_port)),
        Tx::Done
    ));
    settle(e, now);
    host_port
}

/// Connections came and went before the recorder was attached: the slots they freed, the
/// generations and host ports they used, the clock they moved. The trace still replays
/// exactly through a fresh engine, which hands out the same handles and ports.
#[test]
fn a_recorder_attached_after_connections_came_and_went_replays() {
    let mut e = Engine::new(Config::new(3), Instant::ZERO).unwrap();
    let now = Instant::from_secs(5);
    for port in [50_000, 50_001] {
        assert!(matches!(
            e.handle_tx(now, &guest_packet(Op::Request, port, 80)),
            Tx::Done
        ));
        settle(&mut e, now);
    }
    let host_port = host_client(&mut e, now);
    // Closed by the guest in slot order, so a used table would reuse the last slot first.
    for (guest_port, host_port) in [(50_000, 80), (50_001, 80), (5000, host_port)] {
        assert!(matches!(
            e.handle_tx(now, &guest_packet(Op::Rst, guest_port, host_port)),
            Tx::Done
        ));
        settle(&mut e, now);
    }
    // A packet for no connection: its RST is sent before the recorder comes.
    assert!(matches!(
        e.handle_tx(now, &guest_packet(Op::Rw, 1, 2)),
        Tx::Done
    ));
    settle(&mut e, now);
    assert_eq!(e.connections(), 0);

    let out = Shared::default();
    e.set_recorder(Some(Box::new(
        TraceWriter::new(out.clone(), usize::MAX, 0).unwrap(),
    )))
    .unwrap();
    let later = Instant::from_secs(6);
    assert!(matches!(
        e.handle_tx(later, &guest_packet(Op::Request, 50_002, 80)),
        Tx::Done
    ));
    settle(&mut e, later);
    let second_host_port = host_client(&mut e, later);
    assert_eq!(second_host_port, host_port + 1);
    e.handle_timeout(Instant::from_secs(600));
    settle(&mut e, Instant::from_secs(600));
    drop(e.set_recorder(None));
    let trace = out.bytes();
    let replayed = replay(&trace).unwrap_or_else(|err| panic!("{err}"));
    assert!(replayed.actions > 2, "{replayed:?}");
    let summary = vsock_trace::summary::summarize(&trace).unwrap();
    assert_eq!(summary.snapshot.map(|s| s.next_generation), Some(4));
    assert!(
        summary.to_string().contains("recorded mid-session"),
        "{summary}"
    );
}

/// A recorder offered while a connection is open, or while an RST is owed to the guest, is
/// refused: no record could hand that state to a fresh engine. The one attached before (none
/// here) stays, and once the table is empty and the RST sent, the same session can be
/// recorded.
#[test]
fn a_recorder_is_refused_while_the_engine_holds_state() {
    use vsock_core::record::AttachError;
    let writer = || -> Box<dyn vsock_core::record::Recorder> {
        Box::new(TraceWriter::new(Shared::default(), usize::MAX, 0).unwrap())
    };
    let mut e = Engine::new(Config::new(3), Instant::ZERO).unwrap();
    let now = Instant::from_millis(1);
    connect(&mut e, now);
    assert_eq!(
        e.set_recorder(Some(writer())).err(),
        Some(AttachError::Connections(1))
    );
    assert!(!e.is_recording());
    // The guest resets it; its close is still owed until the action is taken.
    assert!(matches!(
        e.handle_tx(now, &from_guest(Op::Rst, 0)),
        Tx::Done
    ));
    assert_eq!(
        e.set_recorder(Some(writer())).err(),
        Some(AttachError::Connections(1))
    );
    settle(&mut e, now);
    // A packet for no connection: an RST is owed until the guest posts a buffer.
    assert!(matches!(e.handle_tx(now, &from_guest(Op::Rw, 0)), Tx::Done));
    assert_eq!(
        e.set_recorder(Some(writer())).err(),
        Some(AttachError::PendingResets(1))
    );
    assert!(e.set_recorder(None).unwrap().is_none());
    settle(&mut e, now);

    let out = Shared::default();
    assert!(e
        .set_recorder(Some(Box::new(
            TraceWriter::new(out.clone(), usize::MAX, 0).unwrap()
        )))
        .unwrap()
        .is_none());
    connect(&mut e, now);
    drop(e.set_recorder(None));
    let trace = out.bytes();
    replay(&trace).unwrap_or_else(|err| panic!("{err}"));
    // The start tells the replay where the engine was: one connection made before.
    match &read(&trace).unwrap()[0].item {
        Item::Start(_, snapshot) => assert_eq!(snapshot.next_generation, 2),
        other => panic!("{other:?}"),
    }
}
