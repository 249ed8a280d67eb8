//! The uplink's session logic against a scripted broker: the test plays rumqttc's
//! event loop through the [`Connect`] seam, on tokio's paused clock, so the waits
//! between connections are exact.

use std::sync::Arc;

use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Packet, PubAck, PubAckReason,
};
use rumqttc::v5::{ConnectionError, Event};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Connect, DeviceTask, End, Ev, UplinkClient, DRAIN, MAX_WINDOW, READING_REFUSALS_MAX};
use crate::bridge::{Bridge, DeviceState};
use crate::config::{Config, Secret};
use crate::store::Store;

/// What a scripted connection publishes.
struct Recorder(mpsc::UnboundedSender<Vec<u8>>);

impl UplinkClient for Recorder {
    fn publish(&self, _topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.0.send(payload).map_err(|e| e.to_string())
    }

    fn disconnect(&self) -> bool {
        true
    }
}

/// One connection the uplink opened, as the scripted broker sees it.
struct Opened {
    at: Instant,
    events: mpsc::UnboundedSender<Ev>,
    published: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl Opened {
    fn play(&self, ev: Event) {
        // The session may have ended already; then nobody listens, as with rumqttc.
        let _ = self.events.send(Ok(ev).into());
    }

    fn accept_login(&self) {
        self.play(Event::Incoming(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: None,
        })));
    }

    /// Accepts the login stating this Receive Maximum (`None`: not stated).
    fn accept_login_allowing(&self, receive_max: Option<u16>) {
        let properties = ConnAckProperties {
            session_expiry_interval: None,
            receive_max,
            max_qos: None,
            retain_available: None,
            max_packet_size: None,
            assigned_client_identifier: None,
            topic_alias_max: None,
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        };
        self.play(Event::Incoming(Packet::ConnAck(ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: Some(properties),
        })));
    }

    /// The readings published until the session waits (for a PUBACK), counted.
    async fn published_until_it_waits(&mut self) -> usize {
        let mut n = 0;
        loop {
            tokio::select! {
                p = self.published.recv() => {
                    p.expect("a publish");
                    n += 1;
                }
                // The clock is paused: this fires only once every task waits.
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => return n,
            }
        }
    }

    async fn next_published(&mut self) -> serde_json::Value {
        let p = self.published.recv().await.expect("a publish");
        serde_json::from_slice(&p).expect("JSON")
    }

    fn puback(&self, pkid: u16, reason: PubAckReason) {
        self.play(Event::Incoming(Packet::PubAck(PubAck {
            pkid,
            reason,
            properties: None,
        })));
    }
}

fn scripted() -> (Arc<Connect>, mpsc::UnboundedReceiver<Opened>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let connect: Arc<Connect> = Arc::new(move |_opts| {
        let (events, events_rx) = mpsc::unbounded_channel();
        let (published_tx, published) = mpsc::unbounded_channel();
        let _ = tx.send(Opened {
            at: Instant::now(),
            events,
            published,
        });
        let client: Box<dyn UplinkClient + Send + Sync> = Box::new(Recorder(published_tx));
        (client, events_rx)
    });
    (connect, rx)
}

struct Setup {
    bridge: Bridge,
    _store: Store,
    _dir: tempfile::TempDir,
    connect: Arc<Connect>,
    opened: mpsc::UnboundedReceiver<Opened>,
    cancel: CancellationToken,
    /// How each uplink task ended.
    ended: mpsc::UnboundedReceiver<End>,
    ended_tx: mpsc::UnboundedSender<End>,
}

impl Setup {
    /// Starts the device's uplink task, as the scheduler does.
    fn restart(&self) {
        let task = DeviceTask {
            connect: self.connect.clone(),
            inner: self.bridge.inner.clone(),
            sensor: "s".into(),
            device_id: "dev-1".into(),
            token: Secret::new("tok"),
            notify: Arc::new(Notify::new()),
            cancel: self.cancel.clone(),
        };
        let ended = self.ended_tx.clone();
        tokio::spawn(async move {
            let _ = ended.send(task.run().await);
        });
    }
}

/// A bridge whose device `s` (device `dev-1`) has `readings` buffered, and its
/// uplink task running on the scripted broker.
fn setup(readings: &[&str]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::from_toml(&format!(
        r#"
        gateway_id = "gw"
        [qubitro]
        project_id = "p1"
        api_key = "QB_test"
        [store]
        path = "{}"
        cache_capacity_bytes = 1048576
        [bridge]
        reconnect_max_ms = 60000
        max_readings_per_s = 1000
        "#,
        dir.path().join("db").display()
    ))
    .expect("config");
    let (store, _) = Store::open(&cfg.store).expect("store");
    let bridge = Bridge::new(&cfg, &store).expect("bridge");
    bridge.set_device("s", "dev-1", "tok");
    for r in readings {
        bridge.accept("s", r.as_bytes(), false).expect("accepted");
    }
    let (connect, opened) = scripted();
    let (ended_tx, ended) = mpsc::unbounded_channel();
    let s = Setup {
        bridge,
        _store: store,
        _dir: dir,
        connect,
        opened,
        cancel: CancellationToken::new(),
        ended,
        ended_tx,
    };
    s.restart();
    s
}

