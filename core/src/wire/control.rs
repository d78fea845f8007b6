//! The hybrid-vsock host control protocol.
//!
//! A host program connects to the device's listening Unix socket and writes one line,
//! `CONNECT <port>\n`, naming the guest port it wants. The device answers `OK <host_port>\n`
//! once the guest accepted, and from then on the socket carries the stream. Bytes the client
//! wrote after the newline, even in the same write, belong to the stream and are kept.
//!
//! [`ConnectParser`] reads the line incrementally from any number of reads, never asks for more
//! than fits in its fixed buffer, and rejects bad input as soon as it is visible.

use std::fmt;

/// The size of a [`ConnectParser`]'s buffer: the longest line accepted, newline included, and
/// also the most bytes (line plus what follows it) the parser ever holds.
pub const CONNECT_LINE_MAX: usize = 64;

const PREFIX: &[u8] = b"CONNECT ";
const REPLY_PREFIX: &[u8] = b"OK ";

/// Why a `CONNECT` line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectError {
    /// The bytes are not `CONNECT <decimal port>`.
    Garbage,
    /// No newline within [`CONNECT_LINE_MAX`] bytes.
    TooLong,
    /// The port does not fit in 32 bits, or is the reserved `VMADDR_PORT_ANY` (`u32::MAX`).
    PortOutOfRange,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectError::Garbage => "malformed CONNECT line",
            ConnectError::TooLong => "CONNECT line too long",
            ConnectError::PortOutOfRange => "CONNECT port out of range",
        })
    }
}

impl std::error::Error for ConnectError {}

/// What [`ConnectParser::feed`] made of the bytes so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectStatus {
    /// No newline yet, and nothing wrong so far: read more (at most [`ConnectParser::room`]).
    Incomplete,
    /// A complete line naming this guest port; [`ConnectParser::leftover`] holds what followed.
    Complete(u32),
    /// The line is refused; the parser stays in this state.
    Invalid(ConnectError),
}

/// An incremental, bounded parser for the `CONNECT <port>\n` line.
#[derive(Clone)]
pub struct ConnectParser {
    buf: [u8; CONNECT_LINE_MAX],
    len: u8,
    /// Bytes of `buf` checked so far (always at most `len`).
    scanned: u8,
    /// Offset of the first byte after the newline, once complete.
    line_end: u8,
    /// Offset of the first leftover byte not yet taken by [`ConnectParser::consume_leftover`].
    taken: u8,
    /// Parses the `OK <port>\n` reply instead of the `CONNECT` line.
    reply: bool,
    status: ConnectStatus,
}

impl Default for ConnectParser {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ConnectParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParser")
            .field("buffered", &self.len)
            .field("status", &self.status)
            .finish()
    }
}

impl ConnectParser {
    /// An empty parser.
    pub const fn new() -> Self {
        ConnectParser {
            buf: [0; CONNECT_LINE_MAX],
            len: 0,
            scanned: 0,
            line_end: 0,
            taken: 0,
            reply: false,
            status: ConnectStatus::Incomplete,
        }
    }

    /// An empty parser of the `OK <port>\n` reply, with the same rules as the `CONNECT`
    /// line's (the port a sibling device answers with; what follows it belongs to the stream).
    pub const fn reply() -> Self {
        let mut p = Self::new();
        p.reply = true;
        p
    }

