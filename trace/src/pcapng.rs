//! The pcapng container, as much of it as a trace needs: one little-endian section with a
//! Section Header Block, Interface Description Blocks and Enhanced Packet Blocks. The writer
//! encodes into the caller's `io::Write`; the reader takes a whole file in memory and skips
//! the block types and options it does not know.

use std::fmt;
use std::io::{self, Write};

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 0x0000_0001;
const EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_TSRESOL: u16 = 9;
const IF_TSOFFSET: u16 = 14;
const EPB_FLAGS: u16 = 2;
const EPB_QUEUE: u16 = 6;

/// The largest record Wireshark accepts in one packet block.
pub const MAX_RECORD: usize = 262_144;

/// Which way a packet went, in the EPB flags' two low bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// Not said.
    Unknown,
    /// Into the device: from the guest.
    Inbound,
    /// Out of the device: to the guest.
    Outbound,
}

impl Way {
    fn flags(self) -> u32 {
        match self {
            Way::Unknown => 0,
            Way::Inbound => 1,
            Way::Outbound => 2,
        }
    }

    fn from_flags(flags: u32) -> Way {
        match flags & 3 {
            1 => Way::Inbound,
            2 => Way::Outbound,
            _ => Way::Unknown,
        }
    }
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Options of a block, encoded into a reusable buffer.
#[derive(Default)]
struct Options(Vec<u8>);

impl Options {
    fn add(&mut self, code: u16, value: &[u8]) {
        self.0.extend_from_slice(&code.to_le_bytes());
        self.0
            .extend_from_slice(&(value.len() as u16).to_le_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len() + pad4(value.len()), 0);
    }

    fn end(&mut self) {
        if !self.0.is_empty() {
            self.0.extend_from_slice(&[0; 4]);
        }
    }
}

/// Writes a pcapng section, block by block, with nanosecond timestamps.
pub struct Writer<W: Write> {
    out: W,
    interfaces: u32,
    scratch: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Starts a section, naming the application that wrote it.
    ///
    /// # Errors
    ///
    /// The writer's.
    pub fn new(mut out: W, application: &str) -> io::Result<Self> {
        let mut options = Options::default();
        options.add(SHB_USERAPPL, application.as_bytes());
        options.end();
        let body_len = 16 + options.0.len();
        let total = (body_len + 12) as u32;
        let mut block = Vec::with_capacity(total as usize);
        block.extend_from_slice(&SHB.to_le_bytes());
        block.extend_from_slice(&total.to_le_bytes());
        block.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        block.extend_from_slice(&1u16.to_le_bytes());
        block.extend_from_slice(&0u16.to_le_bytes());
        block.extend_from_slice(&(-1i64).to_le_bytes());
        block.extend_from_slice(&options.0);
        block.extend_from_slice(&total.to_le_bytes());
        out.write_all(&block)?;
        Ok(Writer {
            out,
            interfaces: 0,
            scratch: Vec::new(),
        })
    }

