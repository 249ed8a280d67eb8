//! Per-sensor rate limit of bridged readings (`bridge.max_readings_per_s`): a token
//! bucket per sensor holding one second's worth, so a steady sensor within its rate
//! never loses a reading and a chatty one cannot fill the buffer, the uplinks and
//! Qubitro's bill with everyone else's share. The excess is dropped (the caller
//! acknowledges it all the same), counted, and said in at most one log line per
//! [`LOG_EVERY`].
//!
//! Time is a parameter ([`Rate::check_at`]) so tests drive the clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::status::AcceptError;

/// At most one warning about dropped excess per this long (across all sensors).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Buckets kept before idle ones (full again: worth nothing) are pruned.
const PRUNE_AT: usize = 4096;

/// The limiter. One per bridge.
pub struct Rate {
    per_s: f64,
    state: Mutex<State>,
    /// Readings dropped as excess, since start.
    limited: AtomicU64,
}

#[derive(Default)]
struct State {
    buckets: HashMap<String, Bucket>,
    last_log: Option<Instant>,
    /// Dropped since the last warning.
    unlogged: u64,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Rate {
    pub fn new(per_s: u32) -> Rate {
        Rate {
            per_s: f64::from(per_s.max(1)),
            state: Mutex::new(State::default()),
            limited: AtomicU64::new(0),
        }
    }

    /// Takes one reading of `sensor` now: `Err(AcceptError::RateLimited)` when it is
    /// excess.
    pub fn check(&self, sensor: &str) -> Result<(), AcceptError> {
        self.check_at(sensor, Instant::now())
    }

    /// [`Rate::check`] at `now`.
    pub fn check_at(&self, sensor: &str, now: Instant) -> Result<(), AcceptError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.buckets.len() >= PRUNE_AT && !s.buckets.contains_key(sensor) {
            // A bucket idle for a second is full again: the same as none.
            s.buckets
                .retain(|_, b| now.duration_since(b.at) < Duration::from_secs(1));
        }
        let per_s = self.per_s;
        let b = s.buckets.entry(sensor.to_string()).or_insert(Bucket {
            tokens: per_s,
            at: now,
        });
        let refill = now.duration_since(b.at).as_secs_f64() * per_s;
        b.tokens = (b.tokens + refill).min(per_s);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let total = self.limited.fetch_add(1, Relaxed) + 1;
        s.unlogged += 1;
        if s.last_log
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            tracing::warn!(
                sensor_id = sensor,
                dropped = s.unlogged,
                total_rate_limited = total,
                "bridge: sensor {sensor} publishes more than bridge.max_readings_per_s = {per_s}; \
                 {} excess readings dropped since the last such line ({total} since start)",
                s.unlogged
            );
            s.last_log = Some(now);
            s.unlogged = 0;
        }
        Err(AcceptError::RateLimited)
    }

    /// Readings dropped as excess, since start.
    pub fn limited(&self) -> u64 {
        self.limited.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(r: &Rate, sensor: &str, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| r.check_at(sensor, now).is_ok()).count()
    }

    #[test]
    fn a_burst_past_the_rate_is_dropped_and_counted() {
        let r = Rate::new(10);
        let now = Instant::now();
        assert_eq!(passed(&r, "chatty", 25, now), 10);
        assert_eq!(r.limited(), 15);
        assert!(matches!(
            r.check_at("chatty", now),
            Err(AcceptError::RateLimited)
        ));
    }

    #[test]
    fn one_sensors_excess_does_not_limit_another() {
        let r = Rate::new(10);
        let now = Instant::now();
        passed(&r, "chatty", 100, now);
        assert_eq!(passed(&r, "quiet", 10, now), 10);
    }

    #[test]
    fn a_sensor_within_its_rate_never_loses_a_reading_and_the_allowance_refills() {
        let r = Rate::new(10);
        let start = Instant::now();
        // 10 a second, evenly, for a minute.
        for i in 0..600u64 {
            let now = start + Duration::from_millis(i * 100);
            assert!(r.check_at("steady", now).is_ok(), "reading {i}");
        }
        let later = start + Duration::from_secs(60);
        assert_eq!(passed(&r, "burst", 30, later), 10);
        assert_eq!(
            passed(&r, "burst", 30, later + Duration::from_millis(500)),
            5
        );
        assert_eq!(
            passed(&r, "burst", 30, later + Duration::from_secs(5)),
            10,
            "one second's worth at most"
        );
        assert_eq!(r.limited(), 20 + 25 + 20);
    }
}
