//! Live counters: every VM's engine, device and host counters and its connections, on demand
//! while the daemon runs, as JSON and in Prometheus's text format.
//!
//! `--stats PATH` binds a Unix stream socket, chosen over a file rewritten periodically:
//! - it answers on demand, so an idle daemon does no work and never wakes;
//! - every answer is current, and is never a half-written file.
//!
//! Each VM's loop builds its own snapshot between two rounds of its work
//! ([`vsock_host::Siblings::inspect_all`]), so nothing it owns is shared under a lock.
//!
//! A client sends one request and reads the answer up to the end of file:
//! - HTTP: `GET /metrics` gives the Prometheus text format, and `GET /` (or `/stats`) gives
//!   JSON, so `curl --unix-socket PATH http://localhost/metrics` works;
//! - a bare line, for `nc -U` and the like: `json` or `metrics`, then a newline.
//!
//! Clients are served one at a time. Each has a second to send its request and to take its
//! answer, so a silent or stalled client holds the others back by a second at most, and the
//! daemon's loops never wait for it.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use tracing::{debug, warn};
use vsock_core::wire::SocketType;
use vsock_core::{ConnState, Counter, Counters, Origin};
use vsock_host::{Siblings, Snapshot};

/// How long a VM's loop has to answer an inspection.
pub const INSPECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a stats client has to send its request, and to take each write of the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest request read: an HTTP request line and its headers.
const MAX_REQUEST: usize = 8192;

/// Every VM's snapshot, or `None` for one that did not answer.
pub type Snapshots = [(u64, Option<Snapshot>)];

/// The snapshots as one JSON document:
/// `{"vms": [{"guest_cid": 3, "answered": true, ..., "connections": [...]}]}`.
pub fn json(vms: &Snapshots) -> String {
    let mut out = String::from("{\"vms\":[");
    for (i, (cid, snapshot)) in vms.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"guest_cid\":{cid},\"answered\":{}",
            snapshot.is_some()
        );
        if let Some(s) = snapshot {
            let _ = write!(
                out,
                ",\"activated\":{},\"buffer_memory\":{}",
                s.activated, s.buffer_memory
            );
            json_counters(&mut out, "engine", s.engine.counters());
            json_counters(&mut out, "device", s.device.counters());
            json_counters(&mut out, "host", s.host.counters());
            out.push_str(",\"connections\":[");
            for (j, c) in s.connections.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push('{');
                json_port(&mut out, "guest_port", c.guest_port);
                out.push(',');
                json_port(&mut out, "host_port", c.host_port);
                let _ = write!(
                    out,
                    ",\"peer_cid\":{},\"type\":\"{}\",\"origin\":\"{}\",\"state\":\"{}\"",
                    c.peer_cid,
                    type_name(c.socket_type),
                    origin_name(c.origin),
                    state_name(c.state)
                );
                for counter in c.stats.counters() {
                    let _ = write!(out, ",\"{}\":{}", counter.name, counter.value);
                }
                out.push('}');
            }
            out.push(']');
        }
        out.push('}');
    }
    out.push_str("]}\n");
    out
}

fn json_counters<'a>(out: &mut String, key: &str, counters: impl Iterator<Item = Counter> + 'a) {
    let _ = write!(out, ",\"{key}\":{{");
    for (i, c) in counters.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "\"{}\":{}", c.name, c.value);
    }
    out.push('}');
}

fn json_port(out: &mut String, key: &str, port: Option<u32>) {
    match port {
        Some(p) => {
            let _ = write!(out, "\"{key}\":{p}");
        }
        None => {
            let _ = write!(out, "\"{key}\":null");
        }
    }
}

/// The socket type's name in the stats: `stream` or `seqpacket`.
fn type_name(t: SocketType) -> &'static str {
    match t {
        SocketType::Stream => "stream",
        SocketType::SeqPacket => "seqpacket",
    }
}

fn origin_name(o: Origin) -> &'static str {
    match o {
        Origin::Guest => "guest",
        Origin::Host => "host",
    }
}

