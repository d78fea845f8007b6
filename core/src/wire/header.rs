//! The virtio-vsock packet header and the device's constants.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The CID of the host, as seen by the guest.
pub const HOST_CID: u64 = 2;

/// Size of [`Header`] in bytes.
pub const HEADER_LEN: usize = 44;

/// Virtio device type of a vsock device.
pub const DEVICE_TYPE: u32 = 19;

/// Queue index of the rx queue (device to driver).
pub const RX_QUEUE: u16 = 0;
/// Queue index of the tx queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// Queue index of the event queue.
pub const EVENT_QUEUE: u16 = 2;

/// Feature bit: stream sockets are supported.
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;
/// Feature bit: seqpacket sockets are supported.
pub const VIRTIO_VSOCK_F_SEQPACKET: u32 = 1;
/// Feature bit: stream support is not implied when no socket feature is negotiated.
pub const VIRTIO_VSOCK_F_NO_IMPLIED_STREAM: u32 = 2;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Seqpacket flag: end of message.
pub const SEQ_EOM: u32 = 1;
/// Seqpacket flag: end of record.
pub const SEQ_EOR: u32 = 2;

/// Event id of a transport reset, sent on the event queue.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Bits of a CID that the specification reserves (the upper 32); they must be zero.
pub const CID_RESERVED_MASK: u64 = 0xffff_ffff_0000_0000;

/// The `virtio_vsock_hdr` that starts every packet, little-endian and unaligned.
///
/// This is a plain view of bytes: any 44 bytes are a `Header`. Copy it out of guest memory once
/// and validate the copy with [`Packet::parse`]; never re-read guest memory for a field.
#[derive(
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// Source CID.
    pub src_cid: U64,
    /// Destination CID.
    pub dst_cid: U64,
    /// Source port.
    pub src_port: U32,
    /// Destination port.
    pub dst_port: U32,
    /// Length of the payload that follows the header.
    pub len: U32,
    /// Socket type ([`SocketType`]).
    pub type_: U16,
    /// Operation ([`Op`]).
    pub op: U16,
    /// Operation-specific flags (shutdown or seqpacket flags).
    pub flags: U32,
    /// The sender's receive buffer size, for credit.
    pub buf_alloc: U32,
    /// Bytes the sender has consumed from its receive buffer, for credit.
    pub fwd_cnt: U32,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_LEN);

impl Header {
    /// Reads a header from the first [`HEADER_LEN`] bytes of `bytes`, or `None` if too short.
    pub fn read_from(bytes: &[u8]) -> Option<Header> {
        Header::read_from_prefix(bytes).ok().map(|(h, _)| h)
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field(
                "src",
                &format_args!("{}:{}", self.src_cid.get(), self.src_port.get()),
            )
            .field(
                "dst",
                &format_args!("{}:{}", self.dst_cid.get(), self.dst_port.get()),
            )
            .field("len", &self.len.get())
            .field("type", &self.type_.get())
            .field("op", &self.op.get())
            .field("flags", &self.flags.get())
            .field("buf_alloc", &self.buf_alloc.get())
            .field("fwd_cnt", &self.fwd_cnt.get())
            .finish()
    }
}

/// The socket type of a packet. Part of a connection's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SocketType {
    /// A byte stream (`SOCK_STREAM`).
    Stream,
    /// A sequence of messages (`SOCK_SEQPACKET`).
    SeqPacket,
}

impl SocketType {
    /// The value carried in [`Header::type_`].
    pub const fn to_u16(self) -> u16 {
        match self {
            SocketType::Stream => 1,
            SocketType::SeqPacket => 2,
        }
    }

    /// The socket type for a header value, if it is one the specification defines.
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(SocketType::Stream),
            2 => Some(SocketType::SeqPacket),
            _ => None,
        }
    }
}

/// The operation of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset.
    Rst,
    /// Half or full shutdown; see [`SHUTDOWN_RCV`] and [`SHUTDOWN_SEND`].
    Shutdown,
    /// Data.
    Rw,
    /// Unsolicited credit information.
    CreditUpdate,
    /// A request for the peer's credit information.
    CreditRequest,
}

impl Op {
    /// Every operation, in numeric order.
    pub const ALL: [Op; 7] = [
        Op::Request,
        Op::Response,
        Op::Rst,
        Op::Shutdown,
        Op::Rw,
        Op::CreditUpdate,
        Op::CreditRequest,
    ];

    /// The value carried in [`Header::op`].
    pub const fn to_u16(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }

    /// The operation for a header value, if it is one the specification defines.
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Op::Request),
            2 => Some(Op::Response),
            3 => Some(Op::Rst),
            4 => Some(Op::Shutdown),
            5 => Some(Op::Rw),
            6 => Some(Op::CreditUpdate),
            7 => Some(Op::CreditRequest),
            _ => None,
        }
    }
}

/// Why a [`Header`] was rejected by [`Packet::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderError {
    /// The upper 32 bits of the source or destination CID are not zero.
    ReservedCidBits,
    /// `type` is not a socket type the specification defines.
    UnknownType(u16),
    /// `op` is not an operation the specification defines.
    UnknownOp(u16),
    /// `len` is larger than the largest payload accepted.
    OversizeLen(u32),
    /// A packet other than [`Op::Rw`] carries a payload.
    PayloadOnControl(u32),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::ReservedCidBits => f.write_str("reserved CID bits set"),
            HeaderError::UnknownType(t) => write!(f, "unknown socket type {t}"),
            HeaderError::UnknownOp(o) => write!(f, "unknown operation {o}"),
            HeaderError::OversizeLen(l) => write!(f, "payload length {l} too large"),
            HeaderError::PayloadOnControl(l) => write!(f, "control packet with {l} payload bytes"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// A validated packet header: every field has a meaning.
///
/// Built by [`Packet::parse`] from an untrusted [`Header`], or by the engine for packets it
/// sends; [`Packet::to_header`] turns it back into wire bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    /// Source CID (upper 32 bits zero).
    pub src_cid: u64,
    /// Destination CID (upper 32 bits zero).
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length; zero unless `op` is [`Op::Rw`].
    pub len: u32,
    /// Socket type.
    pub socket_type: SocketType,
    /// Operation.
    pub op: Op,
    /// Operation-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// The sender's forwarded byte count.
    pub fwd_cnt: u32,
}

