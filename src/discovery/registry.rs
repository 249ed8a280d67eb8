//! What discovery knows: each config topic's device and entities, and each
//! physical device's sensor id. The engine keeps it in the store (one JSON value
//! per device and per config topic) so a restart, or a retained config re-read at
//! every subscribe, finds the device it made before and never makes a second.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::template::{self, Rule};
use super::{sensor_id, tasmota, Device, Entity, Parsed, Read, Source};

/// What one config topic says now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// The [`Registry`] key of its device.
    pub device: String,
    pub entities: Vec<Entity>,
}

/// A physical device discovery has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub device: Device,
    pub sensor_id: String,
}

/// What a config message changed for its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The device's key, sensor id and description.
    pub key: String,
    pub known: Known,
    /// It has at least one entity now (else: retired, or never onboarded).
    pub active: bool,
    /// State topics followed for the first time.
    pub new_topics: Vec<String>,
    /// The device this config topic described before, when it named another
    /// identifier and that device has no entity left now (it is retired).
    pub orphaned: Option<Known>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    /// Config topic → what it says.
    configs: BTreeMap<String, ConfigEntry>,
    /// Device key (`<source>:<identifier>`) → the device.
    devices: BTreeMap<String, Known>,
    /// State topic → the config topics with an entity reading it: every followed
    /// message looks its entities up here instead of scanning every config.
    by_state: HashMap<String, BTreeSet<String>>,
}

/// The key of a device, unique across sources.
pub fn device_key(d: &Device) -> String {
    format!("{}:{}", d.source.as_str(), d.identifier)
}

impl Registry {
    /// Rebuilds the registry from what the store held.
    pub fn restore(
        devices: impl IntoIterator<Item = (String, Known)>,
        configs: impl IntoIterator<Item = (String, ConfigEntry)>,
    ) -> Registry {
        let mut r = Registry {
            devices: devices.into_iter().collect(),
            ..Registry::default()
        };
        for (topic, entry) in configs {
            r.insert_config(topic, entry);
        }
        r
    }

    /// How many devices are known (retired ones included: each was billed).
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Whether `parsed` would add a device not known yet.
    pub fn adds_device(&self, parsed: &Parsed) -> bool {
        match parsed {
            Parsed::Config {
                device, entities, ..
            } => !entities.is_empty() && !self.devices.contains_key(&device_key(device)),
            Parsed::Removed => false,
        }
    }

    /// Sets what `topic` says, keeping the state-topic index in step.
    fn insert_config(&mut self, topic: String, entry: ConfigEntry) -> Option<ConfigEntry> {
        for e in &entry.entities {
            self.by_state
                .entry(e.state_topic.clone())
                .or_default()
                .insert(topic.clone());
        }
        let old = self.configs.insert(topic.clone(), entry);
        self.unindex(&topic, old.as_ref());
        old
    }

    /// Forgets what `topic` says, keeping the state-topic index in step.
    fn remove_config(&mut self, topic: &str) -> Option<ConfigEntry> {
        let old = self.configs.remove(topic);
        self.unindex(topic, old.as_ref());
        old
    }

    /// Drops `topic` from the index of each state topic `old` read that the
    /// topic's current entry (if any) no longer reads.
    fn unindex(&mut self, topic: &str, old: Option<&ConfigEntry>) {
        let Some(old) = old else { return };
        for e in &old.entities {
            let still = self
                .configs
                .get(topic)
                .is_some_and(|c| c.entities.iter().any(|n| n.state_topic == e.state_topic));
            if still {
                continue;
            }
            if let Some(set) = self.by_state.get_mut(&e.state_topic) {
                set.remove(topic);
                if set.is_empty() {
                    self.by_state.remove(&e.state_topic);
                }
            }
        }
    }

    pub fn device(&self, key: &str) -> Option<&Known> {
        self.devices.get(key)
    }

    pub fn config(&self, topic: &str) -> Option<&ConfigEntry> {
        self.configs.get(topic)
    }

    /// Every state topic followed.
    pub fn topics(&self) -> BTreeSet<String> {
        self.by_state.keys().cloned().collect()
    }

    /// Whether any entity reads this topic.
    pub fn follows(&self, topic: &str) -> bool {
        self.by_state.contains_key(topic)
    }

    /// Whether the device still has entities.
    pub fn is_active(&self, key: &str) -> bool {
        self.configs
            .values()
            .any(|c| c.device == key && !c.entities.is_empty())
    }

