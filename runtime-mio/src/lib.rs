//! Drives the vsock device from a [mio](https://docs.rs/mio) event loop: the adapter for
//! synchronous virtual machine monitors.
//!
//! [`VsockMio`] registers the host listener and every connection socket in the caller's
//! `mio::Registry`, under tokens from a range the caller reserves ([`Tokens`]), so they sit in
//! the caller's own loop next to its other sources. It translates readiness into engine
//! inputs for [`vsock_host::Driver`], which holds the device, the socket table, the listener,
//! the clock and the deadlines for every runtime. This crate is only event translation and a
//! ready-made loop.
//!
//! Sockets are registered edge-triggered: for readable always, for writable only while the
//! engine waits to write (a short write, a connect in progress), so a host peer draining a
//! socket does not wake the loop at every read. The engine keeps track of what it already
//! knows is readable or writable.
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
//!         seqpacket: true,
//!         siblings: None,
//!         // The VMM's own sources use tokens below 100.
//!         tokens: Tokens { listener: Token(100), first_conn: 101, kicks: None },
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
//! own ([`vsock_host::DriverThread`]), fed by a [`Transport`](vsock_device::Transport) and a
//! kick descriptor.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest as MioInterest, Registry, Token};
use tracing::warn;
use vm_memory::GuestMemory;
use vsock_core::{Config, ConnId, Interest};
use vsock_device::{DeviceError, Queues, Served, VsockDevice};
use vsock_host::{Driver, DriverConfig, DriverThread, Host, Reactor, Readiness};

/// The tokens `VsockMio` uses in the caller's registry: `listener`, one per connection slot
/// from `first_conn` on (`first_conn + max_connections` must not collide with the caller's
/// own tokens), and, if `kicks` is set, one per queue for the kick descriptors a
/// [`Transport`](vsock_device::Transport) hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// The host listener's token.
    pub listener: Token,
    /// The token of connection slot 0; slot `i` uses `first_conn + i`.
    pub first_conn: usize,
    /// The token of queue 0's kick descriptor; queue `q` uses `kicks + q` (three in all).
    /// `None`: the driver watches no kick descriptor (the caller watches its own kicks).
    pub kicks: Option<usize>,
}

/// The queues whose kicks a driver can watch: rx, tx and event.
const KICK_QUEUES: usize = 3;

/// Configuration of a [`VsockMio`].
#[derive(Clone, Debug)]
pub struct MioConfig {
    /// The engine's configuration (guest CID, buffers, limits, timeouts).
    pub engine: Config,
    /// The base path `<uds_path>`.
    pub uds_path: PathBuf,
    /// Offer seqpacket sockets (see [`DriverConfig::seqpacket`]).
    pub seqpacket: bool,
    /// The VM's sibling link (see [`DriverConfig::siblings`]); its inbox is watched under
    /// the listener's token.
    pub siblings: Option<vsock_host::SiblingLink>,
    /// The tokens to use.
    pub tokens: Tokens,
}

impl MioConfig {
    /// The configuration for a driver on a poll of its own (a [`MioLoop`], or the private
    /// poll the tokio and smol adapters watch): the listener at token 0, the kicks of queues 0
    /// to 2 at 1 to 3, slot `i` at `4 + i`.
    pub fn own_poll(config: DriverConfig) -> MioConfig {
        MioConfig {
            engine: config.engine,
            uds_path: config.uds_path,
            seqpacket: config.seqpacket,
            siblings: config.siblings,
            tokens: Tokens {
                listener: Token(0),
                kicks: Some(1),
                first_conn: 1 + KICK_QUEUES,
            },
        }
    }
}

/// Watches sockets in a mio registry, edge-triggered, under the token of their table slot:
/// readable always, writable only while the engine waits for it (a socket the host peer
/// drains would otherwise wake the loop at every read), and the queue kick descriptors a
/// transport hands over.
pub struct MioReactor {
    registry: Registry,
    first: usize,
    kick_token: Option<usize>,
    kicks: [Option<std::os::fd::OwnedFd>; KICK_QUEUES],
}

/// A connection socket as [`MioReactor`] watches it.
#[derive(Debug)]
pub struct MioSocket {
    stream: UnixStream,
    /// Registered for writable as well as readable.
    writable: bool,
}

impl std::os::fd::AsFd for MioSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

fn mio_interest(writable: bool) -> MioInterest {
    if writable {
        MioInterest::READABLE | MioInterest::WRITABLE
    } else {
        MioInterest::READABLE
    }
}

impl MioReactor {
    fn token(&self, conn: ConnId) -> Token {
        Token(self.first + conn.index() as usize)
    }
}

impl Reactor for MioReactor {
    type Socket = MioSocket;

