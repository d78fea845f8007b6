//! Part 2: the device relaying for a guest thread, on each runtime's ready-made loop, against
//! plain socket pumps measured in the same run.
//!
//! - guest to host: the guest posts 64 KiB tx packets (payload already in guest memory) as
//!   credit allows; a host peer thread reads the Unix socket in 64 KiB reads;
//! - host to guest: the host peer writes 64 KiB at a time; the guest has its rx ring full of
//!   4 KiB buffers, reposting each as soon as it is read, and returns credit as Linux does.
//!
//! Baselines, each repetition, right before the device runs: a two-thread socketpair pump
//! with the same chunk sizes (throughput), and a relay thread between two socketpairs that
//! reads one and writes the other in the same chunks (its CPU, wake-ups and system calls are
//! what the device thread's are compared with).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::{Guest, MAX_PKT};
use crate::rig::{bench_config, Device, Final, Runtime};
use crate::sys::{gettid, Measured, Window};
use crate::{median, progress, spread, Opts, Placement, Report, MIB};

/// The vsock port the guest connects to.
pub const PORT: u32 = 1234;
/// The host peer's write size, and the tx packet payload.
pub const CHUNK: usize = MAX_PKT as usize;
/// The read size of the host to guest baselines: Linux's rx buffer.
pub const RX_CHUNK: usize = 4096;

/// Which way data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Guest to host.
    G2h,
    /// Host to guest.
    H2g,
}

impl Dir {
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            Dir::G2h => "g2h",
            Dir::H2g => "h2g",
        }
    }

    /// The read size of its baselines.
    fn read_chunk(self) -> usize {
        match self {
            Dir::G2h => CHUNK,
            Dir::H2g => RX_CHUNK,
        }
    }
}

/// One device run.
pub struct DeviceRun {
    /// The measurement window over the device's threads.
    pub m: Measured,
    /// Data packets (g2h: tx packets posted; h2g: rx data packets read).
    pub packets: u64,
    /// Guest kicks in the window.
    pub kicks: u64,
    /// Guest sleeps on the interrupt in the window.
    pub sleeps: u64,
    /// Interrupts the device sent, over the whole run.
    pub irqs: u64,
    /// Guest sleeps that ended after half a second without an interrupt (none, unless the
    /// device left the guest waiting or the machine stalled).
    pub timeouts: u64,
}

fn check(fin: &Final, what: &str) {
    let s = &fin.engine;
    assert_eq!(
        (
            s.credit_violation,
            s.payload_faults,
            s.host_errors,
            s.guest_bytes_lost
        ),
        (0, 0, 0, 0),
        "{what}: engine counters {s:?}"
    );
}

/// Paces a loop at `per_s` iterations a second.
pub struct Pace {
    interval: Option<Duration>,
    next: Instant,
}

impl Pace {
    /// A pacer (`None`: no pacing).
    pub fn new(per_s: Option<u64>) -> Pace {
        Pace {
            interval: per_s.map(|r| Duration::from_nanos(1_000_000_000 / r.max(1))),
            next: Instant::now(),
        }
    }

    /// Waits for the next slot.
    pub fn wait(&mut self) {
        if let Some(i) = self.interval {
            let now = Instant::now();
            if now < self.next {
                thread::sleep(self.next - now);
            }
            self.next = (self.next + i).max(now);
        }
    }
}

/// Guest to host through the device on `rt`: `bytes` in 64 KiB packets.
pub fn device_g2h(rt: Runtime, bytes: u64, rate: Option<u64>) -> DeviceRun {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let peer = thread::spawn(move || {
        Placement::place_peer();
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).expect("read");
            assert!(n > 0, "end of stream after {got} bytes");
            got += n as u64;
        }
        s
    });
    let id = guest.connect_wait(PORT);
    guest.set_rate(rate);
    let g0 = guest.stats;
    let w = Window::open(dev.tids());
    guest.send(id, bytes, MAX_PKT);
    guest.run_until("everything sent", Duration::from_secs(600), |g| {
        g.conns[id].to_send == 0
    });
    let _stream = peer.join().expect("host peer");
    let m = w.close();
    let g = guest.stats;
    guest.rst(id);
    guest.step();
    let fin = dev.stop();
    check(&fin, "g2h");
    DeviceRun {
        m,
        packets: g.tx_packets - g0.tx_packets,
        kicks: g.kicks - g0.kicks,
        sleeps: g.sleeps - g0.sleeps,
        irqs: fin.device.notifications,
        timeouts: g.timeouts - g0.timeouts,
    }
}

