//! Part 1: the engine alone, in memory. One established connection (or none, for set-up),
//! driven the way the device drives it, with every socket taking or giving all it is
//! offered; time per packet (median over repetitions) and instructions per packet (callgrind:
//! a run with a fixed number of packets minus a run with none, both after the same set-up and
//! warm-up, divided by the packets).

use std::hint::black_box;
use std::process::Command;
use std::time::Instant as Clock;

use vsock_core::testing::{guest_pkt, GUEST_CID};
use vsock_core::wire::{Op, HEADER_LEN, SHUTDOWN_BOTH};
use vsock_core::{Action, Config, ConnId, Engine, HostEvent, Instant, Io, LineRead, RxGrant, Tx};

use crate::{median, progress, Opts, Placement, Report};

/// Linux's receive buffer, which the guest advertises.
const GUEST_BUF: u32 = 256 * 1024;
/// Linux's largest packet.
const MAX_PKT: u32 = 64 * 1024;
/// The port the guest connects to (and, for host connections, listens on).
const PORT: u32 = 1234;
/// Packets each case runs before it is measured, in both callgrind runs alike.
const WARM: u64 = 2000;

/// One measured operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// A guest tx packet of this payload (`handle_tx`, the socket takes it all).
    Tx(u32),
    /// A 64 KiB guest tx packet with `credit_update_threshold` at 128 KiB rather than the
    /// default 64 KiB: one CREDIT_UPDATE per two packets rather than one per packet (the
    /// engine also sends one whenever the guest's view of the free space falls below the
    /// threshold, so a higher one gives no fewer). A diagnostic: what the update costs
    /// [`Case::Tx`].
    TxSparseUpdates,
    /// A packet to the guest into a buffer of this payload room (`poll_rx`, the socket gives
    /// all it is asked for).
    Rx(u32),
    /// The guest's CREDIT_REQUEST and our CREDIT_UPDATE.
    Credit,
    /// A guest connection opened and closed: REQUEST, the socket connects, RESPONSE; SHUTDOWN
    /// both ways, the socket shut and closed, RST.
    GuestConnect,
    /// A host client: accepted, its `CONNECT` line, REQUEST, the guest's RESPONSE, the `OK`
    /// line written; the guest's RST, the socket closed.
    HostConnect,
}

impl Case {
    /// Every case, in report order.
    pub const ALL: [Case; 8] = [
        Case::Tx(4096),
        Case::Tx(MAX_PKT),
        Case::TxSparseUpdates,
        Case::Rx(4096 - HEADER_LEN as u32),
        Case::Rx(MAX_PKT),
        Case::Credit,
        Case::GuestConnect,
        Case::HostConnect,
    ];

    /// Its name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Case::Tx(4096) => "tx4k",
            Case::Tx(_) => "tx64k",
            Case::TxSparseUpdates => "tx64k_update_per_128k",
            Case::Rx(MAX_PKT) => "rx64k",
            Case::Rx(_) => "rx4k",
            Case::Credit => "credit",
            Case::GuestConnect => "guest_connect",
            Case::HostConnect => "host_connect",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Case> {
        Case::ALL.into_iter().find(|c| c.name() == s)
    }

    fn what(self) -> &'static str {
        match self {
            Case::Tx(_) => "guest->host packet",
            Case::TxSparseUpdates => "guest->host packet, one CREDIT_UPDATE per 128 KiB",
            Case::Rx(_) => "host->guest packet",
            Case::Credit => "CREDIT_REQUEST + CREDIT_UPDATE",
            Case::GuestConnect | Case::HostConnect => "connection opened and closed",
        }
    }

    /// Packets per timed run.
    fn iterations(self, quick: bool) -> u64 {
        let n = match self {
            Case::GuestConnect | Case::HostConnect => 20_000,
            _ => 200_000,
        };
        if quick {
            n / 4
        } else {
            n
        }
    }
}

/// The engine and what the benchmark's guest and sockets know.
struct Bench {
    engine: Engine,
    now: Instant,
    conn: Option<ConnId>,
    guest_port: u32,
    next_port: u32,
    /// Bytes the guest received, and the count it last told the engine it consumed.
    rx_cnt: u32,
    fwd_told: u32,
    payload: Vec<u8>,
}

impl Bench {
    fn new(case: Case) -> Bench {
        let mut config = Config::new(GUEST_CID);
        if case == Case::TxSparseUpdates {
            config.credit_update_threshold = 2 * MAX_PKT;
        }
        let mut b = Bench {
            engine: Engine::new(config, Instant::ZERO).expect("default config"),
            now: Instant::ZERO,
            conn: None,
            guest_port: 0,
            next_port: 1024,
            rx_cnt: 0,
            fwd_told: 0,
            payload: vec![0x5a; MAX_PKT as usize],
        };
        if matches!(
            case,
            Case::Tx(_) | Case::TxSparseUpdates | Case::Rx(_) | Case::Credit
        ) {
            b.guest_connect();
            if let Case::Rx(_) = case {
                let conn = b.conn.expect("connected");
                b.engine
                    .handle_host_event(b.now, conn, HostEvent::Readable)
                    .expect("live connection");
            }
        }
        b
    }

