//! The steady state allocates nothing: a counting global allocator watches every engine call
//! while data makes round trips through established connections in both directions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use vsock_core::testing::{guest_pkt, GUEST_BUF_ALLOC};
use vsock_core::wire::{Header, Op};
use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant, Io, RxGrant, Tx};

struct Counting;

thread_local! {
    /// Whether this thread's allocations are being counted.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    /// This thread's count: per thread, as the tests of this binary run in parallel and one
    /// test's allocations must not land in another's count.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is forwarded unchanged to the system allocator; the only addition is a
// counter increment, which does not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCHING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with allocation counting on.
fn watch<R>(f: impl FnOnce() -> R) -> R {
    WATCHING.with(|w| w.set(true));
    let r = f();
    WATCHING.with(|w| w.set(false));
    r
}

const GUEST_CID: u64 = 3;
/// More connections buffering at once than the old pool kept (64), fewer than the default
/// `pooled_buffers`.
const CONNS: u32 = 100;

fn header(guest_port: u32, host_port: u32, op: Op, len: u32, fwd_cnt: u32) -> Header {
    guest_pkt(op, guest_port, host_port, len, 0, GUEST_BUF_ALLOC, fwd_cnt)
}

/// A driver that moves data without allocating in its own hot loop either, so the counter
/// could be left on; it is still switched on only around engine calls, which is the claim.
struct Bench {
    engine: Engine,
    now: Instant,
    conns: Vec<(u32, ConnId)>,
    /// Bytes the guest of each connection has read (its fwd_cnt).
    guest_fwd: Vec<u32>,
    payload: Vec<u8>,
    socket_room: usize,
}

impl Bench {
    fn drain_actions(&mut self) {
        while let Some(action) = watch(|| self.engine.poll_action()) {
            match action {
                Action::Flush { conn } => {
                    let n = watch(|| {
                        let [a, b] = self.engine.host_bytes(conn).unwrap();
                        a.len() + b.len()
                    });
                    watch(|| self.engine.handle_host_write(self.now, conn, Io::Done(n))).unwrap();
                }
                Action::Interest { .. } => {}
                other => panic!("unexpected action {other:?}"),
            }
        }
    }

    fn drain_rx(&mut self) -> usize {
        let mut delivered = 0;
        loop {
            let now = self.now;
            let got = watch(|| match self.engine.poll_rx(now, 4096 - 44)? {
                RxGrant::Packet(p) => Some(p.send()),
                RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                RxGrant::Read(r) => {
                    let n = r.max().min(1000);
                    r.complete(Io::Done(n), &mut &[0u8; 1000][..]).unwrap()
                }
            });
            let Some(h) = got else { break };
            delivered += 1;
            // The guest application reads at once.
            let i = (h.dst_port.get() - 50_000) as usize;
            self.guest_fwd[i] = self.guest_fwd[i].wrapping_add(h.len.get());
        }
        delivered
    }

    /// One round trip on connection `i`: guest sends, host answers.
    fn round_trip(&mut self, i: usize, len: usize, socket_takes: usize) {
        self.now = self.now + std::time::Duration::from_micros(10);
        let (guest_port, conn) = self.conns[i];
        let h = header(guest_port, 1234, Op::Rw, len as u32, self.guest_fwd[i]);
        let now = self.now;
        let payload = &self.payload[..len];
        watch(|| match self.engine.handle_tx(now, &h) {
            Tx::Data(d) => {
                let n = if d.direct() { socket_takes.min(len) } else { 0 };
                d.complete(Io::Done(n), &mut &payload[..]).unwrap();
            }
            Tx::Done => panic!("data refused"),
        });
        if socket_takes < len {
            watch(|| {
                self.engine
                    .handle_host_event(now, conn, HostEvent::Writable)
            })
            .unwrap();
        }
        self.drain_actions();
        watch(|| {
            self.engine
                .handle_host_event(now, conn, HostEvent::Readable)
        })
        .unwrap();
        self.drain_rx();
        // Tell the engine the guest consumed what it got.
        let h = header(guest_port, 1234, Op::CreditUpdate, 0, self.guest_fwd[i]);
        watch(|| matches!(self.engine.handle_tx(now, &h), Tx::Done));
        self.drain_rx();
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            watch(|| self.engine.handle_timeout(now));
        }
        let _ = self.socket_room;
    }
}

#[test]
fn steady_state_allocates_nothing() {
    let now = Instant::from_secs(1);
    let mut b = Bench {
        engine: Engine::new(Config::new(GUEST_CID), now).unwrap(),
        now,
        conns: Vec::new(),
        guest_fwd: vec![0; CONNS as usize],
        payload: (0..4096u32).map(|i| i as u8).collect(),
        socket_room: 0,
    };
    // Open the connections (allowed to allocate: warm-up).
    for i in 0..CONNS {
        let h = header(50_000 + i, 1234, Op::Request, 0, 0);
        assert!(matches!(b.engine.handle_tx(now, &h), Tx::Done));
        let conn = std::iter::from_fn(|| b.engine.poll_action())
            .find_map(|a| match a {
                Action::Connect { conn, .. } => Some(conn),
                _ => None,
            })
            .expect("a connect action");
        b.engine
            .handle_host_event(now, conn, HostEvent::Connected)
            .unwrap();
        b.conns.push((50_000 + i, conn));
    }
    b.drain_actions();
    b.drain_rx();
    // Warm up every path, the buffer pool included (partial writes buffer the rest).
    for round in 0..200 {
        for i in 0..CONNS as usize {
            b.round_trip(
                i,
                1 + (round * 37 + i * 11) % 4000,
                if round % 3 == 0 { 100 } else { usize::MAX },
            );
        }
    }
    let before_stats = b.engine.stats().clone();
    ALLOCATIONS.with(|n| n.set(0));

    for round in 0..10_000usize {
        let i = round % CONNS as usize;
        let takes = if round % 3 == 0 {
            round % 500
        } else {
            usize::MAX
        };
        b.round_trip(i, 1 + (round * 53) % 4000, takes);
    }

    let counted = allocations();
    let stats = b.engine.stats();
    // The loop really moved data both ways, through both the direct and the buffered path.
    assert!(stats.tx_packets - before_stats.tx_packets >= 20_000);
    assert!(stats.tx_buffered_bytes > before_stats.tx_buffered_bytes);
    assert!(stats.tx_direct_bytes > before_stats.tx_direct_bytes);
    assert!(stats.rx_bytes - before_stats.rx_bytes >= 10_000 * 1000);
    assert_eq!(stats.rst_sent, 0);
    assert_eq!(b.engine.connections(), CONNS as usize);
    assert_eq!(counted, 0, "the steady state allocated {counted} times");
}

