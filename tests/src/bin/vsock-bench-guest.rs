//! The real-guest part of the benchmark suite: our daemon and another vhost-user vsock backend
//! (rust-vmm's `vhost-device-vsock`, which `scripts/bench-guest` builds from crates.io), on the
//! same Debian guest under QEMU, the same workload, alternating, several rounds.
//!
//! Each run boots a guest against one daemon and measures, from outside the daemon:
//! - guest → host: `socat -b 65536` from a file in the guest to a host listener;
//! - host → guest: a host client (`CONNECT`) writing 64 KiB at a time to `socat` in the guest;
//! - the 1-byte round trip: a host client and `socat ... PIPE` (an echo) in the guest.
//!
//! For each direction it takes the daemon's CPU time per thread (`/proc/PID/task/*/schedstat`)
//! and its sleeps (voluntary context switches, `/proc/PID/task/*/status`) before and after,
//! and counts its system calls with `perf stat -e raw_syscalls:sys_enter` attached for the
//! same window (when perf can count tracepoints here; otherwise it says so). The guest waits
//! before each direction, so the window holds the transfer and nothing else of substance:
//! an idle daemon uses no CPU, so the idle edges of the window do not count.
//!
//! A "packet" is 64 KiB of payload, the most a Linux guest puts in one.
//!
//! Output: `row` lines for the suite's table and `target` lines (see `scripts/bench`), both
//! on stdout; progress on stderr.
//!
//! Usage: `vsock-bench-guest [--rounds N] [--mib M] [--pings K] [--runtimes mio,tokio,smol]
//! [--reference BINARY] [--daemon-flags "FLAGS"]` (`FLAGS` go to our daemon).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vsock_tests::guest::{self, Daemon, Image, Vm};

const MIB: u64 = 1 << 20;
const PACKET: f64 = 65536.0;
const GIB: f64 = (1u64 << 30) as f64;

struct Args {
    rounds: usize,
    mib: u64,
    pings: usize,
    runtimes: Vec<String>,
    reference: Option<PathBuf>,
    /// More flags for our daemon (`--tx-buffer-size N`, `--record FILE`).
    daemon_flags: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        rounds: 5,
        mib: 256,
        pings: 2000,
        runtimes: vec!["mio".into()],
        reference: None,
        daemon_flags: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--mib" => args.mib = value()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--pings" => args.pings = value()?.parse().map_err(|e| format!("--pings: {e}"))?,
            "--runtimes" => args.runtimes = value()?.split(',').map(String::from).collect(),
            "--reference" => args.reference = Some(value()?.into()),
            "--daemon-flags" => {
                args.daemon_flags = value()?.split_whitespace().map(String::from).collect()
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.rounds == 0 || args.mib == 0 || args.pings == 0 {
        return Err("--rounds, --mib and --pings must be positive".into());
    }
    Ok(args)
}

/// One thread's counters at one moment.
#[derive(Clone, Debug, Default)]
struct ThreadCounters {
    name: String,
    cpu_ns: u64,
    sleeps: u64,
}

/// Every thread of `pid`, by thread ID.
fn threads(pid: u32) -> BTreeMap<u32, ThreadCounters> {
    let mut out = BTreeMap::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let path = entry.path();
        let name = fs::read_to_string(path.join("comm")).unwrap_or_default();
        let cpu_ns = fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let sleeps = fs::read_to_string(path.join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        out.insert(
            tid,
            ThreadCounters {
                name: name.trim().to_string(),
                cpu_ns,
                sleeps,
            },
        );
    }
    out
}

/// What a daemon spent over one window, per thread name (threads of one name summed).
#[derive(Clone, Debug, Default)]
struct Spent {
    cpu_ns: BTreeMap<String, u64>,
    sleeps: u64,
    syscalls: Option<u64>,
}

impl Spent {
    fn cpu_s(&self) -> f64 {
        self.cpu_ns.values().sum::<u64>() as f64 / 1e9
    }
}

/// A measurement window over a daemon's threads, with perf counting its system calls.
struct Window {
    pid: u32,
    before: BTreeMap<u32, ThreadCounters>,
    perf: Option<(Child, PathBuf)>,
}

impl Window {
    fn open(pid: u32, scratch: &std::path::Path, tag: &str) -> Window {
        let out = scratch.join(format!("perf-{tag}.txt"));
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|child| (child, out));
        // perf needs a moment to attach to every thread; the guest waits longer than this.
        thread::sleep(Duration::from_millis(300));
        Window {
            pid,
            before: threads(pid),
            perf,
        }
    }

