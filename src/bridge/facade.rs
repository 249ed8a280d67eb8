//! The bridge's facade: [`Bridge`], what the engine, the daemon and the control
//! socket call. It takes readings into the buffer, learns each device's credentials,
//! answers for status, and runs the scheduler (`super::scheduler`) that opens the
//! uplinks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::buffer::{Buffer, Limits};
use super::flatten::flatten;
use super::held::{Held, Kind, Lanes, Settled, Taken, Ticket};
use super::scheduler::Scheduler;
use super::shared::{lock, prune, DeviceEntry, Inner, Settings, PAUSE_MAX};
use super::status::{AcceptError, Accepted, BridgeError, BridgeStats, DeviceState, DeviceStatus};
use super::uplink::{rumqttc_connect, Connect};
use crate::backoff::Backoff;
use crate::config::{Config, Secret};
use crate::store::{Store, StoreError};

/// The first wait before a reconnect; doubles up to `bridge.reconnect_max_ms`.
const RECONNECT_INITIAL: Duration = Duration::from_millis(500);

/// The telemetry bridge. Cheap to clone.
#[derive(Clone)]
pub struct Bridge {
    pub(super) inner: Arc<Inner>,
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
            pause_backoff: Backoff::new(
                Duration::from_millis(b.reconnect_max_ms).max(RECONNECT_INITIAL),
                PAUSE_MAX,
            ),
            max_payload: cfg.announce.max_payload_bytes,
            spill_after: Duration::from_millis(b.spill_after_ms),
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
                lanes: Mutex::new(Lanes::default()),
                rate: super::rate::Rate::new(b.max_readings_per_s),
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

    /// Takes one reading of a bridged sensor: flattens it, then holds it in memory
    /// for its device's connected uplink, or appends it to the sensor's buffer when
    /// the device has no working uplink or older readings buffered (its device need
    /// not exist yet: [`set_device`] starts the forwarding). On `Ok`, acknowledge the
    /// local publish once [`Ticket::settle`] says so (and its spill is durable).
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
        inner.rate.check(sensor)?;
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
        let taken = lock(&inner.lanes).take(&inner.buffer, sensor, flat.json)?;
        let (kind, dropped) = match taken {
            // Its live uplink was woken by the lanes: the scheduler has nothing to do.
            Taken::Held(held, rx) => (Kind::Held(held, rx), 0),
            Taken::Spilled { seq, dropped } => {
                lock(&inner.dirty).insert(sensor.to_string());
                inner.wake.notify_one();
                (Kind::Spilled(seq), dropped)
            }
        };
        inner.count_dropped(sensor, dropped);
        Ok(Accepted {
            ticket: Ticket {
                bridge: self.clone(),
                sensor: sensor.to_string(),
                kind,
                deadline: Instant::now() + inner.settings.spill_after,
            },
            dropped_oldest: dropped,
        })
    }

    /// A held reading's deadline passed: spilled (with the rest of its device's
    /// held readings) unless Qubitro acknowledged it meanwhile.
    pub(super) fn settle_now(&self, sensor: &str, held: &Held) -> Result<Settled, StoreError> {
        let inner = &self.inner;
        let (how, dropped) = lock(&inner.lanes).settle_now(&inner.buffer, sensor, held)?;
        inner.count_dropped(sensor, dropped);
        if matches!(how, Settled::Spilled(_)) {
            tracing::debug!(
                sensor_id = sensor,
                "bridge: Qubitro has not acknowledged a reading in time; spilled to the buffer"
            );
            lock(&inner.dirty).insert(sensor.to_string());
            inner.wake.notify_one();
        }
        Ok(how)
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
                if d.unpause() {
                    tracing::info!(
                        sensor_id = sensor,
                        device_id,
                        "bridge: new credentials, device resumed"
                    );
                }
            }
            None => {
                devices.insert(sensor.to_string(), DeviceEntry::new(device_id, token));
            }
        }
        drop(devices);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
    }

    /// Retries a paused device at once with its current token (`devices resume`:
    /// an operator fixed it in Qubitro). Returns whether the device was paused;
    /// `None` when the bridge knows no device for `sensor`.
    pub fn resume(&self, sensor: &str) -> Option<bool> {
        let mut devices = lock(&self.inner.devices);
        let d = devices.get_mut(sensor)?;
        let was_paused = d.unpause();
        if was_paused {
            tracing::info!(sensor_id = sensor, device_id = %d.device_id, "bridge: device resumed by the operator");
        }
        drop(devices);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
        Some(was_paused)
    }

    /// Forgets a sensor (`devices forget`): its connection closes, its readings are
    /// removed. Returns how many readings were removed.
    pub fn forget(&self, sensor: &str) -> Result<u64, StoreError> {
        lock(&self.inner.devices).remove(sensor);
        let held = lock(&self.inner.lanes).forget(sensor);
        lock(&self.inner.dirty).insert(sensor.to_string());
        self.inner.wake.notify_one();
        Ok(held + self.inner.buffer.remove_through(sensor, u64::MAX)?)
    }

    /// The uplink of one sensor, for `devices show`; `None` when the bridge knows
    /// nothing of it (no device set, no reading buffered).
    pub fn device_status(&self, sensor: &str) -> Option<DeviceStatus> {
        let buffered = self.inner.buffer.count(sensor);
        let mut devices = lock(&self.inner.devices);
        match devices.get_mut(sensor) {
            Some(d) => {
                let now = Instant::now();
                prune(&mut d.takeovers, now);
                let mut state = d.state.clone();
                if let DeviceState::Paused {
                    next_retry_in_s, ..
                } = &mut state
                {
                    let left = d.retry_at.map(|t| t.saturating_duration_since(now));
                    *next_retry_in_s = left.unwrap_or_default().as_secs();
                }
                Some(DeviceStatus {
                    device_id: Some(d.device_id.clone()),
                    state,
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
        // Read before the literal below, whose lock guards live to its end: the
        // buffer's lock is never taken under the devices' or lanes' locks.
        let oldest_buffered_ms = i
            .buffer
            .oldest_age()
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        BridgeStats {
            bridged_devices: lock(&i.devices).len() as u64,
            forwarded: i.forwarded.load(Ordering::Relaxed),
            buffered: totals.readings,
            buffered_bytes: totals.bytes,
            dropped: i.dropped.load(Ordering::Relaxed),
            rejected: i.rejected.load(Ordering::Relaxed),
            rate_limited: i.rate.limited(),
            connections: i.connections.load(Ordering::Relaxed),
            held: lock(&i.lanes).count() as u64,
            oldest_buffered_ms,
        }
    }

    /// Uplinks paused now (Qubitro refused the device's login or topic): one pass
    /// over the bridged devices in memory, for /metrics.
    pub fn uplinks_paused(&self) -> u64 {
        let devices = lock(&self.inner.devices);
        devices
            .values()
            .filter(|d| matches!(d.state, DeviceState::Paused { .. }))
            .count() as u64
    }

    /// Forwards until `shutdown` is cancelled, then closes every connection (each
    /// gets one second to send its DISCONNECT). Readings not yet acknowledged
    /// stay in the buffer for the next start.
    pub async fn run(&self, shutdown: CancellationToken) {
        let connect: Arc<Connect> = Arc::new(rumqttc_connect);
        Scheduler::run(self.inner.clone(), connect, shutdown).await
    }
}
