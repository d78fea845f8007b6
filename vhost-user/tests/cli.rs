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
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--vm",
        "--config",
        "--groups",
        "--seqpacket",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
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

/// Starts the daemon with `flags` and waits until every host listener in `uds` answers.
fn start_fleet(flags: &[String], uds: &[PathBuf]) -> Child {
    let child = Command::new(DAEMON)
        .args(flags)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !uds.iter().all(|u| UnixStream::connect(u).is_ok()) {
        assert!(
            Instant::now() < deadline,
            "the daemon did not bind every VM's sockets"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// Checks that each VM's host listener is its own: a client of one VM's listener is
/// answered by that VM alone (no guest: closed after its CONNECT times out, no `OK`), and
/// after SIGTERM every path of every VM is gone and each VM's counters are printed under its
/// CID.
fn serve_and_stop(child: Child, cids: &[u64], paths: &[PathBuf], uds: &[PathBuf]) {
    let clients: Vec<UnixStream> = uds
        .iter()
        .map(|u| {
            let mut c = UnixStream::connect(u).unwrap();
            std::io::Write::write_all(&mut c, b"CONNECT 1234\n").unwrap();
            c
        })
        .collect();
    // No guest answers: each VM refuses its client once the connect timeout passes (2 s).
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut c, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "closed without an OK");
    }
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    for cid in cids {
        assert!(
            log.contains(&format!(
                "vhost-user-vsock: VM {cid}: connections: 0 from the guest"
            )),
            "VM {cid}'s own counters: {log}"
        );
    }
    for p in paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[test]
fn several_vms_are_served_from_repeated_vm_options() {
    let dir = scratch("fleet-flags");
    let cids = [3u64, 4, 5];
    let mut flags = Vec::new();
    let (mut paths, mut uds) = (Vec::new(), Vec::new());
    for cid in cids {
        let (s, u) = (
            dir.join(format!("v{cid}.sock")),
            dir.join(format!("vm{cid}")),
        );
        // Both spellings of the keys, as vhost-device-vsock documents them.
        let key = if cid == 4 { "guest_cid" } else { "guest-cid" };
        flags.push("--vm".to_string());
        flags.push(format!(
            "{key}={cid},socket={},uds-path={},tx-buffer-size=65536,queue-size=256,groups=g{cid}",
            s.display(),
            u.display()
        ));
        paths.push(s);
        paths.push(u.clone());
        uds.push(u);
    }
    flags.extend(["--runtime".to_string(), "smol".to_string()]);
    let child = start_fleet(&flags, &uds);
    for p in &paths {
        assert!(p.exists(), "{} bound", p.display());
    }
    serve_and_stop(child, &cids, &paths, &uds);
}

#[test]
fn several_vms_are_served_from_a_vhost_device_vsock_config_file() {
    let dir = scratch("fleet-yaml");
    let mut yaml = String::from("vms:\n");
    let (mut paths, mut uds) = (Vec::new(), Vec::new());
    for cid in [7u64, 8] {
        let (s, u) = (
            dir.join(format!("vhost{cid}.socket")),
            dir.join(format!("vm{cid}.vsock")),
        );
        yaml.push_str(&format!(
            "    - guest_cid: {cid}\n      socket: {}\n      uds_path: {}\n      \
             tx_buffer_size: 65536\n      queue_size: 1024\n      groups: group1+groupA\n",
            s.display(),
            u.display()
        ));
        paths.push(s);
        paths.push(u.clone());
        uds.push(u);
    }
    let file = dir.join("vms.yaml");
    std::fs::write(&file, yaml).unwrap();
    let child = start_fleet(&["--config".into(), file.display().to_string()], &uds);
    serve_and_stop(child, &[7, 8], &paths, &uds);
}

#[test]
fn bad_fleets_are_refused_before_anything_is_bound() {
    let dir = scratch("fleet-bad");
    let vm = |cid: u64, name: &str| {
        format!(
            "guest-cid={cid},socket={},uds-path={}",
            dir.join(format!("{name}.sock")).display(),
            dir.join(name).display()
        )
    };
    let yaml = dir.join("bad.yaml");
    std::fs::write(
        &yaml,
        "vms:\n  - guest_cid: 3\n    socket: /x\n    forward-cid: 1\n",
    )
    .unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--vm".into(), vm(3, "a"), "--vm".into(), vm(3, "b")],
            "both have guest CID 3",
        ),
        (
            vec!["--vm".into(), vm(3, "a"), "--vm".into(), vm(4, "a")],
            "same path",
        ),
        (
            vec!["--vm".into(), vm(3, "a"), "--vm".into(), vm(4, "a_80")],
            "socket for port 80",
        ),
        (
            vec!["--vm".into(), "guest-cid=3".into()],
            "`socket` is required",
        ),
        (
            vec!["--vm".into(), vm(3, "a"), "--guest-cid".into(), "4".into()],
            "cannot be used with",
        ),
        (
            vec![
                "--vm".into(),
                vm(3, "a"),
                "--config".into(),
                yaml.display().to_string(),
            ],
            "cannot be used with",
        ),
        (
            vec!["--config".into(), yaml.display().to_string()],
            "not supported",
        ),
        (
            vec![
                "--config".into(),
                dir.join("missing.yaml").display().to_string(),
            ],
            "missing.yaml",
        ),
        (
            vec![
                "--socket".into(),
                dir.join("s").display().to_string(),
                "--uds-path".into(),
                dir.join("u").display().to_string(),
                "--groups".into(),
                "a++b".into(),
            ],
            "--groups",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "bad.yaml")
        .collect();
    assert!(left.is_empty(), "paths bound by a refused set-up: {left:?}");
}

/// A second VM whose host path cannot be bound stops the daemon, and the first VM's paths,
/// bound already, are removed.
#[test]
fn a_vm_that_cannot_start_stops_the_daemon_and_leaves_nothing() {
    let dir = scratch("fleet-busy");
    let busy = dir.join("busy");
    let _holder = UnixListener::bind(&busy).unwrap();
    let out = run(&[
        "--vm",
        &format!(
            "guest-cid=3,socket={},uds-path={}",
            dir.join("a.sock").display(),
            dir.join("a").display()
        ),
        "--vm",
        &format!(
            "guest-cid=4,socket={},uds-path={}",
            dir.join("b.sock").display(),
            busy.display()
        ),
    ]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("VM 4: "), "{err}");
    assert!(
        !dir.join("a.sock").exists() && !dir.join("a").exists(),
        "VM 3's paths left"
    );
    assert!(
        !dir.join("b.sock").exists(),
        "VM 4's vhost-user socket left"
    );
}

/// Sends `request` to the stats socket and reads the answer to its end.
fn ask_stats(path: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(path).expect("connect to the stats socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    std::io::Write::write_all(&mut s, request).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    answer
}

#[test]
fn the_stats_socket_answers_json_and_prometheus_and_survives_bad_clients() {
    let dir = scratch("stats");
    let (s, u, st) = (dir.join("s.sock"), dir.join("u"), dir.join("stats.sock"));
    // A stale socket file where the stats socket goes is replaced.
    drop(UnixListener::bind(&st).unwrap());
    let child = start_with(&s, &u, &["--stats", st.to_str().unwrap()]);
    // The stats socket is bound after the VMs' sockets.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&st).is_err() {
        assert!(Instant::now() < deadline, "the stats socket never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A host client waiting on its CONNECT line shows as a connection.
    let mut client = UnixStream::connect(&u).unwrap();
    std::io::Write::write_all(&mut client, b"CONN").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let json = loop {
        let json = ask_stats(&st, b"json\n");
        if json.contains("\"state\":\"reading_connect_line\"") {
            break json;
        }
        assert!(
            Instant::now() < deadline,
            "the pending client never showed: {json}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(json.starts_with("{\"vms\":[{\"guest_cid\":3,\"answered\":true,\"activated\":false"));
    assert!(!json.contains("\"host_accepts\":0,"), "{json}");
    assert!(json.contains("\"guest_port\":null"), "{json}");

    let http = ask_stats(&st, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(http.starts_with("HTTP/1.0 200 OK\r\n"), "{http}");
    assert!(http.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(
        http.contains("\nvsock_engine_host_accepts_total{guest_cid=\"3\"} "),
        "{http}"
    );
    assert!(http.contains("# TYPE vsock_engine_host_accepts_total counter\n"));
    assert!(http.contains("vsock_connections{guest_cid=\"3\",state=\"reading_connect_line\"} 1\n"));
    assert!(ask_stats(&st, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.0 404"));
    assert!(ask_stats(&st, b"DELETE / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.0 405"));
    let head = ask_stats(&st, b"HEAD / HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.0 200") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    assert!(ask_stats(&st, b"rm -rf /\n").starts_with("unknown request"));

    // A silent client is dropped after a second, and the next one is answered.
    let _silent = UnixStream::connect(&st).unwrap();
    let started = Instant::now();
    assert!(ask_stats(&st, b"metrics\n").contains("vsock_vm_up{guest_cid=\"3\"} 1"));
    assert!(started.elapsed() < Duration::from_secs(5));
    // An endless request is cut off at its limit, and answered as a bad one.
    let mut long = vec![b'x'; 100_000];
    long.push(b'\n');
    let mut s2 = UnixStream::connect(&st).unwrap();
    let _ = std::io::Write::write_all(&mut s2, &long);
    drop(s2);
    // Many clients one after another, each answered.
    for _ in 0..200 {
        assert!(ask_stats(&st, b"json\n").ends_with("]}]}\n"));
    }

    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!st.exists(), "the stats socket was left behind");
}

#[test]
fn sigusr1_logs_the_counters_and_serving_goes_on() {
    let dir = scratch("usr1");
    let (s, u) = (dir.join("s.sock"), dir.join("u"));
    let child = start(&s, &u);
    drop(UnixStream::connect(&u).unwrap());
    signal(&child, "-USR1");
    std::thread::sleep(Duration::from_millis(300));
    // Still serving.
    UnixStream::connect(&u).unwrap();
    signal(&child, "-TERM");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = stderr(&out);
    let line = log
        .lines()
        .find(|l| l.contains("stats {\"vms\":"))
        .unwrap_or_else(|| panic!("no stats line: {log}"));
    assert!(line.contains("\"guest_cid\":3,\"answered\":true"), "{line}");
    // The start-up probe and the client above, at least.
    assert!(!line.contains("\"host_accepts\":0,"), "{line}");
}

#[test]
fn a_stats_path_that_clashes_with_a_vm_is_refused() {
    let dir = scratch("stclash");
    let (s, u) = (dir.join("s.sock"), dir.join("u"));
    for (stats, reason) in [
        (s.clone(), "are the same path"),
        (dir.join("u_1234"), "would be"),
        (dir.join("x".repeat(120)), "a Unix socket path may have"),
    ] {
        let out = run(&[
            "--socket",
            s.to_str().unwrap(),
            "--uds-path",
            u.to_str().unwrap(),
            "--stats",
            stats.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(reason), "{}", stderr(&out));
        assert!(!s.exists() && !u.exists());
    }
}
