//! Part 4, connection set-up rate: connections opened and closed one after another through
//! the device, against `connect` + `accept` on a Unix socket between two threads, measured in
//! the same repetition.
//!
//! - guest to host: the guest sends REQUEST and sleeps until the RESPONSE, then resets the
//!   connection (its RST goes out with the next REQUEST); the host peer accepts and closes;
//! - host to guest: a host client connects to `<uds_path>`, writes `CONNECT <port>\n`, reads
//!   `OK <port>\n` and closes; the guest listens, answers the REQUEST, and resets when the
//!   host side shuts down;
//! - baseline: a thread connects and closes, another accepts and closes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::{Guest, State};
use crate::parts::relay::PORT;
use crate::rig::{bench_config, Device, Runtime, TempDir};
use crate::{median, progress, spread, Opts, Placement, Report};

const WARM: u64 = 100;

/// Accepts `n` connections and closes each at once, on a thread placed as `measured` says.
fn acceptor(listener: UnixListener, n: u64, measured: bool) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        if measured {
            Placement::place_measured(0);
        } else {
            Placement::place_peer();
        }
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        }
    })
}

/// Connections per second, `connect` + `accept` between two threads.
pub fn raw(n: u64) -> f64 {
    let dir = TempDir::new("setup");
    let path = dir.path().join("raw");
    let peer = acceptor(UnixListener::bind(&path).expect("bind"), WARM + n, true);
    Placement::place_peer();
    let mut start = Instant::now();
    for i in 0..WARM + n {
        if i == WARM {
            start = Instant::now();
        }
        drop(UnixStream::connect(&path).expect("connect"));
    }
    let secs = start.elapsed().as_secs_f64();
    peer.join().expect("acceptor");
    n as f64 / secs
}

/// Connections per second, guest to host through the device on `rt`.
pub fn guest_to_host(rt: Runtime, n: u64) -> f64 {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let peer = acceptor(
        UnixListener::bind(dev.port_path(PORT)).expect("bind"),
        WARM + n,
        false,
    );
    let mut start = Instant::now();
    for i in 0..WARM + n {
        if i == WARM {
            start = Instant::now();
        }
        let id = guest.connect(PORT);
        guest.run_until("a RESPONSE", Duration::from_secs(10), |g| {
            g.conns[id].state != State::Connecting
        });
        assert_eq!(guest.conns[id].state, State::Established, "connection {i}");
        guest.rst(id);
        guest.forget(id);
    }
    let secs = start.elapsed().as_secs_f64();
    guest.step();
    peer.join().expect("acceptor");
    let fin = dev.stop();
    assert_eq!(fin.engine.established, WARM + n, "{fin:?}");
    n as f64 / secs
}

/// Connections per second, host to guest (`CONNECT` line) through the device on `rt`.
pub fn host_to_guest(rt: Runtime, n: u64) -> f64 {
    let mut guest = Guest::new();
    guest.listen(PORT);
    let dev = Device::start(rt, bench_config(), &mut guest);
    let path = dev.listener_path();
    let done = Arc::new(AtomicU64::new(0));
    let counted = done.clone();
    let client = thread::spawn(move || {
        Placement::place_peer();
        let mut start = Instant::now();
        let line = format!("CONNECT {PORT}\n");
        let mut ok = String::new();
        for i in 0..WARM + n {
            if i == WARM {
                start = Instant::now();
            }
            let mut s = UnixStream::connect(&path).expect("connect");
            s.write_all(line.as_bytes()).expect("CONNECT");
            let mut r = BufReader::new(s);
            ok.clear();
            r.read_line(&mut ok).expect("OK line");
            assert!(ok.starts_with("OK "), "reply {ok:?}");
            counted.fetch_add(1, Ordering::Release);
        }
        n as f64 / start.elapsed().as_secs_f64()
    });
    guest.run_until("every host connection", Duration::from_secs(600), |_| {
        done.load(Ordering::Acquire) == WARM + n
    });
    let rate = client.join().expect("client");
    // The last closes reach the guest; then stop.
    guest.run_until("the last closes", Duration::from_secs(10), |g| {
        g.conns.iter().all(|c| c.state == State::Closed)
    });
    dev.stop();
    rate
}

