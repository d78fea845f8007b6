//! Opening: CONNECT lines that fail.

use crate::helpers::*;

/// A host client whose line read reports `read`: the engine must close it, tell the guest
/// nothing and count it once.
fn line_refused(read: LineRead<'_>) -> Engine {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    assert_eq!(e.handle_connect_line(ms(1), conn, read), Ok(()));
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(1));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Err(ConnError::Stale)
    );
    e
}

#[test]
fn connect_line_garbage_closes_client() {
    let e = line_refused(LineRead::Data(b"GET / HTTP/1.1\r\n"));
    assert_stats!(e, host_accepts: 1, connect_line_garbage: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_bad_port_closes_client() {
    let e = line_refused(LineRead::Data(b"CONNECT 4294967295\n"));
    assert_stats!(e, host_accepts: 1, connect_line_bad_port: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_eof_closes_client() {
    let e = line_refused(LineRead::Eof);
    assert_stats!(e, host_accepts: 1, connect_line_eof: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_read_error_closes_client() {
    let e = line_refused(LineRead::Error(SocketError(ECONNRESET)));
    assert_stats!(e, host_accepts: 1, host_errors: 1, closed: 1, stale_events: 1);
}

#[test]
fn connect_line_too_long_closes_client() {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    let mut line = b"CONNECT ".to_vec();
    line.resize(CONNECT_LINE_MAX, b'1');
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(&line[..40])),
        Ok(())
    );
    line_would_block(&mut e, ms(1), conn, CONNECT_LINE_MAX - 40);
    assert_eq!(
        e.handle_host_event(ms(2), conn, HostEvent::Readable),
        Ok(())
    );
    // Never asked for more than fits.
    expect_actions(
        &mut e,
        &[
            Action::ReadConnectLine {
                conn,
                max: CONNECT_LINE_MAX - 40,
            },
            interest(conn, false, false),
        ],
    );
    assert_eq!(
        e.handle_connect_line(ms(2), conn, LineRead::Data(&line[40..])),
        Ok(())
    );
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(2));
    assert_eq!(e.connections(), 0);
    assert_stats!(e, host_accepts: 1, connect_line_too_long: 1, closed: 1);
}

#[test]
fn connect_line_timeout_closes_client() {
    let mut e = engine();
    let conn = client_reading(&mut e, ms(0));
    assert_eq!(
        e.handle_connect_line(ms(1), conn, LineRead::Data(b"CONNECT 50")),
        Ok(())
    );
    line_would_block(&mut e, ms(1), conn, CONNECT_LINE_MAX - 10);
    assert_eq!(e.poll_timeout(), Some(ms(5000)));
    e.handle_timeout(ms(4999));
    expect_nothing(&mut e, ms(4999));
    e.handle_timeout(ms(5000));
    expect_actions(&mut e, &[close(conn)]);
    expect_nothing(&mut e, ms(5000));
    assert_eq!(e.connections(), 0);
    assert_eq!(e.poll_timeout(), None);
    assert_stats!(e, host_accepts: 1, connect_line_timeout: 1, closed: 1);
}
