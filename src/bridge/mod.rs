//! The telemetry bridge: readings that bridged sensors publish on the
//! local broker are forwarded to Qubitro's broker under each device's own login, so
//! the token never leaves the gateway. While the uplink takes them, readings are
//! acknowledged through (the local PUBACK waits for Qubitro's, nothing is written);
//! while it cannot, they are spilled to a durable buffer and forwarded after.
//!
//! - [`flatten`]: a reading → the flat JSON object Qubitro takes, or why it is dropped.
//! - [`held`]: readings held in memory while their uplink forwards them, and the
//!   spill to the buffer when it cannot in time.
//! - [`buffer`]: spilled readings waiting for Qubitro's PUBACK, in the store's sled
//!   database under its one flusher (group commit); `spill_batch`: its on-disk form,
//!   one value per group commit and a watermark per sensor.
//! - [`facade`]: [`Bridge`], what the rest of onboardd calls; [`status`]: what it answers.
//! - `scheduler`: which devices get one of the `bridge.max_connections` uplinks.
//! - [`uplink`]: one device's MQTT session to Qubitro's broker, under its own login;
//!   `connection`: the rumqttc client and event-loop task under it; `uplink_errors`:
//!   how a session ended (refused, taken over, lost).
//! - `shared`: the device table and counters the three above share.
//!
//! [`DataTopic`] maps the data topic pattern to the local subscription and back.

pub mod buffer;
mod connection;
pub mod facade;
pub mod flatten;
pub mod held;
pub mod rate;
mod scheduler;
mod shared;
mod spill_batch;
pub mod status;
pub mod uplink;
mod uplink_errors;

pub use facade::Bridge;
pub use held::{Settled, Ticket};
pub use status::{AcceptError, Accepted, BridgeError, BridgeStats, DeviceState, DeviceStatus};

use crate::announce::valid_id;

/// `bridge.data_topic` (`onboard/data/{sensor_id}`), validated by the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataTopic {
    before: String,
    after: String,
}

impl DataTopic {
    pub fn new(pattern: &str) -> DataTopic {
        let (before, after) = pattern.split_once("{sensor_id}").unwrap_or((pattern, ""));
        DataTopic {
            before: before.to_string(),
            after: after.to_string(),
        }
    }

    /// The subscription on the local broker (`onboard/data/+`).
    pub fn filter(&self) -> String {
        format!("{}+{}", self.before, self.after)
    }

    /// The sensor a data topic belongs to; `None` for anything else, or an id that
    /// is not a valid sensor id.
    pub fn sensor_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let id = topic
            .strip_prefix(self.before.as_str())?
            .strip_suffix(self.after.as_str())?;
        valid_id(id).then_some(id)
    }

    /// A sensor's data topic.
    pub fn for_sensor(&self, sensor: &str) -> String {
        format!("{}{sensor}{}", self.before, self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"
        gateway_id = "gw1"
        [qubitro]
        project_id = "p1"
        api_key = "QB_secret_value"
    "#;

    #[test]
    fn the_data_topic_maps_to_a_filter_and_back() {
        let t = DataTopic::new("onboard/data/{sensor_id}");
        assert_eq!(t.filter(), "onboard/data/+");
        assert_eq!(t.sensor_of("onboard/data/temp-01"), Some("temp-01"));
        assert_eq!(t.sensor_of("onboard/data/a/b"), None);
        assert_eq!(t.sensor_of("onboard/announce/x"), None);
        assert_eq!(t.for_sensor("s1"), "onboard/data/s1");
        let mid = DataTopic::new("site/{sensor_id}/up");
        assert_eq!(mid.filter(), "site/+/up");
        assert_eq!(mid.sensor_of("site/x/up"), Some("x"));
    }

    #[test]
    fn bridge_defaults_are_the_documented_ones() {
        let cfg = Config::from_toml(BASE).expect("valid");
        let b = &cfg.bridge;
        assert!(b.enabled);
        assert_eq!(b.data_topic, "onboard/data/{sensor_id}");
        assert_eq!(b.max_buffered_messages, 10_000);
        assert_eq!(b.max_buffer_bytes, 64 << 20);
        assert_eq!(b.idle_disconnect_s, 300);
        assert_eq!(b.max_connections, 64);
        assert_eq!(b.reconnect_max_ms, 30_000);
        assert!(cfg.qubitro.broker_tls);
    }

    #[test]
    fn broker_tls_off_is_accepted_only_for_a_loopback_broker() {
        let off = |host: &str| {
            Config::from_toml(&format!(
                "{BASE}\nbroker_host = \"{host}\"\nbroker_tls = false\n"
            ))
        };
        assert!(off("127.0.0.1").is_ok());
        assert!(off("localhost").is_ok());
        let err = off("broker.qubitro.com").expect_err("refused");
        assert!(err.to_string().contains("qubitro.broker_tls"), "{err}");
    }

    #[test]
    fn bad_bridge_keys_are_config_errors_naming_the_key() {
        for (extra, key) in [
            ("data_topic = \"onboard/data/+\"", "bridge.data_topic"),
            ("data_topic = \"onboard/data\"", "bridge.data_topic"),
            ("max_connections = 0", "bridge.max_connections"),
            ("max_buffered_messages = 0", "bridge.max_buffered_messages"),
            ("idle_disconnect_s = 0", "bridge.idle_disconnect_s"),
        ] {
            let err = Config::from_toml(&format!("{BASE}\n[bridge]\n{extra}\n")).expect_err(extra);
            assert!(err.to_string().contains(key), "{extra}: {err}");
        }
    }
}