#[test]
fn the_counter_sees_allocations() {
    // Guard against a counter that cannot fail: an allocation inside `watch` is counted.
    let before = allocations();
    let v = watch(|| vec![1u8; 100]);
    assert_eq!(v.len(), 100);
    assert!(allocations() > before);
}

/// Seqpacket too: once its buffer (and the bitmap of message ends beside it) is pooled, a
/// connection moving messages both ways, buffered and direct, probed and read over several rx
/// buffers, allocates nothing.
#[test]
fn seqpacket_steady_state_allocates_nothing() {
    use vsock_core::testing::guest_seq_pkt;
    use vsock_core::wire::SEQ_EOM;
    use vsock_core::{Probe, SocketTypes};
    let mut e = Engine::new(Config::new(GUEST_CID), Instant::ZERO).unwrap();
    let mut now = Instant::from_millis(1);
    e.set_socket_types(
        now,
        SocketTypes {
            stream: true,
            seqpacket: true,
        },
    );
    let pkt = |op, len, flags, fwd| guest_seq_pkt(op, 1000, 80, len, flags, GUEST_BUF_ALLOC, fwd);
    let _ = e.handle_tx(now, &pkt(Op::Request, 0, 0, 0));
    let mut conn = None;
    while let Some(a) = e.poll_action() {
        if let Action::Connect { conn: c, .. } = a {
            conn = Some(c);
        }
    }
    let conn = conn.expect("a connect");
    e.handle_host_event(now, conn, HostEvent::Connected)
        .unwrap();
    while e.poll_action().is_some() {}
    while let Some(RxGrant::Packet(p)) = e.poll_rx(now, 4052) {
        let _ = p.send();
    }
    let payload = vec![5u8; 9000];
    let rooms = [4052usize, 4052, 896];
    let mut fwd = 0u32;
    let round = |e: &mut Engine, now: Instant, fwd: &mut u32| {
        // A message over two packets, buffered, then flushed whole.
        for (len, flags) in [(5000u32, 0), (4000, SEQ_EOM)] {
            if let Tx::Data(d) = e.handle_tx(now, &pkt(Op::Rw, len, flags, *fwd)) {
                d.complete(Io::Done(0), &mut &payload[..len as usize])
                    .unwrap();
            }
        }
        // A message in one packet, straight to the socket.
        if let Tx::Data(d) = e.handle_tx(now, &pkt(Op::Rw, 100, SEQ_EOM, *fwd)) {
            d.complete(Io::Done(100), &mut &payload[..100]).unwrap();
        }
        e.handle_host_event(now, conn, HostEvent::Writable).unwrap();
        while let Some(a) = e.poll_action() {
            if let Action::Flush { conn } = a {
                let n: usize = e.host_bytes(conn).unwrap().iter().map(|b| b.len()).sum();
                e.handle_host_write(now, conn, Io::Done(n)).unwrap();
            }
        }
        // A host message of 9000 bytes over three buffers.
        e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
        let mut probed = false;
        loop {
            match e.poll_rx(now, 4052) {
                Some(RxGrant::Probe(p)) => {
                    let probe = if probed {
                        Probe::WouldBlock
                    } else {
                        Probe::Size(9000)
                    };
                    probed = true;
                    assert!(p.complete(probe).is_none());
                }
                Some(RxGrant::Message(m)) => {
                    let headers = m
                        .complete(Io::Done(9000), &rooms, &mut &payload[..])
                        .unwrap()
                        .expect("packets for the guest");
                    *fwd = fwd.wrapping_add(headers.map(|h| h.len.get()).sum::<u32>());
                }
                Some(RxGrant::Packet(p)) => {
                    let _ = p.send();
                }
                Some(RxGrant::Read(r)) => panic!("a stream read grant: {r:?}"),
                None => break,
            }
        }
        // The guest read the message, and says so.
        let _ = e.handle_tx(now, &pkt(Op::CreditUpdate, 0, 0, *fwd));
        while e.poll_action().is_some() {}
        while let Some(RxGrant::Packet(p)) = e.poll_rx(now, 4052) {
            let _ = p.send();
        }
    };
    // Warm up: the buffer and its bitmap are allocated once, then pooled.
    round(&mut e, now, &mut fwd);
    let before = allocations();
    for _ in 0..200 {
        now = now + std::time::Duration::from_micros(50);
        watch(|| round(&mut e, now, &mut fwd));
    }
    assert_eq!(allocations() - before, 0, "allocations in the steady state");
    let s = e.stats();
    assert_eq!((s.messages_to_host, s.messages_to_guest), (402, 201));
}
