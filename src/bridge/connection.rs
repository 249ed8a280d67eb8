//! One uplink connection's plumbing: the client seam a session drives
//! ([`UplinkClient`], rumqttc in the daemon, a recording fake in unit tests), the
//! task that polls rumqttc's event loop, and the orderly close.

use std::time::Duration;

use std::collections::VecDeque;

use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::mpsc;

/// Readings outstanding (sent, not yet acknowledged) per connection when the
/// broker's CONNACK states no Receive Maximum; also the room reserved up front.
pub const WINDOW: usize = 16;
/// The most readings one connection keeps outstanding, whatever Receive Maximum the
/// broker allows: rumqttc preallocates a slot per in-flight publish and connection.
pub const MAX_WINDOW: usize = 32;

/// Readings a connection keeps outstanding, from the Receive Maximum in the
/// broker's CONNACK (MQTT 5 §3.2.2.3.3; absent means 65 535), capped at
/// [`MAX_WINDOW`]. rumqttc's own in-flight limit becomes the same number (the
/// smaller of the Receive Maximum and `MAX_WINDOW`), and it hands out packet ids
/// 1..=limit in turn: with never more than that many outstanding, acknowledged in
/// order, the id a publish gets was acknowledged before, so no collision occurs.
pub(super) fn window_for(receive_maximum: Option<u16>) -> usize {
    receive_maximum.map_or(MAX_WINDOW, |r| usize::from(r).clamp(1, MAX_WINDOW))
}

/// How long a closing connection waits for its DISCONNECT to go out.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The events of one connection's event loop, in the order rumqttc returned them.
pub(super) type Events = mpsc::UnboundedReceiver<Ev>;

/// What a session reads of one event of its event loop. rumqttc's `Event` can hold
/// any packet with all its properties (hundreds of bytes), and the channel to the
/// session allocates its slots 32 at a time per connection: with 100 uplinks
/// connected that was over a MiB for events that are mostly a packet id.
#[derive(Debug)]
pub(super) enum Ev {
    /// The broker accepted the login, with the Receive Maximum it stated.
    ConnAck(Option<u16>),
    /// A publish went out with this packet id (`Outgoing::Publish`).
    Sent(u16),
    /// A publish was held back on a packet-id collision (`Outgoing::AwaitAck`).
    Collided(u16),
    /// The broker acknowledged this packet id.
    PubAck(u16, PubAckReason),
    /// The broker sent DISCONNECT.
    Disconnected(DisconnectReasonCode),
    /// Our DISCONNECT went out.
    DisconnectSent,
    /// Anything the session ignores (pings, SUBACKs, …).
    Other,
    /// The event loop failed; boxed, since it is rare and large.
    Failed(Box<ConnectionError>),
}

impl From<Result<Event, ConnectionError>> for Ev {
    fn from(ev: Result<Event, ConnectionError>) -> Ev {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                Ev::ConnAck(c.properties.and_then(|p| p.receive_max))
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => Ev::PubAck(a.pkid, a.reason),
            Ok(Event::Incoming(Packet::Disconnect(d))) => Ev::Disconnected(d.reason_code),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ev::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => Ev::Collided(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Ev::DisconnectSent,
            Ok(_) => Ev::Other,
            Err(e) => Ev::Failed(Box::new(e)),
        }
    }
}

/// What a session asks of its MQTT client; rumqttc's [`AsyncClient`] in the daemon,
/// a recording fake in the unit tests. Neither call may wait: the session task
/// also reads the event loop's events (rumqtt#263).
pub(super) trait UplinkClient {
    /// Queues a QoS 1 publish of `payload` to `topic`.
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String>;
    /// Queues a DISCONNECT; false when it cannot be queued.
    fn disconnect(&self) -> bool;
}

impl UplinkClient for Rumqttc {
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .map_err(|e| e.to_string())
    }

    fn disconnect(&self) -> bool {
        self.client.try_disconnect().is_ok()
    }
}

/// Opens one connection with these options: a client for the session's requests,
/// and the event loop's events.
pub(super) type Connect =
    dyn Fn(MqttOptions) -> (Box<dyn UplinkClient + Send + Sync>, Events) + Send + Sync;

/// The daemon's [`Connect`]: a fresh rumqttc client and event loop (clean start, so
/// nothing queued for an old connection goes out later), the loop polled in a task
/// of its own that never awaits a client call (rumqtt#263). It ends at the first
/// error, and the event loop (with anything it still holds) is dropped with it.
pub(super) fn rumqttc_connect(opts: MqttOptions) -> (Box<dyn UplinkClient + Send + Sync>, Events) {
    let (client, mut eventloop) = event_loop(opts);
    let (tx, rx) = mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        loop {
            let ev = Ev::from(eventloop.poll().await);
            let failed = matches!(ev, Ev::Failed(_));
            if tx.send(ev).is_err() || failed {
                return;
            }
        }
    });
    let client = Rumqttc {
        client,
        _poller: AbortOnDrop(poller),
    };
    (Box::new(client), rx)
}

/// A rumqttc client and its event loop, sized for one uplink.
fn event_loop(opts: MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(opts, MAX_WINDOW * 2 + 8);
    // rumqttc makes room for 100 events of a few hundred bytes each per connection;
    // a session never has more than its window (plus a ping) queued there.
    eventloop.state.events = VecDeque::with_capacity(WINDOW + 4);
    (client, eventloop)
}

/// A rumqttc client and its poll task, which ends with the session.
struct Rumqttc {
    client: AsyncClient,
    _poller: AbortOnDrop,
}

/// Sends DISCONNECT and gives it [`CLOSE_GRACE`] to go out.
pub(super) async fn close(client: &(impl UplinkClient + ?Sized), rx: &mut Events) {
    if !client.disconnect() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(ev) = rx.recv().await {
            if matches!(ev, Ev::DisconnectSent | Ev::Failed(_)) {
                return;
            }
        }
    })
    .await;
}

/// Aborts the poll task when a session ends, whichever way.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uplinks_event_loop_reserves_room_for_its_window_not_for_a_hundred_events() {
        let (_client, eventloop) = event_loop(MqttOptions::new("dev", "localhost", 1));
        let room = eventloop.state.events.capacity();
        assert!(
            (WINDOW..=2 * WINDOW).contains(&room),
            "room for {room} events"
        );
    }

    #[test]
    fn the_session_is_handed_a_packet_id_and_a_reason_not_rumqttcs_whole_event() {
        let ours = std::mem::size_of::<Ev>();
        let theirs = std::mem::size_of::<Result<Event, ConnectionError>>();
        println!("an event: {ours} B here, {theirs} B as rumqttc returns it");
        assert!(ours <= 16, "{ours} B");
        let ack = rumqttc::v5::mqttbytes::v5::PubAck {
            pkid: 7,
            reason: PubAckReason::NoMatchingSubscribers,
            properties: None,
        };
        let ev = Ev::from(Ok(Event::Incoming(Packet::PubAck(ack))));
        assert!(matches!(
            ev,
            Ev::PubAck(7, PubAckReason::NoMatchingSubscribers)
        ));
    }
}