    fn register(
        &mut self,
        conn: ConnId,
        stream: UnixStream,
        interest: Interest,
    ) -> io::Result<MioSocket> {
        stream.set_nonblocking(true)?;
        self.registry.register(
            &mut SourceFd(&stream.as_raw_fd()),
            self.token(conn),
            mio_interest(interest.writable),
        )?;
        Ok(MioSocket {
            stream,
            writable: interest.writable,
        })
    }

    fn stream<'a>(&self, socket: &'a MioSocket) -> &'a UnixStream {
        &socket.stream
    }

    fn set_interest(
        &mut self,
        conn: ConnId,
        socket: &mut MioSocket,
        interest: Interest,
    ) -> io::Result<()> {
        // Readable stays registered: edge-triggered, it fires only when new bytes come, which
        // the engine wants to hear of in all but brief moments, and toggling it would cost a
        // system call per read.
        if interest.writable == socket.writable {
            return Ok(());
        }
        // Re-arming reports a socket that is already writable at once, so no edge is lost
        // between the would-block that asked for this and the change.
        self.registry.reregister(
            &mut SourceFd(&socket.stream.as_raw_fd()),
            self.token(conn),
            mio_interest(interest.writable),
        )?;
        socket.writable = interest.writable;
        Ok(())
    }

    fn deregister(&mut self, conn: ConnId, socket: MioSocket) {
        if let Err(e) = self
            .registry
            .deregister(&mut SourceFd(&socket.stream.as_raw_fd()))
        {
            warn!(%conn, error = %e, "cannot deregister a socket");
        }
    }

    fn watch_kick(&mut self, queue: u16, fd: Option<std::os::fd::OwnedFd>) -> io::Result<()> {
        let Some(first) = self.kick_token else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let q = usize::from(queue);
        if q >= KICK_QUEUES {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if let Some(old) = self.kicks[q].take() {
            if let Err(e) = self.registry.deregister(&mut SourceFd(&old.as_raw_fd())) {
                warn!(queue, error = %e, "cannot deregister a kick descriptor");
            }
        }
        if let Some(fd) = fd {
            self.registry.register(
                &mut SourceFd(&fd.as_raw_fd()),
                Token(first + q),
                MioInterest::READABLE,
            )?;
            self.kicks[q] = Some(fd);
        }
        Ok(())
    }
}

/// A vsock device driven from the caller's mio loop: [`vsock_host::Driver`] with mio's event
/// translation.
pub struct VsockMio {
    driver: Driver<MioReactor>,
    tokens: Tokens,
}

impl VsockMio {
    /// Binds the listener, registers it, and builds the device.
    ///
    /// # Errors
    ///
    /// A bad path, a busy or unwritable listener path, a configuration the engine refuses, a
    /// registration the poll refuses.
    pub fn new(config: MioConfig, registry: &Registry) -> io::Result<Self> {
        let reactor = MioReactor {
            registry: registry.try_clone()?,
            first: config.tokens.first_conn,
            kick_token: config.tokens.kicks,
            kicks: Default::default(),
        };
        let driver = Driver::new(
            DriverConfig {
                engine: config.engine,
                uds_path: config.uds_path,
                seqpacket: config.seqpacket,
                siblings: config.siblings,
            },
            reactor,
        )?;
        // Both listeners share a token: either one readable means a round of accepts, which
        // takes from both.
        registry.register(
            &mut SourceFd(&listener_fd(driver.listener())),
            config.tokens.listener,
            MioInterest::READABLE,
        )?;
        if let Some(listener) = driver.seqpacket_listener() {
            registry.register(
                &mut SourceFd(&listener_fd(listener)),
                config.tokens.listener,
                MioInterest::READABLE,
            )?;
        }
        // Siblings' connects arrive like clients: the same round takes them.
        if let Some(wake) = driver.sibling_wake() {
            registry.register(
                &mut SourceFd(&wake.as_raw_fd()),
                config.tokens.listener,
                MioInterest::READABLE,
            )?;
        }
        Ok(VsockMio {
            driver,
            tokens: config.tokens,
        })
    }

    /// The runtime-neutral driver this wraps.
    pub fn driver(&self) -> &Driver<MioReactor> {
        &self.driver
    }

    /// The runtime-neutral driver this wraps.
    pub fn driver_mut(&mut self) -> &mut Driver<MioReactor> {
        &mut self.driver
    }

