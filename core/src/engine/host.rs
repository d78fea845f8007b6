//! Host inputs: accepted clients, their `CONNECT` line, socket events and write results.

use super::*;

impl Engine {
    /// A host client was accepted on the listener.
    ///
    /// The engine will ask for its `CONNECT` line with [`Action::ReadConnectLine`] once the
    /// socket is readable. On `Err`, close the socket: the table is full (counted).
    pub fn handle_accept(&mut self, now: Instant) -> Result<ConnId, TableFull> {
        let accepted = self.accept(now, SocketType::Stream);
        self.sink
            .accept(&self.conns, now, SocketType::Stream, accepted);
        accepted
    }

    /// A host client was accepted on the seqpacket listener (`<uds_path>_seqpacket`): as
    /// [`handle_accept`](Self::handle_accept), for a client whose `CONNECT` line is one
    /// message and which is joined to a guest seqpacket listener. If the guest has not
    /// negotiated seqpacket sockets when the line names its port, the client is closed
    /// (counted as `seqpacket_clients_refused`).
    pub fn handle_seqpacket_accept(&mut self, now: Instant) -> Result<ConnId, TableFull> {
        let accepted = self.accept(now, SocketType::SeqPacket);
        self.sink
            .accept(&self.conns, now, SocketType::SeqPacket, accepted);
        accepted
    }

    pub(super) fn accept(&mut self, now: Instant, ty: SocketType) -> Result<ConnId, TableFull> {
        self.advance(now);
        if self.conns.len() >= self.config.max_connections {
            self.stats.accept_limit += 1;
            debug!("connection table full; refusing host client");
            return Err(TableFull);
        }
        if self.reading_line >= self.config.max_pending_host_clients {
            // The slowest client makes room, not the newest: a client that has not sent its
            // line in all the time the others arrived must not keep a prompt one out.
            self.evict_oldest_pending();
        }
        let key = Key {
            socket_type: ty,
            peer_cid: HOST_CID as u32,
            guest_port: 0,
            host_port: 0,
        };
        let idx = self.insert(Conn::new(0, Origin::Host, Phase::ConnectLine, key));
        self.conns[idx].writable = true;
        self.reading_line += 1;
        self.stats.host_accepts += 1;
        let deadline = self.now + self.config.connect_line_timeout;
        self.set_deadline(idx, deadline);
        self.reconcile(idx);
        let id = self.id(idx);
        debug!(conn = %id, "host client accepted");
        Ok(id)
    }

