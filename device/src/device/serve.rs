//! The one synchronous "serve the queues" section: tx chains to sockets, socket bytes and
//! owed packets into rx chains, the transport reset on the event queue, and the engine's
//! socket actions in between.

use super::*;

impl VsockDevice {
    /// Serves the queues: the one synchronous section every runtime runs when woken (by a
    /// queue kick, socket readiness or a timer, after feeding the engine).
    ///
    /// It fires the engine's due deadlines, takes the guest's tx packets (writing payload
    /// straight to sockets), performs the
    /// engine's socket actions, fills rx buffers (reading sockets straight into them), sends an
    /// owed transport reset, and reports which queues need an interrupt: one per queue per
    /// call, after all its used entries, as virtio-queue's notification rules prescribe
    /// (disable, drain, re-enable, re-check).
    ///
    /// # Errors
    ///
    /// [`DeviceError::NotActivated`] before activation (after closing the sockets a reset
    /// left owed); [`DeviceError::Queue`] if a queue's rings are unreachable or its available
    /// index runs more than a queue ahead. Malformed chains are never errors: each is
    /// returned to the guest and counted.
    pub fn serve<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queues: Queues<'_>,
        host: &mut H,
    ) -> Result<Served, DeviceError> {
        self.fire_deadlines(now);
        if !self.activated {
            // A reset (or a restore of an inactive device) leaves the engine owing the
            // sockets of the forgotten connections their close: carry that out, so host
            // applications see their connection end without waiting for a re-activation.
            self.drain_actions(now, host);
            return Err(DeviceError::NotActivated);
        }
        let mut served = Served::default();
        let Queues { rx, tx, event } = queues;

        if self.event_owed {
            served.notify_event = self.send_transport_reset(mem, event)?;
        }

        let (tx_used, tx_more) = self.process_tx(now, mem, tx, host)?;
        let mut rx_used = false;
        // One budget for the whole call: rx work is bounded however the rounds go.
        let mut rx_budget = CHAIN_BUDGET;
        let rx_more = loop {
            let acted = self.drain_actions(now, host);
            let (used, more) = self.process_rx(now, mem, rx, host, &mut rx_budget)?;
            rx_used |= used;
            // Delivering packets may owe actions (a delivered RST closes a socket) and
            // actions may make packets (a flush frees credit): go round until both are quiet.
            if more || (!acted && !used) {
                break more;
            }
        };
        if tx_used && tx.needs_notification(mem)? {
            served.notify_tx = true;
        }
        if rx_used && rx.needs_notification(mem)? {
            served.notify_rx = true;
        }
        served.more = tx_more || rx_more;
        self.stats.notifications += u64::from(served.notify_rx)
            + u64::from(served.notify_tx)
            + u64::from(served.notify_event);
        Ok(served)
    }

    /// The work that needs no guest: fires the engine's due deadlines and carries out the
    /// socket actions the engine owes (closing a host client whose `CONNECT` line or guest
    /// answer timed out, flushing, closing). For when there are no queues to
    /// [`serve`](Self::serve) (no VM attached yet, a VM booting, the gap between two VMs):
    /// afterwards the engine's next deadline lies in the future, never in the past, so a loop
    /// that sleeps until it cannot spin. `serve` does this itself.
    pub fn serve_host<H: HostSockets>(&mut self, now: Instant, host: &mut H) {
        self.fire_deadlines(now);
        self.drain_actions(now, host);
    }

    fn fire_deadlines(&mut self, now: Instant) {
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
    }

    /// Carries out the socket actions the engine owes, without the queues: after a
    /// [`reset`](Self::reset), this closes the dropped connections' sockets at once, even when
    /// the queues are gone with the frontend that owned them. Returns whether there were any.
    pub fn perform_actions<H: HostSockets>(&mut self, now: Instant, host: &mut H) -> bool {
        self.drain_actions(now, host)
    }

    fn drain_actions<H: HostSockets>(&mut self, now: Instant, host: &mut H) -> bool {
        let mut acted = false;
        while let Some(action) = self.engine.poll_action() {
            acted = true;
            match action {
                Action::Flush { conn } => self.flush(now, conn, host),
                other => host.perform(now, &mut self.engine, other),
            }
        }
        acted
    }

    /// Writes what the engine holds for `conn`'s socket (the rest of the `OK` line, or guest
    /// bytes the socket refused before): the device owns every write to a socket, this one and
    /// the direct write of a tx payload from guest memory.
    fn flush<H: HostSockets>(&mut self, now: Instant, conn: ConnId, host: &H) {
        let Ok(bufs) = self.engine.host_bytes(conn) else {
            return;
        };
        let result = match host.fd(conn) {
            Some(fd) => crate::memory::send_host_bytes(fd, bufs),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        };
        let _ = self
            .engine
            .handle_host_write(now, conn, Io::from_result(&result));
    }

    /// Sends the owed TRANSPORT_RESET in the first usable event buffer (unusable ones are
    /// returned empty on the way). Returns whether the guest must be notified.
    fn send_transport_reset<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut stalled = false;
        for _ in 0..CHAIN_BUDGET {
            if !self.event_owed {
                break;
            }
            if let Some(chain) = queue.pop_descriptor_chain(mem) {
                stalled = false;
                used |= self.event_chain(mem, queue, chain)?;
                continue;
            }
            // No buffer yet: stays owed until the driver posts one.
            if !queue.enable_notification(mem)? {
                break;
            }
            check_stall(queue, mem, false, &mut stalled)?;
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Fills one event chain with the TRANSPORT_RESET. Returns whether it was returned to the
    /// used ring.
    fn event_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        chain: DescriptorChain<&M>,
    ) -> Result<bool, DeviceError> {
        let head = chain.head_index();
        let event = Event {
            id: EVENT_TRANSPORT_RESET.into(),
        };
        let len = match self.flatten(chain, true) {
            Ok(total) if total >= 4 => {
                let span = Span::new(&self.segs, 0, total);
                match span.write(mem, 0, event.as_bytes()) {
                    Ok(()) => {
                        self.event_owed = false;
                        self.stats.event_chains += 1;
                        debug!("sent TRANSPORT_RESET");
                        4
                    }
                    Err(MemoryFault) => {
                        self.stats.event_bad_chain += 1;
                        0
                    }
                }
            }
            _ => {
                self.stats.event_bad_chain += 1;
                0
            }
        };
        // A head out of range names no descriptor: nothing to return.
        if head >= queue.size() {
            return Ok(false);
        }
        queue.add_used(mem, head, len)?;
        Ok(true)
    }

    /// Flattens a chain's descriptors into `self.segs` (see [`flatten_into`]).
    fn flatten<M>(&mut self, chain: DescriptorChain<M>, writable: bool) -> Result<usize, bool>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        flatten_into(&mut self.segs, chain, writable)
    }

    /// Takes tx chains. Returns (any used, budget exhausted).
    fn process_tx<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queue: &mut Queue,
        host: &mut H,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let mut budget = CHAIN_BUDGET;
        let mut stalled = false;
        loop {
            queue.disable_notification(mem)?;
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                self.tx_chain(now, mem, chain, host);
                self.stats.tx_chains += 1;
                // Every tx chain goes back, malformed or not; a head out of range (counted as
                // unreadable by `tx_chain`) names no descriptor, so there is nothing to return.
                if head < queue.size() {
                    queue.add_used(mem, head, 0)?;
                    used = true;
                }
                budget -= 1;
                if budget == 0 {
                    return Ok((used, true));
                }
            }
            if !queue.enable_notification(mem)? {
                return Ok((used, false));
            }
            check_stall(queue, mem, popped, &mut stalled)?;
        }
    }

    fn tx_chain<M, H>(&mut self, now: Instant, mem: &M, chain: DescriptorChain<&M>, host: &mut H)
    where
        M: GuestMemory,
        H: HostSockets,
    {
        let total = match self.flatten(chain, false) {
            Ok(total) => total,
            Err(true) => {
                self.stats.tx_write_only += 1;
                return;
            }
            Err(false) => {
                self.stats.tx_bad_memory += 1;
                return;
            }
        };
        if total < HEADER_LEN {
            self.stats.tx_too_short += 1;
            return;
        }
        let all = Span::new(&self.segs, 0, total);
        let mut raw = [0u8; HEADER_LEN];
        if all.read(mem, 0, &mut raw).is_err() {
            self.stats.tx_bad_memory += 1;
            return;
        }
        let header = Header::read_from(&raw).expect("HEADER_LEN bytes make a header");
        let len = header.len.get() as usize;
        let available = total - HEADER_LEN;
        trace!(?header, total, "tx chain");
        match self.engine.handle_tx(now, &header) {
            Tx::Done => {}
            Tx::Data(data) if len > available => {
                // The header claims bytes the chain does not have: they cannot be delivered,
                // so the connection must not go on as if they were.
                self.stats.tx_len_beyond_chain += 1;
                let _ = data.complete(Io::Done(0), &mut Unreadable);
            }
            Tx::Data(data) if !Span::new(&self.segs, HEADER_LEN, len).in_memory(mem) => {
                // The payload lies (partly) outside guest memory: it cannot be delivered
                // either. Checked up front, so no byte of it reaches the socket.
                self.stats.tx_bad_memory += 1;
                let _ = data.complete(Io::Done(0), &mut Unreadable);
            }
            Tx::Data(data) => {
                let payload = Span::new(&self.segs, HEADER_LEN, len);
                let written = if data.direct() {
                    match host.fd(data.conn()) {
                        Some(fd) => match if data.is_message() {
                            payload.send_message(mem, fd)
                        } else {
                            payload.write_to_fd(mem, len, fd)
                        } {
                            Ok(r) => Io::from_result(&r),
                            Err(MemoryFault) => Io::Done(0),
                        },
                        None => Io::Error(SocketError(libc::EBADF)),
                    }
                } else {
                    Io::Done(0)
                };
                let mut bytes = PayloadBytes { mem, span: payload };
                if data.complete(written, &mut bytes).is_err() {
                    // A write that claims more than was offered: the engine reset it.
                    debug!("socket reported more bytes than offered");
                }
            }
        }
    }

    /// Fills rx chains, at most `budget` of them. Returns (any used, budget exhausted with
    /// packets still waiting).
    fn process_rx<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queue: &mut Queue,
        host: &mut H,
        budget: &mut usize,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let mut stalled = false;
        loop {
            queue.disable_notification(mem)?;
            let mut popped = false;
            while self.engine.has_pending_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let mut taken = 1;
                match self.rx_chain(now, mem, chain, queue, host)? {
                    // A head out of range (counted as unreadable by `rx_chain`) names no
                    // descriptor: nothing to return.
                    RxFill::Used(_) if head >= queue.size() => {}
                    RxFill::Used(len) => {
                        queue.add_used(mem, head, len)?;
                        self.stats.rx_chains += 1;
                        used = true;
                    }
                    RxFill::Message { chains } => {
                        self.stats.rx_chains += chains as u64;
                        used = true;
                        taken = chains;
                    }
                    RxFill::Nothing => {
                        // Nothing to send after all: give the buffer back unused.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        return Ok((used, false));
                    }
                    RxFill::Yield => {
                        // Work that filled no buffer went on too long: give the buffer back
                        // and come back soon, after the other queues had their turn.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        return Ok((used, true));
                    }
                    RxFill::Wait { popped } => {
                        // A message needs more buffers than are posted. Ask to be kicked once
                        // the guest posts beyond those at hand, then give them all back.
                        self.stats.rx_message_waits += 1;
                        let more = queue.enable_notification(mem)?;
                        queue.set_next_avail(queue.next_avail().wrapping_sub(popped as u16));
                        if !more {
                            return Ok((used, false));
                        }
                        // The guest posted meanwhile: try again, within the budget.
                        queue.disable_notification(mem)?;
                        taken = popped;
                    }
                }
                *budget = budget.saturating_sub(taken);
                if *budget == 0 {
                    return Ok((used, self.engine.has_pending_rx()));
                }
            }
            if !self.engine.has_pending_rx() {
                return Ok((used, false));
            }
            // Out of buffers with packets waiting: ask to be kicked when the guest posts more,
            // unless it already did.
            if !queue.enable_notification(mem)? {
                return Ok((used, false));
            }
            check_stall(queue, mem, popped, &mut stalled)?;
        }
    }

    /// The payload room of the rx chain flattened into `self.segs` (see [`rx_room_of`]).
    fn rx_room<M: GuestMemory>(
        &mut self,
        mem: &M,
        flattened: Result<usize, bool>,
    ) -> Option<usize> {
        rx_room_of(&self.segs, &mut self.stats, mem, flattened)
    }

    /// Fills one rx chain (and, for a host message that takes several, the chains after it).
    fn rx_chain<M, H>(
        &mut self,
        now: Instant,
        mem: &M,
        chain: DescriptorChain<&M>,
        queue: &mut Queue,
        host: &mut H,
    ) -> Result<RxFill, DeviceError>
    where
        M: GuestMemory,
        H: HostSockets,
    {
        let head = chain.head_index();
        let flattened = self.flatten(chain, true);
        let Some(room) = self.rx_room(mem, flattened) else {
            return Ok(RxFill::Used(0));
        };
        let total = HEADER_LEN + room;
        // Peeks and reads that found nothing for this buffer (empty messages, a socket that
        // drained): bounded, so a peer flooding empty messages cannot hold the serve call.
        let mut idle = 0;
        loop {
            idle += 1;
            if idle > IDLE_GRANTS {
                return Ok(RxFill::Yield);
            }
            let Some(grant) = self.engine.poll_rx(now, room) else {
                if room == 0 && self.engine.has_pending_rx() {
                    // Only data is waiting and this buffer has no room for any: it can never
                    // be filled, and putting it back would stop the ring behind it.
                    self.stats.rx_too_short += 1;
                    return Ok(RxFill::Used(0));
                }
                return Ok(RxFill::Nothing);
            };
            let all = Span::new(&self.segs, 0, total);
            match grant {
                RxGrant::Packet(packet) => {
                    let payload_len = packet.payload().len();
                    // The whole chain was checked above, so these writes stay in guest memory.
                    if all.write(mem, HEADER_LEN, packet.payload()).is_err()
                        || all.write(mem, 0, packet.header().as_bytes()).is_err()
                    {
                        self.stats.rx_bad_memory += 1;
                        return Ok(RxFill::Used(0));
                    }
                    let _ = packet.send();
                    return Ok(RxFill::Used((HEADER_LEN + payload_len) as u32));
                }
                RxGrant::Read(read) => {
                    let conn = read.conn();
                    let data = Span::new(&self.segs, HEADER_LEN, room);
                    let io = match host.fd(read.conn()) {
                        Some(fd) => match data.read_from_fd(mem, read.max(), fd) {
                            Ok(r) => Io::from_result(&r),
                            Err(MemoryFault) => {
                                self.stats.rx_bad_memory += 1;
                                return Ok(RxFill::Used(0));
                            }
                        },
                        None => Io::Error(SocketError(libc::EBADF)),
                    };
                    if io == Io::Done(0)
                        && !read.peer_gone()
                        && host.fd(conn).is_some_and(crate::memory::hung_up)
                    {
                        // End of file with the peer hung up, whose event may not have come
                        // yet: the guest must hear that its sends will fail before it hears
                        // the end (a Linux peer's close says both at once). Nothing was read,
                        // so the grant is dropped, and the read comes again after.
                        drop(read);
                        let _ =
                            self.engine
                                .handle_host_event(now, conn, vsock_core::HostEvent::HangUp);
                        continue;
                    }
                    // The recorder, if any, reads the bytes back from the buffer.
                    let mut bytes = PayloadBytes { mem, span: data };
                    match read.complete(io, &mut bytes) {
                        Ok(Some(header)) => {
                            // Publish the header only now that the data is in.
                            if all.write(mem, 0, header.as_bytes()).is_err() {
                                // The bytes left the socket but never reached the guest:
                                // the stream cannot go on as if they had.
                                self.stats.rx_bad_memory += 1;
                                let _ = self.engine.reset_connection(now, conn);
                                return Ok(RxFill::Used(0));
                            }
                            return Ok(RxFill::Used(
                                (HEADER_LEN + header.len.get() as usize) as u32,
                            ));
                        }
                        // Would block, or failed (the connection is reset): try the next one.
                        Ok(None) | Err(_) => continue,
                    }
                }
                RxGrant::Probe(probe) => {
                    let result = match host.fd(probe.conn()) {
                        Some(fd) => crate::memory::probe_message(fd),
                        None => vsock_core::Probe::Error(SocketError(libc::EBADF)),
                    };
                    if let Some(header) = probe.complete(result) {
                        // End of file: a SHUTDOWN in this buffer.
                        if all.write(mem, 0, header.as_bytes()).is_err() {
                            self.stats.rx_bad_memory += 1;
                            return Ok(RxFill::Used(0));
                        }
                        return Ok(RxFill::Used(HEADER_LEN as u32));
                    }
                    // The size is known now, or there is nothing: poll again.
                }
                RxGrant::Message(message) => {
                    let conn = message.conn();
                    let mut scratch = MsgScratch {
                        segs: &mut self.segs,
                        msg_segs: &mut self.msg_segs,
                        chains: &mut self.msg_chains,
                        rooms: &mut self.msg_rooms,
                        stats: &mut self.stats,
                    };
                    let outcome = scratch.read(mem, queue, host, head, room, message)?;
                    // The other chains were flattened over this one's segments: the first
                    // chain's are the first in the message's list.
                    let own = self.msg_chains[0].segs;
                    self.segs.clear();
                    self.segs.extend_from_slice(&self.msg_segs[own.0..own.1]);
                    match outcome {
                        MsgOutcome::Filled { chains, lost } => {
                            if lost {
                                // Part of the message never reached the guest: the connection
                                // cannot go on as if it had.
                                let _ = self.engine.reset_connection(now, conn);
                            }
                            return Ok(RxFill::Message { chains });
                        }
                        MsgOutcome::Wait(popped) => return Ok(RxFill::Wait { popped }),
                        MsgOutcome::Unplaceable => {
                            let _ = self.engine.reset_connection(now, conn);
                        }
                        // Would block, or failed (the connection is reset): try the next one.
                        MsgOutcome::Retry => {}
                    }
                }
            }
        }
    }
}

