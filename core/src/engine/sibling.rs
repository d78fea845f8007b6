//! Sibling VMs: connections between this guest and another VM's guest, carried by a socket
//! between the two devices' engines.
//!
//! - The guest connects to a CID other than the host's: [`Action::Connect`] names that CID,
//!   the caller connects the connection to the sibling's device (or reports `ConnectFailed`),
//!   and the engine then waits for the sibling's reply on that socket: `OK <port>\n` once the
//!   sibling's guest accepted, end of file if it refused. Only then does its guest get the
//!   RESPONSE, so a refusal reaches it as an RST, as from a host without a listener.
//! - A sibling's guest connects to this guest: [`Engine::handle_sibling_accept`] makes a
//!   connection as a host client's would be once its `CONNECT` line was read, addressed from
//!   the sibling's CID and port. The guest's RESPONSE writes `OK <port>\n` to the socket; its
//!   RST closes it.
//! - A sibling goes away: [`Engine::reset_peer`] resets every connection with it.
//!
//! Once established, a sibling connection is an ordinary one: its socket carries the stream
//! or the messages, with the kernel's socket buffers between the two engines, so credit and
//! backpressure work end to end.

use super::*;

impl Engine {
    /// A guest of a sibling VM, `(peer_cid, peer_port)`, connects to this guest's `port`,
    /// over a socket of `socket_type` whose other end the sibling's engine holds. The engine
    /// sends its guest a REQUEST from that address; on the guest's RESPONSE it writes
    /// `OK <peer_port>\n` to the socket (as [`Action::Flush`]), and from then on the
    /// connection is an ordinary one. Watch the socket for readability, as for a host client.
    ///
    /// # Errors
    ///
    /// [`SiblingRefusal`] (counted as `sibling_accepts_refused`): close the socket, which the
    /// sibling's engine takes as a refusal.
    pub fn handle_sibling_accept(
        &mut self,
        now: Instant,
        peer_cid: u64,
        peer_port: u32,
        port: u32,
        socket_type: SocketType,
    ) -> Result<ConnId, SiblingRefusal> {
        self.advance(now);
        let result = self.sibling_accept(peer_cid, peer_port, port, socket_type);
        if result.is_err() {
            self.stats.sibling_accepts_refused += 1;
        }
        let event = Event::SiblingAccept {
            peer_cid,
            peer_port,
            port,
            socket_type,
            result,
        };
        self.sink.sibling_accept(&self.conns, now, event);
        result
    }

    fn sibling_accept(
        &mut self,
        peer_cid: u64,
        peer_port: u32,
        port: u32,
        socket_type: SocketType,
    ) -> Result<ConnId, SiblingRefusal> {
        if peer_cid & CID_RESERVED_MASK != 0
            || peer_cid == HOST_CID
            || peer_cid == self.config.guest_cid
            || port == u32::MAX
            || peer_port == u32::MAX
        {
            return Err(SiblingRefusal::Address);
        }
        if !self.socket_types.allows(socket_type) {
            return Err(SiblingRefusal::SocketType);
        }
        if self.conns.len() >= self.config.max_connections {
            return Err(SiblingRefusal::TableFull);
        }
        let key = Key {
            socket_type,
            peer_cid: peer_cid as u32,
            guest_port: port,
            host_port: peer_port,
        };
        if self.map.contains_key(&key) {
            return Err(SiblingRefusal::InUse);
        }
        let idx = self.insert(Conn::new(0, Origin::Host, Phase::HostConnecting, key));
        let c = &mut self.conns[idx];
        c.writable = true;
        c.owed_rx |= owed_rx::REQUEST;
        self.bind_key(idx);
        self.stats.sibling_accepts += 1;
        let deadline = self.now + self.config.connect_timeout;
        self.set_deadline(idx, deadline);
        self.reconcile(idx);
        let id = self.id(idx);
        debug!(conn = %id, peer_cid, peer_port, port, "sibling connects");
        Ok(id)
    }

    /// The sibling VM with CID `cid` went away (its device reset, stopped or was removed):
    /// every connection with it is reset at once, each getting an RST to the guest and its
    /// socket closed, rather than ending as if the sibling's guest had closed it.
    pub fn reset_peer(&mut self, now: Instant, cid: u64) {
        self.sink.reset_peer(&self.conns, now, cid);
        self.advance(now);
        if cid == HOST_CID || cid & CID_RESERVED_MASK != 0 {
            return;
        }
        for idx in 0..self.slots_used() {
            let Some(c) = self.conns.get(idx) else {
                continue;
            };
            if u64::from(c.key.peer_cid) != cid
                || matches!(
                    c.phase,
                    Phase::ConnectLine | Phase::Resetting | Phase::Closed
                )
            {
                continue;
            }
            self.stats.sibling_resets += 1;
            self.reset_conn(idx);
        }
    }

    /// What was read of a sibling's reply to the guest's connect.
    pub(super) fn sibling_reply(&mut self, idx: usize, read: LineRead<'_>) {
        let c = &mut self.conns[idx];
        let refused = match read {
            LineRead::Data(bytes) => {
                // A seqpacket sibling's reply is one message: whole, and alone in it.
                match c.line.feed(bytes) {
                    ConnectStatus::Incomplete if c.is_seqpacket() => true,
                    ConnectStatus::Complete(_)
                        if c.is_seqpacket() && !c.line.leftover().is_empty() =>
                    {
                        true
                    }
                    ConnectStatus::Incomplete => false,
                    ConnectStatus::Complete(_) => {
                        // What followed the line belongs to the stream and goes first.
                        c.phase = Phase::Established;
                        c.deadline = None;
                        c.owed_rx |= owed_rx::RESPONSE;
                        self.stats.established += 1;
                        debug!(conn = %self.id(idx), "sibling connection established");
                        false
                    }
                    ConnectStatus::Invalid(_) => true,
                }
            }
            LineRead::WouldBlock => {
                c.readable = false;
                false
            }
            // The sibling closed the socket: its guest refused, or it could not take the
            // connection.
            LineRead::Eof | LineRead::Error(_) => true,
        };
        if refused {
            debug!(conn = %self.id(idx), ?read, "sibling refused the connection");
            self.stats.sibling_refused += 1;
            self.reset_conn(idx);
            return;
        }
        self.reconcile(idx);
    }
}
