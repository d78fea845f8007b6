//! Seqpacket conformance, on every runtime: the Linux guest model's `SOCK_SEQPACKET` sockets
//! over real virtqueues, against real Unix `SOCK_SEQPACKET` sockets on the host. Every
//! message must arrive whole, in order, with its boundary, or the peer must see a reset.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use vsock_core::testing::pattern;
use vsock_core::wire::{SocketType, SHUTDOWN_SEND};
use vsock_core::Config;
use vsock_tests::{read_seqpacket, Rig, Runtime};

const LONG: Duration = Duration::from_secs(30);
/// The message sizes every direction is tried with: one byte, a Linux rx buffer's payload
/// room and one more, a largest packet and one more, and the guest's whole buffer.
const SIZES: [usize; 6] = [1, 3732, 3733, 65536, 65537, 262_144];

fn config() -> Config {
    Config::new(vsock_tests::GUEST_CID)
}

/// A seqpacket service at `path`.
fn seq_listener(path: &Path) -> UnixListener {
    vsock_host::bind_listener(path, SocketType::SeqPacket).unwrap()
}

/// Gives a host seqpacket socket room for a message of the guest's whole buffer.
fn room_for_big_messages(s: &UnixStream) {
    socket2::SockRef::from(s)
        .set_send_buffer_size(vsock_host::seqpacket_send_buffer(300_000))
        .unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
}

/// One message from a host seqpacket socket (`None` at end of file).
fn recv_message(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 400_000];
    let n = read_seqpacket(s, &mut buf).unwrap();
    (n > 0).then(|| buf[..n].to_vec())
}

fn send_message(s: &mut UnixStream, msg: &[u8]) {
    assert_eq!(
        s.write(msg).unwrap(),
        msg.len(),
        "a seqpacket send is whole"
    );
}

fn seqpacket_messages_of_every_size_both_ways(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(1234));
    // The host echoes each message back, then shuts its side at end of file.
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        room_for_big_messages(&s);
        let mut sizes = Vec::new();
        while let Some(msg) = recv_message(&mut s) {
            sizes.push(msg.len());
            send_message(&mut s, &msg);
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        sizes
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    let messages: Vec<Vec<u8>> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &n)| pattern(i as u64, n))
        .collect();
    for m in &messages {
        assert!(rig.guest.stack.send_message(key, m, false));
    }
    // One byte over the host's buffer is refused by the guest itself, as Linux does (ENOMEM).
    assert!(!rig.guest.stack.send_message(key, &[0; 262_145], false));
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("echo done", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    assert_eq!(
        host.join().unwrap(),
        SIZES,
        "guest to host, boundaries kept"
    );
    let got: Vec<Vec<u8>> = rig
        .guest
        .stack
        .conn(key)
        .messages_read
        .iter()
        .map(|(m, _)| m.clone())
        .collect();
    assert!(
        got == messages,
        "host to guest: every message whole and in order"
    );
    assert_eq!(rig.guest.stack.credit_violations, 0);
    rig.until("closed", LONG, |g| g.stack.conn(key).closed);
    let vsock = rig.stop();
    let s = vsock.device().engine().stats();
    assert_eq!((s.messages_to_host, s.messages_to_guest), (6, 6));
    assert_eq!(vsock.device().engine().connections(), 0);
}

fn many_small_messages_keep_their_boundaries(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(1234));
    let count = 2000;
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        room_for_big_messages(&s);
        // Back to back: the host writes all of its messages before reading any.
        for i in 0..count {
            send_message(&mut s, &pattern(i, (i % 100 + 1) as usize));
        }
        let mut got = Vec::new();
        while let Some(m) = recv_message(&mut s) {
            got.push(m);
        }
        got
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    for i in 0..count {
        assert!(rig
            .guest
            .stack
            .send_message(key, &pattern(i + 7, (i % 57 + 1) as usize), false));
    }
    rig.until("the host's messages", LONG, |g| {
        g.stack.conn(key).messages_read.len() == count as usize
    });
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.until("the host read everything", LONG, |_| host.is_finished());
    let got = host.join().unwrap();
    assert_eq!(got.len(), count as usize);
    for (i, m) in got.iter().enumerate() {
        assert!(
            *m == pattern(i as u64 + 7, i % 57 + 1),
            "guest message {i} whole"
        );
    }
    for (i, (m, eor)) in rig.guest.stack.conn(key).messages_read.iter().enumerate() {
        assert!(
            *m == pattern(i as u64, i % 100 + 1),
            "host message {i} whole"
        );
        assert!(!eor, "Unix sockets carry no records");
    }
}

