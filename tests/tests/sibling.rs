//! Sibling routing, on every runtime: two devices in one process, each with its Linux guest
//! model over real virtqueues, joined by `vsock_host::Siblings` (real socket pairs between
//! the two engines). Every byte and message must arrive, in order, or the peer must see a
//! reset; a full receiver holds the sender back; a sibling going away resets the other at
//! once.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vsock_core::testing::pattern;
use vsock_core::wire::SHUTDOWN_SEND;
use vsock_core::Config;
use vsock_device::testing::Guest;
use vsock_host::Siblings;
use vsock_tests::{Rig, Runtime};

const LONG: Duration = Duration::from_secs(30);
const A: u64 = 3;
const B: u64 = 4;

/// Two VMs in one group: A's guest talks to B's, and B's to A's.
fn pair(rt: Runtime) -> (Rig, Rig) {
    let siblings = Siblings::new([(A, vec!["g".to_string()]), (B, vec!["g".to_string()])]).unwrap();
    let a = Rig::start_sibling(rt, Config::new(A), &siblings, B);
    let b = Rig::start_sibling(rt, Config::new(B), &siblings, A);
    (a, b)
}

/// Drives both guests until `done` holds, or panics after `limit`.
fn until(
    a: &mut Rig,
    b: &mut Rig,
    what: &str,
    limit: Duration,
    mut done: impl FnMut(&mut Guest, &mut Guest) -> bool,
) {
    let start = Instant::now();
    loop {
        a.step();
        b.step();
        if done(&mut a.guest, &mut b.guest) {
            return;
        }
        assert!(start.elapsed() < limit, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn a_stream_between_two_guests_carries_every_byte_both_ways(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen(5000);
    let key = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "connected", LONG, |ga, gb| {
        ga.stack.conn(key).established && !gb.stack.conns.is_empty()
    });
    let bkey = *b.guest.stack.conns.keys().next().unwrap();
    assert_eq!(bkey, (5000, key.0), "B sees A's port");
    let (to_b, to_a) = (pattern(1, 3_000_000), pattern(2, 2_000_000));
    a.guest.stack.write(key, &to_b);
    a.guest.stack.shutdown(key, SHUTDOWN_SEND);
    b.guest.stack.write(bkey, &to_a);
    b.guest.stack.shutdown(bkey, SHUTDOWN_SEND);
    until(
        &mut a,
        &mut b,
        "both ends read everything",
        LONG,
        |ga, gb| {
            let (ca, cb) = (ga.stack.conn(key), gb.stack.conn(bkey));
            ca.peer_shut & SHUTDOWN_SEND != 0 && cb.peer_shut & SHUTDOWN_SEND != 0
        },
    );
    assert!(b.guest.stack.conn(bkey).read == to_b, "A to B differs");
    assert!(a.guest.stack.conn(key).read == to_a, "B to A differs");
    until(&mut a, &mut b, "both closed", LONG, |ga, gb| {
        ga.stack.conn(key).closed && gb.stack.conn(bkey).closed
    });
    let (va, vb) = (a.stop(), b.stop());
    for v in [&va, &vb] {
        let s = v.device().engine().stats();
        assert_eq!(s.guest_bytes_lost, 0);
        assert_eq!(v.device().engine().connections(), 0);
    }
    assert_eq!(va.device().engine().stats().sibling_connects, 1);
    assert_eq!(vb.device().engine().stats().sibling_accepts, 1);
}

fn a_connect_to_a_port_the_sibling_does_not_listen_on_is_reset_at_once(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    let key = a.guest.stack.connect(6000);
    let start = Instant::now();
    until(&mut a, &mut b, "reset", LONG, |ga, _| {
        ga.stack.conn(key).reset
    });
    assert!(!a.guest.stack.conn(key).established);
    // The sibling's guest answered the REQUEST with an RST, at once: no timeout ran out.
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let (va, _) = (a.stop(), b.stop());
    assert_eq!(va.device().engine().stats().sibling_refused, 1);
}

fn a_connect_to_a_cid_outside_the_group_is_reset_at_once(rt: Runtime) {
    let siblings = Siblings::new([
        (A, vec!["one".to_string()]),
        (B, vec!["two".to_string()]),
        (5, vec!["one".to_string()]),
    ])
    .unwrap();
    // B is in another group, and CID 9 is nobody: both are unreachable from A.
    let mut a = Rig::start_sibling(rt, Config::new(A), &siblings, B);
    let mut b = Rig::start_sibling(rt, Config::new(B), &siblings, A);
    b.guest.stack.listen(5000);
    let key = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "reset", LONG, |ga, _| {
        ga.stack.conn(key).reset
    });
    a.guest.stack.peer_cid = 9;
    let key = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "reset", LONG, |ga, _| {
        ga.stack.conn(key).reset
    });
    assert!(b.guest.stack.conns.is_empty(), "B never heard of it");
    let va = a.stop();
    assert_eq!(va.device().engine().stats().connect_failed, 2);
    drop(b.stop());
}

