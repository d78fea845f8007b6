//! The `engine` target: arbitrary sequences of every engine input, with a model of both ends
//! that checks the bytes each way.
//!
//! The fuzzer plays the guest (packets with any header fields, biased towards valid CIDs,
//! ports and operations so that connections get established), the host (accepts, `CONNECT`
//! bytes, socket events, write and read results with any counts) and the clock (forward
//! jumps, steps back). The harness drains the engine's outputs after every input, as the run
//! loop in `vsock-core`'s documentation does, and checks:
//!
//! - every drain of `poll_action` and `poll_rx` ends within a bound (no livelock);
//! - the table and buffer memory stay within what the [`Config`] allows;
//! - after `handle_timeout(now)`, `poll_timeout()` is `None` or later than `now`;
//! - per connection, the bytes the host socket received are an in-order prefix of the `OK`
//!   line (host-initiated connections) followed by every byte the engine accepted from the
//!   guest, and the data the guest received is an in-order prefix of the bytes the host side
//!   sent (what followed the `CONNECT` line, then what the engine read);
//! - at the end, after driving every connection to quiescence with a cooperative guest and
//!   host, each side got every byte or saw the connection reset (an RST to the guest, a
//!   `Close` for the host);
//! - seqpacket connections (once the fuzzer negotiates them): every write to the host socket
//!   ends at a message boundary the guest marked, or the connection is reset; every message
//!   to the guest is a run of RW packets with `EOM` on the last only; a message the guest
//!   left unfinished is never written, and dropped at its shutdown.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use vsock_core::wire::{
    Header, OkLine, Op, Packet, SocketType, CONNECT_LINE_MAX, HOST_CID, SEQ_EOM,
};
use vsock_core::{
    Action, Config, ConnError, ConnId, ConnState, Direction, Engine, HostEvent, Instant, Io,
    LineRead, Probe, RxGrant, SocketError, SocketTypes, Tx,
};

/// The guest's CID in every run.
pub const GUEST_CID: u64 = 3;

/// A whole run: a configuration, the steps, and whether a trace is recorded.
#[derive(Arbitrary, Debug)]
pub struct Input {
    config: ConfigChoice,
    record: Record,
    steps: Vec<Step>,
}

/// Whether the run is recorded (a `TraceWriter` attached before the given step, or never).
/// A recorded run is replayed at the end, and the replay must reproduce it exactly.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Record {
    No,
    No2,
    FromStart,
    Before(u8),
}

/// A trace in memory, shared with the recorder the engine owns.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A small configuration, so that limits and timeouts are reached.
#[derive(Arbitrary, Debug)]
struct ConfigChoice {
    buffer: u8,
    payload: u8,
    conns: u8,
    pending: u8,
    timeouts: u8,
    threshold: u8,
    resets: u8,
    pooled: u8,
}

