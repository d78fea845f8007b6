//! The `--summary` report of `vsock-replay`: a trace's connections, bytes each way, resets
//! and timings.
//!
//! [`summarize`] reads a trace and returns its [`Summary`], whose `Display` is the report;
//! [`summary`] writes the report of records [`read`] returned.
//!
//! A trace is input: nothing here trusts its order. Timestamps are the `now` the embedder
//! gave each call, which may step back (the engine keeps its own clock monotonic), so every
//! span is measured between the earliest and the latest timestamp seen, never between the
//! first and the last record, and counters saturate.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};

use vsock_core::record::Snapshot;
use vsock_core::Config;

use crate::replay::{read, Entry, Item, TraceError};

const REQUEST: u16 = 1;
const RST: u16 = 3;
const SHUTDOWN: u16 = 4;
const RW: u16 = 5;
const SEQPACKET: u16 = 2;
const EOM: u32 = 1;

/// Who opened a connection, as far as the trace shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opener {
    /// The guest sent the first REQUEST.
    Guest,
    /// The device sent the first REQUEST: a host client's `CONNECT`.
    HostClient,
    /// No REQUEST was recorded (the recording started later, or the connection never got
    /// that far).
    Unknown,
}

/// How a connection ended, as far as the trace shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Still open when the trace ends.
    Open,
    /// A SHUTDOWN, and no RST yet.
    ShutDown,
    /// An RST after a shutdown: the normal end of a vsock connection.
    Closed,
    /// An RST from the device, with no shutdown before it.
    ResetByDevice,
    /// An RST from the guest, with no shutdown before it.
    ResetByGuest,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Open => "-",
            Ending::ShutDown => "shut down",
            Ending::Closed => "closed",
            Ending::ResetByDevice => "reset by the device",
            Ending::ResetByGuest => "reset by the guest",
        }
    }
}

/// One connection: the packets of one socket type between one guest port and one host port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnSummary {
    /// The socket type, as the headers give it (1 stream, 2 seqpacket).
    pub socket_type: u16,
    /// The guest's port.
    pub guest_port: u32,
    /// The host's port.
    pub host_port: u32,
    /// Who opened it.
    pub opener: Opener,
    /// The earliest timestamp of its packets, nanoseconds.
    pub first_nanos: u64,
    /// The latest timestamp of its packets, nanoseconds.
    pub last_nanos: u64,
    /// RW payload bytes from the guest (as the headers say; a snap length does not change
    /// them).
    pub bytes_from_guest: u64,
    /// RW payload bytes to the guest.
    pub bytes_to_guest: u64,
    /// Seqpacket messages from the guest (RW packets with `EOM`).
    pub messages_from_guest: u64,
    /// Seqpacket messages to the guest.
    pub messages_to_guest: u64,
    /// How it ended.
    pub ending: Ending,
}

/// What a trace holds, in brief.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The recorded configuration.
    pub config: Option<Config>,
    /// The engine's state when the recorder was attached.
    pub snapshot: Option<Snapshot>,
    /// Records in the trace.
    pub records: usize,
    /// The earliest timestamp of any record, nanoseconds (0 for no records).
    pub first_nanos: u64,
    /// The latest timestamp of any record, nanoseconds.
    pub last_nanos: u64,
    /// Records whose timestamp is earlier than the record's before.
    pub steps_back: u64,
    /// The largest such step, nanoseconds.
    pub largest_step_back_nanos: u64,
    /// Packets from the guest.
    pub packets_from_guest: u64,
    /// Packets to the guest.
    pub packets_to_guest: u64,
    /// Host events and actions.
    pub events: u64,
    /// RW payload bytes from the guest.
    pub bytes_from_guest: u64,
    /// RW payload bytes to the guest.
    pub bytes_to_guest: u64,
    /// RSTs from the guest.
    pub resets_from_guest: u64,
    /// RSTs to the guest.
    pub resets_to_guest: u64,
    /// The connections, by guest port then host port.
    pub connections: Vec<ConnSummary>,
}

