//! The uplink: one MQTT connection per bridged device to Qubitro's broker, logged in
//! as that device (client id = username = device id, password = token), publishing
//! the device's buffered readings in order at QoS 1 to the topic equal to its id.
//!
//! Each uplink is a task of its own, started by the scheduler (`super::scheduler`)
//! when its device has data, that closes itself after `bridge.idle_disconnect_s`
//! without data and reconnects with jittered backoff (`crate::backoff`; rumqttc
//! itself would retry at once, rumqtt#703).
//!
//! Which PUBACK is which: rumqttc does not say which packet id it gave a publish. A
//! connection keeps at most as many readings outstanding as the broker's Receive
//! Maximum allows (capped at [`MAX_WINDOW`]; [`window_for`]), the same number rumqttc
//! limits itself to, so it never has to hold one back on a packet-id collision;
//! every publish request yields one `Outgoing::Publish(pkid)` in request order, and
//! the broker acknowledges QoS 1 publishes in the order it received them (MQTT 5
//! §4.6). So the outstanding readings form a queue whose front is the next PUBACK;
//! anything else (a collision, an ack out of order) ends the connection, and the
//! buffer — which holds every reading until its PUBACK — is read again from the
//! oldest. A reading is removed only after a PUBACK with reason Success, or 0x10 "no
//! matching subscribers", which MQTT 5 defines as accepted.
//!
//! Every connection attempt gets a fresh rumqttc client and event loop with clean
//! start: nothing rumqttc queued for an old connection (its resend queue, requests
//! still in its channel) can go out later, out of order. The event loop is polled
//! in a task of its own that never awaits a client call (rumqtt#263) and hands
//! every event to the connection's task.
//!
//! A refused login or PUBACK 0x87 (bad token: the device was deleted in Qubitro, or
//! its broker does not know a new device yet) ends the task and pauses that device
//! with one loud log line, visible through [`Bridge::device_status`]; the scheduler
//! retries it after `bridge.reconnect_max_ms`, the wait doubling up to an hour, or at
//! once on a new token ([`Bridge::set_device`]) or [`Bridge::resume`]; the others go
//! on. Any other non-success PUBACK (0x80, 0x83, 0x97, …) is treated like a failed
//! session, whose backoff grows, and after [`READING_REFUSALS_MAX`] refusals in a row
//! that reading is dropped and counted rather than block the device.
//!
//! [`Bridge::device_status`]: super::Bridge::device_status
//! [`Bridge::set_device`]: super::Bridge::set_device
//! [`Bridge::resume`]: super::Bridge::resume
//! Two gateways bridging one device take each other's session over (the client id is
//! the device id): repeated DISCONNECTs with reason 0x8E — or connections the broker
//! closes without a word right after accepting the login, which is how mosquitto
//! 2.0 does it — are said loudly, and the reconnects back off instead of flapping.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, PubAckReason};
use rumqttc::v5::MqttOptions;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{close, Ev, Events};
pub(super) use super::connection::{rumqttc_connect, Connect, UplinkClient, CLOSE_GRACE};
use super::held::Held;
use super::shared::{lock, Inner};
use super::status::DeviceState;
use super::uplink_errors::{classify, humantime, SessionEnd, TAKEOVER_SUSPECT};
use crate::config::Secret;
use crate::store::StoreError;

use super::connection::window_for;
pub use super::connection::{MAX_WINDOW, WINDOW};

/// How long a connection asked to close (its turn is over, the daemon stops) waits
/// for the PUBACKs of readings already sent. Closing with readings in flight would
/// send them again on the next connection: Qubitro would hold them twice.
const DRAIN: Duration = Duration::from_secs(2);

/// Refusals of one reading (a non-success PUBACK other than "not authorized")
/// after which it is dropped and counted: a reading Qubitro never takes must not
/// block every later one of its device.
pub const READING_REFUSALS_MAX: u32 = 5;

/// How a connection task ended.
#[derive(Debug)]
pub(super) enum End {
    /// No data for `idle_disconnect_s`, or nothing left to do.
    Idle,
    /// Closed by the scheduler (a slot for another device, shutdown, forget).
    Closed,
    /// Refused by Qubitro: retried at this time unless resumed earlier.
    Paused(Instant),
}

