//! The grants that borrow the engine: a tx payload to place, an rx packet to send, an rx
//! buffer to fill. Nothing changes until a grant is completed.

use super::*;
use crate::io::SocketError;

#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    Orphan,
    Conn(usize),
}

/// What [`Engine::handle_tx`] made of a guest packet.
#[must_use]
pub enum Tx<'a> {
    /// The packet is fully handled (or dropped, or answered; see [`Stats`]).
    Done,
    /// The packet carries payload for a connection's socket: offer it, then
    /// [`complete`](TxData::complete).
    Data(TxData<'a>),
}

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tx::Done => f.write_str("Done"),
            Tx::Data(d) => f
                .debug_struct("Data")
                .field("conn", &d.conn)
                .field("len", &d.len)
                .field("direct", &d.direct)
                .finish(),
        }
    }
}

/// Guest payload on its way to a host socket.
///
/// If [`direct`](Self::direct) is true, write the payload straight from guest memory to the
/// connection's socket (once, non-blocking) and pass the result to
/// [`complete`](Self::complete); otherwise pass `Io::Done(0)`. The engine copies whatever the
/// socket did not take into the connection's buffer. Dropping this without completing it loses
/// the payload, so the connection is reset.
#[must_use]
pub struct TxData<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) idx: usize,
    pub(super) conn: ConnId,
    pub(super) len: usize,
    pub(super) direct: bool,
    pub(super) done: bool,
    /// The packet, for the recorder.
    pub(super) header: Header,
    pub(super) now: Instant,
}

impl TxData<'_> {
    /// The connection the payload belongs to.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty payload is handled without a `TxData`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the caller should write the payload to the socket now. False when earlier bytes
    /// are still buffered (they must go first) or the socket is known not to be writable.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Whether the payload is (part of) a seqpacket message. A direct write of it must then be
    /// one atomic send of the whole payload (one `sendmsg`), or not be tried at all
    /// (`Io::Done(0)`, and the engine copies it): a message is never split over two writes.
    pub fn is_message(&self) -> bool {
        self.engine.conns[self.idx].is_seqpacket()
    }

    /// Finishes the packet. `written` is the result of the direct write (`Io::Done(0)` if none
    /// was tried); `payload` gives access to the bytes the socket did not take.
    ///
    /// # Errors
    ///
    /// [`ConnError::Overrun`] if `written` claims more than [`len`](Self::len) bytes; the
    /// connection is reset.
    pub fn complete(mut self, written: Io, payload: &mut dyn GuestBytes) -> Result<(), ConnError> {
        self.done = true;
        let written = if self.direct { written } else { Io::Done(0) };
        let (now, header, len) = (self.now, self.header, self.len);
        let engine = &mut *self.engine;
        engine.sink.guest_packet(now, &header, payload, len);
        // Whether the payload could be read decides the outcome, so replay must know it.
        let mut watched = Watched {
            inner: payload,
            faulted: false,
        };
        let flags = header.flags.get();
        let result = engine.tx_complete(self.idx, len, self.direct, flags, written, &mut watched);
        engine
            .sink
            .tx_written(&engine.conns, now, written, watched.faulted);
        result
    }
}

/// Guest bytes that remember whether a read of them failed.
struct Watched<'a> {
    pub(super) inner: &'a mut dyn GuestBytes,
    pub(super) faulted: bool,
}

impl GuestBytes for Watched<'_> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        let r = self.inner.copy_to(offset, dst);
        self.faulted |= r.is_err();
        r
    }
}

impl Drop for TxData<'_> {
    fn drop(&mut self) {
        if !self.done {
            let engine = &mut *self.engine;
            engine
                .sink
                .tx_abandoned(&engine.conns, self.now, &self.header);
            debug!(conn = %self.conn, "tx payload abandoned; resetting");
            self.engine.stats.payload_faults += 1;
            self.engine.reset_conn(self.idx);
        }
    }
}

/// A packet for the guest's rx queue, from [`Engine::poll_rx`].
#[must_use]
pub enum RxGrant<'a> {
    /// A packet whose bytes the engine holds: write the header and payload, then
    /// [`send`](RxPacket::send).
    Packet(RxPacket<'a>),
    /// Data to read from a host socket straight into the guest buffer, after the header.
    Read(RxRead<'a>),
    /// Seqpacket: peek at the size of the socket's next message (the buffer is not used
    /// unless the peek finds end of file).
    Probe(RxProbe<'a>),
    /// Seqpacket: read the socket's next message, whole, with one read straight into this
    /// buffer and as many more as it takes.
    Message(RxMessage<'a>),
}

/// A packet whose bytes the engine holds.
#[must_use]
pub struct RxPacket<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) source: Source,
    pub(super) header: Header,
    pub(super) held: usize,
}

impl fmt::Debug for RxPacket<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxPacket")
            .field("header", &self.header)
            .finish()
    }
}

