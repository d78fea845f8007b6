//! The device model and its one synchronous "serve the queues" section.

use std::fmt;
use std::os::fd::BorrowedFd;

use tracing::{debug, trace};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestMemory;
use vsock_core::wire::{
    ConfigSpace, Event, Header, EVENT_TRANSPORT_RESET, HEADER_LEN,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_STREAM,
};
use vsock_core::{
    Action, Config, ConfigError, ConnId, Engine, GuestBytes, Instant, Io, MemoryFault, RxGrant,
    SocketError, Tx,
};
use zerocopy::IntoBytes;

use crate::memory::{PayloadBytes, Seg, Span};

/// The host sockets, as the device needs them. Each runtime implements this over its socket
/// table; tests implement it over their own sockets.
pub trait HostSockets {
    /// The socket of a live connection, for reads and writes straight between it and guest
    /// memory. `None` if the caller has no socket for it (the connection is then reset).
    fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>>;

    /// Carries out one engine action (connect, read the `CONNECT` line, shut down, change
    /// interest, close), reporting results back to `engine`. [`Action::Flush`] never reaches
    /// it: the device writes to sockets itself (see the crate documentation).
    fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action);
}

/// The three queues of a vsock device, borrowed for one [`VsockDevice::serve`] call.
pub struct Queues<'a> {
    /// Queue 0: packets to the guest.
    pub rx: &'a mut Queue,
    /// Queue 1: packets from the guest.
    pub tx: &'a mut Queue,
    /// Queue 2: events to the guest.
    pub event: &'a mut Queue,
}

/// What a [`VsockDevice::serve`] call did, and what its caller must do next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Served {
    /// Interrupt the guest for the rx queue.
    pub notify_rx: bool,
    /// Interrupt the guest for the tx queue.
    pub notify_tx: bool,
    /// Interrupt the guest for the event queue.
    pub notify_event: bool,
    /// The work budget ran out with work left: call `serve` again soon, without waiting for
    /// an event.
    pub more: bool,
}

/// Why the device could not serve.
#[derive(Debug)]
pub enum DeviceError {
    /// The device is not activated.
    NotActivated,
    /// A queue's rings could not be accessed (bad addresses from the driver).
    Queue(virtio_queue::Error),
    /// Restored features this device would have refused.
    Features(FeatureError),
    /// The saved state belongs to a device serving another guest CID.
    GuestCid {
        /// The CID in the saved state.
        saved: u64,
        /// The CID this device serves.
        ours: u64,
    },
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::NotActivated => f.write_str("device not activated"),
            DeviceError::Queue(e) => write!(f, "virtqueue error: {e}"),
            DeviceError::Features(e) => write!(f, "restored features refused: {e}"),
            DeviceError::GuestCid { saved, ours } => {
                write!(
                    f,
                    "saved state is for guest CID {saved}, this device serves {ours}"
                )
            }
        }
    }
}

impl std::error::Error for DeviceError {}

impl From<FeatureError> for DeviceError {
    fn from(e: FeatureError) -> Self {
        DeviceError::Features(e)
    }
}

impl From<virtio_queue::Error> for DeviceError {
    fn from(e: virtio_queue::Error) -> Self {
        DeviceError::Queue(e)
    }
}

/// Why a driver's features were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureError {
    /// The driver acknowledged bits the device never offered.
    NotOffered(u64),
    /// The driver negotiated neither stream sockets nor an implied stream
    /// (`NO_IMPLIED_STREAM` without `STREAM`): it could use nothing this device serves.
    NoStream,
}

impl fmt::Display for FeatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureError::NotOffered(bits) => write!(f, "features {bits:#x} were not offered"),
            FeatureError::NoStream => f.write_str("driver negotiated no stream socket support"),
        }
    }
}

impl std::error::Error for FeatureError {}