    /// Describes the next interface (numbered from 0 in the order described): its link type,
    /// name and description; timestamps in nanoseconds, `offset_secs` added by readers to
    /// show wall-clock time. Returns its number.
    ///
    /// # Errors
    ///
    /// The writer's.
    pub fn interface(
        &mut self,
        link_type: u16,
        name: &str,
        description: &str,
        offset_secs: i64,
    ) -> io::Result<u32> {
        let mut options = Options::default();
        options.add(IF_NAME, name.as_bytes());
        options.add(IF_DESCRIPTION, description.as_bytes());
        options.add(IF_TSRESOL, &[9]);
        options.add(IF_TSOFFSET, &offset_secs.to_le_bytes());
        options.end();
        let total = (20 + options.0.len()) as u32;
        let block = &mut self.scratch;
        block.clear();
        block.extend_from_slice(&IDB.to_le_bytes());
        block.extend_from_slice(&total.to_le_bytes());
        block.extend_from_slice(&link_type.to_le_bytes());
        block.extend_from_slice(&0u16.to_le_bytes());
        // Snap length 0: no limit.
        block.extend_from_slice(&0u32.to_le_bytes());
        block.extend_from_slice(&options.0);
        block.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(block)?;
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    /// Writes one packet on `interface` at `ts_nanos`: `parts` concatenated are the captured
    /// bytes, `original_len` the length before any snap (at least the captured length).
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an undescribed interface or a record over [`MAX_RECORD`]; the
    /// writer's errors.
    pub fn packet(
        &mut self,
        interface: u32,
        ts_nanos: u64,
        parts: &[&[u8]],
        original_len: usize,
        way: Way,
        queue: Option<u32>,
    ) -> io::Result<()> {
        let captured: usize = parts.iter().map(|p| p.len()).sum();
        if interface >= self.interfaces || captured > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("packet of {captured} bytes on interface {interface}"),
            ));
        }
        let mut options = Options::default();
        if way != Way::Unknown {
            options.add(EPB_FLAGS, &way.flags().to_le_bytes());
        }
        if let Some(q) = queue {
            options.add(EPB_QUEUE, &q.to_le_bytes());
        }
        options.end();
        let total = (32 + captured + pad4(captured) + options.0.len()) as u32;
        let block = &mut self.scratch;
        block.clear();
        block.extend_from_slice(&EPB.to_le_bytes());
        block.extend_from_slice(&total.to_le_bytes());
        block.extend_from_slice(&interface.to_le_bytes());
        block.extend_from_slice(&((ts_nanos >> 32) as u32).to_le_bytes());
        block.extend_from_slice(&(ts_nanos as u32).to_le_bytes());
        block.extend_from_slice(&(captured as u32).to_le_bytes());
        block.extend_from_slice(&(original_len.max(captured) as u32).to_le_bytes());
        for part in parts {
            block.extend_from_slice(part);
        }
        block.resize(block.len() + pad4(captured), 0);
        block.extend_from_slice(&options.0);
        block.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(block)
    }

    /// Flushes the underlying writer.
    ///
    /// # Errors
    ///
    /// The writer's.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Why a file is not a trace this reader can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    /// The file does not start with a little-endian Section Header Block.
    NotPcapng,
    /// A block's length runs past the end of the file, or disagrees with its trailer.
    BadBlock {
        /// Byte offset of the block.
        offset: usize,
    },
    /// A packet names an interface no block described.
    UnknownInterface {
        /// Byte offset of the block.
        offset: usize,
    },
    /// A second section: traces have one.
    SecondSection,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::NotPcapng => f.write_str("not a little-endian pcapng file"),
            FormatError::BadBlock { offset } => write!(f, "damaged block at byte {offset}"),
            FormatError::UnknownInterface { offset } => {
                write!(f, "packet at byte {offset} names an undescribed interface")
            }
            FormatError::SecondSection => f.write_str("more than one section"),
        }
    }
}

impl std::error::Error for FormatError {}

/// An interface, as its description block said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Link type.
    pub link_type: u16,
    /// `if_name`.
    pub name: String,
    /// `if_description`.
    pub description: String,
    /// `if_tsresol` (default 6: microseconds).
    pub tsresol: u8,
    /// `if_tsoffset`, seconds.
    pub tsoffset: i64,
}

/// A packet block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Byte offset of the block in the file.
    pub offset: usize,
    /// The interface's number.
    pub interface: u32,
    /// The timestamp in nanoseconds, without the interface's offset.
    pub ts_nanos: u64,
    /// The captured bytes.
    pub data: &'a [u8],
    /// The length before any snap.
    pub original_len: usize,
    /// The direction flag.
    pub way: Way,
    /// `epb_queue`, if present.
    pub queue: Option<u64>,
}

/// A whole pcapng file in memory.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// The section's `shb_userappl`.
    pub application: String,
    /// The interfaces described so far.
    pub interfaces: Vec<Interface>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Iterates the options in `b`: (code, value).
fn options(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let code = u16_at(b, 0);
        let len = usize::from(u16_at(b, 2));
        if code == OPT_END || 4 + len > b.len() {
            return None;
        }
        let value = &b[4..4 + len];
        b = &b[(4 + len + pad4(len)).min(b.len())..];
        Some((code, value))
    })
}

