//! Replies to sensors, and the broker's word on them.
//!
//! An ok reply is tracked (it carries a [`DeliveryTag`]) while its sensor's record
//! is `Created`; the broker's PUBACK with reason Success moves the record to
//! `Delivered`. On every new MQTT connection every `Created` record's reply is
//! published again: tracking starts afresh with each connection, so nothing that
//! rumqttc did or dropped while reconnecting can leave a sensor marked delivered
//! that never got its token. Ok replies are idempotent, so a sensor may see one twice.
//!
//! Every ok reply is built by [`Outbox::ok_reply`], the one place that decides how
//! the token travels: sealed for the sensor and the exchange when the route answers
//! an authenticated (protocol v2) announce, in clear only to a plain announce while
//! `security.require_claim` is off, and not at all on a route that has neither (a
//! record made by a v1 proof: its sensor's next v2 announce is answered instead).
//! [`Outbox::send`] puts a MAC bound to the announce's nonce on every reply of an
//! authenticated route, and none on any other.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::publisher::{Outgoing, Publisher};
use super::records::{self, Transition};
use super::Engine;
use crate::bridge::DataTopic;
use crate::clock::Clock;
use crate::config::{Config, Secret};
use crate::device::Credentials;
use crate::mqtt::{Acked, DeliveryTag, SessionEvent};
use crate::onboarding::{Provenance, Record, State};
use crate::proof::v2::ExchangeKeys;
use crate::proof::SensorKey;
use crate::reply::{Broker, OkHow, Reply, Route, TokenField};
use crate::store::{Store, StoreError};

/// Where replies go out.
pub struct Outbox {
    publisher: Arc<dyn Publisher>,
    /// `{sensor_id}` pattern of the default reply topic.
    reply_topic: String,
    /// Qubitro's broker, told to sensors in every ok reply.
    broker: Broker,
    /// Derives each sensor's keys to seal its token and MAC its replies.
    claim_key: Secret,
    /// Never a clear token, whatever the route says.
    require_claim: bool,
    /// Where bridged sensors publish their readings.
    data_topic: DataTopic,
}

impl Outbox {
    pub(super) fn new(cfg: &Config, publisher: Arc<dyn Publisher>) -> Outbox {
        Outbox {
            publisher,
            reply_topic: cfg.mqtt.reply_topic.clone(),
            broker: Broker {
                host: cfg.qubitro.broker_host.clone(),
                port: cfg.qubitro.broker_port,
            },
            claim_key: cfg.security.claim_key.clone(),
            require_claim: cfg.security.require_claim,
            data_topic: DataTopic::new(&cfg.bridge.data_topic),
        }
    }

    pub(super) fn publisher(&self) -> &dyn Publisher {
        self.publisher.as_ref()
    }

    /// The ok reply of an onboarded sensor on `route`, or `None` when no reply on
    /// that route may carry its token (see the module doc). A bridged sensor never
    /// gets its token, neither clear nor sealed: the gateway keeps it to forward the
    /// readings.
    pub(super) fn ok_reply(
        &self,
        sensor: &str,
        route: &Route,
        creds: &Credentials,
        bridged: bool,
    ) -> Option<Reply> {
        let how = if bridged {
            OkHow::Bridged {
                bridged: true,
                data_topic: self.data_topic.for_sensor(sensor),
            }
        } else {
            OkHow::Direct {
                token: self.token_field(sensor, route, creds)?,
                broker: self.broker.clone(),
            }
        };
        Some(Reply::Ok {
            sensor_id: sensor.to_string(),
            device_id: creds.device_id.clone(),
            how,
            request_id: route.request_id.clone(),
        })
    }

    fn token_field(&self, sensor: &str, route: &Route, creds: &Credentials) -> Option<TokenField> {
        match &route.nonce {
            Some(nonce) => Some(TokenField::Sealed(self.keys(sensor).seal_token(
                sensor,
                &creds.device_id,
                nonce,
                &creds.device_token.0,
            ))),
            None if !route.proven && !self.require_claim => {
                Some(TokenField::Clear(creds.device_token.clone()))
            }
            None => None,
        }
    }

    fn keys(&self, sensor: &str) -> ExchangeKeys {
        ExchangeKeys::derive(&SensorKey::derive(&self.claim_key, sensor))
    }