fn a_receiver_without_rx_buffers_holds_the_sender_back_and_loses_nothing(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen(5000);
    let key = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "connected", LONG, |ga, gb| {
        ga.stack.conn(key).established && !gb.stack.conns.is_empty()
    });
    let bkey = *b.guest.stack.conns.keys().next().unwrap();
    // B's driver stops posting rx buffers; A sends far more than every buffer on the way.
    b.guest.rx_paused = true;
    let data = pattern(3, 8_000_000);
    a.guest.stack.write(key, &data);
    let stalled = Instant::now();
    while stalled.elapsed() < Duration::from_millis(500) {
        a.step();
        b.step();
        std::thread::sleep(Duration::from_micros(500));
    }
    let sent = a.guest.stack.conn(key).tx_cnt as usize;
    assert!(
        sent < data.len(),
        "A sent all {sent} bytes into a stalled receiver"
    );
    b.guest.rx_paused = false;
    a.guest.stack.shutdown(key, SHUTDOWN_SEND);
    until(&mut a, &mut b, "B read everything", LONG, |_, gb| {
        gb.stack.conn(bkey).peer_shut & SHUTDOWN_SEND != 0
    });
    assert!(b.guest.stack.conn(bkey).read == data, "A to B differs");
    let (va, vb) = (a.stop(), b.stop());
    assert_eq!(va.device().engine().stats().guest_bytes_lost, 0);
    assert_eq!(vb.device().engine().stats().guest_bytes_lost, 0);
}

fn a_sibling_reset_resets_the_other_guest_at_once(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen(5000);
    a.guest.stack.listen(7000);
    let out = a.guest.stack.connect(5000);
    let inbound = b.guest.stack.connect(7000);
    until(&mut a, &mut b, "connected", LONG, |ga, gb| {
        ga.stack.conn(out).established && gb.stack.conn(inbound).established
    });
    // Data in flight from A, then B's driver resets its device.
    a.guest.stack.write(out, &pattern(4, 100_000));
    for _ in 0..20 {
        a.step();
        b.step();
    }
    b.reset_device();
    let start = Instant::now();
    until(&mut a, &mut b, "A reset", LONG, |ga, _| {
        ga.stack.conns.values().all(|c| c.reset)
    });
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // B serves again: a new connection between the two works.
    b.guest.stack.listen(5000);
    let again = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "connected again", LONG, |ga, _| {
        ga.stack.conn(again).established
    });
    // The idle connection can only have been reset by B's departure notice (its socket's
    // end of file alone would have been a half-close); the busy one may have seen its peer
    // socket reset first.
    let va = a.stop();
    let resets = va.device().engine().stats().sibling_resets;
    assert!((1..=2).contains(&resets), "{resets} sibling resets");
    drop(b.stop());
}

fn a_sibling_that_stops_resets_the_other_guest_at_once(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen(5000);
    let out = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "connected", LONG, |ga, _| {
        ga.stack.conn(out).established
    });
    drop(b.stop());
    a.until("A reset", LONG, |g| g.stack.conn(out).reset);
    // And a connect to it now fails at once.
    let key = a.guest.stack.connect(5000);
    a.until("refused", LONG, |g| g.stack.conn(key).reset);
    drop(a.stop());
}