fn the_other_socket_type_at_a_port_is_reset(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    // A stream service where the guest connects seqpacket, and the reverse.
    let _stream = UnixListener::bind(rig.port_path(80)).unwrap();
    let _seq = seq_listener(&rig.port_path(81));
    let a = rig.guest.stack.connect_seqpacket(80);
    let b = rig.guest.stack.connect(81);
    rig.until("both reset", LONG, |g| {
        g.stack.conn(a).rst_received && g.stack.conn(b).rst_received
    });
    assert!(!rig.guest.stack.conn(a).established);
    assert!(!rig.guest.stack.conn(b).established);
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().stats().connect_failed, 2);
}

fn host_client_connects_through_the_seqpacket_listener(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen_seqpacket(5000);
    let path = {
        let mut p = rig.listener().into_os_string();
        p.push("_seqpacket");
        std::path::PathBuf::from(p)
    };
    let client = std::thread::spawn(move || {
        let mut c = vsock_host::connect_unix(&path, SocketType::SeqPacket).unwrap();
        c.set_nonblocking(false).unwrap();
        room_for_big_messages(&c);
        // A message sent right behind the line waits in the socket until the OK went.
        send_message(&mut c, b"CONNECT 5000\n");
        send_message(&mut c, b"first");
        let ok = recv_message(&mut c).unwrap();
        let ok = String::from_utf8(ok).unwrap();
        assert!(
            ok.starts_with("OK ") && ok.ends_with('\n'),
            "one OK message: {ok:?}"
        );
        for &n in &SIZES[..5] {
            send_message(&mut c, &pattern(n as u64, n));
        }
        // The guest echoes each message.
        let mut got = Vec::new();
        for _ in 0..6 {
            got.push(recv_message(&mut c).unwrap());
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            recv_message(&mut c),
            None,
            "end of file after the guest's shutdown"
        );
        got
    });
    let key = loop {
        rig.step();
        if let Some(k) = rig.guest.stack.conns.keys().copied().find(|k| k.0 == 5000) {
            break k;
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    assert!(rig.guest.stack.conn(key).seqpacket);
    let mut echoed = 0;
    rig.until("six messages echoed", LONG, |g| {
        while let Some((m, _)) = g.stack.conn(key).messages_read.get(echoed).cloned() {
            g.stack.send_message(key, &m, false);
            echoed += 1;
        }
        echoed == 6
    });
    rig.until("the client's end of file", LONG, |g| {
        g.stack.conn(key).peer_shut & SHUTDOWN_SEND != 0
    });
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    rig.step();
    let got = client.join().unwrap();
    assert_eq!(got[0], b"first");
    for (i, &n) in SIZES[..5].iter().enumerate() {
        assert!(
            got[i + 1] == pattern(n as u64, n),
            "message of {n} bytes whole"
        );
    }
}

fn a_host_message_the_guest_can_never_take_resets_both_ends(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(1234));
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        room_for_big_messages(&s);
        send_message(&mut s, &[1; 100]);
        // One byte more than the guest's whole buffer.
        send_message(&mut s, &vec![2; 262_145]);
        // The device closes this socket: end of file or a reset.
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected the socket closed, got {other:?}"),
        }
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("reset", LONG, |g| g.stack.conn(key).rst_received);
    host.join().unwrap();
    let c = rig.guest.stack.conn(key);
    assert_eq!(c.messages_read.len(), 1, "the message before it arrived");
    assert!(c.partial.is_empty(), "nothing of the big one was delivered");
    let vsock = rig.stop();
    assert_eq!(
        vsock.device().engine().stats().seqpacket_oversize_from_host,
        1
    );
}

