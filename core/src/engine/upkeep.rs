//! Bookkeeping: the table, keys, queues, deadlines, and bringing a connection's derived state up to date.

use super::*;

impl Engine {
    pub(super) fn insert(&mut self, mut conn: Conn) -> usize {
        conn.generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        self.conns.insert(conn)
    }

    pub(super) fn bind_key(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        c.keyed = true;
        self.map.insert(c.key, idx as u32);
    }

    pub(super) fn unbind_key(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.keyed {
            c.keyed = false;
            self.map.remove(&c.key);
        }
    }

    /// Removes a closed connection once its socket close was issued.
    pub(super) fn free_if_done(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase != Phase::Closed {
            return;
        }
        Self::forget_unopened_socket(c);
        if c.socket_open {
            let c = &mut self.conns[idx];
            c.owed_act = owed_act::CLOSE;
            if !c.in_act_queue {
                c.in_act_queue = true;
                let generation = c.generation;
                Self::enqueue(
                    &mut self.act_queue,
                    &self.conns,
                    idx as u32,
                    generation,
                    |c| c.in_act_queue,
                );
            }
            return;
        }
        self.unbind_key(idx);
        let c = self.conns.remove(idx);
        if let Some(ring) = c.ring {
            self.pool.give(ring);
        }
        if let Some(ring) = c.stage {
            self.pool.give(ring);
        }
        self.stats.closed += 1;
        trace!(conn = %ConnId::new(idx as u32, c.generation), "connection removed");
    }

    /// A guest connection whose [`Action::Connect`] was never handed out has no socket: the
    /// caller must see no action for it at all, not even a `Close`.
    pub(super) fn forget_unopened_socket(c: &mut Conn) {
        if c.owed_act & owed_act::CONNECT != 0 {
            c.socket_open = false;
            c.owed_act = 0;
            // Its queue entry is skipped when reached (poll_action never sees an empty set).
            c.in_act_queue = false;
        }
    }

    /// Resets a connection: RST to the guest, close the socket, drop what it holds.
    pub(super) fn reset_conn(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if matches!(c.phase, Phase::Resetting | Phase::Closed) {
            return;
        }
        debug!(conn = %ConnId::new(idx as u32, c.generation), "reset");
        if c.phase == Phase::ConnectLine {
            self.close_host_client(idx);
            return;
        }
        Self::forget_unopened_socket(c);
        c.phase = Phase::Resetting;
        c.owed_rx = owed_rx::RST;
        c.owed_act = if c.socket_open { owed_act::CLOSE } else { 0 };
        c.open_msg = 0;
        c.rx_msg = None;
        if let Some(ring) = c.ring.take() {
            self.pool.give(ring);
        }
        if let Some(ring) = c.stage.take() {
            self.pool.give(ring);
        }
        c.ok = None;
        let deadline = self.now + self.config.close_timeout;
        self.set_deadline(idx, deadline);
        self.reconcile(idx);
    }

    /// The guest reset the connection: close the socket, send nothing.
    pub(super) fn close_by_guest(&mut self, idx: usize) {
        let c = &mut self.conns[idx];
        if c.phase == Phase::HostConnecting {
            self.stats.connect_refused_by_guest += 1;
        }
        c.phase = Phase::Closed;
        c.owed_rx = 0;
        c.deadline = None;
        self.unbind_key(idx);
        self.free_if_done(idx);
    }

    pub(super) fn set_deadline(&mut self, idx: usize, at: Instant) {
        let c = &mut self.conns[idx];
        c.deadline = Some(at);
        let generation = c.generation;
        if self.timers.len() == self.timers.capacity() {
            let conns = &self.conns;
            self.timers.retain(|Reverse((t, i, g))| {
                matches!(conns.get(*i as usize), Some(c) if c.generation == *g && c.deadline == Some(*t))
            });
        }
        self.timers.push(Reverse((at, idx as u32, generation)));
    }

    pub(super) fn enqueue(
        queue: &mut VecDeque<(u32, u32)>,
        conns: &Slab<Conn>,
        index: u32,
        generation: u32,
        listed: impl Fn(&Conn) -> bool,
    ) {
        if queue.len() == queue.capacity() {
            queue.retain(|&(i, g)| matches!(conns.get(i as usize), Some(c) if c.generation == g && listed(c)));
        }
        queue.push_back((index, generation));
    }