/// Connections per second, guest to host through the device on `rt`, `batch` at a time: the
/// guest sends `batch` REQUESTs, waits for every RESPONSE, and resets them all.
pub fn guest_to_host_batched(rt: Runtime, n: u64, batch: u64) -> f64 {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let rounds = n.div_ceil(batch);
    let warm_rounds = WARM.div_ceil(batch);
    let peer = acceptor(
        UnixListener::bind(dev.port_path(PORT)).expect("bind"),
        (warm_rounds + rounds) * batch,
        false,
    );
    let mut start = Instant::now();
    for round in 0..warm_rounds + rounds {
        if round == warm_rounds {
            start = Instant::now();
        }
        let ids: Vec<usize> = (0..batch).map(|_| guest.connect(PORT)).collect();
        guest.run_until("the RESPONSEs", Duration::from_secs(10), |g| {
            ids.iter().all(|&id| g.conns[id].state != State::Connecting)
        });
        for &id in &ids {
            assert_eq!(guest.conns[id].state, State::Established, "round {round}");
            guest.rst(id);
            guest.forget(id);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    guest.step();
    peer.join().expect("acceptor");
    dev.stop();
    (rounds * batch) as f64 / secs
}

/// Concurrent connects of the batched measurement.
const BATCH: u64 = 32;

/// Part 4: set-up rate.
pub fn run(opts: &Opts) {
    let report = Report::new("setup");
    let n: u64 = if opts.quick { 2000 } else { 10_000 };
    let mut raws = Vec::new();
    // Per runtime: one at a time guest to host, batched guest to host, host to guest.
    let mut rates: Vec<[Vec<f64>; 3]> = opts.runtimes.iter().map(|_| Default::default()).collect();
    for rep in 0..opts.reps {
        raws.push(raw(n));
        for (i, &rt) in opts.runtimes.iter().enumerate() {
            let r = [
                guest_to_host(rt, n),
                guest_to_host_batched(rt, n, BATCH),
                host_to_guest(rt, n),
            ];
            progress(&format!(
                "setup rep {rep} {}: guest {:.0}/s, guest x{BATCH} {:.0}/s, host {:.0}/s, raw {:.0}/s",
                rt.name(),
                r[0],
                r[1],
                r[2],
                raws[rep]
            ));
            for (k, v) in r.into_iter().enumerate() {
                rates[i][k].push(v);
            }
        }
    }
    report.row(
        "raw_conn_per_s",
        median(&raws),
        "conn/s",
        "baseline: connect+close, accept+close, two threads",
    );
    let mut target = None;
    for (i, &rt) in opts.runtimes.iter().enumerate() {
        let r = rt.name();
        let kinds = [
            (
                "guest",
                "guest REQUEST -> RESPONSE, then RST; one at a time".to_string(),
            ),
            (
                "guest_batch",
                format!("guest: {BATCH} REQUESTs, every RESPONSE, {BATCH} RSTs"),
            ),
            (
                "host",
                "host CONNECT line -> guest RESPONSE -> OK line, then close; one at a time"
                    .to_string(),
            ),
        ];
        for (k, (kind, what)) in kinds.iter().enumerate() {
            let ratios: Vec<f64> = rates[i][k].iter().zip(&raws).map(|(d, b)| d / b).collect();
            report.row(
                &format!("{kind}_{r}_conn_per_s"),
                median(&rates[i][k]),
                "conn/s",
                what,
            );
            report.row(
                &format!("{kind}_{r}_ratio"),
                median(&ratios),
                "x raw",
                &format!("device / raw, each repetition; {}", spread(&ratios)),
            );
            if k == 0 && (rt == Runtime::Mio || target.is_none()) {
                target = Some((rt, median(&ratios)));
            }
        }
    }
    if let Some((rt, ratio)) = target {
        report.target(
            "setup_rate_ratio",
            ratio,
            &format!(
                "{}: guest connections/s (one at a time) / raw connect+accept",
                rt.name()
            ),
        );
    }
}
