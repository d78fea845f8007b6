//! The one place the engine tells its recorder anything: a sink with a typed method for each
//! kind of record, a no-op when no recorder is attached. The engine and its grants call it
//! unconditionally; whether anything is written, and what a record holds, is decided here.

use super::*;

/// Where the engine's records go.
#[derive(Default)]
pub(super) struct Sink {
    recorder: Option<Box<dyn Recorder>>,
}

/// The `(guest, host)` ports of `conn` in `conns`, as [`Engine::conn_ports`] reports them.
pub(super) fn ports(conns: &Slab<Conn>, conn: ConnId) -> Option<(u32, u32)> {
    // A host client has ports only once its CONNECT line named one: one refused (or closed)
    // while still sending it never had any, whatever its phase is now.
    conns
        .get(conn.index() as usize)
        .filter(|c| c.generation == conn.generation())
        .filter(|c| {
            c.origin == Origin::Guest
                || u64::from(c.key.peer_cid) != HOST_CID
                || matches!(c.line.status(), ConnectStatus::Complete(_))
        })
        .map(|c| (c.key.guest_port, c.key.host_port))
}

impl Sink {
    pub(super) fn is_on(&self) -> bool {
        self.recorder.is_some()
    }

    /// Attaches `recorder` (or detaches, with `None`) and tells it where the engine stands.
    /// Returns the one attached before.
    pub(super) fn attach(
        &mut self,
        recorder: Option<Box<dyn Recorder>>,
        now: Instant,
        config: &Config,
        snapshot: Snapshot,
        types: SocketTypes,
    ) -> Option<Box<dyn Recorder>> {
        let old = std::mem::replace(&mut self.recorder, recorder);
        if let Some(r) = self.recorder.as_mut() {
            r.event(now, None, &Event::Start(config, snapshot));
            // What the driver negotiated is state too; a fresh engine allows streams only.
            if types != SocketTypes::STREAM {
                r.event(now, None, &Event::SocketTypes(types));
            }
        }
        old
    }

    fn event(&mut self, conns: &Slab<Conn>, now: Instant, event: &Event<'_>) {
        if let Some(r) = self.recorder.as_mut() {
            let ports = event.conn().and_then(|conn| ports(conns, conn));
            r.event(now, ports, event);
        }
    }

    fn packet(
        &mut self,
        now: Instant,
        to_guest: bool,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    ) {
        if let Some(r) = self.recorder.as_mut() {
            r.packet(now, to_guest, header, payload, available);
        }
    }

    /// A packet from the guest; `available` bytes of its payload can be read.
    pub(super) fn guest_packet(
        &mut self,
        now: Instant,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    ) {
        self.packet(now, false, header, payload, available);
    }

    /// What the socket did with a guest packet's payload, and whether guest memory could be
    /// read for the rest.
    pub(super) fn tx_written(
        &mut self,
        conns: &Slab<Conn>,
        now: Instant,
        written: Io,
        faulted: bool,
    ) {
        let outcome = if faulted {
            TxOutcome::Unreadable(written)
        } else {
            TxOutcome::Written(written)
        };
        self.event(conns, now, &Event::TxWritten(outcome));
    }

    /// A guest packet whose payload grant was dropped unfinished.
    pub(super) fn tx_abandoned(&mut self, conns: &Slab<Conn>, now: Instant, header: &Header) {
        self.packet(now, false, header, &mut &[][..], 0);
        self.event(conns, now, &Event::TxWritten(TxOutcome::Abandoned));
    }

    /// A packet to the guest.
    pub(super) fn guest_bound(
        &mut self,
        now: Instant,
        header: &Header,
        payload: &mut dyn GuestBytes,
        available: usize,
    ) {
        self.packet(now, true, header, payload, available);
    }

    pub(super) fn accept(
        &mut self,
        conns: &Slab<Conn>,
        now: Instant,
        ty: SocketType,
        accepted: Result<ConnId, TableFull>,
    ) {
        self.event(conns, now, &Event::Accept(ty, accepted));
    }

    pub(super) fn sibling_accept(&mut self, conns: &Slab<Conn>, now: Instant, event: Event<'_>) {
        self.event(conns, now, &event);
    }

    pub(super) fn reset_peer(&mut self, conns: &Slab<Conn>, now: Instant, cid: u64) {
        self.event(conns, now, &Event::ResetPeer(cid));
    }

    pub(super) fn socket_types(&mut self, conns: &Slab<Conn>, now: Instant, types: SocketTypes) {
        self.event(conns, now, &Event::SocketTypes(types));
    }

    pub(super) fn probe(&mut self, conns: &Slab<Conn>, now: Instant, conn: ConnId, probe: Probe) {
        self.event(conns, now, &Event::Probe(conn, probe));
    }

    pub(super) fn rx_message(
        &mut self,
        conns: &Slab<Conn>,
        now: Instant,
        conn: ConnId,
        io: Io,
        rooms: &[usize],
        staged: &[u8],
    ) {
        self.event(conns, now, &Event::RxMessage(conn, io, rooms, staged));
    }

    pub(super) fn connect_line(
        &mut self,
        conns: &Slab<Conn>,
        now: Instant,
        conn: ConnId,
        read: LineRead<'_>,
    ) {
        self.event(conns, now, &Event::ConnectLine(conn, read));
    }

    pub(super) fn host_event(
        &mut self,
        conns: &Slab<Conn>,
        now: Instant,
        conn: ConnId,
        event: HostEvent,
    ) {
        self.event(conns, now, &Event::Host(conn, event));
    }

    pub(super) fn host_write(&mut self, conns: &Slab<Conn>, now: Instant, conn: ConnId, io: Io) {
        self.event(conns, now, &Event::HostWrite(conn, io));
    }

    pub(super) fn rx_read(&mut self, conns: &Slab<Conn>, now: Instant, conn: ConnId, io: Io) {
        self.event(conns, now, &Event::RxRead(conn, io));
    }

    pub(super) fn poll_rx(&mut self, conns: &Slab<Conn>, now: Instant, room: usize, grant: Grant) {
        self.event(conns, now, &Event::PollRx { room, grant });
    }

    pub(super) fn action(&mut self, conns: &Slab<Conn>, now: Instant, action: Option<Action>) {
        self.event(conns, now, &Event::Action(action));
    }

    pub(super) fn timeout(&mut self, conns: &Slab<Conn>, now: Instant) {
        self.event(conns, now, &Event::Timeout);
    }

    pub(super) fn reset_connection(&mut self, conns: &Slab<Conn>, now: Instant, conn: ConnId) {
        self.event(conns, now, &Event::ResetConnection(conn));
    }

    pub(super) fn abort_all(&mut self, conns: &Slab<Conn>, now: Instant) {
        self.event(conns, now, &Event::AbortAll);
    }

    pub(super) fn reset(&mut self, conns: &Slab<Conn>, now: Instant) {
        self.event(conns, now, &Event::Reset);
    }

    pub(super) fn stop(&mut self, conns: &Slab<Conn>, now: Instant) {
        self.event(conns, now, &Event::Stop);
    }
}
