//! Zero-firmware onboarding: devices that already describe themselves
//! on MQTT — Home Assistant discovery (Zigbee2MQTT, ESPHome, Shelly generators,
//! OpenMQTTGateway…) or Tasmota's own discovery — become one bridged Qubitro device
//! per physical device, their readings forwarded through the telemetry bridge.
//!
//! Everything in this module is pure (no I/O), like [`crate::announce`]:
//! - [`homeassistant`] and [`tasmota`]: a config message → the [`Discovered`]
//!   device and its entities, or why it is skipped;
//! - [`template`]: the `value_template` subset that is evaluated;
//! - [`registry`]: what is known, grouped per physical device, persisted as JSON;
//!   a state message → the flat reading of each device that reads that topic.
//!
//! The engine onboards what the registry reports and sends readings through the
//! bridge; the MQTT task follows the topics it names.

pub mod homeassistant;
pub mod registry;
pub mod reserved;
pub mod spec;
pub mod tasmota;
pub mod template;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::security::wildcard_match;

pub use registry::Registry;
pub use reserved::Reserved;
use template::Rule;

/// The longest sensor id (the announce protocol's rule).
pub const MAX_SENSOR_ID_CHARS: usize = 64;
/// What is kept of a long derived id before `-` and the hash.
const HASHED_HEAD_CHARS: usize = 47;

/// Who described the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    HomeAssistant,
    Tasmota,
}

impl Source {
    /// The metadata value of `discovered_by`, and the device's tag.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::HomeAssistant => "homeassistant",
            Source::Tasmota => "tasmota",
        }
    }

    /// What every derived sensor id of this source begins with.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Source::HomeAssistant => "ha-",
            Source::Tasmota => "tasmota-",
        }
    }
}

/// The physical device a config describes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub source: Source,
    /// What entities are grouped by (first identifier, connection, node id or unique
    /// id; a Tasmota MAC), as published: `discovery_id` in the device's metadata.
    pub identifier: String,
    pub name: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
}

/// One value of a device's readings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// The key of its value in the reading forwarded to Qubitro.
    pub key: String,
    /// Where its state is published (after `~` expansion).
    pub state_topic: String,
    pub read: Read,
}

/// How an entity's value comes out of its state message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Read {
    /// A Home Assistant entity: plain value, or one key of a JSON state.
    Value(Rule),
    /// Tasmota's `SENSOR` telemetry: nested JSON flattened with `_`, `Time` dropped.
    TasmotaSensor,
}

/// What one config message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// An empty payload: whatever this topic described is gone.
    Removed,
    /// The device and its qualifying entities (none: nothing to onboard from this
    /// topic any more). `warnings`: entities left out, each said once.
    Config {
        device: Device,
        entities: Vec<Entity>,
        warnings: Vec<String>,
    },
}

/// Why a config message is ignored altogether (what the topic described before
/// stays as it was).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("config is {size} bytes, more than discovery.max_config_bytes = {max}")]
    TooLarge { size: usize, max: usize },
    #[error("config is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("config must be a JSON object")]
    NotAnObject,
    #[error("not a discovery config topic")]
    NotAConfigTopic,
    #[error("component {0} is not in discovery.components")]
    Component(String),
    #[error("device identifier {0:?} matches discovery.skip_identifiers")]
    SkippedIdentifier(String),
    #[error("config names no device identifier, connection, node id or unique id")]
    NoIdentity,
}

/// The `[discovery]` rules parsing applies.
#[derive(Debug, Clone)]
pub struct Rules {
    pub components: Vec<String>,
    pub skip_identifiers: Vec<String>,
    pub max_config_bytes: usize,
    /// State topics no config may name.
    pub reserved: Reserved,
}

impl Rules {
    pub fn from_config(cfg: &Config) -> Rules {
        let c = &cfg.discovery;
        Rules {
            components: c.components.clone(),
            skip_identifiers: c.skip_identifiers.clone(),
            max_config_bytes: c.max_config_bytes,
            reserved: Reserved::from_config(cfg),
        }
    }

    fn component(&self, c: &str) -> bool {
        self.components.iter().any(|x| x == c)
    }

    /// True when any of a device's identifiers is to be skipped.
    fn skipped<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Option<String> {
        ids.into_iter()
            .find(|id| self.skip_identifiers.iter().any(|p| wildcard_match(p, id)))
            .map(str::to_string)
    }

