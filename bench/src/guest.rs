//! A guest for the in-process benchmarks: a small vsock stack on the driver side of the rx
//! and tx rings, on a thread of its own, behaving where it matters to the device as Linux's
//! `virtio_transport_common.c` and `virtio_transport.c` do:
//!
//! - payload already sits in guest memory (each tx slot has its own 64 KiB, filled once);
//!   a data packet is a header descriptor followed by a payload descriptor, a control packet a
//!   header alone;
//! - the rx ring is full of 4 KiB buffers, each posted back as soon as its packet is read;
//! - 256 KiB of receive buffer per socket, consumed as it arrives, with a CREDIT_UPDATE when
//!   the host's view of the free space falls below one packet; a packet is never sent beyond
//!   the host's credit;
//! - a kick only when EVENT_IDX says the device wants one, on the queue's own eventfd (as a
//!   VMM's ioeventfd; the runtime's loop watches it, [`vsock_device::KickFd`]) or, with
//!   [`Kick::Loop`], on the loop's one kick descriptor; and sleeping on the interrupt
//!   eventfd only after asking for an interrupt (`used_event`) and finding nothing meanwhile.
//!   Rx interrupts are asked for whenever the guest sleeps; tx interrupts only while it waits
//!   for a free tx slot (Linux reclaims tx buffers from its tx interrupt too; here they are
//!   reclaimed whenever the guest runs, so the device interrupts for tx only when the guest
//!   is really waiting for descriptors).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vsock_core::testing::guest_pkt;
use vsock_core::wire::{Header, Op, HEADER_LEN, SHUTDOWN_BOTH};
use zerocopy::IntoBytes;

use crate::ring::{ring_bytes, Vring, DESC_NEXT, DESC_WRITE};
use crate::sys::EventFd;

/// Entries per ring (rx and tx; the event ring is smaller).
pub const QUEUE: u16 = 256;
/// Linux's rx buffer: 4 KiB, the header included.
pub const RX_BUF: u32 = 4096;
/// Tx slots: a header descriptor and a payload descriptor each.
pub const TX_SLOTS: u16 = QUEUE / 2;
/// Linux's largest packet payload, and the payload room of a tx slot.
pub const MAX_PKT: u32 = 64 * 1024;
/// Linux's default receive buffer per socket.
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;
/// The first local port of the guest's connections.
pub const FIRST_PORT: u32 = 49152;

const EVENT_QUEUE: u16 = 64;
const TX_HDR: u64 = 0x10_0000;
const RX_BUFS: u64 = 0x20_0000;
const TX_PAYLOAD: u64 = 0x40_0000;
const MEM_SIZE: u64 = TX_PAYLOAD + TX_SLOTS as u64 * MAX_PKT as u64;

/// How long one sleep on the interrupt may last before the guest looks at its rings anyway
/// (counted: a correct device never lets it expire while work is owed).
const WAIT: Duration = Duration::from_millis(500);

/// The state of one guest socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// REQUEST sent.
    Connecting,
    /// RESPONSE received.
    Established,
    /// Reset (either side), or shut down both ways.
    Closed,
}

/// One guest socket.
#[derive(Clone, Debug)]
pub struct GuestConn {
    /// Our port.
    pub local_port: u32,
    /// The host's port.
    pub peer_port: u32,
    /// Where the connection stands.
    pub state: State,
    /// The host's buffer size.
    pub peer_buf_alloc: u32,
    /// The host's consumed count.
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent.
    pub tx_cnt: u32,
    /// Payload bytes received.
    pub rx_cnt: u32,
    /// Payload bytes the application consumed (all of them, at once).
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the host.
    pub last_fwd_sent: u32,
    /// Bytes the application still wants to send.
    pub to_send: u64,
    /// Payload bytes received, in all.
    pub received: u64,
    /// The size of the data packets this socket sends (at most [`MAX_PKT`]).
    pub pkt_size: u32,
    /// Whether an RST arrived.
    pub reset: bool,
    /// When `to_send` reached zero (the last packet posted).
    pub sent_all_at: Option<Instant>,
    /// Payload bytes after which [`rx_done_at`](Self::rx_done_at) is noted (0: never).
    pub rx_goal: u64,
    /// When `received` reached `rx_goal`.
    pub rx_done_at: Option<Instant>,
    /// The host opened it (to a port we listen on): we close it when the host shuts down.
    pub accepted: bool,
}

