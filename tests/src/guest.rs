//! A real Linux guest as the judge: boots Debian's kernel under QEMU (TCG) against the
//! `vhost-user-vsock` daemon, runs a shell script in the guest against the in-kernel
//! virtio-vsock driver, and gives the host side of each check real Unix sockets.
//!
//! [`Daemon`] runs the daemon binary, [`Vm`] one guest, and the free functions are the host
//! peers: listeners on `<uds_path>_<port>`, `CONNECT` clients that retry until the guest
//! listens, and a seeded byte stream with its SHA-256.
//!
//! The guest image comes from `scripts/guest/build.sh` (in `target/guest`, or
//! `$VSOCK_GUEST_DIR`); the daemon from `cargo build --release -p vsock-vhost-user` (or
//! `$VSOCK_DAEMON`). Without the image or QEMU the tests are built marked ignored, with the
//! reason (`tests/build.rs` decides), unless `VSOCK_REQUIRE_GUEST=1` (set by `scripts/test.sh`)
//! makes that a failure; a missing daemon is always a failure, since cargo builds it.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// The guest's CID, as the daemon is told.
pub const GUEST_CID: u64 = 3;

/// Guest memory, MiB. The checks keep up to about 100 MiB in the guest's tmpfs.
const GUEST_MEM_MIB: u32 = 768;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The guest's seqpacket helper (`tests/guest-seq`), built statically; panics with the
/// command that builds it when it is missing.
pub fn seqpacket_helper() -> Vec<u8> {
    let path = std::env::var_os("VSOCK_SEQ_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest-seq/release/vsock-seq-guest"));
    fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "no seqpacket guest helper at {} ({e}); build it: RUSTFLAGS=\"-C \
             target-feature=+crt-static\" cargo build --release --manifest-path \
             tests/guest-seq/Cargo.toml --target-dir target/guest-seq",
            path.display()
        )
    })
}

/// The release daemon the real-guest and service tests run (`$VSOCK_DAEMON`, or
/// `target/release/vhost-user-vsock`).
///
/// # Errors
///
/// A sentence saying it is missing and how to build it.
pub fn daemon_binary() -> Result<PathBuf, String> {
    let daemon = std::env::var_os("VSOCK_DAEMON")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/vhost-user-vsock"));
    if !daemon.is_file() {
        return Err(format!(
            "no daemon at {} (build it: cargo build --release -p vsock-vhost-user --bin \
             vhost-user-vsock)",
            daemon.display()
        ));
    }
    Ok(daemon)
}

/// This crate's `vsock-socket-activate`, which starts a program as systemd starts a
/// socket-activated service: beside the running binary, or one directory up from a test
/// binary (cargo builds a package's binaries for its tests), or `$VSOCK_SOCKET_ACTIVATE`.
pub fn socket_activate_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VSOCK_SOCKET_ACTIVATE") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("the running binary's path");
    // A test binary sits in target/<profile>/deps, a binary (the demo) in target/<profile>.
    let dir = exe.parent().expect("a binary sits in a directory");
    let candidates = [
        dir.join("vsock-socket-activate"),
        dir.join("../vsock-socket-activate"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no vsock-socket-activate beside {} (cargo builds it with the vsock-tests \
                 tests; cargo build -p vsock-tests --bin vsock-socket-activate)",
                exe.display()
            )
        })
}

/// A service manager's notify socket (`NOTIFY_SOCKET`), as systemd's, bound at `path`.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    heard: Vec<String>,
}

impl NotifySocket {
    /// Binds the socket at `path`.
    pub fn bind(path: PathBuf) -> NotifySocket {
        let _ = fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("notify socket timeout");
        NotifySocket {
            socket,
            path,
            heard: Vec::new(),
        }
    }

    /// The value of `NOTIFY_SOCKET` for the service.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every assignment heard so far (`READY=1`, `STATUS=...`), in order.
    pub fn heard(&mut self) -> &[String] {
        self.poll();
        &self.heard
    }

    fn poll(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        while let Ok(n) = self.socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.heard.extend(text.lines().map(String::from));
            any = true;
        }
        any
    }

    /// Waits until `assignment` (`READY=1`) is heard, for at most `timeout`, while `alive`
    /// says the service still runs. Returns whether it was heard.
    pub fn wait_for(
        &mut self,
        assignment: &str,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if self.heard.iter().any(|a| a == assignment) {
                return true;
            }
            if Instant::now() > deadline || !alive() {
                // What came in the meantime counts.
                self.poll();
                return self.heard.iter().any(|a| a == assignment);
            }
        }
    }
}

