//! The real Linux guest as the judge: the `vhost-user-vsock` daemon on each runtime, a Debian
//! guest under QEMU, and its in-kernel virtio-vsock driver. One guest boot runs every check of
//! `tests/guest/checks.sh` while the test plays the host side; the others each boot a guest
//! for one situation: a guest killed mid-transfer, a paused VM, SIGTERM, a recorded session,
//! the daemon before any VM attaches, a host reply followed by a close, storms of host
//! clients, and `--tx-buffer-size` (those on mio only).
//!
//! These tests are ignored (saying why) when QEMU or the guest image is missing, unless
//! `VSOCK_REQUIRE_GUEST=1`; a missing release daemon fails them with the command that builds
//! it. `scripts/test.sh` provides all three and sets it.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use vsock_tests::guest::{self, field, Daemon, Image, Vm};

const MIB: u64 = 1 << 20;
const CHECKS: &str = include_str!("../guest/checks.sh");

/// Runs `f` on a thread; `stop` tells it to give up waiting for peers.
fn peer<T: Send + 'static>(
    stop: &Arc<AtomicBool>,
    f: impl FnOnce(&AtomicBool) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let stop = stop.clone();
    thread::spawn(move || f(&stop))
}

fn all_checks(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let uds = daemon.uds.clone();

    // 1. guest -> host, 64 MiB.
    let l = guest::listen(&daemon.port_path(5001));
    let g2h = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        guest::drain(&mut s).ok()
    });
    // 2. host -> guest, 64 MiB.
    let u = uds.clone();
    let h2g = peer(&stop, move |stop| {
        let mut s = guest::connect(&u, 5002, stop)?;
        let sent = guest::send(&mut s, 64 * MIB, 0x5eed).ok();
        drop(s);
        sent
    });
    // 4. half-close, guest first: read to the end, then answer with the digest.
    let l = guest::listen(&daemon.port_path(5003));
    let half_g2h = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let (_, digest) = guest::drain(&mut s).ok()?;
        s.write_all(digest.as_bytes()).ok()?;
        Some(digest)
    });
    // 5. half-close, host first.
    let u = uds.clone();
    let half_h2g = peer(&stop, move |stop| {
        let mut s = guest::connect(&u, 5004, stop)?;
        guest::send_then_read(&mut s, MIB, 0x4a1f).ok()
    });
    // 6. eight streams each way.
    let l = guest::listen(&daemon.port_path(5005));
    let par_g2h = peer(&stop, move |stop| {
        let streams: Vec<_> = (0..8).map_while(|_| guest::accept(&l, stop)).collect();
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut s| thread::spawn(move || guest::drain(&mut s).ok()))
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap().map(|(_, d)| d))
            .collect::<Option<BTreeSet<_>>>()
    });
    let (u, all_stop) = (uds.clone(), stop.clone());
    let par_h2g = peer(&stop, move |stop| {
        let senders: Vec<_> = (0..8u64)
            .map(|i| {
                let (u, stop) = (u.clone(), all_stop.clone());
                thread::spawn(move || {
                    // Until the guest's fork listener is up, connects are refused and retried.
                    let mut s = guest::connect(&u, 5006, &stop)?;
                    let (sent, reply) = guest::send_then_read(&mut s, 4 * MIB, 100 + i).ok()?;
                    Some(reply.starts_with(&sent))
                })
            })
            .collect();
        let all = senders
            .into_iter()
            .all(|s| s.join().ok().flatten() == Some(true));
        let mut done = guest::connect(&u, 5007, stop)?;
        done.write_all(if all { b"ok\n" } else { b"bad\n" }).ok()?;
        Some(all)
    });
    // 7. 200 short connections, echoed.
    let l = guest::listen(&daemon.port_path(5008));
    let short = peer(&stop, move |stop| {
        let mut served = 0u32;
        while let Some(mut s) = guest::accept(&l, stop) {
            let mut line = Vec::new();
            if s.read_to_end(&mut line).is_ok() && s.write_all(&line).is_ok() {
                served += 1;
            }
        }
        served
    });

    let vm = Vm::boot(&image, &daemon.socket, CHECKS);
    let out = vm.wait(Duration::from_secs(900));
    stop.store(true, Ordering::Relaxed);
    let serial = &out.serial;
    assert_eq!(out.status, Some(0), "the guest script failed:\n{serial}");
    assert!(
        out.line("CHECKS-DONE").is_some(),
        "the checks did not finish:\n{serial}"
    );
    assert!(out.line("FAIL").is_none(), "{serial}");

    // 1.
    let (bytes, digest) = g2h.join().unwrap().expect("guest->host stream");
    assert_eq!(bytes, 64 * MIB);
    assert_eq!(
        out.line("SHA g2h "),
        Some(digest.as_str()),
        "guest->host digest"
    );
    // 2.
    let sent = h2g.join().unwrap().expect("host->guest stream");
    assert_eq!(
        out.line("SHA h2g "),
        Some(sent.as_str()),
        "host->guest digest"
    );
    // 3.
    let nolisten = out.line("NOLISTEN ").expect("no-listener check");
    assert_ne!(field(nolisten, "rc"), Some("0"), "{nolisten}");
    assert!(
        nolisten.contains("reset by peer"),
        "not a reset: {nolisten}"
    );
    let t0: f64 = field(nolisten, "t0").unwrap().parse().unwrap();
    let t1: f64 = field(nolisten, "t1").unwrap().parse().unwrap();
    assert!(
        t1 - t0 < 1.0,
        "the reset took {:.2} s, too close to the driver's 2 s timeout",
        t1 - t0
    );
    // 4.
    let digest = half_g2h.join().unwrap().expect("half-close, guest first");
    let half = out.line("HALF g2h ").expect("half-close line");
    assert_eq!(field(half, "want"), Some(digest.as_str()), "{half}");
    assert_eq!(field(half, "got"), Some(digest.as_str()), "{half}");
    // 5.
    let (sent, reply) = half_h2g.join().unwrap().expect("half-close, host first");
    assert!(
        reply.starts_with(&sent),
        "the guest's digest {reply:?} is not of what we sent ({sent})"
    );
    assert_eq!(out.line("HALF h2g "), Some("rc=0"));
    // 6.
    let received = par_g2h.join().unwrap().expect("eight guest->host streams");
    let sent: BTreeSet<String> = out.lines("SHA par ").map(|l| l[8..].to_string()).collect();
    assert_eq!(sent.len(), 8, "{serial}");
    assert_eq!(received, sent, "parallel guest->host digests");
    assert_eq!(par_h2g.join().unwrap(), Some(true), "parallel host->guest");
    assert_eq!(out.line("PAR h2g "), Some("ok"));
    // 7.
    assert_eq!(out.line("SHORT "), Some("ok=200"), "{serial}");
    assert_eq!(short.join().unwrap(), 200);

    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
    assert!(log.contains("connections:"), "no counters on exit:\n{log}");
}

