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
//!
//! The tasks (spawn, wait, stop) are the engine's; each attempt is [`Steps`], which
//! holds exactly the state the cloud steps read and write, so they are unit-tested
//! against the fake Qubitro with no broker.

use std::sync::Arc;
use std::time::Duration;

use super::converge::converge;
use super::delivery::{Delivery, Outbox};
use super::health::CloudHealth;
use super::onboardings::{Launch, Onboardings};
use super::records::{self, Transition};
use super::rejections::Rejections;
use super::retry::retry_wait;
use super::{bridge_device, Engine};
use crate::bridge::Bridge;
use crate::clock::Clock;
use crate::cloud::Cloud;
use crate::cloud::CloudError;
use crate::config::{Config, LookupPolicy};
use crate::device::Credentials;
use crate::failpoint;
use crate::metrics;
use crate::onboarding::owner::owner_of;
use crate::onboarding::{Origin, Record, State};
use crate::reply::{Reply, ReplyCode};
use crate::store::{Store, StoreError};

/// What an onboarding task does after one attempt.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Done,
    RetryIn(Duration),
}

impl Launch for Arc<Engine> {
    fn launch(&self, sensor: String, delay: Duration) {
        self.spawn_onboarding(sensor, delay);
    }
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
                    delay = self.onboardings.until_due(&rec, self.clock.wall_ms());
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
            let steps = self.steps();
            let step = tokio::select! {
                r = steps.attempt(sensor) => r,
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

    /// The cloud steps over the engine's state.
    fn steps(&self) -> Steps<'_> {
        Steps {
            cfg: &self.cfg,
            clock: &self.clock,
            store: &self.store,
            cloud: &self.cloud,
            health: &self.health,
            rejections: &self.rejections,
            onboardings: &self.onboardings,
            outbox: &self.outbox,
            delivery: self.delivery(),
            bridge: self.bridge.as_ref(),
        }
    }
}

/// The cloud steps of one sensor's onboarding, and everything they read or write.
pub(super) struct Steps<'a> {
    cfg: &'a Config,
    clock: &'a Clock,
    store: &'a Store,
    cloud: &'a Cloud,
    health: &'a CloudHealth,
    /// Remembers a spec Qubitro rejected, so the same announce is refused from memory.
    rejections: &'a Rejections,
    /// The routes still owed an answer.
    onboardings: &'a Onboardings,
    /// Pending and error replies.
    outbox: &'a Outbox,
    /// The ok replies.
    delivery: Delivery<'a>,
    /// Told the device of a bridged sensor once it exists.
    bridge: Option<&'a Bridge>,
}