impl<'a> Reader<'a> {
    /// Opens `bytes`, reading the Section Header Block.
    ///
    /// # Errors
    ///
    /// [`FormatError::NotPcapng`], [`FormatError::BadBlock`].
    pub fn new(bytes: &'a [u8]) -> Result<Self, FormatError> {
        if bytes.len() < 28 || u32_at(bytes, 0) != SHB || u32_at(bytes, 8) != BYTE_ORDER_MAGIC {
            return Err(FormatError::NotPcapng);
        }
        let mut reader = Reader {
            bytes,
            pos: 0,
            application: String::new(),
            interfaces: Vec::new(),
        };
        let (body, next) = reader.block(0)?;
        if body.len() < 16 {
            return Err(FormatError::BadBlock { offset: 0 });
        }
        for (code, value) in options(&body[16..]) {
            if code == SHB_USERAPPL {
                reader.application = String::from_utf8_lossy(value).into_owned();
            }
        }
        reader.pos = next;
        Ok(reader)
    }

    /// The body of the block at `offset` and the offset of the next one.
    fn block(&self, offset: usize) -> Result<(&'a [u8], usize), FormatError> {
        let b = self.bytes;
        let bad = FormatError::BadBlock { offset };
        if offset + 12 > b.len() {
            return Err(bad);
        }
        let total = u32_at(b, offset + 4) as usize;
        if total < 12 || total % 4 != 0 || offset + total > b.len() {
            return Err(bad);
        }
        if u32_at(b, offset + total - 4) as usize != total {
            return Err(bad);
        }
        Ok((&b[offset + 8..offset + total - 4], offset + total))
    }

