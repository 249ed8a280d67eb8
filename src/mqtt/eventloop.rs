//! The one task that owns rumqttc's event loop: it polls, hands announces out,
//! feeds the tracker, subscribes at every ConnAck and paces reconnects. It never
//! awaits a client call (a full request channel would deadlock it, rumqtt#263).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubAck, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, Request};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::subscriptions::{Announces, Subscriptions};
use super::tracker::Tracker;
use super::SessionEvent;
use crate::backoff::Backoff;
use crate::heartbeat::Heartbeat;

/// Where the event-loop task sends what it receives.
pub(super) struct Outlet {
    pub(super) reliable: mpsc::UnboundedSender<Publish>,
    pub(super) best_effort: mpsc::Sender<Publish>,
    /// QoS 0 announces dropped on a full queue since start.
    pub(super) dropped: Arc<AtomicU64>,
    /// Why the last connection failed or ended, for the gateway page.
    pub(super) down: Arc<std::sync::Mutex<String>>,
}

/// Polls rumqttc's event loop (see the module doc); spawned by the daemon.
pub struct EventLoopTask {
    eventloop: EventLoop,
    /// Only for `try_*` calls: this task never awaits the request channel.
    client: AsyncClient,
    tracker: Tracker,
    outlet: Outlet,
    /// True once this connection's announce subscription is granted (STATUS=, the
    /// watchdog): connected but not subscribed is deaf.
    connected: watch::Sender<bool>,
    /// Connected (since the last ConnAck), subscribed or not.
    online: bool,
    /// Where this connection's announce subscription stands.
    announces: Announces,
    /// Subscribed again at every ConnAck.
    subscriptions: Subscriptions,
    backoff: Backoff,
}

impl EventLoopTask {
    pub(super) fn new(
        eventloop: EventLoop,
        client: AsyncClient,
        tracker: Tracker,
        outlet: Outlet,
        connected: watch::Sender<bool>,
        subscriptions: Subscriptions,
        backoff: Backoff,
    ) -> EventLoopTask {
        EventLoopTask {
            eventloop,
            client,
            tracker,
            outlet,
            connected,
            subscriptions,
            backoff,
            online: false,
            announces: Announces::default(),
        }
    }

