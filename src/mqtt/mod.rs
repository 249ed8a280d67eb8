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
//! ConnAck we subscribe again (rumqtt#250) to the [`Subscriptions`] the daemon gave,
//! through rumqttc's own queue rather than the bounded request channel. rumqttc
//! reconnects with no pause at all (rumqtt#703), so after each error this task
//! sleeps with jittered backoff.
//!
//! Delivery tracking ([`Tracker`]): a reply counts as delivered only when the broker
//! acknowledged it with reason Success. rumqttc does not say which packet id it gave
//! a publish, so the tracker mirrors its bookkeeping: every QoS 1 publish request
//! (handled one per poll, in request order, its event returned before anything else
//! happens) yields exactly one `Outgoing::Publish` or, on a packet-id collision,
//! `Outgoing::AwaitAck`. What rumqttc would resend by itself after a reconnect is
//! where that mirror used to drift (colliding resends are dropped silently), so
//! after every connection error the tracked publishes are taken out of rumqttc's
//! resend queue: the engine publishes every undelivered reply again on every ConnAck
//! from the store, which cannot drift. rumqttc buffers a publish's event before it
//! writes the packet and keeps it when the write fails; those buffered events are
//! applied before the resend queue is read, never left for the next connection.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{LastWill, PubAckReason, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, MqttOptions};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::config::Config;

mod eventloop;
mod subscriptions;
mod tracker;

pub use eventloop::EventLoopTask;
use eventloop::Outlet;
pub use subscriptions::Subscriptions;
use subscriptions::{state_filter, Followed};
use tracker::Tracker;

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
    /// True while the broker has granted this connection's announce subscription.
    connected: watch::Receiver<bool>,
    /// Why the last connection failed or ended (written by the event-loop task).
    down: Arc<Mutex<String>>,
    status_topic: String,
    /// State topics followed at run time, shared with the event-loop task, which
    /// subscribes to all of them again on every ConnAck.
    followed: Followed,
}

impl Mqtt {
    /// Follows one more state topic: remembered for every later ConnAck, and
    /// subscribed now. Never waits: when the request channel is full, a task of its
    /// own waits for room (never the event-loop task, which must not await the
    /// channel), so the subscription is not left until the next reconnect.
    pub fn follow(&self, topic: &str) {
        if !self.followed.insert(topic) {
            return;
        }
        let filters = vec![state_filter(topic)];
        let Err(e) = self.client.try_subscribe_many(filters.clone()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(topic, error = %e, "cannot queue the subscription to {topic} now; it is made at the next reconnect: {e}");
            return;
        };
        tracing::debug!(
            topic,
            "cannot queue the subscription to {topic} now; waiting for room: {e}"
        );
        let client = self.client.clone();
        runtime.spawn(async move {
            // Err only once the event loop is gone (shutting down).
            let _ = client.subscribe_many(filters).await;
        });
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
        let topic_shown = topic.clone();
        let request =
            self.client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props);
        self.ordered(&topic_shown, track, request).await
    }

    /// Publishes the retained gateway status ("online"/"offline").
    pub async fn publish_status(&self, status: &str) -> Result<(), MqttError> {
        let request = self.client.publish(
            self.status_topic.clone(),
            QoS::AtLeastOnce,
            true,
            status.as_bytes().to_vec(),
        );
        self.ordered(&self.status_topic, None, request).await
    }

    /// Queues one QoS 1 publish request with its tracker entry, both in the same
    /// order. `request` is a not-yet-polled client call, so nothing is sent before
    /// the push.
    async fn ordered(
        &self,
        topic: &str,
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
        result?;
        tracing::trace!("queued a publish to {topic}");
        Ok(())
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

    /// Connected, and the announce subscription of this connection granted: a
    /// connection without it hears no sensor.
    /// While not connected: why the last connection failed or ended, when known.
    pub fn down_reason(&self) -> Option<String> {
        if self.is_connected() {
            return None;
        }
        let why = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Some(why).filter(|w| !w.is_empty())
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Resolves when the session's state changes (for STATUS=).
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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

/// The parts `connect` hands back.
pub struct Session {
    pub mqtt: Mqtt,
    pub inbox: Inbox,
    pub event_loop: EventLoopTask,
    /// QoS 0 announces dropped because the dispatcher was behind.
    pub dropped_qos0: Arc<AtomicU64>,
}

/// Builds the client and its event loop from the config; connects lazily on first
/// poll and subscribes to `subscriptions` at every ConnAck.
pub fn connect(cfg: &Config, subscriptions: Subscriptions) -> Result<Session, MqttError> {
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
    let cap = request_channel_capacity(m.receive_maximum as usize * 2 + 256);
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
    // Nagle adds ~40 ms to every request/reply round trip: measured on this kind of
    // machine, an echo client's p99 went from 0.65 ms to 20.8 ms with it on.
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
    let down = Arc::new(Mutex::new(String::new()));
    Ok(Session {
        mqtt: Mqtt {
            client: client.clone(),
            send_lock: Arc::new(tokio::sync::Mutex::new(())),
            queue: queue.clone(),
            connected: connected_rx,
            down: down.clone(),
            status_topic: m.status_topic.clone(),
            followed: subscriptions.followed().clone(),
        },
        inbox: Inbox {
            reliable: reliable_rx,
            best_effort: best_rx,
        },
        event_loop: EventLoopTask::new(
            eventloop,
            client,
            Tracker::new(queue),
            Outlet {
                reliable: reliable_tx,
                best_effort: best_tx,
                dropped: dropped.clone(),
                down,
            },
            connected_tx,
            subscriptions,
            Backoff::new(
                Duration::from_millis(m.reconnect_initial_ms),
                reconnect_cap(m),
            ),
        ),
        dropped_qos0: dropped,
    })
}

/// Names the capacity of rumqttc's request channel in builds with the `failpoints`
/// feature: tests shrink it so that a few queued requests fill it as a roll-out's
/// worth of replies queued during an outage would.
pub const REQUEST_CHANNEL_ENV: &str = "ONBOARDD_FAILPOINT_REQUEST_CHANNEL";

fn request_channel_capacity(default: usize) -> usize {
    #[cfg(feature = "failpoints")]
    if let Some(cap) = std::env::var(REQUEST_CHANNEL_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return cap.max(1);
    }
    default
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
