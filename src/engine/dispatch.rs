//! From announce to decision, in arrival order.
//!
//! The dispatcher parses and checks each announce, answers known sensors from the
//! store (no disk write), and records a new sensor as `Pending`, which starts its
//! onboarding task. The acker acknowledges announces to the broker in arrival
//! order, each only once its record is on disk (shared group-commit flushes): an
//! announce is either durably recorded or still the broker's to deliver again, so
//! none is lost. Acknowledging before the cloud call (not after) keeps the broker's
//! in-flight window free, so the cloud in-flight limit is what bounds throughput.
//! A bridged reading's ack waits for its ticket instead: Qubitro's PUBACK, or its
//! spill to the buffer made durable (see `crate::bridge::held`).

use std::borrow::Cow;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::acker::AckItem;
use super::admit::{Admission, Admitted, Refusal};
use super::announce_route::route_from_properties;
use super::delivery::{delivery_tag, pending_wait, Outbox};
use super::discovered::Discovered;
use super::inbound::{Inbound, Routes};
use super::onboardings::{Launch, Onboardings};
use super::Fatal;
use crate::announce::{self, Announce, AnnounceError};
use crate::bridge::{AcceptError, Bridge, Ticket};
use crate::clock::Clock;
use crate::config::Config;
use crate::heartbeat::Heartbeat;
use crate::metrics::{self, AnnounceResult};
use crate::mqtt::{DeliveryTag, Inbox};
use crate::onboarding::{Provenance, Record};
use crate::proof::v2::AnnounceNonce;
use crate::reply::{Reply, ReplyCode, Route};
use crate::security::{Authenticated, Denial, Gatekeeper};
use crate::store::{Store, StoreError};

/// A reply decided by the dispatcher.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) sensor: String,
    pub(super) route: Route,
    pub(super) reply: Reply,
    pub(super) track: Option<DeliveryTag>,
}

/// What the dispatcher decided for one announce.
#[derive(Debug, Default)]
pub(super) struct Decision {
    /// Write that must be on disk before the ack (0: none).
    pub(super) seq: u64,
    /// Reply to publish right away.
    pub(super) answer: Option<Answer>,
    /// Bridged readings to settle before the ack.
    pub(super) tickets: Vec<Ticket>,
}

impl Decision {
    /// Nothing to answer; the ack waits for write `seq`.
    pub(super) fn wait_for(seq: u64) -> Decision {
        Decision {
            seq,
            ..Decision::default()
        }
    }
}

/// Whether an authenticated announce made a known sensor's record.
#[derive(Debug, Clone, Copy)]
enum Made {
    Known(bool),
    /// Its credentials shortcut predates the flag: the record says.
    ReadTheRecord,
}

/// The dispatcher, and everything it reads or changes.
pub(super) struct Dispatch<'a> {
    /// Announce limits, the reply topic pattern, the gateway id.
    pub(super) cfg: &'a Config,
    pub(super) clock: &'a Clock,
    /// Known sensors are answered from it; bridging is written to it.
    pub(super) store: &'a Store,
    /// What each inbound topic is.
    pub(super) routes: &'a Routes,
    /// Claims and rules, checked for known sensors too.
    pub(super) gate: &'a Gatekeeper,
    /// What a newcomer meets before it is recorded.
    pub(super) admission: Admission<'a>,
    /// The routes a pending sensor's task owes an answer.
    pub(super) onboardings: &'a Onboardings,
    /// Starts the onboarding of an admitted, or still pending, sensor.
    pub(super) launch: &'a dyn Launch,
    /// Replies.
    pub(super) outbox: &'a Outbox,
    /// Buffers readings of bridged sensors (`None`: `[bridge] enabled = false`).
    pub(super) bridge: Option<&'a Bridge>,
    /// Discovery configs and followed state (`None`: discovery off).
    pub(super) discovery: Option<Discovered<'a>>,
}

