//! The daemon as its users meet it: flags, errors, and signals. Each test runs the real
//! binary.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DAEMON: &str = env!("CARGO_BIN_EXE_vhost-user-vsock");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vu-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(args: &[&str]) -> Output {
    Command::new(DAEMON)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run the daemon")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn start(socket: &Path, uds: &Path) -> Child {
    start_with(socket, uds, &[])
}

fn start_with(socket: &Path, uds: &Path, flags: &[&str]) -> Child {
    let child = Command::new(DAEMON)
        .args(flags)
        .arg("--socket")
        .arg(socket)
        .arg("--uds-path")
        .arg(uds)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    // Files left by a killed daemon may already be there: wait until the host listener
    // answers, which it does only once the daemon has set up its signals and both sockets.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(socket.exists() && UnixStream::connect(uds).is_ok()) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not bind its sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn help_explains_every_flag() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--socket",
        "--guest-cid",
        "--uds-path",
        "--tx-buffer-size",
        "--queue-size",
        "--runtime",
        "--record",
        "--record-snaplen",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    let dir = scratch("flags");
    let s = dir.join("s.sock");
    let u = dir.join("u");
    let (s, u) = (s.to_str().unwrap(), u.to_str().unwrap());
    for (args, says) in [
        (vec!["--uds-path", u], "--socket"),
        (
            vec!["--socket", s, "--uds-path", u, "--guest-cid", "2"],
            "--guest-cid",
        ),
        (
            vec!["--socket", s, "--uds-path", u, "--guest-cid", "x"],
            "--guest-cid",
        ),
        (
            vec!["--socket", s, "--uds-path", u, "--runtime", "glommio"],
            "--runtime",
        ),
        (
            vec!["--socket", s, "--uds-path", u, "--queue-size", "1000"],
            "power of two",
        ),
        (
            vec!["--socket", s, "--uds-path", u, "--tx-buffer-size", "0"],
            "bad configuration",
        ),
        (
            vec![
                "--socket",
                s,
                "--uds-path",
                u,
                "--tx-buffer-size",
                "1073741825",
            ],
            "bad configuration",
        ),
        (
            vec!["--socket", s, "--uds-path", u, "--record-snaplen", "9"],
            "--record",
        ),
        (vec!["--socket", s, "--uds-path", u, "--bogus"], "--bogus"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(!Path::new(s).exists(), "{args:?} left a socket behind");
    }
}

#[test]
fn every_tx_buffer_size_from_one_byte_to_1_gib_is_taken() {
    // Sizes below the 64 KiB credit update threshold used to be refused: it now follows the
    // buffer size.
    for size in [
        "1",
        "4096",
        "32768",
        "65535",
        "65536",
        "262144",
        "1048576",
        "1073741824",
    ] {
        let dir = scratch(&format!("buf{size}"));
        let (s, u) = (dir.join("s.sock"), dir.join("u"));
        let child = start_with(&s, &u, &["--tx-buffer-size", size]);
        signal(&child, "-TERM");
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "--tx-buffer-size {size}: {}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("credit update threshold"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn paths_that_cannot_be_sockets_are_refused_with_a_reason() {
    let dir = scratch("paths");
    let u = dir.join("u");
    let long = format!("{}/{}", dir.display(), "x".repeat(120));
    let out = run(&["--socket", &long, "--uds-path", u.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("107"), "{}", stderr(&out));

    let missing = dir.join("no/such/dir/s.sock");
    let out = run(&[
        "--socket",
        missing.to_str().unwrap(),
        "--uds-path",
        u.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot bind"), "{}", stderr(&out));

    // <uds_path>_<port> must fit too.
    let long_uds = format!("{}/{}", dir.display(), "u".repeat(100));
    let s = dir.join("s.sock");
    let out = run(&["--socket", s.to_str().unwrap(), "--uds-path", &long_uds]);
    assert!(!out.status.success());
    assert!(!s.exists(), "the vhost-user socket was left behind");

    // A regular file is never replaced.
    let file = dir.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let out = run(&[
        "--socket",
        file.to_str().unwrap(),
        "--uds-path",
        u.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a socket"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn busy_sockets_are_refused_and_stale_ones_replaced() {
    let dir = scratch("busy");
    let (s, u) = (dir.join("s.sock"), dir.join("u"));
    let mut first = start(&s, &u);
    let out = run(&[
        "--socket",
        s.to_str().unwrap(),
        "--uds-path",
        dir.join("u2").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    let out = run(&[
        "--socket",
        dir.join("s2.sock").to_str().unwrap(),
        "--uds-path",
        u.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    // The first daemon still serves.
    assert!(UnixStream::connect(&u).is_ok());
    first.kill().unwrap();
    first.wait().unwrap();

    // Killed, it left both socket files: the next daemon replaces them.
    assert!(s.exists() && u.exists());
    let mut next = start(&s, &u);
    signal(&next, "-TERM");
    assert!(next.wait().unwrap().success());

    // A socket file whose listener is gone is stale too.
    drop(UnixListener::bind(dir.join("stale.sock")).unwrap());
    let mut again = start(&dir.join("stale.sock"), &dir.join("u3"));
    signal(&again, "-INT");
    assert!(again.wait().unwrap().success());
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    for sig in ["-TERM", "-INT"] {
        let dir = scratch(&format!("sig{sig}"));
        let (s, u) = (dir.join("s.sock"), dir.join("u"));
        let child = start(&s, &u);
        // A host client waiting on its CONNECT line is closed, not left hanging.
        let mut client = UnixStream::connect(&u).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{sig}: {}", stderr(&out));
        let log = stderr(&out);
        assert!(log.contains("shutting down"), "{log}");
        assert!(
            log.contains("connections:") && log.contains("host->guest"),
            "no counters: {log}"
        );
        assert!(
            !s.exists() && !u.exists(),
            "{sig}: socket paths left behind"
        );
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut client, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "the waiting client was not closed");
    }
}

#[test]
fn every_runtime_starts_and_stops() {
    for runtime in ["mio", "tokio", "smol"] {
        let dir = scratch(runtime);
        let (s, u) = (dir.join("s.sock"), dir.join("u"));
        let trace = dir.join("t.pcapng");
        let child = Command::new(DAEMON)
            .args(["--runtime", runtime, "--record"])
            .arg(&trace)
            .arg("--socket")
            .arg(&s)
            .arg("--uds-path")
            .arg(&u)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&u).is_err() {
            assert!(Instant::now() < deadline, "{runtime}: no listener");
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(&child, "-TERM");
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{runtime}: {}", stderr(&out));
        // The trace of a session with no guest holds the configuration, and replays.
        let bytes = std::fs::read(&trace).unwrap();
        vsock_trace::replay(&bytes).unwrap_or_else(|e| panic!("{runtime}: {e}"));
    }
}
