//! Engine configuration: every capacity the engine will ever use.

use std::fmt;
use std::time::Duration;

use crate::wire::CID_RESERVED_MASK;

/// The fixed limits and timeouts of an [`Engine`](crate::Engine).
///
/// Capacity is reserved when the engine is built, or drawn from bounded pools; nothing here
/// grows at the guest's or a host peer's request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The guest's CID. Packets from any other source CID are dropped.
    pub guest_cid: u64,
    /// The receive buffer we advertise to the guest (`buf_alloc`) for each connection, and so
    /// the capacity of the buffer that holds guest data a host socket has not taken yet.
    pub buffer_size: u32,
    /// The largest payload of one packet to the guest. (A packet from the guest may carry up
    /// to `buffer_size` bytes, the most its credit can ever allow; a larger one is refused as
    /// oversize.)
    pub max_packet_payload: u32,
    /// The most connections alive at once, counting host clients still sending `CONNECT`.
    pub max_connections: usize,
    /// The most host clients still sending their `CONNECT` line at once, so that clients of
    /// the host socket cannot fill the table the guest's connections need. A client accepted
    /// while this many are pending closes the one that has waited longest, so slow clients
    /// never keep a prompt one out.
    pub max_pending_host_clients: usize,
    /// How long a host client may take to send its `CONNECT` line.
    pub connect_line_timeout: Duration,
    /// How long a connect may take: the host socket connect for a guest request, and the
    /// guest's RESPONSE for a host request.
    pub connect_timeout: Duration,
    /// How long a closing connection may take to flush what it holds, and to deliver its final
    /// RST to the guest, before it is dropped.
    pub close_timeout: Duration,
    /// The first port used on the host side of host-initiated connections.
    pub host_port_first: u32,
    /// Send a CREDIT_UPDATE once this many bytes were forwarded to the host since the guest last
    /// heard our count (or sooner, when the guest's view of our buffer is nearly full).
    pub credit_update_threshold: u32,
    /// The most RST replies to unknown connections waiting for a guest rx buffer; more are
    /// dropped and counted. At most 2^16.
    pub max_pending_resets: usize,
    /// How many drained connection buffers are kept for reuse instead of being freed. While
    /// no more connections than this hold buffered bytes at once, the steady state allocates
    /// nothing; beyond it, buffers are freed and allocated again as they drain and fill.
    /// More than `max_connections` keeps no more than that.
    pub pooled_buffers: usize,
}

impl Config {
    /// A configuration with the defaults for a guest with CID `guest_cid`.
    pub fn new(guest_cid: u64) -> Self {
        Config {
            guest_cid,
            buffer_size: 256 * 1024,
            max_packet_payload: 64 * 1024,
            max_connections: 1024,
            max_pending_host_clients: 64,
            connect_line_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(8),
            host_port_first: 1 << 30,
            credit_update_threshold: 64 * 1024,
            max_pending_resets: 256,
            pooled_buffers: 256,
        }
    }

    /// This configuration with `buffer_size` set to `bytes` and the credit update threshold
    /// derived from it: a quarter of the buffer, at most 64 KiB, at least 1 byte. Any buffer
    /// size [`validate`](Self::validate) accepts then makes a valid pair.
    ///
    /// A quarter keeps the guest streaming: it hears of freed space while at least three
    /// quarters of the buffer are still free in its view, long before its credit runs out (and
    /// once its view is nearly full, every freed byte is reported at once). The 64 KiB cap keeps
    /// updates frequent with large buffers, one per packet-sized chunk at most, so no guest waits
    /// on a whole large buffer draining before it hears of the room.
    pub fn with_buffer_size(mut self, bytes: u32) -> Self {
        self.buffer_size = bytes;
        self.credit_update_threshold = threshold_for(bytes);
        self
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid <= 2
            || self.guest_cid & CID_RESERVED_MASK != 0
            || self.guest_cid == u64::from(u32::MAX)
        {
            return Err(ConfigError::GuestCid);
        }
        if self.buffer_size == 0 || self.buffer_size > 1 << 30 {
            return Err(ConfigError::BufferSize);
        }
        if self.max_packet_payload == 0 {
            return Err(ConfigError::MaxPacketPayload);
        }
        if self.max_pending_host_clients == 0 {
            return Err(ConfigError::MaxPendingHostClients);
        }
        if self.max_connections == 0 || self.max_connections > 1 << 20 {
            return Err(ConfigError::MaxConnections);
        }
        if self.host_port_first == u32::MAX {
            return Err(ConfigError::HostPortFirst);
        }
        if self.credit_update_threshold == 0 || self.credit_update_threshold > self.buffer_size {
            return Err(ConfigError::CreditUpdateThreshold);
        }
        // Reserved up front: bounded, so no configuration asks for unbounded memory.
        if self.max_pending_resets > 1 << 16 {
            return Err(ConfigError::MaxPendingResets);
        }
        Ok(())
    }
}

