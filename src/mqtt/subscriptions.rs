//! What the session subscribes to, given by whoever wires it: the transport knows
//! the filters and how each treats retained messages, not what they carry.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule, Subscribe};
use rumqttc::v5::mqttbytes::QoS;

use super::lock;

/// Subscriptions per SUBSCRIBE packet when following many state topics.
const FILTERS_PER_SUBSCRIBE: usize = 64;

/// The filters subscribed again at every ConnAck: the announce topic first, then the
/// others in the same SUBSCRIBE (one SUBACK says the gateway hears everything), and
/// the followed topics added at run time in their own SUBSCRIBEs.
pub struct Subscriptions {
    /// The announce topic: its SUBACK is what "subscribed to announces" means.
    announce: String,
    /// Everything in the announce's SUBSCRIBE, the announce filter first.
    filters: Vec<Filter>,
    /// Topics added while running (see [`Followed`]).
    followed: Followed,
}

impl Subscriptions {
    /// Starts with the announce topic, live messages only: a retained announce must
    /// not be acted on again at every subscribe, and one retained while we are
    /// subscribed keeps its retain flag (MQTT 5 clears it by default), so it can be
    /// dropped.
    pub fn new(announce_topic: &str) -> Subscriptions {
        Subscriptions {
            announce: announce_topic.to_string(),
            filters: vec![live_filter(announce_topic)],
            followed: Followed::default(),
        }
    }

    /// Adds a filter taken like the announce topic (no stored copy at subscribe,
    /// retain flag kept).
    pub fn live(mut self, filter: &str) -> Subscriptions {
        self.filters.push(live_filter(filter));
        self
    }

    /// Adds a filter whose retained messages are read again at every subscribe
    /// (Retain Handling 0): for messages that handling twice creates nothing.
    pub fn with_retained(mut self, filter: &str) -> Subscriptions {
        let mut f = Filter::new(filter.to_string(), QoS::AtLeastOnce);
        f.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
        self.filters.push(f);
        self
    }

    pub fn announce_topic(&self) -> &str {
        &self.announce
    }

    /// The filters of the announce's SUBSCRIBE, for logs.
    pub fn topics(&self) -> Vec<String> {
        self.filters.iter().map(|f| f.path.clone()).collect()
    }

    pub(super) fn followed(&self) -> &Followed {
        &self.followed
    }

    /// The SUBSCRIBE packets of one ConnAck: the announce's first, then the followed
    /// topics in chunks.
    pub(super) fn packets(&self) -> (Subscribe, Vec<Subscribe>) {
        let main = Subscribe::new_many(self.filters.clone(), None);
        let followed: Vec<Filter> = lock(&self.followed.0)
            .iter()
            .map(|t| state_filter(t))
            .collect();
        let rest = followed
            .chunks(FILTERS_PER_SUBSCRIBE)
            .map(|chunk| Subscribe::new_many(chunk.to_vec(), None))
            .collect();
        (main, rest)
    }
}

/// State topics followed at run time, shared by the client side (which adds them)
/// and the event-loop task (which subscribes to all of them at every ConnAck).
#[derive(Clone, Default)]
pub(super) struct Followed(Arc<Mutex<BTreeSet<String>>>);

impl Followed {
    /// Remembers `topic`; false when it was already followed.
    pub(super) fn insert(&self, topic: &str) -> bool {
        lock(&self.0).insert(topic.to_string())
    }
}

/// Where the announce SUBSCRIBE of the current connection stands: only its own
/// SUBACK, matched by packet id, says the gateway hears sensors (not a followed
/// topic's, nor one of an earlier connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) enum Announces {
    /// None outstanding (granted, refused, or not connected).
    #[default]
    Idle,
    /// Queued at the ConnAck, first in rumqttc's queue, not yet given a packet id.
    Queued,
    /// Sent with this packet id; its SUBACK is awaited.
    Sent(u16),
}

impl Announces {
    pub(super) fn on_queued(&mut self) {
        *self = Announces::Queued;
    }

    /// A SUBSCRIBE went out: the first after the ConnAck is the announce one.
    pub(super) fn on_outgoing_subscribe(&mut self, pkid: u16) {
        if *self == Announces::Queued {
            *self = Announces::Sent(pkid);
        }
    }

    /// Whether this SUBACK answers the announce SUBSCRIBE.
    pub(super) fn on_suback(&mut self, pkid: u16) -> bool {
        let main = *self == Announces::Sent(pkid);
        if main {
            *self = Announces::Idle;
        }
        main
    }

    pub(super) fn on_connection_lost(&mut self) {
        *self = Announces::Idle;
    }
}

fn live_filter(topic: &str) -> Filter {
    let mut filter = Filter::new(topic.to_string(), QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    filter.preserve_retain = true;
    filter
}

/// A followed state topic's subscription: no stored copy at subscribe (it would be
/// forwarded again at every reconnect) and, Retain As Published off, live states
/// arrive without the retain flag even from devices that retain them (ESPHome does
/// by default), so the bridge takes them.
pub(super) fn state_filter(topic: &str) -> Filter {
    let mut f = Filter::new(topic.to_string(), QoS::AtLeastOnce);
    f.retain_forward_rule = RetainForwardRule::Never;
    f.preserve_retain = false;
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_suback_of_this_connections_announce_subscribe_says_subscribed() {
        let mut a = Announces::default();
        a.on_queued();
        assert!(!a.on_suback(1), "nothing sent yet");
        a.on_outgoing_subscribe(4);
        a.on_outgoing_subscribe(5); // a followed topic's SUBSCRIBE
        assert!(!a.on_suback(5), "the followed topic's SUBACK");
        assert!(a.on_suback(4));
        assert!(!a.on_suback(4), "once");
        // The connection dies between SUBSCRIBE and SUBACK: a late SUBACK of that
        // packet id on the next connection is not the new one's.
        a.on_queued();
        a.on_outgoing_subscribe(7);
        a.on_connection_lost();
        a.on_queued();
        assert!(!a.on_suback(7));
        a.on_outgoing_subscribe(1);
        assert!(a.on_suback(1));
    }

    #[test]
    fn the_announce_filter_leads_its_subscribe_and_followed_topics_come_in_chunks() {
        let subs = Subscriptions::new("onboard/announce/+")
            .live("onboard/data/+")
            .with_retained("homeassistant/#");
        for n in 0..=FILTERS_PER_SUBSCRIBE {
            assert!(subs.followed().insert(&format!("state/{n}")));
        }
        assert!(!subs.followed().insert("state/0"), "already followed");
        let (main, rest) = subs.packets();
        let rules: Vec<(&str, RetainForwardRule, bool)> = main
            .filters
            .iter()
            .map(|f| {
                (
                    f.path.as_str(),
                    f.retain_forward_rule.clone(),
                    f.preserve_retain,
                )
            })
            .collect();
        assert_eq!(
            rules,
            vec![
                ("onboard/announce/+", RetainForwardRule::Never, true),
                ("onboard/data/+", RetainForwardRule::Never, true),
                (
                    "homeassistant/#",
                    RetainForwardRule::OnEverySubscribe,
                    false
                ),
            ]
        );
        let sizes: Vec<usize> = rest.iter().map(|s| s.filters.len()).collect();
        assert_eq!(sizes, vec![FILTERS_PER_SUBSCRIBE, 1]);
        assert!(rest[0]
            .filters
            .iter()
            .all(|f| !f.preserve_retain && f.retain_forward_rule == RetainForwardRule::Never));
    }
}