/// A guest killed mid-transfer in both directions: the host sockets end (nothing hangs), the
/// daemon lives on, and the next guest is served.
fn guest_killed(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));

    let (ended, endings) = mpsc::channel();
    let l = guest::listen(&daemon.port_path(5001));
    let (count, tx) = (received.clone(), ended.clone());
    peer(&stop, move |stop| {
        let Some(mut s) = guest::accept(&l, stop) else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => count.fetch_add(n as u64, Ordering::Relaxed),
            };
        }
        let _ = tx.send("reader");
    });
    let (count, tx, u) = (sent.clone(), ended, daemon.uds.clone());
    peer(&stop, move |stop| {
        let Some(mut s) = guest::connect(&u, 5002, stop) else {
            return;
        };
        let buf = vec![0x5au8; 64 * 1024];
        while s.write_all(&buf).is_ok() {
            count.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        let _ = tx.send("writer");
    });

    let mut vm = Vm::boot(
        &image,
        &daemon.socket,
        "socat -u OPEN:/dev/zero VSOCK-CONNECT:2:5001 &\n\
         socat -u VSOCK-LISTEN:5002 OPEN:/dev/null &\n\
         echo STREAMING\n\
         sleep 600\n",
    );
    vm.wait_for_line("STREAMING", Duration::from_secs(120));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < 4 * MIB || sent.load(Ordering::Relaxed) < 4 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "the streams did not get going: {} received, {} sent",
            received.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed)
        );
        thread::sleep(Duration::from_millis(50));
    }
    vm.kill();
    for _ in 0..2 {
        if endings.recv_timeout(Duration::from_secs(10)).is_err() {
            panic!(
                "a host socket did not end after the guest died:\n{}",
                daemon.log()
            );
        }
    }

    // The same daemon serves the next guest.
    let l = guest::listen(&daemon.port_path(6001));
    let echo = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let mut line = Vec::new();
        s.read_to_end(&mut line).ok()?;
        s.write_all(&line).ok()?;
        s.shutdown(Shutdown::Both).ok()?;
        String::from_utf8(line).ok()
    });
    let vm = Vm::boot(
        &image,
        &daemon.socket,
        "echo \"ECHO $(echo again | socat -t 10 - VSOCK-CONNECT:2:6001)\"\n",
    );
    let out = vm.wait(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status, Some(0), "{}", out.serial);
    assert_eq!(out.line("ECHO "), Some("again"), "{}", out.serial);
    assert_eq!(echo.join().unwrap().as_deref(), Some("again\n"));

    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
    assert!(
        log.matches("frontend connected").count() == 2,
        "two guests, one daemon:\n{log}"
    );
}

/// The daemon records a session with the real driver: the trace replays exactly through a
/// fresh engine, stays small, and tshark reads it cleanly. `VSOCK_SAVE_TRACES=DIR` keeps a
/// copy (how the regression traces in `tests/traces` are made).
fn recorded_trace(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start_with(&image, runtime, true);
    let stop = Arc::new(AtomicBool::new(false));
    let l = guest::listen(&daemon.port_path(5001));
    let echo = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let mut line = Vec::new();
        s.read_to_end(&mut line).ok()?;
        s.write_all(&line).ok()
    });
    let l = guest::listen(&daemon.port_path(5002));
    let sink = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        guest::drain(&mut s).ok()
    });
    let u = daemon.uds.clone();
    let talk = peer(&stop, move |stop| {
        let mut s = guest::connect(&u, 5003, stop)?;
        guest::send_then_read(&mut s, 16 * 1024, 77).ok()
    });
    let script = "echo \"ECHO $(echo hello-vsock | socat -t 10 - VSOCK-CONNECT:2:5001)\"\n\
                  head -c 65536 /dev/urandom > /tmp/blob\n\
                  echo \"SHA $(sha256sum /tmp/blob | cut -d' ' -f1)\"\n\
                  socat -u OPEN:/tmp/blob VSOCK-CONNECT:2:5002\n\
                  socat -u OPEN:/dev/null VSOCK-CONNECT:2:5999 2>/dev/null\n\
                  echo \"NOLISTEN rc=$?\"\n\
                  socat -t 10 VSOCK-LISTEN:5003 EXEC:sha256sum\n";
    let vm = Vm::boot(&image, &daemon.socket, script);
    let out = vm.wait(Duration::from_secs(300));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status, Some(0), "{}", out.serial);
    assert_eq!(out.line("ECHO "), Some("hello-vsock"), "{}", out.serial);
    assert!(echo.join().unwrap().is_some());
    let (_, digest) = sink.join().unwrap().expect("guest->host stream");
    assert_eq!(out.line("SHA "), Some(digest.as_str()));
    assert_ne!(out.line("NOLISTEN "), Some("rc=0"));
    let (sent, reply) = talk.join().unwrap().expect("host->guest half-close");
    assert!(reply.starts_with(&sent));

    let exit = daemon.stop();
    assert!(exit.status.success(), "{}", exit.log);
    let trace = exit.trace.expect("the daemon wrote its trace");
    assert!(trace.len() < 1 << 20, "{} bytes", trace.len());
    let replayed = vsock_trace::replay(&trace).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        replayed.to_guest > 10 && replayed.from_guest > 10,
        "{replayed:?}"
    );
    let dir = std::env::var_os("VSOCK_SAVE_TRACES").map(std::path::PathBuf::from);
    let path = match &dir {
        Some(dir) => dir.join(format!("guest-{runtime}.pcapng")),
        None => vsock_tests::temp_dir().join("guest.pcapng"),
    };
    std::fs::write(&path, &trace).unwrap();
    if vsock_tests::tshark::available() {
        vsock_tests::tshark::check(&path).unwrap_or_else(|e| panic!("{e}"));
    } else {
        assert!(
            std::env::var_os("VSOCK_REQUIRE_GUEST").is_none_or(|v| v != "1"),
            "tshark is required (scripts/test.sh installs it)"
        );
    }
}

/// Boots a guest that connects to a host listener on port 5001 and waits to read from it,
/// then runs `then`. The host side holds the connection open, sending nothing; the returned
/// channel says `"accepted"` once the guest is connected and waiting, then `"closed"` when the
/// device drops the host socket. The guest prints `WAITER rc=..` once its reader ends.
fn hold_a_connection(
    image: &Image,
    daemon: &Daemon,
    stop: &Arc<AtomicBool>,
    then: &str,
) -> (Vm, mpsc::Receiver<&'static str>) {
    let (tell, host_sees) = mpsc::channel();
    let l = guest::listen(&daemon.port_path(5001));
    peer(stop, move |stop| {
        let Some(mut s) = guest::accept(&l, stop) else {
            return;
        };
        let _ = tell.send("accepted");
        let mut buf = [0u8; 16];
        let ended = matches!(s.read(&mut buf), Ok(0) | Err(_));
        let _ = tell.send(if ended { "closed" } else { "data?" });
    });
    let script = format!(
        "socat -u VSOCK-CONNECT:2:5001 STDOUT > /dev/null 2>&1 &\n\
         waiter=$!\n\
         echo WAITING\n\
         wait $waiter\n\
         echo \"WAITER rc=$?\"\n\
         {then}"
    );
    let mut vm = Vm::boot(image, &daemon.socket, &script);
    vm.wait_for_line("WAITING", Duration::from_secs(120));
    assert_eq!(
        host_sees.recv_timeout(Duration::from_secs(60)),
        Ok("accepted"),
        "the guest did not connect"
    );
    (vm, host_sees)
}

