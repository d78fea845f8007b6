//! `vhost-user-vsock`: serves the hybrid vsock device to vhost-user frontends such as QEMU.

use std::error::Error;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vsock_core::Instant;
use vsock_device::VsockDevice;
use vsock_host::DriverConfig;
use vsock_vhost_user::sandbox;
use vsock_vhost_user::service::{self, Notifier, PassedListener};
use vsock_vhost_user::vms::{self, VmConfig};
use vsock_vhost_user::{Report, Running, RuntimeKind, Shared, VhostTransport};

/// Serves a virtio-vsock device to a vhost-user frontend (QEMU's vhost-user-vsock-pci), and
/// relays the guest's stream and seqpacket connections to host Unix sockets.
///
/// A guest connecting to vsock port P reaches the Unix socket `<uds-path>_P` (a stream or a
/// seqpacket socket, as the guest's). A host program connects to `<uds-path>`, writes
/// `CONNECT <port>\n`, reads `OK <host_port>\n`, and is then joined to the guest listening on
/// that port. For a seqpacket connection it connects a seqpacket socket to
/// `<uds-path>_seqpacket` and the line and the reply are one message each.
///
/// One VM is given by --socket, --uds-path and the flags after them; several by repeating
/// --vm, or by a --config file (the YAML format of rust-vmm's vhost-device-vsock). Each VM has
/// its own vhost-user socket, host sockets, device and event loop: one VM's frontend coming,
/// going or misbehaving never touches another's. Each vhost-user socket serves one frontend
/// at a time and waits for the next when it disconnects. SIGINT or SIGTERM resets the guests'
/// connections, removes the socket paths, prints each VM's counters and exits; SIGUSR1 logs
/// them (every VM's, with its connections, as JSON) and goes on. Logs go to stderr;
/// RUST_LOG sets the level (default `info`).
///
/// For service managers: the daemon never forks into the background. It serves a listening
/// socket passed as --fd=FDNUM (QEMU's backend convention), or the sockets systemd passes
/// (LISTEN_FDS, matched to VMs by the path they are bound at), and leaves their paths in
/// place at exit. With NOTIFY_SOCKET set it sends READY=1 once every socket listens and
/// STOPPING=1 as it shuts down. A bad set-up exits with status 1 before anything serves.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-vsock", version, verbatim_doc_comment)]
struct Args {
    /// The vhost-user socket the daemon listens on; QEMU connects to it
    /// (`-chardev socket,path=PATH`). With sockets passed by systemd (`LISTEN_FDS`), the one
    /// bound at PATH is served; without this flag, the one passed.
    #[arg(long, visible_alias = "socket-path", value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Serve the vhost-user socket the daemon was started with as descriptor FDNUM: a
    /// listening Unix stream socket (QEMU's backend convention; takes the place of --socket).
    #[arg(long, value_name = "FDNUM", conflicts_with_all = ["socket", "vm", "config"])]
    fd: Option<i32>,

    /// Print the backend's capabilities as the JSON QEMU's vhost-user.json schema describes,
    /// and exit (every other flag is ignored).
    #[arg(long)]
    print_capabilities: bool,

    /// The guest's context ID (3 to 4294967294). QEMU reads it from the device's config
    /// space.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(3..=0xFFFF_FFFE))]
    guest_cid: u64,

    /// The base path of the host sockets: host programs connect to PATH, guest connections to
    /// port P go to PATH_P.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["vm", "config"])]
    uds_path: Option<PathBuf>,

    /// Bytes of guest data each connection may have in flight towards its host socket: the
    /// receive buffer the device advertises to the guest (1 to 1073741824). The guest hears of
    /// freed space each time a quarter of it (64 KiB at most) has gone to the host socket.
    /// The default, 256 KiB, is Linux's own and holds four of its largest packets, so the
    /// guest never waits for credit after each one.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    tx_buffer_size: u32,