impl ConfigChoice {
    fn config(&self) -> Config {
        let mut c = Config::new(GUEST_CID);
        c.buffer_size = [16, 64, 256, 4096][self.buffer as usize % 4];
        c.max_packet_payload = [1, 8, 100, 4096][self.payload as usize % 4];
        c.max_connections = 1 + self.conns as usize % 4;
        c.max_pending_host_clients = 1 + self.pending as usize % 2;
        let ms = |x: u8| Duration::from_millis(1 + u64::from(x % 8) * 7);
        c.connect_line_timeout = ms(self.timeouts);
        c.connect_timeout = ms(self.timeouts >> 3);
        c.close_timeout = ms(self.timeouts >> 5);
        c.credit_update_threshold = 1 + u32::from(self.threshold) % c.buffer_size;
        c.max_pending_resets = [0, 1, 4][self.resets as usize % 3];
        c.pooled_buffers = self.pooled as usize % 3;
        c
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    Guest(GuestPacket),
    Guest2(GuestPacket),
    Guest3(GuestPacket),
    Accept,
    /// A client of the seqpacket listener.
    AcceptSeqpacket,
    /// The driver negotiates socket types (bit 0 stream, bit 1 seqpacket).
    SocketTypes(u8),
    Line {
        conn: u8,
        read: LineChoice,
    },
    Host {
        conn: u8,
        event: HostChoice,
    },
    Write {
        conn: u8,
        result: WriteChoice,
    },
    Rx {
        room: RoomChoice,
        choices: Vec<RxChoice>,
    },
    Rx2 {
        room: RoomChoice,
        choices: Vec<RxChoice>,
    },
    Clock(ClockChoice),
    Timeout,
    ResetConnection(u8),
    AbortAll,
    Reset,
    Stop,
}

#[derive(Arbitrary, Debug)]
struct GuestPacket {
    src: Cid,
    dst: Cid,
    addr: Addr,
    ty: Ty,
    op: OpChoice,
    flags: Flags,
    buf_alloc: Credit,
    fwd_cnt: Fwd,
    payload: Payload,
    write: TxChoice,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Cid {
    Ok,
    Ok2,
    Ok3,
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// The ports of a connection the harness knows (by index).
    Conn(u8),
    Conn2(u8),
    /// A few guest ports and a few host ports.
    Small {
        guest: u8,
        host: u8,
    },
    Raw {
        guest: u32,
        host: u32,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ty {
    Stream,
    Stream2,
    Stream3,
    SeqPacket,
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum OpChoice {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    Rw2,
    Rw3,
    CreditUpdate,
    CreditRequest,
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Flags {
    None,
    Rcv,
    Send,
    Both,
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Credit {
    Big,
    Small(u16),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Fwd {
    /// What the guest really received on the connection.
    Honest,
    Honest2,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Payload {
    /// A payload of this many bytes, in a pattern that shows reordering.
    Sized(u16),
    Bytes(Vec<u8>),
    /// A header whose `len` is not the length of the bytes the guest has.
    Mismatch {
        len: u32,
        have: u16,
    },
}

/// What the host socket does with a direct write of a tx payload.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum TxChoice {
    All,
    All2,
    Part(u16),
    WouldBlock,
    Error,
    /// More bytes than offered.
    Over(u16),
    /// The caller drops the payload without completing it.
    Drop,
}

#[derive(Arbitrary, Debug)]
enum LineChoice {
    Good {
        port: Port,
        extra: Vec<u8>,
        piece: u8,
    },
    Raw(Vec<u8>),
    Eof,
    WouldBlock,
    Error,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    Small(u8),
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum HostChoice {
    Connected,
    ConnectFailed,
    Readable,
    Writable,
    Error,
    HangUp,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum WriteChoice {
    All,
    Part(u16),
    Zero,
    WouldBlock,
    Error,
    Over(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum RoomChoice {
    Small(u8),
    Mid(u16),
    Big,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum RxChoice {
    /// Send a packet; read everything offered.
    Take,
    /// Read this many bytes (any count).
    Read(u16),
    WouldBlock,
    Eof,
    Error,
    /// Drop the grant (the guest's buffer goes back unused) and stop draining.
    Drop,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ClockChoice {
    Micros(u16),
    Millis(u8),
    Back(u16),
    Jump(u64),
}

/// What the harness knows of one connection (one `ConnId`).
#[derive(Debug)]
struct Rec {
    id: ConnId,
    origin_host: bool,
    /// `(guest_port, host_port)`, once known.
    ports: Option<(u32, u32)>,
    /// `Action::Close` was issued: the handle is dead.
    closed: bool,
    connect_pending: bool,
    /// An `Action::ReadConnectLine` is unanswered.
    line_read_pending: bool,
    /// The harness reported the socket failed: from then on its reads find end of file.
    host_failed: bool,
    /// Bytes the `CONNECT` line parser accepted.
    line_fed: Vec<u8>,
    /// Guest bytes the engine accepted (tx payloads completed).
    accepted: Vec<u8>,
    /// Bytes the host socket took.
    host_rx: Vec<u8>,
    /// The bytes of the outstanding `Action::Flush`.
    flush: Option<Vec<u8>>,
    shut_wr: bool,
    /// Bytes the host side sent towards the guest.
    h2g: Vec<u8>,
    /// Payload the guest received.
    guest_rx: Vec<u8>,
    /// The guest received an RST.
    guest_rst: bool,
    /// The guest sent an RST or a SHUTDOWN with RCV: it wants no more data.
    guest_gave_up: bool,
    /// The guest saw the connection established.
    guest_established: bool,
    /// The guest received a REQUEST and has not answered it.
    request_seen: bool,
    /// The guest received SHUTDOWN SEND.
    guest_eof: bool,
    /// Forgotten without an RST by design (device reset or stop, or its RST expired).
    waived: bool,
    /// A seqpacket connection.
    seqpacket: bool,
    /// Seqpacket: where in `accepted` the guest's messages end.
    ends: Vec<usize>,
    /// Seqpacket: bytes of the guest's unfinished message, at the end of `accepted`.
    open: usize,
}

impl Rec {
    fn new(id: ConnId, origin_host: bool) -> Rec {
        Rec {
            id,
            origin_host,
            ports: None,
            closed: false,
            connect_pending: false,
            line_read_pending: false,
            host_failed: false,
            line_fed: Vec::new(),
            accepted: Vec::new(),
            host_rx: Vec::new(),
            flush: None,
            shut_wr: false,
            h2g: Vec::new(),
            guest_rx: Vec::new(),
            guest_rst: false,
            guest_gave_up: false,
            guest_established: false,
            request_seen: false,
            guest_eof: false,
            waived: false,
            seqpacket: false,
            ends: Vec::new(),
            open: 0,
        }
    }

    /// The length of the `OK` line the host socket gets first.
    fn ok_len(&self) -> usize {
        match (self.origin_host, self.ports) {
            (true, Some((_, host_port))) => OkLine::new(host_port).as_bytes().len(),
            _ => 0,
        }
    }

    /// Seqpacket: whether the host socket's bytes so far end at a message boundary (or inside
    /// the `OK` line's own message, or right after it).
    fn host_at_boundary(&self) -> bool {
        let ok = self.ok_len();
        let n = self.host_rx.len();
        n <= ok || self.ends.contains(&(n - ok))
    }

    /// Everything the host socket should receive, in order.
    fn expected_host(&self) -> Vec<u8> {
        let mut v = Vec::new();
        if self.origin_host {
            if let Some((_, host_port)) = self.ports {
                v.extend_from_slice(OkLine::new(host_port).as_bytes());
            }
        }
        v.extend_from_slice(&self.accepted);
        v
    }

    /// What the host socket must have got once everything is flushed: an unfinished
    /// seqpacket message is never written.
    fn expected_host_complete(&self) -> Vec<u8> {
        let mut v = self.expected_host();
        v.truncate(v.len() - self.open);
        v
    }

    fn check_host_prefix(&self) {
        let expected = self.expected_host();
        assert!(
            expected.starts_with(&self.host_rx),
            "conn {}: the host socket got bytes out of order or never accepted\n got {:?}\nwant a prefix of {:?}",
            self.id,
            self.host_rx,
            expected
        );
    }

    fn check_guest_prefix(&self) {
        assert!(
            self.h2g.starts_with(&self.guest_rx),
            "conn {}: the guest got bytes out of order or never sent\n got {:?}\nwant a prefix of {:?}",
            self.id,
            self.guest_rx,
            self.h2g
        );
    }
}

/// The harness: the engine, the clock, the model.
struct Harness {
    engine: Engine,
    config: Config,
    now: Instant,
    recs: Vec<Rec>,
    /// Payload pattern counter.
    seq: u32,
}

/// The raw socket type of a connection's packets.
fn rec_type(rec: &Rec) -> u16 {
    if rec.seqpacket {
        SocketType::SeqPacket.to_u16()
    } else {
        SocketType::Stream.to_u16()
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u32 * 7) % 251) as u8)
        .collect()
}

fn concat(slices: [&[u8]; 2]) -> Vec<u8> {
    let mut v = slices[0].to_vec();
    v.extend_from_slice(slices[1]);
    v
}

impl Harness {
    fn action_bound(&self) -> usize {
        8 * (self.config.max_connections + 1)
    }

    fn rx_bound(&self) -> usize {
        self.config.max_connections * (16 + CONNECT_LINE_MAX) + self.config.max_pending_resets + 16
    }

    fn rec_index(&self, id: ConnId) -> Option<usize> {
        self.recs.iter().rposition(|r| r.id == id)
    }

    /// The newest record with these `(guest_port, host_port)` and this raw socket type.
    fn rec_by_key(&self, ports: (u32, u32), ty: u16) -> Option<usize> {
        self.recs
            .iter()
            .rposition(|r| r.ports == Some(ports) && rec_type(r) == ty)
    }

    fn pick(&self, sel: u8) -> Option<usize> {
        (!self.recs.is_empty()).then(|| sel as usize % self.recs.len())
    }

    fn check_limits(&self) {
        let e = &self.engine;
        assert!(
            e.connections() <= self.config.max_connections,
            "{} connections, at most {}",
            e.connections(),
            self.config.max_connections
        );
        let keep = self.config.pooled_buffers.min(self.config.max_connections);
        // Two buffers per connection at most: the one for the socket, and a seqpacket stage.
        let bound = (2 * e.connections() + keep) * self.config.buffer_size as usize;
        assert!(
            e.buffer_memory() <= bound,
            "buffer memory {} beyond {bound}",
            e.buffer_memory()
        );
    }

    /// Drains `poll_action`, carrying out what each action means for the model.
    fn drain_actions(&mut self) -> usize {
        let bound = self.action_bound();
        let mut n = 0;
        while let Some(action) = self.engine.poll_action() {
            n += 1;
            assert!(
                n <= bound,
                "poll_action gave more than {bound} actions in a row"
            );
            self.on_action(action);
        }
        n
    }

    fn on_action(&mut self, action: Action) {
        let id = action.conn();
        if let Action::Connect { conn, cid, .. } = action {
            if cid != HOST_CID {
                // A connect to another VM: this harness serves a VM without siblings, which
                // refuses it at once (the guest gets an RST from that CID).
                assert_ne!(cid, GUEST_CID, "a connect to the guest itself");
                assert!(self.rec_index(conn).is_none(), "Connect for a known handle");
                // Known by its handle only (its ports are another CID's), for the Close that
                // follows.
                self.recs.push(Rec::new(conn, false));
                let r = self.engine.handle_host_event(
                    self.now,
                    conn,
                    HostEvent::ConnectFailed(SocketError(113)),
                );
                assert_eq!(r, Ok(()), "a sibling connect refused");
                return;
            }
        }
        if let Action::Connect {
            conn,
            port,
            socket_type,
            ..
        } = action
        {
            assert!(self.rec_index(conn).is_none(), "Connect for a known handle");
            assert_eq!(self.engine.conn_socket_type(conn), Some(socket_type));
            let ports = self
                .engine
                .conn_ports(conn)
                .expect("a connecting connection");
            assert_eq!(ports.1, port, "Connect to another port than the guest's");
            let mut rec = Rec::new(conn, false);
            rec.ports = Some(ports);
            rec.connect_pending = true;
            rec.seqpacket = socket_type == SocketType::SeqPacket;
            self.recs.push(rec);
            return;
        }
        let i = self
            .rec_index(id)
            .unwrap_or_else(|| panic!("{action:?} for a handle never seen"));
        assert!(!self.recs[i].closed, "{action:?} after its Close");
        match action {
            Action::Connect { .. } => unreachable!(),
            Action::ReadConnectLine { max, .. } => {
                let rec = &self.recs[i];
                assert!(rec.origin_host, "line read for a guest connection");
                assert!(max > 0 && max <= CONNECT_LINE_MAX - rec.line_fed.len());
                self.recs[i].line_read_pending = true;
            }
            Action::Flush { conn } => {
                let rec = &self.recs[i];
                assert!(
                    rec.flush.is_none(),
                    "a second Flush while one is outstanding"
                );
                assert!(!rec.shut_wr, "Flush after shutdown(SHUT_WR)");
                let bytes = concat(self.engine.host_bytes(conn).expect("live handle"));
                assert!(!bytes.is_empty(), "Flush with nothing to write");
                if rec.seqpacket {
                    // One message per flush: the OK line, or up to the next guest boundary.
                    let ok = rec.ok_len();
                    let at = rec.host_rx.len() + bytes.len();
                    assert!(
                        at == ok || (at > ok && rec.ends.contains(&(at - ok))),
                        "conn {}: a flush of {} bytes is not one message",
                        rec.id,
                        bytes.len()
                    );
                }
                self.recs[i].flush = Some(bytes);
            }
            Action::Shutdown { direction, .. } => {
                if direction == Direction::Write {
                    let rec = &mut self.recs[i];
                    assert!(!rec.shut_wr, "a second SHUT_WR");
                    rec.shut_wr = true;
                    assert_eq!(
                        rec.host_rx,
                        rec.expected_host(),
                        "SHUT_WR before every accepted byte was written"
                    );
                }
            }
            Action::Interest { .. } => {}
            Action::Close { .. } => {
                let rec = &mut self.recs[i];
                rec.closed = true;
                rec.flush = None;
                rec.connect_pending = false;
            }
        }
    }

    /// A packet the guest received.
    fn guest_receive(&mut self, header: &Header, payload: &[u8], from_read: Option<ConnId>) {
        assert_eq!(header.dst_cid.get(), GUEST_CID);
        if header.src_cid.get() != HOST_CID {
            // Only refusals come from other CIDs here: the RST of a sibling connect, or of a
            // packet to a CID with no connection.
            assert_eq!(header.op.get(), Op::Rst.to_u16(), "{header:?} from a sibling");
            assert_ne!(header.src_cid.get(), GUEST_CID, "an RST from the guest itself");
            assert!(from_read.is_none(), "a read grant for a sibling");
            return;
        }
        let op = header.op.get();
        let len = header.len.get() as usize;
        assert_eq!(len, payload.len(), "header len and payload differ");
        let ports = (header.dst_port.get(), header.src_port.get());
        let i = match from_read {
            Some(conn) => {
                let i = self.rec_index(conn).expect("read grant for a known handle");
                assert_eq!(self.recs[i].ports, Some(ports), "read grant ports");
                Some(i)
            }
            // A reply to a packet of another socket type is no connection of this one's.
            None => self
                .recs
                .iter()
                .rposition(|r| r.ports == Some(ports) && rec_type(r) == header.type_.get()),
        };
        let known_type = SocketType::from_u16(header.type_.get()).is_some();
        if known_type || op != Op::Rst.to_u16() {
            let p = Packet::parse(header, self.config.max_packet_payload)
                .unwrap_or_else(|e| panic!("the engine sent a bad header {header:?}: {e}"));
            if p.op != Op::Rst {
                assert_eq!(p.buf_alloc, self.config.buffer_size);
            }
        }
        let Some(i) = i else {
            assert_eq!(
                op,
                Op::Rst.to_u16(),
                "{header:?} for a connection the host side never saw"
            );
            return;
        };
        let rec = &mut self.recs[i];
        assert_eq!(
            header.type_.get(),
            rec_type(rec),
            "a packet of another type"
        );
        if !rec.seqpacket || op != Op::Rw.to_u16() {
            assert_eq!(header.flags.get() & !3, 0, "flags beyond the shutdown bits");
        }
        match Op::from_u16(op) {
            Some(Op::Rw) => {
                assert!(len > 0, "an empty RW");
                assert!(
                    rec.guest_established,
                    "data before the guest saw the connection"
                );
                assert!(!rec.guest_eof, "data after SHUTDOWN SEND");
                rec.guest_rx.extend_from_slice(payload);
                rec.check_guest_prefix();
            }
            Some(Op::Rst) => rec.guest_rst = true,
            Some(Op::Response) => rec.guest_established = true,
            Some(Op::Request) => {
                assert!(rec.origin_host, "REQUEST for a guest connection");
                rec.request_seen = true;
            }
            Some(Op::Shutdown) if header.flags.get() & vsock_core::wire::SHUTDOWN_SEND != 0 => {
                rec.guest_eof = true;
            }
            _ => {}
        }
    }

    /// Drains `poll_rx` into buffers of `room` bytes, answering grants with `choices` (then
    /// sending packets and answering reads with "would block").
    fn drain_rx(&mut self, room: usize, choices: &[RxChoice]) -> usize {
        let bound = self.rx_bound() + choices.len();
        let mut choices = choices.iter().copied();
        let mut polls = 0;
        let mut packets = 0;
        loop {
            polls += 1;
            assert!(
                polls <= bound,
                "poll_rx gave more than {bound} grants in a row"
            );
            let now = self.now;
            let max_payload = self.config.max_packet_payload as usize;
            let choice = choices.next();
            let Some(grant) = self.engine.poll_rx(now, room) else {
                break;
            };
            match grant {
                RxGrant::Packet(p) => {
                    if choice == Some(RxChoice::Drop) {
                        break;
                    }
                    let payload = p.payload().to_vec();
                    assert!(payload.len() <= room && payload.len() <= max_payload);
                    let header = p.send();
                    packets += 1;
                    self.guest_receive(&header, &payload, None);
                }
                RxGrant::Read(r) => {
                    let conn = r.conn();
                    let max = r.max();
                    assert!(
                        max > 0 && max <= room && max <= max_payload,
                        "read max {max}"
                    );
                    let i = self
                        .recs
                        .iter()
                        .rposition(|r| r.id == conn)
                        .expect("read grant for a known handle");
                    // Left alone, a socket that failed reads end of file; others have nothing.
                    let idle = if self.recs[i].host_failed {
                        RxChoice::Eof
                    } else {
                        RxChoice::WouldBlock
                    };
                    let io = match choice.unwrap_or(idle) {
                        RxChoice::Drop => break,
                        RxChoice::Take => Io::Done(max),
                        RxChoice::Read(n) => Io::Done(n as usize),
                        RxChoice::WouldBlock => Io::WouldBlock,
                        RxChoice::Eof => Io::Done(0),
                        RxChoice::Error => Io::Error(SocketError(104)),
                    };
                    self.seq += 1;
                    let bytes = match io {
                        Io::Done(n) if n <= max => pattern(self.seq, n),
                        _ => Vec::new(),
                    };
                    let result = r.complete(io, &mut &bytes[..]);
                    match (io, result) {
                        (Io::Done(n), r) if n > max => {
                            assert_eq!(r, Err(ConnError::Overrun), "overlong read accepted")
                        }
                        (Io::Done(0), Ok(Some(h))) => {
                            assert_eq!(h.op.get(), Op::Shutdown.to_u16(), "EOF is a SHUTDOWN");
                            packets += 1;
                            self.guest_receive(&h, &[], Some(conn));
                        }
                        (Io::Done(n), Ok(Some(h))) => {
                            assert_eq!(h.op.get(), Op::Rw.to_u16());
                            assert_eq!(h.len.get() as usize, n);
                            self.recs[i].h2g.extend_from_slice(&bytes);
                            packets += 1;
                            self.guest_receive(&h, &bytes, Some(conn));
                        }
                        (Io::WouldBlock | Io::Error(_), Ok(None)) => {}
                        // End of file on a socket that failed: the guest gets an RST instead.
                        (Io::Done(0), Ok(None)) if self.recs[i].host_failed => {}
                        (io, r) => panic!("read {io:?} completed as {r:?}"),
                    }
                }
                RxGrant::Probe(p) => {
                    let conn = p.conn();
                    let i = self
                        .recs
                        .iter()
                        .rposition(|r| r.id == conn)
                        .expect("probe for a known handle");
                    assert!(self.recs[i].seqpacket, "a probe for a stream connection");
                    let idle = if self.recs[i].host_failed {
                        RxChoice::Eof
                    } else {
                        RxChoice::WouldBlock
                    };
                    let probe = match choice.unwrap_or(idle) {
                        RxChoice::Drop => break,
                        RxChoice::Take => Probe::Size(room.max(1) * 3 / 2 + 1),
                        RxChoice::Read(0) => Probe::Empty,
                        RxChoice::Read(n) => Probe::Size(n as usize * 7),
                        RxChoice::WouldBlock => Probe::WouldBlock,
                        RxChoice::Eof => Probe::Eof,
                        RxChoice::Error => Probe::Error(SocketError(104)),
                    };
                    if let Some(h) = p.complete(probe) {
                        assert_eq!(probe, Probe::Eof, "only end of file makes a packet");
                        assert_eq!(h.op.get(), Op::Shutdown.to_u16(), "EOF is a SHUTDOWN");
                        packets += 1;
                        self.guest_receive(&h, &[], Some(conn));
                    }
                }
                RxGrant::Message(mut m) => {
                    let conn = m.conn();
                    let len = m.len();
                    let i = self
                        .recs
                        .iter()
                        .rposition(|r| r.id == conn)
                        .expect("message for a known handle");
                    assert!(self.recs[i].seqpacket, "a message for a stream connection");
                    assert!(len > 0, "an empty message granted");
                    // The guest's ring: buffers of the room offered, as many as it takes, or
                    // at most 8 and the rest into the engine's stage.
                    let part = room.min(m.max_part());
                    let (k, staged) = match m.buffers_for(std::iter::repeat_n(room, 8)) {
                        Some(k) => (k, 0),
                        None if part > 0 && m.stage(len - 8 * part).is_some() => {
                            (8, len - 8 * part)
                        }
                        None => break,
                    };
                    if staged > 0 {
                        let tail = pattern(self.seq.wrapping_add(1), len)[len - staged..].to_vec();
                        m.stage(staged).expect("a stage").copy_from_slice(&tail);
                    }
                    let rooms = vec![room; k];
                    let io = match choice.unwrap_or(RxChoice::Take) {
                        RxChoice::Drop => break,
                        RxChoice::Take => Io::Done(len),
                        RxChoice::Read(n) => Io::Done(n as usize),
                        RxChoice::WouldBlock => Io::WouldBlock,
                        RxChoice::Eof => Io::Done(0),
                        RxChoice::Error => Io::Error(SocketError(104)),
                    };
                    self.seq += 1;
                    let bytes = pattern(self.seq, len);
                    let result = m.complete(io, &rooms, &mut &bytes[..len - staged]);
                    match (io, result) {
                        (Io::Done(n), Ok(Some(headers))) => {
                            assert_eq!(n, len);
                            let headers: Vec<Header> = headers.collect();
                            assert_eq!(headers.len(), k, "one packet per buffer");
                            let mut at = 0;
                            self.recs[i].h2g.extend_from_slice(&bytes);
                            for (j, h) in headers.iter().enumerate() {
                                let part = h.len.get() as usize;
                                let eom = if j + 1 == k && staged == 0 {
                                    SEQ_EOM
                                } else {
                                    0
                                };
                                assert_eq!(h.flags.get(), eom, "EOM on the last packet only");
                                assert!(part > 0 && part <= room.min(max_payload));
                                packets += 1;
                                self.guest_receive(h, &bytes[at..at + part], Some(conn));
                                at += part;
                            }
                            assert_eq!(at + staged, len, "the parts make the message");
                        }
                        (Io::Done(n), r) if n != len => {
                            assert_eq!(r.map(|h| h.is_some()), Err(ConnError::Overrun))
                        }
                        (Io::WouldBlock | Io::Error(_), Ok(None)) => {}
                        (io, r) => panic!(
                            "message read {io:?} completed as {:?}",
                            r.map(|h| h.map(|h| h.count()))
                        ),
                    }
                }
            }
        }
        packets
    }

    fn guest_header(&self, g: &GuestPacket) -> (Header, Vec<u8>) {
        let cid = |c: Cid, ok: u64| match c {
            Cid::Ok | Cid::Ok2 | Cid::Ok3 => ok,
            Cid::Raw(v) => v,
        };
        let known = |sel: u8| {
            let with_ports: Vec<(u32, u32)> = self.recs.iter().filter_map(|r| r.ports).collect();
            (!with_ports.is_empty()).then(|| with_ports[sel as usize % with_ports.len()])
        };
        let small = |guest: u8, host: u8| (1000 + u32::from(guest % 4), 5000 + u32::from(host % 4));
        let (guest_port, host_port) = match g.addr {
            Addr::Conn(s) | Addr::Conn2(s) => known(s).unwrap_or_else(|| small(s, s >> 2)),
            Addr::Small { guest, host } => small(guest, host),
            Addr::Raw { guest, host } => (guest, host),
        };
        let op = match g.op {
            OpChoice::Request => 1,
            OpChoice::Response => 2,
            OpChoice::Rst => 3,
            OpChoice::Shutdown => 4,
            OpChoice::Rw | OpChoice::Rw2 | OpChoice::Rw3 => 5,
            OpChoice::CreditUpdate => 6,
            OpChoice::CreditRequest => 7,
            OpChoice::Raw(v) => v,
        };
        let ty = match g.ty {
            Ty::Stream | Ty::Stream2 | Ty::Stream3 => 1,
            Ty::SeqPacket => 2,
            Ty::Raw(v) => v,
        };
        let flags = match g.flags {
            Flags::None => 0,
            Flags::Rcv => 1,
            Flags::Send => 2,
            Flags::Both => 3,
            Flags::Raw(v) => v,
        };
        let buf_alloc = match g.buf_alloc {
            Credit::Big => 1 << 16,
            Credit::Small(v) => u32::from(v % 512),
            Credit::Raw(v) => v,
        };
        let honest = self
            .rec_by_key((guest_port, host_port), ty)
            .map_or(0, |i| self.recs[i].guest_rx.len() as u32);
        let fwd_cnt = match g.fwd_cnt {
            Fwd::Honest | Fwd::Honest2 => honest,
            Fwd::Raw(v) => v,
        };
        let (len, bytes) = match &g.payload {
            Payload::Sized(n) => {
                let n = *n as usize % (2 * self.config.buffer_size as usize + 2);
                (n as u32, pattern(self.seq.wrapping_add(0x5a5a), n))
            }
            Payload::Bytes(b) => (b.len() as u32, b.clone()),
            Payload::Mismatch { len, have } => (*len, pattern(self.seq, *have as usize % 8192)),
        };
        // Only data carries a payload, unless the header is to lie about it.
        let (len, bytes) = if op == 5 || matches!(g.payload, Payload::Mismatch { .. }) {
            (len, bytes)
        } else {
            (0, Vec::new())
        };
        let header = Header {
            src_cid: cid(g.src, GUEST_CID).into(),
            dst_cid: cid(g.dst, HOST_CID).into(),
            src_port: guest_port.into(),
            dst_port: host_port.into(),
            len: len.into(),
            type_: ty.into(),
            op: op.into(),
            flags: flags.into(),
            buf_alloc: buf_alloc.into(),
            fwd_cnt: fwd_cnt.into(),
        };
        (header, bytes)
    }

    /// Sends a guest packet and completes its payload as `write` says.
    fn guest_send(&mut self, header: Header, bytes: &[u8], write: TxChoice) {
        self.seq += 1;
        let now = self.now;
        let ports = (header.src_port.get(), header.dst_port.get());
        let addressed = header.src_cid.get() == GUEST_CID
            && header.dst_cid.get() == HOST_CID
            && SocketType::from_u16(header.type_.get()).is_some();
        let partial_dropped = self.engine.stats().seqpacket_partial_dropped;
        let lost = self.engine.stats().guest_bytes_lost;
        let op = header.op.get();
        if addressed
            && (op == Op::Rst.to_u16()
                || (op == Op::Shutdown.to_u16()
                    && header.flags.get() & vsock_core::wire::SHUTDOWN_RCV != 0))
        {
            // The guest gives up on the data it has not received yet.
            if let Some(i) = self.rec_by_key(ports, header.type_.get()) {
                self.recs[i].guest_gave_up = true;
            }
        }
        let empty_before = self.engine.stats().seqpacket_empty_from_guest;
        let mut no_payload = false;
        let mut wrote_direct = None;
        match self.engine.handle_tx(now, &header) {
            Tx::Done => no_payload = true,
            Tx::Data(data) => {
                let conn = data.conn();
                let len = data.len();
                let direct = data.direct();
                assert_eq!(len, header.len.get() as usize);
                assert!(len > 0, "a payload without bytes");
                let i = self
                    .recs
                    .iter()
                    .rposition(|r| r.id == conn)
                    .expect("payload for a handle never seen");
                assert!(!self.recs[i].closed, "payload for a closed connection");
                assert_eq!(self.recs[i].ports, Some(ports), "payload for other ports");
                let have = bytes.len().min(len);
                let written = match write {
                    TxChoice::Drop => {
                        drop(data);
                        return;
                    }
                    TxChoice::All | TxChoice::All2 => Io::Done(have),
                    TxChoice::Part(n) => Io::Done(n as usize % (have + 1)),
                    TxChoice::WouldBlock => Io::WouldBlock,
                    TxChoice::Error => {
                        if direct {
                            self.recs[i].host_failed = true;
                        }
                        Io::Error(SocketError(32))
                    }
                    TxChoice::Over(n) => Io::Done(len + 1 + n as usize),
                };
                let result = data.complete(written, &mut &bytes[..]);
                let over = direct && matches!(written, Io::Done(n) if n > len);
                if over {
                    assert_eq!(result, Err(ConnError::Overrun));
                    return;
                }
                assert_eq!(result, Ok(()), "completing a payload");
                let rec = &mut self.recs[i];
                let mut intended = bytes[..have].to_vec();
                intended.resize(len, 0);
                rec.accepted.extend_from_slice(&intended);
                if rec.seqpacket {
                    if header.flags.get() & SEQ_EOM != 0 {
                        rec.open = 0;
                        rec.ends.push(rec.accepted.len());
                    } else {
                        rec.open += len;
                    }
                }
                if let (true, Io::Done(n)) = (direct, written) {
                    rec.host_rx.extend_from_slice(&bytes[..n]);
                    rec.check_host_prefix();
                    wrote_direct = Some(i);
                }
            }
        }
        if let Some(i) = wrote_direct {
            let rec = &self.recs[i];
            let reset = matches!(
                self.engine.conn_state(rec.id),
                None | Some(ConnState::Resetting | ConnState::Closed)
            );
            assert!(
                !rec.seqpacket || reset || rec.host_at_boundary(),
                "conn {}: a direct write that is not a whole message",
                rec.id
            );
        }
        if no_payload
            && addressed
            && op == Op::Rw.to_u16()
            && header.len.get() == 0
            && header.type_.get() == SocketType::SeqPacket.to_u16()
            && header.flags.get() & SEQ_EOM != 0
        {
            // An empty RW with EOM that the engine took (not counted as an empty message)
            // ends the unfinished message.
            let took = self.engine.stats().seqpacket_empty_from_guest == empty_before;
            if let Some(i) = self.rec_by_key(ports, header.type_.get()) {
                let live = matches!(
                    self.engine.conn_state(self.recs[i].id),
                    Some(ConnState::Established | ConnState::HostSendShut)
                );
                let rec = &mut self.recs[i];
                if took && live && rec.seqpacket && rec.open > 0 && !rec.closed {
                    rec.open = 0;
                    rec.ends.push(rec.accepted.len());
                }
            }
        }
        if self.engine.stats().seqpacket_partial_dropped != partial_dropped {
            // A SHUTDOWN dropped the unfinished message: its bytes never go to the socket.
            let dropped = (self.engine.stats().guest_bytes_lost - lost) as usize;
            let i = self
                .rec_by_key(ports, header.type_.get())
                .expect("a dropped message's connection");
            let rec = &mut self.recs[i];
            assert!(rec.seqpacket);
            assert_eq!(
                dropped, rec.open,
                "the unfinished message, and only it, dropped"
            );
            let keep = rec.accepted.len() - rec.open;
            rec.accepted.truncate(keep);
            rec.open = 0;
        }
        if addressed && op == Op::Response.to_u16() {
            if let Some(i) = self.rec_by_key(ports, header.type_.get()) {
                if matches!(
                    self.engine.conn_state(self.recs[i].id),
                    Some(
                        ConnState::Established
                            | ConnState::GuestSendShut
                            | ConnState::HostSendShut
                            | ConnState::Closing
                    )
                ) {
                    self.recs[i].guest_established = true;
                    self.recs[i].request_seen = false;
                }
            }
        }
    }

    fn feed_line(&mut self, i: usize, bytes: &[u8]) {
        let now = self.now;
        let id = self.recs[i].id;
        let ok = self
            .engine
            .handle_connect_line(now, id, LineRead::Data(bytes))
            .is_ok();
        let rec = &mut self.recs[i];
        if ok {
            rec.line_fed.extend_from_slice(bytes);
        }
        // Only a host client learns its ports from its line (a refused sibling connect's
        // record has none, and its connection's ports are another CID's).
        if rec.ports.is_none() && rec.origin_host {
            if let Some(ports) = self.engine.conn_ports(id) {
                rec.ports = Some(ports);
                let newline = rec
                    .line_fed
                    .iter()
                    .position(|&b| b == b'\n')
                    .expect("a complete line");
                rec.h2g = rec.line_fed[newline + 1..].to_vec();
            }
        }
    }

    fn host_write(&mut self, i: usize, choice: WriteChoice) {
        let now = self.now;
        let id = self.recs[i].id;
        let Some(snapshot) = self.recs[i].flush.take() else {
            // Not asked for: refused, and nothing moves.
            let r = self.engine.handle_host_write(now, id, Io::Done(1));
            assert!(r.is_err(), "a write result no Flush asked for was taken");
            return;
        };
        let current = match self.engine.host_bytes(id) {
            Ok(b) => concat(b),
            Err(_) => Vec::new(),
        };
        assert!(
            current.is_empty() || current.starts_with(&snapshot),
            "the bytes of an outstanding Flush changed"
        );
        let io = match choice {
            WriteChoice::All => Io::Done(snapshot.len()),
            WriteChoice::Part(n) => Io::Done(n as usize % (snapshot.len() + 1)),
            WriteChoice::Zero => Io::Done(0),
            WriteChoice::WouldBlock => Io::WouldBlock,
            WriteChoice::Error => {
                self.recs[i].host_failed = true;
                Io::Error(SocketError(32))
            }
            WriteChoice::Over(n) => Io::Done(current.len() + 1 + n as usize),
        };
        let r = self.engine.handle_host_write(now, id, io);
        let reset = matches!(
            self.engine.conn_state(id),
            None | Some(ConnState::Resetting | ConnState::Closed)
        );
        let rec = &mut self.recs[i];
        match (io, r) {
            (Io::Done(n), Ok(())) if !current.is_empty() => {
                assert!(n <= current.len(), "an overlong write accepted");
                rec.host_rx.extend_from_slice(&snapshot[..n]);
                rec.check_host_prefix();
                assert!(
                    !rec.seqpacket || reset || rec.host_at_boundary(),
                    "conn {}: a flush that is not a whole message",
                    rec.id
                );
            }
            (Io::Done(n), Err(ConnError::Overrun)) => assert!(n > current.len()),
            (_, Ok(())) => {}
            (io, r) => panic!("write {io:?} of an outstanding Flush answered {r:?}"),
        }
    }

    fn timeout(&mut self) {
        let now = self.now;
        let undelivered = self.engine.stats().rst_undelivered;
        self.engine.handle_timeout(now);
        if self.engine.stats().rst_undelivered != undelivered {
            // Their RST expired before the guest posted a buffer for it: by design.
            for rec in &mut self.recs {
                if self.engine.conn_state(rec.id).is_none() {
                    rec.waived = true;
                }
            }
        }
        if let Some(t) = self.engine.poll_timeout() {
            assert!(
                t > now && t > self.engine.now(),
                "after handle_timeout({now}), poll_timeout() is {t}: a passed deadline"
            );
        }
    }

    fn step(&mut self, step: &Step) {
        let now = self.now;
        match step {
            Step::Guest(g) | Step::Guest2(g) | Step::Guest3(g) => {
                let (header, bytes) = self.guest_header(g);
                self.guest_send(header, &bytes, g.write);
            }
            Step::Accept => match self.engine.handle_accept(now) {
                Ok(id) => {
                    assert!(self.rec_index(id).is_none(), "a handle given twice");
                    self.recs.push(Rec::new(id, true));
                }
                Err(_) => {
                    let reading = self
                        .recs
                        .iter()
                        .filter(|r| {
                            self.engine.conn_state(r.id) == Some(ConnState::ReadingConnectLine)
                        })
                        .count();
                    assert!(
                        self.engine.connections() >= self.config.max_connections
                            || reading >= self.config.max_pending_host_clients,
                        "accept refused with room in the table"
                    );
                }
            },
            Step::AcceptSeqpacket => {
                if let Ok(id) = self.engine.handle_seqpacket_accept(now) {
                    assert!(self.rec_index(id).is_none(), "a handle given twice");
                    let mut rec = Rec::new(id, true);
                    rec.seqpacket = true;
                    self.recs.push(rec);
                }
            }
            Step::SocketTypes(bits) => {
                let types = SocketTypes {
                    stream: bits & 1 != 0,
                    seqpacket: bits & 2 != 0,
                };
                self.engine.set_socket_types(now, types);
            }
            Step::Line { conn, read } => {
                let Some(i) = self.pick(*conn) else { return };
                let id = self.recs[i].id;
                self.recs[i].line_read_pending = false;
                match read {
                    LineChoice::Good { port, extra, piece } => {
                        let port = match port {
                            Port::Small(p) => 1000 + u32::from(p % 4),
                            Port::Raw(p) => *p,
                        };
                        let mut bytes = format!("CONNECT {port}\n").into_bytes();
                        bytes.extend_from_slice(extra);
                        let piece = 1 + *piece as usize % 24;
                        for chunk in bytes.chunks(piece) {
                            let room = CONNECT_LINE_MAX.saturating_sub(self.recs[i].line_fed.len());
                            if room == 0 || self.recs[i].ports.is_some() {
                                break;
                            }
                            self.feed_line(i, &chunk[..chunk.len().min(room)]);
                        }
                    }
                    LineChoice::Raw(bytes) => self.feed_line(i, bytes),
                    LineChoice::Eof => {
                        let _ = self.engine.handle_connect_line(now, id, LineRead::Eof);
                    }
                    LineChoice::WouldBlock => {
                        let _ = self
                            .engine
                            .handle_connect_line(now, id, LineRead::WouldBlock);
                    }
                    LineChoice::Error => {
                        let _ = self.engine.handle_connect_line(
                            now,
                            id,
                            LineRead::Error(SocketError(104)),
                        );
                    }
                }
            }
            Step::Host { conn, event } => {
                let Some(i) = self.pick(*conn) else { return };
                let id = self.recs[i].id;
                let event = match event {
                    HostChoice::Connected => HostEvent::Connected,
                    HostChoice::ConnectFailed => HostEvent::ConnectFailed(SocketError(111)),
                    HostChoice::Readable => HostEvent::Readable,
                    HostChoice::Writable => HostEvent::Writable,
                    HostChoice::HangUp => {
                        // The peer closed: from here on its reads find end of file.
                        self.recs[i].host_failed = true;
                        HostEvent::HangUp
                    }
                    HostChoice::Error => {
                        self.recs[i].host_failed = true;
                        HostEvent::Error(SocketError(104))
                    }
                };
                let r = self.engine.handle_host_event(now, id, event);
                if self.recs[i].closed {
                    assert_eq!(r, Err(ConnError::Stale), "an event for a closed handle");
                }
                if matches!(event, HostEvent::Connected | HostEvent::ConnectFailed(_)) && r.is_ok()
                {
                    self.recs[i].connect_pending = false;
                }
            }
            Step::Write { conn, result } => {
                let Some(i) = self.pick(*conn) else { return };
                self.host_write(i, *result);
            }
            Step::Rx { room, choices } | Step::Rx2 { room, choices } => {
                let room = match room {
                    RoomChoice::Small(r) => *r as usize,
                    RoomChoice::Mid(r) => *r as usize,
                    RoomChoice::Big => 4096,
                };
                self.drain_rx(room, choices);
            }
            Step::Clock(c) => {
                self.now = match c {
                    ClockChoice::Micros(us) => now + Duration::from_micros(u64::from(*us)),
                    ClockChoice::Millis(ms) => now + Duration::from_millis(u64::from(*ms)),
                    ClockChoice::Back(us) => {
                        Instant::from_nanos(now.as_nanos().saturating_sub(u64::from(*us) * 1000))
                    }
                    ClockChoice::Jump(t) => Instant::from_nanos(*t),
                }
            }
            Step::Timeout => self.timeout(),
            Step::ResetConnection(conn) => {
                let Some(i) = self.pick(*conn) else { return };
                let r = self.engine.reset_connection(now, self.recs[i].id);
                if self.recs[i].closed {
                    assert_eq!(r, Err(ConnError::Stale));
                }
            }
            Step::AbortAll => self.engine.abort_all(now),
            Step::Reset | Step::Stop => {
                if matches!(step, Step::Reset) {
                    self.engine.reset(now);
                } else {
                    self.engine.stop(now);
                }
                for rec in &mut self.recs {
                    rec.waived = true;
                }
            }
        }
        self.drain_actions();
        self.check_limits();
    }

    /// Drives every connection to quiescence, then checks that each side got every byte or
    /// saw the connection reset: cooperative rounds, then time passing every deadline (a
    /// connect the guest never answers, a close that never finishes), then cooperative rounds
    /// again.
    fn finish(&mut self) {
        self.cooperate();
        self.now = self.engine.now() + Duration::from_secs(3600);
        self.timeout();
        self.drain_actions();
        self.cooperate();
        for rec in &self.recs {
            rec.check_host_prefix();
            rec.check_guest_prefix();
            if !rec.closed {
                assert_eq!(
                    rec.host_rx,
                    rec.expected_host_complete(),
                    "conn {}: the host neither got every accepted byte nor saw a Close",
                    rec.id
                );
            }
            if rec.guest_established && !rec.guest_gave_up && !rec.waived && !rec.guest_rst {
                assert_eq!(
                    rec.guest_rx, rec.h2g,
                    "conn {}: the guest neither got every byte nor saw an RST",
                    rec.id
                );
            }
        }
    }

    /// A cooperative guest and host until nothing moves: every connect answered, every flush
    /// written whole, every REQUEST answered, the guest's credit refreshed.
    fn cooperate(&mut self) {
        for round in 0.. {
            assert!(round < 64, "no quiescence after 64 cooperative rounds");
            let mut progress = 0;
            let now = self.now;
            for i in 0..self.recs.len() {
                let rec = &self.recs[i];
                if rec.closed {
                    continue;
                }
                let id = rec.id;
                if rec.connect_pending {
                    self.recs[i].connect_pending = false;
                    let _ = self.engine.handle_host_event(now, id, HostEvent::Connected);
                    progress += 1;
                }
                if self.recs[i].flush.is_some() {
                    self.host_write(i, WriteChoice::All);
                    progress += 1;
                }
                if self.recs[i].line_read_pending {
                    // The client sends nothing more (a client that hung up: end of file).
                    self.recs[i].line_read_pending = false;
                    let read = if self.recs[i].host_failed {
                        LineRead::Eof
                    } else {
                        LineRead::WouldBlock
                    };
                    let _ = self.engine.handle_connect_line(now, id, read);
                    progress += 1;
                }
                let _ = self.engine.handle_host_event(now, id, HostEvent::Writable);
                if self.recs[i].host_failed {
                    // A failed socket reads its error or end of file.
                    let _ = self.engine.handle_host_event(now, id, HostEvent::Readable);
                }
                progress += self.drain_actions();
            }
            for i in 0..self.recs.len() {
                let rec = &self.recs[i];
                let Some((guest_port, host_port)) = rec.ports else {
                    continue;
                };
                if rec.closed || rec.guest_rst || rec.guest_gave_up || rec.waived {
                    continue;
                }
                let op = if rec.request_seen && !rec.guest_established {
                    Op::Response
                } else if rec.guest_established {
                    Op::CreditUpdate
                } else {
                    continue;
                };
                let header = Packet {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port: guest_port,
                    dst_port: host_port,
                    len: 0,
                    socket_type: if rec.seqpacket {
                        SocketType::SeqPacket
                    } else {
                        SocketType::Stream
                    },
                    op,
                    flags: 0,
                    buf_alloc: 1 << 20,
                    fwd_cnt: rec.guest_rx.len() as u32,
                }
                .to_header();
                if op == Op::Response {
                    progress += 1;
                }
                self.guest_send(header, &[], TxChoice::All);
                progress += self.drain_actions();
            }
            progress += self.drain_rx(4096, &[]);
            progress += self.drain_actions();
            self.check_limits();
            if progress == 0 {
                break;
            }
        }
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let _ = reached(input);
}

/// Runs one input; returns the engine's counters after it, for choosing seeds.
pub fn reached(input: &Input) -> vsock_core::Stats {
    let config = input.config.config();
    let now = Instant::from_secs(1);
    let engine = Engine::new(config.clone(), now).expect("a valid configuration");
    let mut h = Harness {
        engine,
        config,
        now,
        recs: Vec::new(),
        seq: 0,
    };
    let attach_at = match input.record {
        Record::No | Record::No2 => None,
        Record::FromStart => Some(0),
        Record::Before(k) => Some(k as usize % (input.steps.len() + 1)),
    };
    let trace = SharedBuf::default();
    let mut recording = false;
    for (i, step) in input.steps.iter().enumerate() {
        if attach_at == Some(i) {
            recording = h.attach(&trace);
        }
        h.step(step);
    }
    if attach_at == Some(input.steps.len()) {
        recording = h.attach(&trace);
    }
    h.finish();
    if recording {
        // Detaching finishes the file.
        drop(h.engine.set_recorder(None).expect("detaching always works"));
        let bytes = trace.0.lock().unwrap().clone();
        match vsock_trace::replay(&bytes) {
            Ok(_) => {}
            Err(vsock_trace::ReplayError::Diverged(d)) => {
                panic!("the replay of the recorded run diverged: {d}")
            }
            Err(e) => panic!("the recorded run does not replay: {e}"),
        }
    }
    h.engine.stats().clone()
}

impl Harness {
    /// Attaches a recorder writing to `trace`; false if the engine refuses one now (it cannot
    /// record mid-session with connections open).
    fn attach(&mut self, trace: &SharedBuf) -> bool {
        let writer = vsock_trace::TraceWriter::new(trace.clone(), usize::MAX, 1_700_000_000)
            .expect("writing to memory");
        self.engine.set_recorder(Some(Box::new(writer))).is_ok()
    }
}