    /// Polls until `stop` is cancelled and the disconnect has gone out (bounded).
    pub async fn run(
        mut self,
        events: mpsc::UnboundedSender<SessionEvent>,
        stop: CancellationToken,
        heartbeat: Arc<Heartbeat>,
    ) {
        let mut failures: u32 = 0;
        loop {
            let event = tokio::select! {
                biased;
                ev = self.eventloop.poll() => ev,
                _ = stop.cancelled() => break,
            };
            heartbeat.beat_mqtt();
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    self.online = true;
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to the broker"
                    );
                    self.tracker.on_connack(ack.session_present);
                    self.subscribe_all();
                    let _ = events.send(SessionEvent::Connected {
                        session_present: ack.session_present,
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => self.outlet.deliver(p),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    self.tracker.on_outgoing_publish(pkid);
                }
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                    self.tracker.on_collision(pkid);
                }
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    self.announces.on_outgoing_subscribe(pkid);
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(collided) = self.tracker.on_puback(ack.pkid, &ack.reason) {
                        // rumqttc resends a collided publish only after a Success (or
                        // 0x10) ack of its packet id; after any other reason it would
                        // wait forever, blocking every later request. Send it ourselves.
                        if let Some(p) = self.eventloop.state.collision.take() {
                            self.eventloop.pending.push_front(Request::Publish(p));
                            self.tracker.resend_first(collided);
                        }
                    }
                    if let Some((tag, outcome)) = self.tracker.take_outcome() {
                        let _ = events.send(SessionEvent::Acked(tag, outcome));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => self.on_suback(&ack),
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    tracing::warn!(reason = ?d.reason_code, "the broker disconnected us: {:?}", d.reason_code);
                }
                Ok(_) => {}
                Err(e) => {
                    let was_connected = std::mem::take(&mut self.online);
                    *self.outlet.down.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
                    self.announces.on_connection_lost();
                    let _ = self.connected.send(false);
                    // What the dead connection left behind: its buffered events (acks
                    // read before it died are still reported) and rumqttc's resend
                    // queue, out of which tracked replies come (the engine republishes
                    // them on the next ConnAck).
                    let acked = self.tracker.on_connection_lost(
                        &mut self.eventloop.state.events,
                        &mut self.eventloop.pending,
                    );
                    for (tag, outcome) in acked {
                        let _ = events.send(SessionEvent::Acked(tag, outcome));
                    }
                    self.eventloop.state.collision = None;
                    // Every ConnAck subscribes to everything again, from the front of
                    // the queue: older SUBSCRIBEs would only pile up across flaps.
                    self.eventloop
                        .pending
                        .retain(|r| !matches!(r, Request::Subscribe(_)));
                    let wait = self.backoff.delay(failures);
                    if crate::tls::cert_problem(&e) == Some(crate::tls::CertProblem::NotValidYet) {
                        tracing::warn!(
                            error = %e,
                            "the broker's certificate is not valid yet: the clock is probably not synced \
                             (a Pi has no RTC until NTP runs); retrying: {e}"
                        );
                    } else if was_connected {
                        tracing::warn!(error = %e, "broker connection lost ({e}); reconnecting");
                    } else if failures == 0 {
                        tracing::warn!(error = %e, "cannot connect to the broker ({e}); retrying");
                    } else {
                        tracing::debug!(error = %e, attempt = failures, wait_ms = wait.as_millis() as u64, "broker still unreachable");
                    }
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => break,
                    }
                }
            }
        }
        self.drain_and_disconnect().await;
    }

    /// Subscribes to everything again (a broker that lost our session lost our
    /// subscriptions too). Straight into rumqttc's own queue, which is unbounded and
    /// sent before the request channel: a channel full of replies queued during an
    /// outage cannot keep the gateway deaf. The announce SUBSCRIBE goes first, so the
    /// first SUBSCRIBE sent on this connection is it.
    fn subscribe_all(&mut self) {
        let (main, followed) = self.subscriptions.packets();
        let pending = &mut self.eventloop.pending;
        pending.retain(|r| !matches!(r, Request::Subscribe(_)));
        for packet in followed.into_iter().rev() {
            pending.push_front(Request::Subscribe(packet));
        }
        pending.push_front(Request::Subscribe(main));
        self.announces.on_queued();
    }

    /// Only the SUBACK of this connection's announce SUBSCRIBE (matched by packet
    /// id) says the gateway hears sensors; the others answer followed topics.
    fn on_suback(&mut self, ack: &SubAck) {
        let granted = ack
            .return_codes
            .iter()
            .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
        let main = self.announces.on_suback(ack.pkid);
        let codes = &ack.return_codes;
        match (main, granted) {
            (true, true) => {
                let topic = self.subscriptions.announce_topic();
                tracing::info!(topic, "subscribed to announces");
                let _ = self.connected.send(true);
            }
            (true, false) => {
                let filters = self.subscriptions.topics();
                tracing::error!(
                    ?filters,
                    ?codes,
                    "the broker refused a subscription of {filters:?} (check its ACL): {codes:?}"
                )
            }
            (false, true) => {
                tracing::debug!(filters = codes.len(), "subscribed to followed state topics")
            }
            (false, false) => {
                tracing::warn!(
                    ?codes,
                    "the broker refused some followed state topics (check its ACL for onboardd's login): {codes:?}"
                )
            }
        }
    }

    /// Lets queued publishes and acks go out, then sends DISCONNECT (bounded in time).
    async fn drain_and_disconnect(&mut self) {
        if !self.online {
            return;
        }
        let _ = self.client.try_disconnect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            match tokio::time::timeout_at(deadline, self.eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let _ = self.connected.send(false);
    }
}

impl Outlet {
    fn deliver(&self, p: Publish) {
        if p.qos == QoS::AtMostOnce {
            if self.best_effort.try_send(p).is_err() {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Powers of two: a flood is visible without one line per announce.
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "QoS 0 announce dropped: the dispatcher is behind ({n} since start); use QoS 1 so no announce is lost"
                    );
                }
            }
        } else if self.reliable.send(p).is_err() {
            // The dispatcher is gone (shutting down): the announce stays
            // unacknowledged and the broker delivers it again next session.
            tracing::debug!("announce left unacknowledged at shutdown");
        }
    }
}
