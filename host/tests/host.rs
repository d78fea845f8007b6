//! The host side over real Unix sockets, driven by the engine's actions.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID};
use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant, Interest, Io, RxGrant, Tx};
use vsock_device::HostSockets;
use vsock_host::{Host, Listener, PathError, Reactor, UdsPath, MAX_SOCKET_PATH};

const GUEST_CID: u64 = 3;

/// A fresh directory for one test's sockets.
fn temp_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "vsock-host-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A reactor that watches nothing and records what it was asked.
#[derive(Default)]
struct Recorder {
    registered: Vec<ConnId>,
    interest: Vec<(ConnId, Interest)>,
    deregistered: Vec<ConnId>,
    /// Fail every registration with this OS error, as a full epoll set would.
    refuse: Option<i32>,
}

impl Reactor for Recorder {
    type Socket = UnixStream;

    fn register(
        &mut self,
        conn: ConnId,
        stream: UnixStream,
        _interest: Interest,
    ) -> std::io::Result<UnixStream> {
        if let Some(errno) = self.refuse {
            // The stream is dropped here, as a real reactor drops what it cannot watch.
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        stream.set_nonblocking(true)?;
        self.registered.push(conn);
        Ok(stream)
    }

    fn stream<'a>(&self, socket: &'a UnixStream) -> &'a UnixStream {
        socket
    }

    fn set_interest(
        &mut self,
        conn: ConnId,
        _socket: &mut UnixStream,
        interest: Interest,
    ) -> std::io::Result<()> {
        self.interest.push((conn, interest));
        Ok(())
    }

    fn deregister(&mut self, conn: ConnId, _socket: UnixStream) {
        self.deregistered.push(conn);
    }
}

fn guest(op: Op, gp: u32, hp: u32, len: u32) -> Header {
    Packet {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: gp,
        dst_port: hp,
        len,
        socket_type: SocketType::Stream,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
    .to_header()
}

fn drain(engine: &mut Engine, host: &mut Host<Recorder>, now: Instant) -> Vec<Header> {
    let mut out = Vec::new();
    loop {
        let mut busy = false;
        while let Some(action) = engine.poll_action() {
            busy = true;
            match action {
                // The device writes to sockets (`VsockDevice::serve`); these tests have none,
                // so they write what the engine holds themselves.
                Action::Flush { conn } => {
                    let [a, b] = engine.host_bytes(conn).unwrap();
                    let mut socket = host.socket(conn).expect("a live socket");
                    let r = socket.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]);
                    let _ = engine.handle_host_write(now, conn, Io::from_result(&r));
                }
                other => host.perform(now, engine, other),
            }
        }
        while let Some(grant) = engine.poll_rx(now, 4052) {
            busy = true;
            match grant {
                RxGrant::Packet(p) => out.push(p.send()),
                RxGrant::Probe(p) => panic!("stream connections only: {p:?}"),
                RxGrant::Message(m) => panic!("stream connections only: {m:?}"),
                RxGrant::Read(r) => {
                    let _ = r.complete(Io::WouldBlock, &mut &[][..]);
                }
            }
        }
        if !busy {
            return out;
        }
    }
}

fn setup() -> (PathBuf, Engine, Host<Recorder>) {
    let dir = temp_dir();
    let engine = Engine::new(Config::new(GUEST_CID), Instant::ZERO).unwrap();
    let host = Host::new(
        UdsPath::new(dir.join("vsock")).unwrap(),
        Recorder::default(),
    );
    (dir, engine, host)
}

#[test]
fn paths_have_room_for_every_port() {
    let p = UdsPath::new("/run/vm/vsock").unwrap();
    assert_eq!(p.listener(), std::path::Path::new("/run/vm/vsock"));
    assert_eq!(p.port(1234), PathBuf::from("/run/vm/vsock_1234"));
    assert_eq!(p.port(u32::MAX), PathBuf::from("/run/vm/vsock_4294967295"));
    assert_eq!(UdsPath::new(""), Err(PathError::Empty));
    let longest = "x".repeat(MAX_SOCKET_PATH - 11);
    assert!(UdsPath::new(&longest).is_ok());
    assert!(matches!(
        UdsPath::new(format!("{longest}y")),
        Err(PathError::TooLong { len, max }) if len == MAX_SOCKET_PATH - 10 && max == MAX_SOCKET_PATH - 11
    ));
}