/// How many grants that fill nothing (a probe that found an empty message, a read that would
/// block) one rx buffer goes through before the serve call yields.
const IDLE_GRANTS: usize = 64;

/// What filling one rx chain came to.
enum RxFill {
    /// The chain holds this many bytes: return it to the used ring.
    Used(u32),
    /// Nothing to send after all: give the chain back.
    Nothing,
    /// Too many grants filled nothing: give the chain back and serve again soon.
    Yield,
    /// A host message filled this chain and the ones after it, `chains` in all, every one
    /// already returned to the used ring, in order.
    Message { chains: usize },
    /// A host message needs more chains than are posted: the `popped` chains taken for it,
    /// this one included, are still out, to be given back.
    Wait { popped: usize },
}

/// What reading a host message into rx chains came to.
enum MsgOutcome {
    /// The message is in this many chains, all returned to the used ring; `lost` if a header
    /// could not be written (the connection must be reset).
    Filled { chains: usize, lost: bool },
    /// Not enough chains are posted; this many were popped and are still out.
    Wait(usize),
    /// No posted ring can ever hold the message: the extra chains were given back, and the
    /// connection must be reset.
    Unplaceable,
    /// The read found nothing, or failed (the engine reset the connection): the extra chains
    /// were given back; poll again with the first.
    Retry,
}

