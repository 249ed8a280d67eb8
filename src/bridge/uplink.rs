//! The uplink: one MQTT connection per bridged device to Qubitro's broker, logged in
//! as that device (client id = username = device id, password = token), publishing
//! the device's buffered readings in order at QoS 1 to the topic equal to its id.
//!
//! Shape: [`Bridge::run`] is a scheduler that opens a device's connection when it
//! has data, keeps at most `bridge.max_connections` open (the least recently used is
//! closed first when another device needs a slot) and learns when each ends. Each
//! connection is a task of its own that closes itself after `bridge.idle_disconnect_s`
//! without data and reconnects with jittered backoff (`crate::backoff`; rumqttc
//! itself would retry at once, rumqtt#703).
//!
//! Which PUBACK is which: rumqttc does not say which packet id it gave a publish. A
//! connection keeps at most [`WINDOW`] readings outstanding, below the broker's
//! in-flight limit, so rumqttc never has to hold one back on a packet-id collision;
//! every publish request yields one `Outgoing::Publish(pkid)` in request order, and
//! the broker acknowledges QoS 1 publishes in the order it received them (MQTT 5
//! §4.6). So the outstanding readings form a queue whose front is the next PUBACK;
//! anything else (a collision, an ack out of order) ends the connection, and the
//! buffer — which holds every reading until its PUBACK — is read again from the
//! oldest. A reading is removed only after a PUBACK with reason Success, or 0x10 "no
//! matching subscribers", which MQTT 5 defines as accepted.
//!
//! Every connection attempt gets a fresh rumqttc client and event loop with clean
//! start: nothing rumqttc queued for an old connection (its resend queue, requests
//! still in its channel) can go out later, out of order. The event loop is polled
//! in a task of its own that never awaits a client call (rumqtt#263) and hands
//! every event to the connection's task.
//!
//! A refused login (bad token: the device was deleted in Qubitro) pauses that device
//! with one loud log line, visible through [`Bridge::device_status`], until a new
//! token is given ([`Bridge::set_device`]) or [`Bridge::resume`]; the others go on.
//! Two gateways bridging one device take each other's session over (the client id is
//! the device id): repeated DISCONNECTs with reason 0x8E — or connections the broker
//! closes without a word right after accepting the login, which is how mosquitto
//! 2.0 does it — are said loudly, and the reconnects back off instead of flapping.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, StateError};
use rumqttc::Outgoing;
use serde::Serialize;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::buffer::{Buffer, Limits};
use super::flatten::{flatten, Rejection};
use crate::backoff::Backoff;
use crate::config::{Config, Secret};
use crate::store::{Store, StoreError};

/// Readings outstanding (sent, not yet acknowledged) per connection. Below
/// mosquitto's default in-flight limit of 20, so no packet-id collision can occur.
pub const WINDOW: usize = 16;

/// The first wait before a reconnect; doubles up to `bridge.reconnect_max_ms`.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);

/// Takeovers within this window count as "repeated".
const TAKEOVER_WINDOW: Duration = Duration::from_secs(600);
/// A connection the broker closes without a word this soon after accepting the
/// login counts as a takeover too: mosquitto 2.0 closes a taken-over connection
/// without the DISCONNECT 0x8E it queues for it (seen with 2.0.11), and other
/// brokers may do the same.
const TAKEOVER_SUSPECT: Duration = Duration::from_secs(10);

/// This many takeovers within the window is said loudly (once per window).
const TAKEOVERS_LOUD: usize = 3;

/// A connection that still has readings to send keeps its slot at least this long
/// when another device waits for one: without it, devices taking turns would each
/// be closed before sending anything.
const TURN: Duration = Duration::from_secs(5);

/// How long a closing connection waits for its DISCONNECT to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Distinct (sensor, key) pairs remembered for "array left out" lines; past this
/// the lines stop (memory stays bounded whatever keys sensors invent).
const ARRAY_NOTES_MAX: usize = 4096;

/// Why the bridge cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge uplink TLS settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("bridge buffer: {0}")]
    Store(#[from] StoreError),
}

