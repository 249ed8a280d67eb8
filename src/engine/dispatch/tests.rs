//! The dispatcher's decisions and discovery's handling of configs, over a real
//! store, a recording publisher and a recording launcher: no broker, no task.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;

use super::{Decision, Dispatch};
use crate::clock::Clock;
use crate::config::Config;
use crate::device::{Credentials, Token};
use crate::discovery::Source;
use crate::engine::admit::Admission;
use crate::engine::delivery::Outbox;
use crate::engine::discovered::{Discovered, Discovery};
use crate::engine::inbound::Routes;
use crate::engine::onboardings::{Launched, Onboardings};
use crate::engine::publisher::Recording;
use crate::engine::records::{self, Transition};
use crate::engine::rejections::Rejections;
use crate::onboarding::{Origin, Provenance, Record, State};
use crate::reply::Route;
use crate::security::Gatekeeper;
use crate::store::Store;

/// Everything the dispatcher is given, owned here.
struct World {
    cfg: Config,
    clock: Clock,
    store: Store,
    routes: Routes,
    gate: Gatekeeper,
    rejections: Rejections,
    onboardings: Onboardings,
    launched: Launched,
    outbox: Outbox,
    sent: Arc<Recording>,
    discovery: Option<Discovery>,
    _dir: tempfile::TempDir,
}

impl World {
    /// Claims off, `security` rules, discovery of Home Assistant configs when asked.
    fn new(security: &str, discovery: bool) -> World {
        let mut cfg = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n[security]\nrequire_claim = false\n{security}"
        ))
        .unwrap();
        cfg.discovery.homeassistant = discovery;
        let (store, _dir) = records::tests::store();
        let sent = Arc::new(Recording::default());
        World {
            clock: Clock::System,
            routes: Routes::new(&cfg, false),
            gate: Gatekeeper::new(&cfg),
            rejections: Rejections::default(),
            onboardings: Onboardings::new(&cfg),
            launched: Launched::default(),
            outbox: Outbox::new(&cfg, sent.clone()),
            discovery: Discovery::open(&cfg, &store, 1).unwrap(),
            sent,
            cfg,
            store,
            _dir,
        }
    }

    fn admission(&self) -> Admission<'_> {
        Admission {
            store: &self.store,
            gate: &self.gate,
            rejections: &self.rejections,
        }
    }

    fn discovered(&self) -> Option<Discovered<'_>> {
        self.discovery.as_ref().map(|state| Discovered {
            state,
            gateway_id: &self.cfg.gateway_id,
            clock: &self.clock,
            store: &self.store,
            admission: self.admission(),
            launch: &self.launched,
            publisher: self.sent.as_ref(),
            bridge: None,
        })
    }

    fn dispatch(&self) -> Dispatch<'_> {
        Dispatch {
            cfg: &self.cfg,
            clock: &self.clock,
            store: &self.store,
            routes: &self.routes,
            gate: &self.gate,
            admission: self.admission(),
            onboardings: &self.onboardings,
            launch: &self.launched,
            outbox: &self.outbox,
            bridge: None,
            discovery: self.discovered(),
        }
    }

    fn announce(&self, sensor: &str, payload: &str) -> Decision {
        self.dispatch()
            .dispatch(&self.publish(sensor, payload))
            .unwrap()
    }

    fn publish(&self, sensor: &str, payload: &str) -> Publish {
        let topic = self.cfg.mqtt.announce_topic.replace('+', sensor);
        Publish::new(topic, QoS::AtLeastOnce, payload.to_string(), None)
    }

    /// A sensor onboarded before whose ok reply the broker acknowledged.
    fn delivered(&self, sensor: &str) -> Record {
        let rec = Record::pending(crate::announce::test_spec(), Route::default(), 7, 1);
        self.store.insert_new(sensor, &rec).unwrap().unwrap();
        let created = Transition::Created {
            credentials: Credentials {
                device_id: "dev-1".into(),
                device_token: Token("tok-1".into()),
            },
            origin: Origin::Created,
            owner: None,
        };
        for t in [Transition::Creating, created, Transition::Delivered] {
            records::apply(&self.store, sensor, 7, &t, 2).unwrap();
        }
        self.store.get(sensor).unwrap().unwrap()
    }
}

fn reply_of(d: &Decision) -> serde_json::Value {
    let answer = d.answer.as_ref().expect("a reply");
    serde_json::from_slice(&answer.reply.to_bytes()).unwrap()
}

#[tokio::test]
async fn a_known_delivered_sensor_is_answered_from_the_store_without_a_write() {
    let w = World::new("", false);
    let rec = w.delivered("s");
    assert!(matches!(rec.state, State::Delivered { .. }));
    let written = w.store.last_write();
    let d = w.announce("s", "{}");
    assert_eq!(d.seq, 0, "nothing to wait for before the ack");
    let reply = reply_of(&d);
    assert_eq!(
        (reply["status"].as_str(), reply["device_token"].as_str()),
        (Some("ok"), Some("tok-1"))
    );
    let answer = d.answer.as_ref().unwrap();
    assert!(
        answer.track.is_none(),
        "delivered already: not tracked again"
    );
    assert_eq!(w.store.last_write(), written, "no record written");
    assert_eq!(w.store.get("s").unwrap(), Some(rec));
    assert!(w.launched.sensors().is_empty(), "no onboarding started");
}