#[test]
fn listener_accepts_replaces_stale_files_refuses_live_ones_and_unlinks() {
    let dir = temp_dir();
    let path = dir.join("vsock");
    let listener = Listener::bind(&path).unwrap();
    assert!(
        listener.accept().unwrap().is_none(),
        "nothing pending, no blocking"
    );
    let _client = UnixStream::connect(&path).unwrap();
    assert!(listener.accept().unwrap().is_some());
    // Someone listens: refused.
    let busy = Listener::bind(&path).unwrap_err();
    assert_eq!(busy.kind(), ErrorKind::AddrInUse);
    drop(listener);
    assert!(!path.exists(), "the path is unlinked on drop");
    // A file left by a dead listener is replaced.
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let again = Listener::bind(&path).unwrap();
    assert_eq!(again.path(), path);
    drop(again);
    // A file that is not a socket is never removed.
    std::fs::write(&path, b"precious").unwrap();
    let refused = Listener::bind(&path).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn a_live_socket_of_another_type_is_never_unlinked() {
    // A datagram (or seqpacket) socket refuses a stream connect with EPROTOTYPE, not
    // ECONNREFUSED: it is alive, and its owner keeps its path.
    let dir = temp_dir();
    let path = dir.join("vsock");
    let owner = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let refused = Listener::bind(&path).unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::AddrInUse);
    assert!(path.exists(), "the live socket's path is still there");
    let probe = std::os::unix::net::UnixDatagram::unbound().unwrap();
    probe.send_to(b"still mine", &path).unwrap();
    let mut buf = [0u8; 16];
    let n = owner.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still mine");
}

#[test]
fn guest_connect_reaches_the_port_socket_or_is_reset_at_once() {
    let (dir, mut engine, mut host) = setup();
    let service = UnixListener::bind(dir.join("vsock_1234")).unwrap();
    let now = Instant::from_millis(1);
    assert!(matches!(
        engine.handle_tx(now, &guest(Op::Request, 50_000, 1234, 0)),
        Tx::Done
    ));
    let got = drain(&mut engine, &mut host, now);
    assert_eq!(got[0].op.get(), Op::Response.to_u16());
    let (mut app, _) = service.accept().unwrap();
    assert_eq!(host.stats().connects, 1);
    assert_eq!(host.len(), 1);

    // Guest data that the socket did not take directly is flushed by the host side.
    let conn = ConnId::from_raw(*host_conns(&host).first().unwrap());
    let payload = b"hello host";
    match engine.handle_tx(now, &guest(Op::Rw, 50_000, 1234, payload.len() as u32)) {
        Tx::Data(d) => d.complete(Io::Done(0), &mut &payload[..]).unwrap(),
        Tx::Done => panic!("data refused"),
    }
    engine
        .handle_host_event(now, conn, HostEvent::Writable)
        .unwrap();
    drain(&mut engine, &mut host, now);
    let mut buf = [0u8; 64];
    let n = app.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], payload);

    // Guest closes: the socket is shut for writing, then closed; the app sees end of file.
    assert!(matches!(
        engine.handle_tx(now, &{
            let mut h = guest(Op::Shutdown, 50_000, 1234, 0);
            h.flags = 3.into();
            h
        }),
        Tx::Done
    ));
    let got = drain(&mut engine, &mut host, now);
    assert_eq!(got.last().unwrap().op.get(), Op::Rst.to_u16());
    assert_eq!(app.read(&mut buf).unwrap(), 0);
    assert_eq!(host.stats().closes, 1);
    assert!(host.is_empty());
    assert_eq!(host.reactor().deregistered, vec![conn]);

    // No socket at the port: the guest is reset at once, nothing is left open.
    assert!(matches!(
        engine.handle_tx(now, &guest(Op::Request, 50_001, 4321, 0)),
        Tx::Done
    ));
    let got = drain(&mut engine, &mut host, now);
    assert_eq!(got[0].op.get(), Op::Rst.to_u16());
    assert_eq!(host.stats().connect_failures, 1);
    assert_eq!(engine.stats().connect_failed, 1);
    assert!(host.is_empty());
}