    /// The bytes of `reply` on `route`: MAC'd and bound to the announce's nonce when
    /// the route answers an authenticated announce, the plain reply otherwise.
    fn payload(&self, sensor: &str, route: &Route, reply: &Reply) -> Vec<u8> {
        match &route.nonce {
            Some(nonce) => self
                .keys(sensor)
                .authenticated_reply(reply, nonce)
                .expect("a reply serializes to a JSON object"),
            None => reply.to_bytes(),
        }
    }

    /// Queues a reply (QoS 1). Waits while the broker's request queue is full: the
    /// caller races it with its own stop signal.
    pub(super) async fn send(
        &self,
        sensor: &str,
        route: &Route,
        reply: Reply,
        track: Option<DeliveryTag>,
    ) {
        let topic = route.topic(&self.reply_topic, sensor);
        tracing::debug!(sensor_id = sensor, topic = %topic, status = reply.status(), "reply");
        let out = Outgoing {
            payload: self.payload(sensor, route, &reply),
            topic,
            correlation: route.correlation_data.clone(),
            track,
        };
        if let Err(e) = self.publisher.publish(out).await {
            tracing::debug!(sensor_id = sensor, error = %e, "cannot queue a reply: {e}");
        }
    }
}

/// How a record's ok reply goes out.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OkDelivery<'a> {
    /// Published with these credentials, tracked while the record is `Created`.
    Publish {
        creds: &'a Credentials,
        track: Option<DeliveryTag>,
    },
    /// Nobody listens for a discovered device's reply (it has no firmware of ours):
    /// its onboarding ends with the device made (`tag`: mark it delivered), instead
    /// of a reply published to no one again at every reconnect.
    Settle { tag: Option<DeliveryTag> },
    /// No device yet: nothing to deliver.
    NotYet,
}

/// The reply choice for an onboarded (or not yet onboarded) record.
pub(super) fn ok_delivery<'a>(sensor: &str, rec: &'a Record, discovery_on: bool) -> OkDelivery<'a> {
    let Some(creds) = rec.credentials() else {
        return OkDelivery::NotYet;
    };
    let tag = delivery_tag(sensor, rec);
    if discovery_on && rec.provenance == Provenance::Discovered {
        return OkDelivery::Settle { tag };
    }
    OkDelivery::Publish { creds, track: tag }
}

/// The `retry_after_s` of the pending reply to an announce of a sensor still being
/// onboarded (`due`: until its next attempt), or `None` when its task's outcome is
/// the answer. Told now once an attempt failed, or when the task cannot keep the
/// announce's route (`route_kept` false: too many owed already).
pub(super) fn pending_wait(
    rec: &Record,
    due: std::time::Duration,
    route_kept: bool,
) -> Option<u64> {
    let mut wait = (rec.attempts > 0).then(|| due.as_secs_f64().ceil() as u64);
    if !route_kept {
        wait.get_or_insert(1);
    }
    wait
}

/// The tag of an ok reply: only a `Created` record's reply is tracked (a delivered
/// one needs no proof again).
pub(super) fn delivery_tag(sensor: &str, rec: &Record) -> Option<DeliveryTag> {
    matches!(rec.state, State::Created { .. }).then(|| DeliveryTag {
        sensor: sensor.to_string(),
        generation: rec.generation,
    })
}

/// The delivery stage: what it reads and writes.
pub(super) struct Delivery<'a> {
    pub(super) store: &'a Store,
    pub(super) outbox: &'a Outbox,
    pub(super) clock: &'a Clock,
    /// Discovered devices get no reply while discovery is on.
    pub(super) discovery_on: bool,
}

