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
use crate::{median, progress, Opts, Report};

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

/// Median round trip, in microseconds, of `n` raw ping-pongs.
pub fn raw(n: usize) -> f64 {
    let (mut a, b) = UnixStream::pair().expect("socketpair");
    let peer = thread::spawn(move || echo(b));
    let mut rtts = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for i in 0..WARM + n {
        let t = Instant::now();
        a.write_all(&[i as u8]).expect("write");
        a.read_exact(&mut byte).expect("read");
        if i >= WARM {
            rtts.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    drop(a);
    peer.join().expect("echo");
    median(&rtts)
}

/// Median round trip, in microseconds, of `n` ping-pongs through the device on `rt`.
pub fn device(rt: Runtime, n: usize) -> f64 {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let peer = thread::spawn(move || echo(listener.accept().expect("accept").0));
    let id = guest.connect_wait(PORT);
    let mut rtts = Vec::with_capacity(n);
    for i in 0..WARM + n {
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
    guest.rst(id);
    guest.step();
    let fin = dev.stop();
    peer.join().expect("echo");
    assert_eq!(fin.engine.credit_violation, 0);
    median(&rtts)
}

/// Part 3.
pub fn run(opts: &Opts) {
    let report = Report::new("latency");
    let n = if opts.quick { 2000 } else { 10_000 };
    let mut raws = Vec::new();
    let mut devs: Vec<Vec<f64>> = opts.runtimes.iter().map(|_| Vec::new()).collect();
    for rep in 0..opts.reps {
        raws.push(raw(n));
        for (i, &rt) in opts.runtimes.iter().enumerate() {
            let us = device(rt, n);
            progress(&format!(
                "latency rep {rep} {}: {us:.1} us, raw {:.1} us",
                rt.name(),
                raws[rep]
            ));
            devs[i].push(us);
        }
    }
    report.row(
        "raw_rtt_us",
        median(&raws),
        "us",
        &format!("baseline: 1-byte ping-pong, two threads, socketpair; median of {n}"),
    );
    let mut target = None;
    for (i, &rt) in opts.runtimes.iter().enumerate() {
        let ratios: Vec<f64> = devs[i].iter().zip(&raws).map(|(d, r)| d / r).collect();
        let ratio = median(&ratios);
        report.row(
            &format!("{}_rtt_us", rt.name()),
            median(&devs[i]),
            "us",
            &format!("guest 1 byte -> host echo -> guest rx interrupt; median of {n}"),
        );
        report.row(
            &format!("{}_rtt_ratio", rt.name()),
            ratio,
            "x raw",
            "median of per-repetition ratios",
        );
        if rt == Runtime::Mio || target.is_none() {
            target = Some((rt, ratio));
        }
    }
    if let Some((rt, ratio)) = target {
        report.target(
            "rtt_ratio",
            ratio,
            &format!("{}: median RTT device / raw", rt.name()),
        );
    }
}