#[tokio::test(start_paused = true)]
async fn a_reading_qubitro_keeps_refusing_is_retried_with_growing_waits_then_dropped_and_counted() {
    let mut s = setup(&[r#"{"n":1}"#, r#"{"n":2}"#]);
    let mut at = Vec::new();
    for _ in 0..READING_REFUSALS_MAX {
        let mut c = s.opened.recv().await.expect("a connection");
        at.push(c.at);
        c.accept_login();
        assert_eq!(c.next_published().await["n"], 1);
        assert_eq!(c.next_published().await["n"], 2);
        c.play(Event::Outgoing(Outgoing::Publish(1)));
        c.play(Event::Outgoing(Outgoing::Publish(2)));
        c.puback(1, PubAckReason::UnspecifiedError);
    }
    // Each wait is at least as long as the one before, the last one several
    // times the first: a refusing broker is not hammered every half second.
    let waits: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
    assert!(waits[waits.len() - 1] >= waits[0] * 4, "{waits:?}");

    // After the last refusal the reading is dropped and counted; the next goes out.
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    assert_eq!(c.next_published().await["n"], 2);
    assert_eq!(s.bridge.stats().dropped, 1);
    c.play(Event::Outgoing(Outgoing::Publish(1)));
    c.puback(1, PubAckReason::Success);
    while s.bridge.stats().forwarded == 0 {
        tokio::task::yield_now().await;
    }
    assert_eq!(s.bridge.device_status("s").expect("known").buffered, 0);
    s.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_refusal_of_another_reading_starts_its_own_count() {
    let mut s = setup(&[r#"{"n":1}"#, r#"{"n":2}"#]);
    // Refused N-1 times, then accepted: n=1 is delivered, not dropped.
    for _ in 1..READING_REFUSALS_MAX {
        let mut c = s.opened.recv().await.expect("a connection");
        c.accept_login();
        assert_eq!(c.next_published().await["n"], 1);
        c.play(Event::Outgoing(Outgoing::Publish(1)));
        c.puback(1, PubAckReason::QuotaExceeded);
    }
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    assert_eq!(c.next_published().await["n"], 1);
    assert_eq!(c.next_published().await["n"], 2);
    c.play(Event::Outgoing(Outgoing::Publish(1)));
    c.play(Event::Outgoing(Outgoing::Publish(2)));
    c.puback(1, PubAckReason::Success);
    // The second reading's first refusal does not drop it.
    c.puback(2, PubAckReason::ImplementationSpecificError);
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    assert_eq!(c.next_published().await["n"], 2);
    assert_eq!(s.bridge.stats().dropped, 0);
    assert_eq!(s.bridge.stats().forwarded, 1);
    s.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_device_whose_publishes_are_refused_waits_longer_before_each_retry() {
    let mut s = setup(&[r#"{"n":1}"#]);
    let mut waits = Vec::new();
    for _ in 0..3 {
        let mut c = s.opened.recv().await.expect("a connection");
        // The login works; the topic does not (PUBACK 0x87).
        c.accept_login();
        assert_eq!(c.next_published().await["n"], 1);
        c.play(Event::Outgoing(Outgoing::Publish(1)));
        c.puback(1, PubAckReason::NotAuthorized);
        let end = s.ended.recv().await.expect("the task ended");
        let End::Paused(retry_at) = end else {
            panic!("not paused: {end:?}");
        };
        let status = s.bridge.device_status("s").expect("known");
        assert!(
            matches!(status.state, DeviceState::Paused { .. }),
            "{status:?}"
        );
        assert_eq!(status.buffered, 1);
        waits.push(retry_at - Instant::now());
        // The scheduler starts the next attempt when the retry is due.
        tokio::time::sleep_until(retry_at).await;
        s.restart();
    }
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
    assert!(waits[2] >= waits[0] * 2, "{waits:?}");
    s.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_held_reading_is_settled_by_qubitros_puback_and_one_out_when_the_connection_drops_is_spilled_and_sent_first(
) {
    let mut s = setup(&[]);
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    while s.bridge.device_status("s").expect("known").state != DeviceState::Connected {
        tokio::task::yield_now().await;
    }
    let first = s
        .bridge
        .accept("s", br#"{"n":1}"#, false)
        .expect("accepted");
    assert!(first.ticket.is_held(), "held for the connected uplink");
    // The scheduler wakes the uplink through its notify; here the session polls
    // the lane as soon as anything happens on the connection.
    c.play(Event::Outgoing(Outgoing::PingReq));
    assert_eq!(c.next_published().await["n"], 1);
    c.play(Event::Outgoing(Outgoing::Publish(1)));
    let second = s
        .bridge
        .accept("s", br#"{"n":2}"#, false)
        .expect("accepted");
    assert!(second.ticket.is_held());
    c.play(Event::Outgoing(Outgoing::PingReq));
    assert_eq!(c.next_published().await["n"], 2);
    c.play(Event::Outgoing(Outgoing::Publish(2)));
    c.puback(1, PubAckReason::Success);
    assert_eq!(
        first.ticket.settle().await.expect("settled"),
        crate::bridge::Settled::Forwarded
    );
    assert_eq!(s.bridge.device_status("s").expect("known").buffered, 0);

    // The connection drops with the second one out: spilled, and sent first next time.
    let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
    let _ = c.events.send(Err(ConnectionError::Io(reset)).into());
    let settled = second.ticket.settle().await.expect("settled");
    assert!(
        matches!(settled, crate::bridge::Settled::Spilled(_)),
        "{settled:?}"
    );
    assert_eq!(s.bridge.device_status("s").expect("known").buffered, 1);
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    assert_eq!(c.next_published().await["n"], 2);
    s.cancel.cancel();
}

/// A connected uplink with reading `{"n":1}` sent (packet id 1), not yet acknowledged.
async fn one_reading_out(s: &mut Setup) -> Opened {
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login();
    assert_eq!(c.next_published().await["n"], 1);
    c.play(Event::Outgoing(Outgoing::Publish(1)));
    c
}

#[tokio::test(start_paused = true)]
async fn a_connection_asked_to_close_waits_for_the_puback_of_what_it_sent_so_nothing_goes_twice() {
    let mut s = setup(&[r#"{"n":1}"#]);
    let c = one_reading_out(&mut s).await;
    // Its turn is over (or the daemon stops).
    s.cancel.cancel();
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(
        s.ended.try_recv().is_err(),
        "closed with a reading in flight"
    );
    c.puback(1, PubAckReason::Success);
    assert!(matches!(s.ended.recv().await, Some(End::Closed)));
    assert_eq!(s.bridge.device_status("s").expect("known").buffered, 0);
}

#[tokio::test(start_paused = true)]
async fn a_connection_asked_to_close_gives_up_waiting_for_a_puback_after_the_drain_time_and_keeps_the_reading(
) {
    let mut s = setup(&[r#"{"n":1}"#]);
    let _c = one_reading_out(&mut s).await;
    let asked = Instant::now();
    s.cancel.cancel();
    assert!(matches!(s.ended.recv().await, Some(End::Closed)));
    assert!(Instant::now() - asked >= DRAIN);
    // Sent again on the next connection (at least once).
    assert_eq!(s.bridge.device_status("s").expect("known").buffered, 1);
}

fn readings(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!(r#"{{"n":{i}}}"#)).collect()
}

#[tokio::test(start_paused = true)]
async fn an_uplink_keeps_as_many_readings_outstanding_as_the_brokers_receive_maximum_allows() {
    let r = readings(60);
    let mut s = setup(&r.iter().map(String::as_str).collect::<Vec<_>>());
    let mut c = s.opened.recv().await.expect("a connection");
    c.accept_login_allowing(Some(20));
    assert_eq!(c.published_until_it_waits().await, 20);
    for pkid in 1..=20 {
        c.play(Event::Outgoing(Outgoing::Publish(pkid)));
    }
    c.puback(1, PubAckReason::Success);
    assert_eq!(c.published_until_it_waits().await, 1, "one out for one in");
    s.cancel.cancel();
}

#[tokio::test(start_paused = true)]
async fn an_uplink_keeps_at_most_max_window_outstanding_however_many_the_broker_allows() {
    let r = readings(60);
    let for_each = [(Some(4), 4), (Some(1000), MAX_WINDOW), (None, MAX_WINDOW)];
    for (allowed, expected) in for_each {
        let mut s = setup(&r.iter().map(String::as_str).collect::<Vec<_>>());
        let mut c = s.opened.recv().await.expect("a connection");
        c.accept_login_allowing(allowed);
        assert_eq!(
            c.published_until_it_waits().await,
            expected,
            "Receive Maximum {allowed:?}"
        );
        s.cancel.cancel();
    }
}
