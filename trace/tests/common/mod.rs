//! What the trace tests share.

use std::sync::{Arc, Mutex};

use vsock_core::{Action, Engine, HostEvent, Instant, Io, RxGrant};

/// A trace written into memory the test keeps a handle on.
#[derive(Clone, Default)]
pub struct Shared(pub Arc<Mutex<Vec<u8>>>);

impl Shared {
    /// The bytes written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Drains actions (answering a connect) and rx grants (committing packets).
#[allow(dead_code)] // not every test binary settles an engine
pub fn settle(e: &mut Engine, now: Instant) {
    loop {
        let mut busy = false;
        while let Some(a) = e.poll_action() {
            busy = true;
            if let Action::Connect { conn, .. } = a {
                e.handle_host_event(now, conn, HostEvent::Connected)
                    .unwrap();
                e.handle_host_event(now, conn, HostEvent::Writable).unwrap();
            }
        }
        while let Some(g) = e.poll_rx(now, 4096) {
            busy = true;
            match g {
                RxGrant::Packet(p) => {
                    let _ = p.send();
                }
                RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                RxGrant::Read(r) => {
                    let _ = r.complete(Io::WouldBlock, &mut &[][..]);
                }
            }
        }
        if !busy {
            return;
        }
    }
}
