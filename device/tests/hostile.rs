//! A hostile driver: random descriptor tables, random available ring entries and indices,
//! random indirect tables and random headers (flags, lengths, addresses), served repeatedly.
//! The device must never panic or hang, must only ever return heads that exist, and must go
//! on serving a well-formed connection once the driver puts its rings back in order.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vsock_core::wire::{Header, Op, HOST_CID};
use vsock_core::Config;
use vsock_device::testing::{Layout, RawDesc, MEM_SIZE, SCRATCH};
use vsock_device::DeviceError;
use zerocopy::IntoBytes;

const PORT: u32 = 1234;
const GP: u32 = 46_000;
/// Buffers for random chains: 16 buffers of 8 KiB in scratch memory.
const BUFS: u64 = SCRATCH;
/// Random indirect tables.
const TABLES: u64 = SCRATCH + 0x10_0000;

/// Where a random descriptor points.
#[derive(Clone, Debug)]
enum Addr {
    /// One of the scratch buffers, at an offset.
    Buf(u8, u16),
    /// One of the random tables.
    Table(u8),
    /// Queue `q`'s descriptor table (0) or available ring (1), at an offset. (Not the used
    /// rings: the device never reads them, and what it wrote there is checked.)
    Ring(u8, u8, u16),
    /// Just before the end of guest memory.
    NearEnd(u16),
    /// Past the end of guest memory.
    Outside(u32),
    /// Anywhere at all.
    Any(u64),
}

#[derive(Clone, Debug)]
struct Desc {
    addr: Addr,
    len: u32,
    /// Flipped in the flags a well-behaved driver would use (WRITE for rx and event, NEXT
    /// for all but the last of a chain): mostly zero.
    flip: u16,
    /// The `next` index: `None` for the following descriptor, as a driver links a chain.
    next: Option<u16>,
}

#[derive(Clone, Debug)]
enum Step {
    /// Writes `descs` into queue `q`'s table from index `at` on, and makes `at` (or `head`)
    /// available.
    Chain {
        q: u8,
        at: u16,
        descs: Vec<Desc>,
        head: Option<u16>,
    },
    /// Writes a random indirect table, for a queue's direction.
    Table {
        which: u8,
        rx: bool,
        descs: Vec<Desc>,
    },
    /// Writes a header (and a payload) into a scratch buffer.
    Header {
        buf: u8,
        offset: u16,
        header: [u64; 6],
        payload: u16,
    },
    /// Moves the available index of queue `q` by `delta` (maybe beyond the queue size).
    AvailIdx { q: u8, delta: u16 },
    /// The host application writes or shuts down.
    Host { bytes: u16, shut: bool },
    /// Save and restore in place (owes the guest a TRANSPORT_RESET).
    Restore,
    /// A serve call.
    Serve,
}

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        5 => (0u8..4).prop_map(|b| Addr::Buf(b, 0)),
        3 => (0u8..16, 0u16..4096).prop_map(|(b, o)| Addr::Buf(b, o)),
        2 => (0u8..4).prop_map(Addr::Table),
        1 => (0u8..3, 0u8..2, 0u16..4200).prop_map(|(q, r, o)| Addr::Ring(q, r, o)),
        1 => (0u16..200).prop_map(Addr::NearEnd),
        1 => any::<u32>().prop_map(Addr::Outside),
        1 => any::<u64>().prop_map(Addr::Any),
    ]
}

