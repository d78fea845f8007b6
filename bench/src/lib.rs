//! Benchmarks of the vsock device, in process: the engine alone, the device relaying for a
//! guest thread on each runtime, latency, and fairness and scale. Every figure that depends on
//! the machine is a ratio against a baseline measured in the same process at the same moment,
//! with medians over repetitions; counts that do not depend on the machine's speed
//! (instructions, system calls, context switches, bytes) are reported alongside. See
//! `BENCHMARKS.md` at the repository root for what each figure means and how it is measured,
//! and `scripts/bench` for the one command that runs them all.
//!
//! Each part prints lines a script can read:
//!
//! - `row<TAB>part<TAB>name<TAB>value<TAB>unit<TAB>note`: one figure of the results table;
//! - `target NAME measured VALUE goal VALUE met|missed`: one target (see [`TARGETS`]).
//!
//! Progress and diagnostics go to stderr.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod alloc;
pub mod guest;
pub mod parts;
pub mod rig;
pub mod ring;
pub mod sys;

use rig::Runtime;

/// Which way a target's goal points.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// Met when the measured value is at most the goal.
    AtMost(f64),
    /// Met when the measured value is at least the goal.
    AtLeast(f64),
}

impl Goal {
    /// The goal's value.
    pub fn value(self) -> f64 {
        match self {
            Goal::AtMost(v) | Goal::AtLeast(v) => v,
        }
    }

    /// Whether `measured` meets it (a value that could not be measured never does).
    pub fn met(self, measured: f64) -> bool {
        match self {
            Goal::AtMost(v) => measured <= v,
            Goal::AtLeast(v) => measured >= v,
        }
    }

    /// `<=` or `>=`.
    pub fn sign(self) -> &'static str {
        match self {
            Goal::AtMost(_) => "<=",
            Goal::AtLeast(_) => ">=",
        }
    }
}

/// Every target, with its goal and the part that measures it: the one list the parts and
/// `scripts/bench` (through `vsock-bench targets`) share.
pub const TARGETS: &[(&str, &str, Goal)] = &[
    ("engine_tx64k_ns", "engine", Goal::AtMost(100.0)),
    ("engine_rx4k_ns", "engine", Goal::AtMost(100.0)),
    ("relay_g2h_cpu_ratio", "relay", Goal::AtMost(1.5)),
    ("relay_h2g_cpu_ratio", "relay", Goal::AtMost(2.0)),
    ("rtt_ratio", "latency", Goal::AtMost(2.0)),
    ("streams8_g2h", "streams", Goal::AtLeast(1.0)),
    ("streams64_g2h", "streams", Goal::AtLeast(1.0)),
    ("streams8_h2g", "streams", Goal::AtLeast(1.0)),
    ("streams64_h2g", "streams", Goal::AtLeast(1.0)),
    ("setup_rate_ratio", "setup", Goal::AtLeast(0.1)),
    ("idle_conn_bytes", "idle", Goal::AtMost(512.0)),
    ("idle_conn_bytes_100k", "idle", Goal::AtMost(512.0)),
    ("idle_100k_of_bound", "idle", Goal::AtMost(1.0)),
];

/// The goal of target `name`.
///
/// # Panics
///
/// If there is no such target (a bug in a part).
pub fn goal(name: &str) -> Goal {
    TARGETS
        .iter()
        .find(|t| t.0 == name)
        .map(|t| t.2)
        .unwrap_or_else(|| panic!("no target {name}"))
}

/// A number as the table shows it: three significant digits, no exponent.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.5}")
    }
}

/// The lines one part prints.
pub struct Report {
    part: &'static str,
}

impl Report {
    /// The report of part `part`.
    pub fn new(part: &'static str) -> Report {
        Report { part }
    }

    /// One figure of the table.
    pub fn row(&self, name: &str, value: f64, unit: &str, note: &str) {
        println!(
            "row\t{}\t{name}\t{}\t{unit}\t{note}",
            self.part,
            fmt_value(value)
        );
    }

    /// One target: its row in the table (with the goal), and its `target` line.
    pub fn target(&self, name: &str, measured: f64, note: &str) {
        let goal = goal(name);
        let met = measured.is_finite() && goal.met(measured);
        let verdict = if met { "met" } else { "missed" };
        self.row(
            name,
            measured,
            "",
            &format!(
                "target {} {}: {verdict}; {note}",
                goal.sign(),
                fmt_value(goal.value())
            ),
        );
        println!(
            "target {name} measured {} goal {} {verdict}",
            fmt_value(measured),
            fmt_value(goal.value())
        );
    }
}

/// Where the benchmark's threads run. The thread being measured (the device's, the relay
/// thread, the acceptor of the set-up baseline, the echo side of the raw ping-pong) and the
/// threads that feed it (the guest, the host peer, the writer and reader) are placed the
/// same way for the device and for its baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The measured thread on a CPU of its own (CPU 1), the others sharing CPU 0: every
    /// hand-off between the measured thread and another crosses CPUs, as between a vCPU and
    /// a VMM's I/O thread.
    Split,
    /// Every thread on CPU 0: hand-offs are context switches on one CPU.
    One,
    /// No binding: wherever the scheduler puts them.
    Free,
}

