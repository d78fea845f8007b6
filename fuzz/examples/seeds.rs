//! Writes the committed seed corpora, `corpus/<target>/`: `cargo run --example seeds` from
//! `fuzz/`.
//!
//! The byte-level targets get hand-written inputs. The structured targets (`engine`,
//! `device`) take `arbitrary`-decoded inputs, which cannot be written by hand: for those, a
//! fixed pseudo-random search keeps the first input that reaches each milestone (a connection
//! established each way, data each way, a graceful close, a timeout, ...), judged by the
//! engine's and the device's counters after the run: the shortest such input among a fixed
//! pseudo-random set and, when directories are given (`cargo run --release --example seeds --
//! work`), the files of `<dir>/<target>/` (a corpus a long run grew). The committed seeds were
//! chosen that way from the corpora of the runs README.md describes.

use std::fs;
use std::path::Path;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use vsock_core::wire::{Header, Op, Packet, SocketType, HOST_CID};
use vsock_core::{Action, Config, Engine, HostEvent, Instant, Io, LineRead, RxGrant, Tx};
use vsock_trace::TraceWriter;
use zerocopy::IntoBytes;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn header(op: Op, len: u32, flags: u32) -> Header {
    Packet {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1000,
        dst_port: 5000,
        len,
        socket_type: SocketType::Stream,
        op,
        flags,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
    .to_header()
}

fn wire() {
    write("wire", "request", header(Op::Request, 0, 0).as_bytes());
    let mut rw = header(Op::Rw, 100, 0).as_bytes().to_vec();
    rw.extend_from_slice(&4096u32.to_le_bytes());
    write("wire", "rw-with-limit", &rw);
    write(
        "wire",
        "shutdown-both",
        header(Op::Shutdown, 0, 3).as_bytes(),
    );
    let mut bad = header(Op::Rst, 0, 0);
    bad.type_ = 2.into();
    bad.op = 9.into();
    write("wire", "seqpacket-unknown-op", bad.as_bytes());
    let mut cid = header(Op::CreditUpdate, 7, 0);
    cid.src_cid = (1u64 << 40 | 3).into();
    write("wire", "reserved-cid-bits", cid.as_bytes());
}

fn connect_line() {
    let seeds: [(&str, &[u8]); 7] = [
        ("plain", b"\x00CONNECT 1234\n"),
        ("crlf-and-data", b"\x00CONNECT 5000\r\nhello, guest"),
        ("split", b"\x04\x03\x01\x05\x00CONNECT 42\nrest"),
        ("port-any", b"\x00CONNECT 4294967295\n"),
        ("too-big", b"\x00CONNECT 99999999999\n"),
        ("http", b"\x00GET / HTTP/1.1\r\n"),
        (
            "too-long",
            b"\x01\x20CONNECT 0000000000000000000000000000000000000000000000000000000000001\n",
        ),
    ];
    for (name, bytes) in seeds {
        write("connect_line", name, bytes);
    }
}

/// A short recorded session: a host client connects, data both ways, the guest closes.
fn session_trace(name: &str, snap: usize) {
    let path = std::env::temp_dir().join(format!("vsock-fuzz-seed-{}.pcapng", std::process::id()));
    let mut config = Config::new(3);
    config.buffer_size = 4096;
    config.credit_update_threshold = 1024;
    let mut e = Engine::new(config, Instant::from_secs(1)).unwrap();
    e.set_recorder(Some(Box::new(
        TraceWriter::create(&path, snap, 1_700_000_000).unwrap(),
    )))
    .unwrap();
    let mut now = Instant::from_secs(1);
    let conn = e.handle_accept(now).unwrap();
    e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
    let mut host_port = 0;
    let drain = |e: &mut Engine, now| {
        while let Some(a) = e.poll_action() {
            match a {
                Action::ReadConnectLine { conn, .. } => {
                    e.handle_connect_line(now, conn, LineRead::Data(b"CONNECT 5000\nhi"))
                        .unwrap();
                }
                Action::Flush { conn } => {
                    let n = e.host_bytes(conn).unwrap().iter().map(|s| s.len()).sum();
                    e.handle_host_write(now, conn, Io::Done(n)).unwrap();
                }
                _ => {}
            }
        }
    };
    drain(&mut e, now);
    // The REQUEST.
    if let Some(RxGrant::Packet(p)) = e.poll_rx(now, 4096) {
        host_port = p.header().src_port.get();
        let _ = p.send();
    }
    now = now + Duration::from_millis(3);
    let guest = |op, len, flags| {
        let mut h = header(op, len, flags);
        h.src_port = 5000.into();
        h.dst_port = host_port.into();
        h
    };
    let _ = e.handle_tx(now, &guest(Op::Response, 0, 0));
    drain(&mut e, now);
    if let Tx::Data(d) = e.handle_tx(now, &guest(Op::Rw, 5, 0)) {
        d.complete(Io::Done(5), &mut &b"hello"[..]).unwrap();
    }
    drain(&mut e, now);
    e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
    for _ in 0..4 {
        match e.poll_rx(now, 4096) {
            Some(RxGrant::Packet(p)) => {
                let _ = p.send();
            }
            Some(RxGrant::Read(r)) => {
                let _ = r.complete(Io::Done(3), &mut &b"abc"[..]);
            }
            // A stream session: no seqpacket grants.
            Some(RxGrant::Probe(_) | RxGrant::Message(_)) => unreachable!(),
            None => break,
        }
    }
    now = now + Duration::from_millis(2);
    let _ = e.handle_tx(now, &guest(Op::Shutdown, 0, 3));
    drain(&mut e, now);
    e.handle_timeout(now + Duration::from_secs(10));
    drain(&mut e, now);
    drop(e.set_recorder(None).unwrap());
    write("trace", name, &fs::read(&path).unwrap());
    fs::remove_file(&path).unwrap();
}

fn trace() {
    session_trace("session", usize::MAX);
    session_trace("session-snapped", 8);
}

/// A named condition on what a run reached.
type Milestone<S> = (&'static str, fn(&S) -> bool);

/// A fixed xorshift stream.
struct Rng(u64);

impl Rng {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 24) as u8
            })
            .collect()
    }
}

