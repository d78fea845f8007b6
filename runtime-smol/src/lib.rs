//! Drives the vsock device from smol: the adapter for asynchronous VMMs on smol (or any
//! executor, with `async-io`'s reactor).
//!
//! [`VsockSmol::run`] is one future per device; [`VsockSmol::spawn`] runs it on a thread of
//! its own. Like the tokio adapter, its host sockets live in a private `mio::Poll` whose
//! descriptor `async-io` watches, so the event translation is `vsock-mio`'s and the driver is
//! `vsock-host`'s, each written once; this crate only waits: on that descriptor, on the
//! guest's queue kicks, on the next deadline, and on shutdown.
//!
//! # Embedding
//!
//! ```no_run
//! # use vsock_device::Transport;
//! # fn embed<T: Transport + Send + 'static>(transport: T, kick: std::os::fd::OwnedFd) -> std::io::Result<()> {
//! use vsock_host::DriverConfig;
//! use vsock_smol::VsockSmol;
//!
//! let vsock = VsockSmol::new(DriverConfig::new(3, "/run/vm0/vsock"))?;
//! let (stop, stopped) = smol::channel::bounded::<()>(1);
//! let task = smol::spawn(vsock.run(transport, kick, async move { let _ = stopped.recv().await; }));
//! // ... later: a clean shutdown resets the guest's connections and closes the sockets.
//! let _ = stop.try_send(());
//! # drop(task);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::pin::pin;

use async_io::{Async, Timer};
use futures_lite::future;
use mio::{Events, Poll, Registry};
use vsock_device::{Transport, VsockDevice};
use vsock_host::{DriverConfig, DriverThread, Host};
use vsock_mio::{MioConfig, MioReactor, VsockMio};

/// A vsock device served by a smol task.
pub struct VsockSmol {
    poll: Poll,
    /// The poll's descriptor (a duplicate of it), watched by async-io.
    watch: Async<Registry>,
    events: Events,
    vsock: VsockMio,
}

enum Wake {
    Stop,
    Io,
    Kick,
    Timer,
}

impl VsockSmol {
    /// Binds the listener and builds the device.
    ///
    /// # Errors
    ///
    /// A bad or busy listener path, a configuration the engine refuses, the poll's own, or
    /// the reactor refusing the poll's descriptor.
    pub fn new(config: DriverConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let vsock = VsockMio::new(MioConfig::own_poll(config), poll.registry())?;
        let watch = Async::new(poll.registry().try_clone()?)?;
        Ok(VsockSmol {
            poll,
            watch,
            events: Events::with_capacity(256),
            vsock,
        })
    }

    /// The device: features, config space and activation before the task starts, counters
    /// after it ends.
    pub fn device(&self) -> &VsockDevice {
        self.vsock.device()
    }

    /// The device: features, config space and activation before the task starts.
    pub fn device_mut(&mut self) -> &mut VsockDevice {
        self.vsock.device_mut()
    }

    /// The host side: the socket table (on the private poll's reactor) and its counters.
    pub fn host(&self) -> &Host<MioReactor> {
        self.vsock.host()
    }

    /// Serves until `shutdown` completes, then resets the guest's connections (delivering the
    /// RSTs if the guest has rx buffers), closes every socket and returns itself, for its
    /// final counters; dropping it unlinks the listener.
    ///
    /// `kick` is a non-blocking descriptor that becomes readable when the guest kicks a
    /// queue; it is drained on each wake-up.
    ///
    /// # Errors
    ///
    /// Only the loop's own failures (the poll or the kick descriptor).
    pub async fn run<T: Transport>(
        mut self,
        mut transport: T,
        kick: OwnedFd,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<Self> {
        let kick = Async::new(File::from(kick))?;
        let mut shutdown = pin!(shutdown);
        loop {
            self.vsock.dispatch(&mut self.poll, &mut self.events)?;
            if self.vsock.serve_transport(&mut transport) {
                future::yield_now().await;
                continue;
            }
            let timer = match self.vsock.timeout() {
                Some(d) => Timer::after(d),
                None => Timer::never(),
            };
            let stop = async {
                shutdown.as_mut().await;
                Ok(Wake::Stop)
            };
            let io = async { self.watch.readable().await.map(|()| Wake::Io) };
            let kicked = async { kick.readable().await.map(|()| Wake::Kick) };
            let timed = async {
                timer.await;
                Ok(Wake::Timer)
            };
            match future::or(stop, future::or(io, future::or(kicked, timed))).await? {
                Wake::Stop => break,
                Wake::Kick => vsock_mio::drain_kick(kick.get_ref())?,
                Wake::Io | Wake::Timer => {}
            }
        }
        self.vsock.abort_all();
        self.vsock.dispatch(&mut self.poll, &mut self.events)?;
        self.vsock.serve_transport(&mut transport);
        Ok(self)
    }

    /// Serves on a thread of its own, on `async-io`'s `block_on`, until the returned handle's
    /// [`stop`](DriverThread::stop).
    ///
    /// # Errors
    ///
    /// The thread or its stop signal could not be set up.
    pub fn spawn<T: Transport + Send + 'static>(
        self,
        transport: T,
        kick: OwnedFd,
    ) -> io::Result<DriverThread<Self>> {
        // The stop signal: a byte on a socket the shutdown future waits for.
        let (mut stop, stopped) = UnixStream::pair()?;
        let stopped = Async::new(stopped)?;
        let body = move || {
            async_io::block_on(self.run(transport, kick, async move {
                let _ = stopped.readable().await;
            }))
        };
        DriverThread::spawn("vsock-smol", body, move || {
            let _ = stop.write_all(b"s");
        })
    }
}
