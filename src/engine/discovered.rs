//! Zero-firmware onboarding in the engine: discovery configs and state messages
//! arrive through the dispatcher like announces, in order, and are acknowledged the
//! same way (once what they changed is on disk).
//!
//! A config updates the [`Registry`] (persisted in the store's `discovery` tree in
//! the same group commit as the record it leads to), follows new state topics, and
//! onboards a device with entities exactly like an announce with `bridge: true`
//! would: a `Pending` record, the same rules and limits, the same worker. Because
//! the registry remembers each identifier's sensor id and the store each sensor's
//! record, a retained config re-read at every subscribe, or after a restart, finds
//! what it made before and makes nothing new.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use serde_json::Value;

use super::admit::{Admission, Admitted, Refusal};
use super::bridge_device;
use super::dispatch::Decision;
use super::onboardings::Launch;
use super::publisher::Publisher;
use super::records::{self, Applied, Transition};
use crate::announce::Announce;
use crate::bridge::{AcceptError, Bridge};
use crate::clock::Clock;
use crate::config::Config;
use crate::discovery::registry::{ConfigEntry, Known};
use crate::discovery::spec::spec_for;
use crate::discovery::{homeassistant, tasmota, Parsed, Registry, Rules, Skip, Source};
use crate::onboarding::Provenance;
use crate::reply::Route;
use crate::store::{DiscoveryTree, Store, StoreError};

/// Entity warnings remembered so each is logged once, not at every re-publish.
const MAX_WARNED: usize = 4096;

/// Discovery's state in the engine (present only while discovery is on).
pub(super) struct Discovery {
    rules: Rules,
    registry: Mutex<Registry>,
    /// Devices kept at most (`discovery.max_devices`).
    max_devices: usize,
    tree: DiscoveryTree,
    /// (config topic, warning) already logged.
    warned: Mutex<HashSet<(String, String)>>,
}

impl Discovery {
    /// Reads the registry back from the store; `None` when discovery is off.
    pub(super) fn open(
        cfg: &Config,
        store: &Store,
        now_ms: u64,
    ) -> Result<Option<Discovery>, StoreError> {
        let d = &cfg.discovery;
        if !d.enabled() {
            return Ok(None);
        }
        let tree = store.discovery_tree()?;
        retire_marked(store, &tree, now_ms)?;
        let stored = tree.load::<Known, ConfigEntry>()?;
        Ok(Some(Discovery {
            rules: Rules::from_config(cfg),
            registry: Mutex::new(Registry::restore(stored.devices, stored.configs)),
            max_devices: d.max_devices,
            tree,
            warned: Mutex::new(HashSet::new()),
        }))
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .expect("the registry lock is never poisoned")
    }

    /// Follows every state topic the registry knows (at start: a restart).
    pub(super) fn follow_all(&self, publisher: &dyn Publisher) -> usize {
        let topics = self.registry().topics();
        for t in &topics {
            publisher.follow(t);
        }
        topics.len()
    }

    /// A device the operator forgot: its config comes back at every subscribe, so
    /// this is said once per run, not at each.
    fn note_ignored(&self, sensor: &str) {
        let mut w = self.warned.lock().expect("never poisoned");
        if w.insert((sensor.to_string(), "ignored".to_string())) {
            tracing::info!(
                sensor_id = sensor,
                "discovered device {sensor} is on the ignore list (it was forgotten): not \
                onboarded; `onboardd devices unignore {sensor}` lifts it"
            );
        }
    }

    fn warn_once(&self, topic: &str, warning: &str) {
        let mut w = self.warned.lock().expect("never poisoned");
        if w.len() >= MAX_WARNED {
            w.clear();
        }
        if w.insert((topic.to_string(), warning.to_string())) {
            tracing::warn!(topic, "discovery config {topic}: {warning}");
        }
    }
}

/// A store written before retirement was a state holds it as marks in discovery's
/// tree: each becomes its record's state, once, and the mark goes.
fn retire_marked(store: &Store, tree: &DiscoveryTree, now_ms: u64) -> Result<(), StoreError> {
    for sensor in tree.retired_marks()? {
        records::apply_to_current(store, &sensor, &Transition::Retired, now_ms)?;
        tree.remove_retired_mark(&sensor)?;
        tree.wrote();
    }
    Ok(())
}

/// Discovery's handling of configs and state messages, and everything it reads or
/// changes.
pub(super) struct Discovered<'a> {
    /// The registry and its tree.
    pub(super) state: &'a Discovery,
    /// Names the spec of a discovered device.
    pub(super) gateway_id: &'a str,
    pub(super) clock: &'a Clock,
    /// Records of discovered devices (retired, reactivated, bridged).
    pub(super) store: &'a Store,
    /// The same rules and limits as an announced newcomer.
    pub(super) admission: Admission<'a>,
    /// Starts the onboarding of an admitted device.
    pub(super) launch: &'a dyn Launch,
    /// Follows new state topics.
    pub(super) publisher: &'a dyn Publisher,
    /// Told the device of a bridged record.
    pub(super) bridge: Option<&'a Bridge>,
}

