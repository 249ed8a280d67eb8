//! The onboarding state machine.
//!
//! - The **dispatcher** takes announces one at a time, in arrival order: it parses
//!   and checks them, answers known sensors from the store (no disk write), and
//!   records a new sensor as `Pending` in the store.
//! - The **acker** acknowledges announces to the broker in arrival order, each only
//!   once its record is on disk (shared group-commit flushes). So an announce is
//!   either durably recorded or still the broker's to deliver again: none is lost.
//!   Acknowledging before the cloud call (not after) keeps the broker's in-flight
//!   window free, so the cloud in-flight limit is what bounds throughput.
//! - One **onboarding task** per pending sensor drives
//!   `Pending → (lookup) → Creating → Created`, persisting each step before the
//!   next side effect: `Creating` is on disk before the create is sent, `Created`
//!   before the token is published. A crash anywhere leaves a state from which the
//!   restart neither loses the sensor nor creates a second device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::announce::{self, AnnounceError};
use crate::backoff::Backoff;
use crate::cloud::{Cloud, CloudError};
use crate::config::{Config, LookupPolicy};
use crate::failpoint;
use crate::metrics;
use crate::mqtt::{Mqtt, SessionEvent};
use crate::reply::{allowed_response_topic, Broker, Credentials, Reply, Route};
use crate::security::Gatekeeper;
use crate::store::{now_ms, Phase, SensorRecord, Store, StoreError};

/// Routes kept per pending sensor for announces that arrive while it is pending.
const MAX_WAITING_ROUTES: usize = 16;

/// An announce waiting for its acknowledgement.
pub struct AckItem {
    publish: Publish,
    /// Write that must be on disk first (0: none).
    seq: u64,
}

/// What the dispatcher decided for one announce.
struct Decision {
    /// Write that must be on disk before the ack (0: none).
    seq: u64,
    /// Reply to publish right away: (sensor, route, reply).
    reply: Option<(String, Route, Reply)>,
}

impl Decision {
    fn none() -> Self {
        Decision {
            seq: 0,
            reply: None,
        }
    }
}

/// What an onboarding task does after one attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Done,
    RetryIn(Duration),
}

/// A fatal condition: the daemon stops with a non-zero exit so systemd restarts it.
#[derive(Clone, Default)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Fatal {
    pub fn trigger(&self, reason: String) {
        tracing::error!(reason = %reason, "fatal error: stopping so that systemd restarts onboardd");
        let mut r = self
            .reason
            .lock()
            .expect("the fatal lock is never poisoned");
        if r.is_none() {
            *r = Some(reason);
        }
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .expect("the fatal lock is never poisoned")
            .clone()
    }
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

pub struct Engine {
    cfg: Arc<Config>,
    store: Store,
    cloud: Cloud,
    mqtt: Mqtt,
    gate: Gatekeeper,
    /// Cancelled at shutdown: onboarding tasks stop at their next await point
    /// (their state is on disk at every step, so stopping anywhere is safe).
    stop: CancellationToken,
    fatal: Fatal,
    tasks: TaskTracker,
    /// Extra reply routes of sensors that announced again while pending.
    waiting: Mutex<HashMap<String, Vec<Route>>>,
    /// After a 401/403 every cloud call waits until then: no retry storm.
    paused_until: Mutex<Option<Instant>>,
    /// Sensors with a live onboarding task: never two tasks for one sensor. Its size
    /// is the number of sensors pending right now.
    active: Mutex<std::collections::HashSet<String>>,
    backoff: Backoff,
    /// Onboarding attempts in progress (each holds at most one cloud request at a time).
    workers: Arc<Semaphore>,
    broker: Broker,
}