/// The device's scratch space for one host message, borrowed beside the engine's grant.
struct MsgScratch<'d> {
    segs: &'d mut Vec<Seg>,
    msg_segs: &'d mut Vec<Seg>,
    chains: &'d mut Vec<MsgChain>,
    rooms: &'d mut Vec<usize>,
    stats: &'d mut DeviceStats,
}

impl MsgScratch<'_> {
    /// Takes rx chains after the first (`head`, with payload room `room`, flattened in
    /// `segs`) until their room covers the message, reads it with one `recvmsg` scattered
    /// over them, writes each chain's header and returns them all to the used ring, in order.
    fn read<M: GuestMemory, H: HostSockets>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        host: &mut H,
        head: u16,
        room: usize,
        mut message: vsock_core::RxMessage<'_>,
    ) -> Result<MsgOutcome, DeviceError> {
        self.msg_segs.clear();
        self.chains.clear();
        self.rooms.clear();
        self.msg_segs.extend_from_slice(self.segs);
        self.chains.push(MsgChain {
            head,
            segs: (0, self.segs.len()),
            room,
        });
        self.rooms.push(room);
        let cap = crate::memory::MAX_MSG_IOV;
        let give_back = |queue: &mut Queue, n: usize| {
            queue.set_next_avail(queue.next_avail().wrapping_sub(n as u16));
        };
        let (len, max_part) = (message.len(), message.max_part());
        // The part of the message the engine takes into its stage when the buffers at hand
        // cannot hold it all: a Linux guest posts more only once fewer than half its ring is
        // left, so waiting for a whole message's worth could wait for ever.
        let mut staged = 0;
        while message.buffers_for(self.rooms.iter().copied()).is_none() {
            let extra = self.chains.len() - 1;
            let covered: usize = self.rooms.iter().map(|&r| r.min(max_part)).sum();
            let exhausted =
                self.chains.len() >= usize::from(queue.size()) || self.chains.len() >= cap;
            let chain = if exhausted {
                None
            } else {
                queue.pop_descriptor_chain(mem)
            };
            let Some(chain) = chain else {
                if message.stage(len - covered).is_some() {
                    staged = len - covered;
                    break;
                }
                if exhausted {
                    // Every buffer the ring can hold is taken, the message does not fit, and
                    // the rest is more than the stage takes.
                    self.stats.rx_message_unplaceable += 1;
                    give_back(queue, extra);
                    return Ok(MsgOutcome::Unplaceable);
                }
                return Ok(MsgOutcome::Wait(self.chains.len()));
            };
            let head = chain.head_index();
            let flattened = flatten_into(self.segs, chain, true);
            let room = match rx_room_of(self.segs, self.stats, mem, flattened) {
                Some(room) if room > 0 && head < queue.size() => room,
                Some(_) => {
                    self.stats.rx_too_short += 1;
                    0
                }
                None => 0,
            };
            let start = self.msg_segs.len();
            if room > 0 {
                if start + self.segs.len() > cap {
                    self.stats.rx_message_unplaceable += 1;
                    give_back(queue, extra + 1);
                    return Ok(MsgOutcome::Unplaceable);
                }
                self.msg_segs.extend_from_slice(self.segs);
                self.rooms.push(room);
            }
            self.chains.push(MsgChain {
                head,
                segs: (start, self.msg_segs.len()),
                room,
            });
        }
        let parts = Parts {
            chains: self.chains,
            left: len - staged,
            max_part,
        };
        let conn = message.conn();
        let io = match host.fd(conn) {
            Some(fd) => {
                let spans = parts.iter().map(|(c, part)| {
                    Span::new(&self.msg_segs[c.segs.0..c.segs.1], HEADER_LEN, part)
                });
                let tail = if staged > 0 {
                    message.stage(staged)
                } else {
                    None
                };
                if staged > 0 {
                    self.stats.rx_message_staged += 1;
                }
                match crate::memory::read_message_from_fd(mem, spans, tail, fd) {
                    Ok(r) => Io::from_result(&r),
                    Err(MemoryFault) => {
                        // More pieces than one read takes, or memory that went away.
                        self.stats.rx_message_unplaceable += 1;
                        give_back(queue, self.chains.len() - 1);
                        return Ok(MsgOutcome::Unplaceable);
                    }
                }
            }
            None => Io::Error(SocketError(libc::EBADF)),
        };
        let mut bytes = MessageBytes {
            mem,
            segs: self.msg_segs,
            parts,
        };
        let headers = match message.complete(io, self.rooms, &mut bytes) {
            Ok(Some(headers)) => headers,
            Ok(None) | Err(_) => {
                give_back(queue, self.chains.len() - 1);
                return Ok(MsgOutcome::Retry);
            }
        };
        // Each chain's header goes in last, once its data is in; then every chain taken goes
        // to the used ring in the order popped, the unusable ones empty.
        let mut headers = headers;
        let mut lost = false;
        for (chain, part) in parts.iter_all() {
            let len = match part {
                Some(part) => {
                    let header = headers.next().expect("one header per part");
                    let span = Span::new(
                        &self.msg_segs[chain.segs.0..chain.segs.1],
                        0,
                        HEADER_LEN + part,
                    );
                    if span.write(mem, 0, header.as_bytes()).is_err() {
                        self.stats.rx_bad_memory += 1;
                        lost = true;
                        0
                    } else {
                        (HEADER_LEN + part) as u32
                    }
                }
                None => 0,
            };
            // A head out of range names no descriptor: nothing to return.
            if chain.head < queue.size() {
                queue.add_used(mem, chain.head, len)?;
            }
        }
        Ok(MsgOutcome::Filled {
            chains: self.chains.len(),
            lost,
        })
    }
}

