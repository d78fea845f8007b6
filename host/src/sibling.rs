//! Sibling routing: the guests of VMs served by one process reach each other by CID.
//!
//! [`Siblings`] is the process's table of VMs: each one's CID, its groups, and its inbox. A
//! guest connecting to the CID of a VM that shares a group with it gets a Unix socket pair
//! of the connection's type: its device keeps one end, the other goes to the sibling's inbox
//! with the address, and the sibling's loop, woken through the inbox's wake socket, hands it
//! to its engine ([`Engine::handle_sibling_accept`](vsock_core::Engine::handle_sibling_accept)).
//! From then on the two engines talk through the pair as each would through a host socket:
//! the kernel's socket buffers sit between them, so a full receiver holds the sender back and
//! nothing is dropped.
//!
//! Each VM's loop holds its [`SiblingLink`]. A VM that goes away (its device reset or
//! stopped, its loop ended) tells every sibling through its inbox, which resets the
//! connections with it at once ([`Engine::reset_peer`](vsock_core::Engine::reset_peer)).
//!
//! The same inbox carries inspections ([`Siblings::inspect`]): a VM's counters and
//! connections, asked for from another thread (the daemon's stats socket) and answered by the
//! loop between two rounds of its work, so the loop never shares its state under a lock.
//!
//! Nothing here blocks for long: an inbox is a short critical section under a mutex, and its
//! size is bounded ([`INBOX_CONNECTS`]); a full inbox refuses the connect, and the guest that
//! asked gets an RST.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

use socket2::{Domain, Socket, Type};
use tracing::debug;
use vsock_core::wire::SocketType;

use crate::Snapshot;

/// The most connects an inbox holds before its loop takes them; more are refused.
pub const INBOX_CONNECTS: usize = 256;

/// The most inspections an inbox holds before its loop answers them; more get no answer.
pub const INBOX_INSPECTIONS: usize = 8;

/// `EHOSTUNREACH`: no sibling with that CID shares a group with the guest.
const EHOSTUNREACH: i32 = 113;
/// `ECONNREFUSED`: the sibling is not serving, or its inbox is full.
const ECONNREFUSED: i32 = 111;

/// The VMs of one process and the groups that let their guests reach each other.
#[derive(Clone)]
pub struct Siblings {
    vms: Arc<Vec<Vm>>,
}

struct Vm {
    cid: u64,
    groups: Vec<String>,
    inbox: Arc<Inbox>,
}

impl fmt::Debug for Siblings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.vms.iter().map(|vm| (vm.cid, &vm.groups)))
            .finish()
    }
}

impl Siblings {
    /// The table of `vms`, each a CID and its groups: two VMs are siblings when they share
    /// a group.
    ///
    /// # Errors
    ///
    /// A CID given twice, or a wake socket pair that cannot be made.
    pub fn new(vms: impl IntoIterator<Item = (u64, Vec<String>)>) -> io::Result<Siblings> {
        let mut table: Vec<Vm> = Vec::new();
        for (cid, groups) in vms {
            if table.iter().any(|vm| vm.cid == cid) {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("CID {cid} is given twice"),
                ));
            }
            table.push(Vm {
                cid,
                groups,
                inbox: Arc::new(Inbox::new()?),
            });
        }
        Ok(Siblings {
            vms: Arc::new(table),
        })
    }

    /// The link of the VM with CID `cid`, for its loop ([`DriverConfig::siblings`]).
    ///
    /// [`DriverConfig::siblings`]: crate::DriverConfig::siblings
    pub fn link(&self, cid: u64) -> Option<SiblingLink> {
        let index = self.vms.iter().position(|vm| vm.cid == cid)?;
        Some(SiblingLink {
            siblings: self.clone(),
            index,
        })
    }

    /// The CIDs of the VMs, in the order given.
    pub fn cids(&self) -> impl Iterator<Item = u64> + '_ {
        self.vms.iter().map(|vm| vm.cid)
    }

    /// The counters and connections of the VM with CID `cid`, from its loop, which answers
    /// between two rounds of its work. `None` if no VM has that CID, its loop is not serving,
    /// [`INBOX_INSPECTIONS`] already wait, or no answer came within `timeout`.
    pub fn inspect(&self, cid: u64, timeout: std::time::Duration) -> Option<Snapshot> {
        let vm = self.vms.iter().find(|vm| vm.cid == cid)?;
        let answer = vm.inbox.post_inspect()?;
        answer.recv_timeout(timeout).ok()
    }

    /// Every VM's snapshot, as [`inspect`](Self::inspect) gives it, in the order given: all
    /// are asked at once, so the whole takes `timeout` at most however many VMs stall.
    pub fn inspect_all(&self, timeout: std::time::Duration) -> Vec<(u64, Option<Snapshot>)> {
        let asked: Vec<_> = self
            .vms
            .iter()
            .map(|vm| (vm.cid, vm.inbox.post_inspect()))
            .collect();
        let deadline = std::time::Instant::now() + timeout;
        asked
            .into_iter()
            .map(|(cid, answer)| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                (cid, answer.and_then(|a| a.recv_timeout(left).ok()))
            })
            .collect()
    }

    fn shares_group(a: &Vm, b: &Vm) -> bool {
        a.groups.iter().any(|g| b.groups.contains(g))
    }
}

