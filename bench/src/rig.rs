//! The device under test: a [`Guest`]'s rings served by one runtime's ready-made loop on a
//! thread of its own, through a [`Transport`] that owns the device's view of the queues and
//! interrupts the guest through an eventfd, and a kick eventfd the guest writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vsock_core::testing::GUEST_CID;
use vsock_core::{Config, Stats};
use vsock_device::{DeviceStats, KickFd, Queues, Served, Transport, VsockDevice};
use vsock_host::{DriverConfig, DriverThread};
use vsock_mio::MioLoop;
use vsock_smol::VsockSmol;
use vsock_tokio::VsockTokio;

use crate::guest::{Guest, Kick};
use crate::sys::{gettid, threads_named, EventFd};
use crate::Placement;

/// A runtime crate's ready-made loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `vsock_mio::MioLoop`.
    Mio,
    /// `vsock_tokio::VsockTokio::spawn` (a current-thread runtime).
    Tokio,
    /// `vsock_smol::VsockSmol::spawn` (`async_io::block_on`).
    Smol,
}

impl Runtime {
    /// All three.
    pub const ALL: [Runtime; 3] = [Runtime::Mio, Runtime::Tokio, Runtime::Smol];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Mio => "mio",
            Runtime::Tokio => "tokio",
            Runtime::Smol => "smol",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Runtime> {
        Runtime::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The device's threads' names, for the notes.
    pub fn thread_names(self) -> String {
        self.threads().join(" + ")
    }

    /// The names of the threads whose CPU is the device's: the loop's thread, and for smol
    /// async-io's own reactor thread, which takes over the reactor whenever `block_on` is not
    /// polling it.
    fn threads(self) -> &'static [&'static str] {
        match self {
            Runtime::Mio => &["vsock-mio"],
            Runtime::Tokio => &["vsock-tokio"],
            Runtime::Smol => &["vsock-smol", "async-io"],
        }
    }
}

/// What the device's loop left when stopped.
#[derive(Clone, Debug)]
pub struct Final {
    /// The device's counters.
    pub device: DeviceStats,
    /// The engine's counters.
    pub engine: Stats,
}

impl Final {
    fn of(device: &VsockDevice) -> Final {
        Final {
            device: device.stats().clone(),
            engine: device.engine().stats().clone(),
        }
    }
}

/// The VMM's side of the transport: the device's view of the queues and the guest's
/// interrupt. It is the device thread's alone, so it needs no lock.
struct BenchTransport {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
    irq: EventFd,
    /// The queues' kick descriptors, for the loop to watch itself.
    kicks: Vec<KickFd>,
    /// What the loop said of each: (queue, watched).
    watched: std::sync::mpsc::Sender<(u16, bool)>,
    /// Where the loop's thread id goes, the first time it takes the queues.
    tid: Option<std::sync::mpsc::Sender<i32>>,
}

impl Transport for BenchTransport {
    type Memory = GuestMemoryMmap;

