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
    pub(crate) fn for_each_piece<E>(
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

    /// Writes the whole span to the seqpacket socket `fd` as one message: one `sendmsg`, which
    /// takes all of it or nothing. `Ok(Ok(0))` if the span has more pieces than one call
    /// takes (nothing was tried; the engine then copies the message).
    pub(crate) fn send_message<M: GuestMemory>(
        &self,
        mem: &M,
        fd: BorrowedFd<'_>,
    ) -> Result<io::Result<usize>, MemoryFault> {
        let mut pieces = 0usize;
        let _ = self.for_each_piece(0, self.len, |addr, n| {
            pieces += mem
                .get_slices(addr, n, Permissions::Read)
                .map_or(MAX_IOV + 1, |s| s.count());
            if pieces > MAX_IOV {
                Err(())
            } else {
                Ok(())
            }
        });
        if pieces > MAX_IOV {
            return Ok(Ok(0));
        }
        Ok(self
            .send_once(mem, self.len, fd)?
            .map(|(written, _)| written))
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

/// The most pieces of guest memory one message read covers: Linux's `UIO_MAXIOV`, the most a
/// `recvmsg` takes.
pub(crate) const MAX_MSG_IOV: usize = 1024;

/// Reads one message from the seqpacket socket `fd`, scattered over `spans` in order and then
/// `tail` (host memory), with one `recvmsg` (`MSG_TRUNC`: the result is the message's real
/// length, even if the spans are shorter), never blocking. Every byte of the spans is marked dirty. `Err` if the spans lie
/// outside guest memory or take more than [`MAX_MSG_IOV`] pieces.
pub(crate) fn read_message_from_fd<'s, M: GuestMemory>(
    mem: &M,
    spans: impl Iterator<Item = Span<'s>>,
    tail: Option<&mut [u8]>,
    fd: BorrowedFd<'_>,
) -> Result<io::Result<usize>, MemoryFault> {
    let mut guards = [const { None }; MAX_MSG_IOV];
    let mut count = 0;
    for span in spans {
        span.for_each_piece(0, span.len, |addr, n| {
            for slice in mem
                .get_slices(addr, n, Permissions::Write)
                .map_err(|_| MemoryFault)?
            {
                let slice = slice.map_err(|_| MemoryFault)?;
                if count == MAX_MSG_IOV {
                    return Err(MemoryFault);
                }
                // Marked before the read: a byte marked and then not written is harmless.
                slice.bitmap().mark_dirty(0, slice.len());
                guards[count] = Some(slice.ptr_guard_mut());
                count += 1;
            }
            Ok(())
        })?;
    }
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_MSG_IOV + 1];
    for (entry, guard) in iov.iter_mut().zip(guards.iter().flatten()) {
        *entry = libc::iovec {
            iov_base: guard.as_ptr().cast(),
            iov_len: guard.len(),
        };
    }
    if let Some(tail) = tail {
        // Host memory of the engine's, after the guest's pieces.
        iov[count] = libc::iovec {
            iov_base: tail.as_mut_ptr().cast(),
            iov_len: tail.len(),
        };
        count += 1;
    }
    // SAFETY: `msghdr` is a plain C struct for which all-zero bytes are a valid value (null
    // name and control pointers with zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = count as _;
    // SAFETY: the first `count` iovecs describe writable slices of mapped guest memory that
    // vm-memory checked against the guest's regions (the guards keep those mappings alive
    // until after the call; guest memory is only ever accessed through raw pointers, which is
    // what `recvmsg` does), then, if given, `tail`, a slice we borrow mutably for the call.
    // `msg` points at `iov`, which outlives the call, asks for no address and no control
    // data, and `count <= MAX_MSG_IOV + 1 <= UIO_MAXIOV`. `fd` is a valid borrowed descriptor.
    // MSG_DONTWAIT keeps the call from blocking whatever the descriptor's mode.
    let r = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    // The guards live until here, past the call.
    let _ = &guards;
    Ok(if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    })
}

