//! Starting and stopping the chosen event loop. Each runs the same `vsock-mio` driver; they
//! differ only in who waits.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::thread;

use vsock_core::record::Recorder;
use vsock_mio::{MioConfig, MioLoop, VsockMio};

use crate::VhostTransport;

/// The event loop that serves the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// `vsock-mio`'s ready-made loop on a thread of its own.
    Mio,
    /// `vsock-tokio`'s task on a current-thread tokio runtime.
    Tokio,
    /// `vsock-smol`'s task on an `async-io` executor.
    Smol,
}

/// A runtime serving the device on its own thread.
pub struct Running {
    stop: Box<dyn FnOnce() -> io::Result<VsockMio> + Send>,
}

impl Running {
    /// Stops the loop: the guest's connections are reset, every socket is closed. Returns the
    /// driver, for its counters; dropping it unlinks the listener.
    ///
    /// # Errors
    ///
    /// The loop's own failure, if it stopped on one.
    pub fn stop(self) -> io::Result<VsockMio> {
        (self.stop)()
    }
}

/// Binds the listener and starts serving on `kind`, on a new thread. `kick` becomes readable
/// when the backend has news for the runtime; `recorder`, if any, is attached to the engine
/// before the first event.
///
/// # Errors
///
/// The listener cannot be bound (busy, unwritable, a bad path), the configuration is refused,
/// or the thread cannot start.
pub fn start(
    kind: RuntimeKind,
    config: MioConfig,
    transport: VhostTransport,
    kick: OwnedFd,
    recorder: Option<Box<dyn Recorder>>,
) -> io::Result<Running> {
    // Attached before the loop starts, so the trace holds the whole session (and the engine
    // holds no connection yet, so it is never refused).
    let attach = move |driver: &mut VsockMio| -> io::Result<()> {
        if recorder.is_some() {
            driver
                .device_mut()
                .engine_mut()
                .set_recorder(recorder)
                .map_err(io::Error::other)?;
        }
        Ok(())
    };
    match kind {
        RuntimeKind::Mio => {
            let mut lp = MioLoop::new(config)?;
            attach(lp.driver_mut())?;
            let thread = lp.spawn(transport, kick)?;
            Ok(Running {
                stop: Box::new(move || thread.stop()),
            })
        }
        RuntimeKind::Tokio => spawn_loop("vsock-tokio", move |started, stopped| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            runtime.block_on(async move {
                let built = vsock_tokio::VsockTokio::new(config).and_then(|mut vsock| {
                    attach(vsock.driver_mut())?;
                    Ok(vsock)
                });
                let vsock = report(&started, built)?;
                vsock
                    .run(transport, kick, async {
                        let _ = stopped.await;
                    })
                    .await
            })
        }),
        RuntimeKind::Smol => spawn_loop("vsock-smol", move |started, stopped| {
            async_io::block_on(async move {
                let built = vsock_smol::VsockSmol::new(config).and_then(|mut vsock| {
                    attach(vsock.driver_mut())?;
                    Ok(vsock)
                });
                let vsock = report(&started, built)?;
                vsock
                    .run(transport, kick, async {
                        let _ = stopped.await;
                    })
                    .await
            })
        }),
    }
}

type Started = mpsc::Sender<io::Result<()>>;
type Stopped = tokio::sync::oneshot::Receiver<()>;

/// Runs `body` on a new thread named `name`, and waits until it reports whether its driver
/// could be built. `body` reports through [`report`], and gets the future that completes on
/// [`Running::stop`].
fn spawn_loop<F>(name: &str, body: F) -> io::Result<Running>
where
    F: FnOnce(Started, Stopped) -> io::Result<VsockMio> + Send + 'static,
{
    let (started, reported) = mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let handle = thread::Builder::new()
        .name(name.into())
        .spawn(move || body(started, stopped))?;
    let joined = |handle: thread::JoinHandle<io::Result<VsockMio>>| {
        handle
            .join()
            .map_err(|_| io::Error::other("the vsock loop panicked"))?
    };
    match reported.recv() {
        Ok(Ok(())) => Ok(Running {
            stop: Box::new(move || {
                let _ = stop.send(());
                joined(handle)
            }),
        }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        // The thread ended before it built the driver: its result says why.
        Err(_) => match joined(handle) {
            Ok(_) => Err(io::Error::other("the vsock loop ended before it started")),
            Err(e) => Err(e),
        },
    }
}

/// Passes `built` through, telling [`spawn_loop`]'s caller how it went.
fn report<T>(started: &Started, built: io::Result<T>) -> io::Result<T> {
    match built {
        Ok(driver) => {
            let _ = started.send(Ok(()));
            Ok(driver)
        }
        Err(e) => {
            let again = io::Error::new(e.kind(), e.to_string());
            let _ = started.send(Err(e));
            Err(again)
        }
    }
}
