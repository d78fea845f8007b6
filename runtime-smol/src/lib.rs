//! Drives the vsock device from smol: the adapter for asynchronous VMMs on smol (or any
//! executor, with `async-io`'s reactor).
//!
//! [`VsockSmol::run`] is one future per device. Like the tokio adapter, its host sockets live
//! in a private `mio::Poll` whose descriptor `async-io` watches, so the event translation is
//! `vsock-mio`'s, written once; this crate only waits: on that descriptor, on the guest's
//! queue kicks, on the engine's next deadline, and on shutdown.
//!
//! # Embedding
//!
//! ```no_run
//! # use vsock_device::Transport;
//! # fn embed<T: Transport + Send + 'static>(transport: T, kick: std::os::fd::OwnedFd) -> std::io::Result<()> {
//! use vsock_mio::{MioConfig, Tokens};
//! use vsock_smol::VsockSmol;
//!
//! let config = MioConfig {
//!     engine: vsock_core::Config::new(3),
//!     uds_path: "/run/vm0/vsock".into(),
//!     tokens: Tokens { listener: mio::Token(0), first_conn: 1 },
//! };
//! let vsock = VsockSmol::new(config)?;
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
use std::io;
use std::os::fd::OwnedFd;
use std::pin::pin;

use async_io::{Async, Timer};
use futures_lite::future;
use mio::{Events, Poll, Registry};
use vsock_device::Transport;
use vsock_mio::{MioConfig, VsockMio};

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
    /// As [`VsockMio::new`], or the reactor refusing the poll's descriptor.
    pub fn new(config: MioConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let vsock = VsockMio::new(config, poll.registry())?;
        let watch = Async::new(poll.registry().try_clone()?)?;
        Ok(VsockSmol {
            poll,
            watch,
            events: Events::with_capacity(256),
            vsock,
        })
    }

    /// The driver, for the device's features, config space, activation and counters before
    /// the task starts.
    pub fn driver_mut(&mut self) -> &mut VsockMio {
        &mut self.vsock
    }

    /// Serves until `shutdown` completes, then resets the guest's connections (delivering the
    /// RSTs if the guest has rx buffers) and closes every socket. Returns the driver; dropping
    /// it unlinks the listener.
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
    ) -> io::Result<VsockMio> {
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
        Ok(self.vsock)
    }
}
