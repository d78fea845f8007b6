//! Every way a driver may lay a buffer out in descriptors, for tx and rx: the header split at
//! each offset, the data split anywhere, many tiny descriptors, indirect tables, and buffers
//! spanning two guest memory regions.

mod common;

use std::io::Write;

use common::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vsock_core::wire::{Header, Op, HEADER_LEN};
use vsock_core::{Config, ConnId};
use vsock_device::testing::{Driver, Layout, RawDesc, SCRATCH};
use zerocopy::IntoBytes;

const PORT: u32 = 1234;
const GP: u32 = 44_000;

/// Sends `data` from the guest in tx `layout` and checks the host application got it.
fn guest_to_host(bed: &mut Bed, conn: ConnId, data: &[u8], layout: &Layout) {
    bed.send(pkt(Op::Rw, GP, PORT, data.len() as u32, 0, 0), data, layout);
    let got = bed.run();
    assert!(
        !got.iter().any(|(h, _)| op_of(h) == Op::Rst),
        "tx {layout:?}: {got:?}"
    );
    assert_eq!(bed.driver.in_flight(1), 0, "tx {layout:?}: chain returned");
    assert_eq!(
        app_read_all(bed.host.app(conn)),
        data,
        "tx {layout:?}: bytes at the host"
    );
}

