//! The process out of file descriptors (`EMFILE`), on every runtime: a guest connect is reset at
//! once, a host client waits in the listener's backlog and is served once descriptors are
//! back, the loop neither stops nor spins meanwhile, and nothing leaks.
//!
//! `RLIMIT_NOFILE` and the descriptor table belong to the whole process, so this binary holds a
//! single test that runs every step in order; no other test shares the lowered limit.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vsock_core::testing::GuestKey;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::Config;
use vsock_tests::{open_fds, Rig, Runtime};

const LONG: Duration = Duration::from_secs(30);

/// The guest's listening port for host clients.
const GUEST_PORT: u32 = 5000;
/// The host service's port.
const HOST_PORT: u32 = 80;

/// The process out of descriptors: the soft `RLIMIT_NOFILE` lowered to just above the highest
/// open descriptor, and every free number below it taken by a duplicate of `/dev/null`, so
/// the next `socket()` or `accept()` anywhere in the process fails with `EMFILE`. Dropping it
/// closes the duplicates and restores the limit.
struct Exhausted {
    fillers: Vec<OwnedFd>,
    saved: libc::rlimit,
}

impl Exhausted {
    fn new() -> Exhausted {
        let saved = nofile();
        let highest = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::rlim_t>().ok())
            .max()
            .unwrap();
        let limit = (highest + 1 + 16).min(saved.rlim_cur);
        set_nofile(libc::rlimit {
            rlim_cur: limit,
            rlim_max: saved.rlim_max,
        });
        let mut ex = Exhausted {
            fillers: vec![File::open("/dev/null").unwrap().into()],
            saved,
        };
        ex.fill();
        ex
    }

    /// Takes every free descriptor.
    fn fill(&mut self) {
        loop {
            match self.fillers[0].try_clone() {
                Ok(fd) => self.fillers.push(fd),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return,
                Err(e) => panic!("dup: {e}"),
            }
        }
    }

    /// Frees exactly one descriptor, for the test's own next socket.
    fn free_one(&mut self) {
        assert!(self.fillers.len() > 1);
        self.fillers.pop();
    }
}

impl Drop for Exhausted {
    fn drop(&mut self) {
        self.fillers.clear();
        set_nofile(self.saved);
    }
}

fn nofile() -> libc::rlimit {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for the call to fill in.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
    r
}

fn set_nofile(r: libc::rlimit) {
    // SAFETY: `r` is a valid rlimit; lowering the soft limit or restoring a saved one is always
    // permitted.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) }, 0);
}

