//! Simulated sensors: MQTT clients (v5 and v3.1.1, on rumqttc) that announce themselves
//! and read their replies. Every wait is bounded by [`WAIT`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::firmware::{Flashed, Reply};
use crate::WAIT;

/// A simulated sensor: an MQTT 5 client subscribed to its reply topic. A flashed sensor
/// (the usual one) signs every announce and checks every reply with its key
/// ([`Flashed`]); an unkeyed one sends and reads payloads as they are (an attacker, or
/// a sensor of a gateway with proofs off).
pub struct Sensor {
    pub id: String,
    pub client: AsyncClient,
    flashed: Option<Flashed>,
    replies: mpsc::UnboundedReceiver<(String, Vec<u8>, Option<Vec<u8>>)>,
    /// PUBACKs received so far: an announce is in the broker's hands once acknowledged.
    pubacks: watch::Receiver<usize>,
}

impl Sensor {
    /// A sensor flashed with its key, subscribed to its reply topic.
    pub async fn connect(port: u16, id: &str, flashed: &Flashed) -> Sensor {
        let filter = format!("onboard/reply/{id}/#");
        Self::connect_as(port, id, &filter, None, Some(flashed)).await
    }

    /// A client without a key, subscribed to `id`'s reply topic.
    pub async fn connect_unkeyed(port: u16, id: &str) -> Sensor {
        Self::connect_as(port, id, &format!("onboard/reply/{id}/#"), None, None).await
    }