/// The VM paused (QEMU `stop`) and resumed (`cont`): the rings stop and start again under the
/// same driver. The host side of a connection sees its socket closed during the pause; the
/// guest, once resumed, gets an RST for it rather than waiting forever for data that will never
/// come; and new connections work.
fn paused_vm(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    // At debug, the daemon says each time the runtime takes a ring's kicks over.
    let daemon = Daemon::start_logged(&image, runtime, "info,vsock_vhost_user=debug");
    let stop = Arc::new(AtomicBool::new(false));
    let l = guest::listen(&daemon.port_path(5002));
    let echo = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let mut line = Vec::new();
        s.read_to_end(&mut line).ok()?;
        s.write_all(&line).ok()
    });
    let (vm, host_sees) = hold_a_connection(
        &image,
        &daemon,
        &stop,
        "echo \"ECHO $(echo again | socat -t 10 - VSOCK-CONNECT:2:5002)\"\n",
    );
    vm.monitor("stop");
    assert_eq!(
        host_sees.recv_timeout(Duration::from_secs(10)),
        Ok("closed"),
        "the host socket outlived the pause:\n{}",
        daemon.log()
    );
    thread::sleep(Duration::from_secs(1));
    vm.monitor("cont");
    let out = vm.wait(Duration::from_secs(120));
    stop.store(true, Ordering::Relaxed);
    // Linux turns an RST on an established stream into end of file for its reader: what
    // matters is that the reader ended at all (without the RST it would wait forever).
    assert!(
        out.line("WAITER ").is_some(),
        "the guest's reader never ended:\n{}",
        out.serial
    );
    assert_eq!(out.line("ECHO "), Some("again"), "{}", out.serial);
    assert!(echo.join().unwrap().is_some());
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    // The end came from the device: an RST for the connection dropped in the pause.
    let sent = log
        .lines()
        .find_map(|l| {
            l.split("resets: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .expect("the counters");
    assert!(sent >= 1, "no RST went to the guest:\n{log}");
    // The guest's kicks of rx and tx woke the runtime directly, not through vhost-user-backend's
    // worker: once when the rings first started and again after the pause, when the frontend
    // started them anew.
    for queue in [0, 1] {
        let taken = log
            .lines()
            .filter(|l| {
                l.contains("the runtime watches the kicks") && l.contains(&format!("queue={queue}"))
            })
            .count();
        assert!(
            taken >= 2,
            "queue {queue}'s kicks were taken over {taken} times, not before and after the pause:\n{log}"
        );
    }
}

/// SIGTERM while the guest holds a connection: the daemon exits cleanly, and the guest's
/// reader learns of the end (the RST the shutdown sends) instead of waiting forever.
fn sigterm_resets_the_guest(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let (vm, _host_sees) = hold_a_connection(&image, &daemon, &stop, "");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let out = vm.wait(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    assert!(
        out.line("WAITER ").is_some(),
        "the guest's reader never heard of the shutdown:\n{}\n{log}",
        out.serial
    );
}

/// The CPU time (user and system) process `pid` has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon's stat");
    // After the command name (in parentheses, and it may hold spaces) comes field 3, the
    // state; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// The share of one core process `pid` uses over the next `window`.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    thread::sleep(window);
    let (cpu1, t1) = (cpu_time(pid), Instant::now());
    (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64()
}

/// A host client of `<uds_path>` that writes `line`, then reads until the daemon closes it.
/// Returns how long after `since` the end came (`None` if not within `limit`) and what it read.
fn client_until_closed(
    uds: &std::path::Path,
    line: &'static [u8],
    since: Instant,
    limit: Duration,
) -> thread::JoinHandle<(Option<Duration>, Vec<u8>)> {
    let mut s = UnixStream::connect(uds).expect("connect to <uds_path>");
    thread::spawn(move || {
        s.write_all(line).expect("write to the daemon");
        s.set_read_timeout(Some(limit)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                // End of file, or a reset: either way the daemon closed it.
                Ok(0) => return (Some(since.elapsed()), got),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return (Some(since.elapsed()), got)
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return (None, got),
            }
        }
    })
}

/// The daemon before any VM attaches: host clients come and go, and it must sleep between
/// their deadlines instead of spinning, close a client that sends no `CONNECT` line at the line
/// timeout (5 s), and close one whose `CONNECT` no guest answers at the connect timeout (2 s).
/// A VM that attaches afterwards is served as usual.
fn no_vm_attached(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let mut daemon = Daemon::start(&image, runtime);
    daemon.wait_for_host_listener();
    let pid = daemon.pid();
    let uds = daemon.uds.clone();
    let line_timeout = vsock_core::Config::new(3).connect_line_timeout;
    let connect_timeout = vsock_core::Config::new(3).connect_timeout;
    let slack = Duration::from_millis(1500);

    let idle = cpu_share(pid, Duration::from_millis(1500));

    let since = Instant::now();
    let silent = client_until_closed(&uds, b"", since, line_timeout + Duration::from_secs(10));
    let connect = client_until_closed(
        &uds,
        b"CONNECT 1234\n",
        since,
        connect_timeout + Duration::from_secs(10),
    );
    // Clients that come and go: some say nothing, some half a line.
    for i in 0..20 {
        let mut s = UnixStream::connect(&uds).expect("connect to <uds_path>");
        if i % 2 == 1 {
            let _ = s.write_all(b"CONNECT 12");
        }
    }
    // While the clients wait, and again once every deadline has passed.
    let waiting = cpu_share(pid, Duration::from_millis(2500));
    thread::sleep(
        (since + line_timeout + Duration::from_millis(500))
            .saturating_duration_since(Instant::now()),
    );
    let after = cpu_share(pid, Duration::from_millis(2500));
    let (silent_end, silent_got) = silent.join().unwrap();
    let (connect_end, connect_got) = connect.join().unwrap();
    eprintln!(
        "no_vm_attached({runtime}): daemon CPU {:.1}% of a core idle, {:.1}% while clients \
         wait, {:.1}% after their deadlines; silent client closed after {silent_end:?}, \
         CONNECT client after {connect_end:?} (read {:?})",
        idle * 100.0,
        waiting * 100.0,
        after * 100.0,
        String::from_utf8_lossy(&connect_got)
    );
    for (when, share) in [
        ("idle", idle),
        ("while clients wait", waiting),
        ("after the deadlines", after),
    ] {
        assert!(
            share < 0.10,
            "the daemon with no VM uses {:.1}% of a core {when}",
            share * 100.0
        );
    }
    let silent_end = silent_end.expect("the daemon never closed the silent client");
    assert!(
        silent_end <= line_timeout + slack,
        "the silent client was closed after {silent_end:?}, not at the {line_timeout:?} line \
         timeout"
    );
    assert!(
        silent_got.is_empty(),
        "the silent client read {silent_got:?}"
    );
    let connect_end = connect_end.expect("the daemon never closed the CONNECT client");
    assert!(
        connect_end <= connect_timeout + slack,
        "the CONNECT client was closed after {connect_end:?}, not at the {connect_timeout:?} \
         connect timeout"
    );
    assert!(
        !connect_got.starts_with(b"OK"),
        "no guest, yet the CONNECT client read {:?}",
        String::from_utf8_lossy(&connect_got)
    );
    assert!(daemon.running(), "{}", daemon.log());

    // Now a VM on the same daemon.
    let stop = Arc::new(AtomicBool::new(false));
    let vm = Vm::boot(
        &image,
        &daemon.socket,
        "socat -t 10 VSOCK-LISTEN:5003 EXEC:sha256sum\necho \"SERVED rc=$?\"\n",
    );
    let u = uds.clone();
    let talk = peer(&stop, move |stop| {
        let mut s = guest::connect(&u, 5003, stop)?;
        guest::send_then_read(&mut s, 64 * 1024, 0x1d1e).ok()
    });
    let out = vm.wait(Duration::from_secs(180));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status, Some(0), "{}", out.serial);
    assert_eq!(out.line("SERVED "), Some("rc=0"), "{}", out.serial);
    let (sent, reply) = talk.join().unwrap().expect("a connection to the guest");
    assert!(
        reply.starts_with(&sent),
        "{reply:?} is not the digest of {sent}"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// The number of bytes waiting unread in `stream`'s receive queue.
fn unread(stream: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// The reply a host program sends before closing, in `reply_then_close`.
const REPLY: u64 = 300_000;

/// A guest connects to a host program and writes much more than the program will ever read;
/// the program answers with 300,000 bytes and closes its socket with the guest's bytes still
/// unread (the daemon sees `ECONNRESET` on its next write). The guest must still receive the
/// whole reply, and then see its connection end.
fn reply_then_close(runtime: &str) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let l = guest::listen(&daemon.port_path(5020));
    let host = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        // Let the guest's bytes pile up unread.
        let deadline = Instant::now() + Duration::from_secs(60);
        while unread(&s) < 128 * 1024 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
        let sent = guest::send(&mut s, REPLY, 0x7e91).ok()?;
        let left = unread(&s);
        drop(s);
        Some((sent, left))
    });
    // socat's `nofork` makes the vsock socket the shell's stdin and stdout, so that a writer
    // and a reader use it at once: the reader never waits on the writer.
    let script = "head -c 1048576 /dev/urandom > /tmp/out\n\
                  cat > /tmp/rt.sh <<'EOF'\n\
                  cat /tmp/out &\n\
                  cat > /tmp/in 2> /tmp/rerr\n\
                  echo $? > /tmp/rrc\n\
                  kill $! 2> /dev/null\n\
                  EOF\n\
                  t0=$(cut -d' ' -f1 /proc/uptime)\n\
                  timeout 120 socat VSOCK-CONNECT:2:5020 'EXEC:sh /tmp/rt.sh,nofork' 2> /tmp/serr\n\
                  rc=$?\n\
                  t1=$(cut -d' ' -f1 /proc/uptime)\n\
                  echo \"REPLY bytes=$(wc -c < /tmp/in) sha=$(sha256sum /tmp/in | cut -d' ' -f1) \
                  reader=$(cat /tmp/rrc 2>/dev/null || echo none) socat=$rc t0=$t0 t1=$t1 \
                  err=$(cat /tmp/rerr /tmp/serr | tr '\\n' ' ')\"\n";
    let vm = Vm::boot(&image, &daemon.socket, script);
    let out = vm.wait(Duration::from_secs(300));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status, Some(0), "{}", out.serial);
    let (sent, left) = host.join().unwrap().expect("the host program's reply");
    let reply = out.line("REPLY ").expect("the guest's report");
    eprintln!("reply_then_close({runtime}): {reply}; {left} guest bytes unread at the close");
    assert!(
        left > 0,
        "the host read everything: not the case under test"
    );
    assert_eq!(
        field(reply, "bytes"),
        Some(REPLY.to_string().as_str()),
        "{reply}\n{}",
        daemon.log()
    );
    assert_eq!(field(reply, "sha"), Some(sent.as_str()), "{reply}");
    // The reader ended: end of file (0) or a reset (1), not the timeout's kill.
    assert!(
        matches!(field(reply, "reader"), Some("0" | "1")),
        "the guest never saw the connection end: {reply}"
    );
    let t0: f64 = field(reply, "t0").unwrap().parse().unwrap();
    let t1: f64 = field(reply, "t1").unwrap().parse().unwrap();
    assert!(t1 - t0 < 60.0, "{reply}");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// How one storm client fared.
#[derive(Debug)]
enum Served {
    /// `OK`, and the echo came back; the time to the `OK` line.
    Yes(Duration),
    /// The daemon closed or reset it before the `OK` line.
    Reset(String),
    /// Anything else.
    Failed(String),
}

/// One host client: `CONNECT port`, `OK`, and a line echoed by the guest.
fn storm_client(uds: &std::path::Path, port: u32, i: usize) -> Served {
    let started = Instant::now();
    let mut s = match UnixStream::connect(uds) {
        Ok(s) => s,
        Err(e) => return Served::Failed(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    if let Err(e) = s.write_all(format!("CONNECT {port}\n").as_bytes()) {
        return Served::Reset(format!("write CONNECT: {e}"));
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match s.read(&mut byte) {
            Ok(0) => return Served::Reset(format!("end of file after {line:?}")),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Served::Reset(e.to_string())
            }
            Err(e) => return Served::Failed(format!("read the reply: {e}")),
        }
    }
    let to_ok = started.elapsed();
    if !line.starts_with(b"OK ") {
        return Served::Failed(format!("reply {:?}", String::from_utf8_lossy(&line)));
    }
    let ping = format!("ping-{i}\n");
    if let Err(e) = s.write_all(ping.as_bytes()) {
        return Served::Failed(format!("write: {e}"));
    }
    let mut echo = vec![0u8; ping.len()];
    if let Err(e) = s.read_exact(&mut echo) {
        return Served::Failed(format!("read the echo: {e}"));
    }
    if echo != ping.as_bytes() {
        return Served::Failed(format!("echo {:?}", String::from_utf8_lossy(&echo)));
    }
    Served::Yes(to_ok)
}

/// Boots a guest that echoes every connection to port 5030 (socat forks a child for each),
/// and waits until a first connection is echoed. The guest powers off once the host connects
/// to port 5031 and says how it went.
fn echo_guest(image: &Image, daemon: &Daemon) -> Vm {
    let mut vm = Vm::boot(
        image,
        &daemon.socket,
        "socat VSOCK-LISTEN:5030,fork,backlog=512 PIPE &\n\
         echo LISTENING\n\
         echo \"DONE $(socat -u VSOCK-LISTEN:5031 STDOUT)\"\n",
    );
    vm.wait_for_line("LISTENING", Duration::from_secs(120));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(storm_client(&daemon.uds, 5030, 0), Served::Yes(_)) {
        assert!(
            Instant::now() < deadline,
            "the guest's echo never answered:\n{}",
            vm.serial()
        );
        thread::sleep(Duration::from_millis(200));
    }
    vm
}

/// Tells the echo guest the test is over, and waits for it to power off.
fn echo_guest_done(vm: Vm, daemon: &Daemon, word: &str) {
    let stop = AtomicBool::new(false);
    let mut s = guest::connect(&daemon.uds, 5031, &stop).expect("the guest's done port");
    s.write_all(format!("{word}\n").as_bytes()).unwrap();
    drop(s);
    let out = vm.wait(Duration::from_secs(60));
    assert_eq!(out.line("DONE "), Some(word), "{}", out.serial);
}

/// 200 host clients connect at once, each `CONNECT`s to the guest's listener and has a line
/// echoed: every one must be served, none reset.
fn connect_storm(runtime: &str) {
    const CLIENTS: usize = 200;
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let vm = echo_guest(&image, &daemon);

    let start = Arc::new(std::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (uds, start) = (daemon.uds.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                storm_client(&uds, 5030, i + 1)
            })
        })
        .collect();
    let began = Instant::now();
    let results: Vec<Served> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let took = began.elapsed();
    let served: Vec<Duration> = results
        .iter()
        .filter_map(|r| match r {
            Served::Yes(t) => Some(*t),
            _ => None,
        })
        .collect();
    let reset = results
        .iter()
        .filter(|r| matches!(r, Served::Reset(_)))
        .count();
    let failed: Vec<&str> = results
        .iter()
        .filter_map(|r| match r {
            Served::Yes(_) => None,
            Served::Reset(why) | Served::Failed(why) => Some(why.as_str()),
        })
        .collect();
    eprintln!(
        "connect_storm({runtime}): {} of {CLIENTS} served, {reset} reset, {} other failures, \
         in {took:?}; slowest OK after {:?}",
        served.len(),
        failed.len() - reset,
        served.iter().max()
    );
    echo_guest_done(vm, &daemon, if failed.is_empty() { "ok" } else { "bad" });
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} clients not served ({reset} reset): {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// 300 host clients connect and never finish their `CONNECT` line; a genuine client that
/// comes after them must be served at once, not after the slow ones time out.
fn slow_clients_then_one(runtime: &str) {
    const SLOW: usize = 300;
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let vm = echo_guest(&image, &daemon);
    let baseline = Instant::now();
    let base = storm_client(&daemon.uds, 5030, 0);
    let baseline = baseline.elapsed();

    let slow: Vec<UnixStream> = (0..SLOW)
        .map(|_| {
            let mut s = UnixStream::connect(&daemon.uds).expect("connect a slow client");
            let _ = s.write_all(b"CONNECT 50");
            s
        })
        .collect();
    // Let the daemon take them all in.
    thread::sleep(Duration::from_millis(300));
    let began = Instant::now();
    let genuine = storm_client(&daemon.uds, 5030, 1);
    let took = began.elapsed();
    eprintln!(
        "slow_clients_then_one({runtime}): with no slow client served in {baseline:?} \
         ({base:?}); after {SLOW} slow clients: {genuine:?} in {took:?}"
    );
    drop(slow);
    let ok = matches!(genuine, Served::Yes(_)) && took < Duration::from_secs(1);
    echo_guest_done(vm, &daemon, if ok { "ok" } else { "bad" });
    assert!(
        matches!(genuine, Served::Yes(_)),
        "the genuine client was not served on its first attempt: {genuine:?}"
    );
    assert!(
        took < Duration::from_secs(1),
        "the genuine client waited {took:?} behind {SLOW} slow ones"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// `--tx-buffer-size BYTES` (the credit update threshold follows it): 8 MiB each way with
/// SHA-256 checked, on mio.
fn tx_buffer_size(bytes: u32) {
    const SIZE: u64 = 8 * MIB;
    let image = Image::require();
    let _turn = guest::exclusive();
    let flag = bytes.to_string();
    let daemon = Daemon::start_flags(&image, "mio", &["--tx-buffer-size", &flag]);
    let stop = Arc::new(AtomicBool::new(false));
    let l = guest::listen(&daemon.port_path(5001));
    let g2h = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let began = Instant::now();
        let got = guest::drain(&mut s).ok()?;
        Some((got, began.elapsed()))
    });
    let u = daemon.uds.clone();
    let h2g = peer(&stop, move |stop| {
        let mut s = guest::connect(&u, 5002, stop)?;
        let began = Instant::now();
        let sent = guest::send(&mut s, SIZE, 0xb0f).ok();
        drop(s);
        Some((sent?, began.elapsed()))
    });
    let script = format!(
        "head -c {SIZE} /dev/urandom > /tmp/blob\n\
         echo \"SHA g2h $(sha256sum /tmp/blob | cut -d' ' -f1)\"\n\
         socat -u -b 65536 OPEN:/tmp/blob VSOCK-CONNECT:2:5001 || echo \"FAIL g2h rc=$?\"\n\
         rm -f /tmp/blob\n\
         socat -u -b 65536 VSOCK-LISTEN:5002 OPEN:/tmp/in,creat || echo \"FAIL h2g rc=$?\"\n\
         echo \"SHA h2g $(sha256sum /tmp/in | cut -d' ' -f1)\"\n"
    );
    let vm = Vm::boot(&image, &daemon.socket, &script);
    let out = vm.wait(Duration::from_secs(300));
    stop.store(true, Ordering::Relaxed);
    let serial = &out.serial;
    assert_eq!(out.status, Some(0), "{serial}");
    assert!(out.line("FAIL").is_none(), "{serial}");
    let ((bytes_in, digest), g2h_took) = g2h.join().unwrap().expect("guest->host stream");
    assert_eq!(bytes_in, SIZE);
    assert_eq!(out.line("SHA g2h "), Some(digest.as_str()), "guest->host");
    let (sent, h2g_took) = h2g.join().unwrap().expect("host->guest stream");
    assert_eq!(out.line("SHA h2g "), Some(sent.as_str()), "host->guest");
    eprintln!(
        "tx_buffer_size({bytes}): guest->host {:.1} MB/s, host->guest {:.1} MB/s",
        SIZE as f64 / g2h_took.as_secs_f64() / 1e6,
        SIZE as f64 / h2g_took.as_secs_f64() / 1e6
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

const SEQPACKET_CHECKS: &str = include_str!("../guest/seqpacket.sh");
const SEQPACKET_OFF: &str = include_str!("../guest/seqpacket-off.sh");
/// What the `sizes` check sends, as `tests/guest-seq` does.
const SEQ_SIZES: [usize; 6] = [1, 3732, 3733, 65536, 65537, 262_144];

/// The guest helper's pattern (`tests/guest-seq`).
fn seq_pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 * 31 + seed * 7919) % 251) as u8)
        .collect()
}