impl GuestConn {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// What the guest did, for the report.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestStats {
    /// Kicks sent (eventfd writes).
    pub kicks: u64,
    /// Sleeps on the interrupt eventfd.
    pub sleeps: u64,
    /// Sleeps that ended without an interrupt (after half a second).
    pub timeouts: u64,
    /// Packets posted on the tx ring.
    pub tx_packets: u64,
    /// Packets read from the rx ring.
    pub rx_packets: u64,
    /// Data packets read from the rx ring.
    pub rx_data_packets: u64,
    /// CREDIT_UPDATEs sent.
    pub credit_updates: u64,
    /// Packets for no socket of ours.
    pub stray: u64,
}

/// Which descriptor a kick is written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// The queue's own eventfd, which the device's loop watches itself
    /// ([`vsock_device::Transport::take_kick_fd`]): one eventfd write per kick, no read.
    Queue,
    /// The loop's kick descriptor (what a VMM does when the loop cannot watch the queue's):
    /// the loop reads it at each wake.
    Loop,
}

/// Paces data packets at a fixed rate.
#[derive(Clone, Copy, Debug)]
struct Pacer {
    interval: Duration,
    next: Instant,
}

/// The guest: guest memory, the rings, the kick and interrupt eventfds, the sockets.
pub struct Guest {
    /// Guest memory, shared with the device.
    pub mem: GuestMemoryMmap,
    rx: Vring,
    tx: Vring,
    event: Vring,
    kick: EventFd,
    /// The rx and tx queues' own kick eventfds.
    queue_kicks: [EventFd; 2],
    /// Where each queue's kicks go.
    kick_to: [Kick; 2],
    irq: EventFd,
    free_tx: Vec<u16>,
    /// Sockets, by id (ids are never reused).
    pub conns: Vec<GuestConn>,
    /// Sockets by (local port, peer port).
    by_port: HashMap<(u32, u32), usize>,
    /// Ports with a listening socket.
    listening: Vec<u32>,
    /// Host connections accepted on them.
    pub accepted: u64,
    /// Sockets with application bytes to send, round-robin.
    senders: Vec<usize>,
    next_sender: usize,
    /// Control packets owed, in order: (socket, op, flags).
    ctl: std::collections::VecDeque<(usize, Op, u32)>,
    /// Sockets with a CREDIT_UPDATE in `ctl`.
    update_owed: Vec<bool>,
    next_port: u32,
    pacer: Option<Pacer>,
    /// Counters.
    pub stats: GuestStats,
}

