//! `vhost-user-vsock`: serves the hybrid vsock device to vhost-user frontends such as QEMU.

use std::error::Error;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::{error, info, warn};
use vhost_user_backend::VhostUserDaemon;
use vsock_core::Instant;
use vsock_device::VsockDevice;
use vsock_host::DriverConfig;
use vsock_vhost_user::{Report, RuntimeKind, Shared, VhostTransport};

/// Serves a virtio-vsock device to a vhost-user frontend (QEMU's vhost-user-vsock-pci), and
/// relays the guest's stream and seqpacket connections to host Unix sockets.
///
/// A guest connecting to vsock port P reaches the Unix socket `<uds-path>_P` (a stream or a
/// seqpacket socket, as the guest's). A host program connects to `<uds-path>`, writes
/// `CONNECT <port>\n`, reads `OK <host_port>\n`, and is then joined to the guest listening on
/// that port. For a seqpacket connection it connects a seqpacket socket to
/// `<uds-path>_seqpacket` and the line and the reply are one message each.
///
/// The daemon serves one VM at a time and waits for the next when it disconnects. SIGINT or
/// SIGTERM resets the guest's connections, removes its socket paths, prints the counters
/// and exits. Logs go to stderr; RUST_LOG sets the level (default `info`).
#[derive(Debug, Parser)]
#[command(name = "vhost-user-vsock", version, verbatim_doc_comment)]
struct Args {
    /// The vhost-user socket the daemon listens on; QEMU connects to it
    /// (`-chardev socket,path=PATH`).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// The guest's context ID (3 to 4294967294). QEMU reads it from the device's config
    /// space.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(3..=0xFFFF_FFFE))]
    guest_cid: u64,

    /// The base path of the host sockets: host programs connect to PATH, guest connections to
    /// port P go to PATH_P.
    #[arg(long, value_name = "PATH")]
    uds_path: PathBuf,

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

    /// The event loop that serves the device.
    #[arg(long, value_enum, default_value_t = RuntimeKind::Mio)]
    runtime: RuntimeKind,

    /// Record the session into FILE: a pcapng trace that Wireshark opens (the guest's packets
    /// as vsock, the host side's events next to them) and `vsock-replay` replays. Written as
    /// the device runs; complete once the daemon exits.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,

    /// Keep at most BYTES of each packet's payload in the recording (lengths are always
    /// kept, and replay still checks them).
    #[arg(long, value_name = "BYTES", requires = "record")]
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

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    if !args.queue_size.is_power_of_two() || args.queue_size > 32768 {
        return Err(format!(
            "--queue-size {} is not a power of two up to 32768",
            args.queue_size
        )
        .into());
    }
    check_socket_path("--socket", &args.socket)?;

    // The credit update threshold follows the buffer size, so every size the engine takes
    // (1 byte to 1 GiB) works.
    let engine = vsock_core::Config::new(args.guest_cid).with_buffer_size(args.tx_buffer_size);
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
                    buffer,
                    limit,
                    "seqpacket sockets are off: this kernel's socket send buffers take \
                     messages of at most {limit} bytes, not the {buffer} of --tx-buffer-size \
                     (raise net.core.wmem_max to at least {})",
                    vsock_host::seqpacket_send_buffer(buffer)
                );
            }
            limit >= buffer
        }
    };
    device.set_seqpacket(seqpacket);
    let device_features = device.features();

    // Registered before any thread starts, so every thread leaves the signals to this one.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;

    let listener = vsock_host::bind_unix_listener(&args.socket)
        .map_err(|e| format!("vhost-user socket: {e}"))?;
    let _socket = RemoveOnDrop(args.socket.clone());

    let (wake, kick) = UnixStream::pair()?;
    kick.set_nonblocking(true)?;
    let shared = Shared::new(args.guest_cid, device_features, wake)?;
    let config = DriverConfig {
        engine,
        uds_path: args.uds_path.clone(),
        seqpacket,
    };
    let recorder = match &args.record {
        Some(path) => {
            let wall_clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let snap = args.record_snaplen.unwrap_or(usize::MAX);
            let writer = vsock_trace::TraceWriter::create(path, snap, wall_clock)
                .map_err(|e| format!("--record: {e}"))?;
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
    .map_err(|e| format!("host socket {}: {e}", args.uds_path.display()))?;
    info!(
        socket = %args.socket.display(),
        uds_path = %args.uds_path.display(),
        guest_cid = args.guest_cid,
        runtime = ?args.runtime,
        record = ?args.record,
        "serving"
    );

    let queue_size = usize::from(args.queue_size);
    thread::Builder::new()
        .name("vhost-user-accept".into())
        .spawn(move || serve_frontends(listener, shared, queue_size))?;

    if let Some(signal) = signals.forever().next() {
        info!(signal, "shutting down");
    }
    // Stopping drops the driver, which unlinks `<uds_path>`; `_socket` unlinks the vhost-user
    // socket.
    let report = running.stop()?;
    print_stats(&report);
    Ok(())
}

/// Serves one frontend after another, for as long as the daemon runs.
fn serve_frontends(listener: UnixListener, shared: Arc<Shared>, queue_size: usize) {
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

/// Unix socket paths are limited to 107 bytes.
fn check_socket_path(flag: &str, path: &Path) -> Result<(), String> {
    let len = path.as_os_str().len();
    if len == 0 {
        return Err(format!("{flag}: the path is empty"));
    }
    if len > vsock_host::MAX_SOCKET_PATH {
        return Err(format!(
            "{flag} {}: {len} bytes, longer than the {} a Unix socket path may have",
            path.display(),
            vsock_host::MAX_SOCKET_PATH
        ));
    }
    Ok(())
}

fn print_stats(report: &Report) {
    let engine = &report.engine;
    eprintln!(
        "vhost-user-vsock: guest->host {} bytes in {} packets, host->guest {} bytes in {} packets",
        engine.tx_bytes, engine.tx_packets, engine.rx_bytes, engine.rx_packets
    );
    eprintln!(
        "vhost-user-vsock: connections: {} from the guest, {} from host clients, {} established, \
         {} closed; resets: {} sent, {} received",
        engine.guest_connects,
        engine.host_accepts,
        engine.established,
        engine.closed,
        engine.rst_sent,
        engine.rst_received
    );
    eprintln!("vhost-user-vsock: engine {engine:?}");
    eprintln!("vhost-user-vsock: device {:?}", report.device);
    eprintln!("vhost-user-vsock: host {:?}", report.host);
}

/// Removes a path when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
