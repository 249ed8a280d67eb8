//! /metrics in Prometheus' text exposition format (version 0.0.4), written by hand:
//! a few dozen fixed series need no registry, and the crate for it would add its
//! own encoder and locks to a binary that ships to Pis. Pure: a [`Sample`] in, text out.

use std::fmt::Write as _;

use crate::bridge::BridgeStats;
use crate::metrics::{AnnounceResult, CloudOutcome, CloudRequests, HistogramSnapshot, Snapshot};
use crate::reply::ReplyCode;
use crate::store::SENSOR_STATES;

/// Everything /metrics shows, read at the moment of the scrape.
pub struct Sample {
    pub counters: Snapshot,
    /// Announces by result (as [`AnnounceResult::LABELS`]), refused ones by code
    /// (as [`ReplyCode::ALL`]).
    pub announces: ([u64; 5], [u64; ReplyCode::ALL.len()]),
    pub announce_reply: HistogramSnapshot,
    pub replies_delivered: u64,
    pub cloud: CloudRequests,
    /// Sensors whose onboarding task runs now (waiting for or in a cloud call).
    pub onboarding_now: u64,
    /// Sensors per state, as [`SENSOR_STATES`].
    pub sensors: [u64; 4],
    /// None when the bridge is off; then the uplinks paused.
    pub bridge: Option<(BridgeStats, u64)>,
    pub mqtt_connected: bool,
    pub cloud_ok: bool,
    /// Whether the broker lets clients in without a login (None: not known yet).
    pub open_broker: Option<bool>,
    pub store_bytes: Option<u64>,
    pub bytes_written: Option<u64>,
    pub version: &'static str,
}

/// The exposition format's content type, which Prometheus checks.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn value(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {v}");
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {v}");
        }
    }
    fn one(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.value(name, "", v);
    }
    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, "histogram", help);
        for (le, n) in h.bounds.iter().zip(&h.cumulative) {
            self.value(&format!("{name}_bucket"), &format!("le=\"{le}\""), n);
        }
        self.value(&format!("{name}_bucket"), "le=\"+Inf\"", h.count());
        self.value(&format!("{name}_sum"), "", h.sum_seconds);
        self.value(&format!("{name}_count"), "", h.count());
    }
}

pub fn render(s: &Sample) -> String {
    let mut o = Out(String::with_capacity(8192));
    announces(&mut o, s);
    devices(&mut o, s);
    cloud(&mut o, s);
    if let Some((b, paused)) = &s.bridge {
        bridge(&mut o, b, *paused);
    }
    process(&mut o, s);
    o.0
}

fn announces(o: &mut Out, s: &Sample) {
    let c = &s.counters;
    o.family(
        "onboardd_announces_total",
        "counter",
        "Announces received, by what became of them: ok (answered from the store), pending (ask again later), \
         onboarding (its onboarding task answers), refused (an error reply), dropped (retained, or no valid sensor id).",
    );
    let (by_result, by_code) = &s.announces;
    for (label, n) in AnnounceResult::LABELS.iter().zip(by_result) {
        o.value(
            "onboardd_announces_total",
            &format!("result=\"{label}\""),
            n,
        );
    }
    o.family(
        "onboardd_announces_refused_total",
        "counter",
        "Announces answered with an error reply, by the reply's code.",
    );
    for (code, n) in ReplyCode::ALL.iter().zip(by_code) {
        let label = format!("code=\"{}\"", code.as_str());
        o.value("onboardd_announces_refused_total", &label, n);
    }
    o.one(
        "onboardd_announces_retained_dropped_total",
        "counter",
        "Announces dropped unread because they carried the retain flag.",
        c.retained_dropped,
    );
    o.histogram(
        "onboardd_announce_reply_seconds",
        "From an announce's arrival at the dispatcher to its reply handed to the MQTT client \
         (for a new sensor: its onboarding task's first reply).",
        &s.announce_reply,
    );
    o.family(
        "onboardd_replies_sent_total",
        "counter",
        "Replies besides a new device's: ok to a known sensor (from the store), or pending (retry later).",
    );
    o.value(
        "onboardd_replies_sent_total",
        "status=\"ok_known\"",
        c.cached_replies,
    );
    o.value(
        "onboardd_replies_sent_total",
        "status=\"pending\"",
        c.pending_replies,
    );
    o.one(
        "onboardd_replies_delivered_total",
        "counter",
        "New devices' ok replies the broker acknowledged to a subscribed sensor.",
        s.replies_delivered,
    );
    o.one(
        "onboardd_errors_total",
        "counter",
        "Announces or onboardings that ended in an error.",
        c.errors,
    );
}