/// One VM's place among its siblings: where its guest's connects to other CIDs go, and the
/// inbox of connects from theirs.
#[derive(Clone)]
pub struct SiblingLink {
    siblings: Siblings,
    index: usize,
}

impl fmt::Debug for SiblingLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiblingLink")
            .field("cid", &self.cid())
            .finish_non_exhaustive()
    }
}

/// Something a sibling sent a VM's loop.
#[derive(Debug)]
pub enum Delivery {
    /// A sibling's guest connects to this guest.
    Connect {
        /// This device's end of the pair.
        socket: UnixStream,
        /// The sibling guest's CID.
        peer_cid: u64,
        /// The sibling guest's port.
        peer_port: u32,
        /// The port of this guest it connects to.
        port: u32,
        /// The socket type.
        socket_type: SocketType,
    },
    /// Someone asks for the VM's [`Snapshot`] ([`Siblings::inspect`]): the loop sends it.
    Inspect {
        /// Where the snapshot goes.
        reply: std::sync::mpsc::SyncSender<Snapshot>,
    },
    /// The sibling with this CID went away: reset every connection with it, then drop
    /// `sockets`, its ends of those connections, which it kept open until now so that the
    /// guest sees the reset rather than an end of file first.
    PeerGone {
        /// The sibling's CID.
        cid: u64,
        /// The sibling's ends of the connections it had with this VM.
        sockets: Vec<UnixStream>,
    },
}

impl SiblingLink {
    fn me(&self) -> &Vm {
        &self.siblings.vms[self.index]
    }

    /// This VM's CID.
    pub fn cid(&self) -> u64 {
        self.me().cid
    }

    /// The descriptor the loop watches for readability, edge-triggered: it becomes readable
    /// when deliveries wait. [`next`](Self::next) drains it.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.me().inbox.wake_rx.as_fd()
    }

    /// The loop serves from now on: siblings' connects are taken.
    pub fn open(&self) {
        self.me().inbox.lock().open = true;
    }

    /// The loop stopped serving: connects waiting are dropped (each sibling's guest gets an
    /// RST) and the siblings are told the VM went away.
    pub fn close(&self) {
        self.close_with(Vec::new());
    }

    /// As [`close`](Self::close), handing the siblings this VM's ends of their connections
    /// with it, as [`gone_with`](Self::gone_with) does.
    pub fn close_with(&self, sockets: Vec<(u64, UnixStream)>) {
        let dropped = {
            let mut inbox = self.me().inbox.lock();
            inbox.open = false;
            inbox.connects = 0;
            inbox.inspections = 0;
            std::mem::take(&mut inbox.items)
        };
        drop(dropped);
        self.gone_with(sockets);
    }

    /// The VM's guest forgot its connections (its device reset or stopped): every sibling
    /// resets its connections with it.
    pub fn gone(&self) {
        self.gone_with(Vec::new());
    }

    /// As [`gone`](Self::gone), handing each sibling this VM's ends of its connections with
    /// it (`(sibling CID, socket)`), to close once it has reset them.
    pub fn gone_with(&self, mut sockets: Vec<(u64, UnixStream)>) {
        let me = self.me();
        for vm in self.siblings.vms.iter() {
            if vm.cid != me.cid && Siblings::shares_group(me, vm) {
                let (theirs, rest) = sockets.into_iter().partition(|(cid, _)| *cid == vm.cid);
                sockets = rest;
                vm.inbox
                    .post_gone(me.cid, theirs.into_iter().map(|(_, s)| s).collect());
            }
        }
    }

    /// The guest's connection from `from_port` to `(cid, port)`: the device's end of a
    /// non-blocking socket pair of `socket_type`, whose other end waits in the sibling's
    /// inbox.
    ///
    /// # Errors
    ///
    /// `EHOSTUNREACH` when no VM with `cid` shares a group with this one (the host's CID, the
    /// guest's own, an unknown one); `ECONNREFUSED` when the sibling is not serving or its
    /// inbox is full; the pair's own errors (`EMFILE`).
    pub fn connect(
        &self,
        cid: u64,
        from_port: u32,
        port: u32,
        socket_type: SocketType,
    ) -> io::Result<UnixStream> {
        let me = self.me();
        let Some(peer) = self
            .siblings
            .vms
            .iter()
            .find(|vm| vm.cid == cid && vm.cid != me.cid && Siblings::shares_group(me, vm))
        else {
            return Err(io::Error::from_raw_os_error(EHOSTUNREACH));
        };
        let ty = match socket_type {
            SocketType::Stream => Type::STREAM,
            SocketType::SeqPacket => Type::SEQPACKET,
        };
        let (ours, theirs) = Socket::pair(Domain::UNIX, ty.cloexec(), None)?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        peer.inbox.post_connect(Delivery::Connect {
            socket: UnixStream::from(theirs),
            peer_cid: me.cid,
            peer_port: from_port,
            port,
            socket_type,
        })?;
        debug!(from = me.cid, to = cid, port, "sibling connect posted");
        Ok(UnixStream::from(ours))
    }

    /// The next delivery, if any. The loop calls it when the wake descriptor was readable,
    /// until it returns `None` (or stops after a batch, and comes back).
    pub fn next(&self) -> Option<Delivery> {
        let inbox = &self.me().inbox;
        // The wake bytes first: a delivery posted after this is either taken below or wakes
        // the loop again.
        inbox.drain_wake();
        let mut state = inbox.lock();
        let item = state.items.pop_front()?;
        match item {
            Delivery::Connect { .. } => state.connects -= 1,
            Delivery::Inspect { .. } => state.inspections -= 1,
            Delivery::PeerGone { .. } => {}
        }
        Some(item)
    }

    /// Whether deliveries wait.
    pub fn pending(&self) -> bool {
        !self.me().inbox.lock().items.is_empty()
    }
}

