//! A model of Linux's virtio-vsock guest stack, for tests (feature `test-utils`).
//!
//! [`LinuxGuest`] is the guest side of the protocol without a transport: feed it the packets
//! the device delivered ([`LinuxGuest::receive`]) and send what it queues
//! ([`LinuxGuest::poll_tx`]). It behaves like `net/vmw_vsock/virtio_transport_common.c` where
//! that matters to a device: 256 KiB receive buffers, credit updates when the application
//! reads and the host's view of free space gets low, a credit request when blocked, answers to
//! credit requests, RST for packets to no socket, RST once the host shut down both directions,
//! and an 8 s close timeout after `close()`. The engine's tests run it over a direct call, the
//! device's over real virtqueues.
//!
//! The module also holds what the test suites of every crate share: [`pattern`], the byte
//! stream they send and compare, and [`guest_pkt`] and [`host_pkt`], stream packet headers
//! between guest [`GUEST_CID`] and the host.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::Instant;
use crate::wire::{
    Header, HeaderError, Op, Packet, SocketType, HOST_CID, SEQ_EOM, SEQ_EOR, SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
};

/// Linux's default receive buffer per socket.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// Linux's largest packet payload.
pub const GUEST_MAX_PKT: usize = 64 * 1024;
/// Linux's close timeout (`VSOCK_CLOSE_TIMEOUT`).
pub const GUEST_CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// The first local port the model uses for outgoing connections.
pub const FIRST_GUEST_PORT: u32 = 49152;

/// A connection key as the guest sees it: (local port, peer port).
pub type GuestKey = (u32, u32);

/// One guest socket.
#[derive(Clone, Debug, Default)]
pub struct GuestConn {
    /// Our port.
    pub local_port: u32,
    /// The host's port.
    pub peer_port: u32,
    /// REQUEST sent, no answer yet.
    pub connecting: bool,
    /// RESPONSE seen (or sent, for a connection the host opened).
    pub established: bool,
    /// Got an RST (or sent one).
    pub reset: bool,
    /// Nothing more happens on this socket.
    pub closed: bool,
    /// The guest sent RST while the connection was live (abort or close timeout).
    pub rst_sent: bool,
    /// The guest received RST while the connection was live.
    pub rst_received: bool,
    /// Bytes received and not yet read by the application.
    pub unread: VecDeque<u8>,
    /// Bytes the application read, in order.
    pub read: Vec<u8>,
    /// Application bytes not yet sent.
    pub to_send: VecDeque<u8>,
    /// Everything the application queued for sending, in order.
    pub sent_by_app: Vec<u8>,
    /// Payload bytes received.
    pub rx_cnt: u32,
    /// Payload bytes the application consumed.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the host.
    pub last_fwd_sent: u32,
    /// Payload bytes sent.
    pub tx_cnt: u32,
    /// The host's buffer size.
    pub peer_buf_alloc: u32,
    /// The host's consumed count.
    pub peer_fwd_cnt: u32,
    /// Shutdown flags the host sent.
    pub peer_shut: u32,
    /// Shutdown flags we sent.
    pub shut_sent: u32,
    /// Shutdown flags to send once `to_send` is empty.
    pub shut_wanted: u32,
    /// A CREDIT_REQUEST is out and unanswered.
    pub credit_requested: bool,
    /// When a `close()` gives up waiting for the host's RST.
    pub close_deadline: Option<Instant>,
    /// The application reads everything as it arrives.
    pub auto_read: bool,
    /// A `SOCK_SEQPACKET` socket: its packets have type 2, and what it sends and reads are
    /// whole messages.
    pub seqpacket: bool,
    /// Seqpacket: the messages queued for sending, as (bytes not yet sent, sent with
    /// `MSG_EOR`), in order; their bytes are in `to_send`.
    pub messages_to_send: VecDeque<(usize, bool)>,
    /// Seqpacket: the message being received, until a packet with `EOM` ends it.
    pub partial: Vec<u8>,
    /// Seqpacket: complete messages received and not yet read, with whether `EOR` ended them.
    pub messages: VecDeque<(Vec<u8>, bool)>,
    /// Seqpacket: the messages the application read, in order, with their `EOR`.
    pub messages_read: Vec<(Vec<u8>, bool)>,
}