fn devices(o: &mut Out, s: &Sample) {
    let c = &s.counters;
    o.family(
        "onboardd_devices_created_total",
        "counter",
        "Sensors onboarded: devices created in Qubitro, or adopted when Qubitro already had one.",
    );
    o.value(
        "onboardd_devices_created_total",
        "origin=\"created\"",
        c.onboarded - c.adopted.min(c.onboarded),
    );
    o.value(
        "onboardd_devices_created_total",
        "origin=\"adopted\"",
        c.adopted,
    );
    o.family(
        "onboardd_sensors",
        "gauge",
        "Sensors in the store by onboarding state (delivered: the broker acknowledged the ok reply).",
    );
    for (state, n) in SENSOR_STATES.iter().zip(s.sensors) {
        o.value("onboardd_sensors", &format!("state=\"{state}\""), n);
    }
    o.one(
        "onboardd_sensors_onboarding",
        "gauge",
        "Sensors whose onboarding is running now (waiting for or in a cloud call).",
        s.onboarding_now,
    );
}

fn cloud(o: &mut Out, s: &Sample) {
    o.family(
        "onboardd_cloud_requests_total",
        "counter",
        "Requests to Qubitro's API by outcome.",
    );
    for (outcome, n) in CloudOutcome::ALL.iter().zip(s.cloud.by_outcome) {
        o.value(
            "onboardd_cloud_requests_total",
            &format!("outcome=\"{}\"", outcome.label()),
            n,
        );
    }
    o.histogram(
        "onboardd_cloud_request_duration_seconds",
        "Duration of requests to Qubitro's API, answered or not.",
        &s.cloud.duration,
    );
    o.one(
        "onboardd_mqtt_connected",
        "gauge",
        "1 while the session with the local broker is up.",
        u8::from(s.mqtt_connected),
    );
    o.one(
        "onboardd_cloud_up",
        "gauge",
        "1 while Qubitro's API answers and accepts the key.",
        u8::from(s.cloud_ok),
    );
    if let Some(open) = s.open_broker {
        o.one(
            "onboardd_broker_open",
            "gauge",
            "1 when the local broker lets clients in without a login (anyone who reaches it can act as onboardd).",
            u8::from(open),
        );
    }
}

fn bridge(o: &mut Out, b: &BridgeStats, paused: u64) {
    o.one(
        "onboardd_bridge_readings_forwarded_total",
        "counter",
        "Readings Qubitro's broker acknowledged.",
        b.forwarded,
    );
    o.one(
        "onboardd_bridge_readings_dropped_total",
        "counter",
        "Readings dropped after being accepted (buffer bounds, refused by Qubitro).",
        b.dropped,
    );
    o.family(
        "onboardd_bridge_readings_refused_total",
        "counter",
        "Readings refused on arrival: bad data or retained, or past bridge.max_readings_per_s.",
    );
    o.value(
        "onboardd_bridge_readings_refused_total",
        "reason=\"invalid\"",
        b.rejected,
    );
    o.value(
        "onboardd_bridge_readings_refused_total",
        "reason=\"rate_limited\"",
        b.rate_limited,
    );
    o.one(
        "onboardd_bridge_readings_buffered",
        "gauge",
        "Readings waiting in the store for their uplink.",
        b.buffered,
    );
    o.one(
        "onboardd_bridge_oldest_buffered_age_seconds",
        "gauge",
        "How long the oldest buffered reading has waited for its uplink (0: none buffered).",
        b.oldest_buffered_ms as f64 / 1000.0,
    );
    o.one(
        "onboardd_bridge_buffered_bytes",
        "gauge",
        "Bytes the buffered readings take in the store.",
        b.buffered_bytes,
    );
    o.one(
        "onboardd_bridge_readings_held",
        "gauge",
        "Readings in memory waiting for Qubitro's acknowledgement.",
        b.held,
    );
    o.one(
        "onboardd_bridge_devices",
        "gauge",
        "Devices whose readings the bridge forwards.",
        b.bridged_devices,
    );
    o.one(
        "onboardd_bridge_uplinks_connected",
        "gauge",
        "Connections to Qubitro's broker open now.",
        b.connections,
    );
    o.one(
        "onboardd_bridge_uplinks_paused",
        "gauge",
        "Uplinks paused because Qubitro refused the device's login or topic.",
        paused,
    );
}

