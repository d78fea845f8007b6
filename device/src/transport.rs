//! What a runtime's ready-made loop needs from its embedder: the queues and guest memory, a
//! way to interrupt the guest, and the device lifecycle requests of the guest's driver.

use vm_memory::GuestMemory;

use crate::{Queues, Served};

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
}
