//! The driver side of the three virtqueues, for tests: a split-ring driver over a
//! `GuestMemoryMmap`, written the way a guest driver writes rings (descriptor table, available
//! ring with `used_event`, used ring read back), with the buffer layouts a real driver might
//! use and the malformed ones a hostile one might.
//!
//! It moves packets only; the vsock protocol on top (connections, credit) is the test's.
//! Enabled by the `test-utils` feature.

use std::collections::VecDeque;

mod guest;
pub use guest::Guest;

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vsock_core::wire::{Header, HEADER_LEN};
use zerocopy::IntoBytes;

/// Size of each queue (the default; see [`Driver::with_queue_size`]).
pub const QUEUE_SIZE: u16 = 256;
/// Linux's rx buffer size (header included).
pub const RX_BUF_SIZE: u32 = 4096;
/// Bytes reserved in guest memory per buffer slot (with the default queue size).
const SLOT: u64 = 128 * 1024;
/// Where the rings of queue `q` start.
const RINGS: u64 = 0x10_0000;
/// Guest memory no ring or buffer slot uses, free for tests to build raw indirect tables and
/// buffers in (up to [`SCRATCH_END`]).
pub const SCRATCH: u64 = 0x80_0000;
/// The end of the scratch area.
pub const SCRATCH_END: u64 = SLOTS;
/// Where buffer slots start; `QUEUE_SIZE` slots per queue.
const SLOTS: u64 = 0x100_0000;
/// Guest memory size: rings, then a slot per descriptor of each queue (default geometry).
pub const MEM_SIZE: u64 = SLOTS + 3 * QUEUE_SIZE as u64 * SLOT;

/// How a driver lays a buffer out in descriptors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One descriptor for everything.
    Single,
    /// The header in one descriptor, the rest in another (older Linux drivers).
    HeaderThenData,
    /// Pieces cut at these offsets, each in its own descriptor, placed apart in memory.
    Cuts(Vec<usize>),
    /// One descriptor per byte (many tiny descriptors).
    Bytewise,
    /// This layout, through an indirect descriptor table.
    Indirect(Box<Layout>),
}

impl Layout {
    fn pieces(&self, len: usize) -> Vec<(usize, usize)> {
        let cuts: Vec<usize> = match self {
            Layout::Single => vec![],
            Layout::HeaderThenData => vec![HEADER_LEN.min(len)],
            Layout::Cuts(c) => c.clone(),
            Layout::Bytewise => (1..len).collect(),
            Layout::Indirect(inner) => return inner.pieces(len),
        };
        let mut points: Vec<usize> = cuts.into_iter().filter(|&c| c > 0 && c < len).collect();
        points.sort_unstable();
        points.dedup();
        let mut out = Vec::new();
        let mut start = 0;
        for p in points.into_iter().chain(std::iter::once(len)) {
            out.push((start, p - start));
            start = p;
        }
        if out.is_empty() {
            out.push((0, 0));
        }
        out
    }
}

/// A raw descriptor, for building malformed chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// `VRING_DESC_F_*` flags (`NEXT` is set by the driver for all but the last).
    pub flags: u16,
}

/// One queue as the driver sees it.
pub struct DriverQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: VecDeque<u16>,
    avail_idx: u16,
    last_used: u16,
    /// Head index to (descriptors of the chain, buffer slot, total writable length).
    inflight: Vec<Option<(Vec<u16>, u64)>>,
}

/// A used buffer the driver took back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Used {
    /// The chain's head descriptor.
    pub head: u16,
    /// The length the device wrote.
    pub len: u32,
    /// For rx: the bytes the device wrote (header and payload), read back through the chain.
    pub bytes: Vec<u8>,
}

/// The driver side of a vsock device's rx, tx and event queues.
pub struct Driver {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// rx (0), tx (1), event (2).
    pub queues: [DriverQueue; 3],
    /// Layouts of the chain pieces, by head, to read rx buffers back.
    pieces: [Vec<Vec<(u64, u32)>>; 3],
    /// Bytes of guest memory per buffer slot.
    slot: u64,
}

impl Driver {
    /// Fresh guest memory with three empty queues.
    pub fn new() -> Driver {
        Self::build(QUEUE_SIZE, SLOT, None)
    }

    /// Fresh guest memory with three empty queues of `size` descriptors each (a power of two,
    /// at most 8192). Buffer slots shrink so that guest memory stays about the same size.
    pub fn with_queue_size(size: u16) -> Driver {
        let slot = (SLOT * QUEUE_SIZE as u64 / size as u64).clamp(8 * 1024, SLOT);
        Self::build(size, slot, None)
    }