impl Engine {
    pub fn new(
        cfg: Arc<Config>,
        store: Store,
        cloud: Cloud,
        mqtt: Mqtt,
        stop: CancellationToken,
        fatal: Fatal,
    ) -> Arc<Engine> {
        let q = &cfg.qubitro;
        Arc::new(Engine {
            backoff: Backoff::new(
                Duration::from_millis(q.retry_initial_ms),
                Duration::from_millis(q.retry_max_ms),
            ),
            // Twice the request limit: while one attempt waits for its fsync or its
            // reply, another can already use the freed request slot, so the cloud's
            // in-flight limit is really used (the cloud client enforces the limit).
            workers: Arc::new(Semaphore::new(q.max_in_flight * 2)),
            broker: Broker {
                host: q.broker_host.clone(),
                port: q.broker_port,
            },
            gate: Gatekeeper::new(&cfg),
            cfg,
            store,
            cloud,
            mqtt,
            stop,
            fatal,
            tasks: TaskTracker::new(),
            waiting: Mutex::new(HashMap::new()),
            paused_until: Mutex::new(None),
            active: Mutex::new(std::collections::HashSet::new()),
        })
    }

    pub fn pending_now(&self) -> u64 {
        self.active.lock().expect("never poisoned").len() as u64
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cloud(&self) -> &Cloud {
        &self.cloud
    }

    /// Whether the cloud is paused after an authentication failure (for STATUS=).
    pub fn cloud_paused(&self) -> bool {
        self.paused_until
            .lock()
            .expect("never poisoned")
            .is_some_and(|t| t > Instant::now())
    }

    /// Restarts the onboarding of every sensor the store says is unfinished.
    pub fn resume_from_store(self: &Arc<Self>) -> Result<usize, StoreError> {
        let now = now_ms();
        let cap = self.backoff.max;
        let unfinished = self.store.unfinished()?;
        let n = unfinished.len();
        for (sensor, rec) in unfinished {
            // Never trust a stored time further ahead than one backoff cap: the
            // clock of a Pi without RTC can jump.
            let wait = Duration::from_millis(rec.next_attempt_ms.saturating_sub(now)).min(cap);
            self.spawn_onboarding(sensor, wait);
        }
        Ok(n)
    }

    fn spawn_onboarding(self: &Arc<Self>, sensor: String, delay: Duration) {
        if !self
            .active
            .lock()
            .expect("never poisoned")
            .insert(sensor.clone())
        {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            me.onboarding_task(&sensor, delay).await;
            me.active.lock().expect("never poisoned").remove(&sensor);
        });
    }