    fn tick(&mut self) {
        self.now = Instant::from_nanos(self.now.as_nanos() + 1000);
    }

    /// Carries out every action and sends every packet the engine has, as a device whose
    /// sockets connect at once and take everything.
    fn settle(&mut self) {
        loop {
            let mut busy = false;
            while let Some(action) = self.engine.poll_action() {
                busy = true;
                match action {
                    Action::Connect { conn, .. } => {
                        self.conn = Some(conn);
                        self.engine
                            .handle_host_event(self.now, conn, HostEvent::Connected)
                            .expect("live connection");
                    }
                    Action::ReadConnectLine { conn, .. } => {
                        let line = format!("CONNECT {PORT}\n");
                        self.engine
                            .handle_connect_line(self.now, conn, LineRead::Data(line.as_bytes()))
                            .expect("live connection");
                    }
                    Action::Flush { conn } => {
                        let [a, b] = self.engine.host_bytes(conn).expect("live connection");
                        let n = a.len() + b.len();
                        self.engine
                            .handle_host_write(self.now, conn, Io::Done(n))
                            .expect("live connection");
                    }
                    Action::Shutdown { .. } | Action::Interest { .. } | Action::Close { .. } => {}
                }
            }
            while self.engine.has_pending_rx() {
                match self.engine.poll_rx(self.now, 4096 - HEADER_LEN) {
                    Some(RxGrant::Packet(p)) => {
                        black_box(p.send());
                        busy = true;
                    }
                    Some(RxGrant::Probe(p)) => panic!("stream connections only: {p:?}"),
                    Some(RxGrant::Message(m)) => panic!("stream connections only: {m:?}"),
                    Some(RxGrant::Read(r)) => {
                        let _ = r.complete(Io::WouldBlock, &mut &[][..]);
                    }
                    None => break,
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn guest(&mut self, op: Op, len: u32, flags: u32) -> vsock_core::wire::Header {
        guest_pkt(
            op,
            self.guest_port,
            PORT,
            len,
            flags,
            GUEST_BUF,
            self.rx_cnt,
        )
    }

    fn guest_connect(&mut self) {
        self.guest_port = self.next_port;
        self.next_port = if self.next_port == u32::MAX - 1 {
            1024
        } else {
            self.next_port + 1
        };
        let h = self.guest(Op::Request, 0, 0);
        let _ = self.engine.handle_tx(self.now, &h);
        self.settle();
    }

    /// Runs one packet (or connection) of `case`.
    fn step(&mut self, case: Case) {
        self.tick();
        match case {
            Case::Tx(_) | Case::TxSparseUpdates => {
                let len = match case {
                    Case::Tx(len) => len,
                    _ => MAX_PKT,
                };
                let h = self.guest(Op::Rw, len, 0);
                match self.engine.handle_tx(self.now, &h) {
                    Tx::Data(d) => {
                        let n = d.len();
                        d.complete(Io::Done(n), &mut &self.payload[..n])
                            .expect("within the packet");
                    }
                    Tx::Done => panic!("data packet refused"),
                }
                if self.engine.has_pending_output() {
                    self.settle();
                }
            }
            Case::Rx(room) => {
                let conn = self.conn.expect("connected");
                match self.engine.poll_rx(self.now, room as usize) {
                    Some(RxGrant::Probe(p)) => panic!("stream connections only: {p:?}"),
                    Some(RxGrant::Message(m)) => panic!("stream connections only: {m:?}"),
                    Some(RxGrant::Read(r)) => {
                        assert_eq!(r.conn(), conn);
                        let n = r.max();
                        let h = r
                            .complete(Io::Done(n), &mut &self.payload[..n])
                            .expect("within the grant")
                            .expect("a packet");
                        self.rx_cnt = self.rx_cnt.wrapping_add(h.len.get());
                    }
                    Some(RxGrant::Packet(p)) => {
                        black_box(p.send());
                    }
                    None => panic!("no rx grant: out of credit?"),
                }
                // Linux's guest: a CREDIT_UPDATE once our view of its free space falls below
                // a packet.
                if GUEST_BUF - self.rx_cnt.wrapping_sub(self.fwd_told) < MAX_PKT {
                    self.fwd_told = self.rx_cnt;
                    let h = self.guest(Op::CreditUpdate, 0, 0);
                    let _ = self.engine.handle_tx(self.now, &h);
                }
            }
            Case::Credit => {
                let h = self.guest(Op::CreditRequest, 0, 0);
                let _ = self.engine.handle_tx(self.now, &h);
                match self.engine.poll_rx(self.now, 4096 - HEADER_LEN) {
                    Some(RxGrant::Packet(p)) => {
                        assert_eq!(p.header().op.get(), Op::CreditUpdate.to_u16());
                        black_box(p.send());
                    }
                    _ => panic!("no CREDIT_UPDATE"),
                }
            }
            Case::GuestConnect => {
                self.guest_connect();
                let h = self.guest(Op::Shutdown, 0, SHUTDOWN_BOTH);
                let _ = self.engine.handle_tx(self.now, &h);
                self.settle();
            }
            Case::HostConnect => {
                let conn = self.engine.handle_accept(self.now).expect("room");
                self.engine
                    .handle_host_event(self.now, conn, HostEvent::Readable)
                    .expect("live connection");
                self.settle();
                let (_, host_port) = self.engine.conn_ports(conn).expect("REQUEST sent");
                let r = guest_pkt(Op::Response, PORT, host_port, 0, 0, GUEST_BUF, 0);
                let _ = self.engine.handle_tx(self.now, &r);
                self.settle();
                let r = guest_pkt(Op::Rst, PORT, host_port, 0, 0, GUEST_BUF, 0);
                let _ = self.engine.handle_tx(self.now, &r);
                self.settle();
            }
        }
    }

    fn check(&self, case: Case) {
        let s = self.engine.stats();
        assert_eq!(
            (s.credit_violation, s.payload_faults, s.stale_events),
            (0, 0, 0),
            "{}: {s:?}",
            case.name()
        );
        match case {
            Case::GuestConnect | Case::HostConnect => {
                assert_eq!(self.engine.connections(), 0, "{}: all closed", case.name())
            }
            _ => assert_eq!(s.rst_sent, 0, "{}: {s:?}", case.name()),
        }
    }
}

/// Runs `case` `n` times after its set-up and warm-up, untimed: what callgrind counts.
pub fn count_only(case: Case, n: u64) {
    let mut b = Bench::new(case);
    for _ in 0..WARM + n {
        b.step(case);
    }
    b.check(case);
}

/// Nanoseconds per packet, one timed run.
fn timed(case: Case, n: u64) -> f64 {
    let mut b = Bench::new(case);
    for _ in 0..WARM {
        b.step(case);
    }
    let start = Clock::now();
    for _ in 0..n {
        b.step(case);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    b.check(case);
    ns
}

/// Instructions per packet under callgrind, or why not.
fn instructions(case: Case, n: u64) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let run = |n: u64| -> Result<u64, String> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["engine-count", case.name(), &n.to_string()])
            .output()
            .map_err(|e| format!("valgrind: {e}"))?;
        if !out.status.success() {
            return Err(format!("valgrind exited {}", out.status));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        err.lines()
            .find_map(|l| l.split("Collected :").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| "no 'Collected' line from callgrind".to_string())
    };
    let full = run(n)?;
    let setup = run(0)?;
    Ok(full.saturating_sub(setup) as f64 / n as f64)
}

/// Part 1.
pub fn run(opts: &Opts) {
    let report = Report::new("engine");
    Placement::place_measured(0);
    let mut tx64k = f64::NAN;
    let mut rx4k = f64::NAN;
    for case in Case::ALL {
        let n = case.iterations(opts.quick);
        let runs: Vec<f64> = (0..opts.reps).map(|_| timed(case, n)).collect();
        let ns = median(&runs);
        progress(&format!("engine {}: {ns:.0} ns ({runs:.0?})", case.name()));
        let ir_n = (n / 10).max(1000);
        let ir = match instructions(case, ir_n) {
            Ok(ir) => ir,
            Err(e) => {
                progress(&format!(
                    "engine {}: no instruction count: {e}",
                    case.name()
                ));
                f64::NAN
            }
        };
        let name = case.name();
        let what = case.what();
        report.row(
            &format!("{name}_ns"),
            ns,
            "ns",
            &format!("per {what}; median of {}", opts.reps),
        );
        report.row(
            &format!("{name}_instructions"),
            ir,
            "instr",
            &format!("per {what}; callgrind, {ir_n} minus 0 after set-up"),
        );
        match case {
            Case::Tx(MAX_PKT) => tx64k = ns,
            Case::Rx(room) if room != MAX_PKT => rx4k = ns,
            _ => {}
        }
    }
    report.target("engine_tx64k_ns", tx64k, "64 KiB guest->host packet");
    report.target(
        "engine_rx4k_ns",
        rx4k,
        "host->guest packet into a 4 KiB buffer",
    );
}
