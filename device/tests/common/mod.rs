//! A test bed: the device over real split virtqueues in guest memory, and host sockets that are
//! real Unix stream socket pairs (the engine's end non-blocking, the host application's end
//! held by the test).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use virtio_queue::Queue;
use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID};
use vsock_core::{
    Action, Config, ConnId, Direction, Engine, HostEvent, Instant, Io, LineRead, SocketError,
};
use vsock_device::testing::{parse_rx, Driver, Layout, Used, RX_BUF_SIZE};
use vsock_device::{HostSockets, Queues, Served, VsockDevice};

pub const GUEST_CID: u64 = 3;
pub const GUEST_BUF_ALLOC: u32 = 256 * 1024;

/// Host sockets over real socket pairs.
#[derive(Default)]
pub struct TestHost {
    /// The engine's ends.
    pub socks: BTreeMap<u64, UnixStream>,
    /// The host applications' ends, by connection.
    pub apps: BTreeMap<u64, UnixStream>,
    /// Ports with a host service listening (`<uds_path>_<port>`).
    pub listening: BTreeSet<u32>,
    pub closed: Vec<ConnId>,
    pub shut: Vec<(ConnId, Direction)>,
}

impl TestHost {
    /// A host client connecting to the device's listener; returns its connection and app end.
    pub fn accept(&mut self, engine: &mut Engine, now: Instant) -> ConnId {
        let conn = engine.handle_accept(now).expect("table has room");
        let (ours, app) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        self.socks.insert(conn.to_raw(), ours);
        self.apps.insert(conn.to_raw(), app);
        conn
    }

    pub fn app(&mut self, conn: ConnId) -> &mut UnixStream {
        self.apps
            .get_mut(&conn.to_raw())
            .expect("host application socket")
    }

    /// Reports every socket readable and writable (spurious readiness is harmless).
    pub fn poke(&mut self, engine: &mut Engine, now: Instant) {
        for raw in self.socks.keys().copied().collect::<Vec<_>>() {
            let conn = ConnId::from_raw(raw);
            let _ = engine.handle_host_event(now, conn, HostEvent::Readable);
            let _ = engine.handle_host_event(now, conn, HostEvent::Writable);
        }
    }
}

impl HostSockets for TestHost {
    fn fd(&self, conn: ConnId) -> Option<BorrowedFd<'_>> {
        self.socks.get(&conn.to_raw()).map(|s| s.as_fd())
    }

    fn perform(&mut self, now: Instant, engine: &mut Engine, action: Action) {
        match action {
            Action::Connect { conn, port } => {
                if self.listening.contains(&port) {
                    let (ours, app) = UnixStream::pair().unwrap();
                    ours.set_nonblocking(true).unwrap();
                    self.socks.insert(conn.to_raw(), ours);
                    self.apps.insert(conn.to_raw(), app);
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
                self.socks.remove(&conn.to_raw());
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
        let now = Instant::from_secs(1);
        let mut device = VsockDevice::new(config, now).unwrap();
        let mut features = device.features();
        if !event_idx {
            features &= !(1 << 29);
        }
        device.ack_features(features).unwrap();
        let driver = Driver::new();
        let mut queues = driver.device_queues(false);
        {
            let [rx, tx, event] = &mut queues;
            device.activate(Queues { rx, tx, event });
        }
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
        let [rx, tx, event] = &mut self.queues;
        let served = self
            .device
            .serve(
                self.now,
                &self.driver.mem,
                Queues { rx, tx, event },
                &mut self.host,
            )
            .expect("serve");
        self.served.push(served);
        served
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

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

/// A guest packet.
pub fn pkt(op: Op, guest_port: u32, host_port: u32, len: u32, flags: u32, fwd_cnt: u32) -> Header {
    Packet {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len,
        socket_type: SocketType::Stream,
        op,
        flags,
        buf_alloc: GUEST_BUF_ALLOC,
        fwd_cnt,
    }
    .to_header()
}

pub fn op_of(h: &Header) -> Op {
    Op::from_u16(h.op.get()).expect("known op")
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

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(seed.wrapping_mul(7919))
                % 251) as u8
        })
        .collect()
}
