//! Starting the way service managers start a vhost-user backend: with its listening sockets
//! passed as descriptors (QEMU's `--fd=FDNUM` convention, systemd's socket activation), and
//! telling the manager when it serves and when it stops (systemd's notify protocol).
//!
//! Both are a few system calls on sockets the standard library already has; no crate is
//! needed for them. The notify socket is connected at start-up, so a sandbox installed later
//! never has to let the daemon resolve a path to send its last `STOPPING=1`.

use std::io::{self, ErrorKind};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// A listening socket the daemon was started with.
#[derive(Debug)]
pub struct PassedListener {
    /// The descriptor number it came as.
    pub fd: RawFd,
    /// The socket: a listening Unix stream socket, blocking, close-on-exec.
    pub listener: UnixListener,
    /// Where it is bound, if at a path.
    pub path: Option<PathBuf>,
    /// Its abstract name, if bound to one.
    pub abstract_name: Option<Vec<u8>>,
}

impl PassedListener {
    /// The socket's address for messages: its path, `@name`, or its descriptor.
    pub fn describe(&self) -> String {
        match (&self.path, &self.abstract_name) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
            (None, None) => format!("descriptor {}", self.fd),
        }
    }
}

/// The descriptors taken so far: each is taken once, so no two owners ever close one.
static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Takes descriptor `fd`, which must be a listening Unix stream socket the process was started
/// with (QEMU's `--fd=FDNUM`).
///
/// # Errors
///
/// `fd` is standard input, output or error, is not open, was taken before, or is not a
/// listening Unix stream socket.
pub fn take_fd(fd: RawFd) -> io::Result<PassedListener> {
    let invalid = |why: String| io::Error::new(ErrorKind::InvalidInput, why);
    if fd < LISTEN_FDS_START {
        return Err(invalid(format!(
            "descriptor {fd} is standard input, output or error, not a socket"
        )));
    }
    {
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&fd) {
            return Err(invalid(format!("descriptor {fd} is given twice")));
        }
        // What the descriptor is, without touching it: `/proc/self/fd/N` names a socket
        // `socket:[inode]`, and is missing for a descriptor that is not open.
        match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            Ok(target) if target.to_string_lossy().starts_with("socket:") => {}
            Ok(target) => {
                return Err(invalid(format!(
                    "descriptor {fd} is {}, not a socket",
                    target.display()
                )))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(invalid(format!("descriptor {fd} is not open")))
            }
            Err(e) => return Err(e),
        }
        taken.push(fd);
    }
    // SAFETY: `fd` is an open socket (checked above) that the process inherited at exec: no
    // object in this process owns it, and `TAKEN` makes sure it is wrapped only once.
    #[allow(unsafe_code)]
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = Socket::from(owned);
    // Close-on-exec first: nothing the daemon might start inherits it, whatever comes next.
    socket.set_cloexec(true)?;
    if socket.domain()? != Domain::UNIX {
        return Err(invalid(format!("descriptor {fd} is not a Unix socket")));
    }
    if socket.r#type()? != Type::STREAM {
        return Err(invalid(format!(
            "descriptor {fd} is not a stream socket (vhost-user runs over stream sockets)"
        )));
    }
    if !socket.is_listener()? {
        return Err(invalid(format!(
            "descriptor {fd} is not listening (pass a socket after listen(2))"
        )));
    }
    socket.set_nonblocking(false)?;
    let addr = socket.local_addr()?;
    let path = addr.as_pathname().map(PathBuf::from);
    let abstract_name = addr.as_abstract_namespace().map(<[u8]>::to_vec);
    Ok(PassedListener {
        fd,
        listener: UnixListener::from(OwnedFd::from(socket)),
        path,
        abstract_name,
    })
}

/// Takes the sockets systemd passed (`LISTEN_FDS` descriptors from 3 on, when `LISTEN_PID`
/// is this process), and removes the variables, which no child should see. None when the
/// variables are not set, or are for another process.
///
/// # Errors
///
/// Malformed variables, or a passed descriptor that is not a listening Unix stream socket.
pub fn listen_fds() -> io::Result<Vec<PassedListener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Called at start-up, before any thread exists.
        std::env::remove_var(var);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    let invalid = |why: String| io::Error::new(ErrorKind::InvalidInput, why);
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| invalid(format!("LISTEN_PID={pid} is not a process ID")))?;
    if pid != std::process::id() {
        return Ok(Vec::new());
    }
    let count: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=1024).contains(n))
        .ok_or_else(|| invalid(format!("LISTEN_FDS={count} is not a descriptor count")))?;
    (LISTEN_FDS_START..LISTEN_FDS_START + count)
        .map(|fd| take_fd(fd).map_err(|e| invalid(format!("LISTEN_FDS: {e}"))))
        .collect()
}

/// The service manager's notify socket (`NOTIFY_SOCKET`): the daemon tells it `READY=1` once
/// every socket listens and `STOPPING=1` when it shuts down.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    address: String,
}

impl Notifier {
    /// Connects to the socket `NOTIFY_SOCKET` names (a path, or `@name` for an abstract
    /// one), if it is set; the variable is removed, as no child should use it.
    ///
    /// # Errors
    ///
    /// An address of another kind (systemd's `vsock:` ones), or a socket that cannot be
    /// reached: a manager waiting for readiness that never comes is worse than a refusal.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        let Some(address) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(None);
        };
        // Called at start-up, before any thread exists.
        std::env::remove_var("NOTIFY_SOCKET");
        let text = address.to_string_lossy().into_owned();
        let bytes = address.as_encoded_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(&address)?,
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            _ => {
                return Err(io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("NOTIFY_SOCKET={text} is neither a path nor an abstract name (@name)"),
                ))
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket
            .connect_addr(&addr)
            .map_err(|e| io::Error::new(e.kind(), format!("NOTIFY_SOCKET={text}: {e}")))?;
        // The manager reads at once; a manager that does not never stalls a shutdown.
        socket.set_write_timeout(Some(Duration::from_secs(1)))?;
        Ok(Some(Notifier {
            socket,
            address: text,
        }))
    }

    /// Sends `state`: newline-separated `KEY=VALUE` assignments, such as `READY=1`.
    ///
    /// # Errors
    ///
    /// The send's.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        self.socket
            .send(state.as_bytes())
            .map(drop)
            .map_err(|e| io::Error::new(e.kind(), format!("NOTIFY_SOCKET={}: {e}", self.address)))
    }
}

/// What `--print-capabilities` prints: the backend's type, in the JSON of QEMU's
/// `vhost-user.json` schema (`VHostUserBackendCapabilities`; vsock defines no features).
pub const CAPABILITIES: &str = "{\n  \"type\": \"vsock\"\n}\n";