fn desc() -> impl Strategy<Value = Desc> {
    (
        addr(),
        prop_oneof![
            4 => 44u32..400,
            2 => 0u32..44,
            2 => 0u32..8192,
            1 => any::<u32>(),
        ],
        prop_oneof![
            12 => Just(0u16),
            1 => Just(VRING_DESC_F_WRITE as u16),
            1 => Just(VRING_DESC_F_NEXT as u16),
            1 => Just(VRING_DESC_F_INDIRECT as u16),
            1 => any::<u16>(),
        ],
        prop_oneof![
            8 => Just(None),
            2 => (0u16..16).prop_map(Some),
            1 => (0u16..300).prop_map(Some),
            1 => any::<u16>().prop_map(Some),
        ],
    )
        .prop_map(|(addr, len, flip, next)| Desc {
            addr,
            len,
            flip,
            next,
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (
            0u8..3,
            0u16..300,
            prop::collection::vec(desc(), 1..6),
            prop_oneof![
                8 => Just(None),
                1 => (0u16..300).prop_map(Some),
                1 => any::<u16>().prop_map(Some),
            ],
        )
            .prop_map(|(q, at, descs, head)| Step::Chain { q, at, descs, head }),
        2 => (0u8..4, any::<bool>(), prop::collection::vec(desc(), 0..6))
            .prop_map(|(which, rx, descs)| Step::Table { which, rx, descs }),
        5 => (0u8..4, prop_oneof![3 => Just(0u16), 1 => 0u16..64], any::<[u64; 6]>(), 0u16..300)
            .prop_map(|(buf, offset, header, payload)| Step::Header {
                buf,
                offset,
                header,
                payload
            }),
        1 => (0u8..3, prop_oneof![8 => 1u16..3, 1 => any::<u16>()])
            .prop_map(|(q, delta)| Step::AvailIdx { q, delta }),
        2 => (0u16..5000, prop::bool::weighted(0.1))
            .prop_map(|(bytes, shut)| Step::Host { bytes, shut }),
        1 => Just(Step::Restore),
        6 => Just(Step::Serve),
    ]
}

/// The raw descriptor for `d`, `i`-th of `n` at table index `index` of a table of `size`.
fn raw(
    bed: &Bed,
    d: &Desc,
    writable: bool,
    index: usize,
    i: usize,
    n: usize,
    size: usize,
) -> (RawDesc, u16) {
    let last = i + 1 == n;
    let mut flags = if writable {
        VRING_DESC_F_WRITE as u16
    } else {
        0
    };
    if !last {
        flags |= VRING_DESC_F_NEXT as u16;
    }
    let next = d.next.unwrap_or(((index + 1) % size) as u16);
    let desc = RawDesc {
        addr: resolve(bed, &d.addr),
        len: d.len,
        flags: flags ^ d.flip,
    };
    (desc, next)
}

fn resolve(bed: &Bed, a: &Addr) -> u64 {
    match *a {
        Addr::Buf(b, o) => BUFS + b as u64 * 0x2000 + o as u64,
        Addr::Table(t) => TABLES + t as u64 * 0x1000,
        Addr::Ring(q, r, o) => {
            let (desc, avail, _) = bed.driver.ring_addrs(q as usize);
            [desc, avail][r as usize] + o as u64
        }
        Addr::NearEnd(o) => MEM_SIZE - o as u64,
        Addr::Outside(o) => MEM_SIZE + o as u64,
        Addr::Any(x) => x,
    }
}

/// A header built from random words, nudged towards the live connection so that many reach
/// the engine rather than being dropped at the CID check.
fn header(words: [u64; 6]) -> Header {
    let [a, b, c, d, e, f] = words;
    let mut h = pkt(Op::Rw, GP, PORT, 0, 0, 0);
    h.src_cid = (if a % 8 == 0 { a } else { GUEST_CID }).into();
    h.dst_cid = (if b % 8 == 0 { b } else { HOST_CID }).into();
    h.src_port = (if c % 4 == 0 { c as u32 } else { GP }).into();
    h.dst_port = (if c % 5 == 0 { (c >> 32) as u32 } else { PORT }).into();
    h.len = (if d % 4 == 0 {
        d as u32
    } else {
        (d % 300) as u32
    })
    .into();
    h.type_ = (if e % 5 == 0 { e as u16 } else { 1 }).into();
    h.op = (if e % 7 == 0 {
        (e >> 16) as u16
    } else {
        ((e >> 16) % 8) as u16
    })
    .into();
    h.flags = ((e >> 32) as u32 % 4).into();
    h.buf_alloc = (f as u32).into();
    h.fwd_cnt = ((f >> 32) as u32).into();
    h
}

/// Every used element the device published since `from` names a descriptor of the queue, with
/// a plausible length.
fn check_used(bed: &Bed, q: usize, from: u16, to: u16) {
    let (_, _, used) = bed.driver.ring_addrs(q);
    let size = bed.driver.queue_size();
    let mut i = from;
    while i != to {
        let e = used + 4 + 8 * (i % size) as u64;
        let id: u32 = bed.driver.mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = bed.driver.mem.read_obj(GuestAddress(e + 4)).unwrap();
        assert!(id < size as u32, "queue {q}: used id {id} out of range");
        match q {
            0 => assert!(len == 0 || len >= 44, "rx used length {len}"),
            1 => assert_eq!(len, 0, "tx used length"),
            _ => assert!(len == 0 || len == 4, "event used length {len}"),
        }
        i = i.wrapping_add(1);
    }
}

static HEARTBEAT: AtomicU64 = AtomicU64::new(0);
/// Tests under the watchdog's eye.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Puts the calling test under the watchdog until dropped.
struct Watched;

impl Watched {
    fn new() -> Watched {
        watchdog();
        RUNNING.fetch_add(1, Ordering::Relaxed);
        Watched
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Aborts the test process if a serve call does not return for a long time: a hang is a
/// failure too, and a stuck test would never report it.
fn watchdog() {
    static START: std::sync::Once = std::sync::Once::new();
    START.call_once(|| {
        std::thread::spawn(|| {
            let mut last = u64::MAX;
            let mut still = 0;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let beat = HEARTBEAT.load(Ordering::Relaxed);
                if RUNNING.load(Ordering::Relaxed) > 0 && beat == last {
                    still += 1;
                    if still >= 20 {
                        eprintln!("hostile: no progress for 20 s: the device hangs");
                        std::process::abort();
                    }
                } else {
                    still = 0;
                }
                last = beat;
            }
        });
    });
}

fn serve(bed: &mut Bed) -> Result<(), ()> {
    let before: Vec<u16> = (0..3).map(|q| bed.queues[q].next_used()).collect();
    bed.host.poke(bed.device.engine_mut(), bed.now);
    let r = bed.try_serve();
    HEARTBEAT.fetch_add(1, Ordering::Relaxed);
    for (q, &from) in before.iter().enumerate() {
        check_used(bed, q, from, bed.queues[q].next_used());
    }
    match r {
        Ok(_) => Ok(()),
        // The one error a hostile driver can cause: an available index the device cannot
        // follow (written by the test, or by the device into a ring an rx buffer overlaps).
        Err(DeviceError::Queue(virtio_queue::Error::InvalidAvailRingIndex)) => Err(()),
        Err(e) => panic!("serve failed on a per-chain problem: {e}"),
    }
}

fn run_case(event_idx: bool, steps: &[Step]) {
    let mut bed = Bed::with_config(Config::new(GUEST_CID), event_idx);
    bed.post_rx(4, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    let size = bed.driver.queue_size();

    for step in steps {
        match step {
            Step::Chain { q, at, descs, head } => {
                let q = *q as usize;
                for (i, d) in descs.iter().enumerate() {
                    let index = (*at as usize + i) % size as usize;
                    let (desc, next) = raw(&bed, d, q != 1, index, i, descs.len(), size as usize);
                    bed.driver.write_desc(q, index as u16, desc, next);
                }
                bed.driver.post_head(q, head.unwrap_or(*at % size));
            }
            Step::Table { which, rx, descs } => {
                let entries: Vec<(RawDesc, u16)> = descs
                    .iter()
                    .enumerate()
                    .map(|(i, d)| raw(&bed, d, *rx, i, i, descs.len(), descs.len()))
                    .collect();
                bed.driver
                    .write_table(TABLES + *which as u64 * 0x1000, &entries);
            }
            Step::Header {
                buf,
                offset,
                header: words,
                payload,
            } => {
                let at = BUFS + *buf as u64 * 0x2000 + *offset as u64;
                let mut bytes = header(*words).as_bytes().to_vec();
                bytes.extend(pattern(words[0], *payload as usize));
                bed.driver
                    .mem
                    .write_slice(&bytes, GuestAddress(at))
                    .unwrap();
            }
            Step::AvailIdx { q, delta } => {
                let (_, avail, _) = bed.driver.ring_addrs(*q as usize);
                let idx: u16 = bed.driver.mem.read_obj(GuestAddress(avail + 2)).unwrap();
                bed.driver
                    .mem
                    .write_obj(idx.wrapping_add(*delta), GuestAddress(avail + 2))
                    .unwrap();
            }
            Step::Host { bytes, shut } => {
                if let Some(app) = bed.host.apps.get_mut(&conn.to_raw()) {
                    let _ = app.set_nonblocking(true);
                    let _ = app.write(&pattern(7, *bytes as usize));
                    if *shut {
                        let _ = app.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            Step::Restore => {
                let state = bed.save();
                bed.restore(&state);
            }
            Step::Serve => {
                let _ = serve(&mut bed);
            }
        }
    }
    for _ in 0..3 {
        let _ = serve(&mut bed);
    }

    // The driver recovers its rings; the device must serve a new connection normally.
    for q in 0..3 {
        bed.driver.resync(q, &bed.queues[q]);
    }
    bed.post_rx(8, &Layout::Single);
    let gp = GP + 1;
    let (conn, _) = bed.connect(gp, PORT);
    bed.send(
        pkt(Op::Rw, gp, PORT, 5, 0, 0),
        b"hello",
        &Layout::HeaderThenData,
    );
    bed.run();
    assert_eq!(app_read_all(bed.host.app(conn)), b"hello", "guest to host");
    bed.host.app(conn).write_all(b"world").unwrap();
    let got = bed.run();
    let back: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == gp && op_of(h) == Op::Rw)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(back, b"world", "host to guest");
    assert_eq!(bed.driver.in_flight(1), 0, "every tx chain came back");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn hostile_rings_never_panic_hang_or_stop_the_device(
        event_idx in any::<bool>(),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let _watched = Watched::new();
        run_case(event_idx, &steps);
    }
}

/// The class of hang the property test found first, kept as a plain test: an available
/// index more than a queue ahead of the device.
#[test]
fn an_available_index_beyond_the_queue_is_an_error_not_a_hang() {
    let _watched = Watched::new();
    for q in 0..3 {
        let mut bed = Bed::new();
        bed.post_rx(4, &Layout::Single);
        bed.connect(GP, PORT);
        if q == 2 {
            let state = bed.save();
            bed.restore(&state);
        }
        let (_, avail, _) = bed.driver.ring_addrs(q);
        let idx: u16 = bed.driver.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        bed.driver
            .mem
            .write_obj(idx.wrapping_add(1000), GuestAddress(avail + 2))
            .unwrap();
        if q == 0 {
            // Give the rx queue something to deliver.
            bed.send(
                pkt(Op::CreditRequest, GP, PORT, 0, 0, 0),
                &[],
                &Layout::Single,
            );
        }
        match bed.try_serve() {
            Err(DeviceError::Queue(virtio_queue::Error::InvalidAvailRingIndex)) => {}
            other => panic!("queue {q}: {other:?}"),
        }
        HEARTBEAT.fetch_add(1, Ordering::Relaxed);
        // Once the driver fixes its index, the device goes on.
        bed.driver
            .mem
            .write_obj(idx, GuestAddress(avail + 2))
            .unwrap();
        let _ = bed.run();
        let gp = GP + 10;
        let (conn, _) = bed.connect(gp, PORT);
        bed.send(pkt(Op::Rw, gp, PORT, 2, 0, 0), b"ok", &Layout::Single);
        bed.run();
        assert_eq!(app_read_all(bed.host.app(conn)), b"ok", "queue {q}");
    }
}
