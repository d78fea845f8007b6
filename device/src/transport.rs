//! What a runtime's ready-made loop needs from its embedder: the queues and guest memory, a
//! way to interrupt the guest, and the device lifecycle requests of the guest's driver.

use std::os::fd::OwnedFd;

use tracing::{debug, warn};
use vm_memory::GuestMemory;
use vsock_core::Instant;

use crate::{DeviceError, HostSockets, Queues, Served, VsockDevice};

/// A device lifecycle change the guest's driver asked the VMM for, carried out by the loop
/// that owns the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The driver reset the device: every connection is dropped and the sockets closed.
    Reset,
    /// The queues stopped while the driver may keep its state (a paused VM): every connection
    /// is dropped and its socket closed, and the guest is sent an RST for each once the
    /// device is activated again.
    Stop,
    /// The driver finished feature negotiation with these features and set the queues up:
    /// activate the device on the queues [`Transport::with_queues`] hands out from now on.
    Activate {
        /// The features the driver acknowledged.
        features: u64,
    },
}

/// A queue's kick descriptor, handed by the [`Transport`] to the loop to watch itself, so a
/// guest's kick wakes the loop directly rather than through a thread of the VMM's and the
/// loop's own kick descriptor.
///
/// The loop watches it edge-triggered for readability and never reads it: each kick (an
/// eventfd write) is a new edge, and what the kick means is read from the rings anyway.
#[derive(Debug)]
pub struct KickFd {
    /// The queue (0 rx, 1 tx, 2 event).
    pub queue: u16,
    /// The descriptor to watch from now on, in place of (and closing) any the loop watched
    /// for this queue before; `None` stops watching it.
    pub fd: Option<OwnedFd>,
}

/// The device's side of the virtio transport, as the VMM (or the vhost-user daemon) provides
/// it to a runtime that serves on its own.
pub trait Transport {
    /// The guest memory type.
    type Memory: GuestMemory;

    /// Runs `f` over the guest memory and the three queues, or returns `None` when they cannot
    /// be served now (not activated, memory being replaced).
    fn with_queues<R>(&mut self, f: impl FnOnce(&Self::Memory, Queues<'_>) -> R) -> Option<R>;

    /// Interrupts the guest for the queues `served` names.
    fn notify(&mut self, served: &Served);

    /// The next lifecycle request, if any. The loop asks each time it wakes, so the VMM
    /// signals the kick descriptor after posting one. The default has none.
    fn take_request(&mut self) -> Option<DeviceRequest> {
        None
    }

    /// The next kick descriptor for the loop to watch itself, if any. A loop that can watch
    /// descriptors takes them before it serves and reports each with
    /// [`kick_fd_watched`](Self::kick_fd_watched); a loop that cannot never asks, and the
    /// transport goes on waking it through its kick descriptor. The default has none.
    fn take_kick_fd(&mut self) -> Option<KickFd> {
        None
    }

    /// The loop watches (`watched`) or could not watch the descriptor of `queue` that
    /// [`take_kick_fd`](Self::take_kick_fd) handed out. Until this says `true`, the transport
    /// must go on waking the loop for that queue's kicks itself.
    fn kick_fd_watched(&mut self, queue: u16, watched: bool) {
        let _ = (queue, watched);
    }
}

impl VsockDevice {
    /// One wake-up's worth of device work through a [`Transport`]: the lifecycle requests it
    /// holds (reset, stop, activation), then the queues it hands out, with the guest
    /// interrupted as [`serve`](Self::serve) says. Without queues (no guest attached, a VM
    /// booting, between two VMs) the host-side work is done all the same
    /// ([`serve_host`](Self::serve_host)), so no deadline is left behind. Returns whether work
    /// is left: serve again without waiting. A serve error is logged, not returned: the loop
    /// goes on.
    pub fn serve_transport<T: Transport, H: HostSockets>(
        &mut self,
        now: Instant,
        transport: &mut T,
        host: &mut H,
    ) -> bool {
        while let Some(request) = transport.take_request() {
            self.apply(now, request, transport, host);
        }
        match transport.with_queues(|mem, queues| self.serve(now, mem, queues, host)) {
            Some(Ok(served)) => {
                transport.notify(&served);
                served.more
            }
            // Between a reset and the next activation there is nothing to serve (and `serve`
            // has done the host-side work).
            Some(Err(DeviceError::NotActivated)) => false,
            Some(Err(e)) => {
                warn!(error = %e, "cannot serve the queues");
                self.serve_host(now, host);
                false
            }
            None => {
                self.serve_host(now, host);
                false
            }
        }
    }

    fn apply<T: Transport, H: HostSockets>(
        &mut self,
        now: Instant,
        request: DeviceRequest,
        transport: &mut T,
        host: &mut H,
    ) {
        match request {
            DeviceRequest::Reset => {
                debug!("device reset requested");
                self.reset(now);
                // Close the dropped connections' sockets now, not at the next activation:
                // the queues may be gone with the frontend that owned them.
                self.perform_actions(now, host);
            }
            DeviceRequest::Stop => {
                debug!("device stop requested");
                self.stop(now);
                self.perform_actions(now, host);
            }
            DeviceRequest::Activate { features } => {
                if let Err(e) = self.ack_features(features) {
                    warn!(error = %e, "refused the driver's features");
                    return;
                }
                transport.with_queues(|_, queues| self.activate(queues));
            }
        }
    }
}
