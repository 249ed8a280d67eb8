//! The time source of the engine and the security gate.
//!
//! Timers and deadlines use tokio's `Instant`, which `tokio::time::pause` controls,
//! so tests advance time instead of waiting for it. Wall-clock milliseconds (stored
//! in records, shown by `devices list`) come from the system clock in production,
//! and follow tokio's paused clock in tests, so both move together.

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock (production).
    System,
    /// `wall0` at `t0`, advancing with tokio's (possibly paused) clock.
    FollowTokio { wall0: u64, t0: Instant },
}

impl Clock {
    /// A clock whose wall time starts at `wall0` ms and moves with tokio's clock.
    pub fn following_tokio(wall0: u64) -> Clock {
        Clock::FollowTokio {
            wall0,
            t0: Instant::now(),
        }
    }

    /// Monotonic now: for timers, deadlines and durations.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Milliseconds since the Unix epoch: for stored timestamps only (a Pi without
    /// an RTC may boot with a wrong wall clock, so never for timers).
    pub fn wall_ms(&self) -> u64 {
        match self {
            Clock::System => system_ms(),
            Clock::FollowTokio { wall0, t0 } => wall0 + t0.elapsed().as_millis() as u64,
        }
    }
}

pub fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_when_tokio_time_does() {
        let c = Clock::following_tokio(1_000);
        assert_eq!(c.wall_ms(), 1_000);
        tokio::time::advance(Duration::from_millis(2_500)).await;
        assert_eq!(c.wall_ms(), 3_500);
    }
}
