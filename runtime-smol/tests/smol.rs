//! The smol adapter on an executor thread of its own, a Linux-like guest driving it over real
//! virtqueue memory from the test thread, real Unix sockets on the host side.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::{Config, Instant};
use vsock_device::testing::{Guest, Layout};
use vsock_device::{Queues, Served, Transport};
use vsock_mio::{MioConfig, Tokens, VsockMio};
use vsock_smol::VsockSmol;

const GUEST_CID: u64 = 3;

fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vsock-smol-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct TestTransport {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
}

impl Transport for TestTransport {
    type Memory = GuestMemoryMmap;

    fn with_queues<R>(&mut self, f: impl FnOnce(&GuestMemoryMmap, Queues<'_>) -> R) -> Option<R> {
        let [rx, tx, event] = &mut self.queues;
        Some(f(&self.mem, Queues { rx, tx, event }))
    }

    fn notify(&mut self, _served: &Served) {}
}

struct Setup {
    guest: Guest,
    kick: UnixStream,
    stop: smol::channel::Sender<()>,
    thread: std::thread::JoinHandle<std::io::Result<VsockMio>>,
}

fn start(dir: &std::path::Path) -> Setup {
    let mut vsock = VsockSmol::new(MioConfig {
        engine: Config::new(GUEST_CID),
        uds_path: dir.join("vsock"),
        tokens: Tokens {
            listener: mio::Token(0),
            first_conn: 1,
        },
    })
    .unwrap();
    let mut guest = Guest::new(GUEST_CID);
    guest.tx_layouts = vec![Layout::Single, Layout::Cuts(vec![44, 100])];
    let mut queues = guest.driver.device_queues(false);
    let device = vsock.driver_mut().device_mut();
    device.ack_features(device.features()).unwrap();
    {
        let [rx, tx, event] = &mut queues;
        device.activate(Queues { rx, tx, event });
    }
    let transport = TestTransport {
        mem: guest.driver.mem.clone(),
        queues,
    };
    let (kick, theirs) = UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    kick.set_nonblocking(true).unwrap();
    let (stop, stopped) = smol::channel::bounded::<()>(1);
    let thread = std::thread::spawn(move || {
        smol::block_on(vsock.run(transport, OwnedFd::from(theirs), async move {
            let _ = stopped.recv().await;
        }))
    });
    Setup {
        guest,
        kick,
        stop,
        thread,
    }
}

impl Setup {
    fn until(&mut self, what: &str, mut done: impl FnMut(&Guest) -> bool) {
        let start = std::time::Instant::now();
        while !done(&self.guest) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "gave up waiting for: {what}"
            );
            let now = Instant::from_nanos(start.elapsed().as_nanos() as u64);
            if self.guest.step(now) {
                let _ = self.kick.write(b"k");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn stop(self) -> (Guest, VsockMio) {
        self.stop.try_send(()).unwrap();
        let vsock = self.thread.join().unwrap().unwrap();
        (self.guest, vsock)
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
    let mut t = start(&dir);
    let key = t.guest.stack.connect(1234);
    t.until("connected", |g| g.stack.conn(key).established);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    t.guest.stack.write(key, &data);
    t.guest.stack.shutdown(key, SHUTDOWN_SEND);
    t.until("echo finished", |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(echo.join().unwrap(), data.len());
    let read = &t.guest.stack.conn(key).read;
    assert!(
        *read == data,
        "echo differs ({} of {} bytes)",
        read.len(),
        data.len()
    );
    let (_, vsock) = t.stop();
    assert_eq!(vsock.device().engine().stats().host_errors, 0);
    drop(vsock);
    assert!(
        !dir.join("vsock").exists(),
        "listener unlinked once the driver is dropped"
    );
}

#[test]
fn shutdown_resets_the_guests_connections_and_closes_sockets() {
    let dir = temp_dir();
    let service = UnixListener::bind(dir.join("vsock_77")).unwrap();
    let mut t = start(&dir);
    let key = t.guest.stack.connect(77);
    t.until("connected", |g| g.stack.conn(key).established);
    let (mut app, _) = service.accept().unwrap();
    let (mut guest, vsock) = t.stop();
    guest.step(Instant::ZERO);
    assert!(
        guest.stack.conn(key).rst_received,
        "the guest saw the reset"
    );
    let mut buf = [0u8; 8];
    assert_eq!(
        app.read(&mut buf).unwrap(),
        0,
        "the host application sees the close"
    );
    assert_eq!(vsock.host().len(), 0);
}

#[test]
fn host_client_connects_to_a_guest_listener() {
    let dir = temp_dir();
    let mut t = start(&dir);
    t.guest.stack.listen(5000);
    let path = dir.join("vsock");
    let client = std::thread::spawn(move || {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(b"CONNECT 5000\nping").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    t.until("guest accepted", |g| {
        g.stack
            .conns
            .values()
            .any(|c| c.read == b"ping" && c.peer_shut & SHUTDOWN_SEND != 0)
    });
    let key = *t.guest.stack.conns.keys().next().unwrap();
    t.guest.stack.write(key, b"pong");
    t.guest.stack.close(key);
    t.until("closed", |g| g.stack.conn(key).closed);
    let text = String::from_utf8(client.join().unwrap()).unwrap();
    assert!(
        text.starts_with("OK ") && text.ends_with("\npong"),
        "client read {text:?}"
    );
    t.stop();
}
