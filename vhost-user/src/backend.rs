//! The vhost-user side: the backend `vhost-user-backend` calls on its threads, and the
//! [`Transport`] the runtime serves through.
//!
//! The two meet in [`Shared`]. The backend's callbacks only record what changed (the vring
//! handles, the driver's features, a stop or a reset) and wake the runtime through the kick
//! socket; the runtime takes the queues under the shared lock for one synchronous section at a
//! time. Holding that lock is also what makes [`VhostUserBackend::stop_vring`] wait: once it has
//! the lock, the runtime is outside the queues and will not enter them again until the frontend
//! starts the rings anew.
//!
//! The guest's kicks reach the runtime directly. `vhost-user-backend` watches each started
//! ring's kick eventfd on its worker thread and calls [`VhostUserBackend::handle_event`] when
//! it fires (and once when the ring starts). Left there, every kick would cost a hop: the
//! worker wakes, reads the eventfd, writes the kick socket, and only then does the runtime
//! wake. So `handle_event` hands the runtime a duplicate of the ring's kick descriptor
//! ([`Transport::take_kick_fd`]); once the runtime watches it, the descriptor leaves the
//! worker's epoll, and a kick wakes the runtime alone. Until then the worker goes on waking the
//! runtime, so no kick is missed in between; when the frontend replaces the descriptor or
//! starts the ring again, the worker registers it anew, calls `handle_event`, and the hand-over
//! repeats.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vsock_device::{DeviceRequest, KickFd, Queues, Served, Transport};

/// The guest memory of a vhost-user frontend: its regions mapped from the file descriptors it
/// sent.
pub type Memory = GuestMemoryMmap<()>;

/// The replaceable view of [`Memory`] that `vhost-user-backend` updates on `SET_MEM_TABLE`.
pub type MemoryAtomic = GuestMemoryAtomic<Memory>;

/// Queue 0: packets to the guest.
const RX: usize = 0;
/// Queue 1: packets from the guest.
const TX: usize = 1;
/// The device has three queues, but vhost-user frontends keep the event queue (2) to
/// themselves: QEMU only hands the rx and tx rings to the backend.
const NUM_QUEUES: usize = 3;
/// The one worker thread watches the kicks of rx and tx.
const WORKER_QUEUES: u64 = 1 << RX | 1 << TX;

/// What the backend's threads and the runtime share.
pub struct Shared {
    state: Mutex<State>,
    /// Written to wake the runtime; its peer is the runtime's kick descriptor.
    kick: UnixStream,
    guest_cid: u64,
    /// A kick descriptor offer waits in `State::kick_offers`: the runtime, which asks at every
    /// wake-up, takes the lock only then.
    kicks_offered: AtomicBool,
    /// The virtio features the device offers.
    device_features: u64,
}

struct State {
    /// The current frontend's memory.
    mem: MemoryAtomic,
    /// The rx and tx rings, once a worker has handed them over.
    vrings: Option<[VringRwLock; 2]>,
    /// Features the driver acknowledged, not yet handed to the device.
    pending_features: Option<u64>,
    /// The device was handed its features and may serve the queues.
    activated: bool,
    /// Features handed out with an activation the runtime has not carried out yet: if the
    /// rings stop before it does, the activation is taken back and offered again.
    activating: Option<u64>,
    /// Interrupts the guest is owed on rx and tx: wanted while the ring had no call
    /// descriptor, sent once it has one.
    owed: [bool; 2],
    /// The device must drop its connections before anything else.
    reset_owed: bool,
    /// The device must drop its connections, owing the guest an RST for each.
    stop_owed: bool,
    /// Stands in for the event queue the frontend keeps: never ready, so never touched.
    event: Queue,
    /// The rx and tx kick descriptors offered to the runtime and not yet taken: `Some(None)`
    /// asks it to stop watching the one it has.
    kick_offers: [Option<Option<OwnedFd>>; 2],
    /// The current frontend's vring worker, whose epoll a kick descriptor leaves once the
    /// runtime watches it.
    worker: Option<Arc<VringEpollHandler<VsockBackend>>>,
}