    fn prefix(&self) -> &'static [u8] {
        if self.reply {
            REPLY_PREFIX
        } else {
            PREFIX
        }
    }

    /// The most bytes the next [`feed`](Self::feed) accepts; zero once the line is complete or
    /// refused. A caller reads at most this many bytes from the socket, so that nothing read is
    /// ever lost.
    pub fn room(&self) -> usize {
        match self.status {
            ConnectStatus::Incomplete => CONNECT_LINE_MAX - self.len as usize,
            _ => 0,
        }
    }

    /// The current status.
    pub fn status(&self) -> ConnectStatus {
        self.status
    }

    /// Adds bytes read from the socket and reports the status.
    ///
    /// Passing more than [`room`](Self::room) bytes refuses the line as [`ConnectError::TooLong`]
    /// (the parser would have had to drop bytes). Feeding a parser that is already complete or
    /// refused changes nothing and returns its status.
    pub fn feed(&mut self, bytes: &[u8]) -> ConnectStatus {
        if self.status != ConnectStatus::Incomplete {
            return self.status;
        }
        if bytes.len() > self.room() {
            self.status = ConnectStatus::Invalid(ConnectError::TooLong);
            return self.status;
        }
        let start = self.len as usize;
        self.buf[start..start + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
        self.status = self.scan();
        self.status
    }

    fn scan(&mut self) -> ConnectStatus {
        let len = self.len as usize;
        let mut i = self.scanned as usize;
        let prefix = self.prefix();
        while i < len {
            let b = self.buf[i];
            if i < prefix.len() {
                if b != prefix[i] {
                    return ConnectStatus::Invalid(ConnectError::Garbage);
                }
            } else if b == b'\n' {
                self.line_end = (i + 1) as u8;
                self.taken = self.line_end;
                self.scanned = self.line_end;
                return self.finish_line(i);
            } else if !(b.is_ascii_digit() || b == b'\r') {
                return ConnectStatus::Invalid(ConnectError::Garbage);
            } else if i > prefix.len() && self.buf[i - 1] == b'\r' {
                // Only a newline may follow a carriage return.
                return ConnectStatus::Invalid(ConnectError::Garbage);
            }
            i += 1;
        }
        self.scanned = len as u8;
        if len == CONNECT_LINE_MAX {
            ConnectStatus::Invalid(ConnectError::TooLong)
        } else {
            ConnectStatus::Incomplete
        }
    }

    /// Parses the port of the line whose newline sits at `newline`.
    fn finish_line(&self, newline: usize) -> ConnectStatus {
        let mut digits = &self.buf[self.prefix().len()..newline];
        if let [rest @ .., b'\r'] = digits {
            digits = rest;
        }
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return ConnectStatus::Invalid(ConnectError::Garbage);
        }
        let mut port: u64 = 0;
        for &d in digits {
            port = port * 10 + u64::from(d - b'0');
            if port >= u64::from(u32::MAX) {
                return ConnectStatus::Invalid(ConnectError::PortOutOfRange);
            }
        }
        // The loop returned for anything at or above u32::MAX.
        ConnectStatus::Complete(port as u32)
    }

    /// Bytes that followed the newline and have not been consumed yet. Empty unless complete.
    pub fn leftover(&self) -> &[u8] {
        match self.status {
            ConnectStatus::Complete(_) => &self.buf[self.taken as usize..self.len as usize],
            _ => &[],
        }
    }

    /// Marks the first `n` bytes of [`leftover`](Self::leftover) as delivered.
    ///
    /// # Panics
    ///
    /// If `n` exceeds the leftover length (a caller bug).
    pub fn consume_leftover(&mut self, n: usize) {
        assert!(
            n <= self.leftover().len(),
            "consumed more leftover than held"
        );
        self.taken += n as u8;
    }
}

/// The `OK <port>\n` reply, formatted without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct OkLine {
    buf: [u8; 16],
    len: u8,
}

impl OkLine {
    /// The reply announcing `host_port`.
    pub fn new(host_port: u32) -> Self {
        let mut buf = [0u8; 16];
        buf[..3].copy_from_slice(b"OK ");
        let mut digits = [0u8; 10];
        let mut n = 0;
        let mut p = host_port;
        loop {
            digits[n] = b'0' + (p % 10) as u8;
            n += 1;
            p /= 10;
            if p == 0 {
                break;
            }
        }
        for i in 0..n {
            buf[3 + i] = digits[n - 1 - i];
        }
        buf[3 + n] = b'\n';
        OkLine {
            buf,
            len: (4 + n) as u8,
        }
    }

    /// The bytes of the line, newline included.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }
}

