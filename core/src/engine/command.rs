//! The clock and commands: deadlines, resets of one or every connection, stop.

use super::*;

impl Engine {
    /// Fires every deadline at or before `now`. Early and repeated calls are harmless.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sink.timeout(&self.conns, now);
        self.advance(now);
        while let Some(&Reverse((at, index, generation))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let idx = index as usize;
            match self.conns.get(idx) {
                Some(c) if c.generation == generation && c.deadline == Some(at) => {}
                _ => continue,
            }
            self.conns[idx].deadline = None;
            self.expire(idx);
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }

    pub(super) fn expire(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        debug!(conn = %ConnId::new(idx as u32, c.generation), phase = ?c.phase, "deadline passed");
        match c.phase {
            Phase::ConnectLine => {
                self.stats.connect_line_timeout += 1;
                self.close_host_client(idx);
            }
            Phase::HostConnecting | Phase::GuestConnecting | Phase::SiblingReply => {
                self.stats.connect_timeout += 1;
                self.reset_conn(idx);
            }
            Phase::Established => {
                self.stats.close_timeout += 1;
                self.reset_conn(idx);
            }
            Phase::Resetting => {
                self.stats.rst_undelivered += 1;
                c.owed_rx = 0;
                c.phase = Phase::Closed;
                self.unbind_key(idx);
                self.free_if_done(idx);
            }
            Phase::Closed => {}
        }
    }

    /// Resets one connection: an RST to the guest, the socket closed, anything buffered
    /// dropped. For a caller that cannot keep its side of the stream (a packet it could not
    /// publish after all, a socket it lost), so the loss is never silent.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle.
    pub fn reset_connection(&mut self, now: Instant, conn: ConnId) -> Result<(), ConnError> {
        self.sink.reset_connection(&self.conns, now, conn);
        self.advance(now);
        let idx = self.lookup(conn)?;
        self.stats.resets_by_caller += 1;
        self.reset_conn(idx);
        Ok(())
    }

    /// Resets every connection: each gets an RST to the guest and its socket closed. For a
    /// clean shutdown of a running device.
    pub fn abort_all(&mut self, now: Instant) {
        self.sink.abort_all(&self.conns, now);
        self.advance(now);
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            match c.phase {
                Phase::ConnectLine => self.close_host_client(idx),
                Phase::Resetting | Phase::Closed => {}
                _ => self.reset_conn(idx),
            }
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }

    /// Forgets every connection without telling the guest, which is assumed to have forgotten
    /// them too (a device reset, or a restore that sends a transport reset). Every socket gets
    /// its [`Action::Close`]; pending RST replies are dropped. The driver's negotiation is
    /// forgotten too: streams only, until [`set_socket_types`](Self::set_socket_types).
    pub fn reset(&mut self, now: Instant) {
        self.sink.reset(&self.conns, now);
        self.advance(now);
        self.resets.clear();
        self.socket_types = SocketTypes::STREAM;
        self.forget_all();
    }

    /// The socket types the guest's driver negotiated: the device calls this when the driver
    /// is ready (its features acknowledged). Until then, and after a [`reset`](Self::reset),
    /// streams only. A guest packet of a type not allowed is answered with RST (counted as
    /// `unknown_type`), and a host client of the seqpacket listener is closed once it names
    /// its port (`seqpacket_clients_refused`). Live connections of a type no longer allowed
    /// are reset.
    pub fn set_socket_types(&mut self, now: Instant, types: SocketTypes) {
        self.sink.socket_types(&self.conns, now, types);
        self.advance(now);
        self.socket_types = types;
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            let live_key = c.keyed || c.phase != Phase::ConnectLine;
            if live_key && !types.allows(c.key.socket_type) {
                self.reset_conn(idx);
            }
        }
    }

    /// Forgets every connection because the device stopped while the guest's driver may still
    /// hold them (a paused VM whose queues stop and start again): every socket gets its
    /// [`Action::Close`], and the guest is owed an RST for each connection it may know, sent
    /// whenever it next posts rx buffers, with no deadline. A driver that was reset meanwhile
    /// ignores RSTs for connections it does not know. Beyond `max_pending_resets`, RSTs are
    /// dropped and counted.
    pub fn stop(&mut self, now: Instant) {
        self.sink.stop(&self.conns, now);
        self.advance(now);
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            if matches!(c.phase, Phase::ConnectLine | Phase::Closed) {
                continue;
            }
            if self.resets.len() >= self.config.max_pending_resets {
                self.stats.rst_queue_full += 1;
                continue;
            }
            self.resets.push_back(OrphanRst {
                peer_cid: c.key.peer_cid,
                guest_port: c.key.guest_port,
                host_port: c.key.host_port,
                raw_type: c.key.socket_type.to_u16(),
            });
        }
        self.forget_all();
    }

    pub(super) fn forget_all(&mut self) {
        for idx in 0..self.slots_used() {
            if !self.conns.contains(idx) {
                continue;
            }
            let c = &mut self.conns[idx];
            if c.phase == Phase::ConnectLine {
                self.reading_line -= 1;
            }
            c.owed_rx = 0;
            c.phase = Phase::Closed;
            c.deadline = None;
            self.unbind_key(idx);
            self.free_if_done(idx);
            if self.conns.contains(idx) {
                self.reconcile(idx);
            }
        }
    }
}