fn a_stalled_host_reader_loses_no_message(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(1234));
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let count = 3000u64;
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        // Not reading until the guest has sent everything it can.
        wait.recv().unwrap();
        let mut got = Vec::new();
        while let Some(m) = recv_message(&mut s) {
            got.push(m);
        }
        got
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    for i in 0..count {
        rig.guest
            .stack
            .send_message(key, &pattern(i, (i % 1500 + 1) as usize), false);
    }
    rig.guest.stack.shutdown(key, SHUTDOWN_SEND);
    // The host socket fills; the device holds what it refused, within the credit.
    rig.until("the guest ran out of credit or sent it all", LONG, |g| {
        let c = g.stack.conn(key);
        c.to_send.is_empty() || c.credit() == 0
    });
    go.send(()).unwrap();
    rig.until("the host read everything", LONG, |_| host.is_finished());
    let got = host.join().unwrap();
    assert_eq!(got.len(), count as usize);
    for (i, m) in got.iter().enumerate() {
        assert!(*m == pattern(i as u64, i % 1500 + 1), "message {i} whole");
    }
    let vsock = rig.stop();
    assert!(
        vsock.device().engine().stats().tx_buffered_bytes > 0,
        "the socket refused messages, which waited in the connection buffer"
    );
}

/// A hundred seqpacket connections opened, used and closed, from each side in turn, leave no
/// descriptor behind.
fn connect_close_cycles_leak_no_descriptor(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(90));
    listener.set_nonblocking(true).unwrap();
    rig.guest.stack.listen_seqpacket(91);
    let mut client_path = rig.listener().into_os_string();
    client_path.push("_seqpacket");
    let client_path = std::path::PathBuf::from(client_path);
    let cycle = |rig: &mut Rig, i: u64| {
        // The guest connects, sends a message, closes; the host reads it and closes.
        let key = rig.guest.stack.connect_seqpacket(90);
        rig.until("connected", LONG, |g| g.stack.conn(key).established);
        rig.guest.stack.send_message(key, &pattern(i, 100), false);
        rig.guest.stack.close(key);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(_) => rig.step(),
            }
        };
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let n = loop {
            match read_seqpacket(&mut s, &mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => rig.step(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(buf[..n], pattern(i, 100)[..]);
        drop(s);
        rig.until("closed", LONG, |g| g.stack.conn(key).closed);
        // A host client of the seqpacket listener, closed at once after its OK.
        let mut c = vsock_host::connect_unix(&client_path, SocketType::SeqPacket).unwrap();
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        send_message(&mut c, b"CONNECT 91\n");
        let ok = loop {
            match read_seqpacket(&mut c, &mut buf) {
                Ok(n) => break n,
                Err(_) => rig.step(),
            }
        };
        assert!(buf[..ok].starts_with(b"OK "));
        drop(c);
        // The guest hears of the end (a hang-up: both directions at once, so a Linux guest
        // closes its side itself), and its socket closes.
        let key = loop {
            let open = rig
                .guest
                .stack
                .conns
                .iter()
                .find(|(k, c)| k.0 == 91 && !c.closed);
            match open {
                Some((k, c)) if c.peer_shut & SHUTDOWN_SEND != 0 => break Some(*k),
                Some(_) => rig.step(),
                None => break None,
            }
        };
        if let Some(key) = key {
            rig.guest.stack.close(key);
            rig.until("closed", LONG, |g| g.stack.conn(key).closed);
        }
        rig.guest.stack.conns.retain(|k, _| k.0 != 91);
    };
    for i in 0..=100 {
        cycle(&mut rig, i);
    }
    let vsock = rig.stop();
    assert_eq!(vsock.device().engine().connections(), 0);
    // Every socket the device opened or accepted was closed: none is left in its table. (The
    // process's descriptor count would be the wrong measure here: other tests of this binary
    // open and close sockets on threads of their own meanwhile.)
    let host = vsock.host();
    assert_eq!(host.len(), 0, "sockets still open: {:?}", host.stats());
    assert_eq!(host.stats().closes, 202, "{:?}", host.stats());
}

/// A host service that reads one request, replies and closes with the guest's second request
/// unread: the guest gets the reply, then a reset.
fn a_reply_then_close_with_messages_unread_reaches_the_guest(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    let listener = seq_listener(&rig.port_path(1234));
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        let first = recv_message(&mut s).unwrap();
        // Wait for the second request to be queued, unread, before replying and closing.
        std::thread::sleep(Duration::from_millis(100));
        send_message(&mut s, b"bye");
        first
    });
    let key = rig.guest.stack.connect_seqpacket(1234);
    rig.until("connected", LONG, |g| g.stack.conn(key).established);
    rig.guest.stack.send_message(key, b"one", false);
    rig.guest.stack.send_message(key, b"two", false);
    rig.until("the host closed", LONG, |_| host.is_finished());
    assert_eq!(host.join().unwrap(), b"one");
    rig.until("reset", LONG, |g| g.stack.conn(key).rst_received);
    let c = rig.guest.stack.conn(key);
    assert_eq!(
        c.messages_read,
        [(b"bye".to_vec(), false)],
        "the reply, then the reset"
    );
}