/// What a real-guest test needs: the kernel, the initramfs and the daemon binary.
#[derive(Clone, Debug)]
pub struct Image {
    kernel: PathBuf,
    initramfs: PathBuf,
    daemon: PathBuf,
}

impl Image {
    /// Finds the guest image, QEMU and the daemon, or says what is missing.
    ///
    /// # Errors
    ///
    /// A sentence naming the missing part and how to make it.
    pub fn find() -> Result<Image, String> {
        let dir = std::env::var_os("VSOCK_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| target_dir().join("guest"));
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio.gz");
        if !kernel.is_file() || !initramfs.is_file() {
            return Err(format!(
                "no guest image in {} (scripts/guest/build.sh makes it)",
                dir.display()
            ));
        }
        let qemu = Command::new("qemu-system-x86_64")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !qemu.is_ok_and(|s| s.success()) {
            return Err("qemu-system-x86_64 is not installed".into());
        }
        let daemon = daemon_binary()?;
        Ok(Image {
            kernel,
            initramfs,
            daemon,
        })
    }

    /// The image for a real-guest test, or a panic naming the missing part.
    ///
    /// The tests are built marked ignored where the guest image or QEMU is missing (see
    /// `tests/build.rs`), so a test that runs is one that must find everything: without
    /// `VSOCK_REQUIRE_GUEST=1` only the daemon can be missing, and it is a build away.
    pub fn require() -> Image {
        Image::find().unwrap_or_else(|why| {
            panic!("the real-guest test cannot run: {why}. ./scripts/test.sh sets it all up.")
        })
    }
}

/// A scratch directory, removed on drop. Kept short: Unix socket paths are limited.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vsock-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch directory");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `vhost-user-vsock` daemon, running as a child process.
///
/// It starts as its systemd units start it: a single VM's vhost-user socket is bound by
/// `vsock-socket-activate` and passed as descriptor 3 (`LISTEN_FDS`), and the daemon is ready
/// when its notify socket hears `READY=1`; at the end it must have said `STOPPING=1`. So
/// every real-guest test runs the daemon the way a service manager would.
pub struct Daemon {
    child: Child,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The host socket base path `<uds_path>`.
    pub uds: PathBuf,
    log: PathBuf,
    /// Our daemon's notify socket; none for another backend.
    notify: Option<NotifySocket>,
    _dir: Scratch,
}

/// How a daemon is started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Ours, one VM, its vhost-user socket passed by `vsock-socket-activate`.
    Activated,
    /// Ours, several VMs binding their own sockets.
    Fleet,
    /// Another backend, which binds `--socket` itself and knows no notify socket.
    Other,
}

impl Daemon {
    /// Starts the daemon on `runtime` (`mio`, `tokio` or `smol`) and waits for its socket.
    pub fn start(image: &Image, runtime: &str) -> Daemon {
        Daemon::start_with(image, runtime, false)
    }

    /// Starts the daemon on `runtime`, recording the session if `record` is set (see
    /// [`Exit::trace`]).
    pub fn start_with(image: &Image, runtime: &str, record: bool) -> Daemon {
        let dir = Scratch::new("d");
        let mut command = Command::new(&image.daemon);
        if record {
            command.arg("--record").arg(dir.0.join("trace.pcapng"));
        }
        command.arg("--runtime").arg(runtime);
        Daemon::spawn(command, dir)
    }

    /// Starts the daemon on `runtime` with more `flags` (`--tx-buffer-size`, ...).
    pub fn start_flags(image: &Image, runtime: &str, flags: &[&str]) -> Daemon {
        let mut command = Command::new(&image.daemon);
        command.args(flags).arg("--runtime").arg(runtime);
        Daemon::spawn(command, Scratch::new("d"))
    }

    /// Starts the daemon on `runtime` logging at `filter` (a `RUST_LOG` value) rather than
    /// `info`, for tests that read what it logged.
    pub fn start_logged(image: &Image, runtime: &str, filter: &str) -> Daemon {
        let mut command = Command::new(&image.daemon);
        command
            .arg("--runtime")
            .arg(runtime)
            .env("RUST_LOG", filter);
        Daemon::spawn(command, Scratch::new("d"))
    }

