//! Part 4, memory per idle connection: the engine alone with `max_connections` raised to the
//! count, that many guest connections opened (REQUEST, connected, RESPONSE delivered) and left
//! idle. Heap bytes per connection from the counting global allocator (everything the engine
//! holds, what `Engine::new` reserves for the table included, divided by the connections), the
//! growth of the resident set, and the heap against the engine's own `Engine::memory_bound`.

use vsock_core::testing::{guest_pkt, GUEST_CID};
use vsock_core::wire::{Op, HEADER_LEN};
use vsock_core::{Action, Config, Engine, HostEvent, Instant, RxGrant, Tx};

use crate::alloc::{live_bytes, set_counting};
use crate::sys::rss_bytes;
use crate::{progress, Opts, Report};

/// What one count measured.
struct Idle {
    heap_per_conn: f64,
    reserved_per_conn: f64,
    rss_per_conn: f64,
    of_bound: f64,
}

fn measure(n: usize) -> Idle {
    let mut config = Config::new(GUEST_CID);
    config.max_connections = n;
    let bound = Engine::memory_bound(&config);
    set_counting(true);
    let (heap0, rss0) = (live_bytes(), rss_bytes());
    let now = Instant::from_millis(1);
    let mut engine = Engine::new(config, now).expect("config");
    let reserved = live_bytes() - heap0;
    for i in 0..n {
        let port = 1024 + i as u32;
        let h = guest_pkt(Op::Request, port, 1234, 0, 0, 256 * 1024, 0);
        assert!(matches!(engine.handle_tx(now, &h), Tx::Done));
        while let Some(a) = engine.poll_action() {
            if let Action::Connect { conn, .. } = a {
                engine
                    .handle_host_event(now, conn, HostEvent::Connected)
                    .expect("live");
            }
        }
        match engine.poll_rx(now, 4096 - HEADER_LEN) {
            Some(RxGrant::Packet(p)) => {
                assert_eq!(p.header().op.get(), Op::Response.to_u16());
                let _ = p.send();
            }
            _ => panic!("no RESPONSE for connection {i}"),
        }
    }
    let (heap1, rss1) = (live_bytes(), rss_bytes());
    set_counting(false);
    assert_eq!(engine.connections(), n);
    assert_eq!(engine.stats().established, n as u64);
    drop(engine);
    let heap = (heap1 - heap0) as f64;
    Idle {
        heap_per_conn: heap / n as f64,
        reserved_per_conn: reserved as f64 / n as f64,
        rss_per_conn: rss1.saturating_sub(rss0) as f64 / n as f64,
        of_bound: heap / bound as f64,
    }
}

/// Part 4: idle connections.
pub fn run(_opts: &Opts) {
    let report = Report::new("idle");
    for n in [10_000usize, 100_000] {
        let m = measure(n);
        progress(&format!(
            "idle x{n}: {:.0} heap bytes/conn, {:.0} RSS bytes/conn",
            m.heap_per_conn, m.rss_per_conn
        ));
        let k = n / 1000;
        report.row(
            &format!("x{k}k_heap_bytes_per_conn"),
            m.heap_per_conn,
            "B",
            "engine heap / connections (counting allocator); max_connections = count",
        );
        report.row(
            &format!("x{k}k_reserved_bytes_per_conn"),
            m.reserved_per_conn,
            "B",
            "of which Engine::new reserved up front",
        );
        report.row(
            &format!("x{k}k_rss_bytes_per_conn"),
            m.rss_per_conn,
            "B",
            "resident set growth / connections (/proc/self/statm)",
        );
        report.row(
            &format!("x{k}k_heap_of_bound"),
            m.of_bound,
            "x bound",
            "engine heap / Engine::memory_bound (which counts a full buffer per connection)",
        );
        if n == 10_000 {
            report.target(
                "idle_conn_bytes",
                m.heap_per_conn,
                "heap bytes per idle connection, 10k",
            );
        } else {
            report.target(
                "idle_conn_bytes_100k",
                m.heap_per_conn,
                "heap bytes per idle connection, 100k: linear in connections",
            );
            report.target(
                "idle_100k_of_bound",
                m.of_bound,
                "engine heap at 100k / Engine::memory_bound",
            );
        }
    }
}