/// A seqpacket host service at `path`, polled so that [`guest::accept`] can give up.
fn seq_listen(path: &std::path::Path) -> std::os::unix::net::UnixListener {
    let l = vsock_host::bind_listener(path, vsock_core::wire::SocketType::SeqPacket)
        .expect("bind a seqpacket listener");
    l.set_nonblocking(true).unwrap();
    l
}

/// Room in a host seqpacket socket for a message of the guest's whole buffer.
fn seq_room(s: &UnixStream) {
    socket2::SockRef::from(s)
        .set_send_buffer_size(vsock_host::seqpacket_send_buffer(300_000))
        .unwrap();
}

/// Sends one message, whole (a seqpacket send is atomic).
fn seq_send(mut s: &UnixStream, msg: &[u8]) -> Option<()> {
    (s.write(msg).ok()? == msg.len()).then_some(())
}

/// One message (empty at end of file).
fn seq_recv(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 400_000];
    let n = vsock_tests::read_seqpacket(s, &mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// One message and its `MSG_TRUNC`, read into `room` bytes with `MSG_TRUNC` as a flag: the
/// real length.
fn seq_recv_trunc(s: &UnixStream, room: usize) -> Option<(usize, bool)> {
    let mut buf = vec![std::mem::MaybeUninit::<u8>::uninit(); room];
    let mut bufs = [socket2::MaybeUninitSlice::new(&mut buf)];
    let mut msg = socket2::MsgHdrMut::new().with_buffers(&mut bufs);
    let n = socket2::SockRef::from(s)
        .recvmsg(&mut msg, libc::MSG_TRUNC)
        .ok()?;
    Some((n, msg.flags().is_truncated()))
}

/// Echoes each message of the next client of `l` until its end of file; returns the sizes.
fn seq_echo(l: std::os::unix::net::UnixListener, stop: &AtomicBool) -> Option<Vec<usize>> {
    let mut s = guest::accept(&l, stop)?;
    seq_room(&s);
    let mut sizes = Vec::new();
    loop {
        let m = seq_recv(&mut s)?;
        if m.is_empty() {
            break;
        }
        sizes.push(m.len());
        if s.write(&m).ok()? != m.len() {
            return None;
        }
    }
    s.shutdown(Shutdown::Write).ok()?;
    Some(sizes)
}

/// A seqpacket client of `<uds_path>_seqpacket` for guest port `port`, retried until the
/// guest listens: the `CONNECT` line and the `OK` are one message each.
fn seq_connect(uds: &std::path::Path, port: u32, stop: &AtomicBool) -> Option<UnixStream> {
    let mut path = uds.as_os_str().to_owned();
    path.push("_seqpacket");
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = vsock_host::connect_unix(
            std::path::Path::new(&path),
            vsock_core::wire::SocketType::SeqPacket,
        ) {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            seq_room(&s);
            let line = format!("CONNECT {port}\n");
            if s.write(line.as_bytes()).ok() == Some(line.len()) {
                if let Some(ok) = seq_recv(&mut s) {
                    if ok.starts_with(b"OK ") && ok.ends_with(b"\n") {
                        return Some(s);
                    }
                }
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    None
}

/// SOCK_SEQPACKET between the real guest and host Unix seqpacket sockets, through the daemon:
/// messages of every size each way, 10,000 echoed messages of varied sizes, a host client of
/// `<uds_path>_seqpacket`, a stream service where the guest connects seqpacket, and the
/// cases of Linux's vsock_test that apply to a host peer (message bounds, MSG_TRUNC, a read
/// timeout, an invalid receive buffer).
fn seqpacket_checks(runtime: &str) {
    let image = Image::require();
    let helper = guest::seqpacket_helper();
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
    let stop = Arc::new(AtomicBool::new(false));
    let uds = daemon.uds.clone();

    let l = seq_listen(&daemon.port_path(6001));
    let sizes = peer(&stop, move |stop| seq_echo(l, stop));
    let l = seq_listen(&daemon.port_path(6002));
    let echo = peer(&stop, move |stop| seq_echo(l, stop));
    let u = uds.clone();
    let serve = peer(&stop, move |stop| {
        let mut c = seq_connect(&u, 6003, stop)?;
        let mut whole = true;
        for (i, &n) in SEQ_SIZES[..5].iter().enumerate() {
            let m = seq_pattern(100 + i as u64, n);
            if c.write(&m).ok()? != n {
                return None;
            }
            whole &= seq_recv(&mut c)? == m;
        }
        c.shutdown(Shutdown::Write).ok()?;
        Some((whole, seq_recv(&mut c)?.is_empty()))
    });
    // A stream service where the guest connects seqpacket.
    let _stream = guest::listen(&daemon.port_path(6004));
    let l = seq_listen(&daemon.port_path(6005));
    let bounds = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let lens: Vec<usize> = (0..7)
            .map_while(|_| seq_recv(&mut s).map(|m| m.len()))
            .collect();
        for i in 0..7u8 {
            seq_send(&s, &[i])?;
        }
        Some(lens)
    });
    let l = seq_listen(&daemon.port_path(6006));
    let trunc = peer(&stop, move |stop| {
        let s = guest::accept(&l, stop)?;
        let got = seq_recv_trunc(&s, 16)?;
        seq_send(&s, &[b'y'; 32])?;
        Some(got)
    });
    let l = seq_listen(&daemon.port_path(6007));
    let timeout = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let done = seq_recv(&mut s)?;
        seq_send(&s, b"ok")?;
        Some(done)
    });
    let l = seq_listen(&daemon.port_path(6008));
    let badbuf = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        seq_send(&s, &[b'a'; 12288])?;
        seq_send(&s, &[b'b'; 12288])?;
        seq_recv(&mut s)
    });

    let l = seq_listen(&daemon.port_path(6010));
    let big = peer(&stop, move |stop| {
        let s = guest::accept(&l, stop)?;
        seq_room(&s);
        for i in 0..20u64 {
            // As tests/guest-seq's big_size: 62 buffers' worth, then more than 66.
            let n = if i % 2 == 0 { 62 * 3732 } else { 250_000 };
            seq_send(&s, &seq_pattern(1000 + i, n))?;
        }
        Some(())
    });

    let vm = Vm::boot_with(
        &image,
        &daemon.socket,
        SEQPACKET_CHECKS,
        &[("vsock-seq-guest", &helper)],
    );
    let out = vm.wait(Duration::from_secs(900));
    stop.store(true, Ordering::Relaxed);
    let serial = &out.serial;
    assert_eq!(out.status, Some(0), "the guest script failed:\n{serial}");
    assert!(out.line("SEQ-DONE").is_some(), "unfinished:\n{serial}");
    assert!(out.line("FAIL").is_none(), "{serial}");
    // Bit 1 (SEQPACKET) offered and negotiated.
    assert_eq!(out.line("SEQ features "), Some("bits=010"), "{serial}");

    // Every size each way, and one byte over the host's buffer refused in the guest (ENOMEM).
    let line = out.line("SEQ sizes ").expect("sizes");
    assert_eq!(field(line, "enomem"), Some("12"), "{line}");
    assert_eq!(
        field(line, "got"),
        Some("1,3732,3733,65536,65537,262144"),
        "{line}"
    );
    assert_eq!(field(line, "whole"), Some("1"), "{line}");
    assert_eq!(sizes.join().unwrap(), Some(SEQ_SIZES.to_vec()));
    // 10,000 messages, each echoed whole.
    let line = out.line("SEQ echo ").expect("echo");
    assert_eq!(field(line, "ok"), Some("10000"), "{line}");
    assert_eq!(echo.join().unwrap().map(|s| s.len()), Some(10_000));
    // The host client of <uds_path>_seqpacket, echoed by the guest, then end of file.
    assert_eq!(out.line("SEQ serve "), Some("messages=5"), "{serial}");
    assert_eq!(serve.join().unwrap(), Some((true, true)));
    // A stream service at the port: the guest's seqpacket connect is reset at once.
    let line = out.line("SEQ wrongtype ").expect("wrongtype");
    assert_eq!(field(line, "errno"), Some("104"), "ECONNRESET: {line}");
    let ms: u64 = field(line, "ms").unwrap().parse().unwrap();
    assert!(ms < 1000, "the reset took {ms} ms: {line}");
    // vsock_test "msg bounds": seven one-byte messages each way. The host reads seven
    // messages; the guest too, with no MSG_EOR: a Unix socket cannot carry records.
    assert_eq!(bounds.join().unwrap(), Some(vec![1; 7]));
    assert_eq!(
        out.line("SEQ bounds "),
        Some("lens=1,1,1,1,1,1,1 eor=none"),
        "{serial}"
    );
    // vsock_test "MSG_TRUNC flag", both ways.
    assert_eq!(trunc.join().unwrap(), Some((32, true)));
    assert_eq!(out.line("SEQ trunc "), Some("ret=32 flag=1"), "{serial}");
    // vsock_test "timeout": EAGAIN after about 1 s, and the connection still works.
    let line = out.line("SEQ timeout ").expect("timeout");
    assert_eq!(field(line, "errno"), Some("11"), "{line}");
    let ms: u64 = field(line, "ms").unwrap().parse().unwrap();
    assert!((900..2500).contains(&ms), "{line}");
    assert_eq!(field(line, "after"), Some("ok"), "{line}");
    assert_eq!(timeout.join().unwrap().as_deref(), Some(&b"done"[..]));
    // vsock_test "invalid receive buffer": ENOMEM, the message gone, the next one whole.
    assert_eq!(
        out.line("SEQ badbuf "),
        Some("first=12 second=12288 all_b=1"),
        "{serial}"
    );
    let _ = badbuf.join();
    // Twenty big messages, every other one needing more rx buffers than the guest keeps
    // posted then: the device stages their tails.
    assert_eq!(out.line("SEQ big "), Some("ok=20"), "{serial}");
    assert_eq!(big.join().unwrap(), Some(()));

    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
    if let Some(staged) = log
        .split("rx_message_staged: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
    {
        eprintln!("messages staged: {staged}");
    }
}

