//! The recorder that writes a trace file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use vsock_core::record::{Event, Recorder};
use vsock_core::wire::Header;
use vsock_core::{GuestBytes, Instant};

use crate::event::{self, LINKTYPE_EVENTS};
use crate::pcapng::{Way, Writer, MAX_RECORD};
use crate::vsockmon::{self, LINKTYPE_VSOCK, RECORD_HEADER_LEN};

/// The interface of guest packets.
pub const PACKETS: u32 = 0;
/// The interface of host events.
pub const EVENTS: u32 = 1;
/// `if_description` of the event interface: names the encoding and its version
/// ([`event::VERSION`]). Readers also take the older versions' (see
/// [`event::is_events_description`]).
pub const EVENTS_DESCRIPTION: &str = "vsock host events, encoding v4";
/// The rx and tx queues' numbers, for `epb_queue`.
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;

/// A [`Recorder`] that writes a pcapng trace.
///
/// Attach it with `Engine::set_recorder`; it writes as the engine runs and flushes when
/// dropped (detach it, or drop the engine, to finish the file). A write error stops the
/// recording (logged once, and kept: see [`TraceWriter::error`]); the engine runs on.
pub struct TraceWriter<W: Write + Send> {
    out: Option<Writer<W>>,
    snap: usize,
    payload: Vec<u8>,
    record: Vec<u8>,
    error: Option<io::Error>,
}

impl TraceWriter<BufWriter<File>> {
    /// Creates `path` and starts a trace in it. `snap` limits the payload bytes kept of each
    /// packet; lengths are always kept, and so is every input replay needs.
    ///
    /// # Errors
    ///
    /// The file cannot be created or written.
    pub fn create(path: &Path, snap: usize, wall_clock_secs: i64) -> io::Result<Self> {
        let file = File::create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        TraceWriter::new(
            BufWriter::with_capacity(256 * 1024, file),
            snap,
            wall_clock_secs,
        )
    }
}

impl<W: Write + Send> TraceWriter<W> {
    /// Starts a trace in `out`: the section and the two interfaces. Readers add
    /// `wall_clock_secs` to the engine's timestamps to show dates.
    ///
    /// # Errors
    ///
    /// The writer's.
    pub fn new(out: W, snap: usize, wall_clock_secs: i64) -> io::Result<Self> {
        let application = concat!("vsock-trace ", env!("CARGO_PKG_VERSION"));
        let mut writer = Writer::new(out, application)?;
        writer.interface(
            LINKTYPE_VSOCK,
            "vsock",
            "guest <-> device packets",
            wall_clock_secs,
        )?;
        writer.interface(LINKTYPE_EVENTS, "host", EVENTS_DESCRIPTION, wall_clock_secs)?;
        Ok(TraceWriter {
            out: Some(writer),
            snap: snap.min(MAX_RECORD - RECORD_HEADER_LEN),
            payload: Vec::new(),
            record: Vec::new(),
            error: None,
        })
    }

    /// The error that stopped the recording, if one did.
    pub fn error(&self) -> Option<&io::Error> {
        self.error.as_ref()
    }

    /// Flushes and returns the output.
    ///
    /// # Errors
    ///
    /// The error that stopped the recording, or the flush's.
    pub fn finish(mut self) -> io::Result<W> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut out = self.out.take().expect("open until finished");
        out.flush()?;
        Ok(out.into_inner())
    }

    fn write(&mut self, f: impl FnOnce(&mut Writer<W>, &[u8], &[u8]) -> io::Result<()>) {
        let Some(out) = self.out.as_mut() else {
            return;
        };
        if let Err(e) = f(out, &self.payload, &self.record) {
            tracing::warn!(error = %e, "trace recording stopped");
            self.error = Some(e);
            self.out = None;
        }
    }
}

impl<W: Write + Send> Recorder for TraceWriter<W> {
    fn packet(
        &mut self,
        now: Instant,
        to_guest: bool,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    ) {
        let want = (header.len.get() as usize).min(available).min(self.snap);
        self.payload.resize(want, 0);
        if payload.copy_to(0, &mut self.payload).is_err() {
            // The guest's buffer could not be read back: keep the header alone.
            self.payload.clear();
        }
        let head = vsockmon::record_header(header);
        let (way, queue) = if to_guest {
            (Way::Outbound, RX_QUEUE)
        } else {
            (Way::Inbound, TX_QUEUE)
        };
        self.write(|out, payload, _| {
            let len = RECORD_HEADER_LEN + payload.len();
            out.packet(
                PACKETS,
                now.as_nanos(),
                &[&head, payload],
                len,
                way,
                Some(queue),
            )
        });
    }

    fn event(&mut self, now: Instant, ports: Option<(u32, u32)>, event: &Event<'_>) {
        event::encode(&mut self.record, ports, event);
        self.write(|out, _, record| {
            out.packet(
                EVENTS,
                now.as_nanos(),
                &[record],
                record.len(),
                Way::Unknown,
                None,
            )
        });
    }
}

impl<W: Write + Send> Drop for TraceWriter<W> {
    fn drop(&mut self) {
        if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.flush() {
                tracing::warn!(error = %e, "cannot flush the trace");
            }
        }
    }
}
