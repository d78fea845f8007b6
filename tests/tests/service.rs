//! The daemon as service managers start it: the sample systemd units in `dist/systemd` run
//! as systemd runs them (the socket bound by the manager and passed as descriptor 3, a notify
//! socket waiting for `READY=1`), QEMU's backend conventions (`--fd`, `--socket-path`,
//! `--print-capabilities`, the descriptor file in `dist/qemu`), and the refusals of bad
//! set-ups. Every test runs the real release daemon; the real-guest suite starts it by
//! socket activation too (`vsock_tests::guest::Daemon`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use vsock_tests::guest::{daemon_binary, socket_activate_binary, NotifySocket};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn daemon() -> PathBuf {
    daemon_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// A scratch directory, removed on drop; short, for socket paths.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("vsvc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `key=` in a unit file's text (its last assignment, as systemd takes it).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .trim()
        .to_string()
}

/// Asks the vhost-user socket for the device's features (`VHOST_USER_GET_FEATURES`), as a
/// frontend's first message: proves a daemon serves it.
fn vhost_user_features(socket: &Path) -> u64 {
    let mut s = UnixStream::connect(socket).expect("connect to the vhost-user socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // request 1 (GET_FEATURES), flags: version 1, no payload.
    let mut msg = Vec::new();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&msg).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("a GET_FEATURES reply");
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    assert_eq!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()) & 0x4,
        0x4,
        "not a reply"
    );
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// `VIRTIO_F_VERSION_1`, which every modern device offers.
const VERSION_1: u64 = 1 << 32;

fn terminate(mut child: Child) -> Output {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon ignored SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_sample_units_run_the_daemon_as_systemd_would() {
    let dist = workspace().join("dist/systemd");
    let socket_unit = std::fs::read_to_string(dist.join("vhost-user-vsock@.socket")).unwrap();
    let service_unit = std::fs::read_to_string(dist.join("vhost-user-vsock@.service")).unwrap();
    assert_eq!(unit_value(&service_unit, "Type"), "notify");
    let run = Scratch::new("units");
    // What systemd makes of the units for instance 3, with /run/vhost-user-vsock here.
    let expand = |s: &str| {
        s.replace("%i", "3")
            .replace("/run/vhost-user-vsock", &run.0.to_string_lossy())
    };
    let socket = PathBuf::from(expand(&unit_value(&socket_unit, "ListenStream")));
    let exec = expand(&unit_value(&service_unit, "ExecStart"));
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/libexec/vhost-user-vsock"));
    let args: Vec<&str> = words.collect();
    let uds = PathBuf::from(
        args.iter()
            .find_map(|a| a.strip_prefix("--uds-path="))
            .expect("ExecStart names --uds-path"),
    );

    let mut notify = NotifySocket::bind(run.join("notify"));
    let mut child = Command::new(socket_activate_binary())
        .arg("--listen")
        .arg(&socket)
        .arg("--")
        .arg(daemon())
        .args(&args)
        .env("NOTIFY_SOCKET", notify.path())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = notify.wait_for("READY=1", Duration::from_secs(20), || {
        child.try_wait().unwrap().is_none()
    });
    if !ready {
        let _ = child.kill();
        panic!("no READY=1: {}", stderr(&child.wait_with_output().unwrap()));
    }
    assert!(
        notify.heard().iter().any(|a| a == "STATUS=serving 1 VM"),
        "{:?}",
        notify.heard()
    );
    // Ready means served: the passed socket answers as a vhost-user backend, and the host
    // listener takes clients.
    assert_ne!(vhost_user_features(&socket) & VERSION_1, 0);
    UnixStream::connect(&uds).expect("the host listener is bound by READY=1");
    // A frontend that goes leaves the socket served: systemd's socket outlives connections.
    assert_ne!(vhost_user_features(&socket) & VERSION_1, 0);

    let out = terminate(child);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        notify.heard().iter().any(|a| a == "STOPPING=1"),
        "{:?}",
        notify.heard()
    );
    // The socket is systemd's, left in place; the host listener is the daemon's, removed.
    assert!(
        socket.exists(),
        "the daemon removed the socket systemd owns"
    );
    assert!(!uds.exists(), "the host listener was left behind");
    // The daemon never forked: the process the manager started is the one that exited, and
    // the socket it was given was served by it (no one answers now).
    assert!(UnixStream::connect(&socket).is_err());
}

