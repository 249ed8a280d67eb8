//! Process-wide counters: what the stats topic, the log's stats line and
//! `onboardd status` report. Plain atomics: cheap enough for every announce.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

#[derive(Default)]
struct Counters {
    announces: AtomicU64,
    onboarded: AtomicU64,
    adopted: AtomicU64,
    cached_replies: AtomicU64,
    pending_replies: AtomicU64,
    errors: AtomicU64,
    retained_dropped: AtomicU64,
    cloud_requests: AtomicU64,
    cloud_latency_us_total: AtomicU64,
    cloud_latency_us_max: AtomicU64,
}

static COUNTERS: Counters = Counters {
    announces: AtomicU64::new(0),
    onboarded: AtomicU64::new(0),
    adopted: AtomicU64::new(0),
    cached_replies: AtomicU64::new(0),
    pending_replies: AtomicU64::new(0),
    errors: AtomicU64::new(0),
    retained_dropped: AtomicU64::new(0),
    cloud_requests: AtomicU64::new(0),
    cloud_latency_us_total: AtomicU64::new(0),
    cloud_latency_us_max: AtomicU64::new(0),
};

pub fn announce() {
    COUNTERS.announces.fetch_add(1, Relaxed);
}
pub fn onboarded(adopted: bool) {
    COUNTERS.onboarded.fetch_add(1, Relaxed);
    if adopted {
        COUNTERS.adopted.fetch_add(1, Relaxed);
    }
}
pub fn cached_reply() {
    COUNTERS.cached_replies.fetch_add(1, Relaxed);
}
pub fn pending_reply() {
    COUNTERS.pending_replies.fetch_add(1, Relaxed);
}
pub fn error() {
    COUNTERS.errors.fetch_add(1, Relaxed);
}
/// An announce published with the retain flag, dropped unread.
pub fn retained_dropped() {
    COUNTERS.retained_dropped.fetch_add(1, Relaxed);
}
pub fn cloud_latency(d: Duration) {
    let us = d.as_micros() as u64;
    COUNTERS.cloud_requests.fetch_add(1, Relaxed);
    COUNTERS.cloud_latency_us_total.fetch_add(us, Relaxed);
    COUNTERS.cloud_latency_us_max.fetch_max(us, Relaxed);
}

/// Bridged sensors whose device another gateway bridges: a set, not a counter, so
/// that seeing one again (an announce, a restart's scan) never counts it twice.
static OWNED_ELSEWHERE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Whether `sensor`'s readings are held because another gateway owns its device.
/// True when that changed.
pub fn owned_elsewhere(sensor: &str, held: bool) -> bool {
    let mut set = OWNED_ELSEWHERE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if held {
        set.insert(sensor.to_string())
    } else {
        set.remove(sensor)
    }
}

/// How many bridged sensors another gateway owns (STATUS=, the stats line).
pub fn owned_elsewhere_count() -> u64 {
    OWNED_ELSEWHERE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len() as u64
}

/// A snapshot of the counters since start.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub announces: u64,
    pub onboarded: u64,
    pub adopted: u64,
    pub cached_replies: u64,
    pub pending_replies: u64,
    pub errors: u64,
    /// Announces dropped because they carried the retain flag.
    pub retained_dropped: u64,
    /// Sensors waiting for a cloud attempt right now.
    pub pending_now: u64,
    pub cloud_requests: u64,
    pub cloud_latency_ms_avg: f64,
    pub cloud_latency_ms_max: f64,
    /// Bridged sensors whose readings stay buffered: another gateway owns the device.
    pub owned_by_other_gateways: u64,
}

pub fn snapshot(pending_now: u64) -> Snapshot {
    let n = COUNTERS.cloud_requests.load(Relaxed);
    let total = COUNTERS.cloud_latency_us_total.load(Relaxed);
    Snapshot {
        announces: COUNTERS.announces.load(Relaxed),
        onboarded: COUNTERS.onboarded.load(Relaxed),
        adopted: COUNTERS.adopted.load(Relaxed),
        cached_replies: COUNTERS.cached_replies.load(Relaxed),
        pending_replies: COUNTERS.pending_replies.load(Relaxed),
        errors: COUNTERS.errors.load(Relaxed),
        retained_dropped: COUNTERS.retained_dropped.load(Relaxed),
        pending_now,
        cloud_requests: n,
        cloud_latency_ms_avg: if n == 0 {
            0.0
        } else {
            total as f64 / n as f64 / 1000.0
        },
        cloud_latency_ms_max: COUNTERS.cloud_latency_us_max.load(Relaxed) as f64 / 1000.0,
        owned_by_other_gateways: owned_elsewhere_count(),
    }
}
