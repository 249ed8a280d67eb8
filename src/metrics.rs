//! Process-wide counters: what the stats topic, the log's stats line and
//! `onboardd status` report. Plain atomics: cheap enough for every announce.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::reply::ReplyCode;

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
/// Upper bounds (seconds) of the announce → reply histogram: a known sensor is
/// answered from the store within milliseconds, a new one after its cloud call.
pub const ANNOUNCE_REPLY_BUCKETS_S: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static CLOUD_BY_OUTCOME: [AtomicU64; 4] = [ZERO; 4];

/// Bounds a [`Histogram`] may have at most.
const MAX_BUCKETS: usize = 12;

/// A histogram with fixed bounds in seconds, of plain atomics: an observation is a
/// search among a dozen bounds and two atomic adds, cheap on any path.
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative: observations per bucket; index `bounds.len()` is above all.
    counts: [AtomicU64; MAX_BUCKETS + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            bounds,
            counts: [ZERO; MAX_BUCKETS + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn read(&self) -> HistogramSnapshot {
        let mut running = 0;
        let cumulative = self.counts[..=self.bounds.len()]
            .iter()
            .map(|c| {
                running += c.load(Relaxed);
                running
            })
            .collect();
        HistogramSnapshot {
            bounds: self.bounds,
            cumulative,
            sum_seconds: self.sum_us.load(Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram as /metrics shows it.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    pub bounds: &'static [f64],
    /// Cumulative counts per bound, then +Inf (the count).
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

static CLOUD_DURATION: Histogram = Histogram::new(&CLOUD_BUCKETS_S);
static ANNOUNCE_REPLY: Histogram = Histogram::new(&ANNOUNCE_REPLY_BUCKETS_S);

/// One Qubitro request, answered or not, and how long it took.
pub fn cloud_request(outcome: CloudOutcome, d: Duration) {
    let us = d.as_micros() as u64;
    COUNTERS.cloud_requests.fetch_add(1, Relaxed);
    COUNTERS.cloud_latency_us_total.fetch_add(us, Relaxed);
    COUNTERS.cloud_latency_us_max.fetch_max(us, Relaxed);
    CLOUD_BY_OUTCOME[outcome as usize].fetch_add(1, Relaxed);
    CLOUD_DURATION.observe(d);
}

/// The cloud requests by outcome and their duration histogram, for /metrics.
#[derive(Debug, Clone, Default)]
pub struct CloudRequests {
    /// Indexed as [`CloudOutcome::ALL`].
    pub by_outcome: [u64; 4],
    pub duration: HistogramSnapshot,
}

pub fn cloud_requests() -> CloudRequests {
    CloudRequests {
        by_outcome: CLOUD_BY_OUTCOME.each_ref().map(|c| c.load(Relaxed)),
        duration: CLOUD_DURATION.read(),
    }
}

/// An announce answered: from its arrival at the dispatcher to its reply handed to
/// the MQTT client (the first reply only, for an announce answered by its
/// onboarding task).
pub fn announce_replied(d: Duration) {
    ANNOUNCE_REPLY.observe(d);
}

pub fn announce_reply_times() -> HistogramSnapshot {
    ANNOUNCE_REPLY.read()
}

/// What became of an announce, as /metrics counts it: a fixed set of words, so a
/// fleet of any size makes the same few series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnnounceResult {
    /// Answered ok at once (a known sensor).
    Ok,
    /// Told to ask again later.
    Pending,
    /// A new (or still pending) sensor: its onboarding task answers.
    Onboarding,
    /// Refused with an error reply (counted by code too).
    Refused(ReplyCode),
    /// Not answered: retained, or on a topic without a valid sensor id.
    Dropped,
}

impl AnnounceResult {
    pub const LABELS: [&'static str; 5] = ["ok", "pending", "onboarding", "refused", "dropped"];

    fn index(self) -> usize {
        match self {
            AnnounceResult::Ok => 0,
            AnnounceResult::Pending => 1,
            AnnounceResult::Onboarding => 2,
            AnnounceResult::Refused(_) => 3,
            AnnounceResult::Dropped => 4,
        }
    }
}

static ANNOUNCES_BY_RESULT: [AtomicU64; 5] = [ZERO; 5];
static REFUSED_BY_CODE: [AtomicU64; ReplyCode::ALL.len()] = [ZERO; ReplyCode::ALL.len()];

pub fn announce_result(r: AnnounceResult) {
    ANNOUNCES_BY_RESULT[r.index()].fetch_add(1, Relaxed);
    if let AnnounceResult::Refused(code) = r {
        if let Some(i) = ReplyCode::ALL.iter().position(|c| *c == code) {
            REFUSED_BY_CODE[i].fetch_add(1, Relaxed);
        }
    }
}

/// Announces by result (indexed as [`AnnounceResult::LABELS`]) and the refused ones
/// by code (indexed as [`ReplyCode::ALL`]).
pub fn announce_results() -> ([u64; 5], [u64; ReplyCode::ALL.len()]) {
    (
        ANNOUNCES_BY_RESULT.each_ref().map(|c| c.load(Relaxed)),
        REFUSED_BY_CODE.each_ref().map(|c| c.load(Relaxed)),
    )
}

/// Bytes this process has caused to be written to storage since it started
/// (`write_bytes` of `/proc/self/io`: what reached the block layer, the SD card's
/// wear); `None` where the kernel does not say.
pub fn bytes_written() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
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