    fn with_queues<R>(&mut self, f: impl FnOnce(&GuestMemoryMmap, Queues<'_>) -> R) -> Option<R> {
        if let Some(tid) = self.tid.take() {
            let _ = tid.send(gettid());
        }
        let [rx, tx, event] = &mut self.queues;
        Some(f(&self.mem, Queues { rx, tx, event }))
    }

    fn notify(&mut self, served: &Served) {
        // One interrupt line for the three queues: the guest looks at both rings when woken.
        if served.notify_rx || served.notify_tx || served.notify_event {
            self.irq.signal();
        }
    }

    fn take_kick_fd(&mut self) -> Option<KickFd> {
        self.kicks.pop()
    }

    fn kick_fd_watched(&mut self, queue: u16, watched: bool) {
        let _ = self.watched.send((queue, watched));
    }
}

/// A directory of sockets, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system's temporary directory.
    pub fn new(what: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vsock-bench-{}-{what}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One device on one runtime, serving a guest's rings.
pub struct Device {
    /// The runtime.
    pub runtime: Runtime,
    thread: Option<DriverThread<Final>>,
    tids: Vec<i32>,
    dir: TempDir,
}

static KICK_LOOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Where the guests of [`Device::start`] send their kicks from now on.
pub fn set_kick(kick: Kick) {
    KICK_LOOP.store(kick == Kick::Loop, Ordering::Relaxed);
}

/// Where the guests of [`Device::start`] send their kicks.
pub fn kick() -> Kick {
    if KICK_LOOP.load(Ordering::Relaxed) {
        Kick::Loop
    } else {
        Kick::Queue
    }
}

static BUFFER: AtomicU32 = AtomicU32::new(0);

/// The engine's `buffer_size` for the devices of [`bench_config`] from now on (0: the
/// default), through `Config::with_buffer_size`.
pub fn set_buffer_size(bytes: u32) {
    BUFFER.store(bytes, Ordering::Relaxed);
}

/// The engine configuration of every in-process benchmark: the defaults (or the buffer size
/// [`set_buffer_size`] chose), with room for the streams and set-up benchmarks' connections.
pub fn bench_config() -> Config {
    let mut config = Config::new(GUEST_CID);
    match BUFFER.load(Ordering::Relaxed) {
        0 => {}
        bytes => config = config.with_buffer_size(bytes),
    }
    config.max_connections = 4096;
    config
}

impl Device {
    /// Starts a device with `config` on `runtime`, activated with every feature it offers
    /// (EVENT_IDX among them) on `guest`'s rings. With `kick` [`Kick::Queue`], the rx and tx
    /// queues' own kick eventfds are handed to the loop, and the guest kicks them once the
    /// loop watches them (the loop's kick descriptor otherwise).
    pub fn start_with(runtime: Runtime, config: Config, guest: &mut Guest, kick: Kick) -> Device {
        let dir = TempDir::new(runtime.name());
        let driver_config = DriverConfig {
            engine: config,
            uds_path: dir.path().join("vsock"),
            seqpacket: true,
            siblings: None,
        };
        let mut queues = guest.device_queues();
        let activate = |device: &mut VsockDevice, queues: &mut [Queue; 3]| {
            device
                .ack_features(device.features())
                .expect("the device's own features");
            let [rx, tx, event] = queues;
            device.activate(Queues { rx, tx, event });
            assert!(device.event_idx(), "EVENT_IDX negotiated");
        };
        let loop_kick = guest.kick_fd();
        let irq = guest.irq();
        let mem = guest.mem.clone();
        let kicks = match kick {
            Kick::Queue => (0..2)
                .map(|q| KickFd {
                    queue: q as u16,
                    fd: Some(guest.queue_kick_fd(q)),
                })
                .collect(),
            Kick::Loop => Vec::new(),
        };
        let expected = kicks.len();
        let (watched, reports) = std::sync::mpsc::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let transport = |mem, queues| BenchTransport {
            mem,
            queues,
            irq,
            kicks,
            watched,
            tid: Some(tid_tx),
        };
        let thread = match runtime {
            Runtime::Mio => {
                let mut lp = MioLoop::new(driver_config).expect("mio loop");
                activate(lp.driver_mut().device_mut(), &mut queues);
                lp.spawn(transport(mem, queues), loop_kick)
                    .expect("spawn")
                    .map(|v| Final::of(v.device()))
            }
            Runtime::Tokio => {
                let mut v = VsockTokio::new(driver_config).expect("tokio driver");
                activate(v.device_mut(), &mut queues);
                v.spawn(transport(mem, queues), loop_kick)
                    .expect("spawn")
                    .map(|v| Final::of(v.device()))
            }
            Runtime::Smol => {
                let mut v = VsockSmol::new(driver_config).expect("smol driver");
                activate(v.device_mut(), &mut queues);
                v.spawn(transport(mem, queues), loop_kick)
                    .expect("spawn")
                    .map(|v| Final::of(v.device()))
            }
        };
        // The loop's thread says who it is the first time it takes the queues.
        let tid = tid_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the loop serves");
        let mut tids = vec![tid];
        // async-io's reactor thread is the process's, shared by every smol device.
        for name in &runtime.threads()[1..] {
            tids.extend(threads_named(name));
        }
        for &t in &tids {
            Placement::place_measured(t);
        }
        // The loop takes the kick descriptors before it first serves.
        for _ in 0..expected {
            let (q, ok) = reports
                .recv_timeout(std::time::Duration::from_secs(5))
                .expect("the loop reports its kick descriptors");
            if ok {
                guest.set_kick(q as usize, Kick::Queue);
            } else {
                crate::progress(&format!(
                    "the {} loop does not watch queue {q}'s kicks: the guest kicks its descriptor",
                    runtime.name()
                ));
            }
        }
        // The caller is the guest.
        Placement::place_peer();
        Device {
            runtime,
            thread: Some(thread),
            tids,
            dir,
        }
    }

    /// Starts a device as [`start_with`](Self::start_with), with the kicks [`set_kick`]
    /// chose ([`Kick::Queue`] unless told otherwise: a VMM whose loop watches its
    /// ioeventfds).
    pub fn start(runtime: Runtime, config: Config, guest: &mut Guest) -> Device {
        Device::start_with(runtime, config, guest, kick())
    }

    /// `<uds_path>_<port>`, where a guest connection to `port` goes.
    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir.path().join(format!("vsock_{port}"))
    }

    /// `<uds_path>`, where host clients connect.
    pub fn listener_path(&self) -> PathBuf {
        self.dir.path().join("vsock")
    }

    /// The device's threads: the loop's, and for smol async-io's reactor thread.
    pub fn tids(&self) -> &[i32] {
        &self.tids
    }

    /// Stops the loop and returns its counters.
    pub fn stop(mut self) -> Final {
        self.thread
            .take()
            .expect("running")
            .stop()
            .expect("the loop stops cleanly")
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.stop();
        }
    }
}