    /// Offer seqpacket sockets to the guest, with host clients at `<uds-path>_seqpacket`.
    /// `auto` offers them when this kernel's socket send buffers take a message of the whole
    /// `--tx-buffer-size` (net.core.wmem_max must be at least half of it plus 16 bytes),
    /// and warns otherwise; `on` refuses to start without them; `off` offers streams only.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Seqpacket::Auto)]
    seqpacket: Seqpacket,

    /// The largest virtqueue the driver may set up (a power of two, at most 32768).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    queue_size: u16,

    /// The sibling groups of the VM, joined by '+': VMs of one daemon that share a group may
    /// connect to each other by CID.
    #[arg(long, value_name = "NAMES", default_value = "default")]
    groups: String,

    /// One VM of several, as comma-separated KEY=VALUE pairs (repeat for each VM):
    /// guest-cid=N, socket=PATH and uds-path=PATH, then optionally tx-buffer-size=BYTES,
    /// queue-size=N, groups=A+B and record=FILE. Keys may be spelt with '_' too. Takes the
    /// place of --socket, --uds-path, --guest-cid, --tx-buffer-size, --queue-size, --groups
    /// and --record.
    #[arg(long, value_name = "KEY=VALUE,...", conflicts_with_all = [
        "socket", "uds_path", "guest_cid", "tx_buffer_size", "queue_size", "groups", "record",
        "config",
    ])]
    vm: Vec<String>,

    /// Read the VMs from FILE: YAML with a `vms:` list, each VM a mapping of the keys --vm
    /// takes (vhost-device-vsock's format). Takes the place of the single-VM flags and --vm.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "socket", "uds_path", "guest_cid", "tx_buffer_size", "queue_size", "groups", "record",
    ])]
    config: Option<PathBuf>,

    /// The event loop that serves the device.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Mio)]
    runtime: RuntimeKind,

    /// Record the session into FILE: a pcapng trace that Wireshark opens (the guest's packets
    /// as vsock, the host side's events next to them) and `vsock-replay` replays. Written as
    /// the device runs; complete once the daemon exits.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,

    /// Serve live counters on the Unix socket PATH: every VM's engine, device and host
    /// counters and each connection's state and bytes, as JSON (`GET /`, or the line `json`)
    /// or in Prometheus's text format (`GET /metrics`, or the line `metrics`), e.g.
    /// `curl --unix-socket PATH http://localhost/metrics`. SIGUSR1 logs the JSON.
    #[arg(long, value_name = "PATH")]
    stats: Option<PathBuf>,

    /// The sandbox: `on` confines the daemon once it serves (a mount namespace holding only
    /// its sockets' and recordings' directories, Landlock where the kernel has it, and a
    /// seccomp allow-list on every thread: any other system call kills it); `log` is the
    /// same, but a system call outside the list is only logged by the kernel (dmesg);
    /// `off` is none of it, for debugging.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = sandbox::Mode::On)]
    sandbox: sandbox::Mode,

    /// Keep at most BYTES of each packet's payload in the recordings (lengths are always
    /// kept, and replay still checks them).
    #[arg(long, value_name = "BYTES")]
    record_snaplen: Option<usize>,
}

/// When to offer seqpacket sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Seqpacket {
    /// When the kernel allows messages of the whole buffer.
    Auto,
    /// Always; refuse to start if the kernel does not allow them.
    On,
    /// Never.
    Off,
}

