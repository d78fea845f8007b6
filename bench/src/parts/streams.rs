//! Part 4, fairness and scale: 1, 8 and 64 parallel streams each way through the device,
//! sharing the same total; aggregate throughput against one stream's, measured in the same
//! repetition, and Jain's fairness index over the streams' own throughputs.
//!
//! The host peer is one thread serving every stream with an edge-triggered epoll (non-blocking
//! sockets, 64 KiB reads or writes until each would block), for one stream as for 64, so the
//! ratios compare the device with itself. The device's threads' CPU per GiB is reported too:
//! on two cores the guest and the host peer may bound the throughput before the device does.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::{Guest, State, MAX_PKT};
use crate::parts::relay::{Dir, CHUNK, PORT};
use crate::rig::{bench_config, Device, Runtime};
use crate::sys::{Epoll, Window};
use crate::{median, progress, spread, Opts, Placement, Report, MIB};

/// Stream counts measured.
pub const COUNTS: [usize; 3] = [1, 8, 64];

/// One run: aggregate MiB/s and Jain's index over per-stream throughput.
pub struct Run {
    /// Aggregate MiB/s.
    pub mib_s: f64,
    /// Jain's fairness index over the streams' throughputs.
    pub jain: f64,
    /// The device's threads' CPU seconds per GiB.
    pub cpu_s_per_gib: f64,
    /// The device's threads' system calls per data packet (NaN if not counted).
    pub syscalls_per_pkt: f64,
    /// Of the guest's bytes, the share the engine copied into a connection buffer because the
    /// socket did not take them at once (guest to host; 0 host to guest).
    pub buffered_share: f64,
}

fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let sq: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * sq)
}

fn accept_all(listener: &UnixListener, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|_| {
            let (s, _) = listener.accept().expect("accept");
            s.set_nonblocking(true).expect("non-blocking");
            s
        })
        .collect()
}