/// Why a reading was not accepted. The caller acknowledges the local publish
/// anyway (a poison reading must not come back at every reconnect), except for
/// [`AcceptError::Store`], which is fatal like every store error.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// Retained readings are dropped: a retained copy would be forwarded again at
    /// every subscribe.
    #[error("retained reading dropped")]
    Retained,
    #[error("reading dropped: {0}")]
    Rejected(#[from] Rejection),
    /// Not a sensor id (the caller takes it from the data topic with
    /// `DataTopic::sensor_of`, which never yields one of these).
    #[error("not a valid sensor id")]
    InvalidSensorId,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Acknowledge the local publish after `store.durable(seq)`.
    pub seq: u64,
    /// Older readings dropped to stay within the buffer's bounds.
    pub dropped_oldest: u64,
}

/// Counters for the stats line, the stats topic and STATUS=.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BridgeStats {
    /// Devices whose credentials the bridge knows.
    pub bridged_devices: u64,
    /// Readings Qubitro acknowledged, since start.
    pub forwarded: u64,
    /// Readings waiting now.
    pub buffered: u64,
    pub buffered_bytes: u64,
    /// Readings dropped after being accepted (buffer bounds, refused by Qubitro), since start.
    pub dropped: u64,
    /// Readings refused on arrival (bad data, retained), since start.
    pub rejected: u64,
    /// Uplink connections open now.
    pub connections: u64,
}

/// Where a device's uplink stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeviceState {
    /// No connection: nothing to send (or its device is not created yet).
    Idle,
    /// Has data and waits for a connection slot.
    Waiting,
    /// Connecting; `attempt` counts failures since the last success.
    Connecting {
        attempt: u32,
    },
    Connected,
    /// Qubitro refused this device's login (or its topic): nothing is sent until a
    /// new token is set or it is resumed. Readings stay buffered, within the bounds.
    Paused {
        reason: String,
    },
}

/// What `devices show` can tell of a bridged device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    /// `None` while the device is still being created.
    pub device_id: Option<String>,
    #[serde(flatten)]
    pub state: DeviceState,
    pub buffered: u64,
    /// Session takeovers in the last ten minutes: DISCONNECT 0x8E, or the broker
    /// closing the connection without a word within 10 s of accepting the login.
    pub recent_takeovers: usize,
}

/// The uplink settings, read once from the config.
#[derive(Clone)]
struct Settings {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    keep_alive: Duration,
    connect_timeout_s: u64,
    idle: Duration,
    max_connections: usize,
    backoff: Backoff,
    max_payload: usize,
}

struct DeviceEntry {
    device_id: String,
    token: Secret,
    state: DeviceState,
    takeovers: VecDeque<Instant>,
    /// When the last loud takeover line was logged.
    takeover_said: Option<Instant>,
}

struct Inner {
    settings: Settings,
    buffer: Buffer,
    devices: Mutex<HashMap<String, DeviceEntry>>,
    /// Sensors that got data (or a device) since the scheduler last looked.
    dirty: Mutex<HashSet<String>>,
    wake: Notify,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    connections: AtomicU64,
    array_notes: Mutex<HashSet<(String, String)>>,
}