fn a_guest_that_closes_tells_its_sibling_it_takes_no_more(rt: Runtime) {
    // vsock_test's "client close": once the closing side's end shows, the other's sends must
    // fail at once, as with a Linux peer, whose close shuts both directions in one packet.
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen(5000);
    let key = a.guest.stack.connect(5000);
    until(&mut a, &mut b, "connected", LONG, |ga, gb| {
        ga.stack.conn(key).established && !gb.stack.conns.is_empty()
    });
    let bkey = *b.guest.stack.conns.keys().next().unwrap();
    b.guest.stack.write(bkey, b"x");
    b.guest.stack.close(bkey);
    until(&mut a, &mut b, "A saw the end", LONG, |ga, _| {
        ga.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    let c = a.guest.stack.conn(key);
    assert_ne!(c.peer_shut & vsock_core::wire::SHUTDOWN_RCV, 0, "{c:?}");
    assert_eq!(c.read, b"x");
    let (va, vb) = (a.stop(), b.stop());
    assert_eq!(va.device().engine().stats().guest_bytes_lost, 0);
    assert_eq!(vb.device().engine().stats().guest_bytes_lost, 0);
}

fn a_misbehaving_flooded_vm_never_holds_another_back(rt: Runtime) {
    // Isolation: VM A's guest posts no rx buffers while a host peer streams into it, sends a
    // flood of packets for no connection, and its listener takes a storm of host clients
    // that never send a line; mid-way it takes all that at once, and then its driver resets
    // the device. All the while VM B's guest moves 4 MiB through a host echo service, intact.
    let (mut a, mut b) = pair(rt);
    // Both guests talk to the host here.
    a.guest.stack.peer_cid = vsock_core::wire::HOST_CID;
    b.guest.stack.peer_cid = vsock_core::wire::HOST_CID;
    let service = UnixListener::bind(b.port_path(1234)).unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = service.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let a_service = UnixListener::bind(a.port_path(77)).unwrap();
    let streamer = std::thread::spawn(move || {
        let (mut s, _) = a_service.accept().unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Until the socket stays full: the guest reads nothing.
        while s.write_all(&[7u8; 65536]).is_ok() {}
    });
    let stuck = a.guest.stack.connect(77);
    until(&mut a, &mut b, "A connected", LONG, |ga, _| {
        ga.stack.conn(stuck).established
    });
    a.guest.rx_paused = true;
    let clients: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(a.listener()).unwrap())
        .collect();
    for i in 0..5000u32 {
        let mut h = vsock_core::testing::guest_pkt(
            vsock_core::wire::Op::CreditRequest,
            20_000 + i,
            30_000 + i,
            0,
            0,
            65536,
            0,
        );
        h.src_cid = A.into();
        a.guest.stack.send_raw(h, Vec::new());
    }

    let key = b.guest.stack.connect(1234);
    let data = pattern(9, 4 << 20);
    until(&mut a, &mut b, "B connected", LONG, |_, gb| {
        gb.stack.conn(key).established
    });
    b.guest.stack.write(key, &data);
    b.guest.stack.shutdown(key, SHUTDOWN_SEND);
    let mut resumed = false;
    until(&mut a, &mut b, "B's echo", LONG, |ga, gb| {
        if !resumed && gb.stack.conn(key).read.len() > 1 << 20 {
            // A's guest takes its flood of RSTs and the stream mid-way through B's transfer.
            resumed = true;
            ga.rx_paused = false;
        }
        gb.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    a.reset_device();
    for _ in 0..50 {
        a.step();
        b.step();
    }
    echo.join().unwrap();
    assert!(b.guest.stack.conn(key).read == data, "B's echo differs");
    drop(clients);
    let (va, vb) = (a.stop(), b.stop());
    streamer.join().unwrap();
    let sa = va.device().engine().stats();
    assert!(
        sa.unknown_connection >= 5000 || sa.rst_queue_full > 0,
        "{sa:?}"
    );
    let sb = vb.device().engine().stats();
    assert_eq!(sb.guest_bytes_lost, 0);
    // None of A's 5000 reached B (a late packet of B's own closed connection may count).
    assert!(sb.unknown_connection < 5, "{sb:?}");
}

fn seqpacket_messages_between_two_guests_keep_their_boundaries(rt: Runtime) {
    let (mut a, mut b) = pair(rt);
    b.guest.stack.listen_seqpacket(5000);
    let key = a.guest.stack.connect_seqpacket(5000);
    until(&mut a, &mut b, "connected", LONG, |ga, gb| {
        ga.stack.conn(key).established && !gb.stack.conns.is_empty()
    });
    let bkey = *b.guest.stack.conns.keys().next().unwrap();
    let sizes = [1usize, 3732, 3733, 65536, 65537, 262_144, 7, 1];
    let messages: Vec<Vec<u8>> = (0..200)
        .map(|i| pattern(i as u64, sizes[i % sizes.len()]))
        .collect();
    for m in &messages {
        assert!(a.guest.stack.send_message(key, m, false));
    }
    until(&mut a, &mut b, "every message", LONG, |_, gb| {
        gb.stack.conn(bkey).messages_read.len() >= messages.len()
    });
    let got: Vec<Vec<u8>> = b
        .guest
        .stack
        .conn(bkey)
        .messages_read
        .iter()
        .map(|(m, _)| m.clone())
        .collect();
    assert!(got == messages, "messages differ");
    let (va, vb) = (a.stop(), b.stop());
    assert_eq!(va.device().engine().stats().messages_to_host, 200);
    assert_eq!(vb.device().engine().stats().messages_to_guest, 200);
}

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod mio {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Mio) } )*
        }
        mod tokio {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Tokio) } )*
        }
        mod smol {
            $( #[test] fn $scenario() { super::$scenario(super::Runtime::Smol) } )*
        }
    };
}

conformance!(
    a_stream_between_two_guests_carries_every_byte_both_ways,
    a_connect_to_a_port_the_sibling_does_not_listen_on_is_reset_at_once,
    a_connect_to_a_cid_outside_the_group_is_reset_at_once,
    a_receiver_without_rx_buffers_holds_the_sender_back_and_loses_nothing,
    a_sibling_reset_resets_the_other_guest_at_once,
    a_sibling_that_stops_resets_the_other_guest_at_once,
    a_guest_that_closes_tells_its_sibling_it_takes_no_more,
    a_misbehaving_flooded_vm_never_holds_another_back,
    seqpacket_messages_between_two_guests_keep_their_boundaries,
);
