//! The host-side driver every runtime runs: the device, its socket table, the listener, the
//! clock, the accepts and the merged deadline. A runtime only translates its readiness events
//! into [`Driver::accept`] and [`Driver::ready`], and sleeps for [`Driver::timeout`].

use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, warn};
use vsock_core::wire::SocketType;
use vsock_core::{Config, ConnState, ConnStats, HostEvent, Instant, Origin, SocketError, Stats};
use vsock_device::vm_memory::GuestMemory;
use vsock_device::{DeviceError, DeviceStats, Queues, Served, Transport, VsockDevice};

use crate::{Delivery, Host, HostStats, Listener, Reactor, SiblingLink, UdsPath};

/// What every runtime is configured with: the engine's configuration and the base path.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The engine's configuration (guest CID, buffers, limits, timeouts).
    pub engine: Config,
    /// The base path `<uds_path>`: host clients connect to it, a guest connection to port
    /// `P` goes to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// Offer seqpacket sockets (`VIRTIO_VSOCK_F_SEQPACKET`), with host clients of seqpacket
    /// connections at `<uds_path>_seqpacket`. On by default.
    pub seqpacket: bool,
    /// The VM's place among sibling VMs served by the same process (see [`Siblings`]), if
    /// its guest may reach theirs; without it, a guest's connect to any CID but the host's
    /// gets an RST at once. The loop watches [`Driver::sibling_wake`] as it watches the
    /// listeners.
    ///
    /// [`Siblings`]: crate::Siblings
    pub siblings: Option<SiblingLink>,
}

impl DriverConfig {
    /// The defaults for a guest with CID `guest_cid`, at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        DriverConfig {
            engine: Config::new(guest_cid),
            uds_path: uds_path.into(),
            seqpacket: true,
            siblings: None,
        }
    }
}

/// What a runtime learned about one connection's socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Readable, or its read side hung up.
    pub readable: bool,
    /// Writable, or its write side hung up.
    pub writable: bool,
    /// The socket reported an error.
    pub error: bool,
    /// The socket's peer hung up (`EPOLLHUP`: it closed, or shut down both directions).
    pub hang_up: bool,
}

/// A VM's counters and connections at one moment, for live inspection:
/// [`Driver::snapshot`] in the loop's own thread, [`Siblings::inspect`] from any other.
///
/// [`Siblings::inspect`]: crate::Siblings::inspect
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Whether a driver has activated the device (a guest is running).
    pub activated: bool,
    /// The engine's counters.
    pub engine: Stats,
    /// The device layer's counters.
    pub device: DeviceStats,
    /// The host side's counters.
    pub host: HostStats,
    /// Bytes held in connection buffers, in use or pooled.
    pub buffer_memory: u64,
    /// Every connection in the table, in slot order.
    pub connections: Vec<ConnSnapshot>,
}

/// One connection of a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnSnapshot {
    /// The guest's port, once known (a host client's is known once its `CONNECT` line is
    /// read).
    pub guest_port: Option<u32>,
    /// The host side's port, once known.
    pub host_port: Option<u32>,
    /// The peer's CID: the host's (2), or a sibling VM's.
    pub peer_cid: u64,
    /// Stream or seqpacket.
    pub socket_type: SocketType,
    /// Who opened it.
    pub origin: Origin,
    /// Where it stands.
    pub state: ConnState,
    /// Its counters.
    pub stats: ConnStats,
}

/// How long after a failed accept (`EMFILE` and friends) the listener is tried again. Runtimes
/// watch it edge-triggered, so the clients left in its backlog raise no new event: without a
/// retry they would wait for the next client to connect, however long that takes.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The most host clients accepted per wake-up. A flood of clients then cannot starve the
/// queues and the clients already accepted: the rest wait in the backlog until the next
/// round, which comes at once.
const ACCEPT_BATCH: usize = 32;

/// The device and its host side, driven by one runtime.
pub struct Driver<R: Reactor> {
    device: VsockDevice,
    host: Host<R>,
    listener: Listener,
    /// The seqpacket listener at `<uds_path>_seqpacket`, if seqpacket sockets are offered.
    seqpacket_listener: Option<Listener>,
    epoch: std::time::Instant,
    /// When to accept again after an accept failed with clients possibly still waiting.
    accept_retry: Option<Instant>,
    /// A round of accepts stopped at [`ACCEPT_BATCH`] with clients possibly still waiting.
    accept_more: bool,
    /// The VM's siblings, if any.
    siblings: Option<SiblingLink>,
    /// The device's epoch at the end of the last serve: when it moves (a reset, a stop, a
    /// restore), the siblings are told the guest forgot its connections.
    device_epoch: u64,
    /// Every connection was aborted for a shutdown: sibling sockets closed from now on go to
    /// the siblings with a departure notice.
    departing: bool,
}

