//! Which tracked publish a PUBACK acknowledges: a pure mirror of rumqttc's packet-id
//! bookkeeping, fed the event loop's events, with no socket (as rumqttc's own
//! `state.rs` beside its `eventloop.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Event, Request};
use rumqttc::Outgoing;

use super::{lock, Acked, DeliveryTag};

/// Mirrors rumqttc's packet-id bookkeeping to tell which tracked publish a PUBACK
/// acknowledges (see the module doc). Pure bookkeeping, unit-tested alone.
pub(super) struct Tracker {
    /// Shared with [`Mqtt`]: entries of requests in rumqttc's channel, oldest first.
    queue: Arc<Mutex<VecDeque<Option<DeliveryTag>>>>,
    /// Entries of the QoS 1 publishes in rumqttc's `pending` list, which it sends
    /// before anything from the channel.
    resend: VecDeque<Option<DeliveryTag>>,
    /// Sent, waiting for their PUBACK.
    inflight: HashMap<u16, Option<DeliveryTag>>,
    /// The publish rumqttc holds back after a packet-id collision.
    collided: Option<(u16, Option<DeliveryTag>)>,
    /// The outcome of the last PUBACK, taken by the caller.
    outcome: Option<(DeliveryTag, Acked)>,
}

impl Tracker {
    pub(super) fn new(queue: Arc<Mutex<VecDeque<Option<DeliveryTag>>>>) -> Tracker {
        Tracker {
            queue,
            resend: VecDeque::new(),
            inflight: HashMap::new(),
            collided: None,
            outcome: None,
        }
    }

    /// The entry of the next publish request rumqttc handles.
    fn next_entry(&mut self) -> Option<DeliveryTag> {
        match self.resend.pop_front() {
            Some(e) => e,
            None => lock(&self.queue).pop_front().flatten(),
        }
    }

    pub(super) fn on_outgoing_publish(&mut self, pkid: u16) {
        // While a publish is held back, rumqttc takes no new request from the
        // channel: a publish of that packet id is the held one going out.
        let entry = match self.collided.take() {
            Some((held, entry)) if held == pkid => entry,
            other => {
                self.collided = other;
                self.next_entry()
            }
        };
        self.inflight.insert(pkid, entry);
    }

    pub(super) fn on_collision(&mut self, pkid: u16) {
        let entry = self.next_entry();
        self.collided = Some((pkid, entry));
    }

    /// Records a PUBACK. Returns the held-back entry when rumqttc will not resend it
    /// by itself (a non-Success reason on the colliding packet id).
    pub(super) fn on_puback(
        &mut self,
        pkid: u16,
        reason: &PubAckReason,
    ) -> Option<Option<DeliveryTag>> {
        let outcome = match reason {
            PubAckReason::Success => Acked::Delivered,
            PubAckReason::NoMatchingSubscribers => Acked::NoSubscribers,
            other => Acked::Refused(*other),
        };
        let stuck = matches!(outcome, Acked::Refused(_));
        if let Some(Some(tag)) = self.inflight.remove(&pkid) {
            self.outcome = Some((tag, outcome));
        }
        match &self.collided {
            Some((held, _)) if *held == pkid && stuck => {
                self.collided.take().map(|(_, entry)| entry)
            }
            _ => None,
        }
    }

    /// A held-back publish was put at the front of rumqttc's resend list.
    pub(super) fn resend_first(&mut self, entry: Option<DeliveryTag>) {
        self.resend.push_front(entry);
    }

    pub(super) fn take_outcome(&mut self) -> Option<(DeliveryTag, Acked)> {
        self.outcome.take()
    }