static PLACEMENT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

impl Placement {
    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Placement::Split => "split",
            Placement::One => "one",
            Placement::Free => "free",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Placement> {
        [Placement::Split, Placement::One, Placement::Free]
            .into_iter()
            .find(|p| p.name() == s)
    }

    /// The placement in force (split on a machine with one CPU is one).
    pub fn current() -> Placement {
        match PLACEMENT.load(std::sync::atomic::Ordering::Relaxed) {
            0 if sys::cpus() < 2 => Placement::One,
            0 => Placement::Split,
            1 => Placement::One,
            _ => Placement::Free,
        }
    }

    /// Puts this placement in force.
    pub fn set(self) {
        let v = match self {
            Placement::Split => 0,
            Placement::One => 1,
            Placement::Free => 2,
        };
        PLACEMENT.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    fn cpus(self, measured: bool) -> Vec<usize> {
        match self {
            Placement::Split if measured => vec![1],
            Placement::Split | Placement::One => vec![0],
            Placement::Free => (0..sys::cpus()).collect(),
        }
    }

    /// Places thread `tid` (0: the calling thread) as a measured thread.
    pub fn place_measured(tid: i32) {
        sys::set_affinity(tid, &Placement::current().cpus(true));
    }

    /// Places the calling thread as one that feeds the measured thread.
    pub fn place_peer() {
        sys::set_affinity(0, &Placement::current().cpus(false));
    }
}

/// Options every part takes.
#[derive(Clone, Debug)]
pub struct Opts {
    /// The short run (`--quick`): fewer bytes and repetitions.
    pub quick: bool,
    /// Repetitions whose median is reported (`--reps N`; 5 quick, 7 full).
    pub reps: usize,
    /// The runtimes to measure (`--runtime mio,tokio,smol`; all by default).
    pub runtimes: Vec<Runtime>,
    /// The guest's data packet rate, packets per second (`--rate N`; 0 or absent: as fast as
    /// credit allows). For host to guest, the host peer's 64 KiB writes per second.
    pub rate: Option<u64>,
    /// Bytes per throughput run (`--mib N`).
    pub bytes: u64,
    /// Where threads run (`--placement split|one|free`; split by default).
    pub placement: Placement,
    /// Where the guest's kicks go (`--kick queue|loop`; queue by default: each queue's own
    /// eventfd, watched by the loop).
    pub kick: guest::Kick,
    /// The device engine's buffer per connection, bytes (`--buffer-kib N`; 0, the default:
    /// the engine's default, 256 KiB). Parts 2 to 4.
    pub buffer: u32,
}

impl Opts {
    /// Parses the options after the part's name.
    ///
    /// # Errors
    ///
    /// An unknown option or a bad value.
    pub fn parse(args: &[String]) -> Result<Opts, String> {
        let mut quick = false;
        let mut reps = None;
        let mut runtimes = Runtime::ALL.to_vec();
        let mut rate = None;
        let mut mib = None;
        let mut placement = Placement::Split;
        let mut kick = guest::Kick::Queue;
        let mut buffer = 0;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value"))
            };
            match a.as_str() {
                "--quick" => quick = true,
                "--reps" => reps = Some(num(&value("--reps")?)?),
                "--rate" => rate = Some(num(&value("--rate")?)?).filter(|&r| r > 0),
                "--mib" => mib = Some(num(&value("--mib")?)?),
                "--buffer-kib" => {
                    let kib = num(&value("--buffer-kib")?)?;
                    buffer = u32::try_from(kib << 10).map_err(|_| "buffer too large")?;
                }
                "--kick" => {
                    kick = match value("--kick")?.as_str() {
                        "queue" => guest::Kick::Queue,
                        "loop" => guest::Kick::Loop,
                        other => return Err(format!("unknown kick {other}")),
                    }
                }
                "--placement" => {
                    let v = value("--placement")?;
                    placement = Placement::parse(&v).ok_or(format!("unknown placement {v}"))?;
                }
                "--runtime" => {
                    runtimes = value("--runtime")?
                        .split(',')
                        .map(|s| Runtime::parse(s).ok_or(format!("unknown runtime {s}")))
                        .collect::<Result<_, _>>()?;
                }
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(Opts {
            quick,
            reps: reps
                .map(|r| r as usize)
                .unwrap_or(if quick { 5 } else { 7 }),
            runtimes,
            rate,
            bytes: mib.unwrap_or(if quick { 512 } else { 1024 }) << 20,
            placement,
            kick,
            buffer,
        })
    }
}

fn num(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("not a number: {s}"))
}

/// The median of `values` (the mean of the middle two for an even count; NaN if empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "median of N, range LOW..HIGH": how a median over repetitions was taken, for the notes.
pub fn spread(values: &[f64]) -> String {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "median of {}, range {}..{}",
        values.len(),
        fmt_value(lo),
        fmt_value(hi)
    )
}

/// Prints a progress line on stderr.
pub fn progress(msg: &str) {
    eprintln!("vsock-bench: {msg}");
}

/// Bytes in a GiB, as a float.
pub const GIB: f64 = (1u64 << 30) as f64;
/// Bytes in a MiB, as a float.
pub const MIB: f64 = (1u64 << 20) as f64;