/// The telemetry bridge. Cheap to clone.
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Bridge {
    /// Opens the buffer in `store`'s database (one scan to count it) and reads the
    /// uplink settings. Call [`run`](Self::run) to start forwarding.
    pub fn new(cfg: &Config, store: &Store) -> Result<Bridge, BridgeError> {
        let q = &cfg.qubitro;
        let tls = if q.broker_tls {
            Some(Arc::new(crate::tls::api_tls(&q.ca_file)?))
        } else {
            None
        };
        let b = &cfg.bridge;
        let settings = Settings {
            host: q.broker_host.clone(),
            port: q.broker_port,
            tls,
            keep_alive: Duration::from_secs(30),
            connect_timeout_s: q.connect_timeout_ms.div_ceil(1000).max(1),
            idle: Duration::from_secs(b.idle_disconnect_s),
            max_connections: b.max_connections.max(1),
            backoff: Backoff::new(
                RECONNECT_INITIAL,
                Duration::from_millis(b.reconnect_max_ms).max(RECONNECT_INITIAL),
            ),
            max_payload: cfg.announce.max_payload_bytes,
        };
        let buffer = Buffer::open(
            store,
            Limits {
                max_per_sensor: b.max_buffered_messages,
                max_bytes: b.max_buffer_bytes,
            },
        )?;
        Ok(Bridge {
            inner: Arc::new(Inner {
                settings,
                buffer,
                devices: Mutex::new(HashMap::new()),
                dirty: Mutex::new(HashSet::new()),
                wake: Notify::new(),
                forwarded: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                array_notes: Mutex::new(HashSet::new()),
            }),
        })
    }

    /// Takes one reading of a bridged sensor: flattens it and appends it durably to
    /// the sensor's buffer. The sensor's device need not exist yet ([`set_device`]
    /// starts the forwarding). On `Ok`, acknowledge the local publish after
    /// `store.durable(accepted.seq)`.
    ///
    /// [`set_device`]: Self::set_device
    pub fn accept(
        &self,
        sensor: &str,
        payload: &[u8],
        retained: bool,
    ) -> Result<Accepted, AcceptError> {
        let inner = &self.inner;
        // The buffer's keys rely on it (no 0x00 inside an id).
        if !crate::announce::valid_id(sensor) {
            return Err(AcceptError::InvalidSensorId);
        }
        if retained {
            inner.count_rejected(sensor, "retained");
            return Err(AcceptError::Retained);
        }
        let flat = match flatten(payload, inner.settings.max_payload) {
            Ok(f) => f,
            Err(r) => {
                inner.count_rejected(sensor, r.code());
                return Err(r.into());
            }
        };
        for key in &flat.arrays_left_out {
            inner.note_array(sensor, key);
        }
        let appended = inner.buffer.append(sensor, &flat.json)?;
        if appended.dropped > 0 {
            let total =
                inner.dropped.fetch_add(appended.dropped, Ordering::Relaxed) + appended.dropped;
            // Powers of two: a long outage is visible without one line per reading.
            if total.is_power_of_two() || appended.dropped > 1 {
                tracing::warn!(
                    sensor_id = sensor,
                    dropped = appended.dropped,
                    total_dropped = total,
                    "bridge buffer full: oldest readings dropped ({total} since start)"
                );
            }
        }
        lock(&inner.dirty).insert(sensor.to_string());
        inner.wake.notify_one();
        Ok(Accepted {
            seq: appended.seq,
            dropped_oldest: appended.dropped,
        })
    }

    /// A reading from a sensor that is not bridged: dropped (the caller acknowledges
    /// it, so it never comes back) and counted with the refused ones.
    pub fn refuse_not_bridged(&self, sensor: &str) {
        self.inner.count_rejected(sensor, "not_bridged");
    }

    /// Tells the bridge a sensor's device and token (when its device is created,
    /// and for every bridged sensor at start). A new token resumes a paused device.
    pub fn set_device(&self, sensor: &str, device_id: &str, token: &str) {
        let mut devices = lock(&self.inner.devices);
        match devices.get_mut(sensor) {
            Some(d) if d.device_id == device_id && d.token.expose() == token => {}
            Some(d) => {
                d.device_id = device_id.to_string();
                d.token = Secret::new(token);
                if matches!(d.state, DeviceState::Paused { .. }) {
                    tracing::info!(
                        sensor_id = sensor,
                        device_id,
                        "bridge: new credentials, device resumed"
                    );
                    d.state = DeviceState::Idle;
                }
            }
            None => {
                devices.insert(
                    sensor.to_string(),
                    DeviceEntry {
                        device_id: device_id.to_string(),
                        token: Secret::new(token),
                        state: DeviceState::Idle,
                        takeovers: VecDeque::new(),
                        takeover_said: None,
                    },
                );
            }
        }
        drop(devices);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
    }

    /// Un-pauses a device with its current token (an operator fixed it in Qubitro).
    pub fn resume(&self, sensor: &str) -> bool {
        let mut devices = lock(&self.inner.devices);
        let Some(d) = devices.get_mut(sensor) else {
            return false;
        };
        if matches!(d.state, DeviceState::Paused { .. }) {
            d.state = DeviceState::Idle;
        }
        drop(devices);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
        true
    }

    /// Forgets a sensor (`devices forget`): its connection closes, its readings are
    /// removed. Returns how many readings were removed.
    pub fn forget(&self, sensor: &str) -> Result<u64, StoreError> {
        lock(&self.inner.devices).remove(sensor);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
        self.inner.buffer.remove_through(sensor, u64::MAX)
    }

    /// The uplink of one sensor, for `devices show`; `None` when the bridge knows
    /// nothing of it (no device set, no reading buffered).
    pub fn device_status(&self, sensor: &str) -> Option<DeviceStatus> {
        let buffered = self.inner.buffer.count(sensor);
        let mut devices = lock(&self.inner.devices);
        match devices.get_mut(sensor) {
            Some(d) => {
                prune(&mut d.takeovers, Instant::now());
                Some(DeviceStatus {
                    device_id: Some(d.device_id.clone()),
                    state: d.state.clone(),
                    buffered,
                    recent_takeovers: d.takeovers.len(),
                })
            }
            None if buffered > 0 => Some(DeviceStatus {
                device_id: None,
                state: DeviceState::Idle,
                buffered,
                recent_takeovers: 0,
            }),
            None => None,
        }
    }

    pub fn stats(&self) -> BridgeStats {
        let i = &self.inner;
        let totals = i.buffer.totals();
        BridgeStats {
            bridged_devices: lock(&i.devices).len() as u64,
            forwarded: i.forwarded.load(Ordering::Relaxed),
            buffered: totals.readings,
            buffered_bytes: totals.bytes,
            dropped: i.dropped.load(Ordering::Relaxed),
            rejected: i.rejected.load(Ordering::Relaxed),
            connections: i.connections.load(Ordering::Relaxed),
        }
    }

    /// Forwards until `shutdown` is cancelled, then closes every connection (each
    /// gets [`CLOSE_GRACE`] to send its DISCONNECT). Readings not yet acknowledged
    /// stay in the buffer for the next start.
    pub async fn run(&self, shutdown: CancellationToken) {
        // Readings buffered before a restart: their sensors are due as soon as
        // their devices are set.
        lock(&self.inner.dirty).extend(self.inner.buffer.sensors());
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let mut sched = Scheduler {
            inner: self.inner.clone(),
            conns: HashMap::new(),
            waiting: VecDeque::new(),
            ended_tx,
            ended_rx,
            stop: shutdown.child_token(),
        };
        loop {
            let again = sched.schedule();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                Some((sensor, end)) = sched.ended_rx.recv() => sched.on_end(sensor, end),
                _ = sleep_until_opt(again) => {}
            }
        }
        sched.stop.cancel();
        let deadline = Instant::now() + CLOSE_GRACE * 2;
        while !sched.conns.is_empty() {
            match tokio::time::timeout_at(deadline, sched.ended_rx.recv()).await {
                Ok(Some((sensor, _))) => {
                    sched.conns.remove(&sensor);
                    self.inner.connections.fetch_sub(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
    }
}

impl Inner {
    fn count_rejected(&self, sensor: &str, code: &str) {
        let n = self.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(
                sensor_id = sensor,
                code,
                rejected = n,
                "bridge: reading dropped ({code}); {n} dropped on arrival since start"
            );
        } else {
            tracing::debug!(sensor_id = sensor, code, "bridge: reading dropped ({code})");
        }
    }

    fn note_array(&self, sensor: &str, key: &str) {
        let mut notes = lock(&self.array_notes);
        if notes.len() >= ARRAY_NOTES_MAX {
            return;
        }
        if notes.insert((sensor.to_string(), key.to_string())) {
            tracing::warn!(sensor_id = sensor, key, "bridge: the key {key:?} holds an array, which Qubitro does not take; it is left out of this sensor's readings");
        }
    }

    fn set_state(&self, sensor: &str, state: DeviceState) {
        if let Some(d) = lock(&self.devices).get_mut(sensor) {
            // A pause is lifted only by set_device/resume, never by a late update.
            if !matches!(d.state, DeviceState::Paused { .. })
                || matches!(state, DeviceState::Paused { .. })
            {
                d.state = state;
            }
        }
    }

    /// The credentials of a device that may connect now.
    fn ready(&self, sensor: &str) -> Option<(String, Secret)> {
        let devices = lock(&self.devices);
        let d = devices.get(sensor)?;
        (!matches!(d.state, DeviceState::Paused { .. }))
            .then(|| (d.device_id.clone(), d.token.clone()))
    }

    /// Records a takeover; true when they are now "repeated" and not yet said.
    fn takeover(&self, sensor: &str) -> (usize, bool) {
        let now = Instant::now();
        let mut devices = lock(&self.devices);
        let Some(d) = devices.get_mut(sensor) else {
            return (0, false);
        };
        prune(&mut d.takeovers, now);
        d.takeovers.push_back(now);
        let n = d.takeovers.len();
        let say = n >= TAKEOVERS_LOUD
            && d.takeover_said
                .is_none_or(|t| now.duration_since(t) >= TAKEOVER_WINDOW);
        if say {
            d.takeover_said = Some(now);
        }
        (n, say)
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn prune(takeovers: &mut VecDeque<Instant>, now: Instant) {
    while takeovers
        .front()
        .is_some_and(|t| now.duration_since(*t) > TAKEOVER_WINDOW)
    {
        takeovers.pop_front();
    }
}

/// How a connection task ended.
#[derive(Debug)]
enum End {
    /// No data for `idle_disconnect_s`, or nothing left to do.
    Idle,
    /// Closed by the scheduler (a slot for another device, shutdown, forget).
    Closed,
    Paused,
}

struct Conn {
    /// The device id and token it logs in with.
    login: (String, Secret),
    cancel: CancellationToken,
    notify: Arc<Notify>,
    last_used: Instant,
    started: Instant,
}

struct Scheduler {
    inner: Arc<Inner>,
    conns: HashMap<String, Conn>,
    /// Devices with data and credentials but no connection slot, oldest first.
    waiting: VecDeque<String>,
    /// Each connection task says here how it ended.
    ended_tx: mpsc::UnboundedSender<(String, End)>,
    ended_rx: mpsc::UnboundedReceiver<(String, End)>,
    stop: CancellationToken,
}

impl Scheduler {
    /// Opens connections for waiting devices, closing others to make room; returns
    /// when to look again if a device still waits for a busy connection's turn.
    fn schedule(&mut self) -> Option<Instant> {
        let dirty: Vec<String> = lock(&self.inner.dirty).drain().collect();
        let now = Instant::now();
        for sensor in dirty {
            if let Some(c) = self.conns.get_mut(&sensor) {
                let ready = self.inner.ready(&sensor);
                if ready.as_ref() != Some(&c.login) {
                    // Forgotten, paused, or new credentials: close it; a
                    // connection with the new ones follows if there is data.
                    c.cancel.cancel();
                } else {
                    c.last_used = now;
                    c.notify.notify_one();
                }
                continue;
            }
            if self.inner.ready(&sensor).is_some()
                && self.inner.buffer.count(&sensor) > 0
                && !self.waiting.contains(&sensor)
            {
                self.waiting.push_back(sensor);
            }
        }
        let max = self.inner.settings.max_connections;
        let closing = self
            .conns
            .values()
            .filter(|c| c.cancel.is_cancelled())
            .count();
        let mut to_close = self.waiting.len().saturating_sub(closing);
        while let Some(sensor) = self.waiting.front().cloned() {
            if self.conns.len() < max {
                self.waiting.pop_front();
                self.start(sensor);
                continue;
            }
            if to_close == 0 {
                break;
            }
            // The least recently used open connection makes room: one with nothing
            // left to send, or else one whose turn is over.
            let now = Instant::now();
            let open = self.conns.iter().filter(|(_, c)| !c.cancel.is_cancelled());
            let lru = open
                .filter(|(s, c)| {
                    self.inner.buffer.count(s) == 0 || now.duration_since(c.started) >= TURN
                })
                .min_by_key(|(_, c)| c.last_used)
                .map(|(s, _)| s.clone());
            let Some(lru) = lru else {
                break;
            };
            tracing::debug!(sensor_id = %lru, "bridge: closing the least recently used uplink for another device");
            self.conns[&lru].cancel.cancel();
            to_close -= 1;
        }
        for s in &self.waiting {
            self.inner.set_state(s, DeviceState::Waiting);
        }
        if self.waiting.is_empty() {
            return None;
        }
        // Look again when the first busy connection's turn is over.
        self.conns
            .values()
            .filter(|c| !c.cancel.is_cancelled())
            .map(|c| c.started + TURN)
            .min()
            .map(|t| t.max(Instant::now() + Duration::from_millis(100)))
    }

    fn start(&mut self, sensor: String) {
        let Some((device_id, token)) = self.inner.ready(&sensor) else {
            return;
        };
        let cancel = self.stop.child_token();
        let notify = Arc::new(Notify::new());
        self.conns.insert(
            sensor.clone(),
            Conn {
                login: (device_id.clone(), token.clone()),
                cancel: cancel.clone(),
                notify: notify.clone(),
                last_used: Instant::now(),
                started: Instant::now(),
            },
        );
        self.inner.connections.fetch_add(1, Ordering::Relaxed);
        let task = DeviceTask {
            inner: self.inner.clone(),
            sensor: sensor.clone(),
            device_id,
            token,
            notify,
            cancel,
        };
        let ended = self.ended_tx.clone();
        tokio::spawn(async move {
            let end = task.run().await;
            let _ = ended.send((sensor, end));
        });
    }

    fn on_end(&mut self, sensor: String, end: End) {
        self.conns.remove(&sensor);
        self.inner.connections.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Paused => {}
            End::Idle | End::Closed => {
                self.inner.set_state(&sensor, DeviceState::Idle);
                // Still has data (closed for another device, or data came in as it
                // closed): it queues again, behind the others.
                lock(&self.inner.dirty).insert(sensor);
            }
        }
    }
}

/// How one connection (one rumqttc event loop) ended.
enum SessionEnd {
    Idle,
    Closed,
    /// Qubitro refused the login or the topic: pause the device.
    Refused(String),
    /// Anything else: reconnect after a backoff.
    Lost {
        error: String,
        /// The broker had accepted the login (reset the backoff).
        connected: bool,
        takeover: bool,
    },
}

struct DeviceTask {
    inner: Arc<Inner>,
    sensor: String,
    device_id: String,
    token: Secret,
    notify: Arc<Notify>,
    cancel: CancellationToken,
}

impl DeviceTask {
    async fn run(self) -> End {
        let mut attempt: u32 = 0;
        loop {
            self.inner
                .set_state(&self.sensor, DeviceState::Connecting { attempt });
            match self.session().await {
                SessionEnd::Idle => return End::Idle,
                SessionEnd::Closed => return End::Closed,
                SessionEnd::Refused(reason) => {
                    tracing::error!(
                        sensor_id = %self.sensor,
                        device_id = %self.device_id,
                        reason = %reason,
                        "BRIDGE PAUSED for this device: Qubitro refused it ({reason}); was the device deleted or its token changed? Its readings stay buffered; other devices are not affected"
                    );
                    self.inner
                        .set_state(&self.sensor, DeviceState::Paused { reason });
                    return End::Paused;
                }
                SessionEnd::Lost {
                    error,
                    connected,
                    takeover,
                } => {
                    if takeover {
                        let (n, say) = self.inner.takeover(&self.sensor);
                        if say {
                            tracing::error!(
                                sensor_id = %self.sensor,
                                device_id = %self.device_id,
                                takeovers = n,
                                "SESSION TAKEN OVER {n} times in 10 minutes: another client logs in to Qubitro as this device (a second gateway bridging it, or the sensor itself with its token); each keeps disconnecting the other"
                            );
                        } else {
                            tracing::warn!(sensor_id = %self.sensor, device_id = %self.device_id, error = %error, "bridge: session taken over: {error}");
                        }
                    } else if connected {
                        tracing::warn!(sensor_id = %self.sensor, device_id = %self.device_id, error = %error, "bridge: uplink lost ({error}); reconnecting");
                    } else if attempt == 0 {
                        tracing::warn!(sensor_id = %self.sensor, device_id = %self.device_id, error = %error, "bridge: cannot reach Qubitro's broker ({error}); retrying");
                    } else {
                        tracing::debug!(sensor_id = %self.sensor, attempt, error = %error, "bridge: still unreachable");
                    }
                    // A takeover "succeeded" at connecting, but resetting would flap.
                    if connected && !takeover {
                        attempt = 0;
                    }
                    let wait = self.inner.settings.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => return End::Closed,
                    }
                }
            }
        }
    }

    /// Whether the device's credentials are still the ones this task logs in with.
    fn credentials_current(&self) -> bool {
        lock(&self.inner.devices)
            .get(&self.sensor)
            .is_some_and(|d| {
                d.device_id == self.device_id && d.token.expose() == self.token.expose()
            })
    }

    fn options(&self) -> MqttOptions {
        let s = &self.inner.settings;
        let mut opts = MqttOptions::new(self.device_id.clone(), s.host.clone(), s.port);
        opts.set_credentials(self.device_id.clone(), self.token.expose().to_string());
        // Clean start: nothing of an earlier connection is resent by rumqttc; the
        // buffer is the only source of what to send.
        opts.set_clean_start(true);
        opts.set_keep_alive(s.keep_alive);
        opts.set_connection_timeout(s.connect_timeout_s);
        // Room for our window; rumqttc preallocates one slot per in-flight publish.
        opts.set_outgoing_inflight_upper_limit(WINDOW as u16 + 4);
        opts.set_max_packet_size(Some(64 * 1024));
        let mut net = rumqttc::NetworkOptions::new();
        // Nagle would hold every small reading back ~40 ms (pitfalls.md).
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(s.connect_timeout_s);
        opts.set_network_options(net);
        if let Some(tls) = &s.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        opts
    }

    async fn session(&self) -> SessionEnd {
        let (client, mut eventloop) = AsyncClient::new(self.options(), WINDOW * 2 + 8);
        let (tx, mut rx) = mpsc::unbounded_channel();
        // The poll task never awaits a client call; it ends at the first error, and
        // the event loop (with anything it still holds) is dropped with it.
        let poller = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let failed = ev.is_err();
                if tx.send(ev).is_err() || failed {
                    return;
                }
            }
        });
        let _abort = AbortOnDrop(poller);
        let topic = self.device_id.clone();
        let buffer = &self.inner.buffer;
        let idle = self.inner.settings.idle;
        let mut connected = false;
        let mut connected_at: Option<Instant> = None;
        // Requested from rumqttc, no packet id seen yet (request order).
        let mut requested: VecDeque<u64> = VecDeque::new();
        // Sent, waiting for their PUBACK (send order = ack order).
        let mut inflight: VecDeque<(u16, u64)> = VecDeque::new();
        let mut last_sent: Option<u64> = None;
        let mut idle_deadline = Instant::now() + idle;
        let lost = |error: String, connected: bool| SessionEnd::Lost {
            error,
            connected,
            takeover: false,
        };
        loop {
            let outstanding = requested.len() + inflight.len();
            if connected && outstanding < WINDOW {
                let batch = match buffer.oldest(&self.sensor, last_sent, WINDOW - outstanding) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "bridge buffer unreadable: {e}");
                        return lost(format!("buffer: {e}"), true);
                    }
                };
                // Checked after reading: a reading appended after new credentials
                // were set (set_device) never goes out under the old login.
                if !batch.is_empty() && !self.credentials_current() {
                    close(&client, &mut rx).await;
                    return SessionEnd::Closed;
                }
                for (id, json) in batch {
                    idle_deadline = Instant::now() + idle;
                    // The channel holds twice the window: this never finds it full.
                    if let Err(e) = client.try_publish(topic.clone(), QoS::AtLeastOnce, false, json)
                    {
                        return lost(format!("queueing a publish: {e}"), true);
                    }
                    requested.push_back(id);
                    last_sent = Some(id);
                }
            }
            let quiet = connected && requested.is_empty() && inflight.is_empty();
            let ev = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    close(&client, &mut rx).await;
                    return SessionEnd::Closed;
                }
                ev = rx.recv() => ev,
                _ = self.notify.notified(), if quiet => continue,
                _ = tokio::time::sleep_until(idle_deadline), if quiet => {
                    if buffer.count(&self.sensor) > 0 {
                        idle_deadline = Instant::now() + idle;
                        continue;
                    }
                    close(&client, &mut rx).await;
                    return SessionEnd::Idle;
                }
            };
            let Some(ev) = ev else {
                return lost("the event loop task ended".into(), connected);
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    connected_at = Some(Instant::now());
                    idle_deadline = Instant::now() + idle;
                    self.inner.set_state(&self.sensor, DeviceState::Connected);
                    tracing::debug!(sensor_id = %self.sensor, device_id = %self.device_id, "bridge: uplink connected");
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if let Some(id) = requested.pop_front() {
                        inflight.push_back((pkid, id));
                    }
                }
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                    return lost(
                        format!("packet id {pkid} collided; starting over from the buffer"),
                        true,
                    );
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let Some(&(pkid, id)) = inflight.front() else {
                        return lost(format!("PUBACK {} for nothing sent", ack.pkid), true);
                    };
                    if pkid != ack.pkid {
                        return lost(
                            format!("PUBACK {} out of order (expected {pkid})", ack.pkid),
                            true,
                        );
                    }
                    inflight.pop_front();
                    match ack.reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            if let Err(e) = buffer.remove_through(&self.sensor, id) {
                                tracing::error!(error = %e, "bridge buffer: {e}");
                                return lost(format!("buffer: {e}"), true);
                            }
                            self.inner.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                        PubAckReason::NotAuthorized => {
                            return SessionEnd::Refused(format!(
                                "publishing to the topic {topic} was not authorized (PUBACK 0x87)"
                            ));
                        }
                        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => {
                            // This reading can never be taken: keeping it would block
                            // every later one.
                            let removed = buffer.remove_through(&self.sensor, id).unwrap_or(0);
                            let n =
                                self.inner.dropped.fetch_add(removed, Ordering::Relaxed) + removed;
                            tracing::warn!(sensor_id = %self.sensor, device_id = %self.device_id, reason = ?ack.reason, dropped = n, "bridge: Qubitro refused a reading ({:?}); dropped", ack.reason);
                        }
                        other => {
                            return lost(format!("PUBACK reason {other:?}; retrying later"), true);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    return SessionEnd::Lost {
                        error: format!("disconnected by the broker: {:?}", d.reason_code),
                        connected: true,
                        takeover: d.reason_code == DisconnectReasonCode::SessionTakenOver,
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    let soon = connected_at.is_some_and(|t| t.elapsed() < TAKEOVER_SUSPECT);
                    return classify(e, connected, soon);
                }
            }
        }
    }
}