impl RxPacket<'_> {
    /// The header to write.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The payload to write after the header (empty for control packets).
    pub fn payload(&self) -> &[u8] {
        held_bytes(&self.engine.conns, self.source, self.held)
    }

    /// The packet is in the guest's buffer: commit it. Returns the header.
    pub fn send(self) -> Header {
        let header = self.header;
        let engine = &mut *self.engine;
        let payload = held_bytes(&engine.conns, self.source, self.held);
        engine
            .sink
            .guest_bound(engine.now, &header, &mut &payload[..], payload.len());
        match self.source {
            Source::Orphan => {
                self.engine.resets.pop_front();
                self.engine.stats.rx_packets += 1;
                self.engine.stats.rst_sent += 1;
            }
            Source::Conn(idx) => {
                let engine = &mut *self.engine;
                let c = &mut engine.conns[idx];
                if self.held > 0 && c.staged() > 0 {
                    // The rest of a host message: its last part ends it.
                    let stage = c.stage.as_mut().expect("staged bytes");
                    stage.consume(self.held);
                    if stage.len() == 0 {
                        let ring = c.stage.take().expect("checked");
                        engine.pool.give(ring);
                        engine.stats.messages_to_guest += 1;
                    }
                } else if self.held > 0 {
                    c.line.consume_leftover(self.held);
                }
                engine.rx_queue.rotate_left(1);
                engine.delivered(idx, &header);
            }
        }
        header
    }
}

/// The bytes the engine holds for a packet: the rest of a staged host message, or what
/// followed a host client's `CONNECT` line.
fn held_bytes(conns: &Slab<Conn>, source: Source, held: usize) -> &[u8] {
    match source {
        Source::Conn(idx) => {
            let c = &conns[idx];
            match &c.stage {
                // A stage is filled once from its start and only drained: one slice.
                Some(stage) if stage.len() > 0 => &stage.as_slices().0[..held],
                _ => &c.line.leftover()[..held],
            }
        }
        Source::Orphan => &[],
    }
}

/// Data to read from a host socket into a guest rx buffer.
///
/// Read at most [`max`](Self::max) bytes from the connection's socket into the buffer, after
/// the header, then [`complete`](Self::complete) with the result and write the returned
/// header. Dropping it changes nothing.
#[must_use]
pub struct RxRead<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) idx: usize,
    pub(super) conn: ConnId,
    pub(super) max: usize,
}

impl fmt::Debug for RxRead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxRead")
            .field("conn", &self.conn)
            .field("max", &self.max)
            .finish()
    }
}