impl Packet {
    /// Validates `header`. `max_len` is the largest payload accepted on an [`Op::Rw`] packet.
    ///
    /// The checks run in a fixed order (CID bits, type, op, length), so a header with several
    /// faults always reports the same one.
    pub fn parse(header: &Header, max_len: u32) -> Result<Packet, HeaderError> {
        let src_cid = header.src_cid.get();
        let dst_cid = header.dst_cid.get();
        if (src_cid | dst_cid) & CID_RESERVED_MASK != 0 {
            return Err(HeaderError::ReservedCidBits);
        }
        let raw_type = header.type_.get();
        let socket_type =
            SocketType::from_u16(raw_type).ok_or(HeaderError::UnknownType(raw_type))?;
        let raw_op = header.op.get();
        let op = Op::from_u16(raw_op).ok_or(HeaderError::UnknownOp(raw_op))?;
        let len = header.len.get();
        if op == Op::Rw && len > max_len {
            return Err(HeaderError::OversizeLen(len));
        }
        if op != Op::Rw && len != 0 {
            return Err(HeaderError::PayloadOnControl(len));
        }
        Ok(Packet {
            src_cid,
            dst_cid,
            src_port: header.src_port.get(),
            dst_port: header.dst_port.get(),
            len,
            socket_type,
            op,
            flags: header.flags.get(),
            buf_alloc: header.buf_alloc.get(),
            fwd_cnt: header.fwd_cnt.get(),
        })
    }

    /// The wire form of this packet.
    pub fn to_header(&self) -> Header {
        Header {
            src_cid: self.src_cid.into(),
            dst_cid: self.dst_cid.into(),
            src_port: self.src_port.into(),
            dst_port: self.dst_port.into(),
            len: self.len.into(),
            type_: self.socket_type.to_u16().into(),
            op: self.op.to_u16().into(),
            flags: self.flags.into(),
            buf_alloc: self.buf_alloc.into(),
            fwd_cnt: self.fwd_cnt.into(),
        }
    }
}

/// The device configuration space (`struct virtio_vsock_config`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct ConfigSpace {
    /// The guest's CID; only the low 32 bits are used.
    pub guest_cid: U64,
}

/// An entry of the event queue (`struct virtio_vsock_event`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Event {
    /// The event id, such as [`EVENT_TRANSPORT_RESET`].
    pub id: U32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn sample() -> Packet {
        Packet {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 5,
            socket_type: SocketType::Stream,
            op: Op::Rw,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 77,
        }
    }

    #[test]
    fn layout_is_little_endian_and_packed() {
        let bytes = sample().to_header();
        let b = bytes.as_bytes();
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[8..16], &2u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[20..24], &1234u32.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[32..36], &0u32.to_le_bytes());
        assert_eq!(&b[36..40], &262_144u32.to_le_bytes());
        assert_eq!(&b[40..44], &77u32.to_le_bytes());
        assert_eq!(std::mem::size_of::<ConfigSpace>(), 8);
        assert_eq!(std::mem::size_of::<Event>(), 4);
    }

    #[test]
    fn parse_round_trips() {
        let p = sample();
        let h = p.to_header();
        assert_eq!(Packet::parse(&h, 65536), Ok(p));
        assert_eq!(Header::read_from(h.as_bytes()), Some(h));
        assert_eq!(Header::read_from(&h.as_bytes()[..43]), None);
        for op in Op::ALL {
            assert_eq!(Op::from_u16(op.to_u16()), Some(op));
        }
    }

    #[test]
    fn parse_rejects_each_fault_by_name() {
        let base = sample().to_header();
        let mut h = base;
        h.src_cid = (3u64 | 1 << 40).into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::ReservedCidBits));
        let mut h = base;
        h.dst_cid = (1u64 << 63 | 2).into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::ReservedCidBits));
        let mut h = base;
        h.type_ = 3.into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::UnknownType(3)));
        let mut h = base;
        h.type_ = 0.into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::UnknownType(0)));
        let mut h = base;
        h.op = 8.into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::UnknownOp(8)));
        let mut h = base;
        h.op = 0.into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::UnknownOp(0)));
        let mut h = base;
        h.len = 65537.into();
        assert_eq!(
            Packet::parse(&h, 65536),
            Err(HeaderError::OversizeLen(65537))
        );
        let mut h = base;
        h.op = Op::Shutdown.to_u16().into();
        assert_eq!(
            Packet::parse(&h, 65536),
            Err(HeaderError::PayloadOnControl(5))
        );
        // Type is checked before op.
        let mut h = base;
        h.type_ = 9.into();
        h.op = 9.into();
        assert_eq!(Packet::parse(&h, 65536), Err(HeaderError::UnknownType(9)));
    }

    #[test]
    fn any_bytes_are_a_header_and_parse_never_panics() {
        let mut bytes = [0u8; HEADER_LEN];
        for seed in 0u32..2000 {
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2_654_435_761).rotate_left(i as u32) >> 7) as u8;
            }
            let h = Header::read_from(&bytes).unwrap();
            if let Ok(p) = Packet::parse(&h, 65536) {
                assert_eq!(p.to_header(), h);
            }
        }
    }
}
