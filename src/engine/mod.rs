//! The onboarding engine: turns inbound messages into records, cloud devices and
//! replies. One stage per file, each given the state it touches:
//!
//! - [`inbound`]: what a message is, from its topic alone (pure).
//! - [`dispatch`]: one task takes messages in arrival order and decides what each
//!   gets (a reply from the store, an admission, a refusal); [`announce_route`]:
//!   where an announce is answered (its MQTT 5 properties); [`acker`]: acknowledges
//!   them to the broker, in arrival order, once their write is on disk and their
//!   bridged readings are forwarded or spilled ([`pacer`]: the spills' group commit).
//! - [`admit`]: the one place a new sensor (announced or discovered) becomes a
//!   `Pending` record: rules, flood limits, recent rejections.
//! - [`worker`]: one onboarding task per unfinished sensor drives its record through
//!   the transitions of [`crate::onboarding`], persisting each before the next side
//!   effect; [`health`]: what the cloud's last answers said.
//!   [`onboardings`]: the running tasks and the routes they owe; [`retry`]: how long
//!   a sensor waits before its next attempt.
//!   [`converge`]: after a create, the device every gateway in a race ends on.
//! - [`records`]: the only door through which a record changes.
//! - [`delivery`]: the replies, and the broker's acknowledgements that move a record
//!   from `Created` to `Delivered`; [`publisher`]: the trait replies and acks go
//!   through.
//! - [`discovered`]: discovery configs and state messages, in the same order and
//!   with the same acknowledgements as announces.
//! - [`rejections`]: specs Qubitro rejected recently, so the same announce again is
//!   refused without a cloud call (per-sensor exponential backoff, bounded).
//! - [`forget`]: `devices forget`, the same with or without a running daemon.
//!
//! This file holds what they share, and [`Engine`]: the wiring that owns the state,
//! lends each stage exactly its part, and spawns the tasks.

mod acker;
mod admit;
mod announce_route;
mod converge;
mod delivery;
mod discovered;
mod dispatch;
mod forget;
mod health;
mod inbound;
mod onboardings;
mod pacer;
mod publisher;
pub mod records;
mod rejections;
mod retry;
mod worker;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::clock::Clock;
use crate::cloud::Cloud;
use crate::config::Config;
use crate::heartbeat::Heartbeat;
use crate::mqtt::Inbox;
use crate::onboarding::owner::describe;
use crate::onboarding::Record;
use crate::security::Gatekeeper;
use crate::store::{Store, StoreError};

pub use acker::AckItem;
pub use announce_route::{MAX_CORRELATION_DATA_BYTES, MAX_RESPONSE_TOPIC_BYTES};
pub use delivery::Outbox;
use discovered::{Discovered, Discovery};
use dispatch::Dispatch;
pub use forget::forget_stored;
use health::CloudHealth;
use onboardings::Onboardings;
pub use publisher::{Outgoing, Pending, Publisher};
use rejections::Rejections;

/// Why the engine cannot go on: the daemon stops with a non-zero exit so systemd
/// restarts it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// sled failed: carrying on could lose data (its own flusher stops after an
    /// I/O error).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tells the bridge (when on) the device of a bridged sensor, so its readings flow.
/// A device another gateway owns is never told: its readings stay buffered, since
/// two gateways logged in as one device take each other's session over for ever.
pub fn bridge_device(bridge: Option<&Bridge>, sensor: &str, rec: &Record) -> bool {
    let (Some(bridge), true, Some(c)) = (bridge, rec.bridged, rec.credentials()) else {
        return false;
    };
    if let Some(owner) = rec.owned_elsewhere() {
        // Once per sensor and start, not per announce.
        if crate::metrics::owned_elsewhere(sensor, true) {
            tracing::warn!(sensor_id = sensor, device_id = %c.device_id, owner,
                "device {} of sensor {sensor} belongs to {}: its readings stay buffered here until \
                 `onboardd devices adopt {sensor}` on this gateway", c.device_id, describe(owner));
        }
        return false;
    }
    crate::metrics::owned_elsewhere(sensor, false);
    bridge.set_device(sensor, &c.device_id, &c.device_token.0);
    true
}

/// The first fatal error, shared by every task.
#[derive(Clone, Default)]
pub struct Fatal {
    token: CancellationToken,
    reason: Arc<Mutex<Option<Arc<EngineError>>>>,
}

