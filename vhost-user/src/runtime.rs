//! Starting and stopping the chosen event loop. Each runs the same `vsock-host` driver on a
//! thread of its own ([`vsock_host::DriverThread`]); they differ only in who waits.

use std::io;
use std::os::fd::OwnedFd;

use vsock_core::record::Recorder;
use vsock_core::Stats;
use vsock_device::{DeviceStats, VsockDevice};
use vsock_host::{DriverConfig, DriverThread, HostStats};
use vsock_mio::MioLoop;
use vsock_smol::VsockSmol;
use vsock_tokio::VsockTokio;

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

/// The counters of a stopped runtime.
#[derive(Clone, Debug)]
pub struct Report {
    /// The engine's.
    pub engine: Stats,
    /// The device's.
    pub device: DeviceStats,
    /// The host side's.
    pub host: HostStats,
}

impl Report {
    fn of(device: &VsockDevice, host: &HostStats) -> Report {
        Report {
            engine: device.engine().stats().clone(),
            device: device.stats().clone(),
            host: host.clone(),
        }
    }
}

/// A runtime serving the device on its own thread. [`DriverThread::stop`] resets the guest's
/// connections, closes every socket, unlinks the listener and returns the counters.
pub type Running = DriverThread<Report>;

/// Binds the listener and starts serving on `kind`, on a new thread. `kick` becomes readable
/// when the backend has news for the runtime; `recorder`, if any, is attached to the engine
/// before the first event.
///
/// # Errors
///
/// The listener cannot be bound (busy, unwritable, a bad path), the configuration is refused,
/// the recorder cannot be attached, or the thread cannot start.
pub fn start(
    kind: RuntimeKind,
    config: DriverConfig,
    transport: VhostTransport,
    kick: OwnedFd,
    recorder: Option<Box<dyn Recorder>>,
) -> io::Result<Running> {
    // Attached before the loop starts, so the trace holds the whole session (and the engine
    // holds no connection yet, so it is never refused).
    let attach = move |device: &mut VsockDevice| -> io::Result<()> {
        if recorder.is_some() {
            device
                .engine_mut()
                .set_recorder(recorder)
                .map_err(io::Error::other)?;
        }
        Ok(())
    };
    // The driver is built (and its listener bound) here, so its errors reach the caller; the
    // counters are taken, and the driver dropped, as its thread stops.
    Ok(match kind {
        RuntimeKind::Mio => {
            let mut lp = MioLoop::new(config)?;
            attach(lp.driver_mut().device_mut())?;
            lp.spawn(transport, kick)?
                .map(|v| Report::of(v.device(), v.host().stats()))
        }
        RuntimeKind::Tokio => {
            let mut v = VsockTokio::new(config)?;
            attach(v.device_mut())?;
            v.spawn(transport, kick)?
                .map(|v| Report::of(v.device(), v.host().stats()))
        }
        RuntimeKind::Smol => {
            let mut v = VsockSmol::new(config)?;
            attach(v.device_mut())?;
            v.spawn(transport, kick)?
                .map(|v| Report::of(v.device(), v.host().stats()))
        }
    })
}