    /// The result of reading a host client's `CONNECT` line after
    /// [`Action::ReadConnectLine`].
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle, [`ConnError::WrongState`] if the connection is
    /// not reading its line; nothing changes then.
    pub fn handle_connect_line(
        &mut self,
        now: Instant,
        conn: ConnId,
        read: LineRead<'_>,
    ) -> Result<(), ConnError> {
        self.sink.connect_line(&self.conns, now, conn, read);
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if c.phase == Phase::SiblingReply {
            self.sibling_reply(idx, read);
            return Ok(());
        }
        if c.phase != Phase::ConnectLine {
            return Err(ConnError::WrongState);
        }
        match read {
            LineRead::Data(bytes) => {
                // A seqpacket client's line is one message: whole, and alone in it.
                let status = match c.line.feed(bytes) {
                    ConnectStatus::Incomplete if c.is_seqpacket() => {
                        ConnectStatus::Invalid(ConnectError::Garbage)
                    }
                    ConnectStatus::Complete(_)
                        if c.is_seqpacket() && !c.line.leftover().is_empty() =>
                    {
                        ConnectStatus::Invalid(ConnectError::Garbage)
                    }
                    status => status,
                };
                // Readable until a read would block (see `RxRead::complete`).
                match status {
                    ConnectStatus::Incomplete => {}
                    ConnectStatus::Complete(port) => self.host_request(idx, port),
                    ConnectStatus::Invalid(e) => {
                        match e {
                            ConnectError::Garbage => self.stats.connect_line_garbage += 1,
                            ConnectError::TooLong => self.stats.connect_line_too_long += 1,
                            ConnectError::PortOutOfRange => self.stats.connect_line_bad_port += 1,
                        }
                        debug!(%conn, error = %e, "refused CONNECT line");
                        self.close_host_client(idx);
                    }
                }
            }
            LineRead::Eof => {
                self.stats.connect_line_eof += 1;
                self.close_host_client(idx);
            }
            LineRead::WouldBlock => c.readable = false,
            LineRead::Error(e) => {
                debug!(%conn, error = %e, "host client read failed");
                self.stats.host_errors += 1;
                self.close_host_client(idx);
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// Closes the host client that has waited longest for its `CONNECT` line.
    pub(super) fn evict_oldest_pending(&mut self) {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::ConnectLine)
            .min_by_key(|(_, c)| (c.deadline, c.generation))
            .map(|(idx, _)| idx);
        if let Some(idx) = oldest {
            self.stats.pending_evicted += 1;
            debug!(conn = %self.id(idx), "pending host clients full; closing the oldest");
            self.close_host_client(idx);
        }
    }

    /// Closes a host client that never became a connection: nothing is owed to the guest,
    /// only the socket's close.
    pub(super) fn close_host_client(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase == Phase::ConnectLine {
            self.reading_line -= 1;
        }
        c.phase = Phase::Closed;
        c.deadline = None;
        self.free_if_done(idx);
    }

    pub(super) fn host_request(&mut self, idx: usize, guest_port: u32) {
        let socket_type = self.conns[idx].key.socket_type;
        if !self.socket_types.allows(socket_type) {
            if socket_type == SocketType::SeqPacket {
                self.stats.seqpacket_clients_refused += 1;
            } else {
                self.stats.stream_clients_refused += 1;
            }
            debug!(conn = %self.id(idx), ?socket_type, "client of a socket type the guest did not negotiate");
            self.close_host_client(idx);
            return;
        }
        let Some(host_port) = self.alloc_host_port(socket_type, guest_port) else {
            // Unreachable while the table is smaller than the port range, but never panic.
            self.close_host_client(idx);
            return;
        };
        let c = &mut self.conns[idx];
        c.key = Key {
            socket_type,
            peer_cid: HOST_CID as u32,
            guest_port,
            host_port,
        };
        c.phase = Phase::HostConnecting;
        self.reading_line -= 1;
        c.owed_rx |= owed_rx::REQUEST;
        self.bind_key(idx);
        let deadline = self.now + self.config.connect_timeout;
        self.set_deadline(idx, deadline);
        debug!(conn = %self.id(idx), guest_port, host_port, "host client connects");
    }

    /// A host port for a connection to `guest_port` that no live connection uses.
    pub(super) fn alloc_host_port(
        &mut self,
        socket_type: SocketType,
        guest_port: u32,
    ) -> Option<u32> {
        for _ in 0..=self.config.max_connections {
            let port = self.next_host_port;
            self.next_host_port = if port >= u32::MAX - 1 {
                self.config.host_port_first
            } else {
                port + 1
            };
            let key = Key {
                socket_type,
                peer_cid: HOST_CID as u32,
                guest_port,
                host_port: port,
            };
            if !self.map.contains_key(&key) {
                return Some(port);
            }
        }
        None
    }

    /// An event from a connection's host socket.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle (counted); nothing changes then.
    pub fn handle_host_event(
        &mut self,
        now: Instant,
        conn: ConnId,
        event: HostEvent,
    ) -> Result<(), ConnError> {
        self.sink.host_event(&self.conns, now, conn, event);
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if !c.socket_open || matches!(c.phase, Phase::Resetting | Phase::Closed) {
            return Ok(());
        }
        trace!(%conn, ?event, "host event");
        match event {
            HostEvent::Connected => {
                if c.phase != Phase::GuestConnecting {
                    return Err(ConnError::WrongState);
                }
                c.writable = true;
                if u64::from(c.key.peer_cid) != HOST_CID {
                    // Connected to the sibling's device; its guest has yet to accept.
                    c.phase = Phase::SiblingReply;
                    c.line = ConnectParser::reply();
                    debug!(%conn, "connected to a sibling; awaiting its reply");
                } else {
                    c.phase = Phase::Established;
                    c.deadline = None;
                    c.owed_rx |= owed_rx::RESPONSE;
                    self.stats.established += 1;
                    debug!(%conn, "guest connection established");
                }
            }
            HostEvent::ConnectFailed(e) => {
                if c.phase != Phase::GuestConnecting {
                    return Err(ConnError::WrongState);
                }
                debug!(%conn, error = %e, "host connect failed");
                self.stats.connect_failed += 1;
                self.reset_conn(idx);
            }
            HostEvent::Readable => c.readable = true,
            HostEvent::Writable => c.writable = true,
            HostEvent::HangUp => self.host_hung_up(idx),
            HostEvent::Error(e) => {
                debug!(%conn, error = %e, "host socket error");
                if c.phase == Phase::ConnectLine {
                    self.stats.host_errors += 1;
                    self.close_host_client(idx);
                } else {
                    self.host_broken(idx);
                }
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// The bytes a [`Action::Flush`] writes: the rest of the `OK` line, or buffered guest
    /// bytes, as at most two slices (for one `writev`). On a seqpacket connection that is
    /// one message: the `OK` line, or the oldest complete guest message.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle.
    pub fn host_bytes(&self, conn: ConnId) -> Result<[&[u8]; 2], ConnError> {
        let c = self
            .get(conn)
            .filter(|c| c.socket_open)
            .ok_or(ConnError::Stale)?;
        if let Some((line, done)) = &c.ok {
            return Ok([&line.as_bytes()[*done as usize..], &[]]);
        }
        Ok(match &c.ring {
            Some(ring) if c.is_seqpacket() => {
                let len = ring.first_message().unwrap_or(0);
                let (a, b) = ring.as_slices();
                let first = a.len().min(len);
                [&a[..first], &b[..len - first]]
            }
            Some(ring) => {
                let (a, b) = ring.as_slices();
                [a, b]
            }
            None => [&[], &[]],
        })
    }

    /// The result of writing [`host_bytes`](Self::host_bytes) to the socket.
    ///
    /// # Errors
    ///
    /// [`ConnError::Stale`] for a dead handle; [`ConnError::WrongState`] if no
    /// [`Action::Flush`] for it is outstanding (nothing changes); [`ConnError::Overrun`] if
    /// `result` claims more bytes than were offered (the connection is reset).
    pub fn handle_host_write(
        &mut self,
        now: Instant,
        conn: ConnId,
        result: Io,
    ) -> Result<(), ConnError> {
        self.sink.host_write(&self.conns, now, conn, result);
        self.advance(now);
        let idx = self.lookup(conn)?;
        let c = &mut self.conns[idx];
        if !c.flush_outstanding {
            // Only the answer to an `Action::Flush` moves bytes: anything else would hand
            // the guest credit for bytes no socket took.
            return Err(ConnError::WrongState);
        }
        c.flush_outstanding = false;
        if c.phase != Phase::Established || !c.socket_open {
            return Ok(());
        }
        match result {
            Io::Done(n) => {
                let offered = match &c.ok {
                    Some((line, done)) => line.as_bytes().len() - *done as usize,
                    None if c.is_seqpacket() => {
                        c.ring.as_ref().and_then(|r| r.first_message()).unwrap_or(0)
                    }
                    None => c.buffered(),
                };
                if n > offered {
                    self.reset_conn(idx);
                    return Err(ConnError::Overrun);
                }
                if c.is_seqpacket() && n < offered {
                    // A message goes whole or not at all; part of one is a broken socket.
                    debug!(%conn, n, offered, "partial message write");
                    self.stats.seqpacket_partial_write += 1;
                    self.stats.guest_bytes_lost += c.buffered() as u64;
                    self.reset_conn(idx);
                    return Ok(());
                }
                if c.is_seqpacket() && c.ok.is_none() {
                    self.stats.messages_to_host += 1;
                }
                if n < offered {
                    c.writable = false;
                }
                if let Some((line, done)) = &mut c.ok {
                    *done += n as u8;
                    if *done as usize == line.as_bytes().len() {
                        c.ok = None;
                    }
                } else if let Some(ring) = &mut c.ring {
                    ring.consume(n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                    c.stats.host_written += n as u64;
                }
            }
            Io::WouldBlock => c.writable = false,
            Io::Error(e) if c.is_seqpacket() && e.0 == super::guest::EMSGSIZE => {
                debug!(%conn, "host socket refused a message as too large");
                self.stats.seqpacket_host_emsgsize += 1;
                self.stats.guest_bytes_lost += c.buffered() as u64;
                self.reset_conn(idx);
            }
            Io::Error(e) => {
                debug!(%conn, error = %e, "host write failed");
                self.host_broken(idx);
            }
        }
        self.reconcile(idx);
        Ok(())
    }

    /// The host socket of connection `idx` failed (an error, or a write that failed): it takes
    /// no more guest bytes, so those it holds are dropped and the guest is told at once with
    /// SHUTDOWN RCV (its sends fail instead of waiting for credit). What the socket still holds
    /// for the guest (a peer that wrote a reply and closed without reading keeps its bytes in
    /// our socket) is read and delivered, and then the guest gets an RST: only a reset tells it
    /// that bytes it sent were lost. With nothing left to deliver, the reset is at once.
    /// The peer of connection `idx`'s socket hung up. With nothing of the guest's held for
    /// it, a clean end: the guest is told with SHUTDOWN RCV that its sends will fail, what the
    /// socket holds is read and delivered, and the connection ends as usual. With guest bytes
    /// held, those are lost: a broken socket ([`host_broken`](Self::host_broken)).
    pub(super) fn host_hung_up(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        match c.phase {
            Phase::Established if c.host_pending() > 0 || c.open_msg > 0 => {
                self.stats.host_hangups += 1;
                self.host_broken(idx);
            }
            Phase::Established if !c.host_hung_up && !c.host_broken => {
                self.stats.host_hangups += 1;
                c.host_hung_up = true;
                c.readable = true;
                c.writable = false;
                if c.guest_shut & SHUTDOWN_SEND == 0 {
                    c.owed_rx |= owed_rx::SHUTDOWN_RCV;
                }
            }
            // A client gone before its line was read may still have sent all of it; a
            // connect's result or a sibling's reply says the rest.
            _ => c.readable = true,
        }
    }

    pub(super) fn host_broken(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.host_broken {
            // Counted when it broke.
            return;
        }
        self.stats.host_errors += 1;
        let c = &mut self.conns[idx];
        if !c.to_guest_open() || !c.socket_open {
            self.reset_conn(idx);
            return;
        }
        c.host_broken = true;
        // Reading finds what is left, then end of file or the error itself.
        c.readable = true;
        c.writable = false;
        c.owed_rx |= owed_rx::SHUTDOWN_RCV;
        let lost = (c.ok_pending() + c.buffered()) as u64;
        self.stats.guest_bytes_lost += lost;
        c.open_msg = 0;
        if let Some(ring) = c.ring.take() {
            self.pool.give(ring);
        }
        c.ok = None;
        self.reconcile(idx);
    }
}
