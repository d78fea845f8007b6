//! The Linux-like guest model driving the device over real virtqueues, with real Unix sockets
//! on the host side.

mod common;

use std::io::{Read, Write};

use common::{pattern, TestHost, GUEST_CID};
use virtio_queue::Queue;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::{Config, ConnId, Instant};
use vsock_device::testing::{Guest, Layout};
use vsock_device::{Queues, VsockDevice};

struct World {
    device: VsockDevice,
    queues: [Queue; 3],
    guest: Guest,
    host: TestHost,
    now: Instant,
}

impl World {
    fn new(tx_layouts: Vec<Layout>, rx_layout: Layout) -> World {
        let now = Instant::from_secs(1);
        let mut device = VsockDevice::new(Config::new(GUEST_CID), now).unwrap();
        device.ack_features(device.features()).unwrap();
        let mut guest = Guest::new(GUEST_CID);
        guest.tx_layouts = tx_layouts;
        guest.rx_layout = rx_layout;
        guest.rx_target = 64;
        let mut queues = guest.driver.device_queues(false);
        {
            let [rx, tx, event] = &mut queues;
            device.activate(Queues { rx, tx, event });
        }
        World {
            device,
            queues,
            guest,
            host: TestHost::default(),
            now,
        }
    }

    /// Runs guest, device and host until nothing moves (bounded).
    fn run(&mut self) {
        for _ in 0..100_000 {
            let guest_moved = self.guest.step(self.now);
            self.host.poke(self.device.engine_mut(), self.now);
            let [rx, tx, event] = &mut self.queues;
            let served = self
                .device
                .serve(
                    self.now,
                    &self.guest.driver.mem,
                    Queues { rx, tx, event },
                    &mut self.host,
                )
                .unwrap();
            let guest_moved_after = self.guest.step(self.now);
            if !guest_moved
                && !guest_moved_after
                && !served.more
                && !served.notify_rx
                && !served.notify_tx
            {
                return;
            }
        }
        panic!("no quiescence");
    }

    fn host_conn(&self, i: usize) -> ConnId {
        ConnId::from_raw(*self.host.apps.keys().nth(i).unwrap())
    }
}

/// Reads everything the host application has, until `want` bytes (blocking reads with a
/// short timeout would hide bugs; the world is quiet, so what is there is there).
fn drain_app(world: &mut World, conn: ConnId, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    for _ in 0..10_000 {
        if got.len() >= want {
            break;
        }
        let app = world.host.app(conn);
        app.set_nonblocking(true).unwrap();
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => world.run(),
        }
    }
    got
}

#[test]
fn linux_guest_moves_megabytes_both_ways_over_varied_layouts() {
    let mut w = World::new(
        vec![
            Layout::Single,
            Layout::HeaderThenData,
            Layout::Cuts(vec![7, 44, 1000]),
            Layout::Indirect(Box::new(Layout::Cuts(vec![30, 44, 45]))),
        ],
        Layout::HeaderThenData,
    );
    w.host.listening.insert(1234);
    let key = w.guest.stack.connect(1234);
    w.run();
    assert!(w.guest.stack.conn(key).established);
    let conn = w.host_conn(0);

    let up = pattern(1, 4 << 20);
    w.guest.stack.write(key, &up);
    w.run();
    let got = drain_app(&mut w, conn, up.len());
    assert!(
        got == up,
        "guest to host stream differs ({} of {} bytes)",
        got.len(),
        up.len()
    );

    let down = pattern(2, 4 << 20);
    let mut app = w.host.app(conn).try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        app.set_nonblocking(false).unwrap();
        app.write_all(&down).unwrap();
        app.shutdown(std::net::Shutdown::Write).unwrap();
        down
    });
    let mut rounds = 0;
    loop {
        w.run();
        if w.guest.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0 {
            break;
        }
        rounds += 1;
        assert!(rounds < 1_000_000, "host data never finished");
        std::thread::yield_now();
    }
    let down = writer.join().unwrap();
    let read = &w.guest.stack.conn(key).read;
    assert!(
        *read == down,
        "host to guest stream differs ({} of {} bytes)",
        read.len(),
        down.len()
    );
    assert_eq!(w.guest.stack.credit_violations, 0);
    assert_eq!(
        w.device.stats().tx_write_only + w.device.stats().tx_too_short,
        0
    );
}

#[test]
fn host_client_connects_to_a_linux_guest_listener() {
    let mut w = World::new(vec![Layout::Single], Layout::Single);
    w.guest.stack.listen(5000);
    let engine = w.device.engine_mut();
    let conn = w.host.accept(engine, w.now);
    w.host
        .app(conn)
        .write_all(b"CONNECT 5000\nhello guest")
        .unwrap();
    w.run();
    let key = *w.guest.stack.conns.keys().next().expect("guest accepted");
    assert_eq!(w.guest.stack.conn(key).read, b"hello guest");
    let ok = drain_app(&mut w, conn, 3);
    assert!(
        ok.starts_with(b"OK "),
        "got {:?}",
        String::from_utf8_lossy(&ok)
    );
    w.guest.stack.write(key, b"hello host");
    w.guest.stack.close(key);
    w.run();
    let rest = drain_app(&mut w, conn, ok.len() + 10);
    assert!(rest.ends_with(b"hello host"));
}

#[test]
fn a_guest_that_does_not_read_gets_credit_requests_not_overruns() {
    let mut w = World::new(vec![Layout::Single], Layout::Single);
    w.guest.stack.auto_read = false;
    w.host.listening.insert(7);
    let key = w.guest.stack.connect(7);
    w.run();
    let conn = w.host_conn(0);
    let data = pattern(3, 600 * 1024);
    let mut app = w.host.app(conn).try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        app.set_nonblocking(false).unwrap();
        app.write_all(&data).unwrap();
        data
    });
    // The guest reads only when its buffer is full; the device must never overrun it.
    let mut rounds = 0;
    while w.guest.stack.conn(key).read.len() < 600 * 1024 {
        w.run();
        let unread = w.guest.stack.conn(key).unread.len();
        if unread > 0 {
            w.guest.stack.read(key, unread);
        }
        rounds += 1;
        assert!(rounds < 100_000);
        std::thread::yield_now();
    }
    let data = writer.join().unwrap();
    assert!(w.guest.stack.conn(key).read == data);
    assert_eq!(w.guest.stack.credit_violations, 0);
}
