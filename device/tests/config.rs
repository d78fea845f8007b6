//! Config space and feature negotiation.

use vsock_core::wire::{VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_SEQPACKET};
use vsock_core::{Config, Instant};
use vsock_device::{FeatureError, VsockDevice};

const STREAM: u64 = 1 << 0;
const SEQPACKET: u64 = 1 << VIRTIO_VSOCK_F_SEQPACKET;
const NO_IMPLIED_STREAM: u64 = 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM;
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT_DESC: u64 = 1 << 28;
const RING_PACKED: u64 = 1 << 34;

fn device(cid: u64) -> VsockDevice {
    VsockDevice::new(Config::new(cid), Instant::ZERO).unwrap()
}

#[test]
fn config_space_reads_the_le64_guest_cid_at_every_offset_and_width() {
    for cid in [3u64, 0x1234_5678, 0xffff_fffe, 0x0102_0304] {
        let dev = device(cid);
        let bytes = cid.to_le_bytes();
        for width in [1usize, 2, 4, 8] {
            for offset in 0..16u64 {
                let mut data = vec![0xaau8; width];
                dev.read_config(offset, &mut data);
                let want: Vec<u8> = (0..width)
                    .map(|i| bytes.get(offset as usize + i).copied().unwrap_or(0))
                    .collect();
                assert_eq!(data, want, "cid {cid:#x}, offset {offset}, width {width}");
            }
        }
        let mut whole = [0u8; 8];
        dev.read_config(0, &mut whole);
        assert_eq!(u64::from_le_bytes(whole), cid);
    }
}

#[test]
fn config_space_reads_far_beyond_its_end_are_zero() {
    let dev = device(7);
    for offset in [8, 100, 4096, u32::MAX as u64, u64::MAX - 3, u64::MAX] {
        let mut data = [0x55u8; 8];
        dev.read_config(offset, &mut data);
        assert_eq!(data, [0; 8], "offset {offset:#x}");
    }
    let mut empty = [];
    dev.read_config(0, &mut empty);
    // A read straddling the end: the CID's last bytes, then zeros.
    let mut data = [0x55u8; 4];
    dev.read_config(6, &mut data);
    assert_eq!(data, [0, 0, 0, 0], "cid 7 has zero high bytes");
    let dev = device(0x0a0b_0c0d);
    let mut data = [0x55u8; 4];
    dev.read_config(2, &mut data);
    assert_eq!(data, [0x0b, 0x0a, 0, 0]);
}

#[test]
fn config_space_writes_are_ignored_and_counted() {
    let mut dev = device(9);
    dev.write_config(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    dev.write_config(4, &[1]);
    let mut data = [0u8; 8];
    dev.read_config(0, &mut data);
    assert_eq!(u64::from_le_bytes(data), 9);
    assert_eq!(dev.stats().config_writes, 2);
}

#[test]
fn offered_features() {
    let dev = device(3);
    let f = dev.features();
    assert_eq!(
        f,
        VERSION_1 | EVENT_IDX | INDIRECT_DESC | STREAM | SEQPACKET | NO_IMPLIED_STREAM
    );
    assert_eq!(f & RING_PACKED, 0, "virtio-queue has split rings only");
    // Switched off, seqpacket is not offered, and a driver that acks it is refused.
    let mut dev = device(3);
    dev.set_seqpacket(false);
    assert_eq!(dev.features(), f & !SEQPACKET);
    assert_eq!(
        dev.ack_features(VERSION_1 | SEQPACKET),
        Err(FeatureError::NotOffered(SEQPACKET))
    );
}

#[test]
fn negotiated_features_give_the_socket_types() {
    use vsock_core::SocketTypes;
    let types = |acked: u64| {
        let mut dev = device(3);
        dev.ack_features(acked).unwrap();
        dev.socket_types()
    };
    let t = |stream, seqpacket| SocketTypes { stream, seqpacket };
    // No socket bit: streams are implied.
    assert_eq!(types(VERSION_1), t(true, false));
    // Linux 6.1 acks SEQPACKET alone and relies on streams being implied.
    assert_eq!(types(VERSION_1 | SEQPACKET), t(true, true));
    assert_eq!(types(VERSION_1 | STREAM | SEQPACKET), t(true, true));
    assert_eq!(
        types(VERSION_1 | STREAM | NO_IMPLIED_STREAM),
        t(true, false)
    );
    // Seqpacket only, streams excluded: a driver the device serves (seqpacket only).
    assert_eq!(
        types(VERSION_1 | SEQPACKET | NO_IMPLIED_STREAM),
        t(false, true)
    );
}

#[test]
fn ack_features_refuses_no_implied_stream_without_stream() {
    let mut dev = device(3);
    assert_eq!(
        dev.ack_features(VERSION_1 | NO_IMPLIED_STREAM),
        Err(FeatureError::NoStream)
    );
    assert_eq!(dev.acked_features(), 0, "nothing recorded");
    assert_eq!(
        dev.ack_features(VERSION_1 | EVENT_IDX | NO_IMPLIED_STREAM),
        Err(FeatureError::NoStream)
    );
    assert_eq!(dev.acked_features(), 0);
    // With STREAM it is fine; without NO_IMPLIED_STREAM stream is implied, also fine.
    assert_eq!(
        dev.ack_features(VERSION_1 | STREAM | NO_IMPLIED_STREAM),
        Ok(())
    );
    assert_eq!(dev.acked_features(), VERSION_1 | STREAM | NO_IMPLIED_STREAM);
    assert_eq!(dev.ack_features(VERSION_1), Ok(()));
    assert_eq!(dev.acked_features(), VERSION_1);
    assert!(!dev.event_idx());
}

#[test]
fn ack_features_refuses_bits_not_offered() {
    let mut dev = device(3);
    dev.ack_features(dev.features()).unwrap();
    let all = dev.features();
    assert!(dev.event_idx());
    for bit in 0..64 {
        let b = 1u64 << bit;
        if all & b != 0 {
            continue;
        }
        assert_eq!(
            dev.ack_features(VERSION_1 | STREAM | b),
            Err(FeatureError::NotOffered(b)),
            "bit {bit}"
        );
        assert_eq!(dev.acked_features(), all, "bit {bit}: the old set stays");
    }
    assert_eq!(
        dev.ack_features(SEQPACKET | RING_PACKED | STREAM),
        Err(FeatureError::NotOffered(RING_PACKED))
    );
    // Both errors at once: the unoffered bits are reported.
    assert_eq!(
        dev.ack_features(NO_IMPLIED_STREAM | RING_PACKED),
        Err(FeatureError::NotOffered(RING_PACKED))
    );
}

#[test]
fn features_are_cleared_by_reset() {
    let mut dev = device(3);
    dev.ack_features(dev.features()).unwrap();
    dev.reset(Instant::from_secs(1));
    assert_eq!(dev.acked_features(), 0);
    assert!(!dev.event_idx());
}