/// Writes `data` on the host side and checks the guest got it, in RW packets whose used
/// length is header plus payload.
fn host_to_guest(bed: &mut Bed, conn: ConnId, data: &[u8], what: &str) {
    bed.host.app(conn).write_all(data).unwrap();
    let got = bed.run();
    let mut received = Vec::new();
    for (h, payload) in &got {
        match op_of(h) {
            Op::Rw => {
                assert_eq!(h.dst_port.get(), GP);
                assert_eq!(h.len.get() as usize, payload.len(), "{what}: used length");
                received.extend_from_slice(payload);
            }
            Op::CreditUpdate => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
    assert_eq!(received, data, "{what}: bytes in the guest");
}

fn bed_with(rx: &Layout) -> (Bed, ConnId) {
    let mut bed = Bed::new();
    // As many buffers as the queue's descriptors allow, up to 8.
    let descriptors = match rx {
        Layout::Cuts(c) => c.len() + 1,
        _ => 2,
    };
    bed.post_rx((256 / descriptors).clamp(1, 8), rx);
    let (conn, _) = bed.connect(GP, PORT);
    (bed, conn)
}

#[test]
fn tx_header_split_at_every_offset() {
    let (mut bed, conn) = bed_with(&Layout::Single);
    for k in 1..=HEADER_LEN {
        let data = pattern(k as u64, 300);
        guest_to_host(&mut bed, conn, &data, &Layout::Cuts(vec![k]));
        // The header split and the data split too.
        guest_to_host(
            &mut bed,
            conn,
            &data,
            &Layout::Cuts(vec![k, HEADER_LEN + 7]),
        );
        // Through an indirect table.
        let indirect = Layout::Indirect(Box::new(Layout::Cuts(vec![k])));
        guest_to_host(&mut bed, conn, &data, &indirect);
    }
}

#[test]
fn tx_data_split_at_several_offsets() {
    let (mut bed, conn) = bed_with(&Layout::Single);
    let h = HEADER_LEN;
    let cuts: Vec<Vec<usize>> = vec![
        vec![h + 1],
        vec![h + 1, h + 2],
        vec![h, h + 1],
        vec![h + 100],
        vec![h + 999],
        vec![h + 4095, h + 4096, h + 4097],
        vec![10, h + 500, h + 501, h + 4000],
        (1..60).map(|i| h + i * 97).collect(),
    ];
    for c in cuts {
        let data = pattern(c.len() as u64, 5000);
        guest_to_host(&mut bed, conn, &data, &Layout::Cuts(c.clone()));
        let indirect = Layout::Indirect(Box::new(Layout::Cuts(c)));
        guest_to_host(&mut bed, conn, &data, &indirect);
    }
}

#[test]
fn tx_many_tiny_descriptors() {
    let (mut bed, conn) = bed_with(&Layout::Single);
    // 44 + 150 = 194 one-byte descriptors, more than one writev covers.
    guest_to_host(&mut bed, conn, &pattern(7, 150), &Layout::Bytewise);
    let indirect = Layout::Indirect(Box::new(Layout::Bytewise));
    guest_to_host(&mut bed, conn, &pattern(8, 200), &indirect);
    // Tiny pieces, then a large one.
    let cuts: Vec<usize> = (1..120).collect();
    guest_to_host(&mut bed, conn, &pattern(9, 20_000), &Layout::Cuts(cuts));
    // Chains longer than one writev covers are written over several, straight from guest
    // memory: a short count would leave the engine waiting for a writable edge the kernel
    // never sends for a socket that is not full.
    assert_eq!(
        bed.device.engine().stats().tx_buffered_bytes,
        0,
        "every piece went straight to the socket"
    );
}

#[test]
fn tx_zero_length_descriptors_are_skipped() {
    let (mut bed, conn) = bed_with(&Layout::Single);
    let data = pattern(10, 100);
    let mut bytes = pkt(Op::Rw, GP, PORT, 100, 0, 0).as_bytes().to_vec();
    bytes.extend_from_slice(&data);
    bed.driver
        .mem
        .write_slice(&bytes, GuestAddress(SCRATCH))
        .unwrap();
    let d = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: 0,
    };
    bed.driver
        .post_raw(
            1,
            &[
                d(SCRATCH, 0),
                d(SCRATCH, 30),
                d(SCRATCH + 30, 0),
                d(SCRATCH + 30, 50),
                d(SCRATCH, 0),
                d(SCRATCH + 80, 64),
            ],
        )
        .unwrap();
    bed.run();
    assert_eq!(app_read_all(bed.host.app(conn)), data);
}

#[test]
fn rx_header_split_at_every_offset() {
    for k in 1..=HEADER_LEN {
        for layout in [
            Layout::Cuts(vec![k]),
            Layout::Cuts(vec![k, HEADER_LEN + 3, HEADER_LEN + 1000]),
            Layout::Indirect(Box::new(Layout::Cuts(vec![k]))),
        ] {
            let (mut bed, conn) = bed_with(&layout);
            host_to_guest(
                &mut bed,
                conn,
                &pattern(k as u64, 9000),
                &format!("rx {layout:?}"),
            );
        }
    }
}

#[test]
fn rx_data_split_and_tiny_descriptors() {
    let h = HEADER_LEN;
    for layout in [
        Layout::HeaderThenData,
        Layout::Cuts(vec![h + 1]),
        Layout::Cuts(vec![h, h + 1, h + 2, h + 3]),
        Layout::Cuts((1..200).collect()),
        Layout::Cuts((1..100).map(|i| i * 40).collect()),
        Layout::Indirect(Box::new(Layout::Cuts((1..200).collect()))),
        Layout::Indirect(Box::new(Layout::HeaderThenData)),
        Layout::Indirect(Box::new(Layout::Single)),
    ] {
        let (mut bed, conn) = bed_with(&layout);
        host_to_guest(
            &mut bed,
            conn,
            &pattern(3, 40_000),
            &format!("rx {layout:?}"),
        );
        // Control packets (header only) in the same layout.
        bed.host
            .app(conn)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let got = bed.run();
        assert_eq!(got.len(), 1, "rx {layout:?}: {got:?}");
        assert_eq!(op_of(&got[0].0), Op::Shutdown);
    }
}

/// The start of the second guest memory region in the split-memory tests.
const SPLIT: u64 = SCRATCH + 0x8000;

fn split_bed() -> (Bed, ConnId) {
    let driver = Driver::with_split_memory(SPLIT);
    let mut bed = Bed::with_driver(Config::new(GUEST_CID), true, driver);
    bed.post_rx(4, &Layout::Single);
    let (conn, _) = bed.connect(GP, PORT);
    (bed, conn)
}

#[test]
fn guest_memory_really_has_two_regions() {
    use vm_memory::GuestMemoryBackend;
    let (bed, _) = split_bed();
    assert_eq!(bed.driver.mem.num_regions(), 2);
    assert!(bed
        .driver
        .mem
        .get_slice(GuestAddress(SPLIT - 4), 8)
        .is_err());
}

#[test]
fn tx_buffers_spanning_two_memory_regions() {
    let (mut bed, conn) = split_bed();
    let d = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: 0,
    };
    // The header across the boundary, in one descriptor.
    for start in [SPLIT - 20, SPLIT - 44, SPLIT - 45, SPLIT - 1] {
        let data = pattern(start, 3000);
        let mut bytes = pkt(Op::Rw, GP, PORT, 3000, 0, 0).as_bytes().to_vec();
        bytes.extend_from_slice(&data);
        bed.driver
            .mem
            .write_slice(&bytes, GuestAddress(start))
            .unwrap();
        bed.driver
            .post_raw(1, &[d(start, bytes.len() as u32)])
            .unwrap();
        bed.run();
        assert_eq!(
            app_read_all(bed.host.app(conn)),
            data,
            "one descriptor from {:#x}",
            start
        );
    }
    // Two descriptors, one in each region, far apart.
    let data = pattern(77, 2000);
    let header = pkt(Op::Rw, GP, PORT, 2000, 0, 0);
    let first = SPLIT - 0x4000;
    let second = SPLIT + 0x4000;
    bed.driver
        .mem
        .write_slice(header.as_bytes(), GuestAddress(first))
        .unwrap();
    bed.driver
        .mem
        .write_slice(&data, GuestAddress(second))
        .unwrap();
    bed.driver
        .post_raw(1, &[d(first, HEADER_LEN as u32), d(second, 2000)])
        .unwrap();
    bed.run();
    assert_eq!(app_read_all(bed.host.app(conn)), data, "two regions");
    assert_eq!(bed.device.stats().tx_bad_memory, 0);
}

