//! A device with no guest attached (the daemon started before its VM, a VM still booting, the
//! gap between two VMs), on every runtime: host clients are still served by the host side (a
//! silent client is closed at its `CONNECT` line timeout; a client whose `CONNECT` no guest
//! can answer is closed at the connect timeout), the loop sleeps between deadlines instead of
//! spinning, and a guest attached afterwards is served as usual.
//!
//! CPU time is measured for the whole process, so this binary holds a single test that runs
//! the runtimes one after another.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vsock_core::Config;
use vsock_tests::{Rig, Runtime};

const LINE_TIMEOUT: Duration = Duration::from_millis(300);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const GUEST_PORT: u32 = 5000;

/// The CPU time (user and system) the whole process has used, from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Waits until the daemon closes `s` (end of file or a reset), reading and discarding what it
/// sends; returns how long that took.
fn closed_within(s: &mut UnixStream, limit: Duration, what: &str) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => panic!("{what}: unexpected bytes {:?}", &buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                assert!(
                    start.elapsed() < limit,
                    "{what}: still open after {limit:?}"
                );
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn no_guest(rt: Runtime) {
    let mut config = Config::new(vsock_tests::GUEST_CID);
    config.connect_line_timeout = LINE_TIMEOUT;
    config.connect_timeout = CONNECT_TIMEOUT;
    let mut rig = Rig::start_detached(rt, config);
    let wall = Instant::now();
    let cpu = cpu_time();

    // A client that sends nothing, one whose CONNECT no guest answers, and a few that come
    // and go at once.
    let mut silent = UnixStream::connect(rig.listener()).unwrap();
    let mut asking = UnixStream::connect(rig.listener()).unwrap();
    asking
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    for _ in 0..8 {
        let mut c = UnixStream::connect(rig.listener()).unwrap();
        let _ = c.write_all(b"CONN");
    }
    let limit = Duration::from_secs(5);
    let t = closed_within(&mut silent, limit, "silent client");
    assert!(
        t >= LINE_TIMEOUT - Duration::from_millis(50),
        "{rt:?}: silent client closed after {t:?}, before its line timeout"
    );
    let t = closed_within(&mut asking, limit, "unanswered CONNECT");
    assert!(
        t + LINE_TIMEOUT >= CONNECT_TIMEOUT - Duration::from_millis(50),
        "{rt:?}: unanswered client closed after {t:?}, before its connect timeout"
    );
    // Idle with nothing pending for a while too: the loop must sleep.
    std::thread::sleep(Duration::from_millis(700));
    let used = cpu_time() - cpu;
    let elapsed = wall.elapsed();
    eprintln!("{rt:?}: {used:?} of CPU in {elapsed:?} with no guest attached");
    assert!(
        used < elapsed / 5,
        "{rt:?}: {used:?} of CPU in {elapsed:?} with no guest attached: the loop spins"
    );

    // The guest arrives: a host client reaches its listener as usual.
    rig.attach();
    rig.guest.stack.listen(GUEST_PORT);
    let mut client = UnixStream::connect(rig.listener()).unwrap();
    client
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .unwrap();
    client.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\n") {
        match client.read(&mut buf) {
            Ok(0) => panic!("{rt:?}: closed before OK"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(start.elapsed() < limit, "{rt:?}: no OK after attaching");
                rig.step();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("{rt:?}: {e}"),
        }
    }
    assert!(got.starts_with(b"OK "), "{rt:?}: {got:?}");
    let key = *rig
        .guest
        .stack
        .conns
        .keys()
        .find(|k| k.0 == GUEST_PORT)
        .expect("the guest accepted the client");
    client.write_all(b"hello").unwrap();
    rig.until("guest reads", limit, |g| g.stack.conn(key).read == b"hello");
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().connections(), 0);
}

#[test]
fn no_guest_attached_on_every_runtime() {
    for rt in [Runtime::Mio, Runtime::Tokio, Runtime::Smol] {
        no_guest(rt);
    }
}