impl GuestConn {
    /// Bytes the host will still accept.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// The guest vsock stack.
#[derive(Debug)]
pub struct LinuxGuest {
    /// The guest's CID.
    pub cid: u64,
    /// Sockets by (local port, peer port).
    pub conns: BTreeMap<GuestKey, GuestConn>,
    /// Ports with a listening socket.
    pub listeners: BTreeSet<u32>,
    /// Ports with a listening seqpacket socket.
    pub seqpacket_listeners: BTreeSet<u32>,
    /// Packets received, in order (headers).
    pub log: Vec<Header>,
    /// Packets that broke the credit the guest advertised.
    pub credit_violations: u32,
    /// RSTs of a socket type other than stream, dropped (Linux never answers an RST).
    pub ignored_rsts: u32,
    /// New sockets read everything as it arrives.
    pub auto_read: bool,
    /// The CID every socket talks to: the host's unless set (a model of a guest whose
    /// connections all go to one sibling VM).
    pub peer_cid: u64,
    outbox: VecDeque<(Header, Vec<u8>)>,
    next_port: u32,
}

impl LinuxGuest {
    /// A guest with CID `cid` and no sockets.
    pub fn new(cid: u64) -> Self {
        LinuxGuest {
            cid,
            conns: BTreeMap::new(),
            listeners: BTreeSet::new(),
            seqpacket_listeners: BTreeSet::new(),
            log: Vec::new(),
            credit_violations: 0,
            ignored_rsts: 0,
            auto_read: true,
            peer_cid: HOST_CID,
            outbox: VecDeque::new(),
            next_port: FIRST_GUEST_PORT,
        }
    }

    /// A socket.
    ///
    /// # Panics
    ///
    /// If there is no such socket.
    pub fn conn(&self, key: GuestKey) -> &GuestConn {
        self.conns.get(&key).expect("guest connection")
    }

    fn conn_mut(&mut self, key: GuestKey) -> &mut GuestConn {
        self.conns.get_mut(&key).expect("guest connection")
    }

    /// `connect()` to host port `port`; returns the socket's key.
    pub fn connect(&mut self, port: u32) -> GuestKey {
        self.open(port, false)
    }

    fn open(&mut self, port: u32, seqpacket: bool) -> GuestKey {
        let local = self.next_port;
        self.next_port += 1;
        let key = (local, port);
        self.conns.insert(
            key,
            GuestConn {
                local_port: local,
                peer_port: port,
                connecting: true,
                auto_read: self.auto_read,
                seqpacket,
                ..Default::default()
            },
        );
        self.send_ctl(key, Op::Request, 0);
        key
    }

    /// `listen()` on `port`.
    pub fn listen(&mut self, port: u32) {
        self.listeners.insert(port);
    }

    /// `connect()` of a `SOCK_SEQPACKET` socket to host port `port`; returns its key.
    pub fn connect_seqpacket(&mut self, port: u32) -> GuestKey {
        self.open(port, true)
    }

    /// `listen()` of a `SOCK_SEQPACKET` socket on `port`.
    pub fn listen_seqpacket(&mut self, port: u32) {
        self.seqpacket_listeners.insert(port);
    }

    /// `sendmsg()` of one message on a seqpacket socket (`eor`: with `MSG_EOR`). Like Linux,
    /// refuses a message longer than the smaller of the host's buffer and its own (the
    /// application sees `ENOMEM`): returns whether it was queued. An empty message sends
    /// nothing.
    pub fn send_message(&mut self, key: GuestKey, bytes: &[u8], eor: bool) -> bool {
        let c = self.conn_mut(key);
        assert!(c.seqpacket, "send_message on a stream socket");
        if bytes.len() > c.peer_buf_alloc.min(GUEST_BUF_ALLOC) as usize {
            return false;
        }
        if bytes.is_empty() {
            return true;
        }
        c.to_send.extend(bytes);
        c.sent_by_app.extend_from_slice(bytes);
        c.messages_to_send.push_back((bytes.len(), eor));
        true
    }

    /// `recvmsg()` on a seqpacket socket: the next whole message and its `EOR`, if one has
    /// arrived. Like Linux, tells the host of the freed space after every read.
    pub fn read_message(&mut self, key: GuestKey) -> Option<(Vec<u8>, bool)> {
        let c = self.conn_mut(key);
        let (msg, eor) = c.messages.pop_front()?;
        c.fwd_cnt = c.fwd_cnt.wrapping_add(msg.len() as u32);
        c.read.extend_from_slice(&msg);
        c.messages_read.push((msg.clone(), eor));
        let live = !c.closed && c.established;
        if live {
            self.send_ctl(key, Op::CreditUpdate, 0);
        }
        Some((msg, eor))
    }

