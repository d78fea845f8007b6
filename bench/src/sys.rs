//! The system interfaces std lacks, each behind a safe type: eventfds (the guest's kicks and
//! interrupts), `poll` on one descriptor, and a per-thread system call counter (a perf
//! tracepoint). Per-thread CPU time, context switches and the resident set come from `/proc`
//! and need no unsafe code.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// An eventfd: a counter the kernel wakes readers of. The guest kicks the device through one
/// and the device interrupts the guest through another, as `ioeventfd`/`irqfd` do in a VMM.
#[derive(Debug)]
pub struct EventFd(File);

impl EventFd {
    /// A new non-blocking eventfd with its counter at zero.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a negative return is an error, checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor eventfd just opened, owned by nothing else.
        Ok(EventFd(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// Adds one to the counter, waking a waiter.
    pub fn signal(&self) {
        // A counter cannot overflow at one increment per packet; a failure would be a bug.
        (&self.0)
            .write_all(&1u64.to_ne_bytes())
            .expect("eventfd write");
    }

    /// Reads the counter back to zero; returns whether it was set.
    pub fn clear(&self) -> bool {
        let mut buf = [0u8; 8];
        match (&self.0).read(&mut buf) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    /// Waits until the counter is set or `timeout` passes, then clears it. Returns whether it
    /// was set.
    pub fn wait(&self, timeout: Duration) -> bool {
        wait_readable(self.0.as_fd(), timeout);
        self.clear()
    }

    /// Another handle on the same counter.
    pub fn try_clone(&self) -> io::Result<EventFd> {
        Ok(EventFd(self.0.try_clone()?))
    }

    /// Another descriptor for the same counter (for the runtime, which owns what it is given).
    pub fn try_clone_owned(&self) -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(self.0.try_clone()?))
    }
}

/// Waits until `fd` is readable or `timeout` passes. Returns whether it is readable.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is one valid pollfd that lives across the call; `fd` is open while
    // borrowed.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// Waits until any of `fds` is ready for `events` (`POLLIN`, `POLLOUT`), or `timeout`.
/// `ready` gets each descriptor's returned events.
pub fn poll_many(fds: &[BorrowedFd<'_>], events: &[i16], ready: &mut Vec<i16>, timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .zip(events)
        .map(|(fd, &events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` holds `pfds.len()` valid pollfds for the duration of the call; every
    // descriptor is open while borrowed.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    ready.clear();
    ready.extend(pfds.iter().map(|p| p.revents));
}

/// The first fields of `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`, 64 bytes): all a
/// counting tracepoint event needs.
#[repr(C)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bit fields (`disabled`, `inherit`, `exclude_*`, ...): all clear, so the counter
    /// starts at once and counts in the kernel too.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// Counts the system calls one thread makes: a perf counter on the `raw_syscalls:sys_enter`
/// tracepoint, attached to that thread. Needs root or `kernel.perf_event_paranoid` ≤ 1 and a
/// mounted tracefs; [`SyscallCounter::open`] says why not otherwise.
pub struct SyscallCounter(File);

impl SyscallCounter {
    /// Starts counting the system calls of thread `tid` (of any process the caller may trace).
    pub fn open(tid: i32) -> Result<SyscallCounter, String> {
        let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/raw_syscalls/sys_enter/id")).ok()
            })
            .ok_or("no tracefs with raw_syscalls:sys_enter")?;
        let config: u64 = id
            .trim()
            .parse()
            .map_err(|e| format!("tracepoint id: {e}"))?;
        let attr = PerfEventAttr {
            type_: PERF_TYPE_TRACEPOINT,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config,
            sample_period: 0,
            sample_type: 0,
            read_format: 0,
            flags: 0,
            wakeup_events: 0,
            bp_type: 0,
            config1: 0,
        };
        // SAFETY: perf_event_open reads `size` bytes of `attr`, a live, fully initialised
        // struct of that size; the other arguments are plain integers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                tid,
                -1i32,
                -1i32,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(format!("perf_event_open: {}", io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor perf_event_open just opened, owned by nothing else.
        Ok(SyscallCounter(File::from(unsafe {
            OwnedFd::from_raw_fd(fd as i32)
        })))
    }

    /// System calls counted so far.
    pub fn read(&self) -> u64 {
        let mut buf = [0u8; 8];
        match (&self.0).read(&mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }
}

/// What `/proc` says about one thread at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadSample {
    /// Time on a CPU, in nanoseconds (`schedstat`; `stat`'s utime + stime if absent).
    pub cpu_ns: u64,
    /// Voluntary context switches: the times it blocked, so its wake-ups.
    pub voluntary: u64,
    /// Involuntary context switches (preempted).
    pub involuntary: u64,
}

impl ThreadSample {
    /// A sample of thread `tid` of this process, or zeros if it is gone.
    pub fn of(tid: i32) -> ThreadSample {
        let dir = format!("/proc/self/task/{tid}");
        let cpu_ns = std::fs::read_to_string(format!("{dir}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .or_else(|| {
                // Fields 14 and 15 (utime, stime) after the parenthesised name, in ticks.
                let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
                let rest = &stat[stat.rfind(')')? + 2..];
                let f: Vec<&str> = rest.split_whitespace().collect();
                let ticks: u64 =
                    f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
                Some(ticks * 10_000_000)
            })
            .unwrap_or(0);
        let status = std::fs::read_to_string(format!("{dir}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        ThreadSample {
            cpu_ns,
            voluntary: field("voluntary_ctxt_switches:"),
            involuntary: field("nonvoluntary_ctxt_switches:"),
        }
    }

    /// The change from `earlier` to `self`.
    pub fn since(&self, earlier: &ThreadSample) -> ThreadSample {
        ThreadSample {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }

    /// The sum of two samples (threads of one runtime).
    pub fn plus(&self, other: &ThreadSample) -> ThreadSample {
        ThreadSample {
            cpu_ns: self.cpu_ns + other.cpu_ns,
            voluntary: self.voluntary + other.voluntary,
            involuntary: self.involuntary + other.involuntary,
        }
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // "/proc/thread-self" links to "<pid>/task/<tid>".
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .expect("/proc/thread-self names the thread")
}

/// The ids of this process's threads named `name` (as `/proc/self/task/*/comm` has it).
pub fn threads_named(name: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut tids: Vec<i32> = dir
        .flatten()
        .filter_map(|e| {
            let tid: i32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim_end() == name).then_some(tid)
        })
        .collect();
    tids.sort_unstable();
    tids
}

/// The resident set of this process, in bytes (`/proc/self/statm`).
pub fn rss_bytes() -> u64 {
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf takes an integer and returns one.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(1) as u64
}

/// Raises this process's open-file limit to its hard limit (the streams and set-up benchmarks
/// hold many sockets). Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill and setrlimit to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// What some threads did between [`Window::open`] and [`Window::close`]: wall time, CPU
/// time, context switches and, where the kernel lets us count them, system calls.
pub struct Window {
    tids: Vec<i32>,
    start: std::time::Instant,
    sample: ThreadSample,
    counters: Result<Vec<SyscallCounter>, String>,
    syscalls: u64,
}

/// The result of a [`Window`].
#[derive(Clone, Debug)]
pub struct Measured {
    /// Wall time, seconds.
    pub secs: f64,
    /// The threads' CPU time, context switches.
    pub threads: ThreadSample,
    /// Their system calls, or why they could not be counted.
    pub syscalls: Result<u64, String>,
}

impl Window {
    /// Starts watching threads `tids` (summed).
    pub fn open(tids: &[i32]) -> Window {
        let counters: Result<Vec<SyscallCounter>, String> =
            tids.iter().map(|&t| SyscallCounter::open(t)).collect();
        let syscalls = counters
            .as_ref()
            .map(|c| c.iter().map(SyscallCounter::read).sum())
            .unwrap_or(0);
        Window {
            tids: tids.to_vec(),
            sample: Self::sample(tids),
            start: std::time::Instant::now(),
            counters,
            syscalls,
        }
    }

    fn sample(tids: &[i32]) -> ThreadSample {
        tids.iter().fold(ThreadSample::default(), |acc, &t| {
            acc.plus(&ThreadSample::of(t))
        })
    }

    /// Stops watching.
    pub fn close(self) -> Measured {
        let secs = self.start.elapsed().as_secs_f64();
        let threads = Self::sample(&self.tids).since(&self.sample);
        let syscalls = self
            .counters
            .map(|c| c.iter().map(SyscallCounter::read).sum::<u64>() - self.syscalls);
        Measured {
            secs,
            threads,
            syscalls,
        }
    }
}

impl Measured {
    /// CPU seconds per GiB moved.
    pub fn cpu_s_per_gib(&self, bytes: u64) -> f64 {
        self.threads.cpu_ns as f64 / 1e9 / (bytes as f64 / (1u64 << 30) as f64)
    }

    /// Voluntary context switches (wake-ups) per packet.
    pub fn wakes_per(&self, packets: u64) -> f64 {
        self.threads.voluntary as f64 / packets.max(1) as f64
    }

    /// System calls per packet (NaN if not counted).
    pub fn syscalls_per(&self, packets: u64) -> f64 {
        match &self.syscalls {
            Ok(n) => *n as f64 / packets.max(1) as f64,
            Err(_) => f64::NAN,
        }
    }
}

/// Binds thread `tid` (0: the calling thread) to the CPUs in `cpus`.
pub fn set_affinity(tid: i32, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data, valid when zeroed; CPU_ZERO and CPU_SET only write
    // inside it; sched_setaffinity reads `size_of::<cpu_set_t>()` bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// CPUs online.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// An epoll instance, edge-triggered: the host peer of the streams benchmark watches every
/// stream with one.
pub struct Epoll(OwnedFd);

impl Epoll {
    /// A new epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag; a negative return is an error, checked below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor epoll_create1 just opened, owned by nothing else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd`, edge-triggered, for readability (`write` false) or writability, under
    /// `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, write: bool, token: u64) -> io::Result<()> {
        let dir = if write { libc::EPOLLOUT } else { libc::EPOLLIN };
        let mut ev = libc::epoll_event {
            events: (dir | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event for the call to read; both descriptors are open.
        let r = unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for events; `tokens` gets the tokens of the ready descriptors.
    pub fn wait(&self, tokens: &mut Vec<u64>, timeout: Duration) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `evs` has room for the 64 events the call may write.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 64, ms) };
        tokens.clear();
        tokens.extend(evs.iter().take(n.max(0) as usize).map(|e| e.u64));
    }
}
