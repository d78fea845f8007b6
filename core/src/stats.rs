//! Counters: traffic, and every reaction to bad input.

/// One counter of a set of counters, for exporters (JSON, Prometheus): its field's name, its
/// documentation and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The field's name, such as `tx_bytes`.
    pub name: &'static str,
    /// The field's documentation (its doc comment, lines joined, rustdoc markup left in).
    pub help: &'static str,
    /// Its value.
    pub value: u64,
}

/// A set of counters that lists itself by name, so exporters need no list of their own and
/// never miss a counter added later. [`Stats`], and the device's and host side's counters,
/// implement it (with [`counters!`](crate::counters)).
pub trait Counters {
    /// Every counter, in declaration order.
    fn counters(&self) -> impl Iterator<Item = Counter> + '_;
}

/// Defines a struct of `u64` counters and its [`Counters`] implementation, which lists every
/// field with its doc comment:
///
/// ```
/// vsock_core::counters! {
///     /// What a part of a program counts.
///     #[derive(Clone, Debug, Default)]
///     pub struct PartStats {
///         /// Things done.
///         pub done: u64,
///         /// Things refused.
///         pub refused: u64,
///     }
/// }
/// use vsock_core::Counters;
/// let stats = PartStats { done: 2, refused: 1 };
/// let names: Vec<_> = stats.counters().map(|c| (c.name, c.value)).collect();
/// assert_eq!(names, [("done", 2), ("refused", 1)]);
/// assert_eq!(stats.counters().next().unwrap().help.trim(), "Things done.");
/// ```
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $(
                $(#[doc = $doc:literal])*
                pub $field:ident: u64,
            )*
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $(
                $(#[doc = $doc])*
                pub $field: u64,
            )*
        }

        impl $crate::Counters for $name {
            fn counters(&self) -> impl Iterator<Item = $crate::Counter> + '_ {
                [$(
                    $crate::Counter {
                        name: stringify!($field),
                        help: concat!($($doc),*),
                        value: self.$field,
                    },
                )*]
                .into_iter()
            }
        }
    };
}

