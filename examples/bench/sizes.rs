//! How much each phase does, and the constants every part of the bench agrees on (onboardd's
//! defaults, the bench's API key and project, the shared reply subscription).

use std::time::Duration;

/// How much each phase does.
pub(crate) struct Sizes {
    /// New devices per 0 ms phase (per lookup policy).
    pub(crate) new0: usize,
    /// New devices per 100 ms phase (per lookup policy).
    pub(crate) new100: usize,
    /// New devices onboarded one at a time (bytes and syscalls per new device).
    pub(crate) new_one: usize,
    /// Sensors known after the fill (the "100 000 known" measurement).
    pub(crate) fill_to: usize,
    /// Times each known sensor re-announces in the re-announce throughput phase.
    pub(crate) rounds: usize,
    /// Offered rate and length of the latency phases.
    pub(crate) latency_rate: f64,
    pub(crate) latency_secs: f64,
    /// Readings of the one-device bridge phase.
    pub(crate) bridge_one: usize,
    /// Bridged devices of the many-device phase, and readings per device in it.
    pub(crate) bridge_devices: usize,
    pub(crate) bridge_rounds: usize,
    /// Readings of the trickle (one device, 10/s) for bytes written at a sensor's pace
    /// (none in --quick, nor at 1/s: each costs two waits for quiet).
    pub(crate) bridge_trickle: usize,
    /// Readings at 1/s, the same (none in --quick: it would take seconds).
    pub(crate) bridge_slow: usize,
    /// Offered rate (readings/s over every bridged device) and length of the bridge's
    /// latency phase.
    pub(crate) bridge_lat_rate: f64,
    pub(crate) bridge_lat_secs: f64,
    /// Length of the uplink outage (every device sends one reading a second), and how
    /// long no arrival means the rest is lost (a QoS 0 reading the bridge dropped).
    pub(crate) outage_secs: f64,
    pub(crate) outage_quiet: Duration,
    /// How long the bridging process must have written nothing before a bytes-written
    /// measurement starts (its end counts until 1.5 s without writes, as the target says).
    pub(crate) write_settle: Duration,
    /// Uplinks kept busy next to `fill_to` known sensors, and readings each.
    pub(crate) busy_uplinks: usize,
    pub(crate) busy_rounds: usize,
    /// Bytes written and the outage for the mosquitto bridges too (not in --quick: a
    /// smoke test checks onboardd, and each costs several waits for quiet).
    pub(crate) mosquitto_writes: bool,
    /// `--outage-only`: onboardd's outages and nothing else of the bridge.
    pub(crate) outage_only: bool,
    /// `--rates-only`: readings/s, latency and RSS, no bytes written and no outages.
    pub(crate) rates_only: bool,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                new0: 200,
                new100: 100,
                new_one: 20,
                fill_to: 500,
                rounds: 2,
                latency_rate: 1000.0,
                latency_secs: 1.0,
                bridge_one: 200,
                bridge_devices: 20,
                bridge_rounds: 10,
                bridge_trickle: 0,
                bridge_slow: 0,
                bridge_lat_rate: 200.0,
                bridge_lat_secs: 1.0,
                outage_secs: 2.0,
                outage_quiet: Duration::from_secs(3),
                write_settle: SLED_FLUSH_SETTLE,
                busy_uplinks: 8,
                busy_rounds: 20,
                mosquitto_writes: false,
                outage_only: false,
                rates_only: false,
            }
        } else {
            Sizes {
                new0: 10_000,
                new100: 2_000,
                new_one: 200,
                fill_to: 100_000,
                rounds: 5,
                latency_rate: 1000.0,
                latency_secs: 10.0,
                bridge_one: 100_000,
                bridge_devices: 100,
                bridge_rounds: 1_000,
                bridge_trickle: 50,
                bridge_slow: 10,
                bridge_lat_rate: 500.0,
                bridge_lat_secs: 10.0,
                outage_secs: 60.0,
                outage_quiet: Duration::from_secs(60),
                write_settle: Duration::from_secs(5),
                busy_uplinks: 64,
                busy_rounds: 500,
                mosquitto_writes: true,
                outage_only: false,
                rates_only: false,
            }
        }
    }
}

/// Must match onboardd's defaults, which the bench config does not change.
pub(crate) const MAX_IN_FLIGHT: f64 = 32.0;
pub(crate) const RECEIVE_MAXIMUM: u16 = 256;
/// sled's background flush runs every second: wait this long to see its writes.
pub(crate) const SLED_FLUSH_SETTLE: Duration = Duration::from_millis(1500);
pub(crate) const API_KEY: &str = "QB_bench";
pub(crate) const PROJECT: &str = "bench-project";
pub(crate) const REPLY_FILTER: &str = "$share/bench/onboard/reply/+";
/// The echo client's fixed reply: the shape and size of onboardd's ok reply.
pub(crate) const ECHO_REPLY: &[u8] = concat!(
    r#"{"status":"ok","sensor_id":"s00000","device_id":"3f1c2a4e-8b7d-4c21-9e0f-5a6b7c8d9e0f","#,
    r#""device_token":"c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00","request_id":"r00000","#,
    r#""broker":{"host":"broker.qubitro.com","port":8883}}"#
)
.as_bytes();
/// The claim key of the proofs-on phase (64 hex characters, as onboardd requires): a
/// benchmark's fixed key, not a secret.
pub(crate) const BENCH_CLAIM_KEY: &str =
    "62656e63682d636c61696d2d6b65792d62656e63682d636c61696d2d6b657921";
