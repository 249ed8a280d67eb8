//! What the bridge tells its callers: why it cannot start or refused a reading, its
//! counters, and where each device's uplink stands (`devices show`).

use serde::Serialize;

use super::flatten::Rejection;
use crate::store::StoreError;

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
    /// Past `bridge.max_readings_per_s` for this sensor (counted by the limiter).
    #[error("reading dropped: more than bridge.max_readings_per_s")]
    RateLimited,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An accepted reading.
#[derive(Debug)]
pub struct Accepted {
    /// What to wait for before acknowledging the reading.
    pub ticket: super::held::Ticket,
    /// Older readings the buffer's bounds dropped.
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
    /// What they take in the store: keys and records.
    pub buffered_bytes: u64,
    /// Readings dropped after being accepted (buffer bounds, refused by Qubitro), since start.
    pub dropped: u64,
    /// Readings refused on arrival (bad data, retained), since start.
    pub rejected: u64,
    /// Readings dropped on arrival as past `bridge.max_readings_per_s`, since start.
    pub rate_limited: u64,
    /// Uplink connections open now.
    pub connections: u64,
    /// Readings held in memory while Qubitro's PUBACK is awaited (acknowledge-through).
    pub held: u64,
    /// How long the oldest buffered reading has waited, in milliseconds (0: none).
    pub oldest_buffered_ms: u64,
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
    /// Qubitro refused this device's login (or its topic): nothing is sent until
    /// the next retry (the wait doubles from `bridge.reconnect_max_ms` to 1 h), a
    /// new token, or `devices resume`. Readings stay buffered, within the bounds.
    Paused {
        reason: String,
        /// Seconds until the next retry (0: due, or trying now).
        next_retry_in_s: u64,
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
