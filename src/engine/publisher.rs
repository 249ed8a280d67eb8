//! The engine's one door to the local broker: replies out, acknowledgements of
//! what came in, the status, and the state topics discovery follows.
//!
//! A trait rather than the MQTT handle itself, so the engine's rules (which reply
//! for which record, when an ack may go) are unit-tested with a recording
//! publisher and no broker; [`Mqtt`] implements it here, so `mqtt` knows nothing
//! of the engine.

use std::future::Future;
use std::pin::Pin;

use rumqttc::v5::mqttbytes::v5::Publish;

use crate::mqtt::{DeliveryTag, Mqtt, MqttError};

/// A publisher's pending work (boxed: the engine holds `dyn Publisher`).
pub type Pending<'a> = Pin<Box<dyn Future<Output = Result<(), MqttError>> + Send + 'a>>;

/// One reply on its way out (QoS 1, never retained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 Correlation Data of the announce answered, echoed.
    pub correlation: Option<Vec<u8>>,
    /// Report the broker's acknowledgement of it (an ok reply of a `Created` record).
    pub track: Option<DeliveryTag>,
}

pub trait Publisher: Send + Sync {
    /// Queues a reply. Waits while the broker's request queue is full: callers race
    /// it with their own stop signal.
    fn publish(&self, reply: Outgoing) -> Pending<'_>;
    /// Acknowledges an inbound message; only once what it changed is durable.
    fn ack<'a>(&'a self, publish: &'a Publish) -> Pending<'a>;
    /// Publishes the retained gateway status ("online").
    fn publish_status(&self, status: &'static str) -> Pending<'_>;
    /// Follows one more state topic, now and after every reconnect; never waits.
    fn follow(&self, topic: &str);
}

impl Publisher for Mqtt {
    fn publish(&self, r: Outgoing) -> Pending<'_> {
        Box::pin(Mqtt::publish(
            self,
            r.topic,
            r.payload,
            r.correlation,
            r.track,
        ))
    }

    fn ack<'a>(&'a self, publish: &'a Publish) -> Pending<'a> {
        Box::pin(Mqtt::ack(self, publish))
    }

    fn publish_status(&self, status: &'static str) -> Pending<'_> {
        Box::pin(Mqtt::publish_status(self, status))
    }

    fn follow(&self, topic: &str) {
        Mqtt::follow(self, topic)
    }
}

/// What the engine asked of the broker, for unit tests.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Recording {
    pub(crate) sent: std::sync::Mutex<Vec<Outgoing>>,
    pub(crate) acked: std::sync::Mutex<Vec<String>>,
    pub(crate) followed: std::sync::Mutex<Vec<String>>,
}

#[cfg(test)]
impl Recording {
    /// The replies sent so far, as JSON, with their topics.
    pub(crate) fn replies(&self) -> Vec<(String, serde_json::Value)> {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .map(|o| (o.topic.clone(), serde_json::from_slice(&o.payload).unwrap()))
            .collect()
    }
}

#[cfg(test)]
impl Publisher for Recording {
    fn publish(&self, reply: Outgoing) -> Pending<'_> {
        self.sent.lock().unwrap().push(reply);
        Box::pin(async { Ok(()) })
    }

    fn ack<'a>(&'a self, publish: &'a Publish) -> Pending<'a> {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        self.acked.lock().unwrap().push(topic);
        Box::pin(async { Ok(()) })
    }

    fn publish_status(&self, _status: &'static str) -> Pending<'_> {
        Box::pin(async { Ok(()) })
    }

    fn follow(&self, topic: &str) {
        self.followed.lock().unwrap().push(topic.to_string());
    }
}