fn main() -> ExitCode {
    // QEMU's convention: other flags are ignored, so none can make it fail.
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--print-capabilities")
    {
        print!("{}", service::CAPABILITIES);
        return ExitCode::SUCCESS;
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-vsock: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The VMs the flags describe, checked. `passed` are the listening sockets the daemon was
/// started with, which a single VM without `--socket` takes its path from.
fn vms(args: &Args, passed: &[PassedListener]) -> Result<Vec<VmConfig>, Box<dyn Error>> {
    let vms = if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        vms::parse_yaml(&text).map_err(|e| format!("--config {}: {e}", path.display()))?
    } else if !args.vm.is_empty() {
        let mut vms = Vec::with_capacity(args.vm.len());
        for (i, s) in args.vm.iter().enumerate() {
            vms.push(vms::parse_vm_option(s, i + 1)?);
        }
        vms
    } else {
        let Some(uds_path) = &args.uds_path else {
            return Err("--uds-path is required (or --vm, or --config)".into());
        };
        let socket = match (&args.socket, passed) {
            (Some(socket), _) => socket.clone(),
            (None, [one]) => PathBuf::from(one.describe()),
            (None, []) => {
                return Err(
                    "--socket is required (or --fd, or a socket passed by systemd \
                            with LISTEN_FDS)"
                        .into(),
                )
            }
            (None, _) => {
                return Err(format!(
                    "{} sockets were passed (LISTEN_FDS) for one VM: name the one to serve \
                     with --socket, or serve several VMs with --vm or --config",
                    passed.len()
                )
                .into())
            }
        };
        if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
            return Err(format!(
                "--queue-size {} is not a power of two up to 32768",
                args.queue_size
            )
            .into());
        }
        let groups = vms::parse_groups(&args.groups).map_err(|e| format!("--groups: {e}"))?;
        vec![VmConfig {
            guest_cid: args.guest_cid,
            socket,
            uds_path: uds_path.clone(),
            tx_buffer_size: args.tx_buffer_size,
            queue_size: args.queue_size,
            groups,
            record: args.record.clone(),
        }]
    };
    vms::validate(&vms)?;
    if args.record_snaplen.is_some() && vms.iter().all(|vm| vm.record.is_none()) {
        return Err("--record-snaplen needs a recording (--record, or record= for a VM)".into());
    }
    Ok(vms)
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    // Taken before any thread starts: they change the environment.
    let notifier = Notifier::from_env()?;
    let mut passed = match args.fd {
        Some(fd) => vec![service::take_fd(fd).map_err(|e| format!("--fd: {e}"))?],
        None => service::listen_fds()?,
    };
    let mut vms = vms(&args, &passed)?;
    // Each VM serves the passed socket bound at its path; one that matches no VM is refused
    // rather than left open with nobody answering it.
    let mut listeners = Vec::with_capacity(vms.len());
    for vm in &vms {
        listeners.push(take_passed(&mut passed, &vm.socket, vms.len() == 1));
    }
    if let Some(extra) = passed.first() {
        return Err(format!(
            "the socket passed as descriptor {} ({}) is no VM's vhost-user socket",
            extra.fd,
            extra.describe()
        )
        .into());
    }
    let mut stats_path = args.stats.clone();
    if let Some(stats) = &stats_path {
        vms::check_extra_path(&vms, "--stats", stats)?;
    }
    // The file system is confined while the process has one thread, before anything is
    // bound; the system calls once every thread runs.
    if args.sandbox != sandbox::Mode::Off {
        confine(&mut vms, &listeners, &mut stats_path)?;
    }
    // Registered before any thread starts, so every thread leaves the signals to this one.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1])?;
    let several = vms.len() > 1;
    // Every VM's place among its siblings: VMs sharing a group reach each other by CID.
    let siblings =
        vsock_host::Siblings::new(vms.iter().map(|vm| (vm.guest_cid, vm.groups.clone())))?;
    let mut running = Vec::with_capacity(vms.len());
    for (vm, listener) in vms.into_iter().zip(listeners) {
        // A VM that cannot start stops the daemon before it serves any.
        let name = if several {
            format!("VM {}: ", vm.guest_cid)
        } else {
            String::new()
        };
        match serve_vm(&args, &vm, listener, &siblings) {
            Ok(served) => running.push(served),
            Err(e) => {
                // The VMs started are stopped, which unlinks their paths.
                for vm in running {
                    let _ = vm.running.stop();
                }
                return Err(format!("{name}{e}").into());
            }
        }
    }
    // The stats socket last: once it answers, every VM does.
    let _stats = match &stats_path {
        Some(path) => match serve_stats(path, &siblings) {
            Ok(remove) => Some(remove),
            Err(e) => {
                for vm in running {
                    let _ = vm.running.stop();
                }
                return Err(e);
            }
        },
        None => None,
    };
    if let Err(e) = sandbox::filter_system_calls(args.sandbox) {
        for vm in running {
            let _ = vm.running.stop();
        }
        return Err(format!("sandbox: {e} (--sandbox=off serves without it)").into());
    }
    info!(vms = running.len(), runtime = ?args.runtime, "serving");
    if let Some(n) = &notifier {
        // A manager that cannot hear it will say so; serving goes on.
        if let Err(e) = n.notify(&format!(
            "READY=1\nSTATUS=serving {} VM{}",
            running.len(),
            if running.len() == 1 { "" } else { "s" }
        )) {
            warn!(error = %e, "cannot tell the service manager the daemon is ready");
        }
    }

    for signal in signals.forever() {
        if signal == SIGUSR1 {
            let vms = siblings.inspect_all(vsock_vhost_user::stats::INSPECT_TIMEOUT);
            let json = vsock_vhost_user::stats::json(&vms);
            info!(target: "vhost_user_vsock::stats", "stats {}", json.trim_end());
            continue;
        }
        info!(signal, "shutting down");
        break;
    }
    if let Some(n) = &notifier {
        let _ = n.notify("STOPPING=1\nSTATUS=shutting down");
    }
    let mut failed = None;
    for vm in running {
        let cid = vm.guest_cid;
        // Stopping drops the driver, which unlinks `<uds_path>`; dropping `vm` unlinks the
        // vhost-user socket.
        match vm.running.stop() {
            Ok(report) => print_stats(several.then_some(cid), &report),
            Err(e) => {
                error!(guest_cid = cid, error = %e, "the VM's loop failed");
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Confines the file system to the directories the daemon binds, connects and writes in
/// (see `vsock_vhost_user::sandbox`). Their paths become absolute and real first: in the
/// mount namespace the working directory is `/`.
fn confine(
    vms: &mut [VmConfig],
    listeners: &[Option<PassedListener>],
    stats: &mut Option<PathBuf>,
) -> Result<(), Box<dyn Error>> {
    let mut socket_dirs = Vec::new();
    let mut write_dirs = Vec::new();
    // A missing directory is reported in the words the bind or create would have used.
    let place =
        |path: &mut PathBuf, dirs: &mut Vec<PathBuf>, verb: &str| -> Result<(), Box<dyn Error>> {
            *path = sandbox::resolve(path)
                .map_err(|e| format!("cannot {verb} {}: {e}", path.display()))?;
            dirs.push(
                path.parent()
                    .expect("resolved paths have one")
                    .to_path_buf(),
            );
            Ok(())
        };
    for (vm, listener) in vms.iter_mut().zip(listeners) {
        // A passed socket is already bound: its directory is not needed.
        if listener.is_none() {
            place(&mut vm.socket, &mut socket_dirs, "bind")?;
        }
        place(&mut vm.uds_path, &mut socket_dirs, "bind")?;
        if let Some(record) = &mut vm.record {
            place(record, &mut write_dirs, "create")?;
        }
    }
    if let Some(stats) = stats {
        place(stats, &mut socket_dirs, "bind")?;
    }
    let confinement = sandbox::confine_files(&socket_dirs, &write_dirs)
        .map_err(|e| format!("sandbox: {e} (--sandbox=off serves without it)"))?;
    info!(
        namespace = ?confinement.namespace,
        landlock_abi = ?confinement.landlock_abi,
        landlock_unix_connects = confinement.landlock_unix_connects,
        "sandbox: file system confined"
    );
    Ok(())
}

/// Binds the stats socket at `path` and serves it on a thread of its own. Returns what
/// removes the path at exit.
fn serve_stats(
    path: &std::path::Path,
    siblings: &vsock_host::Siblings,
) -> Result<RemoveOnDrop, Box<dyn Error>> {
    let listener = vsock_host::bind_unix_listener(path)
        .map_err(|e| format!("--stats {}: {e}", path.display()))?;
    let remove = RemoveOnDrop(path.to_path_buf());
    let siblings = siblings.clone();
    thread::Builder::new()
        .name("stats".into())
        .spawn(move || vsock_vhost_user::stats::serve(listener, siblings))?;
    info!(stats = %path.display(), "live counters served");
    Ok(remove)
}

/// The passed listener for the VM whose vhost-user socket is `socket`, taken out of `passed`:
/// the one bound at that path (compared once resolved), or, for a lone VM whose path came
/// from the passed socket itself, that one.
fn take_passed(
    passed: &mut Vec<PassedListener>,
    socket: &std::path::Path,
    lone: bool,
) -> Option<PassedListener> {
    let resolved = std::fs::canonicalize(socket).ok();
    let index = passed.iter().position(|p| {
        (lone && p.path.is_none() && PathBuf::from(p.describe()) == socket)
            || p.path.as_deref() == Some(socket)
            || (resolved.is_some()
                && p.path.as_ref().and_then(|p| std::fs::canonicalize(p).ok()) == resolved)
    })?;
    Some(passed.remove(index))
}

/// One VM being served: its event loop, and its vhost-user socket's path, removed on drop if
/// the daemon bound it (a passed socket's path belongs to whoever passed it).
struct ServedVm {
    guest_cid: u64,
    running: Running,
    _socket: Option<RemoveOnDrop>,
}

/// Builds one VM's device, binds its sockets and starts its event loop and its frontend
/// thread.
fn serve_vm(
    args: &Args,
    vm: &VmConfig,
    passed: Option<PassedListener>,
    siblings: &vsock_host::Siblings,
) -> Result<ServedVm, Box<dyn Error>> {
    // The credit update threshold follows the buffer size, so every size the engine takes
    // (1 byte to 1 GiB) works.
    let engine = vsock_core::Config::new(vm.guest_cid).with_buffer_size(vm.tx_buffer_size);
    // Refuses a configuration the engine cannot run, before anything is bound.
    let mut device = VsockDevice::new(engine.clone(), Instant::ZERO)
        .map_err(|e| format!("bad configuration: {e}"))?;
    let buffer = engine.buffer_size as usize;
    let seqpacket = match args.seqpacket {
        Seqpacket::Off => false,
        // Driver::new refuses to start if the kernel does not allow them.
        Seqpacket::On => true,
        Seqpacket::Auto => {
            let limit = vsock_host::seqpacket_message_limit(buffer)?;
            if limit < buffer {
                warn!(
                    guest_cid = vm.guest_cid,
                    buffer,
                    limit,
                    "seqpacket sockets are off: this kernel's socket send buffers take \
                     messages of at most {limit} bytes, not the {buffer} of the tx buffer \
                     size (raise net.core.wmem_max to at least {})",
                    vsock_host::seqpacket_send_buffer(buffer)
                );
            }
            limit >= buffer
        }
    };
    device.set_seqpacket(seqpacket);
    let device_features = device.features();

    let (listener, socket) = match passed {
        Some(p) => (p.listener, None),
        None => (
            vsock_host::bind_unix_listener(&vm.socket)
                .map_err(|e| format!("vhost-user socket: {e}"))?,
            Some(RemoveOnDrop(vm.socket.clone())),
        ),
    };

    let (wake, kick) = UnixStream::pair()?;
    kick.set_nonblocking(true)?;
    let shared = Shared::new(vm.guest_cid, device_features, wake)?;
    let config = DriverConfig {
        engine,
        uds_path: vm.uds_path.clone(),
        seqpacket,
        siblings: siblings.link(vm.guest_cid),
    };
    let recorder = match &vm.record {
        Some(path) => {
            let wall_clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let snap = args.record_snaplen.unwrap_or(usize::MAX);
            let writer = vsock_trace::TraceWriter::create(path, snap, wall_clock)
                .map_err(|e| format!("record {}: {e}", path.display()))?;
            Some(Box::new(writer) as Box<dyn vsock_core::record::Recorder>)
        }
        None => None,
    };
    let running = vsock_vhost_user::start(
        args.runtime,
        config,
        VhostTransport::new(shared.clone()),
        OwnedFd::from(kick),
        recorder,
    )
    .map_err(|e| format!("host socket {}: {e}", vm.uds_path.display()))?;
    info!(
        socket = %vm.socket.display(),
        uds_path = %vm.uds_path.display(),
        guest_cid = vm.guest_cid,
        groups = %vm.groups.join("+"),
        record = ?vm.record,
        "VM ready for its frontend"
    );

    let queue_size = usize::from(vm.queue_size);
    let cid = vm.guest_cid;
    thread::Builder::new()
        .name(format!("vhost-user-{cid}"))
        .spawn(move || serve_frontends(listener, shared, queue_size, cid))?;
    Ok(ServedVm {
        guest_cid: cid,
        running,
        _socket: socket,
    })
}

/// Serves one frontend after another, for as long as the daemon runs.
fn serve_frontends(listener: UnixListener, shared: Arc<Shared>, queue_size: usize, cid: u64) {
    // Everything logged here names its VM.
    let _span = tracing::info_span!("vm", guest_cid = cid).entered();
    let mut listener = vhost::vhost_user::Listener::from(listener);
    loop {
        let (backend, mem) = shared.connection(queue_size);
        let mut daemon = match VhostUserDaemon::new("vhost-user-vsock".into(), backend, mem) {
            Ok(daemon) => daemon,
            Err(e) => {
                error!(error = %e, "cannot set up the vhost-user handler");
                thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        shared.set_worker(daemon.get_epoll_handlers().into_iter().next());
        if let Err(e) = daemon.start(&mut listener) {
            // EMFILE and friends: the frontend waits in the backlog.
            warn!(error = %e, "cannot accept a frontend");
            thread::sleep(Duration::from_millis(100));
            continue;
        }
        info!("frontend connected");
        match daemon.wait() {
            Ok(()) => info!("frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!(error = %e, "frontend connection ended"),
        }
        // Dropping the daemon stops its worker thread; only then may the next frontend's
        // rings take the place of this one's.
        drop(daemon);
        shared.disconnected();
    }
}

/// Prints one VM's counters; `cid` names it when the daemon served several.
fn print_stats(cid: Option<u64>, report: &Report) {
    let vm = cid.map_or(String::new(), |cid| format!("VM {cid}: "));
    let engine = &report.engine;
    eprintln!(
        "vhost-user-vsock: {vm}guest->host {} bytes in {} packets, host->guest {} bytes in {} packets",
        engine.tx_bytes, engine.tx_packets, engine.rx_bytes, engine.rx_packets
    );
    eprintln!(
        "vhost-user-vsock: {vm}connections: {} from the guest, {} from host clients, {} established, \
         {} closed; resets: {} sent, {} received",
        engine.guest_connects,
        engine.host_accepts,
        engine.established,
        engine.closed,
        engine.rst_sent,
        engine.rst_received
    );
    if engine.sibling_connects + engine.sibling_accepts > 0 {
        eprintln!(
            "vhost-user-vsock: {vm}siblings: {} connects, {} accepted, {} refused by them, \
             {} reset as they went away",
            engine.sibling_connects,
            engine.sibling_accepts,
            engine.sibling_refused,
            engine.sibling_resets
        );
    }
    eprintln!("vhost-user-vsock: {vm}engine {engine:?}");
    eprintln!("vhost-user-vsock: {vm}device {:?}", report.device);
    eprintln!("vhost-user-vsock: {vm}host {:?}", report.host);
}

/// Removes a path when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The man page, `vhost-user/vhost-user-vsock.1`, is generated from the flags above: this
    /// fails when it is stale, and `VSOCK_UPDATE_MAN=1 cargo test -p vsock-vhost-user --bin
    /// vhost-user-vsock` rewrites it.
    #[test]
    fn the_man_page_is_current() {
        let mut page = Vec::new();
        clap_mangen::Man::new(super::Args::command())
            .date("2026-12")
            .render(&mut page)
            .unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vhost-user-vsock.1");
        if std::env::var_os("VSOCK_UPDATE_MAN").is_some() {
            std::fs::write(&path, &page).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == page,
            "{} is stale: VSOCK_UPDATE_MAN=1 cargo test -p vsock-vhost-user --bin \
             vhost-user-vsock rewrites it",
            path.display()
        );
    }
}