impl Shared {
    /// Shared state for a device with guest CID `guest_cid` offering `device_features`.
    /// `kick` wakes the runtime: the runtime polls the other end of the pair.
    ///
    /// # Errors
    ///
    /// `kick` cannot be made non-blocking.
    pub fn new(guest_cid: u64, device_features: u64, kick: UnixStream) -> io::Result<Arc<Self>> {
        kick.set_nonblocking(true)?;
        let event = Queue::new(1).map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(Arc::new(Shared {
            state: Mutex::new(State {
                mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                vrings: None,
                pending_features: None,
                activated: false,
                activating: None,
                owed: [false; 2],
                reset_owed: false,
                stop_owed: false,
                event,
                kick_offers: [None, None],
                worker: None,
            }),
            kick,
            guest_cid,
            kicks_offered: AtomicBool::new(false),
            device_features,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the runtime. A full kick socket already holds a wake-up.
    fn wake(&self) {
        match (&self.kick).write(&[1]) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!(error = %e, "cannot wake the runtime"),
        }
    }

    /// A backend for the next frontend connection, with fresh (empty) memory, and that memory
    /// for `VhostUserDaemon::new`.
    pub fn connection(self: &Arc<Self>, max_queue_size: usize) -> (VsockBackend, MemoryAtomic) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.lock().mem = mem.clone();
        let backend = VsockBackend {
            shared: self.clone(),
            max_queue_size,
        };
        (backend, mem)
    }

    /// The vring worker of the frontend just connected (the first of
    /// `VhostUserDaemon::get_epoll_handlers`): kick descriptors the runtime watches leave its
    /// epoll.
    pub fn set_worker(&self, worker: Option<Arc<VringEpollHandler<VsockBackend>>>) {
        self.lock().worker = worker;
    }

    /// The frontend went away: its rings and memory are gone, and the device drops every
    /// connection (resetting the host sockets) until the next frontend activates it.
    pub fn disconnected(&self) {
        let mut state = self.lock();
        state.worker = None;
        // The runtime stops watching the old rings' kicks (and closes its duplicates).
        state.kick_offers = [Some(None), Some(None)];
        self.kicks_offered.store(true, Ordering::Release);
        state.vrings = None;
        state.mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        state.pending_features = None;
        state.activated = false;
        state.activating = None;
        state.owed = [false; 2];
        state.stop_owed = false;
        state.reset_owed = true;
        drop(state);
        self.wake();
    }

    /// The rings stop. `GET_VRING_BASE` (`forgotten` false) comes when the VM stops, for a
    /// pause or a migration as much as for a driver reset, so the guest may still hold its
    /// connections: they are dropped, each owing the guest an RST once the rings are back.
    /// `RESET_DEVICE` (`forgotten` true) means the driver forgot them. Returns once the
    /// runtime is out of the queues.
    fn stop(&self, forgotten: bool) {
        let mut state = self.lock();
        if state.activated {
            state.activated = false;
            if forgotten {
                state.reset_owed = true;
            } else {
                state.stop_owed = true;
            }
            debug!(forgotten, "rings stopped: the device drops its connections");
        }
        state.activating = None;
        state.pending_features = None;
        drop(state);
        self.wake();
    }

    fn features_acked(&self, features: u64) {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let unknown = features & !(self.device_features | protocol);
        if unknown != 0 {
            warn!(
                unknown = format_args!("{unknown:#x}"),
                "the frontend acked features we never offered; ignored"
            );
        }
        let mut state = self.lock();
        if state.activated {
            // A new negotiation without a stop in between: the driver started over.
            state.activated = false;
            state.stop_owed = true;
        }
        state.activating = None;
        state.pending_features = Some(features & self.device_features);
        drop(state);
        self.wake();
    }

    /// The worker saw an event of ring `queue` (a kick, or the ring starting): the runtime
    /// gets the ring handles if it has none, and the ring's kick descriptor to watch itself.
    fn vrings_seen(&self, queue: usize, vrings: &[VringRwLock]) {
        // Duplicated before the shared lock is taken: the vring lock is never taken inside it
        // by a thread of the crate's.
        let offer = vrings.get(queue).filter(|_| queue < 2).and_then(|vring| {
            let dup = vring
                .get_ref()
                .get_kick()
                .as_ref()
                .map(|kick| kick.try_clone());
            match dup {
                Some(Ok(kick)) => Some(into_owned(kick)),
                Some(Err(e)) => {
                    // The worker keeps watching it, and waking the runtime.
                    debug!(queue, error = %e, "cannot duplicate a kick descriptor");
                    None
                }
                None => None,
            }
        });
        if let [rx, tx, ..] = vrings {
            let mut state = self.lock();
            if state.vrings.is_none() {
                state.vrings = Some([rx.clone(), tx.clone()]);
            }
            if let Some(fd) = offer {
                state.kick_offers[queue] = Some(Some(fd));
                self.kicks_offered.store(true, Ordering::Release);
            }
        }
        self.wake();
    }
}

/// Ownership of an event consumer's descriptor.
#[allow(unsafe_code)]
fn into_owned(kick: EventConsumer) -> OwnedFd {
    // SAFETY: `into_raw_fd` hands over the descriptor the consumer owned (a duplicate made
    // just now by `try_clone`, open, and owned by nothing else), so it is owned once, here.
    unsafe { OwnedFd::from_raw_fd(kick.into_raw_fd()) }
}

fn ring_ready(vring: &VringRwLock) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

/// The [`Transport`] the runtime serves through: the frontend's rings and memory, under the
/// shared lock.
pub struct VhostTransport {
    shared: Arc<Shared>,
}

impl VhostTransport {
    /// The transport over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        VhostTransport { shared }
    }
}

impl Transport for VhostTransport {
    type Memory = Memory;

