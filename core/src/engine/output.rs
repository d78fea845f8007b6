//! Outputs: socket actions, packets for the guest, the next deadline, and what delivery changes.

use super::*;

impl Engine {
    /// The next socket action, if any. Drain after every input.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        // A poll with no connection to look at changes nothing, and is not worth a record.
        let looked = !self.act_queue.is_empty();
        let action = self.next_action();
        if looked {
            self.sink.action(&self.conns, self.now, action);
        }
        action
    }

    pub(super) fn next_action(&mut self) -> Option<Action> {
        let mut budget = self.act_queue.len();
        while budget > 0 {
            budget -= 1;
            let &(index, generation) = self.act_queue.front()?;
            let idx = index as usize;
            let live = matches!(self.conns.get(idx), Some(c) if c.generation == generation && c.in_act_queue);
            if !live {
                self.act_queue.pop_front();
                continue;
            }
            let conn = ConnId::new(index, generation);
            let c = &mut self.conns[idx];
            if c.owed_act & owed_act::CLOSE != 0 {
                c.owed_act = 0;
                c.socket_open = false;
                c.in_act_queue = false;
                self.act_queue.pop_front();
                self.free_if_done(idx);
                debug!(%conn, "close socket");
                return Some(Action::Close { conn });
            }
            let bit = c.owed_act & c.owed_act.wrapping_neg();
            c.owed_act &= !bit;
            self.act_queue.pop_front();
            if c.owed_act != 0 {
                self.act_queue.push_back((index, generation));
            } else {
                c.in_act_queue = false;
            }
            let action = match bit {
                owed_act::CONNECT => Some(Action::Connect {
                    conn,
                    cid: u64::from(c.key.peer_cid),
                    port: c.key.host_port,
                    socket_type: c.key.socket_type,
                }),
                owed_act::READ_LINE => {
                    let reading = matches!(c.phase, Phase::ConnectLine | Phase::SiblingReply);
                    (reading && c.readable).then(|| Action::ReadConnectLine {
                        conn,
                        max: c.line.room(),
                    })
                }
                owed_act::SHUT_RD => Some(Action::Shutdown {
                    conn,
                    direction: Direction::Read,
                }),
                owed_act::FLUSH => (c.writable && c.host_pending() > 0).then(|| {
                    c.flush_outstanding = true;
                    Action::Flush { conn }
                }),
                owed_act::SHUT_WR => Some(Action::Shutdown {
                    conn,
                    direction: Direction::Write,
                }),
                owed_act::INTEREST => {
                    let want = c.wanted_interest();
                    (want != c.interest).then(|| {
                        c.interest = want;
                        Action::Interest {
                            conn,
                            interest: want,
                        }
                    })
                }
                _ => unreachable!("unknown action bit {bit:#x}"),
            };
            if action.is_some() {
                trace!(?action, "action");
                return action;
            }
            budget += 1;
        }
        None
    }

    /// The next packet for the guest, given an rx buffer with `room` bytes after the header.
    ///
    /// Nothing changes until the returned grant is completed: dropping it gives the same grant
    /// on the next call.
    #[must_use]
    pub fn poll_rx(&mut self, now: Instant, room: usize) -> Option<RxGrant<'_>> {
        // A poll that finds no connection to look at and no time passed changes nothing.
        let looked = now > self.now || !self.resets.is_empty() || !self.rx_queue.is_empty();
        let decision = self.next_rx_grant(now, room);
        if looked {
            let grant = match decision {
                None => Grant::Nothing,
                Some(RxDecision::Orphan(_) | RxDecision::Packet { .. }) => Grant::Packet,
                Some(RxDecision::Read { conn, .. }) => Grant::Read(conn),
                Some(RxDecision::Probe { conn, .. }) => Grant::Probe(conn),
                Some(RxDecision::Message { conn, .. }) => Grant::Message(conn),
            };
            self.sink.poll_rx(&self.conns, now, room, grant);
        }
        Some(match decision? {
            RxDecision::Orphan(header) => RxGrant::Packet(RxPacket {
                engine: self,
                source: Source::Orphan,
                header,
                held: 0,
            }),
            RxDecision::Packet { idx, header, held } => RxGrant::Packet(RxPacket {
                engine: self,
                source: Source::Conn(idx),
                header,
                held,
            }),
            RxDecision::Read { idx, conn, max } => RxGrant::Read(RxRead {
                engine: self,
                idx,
                conn,
                max,
            }),
            RxDecision::Probe { idx, conn } => RxGrant::Probe(RxProbe {
                engine: self,
                idx,
                conn,
            }),
            RxDecision::Message { idx, conn, len } => {
                let max_part = self.config.max_packet_payload as usize;
                RxGrant::Message(RxMessage {
                    engine: self,
                    idx,
                    conn,
                    len,
                    max_part,
                    staged: 0,
                })
            }
        })
    }

    pub(super) fn next_rx_grant(&mut self, now: Instant, room: usize) -> Option<RxDecision> {
        self.advance(now);
        if let Some(r) = self.resets.front() {
            let header = Packet {
                src_cid: u64::from(r.peer_cid),
                dst_cid: self.config.guest_cid,
                src_port: r.host_port,
                dst_port: r.guest_port,
                len: 0,
                socket_type: SocketType::Stream,
                op: Op::Rst,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            }
            .to_header();
            let mut header = header;
            header.type_ = r.raw_type.into();
            return Some(RxDecision::Orphan(header));
        }
        let mut budget = self.rx_queue.len();
        while budget > 0 {
            budget -= 1;
            let &(index, generation) = self.rx_queue.front()?;
            let idx = index as usize;
            let live = matches!(self.conns.get(idx), Some(c) if c.generation == generation && c.in_rx_queue);
            if !live {
                self.rx_queue.pop_front();
                continue;
            }
            match self.conns[idx].next_rx(room, self.config.max_packet_payload) {
                Next::Packet { op, flags, held } => {
                    let header = self.header(idx, op, flags, held as u32);
                    return Some(RxDecision::Packet { idx, header, held });
                }
                Next::Read(max) => {
                    let conn = ConnId::new(index, generation);
                    return Some(RxDecision::Read { idx, conn, max });
                }
                Next::Probe => {
                    let conn = ConnId::new(index, generation);
                    return Some(RxDecision::Probe { idx, conn });
                }
                Next::Message(len) => {
                    let conn = ConnId::new(index, generation);
                    return Some(RxDecision::Message { idx, conn, len });
                }
                Next::Blocked => {
                    self.rx_queue.rotate_left(1);
                }
                Next::Nothing => {
                    self.rx_queue.pop_front();
                    self.conns[idx].in_rx_queue = false;
                }
            }
        }
        None
    }

    /// The earliest deadline, if any: call [`handle_timeout`](Self::handle_timeout) then.
    #[must_use]
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&Reverse((at, index, generation))) = self.timers.peek() {
            match self.conns.get(index as usize) {
                Some(c) if c.generation == generation && c.deadline == Some(at) => return Some(at),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    pub(super) fn header(&self, idx: usize, op: Op, flags: u32, len: u32) -> Header {
        let c = &self.conns[idx];
        Packet {
            src_cid: u64::from(c.key.peer_cid),
            dst_cid: self.config.guest_cid,
            src_port: c.key.host_port,
            dst_port: c.key.guest_port,
            len,
            socket_type: c.key.socket_type,
            op,
            flags,
            buf_alloc: self.config.buffer_size,
            fwd_cnt: c.fwd_cnt,
        }
        .to_header()
    }

    /// Records that `header` reached the guest on connection `idx`.
    pub(super) fn delivered(&mut self, idx: usize, header: &Header) {
        let c = &mut self.conns[idx];
        let len = header.len.get();
        c.last_fwd_sent = c.fwd_cnt;
        c.owed_rx &= !owed_rx::CREDIT_UPDATE;
        c.stats.host_packets += 1;
        c.stats.host_bytes += u64::from(len);
        c.tx_cnt = c.tx_cnt.wrapping_add(len);
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += u64::from(len);
        match Op::from_u16(header.op.get()) {
            Some(Op::Rst) => {
                c.owed_rx = 0;
                self.stats.rst_sent += 1;
                c.phase = Phase::Closed;
                c.deadline = None;
                self.unbind_key(idx);
                self.free_if_done(idx);
                return;
            }
            Some(Op::Response) => c.owed_rx &= !owed_rx::RESPONSE,
            Some(Op::Request) => c.owed_rx &= !owed_rx::REQUEST,
            Some(Op::Shutdown) => {
                let flags = header.flags.get();
                if flags & SHUTDOWN_SEND != 0 {
                    c.shutdown_sent = true;
                }
                if flags & SHUTDOWN_RCV != 0 {
                    c.owed_rx &= !owed_rx::SHUTDOWN_RCV;
                }
            }
            Some(Op::CreditUpdate) => self.stats.credit_updates_sent += 1,
            Some(Op::CreditRequest) => {
                c.credit_requested = true;
                self.stats.credit_requests_sent += 1;
            }
            _ => {}
        }
        self.reconcile(idx);
    }
}

/// What `poll_rx` decided, before it borrows the engine for the grant.
pub(super) enum RxDecision {
    Orphan(Header),
    Packet {
        idx: usize,
        header: Header,
        held: usize,
    },
    Read {
        idx: usize,
        conn: ConnId,
        max: usize,
    },
    Probe {
        idx: usize,
        conn: ConnId,
    },
    Message {
        idx: usize,
        conn: ConnId,
        len: usize,
    },
}
