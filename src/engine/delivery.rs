//! Replies to sensors, and the broker's word on them.
//!
//! An ok reply is tracked (it carries a [`DeliveryTag`]) while its sensor's record
//! is `Created`; the broker's PUBACK with reason Success moves the record to
//! `Delivered`. On every new MQTT connection every `Created` record's reply is
//! published again: tracking starts afresh with each connection, so nothing that
//! rumqttc did or dropped while reconnecting can leave a sensor marked delivered
//! that never got its token. Ok replies are idempotent, so a sensor may see one twice.
//!
//! Every ok reply is built by [`Outbox::ok_reply`], the one place that decides
//! whether the token is sealed: always when the route's announce proved its sensor,
//! and always while `security.require_claim` is on (a record stored before proofs
//! existed included), so a token never crosses the broker in clear unless the
//! operator turned proofs off and the announce carried none.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Engine;
use crate::bridge::DataTopic;
use crate::config::{Config, Secret};
use crate::device::Credentials;
use crate::mqtt::{Acked, DeliveryTag, Mqtt, SessionEvent};
use crate::onboarding::{Record, State};
use crate::proof::SensorKey;
use crate::reply::{Broker, OkHow, Reply, Route, TokenField};

/// Where replies go out.
pub struct Outbox {
    mqtt: Mqtt,
    /// `{sensor_id}` pattern of the default reply topic.
    reply_topic: String,
    /// Qubitro's broker, told to sensors in every ok reply.
    broker: Broker,
    /// Derives each sensor's key to seal its token.
    claim_key: Secret,
    /// Seal every ok reply, whatever its route says.
    require_claim: bool,
    /// Where bridged sensors publish their readings.
    data_topic: DataTopic,
}

impl Outbox {
    pub(super) fn new(cfg: &Config, mqtt: Mqtt) -> Outbox {
        Outbox {
            mqtt,
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

    pub fn mqtt(&self) -> &Mqtt {
        &self.mqtt
    }

    /// The ok reply of an onboarded sensor. A bridged sensor never gets its token,
    /// neither clear nor sealed: the gateway keeps it to forward the readings.
    pub(super) fn ok_reply(
        &self,
        sensor: &str,
        route: &Route,
        creds: &Credentials,
        bridged: bool,
    ) -> Reply {
        let how = if bridged {
            OkHow::Bridged {
                bridged: true,
                data_topic: self.data_topic.for_sensor(sensor),
            }
        } else {
            OkHow::Direct {
                token: self.token_field(sensor, route, creds),
                broker: self.broker.clone(),
            }
        };
        Reply::Ok {
            sensor_id: sensor.to_string(),
            device_id: creds.device_id.clone(),
            how,
            request_id: route.request_id.clone(),
        }
    }

    fn token_field(&self, sensor: &str, route: &Route, creds: &Credentials) -> TokenField {
        if route.proven || self.require_claim {
            let key = SensorKey::derive(&self.claim_key, sensor);
            TokenField::Sealed(key.seal(sensor, &creds.device_id, &creds.device_token.0))
        } else {
            TokenField::Clear(creds.device_token.clone())
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
        if let Err(e) = self
            .mqtt
            .publish(
                topic,
                reply.to_bytes(),
                route.correlation_data.clone(),
                track,
            )
            .await
        {
            tracing::debug!(sensor_id = sensor, error = %e, "cannot queue a reply: {e}");
        }
    }
}

/// The tag of an ok reply: only a `Created` record's reply is tracked (a delivered
/// one needs no proof again).
/// Made by discovery: a discovery id and the metadata discovery sets. Asked only
/// while discovery is on, when no announce may use such an id; with discovery off
/// a firmware sensor named `ha-…` gets its reply as before.
fn is_discovered(sensor: &str, rec: &Record) -> bool {
    crate::discovery::is_discovery_id(sensor) && rec.spec.metadata.contains_key("discovered_by")
}

pub(super) fn delivery_tag(sensor: &str, rec: &Record) -> Option<DeliveryTag> {
    matches!(rec.state, State::Created { .. }).then(|| DeliveryTag {
        sensor: sensor.to_string(),
        generation: rec.generation,
    })
}

impl Engine {
    /// Publishes a sensor's ok reply; tracked while its record is `Created`.
    pub(super) async fn deliver_ok(&self, sensor: &str, rec: &Record, route: &Route) {
        let Some(creds) = rec.credentials() else {
            return;
        };
        if self.discovery.is_some() && is_discovered(sensor, rec) {
            // Nobody listens for a discovered device's reply (it has no firmware of
            // ours): its onboarding ends with the device made, instead of a reply
            // published to no one again at every reconnect.
            if let Some(tag) = delivery_tag(sensor, rec) {
                if let Err(e) = self.acked(tag, Acked::Delivered) {
                    self.fatal.trigger(e);
                }
            }
            return;
        }
        let reply = self.outbox.ok_reply(sensor, route, creds, rec.bridged);
        self.outbox
            .send(sensor, route, reply, delivery_tag(sensor, rec))
            .await;
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
                    if let Err(e) = self.outbox.mqtt.publish_status("online").await {
                        tracing::debug!(error = %e, "cannot queue the status: {e}");
                    }
                    self.republish_undelivered().await
                }
                SessionEvent::Acked(tag, outcome) => self.acked(tag, outcome),
            };
            if let Err(e) = result {
                self.fatal.trigger(e);
                return;
            }
        }
    }

    fn acked(&self, tag: DeliveryTag, outcome: Acked) -> Result<(), crate::store::StoreError> {
        let sensor = tag.sensor.as_str();
        match outcome {
            Acked::Delivered => {
                let now = self.clock.wall_ms();
                // No flush: should it be lost, the reply is only published again.
                self.store.update(sensor, |r| {
                    (r.generation == tag.generation)
                        .then(|| r.delivered(now).ok())
                        .flatten()
                })?;
            }
            Acked::NoSubscribers => {
                tracing::debug!(
                    sensor_id = sensor,
                    "nobody is subscribed to sensor {sensor}'s reply topic; it is sent again when the sensor announces or on the next session"
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

    async fn republish_undelivered(&self) -> Result<(), crate::store::StoreError> {
        let todo = self.store.undelivered()?;
        if !todo.is_empty() {
            tracing::info!(
                count = todo.len(),
                "publishing again {} ok replies the broker has not acknowledged",
                todo.len()
            );
        }
        for (sensor, rec) in todo {
            self.deliver_ok(&sensor, &rec, &rec.route).await;
        }
        Ok(())
    }
}
