//! Throughput of the device, as ratios against a raw Unix-socket pump measured in the same
//! process and moment.
//!
//! - baseline: 64 KiB writes into a Unix socket pair and reads out of it, one thread;
//! - guest to host: 64 KiB tx packets through the virtqueue and `serve`, the payload written
//!   to the socket straight from guest memory, the host application reading it;
//! - host to guest: the host application writing 64 KiB, `serve` reading it straight into
//!   4 KiB rx buffers (Linux's size), the guest returning credit.
//!
//! Run with `cargo bench -p vsock-device --bench throughput`. Prints MiB/s and the ratios.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant as Clock};

use common::{pkt, Bed};
use vsock_core::wire::Op;
use vsock_device::testing::Layout;

const CHUNK: usize = 64 * 1024;

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

fn baseline(total: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let data = vec![7u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let start = Clock::now();
    let mut moved = 0;
    while moved < total {
        a.write_all(&data).unwrap();
        let mut got = 0;
        while got < CHUNK {
            got += b.read(&mut buf[got..]).unwrap();
        }
        moved += CHUNK;
    }
    mib_per_s(moved, start.elapsed())
}

fn guest_to_host(total: usize) -> f64 {
    let mut bed = Bed::new();
    bed.post_rx(64, &Layout::Single);
    let (conn, _) = bed.connect(50_000, 1234);
    let data = vec![7u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut app = bed.host.app(conn).try_clone().unwrap();
    app.set_nonblocking(false).unwrap();
    let mut fwd_seen = 0u32;
    let start = Clock::now();
    let mut moved = 0usize;
    while moved < total {
        bed.send(
            pkt(Op::Rw, 50_000, 1234, CHUNK as u32, 0, 0),
            &data,
            &Layout::HeaderThenData,
        );
        let _ = bed.serve();
        bed.driver.take_used(1);
        for used in bed.driver.take_used(0) {
            let (h, _) = vsock_device::testing::parse_rx(&used);
            fwd_seen = h.fwd_cnt.get();
            bed.driver.post_rx(4096, &Layout::Single).unwrap();
        }
        let mut got = 0;
        while got < CHUNK {
            got += app.read(&mut buf[got..]).unwrap();
        }
        moved += CHUNK;
    }
    let took = start.elapsed();
    assert!(fwd_seen > 0, "credit updates reached the guest");
    assert_eq!(bed.device.engine().stats().rst_sent, 0);
    mib_per_s(moved, took)
}

fn host_to_guest(total: usize) -> f64 {
    let mut bed = Bed::new();
    bed.post_rx(128, &Layout::Single);
    let (conn, _) = bed.connect(50_001, 1234);
    let data = vec![9u8; CHUNK];
    let mut app = bed.host.app(conn).try_clone().unwrap();
    app.set_nonblocking(false).unwrap();
    let mut received = 0u32;
    let start = Clock::now();
    let mut moved = 0usize;
    while moved < total {
        app.write_all(&data).unwrap();
        let target = received.wrapping_add(CHUNK as u32);
        while received != target {
            bed.host.poke(bed.device.engine_mut(), bed.now);
            let _ = bed.serve();
            for used in bed.driver.take_used(0) {
                received = received.wrapping_add(used.len - 44);
                bed.driver.post_rx(4096, &Layout::Single).unwrap();
            }
            // The guest application consumed it all: return the credit.
            bed.send(
                pkt(Op::CreditUpdate, 50_001, 1234, 0, 0, received),
                &[],
                &Layout::Single,
            );
            bed.driver.take_used(1);
        }
        moved += CHUNK;
    }
    let took = start.elapsed();
    assert_eq!(bed.device.engine().stats().rst_sent, 0);
    mib_per_s(moved, took)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let (total, rounds) = if full { (256 << 20, 3) } else { (4 << 20, 1) };
    // Interleave runs so that both sides see the same machine state.
    let mut rows = Vec::new();
    for _ in 0..rounds {
        let base = baseline(total);
        let up = guest_to_host(total);
        let down = host_to_guest(total);
        rows.push((base, up, down));
    }
    println!(
        "{:>14} {:>14} {:>8} {:>14} {:>8}",
        "baseline MiB/s", "guest->host", "ratio", "host->guest", "ratio"
    );
    for (base, up, down) in &rows {
        println!(
            "{base:>14.0} {up:>14.0} {:>8.2} {down:>14.0} {:>8.2}",
            up / base,
            down / base
        );
    }
    let best = |f: fn(&(f64, f64, f64)) -> f64| rows.iter().map(f).fold(0.0, f64::max);
    println!(
        "best ratios: guest->host {:.2}, host->guest {:.2}",
        best(|r| r.1 / r.0),
        best(|r| r.2 / r.0)
    );
}