/// A seqpacket `CONNECT` message longer than a line may be, though it starts with a good line,
/// is refused.
fn a_long_connect_message_is_refused(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen_seqpacket(5000);
    let mut path = rig.listener().into_os_string();
    path.push("_seqpacket");
    let client = std::thread::spawn(move || {
        let mut c = vsock_host::connect_unix(Path::new(&path), SocketType::SeqPacket).unwrap();
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(LONG)).unwrap();
        let mut msg = b"CONNECT 0000000000000000000000000000000000000000000000005000\n".to_vec();
        assert!(msg.len() <= 64);
        msg.extend_from_slice(&[b'x'; 100]);
        send_message(&mut c, &msg);
        recv_message(&mut c)
    });
    rig.until("refused", LONG, |_| client.is_finished());
    assert_eq!(client.join().unwrap(), None, "closed without an OK");
    let vsock = rig.stop();
    let s = vsock.device().engine().stats();
    assert_eq!(s.connect_line_too_long + s.connect_line_garbage, 1);
}

/// Host clients that send their line and a message and shut down at once, before the device
/// looked: each still gets its OK, and the guest the message, then end of file. (A
/// non-blocking seqpacket read can report end of file with the line or message queued, when
/// the shutdown lands between the kernel's two looks; the device reads again.)
fn a_client_that_sends_and_shuts_down_at_once_is_heard(rt: Runtime) {
    let mut rig = Rig::start(rt, config());
    rig.guest.stack.listen_seqpacket(5000);
    let mut path = rig.listener().into_os_string();
    path.push("_seqpacket");
    let path = std::path::PathBuf::from(path);
    for i in 0..20u64 {
        let mut c = vsock_host::connect_unix(&path, SocketType::SeqPacket).unwrap();
        c.set_nonblocking(false).unwrap();
        send_message(&mut c, b"CONNECT 5000\n");
        send_message(&mut c, &pattern(i, 50));
        c.shutdown(std::net::Shutdown::Write).unwrap();
        rig.until("the message and the end", LONG, |g| {
            g.stack
                .conns
                .values()
                .any(|c| !c.closed && c.peer_shut & SHUTDOWN_SEND != 0)
        });
        let key = *rig
            .guest
            .stack
            .conns
            .iter()
            .find(|(_, c)| !c.closed)
            .unwrap()
            .0;
        let conn = rig.guest.stack.conn(key);
        assert_eq!(conn.messages_read, [(pattern(i, 50), false)], "client {i}");
        rig.guest.stack.close(key);
        rig.until("closed", LONG, |g| g.stack.conn(key).closed);
        c.set_read_timeout(Some(LONG)).unwrap();
        let ok = recv_message(&mut c).unwrap();
        assert!(ok.starts_with(b"OK "), "client {i}: {ok:?}");
        assert_eq!(recv_message(&mut c), None, "client {i}: then end of file");
    }
}

macro_rules! seqpacket {
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

seqpacket!(
    seqpacket_messages_of_every_size_both_ways,
    many_small_messages_keep_their_boundaries,
    the_other_socket_type_at_a_port_is_reset,
    host_client_connects_through_the_seqpacket_listener,
    a_host_message_the_guest_can_never_take_resets_both_ends,
    a_stalled_host_reader_loses_no_message,
    connect_close_cycles_leak_no_descriptor,
    a_reply_then_close_with_messages_unread_reaches_the_guest,
    a_long_connect_message_is_refused,
    a_client_that_sends_and_shuts_down_at_once_is_heard,
);
