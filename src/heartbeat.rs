//! Proof of life from the long-running tasks, read by the systemd watchdog.
//!
//! A leaf module: the MQTT event loop and the dispatcher beat here, the daemon's
//! reporter reads here, and none of them needs to know about the others.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The last time each watched task showed progress.
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds since `start` of the MQTT event loop's last wake-up.
    mqtt_ms: AtomicU64,
    /// Milliseconds since `start` of the dispatcher's last free moment.
    dispatcher_ms: AtomicU64,
}

impl Heartbeat {
    pub fn new() -> Self {
        Heartbeat {
            start: Instant::now(),
            mqtt_ms: AtomicU64::new(0),
            dispatcher_ms: AtomicU64::new(0),
        }
    }

    pub fn beat_dispatcher(&self) {
        Self::beat(self.start, &self.dispatcher_ms);
    }

    pub fn dispatcher_silence(&self) -> Duration {
        Self::silence(self.start, &self.dispatcher_ms)
    }

    pub fn beat_mqtt(&self) {
        Self::beat(self.start, &self.mqtt_ms);
    }

    pub fn mqtt_silence(&self) -> Duration {
        Self::silence(self.start, &self.mqtt_ms)
    }

    fn beat(start: Instant, slot: &AtomicU64) {
        slot.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silence(start: Instant, slot: &AtomicU64) -> Duration {
        let last = Duration::from_millis(slot.load(Ordering::Relaxed));
        start.elapsed().saturating_sub(last)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silence_grows_until_the_next_beat() {
        let h = Heartbeat::new();
        h.beat_mqtt();
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(h.mqtt_silence(), Duration::from_secs(7));
        h.beat_mqtt();
        assert_eq!(h.mqtt_silence(), Duration::ZERO);
        assert_eq!(h.dispatcher_silence(), Duration::from_secs(7));
    }
}