    /// The engine's clock: time since this driver was made.
    pub fn now(&self) -> vsock_core::Instant {
        self.driver.now()
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device(&self) -> &VsockDevice {
        self.driver.device()
    }

    /// The device (features, config space, activation, reset, save/restore, stats).
    pub fn device_mut(&mut self) -> &mut VsockDevice {
        self.driver.device_mut()
    }

    /// The host side (socket counters).
    pub fn host(&self) -> &Host<MioReactor> {
        self.driver.host()
    }

    fn is_kick(&self, token: Token) -> bool {
        self.tokens
            .kicks
            .and_then(|first| token.0.checked_sub(first))
            .is_some_and(|q| q < KICK_QUEUES)
    }

    /// Whether `token` is one of this driver's.
    pub fn owns(&self, token: Token) -> bool {
        token == self.tokens.listener
            || self.is_kick(token)
            || token
                .0
                .checked_sub(self.tokens.first_conn)
                .is_some_and(|slot| slot < self.device().engine().config().max_connections)
    }

    /// Translates one event of the caller's poll into driver inputs. Returns `false` if the
    /// token is not this driver's. Call [`serve`](Self::serve) after the batch.
    pub fn handle_event(&mut self, event: &Event) -> bool {
        let token = event.token();
        if !self.owns(token) {
            return false;
        }
        if token == self.tokens.listener {
            self.driver.accept();
            return true;
        }
        if self.is_kick(token) {
            // A guest kick: the serve that follows the batch reads the rings.
            return true;
        }
        let slot = (token.0 - self.tokens.first_conn) as u32;
        // A hang-up is reported as both, so the engine reads the end and writes the error.
        self.driver.ready(
            slot,
            Readiness {
                readable: event.is_readable() || event.is_read_closed(),
                writable: event.is_writable() || event.is_write_closed(),
                error: event.is_error(),
                // EPOLLHUP: both directions are shut (the peer closed, or it and we each
                // shut one); the engine tells the guest if that leaves it unable to send.
                hang_up: event.is_write_closed(),
            },
        );
        true
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
        self.driver.abort_all();
    }

    /// Fires due deadlines and serves the queues (see [`Driver::serve`]).
    ///
    /// # Errors
    ///
    /// As [`VsockDevice::serve`].
    pub fn serve<M: GuestMemory>(
        &mut self,
        mem: &M,
        queues: Queues<'_>,
    ) -> Result<Served, DeviceError> {
        self.driver.serve(mem, queues)
    }

    /// The work that needs no guest, for when the caller has no queues to serve (see
    /// [`Driver::serve_host`]).
    pub fn serve_host(&mut self) {
        self.driver.serve_host();
    }

    /// One wake-up through a [`Transport`](vsock_device::Transport) (see
    /// [`Driver::serve_transport`]). Returns whether work is left.
    pub fn serve_transport<T: vsock_device::Transport>(&mut self, transport: &mut T) -> bool {
        self.driver.serve_transport(transport)
    }

    /// How long the caller's poll may sleep before [`serve`](Self::serve) is due (see
    /// [`Driver::timeout`]).
    pub fn timeout(&mut self) -> Option<Duration> {
        self.driver.timeout()
    }
}

fn listener_fd(listener: &vsock_host::Listener) -> std::os::fd::RawFd {
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
    /// Binds the listener and builds the device, on a poll of its own.
    ///
    /// # Errors
    ///
    /// As [`VsockMio::new`].
    pub fn new(config: DriverConfig) -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let vsock = VsockMio::new(MioConfig::own_poll(config), poll.registry())?;
        Ok(MioLoop { poll, vsock })
    }

    /// The driver, for the device's features, config space and activation before the loop
    /// starts.
    pub fn driver_mut(&mut self) -> &mut VsockMio {
        &mut self.vsock
    }

    /// The device: features and config space before the loop starts.
    pub fn device(&self) -> &VsockDevice {
        self.vsock.device()
    }

    /// The device: features, config space and activation before the loop starts (as
    /// `VsockTokio::device_mut` and `VsockSmol::device_mut`).
    pub fn device_mut(&mut self) -> &mut VsockDevice {
        self.vsock.device_mut()
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
    ) -> io::Result<DriverThread<VsockMio>> {
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
        // The loop keeps the waker too: the stop signal drops its own handle as soon as it has
        // woken the loop, and closing the waker's last descriptor would take its pending
        // event out of the poll before the loop sees it.
        let awake = waker.clone();
        let body = move || -> io::Result<VsockMio> {
            let _awake = awake;
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
        };
        DriverThread::spawn("vsock-mio", body, move || {
            stop.store(true, std::sync::atomic::Ordering::Release);
            if let Err(e) = waker.wake() {
                warn!(error = %e, "cannot wake the vsock loop");
            }
        })
    }
}

/// Reads a kick descriptor (an eventfd, a pipe, a socket) empty, without blocking. A read
/// that comes back short of the buffer has emptied it (and anything written after it raises a
/// new edge), so a kick costs one read, not a second one that would block.
///
/// # Errors
///
/// A read error other than would-block.
pub fn drain_kick(mut fd: &std::fs::File) -> io::Result<()> {
    use std::io::Read;
    let mut buf = [0u8; 64];
    loop {
        match fd.read(&mut buf) {
            Ok(n) if n == buf.len() => continue,
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
