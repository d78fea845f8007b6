//! One connection's state.
//!
//! A primer on the protocol, as this engine plays it (virtio 1.2, section 5.10):
//!
//! - **Opening.** The guest sends REQUEST to a host port; we connect a Unix socket to
//!   `<uds_path>_<port>` and answer RESPONSE, or RST if that fails. A host client that wrote
//!   `CONNECT <port>\n` on our listener gets a fresh host port; we send REQUEST to the guest and,
//!   on its RESPONSE, write `OK <host_port>\n` to the client. On RST or timeout we close it.
//! - **Credit.** Each side tells the other its receive buffer (`buf_alloc`) and how much it has
//!   consumed (`fwd_cnt`) in every header. A sender may have at most
//!   `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes unconsumed at the peer. Ours is the
//!   connection buffer: guest bytes a socket refused wait there, so the guest can never send
//!   more than fits. We send CREDIT_UPDATE when the guest would otherwise stall, answer
//!   CREDIT_REQUEST, and ask with CREDIT_REQUEST when we have data but no credit.
//! - **Half-close.** SHUTDOWN SEND from the guest becomes `shutdown(SHUT_WR)` once every byte it
//!   sent reached the socket; SHUTDOWN RCV becomes `shutdown(SHUT_RD)`. End of file on the
//!   socket becomes SHUTDOWN SEND to the guest. Either way, the other direction keeps flowing.
//! - **Closing.** Once both directions are finished we send RST and close the socket. A guest
//!   that shut both directions gives us `close_timeout` to flush what we hold, then we reset.
//!   An RST from the guest closes the socket at once; an RST is never answered.

use std::fmt;

use crate::buf::Ring;
use crate::stats::ConnStats;
use crate::time::Instant;
use crate::wire::{ConnectParser, OkLine, Op, SocketType, SEQ_EOM, SHUTDOWN_RCV};
use crate::Interest;

/// A handle to a connection: a slot index and a generation, so a handle outlived by its
/// connection can never reach the slot's next occupant.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    index: u32,
    generation: u32,
}

impl ConnId {
    pub(crate) const fn new(index: u32, generation: u32) -> Self {
        ConnId { index, generation }
    }

    /// The slot index; small and dense, suitable for a caller's own table.
    pub const fn index(self) -> u32 {
        self.index
    }

    /// The generation of the slot when this connection was made.
    pub const fn generation(self) -> u32 {
        self.generation
    }

    /// The handle as one number (for tokens and traces).
    pub const fn to_raw(self) -> u64 {
        (self.generation as u64) << 32 | self.index as u64
    }

    /// The handle [`to_raw`](Self::to_raw) made.
    pub const fn from_raw(raw: u64) -> Self {
        ConnId {
            index: raw as u32,
            generation: (raw >> 32) as u32,
        }
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}.{}", self.index, self.generation)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A connection's identity on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) socket_type: SocketType,
    /// The CID at the far end: the host (2), or a sibling VM's guest.
    pub(crate) peer_cid: u32,
    pub(crate) guest_port: u32,
    pub(crate) host_port: u32,
}

/// Who opened a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The guest sent REQUEST.
    Guest,
    /// A host client sent `CONNECT`.
    Host,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A host client is sending its `CONNECT` line.
    ConnectLine,
    /// REQUEST owed or sent to the guest; waiting for its RESPONSE.
    HostConnecting,
    /// The host socket connect is under way.
    GuestConnecting,
    /// Guest-initiated, to a sibling VM: the socket to it is connected, and the sibling's
    /// answer (`OK <port>\n` once its guest accepted, end of file if it refused) is awaited.
    SiblingReply,
    /// Data flows; see the shutdown flags for each direction.
    Established,
    /// RST owed to the guest; the socket is closed or about to be.
    Resetting,
    /// Nothing owed to the guest; only the socket's close may be left.
    Closed,
}