impl Summary {
    /// The summary of `entries`, in any order and with any timestamps.
    pub fn from_entries(entries: &[Entry<'_>]) -> Summary {
        let mut s = Summary {
            config: None,
            snapshot: None,
            records: entries.len(),
            first_nanos: entries.iter().map(|e| e.ts_nanos).min().unwrap_or(0),
            last_nanos: entries.iter().map(|e| e.ts_nanos).max().unwrap_or(0),
            steps_back: 0,
            largest_step_back_nanos: 0,
            packets_from_guest: 0,
            packets_to_guest: 0,
            events: 0,
            bytes_from_guest: 0,
            bytes_to_guest: 0,
            resets_from_guest: 0,
            resets_to_guest: 0,
            connections: Vec::new(),
        };
        let mut conns: BTreeMap<(u32, u32, u16), ConnSummary> = BTreeMap::new();
        let mut previous: Option<u64> = None;
        for e in entries {
            if let Some(before) = previous.filter(|&before| e.ts_nanos < before) {
                s.steps_back = s.steps_back.saturating_add(1);
                s.largest_step_back_nanos = s.largest_step_back_nanos.max(before - e.ts_nanos);
            }
            previous = Some(e.ts_nanos);
            let (to_guest, header) = match &e.item {
                Item::Start(config, snapshot) => {
                    s.config.get_or_insert_with(|| config.clone());
                    s.snapshot.get_or_insert(*snapshot);
                    continue;
                }
                Item::Event(_) | Item::RxMessage(..) => {
                    s.events = s.events.saturating_add(1);
                    continue;
                }
                Item::Packet {
                    to_guest, header, ..
                } => (*to_guest, header),
            };
            let (guest_port, host_port) = if to_guest {
                (header.dst_port.get(), header.src_port.get())
            } else {
                (header.src_port.get(), header.dst_port.get())
            };
            let socket_type = header.type_.get();
            let c = conns
                .entry((guest_port, host_port, socket_type))
                .or_insert_with(|| ConnSummary {
                    socket_type,
                    guest_port,
                    host_port,
                    opener: Opener::Unknown,
                    first_nanos: e.ts_nanos,
                    last_nanos: e.ts_nanos,
                    bytes_from_guest: 0,
                    bytes_to_guest: 0,
                    messages_from_guest: 0,
                    messages_to_guest: 0,
                    ending: Ending::Open,
                });
            c.first_nanos = c.first_nanos.min(e.ts_nanos);
            c.last_nanos = c.last_nanos.max(e.ts_nanos);
            let len = u64::from(header.len.get());
            let (packets, bytes, resets, conn_bytes) = if to_guest {
                (
                    &mut s.packets_to_guest,
                    &mut s.bytes_to_guest,
                    &mut s.resets_to_guest,
                    &mut c.bytes_to_guest,
                )
            } else {
                (
                    &mut s.packets_from_guest,
                    &mut s.bytes_from_guest,
                    &mut s.resets_from_guest,
                    &mut c.bytes_from_guest,
                )
            };
            *packets = packets.saturating_add(1);
            match header.op.get() {
                REQUEST if c.opener == Opener::Unknown => {
                    c.opener = if to_guest {
                        Opener::HostClient
                    } else {
                        Opener::Guest
                    };
                }
                RW => {
                    *bytes = bytes.saturating_add(len);
                    *conn_bytes = conn_bytes.saturating_add(len);
                    if socket_type == SEQPACKET && header.flags.get() & EOM != 0 {
                        let messages = if to_guest {
                            &mut c.messages_to_guest
                        } else {
                            &mut c.messages_from_guest
                        };
                        *messages = messages.saturating_add(1);
                    }
                }
                RST => {
                    *resets = resets.saturating_add(1);
                    c.ending = match (c.ending, to_guest) {
                        // After a shutdown, the RST is how a vsock connection ends normally.
                        (Ending::ShutDown | Ending::Closed, _) => Ending::Closed,
                        (_, true) => Ending::ResetByDevice,
                        (_, false) => Ending::ResetByGuest,
                    };
                }
                SHUTDOWN => c.ending = Ending::ShutDown,
                _ => {}
            }
        }
        s.connections = conns.into_values().collect();
        s
    }
}

fn secs(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(config) = &self.config {
            writeln!(
                f,
                "configuration: guest CID {}, buffer {} bytes, up to {} connections",
                config.guest_cid, config.buffer_size, config.max_connections
            )?;
            if let Some(snapshot) = self.snapshot.filter(|s| *s != Snapshot::fresh(config)) {
                writeln!(
                    f,
                    "recorded mid-session: next connection generation {}, next host port {}",
                    snapshot.next_generation, snapshot.next_host_port
                )?;
            }
        }
        writeln!(
            f,
            "{} records over {:.3} s: {} packets from the guest, {} to the guest, {} host events",
            self.records,
            secs(self.last_nanos.saturating_sub(self.first_nanos)),
            self.packets_from_guest,
            self.packets_to_guest,
            self.events
        )?;
        if self.steps_back > 0 {
            writeln!(
                f,
                "the clock steps back {} times, by up to {:.3} s (times below run from the \
                 earliest record)",
                self.steps_back,
                secs(self.largest_step_back_nanos)
            )?;
        }
        writeln!(
            f,
            "bytes: {} guest->host, {} host->guest; resets: {} from the guest, {} to the guest",
            self.bytes_from_guest,
            self.bytes_to_guest,
            self.resets_from_guest,
            self.resets_to_guest
        )?;
        writeln!(f, "connections: {}", self.connections.len())?;
        writeln!(
            f,
            "  {:<9} {:>10} {:>10}  {:<12} {:>12} {:>12} {:>9} {:>9}  end",
            "type",
            "guest port",
            "host port",
            "opened by",
            "guest->host",
            "host->guest",
            "from s",
            "for s"
        )?;
        for c in &self.connections {
            let ty = match c.socket_type {
                1 => "stream".to_string(),
                SEQPACKET => "seqpacket".to_string(),
                n => format!("type {n}"),
            };
            writeln!(
                f,
                "  {:<9} {:>10} {:>10}  {:<12} {:>12} {:>12} {:>9.3} {:>9.3}  {}{}",
                ty,
                c.guest_port,
                c.host_port,
                match c.opener {
                    Opener::Guest => "guest",
                    Opener::HostClient => "host client",
                    Opener::Unknown => "?",
                },
                c.bytes_from_guest,
                c.bytes_to_guest,
                secs(c.first_nanos.saturating_sub(self.first_nanos)),
                secs(c.last_nanos.saturating_sub(c.first_nanos)),
                c.ending.as_str(),
                if c.socket_type == SEQPACKET {
                    format!(
                        " ({} messages guest->host, {} host->guest)",
                        c.messages_from_guest, c.messages_to_guest
                    )
                } else {
                    String::new()
                }
            )?;
        }
        Ok(())
    }
}

/// Reads the trace in `bytes` and summarizes it.
///
/// # Errors
///
/// The file is not a readable trace ([`read`]'s errors).
pub fn summarize(bytes: &[u8]) -> Result<Summary, TraceError> {
    Ok(Summary::from_entries(&read(bytes)?))
}

/// Writes the summary of `entries` (a trace as [`read`] returns it) to
/// `out`, as `vsock-replay --summary` prints it.
///
/// # Errors
///
/// Any error writing to `out`.
pub fn summary(out: &mut dyn Write, entries: &[Entry<'_>]) -> io::Result<()> {
    write!(out, "{}", Summary::from_entries(entries))
}