struct Inbox {
    state: Mutex<InboxState>,
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

#[derive(Default)]
struct InboxState {
    open: bool,
    items: VecDeque<Delivery>,
    /// Of `items`, connects (bounded by [`INBOX_CONNECTS`]).
    connects: usize,
    /// Of `items`, inspections (bounded by [`INBOX_INSPECTIONS`]).
    inspections: usize,
}

impl Inbox {
    fn new() -> io::Result<Inbox> {
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(Inbox {
            state: Mutex::new(InboxState::default()),
            wake_tx,
            wake_rx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // The state stays consistent whatever a holder did: a panic elsewhere never poisons
        // the routing of the other VMs.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn post_connect(&self, delivery: Delivery) -> io::Result<()> {
        let was_empty = {
            let mut state = self.lock();
            if !state.open || state.connects >= INBOX_CONNECTS {
                return Err(io::Error::from_raw_os_error(ECONNREFUSED));
            }
            state.connects += 1;
            let was_empty = state.items.is_empty();
            state.items.push_back(delivery);
            was_empty
        };
        if was_empty {
            self.wake();
        }
        Ok(())
    }

    /// Asks the loop for a snapshot; the receiver gets it. `None` if the loop is not serving
    /// or too many inspections wait.
    fn post_inspect(&self) -> Option<std::sync::mpsc::Receiver<Snapshot>> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let was_empty = {
            let mut state = self.lock();
            if !state.open || state.inspections >= INBOX_INSPECTIONS {
                return None;
            }
            state.inspections += 1;
            let was_empty = state.items.is_empty();
            state.items.push_back(Delivery::Inspect { reply });
            was_empty
        };
        if was_empty {
            self.wake();
        }
        Some(answer)
    }

    fn post_gone(&self, cid: u64, mut sockets: Vec<UnixStream>) {
        let was_empty = {
            let mut state = self.lock();
            if !state.open {
                return;
            }
            // One notice per departure is enough: when the last thing queued about that
            // sibling is already its departure, its sockets join that one. (So the notices
            // stay bounded by the connects between them, plus one per sibling.)
            let last = state.items.iter_mut().rev().find(|d| match d {
                Delivery::Connect { peer_cid, .. } => *peer_cid == cid,
                Delivery::PeerGone { cid: c, .. } => *c == cid,
                Delivery::Inspect { .. } => false,
            });
            if let Some(Delivery::PeerGone {
                sockets: queued, ..
            }) = last
            {
                queued.append(&mut sockets);
                return;
            }
            let was_empty = state.items.is_empty();
            state.items.push_back(Delivery::PeerGone { cid, sockets });
            was_empty
        };
        if was_empty {
            self.wake();
        }
    }

    fn wake(&self) {
        // A full wake socket already holds a wake-up.
        let _ = (&self.wake_tx).write(&[1]);
    }

    fn drain_wake(&self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = (&self.wake_rx).read(&mut buf) {
            if n < buf.len() {
                break;
            }
        }
    }
}
