//! One list of scenarios, run on every runtime: each scenario is a function of the runtime,
//! and the macro at the end makes a test per runtime (`mio::…`, `tokio::…`, `smol::…`).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use vsock_core::testing::pattern;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::Config;
use vsock_tests::{open_fds, Rig, Runtime};

const LONG: Duration = Duration::from_secs(30);

fn config() -> Config {
    Config::new(vsock_tests::GUEST_CID)
}

/// A host service at `path` that echoes each connection until end of file, then shuts its
/// write side; returns the bytes it echoed.
fn echo_service(listener: UnixListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
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
    })
}

fn guest_connects_and_echoes(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let echo = echo_service(UnixListener::bind(rig.port_path(1234)).unwrap());
    let key = rig.guest.stack.connect(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let data = pattern(1, 300_000);
    rig.guest.stack.write(key, &data);
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("echo done", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(echo.join().unwrap(), data.len());
    assert!(rig.guest.stack.conn(key).read == data, "echo differs");
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().connections(), 0);
}

/// A host client connects, sends `first`, and reads everything until end of file.
fn host_client(path: std::path::PathBuf, writes: Vec<Vec<u8>>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut c = UnixStream::connect(path).unwrap();
        for w in writes {
            c.write_all(&w).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        got
    })
}

fn host_connect_gets_ok_and_talks(rt: Runtime, writes: Vec<Vec<u8>>, expect_guest: &[u8]) {
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen(5000);
    let client = host_client(rig.listener(), writes);
    let want = expect_guest.to_vec();
    rig.until("guest got the client's bytes and end of file", LONG, |g| {
        g.stack
            .conns
            .values()
            .any(|c| c.read == want && c.peer_shut & SHUTDOWN_SEND != 0)
    });
    let key = *rig.guest.stack.conns.keys().next().unwrap();
    rig.guest.stack.write(key, b"pong");
    rig.guest.stack.close(key);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    let got = String::from_utf8(client.join().unwrap()).unwrap();
    assert!(
        got.starts_with("OK ") && got.ends_with("\npong"),
        "client read {got:?}"
    );
    rig.stop();
}

fn host_connect_and_ok(rt: Runtime) {
    host_connect_gets_ok_and_talks(
        rt,
        vec![b"CONNECT 5000\n".to_vec(), b"ping".to_vec()],
        b"ping",
    );
}

fn connect_line_one_byte_at_a_time(rt: Runtime) {
    let writes = b"CONNECT 5000\n".iter().map(|b| vec![*b]).collect();
    host_connect_gets_ok_and_talks(rt, writes, b"");
}

fn connect_line_followed_by_data_in_one_write(rt: Runtime) {
    host_connect_gets_ok_and_talks(
        rt,
        vec![b"CONNECT 5000\nstream bytes".to_vec()],
        b"stream bytes",
    );
}

fn guest_connect_without_listener_is_reset_within_50ms(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let key = rig.guest.stack.connect(4444);
    let start = std::time::Instant::now();
    rig.until("reset", LONG, |g| g.stack.conn(key).reset);
    let took = start.elapsed();
    assert!(took < Duration::from_millis(50), "reset took {took:?}");
    rig.stop();
}

fn host_connect_to_a_port_nobody_listens_on(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let client = host_client(rig.listener(), vec![b"CONNECT 6000\n".to_vec()]);
    rig.until("client done", LONG, |_| client.is_finished());
    assert_eq!(client.join().unwrap(), b"", "closed without an OK");
    rig.stop();
}