impl Steps<'_> {
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
            let found = match self.cloud.find_device(sensor).await {
                Ok(found) => found,
                Err(e) => return self.failed(sensor, &rec, lookup_error(e)).await,
            };
            if let Some(found) = found {
                let owner = owner_of(found.gateway_id.as_deref(), &self.cfg.gateway_id);
                return match self.cloud.get(&found.id).await {
                    Ok(creds) => {
                        self.finish(sensor, &rec, creds, Origin::Adopted, owner)
                            .await
                    }
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
                let gateway = &self.cfg.gateway_id;
                let (creds, origin, owner) =
                    converge(self.cloud, gateway, sensor, &rec.spec, creds).await;
                self.finish(sensor, &rec, creds, origin, owner).await
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
        Ok(records::apply(self.store, sensor, rec.generation, &t, now)?.written())
    }

    /// Stores the credentials durably, then publishes them.
    async fn finish(
        &self,
        sensor: &str,
        rec: &Record,
        creds: Credentials,
        origin: Origin,
        owner: Option<String>,
    ) -> Result<Next, StoreError> {
        self.health.answered();
        let now = self.clock.wall_ms();
        let created = Transition::Created {
            credentials: creds.clone(),
            origin,
            owner,
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
        bridge_device(self.bridge, sensor, &rec);
        metrics::onboarded(origin == Origin::Adopted);
        tracing::info!(
            sensor_id = sensor,
            device_id = %creds.device_id,
            outcome = origin.as_str(),
            attempts = rec.attempts + 1,
            duration_ms = now.saturating_sub(rec.first_seen_ms),
            "onboarded"
        );
        self.delivery.deliver_ok(sensor, &rec, &rec.route).await?;
        self.onboardings.replied(sensor, self.clock.now());
        for route in self.onboardings.take_waiting(sensor) {
            if route != rec.route {
                self.delivery.deliver_ok(sensor, &rec, &route).await?;
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
                if !records::abandon(self.store, sensor, rec.generation)? {
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
                    self.onboardings.replied(sensor, self.clock.now());
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
        self.onboardings.replied(sensor, self.clock.now());
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
    use crate::reply::Route;
    use tokio::time::Instant;

    /// The cloud steps against the project's fake Qubitro over real HTTP, a real
    /// store and a recording publisher: no broker.
    struct World {
        fake: fake_qubitro::FakeQubitro,
        cfg: Config,
        clock: Clock,
        store: Store,
        cloud: Cloud,
        health: CloudHealth,
        rejections: Rejections,
        onboardings: Onboardings,
        outbox: Outbox,
        sent: Arc<crate::engine::publisher::Recording>,
        _dir: tempfile::TempDir,
    }

    impl World {
        async fn new() -> World {
            let fake = fake_qubitro::FakeQubitro::start(fake_qubitro::FakeOptions::default())
                .await
                .unwrap();
            let cfg = Config::from_toml(&format!(
                "[qubitro]\nbase_url = \"{}\"\nproject_id = \"{}\"\napi_key = \"{}\"\n\
                 request_timeout_ms = 3000\n[security]\nrequire_claim = false",
                fake.base_url(),
                fake.project_id(),
                fake.api_key()
            ))
            .unwrap();
            let (store, _dir) = crate::engine::records::tests::store();
            let sent = Arc::new(crate::engine::publisher::Recording::default());
            World {
                cloud: Cloud::new(&cfg.qubitro).unwrap(),
                onboardings: Onboardings::new(&cfg),
                outbox: Outbox::new(&cfg, sent.clone()),
                health: CloudHealth::default(),
                rejections: Rejections::default(),
                clock: Clock::System,
                fake,
                cfg,
                store,
                sent,
                _dir,
            }
        }

        fn steps(&self) -> Steps<'_> {
            Steps {
                cfg: &self.cfg,
                clock: &self.clock,
                store: &self.store,
                cloud: &self.cloud,
                health: &self.health,
                rejections: &self.rejections,
                onboardings: &self.onboardings,
                outbox: &self.outbox,
                delivery: Delivery {
                    store: &self.store,
                    outbox: &self.outbox,
                    clock: &self.clock,
                    discovery_on: false,
                },
                bridge: None,
            }
        }

        fn pending(&self, sensor: &str) -> Record {
            let rec = Record::pending(crate::announce::test_spec(), Route::default(), 5, 1);
            self.store.insert_new(sensor, &rec).unwrap().unwrap();
            rec
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_sensors_device_is_recorded_before_its_token_goes_out() {
        let w = World::new().await;
        w.pending("s");
        assert_eq!(w.steps().attempt("s").await.unwrap(), Next::Done);
        let rec = w.store.get("s").unwrap().unwrap();
        let device = &w.fake.devices()[0];
        assert_eq!(rec.credentials().unwrap().device_id, device.id);
        assert_eq!(
            rec.state.name(),
            "created",
            "delivered only on the broker's word"
        );
        let sent = w.sent.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert!(sent[0].track.is_some(), "the ok reply is tracked");
        let reply = &w.sent.replies()[0].1;
        assert_eq!(
            (reply["status"].as_str(), reply["device_token"].as_str()),
            (Some("ok"), Some(device.token.as_str()))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rejected_create_deletes_the_record_says_why_and_remembers_the_spec() {
        let w = World::new().await;
        let rec = w.pending("s");
        let fault = fake_qubitro::Fault::Status {
            status: 400,
            retry_after: None,
            body: None,
        };
        w.fake
            .push_faults(fake_qubitro::Endpoint::Create, vec![fault]);
        assert_eq!(w.steps().attempt("s").await.unwrap(), Next::Done);
        assert_eq!(
            w.store.get("s").unwrap(),
            None,
            "a corrected announce starts afresh"
        );
        let reply = &w.sent.replies()[0].1;
        assert_eq!(reply["code"], "rejected_by_cloud", "{reply}");
        assert!(w.rejections.check("s", &rec.spec, Instant::now()).is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unavailable_cloud_counts_an_attempt_and_tells_the_sensor_to_wait() {
        let w = World::new().await;
        w.pending("s");
        let fault = fake_qubitro::Fault::Status {
            status: 503,
            retry_after: None,
            body: None,
        };
        w.fake
            .push_faults(fake_qubitro::Endpoint::Create, vec![fault]);
        assert!(matches!(
            w.steps().attempt("s").await.unwrap(),
            Next::RetryIn(_)
        ));
        let rec = w.store.get("s").unwrap().unwrap();
        assert_eq!((rec.state.name(), rec.attempts), ("creating", 1));
        assert!(rec.last_error.is_some());
        assert_eq!(w.sent.replies()[0].1["status"], "pending");
    }
}
