//! Drives the vsock device from tokio: the adapter for asynchronous VMMs on tokio.
//!
//! [`VsockTokio::run`] is one future per device, to spawn as a task. Its host sockets live in
//! a private `mio::Poll` whose file descriptor tokio watches through `AsyncFd`, so the event
//! translation is `vsock-mio`'s, written once, and this crate only waits: on that descriptor,
//! on the guest's queue kicks, on the engine's next deadline, and on shutdown.
//!
//! # Embedding
//!
//! ```no_run
//! # use vsock_device::Transport;
//! # async fn embed<T: Transport + Send + 'static>(transport: T, kick: std::os::fd::OwnedFd) -> std::io::Result<()> {
//! use vsock_mio::{MioConfig, Tokens};
//! use vsock_tokio::VsockTokio;
//!
//! let config = MioConfig {
//!     engine: vsock_core::Config::new(3),
//!     uds_path: "/run/vm0/vsock".into(),
//!     tokens: Tokens { listener: mio::Token(0), first_conn: 1 },
//! };
//! // Inside a tokio runtime; `kick` is a non-blocking eventfd the VMM signals when the guest
//! // kicks any queue, `transport` hands out the queues and interrupts the guest.
//! let vsock = VsockTokio::new(config)?;
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let task = tokio::spawn(vsock.run(transport, kick, async { let _ = stopped.await; }));
//! // ... later: a clean shutdown resets the guest's connections and closes the sockets.
//! let _ = stop.send(());
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use mio::{Events, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use vsock_device::Transport;
use vsock_mio::{MioConfig, VsockMio};

/// A vsock device served by a tokio task.
pub struct VsockTokio {
    poll: AsyncFd<Poll>,
    events: Events,
    vsock: VsockMio,
}

impl VsockTokio {
    /// Binds the listener and builds the device. Must be called inside a tokio runtime.
    ///
    /// # Errors
    ///
    /// As [`VsockMio::new`], or the runtime refusing the poll's descriptor.
    pub fn new(config: MioConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let vsock = VsockMio::new(config, poll.registry())?;
        Ok(VsockTokio {
            poll: watch(poll)?,
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
    /// RSTs if the guest has rx buffers), closes every socket and unlinks the listener.
    /// Returns the driver, for its final counters.
    ///
    /// `kick` is a non-blocking descriptor (an eventfd, a pipe, a socket) that becomes
    /// readable when the guest kicks a queue; it is drained on each wake-up.
    ///
    /// # Errors
    ///
    /// Only the loop's own failures (the poll or the kick descriptor); socket and guest faults
    /// are handled inside.
    pub async fn run<T: Transport>(
        mut self,
        mut transport: T,
        kick: OwnedFd,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<VsockMio> {
        let kick = watch(File::from(kick))?;
        tokio::pin!(shutdown);
        loop {
            self.vsock.dispatch(self.poll.get_mut(), &mut self.events)?;
            let more = self.vsock.serve_transport(&mut transport);
            if more {
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = self.vsock.timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                ready = self.poll.readable() => ready?.clear_ready(),
                ready = kick.readable() => {
                    let mut ready = ready?;
                    vsock_mio::drain_kick(ready.get_inner())?;
                    ready.clear_ready();
                }
                () = sleep => {}
            }
        }
        self.vsock.abort_all();
        self.vsock.dispatch(self.poll.get_mut(), &mut self.events)?;
        self.vsock.serve_transport(&mut transport);
        Ok(self.vsock)
    }
}

/// Watches an owned descriptor for readability in tokio's reactor.
#[allow(unsafe_code)]
fn watch<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is a `mio::Poll` or a `File` owned by the `AsyncFd` from here on: its
    // descriptor is open, and stays the same open file description, until the `AsyncFd` is
    // dropped, since nothing else can close or replace it.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(|e| e.into())
}
