//! The `device` target: arbitrary descriptor tables, available rings and packet headers in
//! real guest memory (`GuestMemoryMmap`, `virtio_queue::Queue`), served by `VsockDevice` with
//! host sockets that are real Unix socket pairs.
//!
//! Each round, the fuzzer writes chains (well formed, then mutated: flags, `next` indices,
//! addresses and lengths, indirect tables) and makes them available on the tx, rx and event
//! queues, acts as the host applications (connects, `CONNECT` lines, data), lets time pass,
//! maybe resets, stops or saves and restores the device, and calls `serve` until it has no
//! more work. Checks: no panic; `serve` stops asking to be called again within a bound; every
//! tx chain made available is returned in the used ring, every returned rx or event chain
//! was made available (each at most as often as it was), unless `serve` reported the queue
//! broken.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use arbitrary::Arbitrary;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vsock_core::wire::{Header, HEADER_LEN, HOST_CID};
use vsock_core::{
    Action, Config, ConnId, Direction, Engine, HostEvent, Instant, Io, LineRead, SocketError,
};
use vsock_device::{DeviceError, HostSockets, Queues, VsockDevice};
use zerocopy::IntoBytes;

const GUEST_CID: u64 = 3;
const MEM_SIZE: u64 = 0x2_0000;
/// Queue `q`'s rings: descriptor table, available ring, used ring.
const fn rings(q: usize) -> (u64, u64, u64) {
    let base = q as u64 * 0x1000;
    (base, base + 0x400, base + 0x800)
}
/// Buffers (and indirect tables) go here, allocated round-robin.
const DATA: u64 = 0x4000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A whole run.
#[derive(Arbitrary, Debug)]
pub struct Input {
    queue_size: u8,
    features: u8,
    split_memory: bool,
    config: u8,
    rounds: Vec<Round>,
}

#[derive(Arbitrary, Debug)]
struct Round {
    tx: Vec<ChainSpec>,
    rx: Vec<ChainSpec>,
    event: Vec<ChainSpec>,
    host: Vec<HostOp>,
    advance_ms: u8,
    lifecycle: Lifecycle,
    ring: RingMischief,
}

#[derive(Arbitrary, Debug)]
enum Lifecycle {
    None,
    None2,
    None3,
    Reset,
    Stop,
    SaveRestore,
}