    /// Connects (optionally with username/password) and subscribes to `filter`. With
    /// `flashed`, it can act for any sensor of that gateway: an announce on
    /// `onboard/announce/<sensor>` is signed with that sensor's key, and a reply on
    /// `onboard/reply/<sensor>` is opened with it.
    pub async fn connect_as(
        port: u16,
        id: &str,
        filter: &str,
        login: Option<(&str, &str)>,
        flashed: Option<&Flashed>,
    ) -> Sensor {
        let mut opts = MqttOptions::new(
            format!("sensor-{id}-{}", fastrand::u32(..)),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(10));
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
            opts.set_client_id(u.to_string());
        }
        Self::connect_with(opts, id, filter, flashed).await
    }

    /// A flashed sensor with a persistent session (clean start off, a stable client id, one
    /// hour of session expiry) subscribed to its reply topic: what the broker queued
    /// for it while it or the broker was away reaches it when it is back, as for a
    /// real sensor that keeps its session.
    pub async fn connect_persistent(port: u16, id: &str, flashed: &Flashed) -> Sensor {
        let mut opts = MqttOptions::new(format!("persistent-sensor-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        let filter = format!("onboard/reply/{id}/#");
        Self::connect_with(opts, id, &filter, Some(flashed)).await
    }

    async fn connect_with(
        opts: MqttOptions,
        id: &str,
        filter: &str,
        flashed: Option<&Flashed>,
    ) -> Sensor {
        let (client, mut el) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let (puback_tx, pubacks) = watch::channel(0usize);
        let c2 = client.clone();
        let f = filter.to_string();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(f.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let _ = sub_tx.send(a);
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        puback_tx.send_modify(|n| *n += 1);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let topic = String::from_utf8_lossy(&p.topic).to_string();
                        let v = p.payload.to_vec();
                        let corr = p
                            .properties
                            .as_ref()
                            .and_then(|pp| pp.correlation_data.as_ref())
                            .map(|c| c.to_vec());
                        if tx.send((topic, v, corr)).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("sensor {id}: not subscribed to {filter} within {WAIT:?}"));
        Sensor {
            id: id.to_string(),
            client,
            flashed: flashed.cloned(),
            replies: rx,
            pubacks,
        }
    }

    /// Announces `fields` (the announce as a JSON object, `{}` for none) on its own
    /// announce topic: signed when flashed, as it is otherwise.
    pub async fn announce(&self, fields: &str) {
        self.announce_on(&format!("onboard/announce/{}", self.id), fields)
            .await;
    }

    /// Publishes `payload` exactly as given on its own announce topic: for malformed or
    /// forged announces sent on purpose.
    pub async fn announce_raw(&self, payload: &str) {
        self.announce_raw_on(&format!("onboard/announce/{}", self.id), payload)
            .await;
    }

    /// The payload announcing `fields` on `topic`: signed for the sensor the topic names
    /// (this sensor's own id on any other topic) when flashed.
    fn announce_payload(&self, topic: &str, fields: &str) -> String {
        match &self.flashed {
            Some(f) => f.announce(sensor_of(topic, "onboard/announce/", &self.id), fields),
            None => fields.to_string(),
        }
    }

    /// The reply `payload` received on `topic` as this sensor reads it: checked and
    /// opened with its key when flashed (panics, saying why, when it would not act on it).
    fn open(&self, topic: &str, payload: &[u8]) -> Reply {
        match &self.flashed {
            Some(f) => f
                .open_reply(sensor_of(topic, "onboard/reply/", &self.id), payload)
                .unwrap_or_else(|e| panic!("sensor {}: the reply on {topic}: {e}", self.id)),
            None => Reply::unkeyed(serde_json::from_slice(payload).unwrap_or_else(|_| {
                panic!(
                    "reply on {topic} is not JSON: {}",
                    String::from_utf8_lossy(payload)
                )
            })),
        }
    }

    /// The reply `payload` on `topic` as this sensor's firmware reads it: `Err` (why) for
    /// what a flashed sensor would not act on (an answer to an earlier announce of its
    /// own, a forgery), which is noise to it; an unkeyed client reads everything.
    fn read_as_firmware(&self, topic: &str, payload: &[u8]) -> Result<Reply, String> {
        match &self.flashed {
            Some(f) => f.open_reply(sensor_of(topic, "onboard/reply/", &self.id), payload),
            None => Ok(self.open(topic, payload)),
        }
    }

    /// Publishes raw bytes on any topic at QoS 1 (readings, discovery configs),
    /// optionally retained, as the devices that publish them would.
    pub async fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        let publish = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec());
        match tokio::time::timeout(WAIT, publish).await {
            Ok(published) => published.expect("publish"),
            Err(_) => panic!(
                "sensor {}: publish on {topic} not queued within {WAIT:?}",
                self.id
            ),
        }
    }

    /// Announces `fields` on `topic` (signed when flashed, see [`Sensor::announce`]).
    pub async fn announce_on(&self, topic: &str, fields: &str) {
        let payload = self.announce_payload(topic, fields);
        self.announce_raw_on(topic, &payload).await;
    }

    /// Publishes `payload` exactly as given on `topic`.
    pub async fn announce_raw_on(&self, topic: &str, payload: &str) {
        let publish =
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec());
        match tokio::time::timeout(WAIT, publish).await {
            Ok(published) => published.expect("publish announce"),
            Err(_) => panic!(
                "sensor {}: announce on {topic} not queued within {WAIT:?}",
                self.id
            ),
        }
    }

    /// Announces and waits for the broker's PUBACK: from then on the announce is the
    /// broker's (queued for onboardd's session, saved with a persistent broker), whatever
    /// happens to this client. For one announce at a time.
    pub async fn announce_acked(&mut self, fields: &str) {
        let before = *self.pubacks.borrow_and_update();
        self.announce(fields).await;
        let acked = tokio::time::timeout(WAIT, self.pubacks.wait_for(|n| *n > before)).await;
        match acked {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => panic!("sensor {}: its connection task ended", self.id),
            Err(_) => panic!(
                "sensor {}: announce not acknowledged within {WAIT:?}",
                self.id
            ),
        }
    }

    /// Announces `fields` (signed when flashed) with these publish properties.
    pub async fn announce_with_props(&self, fields: &str, props: PublishProperties) {
        let topic = format!("onboard/announce/{}", self.id);
        let payload = self.announce_payload(&topic, fields);
        let publish = self.client.publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            false,
            payload.as_bytes().to_vec(),
            props,
        );
        match tokio::time::timeout(WAIT, publish).await {
            Ok(published) => published.expect("publish announce"),
            Err(_) => panic!("sensor {}: announce not queued within {WAIT:?}", self.id),
        }
    }

    /// The next message (topic, payload bytes, correlation data).
    pub async fn next_raw(&mut self) -> (String, Vec<u8>, Option<Vec<u8>>) {
        tokio::time::timeout(WAIT, self.replies.recv())
            .await
            .unwrap_or_else(|_| panic!("no reply for sensor {} within {WAIT:?}", self.id))
            .expect("reply channel open")
    }

    /// The next reply (topic, reply as the sensor reads it, correlation data).
    pub async fn next(&mut self) -> (String, Reply, Option<Vec<u8>>) {
        let (t, p, c) = self.next_raw().await;
        let r = self.open(&t, &p);
        (t, r, c)
    }

    pub async fn reply(&mut self) -> Reply {
        self.next().await.1
    }

    /// The next reply, read as published and checked to be unauthenticated (v1 form,
    /// no `mac`): what an announce that proved nothing gets (`unauthorized`,
    /// `invalid_json`, `payload_too_large`, or a refusal before the proof is read). A
    /// sensor acts on none of it; a test reads it to see why its announce was refused.
    pub async fn unauthenticated_reply(&mut self) -> Reply {
        let (topic, payload, _) = self.next_raw().await;
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_else(|_| {
            panic!(
                "reply on {topic} is not JSON: {}",
                String::from_utf8_lossy(&payload)
            )
        });
        assert!(
            json.get("mac").is_none() && json.get("body").is_none(),
            "sensor {}: an authenticated reply where none was due, on {topic}: {json}",
            self.id
        );
        Reply::unkeyed(json)
    }

    /// The next reply whose status is `status`, skipping others (e.g. pending) and, for a
    /// flashed sensor, every reply it would not act on, all within [`WAIT`].
    pub async fn reply_with_status(&mut self, status: &str) -> Reply {
        let deadline = Instant::now() + WAIT;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, self.replies.recv()).await else {
                panic!(
                    "sensor {}: no {status:?} reply within {WAIT:?}; skipped: {skipped:?}",
                    self.id
                );
            };
            let (t, p, _) = next.expect("reply channel open");
            let r = match self.read_as_firmware(&t, &p) {
                Ok(r) => r,
                Err(e) => {
                    skipped.push(Reply::unkeyed(serde_json::json!({ "ignored": e })));
                    continue;
                }
            };
            if r["status"] == status {
                return r;
            }
            skipped.push(r);
        }
    }

    /// The `ok` replies of `n` distinct sensors (by `sensor_id`), for a client subscribed to
    /// many reply topics; all within `within`. A flashed client reads each reply as the
    /// answer to any of its sensor's latest announces (several announces of one sensor at
    /// once each get an answer) and skips what none would act on; every other reply must
    /// be `pending`, and a
    /// sensor answered `ok` twice must get the same token both times (the opened token
    /// when flashed).
    pub async fn ok_replies_of(&mut self, n: usize, within: Duration) -> HashMap<String, Reply> {
        let deadline = Instant::now() + within;
        let mut ok: HashMap<String, Reply> = HashMap::new();
        while ok.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(next) = tokio::time::timeout(left, self.replies.recv()).await else {
                panic!(
                    "{}: {} of {n} sensors answered ok within {within:?}",
                    self.id,
                    ok.len()
                );
            };
            let (t, p, _) = next.expect("reply channel open");
            let r = match &self.flashed {
                Some(f) => {
                    match f.open_reply_to_any(sensor_of(&t, "onboard/reply/", &self.id), &p) {
                        Ok(r) => r,
                        Err(_) => continue,
                    }
                }
                None => self.open(&t, &p),
            };
            if r["status"] != "ok" {
                assert_eq!(r["status"], "pending", "on {t}: {r}");
                continue;
            }
            let sensor = r["sensor_id"].as_str().expect("sensor_id").to_owned();
            if let Some(prev) = ok.get(&sensor) {
                assert_eq!(
                    (prev.opened_token(), &prev["device_token"]),
                    (r.opened_token(), &r["device_token"]),
                    "{sensor} got two different tokens"
                );
            }
            ok.insert(sensor, r);
        }
        ok
    }

    /// The next message (topic, payload bytes, correlation data) if one arrives within
    /// `within`, None on timeout. Nothing is lost on a timeout: a later message is returned
    /// by the next call (for tests that collect every reply over a long run).
    pub async fn next_raw_within(
        &mut self,
        within: Duration,
    ) -> Option<(String, Vec<u8>, Option<Vec<u8>>)> {
        tokio::time::timeout(within, self.replies.recv())
            .await
            .ok()
            .map(|m| m.expect("reply channel open"))
    }

    /// True when no reply arrives within `d`. Only for an absence no later event can
    /// witness: prefer awaiting a marker reply that must come after anything unwanted.
    pub async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, self.replies.recv()).await.is_err()
    }
}

