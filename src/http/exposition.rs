//! /metrics in Prometheus' text exposition format (version 0.0.4), written by hand:
//! a few dozen fixed series need no registry, and the crate for it would add its
//! own encoder and locks to a binary that ships to Pis. Pure: a [`Sample`] in, text out.

use std::fmt::Write as _;

use crate::bridge::BridgeStats;
use crate::metrics::{CloudOutcome, CloudRequests, Snapshot, CLOUD_BUCKETS_S};

/// Everything /metrics shows, read at the moment of the scrape.
pub struct Sample {
    pub counters: Snapshot,
    pub replies_delivered: u64,
    pub cloud: CloudRequests,
    /// Sensors whose onboarding task runs now (waiting for or in a cloud call).
    pub onboarding_now: u64,
    /// None when the bridge is off.
    pub bridge: Option<BridgeStats>,
    pub mqtt_connected: bool,
    pub cloud_ok: bool,
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
}

pub fn render(s: &Sample) -> String {
    let mut o = Out(String::with_capacity(4096));
    let c = &s.counters;
    o.one(
        "onboardd_announces_total",
        "counter",
        "Announces received, whatever their outcome.",
        c.announces,
    );
    o.one(
        "onboardd_announces_retained_dropped_total",
        "counter",
        "Announces dropped unread because they carried the retain flag.",
        c.retained_dropped,
    );
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
    o.one(
        "onboardd_sensors_onboarding",
        "gauge",
        "Sensors whose onboarding is running now (waiting for or in a cloud call).",
        s.onboarding_now,
    );
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
    let h = "onboardd_cloud_request_duration_seconds";
    o.family(
        h,
        "histogram",
        "Duration of requests to Qubitro's API, answered or not.",
    );
    for (le, n) in CLOUD_BUCKETS_S.iter().zip(&s.cloud.cumulative) {
        o.value(&format!("{h}_bucket"), &format!("le=\"{le}\""), n);
    }
    let count = s.cloud.cumulative.last().copied().unwrap_or(0);
    o.value(&format!("{h}_bucket"), "le=\"+Inf\"", count);
    o.value(&format!("{h}_sum"), "", s.cloud.sum_seconds);
    o.value(&format!("{h}_count"), "", count);
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
    if let Some(b) = &s.bridge {
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
        o.one(
            "onboardd_bridge_readings_refused_total",
            "counter",
            "Readings refused on arrival (bad data, retained).",
            b.rejected,
        );
        o.one(
            "onboardd_bridge_readings_buffered",
            "gauge",
            "Readings waiting in the store for their uplink.",
            b.buffered,
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
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            counters: crate::metrics::snapshot(0),
            replies_delivered: 1,
            cloud: CloudRequests {
                by_outcome: [3, 1, 0, 2],
                cumulative: vec![1, 2, 3, 3, 4, 5, 5, 5, 6, 6],
                sum_seconds: 1.5,
            },
            onboarding_now: 2,
            bridge: Some(BridgeStats::default()),
            mqtt_connected: true,
            cloud_ok: false,
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
        assert!(text.contains("onboardd_cloud_request_duration_seconds_bucket{le=\"+Inf\"} 6\n"));
        assert!(text.contains("onboardd_cloud_request_duration_seconds_count 6\n"));
        assert!(text.contains("onboardd_cloud_requests_total{outcome=\"transport_error\"} 2\n"));
        assert!(text.contains("onboardd_cloud_up 0\n"));
    }
}
