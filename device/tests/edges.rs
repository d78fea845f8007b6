//! Edge cases found in review: header-only rx buffers, restored state for another guest,
//! sockets a runtime left in blocking mode.

mod common;

use std::io::Write;

use common::*;
use vsock_core::wire::Op;
use vsock_core::Config;
use vsock_device::testing::Layout;
use vsock_device::DeviceError;

#[test]
fn a_header_only_rx_buffer_does_not_stall_data_behind_it() {
    let mut bed = Bed::new();
    // One buffer for the RESPONSE, none reposted.
    bed.driver.post_rx(4096, &Layout::Single).unwrap();
    let (conn, _) = bed.connect(50_000, 1234);
    assert_eq!(bed.driver.in_flight(0), 0);
    // Only room for a header: useless for the data that is waiting.
    bed.driver.post_rx(44, &Layout::Single).unwrap();
    bed.driver.post_rx(4096, &Layout::Single).unwrap();
    bed.host.app(conn).write_all(b"payload").unwrap();
    let got = bed.run();
    assert_eq!(bed.device.stats().rx_too_short, 1);
    let data: Vec<u8> = got
        .iter()
        .filter(|(h, _)| op_of(h) == Op::Rw)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data, b"payload", "the data went into the buffer behind");
}

#[test]
fn a_header_only_rx_buffer_still_carries_control_packets() {
    let mut bed = Bed::new();
    bed.host.listening.insert(1234);
    // The REQUEST's answer fits in a header-only buffer.
    bed.driver.post_rx(44, &Layout::Single).unwrap();
    bed.send(
        pkt(Op::Request, 50_000, 1234, 0, 0, 0),
        &[],
        &Layout::Single,
    );
    let got = bed.run();
    assert_eq!(got.len(), 1);
    assert_eq!(op_of(&got[0].0), Op::Response);
    assert_eq!(bed.device.stats().rx_too_short, 0);
}

#[test]
fn restore_refuses_state_saved_for_another_guest() {
    let mut bed = Bed::new();
    let mut state = bed.save();
    state.guest_cid = GUEST_CID + 1;
    match bed.device.restore(bed.now, &state) {
        Err(DeviceError::GuestCid { saved, ours }) => {
            assert_eq!((saved, ours), (GUEST_CID + 1, GUEST_CID));
        }
        other => panic!("expected a CID mismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_socket_left_blocking_never_blocks_serve() {
    let mut config = Config::new(GUEST_CID);
    config.buffer_size = 64 * 1024;
    config.credit_update_threshold = 16 * 1024;
    let mut bed = Bed::with_config(config, true);
    bed.post_rx(8, &Layout::Single);
    let (conn, _) = bed.connect(50_000, 1234);
    // A careless runtime hands the device a blocking socket.
    bed.host.socks[&conn.to_raw()]
        .set_nonblocking(false)
        .unwrap();
    // The host application reads nothing: the socket buffer fills, then the engine's.
    let chunk = pattern(1, 60_000);
    for _ in 0..40 {
        bed.send(
            pkt(Op::Rw, 50_000, 1234, chunk.len() as u32, 0, 0),
            &chunk,
            &Layout::Single,
        );
        // Returns (a blocking write would hang here forever).
        let _ = bed.serve();
        bed.driver.take_used(1);
        bed.driver.take_used(0);
        if bed.device.engine().stats().credit_violation > 0 {
            break;
        }
    }
    // The guest above ignores credit, so it is eventually reset for overrunning it, which is
    // the defined reaction: nothing blocked, nothing silently lost.
    assert_eq!(bed.device.engine().stats().credit_violation, 1);
}
