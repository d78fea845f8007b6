//! The mio driver in a real mio loop: a Linux-like guest over real virtqueue memory, real Unix
//! sockets on the host side, host services on their own threads.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use mio::{Events, Poll, Token};
use virtio_queue::Queue;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::Config;
use vsock_device::testing::{Guest, Layout};
use vsock_device::Queues;
use vsock_mio::{MioConfig, Tokens, VsockMio};

const GUEST_CID: u64 = 3;

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vsock-mio-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Vmm {
    poll: Poll,
    events: Events,
    vsock: VsockMio,
    guest: Guest,
    queues: [Queue; 3],
}

impl Vmm {
    fn new(dir: &std::path::Path) -> Vmm {
        let poll = Poll::new().unwrap();
        let config = MioConfig {
            engine: Config::new(GUEST_CID),
            uds_path: dir.join("vsock"),
            tokens: Tokens {
                listener: Token(0),
                first_conn: 16,
            },
        };
        let mut vsock = VsockMio::new(config, poll.registry()).unwrap();
        let mut guest = Guest::new(GUEST_CID);
        guest.tx_layouts = vec![Layout::Single, Layout::HeaderThenData];
        let device = vsock.device_mut();
        device.ack_features(device.features()).unwrap();
        let mut queues = guest.driver.device_queues(false);
        {
            let [rx, tx, event] = &mut queues;
            device.activate(Queues { rx, tx, event });
        }
        Vmm {
            poll,
            events: Events::with_capacity(256),
            vsock,
            guest,
            queues,
        }
    }

    /// One turn of the caller's loop.
    fn turn(&mut self) {
        let timeout = self
            .vsock
            .timeout()
            .unwrap_or(Duration::from_millis(5))
            .min(Duration::from_millis(5));
        self.poll.poll(&mut self.events, Some(timeout)).unwrap();
        for event in self.events.iter() {
            assert!(
                self.vsock.handle_event(event),
                "only vsock sources are registered"
            );
        }
        let now = self.vsock.now();
        self.guest.step(now);
        let [rx, tx, event] = &mut self.queues;
        let _ = self
            .vsock
            .serve(&self.guest.driver.mem, Queues { rx, tx, event })
            .unwrap();
        self.guest.step(now);
    }

    fn turn_until(&mut self, what: &str, mut done: impl FnMut(&mut Vmm) -> bool) {
        for _ in 0..20_000 {
            if done(self) {
                return;
            }
            self.turn();
        }
        panic!("gave up waiting for: {what}");
    }
}

#[test]
fn guest_talks_to_a_host_echo_service() {
    let dir = temp_dir();
    let service = UnixListener::bind(dir.join("vsock_1234")).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
            total += n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        total
    });
    let mut vmm = Vmm::new(&dir);
    let key = vmm.guest.stack.connect(1234);
    vmm.turn_until("connected", |v| v.guest.stack.conn(key).established);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    vmm.guest.stack.write(key, &data);
    vmm.guest.stack.shutdown(key, SHUTDOWN_SEND);
    vmm.turn_until("echo finished", |v| {
        v.guest.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(echo.join().unwrap(), data.len());
    let read = &vmm.guest.stack.conn(key).read;
    assert!(
        *read == data,
        "echo differs ({} of {} bytes)",
        read.len(),
        data.len()
    );
    // Both directions are done: the connection closes.
    vmm.turn_until("closed", |v| v.vsock.device().engine().connections() == 0);
    assert_eq!(vmm.guest.stack.credit_violations, 0);
}

#[test]
fn host_client_connects_to_a_guest_listener() {
    let dir = temp_dir();
    let mut vmm = Vmm::new(&dir);
    vmm.guest.stack.listen(5000);
    let path = dir.join("vsock");
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(b"CONNECT 5000\nping").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    vmm.turn_until("guest accepted", |v| {
        v.guest
            .stack
            .conns
            .values()
            .any(|c| c.read == b"ping" && c.peer_shut & SHUTDOWN_SEND != 0)
    });
    let key = *vmm.guest.stack.conns.keys().next().unwrap();
    vmm.guest.stack.write(key, b"pong");
    vmm.guest.stack.close(key);
    vmm.turn_until("closed", |v| v.vsock.device().engine().connections() == 0);
    let got = client.join().unwrap();
    let text = String::from_utf8(got).unwrap();
    assert!(
        text.starts_with("OK ") && text.ends_with("\npong"),
        "client read {text:?}"
    );
}

#[test]
fn guest_connect_to_a_missing_socket_is_reset_at_once() {
    let dir = temp_dir();
    let mut vmm = Vmm::new(&dir);
    let key = vmm.guest.stack.connect(4444);
    let start = vmm.vsock.now();
    vmm.turn_until("reset", |v| v.guest.stack.conn(key).reset);
    let took = vmm.vsock.now().saturating_duration_since(start);
    assert!(took < Duration::from_millis(500), "took {took:?}");
    assert_eq!(vmm.vsock.host().stats().connect_failures, 1);
}

#[test]
fn dropping_the_driver_unlinks_the_listener() {
    let dir = temp_dir();
    let vmm = Vmm::new(&dir);
    assert!(dir.join("vsock").exists());
    drop(vmm);
    assert!(!dir.join("vsock").exists());
}