impl Dispatch<'_> {
    /// Handles announces in arrival order until `stop` (or a fatal error).
    pub(super) async fn run(
        &self,
        mut inbox: Inbox,
        acks: mpsc::Sender<AckItem>,
        heartbeat: &Heartbeat,
        stop: &CancellationToken,
        fatal: &Fatal,
    ) {
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            heartbeat.beat_dispatcher();
            let publish = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                p = inbox.recv() => match p { Some(p) => p, None => break },
                _ = beat.tick() => continue,
            };
            let arrived = self.clock.now();
            let Decision {
                seq,
                answer,
                tickets,
            } = match self.dispatch(&publish) {
                Ok(d) => d,
                Err(e) => {
                    fatal.trigger(e);
                    break;
                }
            };
            // QoS 0 has nothing to acknowledge, but a held reading still goes to the
            // acker, which spills it at its deadline.
            if publish.qos != QoS::AtMostOnce || tickets.iter().any(Ticket::is_held) {
                let item = AckItem {
                    publish,
                    seq,
                    tickets,
                };
                tokio::select! {
                    r = acks.send(item) => if r.is_err() { break },
                    _ = stop.cancelled() => break,
                }
            }
            // Awaited here, not spawned: a flood then slows us down at the broker
            // (unacknowledged announces) instead of piling up tasks in memory.
            if let Some(a) = answer {
                tokio::select! {
                    _ = self.outbox.send(&a.sensor, &a.route, a.reply, a.track) => {}
                    _ = stop.cancelled() => break,
                }
                metrics::announce_replied(self.clock.now().saturating_duration_since(arrived));
            }
        }
    }

    /// Decides what one announce gets: the write to wait for before the ack, and
    /// the reply to send now, if any.
    pub(super) fn dispatch(&self, p: &Publish) -> Result<Decision, StoreError> {
        let topic = String::from_utf8_lossy(&p.topic);
        let followed = |t: &str| self.discovery.as_ref().is_some_and(|d| d.follows(t));
        let sensor = match self.routes.classify(&topic, followed) {
            Inbound::Reading { sensor } => match self.bridge {
                Some(bridge) => return self.reading(bridge, sensor, p),
                None => return Ok(Decision::default()),
            },
            Inbound::DiscoveryConfig { source, prefix } => {
                return match &self.discovery {
                    Some(d) => d.config(source, prefix, &topic, p),
                    None => Ok(Decision::default()),
                };
            }
            Inbound::FollowedState => {
                return match (&self.discovery, self.bridge) {
                    (Some(d), Some(bridge)) => d.reading(bridge, &topic, p),
                    _ => Ok(Decision::default()),
                };
            }
            Inbound::DiscoveryOther => return Ok(Decision::default()),
            Inbound::Unroutable => {
                metrics::announce();
                metrics::announce_result(AnnounceResult::Dropped);
                metrics::error();
                let shown: String = topic.chars().take(128).collect();
                tracing::warn!(
                    topic = %shown,
                    "announce on {shown} without a valid sensor id (1-64 of A-Z a-z 0-9 . _ : -); dropped, no safe topic to answer on"
                );
                return Ok(Decision::default());
            }
            Inbound::Announce { sensor } => sensor,
        };
        metrics::announce();
        let mut proven = None;
        let decision = self.announce(sensor, &topic, p, &mut proven)?;
        self.saw(sensor, &decision, proven.as_ref())?;
        metrics::announce_result(result_of(p, &decision));
        Ok(decision)
    }

    /// Keeps the time a known sensor was heard from (`devices list`, `prune`).
    /// A refused announce (no valid proof) is anyone's, a repeat of the sensor's
    /// last answered announce may be anyone's replay, and unknown ids are not kept,
    /// so a flood of made-up ids costs no memory.
    fn saw(
        &self,
        sensor: &str,
        decision: &Decision,
        nonce: Option<&AnnounceNonce>,
    ) -> Result<(), StoreError> {
        let refused = matches!(&decision.answer, Some(a) if matches!(a.reply, crate::reply::Reply::Error { .. }));
        // The shortcut first: a shortcut never outlives its record, and reading the
        // record's tree for every re-announce would fill sled's cache with records.
        if !refused && (self.store.has_shortcut(sensor)? || self.store.knows(sensor)?) {
            self.store.saw_announce(
                sensor,
                nonce.map(|n| n.as_str()),
                self.clock.wall_ms(),
                self.clock.now(),
            )?;
        }
        Ok(())
    }

    /// An announce of `sensor`: refused, answered from the store, or admitted;
    /// `proven` gets its nonce once its v2 proof verified.
    fn announce(
        &self,
        sensor: &str,
        topic: &str,
        p: &Publish,
        proven: &mut Option<AnnounceNonce>,
    ) -> Result<Decision, StoreError> {
        let cfg = self.cfg;
        // A retained announce is a stale copy the broker replays to every new
        // subscriber: acting on it would bring back a forgotten sensor (and create a
        // new cloud device) at each subscribe. Never parsed, never answered.
        if p.retain {
            metrics::retained_dropped();
            tracing::warn!(
                sensor_id = sensor,
                outcome = "dropped",
                "retained announce of sensor {sensor} dropped: announces must be published without the retain flag (clear it with \
                    mosquitto_pub -t {topic} -r -n)"
            );
            return Ok(Decision::default());
        }
        // Where to answer, even a refusal; properties too large to honour are refused
        // once the proof is known, so that refusal can carry a MAC.
        let (mut route, oversized) =
            route_from_properties(p.properties.as_ref(), &cfg.mqtt.reply_topic, sensor);
        if p.payload.len() > cfg.announce.max_payload_bytes {
            let e = AnnounceError::PayloadTooLarge {
                size: p.payload.len(),
                max: cfg.announce.max_payload_bytes,
            };
            return Ok(self.reject(sensor, route, e.reply_code(), e.to_string(), None));
        }
        // The proof before anything in the body is read; a refusal here answers no
        // exchange, so its reply carries no MAC (the route has no nonce).
        let body = match self.gate.authenticate(sensor, &p.payload) {
            Ok(Authenticated::V2 { body, nonce }) => {
                route.proven = true;
                *proven = Some(nonce.clone());
                route.nonce = Some(nonce);
                Cow::Owned(body.into_bytes())
            }
            Ok(Authenticated::Plain) => Cow::Borrowed(&p.payload[..]),
            Err(denied) => {
                route.request_id = announce::peek_request_id(&p.payload);
                return Ok(self.refuse(sensor, route, denied));
            }
        };
        // Refusals from here on answer an exchange the sensor proved: they carry a MAC.
        if self.discovery.is_some() && crate::discovery::is_discovery_id(sensor) {
            // Those ids belong to discovered devices: a firmware announcing one
            // could take over a device it does not own.
            route.request_id = announce::peek_request_id(&body);
            let message = "sensor ids beginning with ha- or tasmota- are reserved for discovered devices while discovery is on".to_string();
            return Ok(self.reject(sensor, route, ReplyCode::InvalidField, message, None));
        }
        if let Some(field) = oversized {
            // Answered on the default topic, without either property.
            route.request_id = announce::peek_request_id(&body);
            return Ok(self.reject(sensor, route, ReplyCode::InvalidField, field, None));
        }

        let parsed = announce::parse(
            sensor,
            &body,
            cfg.announce.max_payload_bytes,
            &cfg.gateway_id,
        );
        let ann = match parsed {
            Ok(a) => a,
            Err(e) => {
                route.request_id = announce::peek_request_id(&body);
                return Ok(self.reject(sensor, route, e.reply_code(), e.to_string(), None));
            }
        };
        route.request_id = ann.request_id.clone();
        if ann.bridge && self.bridge.is_none() {
            return Ok(self.reject(
                sensor,
                route,
                ReplyCode::InvalidField,
                "bridge: this gateway does not forward readings ([bridge] enabled = false)".into(),
                None,
            ));
        }
        self.answer(sensor, ann, route)
    }

    /// An announce that passed its proof (or is plain, proofs being off): answered
    /// from the record as it was made (an announce changes nothing recorded: its
    /// `bridge` and device fields count only when the record is made), or admitted.
    fn answer(&self, sensor: &str, ann: Announce, route: Route) -> Result<Decision, StoreError> {
        // Known and onboarded: the compact credentials tree answers (no full record,
        // no disk write).
        if let Some(shortcut) = self.store.credentials(sensor)? {
            let made = match shortcut.made_proven {
                Some(proven) => Made::Known(proven),
                None => Made::ReadTheRecord,
            };
            if let Err(denied) = self.known_may_announce(sensor, &ann, &route, made)? {
                return Ok(self.refuse(sensor, route, denied));
            }
            // Its reply still waits for the broker: this one is tracked too.
            let track = if self.store.is_undelivered(sensor)? {
                self.store
                    .get(sensor)?
                    .and_then(|r| delivery_tag(sensor, &r))
            } else {
                None
            };
            let bridged = self.store.is_bridged(sensor)?;
            metrics::cached_reply();
            tracing::debug!(sensor_id = sensor, "known sensor; answering from the store");
            let reply = self
                .outbox
                .ok_reply(sensor, &route, &shortcut.creds, bridged);
            return Ok(self.ok_answer(sensor, route, reply, track));
        }
        let Some(rec) = self.store.get(sensor)? else {
            return self.admit_announced(sensor, ann, route);
        };
        let made = Made::Known(rec.route.proven);
        if let Err(denied) = self.known_may_announce(sensor, &ann, &route, made)? {
            return Ok(self.refuse(sensor, route, denied));
        }
        match rec.credentials() {
            Some(creds) => {
                // Created, but without the shortcut (a crash between the two writes).
                let reply = self.outbox.ok_reply(sensor, &route, creds, rec.bridged);
                Ok(self.ok_answer(sensor, route, reply, delivery_tag(sensor, &rec)))
            }
            None => Ok(self.join_pending(sensor, &rec, route)),
        }
    }

    /// The rules a recorded sensor's announce still meets (allow and deny lists), and
    /// a plain announce never answers for a sensor whose record an authenticated
    /// announce made: proofs being off must not hand such a sensor's token to anyone.
    fn known_may_announce(
        &self,
        sensor: &str,
        ann: &Announce,
        route: &Route,
        made: Made,
    ) -> Result<Result<(), Denial>, StoreError> {
        if let Err(denied) = self.gate.check_rules(ann, true) {
            return Ok(Err(denied));
        }
        if route.proven {
            return Ok(Ok(()));
        }
        let made_authenticated = match made {
            Made::Known(proven) => proven,
            // Only for shortcuts written before they said it: a whole record read.
            Made::ReadTheRecord => self.store.get(sensor)?.is_some_and(|r| r.route.proven),
        };
        Ok(match made_authenticated {
            true => Err(Denial {
                code: ReplyCode::Unauthorized,
                message: "this sensor was onboarded with a proof: only its protocol v2 announces are answered".into(),
                retry_after: None,
            }),
            false => Ok(()),
        })
    }

    /// The ok reply to an announce, when its route may carry one.
    fn ok_answer(
        &self,
        sensor: &str,
        route: Route,
        reply: Option<Reply>,
        track: Option<DeliveryTag>,
    ) -> Decision {
        Decision {
            seq: 0,
            tickets: Vec::new(),
            answer: reply.map(|reply| Answer {
                sensor: sensor.to_string(),
                route,
                reply,
                track,
            }),
        }
    }

    /// A sensor the store does not know: [`Admission`] (its proof is checked).
    fn admit_announced(
        &self,
        sensor: &str,
        ann: Announce,
        route: Route,
    ) -> Result<Decision, StoreError> {
        let now = (self.clock.now(), self.clock.wall_ms());
        let admitted =
            self.admission
                .admit(ann, route.clone(), Provenance::Firmware, now.0, now.1)?;
        Ok(match admitted {
            Ok(Admitted::New { seq }) => {
                self.onboardings.announced(sensor, now.0);
                tracing::info!(sensor_id = sensor, "new sensor; onboarding {sensor}");
                self.launch.launch(sensor.to_string(), Duration::ZERO);
                Decision::wait_for(seq)
            }
            Ok(Admitted::Raced { seq }) => Decision::wait_for(seq),
            Err(Refusal::Rules(denied)) => self.refuse(sensor, route, denied),
            Err(Refusal::RejectedRecently { left, why }) => {
                let message = format!(
                    "Qubitro rejected this same device moments ago ({why}); change the announce, or ask again later"
                );
                self.reject(
                    sensor,
                    route,
                    ReplyCode::RejectedByCloud,
                    message,
                    Some(left),
                )
            }
        })
    }

    /// A reading on a sensor's data topic: taken by the bridge when the sensor is
    /// bridged (the ack waits for its ticket), else dropped and counted.
    /// Every reading is acknowledged, refused ones too: a poison reading must not
    /// come back at every reconnect.
    fn reading(&self, bridge: &Bridge, sensor: &str, p: &Publish) -> Result<Decision, StoreError> {
        if !self.store.is_bridged(sensor)? {
            bridge.refuse_not_bridged(sensor);
            return Ok(Decision::default());
        }
        self.store
            .saw(sensor, self.clock.wall_ms(), self.clock.now())?;
        match bridge.accept(sensor, &p.payload, p.retain) {
            Ok(accepted) => Ok(Decision {
                tickets: vec![accepted.ticket],
                ..Decision::default()
            }),
            Err(AcceptError::Store(e)) => Err(e),
            // Counted and logged by the bridge.
            Err(_) => Ok(Decision::default()),
        }
    }

    /// A pending sensor announced again: its task answers this route too, unless the
    /// cloud has failed already or too many answers are owed (then: ask again later).
    fn join_pending(&self, sensor: &str, rec: &Record, route: Route) -> Decision {
        // Should no task be running for it, this starts one; otherwise a no-op.
        let due = self.onboardings.until_due(rec, self.clock.wall_ms());
        self.launch.launch(sensor.to_string(), due);
        let route_kept = route == rec.route || self.onboardings.add_waiting(sensor, route.clone());
        let retry_after_s = pending_wait(rec, due, route_kept);
        Decision {
            // Its record may not be flushed yet: this ack waits for the same flush.
            seq: self.store.last_write(),
            tickets: Vec::new(),
            answer: retry_after_s.map(|secs| Answer {
                sensor: sensor.to_string(),
                reply: Reply::pending(sensor, secs, route.request_id.clone()),
                route,
                track: None,
            }),
        }
    }

    fn refuse(&self, sensor: &str, route: Route, denied: Denial) -> Decision {
        self.reject(
            sensor,
            route,
            denied.code,
            denied.message,
            denied.retry_after,
        )
    }

    fn reject(
        &self,
        sensor: &str,
        route: Route,
        code: ReplyCode,
        message: String,
        retry_after: Option<Duration>,
    ) -> Decision {
        metrics::error();
        tracing::warn!(sensor_id = sensor, code = code.as_str(), detail = %message, outcome = "refused",
            retry_after_s = retry_after.map(|d| d.as_secs()), "announce of sensor \
            {sensor} refused ({code}): {message}");
        let request_id = route.request_id.clone();
        let mut reply = Reply::error(sensor, code, message, request_id);
        if let Some(wait) = retry_after {
            reply = reply.retry_after(wait);
        }
        Decision {
            seq: 0,
            tickets: Vec::new(),
            answer: Some(Answer {
                sensor: sensor.to_string(),
                route,
                reply,
                track: None,
            }),
        }
    }
}

/// What an announce came to, for /metrics.
fn result_of(p: &Publish, d: &Decision) -> AnnounceResult {
    match d.answer.as_ref().map(|a| &a.reply) {
        Some(Reply::Ok { .. }) => AnnounceResult::Ok,
        Some(Reply::Pending { .. }) => AnnounceResult::Pending,
        Some(Reply::Error { code, .. }) => AnnounceResult::Refused(*code),
        None if p.retain => AnnounceResult::Dropped,
        None => AnnounceResult::Onboarding,
    }
}

#[cfg(test)]
mod tests;