    /// The sensor ids of devices with no entity left (shown `retired`).
    pub fn retired(&self) -> BTreeSet<String> {
        self.devices
            .iter()
            .filter(|(k, _)| !self.is_active(k))
            .map(|(_, d)| d.sensor_id.clone())
            .collect()
    }

    /// Applies one config message. `None` when nothing a device is made of changed
    /// (a removal of a topic never seen).
    pub fn apply(&mut self, topic: &str, parsed: Parsed) -> Option<Change> {
        let before = self.topics();
        let key = match parsed {
            Parsed::Removed => self.remove_config(topic)?.device,
            Parsed::Config {
                device, entities, ..
            } => {
                let key = device_key(&device);
                if entities.is_empty() && !self.devices.contains_key(&key) {
                    // A device none of whose entities qualifies is not created;
                    // whatever this topic said before is gone.
                    let old = self.remove_config(topic)?;
                    return self.change(old.device, &before);
                }
                match self.devices.get_mut(&key) {
                    // The newest description wins; the sensor id never changes.
                    Some(k) => k.device = merge(&k.device, device),
                    None => {
                        let id = self.derive_id(&device);
                        self.devices.insert(
                            key.clone(),
                            Known {
                                device,
                                sensor_id: id,
                            },
                        );
                    }
                }
                let old = self.insert_config(
                    topic.to_string(),
                    ConfigEntry {
                        device: key.clone(),
                        entities,
                    },
                );
                let mut change = self.change(key.clone(), &before)?;
                // A topic that now names another identifier: the device it named
                // before may have nothing left.
                if let Some(old) = old.filter(|o| o.device != key) {
                    if !self.is_active(&old.device) {
                        change.orphaned = self.devices.get(&old.device).cloned();
                    }
                }
                return Some(change);
            }
        };
        self.change(key, &before)
    }

    fn change(&self, key: String, before: &BTreeSet<String>) -> Option<Change> {
        let known = self.devices.get(&key)?.clone();
        Some(Change {
            active: self.is_active(&key),
            new_topics: self.topics().difference(before).cloned().collect(),
            key,
            known,
            orphaned: None,
        })
    }

    /// The id of a new device: the plain derived one, or the hashed form when
    /// another identifier has it already.
    fn derive_id(&self, d: &Device) -> String {
        let plain = sensor_id(d.source, &d.identifier, false);
        if self.devices.values().any(|k| k.sensor_id == plain) {
            sensor_id(d.source, &d.identifier, true)
        } else {
            plain
        }
    }

    /// A state message → one flat reading per device that reads this topic, with
    /// exactly the keys of its entities on it (a key the state lacks is left out;
    /// a device with none of its keys present gets nothing).
    pub fn readings(&self, topic: &str, payload: &[u8]) -> Vec<(String, Map<String, Value>)> {
        let mut per_device: BTreeMap<&str, Vec<&Entity>> = BTreeMap::new();
        let configs = self.by_state.get(topic).into_iter().flatten();
        for c in configs.filter_map(|t| self.configs.get(t)) {
            for e in c.entities.iter().filter(|e| e.state_topic == topic) {
                per_device.entry(c.device.as_str()).or_default().push(e);
            }
        }
        if per_device.is_empty() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(payload);
        let json: Option<Value> = serde_json::from_slice(payload).ok();
        let mut out = Vec::new();
        for (key, entities) in per_device {
            let Some(known) = self.devices.get(key) else {
                continue;
            };
            let mut reading = Map::new();
            for e in entities {
                match &e.read {
                    Read::TasmotaSensor => {
                        if let Some(j) = &json {
                            reading.extend(tasmota::flatten_sensor(j));
                        }
                    }
                    Read::Value(rule) => {
                        if matches!(rule, Rule::Plain) && text.trim().is_empty() {
                            continue;
                        }
                        if let Some(v) = template::evaluate(rule, &text, json.as_ref()) {
                            reading.insert(e.key.clone(), v);
                        }
                    }
                }
            }
            if !reading.is_empty() {
                out.push((known.sensor_id.clone(), reading));
            }
        }
        out
    }

    /// Every known device by key (tests, and what the store holds).
    pub fn devices(&self) -> impl Iterator<Item = (&String, &Known)> {
        self.devices.iter()
    }
}