/// The state of a connection, as [`Engine::conn_state`](crate::Engine::conn_state) reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnState {
    /// A host client is sending its `CONNECT` line.
    ReadingConnectLine,
    /// Host-initiated: waiting for the guest's RESPONSE.
    HostConnecting,
    /// Guest-initiated: connecting the host socket.
    GuestConnecting,
    /// Both directions open.
    Established,
    /// The guest will send no more; host-to-guest data still flows.
    GuestSendShut,
    /// The host sent end of file; guest-to-host data still flows.
    HostSendShut,
    /// Both directions are finishing: the guest closed, or both sides shut their sending side;
    /// buffered bytes are being flushed.
    Closing,
    /// An RST is on its way to the guest.
    Resetting,
    /// Only the socket's close is left.
    Closed,
}

pub(crate) mod owed_rx {
    pub(crate) const RST: u8 = 1 << 0;
    pub(crate) const RESPONSE: u8 = 1 << 1;
    pub(crate) const REQUEST: u8 = 1 << 2;
    pub(crate) const CREDIT_UPDATE: u8 = 1 << 3;
    /// SHUTDOWN RCV: the host socket takes no more, so the guest's sends fail at once.
    pub(crate) const SHUTDOWN_RCV: u8 = 1 << 4;
}

pub(crate) mod owed_act {
    pub(crate) const CONNECT: u8 = 1 << 0;
    pub(crate) const READ_LINE: u8 = 1 << 1;
    pub(crate) const SHUT_RD: u8 = 1 << 2;
    pub(crate) const FLUSH: u8 = 1 << 3;
    pub(crate) const SHUT_WR: u8 = 1 << 4;
    pub(crate) const INTEREST: u8 = 1 << 5;
    pub(crate) const CLOSE: u8 = 1 << 6;
}

pub(crate) struct Conn {
    pub(crate) generation: u32,
    /// Meaningful once a host client named its port; `keyed` says whether the map holds it.
    pub(crate) key: Key,
    pub(crate) keyed: bool,
    pub(crate) origin: Origin,
    pub(crate) phase: Phase,

    /// Shutdown flags the guest sent.
    pub(crate) guest_shut: u32,
    /// The socket reached end of file.
    pub(crate) host_eof: bool,
    /// SHUTDOWN SEND reached the guest.
    pub(crate) shutdown_sent: bool,
    /// `shutdown(SHUT_WR)` is owed or done.
    pub(crate) host_wr_shut: bool,
    /// `shutdown(SHUT_RD)` is owed or done.
    pub(crate) host_rd_shut: bool,
    pub(crate) socket_open: bool,
    /// The socket failed (an error event, or a write error): it takes no more guest bytes;
    /// what it holds for the guest is still read, then the connection is reset.
    pub(crate) host_broken: bool,
    /// The socket's peer hung up: it takes no more guest bytes (the guest was told with
    /// SHUTDOWN RCV), and what it holds for the guest is still read.
    pub(crate) host_hung_up: bool,

    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// An `Action::Flush` went out and its result has not come back.
    pub(crate) flush_outstanding: bool,
    /// The interest last announced to the caller.
    pub(crate) interest: Interest,

    /// Guest bytes received.
    pub(crate) rx_cnt: u32,
    /// Guest bytes the socket took.
    pub(crate) fwd_cnt: u32,
    /// `fwd_cnt` as the guest last saw it.
    pub(crate) last_fwd_sent: u32,
    pub(crate) peer_buf_alloc: u32,
    pub(crate) peer_fwd_cnt: u32,
    /// Bytes delivered to the guest.
    pub(crate) tx_cnt: u32,
    /// A CREDIT_REQUEST went out and the guest's credit has not changed since.
    pub(crate) credit_requested: bool,

    /// Guest bytes the socket refused, drawn from the pool while non-empty.
    pub(crate) ring: Option<Ring>,
    /// Seqpacket: bytes of the guest's unfinished message, the newest in the ring (no packet
    /// with `EOM` closed it yet, so it cannot be sent).
    pub(crate) open_msg: u32,
    /// Seqpacket: the size of the next message on the socket, once a probe found it and
    /// until it is read.
    pub(crate) rx_msg: Option<u32>,
    /// Seqpacket: the tail of a host message read when the guest had too few rx buffers
    /// posted for all of it, delivered from here as buffers come (drawn from the pool).
    pub(crate) stage: Option<Ring>,
    /// Seqpacket: the socket reported `ECONNRESET` once (the peer closed with our messages
    /// unread); what it sent before is still read.
    pub(crate) peer_reset_seen: bool,
    /// The `OK` reply and how much of it was written.
    pub(crate) ok: Option<(OkLine, u8)>,
    /// The `CONNECT` line of a host client, then the stream bytes that followed it.
    pub(crate) line: ConnectParser,

