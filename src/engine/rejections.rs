//! Sensors whose create Qubitro rejected (HTTP 400 and the like), remembered in
//! memory so that re-announcing the same spec does not cost a cloud call each time.
//!
//! The record of a rejected sensor is deleted (a corrected announce must start
//! afresh), so without this a sensor that re-announces the same bad spec every few
//! seconds would make one create request every few seconds, forever. Here each
//! rejection of the same spec doubles the time during which the same spec is
//! answered `rejected_by_cloud` (with `retry_after_s`) without asking Qubitro; a
//! *changed* spec is tried at once. Bounded: the oldest entry goes when full. Lost
//! on restart, which costs at most one more rejected create per sensor.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::announce::DeviceSpec;
use crate::backoff::Backoff;

/// Sensors remembered at most; the least recently rejected is forgotten first.
pub(super) const MAX_REMEMBERED: usize = 4096;
/// The first rejection blocks the same spec this long; each further one doubles it.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_secs(30);
/// The longest a spec stays blocked after its last rejection.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(3600);

struct Rejected {
    /// What was rejected: only this exact spec is answered from memory.
    spec: DeviceSpec,
    /// Rejections of this spec in a row.
    count: u32,
    /// When it was last rejected (eviction order).
    at: Instant,
    /// Until when the same spec is refused without a cloud call.
    until: Instant,
    /// Qubitro's reason, repeated in the reply.
    message: String,
}

/// The remembered rejections.
pub(super) struct Rejections {
    map: Mutex<HashMap<String, Rejected>>,
    backoff: Backoff,
    cap: usize,
}

impl Default for Rejections {
    fn default() -> Self {
        Rejections::new(MAX_REMEMBERED)
    }
}

impl Rejections {
    pub(super) fn new(cap: usize) -> Rejections {
        Rejections {
            map: Mutex::new(HashMap::new()),
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
            cap: cap.max(1),
        }
    }

    /// Qubitro rejected `spec` for `sensor`: returns how long the same spec is now
    /// refused without a cloud call.
    pub(super) fn record(
        &self,
        sensor: &str,
        spec: &DeviceSpec,
        message: &str,
        now: Instant,
    ) -> Duration {
        let mut map = self.map.lock().expect("never poisoned");
        let count = match map.get(sensor) {
            Some(r) if r.spec == *spec => r.count.saturating_add(1),
            _ => 1,
        };
        if map.len() >= self.cap && !map.contains_key(sensor) {
            if let Some(oldest) = map.iter().min_by_key(|(_, r)| r.at).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        let wait = self.backoff.ceiling(count - 1);
        map.insert(
            sensor.to_string(),
            Rejected {
                spec: spec.clone(),
                count,
                at: now,
                until: now + wait,
                message: message.to_string(),
            },
        );
        wait
    }

    /// When `sensor` announces `spec`: `Some((time left, Qubitro's reason))` while
    /// the same spec is still blocked. A different spec clears the memory.
    pub(super) fn check(
        &self,
        sensor: &str,
        spec: &DeviceSpec,
        now: Instant,
    ) -> Option<(Duration, String)> {
        let mut map = self.map.lock().expect("never poisoned");
        let r = map.get(sensor)?;
        if r.spec != *spec {
            map.remove(sensor);
            return None;
        }
        (now < r.until).then(|| (r.until - now, r.message.clone()))
    }

    /// The operator forgot the sensor: it starts afresh.
    pub(super) fn forget(&self, sensor: &str) {
        self.map.lock().expect("never poisoned").remove(sensor);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("never poisoned").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> DeviceSpec {
        crate::announce::parse(
            "s",
            format!(r#"{{"name":"{name}"}}"#).as_bytes(),
            4096,
            "gw",
        )
        .unwrap()
        .spec
    }

    #[tokio::test(start_paused = true)]
    async fn the_same_spec_is_refused_from_memory_with_a_doubling_backoff() {
        let r = Rejections::default();
        let a = spec("a");
        assert!(r.check("s", &a, Instant::now()).is_none());
        assert_eq!(r.record("s", &a, "bad", Instant::now()), FIRST_BACKOFF);
        let (left, why) = r.check("s", &a, Instant::now()).unwrap();
        assert_eq!((left, why.as_str()), (FIRST_BACKOFF, "bad"));
        tokio::time::advance(FIRST_BACKOFF).await;
        assert!(
            r.check("s", &a, Instant::now()).is_none(),
            "over: tried again"
        );
        assert_eq!(r.record("s", &a, "bad", Instant::now()), FIRST_BACKOFF * 2);
        assert_eq!(r.record("s", &a, "bad", Instant::now()), FIRST_BACKOFF * 4);
        for _ in 0..40 {
            r.record("s", &a, "bad", Instant::now());
        }
        assert_eq!(r.check("s", &a, Instant::now()).unwrap().0, MAX_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_spec_is_tried_at_once_and_starts_the_backoff_over() {
        let r = Rejections::default();
        r.record("s", &spec("a"), "bad", Instant::now());
        r.record("s", &spec("a"), "bad", Instant::now());
        assert!(r.check("s", &spec("b"), Instant::now()).is_none());
        assert!(
            r.check("s", &spec("a"), Instant::now()).is_none(),
            "forgotten"
        );
        assert_eq!(
            r.record("s", &spec("b"), "bad", Instant::now()),
            FIRST_BACKOFF
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_full_the_oldest_rejection_is_forgotten() {
        let r = Rejections::new(3);
        for id in ["a", "b", "c", "d"] {
            r.record(id, &spec("x"), "bad", Instant::now());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(r.len(), 3);
        assert!(r.check("a", &spec("x"), Instant::now()).is_none());
        for id in ["b", "c", "d"] {
            assert!(r.check(id, &spec("x"), Instant::now()).is_some(), "{id}");
        }
        r.forget("d");
        assert!(r.check("d", &spec("x"), Instant::now()).is_none());
    }
}