#[test]
fn a_socket_passed_with_fd_is_served() {
    let dir = Scratch::new("fd");
    let socket = dir.join("vhost.sock");
    let uds = dir.join("vm.vsock");
    let child = Command::new(socket_activate_binary())
        .arg("--fds-only")
        .arg("--listen")
        .arg(&socket)
        .arg("--")
        .arg(daemon())
        .arg("--fd=3")
        .arg("--uds-path")
        .arg(&uds)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(&uds).is_err() {
        assert!(std::time::Instant::now() < deadline, "never served");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(vhost_user_features(&socket) & VERSION_1, 0);
    let out = terminate(child);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(socket.exists(), "the passed socket's path is its owner's");
}

#[test]
fn passed_sockets_go_to_the_vms_bound_at_their_paths() {
    let dir = Scratch::new("fleet");
    let (s3, s4) = (dir.join("vm3.sock"), dir.join("vm4.sock"));
    let (u3, u4) = (dir.join("vm3.vsock"), dir.join("vm4.vsock"));
    let mut notify = NotifySocket::bind(dir.join("notify"));
    // VM 4's socket is passed; VM 3 binds its own. The paths are spelt differently from how
    // they were bound (`./` inside), and still match.
    let vm = |cid: u32, s: &Path, u: &Path| {
        format!(
            "guest-cid={cid},socket={},uds-path={}",
            s.parent()
                .unwrap()
                .join(".")
                .join(s.file_name().unwrap())
                .display(),
            u.display()
        )
    };
    let mut child = Command::new(socket_activate_binary())
        .arg("--listen")
        .arg(&s4)
        .arg("--")
        .arg(daemon())
        .arg("--vm")
        .arg(vm(3, &s3, &u3))
        .arg("--vm")
        .arg(vm(4, &s4, &u4))
        .env("NOTIFY_SOCKET", notify.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        notify.wait_for("READY=1", Duration::from_secs(20), || child
            .try_wait()
            .unwrap()
            .is_none()),
        "no READY=1"
    );
    assert!(notify.heard().iter().any(|a| a == "STATUS=serving 2 VMs"));
    for (s, u) in [(&s3, &u3), (&s4, &u4)] {
        assert_ne!(vhost_user_features(s) & VERSION_1, 0);
        UnixStream::connect(u).unwrap();
    }
    let out = terminate(child);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!s3.exists(), "the daemon's own socket was left behind");
    assert!(s4.exists(), "the passed socket's path is its owner's");
}

