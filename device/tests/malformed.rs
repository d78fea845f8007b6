//! Every class of malformed descriptor chain, on the tx, rx and event queues: each is
//! returned to the used ring (when it names a descriptor at all), counted exactly once in its
//! `DeviceStats` counter, and the device goes on serving.

mod common;

use std::io::Write;

use common::*;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::Bytes;
use vsock_core::wire::{Op, HEADER_LEN};
use vsock_core::ConnId;
use vsock_device::testing::{Layout, RawDesc, MEM_SIZE, QUEUE_SIZE, SCRATCH};
use vsock_device::DeviceStats;
use zerocopy::IntoBytes;

const PORT: u32 = 1234;
const GP: u32 = 41_000;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// Where packets for raw chains are written.
const BUF: u64 = SCRATCH;
/// Where raw indirect tables are written.
const TABLE: u64 = SCRATCH + 0x10_0000;
/// An address past the end of guest memory.
const OUTSIDE: u64 = MEM_SIZE + 0x1000;

fn d(addr: u64, len: u32, flags: u16) -> RawDesc {
    RawDesc { addr, len, flags }
}

/// The device's error counters, by name.
fn errors(s: &DeviceStats) -> Vec<(&'static str, u64)> {
    vec![
        ("tx_write_only", s.tx_write_only),
        ("tx_too_short", s.tx_too_short),
        ("tx_len_beyond_chain", s.tx_len_beyond_chain),
        ("tx_bad_memory", s.tx_bad_memory),
        ("rx_read_only", s.rx_read_only),
        ("rx_too_short", s.rx_too_short),
        ("rx_bad_memory", s.rx_bad_memory),
        ("event_bad_chain", s.event_bad_chain),
    ]
}

/// Checks that exactly `counter` went up, by one.
fn assert_counted_once(before: &DeviceStats, after: &DeviceStats, counter: &str, case: &str) {
    for ((name, b), (_, a)) in errors(before).into_iter().zip(errors(after)) {
        let want = if name == counter { b + 1 } else { b };
        assert_eq!(a, want, "{case}: counter {name} (expected {counter} +1)");
    }
}