impl RxRead<'_> {
    /// The connection whose socket to read.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The most bytes to read.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether the engine already knows the socket takes no more guest bytes (see
    /// [`Engine::conn_peer_gone`]): a caller that reads end of file and sees the peer hung up
    /// (`POLLHUP`) before its event came drops this grant, reports
    /// [`HostEvent::HangUp`](crate::HostEvent::HangUp) and polls again, unless this says the
    /// engine knows.
    pub fn peer_gone(&self) -> bool {
        let c = &self.engine.conns[self.idx];
        c.host_hung_up || c.host_broken
    }

    /// Reports the read. Returns the header to publish, or `None` if nothing goes to the guest
    /// (the socket had nothing, or failed: the connection is then reset).
    ///
    /// `Io::Done(0)` is end of file; the buffer then carries a SHUTDOWN instead of data.
    ///
    /// # Errors
    ///
    /// [`ConnError::Overrun`] if `read` claims more than [`max`](Self::max) bytes; the
    /// connection is reset and nothing is published.
    pub fn complete(
        self,
        read: Io,
        payload: &mut dyn GuestBytes,
    ) -> Result<Option<Header>, ConnError> {
        let engine = self.engine;
        let idx = self.idx;
        let now = engine.now;
        engine.sink.rx_read(&engine.conns, now, self.conn, read);
        let result = Self::finish(engine, idx, self.conn, self.max, read);
        if let Ok(Some(header)) = &result {
            let n = header.len.get() as usize;
            engine.sink.guest_bound(now, header, payload, n);
        }
        result
    }

    fn finish(
        engine: &mut Engine,
        idx: usize,
        conn: ConnId,
        max: usize,
        read: Io,
    ) -> Result<Option<Header>, ConnError> {
        let c = &mut engine.conns[idx];
        match read {
            Io::Done(n) if n > max => {
                engine.reset_conn(idx);
                Err(ConnError::Overrun)
            }
            Io::Done(0) if c.host_broken => {
                // Everything the broken socket held reached the guest; the bytes it could not
                // take did not, which only a reset tells.
                debug!(conn = %conn, "end of file on a broken host socket");
                engine.reset_conn(idx);
                Ok(None)
            }
            Io::Done(0) => {
                debug!(conn = %conn, "host end of file");
                c.host_eof = true;
                c.readable = false;
                let header = engine.header(idx, Op::Shutdown, SHUTDOWN_SEND, 0);
                engine.rx_queue.rotate_left(1);
                engine.delivered(idx, &header);
                Ok(Some(header))
            }
            Io::Done(n) => {
                // A short read does not prove the socket drained: the peer's end of file may
                // sit behind the data, its edge already reported. Readiness is given up only
                // on would-block, so edge-triggered callers never miss it.
                let header = engine.header(idx, Op::Rw, 0, n as u32);
                engine.rx_queue.rotate_left(1);
                engine.delivered(idx, &header);
                Ok(Some(header))
            }
            Io::WouldBlock => {
                c.readable = false;
                engine.reconcile(idx);
                Ok(None)
            }
            Io::Error(e) => {
                debug!(conn = %conn, error = %e, "host read failed");
                // A broken socket's error was counted when it broke.
                if !c.host_broken {
                    engine.stats.host_errors += 1;
                }
                engine.reset_conn(idx);
                Ok(None)
            }
        }
    }
}

/// A peek at a seqpacket socket: the size of its next message.
///
/// Peek (`recv` with `MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT` and an empty buffer; a result of 0
/// is an empty message unless `POLLRDHUP` says the peer shut down, and an empty message is
/// consumed) and [`complete`](Self::complete) with what it found. Dropping it changes
/// nothing.
#[must_use]
pub struct RxProbe<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) idx: usize,
    pub(super) conn: ConnId,
}

impl fmt::Debug for RxProbe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxProbe").field("conn", &self.conn).finish()
    }
}

impl RxProbe<'_> {
    /// The connection whose socket to peek at.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Reports the peek. Returns the header to publish in the buffer offered (a SHUTDOWN,
    /// at end of file), or `None`: the buffer is still free, poll again.
    pub fn complete(self, probe: Probe) -> Option<Header> {
        let engine = self.engine;
        let idx = self.idx;
        let now = engine.now;
        engine.sink.probe(&engine.conns, now, self.conn, probe);
        let c = &mut engine.conns[idx];
        match probe {
            Probe::Size(n) if n > 0 => {
                // Beyond the guest's buffer is reset by reconcile, now or whenever the guest
                // shrinks its buffer below it.
                c.rx_msg = Some(u32::try_from(n).unwrap_or(u32::MAX));
                engine.reconcile(idx);
                None
            }
            Probe::Size(_) | Probe::Empty => {
                engine.stats.seqpacket_empty_from_host += 1;
                // Other connections go first: a peer sending nothing but empty messages must
                // not keep the rx queue to itself.
                engine.rx_queue.rotate_left(1);
                engine.reconcile(idx);
                None
            }
            Probe::Eof => {
                let header = RxRead::finish(engine, idx, self.conn, 0, Io::Done(0));
                let header = header.ok().flatten();
                if let Some(h) = &header {
                    engine.sink.guest_bound(now, h, &mut &[][..], 0);
                }
                header
            }
            Probe::WouldBlock => {
                c.readable = false;
                engine.reconcile(idx);
                None
            }
            Probe::Error(e) => {
                seqpacket_error(engine, idx, self.conn, e);
                None
            }
        }
    }
}

