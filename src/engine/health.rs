//! Whether Qubitro answers, for STATUS= and the journal, and the pause of every
//! cloud call after it refused the API key (no retry storm while the operator
//! fixes the key).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What the last cloud requests said, for STATUS= and the pause after a refused key.
#[derive(Default)]
pub(super) struct CloudHealth {
    state: Mutex<HealthState>,
}

#[derive(Default)]
struct HealthState {
    /// After a 401/403 every cloud call waits until then: no retry storm.
    paused_until: Option<Instant>,
    /// Since when every request failed (None: the last one was answered).
    failing_since: Option<Instant>,
    last_failure: String,
}

impl CloudHealth {
    pub(super) fn answered(&self) {
        let mut s = self.state.lock().expect("never poisoned");
        s.failing_since = None;
    }

    pub(super) fn failed(&self, now: Instant, reason: &str) {
        let mut s = self.state.lock().expect("never poisoned");
        s.failing_since.get_or_insert(now);
        s.last_failure = reason.to_string();
    }

    /// Starts a pause; true when none was running (log it once, not per sensor).
    pub(super) fn pause(&self, now: Instant, pause: Duration) -> bool {
        let mut s = self.state.lock().expect("never poisoned");
        let fresh = s.paused_until.is_none_or(|t| t <= now);
        if fresh {
            s.paused_until = Some(now + pause);
        }
        fresh
    }

    /// The rest of a running pause, spread over a short window so that the sensors
    /// do not all hit the cloud in the same millisecond when it ends.
    pub(super) fn pause_remaining(&self, now: Instant) -> Option<Duration> {
        let s = self.state.lock().expect("never poisoned");
        match s.paused_until {
            Some(t) if t > now => Some(t - now + Duration::from_millis(fastrand::u64(0..2000))),
            _ => None,
        }
    }

    pub(super) fn describe(&self, now: Instant) -> String {
        let s = self.state.lock().expect("never poisoned");
        match (s.paused_until, s.failing_since) {
            (Some(t), _) if t > now => "refusing the API key (calls paused)".to_string(),
            (_, Some(since)) => format!(
                "unreachable for {}s ({})",
                now.duration_since(since).as_secs(),
                s.last_failure
            ),
            _ => "ok".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_logged_once_and_ends_on_time() {
        let h = CloudHealth::default();
        let now = Instant::now();
        assert!(h.pause(now, Duration::from_secs(60)));
        assert!(!h.pause(now, Duration::from_secs(60)), "already paused");
        let left = h.pause_remaining(now).unwrap();
        assert!(left >= Duration::from_secs(60) && left < Duration::from_secs(62));
        assert!(h.describe(now).contains("refusing the API key"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(h.pause_remaining(Instant::now()), None);
        assert!(
            h.pause(Instant::now(), Duration::from_secs(1)),
            "a new pause"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cloud_status_says_since_when_it_fails() {
        let h = CloudHealth::default();
        assert_eq!(h.describe(Instant::now()), "ok");
        h.failed(Instant::now(), "timed out");
        tokio::time::advance(Duration::from_secs(42)).await;
        h.failed(Instant::now(), "cannot connect");
        assert_eq!(
            h.describe(Instant::now()),
            "unreachable for 42s (cannot connect)"
        );
        h.answered();
        assert_eq!(h.describe(Instant::now()), "ok");
    }
}
