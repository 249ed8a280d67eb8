//! The MQTT session with the local broker.
//!
//! One task owns rumqttc's event loop and never awaits a client call (a full request
//! channel would deadlock it, rumqtt#263): announces leave it through a bounded
//! channel with `try_send`, sized so that it cannot be full (it holds at most the
//! broker's Receive Maximum of unacknowledged announces). Everything else — acks,
//! replies, status — goes through [`Mqtt`] from other tasks.
//!
//! The session is persistent (clean start off, stable client id, session expiry),
//! so announces published while onboardd is down are queued by the broker. On every
//! ConnAck we subscribe again (rumqtt#250). rumqttc reconnects with no pause at all
//! (rumqtt#703), so after each error this task sleeps with jittered backoff.
//!
//! Delivery tracking: an `ok` reply counts as delivered only when the broker has
//! acknowledged it (PUBACK). rumqttc does not say which packet id it gave a publish,
//! but it assigns them in request order, so every QoS 1 publish request records who
//! it is for in a FIFO, and the `Outgoing::Publish(pkid)` events pop it in the same
//! order. Replies that were never acknowledged are published again when a session
//! is lost or the daemon restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;

/// What the event-loop task reports besides announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Connected; `resume_lost`: replies not yet acknowledged must be published again
    /// (a new session, or the first connection of this process).
    Connected { resume_lost: bool },
    /// The broker acknowledged the ok reply of this sensor.
    Delivered(String),
}

/// The client side, shared by all tasks that publish or acknowledge.
#[derive(Clone)]
pub struct Mqtt {
    client: AsyncClient,
    /// Serialises publish requests so the FIFO order matches the request channel's.
    send_lock: Arc<tokio::sync::Mutex<()>>,
    /// For each QoS 1 publish request not yet given a packet id: the sensor whose
    /// delivery it proves, if any.
    order: Arc<Mutex<VecDeque<Option<String>>>>,
    connected: watch::Receiver<bool>,
    status_topic: String,
}

impl Mqtt {
    /// Publishes a reply with QoS 1, never retained (a retained token would go to
    /// every later subscriber). `track`: mark this sensor delivered on PUBACK.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
        track: Option<String>,
    ) -> Result<(), rumqttc::v5::ClientError> {
        // No correlation data: empty properties, the same bytes on the wire as none.
        let props = PublishProperties {
            correlation_data: correlation.map(Bytes::from),
            ..Default::default()
        };
        let request =
            self.client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props);
        self.ordered(track, request).await
    }

    /// Publishes the retained gateway status ("online"/"offline").
    pub async fn publish_status(&self, status: &str) -> Result<(), rumqttc::v5::ClientError> {
        let request = self.client.publish(
            self.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            status.as_bytes().to_vec(),
        );
        self.ordered(None, request).await
    }

    /// Queues one QoS 1 publish request with its FIFO entry, both in the same order.
    /// `request` is a not-yet-polled client call, so nothing is sent before the push.
    async fn ordered(
        &self,
        track: Option<String>,
        request: impl std::future::Future<Output = Result<(), rumqttc::v5::ClientError>>,
    ) -> Result<(), rumqttc::v5::ClientError> {
        let _guard = self.send_lock.lock().await;
        self.order
            .lock()
            .expect("the order lock is never held across a panic")
            .push_back(track);
        let result = request.await;
        if result.is_err() {
            // The request never entered the channel: take its FIFO entry back.
            self.order
                .lock()
                .expect("the order lock is never held across a panic")
                .pop_back();
        }
        result
    }

    /// Publishes a QoS 0 message (stats): not tracked, loss is harmless.
    pub fn try_publish_qos0(&self, topic: &str, payload: Vec<u8>) {
        let _ = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload);
    }

    /// Acknowledges an announce; call only once it is durably recorded.
    pub async fn ack(&self, publish: &Publish) -> Result<(), rumqttc::v5::ClientError> {
        self.client.ack(publish).await
    }

    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
}

/// The parts `connect` hands back: the shared client, the event-loop task's input.
pub struct Session {
    pub mqtt: Mqtt,
    pub event_loop: EventLoopTask,
}

pub struct EventLoopTask {
    eventloop: EventLoop,
    client: AsyncClient,
    order: Arc<Mutex<VecDeque<Option<String>>>>,
    connected: watch::Sender<bool>,
    announce_topic: String,
    backoff: Backoff,
}