pub(super) struct DeviceTask {
    /// Opens each connection: rumqttc in the daemon, a script in unit tests.
    pub(super) connect: Arc<Connect>,
    pub(super) inner: Arc<Inner>,
    pub(super) sensor: String,
    pub(super) device_id: String,
    pub(super) token: Secret,
    pub(super) notify: Arc<Notify>,
    pub(super) cancel: CancellationToken,
}

impl DeviceTask {
    pub(super) async fn run(self) -> End {
        let mut attempt: u32 = 0;
        // The reading Qubitro refused last, and how many times in a row.
        let mut refused: Option<(u64, u32)> = None;
        loop {
            self.inner
                .set_state(&self.sensor, DeviceState::Connecting { attempt });
            match self.session().await {
                SessionEnd::Idle => return End::Idle,
                SessionEnd::Closed => return End::Closed,
                SessionEnd::Refused(reason) => return self.pause(reason),
                SessionEnd::ReadingRefused { id, reason } => {
                    refused = self.reading_refused(refused, id, &reason);
                }
                SessionEnd::Lost {
                    error,
                    connected,
                    takeover,
                } => {
                    self.say_lost(&error, connected, takeover, attempt);
                    // A takeover "succeeded" at connecting, but resetting would flap.
                    if connected && !takeover {
                        attempt = 0;
                    }
                }
            }
            let wait = self.inner.settings.backoff.delay(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.cancel.cancelled() => return End::Closed,
            }
        }
    }

    /// Qubitro refused the login or the topic: the device waits for its retry
    /// (or for new credentials, or `devices resume`), and its slot goes to others.
    fn pause(&self, reason: String) -> End {
        let Some(pause) = self.inner.pause(&self.sensor, &reason) else {
            // Forgotten meanwhile.
            return End::Closed;
        };
        let retry_in = humantime(pause.retry_in);
        if pause.refusals == 1 {
            tracing::error!(
                sensor_id = %self.sensor,
                device_id = %self.device_id,
                reason = %reason,
                "BRIDGE PAUSED for this device: Qubitro refused it ({reason}); was the device deleted or its \
                 token changed? Its readings stay buffered; retried in {retry_in} (the wait doubles up to 1 h), \
                 at once on `onboardd devices resume {}`; other devices are not affected",
                self.sensor
            );
        } else {
            tracing::warn!(
                sensor_id = %self.sensor,
                device_id = %self.device_id,
                reason = %reason,
                refusals = pause.refusals,
                "bridge: still paused, Qubitro refused this device again ({reason}); next retry in {retry_in}"
            );
        }
        End::Paused(pause.retry_at)
    }

    /// Qubitro refused reading `id` with a PUBACK that is neither success nor "not
    /// authorized": counted, and dropped at the [`READING_REFUSALS_MAX`]th refusal
    /// in a row. Returns the new count.
    fn reading_refused(
        &self,
        last: Option<(u64, u32)>,
        id: u64,
        reason: &str,
    ) -> Option<(u64, u32)> {
        let n = match last {
            Some((last, n)) if last == id => n + 1,
            _ => 1,
        };
        if n < READING_REFUSALS_MAX {
            tracing::warn!(
                sensor_id = %self.sensor, device_id = %self.device_id, reason, refusals = n,
                "bridge: Qubitro refused a reading ({reason}), {n} of {READING_REFUSALS_MAX} times; retrying after a backoff"
            );
            return Some((id, n));
        }
        match self.inner.buffer.remove_through(&self.sensor, id) {
            Ok(removed) => {
                let total = self.inner.dropped.fetch_add(removed, Ordering::Relaxed) + removed;
                tracing::warn!(
                    sensor_id = %self.sensor, device_id = %self.device_id, reason, dropped = total,
                    "bridge: Qubitro refused a reading {n} times ({reason}); dropped ({total} dropped since start)"
                );
            }
            Err(e) => tracing::error!(sensor_id = %self.sensor, error = %e, "bridge buffer: {e}"),
        }
        None
    }