/// Things a hostile driver does to the rings themselves.
#[derive(Arbitrary, Debug)]
enum RingMischief {
    None,
    None2,
    None3,
    /// Moves a queue's available index by this much (possibly far ahead).
    AvailJump {
        queue: u8,
        by: u16,
    },
    /// Writes `used_event` (with EVENT_IDX) or the available ring's flags.
    UsedEvent {
        queue: u8,
        value: u16,
    },
    AvailFlags {
        queue: u8,
        value: u16,
    },
    /// Overwrites a byte of a ring.
    Poke {
        queue: u8,
        offset: u16,
        value: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct ChainSpec {
    content: Content,
    /// Piece sizes (each 1 + value): how the bytes are cut into descriptors.
    cuts: Vec<u8>,
    indirect: bool,
    mutations: Vec<Mutation>,
    /// Post this head instead of the chain's own (possibly out of range).
    head: Option<u16>,
}

#[derive(Arbitrary, Debug)]
enum Content {
    Packet(PacketSpec),
    Packet2(PacketSpec),
    Raw(Vec<u8>),
    /// For rx and event: a writable buffer of this size.
    Buffer(u16),
}

#[derive(Arbitrary, Debug)]
struct PacketSpec {
    op: u8,
    guest_port: u8,
    host_port: u8,
    flags: u8,
    credit: u8,
    fwd_cnt: u32,
    payload: u16,
    /// A `len` that is not the payload's length.
    lie: Option<u32>,
    wrong_cid: bool,
    ty: u8,
    /// Address the packet to the ports of a live connection (by index), if any.
    known: Option<u8>,
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    Flags { desc: u8, flags: u16 },
    Next { desc: u8, next: u16 },
    Addr { desc: u8, addr: u64 },
    AddrNear { desc: u8, offset: u32 },
    Len { desc: u8, len: u32 },
}

#[derive(Arbitrary, Debug)]
enum HostOp {
    /// A host client connects and writes these bytes (a `CONNECT` line when `line` is set).
    Accept { line: Option<u8>, extra: Vec<u8> },
    /// A host application writes to its socket.
    Send { conn: u8, bytes: Vec<u8> },
    /// A host application closes or shuts down its socket.
    Hangup { conn: u8, how: u8 },
    /// The driver tells the engine about readiness.
    Poke,
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Host sockets over Unix socket pairs; the applications' ends are kept here too.
#[derive(Default)]
struct Host {
    socks: BTreeMap<u64, UnixStream>,
    apps: BTreeMap<u64, UnixStream>,
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    (a, b)
}

impl HostSockets for Host {
    fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
        self.socks.get(&conn.to_raw()).map(|s| s.as_fd())
    }

    fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action) {
        let raw = action.conn().to_raw();
        match action {
            Action::Connect { conn, port, .. } => {
                // Even ports have a host service listening.
                if port % 2 == 0 {
                    let (ours, app) = pair();
                    self.socks.insert(raw, ours);
                    self.apps.insert(raw, app);
                    let _ = engine.handle_host_event(now, conn, HostEvent::Connected);
                } else {
                    let _ = engine.handle_host_event(
                        now,
                        conn,
                        HostEvent::ConnectFailed(SocketError(2)),
                    );
                }
            }
            Action::ReadConnectLine { conn, max } => {
                let mut buf = vec![0u8; max];
                let Some(sock) = self.socks.get_mut(&raw) else {
                    let _ = engine.handle_connect_line(now, conn, LineRead::Error(SocketError(9)));
                    return;
                };
                let r = sock.read(&mut buf);
                let read = match &r {
                    Ok(0) => LineRead::Eof,
                    Ok(n) => LineRead::Data(&buf[..*n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => LineRead::WouldBlock,
                    Err(e) => LineRead::Error(SocketError::from(e)),
                };
                let _ = engine.handle_connect_line(now, conn, read);
            }
            Action::Flush { conn } => {
                let Ok([a, b]) = engine.host_bytes(conn) else {
                    return;
                };
                let r = match self.socks.get_mut(&raw) {
                    Some(s) => s.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]),
                    None => Err(std::io::Error::from_raw_os_error(9)),
                };
                let _ = engine.handle_host_write(now, conn, Io::from_result(&r));
            }
            Action::Shutdown { direction, .. } => {
                if let Some(s) = self.socks.get(&raw) {
                    let _ = s.shutdown(match direction {
                        Direction::Read => Shutdown::Read,
                        Direction::Write => Shutdown::Write,
                    });
                }
            }
            Action::Interest { .. } => {}
            Action::Close { .. } => {
                self.socks.remove(&raw);
            }
        }
    }
}

struct Bed {
    mem: GuestMemoryMmap,
    size: u16,
    features: u64,
    device: VsockDevice,
    queues: [Queue; 3],
    host: Host,
    now: Instant,
    /// The driver's available index per queue.
    avail_idx: [u16; 3],
    /// Used entries read back so far per queue.
    used_seen: [u16; 3],
    /// Chains made available and not returned, by head, per queue.
    outstanding: [BTreeMap<u16, usize>; 3],
    /// Tx heads in range made available since the last check.
    tx_due: usize,
    /// The next descriptor slot per queue, and the next free data address.
    next_slot: [u16; 3],
    next_data: u64,
    /// A queue reported broken: stop.
    broken: bool,
    seq: u32,
}

fn queue(size: u16, q: usize, event_idx: bool) -> Queue {
    let (desc, avail, used) = rings(q);
    let mut queue = Queue::new(size).expect("queue size");
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

impl Bed {
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.max(1);
        if self.next_data + len > MEM_SIZE {
            self.next_data = DATA;
        }
        let at = self.next_data;
        self.next_data = (at + len).next_multiple_of(8);
        at
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        // Hostile addresses may lie outside guest memory: the driver's write is then lost.
        let _ = self.mem.write_slice(bytes, GuestAddress(addr));
    }

    fn write_desc(&self, at: u64, d: &Desc) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
        raw[14..].copy_from_slice(&d.next.to_le_bytes());
        self.write(at, &raw);
    }

