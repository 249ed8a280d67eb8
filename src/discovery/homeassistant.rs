//! Home Assistant MQTT discovery configs: per-entity
//! `<prefix>/<component>/[<node_id>/]<object_id>/config` and device-based
//! `<prefix>/device/<object_id>/config` (entities under `cmps`), with full or
//! abbreviated keys and `~` base topics.

use serde_json::{Map, Value};

use super::template::{self, Rule};
use super::{Device, Entity, Parsed, Read, Rules, Skip, Source};

/// The levels of a discovery config topic below the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigTopic<'a> {
    pub component: &'a str,
    pub node_id: Option<&'a str>,
    pub object_id: &'a str,
}

/// Splits `<prefix>/<component>/[<node_id>/]<object_id>/config`.
pub fn config_topic<'a>(prefix: &str, topic: &'a str) -> Option<ConfigTopic<'a>> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let rest = rest.strip_suffix("/config")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let ok = |s: &&str| !s.is_empty();
    match parts.as_slice() {
        [c, o] if ok(c) && ok(o) => Some(ConfigTopic {
            component: c,
            node_id: None,
            object_id: o,
        }),
        [c, n, o] if ok(c) && ok(n) && ok(o) => Some(ConfigTopic {
            component: c,
            node_id: Some(n),
            object_id: o,
        }),
        _ => None,
    }
}

/// The abbreviations of the keys read here (HA's `abbreviations.py`).
fn expand(key: &str) -> &str {
    match key {
        "dev" => "device",
        "cmps" => "components",
        "p" => "platform",
        "stat_t" => "state_topic",
        "val_tpl" => "value_template",
        "uniq_id" => "unique_id",
        "obj_id" => "object_id",
        "avty_t" => "availability_topic",
        "json_attr_t" => "json_attributes_topic",
        "cmd_t" => "command_topic",
        "t" => "topic",
        // device block
        "ids" => "identifiers",
        "cns" => "connections",
        "mf" => "manufacturer",
        "mdl" => "model",
        "mdl_id" => "model_id",
        "sw" => "sw_version",
        "hw" => "hw_version",
        "sn" => "serial_number",
        "sa" => "suggested_area",
        "cu" => "configuration_url",
        other => other,
    }
}

/// Keys expanded (a full key wins over its abbreviation when both are given).
fn normalise(obj: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in obj {
        let full = expand(k);
        if full != k && obj.contains_key(full) {
            continue;
        }
        out.insert(full.to_string(), v.clone());
    }
    out
}

/// `~` at the start or end of a `*_topic` value is the base topic.
fn expand_tilde(value: &str, base: Option<&str>) -> String {
    match base {
        Some(b) if value.starts_with('~') => format!("{b}{}", &value[1..]),
        Some(b) if value.ends_with('~') => format!("{}{b}", &value[..value.len() - 1]),
        _ => value.to_string(),
    }
}

