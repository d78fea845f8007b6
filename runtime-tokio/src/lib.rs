//! Drives the vsock device from tokio: the adapter for asynchronous VMMs on tokio.
//!
//! [`VsockTokio::run`] is one future per device, to spawn as a task; [`VsockTokio::spawn`]
//! runs it on a thread of its own, on a current-thread runtime. Its host sockets live in a
//! private `mio::Poll` whose file descriptor tokio watches through `AsyncFd`, so the event
//! translation is `vsock-mio`'s and the driver is `vsock-host`'s, each written once; this crate
//! only waits: on that descriptor, on the guest's queue kicks, on the next deadline, and on
//! shutdown.
//!
//! # Embedding
//!
//! ```no_run
//! # use vsock_device::Transport;
//! # async fn embed<T: Transport + Send + 'static>(transport: T, kick: std::os::fd::OwnedFd) -> std::io::Result<()> {
//! use vsock_host::DriverConfig;
//! use vsock_tokio::VsockTokio;
//!
//! // `kick` is a non-blocking eventfd the VMM signals when the guest kicks any queue,
//! // `transport` hands out the queues and interrupts the guest.
//! let vsock = VsockTokio::new(DriverConfig::new(3, "/run/vm0/vsock"))?;
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
use vsock_device::{Transport, VsockDevice};
use vsock_host::{DriverConfig, DriverThread, Host};
use vsock_mio::{MioConfig, MioReactor, VsockMio};

/// A vsock device served by a tokio task.
pub struct VsockTokio {
    poll: Poll,
    events: Events,
    vsock: VsockMio,
}

impl VsockTokio {
    /// Binds the listener and builds the device. Needs no runtime: [`run`](Self::run) does.
    ///
    /// # Errors
    ///
    /// A bad or busy listener path, a configuration the engine refuses, the poll's own.
    pub fn new(config: DriverConfig) -> io::Result<Self> {
        let poll = Poll::new()?;
        let vsock = VsockMio::new(MioConfig::own_poll(config), poll.registry())?;
        Ok(VsockTokio {
            poll,
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
    /// final counters; dropping it unlinks the listener. Must run inside a tokio runtime with
    /// I/O and time enabled.
    ///
    /// `kick` is a non-blocking descriptor (an eventfd, a pipe, a socket) that becomes
    /// readable when the guest kicks a queue; it is drained on each wake-up.
    ///
    /// # Errors
    ///
    /// Only the loop's own failures (the poll or the kick descriptor); socket and guest faults
    /// are handled inside.
    pub async fn run<T: Transport>(
        self,
        mut transport: T,
        kick: OwnedFd,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<Self> {
        let VsockTokio {
            poll,
            mut events,
            mut vsock,
        } = self;
        let mut poll = watch(poll)?;
        let kick = watch(File::from(kick))?;
        tokio::pin!(shutdown);
        loop {
            vsock.dispatch(poll.get_mut(), &mut events)?;
            if vsock.serve_transport(&mut transport) {
                tokio::task::yield_now().await;
                continue;
            }
            let deadline = vsock.timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                ready = poll.readable() => ready?.clear_ready(),
                ready = kick.readable() => {
                    let mut ready = ready?;
                    vsock_mio::drain_kick(ready.get_inner())?;
                    ready.clear_ready();
                }
                () = sleep => {}
            }
        }
        vsock.abort_all();
        vsock.dispatch(poll.get_mut(), &mut events)?;
        vsock.serve_transport(&mut transport);
        Ok(VsockTokio {
            poll: poll.into_inner(),
            events,
            vsock,
        })
    }

    /// Serves on a thread of its own, on a current-thread runtime, until the returned
    /// handle's [`stop`](DriverThread::stop).
    ///
    /// # Errors
    ///
    /// The thread could not be started.
    pub fn spawn<T: Transport + Send + 'static>(
        self,
        transport: T,
        kick: OwnedFd,
    ) -> io::Result<DriverThread<Self>> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let body = move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            runtime.block_on(self.run(transport, kick, async {
                let _ = stopped.await;
            }))
        };
        DriverThread::spawn("vsock-tokio", body, move || {
            let _ = stop.send(());
        })
    }
}

/// Watches an owned descriptor for readability in tokio's reactor.
#[allow(unsafe_code)]
fn watch<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is a `mio::Poll` or a `File` owned by the `AsyncFd` from here on: its
    // descriptor is open, and stays the same open file description, until the `AsyncFd` is
    // dropped (or gives it back with `into_inner`, after deregistering it), since nothing else
    // can close or replace it.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(|e| e.into())
}