/// A bed with an established connection `GP` and Linux rx buffers.
fn live_bed() -> (Bed, ConnId) {
    let mut bed = Bed::new();
    bed.post_rx(8, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    (bed, conn)
}

/// Proves the device still serves: the old connection (if still alive) carries data, and a
/// new connection opens and carries data both ways.
fn still_serves(bed: &mut Bed, old: Option<ConnId>, case: &str) {
    if let Some(conn) = old {
        bed.send(pkt(Op::Rw, GP, PORT, 5, 0, 0), b"after", &Layout::Single);
        bed.run();
        assert_eq!(
            app_read_all(bed.host.app(conn)),
            b"after",
            "{case}: old connection"
        );
    }
    let gp = 41_999;
    let (conn, _) = bed.connect(gp, PORT);
    bed.send(pkt(Op::Rw, gp, PORT, 3, 0, 0), b"new", &Layout::Single);
    bed.run();
    assert_eq!(
        app_read_all(bed.host.app(conn)),
        b"new",
        "{case}: new connection"
    );
    bed.host.app(conn).write_all(b"back").unwrap();
    let got = bed.run();
    let payload: Vec<u8> = got
        .iter()
        .filter(|(h, _)| h.dst_port.get() == gp && op_of(h) == Op::Rw)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(payload, b"back", "{case}: new connection, host to guest");
    assert_eq!(
        bed.driver.in_flight(1),
        0,
        "{case}: every tx chain came back"
    );
}

/// Writes a guest packet (header and payload) at `at`; returns its length.
fn write_packet(bed: &Bed, at: u64, header: vsock_core::wire::Header, payload: &[u8]) -> u32 {
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bed.driver
        .mem
        .write_slice(&bytes, vm_memory::GuestAddress(at))
        .unwrap();
    bytes.len() as u32
}

/// How a malformed chain is put on a queue.
enum Post {
    /// Through `post_raw`.
    Raw(Vec<RawDesc>),
    /// Through `post_raw`, then descriptor `which` of the chain rewritten with this `next`
    /// and `NEXT` set.
    Relink(Vec<RawDesc>, usize, Relink),
    /// A raw indirect table at `TABLE`, posted through one INDIRECT descriptor whose length
    /// is the table's (or this override).
    Table(Vec<(RawDesc, u16)>, Option<u32>),
    /// One INDIRECT descriptor as given.
    IndirectDesc(RawDesc),
    /// A head index out of range.
    Head(u16),
}

enum Relink {
    /// Back to the chain's first descriptor: a loop.
    ToHead,
    /// To this index.
    To(u16),
}

/// Posts `post` on queue `q`; returns the head if it names a descriptor.
fn post(bed: &mut Bed, q: usize, post: Post) -> Option<u16> {
    match post {
        Post::Raw(descs) => Some(bed.driver.post_raw(q, &descs).expect("room")),
        Post::Relink(descs, which, relink) => {
            let head = bed.driver.post_raw(q, &descs).expect("room");
            let ids = bed.driver.chain(q, head).unwrap().to_vec();
            let next = match relink {
                Relink::ToHead => ids[0],
                Relink::To(n) => n,
            };
            let mut desc = descs[which];
            desc.flags |= NEXT;
            bed.driver.write_desc(q, ids[which], desc, next);
            Some(head)
        }
        Post::Table(entries, len) => {
            let table_len = bed.driver.write_table(TABLE, &entries);
            let desc = d(TABLE, len.unwrap_or(table_len), INDIRECT);
            Some(bed.driver.post_raw(q, &[desc]).expect("room"))
        }
        Post::IndirectDesc(desc) => Some(bed.driver.post_raw(q, &[desc]).expect("room")),
        Post::Head(h) => {
            bed.driver.post_head(q, h);
            None
        }
    }
}

/// An RW packet for the live connection claiming `len` payload bytes, written at BUF with
/// `have` payload bytes; returns the bytes written.
fn rw_at_buf(bed: &Bed, len: u32, have: usize) -> u32 {
    write_packet(
        bed,
        BUF,
        pkt(Op::Rw, GP, PORT, len, 0, 0),
        &pattern(1, have),
    )
}

struct TxCase {
    name: &'static str,
    counter: &'static str,
    /// The connection is reset (the guest sees RST on it).
    resets: bool,
    build: fn(&Bed) -> Post,
}

fn tx_cases() -> Vec<TxCase> {
    vec![
        TxCase {
            name: "write-only descriptor in a tx chain",
            counter: "tx_write_only",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 10, 10);
                Post::Raw(vec![
                    d(BUF, HEADER_LEN as u32, 0),
                    d(BUF + HEADER_LEN as u64, 10, WRITE),
                ])
            },
        },
        TxCase {
            name: "write-only header descriptor",
            counter: "tx_write_only",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 0, 0);
                Post::Raw(vec![d(BUF, HEADER_LEN as u32, WRITE)])
            },
        },
        TxCase {
            name: "tx chain of 43 bytes",
            counter: "tx_too_short",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 0, 0);
                Post::Raw(vec![d(BUF, 43, 0)])
            },
        },
        TxCase {
            name: "tx chain of 43 bytes in three pieces",
            counter: "tx_too_short",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 0, 0);
                Post::Raw(vec![d(BUF, 20, 0), d(BUF + 20, 0, 0), d(BUF + 20, 23, 0)])
            },
        },
        TxCase {
            name: "empty tx chain (one zero-length descriptor)",
            counter: "tx_too_short",
            resets: false,
            build: |_| Post::Raw(vec![d(BUF, 0, 0)]),
        },
        TxCase {
            name: "header len beyond the chain",
            counter: "tx_len_beyond_chain",
            resets: true,
            build: |bed| {
                let n = rw_at_buf(bed, 100, 50);
                Post::Raw(vec![d(BUF, n, 0)])
            },
        },
        TxCase {
            name: "header len one byte beyond a split chain",
            counter: "tx_len_beyond_chain",
            resets: true,
            build: |bed| {
                rw_at_buf(bed, 51, 50);
                Post::Raw(vec![d(BUF, 30, 0), d(BUF + 30, 64, 0)])
            },
        },
        TxCase {
            name: "tx header outside guest memory",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Raw(vec![d(OUTSIDE, 100, 0)]),
        },
        TxCase {
            name: "tx header across the end of guest memory",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Raw(vec![d(MEM_SIZE - 20, 44, 0)]),
        },
        TxCase {
            name: "tx header at an address that overflows",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Raw(vec![d(u64::MAX - 10, 44, 0)]),
        },
        TxCase {
            name: "tx payload outside guest memory",
            counter: "tx_bad_memory",
            resets: true,
            build: |bed| {
                rw_at_buf(bed, 10, 0);
                Post::Raw(vec![d(BUF, HEADER_LEN as u32, 0), d(OUTSIDE, 10, 0)])
            },
        },
        TxCase {
            name: "indirect table that loops",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 10, 10);
                Post::Table(
                    vec![
                        (d(BUF, HEADER_LEN as u32, NEXT), 1),
                        (d(BUF + HEADER_LEN as u64, 10, NEXT), 0),
                    ],
                    None,
                )
            },
        },
        TxCase {
            name: "indirect table entry linking past the table",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 10, 10);
                Post::Table(
                    vec![
                        (d(BUF, HEADER_LEN as u32, NEXT), 7),
                        (d(BUF + HEADER_LEN as u64, 10, 0), 0),
                    ],
                    None,
                )
            },
        },
        TxCase {
            name: "indirect table outside guest memory",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::IndirectDesc(d(OUTSIDE, 32, INDIRECT)),
        },
        TxCase {
            name: "indirect table whose length is not a multiple of 16",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 0, 0);
                Post::Table(vec![(d(BUF, HEADER_LEN as u32, 0), 0)], Some(20))
            },
        },
        TxCase {
            name: "empty indirect table",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::IndirectDesc(d(TABLE, 0, INDIRECT)),
        },
        TxCase {
            name: "indirect table inside an indirect table",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 0, 0);
                Post::Table(vec![(d(TABLE + 0x1000, 16, INDIRECT), 0)], None)
            },
        },
        TxCase {
            name: "indirect table entry pointing outside guest memory",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Table(vec![(d(OUTSIDE, 44, 0), 0)], None),
        },
        TxCase {
            name: "chain longer than the queue (loop via NEXT)",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 10, 10);
                Post::Relink(
                    vec![
                        d(BUF, HEADER_LEN as u32, 0),
                        d(BUF + HEADER_LEN as u64, 10, 0),
                    ],
                    1,
                    Relink::ToHead,
                )
            },
        },
        TxCase {
            name: "single descriptor linked to itself",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                let n = rw_at_buf(bed, 0, 0);
                Post::Relink(vec![d(BUF, n, 0)], 0, Relink::ToHead)
            },
        },
        TxCase {
            name: "next descriptor index out of range",
            counter: "tx_bad_memory",
            resets: false,
            build: |bed| {
                rw_at_buf(bed, 10, 10);
                Post::Relink(
                    vec![
                        d(BUF, HEADER_LEN as u32, 0),
                        d(BUF + HEADER_LEN as u64, 10, 0),
                    ],
                    0,
                    Relink::To(QUEUE_SIZE + 44),
                )
            },
        },
        TxCase {
            name: "head descriptor index out of range",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Head(QUEUE_SIZE),
        },
        TxCase {
            name: "head descriptor index u16::MAX",
            counter: "tx_bad_memory",
            resets: false,
            build: |_| Post::Head(u16::MAX),
        },
    ]
}

