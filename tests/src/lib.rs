//! The cross-runtime conformance suite: one list of scenarios run on the mio, tokio and smol
//! adapters alike (see `tests/conformance.rs`), with the Linux guest model over real virtqueue
//! memory on the test thread, the device on the runtime's own thread, and real Unix sockets on
//! the host side.
//!
//! [`Rig`] starts one device on one runtime and drives its guest until a condition holds.
#![forbid(unsafe_code)]

pub mod guest;
pub mod tshark;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vsock_core::{Config, Instant};
use vsock_device::testing::{Guest, Layout};

use vsock_device::VsockDevice;
use vsock_device::{DeviceRequest, Queues, Served, Transport};
use vsock_host::{DriverConfig, DriverThread, Host};
use vsock_mio::{MioLoop, MioReactor, VsockMio};
use vsock_smol::VsockSmol;
use vsock_tokio::VsockTokio;

/// The guest's CID in every scenario.
pub const GUEST_CID: u64 = 3;

/// The runtime under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// `vsock-mio`'s ready-made loop.
    Mio,
    /// `vsock-tokio` on a current-thread runtime of its own.
    Tokio,
    /// `vsock-smol` on a thread of its own.
    Smol,
}

/// What the VMM shares with the runtime thread: guest memory (also the guest model's), the
/// device's queues, and lifecycle requests.
struct Shared {
    mem: GuestMemoryMmap,
    queues: [Queue; 3],
    requests: VecDeque<DeviceRequest>,
    /// Whether a guest is there: without one, the transport has no queues to hand out.
    attached: bool,
}

/// The VMM's side of the transport.
struct RigTransport(Arc<Mutex<Shared>>);

impl Transport for RigTransport {
    type Memory = GuestMemoryMmap;