    fn packet(&mut self, p: &PacketSpec) -> Vec<u8> {
        self.seq += 1;
        let payload = p.payload as usize % 9000;
        // Data weighs more: it is what reaches the sockets.
        let op = [0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8][p.op as usize % 11];
        let known = p.known.and_then(|k| {
            let keys: Vec<u64> = self.host.socks.keys().copied().collect();
            let key = *keys.get(k as usize % keys.len().max(1))?;
            self.device.engine().conn_ports(ConnId::from_raw(key))
        });
        let len = p.lie.unwrap_or(if op == 5 { payload as u32 } else { 0 });
        let header = Header {
            src_cid: if p.wrong_cid { 7u64 } else { GUEST_CID }.into(),
            dst_cid: HOST_CID.into(),
            src_port: known
                .map_or(1000 + u32::from(p.guest_port % 4), |k| k.0)
                .into(),
            dst_port: known
                .map_or(
                    if p.host_port & 0x80 != 0 {
                        // A host-initiated connection's port.
                        (1u32 << 30) + u32::from(p.host_port % 4)
                    } else {
                        5000 + u32::from(p.host_port % 4)
                    },
                    |k| k.1,
                )
                .into(),
            len: len.into(),
            type_: u16::from(1 + p.ty % 8 / 7).into(),
            op: op.into(),
            flags: u32::from(p.flags % 4).into(),
            buf_alloc: (u32::from(p.credit) << 10).into(),
            fwd_cnt: p.fwd_cnt.into(),
        };
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend((0..payload).map(|i| (self.seq as usize * 13 + i) as u8));
        bytes
    }

    /// Builds a chain in the table (or an indirect table) of queue `q` and makes it available.
    fn post(&mut self, q: usize, spec: &ChainSpec) {
        let writable = q != 1;
        let bytes = match &spec.content {
            Content::Packet(p) | Content::Packet2(p) => self.packet(p),
            Content::Raw(b) => b.clone(),
            Content::Buffer(n) => vec![0; *n as usize % 8192],
        };
        // Cut into pieces.
        let mut pieces = Vec::new();
        let mut at = 0;
        let mut cuts = spec.cuts.iter();
        while at < bytes.len() || pieces.is_empty() {
            let n = cuts.next().map_or(bytes.len() - at, |&c| 1 + c as usize);
            let n = n.min(bytes.len() - at);
            pieces.push((at, n));
            at += n;
            if pieces.len() >= 64 {
                let last = pieces.len() - 1;
                pieces[last].1 += bytes.len() - at;
                break;
            }
        }
        let flag = if writable { F_WRITE } else { 0 };
        let count = pieces.len();
        let mut descs: Vec<Desc> = Vec::with_capacity(count);
        let slots: Vec<u16> = (0..count)
            .map(|i| (self.next_slot[q] + i as u16) % self.size)
            .collect();
        for (i, &(off, n)) in pieces.iter().enumerate() {
            let addr = self.alloc(n as u64);
            if !writable {
                self.write(addr, &bytes[off..off + n]);
            }
            let last = i + 1 == count;
            let next = if spec.indirect {
                (i + 1) as u16
            } else {
                slots.get(i + 1).copied().unwrap_or(0)
            };
            descs.push(Desc {
                addr,
                len: n as u32,
                flags: flag | if last { 0 } else { F_NEXT },
                next: if last { 0 } else { next },
            });
        }
        for m in &spec.mutations {
            let pick = |d: u8| d as usize % count;
            match *m {
                Mutation::Flags { desc, flags } => descs[pick(desc)].flags = flags,
                Mutation::Next { desc, next } => descs[pick(desc)].next = next,
                Mutation::Addr { desc, addr } => descs[pick(desc)].addr = addr,
                Mutation::AddrNear { desc, offset } => {
                    descs[pick(desc)].addr = MEM_SIZE - u64::from(offset % 0x2000)
                }
                Mutation::Len { desc, len } => descs[pick(desc)].len = len,
            }
        }
        let (table, _, _) = rings(q);
        let head = if spec.indirect {
            let table_at = self.alloc(16 * count as u64);
            for (i, d) in descs.iter().enumerate() {
                self.write_desc(table_at + 16 * i as u64, d);
            }
            let slot = self.next_slot[q];
            self.next_slot[q] = (slot + 1) % self.size;
            self.write_desc(
                table + 16 * u64::from(slot),
                &Desc {
                    addr: table_at,
                    len: 16 * count as u32,
                    flags: F_INDIRECT | if writable { F_WRITE } else { 0 },
                    next: 0,
                },
            );
            slot
        } else {
            for (d, &slot) in descs.iter().zip(&slots) {
                self.write_desc(table + 16 * u64::from(slot), d);
            }
            self.next_slot[q] = (self.next_slot[q] + count as u16) % self.size;
            slots[0]
        };
        let head = spec.head.unwrap_or(head);
        self.make_available(q, head);
    }

