//! Drives the vsock device from a [mio](https://docs.rs/mio) event loop: the adapter for
//! synchronous virtual machine monitors.
//!
//! [`VsockMio`] registers the host listener and every connection socket in the caller's
//! `mio::Registry`, under tokens from a range the caller reserves ([`Tokens`]), so they sit in
//! the caller's own loop next to its other sources. It translates readiness into engine
//! inputs; everything else (the protocol, the queues) is `vsock-core` and `vsock-device`, and
//! the sockets' system calls are `vsock-host`. This crate is only event translation.
//!
//! Sockets are registered edge-triggered for both directions once; the engine keeps track of
//! what it already knows is readable or writable, so interest changes need no system call.
//!
//! # Embedding
//!
//! The caller owns the guest memory, the three queues, their kick notifiers and the guest's
//! interrupts. Its loop:
//!
//! 1. `poll.poll(&mut events, vsock.timeout())`;
//! 2. for each event, [`VsockMio::handle_event`] (it returns `false` for tokens that are not
//!    its own, such as the caller's queue kick notifiers);
//! 3. then, whatever woke it, [`VsockMio::serve`] with the queues and memory, and interrupt
//!    the guest for each queue the returned [`Served`] names (and poll again at once if it says
//!    `more`).
//!
//! ```no_run
//! use std::time::Duration;
//! use mio::{Events, Poll, Token};
//! use vsock_mio::{MioConfig, Tokens, VsockMio};
//! # use vm_memory::GuestMemoryMmap;
//! # fn vmm_queues() -> [virtio_queue::Queue; 3] { panic!("provided by the VMM") }
//! # fn vmm_memory() -> GuestMemoryMmap { panic!("provided by the VMM") }
//! # fn interrupt(_queue: u16) {}
//!
//! # fn main() -> std::io::Result<()> {
//! let mut poll = Poll::new()?;
//! let mut vsock = VsockMio::new(
//!     MioConfig {
//!         engine: vsock_core::Config::new(3),
//!         uds_path: "/run/vm0/vsock".into(),
//!         // The VMM's own sources use tokens below 100.
//!         tokens: Tokens { listener: Token(100), first_conn: 101 },
//!     },
//!     poll.registry(),
//! )?;
//! let (mem, mut queues) = (vmm_memory(), vmm_queues());
//! // ... the driver acks features and activates the device on its queues ...
//! let mut events = Events::with_capacity(256);
//! loop {
//!     poll.poll(&mut events, vsock.timeout().or(Some(Duration::from_secs(1))))?;
//!     for event in events.iter() {
//!         if !vsock.handle_event(event) {
//!             // One of the VMM's own sources, such as a queue kick.
//!         }
//!     }
//!     let [rx, tx, event] = &mut queues;
//!     match vsock.serve(&mem, vsock_device::Queues { rx, tx, event }) {
//!         Ok(served) => {
//!             if served.notify_rx { interrupt(0) }
//!             if served.notify_tx { interrupt(1) }
//!             if served.notify_event { interrupt(2) }
//!         }
//!         Err(e) => eprintln!("vsock: {e}"),
//!     }
//! }
//! # }
//! ```
//!
//! Callers without a loop of their own use [`MioLoop`]: the same driver on a thread of its
//! own, fed by a [`Transport`](vsock_device::Transport) and a kick descriptor.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest as MioInterest, Registry, Token};
use tracing::{debug, warn};
use vm_memory::GuestMemory;
use vsock_core::{Config, ConnId, HostEvent, Instant, Interest, SocketError};
use vsock_device::{DeviceError, Queues, Served, VsockDevice};
use vsock_host::{Host, Listener, Reactor, UdsPath};

/// The tokens `VsockMio` uses in the caller's registry: `listener`, and one per connection
/// slot from `first_conn` on (`first_conn + max_connections` must not collide with the
/// caller's own tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// The host listener's token.
    pub listener: Token,
    /// The token of connection slot 0; slot `i` uses `first_conn + i`.
    pub first_conn: usize,
}

