//! Addressing.

use crate::helpers::*;

#[test]
fn wrong_cid_is_dropped_and_counted() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    // Another guest's RST and REQUEST, and packets the guest addressed to itself.
    for (src, dst, op) in [
        (4, HOST_CID, Op::Rst),
        (4, HOST_CID, Op::Request),
        (GUEST_CID, GUEST_CID, Op::Request),
        (GUEST_CID, GUEST_CID, Op::CreditRequest),
    ] {
        let mut h = guest_pkt(op, 1000, 80, 0, 0, GUEST_BUF, 0);
        h.src_cid = src.into();
        h.dst_cid = dst.into();
        tx(&mut e, ms(1), h);
        expect_nothing(&mut e, ms(1));
    }
    assert_eq!(e.conn_state(conn), Some(ConnState::Established));
    assert_stats!(e, tx_packets: 5, guest_connects: 1, established: 1, rx_packets: 1,
        wrong_cid: 4);
}

#[test]
fn shutdown_rcv_shuts_the_socket_read_side_and_stops_reads() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    tx(
        &mut e,
        ms(1),
        guest_pkt(Op::Shutdown, 1000, 80, 0, SHUTDOWN_RCV, GUEST_BUF, 0),
    );
    expect_actions(
        &mut e,
        &[
            Action::Shutdown {
                conn,
                direction: Direction::Read,
            },
            interest(conn, false, false),
        ],
    );
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    expect_nothing(&mut e, ms(2));
    // Guest to host still flows.
    assert!(tx_data(
        &mut e,
        ms(3),
        guest_pkt(Op::Rw, 1000, 80, 2, 0, GUEST_BUF, 0),
        b"hi",
        Io::Done(2),
    ));
    expect_nothing(&mut e, ms(3));
    assert_stats!(e, tx_packets: 3, guest_connects: 1, established: 1, rx_packets: 1,
        tx_bytes: 2, tx_direct_bytes: 2);
}