crate::counters! {
/// Engine-wide counters. Every reaction to bad input from the guest or a host peer increments
/// exactly one field here, named for the fault.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Packets taken from the guest's tx queue.
    pub tx_packets: u64,
    /// Payload bytes taken from the guest.
    pub tx_bytes: u64,
    /// Of those, bytes that went straight from guest memory to a socket.
    pub tx_direct_bytes: u64,
    /// Of those, bytes copied into a connection buffer because the socket refused them.
    pub tx_buffered_bytes: u64,
    /// Packets delivered to the guest's rx queue.
    pub rx_packets: u64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Connections the guest opened (REQUEST accepted, host connect started).
    pub guest_connects: u64,
    /// Host clients accepted on the listener.
    pub host_accepts: u64,
    /// Connections that reached the established state.
    pub established: u64,
    /// Connections removed from the table.
    pub closed: u64,
    /// RST packets delivered to the guest.
    pub rst_sent: u64,
    /// RST packets received from the guest for a live connection.
    pub rst_received: u64,
    /// CREDIT_UPDATE packets delivered to the guest.
    pub credit_updates_sent: u64,
    /// CREDIT_REQUEST packets delivered to the guest.
    pub credit_requests_sent: u64,
    /// Seqpacket messages from the guest that reached their host socket whole.
    pub messages_to_host: u64,
    /// Seqpacket messages from host sockets delivered to the guest whole.
    pub messages_to_guest: u64,

    /// Dropped: the source CID is not the guest's, or the destination is not the host.
    pub wrong_cid: u64,
    /// Dropped: reserved CID bits set.
    pub reserved_cid_bits: u64,
    /// Answered with RST: a socket type we do not support.
    pub unknown_type: u64,
    /// Answered with RST: an operation the specification does not define.
    pub unknown_op: u64,
    /// Answered with RST: a payload longer than `buffer_size`, which no credit allows.
    pub oversize_len: u64,
    /// Answered with RST: a control packet that carries a payload.
    pub control_payload: u64,
    /// Answered with RST: data beyond the credit we advertised.
    pub credit_violation: u64,
    /// Answered with RST: RW, SHUTDOWN or credit packets for no known connection.
    pub unknown_connection: u64,
    /// Answered with RST: a REQUEST for a connection that already exists (which is reset too).
    pub request_for_existing: u64,
    /// Answered with RST: a RESPONSE to nothing we asked.
    pub unexpected_response: u64,
    /// Answered with RST: data after the guest's SHUTDOWN SEND, or before its connection was
    /// established.
    pub data_after_shutdown: u64,
    /// Dropped: an RST for no known connection (an RST is never answered).
    pub rst_for_unknown: u64,
    /// Answered with RST: a REQUEST while the connection table is full.
    pub connection_limit: u64,
    /// Refused: a host client accepted while the connection table is full.
    pub accept_limit: u64,
    /// Closed: a host client still sending its `CONNECT` line, the one that had waited
    /// longest, to make room for a new one when the room for such clients was full.
    pub pending_evicted: u64,
    /// Dropped: an RST reply that found the reply queue full.
    pub rst_queue_full: u64,
    /// Reset: guest memory could not be read for a payload.
    pub payload_faults: u64,

    /// Closed: a host client's CONNECT line was malformed.
    pub connect_line_garbage: u64,
    /// Closed: a host client's CONNECT line had no newline within the limit.
    pub connect_line_too_long: u64,
    /// Closed: a host client's CONNECT line named a port out of range.
    pub connect_line_bad_port: u64,
    /// Closed: a host client hung up before finishing its CONNECT line.
    pub connect_line_eof: u64,
    /// Closed: a host client did not finish its CONNECT line in time.
    pub connect_line_timeout: u64,
    /// Reset: a connect (host socket or guest RESPONSE) did not finish in time.
    pub connect_timeout: u64,
    /// Reset: the host socket for a guest request could not be connected.
    pub connect_failed: u64,
    /// Reset: the guest RST a connection the host asked for.
    pub connect_refused_by_guest: u64,
    /// Reset: a closing connection did not finish in time.
    pub close_timeout: u64,
    /// Dropped: a connection's final RST could not be delivered in time.
    pub rst_undelivered: u64,
    /// A host socket reported an error, or a write to it failed. What it still holds for the
    /// guest is delivered, then the connection is reset.
    pub host_errors: u64,
    /// Guest bytes a broken host socket could not take: dropped, and the connection reset.
    pub guest_bytes_lost: u64,
    /// A host socket's peer hung up (closed, or shut down both directions): the guest was
    /// told it can send no more; guest bytes held for it, if any, were lost
    /// (`guest_bytes_lost`), and the connection is then reset.
    pub host_hangups: u64,
    /// Ignored: an event for a connection handle that is no longer live.
    pub stale_events: u64,
    /// Seqpacket, dropped: the guest marked a message as the end of a record (`EOR`), which a
    /// Unix socket cannot carry; the message itself is delivered.
    pub seqpacket_eor_dropped: u64,
    /// Seqpacket, dropped: an empty message from the guest (Linux never sends one).
    pub seqpacket_empty_from_guest: u64,
    /// Seqpacket, dropped: an empty message from a host socket (vsock cannot carry one).
    pub seqpacket_empty_from_host: u64,
    /// Seqpacket, dropped: the guest's unfinished message when it shut down its sending side
    /// (its bytes count in `guest_bytes_lost`).
    pub seqpacket_partial_dropped: u64,
    /// Seqpacket, reset: a host message larger than the guest's whole receive buffer, which
    /// it could never take. The host socket is closed, so both ends see the failure.
    pub seqpacket_oversize_from_host: u64,
    /// Seqpacket, reset: the host socket refused a message as too large (`EMSGSIZE`).
    pub seqpacket_host_emsgsize: u64,
    /// Seqpacket, reset: a write to a seqpacket socket reported a partial message, which an
    /// atomic send never does.
    pub seqpacket_partial_write: u64,
    /// Closed: a client of the seqpacket listener while the guest has not negotiated
    /// seqpacket sockets.
    pub seqpacket_clients_refused: u64,
    /// Closed: a client of the stream listener while the guest has negotiated seqpacket
    /// sockets only.
    pub stream_clients_refused: u64,
    /// Reset at the caller's request ([`Engine::reset_connection`](crate::Engine::reset_connection)).
    pub resets_by_caller: u64,

    /// Connections the guest opened to a sibling VM (counted in `guest_connects` too).
    pub sibling_connects: u64,
    /// Connections a sibling VM's guest opened to this guest.
    pub sibling_accepts: u64,
    /// Refused by [`Engine::handle_sibling_accept`](crate::Engine::handle_sibling_accept).
    pub sibling_accepts_refused: u64,
    /// Reset: a sibling refused the guest's connection (its socket ended before the `OK`
    /// reply, or sent something else).
    pub sibling_refused: u64,
    /// Reset: the sibling VM at the other end went away
    /// ([`Engine::reset_peer`](crate::Engine::reset_peer)).
    pub sibling_resets: u64,
}
}

crate::counters! {
/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnStats {
    /// Payload bytes the guest sent on this connection.
    pub guest_bytes: u64,
    /// Of those, bytes the host socket has taken.
    pub host_written: u64,
    /// Payload bytes delivered to the guest.
    pub host_bytes: u64,
    /// Packets received from the guest.
    pub guest_packets: u64,
    /// Packets delivered to the guest.
    pub host_packets: u64,
    /// Bytes copied into the connection buffer because the socket refused them.
    pub buffered_bytes: u64,
}
}