fn half_close_each_way_keeps_the_other_direction(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(80)).unwrap();
    let key = rig.guest.stack.connect(80);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    // Guest sends and shuts its write side; the host reads to end of file, then answers.
    rig.guest.stack.write(key, b"request");
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    let server = std::thread::spawn(move || {
        let mut got = Vec::new();
        app.read_to_end(&mut got).unwrap();
        app.write_all(b"response").unwrap();
        app.shutdown(std::net::Shutdown::Write).unwrap();
        got
    });
    rig.until("response and end of file", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(server.join().unwrap(), b"request");
    assert_eq!(rig.guest.stack.conn(key).read, b"response");

    // The mirror: the host sends and shuts first; the guest answers after end of file.
    let key = rig.guest.stack.connect(80);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    app.write_all(b"hello").unwrap();
    app.shutdown(std::net::Shutdown::Write).unwrap();
    rig.until("host end of file", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(rig.guest.stack.conn(key).read, b"hello");
    rig.guest.stack.write(key, b"still here");
    rig.guest.stack.close(key);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    // The guest is done; what it sent is in the socket, then end of file.
    let mut got = Vec::new();
    app.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"still here");
    rig.stop();
}

fn bad_connect_lines_are_closed(rt: Runtime) {
    let mut c = config();
    c.connect_line_timeout = Duration::from_millis(200);
    let mut rig = Rig::start(rt, c);
    let mut overlong = b"CONNECT ".to_vec();
    overlong.extend(std::iter::repeat_n(b'1', 100));
    let garbage = host_client(rig.listener(), vec![b"HELLO THERE\n".to_vec()]);
    let long = host_client(rig.listener(), vec![overlong]);
    // Never finished: connects, writes half a line, and waits.
    let mut silent = UnixStream::connect(rig.listener()).unwrap();
    silent.write_all(b"CONNECT 12").unwrap();
    rig.until("garbage and overlong closed", LONG, |_| {
        garbage.is_finished() && long.is_finished()
    });
    assert_eq!(garbage.join().unwrap(), b"");
    assert_eq!(long.join().unwrap(), b"");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    let n = loop {
        rig.step();
        match silent.read(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                continue
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(n, 0, "the unfinished client is closed at its deadline");
    let vsock = rig.stop();
    let stats = vsock.device().engine().stats();
    assert_eq!(stats.connect_line_garbage, 1);
    assert_eq!(stats.connect_line_too_long, 1);
    assert_eq!(stats.connect_line_timeout, 1);
}

fn connect_close_cycles_leak_no_descriptor(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(90)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    // Warm up once so lazily opened descriptors are counted in the baseline.
    let key = rig.guest.stack.connect(90);
    rig.until("warm-up", LONG, |g| g.stack.conn(key).established);
    rig.guest.stack.close(key);
    while let Ok((s, _)) = listener.accept() {
        accepted.push(s);
    }
    drop(accepted.drain(..));
    rig.until("warm-up closed", LONG, |g| g.stack.conn(key).closed);
    let before = open_fds();
    for i in 0..100 {
        let key = rig.guest.stack.connect(90);
        rig.until("connected", LONG, |g| g.stack.conn(key).established);
        rig.guest.stack.write(key, &pattern(i, 100));
        rig.guest.stack.close(key);
        // The host side closes its end once it has read the data.
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) => rig.step(),
            }
        };
        // Read to end of file while the guest keeps running.
        s.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, pattern(i, 100));
        drop(s);
        rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    }
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().connections(), 0);
    drop(vsock);
    let after = open_fds();
    assert!(
        after <= before,
        "descriptors before {before}, after {after}"
    );
}

fn rst_from_the_guest_mid_transfer_closes_the_host_socket(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(81)).unwrap();
    let key = rig.guest.stack.connect(81);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    rig.guest.stack.write(key, &pattern(2, 100_000));
    rig.until("some data out", LONG, |g| g.stack.conn(key).tx_cnt > 0);
    rig.guest.stack.rst(key);
    // The host application reads what arrived, then sees the socket end.
    app.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    loop {
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got <= 100_000);
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().stats().rst_received, 1);
}