#[test]
fn rx_buffers_spanning_two_memory_regions() {
    let (mut bed, conn) = split_bed();
    // Stop the bed reposting its own buffers: only the raw ones below are posted.
    bed.rx_layout = None;
    let _ = bed.serve();
    bed.driver.take_used(0);
    let write = VRING_DESC_F_WRITE as u16;
    for (i, start) in [SPLIT - 20, SPLIT - 44, SPLIT - 50, SPLIT - 4000]
        .into_iter()
        .enumerate()
    {
        // Use up the posted Single buffers first, so the raw one is next.
        while bed.driver.in_flight(0) > 0 {
            bed.host.app(conn).write_all(b"x").unwrap();
            bed.run();
        }
        let head = bed
            .driver
            .post_raw(
                0,
                &[RawDesc {
                    addr: start,
                    len: 4096,
                    flags: write,
                }],
            )
            .unwrap();
        let data = pattern(i as u64, 4096 - HEADER_LEN);
        bed.host.app(conn).write_all(&data).unwrap();
        bed.host.poke(bed.device.engine_mut(), bed.now);
        let _ = bed.serve();
        let used = bed.driver.take_used(0);
        assert_eq!(used.len(), 1, "{start:#x}");
        assert_eq!(used[0].head, head);
        assert_eq!(used[0].len, 4096, "{start:#x}: a full buffer");
        let mut bytes = vec![0u8; 4096];
        bed.driver
            .mem
            .read_slice(&mut bytes, GuestAddress(start))
            .unwrap();
        let h = Header::read_from(&bytes).unwrap();
        assert_eq!(op_of(&h), Op::Rw, "{start:#x}");
        assert_eq!(h.len.get() as usize, data.len());
        assert_eq!(&bytes[HEADER_LEN..], &data[..], "{start:#x}: payload");
    }
    // A chain with the header in one region and the data in the other.
    let first = SPLIT - 0x4000;
    let second = SPLIT + 0x4000;
    let head = bed
        .driver
        .post_raw(
            0,
            &[
                RawDesc {
                    addr: first,
                    len: HEADER_LEN as u32,
                    flags: write | VRING_DESC_F_NEXT as u16,
                },
                RawDesc {
                    addr: second,
                    len: 1000,
                    flags: write,
                },
            ],
        )
        .unwrap();
    bed.host.app(conn).write_all(&pattern(5, 1000)).unwrap();
    bed.host.poke(bed.device.engine_mut(), bed.now);
    let _ = bed.serve();
    let used = bed.driver.take_used(0);
    assert_eq!(used.len(), 1);
    assert_eq!((used[0].head, used[0].len), (head, 1044));
    let mut hb = [0u8; HEADER_LEN];
    bed.driver
        .mem
        .read_slice(&mut hb, GuestAddress(first))
        .unwrap();
    assert_eq!(Header::read_from(&hb).unwrap().len.get(), 1000);
    let mut payload = vec![0u8; 1000];
    bed.driver
        .mem
        .read_slice(&mut payload, GuestAddress(second))
        .unwrap();
    assert_eq!(payload, pattern(5, 1000));
    assert_eq!(bed.device.stats().rx_bad_memory, 0);
}