/// Counters of the device layer: what happened to descriptor chains. The engine's own
/// counters are in [`Engine::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceStats {
    /// Tx chains taken from the guest (every one is returned to the used ring, except a head
    /// index out of range, which names no descriptor to return).
    pub tx_chains: u64,
    /// Rx chains filled and returned.
    pub rx_chains: u64,
    /// Event chains filled and returned.
    pub event_chains: u64,
    /// Tx chain with a write-only descriptor: dropped, returned with length 0.
    pub tx_write_only: u64,
    /// Tx chain shorter than a header: dropped.
    pub tx_too_short: u64,
    /// Tx chain whose header announces more payload than the chain holds: the connection is
    /// reset.
    pub tx_len_beyond_chain: u64,
    /// Tx chain pointing outside guest memory, or broken (a loop, an index out of range, an
    /// unusable indirect table): dropped. If only its payload is unreachable, the connection
    /// it addressed is reset.
    pub tx_bad_memory: u64,
    /// Rx chain with a read-only descriptor: returned empty.
    pub rx_read_only: u64,
    /// Rx chain too short for a header, or with no room for the data that is waiting:
    /// returned empty.
    pub rx_too_short: u64,
    /// Rx chain pointing outside guest memory, or broken (as for `tx_bad_memory`): returned
    /// empty.
    pub rx_bad_memory: u64,
    /// Event chain unusable (read-only, short, outside memory or broken): returned empty.
    pub event_bad_chain: u64,
    /// Config space writes (the space is read-only): ignored.
    pub config_writes: u64,
    /// Times the guest was interrupted, per [`Served`].
    pub notifications: u64,
}

/// Device state as plain data, for save and restore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The guest CID the device served.
    pub guest_cid: u64,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// Whether the device was activated.
    pub activated: bool,
    /// The rx, tx and event queues.
    pub queues: [QueueState; 3],
}

/// How many chains one `serve` call takes from each queue before yielding.
const CHAIN_BUDGET: usize = 256;

/// A virtio-vsock device: the engine bound to virtqueues in guest memory.
pub struct VsockDevice {
    engine: Engine,
    acked_features: u64,
    activated: bool,
    /// A TRANSPORT_RESET event is owed to the guest.
    event_owed: bool,
    stats: DeviceStats,
    /// Scratch space for flattening a chain, reserved once.
    segs: Vec<Seg>,
}

impl fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.engine.config().guest_cid)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl VsockDevice {
    /// The virtio device type of vsock.
    pub const DEVICE_TYPE: u32 = vsock_core::wire::DEVICE_TYPE;
    /// Number of queues.
    pub const QUEUE_COUNT: usize = 3;
    /// The longest descriptor chain the device flattens (longer chains are malformed).
    pub const MAX_CHAIN: usize = 1024;

    /// A device serving the guest described by `config`.
    pub fn new(config: Config, now: Instant) -> Result<Self, ConfigError> {
        Ok(VsockDevice {
            engine: Engine::new(config, now)?,
            acked_features: 0,
            activated: false,
            event_owed: false,
            stats: DeviceStats::default(),
            segs: Vec::with_capacity(Self::MAX_CHAIN),
        })
    }

