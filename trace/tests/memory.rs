//! A trace is input: its recorded configuration must not make a replay hold more memory than
//! the replay's budget. Measured with a counting allocator (this test binary's own), so the
//! tests here run one at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vsock_core::testing::guest_pkt;
use vsock_core::wire::{Header, Op};
use vsock_core::{Config, Engine, GuestBytes, Instant, Io, MemoryFault, Tx};
use vsock_trace::{replay, replay_within, ReplayError, TraceWriter, DEFAULT_MEMORY_BUDGET};

mod common;
use common::{settle, Shared};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One test at a time: the counts are the whole process's.
static SERIAL: Mutex<()> = Mutex::new(());

/// The most bytes held at once while `f` runs, beyond what was held when it started.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

fn from_guest(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
    guest_pkt(op, src_port, dst_port, len, 0, 65536, 0)
}

/// A payload of zeros as long as asked, without holding it.
struct Zeros;

impl GuestBytes for Zeros {
    fn copy_to(&mut self, _: usize, dst: &mut [u8]) -> Result<(), MemoryFault> {
        dst.fill(0);
        Ok(())
    }
}

/// The session that costs an engine with `config` the most memory: every connection open,
/// each holding a full buffer the host socket would not take, and every orphan RST the
/// engine keeps owed. Payloads are not kept (snap length 0), so the trace is small.
fn worst_case_trace(config: &Config) -> Vec<u8> {
    let out = Shared::default();
    let mut e = Engine::new(config.clone(), Instant::ZERO).unwrap();
    e.set_recorder(Some(Box::new(TraceWriter::new(out.clone(), 0, 0).unwrap())))
        .unwrap();
    let now = Instant::from_millis(1);
    for i in 0..config.max_connections as u32 {
        let port = 10_000 + i;
        assert!(matches!(
            e.handle_tx(now, &from_guest(Op::Request, port, 80, 0)),
            Tx::Done
        ));
        settle(&mut e, now);
        match e.handle_tx(now, &from_guest(Op::Rw, port, 80, config.buffer_size)) {
            Tx::Data(d) => d.complete(Io::WouldBlock, &mut Zeros).unwrap(),
            Tx::Done => panic!("connection {i} took no payload"),
        }
        settle(&mut e, now);
    }
    assert_eq!(e.connections(), config.max_connections);
    assert_eq!(
        e.buffer_memory(),
        config.max_connections * config.buffer_size as usize
    );
    // Packets for no connection: each is owed an RST, until the queue is full.
    for i in 0..config.max_pending_resets as u32 + 4 {
        assert!(matches!(
            e.handle_tx(now, &from_guest(Op::Rw, 1, 9_000 + i, 0)),
            Tx::Done
        ));
    }
    drop(e.set_recorder(None));
    drop(e);
    out.bytes()
}

/// A trace with `config` and nothing else.
fn start_only(config: Config) -> Vec<u8> {
    let out = Shared::default();
    let mut e = Engine::new(config, Instant::ZERO).unwrap();
    e.set_recorder(Some(Box::new(TraceWriter::new(out.clone(), 0, 0).unwrap())))
        .unwrap();
    drop(e.set_recorder(None));
    drop(e);
    out.bytes()
}

/// A configuration whose buffers and connection count each look modest but whose product is
/// hostile (65,536 connections of 64 MiB: 4 TiB) is refused before any engine is built, by
/// the library and by `vsock-replay` (exit 2).
#[test]
fn a_hostile_configuration_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = Config::new(3);
    config.buffer_size = 64 << 20;
    config.max_connections = 1 << 16;
    config.credit_update_threshold = 64 << 10;
    let needs = Engine::memory_bound(&config);
    assert!(needs > 4 << 40, "{needs}");
    let trace = start_only(config);
    assert!(trace.len() < 1024);
    let (result, peak) = peak_of(|| replay(&trace));
    match result {
        Err(ReplayError::TooLarge { needs: n, budget }) => {
            assert_eq!((n, budget), (needs, DEFAULT_MEMORY_BUDGET));
        }
        other => panic!("a 4 TiB configuration replayed: {other:?}"),
    }
    assert!(peak < 1 << 20, "refusing it took {peak} bytes");

    let path = std::env::temp_dir().join(format!("vsock-hostile-{}.pcapng", std::process::id()));
    std::fs::write(&path, &trace).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vsock-replay"))
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("over the replay's budget"), "{stderr}");
}

