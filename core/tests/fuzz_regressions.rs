//! Regression tests for what the `engine` fuzz target (fuzz/) found, one per finding, each the
//! minimized input written out as direct engine calls.

use vsock_core::{Action, Config, Engine, HostEvent, Instant, LineRead};

fn drain(e: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| e.poll_action()).collect()
}

/// A host client refused while still sending its CONNECT line never had ports, yet
/// `conn_ports` reported `(0, 0)` for it until its socket was closed (it only checked that the
/// connection was no longer reading its line). The recorder names a connection by these ports.
#[test]
fn refused_host_client_has_no_ports() {
    let now = Instant::from_secs(1);
    let mut e = Engine::new(Config::new(3), now).unwrap();
    let conn = e.handle_accept(now).unwrap();
    assert_eq!(e.conn_ports(conn), None);
    e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
    drain(&mut e);
    // The fuzzer's bytes: not a CONNECT line.
    e.handle_connect_line(now, conn, LineRead::Data(b"uM\0"))
        .unwrap();
    assert_eq!(e.conn_ports(conn), None, "a refused client has no ports");
    assert!(drain(&mut e).contains(&Action::Close { conn }));

    // A client whose line was complete has its ports, until its close.
    let conn = e.handle_accept(now).unwrap();
    e.handle_host_event(now, conn, HostEvent::Readable).unwrap();
    drain(&mut e);
    e.handle_connect_line(now, conn, LineRead::Data(b"CONNECT 5000\n"))
        .unwrap();
    let (guest_port, _) = e.conn_ports(conn).expect("ports once the line is complete");
    assert_eq!(guest_port, 5000);
}
