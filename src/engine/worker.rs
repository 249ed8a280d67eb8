//! One sensor's onboarding: a task per unfinished sensor that drives its record
//! `Pending → (lookup) → Creating → Created`, persisting each step before the next
//! side effect. `Creating` is on disk before a create is sent, `Created` before the
//! token is published; a `Creating` record is always looked up before any further
//! create, whatever `lookup_before_create` says, so a crash, a kill or a timed-out
//! create anywhere leaves a state from which the restart neither loses the sensor
//! nor creates a second device.
//!
//! Every write goes through [`records::apply`] on the record of the generation the
//! task started with: when the operator forgot the sensor meanwhile, the write
//! finds nothing to change and the task stops, so `forget` always wins.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use super::records::{self, Transition};
use super::Engine;
use crate::backoff::Backoff;
use crate::cloud::CloudError;
use crate::config::{Config, LookupPolicy};
use crate::device::Credentials;
use crate::failpoint;
use crate::metrics;
use crate::onboarding::{Origin, Record, State};
use crate::reply::{Reply, ReplyCode, Route};
use crate::store::StoreError;

/// Routes kept per pending sensor for announces that arrive while it is pending.
pub(super) const MAX_WAITING_ROUTES: usize = 16;

/// The shortest wait between two attempts for one sensor.
const MIN_RETRY: Duration = Duration::from_millis(50);

/// What an onboarding task does after one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Done,
    RetryIn(Duration),
}

/// The running onboarding tasks and what they owe.
pub(super) struct Onboardings {
    /// Sensors with a live task: never two tasks for one sensor.
    active: Mutex<HashSet<String>>,
    /// Extra reply routes of sensors that announced again while pending.
    waiting: Mutex<HashMap<String, Vec<Route>>>,
    pub(super) tasks: TaskTracker,
    /// Attempts in progress (each holds at most one cloud request at a time).
    workers: Arc<Semaphore>,
    pub(super) backoff: Backoff,
}