/// The CPU time (user and system) the whole process has used.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid rusage for the call to fill in.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Reads from a non-blocking socket, driving the guest, until `done` holds for what was read.
fn read_until(
    rig: &mut Rig,
    s: &mut UnixStream,
    what: &str,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        match s.read(&mut buf) {
            Ok(0) => panic!("end of file before {what}; read {got:?}"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(start.elapsed() < LONG, "gave up waiting for: {what}");
                rig.step();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    got
}

/// Bytes both ways between guest connection `key` and its host socket `app`.
fn round_trip(rig: &mut Rig, key: GuestKey, app: &mut UnixStream, msg: &[u8]) {
    rig.guest.stack.write(key, msg);
    let got = read_until(rig, app, "guest bytes on the host socket", |b| {
        b.len() >= msg.len()
    });
    assert_eq!(got, msg);
    let had = rig.guest.stack.conn(key).read.len();
    app.write_all(msg).unwrap();
    rig.until("host bytes in the guest", LONG, |g| {
        g.stack.conn(key).read.len() >= had + msg.len()
    });
    assert_eq!(&rig.guest.stack.conn(key).read[had..], msg);
}

/// Accepts from a non-blocking listener, driving the guest.
fn accept(rig: &mut Rig, listener: &UnixListener) -> UnixStream {
    let start = std::time::Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true).unwrap();
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(
                    start.elapsed() < LONG,
                    "gave up waiting for the host service"
                );
                rig.step();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// The guest's connection from a host client, once established.
fn host_client_conn(rig: &Rig, except: &[GuestKey]) -> Option<GuestKey> {
    rig.guest
        .stack
        .conns
        .iter()
        .find(|(k, c)| k.0 == GUEST_PORT && c.established && !except.contains(k))
        .map(|(k, _)| *k)
}

/// A host client's whole life: `CONNECT`, `OK`, bytes both ways, close.
fn serve_host_client(rig: &mut Rig, mut client: UnixStream, before: &[GuestKey]) -> GuestKey {
    let mut key = None;
    let start = std::time::Instant::now();
    while key.is_none() {
        assert!(
            start.elapsed() < LONG,
            "gave up waiting for: the host client reaches the guest"
        );
        rig.step();
        key = host_client_conn(rig, before);
        std::thread::sleep(Duration::from_micros(200));
    }
    let key = key.unwrap();
    let ok = read_until(rig, &mut client, "OK", |b| b.ends_with(b"\n"));
    assert_eq!(ok, format!("OK {}\n", key.1).as_bytes());
    rig.guest.stack.write(key, b"pong");
    let got = read_until(rig, &mut client, "guest bytes", |b| b.len() >= 4);
    assert_eq!(got, b"pong");
    client.write_all(b"ping").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    rig.until("client bytes and end of file in the guest", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(rig.guest.stack.conn(key).read, b"ping");
    rig.guest.stack.close(key);
    rig.until("host client closed", LONG, |g| g.stack.conn(key).closed);
    key
}

fn out_of_descriptors(rt: Runtime) {
    let mut config = Config::new(vsock_tests::GUEST_CID);
    // A reset the guest sees within the test's patience comes from the failed connect itself,
    // never from the engine giving up on a connect that hangs.
    config.connect_timeout = Duration::from_secs(600);
    let mut rig = Rig::start(rt, config);
    rig.guest.stack.listen(GUEST_PORT);
    let service = UnixListener::bind(rig.port_path(HOST_PORT)).unwrap();
    service.set_nonblocking(true).unwrap();
    // A connection made beforehand, to show the loop keeps serving while out of descriptors.
    let live = rig.guest.stack.connect(HOST_PORT);
    rig.until("live connection", LONG, |g| g.stack.conn(live).established);
    let mut live_app = accept(&mut rig, &service);
    round_trip(&mut rig, live, &mut live_app, b"before");
    let baseline = open_fds();

    let mut ex = Exhausted::new();

    // 1. A guest connect: the host side's socket() fails with EMFILE; the guest is reset at
    //    once, not left to a deadline (the connect timeout is ten minutes).
    let refused = rig.guest.stack.connect(HOST_PORT);
    let start = std::time::Instant::now();
    rig.until("the refused connect is reset", LONG, |g| {
        g.stack.conn(refused).rst_received
    });
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "reset took {took:?}");
    assert!(!rig.guest.stack.conn(refused).established);
    // The existing connection still carries bytes both ways.
    round_trip(&mut rig, live, &mut live_app, b"out of descriptors");

    // 2. A host client connects (on the one descriptor freed for it); the driver's accept
    //    fails with EMFILE and the client stays in the listener's backlog.
    ex.free_one();
    let mut client = UnixStream::connect(rig.listener()).unwrap();
    ex.fill();
    client
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    client.set_nonblocking(true).unwrap();
    // The loop does not spin on the pending client: over a second of nothing but waiting, the
    // whole process uses a small part of that in CPU time (about a millisecond; a loop that
    // retried accept without a pause would burn nearly all of it).
    let cpu = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - cpu;
    assert!(
        used < Duration::from_millis(200),
        "{used:?} of CPU time in a second of waiting: the loop spins"
    );
    // The guest hears nothing of the client, and the loop keeps serving.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        rig.step();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        host_client_conn(&rig, &[]),
        None,
        "accepted while out of descriptors"
    );
    round_trip(&mut rig, live, &mut live_app, b"still out of descriptors");

    drop(ex);

    // Descriptors are back. The pending client is served although no new client arrives: the
    // listener is edge-triggered and raises no new event for a client already in its backlog,
    // so the driver retries a failed accept on a timer of its own (before it did, the client
    // waited until the next client connected, however long that took).
    let first = serve_host_client(&mut rig, client, &[]);
    // A new client, a new guest connect: both work end to end.
    let client = UnixStream::connect(rig.listener()).unwrap();
    client.set_nonblocking(true).unwrap();
    (&client)
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    serve_host_client(&mut rig, client, &[first]);
    let again = rig.guest.stack.connect(HOST_PORT);
    rig.until("connected again", LONG, |g| g.stack.conn(again).established);
    let mut app = accept(&mut rig, &service);
    round_trip(&mut rig, again, &mut app, b"descriptors are back");
    rig.guest.stack.close(again);
    let mut buf = [0u8; 64];
    loop {
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => panic!("unexpected bytes {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
            Err(e) => panic!("{e}"),
        }
    }
    drop(app);
    rig.until("closed again", LONG, |g| g.stack.conn(again).closed);

    // Nothing leaked: the sockets of the refused connect, the clients and the second
    // connection are all closed (by the runtime's thread, so wait for it).
    let start = std::time::Instant::now();
    loop {
        let now = open_fds();
        if now <= baseline {
            break;
        }
        assert!(
            start.elapsed() < LONG,
            "descriptors: {now} open, {baseline} before the exhaustion"
        );
        rig.step();
        std::thread::sleep(Duration::from_millis(1));
    }

    rig.guest.stack.close(live);
    drop(live_app);
    rig.until("live closed", LONG, |g| g.stack.conn(live).closed);
    let vsock = rig.stop();
    let engine = vsock.device().engine();
    assert_eq!(engine.connections(), 0);
    assert_eq!(engine.stats().connect_failed, 1, "{:?}", engine.stats());
    assert_eq!(engine.stats().host_accepts, 2, "{:?}", engine.stats());
    assert_eq!(vsock.host().stats().connect_failures, 1);
    assert_eq!(vsock.host().stats().connects, 2);
    assert!(vsock.host().is_empty());
}

#[test]
fn out_of_descriptors_on_every_runtime() {
    for rt in [Runtime::Mio, Runtime::Tokio, Runtime::Smol] {
        out_of_descriptors(rt);
    }
}
