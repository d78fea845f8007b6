//! The `--summary` report of `vsock-replay`: a trace's connections, bytes each way, resets
//! and timings, from the records [`read`](crate::replay::read) returns.

use std::collections::BTreeMap;
use std::io::{self, Write};

use crate::replay::{Entry, Item};

#[derive(Default)]
struct Conn {
    opened_by_guest: Option<bool>,
    first: u64,
    last: u64,
    bytes_from_guest: u64,
    bytes_to_guest: u64,
    shut_down: bool,
    ended: &'static str,
}

const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;
const REQUEST: u16 = 1;

fn secs(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Writes the summary of `entries` (a trace as [`read`](crate::replay::read) returns it) to
/// `out`, as `vsock-replay --summary` prints it.
///
/// # Errors
///
/// Any error writing to `out`.
pub fn summary(out: &mut dyn Write, entries: &[Entry<'_>]) -> io::Result<()> {
    let start = entries.first().map_or(0, |e| e.ts_nanos);
    let end = entries.last().map_or(0, |e| e.ts_nanos);
    let mut conns: BTreeMap<(u32, u32), Conn> = BTreeMap::new();
    let (mut packets, mut events) = ([0u64; 2], 0u64);
    let (mut bytes, mut resets) = ([0u64; 2], [0u64; 2]);
    for e in entries {
        match &e.item {
            Item::Start(config) => writeln!(
                out,
                "configuration: guest CID {}, buffer {} bytes, up to {} connections",
                config.guest_cid, config.buffer_size, config.max_connections
            )?,
            Item::Event(_) => events += 1,
            Item::Packet {
                to_guest, header, ..
            } => {
                let way = usize::from(*to_guest);
                packets[way] += 1;
                let (guest_port, host_port) = if *to_guest {
                    (header.dst_port.get(), header.src_port.get())
                } else {
                    (header.src_port.get(), header.dst_port.get())
                };
                let op = header.op.get();
                let c = conns.entry((guest_port, host_port)).or_default();
                if c.first == 0 {
                    c.first = e.ts_nanos;
                }
                c.last = e.ts_nanos;
                if op == REQUEST && c.opened_by_guest.is_none() {
                    c.opened_by_guest = Some(!*to_guest);
                }
                let len = u64::from(header.len.get());
                if op == RW {
                    bytes[way] += len;
                    if *to_guest {
                        c.bytes_to_guest += len;
                    } else {
                        c.bytes_from_guest += len;
                    }
                }
                if op == RST {
                    resets[way] += 1;
                    // After a shutdown, the RST is how a vsock connection ends normally.
                    c.ended = match (c.shut_down, *to_guest) {
                        (true, _) => "closed",
                        (false, true) => "reset by the device",
                        (false, false) => "reset by the guest",
                    };
                } else if op == SHUTDOWN {
                    c.shut_down = true;
                    c.ended = "shut down";
                }
            }
        }
    }
    writeln!(
        out,
        "{} records over {:.3} s: {} packets from the guest, {} to the guest, {} host events",
        entries.len(),
        secs(end - start),
        packets[0],
        packets[1],
        events
    )?;
    writeln!(
        out,
        "bytes: {} guest->host, {} host->guest; resets: {} from the guest, {} to the guest",
        bytes[0], bytes[1], resets[0], resets[1]
    )?;
    writeln!(out, "connections: {}", conns.len())?;
    writeln!(
        out,
        "  {:>10} {:>10}  {:<12} {:>12} {:>12} {:>9} {:>9}  end",
        "guest port", "host port", "opened by", "guest->host", "host->guest", "from s", "for s"
    )?;
    for ((guest_port, host_port), c) in &conns {
        writeln!(
            out,
            "  {:>10} {:>10}  {:<12} {:>12} {:>12} {:>9.3} {:>9.3}  {}",
            guest_port,
            host_port,
            match c.opened_by_guest {
                Some(true) => "guest",
                Some(false) => "host client",
                None => "?",
            },
            c.bytes_from_guest,
            c.bytes_to_guest,
            secs(c.first - start),
            secs(c.last - c.first),
            if c.ended.is_empty() { "-" } else { c.ended }
        )?;
    }
    Ok(())
}
