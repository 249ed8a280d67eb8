//! The MQTT session with the local broker.
//!
//! One task owns rumqttc's event loop and never awaits a client call (a full request
//! channel would deadlock it, rumqtt#263). Announces leave it through an [`Inbox`]:
//! QoS 1/2 announces through an unbounded channel — their number is bounded by our
//! Receive Maximum, since the broker sends no more unacknowledged ones than that,
//! and dropping one would strand it until the next reconnect — and QoS 0 announces
//! through a bounded one, where a flood is dropped, counted and logged. Everything
//! else — acks, replies, status — goes through [`Mqtt`] from other tasks.
//!
//! The session is persistent (clean start off, stable client id, session expiry),
//! so announces published while onboardd is down are queued by the broker. On every
//! ConnAck we subscribe again (rumqtt#250). rumqttc reconnects with no pause at all
//! (rumqtt#703), so after each error this task sleeps with jittered backoff.
//!
//! Delivery tracking ([`Tracker`]): a reply counts as delivered only when the broker
//! acknowledged it with reason Success. rumqttc does not say which packet id it gave
//! a publish, so the tracker mirrors its bookkeeping: every QoS 1 publish request
//! (handled one per poll, in request order, its event returned before anything else
//! happens) yields exactly one `Outgoing::Publish` or, on a packet-id collision,
//! `Outgoing::AwaitAck`. What rumqttc would resend by itself after a reconnect is
//! where that mirror used to drift (pitfalls.md: colliding resends are dropped
//! silently), so after every connection error the tracked publishes are taken out of
//! rumqttc's resend queue: the engine publishes every undelivered reply again on
//! every ConnAck from the store, which cannot drift.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    Filter, LastWill, Packet, PubAckReason, Publish, PublishProperties, RetainForwardRule,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions, Request};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::heartbeat::Heartbeat;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// Boxed: rumqttc's error carries the whole request back.
    #[error("the MQTT event loop is gone (shutting down)")]
    Closed(#[source] Box<rumqttc::v5::ClientError>),
    #[error("broker TLS settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl From<rumqttc::v5::ClientError> for MqttError {
    fn from(e: rumqttc::v5::ClientError) -> Self {
        MqttError::Closed(Box::new(e))
    }
}

/// Who a tracked publish is for: the onboarding whose ok reply it carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryTag {
    pub sensor: String,
    /// The record's generation, so an acknowledgement never marks a newer
    /// onboarding of the same sensor.
    pub generation: u64,
}

/// What the broker said of a tracked publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acked {
    /// Reason Success: the broker took it for at least one subscriber.
    Delivered,
    /// 0x10: nobody is subscribed (the sensor is offline without a session). The
    /// reply stays undelivered: it goes out again when the sensor announces again
    /// or on the next session, never in a loop.
    NoSubscribers,
    /// Any other reason (0x87 not authorized, 0x97 quota exceeded, …).
    Refused(PubAckReason),
}

/// What the event-loop task reports besides announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Connected (every ConnAck): tracking starts afresh, so every undelivered reply
    /// must be published again.
    Connected { session_present: bool },
    /// The broker acknowledged a tracked publish.
    Acked(DeliveryTag, Acked),
}

/// The client side, shared by all tasks that publish or acknowledge.
#[derive(Clone)]
pub struct Mqtt {
    client: AsyncClient,
    /// Serialises publish requests so the tracker's queue order matches the request
    /// channel's.
    send_lock: Arc<tokio::sync::Mutex<()>>,
    /// Tags of QoS 1 publish requests not yet given a packet id, in request order.
    queue: Arc<Mutex<VecDeque<Option<DeliveryTag>>>>,
    connected: watch::Receiver<bool>,
    status_topic: String,
    /// State topics discovery follows, shared with the event-loop task, which
    /// subscribes to all of them again on every ConnAck.
    followed: Arc<Mutex<BTreeSet<String>>>,
}

impl Mqtt {
    /// Follows one more state topic (discovery): remembered for every later
    /// ConnAck, and subscribed now. Never waits: a full request channel only delays
    /// the subscription to the next ConnAck.
    pub fn follow(&self, topic: &str) {
        if !lock(&self.followed).insert(topic.to_string()) {
            return;
        }
        if let Err(e) = self.client.try_subscribe_many(vec![state_filter(topic)]) {
            tracing::warn!(topic, error = %e, "cannot queue the subscription to {topic} now; it is made at the next reconnect: {e}");
        }
    }

