//! Part 3: one-byte ping-pong through the device on each runtime (the guest sends a byte, the
//! host peer echoes it, the guest sleeps on its rx interrupt until the echo is in), against
//! a one-byte ping-pong between two threads over a Unix socketpair, measured right before.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::{Guest, State};
use crate::parts::relay::PORT;
use crate::rig::{bench_config, Device, Runtime};
use crate::sys::{gettid, Measured, Window};
use crate::{median, progress, spread, Opts, Placement, Report};

const WARM: usize = 200;

fn echo(mut s: UnixStream) {
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if s.write_all(&b).is_err() {
                    return;
                }
            }
        }
    }
}

/// One ping-pong run: the median round trip, and what the measured thread (the device's, or
/// the raw echo thread) did per round trip.
pub struct Pings {
    /// Median round trip, microseconds.
    pub rtt_us: f64,
    /// The measured thread's CPU time per round trip, microseconds.
    pub cpu_us: f64,
    /// Its wake-ups per round trip.
    pub wakes: f64,
    /// Its system calls per round trip (NaN if not counted).
    pub syscalls: f64,
}

impl Pings {
    fn of(rtts: &[f64], m: &Measured) -> Pings {
        let n = rtts.len() as u64;
        Pings {
            rtt_us: median(rtts),
            cpu_us: m.threads.cpu_ns as f64 / 1000.0 / n as f64,
            wakes: m.wakes_per(n),
            syscalls: m.syscalls_per(n),
        }
    }
}

/// `n` raw ping-pongs.
pub fn raw(n: usize) -> Pings {
    let (a, b) = UnixStream::pair().expect("socketpair");
    // The echo side stands where the device's thread would.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let peer = thread::spawn(move || {
        Placement::place_measured(0);
        tid_tx.send(gettid()).expect("main waits");
        echo(b)
    });
    let tid = tid_rx.recv().expect("echo thread's id");
    let pings = ping(a, tid, n);
    peer.join().expect("echo");
    pings
}

