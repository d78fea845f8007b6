//! Interface 0: each packet between guest and device as Linux's `vsockmon` captures it: the
//! 32-byte `af_vsockmon_hdr`, the 44-byte virtio header, then the payload. Every field is
//! little-endian. Wireshark reads this link type as "vSocket".

use std::fmt;

use vsock_core::wire::{Header, HEADER_LEN};
use zerocopy::IntoBytes;

/// `LINKTYPE_VSOCK`.
pub const LINKTYPE_VSOCK: u16 = 271;
/// The length of `af_vsockmon_hdr`.
pub const MONITOR_LEN: usize = 32;
/// The monitor header and the virtio header.
pub const RECORD_HEADER_LEN: usize = MONITOR_LEN + HEADER_LEN;

/// `af_vsockmon_hdr.transport` for virtio.
const TRANSPORT_VIRTIO: u16 = 2;

/// The `vsockmon` operation for a virtio operation, as Linux's tap maps it.
pub fn monitor_op(virtio_op: u16) -> u16 {
    match virtio_op {
        // REQUEST, RESPONSE: CONNECT
        1 | 2 => 1,
        // RST, SHUTDOWN: DISCONNECT
        3 | 4 => 2,
        // CREDIT_UPDATE, CREDIT_REQUEST: CONTROL
        6 | 7 => 3,
        // RW: PAYLOAD
        5 => 4,
        _ => 0,
    }
}

/// The 76 bytes that start the record of a packet with `header`.
pub fn record_header(header: &Header) -> [u8; RECORD_HEADER_LEN] {
    let mut out = [0u8; RECORD_HEADER_LEN];
    out[0..8].copy_from_slice(&header.src_cid.get().to_le_bytes());
    out[8..16].copy_from_slice(&header.dst_cid.get().to_le_bytes());
    out[16..20].copy_from_slice(&header.src_port.get().to_le_bytes());
    out[20..24].copy_from_slice(&header.dst_port.get().to_le_bytes());
    out[24..26].copy_from_slice(&monitor_op(header.op.get()).to_le_bytes());
    out[26..28].copy_from_slice(&TRANSPORT_VIRTIO.to_le_bytes());
    out[28..30].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    out[MONITOR_LEN..].copy_from_slice(header.as_bytes());
    out
}

/// Why a record is not a well-formed packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than the two headers.
    Short(usize),
    /// The monitor header names another transport, or another transport header length.
    NotVirtio,
    /// The monitor header's addresses or operation disagree with the virtio header's.
    HeadersDisagree(&'static str),
    /// The record holds more payload than the virtio header says.
    PayloadLength {
        /// The virtio header's `len`.
        header: u32,
        /// Payload bytes in the record.
        record: usize,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Short(n) => write!(f, "{n} bytes, shorter than the two headers"),
            RecordError::NotVirtio => f.write_str("not a virtio transport record"),
            RecordError::HeadersDisagree(what) => {
                write!(f, "the vsockmon and virtio headers disagree on {what}")
            }
            RecordError::PayloadLength { header, record } => write!(
                f,
                "the virtio header says {header} payload bytes, the record holds {record}"
            ),
        }
    }
}

impl std::error::Error for RecordError {}

/// A packet read back from its record: the virtio header and the captured payload (shorter
/// than `header.len` when the trace was recorded with a snap length, or when the recorder
/// never saw the payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// The virtio header.
    pub header: Header,
    /// The captured payload.
    pub payload: &'a [u8],
}

/// Parses and checks a record. The two headers must agree (Wireshark does not check that)
/// and the payload must not be longer than the virtio header says.
///
/// # Errors
///
/// [`RecordError`].
pub fn parse(data: &[u8]) -> Result<Record<'_>, RecordError> {
    if data.len() < RECORD_HEADER_LEN {
        return Err(RecordError::Short(data.len()));
    }
    let u16_at = |at: usize| u16::from_le_bytes([data[at], data[at + 1]]);
    if u16_at(26) != TRANSPORT_VIRTIO || usize::from(u16_at(28)) != HEADER_LEN {
        return Err(RecordError::NotVirtio);
    }
    let header = Header::read_from(&data[MONITOR_LEN..]).expect("44 bytes checked");
    let expected = record_header(&header);
    for (name, range) in [
        ("src_cid", 0..8),
        ("dst_cid", 8..16),
        ("src_port", 16..20),
        ("dst_port", 20..24),
        ("op", 24..26),
    ] {
        if data[range.clone()] != expected[range] {
            return Err(RecordError::HeadersDisagree(name));
        }
    }
    let payload = &data[RECORD_HEADER_LEN..];
    if payload.len() > header.len.get() as usize {
        return Err(RecordError::PayloadLength {
            header: header.len.get(),
            record: payload.len(),
        });
    }
    Ok(Record { header, payload })
}
