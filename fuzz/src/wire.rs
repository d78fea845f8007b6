//! The `wire` target: any bytes as a 44-byte header.

use vsock_core::wire::{
    ConfigSpace, Event, Header, HeaderError, OkLine, Op, Packet, SocketType, CID_RESERVED_MASK,
    HEADER_LEN,
};
use zerocopy::{FromBytes, IntoBytes};

/// Parses `data` as a header (and, from the bytes after it, the payload limit), checks that
/// validation agrees with the header's fields and that a parsed packet re-encodes to the
/// same bytes.
pub fn run(data: &[u8]) {
    let Some(header) = Header::read_from(data) else {
        assert!(
            data.len() < HEADER_LEN,
            "{} bytes make no header",
            data.len()
        );
        return;
    };
    assert_eq!(
        header.as_bytes(),
        &data[..HEADER_LEN],
        "a header is its bytes"
    );
    let _ = format!("{header:?}");
    // The payload limit: the four bytes after the header, or the default packet size.
    let max_len = data
        .get(HEADER_LEN..HEADER_LEN + 4)
        .map_or(64 * 1024, |b| u32::from_le_bytes(b.try_into().unwrap()));

    let src_cid = header.src_cid.get();
    let dst_cid = header.dst_cid.get();
    let raw_type = header.type_.get();
    let raw_op = header.op.get();
    let len = header.len.get();
    // The documented order of the checks: CID bits, type, op, length.
    let expected = if (src_cid | dst_cid) & CID_RESERVED_MASK != 0 {
        Some(HeaderError::ReservedCidBits)
    } else if SocketType::from_u16(raw_type).is_none() {
        Some(HeaderError::UnknownType(raw_type))
    } else if Op::from_u16(raw_op).is_none() {
        Some(HeaderError::UnknownOp(raw_op))
    } else if raw_op == Op::Rw.to_u16() && len > max_len {
        Some(HeaderError::OversizeLen(len))
    } else if raw_op != Op::Rw.to_u16() && len != 0 {
        Some(HeaderError::PayloadOnControl(len))
    } else {
        None
    };

    match Packet::parse(&header, max_len) {
        Ok(packet) => {
            assert_eq!(expected, None, "accepted {header:?}");
            assert_eq!(packet.socket_type.to_u16(), raw_type);
            assert_eq!(packet.op.to_u16(), raw_op);
            assert_eq!(SocketType::from_u16(raw_type), Some(packet.socket_type));
            assert_eq!(Op::from_u16(raw_op), Some(packet.op));
            let again = packet.to_header();
            assert_eq!(
                again.as_bytes(),
                header.as_bytes(),
                "re-encoding changed bytes"
            );
            assert_eq!(Packet::parse(&again, max_len), Ok(packet));
            // A packet the engine builds with the same fields reads back the same.
            let copy = Header::read_from(again.as_bytes()).expect("44 bytes");
            assert_eq!(copy, again);
        }
        Err(e) => {
            assert_eq!(Some(e), expected, "rejected {header:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    // The other fixed layouts read from the same bytes.
    let (config, _) = ConfigSpace::read_from_prefix(data).expect("44 >= 8 bytes");
    assert_eq!(config.as_bytes(), &data[..8]);
    let (event, _) = Event::read_from_prefix(data).expect("44 >= 4 bytes");
    assert_eq!(event.as_bytes(), &data[..4]);

    // The reply line for a port taken from the header bytes.
    let port = header.src_port.get();
    assert_eq!(
        OkLine::new(port).as_bytes(),
        format!("OK {port}\n").as_bytes()
    );
}