    /// The next packet, describing interfaces on the way; `None` at the end of the file.
    ///
    /// # Errors
    ///
    /// A damaged block, a packet on an undescribed interface, a second section.
    pub fn next_packet(&mut self) -> Result<Option<Packet<'a>>, FormatError> {
        while self.pos < self.bytes.len() {
            let offset = self.pos;
            let (body, next) = self.block(offset)?;
            let kind = u32_at(self.bytes, offset);
            self.pos = next;
            match kind {
                SHB => return Err(FormatError::SecondSection),
                IDB => {
                    if body.len() < 8 {
                        return Err(FormatError::BadBlock { offset });
                    }
                    let mut interface = Interface {
                        link_type: u16_at(body, 0),
                        name: String::new(),
                        description: String::new(),
                        tsresol: 6,
                        tsoffset: 0,
                    };
                    for (code, value) in options(&body[8..]) {
                        match (code, value.len()) {
                            (IF_NAME, _) => {
                                interface.name = String::from_utf8_lossy(value).into_owned()
                            }
                            (IF_DESCRIPTION, _) => {
                                interface.description = String::from_utf8_lossy(value).into_owned()
                            }
                            (IF_TSRESOL, 1) => interface.tsresol = value[0],
                            (IF_TSOFFSET, 8) => {
                                interface.tsoffset =
                                    i64::from_le_bytes(value.try_into().expect("8 bytes"))
                            }
                            _ => {}
                        }
                    }
                    self.interfaces.push(interface);
                }
                EPB => {
                    if body.len() < 20 {
                        return Err(FormatError::BadBlock { offset });
                    }
                    let interface = u32_at(body, 0);
                    let resolution = self
                        .interfaces
                        .get(interface as usize)
                        .ok_or(FormatError::UnknownInterface { offset })?
                        .tsresol;
                    let raw = u64::from(u32_at(body, 4)) << 32 | u64::from(u32_at(body, 8));
                    let captured = u32_at(body, 12) as usize;
                    let original_len = u32_at(body, 16) as usize;
                    let data_end = 20 + captured;
                    if data_end > body.len() {
                        return Err(FormatError::BadBlock { offset });
                    }
                    let mut packet = Packet {
                        offset,
                        interface,
                        ts_nanos: to_nanos(raw, resolution),
                        data: &body[20..data_end],
                        original_len,
                        way: Way::Unknown,
                        queue: None,
                    };
                    let opts_at = (data_end + pad4(captured)).min(body.len());
                    for (code, value) in options(&body[opts_at..]) {
                        match (code, value.len()) {
                            (EPB_FLAGS, 4) => packet.way = Way::from_flags(u32_at(value, 0)),
                            (EPB_QUEUE, 4) => packet.queue = Some(u64::from(u32_at(value, 0))),
                            (OPT_COMMENT, _) | (_, _) => {}
                        }
                    }
                    return Ok(Some(packet));
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// A raw timestamp in units of `if_tsresol` as nanoseconds.
fn to_nanos(raw: u64, tsresol: u8) -> u64 {
    let v = u32::from(tsresol & 0x7f);
    if tsresol & 0x80 == 0 {
        if v <= 9 {
            raw.saturating_mul(10u64.pow(9 - v))
        } else {
            raw / 10u64.saturating_pow(v - 9)
        }
    } else {
        // Units of 2^-v seconds.
        ((u128::from(raw) * 1_000_000_000) >> v) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut w = Writer::new(Vec::new(), "test 1").unwrap();
        assert_eq!(
            w.interface(271, "vsock", "packets", 1_700_000_000).unwrap(),
            0
        );
        assert_eq!(
            w.interface(147, "host", "events", 1_700_000_000).unwrap(),
            1
        );
        w.packet(0, 5, &[b"abc", b"de"], 9, Way::Inbound, Some(1))
            .unwrap();
        w.packet(1, (1 << 33) + 7, &[b""], 0, Way::Unknown, None)
            .unwrap();
        let bytes = w.into_inner();
        assert_eq!(bytes.len() % 4, 0);
        let mut r = Reader::new(&bytes).unwrap();
        assert_eq!(r.application, "test 1");
        let p = r.next_packet().unwrap().unwrap();
        assert_eq!(
            (
                p.interface,
                p.ts_nanos,
                p.data,
                p.original_len,
                p.way,
                p.queue
            ),
            (0, 5, &b"abcde"[..], 9, Way::Inbound, Some(1))
        );
        let p = r.next_packet().unwrap().unwrap();
        assert_eq!(
            (p.interface, p.ts_nanos, p.data),
            (1, (1 << 33) + 7, &b""[..])
        );
        assert_eq!(r.next_packet().unwrap(), None);
        assert_eq!(r.interfaces.len(), 2);
        assert_eq!(r.interfaces[1].link_type, 147);
        assert_eq!(r.interfaces[0].tsresol, 9);
        assert_eq!(r.interfaces[0].tsoffset, 1_700_000_000);
        assert_eq!(r.interfaces[0].description, "packets");
    }

    #[test]
    fn damage_is_named() {
        assert_eq!(Reader::new(b"junk").err(), Some(FormatError::NotPcapng));
        let mut w = Writer::new(Vec::new(), "t").unwrap();
        w.interface(271, "a", "b", 0).unwrap();
        w.packet(0, 1, &[b"xyz"], 3, Way::Outbound, None).unwrap();
        let bytes = w.into_inner();
        // Cut in the middle of the last block.
        let cut = &bytes[..bytes.len() - 6];
        let mut r = Reader::new(cut).unwrap();
        assert!(matches!(r.next_packet(), Err(FormatError::BadBlock { .. })));
        // A packet before any interface.
        let mut w = Writer::new(Vec::new(), "t").unwrap();
        w.interface(271, "a", "b", 0).unwrap();
        w.packet(0, 1, &[b"xyz"], 3, Way::Outbound, None).unwrap();
        let bytes = w.into_inner();
        let shb_len = u32_at(&bytes, 4) as usize;
        let idb_len = u32_at(&bytes, shb_len + 4) as usize;
        let mut no_idb = bytes[..shb_len].to_vec();
        no_idb.extend_from_slice(&bytes[shb_len + idb_len..]);
        let mut r = Reader::new(&no_idb).unwrap();
        assert!(matches!(
            r.next_packet(),
            Err(FormatError::UnknownInterface { .. })
        ));
    }

    #[test]
    fn a_section_header_too_short_for_its_fields_is_refused() {
        for total in [12u32, 16, 20, 24] {
            let mut b = Vec::new();
            b.extend_from_slice(&SHB.to_le_bytes());
            b.extend_from_slice(&total.to_le_bytes());
            b.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
            b.resize(total as usize - 4, 0);
            b.extend_from_slice(&total.to_le_bytes());
            b.resize(28.max(b.len()), 0);
            assert!(Reader::new(&b).is_err(), "total {total}");
        }
    }

    #[test]
    fn timestamp_units() {
        assert_eq!(to_nanos(5, 9), 5);
        assert_eq!(to_nanos(5, 6), 5_000);
        assert_eq!(to_nanos(1, 0x80 | 1), 500_000_000);
    }
}