fn host_peer_closing_with_unread_data_resets_the_guest(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(82)).unwrap();
    let key = rig.guest.stack.connect(82);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (app, _) = listener.accept().unwrap();
    drop(app);
    // The guest hears at once that the peer is gone (as from a Linux peer's close), and its
    // connection ends; bytes it sent before hearing it are lost, which a reset tells it.
    rig.guest.stack.write(key, &pattern(3, 1 << 20));
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    // A reset either way: ours, or the guest's own, which a Linux guest sends at once when it
    // has heard both shutdowns, crossing the bytes it still had in flight.
    let (peer_shut, reset) = {
        let c = rig.guest.stack.conn(key);
        let own_reset = c.peer_shut == vsock_core::wire::SHUTDOWN_BOTH && c.closed;
        (c.peer_shut, c.rst_received || c.rst_sent || own_reset)
    };
    // Told first that the peer takes no more (then either the end of its stream, or, had
    // the guest sent anything before hearing it, a reset for the loss).
    assert_ne!(peer_shut & vsock_core::wire::SHUTDOWN_RCV, 0);
    let vsock = rig.stop();
    let stats = vsock.device().engine().stats();
    assert_eq!(stats.host_hangups, 1);
    assert!(
        stats.guest_bytes_lost == 0 || reset,
        "{} guest bytes lost without a reset",
        stats.guest_bytes_lost
    );
}

/// A host peer writes its reply and closes without reading what the guest sent. Linux then
/// reports an error on our socket (`ECONNRESET`, `EPOLLERR`), yet still holds the reply for us
/// to read: the guest gets all of it, and then the reset (its own bytes were not all read).
fn reply_then_close_delivers_the_whole_reply(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(86)).unwrap();
    let key = rig.guest.stack.connect(86);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    rig.guest.stack.write(key, &pattern(5, 1 << 20));
    // The guest's bytes reach the socket, and nobody reads them.
    rig.until("guest bytes in the socket", LONG, |g| {
        g.stack.conn(key).peer_fwd_cnt > 0 || g.stack.conn(key).tx_cnt > 100_000
    });
    let reply = pattern(6, 300_000);
    let sent = reply.clone();
    let writer = std::thread::spawn(move || {
        app.write_all(&sent).unwrap();
        // Closed with the guest's bytes unread.
        drop(app);
    });
    rig.until("reset", LONG, |g| g.stack.conn(key).rst_received);
    writer.join().unwrap();
    let got = &rig.guest.stack.conn(key).read;
    assert_eq!(got.len(), reply.len(), "{rt:?}: reply bytes delivered");
    assert!(*got == reply, "{rt:?}: reply differs");
    rig.stop();
}

/// 200 host clients connect to a guest listener at once: every one is served.
fn a_storm_of_host_clients_is_served(rt: Runtime) {
    const CLIENTS: usize = 200;
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen(5000);
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let path = rig.listener();
            let barrier = barrier.clone();
            std::thread::spawn(move || -> Result<(), String> {
                barrier.wait();
                let mut c = UnixStream::connect(&path).map_err(|e| format!("connect: {e}"))?;
                c.set_read_timeout(Some(LONG)).unwrap();
                c.write_all(b"CONNECT 5000\n")
                    .map_err(|e| format!("write: {e}"))?;
                let mut line = Vec::new();
                let mut byte = [0u8];
                while !line.ends_with(b"\n") {
                    match c.read(&mut byte) {
                        Ok(0) => return Err(format!("closed after {line:?}")),
                        Ok(_) => line.push(byte[0]),
                        Err(e) => return Err(format!("read after {line:?}: {e}")),
                    }
                }
                if !line.starts_with(b"OK ") {
                    return Err(format!("got {line:?}"));
                }
                c.write_all(format!("client {i}").as_bytes())
                    .map_err(|e| format!("write: {e}"))?;
                Ok(())
            })
        })
        .collect();
    rig.until("every client answered", LONG, |_| {
        clients.iter().all(|c| c.is_finished())
    });
    let failed: Vec<String> = clients
        .into_iter()
        .enumerate()
        .filter_map(|(i, c)| c.join().unwrap().err().map(|e| format!("client {i}: {e}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{rt:?}: {} of {CLIENTS} clients failed: {failed:?}",
        failed.len()
    );
    rig.stop();
}

/// 300 clients that never finish their `CONNECT` line, then a prompt one: it is served at
/// its first attempt, at once.
fn slow_clients_never_keep_a_prompt_one_out(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen(5000);
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut c = UnixStream::connect(rig.listener()).unwrap();
        // An older slow client may already have been closed to make room: that is the point.
        let _ = c.write_all(b"CONNECT 50");
        slow.push(c);
        rig.step();
    }
    let start = std::time::Instant::now();
    let mut c = UnixStream::connect(rig.listener()).unwrap();
    c.write_all(b"CONNECT 5000\n").unwrap();
    c.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\n") {
        match c.read(&mut buf) {
            Ok(0) => panic!("{rt:?}: the prompt client was closed"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(start.elapsed() < LONG, "{rt:?}: no answer");
                rig.step();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("{rt:?}: {e}"),
        }
    }
    let took = start.elapsed();
    assert!(got.starts_with(b"OK "), "{rt:?}: {got:?}");
    assert!(
        took < Duration::from_secs(1),
        "{rt:?}: the prompt client waited {took:?}"
    );
    drop(slow);
    let vsock = rig.stop();
    assert!(vsock.device().engine().stats().pending_evicted >= 300 - 64);
}