    fn make_available(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let slot = avail + 4 + 2 * u64::from(self.avail_idx[q] % self.size);
        self.write(slot, &head.to_le_bytes());
        self.avail_idx[q] = self.avail_idx[q].wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write(avail + 2, &self.avail_idx[q].to_le_bytes());
        if head < self.size {
            *self.outstanding[q].entry(head).or_default() += 1;
            if q == 1 {
                self.tx_due += 1;
            }
        }
    }

    /// How many more chains queue `q` may have made available without running more than a
    /// queue ahead of the device.
    fn room(&self, q: usize) -> usize {
        let held: usize = self.outstanding[q].values().sum();
        (self.size as usize).saturating_sub(held)
    }

    fn read_u16(&self, addr: u64) -> u16 {
        self.mem.read_obj(GuestAddress(addr)).unwrap_or(0)
    }

    /// Reads back the used entries the device added, checking each names a chain that was
    /// made available.
    fn collect_used(&mut self) {
        for q in 0..3 {
            let (_, _, used) = rings(q);
            let idx = self.read_u16(used + 2);
            let added = idx.wrapping_sub(self.used_seen[q]);
            assert!(
                added <= self.size,
                "queue {q}: used index moved by {added} with {} descriptors",
                self.size
            );
            for k in 0..added {
                let slot = self.used_seen[q].wrapping_add(k) % self.size;
                let entry = used + 4 + 8 * u64::from(slot);
                let id: u32 = self.mem.read_obj(GuestAddress(entry)).unwrap_or(u32::MAX);
                let len: u32 = self.mem.read_obj(GuestAddress(entry + 4)).unwrap_or(0);
                let head = u16::try_from(id).expect("a used id that is no head");
                let count = self.outstanding[q]
                    .get_mut(&head)
                    .unwrap_or_else(|| panic!("queue {q}: head {head} returned but not available"));
                *count -= 1;
                if *count == 0 {
                    self.outstanding[q].remove(&head);
                }
                match q {
                    1 => assert_eq!(len, 0, "a tx chain returned with a length"),
                    2 => assert!(len == 0 || len == 4, "event length {len}"),
                    _ => assert!(len == 0 || len as usize >= HEADER_LEN, "rx length {len}"),
                }
            }
            self.used_seen[q] = idx;
        }
    }

    /// Serves until the device has no more work; checks that every tx chain came back.
    fn serve(&mut self) {
        if self.broken {
            return;
        }
        for call in 0.. {
            assert!(call < 32, "serve still has more work after 32 calls");
            let [rx, tx, event] = &mut self.queues;
            let r = self.device.serve(
                self.now,
                &self.mem,
                Queues { rx, tx, event },
                &mut self.host,
            );
            match r {
                Ok(served) => {
                    if !served.more {
                        break;
                    }
                }
                Err(DeviceError::NotActivated) => return,
                Err(DeviceError::Queue(_)) => {
                    self.broken = true;
                    return;
                }
                Err(e) => panic!("serve failed: {e}"),
            }
        }
        self.collect_used();
        let held: usize = self.outstanding[1].values().sum();
        assert_eq!(
            held, 0,
            "tx chains made available but not returned: {:?}",
            self.outstanding[1]
        );
        self.tx_due = 0;
    }

    fn activate(&mut self) {
        // Fresh rings: the driver starts over.
        for q in 0..3 {
            let (desc, _, _) = rings(q);
            self.write(desc, &[0; 0x1000]);
        }
        self.avail_idx = [0; 3];
        self.used_seen = [0; 3];
        self.outstanding = Default::default();
        self.tx_due = 0;
        self.device
            .ack_features(self.features)
            .expect("offered features");
        self.queues = [0, 1, 2].map(|q| queue(self.size, q, false));
        let [rx, tx, event] = &mut self.queues;
        self.device.activate(Queues { rx, tx, event });
    }