impl Onboardings {
    pub(super) fn new(cfg: &Config) -> Onboardings {
        let q = &cfg.qubitro;
        Onboardings {
            active: Mutex::new(HashSet::new()),
            waiting: Mutex::new(HashMap::new()),
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
    fn claim(&self, sensor: &str) -> bool {
        self.active
            .lock()
            .expect("never poisoned")
            .insert(sensor.to_string())
    }

    fn release(&self, sensor: &str) {
        self.active.lock().expect("never poisoned").remove(sensor);
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

    pub(super) fn take_waiting(&self, sensor: &str) -> Vec<Route> {
        self.waiting
            .lock()
            .expect("never poisoned")
            .remove(sensor)
            .unwrap_or_default()
    }
}

/// The wait before retrying after a retryable failure: the backoff's jitter, at
/// least the cloud's Retry-After (but not more than twice it), never more than the
/// backoff cap, and at least the request timeout after a failure that may have
/// created the device (a create still being processed must become visible to the
/// lookup before it runs). Saturating everywhere: the inputs come from the network.
pub(super) fn retry_wait(
    jitter: Duration,
    retry_after: Option<Duration>,
    maybe_created: bool,
    cap: Duration,
    request_timeout: Duration,
) -> Duration {
    let wait = match retry_after {
        Some(ra) => ra.max(jitter.min(ra.saturating_mul(2))),
        None => jitter,
    };
    let wait = wait.min(cap);
    let wait = if maybe_created {
        wait.max(request_timeout)
    } else {
        wait
    };
    wait.max(MIN_RETRY)
}

impl Engine {
    /// Starts the sensor's onboarding task after `delay`, unless one runs already.
    pub(super) fn spawn_onboarding(self: &Arc<Self>, sensor: String, delay: Duration) {
        if !self.onboardings.claim(&sensor) {
            return;
        }
        let me = self.clone();
        self.onboardings.tasks.spawn(async move {
            me.onboarding_task(sensor, delay).await;
        });
    }

    async fn onboarding_task(self: Arc<Self>, sensor: String, mut delay: Duration) {
        loop {
            self.drive(&sensor, delay).await;
            self.onboardings.release(&sensor);
            if self.shutdown.stop.is_cancelled() {
                return;
            }
            // Look again after letting go: a sensor forgotten and announced anew
            // just before the release found this task still running and started
            // none, so its new record is ours to drive.
            match self.store.get(&sensor) {
                Ok(Some(rec)) if rec.state.is_unfinished() && self.onboardings.claim(&sensor) => {
                    delay = self.until_due(&rec);
                }
                Ok(_) => return,
                Err(e) => {
                    self.fatal.trigger(e);
                    return;
                }
            }
        }
    }

    /// Attempts until the onboarding ends, the engine stops, or a fatal error.
    async fn drive(&self, sensor: &str, mut delay: Duration) {
        let stop = &self.shutdown.stop;
        loop {
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
            }
            let permit = tokio::select! {
                p = self.onboardings.workers.clone().acquire_owned() => {
                    p.expect("the worker semaphore is never closed")
                }
                _ = stop.cancelled() => return,
            };
            // Not raced with `stop`: a cloud call under way may finish within the
            // shutdown budget; `abort` ends it when the budget runs out.
            let step = tokio::select! {
                r = self.attempt(sensor) => r,
                _ = self.shutdown.abort.cancelled() => return,
            };
            drop(permit);
            match step {
                Ok(Next::Done) => return,
                Ok(Next::RetryIn(d)) => delay = d,
                Err(e) => {
                    self.fatal.trigger(e);
                    return;
                }
            }
        }
    }

    /// One step of one sensor's onboarding, from whatever state the store holds.
    async fn attempt(&self, sensor: &str) -> Result<Next, StoreError> {
        let Some(rec) = self.store.get(sensor)? else {
            return Ok(Next::Done); // forgotten meanwhile
        };
        if !rec.state.is_unfinished() {
            return Ok(Next::Done);
        }
        if let Some(wait) = self.health.pause_remaining(self.clock.now()) {
            return self.retry_later(sensor, &rec, wait, None, false).await;
        }

        // A create may have been sent before (Creating): always look first.
        let lookup = rec.state == State::Creating
            || self.cfg.qubitro.lookup_before_create == LookupPolicy::Always;
        if lookup {
            let found = match self.cloud.find_by_sensor(sensor).await {
                Ok(found) => found,
                Err(e) => return self.failed(sensor, &rec, lookup_error(e)).await,
            };
            if let Some(device_id) = found {
                return match self.cloud.get(&device_id).await {
                    Ok(creds) => self.finish(sensor, &rec, creds, Origin::Adopted).await,
                    Err(e) => self.failed(sensor, &rec, lookup_error(e)).await,
                };
            }
        }

        let rec = if rec.state == State::Pending {
            // On disk before the request leaves: after a crash from here on, the
            // restart looks the sensor up instead of blindly creating again.
            let Some((rec, seq)) = self.transition(sensor, &rec, Transition::Creating)? else {
                return Ok(Next::Done);
            };
            self.store.durable(seq).await?;
            failpoint::hit("after_creating_recorded");
            rec
        } else {
            rec
        };
        match self.cloud.create(&rec.spec).await {
            Ok(creds) => {
                failpoint::hit("after_create_response");
                self.finish(sensor, &rec, creds, Origin::Created).await
            }
            Err(e) => self.failed(sensor, &rec, e).await,
        }
    }

    /// Applies one transition to the record the task works on ([`records::apply`]).
    /// `None`: nothing written (forgotten meanwhile, or a refused move, logged).
    fn transition(
        &self,
        sensor: &str,
        rec: &Record,
        t: Transition,
    ) -> Result<Option<(Record, u64)>, StoreError> {
        let now = self.clock.wall_ms();
        Ok(records::apply(&self.store, sensor, rec.generation, &t, now)?.written())
    }

    /// Stores the credentials durably, then publishes them.
    async fn finish(
        &self,
        sensor: &str,
        rec: &Record,
        creds: Credentials,
        origin: Origin,
    ) -> Result<Next, StoreError> {
        self.health.answered();
        let now = self.clock.wall_ms();
        let created = Transition::Created {
            credentials: creds.clone(),
            origin,
        };
        let Some((rec, seq)) = self.transition(sensor, rec, created)? else {
            tracing::warn!(
                sensor_id = sensor,
                device_id = %creds.device_id,
                "sensor {sensor} was forgotten while its device was being made; Qubitro device {} is left as it is",
                creds.device_id
            );
            return Ok(Next::Done);
        };
        self.store.durable(seq).await?;
        failpoint::hit("after_created_recorded");
        // Readings buffered while the device was being made start flowing.
        self.bridge_device(sensor, &rec);
        metrics::onboarded(origin == Origin::Adopted);
        tracing::info!(
            sensor_id = sensor,
            device_id = %creds.device_id,
            outcome = origin.as_str(),
            attempts = rec.attempts + 1,
            duration_ms = now.saturating_sub(rec.first_seen_ms),
            "onboarded"
        );
        self.deliver_ok(sensor, &rec, &rec.route).await;
        for route in self.onboardings.take_waiting(sensor) {
            if route != rec.route {
                self.deliver_ok(sensor, &rec, &route).await;
            }
        }
        failpoint::hit("after_reply_published");
        Ok(Next::Done)
    }

    async fn failed(
        &self,
        sensor: &str,
        rec: &Record,
        err: CloudError,
    ) -> Result<Next, StoreError> {
        let now = self.clock.now();
        match err {
            CloudError::Retryable {
                reason,
                retry_after,
                maybe_created,
            } => {
                self.health.failed(now, &reason);
                let q = &self.cfg.qubitro;
                let wait = retry_wait(
                    self.onboardings.backoff.full_jitter(rec.attempts),
                    retry_after,
                    maybe_created,
                    self.onboardings.backoff.max,
                    Duration::from_millis(q.request_timeout_ms),
                );
                tracing::warn!(
                    sensor_id = sensor,
                    attempt = rec.attempts + 1,
                    retry_in_ms = wait.as_millis() as u64,
                    reason = %reason,
                    "Qubitro unavailable ({reason}); will retry sensor {sensor} in {} ms",
                    wait.as_millis()
                );
                self.retry_later(sensor, rec, wait, Some(reason), true)
                    .await
            }
            CloudError::Operator { status } => {
                self.health.answered();
                let pause = Duration::from_secs(self.cfg.qubitro.auth_failure_backoff_s);
                if self.health.pause(now, pause) {
                    tracing::error!(
                        status,
                        pause_s = pause.as_secs(),
                        "OPERATOR ERROR: Qubitro refused the API key or project (HTTP {status}; check qubitro.api_key, its \
                            permissions and qubitro.project_id); pausing all cloud calls for {} s",
                        pause.as_secs()
                    );
                }
                let wait = self.health.pause_remaining(now).unwrap_or(pause);
                self.retry_later(sensor, rec, wait, Some(format!("HTTP {status}")), false)
                    .await
            }
            CloudError::Rejected { status, message } => {
                self.health.answered();
                // The create can never succeed as sent: forget the sensor so that a
                // corrected announce starts afresh, and say why.
                if !records::abandon(&self.store, sensor, rec.generation)? {
                    return Ok(Next::Done); // forgotten meanwhile
                }
                metrics::error();
                tracing::warn!(
                    sensor_id = sensor,
                    status,
                    detail = %message,
                    outcome = "rejected",
                    duration_ms = self.clock.wall_ms().saturating_sub(rec.first_seen_ms),
                    "Qubitro rejected the device of sensor {sensor} (HTTP {status}): {message}"
                );
                let text = format!("Qubitro rejected the device (HTTP {status}): {message}");
                // The same spec re-announced is refused from memory for a while.
                let blocked = self.rejections.record(
                    sensor,
                    &rec.spec,
                    &format!("HTTP {status}: {message}"),
                    now,
                );
                tracing::debug!(
                    sensor_id = sensor,
                    blocked_s = blocked.as_secs(),
                    "the same announce of {sensor} is refused without a cloud call for {} s",
                    blocked.as_secs()
                );
                let mut routes = vec![rec.route.clone()];
                routes.extend(self.onboardings.take_waiting(sensor));
                for route in routes {
                    let reply = Reply::error(
                        sensor,
                        ReplyCode::RejectedByCloud,
                        text.clone(),
                        route.request_id.clone(),
                    );
                    self.outbox.send(sensor, &route, reply, None).await;
                }
                Ok(Next::Done)
            }
        }
    }

    /// Persists the next attempt time (no flush: losing it only retries sooner) and
    /// tells the sensor to wait.
    async fn retry_later(
        &self,
        sensor: &str,
        rec: &Record,
        wait: Duration,
        reason: Option<String>,
        failure: bool,
    ) -> Result<Next, StoreError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let retry = Transition::RetryLater {
            wait_ms,
            reason,
            failure,
        };
        let Some((rec, _)) = self.transition(sensor, rec, retry)? else {
            return Ok(Next::Done);
        };
        metrics::pending_reply();
        let reply = Reply::pending(
            sensor,
            wait.as_secs_f64().ceil() as u64,
            rec.route.request_id.clone(),
        );
        self.outbox.send(sensor, &rec.route, reply, None).await;
        Ok(Next::RetryIn(wait))
    }
}

/// A failed lookup can never be the sensor's fault: a 4xx there means the API
/// changed or the project is wrong, so it is retried (or paused), never rejected.
fn lookup_error(e: CloudError) -> CloudError {
    match e {
        CloudError::Rejected { status, .. } => CloudError::Retryable {
            reason: format!("lookup answered HTTP {status}"),
            retry_after: None,
            maybe_created: false,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_jitter_is_used_when_the_cloud_says_nothing() {
        assert_eq!(retry_wait(ms(700), None, false, CAP, TIMEOUT), ms(700));
        assert_eq!(retry_wait(ms(0), None, false, CAP, TIMEOUT), MIN_RETRY);
    }

    #[test]
    fn retry_after_is_a_floor_and_twice_it_a_ceiling() {
        let ra = Some(Duration::from_secs(2));
        assert_eq!(retry_wait(ms(100), ra, false, CAP, TIMEOUT), ms(2000));
        assert_eq!(retry_wait(ms(3000), ra, false, CAP, TIMEOUT), ms(3000));
        assert_eq!(retry_wait(ms(9000), ra, false, CAP, TIMEOUT), ms(4000));
    }

    #[test]
    fn a_huge_retry_after_saturates_and_is_clamped_to_the_cap() {
        let huge = Some(Duration::from_secs(u64::MAX));
        assert_eq!(retry_wait(ms(100), huge, false, CAP, TIMEOUT), CAP);
        assert_eq!(retry_wait(Duration::MAX, huge, false, CAP, TIMEOUT), CAP);
    }

    #[test]
    fn after_a_possible_create_the_lookup_waits_for_the_request_timeout() {
        assert_eq!(retry_wait(ms(100), None, true, CAP, TIMEOUT), TIMEOUT);
        assert_eq!(retry_wait(ms(20_000), None, true, CAP, TIMEOUT), ms(20_000));
    }

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