/// `n` one-byte round trips over `a` (after the warm-up), with thread `tid` measured; closes
/// `a`, so the far side ends.
fn ping(mut a: UnixStream, tid: i32, n: usize) -> Pings {
    Placement::place_peer();
    let mut rtts = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    let mut w = None;
    for i in 0..WARM + n {
        if i == WARM {
            w = Some(Window::open(&[tid]));
        }
        let t = Instant::now();
        a.write_all(&[i as u8]).expect("write");
        a.read_exact(&mut byte).expect("read");
        if i >= WARM {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    let m = w.expect("warmed up").close();
    drop(a);
    Pings::of(&rtts, &m)
}

/// `n` raw ping-pongs through a relay: the ping goes to a relay thread (where the device's
/// thread would stand), which passes it to the echo thread and the echo back, over two
/// socketpairs, with blocking reads. The four hand-offs of the device's round trip, with
/// nothing else: the floor any relay, the device included, stands on.
pub fn relayed(n: usize) -> Pings {
    let (a, mut ra) = UnixStream::pair().expect("socketpair");
    let (mut rb, b) = UnixStream::pair().expect("socketpair");
    let echo_peer = thread::spawn(move || {
        Placement::place_peer();
        echo(b)
    });
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let relay = thread::spawn(move || {
        Placement::place_measured(0);
        tid_tx.send(gettid()).expect("main waits");
        let mut byte = [0u8; 1];
        loop {
            match ra.read(&mut byte) {
                Ok(1) => {}
                _ => return,
            }
            if rb.write_all(&byte).is_err() || rb.read_exact(&mut byte).is_err() {
                return;
            }
            if ra.write_all(&byte).is_err() {
                return;
            }
        }
    });
    let tid = tid_rx.recv().expect("relay thread's id");
    let pings = ping(a, tid, n);
    relay.join().expect("relay");
    echo_peer.join().expect("echo");
    pings
}

/// `n` ping-pongs through the device on `rt`.
pub fn device(rt: Runtime, n: usize) -> Pings {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let peer = thread::spawn(move || {
        Placement::place_peer();
        echo(listener.accept().expect("accept").0)
    });
    let id = guest.connect_wait(PORT);
    let mut rtts = Vec::with_capacity(n);
    let mut w = None;
    for i in 0..WARM + n {
        if i == WARM {
            w = Some(Window::open(dev.tids()));
        }
        let t = Instant::now();
        guest.send(id, 1, 1);
        let want = i as u64 + 1;
        guest.run_until("the echo", Duration::from_secs(10), |g| {
            g.conns[id].received >= want || g.conns[id].state == State::Closed
        });
        assert_eq!(guest.conns[id].received, want, "echo {i}");
        if i >= WARM {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    let m = w.expect("warmed up").close();
    guest.rst(id);
    guest.step();
    let fin = dev.stop();
    peer.join().expect("echo");
    assert_eq!(fin.engine.credit_violation, 0);
    Pings::of(&rtts, &m)
}

/// Part 3: the placement in force (the target's), then the other two for the table.
pub fn run(opts: &Opts) {
    let report = Report::new("latency");
    let n = if opts.quick { 2000 } else { 10_000 };
    let chosen = Placement::current();
    let mut order = vec![chosen];
    order.extend(
        [Placement::Split, Placement::One, Placement::Free]
            .into_iter()
            .filter(|&p| p != chosen),
    );
    for placement in order {
        placement.set();
        let p = placement.name();
        let mut raw_runs = Vec::new();
        let mut relay_runs = Vec::new();
        let mut dev_runs: Vec<Vec<Pings>> = opts.runtimes.iter().map(|_| Vec::new()).collect();
        for rep in 0..opts.reps {
            raw_runs.push(raw(n));
            relay_runs.push(relayed(n));
            for (i, &rt) in opts.runtimes.iter().enumerate() {
                let d = device(rt, n);
                progress(&format!(
                    "latency {p} rep {rep} {}: {:.1} us, raw {:.1} us",
                    rt.name(),
                    d.rtt_us,
                    raw_runs[rep].rtt_us
                ));
                dev_runs[i].push(d);
            }
        }
        let raws: Vec<f64> = raw_runs.iter().map(|r| r.rtt_us).collect();
        let relays: Vec<f64> = relay_runs.iter().map(|r| r.rtt_us).collect();
        let devs: Vec<Vec<f64>> = dev_runs
            .iter()
            .map(|runs| runs.iter().map(|r| r.rtt_us).collect())
            .collect();
        if placement == chosen {
            per_rtt(
                &report,
                &format!("{p}_raw"),
                "the raw echo thread",
                &raw_runs,
            );
            per_rtt(
                &report,
                &format!("{p}_relay"),
                "the raw relay thread",
                &relay_runs,
            );
            for (i, &rt) in opts.runtimes.iter().enumerate() {
                per_rtt(
                    &report,
                    &format!("{p}_{}", rt.name()),
                    "the device's threads",
                    &dev_runs[i],
                );
            }
        }
        report.row(
            &format!("{p}_raw_rtt_us"),
            median(&raws),
            "us",
            &format!(
                "baseline: 1-byte ping-pong, two threads, socketpair; median of {n}; {}",
                placement_note(placement)
            ),
        );
        report.row(
            &format!("{p}_relay_rtt_us"),
            median(&relays),
            "us",
            "second baseline: the same ping-pong through a blocking relay thread (four hand-offs, as the device)",
        );
        let mut target = None;
        for (i, &rt) in opts.runtimes.iter().enumerate() {
            let over_relay: Vec<f64> = devs[i].iter().zip(&relays).map(|(d, r)| d / r).collect();
            report.row(
                &format!("{p}_{}_rtt_vs_relay", rt.name()),
                median(&over_relay),
                "x relay",
                &format!(
                    "device / raw relay, each repetition; {}",
                    spread(&over_relay)
                ),
            );
            let ratios: Vec<f64> = devs[i].iter().zip(&raws).map(|(d, r)| d / r).collect();
            let ratio = median(&ratios);
            report.row(
                &format!("{p}_{}_rtt_us", rt.name()),
                median(&devs[i]),
                "us",
                &format!("guest 1 byte -> host echo -> guest rx interrupt; median of {n}"),
            );
            report.row(
                &format!("{p}_{}_rtt_ratio", rt.name()),
                ratio,
                "x raw",
                &format!("device / raw, each repetition; {}", spread(&ratios)),
            );
            if rt == Runtime::Mio || target.is_none() {
                target = Some((rt, ratio));
            }
        }
        if let (true, Some((rt, ratio))) = (placement == chosen, target) {
            report.target(
                "rtt_ratio",
                ratio,
                &format!("{}, placement {p}: median RTT device / raw", rt.name()),
            );
        }
    }
    chosen.set();
}

/// Rows for what the measured thread did per round trip.
fn per_rtt(report: &Report, prefix: &str, who: &str, runs: &[Pings]) {
    let med = |f: fn(&Pings) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    report.row(
        &format!("{prefix}_cpu_us_per_rtt"),
        med(|r| r.cpu_us),
        "us",
        &format!("{who}: CPU time per round trip (schedstat)"),
    );
    report.row(
        &format!("{prefix}_wakes_per_rtt"),
        med(|r| r.wakes),
        "wakes",
        &format!("{who}: voluntary context switches per round trip"),
    );
    report.row(
        &format!("{prefix}_syscalls_per_rtt"),
        med(|r| r.syscalls),
        "syscalls",
        &format!("{who}: system calls per round trip (perf tracepoint)"),
    );
}

/// What a placement means for the ping-pong, for the table.
fn placement_note(p: Placement) -> &'static str {
    match p {
        Placement::Split => {
            "split: device thread (raw: echo thread) alone on CPU 1, guest and host peer on CPU 0"
        }
        Placement::One => "one: every thread on CPU 0",
        Placement::Free => "free: threads wherever the scheduler puts them",
    }
}
