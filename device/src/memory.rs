//! Guest memory as the device touches it: descriptor chains flattened into segments, the
//! header copied out once, and bytes moved between a socket and guest memory with one
//! `readv`/`writev` over the chain's pieces.
//!
//! Guest memory is hostile. Every address is checked by vm-memory when it is turned into a
//! slice; a chain that points outside guest memory is a fault, never a panic.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};
use vsock_core::{GuestBytes, MemoryFault};

/// The most pieces of guest memory one `readv`/`writev` covers. Longer chains are served over
/// several calls (a short read or write is normal for the engine).
pub(crate) const MAX_IOV: usize = 64;

/// One descriptor of a chain: guest address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seg {
    pub(crate) addr: u64,
    pub(crate) len: u32,
}

/// A run of bytes inside a list of segments, starting `skip` bytes in.
#[derive(Clone, Copy)]
pub(crate) struct Span<'s> {
    pub(crate) segs: &'s [Seg],
    pub(crate) skip: usize,
    pub(crate) len: usize,
}

impl<'s> Span<'s> {
    pub(crate) fn new(segs: &'s [Seg], skip: usize, len: usize) -> Self {
        Span { segs, skip, len }
    }

    /// Calls `f(address, length)` for each contiguous piece of `[offset, offset + len)` of
    /// this span, in order. Stops early if `f` fails.
    fn for_each_piece<E>(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut start = self.skip + offset;
        let mut left = len;
        for seg in self.segs {
            if left == 0 {
                break;
            }
            let seg_len = seg.len as usize;
            if start >= seg_len {
                start -= seg_len;
                continue;
            }
            let n = (seg_len - start).min(left);
            // Segment addresses come from the guest: overflow means a bad address, which the
            // memory access below rejects; wrapping keeps the arithmetic from panicking.
            f(GuestAddress(seg.addr.wrapping_add(start as u64)), n)?;
            left -= n;
            start = 0;
        }
        Ok(())
    }

    /// Whether every byte of the span lies in guest memory.
    pub(crate) fn in_memory<M: GuestMemory>(&self, mem: &M) -> bool {
        self.for_each_piece(0, self.len, |addr, n| {
            if mem.check_range(addr, n, Permissions::Read) {
                Ok(())
            } else {
                Err(())
            }
        })
        .is_ok()
    }