impl Delivery<'_> {
    /// Publishes a sensor's ok reply; tracked while its record is `Created`.
    pub(super) async fn deliver_ok(
        &self,
        sensor: &str,
        rec: &Record,
        route: &Route,
    ) -> Result<(), StoreError> {
        match ok_delivery(sensor, rec, self.discovery_on) {
            OkDelivery::Publish { creds, track } => {
                match self.outbox.ok_reply(sensor, route, creds, rec.bridged) {
                    Some(reply) => self.outbox.send(sensor, route, reply, track).await,
                    None => tracing::debug!(
                        sensor_id = sensor,
                        "no authenticated exchange to answer sensor {sensor} on; its next protocol v2 announce is answered"
                    ),
                }
            }
            OkDelivery::Settle { tag: Some(tag) } => self.acked(tag, Acked::Delivered)?,
            OkDelivery::Settle { tag: None } | OkDelivery::NotYet => {}
        }
        Ok(())
    }

    /// The broker's word on a tracked reply.
    pub(super) fn acked(&self, tag: DeliveryTag, outcome: Acked) -> Result<(), StoreError> {
        let sensor = tag.sensor.as_str();
        match outcome {
            Acked::Delivered => {
                crate::metrics::reply_delivered();
                let now = self.clock.wall_ms();
                // No flush: should it be lost, the reply is only published again.
                records::apply(
                    self.store,
                    sensor,
                    tag.generation,
                    &Transition::Delivered,
                    now,
                )?;
            }
            Acked::NoSubscribers => {
                tracing::debug!(
                    sensor_id = sensor,
                    "nobody is subscribed to sensor {sensor}'s reply topic; it is sent again when the sensor announces or on the \
                        next session"
                );
            }
            Acked::Refused(reason) => {
                tracing::warn!(
                    sensor_id = sensor,
                    reason = ?reason,
                    "the broker refused the reply to sensor {sensor} ({reason:?}); check its ACL for onboardd's login"
                );
            }
        }
        Ok(())
    }

    /// Every ok reply the broker has not acknowledged, published again (a new session).
    pub(super) async fn republish_undelivered(&self) -> Result<(), StoreError> {
        let todo = self.store.undelivered()?;
        if !todo.is_empty() {
            tracing::info!(
                count = todo.len(),
                "publishing again {} ok replies the broker has not acknowledged",
                todo.len()
            );
        }
        for (sensor, rec) in todo {
            self.deliver_ok(&sensor, &rec, &rec.route).await?;
        }
        Ok(())
    }
}

