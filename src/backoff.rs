//! Exponential backoff with jitter (AWS architecture blog, "Exponential Backoff and
//! Jitter"). The n-th ceiling is min(max, initial·2ⁿ); two ways to draw a wait below it:
//!
//! - [`Backoff::delay`], *equal jitter*: uniform in [ceiling/2, ceiling], so a retry is
//!   never immediate. Used by the MQTT session (`mqtt.rs`) between reconnects, where
//!   rumqttc itself would retry at once and spin (rumqtt#703).
//! - [`Backoff::full_jitter`], *full jitter*: uniform in [0, ceiling], which spreads
//!   the retries of many sensors furthest apart. Used by the engine between cloud
//!   retries of one sensor's onboarding (`engine.rs`), where a Retry-After from the
//!   cloud takes precedence and a floor of 50 ms is applied by the caller.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The upper bound of the wait before retry number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Equal jitter: a random wait in [ceiling/2, ceiling], so a retry is never
    /// immediate: a reconnect storm or a retry storm is the thing we avoid.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceil = self.ceiling(attempt);
        let half = ceil / 2;
        let span = ceil.saturating_sub(half).as_millis() as u64;
        half + Duration::from_millis(fastrand::u64(0..=span))
    }

    /// Full jitter: uniform in [0, ceiling]; may be zero, so callers add a floor.
    pub fn full_jitter(&self, attempt: u32) -> Duration {
        let ceil = self.ceiling(attempt).as_millis() as u64;
        Duration::from_millis(fastrand::u64(0..=ceil))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(500), Duration::from_secs(1));
    }

    #[test]
    fn delays_stay_within_their_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..40 {
            let d = b.delay(attempt);
            assert!(
                d <= b.ceiling(attempt) && d >= b.ceiling(attempt) / 2,
                "{d:?}"
            );
            assert!(b.full_jitter(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn jitter_varies() {
        let b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(60));
        let samples: std::collections::HashSet<_> = (0..50).map(|_| b.full_jitter(5)).collect();
        assert!(samples.len() > 10);
    }
}