/// How a message of `left` bytes falls over message chains: each usable chain takes up to
/// its room (and `max_part`), in order.
#[derive(Clone, Copy)]
struct Parts<'c> {
    chains: &'c [MsgChain],
    left: usize,
    max_part: usize,
}

impl<'c> Parts<'c> {
    /// Every chain with the part of the message it holds (`None` for an unusable chain).
    fn iter_all(self) -> impl Iterator<Item = (&'c MsgChain, Option<usize>)> {
        let mut left = self.left;
        let max_part = self.max_part;
        self.chains.iter().map(move |c| {
            if c.room == 0 || left == 0 {
                return (c, None);
            }
            let part = c.room.min(max_part).min(left);
            left -= part;
            (c, Some(part))
        })
    }

    /// The usable chains with their parts.
    fn iter(self) -> impl Iterator<Item = (&'c MsgChain, usize)> {
        self.iter_all().filter_map(|(c, part)| part.map(|p| (c, p)))
    }
}

/// A message's payload across its chains, for the engine's recorder.
struct MessageBytes<'a, M> {
    mem: &'a M,
    segs: &'a [Seg],
    parts: Parts<'a>,
}

impl<M: GuestMemory> GuestBytes for MessageBytes<'_, M> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        let (mut offset, mut done) = (offset, 0);
        for (chain, part) in self.parts.iter() {
            if done == dst.len() {
                break;
            }
            if offset >= part {
                offset -= part;
                continue;
            }
            let n = (part - offset).min(dst.len() - done);
            let span = Span::new(&self.segs[chain.segs.0..chain.segs.1], HEADER_LEN, part);
            span.read(self.mem, offset, &mut dst[done..done + n])?;
            done += n;
            offset = 0;
        }
        if done == dst.len() {
            Ok(())
        } else {
            Err(MemoryFault)
        }
    }
}