/// Host to guest through the device on `rt`: `bytes` written 64 KiB at a time, into 4 KiB
/// rx buffers.
pub fn device_h2g(rt: Runtime, bytes: u64, rate: Option<u64>) -> DeviceRun {
    let mut guest = Guest::new();
    let dev = Device::start(rt, bench_config(), &mut guest);
    let listener = UnixListener::bind(dev.port_path(PORT)).expect("bind");
    let (go, gone) = mpsc::channel::<()>();
    let (done, finished) = mpsc::channel::<()>();
    let peer = thread::spawn(move || {
        Placement::place_peer();
        let (mut s, _) = listener.accept().expect("accept");
        let buf = vec![0x77u8; CHUNK];
        let mut pace = Pace::new(rate);
        gone.recv().expect("go");
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            pace.wait();
            s.write_all(&buf[..n]).expect("write");
            sent += n as u64;
        }
        // Keep the socket open until the guest has it all: no end of file meanwhile.
        let _ = finished.recv();
    });
    let id = guest.connect_wait(PORT);
    let g0 = guest.stats;
    let w = Window::open(dev.tids());
    go.send(()).expect("peer waits");
    guest.run_until("everything received", Duration::from_secs(600), |g| {
        g.conns[id].received >= bytes
    });
    let m = w.close();
    let g = guest.stats;
    let _ = done.send(());
    peer.join().expect("host peer");
    guest.rst(id);
    guest.step();
    let fin = dev.stop();
    check(&fin, "h2g");
    assert_eq!(guest.conns[id].received, bytes, "h2g: every byte, no more");
    DeviceRun {
        m,
        packets: g.rx_data_packets - g0.rx_data_packets,
        kicks: g.kicks - g0.kicks,
        sleeps: g.sleeps - g0.sleeps,
        irqs: fin.device.notifications,
        timeouts: g.timeouts - g0.timeouts,
    }
}

/// The baselines' writer: `bytes` in 64 KiB writes.
fn write_in_chunks(socket: &mut UnixStream, bytes: u64) {
    let buf = vec![1u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        socket.write_all(&buf[..n]).expect("write");
        sent += n as u64;
    }
}