    pub(crate) owed_rx: u8,
    pub(crate) owed_act: u8,
    pub(crate) in_rx_queue: bool,
    pub(crate) in_act_queue: bool,
    pub(crate) deadline: Option<Instant>,
    pub(crate) stats: ConnStats,
}

impl Conn {
    pub(crate) fn new(generation: u32, origin: Origin, phase: Phase, key: Key) -> Self {
        Conn {
            generation,
            key,
            keyed: false,
            origin,
            phase,
            guest_shut: 0,
            host_eof: false,
            shutdown_sent: false,
            host_wr_shut: false,
            host_rd_shut: false,
            socket_open: true,
            host_broken: false,
            host_hung_up: false,
            readable: false,
            writable: false,
            flush_outstanding: false,
            interest: Interest::default(),
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            credit_requested: false,
            ring: None,
            open_msg: 0,
            rx_msg: None,
            stage: None,
            peer_reset_seen: false,
            ok: None,
            line: ConnectParser::new(),
            owed_rx: 0,
            owed_act: 0,
            in_rx_queue: false,
            in_act_queue: false,
            deadline: None,
            stats: ConnStats::default(),
        }
    }

    /// Bytes we may still send the guest before its buffer is full.
    pub(crate) fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes held for the socket (the reply line not included), an unfinished message
    /// included.
    pub(crate) fn buffered(&self) -> usize {
        self.ring.as_ref().map_or(0, Ring::len)
    }

    /// Seqpacket: bytes of a host message waiting in the stage for rx buffers.
    pub(crate) fn staged(&self) -> usize {
        self.stage.as_ref().map_or(0, Ring::len)
    }

    /// Whether the connection carries messages (seqpacket), not a byte stream.
    pub(crate) fn is_seqpacket(&self) -> bool {
        self.key.socket_type == SocketType::SeqPacket
    }

    /// The rest of the `OK` line still to be written.
    pub(crate) fn ok_pending(&self) -> usize {
        self.ok
            .as_ref()
            .map_or(0, |(line, done)| line.as_bytes().len() - *done as usize)
    }

    /// Bytes waiting for the socket that can be written now: the rest of the `OK` line, then
    /// buffered guest bytes (of a seqpacket connection, those of complete messages).
    pub(crate) fn host_pending(&self) -> usize {
        self.ok_pending() + self.buffered() - self.open_msg as usize
    }

    /// Whether nothing at all waits for the socket, so a new payload may go straight to it.
    pub(crate) fn nothing_held(&self) -> bool {
        self.ok.is_none() && self.buffered() == 0
    }

    /// Whether host-to-guest data may still flow.
    pub(crate) fn to_guest_open(&self) -> bool {
        self.phase == Phase::Established
            && !self.host_eof
            && self.guest_shut & crate::wire::SHUTDOWN_RCV == 0
    }

