//! No write to a host socket raises `SIGPIPE`. The Rust runtime ignores the signal in its own
//! programs, but a VMM that embeds the device keeps whatever disposition its process has, and
//! the default one kills the process when a peer has gone. This binary restores the default
//! disposition (process-wide, so it holds a single test) and makes every runtime write to
//! peers that have closed: the `OK` line to host clients gone before the guest answered.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vsock_core::Config;
use vsock_tests::{Rig, Runtime};

const GUEST_PORT: u32 = 5000;
const CLIENTS: usize = 20;

fn writes_to_closed_peers(rt: Runtime) {
    let mut rig = Rig::start(rt, Config::new(vsock_tests::GUEST_CID));
    rig.guest.stack.listen(GUEST_PORT);
    for _ in 0..CLIENTS {
        let mut c = UnixStream::connect(rig.listener()).unwrap();
        c.write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
            .unwrap();
        // Gone before the guest answers: the OK line goes to a closed peer.
        drop(c);
    }
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        rig.step();
        std::thread::sleep(Duration::from_micros(200));
    }
    let vsock = rig.stop();
    let stats = vsock.device().engine().stats();
    assert!(
        stats.established > 0,
        "{rt:?}: the guest answered some clients, so an OK line was written"
    );
    eprintln!(
        "{rt:?}: {} of {CLIENTS} clients answered, {} host errors, and the process lives",
        stats.established, stats.host_errors
    );
}

#[test]
fn no_write_raises_sigpipe_on_any_runtime() {
    // SAFETY: restoring the default disposition of SIGPIPE is always allowed; no handler of
    // ours is involved.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    for rt in [Runtime::Mio, Runtime::Tokio, Runtime::Smol] {
        writes_to_closed_peers(rt);
    }
}