    fn with_queues<R>(&mut self, f: impl FnOnce(&Memory, Queues<'_>) -> R) -> Option<R> {
        let mut state = self.shared.lock();
        if !state.activated {
            return None;
        }
        let State {
            mem,
            vrings,
            event,
            activated,
            activating,
            pending_features,
            ..
        } = &mut *state;
        let [rx, tx] = vrings.as_ref()?;
        // Always rx before tx, the one order any thread takes both in.
        let mut rx = rx.get_mut();
        let mut tx = tx.get_mut();
        // A wake-up may arrive after the frontend stopped a ring.
        if !(rx.get_queue().ready() && rx.is_enabled() && tx.get_queue().ready() && tx.is_enabled())
        {
            if let Some(features) = activating.take() {
                // The activation handed out cannot happen on these rings: offer it again
                // once they are back.
                *activated = false;
                *pending_features = Some(features);
            }
            return None;
        }
        *activating = None;
        let mem = mem.memory();
        Some(f(
            &mem,
            Queues {
                rx: rx.get_queue_mut(),
                tx: tx.get_queue_mut(),
                event,
            },
        ))
    }

    fn notify(&mut self, served: &Served) {
        // Under the shared lock, so a ring cannot be stopped (its call descriptor closed)
        // between the check and the signal.
        let mut state = self.shared.lock();
        let State { vrings, owed, .. } = &mut *state;
        let Some(vrings) = vrings.as_ref() else {
            return;
        };
        for (i, wanted) in [served.notify_rx, served.notify_tx].into_iter().enumerate() {
            if !(wanted || owed[i]) {
                continue;
            }
            let vring = &vrings[i];
            if vring.get_ref().get_call().is_none() {
                // No way to interrupt the guest yet: used entries are already published, and
                // with EVENT_IDX a lost interrupt would never be repeated. Owe it.
                owed[i] = true;
                continue;
            }
            owed[i] = false;
            if let Err(e) = vring.signal_used_queue() {
                debug!(queue = i, error = %e, "cannot interrupt the guest");
            }
        }
    }

    fn take_kick_fd(&mut self) -> Option<KickFd> {
        if !self.shared.kicks_offered.load(Ordering::Acquire) {
            return None;
        }
        let mut state = self.shared.lock();
        let Some(queue) = state.kick_offers.iter().position(Option::is_some) else {
            // Cleared under the lock, so an offer made after this is seen next time.
            self.shared.kicks_offered.store(false, Ordering::Release);
            return None;
        };
        let fd = state.kick_offers[queue].take()?;
        Some(KickFd {
            queue: queue as u16,
            fd,
        })
    }

    fn kick_fd_watched(&mut self, queue: u16, watched: bool) {
        if !watched {
            // The worker keeps watching the descriptor and waking the runtime for it.
            return;
        }
        let state = self.shared.lock();
        let (Some(worker), Some(vrings)) = (state.worker.as_ref(), state.vrings.as_ref()) else {
            return;
        };
        let Some(vring) = vrings.get(usize::from(queue)) else {
            return;
        };
        let vring = vring.get_ref();
        let Some(kick) = vring.get_kick().as_ref() else {
            return;
        };
        // epoll removes a descriptor whatever the data it was added with; the data given here
        // only has to pass the crate's check that it is none of the values it reserves. Should
        // the frontend have replaced the descriptor since it was offered, the new one leaves
        // the worker too, but its registration has queued another `handle_event`, which offers
        // it to the runtime in turn.
        let token = NUM_QUEUES as u64 + 1;
        match worker.unregister_listener(kick.as_raw_fd(), EventSet::IN, token) {
            Ok(()) => debug!(queue, "the runtime watches the kicks"),
            Err(e) => debug!(queue, error = %e, "the kick stays with the worker too"),
        }
    }

    fn take_request(&mut self) -> Option<DeviceRequest> {
        let mut state = self.shared.lock();
        if state.reset_owed {
            // A reset covers a stop owed before it.
            state.reset_owed = false;
            state.stop_owed = false;
            return Some(DeviceRequest::Reset);
        }
        if state.stop_owed {
            state.stop_owed = false;
            return Some(DeviceRequest::Stop);
        }
        if state.activated {
            return None;
        }
        let features = state.pending_features?;
        let [rx, tx] = state.vrings.as_ref()?;
        if !(ring_ready(rx) && ring_ready(tx)) {
            return None;
        }
        state.pending_features = None;
        state.activated = true;
        state.activating = Some(features);
        Some(DeviceRequest::Activate { features })
    }
}

/// The device as `vhost-user-backend` sees it. Every callback is short: it records the change
/// in [`Shared`] and wakes the runtime, which does the work.
#[derive(Clone)]
pub struct VsockBackend {
    shared: Arc<Shared>,
    max_queue_size: usize,
}

impl VhostUserBackend for VsockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.shared.device_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!(features = format_args!("{features:#x}"), "features acked");
        self.shared.features_acked(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        debug!("frontend reset the device");
        self.shared.stop(true);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The device reads EVENT_IDX from the acked features when it activates.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The vsock config space is the guest CID, 8 bytes little-endian.
        let config = self.shared.guest_cid.to_le_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        config[start..end].to_vec()
    }

    fn update_memory(&self, mem: MemoryAtomic) -> io::Result<()> {
        self.shared.lock().mem = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![WORKER_QUEUES]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it, dropping the daemon would wait forever for the worker to end.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!(error = %e, "cannot make the worker's exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        debug!(queue = queue_index, "ring stopped");
        self.shared.stop(false);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The kick is consumed already; the runtime does the work. With one worker for rx and
        // tx, `device_event` is the queue's own index.
        self.shared.vrings_seen(usize::from(device_event), vrings);
        Ok(())
    }
}