fn a_guest_that_stops_posting_rx_buffers_loses_nothing(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(83)).unwrap();
    let key = rig.guest.stack.connect(83);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (app, _) = listener.accept().unwrap();
    let data = pattern(4, 2 << 20);
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut app = app;
        app.write_all(&sent).unwrap();
        app
    });
    // Stop posting rx buffers for a while: the host writer blocks, nothing is lost.
    rig.guest.rx_paused = true;
    let pause = std::time::Instant::now();
    while pause.elapsed() < Duration::from_millis(300) {
        rig.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(rig.guest.stack.conn(key).read.len() < data.len());
    rig.guest.rx_paused = false;
    rig.until("all read", LONG, |g| {
        g.stack.conn(key).read.len() >= data.len()
    });
    let _app = writer.join().unwrap();
    assert!(rig.guest.stack.conn(key).read == data, "stream differs");
    rig.stop();
}

fn a_host_reader_that_stalls_loses_nothing(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(84)).unwrap();
    let key = rig.guest.stack.connect(84);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    let data = pattern(5, 4 << 20);
    rig.guest.stack.write(key, &data);
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    // The reader stalls for a second while the guest pushes; the engine holds at most its
    // buffer, the guest waits on credit.
    let stall = std::time::Instant::now();
    while stall.elapsed() < Duration::from_secs(1) {
        rig.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        rig.guest.stack.conn(key).tx_cnt < data.len() as u32,
        "credit held the guest back"
    );
    app.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        got == data,
        "stream differs ({} of {} bytes)",
        got.len(),
        data.len()
    );
    let vsock = rig.stop();
    assert!(vsock.device().engine().buffer_memory() <= 256 * 256 * 1024);
}

fn sixty_four_mib_each_way_with_a_checksum(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let echo = echo_service(UnixListener::bind(rig.port_path(85)).unwrap());
    let key = rig.guest.stack.connect(85);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let data = pattern(6, 64 << 20);
    rig.guest.stack.write(key, &data);
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("echo done", Duration::from_secs(300), |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(echo.join().unwrap(), data.len());
    let read = &rig.guest.stack.conn(key).read;
    assert_eq!(read.len(), data.len());
    assert_eq!(fnv(read), fnv(&data), "checksums differ");
    rig.stop();
}

fn a_thousand_concurrent_connections_each_move_data(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(86)).unwrap();
    const N: usize = 1000;
    const EACH: usize = 1000;
    let service = std::thread::spawn(move || {
        // Accept them all, then echo each one's bytes back.
        let mut socks = Vec::new();
        for _ in 0..N {
            socks.push(listener.accept().unwrap().0);
        }
        for s in &mut socks {
            let mut buf = vec![0u8; EACH];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf).unwrap();
        }
        socks
    });
    let keys: Vec<_> = (0..N).map(|_| rig.guest.stack.connect(86)).collect();
    rig.until("all connected", LONG, |g| {
        keys.iter().all(|k| g.stack.conn(*k).established)
    });
    for (i, k) in keys.iter().enumerate() {
        rig.guest.stack.write(*k, &pattern(i as u64, EACH));
    }
    rig.until("all echoed", LONG, |g| {
        keys.iter().all(|k| g.stack.conn(*k).read.len() == EACH)
    });
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            rig.guest.stack.conn(*k).read,
            pattern(i as u64, EACH),
            "connection {i}"
        );
    }
    let socks = service.join().unwrap();
    drop(socks);
    rig.stop();
}

