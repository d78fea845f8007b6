//! Per-connection byte buffers and the pool they come from.

/// A fixed-capacity byte ring: guest data that a host socket has not taken yet.
pub(crate) struct Ring {
    data: Box<[u8]>,
    head: usize,
    len: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Ring {
            data: vec![0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
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

    /// Drops the `n` oldest bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        assert!(n <= self.len, "ring over-consumed");
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