/// Sends DISCONNECT and gives it [`CLOSE_GRACE`] to go out.
async fn close(
    client: &AsyncClient,
    rx: &mut mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(ev) = rx.recv().await {
            match ev {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// `soon`: the broker accepted the login less than [`TAKEOVER_SUSPECT`] ago.
fn classify(e: ConnectionError, connected: bool, soon: bool) -> SessionEnd {
    let closed_without_a_word = match &e {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::MqttState(StateError::Io(io)) | ConnectionError::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::BrokenPipe
        ),
        _ => false,
    };
    if soon && closed_without_a_word {
        return SessionEnd::Lost {
            error: format!("the broker closed the connection right after accepting the login ({e}): probably a session takeover"),
            connected: true,
            takeover: true,
        };
    }
    match &e {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword
            | ConnectReturnCode::NotAuthorized
            | ConnectReturnCode::Banned
            | ConnectReturnCode::BadAuthenticationMethod
            | ConnectReturnCode::ClientIdentifierNotValid
            | ConnectReturnCode::BadClientId => {
                SessionEnd::Refused(format!("login refused: {code:?}"))
            }
            _ => SessionEnd::Lost {
                error: e.to_string(),
                connected,
                takeover: false,
            },
        },
        ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => {
            SessionEnd::Lost {
                error: format!("disconnected by the broker: {reason_code:?}"),
                connected: true,
                takeover: *reason_code == DisconnectReasonCode::SessionTakenOver,
            }
        }
        _ => SessionEnd::Lost {
            error: match crate::tls::cert_problem(&e) {
                Some(crate::tls::CertProblem::NotValidYet) => format!(
                    "{e}: the broker's certificate is not valid yet; the clock is probably not synced (a Pi has no RTC until NTP runs)"
                ),
                Some(crate::tls::CertProblem::Untrusted) => format!(
                    "{e}: the broker's certificate is not trusted (a TLS-inspecting proxy needs qubitro.ca_file)"
                ),
                _ => e.to_string(),
            },
            connected,
            takeover: false,
        },
    }
}

/// Aborts the poll task when a session ends, whichever way.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