/// Keeps, for each milestone, the shortest input that reaches it: among `tries`
/// pseudo-random inputs, and the files of `dirs` (a corpus a fuzzer grew, given on the
/// command line).
fn search<T: for<'a> Arbitrary<'a>, S>(
    target: &str,
    tries: usize,
    dirs: &[String],
    run: impl Fn(&T) -> S,
    milestones: &[Milestone<S>],
) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut best: Vec<Option<Vec<u8>>> = vec![None; milestones.len()];
    let mut candidates: Vec<Vec<u8>> = (0..tries)
        .map(|_| {
            let len = 64 + rng.bytes(1)[0] as usize * 4;
            rng.bytes(len)
        })
        .collect();
    for dir in dirs {
        let dir = Path::new(dir).join(target);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        files.sort();
        candidates.extend(files.iter().filter_map(|f| fs::read(f).ok()));
    }
    for bytes in candidates {
        let Ok(input) = T::arbitrary_take_rest(Unstructured::new(&bytes)) else {
            continue;
        };
        let Ok(stats) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&input)))
        else {
            eprintln!("{target}: a candidate input fails the target; run the fuzzer on it");
            continue;
        };
        for (i, (_, reached)) in milestones.iter().enumerate() {
            if reached(&stats) && best[i].as_ref().is_none_or(|b| bytes.len() < b.len()) {
                best[i] = Some(bytes.clone());
            }
        }
    }
    for (i, (name, _)) in milestones.iter().enumerate() {
        match &best[i] {
            Some(bytes) => write(target, name, bytes),
            None => eprintln!("{target}: no seed reached {name}"),
        }
    }
}

fn main() {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    wire();
    connect_line();
    trace();
    type S = vsock_core::Stats;
    let engine_milestones: &[Milestone<S>] = &[
        ("guest-connects", |s| {
            s.guest_connects > 0 && s.established > 0
        }),
        ("host-connects", |s| s.host_accepts > 0 && s.established > 0),
        ("data-to-host", |s| s.tx_bytes > 0),
        ("data-buffered", |s| s.tx_buffered_bytes > 0),
        ("data-to-guest", |s| s.rx_bytes > 0),
        ("credit-update", |s| s.credit_updates_sent > 0),
        ("credit-request", |s| s.credit_requests_sent > 0),
        ("connect-timeout", |s| s.connect_timeout > 0),
        ("close-timeout", |s| s.close_timeout > 0),
        ("line-timeout", |s| s.connect_line_timeout > 0),
        ("credit-violation", |s| s.credit_violation > 0),
        ("seqpacket-to-host", |s| s.messages_to_host > 0),
        ("seqpacket-to-guest", |s| s.messages_to_guest > 0),
        ("seqpacket-partial-dropped", |s| {
            s.seqpacket_partial_dropped > 0
        }),
        ("seqpacket-oversize", |s| s.seqpacket_oversize_from_host > 0),
    ];
    search::<vsock_fuzz::engine::Input, S>(
        "engine",
        20_000,
        &dirs,
        vsock_fuzz::engine::reached,
        engine_milestones,
    );
    type D = (vsock_device::DeviceStats, vsock_core::Stats);
    let device_milestones: &[Milestone<D>] = &[
        ("tx-chains", |(d, _)| d.tx_chains > 2),
        ("rx-chains", |(d, _)| d.rx_chains > 0),
        ("event", |(d, _)| d.event_chains > 0),
        ("established", |(_, s)| s.established > 0),
        ("data-to-host", |(_, s)| s.tx_bytes > 0),
        ("data-to-guest", |(_, s)| s.rx_bytes > 0),
        ("bad-memory", |(d, _)| d.tx_bad_memory > 0),
        ("len-beyond-chain", |(d, _)| d.tx_len_beyond_chain > 0),
    ];
    search::<vsock_fuzz::device::Input, D>(
        "device",
        2_000,
        &dirs,
        vsock_fuzz::device::reached,
        device_milestones,
    );
}
