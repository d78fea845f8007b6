//! A test bed: the device over real split virtqueues in guest memory, and host sockets that are
//! real Unix stream socket pairs (the engine's end non-blocking, the host application's end
//! held by the test).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use virtio_queue::Queue;
use vsock_core::testing::guest_pkt;
// Shared with the other crates' tests (not every test binary, nor the bench, uses them all).
#[allow(unused_imports)]
pub use vsock_core::testing::{pattern, GUEST_CID};
use vsock_core::wire::{Header, Op};
use vsock_core::{
    Action, Config, ConnId, Direction, Engine, HostEvent, Instant, Io, LineRead, SocketError,
};
use vsock_device::testing::{parse_rx, Driver, Layout, Used, RX_BUF_SIZE};
use vsock_device::{DeviceError, DeviceState, HostSockets, Queues, Served, VsockDevice};

pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// Host sockets over real socket pairs, watched edge-triggered in an epoll instance: the engine
/// hears only the readiness the kernel reports, as under a runtime, so a wake-up the engine
/// fails to ask for (by giving up readiness too early) stalls the test instead of being
/// papered over.
pub struct TestHost {
    poll: mio::Poll,
    events: mio::Events,
    /// The engine's ends.
    pub socks: BTreeMap<u64, UnixStream>,
    /// The host applications' ends, by connection.
    pub apps: BTreeMap<u64, UnixStream>,
    /// Ports with a host service listening (`<uds_path>_<port>`).
    pub listening: BTreeSet<u32>,
    pub closed: Vec<ConnId>,
    pub shut: Vec<(ConnId, Direction)>,
}

impl Default for TestHost {
    fn default() -> Self {
        TestHost {
            poll: mio::Poll::new().unwrap(),
            events: mio::Events::with_capacity(256),
            socks: BTreeMap::new(),
            apps: BTreeMap::new(),
            listening: BTreeSet::new(),
            closed: Vec::new(),
            shut: Vec::new(),
        }
    }
}

impl TestHost {
    fn watch(&mut self, conn: ConnId, ours: UnixStream, app: UnixStream) {
        ours.set_nonblocking(true).unwrap();
        self.poll
            .registry()
            .register(
                &mut mio::unix::SourceFd(&ours.as_raw_fd()),
                mio::Token(conn.to_raw() as usize),
                mio::Interest::READABLE | mio::Interest::WRITABLE,
            )
            .unwrap();
        self.socks.insert(conn.to_raw(), ours);
        self.apps.insert(conn.to_raw(), app);
    }

    /// A host client connecting to the device's listener; returns its connection and app end.
    pub fn accept(&mut self, engine: &mut Engine, now: Instant) -> ConnId {
        let conn = engine.handle_accept(now).expect("table has room");
        let (ours, app) = UnixStream::pair().unwrap();
        self.watch(conn, ours, app);
        conn
    }

    pub fn app(&mut self, conn: ConnId) -> &mut UnixStream {
        self.apps
            .get_mut(&conn.to_raw())
            .expect("host application socket")
    }

    /// Reports the readiness edges the kernel has for the sockets since the last call, and
    /// nothing else, as a runtime's event translation does.
    pub fn poke(&mut self, engine: &mut Engine, now: Instant) {
        loop {
            self.poll
                .poll(&mut self.events, Some(std::time::Duration::ZERO))
                .unwrap();
            let mut n = 0;
            for event in self.events.iter() {
                n += 1;
                let conn = ConnId::from_raw(event.token().0 as u64);
                if !self.socks.contains_key(&conn.to_raw()) {
                    continue;
                }
                if event.is_error() {
                    let _ = engine.handle_host_event(now, conn, HostEvent::Error(SocketError(0)));
                    continue;
                }
                if event.is_readable() || event.is_read_closed() {
                    let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
                }
                if event.is_writable() || event.is_write_closed() {
                    let _ = engine.handle_host_event(now, conn, HostEvent::Writable);
                }
            }
            if n < self.events.capacity() {
                return;
            }
        }
    }
}

