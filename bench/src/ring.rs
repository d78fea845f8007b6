//! The driver's side of one split virtqueue, written the way Linux's `virtio_ring.c` writes
//! it, for a guest thread that shares guest memory with the device's thread:
//!
//! - descriptors and buffer contents are plain writes; the available index is published with
//!   a release store after them, and the device reads it with an acquire load;
//! - the used index is read with an acquire load before the used entries and buffers;
//! - with `VIRTIO_RING_F_EVENT_IDX`, a kick is sent only when the device's `avail_event`
//!   lies among the entries published since the last kick decision (a full fence first, so the
//!   device's `avail_event` write and our index write cannot both be missed), and the device
//!   interrupts only when our `used_event` lies among the entries it used (we write it, then
//!   fence, then look at the used index once more before sleeping).
//!
//! One thread owns each ring; nothing here locks.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;

/// Guest memory one ring of `size` entries takes: descriptor table, available ring, and the
/// used ring on a page of its own.
pub fn ring_bytes(size: u16) -> u64 {
    let n = u64::from(size);
    used_offset(size) + (6 + 8 * n).next_multiple_of(4096)
}

fn used_offset(size: u16) -> u64 {
    let n = u64::from(size);
    (16 * n + 6 + 2 * n).next_multiple_of(4096)
}

/// The driver's view of one split virtqueue.
pub struct Vring {
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// The available index as last published.
    avail_idx: u16,
    /// The available index at the last kick decision.
    kicked_at: u16,
    /// The next used entry to read.
    last_used: u16,
    /// The used index as last loaded.
    used_seen: u16,
}

impl Vring {
    /// A ring of `size` entries (a power of two) at guest address `base`, which must have
    /// [`ring_bytes`] of zeroed guest memory.
    pub fn new(mem: GuestMemoryMmap, size: u16, base: u64) -> Vring {
        assert!(size.is_power_of_two());
        Vring {
            mem,
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + used_offset(size),
            avail_idx: 0,
            kicked_at: 0,
            last_used: 0,
            used_seen: 0,
        }
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The device's view of this ring, as a VMM configures it from the driver's registers.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index`.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let at = self.desc + 16 * u64::from(index);
        self.mem
            .write_slice(&raw, GuestAddress(at))
            .expect("descriptor in guest memory");
    }

    /// Makes the chain headed by `head` available and publishes the new index.
    pub fn push(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("available ring in guest memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: the descriptors, the buffers and the ring entry before the index.
        self.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .expect("available index in guest memory");
    }

    /// Whether the device asked to be kicked for the entries published since the last call
    /// (the EVENT_IDX rule, `vring_need_event`). The caller kicks if so.
    pub fn kick_needed(&mut self) -> bool {
        let (old, new) = (self.kicked_at, self.avail_idx);
        if old == new {
            return false;
        }
        self.kicked_at = new;
        // The index store before the read of avail_event, as the device's avail_event store
        // comes before its second look at our index.
        fence(Ordering::SeqCst);
        let event = u16::from_le(
            self.mem
                .load(
                    GuestAddress(self.used + 4 + 8 * u64::from(self.size)),
                    Ordering::Relaxed,
                )
                .expect("avail_event in guest memory"),
        );
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    fn load_used_idx(&mut self) -> u16 {
        // Acquire: the used entries and the buffers' contents after the index.
        self.used_seen = u16::from_le(
            self.mem
                .load(GuestAddress(self.used + 2), Ordering::Acquire)
                .expect("used index in guest memory"),
        );
        self.used_seen
    }

    /// Whether the device returned buffers not yet taken back.
    pub fn has_used(&mut self) -> bool {
        self.last_used != self.used_seen || self.last_used != self.load_used_idx()
    }

    /// The next buffer the device returned: (head, length written).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used entry");
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used entry");
        self.last_used = self.last_used.wrapping_add(1);
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }

    /// Asks for an interrupt at the next used buffer (`used_event` = the next entry to read,
    /// as Linux's `virtqueue_enable_cb`). Returns whether buffers arrived meanwhile, in which
    /// case the caller must not sleep. Interrupts stay off again once one fired: the device
    /// then interrupts only when `used_event` is written anew.
    pub fn enable_interrupts(&mut self) -> bool {
        self.mem
            .store(
                self.last_used.to_le(),
                GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
                Ordering::Relaxed,
            )
            .expect("used_event in guest memory");
        // The used_event store before our second look at the used index, as the device's
        // used index store comes before its read of used_event.
        fence(Ordering::SeqCst);
        self.has_used()
    }
}