#[test]
fn every_malformed_tx_chain_is_returned_counted_once_and_the_device_goes_on() {
    for case in tx_cases() {
        let (mut bed, conn) = live_bed();
        let before = bed.device.stats().clone();
        let engine_before = bed.device.engine().stats().clone();
        let p = (case.build)(&bed);
        let head = post(&mut bed, 1, p);
        // A well-formed packet right behind it, in the same serve call.
        bed.send(pkt(Op::Rw, GP, PORT, 4, 0, 0), b"good", &Layout::Single);
        let served = bed.try_serve().unwrap_or_else(|e| {
            panic!("{}: serve failed: {e}", case.name);
        });
        assert!(served.notify_tx, "{}: the guest is interrupted", case.name);
        // Only a chain whose header could be read and whose packet addressed the connection
        // (the resetting cases) reaches the engine; every other one is dropped before it.
        let engine_seen = bed.device.engine().stats().tx_packets - engine_before.tx_packets;
        assert_eq!(
            engine_seen,
            if case.resets { 2 } else { 1 },
            "{}: packets the engine saw",
            case.name
        );
        let used = bed.driver.take_used(1);
        match head {
            Some(head) => {
                assert_eq!(used.len(), 2, "{}: both chains used: {used:?}", case.name);
                assert_eq!(used[0].head, head, "{}: in order", case.name);
                assert_eq!(used[0].len, 0, "{}: tx used length", case.name);
            }
            None => assert_eq!(used.len(), 1, "{}: the good chain is used", case.name),
        }
        let after = bed.device.stats().clone();
        assert_counted_once(&before, &after, case.counter, case.name);
        assert_eq!(
            after.tx_chains,
            before.tx_chains + 2,
            "{}: tx chains",
            case.name
        );
        let got = bed.run();
        let rst = got
            .iter()
            .any(|(h, _)| h.dst_port.get() == GP && op_of(h) == Op::Rst);
        assert_eq!(rst, case.resets, "{}: RST to the guest: {got:?}", case.name);
        if case.resets {
            assert_eq!(
                bed.host.closed,
                vec![conn],
                "{}: host socket closed",
                case.name
            );
            assert!(
                app_read_all(bed.host.app(conn)).is_empty(),
                "{}: no byte of the bad packet reached the host",
                case.name
            );
            still_serves(&mut bed, None, case.name);
        } else {
            assert!(bed.host.closed.is_empty(), "{}", case.name);
            assert_eq!(
                app_read_all(bed.host.app(conn)),
                b"good",
                "{}: the packet behind it got through, alone",
                case.name
            );
            still_serves(&mut bed, Some(conn), case.name);
        }
    }
}