    /// Size first: a 1 MiB config is never parsed.
    fn check_size(&self, payload: &[u8]) -> Result<(), Skip> {
        if payload.len() > self.max_config_bytes {
            return Err(Skip::TooLarge {
                size: payload.len(),
                max: self.max_config_bytes,
            });
        }
        Ok(())
    }
}

/// Whether a sensor id belongs to discovery (announces may not use these while
/// discovery is on, so a firmware cannot take over a discovered device).
pub fn is_discovery_id(sensor: &str) -> bool {
    sensor.starts_with(Source::HomeAssistant.id_prefix())
        || sensor.starts_with(Source::Tasmota.id_prefix())
}

/// The sensor id of a discovered device: the source's prefix, then the identifier
/// with every character outside `A-Z a-z 0-9 . _ : -` replaced by `_`; longer than
/// 64 characters (or `hashed`, after a collision): its first 47 characters, `-`,
/// and 16 hex characters of the SHA-256 of the identifier, so two long identifiers
/// sharing a head still differ.
pub fn sensor_id(source: Source, identifier: &str, hashed: bool) -> String {
    let mapped: String = source
        .id_prefix()
        .chars()
        .chain(identifier.chars().map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
                c
            } else {
                '_'
            }
        }))
        .collect();
    if !hashed && mapped.chars().count() <= MAX_SENSOR_ID_CHARS {
        return mapped;
    }
    let digest = Sha256::digest(identifier.as_bytes());
    let head: String = mapped.chars().take(HASHED_HEAD_CHARS).collect();
    format!("{head}-{}", &hex::encode(digest)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensor_ids_keep_safe_characters_and_replace_the_rest() {
        assert_eq!(
            sensor_id(
                Source::HomeAssistant,
                "zigbee2mqtt_0x00158d0001a2b3c4",
                false
            ),
            "ha-zigbee2mqtt_0x00158d0001a2b3c4"
        );
        assert_eq!(
            sensor_id(Source::HomeAssistant, "mac_24:0a:c4:aa:bb:cc", false),
            "ha-mac_24:0a:c4:aa:bb:cc"
        );
        assert_eq!(
            sensor_id(Source::Tasmota, "AA BB/Küche", false),
            "tasmota-AA_BB_K_che"
        );
        assert!(crate::announce::valid_id(&sensor_id(
            Source::Tasmota,
            "AA BB/Küche",
            false
        )));
    }

    #[test]
    fn long_or_colliding_ids_take_the_hashed_form() {
        let exactly = "x".repeat(61); // "ha-" + 61 = 64
        assert_eq!(sensor_id(Source::HomeAssistant, &exactly, false).len(), 64);
        let long = "y".repeat(62);
        let id = sensor_id(Source::HomeAssistant, &long, false);
        assert_eq!(id.len(), 47 + 1 + 16);
        assert!(id.starts_with(&format!("ha-{}-", "y".repeat(44))), "{id}");
        let digest = hex::encode(Sha256::digest(long.as_bytes()));
        assert!(id.ends_with(&digest[..16]));
        assert!(crate::announce::valid_id(&id));
        let short = sensor_id(Source::HomeAssistant, "a/b", true);
        assert_eq!(short.len(), "ha-a_b".len() + 1 + 16);
        assert!(short.starts_with("ha-a_b-"));
    }

    #[test]
    fn discovery_is_off_by_default_with_the_documented_rules() {
        let cfg =
            crate::config::Config::from_toml("[qubitro]\nproject_id = \"p\"\napi_key = \"k\"")
                .expect("valid");
        let d = &cfg.discovery;
        assert!(!d.homeassistant && !d.tasmota && !d.enabled());
        assert_eq!(d.homeassistant_prefix, "homeassistant");
        assert_eq!(d.tasmota_prefix, "tasmota/discovery");
        assert_eq!(d.components, ["sensor", "binary_sensor"]);
        assert_eq!(d.skip_identifiers, ["zigbee2mqtt_bridge_*"]);
        assert_eq!(d.max_config_bytes, 16384);
        let err = crate::config::Config::from_toml(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[discovery]\nhomeassistant_prefix = \"ha/#\"",
        )
        .expect_err("wildcard");
        assert!(
            err.to_string().contains("discovery.homeassistant_prefix"),
            "{err}"
        );
    }

    #[test]
    fn discovery_ids_are_recognised_by_prefix() {
        assert!(is_discovery_id("ha-x"));
        assert!(is_discovery_id("tasmota-x"));
        assert!(!is_discovery_id("hall-1"));
    }
}
