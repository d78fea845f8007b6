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
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM, VIRTIO_VSOCK_F_SEQPACKET, VIRTIO_VSOCK_F_STREAM,
};
use vsock_core::{
    Action, Config, ConfigError, ConnId, Engine, GuestBytes, Instant, Io, MemoryFault, RxGrant,
    SocketError, SocketTypes, Tx,
};
use zerocopy::IntoBytes;

use crate::memory::{PayloadBytes, Seg, Span};

mod serve;

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
    /// The driver negotiated no socket type at all (`NO_IMPLIED_STREAM` without `STREAM` or
    /// `SEQPACKET`): it could use nothing this device serves.
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

vsock_core::counters! {
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
    /// A host seqpacket message waited for the guest to post more rx buffers: it takes
    /// several, and fewer were available.
    pub rx_message_waits: u64,
    /// A host seqpacket message no posted ring could ever hold (more buffers than the queue
    /// has, or more pieces of memory than one read takes): the connection was reset.
    pub rx_message_unplaceable: u64,
    /// A host seqpacket message was read with its tail into the engine's stage, the guest
    /// having posted too few rx buffers for all of it; the tail follows as buffers come.
    pub rx_message_staged: u64,
    /// Config space writes (the space is read-only): ignored.
    pub config_writes: u64,
    /// Times the guest was interrupted, per [`Served`].
    pub notifications: u64,
}
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

/// One rx chain of a host message: its head index, its segments in `msg_segs`, and its
/// payload room (0 if it is unusable, and returned empty).
#[derive(Clone, Copy, Debug)]
struct MsgChain {
    head: u16,
    segs: (usize, usize),
    room: usize,
}

/// How many chains one `serve` call takes from each queue before yielding.
const CHAIN_BUDGET: usize = 256;

/// A virtio-vsock device: the engine bound to virtqueues in guest memory.
pub struct VsockDevice {
    engine: Engine,
    /// Whether `VIRTIO_VSOCK_F_SEQPACKET` is offered.
    seqpacket: bool,
    acked_features: u64,
    activated: bool,
    /// A TRANSPORT_RESET event is owed to the guest.
    event_owed: bool,
    /// How many times every connection was dropped (reset, stop, restore).
    epoch: u64,
    stats: DeviceStats,
    /// Scratch space for flattening a chain, reserved once.
    segs: Vec<Seg>,
    /// Scratch space for the rx chains one host message is read into: their segments, one
    /// after the other, and per chain its head, where its segments start, and its payload
    /// room (0 for an unusable chain). Reserved once.
    msg_segs: Vec<Seg>,
    msg_chains: Vec<MsgChain>,
    msg_rooms: Vec<usize>,
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
            seqpacket: true,
            acked_features: 0,
            activated: false,
            event_owed: false,
            epoch: 0,
            stats: DeviceStats::default(),
            segs: Vec::with_capacity(Self::MAX_CHAIN),
            msg_segs: Vec::with_capacity(crate::memory::MAX_MSG_IOV),
            msg_chains: Vec::with_capacity(crate::memory::MAX_MSG_IOV),
            msg_rooms: Vec::with_capacity(crate::memory::MAX_MSG_IOV),
        })
    }

    /// Whether to offer seqpacket sockets (`VIRTIO_VSOCK_F_SEQPACKET`); they are offered
    /// unless switched off. For before feature negotiation: the driver's choice is read from
    /// the features it acknowledges.
    pub fn set_seqpacket(&mut self, offer: bool) {
        self.seqpacket = offer;
    }

    /// The features the device offers.
    pub fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_VSOCK_F_STREAM
            | 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM
            | u64::from(self.seqpacket) << VIRTIO_VSOCK_F_SEQPACKET
    }

    /// The socket types the acknowledged features allow: streams if `STREAM` was acked or
    /// not excluded by `NO_IMPLIED_STREAM` (Linux acks only `SEQPACKET`, relying on streams
    /// being implied), seqpacket if `SEQPACKET` was acked.
    pub fn socket_types(&self) -> SocketTypes {
        let f = self.acked_features;
        SocketTypes {
            stream: f & 1 << VIRTIO_VSOCK_F_STREAM != 0
                || f & 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM == 0,
            seqpacket: f & 1 << VIRTIO_VSOCK_F_SEQPACKET != 0,
        }
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
        let seqpacket = features & 1 << VIRTIO_VSOCK_F_SEQPACKET != 0;
        let no_implied = features & 1 << VIRTIO_VSOCK_F_NO_IMPLIED_STREAM != 0;
        if no_implied && !stream && !seqpacket {
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

    /// Activates the device on its three queues, after feature negotiation: from now on the
    /// engine serves the socket types the driver negotiated.
    pub fn activate(&mut self, queues: Queues<'_>) {
        let event_idx = self.event_idx();
        queues.rx.set_event_idx(event_idx);
        queues.tx.set_event_idx(event_idx);
        queues.event.set_event_idx(event_idx);
        self.activated = true;
        self.apply_socket_types();
        debug!(event_idx, types = ?self.socket_types(), "device activated");
    }

    /// Tells the engine which socket types the driver negotiated.
    fn apply_socket_types(&mut self) {
        let types = self.socket_types();
        if self.engine.socket_types() != types {
            let now = self.engine.now();
            self.engine.set_socket_types(now, types);
        }
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// How many times the device dropped every connection: each [`reset`](Self::reset),
    /// [`stop`](Self::stop) and [`restore`](Self::restore) counts one. A host side with
    /// peers that share connections with this guest (sibling VMs) tells them when it moves.
    pub fn epoch(&self) -> u64 {
        self.epoch
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
        self.epoch += 1;
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
        self.epoch += 1;
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
        self.epoch += 1;
        self.acked_features = state.acked_features;
        self.activated = state.activated;
        self.event_owed = state.activated;
        if self.activated {
            self.apply_socket_types();
        }
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
}