fn string(m: &Map<String, Value>, key: &str) -> Option<String> {
    match m.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A device block's identifiers, in order: `identifiers` (string or list), then
/// connections written `<type>_<value>`.
fn identities(dev: &Map<String, Value>) -> (Vec<String>, Vec<String>) {
    let ids = match dev.get("identifiers") {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let cns = match dev.get("connections") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|pair| match pair.as_array()?.as_slice() {
                [Value::String(t), Value::String(v)] => Some(format!("{t}_{v}")),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    (ids, cns)
}

/// Parses one Home Assistant config message.
pub fn parse(rules: &Rules, prefix: &str, topic: &str, payload: &[u8]) -> Result<Parsed, Skip> {
    let t = config_topic(prefix, topic).ok_or(Skip::NotAConfigTopic)?;
    if payload.is_empty() {
        return Ok(Parsed::Removed);
    }
    rules.check_size(payload)?;
    let root = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => normalise(&m),
        Ok(_) => return Err(Skip::NotAnObject),
        Err(e) => return Err(Skip::InvalidJson(e.to_string())),
    };
    let dev = match root.get("device") {
        Some(Value::Object(d)) => normalise(d),
        _ => Map::new(),
    };
    let (ids, cns) = identities(&dev);
    if let Some(id) = rules.skipped(ids.iter().chain(&cns).map(String::as_str)) {
        return Err(Skip::SkippedIdentifier(id));
    }

    // (object id, component, its normalised config): one per-entity config, or
    // each component of a device-based one.
    let mut parts = Vec::new();
    let device_based = t.component == "device";
    if device_based {
        if let Some(Value::Object(cmps)) = root.get("components") {
            for (id, c) in cmps {
                if let Value::Object(c) = c {
                    let c = normalise(c);
                    let platform = string(&c, "platform").unwrap_or_default();
                    parts.push((id.clone(), platform, c));
                }
            }
        }
    } else {
        if !rules.component(t.component) {
            return Err(Skip::Component(t.component.to_string()));
        }
        parts.push((
            t.object_id.to_string(),
            t.component.to_string(),
            root.clone(),
        ));
    }

    let first_unique = parts.iter().find_map(|(_, _, c)| string(c, "unique_id"));
    let identifier = ids
        .first()
        .or(cns.first())
        .cloned()
        .or_else(|| t.node_id.map(str::to_string))
        .or(first_unique)
        .ok_or(Skip::NoIdentity)?;

    let root_base = string(&root, "~");
    let mut entities = Vec::new();
    let mut warnings = Vec::new();
    for (object_id, platform, c) in parts {
        if device_based && c.len() == 1 {
            // A component sent with only `p` is removed: leaving it out is that.
            continue;
        }
        if !rules.component(&platform) {
            // Switches, lights…: not readings.
            continue;
        }
        let base = string(&c, "~").or_else(|| device_based.then(|| root_base.clone()).flatten());
        let state = string(&c, "state_topic")
            .or_else(|| device_based.then(|| string(&root, "state_topic")).flatten());
        let Some(state) = state else {
            warnings.push(format!("entity {object_id} has no state topic; skipped"));
            continue;
        };
        let state_topic = expand_tilde(&state, base.as_deref().or(root_base.as_deref()));
        if state_topic.is_empty() || state_topic.contains(['+', '#']) {
            warnings.push(format!(
                "entity {object_id} has an unusable state topic {state_topic:?}; skipped"
            ));
            continue;
        }
        if let Some(why) = rules.reserved.refusal(&state_topic) {
            warnings.push(format!("entity {object_id}: {why}"));
            continue;
        }
        let (key, rule) = match string(&c, "value_template") {
            None => (object_id.clone(), Rule::Plain),
            Some(tpl) => match template::parse(&tpl) {
                Some(rule @ Rule::Key { .. }) => {
                    let Rule::Key { key, .. } = &rule else {
                        unreachable!("matched above")
                    };
                    (key.clone(), rule)
                }
                _ => {
                    warnings.push(format!(
                        "entity {object_id}: value_template {tpl:?} is not of the form {{{{ value_json.KEY }}}} \
                             (optionally | float, | int or | round(N)); skipped"
                    ));
                    continue;
                }
            },
        };
        if entities
            .iter()
            .any(|e: &Entity| e.state_topic == state_topic && e.key == key)
        {
            continue;
        }
        entities.push(Entity {
            key,
            state_topic,
            read: Read::Value(rule),
        });
    }
    Ok(Parsed::Config {
        device: Device {
            source: Source::HomeAssistant,
            identifier,
            name: string(&dev, "name"),
            manufacturer: string(&dev, "manufacturer"),
            model: string(&dev, "model"),
        },
        entities,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn rules() -> Rules {
        Rules {
            components: vec!["sensor".into(), "binary_sensor".into()],
            skip_identifiers: vec!["zigbee2mqtt_bridge_*".into()],
            max_config_bytes: 16384,
            reserved: Default::default(),
        }
    }

    fn ok(topic: &str, payload: &str) -> (Device, Vec<Entity>, Vec<String>) {
        match parse(&rules(), "homeassistant", topic, payload.as_bytes()) {
            Ok(Parsed::Config {
                device,
                entities,
                warnings,
            }) => (device, entities, warnings),
            other => panic!("{topic}: {other:?}"),
        }
    }

    fn key(k: &str) -> Read {
        Read::Value(Rule::Key {
            key: k.into(),
            filter: None,
        })
    }

    /// What Zigbee2MQTT 1.x/2.x publishes for an Aqara temperature sensor.
    pub(crate) const Z2M_TEMPERATURE: &str = concat!(
        r#"{"availability":[{"topic":"zigbee2mqtt/bridge/state","value_template":"{{ value_json.state }}"},"#,
        r#"{"topic":"zigbee2mqtt/living_room/availability","value_template":"{{ value_json.state }}"}],"#,
        r#""availability_mode":"all","device":{"identifiers":["zigbee2mqtt_0x00158d0001a2b3c4"],"#,
        r#""manufacturer":"Aqara","model":"Temperature and humidity sensor (WSDCGQ11LM)","#,
        r#""model_id":"WSDCGQ11LM","name":"living_room","sw_version":"3000-0001","#,
        r#""via_device":"zigbee2mqtt_bridge_0x00124b0022334455"},"device_class":"temperature","#,
        r#""enabled_by_default":true,"object_id":"living_room_temperature","origin":{"name":"Zigbee2MQTT","#,
        r#""sw":"1.40.2","url":"https://www.zigbee2mqtt.io"},"state_class":"measurement","#,
        r#""state_topic":"zigbee2mqtt/living_room","#,
        r#""unique_id":"0x00158d0001a2b3c4_temperature_zigbee2mqtt","unit_of_measurement":"°C","#,
        r#""value_template":"{{ value_json.temperature }}"}"#,
    );

    #[test]
    fn every_truncation_of_a_real_config_is_parsed_or_skipped_without_panicking() {
        let topic = "homeassistant/sensor/0x00158d0001a2b3c4/temperature/config";
        for cut in 0..Z2M_TEMPERATURE.len() {
            let _ = parse(
                &rules(),
                "homeassistant",
                topic,
                &Z2M_TEMPERATURE.as_bytes()[..cut],
            );
        }
        for junk in [
            &br#"{"~":"","stat_t":"~"}"#[..],
            br#"{"dev":{"ids":[1,null,{}],"cns":[["mac"],[1,2]]},"stat_t":"x"}"#,
            br#"{"cmps":[],"dev":{"ids":"a"}}"#,
            br#"{"cmps":{"a":1,"b":{"p":7}},"dev":{"ids":"a"}}"#,
            br#"{"stat_t":"~/x","~":"\u0000","uniq_id":"u","val_tpl":"{{ value_json[''] }}"}"#,
        ] {
            let _ = parse(
                &rules(),
                "homeassistant",
                "homeassistant/device/x/config",
                junk,
            );
            let _ = parse(&rules(), "homeassistant", topic, junk);
        }
    }

    #[test]
    fn config_topics_split_with_and_without_node_id() {
        assert_eq!(
            config_topic(
                "homeassistant",
                "homeassistant/sensor/0x1/temperature/config"
            ),
            Some(ConfigTopic {
                component: "sensor",
                node_id: Some("0x1"),
                object_id: "temperature"
            })
        );
        assert_eq!(
            config_topic("homeassistant", "homeassistant/sensor/t1/config")
                .map(|t| (t.node_id, t.object_id)),
            Some((None, "t1"))
        );
        assert_eq!(config_topic("homeassistant", "homeassistant/status"), None);
        assert_eq!(
            config_topic("homeassistant", "homeassistant/a/b/c/d/config"),
            None
        );
        assert_eq!(
            config_topic("homeassistant", "homeassistantx/sensor/a/config"),
            None
        );
    }

    #[test]
    fn a_zigbee2mqtt_entity_reads_its_key_from_the_json_state() {
        let (d, e, w) = ok(
            "homeassistant/sensor/0x00158d0001a2b3c4/temperature/config",
            Z2M_TEMPERATURE,
        );
        assert_eq!(d.identifier, "zigbee2mqtt_0x00158d0001a2b3c4");
        assert_eq!(d.name.as_deref(), Some("living_room"));
        assert_eq!(d.manufacturer.as_deref(), Some("Aqara"));
        assert_eq!(
            d.model.as_deref(),
            Some("Temperature and humidity sensor (WSDCGQ11LM)")
        );
        assert_eq!(
            e,
            vec![Entity {
                key: "temperature".into(),
                state_topic: "zigbee2mqtt/living_room".into(),
                read: key("temperature"),
            }]
        );
        assert!(w.is_empty());
    }

    #[test]
    fn an_esphome_node_with_abbreviated_keys_reads_plain_values() {
        let cfg = concat!(
            r#"{"dev_cla":"temperature","unit_of_meas":"°C","stat_cla":"measurement","name":"Temperature","#,
            r#""stat_t":"garden-node/sensor/temperature/state","avty_t":"garden-node/status","#,
            r#""uniq_id":"ESPsensortemperature","dev":{"ids":"240ac4aabbcc","name":"garden-node","#,
            r#""sw":"esphome v2024.10.0 Oct 16 2024","mdl":"esp32dev","mf":"Espressif","cns":[["mac","#,
            r#""24:0a:c4:aa:bb:cc"]]}}"#,
        );
        let (d, e, _) = ok("homeassistant/sensor/garden-node/temperature/config", cfg);
        assert_eq!(d.identifier, "240ac4aabbcc");
        assert_eq!(d.manufacturer.as_deref(), Some("Espressif"));
        assert_eq!(d.model.as_deref(), Some("esp32dev"));
        assert_eq!(e[0].key, "temperature");
        assert_eq!(e[0].state_topic, "garden-node/sensor/temperature/state");
        assert_eq!(e[0].read, Read::Value(Rule::Plain));
    }

    #[test]
    fn a_device_based_config_shares_root_keys_and_keys_entities_by_component_id() {
        let cfg = concat!(
            r#"{"dev":{"ids":["ea334450945afc"],"name":"Kitchen","mf":"Bla electronics","mdl":"xya","sw":"1.0","#,
            r#""sn":"ea334450945afc","hw":"1.0rev2"},"o":{"name":"bla2mqtt","sw":"2.1","#,
            r#""url":"https://bla2mqtt.example.com/support"},"~":"kitchen/sensors","#,
            r#""cmps":{"some_unique_component_id1":{"p":"sensor","device_class":"temperature","#,
            r#""unit_of_measurement":"°C","value_template":"{{ value_json.temperature}}","#,
            r#""unique_id":"temp01ae_t"},"some_unique_id2":{"p":"sensor","device_class":"humidity","#,
            r#""unit_of_measurement":"%","value_template":"{{ value_json['humidity'] | round(1) }}","#,
            r#""unique_id":"temp01ae_h"},"lamp":{"p":"light","cmd_t":"~/lamp/set"},"gone":{"p":"sensor"},"#,
            r#""door":{"p":"binary_sensor","stat_t":"kitchen/door"}},"stat_t":"~/state","qos":2}"#,
        );
        let (d, e, w) = ok("homeassistant/device/kitchen01/config", cfg);
        assert_eq!(d.identifier, "ea334450945afc");
        let got: Vec<(&str, &str)> = e
            .iter()
            .map(|e| (e.key.as_str(), e.state_topic.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("door", "kitchen/door"),
                ("temperature", "kitchen/sensors/state"),
                ("humidity", "kitchen/sensors/state"),
            ]
        );
        assert_eq!(
            e[2].read,
            Read::Value(Rule::Key {
                key: "humidity".into(),
                filter: Some(template::Filter::Round(1))
            })
        );
        // `gone` (only `p`) is a removed component, `lamp` not a reading.
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn the_base_topic_is_substituted_at_either_end() {
        assert_eq!(expand_tilde("~/state", Some("a/b")), "a/b/state");
        assert_eq!(expand_tilde("pre/~", Some("a/b")), "pre/a/b");
        assert_eq!(expand_tilde("x/~/y", Some("a")), "x/~/y");
        assert_eq!(expand_tilde("~/s", None), "~/s");
    }

    #[test]
    fn grouping_falls_back_to_connection_node_id_then_unique_id() {
        let (d, ..) = ok(
            "homeassistant/sensor/n/t/config",
            r#"{"stat_t":"x/t","dev":{"connections":[["mac","24:0a:c4:aa:bb:cc"]]}}"#,
        );
        assert_eq!(d.identifier, "mac_24:0a:c4:aa:bb:cc");
        // No device block (older OpenMQTTGateway).
        let (d, ..) = ok(
            "homeassistant/sensor/omg_gw/t/config",
            r#"{"stat_t":"x/t","uniq_id":"u1"}"#,
        );
        assert_eq!(d.identifier, "omg_gw");
        assert_eq!(d.name, None);
        let (d, ..) = ok(
            "homeassistant/sensor/t/config",
            r#"{"state_topic":"x/t","unique_id":"u1"}"#,
        );
        assert_eq!(d.identifier, "u1");
        assert_eq!(
            parse(
                &rules(),
                "homeassistant",
                "homeassistant/sensor/t/config",
                br#"{"state_topic":"x"}"#
            ),
            Err(Skip::NoIdentity)
        );
    }

    #[test]
    fn identifiers_may_be_a_string_or_a_list_with_full_or_short_keys() {
        for dev in [
            r#"{"identifiers":"abc"}"#,
            r#"{"identifiers":["abc","def"]}"#,
            r#"{"ids":"abc"}"#,
            r#"{"ids":["abc"]}"#,
        ] {
            let (d, ..) = ok(
                "homeassistant/sensor/n/t/config",
                &format!(r#"{{"stat_t":"x","device":{dev}}}"#),
            );
            assert_eq!(d.identifier, "abc", "{dev}");
        }
    }

    #[test]
    fn what_does_not_qualify_is_skipped() {
        let r = rules();
        let p = |topic: &str, body: &[u8]| parse(&r, "homeassistant", topic, body);
        assert_eq!(p("homeassistant/sensor/a/config", b""), Ok(Parsed::Removed));
        assert!(matches!(
            p("homeassistant/sensor/a/config", b"{not json"),
            Err(Skip::InvalidJson(_))
        ));
        assert_eq!(
            p("homeassistant/sensor/a/config", b"[1]"),
            Err(Skip::NotAnObject)
        );
        let huge = vec![b' '; 1 << 20];
        assert_eq!(
            p("homeassistant/sensor/a/config", &huge),
            Err(Skip::TooLarge {
                size: 1 << 20,
                max: 16384
            })
        );
        assert_eq!(
            p(
                "homeassistant/switch/a/config",
                br#"{"stat_t":"x","uniq_id":"u"}"#
            ),
            Err(Skip::Component("switch".into()))
        );
        let bridge = concat!(
            r#"{"stat_t":"zigbee2mqtt/bridge/state","dev":{"ids":["zigbee2mqtt_bridge_0x00124b0022334455"],"#,
            r#""name":"Zigbee2MQTT Bridge"}}"#,
        )
        .as_bytes();
        assert_eq!(
            p("homeassistant/binary_sensor/1221051039810110150109113116116_0x00124b0022334455/connection_state/config", bridge),
            Err(Skip::SkippedIdentifier("zigbee2mqtt_bridge_0x00124b0022334455".into()))
        );
        // No state topic: the device has no qualifying entity, with a warning.
        let (d, e, w) = ok(
            "homeassistant/sensor/n/t/config",
            r#"{"dev":{"ids":"abc"},"uniq_id":"u"}"#,
        );
        assert_eq!(d.identifier, "abc");
        assert!(e.is_empty());
        assert_eq!(w.len(), 1, "{w:?}");
        // A template beyond the subset: skipped with one warning.
        let (_, e, w) = ok(
            "homeassistant/sensor/n/t/config",
            r#"{"dev":{"ids":"abc"},"stat_t":"s","val_tpl":"{{ value_json.a * 2 }}"}"#,
        );
        assert!(e.is_empty());
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("value_template"), "{w:?}");
    }
}