    /// `send()`: queues bytes, sent as credit allows.
    pub fn write(&mut self, key: GuestKey, bytes: &[u8]) {
        let c = self.conn_mut(key);
        c.to_send.extend(bytes);
        c.sent_by_app.extend_from_slice(bytes);
    }

    /// `shutdown()` of these directions, after the queued bytes went out.
    pub fn shutdown(&mut self, key: GuestKey, flags: u32) {
        self.conn_mut(key).shut_wanted |= flags;
    }

    /// `close()` after the queued bytes went out: shut both, wait for the RST or time out.
    pub fn close(&mut self, key: GuestKey) {
        self.shutdown(key, SHUTDOWN_BOTH);
    }

    /// `close()` at once: bytes not yet sent are dropped (a blocked `send` never finished).
    pub fn close_now(&mut self, key: GuestKey) {
        let c = self.conn_mut(key);
        c.to_send.clear();
        c.shut_wanted |= SHUTDOWN_BOTH;
    }

    /// Resets the connection at once.
    pub fn rst(&mut self, key: GuestKey) {
        self.send_ctl(key, Op::Rst, 0);
        let c = self.conn_mut(key);
        if !c.closed {
            c.rst_sent = true;
        }
        c.reset = true;
        c.closed = true;
    }

    /// `recv()` of up to `n` bytes; returns how many were read.
    pub fn read(&mut self, key: GuestKey, n: usize) -> usize {
        let c = self.conn_mut(key);
        let n = n.min(c.unread.len());
        let bytes: Vec<u8> = c.unread.drain(..n).collect();
        c.read.extend(bytes);
        c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        let c = &self.conns[&key];
        if !c.closed && c.established {
            // Tell the host when the free space it knows of drops below a packet.
            let seen_free = GUEST_BUF_ALLOC.saturating_sub(c.rx_cnt.wrapping_sub(c.last_fwd_sent));
            if c.fwd_cnt != c.last_fwd_sent && (seen_free as usize) < GUEST_MAX_PKT {
                self.send_ctl(key, Op::CreditUpdate, 0);
            }
        }
        n
    }

    /// The next packet to put on the tx queue. Call [`pump`](Self::pump) first to turn
    /// application data into packets.
    pub fn poll_tx(&mut self) -> Option<(Header, Vec<u8>)> {
        self.outbox.pop_front()
    }

    /// Whether packets are waiting to be sent.
    pub fn has_tx(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Puts a packet back at the head of the queue (its transport was full).
    pub fn send_raw_front(&mut self, header: Header, payload: Vec<u8>) {
        self.outbox.push_front((header, payload));
    }

    /// Queues a raw packet, for bad-input tests.
    pub fn send_raw(&mut self, header: Header, payload: Vec<u8>) {
        self.outbox.push_back((header, payload));
    }

    /// The earliest close timeout, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .values()
            .filter(|c| !c.closed)
            .filter_map(|c| c.close_deadline)
            .min()
    }

    /// Fires close timeouts due at `now`; returns whether any fired.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        let expired: Vec<GuestKey> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closed && c.close_deadline.is_some_and(|t| t <= now))
            .map(|(k, _)| *k)
            .collect();
        for &key in &expired {
            self.rst(key);
        }
        !expired.is_empty()
    }