    fn close(self) -> Spent {
        let after = threads(self.pid);
        let syscalls = self.perf.and_then(|(mut child, out)| {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
            let text = fs::read_to_string(out).ok()?;
            text.lines()
                .find(|l| l.contains("raw_syscalls:sys_enter"))
                .and_then(|l| l.split(',').next()?.trim().parse().ok())
        });
        let mut spent = Spent {
            syscalls,
            ..Spent::default()
        };
        for (tid, a) in &after {
            let b = self.before.get(tid).cloned().unwrap_or_default();
            *spent.cpu_ns.entry(a.name.clone()).or_default() += a.cpu_ns.saturating_sub(b.cpu_ns);
            spent.sleeps += a.sleeps.saturating_sub(b.sleeps);
        }
        spent
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
struct Run {
    g2h_mb_s: f64,
    h2g_mb_s: f64,
    g2h: Spent,
    h2g: Spent,
    rtt_us: f64,
    /// The guest's virtio interrupts per round trip.
    rtt_irqs: f64,
}

fn run_once(image: &Image, daemon: Daemon, args: &Args) -> Result<Run, String> {
    let bytes = args.mib * MIB;
    let scratch = std::env::temp_dir().join(format!("vsock-bench-guest-{}", std::process::id()));
    fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    let pid = daemon.pid();
    let stop = Arc::new(AtomicBool::new(false));

    let listener = guest::listen(&daemon.port_path(5001));
    let (g2h_done, g2h_ended) = mpsc::channel();
    let s = stop.clone();
    let receiver = thread::spawn(move || {
        let mut stream = guest::accept(&listener, &s)?;
        let start = Instant::now();
        let (got, digest) = guest::drain(&mut stream).ok()?;
        let took = start.elapsed();
        let _ = g2h_done.send(());
        Some((got, digest, took))
    });

    let script = format!(
        "head -c {bytes} /dev/urandom > /tmp/blob\n\
         echo \"SHA g2h $(sha256sum /tmp/blob | cut -d' ' -f1)\"\n\
         echo PHASE g2h\n\
         sleep 2\n\
         socat -u -b 65536 OPEN:/tmp/blob VSOCK-CONNECT:2:5001\n\
         rm /tmp/blob\n\
         echo PHASE h2g\n\
         socat -u -b 65536 VSOCK-LISTEN:5002 CREATE:/tmp/in\n\
         echo PHASE h2g-done\n\
         echo \"SHA h2g $(sha256sum /tmp/in | cut -d' ' -f1)\"\n\
         rm /tmp/in\n\
         echo \"IRQ before $(grep virtio /proc/interrupts | awk '{{s+=$2}} END {{print s}}')\"\n\
         socat VSOCK-LISTEN:5003 PIPE\n\
         echo \"IRQ after $(grep virtio /proc/interrupts | awk '{{s+=$2}} END {{print s}}')\"\n\
         echo PHASE end\n"
    );
    let mut vm = Vm::boot(image, &daemon.socket, &script);
    vm.wait_for_line("PHASE g2h", Duration::from_secs(300));
    let window = Window::open(pid, &scratch, "g2h");
    g2h_ended
        .recv_timeout(Duration::from_secs(600))
        .map_err(|_| "guest -> host never ended".to_string())?;
    let g2h = window.close();
    let (got, digest, g2h_took) = receiver
        .join()
        .map_err(|_| "receiver panicked")?
        .ok_or("guest -> host: nothing arrived")?;

    vm.wait_for_line("PHASE h2g", Duration::from_secs(120));
    let window = Window::open(pid, &scratch, "h2g");
    let mut stream = guest::connect(&daemon.uds, 5002, &stop).ok_or("no CONNECT 5002")?;
    let start = Instant::now();
    let sent = guest::send(&mut stream, bytes, 0x5eed).map_err(|e| e.to_string())?;
    drop(stream);
    vm.wait_for_line("PHASE h2g-done", Duration::from_secs(600));
    let h2g_took = start.elapsed();
    let h2g = window.close();

    let mut echo = guest::connect(&daemon.uds, 5003, &stop).ok_or("no CONNECT 5003")?;
    let mut rtts = Vec::with_capacity(args.pings);
    let mut byte = [0u8; 1];
    for i in 0..args.pings + 50 {
        let t = Instant::now();
        echo.write_all(&[i as u8]).map_err(|e| e.to_string())?;
        echo.read_exact(&mut byte).map_err(|e| e.to_string())?;
        // The first round trips warm both sides up.
        if i >= 50 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    drop(echo);
    let out = vm.wait(Duration::from_secs(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // SIGTERM, so a recording (`--daemon-flags "--record FILE"`) is whole.
    let _ = daemon.stop();
    let _ = fs::remove_dir_all(&scratch);

    if got != bytes || out.line("SHA g2h ") != Some(digest.as_str()) {
        return Err("guest -> host: the bytes differ".into());
    }
    if out.line("SHA h2g ") != Some(sent.as_str()) {
        return Err("host -> guest: the bytes differ".into());
    }
    let irq = |k: &str| {
        out.line(&format!("IRQ {k} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    // Counted around the whole echo session, warm-up and connection included.
    let rtt_irqs = match (irq("before"), irq("after")) {
        (Some(a), Some(b)) => (b - a) / (args.pings + 50) as f64,
        _ => f64::NAN,
    };
    let mb = |t: Duration| bytes as f64 / 1e6 / t.as_secs_f64();
    Ok(Run {
        g2h_mb_s: mb(g2h_took),
        h2g_mb_s: mb(h2g_took),
        g2h,
        h2g,
        rtt_us: median(&mut rtts),
        rtt_irqs,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Medians over a backend's runs.
struct Summary {
    g2h_mb_s: f64,
    h2g_mb_s: f64,
    g2h_cpu_gib: f64,
    h2g_cpu_gib: f64,
    g2h_syscalls: Option<f64>,
    h2g_syscalls: Option<f64>,
    g2h_sleeps: f64,
    h2g_sleeps: f64,
    rtt_us: f64,
    rtt_irqs: f64,
    /// guest → host CPU per GiB, by thread name.
    g2h_threads: BTreeMap<String, f64>,
    h2g_threads: BTreeMap<String, f64>,
}

fn summarize(runs: &[Run], bytes: u64) -> Summary {
    let gib = bytes as f64 / GIB;
    let packets = bytes as f64 / PACKET;
    let m = |f: &dyn Fn(&Run) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let calls = |f: &dyn Fn(&Run) -> Option<u64>| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter_map(|r| f(r).map(|c| c as f64 / packets))
            .collect();
        (v.len() == runs.len()).then(|| median(&mut v))
    };
    let by_thread = |f: &dyn Fn(&Run) -> &Spent| {
        let names: std::collections::BTreeSet<String> = runs
            .iter()
            .flat_map(|r| f(r).cpu_ns.keys().cloned())
            .collect();
        names
            .into_iter()
            .map(|n| {
                let v = m(&|r| f(r).cpu_ns.get(&n).copied().unwrap_or(0) as f64 / 1e9 / gib);
                (n, v)
            })
            .collect()
    };
    Summary {
        g2h_mb_s: m(&|r| r.g2h_mb_s),
        h2g_mb_s: m(&|r| r.h2g_mb_s),
        g2h_cpu_gib: m(&|r| r.g2h.cpu_s() / gib),
        h2g_cpu_gib: m(&|r| r.h2g.cpu_s() / gib),
        g2h_syscalls: calls(&|r| r.g2h.syscalls),
        h2g_syscalls: calls(&|r| r.h2g.syscalls),
        g2h_sleeps: m(&|r| r.g2h.sleeps as f64 / packets),
        h2g_sleeps: m(&|r| r.h2g.sleeps as f64 / packets),
        rtt_us: m(&|r| r.rtt_us),
        rtt_irqs: m(&|r| r.rtt_irqs),
        g2h_threads: by_thread(&|r| &r.g2h),
        h2g_threads: by_thread(&|r| &r.h2g),
    }
}

fn row(name: &str, value: f64, unit: &str, note: &str) {
    println!("row\tguest\t{name}\t{value:.3}\t{unit}\t{note}");
}

fn target(name: &str, measured: Option<f64>, goal: f64) {
    match measured {
        Some(v) => println!(
            "target {name} measured {v:.3} goal {goal} {}",
            if v <= goal { "met" } else { "missed" }
        ),
        None => println!("target {name} measured n/a goal {goal} missed"),
    }
}

fn threads_note(t: &BTreeMap<String, f64>) -> String {
    t.iter()
        .filter(|(_, v)| **v >= 0.005)
        .map(|(n, v)| format!("{n} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(who: &str, s: &Summary, rounds: usize) {
    let note = format!("median of {rounds}");
    row(&format!("{who} g2h throughput"), s.g2h_mb_s, "MB/s", &note);
    row(&format!("{who} h2g throughput"), s.h2g_mb_s, "MB/s", &note);
    row(
        &format!("{who} g2h daemon CPU"),
        s.g2h_cpu_gib,
        "CPU-s/GiB",
        &format!("{note}; by thread: {}", threads_note(&s.g2h_threads)),
    );
    row(
        &format!("{who} h2g daemon CPU"),
        s.h2g_cpu_gib,
        "CPU-s/GiB",
        &format!("{note}; by thread: {}", threads_note(&s.h2g_threads)),
    );
    let perf = "perf stat -e raw_syscalls:sys_enter, all threads; per 64 KiB";
    match s.g2h_syscalls {
        Some(v) => row(&format!("{who} g2h syscalls"), v, "per packet", perf),
        None => row(
            &format!("{who} g2h syscalls"),
            f64::NAN,
            "per packet",
            "perf could not count",
        ),
    }
    match s.h2g_syscalls {
        Some(v) => row(&format!("{who} h2g syscalls"), v, "per packet", perf),
        None => row(
            &format!("{who} h2g syscalls"),
            f64::NAN,
            "per packet",
            "perf could not count",
        ),
    }
    let sleeps = "voluntary context switches, all threads; per 64 KiB";
    row(
        &format!("{who} g2h sleeps"),
        s.g2h_sleeps,
        "per packet",
        sleeps,
    );
    row(
        &format!("{who} h2g sleeps"),
        s.h2g_sleeps,
        "per packet",
        sleeps,
    );
    row(
        &format!("{who} 1-byte RTT"),
        s.rtt_us,
        "us",
        &format!("{note}; host client, socat PIPE in the guest"),
    );
    row(
        &format!("{who} RTT guest interrupts"),
        s.rtt_irqs,
        "per RTT",
        "the guest's virtio interrupts (/proc/interrupts) over the echo session, per round trip",
    );
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsock-bench-guest: {e}");
            return ExitCode::from(2);
        }
    };
    let image = match Image::find() {
        Ok(image) => image,
        Err(why) => {
            eprintln!("vsock-bench-guest: {why}; scripts/bench-guest builds everything");
            return ExitCode::FAILURE;
        }
    };
    let mut backends: Vec<String> = args.runtimes.clone();
    if args.reference.is_some() {
        backends.push("reference".into());
    }
    let mut runs: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for round in 1..=args.rounds {
        // Alternating: each round runs every backend once, in turn.
        for who in &backends {
            let daemon = match (who.as_str(), &args.reference) {
                ("reference", Some(binary)) => Daemon::start_other(binary),
                (runtime, _) => {
                    let flags: Vec<&str> = args.daemon_flags.iter().map(String::as_str).collect();
                    Daemon::start_flags(&image, runtime, &flags)
                }
            };
            eprintln!("round {round}/{}: {who} ...", args.rounds);
            match run_once(&image, daemon, &args) {
                Ok(run) => {
                    eprintln!(
                        "round {round}: {who}: g2h {:.1} MB/s {:.2} CPU-s/GiB, h2g {:.1} MB/s {:.2} CPU-s/GiB, rtt {:.0} us",
                        run.g2h_mb_s,
                        run.g2h.cpu_s() / (args.mib as f64 / 1024.0),
                        run.h2g_mb_s,
                        run.h2g.cpu_s() / (args.mib as f64 / 1024.0),
                        run.rtt_us
                    );
                    runs.entry(who.clone()).or_default().push(run);
                }
                Err(e) => {
                    eprintln!("vsock-bench-guest: {who}, round {round}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let bytes = args.mib * MIB;
    let summaries: BTreeMap<&String, Summary> =
        runs.iter().map(|(k, v)| (k, summarize(v, bytes))).collect();
    for who in &backends {
        let label = if who == "reference" {
            "vhost-device-vsock".to_string()
        } else {
            format!("ours ({who})")
        };
        report(&label, &summaries[who], args.rounds);
    }
    // The targets are judged on the first runtime named (mio unless told otherwise).
    let ours = &summaries[&args.runtimes[0]];
    let theirs = summaries.get(&"reference".to_string());
    target(
        "guest_g2h_cpu_vs_reference",
        theirs.map(|t| ours.g2h_cpu_gib / t.g2h_cpu_gib),
        0.6,
    );
    target(
        "guest_h2g_cpu_vs_reference",
        theirs.map(|t| ours.h2g_cpu_gib / t.h2g_cpu_gib),
        0.3,
    );
    target("guest_g2h_syscalls_per_packet", ours.g2h_syscalls, 5.0);
    target("guest_g2h_sleeps_per_packet", Some(ours.g2h_sleeps), 1.1);
    target(
        "guest_rtt_vs_reference",
        theirs.map(|t| ours.rtt_us / t.rtt_us),
        1.0,
    );
    ExitCode::SUCCESS
}