/// The payload room of an rx chain flattened into `segs`, checked to lie in guest memory;
/// `None` (counted) if the chain is unusable.
fn rx_room_of<M: GuestMemory>(
    segs: &[Seg],
    stats: &mut DeviceStats,
    mem: &M,
    flattened: Result<usize, bool>,
) -> Option<usize> {
    let total = match flattened {
        Ok(total) => total,
        Err(true) => {
            stats.rx_read_only += 1;
            return None;
        }
        Err(false) => {
            stats.rx_bad_memory += 1;
            return None;
        }
    };
    if total < HEADER_LEN {
        stats.rx_too_short += 1;
        return None;
    }
    if !segs.iter().all(|s| {
        mem.check_range(
            vm_memory::GuestAddress(s.addr),
            s.len as usize,
            vm_memory::Permissions::Write,
        )
    }) {
        stats.rx_bad_memory += 1;
        return None;
    }
    Some((total - HEADER_LEN).min(u32::MAX as usize - HEADER_LEN))
}

/// A payload that cannot be read: the chain ended before it.
struct Unreadable;

impl GuestBytes for Unreadable {
    fn copy_to(&mut self, _offset: usize, _dst: &mut [u8]) -> Result<(), MemoryFault> {
        Err(MemoryFault)
    }
}