    /// Starts another vhost-user vsock backend that takes the same `--socket`, `--uds-path`
    /// and `--guest-cid` flags (rust-vmm's `vhost-device-vsock` does), for comparisons.
    pub fn start_other(binary: &Path) -> Daemon {
        let dir = Scratch::new("d");
        let socket = dir.0.join("vhost.sock");
        let uds = dir.0.join("vm.vsock");
        Daemon::spawn_with(
            Command::new(binary),
            dir,
            socket.clone(),
            uds,
            vec![socket],
            Start::Other,
        )
    }

    /// Starts the daemon on `runtime` serving one VM per `(cid, groups)` with `--vm`, and
    /// waits for every vhost-user socket. [`socket`](Self::socket) and [`uds`](Self::uds)
    /// are the first VM's.
    pub fn start_fleet(
        image: &Image,
        runtime: &str,
        vms: &[(u64, &str)],
    ) -> (Daemon, Vec<FleetVm>) {
        let dir = Scratch::new("d");
        let fleet: Vec<FleetVm> = vms
            .iter()
            .map(|&(cid, _)| FleetVm {
                cid,
                socket: dir.0.join(format!("vhost-{cid}.sock")),
                uds: dir.0.join(format!("vm-{cid}.vsock")),
            })
            .collect();
        let mut command = Command::new(&image.daemon);
        command.arg("--runtime").arg(runtime);
        for (vm, &(_, groups)) in fleet.iter().zip(vms) {
            command.arg("--vm").arg(format!(
                "guest-cid={},socket={},uds-path={},groups={groups}",
                vm.cid,
                vm.socket.display(),
                vm.uds.display()
            ));
        }
        let sockets = fleet.iter().map(|vm| vm.socket.clone()).collect();
        let (first_socket, first_uds) = (fleet[0].socket.clone(), fleet[0].uds.clone());
        let daemon =
            Daemon::spawn_with(command, dir, first_socket, first_uds, sockets, Start::Fleet);
        (daemon, fleet)
    }

    fn spawn(command: Command, dir: Scratch) -> Daemon {
        let socket = dir.0.join("vhost.sock");
        let uds = dir.0.join("vm.vsock");
        Daemon::spawn_with(
            command,
            dir,
            socket.clone(),
            uds,
            vec![socket],
            Start::Activated,
        )
    }

