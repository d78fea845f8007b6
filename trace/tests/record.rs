//! Recording edge cases at the engine boundary, each replayed exactly.

use vsock_core::wire::{Op, Packet, SocketType, HOST_CID};
use vsock_core::{
    Action, Config, Engine, GuestBytes, HostEvent, Instant, Io, MemoryFault, RxGrant, Tx,
};
use vsock_trace::replay::{read, Item};
use vsock_trace::{replay, TraceWriter};

mod common;
use common::Shared;

fn from_guest(op: Op, len: u32) -> vsock_core::wire::Header {
    Packet {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 50_000,
        dst_port: 80,
        len,
        socket_type: SocketType::Stream,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
    .to_header()
}

/// Drains actions (answering a connect) and rx grants (committing packets).
fn settle(e: &mut Engine, now: Instant) {
    loop {
        let mut busy = false;
        while let Some(a) = e.poll_action() {
            busy = true;
            if let Action::Connect { conn, .. } = a {
                e.handle_host_event(now, conn, HostEvent::Connected)
                    .unwrap();
                e.handle_host_event(now, conn, HostEvent::Writable).unwrap();
            }
        }
        while let Some(g) = e.poll_rx(now, 4096) {
            busy = true;
            match g {
                RxGrant::Packet(p) => {
                    let _ = p.send();
                }
                RxGrant::Read(r) => {
                    let _ = r.complete(Io::WouldBlock, &mut &[][..]);
                }
            }
        }
        if !busy {
            return;
        }
    }
}

/// An engine with a recorder writing into memory.
fn recording() -> (Engine, Shared) {
    let out = Shared::default();
    let mut e = Engine::new(Config::new(3), Instant::ZERO).unwrap();
    e.set_recorder(Some(Box::new(
        TraceWriter::new(out.clone(), usize::MAX, 0).unwrap(),
    )));
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