impl HostSockets for TestHost {
    fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
        self.socks.get(&conn.to_raw()).map(|s| s.as_fd())
    }

    fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action) {
        match action {
            Action::Connect {
                conn,
                port,
                socket_type,
                ..
            } => {
                if self.listening.contains(&port) {
                    let (ours, app) = match socket_type {
                        vsock_core::wire::SocketType::Stream => UnixStream::pair().unwrap(),
                        vsock_core::wire::SocketType::SeqPacket => seqpacket_pair(),
                    };
                    self.watch(conn, ours, app);
                    engine
                        .handle_host_event(now, conn, HostEvent::Connected)
                        .unwrap();
                } else {
                    engine
                        .handle_host_event(now, conn, HostEvent::ConnectFailed(SocketError(2)))
                        .unwrap();
                }
            }
            Action::ReadConnectLine { conn, max } => {
                let mut buf = vec![0u8; max];
                let r = self.socks.get_mut(&conn.to_raw()).unwrap().read(&mut buf);
                let read = match &r {
                    Ok(0) => LineRead::Eof,
                    Ok(n) => LineRead::Data(&buf[..*n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => LineRead::WouldBlock,
                    Err(e) => LineRead::Error(SocketError::from(e)),
                };
                engine.handle_connect_line(now, conn, read).unwrap();
            }
            Action::Flush { conn } => {
                let [a, b] = engine.host_bytes(conn).unwrap();
                let r = self
                    .socks
                    .get_mut(&conn.to_raw())
                    .unwrap()
                    .write_vectored(&[IoSlice::new(a), IoSlice::new(b)]);
                engine
                    .handle_host_write(now, conn, Io::from_result(&r))
                    .unwrap();
            }
            Action::Shutdown { conn, direction } => {
                let how = match direction {
                    Direction::Read => Shutdown::Read,
                    Direction::Write => Shutdown::Write,
                };
                let _ = self.socks[&conn.to_raw()].shutdown(how);
                self.shut.push((conn, direction));
            }
            Action::Interest { .. } => {}
            Action::Close { conn } => {
                if let Some(s) = self.socks.remove(&conn.to_raw()) {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut mio::unix::SourceFd(&s.as_raw_fd()));
                }
                self.closed.push(conn);
            }
        }
    }
}

/// The device, its queues, the driver and the host, on a manual clock.
pub struct Bed {
    pub device: VsockDevice,
    pub queues: [Queue; 3],
    pub driver: Driver,
    pub host: TestHost,
    pub now: Instant,
    pub served: Vec<Served>,
    /// Layout of the rx buffers `run` reposts as the device uses them.
    pub rx_layout: Option<Layout>,
}

impl Bed {
    pub fn new() -> Bed {
        Self::with_config(Config::new(GUEST_CID), true)
    }

    pub fn with_config(config: Config, event_idx: bool) -> Bed {
        Self::with_driver(config, event_idx, Driver::new())
    }

    /// A bed over a driver built by the test (another queue size, split memory).
    pub fn with_driver(config: Config, event_idx: bool, driver: Driver) -> Bed {
        let now = Instant::from_secs(1);
        let mut device = VsockDevice::new(config, now).unwrap();
        let queues = activate(&mut device, &driver, event_idx);
        Bed {
            device,
            queues,
            driver,
            host: TestHost::default(),
            now,
            served: Vec::new(),
            rx_layout: None,
        }
    }

    /// One serve call.
    pub fn serve(&mut self) -> Served {
        let served = self.try_serve().expect("serve");
        self.served.push(served);
        served
    }

    /// One serve call, its error returned.
    pub fn try_serve(&mut self) -> Result<Served, DeviceError> {
        let [rx, tx, event] = &mut self.queues;
        self.device.serve(
            self.now,
            &self.driver.mem,
            Queues { rx, tx, event },
            &mut self.host,
        )
    }

