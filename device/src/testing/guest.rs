//! A Linux-like guest on top of the [`Driver`](super::Driver): `vsock-core`'s model of the
//! Linux vsock stack, moving its packets over the real virtqueues.

use vsock_core::testing::LinuxGuest;
use vsock_core::Instant;

use super::{parse_rx, Driver, Layout, RX_BUF_SIZE};

/// A guest: the Linux stack model, the virtqueue driver, and how it lays out its buffers.
pub struct Guest {
    /// The vsock stack (sockets, credit, shutdowns).
    pub stack: LinuxGuest,
    /// The virtqueue driver and guest memory.
    pub driver: Driver,
    /// Layout of posted rx buffers.
    pub rx_layout: Layout,
    /// Layouts used for tx packets, in turn.
    pub tx_layouts: Vec<Layout>,
    /// Rx buffers kept posted (Linux keeps its ring full).
    pub rx_target: usize,
    /// The driver stopped posting rx buffers.
    pub rx_paused: bool,
    next_tx_layout: usize,
    rx_posted: usize,
}

impl Guest {
    /// A guest with CID `cid`, 4 KiB rx buffers in one descriptor each, and tx packets in one
    /// descriptor each.
    pub fn new(cid: u64) -> Self {
        Guest {
            stack: LinuxGuest::new(cid),
            driver: Driver::new(),
            rx_layout: Layout::Single,
            tx_layouts: vec![Layout::Single],
            rx_target: 128,
            rx_paused: false,
            next_tx_layout: 0,
            rx_posted: 0,
        }
    }

    /// One round of the driver: take back used buffers (delivering rx packets to the stack),
    /// refill the rx ring, and put the stack's packets on the tx queue while it has room.
    /// Returns whether anything happened.
    pub fn step(&mut self, now: Instant) -> bool {
        let mut progress = false;
        for used in self.driver.take_used(0) {
            self.rx_posted -= 1;
            progress = true;
            if used.len > 0 {
                let (header, payload) = parse_rx(&used);
                self.stack.receive(&header, &payload);
            }
        }
        progress |= !self.driver.take_used(1).is_empty();
        if !self.rx_paused {
            while self.rx_posted < self.rx_target {
                if self
                    .driver
                    .post_rx(RX_BUF_SIZE as usize, &self.rx_layout)
                    .is_none()
                {
                    break;
                }
                self.rx_posted += 1;
                progress = true;
            }
        }
        progress |= self.stack.handle_timeout(now);
        progress |= self.stack.pump(now);
        while self.stack.has_tx() {
            let layout = &self.tx_layouts[self.next_tx_layout % self.tx_layouts.len()];
            let Some((header, payload)) = self.stack.poll_tx() else {
                break;
            };
            if self.driver.send(&header, &payload, layout).is_none() {
                // The tx queue is full: try again next round.
                self.stack.send_raw_front(header, payload);
                break;
            }
            self.next_tx_layout += 1;
            progress = true;
        }
        progress
    }
}