fn shutdown_resets_connections_closes_sockets_and_unlinks_the_listener(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(87)).unwrap();
    let key = rig.guest.stack.connect(87);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    let path = rig.listener();
    assert!(path.exists());
    let (guest, vsock) = rig.stop_with_guest();
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
    drop(vsock);
    assert!(!path.exists(), "the listener path is unlinked");
}

/// A transfer from the guest interrupted by `interrupt` (a device reset or a pause): the
/// host application sees its socket end, `told` (if any) comes to hold of the guest's
/// connection, and a new connection is served.
fn interrupted_transfer(
    rt: Runtime,
    interrupt: fn(&mut Rig),
    told: Option<fn(&vsock_core::testing::GuestConn) -> bool>,
) {
    let mut rig = Rig::start(rt, config());
    let listener = UnixListener::bind(rig.port_path(88)).unwrap();
    let key = rig.guest.stack.connect(88);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let (mut app, _) = listener.accept().unwrap();
    rig.guest.stack.write(key, &pattern(7, 2 << 20));
    rig.until("transfer under way", LONG, |g| g.stack.conn(key).tx_cnt > 0);
    interrupt(&mut rig);
    // The host application sees its socket end (after whatever had arrived).
    app.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 65536];
    loop {
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    if let Some(told) = told {
        rig.until("the guest is told", LONG, |g| told(g.stack.conn(key)));
    }
    // The driver connects again and is served.
    let echo = echo_service(listener);
    let key = rig.guest.stack.connect(88);
    rig.until("connected again", LONG, |g| g.stack.conn(key).established);
    rig.guest.stack.write(key, b"once again");
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("echo", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(rig.guest.stack.conn(key).read, b"once again");
    assert_eq!(echo.join().unwrap(), 10);
    rig.stop();
}

/// A device reset mid-transfer: a new driver (and guest model) takes over, with nothing to
/// be told.
fn device_reset_mid_transfer_closes_everything_and_serves_again(rt: Runtime) {
    interrupted_transfer(rt, Rig::reset_device, None);
}

/// A paused VM (the queues stop and start again, the driver keeps its state): the guest gets
/// an RST once the queues are back.
fn device_pause_mid_transfer_resets_the_guest_and_serves_again(rt: Runtime) {
    interrupted_transfer(rt, Rig::pause_device, Some(|c| c.rst_received));
}

/// FNV-1a, 64 bits: a checksum of a stream.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod mio {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Mio) } )*
        }
        mod tokio {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Tokio) } )*
        }
        mod smol {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Smol) } )*
        }
    };
}

conformance!(
    guest_connects_and_echoes,
    host_connect_and_ok,
    connect_line_one_byte_at_a_time,
    connect_line_followed_by_data_in_one_write,
    guest_connect_without_listener_is_reset_within_50ms,
    host_connect_to_a_port_nobody_listens_on,
    half_close_each_way_keeps_the_other_direction,
    bad_connect_lines_are_closed,
    connect_close_cycles_leak_no_descriptor,
    rst_from_the_guest_mid_transfer_closes_the_host_socket,
    host_peer_closing_with_unread_data_resets_the_guest,
    reply_then_close_delivers_the_whole_reply,
    a_storm_of_host_clients_is_served,
    slow_clients_never_keep_a_prompt_one_out,
    a_guest_that_stops_posting_rx_buffers_loses_nothing,
    a_host_reader_that_stalls_loses_nothing,
    sixty_four_mib_each_way_with_a_checksum,
    a_thousand_concurrent_connections_each_move_data,
    shutdown_resets_connections_closes_sockets_and_unlinks_the_listener,
    device_reset_mid_transfer_closes_everything_and_serves_again,
    device_pause_mid_transfer_resets_the_guest_and_serves_again,
);