/// Reads `share` bytes from each stream; returns when each finished.
fn read_peer(streams: Vec<UnixStream>, share: u64) -> Vec<Instant> {
    let n = streams.len();
    let ep = Epoll::new().expect("epoll");
    for (i, s) in streams.iter().enumerate() {
        ep.add(s.as_fd(), false, i as u64).expect("epoll_ctl");
    }
    let mut got = vec![0u64; n];
    let mut done: Vec<Option<Instant>> = vec![None; n];
    let mut left = n;
    let mut buf = vec![0u8; CHUNK];
    let mut ready = Vec::new();
    while left > 0 {
        ep.wait(&mut ready, Duration::from_secs(1));
        for &i in &ready {
            let i = i as usize;
            // Edge-triggered: read until the socket is empty.
            while done[i].is_none() {
                match (&streams[i]).read(&mut buf) {
                    Ok(0) => panic!("stream {i}: end of file after {} bytes", got[i]),
                    Ok(k) => {
                        got[i] += k as u64;
                        if got[i] >= share {
                            done[i] = Some(Instant::now());
                            left -= 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("stream {i}: {e}"),
                }
            }
        }
    }
    done.into_iter().map(|d| d.expect("done")).collect()
}

/// Writes `share` bytes to each stream.
fn write_peer(streams: &[UnixStream], share: u64) {
    let n = streams.len();
    let ep = Epoll::new().expect("epoll");
    for (i, s) in streams.iter().enumerate() {
        ep.add(s.as_fd(), true, i as u64).expect("epoll_ctl");
    }
    let mut sent = vec![0u64; n];
    let mut left = n;
    let buf = vec![0x33u8; CHUNK];
    let mut ready = Vec::new();
    while left > 0 {
        ep.wait(&mut ready, Duration::from_secs(1));
        for &i in &ready {
            let i = i as usize;
            // Edge-triggered: write until the socket is full.
            while sent[i] < share {
                let k = (share - sent[i]).min(CHUNK as u64) as usize;
                match (&streams[i]).write(&buf[..k]) {
                    Ok(w) => {
                        sent[i] += w as u64;
                        if sent[i] >= share {
                            left -= 1;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("stream {i}: {e}"),
                }
            }
        }
    }
}

fn connect_all(guest: &mut Guest, n: usize) -> Vec<usize> {
    let ids: Vec<usize> = (0..n).map(|_| guest.connect(PORT)).collect();
    guest.run_until("every RESPONSE", Duration::from_secs(30), |g| {
        ids.iter().all(|&i| g.conns[i].state != State::Connecting)
    });
    for &i in &ids {
        assert_eq!(guest.conns[i].state, State::Established, "stream {i}");
    }
    ids
}

/// Guest to host over `n` streams sharing `bytes`.
pub fn g2h(rt: Runtime, n: usize, bytes: u64) -> Run {
    let share = bytes / n as u64;
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let peer = thread::spawn(move || {
        Placement::place_peer();
        read_peer(accept_all(&listener, n), share)
    });
    let ids = connect_all(&mut guest, n);
    let w = Window::open(dev.tids());
    let g0 = guest.stats;
    let start = Instant::now();
    for &i in &ids {
        guest.send(i, share, MAX_PKT);
    }
    guest.run_until("everything sent", Duration::from_secs(600), |g| {
        ids.iter().all(|&i| g.conns[i].to_send == 0)
    });
    let done = peer.join().expect("host peer");
    let m = w.close();
    let end = done.iter().max().copied().expect("streams");
    for &i in &ids {
        guest.rst(i);
    }
    guest.step();
    let fin = dev.stop();
    let packets = guest.stats.tx_packets - g0.tx_packets;
    let per: Vec<f64> = done
        .iter()
        .map(|t| share as f64 / MIB / (*t - start).as_secs_f64())
        .collect();
    Run {
        mib_s: (share * n as u64) as f64 / MIB / (end - start).as_secs_f64(),
        jain: jain(&per),
        cpu_s_per_gib: m.cpu_s_per_gib(share * n as u64),
        syscalls_per_pkt: m.syscalls_per(packets),
        buffered_share: fin.engine.tx_buffered_bytes as f64 / fin.engine.tx_bytes.max(1) as f64,
    }
}

/// Host to guest over `n` streams sharing `bytes`.
pub fn h2g(rt: Runtime, n: usize, bytes: u64) -> Run {
    let share = bytes / n as u64;
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let (go, gone) = mpsc::channel::<()>();
    let (fin, finished) = mpsc::channel::<()>();
    let peer = thread::spawn(move || {
        Placement::place_peer();
        let streams = accept_all(&listener, n);
        gone.recv().expect("go");
        write_peer(&streams, share);
        let _ = finished.recv();
    });
    let ids = connect_all(&mut guest, n);
    for &i in &ids {
        guest.conns[i].rx_goal = share;
    }
    let w = Window::open(dev.tids());
    let g0 = guest.stats;
    let start = Instant::now();
    go.send(()).expect("peer waits");
    guest.run_until("everything received", Duration::from_secs(600), |g| {
        ids.iter().all(|&i| g.conns[i].received >= share)
    });
    let end = Instant::now();
    let m = w.close();
    let _ = fin.send(());
    peer.join().expect("host peer");
    let per: Vec<f64> = ids
        .iter()
        .map(|&i| {
            let t = guest.conns[i].rx_done_at.expect("done");
            share as f64 / MIB / (t - start).as_secs_f64()
        })
        .collect();
    for &i in &ids {
        guest.rst(i);
    }
    guest.step();
    dev.stop();
    let packets = guest.stats.rx_data_packets - g0.rx_data_packets;
    Run {
        mib_s: (share * n as u64) as f64 / MIB / (end - start).as_secs_f64(),
        jain: jain(&per),
        cpu_s_per_gib: m.cpu_s_per_gib(share * n as u64),
        syscalls_per_pkt: m.syscalls_per(packets),
        buffered_share: 0.0,
    }
}

/// Part 4: streams. Throughput with the device's thread alone on a CPU and the guest and the
/// host peer on the other (the targets, as every other part), then with the threads wherever
/// the scheduler puts them (from one run to the next, that varies more than anything measured
/// here).
pub fn run(opts: &Opts) {
    let report = Report::new("streams");
    // All runtimes in a full run; the quick run measures the target's runtime only.
    let runtimes: Vec<Runtime> = if opts.quick {
        opts.runtimes.iter().copied().take(1).collect()
    } else {
        opts.runtimes.clone()
    };
    let before = Placement::current();
    for placement in [Placement::Split, Placement::Free] {
        placement.set();
        let p = placement.name();
        for dir in [Dir::G2h, Dir::H2g] {
            for &rt in &runtimes {
                let mut runs: Vec<Vec<Run>> = COUNTS.iter().map(|_| Vec::new()).collect();
                for rep in 0..opts.reps {
                    for (k, &n) in COUNTS.iter().enumerate() {
                        let run = match dir {
                            Dir::G2h => g2h(rt, n, opts.bytes),
                            Dir::H2g => h2g(rt, n, opts.bytes),
                        };
                        progress(&format!(
                            "streams {p} {} {} rep {rep} x{n}: {:.0} MiB/s, fairness {:.3}",
                            dir.name(),
                            rt.name(),
                            run.mib_s,
                            run.jain
                        ));
                        runs[k].push(run);
                    }
                }
                let target = placement == Placement::Split && rt == runtimes[0];
                rows(&report, opts, placement, dir, rt, &runs, target);
            }
        }
    }
    before.set();
}

fn rows(
    report: &Report,
    opts: &Opts,
    placement: Placement,
    dir: Dir,
    rt: Runtime,
    runs: &[Vec<Run>],
    target: bool,
) {
    let (p, d, r) = (placement.name(), dir.name(), rt.name());
    let cpu_one: Vec<f64> = runs[0].iter().map(|x| x.cpu_s_per_gib).collect();
    for (k, &n) in COUNTS.iter().enumerate() {
        let mib: Vec<f64> = runs[k].iter().map(|x| x.mib_s).collect();
        report.row(
            &format!("{p}_{d}_{r}_x{n}_mib_s"),
            median(&mib),
            "MiB/s",
            &format!(
                "aggregate of {n} stream(s), {} MiB in all; placement {p}",
                opts.bytes >> 20
            ),
        );
        let cpu: Vec<f64> = runs[k].iter().map(|x| x.cpu_s_per_gib).collect();
        report.row(
            &format!("{p}_{d}_{r}_x{n}_cpu_s_per_gib"),
            median(&cpu),
            "CPU-s/GiB",
            "the device's threads",
        );
        report.row(
            &format!("{p}_{d}_{r}_x{n}_syscalls_per_pkt"),
            median(
                &runs[k]
                    .iter()
                    .map(|x| x.syscalls_per_pkt)
                    .collect::<Vec<_>>(),
            ),
            "syscalls",
            "the device's threads, per data packet (perf tracepoint)",
        );
        if dir == Dir::G2h {
            report.row(
                &format!("{p}_{d}_{r}_x{n}_buffered_share"),
                median(&runs[k].iter().map(|x| x.buffered_share).collect::<Vec<_>>()),
                "of bytes",
                "guest bytes the engine copied because the socket was full (tx_buffered_bytes)",
            );
        }
        if n == 1 {
            continue;
        }
        let ratios: Vec<f64> = runs[k]
            .iter()
            .zip(&runs[0])
            .map(|(x, one)| x.mib_s / one.mib_s)
            .collect();
        let ratio = median(&ratios);
        report.row(
            &format!("{p}_{d}_{r}_x{n}_ratio"),
            ratio,
            "x one",
            &format!(
                "aggregate / one stream's, each repetition; {}",
                spread(&ratios)
            ),
        );
        let cpu_ratios: Vec<f64> = cpu.iter().zip(&cpu_one).map(|(m, o)| m / o).collect();
        report.row(
            &format!("{p}_{d}_{r}_x{n}_cpu_vs_one"),
            median(&cpu_ratios),
            "x one",
            "device CPU-s/GiB / one stream's: the device's own cost of more streams",
        );
        let jains: Vec<f64> = runs[k].iter().map(|x| x.jain).collect();
        report.row(
            &format!("{p}_{d}_{r}_x{n}_fairness"),
            median(&jains),
            "Jain",
            "Jain's index over the streams' throughputs (1 = equal)",
        );
        if target {
            report.target(
                &format!("streams{n}_{d}"),
                ratio,
                &format!("{r}, placement {p}: aggregate of {n} / one stream's"),
            );
        }
    }
}