/// The state's name in the stats, in snake case.
pub fn state_name(s: ConnState) -> &'static str {
    match s {
        ConnState::ReadingConnectLine => "reading_connect_line",
        ConnState::HostConnecting => "host_connecting",
        ConnState::GuestConnecting => "guest_connecting",
        ConnState::Established => "established",
        ConnState::GuestSendShut => "guest_send_shut",
        ConnState::HostSendShut => "host_send_shut",
        ConnState::Closing => "closing",
        ConnState::Resetting => "resetting",
        ConnState::Closed => "closed",
    }
}

/// Every state, for the per-state connection counts (zeros included, so a series never
/// vanishes).
const STATES: [ConnState; 9] = [
    ConnState::ReadingConnectLine,
    ConnState::HostConnecting,
    ConnState::GuestConnecting,
    ConnState::Established,
    ConnState::GuestSendShut,
    ConnState::HostSendShut,
    ConnState::Closing,
    ConnState::Resetting,
    ConnState::Closed,
];

/// The snapshots in Prometheus's text exposition format (version 0.0.4). Each counter of
/// the engine, device and host side is `vsock_<part>_<name>_total{guest_cid="N"}`, with its
/// doc comment as help; each connection's counters are `vsock_connection_<name>_total` with
/// its ports, peer, type and origin as labels.
pub fn prometheus(vms: &Snapshots) -> String {
    let mut out = String::new();
    let answered: Vec<(u64, &Snapshot)> = vms
        .iter()
        .filter_map(|(cid, s)| s.as_ref().map(|s| (*cid, s)))
        .collect();

    family(
        &mut out,
        "vsock_vm_up",
        "gauge",
        "Whether the VM's loop answered (1) or not (0).",
    );
    for (cid, s) in vms {
        let _ = writeln!(
            out,
            "vsock_vm_up{{guest_cid=\"{cid}\"}} {}",
            u8::from(s.is_some())
        );
    }
    family(
        &mut out,
        "vsock_vm_activated",
        "gauge",
        "Whether a driver has activated the device (a guest is running).",
    );
    for (cid, s) in &answered {
        let _ = writeln!(
            out,
            "vsock_vm_activated{{guest_cid=\"{cid}\"}} {}",
            u8::from(s.activated)
        );
    }
    family(
        &mut out,
        "vsock_buffer_memory_bytes",
        "gauge",
        "Bytes held in connection buffers, in use or pooled.",
    );
    for (cid, s) in &answered {
        let _ = writeln!(
            out,
            "vsock_buffer_memory_bytes{{guest_cid=\"{cid}\"}} {}",
            s.buffer_memory
        );
    }
    family(
        &mut out,
        "vsock_connections",
        "gauge",
        "Connections in the table, by state.",
    );
    for (cid, s) in &answered {
        for state in STATES {
            let n = s.connections.iter().filter(|c| c.state == state).count();
            let _ = writeln!(
                out,
                "vsock_connections{{guest_cid=\"{cid}\",state=\"{}\"}} {n}",
                state_name(state)
            );
        }
    }

    // Each part's counters: one family per counter, one sample per VM.
    type CountersOf = fn(&Snapshot) -> Vec<Counter>;
    let parts: [(&str, CountersOf); 3] = [
        ("engine", |s| s.engine.counters().collect()),
        ("device", |s| s.device.counters().collect()),
        ("host", |s| s.host.counters().collect()),
    ];
    for (part, counters_of) in parts {
        let per_vm: Vec<(u64, Vec<Counter>)> = answered
            .iter()
            .map(|(cid, s)| (*cid, counters_of(s)))
            .collect();
        let Some((_, first)) = per_vm.first() else {
            continue;
        };
        for (k, counter) in first.iter().enumerate() {
            let name = format!("vsock_{part}_{}_total", counter.name);
            family(&mut out, &name, "counter", &help_text(counter.help));
            for (cid, counters) in &per_vm {
                let _ = writeln!(out, "{name}{{guest_cid=\"{cid}\"}} {}", counters[k].value);
            }
        }
    }

    // Each connection's counters, labelled with who it joins.
    let conn_help: Vec<Counter> = vsock_core::ConnStats::default().counters().collect();
    family(
        &mut out,
        "vsock_connection_info",
        "gauge",
        "One per connection in the table, labelled with its ports, peer, type, origin and state.",
    );
    for (cid, s) in &answered {
        for c in &s.connections {
            let _ = writeln!(
                out,
                "vsock_connection_info{{{},state=\"{}\"}} 1",
                conn_labels(*cid, c),
                state_name(c.state)
            );
        }
    }
    for (k, counter) in conn_help.iter().enumerate() {
        let name = format!("vsock_connection_{}_total", counter.name);
        family(&mut out, &name, "counter", &help_text(counter.help));
        for (cid, s) in &answered {
            for c in &s.connections {
                let value = c.stats.counters().nth(k).map_or(0, |c| c.value);
                let _ = writeln!(out, "{name}{{{}}} {value}", conn_labels(*cid, c));
            }
        }
    }
    out
}