/// Runs the daemon through the activator with `listen` sockets passed, and returns its
/// output once it exits by itself.
fn run_activated(listen: &[PathBuf], fds_only: bool, args: &[&str]) -> Output {
    let mut command = Command::new(socket_activate_binary());
    if fds_only {
        command.arg("--fds-only");
    }
    for l in listen {
        command.arg("--listen").arg(l);
    }
    command
        .arg("--")
        .arg(daemon())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn bad_descriptors_and_notify_sockets_are_refused_with_a_reason() {
    let dir = Scratch::new("bad");
    let uds = dir.join("vm.vsock");
    let uds_arg = format!("--uds-path={}", uds.display());
    let refused = |out: &Output, reason: &str| {
        assert!(matches!(out.status.code(), Some(1 | 2)), "{}", stderr(out));
        assert!(
            stderr(out).contains(reason),
            "wanted {reason:?}: {}",
            stderr(out)
        );
        assert!(!uds.exists(), "a refused start bound {}", uds.display());
    };
    let plain = |args: &[&str]| {
        Command::new(daemon())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    refused(&plain(&["--fd=0", &uds_arg]), "standard input");
    refused(&plain(&["--fd=97", &uds_arg]), "descriptor 97 is not open");
    // A regular file as descriptor 3.
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" --fd=3 \"$1\" 3<\"$2\"")
        .arg(daemon())
        .arg(&uds_arg)
        .arg(&file)
        .output()
        .unwrap();
    refused(&out, "not a socket");
    // --fd names one socket for one VM.
    let s = dir.join("s.sock");
    refused(
        &run_activated(
            std::slice::from_ref(&s),
            true,
            &["--fd=3", "--socket", "x.sock", &uds_arg],
        ),
        "cannot be used with",
    );
    // Two passed sockets for one VM, and a passed socket that is no VM's.
    let t = dir.join("t.sock");
    refused(
        &run_activated(&[s.clone(), t.clone()], false, &[&uds_arg]),
        "2 sockets were passed",
    );
    let other = dir.join("other.sock");
    refused(
        &run_activated(
            std::slice::from_ref(&t),
            false,
            &["--socket", &other.to_string_lossy(), &uds_arg],
        ),
        "is no VM's vhost-user socket",
    );
    assert!(!other.exists());
    // A notify socket nobody listens on, and one of a kind the daemon cannot reach.
    let s = dir.join("n.sock");
    for (notify, reason) in [
        (
            dir.join("nobody").to_string_lossy().into_owned(),
            "NOTIFY_SOCKET=",
        ),
        (
            "vsock:2:1234".to_string(),
            "neither a path nor an abstract name",
        ),
    ] {
        let out = Command::new(daemon())
            .args(["--socket", &s.to_string_lossy(), &uds_arg])
            .env("NOTIFY_SOCKET", &notify)
            .output()
            .unwrap();
        refused(&out, reason);
        assert!(!s.exists());
    }
}

#[test]
fn an_abstract_notify_socket_hears_ready() {
    let dir = Scratch::new("abs");
    let name = format!("vsock-test-notify-{}", std::process::id());
    let addr =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .unwrap();
    let listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (s, u) = (dir.join("s.sock"), dir.join("u"));
    let child = Command::new(daemon())
        .args(["--socket-path", &s.to_string_lossy()])
        .args(["--uds-path", &u.to_string_lossy()])
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = listener
        .recv(&mut buf)
        .expect("READY=1 on the abstract socket");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(text.lines().any(|l| l == "READY=1"), "{text}");
    // --socket-path is --socket.
    assert!(s.exists());
    let out = terminate(child);
    assert!(out.status.success(), "{}", stderr(&out));
    let n = listener.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[test]
fn capabilities_and_the_descriptor_file_are_what_qemu_reads() {
    for args in [
        &["--print-capabilities"][..],
        // Every other flag is ignored, even ones that would fail.
        &["--print-capabilities", "--no-such-flag", "--fd=0"][..],
    ] {
        let out = Command::new(daemon()).args(args).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let caps = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            json_strings(&caps),
            vec![("type".into(), "vsock".into())],
            "{caps}"
        );
    }
    let file = workspace().join("dist/qemu/50-vhost-user-vsock.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let fields = json_strings(&text);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in {}", file.display()))
    };
    assert_eq!(get("type"), "vsock");
    assert!(!get("description").is_empty());
    // QEMU's convention: /usr/libexec/vhost-user-<device>, the binary cargo builds.
    assert_eq!(get("binary"), "/usr/libexec/vhost-user-vsock");
    assert_eq!(daemon().file_name().unwrap(), "vhost-user-vsock");
}

/// The `"key": "value"` pairs of a flat JSON object of strings, checking its shape: braces
/// around comma-separated pairs, nothing else.
fn json_strings(text: &str) -> Vec<(String, String)> {
    let body = text
        .trim()
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or_else(|| panic!("not an object: {text}"));
    body.split(',')
        .map(|pair| {
            let (k, v) = pair.split_once(':').unwrap_or_else(|| panic!("{pair}"));
            let unquote = |s: &str| {
                let s = s.trim();
                s.strip_prefix('"')
                    .and_then(|s| s.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("not a string: {s}"))
                    .to_string()
            };
            (unquote(k), unquote(v))
        })
        .collect()
}