/// Builds the client and its event loop from the config; connects lazily on first poll.
pub fn connect(cfg: &Config) -> anyhow::Result<Session> {
    let m = &cfg.mqtt;
    let mut opts = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
    opts.set_keep_alive(cfg.keep_alive());
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(m.session_expiry_s));
    opts.set_receive_maximum(Some(m.receive_maximum));
    opts.set_max_packet_size(Some(m.max_packet_bytes));
    opts.set_manual_acks(true);
    // rumqttc preallocates one slot per possible in-flight publish: u16::MAX slots
    // (≈ 14 MiB) unless capped. The broker grants far fewer (mosquitto: 20).
    opts.set_outgoing_inflight_upper_limit(1024);
    opts.set_connection_timeout(m.connect_timeout_s);
    let cap = m.receive_maximum as usize * 2 + 256;
    opts.set_request_channel_capacity(cap);
    if !m.username.is_empty() {
        opts.set_credentials(m.username.clone(), m.password.expose().to_string());
    }
    opts.set_last_will(LastWill::new(
        m.status_topic.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    let mut net = rumqttc::NetworkOptions::new();
    // Nagle adds ~40 ms to every request/reply round trip (pitfalls.md).
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(m.connect_timeout_s);
    opts.set_network_options(net);
    if !m.ca_file.is_empty() {
        opts.set_transport(rumqttc::Transport::tls_with_config(crate::tls::mqtt_tls(
            m,
        )?));
    }

    let (client, eventloop) = AsyncClient::new(opts, cap);
    let order = Arc::new(Mutex::new(VecDeque::new()));
    let (connected_tx, connected_rx) = watch::channel(false);
    Ok(Session {
        mqtt: Mqtt {
            client: client.clone(),
            send_lock: Arc::new(tokio::sync::Mutex::new(())),
            order: order.clone(),
            connected: connected_rx,
            status_topic: m.status_topic.clone(),
        },
        event_loop: EventLoopTask {
            eventloop,
            client,
            order,
            connected: connected_tx,
            announce_topic: m.announce_topic.clone(),
            backoff: Backoff::new(
                Duration::from_millis(m.reconnect_initial_ms),
                Duration::from_millis(m.reconnect_max_ms),
            ),
        },
    })
}

impl EventLoopTask {
    /// Polls until `stop` is cancelled and the disconnect has gone out (or `stop_deadline`).
    pub async fn run(
        mut self,
        announces: mpsc::Sender<Publish>,
        events: mpsc::Sender<SessionEvent>,
        stop: CancellationToken,
        heartbeat: Arc<crate::daemon::Heartbeat>,
    ) {
        let mut inflight: HashMap<u16, Option<String>> = HashMap::new();
        let mut failures: u32 = 0;
        let mut first_connection = true;
        let mut was_connected = false;
        // FIFO entries whose requests sit in rumqttc's pending list, not its channel.
        let mut drained: usize = 0;
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
                    let _ = self.connected.send(true);
                    tracing::info!(
                        session_present = ack.session_present,
                        "connected to the broker"
                    );
                    // Resubscribe on every ConnAck: a broker that lost our session lost
                    // our subscription too. try_* only: never await in this task.
                    if let Err(e) = self
                        .client
                        .try_subscribe(self.announce_topic.clone(), QoS::AtLeastOnce)
                    {
                        tracing::error!(error = %e, "cannot queue the announce subscription");
                    }
                    let resume_lost = first_connection || !ack.session_present;
                    if !ack.session_present {
                        // rumqttc dropped its queue of unacknowledged publishes and of
                        // the requests it drained at the disconnect: forget their ids and
                        // FIFO entries; the engine publishes the tracked replies again.
                        inflight.clear();
                        let mut order = self
                            .order
                            .lock()
                            .expect("the order lock is never held across a panic");
                        let n = drained.min(order.len());
                        order.drain(..n);
                    }
                    drained = 0;
                    was_connected = true;
                    first_connection = false;
                    let _ = events.try_send(SessionEvent::Connected { resume_lost });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Err(e) = announces.try_send(p) {
                        // Not acknowledged, so the broker delivers it again after a
                        // reconnect; with queue_capacity ≥ receive_maximum this is a bug.
                        tracing::error!(error = %e, "announce queue full; announce left unacknowledged");
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    // A retransmission reuses a packet id we already know.
                    if let std::collections::hash_map::Entry::Vacant(slot) = inflight.entry(pkid) {
                        let who = self
                            .order
                            .lock()
                            .expect("the order lock is never held across a panic")
                            .pop_front()
                            .flatten();
                        slot.insert(who);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(Some(sensor)) = inflight.remove(&ack.pkid) {
                        let _ = events.try_send(SessionEvent::Delivered(sensor));
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let granted = ack.return_codes.iter().all(|c| {
                        matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    });
                    if granted {
                        tracing::info!(topic = %self.announce_topic, "subscribed to announces");
                    } else {
                        tracing::error!(topic = %self.announce_topic, codes = ?ack.return_codes, "the broker refused the announce subscription (check its ACL)");
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    tracing::warn!(reason = ?d.reason_code, "the broker disconnected us");
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = self.connected.send(false);
                    if was_connected {
                        // rumqttc's clean() just moved every queued request into its
                        // pending list: those FIFO entries now belong to that list.
                        drained = self
                            .order
                            .lock()
                            .expect("the order lock is never held across a panic")
                            .len();
                        was_connected = false;
                    }
                    let wait = self.backoff.delay(failures);
                    if crate::tls::cert_problem(&e) == Some(crate::tls::CertProblem::NotValidYet) {
                        tracing::warn!(error = %e, "the broker's certificate is not valid yet: the clock is probably not synced (a Pi has no RTC until NTP runs); retrying");
                    } else if failures == 0 {
                        tracing::warn!(error = %e, "broker connection lost; reconnecting with backoff");
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

    /// Lets queued publishes and acks go out, then sends DISCONNECT (bounded in time).
    async fn drain_and_disconnect(&mut self) {
        if !*self.connected.borrow() {
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