/// The credit update threshold [`Config::with_buffer_size`] derives for a buffer of `bytes`.
fn threshold_for(bytes: u32) -> u32 {
    (bytes / 4).clamp(1, 64 * 1024)
}

/// Which [`Config`] field is out of range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `guest_cid` is reserved (0, 1, 2, `u32::MAX`) or has bits above 32.
    GuestCid,
    /// `buffer_size` is zero or above 1 GiB.
    BufferSize,
    /// `max_packet_payload` is zero.
    MaxPacketPayload,
    /// `max_pending_host_clients` is zero.
    MaxPendingHostClients,
    /// `max_connections` is zero or above 2^20.
    MaxConnections,
    /// `host_port_first` is `u32::MAX`, the reserved "any" port.
    HostPortFirst,
    /// `credit_update_threshold` is zero or larger than `buffer_size`.
    CreditUpdateThreshold,
    /// `max_pending_resets` is above 2^16.
    MaxPendingResets,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigError::GuestCid => "guest CID is reserved or wider than 32 bits",
            ConfigError::BufferSize => "buffer size must be between 1 byte and 1 GiB",
            ConfigError::MaxPacketPayload => "maximum packet payload must not be zero",
            ConfigError::MaxPendingHostClients => "maximum pending host clients must not be zero",
            ConfigError::MaxConnections => "maximum connections must be between 1 and 2^20",
            ConfigError::HostPortFirst => "the first host port must not be u32::MAX",
            ConfigError::CreditUpdateThreshold => {
                "credit update threshold must be between 1 and the buffer size"
            }
            ConfigError::MaxPendingResets => "maximum pending resets must be at most 2^16",
        })
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_derived_alike() {
        let c = Config::new(3);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.clone().with_buffer_size(c.buffer_size), c);
    }

    #[test]
    fn every_buffer_size_validate_accepts_gets_a_valid_threshold() {
        for bytes in [
            1,
            2,
            3,
            4,
            5,
            4095,
            4096,
            32 * 1024,
            65535,
            64 * 1024,
            65537,
            256 * 1024,
            256 * 1024 + 1,
            1 << 20,
            1 << 30,
        ] {
            let c = Config::new(3).with_buffer_size(bytes);
            assert_eq!(c.validate(), Ok(()), "buffer {bytes}");
            assert_eq!(c.buffer_size, bytes);
            let t = c.credit_update_threshold;
            assert!(t >= 1 && t <= bytes, "buffer {bytes}: threshold {t}");
            assert!(t <= 64 * 1024, "buffer {bytes}: threshold {t}");
        }
        assert_eq!(threshold_for(1), 1);
        assert_eq!(threshold_for(7), 1);
        assert_eq!(threshold_for(8), 2);
        assert_eq!(threshold_for(32 * 1024), 8 * 1024);
        assert_eq!(threshold_for(64 * 1024), 16 * 1024);
        assert_eq!(threshold_for(256 * 1024), 64 * 1024);
        assert_eq!(threshold_for(1 << 20), 64 * 1024);
    }

    #[test]
    fn the_buffer_size_limits_still_hold() {
        let zero = Config::new(3).with_buffer_size(0);
        assert_eq!(zero.validate(), Err(ConfigError::BufferSize));
        let huge = Config::new(3).with_buffer_size((1 << 30) + 1);
        assert_eq!(huge.validate(), Err(ConfigError::BufferSize));
    }

    #[test]
    fn a_small_buffer_with_the_default_threshold_is_still_refused() {
        // What the daemon did before deriving the threshold: 32 KiB under a 64 KiB threshold.
        let mut c = Config::new(3);
        c.buffer_size = 32 * 1024;
        assert_eq!(c.validate(), Err(ConfigError::CreditUpdateThreshold));
    }
}
