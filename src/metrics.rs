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
/// Ok replies of new devices that the broker acknowledged to a subscriber; kept
/// apart from [`Snapshot`] so the stats topic's JSON stays as it was.
static REPLIES_DELIVERED: AtomicU64 = AtomicU64::new(0);

pub fn reply_delivered() {
    REPLIES_DELIVERED.fetch_add(1, Relaxed);
}

pub fn replies_delivered() -> u64 {
    REPLIES_DELIVERED.load(Relaxed)
}

/// How a Qubitro request ended: what an operator tells apart on a dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudOutcome {
    /// A 2xx or 3xx answer.
    Ok,
    /// A 4xx answer (refused key, bad request, not found, rate limited).
    ClientError,
    /// A 5xx answer.
    ServerError,
    /// No answer: timeout, connection refused or broken, TLS.
    Transport,
}

impl CloudOutcome {
    pub const ALL: [CloudOutcome; 4] = [
        CloudOutcome::Ok,
        CloudOutcome::ClientError,
        CloudOutcome::ServerError,
        CloudOutcome::Transport,
    ];

    pub fn of_status(code: u16) -> CloudOutcome {
        match code {
            400..=499 => CloudOutcome::ClientError,
            500.. => CloudOutcome::ServerError,
            _ => CloudOutcome::Ok,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            CloudOutcome::Ok => "ok",
            CloudOutcome::ClientError => "client_error",
            CloudOutcome::ServerError => "server_error",
            CloudOutcome::Transport => "transport_error",
        }
    }
}

/// Upper bounds (seconds) of the cloud request duration histogram: Qubitro answers
/// in tens of milliseconds when well, the client gives up after a few seconds.
pub const CLOUD_BUCKETS_S: [f64; 9] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static CLOUD_BY_OUTCOME: [AtomicU64; 4] = [ZERO; 4];
/// Non-cumulative: requests whose duration fell in each bucket (the last: above all).
static CLOUD_BUCKET_COUNTS: [AtomicU64; CLOUD_BUCKETS_S.len() + 1] =
    [ZERO; CLOUD_BUCKETS_S.len() + 1];

/// One Qubitro request, answered or not, and how long it took.
pub fn cloud_request(outcome: CloudOutcome, d: Duration) {
    let us = d.as_micros() as u64;
    COUNTERS.cloud_requests.fetch_add(1, Relaxed);
    COUNTERS.cloud_latency_us_total.fetch_add(us, Relaxed);
    COUNTERS.cloud_latency_us_max.fetch_max(us, Relaxed);
    CLOUD_BY_OUTCOME[outcome as usize].fetch_add(1, Relaxed);
    let secs = d.as_secs_f64();
    let bucket = CLOUD_BUCKETS_S
        .iter()
        .position(|le| secs <= *le)
        .unwrap_or(CLOUD_BUCKETS_S.len());
    CLOUD_BUCKET_COUNTS[bucket].fetch_add(1, Relaxed);
}

/// The cloud requests by outcome and their duration histogram, for /metrics.
#[derive(Debug, Clone, Default)]
pub struct CloudRequests {
    /// Indexed as [`CloudOutcome::ALL`].
    pub by_outcome: [u64; 4],
    /// Cumulative counts per bucket of [`CLOUD_BUCKETS_S`], then +Inf.
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

pub fn cloud_requests() -> CloudRequests {
    let mut running = 0;
    let cumulative = CLOUD_BUCKET_COUNTS
        .iter()
        .map(|c| {
            running += c.load(Relaxed);
            running
        })
        .collect();
    CloudRequests {
        by_outcome: CLOUD_BY_OUTCOME.each_ref().map(|c| c.load(Relaxed)),
        cumulative,
        sum_seconds: COUNTERS.cloud_latency_us_total.load(Relaxed) as f64 / 1e6,
    }
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