fn merge(old: &Device, new: Device) -> Device {
    Device {
        source: old.source,
        identifier: old.identifier.clone(),
        name: new.name.or_else(|| old.name.clone()),
        manufacturer: new.manufacturer.or_else(|| old.manufacturer.clone()),
        model: new.model.or_else(|| old.model.clone()),
    }
}

/// The keys a source's devices are stored under start with this.
pub fn is_source_key(key: &str, source: Source) -> bool {
    key.strip_prefix(source.as_str())
        .is_some_and(|r| r.starts_with(':'))
}

#[cfg(test)]
mod tests {
    use super::super::homeassistant;
    use super::super::Rules;
    use super::*;
    use serde_json::json;

    fn rules() -> Rules {
        Rules {
            components: vec!["sensor".into(), "binary_sensor".into()],
            skip_identifiers: vec!["zigbee2mqtt_bridge_*".into()],
            max_config_bytes: 16384,
            reserved: Default::default(),
        }
    }

    fn z2m(object: &str, key: &str) -> (String, Parsed) {
        let topic = format!("homeassistant/sensor/0x00158d0001a2b3c4/{object}/config");
        let body = format!(
            concat!(
                r#"{{"device":{{"identifiers":["zigbee2mqtt_0x00158d0001a2b3c4"],"manufacturer":"Aqara","#,
                r#""model":"WSDCGQ11LM","name":"living_room"}},"state_topic":"zigbee2mqtt/living_room","#,
                r#""unique_id":"0x00158d0001a2b3c4_{object}_zigbee2mqtt","#,
                r#""value_template":"{{{{ value_json.{key} }}}}"}}"#,
            ),
            object = object,
            key = key,
        );
        let p = homeassistant::parse(&rules(), "homeassistant", &topic, body.as_bytes()).unwrap();
        (topic, p)
    }

    #[test]
    fn three_zigbee2mqtt_entities_make_one_device_and_one_reading() {
        let mut r = Registry::default();
        let mut changes = Vec::new();
        for (o, k) in [
            ("temperature", "temperature"),
            ("humidity", "humidity"),
            ("battery", "battery"),
        ] {
            let (t, p) = z2m(o, k);
            changes.push(r.apply(&t, p).unwrap());
        }
        assert!(changes
            .iter()
            .all(|c| c.known.sensor_id == "ha-zigbee2mqtt_0x00158d0001a2b3c4"));
        assert_eq!(
            changes[0].new_topics,
            vec!["zigbee2mqtt/living_room".to_string()]
        );
        assert!(changes[1].new_topics.is_empty());
        let got = r.readings(
            "zigbee2mqtt/living_room",
            br#"{"temperature":21.5,"humidity":45,"battery":100,"linkquality":120}"#,
        );
        assert_eq!(
            got,
            vec![(
                "ha-zigbee2mqtt_0x00158d0001a2b3c4".to_string(),
                json!({"temperature":21.5,"humidity":45,"battery":100})
                    .as_object()
                    .unwrap()
                    .clone()
            )]
        );
        assert!(r.readings("zigbee2mqtt/other", b"{}").is_empty());
    }

