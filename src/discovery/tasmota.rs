//! Tasmota's own discovery (the default since Tasmota 12):
//! `tasmota/discovery/<MAC>/config` names the device and its topics; readings come
//! as nested JSON on the telemetry topic (`tele/<t>/SENSOR`).

use serde_json::{Map, Value};

use super::{Device, Entity, Parsed, Read, Rules, Skip, Source};

/// Tasmota's default full topic when a config leaves `ft` out.
const DEFAULT_FULL_TOPIC: &str = "%prefix%/%topic%/";

/// True for `<prefix>/<MAC>/config` (not `…/sensors`, which only lists names).
pub fn is_config_topic(prefix: &str, topic: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_suffix("/config"))
        .is_some_and(|mac| !mac.is_empty() && !mac.contains('/'))
}

fn string(m: &Map<String, Value>, key: &str) -> Option<String> {
    match m.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// Parses one Tasmota config message.
pub fn parse(rules: &Rules, prefix: &str, topic: &str, payload: &[u8]) -> Result<Parsed, Skip> {
    if !is_config_topic(prefix, topic) {
        return Err(Skip::NotAConfigTopic);
    }
    if payload.is_empty() {
        return Ok(Parsed::Removed);
    }
    rules.check_size(payload)?;
    let m = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(Skip::NotAnObject),
        Err(e) => return Err(Skip::InvalidJson(e.to_string())),
    };
    let mac = string(&m, "mac").ok_or(Skip::NoIdentity)?;
    if let Some(id) = rules.skipped([mac.as_str()]) {
        return Err(Skip::SkippedIdentifier(id));
    }
    let device = Device {
        source: Source::Tasmota,
        identifier: mac.clone(),
        name: string(&m, "dn").or_else(|| string(&m, "t")),
        manufacturer: Some("Tasmota".into()),
        model: string(&m, "md"),
    };
    let Some(t) = string(&m, "t") else {
        return Ok(Parsed::Config {
            device,
            entities: Vec::new(),
            warnings: vec!["config has no topic (`t`): no telemetry to follow".into()],
        });
    };
    let tele = m
        .get("tp")
        .and_then(Value::as_array)
        .and_then(|tp| tp.get(2))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("tele");
    let ft = string(&m, "ft").unwrap_or_else(|| DEFAULT_FULL_TOPIC.into());
    let hostname = string(&m, "hn").unwrap_or_default();
    // %id% is the last six hex digits of the MAC, as Tasmota writes it.
    let id: String = {
        let hex: String = mac.chars().filter(char::is_ascii_hexdigit).collect();
        hex[hex.len().saturating_sub(6)..].to_uppercase()
    };
    let mut state_topic = ft
        .replace("%prefix%", tele)
        .replace("%topic%", &t)
        .replace("%hostname%", &hostname)
        .replace("%id%", &id);
    if !state_topic.ends_with('/') {
        state_topic.push('/');
    }
    state_topic.push_str("SENSOR");
    let unusable = if state_topic.contains(['+', '#', '%']) {
        Some(format!(
            "telemetry topic {state_topic:?} is not usable; nothing followed"
        ))
    } else {
        rules.reserved.refusal(&state_topic)
    };
    if let Some(why) = unusable {
        return Ok(Parsed::Config {
            device,
            entities: Vec::new(),
            warnings: vec![why],
        });
    }
    Ok(Parsed::Config {
        device,
        entities: vec![Entity {
            key: String::new(),
            state_topic,
            read: Read::TasmotaSensor,
        }],
        warnings: Vec::new(),
    })
}