/// The sensor a topic under `prefix` names (`onboard/reply/temp-01/x` → `temp-01`), or
/// `own` for a topic elsewhere.
fn sensor_of<'a>(topic: &'a str, prefix: &str, own: &'a str) -> &'a str {
    topic
        .strip_prefix(prefix)
        .and_then(|rest| rest.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or(own)
}

/// A flashed MQTT 3.1.1 sensor (rumqttc's v4 client): announces signed and reads its
/// reply with its key.
pub struct SensorV3 {
    pub id: String,
    client: rumqttc::AsyncClient,
    flashed: Flashed,
    replies: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl SensorV3 {
    pub async fn connect(port: u16, id: &str, flashed: &Flashed) -> SensorV3 {
        let mut opts = rumqttc::MqttOptions::new(format!("v3-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(10));
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (sub_tx, mut sub_rx) = mpsc::unbounded_channel();
        let c2 = client.clone();
        let topic = format!("onboard/reply/{id}");
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = c2.try_subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = sub_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p.payload.to_vec()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, sub_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("v3 sensor {id}: not subscribed within {WAIT:?}"));
        SensorV3 {
            id: id.to_string(),
            client,
            flashed: flashed.clone(),
            replies: rx,
        }
    }

    /// Announces `fields` signed with its key (see [`Sensor::announce`]).
    pub async fn announce(&self, fields: &str) {
        let payload = self.flashed.announce(&self.id, fields);
        let publish = self.client.publish(
            format!("onboard/announce/{}", self.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            payload.as_bytes().to_vec(),
        );
        match tokio::time::timeout(WAIT, publish).await {
            Ok(published) => published.expect("publish"),
            Err(_) => panic!("v3 sensor {}: announce not queued within {WAIT:?}", self.id),
        }
    }

    pub async fn reply(&mut self) -> Reply {
        let payload = tokio::time::timeout(WAIT, self.replies.recv())
            .await
            .unwrap_or_else(|_| panic!("v3 sensor {}: no reply within {WAIT:?}", self.id))
            .expect("reply channel open");
        self.flashed
            .open_reply(&self.id, &payload)
            .unwrap_or_else(|e| panic!("v3 sensor {}: {e}", self.id))
    }
}