    async fn onboarding_task(self: &Arc<Self>, sensor: &str, mut delay: Duration) {
        loop {
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.cancelled() => return,
                }
            }
            let permit = tokio::select! {
                p = self.workers.clone().acquire_owned() => p.expect("the worker semaphore is never closed"),
                _ = self.stop.cancelled() => return,
            };
            let step = tokio::select! {
                r = self.attempt(sensor) => r,
                _ = self.stop.cancelled() => return,
            };
            drop(permit);
            match step {
                Ok(Next::Done) => return,
                Ok(Next::RetryIn(d)) => delay = d,
                Err(e) => {
                    self.fatal.trigger(e.to_string());
                    return;
                }
            }
        }
    }

    /// One step of one sensor's onboarding, from whatever state the store holds.
    async fn attempt(self: &Arc<Self>, sensor: &str) -> Result<Next, StoreError> {
        let Some(mut rec) = self.store.get(sensor)? else {
            return Ok(Next::Done); // forgotten meanwhile
        };
        if let Phase::Created { .. } = rec.phase {
            return Ok(Next::Done);
        }
        if let Some(wait) = self.pause_remaining() {
            return self.note_pending(sensor, &mut rec, wait, None).await;
        }

        let lookup = matches!(
            (self.cfg.qubitro.lookup_before_create, &rec.phase),
            (LookupPolicy::Always, _) | (LookupPolicy::AfterFailure, Phase::Creating)
        );
        if lookup {
            let found = match self.cloud.find_by_sensor(sensor).await {
                Ok(found) => found,
                Err(e) => return self.failed(sensor, &mut rec, lookup_error(e)).await,
            };
            if let Some(device_id) = found {
                return match self.cloud.get(&device_id).await {
                    Ok(creds) => self.finish(sensor, rec, creds, true).await,
                    Err(e) => self.failed(sensor, &mut rec, lookup_error(e)).await,
                };
            }
        }

        if rec.phase == Phase::Pending {
            // On disk before the request leaves: after a crash from here on, the
            // restart looks the sensor up instead of blindly creating again.
            rec.phase = Phase::Creating;
            rec.updated_ms = now_ms();
            let seq = self.store.put(sensor, &rec)?;
            self.store.durable(seq).await?;
            failpoint::hit("after_creating_recorded");
        }
        match self.cloud.create(&rec.spec).await {
            Ok(creds) => {
                failpoint::hit("after_create_response");
                self.finish(sensor, rec, creds, false).await
            }
            Err(e) => self.failed(sensor, &mut rec, e).await,
        }
    }

    /// Stores the credentials durably, then publishes them.
    async fn finish(
        self: &Arc<Self>,
        sensor: &str,
        mut rec: SensorRecord,
        creds: Credentials,
        adopted: bool,
    ) -> Result<Next, StoreError> {
        rec.phase = Phase::Created {
            device_id: creds.device_id.clone(),
            device_token: creds.device_token.clone(),
            delivered: false,
        };
        rec.updated_ms = now_ms();
        rec.last_error = None;
        let outcome = if adopted { "adopted" } else { "created" };
        rec.origin = Some(outcome.to_string());
        let seq = self.store.put(sensor, &rec)?;
        self.store.durable(seq).await?;
        failpoint::hit("after_created_recorded");
        metrics::onboarded(adopted);
        let took = Duration::from_millis(now_ms().saturating_sub(rec.first_seen_ms));
        tracing::info!(
            sensor_id = sensor,
            device_id = %creds.device_id,
            outcome,
            attempts = rec.attempts + 1,
            duration_ms = took.as_millis() as u64,
            "onboarded"
        );
        self.deliver_ok(sensor, &rec.route, &creds).await;
        for route in self.take_waiting(sensor) {
            if route != rec.route {
                self.send(sensor, &route, self.ok_reply(sensor, &route, &creds), false)
                    .await;
            }
        }
        failpoint::hit("after_reply_published");
        Ok(Next::Done)
    }

    async fn failed(
        self: &Arc<Self>,
        sensor: &str,
        rec: &mut SensorRecord,
        err: CloudError,
    ) -> Result<Next, StoreError> {
        match err {
            CloudError::Retryable {
                reason,
                retry_after,
                ..
            } => {
                let jitter = self.backoff.full_jitter(rec.attempts);
                let wait = retry_after.map_or(jitter, |ra| ra.max(jitter.min(ra * 2)));
                let wait = wait.max(Duration::from_millis(50));
                rec.attempts = rec.attempts.saturating_add(1);
                tracing::warn!(
                    sensor_id = sensor,
                    attempt = rec.attempts,
                    retry_in_ms = wait.as_millis() as u64,
                    reason = %reason,
                    "Qubitro unavailable; will retry"
                );
                self.note_pending(sensor, rec, wait, Some(reason)).await
            }
            CloudError::Operator { status } => {
                let pause = Duration::from_secs(self.cfg.qubitro.auth_failure_backoff_s);
                let newly = {
                    let mut p = self.paused_until.lock().expect("never poisoned");
                    let fresh = p.is_none_or(|t| t <= Instant::now());
                    if fresh {
                        *p = Some(Instant::now() + pause);
                    }
                    fresh
                };
                if newly {
                    tracing::error!(
                        status,
                        pause_s = pause.as_secs(),
                        "OPERATOR ERROR: Qubitro refused the API key or project (check qubitro.api_key, its permissions and qubitro.project_id); pausing all cloud calls"
                    );
                }
                let wait = self.pause_remaining().unwrap_or(pause);
                self.note_pending(sensor, rec, wait, Some(format!("HTTP {status}")))
                    .await
            }
            CloudError::Rejected { status, message } => {
                // The request can never succeed as sent: forget the sensor so that a
                // corrected announce starts afresh, and say why.
                self.store.remove(sensor)?;
                metrics::error();
                tracing::warn!(
                    sensor_id = sensor,
                    status,
                    detail = %message,
                    outcome = "rejected",
                    duration_ms = now_ms().saturating_sub(rec.first_seen_ms),
                    "Qubitro rejected the device"
                );
                let text = format!("Qubitro rejected the device (HTTP {status}): {message}");
                let mut routes = vec![rec.route.clone()];
                routes.extend(self.take_waiting(sensor));
                for route in routes {
                    let reply = Reply::error(
                        sensor,
                        "rejected_by_cloud",
                        text.clone(),
                        route.request_id.clone(),
                    );
                    self.send(sensor, &route, reply, false).await;
                }
                Ok(Next::Done)
            }
        }
    }

    /// The extra routes owed an answer once the sensor's onboarding ends.
    fn take_waiting(&self, sensor: &str) -> Vec<Route> {
        self.waiting
            .lock()
            .expect("never poisoned")
            .remove(sensor)
            .unwrap_or_default()
    }

    /// Persists the next attempt time (no flush needed: losing it only retries sooner)
    /// and tells the sensor to wait.
    async fn note_pending(
        self: &Arc<Self>,
        sensor: &str,
        rec: &mut SensorRecord,
        wait: Duration,
        error: Option<String>,
    ) -> Result<Next, StoreError> {
        rec.next_attempt_ms = now_ms() + wait.as_millis() as u64;
        rec.updated_ms = now_ms();
        if error.is_some() {
            rec.last_error = error;
        }
        self.store.put(sensor, rec)?;
        metrics::pending_reply();
        let reply = Reply::pending(
            sensor,
            wait.as_secs_f64().ceil() as u64,
            rec.route.request_id.clone(),
        );
        self.send(sensor, &rec.route, reply, false).await;
        Ok(Next::RetryIn(wait))
    }

    fn pause_remaining(&self) -> Option<Duration> {
        let p = self.paused_until.lock().expect("never poisoned");
        let now = Instant::now();
        match *p {
            // Spread the sensors over a short window after the pause, so they do not
            // all hit the cloud in the same millisecond.
            Some(t) if t > now => Some(t - now + Duration::from_millis(fastrand::u64(0..2000))),
            _ => None,
        }
    }

    fn ok_reply(&self, sensor: &str, route: &Route, creds: &Credentials) -> Reply {
        Reply::Ok {
            sensor_id: sensor.to_string(),
            device_id: creds.device_id.clone(),
            device_token: creds.device_token.clone(),
            request_id: route.request_id.clone(),
            broker: self.broker.clone(),
        }
    }

    /// Publishes the ok reply of a newly onboarded sensor, tracked until the broker acks it.
    async fn deliver_ok(&self, sensor: &str, route: &Route, creds: &Credentials) {
        self.send(sensor, route, self.ok_reply(sensor, route, creds), true)
            .await;
    }

    async fn send(&self, sensor: &str, route: &Route, reply: Reply, track: bool) {
        let topic = route.topic(&self.cfg.mqtt.reply_topic, sensor);
        tracing::debug!(sensor_id = sensor, topic = %topic, status = reply.status(), "reply");
        if let Err(e) = self
            .mqtt
            .publish(
                topic,
                reply.to_bytes(),
                route.correlation_data.clone(),
                track.then(|| sensor.to_string()),
            )
            .await
        {
            tracing::warn!(sensor_id = sensor, error = %e, "cannot queue a reply");
        }
    }

    // ---------------------------------------------------------------- dispatcher

    /// Handles announces in arrival order until shutdown.
    pub async fn run_dispatcher(
        self: Arc<Self>,
        mut announces: mpsc::Receiver<Publish>,
        acks: mpsc::Sender<AckItem>,
        heartbeat: Arc<crate::daemon::Heartbeat>,
    ) {
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            heartbeat.beat_dispatcher();
            let publish = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                p = announces.recv() => match p { Some(p) => p, None => break },
                _ = beat.tick() => continue,
            };
            match self.dispatch(&publish) {
                Ok(Decision { seq, reply }) => {
                    if acks.send(AckItem { publish, seq }).await.is_err() {
                        break;
                    }
                    // Awaited here, not spawned: a flood then slows us down at the broker
                    // (unacknowledged announces) instead of piling up tasks in memory.
                    if let Some((sensor, route, reply)) = reply {
                        self.send(&sensor, &route, reply, false).await;
                    }
                }
                Err(e) => {
                    self.fatal.trigger(e.to_string());
                    break;
                }
            }
        }
    }

    /// Decides what one announce gets: the write to wait for before the ack, and
    /// the reply to send now, if any.
    fn dispatch(self: &Arc<Self>, p: &Publish) -> Result<Decision, StoreError> {
        metrics::announce();
        let cfg = &self.cfg;
        let topic = String::from_utf8_lossy(&p.topic);
        let Some(sensor) = announce::sensor_id_from_topic(&cfg.mqtt.announce_topic, &topic) else {
            metrics::error();
            tracing::warn!(
                topic = %topic.chars().take(128).collect::<String>(),
                "announce on a topic without a valid sensor id (1-64 of A-Z a-z 0-9 . _ : -); dropped, no safe topic to answer on"
            );
            return Ok(Decision::none());
        };
        let mut route = Route::default();
        if let Some(props) = &p.properties {
            if let Some(rt) = &props.response_topic {
                if allowed_response_topic(&cfg.mqtt.reply_topic, sensor, rt) {
                    route.response_topic = Some(rt.clone());
                } else {
                    tracing::warn!(sensor_id = sensor, "response topic outside the sensor's reply namespace; using the default reply topic");
                }
            }
            route.correlation_data = props.correlation_data.as_ref().map(|c| c.to_vec());
        }

        let parsed = announce::parse(
            sensor,
            &p.payload,
            cfg.announce.max_payload_bytes,
            &cfg.gateway_id,
        );
        let ann = match parsed {
            Ok(a) => a,
            Err(e) => {
                if !matches!(e, AnnounceError::PayloadTooLarge { .. }) {
                    route.request_id = announce::peek_request_id(&p.payload);
                }
                return Ok(self.reject(sensor, route, e.code(), e.to_string()));
            }
        };
        route.request_id = ann.request_id.clone();

        // Known and onboarded: the compact credentials tree answers (no full record,
        // no disk write).
        if let Some(creds) = self.store.credentials(sensor)? {
            if let Err(denied) = self.gate.check(&ann, true) {
                return Ok(self.reject(sensor, route, denied.code, denied.message));
            }
            return Ok(self.answer_known(sensor, route, &creds));
        }
        let existing = self.store.get(sensor)?;
        if let Err(denied) = self.gate.check(&ann, existing.is_some()) {
            return Ok(self.reject(sensor, route, denied.code, denied.message));
        }

        match existing {
            Some(rec) => {
                if let Some(creds) = rec.credentials() {
                    // Created, but without the shortcut (a crash between the two writes).
                    return Ok(self.answer_known(sensor, route, &creds));
                }
                // Pending: its task will answer this route too. (Should no task be
                // running for it, this starts one; otherwise it is a no-op.)
                let retry_in = rec.next_attempt_ms.saturating_sub(now_ms());
                self.spawn_onboarding(
                    sensor.to_string(),
                    Duration::from_millis(retry_in).min(self.backoff.max),
                );
                // Tell this announce to wait when the cloud has already failed, or when
                // too many answers are owed already (ask again rather than keep an
                // unbounded list); otherwise it is answered when the onboarding ends.
                let mut retry_after_s = (rec.attempts > 0).then(|| retry_in.div_ceil(1000));
                if route != rec.route {
                    let mut w = self.waiting.lock().expect("never poisoned");
                    let routes = w.entry(sensor.to_string()).or_default();
                    if !routes.contains(&route) {
                        if routes.len() < MAX_WAITING_ROUTES {
                            routes.push(route.clone());
                        } else {
                            retry_after_s.get_or_insert(1);
                        }
                    }
                }
                let reply = retry_after_s.map(|secs| {
                    let r = Reply::pending(sensor, secs, route.request_id.clone());
                    (sensor.to_string(), route, r)
                });
                // Its record may not be flushed yet: this ack waits for the same flush.
                Ok(Decision {
                    seq: self.store.last_write(),
                    reply,
                })
            }
            None => {
                let rec = SensorRecord::new_pending(ann.spec, route);
                match self.store.insert_new(sensor, &rec)? {
                    Some(seq) => {
                        failpoint::hit("after_pending_recorded");
                        self.gate.admitted(sensor);
                        tracing::info!(sensor_id = sensor, "new sensor; onboarding");
                        self.spawn_onboarding(sensor.to_string(), Duration::ZERO);
                        Ok(Decision { seq, reply: None })
                    }
                    None => Ok(Decision {
                        seq: self.store.last_write(),
                        reply: None,
                    }),
                }
            }
        }
    }

    /// A known sensor gets its stored credentials; nothing is written (SD wear).
    fn answer_known(&self, sensor: &str, route: Route, creds: &Credentials) -> Decision {
        metrics::cached_reply();
        tracing::debug!(sensor_id = sensor, "known sensor; answering from the store");
        let reply = self.ok_reply(sensor, &route, creds);
        Decision {
            seq: 0,
            reply: Some((sensor.to_string(), route, reply)),
        }
    }

    fn reject(&self, sensor: &str, route: Route, code: &str, message: String) -> Decision {
        metrics::error();
        tracing::warn!(sensor_id = sensor, code, detail = %message, outcome = "refused", "announce refused");
        let reply = Reply::error(sensor, code, message, route.request_id.clone());
        Decision {
            seq: 0,
            reply: Some((sensor.to_string(), route, reply)),
        }
    }

    // ---------------------------------------------------------------- acker

    /// Acknowledges announces in arrival order, each once its write is durable.
    /// Runs until the dispatcher is gone and every queued ack is sent.
    pub async fn run_acker(self: Arc<Self>, mut acks: mpsc::Receiver<AckItem>) {
        while let Some(item) = acks.recv().await {
            if item.seq > 0 {
                if let Err(e) = self.store.durable(item.seq).await {
                    // Not acknowledged: the broker will deliver it again.
                    self.fatal.trigger(e.to_string());
                    return;
                }
            }
            if let Err(e) = self.mqtt.ack(&item.publish).await {
                tracing::debug!(error = %e, "cannot queue an ack");
            }
            failpoint::hit("after_announce_acked");
        }
    }

    // ---------------------------------------------------------------- session

    /// Reacts to the MQTT session: status on connect, republishing unacknowledged
    /// ok replies when the session was lost, delivery marks on PUBACK.
    pub async fn run_session_events(self: Arc<Self>, mut events: mpsc::Receiver<SessionEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                SessionEvent::Connected { resume_lost } => {
                    if let Err(e) = self.mqtt.publish_status("online").await {
                        tracing::debug!(error = %e, "cannot queue the status");
                    }
                    if resume_lost {
                        if let Err(e) = self.republish_undelivered().await {
                            self.fatal.trigger(e.to_string());
                            return;
                        }
                    }
                }
                SessionEvent::Delivered(sensor) => {
                    let r = self.store.update(&sensor, |rec| match &mut rec.phase {
                        Phase::Created { delivered, .. } if !*delivered => {
                            *delivered = true;
                            true
                        }
                        _ => false,
                    });
                    if let Err(e) = r {
                        self.fatal.trigger(e.to_string());
                        return;
                    }
                }
            }
        }
    }

    async fn republish_undelivered(&self) -> Result<(), StoreError> {
        let mut todo = Vec::new();
        for (sensor, rec) in self.store.undelivered()? {
            if let Some(creds) = rec.credentials() {
                todo.push((sensor, rec.route.clone(), creds));
            }
        }
        if !todo.is_empty() {
            tracing::info!(
                count = todo.len(),
                "publishing again ok replies the broker never acknowledged"
            );
        }
        for (sensor, route, creds) in todo {
            self.deliver_ok(&sensor, &route, &creds).await;
        }
        Ok(())
    }

    /// Waits (bounded) for onboarding tasks to reach a safe point after `stop`.
    pub async fn wind_down(&self, within: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
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