    /// What this connection sends the guest next, given an rx buffer with `room` bytes of
    /// payload: the decision is the connection's own, in the fixed priority of owed packets.
    pub(crate) fn next_rx(&self, room: usize, max_packet_payload: u32) -> Next {
        let control = |op| Next::Packet {
            op,
            flags: 0,
            held: 0,
        };
        if self.owed_rx & owed_rx::RST != 0 {
            return control(Op::Rst);
        }
        if self.owed_rx & owed_rx::RESPONSE != 0 {
            return control(Op::Response);
        }
        if self.owed_rx & owed_rx::REQUEST != 0 {
            return control(Op::Request);
        }
        if self.owed_rx & owed_rx::SHUTDOWN_RCV != 0 {
            return Next::Packet {
                op: Op::Shutdown,
                flags: SHUTDOWN_RCV,
                held: 0,
            };
        }
        let mut blocked = false;
        let credit = self.peer_credit() as usize;
        let staged = self.staged();
        if self.to_guest_open() && self.is_seqpacket() && staged > 0 {
            // The rest of a message read before: its credit was counted when it was granted.
            if room > 0 {
                let held = staged.min(room).min(max_packet_payload as usize);
                let flags = if held == staged { SEQ_EOM } else { 0 };
                return Next::Packet {
                    op: Op::Rw,
                    flags,
                    held,
                };
            }
            blocked = true;
        } else if self.to_guest_open() && self.is_seqpacket() {
            // A message goes whole or waits: the guest frees credit only for whole messages.
            match self.rx_msg {
                Some(size) if size as usize <= credit => {
                    if room > 0 {
                        return Next::Message(size as usize);
                    }
                    blocked = true;
                }
                Some(_) if !self.credit_requested => return control(Op::CreditRequest),
                Some(_) => {}
                None if self.readable && credit > 0 => return Next::Probe,
                None if self.readable && !self.credit_requested => {
                    return control(Op::CreditRequest)
                }
                None => {}
            }
        } else if self.to_guest_open() {
            let held = self.line.leftover().len();
            let max = credit.min(room).min(max_packet_payload as usize);
            if held > 0 || self.readable {
                if max > 0 && held > 0 {
                    return Next::Packet {
                        op: Op::Rw,
                        flags: 0,
                        held: held.min(max),
                    };
                }
                if max > 0 {
                    return Next::Read(max);
                }
                if credit > 0 {
                    blocked = true;
                } else if !self.credit_requested {
                    return control(Op::CreditRequest);
                }
            }
        }
        if self.owed_rx & owed_rx::CREDIT_UPDATE != 0 {
            return control(Op::CreditUpdate);
        }
        if blocked {
            Next::Blocked
        } else {
            Next::Nothing
        }
    }

    /// The readiness this connection wants to hear of from its socket.
    pub(crate) fn wanted_interest(&self) -> Interest {
        match self.phase {
            Phase::ConnectLine => Interest {
                readable: !self.readable,
                writable: false,
            },
            Phase::GuestConnecting => Interest {
                readable: false,
                writable: true,
            },
            Phase::SiblingReply => Interest {
                readable: !self.readable,
                writable: false,
            },
            Phase::Established => Interest {
                readable: !self.readable
                    && self.to_guest_open()
                    && self.line.leftover().is_empty()
                    && self.rx_msg.is_none()
                    && self.staged() == 0
                    && self.peer_credit() > 0,
                writable: !self.writable && self.host_pending() > 0,
            },
            Phase::HostConnecting | Phase::Resetting | Phase::Closed => Interest::default(),
        }
    }

    pub(crate) fn state(&self) -> ConnState {
        use crate::wire::{SHUTDOWN_BOTH, SHUTDOWN_SEND};
        match self.phase {
            Phase::ConnectLine => ConnState::ReadingConnectLine,
            Phase::HostConnecting => ConnState::HostConnecting,
            Phase::GuestConnecting | Phase::SiblingReply => ConnState::GuestConnecting,
            Phase::Resetting => ConnState::Resetting,
            Phase::Closed => ConnState::Closed,
            Phase::Established => {
                let guest_send_shut = self.guest_shut & SHUTDOWN_SEND != 0;
                if self.guest_shut == SHUTDOWN_BOTH || (guest_send_shut && self.host_eof) {
                    ConnState::Closing
                } else if guest_send_shut {
                    ConnState::GuestSendShut
                } else if self.host_eof {
                    ConnState::HostSendShut
                } else {
                    ConnState::Established
                }
            }
        }
    }
}

pub(crate) enum Next {
    Packet {
        op: Op,
        flags: u32,
        held: usize,
    },
    Read(usize),
    /// Seqpacket: find the size of the socket's next message.
    Probe,
    /// Seqpacket: read the socket's next message, of this size, into as many rx buffers as
    /// it takes.
    Message(usize),
    /// Data is waiting but this rx buffer has no room for payload.
    Blocked,
    Nothing,
}
