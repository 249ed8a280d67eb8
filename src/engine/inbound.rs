//! What an inbound message is, from its topic alone: the first stage of every
//! message the broker hands the engine, pure, so its precedence is unit-tested.
//!
//! Readings of bridged sensors come first (their topic pattern is the operator's
//! own), then discovery (configs, followed state topics, anything else under a
//! discovery prefix, which is never an announce), then announces.

use crate::announce;
use crate::bridge::DataTopic;
use crate::config::Config;
use crate::discovery::{homeassistant, tasmota, Source};

/// The topic patterns the engine listens on, from the config.
pub(super) struct Routes {
    /// Where bridged sensors publish readings (`None`: the bridge is off).
    data_topic: Option<DataTopic>,
    /// Home Assistant's discovery prefix, when that source is on.
    homeassistant: Option<String>,
    /// Tasmota's discovery prefix, when that source is on.
    tasmota: Option<String>,
    /// `{…}/+` pattern of announce topics.
    announce_topic: String,
}

/// Where one inbound message goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inbound<'a> {
    /// A reading on a bridged sensor's data topic.
    Reading { sensor: &'a str },
    /// A discovery config of `source` under `prefix`.
    DiscoveryConfig { source: Source, prefix: &'a str },
    /// A state message on a topic discovery follows.
    FollowedState,
    /// Something else under a discovery prefix (`homeassistant/status`, Tasmota's
    /// `…/sensors`): not an announce, nothing to do.
    DiscoveryOther,
    /// An announce of `sensor`.
    Announce { sensor: &'a str },
    /// On the announce pattern but without a valid sensor id: no safe topic to answer.
    Unroutable,
}

impl Routes {
    pub(super) fn new(cfg: &Config, bridge_on: bool) -> Routes {
        let d = &cfg.discovery;
        Routes {
            data_topic: bridge_on.then(|| DataTopic::new(&cfg.bridge.data_topic)),
            homeassistant: d.homeassistant.then(|| d.homeassistant_prefix.clone()),
            tasmota: d.tasmota.then(|| d.tasmota_prefix.clone()),
            announce_topic: cfg.mqtt.announce_topic.clone(),
        }
    }

    /// Routes `topic`; `followed` says whether discovery follows it as a state topic.
    pub(super) fn classify<'a>(
        &'a self,
        topic: &'a str,
        followed: impl Fn(&str) -> bool,
    ) -> Inbound<'a> {
        if let Some(sensor) = self.data_topic.as_ref().and_then(|d| d.sensor_of(topic)) {
            return Inbound::Reading { sensor };
        }
        if let Some(p) = &self.homeassistant {
            if homeassistant::config_topic(p, topic).is_some() {
                return Inbound::DiscoveryConfig {
                    source: Source::HomeAssistant,
                    prefix: p,
                };
            }
        }
        if let Some(p) = &self.tasmota {
            if tasmota::is_config_topic(p, topic) {
                return Inbound::DiscoveryConfig {
                    source: Source::Tasmota,
                    prefix: p,
                };
            }
        }
        let discovery_on = self.homeassistant.is_some() || self.tasmota.is_some();
        if discovery_on && followed(topic) {
            return Inbound::FollowedState;
        }
        if self.under_discovery_prefix(topic) {
            return Inbound::DiscoveryOther;
        }
        match announce::sensor_id_from_topic(&self.announce_topic, topic) {
            Some(sensor) => Inbound::Announce { sensor },
            None => Inbound::Unroutable,
        }
    }

    fn under_discovery_prefix(&self, topic: &str) -> bool {
        [&self.homeassistant, &self.tasmota]
            .into_iter()
            .flatten()
            .any(|p| {
                topic
                    .strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(bridge_on: bool, discovery: &str) -> Routes {
        let mut cfg = Config::from_toml("[qubitro]\nproject_id = \"p\"\napi_key = \"k\"").unwrap();
        cfg.discovery.homeassistant = discovery.contains("ha");
        cfg.discovery.tasmota = discovery.contains("tasmota");
        Routes::new(&cfg, bridge_on)
    }

    fn none(_: &str) -> bool {
        false
    }

    #[test]
    fn announces_are_routed_by_their_sensor_id_and_a_bad_id_is_unroutable() {
        let r = routes(false, "");
        assert_eq!(
            r.classify("onboard/announce/s-1", none),
            Inbound::Announce { sensor: "s-1" }
        );
        assert_eq!(
            r.classify("onboard/announce/a b", none),
            Inbound::Unroutable
        );
        assert_eq!(
            r.classify("onboard/announce/s/x", none),
            Inbound::Unroutable
        );
    }

    #[test]
    fn a_reading_is_a_reading_only_while_the_bridge_is_on() {
        assert_eq!(
            routes(true, "").classify("onboard/data/s-1", none),
            Inbound::Reading { sensor: "s-1" }
        );
        assert_eq!(
            routes(false, "").classify("onboard/data/s-1", none),
            Inbound::Unroutable
        );
    }

    #[test]
    fn discovery_configs_state_topics_and_the_rest_of_its_prefixes_are_never_announces() {
        let r = routes(true, "ha tasmota");
        assert_eq!(
            r.classify("homeassistant/sensor/x/temp/config", none),
            Inbound::DiscoveryConfig {
                source: Source::HomeAssistant,
                prefix: "homeassistant"
            }
        );
        assert!(matches!(
            r.classify("tasmota/discovery/AABBCC/config", none),
            Inbound::DiscoveryConfig {
                source: Source::Tasmota,
                ..
            }
        ));
        assert_eq!(
            r.classify("homeassistant/status", none),
            Inbound::DiscoveryOther
        );
        assert_eq!(
            r.classify("zigbee2mqtt/x", |t| t == "zigbee2mqtt/x"),
            Inbound::FollowedState
        );
        assert_eq!(r.classify("zigbee2mqtt/x", none), Inbound::Unroutable);
    }

    #[test]
    fn with_discovery_off_nothing_is_followed_or_reserved() {
        let r = routes(false, "");
        assert_eq!(
            r.classify("homeassistant/sensor/x/t/config", |_| true),
            Inbound::Unroutable
        );
        assert_eq!(
            r.classify("homeassistant/status", none),
            Inbound::Unroutable
        );
    }
}