    fn spawn_with(
        mut command: Command,
        dir: Scratch,
        socket: PathBuf,
        uds: PathBuf,
        sockets: Vec<PathBuf>,
        start: Start,
    ) -> Daemon {
        let log = dir.0.join("daemon.log");
        // A filter the caller set (`start_logged`) stands; otherwise VSOCK_DAEMON_LOG, or info.
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env(
                "RUST_LOG",
                std::env::var("VSOCK_DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            );
        }
        if start == Start::Other {
            command.arg("--socket").arg(&socket);
        }
        if start != Start::Fleet {
            command
                .arg("--uds-path")
                .arg(&uds)
                .arg("--guest-cid")
                .arg(GUEST_CID.to_string());
        }
        if start == Start::Activated {
            // The same program, arguments and environment, behind the activator.
            let mut activated = Command::new(socket_activate_binary());
            activated
                .arg("--listen")
                .arg(&socket)
                .arg("--")
                .arg(command.get_program())
                .args(command.get_args());
            for (key, value) in command.get_envs() {
                match value {
                    Some(v) => activated.env(key, v),
                    None => activated.env_remove(key),
                };
            }
            command = activated;
        }
        let notify = (start != Start::Other).then(|| {
            let notify = NotifySocket::bind(dir.0.join("notify.sock"));
            command.env("NOTIFY_SOCKET", notify.path());
            notify
        });
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("daemon log"))
            .spawn()
            .expect("start the daemon");
        let mut daemon = Daemon {
            child,
            socket,
            uds,
            log,
            notify,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        if let Some(mut notify) = daemon.notify.take() {
            let ready = notify.wait_for("READY=1", Duration::from_secs(20), || daemon.running());
            assert!(ready, "the daemon never said READY=1:\n{}", daemon.log());
            // Ready means every socket listens.
            for s in &sockets {
                assert!(s.exists(), "READY=1 before {} exists", s.display());
            }
            daemon.notify = Some(notify);
        }
        while !sockets.iter().all(|s| s.exists()) {
            assert!(
                daemon.running(),
                "the daemon exited at start:\n{}",
                daemon.log()
            );
            assert!(
                Instant::now() < deadline,
                "the daemon never bound its socket"
            );
            thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// `<uds_path>_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        path.into()
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the host listener at `<uds_path>` accepts connections (it is bound after
    /// the vhost-user socket). The probe is a host client that closes at once.
    pub fn wait_for_host_listener(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&self.uds).is_err() {
            assert!(self.running(), "the daemon exited:\n{}", self.log());
            assert!(
                Instant::now() < deadline,
                "the host listener never answered"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit. Returns the status and the whole log (its
    /// counters last).
    pub fn terminate(self) -> (ExitStatus, String) {
        let exit = self.stop();
        (exit.status, exit.log)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(mut self) -> Exit {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the daemon") {
                let log = self.log();
                if let (Some(notify), true) = (&mut self.notify, status.success()) {
                    let heard = notify.heard();
                    assert!(
                        heard.iter().any(|a| a == "STOPPING=1"),
                        "the daemon stopped without STOPPING=1 (heard {heard:?}):\n{log}"
                    );
                }
                return Exit {
                    status,
                    log,
                    trace: fs::read(self._dir.0.join("trace.pcapng")).ok(),
                };
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the daemon ignored SIGTERM for 20 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One VM of a daemon serving several ([`Daemon::start_fleet`]).
#[derive(Clone, Debug)]
pub struct FleetVm {
    /// Its guest's CID.
    pub cid: u64,
    /// The vhost-user socket its QEMU connects to.
    pub socket: PathBuf,
    /// Its host socket base path `<uds_path>`.
    pub uds: PathBuf,
}

impl FleetVm {
    /// `<uds_path>_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds.clone().into_os_string();
        path.push(format!("_{port}"));
        path.into()
    }
}

/// How the daemon ended.
#[derive(Debug)]
pub struct Exit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it logged, its counters last.
    pub log: String,
    /// The trace it recorded, if started with recording.
    pub trace: Option<Vec<u8>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One real-guest test at a time: TCG guests on a two-core machine slow each other down past
/// their timeouts, and a waiting test's peers would retry against the running guest.
static ONE_VM: Mutex<()> = Mutex::new(());

/// Takes this process's turn to run guests: hold it for the whole test, from before the
/// daemon and the host peers start.
pub fn exclusive() -> MutexGuard<'static, ()> {
    ONE_VM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest running a script.
pub struct Vm {
    child: Child,
    serial: PathBuf,
    monitor: PathBuf,
    _dir: Scratch,
}

/// How a guest ended.
#[derive(Debug)]
pub struct Outcome {
    /// The script's exit status, from the `GUEST-EXIT-STATUS` line.
    pub status: Option<i32>,
    /// The serial console.
    pub serial: String,
}

impl Outcome {
    /// The serial lines that start with `prefix`.
    pub fn lines<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.serial
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .filter(move |l| l.starts_with(prefix))
    }

    /// The first serial line that starts with `prefix`, without the prefix.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.serial
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
    }
}

impl Vm {
    /// Boots a guest with the device at `vhost_socket`, running `script` as `/guest/run.sh`.
    /// Tests hold [`exclusive`] while they do.
    pub fn boot(image: &Image, vhost_socket: &Path, script: &str) -> Vm {
        Self::boot_with(image, vhost_socket, script, &[])
    }

    /// As [`boot`](Self::boot), with `files` (name, contents) added to `/guest/`, executable.
    pub fn boot_with(
        image: &Image,
        vhost_socket: &Path,
        script: &str,
        files: &[(&str, &[u8])],
    ) -> Vm {
        Self::boot_qemu(image, vhost_socket, script, files, &[])
    }

    /// As [`boot_with`](Self::boot_with), with more QEMU arguments (a network device for a
    /// link between two guests, say).
    pub fn boot_qemu(
        image: &Image,
        vhost_socket: &Path,
        script: &str,
        files: &[(&str, &[u8])],
        qemu_args: &[String],
    ) -> Vm {
        let dir = Scratch::new("vm");
        let serial = dir.0.join("serial.log");
        let monitor = dir.0.join("monitor.sock");
        // The kernel unpacks concatenated archives in turn: the script rides in a second one.
        let mut initrd = fs::read(&image.initramfs).expect("read the initramfs");
        // An uncompressed archive must start 4-byte aligned; zeros in between are skipped.
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        let names: Vec<String> = files.iter().map(|(n, _)| format!("guest/{n}")).collect();
        let mut entries = vec![("guest", None), ("guest/run.sh", Some(script.as_bytes()))];
        entries.extend(
            names
                .iter()
                .zip(files)
                .map(|(n, (_, d))| (n.as_str(), Some(*d))),
        );
        initrd.extend(cpio(&entries));
        let initrd_path = dir.0.join("initrd");
        fs::write(&initrd_path, initrd).expect("write the initrd");
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-machine", "q35,memory-backend=mem"])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"
            ))
            .arg("-m")
            .arg(format!("{GUEST_MEM_MIB}M"))
            .args(["-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-vga", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd_path)
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=4"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock0,path={}", vhost_socket.display()))
            .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"])
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .args(qemu_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.0.join("qemu.log")).expect("qemu log"))
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm {
            child,
            serial,
            monitor,
            _dir: dir,
        }
    }

    /// Runs a command on QEMU's human monitor (`stop`, `cont`, ...) and returns its output.
    pub fn monitor(&self, command: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut stream = loop {
            match UnixStream::connect(&self.monitor) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no QEMU monitor: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The banner ends in a prompt; so does the command's output.
        for round in 0..2 {
            if round == 1 {
                stream
                    .write_all(format!("{command}\n").as_bytes())
                    .expect("write to the monitor");
                seen.clear();
            }
            while !String::from_utf8_lossy(&seen).ends_with("(qemu) ") {
                let n = stream.read(&mut buf).expect("read the monitor");
                assert!(n > 0, "the monitor closed");
                seen.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until a serial line starts with `prefix`, or panics after `timeout`.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial
                .lines()
                .any(|l| l.trim_end_matches('\r').starts_with(prefix))
            {
                return;
            }
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            assert!(
                !exited && Instant::now() < deadline,
                "the guest never printed {prefix:?}:\n{serial}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the guest to power off (killing it after `timeout`) and returns how it ended.
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let deadline = Instant::now() + timeout;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let serial = self.serial();
        let status = serial
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("GUEST-EXIT-STATUS: "))
            .find_map(|s| s.trim().parse().ok());
        Outcome { status, serial }
    }

    /// Kills QEMU at once, as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `newc` cpio archive of directories (`None`) and executable files.
fn cpio(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino as u32,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for field in fields {
            out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, data)) in entries.iter().enumerate() {
        match data {
            None => entry(&mut out, i + 1, name, 0o040_755, &[]),
            Some(data) => entry(&mut out, i + 1, name, 0o100_755, data),
        }
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Binds a host listener at `path` (a guest port's `<uds_path>_<port>`), polled so that
/// [`accept`] can give up.
pub fn listen(path: &Path) -> UnixListener {
    let listener = UnixListener::bind(path).expect("bind a host listener");
    listener.set_nonblocking(true).expect("non-blocking");
    listener
}

/// The next client of `listener`, or `None` once `stop` is set.
pub fn accept(listener: &UnixListener, stop: &AtomicBool) -> Option<UnixStream> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(Duration::from_secs(120)))
                    .expect("read timeout");
                return Some(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return None;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Connects to the guest's `port` through `<uds_path>`: `CONNECT`, then `OK`. A refusal
/// (the guest does not listen yet) is retried every 200 ms until `stop` is set: often enough
/// not to slow a test, seldom enough not to load the emulated guest.
pub fn connect(uds: &Path, port: u32, stop: &AtomicBool) -> Option<UnixStream> {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(stream) = try_connect(uds, port) {
            return Some(stream);
        }
        thread::sleep(Duration::from_millis(200));
    }
    None
}

fn try_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: whatever follows the line is the guest's.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        line.push(byte[0]);
    }
    if line.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(io::Error::other(format!("bad reply {line:?}")))
    }
}

/// Reads `stream` to its end: the byte count and the SHA-256 in hex.
///
/// # Errors
///
/// A read error (a reset, the two-minute read timeout).
pub fn drain(stream: &mut UnixStream) -> io::Result<(u64, String)> {
    let mut hash = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, hex(&hash.finalize()))),
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `len` bytes of a stream seeded by `seed`; returns their SHA-256 in hex.
///
/// # Errors
///
/// A write error.
pub fn send(stream: &mut UnixStream, len: u64, seed: u64) -> io::Result<String> {
    let mut hash = Sha256::new();
    let mut state = seed | 1;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            // xorshift64: cheap bytes no compressor or dedup would flatter.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        stream.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex(&hash.finalize()))
}

/// Sends, half-closes, and reads the reply to its end.
///
/// # Errors
///
/// A read or write error.
pub fn send_then_read(
    stream: &mut UnixStream,
    len: u64,
    seed: u64,
) -> io::Result<(String, String)> {
    let sent = send(stream, len, seed)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok((sent, reply.trim_end().to_string()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of the `key=value` word of `line`.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}