/// `--seqpacket off`: the guest is not offered the bit, and its seqpacket connect fails at
/// once with ESOCKTNOSUPPORT.
fn seqpacket_off() {
    let image = Image::require();
    let helper = guest::seqpacket_helper();
    let _turn = guest::exclusive();
    let daemon = Daemon::start_flags(&image, "mio", &["--seqpacket", "off"]);
    let vm = Vm::boot_with(
        &image,
        &daemon.socket,
        SEQPACKET_OFF,
        &[("vsock-seq-guest", &helper)],
    );
    let out = vm.wait(Duration::from_secs(300));
    let serial = &out.serial;
    assert_eq!(out.status, Some(0), "{serial}");
    assert_eq!(out.line("SEQ features "), Some("bits=000"), "{serial}");
    assert_eq!(out.line("SEQ nosupport "), Some("errno=94"), "{serial}");
    assert!(
        !{
            let mut p = daemon.uds.as_os_str().to_owned();
            p.push("_seqpacket");
            std::path::PathBuf::from(p)
        }
        .exists(),
        "no seqpacket listener with --seqpacket off"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
}

#[test]
// Ignored only where tests/build.rs found no guest image or QEMU; `./scripts/test.sh` (CI's
// command) provides both and sets VSOCK_REQUIRE_GUEST=1, so there it runs, and a missing
// part fails it.
#[cfg_attr(
    not(vsock_guest),
    // Why: no guest image or QEMU on this machine. How it still runs: ./scripts/test.sh
    // (the README's test command, and CI's) builds both and sets VSOCK_REQUIRE_GUEST=1.
    ignore = "no guest image or QEMU; ./scripts/test.sh (CI) provides both and runs it"
)]
fn seqpacket_off_on_mio() {
    seqpacket_off();
}

