//! The device over real virtqueue memory and real Unix sockets.

mod common;

use std::io::Write;

use common::*;
use vsock_core::wire::{Op, HEADER_LEN};
use vsock_device::testing::Layout;

/// Opens a guest connection from guest port `gp` to host port 1234; returns its host
/// connection's application end key.
fn connect(bed: &mut Bed, gp: u32) -> vsock_core::ConnId {
    bed.host.listening.insert(1234);
    bed.send(pkt(Op::Request, gp, 1234, 0, 0, 0), &[], &Layout::Single);
    let got = bed.run();
    let (h, _) = got
        .iter()
        .find(|(h, _)| h.dst_port.get() == gp)
        .expect("an answer");
    assert_eq!(op_of(h), Op::Response);
    assert_eq!(h.buf_alloc.get(), 256 * 1024);
    let conn = *bed.host.apps.keys().last().unwrap();
    vsock_core::ConnId::from_raw(conn)
}

#[test]
fn guest_connects_and_data_flows_both_ways_in_every_layout() {
    let layouts = [
        Layout::Single,
        Layout::HeaderThenData,
        Layout::Cuts(vec![10, 44, 45, 100]),
        Layout::Cuts(vec![43]),
        Layout::Cuts(vec![1, 2, 3, 50, 51]),
        Layout::Bytewise,
        Layout::Indirect(Box::new(Layout::Single)),
        Layout::Indirect(Box::new(Layout::Cuts(vec![20, 44, 60]))),
    ];
    for (i, layout) in layouts.iter().enumerate() {
        let mut bed = Bed::new();
        let rx_layout = match layout {
            Layout::Bytewise => Layout::Cuts((1..40).collect()),
            other => other.clone(),
        };
        bed.post_rx(4, &rx_layout);
        let gp = 50_000 + i as u32;
        let conn = connect(&mut bed, gp);
        let data = pattern(
            i as u64,
            if *layout == Layout::Bytewise {
                150
            } else {
                3000
            },
        );
        bed.send(
            pkt(Op::Rw, gp, 1234, data.len() as u32, 0, 0),
            &data,
            layout,
        );
        bed.run();
        assert_eq!(
            app_read_all(bed.host.app(conn)),
            data,
            "guest to host in {layout:?}"
        );

        let back = pattern(100 + i as u64, 10_000);
        bed.host.app(conn).write_all(&back).unwrap();
        let got = bed.run();
        let mut received = Vec::new();
        for (h, payload) in &got {
            assert_eq!(op_of(h), Op::Rw);
            assert_eq!(h.len.get() as usize, payload.len());
            assert!(payload.len() <= 4096 - HEADER_LEN);
            received.extend_from_slice(payload);
        }
        assert_eq!(received, back, "host to guest in {layout:?}");
        assert_eq!(bed.driver.in_flight(1), 0, "every tx chain returned");
    }
}
