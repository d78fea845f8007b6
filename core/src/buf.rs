//! Per-connection byte buffers and the pool they come from.

/// A fixed-capacity byte ring: guest data that a host socket has not taken yet.
///
/// For a seqpacket connection the ring also keeps message boundaries: a bitmap with one bit
/// per byte of the ring, set on the last byte of each complete message. It costs an eighth of
/// the ring whatever the guest sends (a list of lengths would need an entry per byte of credit
/// for one-byte messages), is allocated the first time a boundary is marked, and stays with
/// the ring in the pool.
pub(crate) struct Ring {
    data: Box<[u8]>,
    head: usize,
    len: usize,
    /// Message ends, one bit per byte of `data`; empty until a boundary is first marked.
    ends: Box<[u64]>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Ring {
            data: vec![0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            ends: Box::default(),
        }
    }

    /// Marks the last buffered byte as the end of a message.
    pub(crate) fn mark_end(&mut self) {
        assert!(self.len > 0, "no byte to end a message");
        let cap = self.data.len();
        if self.ends.is_empty() {
            self.ends = vec![0; cap.div_ceil(64)].into_boxed_slice();
        }
        let at = (self.head + self.len - 1) % cap;
        self.ends[at / 64] |= 1 << (at % 64);
    }

    /// The length of the first complete message: from the head to the first marked end. None
    /// if no message is complete.
    pub(crate) fn first_message(&self) -> Option<usize> {
        if self.ends.is_empty() || self.len == 0 {
            return None;
        }
        let cap = self.data.len();
        // Scan from the head to the end of the data, then from the start of the ring: a word
        // at a time, so a message of n bytes costs n / 64 steps.
        let find = |from: usize, to: usize| -> Option<usize> {
            let mut at = from;
            while at < to {
                let word = self.ends[at / 64] >> (at % 64);
                if word != 0 {
                    let hit = at + word.trailing_zeros() as usize;
                    return (hit < to).then_some(hit);
                }
                at = (at / 64 + 1) * 64;
            }
            None
        };
        let first = self.len.min(cap - self.head);
        if let Some(hit) = find(self.head, self.head + first) {
            return Some(hit - self.head + 1);
        }
        find(0, self.len - first).map(|hit| first + hit + 1)
    }

    /// Drops the `n` newest bytes (an unfinished message); they hold no marked end.
    pub(crate) fn truncate(&mut self, n: usize) {
        assert!(n <= self.len, "ring over-truncated");
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn free(&self) -> usize {
        self.data.len() - self.len
    }

    /// The buffered bytes, oldest first, as at most two slices.
    pub(crate) fn as_slices(&self) -> (&[u8], &[u8]) {
        let cap = self.data.len();
        let first = self.len.min(cap - self.head);
        (
            &self.data[self.head..self.head + first],
            &self.data[..self.len - first],
        )
    }

    /// The free space after the buffered bytes, as at most two slices, in order.
    pub(crate) fn free_slices_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        let cap = self.data.len();
        let tail = (self.head + self.len) % cap.max(1);
        let free = cap - self.len;
        if tail >= self.head && self.len != cap {
            let first = (cap - tail).min(free);
            let (before, after) = self.data.split_at_mut(tail);
            let second = free - first;
            (&mut after[..first], &mut before[..second])
        } else {
            (&mut self.data[tail..tail + free], &mut [])
        }
    }

    /// Marks `n` bytes of the free space (see [`Ring::free_slices_mut`]) as filled.
    pub(crate) fn commit(&mut self, n: usize) {
        assert!(n <= self.free(), "ring overfilled");
        self.len += n;
    }

    /// Drops the `n` oldest bytes, and any message end marked on them.
    pub(crate) fn consume(&mut self, n: usize) {
        assert!(n <= self.len, "ring over-consumed");
        if !self.ends.is_empty() && n > 0 {
            let cap = self.data.len();
            // Messages are consumed whole, so only the last consumed byte can hold a mark; a
            // partial consume (never done for messages) clears nothing else.
            let at = (self.head + n - 1) % cap;
            self.ends[at / 64] &= !(1 << (at % 64));
        }
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % self.data.len()
        };
    }
}

/// Drained rings kept for reuse, so the steady state allocates nothing.
pub(crate) struct Pool {
    free: Vec<Ring>,
    keep: usize,
    ring_size: usize,
    /// Rings handed out and not yet returned.
    pub(crate) outstanding: usize,
}

impl Pool {
    pub(crate) fn new(ring_size: usize, keep: usize) -> Self {
        Pool {
            free: Vec::with_capacity(keep),
            keep,
            ring_size,
            outstanding: 0,
        }
    }

    pub(crate) fn take(&mut self) -> Ring {
        self.outstanding += 1;
        self.free.pop().unwrap_or_else(|| Ring::new(self.ring_size))
    }