/// The largest `buffer_size` for which `config`'s bound fits `budget`.
fn largest_buffer(mut config: Config, budget: u64) -> Config {
    let (mut lo, mut hi) = (1u32, 1 << 30);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        config.buffer_size = mid;
        if Engine::memory_bound(&config) <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    config.buffer_size = lo;
    config.credit_update_threshold = config.credit_update_threshold.min(lo);
    config
}

/// Replays the worst session of `config` within `budget`: accepted, and it holds no more
/// than the bound (and the bound is not loose: the session reaches most of it). At the edge
/// (`at_edge`), one byte more per buffer is refused.
fn worst_case_fits(config: Config, budget: u64, at_edge: bool) {
    let needs = Engine::memory_bound(&config);
    assert!(needs <= budget);
    let trace = worst_case_trace(&config);
    // What the replay itself holds beside the engine: the records read from the trace.
    let (read, own) = peak_of(|| vsock_trace::replay::read(&trace).map(|e| e.len()));
    read.unwrap();
    let own = own as u64;
    let (result, peak) = peak_of(|| replay_within(&trace, budget));
    result.unwrap_or_else(|e| panic!("{config:?}: {e}"));
    let peak = peak as u64;
    assert!(
        peak <= needs + own,
        "{config:?}: held {peak} bytes, bound {needs}"
    );
    // A stream session fills one buffer per connection; the bound also counts what only
    // seqpacket connections hold (each buffer's bitmap of message ends, and a stage of the
    // same size): a stream session reaches 1 / 2.25 of it.
    assert!(
        peak >= needs * 2 / 5,
        "{config:?}: held {peak} bytes, bound {needs}"
    );
    eprintln!(
        "{} connections of {} bytes: held {peak} ({own} of it the records), bound {needs}, \
         budget {budget}",
        config.max_connections, config.buffer_size
    );
    if at_edge {
        let mut over = config;
        over.buffer_size += 1;
        assert!(matches!(
            replay_within(&start_only(over), budget),
            Err(ReplayError::TooLarge { .. })
        ));
    }
}

/// For configurations at the edge of a budget (a few large buffers; many small ones and
/// every reset owed; the defaults under the default budget), the worst session replays
/// within the bound; a configuration beyond the budget is refused without a byte of its
/// buffers allocated.
#[test]
fn replay_of_any_accepted_configuration_stays_within_the_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let budget = 48 << 20;
    let mut few = Config::new(3);
    few.max_connections = 4;
    few.pooled_buffers = 4;
    worst_case_fits(largest_buffer(few, budget), budget, true);
    let mut many = Config::new(3);
    many.max_connections = 1500;
    many.max_pending_resets = 1 << 16;
    many.pooled_buffers = 0;
    worst_case_fits(largest_buffer(many, budget), budget, true);
    worst_case_fits(Config::new(3), DEFAULT_MEMORY_BUDGET, false);

    // 20 connections of 64 MiB: 1.25 GiB, from a trace of a few kilobytes. Replayed before
    // the budget, it held all of it.
    let mut config = Config::new(3);
    config.buffer_size = 64 << 20;
    config.max_connections = 20;
    let trace = worst_case_trace(&config);
    assert!(trace.len() < 64 << 10, "{} bytes", trace.len());
    let (result, peak) = peak_of(|| replay(&trace));
    assert!(
        matches!(result, Err(ReplayError::TooLarge { .. })),
        "{result:?}"
    );
    assert!(peak < 1 << 20, "refusing it took {peak} bytes");
}