    /// After a connection error rumqttc's `events` still hold what it buffered on the
    /// dead connection (`clean()` never clears them), and its `pending` holds, in
    /// order: what it had not resent yet, the publishes awaiting a PUBACK (their
    /// packet ids kept, including one whose write failed), and the requests drained
    /// from the channel (packet id 0). The events are applied and consumed first
    /// (else they would come back after the next ConnAck and shift every later
    /// PUBACK onto the previous request); the acknowledgements among them are
    /// returned. Then tracked publishes are taken out of `pending`; the untracked
    /// ones (pending/error replies, the status) stay, and their entries are what
    /// rumqttc will send first.
    pub(super) fn on_connection_lost(
        &mut self,
        events: &mut VecDeque<Event>,
        pending: &mut VecDeque<Request>,
    ) -> Vec<(DeliveryTag, Acked)> {
        // First what happened before it died: rumqttc buffers a publish's event
        // before writing it, and PUBACKs read in the same batch as the error.
        // Incoming publishes are dropped unacknowledged: the broker sends them again
        // in a kept session, and an ack queued now could answer another message in
        // a new one.
        let mut outcomes = Vec::new();
        for event in events.drain(..) {
            match event {
                Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                    self.on_outgoing_publish(pkid)
                }
                Event::Outgoing(Outgoing::AwaitAck(pkid)) => self.on_collision(pkid),
                Event::Incoming(Packet::PubAck(ack)) => {
                    self.on_puback(ack.pkid, &ack.reason);
                    outcomes.extend(self.take_outcome());
                }
                _ => {}
            }
        }
        let mut resend = std::mem::take(&mut self.resend);
        let mut inflight = std::mem::take(&mut self.inflight);
        // The held-back publish is dropped by the caller (never resent by rumqttc).
        self.collided = None;
        let mut queue = lock(&self.queue);
        let mut kept = VecDeque::new();
        pending.retain(|req| {
            let Request::Publish(p) = req else {
                return true;
            };
            if p.qos == QoS::AtMostOnce {
                return true;
            }
            let entry = if let Some(e) = resend.pop_front() {
                e
            } else if p.pkid != 0 {
                inflight.remove(&p.pkid).flatten()
            } else {
                queue.pop_front().flatten()
            };
            match entry {
                Some(_) => false,
                None => {
                    kept.push_back(None);
                    true
                }
            }
        });
        self.resend = kept;
        outcomes
    }

    /// rumqttc drops its whole resend list when the broker kept no session.
    pub(super) fn on_connack(&mut self, session_present: bool) {
        if !session_present {
            self.resend.clear();
        }
        self.inflight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{PubAck, Publish};

    fn tag(s: &str) -> Option<DeliveryTag> {
        Some(DeliveryTag {
            sensor: s.into(),
            generation: 1,
        })
    }

    fn tracker(entries: &[Option<DeliveryTag>]) -> Tracker {
        Tracker::new(Arc::new(Mutex::new(entries.iter().cloned().collect())))
    }

    fn acked(t: &mut Tracker, pkid: u16, reason: PubAckReason) -> Option<(String, Acked)> {
        t.on_puback(pkid, &reason);
        t.take_outcome().map(|(tag, a)| (tag.sensor, a))
    }

    fn publish(pkid: u16, qos: QoS) -> Request {
        let mut p = Publish::new("t", qos, "x", None);
        p.pkid = pkid;
        Request::Publish(p)
    }

    #[test]
    fn pubacks_are_credited_to_the_publish_that_got_that_packet_id() {
        let mut t = tracker(&[tag("a"), None, tag("b")]);
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        t.on_outgoing_publish(3);
        assert_eq!(
            acked(&mut t, 3, PubAckReason::Success),
            Some(("b".into(), Acked::Delivered))
        );
        assert_eq!(acked(&mut t, 2, PubAckReason::Success), None, "untracked");
        assert_eq!(
            acked(&mut t, 1, PubAckReason::Success),
            Some(("a".into(), Acked::Delivered))
        );
    }

    #[test]
    fn reason_codes_decide_delivery() {
        let mut t = tracker(&[tag("a"), tag("b")]);
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        assert_eq!(
            acked(&mut t, 1, PubAckReason::NoMatchingSubscribers),
            Some(("a".into(), Acked::NoSubscribers))
        );
        assert_eq!(
            acked(&mut t, 2, PubAckReason::NotAuthorized),
            Some(("b".into(), Acked::Refused(PubAckReason::NotAuthorized)))
        );
    }

    #[test]
    fn a_collided_publish_is_credited_when_it_finally_goes_out() {
        // Window of 2: 1 and 2 in flight, 2 acked first, the next request gets pkid 1
        // again and collides; it goes out once 1 is acked.
        let mut t = tracker(&[tag("a"), tag("b"), tag("c"), tag("d")]);
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        assert_eq!(acked(&mut t, 2, PubAckReason::Success).unwrap().0, "b");
        t.on_collision(1); // "c" held back
        assert_eq!(acked(&mut t, 1, PubAckReason::Success).unwrap().0, "a");
        t.on_outgoing_publish(1); // the held "c" goes out
        t.on_outgoing_publish(2); // then "d" from the channel
        assert_eq!(acked(&mut t, 1, PubAckReason::Success).unwrap().0, "c");
        assert_eq!(acked(&mut t, 2, PubAckReason::Success).unwrap().0, "d");
    }

    #[test]
    fn a_collided_publish_refused_ack_is_handed_back_for_resending() {
        let mut t = tracker(&[tag("a"), tag("c")]);
        t.on_outgoing_publish(1);
        t.on_collision(1);
        let held = t.on_puback(1, &PubAckReason::NotAuthorized);
        assert_eq!(held, Some(tag("c")));
        t.resend_first(held.unwrap());
        t.on_outgoing_publish(1);
        assert_eq!(acked(&mut t, 1, PubAckReason::Success).unwrap().0, "c");
    }

    #[test]
    fn after_a_lost_connection_tracked_publishes_leave_the_resend_queue() {
        // Sent and unacknowledged: pkid 1 ("a", tracked), 2 (untracked). Still in the
        // channel when the connection broke: "c" (tracked), then an untracked one.
        let mut t = tracker(&[tag("a"), None, tag("c"), None]);
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        let mut pending: VecDeque<Request> = VecDeque::from(vec![
            publish(1, QoS::AtLeastOnce),
            publish(2, QoS::AtLeastOnce),
            publish(0, QoS::AtLeastOnce),
            publish(0, QoS::AtMostOnce),
            publish(0, QoS::AtLeastOnce),
        ]);
        t.on_connection_lost(&mut VecDeque::new(), &mut pending);
        let left: Vec<(u16, QoS)> = pending
            .iter()
            .map(|r| match r {
                Request::Publish(p) => (p.pkid, p.qos),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            left,
            vec![
                (2, QoS::AtLeastOnce),
                (0, QoS::AtMostOnce),
                (0, QoS::AtLeastOnce)
            ]
        );
        // A request queued after the break, then the session resumes: the two kept
        // untracked publishes go out first, then the new one, each credited right.
        lock(&t.queue).push_back(tag("e"));
        t.on_connack(true);
        t.on_outgoing_publish(2);
        t.on_outgoing_publish(3);
        t.on_outgoing_publish(4);
        assert_eq!(acked(&mut t, 2, PubAckReason::Success), None);
        assert_eq!(acked(&mut t, 3, PubAckReason::Success), None);
        assert_eq!(acked(&mut t, 4, PubAckReason::Success).unwrap().0, "e");
    }

    #[test]
    fn a_new_session_forgets_what_rumqttc_would_have_resent() {
        let mut t = tracker(&[None, tag("e")]);
        t.on_outgoing_publish(1);
        let mut pending = VecDeque::from(vec![publish(1, QoS::AtLeastOnce)]);
        t.on_connection_lost(&mut VecDeque::new(), &mut pending);
        assert_eq!(pending.len(), 1);
        t.on_connack(false); // rumqttc cleared `pending`
        t.on_outgoing_publish(1);
        assert_eq!(acked(&mut t, 1, PubAckReason::Success).unwrap().0, "e");
    }

    #[test]
    fn a_second_error_before_the_connack_keeps_the_mirror_in_step() {
        let mut t = tracker(&[None, tag("a")]);
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        let mut pending = VecDeque::from(vec![
            publish(1, QoS::AtLeastOnce),
            publish(2, QoS::AtLeastOnce),
        ]);
        t.on_connection_lost(&mut VecDeque::new(), &mut pending);
        assert_eq!(pending.len(), 1);
        // The reconnect fails before any ConnAck: rumqttc's pending is unchanged.
        t.on_connection_lost(&mut VecDeque::new(), &mut pending);
        assert_eq!(pending.len(), 1);
        assert_eq!(t.resend.len(), 1);
    }

    #[test]
    fn a_publish_whose_write_failed_is_credited_by_its_buffered_event_not_by_the_next_puback() {
        // "a" got packet id 1 and its event was buffered, then the write failed; "b"
        // was still in the request channel. rumqttc moved both into `pending`.
        let mut t = tracker(&[tag("a"), tag("b")]);
        let mut events = VecDeque::from(vec![Event::Outgoing(Outgoing::Publish(1))]);
        let mut pending = VecDeque::from(vec![
            publish(1, QoS::AtLeastOnce),
            publish(0, QoS::AtLeastOnce),
        ]);
        assert!(t.on_connection_lost(&mut events, &mut pending).is_empty());
        assert!(
            events.is_empty(),
            "the dead connection's events are consumed"
        );
        assert!(
            pending.is_empty(),
            "both are tracked: the engine republishes them"
        );
        // The session resumes; the engine republishes "a" then "b", and the broker
        // refuses "a": the refusal is "a"'s, and "b" alone is delivered.
        lock(&t.queue).extend([tag("a"), tag("b")]);
        t.on_connack(true);
        t.on_outgoing_publish(2);
        t.on_outgoing_publish(3);
        assert_eq!(
            acked(&mut t, 2, PubAckReason::NotAuthorized),
            Some(("a".into(), Acked::Refused(PubAckReason::NotAuthorized)))
        );
        assert_eq!(
            acked(&mut t, 3, PubAckReason::Success),
            Some(("b".into(), Acked::Delivered))
        );
    }

    #[test]
    fn pubacks_read_before_the_connection_died_are_still_reported() {
        let mut t = tracker(&[tag("a")]);
        t.on_outgoing_publish(1);
        let mut ack = PubAck::new(1, None);
        ack.reason = PubAckReason::NotAuthorized;
        let mut events = VecDeque::from(vec![Event::Incoming(Packet::PubAck(ack))]);
        let outcomes = t.on_connection_lost(&mut events, &mut VecDeque::new());
        let outcomes: Vec<(String, Acked)> = outcomes
            .into_iter()
            .map(|(tag, a)| (tag.sensor, a))
            .collect();
        assert_eq!(
            outcomes,
            vec![("a".into(), Acked::Refused(PubAckReason::NotAuthorized))]
        );
    }
}