/// One `--tx-buffer-size` test per size.
macro_rules! for_each_buffer_size {
    ($($name:ident: $bytes:expr),* $(,)?) => {
        $(
            #[test]
            // Ignored only where tests/build.rs found no guest image or QEMU, which a plain
            // `cargo test` on a bare machine lacks. They still run: `./scripts/test.sh` (what
            // CI runs through `.ci/run`) builds the image, installs QEMU and sets
            // VSOCK_REQUIRE_GUEST=1, under which a missing part fails the test instead.
            #[cfg_attr(
                not(vsock_guest),
                // Why: no guest image or QEMU on this machine. How it still runs: ./scripts/test.sh
                // (the README's test command, and CI's) builds both and sets VSOCK_REQUIRE_GUEST=1.
                ignore = "no guest image or QEMU; ./scripts/test.sh (CI) provides both and runs it"
            )]
            fn $name() {
                tx_buffer_size($bytes);
            }
        )*
    };
}

for_each_buffer_size!(
    tx_buffer_size_32768: 32 * 1024,
    tx_buffer_size_65536: 64 * 1024,
    tx_buffer_size_1048576: 1024 * 1024,
);

/// Asks the daemon's stats socket for `path` over HTTP; returns the body of a 200 answer.
fn stats_get(socket: &std::path::Path, path: &str) -> String {
    let mut s = UnixStream::connect(socket).expect("connect to the stats socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a length")
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length");
    body.to_string()
}