    fn host_op(&mut self, op: &HostOp) {
        let now = self.now;
        match op {
            HostOp::Accept { line, extra } => {
                let engine = self.device.engine_mut();
                let Ok(conn) = engine.handle_accept(now) else {
                    return;
                };
                let (ours, mut app) = pair();
                if let Some(port) = line {
                    let _ = writeln!(app, "CONNECT {}", 1000 + u32::from(port % 4));
                }
                let _ = app.write(extra);
                self.host.socks.insert(conn.to_raw(), ours);
                self.host.apps.insert(conn.to_raw(), app);
                let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
            }
            HostOp::Send { conn, bytes } => {
                if let Some(app) = self.nth_app(*conn) {
                    let _ = app.write(bytes);
                }
            }
            HostOp::Hangup { conn, how } => {
                let key = self.nth_key(*conn);
                if let Some(key) = key {
                    match how % 3 {
                        0 => {
                            self.host.apps.remove(&key);
                        }
                        1 => {
                            let _ = self.host.apps[&key].shutdown(Shutdown::Write);
                        }
                        _ => {
                            let _ = self.host.apps[&key].shutdown(Shutdown::Read);
                        }
                    }
                }
            }
            HostOp::Poke => self.poke(),
        }
    }

    fn nth_key(&self, n: u8) -> Option<u64> {
        let len = self.host.apps.len();
        (len > 0).then(|| *self.host.apps.keys().nth(n as usize % len).unwrap())
    }

    fn nth_app(&mut self, n: u8) -> Option<&mut UnixStream> {
        let key = self.nth_key(n)?;
        self.host.apps.get_mut(&key)
    }