/// Called when `enable_notification` reports chains still available after the pop loop.
/// That is normal once (the driver posted meanwhile), but two rounds in a row that pop
/// nothing mean the ring cannot be popped at all: an available index more than a queue ahead
/// of the device, or an available ring outside guest memory. `pop_descriptor_chain` hides
/// that as "no chain", so without this check the caller would spin forever.
fn check_stall<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    popped: bool,
    stalled: &mut bool,
) -> Result<(), DeviceError> {
    if popped {
        *stalled = false;
        return Ok(());
    }
    if !*stalled {
        *stalled = true;
        return Ok(());
    }
    debug!("available ring cannot be popped");
    Err(DeviceError::Queue(
        queue
            .iter(mem)
            .err()
            .unwrap_or(virtio_queue::Error::InvalidAvailRingIndex),
    ))
}

/// Flattens a chain's descriptors into `segs`: all write-only if `writable`, all
/// readable otherwise. Returns the total length, or `Err(wrong_direction)` if a descriptor
/// goes the wrong way (`true`) or the chain is too long, too large or broken (`false`).
fn flatten_into<M>(
    segs: &mut Vec<Seg>,
    chain: DescriptorChain<M>,
    writable: bool,
) -> Result<usize, bool>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    segs.clear();
    let mut total: usize = 0;
    let mut descriptors = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        if desc.is_write_only() != writable {
            return Err(true);
        }
        if segs.len() == VsockDevice::MAX_CHAIN {
            return Err(false);
        }
        total = total.checked_add(desc.len() as usize).ok_or(false)?;
        descriptors += 1;
        last_has_next = desc.has_next();
        if desc.len() > 0 {
            segs.push(Seg {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
    }
    // virtio-queue ends the iteration silently when the chain breaks: a head or `next`
    // index out of range, a descriptor or indirect table it cannot read, a bad indirect
    // table, or a loop (cut after as many descriptors as the queue or table holds). A chain
    // that yielded nothing, or whose last descriptor still points to a next one, is such a
    // broken chain, not a short one.
    if descriptors == 0 || last_has_next {
        return Err(false);
    }
    Ok(total)
}