fn process(o: &mut Out, s: &Sample) {
    if let Some(bytes) = s.store_bytes {
        o.one(
            "onboardd_store_size_bytes",
            "gauge",
            "Bytes the store's database takes on disk.",
            bytes,
        );
    }
    if let Some(bytes) = s.bytes_written {
        o.one(
            "onboardd_storage_written_bytes_total",
            "counter",
            "Bytes this process caused to be written to storage since it started (write_bytes of /proc/self/io: \
             what reaches the block device, the SD card's wear).",
            bytes,
        );
    }
    o.family(
        "onboardd_build_info",
        "gauge",
        "Always 1; the version is its label.",
    );
    o.value(
        "onboardd_build_info",
        &format!("version=\"{}\"", s.version),
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        let cloud = crate::metrics::Histogram::new(&crate::metrics::CLOUD_BUCKETS_S);
        for ms in [10, 30, 60, 200, 400, 900, 0, 0, 0, 1_000_000] {
            cloud.observe(std::time::Duration::from_millis(ms));
        }
        Sample {
            counters: crate::metrics::snapshot(0),
            announces: ([1, 2, 3, 4, 0], [0, 0, 0, 0, 4, 0, 0, 0]),
            announce_reply: HistogramSnapshot::default(),
            replies_delivered: 1,
            cloud: CloudRequests {
                by_outcome: [6, 1, 1, 2],
                duration: cloud.read(),
            },
            onboarding_now: 2,
            sensors: [1, 0, 2, 3],
            bridge: Some((BridgeStats::default(), 0)),
            mqtt_connected: true,
            cloud_ok: false,
            open_broker: Some(true),
            store_bytes: Some(1),
            bytes_written: None,
            version: "9.9.9",
        }
    }

    #[test]
    fn every_series_belongs_to_a_declared_family_and_counters_end_in_total() {
        let text = render(&sample());
        let mut families = std::collections::HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(name.starts_with("onboardd_"), "{name}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                families.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| families.get(*f).is_some_and(|k| k == "histogram"))
                    })
                    .unwrap_or(name);
                assert!(families.contains_key(family), "{line} has no # TYPE");
            }
        }
    }

    #[test]
    fn the_histogram_ends_with_inf_equal_to_its_count() {
        let text = render(&sample());
        assert!(text.contains("onboardd_cloud_request_duration_seconds_bucket{le=\"10\"} 9\n"));
        assert!(text.contains("onboardd_cloud_request_duration_seconds_bucket{le=\"+Inf\"} 10\n"));
        assert!(text.contains("onboardd_cloud_request_duration_seconds_count 10\n"));
        assert!(text.contains("onboardd_cloud_requests_total{outcome=\"transport_error\"} 2\n"));
        assert!(text.contains("onboardd_announce_reply_seconds_count 0\n"));
        assert!(text.contains("onboardd_sensors{state=\"delivered\"} 3\n"));
        assert!(text.contains("onboardd_announces_refused_total{code=\"unauthorized\"} 4\n"));
        assert!(text.contains("onboardd_cloud_up 0\n"));
    }
}