impl fmt::Debug for OkLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OkLine({:?})", String::from_utf8_lossy(self.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_split(input: &[u8], sizes: &[usize]) -> (ConnectStatus, Vec<u8>) {
        let mut p = ConnectParser::new();
        let mut rest = input;
        let mut sizes = sizes.iter().cycle();
        loop {
            if rest.is_empty() || p.room() == 0 {
                break;
            }
            let n = (*sizes.next().unwrap()).min(rest.len()).min(p.room());
            let status = p.feed(&rest[..n]);
            rest = &rest[n..];
            if status != ConnectStatus::Incomplete {
                break;
            }
        }
        (p.status(), p.leftover().to_vec())
    }

    #[test]
    fn whole_line_in_one_read() {
        let (s, left) = parse_split(b"CONNECT 1234\n", &[64]);
        assert_eq!(s, ConnectStatus::Complete(1234));
        assert!(left.is_empty());
    }

    #[test]
    fn line_split_over_every_byte() {
        let (s, left) = parse_split(b"CONNECT 52\nhello", &[1]);
        // Byte-by-byte reads stop at the newline; later bytes stay in the socket.
        assert_eq!(s, ConnectStatus::Complete(52));
        assert!(left.is_empty());
        for split in 1..14 {
            let (s, left) = parse_split(b"CONNECT 4242\nxy", &[split, 64]);
            assert_eq!(s, ConnectStatus::Complete(4242), "split {split}");
            assert_eq!(left, b"xy"[..left.len()].to_vec());
        }
    }

    #[test]
    fn bytes_after_newline_are_kept_and_consumed() {
        let mut p = ConnectParser::new();
        assert_eq!(
            p.feed(b"CONNECT 7\nstream start"),
            ConnectStatus::Complete(7)
        );
        assert_eq!(p.leftover(), b"stream start");
        p.consume_leftover(7);
        assert_eq!(p.leftover(), b"start");
        p.consume_leftover(5);
        assert_eq!(p.leftover(), b"");
        assert_eq!(p.room(), 0);
        assert_eq!(p.feed(b"more"), ConnectStatus::Complete(7));
    }

    #[test]
    fn carriage_return_is_tolerated_once() {
        assert_eq!(
            parse_split(b"CONNECT 9\r\n", &[3]).0,
            ConnectStatus::Complete(9)
        );
        assert_eq!(
            parse_split(b"CONNECT 9\r\r\n", &[64]).0,
            ConnectStatus::Invalid(ConnectError::Garbage)
        );
        assert_eq!(
            parse_split(b"CONNECT 9\r9\n", &[64]).0,
            ConnectStatus::Invalid(ConnectError::Garbage)
        );
    }

    #[test]
    fn garbage_is_refused_early() {
        let mut p = ConnectParser::new();
        assert_eq!(
            p.feed(b"GET"),
            ConnectStatus::Invalid(ConnectError::Garbage)
        );
        for bad in [
            &b"connect 5\n"[..],
            b"CONNECT\n",
            b"CONNECT \n",
            b"CONNECT  5\n",
            b"CONNECT -5\n",
            b"CONNECT +5\n",
            b"CONNECT 5 \n",
            b"CONNECT 0x10\n",
            b"\n",
        ] {
            assert_eq!(
                parse_split(bad, &[1]).0,
                ConnectStatus::Invalid(ConnectError::Garbage),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn port_range() {
        assert_eq!(
            parse_split(b"CONNECT 0\n", &[64]).0,
            ConnectStatus::Complete(0)
        );
        assert_eq!(
            parse_split(b"CONNECT 4294967294\n", &[64]).0,
            ConnectStatus::Complete(u32::MAX - 1)
        );
        assert_eq!(
            parse_split(b"CONNECT 0004294967294\n", &[64]).0,
            ConnectStatus::Complete(u32::MAX - 1)
        );
        for bad in [
            &b"CONNECT 4294967295\n"[..],
            b"CONNECT 4294967296\n",
            b"CONNECT 99999999999999999999\n",
        ] {
            assert_eq!(
                parse_split(bad, &[64]).0,
                ConnectStatus::Invalid(ConnectError::PortOutOfRange)
            );
        }
    }

    #[test]
    fn overlong_line_is_refused_at_the_bound() {
        let mut line = b"CONNECT ".to_vec();
        line.extend(std::iter::repeat_n(b'1', 100));
        let mut p = ConnectParser::new();
        let mut fed = 0;
        while p.status() == ConnectStatus::Incomplete {
            let n = p.room().min(7);
            p.feed(&line[fed..fed + n]);
            fed += n;
        }
        assert_eq!(p.status(), ConnectStatus::Invalid(ConnectError::TooLong));
        assert_eq!(fed, CONNECT_LINE_MAX);
        assert_eq!(p.room(), 0);
        // Feeding more than the room is refused too.
        let mut p = ConnectParser::new();
        assert_eq!(
            p.feed(&[b'C'; 65]),
            ConnectStatus::Invalid(ConnectError::TooLong)
        );
    }

    #[test]
    fn ok_line_formats() {
        assert_eq!(OkLine::new(0).as_bytes(), b"OK 0\n");
        assert_eq!(OkLine::new(1073741824).as_bytes(), b"OK 1073741824\n");
        assert_eq!(OkLine::new(u32::MAX).as_bytes(), b"OK 4294967295\n");
    }
}