/// Tasmota's nested SENSOR JSON as one flat object: nested keys joined with `_`,
/// `Time` dropped (Qubitro stamps the reading), arrays kept as values.
pub fn flatten_sensor(state: &Value) -> Map<String, Value> {
    fn walk(prefix: &str, v: &Map<String, Value>, out: &mut Map<String, Value>) {
        for (k, v) in v {
            if prefix.is_empty() && k == "Time" {
                continue;
            }
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}_{k}")
            };
            match v {
                Value::Object(m) => walk(&key, m, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let mut out = Map::new();
    if let Value::Object(m) = state {
        walk("", m, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            components: vec!["sensor".into()],
            skip_identifiers: vec![],
            max_config_bytes: 16384,
            reserved: Default::default(),
        }
    }

    /// What Tasmota 13 publishes for a Sonoff TH with a DHT22 (trimmed of nothing
    /// that matters here).
    pub(crate) const TASMOTA_TH: &str = concat!(
        r#"{"ip":"192.168.1.50","dn":"Greenhouse","fn":["Greenhouse",null,null,null,null,null,null,null],"#,
        r#""hn":"tasmota-A1B2C3-0707","mac":"DC4F22A1B2C3","md":"Sonoff TH","ty":0,"if":0,"ofln":"Offline","#,
        r#""onln":"Online","state":["OFF","ON","TOGGLE","HOLD"],"sw":"13.2.0","t":"tasmota_A1B2C3","#,
        r#""ft":"%prefix%/%topic%/","tp":["cmnd","stat","tele"],"rl":[1,0,0,0,0,0,0,0],"swc":[-1,-1,-1,-1,"#,
        r#"-1,-1,-1,-1],"swn":[null,null,null,null,null,null,null,null],"btn":[0,0,0,0,0,0,0,0],"#,
        r#""so":{"4":0,"11":0,"13":0,"17":0,"20":0,"30":0,"68":0,"73":0,"82":0,"114":0,"117":0},"lk":0,"#,
        r#""lt_st":0,"bat":0,"dslp":0,"sho":[],"sht":[],"ver":1}"#,
    );

    #[test]
    fn a_tasmota_config_names_the_device_and_its_telemetry_topic() {
        let p = parse(
            &rules(),
            "tasmota/discovery",
            "tasmota/discovery/DC4F22A1B2C3/config",
            TASMOTA_TH.as_bytes(),
        );
        let Ok(Parsed::Config {
            device, entities, ..
        }) = p
        else {
            panic!("{p:?}")
        };
        assert_eq!(device.identifier, "DC4F22A1B2C3");
        assert_eq!(device.name.as_deref(), Some("Greenhouse"));
        assert_eq!(device.manufacturer.as_deref(), Some("Tasmota"));
        assert_eq!(device.model.as_deref(), Some("Sonoff TH"));
        assert_eq!(entities[0].state_topic, "tele/tasmota_A1B2C3/SENSOR");
    }

    #[test]
    fn the_full_topic_pattern_and_tele_prefix_are_followed() {
        let cfg =
            r#"{"mac":"DC4F22A1B2C3","t":"th1","ft":"home/%topic%/%prefix%/","tp":["c","s","t"]}"#;
        let Ok(Parsed::Config {
            device, entities, ..
        }) = parse(
            &rules(),
            "tasmota/discovery",
            "tasmota/discovery/DC4F22A1B2C3/config",
            cfg.as_bytes(),
        )
        else {
            panic!()
        };
        assert_eq!(entities[0].state_topic, "home/th1/t/SENSOR");
        assert_eq!(device.name.as_deref(), Some("th1"), "no dn: the topic");
    }

    #[test]
    fn sensors_lists_and_empty_configs() {
        assert!(!is_config_topic(
            "tasmota/discovery",
            "tasmota/discovery/DC4F22A1B2C3/sensors"
        ));
        assert_eq!(
            parse(
                &rules(),
                "tasmota/discovery",
                "tasmota/discovery/X/config",
                b""
            ),
            Ok(Parsed::Removed)
        );
        assert!(matches!(
            parse(
                &rules(),
                "tasmota/discovery",
                "tasmota/discovery/X/config",
                b"{"
            ),
            Err(Skip::InvalidJson(_))
        ));
    }

    #[test]
    fn nested_sensor_readings_are_flattened_without_time() {
        let state = json!({"Time":"2017-02-12T16:11:12","DHT22":{"Temperature":23.9,"Humidity":34.1},"TempUnit":"C"});
        assert_eq!(
            Value::Object(flatten_sensor(&state)),
            json!({"DHT22_Temperature":23.9,"DHT22_Humidity":34.1,"TempUnit":"C"})
        );
    }
}