/// A seqpacket message to read from a host socket, whole, into guest rx buffers.
///
/// The message has [`len`](Self::len) bytes. Take rx buffers (the one offered to
/// [`Engine::poll_rx`] first) until their payload room, each counted up to
/// [`max_part`](Self::max_part), covers it, and read the message with one `recvmsg`
/// (`MSG_TRUNC`, to learn its real length) scattered over those buffers' payload areas.
/// Then [`complete`](Self::complete) with the result and the room of each buffer, and
/// write each returned header at the start of its buffer. If not enough buffers are
/// posted, read the rest into the engine's [`stage`](Self::stage) with the same `recvmsg`:
/// it follows as packet grants. (Dropping this instead changes nothing: the same grant
/// comes again.)
#[must_use]
pub struct RxMessage<'a> {
    pub(super) engine: &'a mut Engine,
    pub(super) idx: usize,
    pub(super) conn: ConnId,
    pub(super) len: usize,
    pub(super) max_part: usize,
    /// Bytes of the message to be read into the stage, not into rx buffers.
    pub(super) staged: usize,
}

impl fmt::Debug for RxMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxMessage")
            .field("conn", &self.conn)
            .field("len", &self.len)
            .finish()
    }
}

/// How many of the buffers with payload room `rooms`, in order, each holding up to
/// `max_part`, a message of `len` bytes takes (`None` if they are not enough, or one has no
/// room before it is covered).
fn buffers_needed(
    rooms: impl IntoIterator<Item = usize>,
    len: usize,
    max_part: usize,
) -> Option<usize> {
    let mut left = len;
    for (i, room) in rooms.into_iter().enumerate() {
        let part = room.min(max_part);
        if part == 0 {
            return None;
        }
        left = left.saturating_sub(part);
        if left == 0 {
            return Some(i + 1);
        }
    }
    None
}

/// Whether a message of `len` bytes, `staged` of them read into the stage, fills `rooms`
/// exactly: every buffer needed, and the stage taking exactly what they leave.
fn rooms_fit(rooms: &[usize], len: usize, staged: usize, max_part: usize) -> bool {
    if staged == 0 {
        return buffers_needed(rooms.iter().copied(), len, max_part) == Some(rooms.len());
    }
    let parts = rooms.iter().map(|&room| room.min(max_part));
    parts.clone().all(|part| part > 0) && parts.sum::<usize>() + staged == len
}

