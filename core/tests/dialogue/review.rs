//! Rules from review: nothing changes before the guest has seen it, and only a flush's own
//! result moves bytes.

use crate::helpers::*;

#[test]
fn response_before_the_request_reached_the_guest_is_refused() {
    let mut e = engine();
    let h = client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), h, LineRead::Data(b"CONNECT 7\n")),
        Ok(())
    );
    // The REQUEST is owed but not delivered; the port it will carry is the first one.
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Response, 7, HPF, 0, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.stats().unexpected_response, 1);
    // The connection is reset: the guest gets an RST, never the stale REQUEST, and the
    // client its close.
    assert_eq!(expect_rx(&mut e, ms(3), Op::Rst).dst_port.get(), 7);
    expect_actions(&mut e, &[close(h)]);
    expect_no_rx(&mut e, ms(3));
}

#[test]
fn data_before_the_response_reached_the_guest_is_refused() {
    let mut e = engine();
    tx(
        &mut e,
        ms(0),
        guest_pkt(Op::Request, 1000, 80, 0, 0, GUEST_BUF, 0),
    );
    let conn = match e.poll_action() {
        Some(Action::Connect { conn, .. }) => conn,
        other => panic!("expected Connect, got {other:?}"),
    };
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Connected),
        Ok(())
    );
    // The RESPONSE is owed but not delivered: the guest cannot know it may send.
    // It is refused without reaching the socket.
    tx(
        &mut e,
        ms(2),
        guest_pkt(Op::Rw, 1000, 80, 10, 0, GUEST_BUF, 0),
    );
    assert_eq!(e.stats().data_after_shutdown, 1);
    assert_eq!(expect_rx(&mut e, ms(3), Op::Rst).dst_port.get(), 1000);
}

#[test]
fn a_write_result_without_a_flush_is_refused_and_changes_nothing() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    let payload = [5u8; 100];
    // The socket takes 40 bytes; 60 wait in the buffer, and no Flush is out yet.
    tx_data(
        &mut e,
        ms(1),
        guest_pkt(Op::Rw, 1000, 80, 100, 0, GUEST_BUF, 0),
        &payload,
        Io::Done(40),
    );
    assert_eq!(
        e.handle_host_write(ms(2), conn, Io::Done(60)),
        Err(ConnError::WrongState)
    );
    assert_eq!(flush_bytes(&e, conn).len(), 60, "the buffer is untouched");
    // Once writable, the Flush goes out and its result is taken, once.
    assert_eq!(
        e.handle_host_event(ms(3), conn, HostEvent::Writable),
        Ok(())
    );
    let acts = actions(&mut e);
    assert!(acts.contains(&Action::Flush { conn }), "{acts:?}");
    assert_eq!(e.handle_host_write(ms(4), conn, Io::Done(60)), Ok(()));
    assert_eq!(
        e.handle_host_write(ms(5), conn, Io::Done(60)),
        Err(ConnError::WrongState),
        "a second report of the same write"
    );
    assert_eq!(e.conn_stats(conn).unwrap().host_written, 100);
}

#[test]
fn reset_connection_sends_rst_and_closes() {
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(e.reset_connection(ms(1), conn), Ok(()));
    assert_eq!(e.stats().resets_by_caller, 1);
    expect_actions(&mut e, &[close(conn)]);
    let rst = expect_rx(&mut e, ms(2), Op::Rst);
    assert_eq!((rst.src_port.get(), rst.dst_port.get()), (80, 1000));
    assert_eq!(e.reset_connection(ms(3), conn), Err(ConnError::Stale));
}

#[test]
fn end_of_file_behind_a_short_read_is_not_missed() {
    // An edge-triggered caller reports the socket readable once, for data and the peer's
    // shutdown together. The short read that takes the data must not be taken as "drained".
    let mut e = engine();
    let conn = guest_connected(&mut e, ms(0), 1000, 80, GUEST_BUF);
    assert_eq!(
        e.handle_host_event(ms(1), conn, HostEvent::Readable),
        Ok(())
    );
    let h = read(&mut e, ms(1), 4052, conn, 4052, 5);
    assert_eq!(h.len.get(), 5);
    // No new event comes; the engine reads again and finds the end of file.
    let h = read(&mut e, ms(1), 4052, conn, 4052, 0);
    assert_eq!(h.op.get(), Op::Shutdown.to_u16());
    assert_eq!(h.flags.get(), SHUTDOWN_SEND);
}
