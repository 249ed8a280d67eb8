//! The state the bridge's facade, scheduler and uplinks share: the settings read
//! once from the config, the table of devices (credentials, uplink state, session
//! takeovers), the buffer and the counters.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::buffer::Buffer;
use super::status::DeviceState;
use crate::backoff::Backoff;
use crate::config::Secret;

/// Takeovers within this window count as "repeated".
const TAKEOVER_WINDOW: Duration = Duration::from_secs(600);
/// This many takeovers within the window is said loudly (once per window).
const TAKEOVERS_LOUD: usize = 3;

/// Distinct (sensor, key) pairs remembered for "array left out" lines; past this
/// the lines stop (memory stays bounded whatever keys sensors invent).
const ARRAY_NOTES_MAX: usize = 4096;

/// The uplink settings, read once from the config.
#[derive(Clone)]
pub(super) struct Settings {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    pub(super) keep_alive: Duration,
    pub(super) connect_timeout_s: u64,
    pub(super) idle: Duration,
    pub(super) max_connections: usize,
    pub(super) backoff: Backoff,
    pub(super) max_payload: usize,
}

pub(super) struct DeviceEntry {
    pub(super) device_id: String,
    pub(super) token: Secret,
    pub(super) state: DeviceState,
    pub(super) takeovers: VecDeque<Instant>,
    /// When the last loud takeover line was logged.
    pub(super) takeover_said: Option<Instant>,
}

pub(super) struct Inner {
    pub(super) settings: Settings,
    pub(super) buffer: Buffer,
    pub(super) devices: Mutex<HashMap<String, DeviceEntry>>,
    /// Sensors that got data (or a device) since the scheduler last looked.
    pub(super) dirty: Mutex<HashSet<String>>,
    pub(super) wake: Notify,
    pub(super) forwarded: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) connections: AtomicU64,
    pub(super) array_notes: Mutex<HashSet<(String, String)>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub(super) fn count_rejected(&self, sensor: &str, code: &str) {
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

    pub(super) fn note_array(&self, sensor: &str, key: &str) {
        let mut notes = lock(&self.array_notes);
        if notes.len() >= ARRAY_NOTES_MAX {
            return;
        }
        if notes.insert((sensor.to_string(), key.to_string())) {
            tracing::warn!(sensor_id = sensor, key, "bridge: the key {key:?} holds an array, which Qubitro does not take; it is left out of this sensor's readings");
        }
    }

    pub(super) fn set_state(&self, sensor: &str, state: DeviceState) {
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
    pub(super) fn ready(&self, sensor: &str) -> Option<(String, Secret)> {
        let devices = lock(&self.devices);
        let d = devices.get(sensor)?;
        (!matches!(d.state, DeviceState::Paused { .. }))
            .then(|| (d.device_id.clone(), d.token.clone()))
    }

    /// Records a takeover; true when they are now "repeated" and not yet said.
    pub(super) fn takeover(&self, sensor: &str) -> (usize, bool) {
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

pub(super) fn prune(takeovers: &mut VecDeque<Instant>, now: Instant) {
    while takeovers
        .front()
        .is_some_and(|t| now.duration_since(*t) > TAKEOVER_WINDOW)
    {
        takeovers.pop_front();
    }
}
