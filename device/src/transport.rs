//! What a runtime's ready-made loop needs from its embedder: the queues and guest memory, and
//! a way to interrupt the guest.

use vm_memory::GuestMemory;

use crate::{Queues, Served};

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
}