    #[test]
    fn removing_every_entity_retires_the_device_and_a_config_revives_it() {
        let mut r = Registry::default();
        let (t1, p1) = z2m("temperature", "temperature");
        let (t2, p2) = z2m("humidity", "humidity");
        r.apply(&t1, p1.clone());
        r.apply(&t2, p2);
        let c = r.apply(&t1, Parsed::Removed).unwrap();
        assert!(c.active);
        let reading = r.readings(
            "zigbee2mqtt/living_room",
            br#"{"temperature":1,"humidity":2}"#,
        );
        assert_eq!(Value::Object(reading[0].1.clone()), json!({"humidity":2}));
        let c = r.apply(&t2, Parsed::Removed).unwrap();
        assert!(!c.active);
        assert_eq!(
            r.retired().into_iter().collect::<Vec<_>>(),
            vec![c.known.sensor_id.clone()]
        );
        assert!(r
            .readings("zigbee2mqtt/living_room", br#"{"temperature":1}"#)
            .is_empty());
        assert_eq!(r.apply(&t2, Parsed::Removed), None, "already gone");
        let back = r.apply(&t1, p1).unwrap();
        assert!(back.active);
        assert_eq!(back.known.sensor_id, c.known.sensor_id);
        assert!(r.retired().is_empty());
    }

    #[test]
    fn a_second_identifier_deriving_the_same_id_takes_the_hashed_form() {
        let mut r = Registry::default();
        let mk = |id: &str, n: &str| {
            homeassistant::parse(
                &rules(),
                "homeassistant",
                &format!("homeassistant/sensor/{n}/t/config"),
                format!(r#"{{"stat_t":"s/{n}","dev":{{"ids":"{id}"}}}}"#).as_bytes(),
            )
            .unwrap()
        };
        let a = r
            .apply("homeassistant/sensor/a/t/config", mk("a b", "a"))
            .unwrap();
        let b = r
            .apply("homeassistant/sensor/b/t/config", mk("a/b", "b"))
            .unwrap();
        assert_eq!(a.known.sensor_id, "ha-a_b");
        assert_eq!(
            b.known.sensor_id,
            sensor_id(Source::HomeAssistant, "a/b", true)
        );
        assert_ne!(a.known.sensor_id, b.known.sensor_id);
    }

    #[test]
    fn a_config_topic_that_names_another_device_orphans_the_first() {
        let mut r = Registry::default();
        let mk = |id: &str| {
            homeassistant::parse(
                &rules(),
                "homeassistant",
                "homeassistant/sensor/n/t/config",
                format!(r#"{{"stat_t":"s","dev":{{"ids":"{id}"}}}}"#).as_bytes(),
            )
            .unwrap()
        };
        let a = r.apply("homeassistant/sensor/n/t/config", mk("a")).unwrap();
        let b = r.apply("homeassistant/sensor/n/t/config", mk("b")).unwrap();
        assert!(b.active);
        assert_eq!(
            b.orphaned.map(|k| k.sensor_id),
            Some(a.known.sensor_id.clone())
        );
        assert!(r.retired().contains(&a.known.sensor_id));
    }

    #[test]
    fn a_device_without_a_qualifying_entity_is_not_created() {
        let mut r = Registry::default();
        let p = homeassistant::parse(
            &rules(),
            "homeassistant",
            "homeassistant/sensor/n/t/config",
            br#"{"dev":{"ids":"abc"}}"#,
        )
        .unwrap();
        assert_eq!(r.apply("homeassistant/sensor/n/t/config", p), None);
        assert!(r.devices().next().is_none());
    }

    #[test]
    fn the_state_topic_index_follows_every_change_of_a_config_and_a_restore() {
        let mut r = Registry::default();
        let (t, p) = z2m("temperature", "temperature");
        assert!(r.adds_device(&p));
        r.apply(&t, p);
        assert!(r.follows("zigbee2mqtt/living_room"));
        let moved = homeassistant::parse(
            &rules(),
            "homeassistant",
            &t,
            br#"{"stat_t":"zigbee2mqtt/kitchen","dev":{"ids":"zigbee2mqtt_0x00158d0001a2b3c4"}}"#,
        )
        .unwrap();
        assert!(!r.adds_device(&moved), "known device");
        r.apply(&t, moved);
        assert!(!r.follows("zigbee2mqtt/living_room"));
        assert!(r.follows("zigbee2mqtt/kitchen"));
        assert_eq!(r.readings("zigbee2mqtt/kitchen", b"3").len(), 1);
        let restored = Registry::restore(r.devices.clone(), r.configs.clone());
        assert_eq!(restored, r, "the index is rebuilt on restore");
        r.apply(&t, Parsed::Removed);
        assert!(r.topics().is_empty());
        assert!(r.readings("zigbee2mqtt/kitchen", b"3").is_empty());
        assert_eq!(r.device_count(), 1, "a retired device still counts");
    }

    #[test]
    fn plain_values_are_keyed_by_object_id() {
        let mut r = Registry::default();
        let p = homeassistant::parse(
            &rules(),
            "homeassistant",
            "homeassistant/sensor/garden-node/temperature/config",
            br#"{"stat_t":"garden-node/sensor/temperature/state","dev":{"ids":"240ac4aabbcc","mf":"Espressif"}}"#,
        )
        .unwrap();
        r.apply("homeassistant/sensor/garden-node/temperature/config", p);
        let got = r.readings("garden-node/sensor/temperature/state", b"21.4");
        assert_eq!(Value::Object(got[0].1.clone()), json!({"temperature":21.4}));
    }
}