    fn header(&mut self, key: GuestKey, op: Op, flags: u32, len: u32) -> Header {
        let (cid, peer_cid) = (self.cid, self.peer_cid);
        let c = self.conn_mut(key);
        c.last_fwd_sent = c.fwd_cnt;
        Packet {
            src_cid: cid,
            dst_cid: peer_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            socket_type: if c.seqpacket {
                SocketType::SeqPacket
            } else {
                SocketType::Stream
            },
            op,
            flags,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
        .to_header()
    }

    fn send_ctl(&mut self, key: GuestKey, op: Op, flags: u32) {
        let h = self.header(key, op, flags, 0);
        self.outbox.push_back((h, Vec::new()));
    }

    fn send_rst_to(&mut self, key: GuestKey) {
        let ty = match self.conns.get(&key) {
            Some(c) if c.seqpacket => SocketType::SeqPacket,
            _ => SocketType::Stream,
        };
        self.send_rst_typed(key, ty);
    }

    fn send_rst_typed(&mut self, key: GuestKey, socket_type: SocketType) {
        let h = Packet {
            src_cid: self.cid,
            dst_cid: self.peer_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            socket_type,
            op: Op::Rst,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
        .to_header();
        self.outbox.push_back((h, Vec::new()));
    }

    /// Moves application data into packets as credit allows, and queues owed shutdowns
    /// (`now` arms the close timeout of a `close()`). Returns whether anything was queued.
    pub fn pump(&mut self, now: Instant) -> bool {
        let mut progress = false;
        let keys: Vec<GuestKey> = self.conns.keys().copied().collect();
        for key in keys {
            loop {
                let c = &self.conns[&key];
                if c.closed
                    || !c.established
                    || c.shut_sent & SHUTDOWN_SEND != 0
                    || c.to_send.is_empty()
                {
                    break;
                }
                let credit = c.credit() as usize;
                if credit == 0 {
                    if !c.credit_requested {
                        self.conn_mut(key).credit_requested = true;
                        self.send_ctl(key, Op::CreditRequest, 0);
                        progress = true;
                    }
                    break;
                }
                let mut n = c.to_send.len().min(credit).min(GUEST_MAX_PKT);
                let mut flags = 0;
                if c.seqpacket {
                    // Packets of one message at a time; the last carries EOM (and EOR).
                    let (left, eor) = *c.messages_to_send.front().expect("a queued message");
                    n = n.min(left);
                    if n == left {
                        flags = SEQ_EOM | if eor { SEQ_EOR } else { 0 };
                    }
                }
                let h = self.header(key, Op::Rw, flags, n as u32);
                let c = self.conn_mut(key);
                let payload: Vec<u8> = c.to_send.drain(..n).collect();
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                if c.seqpacket {
                    let front = c.messages_to_send.front_mut().expect("a queued message");
                    front.0 -= n;
                    if front.0 == 0 {
                        c.messages_to_send.pop_front();
                    }
                }
                self.outbox.push_back((h, payload));
                progress = true;
            }
            let c = &self.conns[&key];
            let new_flags = c.shut_wanted & !c.shut_sent;
            if !c.closed && c.established && new_flags != 0 && c.to_send.is_empty() {
                let all = c.shut_sent | new_flags;
                let c = self.conn_mut(key);
                c.shut_sent = all;
                if all == SHUTDOWN_BOTH {
                    c.close_deadline = Some(now + GUEST_CLOSE_TIMEOUT);
                }
                self.send_ctl(key, Op::Shutdown, all);
                progress = true;
            }
        }
        progress
    }

    /// The driver received one packet from the device.
    ///
    /// # Panics
    ///
    /// On anything a correct device never sends: a malformed header, a wrong CID, a payload
    /// length that disagrees with the header.
    pub fn receive(&mut self, h: &Header, payload: &[u8]) {
        self.log.push(*h);
        let pkt = match Packet::parse(h, u32::MAX) {
            Ok(pkt) => pkt,
            // An RST echoing the unknown type of a bad guest packet: Linux drops packets of a
            // type it does not know, and never answers an RST.
            Err(HeaderError::UnknownType(_)) if h.op.get() == Op::Rst.to_u16() => {
                self.ignored_rsts += 1;
                return;
            }
            Err(e) => panic!("device sent a malformed header: {e:?}"),
        };
        if pkt.src_cid != self.peer_cid {
            // The RST answering a packet this guest sent elsewhere (a hostile test's raw
            // packet): no socket of the model talks to that CID.
            assert_eq!(
                pkt.op,
                Op::Rst,
                "device packet from a CID other than the peer's"
            );
            self.ignored_rsts += 1;
            return;
        }
        assert_eq!(
            pkt.dst_cid, self.cid,
            "device packet to a CID other than the guest"
        );
        assert_eq!(
            pkt.len as usize,
            payload.len(),
            "header length disagrees with payload"
        );
        let seqpacket = pkt.socket_type == SocketType::SeqPacket;
        let key = (pkt.dst_port, pkt.src_port);
        if pkt.op == Op::Request {
            if self.conns.get(&key).is_some_and(|c| !c.closed) {
                return;
            }
            let listening = if seqpacket {
                &self.seqpacket_listeners
            } else {
                &self.listeners
            };
            if listening.contains(&pkt.dst_port) {
                self.conns.insert(
                    key,
                    GuestConn {
                        local_port: key.0,
                        peer_port: key.1,
                        established: true,
                        peer_buf_alloc: pkt.buf_alloc,
                        peer_fwd_cnt: pkt.fwd_cnt,
                        auto_read: self.auto_read,
                        seqpacket,
                        ..Default::default()
                    },
                );
                self.send_ctl(key, Op::Response, 0);
            } else {
                self.send_rst_typed(key, pkt.socket_type);
            }
            return;
        }
        if self.conns.get(&key).is_none_or(|c| c.closed) {
            if pkt.op != Op::Rst {
                self.send_rst_typed(key, pkt.socket_type);
            }
            return;
        }
        if self.conns[&key].seqpacket != seqpacket {
            // Linux resets a packet whose type is not its socket's.
            if pkt.op != Op::Rst {
                self.send_rst_typed(key, pkt.socket_type);
            }
            self.ignored_rsts += u32::from(pkt.op == Op::Rst);
            return;
        }
        let c = self.conn_mut(key);
        c.peer_buf_alloc = pkt.buf_alloc;
        c.peer_fwd_cnt = pkt.fwd_cnt;
        if c.credit() > 0 {
            c.credit_requested = false;
        }
        match pkt.op {
            Op::Response => {
                if c.connecting {
                    c.connecting = false;
                    c.established = true;
                } else {
                    self.send_rst_to(key);
                }
            }
            Op::Rw if seqpacket => {
                c.rx_cnt = c.rx_cnt.wrapping_add(pkt.len);
                let over = c.rx_cnt.wrapping_sub(c.fwd_cnt) > GUEST_BUF_ALLOC;
                c.partial.extend_from_slice(payload);
                if pkt.flags & SEQ_EOM != 0 {
                    let msg = std::mem::take(&mut c.partial);
                    c.messages.push_back((msg, pkt.flags & SEQ_EOR != 0));
                }
                let auto = c.auto_read;
                if over {
                    self.credit_violations += 1;
                }
                if auto {
                    while self.read_message(key).is_some() {}
                }
            }
            Op::Rw => {
                c.rx_cnt = c.rx_cnt.wrapping_add(pkt.len);
                let over = c.rx_cnt.wrapping_sub(c.fwd_cnt) > GUEST_BUF_ALLOC;
                c.unread.extend(payload);
                let auto = c.auto_read;
                if over {
                    self.credit_violations += 1;
                }
                if auto {
                    let n = self.conns[&key].unread.len();
                    self.read(key, n);
                }
            }
            Op::Shutdown => {
                c.peer_shut |= pkt.flags & SHUTDOWN_BOTH;
                if c.peer_shut == SHUTDOWN_BOTH {
                    c.closed = true;
                    self.send_rst_to(key);
                }
            }
            Op::Rst => {
                c.reset = true;
                c.rst_received = true;
                c.closed = true;
                c.connecting = false;
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => self.send_ctl(key, Op::CreditUpdate, 0),
            Op::Request => unreachable!("handled above"),
        }
    }
}

/// The guest CID of the headers [`guest_pkt`] and [`host_pkt`] build.
pub const GUEST_CID: u64 = 3;

/// A stream packet header from guest [`GUEST_CID`] to the host.
pub fn guest_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Packet {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        socket_type: SocketType::Stream,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
    .to_header()
}

/// A stream packet header from the host to guest [`GUEST_CID`], as the engine sends it.
pub fn host_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Packet {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port,
        dst_port,
        len,
        socket_type: SocketType::Stream,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
    .to_header()
}

/// A seqpacket packet header from guest [`GUEST_CID`] to the host.
pub fn guest_seq_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    let mut h = guest_pkt(op, src_port, dst_port, len, flags, buf_alloc, fwd_cnt);
    h.type_ = SocketType::SeqPacket.to_u16().into();
    h
}

/// A seqpacket packet header from the host to guest [`GUEST_CID`], as the engine sends it.
pub fn host_seq_pkt(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    let mut h = host_pkt(op, src_port, dst_port, len, flags, buf_alloc, fwd_cnt);
    h.type_ = SocketType::SeqPacket.to_u16().into();
    h
}

/// `len` bytes of a stream that differs for each `seed` (modulo 251): byte `i` is
/// `(31 i + 7919 seed) mod 251`. Tests send it and compare what arrives with a second call.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7919))
                % 251) as u8
        })
        .collect()
}