fn conn_labels(cid: u64, c: &vsock_host::ConnSnapshot) -> String {
    let port = |p: Option<u32>| p.map_or(String::new(), |p| p.to_string());
    format!(
        "guest_cid=\"{cid}\",guest_port=\"{}\",host_port=\"{}\",peer_cid=\"{}\",type=\"{}\",origin=\"{}\"",
        port(c.guest_port),
        port(c.host_port),
        c.peer_cid,
        type_name(c.socket_type),
        origin_name(c.origin)
    )
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A doc comment as one line of help: rustdoc links become their text, code marks go,
/// whitespace runs become one space, and the format's escapes are applied.
pub fn help_text(doc: &str) -> String {
    let mut text = String::with_capacity(doc.len());
    let mut rest = doc;
    // `[text](target)` -> `text`
    while let Some(open) = rest.find('[') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find("](") {
            Some(close) if !after[..close].contains('[') => {
                text.push_str(&after[..close]);
                let target = &after[close + 2..];
                rest = target.find(')').map_or("", |end| &target[end + 1..]);
            }
            _ => {
                text.push('[');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .join(" ")
        .replace('`', "")
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Prometheus,
}

/// A request, read: what to answer, and whether to answer in HTTP.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Http {
        format: Result<Format, u16>,
        head: bool,
    },
    Line(Result<Format, String>),
}

fn parse_request(text: &str) -> Request {
    let first = text.lines().next().unwrap_or("").trim();
    let mut words = first.split_whitespace();
    let method = words.next().unwrap_or("");
    if let Some(version) = first.split_whitespace().nth(2) {
        if version.starts_with("HTTP/") {
            let path = words.next().unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            let format = match path {
                "/metrics" => Ok(Format::Prometheus),
                "/" | "/stats" | "/stats.json" => Ok(Format::Json),
                _ => Err(404),
            };
            return match method {
                "GET" => Request::Http {
                    format,
                    head: false,
                },
                "HEAD" => Request::Http { format, head: true },
                _ => Request::Http {
                    format: Err(405),
                    head: false,
                },
            };
        }
    }
    Request::Line(match first {
        "" | "json" => Ok(Format::Json),
        "metrics" | "prometheus" => Ok(Format::Prometheus),
        other => Err(other.chars().take(64).collect()),
    })
}

/// Whether `buf` holds a whole request: a bare line, or an HTTP request's blank line.
fn request_complete(buf: &[u8]) -> bool {
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let first = &buf[..eol];
    let http = first.windows(5).any(|w| w == b"HTTP/");
    !http || buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Serves stats clients on `listener` for as long as the daemon runs, each answered from the
/// VMs' loops through `siblings`.
pub fn serve(listener: UnixListener, siblings: Siblings) {
    for client in listener.incoming() {
        match client {
            Ok(client) => {
                if let Err(e) = answer(client, &siblings) {
                    debug!(error = %e, "stats client");
                }
            }
            Err(e) => {
                // EMFILE and friends: the client waits in the backlog.
                warn!(error = %e, "cannot accept a stats client");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(mut client: UnixStream, siblings: &Siblings) -> io::Result<()> {
    client.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    client.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    // The request ends at its line (or an HTTP request's blank line), at end of file, at
    // the size limit, or when the client has been silent for CLIENT_TIMEOUT.
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    while !request_complete(&buf) && buf.len() < MAX_REQUEST {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "request too slow"));
        }
        match client.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n.min(MAX_REQUEST - buf.len())]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let request = parse_request(&String::from_utf8_lossy(&buf));
    let body = |format: Format| {
        let vms = siblings.inspect_all(INSPECT_TIMEOUT);
        match format {
            Format::Json => json(&vms),
            Format::Prometheus => prometheus(&vms),
        }
    };
    match request {
        Request::Line(Ok(format)) => client.write_all(body(format).as_bytes()),
        Request::Line(Err(asked)) => client.write_all(
            format!("unknown request {asked:?}: send `json` or `metrics`, or GET /metrics\n")
                .as_bytes(),
        ),
        Request::Http { format, head } => {
            let (status, kind, text) = match format {
                Ok(Format::Json) => ("200 OK", "application/json", body(Format::Json)),
                Ok(Format::Prometheus) => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    body(Format::Prometheus),
                ),
                Err(405) => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET or HEAD only\n".to_string(),
                ),
                Err(_) => (
                    "404 Not Found",
                    "text/plain",
                    "GET /metrics (Prometheus) or / (JSON)\n".to_string(),
                ),
            };
            let mut response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                text.len()
            );
            if !head {
                response.push_str(&text);
            }
            client.write_all(response.as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_text_drops_rustdoc_markup() {
        assert_eq!(
            help_text(" Reset at the caller's request ([`Engine::reset_connection`](crate::Engine::reset_connection))."),
            "Reset at the caller's request (Engine::reset_connection)."
        );
        assert_eq!(
            help_text(" A `CONNECT`\n line [x] \\ y"),
            "A CONNECT line [x] \\\\ y"
        );
    }

    #[test]
    fn requests_are_read_as_http_or_a_bare_line() {
        let http = |format, head| Request::Http { format, head };
        assert_eq!(
            parse_request("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            http(Ok(Format::Prometheus), false)
        );
        assert_eq!(
            parse_request("GET /?pretty HTTP/1.0\r\n\r\n"),
            http(Ok(Format::Json), false)
        );
        assert_eq!(
            parse_request("HEAD /stats HTTP/1.1\r\n\r\n"),
            http(Ok(Format::Json), true)
        );
        assert_eq!(
            parse_request("GET /nope HTTP/1.1\r\n\r\n"),
            http(Err(404), false)
        );
        assert_eq!(
            parse_request("POST /metrics HTTP/1.1\r\n\r\n"),
            http(Err(405), false)
        );
        assert_eq!(
            parse_request("metrics\n"),
            Request::Line(Ok(Format::Prometheus))
        );
        assert_eq!(parse_request("json\n"), Request::Line(Ok(Format::Json)));
        assert_eq!(parse_request(""), Request::Line(Ok(Format::Json)));
        assert!(matches!(parse_request("garbage\n"), Request::Line(Err(_))));
        assert!(request_complete(b"json\n"));
        assert!(!request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    }

    #[test]
    fn an_unanswered_vm_is_reported_as_such() {
        let vms = [(3u64, None)];
        assert_eq!(
            json(&vms),
            "{\"vms\":[{\"guest_cid\":3,\"answered\":false}]}\n"
        );
        let text = prometheus(&vms);
        assert!(text.contains("vsock_vm_up{guest_cid=\"3\"} 0\n"), "{text}");
        // No answered VM: no counter families at all, rather than families with no samples.
        assert!(!text.contains("vsock_engine_"), "{text}");
    }
}