/// The two-thread pump: a writer thread writes `bytes` in 64 KiB writes, this thread reads
/// them in `read_chunk` reads. Returns the seconds it took.
pub fn pump(bytes: u64, read_chunk: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let (go, gone) = mpsc::channel::<()>();
    let writer = thread::spawn(move || {
        Placement::place_peer();
        gone.recv().expect("go");
        write_in_chunks(&mut a, bytes);
    });
    // The reader is the measured side of this pair.
    Placement::place_measured(0);
    let mut buf = vec![0u8; read_chunk];
    let start = Instant::now();
    go.send(()).expect("writer waits");
    let mut got = 0u64;
    while got < bytes {
        let n = b.read(&mut buf).expect("read");
        assert!(n > 0);
        got += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    writer.join().expect("writer");
    secs
}

/// The relay baseline: writer thread → socketpair → relay thread (reads `chunk`, writes what it
/// read) → socketpair → this thread (reads `chunk`). Returns the relay thread's window and
/// its reads.
pub fn relay(bytes: u64, chunk: usize) -> (Measured, u64) {
    let (mut aw, mut ar) = UnixStream::pair().expect("socketpair");
    let (mut bw, mut br) = UnixStream::pair().expect("socketpair");
    let (tid_tx, tid_rx) = mpsc::channel();
    let relay = thread::spawn(move || {
        Placement::place_measured(0);
        tid_tx.send(gettid()).expect("main waits");
        let mut buf = vec![0u8; chunk];
        let mut reads = 0u64;
        loop {
            let n = ar.read(&mut buf).expect("relay read");
            if n == 0 {
                return reads;
            }
            reads += 1;
            bw.write_all(&buf[..n]).expect("relay write");
        }
    });
    let tid = tid_rx.recv().expect("relay's tid");
    let (go, gone) = mpsc::channel::<()>();
    let (fin, finished) = mpsc::channel::<()>();
    let writer = thread::spawn(move || {
        Placement::place_peer();
        gone.recv().expect("go");
        write_in_chunks(&mut aw, bytes);
        // The relay thread ends at end of file: not before its window is closed.
        let _ = finished.recv();
    });
    Placement::place_peer();
    let mut buf = vec![0u8; chunk];
    let w = Window::open(&[tid]);
    go.send(()).expect("writer waits");
    let mut got = 0u64;
    while got < bytes {
        let n = br.read(&mut buf).expect("read");
        assert!(n > 0);
        got += n as u64;
    }
    let m = w.close();
    let _ = fin.send(());
    writer.join().expect("writer");
    let reads = relay.join().expect("relay");
    (m, reads)
}

/// Part 2.
pub fn run(opts: &Opts) {
    let report = Report::new("relay");
    let bytes = opts.bytes;
    for dir in [Dir::G2h, Dir::H2g] {
        let d = dir.name();
        let mut pumps = Vec::new();
        let mut relays = Vec::new();
        let mut runs: Vec<Vec<DeviceRun>> = opts.runtimes.iter().map(|_| Vec::new()).collect();
        for rep in 0..opts.reps {
            let secs = pump(bytes, dir.read_chunk());
            pumps.push(bytes as f64 / MIB / secs);
            relays.push(relay(bytes, dir.read_chunk()));
            for (i, &rt) in opts.runtimes.iter().enumerate() {
                let run = match dir {
                    Dir::G2h => device_g2h(rt, bytes, opts.rate),
                    Dir::H2g => device_h2g(rt, bytes, opts.rate),
                };
                progress(&format!(
                    "relay {d} rep {rep} {}: {:.0} MiB/s, pump {:.0} MiB/s",
                    rt.name(),
                    bytes as f64 / MIB / run.m.secs,
                    pumps[rep]
                ));
                runs[i].push(run);
            }
        }
        let relay_cpu: Vec<f64> = relays.iter().map(|(m, _)| m.cpu_s_per_gib(bytes)).collect();
        report.row(
            &format!("{d}_pump_mib_s"),
            median(&pumps),
            "MiB/s",
            &format!(
                "baseline: two threads, socketpair, 64 KiB writes, {} KiB reads",
                dir.read_chunk() / 1024
            ),
        );
        report.row(
            &format!("{d}_relay_cpu_s_per_gib"),
            median(&relay_cpu),
            "CPU-s/GiB",
            &format!(
                "baseline: a relay thread reading one socketpair and writing another, {} KiB reads",
                dir.read_chunk() / 1024
            ),
        );
        report.row(
            &format!("{d}_relay_wakes_per_read"),
            median(
                &relays
                    .iter()
                    .map(|(m, r)| m.wakes_per(*r))
                    .collect::<Vec<_>>(),
            ),
            "wakes",
            "baseline relay thread: voluntary context switches per read",
        );
        report.row(
            &format!("{d}_relay_syscalls_per_read"),
            median(
                &relays
                    .iter()
                    .map(|(m, r)| m.syscalls_per(*r))
                    .collect::<Vec<_>>(),
            ),
            "syscalls",
            syscall_note(relays.first().map(|(m, _)| m)),
        );
        report.row(
            &format!("{d}_relay_mib_s"),
            median(
                &relays
                    .iter()
                    .map(|(m, _)| bytes as f64 / MIB / m.secs)
                    .collect::<Vec<_>>(),
            ),
            "MiB/s",
            "baseline relay pipeline's throughput (writer, relay, reader: three threads)",
        );
        let mut target = None;
        for (i, &rt) in opts.runtimes.iter().enumerate() {
            let r = &runs[i];
            let each = |f: &dyn Fn(usize, &DeviceRun) -> f64| -> Vec<f64> {
                r.iter().enumerate().map(|(k, x)| f(k, x)).collect()
            };
            let n = rt.name();
            let pkt = match dir {
                Dir::G2h => "64 KiB tx packet",
                Dir::H2g => "rx packet (4 KiB buffer)",
            };
            let mib_s = each(&|_, x| bytes as f64 / MIB / x.m.secs);
            let tput = each(&|k, x| bytes as f64 / MIB / x.m.secs / pumps[k]);
            let cpu = each(&|_, x| x.m.cpu_s_per_gib(bytes));
            let cpu_ratio = each(&|k, x| x.m.cpu_s_per_gib(bytes) / relay_cpu[k]);
            report.row(
                &format!("{d}_{n}_mib_s"),
                median(&mib_s),
                "MiB/s",
                "device throughput",
            );
            report.row(
                &format!("{d}_{n}_throughput_ratio"),
                median(&tput),
                "x pump",
                &format!(
                    "device MiB/s / pump MiB/s, each repetition; {}",
                    spread(&tput)
                ),
            );
            report.row(
                &format!("{d}_{n}_cpu_s_per_gib"),
                median(&cpu),
                "CPU-s/GiB",
                &format!("the device's threads ({}; schedstat)", rt.thread_names()),
            );
            report.row(
                &format!("{d}_{n}_cpu_ratio"),
                median(&cpu_ratio),
                "x relay",
                &format!(
                    "device CPU-s/GiB / relay thread's, each repetition; {}",
                    spread(&cpu_ratio)
                ),
            );
            report.row(
                &format!("{d}_{n}_wakes_per_pkt"),
                median(&each(&|_, x| x.m.wakes_per(x.packets))),
                "wakes",
                &format!("device threads' voluntary context switches per {pkt}"),
            );
            report.row(
                &format!("{d}_{n}_syscalls_per_pkt"),
                median(&each(&|_, x| x.m.syscalls_per(x.packets))),
                "syscalls",
                syscall_note(r.first().map(|x| &x.m)),
            );
            report.row(
                &format!("{d}_{n}_kicks_per_pkt"),
                median(&each(&|_, x| x.kicks as f64 / x.packets as f64)),
                "kicks",
                "guest kicks (EVENT_IDX asked for them)",
            );
            report.row(
                &format!("{d}_{n}_irqs_per_pkt"),
                median(&each(&|_, x| x.irqs as f64 / x.packets as f64)),
                "irqs",
                "device interrupts (used_event asked for them), whole run",
            );
            report.row(
                &format!("{d}_{n}_guest_sleeps_per_pkt"),
                median(&each(&|_, x| x.sleeps as f64 / x.packets as f64)),
                "sleeps",
                "guest sleeps on the interrupt eventfd",
            );
            report.row(
                &format!("{d}_{n}_guest_wait_timeouts"),
                r.iter().map(|x| x.timeouts as f64).sum(),
                "sleeps",
                "guest sleeps that ended after 0.5 s without an interrupt, all repetitions (0 expected)",
            );
            if rt == Runtime::Mio || target.is_none() {
                target = Some((rt, median(&cpu_ratio)));
            }
        }
        if let Some((rt, ratio)) = target {
            let name = match dir {
                Dir::G2h => "relay_g2h_cpu_ratio",
                Dir::H2g => "relay_h2g_cpu_ratio",
            };
            report.target(
                name,
                ratio,
                &format!("{}: device CPU-s/GiB / relay thread's", rt.name()),
            );
        }
    }
}

/// How system calls were counted, for the table.
pub fn syscall_note(m: Option<&Measured>) -> &'static str {
    match m.map(|m| &m.syscalls) {
        Some(Ok(_)) => "per packet; perf tracepoint raw_syscalls:sys_enter on the thread(s)",
        _ => "not counted: perf_event_open refused (needs root or perf_event_paranoid <= 1)",
    }
}
