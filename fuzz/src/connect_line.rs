//! The `connect_line` target: the `CONNECT <port>\n` parser fed the same bytes whole and in
//! fuzzer-chosen pieces.
//!
//! Input: one byte `k` (the number of piece sizes, modulo 16), then `k` piece sizes, then the
//! bytes the client sends.

use vsock_core::wire::{ConnectError, ConnectParser, ConnectStatus, CONNECT_LINE_MAX};

/// What a parser made of a byte stream: its final status, and for a complete line every byte
/// after the newline (those it holds as leftover, then those never fed to it). How many bytes
/// were fed before a refusal is not part of it: garbage is refused as soon as it is seen.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: ConnectStatus,
    after_line: Vec<u8>,
}

/// Feeds `stream` the way the engine's caller does (never more than [`ConnectParser::room`]),
/// each piece at most the next of `sizes` (cycled; all of what fits once they run out).
fn feed(stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut parser = ConnectParser::new();
    let mut at = 0;
    let mut calls = 0;
    let mut sizes = sizes.iter();
    loop {
        calls += 1;
        // Each call either moves a byte or is one of the empty pieces `sizes` holds.
        assert!(
            calls <= stream.len() + 2 * CONNECT_LINE_MAX + 16,
            "feeding does not end"
        );
        let room = parser.room();
        let status = parser.status();
        if status != ConnectStatus::Incomplete {
            assert_eq!(room, 0, "room after {status:?}");
            break;
        }
        assert!(room > 0, "an incomplete parser has room");
        if at == stream.len() {
            break;
        }
        let want = sizes.next().map_or(usize::MAX, |&s| s as usize);
        let n = want.min(room).min(stream.len() - at);
        let before = parser.room();
        let status = parser.feed(&stream[at..at + n]);
        at += n;
        assert_eq!(status, parser.status());
        if status == ConnectStatus::Incomplete {
            assert_eq!(parser.room(), before - n, "room shrinks by what was fed");
            assert!(parser.leftover().is_empty());
        }
    }
    let status = parser.status();
    let mut after_line = Vec::new();
    if let ConnectStatus::Complete(port) = status {
        assert_ne!(port, u32::MAX, "the reserved port is refused");
        // Take the leftover in small pieces: each consume shrinks it from the front.
        let mut held = parser.leftover().to_vec();
        while !parser.leftover().is_empty() {
            let n = parser.leftover().len().div_ceil(2);
            let rest = parser.leftover()[n..].to_vec();
            parser.consume_leftover(n);
            assert_eq!(parser.leftover(), &rest[..]);
        }
        after_line.append(&mut held);
        after_line.extend_from_slice(&stream[at..]);
        // Feeding a finished parser changes nothing.
        assert_eq!(parser.feed(b"x"), status);
    } else {
        assert!(parser.leftover().is_empty());
    }
    Outcome { status, after_line }
}

/// What the line is, computed directly from the specification of the line.
fn reference(stream: &[u8]) -> ConnectStatus {
    const PREFIX: &[u8] = b"CONNECT ";
    let window = &stream[..stream.len().min(CONNECT_LINE_MAX)];
    let newline = window.iter().position(|&b| b == b'\n');
    // Bytes up to the newline (or all of the window) must be the prefix, then digits, then at
    // most one carriage return right before the newline.
    let line = &window[..newline.unwrap_or(window.len())];
    for (i, &b) in line.iter().enumerate() {
        if i < PREFIX.len() {
            if b != PREFIX[i] {
                return ConnectStatus::Invalid(ConnectError::Garbage);
            }
        } else if !(b.is_ascii_digit() || b == b'\r') || (i > PREFIX.len() && line[i - 1] == b'\r')
        {
            // Only digits, and a carriage return only right before the newline.
            return ConnectStatus::Invalid(ConnectError::Garbage);
        }
    }
    let Some(_) = newline else {
        return if window.len() == CONNECT_LINE_MAX {
            ConnectStatus::Invalid(ConnectError::TooLong)
        } else {
            ConnectStatus::Incomplete
        };
    };
    if line.len() < PREFIX.len() {
        return ConnectStatus::Invalid(ConnectError::Garbage);
    }
    let mut digits = &line[PREFIX.len()..];
    if let [rest @ .., b'\r'] = digits {
        digits = rest;
    }
    if digits.is_empty() || digits.contains(&b'\r') {
        return ConnectStatus::Invalid(ConnectError::Garbage);
    }
    let mut port: u64 = 0;
    for &d in digits {
        port = port * 10 + u64::from(d - b'0');
        if port >= u64::from(u32::MAX) {
            return ConnectStatus::Invalid(ConnectError::PortOutOfRange);
        }
    }
    ConnectStatus::Complete(port as u32)
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = (k as usize % 16).min(rest.len());
    let (sizes, stream) = rest.split_at(k);

    let whole = feed(stream, &[]);
    let pieces = feed(stream, sizes);
    assert_eq!(whole, pieces, "outcome depends on the split ({sizes:?})");
    let bytewise = feed(stream, &[1; CONNECT_LINE_MAX]);
    assert_eq!(whole, bytewise, "outcome differs when fed byte by byte");
    assert_eq!(
        whole.status,
        reference(stream),
        "outcome differs from the line's definition"
    );
    if let ConnectStatus::Complete(_) = whole.status {
        let newline = stream.iter().position(|&b| b == b'\n').expect("a line");
        assert_eq!(
            whole.after_line,
            &stream[newline + 1..],
            "bytes after the line"
        );
    }

    // More than the room at once is refused as too long, whatever the bytes.
    let mut parser = ConnectParser::new();
    if stream.len() > CONNECT_LINE_MAX {
        assert_eq!(
            parser.feed(stream),
            ConnectStatus::Invalid(ConnectError::TooLong)
        );
        assert_eq!(parser.room(), 0);
    }
}