    /// Copies `dst.len()` bytes starting `offset` bytes into the span.
    pub(crate) fn read<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        dst: &mut [u8],
    ) -> Result<(), MemoryFault> {
        if offset
            .checked_add(dst.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(MemoryFault);
        }
        let mut done = 0;
        self.for_each_piece(offset, dst.len(), |addr, n| {
            mem.read_slice(&mut dst[done..done + n], addr)
                .map_err(|_| MemoryFault)?;
            done += n;
            Ok(())
        })
    }

    /// Copies `src` into the span, starting `offset` bytes in.
    pub(crate) fn write<M: GuestMemory>(
        &self,
        mem: &M,
        offset: usize,
        src: &[u8],
    ) -> Result<(), MemoryFault> {
        if offset
            .checked_add(src.len())
            .is_none_or(|end| end > self.len)
        {
            return Err(MemoryFault);
        }
        let mut done = 0;
        self.for_each_piece(offset, src.len(), |addr, n| {
            mem.write_slice(&src[done..done + n], addr)
                .map_err(|_| MemoryFault)?;
            done += n;
            Ok(())
        })
    }

    /// Collects at most `max` bytes of the span as host slices, at most [`MAX_IOV`] of them.
    fn slices<'m, M: GuestMemory>(
        &self,
        mem: &'m M,
        max: usize,
        access: Permissions,
        out: &mut [Option<VolatileSlice<'m, BS<'m, M::Bitmap>>>; MAX_IOV],
    ) -> Result<usize, MemoryFault> {
        let mut count = 0;
        let len = self.len.min(max);
        let result = self.for_each_piece(0, len, |addr, n| {
            for slice in mem.get_slices(addr, n, access).map_err(|_| MemoryFault)? {
                if count == MAX_IOV {
                    return Err(None);
                }
                out[count] = Some(slice.map_err(|_| Some(MemoryFault))?);
                count += 1;
            }
            Ok(())
        });
        match result {
            Ok(()) | Err(None) => Ok(count),
            Err(Some(fault)) => Err(fault),
        }
        .and_then(|n| {
            if n == 0 && len > 0 {
                Err(MemoryFault)
            } else {
                Ok(n)
            }
        })
    }

    /// Writes up to `max` bytes of the span to the socket `fd`, never blocking and never
    /// raising SIGPIPE: one `sendmsg` per [`MAX_IOV`] pieces, until the socket takes less than
    /// it was offered (it is full) or everything is written. A short count therefore always
    /// means the socket is full, which is what the engine takes it for: stopping at our own
    /// iovec limit would make it wait for a writable edge the kernel never sends.
    pub(crate) fn write_to_fd<M: GuestMemory>(
        &self,
        mem: &M,
        max: usize,
        fd: BorrowedFd<'_>,
    ) -> Result<io::Result<usize>, MemoryFault> {
        let max = max.min(self.len);
        let mut done = 0;
        loop {
            let rest = Span::new(self.segs, self.skip + done, self.len - done);
            match rest.send_once(mem, max - done, fd) {
                Ok(Ok((written, offered))) => {
                    done += written;
                    if written < offered || done == max {
                        return Ok(Ok(done));
                    }
                }
                // Bytes already went: report them; the error, if it lasts, comes next time.
                Ok(Err(_)) | Err(_) if done > 0 => return Ok(Ok(done)),
                Ok(Err(e)) => return Ok(Err(e)),
                Err(fault) => return Err(fault),
            }
        }
    }

    /// One `sendmsg` of at most `max` bytes over at most [`MAX_IOV`] pieces: the bytes written
    /// and the bytes offered.
    fn send_once<M: GuestMemory>(
        &self,
        mem: &M,
        max: usize,
        fd: BorrowedFd<'_>,
    ) -> Result<io::Result<(usize, usize)>, MemoryFault> {
        let mut slices = [const { None }; MAX_IOV];
        let n = self.slices(mem, max, Permissions::Read, &mut slices)?;
        let guards: [_; MAX_IOV] =
            std::array::from_fn(|i| slices[i].as_ref().map(|s| s.ptr_guard()));
        let iov = iovecs(n, |i| {
            let g = guards[i].as_ref().expect("one guard per slice");
            (g.as_ptr(), g.len())
        });
        let mut msg = message(&iov, n);
        // SAFETY: each iovec describes a slice of mapped guest memory that vm-memory checked
        // against the guest's regions; the guards keep those mappings alive for the duration of
        // the call, and `sendmsg` only reads through the pointers. `msg` points at `iov`, which
        // outlives the call, with `n <= MAX_IOV` initialised entries. `fd` is a valid borrowed
        // descriptor. MSG_DONTWAIT keeps the call from blocking whatever the descriptor's mode;
        // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
        let r = unsafe {
            libc::sendmsg(
                fd.as_raw_fd(),
                &raw mut msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        // The guards (and the slices they come from) live until here, past the call.
        let offered = guards.iter().flatten().map(|g| g.len()).sum();
        Ok(if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok((r as usize, offered))
        })
    }

    /// Reads up to `max` bytes from the socket `fd` into the span with one `recvmsg`, never
    /// blocking, marking what was written dirty.
    pub(crate) fn read_from_fd<M: GuestMemory>(
        &self,
        mem: &M,
        max: usize,
        fd: BorrowedFd<'_>,
    ) -> Result<io::Result<usize>, MemoryFault> {
        let mut slices = [const { None }; MAX_IOV];
        let n = self.slices(mem, max, Permissions::Write, &mut slices)?;
        let guards: [_; MAX_IOV] =
            std::array::from_fn(|i| slices[i].as_ref().map(|s| s.ptr_guard_mut()));
        let iov = iovecs(n, |i| {
            let g = guards[i].as_ref().expect("one guard per slice");
            (g.as_ptr().cast_const(), g.len())
        });
        let mut msg = message(&iov, n);
        // SAFETY: each iovec describes a writable slice of mapped guest memory that vm-memory
        // checked against the guest's regions; the guards keep the mappings alive for the call.
        // Guest memory is shared with the guest, so it is only ever accessed through raw
        // pointers (never as a Rust reference), which is what `recvmsg` does. `msg` points at
        // `iov`, which outlives the call, with `n <= MAX_IOV` initialised entries; it asks for
        // no address and no control data. `fd` is a valid borrowed descriptor. MSG_DONTWAIT
        // keeps the call from blocking whatever the descriptor's mode.
        let r = unsafe { libc::recvmsg(fd.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
        // The guards (and the slices they come from) live until here, past the call.
        let _ = &guards;
        if r < 0 {
            return Ok(Err(io::Error::last_os_error()));
        }
        let mut left = r as usize;
        for slice in slices.iter().take(n).flatten() {
            let k = left.min(slice.len());
            if k == 0 {
                break;
            }
            slice.bitmap().mark_dirty(0, k);
            left -= k;
        }
        Ok(Ok(r as usize))
    }
}

/// Writes `bufs` (host memory: bytes the engine holds for the socket) to the socket `fd` with
/// one `sendmsg`, never blocking and never raising SIGPIPE.
pub(crate) fn send_host_bytes(fd: BorrowedFd<'_>, bufs: [&[u8]; 2]) -> io::Result<usize> {
    let iov = iovecs(2, |i| (bufs[i].as_ptr(), bufs[i].len()));
    let mut msg = message(&iov, 2);
    // SAFETY: the two iovecs describe the slices in `bufs`, which outlive the call, and
    // `sendmsg` only reads through them. `msg` points at `iov`, which outlives the call, with
    // 2 initialised entries. `fd` is a valid borrowed descriptor. MSG_DONTWAIT keeps the call
    // from blocking whatever the descriptor's mode; MSG_NOSIGNAL turns a closed peer into
    // EPIPE instead of SIGPIPE.
    let r = unsafe {
        libc::sendmsg(
            fd.as_raw_fd(),
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// A message header for `sendmsg`/`recvmsg` over the first `n` entries of `iov`, with no
/// address and no control data.
fn message(iov: &[libc::iovec; MAX_IOV], n: usize) -> libc::msghdr {
    // SAFETY: `msghdr` is a plain C struct (pointers, lengths, flags, and on some targets
    // padding fields) for which all-zero bytes are a valid value: null name and control
    // pointers with zero lengths.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = n as _;
    msg
}

/// The first `n` entries of an iovec array, from each piece's pointer and length.
fn iovecs(n: usize, piece: impl Fn(usize) -> (*const u8, usize)) -> [libc::iovec; MAX_IOV] {
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_IOV];
    for (i, entry) in iov.iter_mut().enumerate().take(n) {
        let (ptr, len) = piece(i);
        *entry = libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        };
    }
    iov
}

/// A tx payload in guest memory, for the engine to copy what the socket refused.
pub(crate) struct PayloadBytes<'a, M> {
    pub(crate) mem: &'a M,
    pub(crate) span: Span<'a>,
}

impl<M: GuestMemory> GuestBytes for PayloadBytes<'_, M> {
    fn copy_to(&mut self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        self.span.read(self.mem, offset, dst)
    }
}