impl RxMessage<'_> {
    /// The connection whose socket to read.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The message's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty message is never granted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most payload one packet (one rx buffer) carries.
    pub fn max_part(&self) -> usize {
        self.max_part
    }

    /// When the guest has posted too few rx buffers for the whole message, memory of the
    /// engine's for its last `n` bytes, to read them into (as the last piece of the same
    /// `recvmsg`); the engine then delivers them as buffers come, the last part with `EOM`.
    /// The rooms passed to [`complete`](Self::complete) must then take exactly the rest.
    /// `None` if `n` is 0 or more than the connection buffer (`Config::buffer_size`): the
    /// message must wait for buffers.
    pub fn stage(&mut self, n: usize) -> Option<&mut [u8]> {
        if n == 0 || n > self.engine.config.buffer_size as usize || n >= self.len {
            return None;
        }
        let engine = &mut *self.engine;
        let c = &mut engine.conns[self.idx];
        if c.stage.is_none() {
            c.stage = Some(engine.pool.take());
        }
        self.staged = n;
        let stage = c.stage.as_mut().expect("just provided");
        // An empty ring starts at its beginning: its free space is one slice.
        Some(&mut stage.free_slices_mut().0[..n])
    }

    /// How many of the buffers with payload room `rooms`, in order, the message takes
    /// (`None` if they are not enough).
    pub fn buffers_for(&self, rooms: impl IntoIterator<Item = usize>) -> Option<usize> {
        buffers_needed(rooms, self.len, self.max_part)
    }

    /// Reports the read: `read` is the `recvmsg` result (with `MSG_TRUNC`, the message's
    /// real length), `rooms` the payload room of each buffer it was scattered over, and
    /// `payload` the bytes read, in order (for a recorder). Returns the headers to write,
    /// one per buffer in order (RW, `EOM` on the last), or `None` if nothing goes to the
    /// guest (the socket had nothing after all, or failed: the connection is then reset).
    ///
    /// # Errors
    ///
    /// [`ConnError::Overrun`] if the read does not match the message, or `rooms` are not
    /// exactly the buffers it takes; the connection is reset and nothing is published.
    pub fn complete<'r>(
        self,
        read: Io,
        rooms: &'r [usize],
        payload: &mut dyn GuestBytes,
    ) -> Result<Option<MessageHeaders<'r>>, ConnError> {
        let engine = self.engine;
        let idx = self.idx;
        let now = engine.now;
        let len = self.len;
        let staged = self.staged;
        let fits = rooms_fit(rooms, len, staged, self.max_part);
        let whole = fits && read == Io::Done(len);
        if whole && staged > 0 {
            engine.conns[idx]
                .stage
                .as_mut()
                .expect("staged by stage()")
                .commit(staged);
        }
        let stage_bytes = match &engine.conns[idx].stage {
            Some(stage) if whole && staged > 0 => stage.as_slices().0,
            _ => &[],
        };
        engine
            .sink
            .rx_message(&engine.conns, now, self.conn, read, rooms, stage_bytes);
        if !whole {
            // Nothing was kept: a stage drawn for it goes back.
            let c = &mut engine.conns[idx];
            if c.stage.as_ref().is_some_and(|s| s.len() == 0) {
                let ring = c.stage.take().expect("checked");
                engine.pool.give(ring);
            }
        }
        match read {
            Io::Done(n) if n == len && fits => {
                let c = &mut engine.conns[idx];
                c.rx_msg = None;
                let headers = MessageHeaders {
                    template: engine.header(idx, Op::Rw, 0, 0),
                    rooms: rooms.iter(),
                    left: len - staged,
                    max_part: self.max_part,
                    eom: staged == 0,
                };
                engine.rx_queue.rotate_left(1);
                let mut offset = 0;
                for header in headers.clone() {
                    let part = header.len.get() as usize;
                    let mut bytes = Skip {
                        inner: &mut *payload,
                        skip: offset,
                    };
                    engine.sink.guest_bound(now, &header, &mut bytes, part);
                    engine.delivered(idx, &header);
                    offset += part;
                }
                if staged == 0 {
                    engine.stats.messages_to_guest += 1;
                }
                Ok(Some(headers))
            }
            Io::Done(_) => {
                debug!(conn = %self.conn, "message read does not match its probe");
                engine.reset_conn(idx);
                Err(ConnError::Overrun)
            }
            Io::WouldBlock => {
                let c = &mut engine.conns[idx];
                c.rx_msg = None;
                c.readable = false;
                engine.reconcile(idx);
                Ok(None)
            }
            Io::Error(e) => {
                engine.conns[idx].rx_msg = None;
                seqpacket_error(engine, idx, self.conn, e);
                Ok(None)
            }
        }
    }
}

/// `ECONNRESET` on a Unix seqpacket socket: the peer closed with our messages unread. The
/// error comes before the messages it had sent, which are still read (docs/seqpacket.md §1.5):
/// the socket is broken (it takes no more), but its messages are delivered first, then the
/// reset. A second error is the end.
fn seqpacket_error(engine: &mut Engine, idx: usize, conn: ConnId, e: SocketError) {
    const ECONNRESET: i32 = 104;
    let c = &mut engine.conns[idx];
    if e.0 == ECONNRESET && !c.peer_reset_seen {
        c.peer_reset_seen = true;
        debug!(%conn, "seqpacket peer closed with messages unread; delivering what it sent");
        engine.host_broken(idx);
        return;
    }
    let _ = RxRead::finish(engine, idx, conn, 0, Io::Error(e));
}

/// The headers of a message read into several rx buffers, one per buffer, in order: RW
/// packets of the connection, each as long as its buffer's part, the last with `EOM` unless
/// the message's tail went into the stage.
#[derive(Clone, Debug)]
pub struct MessageHeaders<'r> {
    template: Header,
    rooms: std::slice::Iter<'r, usize>,
    left: usize,
    max_part: usize,
    /// Whether the last of these packets ends the message (none is staged).
    eom: bool,
}

impl Iterator for MessageHeaders<'_> {
    type Item = Header;

    fn next(&mut self) -> Option<Header> {
        if self.left == 0 {
            return None;
        }
        let room = *self.rooms.next()?;
        let part = room.min(self.max_part).min(self.left);
        self.left -= part;
        let mut header = self.template;
        header.len = (part as u32).into();
        if self.left == 0 && self.eom {
            header.flags = SEQ_EOM.into();
        }
        Some(header)
    }
}

/// Guest bytes seen from `skip` bytes in.
struct Skip<'a> {
    inner: &'a mut dyn GuestBytes,
    skip: usize,
}

impl GuestBytes for Skip<'_> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        self.inner.copy_to(self.skip + offset, dst)
    }
}