/// Configuration of a [`VsockMio`].
#[derive(Clone, Debug)]
pub struct MioConfig {
    /// The engine's configuration (guest CID, buffers, limits, timeouts).
    pub engine: Config,
    /// The base path `<uds_path>`.
    pub uds_path: PathBuf,
    /// The tokens to use.
    pub tokens: Tokens,
}

/// Watches sockets in a mio registry, edge-triggered.
pub struct MioReactor {
    registry: Registry,
    first: usize,
    /// Connection slot to handle, for the tokens' events.
    slots: HashMap<u32, ConnId>,
}

impl MioReactor {
    fn token(&self, conn: ConnId) -> Token {
        Token(self.first + conn.index() as usize)
    }
}

impl Reactor for MioReactor {
    type Socket = UnixStream;

    fn register(&mut self, conn: ConnId, stream: UnixStream) -> io::Result<UnixStream> {
        stream.set_nonblocking(true)?;
        self.registry.register(
            &mut SourceFd(&stream.as_raw_fd()),
            self.token(conn),
            MioInterest::READABLE | MioInterest::WRITABLE,
        )?;
        self.slots.insert(conn.index(), conn);
        Ok(stream)
    }

    fn stream<'a>(&self, socket: &'a UnixStream) -> &'a UnixStream {
        socket
    }

    fn set_interest(&mut self, _conn: ConnId, _socket: &mut UnixStream, _interest: Interest) {
        // Edge-triggered for both directions from registration on: the engine ignores
        // readiness it did not ask for, and remembers what it was told.
    }

    fn deregister(&mut self, conn: ConnId, socket: UnixStream) {
        if let Err(e) = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd())) {
            warn!(%conn, error = %e, "cannot deregister a socket");
        }
        if self.slots.get(&conn.index()) == Some(&conn) {
            self.slots.remove(&conn.index());
        }
    }
}

/// How long after a failed accept (`EMFILE` and friends) the listener is tried again. It is
/// watched edge-triggered, so the clients left in its backlog raise no new event: without a
/// retry they would wait for the next client to connect, however long that takes.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The most host clients accepted per wake-up. A flood of clients then cannot starve the
/// queues and the clients already accepted: the rest wait in the backlog until the next
/// round, which comes at once.
const ACCEPT_BATCH: usize = 32;

/// A vsock device driven from the caller's mio loop.
pub struct VsockMio {
    device: VsockDevice,
    host: Host<MioReactor>,
    listener: Listener,
    tokens: Tokens,
    epoch: std::time::Instant,
    /// When to accept again after an accept failed with clients possibly still waiting.
    accept_retry: Option<Instant>,
    /// A round of accepts stopped at [`ACCEPT_BATCH`] with clients possibly still waiting.
    accept_more: bool,
}