    fn say_lost(&self, error: &str, connected: bool, takeover: bool, attempt: u32) {
        if takeover {
            let (n, say) = self.inner.takeover(&self.sensor);
            if say {
                tracing::error!(
                    sensor_id = %self.sensor,
                    device_id = %self.device_id,
                    takeovers = n,
                    "SESSION TAKEN OVER {n} times in 10 minutes: another client logs in to Qubitro as this device \
                     (a second gateway bridging it, or the sensor itself with its token); each keeps disconnecting the other"
                );
            } else {
                tracing::warn!(
                    sensor_id = %self.sensor, device_id = %self.device_id, error = %error,
                    "bridge: session taken over: {error}"
                );
            }
        } else if connected {
            tracing::warn!(
                sensor_id = %self.sensor, device_id = %self.device_id, error = %error,
                "bridge: uplink lost ({error}); reconnecting"
            );
        } else if attempt == 0 {
            tracing::warn!(
                sensor_id = %self.sensor, device_id = %self.device_id, error = %error,
                "bridge: cannot reach Qubitro's broker ({error}); retrying"
            );
        } else {
            tracing::debug!(sensor_id = %self.sensor, attempt, error = %error, "bridge: still unreachable");
        }
    }

    /// Whether the device's credentials are still the ones this task logs in with.
    fn credentials_current(&self) -> bool {
        lock(&self.inner.devices)
            .get(&self.sensor)
            .is_some_and(|d| {
                d.device_id == self.device_id && d.token.expose() == self.token.expose()
            })
    }