    /// Readiness for every socket (spurious readiness is harmless), and the applications read
    /// what the device wrote so that their sockets never fill.
    fn poke(&mut self) {
        let now = self.now;
        let mut buf = [0u8; 4096];
        for app in self.host.apps.values_mut() {
            for _ in 0..64 {
                match app.read(&mut buf) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        let engine = self.device.engine_mut();
        for &raw in self.host.socks.keys() {
            let conn = ConnId::from_raw(raw);
            let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
            let _ = engine.handle_host_event(now, conn, HostEvent::Writable);
        }
    }

    fn round(&mut self, round: &Round) {
        for (q, chains) in [(1, &round.tx), (0, &round.rx), (2, &round.event)] {
            for spec in chains.iter().take(self.size as usize) {
                if self.room(q) == 0 {
                    break;
                }
                self.post(q, spec);
            }
        }
        match round.ring {
            RingMischief::None | RingMischief::None2 | RingMischief::None3 => {}
            RingMischief::AvailJump { queue, by } => {
                let q = queue as usize % 3;
                let (_, avail, _) = rings(q);
                self.avail_idx[q] = self.avail_idx[q].wrapping_add(by);
                self.write(avail + 2, &self.avail_idx[q].to_le_bytes());
                // The chains the jump claims are whatever the ring holds: no promise about
                // them any more.
                self.outstanding[q].clear();
                self.broken_expected();
            }
            RingMischief::UsedEvent { queue, value } => {
                let q = queue as usize % 3;
                let (_, avail, _) = rings(q);
                self.write(avail + 4 + 2 * u64::from(self.size), &value.to_le_bytes());
            }
            RingMischief::AvailFlags { queue, value } => {
                let (_, avail, _) = rings(queue as usize % 3);
                self.write(avail, &value.to_le_bytes());
            }
            RingMischief::Poke {
                queue,
                offset,
                value,
            } => {
                let q = queue as usize % 3;
                let (desc, _, _) = rings(q);
                self.write(desc + u64::from(offset % 0x1000), &[value]);
                // The rings themselves changed under the device: the used-ring promise is off.
                self.broken_expected();
            }
        }
        for op in &round.host {
            self.host_op(op);
        }
        self.now = self.now + Duration::from_millis(u64::from(round.advance_ms));
        self.device.engine_mut().handle_timeout(self.now);
        self.serve();
        if self.broken {
            return;
        }
        match round.lifecycle {
            Lifecycle::None | Lifecycle::None2 | Lifecycle::None3 => {}
            Lifecycle::Reset => {
                self.device.reset(self.now);
                self.serve();
                self.activate();
            }
            Lifecycle::Stop => {
                self.device.stop(self.now);
                let _ = self.device.perform_actions(self.now, &mut self.host);
                self.activate();
            }
            Lifecycle::SaveRestore => {
                let [rx, tx, event] = &mut self.queues;
                let state = self.device.save(&Queues { rx, tx, event });
                match self.device.restore(self.now, &state) {
                    Ok(queues) => self.queues = queues,
                    Err(e) => panic!("restoring a state just saved: {e}"),
                }
            }
        }
        self.poke();
        self.serve();
    }

    /// The driver broke the rings on purpose: from now on only "no panic, serve ends" holds.
    fn broken_expected(&mut self) {
        self.broken = true;
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let _ = reached(input);
}

/// Runs one input; returns the device's and the engine's counters after it, for choosing
/// seeds.
pub fn reached(input: &Input) -> (vsock_device::DeviceStats, vsock_core::Stats) {
    let size = 1u16 << (input.queue_size % 5);
    let mut config = Config::new(GUEST_CID);
    config.buffer_size = [64, 4096, 65536][input.config as usize % 3];
    config.max_packet_payload = [16, 4096][(input.config as usize / 3) % 2];
    config.max_connections = 1 + (input.config as usize / 6) % 4;
    config.credit_update_threshold = config.buffer_size / 2;
    config.max_pending_resets = 4;
    config.pooled_buffers = 1;
    config.connect_timeout = Duration::from_millis(20);
    config.close_timeout = Duration::from_millis(50);
    config.connect_line_timeout = Duration::from_millis(30);
    let now = Instant::from_secs(1);
    let device = VsockDevice::new(config, now).expect("valid configuration");
    let offered = device.features();
    // Any subset of what is offered that includes stream sockets.
    let mut features = offered & !(u64::from(input.features) << 28 | u64::from(input.features & 3));
    features |= 1; // VIRTIO_VSOCK_F_STREAM
    let regions: &[(GuestAddress, usize)] = if input.split_memory {
        &[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), (MEM_SIZE - 0x1_0000) as usize),
        ]
    } else {
        &[(GuestAddress(0), MEM_SIZE as usize)]
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(regions).expect("guest memory");
    let mut bed = Bed {
        mem,
        size,
        features,
        device,
        queues: [0, 1, 2].map(|q| queue(size, q, false)),
        host: Host::default(),
        now,
        avail_idx: [0; 3],
        used_seen: [0; 3],
        outstanding: Default::default(),
        tx_due: 0,
        next_slot: [0; 3],
        next_data: DATA,
        broken: false,
        seq: 0,
    };
    bed.activate();
    for round in &input.rounds {
        bed.round(round);
        if bed.broken {
            // Keep serving the broken rings: it must end, and not panic.
            for _ in 0..4 {
                let [rx, tx, event] = &mut bed.queues;
                let _ =
                    bed.device
                        .serve(bed.now, &bed.mem, Queues { rx, tx, event }, &mut bed.host);
            }
            break;
        }
    }
    (
        bed.device.stats().clone(),
        bed.device.engine().stats().clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(op: u8, payload: u16) -> ChainSpec {
        ChainSpec {
            content: Content::Packet(PacketSpec {
                op,
                guest_port: 0,
                host_port: 0,
                flags: 0,
                credit: 64,
                fwd_cnt: 0,
                payload,
                lie: None,
                wrong_cid: false,
                ty: 0,
                known: None,
            }),
            cuts: vec![],
            indirect: false,
            mutations: vec![],
            head: None,
        }
    }

    fn buffer() -> ChainSpec {
        ChainSpec {
            content: Content::Buffer(4096),
            cuts: vec![],
            indirect: false,
            mutations: vec![],
            head: None,
        }
    }

    fn round(tx: Vec<ChainSpec>, rx: Vec<ChainSpec>) -> Round {
        Round {
            tx,
            rx,
            event: vec![],
            host: vec![HostOp::Poke],
            advance_ms: 1,
            lifecycle: Lifecycle::None,
            ring: RingMischief::None,
        }
    }

    /// The harness itself: a guest connects to a listening port and sends data, which reaches
    /// the host socket.
    #[test]
    fn data_reaches_the_host() {
        let input = Input {
            queue_size: 3,
            features: 0,
            split_memory: false,
            config: 1,
            rounds: vec![
                round(vec![packet(1, 0)], vec![buffer(), buffer()]),
                round(vec![packet(5, 100)], vec![buffer()]),
            ],
        };
        let (device, engine) = reached(&input);
        assert_eq!(engine.established, 1, "{device:?} {engine:?}");
        assert_eq!(engine.tx_bytes, 100, "{device:?} {engine:?}");
    }
}