#[test]
fn host_client_sends_connect_and_gets_ok() {
    let (dir, mut engine, mut host) = setup();
    let listener = Listener::bind(&dir.join("vsock")).unwrap();
    let mut client = UnixStream::connect(dir.join("vsock")).unwrap();
    client.write_all(b"CONNECT 5000\nearly bytes").unwrap();
    let now = Instant::from_millis(1);
    let stream = listener.accept().unwrap().expect("a pending client");
    let conn = host
        .adopt_client(now, &mut engine, stream)
        .expect("adopted");
    engine
        .handle_host_event(now, conn, HostEvent::Readable)
        .unwrap();
    let got = drain(&mut engine, &mut host, now);
    let request = got
        .iter()
        .find(|h| h.op.get() == Op::Request.to_u16())
        .expect("REQUEST");
    assert_eq!(request.dst_port.get(), 5000);
    let hp = request.src_port.get();
    let mut response = guest(Op::Response, 5000, hp, 0);
    response.buf_alloc = 65536.into();
    assert!(matches!(engine.handle_tx(now, &response), Tx::Done));
    let got = drain(&mut engine, &mut host, now);
    // The bytes after the line reach the guest.
    assert!(got
        .iter()
        .any(|h| h.op.get() == Op::Rw.to_u16() && h.len.get() == 11));
    let mut buf = [0u8; 32];
    let n = client.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], format!("OK {hp}\n").as_bytes());
}

#[test]
fn a_garbage_line_closes_the_client() {
    let (dir, mut engine, mut host) = setup();
    let listener = Listener::bind(&dir.join("vsock")).unwrap();
    let mut client = UnixStream::connect(dir.join("vsock")).unwrap();
    client.write_all(b"HELLO\n").unwrap();
    let now = Instant::from_millis(1);
    let conn = host
        .adopt_client(now, &mut engine, listener.accept().unwrap().unwrap())
        .unwrap();
    engine
        .handle_host_event(now, conn, HostEvent::Readable)
        .unwrap();
    drain(&mut engine, &mut host, now);
    assert_eq!(engine.stats().connect_line_garbage, 1);
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).unwrap(), 0, "closed without a reply");
    assert!(host.is_empty());
}

#[test]
fn a_full_table_refuses_clients_and_closes_them() {
    let dir = temp_dir();
    let mut config = Config::new(GUEST_CID);
    config.max_connections = 1;
    let mut engine = Engine::new(config, Instant::ZERO).unwrap();
    let mut host = Host::new(
        UdsPath::new(dir.join("vsock")).unwrap(),
        Recorder::default(),
    );
    let listener = Listener::bind(&dir.join("vsock")).unwrap();
    let _first = UnixStream::connect(dir.join("vsock")).unwrap();
    let mut second = UnixStream::connect(dir.join("vsock")).unwrap();
    let now = Instant::from_millis(1);
    assert!(host
        .adopt_client(now, &mut engine, listener.accept().unwrap().unwrap())
        .is_some());
    assert!(host
        .adopt_client(now, &mut engine, listener.accept().unwrap().unwrap())
        .is_none());
    assert_eq!(host.stats().refused_clients, 1);
    let mut buf = [0u8; 8];
    assert_eq!(
        second.read(&mut buf).unwrap(),
        0,
        "refused client sees the close"
    );
}

/// `ENOSPC`: what `epoll_ctl` returns when `max_user_watches` is reached.
const ENOSPC: i32 = 28;