    pub(crate) fn give(&mut self, mut ring: Ring) {
        self.outstanding -= 1;
        if self.free.len() < self.keep {
            // A drained ring's marks were cleared as its messages were consumed; one given back
            // with bytes in it (a reset) may still hold some.
            if ring.len > 0 {
                ring.ends.fill(0);
            }
            ring.head = 0;
            ring.len = 0;
            self.free.push(ring);
        }
    }

    pub(crate) fn idle(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(r: &mut Ring, bytes: &[u8]) {
        let (a, b) = r.free_slices_mut();
        let n1 = a.len().min(bytes.len());
        a[..n1].copy_from_slice(&bytes[..n1]);
        let n2 = b.len().min(bytes.len() - n1);
        b[..n2].copy_from_slice(&bytes[n1..n1 + n2]);
        r.commit(n1 + n2);
    }

    fn contents(r: &Ring) -> Vec<u8> {
        let (a, b) = r.as_slices();
        [a, b].concat()
    }

    #[test]
    fn ring_wraps_and_keeps_order() {
        let mut r = Ring::new(8);
        let mut model = std::collections::VecDeque::new();
        let mut next = 0u8;
        for step in 0..200 {
            let n = (step * 7 + 3) % 6;
            let n = n.min(r.free());
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            push(&mut r, &bytes);
            model.extend(bytes);
            assert_eq!(contents(&r), model.iter().copied().collect::<Vec<_>>());
            let c = (step * 5) % 5;
            let c = c.min(r.len());
            r.consume(c);
            model.drain(..c);
            assert_eq!(contents(&r), model.iter().copied().collect::<Vec<_>>());
            let (a, b) = r.free_slices_mut();
            assert_eq!(a.len() + b.len(), 8 - model.len());
        }
    }

    #[test]
    fn full_ring_has_no_free_space() {
        let mut r = Ring::new(4);
        push(&mut r, b"ab");
        r.consume(1);
        push(&mut r, b"cde");
        assert_eq!(r.free(), 0);
        let (a, b) = r.free_slices_mut();
        assert!(a.is_empty() && b.is_empty());
        assert_eq!(contents(&r), b"bcde");
    }

    #[test]
    fn message_ends_are_found_across_the_wrap() {
        let mut r = Ring::new(200);
        assert_eq!(r.first_message(), None);
        push(&mut r, &[1; 150]);
        r.mark_end();
        assert_eq!(r.first_message(), Some(150));
        r.consume(150);
        assert_eq!(r.first_message(), None);
        // head 0 after a full drain; build a wrap: 120 bytes, consume 100, then 150 more.
        push(&mut r, &[2; 120]);
        r.mark_end();
        r.consume(120);
        push(&mut r, &[3; 100]);
        r.consume(100);
        push(&mut r, &[4; 70]);
        r.mark_end();
        push(&mut r, &[5; 90]); // wraps
        r.mark_end();
        push(&mut r, &[6; 1]);
        r.mark_end();
        push(&mut r, &[7; 5]); // unfinished
        assert_eq!(r.first_message(), Some(70));
        r.consume(70);
        assert_eq!(r.first_message(), Some(90));
        let (a, b) = r.as_slices();
        assert_eq!([a, b].concat()[..90], [5; 90]);
        r.consume(90);
        assert_eq!(r.first_message(), Some(1));
        r.consume(1);
        assert_eq!(r.first_message(), None);
        r.truncate(5);
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn one_byte_messages_fill_the_ring() {
        let mut r = Ring::new(130);
        for i in 0..130u8 {
            push(&mut r, &[i]);
            r.mark_end();
        }
        for i in 0..130u8 {
            assert_eq!(r.first_message(), Some(1));
            assert_eq!(r.as_slices().0[0], i);
            r.consume(1);
        }
        assert_eq!(r.first_message(), None);
    }

    #[test]
    fn a_pooled_ring_keeps_no_message_end() {
        let mut p = Pool::new(64, 1);
        let mut r = p.take();
        push(&mut r, &[1; 10]);
        r.mark_end();
        push(&mut r, &[2; 5]);
        r.mark_end();
        r.consume(10);
        // Given back with a message still in it (a reset): its mark must not survive.
        p.give(r);
        let mut r = p.take();
        push(&mut r, &[3; 20]);
        assert_eq!(r.first_message(), None);
        r.mark_end();
        assert_eq!(r.first_message(), Some(20));
        r.consume(20);
        // Drained: nothing left to clear.
        p.give(r);
        let mut r = p.take();
        push(&mut r, &[4; 30]);
        assert_eq!(r.first_message(), None);
    }

    #[test]
    fn pool_reuses_up_to_its_limit() {
        let mut p = Pool::new(16, 1);
        let a = p.take();
        let b = p.take();
        assert_eq!(p.outstanding, 2);
        p.give(a);
        p.give(b);
        assert_eq!(p.idle(), 1);
        assert_eq!(p.outstanding, 0);
    }
}