    /// The features the device offers.
    pub fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_VSOCK_F_STREAM
            | 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM
    }

    /// Records the features the driver acknowledged.
    ///
    /// # Errors
    ///
    /// Refuses bits that were not offered, and a driver that negotiated `NO_IMPLIED_STREAM`
    /// without `STREAM` (it could use nothing here).
    pub fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        self.check_features(features)?;
        self.acked_features = features;
        Ok(())
    }

    fn check_features(&self, features: u64) -> Result<(), FeatureError> {
        let extra = features & !self.features();
        if extra != 0 {
            return Err(FeatureError::NotOffered(extra));
        }
        let stream = features & 1 << VIRTIO_VSOCK_F_STREAM != 0;
        let no_implied = features & 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM != 0;
        if no_implied && !stream {
            return Err(FeatureError::NoStream);
        }
        Ok(())
    }

    /// The features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver negotiated `VIRTIO_RING_F_EVENT_IDX`.
    pub fn event_idx(&self) -> bool {
        self.acked_features & 1 << VIRTIO_RING_F_EVENT_IDX != 0
    }

    /// Reads the config space (the guest CID, le64) at any offset and width. Bytes past its
    /// end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = ConfigSpace {
            guest_cid: self.engine.config().guest_cid.into(),
        };
        let bytes = space.as_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A driver write to the config space: it is read-only, so this is ignored and counted.
    pub fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        self.stats.config_writes += 1;
    }

    /// Activates the device on its three queues, after feature negotiation.
    pub fn activate(&mut self, queues: Queues<'_>) {
        let event_idx = self.event_idx();
        queues.rx.set_event_idx(event_idx);
        queues.tx.set_event_idx(event_idx);
        queues.event.set_event_idx(event_idx);
        self.activated = true;
        debug!(event_idx, "device activated");
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Resets the device: every connection is dropped on the host side (the guest driver has
    /// forgotten them too), features are cleared. The device holds no descriptor between
    /// `serve` calls, so nothing else is owed to the guest.
    ///
    /// The dropped connections' sockets are closed by the next [`serve`](Self::serve) call,
    /// which then reports [`DeviceError::NotActivated`] until the device is activated again.
    pub fn reset(&mut self, now: Instant) {
        self.engine.reset(now);
        self.acked_features = 0;
        self.activated = false;
        self.event_owed = false;
        debug!("device reset");
    }

    /// Stops the device because its queues stopped while the driver may keep its state (a
    /// paused VM): every connection is dropped (see [`Engine::stop`]), each owing the guest an
    /// RST that [`serve`](Self::serve) sends once the device is activated again. The dropped
    /// connections' sockets are closed by [`perform_actions`](Self::perform_actions) or the
    /// next `serve`.
    pub fn stop(&mut self, now: Instant) {
        self.engine.stop(now);
        self.activated = false;
        self.event_owed = false;
        debug!("device stopped");
    }

    /// The device state as plain data.
    pub fn save(&self, queues: &Queues<'_>) -> DeviceState {
        DeviceState {
            guest_cid: self.engine.config().guest_cid,
            acked_features: self.acked_features,
            activated: self.activated,
            queues: [queues.rx.state(), queues.tx.state(), queues.event.state()],
        }
    }

    /// Restores a saved state and returns its queues. Connections do not survive: the engine
    /// forgets them (closing their sockets) and the guest is sent a TRANSPORT_RESET so that it
    /// drops them too and can connect again.
    ///
    /// # Errors
    ///
    /// A queue state that does not describe a valid queue, or features this device would have
    /// refused (saved state is untrusted input). Nothing changes then.
    pub fn restore(
        &mut self,
        now: Instant,
        state: &DeviceState,
    ) -> Result<[Queue; 3], DeviceError> {
        let queues = [
            Queue::try_from(state.queues[0])?,
            Queue::try_from(state.queues[1])?,
            Queue::try_from(state.queues[2])?,
        ];
        self.check_features(state.acked_features)?;
        let ours = self.engine.config().guest_cid;
        if state.guest_cid != ours {
            return Err(DeviceError::GuestCid {
                saved: state.guest_cid,
                ours,
            });
        }
        self.engine.reset(now);
        self.acked_features = state.acked_features;
        self.activated = state.activated;
        self.event_owed = state.activated;
        debug!("device restored; transport reset owed");
        Ok(queues)
    }

    /// The engine, for the runtime's socket events and timers.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, for the runtime's socket events and timers.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Device counters.
    pub fn stats(&self) -> &DeviceStats {
        &self.stats
    }

    /// Serves the queues: the one synchronous section every runtime runs when woken (by a
    /// queue kick, socket readiness or a timer, after feeding the engine).
    ///
    /// It fires the engine's due deadlines, takes the guest's tx packets (writing payload
    /// straight to sockets), performs the
    /// engine's socket actions, fills rx buffers (reading sockets straight into them), sends an
    /// owed transport reset, and reports which queues need an interrupt: one per queue per
    /// call, after all its used entries, as virtio-queue's notification rules prescribe
    /// (disable, drain, re-enable, re-check).
    ///
    /// # Errors
    ///
    /// [`DeviceError::NotActivated`] before activation (after closing the sockets a reset
    /// left owed); [`DeviceError::Queue`] if a queue's rings are unreachable or its available
    /// index runs more than a queue ahead. Malformed chains are never errors: each is
    /// returned to the guest and counted.
    pub fn serve<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queues: Queues<'_>,
        host: &mut H,
    ) -> Result<Served, DeviceError> {
        self.fire_deadlines(now);
        if !self.activated {
            // A reset (or a restore of an inactive device) leaves the engine owing the
            // sockets of the forgotten connections their close: carry that out, so host
            // applications see their connection end without waiting for a re-activation.
            self.drain_actions(now, host);
            return Err(DeviceError::NotActivated);
        }
        let mut served = Served::default();
        let Queues { rx, tx, event } = queues;

        if self.event_owed {
            served.notify_event = self.send_transport_reset(mem, event)?;
        }

        let (tx_used, tx_more) = self.process_tx(now, mem, tx, host)?;
        let mut rx_used = false;
        // One budget for the whole call: rx work is bounded however the rounds go.
        let mut rx_budget = CHAIN_BUDGET;
        let rx_more = loop {
            let acted = self.drain_actions(now, host);
            let (used, more) = self.process_rx(now, mem, rx, host, &mut rx_budget)?;
            rx_used |= used;
            // Delivering packets may owe actions (a delivered RST closes a socket) and
            // actions may make packets (a flush frees credit): go round until both are quiet.
            if more || (!acted && !used) {
                break more;
            }
        };
        if tx_used && tx.needs_notification(mem)? {
            served.notify_tx = true;
        }
        if rx_used && rx.needs_notification(mem)? {
            served.notify_rx = true;
        }
        served.more = tx_more || rx_more;
        self.stats.notifications += u64::from(served.notify_rx)
            + u64::from(served.notify_tx)
            + u64::from(served.notify_event);
        Ok(served)
    }

    /// The work that needs no guest: fires the engine's due deadlines and carries out the
    /// socket actions the engine owes (closing a host client whose `CONNECT` line or guest
    /// answer timed out, flushing, closing). For when there are no queues to
    /// [`serve`](Self::serve) (no VM attached yet, a VM booting, the gap between two VMs):
    /// afterwards the engine's next deadline lies in the future, never in the past, so a loop
    /// that sleeps until it cannot spin. `serve` does this itself.
    pub fn serve_host<H: HostSockets>(&mut self, now: Instant, host: &mut H) {
        self.fire_deadlines(now);
        self.drain_actions(now, host);
    }

    fn fire_deadlines(&mut self, now: Instant) {
        if self.engine.poll_timeout().is_some_and(|t| t <= now) {
            self.engine.handle_timeout(now);
        }
    }

    /// Carries out the socket actions the engine owes, without the queues: after a
    /// [`reset`](Self::reset), this closes the dropped connections' sockets at once, even when
    /// the queues are gone with the frontend that owned them. Returns whether there were any.
    pub fn perform_actions<H: HostSockets>(&mut self, now: Instant, host: &mut H) -> bool {
        self.drain_actions(now, host)
    }

    fn drain_actions<H: HostSockets>(&mut self, now: Instant, host: &mut H) -> bool {
        let mut acted = false;
        while let Some(action) = self.engine.poll_action() {
            acted = true;
            match action {
                Action::Flush { conn } => self.flush(now, conn, host),
                other => host.perform(now, &mut self.engine, other),
            }
        }
        acted
    }

    /// Writes what the engine holds for `conn`'s socket (the rest of the `OK` line, or guest
    /// bytes the socket refused before): the device owns every write to a socket, this one and
    /// the direct write of a tx payload from guest memory.
    fn flush<H: HostSockets>(&mut self, now: Instant, conn: ConnId, host: &H) {
        let Ok(bufs) = self.engine.host_bytes(conn) else {
            return;
        };
        let result = match host.fd(conn) {
            Some(fd) => crate::memory::send_host_bytes(fd, bufs),
            None => Err(std::io::Error::from_raw_os_error(libc::EBADF)),
        };
        let _ = self
            .engine
            .handle_host_write(now, conn, Io::from_result(&result));
    }

    /// Sends the owed TRANSPORT_RESET in the first usable event buffer (unusable ones are
    /// returned empty on the way). Returns whether the guest must be notified.
    fn send_transport_reset<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut stalled = false;
        for _ in 0..CHAIN_BUDGET {
            if !self.event_owed {
                break;
            }
            if let Some(chain) = queue.pop_descriptor_chain(mem) {
                stalled = false;
                used |= self.event_chain(mem, queue, chain)?;
                continue;
            }
            // No buffer yet: stays owed until the driver posts one.
            if !queue.enable_notification(mem)? {
                break;
            }
            check_stall(queue, mem, false, &mut stalled)?;
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Fills one event chain with the TRANSPORT_RESET. Returns whether it was returned to the
    /// used ring.
    fn event_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
        chain: DescriptorChain<&M>,
    ) -> Result<bool, DeviceError> {
        let head = chain.head_index();
        let event = Event {
            id: EVENT_TRANSPORT_RESET.into(),
        };
        let len = match self.flatten(chain, true) {
            Ok(total) if total >= 4 => {
                let span = Span::new(&self.segs, 0, total);
                match span.write(mem, 0, event.as_bytes()) {
                    Ok(()) => {
                        self.event_owed = false;
                        self.stats.event_chains += 1;
                        debug!("sent TRANSPORT_RESET");
                        4
                    }
                    Err(MemoryFault) => {
                        self.stats.event_bad_chain += 1;
                        0
                    }
                }
            }
            _ => {
                self.stats.event_bad_chain += 1;
                0
            }
        };
        // A head out of range names no descriptor: nothing to return.
        if head >= queue.size() {
            return Ok(false);
        }
        queue.add_used(mem, head, len)?;
        Ok(true)
    }

    /// Flattens a chain's descriptors into `self.segs`: all write-only if `writable`, all
    /// readable otherwise. Returns the total length, or `Err(wrong_direction)` if a descriptor
    /// goes the wrong way (`true`) or the chain is too long, too large or broken (`false`).
    fn flatten<M>(&mut self, chain: DescriptorChain<M>, writable: bool) -> Result<usize, bool>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        self.segs.clear();
        let mut total: usize = 0;
        let mut descriptors = 0usize;
        let mut last_has_next = false;
        for desc in chain {
            if desc.is_write_only() != writable {
                return Err(true);
            }
            if self.segs.len() == Self::MAX_CHAIN {
                return Err(false);
            }
            total = total.checked_add(desc.len() as usize).ok_or(false)?;
            descriptors += 1;
            last_has_next = desc.has_next();
            if desc.len() > 0 {
                self.segs.push(Seg {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
        }
        // virtio-queue ends the iteration silently when the chain breaks: a head or `next`
        // index out of range, a descriptor or indirect table it cannot read, a bad indirect
        // table, or a loop (cut after as many descriptors as the queue or table holds). A chain
        // that yielded nothing, or whose last descriptor still points to a next one, is such a
        // broken chain, not a short one.
        if descriptors == 0 || last_has_next {
            return Err(false);
        }
        Ok(total)
    }

    /// Takes tx chains. Returns (any used, budget exhausted).
    fn process_tx<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queue: &mut Queue,
        host: &mut H,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let mut budget = CHAIN_BUDGET;
        let mut stalled = false;
        loop {
            queue.disable_notification(mem)?;
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                self.tx_chain(now, mem, chain, host);
                self.stats.tx_chains += 1;
                // Every tx chain goes back, malformed or not; a head out of range (counted as
                // unreadable by `tx_chain`) names no descriptor, so there is nothing to return.
                if head < queue.size() {
                    queue.add_used(mem, head, 0)?;
                    used = true;
                }
                budget -= 1;
                if budget == 0 {
                    return Ok((used, true));
                }
            }
            if !queue.enable_notification(mem)? {
                return Ok((used, false));
            }
            check_stall(queue, mem, popped, &mut stalled)?;
        }
    }

    fn tx_chain<M, H>(&mut self, now: Instant, mem: &M, chain: DescriptorChain<&M>, host: &mut H)
    where
        M: GuestMemory,
        H: HostSockets,
    {
        let total = match self.flatten(chain, false) {
            Ok(total) => total,
            Err(true) => {
                self.stats.tx_write_only += 1;
                return;
            }
            Err(false) => {
                self.stats.tx_bad_memory += 1;
                return;
            }
        };
        if total < HEADER_LEN {
            self.stats.tx_too_short += 1;
            return;
        }
        let all = Span::new(&self.segs, 0, total);
        let mut raw = [0u8; HEADER_LEN];
        if all.read(mem, 0, &mut raw).is_err() {
            self.stats.tx_bad_memory += 1;
            return;
        }
        let header = Header::read_from(&raw).expect("HEADER_LEN bytes make a header");
        let len = header.len.get() as usize;
        let available = total - HEADER_LEN;
        trace!(?header, total, "tx chain");
        match self.engine.handle_tx(now, &header) {
            Tx::Done => {}
            Tx::Data(data) if len > available => {
                // The header claims bytes the chain does not have: they cannot be delivered,
                // so the connection must not go on as if they were.
                self.stats.tx_len_beyond_chain += 1;
                let _ = data.complete(Io::Done(0), &mut Unreadable);
            }
            Tx::Data(data) if !Span::new(&self.segs, HEADER_LEN, len).in_memory(mem) => {
                // The payload lies (partly) outside guest memory: it cannot be delivered
                // either. Checked up front, so no byte of it reaches the socket.
                self.stats.tx_bad_memory += 1;
                let _ = data.complete(Io::Done(0), &mut Unreadable);
            }
            Tx::Data(data) => {
                let payload = Span::new(&self.segs, HEADER_LEN, len);
                let written = if data.direct() {
                    match host.fd(data.conn()) {
                        Some(fd) => match payload.write_to_fd(mem, len, fd) {
                            Ok(r) => Io::from_result(&r),
                            Err(MemoryFault) => Io::Done(0),
                        },
                        None => Io::Error(SocketError(libc::EBADF)),
                    }
                } else {
                    Io::Done(0)
                };
                let mut bytes = PayloadBytes { mem, span: payload };
                if data.complete(written, &mut bytes).is_err() {
                    // A write that claims more than was offered: the engine reset it.
                    debug!("socket reported more bytes than offered");
                }
            }
        }
    }

    /// Fills rx chains, at most `budget` of them. Returns (any used, budget exhausted with
    /// packets still waiting).
    fn process_rx<M: GuestMemory, H: HostSockets>(
        &mut self,
        now: Instant,
        mem: &M,
        queue: &mut Queue,
        host: &mut H,
        budget: &mut usize,
    ) -> Result<(bool, bool), DeviceError> {
        let mut used = false;
        let mut stalled = false;
        loop {
            queue.disable_notification(mem)?;
            let mut popped = false;
            while self.engine.has_pending_rx() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    break;
                };
                popped = true;
                let head = chain.head_index();
                match self.rx_chain(now, mem, chain, host) {
                    // A head out of range (counted as unreadable by `rx_chain`) names no
                    // descriptor: nothing to return.
                    Some(_) if head >= queue.size() => {}
                    Some(len) => {
                        queue.add_used(mem, head, len)?;
                        self.stats.rx_chains += 1;
                        used = true;
                    }
                    None => {
                        // Nothing to send after all: give the buffer back unused.
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        return Ok((used, false));
                    }
                }
                *budget -= 1;
                if *budget == 0 {
                    return Ok((used, self.engine.has_pending_rx()));
                }
            }
            if !self.engine.has_pending_rx() {
                return Ok((used, false));
            }
            // Out of buffers with packets waiting: ask to be kicked when the guest posts more,
            // unless it already did.
            if !queue.enable_notification(mem)? {
                return Ok((used, false));
            }
            check_stall(queue, mem, popped, &mut stalled)?;
        }
    }

    /// Fills one rx chain. Returns the used length, or `None` if there was nothing to send.
    fn rx_chain<M, H>(
        &mut self,
        now: Instant,
        mem: &M,
        chain: DescriptorChain<&M>,
        host: &mut H,
    ) -> Option<u32>
    where
        M: GuestMemory,
        H: HostSockets,
    {
        let total = match self.flatten(chain, true) {
            Ok(total) => total,
            Err(true) => {
                self.stats.rx_read_only += 1;
                return Some(0);
            }
            Err(false) => {
                self.stats.rx_bad_memory += 1;
                return Some(0);
            }
        };
        if total < HEADER_LEN {
            self.stats.rx_too_short += 1;
            return Some(0);
        }
        if !self.segs.iter().all(|s| {
            mem.check_range(
                vm_memory::GuestAddress(s.addr),
                s.len as usize,
                vm_memory::Permissions::Write,
            )
        }) {
            self.stats.rx_bad_memory += 1;
            return Some(0);
        }
        let all = Span::new(&self.segs, 0, total);
        let room = (total - HEADER_LEN).min(u32::MAX as usize - HEADER_LEN);
        loop {
            let Some(grant) = self.engine.poll_rx(now, room) else {
                if room == 0 && self.engine.has_pending_rx() {
                    // Only data is waiting and this buffer has no room for any: it can never
                    // be filled, and putting it back would stop the ring behind it.
                    self.stats.rx_too_short += 1;
                    return Some(0);
                }
                return None;
            };
            match grant {
                RxGrant::Packet(packet) => {
                    let payload_len = packet.payload().len();
                    // The whole chain was checked above, so these writes stay in guest memory.
                    if all.write(mem, HEADER_LEN, packet.payload()).is_err()
                        || all.write(mem, 0, packet.header().as_bytes()).is_err()
                    {
                        self.stats.rx_bad_memory += 1;
                        return Some(0);
                    }
                    let _ = packet.send();
                    return Some((HEADER_LEN + payload_len) as u32);
                }
                RxGrant::Read(read) => {
                    let conn = read.conn();
                    let data = Span::new(&self.segs, HEADER_LEN, room);
                    let io = match host.fd(read.conn()) {
                        Some(fd) => match data.read_from_fd(mem, read.max(), fd) {
                            Ok(r) => Io::from_result(&r),
                            Err(MemoryFault) => {
                                self.stats.rx_bad_memory += 1;
                                return Some(0);
                            }
                        },
                        None => Io::Error(SocketError(libc::EBADF)),
                    };
                    // The recorder, if any, reads the bytes back from the buffer.
                    let mut bytes = PayloadBytes { mem, span: data };
                    match read.complete(io, &mut bytes) {
                        Ok(Some(header)) => {
                            // Publish the header only now that the data is in.
                            if all.write(mem, 0, header.as_bytes()).is_err() {
                                // The bytes left the socket but never reached the guest:
                                // the stream cannot go on as if they had.
                                self.stats.rx_bad_memory += 1;
                                let _ = self.engine.reset_connection(now, conn);
                                return Some(0);
                            }
                            return Some((HEADER_LEN + header.len.get() as usize) as u32);
                        }
                        // Would block, or failed (the connection is reset): try the next one.
                        Ok(None) | Err(_) => continue,
                    }
                }
            }
        }
    }
}

/// A payload that cannot be read: the chain ended before it.
struct Unreadable;

impl GuestBytes for Unreadable {
    fn copy_to(&mut self, _offset: usize, _dst: &mut [u8]) -> Result<(), MemoryFault> {
        Err(MemoryFault)
    }
}

/// Called when `enable_notification` reports chains still available after the pop loop.
/// That is normal once (the driver posted meanwhile), but two rounds in a row that pop
/// nothing mean the ring cannot be popped at all: an available index more than a queue ahead
/// of the device, or an available ring outside guest memory. `pop_descriptor_chain` hides
/// that as "no chain", so without this check the caller would spin forever.
fn check_stall<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    popped: bool,
    stalled: &mut bool,
) -> Result<(), DeviceError> {
    if popped {
        *stalled = false;
        return Ok(());
    }
    if !*stalled {
        *stalled = true;
        return Ok(());
    }
    debug!("available ring cannot be popped");
    Err(DeviceError::Queue(
        queue
            .iter(mem)
            .err()
            .unwrap_or(virtio_queue::Error::InvalidAvailRingIndex),
    ))
}