impl<R: Reactor> std::fmt::Debug for Driver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("device", &self.device)
            .field("host", &self.host)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl<R: Reactor> Driver<R>
where
    R::Socket: AsFd,
{
    /// Binds the listener at `<uds_path>` (non-blocking) and builds the device. The runtime
    /// watches [`listener`](Self::listener) for readability and calls
    /// [`accept`](Self::accept).
    ///
    /// # Errors
    ///
    /// A bad path, a busy or unwritable listener path, a configuration the engine refuses.
    pub fn new(config: DriverConfig, reactor: R) -> io::Result<Self> {
        let path = UdsPath::new(config.uds_path)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let buffer = config.engine.buffer_size as usize;
        let mut device = VsockDevice::new(config.engine, Instant::ZERO)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        device.set_seqpacket(config.seqpacket);
        if config.seqpacket {
            // A guest message may fill the whole buffer we advertise, and a Unix seqpacket
            // socket refuses a message longer than its send buffer: check the kernel gives
            // one large enough before offering seqpacket sockets at all.
            let limit = crate::seqpacket_message_limit(buffer)?;
            if limit < buffer {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "seqpacket sockets need messages of {buffer} bytes (the buffer size), \
                         but this kernel's send buffers take at most {limit}: raise \
                         net.core.wmem_max to at least {}, use a smaller buffer, or turn \
                         seqpacket sockets off",
                        crate::seqpacket_send_buffer(buffer)
                    ),
                ));
            }
        }
        let listener = Listener::bind(path.listener())?;
        let seqpacket_listener = if config.seqpacket {
            Some(Listener::bind_typed(
                &path.seqpacket_listener(),
                vsock_core::wire::SocketType::SeqPacket,
            )?)
        } else {
            None
        };
        let mut host = Host::new(path, reactor);
        if config.seqpacket {
            host.set_seqpacket_send_buffer(crate::seqpacket_send_buffer(buffer));
        }
        host.set_siblings(config.siblings.clone());
        if let Some(link) = &config.siblings {
            link.open();
        }
        Ok(Driver {
            device,
            host,
            listener,
            seqpacket_listener,
            epoch: std::time::Instant::now(),
            accept_retry: None,
            accept_more: false,
            siblings: config.siblings,
            device_epoch: 0,
            departing: false,
        })
    }

    /// The engine's clock: time since this driver was made.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(self.epoch.elapsed().as_nanos() as u64)
    }

    /// The listener host clients connect to.
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// The listener host clients of seqpacket connections connect to
    /// (`<uds_path>_seqpacket`), if seqpacket sockets are offered. A runtime watches it as it
    /// watches [`listener`](Self::listener), and calls [`accept`](Self::accept) for either.
    pub fn seqpacket_listener(&self) -> Option<&Listener> {
        self.seqpacket_listener.as_ref()
    }

    /// The descriptor of the sibling inbox, if the VM has siblings: a runtime watches it for
    /// readability as it watches [`listener`](Self::listener), and calls
    /// [`accept`](Self::accept) for it too.
    pub fn sibling_wake(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.siblings.as_ref().map(SiblingLink::wake_fd)
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device_mut(&mut self) -> &mut VsockDevice {
        &mut self.device
    }

    /// The host side (the socket table, its reactor and counters).
    pub fn host(&self) -> &Host<R> {
        &self.host
    }

    /// The host side (the socket table, its reactor and counters).
    pub fn host_mut(&mut self) -> &mut Host<R> {
        &mut self.host
    }

    /// Every counter and connection, as they stand now.
    pub fn snapshot(&self) -> Snapshot {
        let engine = self.device.engine();
        let connections = engine
            .conn_ids()
            .filter_map(|id| {
                let ports = engine.conn_ports(id);
                Some(ConnSnapshot {
                    guest_port: ports.map(|p| p.0),
                    host_port: ports.map(|p| p.1),
                    peer_cid: engine.conn_peer_cid(id)?,
                    socket_type: engine.conn_socket_type(id)?,
                    origin: engine.conn_origin(id)?,
                    state: engine.conn_state(id)?,
                    stats: engine.conn_stats(id)?,
                })
            })
            .collect();
        Snapshot {
            guest_cid: engine.config().guest_cid,
            activated: self.device.is_activated(),
            engine: engine.stats().clone(),
            device: self.device.stats().clone(),
            host: self.host.stats().clone(),
            buffer_memory: engine.buffer_memory() as u64,
            connections,
        }
    }

    /// The listener is readable: accepts a round of host clients, reading each one's
    /// `CONNECT` line at once if it is already there (so a prompt client is no longer pending
    /// when the next one arrives). Call [`serve_transport`](Self::serve_transport) or
    /// [`serve`](Self::serve) after the batch of events.
    pub fn accept(&mut self) {
        let now = self.now();
        self.accept_round(now);
    }

    fn accept_round(&mut self, now: Instant) {
        self.accept_more = false;
        let batch = ACCEPT_BATCH.min(self.device.engine().config().max_pending_host_clients);
        // Each listener gets its round: a flood on one never keeps the other's clients out.
        let more = self.accept_from(now, false, batch);
        let more_seqpacket =
            self.seqpacket_listener.is_some() && self.accept_from(now, true, batch);
        let more_siblings = self.take_deliveries(now, batch);
        self.accept_more = more || more_seqpacket || more_siblings;
        self.watch_lifecycle();
    }

    /// Takes up to `batch` deliveries from the sibling inbox. Returns whether more may wait.
    fn take_deliveries(&mut self, now: Instant, batch: usize) -> bool {
        let Some(link) = self.siblings.clone() else {
            return false;
        };
        for _ in 0..batch {
            let Some(delivery) = link.next() else {
                return false;
            };
            let active = self.device.is_activated();
            let engine = self.device.engine_mut();
            match delivery {
                Delivery::Connect {
                    socket,
                    peer_cid,
                    peer_port,
                    port,
                    socket_type,
                } => {
                    // A guest not running yet cannot accept: the sibling's guest hears so at
                    // once, rather than after its connect timeout.
                    if !active {
                        debug!(
                            peer_cid,
                            port, "sibling connect while the device is inactive"
                        );
                        continue;
                    }
                    match engine.handle_sibling_accept(now, peer_cid, peer_port, port, socket_type)
                    {
                        Ok(conn) => {
                            if self.host.adopt_sibling(now, engine, conn, peer_cid, socket) {
                                let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
                            }
                        }
                        // Dropping the socket tells the sibling.
                        Err(e) => debug!(peer_cid, port, error = %e, "sibling connect refused"),
                    }
                }
                Delivery::Inspect { reply } => {
                    // The asker waits with a timeout; one that gave up is no one's concern.
                    let _ = reply.try_send(self.snapshot());
                    continue;
                }
                Delivery::PeerGone { cid, sockets } => {
                    engine.reset_peer(now, cid);
                    // The resets reach the guest before the sibling's ends close (a serve
                    // comes next, and any end of file read after it meets a reset
                    // connection).
                    self.device.perform_actions(now, &mut self.host);
                    drop(sockets);
                    continue;
                }
            }
            self.device.perform_actions(now, &mut self.host);
        }
        link.pending()
    }

    /// Tells the siblings when the guest forgot its connections (the device was reset,
    /// stopped or restored since the last look), handing them this side's ends of those
    /// connections to close once they have reset them: closed here first, they would show
    /// the sibling guests an end of file before the reset. Sibling sockets closed for any
    /// other reason (one connection's end) are closed now.
    fn watch_lifecycle(&mut self) {
        let parked = self.host.take_parked();
        let epoch = self.device.epoch();
        if epoch != self.device_epoch || (self.departing && !parked.is_empty()) {
            self.device_epoch = epoch;
            if let Some(link) = &self.siblings {
                debug!(
                    epoch,
                    "the device dropped its connections; telling the siblings"
                );
                link.gone_with(parked);
            }
        }
    }

    /// Accepts up to `batch` clients of one listener. Returns whether more may wait.
    fn accept_from(&mut self, now: Instant, seqpacket: bool, batch: usize) -> bool {
        for _ in 0..batch {
            let listener = if seqpacket {
                self.seqpacket_listener
                    .as_ref()
                    .expect("checked by the caller")
            } else {
                &self.listener
            };
            match listener.accept() {
                Ok(Some(stream)) => {
                    let engine = self.device.engine_mut();
                    let adopted = if seqpacket {
                        self.host.adopt_seqpacket_client(now, engine, stream)
                    } else {
                        self.host.adopt_client(now, engine, stream)
                    };
                    if let Some(conn) = adopted {
                        debug!(%conn, "host client");
                        // Its line may already be there; a spurious readable is harmless.
                        let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
                        self.device.perform_actions(now, &mut self.host);
                    }
                }
                Ok(None) => {
                    if !seqpacket {
                        self.accept_retry = None;
                    }
                    return false;
                }
                Err(e) => {
                    // EMFILE and friends: the client waits in the backlog. Rather than spin,
                    // try again after a pause, or at the next event.
                    if self.accept_retry.is_none() {
                        warn!(error = %e, "accept failed; retrying");
                    } else {
                        debug!(error = %e, "accept failed again");
                    }
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return false;
                }
            }
        }
        // More may wait: the next round comes after the queues and the other sockets had
        // theirs.
        true
    }

    /// The socket in table slot `slot` (the runtime's registration key: see
    /// [`Host::conn_at`]) is ready. A late event for a socket already closed is ignored.
    /// Call [`serve_transport`](Self::serve_transport) or [`serve`](Self::serve) after the
    /// batch of events.
    pub fn ready(&mut self, slot: u32, readiness: Readiness) {
        let Some(conn) = self.host.conn_at(slot) else {
            return;
        };
        let now = self.now();
        let _span = tracing::trace_span!("vsock_conn", %conn).entered();
        let engine = self.device.engine_mut();
        if readiness.error {
            // The engine still reads what the socket holds before it resets.
            let _ = engine.handle_host_event(now, conn, HostEvent::Error(SocketError(0)));
            return;
        }
        if readiness.readable {
            let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
        }
        if readiness.writable {
            let _ = engine.handle_host_event(now, conn, HostEvent::Writable);
        }
        if readiness.hang_up {
            let _ = engine.handle_host_event(now, conn, HostEvent::HangUp);
        }
    }

    /// Fires due deadlines (the engine's, and the retry of accepts) and serves the queues
    /// (see [`VsockDevice::serve`]).
    ///
    /// # Errors
    ///
    /// As [`VsockDevice::serve`].
    pub fn serve<M: GuestMemory>(
        &mut self,
        mem: &M,
        queues: Queues<'_>,
    ) -> Result<Served, DeviceError> {
        let now = self.now();
        self.retry_accept(now);
        let served = self.device.serve(now, mem, queues, &mut self.host);
        self.watch_lifecycle();
        served
    }

    /// One wake-up through a [`Transport`] (see [`VsockDevice::serve_transport`]), the
    /// retry of accepts included. The kick descriptors the transport hands out
    /// ([`Transport::take_kick_fd`]) go to the reactor first. Returns whether work is left:
    /// serve again without waiting.
    pub fn serve_transport<T: Transport>(&mut self, transport: &mut T) -> bool {
        // Kick descriptors first, so no kick after this serve goes unseen.
        while let Some(kick) = transport.take_kick_fd() {
            let queue = kick.queue;
            let watched = match self.host.reactor_mut().watch_kick(queue, kick.fd) {
                Ok(()) => true,
                Err(e) => {
                    debug!(queue, error = %e, "the transport keeps waking the loop for kicks");
                    false
                }
            };
            transport.kick_fd_watched(queue, watched);
        }
        let now = self.now();
        self.retry_accept(now);
        let more = self.device.serve_transport(now, transport, &mut self.host);
        self.watch_lifecycle();
        more
    }

    /// The host-side work that needs no guest (see [`VsockDevice::serve_host`]), the retry of
    /// accepts included: for a loop of the caller's own with no queues to serve.
    pub fn serve_host(&mut self) {
        let now = self.now();
        self.retry_accept(now);
        self.device.serve_host(now, &mut self.host);
        self.watch_lifecycle();
    }

    fn retry_accept(&mut self, now: Instant) {
        if self.accept_more || self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_round(now);
        }
    }

    /// Resets every connection (RST to the guest, sockets closed): for a clean shutdown. Serve
    /// once more afterwards so the RSTs reach the guest.
    pub fn abort_all(&mut self) {
        let now = self.now();
        self.device.engine_mut().abort_all(now);
        // The VM is going away: the siblings hear of it with the sockets, as for a reset.
        self.departing = true;
    }

    /// How long the runtime may sleep before it must serve again for a deadline (the
    /// engine's, or a round of accepts), or `None` if none is pending. After a serve, this is
    /// never a deadline that has passed, unless more work is due at once.
    pub fn timeout(&mut self) -> Option<Duration> {
        if self.accept_more {
            return Some(Duration::ZERO);
        }
        let now = self.now();
        let engine = self.device.engine_mut().poll_timeout();
        let next = match (engine, self.accept_retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|t| t.saturating_duration_since(now))
    }
}

impl<R: Reactor> Drop for Driver<R> {
    fn drop(&mut self) {
        // Siblings' connects waiting for this VM are refused, and their connections with it
        // reset.
        if let Some(link) = &self.siblings {
            self.host.park_siblings();
            link.close_with(self.host.take_parked());
        }
    }
}