impl VsockMio {
    /// Binds the listener at `<uds_path>`, registers it, and builds the device.
    ///
    /// # Errors
    ///
    /// A bad path, a busy or unwritable listener path, a configuration the engine refuses.
    pub fn new(config: MioConfig, registry: &Registry) -> io::Result<Self> {
        let path = UdsPath::new(config.uds_path.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let listener = Listener::bind(path.listener())?;
        registry.register(
            &mut SourceFd(&listener_fd(&listener)),
            config.tokens.listener,
            MioInterest::READABLE,
        )?;
        let epoch = std::time::Instant::now();
        let device = VsockDevice::new(config.engine, Instant::ZERO)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let reactor = MioReactor {
            registry: registry.try_clone()?,
            first: config.tokens.first_conn,
            slots: HashMap::new(),
        };
        Ok(VsockMio {
            device,
            host: Host::new(path, reactor),
            listener,
            tokens: config.tokens,
            epoch,
            accept_retry: None,
            accept_more: false,
        })
    }

    /// The engine's clock: time since this driver was made.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(self.epoch.elapsed().as_nanos() as u64)
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device_mut(&mut self) -> &mut VsockDevice {
        &mut self.device
    }

    /// The host side (socket counters).
    pub fn host(&self) -> &Host<MioReactor> {
        &self.host
    }

    /// Whether `token` is one of this driver's.
    pub fn owns(&self, token: Token) -> bool {
        token == self.tokens.listener
            || token
                .0
                .checked_sub(self.tokens.first_conn)
                .is_some_and(|slot| slot < self.device.engine().config().max_connections)
    }

    /// Translates one event of the caller's poll into engine inputs. Returns `false` if the
    /// token is not this driver's. Call [`serve`](Self::serve) after the batch.
    pub fn handle_event(&mut self, event: &Event) -> bool {
        let token = event.token();
        if !self.owns(token) {
            return false;
        }
        let now = self.now();
        if token == self.tokens.listener {
            self.accept_all(now);
            return true;
        }
        let slot = (token.0 - self.tokens.first_conn) as u32;
        let Some(&conn) = self.host.reactor().slots.get(&slot) else {
            // A late event for a socket already closed.
            return true;
        };
        let _span = tracing::trace_span!("vsock_conn", %conn).entered();
        let engine = self.device.engine_mut();
        if event.is_error() {
            let _ = engine.handle_host_event(now, conn, HostEvent::Error(SocketError(0)));
            return true;
        }
        // A hang-up is reported as both, so the engine reads the end and writes the error.
        if event.is_readable() || event.is_read_closed() {
            let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
        }
        if event.is_writable() || event.is_write_closed() {
            let _ = engine.handle_host_event(now, conn, HostEvent::Writable);
        }
        true
    }

    fn accept_all(&mut self, now: Instant) {
        self.accept_more = false;
        let batch = ACCEPT_BATCH.min(self.device.engine().config().max_pending_host_clients);
        for _ in 0..batch {
            match self.listener.accept() {
                Ok(Some(stream)) => {
                    let engine = self.device.engine_mut();
                    if let Some(conn) = self.host.adopt_client(now, engine, stream) {
                        debug!(%conn, "host client");
                        // Its line may already be there: read it now, so a prompt client is
                        // no longer pending when the next one arrives (edge-triggered
                        // registration reports it too; a spurious readable is harmless).
                        let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
                        self.device.perform_actions(now, &mut self.host);
                    }
                }
                Ok(None) => {
                    self.accept_retry = None;
                    return;
                }
                Err(e) => {
                    // EMFILE and friends: the client waits in the backlog. Rather than spin,
                    // try again after a pause (see `retry_accept`), or at the next event.
                    if self.accept_retry.is_none() {
                        warn!(error = %e, "accept failed; retrying");
                    } else {
                        debug!(error = %e, "accept failed again");
                    }
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
        // More may wait: the next round comes after the queues and the other sockets had theirs.
        self.accept_more = true;
    }

    /// Accepts the clients a failed accept left in the backlog, once the retry is due.
    fn retry_accept(&mut self, now: Instant) {
        if self.accept_more || self.accept_retry.is_some_and(|t| t <= now) {
            self.accept_all(now);
        }
    }

    /// Drains every pending event of `poll` (which must be the poll whose registry this
    /// driver was built with) without blocking, handing each to [`handle_event`](Self::handle_event).
    /// For adapters that wait on the poll's own file descriptor from another event loop
    /// (tokio, smol): the poll is edge-triggered, so it is drained until a round comes back
    /// short.
    ///
    /// # Errors
    ///
    /// The poll's error.
    pub fn dispatch(&mut self, poll: &mut mio::Poll, events: &mut mio::Events) -> io::Result<()> {
        loop {
            match poll.poll(events, Some(Duration::ZERO)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut n = 0;
            for event in events.iter() {
                n += 1;
                self.handle_event(event);
            }
            if n < events.capacity() {
                return Ok(());
            }
        }
    }

    /// Resets every connection (RST to the guest, sockets closed): for a clean shutdown. Call
    /// [`serve`](Self::serve) afterwards so the RSTs reach the guest.
    pub fn abort_all(&mut self) {
        let now = self.now();
        self.device.engine_mut().abort_all(now);
    }

    /// Fires due deadlines (the engine's, and the retry of a failed accept) and serves the
    /// queues (see `VsockDevice::serve`).
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
        self.fire_deadlines(now);
        self.device.serve(now, mem, queues, &mut self.host)
    }

    /// The host-side work that needs no guest: fires due deadlines (the engine's, and the
    /// retry of a failed accept) and carries out the socket actions they owe (closing a host
    /// client whose `CONNECT` line or guest answer timed out, flushing, closing). Call it when
    /// the device has no queues to [`serve`](Self::serve) (no VM attached yet, a VM booting,
    /// the gap between two VMs): afterwards [`timeout`](Self::timeout) names a deadline in
    /// the future, never one that has passed. [`serve`](Self::serve) does this itself.
    pub fn serve_host(&mut self) {
        let now = self.now();
        self.fire_deadlines(now);
        self.device.perform_actions(now, &mut self.host);
    }

    fn fire_deadlines(&mut self, now: Instant) {
        self.retry_accept(now);
        let engine = self.device.engine_mut();
        if engine.poll_timeout().is_some_and(|t| t <= now) {
            engine.handle_timeout(now);
        }
    }

    /// One [`serve`](Self::serve) through a [`Transport`](vsock_device::Transport): the queues
    /// and memory from it, the interrupts to it. Returns whether work is left (serve again
    /// without waiting). A serve error is logged, not returned: the loop goes on.
    pub fn serve_transport<T: vsock_device::Transport>(&mut self, transport: &mut T) -> bool {
        while let Some(request) = transport.take_request() {
            self.apply(request, transport);
        }
        match transport.with_queues(|mem, queues| self.serve(mem, queues)) {
            Some(Ok(served)) => {
                transport.notify(&served);
                served.more
            }
            // Between a reset and the next activation there is nothing to serve (and `serve`
            // has done the host-side work).
            Some(Err(DeviceError::NotActivated)) => false,
            Some(Err(e)) => {
                warn!(error = %e, "cannot serve the queues");
                // Deadlines are due whether or not the queues can be served.
                self.serve_host();
                false
            }
            None => {
                // No guest attached: timers and host clients are served all the same, or a
                // passed deadline would make `timeout` return zero forever.
                self.serve_host();
                false
            }
        }
    }

    fn apply<T: vsock_device::Transport>(
        &mut self,
        request: vsock_device::DeviceRequest,
        transport: &mut T,
    ) {
        let now = self.now();
        match request {
            vsock_device::DeviceRequest::Reset => {
                debug!("device reset requested");
                self.device.reset(now);
                // Close the dropped connections' sockets now, not at the next activation:
                // the queues may be gone with the frontend that owned them.
                self.device.perform_actions(now, &mut self.host);
            }
            vsock_device::DeviceRequest::Stop => {
                debug!("device stop requested");
                self.device.stop(now);
                self.device.perform_actions(now, &mut self.host);
            }
            vsock_device::DeviceRequest::Activate { features } => {
                if let Err(e) = self.device.ack_features(features) {
                    warn!(error = %e, "refused the driver's features");
                    return;
                }
                let device = &mut self.device;
                transport.with_queues(|_, queues| device.activate(queues));
            }
        }
    }

    /// How long the caller's poll may sleep before [`serve`](Self::serve) is due for a
    /// deadline (the engine's, or the retry of a failed accept), or `None` if no deadline is
    /// pending.
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

fn listener_fd(listener: &Listener) -> std::os::fd::RawFd {
    use std::os::fd::AsFd;
    listener.as_fd().as_raw_fd()
}

/// The token of the stop waker and of the kick descriptor in a [`MioLoop`]'s own poll.
const LOOP_WAKER: Token = Token(usize::MAX);
const LOOP_KICK: Token = Token(usize::MAX - 1);

/// A ready-made loop on a thread of its own, for callers without a mio loop: the driver with
/// its own poll, a kick descriptor and a stop waker.
pub struct MioLoop {
    poll: mio::Poll,
    vsock: VsockMio,
}

impl MioLoop {
    /// Binds the listener and builds the device, on a poll of its own. `config.tokens` must
    /// stay clear of the two highest token values, which the loop keeps for itself.
    ///
    /// # Errors
    ///
    /// As [`VsockMio::new`].
    pub fn new(config: MioConfig) -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let vsock = VsockMio::new(config, poll.registry())?;
        Ok(MioLoop { poll, vsock })
    }

    /// The driver, for the device's features, config space and activation before the loop
    /// starts.
    pub fn driver_mut(&mut self) -> &mut VsockMio {
        &mut self.vsock
    }

    /// Starts serving on a new thread. `kick` is a non-blocking descriptor that becomes
    /// readable when the guest kicks a queue.
    ///
    /// # Errors
    ///
    /// The thread or the registrations could not be set up.
    pub fn spawn<T: vsock_device::Transport + Send + 'static>(
        self,
        mut transport: T,
        kick: std::os::fd::OwnedFd,
    ) -> io::Result<MioThread> {
        let MioLoop {
            mut poll,
            mut vsock,
        } = self;
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), LOOP_WAKER)?);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kick = std::fs::File::from(kick);
        poll.registry().register(
            &mut SourceFd(&kick.as_raw_fd()),
            LOOP_KICK,
            MioInterest::READABLE,
        )?;
        let stopping = stop.clone();
        let handle = std::thread::Builder::new().name("vsock-mio".into()).spawn(
            move || -> io::Result<VsockMio> {
                let mut events = mio::Events::with_capacity(256);
                loop {
                    let more = vsock.serve_transport(&mut transport);
                    let timeout = if more {
                        Some(Duration::ZERO)
                    } else {
                        vsock.timeout()
                    };
                    match poll.poll(&mut events, timeout) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                    for event in events.iter() {
                        match event.token() {
                            LOOP_WAKER => {}
                            LOOP_KICK => drain_kick(&kick)?,
                            _ => {
                                vsock.handle_event(event);
                            }
                        }
                    }
                    if stopping.load(std::sync::atomic::Ordering::Acquire) {
                        vsock.abort_all();
                        vsock.serve_transport(&mut transport);
                        return Ok(vsock);
                    }
                }
            },
        )?;
        Ok(MioThread {
            waker,
            stop,
            handle,
        })
    }
}

/// A [`MioLoop`] running on its thread.
pub struct MioThread {
    waker: std::sync::Arc<mio::Waker>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<io::Result<VsockMio>>,
}

impl MioThread {
    /// Stops the loop: the guest's connections are reset (the RSTs delivered if it has rx
    /// buffers) and every socket closed. Returns the driver; dropping it unlinks the listener.
    ///
    /// # Errors
    ///
    /// The loop's own failure, if it stopped on one.
    pub fn stop(self) -> io::Result<VsockMio> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.waker.wake()?;
        self.handle
            .join()
            .map_err(|_| io::Error::other("the vsock loop panicked"))?
    }
}

/// Reads a kick descriptor (an eventfd, a pipe, a socket) empty, without blocking.
///
/// # Errors
///
/// A read error other than would-block.
pub fn drain_kick(mut fd: &std::fs::File) -> io::Result<()> {
    use std::io::Read;
    let mut buf = [0u8; 64];
    loop {
        match fd.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