    /// Publishes a reply with QoS 1, never retained (a retained token would go to
    /// every later subscriber). `track`: report the broker's acknowledgement.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
        track: Option<DeliveryTag>,
    ) -> Result<(), MqttError> {
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
    pub async fn publish_status(&self, status: &str) -> Result<(), MqttError> {
        let request = self.client.publish(
            self.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            status.as_bytes().to_vec(),
        );
        self.ordered(None, request).await
    }

    /// Queues one QoS 1 publish request with its tracker entry, both in the same
    /// order. `request` is a not-yet-polled client call, so nothing is sent before
    /// the push.
    async fn ordered(
        &self,
        track: Option<DeliveryTag>,
        request: impl std::future::Future<Output = Result<(), rumqttc::v5::ClientError>>,
    ) -> Result<(), MqttError> {
        let _guard = self.send_lock.lock().await;
        lock(&self.queue).push_back(track);
        let result = request.await;
        if result.is_err() {
            // The request never entered the channel: take its entry back.
            lock(&self.queue).pop_back();
        }
        Ok(result?)
    }

    /// Publishes a QoS 0 message (stats): not tracked, loss is harmless.
    pub fn try_publish_qos0(&self, topic: &str, payload: Vec<u8>) {
        let _ = self
            .client
            .try_publish(topic, QoS::AtMostOnce, false, payload);
    }

    /// Acknowledges an announce; call only once it is durably recorded.
    pub async fn ack(&self, publish: &Publish) -> Result<(), MqttError> {
        Ok(self.client.ack(publish).await?)
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Resolves when the session's state changes (for STATUS=).
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("the tracker lock is never held across a panic")
}

/// Announces as they arrive, in two lanes (see the module doc).
pub struct Inbox {
    reliable: mpsc::UnboundedReceiver<Publish>,
    best_effort: mpsc::Receiver<Publish>,
}

impl Inbox {
    /// The next announce, QoS 1/2 first (they hold a Receive-Maximum slot until
    /// acknowledged). `None` once the event-loop task is gone.
    pub async fn recv(&mut self) -> Option<Publish> {
        tokio::select! {
            biased;
            Some(p) = self.reliable.recv() => Some(p),
            Some(p) = self.best_effort.recv() => Some(p),
            else => None,
        }
    }
}

/// Where the event-loop task sends what it receives.
struct Outlet {
    reliable: mpsc::UnboundedSender<Publish>,
    best_effort: mpsc::Sender<Publish>,
    /// QoS 0 announces dropped on a full queue since start.
    dropped: Arc<AtomicU64>,
}

/// The parts `connect` hands back.
pub struct Session {
    pub mqtt: Mqtt,
    pub inbox: Inbox,
    pub event_loop: EventLoopTask,
    /// QoS 0 announces dropped because the dispatcher was behind.
    pub dropped_qos0: Arc<AtomicU64>,
}

pub struct EventLoopTask {
    eventloop: EventLoop,
    client: AsyncClient,
    tracker: Tracker,
    outlet: Outlet,
    connected: watch::Sender<bool>,
    announce_topic: String,
    /// Bridged sensors' readings (`onboard/data/+`), when the bridge is on.
    data_filter: Option<String>,
    /// Discovery config prefixes (`homeassistant/#`…), when discovery is on.
    discovery_filters: Vec<String>,
    /// State topics discovery follows (see [`Mqtt::follow`]).
    followed: Arc<Mutex<BTreeSet<String>>>,
    backoff: Backoff,
}

/// A discovered state topic's subscription: no stored copy at subscribe (it would
/// be forwarded again at every reconnect) and, Retain As Published off, live
/// states arrive without the retain flag even from devices that retain them
/// (ESPHome does by default), so the bridge takes them.
fn state_filter(topic: &str) -> Filter {
    let mut f = Filter::new(topic.to_string(), QoS::AtLeastOnce);
    f.retain_forward_rule = RetainForwardRule::Never;
    f.preserve_retain = false;
    f
}

/// Subscriptions per SUBSCRIBE packet when following many state topics.
const FILTERS_PER_SUBSCRIBE: usize = 64;

/// Builds the client and its event loop from the config; connects lazily on first poll.
pub fn connect(cfg: &Config) -> Result<Session, MqttError> {
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
        let tls = crate::tls::mqtt_tls(m)?;
        opts.set_transport(rumqttc::Transport::tls_with_config(tls));
    }

    let (client, eventloop) = AsyncClient::new(opts, cap);
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let (connected_tx, connected_rx) = watch::channel(false);
    let (reliable_tx, reliable_rx) = mpsc::unbounded_channel();
    let (best_tx, best_rx) = mpsc::channel(cfg.announce.queue_capacity.max(1));
    let dropped = Arc::new(AtomicU64::new(0));
    let followed = Arc::new(Mutex::new(BTreeSet::new()));
    let d = &cfg.discovery;
    let discovery_filters = [
        (d.homeassistant, &d.homeassistant_prefix),
        (d.tasmota, &d.tasmota_prefix),
    ]
    .into_iter()
    .filter(|(on, _)| *on)
    .map(|(_, prefix)| format!("{prefix}/#"))
    .collect();
    Ok(Session {
        mqtt: Mqtt {
            client: client.clone(),
            send_lock: Arc::new(tokio::sync::Mutex::new(())),
            queue: queue.clone(),
            connected: connected_rx,
            status_topic: m.status_topic.clone(),
            followed: followed.clone(),
        },
        inbox: Inbox {
            reliable: reliable_rx,
            best_effort: best_rx,
        },
        event_loop: EventLoopTask {
            eventloop,
            client,
            tracker: Tracker::new(queue),
            outlet: Outlet {
                reliable: reliable_tx,
                best_effort: best_tx,
                dropped: dropped.clone(),
            },
            connected: connected_tx,
            announce_topic: m.announce_topic.clone(),
            data_filter: cfg
                .bridge
                .enabled
                .then(|| crate::bridge::DataTopic::new(&cfg.bridge.data_topic).filter()),
            discovery_filters,
            followed,
            backoff: Backoff::new(
                Duration::from_millis(m.reconnect_initial_ms),
                reconnect_cap(m),
            ),
        },
        dropped_qos0: dropped,
    })
}

