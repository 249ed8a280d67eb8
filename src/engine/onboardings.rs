//! The running onboarding tasks and what they owe: never two tasks for one sensor,
//! and the routes of announces that arrived while a sensor was pending, bounded.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::onboarding::Record;
use crate::reply::Route;

/// Starts a sensor's onboarding task after a delay, unless one runs already: how
/// the stages that decide (dispatch, discovery) start work they do not run, so
/// they are tested with a recording launcher and no task at all.
pub(super) trait Launch: Send + Sync {
    fn launch(&self, sensor: String, delay: Duration);
}

/// Routes kept per pending sensor for announces that arrive while it is pending.
pub(super) const MAX_WAITING_ROUTES: usize = 16;
/// The running onboarding tasks and what they owe.
pub(super) struct Onboardings {
    /// Sensors with a live task: never two tasks for one sensor.
    active: Mutex<HashSet<String>>,
    /// Extra reply routes of sensors that announced again while pending.
    waiting: Mutex<HashMap<String, Vec<Route>>>,
    /// When the announce that made each new sensor's record arrived: its first reply
    /// (from the task) is timed against it. Gone when the task ends.
    announced: Mutex<HashMap<String, Instant>>,
    pub(super) tasks: TaskTracker,
    /// Attempts in progress (each holds at most one cloud request at a time).
    pub(super) workers: Arc<Semaphore>,
    pub(super) backoff: Backoff,
}

impl Onboardings {
    pub(super) fn new(cfg: &Config) -> Onboardings {
        let q = &cfg.qubitro;
        Onboardings {
            active: Mutex::new(HashSet::new()),
            waiting: Mutex::new(HashMap::new()),
            announced: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            // Twice the request limit: while one attempt waits for its fsync or its
            // reply, another can already use the freed request slot, so the cloud's
            // in-flight limit is really used (the cloud client enforces the limit).
            workers: Arc::new(Semaphore::new(q.max_in_flight * 2)),
            backoff: Backoff::new(
                Duration::from_millis(q.retry_initial_ms),
                Duration::from_millis(q.retry_max_ms),
            ),
        }
    }

    pub(super) fn active_count(&self) -> usize {
        self.active.lock().expect("never poisoned").len()
    }

    /// True when the caller may run the sensor's task (none runs yet).
    pub(super) fn claim(&self, sensor: &str) -> bool {
        self.active
            .lock()
            .expect("never poisoned")
            .insert(sensor.to_string())
    }

    pub(super) fn release(&self, sensor: &str) {
        self.active.lock().expect("never poisoned").remove(sensor);
        // A task that ended without answering (forgotten meanwhile) leaves nothing.
        self.announced
            .lock()
            .expect("never poisoned")
            .remove(sensor);
    }

    /// A new sensor's announce arrived at `at`; its task's first reply answers it.
    pub(super) fn announced(&self, sensor: &str, at: Instant) {
        let mut a = self.announced.lock().expect("never poisoned");
        a.insert(sensor.to_string(), at);
    }

    /// The task published a reply to the sensor's announce: the first one is timed.
    pub(super) fn replied(&self, sensor: &str, now: Instant) {
        let at = self
            .announced
            .lock()
            .expect("never poisoned")
            .remove(sensor);
        if let Some(at) = at {
            crate::metrics::announce_replied(now.saturating_duration_since(at));
        }
    }

    /// Remembers another route to answer when the onboarding ends. False when too
    /// many are owed already (the announce is then told to ask again).
    pub(super) fn add_waiting(&self, sensor: &str, route: Route) -> bool {
        let mut w = self.waiting.lock().expect("never poisoned");
        let routes = w.entry(sensor.to_string()).or_default();
        if routes.contains(&route) {
            return true;
        }
        if routes.len() >= MAX_WAITING_ROUTES {
            return false;
        }
        routes.push(route);
        true
    }

    /// How long until a record's next attempt is due. Never trusted further ahead
    /// than one backoff cap: the clock of a Pi without RTC can jump.
    pub(super) fn until_due(&self, rec: &Record, now_ms: u64) -> Duration {
        let ms = rec.next_attempt_ms.saturating_sub(now_ms);
        Duration::from_millis(ms).min(self.backoff.max)
    }

    pub(super) fn take_waiting(&self, sensor: &str) -> Vec<Route> {
        self.waiting
            .lock()
            .expect("never poisoned")
            .remove(sensor)
            .unwrap_or_default()
    }
}

/// The onboardings a stage started, for unit tests.
#[cfg(test)]
#[derive(Default)]
pub(super) struct Launched(pub(super) Mutex<Vec<(String, Duration)>>);

#[cfg(test)]
impl Launched {
    pub(super) fn sensors(&self) -> Vec<String> {
        let l = self.0.lock().unwrap();
        l.iter().map(|(s, _)| s.clone()).collect()
    }
}

#[cfg(test)]
impl Launch for Launched {
    fn launch(&self, sensor: String, delay: Duration) {
        self.0.lock().unwrap().push((sensor, delay));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_routes_are_bounded_and_deduplicated() {
        let cfg = Config::from_toml("[qubitro]\nproject_id = \"p\"\napi_key = \"k\"").unwrap();
        let o = Onboardings::new(&cfg);
        let route = |i: usize| Route {
            request_id: Some(format!("r{i}")),
            ..Route::default()
        };
        for i in 0..MAX_WAITING_ROUTES {
            assert!(o.add_waiting("s", route(i)));
        }
        assert!(
            o.add_waiting("s", route(0)),
            "a known route is not counted twice"
        );
        assert!(!o.add_waiting("s", route(99)));
        assert_eq!(o.take_waiting("s").len(), MAX_WAITING_ROUTES);
        assert!(o.take_waiting("s").is_empty());
    }
}