    /// Brings a connection's derived state up to date after anything changed: what it owes
    /// the socket and the guest, whether it is finished, and its queue memberships.
    pub(super) fn reconcile(&mut self, idx: usize) {
        let threshold = self.config.credit_update_threshold;
        let buffer_size = self.config.buffer_size;
        let close_deadline = self.now + self.config.close_timeout;
        let c = &mut self.conns[idx];
        match c.phase {
            Phase::Closed | Phase::Resetting => {}
            Phase::ConnectLine | Phase::SiblingReply => {
                if c.readable && c.line.room() > 0 {
                    c.owed_act |= owed_act::READ_LINE;
                }
            }
            Phase::GuestConnecting | Phase::HostConnecting => {}
            Phase::Established => {
                let pending = c.host_pending();
                if pending > 0 && c.writable && c.socket_open && !c.flush_outstanding {
                    c.owed_act |= owed_act::FLUSH;
                }
                if c.ring.as_ref().is_some_and(|r| r.len() == 0) {
                    let ring = c.ring.take().expect("checked above");
                    self.pool.give(ring);
                }
                // A stage goes back once drained, or once the guest wants no more.
                if c.stage.is_some() && (c.staged() == 0 || !c.to_guest_open()) {
                    let ring = c.stage.take().expect("checked above");
                    self.pool.give(ring);
                }
                // A broken socket gets no end of file: the host must not take a stream that
                // lost bytes for a whole one.
                if c.guest_shut & SHUTDOWN_SEND != 0
                    && pending == 0
                    && !c.host_wr_shut
                    && !c.host_broken
                {
                    c.host_wr_shut = true;
                    c.owed_act |= owed_act::SHUT_WR;
                }
                if c.guest_shut & SHUTDOWN_RCV != 0 && !c.host_rd_shut {
                    c.host_rd_shut = true;
                    c.owed_act |= owed_act::SHUT_RD;
                }
                if c.rx_msg.is_some_and(|size| size > c.peer_buf_alloc) {
                    // A message the guest's whole buffer cannot hold is never read: a Linux
                    // receiver resets on overflow, and so does the relay, telling both ends.
                    debug!(conn = %ConnId::new(idx as u32, c.generation), size = c.rx_msg, buf_alloc = c.peer_buf_alloc, "host message larger than the guest's buffer");
                    self.stats.seqpacket_oversize_from_host += 1;
                    self.reset_conn(idx);
                    return;
                }
                if c.host_broken && !c.to_guest_open() {
                    // Neither direction can carry anything more.
                    self.reset_conn(idx);
                    return;
                }
                let to_host_done = c.host_wr_shut && pending == 0;
                let to_guest_done =
                    (c.host_eof && c.shutdown_sent) || c.guest_shut & SHUTDOWN_RCV != 0;
                if to_host_done && to_guest_done {
                    debug!(conn = %ConnId::new(idx as u32, c.generation), "both directions finished");
                    self.reset_conn(idx);
                    return;
                }
                // Tell the guest about freed buffer space before it would stall.
                let freed = c.fwd_cnt.wrapping_sub(c.last_fwd_sent);
                let seen_free = buffer_size.saturating_sub(c.rx_cnt.wrapping_sub(c.last_fwd_sent));
                if c.guest_shut & SHUTDOWN_SEND == 0
                    && freed > 0
                    && (freed >= threshold || seen_free < threshold)
                {
                    c.owed_rx |= owed_rx::CREDIT_UPDATE;
                }
                if c.guest_shut == SHUTDOWN_BOTH && c.deadline.is_none() {
                    self.set_deadline(idx, close_deadline);
                }
            }
        }
        let c = &mut self.conns[idx];
        if c.socket_open && c.wanted_interest() != c.interest {
            c.owed_act |= owed_act::INTEREST;
        }
        let generation = c.generation;
        if c.owed_act != 0 && !c.in_act_queue {
            c.in_act_queue = true;
            Self::enqueue(
                &mut self.act_queue,
                &self.conns,
                idx as u32,
                generation,
                |c| c.in_act_queue,
            );
        }
        let c = &self.conns[idx];
        if !c.in_rx_queue
            && !matches!(
                c.next_rx(usize::MAX, self.config.max_packet_payload),
                Next::Nothing
            )
        {
            self.conns[idx].in_rx_queue = true;
            Self::enqueue(
                &mut self.rx_queue,
                &self.conns,
                idx as u32,
                generation,
                |c| c.in_rx_queue,
            );
        }
    }
}
