//! The Qubitro device of a discovered device: its name, brand and model from the
//! config (cleaned to the limits an announce has), and metadata that says which
//! discovery found it and where.

use std::collections::BTreeMap;

use super::registry::Known;
use super::Source;
use crate::announce::{
    DeviceSpec, MAX_BRAND_MODEL_CHARS, MAX_METADATA_VALUE_CHARS, MAX_NAME_CHARS,
};

/// What Qubitro gets for a discovered device (README "Zero-firmware onboarding").
pub fn spec_for(known: &Known, gateway_id: &str) -> DeviceSpec {
    let d = &known.device;
    let clean = |s: &str, max: usize| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .take(max)
            .collect::<String>()
            .trim()
            .to_string()
    };
    let or_custom = |s: &Option<String>| {
        let v = s.as_deref().map(|s| clean(s, MAX_BRAND_MODEL_CHARS));
        v.filter(|v| !v.is_empty())
            .unwrap_or_else(|| "Custom".into())
    };
    let name = d
        .name
        .as_deref()
        .map(|n| clean(n, MAX_NAME_CHARS))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| clean(&d.identifier, MAX_NAME_CHARS));
    let source = d.source.as_str();
    let how = match d.source {
        Source::HomeAssistant => "Home Assistant MQTT discovery",
        Source::Tasmota => "Tasmota discovery",
    };
    let mut metadata = BTreeMap::new();
    metadata.insert("discovered_by".into(), source.to_string());
    metadata.insert(
        "discovery_id".into(),
        clean(&d.identifier, MAX_METADATA_VALUE_CHARS),
    );
    metadata.insert("sensor_id".into(), known.sensor_id.clone());
    metadata.insert("gateway_id".into(), gateway_id.to_string());
    DeviceSpec {
        name,
        description: format!(
            "Found through {how} by onboardd on gateway {gateway_id}; readings forwarded by the gateway"
        ),
        brand: or_custom(&d.manufacturer),
        model: or_custom(&d.model),
        tags: vec![source.to_string()],
        metadata,
    }
}