#[test]
fn guest_connect_to_a_path_that_is_no_listening_socket_is_reset_at_once() {
    let (dir, mut engine, mut host) = setup();
    let port_path = |port: u32| dir.join(format!("vsock_{port}"));
    // A regular file, a directory, a dangling symlink, a socket file nobody listens on any
    // more, a datagram socket.
    std::fs::write(port_path(1), b"not a socket").unwrap();
    std::fs::create_dir(port_path(2)).unwrap();
    std::os::unix::fs::symlink(dir.join("nowhere"), port_path(3)).unwrap();
    drop(UnixListener::bind(port_path(4)).unwrap());
    let _datagram = std::os::unix::net::UnixDatagram::bind(port_path(5)).unwrap();
    // What connect(2) says to each (the datagram socket: EPROTOTYPE).
    let refused = |port| UnixStream::connect(port_path(port)).unwrap_err().kind();
    assert_eq!(refused(1), ErrorKind::ConnectionRefused);
    assert_eq!(refused(2), ErrorKind::ConnectionRefused);
    assert_eq!(refused(3), ErrorKind::NotFound);
    assert_eq!(refused(4), ErrorKind::ConnectionRefused);
    assert!(UnixStream::connect(port_path(5)).is_err());

    let now = Instant::from_millis(1);
    for port in 1..=5 {
        let gp = 50_000 + port;
        assert!(matches!(
            engine.handle_tx(now, &guest(Op::Request, gp, port, 0)),
            Tx::Done
        ));
        // The reset comes out of the same round, with no time passing: no deadline involved.
        let got = drain(&mut engine, &mut host, now);
        assert_eq!(got.len(), 1, "port {port}: {got:?}");
        assert_eq!(got[0].op.get(), Op::Rst.to_u16(), "port {port}");
        assert_eq!(got[0].dst_port.get(), gp);
        assert_eq!(got[0].src_port.get(), port);
    }
    assert_eq!(host.stats().connect_failures, 5);
    assert_eq!(engine.stats().connect_failed, 5);
    assert_eq!(host.stats().connects, 0);
    assert!(host.is_empty());
    assert!(host.reactor().registered.is_empty());
    assert_eq!(engine.connections(), 0);
    // Nothing at those paths was touched.
    assert_eq!(std::fs::read(port_path(1)).unwrap(), b"not a socket");
    assert!(port_path(2).is_dir());
}

#[test]
fn a_connected_socket_that_cannot_be_watched_is_closed_and_the_guest_reset() {
    let (dir, mut engine, mut host) = setup();
    host.reactor_mut().refuse = Some(ENOSPC);
    let service = UnixListener::bind(dir.join("vsock_1234")).unwrap();
    let now = Instant::from_millis(1);
    assert!(matches!(
        engine.handle_tx(now, &guest(Op::Request, 50_000, 1234, 0)),
        Tx::Done
    ));
    let got = drain(&mut engine, &mut host, now);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].op.get(), Op::Rst.to_u16());
    assert_eq!(host.stats().register_failures, 1);
    assert_eq!(host.stats().connects, 0);
    assert_eq!(engine.stats().connect_failed, 1);
    assert!(host.is_empty());
    assert_eq!(engine.connections(), 0);
    // The connect had reached the service; the socket was closed, not leaked.
    let (mut app, _) = service.accept().unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(app.read(&mut buf).unwrap(), 0);
}

#[test]
fn a_host_client_that_cannot_be_watched_is_closed_and_forgotten() {
    let (dir, mut engine, mut host) = setup();
    host.reactor_mut().refuse = Some(ENOSPC);
    let listener = Listener::bind(&dir.join("vsock")).unwrap();
    let mut client = UnixStream::connect(dir.join("vsock")).unwrap();
    client.write_all(b"CONNECT 5000\n").unwrap();
    let now = Instant::from_millis(1);
    let stream = listener.accept().unwrap().expect("a pending client");
    assert_eq!(host.adopt_client(now, &mut engine, stream), None);
    // The guest never hears of it; the engine's slot is free again.
    let got = drain(&mut engine, &mut host, now);
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(engine.connections(), 0);
    assert_eq!(host.stats().register_failures, 1);
    assert!(host.is_empty());
    // Closed without a reply: its line unread, so a reset rather than a plain end of file.
    let mut buf = [0u8; 8];
    match client.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the client should see its socket closed, got {other:?}"),
    }
    // The listener serves the next client.
    host.reactor_mut().refuse = None;
    let _next = UnixStream::connect(dir.join("vsock")).unwrap();
    let stream = listener.accept().unwrap().expect("the next client");
    assert!(host.adopt_client(now, &mut engine, stream).is_some());
}

fn host_conns(host: &Host<Recorder>) -> Vec<u64> {
    host.reactor()
        .registered
        .iter()
        .map(|c| c.to_raw())
        .collect()
}