/// The longest wait between reconnects. A broker on this machine comes back within
/// seconds of a restart and costs nothing to retry, so its cap is 2 s: a user who
/// restarts mosquitto should not wait half a minute for onboardd.
fn reconnect_cap(m: &crate::config::MqttConfig) -> Duration {
    let cap = Duration::from_millis(m.reconnect_max_ms);
    if crate::config::is_loopback_host(&m.host) {
        cap.min(LOOPBACK_RECONNECT_CAP)
    } else {
        cap
    }
}

const LOOPBACK_RECONNECT_CAP: Duration = Duration::from_secs(2);

impl EventLoopTask {
    /// Polls until `stop` is cancelled and the disconnect has gone out (bounded).
    pub async fn run(
        mut self,
        events: mpsc::UnboundedSender<SessionEvent>,
        stop: CancellationToken,
        heartbeat: Arc<Heartbeat>,
    ) {
        let mut failures: u32 = 0;
        // The next SUBACK answers the announce subscription of the last ConnAck.
        let mut main_suback = false;
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
                    self.tracker.on_connack(ack.session_present);
                    // Resubscribe on every ConnAck: a broker that lost our session lost
                    // our subscription too. try_* only: never await in this task.
                    // A retained announce (or reading) must not be acted on again at
                    // every subscribe; one retained while we are subscribed keeps its
                    // retain flag (MQTT 5 clears it by default), so it can be dropped.
                    let filters = std::iter::once(&self.announce_topic)
                        .chain(&self.data_filter)
                        .map(|topic| {
                            let mut filter = Filter::new(topic.clone(), QoS::AtLeastOnce);
                            filter.retain_forward_rule = RetainForwardRule::Never;
                            filter.preserve_retain = true;
                            filter
                        });
                    // Discovery configs in the same SUBSCRIBE (one SUBACK says all is
                    // ready), with Retain Handling 0: the retained configs are re-read
                    // at every subscribe, and handling them again creates nothing.
                    let discovery = self.discovery_filters.iter().map(|topic| {
                        let mut filter = Filter::new(topic.clone(), QoS::AtLeastOnce);
                        filter.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
                        filter
                    });
                    if let Err(e) = self
                        .client
                        .try_subscribe_many(filters.chain(discovery).collect::<Vec<_>>())
                    {
                        tracing::error!(error = %e, "cannot queue the announce subscription: {e}");
                    }
                    let followed: Vec<Filter> = lock(&self.followed)
                        .iter()
                        .map(|t| state_filter(t))
                        .collect();
                    for chunk in followed.chunks(FILTERS_PER_SUBSCRIBE) {
                        if let Err(e) = self.client.try_subscribe_many(chunk.to_vec()) {
                            tracing::error!(error = %e, "cannot queue the discovered state subscriptions: {e}");
                        }
                    }
                    main_suback = true;
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
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let granted = ack.return_codes.iter().all(|c| {
                        matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    });
                    // The announce subscription is queued first at every ConnAck, so
                    // its SUBACK is the first; later ones are discovered state topics.
                    let main = std::mem::take(&mut main_suback);
                    match (main, granted) {
                        (true, true) => {
                            tracing::info!(topic = %self.announce_topic, "subscribed to announces")
                        }
                        (true, false) => {
                            tracing::error!(topic = %self.announce_topic, data = ?self.data_filter, codes = ?ack.return_codes, "the broker refused the announce, data or discovery subscription (check its ACL): {:?}", ack.return_codes)
                        }
                        (false, true) => {
                            tracing::debug!(
                                filters = ack.return_codes.len(),
                                "subscribed to discovered state topics"
                            )
                        }
                        (false, false) => {
                            tracing::warn!(codes = ?ack.return_codes, "the broker refused some discovered state topics (check its ACL for onboardd's login): {:?}", ack.return_codes)
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    tracing::warn!(reason = ?d.reason_code, "the broker disconnected us: {:?}", d.reason_code);
                }
                Ok(_) => {}
                Err(e) => {
                    let was_connected = *self.connected.borrow();
                    let _ = self.connected.send(false);
                    // Whatever rumqttc moved into its resend queue: tracked replies
                    // come out (the engine republishes them on the next ConnAck).
                    self.tracker.on_connection_lost(&mut self.eventloop.pending);
                    self.eventloop.state.collision = None;
                    let wait = self.backoff.delay(failures);
                    if crate::tls::cert_problem(&e) == Some(crate::tls::CertProblem::NotValidYet) {
                        tracing::warn!(error = %e, "the broker's certificate is not valid yet: the clock is probably not synced (a Pi has no RTC until NTP runs); retrying: {e}");
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

/// Mirrors rumqttc's packet-id bookkeeping to tell which tracked publish a PUBACK
/// acknowledges (see the module doc). Pure bookkeeping, unit-tested alone.
pub(crate) struct Tracker {
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
    fn new(queue: Arc<Mutex<VecDeque<Option<DeliveryTag>>>>) -> Tracker {
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

    fn on_outgoing_publish(&mut self, pkid: u16) {
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

    fn on_collision(&mut self, pkid: u16) {
        let entry = self.next_entry();
        self.collided = Some((pkid, entry));
    }

    /// Records a PUBACK. Returns the held-back entry when rumqttc will not resend it
    /// by itself (a non-Success reason on the colliding packet id).
    fn on_puback(&mut self, pkid: u16, reason: &PubAckReason) -> Option<Option<DeliveryTag>> {
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
    fn resend_first(&mut self, entry: Option<DeliveryTag>) {
        self.resend.push_front(entry);
    }

    fn take_outcome(&mut self) -> Option<(DeliveryTag, Acked)> {
        self.outcome.take()
    }

    /// After a connection error rumqttc's `pending` holds, in order: what it had not
    /// resent yet, the publishes awaiting a PUBACK (their packet ids kept), and the
    /// requests drained from the channel (packet id 0). Tracked publishes are taken
    /// out; the untracked ones (pending/error replies, the status) stay, and their
    /// entries are what rumqttc will send first.
    fn on_connection_lost(&mut self, pending: &mut VecDeque<Request>) {
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
    }

    /// rumqttc drops its whole resend list when the broker kept no session.
    fn on_connack(&mut self, session_present: bool) {
        if !session_present {
            self.resend.clear();
        }
        self.inflight.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_broker_on_this_machine_is_retried_within_two_seconds() {
        let cfg = |host: &str| {
            crate::config::Config::from_toml(&format!(
                "[mqtt]\nhost = \"{host}\"\nreconnect_max_ms = 30000\n[qubitro]\nproject_id = \"p\"\napi_key = \"k\""
            ))
            .unwrap()
        };
        assert_eq!(
            reconnect_cap(&cfg("127.0.0.1").mqtt),
            LOOPBACK_RECONNECT_CAP
        );
        assert_eq!(
            reconnect_cap(&cfg("localhost").mqtt),
            LOOPBACK_RECONNECT_CAP
        );
        assert_eq!(
            reconnect_cap(&cfg("broker.lan").mqtt),
            Duration::from_secs(30)
        );
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
        t.on_connection_lost(&mut pending);
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
        t.on_connection_lost(&mut pending);
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
        t.on_connection_lost(&mut pending);
        assert_eq!(pending.len(), 1);
        // The reconnect fails before any ConnAck: rumqttc's pending is unchanged.
        t.on_connection_lost(&mut pending);
        assert_eq!(pending.len(), 1);
        assert_eq!(t.resend.len(), 1);
    }
}
