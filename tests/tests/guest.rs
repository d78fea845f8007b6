//! The real Linux guest as the judge: the `vhost-user-vsock` daemon on each runtime, a Debian
//! guest under QEMU, and its in-kernel virtio-vsock driver. One guest boot runs every check of
//! `tests/guest/checks.sh` while the test plays the host side; a second test kills a guest
//! mid-transfer and has the same daemon serve the next one.
//!
//! These tests skip (saying so) when QEMU, the guest image or the release daemon is missing,
//! unless `VSOCK_REQUIRE_GUEST=1`; `scripts/test.sh` provides all three and sets it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

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
    let name = format!("all_checks_{runtime}");
    let Some(image) = Image::or_skip(&name) else {
        return;
    };
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
    let name = format!("guest_killed_{runtime}");
    let Some(image) = Image::or_skip(&name) else {
        return;
    };
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
    let name = format!("recorded_trace_{runtime}");
    let Some(image) = Image::or_skip(&name) else {
        return;
    };
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
    let name = format!("paused_vm_{runtime}");
    let Some(image) = Image::or_skip(&name) else {
        return;
    };
    let _turn = guest::exclusive();
    let daemon = Daemon::start(&image, runtime);
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
}

/// SIGTERM while the guest holds a connection: the daemon exits cleanly, and the guest's
/// reader learns of the end (the RST the shutdown sends) instead of waiting forever.
fn sigterm_resets_the_guest(runtime: &str) {
    let name = format!("sigterm_resets_the_guest_{runtime}");
    let Some(image) = Image::or_skip(&name) else {
        return;
    };
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

macro_rules! on_each_runtime {
    ($($check:ident),* $(,)?) => {
        mod mio { $( #[test] fn $check() { super::$check("mio") } )* }
        mod tokio { $( #[test] fn $check() { super::$check("tokio") } )* }
        mod smol { $( #[test] fn $check() { super::$check("smol") } )* }
    };
}

on_each_runtime!(
    all_checks,
    guest_killed,
    recorded_trace,
    paused_vm,
    sigterm_resets_the_guest
);