impl Fatal {
    pub fn trigger(&self, error: impl Into<EngineError>) {
        let error = error.into();
        tracing::error!(error = %error, "fatal error: stopping so that systemd restarts onboardd: {error}");
        let mut r = self
            .reason
            .lock()
            .expect("the fatal lock is never poisoned");
        if r.is_none() {
            *r = Some(Arc::new(error));
        }
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<Arc<EngineError>> {
        self.reason
            .lock()
            .expect("the fatal lock is never poisoned")
            .clone()
    }

    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

/// When the engine stops: `stop` ends waits and admits no new work; `abort` then
/// cancels cloud calls still running (their state is on disk at every step, and a
/// `Creating` sensor is looked up before any further create, so stopping anywhere
/// is safe); `fatal` is how any task asks the daemon to stop on an error.
#[derive(Clone, Default)]
pub struct Shutdown {
    pub stop: CancellationToken,
    pub abort: CancellationToken,
    pub fatal: Fatal,
}

/// The engine's state, and the tasks that run its stages over it.
pub struct Engine {
    cfg: Arc<Config>,
    clock: Clock,
    store: Store,
    cloud: Cloud,
    /// Replies to sensors.
    outbox: Outbox,
    /// Claims, rules and flood limits.
    gate: Gatekeeper,
    /// The onboarding tasks and the routes waiting for their outcome.
    onboardings: Onboardings,
    /// Whether Qubitro answers, and the pause after it refused the API key.
    health: CloudHealth,
    /// Specs Qubitro rejected recently: the same one is refused without a call.
    rejections: Rejections,
    /// Forwards the readings of bridged sensors (`None`: `[bridge] enabled = false`).
    bridge: Option<Bridge>,
    /// What each inbound topic is (readings, discovery, announces).
    routes: inbound::Routes,
    /// Zero-firmware onboarding (`None`: `[discovery]` off, the default).
    discovery: Option<Discovery>,
    shutdown: Shutdown,
    fatal: Fatal,
}

impl Engine {
    pub fn new(
        cfg: Arc<Config>,
        clock: Clock,
        store: Store,
        cloud: Cloud,
        publisher: Arc<dyn Publisher>,
        bridge: Option<Bridge>,
        shutdown: Shutdown,
    ) -> Result<Arc<Engine>, StoreError> {
        Ok(Arc::new(Engine {
            discovery: Discovery::open(&cfg, &store, clock.wall_ms())?,
            routes: inbound::Routes::new(&cfg, bridge.is_some()),
            bridge,
            onboardings: Onboardings::new(&cfg),
            health: CloudHealth::default(),
            rejections: Rejections::default(),
            outbox: Outbox::new(&cfg, publisher),
            gate: Gatekeeper::new(&cfg),
            cfg,
            clock,
            store,
            cloud,
            fatal: shutdown.fatal.clone(),
            shutdown,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cloud(&self) -> &Cloud {
        &self.cloud
    }

    /// The telemetry bridge, when `[bridge] enabled`.
    pub fn bridge(&self) -> Option<&Bridge> {
        self.bridge.as_ref()
    }

    /// The state admission reads and changes.
    fn admission(&self) -> admit::Admission<'_> {
        admit::Admission {
            store: &self.store,
            gate: &self.gate,
            rejections: &self.rejections,
        }
    }

    /// The dispatcher over the engine's state; it starts onboardings through us.
    fn dispatch_stage(self: &Arc<Self>) -> Dispatch<'_> {
        Dispatch {
            cfg: &self.cfg,
            clock: &self.clock,
            store: &self.store,
            routes: &self.routes,
            gate: &self.gate,
            admission: self.admission(),
            onboardings: &self.onboardings,
            launch: self,
            outbox: &self.outbox,
            bridge: self.bridge.as_ref(),
            discovery: self.discovery.as_ref().map(|state| Discovered {
                state,
                gateway_id: &self.cfg.gateway_id,
                clock: &self.clock,
                store: &self.store,
                admission: self.admission(),
                launch: self,
                publisher: self.outbox.publisher(),
                bridge: self.bridge.as_ref(),
            }),
        }
    }

    /// Handles announces (and readings, discovery) in arrival order until shutdown.
    pub async fn run_dispatcher(
        self: Arc<Self>,
        inbox: Inbox,
        acks: mpsc::Sender<AckItem>,
        heartbeat: Arc<Heartbeat>,
    ) {
        let (stop, fatal) = (&self.shutdown.stop, &self.fatal);
        self.dispatch_stage()
            .run(inbox, acks, &heartbeat, stop, fatal)
            .await;
    }

    /// Acknowledges what the dispatcher handled, in order, once durable.
    pub async fn run_acker(self: Arc<Self>, acks: mpsc::Receiver<AckItem>) {
        let publisher = self.outbox.publisher();
        acker::acknowledge(
            &self.store,
            publisher,
            acks,
            Duration::from_millis(self.cfg.bridge.spill_flush_ms),
            &self.shutdown.abort,
            &self.fatal,
        )
        .await;
    }

    /// Discovery's followed state topics, subscribed from the start (restart).
    pub fn follow_discovered(&self) -> usize {
        let publisher = self.outbox.publisher();
        self.discovery
            .as_ref()
            .map_or(0, |d| d.follow_all(publisher))
    }

    /// Sensors whose onboarding runs right now.
    pub fn pending_now(&self) -> u64 {
        self.onboardings.active_count() as u64
    }

    /// One line on the cloud for STATUS= and the journal.
    pub fn cloud_status(&self) -> String {
        self.health.describe(self.clock.now())
    }

    /// Restarts the onboarding of every sensor the store says is unfinished. Call
    /// before the dispatcher starts, so no record is picked up twice.
    pub fn resume_from_store(self: &Arc<Self>) -> Result<usize, StoreError> {
        let unfinished = self.store.unfinished()?;
        let n = unfinished.len();
        for (sensor, rec) in unfinished {
            let wait = self.onboardings.until_due(&rec, self.clock.wall_ms());
            self.spawn_onboarding(sensor, wait);
        }
        Ok(n)
    }

    /// `devices forget`: what is stored goes ([`forget_stored`]), with the
    /// cool-down and waiting routes, so the next announce onboards the sensor anew.
    /// A create still in flight for it finds the record gone (its generation no
    /// longer matches) and writes nothing.
    pub async fn forget(&self, sensor: &str) -> Result<Option<Record>, StoreError> {
        let old = forget_stored(&self.store, self.bridge.as_ref(), sensor).await?;
        self.gate.forgotten(sensor);
        self.rejections.forget(sensor);
        self.onboardings.take_waiting(sensor);
        if old.is_some() {
            crate::metrics::owned_elsewhere(sensor, false);
            tracing::info!(sensor_id = sensor, "sensor forgotten by the operator");
        }
        Ok(old)
    }

    /// `devices adopt`: this gateway bridges the sensor's device from now on,
    /// whichever gateway made it ([`records::adopt`]); its buffered readings flow.
    pub async fn adopt(&self, sensor: &str) -> Result<records::Applied, StoreError> {
        let applied = records::adopt(&self.store, sensor, self.clock.wall_ms()).await?;
        if let records::Applied::Written(rec, _) = &applied {
            bridge_device(self.bridge.as_ref(), sensor, rec);
        }
        Ok(applied)
    }

    /// `devices unignore`: lifts `sensor` from the ignore list and, when discovery
    /// knows its device with an entity, onboards it now rather than at the next
    /// subscribe. `None`: it was not on the list.
    pub async fn unignore(self: &Arc<Self>, sensor: &str) -> Result<Option<bool>, StoreError> {
        let Some(seq) = self.store.unignore(sensor)? else {
            return Ok(None);
        };
        let stage = self.dispatch_stage();
        let now = match &stage.discovery {
            Some(d) => d.onboard_known(sensor)?,
            None => None,
        };
        self.store.durable(seq.max(now.unwrap_or(0))).await?;
        Ok(Some(now.is_some()))
    }

    /// Waits (bounded) for onboarding tasks to reach a safe point after `stop`,
    /// then cancels the cloud calls still running.
    pub async fn wind_down(&self, within: Duration) -> bool {
        self.onboardings.tasks.close();
        let done = tokio::time::timeout(within, self.onboardings.tasks.wait())
            .await
            .is_ok();
        self.shutdown.abort.cancel();
        done
    }
}