impl Guest {
    /// Fresh guest memory: the three rings, every rx buffer posted, every tx slot's payload
    /// filled.
    pub fn new() -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("guest memory");
        let ring = ring_bytes(QUEUE);
        let rx = Vring::new(mem.clone(), QUEUE, 0);
        let tx = Vring::new(mem.clone(), QUEUE, ring);
        let event = Vring::new(mem.clone(), EVENT_QUEUE, 2 * ring);
        assert!(2 * ring + ring_bytes(EVENT_QUEUE) <= TX_HDR, "rings fit");
        for slot in 0..TX_SLOTS {
            let (h, p) = (2 * slot, 2 * slot + 1);
            tx.set_desc(h, Self::hdr_addr(slot), HEADER_LEN as u32, DESC_NEXT, p);
            tx.set_desc(p, Self::payload_addr(slot), MAX_PKT, 0, 0);
            let fill = vsock_core::testing::pattern(u64::from(slot), MAX_PKT as usize);
            mem.write_slice(&fill, GuestAddress(Self::payload_addr(slot)))
                .expect("payload in guest memory");
        }
        let mut guest = Guest {
            mem,
            rx,
            tx,
            event,
            kick: EventFd::new().expect("eventfd"),
            queue_kicks: [
                EventFd::new().expect("eventfd"),
                EventFd::new().expect("eventfd"),
            ],
            kick_to: [Kick::Loop; 2],
            irq: EventFd::new().expect("eventfd"),
            free_tx: (0..TX_SLOTS).rev().collect(),
            conns: Vec::new(),
            by_port: HashMap::new(),
            listening: Vec::new(),
            accepted: 0,
            senders: Vec::new(),
            next_sender: 0,
            ctl: std::collections::VecDeque::new(),
            update_owed: Vec::new(),
            next_port: FIRST_PORT,
            pacer: None,
            stats: GuestStats::default(),
        };
        for i in 0..QUEUE {
            let addr = RX_BUFS + u64::from(i) * u64::from(RX_BUF);
            guest.rx.set_desc(i, addr, RX_BUF, DESC_WRITE, 0);
            guest.rx.push(i);
        }
        guest
    }

    fn hdr_addr(slot: u16) -> u64 {
        TX_HDR + 64 * u64::from(slot)
    }

    fn payload_addr(slot: u16) -> u64 {
        TX_PAYLOAD + u64::from(slot) * u64::from(MAX_PKT)
    }

    /// The device's view of the rx, tx and event rings.
    pub fn device_queues(&self) -> [virtio_queue::Queue; 3] {
        [
            self.rx.device_queue(),
            self.tx.device_queue(),
            self.event.device_queue(),
        ]
    }

    /// The loop's kick eventfd, for the device's loop.
    pub fn kick_fd(&self) -> std::os::fd::OwnedFd {
        self.kick.try_clone_owned().expect("eventfd dup")
    }

    /// Queue `q`'s (0 rx, 1 tx) own kick eventfd, for the device's loop to watch.
    pub fn queue_kick_fd(&self, q: usize) -> std::os::fd::OwnedFd {
        self.queue_kicks[q].try_clone_owned().expect("eventfd dup")
    }

    /// Sends queue `q`'s kicks to `to` from now on (the guest starts with [`Kick::Loop`]).
    pub fn set_kick(&mut self, q: usize, to: Kick) {
        self.kick_to[q] = to;
    }

    /// Where queue `q`'s kicks go.
    pub fn kick_target(&self, q: usize) -> Kick {
        self.kick_to[q]
    }

    fn kick(&mut self, q: usize) {
        match self.kick_to[q] {
            Kick::Queue => self.queue_kicks[q].signal(),
            Kick::Loop => self.kick.signal(),
        }
        self.stats.kicks += 1;
    }

    /// The interrupt eventfd, for the device's transport.
    pub fn irq(&self) -> EventFd {
        self.irq.try_clone().expect("eventfd dup")
    }

    /// Sends data packets at most `per_s` a second (`None`: as fast as credit allows).
    pub fn set_rate(&mut self, per_s: Option<u64>) {
        self.pacer = per_s.filter(|&r| r > 0).map(|r| Pacer {
            interval: Duration::from_nanos(1_000_000_000 / r),
            next: Instant::now(),
        });
    }

    /// `connect()` to host port `port`: queues the REQUEST. Returns the socket's id; drive the
    /// guest until it is [`State::Established`].
    pub fn connect(&mut self, port: u32) -> usize {
        let local_port = self.next_port;
        self.next_port = self.next_port.checked_add(1).expect("ports left");
        let id = self.new_conn(local_port, port, State::Connecting);
        self.ctl.push_back((id, Op::Request, 0));
        id
    }

    /// `listen()` on `port`: the host's connections to it are accepted, answered with
    /// RESPONSE, and closed (RST) when the host shuts its side down.
    pub fn listen(&mut self, port: u32) {
        self.listening.push(port);
    }

    fn new_conn(&mut self, local_port: u32, peer_port: u32, state: State) -> usize {
        let id = self.conns.len();
        self.conns.push(GuestConn {
            local_port,
            peer_port,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            to_send: 0,
            received: 0,
            pkt_size: MAX_PKT,
            reset: false,
            sent_all_at: None,
            rx_goal: 0,
            rx_done_at: None,
            accepted: false,
        });
        self.update_owed.push(false);
        self.by_port.insert((local_port, peer_port), id);
        id
    }

    /// The application writes `bytes` more bytes, in packets of `pkt_size`.
    pub fn send(&mut self, id: usize, bytes: u64, pkt_size: u32) {
        let c = &mut self.conns[id];
        assert!(pkt_size > 0 && pkt_size <= MAX_PKT);
        c.pkt_size = pkt_size;
        if c.to_send == 0 && bytes > 0 {
            self.senders.push(id);
        }
        c.to_send += bytes;
        c.sent_all_at = None;
    }

    /// Resets the connection at once (an abortive close) and forgets it.
    pub fn rst(&mut self, id: usize) {
        self.ctl.push_back((id, Op::Rst, 0));
        self.conns[id].state = State::Closed;
    }

    /// `close()`: SHUTDOWN both ways; the host answers with an RST.
    pub fn shutdown(&mut self, id: usize) {
        self.ctl.push_back((id, Op::Shutdown, SHUTDOWN_BOTH));
    }

    fn write_header(&mut self, slot: u16, id: usize, op: Op, flags: u32, len: u32) {
        let c = &mut self.conns[id];
        c.last_fwd_sent = c.fwd_cnt;
        let h = guest_pkt(
            op,
            c.local_port,
            c.peer_port,
            len,
            flags,
            GUEST_BUF_ALLOC,
            c.fwd_cnt,
        );
        self.mem
            .write_slice(h.as_bytes(), GuestAddress(Self::hdr_addr(slot)))
            .expect("header in guest memory");
    }

    /// Posts owed control packets, then data as credit, slots and the pacer allow. Returns
    /// (whether anything was posted, whether data is held back only by the pacer).
    fn post_tx(&mut self) -> (bool, bool) {
        let mut posted = false;
        while let Some(&(id, op, flags)) = self.ctl.front() {
            let Some(slot) = self.free_tx.pop() else {
                return (posted, false);
            };
            self.ctl.pop_front();
            if op == Op::CreditUpdate {
                self.update_owed[id] = false;
                self.stats.credit_updates += 1;
            }
            self.write_header(slot, id, op, flags, 0);
            // A header alone: no NEXT.
            self.tx
                .set_desc(2 * slot, Self::hdr_addr(slot), HEADER_LEN as u32, 0, 0);
            self.tx.push(2 * slot);
            self.stats.tx_packets += 1;
            posted = true;
        }
        let mut paced = false;
        let mut idle_rounds = 0;
        while !self.senders.is_empty() && idle_rounds < self.senders.len() {
            if self.free_tx.is_empty() {
                break;
            }
            self.next_sender %= self.senders.len();
            let id = self.senders[self.next_sender];
            let c = &self.conns[id];
            let n = (c.to_send.min(u64::from(c.pkt_size)) as u32).min(c.credit());
            if c.state != State::Established || n == 0 {
                self.next_sender += 1;
                idle_rounds += 1;
                continue;
            }
            if let Some(p) = &mut self.pacer {
                let now = Instant::now();
                if now < p.next {
                    paced = true;
                    break;
                }
                // A late packet does not make the next ones early.
                p.next = (p.next + p.interval).max(now);
            }
            idle_rounds = 0;
            let slot = self.free_tx.pop().expect("checked above");
            self.write_header(slot, id, Op::Rw, 0, n);
            let (h, p) = (2 * slot, 2 * slot + 1);
            self.tx
                .set_desc(h, Self::hdr_addr(slot), HEADER_LEN as u32, DESC_NEXT, p);
            self.tx.set_desc(p, Self::payload_addr(slot), n, 0, 0);
            self.tx.push(h);
            self.stats.tx_packets += 1;
            posted = true;
            let c = &mut self.conns[id];
            c.tx_cnt = c.tx_cnt.wrapping_add(n);
            c.to_send -= u64::from(n);
            if c.to_send == 0 {
                c.sent_all_at = Some(Instant::now());
                self.senders.remove(self.next_sender);
            } else {
                self.next_sender += 1;
            }
        }
        (posted, paced)
    }

    fn owe_update(&mut self, id: usize) {
        if !self.update_owed[id] {
            self.update_owed[id] = true;
            self.ctl.push_back((id, Op::CreditUpdate, 0));
        }
    }

    /// Reads one rx packet and reacts to it.
    fn receive(&mut self, head: u16, len: u32) {
        self.stats.rx_packets += 1;
        let addr = RX_BUFS + u64::from(head) * u64::from(RX_BUF);
        let mut raw = [0u8; HEADER_LEN];
        self.mem
            .read_slice(&mut raw, GuestAddress(addr))
            .expect("rx buffer in guest memory");
        let h = Header::read_from(&raw).expect("a header's worth");
        assert!(len as usize >= HEADER_LEN, "rx buffer of {len} bytes");
        let key = (h.dst_port.get(), h.src_port.get());
        let Some(&id) = self.by_port.get(&key) else {
            if Op::from_u16(h.op.get()) == Some(Op::Request) && self.listening.contains(&key.0) {
                let id = self.new_conn(key.0, key.1, State::Established);
                let c = &mut self.conns[id];
                c.accepted = true;
                c.peer_buf_alloc = h.buf_alloc.get();
                c.peer_fwd_cnt = h.fwd_cnt.get();
                self.accepted += 1;
                self.ctl.push_back((id, Op::Response, 0));
            } else {
                self.stats.stray += 1;
            }
            return;
        };
        let c = &mut self.conns[id];
        if c.state == State::Closed {
            self.stats.stray += 1;
            return;
        }
        c.peer_buf_alloc = h.buf_alloc.get();
        c.peer_fwd_cnt = h.fwd_cnt.get();
        match Op::from_u16(h.op.get()) {
            Some(Op::Response) => c.state = State::Established,
            Some(Op::Rw) => {
                let n = h.len.get();
                assert_eq!(n as usize + HEADER_LEN, len as usize, "used length");
                self.stats.rx_data_packets += 1;
                c.rx_cnt = c.rx_cnt.wrapping_add(n);
                c.received += u64::from(n);
                if c.rx_goal > 0 && c.received >= c.rx_goal && c.rx_done_at.is_none() {
                    c.rx_done_at = Some(Instant::now());
                }
                // The application reads it at once.
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                let seen_free =
                    GUEST_BUF_ALLOC.saturating_sub(c.rx_cnt.wrapping_sub(c.last_fwd_sent));
                if seen_free < MAX_PKT {
                    self.owe_update(id);
                }
            }
            Some(Op::Shutdown) if c.accepted => {
                // The host client closed: so does our server.
                c.state = State::Closed;
                self.ctl.push_back((id, Op::Rst, 0));
                self.by_port.remove(&key);
            }
            Some(Op::Shutdown) if h.flags.get() & SHUTDOWN_BOTH == SHUTDOWN_BOTH => {
                c.state = State::Closed;
                self.ctl.push_back((id, Op::Rst, 0));
            }
            Some(Op::Rst) => {
                c.state = State::Closed;
                c.reset = true;
            }
            Some(Op::CreditRequest) => self.owe_update(id),
            _ => {}
        }
    }

    /// One round: take back used buffers, read rx packets, repost rx buffers, post what is
    /// owed, kick where the device asks. Returns (progress, held back only by the pacer).
    pub fn step(&mut self) -> (bool, bool) {
        let mut progress = false;
        while let Some((head, _)) = self.tx.pop_used() {
            self.free_tx.push(head / 2);
            progress = true;
        }
        while let Some((head, len)) = self.rx.pop_used() {
            self.receive(head, len);
            self.rx.push(head);
            progress = true;
        }
        if self.rx.kick_needed() {
            self.kick(0);
        }
        let (posted, paced) = self.post_tx();
        progress |= posted;
        if self.tx.kick_needed() {
            self.kick(1);
        }
        (progress, paced)
    }

    /// Sleeps until the device interrupts (asking for an interrupt first), unless buffers came
    /// back meanwhile.
    pub fn sleep(&mut self) {
        let want_tx = self.free_tx.is_empty() && (!self.ctl.is_empty() || !self.senders.is_empty());
        let mut arrived = self.rx.enable_interrupts();
        if want_tx {
            arrived |= self.tx.enable_interrupts();
        }
        if arrived {
            return;
        }
        self.stats.sleeps += 1;
        if !self.irq.wait(WAIT) {
            self.stats.timeouts += 1;
        }
    }

    /// Drives the guest until `done` holds.
    ///
    /// # Panics
    ///
    /// If it does not within `limit`.
    pub fn run_until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&Guest) -> bool) {
        let start = Instant::now();
        loop {
            let (progress, paced) = self.step();
            if done(self) {
                return;
            }
            if progress {
                continue;
            }
            assert!(start.elapsed() < limit, "guest gave up waiting for {what}");
            if paced {
                let next = self.pacer.map(|p| p.next).unwrap_or_else(Instant::now);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            } else {
                self.sleep();
            }
        }
    }

    /// Connects to `port` and waits until established.
    ///
    /// # Panics
    ///
    /// If the host refuses (RST) or does not answer within 10 s.
    pub fn connect_wait(&mut self, port: u32) -> usize {
        let id = self.connect(port);
        self.run_until("a RESPONSE", Duration::from_secs(10), |g| {
            g.conns[id].state != State::Connecting
        });
        assert_eq!(
            self.conns[id].state,
            State::Established,
            "connect to {port}"
        );
        id
    }

    /// Forgets a closed socket: packets for its port are strays from now on.
    pub fn forget(&mut self, id: usize) {
        let c = &self.conns[id];
        self.by_port.remove(&(c.local_port, c.peer_port));
    }
}

impl Default for Guest {
    fn default() -> Self {
        Self::new()
    }
}