    fn options(&self) -> MqttOptions {
        let s = &self.inner.settings;
        let mut opts = MqttOptions::new(self.device_id.clone(), s.host.clone(), s.port);
        opts.set_credentials(self.device_id.clone(), self.token.expose().to_string());
        // Clean start: nothing of an earlier connection is resent by rumqttc; the
        // buffer is the only source of what to send.
        opts.set_clean_start(true);
        opts.set_keep_alive(s.keep_alive);
        opts.set_connection_timeout(s.connect_timeout_s);
        // Room for our window; rumqttc preallocates one slot per in-flight publish.
        opts.set_outgoing_inflight_upper_limit(MAX_WINDOW as u16);
        opts.set_max_packet_size(Some(64 * 1024));
        let mut net = rumqttc::NetworkOptions::new();
        // Nagle would hold every small reading back ~40 ms behind the previous one.
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(s.connect_timeout_s);
        opts.set_network_options(net);
        if let Some(tls) = &s.tls {
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        opts
    }

    async fn session(&self) -> SessionEnd {
        let (client, mut rx) = (self.connect)(self.options());
        let end = self.drive(client.as_ref(), &mut rx).await;
        // Nothing forwards its held readings now: they go to the buffer.
        self.inner.set_live(&self.sensor, None);
        end
    }

    /// The readings to send next, oldest first: the buffer's (after `last_sent`),
    /// then the held ones. Never the buffer's while held readings are out: those
    /// may have been spilled into the buffer meanwhile, and would go out twice.
    fn next_batch(
        &self,
        last_sent: Option<u64>,
        held_out: bool,
        room: usize,
    ) -> Result<Vec<(Src, Vec<u8>)>, StoreError> {
        // The buffer's count first (in memory): otherwise every refill of a healthy
        // uplink pays for a sled range scan that finds nothing.
        if !held_out && self.inner.buffer.count(&self.sensor) > 0 {
            let batch = self.inner.buffer.oldest(&self.sensor, last_sent, room)?;
            if !batch.is_empty() {
                return Ok(batch
                    .into_iter()
                    .map(|(id, json)| (Src::Buffered(id), json))
                    .collect());
            }
        }
        let mut lanes = lock(&self.inner.lanes);
        Ok(std::iter::from_fn(|| lanes.next_to_send(&self.sensor))
            .take(room)
            .map(|h| (Src::Held(h.clone()), h.json.clone()))
            .collect())
    }

    /// One session on `client`, whose event loop's events arrive on `rx`: the
    /// seam the unit tests script, playing the broker.
    async fn drive(&self, client: &(impl UplinkClient + ?Sized), rx: &mut Events) -> SessionEnd {
        let topic = self.device_id.clone();
        let buffer = &self.inner.buffer;
        let idle = self.inner.settings.idle;
        let mut connected = false;
        let mut connected_at: Option<Instant> = None;
        // Set from the CONNACK's Receive Maximum.
        let mut window = WINDOW;
        // Requested from rumqttc, no packet id seen yet (request order).
        let mut requested: VecDeque<Src> = VecDeque::new();
        // Sent, waiting for their PUBACK (send order = ack order).
        let mut inflight: VecDeque<(u16, Src)> = VecDeque::new();
        let mut last_sent: Option<u64> = None;
        // Whether Qubitro took a reading on this connection (once is enough to say so).
        let mut delivered = false;
        let mut idle_deadline = Instant::now() + idle;
        // Set once asked to close: no new reading is sent, the ones in flight are
        // waited for until then.
        let mut draining: Option<Instant> = None;
        let lost = |error: String, connected: bool| SessionEnd::Lost {
            error,
            connected,
            takeover: false,
        };
        loop {
            let outstanding = requested.len() + inflight.len();
            if draining.is_some() && outstanding == 0 {
                close(client, rx).await;
                return SessionEnd::Closed;
            }
            if connected && draining.is_none() && outstanding < window {
                let held_out = requested
                    .iter()
                    .chain(inflight.iter().map(|(_, s)| s))
                    .any(Src::is_held);
                let batch = match self.next_batch(last_sent, held_out, window - outstanding) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "bridge buffer unreadable: {e}");
                        return lost(format!("buffer: {e}"), true);
                    }
                };
                // Checked after reading: a reading appended after new credentials
                // were set (set_device) never goes out under the old login.
                if !batch.is_empty() && !self.credentials_current() {
                    close(client, rx).await;
                    return SessionEnd::Closed;
                }
                for (src, json) in batch {
                    idle_deadline = Instant::now() + idle;
                    // The channel holds twice the window: this never finds it full.
                    if let Err(e) = client.publish(&topic, json) {
                        return lost(format!("queueing a publish: {e}"), true);
                    }
                    if let Src::Buffered(id) = src {
                        last_sent = Some(id);
                    }
                    requested.push_back(src);
                }
            }
            let quiet = connected && requested.is_empty() && inflight.is_empty();
            let ev = tokio::select! {
                biased;
                _ = self.cancel.cancelled(), if draining.is_none() => {
                    if !connected || requested.is_empty() && inflight.is_empty() {
                        close(client, rx).await;
                        return SessionEnd::Closed;
                    }
                    draining = Some(Instant::now() + DRAIN);
                    continue;
                }
                _ = tokio::time::sleep_until(draining.unwrap_or_else(Instant::now)), if draining.is_some() => {
                    close(client, rx).await;
                    return SessionEnd::Closed;
                }
                ev = rx.recv() => ev,
                _ = self.notify.notified(), if quiet => continue,
                _ = tokio::time::sleep_until(idle_deadline), if quiet => {
                    if buffer.count(&self.sensor) > 0 || lock(&self.inner.lanes).holds(&self.sensor) {
                        idle_deadline = Instant::now() + idle;
                        continue;
                    }
                    close(client, rx).await;
                    return SessionEnd::Idle;
                }
            };
            let Some(ev) = ev else {
                return lost("the event loop task ended".into(), connected);
            };
            match ev {
                Ev::ConnAck(receive_maximum) => {
                    connected = true;
                    window = window_for(receive_maximum);
                    connected_at = Some(Instant::now());
                    idle_deadline = Instant::now() + idle;
                    self.inner.set_state(&self.sensor, DeviceState::Connected);
                    self.inner.set_live(&self.sensor, Some(self.notify.clone()));
                    tracing::debug!(sensor_id = %self.sensor, device_id = %self.device_id, "bridge: uplink connected");
                }
                Ev::Sent(pkid) => {
                    if let Some(src) = requested.pop_front() {
                        inflight.push_back((pkid, src));
                    }
                }
                Ev::Collided(pkid) => {
                    return lost(
                        format!("packet id {pkid} collided; starting over from the buffer"),
                        true,
                    );
                }
                Ev::PubAck(ack_pkid, reason) => {
                    let Some((pkid, _)) = inflight.front() else {
                        return lost(format!("PUBACK {} for nothing sent", ack_pkid), true);
                    };
                    if *pkid != ack_pkid {
                        return lost(
                            format!("PUBACK {} out of order (expected {pkid})", ack_pkid),
                            true,
                        );
                    }
                    let Some((_, src)) = inflight.pop_front() else {
                        continue;
                    };
                    match reason {
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            if let Err(e) = self.taken(&src) {
                                tracing::error!(error = %e, "bridge buffer: {e}");
                                return lost(format!("buffer: {e}"), true);
                            }
                            self.inner.forwarded.fetch_add(1, Ordering::Relaxed);
                            if !delivered {
                                delivered = true;
                                self.inner.delivered(&self.sensor);
                            }
                        }
                        PubAckReason::NotAuthorized => {
                            return SessionEnd::Refused(format!(
                                "publishing to the topic {topic} was not authorized (PUBACK 0x87)"
                            ));
                        }
                        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => {
                            // This reading can never be taken: keeping it would block
                            // every later one.
                            let removed = match self.taken(&src) {
                                Ok(n) => n,
                                Err(e) => return lost(format!("buffer: {e}"), true),
                            };
                            let n =
                                self.inner.dropped.fetch_add(removed, Ordering::Relaxed) + removed;
                            tracing::warn!(
                                sensor_id = %self.sensor, device_id = %self.device_id, reason = ?reason, dropped = n,
                                "bridge: Qubitro refused a reading ({reason:?}); dropped"
                            );
                        }
                        // Unspecified (0x80), implementation specific (0x83), quota
                        // exceeded (0x97), …: like a failed session, the backoff grows.
                        other => {
                            // A held reading goes to the buffer, where its refusals count.
                            self.inner.set_live(&self.sensor, None);
                            let Some(id) = src.buffered_id() else {
                                return lost(format!("PUBACK {other:?}"), true);
                            };
                            return SessionEnd::ReadingRefused {
                                id,
                                reason: format!("PUBACK {other:?}"),
                            };
                        }
                    }
                }
                Ev::Disconnected(code) => {
                    return SessionEnd::Lost {
                        error: format!("disconnected by the broker: {code:?}"),
                        connected: true,
                        takeover: code == DisconnectReasonCode::SessionTakenOver,
                    };
                }
                Ev::Other | Ev::DisconnectSent => {}
                Ev::Failed(e) => {
                    let soon = connected_at.is_some_and(|t| t.elapsed() < TAKEOVER_SUSPECT);
                    return classify(*e, connected, soon);
                }
            }
        }
    }
}

impl DeviceTask {
    /// Qubitro took (or refused for good) the reading `src`: out of the buffer, or
    /// settled as forwarded. Returns how many readings left the buffer or memory.
    fn taken(&self, src: &Src) -> Result<u64, StoreError> {
        let buffered = match src {
            Src::Buffered(id) => *id,
            Src::Held(h) => match lock(&self.inner.lanes).forwarded(&self.sensor, h) {
                // Spilled while Qubitro had it: its copy is not needed any more.
                Some(id) => id,
                None => return Ok(1),
            },
        };
        self.inner.buffer.remove_through(&self.sensor, buffered)
    }
}

/// Where a sent reading came from.
enum Src {
    /// The buffer, by id.
    Buffered(u64),
    /// Memory (acknowledged through).
    Held(Arc<Held>),
}

impl Src {
    fn is_held(&self) -> bool {
        matches!(self, Src::Held(_))
    }

    fn buffered_id(&self) -> Option<u64> {
        match self {
            Src::Buffered(id) => Some(*id),
            Src::Held(_) => None,
        }
    }
}

#[cfg(test)]
#[path = "uplink_tests.rs"]
mod tests;