/// The guest's connection to host port `port`, from the stats' JSON.
fn stats_conn(json: &serde_json::Value, port: u64) -> Option<serde_json::Value> {
    json["vms"][0]["connections"]
        .as_array()?
        .iter()
        .find(|c| c["host_port"] == port && c["origin"] == "guest")
        .cloned()
}

/// The value of the Prometheus sample whose line starts with `prefix` (name and labels up
/// to some point), checking the whole text's shape on the way.
fn prometheus_sample(text: &str, name: &str, label: &str) -> Option<u64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            assert!(
                line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "{line}"
            );
            continue;
        }
        // name{labels} value
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: u64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let (metric, labels) = series.split_once('{').unwrap_or_else(|| panic!("{line}"));
        assert!(labels.ends_with('}'), "{line}");
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if metric == name && labels.contains(label) {
            found = Some(value);
        }
    }
    found
}

/// Live counters read during a transfer: the stats socket's JSON and Prometheus answers show
/// the guest's connection established with its bytes growing, SIGUSR1 logs the same, and
/// the totals match once it ends.
fn live_stats(runtime: &str) {
    const TOTAL: u64 = 32 * MIB;
    let image = Image::require();
    let _turn = guest::exclusive();
    let stats = std::env::temp_dir().join(format!("vsock-stats-{}-{runtime}", std::process::id()));
    let stats_flag = stats.to_string_lossy().into_owned();
    let mut daemon = Daemon::start_flags(&image, runtime, &["--stats", &stats_flag]);
    let stop = Arc::new(AtomicBool::new(false));
    // The host side reads 8 MiB, then holds the rest back until the test has looked twice.
    let (paused, is_paused) = mpsc::channel();
    let (go, going) = mpsc::channel::<()>();
    let l = guest::listen(&daemon.port_path(5001));
    let reader = peer(&stop, move |stop| {
        let mut s = guest::accept(&l, stop)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        let mut held = false;
        loop {
            if !held && total >= 8 * MIB {
                held = true;
                paused.send(total).ok()?;
                going.recv().ok()?;
            }
            match s.read(&mut buf) {
                Ok(0) => return Some(total),
                Ok(n) => total += n as u64,
                Err(_) => return None,
            }
        }
    });
    let vm = Vm::boot(
        &image,
        &daemon.socket,
        &format!(
            "head -c {TOTAL} /dev/zero | socat -u - VSOCK-CONNECT:2:5001
echo SENT
"
        ),
    );
    let read_so_far = is_paused
        .recv_timeout(Duration::from_secs(180))
        .expect("the transfer never reached 8 MiB");

    // Mid-transfer: the connection is there, established, with at least what was read.
    let first: serde_json::Value =
        serde_json::from_str(&stats_get(&stats, "/")).expect("the stats are JSON");
    let vm0 = &first["vms"][0];
    assert_eq!(vm0["guest_cid"], 3);
    assert_eq!(vm0["answered"], true);
    assert_eq!(vm0["activated"], true);
    let conn = stats_conn(&first, 5001).unwrap_or_else(|| panic!("no connection: {first}"));
    assert_eq!(conn["state"], "established", "{conn}");
    assert_eq!(conn["type"], "stream");
    assert_eq!(conn["peer_cid"], 2);
    let written = conn["host_written"].as_u64().unwrap();
    assert!(written >= read_so_far, "{written} < {read_so_far}: {conn}");
    assert!(conn["guest_bytes"].as_u64().unwrap() >= written, "{conn}");
    assert!(vm0["engine"]["tx_bytes"].as_u64().unwrap() >= written);
    assert!(vm0["device"]["tx_chains"].as_u64().unwrap() > 0);
    assert!(vm0["host"]["connects"].as_u64().unwrap() >= 1);

    let metrics = stats_get(&stats, "/metrics");
    let label = "host_port=\"5001\"";
    let bytes = prometheus_sample(&metrics, "vsock_connection_host_written_total", label)
        .unwrap_or_else(|| panic!("no connection sample:\n{metrics}"));
    assert!(bytes >= written, "{bytes} < {written}");
    assert_eq!(
        prometheus_sample(&metrics, "vsock_vm_activated", "guest_cid=\"3\""),
        Some(1)
    );
    assert_eq!(
        prometheus_sample(&metrics, "vsock_connections", "state=\"established\""),
        Some(1),
        "{metrics}"
    );

    // The sandbox is on every thread of the serving daemon: the seccomp filters (the
    // allow-list and the clone3 one) and no_new_privs.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let value = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(value("Seccomp:").as_deref(), Some("2"), "{status}");
        assert_eq!(value("Seccomp_filters:").as_deref(), Some("2"), "{status}");
        assert_eq!(value("NoNewPrivs:").as_deref(), Some("1"), "{status}");
        threads += 1;
    }
    // Main, loop, frontend listener, the frontend's worker, stats.
    assert!(threads >= 5, "{threads} threads");

    // SIGUSR1 logs the same document, and the daemon goes on.
    let pid = daemon.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-USR1", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains("\"host_port\":5001") {
        assert!(
            Instant::now() < deadline,
            "SIGUSR1 logged nothing:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(daemon.running());

    // The rest flows; the counters grow to the whole transfer.
    go.send(()).unwrap();
    let out = vm.wait(Duration::from_secs(300));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(out.status, Some(0), "{}", out.serial);
    assert_eq!(reader.join().unwrap(), Some(TOTAL));
    let last: serde_json::Value = serde_json::from_str(&stats_get(&stats, "/stats")).unwrap();
    let engine = &last["vms"][0]["engine"];
    assert!(engine["tx_bytes"].as_u64().unwrap() >= TOTAL, "{engine}");
    assert!(
        engine["tx_bytes"].as_u64().unwrap()
            > first["vms"][0]["engine"]["tx_bytes"].as_u64().unwrap()
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
    assert!(!stats.exists(), "the stats socket was left behind");
}

/// The daemon's file system is confined to its sockets' directories: a guest connect to a
/// port whose `<uds_path>_P` is a symbolic link to a listener outside them is reset, and
/// the listener never hears of it, while a link to one inside works. With `--sandbox=off`
/// the same outside link is followed (so the test can tell).
fn sandbox_confines_connects(sandbox: &str) -> (bool, Option<String>) {
    let image = Image::require();
    let _turn = guest::exclusive();
    let daemon = Daemon::start_flags(&image, "mio", &["--sandbox", sandbox]);
    let outside =
        std::env::temp_dir().join(format!("vsock-outside-{}-{sandbox}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let far = guest::listen(&outside.join("far.sock"));
    let inside = daemon.uds.with_file_name("near.sock");
    let near = guest::listen(&inside);
    std::os::unix::fs::symlink(outside.join("far.sock"), daemon.port_path(5003)).unwrap();
    std::os::unix::fs::symlink(&inside, daemon.port_path(5004)).unwrap();
    let reached = peer(&stop, move |stop| guest::accept(&far, stop).is_some());
    let echoed = peer(&stop, move |stop| {
        let mut s = guest::accept(&near, stop)?;
        let mut line = String::new();
        s.read_to_string(&mut line).ok()?;
        Some(line)
    });
    let vm = Vm::boot(
        &image,
        &daemon.socket,
        "echo far | socat -t 5 - VSOCK-CONNECT:2:5003; echo \"FAR $?\"\n\
         echo near | socat -t 5 - VSOCK-CONNECT:2:5004; echo \"NEAR $?\"\n",
    );
    let out = vm.wait(Duration::from_secs(120));
    assert_eq!(out.status, Some(0), "{}", out.serial);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let far_reached = reached.join().unwrap();
    let near_line = echoed.join().unwrap();
    let (status, log) = daemon.terminate();
    assert!(status.success(), "daemon exit {status}:\n{log}");
    let _ = std::fs::remove_dir_all(&outside);
    if !far_reached {
        assert_ne!(out.line("FAR "), Some("0"), "{}", out.serial);
        assert!(log.contains("connect_failures: 1"), "{log}");
    }
    (far_reached, near_line)
}

#[test]
// Ignored only where tests/build.rs found no guest image or QEMU; `./scripts/test.sh` (CI's
// command) provides both and sets VSOCK_REQUIRE_GUEST=1, so there it runs, and a missing
// part fails it.
#[cfg_attr(
    not(vsock_guest),
    // Why: no guest image or QEMU on this machine. How it still runs: ./scripts/test.sh
    // (the README's test command, and CI's) builds both and sets VSOCK_REQUIRE_GUEST=1.
    ignore = "no guest image or QEMU; ./scripts/test.sh (CI) provides both and runs it"
)]
fn sandbox_confines_connects_to_the_sockets_directories() {
    let (far, near) = sandbox_confines_connects("on");
    assert!(
        !far,
        "the sandboxed daemon followed a link out of its directories"
    );
    assert_eq!(near.as_deref(), Some("near\n"));
    let (far, near) = sandbox_confines_connects("off");
    assert!(
        far,
        "without the sandbox the link is followed (or the test proves nothing)"
    );
    assert_eq!(near.as_deref(), Some("near\n"));
}

vsock_tests::on_each_runtime!(
    live_stats,
    all_checks,
    guest_killed,
    recorded_trace,
    paused_vm,
    sigterm_resets_the_guest,
    no_vm_attached,
    reply_then_close,
    connect_storm,
    slow_clients_then_one,
    seqpacket_checks,
);