    fn with_queues<R>(&mut self, f: impl FnOnce(&GuestMemoryMmap, Queues<'_>) -> R) -> Option<R> {
        let mut shared = self.0.lock().unwrap();
        if !shared.attached {
            return None;
        }
        let Shared { mem, queues, .. } = &mut *shared;
        let [rx, tx, event] = queues;
        Some(f(mem, Queues { rx, tx, event }))
    }

    fn notify(&mut self, _served: &Served) {
        // The guest model polls its used rings.
    }

    fn take_request(&mut self) -> Option<DeviceRequest> {
        self.0.lock().unwrap().requests.pop_front()
    }
}

/// A fresh directory for one scenario's sockets. Directories left by test processes that
/// have ended are removed on the first call, so runs do not pile them up.
pub fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("vsock-conf-")) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or_default();
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    let dir = std::env::temp_dir().join(format!(
        "vsock-conf-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One device on one runtime, its guest, and its socket directory.
pub struct Rig {
    /// The Linux-like guest, driven from the test thread.
    pub guest: Guest,
    /// The directory holding `vsock` (the listener) and `vsock_<port>` sockets.
    pub dir: PathBuf,
    kick: UnixStream,
    running: Option<DriverThread<Stopped>>,
    started: std::time::Instant,
    shared: Arc<Mutex<Shared>>,
    features: u64,
}

/// A driver the rig stopped: every runtime's, behind one type.
pub enum Stopped {
    /// `vsock-mio`'s.
    Mio(VsockMio),
    /// `vsock-tokio`'s.
    Tokio(VsockTokio),
    /// `vsock-smol`'s.
    Smol(VsockSmol),
}

impl Stopped {
    /// The device, for its counters and the engine's.
    pub fn device(&self) -> &VsockDevice {
        match self {
            Stopped::Mio(v) => v.device(),
            Stopped::Tokio(v) => v.device(),
            Stopped::Smol(v) => v.device(),
        }
    }

    /// The host side: what is left of the socket table, and its counters.
    pub fn host(&self) -> &Host<MioReactor> {
        match self {
            Stopped::Mio(v) => v.host(),
            Stopped::Tokio(v) => v.host(),
            Stopped::Smol(v) => v.host(),
        }
    }
}

impl Rig {
    /// Starts a device with `config` on `runtime`.
    pub fn start(runtime: Runtime, config: Config) -> Rig {
        Rig::start_recorded(runtime, config, None)
    }

    /// Starts a device with `config` on `runtime`, with `recorder` attached to its engine
    /// before anything happens.
    pub fn start_recorded(
        runtime: Runtime,
        config: Config,
        recorder: Option<Box<dyn vsock_core::record::Recorder>>,
    ) -> Rig {
        Rig::start_inner(runtime, config, recorder, true, None)
    }

    /// Starts a device with `config` (its guest CID among `siblings`) on `runtime`, linked
    /// to its sibling VMs; its guest model's sockets all talk to `peer_cid`.
    pub fn start_sibling(
        runtime: Runtime,
        config: Config,
        siblings: &vsock_host::Siblings,
        peer_cid: u64,
    ) -> Rig {
        let link = siblings
            .link(config.guest_cid)
            .expect("the CID is among the siblings");
        let mut rig = Rig::start_inner(runtime, config, None, true, Some(link));
        rig.guest.stack.peer_cid = peer_cid;
        rig
    }

    /// Starts a device with `config` on `runtime` with no guest attached: the transport has no
    /// queues until [`attach`](Self::attach), as a daemon started before its VM.
    pub fn start_detached(runtime: Runtime, config: Config) -> Rig {
        Rig::start_inner(runtime, config, None, false, None)
    }

    fn start_inner(
        runtime: Runtime,
        config: Config,
        recorder: Option<Box<dyn vsock_core::record::Recorder>>,
        attached: bool,
        siblings: Option<vsock_host::SiblingLink>,
    ) -> Rig {
        let dir = temp_dir();
        let cid = config.guest_cid;
        let driver_config = DriverConfig {
            engine: config,
            uds_path: dir.join("vsock"),
            seqpacket: true,
            siblings,
        };
        let mut guest = Guest::new(cid);
        guest.tx_layouts = vec![
            Layout::Single,
            Layout::HeaderThenData,
            Layout::Cuts(vec![20, 44, 300]),
        ];
        let mut queues = guest.driver.device_queues(false);
        let activate = move |device: &mut VsockDevice, queues: &mut [Queue; 3]| {
            if recorder.is_some() {
                device
                    .engine_mut()
                    .set_recorder(recorder)
                    .expect("an engine that has seen nothing takes a recorder");
            }
            if attached {
                device.ack_features(device.features()).unwrap();
                let [rx, tx, event] = queues;
                device.activate(Queues { rx, tx, event });
            }
            device.features()
        };
        let (kick, theirs) = UnixStream::pair().unwrap();
        kick.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let theirs = OwnedFd::from(theirs);
        let mem = guest.driver.mem.clone();
        let features = Arc::new(Mutex::new(0u64));
        let feats = features.clone();
        let activate = move |device: &mut VsockDevice, queues: &mut [Queue; 3]| {
            *feats.lock().unwrap() = activate(device, queues);
        };
        // The driver is built and the device activated here; the queues then move into the
        // state shared with the runtime's thread.
        let mut mio = None;
        let mut tokio = None;
        let mut smol = None;
        let device = match runtime {
            Runtime::Mio => mio
                .insert(MioLoop::new(driver_config).unwrap())
                .driver_mut()
                .device_mut(),
            Runtime::Tokio => tokio
                .insert(VsockTokio::new(driver_config).unwrap())
                .device_mut(),
            Runtime::Smol => smol
                .insert(VsockSmol::new(driver_config).unwrap())
                .device_mut(),
        };
        activate(device, &mut queues);
        let shared = Arc::new(Mutex::new(Shared {
            mem,
            queues,
            requests: VecDeque::new(),
            attached,
        }));
        let transport = RigTransport(shared.clone());
        let running = if let Some(lp) = mio {
            lp.spawn(transport, theirs).unwrap().map(Stopped::Mio)
        } else if let Some(v) = tokio {
            v.spawn(transport, theirs).unwrap().map(Stopped::Tokio)
        } else {
            let v = smol.expect("one runtime");
            v.spawn(transport, theirs).unwrap().map(Stopped::Smol)
        };
        let features = *features.lock().unwrap();
        Rig {
            guest,
            dir,
            kick,
            running: Some(running),
            started: std::time::Instant::now(),
            shared,
            features,
        }
    }

    /// The guest model's clock.
    pub fn now(&self) -> Instant {
        Instant::from_nanos(self.started.elapsed().as_nanos() as u64)
    }

    /// `<uds_path>`, where host clients connect.
    pub fn listener(&self) -> PathBuf {
        self.dir.join("vsock")
    }

    /// `<uds_path>_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        self.dir.join(format!("vsock_{port}"))
    }

    /// One round of the guest driver; kicks the device if it did anything.
    pub fn step(&mut self) {
        let now = self.now();
        if self.guest.step(now) {
            let _ = self.kick.write(b"k");
        }
    }

    /// Drives the guest until `done` holds, or panics after `limit`.
    pub fn until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&mut Guest) -> bool) {
        let start = std::time::Instant::now();
        loop {
            self.step();
            if done(&mut self.guest) {
                return;
            }
            assert!(start.elapsed() < limit, "gave up waiting for: {what}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The guest's driver resets the device: every connection is dropped, and the guest
    /// model starts over with fresh memory and rings, which it then activates again (as a
    /// driver does after a reset).
    pub fn reset_device(&mut self) {
        self.shared
            .lock()
            .unwrap()
            .requests
            .push_back(DeviceRequest::Reset);
        let _ = self.kick.write(b"r");
        let mut guest = Guest::new(self.guest.stack.cid);
        guest.tx_layouts = self.guest.tx_layouts.clone();
        guest.stack.peer_cid = self.guest.stack.peer_cid;
        let queues = guest.driver.device_queues(false);
        {
            let mut shared = self.shared.lock().unwrap();
            // The reset goes first: the new rings are activated only after it is carried out.
            shared.mem = guest.driver.mem.clone();
            shared.queues = queues;
            shared.requests.push_back(DeviceRequest::Activate {
                features: self.features,
            });
        }
        self.guest = guest;
        let _ = self.kick.write(b"a");
    }

    /// Attaches the guest to a device started with [`start_detached`](Self::start_detached):
    /// its driver activates the device on its rings.
    pub fn attach(&mut self) {
        {
            let mut shared = self.shared.lock().unwrap();
            assert!(!shared.attached, "already attached");
            shared.attached = true;
            shared.requests.push_back(DeviceRequest::Activate {
                features: self.features,
            });
        }
        let _ = self.kick.write(b"a");
    }

    /// Stops the device's queues and starts them again under the same driver, as a paused and
    /// resumed VM does: the guest keeps its rings and its connections.
    pub fn pause_device(&mut self) {
        {
            let mut shared = self.shared.lock().unwrap();
            shared.requests.push_back(DeviceRequest::Stop);
            shared.requests.push_back(DeviceRequest::Activate {
                features: self.features,
            });
        }
        let _ = self.kick.write(b"p");
    }

    /// Stops the runtime (a clean shutdown) and returns the driver for its counters.
    pub fn stop(self) -> Stopped {
        self.stop_with_guest().1
    }

    /// Stops the runtime (a clean shutdown); returns the guest, after one more look at its
    /// rings, and the driver.
    pub fn stop_with_guest(mut self) -> (Guest, Stopped) {
        let vsock = self.running.take().expect("running").stop().unwrap();
        self.step();
        let Rig { guest, .. } = self;
        (guest, vsock)
    }
}

/// The number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether a path exists.
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// Reads one message from a host seqpacket socket into `buf`: its length, 0 at end of file.
///
/// Linux's seqpacket receive looks at the queue, then at the peer's shutdown, unlocked, and so
/// can report end of file while the peer's last message, sent just before its shutdown, is
/// queued. A 0 is read again once: with the shutdown seen, everything sent before it is
/// queued. (These suites never send the host an empty message, which this would skip.)
pub fn read_seqpacket(s: &mut UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    match s.read(buf)? {
        0 => s.read(buf),
        n => Ok(n),
    }
}

/// One real-guest test per runtime (`mio::…`, `tokio::…`, `smol::…`), each calling
/// `super::$check(runtime_name)`, for the guest, fleet and vsock_test suites.
///
/// Each is marked ignored, with the reason, only where `tests/build.rs` found no guest image
/// or QEMU (a plain `cargo test` on a bare machine). They still run: `./scripts/test.sh`, the
/// README's test command and what CI runs through `.ci/run`, builds the image, installs QEMU
/// and sets `VSOCK_REQUIRE_GUEST=1`, under which a missing part fails them instead.
#[macro_export]
macro_rules! on_each_runtime {
    ($($check:ident),* $(,)?) => {
        $crate::on_each_runtime!(@on mio: $($check),*);
        $crate::on_each_runtime!(@on tokio: $($check),*);
        $crate::on_each_runtime!(@on smol: $($check),*);
    };
    (@on $runtime:ident: $($check:ident),*) => {
        mod $runtime {
            $(
                #[test]
                // Ignored only without the guest image or QEMU; `./scripts/test.sh` (CI's
                // command) provides both and sets VSOCK_REQUIRE_GUEST=1, so there they run,
                // and a missing part fails them.
                #[cfg_attr(
                    not(vsock_guest),
                    // Why: no guest image or QEMU on this machine. How it still runs: ./scripts/test.sh
                    // (the README's test command, and CI's) builds both and sets VSOCK_REQUIRE_GUEST=1.
                    ignore = "no guest image or QEMU; ./scripts/test.sh (CI) provides both and runs it"
                )]
                fn $check() {
                    super::$check(stringify!($runtime))
                }
            )*
        }
    };
}