#[tokio::test]
async fn an_unknown_sensor_is_admitted_as_pending_and_its_onboarding_started() {
    let w = World::new("", false);
    let d = w.announce("s", "{}");
    assert!(d.answer.is_none(), "its onboarding answers");
    assert!(d.seq > 0, "the ack waits for the record");
    let rec = w.store.get("s").unwrap().expect("recorded");
    assert_eq!(
        (rec.state, rec.provenance),
        (State::Pending, Provenance::Firmware)
    );
    let launched = w.launched.0.lock().unwrap().clone();
    assert_eq!(launched, vec![("s".to_string(), Duration::ZERO)]);
}

#[tokio::test]
async fn a_refused_sensor_gets_a_refusal_and_nothing_is_written() {
    let w = World::new("deny_sensor_ids = [\"bad-*\"]", false);
    let written = w.store.last_write();
    let d = w.announce("bad-1", r#"{"request_id":"r1"}"#);
    assert_eq!(d.seq, 0);
    let reply = reply_of(&d);
    assert_eq!(
        (reply["status"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("denied")),
        "{reply}"
    );
    assert_eq!(reply["request_id"], "r1", "the refusal answers its request");
    assert_eq!(w.store.get("bad-1").unwrap(), None);
    assert_eq!(w.store.last_write(), written, "nothing written");
    assert!(w.launched.sensors().is_empty());
}

#[tokio::test]
async fn a_pending_sensor_announced_again_joins_its_onboarding_without_a_new_record() {
    let w = World::new("", false);
    let rec = Record::pending(crate::announce::test_spec(), Route::default(), 7, 1);
    w.store.insert_new("s", &rec).unwrap().unwrap();
    let d = w.announce("s", r#"{"request_id":"again"}"#);
    assert!(d.answer.is_none(), "its task answers this route too");
    assert_eq!(w.launched.sensors(), vec!["s"], "its task is (re)started");
    assert_eq!(w.store.get("s").unwrap(), Some(rec), "no new record");
    let owed = w.onboardings.take_waiting("s");
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].request_id.as_deref(), Some("again"));
}

#[tokio::test]
async fn a_retained_announce_is_neither_answered_nor_admitted() {
    let w = World::new("", false);
    let mut p = w.publish("s", "{}");
    p.retain = true;
    let d = w.dispatch().dispatch(&p).unwrap();
    assert!(d.answer.is_none());
    assert_eq!(w.store.get("s").unwrap(), None);
    assert!(w.launched.sensors().is_empty());
}

#[tokio::test]
async fn an_announce_of_a_discovery_id_is_refused_while_discovery_is_on() {
    let w = World::new("", true);
    let d = w.announce("ha-t1", "{}");
    let reply = reply_of(&d);
    assert_eq!(reply["code"], "invalid_field", "{reply}");
    assert_eq!(w.store.get("ha-t1").unwrap(), None);
    assert!(w.launched.sensors().is_empty());
}

/// A Home Assistant config of one temperature entity of device `t1`.
const TOPIC: &str = "homeassistant/sensor/t1/temperature/config";
const CONFIG: &str = r#"{"name":"Temperature","uniq_id":"t1_temperature","stat_t":"garden/t1",
    "val_tpl":"{{ value_json.temperature }}","unit_of_meas":"C","dev_cla":"temperature",
    "dev":{"ids":["t1"],"name":"Garden","mf":"Acme","mdl":"T1"}}"#;

fn config(d: &Discovered<'_>) -> Decision {
    let p = Publish::new(TOPIC, QoS::AtLeastOnce, CONFIG, None);
    d.config(Source::HomeAssistant, "homeassistant", TOPIC, &p)
        .unwrap()
}

#[tokio::test]
async fn a_config_naming_a_new_device_admits_it_once_and_follows_its_state() {
    let w = World::new("", true);
    let d = w.discovered().expect("discovery on");
    let decided = config(&d);
    assert!(decided.answer.is_none(), "configs are never answered");
    assert!(
        decided.seq > 0,
        "the ack waits for the registry and the record"
    );
    let launched = w.launched.sensors();
    assert_eq!(launched.len(), 1, "{launched:?}");
    let rec = w.store.get(&launched[0]).unwrap().expect("recorded");
    assert_eq!(
        (rec.state, rec.provenance, rec.bridged),
        (State::Pending, Provenance::Discovered, true)
    );
    assert_eq!(*w.sent.followed.lock().unwrap(), vec!["garden/t1"]);
}

#[tokio::test]
async fn the_same_config_again_admits_nothing_new() {
    let w = World::new("", true);
    let d = w.discovered().expect("discovery on");
    config(&d);
    let sensor = w.launched.sensors().pop().expect("admitted");
    let rec = w.store.get(&sensor).unwrap();
    let again = config(&d);
    assert!(again.answer.is_none());
    assert_eq!(
        w.launched.sensors(),
        vec![sensor.clone()],
        "no second onboarding"
    );
    assert_eq!(w.store.get(&sensor).unwrap(), rec, "the record stands");
    assert_eq!(
        w.sent.followed.lock().unwrap().len(),
        1,
        "no topic followed twice"
    );
}