impl Discovered<'_> {
    /// Whether discovery follows `topic` as a state topic.
    pub(super) fn follows(&self, topic: &str) -> bool {
        self.state.registry().follows(topic)
    }

    /// Applies a change that belongs to the device, not to one onboarding of it.
    fn change(&self, sensor: &str, t: Transition) -> Result<Applied, StoreError> {
        records::apply_to_current(self.store, sensor, &t, self.clock.wall_ms())
    }

    /// A discovery config: the registry learns it, and a device with entities is
    /// admitted like a bridged announce.
    pub(super) fn config(
        &self,
        source: Source,
        prefix: &str,
        topic: &str,
        p: &Publish,
    ) -> Result<Decision, StoreError> {
        let d = self.state;
        let parsed = match source {
            Source::HomeAssistant => homeassistant::parse(&d.rules, prefix, topic, &p.payload),
            Source::Tasmota => tasmota::parse(&d.rules, prefix, topic, &p.payload),
        };
        let parsed = match parsed {
            Ok(parsed) => parsed,
            // Other components are normal on a shared broker: not worth a warning.
            Err(Skip::Component(c)) => {
                tracing::debug!(
                    topic,
                    "discovery config {topic}: component {c} not onboarded"
                );
                return Ok(Decision::default());
            }
            Err(e) => {
                d.warn_once(topic, &format!("skipped: {e}"));
                return Ok(Decision::default());
            }
        };
        if let Parsed::Config { warnings, .. } = &parsed {
            for w in warnings {
                d.warn_once(topic, w);
            }
        }
        let (change, config) = {
            let mut reg = d.registry();
            if reg.adds_device(&parsed) && reg.device_count() >= d.max_devices {
                drop(reg);
                let max = d.max_devices;
                d.warn_once(
                    topic,
                    &format!("skipped: discovery.max_devices = {max} devices are known already"),
                );
                return Ok(Decision::default());
            }
            let change = reg.apply(topic, parsed);
            (change, reg.config(topic).cloned())
        };
        // Persist what the registry now says of this topic and its device.
        d.tree.set_config(topic, config.as_ref())?;
        let Some(change) = change else {
            return Ok(Decision::wait_for(d.tree.wrote()));
        };
        let sensor = change.known.sensor_id.clone();
        d.tree.set_device(&change.key, &change.known)?;
        if change.active {
            self.reactivate(&sensor)?;
        } else {
            self.retire(&sensor)?;
        }
        if let Some(old) = &change.orphaned {
            self.retire(&old.sensor_id)?;
        }
        let mut seq = d.tree.wrote();
        for t in &change.new_topics {
            self.publisher.follow(t);
        }
        if change.active {
            seq = seq.max(self.onboard_discovered(&change.known)?);
        }
        Ok(Decision::wait_for(seq))
    }

    /// Retires a device made before that has no entity left (listed `retired`).
    fn retire(&self, sensor: &str) -> Result<(), StoreError> {
        if matches!(
            self.change(sensor, Transition::Retired)?,
            Applied::Written(..)
        ) {
            tracing::info!(sensor_id = sensor, "discovered device {sensor} has no entity left: kept in Qubitro, shown retired; its \
                readings are no longer forwarded");
        }
        Ok(())
    }

    /// A device with an entity again is no longer retired.
    fn reactivate(&self, sensor: &str) -> Result<(), StoreError> {
        self.change(sensor, Transition::Reactivated)?;
        Ok(())
    }

    /// Onboards the device discovery knows as `sensor`, when it has an entity now
    /// (an operator lifted it from the ignore list). `None`: discovery does not know
    /// it, or it has no entity; else the write to wait for.
    pub(super) fn onboard_known(&self, sensor: &str) -> Result<Option<u64>, StoreError> {
        let known = {
            let reg = self.state.registry();
            let found = reg
                .devices()
                .find(|(key, k)| k.sensor_id == sensor && reg.is_active(key))
                .map(|(_, k)| k.clone());
            found
        };
        match known {
            Some(k) => self.onboard_discovered(&k).map(Some),
            None => Ok(None),
        }
    }

    /// Onboards a discovered device like a bridged announce; returns the write to
    /// wait for (0: none).
    fn onboard_discovered(&self, known: &Known) -> Result<u64, StoreError> {
        let sensor = known.sensor_id.as_str();
        if self.store.get(sensor)?.is_some() {
            // Made before (a re-published or re-read config, a restart): nothing
            // new, but it must be bridged (an operator may have forgotten and a
            // firmware re-announced it in between).
            let bridged = self.change(sensor, Transition::Bridged)?;
            return Ok(match bridged.written() {
                Some((rec, seq)) => {
                    bridge_device(self.bridge, sensor, &rec);
                    seq
                }
                None => 0,
            });
        }
        if self.store.is_ignored(sensor)? {
            self.state.note_ignored(sensor);
            return Ok(0);
        }
        let spec = spec_for(known, self.gateway_id);
        let ann = Announce {
            sensor_id: sensor.to_string(),
            spec,
            request_id: None,
            proof: None,
            bridge: true,
        };
        let now = (self.clock.now(), self.clock.wall_ms());
        let admitted =
            self.admission
                .admit(ann, Route::default(), Provenance::Discovered, now.0, now.1)?;
        Ok(match admitted {
            Ok(Admitted::New { seq }) => {
                let id = &known.device.identifier;
                tracing::info!(sensor_id = sensor, discovery_id = %id, "discovered device {sensor} ({id}); onboarding it");
                self.launch.launch(sensor.to_string(), Duration::ZERO);
                seq
            }
            Ok(Admitted::Raced { seq }) => seq,
            Err(Refusal::Rules(denied)) => {
                tracing::warn!(
                    sensor_id = sensor,
                    code = denied.code.as_str(),
                    outcome = "refused",
                    "discovered device {sensor} \
                    not onboarded ({}): {}; it is tried again when its config is seen again",
                    denied.code,
                    denied.message
                );
                0
            }
            Err(Refusal::RejectedRecently { why, .. }) => {
                tracing::warn!(
                    sensor_id = sensor,
                    "discovered device {sensor} not onboarded: Qubitro rejected it moments ago ({why})"
                );
                0
            }
        })
    }

    /// A state message of followed topics: one flat reading per device reading it,
    /// buffered through the bridge like a bridged sensor's own.
    pub(super) fn reading(
        &self,
        bridge: &Bridge,
        topic: &str,
        p: &Publish,
    ) -> Result<Decision, StoreError> {
        let readings = self.state.registry().readings(topic, &p.payload);
        let mut tickets = Vec::new();
        for (sensor, reading) in readings {
            // Not onboarded (refused by a rule, or the record was forgotten).
            if !self.store.is_bridged(&sensor)? {
                continue;
            }
            self.store
                .saw(&sensor, self.clock.wall_ms(), self.clock.now())?;
            let body = json(&Value::Object(reading));
            match bridge.accept(&sensor, &body, p.retain) {
                Ok(a) => tickets.push(a.ticket),
                Err(AcceptError::Store(e)) => return Err(e),
                // Counted and logged by the bridge.
                Err(_) => {}
            }
        }
        Ok(Decision {
            tickets,
            ..Decision::default()
        })
    }
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Credentials;
    use crate::engine::records::tests::store;
    use crate::onboarding::{Origin, Record};

    #[tokio::test]
    async fn a_retired_mark_of_the_previous_version_becomes_the_records_state_once() {
        let (store, _dir) = store();
        let mut spec = crate::announce::test_spec();
        spec.metadata
            .insert("discovered_by".into(), "homeassistant".into());
        spec.metadata.insert("sensor_id".into(), "ha-old".into());
        // As the previous version wrote it: no provenance, no retired flag, a mark.
        let rec = Record::pending(spec, Route::default(), 3, 1)
            .created(
                Credentials {
                    device_id: "d".into(),
                    device_token: crate::device::Token("t".into()),
                },
                Origin::Created,
                2,
            )
            .unwrap();
        let mut old = serde_json::to_value(&rec).unwrap();
        old.as_object_mut().unwrap().remove("provenance");
        let old_rec: Record = serde_json::from_value(old).unwrap();
        assert_eq!(
            old_rec.provenance,
            Provenance::Discovered,
            "derived on read"
        );
        store.insert_new("ha-old", &old_rec).unwrap().unwrap();
        let tree = store.discovery_tree().unwrap();
        tree.mark_retired_as_before("ha-old").unwrap();
        assert!(store.retired_discovered().unwrap().contains("ha-old"));

        let mut cfg = Config::from_toml("[qubitro]\nproject_id = \"p\"\napi_key = \"k\"").unwrap();
        cfg.discovery.homeassistant = true;
        assert!(Discovery::open(&cfg, &store, 10).unwrap().is_some());
        let now = store.get("ha-old").unwrap().unwrap();
        assert!(now.retired);
        assert_eq!(now.shown_state(), "retired", "listed as before");
        assert!(
            store.retired_discovered().unwrap().is_empty(),
            "the mark is gone"
        );
        // Opened again: nothing left to move.
        assert!(Discovery::open(&cfg, &store, 11).unwrap().is_some());
        assert_eq!(store.get("ha-old").unwrap().unwrap().updated_ms, 10);
    }
}
