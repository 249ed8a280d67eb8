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
use super::held::Lanes;
use super::status::DeviceState;
use crate::backoff::Backoff;
use crate::config::Secret;

/// Takeovers within this window count as "repeated".
const TAKEOVER_WINDOW: Duration = Duration::from_secs(600);
/// This many takeovers within the window is said loudly (once per window).
const TAKEOVERS_LOUD: usize = 3;

/// The longest wait between retries of a device Qubitro refused: a device made
/// moments ago may be refused until Qubitro's broker knows its token, and an
/// operator may fix a refused one in Qubitro without telling the gateway.
pub(super) const PAUSE_MAX: Duration = Duration::from_secs(3600);

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
    /// Between retries of a paused device: from `bridge.reconnect_max_ms` to
    /// [`PAUSE_MAX`].
    pub(super) pause_backoff: Backoff,
    pub(super) max_payload: usize,
    /// How long a held reading may wait for Qubitro's PUBACK before it is spilled.
    pub(super) spill_after: Duration,
}

pub(super) struct DeviceEntry {
    pub(super) device_id: String,
    pub(super) token: Secret,
    pub(super) state: DeviceState,
    pub(super) takeovers: VecDeque<Instant>,
    /// When the last loud takeover line was logged.
    pub(super) takeover_said: Option<Instant>,
    /// While paused: when the next retry may connect.
    pub(super) retry_at: Option<Instant>,
    /// Refusals since Qubitro last took a reading of this device (or it was
    /// resumed, or got new credentials): the pause backoff's attempt.
    pub(super) refusals: u32,
}

impl DeviceEntry {
    pub(super) fn new(device_id: &str, token: &str) -> DeviceEntry {
        DeviceEntry {
            device_id: device_id.to_string(),
            token: Secret::new(token),
            state: DeviceState::Idle,
            takeovers: VecDeque::new(),
            takeover_said: None,
            retry_at: None,
            refusals: 0,
        }
    }

    /// Lifts a pause (new credentials, `devices resume`); false when not paused.
    pub(super) fn unpause(&mut self) -> bool {
        self.retry_at = None;
        self.refusals = 0;
        if matches!(self.state, DeviceState::Paused { .. }) {
            self.state = DeviceState::Idle;
            return true;
        }
        false
    }
}

/// A device paused by a refusal.
pub(super) struct Pause {
    pub(super) retry_at: Instant,
    pub(super) retry_in: Duration,
    /// Refusals in a row, this one included.
    pub(super) refusals: u32,
}

pub(super) struct Inner {
    pub(super) settings: Settings,
    pub(super) buffer: Buffer,
    /// Readings held in memory while their uplink forwards them. Lock order: this
    /// one, then the buffer's.
    pub(super) lanes: Mutex<Lanes>,
    pub(super) rate: super::rate::Rate,
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
    /// Counts and says readings the buffer's bounds dropped.
    pub(super) fn count_dropped(&self, sensor: &str, dropped: u64) {
        if dropped == 0 {
            return;
        }
        let total = self.dropped.fetch_add(dropped, Ordering::Relaxed) + dropped;
        // Powers of two: a long outage is visible without one line per reading.
        if total.is_power_of_two() || dropped > 1 {
            tracing::warn!(
                sensor_id = sensor,
                dropped,
                total_dropped = total,
                "bridge buffer full: oldest readings dropped ({total} since start)"
            );
        }
    }

    /// `sensor`'s uplink is connected, or gone (its held readings are spilled).
    pub(super) fn set_live(&self, sensor: &str, uplink: Option<Arc<Notify>>) {
        let spilled = lock(&self.lanes).set_live(&self.buffer, sensor, uplink);
        match spilled {
            Ok(dropped) => self.count_dropped(sensor, dropped),
            Err(e) => tracing::error!(sensor_id = sensor, error = %e, "bridge buffer: {e}"),
        }
    }

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
            tracing::warn!(
                sensor_id = sensor,
                key,
                "bridge: the key {key:?} holds an array, which Qubitro does not take; it is left out of this sensor's readings"
            );
        }
    }

    pub(super) fn set_state(&self, sensor: &str, state: DeviceState) {
        if let Some(d) = lock(&self.devices).get_mut(sensor) {
            // A pause is lifted by set_device/resume or by a login that works (a
            // retry), never by the retry's "connecting", so `devices show` keeps
            // saying why it is paused while it tries again.
            if state == DeviceState::Connected {
                // The refusals are not forgotten yet: a device whose login works
                // but whose publishes are refused (0x87) must still wait longer
                // each time; see `delivered`.
                d.retry_at = None;
                d.state = state;
            } else if !matches!(d.state, DeviceState::Paused { .. }) {
                d.state = state;
            }
        }
    }

    /// Qubitro took a reading of this device: its past refusals no longer count.
    pub(super) fn delivered(&self, sensor: &str) {
        if let Some(d) = lock(&self.devices).get_mut(sensor) {
            d.refusals = 0;
        }
    }

    /// Pauses a device Qubitro refused, until its next retry; `None` when the device
    /// is no longer known.
    pub(super) fn pause(&self, sensor: &str, reason: &str) -> Option<Pause> {
        let mut devices = lock(&self.devices);
        let d = devices.get_mut(sensor)?;
        let retry_in = self.settings.pause_backoff.delay(d.refusals);
        d.refusals = d.refusals.saturating_add(1);
        let retry_at = Instant::now() + retry_in;
        d.retry_at = Some(retry_at);
        d.state = DeviceState::Paused {
            reason: reason.to_string(),
            next_retry_in_s: retry_in.as_secs(),
        };
        Some(Pause {
            retry_at,
            retry_in,
            refusals: d.refusals,
        })
    }

    /// The credentials of a device that may connect now: not paused, or paused and
    /// due for its retry.
    pub(super) fn ready(&self, sensor: &str) -> Option<(String, Secret)> {
        let devices = lock(&self.devices);
        let d = devices.get(sensor)?;
        let due = d.retry_at.is_none_or(|t| t <= Instant::now());
        (!matches!(d.state, DeviceState::Paused { .. }) || due)
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