    /// The device's queues, for save and friends.
    pub fn queues(&mut self) -> Queues<'_> {
        let [rx, tx, event] = &mut self.queues;
        Queues { rx, tx, event }
    }

    /// `device.save()` over the bed's queues.
    pub fn save(&mut self) -> DeviceState {
        let [rx, tx, event] = &mut self.queues;
        self.device.save(&Queues { rx, tx, event })
    }

    /// `device.restore()`, the bed taking the restored queues.
    pub fn restore(&mut self, state: &DeviceState) {
        self.queues = self.device.restore(self.now, state).expect("restore");
    }

    /// After a device reset: the driver starts over on fresh rings in fresh memory and
    /// activates the device again.
    pub fn reactivate(&mut self, event_idx: bool) {
        self.driver = Driver::new();
        self.queues = activate(&mut self.device, &self.driver, event_idx);
        self.served.clear();
        if let Some(layout) = self.rx_layout.take() {
            self.post_rx(8, &layout);
        }
    }

    /// Opens a guest connection from guest port `gp` to host port `port` (a host service is
    /// made to listen there); returns the connection, whose application end is
    /// `host.app(conn)`. Every other packet the guest got meanwhile is returned too.
    pub fn connect(&mut self, gp: u32, port: u32) -> (ConnId, Vec<(Header, Vec<u8>)>) {
        self.host.listening.insert(port);
        let before: BTreeSet<u64> = self.host.apps.keys().copied().collect();
        self.send(pkt(Op::Request, gp, port, 0, 0, 0), &[], &Layout::Single);
        let got = self.run();
        let (h, _) = got
            .iter()
            .find(|(h, _)| h.dst_port.get() == gp && h.src_port.get() == port)
            .unwrap_or_else(|| panic!("no answer to the REQUEST from {gp}: {got:?}"));
        assert_eq!(op_of(h), Op::Response, "answer to the REQUEST from {gp}");
        let raw = *self
            .host
            .apps
            .keys()
            .find(|k| !before.contains(k))
            .expect("a new host socket");
        (ConnId::from_raw(raw), got)
    }

    /// Serves until quiet, poking every socket in between; returns the rx packets the guest
    /// got, in order.
    pub fn run(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            self.host.poke(self.device.engine_mut(), self.now);
            let served = self.serve();
            let used = self.driver.take_used(0);
            let tx_used = self.driver.take_used(1);
            let quiet = used.is_empty() && tx_used.is_empty() && !served.more;
            for u in &used {
                if u.len > 0 {
                    got.push(parse_rx(u));
                }
                if let Some(layout) = self.rx_layout.clone() {
                    self.driver
                        .post_rx(RX_BUF_SIZE as usize, &layout)
                        .expect("rx queue room");
                }
            }
            if quiet {
                return got;
            }
        }
        panic!("device never went quiet");
    }

    /// Keeps `n` rx buffers of Linux's size posted in `layout`.
    pub fn post_rx(&mut self, n: usize, layout: &Layout) {
        self.rx_layout = Some(layout.clone());
        for _ in 0..n {
            self.driver
                .post_rx(RX_BUF_SIZE as usize, layout)
                .expect("rx queue room");
        }
    }

    pub fn send(&mut self, header: Header, payload: &[u8], layout: &Layout) {
        self.driver
            .send(&header, payload, layout)
            .expect("tx queue room");
    }

    pub fn used_rx(&mut self) -> Vec<Used> {
        self.driver.take_used(0)
    }
}

/// Negotiates every offered feature (less EVENT_IDX unless `event_idx`) and activates `device`
/// on `driver`'s rings.
pub fn activate(device: &mut VsockDevice, driver: &Driver, event_idx: bool) -> [Queue; 3] {
    let mut features = device.features();
    if !event_idx {
        features &= !(1 << 29);
    }
    device.ack_features(features).unwrap();
    let mut queues = driver.device_queues(false);
    {
        let [rx, tx, event] = &mut queues;
        device.activate(Queues { rx, tx, event });
    }
    queues
}

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

/// A guest packet.
pub fn pkt(op: Op, guest_port: u32, host_port: u32, len: u32, flags: u32, fwd_cnt: u32) -> Header {
    guest_pkt(
        op,
        guest_port,
        host_port,
        len,
        flags,
        GUEST_BUF_ALLOC,
        fwd_cnt,
    )
}

pub fn op_of(h: &Header) -> Op {
    Op::from_u16(h.op.get()).expect("known op")
}

/// What the host application can read now, and whether it then saw end of file (or a reset).
pub fn app_read(app: &mut UnixStream) -> (Vec<u8>, bool) {
    app.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let eof = loop {
        match app.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("app read: {e}"),
        }
    };
    app.set_nonblocking(false).unwrap();
    (out, eof)
}

/// Shrinks the engine's end of a connection's socket so a guest burst overflows it.
pub fn small_send_buffer(bed: &Bed, conn: ConnId) {
    use std::os::fd::AsRawFd;
    let fd = bed.host.socks[&conn.to_raw()].as_raw_fd();
    let size: libc::c_int = 4096;
    // SAFETY: `fd` is an open socket owned by the test host for the duration of the call, and
    // the option value points at a live c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt(SO_SNDBUF)");
}

/// Reads whatever the host application can get without blocking.
pub fn app_read_all(app: &mut UnixStream) -> Vec<u8> {
    app.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match app.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("app read: {e}"),
        }
    }
    app.set_nonblocking(false).unwrap();
    out
}

/// A connected pair of Unix seqpacket sockets, each with room for a message of 300 000 bytes.
pub fn seqpacket_pair() -> (UnixStream, UnixStream) {
    use socket2::{Domain, Socket, Type};
    let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    for s in [&a, &b] {
        s.set_send_buffer_size(150_016).unwrap();
    }
    (UnixStream::from(a), UnixStream::from(b))
}