impl Engine {
    /// The delivery stage over the engine's state.
    pub(super) fn delivery(&self) -> Delivery<'_> {
        Delivery {
            store: &self.store,
            outbox: &self.outbox,
            clock: &self.clock,
            discovery_on: self.discovery.is_some(),
        }
    }

    /// Reacts to the MQTT session: status and republishing on every connection,
    /// delivery marks on PUBACK.
    pub async fn run_session_events(
        self: Arc<Self>,
        mut events: mpsc::UnboundedReceiver<SessionEvent>,
    ) {
        while let Some(ev) = events.recv().await {
            let result = match ev {
                SessionEvent::Connected { .. } => {
                    if let Err(e) = self.outbox.publisher.publish_status("online").await {
                        tracing::debug!(error = %e, "cannot queue the status: {e}");
                    }
                    self.delivery().republish_undelivered().await
                }
                SessionEvent::Acked(tag, outcome) => self.delivery().acked(tag, outcome),
            };
            if let Err(e) = result {
                self.fatal.trigger(e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::publisher::Recording;
    use super::*;
    use crate::device::Token;
    use crate::engine::records::{self, Transition};
    use crate::onboarding::Origin;
    use crate::proof::v2::AnnounceNonce;

    fn outbox(security: &str) -> (Outbox, Arc<Recording>) {
        let cfg = Config::from_toml(&format!(
            "[qubitro]\nproject_id = \"p\"\napi_key = \"k\"\n\
             [security]\nclaim_key = \"engine-delivery-unit-test-claim-key-0123\"\n{security}"
        ))
        .unwrap();
        let rec = Arc::new(Recording::default());
        (Outbox::new(&cfg, rec.clone()), rec)
    }

    fn creds() -> Credentials {
        Credentials {
            device_id: "dev-1".into(),
            device_token: Token("tok$1".into()),
        }
    }

    fn plain() -> Route {
        Route::default()
    }

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    fn v2_route() -> Route {
        Route {
            proven: true,
            nonce: AnnounceNonce::parse(NONCE),
            ..Route::default()
        }
    }

    fn body(reply: &Reply) -> serde_json::Value {
        serde_json::from_slice(&reply.to_bytes()).unwrap()
    }

    fn keys() -> ExchangeKeys {
        let claim = Secret::new("engine-delivery-unit-test-claim-key-0123");
        ExchangeKeys::derive(&SensorKey::derive(&claim, "s"))
    }

    #[test]
    fn a_plain_announce_gets_its_token_in_clear_only_when_claims_are_off() {
        let (open, _) = outbox("require_claim = false");
        let clear = body(&open.ok_reply("s", &plain(), &creds(), false).unwrap());
        assert_eq!(clear["device_token"], "tok$1", "{clear}");
        let (strict, _) = outbox("require_claim = true");
        assert!(strict.ok_reply("s", &plain(), &creds(), false).is_none());
    }

    #[test]
    fn a_route_proven_by_v1_without_a_nonce_gets_no_ok_reply_at_all() {
        let v1 = Route {
            proven: true,
            ..Route::default()
        };
        for security in ["require_claim = false", "require_claim = true"] {
            let (outbox, _) = outbox(security);
            assert!(outbox.ok_reply("s", &v1, &creds(), false).is_none());
        }
    }

    #[tokio::test]
    async fn a_v2_routes_reply_carries_a_mac_over_its_nonce_and_a_token_sealed_for_it() {
        let (open, sent) = outbox("require_claim = false");
        let reply = open.ok_reply("s", &v2_route(), &creds(), false).unwrap();
        assert!(!format!("{:?}", body(&reply)).contains("tok$1"));
        open.send("s", &v2_route(), reply, None).await;
        let payload = sent.sent.lock().unwrap()[0].payload.clone();
        let nonce = AnnounceNonce::parse(NONCE).unwrap();
        let r = keys().verify_reply(&payload, &nonce).unwrap();
        assert_eq!(r["nonce"], NONCE);
        assert!(r.get("device_token").is_none(), "{r:?}");
        let sealed = r["device_token_sealed"].as_str().unwrap();
        assert_eq!(
            keys().open_token("s", "dev-1", &nonce, sealed).unwrap(),
            "tok$1"
        );
        let other = AnnounceNonce::parse("ffeeddccbbaa99887766554433221100").unwrap();
        assert!(keys().open_token("s", "dev-1", &other, sealed).is_err());
    }

    #[tokio::test]
    async fn a_plain_routes_reply_goes_out_without_a_mac() {
        let (open, sent) = outbox("");
        open.send("s", &plain(), Reply::pending("s", 2, None), None)
            .await;
        let v: serde_json::Value =
            serde_json::from_slice(&sent.sent.lock().unwrap()[0].payload).unwrap();
        assert_eq!(v["status"], "pending");
        assert!(v.get("mac").is_none(), "{v}");
    }

    #[test]
    fn a_bridged_sensor_gets_no_token_at_all_but_its_data_topic() {
        let (open, _) = outbox("require_claim = false");
        let v = body(&open.ok_reply("s", &plain(), &creds(), true).unwrap());
        assert_eq!(v["bridged"], true);
        assert_eq!(v["data_topic"], "onboard/data/s");
        assert!(!v.to_string().contains("tok$1"), "{v}");
    }

    #[tokio::test]
    async fn a_reply_goes_to_the_routes_topic_with_its_correlation_data_and_tag() {
        let (outbox, rec) = outbox("");
        let route = Route {
            response_topic: Some("onboard/reply/s/r1".into()),
            correlation_data: Some(b"c1".to_vec()),
            ..Route::default()
        };
        let tag = DeliveryTag {
            sensor: "s".into(),
            generation: 3,
        };
        let reply = Reply::pending("s", 2, None);
        outbox.send("s", &route, reply, Some(tag.clone())).await;
        outbox
            .send("s", &Route::default(), Reply::pending("s", 2, None), None)
            .await;
        let sent = rec.sent.lock().unwrap().clone();
        assert_eq!(sent[0].topic, "onboard/reply/s/r1");
        assert_eq!(sent[0].correlation.as_deref(), Some(&b"c1"[..]));
        assert_eq!(sent[0].track, Some(tag));
        assert_eq!(sent[1].topic, "onboard/reply/s", "the default reply topic");
        assert_eq!(rec.replies()[1].1["status"], "pending");
    }

    #[test]
    fn only_a_created_records_reply_is_tracked_for_delivery() {
        let spec = crate::announce::test_spec();
        let pending = Record::pending(spec, Route::default(), 9, 1);
        assert_eq!(delivery_tag("s", &pending), None);
        let created = pending.created(creds(), Origin::Created, 2).unwrap();
        assert_eq!(
            delivery_tag("s", &created),
            Some(DeliveryTag {
                sensor: "s".into(),
                generation: 9
            })
        );
        assert_eq!(delivery_tag("s", &created.delivered(3).unwrap()), None);
    }

    #[test]
    fn an_onboarded_record_gets_its_ok_reply_tracked_only_until_delivered() {
        let pending = Record::pending(crate::announce::test_spec(), Route::default(), 9, 1);
        assert_eq!(ok_delivery("s", &pending, false), OkDelivery::NotYet);
        let created = pending.created(creds(), Origin::Created, 2).unwrap();
        let tag = delivery_tag("s", &created);
        assert!(tag.is_some());
        assert_eq!(
            ok_delivery("s", &created, true),
            OkDelivery::Publish {
                creds: &creds(),
                track: tag
            }
        );
        let delivered = created.delivered(3).unwrap();
        assert_eq!(
            ok_delivery("s", &delivered, false),
            OkDelivery::Publish {
                creds: &creds(),
                track: None
            }
        );
    }

    #[test]
    fn a_discovered_device_gets_no_reply_while_discovery_is_on() {
        let found = Record::pending_from(
            Provenance::Discovered,
            crate::announce::test_spec(),
            Route::default(),
            4,
            1,
        )
        .created(creds(), Origin::Created, 2)
        .unwrap();
        let tag = delivery_tag("ha-x", &found);
        assert_eq!(
            ok_delivery("ha-x", &found, true),
            OkDelivery::Settle { tag }
        );
        assert!(matches!(
            ok_delivery("ha-x", &found, false),
            OkDelivery::Publish { .. }
        ));
    }

    #[test]
    fn a_sensor_still_onboarding_is_told_to_wait_only_after_a_failure_or_when_its_route_cannot_be_kept(
    ) {
        let rec = Record::pending(crate::announce::test_spec(), Route::default(), 1, 1);
        let due = std::time::Duration::from_millis(2_100);
        assert_eq!(pending_wait(&rec, due, true), None, "its task answers");
        assert_eq!(pending_wait(&rec, due, false), Some(1));
        let failed = rec.retry_later(2_100, None, true, 2).unwrap();
        assert_eq!(
            pending_wait(&failed, due, true),
            Some(3),
            "whole seconds, rounded up"
        );
        assert_eq!(pending_wait(&failed, due, false), Some(3));
    }

    #[tokio::test]
    async fn each_new_session_publishes_again_exactly_the_replies_the_broker_has_not_acknowledged()
    {
        let (store, _dir) = crate::engine::records::tests::store();
        let (outbox, sent) = outbox("");
        let clock = Clock::System;
        let delivery = Delivery {
            store: &store,
            outbox: &outbox,
            clock: &clock,
            discovery_on: true,
        };
        let spec = crate::announce::test_spec;
        let fw = Record::pending(spec(), v2_route(), 1, 1);
        let found = Record::pending_from(Provenance::Discovered, spec(), Route::default(), 2, 1);
        for (sensor, rec) in [
            ("fw", fw),
            ("ha-x", found),
            ("waiting", Record::pending(spec(), Route::default(), 3, 1)),
        ] {
            store.insert_new(sensor, &rec).unwrap().unwrap();
            if sensor != "waiting" {
                let created = Transition::Created {
                    credentials: creds(),
                    origin: Origin::Created,
                    owner: None,
                };
                records::apply(&store, sensor, rec.generation, &created, 2).unwrap();
            }
        }

        delivery.republish_undelivered().await.unwrap();
        let first = sent.sent.lock().unwrap().clone();
        assert_eq!(
            first.len(),
            1,
            "only the firmware sensor's reply: {first:?}"
        );
        assert_eq!(first[0].topic, "onboard/reply/fw");
        let tag = first[0].track.clone().expect("tracked while Created");
        assert_eq!(
            store.get("ha-x").unwrap().unwrap().state.name(),
            "delivered",
            "a discovered device's onboarding ends without a reply"
        );

        delivery.acked(tag.clone(), Acked::NoSubscribers).unwrap();
        assert_eq!(store.get("fw").unwrap().unwrap().state.name(), "created");
        delivery.acked(tag.clone(), Acked::Delivered).unwrap();
        assert_eq!(store.get("fw").unwrap().unwrap().state.name(), "delivered");
        delivery.acked(tag, Acked::Delivered).unwrap();

        delivery.republish_undelivered().await.unwrap();
        assert_eq!(
            sent.sent.lock().unwrap().len(),
            1,
            "nothing left to publish again"
        );
    }
}