struct RxCase {
    name: &'static str,
    counter: &'static str,
    build: fn(&Bed) -> Post,
}

fn rx_cases() -> Vec<RxCase> {
    vec![
        RxCase {
            name: "read-only rx descriptor",
            counter: "rx_read_only",
            build: |_| Post::Raw(vec![d(BUF, 4096, 0)]),
        },
        RxCase {
            name: "read-only descriptor after a writable header",
            counter: "rx_read_only",
            build: |_| Post::Raw(vec![d(BUF, 44, WRITE), d(BUF + 64, 4000, 0)]),
        },
        RxCase {
            name: "rx chain of 43 bytes",
            counter: "rx_too_short",
            build: |_| Post::Raw(vec![d(BUF, 43, WRITE)]),
        },
        RxCase {
            name: "rx chain of 43 bytes in pieces",
            counter: "rx_too_short",
            build: |_| Post::Raw(vec![d(BUF, 40, WRITE), d(BUF + 64, 3, WRITE)]),
        },
        RxCase {
            name: "rx buffer outside guest memory",
            counter: "rx_bad_memory",
            build: |_| Post::Raw(vec![d(OUTSIDE, 4096, WRITE)]),
        },
        RxCase {
            name: "rx buffer across the end of guest memory",
            counter: "rx_bad_memory",
            build: |_| Post::Raw(vec![d(MEM_SIZE - 100, 4096, WRITE)]),
        },
        RxCase {
            name: "rx payload descriptor outside guest memory",
            counter: "rx_bad_memory",
            build: |_| Post::Raw(vec![d(BUF, 44, WRITE), d(OUTSIDE, 4000, WRITE)]),
        },
        RxCase {
            name: "rx indirect table that loops",
            counter: "rx_bad_memory",
            build: |_| {
                Post::Table(
                    vec![
                        (d(BUF, 44, WRITE | NEXT), 1),
                        (d(BUF + 64, 4000, WRITE | NEXT), 0),
                    ],
                    None,
                )
            },
        },
        RxCase {
            name: "rx indirect table outside guest memory",
            counter: "rx_bad_memory",
            build: |_| Post::IndirectDesc(d(OUTSIDE, 64, INDIRECT)),
        },
        RxCase {
            name: "rx chain longer than the queue (loop via NEXT)",
            counter: "rx_bad_memory",
            build: |_| {
                Post::Relink(
                    vec![d(BUF, 44, WRITE), d(BUF + 64, 4000, WRITE)],
                    1,
                    Relink::ToHead,
                )
            },
        },
        RxCase {
            name: "rx next index out of range",
            counter: "rx_bad_memory",
            build: |_| {
                Post::Relink(
                    vec![d(BUF, 44, WRITE), d(BUF + 64, 4000, WRITE)],
                    0,
                    Relink::To(1000),
                )
            },
        },
        RxCase {
            name: "rx head index out of range",
            counter: "rx_bad_memory",
            build: |_| Post::Head(QUEUE_SIZE + 1),
        },
    ]
}

