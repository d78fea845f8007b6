//! Time as the engine sees it.
//!
//! The engine never reads a clock. Every input carries `now`, an [`Instant`] counted in
//! nanoseconds from an epoch the caller picks (a runtime uses the moment it started; a replay
//! uses the trace's own timestamps). Durations are plain [`std::time::Duration`]s.

use std::fmt;
use std::time::Duration;

/// A point in time: nanoseconds since an arbitrary epoch chosen by the caller.
///
/// Arithmetic saturates instead of overflowing, so a hostile or careless timestamp can never
/// panic the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant(u64);

impl Instant {
    /// The epoch itself.
    pub const ZERO: Instant = Instant(0);

    /// An instant `nanos` nanoseconds after the epoch.
    pub const fn from_nanos(nanos: u64) -> Self {
        Instant(nanos)
    }

    /// An instant `micros` microseconds after the epoch (saturating).
    pub const fn from_micros(micros: u64) -> Self {
        Instant(micros.saturating_mul(1_000))
    }

    /// An instant `millis` milliseconds after the epoch (saturating).
    pub const fn from_millis(millis: u64) -> Self {
        Instant(millis.saturating_mul(1_000_000))
    }

    /// An instant `secs` seconds after the epoch (saturating).
    pub const fn from_secs(secs: u64) -> Self {
        Instant(secs.saturating_mul(1_000_000_000))
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// The time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating at the largest representable instant.
    pub fn saturating_add(self, d: Duration) -> Instant {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(nanos))
    }
}

impl std::ops::Add<Duration> for Instant {
    type Output = Instant;

    /// Saturating addition; see [`Instant::saturating_add`].
    fn add(self, d: Duration) -> Instant {
        self.saturating_add(d)
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:09}s",
            self.0 / 1_000_000_000,
            self.0 % 1_000_000_000
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Instant::from_nanos(u64::MAX - 1);
        assert_eq!(t + Duration::from_secs(1), Instant::from_nanos(u64::MAX));
        assert_eq!(t + Duration::MAX, Instant::from_nanos(u64::MAX));
        assert_eq!(
            Instant::from_secs(1).saturating_duration_since(Instant::from_secs(2)),
            Duration::ZERO
        );
        assert_eq!(Instant::from_secs(u64::MAX), Instant::from_nanos(u64::MAX));
    }

    #[test]
    fn units_and_display() {
        assert_eq!(Instant::from_millis(1500), Instant::from_micros(1_500_000));
        assert_eq!(Instant::from_millis(1500).to_string(), "1.500000000s");
        assert_eq!(
            Instant::from_secs(3).saturating_duration_since(Instant::from_millis(500)),
            Duration::from_millis(2500)
        );
    }
}