/// Whether the socket reports both directions shut (`POLLHUP`): its peer closed, or shut down
/// what we had not. Never blocks.
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; a zero timeout never
    // blocks.
    let polled = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    polled > 0 && pfd.revents & libc::POLLHUP != 0
}

/// Peeks at the size of the next message on the seqpacket socket `fd`, never blocking.
///
/// A peek of 0 bytes is an empty message or end of file, and Linux cannot be asked which
/// directly. Worse, a non-blocking receive looks at the queue and at the peer's shutdown one
/// after the other, unlocked: a peer that sends a message and shuts down between the two
/// makes it report end of file with the message queued. So a 0 is resolved in this order:
/// - `poll(POLLRDHUP)` shows no shutdown: there was none at the peek either (a shutdown is
///   never undone), so the 0 came from a message, an empty one, which is consumed (`Empty`);
/// - the peer shut down: everything it sent is queued by now, and a second peek with
///   `SO_TIMESTAMP` on tells a message (even an empty one carries a timestamp) from end of
///   file (no message, no control data).
pub(crate) fn probe_message(fd: BorrowedFd<'_>) -> vsock_core::Probe {
    use vsock_core::{Probe, SocketError};
    let error = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Probe::WouldBlock,
        _ => Probe::Error(SocketError::from(&e)),
    };
    match peek_size(fd, false) {
        Ok((0, _)) => {}
        Ok((n, _)) => return Probe::Size(n),
        Err(e) => return error(e),
    }
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; a zero timeout never
    // blocks.
    let polled = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    if polled > 0 && pfd.revents & libc::POLLRDHUP != 0 {
        if let Err(e) = set_timestamps(fd, true) {
            return error(e);
        }
        let peeked = peek_size(fd, true);
        // Left on, every later receive would carry control data nobody reads.
        let _ = set_timestamps(fd, false);
        match peeked {
            Ok((0, false)) => return Probe::Eof,
            Ok((0, true)) => {}
            Ok((n, _)) => return Probe::Size(n),
            Err(e) => return error(e),
        }
    }
    // An empty message: take it off the queue.
    // SAFETY: a zero-length receive into a null buffer writes nothing; `fd` is a valid
    // borrowed descriptor and MSG_DONTWAIT keeps the call from blocking.
    let r = unsafe { libc::recv(fd.as_raw_fd(), std::ptr::null_mut(), 0, libc::MSG_DONTWAIT) };
    if r < 0 {
        error(io::Error::last_os_error())
    } else {
        Probe::Empty
    }
}

/// `MSG_PEEK|MSG_TRUNC` with no buffer: the next message's length, consuming nothing, and,
/// when `control` is asked for, whether the kernel returned control data (with `SO_TIMESTAMP`
/// on, it does for every message and never at end of file).
fn peek_size(fd: BorrowedFd<'_>, control: bool) -> io::Result<(usize, bool)> {
    // Room for one `SCM_TIMESTAMP` (a `timeval`), aligned for `cmsghdr`.
    let mut room = [0u64; 8];
    // SAFETY: `msghdr` is a plain C struct for which all-zero bytes are a valid value (null
    // name, iovec and control pointers with zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    if control {
        msg.msg_control = room.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&room) as _;
    }
    // SAFETY: `msg` describes no buffer to fill and, if asked, `room`, which outlives the
    // call, for control data of at most its length. `fd` is a valid borrowed descriptor and
    // MSG_DONTWAIT keeps the call from blocking.
    let r = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &raw mut msg,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r as usize, control && msg.msg_controllen > 0))
}

/// Turns `SO_TIMESTAMP` on or off.
fn set_timestamps(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let value = libc::c_int::from(on);
    // SAFETY: the option value is a valid `c_int` of the length given, read during the call
    // only; `fd` is a valid borrowed descriptor.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMP,
            (&raw const value).cast(),
            std::mem::size_of_val(&value) as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
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
