//! Guest inputs: a tx packet from the guest, and the completion of its payload.

use super::*;

/// `EMSGSIZE` on Linux: a seqpacket socket refused a message larger than its send buffer.
pub(super) const EMSGSIZE: i32 = 90;

impl Engine {
    /// A packet from the guest's tx queue.
    ///
    /// `header` is the copy of the 44 header bytes the caller took out of guest memory. Its
    /// payload (for RW) is not read here: if the returned [`Tx`] is [`Tx::Data`], the caller
    /// offers the payload to the host socket and then completes it, so bytes the socket takes go
    /// there straight from guest memory and only the remainder is copied. Whatever the outcome,
    /// the caller returns the guest's buffer to the used ring.
    pub fn handle_tx(&mut self, now: Instant, header: &Header) -> Tx<'_> {
        match self.decide_tx(now, header) {
            Some((idx, conn, len, direct)) => Tx::Data(TxData {
                engine: self,
                idx,
                conn,
                len,
                direct,
                done: false,
                header: *header,
                now,
            }),
            None => {
                // No payload goes anywhere: the packet's story ends here.
                self.sink.guest_packet(now, header, &mut &[][..], 0);
                Tx::Done
            }
        }
    }

    /// Handles a guest packet; returns the payload's destination `(idx, conn, len, direct)`
    /// when it carries data for a socket.
    pub(super) fn decide_tx(
        &mut self,
        now: Instant,
        header: &Header,
    ) -> Option<(usize, ConnId, usize, bool)> {
        self.advance(now);
        self.stats.tx_packets += 1;
        let raw_op = header.op.get();
        // Addressing first: a packet that is not from our guest to the host is dropped whatever
        // else is wrong with it, and never answered.
        let (src_cid, dst_cid) = (header.src_cid.get(), header.dst_cid.get());
        if (src_cid | dst_cid) & CID_RESERVED_MASK != 0 {
            self.stats.reserved_cid_bits += 1;
            debug!(
                src = src_cid,
                dst = dst_cid,
                "dropped packet with reserved CID bits"
            );
            return None;
        }
        // The destination is the host (2) or a sibling VM's guest, which the host side
        // routes (or refuses): anything but the guest's own CID, which its driver never sends
        // through the device.
        if src_cid != self.config.guest_cid || dst_cid == self.config.guest_cid {
            self.stats.wrong_cid += 1;
            debug!(
                src = src_cid,
                dst = dst_cid,
                "dropped packet with wrong CID"
            );
            return None;
        }
        let peer_cid = dst_cid as u32;
        // No credit we ever advertise lets a packet carry more than our buffer.
        let pkt = match Packet::parse(header, self.config.buffer_size) {
            Ok(p) => p,
            Err(e) => {
                self.bad_header(header, e);
                return None;
            }
        };
        if !self.socket_types.allows(pkt.socket_type) {
            // A type the driver did not negotiate is as unknown as a type no one defined.
            self.stats.unknown_type += 1;
            if raw_op != Op::Rst.to_u16() {
                self.reply_rst(header);
            }
            return None;
        }
        let key = Key {
            socket_type: pkt.socket_type,
            peer_cid,
            guest_port: pkt.src_port,
            host_port: pkt.dst_port,
        };
        trace!(?pkt, "guest packet");
        match pkt.op {
            Op::Request => {
                self.guest_request(key, &pkt);
                None
            }
            Op::Rst => {
                self.guest_rst(key);
                None
            }
            _ => self.guest_on_conn(key, &pkt, header),
        }
    }

    pub(super) fn bad_header(&mut self, header: &Header, e: HeaderError) {
        debug!(?header, error = %e, "rejected guest header");
        let is_rst = header.op.get() == Op::Rst.to_u16();
        match e {
            HeaderError::ReservedCidBits => unreachable!("CIDs are checked before parsing"),
            HeaderError::UnknownType(_) => self.stats.unknown_type += 1,
            HeaderError::UnknownOp(_) => self.stats.unknown_op += 1,
            HeaderError::OversizeLen(_) => self.stats.oversize_len += 1,
            HeaderError::PayloadOnControl(_) => self.stats.control_payload += 1,
        }
        let existing = SocketType::from_u16(header.type_.get()).and_then(|socket_type| {
            let key = Key {
                socket_type,
                // Checked before parsing: no reserved bits.
                peer_cid: header.dst_cid.get() as u32,
                guest_port: header.src_port.get(),
                host_port: header.dst_port.get(),
            };
            self.map.get(&key).map(|&i| i as usize)
        });
        match existing {
            Some(idx) if is_rst => self.close_by_guest(idx),
            Some(idx) => self.reset_conn(idx),
            None if is_rst => {}
            None => self.reply_rst(header),
        }
    }

    pub(super) fn reply_rst(&mut self, header: &Header) {
        if self.resets.len() >= self.config.max_pending_resets {
            self.stats.rst_queue_full += 1;
            return;
        }
        self.resets.push_back(OrphanRst {
            peer_cid: header.dst_cid.get() as u32,
            guest_port: header.src_port.get(),
            host_port: header.dst_port.get(),
            raw_type: header.type_.get(),
        });
    }

    pub(super) fn guest_request(&mut self, key: Key, pkt: &Packet) {
        if let Some(&idx) = self.map.get(&key) {
            self.stats.request_for_existing += 1;
            debug!(?key, "REQUEST for an existing connection");
            self.reset_conn(idx as usize);
            return;
        }
        if self.conns.len() >= self.config.max_connections {
            self.stats.connection_limit += 1;
            debug!(?key, "connection table full; refusing REQUEST");
            self.reply_rst(&pkt.to_header());
            return;
        }
        let idx = self.insert(Conn::new(0, Origin::Guest, Phase::GuestConnecting, key));
        let c = &mut self.conns[idx];
        c.peer_buf_alloc = pkt.buf_alloc;
        c.peer_fwd_cnt = pkt.fwd_cnt;
        c.stats.guest_packets += 1;
        c.owed_act |= owed_act::CONNECT;
        self.bind_key(idx);
        self.stats.guest_connects += 1;
        if u64::from(key.peer_cid) != HOST_CID {
            self.stats.sibling_connects += 1;
        }
        let deadline = self.now + self.config.connect_timeout;
        self.set_deadline(idx, deadline);
        debug!(conn = %self.id(idx), cid = key.peer_cid, port = key.host_port, guest_port = key.guest_port, "guest connects");
        self.reconcile(idx);
    }

    pub(super) fn guest_rst(&mut self, key: Key) {
        match self.map.get(&key) {
            Some(&idx) => {
                self.stats.rst_received += 1;
                self.close_by_guest(idx as usize);
            }
            None => self.stats.rst_for_unknown += 1,
        }
    }

    pub(super) fn guest_on_conn(
        &mut self,
        key: Key,
        pkt: &Packet,
        header: &Header,
    ) -> Option<(usize, ConnId, usize, bool)> {
        let Some(&idx) = self.map.get(&key) else {
            self.stats.unknown_connection += 1;
            debug!(?key, op = ?pkt.op, "packet for no connection");
            self.reply_rst(header);
            return None;
        };
        let idx = idx as usize;
        let c = &mut self.conns[idx];
        if c.phase == Phase::Resetting {
            // An RST is already on its way; the guest has not seen it yet.
            return None;
        }
        c.stats.guest_packets += 1;
        if c.peer_buf_alloc != pkt.buf_alloc || c.peer_fwd_cnt != pkt.fwd_cnt {
            c.peer_buf_alloc = pkt.buf_alloc;
            c.peer_fwd_cnt = pkt.fwd_cnt;
            c.credit_requested = false;
        }
        match pkt.op {
            Op::Response => {
                // A RESPONSE counts only once our REQUEST really reached the guest.
                if c.phase == Phase::HostConnecting && c.owed_rx & owed_rx::REQUEST == 0 {
                    c.phase = Phase::Established;
                    c.ok = Some((OkLine::new(key.host_port), 0));
                    c.deadline = None;
                    self.stats.established += 1;
                    debug!(conn = %self.id(idx), "host connection established");
                } else {
                    self.stats.unexpected_response += 1;
                    self.reset_conn(idx);
                }
            }
            Op::Shutdown => {
                c.guest_shut |= pkt.flags & SHUTDOWN_BOTH;
                if c.guest_shut & SHUTDOWN_SEND != 0 && c.open_msg > 0 {
                    // The guest's send of it failed (Linux reports an error for a message
                    // not sent whole), so the socket must not get it: it is dropped, and its
                    // bytes count as consumed.
                    let open = c.open_msg;
                    c.open_msg = 0;
                    if let Some(ring) = c.ring.as_mut() {
                        ring.truncate(open as usize);
                    }
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(open);
                    self.stats.seqpacket_partial_dropped += 1;
                    self.stats.guest_bytes_lost += u64::from(open);
                }
                trace!(conn = %ConnId::new(idx as u32, c.generation), flags = pkt.flags, "guest shutdown");
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => c.owed_rx |= owed_rx::CREDIT_UPDATE,
            Op::Rw => {
                // Data is allowed once the guest has seen the connection established (our
                // RESPONSE delivered, or its own RESPONSE received) and until its SHUTDOWN SEND.
                if c.phase != Phase::Established
                    || c.owed_rx & owed_rx::RESPONSE != 0
                    || c.guest_shut & SHUTDOWN_SEND != 0
                {
                    self.stats.data_after_shutdown += 1;
                    self.reset_conn(idx);
                } else if c.rx_cnt.wrapping_sub(c.last_fwd_sent) as usize + pkt.len as usize
                    > self.config.buffer_size as usize
                {
                    // The guest may have in flight at most the buffer we advertised, less what
                    // it had not yet been told we forwarded.
                    self.stats.credit_violation += 1;
                    debug!(conn = %self.id(idx), len = pkt.len, "guest exceeded its credit");
                    self.reset_conn(idx);
                } else if c.host_hung_up && pkt.len > 0 {
                    // Sent before the guest heard of the hang-up: lost, which only a reset
                    // can tell it.
                    self.host_broken(idx);
                    let c = &mut self.conns[idx];
                    c.rx_cnt = c.rx_cnt.wrapping_add(pkt.len);
                    self.stats.guest_bytes_lost += u64::from(pkt.len);
                } else if c.host_broken {
                    // Nowhere to go: the guest hears of the loss by an RST once the socket's
                    // bytes for it are delivered, and was told with SHUTDOWN RCV to stop.
                    c.rx_cnt = c.rx_cnt.wrapping_add(pkt.len);
                    self.stats.guest_bytes_lost += u64::from(pkt.len);
                } else if pkt.len > 0 {
                    // A message goes straight to the socket only whole: one packet that ends
                    // it, with nothing before it still held.
                    let whole = !c.is_seqpacket() || pkt.flags & SEQ_EOM != 0;
                    let direct = c.nothing_held() && c.writable && c.socket_open && whole;
                    let conn = ConnId::new(idx as u32, c.generation);
                    return Some((idx, conn, pkt.len as usize, direct));
                } else if c.is_seqpacket() && pkt.flags & SEQ_EOM != 0 {
                    if pkt.flags & SEQ_EOR != 0 {
                        self.stats.seqpacket_eor_dropped += 1;
                    }
                    if c.open_msg > 0 {
                        // An empty last packet ends the message its earlier packets began.
                        c.open_msg = 0;
                        if let Some(ring) = c.ring.as_mut() {
                            ring.mark_end();
                        }
                    } else {
                        self.stats.seqpacket_empty_from_guest += 1;
                    }
                }
            }
            Op::Request | Op::Rst => unreachable!("handled before the connection lookup"),
        }
        self.reconcile(idx);
        None
    }

    pub(super) fn tx_complete(
        &mut self,
        idx: usize,
        len: usize,
        direct: bool,
        flags: u32,
        written: Io,
        payload: &mut dyn GuestBytes,
    ) -> Result<(), ConnError> {
        if self.conns[idx].is_seqpacket() {
            return self.tx_message(idx, len, flags, written, payload);
        }
        let c = &mut self.conns[idx];
        let n = match written {
            Io::Done(n) if n > len => {
                self.reset_conn(idx);
                return Err(ConnError::Overrun);
            }
            Io::Done(n) => n,
            Io::WouldBlock => {
                c.writable = false;
                0
            }
            Io::Error(e) => {
                debug!(conn = %ConnId::new(idx as u32, c.generation), error = %e, "host write failed");
                c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
                self.stats.guest_bytes_lost += len as u64;
                self.host_broken(idx);
                return Ok(());
            }
        };
        if direct && n < len {
            c.writable = false;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        c.stats.guest_bytes += len as u64;
        c.stats.host_written += n as u64;
        self.stats.tx_bytes += len as u64;
        self.stats.tx_direct_bytes += n as u64;
        let rest = len - n;
        if rest > 0 {
            if c.ring.is_none() {
                c.ring = Some(self.pool.take());
            }
            let ring = c.ring.as_mut().expect("ring was just provided");
            // The credit check in handle_tx guarantees the remainder fits.
            let (a, b) = ring.free_slices_mut();
            let first = a.len().min(rest);
            let copied = payload
                .copy_to(n, &mut a[..first])
                .and_then(|()| payload.copy_to(n + first, &mut b[..rest - first]));
            if copied.is_err() {
                self.stats.payload_faults += 1;
                self.reset_conn(idx);
                return Ok(());
            }
            ring.commit(rest);
            c.stats.buffered_bytes += rest as u64;
            self.stats.tx_buffered_bytes += rest as u64;
        }
        self.reconcile(idx);
        Ok(())
    }

    /// A seqpacket payload: sent whole straight from guest memory, or copied whole into the
    /// connection buffer (the end of its message marked once the packet with `EOM` came).
    /// Atomic sends leave no middle ground: a partial write is a broken socket.
    fn tx_message(
        &mut self,
        idx: usize,
        len: usize,
        flags: u32,
        written: Io,
        payload: &mut dyn GuestBytes,
    ) -> Result<(), ConnError> {
        let eom = flags & SEQ_EOM != 0;
        if eom && flags & SEQ_EOR != 0 {
            self.stats.seqpacket_eor_dropped += 1;
        }
        let c = &mut self.conns[idx];
        let n = match written {
            Io::Done(n) if n > len => {
                self.reset_conn(idx);
                return Err(ConnError::Overrun);
            }
            Io::Done(n) if n == 0 || n == len => n,
            Io::Done(_) => {
                debug!(conn = %ConnId::new(idx as u32, c.generation), "partial message write");
                self.stats.seqpacket_partial_write += 1;
                self.stats.guest_bytes_lost += len as u64;
                self.reset_conn(idx);
                return Ok(());
            }
            Io::WouldBlock => {
                c.writable = false;
                0
            }
            Io::Error(e) if e.0 == EMSGSIZE => {
                debug!(conn = %ConnId::new(idx as u32, c.generation), len, "host socket refused a message as too large");
                self.stats.seqpacket_host_emsgsize += 1;
                self.stats.guest_bytes_lost += len as u64;
                self.reset_conn(idx);
                return Ok(());
            }
            Io::Error(e) => {
                debug!(conn = %ConnId::new(idx as u32, c.generation), error = %e, "host write failed");
                c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
                self.stats.guest_bytes_lost += len as u64;
                self.host_broken(idx);
                return Ok(());
            }
        };
        c.rx_cnt = c.rx_cnt.wrapping_add(len as u32);
        c.stats.guest_bytes += len as u64;
        self.stats.tx_bytes += len as u64;
        if n == len {
            c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
            c.stats.host_written += n as u64;
            self.stats.tx_direct_bytes += n as u64;
            self.stats.messages_to_host += 1;
            self.reconcile(idx);
            return Ok(());
        }
        if c.ring.is_none() {
            c.ring = Some(self.pool.take());
        }
        let ring = c.ring.as_mut().expect("ring was just provided");
        // The credit check in handle_tx guarantees the payload fits.
        let (a, b) = ring.free_slices_mut();
        let first = a.len().min(len);
        let copied = payload
            .copy_to(0, &mut a[..first])
            .and_then(|()| payload.copy_to(first, &mut b[..len - first]));
        if copied.is_err() {
            self.stats.payload_faults += 1;
            self.reset_conn(idx);
            return Ok(());
        }
        ring.commit(len);
        if eom {
            ring.mark_end();
            c.open_msg = 0;
        } else {
            c.open_msg += len as u32;
        }
        c.stats.buffered_bytes += len as u64;
        self.stats.tx_buffered_bytes += len as u64;
        self.reconcile(idx);
        Ok(())
    }
}