    /// Like [`new`](Self::new), but guest memory is two adjacent regions, the second starting
    /// at `split` (so a buffer placed across `split` spans both).
    pub fn with_split_memory(split: u64) -> Driver {
        Self::build(QUEUE_SIZE, SLOT, Some(split))
    }

    fn build(size: u16, slot: u64, split: Option<u64>) -> Driver {
        assert!(size.is_power_of_two() && size <= 8192, "queue size {size}");
        let mem_size = SLOTS + 3 * size as u64 * slot;
        let mem = match split {
            None => GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)]),
            Some(at) => {
                assert!(at > 0 && at < mem_size, "split inside guest memory");
                GuestMemoryMmap::<()>::from_ranges(&[
                    (GuestAddress(0), at as usize),
                    (GuestAddress(at), (mem_size - at) as usize),
                ])
            }
        }
        .expect("guest memory");
        let n = size as u64;
        // Descriptor table, then the available ring, then the used ring on its own page.
        let used_off = (16 * n + 6 + 2 * n).next_multiple_of(0x1000).max(0x8000);
        let stride = (used_off + 6 + 8 * n).next_multiple_of(0x1_0000);
        let queues = [0u16, 1, 2].map(|q| {
            let base = RINGS + q as u64 * stride;
            DriverQueue {
                index: q,
                size,
                desc: base,
                avail: base + 16 * n,
                used: base + used_off,
                free: (0..size).collect(),
                avail_idx: 0,
                last_used: 0,
                inflight: vec![None; size as usize],
            }
        });
        assert!(
            RINGS + 3 * stride <= SCRATCH,
            "rings fit below the scratch area"
        );
        Driver {
            mem,
            queues,
            pieces: std::array::from_fn(|_| vec![Vec::new(); size as usize]),
            slot,
        }
    }

    /// The device's view of queue `q`, configured as the driver set it up.
    pub fn device_queue(&self, q: usize, event_idx: bool) -> Queue {
        let dq = &self.queues[q];
        let mut queue = Queue::new(dq.size).expect("queue");
        queue.set_size(dq.size);
        queue.set_desc_table_address(Some(dq.desc as u32), Some((dq.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(dq.avail as u32), Some((dq.avail >> 32) as u32));
        queue.set_used_ring_address(Some(dq.used as u32), Some((dq.used >> 32) as u32));
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue
    }

    /// The three device queues (rx, tx, event).
    pub fn device_queues(&self, event_idx: bool) -> [Queue; 3] {
        [0, 1, 2].map(|q| self.device_queue(q, event_idx))
    }

    /// Free descriptors of queue `q`.
    pub fn free_descriptors(&self, q: usize) -> usize {
        self.queues[q].free.len()
    }

    /// Buffers of queue `q` the device holds (posted and not returned).
    pub fn in_flight(&self, q: usize) -> usize {
        self.queues[q]
            .inflight
            .iter()
            .filter(|i| i.is_some())
            .count()
    }

    fn slot(&self, q: usize, head: u16) -> u64 {
        SLOTS + (q as u64 * self.queues[q].size as u64 + head as u64) * self.slot
    }

    /// The guest address of the buffer slot of descriptor `head` of queue `q` (where
    /// [`post_rx`](Self::post_rx) and [`send`](Self::send) place a chain headed there).
    pub fn slot_addr(&self, q: usize, head: u16) -> u64 {
        self.slot(q, head)
    }

    /// The size of every queue.
    pub fn queue_size(&self) -> u16 {
        self.queues[0].size
    }

    /// Guest addresses of queue `q`'s descriptor table, available ring and used ring.
    pub fn ring_addrs(&self, q: usize) -> (u64, u64, u64) {
        let dq = &self.queues[q];
        (dq.desc, dq.avail, dq.used)
    }

    /// The descriptor indices of an in-flight chain of queue `q` posted with head `head`.
    pub fn chain(&self, q: usize, head: u16) -> Option<&[u16]> {
        self.queues[q].inflight[head as usize]
            .as_ref()
            .map(|(ids, _)| ids.as_slice())
    }

    /// Overwrites descriptor `index` of queue `q`'s table exactly as given: flags are not
    /// touched and `next` is written as is (for loops and indices out of range).
    pub fn write_desc(&self, q: usize, index: u16, desc: RawDesc, next: u16) {
        let at = self.queues[q].desc + 16 * index as u64;
        self.mem.write_obj(desc.addr, GuestAddress(at)).unwrap();
        self.mem.write_obj(desc.len, GuestAddress(at + 8)).unwrap();
        self.mem
            .write_obj(desc.flags, GuestAddress(at + 12))
            .unwrap();
        self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Writes a raw indirect table of `entries` (descriptor and `next`, exactly as given) at
    /// `addr`, returning the table's length in bytes.
    pub fn write_table(&self, addr: u64, entries: &[(RawDesc, u16)]) -> u32 {
        for (i, (d, next)) in entries.iter().enumerate() {
            let e = addr + 16 * i as u64;
            self.mem.write_obj(d.addr, GuestAddress(e)).unwrap();
            self.mem.write_obj(d.len, GuestAddress(e + 8)).unwrap();
            self.mem.write_obj(d.flags, GuestAddress(e + 12)).unwrap();
            self.mem.write_obj(*next, GuestAddress(e + 14)).unwrap();
        }
        16 * entries.len() as u32
    }

    /// Makes `head` available on queue `q` as is, with no bookkeeping: for heads out of range
    /// or not built by this driver. [`take_used`](Self::take_used) panics if the device
    /// returns it.
    pub fn post_head(&mut self, q: usize, head: u16) {
        let dq = &mut self.queues[q];
        let slot_at = dq.avail + 4 + 2 * (dq.avail_idx % dq.size) as u64;
        self.mem.write_obj(head, GuestAddress(slot_at)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(dq.avail_idx, GuestAddress(dq.avail + 2))
            .unwrap();
    }

    /// The used ring's index as the device last published it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[q].used + 2))
            .unwrap()
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[q].used))
            .unwrap()
    }

    /// Writes the available ring's `used_event`: the used index after which the driver
    /// wants an interrupt (EVENT_IDX).
    pub fn set_used_event(&self, q: usize, used_event: u16) {
        let dq = &self.queues[q];
        self.mem
            .write_obj(used_event, GuestAddress(dq.avail + 4 + 2 * dq.size as u64))
            .unwrap();
    }

    /// Forgets every buffer of queue `q` and starts over from where the device's `queue`
    /// stands, as a driver recovering its rings would: every descriptor free, the available
    /// and used indices rewritten to the device's positions.
    pub fn resync(&mut self, q: usize, queue: &Queue) {
        let dq = &mut self.queues[q];
        dq.free = (0..dq.size).collect();
        dq.inflight.iter_mut().for_each(|i| *i = None);
        dq.avail_idx = queue.next_avail();
        dq.last_used = queue.next_used();
        let (avail, used, size) = (dq.avail, dq.used, dq.size as u64);
        let (avail_idx, last_used) = (dq.avail_idx, dq.last_used);
        self.pieces[q].iter_mut().for_each(Vec::clear);
        self.mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        self.mem
            .write_obj(avail_idx, GuestAddress(avail + 2))
            .unwrap();
        self.mem
            .write_obj(last_used, GuestAddress(avail + 4 + 2 * size))
            .unwrap();
        self.mem
            .write_obj(last_used, GuestAddress(used + 2))
            .unwrap();
    }

    /// Posts a chain on queue `q` built from `descs` (NEXT flags and links added), returning
    /// its head, or `None` if there are not enough free descriptors.
    pub fn post_raw(&mut self, q: usize, descs: &[RawDesc]) -> Option<u16> {
        let dq = &mut self.queues[q];
        if dq.free.len() < descs.len().max(1) {
            return None;
        }
        let ids: Vec<u16> = (0..descs.len().max(1))
            .map(|_| dq.free.pop_front().unwrap())
            .collect();
        for (i, d) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last {
                d.flags
            } else {
                d.flags | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { ids[i + 1] };
            let at = dq.desc + 16 * ids[i] as u64;
            self.mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        let head = ids[0];
        dq.inflight[head as usize] = Some((ids, 0));
        let slot_at = dq.avail + 4 + 2 * (dq.avail_idx % dq.size) as u64;
        self.mem.write_obj(head, GuestAddress(slot_at)).unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem
            .write_obj(dq.avail_idx, GuestAddress(dq.avail + 2))
            .unwrap();
        Some(head)
    }

    /// Posts a buffer of `bytes` (tx, readable) or of `len` writable bytes (rx, event) in the
    /// given layout. Returns the head, or `None` if the queue is full.
    fn post(&mut self, q: usize, layout: &Layout, bytes: Option<&[u8]>, len: usize) -> Option<u16> {
        let head = *self.queues[q].free.front()?;
        let slot = self.slot(q, head);
        let pieces = layout.pieces(len);
        // Place pieces apart from each other, so no two are contiguous.
        let mut descs = Vec::new();
        let mut at = slot;
        let flags = if bytes.is_some() {
            0
        } else {
            VRING_DESC_F_WRITE as u16
        };
        let mut piece_map = Vec::new();
        for &(start, n) in &pieces {
            if let Some(b) = bytes {
                self.mem
                    .write_slice(&b[start..start + n], GuestAddress(at))
                    .unwrap();
            }
            descs.push(RawDesc {
                addr: at,
                len: n as u32,
                flags,
            });
            piece_map.push((at, n as u32));
            at += n as u64 + 8;
        }
        if at - slot + 16 * descs.len() as u64 + 16 > self.slot {
            panic!("buffer too large for a slot");
        }
        let head = if let Layout::Indirect(_) = layout {
            // The table lives in the slot after the data.
            let table = (at + 15) & !15;
            for (i, d) in descs.iter().enumerate() {
                let last = i + 1 == descs.len();
                let e = table + 16 * i as u64;
                let f = if last {
                    d.flags
                } else {
                    d.flags | VRING_DESC_F_NEXT as u16
                };
                self.mem.write_obj(d.addr, GuestAddress(e)).unwrap();
                self.mem.write_obj(d.len, GuestAddress(e + 8)).unwrap();
                self.mem.write_obj(f, GuestAddress(e + 12)).unwrap();
                self.mem
                    .write_obj(if last { 0u16 } else { i as u16 + 1 }, GuestAddress(e + 14))
                    .unwrap();
            }
            self.post_raw(
                q,
                &[RawDesc {
                    addr: table,
                    len: 16 * descs.len() as u32,
                    flags: VRING_DESC_F_INDIRECT as u16,
                }],
            )?
        } else {
            self.post_raw(q, &descs)?
        };
        self.pieces[q][head as usize] = piece_map;
        Some(head)
    }

    /// Posts a tx packet: `header` then `payload`, in `layout`.
    pub fn send(&mut self, header: &Header, payload: &[u8], layout: &Layout) -> Option<u16> {
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.post(1, layout, Some(&bytes), bytes.len())
    }

    /// Posts an rx buffer of `len` writable bytes in `layout`.
    pub fn post_rx(&mut self, len: usize, layout: &Layout) -> Option<u16> {
        self.post(0, layout, None, len)
    }

    /// Posts an event buffer.
    pub fn post_event(&mut self) -> Option<u16> {
        self.post(2, &Layout::Single, None, 4)
    }

    /// Takes back every used buffer of queue `q`, in order, reading rx/event contents.
    pub fn take_used(&mut self, q: usize) -> Vec<Used> {
        let mut out = Vec::new();
        loop {
            let dq = &self.queues[q];
            let used_idx: u16 = self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap();
            if used_idx == dq.last_used {
                break;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let e = dq.used + 4 + 8 * (dq.last_used % dq.size) as u64;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let head = id as u16;
            let dq = &mut self.queues[q];
            dq.last_used = dq.last_used.wrapping_add(1);
            let (ids, _) = dq.inflight[head as usize].take().unwrap_or_else(|| {
                panic!("device used head {head} of queue {q} twice or never posted")
            });
            dq.free.extend(ids);
            let mut bytes = Vec::new();
            if q != 1 {
                let mut left = len as usize;
                for &(addr, n) in &self.pieces[q][head as usize] {
                    let k = left.min(n as usize);
                    let mut buf = vec![0u8; k];
                    self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
                    bytes.extend(buf);
                    left -= k;
                }
            }
            out.push(Used { head, len, bytes });
        }
        // Ask to be notified of the next used entry (Linux's default).
        let dq = &self.queues[q];
        self.mem
            .write_obj(
                dq.last_used,
                GuestAddress(dq.avail + 4 + 2 * dq.size as u64),
            )
            .unwrap();
        out
    }

    /// The used ring's `avail_event`: the avail index at which the device wants a kick.
    pub fn avail_event(&self, q: usize) -> u16 {
        let dq = &self.queues[q];
        self.mem
            .read_obj(GuestAddress(dq.used + 4 + 8 * dq.size as u64))
            .unwrap()
    }

    /// Whether the device asked to be kicked for the buffers posted so far (EVENT_IDX rule).
    pub fn kick_needed(&self, q: usize, posted_since: u16) -> bool {
        let dq = &self.queues[q];
        let event = self.avail_event(q);
        let new = dq.avail_idx;
        let old = new.wrapping_sub(posted_since);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// The queue's index.
    pub fn queue_index(&self, q: usize) -> u16 {
        self.queues[q].index
    }
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

/// Splits a used rx buffer into its header and payload.
pub fn parse_rx(used: &Used) -> (Header, Vec<u8>) {
    let header = Header::read_from(&used.bytes).expect("rx buffer holds a header");
    (header, used.bytes[HEADER_LEN..].to_vec())
}