#[test]
fn every_malformed_rx_chain_is_returned_empty_counted_once_and_the_device_goes_on() {
    for case in rx_cases() {
        let mut bed = Bed::new();
        let p = (case.build)(&bed);
        let head = post(&mut bed, 0, p);
        bed.post_rx(4, &Layout::Single);
        let before = bed.device.stats().clone();
        // Something for the guest: the answer to a connect.
        bed.host.listening.insert(PORT);
        bed.send(pkt(Op::Request, GP, PORT, 0, 0, 0), &[], &Layout::Single);
        let _ = bed
            .try_serve()
            .unwrap_or_else(|e| panic!("{}: serve failed: {e}", case.name));
        let used = bed.driver.take_used(0);
        let good = match head {
            Some(head) => {
                assert!(used.len() >= 2, "{}: {used:?}", case.name);
                assert_eq!(used[0].head, head, "{}: in order", case.name);
                assert_eq!(used[0].len, 0, "{}: returned empty", case.name);
                &used[1]
            }
            None => &used[0],
        };
        let (h, _) = vsock_device::testing::parse_rx(good);
        assert_eq!(op_of(&h), Op::Response, "{}: the next buffer", case.name);
        let after = bed.device.stats().clone();
        assert_counted_once(&before, &after, case.counter, case.name);
        let conn = ConnId::from_raw(*bed.host.apps.keys().next().unwrap());
        still_serves(&mut bed, Some(conn), case.name);
    }
}

#[test]
fn malformed_rx_chains_are_only_taken_when_there_is_something_to_send() {
    let mut bed = Bed::new();
    bed.driver.post_raw(0, &[d(BUF, 43, WRITE)]).unwrap();
    let _ = bed.serve();
    assert!(bed.driver.take_used(0).is_empty());
    assert_eq!(bed.device.stats().rx_too_short, 0);
    assert_eq!(bed.driver.in_flight(0), 1, "still posted, untouched");
}

#[test]
fn a_burst_of_malformed_chains_mixed_with_good_ones_is_fully_returned() {
    let (mut bed, conn) = live_bed();
    let mut expect = Vec::new();
    let cases = tx_cases();
    for (i, case) in cases.iter().enumerate() {
        if case.resets {
            continue;
        }
        let p = (case.build)(&bed);
        // Each case writes at the same scratch addresses: post one and serve it before the
        // next overwrites them, but leave the used ring for the end.
        post(&mut bed, 1, p);
        let good = format!("<{i}>");
        bed.send(
            pkt(Op::Rw, GP, PORT, good.len() as u32, 0, 0),
            good.as_bytes(),
            &Layout::Single,
        );
        expect.extend_from_slice(good.as_bytes());
        let _ = bed.serve();
    }
    bed.run();
    assert_eq!(app_read_all(bed.host.app(conn)), expect);
    assert_eq!(bed.driver.in_flight(1), 0);
    still_serves(&mut bed, Some(conn), "burst");
}
